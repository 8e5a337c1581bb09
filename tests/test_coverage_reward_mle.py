"""Real-run coverage of the rate fit (docs/analysis.md, "Coverage on real runs"): reward_mle with step
c/(t+t0)^a has reward_err ~ t^-a (Moulines & Bach 2011), p = 1/a. On an instance that tuned nothing
(instance 24; the constants were chosen on instances 0 and 11, the noise-term rule and its CI designed on 0 and
11–23), 16 seeds, 4·10^5 samples:
a fit must cover 1/a (|p̂ − 1/a| ≤ 0.25) or say it is not asymptotic, and the a = 1 fit must not be
flagged. The full grid (six a, two budgets, three instances) is bench/coverage_reward_mle.py."""
from __future__ import annotations

import importlib

import pytest
from ratebench.analysis.curves import build_curves
from ratebench.analysis.load import load
from ratebench.runner import run_job

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("error::RuntimeWarning")]
fit_mod = importlib.import_module("ratebench.analysis.fit")

HELD_OUT = 24


def run_reward_mle(tmp_path_factory, a: float, budget: int = 400000, instance: int = HELD_OUT):
    from ratebench.config import compose

    out = tmp_path_factory.mktemp(f"reward_mle_a{a}")
    cfg = compose(["env=bandit", f"env.instance_seed={instance}", "algorithm=reward_mle",
                   f"algorithm.lr_exponent={a}", "n_seeds=16", f"budget.samples={budget}", "progress=false"])
    run_job(cfg, out / "run")
    loaded = load(out)
    return fit_mod.fit_rate(build_curves(loaded.metrics, loaded.seeds, "reward_err", "samples"), fit_mod.FitOptions())


def test_a06_at_4e5_samples_is_covered_or_flagged(tmp_path_factory):
    """Measured (docs/analysis.md, instance 24): p̂ 1.45 [1.21, 1.84] on [0.063, 0.89], covered, not asymptotic."""
    fit = run_reward_mle(tmp_path_factory, 0.6)
    covered = fit.p_low <= 1 / 0.6 <= fit.p_high and abs(fit.p - 1 / 0.6) <= 0.25
    assert covered or not fit.asymptotic, (fit.p, fit.p_low, fit.p_high, fit.asymptotic_reason)


def test_a1_at_4e5_samples_is_covered_and_not_flagged(tmp_path_factory):
    """Measured (docs/analysis.md, instance 24): p̂ 0.998 [0.934, 1.03] on [0.0013, 2.2], asymptotic, the noise-term
    model fitting the window."""
    fit = run_reward_mle(tmp_path_factory, 1.0)
    assert fit.asymptotic, fit.asymptotic_reason
    assert fit.p_low <= 1.0 <= fit.p_high and abs(fit.p - 1.0) <= 0.25, (fit.p, fit.p_low, fit.p_high)


def test_a1_at_4e4_samples_on_instance_16_is_covered_or_flagged(tmp_path_factory):
    """The cell whose diagnosis changed the noise-term rule (instance 16 is a design instance, not held out):
    no excess over the noise term is shown (κ = 0), and N ∝ 1/(t + t0) still bends over the window's first
    decade; before that bending was judged the fit was confidently wrong, p̂ 1.10 [1.01, 1.18]. Measured now:
    p̂ 1.06 [0.90, 1.14] on [0.018, 1], not flagged."""
    fit = run_reward_mle(tmp_path_factory, 1.0, budget=40000, instance=16)
    assert fit.arrays["noise"]["kappa"] == 0
    covered = fit.p_low <= 1.0 <= fit.p_high and abs(fit.p - 1.0) <= 0.25
    assert covered or not fit.asymptotic, (fit.p, fit.p_low, fit.p_high, fit.asymptotic_reason)
