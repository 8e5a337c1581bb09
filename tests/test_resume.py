"""Checkpoint and resume: every algorithm's state survives torch.save/torch.load(weights_only=True)
bit for bit, an interrupted job resumes to the uninterrupted curve, finished jobs are skipped."""
from __future__ import annotations

import io
import json
import os

import pandas as pd
import pytest
import torch

from ratebench import checkpoint, envs
from ratebench.algorithms import ALGORITHMS
from ratebench.algorithms.reward_mle import RewardMLE
from ratebench.config import validate
from ratebench.runner import run_job
from ratebench.envs.sampling import Counters, CountingSampler

SEEDS = [4, 1]


def build(compose_config, name):
    v = validate(compose_config([f"algorithm={name}", f"seeds={SEEDS}"]))
    problem = envs.make(v.env)
    algo = ALGORITHMS[name](v.algorithm, v.model, problem)
    counters = Counters()
    return algo, CountingSampler(problem, v.seeds, counters), v.seeds, counters


def through_disk(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_state_survives_a_checkpoint_bit_for_bit(compose_config, name):
    """k steps, save, load into a *fresh* algorithm/sampler, m more steps == k + m steps straight."""
    k, m = 2, 3
    algo, sampler, seeds, counters = build(compose_config, name)
    state = algo.init(seeds)
    for _ in range(k):
        state = algo.step(state, sampler)
    saved = through_disk({"algorithm": algo.state_dict(state), "sampler": sampler.state_dict(),
                          "counters": dict(vars(counters))})
    for _ in range(m):
        state = algo.step(state, sampler)
    straight = {key: t.clone() for key, t in algo.tensors(state).items()}

    algo2, sampler2, _, counters2 = build(compose_config, name)
    state2 = algo2.load_state_dict(algo2.init(seeds), saved["algorithm"])
    sampler2.load_state_dict(saved["sampler"])
    vars(counters2).update(saved["counters"])  # the harness restores its counters too
    for _ in range(m):
        state2 = algo2.step(state2, sampler2)
    resumed = algo2.tensors(state2)
    assert straight.keys() == resumed.keys()
    for key, tensor in straight.items():
        assert torch.equal(tensor, resumed[key]), f"{name}: {key} differs after resume"
    assert algo.schedule(state) == algo2.schedule(state2)


def test_checkpoint_holds_data_only(compose_config):
    """The payload is plain tensors/containers (weights_only loads it); a class outside ratebench
    named in a checkpoint is refused."""
    from ratebench.algorithms.base import decode_state

    algo, _, seeds, _ = build(compose_config, "reward_mle")
    saved = through_disk(algo.state_dict(algo.init(seeds)))
    assert saved["state"]["__class__"] == "ratebench.algorithms.reward_mle:RewardMLEState"
    with pytest.raises(ValueError, match="outside ratebench"):
        decode_state({"__class__": "os:system", "__fields__": {}}, None)


def run(compose_config, out, extra=()):
    cfg = compose_config(["seeds=[0,1,2]", "budget.samples=3000", "checkpoint_every_s=0", *extra])
    return run_job(cfg, out)


def test_interrupted_job_resumes_to_the_uninterrupted_curve(compose_config, tmp_path, monkeypatch, capsys):
    run(compose_config, tmp_path / "straight")
    original = RewardMLE.step

    def killed_at_step_200(self, state, sampler):
        if state.t == 200:
            raise KeyboardInterrupt  # like a SIGINT: not caught by the harness, nothing finalised
        return original(self, state, sampler)

    monkeypatch.setattr(RewardMLE, "step", killed_at_step_200)
    with pytest.raises(KeyboardInterrupt):
        run(compose_config, tmp_path / "resumed")
    left = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert left == ["checkpoint.pt"], left  # no run.json / metrics.parquet from a killed job
    monkeypatch.setattr(RewardMLE, "step", original)
    record = run(compose_config, tmp_path / "resumed")
    assert "resuming" in capsys.readouterr().out
    assert 0 < record["resumed_from_step"] <= 200
    straight = pd.read_parquet(tmp_path / "straight" / "metrics.parquet").drop(columns="wall_s")
    resumed = pd.read_parquet(tmp_path / "resumed" / "metrics.parquet").drop(columns="wall_s")
    pd.testing.assert_frame_equal(straight, resumed, check_exact=True)
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == ["metrics.parquet", "run.json"]


def test_finished_job_is_skipped_and_its_files_untouched(compose_config, tmp_path, capsys):
    first = run(compose_config, tmp_path)
    stamps = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    again = run(compose_config, tmp_path)
    assert f"skipping {tmp_path}: completed" in capsys.readouterr().out
    assert again["run_hash"] == first["run_hash"]
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()} == stamps


def test_other_config_in_the_folder_is_not_skipped_nor_resumed(compose_config, tmp_path):
    """Another config in a folder holding a finished run is refused (issue 14, item 3: it used to
    replace the run silently); with overwrite=true it is computed afresh, neither skipped nor resumed."""
    from ratebench.core.errors import ConfigError

    first = run(compose_config, tmp_path)
    with pytest.raises(ConfigError, match=first["run_hash"]):
        run(compose_config, tmp_path, ["budget.samples=2000"])
    assert json.loads((tmp_path / "run.json").read_text())["run_hash"] == first["run_hash"]
    record = run(compose_config, tmp_path, ["budget.samples=2000", "overwrite=true"])
    assert record["resumed_from_step"] is None
    assert json.loads((tmp_path / "run.json").read_text())["config"]["budget"]["samples"] == 2000


def test_progress_and_checkpoint_interval_do_not_change_the_identity(compose_config, tmp_path, capsys):
    first = run(compose_config, tmp_path)
    again = run(compose_config, tmp_path, ["checkpoint_every_s=60", "progress=false"])
    assert "skipping" in capsys.readouterr().out and again["run_hash"] == first["run_hash"]


def test_a_killed_checkpoint_write_leaves_no_file(tmp_path, monkeypatch):
    def crash(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, {"run_hash": "x", "rows": {}})
    assert list(tmp_path.iterdir()) == []


def test_unreadable_or_foreign_checkpoint_is_ignored_with_a_warning_saying_why(tmp_path):
    (tmp_path / checkpoint.FILENAME).write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="discarding checkpoint .*checksum does not match"):
        assert checkpoint.load(tmp_path, "abc") is None
    checkpoint.save(tmp_path, {"run_hash": "other", "format": checkpoint.FORMAT - 1})  # an older layout
    with pytest.warns(UserWarning, match="discarding checkpoint .*not a checkpoint of this ratebench format"):
        assert checkpoint.load(tmp_path, "other") is None
    checkpoint.save(tmp_path, {"run_hash": "other"})
    with pytest.warns(UserWarning, match="discarding checkpoint .*belongs to another run .*other"):
        assert checkpoint.load(tmp_path, "abc") is None
    assert checkpoint.load(tmp_path, "other")["run_hash"] == "other"
