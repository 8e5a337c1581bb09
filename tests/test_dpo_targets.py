"""Offline DPO's population target (issue 13 item 4): the exact minimiser of its population loss on
pi_ref pairs equals pi* of the true reward on deterministic envs (bandit, token) and differs on the
stochastic MDP. Checked by the gradient at the minimiser, an independent solver (torch's L-BFGS on
the summed loss, written here) and random starts that agree."""
from __future__ import annotations

import pytest
import torch

from ratebench import envs
from ratebench.algorithms.dpo import population_loss, solve_population_loss
from ratebench.config import compose, validate
from ratebench.envs.exact import policy_value, soft_optimal

from independent_solvers import torch_lbfgs

D = torch.float64


def _problem(env: str):
    return envs.make(validate(compose([f"env={env}"])).env)


def _policy_gap(problem, logps) -> torch.Tensor:
    true = problem.true_step_tables()
    j_star = soft_optimal(problem, true)[1] @ problem.init_prob
    return j_star - policy_value(problem, true, logps)


def _independent_minimiser(problem, beta):
    """torch.optim.LBFGS (strong Wolfe) on one start at pi_ref: a solver separate from minimise_rows."""
    ref = problem.ref_log_probs()
    tables = lambda zs: [torch.log_softmax(r + z, -1) for r, z in zip(ref, zs)]  # noqa: E731
    zs = torch_lbfgs(lambda zs: population_loss(problem, tables(zs), beta).sum(),
                     [torch.zeros(r.shape[1:], dtype=D) for r in ref])
    return tables(zs)


@pytest.mark.parametrize("env", ["bandit", "token", "mdp"])
def test_population_target_is_the_minimiser_and_pi_star_only_without_transition_noise(env):
    problem = _problem(env)
    beta = problem.beta
    target = solve_population_loss(problem, beta, n_starts=3, tol=1e-11)[0]  # row 0 from pi_ref, rows 1-2 random logits
    # every start reaches the same policy (probabilities; the logits' softmax shift is free)
    probs = [t.exp() for t in target]
    assert max(float((p - p[:1]).abs().max()) for p in probs) < 1e-6
    # stationarity: the gradient of the population loss in the log-prob tables' logits vanishes
    logits = [t[:1].clone().requires_grad_(True) for t in target]
    value = population_loss(problem, [torch.log_softmax(z, -1) for z in logits], beta).sum()
    grads = torch.autograd.grad(value, logits)
    assert max(float(g.abs().max()) for g in grads) < 1e-7
    # an independent solver agrees
    other = _independent_minimiser(problem, beta)
    assert max(float((o.exp() - t[:1].exp()).abs().max()) for o, t in zip(other, target)) < 1e-5
    pi_star = soft_optimal(problem, problem.true_step_tables())[0]
    gap = float(_policy_gap(problem, [t[:1] for t in target])[0])
    log_diff = max(float((t[:1] - s).abs().max()) for t, s in zip(target, pi_star))
    if env in ("bandit", "token"):  # deterministic transitions: beta log pi*/pi_ref(tau) = R(tau) - V_0(g)
        assert log_diff < 1e-5 and abs(gap) < 1e-9
    else:  # stochastic transitions: a floor the method cannot go below with any amount of data
        assert gap > 0.01 and log_diff > 0.5, (gap, log_diff)
