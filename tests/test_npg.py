"""npg against computations written here, apart from the package: its step is Cen et al.'s closed-form
multiplicative update (probabilities, numpy, soft Q by an independent backward induction), and on a bandit
the log-policy error contracts by exactly 1 - eta beta per iteration, the suboptimality by (1 - eta beta)^2
asymptotically."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ratebench import envs
from ratebench.algorithms.npg import NPG, soft_q
from ratebench.config import validate
from ratebench.envs import exact
from ratebench.envs.sampling import Counters, CountingSampler

TINY = {"bandit": ["env=bandit", "env.n_contexts=2", "env.n_actions=3", "env.beta=0.5"],
        "mdp": ["env=mdp", "env.n_states=2", "env.n_actions=3", "env.horizon=3", "env.beta=0.5"]}


def build(compose_config, env, *extra):
    v = validate(compose_config(["algorithm=npg", *TINY[env], "budget.steps=10", *extra]))
    problem = envs.make(v.env)
    return NPG(v.algorithm, v.model, problem), problem, v.seeds


def multiplicative_update(pi: list[np.ndarray], problem, eta: float) -> list[np.ndarray]:
    """pi_{t+1} ∝ pi_t^(1 - eta beta) pi_ref^(eta beta) exp(eta Q^{pi_t}), Q the soft Q-function of the
    KL-regularised value by backward induction, all in probabilities (numpy)."""
    beta = problem.beta
    true = [r[0].numpy() for r in problem.true_step_tables()]
    q, v_next = [None] * len(pi), None
    for h in reversed(range(len(pi))):
        step = problem.steps[h]
        ref = np.exp(step.ref_logp.numpy())
        q[h] = true[h] + (0 if v_next is None else (v_next[step.next_idx.numpy()] * step.next_prob.numpy()).sum(-1))
        v_next = (pi[h] * (q[h] - beta * np.log(pi[h] / ref))).sum(-1)
    out = []
    for h, p in enumerate(pi):
        ref = np.exp(problem.steps[h].ref_logp.numpy())
        unnorm = p ** (1 - eta * beta) * ref ** (eta * beta) * np.exp(eta * q[h])
        out.append(unnorm / unnorm.sum(-1, keepdims=True))
    return out


@pytest.mark.parametrize("env", ["bandit", "mdp"])
@pytest.mark.parametrize("eta_beta", [0.1, 0.7])
def test_step_is_the_closed_form_multiplicative_update(compose_config, env, eta_beta):
    algo, problem, _ = build(compose_config, env, f"algorithm.eta_beta={eta_beta}", "algorithm.init_scale=1.0")
    seeds = [1, 6]
    state = algo.init(seeds)
    counters = Counters()
    sampler = CountingSampler(problem, seeds, counters)
    for b in range(2):
        assert not np.allclose(state.logp[0][0].numpy(), state.logp[0][1].numpy())  # seeds start apart
    for t in range(5):
        expect = [multiplicative_update([lp[b].exp().numpy() for lp in state.logp], problem, eta_beta / problem.beta)
                  for b in range(2)]
        state = algo.step(state, sampler)
        for b in range(2):
            for h, lp in enumerate(state.logp):
                np.testing.assert_allclose(lp[b].exp().numpy(), expect[b][h], rtol=1e-10, atol=1e-14,
                                           err_msg=f"{env} iteration {t} seed row {b} step {h}")
    assert (counters.samples, counters.queries) == (0, 0)


def test_soft_q_is_the_q_of_the_evaluated_value(compose_config):
    """V_0 built from npg's soft Q (E_pi[Q - beta log pi/pi_ref]) is envs.exact.policy_value."""
    algo, problem, _ = build(compose_config, "mdp", "algorithm.init_scale=1.0")
    state = algo.init([0, 4])
    q = soft_q(problem, problem.true_step_tables(), state.logp)
    v0 = (state.logp[0].exp() * (q[0] - problem.beta * (state.logp[0] - problem.steps[0].ref_logp))).sum(-1)
    torch.testing.assert_close(v0 @ problem.init_prob,
                               exact.policy_value(problem, problem.true_step_tables(), state.logp), rtol=1e-12, atol=1e-12)


def test_bandit_contracts_at_the_predicted_rate(compose_config):
    """Bandit, pi* ∝ pi_ref exp(r / beta) computed here: the centred error log pi_t - log pi* shrinks by exactly
    rho = 1 - eta beta per iteration, and the suboptimality J* - J = beta E_x KL(pi_t || pi*) by rho^2 in the
    limit (ratio within 1e-3 of rho^2 after 40 iterations; rho itself, Cen et al.'s bound's rate, is refuted)."""
    eta_beta = 0.2
    rho = 1 - eta_beta
    algo, problem, _ = build(compose_config, "bandit", f"algorithm.eta_beta={eta_beta}", "algorithm.init_scale=1.0")
    state = algo.init([0])
    sampler = CountingSampler(problem, [0], Counters())
    r = problem.true_unit_reward.numpy().reshape(problem.steps[0].ref_logp.shape)
    log_star = problem.steps[0].ref_logp.numpy() + r / problem.beta
    log_star -= np.log(np.exp(log_star).sum(-1, keepdims=True))
    j_star = float(exact.optimal_value(problem, problem.true_step_tables())[0])

    def centred_error(lp):
        e = lp[0][0].numpy() - log_star
        return np.abs(e - e.mean(-1, keepdims=True)).max()

    def gap(lp):
        return j_star - float(exact.policy_value(problem, problem.true_step_tables(), lp)[0])

    errors, gaps = [centred_error(state.logp)], [gap(state.logp)]
    for _ in range(45):
        state = algo.step(state, sampler)
        errors.append(centred_error(state.logp))
        gaps.append(gap(state.logp))
    np.testing.assert_allclose(np.array(errors[1:]) / np.array(errors[:-1]), rho, rtol=1e-9)
    # the gap is beta KL(pi_t || pi*), checked independently
    pi = np.exp(state.logp[0][0].numpy())
    kl = (pi * (np.log(pi) - log_star)).sum(-1) @ problem.init_prob.numpy()
    assert gaps[-1] == pytest.approx(problem.beta * kl, rel=1e-6)
    late = gaps[41] / gaps[40]
    assert late == pytest.approx(rho**2, rel=1e-3)
    assert abs(late - rho) > 0.1


def test_bad_options_are_refused_before_any_compute(expect_bad_input):
    expect_bad_input(["algorithm=npg", "budget.steps=10", "algorithm.eta_beta=1.5"], ["algorithm.eta_beta", "(0, 1]"])
    expect_bad_input(["algorithm=npg", "budget.steps=10", "algorithm.oracle=stochastic"], ["algorithm.oracle", "exact"])
    # the preset sets budget.steps (npg draws no samples); taking it away is refused, not an endless run
    expect_bad_input(["algorithm=npg", "budget.steps=null"], ["budget.steps"])
