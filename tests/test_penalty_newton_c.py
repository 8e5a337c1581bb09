"""psi_gap's split Newton in C (envs/penalty_newton.c, penalty.split_newton_rows) against the torch newton_rows it
follows, on bandit instances, reward tables and lams no part of it was tuned on: the same converged flags, y* and
psi_lam up to rounding, including the rows whose H + same is indefinite on the way (C's eigenvalue direction by
Jacobi rotations, torch's by LAPACK's eigh), which C's eigen-solver is also held to alone; the torch path when kernels
are off or there is no compiler. A row's independence of the other rows of the call and of the thread count is in
tests/test_penalty_split.py (both paths) and below."""
from __future__ import annotations

import ctypes
import math

import pytest
import torch

from ratebench.core import kernels
from ratebench.envs import exact, penalty
from test_penalty_split import make, reward_tables

NAMES = ["default", "n_actions-4", "beta-4", "reward_scale-3"]
LAMS = [1.0, 3.0, 30.0, 1000.0, 0.3]  # 0.3: indefinite Hessians on the way (the eigenvalue direction)
PSI_REL = 1e-11  # |psi_C - psi_torch| / |psi_torch| per seed; measured max 6.4e-13 (reward_scale-3, near, lam 1000)
PROB_TOL = 1e-7  # y* probabilities; measured max 2.7e-15
# A row that took the eigenvalue direction: both paths stop at a gradient sup-norm <= NEWTON_TOL = 1e-9 in the same
# basin, so their values differ by O(tol^2 / curvature) plus rounding (~1e-16 |value|), their logits by
# O(tol / curvature): 1e-10 on the row's value (|value| ~ 1) leaves room for a flat direction (curvature ~1e-8).
ROW_VALUE_TOL = 1e-10  # measured max 3.3e-16 (and 1.9e-14 on the rows' probabilities)


def split_rows(problem, rewards, lam):
    """The rows penalty_minimiser_newton passes to split_newton_rows: (inner, x0 (B G, n/G)) from z*."""
    groups = penalty.separable_groups(problem)
    x0 = penalty._flatten(exact.soft_optimal(problem, rewards)[0])[:, groups].reshape(-1, groups.shape[1])
    return penalty._Inner(problem, rewards, lam, split=True), x0


def test_the_library_builds_here():
    """The comparisons below are only worth something if C is what ran: on this machine it builds."""
    assert penalty.newton_library() is not None


def torch_indefinite_rows(inner, x0):
    """The rows on which torch's newton_rows took the eigenvalue direction at some iteration (Cholesky of H + same
    failed), read from cholesky_ex's info on the uncompacted batch, whose rows keep their places (the same bits as
    compact=True: tests/test_penalty_split.py)."""
    seen, cholesky_ex = torch.zeros(len(x0), dtype=torch.bool), torch.linalg.cholesky_ex

    def spy(M):
        chol, info = cholesky_ex(M)
        seen.logical_or_(info != 0)
        return chol, info

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.linalg, "cholesky_ex", spy)
        penalty.newton_rows(inner, x0)
    return seen


@pytest.mark.parametrize("kind", ["near", "bounded"])
@pytest.mark.parametrize("name", NAMES)
def test_compiled_rows_equal_newton_rows(name, kind):
    problem = make(name)
    rewards = reward_tables(problem, kind)
    lib, indefinite_rows = penalty.newton_library(), 0
    for lam in LAMS:
        inner, x0 = split_rows(problem, rewards, lam)
        x_torch, converged_torch = penalty.newton_rows(inner, x0, compact=True)
        x_c, status = penalty.compiled_newton_rows(lib, inner, x0)
        generic = penalty.compiled_newton_rows(lib, inner, x0, unrolled=False)  # k = m = 4, 6 here: unrolled copies
        assert torch.equal(generic[0], x_c) and torch.equal(generic[1], status)
        converged_c, indefinite = (status & 1) == 1, (status & penalty.INDEFINITE) != 0
        assert torch.equal(converged_c, converged_torch), lam
        assert torch.equal(indefinite, torch_indefinite_rows(inner, x0)), lam  # the same rows took that direction
        indefinite_rows += int(indefinite.sum())
        assert torch.allclose(torch.softmax(x_c, -1), torch.softmax(x_torch, -1), rtol=0, atol=PROB_TOL)
        # what C calls converged is so in torch's own arithmetic: a gradient at the tolerance (up to rounding), or at
        # METRIC_TOL on the rows where no step decreases f, as many as torch stops so
        grad_c, grad_torch = (inner.value_grad_hessian(x)[1].abs().amax(-1) for x in (x_c, x_torch))
        assert bool((grad_c[converged_c] <= penalty.METRIC_TOL).all()), lam
        assert int((grad_c > 2 * penalty.NEWTON_TOL).sum()) == int((grad_torch > 2 * penalty.NEWTON_TOL).sum())
        if bool(indefinite.any()):  # the same minimiser, by the other eigen-solver
            part = inner.rows(indefinite)
            assert bool((grad_c[indefinite] <= 2 * penalty.NEWTON_TOL).all()), lam
            value_c, value_torch = part.value(x_c[indefinite]), part.value(x_torch[indefinite])
            assert torch.allclose(value_c, value_torch, rtol=0, atol=ROW_VALUE_TOL), (lam, value_c - value_torch)
        x, converged = penalty.split_newton_rows(inner, x0)  # every row by C
        assert torch.equal(x, x_c) and torch.equal(converged, converged_c)
    if name == "reward_scale-3" and kind == "near":  # 0.3 sends rows through the eigenvalue direction here
        assert indefinite_rows > 0


