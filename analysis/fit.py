"""Rate fitting (SPEC §7): the sample-complexity exponent p (log n_hit vs log 1/ε) and the decay
exponent b with an error floor (metric ≈ c + A·n^-b), seed-bootstrap CIs, window choice and sensitivity."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from ratebench.analysis.curves import Curves, eps_grid, n_hit
from ratebench.analysis.stats import batched_slope, bootstrap_counts, percentile_ci, trimmed_mean
from scipy import stats as sps

B_GRID = np.exp(np.linspace(np.log(0.03), np.log(5.0), 101))  # b < 0.03 (p > 33) is a plateau here  # decay exponents searched, log-spaced


@dataclass(frozen=True)
class FitOptions:
    """How the fitting window is chosen and how the CIs are computed (defaults in docs/analysis.md)."""

    reach: float = 0.75  # an ε level is usable when ≥ this fraction of seeds reached it (and ≤ 1−reach hit it at once)
    floor_factor: float = 10.0  # usable ε ≥ floor_factor · ĉ: keeps the fitted floor out of the window
    decades: float = 2.0  # asymptotic regime: only the last `decades` decades of x (n_hit for p, x for b)
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


@dataclass
class RateFit:
    """The result for one group; arrays keep what the plots need."""

    metric: str
    x_name: str
    status: str  # ok | too_few_seeds | too_few_levels | no_data
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
    n_strata: int = 0
    final_iqm: float = np.nan
    decay: float = np.nan  # −(log-log slope of the IQM curve over the asymptotic points), no floor
    decay_low: float = np.nan
    decay_high: float = np.nan
    p_reps: np.ndarray = field(default=None, repr=False)
    arrays: dict = field(default_factory=dict, repr=False)

    def row(self) -> dict:
        keys = ["metric", "x_name", "status", "p", "p_low", "p_high", "log10_C", "b", "b_low", "b_high", "c",
                "c_low", "c_high", "eps_low", "eps_high", "n_levels", "n_seeds", "n_diverged", "n_failed",
                "n_strata", "final_iqm", "decay", "decay_low", "decay_high", "reason"]
        return {k: getattr(self, k) for k in keys}


def fit_floor(x: np.ndarray, curves: np.ndarray, floor_level: float = 0.01):
    """Fit metric ≈ c + A·x^-b (c ≥ 0, A ≥ 0) to every row of curves (R, P) by relative least
    squares Σ((y − c − A x^-b)/y)², profiling out (c, A) in closed form on a log grid of b,
    refined by a parabola through the best three grid points. The floor is kept only when an
    F-test against c = 0 rejects at `floor_level` (else c = 0): an unsupported floor biases b̂
    upward. The same rule runs in every bootstrap replicate. Rows with fewer than 4 finite
    positive points give NaN. Returns (b, c, A), each (R,)."""
    y = np.atleast_2d(curves)
    ok = np.isfinite(y) & (y > 0)  # (R, P)
    w = np.where(ok, 1.0 / np.where(ok, y, 1.0), 0.0)  # (R, P) u = 1/y
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
    with np.errstate(invalid="ignore", divide="ignore"):
        F = (sse0 - sse1) / (sse1 / np.maximum(n - 3, 1))
    keep_floor = F > sps.f.ppf(1 - floor_level, 1, np.maximum(n - 3, 1))
    b, c, A = (np.where(keep_floor, fits[True][i], fits[False][i]) for i in range(3))
    enough = n >= 4
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
    if floor:
        c, A = _solve_ca(suu, suz, szz, su, sz)
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            A = np.clip(sz / szz, 0.0, None)
        c = np.zeros_like(A)
    sse = n - 2 * (c * su + A * sz) + c * c * suu + 2 * c * A * suz + A * A * szz
    return sse, c, A


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
    den = y0 - 2 * y1 + y2
    with np.errstate(invalid="ignore", divide="ignore"):
        shift = np.where(den > 0, 0.5 * h * (y0 - y2) / den, 0.0)
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
    passes. The window is the levels passing every rule, minus drop_top/drop_bottom."""
    x, vals = curves.x, curves.values
    eps = eps_grid(vals[:, x > 0] if vals.size else vals, opts.per_decade)
    nh = n_hit(x, vals, eps)  # (S, E)
    x_first = x[x > 0].min() if (x > 0).any() else np.inf
    S = max(nh.shape[0], 1)
    reached = np.isfinite(nh).sum(0) / S
    at_once = (nh <= x_first).sum(0) / S
    log_n = _log_nhit(nh, x_first)
    iqm_log_n = trimmed_mean(log_n, np.ones((1, nh.shape[0]), np.int32))[0] if nh.shape[0] else np.full(len(eps), np.nan)
    lx = np.log10(x.max()) if len(x) and x.max() > 0 else np.nan
    t = pd.DataFrame({"eps": eps, "reached": reached, "at_once": at_once, "iqm_log10_nhit": iqm_log_n})
    t["rule_reach"] = (reached >= opts.reach) & (at_once <= 1 - opts.reach)
    t["rule_floor"] = ~(eps < opts.floor_factor * floor_c) if np.isfinite(floor_c) else True
    t["rule_asymptotic"] = iqm_log_n >= lx - opts.decades
    t["rule_stays"] = iqm_log_n <= lx - opts.tail
    lo = opts.eps_min if opts.eps_min is not None else 0.0
    hi = opts.eps_max if opts.eps_max is not None else np.inf
    t["rule_claim_range"] = (eps >= lo * (1 - 1e-9)) & (eps <= hi * (1 + 1e-9))
    rules = [c for c in t.columns if c.startswith("rule_")]
    window = t[rules].all(axis=1).to_numpy()
    idx = np.flatnonzero(window)
    if len(idx):
        keep = idx[opts.drop_top: len(idx) - opts.drop_bottom]
        window = np.isin(np.arange(len(eps)), keep)
    t["window"] = window
    t.attrs["n_hit"] = nh
    return t


