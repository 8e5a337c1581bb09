"""Per-group curve matrices (seeds × evaluation points) from the tidy run table, the shared
log-spaced ε grid, and the inversion of curves into n_hit(ε) (docs/analysis.md)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from ratebench.analysis.noise_term import noise_column

METRICS = ("gap", "gap_local", "lower_gap", "grad_sq", "pgrad_sq", "psi_grad_sq", "policy_gap", "value_gap", "target_policy_gap_excess",
           "psi_gap", "reward_err", "kl_ref")
X_AXES = ("samples", "queries", "step")
DEFAULT_GROUP = ("algorithm", "env", "config_hash")
INSTANCE_COLUMN = "cfg.env.instance_seed"  # the environment instance a seed ran on (envs/common.py)


FITTED = ("completed", "diverged", "saturated", "stalled")  # seed statuses whose rows are fitted
CENSORED = ("diverged", "saturated")  # statuses whose metric is +inf after their status step


@dataclass
class Curves:
    """One group's evidence. x (P,) sorted evaluation points (0 included); values (S, P): the
    metric of every fitted seed, +inf after a divergence, a saturation or a non-finite value, NaN
    where the seed has no evaluation; seeds: one row per seed of the group (all statuses); used
    (S_all,) bool: which seed rows are in `values` (completed, diverged, saturated, stalled; failed
    seeds are counted but not fitted); instances (S,): the environment instance
    (`cfg.env.instance_seed`) of every fitted seed, default one instance (all 0); nonfinite (S,)
    bool: fitted seeds whose recorded metric became non-finite (NaN after a finite value, or ±inf);
    noise (S, P) or None: the algorithm's predicted noise term of the metric (analysis/noise_term.py)."""

    metric: str
    x_name: str
    x: np.ndarray
    values: np.ndarray
    strata: np.ndarray
    seeds: pd.DataFrame
    used: np.ndarray
    instances: np.ndarray = field(default=None)
    nonfinite: np.ndarray = field(default=None)
    noise: np.ndarray | None = field(default=None)

    def __post_init__(self):
        if self.instances is None:
            self.instances = seed_instances(self.seeds)[np.asarray(self.used, bool)] if len(self.seeds) \
                else np.zeros(self.values.shape[0], np.int64)
        self.instances = np.asarray(self.instances)
        if self.nonfinite is None:
            self.nonfinite = np.zeros(self.values.shape[0], bool)
        self.nonfinite = np.asarray(self.nonfinite, bool)

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
                      self.seeds[rows].reset_index(drop=True), np.asarray(self.used, bool)[rows], self.instances[keep],
                      self.nonfinite[keep], None if self.noise is None else self.noise[keep])

    def count(self, status: str) -> int:
        """Seeds with that status; 'failed' also counts any status other than the fitted ones."""
        if status == "failed":
            return int((~self.seeds["status"].isin(FITTED)).sum())
        return int((self.seeds["status"] == status).sum())

    def health(self) -> dict[str, int]:
        """Seed-health counts of the group: diverged, saturated (the status, plus a completed or
        stalled seed whose metric became non-finite), stalled, unhealthy (their sum), failed."""
        status = self.seeds["status"].to_numpy()[np.asarray(self.used, bool)] if len(self.seeds) \
            else np.array([], object)
        extra = int((self.nonfinite & np.isin(status, ("completed", "stalled"))).sum()) if len(status) == \
            len(self.nonfinite) else 0
        counts = {"diverged": self.count("diverged"), "saturated": self.count("saturated") + extra,
                  "stalled": self.count("stalled"), "failed": self.count("failed")}
        counts["unhealthy"] = counts["diverged"] + counts["saturated"] + counts["stalled"]
        return counts


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
    """The curve matrix of one group: metrics and seeds are the rows of that group only. A seed
    that diverged or saturated is +inf after its status step (and after its last row); a recorded
    non-finite value (±inf, or NaN after a finite value of the same seed) makes the seed +inf from
    there on, and is counted (Curves.nonfinite): it never reaches ε after that."""
    used_mask = seeds["status"].isin(FITTED).to_numpy()
    fit_seeds = seeds[used_mask]
    key = ["run_dir", "seed"]
    rows = metrics[metrics["status"].isin(FITTED)]
    x = np.unique(rows[x_name].to_numpy(dtype=np.float64)) if len(rows) else np.zeros(0)
    index = pd.MultiIndex.from_frame(fit_seeds[key])
    cols = key + ["config_hash", x_name] + (["step"] if "step" in rows.columns and x_name != "step" else [])
    tidy = rows[cols].copy()
    tidy["_v"] = pd.to_numeric(rows[metric], errors="coerce").to_numpy(dtype=np.float64) if len(rows) else []
    tidy = tidy.sort_values(key + [x_name], kind="stable")
    finite = np.isfinite(tidy["_v"].to_numpy())
    seen = pd.Series(finite, index=tidy.index).groupby([tidy["run_dir"], tidy["seed"]]).cummax().to_numpy(bool) \
        if len(tidy) else np.zeros(0, bool)
    bad = ~finite & (np.isinf(tidy["_v"].to_numpy()) | seen)  # NaN before any finite value: not recorded
    tidy.loc[bad, "_v"] = np.inf
    table = tidy.pivot_table(index=key, columns=x_name, values="_v", aggfunc="last", dropna=False)
    table = table.reindex(index=index, columns=x)
    values = table.to_numpy(dtype=np.float64)  # (S, P)
    first_bad = tidy[bad].groupby(key)[x_name].min().reindex(index).to_numpy(dtype=np.float64)  # (S,) NaN: none
    values = mark_censored(values, x, fit_seeds, tidy, x_name, first_bad)
    strata = fit_seeds["config_hash"].astype(str).to_numpy()
    noise = None
    if noise_column(metric) in rows.columns:  # the algorithm's noise term of this metric, as recorded (not censored)
        tidy["_n"] = pd.to_numeric(rows.loc[tidy.index, noise_column(metric)], errors="coerce").to_numpy(np.float64)
        noise = tidy.pivot_table(index=key, columns=x_name, values="_n", aggfunc="last", dropna=False)
        noise = noise.reindex(index=index, columns=x).to_numpy(dtype=np.float64)
    return Curves(metric, x_name, x, values, strata, seeds.reset_index(drop=True), used_mask,
                  seed_instances(fit_seeds), np.isfinite(first_bad), noise)


