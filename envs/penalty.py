"""Exact penalty reformulation of the bilevel problem (docs/bilevel.md) on a TabularProblem.

psi_lam(nu) = min_theta f(nu, theta) + lam (g(nu, theta) - g*(nu)), g = -J; its minimisers y*
(numerical, L-BFGS on tabular logits) and z* = pi*_nu (closed form), the first-order
hypergradient of docs/bilevel.md, and min over nu of psi_lam. Tables in, tables out, like exact.py.
"""
from __future__ import annotations

import copy
import ctypes
import math
import os
import threading
from pathlib import Path

import torch

from ratebench.core.kernels import DISABLE, load, start_build, usable_cores
from ratebench.envs.exact import (PAIR_CHUNK, PairTables, expected_pair_loss, optimal_value, pair_losses,
                                  policy_value, seed_chunks, soft_optimal, trajectory_returns, upper_loss)
from ratebench.envs.lbfgs import ARMIJO, ROUNDING, minimise_rows
from ratebench.envs.tabular import TabularProblem

Tables = list[torch.Tensor]


def _log_softmax(logits: Tables) -> Tables:
    return [torch.log_softmax(t, -1) for t in logits]


def penalised_objective(problem: TabularProblem, rewards: Tables, logps: Tables, lam: float) -> torch.Tensor:
    """h_lam(nu, theta) = f(nu, theta) + lam (J*(nu) - J(nu, theta)) >= f: (B,).

    J*(nu) - J(nu, theta) = g(nu, theta) - g*(nu) >= 0 is the value penalty."""
    optimal, value = optimal_value(problem, rewards), policy_value(problem, rewards, logps)
    return penalised_value(upper_loss(problem, rewards, logps), optimal, value, lam)


def penalised_value(upper: torch.Tensor, optimal: torch.Tensor, value: torch.Tensor, lam: float) -> torch.Tensor:
    """h_lam from its parts: f(nu, theta) + lam (J*(nu) - J(nu, theta)), each (B,)."""
    return upper + lam * (optimal - value)


def _flatten(tables: Tables) -> torch.Tensor:
    return torch.cat([t.reshape(t.shape[0], -1) for t in tables], 1)


def _unflatten(flat: torch.Tensor, like: Tables) -> Tables:
    sizes = [t[0].numel() for t in like]
    return [part.reshape(flat.shape[0], *t.shape[1:]) for part, t in zip(flat.split(sizes, 1), like)]


# The inner problem is nonconvex. With these two settings no row of the 928 (seed, evaluation) rows of a
# 32-seed default-bandit run left z*'s basin; a floor of 1e-3 or a first move of 1 sent one row to a
# local minimum 2e-4 higher.
PRECONDITIONER_FLOOR = 1e-2
FIRST_MOVE = 0.1  # sup-norm of the first step in logits, before the solver knows any curvature


def _inverse_policy_diag(like: Tables):
    """Diagonal preconditioner 1 / (pi(a|s) + floor) for logit variables: the inverse of the KL
    term's curvature in a logit, which is ~ pi(a|s). Rare actions get proportionally larger steps
    instead of the tiny ones plain gradient steps give them (measured: 3.6x fewer objective
    evaluations on the default bandit at tolerance 1e-5)."""

    def diag(flat):
        probs = torch.cat([torch.softmax(t, -1).reshape(flat.shape[0], -1) for t in _unflatten(flat, like)], 1)
        return 1.0 / (probs + PRECONDITIONER_FLOOR)

    return diag


def penalty_minimiser(problem: TabularProblem, rewards: Tables, lam: float, tol: float = 1e-10,
                      max_iter: int = 1000) -> Tables:
    """y*_lam(nu) = argmin over tabular policies of f(nu, .) + lam g(nu, .): log-prob tables
    [(B, n_h, A)], detached. Starts at z* = pi*_nu (exact for lam -> infinity); each seed is
    solved by its own L-BFGS (envs/lbfgs.py) to a logit-gradient sup-norm of `tol`."""
    rewards = [r.detach() for r in rewards]
    start, _ = soft_optimal(problem, rewards)
    solved = []
    for part in seed_chunks(problem, start[0].shape[0]):
        part_rewards, part_start = [r[part] for r in rewards], [t[part] for t in start]
        losses = pair_losses(problem, part_rewards)  # f is a fixed quadratic form in theta's trajectory probabilities

        def per_seed(flat):
            # J* does not depend on theta: min over theta of f - lam J is argmin h_lam
            logps = _log_softmax(_unflatten(flat, part_start))
            return expected_pair_loss(problem, losses, logps) - lam * policy_value(problem, part_rewards, logps)

        solved.append(minimise_rows(per_seed, _flatten(part_start), tol, max_iter=max_iter,
                                    preconditioner=_inverse_policy_diag(part_start), first_step=FIRST_MOVE).x)
    return _log_softmax(_unflatten(torch.cat(solved), start))


# The same minimiser by Newton's method, batched over seeds (what psi_gap uses). In trajectory space the inner
# objective of one seed is, per initial state g with weight rho_g,
#   phi_g(P) = P^T L P - lam P.R + lam beta P.q,   q(tau) = sum_t log(pi / pi_ref)(s_t, a_t),
# with P(tau) = prod_t pi(a_t | s_t) * transitions, and d log P(tau) / d x_k = E[tau, k] - S[tau, k] pi_k for the
# logit x_k of (h, s, a) (E: visits of (h, s, a), S: visits of its state (h, s)). With u = d phi / d P and
# D = E - S pi, the gradient in logits is D^T (rho P u) and the Hessian
#   sum_g rho_g (P D)^T (L + L^T) (P D) + D^T diag(rho P (u + lam beta)) D - blockdiag_s w_s (diag pi_s - pi_s pi_s^T),
# w_s = sum_tau rho P u S[tau, s]: every term a few batched products, so a Newton step costs about what one
# L-BFGS objective call did and converges quadratically.
NEWTON_MAX_VARS = 512  # logits per seed up to which the inner solve is Newton's (dense Hessians); above, L-BFGS
NEWTON_TOL = 1e-9  # logit-gradient sup-norm at which Newton stops: below METRIC_TOL, so it is the more exact solve
NEWTON_MAX_MOVE = 1.0  # sup-norm cap of one Newton move in logits: keeps a step from z* in z*'s basin
NEWTON_MAX_ITER = 100


