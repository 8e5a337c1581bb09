"""Transient or rate (docs/analysis.md): the window chosen from the tail, the `asymptotic` flag and its
effect on verdicts, and the budget projection to a claim's ε_min. Synthetic curves with known exponents
and transients; the real-run acceptance case (reward_mle, a = 0.6, 4·10^5 samples, an instance that
tuned nothing) is in the slow tier (tests/test_coverage_reward_mle.py)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from ratebench.analysis.claims import INCONCLUSIVE, PASS, parse_claim, verdict
from ratebench.analysis.curves import Curves
from ratebench.analysis.fit import FitOptions, RateFit, fit_rate
from ratebench.analysis.synthetic import evaluation_grid, synthetic_curves

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def transient_curves(rng, n_seeds=16, budget=4e5, a=0.6, B=0.0, c=0.0, A=30.0, point_noise=0.3):
    """metric = (A·n^-a + B·exp(−c·n^(1−a)))·exp(0.3 z_s + σ_p e_{s,j}): SGD's t^-a noise term under the
    stretched-exponential forgetting of the start (Moulines & Bach 2011); the rate is p = 1/a."""
    x = evaluation_grid(budget)
    n = np.maximum(x, 1.0)
    clean = A * n ** -a + B * np.exp(-c * n ** (1 - a))
    v = clean[None] * np.exp(0.3 * rng.standard_normal((n_seeds, 1)) + point_noise * rng.standard_normal((n_seeds, len(x))))
    seeds = pd.DataFrame({"seed": np.arange(n_seeds), "status": "completed", "config_hash": "h", "run_dir": "r"})
    return Curves("reward_err", "samples", x, v, np.array(["h"] * n_seeds), seeds, np.ones(n_seeds, bool))


def test_power_law_is_asymptotic_and_covered():
    """n^-0.6 with point noise 0.3, 16 seeds, 10 fits (fixed seed): every CI covers 1/a and none is
    flagged (a false alarm has probability ≲ 5 % per fit by construction of the 95 % equivalence CI;
    10 of 10 is what was measured)."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        fit = fit_rate(transient_curves(rng), FitOptions(n_boot=1000))
        assert fit.asymptotic, fit.asymptotic_reason
        assert fit.p_low <= 1 / 0.6 <= fit.p_high and abs(fit.p - 1 / 0.6) <= 0.25


@pytest.mark.parametrize("B,c", [(340.0, 0.2), (60.0, 0.2)])
def test_strong_transient_is_flagged_not_fitted(B, c):
    """The forgetting term dominates the first 2–3 decades of x: no fit may cover 1/a confidently
    wrong; each is flagged (10 fits each, fixed seed)."""
    rng = np.random.default_rng(1)
    for _ in range(10):
        fit = fit_rate(transient_curves(rng, B=B, c=c), FitOptions(n_boot=1000))
        covered = fit.p_low <= 1 / 0.6 <= fit.p_high and abs(fit.p - 1 / 0.6) <= 0.25
        assert covered or not fit.asymptotic, (fit.p, fit.p_low, fit.p_high)
        assert not fit.asymptotic and fit.asymptotic_reason


def test_the_window_is_cut_from_the_top_under_a_transient():
    """A fast early phase over n^-1: the split test cuts the window's top until its two halves agree;
    the chosen window lies below the cut and p̂ there is the tail's."""
    curves = synthetic_curves(1.0, 16, np.random.default_rng(2), budget=1e6, A=1.0, tail_A=0.0)
    base = fit_rate(curves, FitOptions(n_boot=500))
    assert base.arrays["stability"]["cut"] == 0 and base.asymptotic  # a clean power law is not cut
    x = curves.x
    n = np.maximum(x, 1.0)
    bump = 300.0 * np.exp(-0.3 * n ** 0.5)  # a transient over the first ~2 decades of x
    curves.values = curves.values + bump[None, :] * np.exp(0.1 * np.random.default_rng(3).standard_normal(curves.values.shape))
    fit = fit_rate(curves, FitOptions(n_boot=500))
    st = fit.arrays["stability"]
    assert st["cut"] > 0 and not st["tests"][0]["stable"]
    assert fit.eps_high <= st["tests"][0]["eps_top"] / 10 ** st["cut"] * (1 + 1e-9)
    uncut = fit_rate(curves, FitOptions(n_boot=500, stable_tol=np.inf, tail_tol=np.inf))  # the window before the cut
    assert abs(fit.p - 1.0) <= 0.05 and abs(uncut.p - 1.0) > 2 * abs(fit.p - 1.0), (fit.p, uncut.p)


