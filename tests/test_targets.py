"""Population targets (issue 13, algorithms/targets.py): each method's target is the exact minimiser of its
population objective, or the fixed point of its on-policy refit, on every env. Checked against autograd
gradients computed here, torch's L-BFGS (a solver separate from envs.lbfgs) from random starts, and the
definition of a fixed point; then through a real run: run.json `target`, the excess metric, the figure's
target line and the report's table."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ratebench import envs
from ratebench.algorithms import ALGORITHMS
from ratebench.algorithms.dpo import population_loss
from ratebench.algorithms.targets import bt_mle_units, soft_optimal_at
from ratebench.config import compose, validate
from ratebench.envs.exact import bilevel_objective, policy_value, soft_optimal, upper_loss
from ratebench.envs.global_ref import global_reference

from independent_solvers import torch_lbfgs

D = torch.float64
ENVS = ["bandit", "token", "mdp"]


def _setup(env: str, *overrides: str):
    v = validate(compose([f"env={env}", *overrides]))
    problem = envs.make(v.env)
    return v, problem


def _algorithm(v, problem):
    return ALGORITHMS[v.algorithm.name](v.algorithm, v.model, problem)


def _policy_gap(problem, logps) -> float:
    true = problem.true_step_tables()
    j_star = float(soft_optimal(problem, true)[1] @ problem.init_prob)
    return j_star - float(policy_value(problem, true, logps)[0])


def _max_prob_diff(a, b) -> float:
    return max(float((x.exp() - y.exp()).abs().max()) for x, y in zip(a, b))


def _torch_lbfgs(objective, x):
    """Minimise objective(x) (a scalar) over one tensor with the independent solver, from x."""
    return torch_lbfgs(lambda xs: objective(xs[0]), [x], max_iter=3000)[0]


def _logit_tables(problem, x):
    """(n,) free logits -> per-step log-prob tables [(1, n_h, A)] around pi_ref."""
    ref = problem.ref_log_probs()
    out, i = [], 0
    for r in ref:
        k = r[0].numel()
        out.append(torch.log_softmax(r + x[i:i + k].view(1, *r.shape[1:]), -1))
        i += k
    return out


def _n_logits(problem) -> int:
    return sum(r[0].numel() for r in problem.ref_log_probs())


# --- the BT-MLE reward (reward_mle, PPO-RLHF offline) -------------------------------------------------

@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("noise", [0.0, 0.2])
def test_bt_mle_target_is_the_population_minimiser_and_pi_star_only_without_label_noise(env, noise):
    v, problem = _setup(env, "algorithm=reward_mle", f"env.label_noise={noise}")
    target = _algorithm(v, problem).population_targets(None)["target"]
    assert target.solved
    units = bt_mle_units(problem, problem.ref_log_probs())[0]
    ref = problem.ref_log_probs()
    objective = lambda u: upper_loss(problem, problem.step_tables_from_units(u[None]), ref)[0]  # noqa: E731
    x = units.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x), x)
    assert float(grad.abs().max()) < 1e-8  # stationary; the objective is convex in the unit rewards
    gen = torch.Generator().manual_seed(3)
    for _ in range(2):  # independent solver, random starts: the same policy (rewards agree up to shifts)
        other = _torch_lbfgs(objective, torch.randn(problem.n_units, generator=gen, dtype=D))
        assert float(objective(other)) <= float(objective(units)) + 1e-12
        other_policy = soft_optimal(problem, problem.step_tables_from_units(other[None]))[0]
        assert _max_prob_diff(other_policy, target.logps) < 1e-6
    gap = _policy_gap(problem, target.logps)
    if noise == 0:  # the oracle is the BT model: the MLE is nu_true (up to shifts) and pi* its policy
        assert abs(gap) < 1e-9
    else:  # flipped labels shrink the fitted reward: pi* of it is a biased target
        assert gap > 1e-3, gap


def test_ppo_targets_use_its_own_kl_coefficient():
    v, problem = _setup("bandit", "algorithm=ppo_rlhf", "algorithm.reward_oracle=true", "algorithm.beta=2.0")
    target = _algorithm(v, problem).population_targets(None)["target"]
    # independent: pi*_beta' maximises J - beta' KL; at beta' = 2 the policy is pi_ref^(1) * exp(r / 2) normalised
    ref, true = problem.ref_log_probs()[0], problem.true_step_tables()[0]
    expected = torch.log_softmax(ref + true / 2.0, -1)
    assert float((target.logps[0] - expected).abs().max()) < 1e-12
    assert _policy_gap(problem, target.logps) > 1e-3  # more KL, less reward than the env's pi*
    # and the helper agrees with soft_optimal at the env's beta
    assert _max_prob_diff(soft_optimal_at(problem, [true], problem.beta), soft_optimal(problem, [true])[0]) == 0


# --- DPO: offline minimiser and online fixed point -----------------------------------------------------

@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_offline_dpo_target_minimises_its_population_loss(env, loss):
    v, problem = _setup(env, "algorithm=dpo", f"algorithm.loss={loss}")
    algo = _algorithm(v, problem)
    target = algo.population_targets(None)["target"]
    assert target.solved
    objective = lambda x: population_loss(problem, _logit_tables(problem, x), algo.beta, loss)[0]  # noqa: E731
    gen = torch.Generator().manual_seed(5)
    for _ in range(2):
        other = _logit_tables(problem, _torch_lbfgs(objective, torch.randn(_n_logits(problem), generator=gen,
                                                                           dtype=D)))
        assert _max_prob_diff(other, target.logps) < 1e-5
    # the recorded reward is DPO's implicit reward of the target policy
    for r, lp, ref in zip(target.rewards, target.logps, problem.ref_log_probs()):
        assert torch.allclose(r, algo.beta * (lp - ref))


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("case", [("algorithm=dpo", "algorithm.mode=online"),
                                  ("algorithm=ppo_rlhf", "algorithm.mode=online", "env.label_noise=0.2")])
def test_online_targets_are_fixed_points_of_the_on_policy_refit(env, case):
    v, problem = _setup(env, *case)
    algo = _algorithm(v, problem)
    target = algo.population_targets(None)["target"]
    assert target.solved, target.residual
    if v.algorithm.name == "dpo":
        # stationary for the loss on pairs drawn from itself (pairs held fixed, as an on-policy step sees them)
        x = torch.cat([(lp - r)[0].reshape(-1) for lp, r in zip(target.logps, problem.ref_log_probs())])
        x = x.clone().requires_grad_(True)
        pairs = [t.detach() for t in target.logps]
        value = population_loss(problem, _logit_tables(problem, x), algo.beta, v.algorithm.loss, pairs)[0]
        (grad,) = torch.autograd.grad(value, x)
        assert float(grad.abs().max()) < 1e-6
    else:
        # the BT-MLE on pairs from the target's policy, solved independently, gives the target's policy back
        pairs = [t.detach() for t in target.logps]
        objective = lambda u: upper_loss(problem, problem.step_tables_from_units(u[None]), pairs)[0]  # noqa: E731
        units = _torch_lbfgs(objective, torch.zeros(problem.n_units, dtype=D))
        again = soft_optimal_at(problem, problem.step_tables_from_units(units[None]), algo.beta)
        assert _max_prob_diff(again, target.logps) < 1e-6
    # the offline target (pi_ref pairs) is a different point wherever the pair distribution matters
    offline = _algorithm(validate(compose([f"env={env}", *case[:1], *case[2:]])), problem).population_targets(None)
    if env == "mdp" and v.algorithm.name == "dpo":
        assert _max_prob_diff(offline["target"].logps, target.logps) > 1e-3


def test_online_dpo_fixed_point_does_not_depend_on_the_start():
    """An independent start (a random policy instead of pi_ref) iterates to the same fixed point."""
    from ratebench.algorithms.dpo import solve_population_loss
    from ratebench.algorithms.targets import FIXED_POINT_TOL

    v, problem = _setup("mdp", "algorithm=dpo", "algorithm.mode=online")
    algo = _algorithm(v, problem)
    target = algo.population_targets(None)["target"]
    gen = torch.Generator().manual_seed(11)
    logps = _logit_tables(problem, torch.randn(_n_logits(problem), generator=gen, dtype=D))
    for _ in range(200):
        new = solve_population_loss(problem, algo.beta, "sigmoid", logps)[0]
        done = _max_prob_diff(new, logps) <= FIXED_POINT_TOL
        logps = new
        if done:
            break
    assert _max_prob_diff(logps, target.logps) < 1e-5
    assert _policy_gap(problem, target.logps) > 0.01  # transition noise: not pi*, whatever the pairs


def test_hinge_dpo_has_no_single_target():
    v, problem = _setup("bandit", "algorithm=dpo", "algorithm.loss=hinge")
    assert _algorithm(v, problem).population_targets(None) == {}


# --- the bilevel method --------------------------------------------------------------------------------

@pytest.mark.parametrize("env", ["bandit", "token"])
def test_bilevel_targets_are_minimisers_of_f(env):
    v, problem = _setup(env, "algorithm=bilevel")
    reference = global_reference(problem)
    targets = _algorithm(v, problem).population_targets(reference)
    local = targets["target"]
    units = reference.local_argmin.clone().requires_grad_(True)
    value = bilevel_objective(problem, problem.step_tables_from_units(units[None]))[0]
    (grad,) = torch.autograd.grad(value, units)
    assert float(grad.abs().max()) < 1e-8 and abs(float(value.detach()) - reference.local_value) < 1e-12
    assert abs(float(bilevel_objective(problem, local.rewards)[0]) - reference.local_value) < 1e-12  # F there
    # its policy is the lower level's solution: stationary for J(r) - beta KL in the policy logits
    x = torch.cat([(lp - r)[0].reshape(-1) for lp, r in zip(local.logps, problem.ref_log_probs())]).requires_grad_(True)
    lower = policy_value(problem, local.rewards, _logit_tables(problem, x))[0]
    (g,) = torch.autograd.grad(lower, x)
    assert float(g.abs().max()) < 1e-10
    globl = targets["target_global"]
    assert abs(float(bilevel_objective(problem, globl.rewards)[0]) - reference.value) < 1e-9
    assert _policy_gap(problem, globl.logps) > _policy_gap(problem, local.logps) > 0.01


# --- through a run: run.json, the metric, the figure, the report ---------------------------------------

def test_a_run_records_its_target_and_the_excess_metric(tmp_path):
    from ratebench.analysis import load, plots
    from ratebench.analysis.commands import fit_groups
    from ratebench.analysis.fit import FitOptions
    from ratebench.analysis.report import target_table
    from ratebench.runner import run_job

    for algorithm in ("bilevel", "dpo"):
        cfg = compose(["env=bandit", f"algorithm={algorithm}", "n_seeds=3", "budget.samples=2000",
                       "progress=false"])
        run_job(cfg, tmp_path / algorithm)
    record = json.loads((tmp_path / "bilevel" / "run.json").read_text())
    assert record["target"]["solved"] and record["target_global"]["policy_gap"] > record["target"]["policy_gap"]
    loaded = load(tmp_path)
    m = loaded.metrics
    bilevel = m[m["algorithm"] == "bilevel"]
    assert np.allclose(bilevel["target_policy_gap_excess"], bilevel["policy_gap"] - record["target"]["policy_gap"],
                       rtol=0, atol=1e-15)
    opts = FitOptions()
    overview = [(metric, fit_groups(loaded, metric, "samples", ["algorithm", "env", "config_hash"], opts), [])
                for metric in ("policy_gap", "target_policy_gap_excess")]
    table = target_table(overview)
    assert list(table["group"]) == ["algorithm=bilevel", "algorithm=dpo"]
    assert table["target policy_gap"].iloc[0] == f"{record['target']['policy_gap']:.3g}"
    # the figure draws the bilevel's target as a dotted horizontal line in its colour (DPO's is 0: none)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    plots.draw_curves(ax, overview[0][1], [])
    flat = [line for line in ax.lines if line.get_gid() == plots.TARGET_GID]
    assert [float(line.get_ydata()[0]) for line in flat] == [pytest.approx(record["target"]["policy_gap"])]
    assert np.ptp(flat[0].get_ydata()) == 0
    assert flat[0].get_color() == plots.STYLES[0][2]
    plt.close(fig)