def test_the_rows_give_the_same_bits_on_any_number_of_threads():
    """A few hundred rows (8 seeds x 8 contexts of two reward classes at lam 0.3, some through the eigenvalue
    direction) split across 1, 2, 3 and 7 threads (blocks of 384, 192, 128 and 54-55 rows: the edges fall in
    different places): x and status equal bit for bit, and equal to each row solved alone."""
    problem, lib = make("default"), penalty.newton_library()
    parts = [split_rows(problem, reward_tables(problem, kind, seed=5, batch=24), 0.3) for kind in ("near", "bounded")]
    x0 = torch.cat([x for _, x in parts])
    inner = parts[0][0]
    for name in ("Lsym", "Lrho", "lin", "rho", "log_trans"):
        setattr(inner, name, torch.cat([getattr(part, name) for part, _ in parts]))
    assert len(x0) == 384 and [penalty.newton_threads(len(x0), t) for t in (1, 2, 3, 7)] == [1, 2, 3, 7]
    x, status = penalty.compiled_newton_rows(lib, inner, x0, threads=1)
    assert 0 < int(((status & penalty.INDEFINITE) != 0).sum()) < len(x0)
    for threads in (2, 3, 7):
        other = penalty.compiled_newton_rows(lib, inner, x0, threads=threads)
        assert torch.equal(other[0], x) and torch.equal(other[1], status), threads
    for row in range(0, 384, 37):
        alone = penalty.compiled_newton_rows(lib, inner.rows(torch.arange(384) == row), x0[row:row + 1])
        assert torch.equal(alone[0][0], x[row]) and int(alone[1][0]) == int(status[row])


def test_the_thread_count():
    """Every core this process may use by default (0 too, as the harness's step_threads), never more threads than one
    per NEWTON_ROWS_PER_THREAD rows, at least one."""
    import os

    cores = len(os.sched_getaffinity(0))
    per = penalty.NEWTON_ROWS_PER_THREAD
    assert penalty.newton_threads(1000 * per) == cores == penalty.newton_threads(1000 * per, 0)
    assert penalty.newton_threads(2 * per - 1, 8) == 1 and penalty.newton_threads(2 * per, 8) == 2
    assert penalty.newton_threads(0, 8) == 1 and penalty.newton_threads(1000 * per, 5) == 5


def eigen_symmetric(lib, a):
    """penalty_newton.c's Jacobi eigen-solver on a (n, k, k): (eigenvalues (n, k) ascending, eigenvectors (n, k, k)
    as columns, in that order)."""
    a = a.clone().contiguous()
    n, k, _ = a.shape
    V, ev = torch.empty_like(a), torch.empty(n, k, dtype=torch.float64)
    ptr = [ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_double)) for t in (a, V, ev)]
    lib.eigen_symmetric(n, k, *ptr)
    order = ev.argsort(-1)
    return ev.gather(-1, order), V.gather(-1, order[:, None, :].expand(n, k, k))


