"""The Hydra application behind `ratebench run`: one job = one config = one output folder
(sweeps: <sweep dir>/<env>-<algorithm>-<run_hash>, so re-running a sweep skips or resumes jobs)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

import hydra
from hydra.core.hydra_config import HydraConfig

from ratebench.config import register

register()

SWEEP_LOG_ENV = "RATEBENCH_SWEEP_LOG"  # `ratebench run -m` sets it: the file the jobs report their outcome to
OUTCOMES = ("done", "skipped", "resumed", "failed")


def report_outcome(out_dir, outcome: str, code: int = 0) -> None:
    """Append this job's outcome (OUTCOMES) and exit status to the sweep's log, if there is one: one
    JSON line, one write."""
    import json
    import os

    path = os.environ.get(SWEEP_LOG_ENV)
    if path:
        with open(path, "a") as log:
            log.write(json.dumps({"job": str(out_dir), "outcome": outcome, "code": code}) + "\n")


def sweep_summary(log_text: str) -> tuple[str, int]:
    """From the outcome log: one line with how many jobs were done, skipped, resumed and failed, and
    the sweep's exit status (the highest of its jobs': 0 when none failed)."""
    import json

    entries = [json.loads(line) for line in log_text.splitlines() if line.strip()]
    outcomes = [e["outcome"] for e in entries]
    n = len(outcomes)
    counts = ", ".join(f"{outcomes.count(o)} {o}" for o in OUTCOMES)
    return f"ratebench: sweep of {n} job{'' if n == 1 else 's'}: {counts}", max((e.get("code", 0) for e in entries),
                                                                           default=0)


@hydra.main(version_base="1.3", config_path="pkg://ratebench.conf", config_name="config")
def hydra_entry(cfg) -> float:
    """One job. Its outcome leaves as an exit status, never as an exception for Hydra to print with
    exit 1: bad input 2, internal error 3 (one line + a traceback file), a signal 128 + signum. In a
    sweep a failed job only reports its status (the sweep's exit status is the highest one, cli.py)
    and the launcher goes on with the other jobs; a signal stops the sweep."""
    from hydra.types import RunMode

    from ratebench.exits import internal_error
    from ratebench.core.errors import ConfigError
    from ratebench.progress import job_log, say
    from ratebench.signals import Interrupted, ParentWatch

    hc = HydraConfig.get()
    with ParentWatch() as watch, job_log() as log:  # a sweep worker stops (checkpointed) when its launcher dies
        try:
            return _job(cfg, hc)
        except Interrupted as exc:
            report_outcome(hc.runtime.output_dir, "failed", exc.code)
            watch.exit_if_orphaned(exc.code)
            raise SystemExit(exc.code) from None
        except ConfigError as exc:
            say(f"ratebench: error: {exc}", error=True)
            code = 2
        except Exception as exc:  # noqa: BLE001  (anything else is our bug: exit 3 with the traceback saved)
            code = internal_error(exc)
            log.exception("internal error (exit 3)")  # the job's log file gets the traceback too
    report_outcome(hc.runtime.output_dir, "failed", code)
    if hc.mode == RunMode.MULTIRUN:
        return float("nan")
    raise SystemExit(code)


def _job(cfg, hc) -> float:
    """Run (or skip) the job; returns its `objective` for a sweeper (0.0 without one). A batched instance
    family (`instances=[...]`) writes one folder per instance; its objective is the mean over them."""
    from ratebench.progress import say
    from ratebench.core.records import objective_value
    from ratebench.runner import run_instances_or_skip, run_or_skip

    out_dir, experiment = Path(hc.runtime.output_dir), hc.runtime.choices.get("experiment")
    if cfg.get("instances") is None:
        record, skipped = run_or_skip(cfg, out_dir, experiment=experiment)
        folders = [(out_dir, record)]
    else:
        folders, skipped = run_instances_or_skip(cfg, out_dir, experiment=experiment)
        record = folders[0][1]
    report_outcome(out_dir, "skipped" if skipped else
                   "resumed" if record.get("resumed_from_step") is not None else "done")
    if not skipped:
        resumed = record.get("resumed_from_step")
        for folder, rec in folders:
            say(f"ratebench: wrote {folder}/metrics.parquet and run.json "
                  f"({rec['counters']['samples']:,d} samples, {len(rec['seeds'])} seeds"
                  f"{f', resumed from step {resumed}' if resumed is not None else ''})")
    if cfg.get("objective") is None:
        return 0.0
    values = [objective_value(pd.read_parquet(folder / "metrics.parquet"), rec, cfg.objective) for folder, rec in folders]
    value = sum(values) / len(values)
    over = "seeds" if len(values) == 1 else f"seeds, then over {len(values)} instances"
    say(f"ratebench: objective {cfg.objective} (mean final over {over}) = {value:.6g}")
    return value
