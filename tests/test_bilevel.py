"""algorithm=bilevel: each of its three updates moves, in expectation, along the exact gradient it
claims (sign included), runs end to end on every environment, is deterministic, and a NaN in
any sequence ends only that seed."""
from __future__ import annotations

import json
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import at_step

from ratebench import envs
from ratebench.algorithms.bilevel import Bilevel, BilevelConfig
from ratebench.algorithms.models import ModelConfig, NetConfig
from ratebench.envs import bandit, exact, penalty
from ratebench.core.errors import ConfigError
from ratebench.runner import SEGMENT_DIVERGED, run_job
from ratebench.envs.sampling import Counters, CountingSampler

REPLICATES = 3000
FAMILY_ALPHA = 1e-3


def small_algorithm(**overrides) -> Bilevel:
    problem = envs.make(bandit.BanditConfig(n_contexts=3, n_actions=4, feature_dim=3))
    model = ModelConfig(reward=NetConfig(width=4, activation="tanh"), policy=NetConfig(width=4))
    return Bilevel(BilevelConfig(**overrides), model, problem)


def replicated_state(algo: Bilevel, lam: float):
    """One (nu, y, z), y != z and both off pi_ref, copied over REPLICATES sampler seeds."""
    state = algo.init([0])
    gen = torch.Generator().manual_seed(3)
    state.y[-2] = 0.6 * torch.randn(state.y[-2].shape, generator=gen, dtype=torch.float64)
    state.z[-2] = 0.6 * torch.randn(state.z[-2].shape, generator=gen, dtype=torch.float64)
    single = {k: [t.clone() for t in getattr(state, k)] for k in ("nu", "y", "z")}
    for key, params in single.items():
        setattr(state, key, [p.expand(REPLICATES, *p.shape[1:]).clone() for p in params])
    state.lam, state.alpha, state.alpha_z, state.xi = lam, 0.1, 0.1, 0.1
    return state, single


def flat(params) -> torch.Tensor:
    return torch.cat([p.reshape(p.shape[0], -1) for p in params], 1)


def assert_mean_matches(estimates: torch.Tensor, expected: torch.Tensor) -> None:
    """z-test per coordinate, Bonferroni over the coordinates the update moves."""
    moving = estimates.std(0) > 1e-12
    assert torch.allclose(estimates[:, ~moving].mean(0), expected[~moving], atol=1e-10)
    z = (estimates[:, moving].mean(0) - expected[moving]) / (estimates[:, moving].std(0) / REPLICATES**0.5)
    crit = NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * int(moving.sum())))
    assert z.abs().max() < crit, f"max |z| = {float(z.abs().max()):.2f} >= {crit:.2f}"


def exact_grad(function, params) -> torch.Tensor:
    leaves = [p.clone().requires_grad_(True) for p in params]
    return flat(torch.autograd.grad(function(leaves).sum(), leaves))[0]


def test_nu_step_descends_the_exact_penalty_hypergradient():
    """E[nu_new - nu] = -xi [grad_nu f(nu, y) + lam (grad_nu g(nu, y) - grad_nu g(nu, z))] with y, z the
    networks' current policies (g = -J): the docs/bilevel.md formula, whose sign test_penalty checks
    against finite differences of the exact psi_lam."""
    algo, lam = small_algorithm(batch_traj=4, batch_pairs=4), 5.0
    state, single = replicated_state(algo, lam)
    sampler = CountingSampler(algo.problem, list(range(REPLICATES)), Counters())
    before = flat(state.nu)
    algo._nu_step(state, sampler, 4, 4)
    steps = (before - flat(state.nu)) / state.xi
    y, z = algo.policy.log_probs(single["y"]), algo.policy.log_probs(single["z"])
    expected = exact_grad(lambda nu: penalty.hypergradient_surrogate(
        algo.problem, algo.reward.step_tables(nu), y, z, lam), single["nu"])
    assert_mean_matches(steps, expected)


def test_y_step_descends_upper_loss_over_lam_minus_value():
    algo, lam = small_algorithm(batch_traj=4, batch_pairs=4), 5.0
    state, single = replicated_state(algo, lam)
    sampler = CountingSampler(algo.problem, list(range(REPLICATES)), Counters())
    rewards = [r.detach() for r in algo.reward.step_tables(single["nu"])]
    before = flat(state.y)
    algo._y_step(state, sampler, rewards, 4, 4)
    steps = (before - flat(state.y)) / state.alpha

    def h_over_lam(theta):  # (f + lam g) / lam = f / lam - J
        logps = algo.policy.log_probs(theta)
        return exact.upper_loss(algo.problem, rewards, logps) / lam - exact.policy_value(algo.problem, rewards, logps)

    assert_mean_matches(steps, exact_grad(h_over_lam, single["y"]))


def test_z_step_ascends_the_regularised_value():
    algo = small_algorithm(batch_traj=4)
    state, single = replicated_state(algo, 5.0)
    sampler = CountingSampler(algo.problem, list(range(REPLICATES)), Counters())
    rewards = [r.detach() for r in algo.reward.step_tables(single["nu"])]
    before = flat(state.z)
    algo._z_step(state, sampler, rewards, 4)
    steps = (flat(state.z) - before) / state.alpha_z
    value = lambda theta: exact.policy_value(algo.problem, rewards, algo.policy.log_probs(theta))
    assert_mean_matches(steps, exact_grad(value, single["z"]))


