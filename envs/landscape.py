"""The landscape of F over tabular unit rewards and the constants of the theorem's premises
(weak gradient domination of F, gradient domination of J in theta, the penalty bias of psi_lam).

Pure functions on a TabularProblem: tables in, numbers out, every start or draw a batch row.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ratebench.envs.exact import bilevel_objective, optimal_value, policy_value, reward_error, soft_optimal
from ratebench.envs.global_ref import (BOX_FACE_SIZE, INTERIOR, MAX_FACE_SIZE, GroupPoints,
                                       box_conditions,
                                       gaussian_starts, group_objective, group_stationary_points, group_values,
                                       landscape_rows, objective_rows, policy_rows, sequence_form, to_units)
from ratebench.envs.lbfgs import minimise_rows
from ratebench.envs.penalty import minimise_psi
from ratebench.envs.tabular import TabularProblem

Tables = list[torch.Tensor]

START_SCALES = (0.3, 1.0, 3.0)  # Gaussian starts: these multiples of the true reward's std, in turn
STATIONARY_TOL = 1e-9  # a start has reached a stationary point when sup |dF/du| <= this
MAX_ITER = 3000  # L-BFGS iterations per start (the default bandit needs < 200)
VALUE_TOL = 1e-6  # two stationary points are one if their F differ by <= this ...
POLICY_TOL = 1e-3  # ... and their policies pi*_nu by <= this in sup-norm (rewards: only up to shifts)
ASYMPTOTIC_PROB = 1e-8  # a point with some pi*_nu(a|s) below this is a limit point: its rewards still diverge
WGD_STATIONARY = 1e-6  # wgd: sample points with ||grad|| <= this count as stationary for `floor`


# ---------------------------------------------------------------------------------------------- F, grad F

def objective_and_grad(problem: TabularProblem, units: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F and its gradient in tabular unit rewards, row by row: (B, n_units) -> ((B,), (B, n_units))."""
    with torch.enable_grad():
        u = units.detach().clone().requires_grad_(True)
        value = bilevel_objective(problem, problem.step_tables_from_units(u))
        (grad,) = torch.autograd.grad(value.sum(), u)
    return value.detach(), grad.detach()


def true_regret(problem: TabularProblem, logps: Tables) -> torch.Tensor:
    """policy_gap: J*(pi*) - J(pi) under the TRUE reward with the problem's beta. (B,)"""
    true = problem.true_step_tables()
    return optimal_value(problem, true)[0] - policy_value(problem, true, logps)


def describe_points(problem: TabularProblem, units: torch.Tensor) -> dict[str, torch.Tensor]:
    """value, grad_norm (Euclidean, in unit rewards), policy_gap, reward_err, max_abs_reward and
    min_policy_prob of each row of units (B, n_units); each (B,)."""
    value, grad = objective_and_grad(problem, units)
    with torch.no_grad():
        tables = problem.step_tables_from_units(units)
        logps, _ = soft_optimal(problem, tables)
        return {"value": value, "grad_norm": grad.norm(dim=1), "policy_gap": true_regret(problem, logps),
                "reward_err": reward_error(problem, tables), "max_abs_reward": units.abs().amax(1),
                "min_policy_prob": policy_rows(problem, units).amin(1)}


# ---------------------------------------------------------------------------------------------- multistart

def multistart_starts(problem: TabularProblem, n_starts: int, seed: int, bound: float | None = None) -> torch.Tensor:
    """(n_starts, n_units): the true reward, zero, then Gaussian draws at START_SCALES x std(R*)
    (optimisation variables: R tanh(x) are the unit rewards with a bound)."""
    return gaussian_starts(problem, n_starts, seed, START_SCALES, bound)


@dataclass
class Multistart:
    """Every start's end point. Shapes: S starts, n unit rewards."""

    x: torch.Tensor  # (S, n) end points (unit rewards)
    value: torch.Tensor  # (S,) F there
    grad_sup: torch.Tensor  # (S,) sup-norm of grad F there
    converged: torch.Tensor  # (S,) bool: grad_sup <= STATIONARY_TOL


def multistart(problem: TabularProblem, n_starts: int = 64, seed: int = 0, bound: float | None = None) -> Multistart:
    """Row-wise batched L-BFGS of F from multistart_starts, to STATIONARY_TOL (in x, units R tanh(x) with a
    bound). Computed once per (problem, n_starts, seed, bound) and kept in problem.derived."""
    key = ("multistart", n_starts, seed, bound)
    if key not in problem.derived:
        objective = objective_rows(problem, bound)
        res = minimise_rows(objective, multistart_starts(problem, n_starts, seed, bound), STATIONARY_TOL,
                            max_iter=MAX_ITER, rows_objective=lambda rows: objective)
        problem.derived[key] = Multistart(to_units(res.x, bound), res.value, res.grad_norm,
                                          res.grad_norm <= STATIONARY_TOL)
    return problem.derived[key]


