"""Cross-group statistics: the difference of two sample-complexity exponents, p̂_a − p̂_b, with a
*paired* bootstrap CI. The resampling unit is explicit: the (instance, seed) pairs both groups ran;
each replicate draws instances with replacement, then seeds within each drawn instance
(stats.hierarchical_counts; seeds alone with one instance), and applies the same draw to both groups,
so that what the seeds share (the instance, the seed's data) cancels in the difference."""
from __future__ import annotations

import numpy as np
import pandas as pd
from ratebench.analysis.curves import Curves
from ratebench.analysis.fit import FitOptions, RateFit, fit_rate
from ratebench.analysis.groups import distinct_curves
from ratebench.analysis.stats import bootstrap_counts, hierarchical_counts, percentile_ci


def fitted_units(curves: Curves) -> list[tuple[int, int]]:
    """(instance, seed) of every fitted row of curves, in row order. (S,)"""
    seeds = curves.seeds[np.asarray(curves.used, bool)]["seed"].to_numpy()
    return [(int(i), int(s)) for i, s in zip(curves.instances, seeds)]


def restrict(curves: Curves, keep: np.ndarray) -> Curves:
    """The fitted rows `keep` (S,) bool of curves, as Curves of their own (failed seeds left out)."""
    fitted = curves.seeds[np.asarray(curves.used, bool)].reset_index(drop=True)[keep].reset_index(drop=True)
    return Curves(curves.metric, curves.x_name, curves.x, curves.values[keep], curves.strata[keep], fitted,
                  np.ones(int(keep.sum()), bool), curves.instances[keep],
                  noise=None if curves.noise is None else curves.noise[keep])


def paired_counts(units: list[tuple[int, int]], n_boot: int, rng: np.random.Generator) -> tuple[np.ndarray, int, str]:
    """Resample counts (R, U) over the shared units: hierarchical (instances, then seeds within each)
    with ≥ 2 instances, else seeds. Returns (counts, independent units, unit name)."""
    instances = np.array([i for i, _ in units])
    one_stratum = np.zeros(len(units), np.int64)
    n_inst = len(np.unique(instances))
    if n_inst >= 2:
        return hierarchical_counts(instances, one_stratum, n_boot, rng), n_inst, "instance"
    return bootstrap_counts(one_stratum, n_boot, rng), len(units), "seed"


def exponent_difference(a: Curves, b: Curves, opts: FitOptions = FitOptions()) -> dict:
    """p̂_a − p̂_b on the (instance, seed) pairs both groups hold, with a 95% paired bootstrap CI (the
    same resample of shared units for both fits; each fit re-selects its window per replicate, and a
    replicate with p = +inf in either group gives ±inf or NaN, left out as undefined when NaN).
    Seeds of one run with bit-identical curves count once in each group (groups.distinct_curves), as in `check`.
    Returns the fits and {diff, diff_low, diff_high, n_shared, n_units, boot_unit, status, reason, copies,
    n_distinct}."""
    a, copies_a = distinct_curves(a)
    b, copies_b = distinct_curves(b)
    units_a, units_b = fitted_units(a), fitted_units(b)
    shared = sorted(set(units_a) & set(units_b))
    out = {"n_shared": len(shared), "diff": np.nan, "diff_low": np.nan, "diff_high": np.nan, "n_units": 0,
           "boot_unit": "", "status": "ok", "reason": "", "fit_a": None, "fit_b": None,
           "copies": {"A": copies_a, "B": copies_b}, "n_distinct": (len(a.values), len(b.values))}
    if len(shared) < opts.min_seeds:
        out.update(status="too_few_shared", reason=f"{len(shared)} (instance, seed) pairs in both groups, "
                                                   f"need ≥ {opts.min_seeds}")
        return out
    index = {u: k for k, u in enumerate(shared)}
    counts, n_units, unit = paired_counts(shared, opts.n_boot, np.random.default_rng(opts.seed))  # (R, U)
    fits: list[RateFit] = []
    for curves, units in ((a, units_a), (b, units_b)):
        keep = np.array([u in index for u in units])
        rows = np.array([index[u] for u in units if u in index])  # (S',) which shared unit each row is
        fits.append(fit_rate(restrict(curves, keep), opts, resample=(counts[:, rows], n_units, unit)))
    fa, fb = fits
    out.update(fit_a=fa, fit_b=fb, n_units=n_units, boot_unit=unit)
    if fa.p_reps is None or fb.p_reps is None or not (np.isfinite(fa.p) and np.isfinite(fb.p)):
        out.update(status="no_exponent", reason=f"no p̂ in {'the first' if fa.p_reps is None else 'the second'} "
                                                f"group ({fa.status if fa.p_reps is None else fb.status})")
        return out
    with np.errstate(invalid="ignore"):
        diff_reps = fa.p_reps - fb.p_reps  # (R,) inf − inf = NaN: undefined, left out
    out["diff"] = fa.p - fb.p
    out["diff_low"], out["diff_high"] = percentile_ci(diff_reps, opts.alpha, n_units)
    if fa.status != "ok" or fb.status != "ok":
        out.update(status="not_ok", reason=f"fit status {fa.status} / {fb.status}: read the difference with care")
    return out


def difference_table(groups: list[tuple[str, Curves]], opts: FitOptions = FitOptions()) -> pd.DataFrame:
    """One row per pair (a, b) of the named groups, a before b in the given order: p̂_a, p̂_b and the
    paired difference p̂_a − p̂_b with its CI (exponent_difference)."""
    rows = []
    for i, (name_a, a) in enumerate(groups):
        for name_b, b in groups[i + 1:]:
            d = exponent_difference(a, b, opts)
            fa, fb = d.pop("fit_a"), d.pop("fit_b")
            rows.append({"a": name_a, "b": name_b, "p_a": fa.p if fa else np.nan, "p_b": fb.p if fb else np.nan,
                         **d})
    return pd.DataFrame(rows, columns=["a", "b", "p_a", "p_b", "diff", "diff_low", "diff_high", "n_shared",
                                       "n_units", "boot_unit", "status", "reason"])
