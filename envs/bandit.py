"""Contextual bandit (H = 1): X contexts, A actions, random reward features phi(x, a)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ratebench.envs.common import CommonEnvConfig, check_common, check_pairs, generator, one_hot, reference_logp, teacher_reward
from ratebench.envs.global_ref import MAX_FACE_SIZE
from ratebench.envs.spec import EnvSpec
from ratebench.envs.tabular import DTYPE, Step, TabularProblem
from ratebench.core.errors import ConfigError


@dataclass
class BanditConfig(CommonEnvConfig):
    name: str = "bandit"
    n_contexts: int = 8  # X, uniform context distribution
    n_actions: int = 6  # A
    feature_dim: int = 4  # d of the reward features phi(x, a) ~ N(0, I)


def sizes(cfg: BanditConfig) -> tuple[int, int, int]:
    """(reward units, trajectory pairs of exact evaluation, horizon), from the config alone."""
    return cfg.n_contexts * cfg.n_actions, cfg.n_contexts * cfg.n_actions**2, 1


def check(cfg: BanditConfig) -> None:
    """Every size/range check, from the config alone (no tensors built)."""
    check_common(cfg, {"n_contexts": cfg.n_contexts, "n_actions": cfg.n_actions})
    if cfg.feature_dim < 1:
        raise ConfigError("env.feature_dim", f"must be >= 1, got {cfg.feature_dim}")
    if cfg.n_actions > MAX_FACE_SIZE:  # the exact global reference F* enumerates 2^A - 1 faces per context
        raise ConfigError("env.n_actions", f"must be <= {MAX_FACE_SIZE} (the exact global reference enumerates "
                          f"2^A - 1 faces per context), got {cfg.n_actions}")
    check_pairs(cfg, sizes(cfg)[1], f"n_contexts={cfg.n_contexts}, n_actions={cfg.n_actions}")


def build(cfg: BanditConfig) -> TabularProblem:
    check(cfg)
    X, A = cfg.n_contexts, cfg.n_actions
    features = torch.randn(X * A, cfg.feature_dim, generator=generator(cfg, 5), dtype=DTYPE)
    true_reward = teacher_reward(cfg, features)
    step = Step(
        policy_features=one_hot(torch.arange(X), X),
        ref_logp=reference_logp(cfg, X, A, tilt=true_reward.reshape(X, A)),
        unit_idx=torch.arange(X * A).reshape(X, A),
        next_idx=torch.zeros(X, A, 1, dtype=torch.long),
        next_prob=torch.ones(X, A, 1, dtype=DTYPE),
    )
    problem = TabularProblem(
        name="bandit", steps=[step], init_prob=torch.full((X,), 1.0 / X, dtype=DTYPE),
        unit_features=features, true_unit_reward=true_reward, beta=cfg.beta,
        label_noise=cfg.label_noise, max_pairs=cfg.max_pairs, exact_reference=True,
    )
    return problem


SPEC = EnvSpec(BanditConfig, check, build, sizes)  # the environment contract (envs/spec.py)