def symmetric_cases(k: int, gen) -> torch.Tensor:
    """Random symmetric matrices (n, k, k): Gaussian (indefinite), positive definite, indefinite of rank <= k / 2
    with 1e-14 noise (near-singular), spectra over 12 decades of both signs, repeated eigenvalues, diagonal, zero."""
    def orthogonal(n):
        return torch.linalg.qr(torch.randn(n, k, k, generator=gen, dtype=torch.float64))[0]

    def with_spectrum(ev):
        Q = orthogonal(len(ev))
        return Q @ torch.diag_embed(ev) @ Q.transpose(-1, -2)

    G = torch.randn(40, k, k, generator=gen, dtype=torch.float64)
    gauss = G + G.transpose(-1, -2)
    definite = G @ G.transpose(-1, -2) + 1e-3 * torch.eye(k, dtype=torch.float64)
    low = torch.randn(20, k, max(k // 2, 1), generator=gen, dtype=torch.float64)
    noise = torch.randn(20, k, k, generator=gen, dtype=torch.float64)
    near_singular = low @ low.transpose(-1, -2) - 1.5 * (low[:, :, :1] @ low[:, :, :1].transpose(-1, -2)) \
        + 1e-14 * (noise + noise.transpose(-1, -2))
    signs = torch.where(torch.rand(20, k, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    decades = with_spectrum(signs * 10.0 ** (12 * torch.rand(20, k, generator=gen, dtype=torch.float64) - 6))
    repeated = with_spectrum(torch.tensor([1.0, 1.0, -2.0, -2.0, 0.0, 3.0, 3.0, 3.0] * 2, dtype=torch.float64)[:k]
                             .expand(10, k))
    diagonal = torch.diag_embed(torch.randn(5, k, generator=gen, dtype=torch.float64))
    zero = torch.zeros(1, k, k, dtype=torch.float64)
    return torch.cat([gauss, definite, near_singular, decades, repeated, diagonal, zero])


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8, 13])
def test_the_jacobi_eigen_solver_against_eigh(k):
    """penalty_newton.c's eigen-solver alone against torch.linalg.eigh (LAPACK): eigenvalues within 10 k eps ||A||
    (both are backward stable, exact for a matrix within ~k eps ||A||; measured <= 2.2 k eps ||A||), eigenvectors
    orthonormal and reconstructing A to the same order, each eigenvector equal to eigh's up to sign where its
    eigenvalue is separated from the others by 1e-6 ||A|| (the angle error is ~eps ||A|| / gap), and the
    modified-eigenvalue direction of _newton_direction, a function of A and g alone whatever the basis of a repeated
    eigenvalue: equal within 1e-7 of its sup-norm (1 / max(|ev|, 1e-8 ||A||) moves by up to ~eps ||A|| / (1e-8
    ||A||)^2 where an eigenvalue is near that floor, ~2e-8 relative; measured 8.3e-9, on the 12-decade spectra), and
    within 1e-10 where every |eigenvalue| >= 1e-4 ||A|| (measured 1.8e-12)."""
    lib, gen, eps = penalty.newton_library(), torch.Generator().manual_seed(29), torch.finfo(torch.float64).eps
    A = symmetric_cases(k, gen)
    ev, V = eigen_symmetric(lib, A)
    ev_ref, V_ref = torch.linalg.eigh(A)
    norm = torch.linalg.matrix_norm(A, 2).clamp_min(1e-300)[:, None]
    assert bool(((ev - ev_ref).abs() <= 10 * k * eps * norm).all())
    eye = torch.eye(k, dtype=torch.float64)
    assert bool(((V.transpose(-1, -2) @ V - eye).abs() <= 10 * k * eps).all())
    rebuilt = V @ torch.diag_embed(ev) @ V.transpose(-1, -2)
    assert bool(((rebuilt - A).abs() <= 10 * k * eps * norm[..., None]).all())
    gaps = (ev_ref[:, :, None] - ev_ref[:, None, :]).abs() + torch.eye(k) * float("inf")
    separated = gaps.amin(-1) > 1e-6 * norm
    cos = (V * V_ref).sum(-2).abs()  # |<v_i, v_ref_i>|
    assert bool(((cos - 1).abs()[separated] <= 1e-8).all())

    def direction(ev, V, g):
        inv = 1.0 / ev.abs().clamp_min(1e-8 * ev.abs().amax(-1, keepdim=True).clamp_min(1.0))
        return -(V @ (inv[..., None] * (V.transpose(-1, -2) @ g[..., None])))[..., 0]

    g = torch.randn(len(A), k, generator=gen, dtype=torch.float64)
    ours, theirs = direction(ev, V, g), direction(ev_ref, V_ref, g)
    error = (ours - theirs).abs().amax(-1) / theirs.abs().amax(-1).clamp_min(1e-300)
    assert bool((error <= 1e-7).all())
    assert bool((error[ev_ref.abs().amin(-1) >= 1e-4 * norm[:, 0]] <= 1e-10).all())


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


def test_the_solve_on_its_own_thread_gives_the_same_bits_and_its_errors(monkeypatch):
    """start_penalty_minimiser_newton(background=True) (the C call on a Python thread while the caller goes on, as
    the evaluation runs it) against penalty_minimiser_newton: y* bit for bit, with pi*_nu passed as the start or
    solved inside; the C call ran on another thread; an error there reaches the caller when it asks for the result."""
    import threading

    problem, lib = make("default"), penalty.newton_library()
    rewards = reward_tables(problem, "near", seed=3, batch=16)
    start = exact.soft_optimal(problem, rewards)[0]
    ran_on = []
    real = lib.split_newton
    monkeypatch.setattr(lib, "split_newton", lambda q: ran_on.append(threading.current_thread()) or real(q))
    for lam in (0.3, 3.0):
        alone = penalty.penalty_minimiser_newton(problem, rewards, lam, threads=2)
        for given in (None, start):
            ran_on.clear()
            finish = penalty.start_penalty_minimiser_newton(problem, rewards, lam, threads=1, start=given,
                                                            background=True)
            y = finish()
            assert ran_on and ran_on[0] is not threading.main_thread()
            assert all(torch.equal(a, b) for a, b in zip(y, alone)), lam
    monkeypatch.setattr(lib, "split_newton", lambda q: 1)  # the C's "could not allocate its scratch"
    finish = penalty.start_penalty_minimiser_newton(problem, rewards, 3.0, background=True)
    with pytest.raises(RuntimeError, match="could not allocate"):
        finish()


def test_a_thread_that_helps_a_running_solve_gives_the_same_bits():
    """The evaluation's thread joins the solve's own (help_split_newton: rows from the same counter): helped before the
    solve starts it solves every row itself (the solve then finds none left), helped while it runs the two share the
    rows; x and the statuses are those of the solve alone, bit for bit, every row converged."""
    import threading

    problem, lib = make("default"), penalty.newton_library()
    inner, x0 = split_rows(problem, reward_tables(problem, "near", seed=4, batch=64), 3.0)
    alone = penalty.compiled_newton_rows(lib, inner, x0, threads=1)
    assert bool(((alone[1] & 1) == 1).all())
    solve, x, status = penalty.prepare_compiled_newton_rows(lib, inner, x0, threads=1)
    solve.help()  # every row, on this thread
    assert torch.equal(x, alone[0]) and torch.equal(status, alone[1])
    x.fill_(math.nan)
    solve()  # nothing left to take: x stays as it is
    assert bool(x.isnan().all())
    for _ in range(5):
        solve, x, status = penalty.prepare_compiled_newton_rows(lib, inner, x0, threads=1)
        other = threading.Thread(target=solve)
        other.start()
        solve.help()
        other.join()
        assert torch.equal(x, alone[0]) and torch.equal(status, alone[1])


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


def test_evaluation_takes_the_runs_step_threads_and_the_same_bits(compose_config, tmp_path, monkeypatch):
    """A job's psi_gap Newton takes the run's step_threads: with 1 it solves on the evaluation's own thread, one C
    thread; with n > 1 on a thread of its own with n - 1 C threads (the evaluation's torch work has the other core)
    (the argument each compiled call passed to newton_threads, and the thread that made the C call); a call of many
    rows runs on that many, and the jobs' metrics are equal in every column but the clock's."""
    import threading

    import pandas as pd
    from ratebench.runner import run_job

    asked, ran_on = [], []
    real, lib = penalty.newton_threads, penalty.newton_library()
    call = lib.split_newton
    monkeypatch.setattr(penalty, "newton_threads", lambda rows, threads=None: asked.append((rows, threads)) or
                        real(rows, threads))
    monkeypatch.setattr(lib, "split_newton", lambda q: ran_on.append(threading.current_thread()) or call(q))
    frames = {}
    for n in (1, 2, 3):
        asked.clear(), ran_on.clear()
        run_job(compose_config(["algorithm=bilevel", "budget.samples=3000", "n_seeds=12", f"step_threads={n}"]),
                tmp_path / str(n))
        newton = max(1, n - 1)
        assert asked and {threads for _, threads in asked} == {newton}, asked
        assert ran_on and {t is threading.main_thread() for t in ran_on} == {n == 1}
        assert max(real(rows, threads) for rows, threads in asked) == newton  # 12 seeds x 8 contexts x the points
        frames[n] = pd.read_parquet(tmp_path / str(n) / "metrics.parquet").drop(columns="wall_s")
    assert frames[1].equals(frames[2]) and frames[1].equals(frames[3])
