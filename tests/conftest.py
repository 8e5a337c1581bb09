"""Shared fixtures: a private F-hat* cache, one torch thread, and config composition."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # one cache for the whole session, shared by the xdist workers (their base folders have a common
    # parent): the F-hat* of an instance is computed once, under harness/fstar.py's per-entry lock
    shared = os.environ.get("PYTEST_XDIST_WORKER") is not None
    root = tmp_path_factory.getbasetemp().parent if shared else tmp_path_factory.getbasetemp()
    cache = root / "fstar-cache"
    cache.mkdir(exist_ok=True)
    os.environ["RATEBENCH_CACHE"] = str(cache)
    os.environ.setdefault("CI", "true")  # no progress lines in test output
    yield


@pytest.fixture(autouse=True)
def _conf_path_restored():
    """$RATEBENCH_CONF_PATH as it was before the test: `check` on a claim file given by path adds its folder for the
    runs it starts (registry.add_conf_folder), which must not leak into the next test's conf folders."""
    from ratebench.core.registry import CONF_PATH_ENV

    before = os.environ.get(CONF_PATH_ENV)
    yield
    if before is None:
        os.environ.pop(CONF_PATH_ENV, None)
    else:
        os.environ[CONF_PATH_ENV] = before


@pytest.fixture
def compose_config():
    """compose_config([overrides]) -> the run config Hydra would build (without `hydra:`)."""
    from ratebench.config import compose

    return compose


@pytest.fixture
def expect_bad_input(tmp_path, capsys):
    """expect_bad_input(overrides, words): `ratebench run` refuses with exit 2, one line naming
    every word, and no run folder created."""
    from ratebench.cli import main

    def _check(overrides, words):
        out = tmp_path / "run"
        code = main(["run", *overrides, f"hydra.run.dir={out}"])
        err = capsys.readouterr().err
        assert code == 2
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("ratebench: error: "), err
        for word in words:
            assert word in err, f"{word!r} missing from {err!r}"
        assert not out.exists()

    return _check


def at_step(algorithm_class, k: int, hook):
    """A run_segment for monkeypatching `algorithm_class` that calls hook(state) once, when the state has taken k steps
    (a segment that crosses k is split there; the harness sees one segment), as a patched step() would after its
    k-th step: a fault (a NaN, an interrupt) injected into the harness's segment loop (Algorithm.run_segment)."""
    import torch

    original, done = algorithm_class.run_segment, []

    def run_segment(self, state, sampler, n, alive):
        if not done and state.k <= k < state.k + n:
            first, died = 0, torch.zeros(len(alive), dtype=torch.int64)
            if k > state.k:
                state, first, died = original(self, state, sampler, k - state.k, alive)
            done.append(1)
            hook(state)
            state, rest, later = original(self, state, sampler, n - first, alive & (died == 0))
            return state, first + rest, torch.where(died > 0, died, torch.where(later > 0, later + first, later))
        return original(self, state, sampler, n, alive)

    return run_segment