class _Design:
    """The trajectory/logit incidence of a problem, built once (_Design.of), over the T = G m trajectories
    (g-major): E (n, T) visits of (h, s, a), S (T, n) visits of the state of logit k, the same-state mask (n, n),
    rho_g and log transition probabilities per trajectory (T,), sum_t log pi_ref (T,).

    When the G groups own disjoint logit sets with one local structure (separable_groups), the inner objective is a
    sum of G independent terms, and `groups` (G, n/G) holds each group's logits (ascending, so whole states) and
    `part` the incidence of one group alone: E (n/G, m), S (m, n/G), same (n/G, n/G), G = 1 (its per-trajectory
    vectors are the whole design's, one row per group: _Inner). Otherwise both are None."""

    def __init__(self, E, S, same, G: int, m: int, A: int, log_trans=None, rho=None, ref=None):
        self.E, self.S, self.same, self.log_trans, self.rho, self.ref = E, S, same, log_trans, rho, ref
        self.G, self.m, self.n, self.A = G, m, E.shape[0], A
        self.groups, self.part = None, None

    @classmethod
    def of(cls, problem: TabularProblem) -> _Design:
        table, A = problem.trajectory_table(), problem.n_actions
        offsets, rows = [], 0
        for step in problem.steps:
            offsets.append(rows)
            rows += step.n_states
        n = rows * A
        G, m, _ = table.states.shape
        E = torch.zeros(G * m, n, dtype=torch.float64)
        S = torch.zeros(G * m, n, dtype=torch.float64)
        actions = torch.arange(A)
        for h in range(problem.horizon):
            state_row = (offsets[h] + table.states[..., h]).reshape(-1, 1)  # (T, 1)
            E.scatter_add_(1, state_row * A + table.actions[..., h].reshape(-1, 1), torch.ones(G * m, 1, dtype=E.dtype))
            S.scatter_add_(1, state_row * A + actions, torch.ones(G * m, A, dtype=S.dtype))
        state_of, E = torch.arange(n) // A, E.T.contiguous()
        ref = torch.cat([step.ref_logp.reshape(-1) for step in problem.steps]) @ E
        design = cls(E, S, (state_of[:, None] == state_of[None, :]).to(torch.float64), G, m, A,
                     log_trans=table.log_trans.reshape(-1), rho=problem.init_prob.repeat_interleave(m), ref=ref)
        design.groups, design.part = design._split()
        return design

    def _split(self):
        """(groups, part) of the class docstring, or (None, None): one group (nothing to split), a logit that two
        groups or none touch, groups of different sizes, or groups whose local E, S or state blocks differ."""
        G, m = self.G, self.m
        touched = ((self.E.T + self.S) != 0).reshape(G, m, self.n).any(1)  # (G, n): the logits group g's terms read
        sizes = touched.sum(1)
        if G == 1 or not bool((touched.sum(0) == 1).all()) or not bool((sizes == sizes[0]).all()):
            return None, None
        groups = touched.nonzero()[:, 1].reshape(G, -1)  # row-major: each group's logits ascending
        local = [(self.E[k][:, g * m:(g + 1) * m], self.S[g * m:(g + 1) * m][:, k], self.same[k][:, k])
                 for g, k in enumerate(groups)]
        if not all(torch.equal(a, b) for other in local[1:] for a, b in zip(local[0], other)):
            return None, None
        return groups, _Design(*(t.contiguous() for t in local[0]), G=1, m=m, A=self.A)


def _design(problem: TabularProblem) -> _Design:
    if "penalty_design" not in problem.derived:
        problem.derived["penalty_design"] = _Design.of(problem)
    return problem.derived["penalty_design"]


def separable_groups(problem: TabularProblem) -> torch.Tensor | None:
    """Each initial state's logits (G, n/G), flat indices in _flatten's order, when the G > 1 groups own disjoint
    logit sets covering all n logits, with the same incidence inside every group (the bandit: a context's actions);
    None otherwise (the mdp's groups share states; token has one group). penalty_minimiser_newton then solves every
    (seed, group) as its own problem of n/G logits."""
    return _design(problem).groups


