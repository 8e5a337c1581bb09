"""Per-group curve matrices (seeds × evaluation points) from the tidy run table, the shared
log-spaced ε grid, and the inversion of curves into n_hit(ε) (SPEC §7)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

METRICS = ("gap", "gap_local", "lower_gap", "grad_sq", "psi_grad_sq", "policy_gap", "target_policy_gap_excess", "psi_gap",
           "reward_err", "kl_ref")
X_AXES = ("samples", "queries", "step")
DEFAULT_GROUP = ("algorithm", "env", "config_hash")
INSTANCE_COLUMN = "cfg.env.instance_seed"  # the environment instance a seed ran on (envs/common.py)


@dataclass
class Curves:
    """One group's evidence. x (P,) sorted evaluation points (0 included); values (S, P): the
    metric of every fitted seed, +inf after a divergence, NaN where the seed has no evaluation;
    seeds: one row per seed of the group (all statuses); used (S_all,) bool: which seed rows
    are in `values` (completed + diverged; failed seeds are counted but not fitted); instances
    (S,): the environment instance (`cfg.env.instance_seed`) of every fitted seed, default one
    instance (all 0)."""

    metric: str
    x_name: str
    x: np.ndarray
    values: np.ndarray
    strata: np.ndarray
    seeds: pd.DataFrame
    used: np.ndarray
    instances: np.ndarray = field(default=None)

    def __post_init__(self):
        if self.instances is None:
            self.instances = seed_instances(self.seeds)[np.asarray(self.used, bool)] if len(self.seeds) \
                else np.zeros(self.values.shape[0], np.int64)
        self.instances = np.asarray(self.instances)

    @property
    def n_seeds(self) -> int:
        return int(self.values.shape[0])

    @property
    def instance_labels(self) -> np.ndarray:
        """The distinct instances among the fitted seeds, sorted. (I,)"""
        return np.unique(self.instances)

    def subset(self, instance) -> Curves:
        """The same curves restricted to one environment instance (its fitted and failed seeds)."""
        keep = self.instances == instance  # (S,)
        rows = seed_instances(self.seeds) == instance  # (S_all,)
        return Curves(self.metric, self.x_name, self.x, self.values[keep], self.strata[keep],
                      self.seeds[rows].reset_index(drop=True), np.asarray(self.used, bool)[rows], self.instances[keep])

    def count(self, status: str) -> int:
        """Seeds with that status; 'failed' also counts any status other than completed/diverged."""
        if status == "failed":
            return int((~self.seeds["status"].isin(["completed", "diverged"])).sum())
        return int((self.seeds["status"] == status).sum())


def seed_instances(seeds: pd.DataFrame) -> np.ndarray:
    """(S_all,) the instance of every seed row: the `cfg.env.instance_seed` column, 0 where it is
    absent or missing (one instance)."""
    if INSTANCE_COLUMN not in seeds.columns:
        return np.zeros(len(seeds), np.int64)
    col = pd.to_numeric(seeds[INSTANCE_COLUMN], errors="coerce").fillna(0)
    return col.to_numpy(dtype=np.int64)


def has_positive(column: pd.Series) -> bool:
    """Whether a metric column has a finite positive value: what a log-scale plot needs (lower_gap
    of reward_mle, whose policy is exactly pi*_nu, is zero up to rounding)."""
    values = column.to_numpy(dtype=float)
    return bool((np.isfinite(values) & (values > 0)).any())


def group_keys(by: str | list[str] | tuple[str, ...] | None) -> list[str]:
    if by is None:
        return list(DEFAULT_GROUP)
    if isinstance(by, str):
        return [k.strip() for k in by.split(",") if k.strip()]
    return list(by)


def build_curves(metrics: pd.DataFrame, seeds: pd.DataFrame, metric: str, x_name: str) -> Curves:
    """The curve matrix of one group: metrics and seeds are the rows of that group only."""
    used_mask = seeds["status"].isin(["completed", "diverged"]).to_numpy()
    fit_seeds = seeds[used_mask]
    key = ["run_dir", "seed"]
    rows = metrics[metrics["status"].isin(["completed", "diverged"])]
    x = np.unique(rows[x_name].to_numpy(dtype=np.float64)) if len(rows) else np.zeros(0)
    index = pd.MultiIndex.from_frame(fit_seeds[key])
    table = rows.pivot_table(index=key, columns=x_name, values=metric, aggfunc="last", dropna=False)
    table = table.reindex(index=index, columns=x)
    values = table.to_numpy(dtype=np.float64)  # (S, P)
    values = mark_divergence(values, x, fit_seeds, rows, x_name)
    strata = fit_seeds["config_hash"].astype(str).to_numpy()
    return Curves(metric, x_name, x, values, strata, seeds.reset_index(drop=True), used_mask,
                  seed_instances(fit_seeds))


def mark_divergence(values: np.ndarray, x: np.ndarray, fit_seeds: pd.DataFrame, rows: pd.DataFrame,
                    x_name: str) -> np.ndarray:
    """A diverged seed's metric is +inf at every point of its configuration after its last row:
    it never stays below any ε, so it is censored, never silently dropped."""
    values = values.copy()
    stratum_end = rows.groupby("config_hash")[x_name].max()
    for i, (status, cfg) in enumerate(zip(fit_seeds["status"], fit_seeds["config_hash"])):
        if status != "diverged":
            continue
        valid = np.flatnonzero(~np.isnan(values[i]))
        last = x[valid[-1]] if len(valid) else -np.inf
        after = (x > last) & (x <= stratum_end.get(cfg, -np.inf))
        if not len(valid):
            after = x <= stratum_end.get(cfg, np.inf)
        values[i, after] = np.inf
    return values


def eps_grid(values: np.ndarray, per_decade: int = 10) -> np.ndarray:
    """Shared log-spaced ε levels 10^(k/per_decade) (the same numbers for every group) spanning
    the finite positive values of the curves, largest first. (E,)"""
    v = values[np.isfinite(values) & (values > 0)]
    if v.size == 0:
        return np.zeros(0)
    k_lo = int(np.floor(np.log10(v.min()) * per_decade))
    k_hi = int(np.ceil(np.log10(v.max()) * per_decade))
    return 10.0 ** (np.arange(k_hi, k_lo - 1, -1) / per_decade)


def n_hit(x: np.ndarray, values: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """n_hit (S, E): for each seed and ε, the first evaluated x after which the metric stays ≤ ε
    (evaluated points only; NaN points are skipped). +inf when the seed is not ≤ ε at its last
    evaluation. x (P,) ascending, values (S, P), eps (E,)."""
    S, P = values.shape
    valid = ~np.isnan(values)
    filled = np.where(valid, values, -np.inf)
    running_max = np.maximum.accumulate(filled[:, ::-1], axis=1)[:, ::-1]  # (S, P) max over the future
    above = running_max[:, :, None] > eps[None, None, :]  # (S, P, E), True then False along P
    first = above.sum(axis=1)  # (S, E) index of the first point from which it stays ≤ ε
    next_x = np.where(valid, x[None, :], np.inf)
    next_x = np.minimum.accumulate(next_x[:, ::-1], axis=1)[:, ::-1]  # (S, P) next evaluated x of that seed
    last_valid = np.where(valid.any(1), P - 1 - np.argmax(valid[:, ::-1], axis=1), -1)  # (S,)
    hit = np.take_along_axis(np.concatenate([next_x, np.full((S, 1), np.inf)], 1), first, axis=1)
    return np.where(first <= last_valid[:, None], hit, np.inf)
