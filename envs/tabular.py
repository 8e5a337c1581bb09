"""The one finite-horizon tabular structure every environment compiles to.

A bandit is H = 1, a token task is an MDP whose state is the prefix; exact solvers, the
sampler and trajectory enumeration are written once against this structure.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ratebench.core.errors import ConfigError

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
        return self.unit_idx.shape[0]


@dataclass
class TrajectoryTable:
    """Every trajectory, grouped by initial state g (G groups of equal size m).

    A preference pair is two trajectories from the same initial state (same prompt).
    """

    states: torch.Tensor  # (G, m, H) long
    actions: torch.Tensor  # (G, m, H) long
    log_trans: torch.Tensor  # (G, m): sum of log transition probabilities (given g)
    # per step h, the flat index s * A + a of every trajectory's (state, action) in that step's (n_h A) row, (G m,),
    # or None where it is every entry of the row in order (a bandit: trajectory i of group g is (g, i))
    step_index: list

    def gather(self, tables: list[torch.Tensor]) -> torch.Tensor:
        """Sum over h of tables[h][:, states[..., h], actions[..., h]] (tables [(B, n_h, A)]): (B, G, m), a tensor of
        its own. A step read in order is a view rather than an indexed copy: the evaluation reads the trajectories'
        returns and log-probabilities of a few hundred rows several times per pass, and indexing them cost more than
        the rest of such a read."""
        shape, total = self.states.shape[:-1], None
        for table, index in zip(tables, self.step_index):
            row = table.reshape(table.shape[0], -1)
            value = (row if index is None else row[:, index]).reshape(table.shape[0], *shape)
            total = value if total is None else total + value
        return total.clone() if len(tables) == 1 and self.step_index[0] is None else total  # never a view of tables


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
    # the global reference F* must be exact (every face of the reward enumerated, envs/global_ref.py) or the
    # run is refused, never a multistart estimate: set by an environment whose size checks guarantee it (bandit)
    exact_reference: bool = False
    _table: TrajectoryTable | None = field(default=None, repr=False)
    # exact quantities derived once per problem (oracle pair probabilities, min psi_lam references)
    derived: dict = field(default_factory=dict, repr=False)

    @property
    def horizon(self) -> int:
        return len(self.steps)

    @property
    def n_actions(self) -> int:
        return self.steps[0].unit_idx.shape[1]

    @property
    def n_units(self) -> int:
        return self.unit_features.shape[-2]

    @property
    def n_groups(self) -> int:
        return self.init_prob.shape[-1]

    @property
    def batched(self) -> bool:
        """True for an InstanceBatch: every instance-dependent table has a leading row axis (B, ...)."""
        return self.init_prob.dim() == 2

    def trajectories_per_group(self) -> int:
        """m = A^H * K^(H-1): enumeration keeps every successor, zero-probability ones too."""
        m = 1
        for h, step in enumerate(self.steps):
            m *= self.n_actions
            if h < self.horizon - 1:
                m *= step.next_idx.shape[-1]
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
        return self.step_tables_from_units(_rows(self.true_unit_reward, 1))

    def ref_log_probs(self) -> list[torch.Tensor]:
        """pi_ref as a one-seed policy table [(1, n_h, A)] (an InstanceBatch: one per row, (B, n_h, A))."""
        return [_rows(step.ref_logp, 2) for step in self.steps]

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
        """An InstanceBatch's layout keeps its row axis: ref_logp (B, S * A), init_cdf (B, G), next_* (B, n_h * A, K)."""
        offsets, rows = [], 0
        for step in problem.steps:
            offsets.append(rows)
            rows += step.n_states
        A, steps = problem.n_actions, problem.steps[:-1]
        lead = problem.init_prob.shape[:-1]  # () or (B,)
        return cls(
            n_actions=A, row_offset=offsets,
            unit_of=torch.cat([step.unit_idx.reshape(-1) for step in problem.steps]),
            ref_logp=torch.cat([step.ref_logp.reshape(*lead, -1) for step in problem.steps], -1),
            init_cdf=problem.init_prob.cumsum(-1),
            next_cdf=[step.next_prob.reshape(*lead, step.n_states * A, -1).cumsum(-1) for step in steps],
            next_idx=[step.next_idx.reshape(*lead, step.n_states * A, -1) for step in steps])


def _rows(table: torch.Tensor, dims: int) -> torch.Tensor:
    """A table with `dims` dimensions per row as (rows, ...): a shared one gets a leading axis of 1,
    an InstanceBatch's (B, ...) is returned as it is."""
    return table if table.dim() > dims else table[None]


class InstanceBatch(TabularProblem):
    """Several instances of one environment (same sizes, different env.instance_seed) as one problem whose
    batch rows are (instance, seed) pairs: every instance-dependent table gets a leading row axis B, row b
    holding the tables of instance `row_instance[b]`. What a seed computes on it is what it computes on its
    own instance; an algorithm that cannot step it says why (Algorithm.instance_batch_refusal). Exact evaluation
    is per instance, on the instance's own problem (the harness slices the rows)."""

    def __init__(self, instances: list[TabularProblem], row_instance: torch.Tensor):
        first = instances[0]
        for other in instances[1:]:
            if (other.name, other.horizon, other.n_actions, other.n_units, other.n_groups) != \
                    (first.name, first.horizon, first.n_actions, first.n_units, first.n_groups) or \
                    not all(torch.equal(a.unit_idx, b.unit_idx) and a.next_idx.shape == b.next_idx.shape
                            and a.policy_features.shape == b.policy_features.shape
                            for a, b in zip(first.steps, other.steps)) or \
                    (other.beta, other.label_noise) != (first.beta, first.label_noise):
                raise ValueError("an instance batch needs instances of one environment with the same sizes, beta and "
                                 "label noise")

        def per_row(tables: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(tables)[row_instance]

        steps = [Step(policy_features=per_row([p.steps[h].policy_features for p in instances]),
                      ref_logp=per_row([p.steps[h].ref_logp for p in instances]),
                      unit_idx=step.unit_idx,  # the structure is shared
                      next_idx=per_row([p.steps[h].next_idx for p in instances]),
                      next_prob=per_row([p.steps[h].next_prob for p in instances]))
                 for h, step in enumerate(first.steps)]
        super().__init__(name=first.name, steps=steps, init_prob=per_row([p.init_prob for p in instances]),
                         unit_features=per_row([p.unit_features for p in instances]),
                         true_unit_reward=per_row([p.true_unit_reward for p in instances]),
                         beta=first.beta, label_noise=first.label_noise, max_pairs=first.max_pairs,
                         exact_reference=first.exact_reference)

    def trajectory_table(self) -> TrajectoryTable:
        raise TypeError("an instance batch is not enumerated: evaluate each instance on its own problem")


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
    step_index = []
    for h, step in enumerate(problem.steps):
        index = (states[..., h] * A + actions[..., h]).reshape(-1)
        in_order = index.numel() == step.n_states * A and bool((index == torch.arange(index.numel())).all())
        step_index.append(None if in_order else index)
    return TrajectoryTable(states=states, actions=actions, log_trans=log_trans, step_index=step_index)


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
