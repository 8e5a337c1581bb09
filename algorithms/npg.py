"""npg: exact KL-regularised natural policy gradient (Cen, Cheng, Chen, Wei, Chi 2020), tabular softmax.

Cen et al.'s entropy-regularised NPG on a discounted MDP, with step eta and regularisation tau,
    pi_{t+1}(a|s) ∝ pi_t(a|s)^(1 - eta tau / (1 - gamma)) exp(eta Q_tau^{pi_t}(s, a) / (1 - gamma)),
converges linearly: ||log pi* - log pi_t||_inf <= C (1 - eta tau)^t. Here the regulariser is the
environment's beta KL(pi || pi_ref) (entropy relative to pi_ref) and the horizon is finite (no
discount, the 1 - gamma normalisation dropped), so the update used is, at every (h, s),
    pi_{t+1}(.|h, s) ∝ pi_t(.|h, s)^(1 - eta beta) pi_ref(.|h, s)^(eta beta) exp(eta Q_h^{pi_t}(s, .)),
    Q_h^pi(s, a) = r_h(s, a) + E_{s'} V_{h+1}^pi(s'),  V_h^pi(s) = E_{a ~ pi}[Q_h^pi(s, a) - beta log pi/pi_ref],
with the TRUE reward r and beta = env.beta: exactly, no samples (Q by backward induction).
Its fixed point is the soft-optimal pi* ∝ pi_ref exp(Q*/beta). On a bandit (H = 1) Q = r, and
    log pi_{t+1} - log pi* = (1 - eta beta)(log pi_t - log pi*) + const per context
holds exactly: the centred log-policy error contracts by rho = 1 - eta beta per iteration, and the
suboptimality J* - J(pi_t) = beta E_x KL(pi_t || pi*) by rho^2 asymptotically (a KL is quadratic in a
small log-ratio); Cen et al.'s bound on it, C rho^t, is the weaker statement. For H > 1 the last step
contracts the same way and earlier steps follow with polynomial factors (t^(H-1) rho^t).
The step is given as the product eta_beta = eta * beta in (0, 1] (eta_beta = 1 is soft policy iteration).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from ratebench.algorithms.base import Algorithm
from ratebench.algorithms.softmax_pg import initial_logits
from ratebench.envs.exact import policy_q
from ratebench.core.errors import ConfigError


@dataclass
class NPGConfig:
    name: str = "npg"
    oracle: str = "exact"  # exact only: Q^{pi_t} by enumeration, no samples (needs budget.steps, x = step)
    eta_beta: float = 0.1  # eta * beta in (0, 1]: the predicted linear rate is rho = 1 - eta_beta per iteration
    init_scale: float = 0.0  # pi_0 ∝ pi_ref exp(init_scale N(0, 1)) per seed (0: every seed starts at pi_ref)

    def check(self) -> None:
        if self.oracle != "exact":
            raise ConfigError("algorithm.oracle", f"must be 'exact' (npg has no sampled variant), got {self.oracle!r}")
        if not (math.isfinite(self.eta_beta) and 0 < self.eta_beta <= 1):
            raise ConfigError("algorithm.eta_beta", f"must be in (0, 1] (eta * env.beta; 1 = soft policy iteration), "
                                                    f"got {self.eta_beta}")
        if not (math.isfinite(self.init_scale) and self.init_scale >= 0):
            raise ConfigError("algorithm.init_scale", f"must be a finite number >= 0, got {self.init_scale}")


@dataclass
class NPGState:
    logp: list[torch.Tensor]  # per step (B, n_h, A): log pi_t
    t: int = 0


def soft_q(problem, rewards: list[torch.Tensor], logps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Q_h^pi of the KL-regularised value (envs.exact.policy_q), one table per seed: [(B, n_h, A)]."""
    return [q.expand(logp.shape[0], *q.shape[1:]) for q, logp in zip(policy_q(problem, rewards, logps)[0], logps)]


def npg_update(logp: torch.Tensor, ref_logp: torch.Tensor, q: torch.Tensor, eta: float, beta: float) -> torch.Tensor:
    """log pi_{t+1} = log_softmax((1 - eta beta) log pi_t + eta beta log pi_ref + eta Q) at one step h."""
    return torch.log_softmax((1 - eta * beta) * logp + eta * beta * ref_logp + eta * q, -1)


class NPG(Algorithm):
    name = "npg"
    uses_true_reward = True  # its reward is the truth: pi* of it may be nearly deterministic, by design
    Config = NPGConfig

    @staticmethod
    def instance_batch_refusal(cfg) -> str | None:
        return "npg enumerates its instance's Q-function at every step: it cannot batch instances"

    def __init__(self, cfg, model_cfg, problem):
        super().__init__(cfg, model_cfg, problem)
        self.true = problem.true_step_tables()
        self.eta = cfg.eta_beta / problem.beta

    def init(self, seeds):
        return NPGState(logp=[torch.log_softmax(t, -1)
                              for t in initial_logits(self.problem, seeds, self.cfg.init_scale, salt=37)])

    def reference_step(self, state, sampler):
        q = soft_q(self.problem, self.true, state.logp)
        state.logp = [npg_update(lp, step.ref_logp, qh, self.eta, self.problem.beta)
                      for lp, step, qh in zip(state.logp, self.problem.steps, q)]
        state.t += 1
        return state

    def policy_log_probs(self, state):
        return state.logp

    def implicit_rewards(self, state):
        """The method optimises the true reward itself: its reward metrics are those of the truth (constant)."""
        B = state.logp[0].shape[0]
        return [r.expand(B, *r.shape[1:]) for r in self.true]

    def schedule(self, state):
        return {"lr": self.eta}


ALGORITHM = NPG
