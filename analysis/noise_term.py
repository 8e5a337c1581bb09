"""The algorithm's noise term: where a run has reached the regime its rate is the rate of.

An algorithm that knows the term its rate comes from logs it beside the metric, as the column
`<metric>_noise` (reward_mle: `reward_err_noise`, E[reward_err] of its SGD linearised at the truth,
algorithms/reward_mle.py). The analysis never imports the algorithm: it reads that column, and a
rate fitted where the measured metric is still well above the noise term is the rate of something
else (a transient, a non-quadratic phase). docs/analysis.md, "The algorithm's noise term"."""
from __future__ import annotations

import numpy as np
from ratebench.analysis.stats import trimmed_mean

NOISE_SUFFIX = "_noise"  # the column `<metric>_noise` holds the algorithm's predicted noise term of `<metric>`


def noise_column(metric: str) -> str:
    return metric + NOISE_SUFFIX


def ratio_curve(values: np.ndarray, noise: np.ndarray | None) -> np.ndarray | None:
    """(P,) the interquartile mean over seeds of metric / noise term at every evaluation point: how many
    times its noise term the typical seed is. The IQM, like the fit's IQM n_hit: the noise term is an
    expectation, and early excursions of a few seeds move the mean without moving n_hit. values, noise
    (S, P); a seed that is +inf (diverged, saturated) counts as +inf, seeds without a finite positive noise
    term or a value at a point are left out there; NaN where none is left. None without a noise term."""
    if noise is None:
        return None
    usable = np.isfinite(noise) & (noise > 0) & ~np.isnan(values)  # (S, P)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_seed = np.where(usable, values / np.where(usable, noise, 1.0), np.nan)
    return trimmed_mean(per_seed, np.ones((1, values.shape[0]), np.int32))[0]


def end_level(x: np.ndarray, values: np.ndarray, noise: np.ndarray, decades: float) -> float:
    """Σ metric / Σ noise term over the seeds and the points of the last `decades` decades of x: the mean
    ratio at the end of the run, the quantity the noise term predicts (an expectation; the IQM of a skewed
    per-seed ratio sits well below 1 in the regime). +inf when a seed is +inf there; NaN without data."""
    with np.errstate(divide="ignore"):
        end = (x > 0) & (np.log10(np.where(x > 0, x, 1.0)) >= np.log10(x.max()) - decades - 1e-9)
    usable = np.isfinite(noise[:, end]) & ~np.isnan(values[:, end])
    if (usable & np.isinf(values[:, end])).any():
        return float("inf")
    den = np.where(usable, noise[:, end], 0.0).sum()
    return float(np.where(usable, values[:, end], 0.0).sum() / den) if den > 0 else float("nan")
