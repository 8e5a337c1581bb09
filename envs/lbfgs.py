"""Row-wise L-BFGS: minimise B independent smooth objectives at once, each with its own memory
and its own step length.

The exact penalty quantities (envs/penalty.py) solve one small inner problem per seed. Summing
the seeds into one objective for torch.optim.LBFGS couples them through a single line search
and a single curvature memory, so every seed pays for the worst-conditioned one. Here row b
of x sees only row b of the gradient, its own (s, y) pairs and its own Armijo backtracking;
the rows share only the batched objective call. A row that reaches the gradient tolerance is
frozen, so a row's iterates do not depend on which other rows share the batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

ARMIJO = 1e-4  # sufficient-decrease constant c1
CURVATURE_COS = 1e-10  # a pair (s, y) is kept only if s.y > CURVATURE_COS |s| |y| (positive curvature)
ROUNDING = 1e-13  # relative slack on f in the decrease test: near the minimum f changes below rounding


@dataclass
class RowResult:
    x: torch.Tensor  # (B, n) minimisers
    value: torch.Tensor  # (B,) objective at x
    grad_norm: torch.Tensor  # (B,) sup-norm of the gradient at x
    iterations: int  # iterations until the last row stopped
    evaluations: int  # batched objective calls


def _value_and_grad(objective: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        value = objective(x)
        (grad,) = torch.autograd.grad(value.sum(), x)  # rows independent: d(sum)/dx_b = d f_b / dx_b
    return value.detach(), grad.detach()


def _value_and_grad_of_rows(rows_objective: Callable, x: torch.Tensor, rows: torch.Tensor):
    """_value_and_grad at the rows of x where `rows` (B,) is True, through rows_objective(index), their objective;
    the other rows NaN and 0."""
    value, grad = x.new_full((x.shape[0],), math.nan), torch.zeros_like(x)
    index = rows.nonzero()[:, 0]
    if index.numel():
        value[index], grad[index] = _value_and_grad(rows_objective(index), x[index])
    return value, grad


def inverse_hessian_times(grad, s_hist, y_hist, h0, chronological) -> torch.Tensor:
    """H grad per row, H the L-BFGS inverse-Hessian estimate from the pairs in the slots
    `chronological` (oldest first) and the diagonal initial matrix h0 (B, n), in the compact form
    of Byrd, Nocedal & Schnabel (1994): a few batched products instead of the two-loop's 4m
    vector operations. Empty or rejected slots hold s = y = 0 and get a unit diagonal in R, which
    makes them exact no-ops, so rows with different memory lengths share the products."""
    if not chronological:
        return h0 * grad
    S, Y = s_hist[:, chronological], y_hist[:, chronological]  # (B, k, n)
    sy = S @ Y.transpose(1, 2)  # (B, k, k): s_i . y_j
    empty = torch.diagonal(sy, dim1=1, dim2=2) == 0
    R = torch.triu(sy) + torch.diag_embed(empty.to(sy.dtype))
    C = torch.diag_embed(torch.diagonal(sy, dim1=1, dim2=2))
    h0_grad, h0_Y = h0 * grad, h0[:, None, :] * Y
    a = (S @ grad[..., None])  # (B, k, 1)
    b = Y @ h0_grad[..., None]
    u = torch.linalg.solve_triangular(R, a, upper=True)
    w = torch.linalg.solve_triangular(R.transpose(1, 2), (C + Y @ h0_Y.transpose(1, 2)) @ u - b, upper=False)
    return h0_grad + (S.transpose(1, 2) @ w)[..., 0] - (h0_Y.transpose(1, 2) @ u)[..., 0]


def minimise_rows(objective: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, tol: float,
                  max_iter: int = 1000, history: int = 10, max_backtracks: int = 50,
                  preconditioner: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  first_step: float = 1.0,
                  rows_objective: Callable[[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]] | None = None
                  ) -> RowResult:
    """Minimise objective(x)[b] over x[b] for every row b of x0 (B, n). `objective` maps (B, n)
    to (B,) and row b of its output may depend only on row b of its input. Stops a row when its
    gradient sup-norm is <= tol (or when no step along its direction decreases f any more).

    preconditioner(x) -> (B, n) positive diagonal: the shape of the initial inverse Hessian
    (scaled by the usual s.y / y.D.y after each accepted step). first_step: sup-norm of the
    first move, before any curvature is known; small keeps a nonconvex row in its start's basin.

    rows_objective(index): the objective of the rows `index` (a LongTensor) alone, where the objective can be
    restricted to some of its rows: `lambda index: objective` for one function of every row (F of unit rewards in a
    multistart), or the rows' own data taken at index (the faces of global_ref: a group and a face per row). Then a
    trial step is evaluated only on the rows still searching: an Armijo backtrack of a few rows no longer evaluates
    them all, and converged rows are not evaluated again. Without it every trial evaluates every row, a frozen one at
    its own point."""
    x = x0.detach().clone()
    B, n = x.shape
    f, g = _value_and_grad(objective, x)
    evaluations = 1
    s_hist = x.new_zeros(B, history, n)
    y_hist = x.new_zeros(B, history, n)
    diag = preconditioner(x) if preconditioner is not None else torch.ones_like(x)
    # first step: preconditioned steepest descent of sup-norm at most first_step (scale unknown yet)
    gamma = first_step / (diag * g).abs().amax(-1).clamp_min(1.0)
    active = g.abs().amax(-1) > tol
    iteration = 0
    while bool(active.any()) and iteration < max_iter:
        slot = iteration % history
        filled = min(iteration, history)
        chronological = [(slot - filled + i) % history for i in range(filled)]
        # the rows still moving only: a frozen row's direction is never used, and the products cost per row
        moving = active.nonzero()[:, 0]
        d = torch.zeros_like(g)
        d[moving] = -inverse_hessian_times(g[moving], s_hist[moving], y_hist[moving], (gamma[:, None] * diag)[moving],
                                           chronological)
        slope = (g * d).sum(-1)
        uphill = active & (slope >= 0)  # lost positive definiteness numerically: restart that row's memory
        if bool(uphill.any()):
            s_hist[uphill] = 0.0
            y_hist[uphill] = 0.0
            d = torch.where(uphill[:, None], -gamma[:, None] * diag * g, d)
            slope = (g * d).sum(-1)
        d = torch.where(active[:, None], d, 0.0)
        step = torch.ones(B, dtype=x.dtype)
        searching = active.clone()
        x_new, f_new, g_new = x, f, g
        for _ in range(max_backtracks):
            trial = x + step[:, None] * d
            f_trial, g_trial = (_value_and_grad(objective, trial) if rows_objective is None
                                else _value_and_grad_of_rows(rows_objective, trial, searching))
            evaluations += 1
            slack = ROUNDING * (1.0 + f.abs())
            ok = searching & (f_trial <= f + ARMIJO * step * slope + slack) & torch.isfinite(f_trial)
            x_new = torch.where(ok[:, None], trial, x_new)
            g_new = torch.where(ok[:, None], g_trial, g_new)
            f_new = torch.where(ok, f_trial, f_new)
            searching = searching & ~ok
            if not bool(searching.any()):
                break
            step = torch.where(searching, 0.5 * step, step)
        stalled = searching  # no decrease found: the row is at the precision floor of f
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(-1)
        keep = active & ~stalled & (sy > CURVATURE_COS * s.norm(dim=-1) * y.norm(dim=-1))
        s_hist[:, slot] = torch.where(keep[:, None], s, 0.0)
        y_hist[:, slot] = torch.where(keep[:, None], y, 0.0)
        if preconditioner is not None:
            diag = preconditioner(x_new)
        gamma = torch.where(keep, sy / (y * diag * y).sum(-1).clamp_min(1e-300), gamma)
        x, f, g = x_new, f_new, g_new
        active = active & ~stalled & (g.abs().amax(-1) > tol)
        iteration += 1
    return RowResult(x, f, g.abs().amax(-1), iteration, evaluations)
