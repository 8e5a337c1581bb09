"""Pieces the environment builders share: validated knobs, the random teacher, pi_ref."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ratebench.core.errors import ConfigError
from ratebench.envs.tabular import DTYPE

TEACHERS = ("linear", "neural")


@dataclass
class CommonEnvConfig:
    """Knobs every environment has. Documented defaults; all validated in `check_common`."""

    name: str = "bandit"
    instance_seed: int = 0  # draws features, teacher, pi_ref, transitions (not algorithm seeds)
    beta: float = 1.0  # KL weight of the lower level (> 0)
    teacher: str = "linear"  # true reward: "linear" in the reward features, or a random "neural" MLP
    teacher_width: int = 16  # hidden width of the neural teacher
    reward_scale: float = 1.0  # std of the true reward over units
    ref_scale: float = 1.0  # std of pi_ref's random logits (larger = more peaked reference)
    ref_misalignment: float = 0.0  # >0 tilts pi_ref away from high true reward (poor coverage of the optimum)
    label_noise: float = 0.0  # probability that the BT oracle flips a label, in [0, 0.5)
    max_pairs: int = 1_000_000  # exact evaluation refuses to enumerate more trajectory pairs


def check_common(cfg, sizes: dict[str, int]) -> None:
    for name in ("beta", "reward_scale", "ref_scale", "ref_misalignment", "label_noise"):
        if not math.isfinite(getattr(cfg, name)):
            raise ConfigError(f"env.{name}", f"must be a finite number, got {getattr(cfg, name)}")
    if not cfg.beta > 0:
        raise ConfigError("env.beta", f"must be > 0, got {cfg.beta}")
    if cfg.teacher not in TEACHERS:
        raise ConfigError("env.teacher", f"must be one of {list(TEACHERS)}, got {cfg.teacher!r}")
    if not 0 <= cfg.label_noise < 0.5:
        raise ConfigError("env.label_noise", f"must be in [0, 0.5), got {cfg.label_noise}")
    if not cfg.reward_scale > 0:
        raise ConfigError("env.reward_scale", f"must be > 0, got {cfg.reward_scale}")
    if cfg.ref_scale < 0:
        raise ConfigError("env.ref_scale", f"must be >= 0, got {cfg.ref_scale}")
    if cfg.teacher_width < 1:
        raise ConfigError("env.teacher_width", f"must be >= 1, got {cfg.teacher_width}")
    if cfg.max_pairs < 1:
        raise ConfigError("env.max_pairs", f"must be >= 1, got {cfg.max_pairs}")
    for field, value in sizes.items():
        if value < 2:
            raise ConfigError(f"env.{field}", f"must be >= 2, got {value}")


def check_pairs(cfg, n_pairs: int, sizes: str) -> None:
    """Exact evaluation enumerates every trajectory pair: refuse sizes that would not fit."""
    if n_pairs > cfg.max_pairs:
        raise ConfigError(
            "env", f"{cfg.name} with {sizes} needs {n_pairs:.3g} trajectory pairs for exact evaluation; "
            f"allowed: at most env.max_pairs={cfg.max_pairs:.3g}: make the environment smaller")


def generator(cfg, salt: int) -> torch.Generator:
    """Independent deterministic stream per (instance_seed, purpose)."""
    return torch.Generator().manual_seed(1_000_003 * cfg.instance_seed + salt)


def teacher_reward(cfg, features: torch.Tensor) -> torch.Tensor:
    """True reward of each unit, normalised to std `reward_scale`: (n_units,)."""
    gen = generator(cfg, 11)
    d = features.shape[1]
    if cfg.teacher == "linear":
        raw = features @ torch.randn(d, generator=gen, dtype=DTYPE)
    else:
        w1 = torch.randn(d, cfg.teacher_width, generator=gen, dtype=DTYPE) / d**0.5
        b1 = torch.randn(cfg.teacher_width, generator=gen, dtype=DTYPE) * 0.5
        w2 = torch.randn(cfg.teacher_width, generator=gen, dtype=DTYPE)
        raw = torch.tanh(features @ w1 + b1) @ w2
    raw = raw - raw.mean()
    return cfg.reward_scale * raw / raw.std().clamp_min(1e-12)


def reference_logp(cfg, n: int, n_actions: int, tilt: torch.Tensor | None = None) -> torch.Tensor:
    """Random softmax pi_ref: (n, A) log-probs; `tilt` (n, A) is subtracted times ref_misalignment."""
    logits = cfg.ref_scale * torch.randn(n, n_actions, generator=generator(cfg, 23), dtype=DTYPE)
    if tilt is not None and cfg.ref_misalignment:
        centred = tilt - tilt.mean(-1, keepdim=True)
        logits = logits - cfg.ref_misalignment * centred / centred.std().clamp_min(1e-12)
    return torch.log_softmax(logits, dim=-1)


def one_hot(index: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(index, n).to(DTYPE)
