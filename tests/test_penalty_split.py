"""psi_gap's inner Newton solve split by initial state (envs/penalty.py separable_groups): where the groups own
disjoint logit sets (the bandit: a context's actions), each (seed, group) is solved as its own small problem. Checked
against an incidence written out here, against the dense Newton on the whole seed and the L-BFGS reference
(penalty_minimiser at a 1e-10 gradient) on bandit instances and reward tables no setting was tuned on, block by block
against the dense gradient and Hessian, and bit for bit against itself whatever the other rows of the batch."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ratebench import envs
from ratebench.envs import bandit, exact, mdp, penalty, token

BANDITS = {
    "default": bandit.BanditConfig(),
    "n_actions-4": bandit.BanditConfig(n_actions=4),
    "beta-4": bandit.BanditConfig(beta=4.0),
    "reward_scale-3": bandit.BanditConfig(reward_scale=3.0, instance_seed=3),
    "neural-teacher": bandit.BanditConfig(teacher="neural", instance_seed=5),
    "skewed-contexts": bandit.BanditConfig(instance_seed=7),  # init_prob made non-uniform below
}
LAMS = [1.0, 3.0, 30.0, 1000.0]
PSI_REL = 1e-11  # |psi_split - psi_other| / |psi_other|; measured max 2.0e-12 vs the dense Newton (reward_scale-3,
#                  near, lam 1: both stop at a 1e-9 gradient on a flat direction) and 9.5e-13 vs the L-BFGS
PROB_TOL = 1e-7  # y* probabilities; measured max 1.2e-8 against either


def make(name: str):
    problem = envs.make(BANDITS[name])
    if name == "skewed-contexts":  # the bandit's contexts are uniform; rho_g must still weigh each group's row
        weights = torch.linspace(1.0, 3.0, problem.n_groups, dtype=torch.float64)
        problem = dataclasses.replace(problem, init_prob=weights / weights.sum(), derived={})
    return problem


def reward_tables(problem, kind: str, seed: int = 11, batch: int = 6):
    """Near the truth (true unit reward + N(0, 0.7^2)) or a bounded reward class (2 tanh(2 N(0, 1))) per unit."""
    noise = torch.randn(batch, problem.n_units, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    units = problem.true_unit_reward[None] + 0.7 * noise if kind == "near" else 2.0 * torch.tanh(2.0 * noise)
    return problem.step_tables_from_units(units)


def dense_newton(problem, rewards, lam, monkeypatch):
    """penalty_minimiser_newton on the whole seed (the path of coupled groups), on the same problem."""
    with monkeypatch.context() as patch:
        patch.setattr(penalty._design(problem), "groups", None)
        return penalty.penalty_minimiser_newton(problem, rewards, lam)


def test_bandit_groups_are_its_contexts_and_coupled_or_single_groups_are_not_split():
    """Written out from the bandit's layout: context x's trajectories read the A logits x A .. x A + A - 1 (each
    action of its one state), and no other; the mdp's initial states reach shared states, token has one group."""
    for name in BANDITS:
        problem = make(name)
        X, A = problem.n_groups, problem.n_actions
        assert torch.equal(penalty.separable_groups(problem), torch.arange(X * A).reshape(X, A))
    assert penalty.separable_groups(envs.make(mdp.MDPConfig())) is None
    assert penalty.separable_groups(envs.make(token.TokenConfig())) is None


