"""dpo: Direct Preference Optimisation (sigmoid / IPO / hinge losses), offline on nested prefixes of one
pi_ref dataset, online (fresh pairs from the current policy every step) or iterative (on-policy rounds). Plain SGD.

The deployed policy is pi_theta; its implicit reward beta log pi_theta / pi_ref is the reward estimate
the harness scores with `gap` (docs/metrics.md). See docs/baselines.md for defaults, sources and deviations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ratebench.algorithms.base import Algorithm
from ratebench.algorithms.models import PolicyModel, sgd_step, sgd_update
from ratebench.algorithms.policy_opt import (PairDataset, check_batch_fits, fit_on_dataset, fit_on_dataset_fast,
                                             next_grid_point, offline_steps)
from ratebench.algorithms.targets import TARGET_TOL, PopulationTarget, fixed_point
from ratebench.envs.exact import (bradley_terry_nll, bradley_terry_nll_grad, expected_pair_loss, trajectory_returns,
                                   true_pair_probs)
from ratebench.envs.lbfgs import minimise_rows
from ratebench.core.errors import ConfigError, require
from ratebench.core.rng import CounterRng
from ratebench.envs.sampling import PreferencePairs, policy_cdf

MODES = ("offline", "online", "iterative")
LOSSES = ("sigmoid", "ipo", "hinge")
MINIBATCH_STREAM = 101  # CounterRng stream of offline minibatch indices (the sampler uses stream 1)


@dataclass
class DPOConfig:
    """Knobs of DPO. Defaults follow TRL's DPOConfig where it makes sense here (docs/baselines.md)."""

    name: str = "dpo"
    mode: str = "offline"  # offline: fixed pi_ref dataset, nested prefixes | online: fresh pairs from pi_theta,
    #                        one SGD step each (TRL OnlineDPO) | iterative: rounds on the offline grid, new pairs
    #                        from the current policy, refit on all pairs so far (iterative DPO, Xiong et al. 2024)
    loss: str = "sigmoid"  # sigmoid (DPO, TRL default) | ipo (Azar et al.) | hinge (SLiC, TRL's "hinge")
    beta: Optional[float] = None  # DPO's beta; None = env.beta, so DPO targets the same KL-regularised optimum
    batch_pairs: int = 32  # SGD minibatch in pairs; online: also the fresh pairs drawn per step (2 samples each)
    lr: float = 1.0  # plain SGD step (TRL: AdamW 1e-6 on LLMs; here a 2-layer net on a tiny problem)
    # --- online: lr_k = lr / (1 + k / k0)^lr_exponent -----------------------------------------------
    lr_exponent: float = 0.5  # Robbins-Monro decay; 0 = constant step (noise floor)
    k0: float = 100.0  # offset of the online decay
    # --- offline: step j extends the dataset to the next grid size and trains on it to convergence ----
    first_pairs: int = 32  # pairs in the first prefix (offline, iterative); must be >= batch_pairs
    prefixes_per_decade: int = 10  # prefix grid in samples: 2 ceil(ceil(10^(j/10))/2), = the evaluation grid
    epochs: float = 10.0  # SGD passes over each prefix (warm-started from the previous prefix)
    min_steps: int = 300  # at least this many SGD steps per prefix (small prefixes)

    def check(self) -> None:
        if self.mode not in MODES:
            raise ConfigError("algorithm.mode", f"must be one of {list(MODES)}, got {self.mode!r}")
        if self.loss not in LOSSES:
            raise ConfigError("algorithm.loss", f"must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.beta is not None and not self.beta > 0:
            raise ConfigError("algorithm.beta", f"must be > 0 or null (= env.beta), got {self.beta}")
        require(self, "algorithm", ("batch_pairs", "first_pairs", "prefixes_per_decade", "min_steps"),
                lambda v: v >= 1, "must be >= 1")
        require(self, "algorithm", ("lr", "k0", "epochs"),
                lambda v: v > 0, "must be > 0")
        if self.lr_exponent < 0:
            raise ConfigError("algorithm.lr_exponent", f"must be >= 0, got {self.lr_exponent}")
        if self.mode != "online":  # offline and iterative draw minibatches from a dataset
            check_batch_fits(self.batch_pairs, self.first_pairs)


def dpo_loss(logratio_first: torch.Tensor, logratio_second: torch.Tensor, label: torch.Tensor, beta: float,
             loss: str) -> torch.Tensor:
    """Per-pair DPO-family loss; logratio = log pi_theta(tau) / pi_ref(tau), label 1 = first preferred. (B, N).

    With h = logratio(winner) - logratio(loser):
      sigmoid: -log sigma(beta h)  (= the BT NLL of the margin beta (logratio_first - logratio_second))
      ipo:     (h - 1 / (2 beta))^2
      hinge:   max(0, 1 - beta h)
    """
    margin = logratio_first - logratio_second  # (B, N), first minus second
    if loss == "sigmoid":
        return bradley_terry_nll(beta * margin, label)
    h = (2 * label - 1) * margin  # winner minus loser
    if loss == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss == "hinge":
        return torch.relu(1 - beta * h)
    raise ConfigError("algorithm.loss", f"must be one of {list(LOSSES)}, got {loss!r}")


def dpo_loss_grad(logratio_first: torch.Tensor, logratio_second: torch.Tensor, label: torch.Tensor, beta: float,
                  loss: str) -> torch.Tensor:
    """d dpo_loss / d margin (margin = logratio_first - logratio_second), in closed form: (B, N)."""
    margin = logratio_first - logratio_second
    if loss == "sigmoid":
        return beta * bradley_terry_nll_grad(beta * margin, label)
    sign = 2 * label - 1  # d h / d margin
    h = sign * margin
    if loss == "ipo":
        return 2 * (h - 1 / (2 * beta)) * sign
    if loss == "hinge":
        return torch.where(1 - beta * h > 0, -beta * sign, 0.0)
    raise ConfigError("algorithm.loss", f"must be one of {list(LOSSES)}, got {loss!r}")


@dataclass
class DPOState:
    theta: list[torch.Tensor]  # policy parameters, each (B, ...)
    data: PairDataset  # offline: the prefix trained on so far
    rng: CounterRng  # offline minibatch indices
    k: int = 0  # outer step
    lr: float = 0.0  # step size at the last step (offline: the initial step of the linear decay)


class DPO(Algorithm):
    name = "dpo"
    step_batch_knobs = ("batch_pairs",)  # the memory estimate (harness/bounds.py)
    Config = DPOConfig

    def __init__(self, cfg, model_cfg, problem):
        super().__init__(cfg, model_cfg, problem)
        self.policy = PolicyModel(problem, model_cfg.policy)
        self.ref = problem.ref_log_probs()
        self.beta = float(problem.beta if cfg.beta is None else cfg.beta)

    def init(self, seeds):
        return DPOState(theta=self.policy.init(seeds), data=PairDataset(), rng=CounterRng(seeds, MINIBATCH_STREAM))

    def pair_loss(self, theta, pairs: PreferencePairs) -> torch.Tensor:
        """Mean DPO loss per seed on the pairs: (B,)."""
        logps = self.policy.log_probs(theta)
        ratio_first = pairs.first.log_prob(logps) - pairs.first.log_prob(self.ref)
        ratio_second = pairs.second.log_prob(logps) - pairs.second.log_prob(self.ref)
        return dpo_loss(ratio_first, ratio_second, pairs.label, self.beta, self.cfg.loss).mean(1)

    def reference_step(self, state, sampler):
        return self._online_step(state, sampler) if self.cfg.mode == "online" else self._offline_step(state, sampler)

    def has_eager_step(self) -> bool:
        return True  # online: the one SGD step; offline / iterative: every SGD step of the refit

    def eager_step(self, state, sampler):
        """_online_step with the DPO loss's gradient in closed form (dpo_loss_grad) on flat tables; one
        forward serves the sampling and the gradient (the reference's two forwards compute the same).
        Offline / iterative: _offline_step with the refit's SGD steps computed the same way (_fast_fit)."""
        cfg = self.cfg
        if cfg.mode != "online":
            return self._offline_step(state, sampler, fit=self._fast_fit)
        logp, acts = self.policy.table(state.theta)  # (B, S, A)
        draws = sampler.flat_draws(policy_cdf(logp), (("pairs", 0, cfg.batch_pairs),))
        (pairs,) = draws.parts()
        flat, n = logp.view(logp.shape[0], -1), cfg.batch_pairs
        ratio = pairs.both.log_prob(flat) - pairs.both.log_prob(draws.plan.ref_logp)  # log pi / pi_ref, (B, 2M)
        first = dpo_loss_grad(ratio[:, :n], ratio[:, n:], pairs.label, self.beta, cfg.loss) / n
        grad = torch.zeros_like(flat)
        draws.every.add_log_prob_grad(grad, torch.cat([first, -first], 1))
        state.lr = cfg.lr / (1 + state.k / cfg.k0) ** cfg.lr_exponent  # lr_k = lr / (1 + k/k0)^a
        state.theta = sgd_update(state.theta, self.policy.backward(state.theta, acts, logp, grad), state.lr)
        state.k += 1
        return state

    def _online_step(self, state, sampler):
        """Iterative DPO: both members of each fresh pair from the current policy, one SGD step."""
        cfg = self.cfg
        with torch.no_grad():
            logps = self.policy.log_probs(state.theta)
        pairs = sampler.pairs(logps, cfg.batch_pairs)
        state.lr = cfg.lr / (1 + state.k / cfg.k0) ** cfg.lr_exponent  # lr_k = lr / (1 + k/k0)^a
        state.theta = sgd_step(state.theta, lambda theta: self.pair_loss(theta, pairs), state.lr)
        state.k += 1
        return state

    def _offline_step(self, state, sampler, fit=None):
        """Extend the dataset to the next prefix size (only the new pairs are drawn: from pi_ref offline, from
        the current policy in iterative mode), then SGD to convergence on all of it, warm-started."""
        cfg = self.cfg
        target = next_grid_point(2 * state.data.size, cfg.prefixes_per_decade, 2 * cfg.first_pairs) // 2
        with torch.no_grad():
            source = self.ref if cfg.mode == "offline" else self.policy.log_probs(state.theta)
        state.data.extend(sampler.pairs(source, target - state.data.size))
        steps = offline_steps(state.data.size, cfg.batch_pairs, cfg.epochs, cfg.min_steps)
        if fit is None:
            state.theta = fit_on_dataset(state.theta, self.pair_loss, state.data, cfg.batch_pairs, steps, cfg.lr,
                                         state.rng)
        else:
            state.theta = fit(state.theta, state.data, steps, state.rng)
        state.lr = cfg.lr
        state.k += 1
        return state

    def _fast_fit(self, theta, data, steps: int, rng):
        """fit_on_dataset(theta, pair_loss, ...) with each SGD step's gradient in closed form (dpo_loss_grad on
        the flat log-prob table, one backward through the network); log pi_ref of every member once per refit."""
        cfg, b, pairs = self.cfg, self.cfg.batch_pairs, data.pairs
        ref = torch.cat([pairs.first.log_prob(self.ref), pairs.second.log_prob(self.ref)], 1)  # (B, 2n)

        def grad_of_minibatch(params, members, label, rows):
            logp, acts = self.policy.table(params)
            flat = logp.view(logp.shape[0], -1)
            ratio = members.log_prob(flat) - ref.gather(1, rows)  # log pi / pi_ref, (B, 2b)
            first = dpo_loss_grad(ratio[:, :b], ratio[:, b:], label, self.beta, cfg.loss) / b
            grad = torch.zeros_like(flat)
            members.add_log_prob_grad(grad, torch.cat([first, -first], 1))
            return self.policy.backward(params, acts, logp, grad)

        return fit_on_dataset_fast(theta, grad_of_minibatch, data, self.problem.flat(), b, steps, cfg.lr, rng)

    # --- what the harness reads ---------------------------------------------------------------------
    def policy_log_probs(self, state):
        return self.policy.log_probs(state.theta)

    def implicit_rewards(self, state):
        """beta (log pi_theta - log pi_ref) per step [(B, n_h, A)]: DPO's reward estimate."""
        return [self.beta * (lp - ref) for lp, ref in zip(self.policy.log_probs(state.theta), self.ref)]

    def schedule(self, state):
        return {"lr": state.lr}

    def population_targets(self, reference):
        """Offline: the minimiser of the population loss on pi_ref pairs. Online and iterative: the fixed
        point of "minimise the population loss on pairs from the current policy" (where on-policy refits
        come to rest). The hinge loss has none: its population minimisers form a set."""
        cfg, problem = self.cfg, self.problem
        if cfg.loss == "hinge":
            return {}

        def solve(pairs_from, what):
            logps, grad = solve_population_loss(problem, self.beta, cfg.loss, pairs_from)
            return PopulationTarget(what, logps, [self.beta * (lp - r) for lp, r in zip(logps, self.ref)],
                                    float(grad[0]))

        if cfg.mode == "offline":
            return {"target": solve(self.ref, f"argmin of the population {cfg.loss} loss on pi_ref pairs")}
        what = f"fixed point of argmin of the population {cfg.loss} loss on pairs from the current policy"
        return {"target": fixed_point(lambda logps: solve(logps, what), self.ref, what)}


# --- DPO's population target (infinite data from its own sampling scheme; algorithms/targets.py) ---

def population_loss(problem, logps, beta: float, loss: str = "sigmoid", pairs_from=None) -> torch.Tensor:
    """DPO's loss with infinite data: E_g E_{tau, tau' ~ pairs_from(.|g)} E_{y ~ BT oracle} of the
    per-pair loss, by enumeration (pairs share their initial state g, as the sampler draws them).
    logps: per-step log-prob tables [(B, n_h, A)]; pairs_from: the pair distribution's tables, default
    pi_ref (offline DPO). Returns (B,)."""
    ref = problem.ref_log_probs()
    ratio = trajectory_returns(problem, [lp - r for lp, r in zip(logps, ref)])  # log pi/pi_ref(tau): (B, G, m)
    first, second = ratio[..., :, None], ratio[..., None, :]
    first, second = torch.broadcast_tensors(first, second)
    p = true_pair_probs(problem)  # (G, m, m): P(first preferred)
    ones = torch.ones_like(first)
    per_pair = p * dpo_loss(first, second, ones, beta, loss) + (1 - p) * dpo_loss(first, second, 0 * ones, beta, loss)
    return expected_pair_loss(problem, per_pair, ref if pairs_from is None else pairs_from)  # quadratic form of f


def solve_population_loss(problem, beta: float, loss: str = "sigmoid", pairs_from=None, n_starts: int = 1,
                          seed: int = 0, tol: float = TARGET_TOL) -> tuple[list[torch.Tensor], torch.Tensor]:
    """argmin over tabular policies of population_loss: (per-step log-prob tables [(n_starts, n_h, A)],
    gradient sup-norm per start (n_starts,)); start 0 at pi_ref, the others at random logits, row-wise
    L-BFGS. On a deterministic env with the sigmoid loss and pi_ref pairs this is pi* of the true reward
    (docs/baselines.md); on stochastic transitions it is not, because beta log pi*/pi_ref(tau) =
    R(tau) - V_0 plus a transition-noise term, not R(tau) + const."""
    ref = problem.ref_log_probs()
    shapes = [r.shape[1:] for r in ref]
    sizes = [int(torch.Size(s).numel()) for s in shapes]

    def tables(x):  # (B, n) logits -> per-step log-softmax tables around pi_ref
        parts = torch.split(x, sizes, dim=1)
        return [torch.log_softmax(r + z.view(-1, *s), -1) for r, z, s in zip(ref, parts, shapes)]

    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n_starts, sum(sizes), generator=gen, dtype=torch.float64)
    x0[0] = 0.0
    result = minimise_rows(lambda x: population_loss(problem, tables(x), beta, loss, pairs_from), x0, tol=tol,
                           max_iter=5000)
    return [t.detach() for t in tables(result.x)], result.grad_norm


ALGORITHM = DPO
