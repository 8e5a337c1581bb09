"""Statistics as small pure functions over arrays: stratified seed bootstrap (as resample counts),
trimmed means (IQM, median) of resamples, batched least squares, bootstrap confidence intervals."""
from __future__ import annotations

import numpy as np
from scipy import stats as sps


BIG = 1e300  # trimmed means count finite values beyond ±BIG as ±BIG (their sums stay finite)
F32_SPAN = 1e30  # float32 sums hold values within this factor of a column's median magnitude


def bootstrap_counts(strata: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Resample counts (R, S): replicate r draws, within each stratum (configuration), as many
    seeds with replacement as the stratum holds. The resampling unit is the seed."""
    strata = np.asarray(strata)
    counts = np.zeros((n_boot, len(strata)), dtype=np.int32)
    for label in np.unique(strata):
        members = np.flatnonzero(strata == label)  # (S_k,)
        draws = rng.integers(0, len(members), size=(n_boot, len(members)))  # (R, S_k) indices
        np.add.at(counts, (np.arange(n_boot)[:, None], members[draws]), 1)
    return counts


def hierarchical_counts(instances: np.ndarray, strata: np.ndarray, n_boot: int,
                        rng: np.random.Generator) -> np.ndarray:
    """Two-level resample counts (R, S). The resampling unit is the environment *instance*: replicate
    r draws as many instances with replacement as there are; each draw of an instance then
    resamples that instance's seeds with replacement within each configuration (stratum), as
    bootstrap_counts does. An instance drawn twice gets two independent seed resamples (counts
    add up); an instance not drawn gets zero counts, so a replicate's size varies when instances
    hold different numbers of seeds."""
    instances, strata = np.asarray(instances), np.asarray(strata)
    labels = np.unique(instances)  # (I,)
    I = len(labels)
    counts = np.zeros((n_boot, len(strata)), dtype=np.int32)
    picks = rng.integers(0, I, size=(n_boot, I))  # (R, I) which instance each draw is
    times = np.stack([(picks == i).sum(1) for i in range(I)], axis=1)  # (R, I) draws of each instance
    rows = np.arange(n_boot)[:, None]
    for i, label in enumerate(labels):
        for group in np.unique(strata[instances == label]):
            members = np.flatnonzero((instances == label) & (strata == group))  # (S_ik,)
            n = len(members)
            draws = rng.integers(0, n, size=(n_boot, I * n))  # (R, I·S_ik) enough for I draws
            live = np.arange(I * n)[None, :] < (times[:, i] * n)[:, None]  # (R, I·S_ik) the used ones
            np.add.at(counts, (np.broadcast_to(rows, draws.shape)[live], members[draws][live]), 1)
    return counts


def trimmed_mean(values: np.ndarray, counts: np.ndarray, trim: float = 0.25, chunk: int = 64) -> np.ndarray:
    """Trimmed mean over seeds of every resample: values (S, K) (NaN = missing, ±inf allowed),
    counts (R, S) → (R, K). trim=0.25 is the interquartile mean (IQM), trim=0.5 the median.
    A resample whose kept middle contains an infinite value gets that infinity; one with no
    data at a column gets NaN. Fractional boundary observations get fractional weight.
    Works on the sorted values with the resample counts (no resampled copies); chunks of R."""
    values = np.asarray(values, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int32)
    R, K = counts.shape[0], values.shape[1]
    if values.shape[0] == 0:  # no seeds: no data at any column
        return np.full((R, K), np.nan)
    missing = np.isnan(values)
    order = np.argsort(np.where(missing, np.inf, values), axis=0, kind="stable")  # (S, K), NaNs last
    sorted_vals = np.take_along_axis(values, order, axis=0)  # (S, K)
    valid = ~np.take_along_axis(missing, order, axis=0)  # (S, K)
    safe = np.clip(np.where(np.isfinite(sorted_vals), sorted_vals, 0.0), -BIG, BIG)  # (S, K)
    # float32 sums on values of order 1: each column divided by its median magnitude; a column whose
    # finite values span more than float32 can hold around it (a frozen seed at 1e279 beside 1e-2)
    # is summed in float64 instead, so no value is rounded to 0 or to inf
    mags = np.where(np.isfinite(sorted_vals) & (sorted_vals != 0), np.abs(safe), np.nan)
    scale = _nanmedian_cols(mags)[None, :]  # (1, K)
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    with np.errstate(over="ignore", under="ignore"):
        rel = np.abs(safe) / scale  # (S, K)
    wide = ((rel > F32_SPAN) | ((rel < 1 / F32_SPAN) & (safe != 0))).any(0)  # (K,)
    safe32 = np.where(wide[None, :], 0.0, safe / scale).astype(np.float32)
    pos, neg = sorted_vals == np.inf, sorted_vals == -np.inf  # (S, K)
    # sorted: the -inf values first, then finite ones, then +inf, then NaN. Which resamples keep an
    # infinity in their middle follows from the cumulative counts at the block edges (no (r, S, K) pass)
    n_neg = neg.sum(0)  # (K,)
    first_pos = (valid & ~pos).sum(0)  # (K,) index of the first +inf (= number of valid when none)
    any_inf = bool(pos.any() or neg.any())
    counts = counts.astype(np.float32)
    out = np.empty((R, K))
    for start in range(0, R, chunk):
        c = counts[start:start + chunk][:, order]  # (r, S, K) resample count of each sorted value (float32)
        if not valid.all():
            c *= valid[None]
        cum = _cumsum_axis1(c)  # (r, S, K) exact: integers < 2^24
        n = cum[:, -1, :].copy()  # (r, K) resample size at each column (cum is reused in place below)
        if trim >= 0.5:  # median: the unit-width window around the middle
            lo, hi = 0.5 * n - 0.5, 0.5 * n + 0.5
        else:
            lo, hi = trim * n, (1.0 - trim) * n
        if any_inf:
            before_pos = _count_before(cum, first_pos)  # (r, K) resampled values before the +inf block
            upto_neg = _count_before(cum, n_neg)  # (r, K) resampled -inf values
        weight = np.minimum(cum, hi[:, None, :])  # (r, S, K)
        cum -= c  # in place: the count before each value
        np.maximum(cum, lo[:, None, :], out=cum)
        weight -= cum
        np.clip(weight, 0.0, None, out=weight)
        wsum = weight.sum(axis=1, dtype=np.float64)  # (r, K)
        total = np.einsum("rsk,sk->rk", weight, safe32).astype(np.float64) * scale
        if wide.any():
            total[:, wide] = np.einsum("rsk,sk->rk", weight[:, :, wide].astype(np.float64), safe[:, wide])
        with np.errstate(invalid="ignore", divide="ignore"):
            block = total / wsum
        if any_inf:
            has_pos = np.minimum(n, hi) > np.maximum(before_pos, lo)  # the +inf block has weight
            has_neg = np.minimum(upto_neg, hi) > np.maximum(0.0, lo)  # the -inf block has weight
            block = np.where(has_pos & ~has_neg, np.inf, np.where(has_neg & ~has_pos, -np.inf, block))
            block = np.where(has_pos & has_neg, np.nan, block)
        out[start:start + chunk] = np.where(n > 0, block, np.nan)
    return out


def _nanmedian_cols(values: np.ndarray) -> np.ndarray:
    """Median of each column's non-NaN values, NaN for an all-NaN column (no RuntimeWarning). (K,)"""
    n = (~np.isnan(values)).sum(0)  # (K,)
    srt = np.sort(values, axis=0)  # NaNs last
    lo = np.take_along_axis(srt, np.maximum((n - 1) // 2, 0)[None, :], axis=0)[0]
    hi = np.take_along_axis(srt, np.maximum(n // 2, 0)[None, :], axis=0)[0]
    return np.where(n > 0, 0.5 * lo + 0.5 * hi, np.nan)


def _cumsum_axis1(c: np.ndarray) -> np.ndarray:
    """np.cumsum(c, axis=1) of (r, S, K) as S vectorised (r, K) additions: numpy's cumsum along a
    middle axis is ~8x slower than this loop (measured for S = 80, K = 106)."""
    cum = c.copy()
    for s in range(1, cum.shape[1]):
        np.add(cum[:, s], cum[:, s - 1], out=cum[:, s])
    return cum


def _count_before(cum: np.ndarray, index: np.ndarray) -> np.ndarray:
    """cum (r, S, K) cumulative counts along the sorted axis, index (K,) → (r, K) the count of
    entries before position index[k] (0 when index is 0)."""
    at = np.take_along_axis(cum, np.maximum(index - 1, 0)[None, None, :], axis=1)[:, 0]
    return np.where(index > 0, at, 0.0)


def iqm(values: np.ndarray, axis: int = 0) -> np.ndarray:
    """Interquartile mean of values along axis (seeds), NaN = missing, inf kept (point estimate)."""
    moved = np.moveaxis(np.asarray(values, dtype=np.float64), axis, 0)
    flat = moved.reshape(moved.shape[0], -1)  # (S, K)
    out = trimmed_mean(flat, np.ones((1, flat.shape[0]), dtype=np.int32), 0.25)[0]
    return out.reshape(moved.shape[1:])


def batched_slope(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ordinary least squares y ≈ a + p·x for every row of y (R, K) sharing x (K,), using only the
    finite entries of each row. Returns (p, a), each (R,); NaN where fewer than 2 points."""
    y = np.atleast_2d(np.asarray(y, dtype=np.float64))
    w = np.isfinite(y).astype(np.float64)  # (R, K)
    ys = np.where(w > 0, y, 0.0)
    n = w.sum(1)
    sx, sy = w @ x, ys.sum(1)
    sxx, sxy = w @ (x * x), ys @ x
    den = n * sxx - sx * sx
    with np.errstate(invalid="ignore", divide="ignore"):
        p = (n * sxy - sx * sy) / den
        a = (sy - p * sx) / n
    bad = (n < 2) | (np.abs(den) < 1e-12 * np.maximum(n * sxx, 1e-300))
    return np.where(bad, np.nan, p), np.where(bad, np.nan, a)


def expanded_alpha(alpha: float, n: int) -> float:
    """Hesterberg's expanded percentile interval: the tail mass to use so that a percentile
    bootstrap interval from n independent units has the width of a t interval (the plain
    percentile interval is too narrow for small n). Falls back to alpha for n < 2."""
    if n < 2:
        return alpha
    t = sps.t.ppf(1 - alpha / 2, df=n - 1)
    return float(2 * sps.norm.cdf(-np.sqrt(n / (n - 1)) * t))


def percentile_ci(replicates: np.ndarray, alpha: float = 0.05, n_units: int | None = None,
                  expand: bool = True, estimate: float | None = None) -> tuple[float, float]:
    """Bootstrap interval of the finite replicates at level 1−alpha: percentile, expanded for
    n_units independent units (seeds) if expand, and bias-corrected (BC, Efron 1987) when the
    point estimate is given: the quantiles move by twice z0 = Φ⁻¹(share of replicates below the
    estimate). NaN replicates (undefined) are left out; ±inf replicates are kept as the extreme
    values (a replicate with no evidence of a finite rate, p = +inf, pushes the upper end and may
    make it +inf). (nan, nan) when under half the replicates are defined."""
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[~np.isnan(reps)]
    if reps.size < 10 or reps.size < 0.5 * np.asarray(replicates).size:
        return float("nan"), float("nan")
    a = expanded_alpha(alpha, n_units) if (expand and n_units) else alpha
    z = sps.norm.ppf(1 - a / 2)
    z0 = 0.0
    if estimate is not None and np.isfinite(estimate):
        share = (np.sum(reps < estimate) + 0.5 * np.sum(reps == estimate)) / reps.size
        z0 = float(sps.norm.ppf(np.clip(share, 1.0 / reps.size, 1 - 1.0 / reps.size)))
    q = sps.norm.cdf([2 * z0 - z, 2 * z0 + z])
    big = 1e300  # ±inf as a sentinel, so that a quantile between a finite value and inf is inf
    lo, hi = np.quantile(np.clip(reps, -big, big), q)
    lo, hi = (v if abs(v) < 1e299 else float(np.sign(v) * np.inf) for v in (lo, hi))
    return float(lo), float(hi)
