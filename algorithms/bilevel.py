"""bilevel: the first-order penalty method for bilevel RLHF (docs/bilevel.md), plain SGD, neural r_nu and pi.

Three sequences: z tracks theta*(nu) (argmax J), y tracks argmin f + lam g (g = -J), and the reward
nu descends the penalty hypergradient; single_loop (F2SA style) or double_loop (Kwon et al. 2024).
The four gradient estimates come from algorithms/oracles.py: stochastic (default), exact (oracle=exact), or
exact in one level only (oracle=exact_lower: noise in the upper level only; oracle=exact_upper).
momentum=storm replaces each sequence's estimate by F2SA's momentum-assisted (STORM) recursion (reference step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ratebench.algorithms.base import Algorithm, stack_rows
from ratebench.algorithms.bilevel_kernel import SOURCE, CompiledStep, kernel_applies, kernel_fits
from ratebench.algorithms.estimators import (kl_regularised_return, policy_gradient_weights, preference_loss_weights,
                                             preference_score_weights)
from ratebench.algorithms.models import (PolicyModel, RewardModel, seed_gradients, sgd_step, sgd_update, stack_seeds,
                                         unstack_seeds)
from ratebench.algorithms.oracles import BILEVEL_ORACLES, make_oracle
from ratebench.algorithms.targets import minimiser_target
from ratebench.core.errors import ConfigError, require
from ratebench.envs.sampling import padded_units, policy_cdf

VARIANTS = ("single_loop", "double_loop")
MOMENTA = ("none", "storm")  # algorithm.momentum: plain estimates | recursive momentum estimates (docs/bilevel.md)


@dataclass
class BilevelConfig:
    """Knobs of the penalty method. Defaults: the `f2sa` schedule reading (docs/bilevel.md)."""

    name: str = "bilevel"
    variant: str = "single_loop"  # single_loop (F2SA: one step per sequence per k) | double_loop (Kwon ICLR'24)
    schedule: str = "f2sa"  # label of the schedule reading (conf/algorithm/bilevel*.yaml); recorded, not used
    batch_traj: int = 16  # N trajectories per REINFORCE / value-gradient estimate (>= 2: leave-one-out baseline)
    batch_pairs: int = 4  # M labelled pairs per BT-loss / score-function estimate
    inner_steps: int = 1  # single_loop: z and y steps per nu step (F2SA: 1; benchopt's F2SA: 10)
    oracle: str = "stochastic"  # stochastic (estimators of docs/bilevel.md, counted) | exact (population gradients
    #                             by enumeration, no samples: the schedule's deterministic rate; needs budget.steps)
    #                             | exact_lower (J's gradients exact, f's sampled: F2SA's "noise in the upper level
    #                             only") | exact_upper (f's exact, J's sampled)
    # --- single_loop schedules: alpha_k = c_alpha / (k + k0)^a, xi_k = c_xi / (k + k0)^b, ---------
    #     lam_k = lam0 (1 + k / k0)^c_lam
    c_alpha: float = 3.0  # y step constant (tuned on the bandit, docs/bilevel.md)
    alpha_exponent: float = 4 / 7  # a: inner (y) step exponent; F2SA's inner timescale
    c_alpha_z: float = 3.0  # z step constant
    alpha_z_exponent: float = 4 / 7  # a_z <= a: z at least as fast as y (a slower z biases the nu-step)
    c_xi: float = 1.0  # nu step constant (tuned; larger runs away: z cannot follow nu)
    xi_exponent: float = 5 / 7  # b: outer (nu) step exponent; decays faster than the inner steps (nu is the slow timescale)
    lam0: float = 1.0  # initial penalty; argmin psi_1 is already 5e-4 from F* in gap on the bandit
    lam_exponent: float = 1 / 7  # c_lam: lam_T ~ T^(1/7), the F2SA growth that balances the 1/lam bias
    k0: float = 100.0  # offset of every schedule (avoids huge first steps)
    # --- momentum (single_loop, inner_steps = 1, reference step only): d_k = g(x_k) + (1 - eta_k)(d_{k-1} - g(x_{k-1})),
    #     both on the same samples; eta_k = min(1, momentum_c / (k + k0)^momentum_exponent); eta = 1 is the plain step
    momentum: str = "none"  # none | storm (F2SA's momentum-assisted estimators, our STORM reading: docs/bilevel.md)
    momentum_c: float = 1.0  # eta_k's constant
    momentum_exponent: float = 0.0  # eta_k's exponent (0 with momentum_c >= 1: eta = 1, the plain estimates)
    # --- double_loop: K, B, lam from a target eps, in units of grad_sq (||grad F||^2) ---------------
    eps: float = 0.01  # target ||grad psi||^2
    lam_scale: float = 0.2  # lam = lam_scale * eps^(-1/2): penalty bias O(1/lam^2) in grad_sq units = O(eps)
    inner_scale: float = 1.0  # K = ceil(inner_scale * log(1/eps)) inner steps (PL lower level: linear rate)
    batch_scale: float = 0.16  # B = ceil(batch_scale / eps) trajectories and pairs per estimate
    inner_step: float = 0.3  # alpha, constant, for y and z (1.0 diverges on the bandit)
    outer_step: float = 0.01  # xi = outer_step / lam (psi_lam is O(lam)-smooth); constants tuned briefly, docs

    def check(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError("algorithm.variant", f"must be one of {list(VARIANTS)}, got {self.variant!r}")
        if self.oracle not in BILEVEL_ORACLES:
            raise ConfigError("algorithm.oracle", f"must be one of {list(BILEVEL_ORACLES)}, got {self.oracle!r}")
        require(self, "algorithm", ("batch_traj", "batch_pairs"), lambda v: v >= 2, "must be >= 2 (leave-one-out baseline)")
        require(self, "algorithm", ("inner_steps",), lambda v: v >= 1, "must be >= 1")
        positive = ("c_alpha", "c_alpha_z", "c_xi", "lam0", "k0", "eps", "lam_scale", "inner_scale", "batch_scale",
                    "inner_step", "outer_step")
        require(self, "algorithm", positive, lambda v: v > 0, "must be > 0")
        exponents = ("alpha_exponent", "alpha_z_exponent", "xi_exponent", "lam_exponent")
        require(self, "algorithm", exponents, lambda v: 0 <= v <= 1, "must be in [0, 1]")
        if self.alpha_z_exponent > self.alpha_exponent:
            raise ConfigError("algorithm.alpha_z_exponent", f"must be <= alpha_exponent={self.alpha_exponent} "
                              f"(z at least as fast as y), got {self.alpha_z_exponent}")
        if self.eps >= 1:
            raise ConfigError("algorithm.eps", f"must be in (0, 1), got {self.eps}")
        if self.momentum not in MOMENTA:
            raise ConfigError("algorithm.momentum", f"must be one of {list(MOMENTA)}, got {self.momentum!r}")
        require(self, "algorithm", ("momentum_c",), lambda v: v > 0, "must be > 0")
        require(self, "algorithm", ("momentum_exponent",), lambda v: 0 <= v <= 1, "must be in [0, 1]")
        if self.momentum != "none" and self.variant != "single_loop":
            raise ConfigError("algorithm.momentum", f"{self.momentum} is a single_loop step; allowed with "
                              f"variant={self.variant}: none")
        if self.momentum != "none" and self.inner_steps != 1:
            raise ConfigError("algorithm.inner_steps", f"must be 1 with algorithm.momentum={self.momentum} (one "
                              f"previous point per sequence), got {self.inner_steps}")

    # double_loop sizes as functions of eps
    def double_loop_sizes(self) -> tuple[float, int, int]:
        """(lam, K, B) of the double loop for the target eps."""
        lam = self.lam_scale * self.eps ** -0.5
        inner = math.ceil(self.inner_scale * math.log(1 / self.eps))
        batch = max(2, math.ceil(self.batch_scale / self.eps))
        return lam, inner, batch


@dataclass
class BilevelState:
    nu: list[torch.Tensor]  # reward-network parameters, each (B, ...)
    y: list[torch.Tensor]  # policy parameters tracking argmin f + lam g
    z: list[torch.Tensor]  # policy parameters tracking theta*(nu); the deployed policy
    k: int = 0  # outer iteration
    lam: float = 0.0  # schedule used at the last step
    alpha: float = 0.0
    alpha_z: float = 0.0
    xi: float = 0.0
    eta: float = 1.0  # momentum weight of the last step (1: plain estimates)
    # momentum=storm: the previous point (nu_{k-1}, y_{k-1}, z_{k-1}, lam_{k-1}) and the directions d_{k-1}
    # (empty before the first step: d_0 is the plain estimate)
    prev_nu: list[torch.Tensor] = field(default_factory=list)
    prev_y: list[torch.Tensor] = field(default_factory=list)
    prev_z: list[torch.Tensor] = field(default_factory=list)
    prev_lam: float = 0.0
    d_nu: list[torch.Tensor] = field(default_factory=list)
    d_y: list[torch.Tensor] = field(default_factory=list)
    d_z: list[torch.Tensor] = field(default_factory=list)


class Bilevel(Algorithm):
    name = "bilevel"
    step_batch_knobs = ("batch_traj", "batch_pairs")  # the memory estimate (harness/bounds.py)
    trains_model_reward = True  # model.reward is its reward network (model.reward.bound applies)
    projects_model_reward = True  # its nu step clips a tabular reward onto the box (RewardModel.project)
    Config = BilevelConfig
    reward_pass = "auto"  # eager_step's MLP reward: "auto" (reward_on_visited_units' rule), "table" or "visited" (tests, benchmarks)

    @classmethod
    def premise_inputs(cls, cfg: dict) -> dict:
        """c_lam (lam_k grows as k^c_lam, which imposes the asymptotic exponent 1/(q·c_lam)) and whether the
        single-loop schedule runs, from a recorded config; the defaults are BilevelConfig's."""
        default = cls.Config()
        return {"c_lam": float(cfg.get("lam_exponent", default.lam_exponent)),
                "schedule_applies": cfg.get("variant", default.variant) == "single_loop"}

    def __init__(self, cfg, model_cfg, problem):
        super().__init__(cfg, model_cfg, problem)
        self.reward = RewardModel(problem, model_cfg.reward)
        self.policy = PolicyModel(problem, model_cfg.policy)
        self.oracle = make_oracle(cfg.oracle, problem)  # the four gradient estimates (or their exact values)

    def init(self, seeds):
        theta0 = self.policy.init(seeds)  # y and z start at the same network (= pi_ref, zero last layer)
        return BilevelState(nu=self.reward.init(seeds), y=[t.clone() for t in theta0], z=theta0)

    # --- one outer iteration ---------------------------------------------------------------
    def set_schedule(self, state) -> tuple[int, int, int]:
        """Set this step's lam, alpha, alpha_z, xi on the state; returns (N, M, inner steps)."""
        cfg = self.cfg
        if cfg.variant == "single_loop":
            k, k0 = state.k, cfg.k0
            state.lam = cfg.lam0 * (1 + k / k0) ** cfg.lam_exponent  # lam_k = lam0 (1 + k/k0)^c_lam
            state.alpha = cfg.c_alpha / (k + k0) ** cfg.alpha_exponent  # alpha_k = c_alpha / (k + k0)^a
            state.alpha_z = cfg.c_alpha_z / (k + k0) ** cfg.alpha_z_exponent
            state.xi = cfg.c_xi / (k + k0) ** cfg.xi_exponent  # xi_k = c_xi / (k + k0)^b
            state.eta = min(1.0, cfg.momentum_c / (k + k0) ** cfg.momentum_exponent)  # eta_k (momentum=storm)
        else:
            state.lam = cfg.double_loop_sizes()[0]
            state.alpha = state.alpha_z = cfg.inner_step
            state.xi = cfg.outer_step / state.lam
        return self._sizes()

    @staticmethod
    def instance_batch_refusal(cfg) -> str | None:
        if getattr(cfg, "momentum", "none") != "none":
            return f"algorithm.momentum={cfg.momentum} has the reference step only (one job per instance)"
        if cfg.oracle != "stochastic":
            return (f"algorithm.oracle={cfg.oracle} enumerates its instance's trajectories at every step: "
                    "it cannot batch instances")
        return None

    @staticmethod
    def impl_refusal(cfg, impl: str) -> str | None:
        if getattr(cfg, "momentum", "none") != "none" and impl != "reference":
            return (f"algorithm.momentum={cfg.momentum} has the reference step only; allowed: reference (or "
                    f"algorithm.momentum=none with any impl), got {impl!r}")
        return None

    def has_eager_step(self) -> bool:
        # the eager and compiled steps are the stochastic oracle's in closed form; every oracle with an exact
        # part (exact, exact_lower, exact_upper) takes the reference step (so never the compiled segments); so does
        # momentum=storm (impl_refusal refuses it with any impl but reference)
        return self.cfg.oracle == "stochastic" and self.cfg.momentum == "none"

    def reference_step(self, state, sampler):
        n_traj, n_pairs, inner = self.set_schedule(state)
        if self.cfg.momentum == "storm":  # F2SA's momentum-assisted estimators (below)
            return self._momentum_step(state, sampler, n_traj, n_pairs)
        rewards = [r.detach() for r in self.reward.step_tables(state.nu)]
        for _ in range(inner):
            self._z_step(state, sampler, rewards, n_traj)
            self._y_step(state, sampler, rewards, n_traj, n_pairs)
        self._nu_step(state, sampler, n_traj, n_pairs)
        state.k += 1
        return state

    def _z_step(self, state, sampler, rewards, n_traj):
        """z <- z + alpha_z g^_theta J(nu, z): REINFORCE ascent on the KL-regularised return."""
        def ascent(z):
            return self.oracle.value_theta(sampler, rewards, self.policy.log_probs(z), n_traj)

        state.z = sgd_step(state.z, ascent, -state.alpha_z)

    def _y_step(self, state, sampler, rewards, n_traj, n_pairs):
        """y <- y - alpha [ g^_theta f(nu, y) / lam - g^_theta J(nu, y) ]: descent on (f + lam g)/lam."""
        def descent(y):
            logp_y = self.policy.log_probs(y)
            score_f = self.oracle.upper_theta(sampler, rewards, logp_y, n_pairs)  # grad: g^_theta f (score function)
            ascent_j = self.oracle.value_theta(sampler, rewards, logp_y, n_traj)  # grad: g^_theta J (REINFORCE)
            return score_f / state.lam - ascent_j

        state.y = sgd_step(state.y, descent, state.alpha)

    def _nu_step(self, state, sampler, n_traj, n_pairs):
        """nu <- nu - xi [ g^_nu f(nu, y) + lam (g^_nu J(nu, z) - g^_nu J(nu, y)) ], fresh samples
        from the updated y and z (grad_nu g = -grad_nu J, so this is the penalty hypergradient of docs/bilevel.md)."""
        with torch.no_grad():
            logp_y, logp_z = self.policy.log_probs(state.y), self.policy.log_probs(state.z)
        upper_y = self.oracle.upper_nu(sampler, logp_y, n_pairs)  # grad: g^_nu f(nu, y), M pairs from pi_y
        value_z = self.oracle.value_nu(sampler, logp_z, n_traj)  # grad: g^_nu J(nu, z), N from pi_z
        value_y = self.oracle.value_nu(sampler, logp_y, n_traj)  # grad: g^_nu J(nu, y), N from pi_y
        def hypergradient_surrogate(nu):
            rewards = self.reward.step_tables(nu)
            return upper_y(rewards) + state.lam * (value_z(rewards) - value_y(rewards))

        state.nu = self.reward.project(sgd_step(state.nu, hypergradient_surrogate, state.xi))  # then onto the box, if any

    # --- momentum=storm: F2SA's momentum-assisted estimators, our STORM reading (docs/bilevel.md "Momentum") ---------
    def _momentum_step(self, state, sampler, n_traj, n_pairs):
        """The single-loop step with each sequence moving along a recursive-momentum direction
            d_k = g(x_k; xi_k) + (1 - eta_k) (d_{k-1} - g(x_{k-1}; xi_k)),      d_0 = g(x_0; xi_0),
        g the plain step's estimate, xi_k this step's samples (drawn once, from the current policies, counted once),
        x_{k-1} the previous step's point, where the same samples are importance-weighted to its policies."""
        eta, lam = state.eta, state.lam
        has_prev = bool(state.d_z)  # k = 0: no previous point, d_0 = g
        rewards = [r.detach() for r in self.reward.step_tables(state.nu)]
        rewards_prev = [r.detach() for r in self.reward.step_tables(state.prev_nu)] if has_prev else None
        y_k, z_k = state.y, state.z

        # z: d^z_k = g^_theta J(nu_k, z_k) + (1 - eta)(d^z_{k-1} - g^_theta J(nu_{k-1}, z_{k-1})); z <- z + alpha_z d^z_k
        def z_direction(z, previous):
            return self.oracle.value_theta(sampler, rewards, self.policy.log_probs(z), n_traj, previous)

        d_z = self._storm_direction(z_direction, z_k, state.prev_z, rewards_prev, state.d_z, eta)
        state.z = sgd_update(z_k, d_z, -state.alpha_z)

        # y: g^y = g^_theta f(nu, y) / lam - g^_theta J(nu, y) at (nu_k, y_k, lam_k) and (nu_{k-1}, y_{k-1}, lam_{k-1});
        #    d^y_k = g^y_k + (1 - eta)(d^y_{k-1} - g^y_{k-1}); y <- y - alpha d^y_k
        def y_direction(y, previous):
            logp_y = self.policy.log_probs(y)
            score_f = self.oracle.upper_theta(sampler, rewards, logp_y, n_pairs, previous)  # M pairs from pi_y
            ascent_j = self.oracle.value_theta(sampler, rewards, logp_y, n_traj, previous)  # N from pi_y
            if previous is None:
                return score_f / lam - ascent_j
            return score_f[0] / lam - ascent_j[0], score_f[1] / state.prev_lam - ascent_j[1]

        d_y = self._storm_direction(y_direction, y_k, state.prev_y, rewards_prev, state.d_y, eta)
        state.y = sgd_update(y_k, d_y, state.alpha)

        # nu: h(nu, y, z, lam) = g^_nu f(nu, y) + lam (g^_nu J(nu, z) - g^_nu J(nu, y)) at (nu_k, y_{k+1}, z_{k+1}, lam_k)
        #     and at the previous nu step's point (nu_{k-1}, y_k, z_k, lam_{k-1}), the same M + 2N samples;
        #     d^nu_k = h_k + (1 - eta)(d^nu_{k-1} - h_{k-1}); nu <- Pi(nu - xi d^nu_k)
        with torch.no_grad():
            logp_y, logp_z = self.policy.log_probs(state.y), self.policy.log_probs(state.z)
            old = (self.policy.log_probs(y_k), self.policy.log_probs(z_k)) if has_prev else (None, None)
        upper_y = self.oracle.upper_nu(sampler, logp_y, n_pairs, old[0])  # g^_nu f(nu, y), M pairs from pi_y
        value_z = self.oracle.value_nu(sampler, logp_z, n_traj, old[1])  # g^_nu J(nu, z), N from pi_z
        value_y = self.oracle.value_nu(sampler, logp_y, n_traj, old[0])  # g^_nu J(nu, y), N from pi_y

        def hypergradient(nu, i, lam_i):  # i = 0: this point's functions, 1: the previous point's
            tables = self.reward.step_tables(nu)
            pick = (lambda fn: fn) if not has_prev else (lambda fns: fns[i])
            return pick(upper_y)(tables) + lam_i * (pick(value_z)(tables) - pick(value_y)(tables))

        g_nu = seed_gradients(lambda nu: hypergradient(nu, 0, lam), state.nu)
        g_nu_prev = seed_gradients(lambda nu: hypergradient(nu, 1, state.prev_lam), state.prev_nu) if has_prev else None
        d_nu = storm(g_nu, g_nu_prev, state.d_nu, eta)
        nu_k = state.nu
        state.nu = self.reward.project(sgd_update(nu_k, d_nu, state.xi))  # then onto the box, if any

        # what the next step's recursion needs: this step's point and directions
        state.prev_nu, state.prev_y, state.prev_z, state.prev_lam = nu_k, y_k, z_k, lam
        state.d_nu, state.d_y, state.d_z = d_nu, d_y, d_z
        state.k += 1
        return state

    def _storm_direction(self, draw, params, prev_params, rewards_prev, d_prev, eta):
        """storm(g, g_prev, d_prev, eta) for a policy sequence: draw(params, previous) draws the samples once and
        returns the estimate's surrogate at params, or with previous = (rewards_prev, logps at prev_params) the
        pair (surrogate at params, surrogate at prev_params) on those samples."""
        params = [p.detach().requires_grad_(True) for p in params]
        if not d_prev:
            return storm(list(torch.autograd.grad(draw(params, None).sum(), params)), None, None, eta)
        prev = [p.detach().requires_grad_(True) for p in prev_params]
        now, before = draw(params, (rewards_prev, self.policy.log_probs(prev)))
        return storm(list(torch.autograd.grad(now.sum(), params)), list(torch.autograd.grad(before.sum(), prev)),
                     d_prev, eta)

    # --- the fast path: the same step, closed-form gradients, one RNG call -------------
    def kernel_step(self, state, sampler):
        """impl=fast: eager_step in C (bilevel_step.c, built by compiled_step()), where it applies."""
        n_traj, n_pairs, inner = self.set_schedule(state)
        plans = sampler.plan(inner_draws(n_traj, n_pairs)), sampler.plan(outer_draws(n_traj, n_pairs))
        state = self.compiled_step()(state, sampler, n_traj, n_pairs, inner, *plans)
        state.k += 1
        return state

    def eager_step(self, state, sampler):
        """impl=eager, and impl=fast without a compiled step: reference_step with each surrogate's gradient in
        closed form (estimators' *_weights) on flat tables: z and y as one stacked batch of networks (one
        forward, one backward), a stage's draws as one rollout, every uniform of the step drawn at once.
        Equal to reference_step to float64 round-off (tests/test_fast.py)."""
        n_traj, n_pairs, inner = self.set_schedule(state)
        sampler.prefetch((inner + 1) * sampler.draws(trajectories=2 * n_traj, pairs=n_pairs))
        on_visited = self.reward_on_visited_units(n_traj, n_pairs, inner)
        if not on_visited:  # r_nu on every unit, once: nu moves last, so it is fixed for the z and y steps
            units, reward_acts = self.reward.units(state.nu)
            rewards = padded_units(units)  # (B, n_units + 1)
        B, beta = state.nu[0].shape[0], self.problem.beta
        zy, logp, acts = self._stacked_policies(state)  # policy 0 = z, policy 1 = y of each seed; (2B, S, A)
        lr = torch.tensor([[-state.alpha_z], [state.alpha]], dtype=logp.dtype)  # z ascends J, y descends
        for _ in range(inner):
            draws = sampler.flat_draws(policy_cdf(logp).view(B, -1, logp.shape[-1]), inner_draws(n_traj, n_pairs))
            if on_visited:  # r_nu only where this stage's trajectories go (nu is the same, so are the values)
                rewards = self.reward.visited_units(state.nu, draws.every.unit)[0]
            pairs_y = draws.parts()[1]  # parts: z's trajectories, y's pairs, y's trajectories
            flat = logp.view(B, -1)
            ret_z, _, ret_y = draws.split(kl_regularised_return(draws.every, rewards, flat, draws.plan.ref_logp, beta))
            score = preference_score_weights(pairs_y.margin(rewards), pairs_y.label) / state.lam
            # z: grad of g^_theta J(nu, z);  y: grad of g^_theta f(nu, y) / lam - g^_theta J(nu, y)
            weights = torch.cat([policy_gradient_weights(ret_z), score, score, -policy_gradient_weights(ret_y)], 1)
            grad = torch.zeros_like(flat)
            draws.every.add_log_prob_grad(grad, weights)
            grad.view(B, 2, -1).mul_(lr)
            zy = [p - g for p, g in zip(zy, self.policy.backward(zy, acts, logp, grad))]
            logp, acts = self.policy.table(zy)
        state.z, state.y = unstack_seeds(zy, 2)
        self._policy_cache = (state.z, state.y, zy, logp, acts, [p._version for p in zy])
        # nu <- nu - xi [ g^_nu f(nu, y) + lam (g^_nu J(nu, z) - g^_nu J(nu, y)) ], fresh samples
        draws = sampler.flat_draws(policy_cdf(logp).view(B, -1, logp.shape[-1]), outer_draws(n_traj, n_pairs))
        if on_visited:
            rewards, reward_acts = self.reward.visited_units(state.nu, draws.every.unit)
        pairs_y = draws.parts()[0]  # parts: y's pairs, z's trajectories, y's trajectories
        upper = preference_loss_weights(pairs_y.margin(rewards), pairs_y.label)
        value = upper.new_full((B, n_traj), state.lam / n_traj)  # reward_return_surrogate: 1 / N per trajectory
        weights = torch.cat([upper, -upper, value, -value], 1)  # per trajectory of the stage
        if on_visited:  # the gradient at each visited step; the backward sums the steps that share a unit
            grad = draws.every.return_grad_per_step(weights, rewards.shape[1] - 1)
        else:
            grad = torch.zeros_like(rewards)
            draws.every.add_return_grad(grad, weights)
            grad = grad[:, :-1]
        state.nu = self.reward.project(sgd_update(state.nu, self.reward.backward(state.nu, reward_acts, grad), state.xi))
        state.k += 1
        return state

    # --- segments: every step between two evaluation points in one compiled call -----------------------
    def segment_samples(self, state) -> int | None:
        """impl=fast with the compiled step runs segments; each step draws (inner + 1) stages of 2N + 2M samples."""
        if self.step_path() != "compiled":
            return None
        n_traj, n_pairs, inner = self._sizes()
        return (inner + 1) * (2 * n_traj + 2 * n_pairs)

    def _sizes(self) -> tuple[int, int, int]:
        """set_schedule's (N, M, inner steps), which do not depend on k."""
        cfg = self.cfg
        if cfg.variant == "single_loop":
            return cfg.batch_traj, cfg.batch_pairs, cfg.inner_steps
        _, inner, batch = cfg.double_loop_sizes()
        return batch, batch, inner

    def run_segment(self, state, sampler, n_steps, alive):
        """n_steps compiled steps in one call (bilevel_step.c's bilevel_segment): the schedule of each step is
        set_schedule's, evaluated in C; then the state's k and schedule are those of the last step run."""
        n_traj, n_pairs, inner = self._sizes()
        cfg = self.cfg
        if cfg.variant == "single_loop":
            schedule = {"lam0": cfg.lam0, "lam_exponent": cfg.lam_exponent, "c_alpha": cfg.c_alpha,
                        "alpha_exponent": cfg.alpha_exponent, "c_alpha_z": cfg.c_alpha_z,
                        "alpha_z_exponent": cfg.alpha_z_exponent, "c_xi": cfg.c_xi, "xi_exponent": cfg.xi_exponent,
                        "k0": cfg.k0}
        else:
            self.set_schedule(state)
            schedule = {"lam": state.lam, "alpha": state.alpha, "alpha_z": state.alpha_z, "xi": state.xi}
        plans = sampler.plan(inner_draws(n_traj, n_pairs)), sampler.plan(outer_draws(n_traj, n_pairs))
        steps, died = self.compiled_step().segment(state, sampler, n_steps, alive, schedule, self.step_threads,
                                                   n_traj, n_pairs, inner, *plans)
        state.k += steps - 1
        self.set_schedule(state)  # the last step's lam, alpha, alpha_z, xi (what the records show)
        state.k += 1
        return state, steps, died

    def compiled_step(self) -> CompiledStep | None:
        """impl=fast's step in C, built on first use; None where it does not apply or cannot be built (no C
        compiler): then impl=fast takes the eager step below it (impl=eager), which computes the same."""
        if not hasattr(self, "_compiled"):
            self._compiled = CompiledStep(self) if kernel_applies(self) else None
        return self._compiled

    def has_kernel_step(self) -> bool:
        return self.compiled_step() is not None

    def kernel_sources(self):
        return [SOURCE] if kernel_fits(self) else []  # what compiled_step() loads where the networks fit

    def reward_on_visited_units(self, n_traj: int, n_pairs: int, inner: int) -> bool:
        """Whether the eager step (impl=eager, or impl=fast without a compiled step) runs an MLP reward on the
        units its stages visit instead of on the whole table:
        when the steps of the inner + 1 stages ((2N + 2M) H each) are fewer than the units, as at N = M = 2.
        Takes set_schedule's (N, M, inner steps).
        The arithmetic per seed shrinks with the visits; the op count grows by a gather and a scatter per stage."""
        if self.reward_pass not in ("auto", "table", "visited"):
            raise ValueError(f"reward_pass={self.reward_pass!r}; allowed: auto, table, visited")
        if self.reward.net is None or self.reward_pass != "auto":
            return self.reward.net is not None and self.reward_pass == "visited"
        steps = (inner + 1) * (2 * n_traj + 2 * n_pairs) * self.problem.horizon
        return steps < self.problem.unit_features.shape[-2]

    def _stacked_policies(self, state):
        """(z and y stacked, their log-prob table, activations). The last step's nu-step forward is this
        step's first one when z and y are still the tensors it left (not replaced by a restore or a
        reference step, nor written in place: the harness zeroes diverged seeds, which bumps _version)."""
        cache = getattr(self, "_policy_cache", None)
        if (cache is not None and len(cache[0]) == len(state.z)
                and all(a is b for a, b in zip(cache[0] + cache[1], state.z + state.y))
                and [p._version for p in cache[2]] == cache[5]):
            return cache[2], cache[3], cache[4]
        zy = stack_seeds([state.z, state.y])
        return (zy, *self.policy.table(zy))

    # --- what the harness reads --------------------------------------------------------------
    def policy_log_probs(self, state):
        return self.policy.log_probs(state.z)  # the deployed policy is z (docs/bilevel.md)

    def stacked_policy_log_probs(self, states):
        return self.policy.log_probs(stack_rows([s.z for s in states]))

    def reward_model(self, state):
        return self.reward, state.nu

    def schedule(self, state):
        return {"lam": state.lam, "alpha": state.alpha, "alpha_z": state.alpha_z, "xi": state.xi}

    def population_targets(self, reference):
        """The lower level tracks pi*_nu and the upper level descends F, so as lambda grows the method comes
        to rest at pi* of a minimiser of F (at finite lambda, psi_lam's: the bias B(lambda) away). Its own
        target is the minimiser in nu_true's basin (F_loc: where the runs here go); the global one (F*, a
        degenerate reward) is recorded beside it."""
        return {"target": minimiser_target(self.problem, reference.local_argmin,
                                           "pi* of the minimiser of F in the basin of nu_true (F_loc)"),
                "target_global": minimiser_target(self.problem, reference.argmin,
                                                  "pi* of the global minimiser of F (F*)")}


def storm(g: list[torch.Tensor], g_prev: list[torch.Tensor] | None, d_prev: list[torch.Tensor] | None,
          eta: float) -> list[torch.Tensor]:
    """The recursive momentum (STORM) direction d_k = g(x_k; xi_k) + (1 - eta_k) (d_{k-1} - g(x_{k-1}; xi_k));
    the plain estimate g where there is no previous direction (k = 0)."""
    if not d_prev:
        return g
    return [a + (1 - eta) * (d - b) for a, b, d in zip(g, g_prev, d_prev)]


def inner_draws(n_traj: int, n_pairs: int) -> tuple:
    """The z and y steps' sampler calls in the reference's order: (kind, policy 0 = z / 1 = y, n)."""
    return (("trajectories", 0, n_traj), ("pairs", 1, n_pairs), ("trajectories", 1, n_traj))


def outer_draws(n_traj: int, n_pairs: int) -> tuple:
    """The nu step's sampler calls in the reference's order."""
    return (("pairs", 1, n_pairs), ("trajectories", 0, n_traj), ("trajectories", 1, n_traj))


ALGORITHM = Bilevel
