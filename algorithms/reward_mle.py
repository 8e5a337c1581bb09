"""reward_mle: SGD on the Bradley-Terry log-likelihood of a linear reward, pairs from pi_ref.

The controls of docs/analysis.md: with a realisable linear reward, a fixed sampling policy and step
c / (t + t0)^a, E[reward_err] decays like t^-a (Moulines & Bach 2011; a = 1 needs c mu > 1/2),
so its sample-complexity exponent is exactly 1/a: 1 for the default a = 1, 4/3, 3/2 for a = 3/4, 2/3.
Deployed policy: pi*_nu, the exact soft-optimal policy of the current reward estimate.

Diagnostic `reward_err_noise` (`predicted_metrics`, recorded by the harness at evaluation points; label_noise = 0
only): E[reward_err] of the linearised SGD around the truth started at the truth, i.e. the noise term the t^-a
rate is the rate of, exact for this recursion (docs/analysis.md, "The algorithm's noise term"). A run whose reward_err is still
well above it is not yet in the regime where the rate holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from ratebench.algorithms.base import Algorithm
from ratebench.algorithms.estimators import preference_loss_weights
from ratebench.algorithms.models import NetConfig, RewardModel, sgd_step, sgd_update
from ratebench.algorithms.targets import bt_mle_target
from ratebench.envs.exact import (bradley_terry_nll, pair_feature_differences, soft_optimal, trajectory_returns,
                                  trajectory_probs)
from ratebench.core.errors import ConfigError
from ratebench.envs.sampling import padded_units, policy_cdf


@dataclass
class RewardMLEConfig:
    name: str = "reward_mle"
    batch_pairs: int = 4  # labelled pairs from pi_ref per step (2 samples + 1 query each)
    lr_scale: float = 2.0  # c = lr_scale / mu, mu = smallest non-zero eigenvalue of the BT Fisher at nu*;
    #                        c * mu > 1/2 is what gives the 1/t rate, 2 leaves margin
    t0: float = 10.0  # offset of c / (t + t0)^a; raised to (c * lambda_max)^(1/a) if needed, so that the
    #                   first step c / t0^a is at most 1 / lambda_max (stable on the noiseless quadratic)
    lr_exponent: float = 1.0  # a in c / (t + t0)^a, in (1/2, 1]: E[reward_err] ~ t^-a, exponent 1/a
    #                          (Moulines & Bach 2011); 1 is the classic 1/t control

    def check(self) -> None:
        if self.batch_pairs < 1:
            raise ConfigError("algorithm.batch_pairs", f"must be >= 1, got {self.batch_pairs}")
        if not self.lr_scale > 0:
            raise ConfigError("algorithm.lr_scale", f"must be > 0, got {self.lr_scale}")
        if self.t0 < 0:
            raise ConfigError("algorithm.t0", f"must be >= 0, got {self.t0}")
        if not 0.5 < self.lr_exponent <= 1:
            raise ConfigError("algorithm.lr_exponent", f"must be in (1/2, 1] (Robbins-Monro steps c / (t + t0)^a), "
                                                       f"got {self.lr_exponent}")


@dataclass
class RewardMLEState:
    nu: list[torch.Tensor]
    t: int = 0
    lr: float = 0.0


class RewardMLE(Algorithm):
    name = "reward_mle"
    step_batch_knobs = ("batch_pairs",)  # the memory estimate (harness/bounds.py)
    Config = RewardMLEConfig

    @staticmethod
    def instance_batch_refusal(cfg) -> str | None:
        return ("reward_mle's step size is set from its instance's exact Fisher spectrum, one scalar per job: "
                "it cannot batch instances")

    def __init__(self, cfg, model_cfg, problem):
        super().__init__(cfg, model_cfg, problem)
        self.model = RewardModel(problem, NetConfig(kind="linear"))
        fisher, err_form = _bt_forms(problem)
        mu, lam_max = _spectrum(fisher)
        self.c = cfg.lr_scale / mu
        self.t0 = stable_offset(cfg.t0, self.c * lam_max, cfg.lr_exponent)
        self.noise = NoiseTerm(fisher, err_form, cfg.batch_pairs, lambda t: step_size(self.c, self.t0, cfg.lr_exponent, t)) \
            if problem.label_noise == 0 else None
        lay = problem.flat()
        self._ref_cdf = policy_cdf(lay.ref_logp.view(1, -1, lay.n_actions))  # the fast path's pi_ref (1, S, A)

    def init(self, seeds):
        return RewardMLEState(nu=self.model.init(seeds))

    def reference_step(self, state, sampler):
        ref = self.problem.ref_log_probs()
        pairs = sampler.pairs(ref, self.cfg.batch_pairs)
        def bt_loss(nu):  # mean BT negative log-likelihood over the pairs, per seed
            rewards = self.model.step_tables(nu)
            margin = pairs.first.returns(rewards) - pairs.second.returns(rewards)
            return bradley_terry_nll(margin, pairs.label).mean(1)

        state.lr = step_size(self.c, self.t0, self.cfg.lr_exponent, state.t)  # c / (t + t0)^a
        state.nu = sgd_step(state.nu, bt_loss, state.lr)
        state.t += 1
        return state

    def has_eager_step(self) -> bool:
        return True

    def eager_step(self, state, sampler):
        """reference_step() with the BT loss's gradient in closed form (preference_loss_weights) on flat tables."""
        draws = sampler.flat_draws(self._ref_cdf, (("pairs", 0, self.cfg.batch_pairs),))
        (pairs,) = draws.parts()
        rewards = padded_units(self.model.units(state.nu)[0])  # (B, n_units + 1)
        first = preference_loss_weights(pairs.margin(rewards), pairs.label)  # d mean BT NLL / d R(tau)
        grad = torch.zeros_like(rewards)
        draws.every.add_return_grad(grad, torch.cat([first, -first], 1))
        state.lr = step_size(self.c, self.t0, self.cfg.lr_exponent, state.t)  # c / (t + t0)^a
        state.nu = sgd_update(state.nu, self.model.backward(state.nu, None, grad[:, :-1]), state.lr)
        state.t += 1
        return state

    def policy_log_probs(self, state):
        return soft_optimal(self.problem, self.model.step_tables(state.nu))[0]

    def reward_model(self, state):
        return self.model, state.nu

    def schedule(self, state):
        return {"lr": state.lr}

    def predicted_metrics(self, state):
        """reward_err_noise: E[reward_err] of the SGD linearised at the truth after state.t steps (NoiseTerm)."""
        return {} if self.noise is None else {"reward_err_noise": self.noise.at(state.t)}

    def population_targets(self, reference):
        """pi* of the population BT-MLE reward on pi_ref pairs: pi* of nu_true when the oracle is the BT
        model itself (label_noise = 0), a shrunk reward's pi* otherwise."""
        return {"target": bt_mle_target(self.problem, self.problem.beta, self.problem.ref_log_probs(),
                                        "pi* of the population BT-MLE reward on pi_ref pairs")}


