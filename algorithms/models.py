"""Small networks with parameters stacked over seeds: leading axis B everywhere.

A seed's network only ever touches its own slice, so summing per-seed losses and calling
autograd gives every seed its own gradient in one pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from ratebench.envs.tabular import DTYPE, TabularProblem
from ratebench.core.errors import ConfigError
from ratebench.envs.sampling import rows_of

Params = list[torch.Tensor]
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}
BOUND_READINGS = ("tanh", "project")


@dataclass
class NetConfig:
    kind: str = "mlp"  # "mlp"; the reward model may also be "linear" in the env's reward features, or "tabular"
    #                    (one free value per reward unit: the function-space limit of a wide network)
    width: int = 32  # hidden units per layer (the theorem's m)
    depth: int = 1  # hidden layers: 1 = the two-layer network of the neural-PG analyses
    activation: str = "relu"  # relu (as analysed) or tanh (smooth)
    # the reward model only: null (unbounded) or R > 0, the output read as R tanh(raw): every unit reward in
    # (-R, R), the bounded-reward class of the theorem's assumptions (docs/bilevel.md "Bounded rewards")
    bound: Optional[float] = None
    # how the bound is kept: "tanh" (the output map above, any kind) or "project" (a tabular reward only: the
    # table is clipped onto the box [-R, R] after every nu step, projected SGD; docs/bilevel.md "Bounded rewards")
    bound_reading: str = "tanh"


@dataclass
class ModelConfig:
    reward: NetConfig = field(default_factory=NetConfig)  # r_nu; reward_mle always uses "linear"
    policy: NetConfig = field(default_factory=NetConfig)  # pi_theta


def check_net(cfg, where: str, kinds: tuple[str, ...], may_bound: bool = False) -> None:
    """Range checks of one network's config; `may_bound`: whether this network may carry `bound`."""
    if cfg.kind not in kinds:
        raise ConfigError(f"{where}.kind", f"must be one of {list(kinds)}, got {cfg.kind!r}")
    if cfg.kind == "mlp":
        if cfg.width < 1:
            raise ConfigError(f"{where}.width", f"must be >= 1, got {cfg.width}")
        if cfg.depth < 1:
            raise ConfigError(f"{where}.depth", f"must be >= 1, got {cfg.depth}")
        if cfg.activation not in ACTIVATIONS:
            raise ConfigError(f"{where}.activation", f"must be one of {list(ACTIVATIONS)}, got {cfg.activation!r}")
    bound = getattr(cfg, "bound", None)
    if bound is not None:
        if not may_bound:
            raise ConfigError(f"{where}.bound", f"only the reward model has a bound; allowed: null, got {bound!r}")
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) or bound <= 0:
            raise ConfigError(f"{where}.bound", f"must be null (unbounded) or a finite number > 0, got {bound!r}")
    reading = getattr(cfg, "bound_reading", "tanh")
    if reading not in BOUND_READINGS:
        raise ConfigError(f"{where}.bound_reading", f"must be one of {list(BOUND_READINGS)}, got {reading!r}")
    if reading == "project" and (cfg.kind != "tabular" or bound is None):
        raise ConfigError(f"{where}.bound_reading", f"'project' clips a reward table onto [-bound, bound]: it needs "
                                                    f"{where}.kind=tabular and a bound, got kind={cfg.kind!r}, "
                                                    f"bound={bound!r}; allowed otherwise: tanh")


def _seed_generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(7919 * int(seed) + 104_729 * salt + 17)


