"""The cache folder: F* and premise entries (harness/fstar.py, harness/audit.py) and compiled steps
(core/kernels.py) keep their files there."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir(explicit: str | None) -> Path:
    """`explicit` (the run's cache_dir), else $RATEBENCH_CACHE, else ~/.cache/ratebench."""
    root = explicit or os.environ.get("RATEBENCH_CACHE") or Path.home() / ".cache" / "ratebench"
    return Path(root)
