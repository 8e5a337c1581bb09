"""Verdicts say whether the premise holds (issue 11, item 4): `check` and `report` print, next to each
bilevel claim's verdict, the weak-gradient-domination floor and the schedule-imposed exponent on the
instances of the evidence, and flag a `gap` claim whose ε_min lies below the floor."""
from __future__ import annotations

import json

import pytest
import yaml
from ratebench.analysis import commands
from ratebench.audit import premise_summary
from ratebench.config import compose, plain, validate
from ratebench.runner import run_job

from test_claims import CLAIMS


@pytest.fixture(scope="module")
def bilevel_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("premise_runs")
    for inst in (1, 2):
        run_job(compose(["algorithm=bilevel", "n_seeds=4", "budget.samples=2000", f"env.instance_seed={inst}",
                         "progress=false"]), root / f"inst{inst}", experiment="premise_test")
    return root


def claim_file(tmp_path, **change):
    data = yaml.safe_load((CLAIMS / "bilevel_gap.yaml").read_text())
    data.update(experiment="premise_test", instances=2, min_seeds=4, **change)
    path = tmp_path / f"{data['id']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def check_rows(claim, runs, premise, capsys):
    code = commands.main("check", [str(claim), "--runs", str(runs), "--json", "--n-boot", "200"], premise=premise)
    (row,) = json.loads(capsys.readouterr().out)
    return code, row


def test_a_fake_premise_is_judged_against_the_claims_eps_min(bilevel_runs, tmp_path, capsys):
    calls = []

    def fake(env, c_lam):
        calls.append((env["instance_seed"], c_lam))
        return {"wgd_floor": 0.01 * env["instance_seed"], "implied_exponent": 1 / (2 * c_lam), "q": 2.0}

    _, row = check_rows(claim_file(tmp_path), bilevel_runs, fake, capsys)  # eps_min 1e-4 < floor 0.02
    assert sorted(calls) == [(1, pytest.approx(1 / 7)), (2, pytest.approx(1 / 7))]  # once per instance
    assert row["premise_holds"] is False and row["wgd_floor"] == pytest.approx(0.02)
    assert "PREMISE FAILS" in row["premise"] and "0.01–0.02" in row["premise"]
    assert row["implied_exponent"] == [pytest.approx(3.5), pytest.approx(3.5)]
    _, row = check_rows(claim_file(tmp_path, epsilon={"unit": "gap", "min": 0.05, "max": 0.5}), bilevel_runs,
                        fake, capsys)
    assert row["premise_holds"] is True and "FAILS" not in row["premise"]
    # --no-premise: nothing computed, nothing printed
    calls.clear()
    commands.main("check", [str(claim_file(tmp_path)), "--runs", str(bilevel_runs), "--no-premise", "--json",
                            "--n-boot", "200"], premise=fake)
    assert calls == [] and "premise" not in json.loads(capsys.readouterr().out)[0]


def test_the_real_premise_on_the_default_bandit_fails_for_the_papers_gap_claim(bilevel_runs, tmp_path, capsys):
    """On these instances weak gradient domination guarantees nothing below gap ~0.1 (spurious stationary
    points), far above the claim's ε_min = 1e-4; the schedule imposes 1/(q·c_λ) with q ≈ 2."""
    _, row = check_rows(claim_file(tmp_path), bilevel_runs, premise_summary, capsys)
    env = plain(validate(compose(["env.instance_seed=1"])).env)
    direct = premise_summary(env, 1 / 7)
    assert row["premise_holds"] is False and row["wgd_floor"] >= direct["wgd_floor"] > 1e-2
    for exponent in row["implied_exponent"]:
        assert 1 / (2.3 / 7) <= exponent <= 1 / (1.7 / 7)
    out = tmp_path / "rep"
    assert commands.main("report", [str(bilevel_runs), "--claims", str(claim_file(tmp_path)), "--out", str(out),
                                    "--n-boot", "200"], premise=premise_summary) == 0
    assert "PREMISE FAILS" in (out / "report.md").read_text()
    capsys.readouterr()


def test_a_projected_runs_premise_is_asked_for_the_kkt_floor(tmp_path, capsys):
    """Runs of the projected tabular reward (model.reward.bound_reading=project) are judged on the floor over
    the box's KKT points (where projected SGD can stop), the others on every stationary point: check passes
    the reading on to the premise function, and premise_summary returns the floor of that reading."""
    root = tmp_path / "runs"
    for inst in (1, 2):
        run_job(compose(["algorithm=bilevel", "n_seeds=4", "budget.samples=2000", f"env.instance_seed={inst}",
                         "model.reward.kind=tabular", "model.reward.bound=2", "model.reward.bound_reading=project",
                         "env.n_actions=2", "progress=false"]), root / f"inst{inst}", experiment="premise_test")
    calls = []

    def fake(env, c_lam, **kwargs):
        calls.append(kwargs)
        return {"wgd_floor": 0.0, "implied_exponent": 3.5, "q": 2.0}

    _, row = check_rows(claim_file(tmp_path), root, fake, capsys)
    assert calls == [{"reward_bound": 2.0, "projected": True}] * 2
    assert row["premise_holds"] is True


def test_premise_summary_takes_the_floor_of_the_reading(tmp_path, monkeypatch):
    from ratebench import audit

    def fake_audit(env, net, c_lam, n_starts, quiet, reward_bound):
        return {"wgd": {"floor": 0.7, "floor_kkt": 1e-17}, "penalty_bias": {"implied_exponent": 3.5, "q": 2.0}}

    monkeypatch.setattr(audit, "audit_instance", fake_audit)
    env = plain(validate(compose(["env.instance_seed=1"])).env)
    tanh = audit.premise_summary(env, 1 / 7, directory=str(tmp_path), reward_bound=2.0)
    box = audit.premise_summary(env, 1 / 7, directory=str(tmp_path), reward_bound=2.0, projected=True)
    assert tanh["wgd_floor"] == 0.7 and box["wgd_floor"] == 1e-17  # and each from its own cache entry:
    assert audit.premise_summary(env, 1 / 7, directory=str(tmp_path), reward_bound=2.0)["wgd_floor"] == 0.7
    with pytest.raises(ValueError):
        audit.premise_summary(env, 1 / 7, directory=str(tmp_path), projected=True)
