"""The tests' independent minimiser: torch.optim.LBFGS with a strong-Wolfe line search, written apart
from envs/lbfgs.py (the suite's row-wise L-BFGS) so that the two can check each other."""
from __future__ import annotations

from typing import Callable

import torch


def torch_lbfgs(objective: Callable[[list[torch.Tensor]], torch.Tensor], start: list[torch.Tensor],
                rounds: int = 3, max_iter: int = 2000, tol: float = 1e-12, history: int = 30) -> list[torch.Tensor]:
    """argmin of objective(xs) (a scalar) over the tensors xs, from copies of `start`: `rounds` calls of
    torch's L-BFGS (each up to max_iter iterations, gradient tolerance tol). Returns the detached xs."""
    xs = [s.detach().clone().requires_grad_(True) for s in start]
    opt = torch.optim.LBFGS(xs, lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-16,
                            history_size=history, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(xs)
        value.backward()
        return value

    for _ in range(rounds):
        opt.step(closure)
    return [x.detach() for x in xs]
