"""Exact metrics of an algorithm's state (docs/metrics.md). Consumes no samples, touches no counters."""
from __future__ import annotations

import math

import torch

from ratebench.algorithms.base import stack_rows
from ratebench.algorithms.models import per_seed_sq_norm
from ratebench.envs import exact, penalty
from ratebench.core.grid import log_point


NEGATIVE_GAP = -1e-9  # a gap below this means F* was not the infimum of F


class Evaluator:
    def __init__(self, problem, reference, algorithm, f_argmin: torch.Tensor | None = None):
        """reference: the GlobalReference of the problem (envs/global_ref.py), or a bare F* float
        (then F_loc = F*). psi_gap's reference search starts at the LOCAL argmin (the basin of the
        true reward), or at f_argmin when given with a bare float."""
        self.problem, self.algorithm = problem, algorithm
        bound = None  # the reward class of psi_gap's min psi_lam: the reference's (model.reward.bound)
        if isinstance(reference, (int, float)):
            self.f_star = self.f_star_local = float(reference)
            local_argmin = f_argmin
        else:
            self.f_star, self.f_star_local = float(reference.value), float(reference.local_value)
            local_argmin, bound = reference.local_argmin, reference.reward_bound
        if local_argmin is not None:
            problem.derived.setdefault("psi_reference", penalty.PsiReference(problem, local_argmin, bound))
        self.true_rewards = problem.true_step_tables()
        self.j_star = float(exact.optimal_value(problem, self.true_rewards)[0])
        self.max_return = float(exact.max_return(problem, self.true_rewards)[0])  # value_gap's reference (no KL)
        # the method's own population targets (algorithms/targets.py), scored like a state; a bare F* float
        # carries no argmin to build the bilevel's from
        found = {} if isinstance(reference, (int, float)) else algorithm.population_targets(reference)
        self.targets = {name: self.target_record(t) for name, t in found.items()}
        self.target_policy_gap = self.targets["target"]["policy_gap"] if "target" in self.targets else math.nan

    def policy_gap(self, logps) -> torch.Tensor:
        """J* - J(pi) of per-step log-prob tables (B,)."""
        return self.j_star - exact.policy_value(self.problem, self.true_rewards, logps)

    def target_record(self, target) -> dict:
        """run.json's `target`: the target's policy_gap, gap, gap_local and reward_err (null without a reward),
        what it is, and the residual of its solve."""
        with torch.no_grad():
            record = {"what": target.what, "policy_gap": float(self.policy_gap(target.logps)[0]),
                      "gap": None, "gap_local": None, "reward_err": None,
                      "residual": target.residual, "solved": target.solved}
            if target.rewards is not None:
                objective = exact.bilevel_objective(self.problem, target.rewards)
                record.update(gap=float(self.gap(objective)[0]), gap_local=float(objective[0]) - self.f_star_local,
                              reward_err=float(exact.reward_error(self.problem, target.rewards)[0]))
        return record

    def gap(self, objective: torch.Tensor) -> torch.Tensor:
        """F(nu_t) - F* (B,); raises if any value is below NEGATIVE_GAP (F* was not the infimum)."""
        gap = objective - self.f_star
        if bool((gap < NEGATIVE_GAP).any()):
            raise RuntimeError(f"gap = F - F* = {float(gap.min()):.3g} < {NEGATIVE_GAP:g}: the global reference "
                               f"F* = {self.f_star:.9g} is not the infimum of F on this problem "
                               f"(an algorithm found F = {float(objective.min()):.9g}); report it with the env config")
        return gap

    def __call__(self, state) -> dict[str, torch.Tensor]:
        """Per-seed metrics, each (B,) float64."""
        return self.evaluate_many([state])[0]

    def evaluate_many(self, states: list, tables: dict | None = None) -> list[dict[str, torch.Tensor]]:
        """The metrics of several states of the same seeds, one dict of (B,) float64 per state: evaluate_columns,
        cut per state."""
        columns = self.evaluate_columns(states, tables)
        seeds = len(columns["gap"]) // len(states)
        return [{k: m[i * seeds:(i + 1) * seeds] for k, m in columns.items()} for i in range(len(states))]

    def evaluate_columns(self, states: list, tables: dict | None = None) -> dict[str, torch.Tensor]:
        """The metrics of several states of the same seeds (evaluation points the harness held back: harness/
        runner.py), each a column (P B,) float64 of every state's rows, state-major: what the harness writes. The
        states' rows are scored together, P x B rows in one pass through each formula, which is what makes many
        small evaluation points cheap. No formula mixes rows, but a matrix product over more rows may round
        differently in the last place (tests/test_held_evaluation.py): which states are scored together must not
        depend on a clock. What the algorithm reads off a state (its policy, reward estimate, penalty lam,
        predictions) is read per state. `tables`, when given, receives the states' rows as scored: "logps" (the
        deployed policies), "rewards" (the reward estimate's step tables) and, with a reward model, "star" (its
        pi*_nu), each a list of (P B, n_h, A) tables, for the seed-health check (health.observe)."""
        problem, algo = self.problem, self.algorithm
        threads = algo.step_threads  # the compiled steps' share of the cores: psi_gap's Newton and this thread's
        estimates = [algo.reward_model(s) for s in states]
        # psi_gap at l = grid_lambda(lam): the states that share a grid value are solved together, grid values in
        # the order the states reach them (min psi_l is warm-started from the nearest l solved before)
        lams = _by_grid_lambda([algo.schedule(s).get("lam") for s in states])
        if estimates[0] is not None:
            # grad F and grad psi_lam (docs/bilevel.md's surrogate, with the y* psi_gap solved and z* = pi*_nu) are
            # different functions of the same rows' nu. Autograd takes each function's gradient in the unit rewards
            # (the rows', and a copy of the rows psi_gap is solved at), and the network's closed-form backward
            # (RewardModel.backward, the fast path's, tested equal to autograd) carries each to nu: autograd through
            # the network itself costs several times that on these many small rows
            model, params = estimates[0][0], stack_rows([e[1] for e in estimates])
            units, acts = model.units(params)
            leaf = units.detach().requires_grad_(True)
            tables_rows = problem.step_tables_from_units(leaf)
            rewards = [t.detach() for t in tables_rows]
            with torch.no_grad():
                star = exact.soft_optimal(problem, rewards)[0]  # pi*_nu: psi's surrogate's z*, and the health check's
            # the rows' pair tables, built once for F, psi's inner problem and psi with its surrogate (None where
            # they are too large to keep: each builds its own chunks then)
            pairs = exact.pair_tables(problem, rewards)
        else:
            with torch.no_grad():
                rewards = stack_rows([[r.detach() for r in algo.implicit_rewards(s)] for s in states])
            star = pairs = None
        n_rows = rewards[0].shape[0]
        seeds = n_rows // len(states)  # each state has the same seeds: state i's rows are i * seeds ... (i + 1) * seeds
        lam_rows = [(lam_grid, torch.cat([torch.arange(i * seeds, (i + 1) * seeds) for i in members]))
                    for lam_grid, members in lams.items()]
        # psi_gap's Newton solves on a thread of its own (ctypes releases the GIL) while this one does the rest of
        # the torch work, when the run gives the evaluation more than one core: the same bits either way. With a
        # reward model only y* is solved there: psi_lam(nu) comes with its gradient's surrogate below
        overlap = threads > 1
        group_pairs = [None if pairs is None else pairs.rows(rows) for _, rows in lam_rows]  # each lam's rows' tables
        solving = [penalty.start_psi_minimiser(problem, [r[rows] for r in rewards], lam_grid,
                                               threads - 1 if overlap else threads, [t[rows] for t in star], overlap,
                                               group)
                   if estimates[0] is not None else
                   penalty.start_psi_gap_and_minimiser(problem, [r[rows] for r in rewards], lam_grid,
                                                       threads - 1 if overlap else threads, None, overlap)
                   for (lam_grid, rows), group in zip(lam_rows, group_pairs)]
        # min psi_l depends on l alone: read from its store (or solved) now, while the Newton runs, not after its wait
        # (its first read in a run costs ~0.5 ms: the store's key and file); PsiReference keeps it for psi_gap's finish
        min_psis = [penalty.min_psi(problem, lam_grid) for lam_grid, _ in lam_rows]
        with torch.no_grad():
            reward_err = exact.reward_error(problem, rewards)
            logps = [lp.detach() for lp in algo.stacked_policy_log_probs(states)]
            policy_gap = self.policy_gap(logps)
            value_gap = self.max_return - exact.expected_return(problem, self.true_rewards, logps)
            kl_ref = exact.kl_to_ref(problem, logps)
        psi_gap = torch.full((n_rows,), math.nan, dtype=torch.float64)
        psi_grad_sq = torch.full((n_rows,), math.nan, dtype=torch.float64)
        if estimates[0] is not None:
            objective = exact.bilevel_objective(problem, tables_rows, pairs)
            grad_f_units = torch.autograd.grad(objective.sum(), leaf)[0]
            objective = objective.detach()
            with torch.no_grad():  # J*(nu_t) - J(nu_t, theta_t): the lower level's own optimality
                optimal = exact.optimal_value(problem, rewards)
                lower_gap = optimal - exact.policy_value(problem, rewards, logps)
            grad_f = model.backward(params, acts, grad_f_units)  # (everything before psi_gap's first wait: the
            grad_sq = per_seed_sq_norm(grad_f)                   #  Newton's thread is still solving)
            pgrad_sq = per_seed_sq_norm(model.gradient_mapping(params, grad_f))
            again = torch.cat([rows for _, rows in lam_rows]) if lam_rows else torch.zeros(0, dtype=torch.long)
            leaf_again = units[again].detach().requires_grad_(True)
            tables_again = problem.step_tables_from_units(leaf_again)
            total, start = None, 0
            for (lam_grid, rows), finish, group, min_psi in zip(lam_rows, solving, group_pairs, min_psis):
                y = finish()
                copy = slice(start, start + len(rows))  # the same rows in tables_again
                start += len(rows)
                # psi_lam(nu) = h_lam(nu, y*) and the surrogate share f(nu, y*) and J(nu, y*): one pair table for both
                surrogate, psi_value = penalty.hypergradient_surrogate_and_psi(
                    problem, [t[copy] for t in tables_again], y, [t[rows] for t in star], lam_grid, optimal[rows],
                    group)
                psi_gap[rows] = psi_value - min_psi
                total = surrogate.sum() if total is None else total + surrogate.sum()
            if lam_rows:  # grad psi's unit rewards go back on their rows (the others stay 0, their psi_grad_sq NaN), so
                #         that it goes through the network's activations of all rows, as grad F did
                grad_psi_units = torch.zeros_like(grad_f_units)
                grad_psi_units[again] = torch.autograd.grad(total, leaf_again)[0]
                grad_psi = model.backward(params, acts, grad_psi_units)
                psi_grad_sq[again] = per_seed_sq_norm([g[again] for g in grad_psi])
        else:
            with torch.no_grad():
                objective = exact.bilevel_objective(problem, rewards)
            grad_sq = torch.full_like(objective, math.nan)
            pgrad_sq = grad_sq
            lower_gap = torch.full_like(objective, math.nan)
            for (_, rows), finish in zip(lam_rows, solving):
                psi_gap[rows] = finish()[0]
        if tables is not None:
            tables.update(logps=logps, rewards=rewards)
            if estimates[0] is not None:
                tables["star"] = star
        columns = {
            "gap": self.gap(objective),
            "gap_local": objective - self.f_star_local,
            "lower_gap": lower_gap,
            "grad_sq": grad_sq,
            "pgrad_sq": pgrad_sq,  # grad_sq of the projected gradient: the box's KKT points are its zeros
            "psi_grad_sq": psi_grad_sq,
            "policy_gap": policy_gap,
            "value_gap": value_gap,
            "target_policy_gap_excess": policy_gap - self.target_policy_gap,  # slow (> 0) vs biased (the target's)
            "psi_gap": psi_gap,
            "reward_err": reward_err,
            "kl_ref": kl_ref,
        }
        # the algorithm's exact predictions (Algorithm.predicted_metrics), e.g. reward_err_noise: one value per state
        predicted = [algo.predicted_metrics(state) for state in states]
        columns.update({k: torch.tensor([p[k] for p in predicted], dtype=torch.float64).repeat_interleave(seeds)
                        for k in predicted[0]})
        return columns


def _by_grid_lambda(lams: list) -> dict[float, list[int]]:
    """{grid_lambda(lam): indices of the states at it}, in the order of first appearance; states without a
    penalty (lam None, non-finite or <= 0) have no psi_gap and are left out."""
    groups: dict[float, list[int]] = {}
    for i, lam in enumerate(lams):
        if lam is not None and math.isfinite(lam) and lam > 0:
            groups.setdefault(penalty.grid_lambda(lam), []).append(i)
    return groups


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
