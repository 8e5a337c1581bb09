"""The exact penalty quantities: psi_lam, its minimisers, the first-order hypergradient of docs/bilevel.md
against finite differences of the exact psi_lam, its convergence to grad F, and min psi_lam."""
from __future__ import annotations

import math

import pytest
import torch

from ratebench import envs
from ratebench.envs import bandit, exact, global_ref, mdp, penalty

SMALL = {
    "bandit": bandit.BanditConfig(n_contexts=3, n_actions=4, feature_dim=3),
    "mdp": mdp.MDPConfig(n_states=3, n_actions=2, horizon=3),
}


@pytest.fixture(params=sorted(SMALL), scope="module")
def problem(request):
    return envs.make(SMALL[request.param])


def random_units(problem, seed: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, problem.n_units, generator=gen, dtype=torch.float64)


def psi_of_units(problem, units: torch.Tensor, lam: float) -> torch.Tensor:
    return penalty.psi(problem, problem.step_tables_from_units(units), lam)


def grad_f(problem, units: torch.Tensor) -> torch.Tensor:
    """grad F by autodiff through the exact soft-optimal policy: (B, n_units)."""
    u = units.clone().requires_grad_(True)
    value = exact.bilevel_objective(problem, problem.step_tables_from_units(u))
    return torch.autograd.grad(value.sum(), u)[0]


@pytest.mark.parametrize("lam", [1.0, 10.0, 100.0])
def test_hypergradient_formula_matches_finite_differences_of_exact_psi(problem, lam):
    """grad psi = grad_nu f(y*) + lam (grad_nu g(y*) - grad_nu g(z*)) (no Hessian) equals central
    differences of psi_lam(nu) = min_theta h_lam, each psi evaluation an independent inner solve."""
    units = random_units(problem, 1)
    formula = penalty.psi_gradient(problem, units, lam)[0]
    gen = torch.Generator().manual_seed(2)
    step = 1e-5
    for _ in range(3):
        d = torch.randn(problem.n_units, generator=gen, dtype=torch.float64)
        d = d / d.norm()
        fd = (psi_of_units(problem, units + step * d, lam) - psi_of_units(problem, units - step * d, lam)) / (2 * step)
        assert float(formula @ d) == pytest.approx(float(fd[0]), rel=1e-5, abs=1e-8)


def test_hypergradient_sign_is_that_of_g_equal_minus_j(problem):
    """Flipping the sign of the value-difference term (the easy slip: grad_nu g = +E grad R)
    gives a vector far from the finite-difference gradient: the formula's sign is checked."""
    units, lam = random_units(problem, 4), 10.0
    u = units.clone().requires_grad_(True)
    rewards = problem.step_tables_from_units(u)
    y = penalty.penalty_minimiser(problem, rewards, lam)
    z, _ = exact.soft_optimal(problem, [r.detach() for r in rewards])
    wrong = exact.upper_loss(problem, rewards, y) + lam * (exact.policy_value(problem, rewards, y)
                                                           - exact.policy_value(problem, rewards, z))
    wrong_grad = torch.autograd.grad(wrong.sum(), u)[0][0]
    right_grad = penalty.psi_gradient(problem, units, lam)[0]
    d = (wrong_grad - right_grad) / (wrong_grad - right_grad).norm()
    step = 1e-5
    fd = float((psi_of_units(problem, units + step * d, lam) - psi_of_units(problem, units - step * d, lam))[0] / (2 * step))
    assert float(right_grad @ d) == pytest.approx(fd, rel=1e-5, abs=1e-8)
    assert abs(float(wrong_grad @ d) - fd) > 1e-3


