"""ppo_rlhf: the classic RLHF pipeline: a reward model fit by Bradley-Terry maximum likelihood, then PPO
against it with the KL-to-reference penalty folded into the reward. Plain SGD throughout.

offline: reward model from nested prefixes of one pi_ref dataset, then PPO on it (two-stage pipeline);
online: each step new pairs from the current policy refine the reward model, then one PPO iteration.
The reward model is the `gap` reward estimate. See docs/baselines.md for defaults and deviations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ratebench.algorithms.base import Algorithm
from ratebench.algorithms.estimators import leave_one_out_baseline, preference_loss, preference_loss_weights
from ratebench.algorithms.models import PolicyModel, RewardModel, StackedMLP, sgd_step, sgd_update
from ratebench.algorithms.policy_opt import (PairDataset, check_batch_fits, clipped_surrogate,
                                             clipped_surrogate_weights, fit_on_dataset, fit_on_dataset_fast, gae,
                                             next_grid_point, normalise_per_seed, offline_steps)
from ratebench.algorithms.targets import PopulationTarget, bt_mle_target, fixed_point, soft_optimal_at
from ratebench.core.errors import ConfigError, require
from ratebench.core.rng import CounterRng
from ratebench.envs.sampling import Trajectories, flat_true_rewards, padded_units, policy_cdf

MODES = ("offline", "online")
MINIBATCH_STREAM = 102  # CounterRng stream of offline reward-model minibatches (the sampler uses stream 1)


@dataclass
class PPORLHFConfig:
    """Knobs of PPO-RLHF. Defaults follow TRL's PPOConfig / CleanRL's ppo.py where sensible (docs/baselines.md)."""

    name: str = "ppo_rlhf"
    mode: str = "offline"  # offline: reward model from a fixed pi_ref dataset | online: pairs from pi_theta
    reward_oracle: bool = False  # True: PPO on the exact true reward (no pairs, no reward model): a control
    beta: Optional[float] = None  # KL coefficient folded into the reward; None = env.beta (same optimum)
    # --- reward model (BT maximum likelihood, model.reward network) ------------------------------------
    batch_pairs: int = 32  # online: fresh pairs per step; offline: reward-model SGD minibatch
    rm_lr: float = 1.0  # reward-model SGD step
    rm_lr_exponent: float = 0.5  # online: rm_lr / (1 + k/k0)^rm_lr_exponent
    # --- PPO ------------------------------------------------------------------------------------------
    rollouts: int = 16  # trajectories per PPO iteration (>= 2: leave-one-out baseline when H = 1)
    ppo_epochs: int = 4  # passes over each rollout batch (TRL, CleanRL: 4)
    minibatches: int = 1  # per epoch; the rollout batch is split into this many contiguous parts
    clip: float = 0.2  # ratio clip epsilon (TRL, OpenRLHF, CleanRL: 0.2)
    gamma: float = 1.0  # discount (TRL, OpenRLHF: 1 for RLHF)
    gae_lambda: float = 0.95  # GAE lambda (TRL, CleanRL: 0.95); used where H > 1 (critic)
    normalise_advantages: bool = True  # per seed, over its own rollout batch (TRL whitening, CleanRL norm_adv)
    policy_lr: float = 0.2  # plain SGD step of the policy; decays as policy_lr / (1 + i/k0)^lr_exponent
    critic_lr: float = 0.2  # plain SGD step of the critic (separate MLP, model.policy width/depth)
    lr_exponent: float = 0.5  # decay exponent over PPO iterations i; 0 = constant
    k0: float = 100.0  # offset of every decay
    # --- offline: step j grows the total samples to the next grid point --------------------------------
    first_pairs: int = 32  # pairs in the first prefix; must be >= batch_pairs
    pair_fraction: float = 0.5  # share of each step's new samples spent on labelled pi_ref pairs; rest: PPO rollouts
    prefixes_per_decade: int = 10  # grid of total samples 2 ceil(ceil(10^(j/10))/2) = the evaluation grid
    epochs: float = 10.0  # reward-model SGD passes over each prefix (warm-started)
    min_steps: int = 300  # at least this many reward-model SGD steps per prefix

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("algorithm.mode", f"must be one of {list(MODES)}, got {self.mode!r}")
        if self.beta is not None and not self.beta > 0:
            raise ConfigError("algorithm.beta", f"must be > 0 or null (= env.beta), got {self.beta}")
        require(self, "algorithm", ("batch_pairs", "ppo_epochs", "minibatches",
                                      "first_pairs", "prefixes_per_decade", "min_steps"),
                lambda v: v >= 1, "must be >= 1")
        if self.rollouts < 2:
            raise ConfigError("algorithm.rollouts", f"must be >= 2 (leave-one-out baseline), got {self.rollouts}")
        if self.minibatches > self.rollouts:
            raise ConfigError("algorithm.minibatches", f"must be <= algorithm.rollouts={self.rollouts}, "
                              f"got {self.minibatches}")
        require(self, "algorithm", ("rm_lr", "policy_lr", "critic_lr", "k0", "epochs", "clip"),
                lambda v: v > 0, "must be > 0")
        require(self, "algorithm", ("gamma", "gae_lambda"),
                lambda v: 0 <= v <= 1, "must be in [0, 1]")
        require(self, "algorithm", ("lr_exponent", "rm_lr_exponent"),
                lambda v: v >= 0, "must be >= 0")
        if not 0 < self.pair_fraction < 1:
            raise ConfigError("algorithm.pair_fraction", f"must be in (0, 1), got {self.pair_fraction}")
        if self.mode == "offline" and not self.reward_oracle:  # the reward model's minibatches come from a dataset
            check_batch_fits(self.batch_pairs, self.first_pairs)


@dataclass
class PPORLHFState:
    nu: list[torch.Tensor]  # reward-model parameters, each (B, ...)
    theta: list[torch.Tensor]  # policy parameters
    critic: list[torch.Tensor]  # value-network parameters (unused when H = 1)
    data: PairDataset  # offline: the prefix the reward model was fit on
    rng: CounterRng  # offline reward-model minibatch indices
    k: int = 0  # outer step
    ppo_iters: int = 0  # PPO iterations so far
    policy_lr: float = 0.0  # step sizes used last
    rm_lr: float = 0.0


class PPORLHF(Algorithm):
    name = "ppo_rlhf"
    step_batch_knobs = ("batch_pairs",)  # the memory estimate (harness/bounds.py)
    trains_model_reward = True  # model.reward is its reward network (model.reward.bound applies)
    Config = PPORLHFConfig

    def __init__(self, cfg, model_cfg, problem):
        super().__init__(cfg, model_cfg, problem)
        self.reward = RewardModel(problem, model_cfg.reward)
        self.policy = PolicyModel(problem, model_cfg.policy)
        pol = model_cfg.policy
        self.critic = StackedMLP([self.policy.features.shape[-1]] + [pol.width] * pol.depth + [1], pol.activation,
                                 zero_last=True)
        self.ref = problem.ref_log_probs()
        self.beta = float(problem.beta if cfg.beta is None else cfg.beta)
        self.true_rewards = problem.true_step_tables()

    def init(self, seeds):
        return PPORLHFState(nu=self.reward.init(seeds), theta=self.policy.init(seeds), critic=self.critic.init(seeds, 3),
                            data=PairDataset(), rng=CounterRng(seeds, MINIBATCH_STREAM))

    # --- one outer step ----------------------------------------------------------------------------
    def reference_step(self, state, sampler):
        cfg = self.cfg
        if cfg.reward_oracle:
            self.ppo_iteration(state, sampler, self.true_rewards, cfg.rollouts)
        elif cfg.mode == "online":
            self._online_reward_step(state, sampler)
            self.ppo_iteration(state, sampler, self._rm_tables(state), cfg.rollouts)
        else:
            self._offline_step(state, sampler)
        state.k += 1
        return state

    def _rm_tables(self, state):
        with torch.no_grad():
            return self.reward.step_tables(state.nu)

    def rm_loss(self, nu, pairs):
        """BT negative log-likelihood of the pairs under r_nu, mean per seed: (B,)."""
        return preference_loss(pairs, self.reward.step_tables(nu))

    def _online_reward_step(self, state, sampler):
        """New pairs from the current policy refine the reward model: one SGD step on their BT NLL."""
        cfg = self.cfg
        with torch.no_grad():
            logps = self.policy.log_probs(state.theta)
        pairs = sampler.pairs(logps, cfg.batch_pairs)
        self.set_online_rm_step(state)
        state.nu = sgd_step(state.nu, lambda nu: self.rm_loss(nu, pairs), state.rm_lr)

    def set_online_rm_step(self, state) -> None:
        """The online reward-model step of outer step k: rm_lr / (1 + k/k0)^rm_lr_exponent."""
        cfg = self.cfg
        state.rm_lr = cfg.rm_lr / (1 + state.k / cfg.k0) ** cfg.rm_lr_exponent

    def has_eager_step(self) -> bool:
        return True  # every mode: the rollouts, the reward-model steps and the PPO iterations in closed form

    def eager_step(self, state, sampler):
        """reference_step with every gradient in closed form on flat tables: the PPO iterations
        (_fast_ppo_iteration), the online reward-model step (its pairs and the PPO rollout drawn as one stage:
        both come from the same policy before either update) and the offline refit (_fast_rm_fit)."""
        cfg = self.cfg
        if cfg.reward_oracle:
            self._fast_ppo_iteration(state, sampler, flat_true_rewards(self.problem), cfg.rollouts)
        elif cfg.mode == "online":
            logp, acts = self.policy.table(state.theta)
            draws = sampler.flat_draws(policy_cdf(logp), (("pairs", 0, cfg.batch_pairs),
                                                          ("trajectories", 0, cfg.rollouts)))
            pairs, rollout = draws.parts()
            self.set_online_rm_step(state)
            state.nu = sgd_update(state.nu, self._bt_grad(state.nu, pairs.both, pairs.label), state.rm_lr)
            self._fast_ppo_iteration(state, sampler, self._flat_rm_rewards(state), cfg.rollouts,
                                     drawn=(rollout, logp, acts))
        else:
            self._offline_step(state, sampler, fast=True)
        state.k += 1
        return state

    def _bt_grad(self, nu, members, label):
        """Gradient w.r.t. nu of rm_loss on the pairs whose 2b members are `members` (FlatTrajectories, first
        members then second): the BT loss's weight per pair on R(tau) - R(tau') (preference_loss_weights), one
        backward through the reward network."""
        b = label.shape[1]
        units, acts = self.reward.units(nu)
        rewards = padded_units(units)
        ret = members.returns(rewards)  # (B, 2b)
        weight = preference_loss_weights(ret[:, :b] - ret[:, b:], label)
        grad = torch.zeros_like(rewards)
        members.add_return_grad(grad, torch.cat([weight, -weight], 1))
        return self.reward.backward(nu, acts, grad[:, :-1])

    def _flat_rm_rewards(self, state) -> torch.Tensor:
        """The reward model's rewards as padded unit rewards (B, n_units + 1): _rm_tables on flat indices."""
        return padded_units(self.reward.unit_rewards(state.nu))

    def _fast_rm_fit(self, nu, data, steps: int, rng):
        """fit_on_dataset(nu, rm_loss, ...) with each SGD step's gradient in closed form (_bt_grad)."""
        def grad_of_minibatch(params, members, label, rows):
            return self._bt_grad(params, members, label)

        return fit_on_dataset_fast(nu, grad_of_minibatch, data, self.problem.flat(), self.cfg.batch_pairs, steps,
                                   self.cfg.rm_lr, rng)

    def _offline_step(self, state, sampler, fast=False):
        """Grow the total samples to the next grid point T: the labelled pi_ref prefix to pair_fraction T / 2
        pairs (reward model refit to convergence on it), the rest of the step's samples on PPO rollouts.
        fast: the refit and the PPO iterations in closed form (_fast_rm_fit, _fast_ppo_iteration)."""
        cfg = self.cfg
        minimum = 2 * int(-(-cfg.first_pairs // cfg.pair_fraction))  # smallest T whose prefix holds first_pairs
        total = next_grid_point(sampler.samples, cfg.prefixes_per_decade, minimum)
        target = max(cfg.first_pairs, int(cfg.pair_fraction * total / 2))
        if target > state.data.size:
            state.data.extend(sampler.pairs(self.ref, target - state.data.size))
            steps = offline_steps(state.data.size, cfg.batch_pairs, cfg.epochs, cfg.min_steps)
            if fast:
                state.nu = self._fast_rm_fit(state.nu, state.data, steps, state.rng)
            else:
                state.nu = fit_on_dataset(state.nu, self.rm_loss, state.data, cfg.batch_pairs, steps, cfg.rm_lr,
                                          state.rng)
            state.rm_lr = cfg.rm_lr
        rewards = self._flat_rm_rewards(state) if fast else self._rm_tables(state)
        iteration = self._fast_ppo_iteration if fast else self.ppo_iteration
        budget = total - sampler.samples  # rollouts left for this step
        n_iter = max(1, budget // cfg.rollouts) if budget >= 2 else 0
        for i in range(n_iter):  # split the budget into n_iter near-equal batches (each >= 2)
            iteration(state, sampler, rewards, budget // n_iter + (i < budget % n_iter))

    # --- PPO ---------------------------------------------------------------------------------------
    def critic_tables(self, critic) -> list[torch.Tensor]:
        """V(h, s) per step [(B, n_h)]."""
        return list(self._critic_values(critic)[0].split(self.policy.splits, dim=1))

    def advantages(self, step_reward, values):
        """(advantage, the critic's targets or None) from per-step rewards (B, N, H): GAE on the critic's values
        where H > 1, the reward minus its leave-one-out mean where H = 1 (values None); normalised per seed."""
        cfg = self.cfg
        if values is not None:
            advantage = gae(step_reward, values, cfg.gamma, cfg.gae_lambda)
            returns = advantage + values
        else:
            advantage = (step_reward[..., 0] - leave_one_out_baseline(step_reward[..., 0]))[..., None]
            returns = None
        if cfg.normalise_advantages:
            advantage = normalise_per_seed(advantage)
        return advantage, returns

    def set_step_sizes(self, state) -> float:
        """This PPO iteration's policy step (set on the state) and critic step (returned), both decayed over iterations."""
        cfg = self.cfg
        state.policy_lr = cfg.policy_lr / (1 + state.ppo_iters / cfg.k0) ** cfg.lr_exponent
        return cfg.critic_lr / (1 + state.ppo_iters / cfg.k0) ** cfg.lr_exponent

    def minibatch_parts(self, n: int) -> list[torch.Tensor]:
        """Each epoch's minibatches: the rollout's positions 0 ... n - 1 in contiguous parts."""
        return list(torch.arange(n).tensor_split(min(self.cfg.minibatches, n)))

    def ppo_iteration(self, state, sampler, rewards, n):
        """Roll out n trajectories from the current policy, then ppo_epochs of clipped-surrogate SGD.

        Per-step reward r_h = r(s_h, a_h) - beta (log pi_old - log pi_ref)(a_h | s_h) (KL folded in, k1);
        advantages by GAE on the critic where H > 1, reward minus leave-one-out mean where H = 1."""
        cfg = self.cfg
        with torch.no_grad():
            logps_old = self.policy.log_probs(state.theta)
        traj = sampler.trajectories(logps_old, n)
        with torch.no_grad():
            lp_old = traj.per_step(logps_old)  # (B, N, H)
            step_reward = traj.per_step(rewards) - self.beta * (lp_old - traj.per_step(self.ref))
            values = _state_values(self.critic_tables(state.critic), traj) if self.problem.horizon > 1 else None
            advantage, returns = self.advantages(step_reward, values)
        critic_lr = self.set_step_sizes(state)
        parts = self.minibatch_parts(n)
        for _ in range(cfg.ppo_epochs):
            for idx in parts:
                mb = Trajectories(traj.states[:, idx], traj.actions[:, idx])
                state.theta = sgd_step(  # ascent on the clipped surrogate: negative step
                    state.theta, lambda theta: clipped_surrogate(mb.per_step(self.policy.log_probs(theta)),
                                                                 lp_old[:, idx], advantage[:, idx], cfg.clip),
                    -state.policy_lr)
                if returns is not None:
                    state.critic = sgd_step(state.critic, lambda critic: (
                        0.5 * (_state_values(self.critic_tables(critic), mb) - returns[:, idx]) ** 2).flatten(1).mean(1),
                        critic_lr)
        state.ppo_iters += 1

    def _fast_ppo_iteration(self, state, sampler, unit_rewards, n, drawn=None):
        """ppo_iteration on flat tables, each SGD step's gradient in closed form: the clipped surrogate's weight on
        log pi(a_t | s_t) at every step (clipped_surrogate_weights), the critic's squared error's on V(s_t), one
        backward through each network. unit_rewards: padded unit rewards (B or 1, n_units + 1); drawn: (rollout,
        log-prob table, activations) when the caller drew the rollout from the current policy already."""
        cfg, A, B = self.cfg, self.problem.n_actions, state.theta[0].shape[0]
        if drawn is None:
            logp, acts = self.policy.table(state.theta)
            traj = sampler.flat_draws(policy_cdf(logp), (("trajectories", 0, n),)).every
        else:
            traj, logp, acts = drawn
        lp_old = traj.step_log_probs(logp.view(B, -1))  # (B, N, H)
        step_reward = traj.step_rewards(unit_rewards) - self.beta * (lp_old - traj.step_log_probs(self.problem.flat().ref_logp))
        values = None
        if self.problem.horizon > 1:
            values = traj.step_state_values(self._critic_values(state.critic)[0], A)  # V(h, s_h): (B, N, H)
        advantage, returns = self.advantages(step_reward, values)
        critic_lr = self.set_step_sizes(state)
        bounds = [(int(p[0]), int(p[-1]) + 1) for p in self.minibatch_parts(n)]
        first = True  # the first SGD step's forward is the rollout's (same theta)
        for _ in range(cfg.ppo_epochs):
            for start, stop in bounds:
                if not first:
                    logp, acts = self.policy.table(state.theta)
                first, mb = False, traj.slice(start, stop)
                flat = logp.view(B, -1)
                # theta <- theta + lr grad E[min(rho A, clip(rho) A)]: weight per (trajectory, step) on log pi
                weight = clipped_surrogate_weights(mb.step_log_probs(flat), lp_old[:, start:stop],
                                                   advantage[:, start:stop], cfg.clip)
                grad = torch.zeros_like(flat)
                mb.add_log_prob_grad(grad, weight)
                state.theta = sgd_update(state.theta, self.policy.backward(state.theta, acts, logp, grad),
                                         -state.policy_lr)
                if returns is not None:  # critic <- critic - lr grad mean 0.5 (V(s_t) - return_t)^2
                    table, critic_acts = self._critic_values(state.critic)
                    err = mb.step_state_values(table, A) - returns[:, start:stop]
                    grad_v = torch.zeros_like(table)
                    mb.add_step_state_grad(grad_v, err / err[0].numel(), A)
                    state.critic = sgd_update(state.critic, self.critic.backward(state.critic, critic_acts,
                                                                                 grad_v[..., None]), critic_lr)
        state.ppo_iters += 1

    def _critic_values(self, critic):
        """The fast path's critic forward: (V of every stacked state (B, S), activations for its backward)."""
        acts = self.critic.activations(critic, self.policy.features)
        return acts[-1][..., 0], acts

    # --- what the harness reads ---------------------------------------------------------------------
    def policy_log_probs(self, state):
        return self.policy.log_probs(state.theta)

    def reward_model(self, state):
        return None if self.cfg.reward_oracle else (self.reward, state.nu)

    def implicit_rewards(self, state):
        """Oracle control only: the true reward is the reward estimate, [(B, n_h, A)]."""
        B = state.theta[0].shape[0]
        return [r.expand(B, *r.shape[1:]) for r in self.true_rewards]

    def schedule(self, state):
        return {"policy_lr": state.policy_lr, "rm_lr": state.rm_lr}

    def population_targets(self, reference):
        """pi* at this method's KL coefficient of the reward it fits: the true one (reward_oracle), the
        population BT-MLE on pi_ref pairs (offline), or the fixed point of "fit the BT-MLE on pairs from
        the current policy, then pi* of it" (online). PPO itself is assumed to reach the pi* of its reward."""
        problem, beta = self.problem, self.beta
        if self.cfg.reward_oracle:
            return {"target": PopulationTarget(f"pi* of the true reward at KL coefficient {beta:g}",
                                               soft_optimal_at(problem, self.true_rewards, beta), self.true_rewards,
                                               0.0)}
        if self.cfg.mode == "offline":
            return {"target": bt_mle_target(problem, beta, self.ref,
                                            f"pi* (KL coefficient {beta:g}) of the population BT-MLE reward on "
                                            f"pi_ref pairs")}
        what = f"fixed point of pi* (KL coefficient {beta:g}) of the population BT-MLE reward on pairs from pi"
        return {"target": fixed_point(lambda logps: bt_mle_target(problem, beta, logps, what), self.ref, what)}


def _state_values(tables: list[torch.Tensor], traj: Trajectories) -> torch.Tensor:
    """V_h(s_h) along each trajectory: [(B, n_h)] -> (B, N, H)."""
    return torch.stack([t.gather(1, traj.states[..., h]) for h, t in enumerate(tables)], -1)


ALGORITHM = PPORLHF
