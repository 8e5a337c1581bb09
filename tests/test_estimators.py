"""The shared gradient estimators are unbiased: their mean over many independent draws matches
the exact autodiff gradient (z-test per coordinate, Bonferroni), and a biased variant is caught."""
from __future__ import annotations

from statistics import NormalDist

import pytest
import torch

from ratebench import envs
from ratebench.algorithms import estimators
from ratebench.algorithms.models import NetConfig, PolicyModel, RewardModel
from ratebench.envs import bandit, exact, mdp
from ratebench.envs.sampling import Counters, CountingSampler

SMALL = {
    "bandit": bandit.BanditConfig(n_contexts=3, n_actions=4, feature_dim=3),
    "mdp": mdp.MDPConfig(n_states=3, n_actions=2, horizon=3),
}
REPLICATES = 4000  # independent estimates, one per sampler seed
PER_ESTIMATE = 4  # trajectories / pairs inside one estimate (the leave-one-out batch)
FAMILY_ALPHA = 1e-3  # false-alarm rate of one test (all coordinates together)


def z_critical(n_coords: int) -> float:
    """Two-sided Bonferroni-corrected normal quantile for FAMILY_ALPHA over n_coords tests."""
    return NormalDist().inv_cdf(1 - FAMILY_ALPHA / (2 * n_coords))


class Fixture:
    """A fixed (nu, theta) on a small problem, replicated over REPLICATES sampler seeds."""

    def __init__(self, name: str):
        self.problem = envs.make(SMALL[name])
        self.policy = PolicyModel(self.problem, NetConfig(width=4))
        self.reward = RewardModel(self.problem, NetConfig(width=4, activation="tanh"))
        gen = torch.Generator().manual_seed(11)
        theta = self.policy.init([0])
        theta[-2] = 0.7 * torch.randn(theta[-2].shape, generator=gen, dtype=torch.float64)  # move off pi_ref
        self.theta, self.nu = theta, self.reward.init([0])
        self.sampler = CountingSampler(self.problem, list(range(REPLICATES)), Counters())
        self.ref = self.problem.ref_log_probs()

    @staticmethod
    def replicate(params):
        return [p.expand(REPLICATES, *p.shape[1:]).clone().requires_grad_(True) for p in params]

    @staticmethod
    def flat(grads):
        return torch.cat([g.reshape(g.shape[0], -1) for g in grads], 1)


@pytest.fixture(params=sorted(SMALL), scope="module")
def fx(request):
    return Fixture(request.param)


def assert_unbiased(estimates: torch.Tensor, exact_grad: torch.Tensor) -> None:
    """estimates (R, d) iid; exact (d,). z-test per coordinate with Bonferroni over d."""
    informative = estimates.std(0) > 1e-12  # coordinates the estimator never moves (e.g. dead units)
    assert torch.allclose(estimates[:, ~informative].mean(0), exact_grad[~informative], atol=1e-10)
    mean, se = estimates[:, informative].mean(0), estimates[:, informative].std(0) / REPLICATES**0.5
    z = (mean - exact_grad[informative]) / se
    crit = z_critical(int(informative.sum()))
    assert z.abs().max() < crit, f"max |z| = {float(z.abs().max()):.2f} >= {crit:.2f}"


LEAVE_ONE_OUT = estimators.leave_one_out_baseline


def own_sample_baseline(values: torch.Tensor) -> torch.Tensor:
    """A deliberately biased baseline: half the sample's own value, half leave-one-out."""
    return 0.5 * (values + LEAVE_ONE_OUT(values))


def policy_gradient_estimates(fx: Fixture, rewards) -> torch.Tensor:
    theta = fx.replicate(fx.theta)
    logps = fx.policy.log_probs(theta)
    traj = fx.sampler.trajectories(logps, PER_ESTIMATE)
    surrogate = estimators.policy_gradient_surrogate(traj, rewards, logps, fx.ref, fx.problem.beta)
    return fx.flat(torch.autograd.grad(surrogate.sum(), theta))


def exact_policy_gradient(fx: Fixture, rewards) -> torch.Tensor:
    theta = [p.clone().requires_grad_(True) for p in fx.theta]
    value = exact.policy_value(fx.problem, rewards, fx.policy.log_probs(theta))
    return fx.flat(torch.autograd.grad(value.sum(), theta))[0]