@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("env,rows", [("bandit", "seed x group"), ("mdp", "seed"), ("token", "seed")])
def test_the_newton_rows_are_groups_on_the_bandit_and_seeds_elsewhere(env, rows, path, monkeypatch):
    """Split rows go to start_split_newton_rows (penalty_newton.c, or newton_rows with RATEBENCH_KERNELS=0), whole
    seeds to newton_rows."""
    if path == "torch":
        monkeypatch.setenv("RATEBENCH_KERNELS", "0")
    problem = envs.make({"bandit": bandit.BanditConfig(), "mdp": mdp.MDPConfig(), "token": token.TokenConfig()}[env])
    rewards = reward_tables(problem, "near", batch=3)
    shapes, newton_rows, split_rows = [], penalty.newton_rows, penalty.start_split_newton_rows
    monkeypatch.setattr(penalty, "newton_rows",
                        lambda inner, x0, *a, **k: shapes.append(("rows", x0.shape)) or newton_rows(inner, x0, *a, **k))
    monkeypatch.setattr(penalty, "start_split_newton_rows", lambda row_sets, *a, **k: shapes.extend(
        ("split", x0.shape) for _, x0 in row_sets) or split_rows(row_sets, *a, **k))
    paths = dict(penalty.SPLIT_NEWTON_PATHS)
    penalty.penalty_minimiser_newton(problem, rewards, 2.0)
    n = penalty._flatten(exact.soft_optimal(problem, rewards)[0]).shape[1]
    G = problem.n_groups
    if rows == "seed":
        assert shapes == [("rows", (3, n))]
    else:
        assert shapes == [("split", (3 * G, n // G))] + ([("rows", (3 * G, n // G))] if path == "torch" else [])
        assert penalty.SPLIT_NEWTON_PATHS[path] == paths[path] + 1


@pytest.mark.parametrize("name", ["default", "skewed-contexts"])
def test_group_rows_are_the_dense_objective_block_by_block(name):
    """At a random point: the rows' values sum to the seed's, and their gradients and Hessians are the dense ones'
    on each group's logits, whose other Hessian blocks are zero (what makes the split exact)."""
    problem = make(name)
    rewards = reward_tables(problem, "bounded", batch=3)
    groups = penalty.separable_groups(problem)
    G, k = groups.shape
    x = penalty._flatten(exact.soft_optimal(problem, rewards)[0])
    x = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    value, grad, hess = penalty._Inner(problem, rewards, 2.5).value_grad_hessian(x)
    rows = penalty._Inner(problem, rewards, 2.5, split=True).value_grad_hessian(x[:, groups].reshape(3 * G, k))
    row_value, row_grad, row_hess = (t.reshape(3, G, *t.shape[1:]) for t in rows)
    assert torch.allclose(row_value.sum(1), value, rtol=0, atol=1e-12)
    assert torch.allclose(row_grad, grad[:, groups], rtol=0, atol=1e-12)
    blocks = hess[:, groups[:, :, None], groups[:, None, :]]  # (3, G, k, k): group g's own block
    assert torch.allclose(row_hess, blocks, rtol=0, atol=1e-12)
    off = hess.clone()
    off[:, groups[:, :, None], groups[:, None, :]] = 0.0
    assert bool((off == 0).all()) and bool((blocks.abs() > 1e-6).any())


@pytest.mark.parametrize("kind", ["near", "bounded"])
@pytest.mark.parametrize("name", sorted(BANDITS))
def test_split_solve_equals_the_dense_newton_and_the_lbfgs(name, kind, monkeypatch):
    problem = make(name)
    rewards = reward_tables(problem, kind)
    for lam in LAMS:
        split = penalty.penalty_minimiser_newton(problem, rewards, lam)
        for other in (dense_newton(problem, rewards, lam, monkeypatch),
                      penalty.penalty_minimiser(problem, rewards, lam, tol=1e-10)):
            psi_split = penalty.penalised_objective(problem, rewards, split, lam)
            psi_other = penalty.penalised_objective(problem, rewards, other, lam)
            assert torch.allclose(psi_split, psi_other, rtol=PSI_REL, atol=0), (lam, psi_split - psi_other)
            for a, b in zip(split, other):
                assert torch.allclose(a.exp(), b.exp(), rtol=0, atol=PROB_TOL), lam


@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("lam", [0.3, 2.0])
def test_a_row_does_not_depend_on_the_other_rows_of_the_batch(lam, path, monkeypatch):
    """23 evaluation points of 8 seeds in one call, and in 23 calls of 8: equal bit for bit, y* and psi_lam. Points
    at rewards from near the truth to far from it (0.3 crosses indefinite Hessians on the far ones: their direction
    takes eigh in newton_rows, Jacobi rotations in penalty_newton.c)."""
    if path == "torch":
        monkeypatch.setenv("RATEBENCH_KERNELS", "0")
    paths = dict(penalty.SPLIT_NEWTON_PATHS)
    problem = envs.make(BANDITS["default"])
    gen = torch.Generator().manual_seed(4)
    scales = torch.logspace(-1.0, 0.5, 23, dtype=torch.float64).repeat_interleave(8)[:, None]
    units = problem.true_unit_reward[None] + scales * torch.randn(184, problem.n_units, generator=gen, dtype=torch.float64)
    rewards = problem.step_tables_from_units(units)
    indefinite, eigh = [], torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: indefinite.append(len(m)) or eigh(m))
    whole = penalty.penalty_minimiser_newton(problem, rewards, lam)
    # 10 iterations with some row indefinite when written; C takes their direction itself, never torch's eigh
    assert bool(indefinite) == (path == "torch" and lam == 0.3)
    points = [penalty.penalty_minimiser_newton(problem, [r[k:k + 8] for r in rewards], lam) for k in range(0, 184, 8)]
    for h, table in enumerate(whole):
        assert torch.equal(table, torch.cat([point[h] for point in points]))
    psi_points = [penalty.penalised_objective(problem, [r[k:k + 8] for r in rewards], point, lam)
                  for k, point in zip(range(0, 184, 8), points)]
    assert torch.equal(penalty.penalised_objective(problem, rewards, whole, lam), torch.cat(psi_points))
    assert penalty.SPLIT_NEWTON_PATHS[path] == paths[path] + 24
    assert (penalty.SPLIT_NEWTON_PATHS["indefinite"] > paths["indefinite"]) == (path == "c" and lam == 0.3)


def test_group_rows_are_computed_row_by_row_at_every_batch_size():
    """What lets converged rows leave the batch (newton_rows' compact): a row's value, gradient and Hessian are the
    same bits whatever the batch around it, down to one row (a product over the batch could take another kernel
    at odd or tiny sizes: the dense rows' (B, T) x (T, n) products do), and compacting leaves the solve's bits."""
    problem = envs.make(BANDITS["default"])
    rewards = reward_tables(problem, "bounded", batch=23)
    groups = penalty.separable_groups(problem)
    x = penalty._flatten(exact.soft_optimal(problem, rewards)[0])[:, groups].reshape(23 * len(groups), -1)
    x = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    inner = penalty._Inner(problem, rewards, 0.7, split=True)
    whole = inner.value_grad_hessian(x)
    for size in [1, 2, 3, 5, 7, 13, 61, len(x) - 1]:
        keep = torch.arange(len(x)) >= len(x) - size
        assert all(torch.equal(a[keep], b) for a, b in zip(whole, inner.rows(keep).value_grad_hessian(x[keep])))
    carried, compacted = (penalty.newton_rows(inner, x, compact=compact) for compact in (False, True))
    assert torch.equal(carried[0], compacted[0]) and torch.equal(carried[1], compacted[1])
