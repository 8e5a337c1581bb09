"""Exact checks of the analysis building blocks: n_hit against its definition, trimmed means of
resample counts against explicit resamples, stratified bootstrap, least squares, floor fit."""
from __future__ import annotations

import numpy as np
import pytest
from ratebench.analysis.curves import eps_grid, n_hit
from ratebench.analysis.fit import fit_floor
from ratebench.analysis.stats import batched_slope, bootstrap_counts, expanded_alpha, trimmed_mean
from scipy import stats as sps

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # numerical trouble is a status, never a warning


def nhit_by_definition(x, v, eps):
    """First evaluated x after which v stays <= eps (NaN points skipped); inf if never."""
    pts = [(xi, vi) for xi, vi in zip(x, v) if not np.isnan(vi)]
    for j, (xj, _) in enumerate(pts):
        if all(vk <= eps for _, vk in pts[j:]):
            return xj
    return np.inf


def test_n_hit_matches_definition_with_gaps_and_divergence():
    rng = np.random.default_rng(0)
    x = np.array([0, 8, 16, 32, 64, 128, 256, 512], float)
    v = np.exp(rng.standard_normal((12, 8))) * x.clip(1) ** -0.5  # (S, P) noisy, non-monotone
    v[2, 5:] = np.inf  # diverged at 128
    v[3, ::3] = np.nan  # missing points
    v[4, 6:] = np.nan  # seed evaluated only to 128
    eps = np.array([2.0, 0.5, 0.2, 0.1, 0.05, 0.01])
    got = n_hit(x, v, eps)
    want = np.array([[nhit_by_definition(x, v[s], e) for e in eps] for s in range(12)])
    np.testing.assert_array_equal(got, want)
    assert np.isinf(got[2]).all()  # a diverged seed never stays below any eps


def test_eps_grid_is_shared_and_spans_the_values():
    a = eps_grid(np.array([[0.3, 0.002]]), 10)
    b = eps_grid(np.array([[0.05, 0.0004]]), 10)
    assert a.max() >= 0.3 and a.min() <= 0.002 and np.all(np.diff(a) < 0)
    common = np.intersect1d(np.round(np.log10(a) * 10), np.round(np.log10(b) * 10))
    assert len(common) >= 10  # the same levels 10^(k/10) in both groups
    np.testing.assert_allclose(np.log10(a) * 10, np.round(np.log10(a) * 10), atol=1e-9)


@pytest.mark.parametrize("S", [4, 8, 12])
def test_trimmed_mean_equals_explicit_resamples(S):
    """Sums run in float32 on values scaled to their column maximum: agreement to 1e-6 of that."""
    rng = np.random.default_rng(S)
    v = rng.standard_normal((S, 6))
    v[0, 2] = np.inf
    v[1, 3] = -np.inf
    counts = bootstrap_counts(np.zeros(S), 300, rng)
    iqm, med = trimmed_mean(v, counts), trimmed_mean(v, counts, trim=0.5)
    tol = np.abs(v[np.isfinite(v)]).max()
    for r in range(300):
        res = np.repeat(v, counts[r], axis=0)  # the explicit resample (S, 6)
        np.testing.assert_allclose(med[r], np.median(res, axis=0), rtol=1e-6, atol=1e-6 * tol)
        k = S // 4  # S divisible by 4: the IQM is the plain 25%-trimmed mean
        srt = np.sort(res, axis=0)[k:S - k]
        want = np.where(np.isinf(srt).any(0), srt[np.argmax(np.isinf(srt), 0), np.arange(6)], srt.mean(0))
        np.testing.assert_allclose(iqm[r], want, rtol=1e-6, atol=1e-6 * tol)
        with np.errstate(invalid="ignore"):
            fin = np.isfinite(res).all(0)
        np.testing.assert_allclose(iqm[r][fin], sps.trim_mean(res[:, fin], 0.25, axis=0), rtol=1e-6, atol=1e-6 * tol)


def test_trimmed_mean_skips_missing_values():
    v = np.array([[1.0], [2.0], [np.nan], [3.0], [4.0]])
    got = trimmed_mean(v, np.ones((1, 5), np.int32))
    assert got[0, 0] == pytest.approx(2.5)  # IQM of 1,2,3,4: half of 2 and 3 ... = (2 + 3)/2


def test_bootstrap_is_stratified_by_configuration():
    strata = np.array(["a"] * 3 + ["b"] * 5 + ["c"] * 1)
    counts = bootstrap_counts(strata, 500, np.random.default_rng(1))  # (R, S)
    for label, size in (("a", 3), ("b", 5), ("c", 1)):
        assert (counts[:, strata == label].sum(1) == size).all()
    assert counts[:, :3].std() > 0  # actually resampled


def test_batched_slope_equals_polyfit_and_skips_non_finite():
    rng = np.random.default_rng(2)
    x = np.linspace(0, 3, 9)
    y = 1.5 + 0.7 * x[None] + rng.standard_normal((4, 9))
    y[1, 2] = np.inf
    p, a = batched_slope(x, y)
    for r in range(4):
        ok = np.isfinite(y[r])
        want = np.polyfit(x[ok], y[r, ok], 1)
        assert p[r] == pytest.approx(want[0]) and a[r] == pytest.approx(want[1])


def test_expanded_alpha_matches_t_width():
    # n=5: the percentile interval must stretch to the width of a t interval with 4 df
    a = expanded_alpha(0.05, 5)
    assert sps.norm.ppf(1 - a / 2) == pytest.approx(np.sqrt(5 / 4) * sps.t.ppf(0.975, 4))
    assert expanded_alpha(0.05, 10_000) == pytest.approx(0.05, rel=1e-3)


@pytest.mark.parametrize("b,c,A", [(0.3, 0.0, 2.0), (1.0, 1e-3, 1.0), (0.5, 0.02, 3.0), (2.0, 0.0, 0.5)])
def test_floor_fit_recovers_exact_curves(b, c, A):
    x = np.logspace(1, 5, 40)
    b_hat, c_hat, A_hat = fit_floor(x, (c + A * x ** -b)[None])
    assert b_hat[0] == pytest.approx(b, rel=1e-4)
    assert c_hat[0] == pytest.approx(c, rel=1e-3, abs=1e-8)
    assert A_hat[0] == pytest.approx(A, rel=1e-3)
