"""Pieces the DPO and PPO-RLHF baselines share: PPO's clipped surrogate, GAE, per-seed advantage
normalisation, and the offline machinery (prefix grid, growing pair dataset, minibatch SGD).

Everything keeps the seed axis B first and never mixes seeds (no statistic pools over B).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ratebench.algorithms.models import Params, sgd_step, sgd_update
from ratebench.core.errors import ConfigError
from ratebench.core.grid import log_point
from ratebench.core.rng import CounterRng
from ratebench.envs.sampling import FlatTrajectories, PreferencePairs, Trajectories

# --- PPO --------------------------------------------------------------------------------------


def clipped_surrogate(logp_new: torch.Tensor, logp_old: torch.Tensor, advantage: torch.Tensor,
                      clip: float) -> torch.Tensor:
    """PPO's clipped objective to *maximise*, mean per seed over every (trajectory, step):
    E[min(rho A, clip(rho, 1 - eps, 1 + eps) A)], rho = pi_new / pi_old. Inputs (B, N, H) -> (B,)."""
    ratio = (logp_new - logp_old).exp()
    clipped = ratio.clamp(1 - clip, 1 + clip)
    return torch.minimum(ratio * advantage, clipped * advantage).flatten(1).mean(1)


def clipped_surrogate_weights(logp_new: torch.Tensor, logp_old: torch.Tensor, advantage: torch.Tensor,
                              clip: float) -> torch.Tensor:
    """clipped_surrogate's gradient in closed form: its derivative w.r.t. each log pi_new(a_t | s_t), (B, N, H).
    d rho / d log pi = rho; the min takes the unclipped term rho A where rho A <= clip(rho) A, and there the
    derivative is rho A (where the two are equal rho is inside the clip range or A = 0: autograd's halves of
    the tie add up to the same); where the clipped term is smaller it is constant in rho: 0."""
    ratio = (logp_new - logp_old).exp()
    unclipped, clipped = ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage
    return torch.where(unclipped <= clipped, unclipped, 0.0) / unclipped[0].numel()


def gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Generalised advantage estimation on finite-horizon trajectories (V after the last step = 0).

    delta_h = r_h + gamma V_{h+1} - V_h;  A_h = sum_l (gamma lam)^l delta_{h+l}. (B, N, H) -> (B, N, H)."""
    H = rewards.shape[-1]
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], -1)
    delta = rewards + gamma * next_values - values
    adv, running = torch.zeros_like(delta), torch.zeros_like(delta[..., 0])
    for h in reversed(range(H)):
        running = delta[..., h] + gamma * lam * running
        adv[..., h] = running
    return adv


