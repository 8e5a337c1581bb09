"""Benchmark: `ratebench fit` on 1,000 synthetic runs × 50 evaluation points with 2,000 bootstrap
replicates must finish in < 30 s (issue #5), measured next to a fixed numpy reference workload."""
from __future__ import annotations

import time

import numpy as np
import pytest
from ratebench.analysis import commands
from ratebench.analysis.synthetic import synthetic_values
from ratebench.synthetic_runs import write_run

N_RUNS, SEEDS_PER_RUN, N_POINTS, N_CONFIGS = 1000, 4, 50, 50
LIMIT_S = 30.0


@pytest.fixture(scope="module")
def thousand_runs(tmp_path_factory):
    """1,000 run folders: 50 configurations (decay exponents b from 0.25 to 1.5) × 20 runs of 4 seeds."""
    root = tmp_path_factory.mktemp("bench-runs")
    rng = np.random.default_rng(0)
    x = np.concatenate([[0.0], np.unique(np.round(np.logspace(0.9, 5, N_POINTS - 1)))])
    x = np.concatenate([x, np.arange(N_POINTS - len(x)) + 1e5 + 1])[:N_POINTS]  # exactly 50 points
    for r in range(N_RUNS):
        cfg = r % N_CONFIGS
        b = 0.25 + 1.25 * cfg / (N_CONFIGS - 1)
        seeds = list(range((r // N_CONFIGS) * SEEDS_PER_RUN, (r // N_CONFIGS + 1) * SEEDS_PER_RUN))
        write_run(root / f"run{r:04d}", x, synthetic_values(x, b, SEEDS_PER_RUN, rng), seeds, metric="gap",
                  algorithm="synthetic", env="synthetic", config={"algorithm": {"name": "synthetic", "b": b},
                                                                   "env": {"name": "synthetic"}})
    return root


def reference_workload() -> float:
    """A fixed numpy workload (sorting and matrix products), seconds: the machine's speed today."""
    rng = np.random.default_rng(1)
    tic = time.perf_counter()
    a = rng.standard_normal((2000, 4000))
    np.sort(a, axis=1)
    a[:500] @ a.T
    return time.perf_counter() - tic


def test_fit_thousand_runs_under_30s(benchmark, thousand_runs, capsys):
    ref = reference_workload()
    tic = time.perf_counter()
    # one round: the workload itself is the measurement
    code = benchmark.pedantic(commands.main, args=("fit", [str(thousand_runs), "--json", "--n-boot", "2000"]),
                              rounds=1, iterations=1)
    elapsed = time.perf_counter() - tic
    out = capsys.readouterr().out
    assert code == 0
    import json

    rows = json.loads(out)
    assert len(rows) == N_CONFIGS and sum(r["n_seeds"] for r in rows) == N_RUNS * SEEDS_PER_RUN
    print(f"\nfit on {N_RUNS} runs x {N_POINTS} points, 2000 replicates: {elapsed:.1f} s "
          f"(reference workload {ref:.2f} s, ratio {elapsed / ref:.1f})")
    try:
        from conftest import record_ratio  # bench/conftest.py: the end-of-session ratio table
    except ImportError:
        record_ratio = None
    if record_ratio is not None:
        record_ratio(benchmark, "fit_1000_runs_over_numpy_reference", elapsed / ref,
                     f"fit {elapsed:.1f} s on 1000 runs x 50 points x 2000 replicates; target < 100 and < {LIMIT_S} s")
    assert elapsed < LIMIT_S, f"fit took {elapsed:.1f} s, limit {LIMIT_S} s"
    assert elapsed / ref < 100, f"fit is {elapsed / ref:.0f}x the reference workload"
