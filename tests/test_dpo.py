"""DPO: the three losses and their gradients against closed forms, the exact population minimiser
against pi* of the true reward, and offline DPO against the exact minimiser of its finite dataset."""
from __future__ import annotations

import math

import pytest
import torch

from ratebench import envs
from ratebench.algorithms.dpo import DPO, DPOConfig, dpo_loss
from ratebench.algorithms.models import ModelConfig
from ratebench.envs.bandit import BanditConfig
from ratebench.envs.exact import policy_value, soft_optimal, trajectory_probs, trajectory_returns
from ratebench.envs.sampling import Counters, CountingSampler

from independent_solvers import torch_lbfgs

D = torch.float64


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# (logratio_first, logratio_second, label, beta, loss, expected loss, expected d loss / d logratio_first)
# by hand: margin m = first - second = 0.8 (or 3.0), h = +-m for label 1/0
CLOSED_FORMS = [
    (0.3, -0.5, 1.0, 0.5, "sigmoid", math.log1p(math.exp(-0.4)), -0.5 * _sigmoid(-0.4)),
    (0.3, -0.5, 0.0, 0.5, "sigmoid", math.log1p(math.exp(0.4)), 0.5 * _sigmoid(0.4)),
    (0.3, -0.5, 1.0, 0.5, "ipo", (0.8 - 1.0) ** 2, 2 * (0.8 - 1.0)),
    (0.3, -0.5, 0.0, 0.5, "ipo", (-0.8 - 1.0) ** 2, -2 * (-0.8 - 1.0)),
    (0.3, -0.5, 1.0, 0.5, "hinge", 1 - 0.4, -0.5),
    (0.3, -0.5, 0.0, 0.5, "hinge", 1 + 0.4, 0.5),
    (2.0, -1.0, 1.0, 0.5, "hinge", 0.0, 0.0),  # beyond the margin: 1 - 1.5 < 0
    (0.3, -0.5, 1.0, 2.0, "ipo", (0.8 - 0.25) ** 2, 2 * (0.8 - 0.25)),
]


@pytest.mark.parametrize("first, second, label, beta, loss, value, grad", CLOSED_FORMS,
                         ids=[f"{c[4]}-y{int(c[2])}-b{c[3]}-m{c[0] - c[1]:.1f}" for c in CLOSED_FORMS])
def test_loss_and_gradient_match_closed_forms(first, second, label, beta, loss, value, grad):
    lr_first = torch.tensor([[first]], dtype=D, requires_grad=True)
    lr_second = torch.tensor([[second]], dtype=D, requires_grad=True)
    out = dpo_loss(lr_first, lr_second, torch.tensor([[label]], dtype=D), beta, loss)
    g_first, g_second = torch.autograd.grad(out.sum(), [lr_first, lr_second])
    assert float(out.detach()) == pytest.approx(value, abs=1e-14)
    assert float(g_first) == pytest.approx(grad, abs=1e-14)
    assert float(g_second) == pytest.approx(-grad, abs=1e-14)  # the loss depends on the difference only


def test_gradient_in_tabular_logits_is_closed_form():
    """One context, logits z: h_w - h_l = z_w - z_l (normaliser and pi_ref cancel), so
    d/dz [-log sigma(beta (z_w - z_l))] = -beta sigma(-beta (z_w - z_l)) (e_w - e_l)."""
    ref = torch.log_softmax(torch.tensor([0.2, -0.4, 1.0], dtype=D), 0)
    z = torch.tensor([0.5, -0.3, 0.1], dtype=D, requires_grad=True)
    logp = torch.log_softmax(ref + z, 0)
    beta, w, l_ = 0.7, 0, 2
    out = dpo_loss((logp[w] - ref[w]).reshape(1, 1), (logp[l_] - ref[l_]).reshape(1, 1), torch.ones(1, 1, dtype=D),
                   beta, "sigmoid")
    (grad,) = torch.autograd.grad(out.sum(), z)
    s = -beta * _sigmoid(-beta * (0.5 - 0.1))
    assert torch.allclose(grad, torch.tensor([s, 0.0, -s], dtype=D), atol=1e-14, rtol=0)


