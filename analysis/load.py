"""Run records → one tidy table: every run.json under a folder, its metrics.parquet, the seed
statuses and the flattened resolved config (README.md). Broken records are warned about and skipped."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ratebench.core.records import metrics_mismatch

# metric columns of the global reference and the population targets that runs written before them lack:
# they load as NaN
NEW_METRICS = ("gap_local", "lower_gap", "psi_grad_sq", "target_policy_gap_excess")
TARGET_FIELDS = ("policy_gap", "gap", "gap_local", "reward_err", "what", "solved")  # run.json target -> target.<field>
HARNESS_METRICS = {"gap", "grad_sq", "policy_gap"}  # columns every harness run has written: marks a run record
RUN_KEYS = ["algorithm", "env", "experiment", "config_hash", "run_hash", "run_dir"]
# a seed's final status in run.json: completed; diverged (non-finite loss, stopped); saturated (its
# iterate left the bounded region or its metrics became non-finite); stalled (it stopped moving);
# failed (an exception). Saturated and stalled records carry the step and a reason.
SEED_STATUSES = ("completed", "diverged", "saturated", "stalled", "failed")


class RunRecordError(ValueError):
    """A run record that cannot be read (missing, truncated or corrupted file)."""


@dataclass
class Loaded:
    """metrics: one row per (run, seed, evaluation point); seeds: one row per (run, seed) with
    its status, also for seeds without any metric row; skipped: the files that could not be read."""

    metrics: pd.DataFrame
    seeds: pd.DataFrame
    skipped: list[tuple[str, str]] = field(default_factory=list)


def find_runs(root) -> list[Path]:
    """Every run.json below root (recursive), sorted; root itself may be a run folder."""
    root = Path(root)
    return sorted(p for p in root.rglob("run.json") if p.is_file())


def flatten_config(config: dict, prefix: str = "cfg") -> dict:
    """{'env': {'beta': 1}} → {'cfg.env.beta': 1}; lists become their JSON text."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(list(value))
        else:
            flat[name] = value
    return flat