def _fit(**kw) -> RateFit:
    base = dict(metric="gap", x_name="samples", status="ok", reason="", p=1.0, p_low=0.9, p_high=1.1, b=1.0, b_low=0.9,
                b_high=1.1, n_levels=40, n_seeds=16, c=0.0, c_low=0.0, c_high=0.0, final_iqm=1e-3, decay=1.0,
                decay_low=0.9, decay_high=1.1, eps_low=1e-3, eps_high=1.0, window_decades=3.0, reach_eps_min=1.0,
                p_local=1.0, p_local_low=0.9, p_local_high=1.1, p_trend=0.0)
    base.update(kw)
    return RateFit(**base)


def test_a_fit_that_is_not_asymptotic_is_inconclusive_with_its_reason():
    claim = parse_claim({"id": "t", "source": "s", "algorithm": "a", "experiment": "e", "metric": "gap", "x": "samples",
                         "exponent": 1.0, "relation": "equals", "tolerance": 0.2,
                         "epsilon": {"unit": "gap", "min": 1e-3, "max": 1.0}})
    assert verdict(claim, _fit()).verdict == PASS  # the same fit, asymptotic: PASS
    v = verdict(claim, _fit(asymptotic=False, asymptotic_reason="the window's exponent is not the tail's"))
    assert v.verdict == INCONCLUSIVE and v.reason == "not asymptotic: the window's exponent is not the tail's"
    wrong = parse_claim({"id": "w", "source": "s", "algorithm": "a", "experiment": "e", "metric": "gap", "x": "samples",
                         "exponent": 2.0, "relation": "equals", "tolerance": 0.2,
                         "epsilon": {"unit": "gap", "min": 1e-3, "max": 1.0}})
    assert verdict(wrong, _fit(asymptotic=False, asymptotic_reason="r")).verdict == INCONCLUSIVE  # not VIOLATED either


def test_budget_to_eps_min_matches_a_longer_run():
    """n^-1 over 10^4 samples cannot reach ε_min = 1e-5; the projection from its fitted line must say
    what a run that does reach it needs: n_hit(1e-5) ≈ 1e5 (the curve 1·n^-1, low noise), times 10^0.5
    for the tail rule. Checked against the same curve run to 10^6.5 samples, whose window reaches ε_min."""
    opts = FitOptions(n_boot=300, eps_min=1e-5, eps_max=1.0)
    short = fit_rate(synthetic_curves(1.0, 8, np.random.default_rng(4), budget=1e4, seed_noise=0.05, point_noise=0.02),
                     opts)
    assert short.eps_low > 1e-5 * 10 ** 0.05
    need = short.budget_to_eps_min
    assert 10 ** 5.3 <= need <= 10 ** 5.7, need
    long = fit_rate(synthetic_curves(1.0, 8, np.random.default_rng(5), budget=10 ** 5.7, seed_noise=0.05,
                                     point_noise=0.02), opts)
    assert long.eps_low <= 1e-5 * 10 ** 0.05 * (1 + 1e-9)  # at the projected budget the window does reach ε_min
    assert np.isnan(long.budget_to_eps_min)  # reached: not applicable
    assert np.isnan(fit_rate(synthetic_curves(1.0, 8, np.random.default_rng(4), budget=1e4),
                             FitOptions(n_boot=100)).budget_to_eps_min)  # no claim range
    floor = fit_rate(synthetic_curves(1.0, 8, np.random.default_rng(6), budget=1e5, floor=1e-3), opts)
    assert floor.c > 0 and floor.budget_to_eps_min == np.inf  # under the floor: never
    assert "budget_to_eps_min" in short.row()
