"""Sweep workers die with their launcher (issue 14, item 2): kill the parent of a 2-job joblib sweep
(SIGKILL or SIGTERM) and both loky workers are gone within seconds, each job checkpointed so that a
re-run resumes it, instead of computing their jobs to the end beside the re-run (harness/signals.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

RATEBENCH = str(Path(sys.executable).with_name("ratebench"))
GONE_WITHIN_S = 5.0


def warm_reference() -> None:
    """The default bandit's F* in this session's cache, so the workers only read it."""
    from ratebench import envs
    from ratebench.config import compose, plain, validate
    from ratebench.fstar import reference

    v = validate(compose([]))
    reference(envs.make(v.env), plain(v.env))


def children(pid: int) -> dict[int, str]:
    """{pid: command line} of the live children of pid (from /proc)."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError, ValueError):
            continue
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_joblib_workers_die_with_their_launcher(tmp_path, signum):
    warm_reference()
    sweep = tmp_path / "sweep"
    command = [RATEBENCH, "run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "n_seeds=2",
               "budget.samples=50000000,50000001", "checkpoint_every_s=0", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(list(sweep.glob("*/checkpoint.pt"))) < 2:  # both jobs are in their loops
            assert proc.poll() is None, f"the sweep ended early (exit {proc.returncode})"
            assert time.monotonic() < deadline, "the two jobs did not start within 120 s"
            time.sleep(0.05)
        workers = [pid for pid, cmd in children(proc.pid).items() if "popen_loky" in cmd]
        assert len(workers) == 2, children(proc.pid)
        os.kill(proc.pid, signum)
        proc.wait(timeout=30)
        deadline = time.monotonic() + GONE_WITHIN_S
        while any(map(running, workers)) and time.monotonic() < deadline:
            time.sleep(0.05)
        alive = [pid for pid in workers if running(pid)]
        assert not alive, f"sweep workers {alive} outlived their launcher by {GONE_WITHIN_S} s"
    finally:
        for pid in [proc.pid, *workers]:
            if running(pid):
                os.kill(pid, signal.SIGKILL)
    # each worker checkpointed on the way out and wrote no result: a re-run resumes both jobs
    jobs = [d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(jobs) == 2
    for job in jobs:
        assert (job / "checkpoint.pt").exists() and not (job / "run.json").exists()
        assert not list(job.glob(".*.tmp"))
