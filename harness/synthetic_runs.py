"""Run folders of synthetic curves (analysis/synthetic.py) in the harness's record layout, for tests and
benchmarks of the analysis; with `experiment`, the config recorded is the one that preset resolves to."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ratebench.core.records import config_hash


@functools.lru_cache(maxsize=16)
def _preset(name: str) -> str:
    from omegaconf import OmegaConf
    from ratebench.core.catalog import conf_dir
    from ratebench.config import compose

    if not (conf_dir() / "experiment" / f"{name}.yaml").exists():
        return "{}"
    cfg = OmegaConf.to_container(compose([f"experiment={name}"]), resolve=True)
    cfg.pop("n_seeds", None)
    return json.dumps(cfg)


def preset_config(name: str) -> dict:
    """The resolved config of a shipped experiment preset as a run records it ({} for another name)."""
    return json.loads(_preset(name))


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_run(folder: Path, x: np.ndarray, values: np.ndarray, seeds: list[int], metric: str = "reward_err",
              algorithm: str = "synthetic", env: str = "synthetic", config: dict | None = None,
              status: dict | None = None, experiment: str | None = None) -> Path:
    """One run folder (metrics.parquet + run.json) in the harness's layout: values (S, P) for seeds.
    A seed whose row holds +inf from some point on is recorded as diverged there (no rows after).
    With `experiment` a shipped preset, the recorded config is the one `ratebench run
    experiment=<name>` resolves, with `config` merged over it (as overrides would be)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(config or {"env": {"name": env}, "algorithm": {"name": algorithm}})
    if experiment is not None:
        config = _merged(preset_config(experiment), config)
    status = dict(status or {})
    frames = []
    for i, s in enumerate(seeds):
        v = values[i]
        bad = np.flatnonzero(~np.isfinite(v))
        keep = slice(0, bad[0]) if len(bad) else slice(None)
        if len(bad):
            status.setdefault(str(s), {"status": "diverged", "step": int(bad[0])})
        frames.append(pd.DataFrame({"seed": s, "step": np.arange(len(x))[keep], "samples": x[keep].astype(np.int64),
                                    "queries": (x[keep] // 2).astype(np.int64), metric: v[keep]}))
    for s in seeds:
        status.setdefault(str(s), {"status": "completed"})
    pd.concat(frames, ignore_index=True).to_parquet(folder / "metrics.parquet", index=False)
    record = {"algorithm": algorithm, "env": env, "experiment": experiment, "seeds": list(seeds), "status": status,
              "config": {**config, "seeds": list(seeds)}, "config_hash": config_hash(config),
              "run_hash": config_hash({**config, "seeds": list(seeds)}), "provenance": {"argv": ["synthetic"]}}
    (folder / "run.json").write_text(json.dumps(record, indent=2))
    return folder
