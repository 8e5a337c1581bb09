"""What an INCONCLUSIVE verdict would take (evidence.what_it_would_take): the projected budget and a
"run k more seeds" recommendation with its stated error rate, checked on synthetic data where the
answer is computable (a normal-mean model: exact power and sequential error), against the real
fitter's CI shrinkage, and in `check`'s output."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from ratebench.analysis import commands, evidence
from ratebench.analysis.claims import INCONCLUSIVE, parse_claim, verdict
from scipy.stats import norm

from test_claims import base_claim, fake_fit

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
Z = norm.ppf(0.975)


def test_units_to_decide_closed_form():
    # p̂ 1.1, CI [0.9, 1.3] from 16 seeds, boundary 1.0 below p̂: σ₁ = 0.2·4/1.96, n* = (σ₁(1.96 + 0.8416)/0.1)² = 130.9
    plan = evidence.units_to_decide(1.1, 0.9, 1.3, 16, [1.0])
    sigma = 0.2 * 4 / Z
    want = math.ceil((sigma * (Z + norm.ppf(0.8)) / 0.1) ** 2)
    assert plan["n_needed"] == want == 131 and plan["more"] == 115 and plan["boundary"] == 1.0
    assert plan["sigma_unit"] == pytest.approx(sigma)
    # the side facing the boundary sets the spread: an asymmetric CI with the boundary above p̂
    plan = evidence.units_to_decide(0.9, 0.85, 1.2, 9, [1.0, 0.5])
    assert plan["boundary"] == 1.0 and plan["sigma_unit"] == pytest.approx(0.3 * 3 / Z)
    assert evidence.units_to_decide(1.0, 0.9, 1.1, 8, [1.0])["n_needed"] == math.inf  # p̂ on the boundary
    assert evidence.units_to_decide(1.1, 0.9, np.inf, 8, [1.2])["n_needed"] is None  # no spread on that side
    assert evidence.units_to_decide(1.1, 1.05, 1.15, 16, [1.0])["more"] == 0  # already enough (n* = 9)


def test_recommended_units_have_the_stated_power_on_a_normal_mean():
    """Units iid N(μ, σ²) with μ = b + d: the CI of the mean at n units is exact, so the recommendation made
    from n₀ units (p̂ = μ) must give the next check an 80 % chance of a CI clear of b (fixed seed; 4000 runs:
    Monte Carlo sd 0.0063, so ±0.03 holds with a false-alarm rate far below 1e-4)."""
    rng = np.random.default_rng(0)
    mu, sigma, b, n0 = 1.08, 0.3, 1.0, 10
    half = Z * sigma / math.sqrt(n0)
    plan = evidence.units_to_decide(mu, mu - half, mu + half, n0, [b])
    n = plan["n_needed"]
    means = mu + sigma / math.sqrt(n) * rng.standard_normal(4000)
    decided = np.mean(means - Z * sigma / math.sqrt(n) > b)
    exact = norm.cdf((mu - b) * math.sqrt(n) / sigma - Z)
    assert exact >= 0.8 and decided == pytest.approx(0.8, abs=0.03)


def test_two_looks_err_at_most_the_stated_rate():
    """At the boundary (μ = b: any decisive verdict is wrong), checking at n₀ and, if undecided, at the
    recommended n, each at 95 %: wrong decisions ≤ sequential_error(2) = 10 % (fixed seed, 20000 runs: MC sd
    ≤ 0.0022), and more than one look's 5 %: looking twice costs error, which is why it is stated."""
    rng = np.random.default_rng(1)
    sigma, b, n0, n1, runs = 0.3, 1.0, 10, 60, 20000
    first = b + sigma / math.sqrt(n0) * rng.standard_normal(runs)
    extra = b + sigma / math.sqrt(n1 - n0) * rng.standard_normal(runs)  # the mean of the added units
    second = (n0 * first + (n1 - n0) * extra) / n1
    wrong1 = np.abs(first - b) > Z * sigma / math.sqrt(n0)
    wrong2 = np.abs(second - b) > Z * sigma / math.sqrt(n1)
    rate = np.mean(wrong1 | wrong2)
    assert 0.05 + 0.005 < rate <= evidence.sequential_error(2) + 0.007
    assert evidence.sequential_error(2) == pytest.approx(0.10) and evidence.sequential_error(40) == 1.0


