"""Linear (geometric) convergence: metric ≈ A·ρ^n, so log metric is linear in n and n_hit(ε) is linear in
log10(1/ε) with slope k = −1/log10 ρ, the iterations (samples, steps: the x axis) per decade of ε. The same
n_hit, seed IQM, window rules and seed bootstrap as the power-law fit (fit.py), with n_hit itself, not its
log, regressed on log10(1/ε)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from ratebench.analysis.curves import Curves, n_hit
from ratebench.analysis.fit import (
    FitOptions,
    asymptotic_points,
    fit_floor,
    level_table,
    resample_counts,
    split_slopes,
)
from ratebench.analysis.stats import batched_slope, percentile_ci, trimmed_mean


@dataclass
class GeometricFit:
    """rho: the contraction factor per unit of x (metric ≈ A·rho^n), with its bootstrap CI;
    per_decade: −1/log10(rho), the x needed per decade of ε (CI [per_decade_low, per_decade_high]);
    status ok | too_few_seeds | too_few_levels | too_narrow | no_data, with a reason; asymptotic: the
    per-decade cost is the same on the window's two halves (relative to the bootstrap noise)."""

    metric: str
    x_name: str
    status: str
    reason: str
    rho: float = np.nan
    rho_low: float = np.nan
    rho_high: float = np.nan
    per_decade: float = np.nan
    per_decade_low: float = np.nan
    per_decade_high: float = np.nan
    eps_low: float = np.nan
    eps_high: float = np.nan
    n_levels: int = 0
    n_seeds: int = 0
    window_decades: float = np.nan
    asymptotic: bool = True
    asymptotic_reason: str = ""
    boot_unit: str = "seed"
    reach_eps_min: float = np.nan  # fraction of seeds that stay ≤ opts.eps_min at the end (a claim's ε_min)
    n_instances: int = 1
    n_diverged: int = 0  # seed health (Curves.health), as in RateFit
    n_failed: int = 0
    n_saturated: int = 0
    n_stalled: int = 0
    n_unhealthy: int = 0
    arrays: dict = field(default_factory=dict, repr=False)

    def row(self) -> dict:
        keys = ["metric", "x_name", "status", "rho", "rho_low", "rho_high", "per_decade", "per_decade_low",
                "per_decade_high", "eps_low", "eps_high", "n_levels", "n_seeds", "window_decades", "asymptotic",
                "asymptotic_reason", "boot_unit", "reason", "n_diverged", "n_saturated", "n_stalled", "n_failed"]
        return {k: getattr(self, k) for k in keys}


