"""Exact metrics of an algorithm's state (SPEC §5). Consumes no samples, touches no counters."""
from __future__ import annotations

import math

import torch

from ratebench.algorithms.models import per_seed_sq_norm
from ratebench.envs import exact, penalty
from ratebench.grid import log_point


class Evaluator:
    def __init__(self, problem, f_star: float, algorithm, f_argmin: torch.Tensor | None = None):
        """f_argmin: F-hat*'s minimising unit rewards, if known: psi_gap's reference search
        starts there instead of searching for it again."""
        self.problem, self.f_star, self.algorithm = problem, f_star, algorithm
        if f_argmin is not None:
            problem.derived.setdefault("psi_reference", penalty.PsiReference(problem, f_argmin))
        self.true_rewards = problem.true_step_tables()
        self.j_star = float(exact.optimal_value(problem, self.true_rewards)[0])

    def __call__(self, state) -> dict[str, torch.Tensor]:
        """Per-seed metrics, each (B,) float64."""
        problem, algo = self.problem, self.algorithm
        with torch.no_grad():
            logps = [lp.detach() for lp in algo.policy_log_probs(state)]
            policy_gap = self.j_star - exact.policy_value(problem, self.true_rewards, logps)
            kl_ref = exact.kl_to_ref(problem, logps)
        estimate = algo.reward_model(state)
        if estimate is not None:
            model, params = estimate
            nu = [p.detach().clone().requires_grad_(True) for p in params]
            rewards = model.step_tables(nu)
            objective = exact.bilevel_objective(problem, rewards)
            grads = torch.autograd.grad(objective.sum(), nu)
            grad_sq = per_seed_sq_norm(grads)
            rewards = [r.detach() for r in rewards]
            objective = objective.detach()
        else:
            with torch.no_grad():
                rewards = [r.detach() for r in algo.implicit_rewards(state)]
                objective = exact.bilevel_objective(problem, rewards)
            grad_sq = torch.full_like(objective, math.nan)
        with torch.no_grad():
            reward_err = exact.reward_error(problem, rewards)
        return {
            "gap": objective - self.f_star,
            "grad_sq": grad_sq,
            "policy_gap": policy_gap,
            "psi_gap": penalty.psi_gap(problem, rewards, algo.schedule(state).get("lam")),
            "reward_err": reward_err,
            "kl_ref": kl_ref,
        }


def evaluation_points(budget: int, per_decade: int) -> list[int]:
    """Sample counts 0 and ceil(10^(k/per_decade)) up to the budget (the final point is added
    by the loop at whatever count the last step reached)."""
    points, k = {0}, 0
    while True:
        n = log_point(k, per_decade)
        if n >= budget:
            break
        points.add(n)
        k += 1
    return sorted(points)
