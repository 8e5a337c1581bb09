"""The harness's malloc setting (ratebench.allocator): with it, a step-like churn of MB-sized tensors
reuses its pages; without it, the same churn faults in fresh ones. Each arm runs in its own process,
since mallopt is process-wide and cannot be undone."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
if sys.argv[1] == "retain":
    from ratebench.allocator import retain_freed_memory
    print(retain_freed_memory())
def churn():  # a step's pattern: MB-sized tensors, every other one kept a while, freed out of order
    keep = []
    for i in range(12):
        t = torch.empty((1 + i % 3) * 2**17, dtype=torch.float64).fill_(1.0)
        if i % 2:
            keep.append(t)
    del keep
for _ in range(5):
    churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    churn()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 40)
"""


def faults_per_churn(arm: str, env: dict | None = None) -> tuple[float, str]:
    out = subprocess.run([sys.executable, "-c", PROBE, arm], capture_output=True, text=True, check=True, env=env)
    lines = out.stdout.split("\n")
    return float(lines[-2]), lines[0]


GLIBC = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="a glibc setting")
PAGES_PER_ROUND = 24 * 2**17 * 8 // 4096  # the churn's 12 tensors: 24 MiB, 6,144 pages of 4 KiB


@GLIBC
def test_retained_memory_stops_the_page_faults_of_a_step_like_churn():
    """Reference arm: glibc with fixed small thresholds (every block over 128 KiB is a fresh mmap) refaults
    every page each round, which shows the probe sees faults. With the setting: 0-13 per round in 9 runs
    on the project VM (a one-off heap growth spread over the rounds); glibc's adaptive defaults, which the
    setting replaces, gave 90-1,500 there."""
    fresh, _ = faults_per_churn("plain", {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
                                          "MALLOC_TRIM_THRESHOLD_": "131072"})
    retained, said = faults_per_churn("retain")
    assert said.startswith("glibc: mmap threshold 32 MiB")
    assert fresh >= 0.9 * PAGES_PER_ROUND, f"the probe no longer sees the faults it guards against ({fresh})"
    assert retained <= 50, f"{retained} page faults per round with the setting (of {PAGES_PER_ROUND} pages touched)"


@GLIBC
@pytest.mark.parametrize("setting", [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"MALLOC_MMAP_THRESHOLD_": "131072"},
                                     {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=131072:glibc.malloc.trim_threshold=131072"}],
                         ids=lambda s: next(iter(s)))
def test_the_users_own_malloc_setting_wins(setting):
    """With the user's own threshold in the environment the harness leaves malloc alone. Through
    GLIBC_TUNABLES both thresholds are fixed small, so the churn's pages are fresh every round."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    faults, said = faults_per_churn("retain", {**env, **setting})
    assert said.startswith("malloc thresholds set in the environment")
    if "GLIBC_TUNABLES" in setting:
        assert faults >= 0.9 * PAGES_PER_ROUND, faults