def test_reinforce_with_leave_one_out_baseline_is_unbiased(fx):
    rewards = [r.detach() for r in fx.reward.step_tables(fx.nu)]
    assert_unbiased(policy_gradient_estimates(fx, rewards), exact_policy_gradient(fx, rewards))


def test_z_test_catches_a_baseline_that_uses_the_sample_itself(fx, monkeypatch):
    """Baseline mixes in the sample's own return, b_i = (G_i + mean_{j != i} G_j) / 2: the
    advantage halves, so the estimate is biased towards 0; the same test must reject it."""
    monkeypatch.setattr(estimators, "leave_one_out_baseline", own_sample_baseline)
    rewards = [r.detach() for r in fx.reward.step_tables(fx.nu)]
    with pytest.raises(AssertionError, match="max \\|z\\|"):
        assert_unbiased(policy_gradient_estimates(fx, rewards), exact_policy_gradient(fx, rewards))


def test_value_gradient_in_nu_is_unbiased(fx):
    """reward_return_surrogate: grad_nu E_{tau ~ pi_theta}[R_nu(tau)] = grad_nu J (the KL part has no nu)."""
    nu = fx.replicate(fx.nu)
    traj = fx.sampler.trajectories(fx.policy.log_probs(fx.theta), PER_ESTIMATE)
    surrogate = estimators.reward_return_surrogate(traj, fx.reward.step_tables(nu))
    estimates = fx.flat(torch.autograd.grad(surrogate.sum(), nu))
    nu1 = [p.clone().requires_grad_(True) for p in fx.nu]
    value = exact.policy_value(fx.problem, fx.reward.step_tables(nu1), [lp.detach() for lp in fx.policy.log_probs(fx.theta)])
    assert_unbiased(estimates, fx.flat(torch.autograd.grad(value.sum(), nu1))[0])


def test_bt_loss_gradient_in_nu_is_unbiased(fx):
    nu = fx.replicate(fx.nu)
    pairs = fx.sampler.pairs(fx.policy.log_probs(fx.theta), PER_ESTIMATE)
    loss = estimators.preference_loss(pairs, fx.reward.step_tables(nu))
    estimates = fx.flat(torch.autograd.grad(loss.sum(), nu))
    nu1 = [p.clone().requires_grad_(True) for p in fx.nu]
    f = exact.upper_loss(fx.problem, fx.reward.step_tables(nu1), [lp.detach() for lp in fx.policy.log_probs(fx.theta)])
    assert_unbiased(estimates, fx.flat(torch.autograd.grad(f.sum(), nu1))[0])


def score_estimates(fx: Fixture, rewards) -> torch.Tensor:
    theta = fx.replicate(fx.theta)
    logps = fx.policy.log_probs(theta)
    pairs = fx.sampler.pairs(logps, PER_ESTIMATE)
    surrogate = estimators.preference_score_surrogate(pairs, rewards, logps)
    return fx.flat(torch.autograd.grad(surrogate.sum(), theta))


def exact_upper_loss_policy_gradient(fx: Fixture, rewards) -> torch.Tensor:
    theta = [p.clone().requires_grad_(True) for p in fx.theta]
    f = exact.upper_loss(fx.problem, rewards, fx.policy.log_probs(theta))
    return fx.flat(torch.autograd.grad(f.sum(), theta))[0]


def test_score_function_gradient_of_upper_loss_is_unbiased(fx):
    rewards = [r.detach() for r in fx.reward.step_tables(fx.nu)]
    assert_unbiased(score_estimates(fx, rewards), exact_upper_loss_policy_gradient(fx, rewards))


def test_z_test_catches_a_biased_score_baseline(fx, monkeypatch):
    monkeypatch.setattr(estimators, "leave_one_out_baseline", own_sample_baseline)
    rewards = [r.detach() for r in fx.reward.step_tables(fx.nu)]
    with pytest.raises(AssertionError, match="max \\|z\\|"):
        assert_unbiased(score_estimates(fx, rewards), exact_upper_loss_policy_gradient(fx, rewards))


def test_estimators_draw_only_through_the_counters(fx):
    """Every estimate's samples are counted: N trajectories = N samples, M pairs = 2M samples + M queries."""
    counters = Counters()
    sampler = CountingSampler(fx.problem, [0, 1], counters)
    logps = fx.policy.log_probs(fx.theta)
    sampler.trajectories(logps, 5)
    sampler.pairs(logps, 3)
    assert (counters.samples, counters.queries) == (5 + 6, 3)