def rho_from_per_decade(k: np.ndarray) -> np.ndarray:
    """rho = 10^(−1/k): k = +inf (an unreached level) gives rho = 1, no contraction shown."""
    k = np.asarray(k, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(k > 0, 10.0 ** (-1.0 / np.where(k > 0, k, 1.0)), np.nan)
    return np.where(np.isinf(k) & (k > 0), 1.0, out)


def crossing_points(x: np.ndarray, values: np.ndarray, nh: np.ndarray, eps: np.ndarray) -> np.ndarray:
    """n_hit (the first evaluated x from which the metric stays ≤ ε) → where the curve crossed ε inside
    the interval (previous evaluated x, n_hit], interpolating log metric linearly in n between the two
    points (exact for a noiseless geometric curve; the previous point is > ε by the definition of n_hit).
    On a log-spaced evaluation grid n_hit itself overstates a geometric crossing by up to a grid step, a
    fixed fraction of n (+13 % on average at 10 points per decade), which biases the per-decade cost.
    Where the previous point is missing or not usable, the interval's midpoint. +inf stays +inf.
    x (P,) ascending, values (S, P), nh (S, E), eps (E,) → (S, E)."""
    finite = np.isfinite(nh)
    idx = np.clip(np.searchsorted(x, np.where(finite, nh, x[0])), 1, len(x) - 1)  # (S, E) n_hit's grid index
    rows = np.arange(values.shape[0])[:, None]
    vp, vh = values[rows, idx - 1], values[rows, idx]  # (S, E)
    xp, xh = x[idx - 1], x[idx]
    usable = finite & np.isfinite(vp) & (vp > eps[None, :]) & np.isfinite(vh) & (vh > 0) & (vh <= eps[None, :])
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = (np.log(np.where(usable, vp, 2.0)) - np.log(eps[None, :])) / \
            (np.log(np.where(usable, vp, 2.0)) - np.log(np.where(usable, vh, 1.0)))
    frac = np.where(usable & np.isfinite(frac), np.clip(frac, 0.0, 1.0), 0.5)
    at_first = finite & (nh <= x[x > 0].min() if (x > 0).any() else True)  # left-censored: keep as is
    out = np.where(finite, xp + frac * (xh - xp), nh)
    return np.where(at_first, nh, out)


def fit_geometric(curves: Curves, opts: FitOptions = FitOptions()) -> GeometricFit:
    """ρ with a bootstrap CI for one group of seeds (resampled as in fit.fit_rate: seeds within each
    configuration, instances first when there are several). The window is the levels passing the
    power-law fit's rules (reach, floor, asymptotic, stays, claim range), fixed from the point
    estimate; n_hit is interpolated inside its evaluation interval (crossing_points); a
    replicate in which a window level is unreached (its IQM n_hit is +inf) has k = +inf, ρ = 1. Stability: the slope of n_hit on log10(1/ε) over the window's two halves, as in
    fit.stable_window (no cut: a geometric rate shows on any part of the window)."""
    health = curves.health()
    base = dict(metric=curves.metric, x_name=curves.x_name, n_seeds=curves.n_seeds,
                n_instances=max(len(curves.instance_labels), 1), n_diverged=health["diverged"],
                n_failed=health["failed"], n_saturated=health["saturated"], n_stalled=health["stalled"],
                n_unhealthy=health["unhealthy"])
    vals, x = curves.values, curves.x
    if curves.n_seeds == 0 or not np.isfinite(vals).any():
        return GeometricFit(status="no_data", reason=f"no finite values of {curves.metric}", **base)
    rng = np.random.default_rng(opts.seed)
    counts, n_units, unit = resample_counts(curves, opts.n_boot, rng)  # (R, S)
    asym = asymptotic_points(x, opts.decades)
    ones = np.ones((1, curves.n_seeds), np.int32)
    _, c, _ = fit_floor(x[asym], trimmed_mean(vals[:, asym], ones))
    levels = level_table(curves, opts, float(c[0]))
    window = levels["window"].to_numpy()
    eps = levels["eps"].to_numpy()
    fit = GeometricFit(status="ok", reason="", n_levels=int(window.sum()), boot_unit=unit, **base)
    fit.arrays.update(levels=levels, curve_x=x)
    if opts.eps_min is not None:
        fit.reach_eps_min = float(np.isfinite(n_hit(x, vals, np.array([opts.eps_min]))).mean())
    if fit.n_levels:
        fit.eps_low, fit.eps_high = float(eps[window].min()), float(eps[window].max())
        fit.window_decades = float(np.log10(fit.eps_high / fit.eps_low))
    if curves.n_seeds < opts.min_seeds:
        fit.status, fit.reason = "too_few_seeds", f"{curves.n_seeds} seeds fitted, need ≥ {opts.min_seeds}"
    if fit.n_levels < opts.min_levels:
        fit.status, fit.reason = "too_few_levels", f"{fit.n_levels} usable ε levels, need ≥ {opts.min_levels}"
        return fit
    nh = crossing_points(x, vals, levels.attrs["n_hit"], eps)[:, window]  # (S, W)
    u = -np.log10(eps[window])  # (W,)
    iqm0 = trimmed_mean(nh, ones)[0]  # (W,)
    iqm_r = trimmed_mean(nh, counts)  # (R, W)
    k0, _ = batched_slope(u, iqm0[None])
    k_r, _ = batched_slope(u, np.where(np.isfinite(iqm_r), iqm_r, np.nan))
    k_r = np.where(np.isinf(iqm_r).any(1), np.inf, k_r)  # (R,)
    fit.per_decade = float(k0[0])
    fit.per_decade_low, fit.per_decade_high = percentile_ci(k_r, opts.alpha, n_units)
    fit.rho = float(rho_from_per_decade(k0)[0])
    fit.rho_low, fit.rho_high = (float(v) for v in rho_from_per_decade([fit.per_decade_low, fit.per_decade_high]))
    all_w = np.ones(len(u), bool)
    split = split_slopes(u, all_w, iqm0, iqm_r, np.isfinite(iqm_r) | np.isinf(iqm_r))
    d_low, d_high = percentile_ci(split["d_reps"], opts.alpha, n_units)
    tol = opts.stable_tol * abs(fit.per_decade)
    fit.arrays["stability"] = {"top": split["top"], "bottom": split["bottom"], "d_low": d_low, "d_high": d_high,
                               "tol": tol}
    if d_low > tol or d_high < -tol:
        fit.asymptotic = False
        fit.asymptotic_reason = (f"the cost per decade of ε changes across the window: {split['top']:.3g} on its upper "
                                 f"half vs {split['bottom']:.3g} on its lower half (difference 95% CI "
                                 f"[{d_low:.3g}, {d_high:.3g}], beyond ±{tol:.2g}): not a geometric rate there")
    if not np.isfinite(fit.per_decade_low):
        fit.status, fit.reason = "too_few_levels", "under half of the bootstrap replicates had 2+ usable ε levels"
    elif fit.status == "ok" and not fit.window_decades >= opts.min_decades * (1 - 1e-9):
        fit.status = "too_narrow"
        fit.reason = (f"the window [{fit.eps_low:.3g}, {fit.eps_high:.3g}] spans {fit.window_decades:.2g} decades "
                      f"of ε, need ≥ {opts.min_decades:g}")
    return fit
