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

Every estimate also has a two-point form for the momentum (STORM) step: with `previous` (the previous
iterate's reward tables and/or policy tables) it returns the estimate at the current point and the same
estimate at the previous point *on the same samples* (drawn once, from the current policy, counted once):
the samples are reweighted by importance_weights pi_previous / pi_current, which keeps the previous
point's estimate unbiased for its own gradient. The exact oracle returns the two exact values.
"""
from __future__ import annotations

import torch

from ratebench.algorithms.estimators import (importance_weights, pair_weights, policy_gradient_surrogate,
                                             preference_loss, preference_score_surrogate, reward_return_surrogate)
from ratebench.envs import exact

Tables = list[torch.Tensor]

ORACLES = ("stochastic", "exact")  # every algorithm with an `oracle` knob
NOISE_SWITCHES = ("exact_lower", "exact_upper")  # the bilevel method's per-level mixtures
BILEVEL_ORACLES = ORACLES + NOISE_SWITCHES


class StochasticOracle:
    """Samples from the counting sampler; every method draws exactly what the estimator needs."""

    def __init__(self, problem):
        self.problem, self.ref = problem, problem.ref_log_probs()

    def value_theta(self, sampler, rewards: Tables, logps: Tables, n_traj: int, previous=None):
        """theta-gradient = g^_theta J(nu, theta): REINFORCE, N trajectories from pi_theta. (B,)
        previous=(rewards', logps'): also the same trajectories' estimate at (nu', theta')."""
        traj = sampler.trajectories(logps, n_traj)
        now = policy_gradient_surrogate(traj, rewards, logps, self.ref, self.problem.beta)
        if previous is None:
            return now
        rewards_prev, logps_prev = previous
        weights = importance_weights(traj, logps_prev, logps)
        return now, policy_gradient_surrogate(traj, rewards_prev, logps_prev, self.ref, self.problem.beta, weights)

    def upper_theta(self, sampler, rewards: Tables, logps: Tables, n_pairs: int, previous=None):
        """theta-gradient = g^_theta f(nu, theta): score function, M labelled pairs from pi_theta. (B,)
        previous=(rewards', logps'): also the same pairs' estimate at (nu', theta')."""
        pairs = sampler.pairs(logps, n_pairs)
        now = preference_score_surrogate(pairs, rewards, logps)
        if previous is None:
            return now
        rewards_prev, logps_prev = previous
        return now, preference_score_surrogate(pairs, rewards_prev, logps_prev, pair_weights(pairs, logps_prev, logps))

    def upper_nu(self, sampler, logps: Tables, n_pairs: int, previous=None):
        """nu-gradient of the returned function = g^_nu f(nu, theta): BT loss of M pairs from pi_theta.
        previous=logps': also the same pairs' function at theta' (importance-weighted)."""
        pairs = sampler.pairs(logps, n_pairs)
        now = lambda rewards: preference_loss(pairs, rewards)  # noqa: E731
        if previous is None:
            return now
        weights = pair_weights(pairs, previous, logps)
        return now, lambda rewards: preference_loss(pairs, rewards, weights)

    def value_nu(self, sampler, logps: Tables, n_traj: int, previous=None):
        """nu-gradient of the returned function = g^_nu J(nu, theta): mean R_nu of N trajectories.
        previous=logps': also the same trajectories' function at theta' (importance-weighted)."""
        traj = sampler.trajectories(logps, n_traj)
        now = lambda rewards: reward_return_surrogate(traj, rewards)  # noqa: E731
        if previous is None:
            return now
        weights = importance_weights(traj, previous, logps)
        return now, lambda rewards: reward_return_surrogate(traj, rewards, weights)


class ExactOracle:
    """The population values of the same four gradients, by enumeration; never touches the sampler."""

    def __init__(self, problem):
        self.problem = problem

    def value_theta(self, sampler, rewards: Tables, logps: Tables, n_traj: int, previous=None):
        """J(nu, theta) = E_pi[R_nu] - beta KL (rewards detached): its theta-gradient is grad_theta J."""
        now = exact.policy_value(self.problem, [r.detach() for r in rewards], logps)
        return now if previous is None else (now, self.value_theta(sampler, *previous, n_traj))

    def upper_theta(self, sampler, rewards: Tables, logps: Tables, n_pairs: int, previous=None):
        """f(nu, theta) (rewards detached): its theta-gradient is grad_theta f."""
        now = exact.upper_loss(self.problem, [r.detach() for r in rewards], logps)
        return now if previous is None else (now, self.upper_theta(sampler, *previous, n_pairs))

    def upper_nu(self, sampler, logps: Tables, n_pairs: int, previous=None):
        """f(nu, theta) with theta held fixed: its nu-gradient is grad_nu f."""
        fixed = [lp.detach() for lp in logps]
        now = lambda rewards: exact.upper_loss(self.problem, rewards, fixed)  # noqa: E731
        return now if previous is None else (now, self.upper_nu(sampler, previous, n_pairs))

    def value_nu(self, sampler, logps: Tables, n_traj: int, previous=None):
        """J(nu, theta) with theta fixed: its nu-gradient is E_pi[grad_nu R_nu] (the KL term has no nu)."""
        fixed = [lp.detach() for lp in logps]
        now = lambda rewards: exact.policy_value(self.problem, rewards, fixed)  # noqa: E731
        return now if previous is None else (now, self.value_nu(sampler, previous, n_traj))


class MixedOracle:
    """One level's two estimates exact, the other level's two stochastic (counted); the stochastic ones draw
    exactly what StochasticOracle draws, in the same order, so an exact part only removes its draws."""

    def __init__(self, problem, exact_level: str):
        exact, stochastic = ExactOracle(problem), StochasticOracle(problem)
        self.lower, self.upper = (exact, stochastic) if exact_level == "lower" else (stochastic, exact)

    def value_theta(self, sampler, rewards: Tables, logps: Tables, n_traj: int, previous=None):
        return self.lower.value_theta(sampler, rewards, logps, n_traj, previous)  # lower level: grad_theta g = -grad_theta J

    def value_nu(self, sampler, logps: Tables, n_traj: int, previous=None):
        return self.lower.value_nu(sampler, logps, n_traj, previous)  # lower level: grad_nu g = -grad_nu J

    def upper_theta(self, sampler, rewards: Tables, logps: Tables, n_pairs: int, previous=None):
        return self.upper.upper_theta(sampler, rewards, logps, n_pairs, previous)  # upper level: grad_theta f

    def upper_nu(self, sampler, logps: Tables, n_pairs: int, previous=None):
        return self.upper.upper_nu(sampler, logps, n_pairs, previous)  # upper level: grad_nu f


def make_oracle(name: str, problem):
    """An oracle of BILEVEL_ORACLES (callers validate the name against the values they accept)."""
    if name in NOISE_SWITCHES:
        return MixedOracle(problem, exact_level=name.removeprefix("exact_"))
    return {"stochastic": StochasticOracle, "exact": ExactOracle}[name](problem)
