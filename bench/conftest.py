"""Shared set-up of the benchmarks: one torch thread, a private F-hat* cache, no progress lines,
config composition, and a table of every ratio printed at the end of the session.

Both implementations run under the malloc setting of a `ratebench run` job (ratebench.allocator).

Run serially (never under xdist):  OMP_NUM_THREADS=1 .venv/bin/pytest bench/ -p no:xdist --benchmark-enable -s
"""
from __future__ import annotations

import os

import pytest
import torch

from ratebench.allocator import retain_freed_memory

torch.set_num_threads(1)
ALLOCATOR = retain_freed_memory()  # what every `ratebench run` job sets (harness/allocator.py): measure that
RATIOS: dict[str, tuple[float, str]] = {}  # name -> (value, what it is / target)


@pytest.fixture(autouse=True, scope="session")
def _bench_env(tmp_path_factory):
    os.environ.setdefault("RATEBENCH_CACHE", str(tmp_path_factory.mktemp("fstar-cache")))
    os.environ["CI"] = "true"  # progress lines off: they are not what is measured
    os.environ["OMP_NUM_THREADS"] = "1"
    yield


@pytest.fixture
def compose_config():
    from ratebench.config import compose

    return compose


def interleaved(arms: dict, rounds: int = 7):
    """(name, arm) for `rounds` rounds over every arm, the order reversed every other round: the arm timed
    second in a round ran 3-5 % faster here (warm caches and allocator), which would flatter a fixed order."""
    names = list(arms)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            yield name, arms[name]


def record_ratio(benchmark, name: str, value: float, note: str) -> float:
    """Keep a ratio for the end-of-session table and the benchmark JSON (extra_info)."""
    RATIOS[name] = (value, note)
    if benchmark is not None:
        benchmark.extra_info[name] = value
        benchmark.extra_info[f"{name}_note"] = note  # what the number is (and is not), beside it in the JSON
    print(f"\nRATIO {name} = {value:.3g}   ({note})", flush=True)
    return value


def pytest_terminal_summary(terminalreporter):
    if not RATIOS:
        return
    terminalreporter.section("ratebench ratios (measured in this run)")
    terminalreporter.write_line(f"allocator: {ALLOCATOR}")
    for name, (value, note) in RATIOS.items():
        terminalreporter.write_line(f"{name:<48} {value:>10.3g}   {note}")