def test_the_fitters_ci_shrinks_as_the_recommendation_assumes():
    """The recommendation assumes the CI half-width falls as 1/√seeds. On synthetic 1/t curves the fitter's
    half-width at 4× and 16× the seeds is within 35 % of that prediction (fixed seeds)."""
    from ratebench.analysis.fit import FitOptions, fit_rate
    from ratebench.analysis.synthetic import synthetic_curves

    opts = FitOptions(n_boot=1000, eps_min=0.01, eps_max=1.0)
    rng = np.random.default_rng(1)
    ratios = []
    for n0 in (8, 16):
        f = fit_rate(synthetic_curves(1.0, n0, rng, metric="reward_err", A=10.0, seed_noise=0.8), opts)
        plan = evidence.units_to_decide(f.p, f.p_low, f.p_high, n0, [1.03])
        for n1 in (4 * n0, 16 * n0):
            g = fit_rate(synthetic_curves(1.0, n1, rng, metric="reward_err", A=10.0, seed_noise=0.8), opts)
            ratios.append(((g.p_high - g.p_low) / 2) / (plan["sigma_unit"] * Z / math.sqrt(n1)))
    assert all(0.65 <= r <= 1.35 for r in ratios), ratios


def test_what_it_would_take_text():
    fit = fake_fit(0.99, 0.96, 1.02, n_seeds=8)
    fit.budget_to_eps_min = 3.2e6
    take = evidence.what_it_would_take("equals", 1.03, 0.03, fit, 0.01, 1e5)
    assert take["budget_to_eps_min"] == 3.2e6 and take["more_units"] > 0 and take["unit"] == "seeds"
    assert take["text"][0].startswith("budget: the fitted curve reaches ε_min = 0.01 after about 3.2e+06 samples")
    assert "≤ 10%" in take["text"][1] and f"8 → {take['n_needed']}" in take["text"][1]
    # a CI clear of every boundary is not undecided: no seed count; a budget already run is not repeated
    take = evidence.what_it_would_take("upper_bound", 1.5, 0.0, fake_fit(1.0, 0.9, 1.1), 0.01, 1e7)
    assert take["text"] == []
    inst = fake_fit(1.0, 0.9, 1.1, boot_unit="instance", n_instances=3)
    assert evidence.what_it_would_take("upper_bound", 1.05, 0.0, inst, 0.01, 1e5)["unit"] == "instances"


def test_check_prints_what_it_would_take_for_an_inconclusive_claim(tmp_path, capsys):
    from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
    from ratebench.synthetic_runs import write_run

    x = evaluation_grid(1e5)
    write_run(tmp_path / "run", x, synthetic_values(x, 1.0, 8, np.random.default_rng(0), A=10.0, seed_noise=0.8),
              list(range(8)), metric="reward_err", algorithm="reward_mle", env="bandit", experiment="control_bandit")
    claim = tmp_path / "c.yaml"
    import yaml

    claim.write_text(yaml.safe_dump(base_claim(id="straddle", exponent=1.03, tolerance=0.03, min_seeds=4)))
    code = commands.main("check", [str(claim), "--runs", str(tmp_path), "--json", "--n-boot", "500"])
    (row,) = json.loads(capsys.readouterr().out)
    assert code == 1 and row["verdict"] == INCONCLUSIVE and "overlaps" in row["reason"], row["reason"]
    take = row["what_it_would_take"]
    assert take["unit"] == "seeds" and take["n_needed"] > 8 and take["error_two_looks"] == pytest.approx(0.1)
    commands.main("check", [str(claim), "--runs", str(tmp_path), "--n-boot", "500"])
    assert "what it would take — seeds: about" in capsys.readouterr().out
    # a decided claim has no such line
    assert verdict(parse_claim(base_claim()), fake_fit(1.0, 0.9, 1.1)).verdict != INCONCLUSIVE
