"""The counting sampler: the only way an algorithm draws trajectories or preference labels.

The harness owns the counters; the algorithm gets this object and cannot change them except
by drawing. samples = trajectories drawn (both members of a pair); queries = labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ratebench.envs.exact import preference_prob
from ratebench.envs.tabular import TabularProblem, gather_per_step
from ratebench.core.rng import CounterRng, categorical


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

    def flat(self, layout) -> FlatTrajectories:
        """The same trajectories as the fast path's flat indices: (h, s, a) -> (row_offset[h] + s) * A + a."""
        index = (self.states + torch.tensor(layout.row_offset)) * layout.n_actions + self.actions
        return FlatTrajectories(index, layout.unit_of[index])


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
    table = table if table.shape[0] == B else table.expand(B, table.shape[1])
    return table.gather(1, index.reshape(B, -1)).view(index.shape)


def _scatter(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
    """table[b, index[b, i, h]] += weights[b, i] for every step h (weights (B, N)), or += weights[b, i, h]
    (weights (B, N, H): one weight per step), in place. table (B, n)."""
    B = index.shape[0]
    per_step = weights if weights.dim() == index.dim() else weights[..., None].expand(index.shape)
    table.scatter_add_(1, index.reshape(B, -1), per_step.reshape(B, -1))


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
        return self.step_rewards(unit_rewards).sum(-1)

    def log_prob(self, flat_logps: torch.Tensor) -> torch.Tensor:
        """sum_t log pi(a_t | s_t): (B, N)."""
        return self.step_log_probs(flat_logps).sum(-1)

    def step_rewards(self, unit_rewards: torch.Tensor) -> torch.Tensor:
        """r(unit_t) at every step (Trajectories.per_step of reward tables): (B, N, H)."""
        return _take(unit_rewards, self.unit)

    def step_log_probs(self, flat_logps: torch.Tensor) -> torch.Tensor:
        """log pi(a_t | s_t) at every step (Trajectories.per_step of log-prob tables): (B, N, H)."""
        return _take(flat_logps, self.index)

    def step_states(self, n_actions: int) -> torch.Tensor:
        """The row of (h, s_h) in the stacked (S, A) table at every step, for per-state tables (B, S): (B, N, H)."""
        return self.index.div(n_actions, rounding_mode="floor")

    def step_state_values(self, state_table: torch.Tensor, n_actions: int) -> torch.Tensor:
        """V(h, s_h) at every step from a per-state table (B, S) of the stacked states (a critic's): (B, N, H)."""
        return _take(state_table, self.step_states(n_actions))

    def add_step_state_grad(self, grad: torch.Tensor, weights: torch.Tensor, n_actions: int) -> None:
        """grad += d/d(per-state table (B, S)) of sum_(i, t) weights_it V(h, s_h), in place; weights (B, N, H)."""
        _scatter(grad, self.step_states(n_actions), weights)

    def slice(self, start: int, stop: int) -> FlatTrajectories:
        """Trajectories start ... stop - 1 of every seed (views)."""
        return FlatTrajectories(self.index[:, start:stop], self.unit[:, start:stop])

    def take(self, rows: torch.Tensor) -> FlatTrajectories:
        """The trajectories at per-seed positions rows (B, b): (B, b, H)."""
        def pick(t):
            return t.gather(1, rows[..., None].expand(-1, -1, t.shape[2]))

        return FlatTrajectories(pick(self.index), pick(self.unit))

    def add_log_prob_grad(self, grad: torch.Tensor, weights: torch.Tensor) -> None:
        """grad += d/d(flat log-prob table) of sum_i weights_i log pi(tau_i), in place: (B, S * A); weights (B, N),
        or (B, N, H) for sum_(i, t) weights_it log pi(a_t | s_t) (one weight per step)."""
        _scatter(grad, self.index, weights)

    def add_return_grad(self, grad: torch.Tensor, weights: torch.Tensor) -> None:
        """grad += d/d(padded unit rewards) of sum_i weights_i R(tau_i), in place: (B, n_units + 1)."""
        _scatter(grad, self.unit, weights)

    def return_grad_per_step(self, weights: torch.Tensor, n_units: int) -> torch.Tensor:
        """d/d r(unit_t) of sum_i weights_i R(tau_i), one entry per step of every trajectory, 0 where a step pays
        nothing: (B, N * H) for weights (B, N). add_return_grad before its sum over the steps that share a unit,
        for a reward evaluated at the visited steps (RewardModel.visited_units), whose backward does that sum."""
        return (weights[..., None] * (self.unit < n_units)).view(weights.shape[0], -1)


@dataclass
class FlatPairs:
    """n labelled pairs as one batch of 2n FlatTrajectories: first members, then second members."""

    both: FlatTrajectories
    label: torch.Tensor  # (B, n) float64: 1 where the first trajectory is preferred

    def margin(self, unit_rewards: torch.Tensor) -> torch.Tensor:
        """R(tau) - R(tau') per pair: (B, n)."""
        ret, n = self.both.returns(unit_rewards), self.label.shape[1]
        return ret[:, :n] - ret[:, n:]


def rows_of(table: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """table[local] of a shared (n, K) table, or row b's table[b, local[b]] of an InstanceBatch's (B, n, K):
    (B, T, K) for local (B, T)."""
    if table.dim() == 2:
        return table[local]
    return table.gather(1, local[..., None].expand(*local.shape, table.shape[-1]))


def policy_cdf(logp_table: torch.Tensor) -> torch.Tensor:
    """What the fast sampler draws actions from: cumulative pi per row of a (B or 1, S, A) log-prob table."""
    return logp_table.detach().exp().cumsum(-1)


def padded_units(unit_rewards: torch.Tensor) -> torch.Tensor:
    """(B, n_units) -> (B, n_units + 1) with the zero no-reward slot (as step_tables_from_units)."""
    return torch.cat([unit_rewards, unit_rewards.new_zeros(unit_rewards.shape[0], 1)], 1)


def flat_true_rewards(problem: TabularProblem) -> torch.Tensor:
    """The true reward as padded unit rewards (what the labels are drawn from; PPO-RLHF's reward oracle):
    (n_units + 1,), an InstanceBatch's (B, n_units + 1). Built once per problem."""
    if "flat_true" not in problem.derived:
        true = problem.true_unit_reward
        problem.derived["flat_true"] = padded_units(true) if true.dim() == 2 else padded_units(true[None])[0]
    return problem.derived["flat_true"]


class _DrawPlan:
    """Where each uniform of a stage goes: the reference consumes, per `trajectories` call, n initial-state
    draws then (2H - 1) blocks of n (action, transition, ..., action); per `pairs` call, n initial states,
    the first members' blocks, the second members' blocks, then n label draws. Built once per request list."""

    def __init__(self, problem: TabularProblem, requests):
        lay, H = problem.flat(), problem.horizon
        steps, S = 2 * H - 1, sum(step.n_states for step in problem.steps)
        init, blocks, policy, labels, first, second = [], [[] for _ in range(steps)], [], [], [], []
        self.parts, self.sizes = [], []  # (kind, first trajectory, n) and trajectories per request
        col = t = 0  # next uniform column, next trajectory position
        for kind, p, n in requests:
            if kind not in ("trajectories", "pairs"):
                raise ValueError(f"unknown draw kind {kind!r}; allowed: trajectories, pairs")
            members = 1 if kind == "trajectories" else 2
            init += list(range(col, col + n)) * members
            col += n
            for _ in range(members):
                for j in range(steps):
                    blocks[j] += range(col, col + n)
                    col += n
            if kind == "pairs":
                labels += range(col, col + n)
                col += n
                first += range(t, t + n)
                second += range(t + n, t + 2 * n)
            policy += [p] * (members * n)
            self.parts.append((kind, t, n))
            self.sizes.append(members * n)
            t += members * n
        P = max(policy) + 1
        self.n_uniforms, self.n_pairs, self.samples = col, len(labels), t
        self.columns = torch.tensor([init, *blocks])  # (2H, T)
        base = torch.tensor(policy) * S
        self.row_base = [base + off for off in lay.row_offset]  # (T,) per step
        self.label_columns, self.first, self.second = torch.tensor(labels), torch.tensor(first), torch.tensor(second)
        self.unit_of = lay.unit_of.repeat(P)  # (P * S * A,)
        self.ref_logp = torch.cat([lay.ref_logp] * P, -1)  # (P * S * A,), an InstanceBatch's (B, P * S * A)


@dataclass
class FlatDraws:
    """One stage's draws: `every` holds all T trajectories in request order (pairs as first members, then
    second members); parts() gives each request's FlatTrajectories or FlatPairs (views)."""

    every: FlatTrajectories
    plan: _DrawPlan
    label: torch.Tensor | None  # (B, pairs of the stage)

    def split(self, values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, T) per-trajectory values -> one (B, n or 2n) block per request."""
        return values.split(self.plan.sizes, 1)

    def parts(self) -> list:
        out, lab = [], 0
        for (kind, t, n), size in zip(self.plan.parts, self.plan.sizes):
            traj = self.every.slice(t, t + size)
            if kind == "pairs":
                traj = FlatPairs(traj, self.label[:, lab:lab + n])
                lab += n
            out.append(traj)
        return out


class CountingSampler:
    def __init__(self, problem: TabularProblem, seeds: list[int], counters: Counters, stream: int = 1):
        self.problem = problem
        self._counters = counters
        self._rng = CounterRng(seeds, stream)
        self._plans: dict = {}  # request lists of flat_draws -> _DrawPlan
        self._true_rewards = problem.true_step_tables()

    @property
    def samples(self) -> int:
        return self._counters.samples

    @property
    def queries(self) -> int:
        return self._counters.queries

    def _initial_states(self, n: int) -> torch.Tensor:
        u = self._rng.uniform(n)
        init = self.problem.init_prob  # (G,), or (B, G) per row of an InstanceBatch
        return categorical((init[:, None] if init.dim() == 2 else init).expand(*u.shape, -1), u)

    def _rollout(self, logps: list[torch.Tensor], init: torch.Tensor) -> Trajectories:
        B, N = init.shape
        states, actions, s = [], [], init
        row = torch.arange(B)[:, None] if self.problem.batched else None  # transitions per row of an InstanceBatch
        for h, step in enumerate(self.problem.steps):
            table = logps[h].detach().exp()
            table = table.expand(B, *table.shape[1:])
            probs = table.gather(1, s[..., None].expand(B, N, table.shape[2]))
            a = categorical(probs, self._rng.uniform(N))
            states.append(s)
            actions.append(a)
            if h < self.problem.horizon - 1:
                where = (s, a) if row is None else (row, s, a)
                k = categorical(step.next_prob[where], self._rng.uniform(N))
                s = step.next_idx[where].gather(-1, k[..., None]).squeeze(-1)
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

    # --- the fast path: the same draws as flat indices, a whole stage of a step in one rollout ----------
    def draws(self, trajectories: int = 0, pairs: int = 0) -> int:
        """Uniforms consumed by `trajectories` trajectories plus `pairs` labelled pairs."""
        H = self.problem.horizon
        return 2 * H * trajectories + 4 * H * pairs

    def prefetch(self, n: int) -> None:
        """Draw the next n uniforms in one call (see CounterRng.prefetch); counts nothing."""
        self._rng.prefetch(n)

    def flat_draws(self, cdf: torch.Tensor, requests: tuple[tuple[str, int, int], ...]) -> FlatDraws:
        """What the calls `trajectories(pi_p, n)` / `pairs(pi_p, n)` listed in `requests` as
        (kind, p, n), in that order, would draw and count, as one rollout of every trajectory.
        cdf: (B or 1, P * S, A) = policy_cdf of P policies' flat tables stacked along the rows, policy p
        at rows p * S ... (p + 1) * S - 1; the indices point into (P * S * A) tables laid out the same way."""
        plan = self.plan(requests)
        lay, B, H = self.problem.flat(), len(self._rng.keys), self.problem.horizon
        drawn = self._rng.uniform(plan.n_uniforms)  # (B, n_uniforms), in the order of `requests`
        u = drawn[:, plan.columns]  # (B, 2H, T): the initial-state draw, then (action, transition) per step
        init_cdf, A = lay.init_cdf, lay.n_actions
        s = torch.searchsorted(init_cdf, u[:, 0] * init_cdf[..., -1:]).clamp_max(init_cdf.shape[-1] - 1)  # (B, T)
        cdf, T = cdf.expand(B, *cdf.shape[1:]), s.shape[1]
        index = []
        for h in range(H):
            rows = s + plan.row_base[h]  # (B, T): row of (h, s) in policy p's block
            row_cdf = cdf.gather(1, rows[..., None].expand(B, T, A))  # (B, T, A)
            a = torch.searchsorted(row_cdf, (u[:, 1 + 2 * h] * row_cdf[..., -1])[..., None]).squeeze(-1)
            a = a.clamp_max(A - 1)
            index.append(rows * A + a)
            if h < H - 1:
                local = s * A + a
                nxt = rows_of(lay.next_idx[h], local)  # (B, T, K)
                if nxt.shape[-1] == 1:  # deterministic successor (token task): the draw is made but not needed
                    s = nxt[..., 0]
                else:
                    next_cdf = rows_of(lay.next_cdf[h], local)
                    k = torch.searchsorted(next_cdf, (u[:, 2 + 2 * h] * next_cdf[..., -1])[..., None])
                    s = nxt.gather(-1, k.clamp_max(nxt.shape[-1] - 1)).squeeze(-1)
        index = index[0][..., None] if H == 1 else torch.stack(index, -1)
        every = FlatTrajectories(index, plan.unit_of[index])
        label = None
        if plan.n_pairs:  # the Bradley-Terry oracle on the true reward, every pair of the stage at once
            true = every.returns(flat_true_rewards(self.problem))
            p = preference_prob(self.problem, true[:, plan.first] - true[:, plan.second])
            label = (drawn[:, plan.label_columns] < p).to(torch.float64)
        self._count(plan)
        return FlatDraws(every, plan, label)

    def plan(self, requests: tuple[tuple[str, int, int], ...]) -> _DrawPlan:
        """Where each uniform of a flat_draws(cdf, requests) call goes (built once per request list)."""
        plan = self._plans.get(requests)
        if plan is None:
            plan = self._plans[requests] = _DrawPlan(self.problem, requests)
        return plan

    def reserve(self, plans: list[_DrawPlan], times: int = 1) -> int:
        """The draws of flat_draws calls with these plans, in this order, repeated `times` times (a segment of
        compiled steps), made by compiled code from the uniforms of CounterRng.keys at counters start, start + 1,
        ...: counts their samples and queries as flat_draws would, moves the stream past their uniforms, and
        returns start."""
        start = self._rng.counter
        for plan in plans:
            self._rng.counter += times * plan.n_uniforms
            self._count(plan, times)
        return start

    def _count(self, plan: _DrawPlan, times: int = 1) -> None:
        """What `times` stages drawn by `plan` count: their trajectories (both members of a pair) and labels."""
        self._counters.samples += times * plan.samples
        self._counters.queries += times * plan.n_pairs

    @property
    def keys(self) -> torch.Tensor:
        """Each seed's CounterRng key (B,) int64: draw i of seed b is a hash of (keys[b], i)."""
        return self._rng.keys

    def state_dict(self) -> dict:
        return self._rng.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._rng.load_state_dict(state)