def cluster(values: torch.Tensor, policies: torch.Tensor, value_tol: float = VALUE_TOL,
            policy_tol: float = POLICY_TOL) -> torch.Tensor:
    """Cluster labels (S,) long: rows i, j share a label when |F_i - F_j| <= value_tol and
    max |pi_i - pi_j| <= policy_tol (each row joins the first, lowest-value cluster it matches).
    values (S,), policies (S, P)."""
    close = ((values[:, None] - values[None, :]).abs() <= value_tol) & \
            ((policies[:, None, :] - policies[None, :, :]).abs().amax(-1) <= policy_tol)  # (S, S)
    labels = torch.full(values.shape, -1, dtype=torch.long)
    representatives: list[int] = []
    for i in values.argsort().tolist():
        match = [k for k, r in enumerate(representatives) if close[i, r]]
        if match:
            labels[i] = match[0]
        else:
            labels[i] = len(representatives)
            representatives.append(i)
    return labels


def stationary_points(problem: TabularProblem, n_starts: int, seed: int, f_star: float,
                      bound: float | None = None) -> list[dict]:
    """Distinct stationary points of F over tabular unit rewards reached by the multistart, lowest F
    first. Each: value, gap = F - f_star, grad_norm, policy_gap (true-reward regret of pi*_nu, same
    beta), reward_err, max_abs_reward, min_policy_prob, kind ("interior", or "asymptotic" when some
    pi*_nu(a|s) < ASYMPTOTIC_PROB: a limit as rewards diverge, where grad F -> 0 without a minimiser),
    share (fraction of all starts ending there), units (the point's unit rewards, a list). Starts
    that did not converge are left out. The multistart's list: enumerated_landscape is the complete one
    where the problem allows it."""
    ms = multistart(problem, n_starts, seed, bound)
    rows = ms.converged.nonzero().squeeze(1)
    if rows.numel() == 0:
        return []
    units = ms.x[rows]
    labels = cluster(ms.value[rows], policy_rows(problem, units).detach())
    info = describe_points(problem, units)
    points = []
    for label in range(int(labels.max()) + 1):
        members = (labels == label).nonzero().squeeze(1)
        best = int(members[info["value"][members].argmin()])  # the cluster's representative
        point = {k: float(v[best]) for k, v in info.items()}
        point["gap"] = point["value"] - f_star
        point["kind"] = "asymptotic" if point["min_policy_prob"] < ASYMPTOTIC_PROB else "interior"
        point["share"] = members.numel() / n_starts
        point["units"] = units[best].tolist()
        points.append(point)
    return sorted(points, key=lambda p: p["value"])


# ---------------------------------------------------------------------------------------------- premises

def wgd(values, grad_norms, f_star: float, tau_grid, stationary_tol: float = WGD_STATIONARY) -> dict:
    """Weak gradient domination tau (F - F*) <= ||grad F|| + eps_bias on a sample of points.

    eps_bias(tau) = sup_i [tau (F_i - F*) - ||grad F_i||]_+, the smallest bias that makes the
    inequality hold at every sample point for that tau; eps_bias(tau) / tau decreases in tau towards
    sup_i gap_i. floor = the largest gap among the stationary sample points (||grad|| <= stationary_tol;
    0 if none): no (tau, eps_bias) with eps_bias / tau below it can hold. values, grad_norms: (N,)."""
    gaps = np.asarray(values, dtype=float) - f_star
    grads = np.asarray(grad_norms, dtype=float)
    keep = np.isfinite(gaps) & np.isfinite(grads)
    gaps, grads = gaps[keep], grads[keep]
    tau = np.asarray(tau_grid, dtype=float)
    eps = np.maximum(tau[:, None] * gaps[None, :] - grads[None, :], 0.0).max(1) if gaps.size else np.zeros_like(tau)
    stationary = gaps[grads <= stationary_tol]
    return {"tau": tau.tolist(), "eps_bias": eps.tolist(),
            "floor": float(max(stationary.max(), 0.0)) if stationary.size else 0.0,
            "n_points": int(gaps.size), "n_stationary": int(stationary.size)}


