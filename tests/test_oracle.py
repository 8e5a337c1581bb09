"""algorithm.oracle=exact and budget.steps: each exact oracle gradient equals the mean of its stochastic
estimator (z-test per coordinate, Bonferroni, family-wise false-alarm rate 1e-3 per test), an exact step
draws no samples or queries, the default oracle reproduces the pre-oracle update bit for bit, and a
step-budgeted run stops at budget.steps and is evaluated on a log grid of steps."""
from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
import torch

from ratebench import envs
from ratebench.algorithms.bilevel import Bilevel, BilevelConfig
from ratebench.algorithms.estimators import (policy_gradient_surrogate, preference_loss,
                                             preference_score_surrogate, reward_return_surrogate)
from ratebench.algorithms.models import ModelConfig, NetConfig, sgd_step
from ratebench.algorithms.oracles import ExactOracle, StochasticOracle
from ratebench.envs import bandit, mdp
from ratebench.core.errors import ConfigError
from ratebench.runner import run_job
from ratebench.envs.sampling import Counters, CountingSampler

SMALL = {
    "bandit": bandit.BanditConfig(n_contexts=3, n_actions=4, feature_dim=3),
    "mdp": mdp.MDPConfig(n_states=3, n_actions=2, horizon=3),
}
REPLICATES = 4000  # independent stochastic estimates at the same (nu, theta), one per sampler seed
PER_ESTIMATE = 4  # trajectories / pairs inside one estimate
FAMILY_ALPHA = 1e-3  # false-alarm rate of one test over all its coordinates (Bonferroni)


def make(name: str, **cfg) -> Bilevel:
    model = ModelConfig(reward=NetConfig(width=4, activation="tanh"), policy=NetConfig(width=4))
    return Bilevel(BilevelConfig(**cfg), model, envs.make(SMALL[name]))


def fixed_point(algo: Bilevel):
    """(nu, theta) of one seed, theta moved off pi_ref so that no gradient vanishes by symmetry."""
    nu, theta = algo.reward.init([0]), algo.policy.init([0])
    gen = torch.Generator().manual_seed(5)
    theta[-2] = 0.7 * torch.randn(theta[-2].shape, generator=gen, dtype=torch.float64)
    return nu, theta


def replicate(params, n):
    return [p.expand(n, *p.shape[1:]).clone().requires_grad_(True) for p in params]


def flat(grads):
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], 1)


def assert_mean_equals(estimates: torch.Tensor, exact: torch.Tensor) -> None:
    """estimates (R, d) iid, exact (d,): |mean - exact| / se < the two-sided Bonferroni quantile."""
    moving = estimates.std(0) > 1e-12  # coordinates no estimate moves (dead units) must be exactly 0 too
    assert torch.allclose(estimates[:, ~moving].mean(0), exact[~moving], atol=1e-10)
    z = (estimates[:, moving].mean(0) - exact[moving]) / (estimates[:, moving].std(0) / REPLICATES**0.5)
    crit = NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * int(moving.sum())))
    assert z.abs().max() < crit, f"max |z| = {float(z.abs().max()):.2f} >= {crit:.2f}"


def theta_gradients(algo, oracle, method, params, rewards, n, sampler):
    """d/dtheta of oracle.<method>(rewards, pi_theta) per replicate: (R, d_theta)."""
    logps = algo.policy.log_probs(params)
    surrogate = getattr(oracle, method)(sampler, rewards, logps, n)
    return flat(torch.autograd.grad(surrogate.sum(), params))


def nu_gradients(algo, oracle, method, nu, logps, n, sampler):
    """d/dnu of the reward function oracle.<method>(pi_theta) returns: (R, d_nu)."""
    of_rewards = getattr(oracle, method)(sampler, logps, n)
    return flat(torch.autograd.grad(of_rewards(algo.reward.step_tables(nu)).sum(), nu))


@pytest.fixture(params=sorted(SMALL), scope="module")
def setup(request):
    algo = make(request.param)
    return algo, StochasticOracle(algo.problem), ExactOracle(algo.problem), fixed_point(algo)


