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


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for a shared table (n,) or per seed for (B or 1, n); index (B, N, H)."""
    if table.dim() == 1:
        return table[index]
    B = index.shape[0]
    return table.expand(B, table.shape[1]).gather(1, index.reshape(B, -1)).view(index.shape)


def _scatter(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
    """table[b, index[b, i, h]] += weights[b, i] for every step h, in place. table (B, n)."""
    B = index.shape[0]
    table.scatter_add_(1, index.reshape(B, -1), weights[..., None].expand(index.shape).reshape(B, -1))


@dataclass
class FlatTrajectories:
    """The fast path's trajectories (B, N): for each step h the flat (h, s, a) index of FlatLayout and the
    reward unit it pays. Same draws and values as Trajectories; gathers and their gradients are one
    call each. returns/log_prob take flat tables: padded unit rewards (B or 1, n_units + 1), flat
    log-prob tables (B or 1, S * A) or shared ones (S * A,)."""

    index: torch.Tensor  # (B, N, H) long
    unit: torch.Tensor  # (B, N, H) long

    def returns(self, unit_rewards: torch.Tensor) -> torch.Tensor:
        """R(tau) = sum_t r(unit_t): (B, N)."""
        return _take(unit_rewards, self.unit).sum(-1)

    def log_prob(self, flat_logps: torch.Tensor) -> torch.Tensor:
        """sum_t log pi(a_t | s_t): (B, N)."""
        return _take(flat_logps, self.index).sum(-1)

    def add_log_prob_grad(self, grad: torch.Tensor, weights: torch.Tensor) -> None:
        """grad += d/d(flat log-prob table) of sum_i weights_i log pi(tau_i), in place: (B, S * A)."""
        _scatter(grad, self.index, weights)

    def add_return_grad(self, grad: torch.Tensor, weights: torch.Tensor) -> None:
        """grad += d/d(padded unit rewards) of sum_i weights_i R(tau_i), in place: (B, n_units + 1)."""
        _scatter(grad, self.unit, weights)


@dataclass
class FlatPairs:
    """n labelled pairs as one batch of 2n FlatTrajectories: first members, then second members."""

    both: FlatTrajectories
    label: torch.Tensor  # (B, n) float64: 1 where the first trajectory is preferred

    def margin(self, unit_rewards: torch.Tensor) -> torch.Tensor:
        """R(tau) - R(tau') per pair: (B, n)."""
        ret, n = self.both.returns(unit_rewards), self.label.shape[1]
        return ret[:, :n] - ret[:, n:]

    def add_log_prob_grad(self, grad: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
        """grad += d/d(flat log-prob table) of sum_i first_i log pi(tau_i) + second_i log pi(tau'_i)."""
        self.both.add_log_prob_grad(grad, torch.cat([first, second], 1))

    def add_return_grad(self, grad: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> None:
        """grad += d/d(padded unit rewards) of sum_i first_i R(tau_i) + second_i R(tau'_i)."""
        self.both.add_return_grad(grad, torch.cat([first, second], 1))


def policy_cdf(logp_table: torch.Tensor) -> torch.Tensor:
    """What the fast sampler draws actions from: cumulative pi per row of a (B or 1, S, A) log-prob table."""
    return logp_table.detach().exp().cumsum(-1)


def padded_units(unit_rewards: torch.Tensor) -> torch.Tensor:
    """(B, n_units) -> (B, n_units + 1) with the zero no-reward slot (as step_tables_from_units)."""
    return torch.cat([unit_rewards, unit_rewards.new_zeros(unit_rewards.shape[0], 1)], 1)


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

    # --- the fast path: the same draws, from prefetched uniforms, as flat indices ---------------------
    def draws(self, trajectories: int = 0, pairs: int = 0) -> int:
        """Uniforms consumed by `trajectories` trajectories plus `pairs` labelled pairs."""
        H = self.problem.horizon
        return 2 * H * trajectories + 4 * H * pairs

    def prefetch(self, n: int) -> None:
        """Draw the next n uniforms in one call (see CounterRng.prefetch); counts nothing."""
        self._rng.prefetch(n)

    def _flat_rollout(self, cdf: torch.Tensor, init: torch.Tensor, u: torch.Tensor) -> FlatTrajectories:
        """The categorical draws of _rollout on flat tables. cdf (B or 1, S, A) from policy_cdf; init (B, N);
        u (B, 2H - 1, N): step h's action draw is u[:, 2h], its transition draw u[:, 2h + 1]."""
        lay, B, N = self.problem.flat(), init.shape[0], init.shape[1]
        A = lay.n_actions
        cdf = cdf.expand(B, *cdf.shape[1:])
        s, index = init, []
        for h in range(self.problem.horizon):
            rows = s + lay.row_offset[h] if h else s
            row_cdf = cdf.gather(1, rows[..., None].expand(B, N, A))  # (B, N, A)
            a = torch.searchsorted(row_cdf, (u[:, 2 * h] * row_cdf[..., -1])[..., None]).squeeze(-1).clamp_max(A - 1)
            index.append(rows * A + a)
            if h < self.problem.horizon - 1:
                local = s * A + a
                nxt = lay.next_idx[h][local]  # (B, N, K)
                if nxt.shape[-1] == 1:  # deterministic successor (token task): the draw is made but not needed
                    s = nxt[..., 0]
                else:
                    next_cdf = lay.next_cdf[h][local]
                    k = torch.searchsorted(next_cdf, (u[:, 2 * h + 1] * next_cdf[..., -1])[..., None])
                    s = nxt.gather(-1, k.clamp_max(nxt.shape[-1] - 1)).squeeze(-1)
        index = index[0][..., None] if len(index) == 1 else torch.stack(index, -1)
        return FlatTrajectories(index, lay.unit_of[index])

    def _flat_initial_states(self, n: int) -> torch.Tensor:
        cdf = self.problem.flat().init_cdf
        return torch.searchsorted(cdf, self._rng.uniform(n) * cdf[-1]).clamp_max(cdf.shape[0] - 1)

    def flat_trajectories(self, cdf: torch.Tensor, n: int) -> FlatTrajectories:
        """`trajectories` for the fast path: the same n trajectories per seed. Counts n samples."""
        self._counters.samples += n
        init = self._flat_initial_states(n)
        return self._flat_rollout(cdf, init, self._rng.uniform(2 * self.problem.horizon - 1, n))

    def flat_pairs(self, cdf: torch.Tensor, n: int) -> FlatPairs:
        """`pairs` for the fast path (both members from one policy): the same n labelled pairs.
        Counts 2n samples and n queries."""
        init = self._flat_initial_states(n)
        B, steps = init.shape[0], 2 * self.problem.horizon - 1
        u = self._rng.uniform(2, steps, n)  # first member's draws, then the second's (as `pairs`)
        u = u.reshape(B, steps, 2 * n) if steps == 1 else u.transpose(1, 2).reshape(B, steps, 2 * n)
        both = self._flat_rollout(cdf, torch.cat([init, init], 1), u)
        self._counters.samples += 2 * n
        self._counters.queries += n
        true = both.returns(self._flat_true_rewards())
        diff = true[:, :n] - true[:, n:]
        label = (self._rng.uniform(n) < preference_prob(self.problem, diff)).to(torch.float64)
        return FlatPairs(both, label)

    def _flat_true_rewards(self) -> torch.Tensor:
        if "flat_true" not in self.problem.derived:
            self.problem.derived["flat_true"] = padded_units(self.problem.true_unit_reward[None])[0]
        return self.problem.derived["flat_true"]

    def state_dict(self) -> dict:
        return self._rng.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._rng.load_state_dict(state)
