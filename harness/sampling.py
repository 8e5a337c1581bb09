"""The counting sampler: the only way an algorithm draws trajectories or preference labels.

The harness owns the counters; the algorithm gets this object and cannot change them except
by drawing. samples = trajectories drawn (both members of a pair); queries = labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ratebench.envs.exact import preference_prob
from ratebench.envs.tabular import TabularProblem, gather_per_step
from ratebench.rng import CounterRng, categorical


@dataclass
class Counters:
    samples: int = 0
    queries: int = 0
    step: int = 0


@dataclass
class Trajectories:
    """N trajectories per seed. states/actions: (B, N, H) long; init: (B, N)."""

    states: torch.Tensor
    actions: torch.Tensor

    @property
    def init(self) -> torch.Tensor:
        return self.states[..., 0]

    def per_step(self, tables: list[torch.Tensor]) -> torch.Tensor:
        """tables[h](s_h, a_h) along every trajectory, from step tables [(B or 1, n_h, A)]: (B, N, H)."""
        return gather_per_step(tables, self.states, self.actions)

    def returns(self, rewards: list[torch.Tensor]) -> torch.Tensor:
        """R(tau) = sum_t r_t(s_t, a_t): (B, N)."""
        return self.per_step(rewards).sum(-1)

    def log_prob(self, logps: list[torch.Tensor]) -> torch.Tensor:
        """sum_t log pi(a_t | s_t) (policy part only; differentiable in the tables): (B, N)."""
        return self.per_step(logps).sum(-1)


@dataclass
class PreferencePairs:
    first: Trajectories
    second: Trajectories
    label: torch.Tensor  # (B, N) float64: 1 where the first trajectory is preferred


class CountingSampler:
    def __init__(self, problem: TabularProblem, seeds: list[int], counters: Counters, stream: int = 1):
        self.problem = problem
        self._counters = counters
        self._rng = CounterRng(seeds, stream)
        self._true_rewards = problem.true_step_tables()

    @property
    def samples(self) -> int:
        return self._counters.samples

    @property
    def queries(self) -> int:
        return self._counters.queries

    def _initial_states(self, n: int) -> torch.Tensor:
        u = self._rng.uniform(n)
        return categorical(self.problem.init_prob.expand(*u.shape, -1), u)

    def _rollout(self, logps: list[torch.Tensor], init: torch.Tensor) -> Trajectories:
        B, N = init.shape
        states, actions, s = [], [], init
        for h, step in enumerate(self.problem.steps):
            table = logps[h].detach().exp()
            table = table.expand(B, *table.shape[1:])
            probs = table.gather(1, s[..., None].expand(B, N, table.shape[2]))
            a = categorical(probs, self._rng.uniform(N))
            states.append(s)
            actions.append(a)
            if h < self.problem.horizon - 1:
                k = categorical(step.next_prob[s, a], self._rng.uniform(N))
                s = step.next_idx[s, a].gather(-1, k[..., None]).squeeze(-1)
        return Trajectories(torch.stack(states, -1), torch.stack(actions, -1))

    def trajectories(self, logps: list[torch.Tensor], n: int) -> Trajectories:
        """n trajectories per seed from the policy tables [(B or 1, n_h, A)]. Counts n samples."""
        self._counters.samples += n
        return self._rollout(logps, self._initial_states(n))

    def pairs(self, logps: list[torch.Tensor], n: int, second_logps: list[torch.Tensor] | None = None) -> PreferencePairs:
        """n labelled pairs sharing their initial state; the second member is drawn from
        `second_logps` when given (else the same policy). Counts 2n samples and n queries."""
        init = self._initial_states(n)
        first = self._rollout(logps, init)
        second = self._rollout(second_logps if second_logps is not None else logps, init)
        self._counters.samples += 2 * n
        return PreferencePairs(first, second, self.label(first, second))

    def label(self, first: Trajectories, second: Trajectories) -> torch.Tensor:
        """Bradley-Terry oracle on the true reward. Counts one query per pair."""
        self._counters.queries += first.states.shape[1]
        diff = first.returns(self._true_rewards) - second.returns(self._true_rewards)
        p = preference_prob(self.problem, diff)
        return (self._rng.uniform(p.shape[1]) < p).to(torch.float64)

    def state_dict(self) -> dict:
        return self._rng.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._rng.load_state_dict(state)