def lower_level_domination(problem: TabularProblem, rewards: Tables, log_probs_of: Callable[[list], Tables],
                           params: list[torch.Tensor], tau_grid) -> dict:
    """Gradient domination of the lower level in the policy-network parameters theta:
    mu (J*(nu) - J(nu, theta)) <= ||grad_theta J(nu, theta)|| + eps, exactly, at D draws of theta.

    rewards [(1, n_h, A)] fix nu; params: stacked network parameters [(D, ...)], one draw per row;
    log_probs_of(params) -> policy tables [(D, n_h, A)] (the harness passes the network). Returns
    gap/grad ranges, eps_bias over tau_grid (as in `wgd`), tau_max = min_i ||grad_i|| / gap_i (the
    largest mu with eps = 0 on the draws) and pl_min = min_i ||grad_i||^2 / gap_i (the PL form)."""
    with torch.enable_grad():
        theta = [p.detach().clone().requires_grad_(True) for p in params]
        value = policy_value(problem, rewards, log_probs_of(theta))  # (D,)
        grads = torch.autograd.grad(value.sum(), theta)  # row d of each gradient is draw d's own
    grad_norm = sum(g.reshape(g.shape[0], -1).pow(2).sum(1) for g in grads).sqrt().detach()
    gap = (optimal_value(problem, rewards)[0] - value).detach()
    positive = gap > 0
    ratio = grad_norm[positive] / gap[positive]
    out = wgd(gap.numpy(), grad_norm.numpy(), 0.0, tau_grid)
    out.update({"n_draws": int(gap.numel()), "gap_min": float(gap.min()), "gap_max": float(gap.max()),
                "grad_norm_min": float(grad_norm.min()), "grad_norm_max": float(grad_norm.max()),
                "tau_max": float(ratio.min()) if ratio.numel() else math.inf,
                "pl_min": float((grad_norm[positive] ** 2 / gap[positive]).min()) if ratio.numel() else math.inf})
    return out


def fit_power(lam, bias) -> float:
    """q of bias ~ C lam^-q by least squares of log bias on log lam (NaN with < 2 positive points)."""
    lam, bias = np.asarray(lam, dtype=float), np.asarray(bias, dtype=float)
    ok = np.isfinite(bias) & (bias > 0)
    if ok.sum() < 2:
        return math.nan
    slope = np.polyfit(np.log(lam[ok]), np.log(bias[ok]), 1)[0]
    return float(-slope)


def penalty_bias(problem: TabularProblem, lam_grid, nu_loc: torch.Tensor, c_lam: float,
                 tol: float = 1e-9, bound: float | None = None) -> dict:
    """B(lam) = F(nu_lam) - F(nu_loc), nu_lam the minimiser of psi_lam continued from the local
    minimiser nu_loc (n_units,): lam from the largest down, each solve warm-started at the previous
    one (the first at nu_loc). A continuation that lands below F(nu_loc) has left nu_loc's basin
    (psi_lam's local minimum there no longer exists): that lam and all smaller are marked
    in_basin = False and left out of the fit. q: the power of B ~ lam^-q (log-log least squares);
    implied_exponent = 1 / (q c_lam): with lam_k ~ k^c_lam the bias alone decays as k^(-q c_lam),
    so reaching gap eps takes >= eps^(-1/(q c_lam)) steps by construction of the schedule.
    Returns lam, bias, psi (min psi_lam), f_lam (F(nu_lam)), in_basin, nu_lam (unit rewards), f_local,
    q, q_pairs (the local power between consecutive in-basin lam, increasing lam: its last entry is
    the best estimate of the lam -> infinity power), c_lam, implied_exponent."""
    f_loc = float(bilevel_objective(problem, problem.step_tables_from_units(nu_loc[None]))[0])
    order = sorted((float(l) for l in lam_grid), reverse=True)
    solved, start, inside = {}, nu_loc, True
    for lam in order:
        psi_value, nu_lam = minimise_psi(problem, lam, [start], tol=tol, max_iter=MAX_ITER, bound=bound)
        f_lam = float(bilevel_objective(problem, problem.step_tables_from_units(nu_lam[None]))[0])
        inside = inside and f_lam > f_loc
        solved[lam] = (f_lam - f_loc, psi_value, f_lam, inside, nu_lam.tolist())
        start = nu_lam
    lams = [float(l) for l in lam_grid]
    bias = [solved[l][0] for l in lams]
    in_basin = [solved[l][3] for l in lams]
    kept = [(l, b) for l, b, ok in zip(lams, bias, in_basin) if ok]
    q = fit_power([l for l, _ in kept], [b for _, b in kept])
    kept.sort()
    q_pairs = [fit_power([l0, l1], [b0, b1]) for (l0, b0), (l1, b1) in zip(kept[:-1], kept[1:])]
    return {"q_pairs": q_pairs,"lam": lams, "bias": bias, "psi": [solved[l][1] for l in lams], "f_lam": [solved[l][2] for l in lams],
            "in_basin": in_basin, "nu_lam": [solved[l][4] for l in lams], "f_local": f_loc, "q": q, "c_lam": float(c_lam),
            "implied_exponent": 1.0 / (q * c_lam) if q > 0 and c_lam > 0 else math.nan}


