"""What the jobs' malloc setting (ratebench.allocator) buys: one bilevel step with and without it.

mallopt is process-wide and cannot be undone, so each arm is its own process (this file's ARM script, which
imports only ratebench, not the benchmarks' conftest that sets it). Arms alternate round by round so both see
the same machine; each reports process CPU time per step and minor page faults per step.

    OMP_NUM_THREADS=1 .venv/bin/pytest bench/test_bench_allocator.py -p no:xdist --benchmark-enable -s -q
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys

import pytest
from conftest import record_ratio

ARM = """
import resource, sys, time
import torch
torch.set_num_threads(1)
if sys.argv[1] == "retained":
    from ratebench.allocator import retain_freed_memory
    retain_freed_memory()
from ratebench import envs
from ratebench.algorithms import ALGORITHMS
from ratebench.config import compose, validate
from ratebench.envs.sampling import Counters, CountingSampler
v = validate(compose(sys.argv[3:]))
problem = envs.make(v.env)
algo = ALGORITHMS[v.algorithm.name](v.algorithm, v.model, problem)
algo.impl = sys.argv[2]
sampler = CountingSampler(problem, v.seeds, Counters())
state = algo.init(v.seeds)
for _ in range(10):
    state = algo.step(state, sampler)
faults, tic = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.process_time()
for _ in range(60):
    state = algo.step(state, sampler)
print((time.process_time() - tic) / 60 * 1e3, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 60)
"""
CONFIGS = {"bilevel-256-default": ["algorithm=bilevel", "n_seeds=256"],
           "bilevel-256-N=M=2": ["algorithm=bilevel", "n_seeds=256", "algorithm.batch_traj=2", "algorithm.batch_pairs=2"]}


def one_arm(arm: str, impl: str, overrides: list[str]) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", ARM, arm, impl, *overrides], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ms, faults = out.stdout.split()
    return float(ms), float(faults)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_retained_memory_vs_glibc_defaults(benchmark, config):
    from ratebench.allocator import thresholds_set_in_environment

    if thresholds_set_in_environment():
        pytest.skip("a malloc setting in the environment would apply to both arms")
    runs = {(arm, impl): [] for arm in ("defaults", "retained") for impl in ("reference", "fast")}
    for _ in range(3):
        for arm, impl in runs:
            runs[arm, impl].append(one_arm(arm, impl, CONFIGS[config]))
    ms = {key: statistics.median(r[0] for r in rows) for key, rows in runs.items()}
    faults = {key: statistics.median(r[1] for r in rows) for key, rows in runs.items()}
    for impl in ("reference", "fast"):
        record_ratio(benchmark, f"allocator_speedup[{config}-{impl}]", ms["defaults", impl] / ms["retained", impl],
                     f"{impl} step: glibc defaults {ms['defaults', impl]:.2f} ms ({faults['defaults', impl]:.0f} page "
                     f"faults/step), retained {ms['retained', impl]:.2f} ms ({faults['retained', impl]:.0f})")
    record_ratio(benchmark, f"fast_speedup_without_the_setting[{config}]", ms["defaults", "reference"] / ms["defaults", "fast"],
                 "fast / reference steps/s with glibc's defaults; with the setting: "
                 f"{ms['retained', 'reference'] / ms['retained', 'fast']:.2f}x")
    benchmark.pedantic(lambda: None, rounds=1)  # the timing is the subprocesses' own
    # what the setting is for: the faults go (ratios of time are left to the table: this machine is noisy)
    assert faults["retained", "reference"] <= 0.05 * max(faults["defaults", "reference"], 1.0) + 50
    assert faults["retained", "fast"] <= 0.05 * max(faults["defaults", "fast"], 1.0) + 50
