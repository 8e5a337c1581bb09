"""The bounded reward class (model.reward.bound = R: unit rewards R tanh(.) in (-R, R)): the reward
model's map and its closed-form backward, the exact F* over tabular rewards in [-R, R] (box-face
enumeration, envs/global_ref.py) against independent solvers written here (a dense grid, scipy's
L-BFGS-B on the box), the cache key, and the validation of the key."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from scipy.special import expit, log_softmax

from ratebench import envs
from ratebench.algorithms.models import NetConfig, RewardModel
from ratebench.envs import bandit, global_ref
from ratebench.envs import exact
from ratebench.fstar import reference
from test_audit import NumpyBandit
from test_global_ref import FixedState

D = torch.float64


def numpy_context_objective(problem, x):
    """F_x(r) of context x in numpy: pi = softmax(log pi_ref + r / beta), sum_ab pi_a pi_b BCE(p*_ab, sigmoid(r_a - r_b))."""
    ref = problem.steps[0].ref_logp.numpy()[x]
    A = ref.size
    true = problem.true_unit_reward.numpy().reshape(-1, A)[x]
    eta = problem.label_noise
    p = eta + (1 - 2 * eta) * expit(true[:, None] - true[None, :])

    def F(r):
        r = np.asarray(r, dtype=float)
        pi = np.exp(log_softmax(ref + r / problem.beta))
        d = r[:, None] - r[None, :]
        return float(pi @ (np.logaddexp(0.0, d) - p * d) @ pi)

    return F


def brute_force_two_actions(problem, bound, n=20001):
    """inf F over rewards in [-R, R]^2 per context of a 2-action bandit: F_x depends on r_0 - r_1 only, and the
    box's differences are exactly [-2R, 2R]: a dense grid of the difference, refined by a finer grid around the best."""
    total = 0.0
    X = problem.steps[0].ref_logp.shape[0]
    for x in range(X):
        F = numpy_context_objective(problem, x)
        grid = np.linspace(-2 * bound, 2 * bound, n)
        values = np.array([F([d / 2, -d / 2]) for d in grid])
        i = int(values.argmin())
        fine = np.linspace(grid[max(i - 1, 0)], grid[min(i + 1, n - 1)], 2001)
        total += min(F([d / 2, -d / 2]) for d in fine) / X
    return total


def box_multistart(problem, bound, per_axis=5):
    """inf F over [-R, R]^A per context by scipy L-BFGS-B (box constraints) from every point of a per_axis^A grid."""
    X, A = problem.steps[0].ref_logp.shape
    axis = np.linspace(-bound, bound, per_axis)
    total = 0.0
    for x in range(X):
        F = numpy_context_objective(problem, x)
        best = min(minimize(F, np.array(x0), method="L-BFGS-B", bounds=[(-bound, bound)] * A,
                            options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000}).fun
                   for x0 in itertools.product(axis, repeat=A))
        total += best / X
    return total


@pytest.mark.parametrize("bound, beta, noise", [(0.3, 1.0, 0.0), (1.0, 0.5, 0.0), (3.0, 2.0, 0.1)])
def test_bounded_infimum_on_a_2x2_bandit_equals_a_dense_grid(bound, beta, noise):
    problem = envs.make(bandit.BanditConfig(n_contexts=2, n_actions=2, beta=beta, label_noise=noise, instance_seed=3))
    ref = global_ref.global_reference(problem, bound=bound)
    assert ref.method == "exact-box-faces" and ref.reward_bound == bound
    assert ref.value == pytest.approx(brute_force_two_actions(problem, bound), abs=1e-8)
    assert float(ref.argmin.abs().max()) <= bound + 1e-12  # the argmin is in the class
    attained = float(global_ref.objective_rows(problem)(ref.argmin[None])[0])
    assert attained == pytest.approx(ref.value, abs=1e-12)


@pytest.mark.parametrize("bound", [0.5, 2.0])
def test_bounded_infimum_on_three_actions_equals_scipy_on_the_box(bound):
    problem = envs.make(bandit.BanditConfig(n_contexts=2, n_actions=3, beta=0.5, instance_seed=5))
    ref = global_ref.global_reference(problem, bound=bound)
    assert ref.value == pytest.approx(box_multistart(problem, bound), abs=1e-7)
    assert ref.value <= ref.local_value + 1e-12


