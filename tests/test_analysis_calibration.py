"""Calibration of the rate fitter on synthetic curves n ↦ A·n^-b·noise (+ floor) with known b:
coverage of the 95% seed-bootstrap CIs of p = 1/b and of b, and exclusion of an error floor; and of
the verdicts on curves that are not power laws (analysis/calibration.py): false PASS on curves
violating the claim somewhere in its ε range, PASS rate on honest power laws."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from ratebench.analysis.calibration import SCENARIOS, run_scenario
from ratebench.analysis.fit import FitOptions, fit_rate
from ratebench.analysis.synthetic import synthetic_curves

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # numerical trouble is a status, never a warning

# Seeded grid: decay exponents (b = 2/7 is the paper's ε^-7/2 on a gap), seed counts, noise
# (per-seed level σ_s, per-point σ_p, AR(1) correlation of the point noise ρ); 13 repetitions
# per cell → 208 fits with 2,000 bootstrap replicates each.
B_VALUES = (2 / 7, 0.5, 1.0, 2.0)
SEED_COUNTS = (6, 12)
NOISES = ((0.3, 0.1, 0.0), (0.3, 0.2, 0.8))
REPS_PER_CELL = 13


@pytest.fixture(scope="module")
def calibration():
    rows = []
    for cell, (b, S, (sn, pn, rho)) in enumerate(itertools.product(B_VALUES, SEED_COUNTS, NOISES)):
        rng = np.random.default_rng(1000 + cell)
        for r in range(REPS_PER_CELL):
            curves = synthetic_curves(b, S, rng, seed_noise=sn, point_noise=pn, rho=rho)
            fit = fit_rate(curves, FitOptions(n_boot=2000, seed=r))
            rows.append((b, fit))
    return rows


def test_grid_has_at_least_200_fits_and_nearly_all_succeed(calibration):
    """Every fit has a p CI; a window under a decade of ε is `too_narrow` (never ok), exactly the
    b = 2/7 fits here: n_hit over the last 4 decades of 1e5 samples minus the 0.5-decade tail is
    3.5·2/7 = 1 decade at best. (Before issue 10 these were 'ok'; that was the wrong behaviour.)"""
    assert len(calibration) >= 200
    fitted = [f.status in ("ok", "too_narrow") for _, f in calibration]
    assert np.mean(fitted) >= 0.95, [f.reason for _, f in calibration if not f.status.startswith("too_n")][:5]
    for b, f in calibration:
        if f.status in ("ok", "too_narrow"):
            assert (f.status == "too_narrow") == (np.log10(f.eps_high / f.eps_low) < 1 - 1e-9)
    assert all(f.status == "ok" for b, f in calibration if b >= 1)


def test_p_ci_covers_truth_at_nominal_rate(calibration):
    """If the true coverage is 95%, a pooled coverage outside [0.90, 0.99] over 208 fits has
    probability < 1% (binomial); the grid is seeded, so the outcome is reproducible. The CI is
    selection-aware (the window re-selected in every replicate)."""
    fits = [(b, f) for b, f in calibration if np.isfinite(f.p_low)]
    covered = [f.p_low <= 1 / b <= f.p_high for b, f in fits]
    assert 0.90 <= np.mean(covered) <= 0.99, np.mean(covered)


def test_b_ci_covers_truth_at_nominal_rate(calibration):
    fits = [(b, f) for b, f in calibration if np.isfinite(f.b_low)]
    covered = [f.b_low <= b <= f.b_high for b, f in fits]
    assert len(fits) >= 200
    assert 0.90 <= np.mean(covered) <= 0.99, np.mean(covered)


@pytest.mark.parametrize("b", B_VALUES)
def test_estimates_recover_truth(calibration, b):
    fits = [f for bb, f in calibration if bb == b and f.status in ("ok", "too_narrow")]
    p_hat = np.array([f.p for f in fits])
    b_hat = np.array([f.b for f in fits])
    assert np.median(np.abs(p_hat * b - 1)) < 0.05  # p̂ within 5% of 1/b (median over the cell)
    assert np.median(np.abs(b_hat / b - 1)) < 0.03


@pytest.mark.parametrize("b,A,floor", [(1.0, 10.0, 3e-4), (0.5, 3.0, 5e-3)])
def test_window_excludes_an_injected_floor(b, A, floor):
    """metric = floor + A·n^-b·noise, the floor reached within the budget: the floor is found,
    the window stays above it (≥ floor_factor·ĉ), and the floor rule removed levels that the
    seeds did reach (without it the window would reach into the floor)."""
    curves = synthetic_curves(b, 16, np.random.default_rng(7), floor=floor, A=A)
    opts = FitOptions(n_boot=2000)
    fit = fit_rate(curves, opts)
    assert fit.status == "ok"
    assert fit.c_low <= floor <= fit.c_high
    assert fit.c == pytest.approx(floor, rel=0.25)
    assert fit.eps_low >= opts.floor_factor * fit.c
    assert fit.eps_low >= 5 * floor
    levels = fit.arrays["levels"]
    assert (~levels["rule_floor"] & levels["rule_reach"]).any()  # the floor rule did remove reachable levels
    assert abs(fit.p * b - 1) < 0.2  # above the floor the local slope is close to 1/b


def test_no_floor_is_reported_when_there_is_none():
    curves = synthetic_curves(1.0, 16, np.random.default_rng(8))
    fit = fit_rate(curves, FitOptions(n_boot=500))
    assert fit.c < 1e-2 * fit.final_iqm


# ---------------------------------------------------------------------------------------------- verdicts on non-power-laws

CI_REPS, CI_BOOT = 20, 500  # CI-sized; `python -m ratebench.analysis.calibration` runs 100 × 2,000 (docs/analysis.md)


@pytest.fixture(scope="module")
def scenarios():
    return {name: run_scenario(name, CI_REPS, CI_BOOT) for name in SCENARIOS}


@pytest.mark.parametrize("name", [n for n, sc in SCENARIOS.items() if sc.kind in ("violates", "uncovered")])
def test_no_false_pass_on_curves_that_violate_or_do_not_cover_the_claim(scenarios, name):
    """Curves violating the claim somewhere in its ε range (slower tail, floors, phase change) or not
    covering it: at most 1 PASS in 20 (seeded). The full run measures 0/100 in every scenario; a
    true false-PASS rate of 5 % would give ≥ 2 of 20 with probability 0.26, of 20 % with 0.93."""
    assert scenarios[name]["PASS"] <= 1, scenarios[name]


@pytest.mark.parametrize("name", [n for n, sc in SCENARIOS.items() if sc.kind == "holds"])
def test_honest_power_laws_reaching_eps_min_pass(scenarios, name):
    """No blanket INCONCLUSIVE: n^-1 (claim p ≤ 1.5) and n^-1/2 (claim p ≤ 3) reaching ε_min PASS in
    ≥ 18 of 20 (the full run: 100/100 each)."""
    assert scenarios[name]["PASS"] >= 18, scenarios[name]