def mark_censored(values: np.ndarray, x: np.ndarray, fit_seeds: pd.DataFrame, rows: pd.DataFrame,
                  x_name: str, first_bad: np.ndarray | None = None) -> np.ndarray:
    """A diverged or saturated seed's metric is +inf at every point of its configuration after its
    status step (a saturated seed's rows after it are not data) and after its last row; any seed is
    +inf from its first non-finite value (first_bad (S,), NaN = none) on. It never stays below any
    ε, so it is censored, never silently dropped. rows: the group's rows (x_name, run_dir, seed,
    config_hash, and `step` when recorded)."""
    values = values.copy()
    stratum_end = rows.groupby("config_hash")[x_name].max()
    first_bad = np.full(len(fit_seeds), np.nan) if first_bad is None else first_bad
    has_step = "step" in rows.columns
    steps = fit_seeds["status_step"] if "status_step" in fit_seeds.columns else pd.Series([None] * len(fit_seeds))
    by_seed = rows.groupby(["run_dir", "seed"]) if len(rows) else None
    for i, (status, cfg, step) in enumerate(zip(fit_seeds["status"], fit_seeds["config_hash"], steps)):
        end = stratum_end.get(cfg, np.inf)
        if np.isfinite(first_bad[i]):
            values[i, (x >= first_bad[i]) & (x <= end)] = np.inf
        if status not in CENSORED:
            continue
        valid = np.flatnonzero(~np.isnan(values[i]))
        last = x[valid[-1]] if len(valid) else -np.inf
        after = (x > last) & (x <= end)
        if not len(valid):
            after = x <= end
        if status == "saturated" and has_step and step is not None and pd.notna(step) and by_seed is not None:
            key = (fit_seeds["run_dir"].iloc[i], fit_seeds["seed"].iloc[i])
            if key in by_seed.groups:
                mine = rows.loc[by_seed.groups[key]]
                later = mine.loc[mine["step"] > float(step), x_name]
                if len(later):
                    after |= (x >= later.min()) & (x <= end)
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
