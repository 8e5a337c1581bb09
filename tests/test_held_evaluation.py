"""Held evaluation points (harness/runner.py HOLD_STEPS): points close together are scored in one batched pass
(Evaluator.evaluate_many, observe_many, SeedHealth.evaluate_many). Checked against the same job scored one point at
a time (HOLD_POINTS = 1, the old loop), through saturations, a checkpoint taken while points are held, and min
psi_lam read back from its disk store."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import at_step
from ratebench import checkpoint, runner
from ratebench.algorithms.bilevel import Bilevel
from ratebench.envs import penalty
from ratebench.fstar import MinPsiStore
from ratebench.runner import run_job

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# the theorem regime on held-out instance 11 (tests/test_health.py): its seeds saturate at different steps, all
# within the first 1000 steps, so saturations are found at held points
SATURATING = ["env=bandit", "algorithm=bilevel", "algorithm.batch_traj=2", "algorithm.batch_pairs=2",
              "budget.samples=1000000000", "n_seeds=16", "env.instance_seed=11", "budget.steps=1000"]


def _frame(folder):
    return pd.read_parquet(folder / "metrics.parquet").drop(columns="wall_s")


def _one_point_at_a_time(monkeypatch):
    monkeypatch.setattr(runner, "HOLD_POINTS", 1)


OTHERS = ["ppo_rlhf", "offline_rlhf", "reward_mle", "npg", "softmax_pg"]


@pytest.mark.parametrize("overrides", [["algorithm=bilevel", "budget.samples=20000"], SATURATING,
                                       ["algorithm=dpo", "budget.samples=20000", "n_seeds=4"],
                                       *[[f"algorithm={name}", "budget.samples=5000", "n_seeds=3"] for name in OTHERS]],
                         ids=["readme-job", "saturating", "dpo", *OTHERS])
def test_held_points_give_the_rows_and_statuses_of_points_scored_one_at_a_time(compose_config, tmp_path,
                                                                                monkeypatch, overrides):
    cfg = compose_config(overrides)
    held = run_job(cfg, tmp_path / "held")
    with monkeypatch.context() as patch:
        _one_point_at_a_time(patch)
        alone = run_job(cfg, tmp_path / "alone")
    assert held["status"] == alone["status"]
    a, b = _frame(tmp_path / "held"), _frame(tmp_path / "alone")  # the same rows: seeds, points, counters exactly
    pd.testing.assert_frame_equal(a[["seed", "step", "samples", "queries"]], b[["seed", "step", "samples", "queries"]])
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-12, atol=1e-15)  # the metrics up to rounding
    if overrides is SATURATING:  # the case is what it claims: seeds stop at different held points
        steps = {st["step"] for st in held["status"].values() if st["status"] == "saturated"}
        assert len(steps) >= 2, held["status"]


def test_a_checkpoint_written_while_points_are_held_resumes_to_the_same_rows(compose_config, tmp_path, monkeypatch):
    cfg = compose_config(SATURATING + ["checkpoint_every_s=0"])
    straight = run_job(cfg, tmp_path / "straight")
    seen = {}

    def interrupt(state):
        seen.update(checkpoint.load(tmp_path / "resumed", straight["run_hash"]))
        raise KeyboardInterrupt

    original = Bilevel.run_segment
    monkeypatch.setattr(Bilevel, "run_segment", at_step(Bilevel, 300, interrupt))
    with pytest.raises(KeyboardInterrupt):
        run_job(cfg, tmp_path / "resumed")
    monkeypatch.setattr(Bilevel, "run_segment", original)
    assert len(seen["held"]) >= 2 and seen["counters"]["step"] > 0  # the checkpoint holds unscored points
    resumed = run_job(cfg, tmp_path / "resumed")
    assert resumed["resumed_from_step"] == seen["counters"]["step"]
    assert resumed["status"] == straight["status"]
    pd.testing.assert_frame_equal(_frame(tmp_path / "straight"), _frame(tmp_path / "resumed"), check_exact=True)


@pytest.mark.parametrize("env", ["bandit", "mdp", "token"])
def test_evaluate_many_scores_each_state_as_it_would_alone(compose_config, tmp_path, monkeypatch, env):
    """Up to rounding: a matrix product over more rows may round differently in the last place (hence the hold
    rule reads no clock, so that a run and its resume score the same points together and agree bit for bit)."""
    from ratebench.evaluation import Evaluator

    captured = []
    original = Evaluator.evaluate_columns

    def spy(self, states, tables=None):
        captured.append((self, [self.algorithm.select_rows(s, slice(None)) for s in states]))
        return original(self, states, tables)

    monkeypatch.setattr(Evaluator, "evaluate_columns", spy)
    run_job(compose_config(["algorithm=bilevel", f"env={env}", "budget.samples=4000", "n_seeds=3"]), tmp_path / env)
    monkeypatch.setattr(Evaluator, "evaluate_columns", original)
    evaluator, states = captured[0][0], [s for _, batch in captured for s in batch]
    assert len(states) >= 10
    together = evaluator.evaluate_many(states)
    for state, joint in zip(states, together):
        alone = evaluator(state)
        assert alone.keys() == joint.keys()
        for k in alone:
            torch.testing.assert_close(joint[k], alone[k], rtol=1e-12, atol=1e-15, equal_nan=True, msg=k)


def test_min_psi_is_read_back_from_its_store_bit_for_bit(compose_config, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RATEBENCH_CACHE", str(cache))
    solves = []
    original = penalty.minimise_psi
    monkeypatch.setattr(penalty, "minimise_psi", lambda *a, **k: solves.append(1) or original(*a, **k))
    cfg = compose_config(["algorithm=bilevel", "budget.samples=20000", "n_seeds=3"])
    first = run_job(cfg, tmp_path / "first")
    entries = sorted(cache.glob("minpsi-*.json"))
    assert solves and len(entries) == len(solves)
    solved = len(solves)
    second = run_job(cfg, tmp_path / "second")
    assert len(solves) == solved  # read, not solved again
    pd.testing.assert_frame_equal(_frame(tmp_path / "first"), _frame(tmp_path / "second"), check_exact=True)
    # a damaged entry is not used: solved again, same numbers
    entries[0].write_text(json.dumps({"value": "nan", "argmin": []}))
    run_job(cfg, tmp_path / "third")
    assert len(solves) == solved + 1
    pd.testing.assert_frame_equal(_frame(tmp_path / "first"), _frame(tmp_path / "third"), check_exact=True)
    assert first["run_hash"] == second["run_hash"]


def test_the_store_key_changes_with_lam_the_starts_and_the_reward_class(tmp_path):
    store = MinPsiStore({"name": "bandit", "instance_seed": 0}, str(tmp_path))
    starts = [torch.tensor([0.1, 0.2], dtype=torch.float64)]
    base = store.path(1.0, starts, None)
    assert len({base, store.path(10 ** 0.1, starts, None), store.path(1.0, [torch.tensor([0.1, 0.2 + 1e-16], dtype=torch.float64)], None),
                store.path(1.0, starts, 2.0), MinPsiStore({"name": "bandit", "instance_seed": 1},
                                                          str(tmp_path)).path(1.0, starts, None)}) == 5
    store.put(1.0, starts, None, -0.5, torch.tensor([0.3, -0.25], dtype=torch.float64))
    value, argmin = store.get(1.0, starts, None, 2)
    assert value == -0.5 and torch.equal(argmin, torch.tensor([0.3, -0.25], dtype=torch.float64))
    assert store.get(1.0, starts, None, 3) is None  # the wrong number of units
