"""LLM-shaped task: sequences of L tokens over a vocabulary of V; the state is the prefix.

Transitions are deterministic; the reward is paid once, on the whole sequence, so reward
units are the V^L sequences (one-hot per position as features). All V^L enumerated exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ratebench.envs.common import CommonEnvConfig, check_common, check_pairs, one_hot, reference_logp, teacher_reward
from ratebench.envs.spec import EnvSpec
from ratebench.envs.tabular import DTYPE, Step, TabularProblem
from ratebench.core.errors import ConfigError


@dataclass
class TokenConfig(CommonEnvConfig):
    name: str = "token"
    teacher: str = "neural"  # a random teacher network scores the whole sequence
    vocab: int = 3  # V
    length: int = 3  # L
    max_states: int = 200_000  # refuse vocab/length whose prefix tree is larger


def _digits(index: torch.Tensor, V: int, L: int) -> torch.Tensor:
    """Base-V digits of prefix indices, most significant first: (n,) -> (n, L)."""
    powers = V ** torch.arange(L - 1, -1, -1)
    return (index[:, None] // powers) % V


def sizes(cfg: TokenConfig) -> tuple[int, int, int]:
    """(reward units, trajectory pairs of exact evaluation, horizon), from the config alone."""
    V, L = cfg.vocab, cfg.length
    return sum(V**h for h in range(L)) * V, V ** (2 * L), L


def check(cfg: TokenConfig) -> None:
    """Every size/range check, from the config alone (no tensors built)."""
    check_common(cfg, {"vocab": cfg.vocab, "length": cfg.length})
    V, L = cfg.vocab, cfg.length
    n_prefixes = sum(V**h for h in range(L))
    if n_prefixes > cfg.max_states:
        raise ConfigError("env", f"vocab={V}, length={L} gives {n_prefixes:.3g} prefix states; allowed: at most "
                          f"env.max_states={cfg.max_states:.3g}: use a smaller env.vocab or env.length")
    check_pairs(cfg, sizes(cfg)[1], f"vocab={V}, length={L}")


def build(cfg: TokenConfig) -> TabularProblem:
    check(cfg)
    V, L = cfg.vocab, cfg.length
    n_prefixes = sum(V**h for h in range(L))
    sequences = _digits(torch.arange(V**L), V, L)  # (V^L, L)
    unit_features = one_hot(sequences, V).reshape(V**L, L * V)
    true_reward = teacher_reward(cfg, unit_features)
    seq_reward_by_prefix = true_reward.reshape(-1, V)  # tilt pi_ref's last step only
    ref_all = reference_logp(cfg, n_prefixes, V)
    steps, offset = [], 0
    for h in range(L):
        n = V**h
        prefix = torch.arange(n)
        tokens = _digits(prefix, V, h) if h else torch.zeros(1, 0, dtype=torch.long)
        encoding = torch.zeros(n, L * V, dtype=DTYPE)
        if h:
            encoding[:, : h * V] = one_hot(tokens, V).reshape(n, h * V)
        ref = ref_all[offset:offset + n]
        if h == L - 1 and cfg.ref_misalignment:
            ref = _tilted(cfg, ref, seq_reward_by_prefix)
        steps.append(Step(
            policy_features=torch.cat([encoding, one_hot(torch.full((n,), h), L)], 1),
            ref_logp=ref,
            unit_idx=(prefix[:, None] * V + torch.arange(V)) if h == L - 1 else torch.full((n, V), V**L),
            next_idx=(prefix[:, None] * V + torch.arange(V))[..., None],
            next_prob=torch.ones(n, V, 1, dtype=DTYPE),
        ))
        offset += n
    problem = TabularProblem(
        name="token", steps=steps, init_prob=torch.ones(1, dtype=DTYPE),
        unit_features=unit_features, true_unit_reward=true_reward, beta=cfg.beta,
        label_noise=cfg.label_noise, max_pairs=cfg.max_pairs,
    )
    return problem


def _tilted(cfg, ref_logp: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
    centred = reward - reward.mean(-1, keepdim=True)
    logits = ref_logp - cfg.ref_misalignment * centred / centred.std().clamp_min(1e-12)
    return torch.log_softmax(logits, -1)


SPEC = EnvSpec(TokenConfig, check, build, sizes)  # the environment contract (envs/spec.py)
