"""Evidence matches the claim's experiment: only runs whose resolved config equals the experiment's
(up to seeds, instances, operational keys and the experiment's free_keys) are evidence; the others are
named once with the keys they differ in, and a claim with no matching run is INCONCLUSIVE, 0 seeds."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from ratebench import experiments
from ratebench.analysis import commands, evidence
from ratebench.analysis.claims import INCONCLUSIVE, find_claim, load_claim
from ratebench.analysis.inputs import CONF_DIR
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.load import load
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run
from ratebench.config import compose, validate
from ratebench.core.errors import ConfigError

from test_claims import CONTROL, base_claim

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
X = evaluation_grid(1e5)


def check_json(capsys, *args) -> tuple[int, list[dict]]:
    code = commands.main("check", [*map(str, args), "--json", "--n-boot", "200", "--no-premise"])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def override_runs(tmp_path_factory):
    """The issue's example, as a user makes it: the control experiment with two overrides (4 seeds: the
    seeds are free, the overrides are not)."""
    from ratebench.runner import run_job

    root = tmp_path_factory.mktemp("override_runs")
    run_job(compose(["experiment=control_bandit", "algorithm.lr_exponent=0.75", "budget.samples=20000", "n_seeds=4",
                     "progress=false"]), root / "run", experiment="control_bandit")
    return root


def test_an_experiment_run_with_overrides_is_not_evidence_for_its_claim(override_runs, capsys):
    record = json.loads((override_runs / "run" / "run.json").read_text())
    assert record["experiment"] == "control_bandit"  # tagged with the claim's experiment: the tag is not enough
    code, (row,) = check_json(capsys, "control", "--runs", override_runs)
    assert code == 1 and row["verdict"] == INCONCLUSIVE and row["n_seeds"] == 0, row
    reason = row["reason"]
    assert "not evidence: 1 run(s) (4 seeds)" in reason
    assert "differ from its config in algorithm.lr_exponent (0.75; experiment 1), budget.samples (20000; " \
           "experiment 100000)" in reason, reason
    # freeing one key for this check: the other still keeps the run out, and is the only one named
    code, (row,) = check_json(capsys, "control", "--runs", override_runs, "--free", "budget.samples")
    assert row["verdict"] == INCONCLUSIVE and row["n_seeds"] == 0
    assert "algorithm.lr_exponent" in row["reason"] and "budget.samples (" not in row["reason"]


def control_runs(root, n_runs=2, seeds=6, experiment="control_bandit", config=None, rng_seed=0):
    rng = np.random.default_rng(rng_seed)
    for r in range(n_runs):
        write_run(root / f"job{r}", X, synthetic_values(X, 1.0, seeds, rng, A=10.0),
                  list(range(seeds * r, seeds * r + seeds)), metric="reward_err", algorithm="reward_mle", env="bandit",
                  config=config or {}, experiment=experiment)
    return root


def test_matching_runs_are_pooled_and_the_others_listed_once(tmp_path):
    control_runs(tmp_path / "a", n_runs=2)  # the experiment as its file says: 12 seeds
    control_runs(tmp_path / "b", n_runs=2, rng_seed=1, config={"algorithm": {"lr_exponent": 0.75}})
    loaded = load(tmp_path)
    chosen, note, missing = experiments.claim_evidence(loaded, load_claim(CONTROL))
    assert missing is None and len(chosen.seeds) == 12
    assert set(chosen.seeds["run_dir"].map(lambda d: d.split("/")[-2])) == {"a"}
    assert note.count("not evidence") == 1 and "2 run(s) (12 seeds)" in note and "algorithm.lr_exponent" in note
    verdict, curves, _ = experiments.evaluate_claim(loaded, load_claim(CONTROL), FitOptions(n_boot=200))
    assert verdict.fit.n_seeds == 12 == curves.n_seeds


def test_free_seeds_instances_and_operational_keys_keep_a_run_evidence(tmp_path):
    control_runs(tmp_path, n_runs=1, config={"env": {"instance_seed": 3}, "impl": "eager", "progress": False,
                                             "checkpoint_every_s": 0.0, "threads": 2})
    chosen, note, missing = experiments.claim_evidence(load(tmp_path), load_claim(CONTROL))
    assert missing is None and len(chosen.seeds) == 6 and note == ""


def test_an_untagged_copy_with_the_same_run_hash_still_counts(tmp_path):
    """The duplicate check keeps the copy of a run_hash that is tagged with an experiment, even when a copy recording
    no experiment (a plain `ratebench run` spelling the experiment out) comes first in path order; the evidence
    is not lost either way."""
    control_runs(tmp_path / "b_tagged", n_runs=1)
    shutil.copytree(tmp_path / "b_tagged", tmp_path / "a_plain")
    for p in (tmp_path / "a_plain").rglob("run.json"):
        record = json.loads(p.read_text())
        record["experiment"] = None
        p.write_text(json.dumps(record))
    with pytest.warns(UserWarning, match="duplicate runs"):
        loaded = load(tmp_path)
    assert len(loaded.seeds) == 6 and (loaded.seeds["experiment"] == "control_bandit").all()  # the tagged copy
    assert not loaded.seeds["run_dir"].str.contains("a_plain").any()
    chosen, _, missing = experiments.claim_evidence(loaded, load_claim(CONTROL))
    assert missing is None and len(chosen.seeds) == 6
    # an untagged run that differs is not the experiment's: not evidence, and not listed either
    control_runs(tmp_path / "c_other", n_runs=1, experiment=None, rng_seed=3,
                 config={"algorithm": {"name": "reward_mle"}, "env": {"name": "bandit"}})
    chosen, note, _ = experiments.claim_evidence(load(tmp_path / "c_other"), load_claim(CONTROL))
    assert chosen.seeds.empty and note == ""


def test_a_tag_that_is_no_shipped_experiment_is_matched_by_tag_with_a_note(tmp_path):
    control_runs(tmp_path, n_runs=1, experiment="hand_made")
    from ratebench.analysis.claims import parse_claim

    claim = parse_claim(base_claim(experiment="hand_made"), "c.yaml")
    chosen, note, missing = experiments.claim_evidence(load(tmp_path), claim)
    assert missing is None and len(chosen.seeds) == 6 and "matched by their experiment tag only" in note


# ---------------------------------------------------------------------------------------------- pure functions

def test_same_value_and_differences():
    assert evidence.same_value(1, 1.0) and evidence.same_value(None, float("nan"))
    assert not evidence.same_value(True, 1) and not evidence.same_value(0.75, 1.0)
    assert evidence.same_value([1, 2], "[1, 2]") and not evidence.same_value(None, 0)
    run = {"budget.samples": 20000, "algorithm.lr_exponent": 0.75, "env.instance_seed": 4, "model.reward.width": 8,
           "extra": None}
    want = {"budget.samples": 100000, "algorithm.lr_exponent": 1.0, "env.instance_seed": 0, "model.reward.width": 32}
    assert evidence.config_differences(run, want, evidence.ALWAYS_FREE) == [
        "algorithm.lr_exponent", "budget.samples", "model.reward.width"]
    assert evidence.config_differences(run, want, (*evidence.ALWAYS_FREE, "model", "budget.samples")) == [
        "algorithm.lr_exponent"]  # a parent frees its subtree; `extra` null on one side only is no difference
    assert evidence.config_differences({"budget.samples": 1}, {}, ()) == ["budget.samples"]


def test_sweep_combinations_expand_discrete_sweeps_and_free_continuous_ones():
    combos, cont = evidence.sweep_combinations({"algorithm": "bilevel,dpo", "env.instance_seed": "1,2,3",
                                                "algorithm.c_xi": "range(1,3)"}, evidence.ALWAYS_FREE)
    assert sorted(map(tuple, combos)) == sorted((f"algorithm={a}", f"algorithm.c_xi={c}")
                                                for a in ("bilevel", "dpo") for c in (1, 2))
    assert cont == []
    combos, cont = evidence.sweep_combinations({"algorithm.lr": "tag(log, interval(0.03, 30))"}, ())
    assert combos == [[]] and cont == ["algorithm.lr"]


def test_experiment_configs_follow_the_experiment_files_sweep():
    compare = experiments.experiment_configs("compare_bandit")
    assert sorted(c["algorithm.name"] for c in compare.configs) == ["bilevel", "dpo", "ppo_rlhf"]
    assert all(c["budget.samples"] == 100000 for c in compare.configs)
    rate = experiments.experiment_configs("rate_bandit")
    assert len(rate.configs) == 1 and rate.tuning == {0}  # instances are free, not expanded
    sens = experiments.experiment_configs("sensitivity_bandit")
    assert len({(c["algorithm.xi_exponent"], c["algorithm.lam_exponent"]) for c in sens.configs}) == 9
    assert experiments.experiment_configs("no_such_preset").configs is None


def test_free_keys_must_name_keys_of_the_config():
    assert validate(compose(["free_keys=[budget.samples,model]"])).seeds  # accepted
    with pytest.raises(ConfigError) as info:
        validate(compose(["free_keys=[budget.sampels]"]))
    assert info.value.field == "free_keys" and "budget.sampels" in str(info.value)


def test_bad_free_option_is_bad_input(tmp_path, capsys):
    control_runs(tmp_path, n_runs=1)
    assert commands.main("check", ["control", "--runs", str(tmp_path), "--free", "budget samples"]) == 2
    err = capsys.readouterr().err
    assert "--free" in err and err.count("\n") == 1


@pytest.mark.parametrize("claim_name,overrides", [
    ("smoke_bilevel", ["experiment=smoke_bilevel", "env.instance_seed=1"]),  # interpolated and tuned constants
    (None, ["experiment=compare_bandit", "algorithm=dpo"]),  # one job of a sweep over a config group
])
def test_a_real_run_of_the_experiment_matches_its_composed_config(claim_name, overrides, tmp_path):
    """What a job writes in run.json is what experiment_configs composes: a real (small) job of the experiment
    differs in nothing but the budget freed for it."""
    from ratebench.analysis.claims import parse_claim
    from ratebench.runner import run_job

    name = overrides[0].split("=")[1]
    run_job(compose([*overrides, "budget.samples=2000", "n_seeds=2", "progress=false"]), tmp_path / "run",
            experiment=name)
    loaded = load(tmp_path)
    algorithm = loaded.seeds["algorithm"].iloc[0]
    claim = (load_claim(find_claim(claim_name, CONF_DIR / "claims")) if claim_name else
             parse_claim({**base_claim(), "id": "c", "algorithm": algorithm, "experiment": name, "metric": "policy_gap",
                          "epsilon": {"unit": "policy_gap", "min": 0.01, "max": 1.0}}, "c.yaml"))
    expected = experiments.experiment_configs(name)
    match = evidence.match_experiment(loaded.seeds, name, list(expected.configs), expected.free)
    assert list(match.rejected.values()) == [["budget.samples"]]  # the one key the job changed, nothing else
    chosen, note, missing = experiments.claim_evidence(loaded, claim, free=("budget.samples",))
    assert len(chosen.seeds) == 2 and "not evidence" not in note, (note, missing)


def test_a_run_from_before_a_key_existed_matches_where_the_experiment_keeps_its_default():
    """A run's config lacks algorithm.momentum (written before the key existed; NaN in the seed table). It is the
    experiment's run when the experiment keeps the key's default, and not when the experiment sets another value;
    a run that records a different value never matches; without defaults the missing key differs."""
    from ratebench.analysis.evidence import config_differences

    defaults = {"algorithm.momentum": "none", "algorithm.lr": 0.1}
    keeps = {"algorithm.momentum": "none", "algorithm.lr": 0.1}
    sets = {"algorithm.momentum": "storm", "algorithm.lr": 0.1}
    old_run = {"algorithm.momentum": float("nan"), "algorithm.lr": 0.1}
    assert config_differences(old_run, keeps, (), defaults) == []
    assert config_differences(old_run, sets, (), defaults) == ["algorithm.momentum"]
    assert config_differences(old_run, keeps, ()) == ["algorithm.momentum"]
    assert config_differences({"algorithm.momentum": "storm", "algorithm.lr": 0.1}, keeps, (), defaults) == [
        "algorithm.momentum"]
    # the defaults `check` passes (harness/experiments.py): the experiment's algorithm and env groups alone
    shipped = experiments.experiment_configs("f2sa_upper")
    assert shipped.defaults["algorithm.momentum"] == "none" and shipped.defaults["algorithm.name"] == "bilevel"
    assert all(c["algorithm.momentum"] == "none" for c in shipped.configs)
    assert experiments.experiment_configs("f2sa_upper_mom").defaults["algorithm.momentum"] == "none"