class StackedMLP:
    """x (n, d_in) -> (B, n, d_out). Hidden layers ~ N(0, 2/fan_in); last layer optionally 0."""

    def __init__(self, sizes: list[int], activation: str, zero_last: bool = False):
        self.sizes, self.act, self.zero_last = sizes, ACTIVATIONS[activation], zero_last

    def init(self, seeds: list[int], salt: int) -> Params:
        per_seed = []
        for seed in seeds:
            gen, layers = _seed_generator(seed, salt), []
            for i, (fan_in, fan_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
                last = i == len(self.sizes) - 2
                w = torch.randn(fan_in, fan_out, generator=gen, dtype=DTYPE) * (2.0 / fan_in) ** 0.5
                if last:
                    w = torch.zeros_like(w) if self.zero_last else w / 2**0.5
                layers += [w, torch.zeros(fan_out, dtype=DTYPE)]
            per_seed.append(layers)
        return [torch.stack(group) for group in zip(*per_seed)]

    def __call__(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return self.activations(params, x)[-1]

    def activations(self, params: Params, x: torch.Tensor) -> list[torch.Tensor]:
        """The forward pass, keeping [x (B, n, d), h_1, ..., h_L] (each layer's input and the output,
        hidden ones after the activation) for the fast path's `backward`; one forward for both impls:
        bmm on the broadcast x (einsum's permutes cost more than the product at these sizes)."""
        h = x.expand(params[0].shape[0], *x.shape) if x.dim() == 2 else x  # (n, d) shared, or (B, n, d) per network
        out = [h]
        for i in range(0, len(params), 2):
            h = torch.baddbmm(params[i + 1][:, None], h, params[i])
            if i + 2 < len(params):
                h = self.act(h)
            out.append(h)
        return out

    def backward(self, params: Params, acts: list[torch.Tensor], grad_out: torch.Tensor) -> Params:
        """Gradients of sum(grad_out * output) w.r.t. params, from activations(params, x): the
        closed-form backward pass of the fast path (what autograd computes, without its graph)."""
        grads, g = [None] * len(params), grad_out
        for layer in reversed(range(len(params) // 2)):
            if layer < len(params) // 2 - 1:  # through the activation: relu' = [h > 0], tanh' = 1 - h^2
                h = acts[layer + 1]
                g = torch.ops.aten.threshold_backward(g, h, 0) if self.act is torch.relu else g * (1 - h * h)
            # dW = h^T g. Above the input it is computed as (g^T h)^T, the operand order torch's CPU bmm
            # runs 1.2x (policy) to 4x (a reward network's one output) faster at 256 seeds; for the
            # input layer the plain order was the faster one (measured with x shared, broadcast over the networks)
            inp = acts[layer]
            grads[2 * layer] = torch.bmm(inp.transpose(1, 2), g) if layer == 0 else torch.bmm(g.transpose(1, 2), inp).transpose(1, 2)
            grads[2 * layer + 1] = g.sum(1)
            if layer:
                weight = params[2 * layer]
                # dh = g W^T; with one output (a reward network) that is an outer product: a broadcast
                # multiply, not B matrix products of inner size 1 (10x faster at 256 seeds)
                g = g * weight.transpose(1, 2) if weight.shape[-1] == 1 else torch.bmm(g, weight.transpose(1, 2))
        return grads


class PolicyModel:
    """pi_theta(.|h, s) = softmax(log pi_ref + MLP(features)); the zero last layer starts it at pi_ref."""

    def __init__(self, problem: TabularProblem, cfg: NetConfig):
        check_net(cfg, "model.policy", ("mlp",))
        self.problem = problem
        self.features = torch.cat([s.policy_features for s in problem.steps], -2)  # (S, d); an InstanceBatch's (B, S, d)
        self.ref = torch.cat([s.ref_logp for s in problem.steps], -2)
        self.splits = [s.n_states for s in problem.steps]
        self.net = StackedMLP([self.features.shape[-1]] + [cfg.width] * cfg.depth + [problem.n_actions],
                              cfg.activation, zero_last=True)
        self._per_network: dict = {}  # an InstanceBatch's tables repeated for K networks per row (stack_seeds)

    def init(self, seeds: list[int], salt: int = 1) -> Params:
        return self.net.init(seeds, salt)

    def _inputs(self, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, log pi_ref) for these networks: shared tables as they are; an InstanceBatch's per-row
        tables repeated when each row has K networks (stack_seeds: row b's networks are b * K ... b * K + K - 1)."""
        if self.features.dim() == 2 or params[0].shape[0] == self.features.shape[0]:
            return self.features, self.ref
        k = params[0].shape[0] // self.features.shape[0]
        if k not in self._per_network:
            self._per_network[k] = (self.features.repeat_interleave(k, 0), self.ref.repeat_interleave(k, 0))
        return self._per_network[k]

    def log_probs(self, params: Params) -> list[torch.Tensor]:
        """Per-step log-probability tables [(B, n_h, A)]."""
        features, ref = self._inputs(params)
        logits = ref + self.net(params, features)
        return list(torch.log_softmax(logits, -1).split(self.splits, dim=1))

    def table(self, params: Params) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The fast path's forward: (log-prob table (B, S, A) of every step's states stacked, the
        network's activations for `backward`); log_probs splits the same table per step."""
        features, ref = self._inputs(params)
        acts = self.net.activations(params, features)
        return torch.log_softmax(ref + acts[-1], -1), acts

    def backward(self, params: Params, acts: list[torch.Tensor], logp: torch.Tensor, grad_logp: torch.Tensor) -> Params:
        """Gradient w.r.t. params of sum(grad_logp * logp), grad_logp (B, S * A) or (B, S, A), through
        log_softmax (d logits = g - pi sum_a g) and the network."""
        g = grad_logp.view(logp.shape)
        return self.net.backward(params, acts, g - logp.exp() * g.sum(-1, keepdim=True))


def stack_seeds(models: list[Params]) -> Params:
    """K parameter lists of B seeds -> one list of K * B networks, seed-major (seed b's k-th network is
    row b * K + k), so that a (K * B, S, A) output views as (B, K * S, A): the fast path's batched forward."""
    return [torch.stack(group, 1).flatten(0, 1) for group in zip(*models)]


def unstack_seeds(params: Params, k: int) -> list[Params]:
    """Inverse of stack_seeds (views)."""
    views = [p.view(-1, k, *p.shape[1:]) for p in params]
    return [[v[:, i] for v in views] for i in range(k)]


def bounded(raw: torch.Tensor, bound: float | None) -> torch.Tensor:
    """The reward class's output map: raw unchanged (unbounded), or bound * tanh(raw), in (-bound, bound).
    The one home of the bound's reading (docs/bilevel.md "Bounded rewards")."""
    return raw if bound is None else bound * torch.tanh(raw)


class RewardModel:
    """r_nu on the env's reward units: linear nu . phi(u), an MLP on phi(u), or a table (linear in one-hot
    unit features: nu is the unit rewards); with cfg.bound = R either the output is R tanh(.) of that (every
    unit reward in (-R, R)) or, bound_reading "project", the table stays in the box [-R, R] by projection."""

    def __init__(self, problem: TabularProblem, cfg: NetConfig):
        check_net(cfg, "model.reward", ("mlp", "linear", "tabular"), may_bound=True)
        self.problem = problem
        self.kind = cfg.kind
        self.features = unit_features(problem, cfg.kind)  # phi(u), or the identity for a table
        d = self.features.shape[-1]
        bound = getattr(cfg, "bound", None)
        projected = getattr(cfg, "bound_reading", "tanh") == "project"
        self.bound = None if projected else bound  # the output map's R (None: the output is the raw value)
        self.box = bound if projected else None  # the projection's R (None: no projection)
        self.net = None if cfg.kind in ("linear", "tabular") else StackedMLP([d] + [cfg.width] * cfg.depth + [1],
                                                                               cfg.activation)

    def project(self, params: Params) -> Params:
        """The projection of projected SGD onto the box (identity without one): nu <- clip(nu, -R, R)."""
        return params if self.box is None else [p.clamp(-self.box, self.box) for p in params]

    def gradient_mapping(self, params: Params, grads: Params) -> Params:
        """The projected gradient with a unit step, nu - clip(nu - grad, -R, R) (the measure L-BFGS-B stops on):
        0 exactly at a KKT point of the box, the gradient itself inside it and without a box."""
        if self.box is None:
            return grads
        return [p - (p - g).clamp(-self.box, self.box) for p, g in zip(params, grads)]

    def init(self, seeds: list[int], salt: int = 2) -> Params:
        if self.net is None:
            return [torch.zeros(len(seeds), self.features.shape[-1], dtype=DTYPE)]
        return self.net.init(seeds, salt)

    def unit_rewards(self, params: Params) -> torch.Tensor:
        """(B, n_units)."""
        return bounded(self._raw(params), self.bound)

    def _raw(self, params: Params) -> torch.Tensor:
        """The model's output before the bound: (B, n_units)."""
        if self.net is None:
            features = self.features
            if features.dim() == 3:  # an InstanceBatch: each row its own instance's features
                return torch.bmm(features, params[0][..., None]).squeeze(-1)
            return params[0] @ features.T
        return self.net(params, self.features).squeeze(-1)

    def step_tables(self, params: Params) -> list[torch.Tensor]:
        return self.problem.step_tables_from_units(self.unit_rewards(params))

    def units(self, params: Params) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """The fast path's forward: (unit rewards (B, n_units), activations for `backward`; with a bound and a
        linear model, [raw output], which the bound's derivative needs)."""
        if self.net is None:
            raw = self._raw(params)
            return bounded(raw, self.bound), (None if self.bound is None else [raw[..., None]])
        acts = self.net.activations(params, self.features)
        return bounded(acts[-1].squeeze(-1), self.bound), acts

    def visited_units(self, params: Params, unit: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The fast path's forward on the units some trajectories visit, not on the whole table (an MLP
        reward): unit (B, N, H), the trajectories' padded-unit indices (n_units = pays nothing). Returns
        (padded unit rewards (B, n_units + 1), right at the visited units and 0 in the no-reward slot,
        elsewhere 0 but never read by these trajectories; the network's activations, one row per step,
        for `backward` with FlatTrajectories.return_grad_per_step)."""
        features = self.features
        n_units, B = features.shape[-2], unit.shape[0]
        flat = unit.reshape(B, -1)
        acts = self.net.activations(params, rows_of(features, flat.clamp_max(n_units - 1)))  # x: (B, N * H, d)
        table = acts[-1].new_zeros(B, n_units + 1)
        table.scatter_(1, flat, bounded(acts[-1].squeeze(-1), self.bound))  # a unit visited twice gets its one value twice
        table[:, -1] = 0  # the no-reward steps evaluated the last unit's features: their slot pays nothing
        return table, acts

    def backward(self, params: Params, acts: list[torch.Tensor] | None, grad_units: torch.Tensor) -> Params:
        """Gradient w.r.t. params of sum(grad_units * unit_rewards), grad_units (B, n_units); after
        `visited_units`, of sum(grad_units * the rewards at the visited steps), grad_units (B, N * H).
        With a bound, through d(R tanh x)/dx = R (1 - tanh^2 x) at the raw outputs kept in acts."""
        if self.bound is not None:
            t = torch.tanh(acts[-1].squeeze(-1))
            grad_units = grad_units * (self.bound * (1 - t * t))
        if self.net is None:
            features = self.features
            if features.dim() == 3:
                return [torch.bmm(grad_units[:, None], features).squeeze(1)]
            return [grad_units @ features]
        return self.net.backward(params, acts, grad_units[..., None])


def unit_features(problem: TabularProblem, kind: str) -> torch.Tensor:
    """The reward model's inputs per unit: the env's features phi(u) (n_units, d) (an InstanceBatch: (B, n_units,
    d)), or for a tabular reward the one-hot units, so that nu . e_u = nu_u is the unit's reward."""
    features = problem.unit_features
    if kind != "tabular":
        return features
    eye = torch.eye(features.shape[-2], dtype=features.dtype)
    return eye.expand(features.shape[0], -1, -1).contiguous() if features.dim() == 3 else eye


def sgd_step(params: Params, loss_of, lr: float | torch.Tensor) -> Params:
    """One plain SGD step (the analysed method): p <- p - lr * grad of loss_of(params).sum().
    loss_of returns per-seed losses (B,); the seeds' parameters are disjoint, so the gradient of the
    sum is each seed's own gradient. A negative lr ascends. Returns new, detached parameters."""
    grads = seed_gradients(loss_of, params)
    with torch.no_grad():
        return sgd_update(params, grads, lr)


def seed_gradients(loss_of, params: Params) -> Params:
    """Each seed's gradient of loss_of(params) (B,) at params: the seeds' parameters are disjoint, so the gradient
    of the sum is each seed's own."""
    params = [p.detach().requires_grad_(True) for p in params]
    return list(torch.autograd.grad(loss_of(params).sum(), params))


def sgd_update(params: Params, grads: Params, lr: float) -> Params:
    """The update of sgd_step with given gradients (the fast path): p <- p - lr * g."""
    return [p - lr * g for p, g in zip(params, grads)]


def per_seed_sq_norm(tensors: Params) -> torch.Tensor:
    """sum of squares per seed over a list of (B, ...) tensors: (B,)."""
    return sum(t.reshape(t.shape[0], -1).pow(2).sum(1) for t in tensors)
