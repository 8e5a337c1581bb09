"""The one finite-horizon tabular structure every environment compiles to.

A bandit is H = 1, a token task is an MDP whose state is the prefix; exact solvers, the
sampler and trajectory enumeration are written once against this structure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ratebench.errors import ConfigError

DTYPE = torch.float64


@dataclass
class Step:
    """Time step h. Shapes: n = states at this step, A actions, K successors per (s, a)."""

    policy_features: torch.Tensor  # (n, d_policy): what a policy network sees at (h, s)
    ref_logp: torch.Tensor  # (n, A): log pi_ref(a | s)
    unit_idx: torch.Tensor  # (n, A) long: reward unit of (h, s, a); n_units = no reward
    next_idx: torch.Tensor  # (n, A, K) long: successor state indices at step h + 1
    next_prob: torch.Tensor  # (n, A, K): their probabilities (unused at the last step)

    @property
    def n_states(self) -> int:
        return self.ref_logp.shape[0]


@dataclass
class TrajectoryTable:
    """Every trajectory, grouped by initial state g (G groups of equal size m).

    A preference pair is two trajectories from the same initial state (same prompt).
    """

    states: torch.Tensor  # (G, m, H) long
    actions: torch.Tensor  # (G, m, H) long
    log_trans: torch.Tensor  # (G, m): sum of log transition probabilities (given g)


@dataclass
class TabularProblem:
    """A KL-regularised finite-horizon problem with a known true reward.

    Rewards live on `units` (what a reward model scores: (x, a), (h, s, a) or a whole
    sequence); `unit_idx` of each step says which unit a step-action pays.
    """

    name: str
    steps: list[Step]
    init_prob: torch.Tensor  # (G,)
    unit_features: torch.Tensor  # (n_units, d_reward)
    true_unit_reward: torch.Tensor  # (n_units,)
    beta: float
    label_noise: float = 0.0
    max_pairs: int = 1_000_000
    _table: TrajectoryTable | None = field(default=None, repr=False)
    # exact quantities derived once per problem (oracle pair probabilities, min psi_lam references)
    derived: dict = field(default_factory=dict, repr=False)

    @property
    def horizon(self) -> int:
        return len(self.steps)

    @property
    def n_actions(self) -> int:
        return self.steps[0].ref_logp.shape[1]

    @property
    def n_units(self) -> int:
        return self.unit_features.shape[0]

    @property
    def n_groups(self) -> int:
        return self.init_prob.shape[0]

    def trajectories_per_group(self) -> int:
        """m = A^H * K^(H-1): enumeration keeps every successor, zero-probability ones too."""
        m = 1
        for h, step in enumerate(self.steps):
            m *= self.n_actions
            if h < self.horizon - 1:
                m *= step.next_idx.shape[2]
        return m

    def n_pairs(self) -> int:
        return self.n_groups * self.trajectories_per_group() ** 2

    def check_enumerable(self, where: str) -> None:
        """Refuse sizes whose exact evaluation would not fit, naming the limit."""
        pairs = self.n_pairs()
        if pairs > self.max_pairs:
            raise ConfigError(
                where,
                f"exact evaluation needs {pairs:.3g} trajectory pairs; allowed: at most "
                f"env.max_pairs={self.max_pairs:.3g}: make the environment smaller",
            )

    # --- reward tables -----------------------------------------------------------------
    def step_tables_from_units(self, unit_reward: torch.Tensor) -> list[torch.Tensor]:
        """(B, n_units) unit rewards -> per-step tables [(B, n_h, A)]; no-reward slots are 0."""
        padded = torch.cat([unit_reward, unit_reward.new_zeros(unit_reward.shape[0], 1)], 1)
        return [padded[:, step.unit_idx] for step in self.steps]

    def true_step_tables(self) -> list[torch.Tensor]:
        return self.step_tables_from_units(self.true_unit_reward[None])

    def ref_log_probs(self) -> list[torch.Tensor]:
        """pi_ref as a one-seed policy table [(1, n_h, A)]."""
        return [step.ref_logp[None] for step in self.steps]

    def flat(self) -> FlatLayout:
        """The per-step tables laid end to end (the fast path's one-index gathers); built once."""
        if "flat" not in self.derived:
            self.derived["flat"] = FlatLayout.of(self)
        return self.derived["flat"]

    # --- enumeration -------------------------------------------------------------------
    def trajectory_table(self) -> TrajectoryTable:
        """All trajectories grouped by initial state; built once, size-checked first."""
        if self._table is None:
            self.check_enumerable("env")
            self._table = _enumerate(self)
        return self._table


@dataclass
class FlatLayout:
    """Every step's (n_h, A) table stacked into one (S, A) table, S = sum_h n_h, and flattened:
    (h, s, a) has the flat index (row_offset[h] + s) * A + a. Policy tables (B, S, A) are what the
    policy network outputs before the per-step split; unit rewards are padded with a zero slot
    n_units (no reward), so r[unit_of[i]] is the reward of flat index i."""

    n_actions: int
    row_offset: list[int]  # first row of step h
    unit_of: torch.Tensor  # (S * A,) long: reward unit of each flat (h, s, a); n_units = no reward
    ref_logp: torch.Tensor  # (S * A,): log pi_ref
    init_cdf: torch.Tensor  # (G,): cumulative initial-state distribution
    next_cdf: list[torch.Tensor]  # h < H - 1: (n_h * A, K) cumulative successor probabilities of s * A + a
    next_idx: list[torch.Tensor]  # h < H - 1: (n_h * A, K) long successor states (index at step h + 1)

    @classmethod
    def of(cls, problem: TabularProblem) -> FlatLayout:
        offsets, rows = [], 0
        for step in problem.steps:
            offsets.append(rows)
            rows += step.n_states
        A, steps = problem.n_actions, problem.steps[:-1]
        return cls(
            n_actions=A, row_offset=offsets,
            unit_of=torch.cat([step.unit_idx.reshape(-1) for step in problem.steps]),
            ref_logp=torch.cat([step.ref_logp.reshape(-1) for step in problem.steps]),
            init_cdf=problem.init_prob.cumsum(-1),
            next_cdf=[step.next_prob.reshape(step.n_states * A, -1).cumsum(-1) for step in steps],
            next_idx=[step.next_idx.reshape(step.n_states * A, -1) for step in steps])


def _enumerate(problem: TabularProblem) -> TrajectoryTable:
    G, A, H = problem.n_groups, problem.n_actions, problem.horizon
    states = torch.arange(G).reshape(G, 1, 1)  # partial trajectories: (G, m, h+1)
    actions = torch.zeros(G, 1, 0, dtype=torch.long)
    log_trans = torch.zeros(G, 1, dtype=DTYPE)
    for h, step in enumerate(problem.steps):
        m = states.shape[1]
        states = states.repeat_interleave(A, dim=1)
        log_trans = log_trans.repeat_interleave(A, dim=1)
        new_a = torch.arange(A).repeat(m).expand(G, m * A)
        actions = torch.cat([actions.repeat_interleave(A, dim=1), new_a[..., None]], dim=2)
        if h == H - 1:
            break
        s, a = states[:, :, -1], actions[:, :, -1]
        K = step.next_idx.shape[2]
        nxt = step.next_idx[s, a]  # (G, m*A, K)
        lp = step.next_prob[s, a].log()
        states = torch.cat(
            [states.repeat_interleave(K, dim=1), nxt.reshape(G, -1, 1)], dim=2
        )
        actions = actions.repeat_interleave(K, dim=1)
        log_trans = (log_trans[..., None] + lp).reshape(G, -1)
    return TrajectoryTable(states=states, actions=actions, log_trans=log_trans)


def gather_shared(tables: list[torch.Tensor], states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """Sum over h of tables[h][:, states[..., h], actions[..., h]] for index tensors shared by
    all seeds. tables: [(B, n_h, A)]; states/actions: (*idx, H). Returns (B, *idx)."""
    total = 0
    for h, table in enumerate(tables):
        B, n, A = table.shape
        total = total + table.reshape(B, n * A)[:, states[..., h] * A + actions[..., h]]
    return total


def gather_per_step(tables: list[torch.Tensor], states: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """tables[h][b, states[b, i, h], actions[b, i, h]] for per-seed indices, every step kept.
    tables: [(B or 1, n_h, A)]; states/actions: (B, N, H). Returns (B, N, H)."""
    B = states.shape[0]
    out = []
    for h, table in enumerate(tables):
        _, n, A = table.shape
        flat = table.reshape(table.shape[0], n * A).expand(B, n * A)
        out.append(flat.gather(1, states[..., h] * A + actions[..., h]))
    return torch.stack(out, -1)