class _Inner:
    """The inner objective of penalty_minimiser for a batch of seeds, with its closed-form gradient and Hessian in
    the flat logits x (B, n) (_flatten's order). Values equal per_seed's in penalty_minimiser. With split (the
    problem's separable_groups), the rows are the B G (seed, group) pairs, x (B G, n/G) a group's logits
    (_Design.groups), on the design of one group with that group's rho_g, transitions and pi_ref per row: a seed's
    value is the sum of its groups' rows, and its gradient and Hessian are theirs, block by block."""

    def __init__(self, problem: TabularProblem, rewards: Tables, lam: float, split: bool = False,
                 losses: torch.Tensor | None = None):
        """losses: the rewards' pair_losses, when the caller has them (exact.pair_tables)."""
        d = _design(problem)
        losses = pair_losses(problem, rewards) if losses is None else losses  # (B, G, m, m)
        returns = trajectory_returns(problem, rewards)  # (B, G, m)
        weight, self.rho, self.log_trans, ref = problem.init_prob[:, None, None], d.rho, d.log_trans, d.ref
        if split:
            B, G, m = returns.shape
            losses, returns = losses.reshape(B * G, 1, m, m), returns.reshape(B * G, 1, m)
            weight = weight.repeat(B, 1, 1)[:, None]  # (B G, 1, 1, 1)
            self.rho, self.log_trans, ref = (v.reshape(G, m).repeat(B, 1) for v in (d.rho, d.log_trans, d.ref))
            d = d.part
        self.d, self.lam, self.lam_beta = d, lam, lam * problem.beta
        self.Lsym = losses + losses.transpose(-1, -2)
        self.Lrho = self.Lsym * weight
        self.lin = -lam * returns.flatten(1) - self.lam_beta * ref  # (B, T)

    def rows(self, keep: torch.Tensor) -> _Inner:
        """The same objective on the rows where `keep` (B,) is True."""
        part = copy.copy(self)
        part.Lsym, part.Lrho, part.lin = self.Lsym[keep], self.Lrho[keep], self.lin[keep]
        if self.rho.dim() == 2:  # per row (split), else shared (T,)
            part.rho, part.log_trans = self.rho[keep], self.log_trans[keep]
        return part

    def _parts(self, x: torch.Tensor):
        d = self.d
        lp = torch.log_softmax(x.reshape(x.shape[0], -1, d.A), -1).reshape(x.shape)
        lpE = lp @ d.E  # sum_t log pi(a_t | s_t): (B, T)
        P = (lpE + self.log_trans).exp()
        LP = (self.Lsym @ P.reshape(-1, d.G, d.m, 1)).reshape(P.shape)
        u = LP + self.lin + self.lam_beta * lpE  # d phi / d P, without its constant lam beta
        value = ((u - 0.5 * LP) * P * self.rho).sum(-1)
        return lp, P, u, value

    def value(self, x: torch.Tensor) -> torch.Tensor:
        return self._parts(x)[-1]

    def value_grad_hessian(self, x: torch.Tensor):
        d = self.d
        lp, P, u, value = self._parts(x)
        pi = lp.exp()
        rPu = self.rho * P * u
        grad = rPu @ d.E.T - (rPu @ d.S) * pi
        D = d.E.T - d.S * pi[:, None, :]  # d log P(tau) / d x: (B, T, n)
        PD = P[..., None] * D
        LPD = (self.Lrho @ PD.reshape(-1, d.G, d.m, d.n)).reshape(PD.shape)
        hess = D.transpose(1, 2) @ (P[..., None] * LPD + (self.rho * P * (u + 2 * self.lam_beta))[..., None] * D)
        w = (rPu + self.lam_beta * self.rho * P) @ d.S * pi  # w_s pi_k, u with its constant
        hess = hess - torch.diag_embed(w) + w[:, :, None] * pi[:, None, :] * d.same
        return value, grad, hess


def _newton_direction(g: torch.Tensor, H: torch.Tensor, gauge: torch.Tensor, max_move: float) -> torch.Tensor:
    """-H^-1 g with H + gauge (the softmax's shifts, on which H is 0 and g has no component) made definite by
    |eigenvalues| where Cholesky fails, capped at max_move in sup-norm."""
    M = H + gauge
    chol, info = torch.linalg.cholesky_ex(M)
    d = -torch.cholesky_solve(g[..., None], chol)[..., 0]
    indefinite = info != 0
    if bool(indefinite.any()):  # on the whole batch, so a seed's bits never depend on how many others are indefinite
        ev, V = torch.linalg.eigh(torch.where(indefinite[:, None, None], M, torch.eye(M.shape[-1], dtype=M.dtype)))
        inv = 1.0 / ev.abs().clamp_min(1e-8 * ev.abs().amax(-1, keepdim=True).clamp_min(1.0))
        modified = -(V @ (inv[..., None] * (V.transpose(-1, -2) @ g[..., None])))[..., 0]
        d = torch.where(indefinite[:, None], modified, d)
    return d * (max_move / d.abs().amax(-1).clamp_min(max_move))[:, None]


def newton_rows(inner: _Inner, x0: torch.Tensor, tol: float = NEWTON_TOL, max_iter: int = NEWTON_MAX_ITER,
                max_move: float = NEWTON_MAX_MOVE, compact: bool = False):
    """Minimise inner.value row by row from x0 (B, n) by Newton's method (_newton_direction) with Armijo
    backtracking per row. A row stops when its gradient sup-norm is <= tol, or when no step decreases f and its
    gradient is <= METRIC_TOL (the precision floor of f). compact: stopped rows leave the batch instead of being
    carried along (only where inner's arithmetic is row by row at every batch size, so that no row's bits change).
    Returns (x, converged (B,))."""
    x = x0.detach().clone()
    converged = torch.zeros(x.shape[0], dtype=torch.bool)
    rows, part, xs = torch.arange(x.shape[0]), inner, x.clone()  # the rows in the batch, their objective and x
    f, g, H = part.value_grad_hessian(xs)
    going = torch.isfinite(f) & torch.isfinite(g).all(-1)  # a non-finite row is left to the caller, unconverged
    eye = torch.eye(x.shape[1], dtype=x.dtype)
    for _ in range(max_iter):
        done = going & (g.abs().amax(-1) <= tol)
        converged[rows[done]] = True
        going &= ~done
        if not bool(going.any()):
            break
        if compact and not bool(going.all()):
            rows, part, xs, f, g, H = rows[going], part.rows(going), xs[going], f[going], g[going], H[going]
            going = going[going]
        H = torch.where(going[:, None, None], H, eye)  # stopped rows' Hessians are not factorised
        d = torch.where(going[:, None], _newton_direction(g, H, part.d.same, max_move), 0.0)
        slope = (g * d).sum(-1)
        slack = ROUNDING * (1.0 + f.abs())
        f1, g1, H1 = part.value_grad_hessian(xs + d)  # the full step, which Newton takes almost always
        ok = going & (f1 <= f + ARMIJO * slope + slack) & torch.isfinite(f1)
        searching = going & ~ok
        x_new = torch.where(ok[:, None], xs + d, xs)
        if bool(searching.any()):  # backtrack on the value alone, then one gradient and Hessian
            step = torch.full_like(f, 0.5)
            for _ in range(60):
                trial = xs + step[:, None] * d
                f_trial = part.value(trial)
                found = searching & (f_trial <= f + ARMIJO * step * slope + slack) & torch.isfinite(f_trial)
                x_new = torch.where(found[:, None], trial, x_new)
                searching &= ~found
                if not bool(searching.any()):
                    break
                step = torch.where(searching, 0.5 * step, step)
            stalled = searching
            converged[rows[stalled & (g.abs().amax(-1) <= METRIC_TOL)]] = True
            going &= ~stalled
            xs = x_new
            f, g, H = part.value_grad_hessian(xs)
        else:
            xs, f, g, H = x_new, f1, g1, H1
        x[rows] = xs
    return x, converged


