"""The Hydra application behind `ratebench run`: one job = one config = one output folder."""
from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig

from ratebench.config import register

register()


@hydra.main(version_base="1.3", config_path="pkg://ratebench.conf", config_name="config")
def hydra_entry(cfg) -> float:
    from ratebench.runner import run_job

    hc = HydraConfig.get()
    record = run_job(cfg, Path(hc.runtime.output_dir), experiment=hc.runtime.choices.get("experiment"))
    print(f"ratebench: wrote {hc.runtime.output_dir}/metrics.parquet and run.json "
          f"({record['counters']['samples']:,d} samples, {len(record['seeds'])} seeds)")
    return 0.0