# ---------------------------------------------------------------------------------------------- enumerated landscape

def class_grad_norm(problem: TabularProblem, units: torch.Tensor, bound: float | None = None) -> torch.Tensor:
    """||grad F|| in the class's own coordinates, as a limit: Euclidean in unit rewards, with the rewards at
    +-bound left out (R tanh saturates there: their gradient in the reward network vanishes whatever dF/du). (B,)"""
    _, grad = objective_and_grad(problem, units)
    if bound is not None:
        grad = grad * (units.abs() < bound * (1 - 1e-9))
    return grad.norm(dim=1)


def box_kkt(form, beta: float, g: int, r: torch.Tensor, bound: float | None) -> torch.Tensor:
    """Whether group g's rewards r (m,) are a KKT point of F_g over the box [-R, R]^m: every reward off the
    bound stationary, every reward at the bound with its partial pointing out of the box (to KKT_TOL). A
    multistart end point of the R tanh class can be stationary in tanh's variable only because tanh saturates
    while dF/du points inwards: such a point is where the R tanh class stalls, not where projected SGD stops.
    Always true without a bound (no box)."""
    if bound is None:
        return torch.tensor(True)
    with torch.enable_grad():
        rr = r.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(group_objective(form, beta, torch.tensor([g]))(rr[None]).sum(), rr)
    pattern = (r >= bound * (1 - 1e-9)).long() - (r <= -bound * (1 - 1e-9)).long()
    stationary, outward = box_conditions(grad[None], pattern[None])
    return (stationary & outward)[0]


def _group_units(form, rows: GroupPoints, pick: list[int], n_units: int) -> torch.Tensor:
    """Unit rewards (n_units,) of the combined point made of per-group rows pick[g]."""
    units = torch.zeros(n_units, dtype=torch.float64)
    for g, i in enumerate(pick):
        units[form.unit[g]] = rows.r[i]
    return units


