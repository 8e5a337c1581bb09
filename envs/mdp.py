"""Random finite-horizon MDP: S states, A actions, horizon H, Dirichlet transitions.

Preferences compare whole trajectories from the same initial state. Reward units are
(h, s, a) with features phi(s, a) + one-hot(h); the true reward depends on (s, a) only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ratebench.envs.common import CommonEnvConfig, check_common, check_pairs, generator, one_hot, reference_logp, teacher_reward
from ratebench.envs.spec import EnvSpec
from ratebench.envs.tabular import DTYPE, Step, TabularProblem
from ratebench.core.errors import ConfigError


@dataclass
class MDPConfig(CommonEnvConfig):
    name: str = "mdp"
    n_states: int = 4  # S
    n_actions: int = 2  # A
    horizon: int = 3  # H (>= 2; use the bandit for H = 1)
    feature_dim: int = 4  # d of phi(s, a)
    transition_concentration: float = 1.0  # Dirichlet alpha of P(.|s, a): small = near-deterministic


def sizes(cfg: MDPConfig) -> tuple[int, int, int]:
    """(reward units, trajectory pairs of exact evaluation, horizon), from the config alone."""
    S, A, H = cfg.n_states, cfg.n_actions, cfg.horizon
    per_start = A**H * S ** (H - 1)  # trajectories from one initial state
    return H * S * A, S * per_start**2, H


def check(cfg: MDPConfig) -> None:
    """Every size/range check, from the config alone (no tensors built)."""
    check_common(cfg, {"n_states": cfg.n_states, "n_actions": cfg.n_actions, "horizon": cfg.horizon})
    if cfg.feature_dim < 1:
        raise ConfigError("env.feature_dim", f"must be >= 1, got {cfg.feature_dim}")
    if not cfg.transition_concentration > 0:
        raise ConfigError("env.transition_concentration", f"must be > 0, got {cfg.transition_concentration}")
    check_pairs(cfg, sizes(cfg)[1], f"n_states={cfg.n_states}, n_actions={cfg.n_actions}, horizon={cfg.horizon}")


def build(cfg: MDPConfig) -> TabularProblem:
    check(cfg)
    S, A, H = cfg.n_states, cfg.n_actions, cfg.horizon
    sa_features = torch.randn(S * A, cfg.feature_dim, generator=generator(cfg, 5), dtype=DTYPE)
    sa_reward = teacher_reward(cfg, sa_features)  # (S*A,), stationary true reward
    # units (h, s, a): features phi(s, a) ++ one-hot(h)
    unit_features = torch.cat(
        [sa_features.repeat(H, 1), one_hot(torch.arange(H).repeat_interleave(S * A), H)], dim=1)
    true_unit = sa_reward.repeat(H)
    alpha = torch.full((S,), cfg.transition_concentration, dtype=DTYPE)
    gam = _gamma(alpha.expand(S * A, S), generator(cfg, 31))
    P = (gam / gam.sum(-1, keepdim=True)).reshape(S, A, S)
    ref = reference_logp(cfg, H * S, A, tilt=sa_reward.reshape(S, A).repeat(H, 1))
    steps = [
        Step(
            policy_features=torch.cat([one_hot(torch.arange(S), S), one_hot(torch.full((S,), h), H)], 1),
            ref_logp=ref[h * S:(h + 1) * S],
            unit_idx=h * S * A + torch.arange(S * A).reshape(S, A),
            next_idx=torch.arange(S).expand(S, A, S).contiguous(),
            next_prob=P,
        )
        for h in range(H)
    ]
    problem = TabularProblem(
        name="mdp", steps=steps, init_prob=torch.full((S,), 1.0 / S, dtype=DTYPE),
        unit_features=unit_features, true_unit_reward=true_unit, beta=cfg.beta,
        label_noise=cfg.label_noise, max_pairs=cfg.max_pairs,
    )
    return problem


def _gamma(alpha: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Seeded Gamma(alpha, 1) draws (torch's Dirichlet takes no generator): Marsaglia-Tsang."""
    boost = alpha < 1
    a = torch.where(boost, alpha + 1, alpha)
    d = a - 1.0 / 3
    c = 1 / (9 * d).sqrt()
    out = torch.empty_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    while todo.any():
        x = torch.randn(a.shape, generator=gen, dtype=DTYPE)
        u = torch.rand(a.shape, generator=gen, dtype=DTYPE)
        v = (1 + c * x) ** 3
        ok = (v > 0) & (u.log() < 0.5 * x**2 + d - d * v + d * v.clamp_min(1e-300).log()) & todo
        out = torch.where(ok, d * v, out)
        todo = todo & ~ok
    u = torch.rand(a.shape, generator=gen, dtype=DTYPE)
    return torch.where(boost, out * u ** (1 / alpha), out)


SPEC = EnvSpec(MDPConfig, check, build, sizes)  # the environment contract (envs/spec.py)
