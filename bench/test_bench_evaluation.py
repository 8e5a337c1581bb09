"""psi_gap's inner solve: Newton's method (envs/penalty.py penalty_minimiser_newton, what evaluation runs) against the
L-BFGS reference it replaced (penalty_minimiser at METRIC_TOL), per evaluation point, on the reward tables that the
README main job (`ratebench run algorithm=bilevel`: bandit, 8 seeds) and a short mdp and token bilevel run score at
their evaluation points; arms interleaved round by round in one run, process CPU time.

Run serially:  OMP_NUM_THREADS=1 .venv/bin/pytest bench/test_bench_evaluation.py -p no:xdist --benchmark-enable -s -q
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import pytest
import torch
from conftest import interleaved, record_ratio
from ratebench.core.kernels import usable_cores
from ratebench.envs import exact, penalty
from ratebench.runner import run_job

JOBS = {
    "bandit-readme": ["algorithm=bilevel"],
    "mdp": ["algorithm=bilevel", "env=mdp", "budget.samples=5000"],
    "token": ["algorithm=bilevel", "env=token", "budget.samples=5000"],
}


def evaluation_points(compose_config, tmp_path, overrides, monkeypatch):
    """(problem, [(reward tables, grid lam)]) that psi_gap solved at each evaluation point of the job: the harness
    scores held points in one call, their rows point-major (Evaluator.evaluate_columns), cut here into the job's
    seeds."""
    seen, original = [], penalty.PsiReference.start_gap_and_minimiser

    def spy(self, rewards, lam, *args, **kwargs):
        seen.append((self.problem, [r.detach().clone() for r in rewards], lam))
        return original(self, rewards, lam, *args, **kwargs)

    monkeypatch.setattr(penalty.PsiReference, "start_gap_and_minimiser", spy)
    cfg = compose_config([*overrides, "progress=false"])
    run_job(cfg, tmp_path)
    monkeypatch.undo()
    B = len(cfg.seeds)
    return seen[0][0], [([r[k:k + B] for r in rewards], lam) for _, rewards, lam in seen
                        for k in range(0, rewards[0].shape[0], B)]


def one_call_per_lam(points):
    """The evaluation points' reward tables of one grid lam in one batch of rows (points x seeds), as
    Evaluator.evaluate_columns passes them: [(tables, lam)], one per lam."""
    by_lam = {}
    for rewards, lam in points:
        by_lam.setdefault(lam, []).append(rewards)
    return [([torch.cat(tables) for tables in zip(*group)], lam) for lam, group in by_lam.items()]


def cpu_times(solve, layouts: dict, kinds: tuple, rounds: int) -> dict:
    """{f"{layout}_{kind}": [process CPU seconds]} of solve(kind == kinds[1], work) for every layout's work, each arm
    run once untimed first (min psi_lam solved and cached), then interleaved rounds."""
    arms = {f"{layout}_{kind}": (kind == kinds[1], work) for layout, work in layouts.items() for kind in kinds}
    for flag, work in arms.values():
        solve(flag, work)
    times = {arm: [] for arm in arms}
    for arm, (flag, work) in interleaved(arms, rounds=rounds):
        tic = time.process_time()
        solve(flag, work)
        times[arm].append(time.process_time() - tic)
    return times


def record_layout_ratios(benchmark, name: str, times: dict, layouts: dict, kinds: tuple, points: list,
                         note: str) -> dict:
    """{layout: median CPU of kinds[0] / of kinds[1]} from cpu_times, each recorded as name[layout] with the points,
    the calls and the times, then `note`."""
    ratios = {}
    for layout, work in layouts.items():
        old, new = (statistics.median(times[f"{layout}_{kind}"]) for kind in kinds)
        ratios[layout] = record_ratio(
            benchmark, f"{name}[{layout}]", old / new,
            f"{len(points)} points x {points[0][0][0].shape[0]} seeds, {len(work)} call{'s' * (len(work) > 1)}: "
            f"{old * 1e3:.1f} -> {new * 1e3:.1f} ms CPU {note}")
    return ratios


@pytest.mark.parametrize("job", list(JOBS))
def test_newton_vs_lbfgs_per_evaluation_point(benchmark, compose_config, tmp_path, monkeypatch, job):
    problem, points = evaluation_points(compose_config, tmp_path, JOBS[job], monkeypatch)
    arms = {"lbfgs": lambda r, lam: penalty.penalty_minimiser(problem, r, lam, tol=penalty.METRIC_TOL),
            "newton": lambda r, lam: penalty.penalty_minimiser_newton(problem, r, lam)}
    times = {arm: [] for arm in arms}
    worst = 0.0
    for arm, solve in interleaved(arms, rounds=3):
        tic = time.process_time()
        solved = [solve(rewards, lam) for rewards, lam in points]
        times[arm].append((time.process_time() - tic) / len(points))
        if arm == "newton":
            reference = [arms["lbfgs"](rewards, lam) for rewards, lam in points[:5]]
            for (rewards, lam), a, b in zip(points, solved, reference):
                gap = penalty.penalised_objective(problem, rewards, a, lam) - penalty.penalised_objective(problem, rewards, b, lam)
                worst = max(worst, float(gap.abs().max()))
    benchmark.pedantic(lambda: None, rounds=1)
    old, new = statistics.median(times["lbfgs"]), statistics.median(times["newton"])
    record_ratio(benchmark, f"psi_solve_newton_vs_lbfgs[{job}]", old / new,
                 f"per evaluation point {old * 1e3:.1f} ms -> {new * 1e3:.1f} ms CPU ({len(points)} points, "
                 f"{points[0][0][0].shape[0]} seeds); |psi difference| <= {worst:.1e} on the first 5")
    assert worst <= 1e-5  # the L-BFGS's own error at METRIC_TOL (measured <= 2.6e-6); Newton solves to 1e-9
    assert old / new >= 1.5


def test_split_vs_dense_newton_on_the_readme_job(benchmark, compose_config, tmp_path, monkeypatch):
    """psi_gap (psi_gap_and_minimiser, min psi_lam cached) on the README main job's evaluation points by the Newton
    split by context (penalty.separable_groups: one row per (seed, context)) against the dense Newton on whole seeds,
    per evaluation point (8 rows) and every point of one lam in one call (rows = points x seeds, what a batched
    evaluation passes). Both in torch (RATEBENCH_KERNELS=0; the split rows' C Newton is the next benchmark's). Arms
    interleaved, process CPU time."""
    problem, points = evaluation_points(compose_config, tmp_path, JOBS["bandit-readme"], monkeypatch)
    monkeypatch.setenv("RATEBENCH_KERNELS", "0")
    batches = one_call_per_lam(points)
    design = penalty._design(problem)
    groups = design.groups
    assert groups is not None

    def solve(split: bool, work):
        design.groups = groups if split else None
        try:
            return [penalty.psi_gap_and_minimiser(problem, rewards, lam)[0] for rewards, lam in work]
        finally:
            design.groups = groups

    layouts = {"per_point": points, "one_call": batches}
    times = cpu_times(solve, layouts, ("dense", "split"), rounds=5)
    benchmark.pedantic(lambda: None, rounds=1)
    worst = max(float((a - b).abs().max()) for a, b in zip(solve(True, batches), solve(False, batches)))
    rows = sum(rewards[0].shape[0] for rewards, _ in batches)
    ratios = record_layout_ratios(benchmark, "psi_gap_split_vs_dense", times, layouts, ("dense", "split"), points,
                                  f"({rows} rows); |psi_gap difference| <= {worst:.1e}")
    assert worst <= 1e-11  # both solve to a 1e-9 gradient; psi_lam ~0.6 here
    assert ratios["one_call"] >= 3.0  # measured 7x when written; per point (8 rows) 1.25x, recorded only


def test_compiled_vs_torch_split_newton_on_the_readme_job(benchmark, compose_config, tmp_path, monkeypatch):
    """psi_gap (psi_gap_and_minimiser, min psi_lam cached) on the README main job's evaluation points, split by
    context, with the split rows' Newton in C (envs/penalty_newton.c, split_newton_rows) against the torch
    newton_rows (RATEBENCH_KERNELS=0), per evaluation point (8 rows of seeds) and every point of one lam in one call.
    Arms interleaved, process CPU time."""
    problem, points = evaluation_points(compose_config, tmp_path, JOBS["bandit-readme"], monkeypatch)
    batches = one_call_per_lam(points)
    assert penalty.separable_groups(problem) is not None and penalty.newton_library() is not None

    def solve(compiled: bool, work):
        with monkeypatch.context() as patch:
            if not compiled:
                patch.setenv("RATEBENCH_KERNELS", "0")
            return [penalty.psi_gap_and_minimiser(problem, rewards, lam)[0] for rewards, lam in work]

    layouts = {"per_point": points, "one_call": batches}
    times = cpu_times(solve, layouts, ("torch", "c"), rounds=7)
    benchmark.pedantic(lambda: None, rounds=1)
    before = dict(penalty.SPLIT_NEWTON_PATHS)
    compiled_gaps = solve(True, batches)
    indefinite = penalty.SPLIT_NEWTON_PATHS["indefinite"] - before["indefinite"]
    worst = max(float(((a - b) / b).abs().max()) for a, b in zip(compiled_gaps, solve(False, batches)))
    rows = sum(rewards[0].shape[0] for rewards, _ in batches) * problem.n_groups
    ratios = record_layout_ratios(benchmark, "psi_gap_compiled_vs_torch_split_newton", times, layouts, ("torch", "c"),
                                  points, f"({rows} Newton rows, {indefinite} through the eigenvalue direction); "
                                          f"|psi_gap difference| / |psi_gap| <= {worst:.1e}")
    assert worst <= 1e-9  # psi_lam within 1e-11 relative (tests/test_penalty_newton_c.py); psi_gap ~1e-2 of psi_lam
    assert ratios["one_call"] >= 2.0


def _busy_cores() -> tuple[float, float]:
    """(CPU seconds every process has used, wall seconds) since boot, from /proc/stat: their differences over a
    stretch of time say how many cores were busy."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    ticks, hz = [int(f) for f in fields], os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, time.clock_gettime(time.CLOCK_BOOTTIME)


