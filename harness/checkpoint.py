"""Checkpoints of a running job (algorithm state, sampler RNG counters, counters, rows so far):
written atomically as checkpoint.pt, read back only with torch.load(weights_only=True)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pandas as pd
import torch

from ratebench.records import atomic_write_bytes

FILENAME = "checkpoint.pt"
FORMAT = 1  # bump when the payload layout changes: older checkpoints are then ignored


def save(out_dir: Path, payload: dict) -> None:
    """Atomic: a job killed mid-write leaves the previous checkpoint (or none), never a torn one."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / FILENAME, buffer.getvalue())


def load(out_dir: Path, run_hash: str) -> dict | None:
    """The checkpoint of this exact run (same run_hash), or None if there is none or it belongs to
    another config / format. weights_only=True: a checkpoint can hold data, never code."""
    path = out_dir / FILENAME
    if not path.exists():
        return None
    try:
        payload = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001  (torn/foreign file: any unpickling error) start over, not crash
        print(f"ratebench: ignoring unreadable checkpoint {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    if payload.get("format") != FORMAT or payload.get("run_hash") != run_hash:
        return None
    return payload


def remove(out_dir: Path) -> None:
    (out_dir / FILENAME).unlink(missing_ok=True)


def frame_to_columns(frame: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Metric rows as one tensor per column, dtypes kept (int64 counters, float64 metrics)."""
    return {name: torch.from_numpy(frame[name].to_numpy().copy()) for name in frame.columns}


def columns_to_frame(columns: dict[str, torch.Tensor]) -> pd.DataFrame:
    return pd.DataFrame({name: t.numpy() for name, t in columns.items()})
