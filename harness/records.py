"""Run records (SPEC §6), written atomically: temporary name in the same folder, then rename."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd

METRIC_COLUMNS = ["gap", "grad_sq", "policy_gap", "psi_gap", "reward_err", "kl_ref"]
BASE_COLUMNS = ["seed", "step", "samples", "queries"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        frame.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def config_hash(config: dict) -> str:
    """Stable short hash of a JSON-able config."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


RESULT_PACKAGES = ("ratebench", "ratebench.envs", "ratebench.algorithms")  # code that computes results


def code_fingerprint() -> str:
    """Hash of the source files that produce results (harness, envs, algorithms; not analysis):
    a finished job — or a finished experiment sweep reused by `check` — is only reused by the code
    that computed it, never after a change. Found without importing those packages."""
    import importlib.util

    digest = hashlib.sha256()
    for name in RESULT_PACKAGES:
        spec = importlib.util.find_spec(name)
        for folder in spec.submodule_search_locations:
            for path in sorted(Path(folder).glob("*.py")):
                digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def git_commit(with_dirty: bool = False) -> str | None:
    """The commit of the git checkout the package runs from (None outside one); with_dirty appends
    "+dirty" when its working tree has uncommitted changes."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        if commit and with_dirty:
            status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=5).stdout.strip()
            commit += "+dirty" if status else ""
    except (OSError, subprocess.SubprocessError):
        return None
    return commit