NEWTON_SOURCE = Path(__file__).with_name("penalty_newton.c")  # newton_rows for split rows, in C
INDEFINITE = 2  # penalty_newton.c's status bit of a row that took the eigenvalue direction (bit 1: converged)
SPLIT_NEWTON_PATHS = {"c": 0, "torch": 0, "indefinite": 0}  # chunks solved by each path; rows of the C path that
#                                                            took the eigenvalue direction (an indefinite H + same)
I64, F64 = ctypes.c_int64, ctypes.c_double


class _Solve(ctypes.Structure):  # penalty_newton.c's Solve
    _fields_ = [*[(name, I64) for name in ("R", "k", "m", "A", "max_iter", "backtracks", "unrolled", "n_threads")],
                *[(name, ctypes.POINTER(F64))
                  for name in ("E", "S", "same", "Lsym", "Lrho", "lin", "rho", "log_trans")],
                *[(name, F64) for name in ("lam_beta", "tol", "max_move", "armijo", "rounding", "metric_tol")],
                ("x0", ctypes.POINTER(F64)), ("x", ctypes.POINTER(F64)),
                ("status", ctypes.POINTER(I64)), ("next_row", ctypes.POINTER(I64))]


NEWTON_OPTIMISE = "-O2"  # -O3 built in 7.4 s and -O2 in 1.9 s (AVX-512 machine); the README job's evaluation took the
#                          same time with either (26-28 ms, 7 runs each)


def split_newton_applies(problem: TabularProblem) -> bool:
    """Whether psi_gap's Newton runs on this problem's (seed, group) rows, the rows penalty_newton.c solves: Newton
    applies and the groups split (separable_groups)."""
    return newton_applies(problem) and separable_groups(problem) is not None


def start_newton_build(problem: TabularProblem) -> list[str]:
    """Start building penalty_newton.c (core/kernels.start_build) where psi_gap will load it (split_newton_applies):
    the harness calls it before it solves F-hat*, so that the two overlap. The source's name if a build started."""
    started = split_newton_applies(problem) and start_build(NEWTON_SOURCE, NEWTON_OPTIMISE)
    return [NEWTON_SOURCE.name] if started else []


def newton_library():
    """penalty_newton.c built and loaded (core/kernels.py: cached, warned once), or None: RATEBENCH_KERNELS=0 (read
    at each call), no compiler or a failed build. None: split rows take the torch newton_rows."""
    if os.environ.get(DISABLE, "1") == "0":
        return None
    lib = load(NEWTON_SOURCE, optimise=NEWTON_OPTIMISE)
    if lib is not None and not hasattr(lib, "checked"):
        lib.split_newton.argtypes, lib.split_newton.restype = [ctypes.POINTER(_Solve)], I64
        lib.help_split_newton.argtypes, lib.help_split_newton.restype = [ctypes.POINTER(_Solve)], I64
        lib.solve_struct_size.restype = I64
        lib.eigen_symmetric.argtypes, lib.eigen_symmetric.restype = [I64, I64, *[ctypes.POINTER(F64)] * 3], None
        if lib.solve_struct_size() != ctypes.sizeof(_Solve):  # the two layouts of one struct: fail, never misread
            raise RuntimeError(f"penalty_newton.c's Solve is {lib.solve_struct_size()} bytes, _Solve "
                               f"{ctypes.sizeof(_Solve)}: their fields differ")
        lib.checked = True
    return lib


NEWTON_ROWS_PER_THREAD = 32  # split rows per thread at least: a row takes ~4 us in C, a thread ~35 us of CPU to start