@pytest.mark.parametrize("method", ["value_theta", "upper_theta"])
def test_exact_theta_gradients_are_the_means_of_the_estimators(setup, method):
    """g^_theta J (REINFORCE) and g^_theta f (score function) against the exact oracle."""
    algo, stochastic, exact_oracle, (nu, theta) = setup
    rewards = [r.detach() for r in algo.reward.step_tables(nu)]
    sampler = CountingSampler(algo.problem, list(range(REPLICATES)), Counters())
    estimates = theta_gradients(algo, stochastic, method, replicate(theta, REPLICATES), rewards, PER_ESTIMATE,
                                sampler)
    counters = Counters()
    exact = theta_gradients(algo, exact_oracle, method, replicate(theta, 1), rewards, PER_ESTIMATE,
                            CountingSampler(algo.problem, [0], counters))[0]
    assert_mean_equals(estimates, exact)
    assert (counters.samples, counters.queries) == (0, 0)


@pytest.mark.parametrize("method", ["value_nu", "upper_nu"])
def test_exact_nu_gradients_are_the_means_of_the_estimators(setup, method):
    """g^_nu J (mean grad R_nu) and g^_nu f (BT loss of labelled pairs) against the exact oracle."""
    algo, stochastic, exact_oracle, (nu, theta) = setup
    with torch.no_grad():
        logps = algo.policy.log_probs(theta)
    sampler = CountingSampler(algo.problem, list(range(REPLICATES)), Counters())
    estimates = nu_gradients(algo, stochastic, method, replicate(nu, REPLICATES), logps, PER_ESTIMATE, sampler)
    counters = Counters()
    exact = nu_gradients(algo, exact_oracle, method, replicate(nu, 1), logps, PER_ESTIMATE,
                         CountingSampler(algo.problem, [0], counters))[0]
    assert_mean_equals(estimates, exact)
    assert (counters.samples, counters.queries) == (0, 0)


def test_z_test_catches_an_exact_oracle_off_by_a_tenth(setup):
    """The same test rejects a 10 % error in the exact value (the test can fail)."""
    algo, stochastic, exact_oracle, (nu, theta) = setup
    rewards = [r.detach() for r in algo.reward.step_tables(nu)]
    sampler = CountingSampler(algo.problem, list(range(REPLICATES)), Counters())
    estimates = theta_gradients(algo, stochastic, "value_theta", replicate(theta, REPLICATES), rewards,
                                PER_ESTIMATE, sampler)
    exact = theta_gradients(algo, exact_oracle, "value_theta", replicate(theta, 1), rewards, PER_ESTIMATE,
                            CountingSampler(algo.problem, [0], Counters()))[0]
    with pytest.raises(AssertionError, match="max \\|z\\|"):
        assert_mean_equals(estimates, 1.1 * exact)


@pytest.mark.parametrize("variant", ["single_loop", "double_loop"])
@pytest.mark.parametrize("env", sorted(SMALL))
def test_an_exact_step_draws_no_samples_and_moves_every_sequence(variant, env):
    algo = make(env, variant=variant, oracle="exact", eps=0.05)
    counters = Counters()
    state = algo.init([0, 1])
    before = {k: flat(getattr(state, k)).clone() for k in ("nu", "y", "z")}
    state = algo.step(state, CountingSampler(algo.problem, [0, 1], counters))
    assert (counters.samples, counters.queries) == (0, 0)
    for key, old in before.items():
        assert (flat(getattr(state, key)) != old).any(), key


def pre_oracle_step(algo: Bilevel, state, sampler):
    """The single-loop step as written before the oracle existed (commit a17ea07), kept as the reference."""
    cfg, ref, beta = algo.cfg, algo.problem.ref_log_probs(), algo.problem.beta
    k, k0 = state.k, cfg.k0
    lam = cfg.lam0 * (1 + k / k0) ** cfg.lam_exponent
    alpha, alpha_z = cfg.c_alpha / (k + k0) ** cfg.alpha_exponent, cfg.c_alpha_z / (k + k0) ** cfg.alpha_z_exponent
    xi = cfg.c_xi / (k + k0) ** cfg.xi_exponent
    rewards = [r.detach() for r in algo.reward.step_tables(state.nu)]

    def ascent(z):
        logp_z = algo.policy.log_probs(z)
        traj = sampler.trajectories(logp_z, cfg.batch_traj)
        return policy_gradient_surrogate(traj, rewards, logp_z, ref, beta)

    def descent(y):
        logp_y = algo.policy.log_probs(y)
        pairs = sampler.pairs(logp_y, cfg.batch_pairs)
        traj = sampler.trajectories(logp_y, cfg.batch_traj)
        return (preference_score_surrogate(pairs, rewards, logp_y) / lam
                - policy_gradient_surrogate(traj, rewards, logp_y, ref, beta))

    z = sgd_step(state.z, ascent, -alpha_z)
    y = sgd_step(state.y, descent, alpha)
    with torch.no_grad():
        logp_y, logp_z = algo.policy.log_probs(y), algo.policy.log_probs(z)
    pairs = sampler.pairs(logp_y, cfg.batch_pairs)
    traj_z = sampler.trajectories(logp_z, cfg.batch_traj)
    traj_y = sampler.trajectories(logp_y, cfg.batch_traj)

    def hypergradient(nu):
        r = algo.reward.step_tables(nu)
        return preference_loss(pairs, r) + lam * (reward_return_surrogate(traj_z, r) - reward_return_surrogate(traj_y, r))

    return sgd_step(state.nu, hypergradient, xi), y, z


