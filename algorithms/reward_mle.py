"""reward_mle: SGD on the Bradley-Terry log-likelihood of a linear reward, pairs from pi_ref.

The control of SPEC §7: with a realisable linear reward, a fixed sampling policy and step
c / (t + t0), E[reward_err] decays like 1/t, so its sample-complexity exponent is exactly 1.
Deployed policy: pi*_nu, the exact soft-optimal policy of the current reward estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ratebench.algorithms.base import Algorithm
from ratebench.algorithms.models import NetConfig, RewardModel, sgd_step
from ratebench.envs.exact import bradley_terry_nll, soft_optimal, trajectory_returns, trajectory_probs
from ratebench.errors import ConfigError


@dataclass
class RewardMLEConfig:
    name: str = "reward_mle"
    batch_pairs: int = 4  # labelled pairs from pi_ref per step (2 samples + 1 query each)
    lr_scale: float = 2.0  # c = lr_scale / mu, mu = smallest non-zero eigenvalue of the BT Fisher at nu*;
    #                        c * mu > 1/2 is what gives the 1/t rate, 2 leaves margin
    t0: float = 10.0  # offset of c / (t + t0); raised to c * lambda_max if needed for stability

    def check(self) -> None:
        if self.batch_pairs < 1:
            raise ConfigError("algorithm.batch_pairs", f"must be >= 1, got {self.batch_pairs}")
        if not self.lr_scale > 0:
            raise ConfigError("algorithm.lr_scale", f"must be > 0, got {self.lr_scale}")
        if self.t0 < 0:
            raise ConfigError("algorithm.t0", f"must be >= 0, got {self.t0}")


@dataclass
class RewardMLEState:
    nu: list[torch.Tensor]
    t: int = 0
    lr: float = 0.0


class RewardMLE(Algorithm):
    name = "reward_mle"
    Config = RewardMLEConfig

    def __init__(self, cfg, model_cfg, problem):
        super().__init__(cfg, model_cfg, problem)
        self.model = RewardModel(problem, NetConfig(kind="linear"))
        mu, lam_max = _fisher_spectrum(problem)
        self.c = cfg.lr_scale / mu
        self.t0 = max(cfg.t0, self.c * lam_max)

    def init(self, seeds):
        return RewardMLEState(nu=self.model.init(seeds))

    def step(self, state, sampler):
        ref = self.problem.ref_log_probs()
        pairs = sampler.pairs(ref, self.cfg.batch_pairs)
        def bt_loss(nu):  # mean BT negative log-likelihood over the pairs, per seed
            rewards = self.model.step_tables(nu)
            margin = pairs.first.returns(rewards) - pairs.second.returns(rewards)
            return bradley_terry_nll(margin, pairs.label).mean(1)

        state.lr = self.c / (state.t + self.t0)  # step c / (t + t0)
        state.nu = sgd_step(state.nu, bt_loss, state.lr)
        state.t += 1
        return state

    def policy_log_probs(self, state):
        return soft_optimal(self.problem, self.model.step_tables(state.nu))[0]

    def reward_model(self, state):
        return self.model, state.nu

    def schedule(self, state):
        return {"lr": state.lr}


def _fisher_spectrum(problem) -> tuple[float, float]:
    """Smallest non-zero and largest eigenvalue of E_ref[sigma'(dR*) dPhi dPhi^T], the BT
    Fisher information of the linear reward at the truth (exact, by enumeration)."""
    feats = problem.unit_features.T  # (d, n_units): each feature dimension as a unit reward
    phi = trajectory_returns(problem, problem.step_tables_from_units(feats))  # (d, G, m)
    true = trajectory_returns(problem, problem.true_step_tables())[0]  # (G, m)
    q = trajectory_probs(problem, problem.ref_log_probs())[0]  # (G, m)
    dphi = phi[:, :, :, None] - phi[:, :, None, :]  # (d, G, m, m)
    s = torch.sigmoid(true[:, :, None] - true[:, None, :])
    w = problem.init_prob[:, None, None] * q[:, :, None] * q[:, None, :] * s * (1 - s)
    fisher = torch.einsum("gij,agij,bgij->ab", w, dphi, dphi)
    eig = torch.linalg.eigvalsh(fisher)
    positive = eig[eig > 1e-9 * eig.max()]
    return float(positive.min()), float(eig.max())
ALGORITHM = RewardMLE