def newton_threads(rows: int, threads: int | None = None) -> int:
    """Threads for a compiled split solve of `rows` rows: `threads`, or every core this process may use when None or
    0 (the harness's step_threads reading), at most one per NEWTON_ROWS_PER_THREAD rows, at least 1."""
    return max(1, min(int(threads or usable_cores()), rows // NEWTON_ROWS_PER_THREAD))


def compiled_newton_rows(lib, inner: _Inner, x0: torch.Tensor, tol: float = NEWTON_TOL,
                         max_iter: int = NEWTON_MAX_ITER, max_move: float = NEWTON_MAX_MOVE, unrolled: bool = True,
                         threads: int | None = None):
    """newton_rows on split rows (inner = _Inner(split=True)) by penalty_newton.c: (x (R, k), status (R,)), status & 1
    converged, status & INDEFINITE where some iteration took the eigenvalue direction (H + same not positive
    definite). unrolled=False: the C file's generic loops instead of its copies unrolled for k = m in {4, 6, 8} (the
    same bits; tests compare them). The rows are split across newton_threads(R, threads) threads: the same bits."""
    solve, x, status = prepare_compiled_newton_rows(lib, inner, x0, tol, max_iter, max_move, unrolled, threads)
    solve()
    return x, status


def prepare_compiled_newton_rows(lib, inner: _Inner, x0: torch.Tensor, tol: float = NEWTON_TOL,
                                 max_iter: int = NEWTON_MAX_ITER, max_move: float = NEWTON_MAX_MOVE,
                                 unrolled: bool = True, threads: int | None = None):
    """compiled_newton_rows' inputs laid out for penalty_newton.c, and the output tensors: (solve, x, status), where
    solve() makes the C call that fills x and status (a _CompiledSolve). It touches no Python object and ctypes
    releases the GIL around it, so another thread can run it while this one goes on, and join it (solve.help())."""
    d = inner.d
    R, k = x0.shape
    m = d.m

    def flat(t, shape):
        return t.detach().to(torch.float64).reshape(shape).contiguous()

    keep = [flat(d.E, (k, m)), flat(d.S, (m, k)), flat(d.same, (k, k)), flat(inner.Lsym, (R, m, m)),
            flat(inner.Lrho, (R, m, m)), flat(inner.lin, (R, m)), flat(inner.rho, (R, m)),
            flat(inner.log_trans, (R, m)), flat(x0, (R, k))]
    x, status = torch.empty(R, k, dtype=torch.float64), torch.empty(R, dtype=torch.int64)
    keep.append(torch.zeros(1, dtype=torch.int64))  # the next row no thread has taken (Solve.next_row)

    def ptr(t, ctype=F64):
        return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctype))

    q = _Solve(R, k, m, d.A, max_iter, 60, int(unrolled), newton_threads(R, threads),  # 60: newton_rows' halvings
               *[ptr(t) for t in keep[:8]],
               inner.lam_beta, tol, max_move, ARMIJO, ROUNDING, METRIC_TOL,
               ptr(keep[8]), ptr(x), ptr(status, I64), ptr(keep[9], I64))
    return _CompiledSolve(lib, q, keep), x, status


class _CompiledSolve:
    """One prepared penalty_newton.c call: calling it solves every row (split_newton); help(), from another thread
    while that call runs, takes rows of the same call too (help_split_newton), so that a thread that has nothing
    else to do shortens the wait. Which thread solves a row does not change its bits."""

    def __init__(self, lib, q: _Solve, inputs: list[torch.Tensor]):
        self.lib, self.q = lib, q
        self.inputs = inputs  # the tensors whose memory the C reads, held until it has

    def __call__(self) -> None:
        if self.lib.split_newton(ctypes.byref(self.q)) != 0:
            raise RuntimeError("penalty_newton.c refused its sizes, could not allocate its scratch or start a thread")

    def help(self) -> None:
        if self.lib.help_split_newton(ctypes.byref(self.q)) != 0:
            raise RuntimeError("penalty_newton.c refused its sizes or could not allocate its scratch")


def newton_path(problem: TabularProblem) -> str | None:
    """Which solve psi_gap's Newton runs on this problem: "compiled" (penalty_newton.c on the split rows), "torch"
    (newton_rows: the whole seed, or split rows without the compiled library), None where Newton does not apply."""
    if not newton_applies(problem):
        return None
    return "compiled" if split_newton_applies(problem) and newton_library() is not None else "torch"


def split_newton_rows(inner: _Inner, x0: torch.Tensor, tol: float = NEWTON_TOL, max_iter: int = NEWTON_MAX_ITER,
                      max_move: float = NEWTON_MAX_MOVE, threads: int | None = None):
    """newton_rows(inner, x0, compact=True) on split rows: by penalty_newton.c where it builds (newton_library), the
    same algorithm up to rounding (its eigenvalue direction by Jacobi rotations, not LAPACK's eigh); else by
    newton_rows. threads: compiled_newton_rows' (None: every core). Returns (x, converged (R,))."""
    return start_split_newton_rows([(inner, x0)], tol, max_iter, max_move, threads)()[0]


def start_split_newton_rows(row_sets: list, tol: float = NEWTON_TOL, max_iter: int = NEWTON_MAX_ITER,
                            max_move: float = NEWTON_MAX_MOVE, threads: int | None = None, background: bool = False):
    """split_newton_rows on each (inner, x0) of row_sets, as a function to call for the list of results. With
    background and the compiled library, the C calls (and nothing else: no torch, no Python object) run one after
    the other on a Python thread of their own while the caller goes on; the same bits."""
    lib = newton_library()
    if lib is None:
        SPLIT_NEWTON_PATHS["torch"] += len(row_sets)
        solved = [newton_rows(inner, x0, tol, max_iter, max_move, compact=True) for inner, x0 in row_sets]
        return lambda: solved
    SPLIT_NEWTON_PATHS["c"] += len(row_sets)
    prepared = [prepare_compiled_newton_rows(lib, inner, x0, tol, max_iter, max_move, threads=threads)
                for inner, x0 in row_sets]
    later = _Later(lambda: [solve() for solve, _, _ in prepared], background)

    def finish() -> list:
        if background:  # this thread takes the rows the solve's thread has not taken yet, instead of only waiting
            for solve, _, _ in prepared:
                solve.help()
        later.result()
        SPLIT_NEWTON_PATHS["indefinite"] += sum(int(((status & INDEFINITE) != 0).sum()) for _, _, status in prepared)
        return [(x, (status & 1) == 1) for _, x, status in prepared]

    return finish


def newton_applies(problem: TabularProblem) -> bool:
    """Whether penalty_minimiser_newton solves this problem's inner problem: n <= NEWTON_MAX_VARS logits (dense
    (n, n) Hessians per seed) and a (T, n) trajectory/logit table of at most PAIR_CHUNK elements per seed."""
    n = sum(step.n_states for step in problem.steps) * problem.n_actions
    return n <= NEWTON_MAX_VARS and problem.n_groups * problem.trajectories_per_group() * n <= PAIR_CHUNK


