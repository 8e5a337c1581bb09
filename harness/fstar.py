"""F-hat* per environment instance, computed once and cached on disk keyed by the env config."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ratebench.envs.exact import minimise_bilevel_objective
from ratebench.records import atomic_write_json, config_hash

EXACT_VERSION = 1  # bump when the exact objective changes, so old cache entries are not reused


def cache_dir(explicit: str | None) -> Path:
    root = explicit or os.environ.get("RATEBENCH_CACHE") or Path.home() / ".cache" / "ratebench"
    return Path(root)


def f_star(problem, env_config: dict, directory: str | None = None) -> tuple[float, torch.Tensor]:
    key = config_hash({"env": env_config, "exact_version": EXACT_VERSION})
    path = cache_dir(directory) / f"fstar-{key}.json"
    if path.exists():
        try:
            entry = json.loads(path.read_text())
            return float(entry["f_star"]), torch.tensor(entry["argmin"], dtype=torch.float64)
        except (ValueError, KeyError):
            pass  # unreadable entry: recompute and overwrite
    value, argmin = minimise_bilevel_objective(problem, seed=env_config.get("instance_seed", 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"f_star": value, "argmin": argmin.tolist(), "env": env_config})
    return value, argmin
