"""Runs grouped for a table or a figure (by algorithm, env, configuration or any cfg.* column), each
group's curves and its rate fit (fit.py), and the rows of `ratebench fit` / analysis.fit."""
from __future__ import annotations

import warnings

import numpy as np

from ratebench.analysis.curves import Curves, build_curves
from ratebench.analysis.fit import FitOptions, RateFit, fit_rate, window_sensitivity
from ratebench.analysis.labels import group_config, group_labels, natural_order
from ratebench.analysis.load import Loaded


def group_curves(loaded: Loaded, metric: str, x_name: str, by: list[str]) -> list[tuple[dict, object]]:
    """(group key dict, curves) for every group of runs, each key with its `label` (named by what
    differs between the groups, analysis/labels.py), in the natural order of the labels."""
    out, configs = [], []
    seeds = loaded.seeds.copy()
    metrics = loaded.metrics
    for key, seed_rows in seeds.groupby(by, dropna=False, sort=True):
        configs.append(group_config(seed_rows))
        key = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        runs = set(seed_rows["run_dir"])
        rows = metrics[metrics["run_dir"].isin(runs)]
        curves = build_curves(rows, seed_rows, metric, x_name)
        if len(runs) > 1:
            warn_identical_curves(curves, f"group {key}")
        key["config_hashes"] = sorted(set(seed_rows["config_hash"]))
        for col in ("algorithm", "env"):  # pooled over them: name what was pooled
            key.setdefault(col, ",".join(sorted(set(map(str, seed_rows[col])))))
        out.append((key, curves))
    hashes = [k.get("config_hash") or ",".join(k["config_hashes"]) for k, _ in out]
    for (key, _), label in zip(out, group_labels(configs, hashes)):
        key["label"] = label
    return sorted(out, key=lambda r: natural_order(r[0]["label"]))


def fit_groups(loaded: Loaded, metric: str, x_name: str, by: list[str], opts: FitOptions,
               sensitivity: bool = False) -> list[tuple[dict, RateFit, object]]:
    """(group key dict, fit, curves) for every group of runs (group_curves); seeds of one run with
    bit-identical curves count once, as in `check` and `report` (distinct_curves; fit.n_copies says how many
    were dropped, and the curves returned are the ones fitted)."""
    out = []
    for key, curves in group_curves(loaded, metric, x_name, by):
        curves, copies = distinct_curves(curves)
        fit = fit_rate(curves, opts)
        fit.n_copies = sum(before - after for before, after in copies.values())
        if sensitivity and fit.status != "no_data":
            fit.arrays["sensitivity"] = window_sensitivity(curves, opts)
        out.append((key, fit, curves))
    return out


def fit_rows(results, metric: str, x_name: str) -> list[dict]:
    rows = []
    skip = ("algorithm", "env", "config_hash", "config_hashes", "label")
    for key, fit, _ in results:
        row = {"label": key.get("label"), "algorithm": key.get("algorithm"), "env": key.get("env"),
               "config_hash": key.get("config_hash"), **{k: v for k, v in key.items() if k not in skip},
               "config_hashes": key["config_hashes"], "metric": metric, "x": x_name}
        r = fit.row()
        r.pop("metric"), r.pop("x_name")
        row.update(r)
        rows.append(row)
    return rows


def identical_curves(curves) -> list[tuple[int, str, str]]:
    """(seed, run_dir, run_dir) for every pair of fitted rows from different runs that share a seed
    and have the same curve to the last bit: pooled configurations whose knob did not change the
    result (or a copy with another run_hash). Pooling them counts one seed's evidence twice."""
    fitted = curves.seeds[curves.used].reset_index(drop=True)
    first: dict[tuple, str] = {}
    pairs = []
    for i, (seed, run_dir) in enumerate(zip(fitted["seed"], fitted["run_dir"])):
        if not np.isfinite(curves.values[i]).any():  # no data (e.g. grad_sq of DPO): nothing is duplicated
            continue
        key = (int(seed), np.nan_to_num(curves.values[i], nan=-1.0, posinf=-2.0).tobytes())
        if key in first and first[key] != run_dir:
            pairs.append((int(seed), first[key], str(run_dir)))
        first.setdefault(key, str(run_dir))
    return pairs


def distinct_curves(curves: Curves) -> tuple[Curves, dict]:
    """The curves with the seeds of one run (same run_dir and instance) that gave bit-identical curves
    counted once (the first kept): a deterministic method started at one point gives one curve however
    many seeds it is run with, and a seed bootstrap over copies would count one observation as many.
    Failed seeds and curves without any finite value are kept as they are. Returns (curves, {instance:
    (seeds before, distinct seeds)} for the instances that had copies; {} when nothing was dropped)."""
    used = np.asarray(curves.used, bool)
    fitted = curves.seeds[used].reset_index(drop=True)
    keep = np.ones(curves.n_seeds, bool)
    seen = set()
    for i, run_dir in enumerate(fitted["run_dir"].astype(str)):
        if not np.isfinite(curves.values[i]).any():
            continue
        key = (run_dir, int(curves.instances[i]), np.nan_to_num(curves.values[i], nan=-1.0, posinf=-2.0).tobytes())
        keep[i] = key not in seen
        seen.add(key)
    if keep.all():
        return curves, {}
    rows = np.ones(len(curves.seeds), bool)
    rows[np.flatnonzero(used)[~keep]] = False
    out = Curves(curves.metric, curves.x_name, curves.x, curves.values[keep], curves.strata[keep],
                 curves.seeds[rows].reset_index(drop=True), used[rows], curves.instances[keep],
                 curves.nonfinite[keep], None if curves.noise is None else curves.noise[keep])
    info = {}
    for inst in np.unique(curves.instances[~keep]):
        inst_key = inst.item() if hasattr(inst, "item") else inst
        info[inst_key] = (int((curves.instances == inst).sum()), int((out.instances == inst).sum()))
    return out, info


def warn_identical_curves(curves, what: str) -> None:
    pairs = identical_curves(curves)
    if pairs:
        shown = "; ".join(f"seed {s}: {a} = {b}" for s, a, b in pairs[:3]) + (" ..." if len(pairs) > 3 else "")
        warnings.warn(f"{what}: {len(pairs)} seed curves are identical across pooled runs (the same seed gave the "
                      f"same result in different configurations, so the pooled CI counts it more than once): {shown}",
                      stacklevel=2)