def test_bounded_infimum_decreases_with_the_bound_towards_the_unbounded_one():
    """A larger box is a larger class: F*(R) is non-increasing in R and never below the unbounded F*."""
    problem = envs.make(bandit.BanditConfig(n_contexts=3, n_actions=3, instance_seed=2))
    unbounded = global_ref.global_reference(problem).value
    values = [global_ref.global_reference(problem, bound=R).value for R in (0.25, 1.0, 4.0, 64.0)]
    assert all(a >= b - 1e-10 for a, b in zip(values, values[1:]))
    assert values[-1] >= unbounded - 1e-10 and values[0] > values[-1] + 1e-3
    assert values[-1] == pytest.approx(unbounded, abs=1e-4)  # the unbounded minimiser's rewards fit in [-64, 64]


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_bounded_reward_model_and_its_closed_form_backward(kind):
    problem = envs.make(bandit.BanditConfig(n_contexts=3, n_actions=4))
    free, bounded = RewardModel(problem, NetConfig(kind=kind)), RewardModel(problem, NetConfig(kind=kind, bound=0.7))
    params = [p + 0.3 * torch.randn(p.shape, dtype=D, generator=torch.Generator().manual_seed(1))
              for p in free.init([0, 1])]
    raw, units = free.unit_rewards(params), bounded.unit_rewards(params)
    torch.testing.assert_close(units, 0.7 * torch.tanh(raw))
    assert float(units.abs().max()) <= 0.7 and float(units.abs().min()) < 0.6  # not all saturated: the backward check means something
    weights = torch.randn(units.shape, dtype=D, generator=torch.Generator().manual_seed(2))
    leaves = [p.clone().requires_grad_(True) for p in params]
    expected = torch.autograd.grad((bounded.unit_rewards(leaves) * weights).sum(), leaves)
    table, acts = bounded.units(params)
    torch.testing.assert_close(table, units)
    for got, want in zip(bounded.backward(params, acts, weights), expected):
        torch.testing.assert_close(got, want)


def test_bounded_visited_units_backward_equals_autograd():
    problem = envs.make(bandit.BanditConfig(n_contexts=3, n_actions=4))
    model = RewardModel(problem, NetConfig(bound=0.4))
    params = [2 * p + 0.3 for p in model.init([0, 1])]
    unit = torch.tensor([[[0], [5], [5], [11]], [[2], [3], [12], [7]]])  # (B, N, H); 12 = n_units: pays nothing
    table, acts = model.visited_units(params, unit)
    full = model.unit_rewards(params)
    torch.testing.assert_close(table[:, :-1].gather(1, unit.reshape(2, -1).clamp_max(11))[:, [0, 1, 3]],
                               full.gather(1, torch.tensor([[0, 5, 11], [2, 3, 7]])))
    weights = torch.randn(2, 4, dtype=D, generator=torch.Generator().manual_seed(3))
    leaves = [p.clone().requires_grad_(True) for p in params]
    at_steps = model.unit_rewards(leaves).gather(1, unit.reshape(2, -1).clamp_max(11)) * (unit.reshape(2, -1) < 12)
    expected = torch.autograd.grad((at_steps * weights).sum(), leaves)
    for got, want in zip(model.backward(params, acts, weights * (unit.reshape(2, -1) < 12)), expected):
        torch.testing.assert_close(got, want)


def test_the_cache_is_keyed_by_the_bound(tmp_path):
    config = bandit.BanditConfig(n_contexts=2, n_actions=2, instance_seed=4)
    problem, env_config = envs.make(config), dict(vars(config))
    free = reference(problem, env_config, str(tmp_path))
    boxed = reference(problem, env_config, str(tmp_path), reward_bound=0.2)
    assert len(list(tmp_path.glob("fstar-*.json"))) == 2
    assert boxed.value > free.value + 1e-3 and boxed.reward_bound == 0.2 and free.reward_bound is None
    entries = {json.loads(p.read_text()).get("reward_bound") for p in tmp_path.glob("fstar-*.json")}
    assert entries == {None, 0.2}
    again = reference(envs.make(config), env_config, str(tmp_path), reward_bound=0.2)
    assert again.value == boxed.value


@pytest.mark.parametrize("overrides, words", [
    (["model.reward.bound=-1"], ["model.reward.bound", "> 0"]),
    (["model.reward.bound=0"], ["model.reward.bound", "> 0"]),
    (["model.reward.bound=inf"], ["model.reward.bound", "finite"]),
    (["model.policy.bound=1"], ["model.policy.bound", "only the reward model"]),
    (["model.reward.bound=1", "env.n_actions=9"], ["model.reward.bound", "env.n_actions <= 8"]),
])
def test_bad_bounds_are_refused_naming_the_field(overrides, words, expect_bad_input):
    expect_bad_input(["algorithm=bilevel", *overrides], words)