def test_penalty_hypergradient_converges_to_grad_f_monotonically(problem):
    units = random_units(problem, 3)
    exact_grad = grad_f(problem, units)[0]
    errors = [float((penalty.psi_gradient(problem, units, lam)[0] - exact_grad).norm()) for lam in (1.0, 10.0, 100.0)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.05 * errors[0]  # O(1/lam): two decades of lam, at least 20x closer


def test_psi_is_below_f_and_increases_with_lam(problem):
    """psi_lam(nu) <= f(nu, z*) = F(nu) (z* is feasible with zero penalty), increasing to F."""
    units = random_units(problem, 5, batch=2)
    F = exact.bilevel_objective(problem, problem.step_tables_from_units(units))
    values = [psi_of_units(problem, units, lam) for lam in (0.5, 5.0, 50.0)]
    for lo, hi in zip(values, values[1:]):
        assert (lo <= hi + 1e-10).all()
    assert (values[-1] <= F + 1e-10).all()
    assert torch.allclose(values[-1], F, atol=0.05 * float((F - values[0]).abs().max()) + 1e-9)


def test_penalty_minimiser_is_a_minimum_of_h(problem):
    """y* has zero gradient in tabular logits and beats random perturbations and z*."""
    lam = 3.0
    rewards = problem.step_tables_from_units(random_units(problem, 6))
    y = penalty.penalty_minimiser(problem, rewards, lam)
    logits = [t.clone().requires_grad_(True) for t in y]
    h = penalty.penalised_objective(problem, rewards, [torch.log_softmax(t, -1) for t in logits], lam)
    grads = torch.autograd.grad(h.sum(), logits)
    assert max(float(g.abs().max()) for g in grads) < 1e-8
    gen = torch.Generator().manual_seed(7)
    z, _ = exact.soft_optimal(problem, rewards)
    h = h.detach()
    assert float(h[0]) <= float(penalty.penalised_objective(problem, rewards, z, lam)[0]) + 1e-12
    for _ in range(5):
        moved = [torch.log_softmax(t + 0.05 * torch.randn(t.shape, generator=gen, dtype=t.dtype), -1) for t in y]
        assert float(h[0]) <= float(penalty.penalised_objective(problem, rewards, moved, lam)[0]) + 1e-12


def test_min_psi_lower_bounds_psi_and_f_star(problem):
    lam = 3.0
    f_star, f_argmin = global_ref.local_reference(problem)
    value, argmin = penalty.minimise_psi(problem, lam, [problem.true_unit_reward, f_argmin])
    assert value <= f_star + 1e-9  # min psi <= psi(nu_F) <= F(nu_F) = F*
    at_argmin = float(psi_of_units(problem, argmin[None], lam)[0])
    assert at_argmin == pytest.approx(value, abs=1e-7)  # the joint solution is a psi value
    others = psi_of_units(problem, random_units(problem, 8, batch=4), lam)
    assert (others >= value - 1e-9).all()
    # a psi minimiser is a stationary point of psi (checked with the first-order formula)
    assert float(penalty.psi_gradient(problem, argmin[None], lam).norm()) < 1e-4


def test_surrogate_and_psi_in_one_pass_are_each_formula_alone(problem):
    """hypergradient_surrogate_and_psi (the evaluation's psi_lam and its gradient's surrogate from one pair table):
    psi_lam = penalised_objective at the same y and the surrogate with its gradient = hypergradient_surrogate's, bit
    for bit, with the tables built inside or given (exact.pair_tables); and psi's inner objective on given tables
    (_Inner(losses=...)) is the one it builds, value, gradient and Hessian."""
    lam = 3.0
    units = random_units(problem, 11, batch=3)
    rewards = problem.step_tables_from_units(units)
    z, _ = exact.soft_optimal(problem, rewards)
    y = penalty.penalty_minimiser(problem, rewards, lam)
    optimal = exact.optimal_value(problem, rewards)
    want_psi = penalty.penalised_objective(problem, rewards, y, lam)
    u = units.clone().requires_grad_(True)
    want = penalty.hypergradient_surrogate(problem, problem.step_tables_from_units(u), y, z, lam)
    want_grad = torch.autograd.grad(want.sum(), u)[0]
    for pairs in (None, exact.pair_tables(problem, rewards)):
        u = units.clone().requires_grad_(True)
        surrogate, psi = penalty.hypergradient_surrogate_and_psi(problem, problem.step_tables_from_units(u), y, z, lam,
                                                                 optimal, pairs)
        assert not psi.requires_grad and torch.equal(psi, want_psi.detach())
        assert torch.equal(surrogate.detach(), want.detach())
        assert torch.equal(torch.autograd.grad(surrogate.sum(), u)[0], want_grad)
    x = penalty._flatten(z)
    built, given = (penalty._Inner(problem, rewards, lam, losses=losses).value_grad_hessian(x)
                    for losses in (None, exact.pair_tables(problem, rewards).losses))
    for a, b in zip(built, given):
        assert torch.equal(a, b)
    other = penalty._Inner(problem, rewards, lam, losses=2 * exact.pair_tables(problem, rewards).losses)
    assert not torch.equal(other.value(x), built[0])  # the tables given are the ones used


def test_psi_gap_metric_is_nan_without_lambda_and_zero_at_the_minimiser():
    problem = envs.make(SMALL["bandit"])
    lam = penalty.grid_lambda(2.0)
    ref = penalty.PsiReference(problem)
    best = ref.min_psi(lam)
    argmin = ref.cache[lam][1]
    rewards = problem.step_tables_from_units(torch.stack([argmin, random_units(problem, 9)[0]]))
    gap = penalty.psi_gap(problem, rewards, 2.0)
    assert float(gap[0]) == pytest.approx(0.0, abs=1e-7) and float(gap[1]) > 1e-4
    assert float(gap[1]) == pytest.approx(float(penalty.psi(problem, [r[1:] for r in rewards], lam)[0]) - best, abs=1e-7)
    assert torch.isnan(penalty.psi_gap(problem, rewards, None)).all()


def test_lambda_grid_rounds_down():
    assert penalty.grid_lambda(1.0) == pytest.approx(1.0)
    assert penalty.grid_lambda(10.0) == pytest.approx(10.0)
    for lam in (1.3, 2.7, 17.0, 123.0):
        g = penalty.grid_lambda(lam)
        assert g <= lam < g * 10 ** (1 / penalty.LAM_GRID_PER_DECADE) * (1 + 1e-12)
        assert math.isclose(penalty.LAM_GRID_PER_DECADE * math.log10(g), round(penalty.LAM_GRID_PER_DECADE * math.log10(g)))