def penalty_minimiser_newton(problem: TabularProblem, rewards: Tables, lam: float, tol: float = NEWTON_TOL,
                             threads: int | None = None, start: Tables | None = None) -> Tables:
    """penalty_minimiser's y*_lam(nu) from the same start z* = pi*_nu, by Newton's method on every seed at once
    (newton_rows) to a logit-gradient sup-norm of `tol`; where the groups own disjoint logits (separable_groups), on
    every (seed, group) at once (split_newton_rows: in C where it builds), a seed converged when all its groups are.
    A seed Newton leaves unconverged (after NEWTON_MAX_ITER iterations, or non-finite) gets penalty_minimiser's
    solution (L-BFGS, METRIC_TOL, on the whole seed chunk). threads: split_newton_rows' (None: every core; the same
    bits whatever it is). start: pi*_nu's log-prob tables where the caller has them (soft_optimal's, the same
    bits). Log-prob tables [(B, n_h, A)], detached."""
    return start_penalty_minimiser_newton(problem, rewards, lam, tol, threads, start)()


def start_penalty_minimiser_newton(problem: TabularProblem, rewards: Tables, lam: float, tol: float = NEWTON_TOL,
                                   threads: int | None = None, start: Tables | None = None,
                                   background: bool = False, pairs: PairTables | None = None):
    """penalty_minimiser_newton as a function to call for its result. background: the compiled split solves run on
    a Python thread of their own (start_split_newton_rows), so that the caller's torch work and the solve share the
    cores until it calls; the same bits, since no row reads another's memory. Without the compiled path everything
    is done before this returns. pairs: the rewards' exact.pair_tables, where the caller has them."""
    rewards = [r.detach() for r in rewards]
    start = soft_optimal(problem, rewards)[0] if start is None else [t.detach() for t in start]
    d = _design(problem)
    groups = d.groups  # separable: one row per (seed, group) of n/G logits; a seed converged when all its groups did
    n_row = d.n if groups is None else d.part.n  # logits per Newton row
    per_seed = max(1, PAIR_CHUNK // (d.G * d.m * max(d.m, n_row)))
    x0, parts, dense, split = _flatten(start), [], [], []  # dense: (x, converged) per chunk; split: (inner, rows)
    for lo in range(0, x0.shape[0], per_seed):
        part = slice(lo, lo + per_seed)
        parts.append(part)
        inner = _Inner(problem, [r[part] for r in rewards], lam, split=groups is not None,
                       losses=None if pairs is None else pairs.losses[part])
        if groups is None:
            dense.append(newton_rows(inner, x0[part], tol, NEWTON_MAX_ITER))
        else:
            # a row's arithmetic is its own at every batch size here (tests/test_penalty_split.py), so converged rows
            # leave the batch (torch) or each row is solved alone (penalty_newton.c); the dense rows' (B, T) x (T, n)
            # products are not (odd batch sizes take other kernels)
            split.append((inner, x0[part][:, groups].reshape(-1, d.part.n)))
    solving = None if groups is None else start_split_newton_rows(split, tol, NEWTON_MAX_ITER, threads=threads,
                                                                   background=background)

    def finish() -> Tables:
        solved = []  # each chunk's log-prob rows
        for part, (x, converged) in zip(parts, dense if solving is None else solving()):
            if groups is not None:  # the chunk's (seed, group) rows back into its seeds' logits
                x_rows, x = x, torch.empty_like(x0[part])
                x[:, groups.reshape(-1)] = x_rows.reshape(x.shape[0], -1)
                converged = converged.reshape(x.shape[0], d.G).all(-1)
            # Newton's logits as log-probs; the L-BFGS's rows below are log-probs already and stay as it returned
            # them (normalised again, a row moved by an ulp on an AVX2 CPU: tests/test_penalty_newton.py)
            x = _flatten(_log_softmax(_unflatten(x, start)))
            if not bool(converged.all()):  # the L-BFGS on the whole chunk, as before Newton: its rows' bits then do
                #                             not depend on which other seeds fell back (einsum's paths depend on the
                #                             batch)
                fallback = _flatten(penalty_minimiser(problem, [r[part] for r in rewards], lam, tol=METRIC_TOL))
                x = torch.where(converged[:, None], x, fallback)
            solved.append(x)
        return _unflatten(torch.cat(solved), start)

    return finish


class _Later:
    """compute() run now, or with background on a Python thread of its own; result() waits for it and returns its
    value (or raises what it raised). A thread per call, not a pool: a pool's thread does not survive a fork."""

    def __init__(self, compute, background: bool):
        self._value, self._error, self._thread = None, None, None
        if background:
            self._thread = threading.Thread(target=self._run, args=(compute,), name="ratebench-psi-newton", daemon=True)
            self._thread.start()
        else:
            self._run(compute)

    def _run(self, compute) -> None:
        try:
            self._value = compute()
        except BaseException as error:  # noqa: BLE001 (any error, handed as it is to the caller by result())
            self._error = error

    def result(self):
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error
        return self._value


def psi(problem: TabularProblem, rewards: Tables, lam: float, y: Tables | None = None, tol: float = 1e-10) -> torch.Tensor:
    """psi_lam(nu) = h_lam(nu, y*_lam(nu)): (B,). Pass y to reuse a solved minimiser. The value's
    error is second order in the inner gradient tolerance `tol`."""
    y = penalty_minimiser(problem, rewards, lam, tol=tol) if y is None else y
    return penalised_objective(problem, rewards, y, lam)


def hypergradient_surrogate(problem: TabularProblem, rewards: Tables, y: Tables, z: Tables, lam: float) -> torch.Tensor:
    """Scalar per seed whose nu-gradient (through `rewards`) is the docs/bilevel.md formula
    grad psi_lam = grad_nu f(nu, y) + lam (grad_nu g(nu, y) - grad_nu g(nu, z)), y, z held fixed,
    grad_nu g(nu, theta) = -E_{tau ~ pi_theta}[grad_nu R_nu(tau)]. (B,)"""
    return _surrogate_parts(problem, rewards, y, z, lam)[0]


def hypergradient_surrogate_and_psi(problem: TabularProblem, rewards: Tables, y: Tables, z: Tables, lam: float,
                                    optimal: torch.Tensor, pairs: PairTables | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(hypergradient_surrogate (B,), psi_lam(nu) = h_lam(nu, y) (B,), detached) with y = y*_lam(nu) solved, from the
    same pass: the surrogate's f(nu, y) and J(nu, y) are psi's terms, so the evaluation builds the rows' pair table
    once for both (or none: pairs, their exact.pair_tables). optimal: J*(nu) of these rows (exact.optimal_value),
    detached."""
    surrogate, upper, value = _surrogate_parts(problem, rewards, y, z, lam, pairs)
    return surrogate, penalised_value(upper.detach(), optimal, value.detach(), lam)


def _surrogate_parts(problem: TabularProblem, rewards: Tables, y: Tables, z: Tables, lam: float,
                     pairs: PairTables | None = None):
    """(surrogate, f(nu, y), J(nu, y)), each (B,) in the graph of `rewards`."""
    y, z = [t.detach() for t in y], [t.detach() for t in z]
    upper, value = upper_loss(problem, rewards, y, pairs=pairs), policy_value(problem, rewards, y)
    return upper + lam * (-value + policy_value(problem, rewards, z)), upper, value


def psi_gradient(problem: TabularProblem, unit_rewards: torch.Tensor, lam: float) -> torch.Tensor:
    """grad psi_lam in tabular unit rewards (B, n_units) via the docs/bilevel.md formula with exact y*, z*."""
    u = unit_rewards.detach().clone().requires_grad_(True)
    rewards = problem.step_tables_from_units(u)
    y = penalty_minimiser(problem, rewards, lam)
    z, _ = soft_optimal(problem, [r.detach() for r in rewards])
    return torch.autograd.grad(hypergradient_surrogate(problem, rewards, y, z, lam).sum(), u)[0]


def minimise_psi(problem: TabularProblem, lam: float, starts: list[torch.Tensor], tol: float = 1e-8,
                 max_iter: int = 400, bound: float | None = None) -> tuple[float, torch.Tensor]:
    """min over tabular unit rewards (in [-bound, bound] when set, written bound tanh(x)) of psi_lam:
    joint L-BFGS over (nu, theta) of h_lam, since min_nu min_theta h_lam = min_nu psi_lam. Tabular
    rewards are the richest class on the units, so this lower-bounds psi_lam for every reward model
    of that class. starts: unit rewards. Returns (value, argmin unit rewards)."""
    from ratebench.envs.global_ref import from_units, to_units

    u = from_units(torch.stack([s.detach().clone() for s in starts]), bound)  # (S, n_units): starts in parallel
    start_policy, _ = soft_optimal(problem, problem.step_tables_from_units(to_units(u, bound)))
    n_units = u.shape[1]

    def per_start(flat):
        tables = problem.step_tables_from_units(to_units(flat[:, :n_units], bound))
        return penalised_objective(problem, tables, _log_softmax(_unflatten(flat[:, n_units:], start_policy)), lam)

    policy_diag = _inverse_policy_diag(start_policy)
    solved = minimise_rows(per_start, torch.cat([u, _flatten(start_policy)], 1), tol, max_iter=max_iter,
                           preconditioner=lambda flat: torch.cat([torch.ones_like(u), policy_diag(flat[:, n_units:])], 1),
                           first_step=FIRST_MOVE)
    best = int(solved.value.argmin())
    return float(solved.value[best]), to_units(solved.x[best, :n_units], bound).clone()


METRIC_TOL = 5e-6  # inner gradient sup-norm tolerance of psi_gap; measured on the 928 (seed, evaluation) rows
#                    of a 32-seed default-bandit run at 1e5 samples: within 9.5e-7 of a 1e-9 solve (1e-6: 1.6e-7
#                    at 1.4x the time), against psi_gap values >= 6e-3 there


class PsiReference:
    """min psi_lam per distinct lam for one problem, computed once (warm-started from the
    nearest lam already solved plus F-hat*'s argmin and the true reward) and cached."""

    def __init__(self, problem: TabularProblem, f_argmin: torch.Tensor | None = None, bound: float | None = None):
        self.problem = problem
        self.f_argmin = f_argmin
        self.bound = bound  # the reward class (model.reward.bound): min psi_lam over rewards in [-bound, bound]
        self.cache: dict[float, tuple[float, torch.Tensor]] = {}
        self.store = None  # a disk store of solved values (the harness's MinPsiStore: get/put), or None

    def _starts(self, lam: float) -> list[torch.Tensor]:
        """First lam: the true reward and F-hat*'s argmin; later: the nearest solved lam only
        (psi_lam moves continuously with lam, so the warm start stays in the same basin)."""
        if self.cache:
            nearest = min(self.cache, key=lambda other: abs(math.log(other / lam)))
            return [self.cache[nearest][1]]
        if self.f_argmin is None:  # F_loc's argmin: the basin of the true reward (envs/global_ref.py)
            from ratebench.envs.global_ref import local_reference

            self.f_argmin = local_reference(self.problem, bound=self.bound)[1]
        return [self.problem.true_unit_reward, self.f_argmin]

    def min_psi(self, lam: float) -> float:
        lam = float(lam)
        if lam not in self.cache:
            starts = self._starts(lam)
            found = None if self.store is None else self.store.get(lam, starts, self.bound, self.problem.n_units)
            if found is None:
                found = minimise_psi(self.problem, lam, starts, tol=1e-7, bound=self.bound)
                if self.store is not None:
                    self.store.put(lam, starts, self.bound, *found)
            self.cache[lam] = found
        return self.cache[lam][0]

    def gap_and_minimiser(self, rewards: Tables, lam: float, threads: int | None = None) -> tuple[torch.Tensor, Tables]:
        """(psi_lam(nu) - min psi_lam per seed (B,), the inner minimiser y*_lam(nu) it solved). threads: the compiled
        Newton's (penalty_minimiser_newton; None: every core)."""
        return self.start_gap_and_minimiser(rewards, lam, threads)()

    def start_minimiser(self, rewards: Tables, lam: float, threads: int | None = None, start: Tables | None = None,
                        background: bool = False, pairs: PairTables | None = None):
        """psi_gap's y*_lam(nu) as a function to call for it, its compiled Newton solving meanwhile with background
        (start_penalty_minimiser_newton). start: pi*_nu's tables, pairs: the rewards' exact.pair_tables, where the
        caller has them."""
        # Always start at z* = pi*_nu: the inner problem is nonconvex, and a warm start from the
        # previous evaluation's y* was measured to land in a worse local minimum (0.2% of rows).
        if newton_applies(self.problem):
            return start_penalty_minimiser_newton(self.problem, rewards, lam, threads=threads, start=start,
                                                  background=background, pairs=pairs)
        y = penalty_minimiser(self.problem, rewards, lam, tol=METRIC_TOL)
        return lambda: y

    def start_gap_and_minimiser(self, rewards: Tables, lam: float, threads: int | None = None,
                                start: Tables | None = None, background: bool = False):
        """gap_and_minimiser as a function to call for its result (start_minimiser's solve, then psi_lam there)."""
        solved = self.start_minimiser(rewards, lam, threads, start, background)

        def finish() -> tuple[torch.Tensor, Tables]:
            y = solved()
            return psi(self.problem, rewards, lam, y=y) - self.min_psi(lam), y

        return finish

    def gap(self, rewards: Tables, lam: float) -> torch.Tensor:
        """psi_lam(nu) - min psi_lam per seed: (B,). Not clamped: the joint minimisation is a
        local search, and a negative value would show that its reference was not global."""
        return self.gap_and_minimiser(rewards, lam)[0]


LAM_GRID_PER_DECADE = 10  # psi_gap is evaluated at lam rounded down to this log grid (docs/bilevel.md)


def grid_lambda(lam: float) -> float:
    """lam rounded down to the log grid 10^(k / LAM_GRID_PER_DECADE) (exact on grid points)."""
    k = math.floor(LAM_GRID_PER_DECADE * math.log10(lam) + 1e-9)
    return 10 ** (k / LAM_GRID_PER_DECADE)


def psi_gap_and_minimiser(problem: TabularProblem, rewards: Tables, lam: float | None, threads: int | None = None):
    """psi_gap of docs/metrics.md for reward tables [(B, n_h, A)] with what it solved on the way:
    (gap (B,), y*_l tables [(B, n_h, A)] or None, l = grid_lambda(lam) or None). psi_l(nu) - min psi_l
    is taken at l = grid_lambda(lam), so that min psi_l (a joint L-BFGS, ~1 s on the bandit) is
    solved once per grid value, not at every evaluation. NaN gap and no y when lam is None. threads: the compiled
    Newton's (None: every core; the same bits whatever it is)."""
    return start_psi_gap_and_minimiser(problem, rewards, lam, threads)()


def start_psi_gap_and_minimiser(problem: TabularProblem, rewards: Tables, lam: float | None,
                                threads: int | None = None, start: Tables | None = None, background: bool = False):
    """psi_gap_and_minimiser as a function to call for its result; with background its compiled Newton solves
    while the caller goes on (start_penalty_minimiser_newton: the same bits). start: pi*_nu's log-prob tables of
    these rewards where the caller has them (soft_optimal's)."""
    batch = rewards[0].shape[0]
    if lam is None or not math.isfinite(lam) or lam <= 0:
        nothing = torch.full((batch,), math.nan, dtype=rewards[0].dtype), None, None
        return lambda: nothing
    lam_grid = grid_lambda(lam)
    with torch.enable_grad():
        solving = psi_reference(problem).start_gap_and_minimiser([r.detach() for r in rewards], lam_grid, threads,
                                                                 start, background)

    def finish():
        with torch.enable_grad():
            gap, y = solving()
        return gap.detach(), y, lam_grid

    return finish


def start_psi_minimiser(problem: TabularProblem, rewards: Tables, lam_grid: float, threads: int | None = None,
                        start: Tables | None = None, background: bool = False, pairs: PairTables | None = None):
    """psi_gap's y*_l(nu) at a grid value l = grid_lambda(lam) alone, as a function to call for it (tables
    [(B, n_h, A)], detached), for a caller that computes psi_l(nu) itself (hypergradient_surrogate_and_psi), whose
    psi_gap is then psi_l(nu) - min_psi(problem, l). The same solve as start_psi_gap_and_minimiser's (pairs: the
    rewards' exact.pair_tables, where the caller has them)."""
    with torch.enable_grad():  # the L-BFGS (and Newton's fallback to it) differentiates
        solving = psi_reference(problem).start_minimiser([r.detach() for r in rewards], lam_grid, threads, start,
                                                          background, pairs)

    def finish() -> Tables:
        with torch.enable_grad():
            return solving()

    return finish


def min_psi(problem: TabularProblem, lam_grid: float) -> float:
    """min psi_l over the reward class, at a grid value l (PsiReference.min_psi, solved once per l and problem)."""
    return psi_reference(problem).min_psi(lam_grid)


def psi_reference(problem: TabularProblem) -> PsiReference:
    """The problem's PsiReference (min psi_lam per lam, solved once per problem), made on first use."""
    if "psi_reference" not in problem.derived:
        problem.derived["psi_reference"] = PsiReference(problem)
    return problem.derived["psi_reference"]


def psi_gap(problem: TabularProblem, rewards: Tables, lam: float | None) -> torch.Tensor:
    """psi_gap metric of docs/metrics.md: psi_l(nu) - min psi_l at l = grid_lambda(lam). (B,); NaN when lam
    is None (no penalty). Not clamped: a negative value would show that min psi_l was not global."""
    return psi_gap_and_minimiser(problem, rewards, lam)[0]
