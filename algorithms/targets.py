"""Population targets: what a method converges to with infinite data from its own sampling
scheme, computed exactly on the enumerated problem. A run's `policy_gap` then splits into the target's
policy_gap (the method's bias) and `target_policy_gap_excess` (how far it still is from its own target).

Each algorithm says which target is its own (`Algorithm.population_targets`); the solvers shared by
several of them live here: the population Bradley-Terry MLE of a reward on a pair distribution
(reward_mle, PPO-RLHF), the KL-regularised optimum at another KL coefficient (PPO-RLHF's own beta), and
the fixed point of "refit on pairs from the current policy" (online / iterative methods).
Rewards are solved over unit tables (the reward network's function class when it can fit any table).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ratebench.envs.exact import soft_optimal, upper_loss
from ratebench.envs.global_ref import objective_rows
from ratebench.envs.lbfgs import minimise_rows
from ratebench.envs.tabular import DTYPE, TabularProblem

Tables = list[torch.Tensor]
TARGET_TOL = 1e-10  # gradient sup-norm at which a minimiser's solve stops
# a fixed point stops when no policy probability moves more than this in one refit; each refit is solved
# to TARGET_TOL in the gradient, which leaves ~1e-8 of play in flat directions, so a tighter bound never holds
FIXED_POINT_TOL = 1e-7
FIXED_POINT_ITERATIONS = 200
SOLVED_BELOW = 1e-6  # a target whose residual is above this is recorded with solved: false


@dataclass
class PopulationTarget:
    """One target: the policy [(1, n_h, A)] and reward estimate [(1, n_h, A)] (None: the method has
    none) it converges to, what it is, and how well it was solved: the gradient sup-norm of a minimiser,
    the last probability change of a fixed point (solved: at most SOLVED_BELOW)."""

    what: str
    logps: Tables
    rewards: Tables | None
    residual: float

    @property
    def solved(self) -> bool:
        return self.residual <= SOLVED_BELOW


def soft_optimal_at(problem: TabularProblem, rewards: Tables, beta: float) -> Tables:
    """pi* of `rewards` under KL coefficient `beta` (soft_optimal uses the env's): the KL-regularised
    optimum at beta' for reward r is the one at beta for reward r * beta / beta'."""
    scale = problem.beta / beta
    return soft_optimal(problem, [r * scale for r in rewards])[0]


def bt_mle_units(problem: TabularProblem, pairs_from: Tables) -> tuple[torch.Tensor, float]:
    """The population Bradley-Terry MLE of a unit reward table on pairs tau, tau' ~ pairs_from(.|g)
    with oracle labels: argmin_r E BCE(p*, sigmoid(R_r(tau) - R_r(tau'))) = upper_loss(r, pairs_from).
    Convex in r (its level sets are unique up to return shifts that do not change pi*). Returns
    (unit rewards (n_units,), gradient sup-norm at the solution)."""
    objective = lambda x: upper_loss(problem, problem.step_tables_from_units(x), pairs_from)  # noqa: E731
    x0 = torch.zeros(1, problem.n_units, dtype=DTYPE)
    solved = minimise_rows(objective, x0, TARGET_TOL, max_iter=5000)
    return solved.x[0].detach(), float(solved.grad_norm[0])


def bt_mle_target(problem: TabularProblem, beta: float, pairs_from: Tables, what: str) -> PopulationTarget:
    """pi*_beta of the population BT-MLE reward on pairs from `pairs_from` (a reward-model pipeline)."""
    units, residual = bt_mle_units(problem, pairs_from)
    rewards = problem.step_tables_from_units(units[None])
    return PopulationTarget(what, soft_optimal_at(problem, rewards, beta), rewards, residual)


def fixed_point(refit: Callable[[Tables], PopulationTarget], start: Tables, what: str) -> PopulationTarget:
    """The fixed point of pi <- refit(pairs from pi), from pi = start: where an on-policy method that
    refits on fresh pairs from its own policy comes to rest. The residual is the largest change of a
    policy probability in the last iteration (and at least the last refit's own residual)."""
    logps, change = start, float("inf")
    for _ in range(FIXED_POINT_ITERATIONS):
        target = refit(logps)
        change = max(float((new.exp() - old.exp()).abs().max()) for new, old in zip(target.logps, logps))
        logps = target.logps
        if change <= FIXED_POINT_TOL:
            break
    return PopulationTarget(what, target.logps, target.rewards, max(change, target.residual))


def minimiser_target(problem: TabularProblem, units: torch.Tensor, what: str) -> PopulationTarget:
    """pi* of a unit reward table that minimises F (the bilevel objective): where the penalty method comes
    to rest as lambda grows. Residual: the sup-norm of grad F there."""
    x = units.detach().clone()[None].requires_grad_(True)
    (grad,) = torch.autograd.grad(objective_rows(problem)(x).sum(), x)
    rewards = problem.step_tables_from_units(x.detach())
    return PopulationTarget(what, soft_optimal(problem, rewards)[0], rewards, float(grad.abs().max()))
