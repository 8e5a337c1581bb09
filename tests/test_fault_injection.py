"""Fault injection (issue 14, items 10 and "kill at each write point"): a job killed at every write
point of every file it writes ($RATEBENCH_FAULT, harness/records.py) or stopped by SIGTERM / SIGINT
resumes to the uninterrupted curve, exactly; results are created with the umask's mode and fsynced.
Kills run in a forked child of the test process (no interpreter start-up per case)."""
from __future__ import annotations

import json
import os
import signal
import stat
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ratebench.core import records
from ratebench.core.records import FAULT_ENV, FAULT_EXIT, WRITE_POINTS
from ratebench.runner import run_job

FAST = ["algorithm=reward_mle", "seeds=[0,1]", "budget.samples=300", "checkpoint_every_s=0"]
# bilevel with lam growing through several log-grid values of psi_gap's reference (envs/penalty.py),
# so a resumed run needs the checkpointed psi cache to reproduce psi_gap to the last bit
PSI = ["algorithm=bilevel", "seeds=[0,1]", "budget.samples=1000", "checkpoint_every_s=0", "algorithm.k0=1",
       "algorithm.lam_exponent=0.3"]


def spawn(child, stderr: Path | None = None) -> int:
    """Fork; the child runs child() (stdout to /dev/null, stderr to the file if given) and exits with
    its return value. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:  # pytest's capture replaced sys.stdout/err: replace them again
            sys.stderr = open(stderr or os.devnull, "w", buffering=1)
            sys.stdout = open(os.devnull, "w")
            code = child()
        finally:
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 0)
    return pid


def waitstatus(pid: int) -> int:
    """The exit code of a child (negative: killed by that signal)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def curve(folder: Path) -> pd.DataFrame:
    return pd.read_parquet(folder / "metrics.parquet").drop(columns="wall_s")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted FAST run, written under umask 027: its files must be 0640 (not mkstemp's 0600)."""
    from ratebench.config import compose

    out = tmp_path_factory.mktemp("straight")
    old = os.umask(0o027)
    try:
        run_job(compose(FAST), out)
    finally:
        os.umask(old)
    return out


def test_results_get_the_umask_mode(straight):
    for name in ("metrics.parquet", "run.json"):
        assert stat.S_IMODE((straight / name).stat().st_mode) == 0o640, name


def test_every_atomic_write_is_fsynced(tmp_path, monkeypatch):
    """File and folder fsynced for JSON and parquet alike (the parquet write had none)."""
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.fstat(fd).st_ino)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    records.atomic_write_json(tmp_path / "run.json", {"a": 1})
    records.atomic_write_parquet(tmp_path / "metrics.parquet", pd.DataFrame({"seed": [0], "samples": [1]}))
    folder = tmp_path.stat().st_ino
    for name in ("run.json", "metrics.parquet"):
        assert (tmp_path / name).stat().st_ino in synced, f"{name} written without fsync"
    assert synced.count(folder) == 2, "the rename was not made durable (folder fsync)"


CASES = [(name, point, nth) for name, nth in (("checkpoint.pt", 3), ("metrics.parquet", 1), ("run.json", 1))
         for point in WRITE_POINTS]


@pytest.mark.parametrize("name, point, nth", CASES, ids=[f"{n}:{p}" for n, p, _ in CASES])
def test_killed_at_a_write_point_resumes_to_the_same_curve(compose_config, straight, tmp_path, name, point, nth):
    out = tmp_path / "run"

    def child():
        os.environ[FAULT_ENV] = f"{name}:{point}:{nth}"
        run_job(compose_config(FAST), out)
        return 0  # the write point was never reached

    assert waitstatus(spawn(child)) == FAULT_EXIT
    left = {p.name for p in out.iterdir()}
    killed_after_completion = name == "run.json" and point == "renamed"
    assert ("run.json" in left) == killed_after_completion, left  # a kill before the rename leaves no record
    if "run.json" in left:  # whatever is in place parses (atomic writes)
        json.loads((out / "run.json").read_text())
    if "metrics.parquet" in left:
        curve(out)
    if point == "torn":
        assert any(n.startswith(f".{name}.") and n.endswith(".tmp") for n in left), left

    record = run_job(compose_config(FAST), out)
    pd.testing.assert_frame_equal(curve(out), curve(straight), check_exact=True)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.parquet", "run.json"]  # no temporaries, no checkpoint
    if name == "checkpoint.pt":
        assert record["resumed_from_step"] is not None  # an earlier checkpoint survived the torn one


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_checkpoints_at_once_and_exits_128_plus_signum(compose_config, tmp_path, signum):
    """`ratebench run` stopped by SIGTERM (SLURM's timeout) or SIGINT: exit 143 / 130, one line on
    stderr, a checkpoint of the step it was in; the re-run resumes to the uninterrupted curve, psi_gap
    included (its reference cache is in the checkpoint)."""
    from ratebench.cli import main

    out, err = tmp_path / "run", tmp_path / "stderr"
    overrides = [*PSI, "progress=false", f"hydra.run.dir={out}"]
    pid = spawn(lambda: main(["run", *overrides]), stderr=err)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():  # the job is in its loop
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    os.kill(pid, signum)
    assert waitstatus(pid) == 128 + signum
    lines = [ln for ln in err.read_text().splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted at step" in lines[0] and "re-run to resume" in lines[0], lines
    step = int(lines[0].split("interrupted at step ")[1].split(";")[0])
    assert not (out / "run.json").exists()
    if signum == signal.SIGINT:
        return  # the exit path is the same; one resume comparison (below) suffices

    record = run_job(compose_config(PSI), out)
    assert record["resumed_from_step"] == step
    reference = tmp_path / "straight"
    run_job(compose_config(PSI), reference)
    assert curve(reference)["lam"].nunique() > 3  # psi's reference was solved at several lam, before and after
    pd.testing.assert_frame_equal(curve(out), curve(reference), check_exact=True)