def stable_offset(t0: float, c_lam_max: float, a: float) -> float:
    """The offset actually used: max(t0, (c lambda_max)^(1/a)), so that c / t0^a <= 1 / lambda_max.
    a = 1 computes exactly max(t0, c lambda_max), today's control bit for bit."""
    return max(t0, c_lam_max if a == 1 else c_lam_max ** (1 / a))


def step_size(c: float, t0: float, a: float, t: int) -> float:
    """gamma_t = c / (t + t0)^a; a = 1 is exactly c / (t + t0) (no pow)."""
    return c / (t + t0) if a == 1 else c / (t + t0) ** a


class NoiseTerm:
    """E[reward_err] after t steps of the SGD linearised at the truth and started there:
    e_{t+1} = (I - gamma_t H) e_t + gamma_t xi_t with E[xi xi^T] = H / batch_pairs (the BT model is
    well specified, so the gradient noise covariance at the truth is the Fisher H), reward_err = e^T M e.
    In H's eigenbasis the covariance stays diagonal: p_i <- (1 - gamma lambda_i)^2 p_i + gamma^2 lambda_i / B,
    and the noise term is sum_i M_ii p_i. Exact for that recursion; advanced in fixed chunks of steps, so a
    run pays O(t d) for it plus O(CHUNK d) per evaluation."""

    def __init__(self, fisher: torch.Tensor, err_form: torch.Tensor, batch_pairs: int, gamma):
        lam, vec = np.linalg.eigh(fisher.double().numpy())
        keep = lam > 1e-9 * lam.max()  # reward_err and the gradient both vanish off H's range
        self.lam, vec = lam[keep], vec[:, keep]
        self.m = np.einsum("ai,ab,bi->i", vec, err_form.double().numpy(), vec)
        self.batch_pairs, self.gamma = batch_pairs, gamma
        self.t, self.p = 0, np.zeros_like(self.lam)

    CHUNK = 65536  # steps advanced at once; the state is kept at multiples of it only

    def at(self, t: int) -> float:
        """E[reward_err] after t steps. A pure function of t, bit for bit, whatever was asked before (a resumed
        or segmented run logs the same values): the state is advanced and kept at multiples of CHUNK only,
        and the partial chunk up to t is recomputed from there."""
        if t < self.t:  # a resumed or restarted run: recompute from the start
            self.t, self.p = 0, np.zeros_like(self.lam)
        while self.t + self.CHUNK <= t:
            self.p = self._advance(self.p, self.t, self.t + self.CHUNK)
            self.t += self.CHUNK
        return float(self.m @ self._advance(self.p, self.t, t))

    def _advance(self, p: np.ndarray, start: int, end: int) -> np.ndarray:
        """The diagonal covariance after steps start..end-1 from p at step start."""
        if end <= start:
            return p
        g = self.gamma(np.arange(start, end, dtype=np.float64))[:, None]  # (n, 1)
        decay = (1 - g * self.lam) ** 2  # (n, d)
        after = np.cumprod(decay[::-1], axis=0)[::-1]  # prod over steps s..end-1
        tail = np.vstack([after[1:], np.ones((1, len(self.lam)))])  # prod over steps s+1..end-1
        return after[0] * p + (g**2 * self.lam / self.batch_pairs * tail).sum(0)