@pytest.mark.parametrize("env", sorted(SMALL))
def test_default_oracle_is_the_pre_oracle_update_bit_for_bit(env):
    algo = make(env, batch_traj=3, batch_pairs=2)
    algo.impl = "reference"  # bit for bit is the reference path's promise (impl=fast: tests/test_fast.py)
    assert algo.cfg.oracle == "stochastic"
    state, ref_state = algo.init([0, 1, 2]), algo.init([0, 1, 2])
    sampler = CountingSampler(algo.problem, [0, 1, 2], Counters())
    ref_sampler = CountingSampler(algo.problem, [0, 1, 2], Counters())
    for _ in range(5):
        nu, y, z = pre_oracle_step(algo, ref_state, ref_sampler)
        ref_state.nu, ref_state.y, ref_state.z, ref_state.k = nu, y, z, ref_state.k + 1
        state = algo.step(state, sampler)
        for key in ("nu", "y", "z"):
            assert all(torch.equal(a, b) for a, b in zip(getattr(state, key), getattr(ref_state, key))), key
    assert sampler.state_dict() == ref_sampler.state_dict()


def test_bad_oracle_is_refused_naming_the_field():
    with pytest.raises(ConfigError) as info:
        BilevelConfig(oracle="analytic").check()
    assert "algorithm.oracle" in str(info.value) and "stochastic" in str(info.value) and "exact" in str(info.value)


def test_exact_oracle_without_a_step_budget_exits_2_naming_both_keys(expect_bad_input):
    expect_bad_input(["algorithm=bilevel", "algorithm.oracle=exact"], ["budget.steps", "algorithm.oracle=exact"])
    expect_bad_input(["algorithm=bilevel", "algorithm.oracle=exact", "budget.steps=0"], ["budget.steps", ">= 1"])


def log_steps(budget: int, per_decade: int) -> list[int]:
    """0, then ceil(10^(k/per_decade)) below the budget, then the budget: written out independently."""
    points = {0} | {int(np.ceil(10 ** (k / per_decade) - 1e-9)) for k in range(100)}
    return sorted(p for p in points if p < budget) + [budget]


def test_exact_run_stops_at_budget_steps_on_a_log_grid_of_steps(compose_config, tmp_path):
    cfg = compose_config(["algorithm=bilevel", "algorithm.oracle=exact", "budget.steps=60",
                          "budget.evals_per_decade=3", "seeds=[0,1]"])
    record = run_job(cfg, tmp_path)
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    assert record["counters"] == {"samples": 0, "queries": 0, "step": 60}
    assert sorted(frame.step.unique()) == log_steps(60, 3)  # 0 1 3 5 10 22 47 60
    assert (frame.samples == 0).all() and (frame.queries == 0).all()
    later = frame[frame.step > 0]
    assert np.isfinite(later[["gap", "psi_gap", "grad_sq"]].to_numpy()).all()


def test_step_budget_also_stops_a_stochastic_run(compose_config, tmp_path):
    cfg = compose_config(["algorithm=bilevel", "budget.steps=25", "budget.samples=10000000",
                          "budget.evals_per_decade=2", "seeds=[0]", "algorithm.batch_traj=4", "algorithm.batch_pairs=2"])
    record = run_job(cfg, tmp_path)
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    assert record["counters"]["step"] == 25 and record["counters"]["samples"] == 25 * (4 * 4 + 4 * 2)
    assert sorted(frame.step.unique()) == log_steps(25, 2)  # 0 1 4 10 25
    cfg = compose_config(["algorithm=bilevel", "budget.steps=25", "budget.samples=240", "seeds=[0]",
                          "algorithm.batch_traj=4", "algorithm.batch_pairs=2"])
    assert run_job(cfg, tmp_path / "samples_first")["counters"]["step"] == 10  # whichever budget comes first