def test_one_step_draws_the_documented_number_of_samples():
    """single_loop: z: N; y: N + 2M; nu: 2M + 2N -> 4N + 4M samples and 2M queries per step."""
    algo = small_algorithm(batch_traj=5, batch_pairs=3)
    counters = Counters()
    algo.step(algo.init([0, 1]), CountingSampler(algo.problem, [0, 1], counters))
    assert (counters.samples, counters.queries) == (4 * 5 + 4 * 3, 2 * 3)
    algo = small_algorithm(variant="double_loop", eps=0.05)
    lam, inner, batch = algo.cfg.double_loop_sizes()
    counters = Counters()
    state = algo.step(algo.init([0]), CountingSampler(algo.problem, [0], counters))
    assert counters.samples == inner * 4 * batch + 4 * batch and state.lam == lam  # per inner step: z N, y N + 2M


def test_schedules_follow_their_formulas():
    algo = small_algorithm(lam0=2.0, k0=10.0, lam_exponent=0.2, c_alpha=0.5, alpha_exponent=0.6,
                           c_alpha_z=0.7, alpha_z_exponent=0.5, c_xi=0.3, xi_exponent=0.8)
    state = algo.init([0])
    sampler = CountingSampler(algo.problem, [0], Counters())
    for k in range(3):
        state = algo.step(state, sampler)
        assert state.lam == pytest.approx(2.0 * (1 + k / 10) ** 0.2)
        assert state.alpha == pytest.approx(0.5 / (k + 10) ** 0.6)
        assert state.alpha_z == pytest.approx(0.7 / (k + 10) ** 0.5)
        assert state.xi == pytest.approx(0.3 / (k + 10) ** 0.8)


@pytest.mark.parametrize("field, value, allowed", [
    ("variant", "triple_loop", "single_loop"), ("batch_traj", 1, ">= 2"), ("c_xi", 0.0, "> 0"),
    ("alpha_z_exponent", 0.9, "z at least as fast"), ("eps", 2.0, "(0, 1)"), ("inner_steps", 0, ">= 1")])
def test_bad_knob_is_refused_naming_the_field(field, value, allowed):
    with pytest.raises(ConfigError) as info:
        BilevelConfig(**{field: value}).check()
    assert f"algorithm.{field}" in str(info.value) and allowed in str(info.value)


@pytest.mark.parametrize("env", ["bandit", "mdp", "token"])
def test_runs_on_every_environment_with_exact_diagnostics(compose_config, tmp_path, env):
    cfg = compose_config([f"env={env}", "algorithm=bilevel", "seeds=[0,1]", "budget.samples=1500",
                          "budget.evals_per_decade=1"])
    record = run_job(cfg, tmp_path)
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    assert all(s["status"] == "completed" for s in record["status"].values())
    later = frame[frame.step > 0]
    for column in ["gap", "grad_sq", "psi_gap", "policy_gap", "lam", "alpha", "xi"]:
        assert np.isfinite(later[column]).all(), column
    assert (later.psi_gap >= -1e-6).all() and (later.gap >= -1e-9).all()
    assert np.isnan(frame.loc[frame.step == 0, "psi_gap"]).all()  # no lam before the first step


def test_same_seed_gives_identical_metrics_and_seeds_are_batch_independent(compose_config, tmp_path):
    frames = []
    for name, seeds in (("a", "[0,1]"), ("b", "[0,1]"), ("c", "[1]")):
        cfg = compose_config(["algorithm=bilevel", f"seeds={seeds}", "budget.samples=2000", "budget.evals_per_decade=2"])
        run_job(cfg, tmp_path / name)
        frames.append(pd.read_parquet(tmp_path / name / "metrics.parquet").drop(columns="wall_s"))
    pd.testing.assert_frame_equal(frames[0], frames[1], check_exact=True)
    alone = frames[2].reset_index(drop=True)
    in_batch = frames[0][frames[0].seed == 1].reset_index(drop=True)
    # the same draws and updates; batched matmuls may differ from unbatched ones in the last bits,
    # and psi_gap's inner L-BFGS runs on the seed-summed objective (stopping depends on the batch)
    pd.testing.assert_frame_equal(alone.drop(columns="psi_gap"), in_batch.drop(columns="psi_gap"),
                                  check_exact=False, rtol=1e-9, atol=1e-12)
    assert np.allclose(alone.psi_gap, in_batch.psi_gap, rtol=1e-5, atol=1e-8, equal_nan=True)


@pytest.mark.parametrize("sequence", ["nu", "y", "z"])
def test_nan_in_any_sequence_ends_only_that_seed(compose_config, tmp_path, monkeypatch, sequence):
    def nan_before_step_20(state):  # the step makes the seed non-finite, and the harness marks step 20
        getattr(state, sequence)[0][1].view(-1)[0] = float("nan")  # seed index 1 only

    monkeypatch.setattr(Bilevel, "run_segment", at_step(Bilevel, 19, nan_before_step_20))  # the harness steps in segments
    cfg = compose_config(["algorithm=bilevel", "seeds=[0,1,2]", "budget.samples=3000", "budget.evals_per_decade=2"])
    record = run_job(cfg, tmp_path)
    assert record["status"]["1"] == {"status": "diverged", "step": 20,
                                     "reason": SEGMENT_DIVERGED}  # the harness steps bilevel in segments
    assert record["status"]["0"]["status"] == record["status"]["2"]["status"] == "completed"
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    assert frame.loc[frame.seed == 1, "step"].max() < 20
    assert frame.loc[frame.seed == 0, "samples"].max() >= 3000
    assert np.isfinite(frame[["gap", "grad_sq", "psi_gap", "policy_gap"]].to_numpy()[frame.step > 0]).all()
    assert json.loads((tmp_path / "run.json").read_text())["status"]["1"]["status"] == "diverged"
