"""psi_gap's split Newton in C (envs/penalty_newton.c, penalty.split_newton_rows) against the torch newton_rows it
follows, on bandit instances, reward tables and lams no part of it was tuned on: the same converged flags, y* and
psi_lam up to rounding, rows handed back (an indefinite H + same) bit for bit the torch path's; the torch path when
kernels are off or there is no compiler. A row's independence of the other rows of the call is in
tests/test_penalty_split.py (both paths)."""
from __future__ import annotations

import pytest
import torch

from ratebench.core import kernels
from ratebench.envs import exact, penalty
from test_penalty_split import make, reward_tables

NAMES = ["default", "n_actions-4", "beta-4", "reward_scale-3"]
LAMS = [1.0, 3.0, 30.0, 1000.0, 0.3]  # 0.3: indefinite Hessians on the way, rows handed back
PSI_REL = 1e-11  # |psi_C - psi_torch| / |psi_torch| per seed; measured max 6.4e-13 (reward_scale-3, near, lam 1000)
PROB_TOL = 1e-7  # y* probabilities; measured max 2.7e-15


def split_rows(problem, rewards, lam):
    """The rows penalty_minimiser_newton passes to split_newton_rows: (inner, x0 (B G, n/G)) from z*."""
    groups = penalty.separable_groups(problem)
    x0 = penalty._flatten(exact.soft_optimal(problem, rewards)[0])[:, groups].reshape(-1, groups.shape[1])
    return penalty._Inner(problem, rewards, lam, split=True), x0


def test_the_library_builds_here():
    """The comparisons below are only worth something if C is what ran: on this machine it builds."""
    assert penalty.newton_library() is not None


@pytest.mark.parametrize("kind", ["near", "bounded"])
@pytest.mark.parametrize("name", NAMES)
def test_compiled_rows_equal_newton_rows(name, kind):
    problem = make(name)
    rewards = reward_tables(problem, kind)
    lib, solved_by_c, rows = penalty.newton_library(), 0, 0
    for lam in LAMS:
        inner, x0 = split_rows(problem, rewards, lam)
        x_torch, converged_torch = penalty.newton_rows(inner, x0, compact=True)
        x_c, status = penalty.compiled_newton_rows(lib, inner, x0)
        generic = penalty.compiled_newton_rows(lib, inner, x0, unrolled=False)  # k = m = 4, 6 here: unrolled copies
        assert torch.equal(generic[0], x_c) and torch.equal(generic[1], status)
        solved = status != penalty.HANDED_BACK
        solved_by_c += int(solved.sum())
        assert torch.equal(status[solved] == 1, converged_torch[solved]), lam
        assert torch.allclose(torch.softmax(x_c[solved], -1), torch.softmax(x_torch[solved], -1), rtol=0, atol=PROB_TOL)
        # what C calls converged is so in torch's own arithmetic: a gradient at the tolerance (up to rounding), or at
        # METRIC_TOL on the rows where no step decreases f, as many as torch stops so
        if bool(solved.any()):
            part = inner.rows(solved)
            grad_c, grad_torch = (part.value_grad_hessian(x[solved])[1].abs().amax(-1) for x in (x_c, x_torch))
            assert bool((grad_c[status[solved] == 1] <= penalty.METRIC_TOL).all()), lam
            assert int((grad_c > 2 * penalty.NEWTON_TOL).sum()) == int((grad_torch > 2 * penalty.NEWTON_TOL).sum())
        x, converged = penalty.split_newton_rows(inner, x0)  # handed-back rows: newton_rows from x0, its bits
        back = ~solved
        assert torch.equal(x[back], x_torch[back]) and torch.equal(converged, converged_torch), lam
        assert torch.equal(x[solved], x_c[solved])
        rows += len(x0)
    assert solved_by_c >= rows // 2  # C solved most rows itself (all 48 at lam 0.3 on reward_scale-3 near go back)


@pytest.mark.parametrize("kind", ["near", "bounded"])
@pytest.mark.parametrize("name", NAMES)
def test_psi_by_the_compiled_newton_equals_the_torch_path(name, kind, monkeypatch):
    """penalty_minimiser_newton with kernels (C) and with RATEBENCH_KERNELS=0 (torch): psi_lam per seed and y*."""
    problem = make(name)
    rewards = reward_tables(problem, kind)
    for lam in LAMS:
        before = dict(penalty.SPLIT_NEWTON_PATHS)
        y_c = penalty.penalty_minimiser_newton(problem, rewards, lam)
        assert penalty.SPLIT_NEWTON_PATHS["c"] == before["c"] + 1 and penalty.SPLIT_NEWTON_PATHS["torch"] == before["torch"]
        with monkeypatch.context() as patch:
            patch.setenv(kernels.DISABLE, "0")
            y_torch = penalty.penalty_minimiser_newton(problem, rewards, lam)
        assert penalty.SPLIT_NEWTON_PATHS["torch"] == before["torch"] + 1
        psi_c, psi_torch = (penalty.penalised_objective(problem, rewards, y, lam) for y in (y_c, y_torch))
        assert torch.allclose(psi_c, psi_torch, rtol=PSI_REL, atol=0), (lam, psi_c - psi_torch)
        for a, b in zip(y_c, y_torch):
            assert torch.allclose(a.exp(), b.exp(), rtol=0, atol=PROB_TOL), lam


def test_kernels_off_or_no_compiler_take_newton_rows_bit_for_bit(monkeypatch, tmp_path):
    problem = make("default")
    rewards = reward_tables(problem, "bounded")
    inner, x0 = split_rows(problem, rewards, 0.3)
    reference = penalty.newton_rows(inner, x0, compact=True)
    monkeypatch.setenv(kernels.DISABLE, "0")
    assert penalty.newton_library() is None
    assert all(torch.equal(a, b) for a, b in zip(penalty.split_newton_rows(inner, x0), reference))
    monkeypatch.delenv(kernels.DISABLE)
    monkeypatch.setenv("RATEBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that fails every build: one warning, then the torch path
    monkeypatch.setattr(penalty, "load", kernels.load.__wrapped__)
    with pytest.warns(UserWarning, match="could not build penalty_newton.c"):
        assert penalty.newton_library() is None
    before = penalty.SPLIT_NEWTON_PATHS["torch"]
    with pytest.warns(UserWarning, match="could not build penalty_newton.c"):
        x, converged = penalty.split_newton_rows(inner, x0)
    assert penalty.SPLIT_NEWTON_PATHS["torch"] == before + 1
    assert torch.equal(x, reference[0]) and torch.equal(converged, reference[1])


def test_run_json_names_the_solve_that_ran(compose_config, tmp_path, monkeypatch):
    """provenance.psi_newton_path: compiled on the bandit, torch with kernels off and on the mdp (its groups share
    states: the whole-seed solve), so a reader can tell why two runs' psi_gap differ in the 13th digit."""
    import json

    from ratebench.runner import run_job

    def path_of(overrides, folder):
        run_job(compose_config(["algorithm=bilevel", "budget.samples=2000", "n_seeds=2", *overrides]), tmp_path / folder)
        return json.loads((tmp_path / folder / "run.json").read_text())["provenance"]["psi_newton_path"]

    assert path_of([], "bandit") == "compiled"
    monkeypatch.setenv(kernels.DISABLE, "0")
    assert path_of([], "off") == "torch"
    monkeypatch.delenv(kernels.DISABLE)
    from ratebench import envs
    from ratebench.config import validate

    mdp = envs.make(validate(compose_config(["algorithm=bilevel", "env=mdp"])).env)
    assert penalty.newton_applies(mdp) and penalty.newton_path(mdp) == "torch"
