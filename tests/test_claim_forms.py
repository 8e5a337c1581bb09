"""The claim forms (docs/claim-meaning.md "Claim forms"): one ConfigError per malformed field, the safe
`predicted` expression, and each form's verdict on synthetic runs with a known answer, judged by
`ratebench check --runs` (geometric: a true ρ PASSes, a polynomial curve and a wrong ρ are VIOLATED;
difference: a true p_A − p_B PASSes, a false one is VIOLATED; exponent_curve: the true curve PASSes, a
wrong prediction is VIOLATED); seeds of one run with identical curves count once."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import yaml
from ratebench.analysis import commands
from ratebench.analysis.claim_forms import geometric_verdict, slower_than_geometric
from ratebench.analysis.claims import parse_claim
from ratebench.analysis.curves import Curves
from ratebench.analysis.expression import ExpressionError, predict
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.geometric import fit_geometric
from ratebench.analysis.groups import distinct_curves
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.core.errors import ConfigError
from ratebench.synthetic_runs import write_run

BASE = {"id": "c", "source": "s", "algorithm": "synthetic", "experiment": "syn_a", "metric": "gap", "x": "samples",
        "epsilon": {"unit": "gap", "min": 1e-3, "max": 1e-1}}
FORMS = {
    "polynomial": {"exponent": 1.0, "relation": "upper_bound"},
    "geometric": {"form": "geometric", "rho": 0.9, "relation": "upper_bound"},
    "difference": {"form": "difference", "baseline_experiment": "syn_b", "difference": -1.0, "relation": "equals",
                   "tolerance": 0.3},
    "exponent_curve": {"form": "exponent_curve", "parameter": "algorithm.lr_exponent", "predicted": "1/v",
                       "tolerance": 0.3},
}


def claim_data(kind, **change):
    data = {**BASE, **FORMS[kind], **change}
    return {k: v for k, v in data.items() if v is not None}


@pytest.mark.parametrize("form", list(FORMS))
def test_every_form_parses(form):
    c = parse_claim(claim_data(form))
    assert c.form == form
    assert c.claimed_text == {"polynomial": "≤ 1", "geometric": "ρ ≤ 0.9", "difference": "p_A − p_B = -1 ± 0.3",
                              "exponent_curve": "p(algorithm.lr_exponent) = 1/v ± 0.3"}[form]


BAD = [  # (form, changes, the field the one error names, a word of its message)
    ("polynomial", {"form": "exponential"}, "form", "allowed: polynomial, geometric, difference, exponent_curve"),
    ("polynomial", {"rho": 0.5}, "rho", "belongs to form: geometric"),
    ("geometric", {"rho": None}, "rho", "missing"),
    ("geometric", {"rho": 1.0}, "rho", "(0, 1)"),
    ("geometric", {"rho": 0}, "rho", "positive"),
    ("geometric", {"rho": "fast"}, "rho", "positive"),
    ("geometric", {"exponent": 2.0}, "exponent", "belongs to form: polynomial"),
    ("geometric", {"relation": "lower_bound"}, "relation", "allowed: upper_bound, equals"),
    ("geometric", {"relation": "equals"}, "tolerance", "required when relation is equals"),
    ("geometric", {"tolerance": 0.01}, "tolerance", "only with relation: equals"),
    ("geometric", {"epsilon": {"unit": "grad_norm", "min": 1e-3, "max": 0.1}, "metric": "grad_sq"}, "epsilon.unit",
     "allowed for metric grad_sq: grad_sq"),
    ("difference", {"baseline_experiment": None}, "baseline_experiment", "missing"),
    ("difference", {"baseline_experiment": "syn_a"}, "baseline_experiment", "another experiment"),
    ("difference", {"baseline_experiment": 3}, "baseline_experiment", "non-empty experiment name"),
    ("difference", {"difference": "a lot"}, "difference", "must be a number"),
    ("difference", {"difference": float("inf")}, "difference", "finite"),
    ("difference", {"relation": "between"}, "relation", "allowed: equals, upper_bound, lower_bound"),
    ("difference", {"tolerance": None}, "tolerance", "required when relation is equals"),
    ("exponent_curve", {"parameter": None}, "parameter", "missing"),
    ("exponent_curve", {"parameter": "algorithm.lr exponent"}, "parameter", "dotted config key"),
    ("exponent_curve", {"predicted": "__import__('os').system('true')"}, "predicted", "only min, max, log"),
    ("exponent_curve", {"predicted": "1/x"}, "predicted", "unknown name 'x'"),
    ("exponent_curve", {"predicted": "1/"}, "predicted", "not an arithmetic expression"),
    ("exponent_curve", {"predicted": [1, 2]}, "predicted", "expression in v"),
    ("exponent_curve", {"tolerance": None}, "tolerance", "missing"),
    ("exponent_curve", {"tolerance": -0.1}, "tolerance", "positive"),
    ("exponent_curve", {"relation": "upper_bound"}, "relation", "allowed: equals"),
]


@pytest.mark.parametrize("form,change,name,words", BAD)
def test_each_malformed_field_is_one_error_naming_it(form, change, name, words):
    with pytest.raises(ConfigError) as exc:
        parse_claim(claim_data(form, **change), "f.yaml")
    text = str(exc.value)
    assert f"f.yaml: {name}" in text and words in text, text
    assert text.count("\n") == 0


def test_a_malformed_claim_exits_2_before_any_compute(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(claim_data("geometric", rho=1.5)))
    assert commands.main("check", [str(path), "--runs", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert "rho" in err and "(0, 1)" in err and err.count("\n") == 1


def test_predicted_is_evaluated_without_eval():
    assert predict("1/v", 4) == 0.25
    assert predict("2 - v", 0.5) == 1.5
    assert predict("max(1, 2/v) + min(v, 3) * sqrt(v) - log(exp(v))", 4.0) == pytest.approx(1.0 + 3 * 2 - 4.0)  # max(1, 0.5) + 3·2 − 4
    assert predict("v ** 2", 3) == 9.0 and predict(2, 7) == 2.0
    for text, v in (("1/v", 0), ("log(v)", -1), ("10.0 ** v", 1e6), ("exp", 1)):
        with pytest.raises(ExpressionError):
            predict(text, v)
    for text in ("v.real", "(lambda: 1)()", "[v][0]", "v if v else 1", "'a'", "True + v", "min(v)", "log(v, 2)",
                 "open('x')", "v; v"):
        with pytest.raises(ExpressionError):
            predict(text, 1.0)


# ---------------------------------------------------------------------------------------------- synthetic runs

def write_claim(tmp_path, name, data):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**data, "id": name}))
    return path


def check(tmp_path, capsys, claim, runs, *extra):
    code = commands.main("check", [str(claim), "--runs", str(runs), "--json", "--n-boot", "400", *extra])
    (row,) = json.loads(capsys.readouterr().out)
    return code, row


def geometric_values(x, k, n_seeds, rng, seed_noise=0.3, point_noise=0.1):
    """metric = 10^(−x/k)·exp(σ_s z_s + σ_p e): ρ = 10^(−1/k) per unit of x."""
    z, e = rng.standard_normal((n_seeds, 1)), rng.standard_normal((n_seeds, len(x)))
    return 10.0 ** (-x / k)[None, :] * np.exp(seed_noise * z + point_noise * e)


K = 700.0  # per-decade cost: ρ = 10^(−1/700) = 0.996716
RHO = 10 ** (-1 / K)


def geometric_runs(root, rng, power=None):
    x = evaluation_grid(1e4)
    for inst in (1, 2):
        vals = synthetic_values(x, power, 8, rng, A=1.0) if power else geometric_values(x, K, 8, rng)
        write_run(root / f"i{inst}", x, vals, list(range(8)), metric="gap", algorithm="synthetic", env="bandit",
                  experiment="syn_a", config={"env": {"name": "bandit", "instance_seed": inst},
                                              "algorithm": {"name": "synthetic"}})
    return root


GEO = {**BASE, "form": "geometric", "epsilon": {"unit": "gap", "min": 1e-4, "max": 1e-2}, "instances": 2}


@pytest.mark.parametrize("relation,rho,tol,want", [("equals", RHO, 3e-4, "PASS"), ("upper_bound", 0.9975, None, "PASS"),
                                                   ("upper_bound", 0.995, None, "VIOLATED"),
                                                   ("equals", 0.998, 3e-4, "VIOLATED")])
def test_geometric_claim_on_a_geometric_curve(tmp_path, capsys, relation, rho, tol, want):
    """The true ρ = 0.996716 PASSes as equals ± 3e-4 and under the bound 0.9975; a claim of a faster
    rate (ρ ≤ 0.995, 1/log10 = 459 samples per decade against 700) or another ρ is VIOLATED."""
    runs = geometric_runs(tmp_path / "runs", np.random.default_rng(1))
    claim = write_claim(tmp_path, "geo", {**GEO, "rho": rho, "relation": relation,
                                          **({"tolerance": tol} if tol else {})})
    code, row = check(tmp_path, capsys, claim, runs)
    assert row["verdict"] == want, row["reason"]
    assert code == (0 if want == "PASS" else 1)
    assert row["form"] == "geometric" and row["estimate"]["name"] == "ρ̂"
    assert row["rho_low"] <= RHO <= row["rho_high"]  # the true ρ inside the CI either way
    assert row["n_instances"] == 2 and row["n_seeds"] == 8


def test_polynomial_curve_against_a_geometric_claim_is_violated(tmp_path, capsys):
    """A 1/n curve (metric = n^-1) claimed geometric, at the very ρ its window averages (so the CI of ρ̂
    cannot rule the claim out): the cost per decade grows tenfold per decade down the window, the
    geometric model is rejected and the claim VIOLATED."""
    runs = geometric_runs(tmp_path / "runs", np.random.default_rng(2), power=1.0)
    data = {**GEO, "epsilon": {"unit": "gap", "min": 1e-3, "max": 1e-1}}
    probe = write_claim(tmp_path, "probe", {**data, "rho": 0.5, "relation": "upper_bound"})
    _, row = check(tmp_path, capsys, probe, runs)
    rho = row["rho"]  # what a geometric fit of this curve averages over its window, and a band holding its CI
    tol = 1.01 * max(rho - row["rho_low"], row["rho_high"] - rho)
    claim = write_claim(tmp_path, "geo", {**data, "rho": rho, "relation": "equals", "tolerance": tol})
    code, row = check(tmp_path, capsys, claim, runs)
    assert code == 1 and row["verdict"] == "VIOLATED", row["reason"]
    assert row["reason"].startswith("not geometric: the cost per decade of ε grows down the window")
    assert rho - tol <= row["rho_low"] and row["rho_high"] <= rho + tol  # the CI alone would PASS it


def test_slower_than_geometric_false_alarms_on_geometric_curves():
    """The model-rejection rule on 40 noisy geometric groups (fixed seed): one-sided at 2.5 % per group
    when the halves agree exactly, so at most 4 of 40 (P ≈ 0.02 under Binomial(40, 0.025)); measured 0."""
    rng = np.random.default_rng(3)
    x = evaluation_grid(1e4)
    alarms = 0
    for _ in range(40):
        v = geometric_values(x, K, 8, rng)
        seeds = __import__("pandas").DataFrame({"seed": np.arange(8), "status": "completed", "config_hash": "g",
                                                "run_dir": "g"})
        fit = fit_geometric(Curves("gap", "samples", x, v, np.array(["g"] * 8), seeds, np.ones(8, bool)),
                            FitOptions(n_boot=300, eps_min=1e-4, eps_max=1e-2))
        alarms += slower_than_geometric(fit)
    assert alarms <= 4


def test_geometric_verdict_without_evidence_is_inconclusive():
    c = parse_claim(claim_data("geometric"))
    assert geometric_verdict(c, None).verdict == "INCONCLUSIVE"


def pair_runs(root, rng, experiment, b, A, instances=(1, 2, 3, 4), param=None, budget=1e6):
    x = evaluation_grid(budget)
    for inst in instances:
        algo = {"name": "synthetic", "variant": experiment,  # two experiments are two configs
                **({"lr_exponent": param} if param is not None else {})}
        write_run(root / f"{experiment}_{inst}_{param}", x, synthetic_values(x, b, 8, rng, A=A), list(range(8)),
                  metric="gap", algorithm="synthetic", env="bandit", experiment=experiment,
                  config={"env": {"name": "bandit", "instance_seed": inst}, "algorithm": algo})


DIFF = {**BASE, "form": "difference", "baseline_experiment": "syn_b", "relation": "equals", "tolerance": 0.3,
        "epsilon": {"unit": "gap", "min": 3e-3, "max": 0.1}, "instances": 4}


@pytest.mark.parametrize("claimed,relation,want", [(-1.0, "equals", "PASS"), (0.0, "equals", "VIOLATED"),
                                                   (-0.5, "upper_bound", "PASS"), (-0.5, "lower_bound", "VIOLATED")])
def test_difference_claim(tmp_path, capsys, claimed, relation, want):
    """A: n^-1 (p = 1), B: n^-1/2 (p = 2), 4 instances × 8 seeds each, paired by (instance, seed): the true
    p_A − p_B = −1 PASSes (equals ± 0.3, and ≤ −0.5); 0 ± 0.3 and ≥ −0.5 are VIOLATED."""
    rng = np.random.default_rng(4)
    pair_runs(tmp_path / "runs", rng, "syn_a", 1.0, 10.0)
    pair_runs(tmp_path / "runs", rng, "syn_b", 0.5, 1.0)
    data = {**DIFF, "difference": claimed, "relation": relation}
    if relation != "equals":
        data.pop("tolerance")
    code, row = check(tmp_path, capsys, write_claim(tmp_path, "diff", data), tmp_path / "runs")
    assert row["verdict"] == want, row["reason"]
    assert code == (0 if want == "PASS" else 1)
    assert row["estimate"]["low"] <= -1.0 <= row["estimate"]["high"]  # the truth inside the paired CI
    assert row["n_shared"] == 32 and "over 4 instances" in row["reason"] and row["n_instances"] == 4


def test_difference_claim_without_baseline_runs_is_inconclusive(tmp_path, capsys):
    pair_runs(tmp_path / "runs", np.random.default_rng(5), "syn_a", 1.0, 10.0)
    code, row = check(tmp_path, capsys, write_claim(tmp_path, "diff", {**DIFF, "difference": -1.0}), tmp_path / "runs")
    assert code == 1 and row["verdict"] == "INCONCLUSIVE" and row["reason"].startswith("baseline_experiment: ")


CURVE = {**BASE, "form": "exponent_curve", "parameter": "algorithm.lr_exponent", "tolerance": 0.3,
         "epsilon": {"unit": "gap", "min": 3e-3, "max": 0.1}, "instances": 2}


@pytest.mark.parametrize("predicted,want", [("1/v", "PASS"), ("2 - v", "VIOLATED"), ("min(1/v, 1.5)", "VIOLATED")])
def test_exponent_curve_claim(tmp_path, capsys, predicted, want):
    """Runs at lr_exponent v = 0.5 and 1 decaying as n^-v (p = 1/v: 2 and 1): the prediction 1/v PASSes at
    both values; 2 − v (1.5 at v = 0.5) and min(1/v, 1.5) miss p = 2 at v = 0.5 by more than the tolerance."""
    rng = np.random.default_rng(6)
    for v, A in ((0.5, 1.0), (1.0, 10.0)):
        pair_runs(tmp_path / "runs", rng, "syn_a", v, A, instances=(1, 2), param=v)
    code, row = check(tmp_path, capsys, write_claim(tmp_path, "curve", {**CURVE, "predicted": predicted}),
                      tmp_path / "runs")
    assert row["verdict"] == want, row["reason"]
    assert code == (0 if want == "PASS" else 1)
    got = {r["value"]: r for r in row["per_value"]}
    assert set(got) == {0.5, 1.0}
    assert got[1.0]["verdict"] == "PASS" and got[0.5]["verdict"] == want
    assert got[0.5]["predicted"] == pytest.approx(predict(predicted, 0.5))
    assert got[0.5]["p_low"] <= 2.0 <= got[0.5]["p_high"]


def test_check_junit_and_text_name_every_form(tmp_path, capsys):
    runs = geometric_runs(tmp_path / "runs", np.random.default_rng(1))
    claim = write_claim(tmp_path, "geo", {**GEO, "rho": 0.9975, "relation": "upper_bound"})
    junit = tmp_path / "out.xml"
    assert commands.main("check", [str(claim), "--runs", str(runs), "--n-boot", "300", "--junit", str(junit)]) == 0
    text = capsys.readouterr().out
    assert "ρ ≤ 0.9975" in text and "ρ̂ 0.9967" in text and "geometric" in text
    case = ET.parse(junit).getroot().find("testsuite/testcase")
    out = case.find("system-out").text
    assert case.get("name") == "geo" and case.find("failure") is None and "ρ̂ 0.9967" in out and "(geometric)" in out


# ---------------------------------------------------------------------------------------------- identical seeds

def test_distinct_curves_counts_copies_within_a_run_once():
    x = evaluation_grid(1e3)
    v = synthetic_values(x, 1.0, 3, np.random.default_rng(7))
    values = np.vstack([v[0], v[0], v[1], v[0], v[2], v[2]])  # run a: seeds 0-2, run b: seeds 0-2
    import pandas as pd

    seeds = pd.DataFrame({"seed": [0, 1, 2, 0, 1, 2], "status": "completed", "config_hash": "h",
                          "run_dir": ["a", "a", "a", "b", "b", "b"]})
    curves = Curves("gap", "samples", x, values, np.array(["h"] * 6), seeds, np.ones(6, bool))
    out, copies = distinct_curves(curves)
    assert out.n_seeds == 4  # a: {v0, v1}, b: {v0, v2}: a copy in another run is another run's seed
    np.testing.assert_array_equal(out.values, values[[0, 2, 3, 4]])
    assert list(out.seeds["seed"]) == [0, 2, 0, 1] and copies == {0: (6, 4)}
    same, none = distinct_curves(out)
    assert none == {} and same is out


def test_identical_seeds_count_once_in_check(tmp_path, capsys):
    """4 seeds of each run with one curve (a deterministic method from one start): check reports 1 seed;
    on one instance a claim needing 4 seeds is INCONCLUSIVE; on 4 instances (4 distinct curves) it is
    judged on each instance's one curve."""
    x = evaluation_grid(1e5)
    rng = np.random.default_rng(8)
    for inst in (1, 2, 3, 4):
        one = synthetic_values(x, 1.0, 1, rng, A=10.0, point_noise=0.02)
        write_run(tmp_path / "runs" / f"i{inst}", x, np.repeat(one, 4, axis=0), [0, 1, 2, 3], metric="gap",
                  algorithm="synthetic", env="bandit", experiment="syn_a",
                  config={"env": {"name": "bandit", "instance_seed": inst}, "algorithm": {"name": "synthetic"}})
    data = {**BASE, "exponent": 1.0, "relation": "equals", "tolerance": 0.2, "min_seeds": 4,
            "epsilon": {"unit": "gap", "min": 3e-3, "max": 0.1}}
    code, row = check(tmp_path, capsys, write_claim(tmp_path, "one", {**data, "instances": [1]}), tmp_path / "runs")
    assert code == 1 and row["verdict"] == "INCONCLUSIVE" and row["n_seeds"] == 1
    assert row["reason"].startswith("1 distinct curve(s) over 1 instance(s), the claim needs ≥ 4")
    code, row = check(tmp_path, capsys, write_claim(tmp_path, "four", {**data, "instances": 4}), tmp_path / "runs")
    assert row["verdict"] == "PASS", row["reason"]
    assert row["n_seeds"] == 1 and row["n_instances"] == 4 and "deterministic" in row["reason"]


