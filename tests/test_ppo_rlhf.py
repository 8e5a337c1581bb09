"""PPO-RLHF: PPO on the exact reward cuts policy_gap 10x; the clipped surrogate, GAE and per-seed
normalisation against direct implementations; the reported KL is the exact KL; counters and seeds."""
from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest
import torch

from ratebench import envs
from ratebench.algorithms.models import ModelConfig
from ratebench.algorithms.policy_opt import clipped_surrogate, gae, next_grid_point, normalise_per_seed
from ratebench.algorithms.ppo_rlhf import PPORLHF, PPORLHFConfig
from ratebench.envs.mdp import MDPConfig
from ratebench.evaluation import Evaluator
from ratebench.runner import run_job
from ratebench.envs.sampling import Counters, CountingSampler

D = torch.float64


def _median_gap(frame: pd.DataFrame, samples: int) -> float:
    return float(frame.loc[frame.samples == samples, "policy_gap"].median())


@pytest.mark.parametrize("env, seeds, budget", [("bandit", 8, 10_000), ("mdp", 4, 5_000)])
def test_ppo_on_the_exact_reward_cuts_policy_gap_10x(env, seeds, budget, compose_config, tmp_path):
    cfg = compose_config([f"env={env}", "algorithm=ppo_rlhf", "algorithm.reward_oracle=true", f"n_seeds={seeds}",
                          f"budget.samples={budget}"])
    run_job(cfg, tmp_path)
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    start, end = _median_gap(frame, 0), _median_gap(frame, frame.samples.max())
    assert start / end >= 10, f"median policy_gap {start:.3g} -> {end:.3g}"


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_ppo_rlhf_with_a_learned_reward_model_improves(mode, compose_config, tmp_path):
    cfg = compose_config(["env=bandit", "algorithm=ppo_rlhf", f"algorithm.mode={mode}", "n_seeds=8",
                          "budget.samples=10000"])
    run_job(cfg, tmp_path)
    frame = pd.read_parquet(tmp_path / "metrics.parquet")
    start, end = _median_gap(frame, 0), _median_gap(frame, frame.samples.max())
    assert start / end >= 4, f"median policy_gap {start:.3g} -> {end:.3g}"
    assert frame.samples.max() >= 10_000 and frame.queries.max() > 0


def test_clipped_surrogate_matches_the_formula_on_a_fixed_batch():
    """min(rho A, clip(rho, 1-eps, 1+eps) A), averaged per seed, written out element by element."""
    gen = torch.Generator().manual_seed(0)
    logp_old = torch.randn(2, 5, 3, generator=gen, dtype=D)
    logp_new = logp_old + 0.5 * torch.randn(2, 5, 3, generator=gen, dtype=D)  # ratios on both sides of the clip
    adv = torch.randn(2, 5, 3, generator=gen, dtype=D)
    eps = 0.2
    got = clipped_surrogate(logp_new, logp_old, adv, eps)
    for b in range(2):
        total = 0.0
        for n, h in itertools.product(range(5), range(3)):
            rho = float(torch.exp(logp_new[b, n, h] - logp_old[b, n, h]))
            a = float(adv[b, n, h])
            total += min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
        assert float(got[b]) == pytest.approx(total / 15, abs=1e-14)


def test_clipped_surrogate_gradient_vanishes_where_clipped():
    logp_old = torch.zeros(1, 4, 1, dtype=D)
    logp_new = torch.log(torch.tensor([1.5, 1.5, 0.5, 0.5], dtype=D)).reshape(1, 4, 1).requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D).reshape(1, 4, 1)
    (grad,) = torch.autograd.grad(clipped_surrogate(logp_new, logp_old, adv, 0.2).sum(), logp_new)
    # rho=1.5, A>0: clipped (0); rho=1.5, A<0: unclipped (rho A / 4); rho=0.5, A>0: unclipped; A<0: clipped
    assert torch.allclose(grad.flatten(), torch.tensor([0.0, -1.5 / 4, 0.5 / 4, 0.0], dtype=D), atol=1e-15)


