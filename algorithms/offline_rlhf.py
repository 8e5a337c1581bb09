"""offline_rlhf: KL-regularised RLHF from a fixed data set of preference pairs, with or without pessimism.

The method of Zhu, Jordan, Jiao (ICML 2023, arXiv 2301.11270) and of the offline setting of Zhao, Ye, Gu,
Zhang (NeurIPS 2025, arXiv 2411.04625):
  1. n pairs (tau, tau') from a fixed behaviour policy mu (uniform: every action covered), each labelled
     by the Bradley-Terry oracle, drawn through the counting sampler;
  2. the reward fitted by maximum likelihood, r_theta(u) = theta . phi(u), phi the env's reward features
     (features=linear) or one-hot units (features=tabular):
         theta_hat = argmin_theta sum_i BT-NLL(R_theta(tau_i) - R_theta(tau'_i), y_i) + ridge/2 ||theta||^2;
  3. pessimism=lcb: the reward lowered by a bonus (a lower confidence bound),
         r_pess(u) = r_hat(u) - bonus * ||phi(u) - v(u)||_{Sigma^-1},   Sigma = sum_i dphi_i dphi_i^T + ridge I,
     dphi_i = Phi(tau_i) - Phi(tau'_i) the pair's feature difference and v(u) = E_{a~mu(.|s)} phi(h, s, a) the
     behaviour policy's mean feature at the state of unit u (a per-state shift, invisible to preferences);
     pessimism=none: r_pess = r_hat;
  4. the deployed policy is the closed-form Gibbs policy of that reward, pi(a|s) ∝ pi_ref(a|s) exp(Q(s, a)/beta)
     (exactly pi_ref exp(r/beta) / Z on a bandit; soft backward induction when H > 1), beta = env.beta.

One step of the harness adds `batch_pairs` pairs to the data set and refits theta_hat by damped Newton from
the previous fit (warm start) to a gradient sup-norm of NEWTON_TOL, so the curve a run records is the
suboptimality of the offline method against the data set's size n (samples = 2n, queries = n).

The data set is kept as counts over the enumerated pairs of the problem (N_p pairs and W_p wins of the
first member for every pair p = (g, tau, tau')), so a refit costs the same at every n; the likelihood is
sum_p N_p BT-NLL(margin_p, W_p / N_p), the sum over the pairs drawn.

Zhu et al.'s pessimism takes the minimum over the confidence set of the *policy's* value; the per-unit lower
bound here is the per-action variant (the bonus of the linear bandit/MDP LCB), which keeps the Gibbs policy
in closed form (docs/claims.md "offline_rlhf").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ratebench.algorithms.base import Algorithm
from ratebench.algorithms.models import unit_features
from ratebench.core.errors import ConfigError
from ratebench.envs.exact import bradley_terry_nll, bradley_terry_nll_grad, pair_feature_differences, soft_optimal
from ratebench.envs.tabular import DTYPE

PESSIMISM = ("none", "lcb")
FEATURES = ("linear", "tabular")
BEHAVIOURS = ("uniform", "ref")
NEWTON_TOL = 1e-10  # gradient sup-norm at which a refit stops
NEWTON_ITERATIONS = 100  # at most this many Newton steps per refit (each one halves its step at most HALVINGS times)
HALVINGS = 30


@dataclass
class OfflineRLHFConfig:
    name: str = "offline_rlhf"
    batch_pairs: int = 16  # pairs added to the data set per step (2 samples + 1 query each)
    behaviour: str = "uniform"  # uniform (every action covered) | ref (pi_ref): the data set's behaviour policy mu
    features: str = "linear"  # linear: r = theta . phi(u) in the env's reward features | tabular: one value per unit
    ridge: float = 1.0  # lambda of the ridge term lambda/2 ||theta||^2 (a total, not a mean: its bias is O(1/n))
    pessimism: str = "none"  # none: the MLE reward | lcb: r_hat - bonus ||phi - v||_{Sigma^-1}
    bonus: float = 1.0  # the LCB's coefficient (pessimism=lcb); Zhu et al.'s is of order sqrt(d + log 1/delta) / kappa

    def check(self) -> None:
        if self.batch_pairs < 1:
            raise ConfigError("algorithm.batch_pairs", f"must be >= 1, got {self.batch_pairs}")
        if self.behaviour not in BEHAVIOURS:
            raise ConfigError("algorithm.behaviour", f"must be one of {list(BEHAVIOURS)}, got {self.behaviour!r}")
        if self.features not in FEATURES:
            raise ConfigError("algorithm.features", f"must be one of {list(FEATURES)}, got {self.features!r}")
        if not (math.isfinite(self.ridge) and self.ridge > 0):
            raise ConfigError("algorithm.ridge", f"must be a finite number > 0, got {self.ridge}")
        if self.pessimism not in PESSIMISM:
            raise ConfigError("algorithm.pessimism", f"must be one of {list(PESSIMISM)}, got {self.pessimism!r}")
        if not (math.isfinite(self.bonus) and self.bonus >= 0):
            raise ConfigError("algorithm.bonus", f"must be a finite number >= 0, got {self.bonus}")


@dataclass
class OfflineRLHFState:
    theta: torch.Tensor  # (B, d): the MLE reward's parameters
    penalty: torch.Tensor  # (B, n_units): bonus * ||phi(u) - v(u)||_{Sigma^-1} (zeros without pessimism)
    count: torch.Tensor  # (B, P): pairs drawn of every enumerated pair p = (g, tau, tau')
    wins: torch.Tensor  # (B, P): of those, how many the first member won
    t: int = 0


class OfflineRLHF(Algorithm):
    name = "offline_rlhf"
    step_batch_knobs = ("batch_pairs",)  # the memory estimate (harness/bounds.py)
    Config = OfflineRLHFConfig

    @staticmethod
    def instance_batch_refusal(cfg) -> str | None:
        return ("offline_rlhf keeps its data set as counts over one instance's enumerated pairs: "
                "it cannot batch instances")

    def __init__(self, cfg, model_cfg, problem):
        super().__init__(cfg, model_cfg, problem)
        self.phi = unit_features(problem, cfg.features)  # (n_units, d)
        table = problem.trajectory_table()
        self.G, self.m = table.states.shape[:2]
        # dphi of every enumerated pair p = g m^2 + i m + j: Phi(tau_gi) - Phi(tau_gj)  (P, d)
        pair_phi = pair_feature_differences(problem, self.phi)  # (d, G, m, m)
        self.dphi = pair_phi.permute(1, 2, 3, 0).reshape(-1, self.phi.shape[1])
        self.behaviour = behaviour_log_probs(problem, cfg.behaviour)  # mu [(1, n_h, A)]
        self.centred = self._centred_features()  # (n_units, d): phi(u) - v(u)
        self._keys, self._order, self._radix = _trajectory_keys(problem, table)

    def _centred_features(self) -> torch.Tensor:
        """phi(u) - E_{a~mu(.|s)} phi(h, s, a) at the (h, s) where unit u pays: (n_units, d). A unit paid at
        several states takes the last one's centre (every shipped environment pays a unit at one state)."""
        phi, out = self.phi, self.phi.clone()
        for step, logp in zip(self.problem.steps, self.behaviour):
            mu = logp[0].exp()  # (n_h, A)
            paid = step.unit_idx < self.problem.n_units
            centre = torch.einsum("sa,sad->sd", mu * paid, phi[step.unit_idx.clamp(max=self.problem.n_units - 1)])
            per_action = centre[:, None, :].expand(-1, step.unit_idx.shape[1], -1)  # (n_h, A, d)
            out[step.unit_idx[paid]] = phi[step.unit_idx[paid]] - per_action[paid]
        return out

    def init(self, seeds):
        B, P, d = len(seeds), self.dphi.shape[0], self.dphi.shape[1]
        return OfflineRLHFState(theta=torch.zeros(B, d, dtype=DTYPE),
                                penalty=torch.zeros(B, self.problem.n_units, dtype=DTYPE),
                                count=torch.zeros(B, P, dtype=DTYPE), wins=torch.zeros(B, P, dtype=DTYPE))

    def reference_step(self, state, sampler):
        pairs = sampler.pairs(self.behaviour, self.cfg.batch_pairs)  # the data set grows by batch_pairs pairs
        index = self.pair_index(pairs.first, pairs.second)  # (B, N)
        state.count.scatter_add_(1, index, torch.ones_like(pairs.label))
        state.wins.scatter_add_(1, index, pairs.label)
        state.theta = self.fit(state.count, state.wins, state.theta)
        if self.cfg.pessimism == "lcb":
            state.penalty = self.lcb_penalty(state.count)
        state.t += 1
        return state

    # --- the data set -------------------------------------------------------------------
    def pair_index(self, first, second) -> torch.Tensor:
        """The enumerated pair p = g m^2 + i m + j of each drawn pair (tau_gi, tau_gj): (B, N) long."""
        a, b = self._position(first), self._position(second)  # g m + i, g m + j
        return a * self.m + b % self.m

    def _position(self, traj) -> torch.Tensor:
        """g m + i of each drawn trajectory: where its (s_0, a_0, ..., s_H-1, a_H-1) sits in the enumeration."""
        key = _keys_of(traj.states, traj.actions, self.problem.n_actions, self._radix)
        return self._order[torch.searchsorted(self._keys, key)]

    # --- the MLE and the bonus ----------------------------------------------------------------
    def loss(self, theta: torch.Tensor, count: torch.Tensor, wins: torch.Tensor) -> torch.Tensor:
        """sum_i BT-NLL(dphi_i . theta, y_i) + ridge/2 ||theta||^2 over the data set, per seed: (B,)."""
        margin = theta @ self.dphi.T  # (B, P)
        p = torch.where(count > 0, wins / count.clamp_min(1), torch.zeros_like(wins))
        return (count * bradley_terry_nll(margin, p)).sum(1) + 0.5 * self.cfg.ridge * (theta**2).sum(1)

    def fit(self, count: torch.Tensor, wins: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """theta_hat = argmin loss by damped Newton from `theta` (warm start), every seed to a gradient sup-norm
        of NEWTON_TOL: (B, d). The loss is strictly convex (ridge > 0), so the minimiser is unique."""
        X, lam = self.dphi, self.cfg.ridge
        eye = torch.eye(X.shape[1], dtype=DTYPE)
        theta = theta.clone()
        value = self.loss(theta, count, wins)
        for _ in range(NEWTON_ITERATIONS):
            margin = theta @ X.T
            grad = (count * bradley_terry_nll_grad(margin, 0.0) - wins) @ X + lam * theta  # (B, d)
            todo = grad.abs().amax(1) > NEWTON_TOL
            if not bool(todo.any()):
                break
            s = torch.sigmoid(margin)
            hess = torch.einsum("bp,pi,pj->bij", count * s * (1 - s), X, X) + lam * eye  # (B, d, d)
            direction = torch.linalg.solve(hess, grad[..., None])[..., 0]
            step = torch.where(todo, 1.0, 0.0).to(DTYPE)
            for _ in range(HALVINGS):  # halve where the loss would rise (backtracking, per seed)
                candidate = theta - step[:, None] * direction
                new = self.loss(candidate, count, wins)
                worse = todo & (new > value + 1e-12 * value.abs())
                if not bool(worse.any()):
                    break
                step = torch.where(worse, step / 2, step)
            theta, value = candidate, torch.where(todo, new, value)
        return theta

    def covariance(self, count: torch.Tensor) -> torch.Tensor:
        """Sigma = sum_i dphi_i dphi_i^T + ridge I over the data set: (B, d, d)."""
        eye = torch.eye(self.dphi.shape[1], dtype=DTYPE)
        return torch.einsum("bp,pi,pj->bij", count, self.dphi, self.dphi) + self.cfg.ridge * eye

    def lcb_penalty(self, count: torch.Tensor) -> torch.Tensor:
        """bonus * ||phi(u) - v(u)||_{Sigma^-1} for every unit: (B, n_units)."""
        x = self.centred  # (n_units, d)
        solved = torch.linalg.solve(self.covariance(count), x.T.expand(count.shape[0], -1, -1))  # (B, d, n_units)
        return self.cfg.bonus * (x.T[None] * solved).sum(1).clamp_min(0).sqrt()

    # --- what the harness reads ---------------------------------------------------------------
    def mle_rewards(self, state) -> torch.Tensor:
        """r_hat(u) = theta_hat . phi(u): (B, n_units)."""
        return state.theta @ self.phi.T

    def policy_log_probs(self, state):
        """The Gibbs policy of the (pessimistic) reward estimate: pi ∝ pi_ref exp(Q / beta)."""
        rewards = self.mle_rewards(state) - state.penalty
        return soft_optimal(self.problem, self.problem.step_tables_from_units(rewards))[0]

    def implicit_rewards(self, state):
        """The MLE reward r_hat (before the bonus) as step tables: what reward_err and gap score."""
        return self.problem.step_tables_from_units(self.mle_rewards(state))

    def schedule(self, state):
        """The data set's size and, with pessimism, the largest bonus of any unit (averaged over seeds)."""
        out = {"pairs": float(state.count[0].sum())}
        if self.cfg.pessimism == "lcb":
            out["max_penalty"] = float(state.penalty.amax(1).mean())
        return out


def behaviour_log_probs(problem, behaviour: str) -> list[torch.Tensor]:
    """The data set's behaviour policy mu as log-prob tables [(1, n_h, A)]: uniform or pi_ref."""
    if behaviour == "ref":
        return problem.ref_log_probs()
    return [torch.full_like(lp, -math.log(problem.n_actions)) for lp in problem.ref_log_probs()]


def _keys_of(states: torch.Tensor, actions: torch.Tensor, n_actions: int, radix: int) -> torch.Tensor:
    """An integer per trajectory, sum_h (s_h A + a_h) radix^h: equal for equal (states, actions). (..., H) -> (...)."""
    code = states * n_actions + actions
    weights = radix ** torch.arange(code.shape[-1], dtype=torch.long)
    return (code * weights).sum(-1)


def _trajectory_keys(problem, table) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(sorted keys of the enumerated trajectories (G m,), their flat positions g m + i in that order, radix).
    Trajectories enumerated twice (two successors to the same state) share a key; searchsorted finds the first,
    and both have the same rewards and features, so the pair's likelihood term is the same."""
    radix = max(step.n_states for step in problem.steps) * problem.n_actions
    if problem.horizon * math.log2(radix) > 62:
        raise ConfigError("env", f"offline_rlhf indexes trajectories by a {problem.horizon}-digit number in base "
                          f"{radix}, which does not fit 63 bits: make the environment smaller")
    keys = _keys_of(table.states, table.actions, problem.n_actions, radix).reshape(-1)
    keys, order = torch.sort(keys, stable=True)
    return keys, order, radix


ALGORITHM = OfflineRLHF