def test_report_and_list_show_every_form(tmp_path, capsys):
    """`ratebench report` on runs judged by a claim of each non-polynomial form: each claim's section
    names its form's claimed value and estimate (ρ̂, p̂_A − p̂_B, the per-value p̂), no figure is drawn from
    a slope the form does not state, and the verdicts are those check gives."""
    rng = np.random.default_rng(4)
    runs = tmp_path / "runs"
    pair_runs(runs, rng, "syn_a", 1.0, 10.0, instances=(1, 2))
    pair_runs(runs, rng, "syn_b", 0.5, 1.0, instances=(1, 2))
    diff = write_claim(tmp_path, "diff", {**DIFF, "difference": -1.0, "instances": 2})
    geo = write_claim(tmp_path, "geo", {**GEO, "experiment": "syn_a", "rho": 0.5, "relation": "upper_bound",
                                        "epsilon": {"unit": "gap", "min": 3e-3, "max": 0.1}})
    assert commands.main("report", [str(runs), "--claims", str(diff), str(geo), "--n-boot", "300",
                                    "--out", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| diff | gap | p_A − p_B = -1 ± 0.3 | p̂_A − p̂_B " in md and "| geo | gap | ρ ≤ 0.5 | ρ̂ " in md
    assert "**claimed (difference, metric units)**: p_A − p_B = -1 ± 0.3" in md
    assert "## Claim `geo`: VIOLATED" in md  # a 1/n curve is not geometric
    assert "## Claim `diff`: PASS" in md
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "ρ ≤ 0.5" in html and "p̂_A − p̂_B" in html


def test_list_claims_shows_each_claims_form(capsys):
    from ratebench.core.catalog import format_entries

    text = format_entries(["claims"])
    assert "[id npg_entropy_linear, geometric] Cen, Cheng" in text
    assert "[id softmax_pg_geometric, geometric] negative control" in text
    assert "[id control_reward_mle, polynomial]" in text