def _bt_forms(problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, M): the BT Fisher information of the linear reward at the truth, E_ref[sigma'(dR*) dPhi dPhi^T],
    and reward_err's quadratic form E_ref[dPhi dPhi^T] (reward_err(nu) = (nu - nu*)^T M (nu - nu*)),
    exact by enumeration over pi_ref pairs."""
    true = trajectory_returns(problem, problem.true_step_tables())[0]  # (G, m)
    q = trajectory_probs(problem, problem.ref_log_probs())[0]  # (G, m)
    dphi = pair_feature_differences(problem, problem.unit_features)  # (d, G, m, m)
    s = torch.sigmoid(true[:, :, None] - true[:, None, :])
    w = problem.init_prob[:, None, None] * q[:, :, None] * q[:, None, :]
    fisher = torch.einsum("gij,agij,bgij->ab", w * s * (1 - s), dphi, dphi)
    form = torch.einsum("gij,agij,bgij->ab", w, dphi, dphi)
    return fisher, form


def _spectrum(fisher: torch.Tensor) -> tuple[float, float]:
    """Smallest non-zero and largest eigenvalue of the Fisher information."""
    eig = torch.linalg.eigvalsh(fisher)
    positive = eig[eig > 1e-9 * eig.max()]
    return float(positive.min()), float(eig.max())
ALGORITHM = RewardMLE