def test_gae_matches_the_direct_sum():
    gen = torch.Generator().manual_seed(1)
    r, v = torch.randn(3, 4, 5, generator=gen, dtype=D), torch.randn(3, 4, 5, generator=gen, dtype=D)
    gamma, lam = 0.9, 0.8
    got = gae(r, v, gamma, lam)
    v_next = torch.cat([v[..., 1:], torch.zeros_like(v[..., :1])], -1)
    delta = r + gamma * v_next - v
    for h in range(5):
        direct = sum((gamma * lam) ** k * delta[..., h + k] for k in range(5 - h))
        assert torch.allclose(got[..., h], direct, atol=1e-13, rtol=0)
    # lam = 1, gamma = 1: A_h = reward-to-go - V_h (Monte Carlo advantage)
    to_go = r.flip(-1).cumsum(-1).flip(-1)
    assert torch.allclose(gae(r, v, 1.0, 1.0), to_go - v, atol=1e-13, rtol=0)


def test_advantage_normalisation_is_per_seed():
    gen = torch.Generator().manual_seed(2)
    adv = torch.randn(3, 6, 2, generator=gen, dtype=D) * torch.tensor([1.0, 10.0, 0.1], dtype=D)[:, None, None]
    out = normalise_per_seed(adv)
    for b in range(3):
        alone = normalise_per_seed(adv[b:b + 1])
        assert torch.allclose(out[b:b + 1], alone, atol=1e-15, rtol=0)
        assert float(out[b].mean()) == pytest.approx(0, abs=1e-12)
        assert float(out[b].std()) == pytest.approx(1, abs=1e-6)


def _mdp():
    return envs.make(MDPConfig(n_states=3, n_actions=2, horizon=3))


def _run(problem, cfg, seeds, steps):
    algo = PPORLHF(cfg, ModelConfig(), problem)
    sampler = CountingSampler(problem, seeds, Counters())
    state = algo.init(seeds)
    for _ in range(steps):
        state = algo.step(state, sampler)
    return algo, state, sampler


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_a_seed_in_a_batch_equals_the_seed_alone(mode):
    problem = _mdp()
    steps = 6 if mode == "online" else 3
    _, batch, _ = _run(problem, PPORLHFConfig(mode=mode, min_steps=50), [0, 1, 2], steps)
    _, alone, _ = _run(problem, PPORLHFConfig(mode=mode, min_steps=50), [1], steps)
    for name in ("theta", "nu", "critic"):
        for t_batch, t_alone in zip(getattr(batch, name), getattr(alone, name)):
            assert torch.allclose(t_batch[1:2], t_alone, atol=1e-10, rtol=0), name


def test_reported_kl_is_the_exact_kl_of_the_policy():
    """kl_ref in the records = sum over enumerated trajectories of P(tau) sum_h log pi/pi_ref, the same
    quantity whose per-trajectory value PPO folds into the reward."""
    problem = _mdp()
    algo, state, _ = _run(problem, PPORLHFConfig(mode="online"), [0, 1], 15)
    reported = Evaluator(problem, 0.0, algo)(state)["kl_ref"]
    table = problem.trajectory_table()
    logps = [lp.detach() for lp in algo.policy_log_probs(state)]
    ref = problem.ref_log_probs()
    direct = torch.zeros(2, dtype=D)
    for b in range(2):
        for g, i in itertools.product(range(table.states.shape[0]), range(table.states.shape[1])):
            s, a = table.states[g, i], table.actions[g, i]
            log_ratio = sum(float(logps[h][b, s[h], a[h]] - ref[h][0, s[h], a[h]]) for h in range(problem.horizon))
            log_p = sum(float(logps[h][b, s[h], a[h]]) for h in range(problem.horizon)) + float(table.log_trans[g, i])
            direct[b] += float(problem.init_prob[g]) * math.exp(log_p) * log_ratio
    assert reported.min() > 1e-3  # the policy has moved, so the check is not 0 = 0
    assert torch.allclose(reported, direct, atol=1e-12, rtol=1e-10)


def test_offline_steps_land_on_the_sample_grid_and_count_every_pair():
    problem = envs.make(envs.bandit.BanditConfig())
    cfg = PPORLHFConfig(mode="offline")
    algo = PPORLHF(cfg, ModelConfig(), problem)
    sampler = CountingSampler(problem, [0], Counters())
    state = algo.init([0])
    previous = 0
    for _ in range(12):
        state = algo.step(state, sampler)
        expected = next_grid_point(previous, cfg.prefixes_per_decade, 2 * int(-(-cfg.first_pairs // cfg.pair_fraction)))
        assert sampler.samples == expected
        assert sampler.queries == state.data.size  # one label per dataset pair, pairs from pi_ref only
        assert 2 * state.data.size <= max(2 * cfg.first_pairs, cfg.pair_fraction * sampler.samples)
        previous = sampler.samples
