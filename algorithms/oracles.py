"""Gradient oracles of the bilevel method: the four estimates of docs/bilevel.md as per-seed surrogates.

`stochastic` (the analysed method) draws fresh samples through the counting sampler and uses the
shared estimators; `exact` returns the population value by enumeration (envs/exact.py) and draws
nothing, so a run isolates the schedule's deterministic rate from the sampling noise.
"""
from __future__ import annotations

from typing import Callable

import torch

from ratebench.algorithms.estimators import (policy_gradient_surrogate, preference_loss,
                                             preference_score_surrogate, reward_return_surrogate)
from ratebench.envs import exact

Tables = list[torch.Tensor]
OfRewards = Callable[[Tables], torch.Tensor]  # reward tables [(B, n_h, A)] -> (B,), differentiable in them

ORACLES = ("stochastic", "exact")


class StochasticOracle:
    """Samples from the counting sampler; every method draws exactly what the estimator needs."""

    def __init__(self, problem):
        self.problem, self.ref = problem, problem.ref_log_probs()

    def value_theta(self, sampler, rewards: Tables, logps: Tables, n_traj: int) -> torch.Tensor:
        """theta-gradient = g^_theta J(nu, theta): REINFORCE, N trajectories from pi_theta. (B,)"""
        traj = sampler.trajectories(logps, n_traj)
        return policy_gradient_surrogate(traj, rewards, logps, self.ref, self.problem.beta)

    def upper_theta(self, sampler, rewards: Tables, logps: Tables, n_pairs: int) -> torch.Tensor:
        """theta-gradient = g^_theta f(nu, theta): score function, M labelled pairs from pi_theta. (B,)"""
        pairs = sampler.pairs(logps, n_pairs)
        return preference_score_surrogate(pairs, rewards, logps)

    def upper_nu(self, sampler, logps: Tables, n_pairs: int) -> OfRewards:
        """nu-gradient of the returned function = g^_nu f(nu, theta): BT loss of M pairs from pi_theta."""
        pairs = sampler.pairs(logps, n_pairs)
        return lambda rewards: preference_loss(pairs, rewards)

    def value_nu(self, sampler, logps: Tables, n_traj: int) -> OfRewards:
        """nu-gradient of the returned function = g^_nu J(nu, theta): mean R_nu of N trajectories."""
        traj = sampler.trajectories(logps, n_traj)
        return lambda rewards: reward_return_surrogate(traj, rewards)


class ExactOracle:
    """The population values of the same four gradients, by enumeration; never touches the sampler."""

    def __init__(self, problem):
        self.problem = problem

    def value_theta(self, sampler, rewards: Tables, logps: Tables, n_traj: int) -> torch.Tensor:
        """J(nu, theta) = E_pi[R_nu] - beta KL (rewards detached): its theta-gradient is grad_theta J."""
        return exact.policy_value(self.problem, [r.detach() for r in rewards], logps)

    def upper_theta(self, sampler, rewards: Tables, logps: Tables, n_pairs: int) -> torch.Tensor:
        """f(nu, theta) (rewards detached): its theta-gradient is grad_theta f."""
        return exact.upper_loss(self.problem, [r.detach() for r in rewards], logps)

    def upper_nu(self, sampler, logps: Tables, n_pairs: int) -> OfRewards:
        """f(nu, theta) with theta held fixed: its nu-gradient is grad_nu f."""
        fixed = [lp.detach() for lp in logps]
        return lambda rewards: exact.upper_loss(self.problem, rewards, fixed)

    def value_nu(self, sampler, logps: Tables, n_traj: int) -> OfRewards:
        """J(nu, theta) with theta fixed: its nu-gradient is E_pi[grad_nu R_nu] (the KL term has no nu)."""
        fixed = [lp.detach() for lp in logps]
        return lambda rewards: exact.policy_value(self.problem, rewards, fixed)


def make_oracle(name: str, problem):
    return {"stochastic": StochasticOracle, "exact": ExactOracle}[name](problem)
