"""Checkpoints of a running job (algorithm state, sampler RNG counters, counters, rows so far):
written atomically as checkpoint.pt behind a sha256 of the payload, verified before it is read back
(only with torch.load(weights_only=True)); a checkpoint that fails the check is discarded."""
from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import pandas as pd
import torch

from ratebench.core.records import atomic_write_bytes

FILENAME = "checkpoint.pt"
FORMAT = 4  # bump when the payload layout changes: older checkpoints are then ignored (2: checksum, psi cache;
#            3: status, rows and psi cache per instance of the job; 4: the seed-health memory per instance)
MAGIC = b"ratebench-checkpoint sha256="  # file = MAGIC + hex digest of the payload + b"\n" + torch.save payload


def save(out_dir: Path, payload: dict) -> None:
    """Atomic: a job killed mid-write leaves the previous checkpoint (or none), never a torn one."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    data = buffer.getvalue()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / FILENAME, MAGIC + hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


def verified_payload(raw: bytes) -> bytes | None:
    """The torch payload of a checkpoint file's bytes if its sha256 matches, else None."""
    head, sep, data = raw.partition(b"\n")
    if not sep or not head.startswith(MAGIC) or head[len(MAGIC):] != hashlib.sha256(data).hexdigest().encode():
        return None
    return data


def load(out_dir: Path, run_hash: str) -> dict | None:
    """The checkpoint of this exact run (same run_hash), or None if there is none or it belongs to
    another config / format. weights_only=True: a checkpoint can hold data, never code."""
    path = out_dir / FILENAME
    if not path.exists():
        return None
    try:
        data = verified_payload(path.read_bytes())
        if data is None:
            return _discard(path, "its checksum does not match its contents (corrupted or written by an older "
                                  "ratebench)")
        payload = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001  (foreign file: any unpickling error) start over, not crash
        return _discard(path, f"it cannot be read ({type(exc).__name__}: {exc})")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return _discard(path, f"it is not a checkpoint of this ratebench format ({FORMAT})")
    if payload.get("run_hash") != run_hash:
        return _discard(path, f"it belongs to another run (run_hash {payload.get('run_hash')}, not {run_hash})")
    return payload


def _discard(path: Path, why: str) -> None:
    """The one way a checkpoint is refused: a warning naming the file and why; the job starts over."""
    warnings.warn(f"discarding checkpoint {path}: {why}; the job starts over", stacklevel=3)
    return None


def remove(out_dir: Path) -> None:
    (out_dir / FILENAME).unlink(missing_ok=True)


def frame_to_columns(frame: pd.DataFrame) -> dict[str, torch.Tensor]:
    """Metric rows as one tensor per column, dtypes kept (int64 counters, float64 metrics)."""
    return {name: torch.from_numpy(frame[name].to_numpy().copy()) for name in frame.columns}


def columns_to_frame(columns: dict[str, torch.Tensor]) -> pd.DataFrame:
    return pd.DataFrame({name: t.numpy() for name, t in columns.items()})