def test_split_newton_threads_on_the_readme_job(benchmark, compose_config, tmp_path, monkeypatch):
    """The README main job's split Newton rows (every point of one lam in one call, as evaluation passes them) in C on
    one thread against every core this process may use (penalty.newton_threads' default), arms interleaved, wall time
    (the threads' CPU adds up): the same bits, and the wall-time ratio. The target (>= 1.3x on two cores) is for
    cores the bench has to itself: where other processes held 0.2 cores or more during the timed rounds (read from
    /proc/stat and this process's CPU time), the ratio is recorded with that load and not held to it."""
    problem, points = evaluation_points(compose_config, tmp_path, JOBS["bandit-readme"], monkeypatch)
    (rewards, lam), = one_call_per_lam(points)
    groups, lib = penalty.separable_groups(problem), penalty.newton_library()
    x0 = penalty._flatten(exact.soft_optimal(problem, rewards)[0])[:, groups].reshape(-1, groups.shape[1])
    inner = penalty._Inner(problem, rewards, lam, split=True)
    cores = usable_cores()  # penalty.newton_threads' default
    arms = {"one": 1, "all": cores}
    results = {arm: penalty.compiled_newton_rows(lib, inner, x0, threads=threads) for arm, threads in arms.items()}
    assert all(torch.equal(a, b) for a, b in zip(results["one"], results["all"]))
    times = {arm: [] for arm in arms}
    (all_cpu, wall), own = _busy_cores(), time.process_time()
    for arm, threads in interleaved(arms, rounds=41):
        tic = time.perf_counter()
        penalty.compiled_newton_rows(lib, inner, x0, threads=threads)
        times[arm].append(time.perf_counter() - tic)
    (all_cpu_end, wall_end), own_end = _busy_cores(), time.process_time()
    others = max(0.0, ((all_cpu_end - all_cpu) - (own_end - own)) / (wall_end - wall))  # cores others held
    benchmark.pedantic(lambda: None, rounds=1)
    one, every = statistics.median(times["one"]), statistics.median(times["all"])
    record_ratio(benchmark, "split_newton_threads_all_vs_one[readme]", one / every,
                 f"{len(x0)} rows in one call, 1 -> {penalty.newton_threads(len(x0))} threads ({cores} cores, other "
                 f"processes {others:.2f} cores): {one * 1e3:.2f} -> {every * 1e3:.2f} ms wall (median of 41 "
                 f"interleaved)")
    if cores >= 2 and others < 0.2:
        assert one / every >= 1.3  # two threads on two idle cores: measured 1.79x (4.13 -> 2.30 ms)
