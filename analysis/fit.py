"""Rate fitting (docs/analysis.md): the sample-complexity exponent p (log n_hit vs log 1/ε) and the decay
exponent b with an error floor (metric ≈ c + A·n^-b), seed-bootstrap CIs, window choice and sensitivity."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from ratebench.analysis.curves import Curves, eps_grid, n_hit
from ratebench.analysis.noise_term import end_level, ratio_curve
from ratebench.analysis.stats import (
    batched_slope,
    bootstrap_counts,
    hierarchical_counts,
    percentile_ci,
    trimmed_mean,
)
from scipy import stats as sps

DYNAMIC_RANGE = 1e100  # fit_floor leaves out points this far above a row's smallest value (no overflow)
B_GRID = np.exp(np.linspace(np.log(0.03), np.log(5.0), 101))  # b < 0.03 (p > 33) is a plateau here  # decay exponents searched, log-spaced


@dataclass(frozen=True)
class FitOptions:
    """How the fitting window is chosen and how the CIs are computed (defaults in docs/analysis.md)."""

    reach: float = 0.75  # an ε level is usable when ≥ this fraction of seeds reached it (and ≤ 1−reach hit it at once)
    floor_factor: float = 10.0  # usable ε ≥ floor_factor · ĉ: keeps the fitted floor out of the window
    decades: float = 2.0  # asymptotic points of the curve for b, c and the decay: the last `decades` decades of x
    nhit_decades: float = 4.0  # window: IQM n_hit within the last `nhit_decades` decades of x. A window spans
    # at most (nhit_decades − tail)/p decades of ε, so a decade of ε at p needs p + tail decades of x here;
    # the local-exponent profile, not this rule, is what catches a window still in a transient
    tail: float = 0.5  # n_hit ≤ x_max / 10^tail: evidence that the metric *stays* below ε
    per_decade: int = 20  # ε grid density (shared levels 10^(k/per_decade))
    n_boot: int = 2000  # bootstrap replicates (seeds resampled within each configuration)
    seed: int = 0  # bootstrap RNG seed
    alpha: float = 0.05  # 1 − confidence level
    min_levels: int = 4  # fewer usable ε levels → inconclusive
    min_seeds: int = 4  # fewer fitted seeds → inconclusive
    eps_min: float | None = None  # claim's ε range (in the metric's unit), intersected with the window
    eps_max: float | None = None
    drop_top: int = 0  # drop this many of the largest / smallest window levels (sensitivity)
    drop_bottom: int = 0
    min_decades: float = 1.0  # a window spanning fewer decades of ε is `too_narrow`: neither a PASS nor a CI-based VIOLATED
    profile_width: float = 0.5  # local exponent profile: sub-windows of this many decades of ε ...
    profile_step: float = 0.25  # ... with centres this many decades apart
    stable_tol: float = 0.1  # the window's two halves may differ in slope by this fraction of p̂ (stable_window)
    stable_step: float = 0.25  # decades of ε cut off the window's top per step while its exponent is not stable
    tail_tol: float = 0.25  # asymptotic: p̂ × the decay of the last `decades` decades within 1 ± tail_tol (whole 95 % CI)
    noise_bias: float = 0.075  # window: the bias of p̂ that the metric's excess over the algorithm's noise term (when
    #                          logged) predicts is at most noise_bias · p̂ (noise_window); inf: no such cut
    noise_level_tol: float = 2.0  # asymptotic: the mean metric / noise term over the last `tail` decades in [1/this, this]
    noise_excess_level: float = 0.01  # the excess over the noise term is modelled only when an F-test against a
    #                                   constant ratio rejects at this level (excess_model)


@dataclass
class RateFit:
    """The result for one group; arrays keep what the plots need."""

    metric: str
    x_name: str
    status: str  # ok | too_few_seeds | too_few_levels | too_narrow | no_data
    reason: str
    p: float = np.nan
    p_low: float = np.nan
    p_high: float = np.nan
    log10_C: float = np.nan
    b: float = np.nan
    b_low: float = np.nan
    b_high: float = np.nan
    c: float = np.nan
    c_low: float = np.nan
    c_high: float = np.nan
    A: float = np.nan
    eps_low: float = np.nan
    eps_high: float = np.nan
    n_levels: int = 0
    n_seeds: int = 0
    n_diverged: int = 0
    n_failed: int = 0
    n_saturated: int = 0  # seeds whose iterate left the bounded region or whose metrics became non-finite
    n_stalled: int = 0  # seeds that stopped moving (gradient underflow, parameters unchanged)
    n_unhealthy: int = 0  # diverged + saturated + stalled: seeds that are not `completed` (failed counted apart)
    n_strata: int = 0
    n_copies: int = 0  # seeds of one run whose curve copied another seed's bit for bit, counted once (groups.distinct_curves)
    final_iqm: float = np.nan
    decay: float = np.nan  # −(log-log slope of the IQM curve over the asymptotic points), no floor
    decay_low: float = np.nan
    decay_high: float = np.nan
    window_decades: float = np.nan  # log10(eps_high / eps_low)
    reach_eps_min: float = np.nan  # fraction of seeds that stay ≤ the claim's ε_min (opts.eps_min) at the end
    p_local: float = np.nan  # local exponent trend evaluated at ε_min (or the window's bottom), with CI
    p_local_low: float = np.nan
    p_local_high: float = np.nan
    p_trend: float = np.nan  # d p_local / d log10(1/ε): > 0 means the exponent still rises towards small ε
    budget_to_eps_min: float = np.nan  # x (samples/steps/queries) at which the window would reach the claim's ε_min
    asymptotic: bool = True  # the window lies where the curve follows its rate, not a transient (docs/analysis.md)
    asymptotic_reason: str = ""  # why not, when asymptotic is False
    n_instances: int = 1
    boot_unit: str = "seed"  # what the bootstrap resampled: seed | instance (then seeds within each)
    p_reps: np.ndarray = field(default=None, repr=False)
    arrays: dict = field(default_factory=dict, repr=False)

    def row(self) -> dict:
        keys = ["metric", "x_name", "status", "p", "p_low", "p_high", "log10_C", "b", "b_low", "b_high", "c",
                "c_low", "c_high", "eps_low", "eps_high", "n_levels", "n_seeds", "n_diverged", "n_failed",
                "n_saturated", "n_stalled", "n_unhealthy", "n_strata", "n_copies", "final_iqm", "decay", "decay_low", "decay_high", "window_decades", "reach_eps_min",
                "p_local", "p_local_low", "p_local_high", "p_trend", "budget_to_eps_min", "asymptotic", "asymptotic_reason", "n_instances", "boot_unit", "reason"]
        return {k: getattr(self, k) for k in keys}


def fit_floor(x: np.ndarray, curves: np.ndarray, floor_level: float = 0.01):
    """Fit metric ≈ c + A·x^-b (c ≥ 0, A ≥ 0) to every row of curves (R, P) by relative least
    squares Σ((y − c − A x^-b)/y)², profiling out (c, A) in closed form on a log grid of b,
    refined by a parabola through the best three grid points. The floor is kept only when an
    F-test against c = 0 rejects at `floor_level` (else c = 0): an unsupported floor biases b̂
    upward. The same rule runs in every bootstrap replicate. Rows with fewer than 4 finite
    positive points give NaN. The relative least squares is scale-free, so each row is divided
    by its smallest positive value first; points more than DYNAMIC_RANGE above it (a frozen seed
    at 1e279 next to ordinary values) are left out of that row's fit rather than overflowing.
    Returns (b, c, A), each (R,)."""
    y = np.atleast_2d(np.asarray(curves, dtype=np.float64))
    if y.shape[1] < 4:  # no points (e.g. a single evaluation point, where the asymptotic window is empty): NaN
        nan = np.full(y.shape[0], np.nan)
        return nan, nan.copy(), nan.copy()
    pos = np.isfinite(y) & (y > 0)  # (R, P)
    scale = np.where(pos, y, np.inf).min(1, keepdims=True)  # (R, 1)
    scale = np.where(np.isfinite(scale), scale, 1.0)
    with np.errstate(over="ignore", under="ignore"):
        ys = np.where(pos, y, 1.0) / scale  # ≥ 1 on the positive points; inf beyond the float range
    ok = pos & (ys < DYNAMIC_RANGE)  # (R, P)
    w = np.where(ok, 1.0 / np.where(ok, ys, 1.0), 0.0)  # (R, P) u = scale/y in (1/DYNAMIC_RANGE, 1]
    N = x[None, :] ** -B_GRID[:, None]  # (G, P)
    n = ok.sum(1)
    fits = {}
    for floor in (True, False):
        sse, _, _ = _profile(w, ok, N, floor)  # (R, G)
        g = np.argmin(sse, axis=1)  # (R,)
        b = _parabolic_min(np.log(B_GRID), sse, g)
        b = _refine(w, ok, x, b, floor)
        sse_b, c, A = _profile_at(w, ok, x, b, floor)
        fits[floor] = (b, c, A, sse_b)
    sse1, sse0 = fits[True][3], fits[False][3]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        F = (sse0 - sse1) / (sse1 / np.maximum(n - 3, 1))
    keep_floor = F > sps.f.ppf(1 - floor_level, 1, np.maximum(n - 3, 1))
    b, c, A = (np.where(keep_floor, fits[True][i], fits[False][i]) for i in range(3))
    enough = (n >= 4) & np.isfinite(b) & np.isfinite(c) & np.isfinite(A)
    with np.errstate(over="ignore"):
        c, A = c * scale[:, 0], A * scale[:, 0]
    enough &= np.isfinite(c) & np.isfinite(A)
    return np.where(enough, b, np.nan), np.where(enough, c, np.nan), np.where(enough, A, np.nan)


def _profile(w: np.ndarray, ok: np.ndarray, N: np.ndarray, floor: bool = True):
    """SSE, c, A (R, G) of the relative least squares for every replicate and grid exponent."""
    w2 = w * w
    suu, su = w2.sum(1)[:, None], w.sum(1)[:, None]  # (R, 1)
    suz, szz, sz = w2 @ N.T, w2 @ (N * N).T, w @ N.T  # (R, G)
    return _sse(ok.sum(1)[:, None], suu, su, suz, szz, sz, floor)


def _profile_at(w: np.ndarray, ok: np.ndarray, x: np.ndarray, b: np.ndarray, floor: bool):
    """SSE, c, A (R,) at one exponent per replicate."""
    Nb = x[None, :] ** -b[:, None]  # (R, P)
    w2 = w * w
    return _sse(ok.sum(1), w2.sum(1), w.sum(1), (w2 * Nb).sum(1), (w2 * Nb * Nb).sum(1), (w * Nb).sum(1), floor)


def _sse(n, suu, su, suz, szz, sz, floor: bool):
    """SSE, c, A from the sufficient sums; a degenerate system (singular, or sums beyond the float
    range) gives SSE = +inf, so that it is never the chosen exponent."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if floor:
            c, A = _solve_ca(suu, suz, szz, su, sz)
        else:
            A = np.clip(sz / szz, 0.0, None)
            c = np.zeros_like(A)
        sse = n - 2 * (c * su + A * sz) + c * c * suu + 2 * c * A * suz + A * A * szz
    return np.where(np.isfinite(sse), sse, np.inf), c, A