def enumerated_landscape(problem: TabularProblem, n_starts: int, seed: int, f_star: float,
                         bound: float | None = None, argmin: torch.Tensor | None = None) -> dict | None:
    """The stationary points of F on a sequence-form problem (bandit; token task of few sequences) by face
    enumeration, independent of the number of starts: F = sum_g rho(g) F_g, so its stationary points
    (interior, and the limits on simplex faces / box faces where grad F -> 0) are the products of each
    group's face points (global_ref.landscape_rows: the rows behind F*). None for other problems.

    Returns {"points": distinguished and multistart-found combined points (lowest F first; each
    describe_points' keys plus gap, kind, label, starts = multistart end points there, units),
    "groups": every group's face points ({group, value, face_size, interior, kkt, starts}),
    "n_per_group", "n_stationary" (their product: stationary points up to reward shifts),
    "floor", "floor_interior", "floor_kkt" (largest gap over all / interior / KKT points: sums of per-group
    maxima, exact), "plateau" (F of the deterministic-policy plateau: log 2 on a bandit; unbounded only),
    "n_unmatched" (multistart end points with a group part the enumeration lacks; added as points)}."""
    form = sequence_form(problem)
    limit = MAX_FACE_SIZE if bound is None else BOX_FACE_SIZE
    if form is None or form.unit.shape[1] > limit:
        return None
    G = form.unit.shape[0]
    rows = group_stationary_points(landscape_rows(problem, form, bound, seed))
    rho = problem.init_prob

    # the multistart's end points, matched group by group to the face points (how many starts found each)
    ms = multistart(problem, n_starts, seed, bound)
    ends = ms.x[ms.converged]
    found = torch.zeros(rows.value.numel(), dtype=torch.long)
    extra, combos = [], []
    if ends.shape[0]:
        r = ends[:, form.unit]  # (E, G, m)
        pi = torch.softmax(form.ref_logp + r / problem.beta, -1)
        values = group_values(form, problem.beta, ends)  # (E, G)
        for e in range(ends.shape[0]):
            pick = []
            for g in range(G):
                mine = (rows.group == g).nonzero().squeeze(1)
                close = ((rows.value[mine] - values[e, g]).abs() <= VALUE_TOL) & \
                        ((rows.pi[mine] - pi[e, g]).abs().amax(-1) <= POLICY_TOL)
                if close.any():
                    pick.append(int(mine[close.nonzero()[0, 0]]))
                else:
                    pick.append(-1)
                    extra.append((g, e))
            combos.append(tuple(pick))
    if extra:  # face points the enumeration lacks: join the list (their own rows)
        add = []
        for g, e in extra:
            face_size = int((pi[e, g] >= INTERIOR).sum())
            add.append(GroupPoints(torch.tensor([g]), values[e, g:g + 1], pi[e, g][None], r[e, g][None],
                                   torch.tensor([face_size]), torch.tensor([face_size == form.unit.shape[1]]),
                                   box_kkt(form, problem.beta, g, r[e, g], bound)[None], torch.tensor([True])))
        rows = GroupPoints.cat([rows] + add)
        found = torch.cat([found, torch.zeros(len(add), dtype=torch.long)])
        for k, (g, e) in enumerate(extra):
            pick = list(combos[e])
            pick[g] = rows.value.numel() - len(add) + k
            combos[e] = tuple(pick)
    for pick in combos:
        for i in pick:
            found[i] += 1

    def extreme(select, largest: bool) -> list[int] | None:
        pick = []
        for g in range(G):
            mine = ((rows.group == g) & select).nonzero().squeeze(1)
            if mine.numel() == 0:
                return None
            v = rows.value[mine]
            pick.append(int(mine[v.argmax() if largest else v.argmin()]))
        return pick

    def value_of(pick) -> float:
        return float(rows.value[pick] @ rho)

    everything = torch.ones_like(rows.stationary)
    named = {"global_minimiser": extreme(everything, False), "floor": extreme(everything, True),
             "floor_interior": extreme(rows.interior, True)}
    if bound is None:
        named["plateau"] = extreme(rows.face_size == 1, True)
    else:
        named["floor_kkt"] = extreme(rows.kkt, True)
    merged: dict[tuple, list] = {}  # one combined point per choice of group points: [labels, starts]
    for label, pick in named.items():
        if pick is not None:
            merged.setdefault(tuple(pick), [[], 0])[0].append(label)
    for c in combos:
        entry = merged.setdefault(c, [[], 0])
        entry[1] += 1
    for entry in merged.values():
        if entry[1] and not entry[0]:
            entry[0].append("multistart")
    picks = list(merged)
    stacked = torch.stack([_group_units(form, rows, list(c), problem.n_units) for c in picks])
    info = describe_points(problem, stacked)
    info["grad_norm"] = class_grad_norm(problem, stacked, bound)
    points = []
    for i, c in enumerate(picks):
        labels, starts = merged[c]
        point = {k: float(v[i]) for k, v in info.items()}
        point.update(gap=point["value"] - f_star, label=", ".join(labels), starts=starts, share=starts / n_starts,
                     units=stacked[i].tolist(), kind=_kind(point, bound))
        points.append(point)
    points.sort(key=lambda p: p["value"])
    per_group = [int((rows.group == g).sum()) for g in range(G)]
    groups = [{"group": int(rows.group[i]), "value": float(rows.value[i]), "face_size": int(rows.face_size[i]),
               "interior": bool(rows.interior[i]), "kkt": bool(rows.kkt[i]), "starts": int(found[i])}
              for i in range(rows.value.numel())]
    floors = {k: (value_of(named[k]) - f_star if named.get(k) is not None else None)
              for k in ("floor", "floor_interior", "floor_kkt")}
    return {"points": points, "groups": groups, "n_per_group": per_group, "n_stationary": math.prod(per_group),
            **floors, "plateau": value_of(named["plateau"]) if named.get("plateau") is not None else None,
            "n_unmatched": len(extra), "n_multistart_points": len(set(combos))}


def _kind(point: dict, bound: float | None) -> str:
    """interior, or asymptotic: some pi*_nu(a|s) < ASYMPTOTIC_PROB (unbounded) / some reward at the bound."""
    if bound is None:
        return "asymptotic" if point["min_policy_prob"] < ASYMPTOTIC_PROB else "interior"
    return "asymptotic" if point["max_abs_reward"] >= bound * (1 - 1e-9) else "interior"