def test_a_bound_with_an_algorithm_without_model_reward_is_refused(expect_bad_input):
    expect_bad_input(["algorithm=reward_mle", "model.reward.bound=1"], ["model.reward.bound", "reward_mle"])


@pytest.mark.parametrize("overrides", [
    ["algorithm=bilevel", "env=bandit", "algorithm.batch_traj=2", "algorithm.batch_pairs=2"],
    ["algorithm=bilevel", "env=mdp", "algorithm.batch_traj=2", "algorithm.batch_pairs=2", "model.reward.kind=linear"],
    ["algorithm=ppo_rlhf", "env=bandit", "algorithm.mode=online", "algorithm.batch_pairs=4", "algorithm.rollouts=4"],
], ids=["bilevel-bandit-mlp", "bilevel-mdp-linear", "ppo_rlhf-online"])
def test_bounded_eager_step_equals_the_reference_step(compose_config, overrides):
    """The bound in the closed-form (eager) step equals autograd's through R tanh, step by step from the
    reference's own states (the same draws), and the reward stays in (-R, R)."""
    import copy

    from ratebench.algorithms import ALGORITHMS
    from ratebench.config import validate
    from ratebench.envs.sampling import Counters, CountingSampler

    v = validate(compose_config(["seeds=[3,0]", "model.reward.width=4", "model.policy.width=4",
                                 "model.reward.bound=0.5", "impl=reference", *overrides]))
    problem = envs.make(v.env)

    def build(impl):
        algo = ALGORITHMS[v.algorithm.name](v.algorithm, v.model, problem)
        algo.impl = impl
        return algo, CountingSampler(problem, v.seeds, Counters())

    (ref, ref_sampler), (eager, sampler) = build("reference"), build("eager")
    assert eager.step_path() == "eager"
    state = ref.init(v.seeds)
    for _ in range(30):
        start = copy.deepcopy(state)
        sampler.load_state_dict(ref_sampler.state_dict())
        state = ref.step(state, ref_sampler)
        one = eager.step(start, sampler)
        assert sampler.state_dict() == ref_sampler.state_dict()  # the same draws
        for key, t in ref.tensors(state).items():
            torch.testing.assert_close(eager.tensors(one)[key], t, rtol=0, atol=1e-12)
    model, params = ref.reward_model(state)
    units = model.unit_rewards(params)
    assert float(units.abs().max()) < 0.5


@pytest.mark.parametrize("overrides, words", [
    (["model.reward.bound_reading=clip"], ["model.reward.bound_reading", "tanh", "project"]),
    (["model.reward.bound=1", "model.reward.bound_reading=project"], ["model.reward.bound_reading", "tabular"]),
    (["model.reward.kind=tabular", "model.reward.bound_reading=project"], ["model.reward.bound_reading", "bound"]),
    (["model.reward.kind=table"], ["model.reward.kind", "tabular"]),
])
def test_bad_projected_readings_are_refused_naming_the_field(overrides, words, expect_bad_input):
    expect_bad_input(["algorithm=bilevel", *overrides], words)


def test_a_projected_reward_with_an_algorithm_that_does_not_project_is_refused(expect_bad_input):
    expect_bad_input(["algorithm=ppo_rlhf", "model.reward.kind=tabular", "model.reward.bound=1",
                      "model.reward.bound_reading=project"], ["model.reward.bound_reading", "ppo_rlhf", "bilevel"])


