"""The run harness end to end: the reward_mle control's decay, records, determinism,
divergence and failure handling."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ratebench.algorithms.reward_mle import RewardMLE
from ratebench.runner import run_job

RATEBENCH = str(Path(sys.executable).with_name("ratebench"))


def metric_at(frame: pd.DataFrame, metric: str, samples: int) -> float:
    """Median over seeds of `metric` at the evaluation point nearest `samples` (log scale)."""
    points = frame.loc[frame.samples > 0, "samples"].unique()
    nearest = points[np.argmin(np.abs(np.log(points) - np.log(samples)))]
    return float(frame.loc[frame.samples == nearest, metric].median())


def test_reward_mle_reward_error_falls_100x(compose_config, tmp_path):
    cfg = compose_config(["env=bandit", "algorithm=reward_mle", "n_seeds=16", "budget.samples=100000"])
    run_job(cfg, tmp_path)
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    early, late = metric_at(frame, "reward_err", 100), metric_at(frame, "reward_err", 100_000)
    assert early / late >= 100, f"median reward_err {early:.3g} at 1e2 -> {late:.3g} at 1e5"


def test_records_have_spec_columns_and_keys(compose_config, tmp_path):
    cfg = compose_config(["seeds=[3,5]", "budget.samples=2000"])
    record = run_job(cfg, tmp_path)
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    for column in ["seed", "step", "samples", "queries", "gap", "grad_sq", "policy_gap", "psi_gap",
                   "reward_err", "wall_s"]:
        assert column in frame.columns
    assert set(frame.seed) == {3, 5}
    assert frame.samples.max() >= 2000
    on_disk = json.loads((tmp_path / "run.json").read_text())
    for key in ["algorithm", "env", "seeds", "status", "config", "config_hash", "run_hash", "version"]:
        assert key in on_disk
    assert on_disk["status"] == {"3": {"status": "completed"}, "5": {"status": "completed"}}
    assert on_disk["run_hash"] == record["run_hash"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.parquet", "run.json"]  # no temp files left


def test_evaluation_schedule_is_log_spaced(compose_config, tmp_path):
    cfg = compose_config(["seeds=[0]", "budget.samples=10000", "budget.evals_per_decade=10"])
    run_job(cfg, tmp_path)
    samples = pd.read_parquet(tmp_path / "metrics.parquet").samples.to_numpy()
    positive = samples[samples > 0]
    per_decade = np.histogram(np.log10(positive), bins=[1, 2, 3, 4])[0]
    assert samples[0] == 0 and samples[-1] >= 10_000
    assert all(7 <= n <= 11 for n in per_decade), per_decade


@pytest.mark.parametrize("env", ["bandit", "mdp", "token"])
def test_same_config_gives_identical_metrics(env, tmp_path):
    """Two processes, same config and seeds: every column but wall_s is identical."""
    frames = []
    for name in ("a", "b"):
        out = tmp_path / name
        subprocess.run([RATEBENCH, "run", f"env={env}", "algorithm=reward_mle", "seeds=[0,1]",
                        "budget.samples=3000", f"hydra.run.dir={out}"], check=True, capture_output=True)
        frames.append(pd.read_parquet(out / "metrics.parquet").drop(columns="wall_s"))
    pd.testing.assert_frame_equal(frames[0], frames[1], check_exact=True)


def test_nan_in_one_seed_marks_it_diverged_and_others_continue(compose_config, tmp_path, monkeypatch):
    original = RewardMLE.step

    def step_with_nan(self, state, sampler):
        state = original(self, state, sampler)
        if state.t == 50:
            state.nu[0][1, 0] = float("nan")  # seed index 1 only
        return state

    monkeypatch.setattr(RewardMLE, "step", step_with_nan)
    cfg = compose_config(["seeds=[0,1,2]", "budget.samples=5000"])
    record = run_job(cfg, tmp_path)
    assert record["status"]["1"] == {"status": "diverged", "step": 50,
                                     "reason": "non-finite values (inf or NaN) in the parameters nu.0"}
    assert record["status"]["0"]["status"] == record["status"]["2"]["status"] == "completed"
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    assert frame.loc[frame.seed == 1, "step"].max() < 50
    assert frame.loc[frame.seed == 0, "samples"].max() >= 5000
    assert np.isfinite(frame[["gap", "policy_gap", "reward_err"]].to_numpy()).all()


def test_finite_parameters_whose_sum_overflows_are_not_diverged():
    """The non-finite check's shortcut (one sum per tensor) overflows on large finite values: they must still count
    as finite, and a NaN or an inf among them must still mark its seed (and only its seed)."""
    from types import SimpleNamespace

    from ratebench.runner import _mark_diverged

    class Algo:
        def tensors(self, state):
            return {"w": state.w, "b": state.b}

    big = torch.full((3, 4), 1.5e308, dtype=torch.float64)
    state, alive = SimpleNamespace(w=big.clone(), b=-big[:, :2].clone()), torch.ones(3, dtype=torch.bool)
    assert _mark_diverged(Algo(), state, alive) == {} and alive.all() and torch.equal(state.w, big)
    for bad in (float("inf"), float("nan")):
        state.w = big.clone()
        state.w[2, 1], alive = bad, torch.ones(3, dtype=torch.bool)
        assert list(_mark_diverged(Algo(), state, alive)) == [2]
        assert alive.tolist() == [True, True, False] and torch.equal(state.w[:2], big[:2]) and not state.w[2].any()


def test_exception_in_step_records_failure_then_raises(compose_config, tmp_path, monkeypatch):
    def broken(self, state, sampler):
        if state.t == 10:
            raise RuntimeError("boom")
        state.t += 1
        sampler.pairs(self.problem.ref_log_probs(), 1)
        return state

    monkeypatch.setattr(RewardMLE, "step", broken)
    cfg = compose_config(["seeds=[0,1]", "budget.samples=5000"])
    with pytest.raises(RuntimeError, match="boom"):
        run_job(cfg, tmp_path)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["status"]["0"] == {"status": "failed", "step": 10, "message": "RuntimeError: boom",
                                     "reason": "RuntimeError: boom"}
    assert len(pd.read_parquet(tmp_path / "metrics.parquet")) > 0


def test_reward_mle_fisher_step_is_computed_from_the_instance(compose_config):
    """c = lr_scale / mu: check mu against a Monte-Carlo-free direct Hessian of the exact BT
    population loss at the true parameters (autodiff), so the control's step is what it says."""
    from ratebench import envs
    from ratebench.algorithms.models import ModelConfig
    from ratebench.config import validate
    from ratebench.envs import exact

    v = validate(compose_config([]))
    problem = envs.make(v.env)
    algo = RewardMLE(v.algorithm, ModelConfig(), problem)
    feats = problem.unit_features
    # the teacher is linear up to a constant (it is centred); BT only sees differences
    with_intercept = torch.cat([feats, torch.ones(feats.shape[0], 1, dtype=feats.dtype)], 1)
    w_true = torch.linalg.lstsq(with_intercept, problem.true_unit_reward[:, None]).solution[:-1, 0]

    def population_bt_loss(w):
        rewards = problem.step_tables_from_units((feats @ w)[None])
        return exact.upper_loss(problem, rewards, problem.ref_log_probs())[0]

    hessian = torch.autograd.functional.hessian(population_bt_loss, w_true)
    eig = torch.linalg.eigvalsh(hessian)
    mu = float(eig[eig > 1e-9 * eig.max()].min())
    assert algo.c == pytest.approx(v.algorithm.lr_scale / mu, rel=1e-8)


