"""softmax_pg: tabular softmax policy gradient with the TRUE reward (Mei, Xiao, Szepesvari, Schuurmans 2020).

The objective is the environment's own KL-regularised value (the one `policy_gap` measures),
    J(theta) = E_{pi_theta}[ sum_h r_h(s_h, a_h) - beta log pi_theta(a_h|s_h) / pi_ref(a_h|s_h) ],
with r the true reward and beta = env.beta (> 0 in every environment). On a bandit this is Mei et al.'s
entropy-regularised objective with the reward shifted by beta log pi_ref (beta KL(pi||pi_ref) =
-beta H(pi) - E_pi[beta log pi_ref]); as beta -> 0 it is their unregularised objective.

Parametrisation: one logit per (h, s, a), pi_theta(.|h, s) = softmax(theta_{h,s}), started at
theta_0 = centre + init_scale * N(0, 1), centre log pi_ref (init_center=ref) or 0 (uniform), each seed its own
draw: with exact gradients the seeds differ only there. Step, gradient ascent with a constant (or decaying) step:
    theta_{t+1} = theta_t + eta_t * g_t,   eta_t = lr_scale / L * (1 + t)^-lr_exponent,
    oracle=exact:      g_t = grad_theta J(theta_t), no samples: impl=reference by autograd through the exact
                       backward evaluation (envs.exact.policy_value); impl=fast/eager in closed form
                       (exact_gradient: the policy gradient theorem for softmax logits), equal to round-off, and
                       under impl=fast in segments of steps between evaluation points (run_segment);
    oracle=stochastic: g_t = REINFORCE on batch_traj trajectories from pi_theta_t drawn through the sampler
                       (estimators.policy_gradient_surrogate: the regularised return G(tau) with a
                       leave-one-out baseline), counted.
L is the smoothness constant of Mei et al. (docs/claims.md "softmax_pg"): H = 1 (bandit): their Lemma 2
constant 5/2 for rewards in [0, 1], scaled to the reward range R, plus the entropy term of their Lemma 14
at gamma = 0: L = 5/2 R + beta (4 + 8 log A). H > 1: their Lemma 7/14 with 1/(1 - gamma) read as H:
L = H^3 (8 R + beta (4 + 8 log A)), a finite-horizon analogue, not a proved constant. R = the largest
range over actions of r_h(s, .) + beta log pi_ref(.|s) over every (h, s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ratebench.algorithms.base import Algorithm
from ratebench.algorithms.models import sgd_step, sgd_update
from ratebench.algorithms.oracles import ORACLES, make_oracle
from ratebench.envs import exact
from ratebench.envs.tabular import DTYPE
from ratebench.core.errors import ConfigError


@dataclass
class SoftmaxPGConfig:
    name: str = "softmax_pg"
    oracle: str = "stochastic"  # stochastic (REINFORCE through the counting sampler) | exact (grad J by
    #                             enumeration, no samples: needs budget.steps, x = step)
    batch_traj: int = 16  # N trajectories per REINFORCE estimate (oracle=stochastic; >= 2 for the baseline)
    lr_scale: float = 1.0  # eta = lr_scale / L; 1 is Mei et al.'s 1/L step, well above ~2 is past stability
    lr_exponent: float = 0.0  # eta_t = eta (1 + t)^-a, a in [0, 1]: 0 = constant step (the exact theorem's)
    init_scale: float = 0.0  # theta_0 = centre + init_scale N(0, 1) per seed (0: every seed starts at the centre)
    init_center: str = "ref"  # ref: centre log pi_ref (start at pi_ref) | uniform: centre 0 (start at the uniform
    #                           policy, where Mei et al.'s bandit constant c = inf_t pi_t(a*) is at least ~1/A)

    def check(self) -> None:
        if self.oracle not in ORACLES:
            raise ConfigError("algorithm.oracle", f"must be one of {list(ORACLES)}, got {self.oracle!r}")
        if self.batch_traj < 2:
            raise ConfigError("algorithm.batch_traj", f"must be >= 2 (leave-one-out baseline), got {self.batch_traj}")
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0):
            raise ConfigError("algorithm.lr_scale", f"must be a finite number > 0, got {self.lr_scale}")
        if not 0 <= self.lr_exponent <= 1:
            raise ConfigError("algorithm.lr_exponent", f"must be in [0, 1] (eta (1 + t)^-a), got {self.lr_exponent}")
        if not (math.isfinite(self.init_scale) and self.init_scale >= 0):
            raise ConfigError("algorithm.init_scale", f"must be a finite number >= 0, got {self.init_scale}")
        if self.init_center not in INIT_CENTERS:
            raise ConfigError("algorithm.init_center", f"must be one of {list(INIT_CENTERS)}, got {self.init_center!r}")


INIT_CENTERS = ("ref", "uniform")


@dataclass
class SoftmaxPGState:
    theta: list[torch.Tensor]  # per step (B, n_h, A): the logits
    t: int = 0
    lr: float = 0.0


def initial_logits(problem, seeds: list[int], scale: float, salt: int, center: str = "ref") -> list[torch.Tensor]:
    """centre + scale * N(0, 1), centre log pi_ref ("ref") or 0 ("uniform"), each seed its own generator
    (independent of the batch): [(B, n_h, A)]. Shared by softmax_pg and npg."""
    out = []
    for h, step in enumerate(problem.steps):
        noise = torch.stack([torch.randn(step.ref_logp.shape, dtype=DTYPE,
                                         generator=torch.Generator().manual_seed(104_729 * int(s) + 7_919 * h + salt))
                             for s in seeds])
        out.append((step.ref_logp[None] if center == "ref" else 0) + scale * noise)
    return out


def smoothness(problem) -> float:
    """L of the module docstring (Mei et al. 2020's smoothness constant, read on this problem)."""
    beta, A, H = problem.beta, problem.n_actions, problem.horizon
    R = max(float((r + beta * step.ref_logp).amax(-1).sub((r + beta * step.ref_logp).amin(-1)).max())
            for r, step in zip((t[0] for t in problem.true_step_tables()), problem.steps))
    entropy = beta * (4 + 8 * math.log(A))
    return 2.5 * R + entropy if H == 1 else H**3 * (8 * R + entropy)


class SoftmaxPG(Algorithm):
    name = "softmax_pg"
    uses_true_reward = True  # its reward is the truth: pi* of it may be nearly deterministic, by design
    step_batch_knobs = ("batch_traj",)  # the memory estimate (harness/bounds.py)
    Config = SoftmaxPGConfig

    @staticmethod
    def instance_batch_refusal(cfg) -> str | None:
        return "softmax_pg's step size 1/L is set from its instance's reward range, one scalar per job: it cannot batch instances"

    def __init__(self, cfg, model_cfg, problem):
        super().__init__(cfg, model_cfg, problem)
        self.oracle = make_oracle(cfg.oracle, problem)
        self.true = problem.true_step_tables()
        self.L = smoothness(problem)
        self.eta = cfg.lr_scale / self.L

    def init(self, seeds):
        return SoftmaxPGState(theta=initial_logits(self.problem, seeds, self.cfg.init_scale, salt=31,
                                                     center=self.cfg.init_center))

    def reference_step(self, state, sampler):
        def objective(theta):  # J(theta) per seed (exact), or its REINFORCE surrogate on fresh samples
            logps = [torch.log_softmax(t, -1) for t in theta]
            return self.oracle.value_theta(sampler, self.true, logps, self.cfg.batch_traj)

        state.lr = self.eta * (1 + state.t) ** -self.cfg.lr_exponent
        state.theta = sgd_step(state.theta, objective, -state.lr)  # a negative step ascends
        state.t += 1
        return state

    # --- oracle=exact: the same step with the gradient in closed form, and segments of it ----------------------
    def has_eager_step(self) -> bool:
        return self.cfg.oracle == "exact"

    def exact_gradient(self, theta):
        """grad_theta J in closed form (the policy gradient theorem for softmax logits, Mei et al. 2020 Lemma 10
        with the KL term): dJ/dtheta_h(s, a) = d_h(s) pi_h(a|s) (w_h(s, a) - V_h(s)), w_h = Q_h - beta log
        pi_h/pi_ref, V_h(s) = pi_h(.|s) . w_h(s, .), Q_h = r_h + E V_{h+1} (envs.exact.policy_q) and d_h the law
        of s_h under pi (a forward pass from the initial law). [(B, n_h, A)]"""
        problem, beta = self.problem, self.problem.beta
        if problem.horizon == 1:  # a bandit: Q_0 = r, d_0 = rho (fewer kernel calls; the same formula)
            if not hasattr(self, "_bandit"):
                self._bandit = (self.true[0] + beta * problem.steps[0].ref_logp, problem.init_prob[:, None])
            u, rho = self._bandit
            logp = torch.log_softmax(theta[0], -1)
            pi = logp.exp()
            w = u - beta * logp
            return [rho * pi * (w - (pi * w).sum(-1, keepdim=True))]
        logps = [torch.log_softmax(t, -1) for t in theta]
        qs, _ = exact.policy_q(problem, self.true, logps)
        d = problem.init_prob.expand(theta[0].shape[0], -1)  # (B, n_0)
        grads = []
        for h, step in enumerate(problem.steps):
            pi = logps[h].exp()
            w = qs[h] - beta * (logps[h] - step.ref_logp)
            pd = pi * d[..., None]  # (B, n_h, A): the law of (s_h, a_h)
            grads.append(pd * (w - (pi * w).sum(-1, keepdim=True)))
            if h + 1 < problem.horizon:
                flow = (pd[..., None] * step.next_prob).reshape(pd.shape[0], -1)
                d = torch.zeros(pd.shape[0], problem.steps[h + 1].ref_logp.shape[0], dtype=DTYPE).index_add_(
                    1, step.next_idx.reshape(-1), flow)
        return grads

    def eager_step(self, state, sampler):
        """reference_step (oracle=exact) with exact_gradient in place of autograd: equal to round-off."""
        state.lr = self.eta * (1 + state.t) ** -self.cfg.lr_exponent
        state.theta = sgd_update(state.theta, self.exact_gradient(state.theta), -state.lr)
        state.t += 1
        return state

    def segment_samples(self, state):
        """oracle=exact under impl=fast runs segments: its steps draw nothing (0 samples each)."""
        return 0 if self.has_eager_step() and self.impl == "fast" else None

    def run_segment(self, state, sampler, n_steps, alive):
        """n_steps eager steps in one call, each followed by the harness's non-finite check (a seed whose logits go
        inf or NaN is zeroed and marked at that step), as the per-step loop computes them, bit for bit."""
        alive = alive.clone()
        died = torch.zeros(alive.shape[0], dtype=torch.int64)
        for i in range(1, n_steps + 1):
            state = self.eager_step(state, sampler)
            if all(bool(torch.isfinite(t).all()) for t in state.theta):
                continue
            finite = torch.stack([torch.isfinite(t.reshape(t.shape[0], -1)).all(1) for t in state.theta]).all(0)
            newly = alive & ~finite
            if newly.any():
                died[newly] = i
                alive &= ~newly
                for t in state.theta:
                    t[newly] = 0
                if not alive.any():
                    return state, i, died
        return state, n_steps, died

    def policy_log_probs(self, state):
        return [torch.log_softmax(t, -1) for t in state.theta]

    def implicit_rewards(self, state):
        """The method optimises the true reward itself: its reward metrics are those of the truth (constant)."""
        B = state.theta[0].shape[0]
        return [r.expand(B, *r.shape[1:]) for r in self.true]

    def schedule(self, state):
        return {"lr": state.lr}


ALGORITHM = SoftmaxPG