def normalise_per_seed(advantage: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(A - mean) / (std + eps) over each seed's own batch (never across seeds): (B, ...) -> (B, ...)."""
    flat = advantage.flatten(1)
    mean = flat.mean(1).reshape(-1, *[1] * (advantage.dim() - 1))
    std = flat.std(1).reshape(-1, *[1] * (advantage.dim() - 1))
    return (advantage - mean) / (std + eps)


# --- offline: nested log-spaced prefixes of one dataset ----------------------------------------


def next_grid_point(current: int, per_decade: int, minimum: int) -> int:
    """Smallest even sample count > current on the grid 2 ceil(ceil(10^(j/per_decade)) / 2), at least
    `minimum` (even). Even because a pair is 2 samples; the grid matches the harness's evaluation points."""
    j = 0
    while True:
        point = log_point(j, per_decade)
        point += point % 2
        point = max(point, minimum)
        if point > current:
            return point
        j += 1


@dataclass
class PairDataset:
    """The first n labelled pairs of one stream drawn from pi_ref: (B, n, H) tensors, grown in place."""

    pairs: PreferencePairs | None = None

    @property
    def size(self) -> int:
        return 0 if self.pairs is None else self.pairs.label.shape[1]

    def extend(self, new: PreferencePairs) -> None:
        if self.pairs is None:
            self.pairs = new
            return
        cat = lambda a, b: torch.cat([a, b], 1)  # noqa: E731
        old = self.pairs
        self.pairs = PreferencePairs(
            Trajectories(cat(old.first.states, new.first.states), cat(old.first.actions, new.first.actions)),
            Trajectories(cat(old.second.states, new.second.states), cat(old.second.actions, new.second.actions)),
            cat(old.label, new.label))

    def minibatch(self, index: torch.Tensor) -> PreferencePairs:
        """Pairs at per-seed indices (B, b)."""
        take3 = lambda t: t.gather(1, index[..., None].expand(-1, -1, t.shape[2]))  # noqa: E731
        p = self.pairs
        return PreferencePairs(Trajectories(take3(p.first.states), take3(p.first.actions)),
                               Trajectories(take3(p.second.states), take3(p.second.actions)),
                               p.label.gather(1, index))


def fit_on_dataset(params: Params, loss_of_pairs, data: PairDataset, batch: int, steps: int, lr: float,
                   rng: CounterRng) -> Params:
    """Minibatch SGD to convergence on the whole dataset: `steps` steps, minibatches of `batch` pairs
    drawn uniformly with replacement per seed (CounterRng: seeds stay independent), step size decayed
    linearly from lr to 0 (TRL's default linear schedule), so the iterate settles at the empirical
    minimiser. loss_of_pairs(params, pairs) -> (B,) per-seed mean loss."""
    n = data.size
    params = [p.detach() for p in params]
    for i in range(steps):
        index = (rng.uniform(batch) * n).long().clamp_max(n - 1)  # (B, b)
        batch_pairs = data.minibatch(index)
        params = sgd_step(params, lambda p: loss_of_pairs(p, batch_pairs), lr * (1 - i / steps))
    return params


def fit_on_dataset_fast(params: Params, grad_of_minibatch, data: PairDataset, layout, batch: int, steps: int,
                        lr: float, rng: CounterRng) -> Params:
    """fit_on_dataset (the fast path): the same minibatches (every index of the refit drawn in one RNG call) and
    step sizes, each minibatch's gradient in closed form. The dataset's pairs become flat indices once per refit
    (`every`: first members, then second members, (B, 2n, H)); grad_of_minibatch(params, members, label, rows)
    -> grads, members = the minibatch's 2b trajectories (FlatTrajectories, first members then second), label
    (B, b), rows (B, 2b) their positions in `every` (for per-member values cached by the caller)."""
    n, pairs = data.size, data.pairs
    first, second = pairs.first.flat(layout), pairs.second.flat(layout)
    every = FlatTrajectories(torch.cat([first.index, second.index], 1), torch.cat([first.unit, second.unit], 1))
    rng.prefetch(steps * batch)
    params = [p.detach() for p in params]
    for i in range(steps):
        index = (rng.uniform(batch) * n).long().clamp_max(n - 1)  # (B, b): fit_on_dataset's minibatch
        rows = torch.cat([index, index + n], 1)
        grads = grad_of_minibatch(params, every.take(rows), pairs.label.gather(1, index), rows)
        params = sgd_update(params, grads, lr * (1 - i / steps))
    return params


def check_batch_fits(batch_pairs: int, first_pairs: int) -> None:
    """Offline minibatches are drawn from the dataset: the first (smallest) prefix must hold one."""
    if batch_pairs > first_pairs:
        raise ConfigError("algorithm.batch_pairs", f"must be <= algorithm.first_pairs={first_pairs} (the first "
                          f"offline prefix: a minibatch cannot be larger than the dataset), got {batch_pairs}")


def offline_steps(n_pairs: int, batch: int, epochs: float, min_steps: int) -> int:
    """SGD steps for one prefix: `epochs` passes over n_pairs in minibatches, at least min_steps."""
    return max(min_steps, math.ceil(epochs * n_pairs / batch))
