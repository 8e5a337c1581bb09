"""Gradient oracles of the bilevel method: the four estimates of docs/bilevel.md as per-seed surrogates.

`stochastic` (the analysed method) draws fresh samples through the counting sampler and uses the
shared estimators; `exact` returns the population value by enumeration (envs/exact.py) and draws
nothing, so a run isolates the schedule's deterministic rate from the sampling noise.

The bilevel method's noise switches mix the two per level, as F2SA's noise model does (Kwon et al.
2023: sigma_f is the noise of the upper-level objective's gradients, sigma_g of the lower level's):
the lower level is g = -J, so its estimates are value_theta and value_nu (both gradients of J); the
upper level is f, the preference loss, with upper_theta and upper_nu. `exact_lower` (sigma_g = 0: noise
in the upper level only) takes the lower level's two from the exact oracle and the upper level's from
the stochastic one; `exact_upper` (sigma_f = 0) the other way round.
"""
from __future__ import annotations

from typing import Callable

import torch

from ratebench.algorithms.estimators import (policy_gradient_surrogate, preference_loss,
                                             preference_score_surrogate, reward_return_surrogate)
from ratebench.envs import exact

Tables = list[torch.Tensor]
OfRewards = Callable[[Tables], torch.Tensor]  # reward tables [(B, n_h, A)] -> (B,), differentiable in them

ORACLES = ("stochastic", "exact")  # every algorithm with an `oracle` knob
NOISE_SWITCHES = ("exact_lower", "exact_upper")  # the bilevel method's per-level mixtures
BILEVEL_ORACLES = ORACLES + NOISE_SWITCHES
LOWER_LEVEL = ("value_theta", "value_nu")  # gradients of g = -J (the KL-regularised return)
UPPER_LEVEL = ("upper_theta", "upper_nu")  # gradients of f (the Bradley-Terry preference loss)


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


class MixedOracle:
    """One level's two estimates exact, the other level's two stochastic (counted); the stochastic ones draw
    exactly what StochasticOracle draws, in the same order, so an exact part only removes its draws."""

    def __init__(self, problem, exact_level: str):
        exact, stochastic = ExactOracle(problem), StochasticOracle(problem)
        self.lower, self.upper = (exact, stochastic) if exact_level == "lower" else (stochastic, exact)

    def value_theta(self, sampler, rewards: Tables, logps: Tables, n_traj: int) -> torch.Tensor:
        return self.lower.value_theta(sampler, rewards, logps, n_traj)  # lower level: grad_theta g = -grad_theta J

    def value_nu(self, sampler, logps: Tables, n_traj: int) -> OfRewards:
        return self.lower.value_nu(sampler, logps, n_traj)  # lower level: grad_nu g = -grad_nu J

    def upper_theta(self, sampler, rewards: Tables, logps: Tables, n_pairs: int) -> torch.Tensor:
        return self.upper.upper_theta(sampler, rewards, logps, n_pairs)  # upper level: grad_theta f

    def upper_nu(self, sampler, logps: Tables, n_pairs: int) -> OfRewards:
        return self.upper.upper_nu(sampler, logps, n_pairs)  # upper level: grad_nu f


def make_oracle(name: str, problem):
    """An oracle of BILEVEL_ORACLES (callers validate the name against the values they accept)."""
    if name in NOISE_SWITCHES:
        return MixedOracle(problem, exact_level=name.removeprefix("exact_"))
    return {"stochastic": StochasticOracle, "exact": ExactOracle}[name](problem)