def read_record(run_json: Path) -> dict:
    """The parsed run.json, checked for the keys analysis relies on."""
    try:
        record = json.loads(Path(run_json).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunRecordError(f"{run_json}: cannot read run record ({type(exc).__name__}: {exc})") from None
    if not isinstance(record, dict):
        raise RunRecordError(f"{run_json}: run record is not a JSON object")
    missing = [k for k in ("algorithm", "env", "seeds", "status", "config", "config_hash") if k not in record]
    if missing:
        raise RunRecordError(f"{run_json}: run record lacks the keys {missing}")
    shapes = {"algorithm": str, "env": str, "config_hash": str, "seeds": list, "status": dict, "config": dict}
    wrong = [f"{k} ({type(record[k]).__name__}, not {t.__name__})" for k, t in shapes.items() if not isinstance(record[k], t)]
    if not wrong and not all(isinstance(s, int) and not isinstance(s, bool) for s in record["seeds"]):
        wrong.append("seeds (not a list of integers)")
    if not wrong and not all(isinstance(st, dict) for st in record["status"].values()):
        wrong.append("status (not a mapping of seed to a status record)")
    if wrong:
        raise RunRecordError(f"{run_json}: run record of the wrong shape: {', '.join(wrong)}")
    return record


def read_metrics(parquet: Path, record: dict | None = None) -> pd.DataFrame:
    """metrics.parquet as a DataFrame, read once; any read failure, or (given its run record) a file
    that is not the one run.json recorded → RunRecordError naming the file."""
    try:
        data = Path(parquet).read_bytes()
        why = metrics_mismatch(data, record, required=False) if record is not None else None
        if why is not None:
            raise RunRecordError(f"{parquet}: {why}")
        frame = pq.read_table(pa.BufferReader(data)).to_pandas()
    except RunRecordError:
        raise
    except Exception as exc:  # pyarrow raises several unrelated types for truncated files
        raise RunRecordError(f"{parquet}: cannot read metrics ({type(exc).__name__}: {exc})") from None
    missing = [c for c in ("seed", "samples") if c not in frame.columns]
    if missing:
        raise RunRecordError(f"{parquet}: metrics table lacks the columns {missing}")
    return frame


def run_keys(record: dict, run_dir: Path) -> dict:
    """The identifying columns of a run plus its flattened config."""
    keys = {"algorithm": record["algorithm"], "env": record["env"], "experiment": record.get("experiment"),
            "config_hash": record["config_hash"], "run_hash": record.get("run_hash"), "run_dir": str(run_dir)}
    target = record.get("target") if isinstance(record.get("target"), dict) else {}
    keys.update({f"target.{k}": _nan_if_none(target.get(k)) for k in TARGET_FIELDS})
    config = {k: v for k, v in record["config"].items() if k != "seeds"}
    keys.update(flatten_config(config))
    return keys


def _nan_if_none(value):
    return float("nan") if value is None else value


def seed_rows(record: dict, metrics: pd.DataFrame) -> list[dict]:
    """One dict per seed of the run: status, the step of divergence/failure/saturation/stall, message (or the
    status record's reason), rows, last samples."""
    seed_col = metrics["seed"].to_numpy()
    samples = metrics["samples"].to_numpy()
    rows = []
    for seed in record["seeds"]:
        st = record["status"].get(str(seed)) or {"status": "failed", "message": "no status recorded"}
        mine = samples[seed_col == seed]
        rows.append({"seed": int(seed), "status": st.get("status", "failed"), "status_step": st.get("step"),
                     "message": st.get("message") or st.get("reason"), "n_points": int(mine.size),
                     "last_samples": int(mine.max()) if mine.size else 0})
    return rows


def load(root, strict: bool = False) -> Loaded:
    """All runs under root. A run whose run.json or metrics.parquet cannot be read is skipped
    with a warning naming the file; strict=True raises RunRecordError instead."""
    frames, run_rows, seed_list, skipped, older = [], [], [], [], []
    for run_json in find_runs(root):
        run_dir = run_json.parent
        try:
            record = read_record(run_json)
            metrics = read_metrics(run_dir / "metrics.parquet", record)
        except RunRecordError as exc:
            if strict:
                raise
            warnings.warn(f"skipping run: {exc}", stacklevel=2)
            skipped.append((str(run_json.parent), str(exc)))
            continue
        i = len(run_rows)
        run_rows.append(run_keys(record, run_dir))
        for row in seed_rows(record, metrics):
            row["_run"] = i
            seed_list.append(row)
        metrics["_run"] = i
        lacking = [m for m in NEW_METRICS if m not in metrics.columns]
        if HARNESS_METRICS <= set(metrics.columns) and lacking:
            older.append((str(run_dir), lacking))
        frames.append(metrics)
    if not run_rows:
        empty_cols = ["seed", "status", "status_step", "message", "n_points", "last_samples", *RUN_KEYS]
        return Loaded(pd.DataFrame(columns=["seed", "samples", *RUN_KEYS, "status"]),
                      pd.DataFrame(columns=empty_cols), skipped)
    runs = pd.DataFrame(run_rows)  # (runs, keys)
    seeds = pd.DataFrame(seed_list)
    seeds = pd.concat([seeds.drop(columns="_run"), runs.iloc[seeds["_run"].to_numpy()].reset_index(drop=True)], axis=1)
    metrics = pd.concat(frames, ignore_index=True)
    if older:
        for m in NEW_METRICS:
            if m not in metrics.columns:
                metrics[m] = float("nan")
        lacking = [m for m in NEW_METRICS if any(m in missing for _, missing in older)]
        warnings.warn(f"{len(older)} run(s) predate the metric columns {', '.join(lacking)} (e.g. {older[0][0]}): "
                      f"they are NaN there; re-run to compute them", stacklevel=2)
    run_idx = metrics.pop("_run").to_numpy()
    metrics = pd.concat([metrics, runs.iloc[run_idx].reset_index(drop=True)], axis=1)
    status = seeds.set_index(["run_dir", "seed"])["status"]
    key = pd.MultiIndex.from_arrays([metrics["run_dir"], metrics["seed"]])
    metrics["status"] = status.reindex(key).fillna("failed").to_numpy()
    return deduplicate(Loaded(metrics, seeds, skipped))


def deduplicate(loaded: Loaded) -> Loaded:
    """Keep one copy of each (run_hash, seed): a run folder copied next to another (or the same sweep
    found twice under a parent folder) is the same evidence, and counting it twice would shrink every
    CI. The copy tagged with an experiment is kept (a claim finds its evidence by that tag), else the first
    folder in path order; one warning names the copies."""
    seeds = loaded.seeds
    if seeds.empty or "run_hash" not in seeds.columns:
        return loaded
    keyed = seeds[seeds["run_hash"].notna()]
    untagged = keyed["experiment"].isna().to_numpy() if "experiment" in keyed.columns else np.zeros(len(keyed), bool)
    order = np.argsort(untagged, kind="stable")  # tagged copies first, path order within each
    dup = pd.Series(keyed.iloc[order].duplicated(subset=["run_hash", "seed"], keep="first").to_numpy(),
                    index=keyed.index[order]).reindex(keyed.index)
    if not dup.any():
        return loaded
    dropped = keyed[dup]
    copies = {}
    for run_hash, rows in keyed[keyed["run_hash"].isin(set(dropped["run_hash"]))].groupby("run_hash"):
        copies[run_hash] = sorted(set(rows["run_dir"]))
    text = "; ".join(f"run_hash {h}: {', '.join(dirs)}" for h, dirs in copies.items())
    warnings.warn(f"duplicate runs: {int(dup.sum())} (run, seed) rows are copies of runs already loaded and are "
                  f"counted once (kept the one tagged with an experiment, else the first folder): {text}", stacklevel=2)
    drop_keys = pd.MultiIndex.from_arrays([dropped["run_dir"], dropped["seed"]])
    metrics = loaded.metrics
    keep_seed = ~pd.MultiIndex.from_arrays([seeds["run_dir"], seeds["seed"]]).isin(drop_keys)
    keep_metric = ~pd.MultiIndex.from_arrays([metrics["run_dir"], metrics["seed"]]).isin(drop_keys)
    return Loaded(metrics[keep_metric].reset_index(drop=True), seeds[keep_seed].reset_index(drop=True), loaded.skipped)


def load_runs(root, strict: bool = False) -> pd.DataFrame:
    """One row per (run, seed, evaluation point): the metrics.parquet columns plus algorithm,
    env, experiment, config_hash, run_hash, run_dir, status and cfg.<dotted.key> columns.
    Seeds without rows (diverged before the first evaluation) are only in the per-seed status
    table: `load_seed_status(root)`, or `load(root)` for both at once (one pass over the files)."""
    return load(root, strict=strict).metrics


def load_seed_status(root, strict: bool = False) -> pd.DataFrame:
    """The per-seed status table alone: one row per (run, seed)."""
    return load(root, strict=strict).seeds
