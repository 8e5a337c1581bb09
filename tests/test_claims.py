"""Claims: file validation (bad fields exit 2 naming the field), the verdict rules of docs/analysis.md, and
the control end to end: `ratebench check conf/claims/control.yaml` passes for exponent 1 and a
deliberately wrong upper bound of 0.5 is VIOLATED on the same runs, and so is the a = 2/3 known-rate claim."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from ratebench.analysis import commands
from ratebench.analysis.claims import INCONCLUSIVE, PASS, VIOLATED, load_claim, parse_claim, verdict
from ratebench.analysis.fit import RateFit
from ratebench.core.errors import ConfigError

CLAIMS = Path(commands.__file__).resolve().parent.parent / "conf" / "claims"
CONTROL = CLAIMS / "control.yaml"


def base_claim(**change) -> dict:
    data = yaml.safe_load(CONTROL.read_text())
    data.update(change)
    return data


def fake_fit(p, lo, hi, **kw) -> RateFit:
    """A fit whose window covers the control claim's range [1e-2, 1] (two decades, every seed below
    ε_min at the end) with a flat local exponent: only the CI of p decides."""
    fields = dict(metric="reward_err", x_name="samples", status="ok", reason="", p=p, p_low=lo, p_high=hi,
                  n_seeds=16, c=0.0, c_low=0.0, c_high=0.0, final_iqm=1e-3, decay=1.0, decay_low=0.9, decay_high=1.1,
                  eps_low=1e-2, eps_high=1.0, n_levels=41, window_decades=2.0, reach_eps_min=1.0,
                  p_local=p, p_local_low=lo, p_local_high=hi, p_trend=0.0)
    fields.update(kw)
    return RateFit(**fields)


def test_every_shipped_claim_file_is_valid():
    files = sorted(CLAIMS.glob("*.yaml"))
    ids = [load_claim(f).id for f in files]
    assert {"control_reward_mle", "bilevel_gap_7_2", "bilevel_grad_sq_7_2", "smoke_bilevel"} <= set(ids) and len(ids) == len(set(ids))
    gap = load_claim(CLAIMS / "bilevel_gap.yaml")
    assert gap.metric_exponent == 3.5 and gap.curve_slope == pytest.approx(-2 / 7) and gap.eps_unit == "gap"


@pytest.mark.parametrize("change,field", [
    ({"metric": "loss"}, "metric"), ({"relation": "lower_bound"}, "relation"), ({"exponent": -1}, "exponent"),
    ({"exponent": "7/2"}, "exponent"), ({"x": "time"}, "x"), ({"tolerance": None}, "tolerance"),
    ({"epsilon": {"unit": "gap", "min": 1e-3, "max": 1.0}}, "epsilon.unit"),
    ({"epsilon": {"unit": "reward_err", "min": 1.0, "max": 1e-3}}, "epsilon"),
    ({"id": None}, "id"), ({"min_seeds": 1}, "min_seeds"),
])
def test_bad_claim_field_is_named(change, field):
    with pytest.raises(ConfigError) as info:
        parse_claim(base_claim(**change), "c.yaml")
    assert info.value.field == f"c.yaml: {field}"


def test_grad_norm_unit_halves_the_exponent_on_grad_sq():
    c = parse_claim(base_claim(metric="grad_sq", relation="upper_bound", exponent=7,
                               epsilon={"unit": "grad_norm", "min": 1e-3, "max": 1e-1}))
    assert c.metric_exponent == 3.5 and c.metric_eps_range == pytest.approx((1e-6, 1e-2))


@pytest.mark.parametrize("lo,hi,want", [(0.8, 0.95, PASS), (1.05, 1.3, VIOLATED), (0.9, 1.1, INCONCLUSIVE)])
def test_upper_bound_rule(lo, hi, want):
    claim = parse_claim(base_claim(relation="upper_bound", exponent=1.0))
    assert verdict(claim, fake_fit((lo + hi) / 2, lo, hi)).verdict == want


@pytest.mark.parametrize("lo,hi,want", [(0.85, 1.1, PASS), (0.5, 0.75, VIOLATED), (1.25, 1.4, VIOLATED),
                                        (0.7, 1.1, INCONCLUSIVE)])
def test_equals_rule(lo, hi, want):
    claim = parse_claim(base_claim())  # 1 ± 0.2
    assert verdict(claim, fake_fit((lo + hi) / 2, lo, hi)).verdict == want


def test_stall_above_eps_range_is_violated_and_too_few_seeds_inconclusive():
    claim = parse_claim(base_claim(relation="upper_bound", exponent=1.0))  # ε_min = 1e-3
    stalled = fake_fit(np.nan, np.nan, np.nan, status="too_few_levels", decay=0.01, decay_low=-0.02,
                       decay_high=0.04, final_iqm=0.02)
    assert verdict(claim, stalled).verdict == VIOLATED and "stalls" in verdict(claim, stalled).reason
    slow_but_below = fake_fit(np.nan, np.nan, np.nan, status="too_few_levels", decay=0.01, decay_high=0.04,
                              final_iqm=1e-4)  # flat, but already below ε_min: not a stall
    assert verdict(claim, slow_but_below).verdict == INCONCLUSIVE
    few = fake_fit(0.9, 0.8, 0.95, n_seeds=3)
    assert verdict(claim, few).verdict == INCONCLUSIVE
    assert verdict(claim, None).verdict == INCONCLUSIVE


def test_unreadable_or_invalid_claim_file_exits_2(tmp_path, capsys):
    assert commands.main("check", [str(tmp_path / "missing.yaml"), "--runs", str(tmp_path)]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(base_claim(relation="sometimes")))
    assert commands.main("check", [str(bad), "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "relation" in err and "upper_bound, equals" in err and err.count("\n") == 1


@pytest.fixture(scope="module")
def control_check(tmp_path_factory):
    """`ratebench check conf/claims/control.yaml` without --runs: runs the control experiment
    (reward_mle on the bandit, 16 seeds, 100k samples) into a work folder."""
    work = tmp_path_factory.mktemp("work")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = commands.main("check", [str(CONTROL), "--workdir", str(work), "--json"])
    return code, json.loads(out.getvalue()), work


def test_control_claim_passes(control_check):
    code, rows, work = control_check
    assert code == 0, rows
    (row,) = rows
    assert row["verdict"] == PASS and row["p_low"] <= 1.0 <= row["p_high"]
    assert row["n_seeds"] == 16 and (work / "control_bandit" / ".complete").exists()  # one folder per experiment


def test_wrong_exponent_is_violated_on_the_same_runs(control_check, tmp_path, capsys):
    _, _, work = control_check
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(base_claim(id="control_wrong", exponent=0.5, relation="upper_bound")))
    assert commands.main("check", [str(wrong), "--runs", str(work), "--json"]) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["verdict"] == VIOLATED and row["p_low"] > 0.5
    assert commands.main("check", [str(wrong), "--runs", str(work), "--fail-on", "violated"]) == 1
    capsys.readouterr()


def test_a067_claim_is_violated_on_the_a1_runs(control_check, tmp_path, capsys):
    """Wrong twin of the a = 1 control in the other direction: the a = 2/3 claim (p = 3/2 +- 0.3) on the
    1/t runs; the three known-rate controls (docs/analysis.md "Known rates") must tell 1 from 3/2."""
    _, _, work = control_check
    data = yaml.safe_load((CLAIMS / "control_a067.yaml").read_text())
    data.update(id="control_a1_wrong", experiment="control_bandit")
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(yaml.safe_dump(data))
    assert commands.main("check", [str(wrong), "--runs", str(work), "--json"]) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["verdict"] == VIOLATED and row["p_high"] < 1.2


def test_fail_on_violated_lets_inconclusive_pass(control_check, tmp_path, capsys):
    _, _, work = control_check
    loose = tmp_path / "straddle.yaml"  # a band the CI straddles: INCONCLUSIVE
    loose.write_text(yaml.safe_dump(base_claim(id="control_straddle", exponent=1.1, tolerance=0.05)))
    assert commands.main("check", [str(loose), "--runs", str(work)]) == 1
    assert "INCONCLUSIVE" in capsys.readouterr().out
    assert commands.main("check", [str(loose), "--runs", str(work), "--fail-on", "violated"]) == 0


def test_check_reuses_finished_runs(control_check, capsys):
    _, rows, work = control_check
    assert commands.main("check", [str(CONTROL), "--workdir", str(work), "--json"]) == 0
    captured = capsys.readouterr()
    assert "reusing finished runs" in captured.err
    assert json.loads(captured.out)[0]["p"] == pytest.approx(rows[0]["p"])


def test_missing_experiment_is_bad_input_before_any_run(tmp_path, capsys):
    claim = tmp_path / "c.yaml"
    claim.write_text(yaml.safe_dump(base_claim(experiment="no_such_experiment")))
    assert commands.main("check", [str(CONTROL), str(claim), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "experiment" in err and "control_bandit" in err  # names the field and the allowed values
    assert not (tmp_path / "w").exists()  # the control experiment was not started


def test_true_power_law_at_the_claimed_rate_is_never_called_a_stall():
    """b = 2/7 exactly (the paper's rate on gap), still far above ε_min at the end: the claim may
    be INCONCLUSIVE or PASS, but the stall rule must not fire (seeded, 10 repetitions)."""
    from ratebench.analysis.fit import FitOptions, fit_rate
    from ratebench.analysis.synthetic import synthetic_curves

    claim = load_claim(CLAIMS / "bilevel_gap.yaml")
    rng = np.random.default_rng(11)
    for r in range(10):
        fit = fit_rate(synthetic_curves(2 / 7, 8, rng, metric="gap"), FitOptions(n_boot=1000, seed=r))
        assert fit.final_iqm > claim.eps_min
        assert verdict(claim, fit).verdict != VIOLATED, verdict(claim, fit).reason


# ---------------------------------------------------------------------------------------------- issue 10: honest verdicts

UPPER = {"relation": "upper_bound", "exponent": 1.0}  # on the control claim's range [1e-2, 1]


@pytest.mark.parametrize("relation", ["upper_bound", "equals"])
@pytest.mark.parametrize("change", [
    {"eps_low": 0.0316},  # window stops 2 grid levels above ε_min
    {"reach_eps_min": 0.6},  # the window's bottom level is near ε_min, but under 75 % of seeds stay below ε_min
    {"reach_eps_min": np.nan},  # not measured: not shown
    {"status": "too_narrow", "reason": "spans 0.5 decades", "window_decades": 0.5},
])
def test_pass_requires_the_window_to_cover_eps_min_and_a_decade(relation, change):
    claim = parse_claim(base_claim(relation=relation, exponent=1.0))
    good = fake_fit(0.95, 0.9, 0.98 if relation == "upper_bound" else 1.1)
    assert verdict(claim, good).verdict == PASS
    v = verdict(claim, fake_fit(0.95, 0.9, 0.98 if relation == "upper_bound" else 1.1, **change))
    assert v.verdict == INCONCLUSIVE and "window covers [" in v.reason and "of the claimed [0.01, 1]" in v.reason


def test_equals_band_missed_on_a_narrow_window_is_inconclusive_not_violated():
    """An `equals` claim is asymptotic: a CI outside the band on a window under a decade (found on the
    exact-oracle grad_sq runs: 0.2 decades, p̂ quantised to 1) cannot contradict it; on a full window it does."""
    claim = parse_claim(base_claim(relation="equals", exponent=1.75, tolerance=0.35))
    wide = fake_fit(1.0, 0.5, 1.2)
    assert verdict(claim, wide).verdict == VIOLATED
    narrow = fake_fit(1.0, 0.5, 1.2, status="too_narrow", reason="spans 0.2 decades", window_decades=0.2)
    v = verdict(claim, narrow)
    assert v.verdict == INCONCLUSIVE and "too narrow to contradict" in v.reason


def test_upper_bound_exceeded_on_a_narrow_window_is_inconclusive_not_violated():
    """The same rule for both relations: a CI above an upper bound contradicts it only on a window of a
    decade or more."""
    claim = parse_claim(base_claim(**UPPER))  # p <= 1
    assert verdict(claim, fake_fit(1.5, 1.2, 1.8)).verdict == VIOLATED
    v = verdict(claim, fake_fit(1.5, 1.2, 1.8, status="too_narrow", reason="spans 0.3 decades", window_decades=0.3))
    assert v.verdict == INCONCLUSIVE and "too narrow to contradict" in v.reason


def test_grid_step_tolerance_of_coverage():
    """ε_min between grid levels: the lowest window level may sit up to one step (10^(1/20)) above it."""
    claim = parse_claim(base_claim(epsilon={"unit": "reward_err", "min": 9e-3, "max": 1.0}, **UPPER))
    assert verdict(claim, fake_fit(0.95, 0.9, 0.98, eps_low=1e-2)).verdict == PASS  # 1e-2 < 9e-3·1.122
    claim = parse_claim(base_claim(epsilon={"unit": "reward_err", "min": 8e-3, "max": 1.0}, **UPPER))
    assert verdict(claim, fake_fit(0.95, 0.9, 0.98, eps_low=1e-2)).verdict == INCONCLUSIVE  # 1e-2 > 8e-3·1.122


def test_floor_ci_above_eps_min_is_violated_and_below_is_not():
    claim = parse_claim(base_claim(**UPPER))  # ε_min = 1e-2
    v = verdict(claim, fake_fit(0.95, 0.9, 0.98, c=0.03, c_low=0.011, c_high=0.05))
    assert v.verdict == VIOLATED and "cannot reach the claimed range" in v.reason
    assert verdict(claim, fake_fit(0.95, 0.9, 0.98, c=0.03, c_low=0.009, c_high=0.05)).verdict != VIOLATED


@pytest.mark.parametrize("trend,word", [(0.3, "rising towards"), (-0.1, "could reach")])
def test_local_exponent_reaching_the_claim_at_eps_min_is_inconclusive(trend, word):
    claim = parse_claim(base_claim(**UPPER))
    v = verdict(claim, fake_fit(0.95, 0.9, 0.98, p_local=0.99, p_local_low=0.9, p_local_high=1.0, p_trend=trend))
    assert v.verdict == INCONCLUSIVE and v.reason.startswith("pre-asymptotic") and word in v.reason
    assert verdict(claim, fake_fit(0.95, 0.9, 0.98, p_local_high=0.999)).verdict == PASS


def test_p_and_inverse_b_disagreeing_beyond_their_cis_blocks_pass():
    claim = parse_claim(base_claim(**UPPER))
    slow_b = {"b": 0.7, "b_low": 0.65, "b_high": 0.75}  # 1/b ∈ [1.33, 1.54]: disjoint from [0.9, 0.98], above 1
    v = verdict(claim, fake_fit(0.95, 0.9, 0.98, **slow_b))
    assert v.verdict == INCONCLUSIVE and "disagree" in v.reason
    agreeing = {"b": 1.05, "b_low": 1.02, "b_high": 1.12}  # 1/b ∈ [0.89, 0.98]
    assert verdict(claim, fake_fit(0.95, 0.9, 0.98, **agreeing)).verdict == PASS
    fast_b = {"b": 2.0, "b_low": 1.9, "b_high": 2.1}  # disagrees, but 1/b ≤ 0.53 confirms the bound too
    assert verdict(claim, fake_fit(0.95, 0.9, 0.98, **fast_b)).verdict == PASS


def test_steeper_slope_on_a_partial_window_is_still_violated():
    """A slope whose whole CI exceeds the claim contradicts it on the covered part of the range."""
    claim = parse_claim(base_claim(**UPPER))
    v = verdict(claim, fake_fit(1.3, 1.2, 1.4, eps_low=0.1, reach_eps_min=0.2))
    assert v.verdict == VIOLATED and "window covers [0.1, 1]" in v.reason