def _log10_positive(values: np.ndarray) -> np.ndarray:
    """log10 of positive values, NaN elsewhere (excluded from the slope)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(values > 0, np.log10(np.where(values > 0, values, 1.0)), np.nan)


def _log_nhit(nh: np.ndarray, x_first: float) -> np.ndarray:
    """log10 n_hit with hits at or before the first evaluation (left-censored) as −inf."""
    with np.errstate(divide="ignore"):
        return np.where(nh <= x_first, -np.inf, np.log10(nh))


def fit_rate(curves: Curves, opts: FitOptions = FitOptions()) -> RateFit:
    """p, b, c with bootstrap CIs for one group of seeds (stratified by configuration)."""
    base = dict(metric=curves.metric, x_name=curves.x_name, n_seeds=curves.n_seeds,
                n_diverged=curves.count("diverged"), n_failed=curves.count("failed"),
                n_strata=len(np.unique(curves.strata)))
    vals, x = curves.values, curves.x
    if curves.n_seeds == 0 or not np.isfinite(vals).any():
        return RateFit(status="no_data", reason=f"no finite values of {curves.metric}", **base)
    rng = np.random.default_rng(opts.seed)
    counts = bootstrap_counts(curves.strata, opts.n_boot, rng)  # (R, S)
    ones = np.ones((1, curves.n_seeds), np.int32)
    asym = asymptotic_points(x, opts.decades)
    curve_iqm = trimmed_mean(vals[:, asym], ones)  # (1, Pa)
    curve_reps = trimmed_mean(vals[:, asym], counts)  # (R, Pa)
    b, c, A = fit_floor(x[asym], curve_iqm)
    b_reps, c_reps, _ = fit_floor(x[asym], curve_reps)  # (R,)
    decay, _ = batched_slope(np.log10(x[asym]), _log10_positive(curve_iqm))
    decay_reps, _ = batched_slope(np.log10(x[asym]), _log10_positive(curve_reps))
    final = trimmed_mean(vals[:, -1:], ones)[0, 0] if vals.shape[1] else np.nan
    fit = RateFit(status="ok", reason="", b=float(b[0]), c=float(c[0]), A=float(A[0]), final_iqm=float(final), **base)
    fit.b_low, fit.b_high = percentile_ci(b_reps, opts.alpha, curves.n_seeds, estimate=fit.b)
    fit.c_low, fit.c_high = percentile_ci(c_reps, opts.alpha, curves.n_seeds)
    fit.decay = float(-decay[0])
    fit.decay_low, fit.decay_high = percentile_ci(-decay_reps, opts.alpha, curves.n_seeds)
    levels = level_table(curves, opts, fit.c)
    fit.arrays.update(levels=levels, curve_x=x, asym=asym)
    window = levels["window"].to_numpy()
    fit.n_levels = int(window.sum())
    if fit.n_levels:
        fit.eps_low, fit.eps_high = float(levels["eps"][window].min()), float(levels["eps"][window].max())
    if curves.n_seeds < opts.min_seeds:
        fit.status, fit.reason = "too_few_seeds", f"{curves.n_seeds} seeds fitted, need ≥ {opts.min_seeds}"
    if fit.n_levels < opts.min_levels:
        fit.status = "too_few_levels"
        fit.reason = _why_no_window(levels, opts) if fit.n_levels == 0 else \
            f"{fit.n_levels} usable ε levels, need ≥ {opts.min_levels}"
        return fit
    eps_w = levels["eps"].to_numpy()[window]
    log_n = _log_nhit(levels.attrs["n_hit"][:, window], x[x > 0].min())  # (S, Ew)
    lx = np.log10(1.0 / eps_w)  # (Ew,)
    p, a = batched_slope(lx, trimmed_mean(log_n, ones))
    fit.p, fit.log10_C = float(p[0]), float(a[0])
    p_reps, _ = batched_slope(lx, trimmed_mean(log_n, counts))
    fit.p_reps = p_reps
    fit.p_low, fit.p_high = percentile_ci(p_reps, opts.alpha, curves.n_seeds)
    if not np.isfinite(fit.p_low):
        fit.status, fit.reason = "too_few_levels", "under half of the bootstrap replicates had 2+ usable ε levels"
    return fit


def _why_no_window(levels: pd.DataFrame, opts: FitOptions) -> str:
    """Which window rule removed the most levels, in words."""
    words = {"rule_reach": f"fewer than {opts.reach:.0%} of seeds reached ε (or too many at once)",
             "rule_floor": f"ε below {opts.floor_factor}× the fitted floor",
             "rule_asymptotic": f"n_hit before the last {opts.decades} decades of the budget",
             "rule_stays": f"n_hit within the last {opts.tail} decade of the budget",
             "rule_claim_range": "outside the claim's ε range"}
    fails = {k: int((~levels[k].astype(bool)).sum()) for k in words}
    parts = [f"{words[k]}: {n} levels" for k, n in sorted(fails.items(), key=lambda kv: -kv[1]) if n]
    return "no usable ε level (" + "; ".join(parts) + ")"


def window_sensitivity(curves: Curves, opts: FitOptions = FitOptions(), n_boot: int = 500) -> pd.DataFrame:
    """How p̂ and its CI move with the window: each row changes one window knob of opts."""
    variants = [("chosen", {})]
    variants += [(f"reach={r}", {"reach": r}) for r in (0.5, 0.9) if r != opts.reach]
    variants += [(f"decades={d}", {"decades": d}) for d in (1.0, 1.5, 3.0, 99.0) if d != opts.decades]
    variants += [(f"floor_factor={f}", {"floor_factor": f}) for f in (3.0, 5.0, 20.0) if f != opts.floor_factor]
    variants += [(f"tail={t}", {"tail": t}) for t in (0.0, 1.0) if t != opts.tail]
    variants += [("drop top 2", {"drop_top": 2}), ("drop bottom 2", {"drop_bottom": 2})]
    rows = []
    for name, change in variants:
        f = fit_rate(curves, replace(opts, n_boot=n_boot, **change))
        rows.append({"window": name, "p": f.p, "p_low": f.p_low, "p_high": f.p_high, "eps_low": f.eps_low,
                     "eps_high": f.eps_high, "n_levels": f.n_levels, "status": f.status})
    return pd.DataFrame(rows)
