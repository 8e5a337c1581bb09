"""Instances as a batch axis (issue 12 item 4): an instance family stepped as one batch (rows = instances x
seeds) computes, for every seed of every instance, what that instance's own job computes, and a batched job
(`instances=[...]`) writes each instance's folder as its own job would (same run_hash, same metrics)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import at_step

from ratebench import envs
from ratebench.algorithms import ALGORITHMS
from ratebench.algorithms.bilevel import Bilevel
from ratebench.config import validate
from ratebench.envs.tabular import InstanceBatch
from ratebench.runner import SEGMENT_DIVERGED, run_instances_or_skip, run_job
from ratebench.envs.sampling import Counters, CountingSampler

INSTANCES, SEEDS = [1, 2, 3], [0, 5]

# (env, overrides, impl, steps): every algorithm mode that can batch instances, both impls where there are two
CASES = [
    *[(env, ["algorithm=bilevel"], "fast", 40) for env in ("bandit", "mdp", "token")],
    *[(env, ["algorithm=bilevel"], "reference", 20) for env in ("bandit", "mdp")],
    ("mdp", ["algorithm=bilevel", "algorithm.variant=double_loop"], "fast", 4),
    ("mdp", ["algorithm=bilevel", "model.reward.kind=linear"], "fast", 20),
    ("bandit", ["algorithm=bilevel", "algorithm.batch_traj=2", "algorithm.batch_pairs=2"], "fast", 40),
    ("mdp", ["algorithm=dpo"], "fast", 2),  # offline: one step is a refit on the pi_ref dataset
    ("bandit", ["algorithm=dpo"], "reference", 2),  # the autograd refit too
    ("bandit", ["algorithm=ppo_rlhf"], "reference", 2),
    ("token", ["algorithm=dpo", "algorithm.mode=online"], "fast", 4),
    ("bandit", ["algorithm=dpo", "algorithm.mode=iterative"], "fast", 2),
    ("mdp", ["algorithm=dpo", "algorithm.mode=online", "algorithm.loss=ipo"], "fast", 4),
    ("mdp", ["algorithm=ppo_rlhf"], "fast", 2),
    ("mdp", ["algorithm=ppo_rlhf", "algorithm.mode=online"], "fast", 3),
    ("bandit", ["algorithm=ppo_rlhf", "algorithm.reward_oracle=true"], "fast", 3),
]


def _stepped(compose_config, env, overrides, impl, steps, problem, seeds):
    v = validate(compose_config([f"env={env}", *overrides]))
    algo = ALGORITHMS[v.algorithm.name](v.algorithm, v.model, problem)
    algo.impl = impl
    counters = Counters()
    sampler = CountingSampler(problem, seeds, counters)
    state = algo.init(seeds)
    for _ in range(steps):
        state = algo.step(state, sampler)
    return algo.tensors(state), vars(counters), sampler.state_dict()


@pytest.mark.parametrize("env,overrides,impl,steps", CASES, ids=lambda c: c if isinstance(c, str) else None)
def test_a_batched_family_steps_each_instance_as_its_own_job(compose_config, env, overrides, impl, steps):
    """Each (instance, seed) row of the batch == the seed in a job on its instance alone, to 1e-12 (the linear
    reward's product is a bmm in the batch and a mm alone: last-bit differences), with the same samples,
    queries and RNG position. The instances differ (features, teacher, pi_ref, transitions), so a batch that
    stepped every row on one instance's tables would fail here."""
    problems = [envs.make(validate(compose_config([f"env={env}", f"env.instance_seed={k}"])).env) for k in INSTANCES]
    alone = [_stepped(compose_config, env, overrides, impl, steps, p, SEEDS) for p in problems]
    rows = torch.arange(len(INSTANCES)).repeat_interleave(len(SEEDS))
    batch, counters, rng = _stepped(compose_config, env, overrides, impl, steps, InstanceBatch(problems, rows),
                                    SEEDS * len(INSTANCES))
    n = len(SEEDS)
    for i, (tensors, counters_i, rng_i) in enumerate(alone):
        assert counters_i == counters and rng_i == rng
        for key, t in tensors.items():
            scale = max(1.0, float(t.abs().max()))
            assert float((batch[key][i * n:(i + 1) * n] - t).abs().max()) <= 1e-12 * scale, (key, i)
    # the instances are really different: the same seed ends elsewhere on each
    assert any(not torch.equal(t, alone[1][0][key]) for key, t in alone[0][0].items())


def test_an_instance_batch_refuses_instances_of_other_sizes(compose_config):
    small = envs.make(validate(compose_config(["env=bandit"])).env)
    other = envs.make(validate(compose_config(["env=bandit", "env.n_actions=5"])).env)
    with pytest.raises(ValueError, match="same sizes"):
        InstanceBatch([small, other], torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="evaluate each instance"):
        InstanceBatch([small, small], torch.tensor([0, 1])).trajectory_table()


FAMILY = ["algorithm=bilevel", "seeds=[0,3,4]", "budget.samples=6000", "budget.evals_per_decade=3"]


COUNTERS = ["seed", "step", "samples", "queries"]


def _metrics(folder):
    return pd.read_parquet(folder / "metrics.parquet").drop(columns="wall_s")


def test_a_batched_job_writes_the_folders_of_separate_jobs(compose_config, tmp_path, capsys):
    """run.json (run_hash, config, targets, statuses, counters) of each instance folder equals the separate job's
    exactly, and metrics.parquet to float64 round-off (same rows, seeds, steps and counters; the metrics within
    1e-9 relative: a product over a larger batch may round differently in the last bit, as across seed
    batches, tests/test_bilevel.py); a separate job pointed at an instance folder skips it (interchangeable),
    and the batch re-run skips every instance."""
    folders, skipped = run_instances_or_skip(compose_config(FAMILY + ["instances=[2,1]"]), tmp_path / "batch")
    assert not skipped and [f.name for f, _ in folders] == ["instance_2", "instance_1"]
    for folder, record in folders:
        k = record["config"]["env"]["instance_seed"]
        alone = run_job(compose_config(FAMILY + [f"env.instance_seed={k}"]), tmp_path / f"alone_{k}")
        for key in ("run_hash", "config_hash", "config", "status", "counters", "target", "target_global",
                    "f_star", "f_star_local", "j_star", "metrics_rows"):
            assert record[key] == alone[key], key
        assert record["provenance"]["instance_batch"]["instances"] == [2, 1]
        batched, alone_rows = _metrics(folder), _metrics(tmp_path / f"alone_{k}")
        pd.testing.assert_frame_equal(batched[COUNTERS], alone_rows[COUNTERS], check_exact=True)
        pd.testing.assert_frame_equal(batched, alone_rows, check_exact=False, rtol=1e-9, atol=1e-12)
        capsys.readouterr()
        run_job(compose_config(FAMILY + [f"env.instance_seed={k}"]), folder)
        assert "skipping" in capsys.readouterr().out
    assert not (tmp_path / "batch" / "checkpoint.pt").exists()
    _, skipped = run_instances_or_skip(compose_config(FAMILY + ["instances=[2,1]"]), tmp_path / "batch")
    assert skipped


def test_an_interrupted_batch_resumes_to_the_uninterrupted_folders(compose_config, tmp_path, monkeypatch, capsys):
    cfg = compose_config(FAMILY + ["instances=[1,2]", "checkpoint_every_s=0"])
    run_instances_or_skip(cfg, tmp_path / "straight")
    original = Bilevel.run_segment

    def interrupt(state):
        raise KeyboardInterrupt  # not caught by the harness: nothing finalised

    monkeypatch.setattr(Bilevel, "run_segment", at_step(Bilevel, 30, interrupt))  # the harness steps in segments
    with pytest.raises(KeyboardInterrupt):
        run_instances_or_skip(cfg, tmp_path / "resumed")
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["checkpoint.pt"]
    monkeypatch.setattr(Bilevel, "run_segment", original)
    folders, _ = run_instances_or_skip(cfg, tmp_path / "resumed")
    assert "resuming" in capsys.readouterr().out and 0 < folders[0][1]["resumed_from_step"] <= 30
    for k in (1, 2):
        pd.testing.assert_frame_equal(_metrics(tmp_path / "straight" / f"instance_{k}"),
                                      _metrics(tmp_path / "resumed" / f"instance_{k}"), check_exact=True)
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()


def test_a_seed_that_diverges_ends_only_in_its_instance(compose_config, tmp_path, monkeypatch):
    def nan_in_one_row(state):  # before step 20: the step makes it non-finite, and the harness marks step 20
        state.nu[0][4].view(-1)[0] = float("nan")  # row 4 = instance 2 (the second), seed 3

    monkeypatch.setattr(Bilevel, "run_segment", at_step(Bilevel, 19, nan_in_one_row))  # the harness steps in segments
    folders, _ = run_instances_or_skip(compose_config(FAMILY + ["instances=[1,2]"]), tmp_path)
    first, second = (record["status"] for _, record in folders)
    assert all(st["status"] == "completed" for st in first.values())
    assert second["3"] == {"status": "diverged", "step": 20,
                          "reason": SEGMENT_DIVERGED}  # the harness steps bilevel in segments
    assert second["0"]["status"] == second["4"]["status"] == "completed"
    frame = _metrics(tmp_path / "instance_2")
    assert frame.loc[frame.seed == 3, "step"].max() < 20 and frame.loc[frame.seed == 4, "samples"].max() >= 6000
    saved = json.loads((tmp_path / "instance_2" / "run.json").read_text())
    assert saved["status"]["3"]["status"] == "diverged"


@pytest.mark.parametrize("overrides,words", [
    (["algorithm=bilevel", "instances=[1,1]"], ["instances", "distinct"]),
    (["algorithm=bilevel", "instances=[]"], ["instances", "non-empty"]),
    (["algorithm=bilevel", "instances=[-1,2]"], ["instances", ">= 0"]),
    (["algorithm=reward_mle", "instances=[1,2]"], ["instances", "Fisher", "env.instance_seed=1,2"]),
    (["algorithm=bilevel", "algorithm.oracle=exact", "budget.steps=10", "instances=[1,2]"], ["instances", "oracle=exact"]),
])
def test_bad_instance_lists_are_refused_before_compute(expect_bad_input, overrides, words):
    expect_bad_input(overrides, words)


def test_ratebench_run_with_instances_writes_each_folder_and_returns_the_mean_objective(tmp_path, capsys):
    """Through the command line (the Hydra app): exit 0, one folder per instance, and the objective a tuning
    sweeper gets is the mean over the instances of each folder's own objective (computed here from its files)."""
    import numpy as np

    from ratebench.cli import main

    out = tmp_path / "family"
    code = main(["run", "algorithm=bilevel", "instances=[3,1]", "seeds=[0,2]", "budget.samples=3000",
                 "objective=policy_gap", "progress=false", f"hydra.run.dir={out}"])
    printed = capsys.readouterr().out
    assert code == 0
    finals = []
    for k in (3, 1):
        record = json.loads((out / f"instance_{k}" / "run.json").read_text())
        assert record["config"]["env"]["instance_seed"] == k and record["config"]["instances"] is None
        metrics = pd.read_parquet(out / f"instance_{k}" / "metrics.parquet")
        finals.append(metrics.sort_values("samples").groupby("seed")["policy_gap"].last().mean())
    line = [ln for ln in printed.splitlines() if ln.startswith("ratebench: objective")][-1]
    assert "over 2 instances" in line
    assert np.isclose(float(line.rsplit("=", 1)[1]), np.mean(finals), rtol=1e-5)
