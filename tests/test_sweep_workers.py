"""Sweep workers die with their launcher (issue 14, item 2): kill the parent of a 2-job joblib sweep
and both loky workers are gone within seconds, each job checkpointed so that a re-run resumes it,
instead of computing their jobs to the end beside the re-run (harness/signals.py ParentWatch)."""
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


# A real joblib sweep costs ~12 s of CPU (launcher + two workers importing torch): SIGKILL runs it in CI;
# SIGTERM kills the launcher the same way (it has no handler: the job's handlers live in the workers),
# so CI checks SIGTERM on a forked launcher below, and RATEBENCH_SWEEP_TESTS=all runs the joblib one too.
SIGTERM_SWEEP = pytest.param(signal.SIGTERM, id="SIGTERM", marks=pytest.mark.skipif(
    os.environ.get("RATEBENCH_SWEEP_TESTS") != "all", reason="~12 s CPU; set RATEBENCH_SWEEP_TESTS=all"))


def _checkpoint(job) -> dict:
    """The checkpoint payload of a job folder (its sha256 verified), whatever its run hash."""
    import io

    import torch

    from ratebench.checkpoint import verified_payload

    payload = verified_payload((job / "checkpoint.pt").read_bytes())
    assert payload is not None, f"{job}/checkpoint.pt does not verify"
    return torch.load(io.BytesIO(payload), weights_only=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGKILL, id="SIGKILL"), SIGTERM_SWEEP])
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
    for job in jobs:  # written by the stop the watch sent, not only by the schedule before the kill
        assert (job / "checkpoint.pt").exists() and not (job / "run.json").exists()
        assert _checkpoint(job)["written_on"] == "SIGTERM"
        assert not list(job.glob(".*.tmp"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_stops_checkpointed_when_its_launcher_gets_sigterm(compose_config, tmp_path):
    """The worker side of the same mechanism, on a forked launcher -> worker pair: the launcher gets
    SIGTERM and dies; the worker (running a job the way app.hydra_entry does) checkpoints and exits."""
    from ratebench.runner import run_job
    from ratebench.signals import LAUNCHER_ENV, Interrupted, ParentWatch

    warm_reference()
    out = tmp_path / "job"
    cfg = compose_config(["seeds=[0,1]", "budget.samples=50000000", "checkpoint_every_s=0", "progress=false"])
    read_end, write_end = os.pipe()
    launcher = os.fork()
    if launcher == 0:  # the launcher: forks one worker, reports its pid, waits for it
        try:
            sys.stdout = sys.stderr = open(os.devnull, "w")
            os.environ[LAUNCHER_ENV] = str(os.getpid())
            worker = os.fork()
            if worker == 0:
                code = 70
                try:
                    with ParentWatch() as watch:
                        try:
                            run_job(cfg, out)
                        except Interrupted as exc:
                            watch.exit_if_orphaned(exc.code)
                            code = 71  # interrupted but not orphaned: the watch did not see its parent die
                finally:
                    os._exit(code)
            os.write(write_end, str(worker).encode())
            os.waitpid(worker, 0)
        finally:
            os._exit(0)
    os.close(write_end)
    worker = int(os.read(read_end, 32))
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint.pt").exists():
            assert time.monotonic() < deadline, "the worker's job did not start within 60 s"
            time.sleep(0.02)
        os.kill(launcher, signal.SIGTERM)
        _, status = os.waitpid(launcher, 0)
        assert os.waitstatus_to_exitcode(status) == -signal.SIGTERM
        deadline = time.monotonic() + GONE_WITHIN_S
        while running(worker) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not running(worker), f"the worker outlived its launcher by {GONE_WITHIN_S} s"
    finally:
        if running(worker):
            os.kill(worker, signal.SIGKILL)
    assert (out / "checkpoint.pt").exists() and not (out / "run.json").exists()
    assert _checkpoint(out)["written_on"] == "SIGTERM"  # the stop's own checkpoint, not the schedule's
