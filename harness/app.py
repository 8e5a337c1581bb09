"""The Hydra application behind `ratebench run`: one job = one config = one output folder
(sweeps: <sweep dir>/<env>-<algorithm>-<run_hash>, so re-running a sweep skips or resumes jobs)."""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from ratebench.config import register

register()


@hydra.main(version_base="1.3", config_path="pkg://ratebench.conf", config_name="config")
def hydra_entry(cfg) -> float:
    from ratebench.runner import run_or_skip

    hc = HydraConfig.get()
    record, skipped = run_or_skip(cfg, Path(hc.runtime.output_dir), experiment=hc.runtime.choices.get("experiment"))
    if not skipped:
        resumed = record.get("resumed_from_step")
        print(f"ratebench: wrote {hc.runtime.output_dir}/metrics.parquet and run.json "
              f"({record['counters']['samples']:,d} samples, {len(record['seeds'])} seeds"
              f"{f', resumed from step {resumed}' if resumed is not None else ''})")
    return 0.0
