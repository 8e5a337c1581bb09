"""The row-wise L-BFGS (envs/lbfgs.py) against closed forms, against itself row by row, and against
torch.optim.LBFGS on the penalty inner problem it exists for."""
from __future__ import annotations

import pytest
import torch

from ratebench import envs
from ratebench.envs import bandit, exact, mdp, penalty, token
from ratebench.envs.lbfgs import inverse_hessian_times, minimise_rows

from independent_solvers import torch_lbfgs


def random_quadratics(batch: int, n: int, seed: int):
    """Rows 0.5 x'A_b x - b_b'x with condition numbers from 1 to 1e4 (one per row)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(batch, n, n, generator=gen, dtype=torch.float64))
    conditions = torch.logspace(0, 4, batch, dtype=torch.float64)
    spectrum = conditions[:, None] ** torch.linspace(0, 1, n, dtype=torch.float64)
    a = q @ torch.diag_embed(spectrum) @ q.transpose(1, 2)
    b = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    return a, b


def test_compact_inverse_hessian_equals_the_bfgs_recursion():
    """H g from the compact form equals the dense BFGS inverse update applied pair by pair,
    H <- (I - rho s y')H(I - rho y s') + rho s s', from H0 = diag(h0); a rejected (zero) slot
    between the pairs changes nothing; and the ring-buffer order is honoured."""
    gen = torch.Generator().manual_seed(5)
    B, n, history = 3, 5, 4
    h0 = torch.rand(B, n, generator=gen, dtype=torch.float64) + 0.5
    grad = torch.randn(B, n, generator=gen, dtype=torch.float64)
    s_hist = torch.zeros(B, history, n, dtype=torch.float64)
    y_hist = torch.zeros(B, history, n, dtype=torch.float64)
    chronological = [2, 3, 0, 1]  # oldest first, wrapped around the ring
    dense = torch.diag_embed(h0)
    eye = torch.eye(n, dtype=torch.float64)
    for slot in chronological:
        if slot == 0:
            continue  # a rejected pair: the slot stays zero
        s = torch.randn(B, n, generator=gen, dtype=torch.float64)
        y = s + 0.3 * torch.randn(B, n, generator=gen, dtype=torch.float64)  # s.y > 0
        s_hist[:, slot], y_hist[:, slot] = s, y
        rho = 1.0 / (s * y).sum(-1)
        left = eye - rho[:, None, None] * s[:, :, None] * y[:, None, :]
        dense = left @ dense @ left.transpose(1, 2) + rho[:, None, None] * s[:, :, None] * s[:, None, :]
    expected = (dense @ grad[..., None])[..., 0]
    assert torch.allclose(inverse_hessian_times(grad, s_hist, y_hist, h0, chronological), expected, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("with_preconditioner", [False, True])
def test_quadratics_reach_the_closed_form_minimiser(with_preconditioner):
    a, b = random_quadratics(batch=6, n=8, seed=0)

    def objective(x):
        return 0.5 * torch.einsum("bi,bij,bj->b", x, a, x) - (b * x).sum(-1)

    diag = torch.diagonal(a, dim1=1, dim2=2)
    result = minimise_rows(objective, torch.zeros_like(b), tol=1e-10,
                           preconditioner=(lambda x: 1.0 / diag) if with_preconditioner else None)
    exact_x = torch.linalg.solve(a, b)
    assert (result.grad_norm <= 1e-10).all()
    assert torch.allclose(result.x, exact_x, atol=1e-8, rtol=0)


def test_rosenbrock_rows_of_different_scales():
    scales = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)

    def objective(x):
        return (1 - x[:, 0]) ** 2 + scales * (x[:, 1] - x[:, 0] ** 2) ** 2

    result = minimise_rows(objective, torch.tensor([[-1.2, 1.0]] * 3, dtype=torch.float64), tol=1e-9)
    assert torch.allclose(result.x, torch.ones(3, 2, dtype=torch.float64), atol=1e-7)


def test_a_row_does_not_depend_on_the_other_rows():
    """Own memory, own step length, frozen when converged: row b alone = row b in any batch."""
    a, b = random_quadratics(batch=5, n=6, seed=1)

    def objective_for(rows):
        def objective(x):
            return (0.5 * torch.einsum("bi,bij,bj->b", x, a[rows], x) - (b[rows] * x).sum(-1)
                    + 0.1 * (x ** 4).sum(-1))  # not quadratic: several line-search outcomes
        return objective

    together = minimise_rows(objective_for(slice(None)), torch.zeros_like(b), tol=1e-9)
    for row in range(5):
        alone = minimise_rows(objective_for(slice(row, row + 1)), torch.zeros_like(b[row:row + 1]), tol=1e-9)
        assert torch.allclose(alone.x[0], together.x[row], atol=1e-14, rtol=0)



def test_one_function_of_every_row_evaluates_only_the_rows_still_searching():
    """rows_objective=lambda rows: objective (a multistart: one function, rows differ only in their start) gives the
    iterates of the default, where every trial evaluates every row, and evaluates fewer rows: no converged row again,
    and an Armijo backtrack only the rows still searching. Rosenbrock (curved: many backtracks), starts at several scales."""
    gen = torch.Generator().manual_seed(4)
    x0 = torch.cat([torch.tensor([[-1.2, 1.0], [1.0, 1.0]], dtype=torch.float64),
                    torch.randn(10, 2, generator=gen, dtype=torch.float64) * torch.tensor([[1.0], [3.0]] * 5)])
    seen = {}

    def counting(name):
        def objective(x):  # the same function of every row
            seen[name] = seen.get(name, 0) + x.shape[0]
            return (1 - x[:, 0]) ** 2 + 100 * (x[:, 1] - x[:, 0] ** 2) ** 2
        return objective

    every = minimise_rows(counting("every"), x0, tol=1e-9)
    shared = counting("subset")
    subset = minimise_rows(shared, x0, tol=1e-9, rows_objective=lambda rows: shared)
    assert torch.equal(subset.x, every.x) and torch.equal(subset.value, every.value)
    assert torch.equal(subset.grad_norm, every.grad_norm) and subset.iterations == every.iterations
    assert subset.evaluations == every.evaluations  # the same batched calls, on fewer rows
    assert seen["every"] == x0.shape[0] * every.evaluations
    assert seen["subset"] < seen["every"] / 2, seen
    assert torch.allclose(subset.x, torch.ones_like(x0), atol=1e-6)



def test_rows_with_data_of_their_own_are_evaluated_as_a_subset_through_rows_objective():
    """rows_objective(index) (the faces of global_ref: a group and a face per row) gives the iterates of the every-row
    run, to the row-independence test's 1e-14, with fewer rows evaluated; the rows' data follow their rows."""
    a, b = random_quadratics(batch=7, n=5, seed=2)
    seen = {"every": 0, "subset": 0}

    def objective_for(rows, name):
        def objective(x):
            seen[name] += x.shape[0]
            return (0.5 * torch.einsum("bi,bij,bj->b", x, a[rows], x) - (b[rows] * x).sum(-1)
                    + 0.1 * (x ** 4).sum(-1))
        return objective

    x0 = torch.zeros_like(b)
    every = minimise_rows(objective_for(slice(None), "every"), x0, tol=1e-9)
    subset = minimise_rows(objective_for(slice(None), "subset"), x0, tol=1e-9,
                           rows_objective=lambda rows: objective_for(rows, "subset"))
    assert torch.allclose(subset.x, every.x, atol=1e-14, rtol=0) and subset.iterations == every.iterations
    assert seen["subset"] < seen["every"], seen

def test_one_function_on_f_of_unit_rewards_gives_the_same_multistart():
    """The multistarts of F (envs/global_ref.py, envs/landscape.py) on a small mdp: the rows' end points, values and
    gradients the same bits with and without rows_objective."""
    from ratebench.envs.global_ref import gaussian_starts, objective_rows

    problem = envs.make(mdp.MDPConfig(n_states=3, n_actions=2, horizon=3))
    x0 = gaussian_starts(problem, 12, 0, (1.0, 3.0, 10.0))
    every = minimise_rows(objective_rows(problem), x0, 1e-10, max_iter=60)
    objective = objective_rows(problem)
    subset = minimise_rows(objective, x0, 1e-10, max_iter=60, rows_objective=lambda rows: objective)
    for a, b in ((every.x, subset.x), (every.value, subset.value), (every.grad_norm, subset.grad_norm)):
        assert torch.equal(a, b)

def test_steps_into_non_finite_values_are_backtracked():
    """-log(1 - x^2) + 5 (x - 0.9)^2: a full first step from 0 leaves the domain (NaN); the
    line search must shorten it and still converge to the root of the first-order condition."""
    def objective(x):
        return (-torch.log(1 - x ** 2) + 5 * (x - 0.9) ** 2).sum(-1)

    result = minimise_rows(objective, torch.zeros(1, 1, dtype=torch.float64), tol=1e-10, first_step=10.0)
    x = float(result.x[0, 0])
    assert abs(x) < 1
    assert 2 * x / (1 - x ** 2) + 10 * (x - 0.9) == pytest.approx(0.0, abs=1e-9)


def _torch_lbfgs_psi(problem, rewards, lam):
    """Reference: torch.optim.LBFGS (strong Wolfe) on the seed-summed h_lam, from z*, tol 1e-11."""
    start, _ = exact.soft_optimal(problem, rewards)
    logits = torch_lbfgs(
        lambda ls: penalty.penalised_objective(problem, rewards, [torch.log_softmax(t, -1) for t in ls], lam).sum(),
        start, tol=1e-11)
    with torch.no_grad():
        return penalty.penalised_objective(problem, rewards, [torch.log_softmax(t, -1) for t in logits], lam)


@pytest.mark.parametrize("config", [bandit.BanditConfig(n_contexts=4, n_actions=5),
                                    mdp.MDPConfig(n_states=3, n_actions=2, horizon=3),
                                    token.TokenConfig(vocab=3, length=2)],
                         ids=["bandit", "mdp", "token"])
@pytest.mark.parametrize("lam", [1.0, 10.0])
def test_penalty_minimiser_matches_torch_lbfgs(config, lam):
    """The penalty inner solve (row-wise, preconditioned) reaches the same psi_lam as torch's
    L-BFGS on 8 random rewards: never above it by more than round-off, never far below it."""
    problem = envs.make(config)
    gen = torch.Generator().manual_seed(3)
    rewards = problem.step_tables_from_units(torch.randn(8, problem.n_units, generator=gen, dtype=torch.float64))
    ours = penalty.psi(problem, rewards, lam, tol=1e-10)
    reference = _torch_lbfgs_psi(problem, rewards, lam)
    assert (ours - reference).max() <= 1e-12
    assert (ours - reference).abs().max() <= 1e-8


def test_only_the_rows_still_moving_get_a_direction(monkeypatch):
    """Rows that converge early are frozen: later iterations compute the L-BFGS direction of the moving rows alone
    (its products cost per row), and every row ends where it ends alone."""
    from ratebench.envs import lbfgs

    scales = torch.tensor([1.0, 1.0, 30.0, 100.0], dtype=torch.float64)[:, None]
    starts = torch.tensor([[0.1, 0.1], [-1.2, 1.0], [-1.2, 1.0], [2.0, -1.0]], dtype=torch.float64)

    def objective_for(rows):
        def objective(x):  # Rosenbrock-like rows of different curvature: they stop at different iterations
            return (1 - x[:, 0]) ** 2 + scales[rows, 0] * (x[:, 1] - x[:, 0] ** 2) ** 2
        return objective

    sizes, original = [], lbfgs.inverse_hessian_times
    monkeypatch.setattr(lbfgs, "inverse_hessian_times", lambda g, *a: (sizes.append(g.shape[0]), original(g, *a))[1])
    together = lbfgs.minimise_rows(objective_for(slice(None)), starts, tol=1e-10)
    assert sizes[0] == 4 and min(sizes) == 1 and sizes == sorted(sizes, reverse=True)
    for row in range(4):
        alone = lbfgs.minimise_rows(objective_for(slice(row, row + 1)), starts[row:row + 1], tol=1e-10)
        assert torch.allclose(alone.x[0], together.x[row], atol=1e-14, rtol=0)
        assert float(together.grad_norm[row]) <= 1e-10