def _tabular_minimiser(objective, shape, max_iter=500) -> torch.Tensor:
    """argmin over tabular logits z of objective(log_softmax tables), with the independent solver."""
    return torch_lbfgs(lambda zs: objective(zs[0]), [torch.zeros(shape, dtype=D)], rounds=4, max_iter=max_iter,
                       tol=1e-13)[0]


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_population_minimiser_is_pi_star(beta):
    """Realisable linear reward, pairs from pi_ref, exact BT label probabilities (infinite data):
    the minimiser of the exact population sigmoid-DPO loss, by enumeration, is pi* of the true reward."""
    problem = envs.make(BanditConfig(beta=beta, n_contexts=5, n_actions=4))
    ref = problem.ref_log_probs()
    true = trajectory_returns(problem, problem.true_step_tables())[0]  # (G, m)
    p = torch.sigmoid(true[:, :, None] - true[:, None, :])  # (G, m, m): P(first preferred)
    q = trajectory_probs(problem, ref)[0]  # (G, m)
    weight = problem.init_prob[:, None, None] * q[:, :, None] * q[:, None, :]

    def population_loss(z):
        logps = [torch.log_softmax(ref[0][0] + z, -1)[None]]
        ratio = trajectory_returns(problem, [lp - r for lp, r in zip(logps, ref)])[0]  # log pi/pi_ref per tau
        first, second = ratio[:, :, None].expand_as(p), ratio[:, None, :].expand_as(p)
        return (weight * dpo_loss(first, second, p, beta, "sigmoid")).sum()

    z = _tabular_minimiser(population_loss, ref[0][0].shape)
    pi = torch.softmax(ref[0][0] + z, -1)
    pi_star = soft_optimal(problem, problem.true_step_tables())[0][0][0].exp()
    assert (pi - pi_star).abs().max() < 1e-6


def test_offline_dpo_converges_to_the_exact_minimiser_of_its_dataset():
    """Offline DPO trained on a fixed pi_ref dataset: its policy_gap approaches that of the exact
    (tabular, L-BFGS) minimiser of the empirical DPO loss on the very same pairs, per seed."""
    problem = envs.make(BanditConfig(n_contexts=4, n_actions=4))
    seeds = [0, 1, 2]
    algo = DPO(DPOConfig(mode="offline", epochs=20), ModelConfig(), problem)
    sampler = CountingSampler(problem, seeds, Counters())
    state = algo.init(seeds)
    gaps = []
    true_rewards = problem.true_step_tables()
    j_star = float(soft_optimal(problem, true_rewards)[1] @ problem.init_prob)
    while sampler.samples < 2000:
        state = algo.step(state, sampler)
        gaps.append(j_star - policy_value(problem, true_rewards, algo.policy_log_probs(state)).detach())
    assert sampler.samples == 2 * state.data.size == sampler.queries * 2  # every pair counted
    pairs, ref = state.data.pairs, problem.ref_log_probs()

    def empirical_loss(z):  # z (B, X, A): tabular logits per seed
        logps = [torch.log_softmax(ref[0] + z, -1)]
        first = pairs.first.log_prob(logps) - pairs.first.log_prob(ref)
        second = pairs.second.log_prob(logps) - pairs.second.log_prob(ref)
        return dpo_loss(first, second, pairs.label, problem.beta, "sigmoid").mean(1).sum()

    z = _tabular_minimiser(empirical_loss, (len(seeds), *ref[0].shape[1:]))
    (grad,) = torch.autograd.grad(empirical_loss(z.requires_grad_(True)), z)
    assert grad.abs().max() < 1e-8  # the empirical minimiser exists (finite) for this dataset
    minimiser_gap = j_star - policy_value(problem, true_rewards, [torch.log_softmax(ref[0] + z.detach(), -1)])
    ref_gap = j_star - policy_value(problem, true_rewards, ref)
    final = gaps[-1]
    assert ((final - minimiser_gap).abs() < 0.05 * (ref_gap - minimiser_gap).abs()).all(), (final, minimiser_gap)
    assert ((final - minimiser_gap).abs() < 0.01).all(), (final, minimiser_gap)
