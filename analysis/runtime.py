"""Fixed-target runtimes that count failures (COCO, Hansen et al. 2021): per ε, the expected running
time ERT(ε) = (samples spent by all seeds, each until it reached ε or its whole budget if it never
did) / (seeds that reached ε), and the runtime ECDF of a group: the fraction of (seed, ε-target)
pairs reached by n samples. "Reached" is the fit's n_hit: the first evaluation after which the
metric stays ≤ ε (curves.n_hit), over the same per-seed curves the fit uses. A seed that never
reaches ε (slow, diverged, saturated, stalled) adds its budget to the numerator and nothing to the
denominator: it counts instead of vanishing. Pure functions over arrays."""
from __future__ import annotations

import numpy as np
from ratebench.analysis.curves import eps_grid, n_hit

UNHEALTHY = ("diverged", "saturated", "stalled")


def seed_budget(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(S,) what each seed spent: the largest x at which it has a recorded value (finite, or the +inf
    the fit writes after a divergence up to its configuration's last evaluation); 0 without any."""
    recorded = ~np.isnan(values)  # (S, P)
    last = np.where(recorded.any(1), values.shape[1] - 1 - np.argmax(recorded[:, ::-1], axis=1), -1)
    return np.where(last >= 0, np.asarray(x, float)[np.maximum(last, 0)], 0.0)


def expected_runtime(x: np.ndarray, values: np.ndarray, eps: np.ndarray,
                     budget: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """ERT per ε level. x (P,) ascending, values (S, P), eps (E,), budget (S,) what each seed spent
    (default seed_budget). Returns {"eps", "ert" (E,) +inf where no seed reached ε, "reached" (E,)
    seeds that reached ε, "spent" (E,) the numerator, "n_seeds"}."""
    x, values, eps = np.asarray(x, float), np.asarray(values, float), np.asarray(eps, float)
    budget = seed_budget(x, values) if budget is None else np.asarray(budget, float)
    nh = n_hit(x, values, eps) if values.size else np.full((values.shape[0], len(eps)), np.inf)  # (S, E)
    reached = np.isfinite(nh)
    cost = np.where(reached, np.minimum(nh, budget[:, None]), budget[:, None])  # (S, E)
    spent = cost.sum(0)
    hits = reached.sum(0)
    ert = np.full(len(eps), np.inf)
    np.divide(spent, hits, out=ert, where=hits > 0)
    return {"eps": eps, "ert": ert, "reached": hits, "spent": spent, "n_seeds": values.shape[0]}


def runtime_ecdf(x: np.ndarray, values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(P,) the fraction of (seed, target) pairs reached by each evaluation point x: the runtime
    ECDF, exact at the points where n_hit can take values. Below 1 at the end = failures."""
    x, values, targets = np.asarray(x, float), np.asarray(values, float), np.asarray(targets, float)
    pairs = values.shape[0] * len(targets)
    if not pairs:
        return np.zeros(len(x))
    nh = np.sort(n_hit(x, values, targets).ravel())
    return np.searchsorted(nh, x, side="right") / pairs


def shared_targets(matrices: list[np.ndarray], x_list: list[np.ndarray], per_decade: int = 10,
                   lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """ε targets shared by every group of a figure (largest first), on the grid 10^(k/per_decade):
    from the median starting value over all seeds (their first evaluation at x > 0) down to the
    smallest last finite value of any seed, unless lo / hi are given (a claim's ε range). [] without data."""
    starts, ends = [], []
    for x, v in zip(x_list, matrices):
        if not v.size:
            continue
        pos = np.asarray(x) > 0
        first = v[:, pos][:, 0] if pos.any() else np.full(v.shape[0], np.nan)
        starts.append(first[np.isfinite(first) & (first > 0)])
        good = np.isfinite(v) & (v > 0)
        has = good.any(1)
        last = v.shape[1] - 1 - np.argmax(good[:, ::-1], axis=1)  # each seed's last finite positive value
        ends.append(v[np.flatnonzero(has), last[has]])
    starts = np.concatenate(starts) if starts else np.zeros(0)
    ends = np.concatenate(ends) if ends else np.zeros(0)
    hi = hi if hi is not None else (float(np.median(starts)) if starts.size else None)
    lo = lo if lo is not None else (float(ends.min()) if ends.size else None)
    if hi is None or lo is None or not (np.isfinite(hi) and np.isfinite(lo)) or hi <= 0 or lo <= 0:
        return np.zeros(0)
    grid = eps_grid(np.array([min(lo, hi), max(lo, hi)]), per_decade)
    keep = (grid >= min(lo, hi) * (1 - 1e-9)) & (grid <= max(lo, hi) * (1 + 1e-9))
    return grid[keep] if keep.any() else np.array([max(lo, hi)])


def runtime_matrix(curves) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, values (S', P), budget (S',)) of a group for ERT and ECDF: the fitted seeds' curves (the
    fit's matrix), plus one never-reaching row per unhealthy seed the matrix leaves out, charged its
    last recorded sample count (x = samples) or the group's last evaluation (other x)."""
    x, values = curves.x, curves.values
    budget = seed_budget(x, values)
    seeds = curves.seeds
    if not len(seeds):
        return x, values, budget
    used = np.asarray(curves.used, bool)
    extra = seeds[~used & seeds["status"].isin(UNHEALTHY).to_numpy()]
    if extra.empty:
        return x, values, budget
    last_x = float(x.max()) if len(x) else 0.0
    if curves.x_name == "samples" and "last_samples" in extra.columns:
        spent = extra["last_samples"].fillna(last_x).to_numpy(float)
    else:
        spent = np.full(len(extra), last_x)
    nan_rows = np.full((len(extra), values.shape[1]), np.nan)
    return x, np.vstack([values, nan_rows]), np.concatenate([budget, spent])