@pytest.mark.parametrize("impl", ["reference", "eager", "fast"])
def test_the_projected_tabular_reward_is_projected_sgd_on_the_unit_rewards(compose_config, impl):
    """bound_reading=project: nu is the table of unit rewards, and each nu step is the unprojected step
    followed by the clip onto [-R, R]. Checked independently of RewardModel.project: from the state before a
    step, the step taken with the box switched off and then clipped here with numpy equals the projected step;
    and over the run the clip binds (some unit at exactly +-R), which an unprojected method would not keep."""
    import copy

    from ratebench.algorithms import ALGORITHMS
    from ratebench.config import validate
    from ratebench.envs.sampling import Counters, CountingSampler

    R = 0.05
    v = validate(compose_config(["seeds=[3,0]", "model.policy.width=4", "algorithm=bilevel", "env=bandit",
                                 "algorithm.batch_traj=2", "algorithm.batch_pairs=2", "model.reward.kind=tabular",
                                 f"model.reward.bound={R}", "model.reward.bound_reading=project"]))
    problem = envs.make(v.env)
    algo = ALGORITHMS["bilevel"](v.algorithm, v.model, problem)
    algo.impl = impl
    free = ALGORITHMS["bilevel"](v.algorithm, v.model, problem)  # the same step without the box
    free.impl, free.reward.box = impl, None
    sampler = CountingSampler(problem, v.seeds, Counters())
    other = CountingSampler(problem, v.seeds, Counters())
    state = algo.init(v.seeds)
    assert state.nu[0].shape == (2, problem.unit_features.shape[0])  # one value per unit
    at_bound = 0
    for _ in range(60):
        start = copy.deepcopy(state)
        other.load_state_dict(sampler.state_dict())
        state = algo.step(state, sampler)
        unprojected = free.step(start, other)
        want = np.clip(unprojected.nu[0].numpy(), -R, R)
        np.testing.assert_allclose(state.nu[0].numpy(), want, rtol=0, atol=1e-12)
        units = algo.reward.unit_rewards(state.nu)
        torch.testing.assert_close(units, state.nu[0], rtol=0, atol=0)  # the table is the reward
        at_bound += int((state.nu[0].abs() == R).sum())
        free._policy_cache = None  # the free copy's cache holds its own y, z
    assert at_bound > 0, "the clip never bound: the test would not see a missing projection"
    assert float(state.nu[0].abs().max()) <= R


def test_pgrad_sq_is_zero_at_the_box_minimiser_where_grad_sq_keeps_a_floor():
    """At the minimiser of F over [-R, R]^n (scipy's L-BFGS-B on the numpy objective, per context) the box binds
    with the gradient pointing out of it: grad_sq stays away from 0, the projected gradient's square (pgrad_sq)
    is 0 there; at a point with some coordinates on the box and some inside, pgrad_sq equals
    sum (r - clip(r - g, -R, R))^2 of a finite-difference gradient g (F is the mean over contexts)."""
    from ratebench.evaluation import Evaluator

    bound = 0.3
    problem = envs.make(bandit.BanditConfig(n_contexts=2, n_actions=3, beta=0.5, instance_seed=5))
    X, A = problem.steps[0].ref_logp.shape
    minimiser = []
    for x in range(X):
        F = numpy_context_objective(problem, x)
        runs = [minimize(F, np.array(x0), method="L-BFGS-B", bounds=[(-bound, bound)] * A,
                         options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 2000})
                for x0 in itertools.product(np.linspace(-bound, bound, 3), repeat=A)]
        minimiser.append(min(runs, key=lambda run: run.fun).x)
    minimiser = np.concatenate(minimiser)
    assert np.isclose(np.abs(minimiser), bound).any()  # the box binds on this instance
    ref = global_ref.global_reference(problem, bound=bound)

    box = NetConfig(kind="tabular", bound=bound, bound_reading="project")

    def metrics(units):  # the projected tabular model at these unit rewards, the deployed policy their soft-optimal one
        units = torch.tensor(np.asarray(units)[None], dtype=D)
        logps = exact.soft_optimal(problem, problem.step_tables_from_units(units))[0]
        return Evaluator(problem, ref, FixedState(problem, units, logps, None, box))(None)

    at_min = metrics(minimiser)
    assert float(at_min["grad_sq"][0]) > 1e-4  # the floor grad_sq has at the box minimiser
    assert float(at_min["pgrad_sq"][0]) < 1e-14

    rng = np.random.default_rng(0)
    point = rng.uniform(-bound, bound, X * A)
    point[[0, 4]] = bound, -bound  # two coordinates on the box
    g = NumpyBandit(problem).grad_fd(point)  # F, the mean over contexts, in numpy (tests/test_audit.py)
    expected = float(((point - np.clip(point - g, -bound, bound)) ** 2).sum())
    got = metrics(point)
    assert float(got["pgrad_sq"][0]) == pytest.approx(expected, rel=1e-6)
    assert float(got["grad_sq"][0]) == pytest.approx(float((g ** 2).sum()), rel=1e-6)
    # inside the box the projected gradient is the gradient
    inner = 0.5 * point
    free = metrics(inner)
    assert float(free["pgrad_sq"][0]) == pytest.approx(float(free["grad_sq"][0]), rel=1e-12)
