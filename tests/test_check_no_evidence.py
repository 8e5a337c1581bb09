"""`ratebench check` over a folder that holds no evidence for some claims says so in one line naming them,
not a verdict block, a table row and a premise computation per claim; the claims with evidence are
reported as before, and --json keeps every claim."""
from __future__ import annotations

import json

import numpy as np
from ratebench.analysis import commands
from ratebench import experiments
from ratebench.analysis.claims import find_claim, load_claim
from ratebench.analysis.inputs import CONF_DIR
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.load import load
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run

X = evaluation_grid(1e5)
NO_EVIDENCE = ("control_a075", "control_a067", "smoke_bilevel")  # claims whose experiments have no runs below


def control_runs(root, experiment="control_bandit", seeds=6):
    rng = np.random.default_rng(0)
    for r in range(2):
        write_run(root / f"job{r}", X, synthetic_values(X, 1.0, seeds, rng, A=10.0),
                  list(range(seeds * r, seeds * r + seeds)), metric="reward_err", algorithm="reward_mle", env="bandit",
                  config={"algorithm": {"name": "reward_mle"}, "env": {"name": "bandit"}}, experiment=experiment)
    return root


def no_premise(*args, **kwargs):
    raise AssertionError("a claim without evidence has no instances to compute premises on")


def test_claims_without_evidence_share_one_line_and_the_judged_claim_is_unchanged(tmp_path, capsys):
    runs = control_runs(tmp_path / "runs")
    args = ["control", *NO_EVIDENCE, "--runs", str(runs), "--n-boot", "200"]
    code = commands.main("check", args, premise=no_premise)
    out = capsys.readouterr()
    lines = out.out.strip().splitlines()
    ids = {name: load_claim(find_claim(name, CONF_DIR / "claims")).id for name in NO_EVIDENCE}
    summary = [line for line in lines if line.startswith("no evidence under")]
    assert len(summary) == 1 and f"for {len(NO_EVIDENCE)} claims" in summary[0]
    assert all(ids[n] in summary[0] for n in NO_EVIDENCE)
    # nothing else names them: no table row, no verdict line, no progress or premise line on stderr
    others = [line for line in lines if line not in summary] + out.err.splitlines()
    assert not [line for line in others for n in NO_EVIDENCE if ids[n] in line]
    # the judged claim: the table holds its row alone, and its verdict is the one evaluate_claim gives
    alone, _, _ = experiments.evaluate_claim(load(runs), load_claim(find_claim("control", CONF_DIR / "claims")),
                                          FitOptions(n_boot=200), where=str(runs))
    assert alone.fit is not None
    verdict_lines = [line for line in lines if line.startswith("control_reward_mle:")]
    assert verdict_lines == [f"control_reward_mle: {alone.verdict} — {alone.reason}"]
    assert sum(line.split()[:1] == ["control_reward_mle"] for line in lines) == 1  # its table row, the only row
    assert code == 1  # INCONCLUSIVE claims still fail the check (--fail-on any)
    # JSON keeps every claim, with whether it had evidence
    assert commands.main("check", [*args, "--json"], premise=no_premise) == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["claim"], r["evidence"], r["verdict"]) for r in rows] == (
        [("control_reward_mle", True, alone.verdict)] + [(ids[n], False, "INCONCLUSIVE") for n in NO_EVIDENCE])


def test_a_folder_with_no_evidence_at_all_prints_one_line(tmp_path, capsys):
    runs = control_runs(tmp_path / "runs", experiment="my_screen")  # tagged with another experiment
    code = commands.main("check", ["control", *NO_EVIDENCE, "--runs", str(runs), "--n-boot", "200"], premise=no_premise)
    out = capsys.readouterr()
    assert code == 1 and out.err == ""
    (line,) = out.out.strip().splitlines()
    assert line.startswith(f"no evidence under {runs} for 4 claims") and "experiment(s) my_screen" in line
    assert "control_reward_mle (control_bandit)" in line and "ratebench check CLAIM" in line


def test_one_claim_without_evidence_keeps_its_own_reason(tmp_path, capsys):
    runs = control_runs(tmp_path / "runs", experiment="my_screen")
    assert commands.main("check", ["control", "--runs", str(runs), "--n-boot", "200"], premise=no_premise) == 1
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line == (f"control_reward_mle: INCONCLUSIVE — no runs of experiment 'control_bandit' (reward_mle on bandit) "
                    f"under {runs}; experiments found: my_screen")
