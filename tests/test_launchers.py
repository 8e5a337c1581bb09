"""Sweeps on real launchers: a joblib sweep SIGKILLed mid-way and re-run completes every job without
recomputing finished ones and resumes the killed job to the uninterrupted curve; submitit_local runs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from ratebench.runner import run_job

RATEBENCH = str(Path(sys.executable).with_name("ratebench"))
BUDGETS = [200, 300, 3000, 3500, 4000, 4500]  # two quick jobs, then long ones that get killed
TIMEOUT_S = 120


def sweep_command(sweep_dir: Path, launcher: list[str], budgets: list[int]) -> list[str]:
    return [RATEBENCH, "run", "-m", *launcher, "seeds=[0,1]", "checkpoint_every_s=0",
            "budget.samples=" + ",".join(map(str, budgets)), f"hydra.sweep.dir={sweep_dir}"]


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true", "HYDRA_FULL_ERROR": "1"}


def job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def completed(sweep_dir: Path) -> list[Path]:
    return [p / "run.json" for p in job_dirs(sweep_dir) if (p / "run.json").exists()] if sweep_dir.exists() else []


def in_progress(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.exists():
        return []
    return [p for p in job_dirs(sweep_dir) if (p / "checkpoint.pt").exists() and not (p / "run.json").exists()]


def fingerprint(paths: list[Path]) -> dict:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in paths}


def uninterrupted(compose_config, job_dir: Path, out: Path) -> pd.DataFrame:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
    run_job(compose_config(overrides), out)
    return pd.read_parquet(out / "metrics.parquet")


@pytest.mark.slow
def test_sigkilled_joblib_sweep_rerun_completes_without_recomputing(compose_config, tmp_path):
    sweep = tmp_path / "sweep"
    command = sweep_command(sweep, ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], BUDGETS)
    proc = subprocess.Popen(command, env=child_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not (len(completed(sweep)) >= 2 and in_progress(sweep)):
            assert proc.poll() is None, f"sweep ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no 2 completed jobs + 1 running job within the timeout"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its joblib workers, mid-write or not
        proc.wait(timeout=30)
    done_before = completed(sweep)
    records_before = fingerprint([p.parent / name for p in done_before for name in ("run.json", "metrics.parquet")])
    killed = in_progress(sweep)
    assert 2 <= len(done_before) < len(BUDGETS) and killed

    rerun = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sum(f"skipping {p.parent}: completed" in rerun.stdout for p in done_before) == len(done_before)

    # every job exactly once, complete and parseable; finished ones untouched
    dirs = job_dirs(sweep)
    assert len(dirs) == len(BUDGETS)
    records = [json.loads((d / "run.json").read_text()) for d in dirs]
    assert sorted(r["config"]["budget"]["samples"] for r in records) == BUDGETS
    assert len({r["run_hash"] for r in records}) == len(BUDGETS)
    assert all(d.name.endswith(r["run_hash"]) for d, r in zip(dirs, records))
    assert all(st["status"] == "completed" for r in records for st in r["status"].values())
    for d in dirs:
        assert sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) in (
            ["app.log", "metrics.parquet", "run.json"], ["metrics.parquet", "run.json"])
        frame = pd.read_parquet(d / "metrics.parquet")
        assert not frame.duplicated(["seed", "samples"]).any()
    assert fingerprint(list(map(Path, records_before))) == records_before

    # the killed jobs resumed from their checkpoints to the uninterrupted curve
    resumed = [d for d, r in zip(dirs, records) if r["resumed_from_step"] is not None]
    assert set(resumed) == set(killed)
    job = killed[0]
    reference = uninterrupted(compose_config, job, tmp_path / "reference")
    pd.testing.assert_frame_equal(pd.read_parquet(job / "metrics.parquet").drop(columns="wall_s"),
                                  reference.drop(columns="wall_s"), check_exact=True)


@pytest.mark.slow
def test_submitit_local_sweep_of_two_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    command = sweep_command(sweep, ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=3"], [500, 700])
    result = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    dirs = [d for d in job_dirs(sweep)]
    records = [json.loads((d / "run.json").read_text()) for d in dirs]
    assert sorted(r["counters"]["samples"] >= r["config"]["budget"]["samples"] for r in records) == [True, True]
    assert sorted(r["config"]["budget"]["samples"] for r in records) == [500, 700]
    assert all(d.name.endswith(r["run_hash"]) for d, r in zip(dirs, records))
    assert (sweep / ".submitit").is_dir()  # really went through submitit
