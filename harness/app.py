"""The Hydra application behind `ratebench run`: one job = one config = one output folder
(sweeps: <sweep dir>/<env>-<algorithm>-<run_hash>, so re-running a sweep skips or resumes jobs)."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from ratebench.config import register

register()

SWEEP_LOG_ENV = "RATEBENCH_SWEEP_LOG"  # `ratebench run -m` sets it: the file the jobs report their outcome to
OUTCOMES = ("done", "skipped", "resumed", "failed")


def report_outcome(out_dir, outcome: str) -> None:
    """Append this job's outcome (OUTCOMES) to the sweep's log, if there is one: one JSON line, one write."""
    import json
    import os

    path = os.environ.get(SWEEP_LOG_ENV)
    if path:
        with open(path, "a") as log:
            log.write(json.dumps({"job": str(out_dir), "outcome": outcome}) + "\n")


def sweep_summary(log_text: str) -> str:
    """One line from the outcome log: how many jobs were done, skipped, resumed and failed."""
    import json

    outcomes = [json.loads(line)["outcome"] for line in log_text.splitlines() if line.strip()]
    n = len(outcomes)
    counts = ", ".join(f"{outcomes.count(o)} {o}" for o in OUTCOMES)
    return f"ratebench: sweep of {n} job{'' if n == 1 else 's'}: {counts}"


@hydra.main(version_base="1.3", config_path="pkg://ratebench.conf", config_name="config")
def hydra_entry(cfg) -> float:
    """One job. Its outcome leaves as an exit status, never as an exception for Hydra to print with
    exit 1: bad input 2, internal error 3 (one line + a traceback file), a signal 128 + signum."""
    from ratebench.cli import internal_error
    from ratebench.errors import ConfigError
    from ratebench.signals import Interrupted, ParentWatch

    with ParentWatch() as watch:  # a sweep worker stops (checkpointed) when its launcher dies
        try:
            _job(cfg)
        except Interrupted as exc:
            watch.exit_if_orphaned(exc.code)
            raise SystemExit(exc.code) from None
        except ConfigError as exc:
            print(f"ratebench: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception as exc:  # noqa: BLE001  (anything else is our bug: exit 3 with the traceback saved)
            raise SystemExit(internal_error(exc)) from None
    return 0.0


def _job(cfg) -> None:
    from ratebench.runner import run_or_skip

    hc = HydraConfig.get()
    try:
        record, skipped = run_or_skip(cfg, Path(hc.runtime.output_dir), experiment=hc.runtime.choices.get("experiment"))
    except BaseException:
        report_outcome(hc.runtime.output_dir, "failed")
        raise
    report_outcome(hc.runtime.output_dir, "skipped" if skipped else
                   "resumed" if record.get("resumed_from_step") is not None else "done")
    if not skipped:
        resumed = record.get("resumed_from_step")
        print(f"ratebench: wrote {hc.runtime.output_dir}/metrics.parquet and run.json "
              f"({record['counters']['samples']:,d} samples, {len(record['seeds'])} seeds"
              f"{f', resumed from step {resumed}' if resumed is not None else ''})")