def _refine(w, ok, x, b, floor: bool, half_width: float = 0.06, n: int = 13) -> np.ndarray:
    """A local grid of n exponents within ±half_width (in log b) around each replicate's b,
    then the parabola again: the coarse grid step (0.052 in log b) is cut 10-fold."""
    offsets = np.linspace(-half_width, half_width, n)  # (n,)
    sses = np.stack([_profile_at(w, ok, x, b * np.exp(o), floor)[0] for o in offsets], axis=1)  # (R, n)
    g = np.argmin(sses, axis=1)
    return b * _parabolic_min(offsets, sses, g)


def _solve_ca(suu, suz, szz, su, sz):
    """argmin over c ≥ 0, A ≥ 0 of Σ(1 − c·u − A·z)² from its sufficient sums."""
    det = suu * szz - suz * suz
    with np.errstate(invalid="ignore", divide="ignore"):
        c = (su * szz - sz * suz) / det
        A = (suu * sz - suz * su) / det
        A_only = sz / szz  # c = 0
        c_only = su / suu  # A = 0 (flat curve)
    bad_c = ~(c >= 0)
    c, A = np.where(bad_c, 0.0, c), np.where(bad_c, A_only, A)
    bad_a = ~(A >= 0)
    return np.where(bad_a, c_only, c), np.where(bad_a, 0.0, A)


