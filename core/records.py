"""Run records (README.md), written atomically: temporary name in the same folder, then rename."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

# what a sweep may minimise (config `objective`): the metrics every algorithm has
OBJECTIVES = ("policy_gap", "target_policy_gap_excess", "gap", "gap_local", "reward_err")
BASE_COLUMNS = ["seed", "step", "samples", "queries"]
OPERATIONAL_KEYS = ("progress", "checkpoint_every_s", "cache_dir", "tuning_instances", "overwrite",
                    "logger", "objective", "step_threads", "free_keys")  # cannot change a result: not in the hashes, nor in group labels (impl can: docs/fast.md)


def objective_value(metrics: pd.DataFrame, record: dict, metric: str) -> float:
    """The mean over seeds of each seed's last value of `metric`: what a tuning trial reports. +inf when a
    seed is not `completed` (diverged, saturated, stalled or failed) or has no finite last value, so a sweeper never prefers a
    configuration that blows up on some seeds."""
    if any(st.get("status") != "completed" for st in record["status"].values()) or metrics.empty:
        return float("inf")
    last = metrics.sort_values(["seed", "samples"]).drop_duplicates("seed", keep="last").set_index("seed")[metric]
    if len(last) != len(record["seeds"]) or not bool(np.isfinite(last.to_numpy(float)).all()):
        return float("inf")
    return float(last.mean())


FAULT_ENV = "RATEBENCH_FAULT"  # test hook: "<file name>:<write point>[:<n>]" exits the process there (tests only)
WRITE_POINTS = ("torn", "written", "renamed")  # temp file half written / written + fsynced / renamed into place
FAULT_EXIT = 99  # the exit status of a process killed by the fault hook
_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str, point: str) -> None:
    """Fault injection (tests/test_fault_injection.py): when $RATEBENCH_FAULT names this file and
    write point (and, with :n, this is its n-th occurrence in the process), exit at once without
    any cleanup, as a kill -9 there would."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, rest = spec.partition(":")
    where, _, nth = rest.partition(":")
    if (target, where) != (name, point):
        return
    _FAULT_COUNTS[spec] = _FAULT_COUNTS.get(spec, 0) + 1
    if _FAULT_COUNTS[spec] == int(nth or 1):
        os._exit(FAULT_EXIT)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write data to path atomically and durably: a temporary file in the same folder, fsynced,
    renamed over path, then the folder fsynced (the rename survives a power cut). The file gets the
    mode an ordinary open() would give it (0666 minus the umask, usually 0644), not mkstemp's 0600,
    so collaborators on a shared file system can read results."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            half = len(data) // 2
            fh.write(data[:half])
            fh.flush()
            fault_point(path.name, "torn")  # half of the data in the temporary file
            fh.write(data[half:])
            fh.flush()
            os.fsync(fh.fileno())
        fault_point(path.name, "written")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fault_point(path.name, "renamed")
    fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename (or unlink) in folder durable; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path, names) -> list[Path]:
    """Delete the temporary files `.<name>.*.tmp` that a killed atomic write of one of `names` left
    in folder (a run's start-up: no other process writes that run's files). Returns what was removed."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def unwritable_reason(path) -> str | None:
    """Why a folder could not be made (or written) at path, or None: checked before any compute."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{str(probe)!r} is not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{str(probe)!r} refuses writes"
    return None


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def atomic_write_parquet(path: Path, frame: pd.DataFrame) -> str:
    """Atomic, fsynced parquet write (through atomic_write_bytes); returns the file's sha256."""
    data = parquet_bytes(frame)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def metrics_mismatch(metrics: Path | bytes, record: dict, required: bool = True) -> str | None:
    """Why metrics.parquet (its path, or its bytes already read) is not the file run.json recorded (its
    sha256, which also fixes the row count `metrics_rows`), or None. required=False: a record without
    a sha256 (written before it existed) passes."""
    expected = record.get("metrics_sha256")
    if not isinstance(expected, str):
        return "run.json records no sha256 of metrics.parquet" if required else None
    try:
        actual = hashlib.sha256(metrics).hexdigest() if isinstance(metrics, bytes) else file_sha256(metrics)
    except OSError as exc:
        return f"cannot read metrics.parquet ({exc.strerror or exc})"
    if actual != expected:
        return (f"metrics.parquet does not match run.json (sha256 {actual[:12]}..., recorded {expected[:12]}...): "
                f"modified or damaged after the run")
    return None


def config_hash(config: dict) -> str:
    """Stable short hash of a JSON-able config."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


RESULT_PACKAGES = ("ratebench", "ratebench.core", "ratebench.envs", "ratebench.algorithms")  # code that computes results


RESULT_SOURCES = ("*.py", "*.c")  # the Python and the compiled step's C source (algorithms/bilevel_step.c)


def code_fingerprint() -> str:
    """Hash of the source files that produce results (harness, core, envs, algorithms; not analysis):
    a finished job — or a finished experiment sweep reused by `check` — is only reused by the code
    that computed it, never after a change. Found without importing those packages."""
    import importlib.util

    folders = []
    for name in RESULT_PACKAGES:
        folders += importlib.util.find_spec(name).submodule_search_locations
    return sources_fingerprint(folders)


def sources_fingerprint(folders) -> str:
    """Hash of the RESULT_SOURCES files directly in these folders, by name and content."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for pattern in RESULT_SOURCES for p in Path(folder).glob(pattern)):
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