def test_the_code_fingerprint_covers_the_compiled_steps_c_source(tmp_path, monkeypatch):
    """A finished job is reused only by the code that computed it: the fingerprint changes with a change to a .py or to
    the compiled step's .c (impl=fast's results come from it), and not with a file that computes nothing (a .md)."""
    import importlib.util

    from ratebench.core.records import sources_fingerprint

    (tmp_path / "step.py").write_text("x = 1\n")
    (tmp_path / "step.c").write_text("int f(void) { return 1; }\n")
    (tmp_path / "notes.md").write_text("notes\n")
    before = sources_fingerprint([tmp_path])
    (tmp_path / "notes.md").write_text("other notes\n")
    assert sources_fingerprint([tmp_path]) == before
    (tmp_path / "step.c").write_text("int f(void) { return 2; }\n")
    after_c = sources_fingerprint([tmp_path])
    assert after_c != before
    (tmp_path / "step.py").write_text("x = 2\n")
    assert sources_fingerprint([tmp_path]) != after_c
    # the package's fingerprint reads the shipped kernel's source: without the .c files it is another hash
    from ratebench.core import records

    algorithms = importlib.util.find_spec("ratebench.algorithms").submodule_search_locations[0]
    assert (Path(algorithms) / "bilevel_step.c").is_file()
    full = records.code_fingerprint()
    monkeypatch.setattr(records, "RESULT_SOURCES", ("*.py",))
    assert records.code_fingerprint() != full


def test_finished_run_is_reused_only_by_the_same_code(compose_config, tmp_path, monkeypatch):
    """Same config and code: the finished job is skipped (files untouched). A change in the code
    that computes results changes the job identity, so the job is recomputed, never reused stale."""
    from ratebench import runner

    cfg = compose_config(["seeds=[0]", "budget.samples=500"])
    first = run_job(cfg, tmp_path)
    stamp = (tmp_path / "metrics.parquet").stat().st_mtime_ns
    _, skipped = runner.run_or_skip(cfg, tmp_path)
    assert skipped and (tmp_path / "metrics.parquet").stat().st_mtime_ns == stamp
    monkeypatch.setattr(runner, "code_fingerprint", lambda: "a-different-code")
    record, skipped = runner.run_or_skip(cfg, tmp_path)
    assert not skipped and record["run_hash"] != first["run_hash"]