def _parabolic_min(grid: np.ndarray, sse: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Vertex of the parabola through the best grid point and its neighbours (in log b)."""
    G = len(grid)
    gi = np.clip(g, 1, G - 2)
    rows = np.arange(sse.shape[0])
    y0, y1, y2 = sse[rows, gi - 1], sse[rows, gi], sse[rows, gi + 1]
    h = grid[1] - grid[0]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # an infinite SSE: no shift
        den = y0 - 2 * y1 + y2
        shift = np.where(den > 0, 0.5 * h * (y0 - y2) / den, 0.0)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    t = grid[gi] + np.clip(shift, -h, h)
    t = np.where((g == 0) | (g == G - 1), grid[g], t)
    return np.exp(t)


def asymptotic_points(x: np.ndarray, decades: float) -> np.ndarray:
    """(P,) bool: x > 0 and within the last `decades` decades of the largest x."""
    if not len(x) or x.max() <= 0:
        return np.zeros(len(x), bool)
    return (x > 0) & (np.log10(np.where(x > 0, x, 1)) >= np.log10(x.max()) - decades)


def level_table(curves: Curves, opts: FitOptions, floor_c: float) -> pd.DataFrame:
    """Per ε level: reached fraction, at-once fraction, IQM log10 n_hit, and which window rule it
    passes. The window is the levels passing every rule, minus drop_top/drop_bottom. The rules
    are computed by window_rules, the function every bootstrap replicate uses too."""
    x, vals = curves.x, curves.values
    eps = eps_grid(vals[:, x > 0] if vals.size else vals, opts.per_decade)
    nh = n_hit(x, vals, eps)  # (S, E)
    x_first = _x_first(x)
    ones = np.ones((1, nh.shape[0]), np.int32)
    reached, at_once = _reach_fractions(nh, x_first, ones)  # (1, E)
    log_n = _log_nhit(nh, x_first)
    iqm_log_n = trimmed_mean(log_n, ones) if nh.shape[0] else np.full((1, len(eps)), np.nan)  # (1, E)
    rules = window_rules(eps, reached, at_once, iqm_log_n, np.array([floor_c]), _log10_xmax(x), opts)
    t = pd.DataFrame({"eps": eps, "reached": reached[0], "at_once": at_once[0], "iqm_log10_nhit": iqm_log_n[0]})
    for name, mask in rules.items():
        t[name] = mask[0]
    t["window"] = window_from_rules(rules, opts)[0]
    t.attrs["n_hit"] = nh
    return t


def window_rules(eps: np.ndarray, reached: np.ndarray, at_once: np.ndarray, iqm_log_n: np.ndarray,
                 floor_c: np.ndarray, log10_xmax: float, opts: FitOptions) -> dict[str, np.ndarray]:
    """The window rules of docs/analysis.md for R resamples at once: eps (E,), reached / at_once /
    iqm_log_n (R, E), floor_c (R,) (NaN = no floor rule). Returns {rule name: (R, E) bool}."""
    c = np.asarray(floor_c, np.float64)[:, None]  # (R, 1)
    with np.errstate(invalid="ignore"):
        rules = {"rule_reach": (reached >= opts.reach) & (at_once <= 1 - opts.reach),
                 "rule_floor": ~(eps[None, :] < opts.floor_factor * c),  # NaN floor → rule passes
                 "rule_asymptotic": iqm_log_n >= log10_xmax - opts.nhit_decades,
                 "rule_stays": iqm_log_n <= log10_xmax - opts.tail}
    lo = opts.eps_min if opts.eps_min is not None else 0.0
    hi = opts.eps_max if opts.eps_max is not None else np.inf
    in_range = (eps >= lo * (1 - 1e-9)) & (eps <= hi * (1 + 1e-9))  # (E,)
    rules["rule_claim_range"] = np.broadcast_to(in_range, reached.shape)
    return rules


def window_from_rules(rules: dict[str, np.ndarray], opts: FitOptions) -> np.ndarray:
    """(R, E) the levels passing every rule, minus the drop_top largest and drop_bottom smallest
    of them (levels are ordered largest ε first)."""
    window = np.logical_and.reduce(list(rules.values()))  # (R, E)
    if opts.drop_top or opts.drop_bottom:
        rank = np.cumsum(window, axis=1)  # (R, E) 1-based rank of each window level from the top
        total = rank[:, -1:]
        window = window & (rank > opts.drop_top) & (rank <= total - opts.drop_bottom)
    return window


def _x_first(x: np.ndarray) -> float:
    return float(x[x > 0].min()) if (x > 0).any() else np.inf


def _log10_xmax(x: np.ndarray) -> float:
    return float(np.log10(x.max())) if len(x) and x.max() > 0 else np.nan


def _reach_fractions(nh: np.ndarray, x_first: float, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per resample (R, E): the fraction of (resampled) seeds that reached each ε, and that hit it
    at the first evaluation. nh (S, E), counts (R, S)."""
    w = counts.astype(np.float64)
    size = np.maximum(w.sum(1, keepdims=True), 1.0)  # (R, 1)
    return (w @ np.isfinite(nh)) / size, (w @ (nh <= x_first)) / size


def _log10_positive(values: np.ndarray) -> np.ndarray:
    """log10 of positive values, NaN elsewhere (excluded from the slope)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)


def _log_nhit(nh: np.ndarray, x_first: float) -> np.ndarray:
    """log10 n_hit with hits at or before the first evaluation (left-censored) as −inf."""
    with np.errstate(divide="ignore"):
        return np.where(nh <= x_first, -np.inf, np.log10(nh))


def resample_counts(curves: Curves, n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, int, str]:
    """The bootstrap of one group: (counts (R, S), independent units, unit name). With ≥ 2
    environment instances the unit is the instance (hierarchical: instances, then seeds within
    each); otherwise the seed (stratified by configuration)."""
    n_inst = len(curves.instance_labels)
    if n_inst >= 2:
        return hierarchical_counts(curves.instances, curves.strata, n_boot, rng), n_inst, "instance"
    return bootstrap_counts(curves.strata, n_boot, rng), curves.n_seeds, "seed"


def fit_rate(curves: Curves, opts: FitOptions = FitOptions(), resample: tuple | None = None) -> RateFit:
    """p, b, c with bootstrap CIs for one group of seeds (stratified by configuration; by instance,
    then seed, when the group holds ≥ 2 environment instances). The window is re-selected inside
    every replicate (selection-aware CI); a replicate in which a level of the chosen window is
    unreached (its IQM n_hit is +inf) has p = +inf. resample: (counts (R, S), units, unit name) given
    by the caller instead of resample_counts (compare.py: the same draws for two groups, paired)."""
    health = curves.health()
    base = {"metric": curves.metric, "x_name": curves.x_name, "n_seeds": curves.n_seeds,
            "n_diverged": health["diverged"], "n_failed": health["failed"], "n_saturated": health["saturated"],
            "n_stalled": health["stalled"], "n_unhealthy": health["unhealthy"],
            "n_strata": len(np.unique(curves.strata)), "n_instances": max(len(curves.instance_labels), 1)}
    vals, x = curves.values, curves.x
    if curves.n_seeds == 0 or not np.isfinite(vals).any():
        return RateFit(status="no_data", reason=f"no finite values of {curves.metric}", **base)
    rng = np.random.default_rng(opts.seed)
    counts, n_units, unit = resample or resample_counts(curves, opts.n_boot, rng)  # (R, S)
    ones = np.ones((1, curves.n_seeds), np.int32)
    asym = asymptotic_points(x, opts.decades)
    curve_iqm = trimmed_mean(vals[:, asym], ones)  # (1, Pa)
    curve_reps = trimmed_mean(vals[:, asym], counts)  # (R, Pa)
    b, c, A = fit_floor(x[asym], curve_iqm)
    b_reps, c_reps, _ = fit_floor(x[asym], curve_reps)  # (R,)
    decay, _ = batched_slope(np.log10(x[asym]), _log10_positive(curve_iqm))
    decay_reps, _ = batched_slope(np.log10(x[asym]), _log10_positive(curve_reps))
    final = trimmed_mean(vals[:, -1:], ones)[0, 0] if vals.shape[1] else np.nan
    fit = RateFit(status="ok", reason="", b=float(b[0]), c=float(c[0]), A=float(A[0]), final_iqm=float(final),
                  boot_unit=unit, **base)
    fit.b_low, fit.b_high = percentile_ci(b_reps, opts.alpha, n_units, estimate=fit.b)
    fit.arrays["b_reps"] = b_reps
    fit.c_low, fit.c_high = percentile_ci(c_reps, opts.alpha, n_units)
    fit.decay = float(-decay[0])
    fit.decay_low, fit.decay_high = percentile_ci(-decay_reps, opts.alpha, n_units)
    levels = level_table(curves, opts, fit.c)
    fit.arrays.update(levels=levels, curve_x=x, asym=asym)
    nh = levels.attrs["n_hit"]  # (S, E)
    eps_all = levels["eps"].to_numpy()
    if opts.eps_min is not None:
        fit.reach_eps_min = float(np.isfinite(n_hit(x, vals, np.array([opts.eps_min]))).mean())
    window = levels["window"].to_numpy()
    u = -np.log10(eps_all)  # (E,) log10(1/ε)
    iqm_point = levels["iqm_log10_nhit"].to_numpy()  # (E,)
    win_r = iqm_r = None
    excess = excess_model(x, ratio_curve(vals, curves.noise), opts)
    if excess is not None:
        excess["level"] = end_level(x, vals, curves.noise, opts.tail)
        term = noise_mean(curves.noise)  # (P,) the noise term the window rule and the CI read
    if window.sum() >= opts.min_levels and curves.n_seeds >= 2:
        win_r, iqm_r = replicate_windows(nh, counts, eps_all, x, c_reps, window, opts)  # (R, E) each
        if excess is not None:
            keep, noise = noise_window(u, window, iqm_point, excess, x, term, opts, curves.metric)
            fit.arrays["noise"] = noise
            window, win_r = window & keep, win_r & keep[None, :]
            levels["rule_noise"] = keep
            fit.asymptotic, fit.asymptotic_reason = noise["asymptotic"], noise["reason"]
        keep, stab = stable_window(u, window, iqm_point, iqm_r, win_r, opts, n_units)
        fit.arrays["stability"] = stab
        if fit.asymptotic:
            fit.asymptotic, fit.asymptotic_reason = stab["asymptotic"], stab["reason"]
        fit.arrays["window_reps"] = win_r  # each replicate's window by the rules, before the cut from the top
        stab["keep"] = keep
        window, win_r = window & keep, win_r & keep[None, :]
        levels["rule_stable"] = keep
        levels["window"] = window
    fit.n_levels = int(window.sum())
    if fit.n_levels:
        fit.eps_low, fit.eps_high = float(eps_all[window].min()), float(eps_all[window].max())
        fit.window_decades = float(np.log10(fit.eps_high / fit.eps_low))
    if curves.n_seeds < opts.min_seeds:
        fit.status, fit.reason = "too_few_seeds", f"{curves.n_seeds} seeds fitted, need ≥ {opts.min_seeds}"
    if fit.n_levels < opts.min_levels or win_r is None:
        fit.status = "too_few_levels"
        fit.reason = _why_no_window(levels, opts) if fit.n_levels == 0 else \
            f"{fit.n_levels} usable ε levels, need ≥ {opts.min_levels}"
        return fit
    p, a = batched_slope(u[window], iqm_point[window][None])
    fit.p, fit.log10_C = float(p[0]), float(a[0])
    fit.budget_to_eps_min = budget_to_reach(fit, opts)
    p_reps, _ = batched_slope(u, np.where(win_r, iqm_r, np.nan))
    required = win_r | _coverage_level(eps_all, window, opts)[None, :]  # (R, E)
    unreached = _unreached(iqm_r, required)  # (R,)
    fit.p_reps = np.where(unreached, np.inf, p_reps)
    fit.p_low, fit.p_high = percentile_ci(fit.p_reps, opts.alpha, n_units)
    if "noise" in fit.arrays:  # the CI of the rate, not of the window's exponent: widened by the predicted bias
        fit.p_low, fit.p_high = bias_aware_ci(fit, u, window, iqm_point, excess, x, term, opts)
    eps_eval = opts.eps_min if opts.eps_min is not None else fit.eps_low
    profile, trend = local_profile(eps_all, window, iqm_point, iqm_r, win_r, unreached, eps_eval, opts, n_units)
    fit.arrays.update(profile=profile, profile_trend=trend)
    fit.p_local, fit.p_local_low, fit.p_local_high = trend["p_at_eval"], trend["p_at_eval_low"], trend["p_at_eval_high"]
    fit.p_trend = trend["slope"]
    if fit.asymptotic:
        fit.asymptotic, fit.asymptotic_reason = rate_agrees_with_tail(fit, -decay_reps, opts, n_units)
    if not np.isfinite(fit.p_low):
        fit.status, fit.reason = "too_few_levels", "under half of the bootstrap replicates had 2+ usable ε levels"
    elif fit.status == "ok" and not fit.window_decades >= opts.min_decades * (1 - 1e-9):
        fit.status = "too_narrow"
        fit.reason = (f"the window [{fit.eps_low:.3g}, {fit.eps_high:.3g}] spans {fit.window_decades:.2g} decades "
                      f"of ε, need ≥ {opts.min_decades:g}")
    return fit


def replicate_windows(nh: np.ndarray, counts: np.ndarray, eps: np.ndarray, x: np.ndarray, c_reps: np.ndarray,
                      window: np.ndarray, opts: FitOptions) -> tuple[np.ndarray, np.ndarray]:
    """The window re-selected in every bootstrap replicate by the same rules (selection-aware CIs).
    nh (S, E), counts (R, S), c_reps (R,) the replicates' floors, window (E,) the chosen one.
    Returns (window (R, E) bool, IQM log10 n_hit (R, E)); the IQM is computed only at levels that
    some replicate can use (reach rule, claim range, finite values inside the asymptotic/stays
    band) or that the chosen window holds, NaN elsewhere."""
    x_first = _x_first(x)
    reached, at_once = _reach_fractions(nh, x_first, counts)  # (R, E)
    iqm_r = np.full(reached.shape, np.nan)
    log_n = _log_nhit(nh, x_first)  # (S, E)
    probe = window_rules(eps, reached, at_once, np.zeros_like(reached), c_reps, np.inf, opts)
    needed = (probe["rule_reach"] & probe["rule_claim_range"]).any(0) | window  # (E,)
    # a finite resample IQM lies between the smallest and largest finite value of the column, so a
    # level whose finite values all miss [lx − nhit_decades, lx − tail] is in no replicate's window
    finite = np.isfinite(log_n)
    lx = _log10_xmax(x)
    with np.errstate(invalid="ignore"):
        hi_v = np.where(finite, log_n, -np.inf).max(0, initial=-np.inf)  # (E,)
        lo_v = np.where(finite, log_n, np.inf).min(0, initial=np.inf)
    needed &= (hi_v >= lx - opts.nhit_decades) & (lo_v <= lx - opts.tail)
    needed |= window
    if needed.any():
        iqm_r[:, needed] = trimmed_mean(log_n[:, needed], counts)
    rules = window_rules(eps, reached, at_once, iqm_r, c_reps, lx, opts)
    return window_from_rules(rules, opts), iqm_r


def noise_mean(noise: np.ndarray) -> np.ndarray:
    """(P,) the noise term averaged over the seeds (one instance: every seed's is the same)."""
    finite = np.isfinite(noise)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(finite.any(0), np.where(finite, noise, 0.0).sum(0) / np.maximum(finite.sum(0), 1), np.nan)


def excess_model(x: np.ndarray, ratio: np.ndarray | None, opts: FitOptions) -> dict | None:
    """The curve against the algorithm's noise term (analysis/noise_term.py): metric / noise term
    (ratio (P,), noise_term.ratio_curve) fitted as ρ + κ·x^-q by fit_floor with the floor always kept,
    from the ratio's largest value on (before it the start's bias term rules; a model of the whole
    decay of the excess, so no single noisy point decides). ρ is the level the curve settles at, κ·x^-q
    the excess that vanishes. None without a noise term or with noise_bias = inf; {'rho': +inf} when
    the ratio is +inf at the last point (a censored seed); NaN parameters with < 4 usable points."""
    if ratio is None or not np.isfinite(opts.noise_bias):
        return None
    if np.isinf(ratio[-1]):
        return {"rho": np.inf, "kappa": np.nan, "q": np.nan}
    pos = (x > 0) & np.isfinite(ratio) & (ratio > 0)
    if pos.any():
        pos &= np.arange(len(x)) >= np.argmax(np.where(pos, ratio, -np.inf))
    if pos.sum() < 4:
        return {"rho": np.nan, "kappa": np.nan, "q": np.nan}
    xs, ys = x[pos], ratio[pos]
    q, rho, kappa = (float(v[0]) for v in fit_floor(xs, ys[None], floor_level=1.0))
    flat = float(np.sum(1 / ys) / np.sum(1 / ys**2))  # κ = 0: relative least squares of a constant
    sse_flat = float(np.sum((1 - flat / ys) ** 2))
    sse = float(np.sum((1 - (rho + kappa * xs**-q) / ys) ** 2)) if np.isfinite(rho + kappa + q) else np.inf
    n = len(ys)
    with np.errstate(divide="ignore", invalid="ignore"):
        F = (sse_flat - sse) / 2 / (sse / max(n - 3, 1))
    if not F > sps.f.ppf(1 - opts.noise_excess_level, 2, max(n - 3, 1)):  # no excess shown: the level alone
        return {"rho": flat, "kappa": 0.0, "q": np.nan, "F": F}
    return {"rho": rho, "kappa": kappa, "q": q, "F": F}


def excess_bias(u: np.ndarray, w: np.ndarray, iqm_point: np.ndarray, excess: dict, x: np.ndarray,
                noise_mean: np.ndarray, opts: FitOptions) -> tuple[float, float, dict]:
    """(p̂, the bias of p̂ the model predicts, parts) on window w (E,) bool; parts: the bias's two sources
    `bending` and `excess`, the model's exponent of the window `p_model` (1/b_win) and of the tail `p_end`. The model
    of the curve is M(x) = N(x)·(ρ + κ·x^-q), N the algorithm's noise term (noise_mean (P,)): its shape is known
    far more precisely than the seeds' noisy curve. The window's exponent under the model is 1/b_win, b_win the
    log-log slope of M between the IQM n_hit of the window's top and bottom levels; the exponent the curve is
    heading to is that of N, where the excess has vanished: 1/b_end, b_end N's log-log slope over the run's last
    `tail` decades of x. Their difference, the bias, is the sum of two sources: N's own bending over the window
    (1/b_end − 1/b_N, b_N N's slope between the same two points; the next-order terms of the recursion, such as
    the offset of c/(t + t0)^a) and the excess (1/b_N − 1/b_win). They have opposite signs on the runs (N bends up
    early, the excess steepens the curve) and their sum can be small while each is large: noise_window judges the
    sum, bias_aware_ci widens the CI by each source alone as well (docs/analysis.md). κ = 0 (no excess shown):
    M = ρ·N, the excess source is zero and N's bending is still judged. Parts are NaN (+inf) with the bias."""
    p, _ = batched_slope(u[w], iqm_point[w][None])
    p = float(p[0])
    ok = (x > 0) & np.isfinite(noise_mean) & (noise_mean > 0)
    undefined = dict.fromkeys(("bending", "excess", "p_model", "p_end"), np.nan)
    if ok.sum() < 2:
        return p, np.nan, undefined
    lx, ln_n = np.log(x[ok]), np.log(noise_mean[ok])
    excess_x = excess["kappa"] * x[ok] ** -excess["q"] if excess["kappa"] > 0 else 0.0  # κ = 0: M = ρ·N
    ln_m = ln_n + np.log(excess["rho"] + excess_x)
    l_top, l_bot = iqm_point[w].min() * np.log(10), iqm_point[w].max() * np.log(10)
    if not l_bot > l_top + 1e-9:
        return p, np.nan, undefined
    b_win = -(np.interp(l_bot, lx, ln_m) - np.interp(l_top, lx, ln_m)) / (l_bot - l_top)
    b_n = -(np.interp(l_bot, lx, ln_n) - np.interp(l_top, lx, ln_n)) / (l_bot - l_top)
    end = lx >= lx.max() - opts.tail * np.log(10) - 1e-9
    b_end = -batched_slope(lx[end], ln_n[end][None])[0][0] if end.sum() >= 2 else np.nan
    if not (b_win > 0 and b_end > 0 and b_n > 0):
        return (p, np.inf, dict.fromkeys(undefined, np.inf)) if np.isfinite(b_end) else (p, np.nan, undefined)
    bending, from_excess = float(1 / b_end - 1 / b_n), float(1 / b_n - 1 / b_win)
    return p, bending + from_excess, {"bending": bending, "excess": from_excess, "p_model": float(1 / b_win),
                                      "p_end": float(1 / b_end)}


def noise_window(u: np.ndarray, window: np.ndarray, iqm_point: np.ndarray, excess: dict, x: np.ndarray,
                 noise_mean: np.ndarray, opts: FitOptions, metric: str) -> tuple[np.ndarray, dict]:
    """The window cut from the top until the metric's excess over the algorithm's noise term, and the term's own
    bending, no longer bias p̂ by more than noise_bias·p̂ (excess_bias; `stable_step` decades of ε per cut, never
    below `min_decades`); with κ = 0 (the F-test showed no excess) the bending is judged alone. Not asymptotic
    when (1) the mean metric over the run's last `tail` decades of x is outside [1/noise_level_tol,
    noise_level_tol] times its noise term (the run is not where the term describes it), or (2) the tail-most
    window of min_decades is still biased beyond the tolerance. Returns (keep (E,) bool, details: rho, kappa,
    q, F, level, cut, bias, bending, excess, p, asymptotic, reason)."""
    lo, hi = u[window].min(), u[window].max()
    rho, level = excess["rho"], excess.get("level", np.nan)
    details = {**excess, "cut": 0.0, "bias": np.nan, "asymptotic": True, "reason": ""}
    keep_all = np.ones(len(u), bool)
    if level == np.inf or np.isfinite(level) and not 1 / opts.noise_level_tol <= level <= opts.noise_level_tol:
        details.update(asymptotic=False, reason=(
            f"not in the noise regime: at the end of the run the mean {metric} is {level:.3g}× the algorithm's noise "
            f"term ({metric}_noise), outside [1/{opts.noise_level_tol:g}, {opts.noise_level_tol:g}]: the run is not "
            f"where the term, and the rate that comes with it, describe it"))
        return keep_all, details
    if rho == 0 and excess["kappa"] > 0 and np.isfinite(excess["q"]):
        details.update(asymptotic=False, reason=(
            f"not in the noise regime: {metric} / its noise term ({metric}_noise) falls as {excess['kappa']:.3g}·x^-"
            f"{excess['q']:.2g} through the whole run without settling at a level (fitted level 0): the excess over "
            f"the term has not vanished by the run's end, so the window's exponent is not yet the term's"))
        return keep_all, details
    if not (np.isfinite(rho) and rho > 0 and (excess["kappa"] == 0 or excess["kappa"] > 0 and np.isfinite(excess["q"]))):
        return keep_all, details
    span = hi - lo
    n_cuts = int(np.floor((span - opts.min_decades) / opts.stable_step + 1e-9)) + 1 if span >= opts.min_decades else 1
    for k in range(max(n_cuts, 1)):
        keep = u >= lo + k * opts.stable_step - 1e-9
        w = window & keep
        if w.sum() < 2:
            break
        p, bias, parts = excess_bias(u, w, iqm_point, excess, x, noise_mean, opts)
        details.update(cut=k * opts.stable_step, bias=bias, bending=parts["bending"], excess=parts["excess"], p=p)
        if not abs(bias) > opts.noise_bias * abs(p):  # NaN (no stretch after the window): nothing to judge
            return keep, details
    top = 10.0 ** -(lo + details["cut"])
    if excess["kappa"] == 0:
        details.update(asymptotic=False, reason=(
            f"not in the noise regime: the algorithm's noise term ({metric}_noise) still bends on the tail window "
            f"[{10.0 ** -hi:.3g}, {top:.3g}] (no excess of {metric} over it is shown): its next-order terms alone "
            f"move p̂ = {details['p']:.3g} by {details['bias']:+.2g} (more than {opts.noise_bias:g}·p̂): a transient, "
            f"not yet the rate"))
        return keep, details
    details.update(asymptotic=False, reason=(
        f"not in the noise regime: above ε = {10.0 ** -hi * 10 ** opts.min_decades:.3g} {metric} is still "
        f"{1 + excess['kappa'] / rho * 10 ** (iqm_point[window & (u >= lo + details['cut'] - 1e-9)].min() * -excess['q']):.3g}× "
        f"the level it settles at against the algorithm's noise term ({metric}_noise); on the tail window "
        f"[{10.0 ** -hi:.3g}, {top:.3g}] that excess alone moves p̂ = {details['p']:.3g} by {details['bias']:+.2g} "
        f"(more than {opts.noise_bias:g}·p̂): a transient, not yet the rate"))
    return keep, details


def bias_aware_ci(fit: RateFit, u: np.ndarray, window: np.ndarray, iqm_point: np.ndarray, excess: dict,
                  x: np.ndarray, noise_mean: np.ndarray, opts: FitOptions) -> tuple[float, float]:
    """(p_low, p_high) of the rate the window's exponent is heading to: the bootstrap CI [fit.p_low, fit.p_high]
    covers the exponent of the chosen window; under the noise-term model that exponent differs from the rate by
    the predicted bias (excess_bias on the final window, ≤ noise_bias·p̂ on an asymptotic fit), the sum of two
    sources, N's bending and the excess, which can each be large and cancel. The interval is the union of the CI
    shifted by 0 and by the bias (right whether the model's bias is right or absent) when the model predicts the
    window's own exponent — its p_model inside the bootstrap CI — and, when the data reject that prediction, also
    by each source alone (right whether each source is right or absent: a model the window contradicts is not
    trusted to cancel). p̂ itself is not corrected. fit.arrays["noise"] records ci_shift (the bias), ci_shifts
    (the smallest and largest shift used) and model_rejected. Without a finite bias (no model, no stretch after
    the window) the CI is left as it is."""
    low, high = fit.p_low, fit.p_high
    rho = excess.get("rho", np.nan)
    if window.sum() < 2 or not (np.isfinite(rho) and rho > 0 and np.isfinite(excess.get("kappa", np.nan))):
        return low, high
    _, bias, parts = excess_bias(u, window, iqm_point, excess, x, noise_mean, opts)
    if not np.isfinite(bias):
        return low, high
    rejected = not low <= parts["p_model"] <= high
    # rejected: neither the window nor the model is trusted over the other; besides each source alone, the CI also
    # spans the shift that puts p̂ on the term's tail exponent p_end (the model's rate; with κ = 0 there is no
    # excess source, and an excess the F-test missed is what a rejection shows)
    shifts = (0.0, bias) + ((parts["bending"], parts["excess"], parts["p_end"] - fit.p) if rejected else ())
    fit.arrays["noise"].update(ci_shift=bias, ci_shifts=(min(shifts), max(shifts)), model_rejected=rejected)
    return low + min(shifts), high + max(shifts)


def split_slopes(u: np.ndarray, window: np.ndarray, iqm_point: np.ndarray, iqm_r: np.ndarray,
                 win_r: np.ndarray) -> dict:
    """The broken-power-law comparison on one window: the slope of IQM log10 n_hit on u = log10(1/ε)
    over the window's upper half (large ε, early) and over its lower half (small ε, late; the middle
    level in both), for the point estimate and every replicate (its own levels inside win_r (R, E)).
    A replicate in which a lower-half level of its window is unreached has a lower slope of +inf.
    Returns {'top', 'bottom', 'd' (point), 'd_reps' (R,) = bottom − top, 'u_mid'}."""
    lo, hi = u[window].min(), u[window].max()
    mid = 0.5 * (lo + hi)
    top, bot = window & (u <= mid + 1e-9), window & (u >= mid - 1e-9)  # (E,)
    pt, _ = batched_slope(u[top], iqm_point[top][None])
    pb, _ = batched_slope(u[bot], iqm_point[bot][None])
    pt_r, _ = batched_slope(u[top], np.where(win_r[:, top], iqm_r[:, top], np.nan))
    pb_r, _ = batched_slope(u[bot], np.where(win_r[:, bot], iqm_r[:, bot], np.nan))
    pb_r = np.where(((iqm_r[:, bot] == np.inf) & win_r[:, bot]).any(1), np.inf, pb_r)  # (R,)
    with np.errstate(invalid="ignore"):
        d_r = pb_r - pt_r  # inf − finite = inf; NaN where a half had < 2 levels (left out of the CI)
    return {"top": float(pt[0]), "bottom": float(pb[0]), "d": float(pb[0] - pt[0]), "d_reps": d_r, "u_mid": mid}


def stable_window(u: np.ndarray, window: np.ndarray, iqm_point: np.ndarray, iqm_r: np.ndarray, win_r: np.ndarray,
                  opts: FitOptions, n_units: int) -> tuple[np.ndarray, dict]:
    """The window chosen from the tail, where the local exponent has stabilised (docs/analysis.md,
    "Transient or rate"). Starting from the whole window and cutting `stable_step` decades off its
    top (largest ε) at a time, the first window is kept on which the slopes of its two halves agree:
    the 95 % bootstrap CI of (lower-half slope − upper-half slope) reaches into ±stable_tol·p̂. The
    cut never leaves fewer than `min_decades` decades. When no such window exists the fit is not
    asymptotic: the window is the tail-most one of min_decades, and the reason names the two slopes.
    Returns (keep (E,) bool: the levels at or below the chosen top, details dict)."""
    lo, hi = u[window].min(), u[window].max()
    span = hi - lo
    n_cuts = int(np.floor((span - opts.min_decades) / opts.stable_step + 1e-9)) + 1 if span >= opts.min_decades else 1
    tests = []
    for k in range(max(n_cuts, 1)):
        cap = lo + k * opts.stable_step
        keep = u >= cap - 1e-9  # (E,)
        w, wr = window & keep, win_r & keep[None, :]
        split = split_slopes(u, w, iqm_point, iqm_r, wr)
        p_all, _ = batched_slope(u[w], iqm_point[w][None])
        tol = opts.stable_tol * abs(float(p_all[0]))
        d_low, d_high = percentile_ci(split["d_reps"], opts.alpha, n_units)
        stable = not (d_low > tol or d_high < -tol)  # NaN CI (too few levels): nothing shown either way
        test = {"eps_top": 10.0 ** -cap, "eps_bottom": 10.0 ** -hi, "top": split["top"], "bottom": split["bottom"],
                "d": split["d"], "d_low": d_low, "d_high": d_high, "tol": tol, "stable": stable, "cut": k * opts.stable_step}
        tests.append(test)
        if stable:
            break
    last = tests[-1]
    details = {"tests": tests, "asymptotic": bool(last["stable"]), "reason": "", "cut": last["cut"]}
    if not last["stable"]:
        trend = "rising" if last["d"] > 0 else "falling"
        details["reason"] = (f"the local exponent is still {trend} on the tail window [{last['eps_bottom']:.3g}, "
                             f"{last['eps_top']:.3g}]: p {last['top']:.3g} on its upper half vs {last['bottom']:.3g} on "
                             f"its lower half (difference 95% CI [{last['d_low']:.3g}, {last['d_high']:.3g}], beyond "
                             f"±{last['tol']:.2g}); a transient, a floor or a change of regime, not yet the rate")
    return u >= lo + last["cut"] - 1e-9, details


def budget_to_reach(fit: RateFit, opts: FitOptions) -> float:
    """The x (in the fit's unit: samples, steps or queries) a run would need for its window to reach the
    claim's ε_min, from the fitted line n_hit(ε) = C·ε^-p extrapolated to ε_min, times 10^tail (the window
    needs n_hit ≤ x_max/10^tail). +inf when ε_min lies under floor_factor × the fitted floor (the curve
    cannot get there); NaN without a claim ε_min, when the window already reaches it (within one grid
    step), or without a finite fit."""
    eps_min = opts.eps_min
    if eps_min is None or not (np.isfinite(fit.p) and np.isfinite(fit.log10_C) and np.isfinite(fit.eps_low)):
        return float("nan")
    if fit.eps_low <= eps_min * 10 ** (1 / opts.per_decade) * (1 + 1e-9):
        return float("nan")
    if fit.c > 0 and eps_min < opts.floor_factor * fit.c:
        return float("inf")
    log10_n = fit.log10_C + fit.p * -np.log10(eps_min) + opts.tail
    return float(10.0 ** log10_n) if log10_n < 300 else float("inf")


def rate_agrees_with_tail(fit: RateFit, decay_reps: np.ndarray, opts: FitOptions, n_units: int) -> tuple[bool, str]:
    """Is the window's exponent the rate of the curve's tail? An out-of-sample equivalence check on the
    bootstrap replicates: the model-free decay of the IQM curve over the last `decades` decades of x
    (its log-log slope there, not the n_hit window; decay_reps (R,)) must give p̂·decay = 1 within
    ±tail_tol, the whole 95 % CI. A window still in a transient (a faster or slower early phase), or a
    tail bending onto a floor, fails it. Replicates with an unreached level (p = +inf) are about
    coverage and are left out. Returns (asymptotic, reason)."""
    if not np.isfinite(fit.decay):
        return True, ""
    p_r = np.where(np.isfinite(fit.p_reps), fit.p_reps, np.nan)  # (R,)
    q_low, q_high = percentile_ci(p_r * decay_reps, opts.alpha, n_units)
    if 1 - opts.tail_tol <= q_low and q_high <= 1 + opts.tail_tol:
        return True, ""
    inv = f"1/decay = {1 / fit.decay:.3g}" if fit.decay > 0 else "no decay"
    return False, (f"the window's exponent is not shown to be the tail's: p̂·decay = {fit.p * fit.decay:.3g} (95% CI "
                   f"[{q_low:.3g}, {q_high:.3g}], needs to lie in 1 ± {opts.tail_tol:g}), with decay = {fit.decay:.3g} the "
                   f"log-log slope over the last {opts.decades:g} decades of {fit.x_name} ({inv} vs p̂ {fit.p:.3g})")


def _coverage_level(eps: np.ndarray, window: np.ndarray, opts: FitOptions) -> np.ndarray:
    """(E,) the level a claim needs reached: the chosen window's lowest level when it is within one
    grid step of the claim's ε_min (the window covers ε_min); none otherwise or without a claim."""
    need = np.zeros(len(eps), bool)
    if opts.eps_min is None or not window.any():
        return need
    low = np.flatnonzero(window)[-1]  # levels are largest first
    if eps[low] <= opts.eps_min * 10 ** (1 / opts.per_decade) * (1 + 1e-9):
        need[low] = True
    return need


def _unreached(iqm_r: np.ndarray, required: np.ndarray) -> np.ndarray:
    """(R,) replicates in which a required level (R, E) bool is unreached: its IQM log10 n_hit is
    +inf (more than a quarter of the resampled seeds never stay below it). Such a replicate has no
    evidence of a finite rate there: its p is +inf (not the slope of the other levels)."""
    return ((iqm_r == np.inf) & required).any(1)


def local_profile(eps: np.ndarray, window: np.ndarray, iqm_point: np.ndarray, iqm_r: np.ndarray,
                  win_r: np.ndarray, unreached: np.ndarray, eps_eval: float, opts: FitOptions,
                  n_units: int) -> tuple[pd.DataFrame, dict]:
    """Local exponent p(ε): the slope of IQM log10 n_hit on log10(1/ε) over sub-windows of
    `profile_width` decades (centres `profile_step` apart) inside the chosen window (E,), for the
    point estimate and every replicate (its levels of the sub-window inside its own window win_r
    (R, E); p = +inf in the `unreached` (R,) replicates, as for p). Then the trend: local p
    regressed on log10(1/ε_center) per replicate, evaluated at eps_eval (the claim's ε_min).
    Returns (DataFrame eps_center, p, p_low, p_high, n_levels; trend dict)."""
    u = -np.log10(eps)  # (E,) log10(1/ε)
    lo, hi = u[window].min(), u[window].max()
    half = opts.profile_width / 2
    if hi - lo >= opts.profile_width - 1e-9:
        n_c = int(np.floor((hi - lo - opts.profile_width) / opts.profile_step + 1e-9)) + 1
        centres = lo + half + opts.profile_step * np.arange(n_c)  # (J,) in log10(1/ε)
    else:
        centres = np.array([(lo + hi) / 2])
    rows, sub_reps = [], []
    for cu in centres:
        cols = window & (np.abs(u - cu) <= half + 1e-9)  # (E,)
        p0, _ = batched_slope(u[cols], iqm_point[cols][None])
        pr, _ = batched_slope(u[cols], np.where(win_r[:, cols], iqm_r[:, cols], np.nan))
        pr = np.where(unreached, np.inf, pr)  # (R,)
        low, high = percentile_ci(pr, opts.alpha, n_units)
        rows.append({"eps_center": 10.0 ** -cu, "p": float(p0[0]), "p_low": low, "p_high": high,
                     "n_levels": int(cols.sum())})
        sub_reps.append(pr)
    profile = pd.DataFrame(rows)
    P = np.stack(sub_reps, axis=1)  # (R, J)
    ue = -np.log10(eps_eval) if eps_eval and np.isfinite(eps_eval) else lo
    if len(centres) >= 2:
        s0, a0 = batched_slope(centres, profile["p"].to_numpy()[None])
        s_r, a_r = batched_slope(centres, np.where(np.isinf(P), np.nan, P))  # NaN sub-windows left out
        at_r = np.where(unreached, np.inf, a_r + s_r * ue)  # (R,)
        at0, slope = float(a0[0] + s0[0] * ue), float(s0[0])
    else:
        at_r, at0, slope = P[:, 0], float(profile["p"].iloc[0]), np.nan
    at_low, at_high = percentile_ci(at_r, opts.alpha, n_units)
    trend = {"eps_eval": 10.0 ** -ue, "slope": slope, "p_at_eval": at0, "p_at_eval_low": at_low, "p_at_eval_reps": at_r,
             "p_at_eval_high": at_high}
    return profile, trend


def _why_no_window(levels: pd.DataFrame, opts: FitOptions) -> str:
    """Which window rule removed the most levels, in words."""
    words = {"rule_reach": f"fewer than {opts.reach:.0%} of seeds reached ε (or too many at once)",
             "rule_floor": f"ε below {opts.floor_factor}× the fitted floor",
             "rule_asymptotic": f"n_hit before the last {opts.nhit_decades} decades of the budget",
             "rule_stays": f"n_hit within the last {opts.tail} decade of the budget",
             "rule_claim_range": "outside the claim's ε range"}
    fails = {k: int((~levels[k].astype(bool)).sum()) for k in words}
    parts = [f"{words[k]}: {n} levels" for k, n in sorted(fails.items(), key=lambda kv: -kv[1]) if n]
    if not len(levels):
        return "no usable ε level (no positive finite value of the metric)"
    return "no usable ε level (" + "; ".join(parts) + ")"


def window_sensitivity(curves: Curves, opts: FitOptions = FitOptions(), n_boot: int = 500) -> pd.DataFrame:
    """How p̂ and its CI move with the window: each row changes one window knob of opts."""
    variants = [("chosen", {})]
    variants += [(f"reach={r}", {"reach": r}) for r in (0.5, 0.9) if r != opts.reach]
    variants += [(f"decades={d}", {"decades": d}) for d in (1.0, 1.5, 3.0, 99.0) if d != opts.decades]
    variants += [(f"nhit_decades={d}", {"nhit_decades": d}) for d in (2.0, 3.0, 99.0) if d != opts.nhit_decades]
    variants += [(f"floor_factor={f}", {"floor_factor": f}) for f in (3.0, 5.0, 20.0) if f != opts.floor_factor]
    variants += [(f"tail={t}", {"tail": t}) for t in (0.0, 1.0) if t != opts.tail]
    variants += [("drop top 2", {"drop_top": 2}), ("drop bottom 2", {"drop_bottom": 2})]
    if curves.noise is not None:  # the algorithm logged its noise term: the window without that rule
        variants += [("noise_bias=inf", {"noise_bias": np.inf})]
    rows = []
    for name, change in variants:
        f = fit_rate(curves, replace(opts, n_boot=n_boot, **change))
        rows.append({"window": name, "p": f.p, "p_low": f.p_low, "p_high": f.p_high, "eps_low": f.eps_low,
                     "eps_high": f.eps_high, "n_levels": f.n_levels, "status": f.status})
    return pd.DataFrame(rows)
