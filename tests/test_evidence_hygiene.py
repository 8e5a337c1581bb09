"""Evidence hygiene (issue 10, item 5): a copied run folder is counted once, configurations whose
curves are identical seed for seed are flagged, a claim is judged only on runs of its own
experiment, `check` runs each experiment once however many claims share it, and a finished sweep is
reused only by the code that produced it."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import yaml
from ratebench import experiments
from ratebench.analysis import commands
from ratebench.analysis.claims import INCONCLUSIVE, load_claim
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.load import load
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run

from test_claims import CONTROL, base_claim

X = evaluation_grid(1e5)


def control_runs(root, n_runs=2, seeds=6, b=1.0, experiment="control_bandit", rng_seed=0, config_extra=None):
    rng = np.random.default_rng(rng_seed)
    for r in range(n_runs):
        config = {"algorithm": {"name": "reward_mle"}, "env": {"name": "bandit"}, **(config_extra or {})}
        write_run(root / f"job{r}", X, synthetic_values(X, b, seeds, rng, A=10.0), list(range(seeds * r, seeds * r + seeds)),
                  metric="reward_err", algorithm="reward_mle", env="bandit", config=config, experiment=experiment)
    return root


def test_a_copied_run_folder_is_counted_once_with_one_warning(tmp_path):
    control_runs(tmp_path / "a")
    single = experiments.evaluate_claim(load(tmp_path / "a"), load_claim(CONTROL), FitOptions(n_boot=500))[0].fit
    shutil.copytree(tmp_path / "a" / "job0", tmp_path / "a" / "copy_of_job0")
    with pytest.warns(UserWarning, match="duplicate runs") as caught:
        loaded = load(tmp_path / "a")
    assert sum("duplicate runs" in str(w.message) for w in caught) == 1
    assert "copy_of_job0" in str(caught[0].message) and "job0" in str(caught[0].message)
    assert len(loaded.seeds) == 12  # 2 runs x 6 seeds, not 18
    doubled = experiments.evaluate_claim(loaded, load_claim(CONTROL), FitOptions(n_boot=500))[0].fit
    assert doubled.n_seeds == single.n_seeds == 12 and single.status == "ok"
    assert (doubled.p, doubled.p_low, doubled.p_high) == pytest.approx((single.p, single.p_low, single.p_high))


def test_identical_curves_across_pooled_configurations_are_flagged(tmp_path):
    # the same seeds and the same curves under two different configs (a knob that changed nothing; impl
    # is one the experiment's evidence may vary in, so both runs are the control's evidence)
    control_runs(tmp_path / "k1", n_runs=1, rng_seed=5, config_extra={"impl": "fast"})
    control_runs(tmp_path / "k2", n_runs=1, rng_seed=5, config_extra={"impl": "eager"})
    loaded = load(tmp_path)
    assert loaded.seeds["config_hash"].nunique() == 2
    with pytest.warns(UserWarning, match="identical across pooled runs"):
        experiments.evaluate_claim(loaded, load_claim(CONTROL), FitOptions(n_boot=200))
    # different seeds' curves (another draw): no warning
    other = tmp_path / "other"
    control_runs(other / "k1", n_runs=1, rng_seed=5, config_extra={"impl": "fast"})
    control_runs(other / "k2", n_runs=1, rng_seed=6, config_extra={"impl": "eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        experiments.evaluate_claim(load(other), load_claim(CONTROL), FitOptions(n_boot=200))


def test_a_claim_is_judged_only_on_runs_of_its_experiment(tmp_path, capsys):
    control_runs(tmp_path, experiment="some_tuning_screen")
    verdict, _, _ = experiments.evaluate_claim(load(tmp_path), load_claim(CONTROL), FitOptions(n_boot=200), where="DIR")
    assert verdict.verdict == INCONCLUSIVE and verdict.fit is None
    assert "no runs of experiment 'control_bandit'" in verdict.reason and "under DIR" in verdict.reason
    assert "some_tuning_screen" in verdict.reason  # says what it found instead
    assert commands.main("check", [str(CONTROL), "--runs", str(tmp_path), "--json"]) == 1
    (row,) = json.loads(capsys.readouterr().out)
    assert row["verdict"] == INCONCLUSIVE and "no runs of experiment" in row["reason"]


@pytest.fixture
def fake_sweeps(monkeypatch):
    """Replace the experiment subprocess by a writer of synthetic control runs; count the calls."""
    calls = []

    def fake_run(cmd, **kw):
        exp = next(a.split("=", 1)[1] for a in cmd if a.startswith("experiment="))
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("hydra.sweep.dir="))
        calls.append(exp)
        from pathlib import Path
        control_runs(Path(out), experiment=exp)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(experiments.subprocess, "run", fake_run)
    return calls


def test_check_runs_each_experiment_once_for_claims_that_share_it(tmp_path, fake_sweeps, capsys):
    twin = tmp_path / "twin.yaml"
    twin.write_text(yaml.safe_dump(base_claim(id="control_twin", tolerance=0.3)))
    code = commands.main("check", [str(CONTROL), str(twin), "--workdir", str(tmp_path / "w"), "--json",
                                   "--n-boot", "300"])
    rows = json.loads(capsys.readouterr().out)
    assert fake_sweeps == ["control_bandit"]  # one sweep for two claims
    assert [r["claim"] for r in rows] == ["control_reward_mle", "control_twin"]
    assert all(r["n_seeds"] == 12 for r in rows), rows
    assert code in (0, 1)


def test_finished_sweep_is_reused_only_by_the_same_code(tmp_path, fake_sweeps, monkeypatch, capsys):
    work = str(tmp_path / "w")
    commands.main("check", [str(CONTROL), "--workdir", work, "--n-boot", "200"])
    commands.main("check", [str(CONTROL), "--workdir", work, "--n-boot", "200"])
    assert fake_sweeps == ["control_bandit"]  # second check reused the marker
    assert "reusing finished runs" in capsys.readouterr().err
    monkeypatch.setattr(experiments, "code_fingerprint", lambda: "changed-code")
    commands.main("check", [str(CONTROL), "--workdir", work, "--n-boot", "200"])
    assert fake_sweeps == ["control_bandit", "control_bandit"]  # the marker no longer matches: the sweep re-runs
    capsys.readouterr()


@pytest.mark.parametrize("name", ["../claims/control", "/etc/passwd", ".hidden", "a/b"])
def test_experiment_names_with_path_parts_are_refused(tmp_path, name, fake_sweeps, capsys):
    claim = tmp_path / "c.yaml"
    claim.write_text(yaml.safe_dump(base_claim(experiment=name)))
    assert commands.main("check", [str(claim), "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "experiment" in err and "control_bandit" in err and err.count("\n") == 1
    assert fake_sweeps == [] and not (tmp_path / "w").exists()


def instance_runs(root, instances, tuning=(), seeds=6):
    rng = np.random.default_rng(1)
    for inst in instances:
        config = {"algorithm": {"name": "reward_mle"}, "env": {"name": "bandit", "instance_seed": inst},
                  "tuning_instances": list(tuning)}
        write_run(root / f"inst{inst}", X, synthetic_values(X, 1.0, seeds, rng, A=10.0), list(range(seeds)),
                  metric="reward_err", algorithm="reward_mle", env="bandit", config=config,
                  experiment="control_bandit")
    return root


def claim_with(tmp_path, **change):
    from ratebench.analysis.claims import parse_claim
    return parse_claim(base_claim(**change), str(tmp_path / "claim.yaml"))


def test_runs_on_tuning_instances_are_not_evidence(tmp_path):
    instance_runs(tmp_path, [0, 1], tuning=[0])
    loaded = load(tmp_path)
    evidence, note, missing = experiments.claim_evidence(loaded, claim_with(tmp_path, instances=1))
    assert missing is None and set(evidence.seeds["cfg.env.instance_seed"]) == {1}
    assert "tuning instance(s) [0]" in note
    verdict, _, _ = experiments.evaluate_claim(loaded, claim_with(tmp_path, instances=2), FitOptions(n_boot=200))
    assert verdict.verdict == INCONCLUSIVE and "1 held-out instance(s) [1]" in verdict.reason
    assert "needs ≥ 2" in verdict.reason


def test_a_claim_naming_instances_uses_exactly_those(tmp_path):
    instance_runs(tmp_path, [1, 2, 3])
    loaded = load(tmp_path)
    evidence, _, missing = experiments.claim_evidence(loaded, claim_with(tmp_path, instances=[1, 3]))
    assert missing is None and set(evidence.seeds["cfg.env.instance_seed"]) == {1, 3} and len(evidence.seeds) == 12
    _, _, missing = experiments.claim_evidence(loaded, claim_with(tmp_path, instances=[1, 4]))
    assert "no held-out runs of [4]" in missing


@pytest.mark.parametrize("bad", [0, -1, "four", [1, 1], [], True, 2.5])
def test_bad_instances_field_names_the_field(tmp_path, bad):
    from ratebench.core.errors import ConfigError
    with pytest.raises(ConfigError, match="instances"):
        claim_with(tmp_path, instances=bad)


@pytest.mark.parametrize("bad_id", ["../../x", "/abs/path", "a/b", ".hidden", "spa ce", "x;rm"])
def test_claim_ids_that_could_name_a_path_are_refused(tmp_path, bad_id):
    from ratebench.core.errors import ConfigError
    with pytest.raises(ConfigError, match="id"):
        claim_with(tmp_path, id=bad_id)
