"""algorithm.momentum=storm (docs/bilevel.md "Momentum"): F2SA's momentum-assisted estimators as the recursion
d_k = g(x_k; xi_k) + (1 - eta_k)(d_{k-1} - g(x_{k-1}; xi_k)).

- with eta = 1 the step is the plain step, bit for bit, on the same draws (and counts the same samples);
- with exact gradients the recursion returns the exact gradient whatever eta: the plain exact step, bit for bit;
- the recursion and the updates equal a numpy re-implementation fed the step's own sampled gradients;
- the estimate at the previous point, on the current point's samples, is unbiased for the previous point's
  exact gradient (z-test, Bonferroni, family-wise false-alarm rate 1e-3), and the same test rejects it without
  the importance weights;
- bad values of the new fields are one ConfigError naming the field and the allowed values, before any compute.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ratebench import envs
from ratebench.algorithms import bilevel as bilevel_module
from ratebench.algorithms import oracles as oracles_module
from ratebench.algorithms.bilevel import Bilevel, BilevelConfig
from ratebench.algorithms.models import ModelConfig, NetConfig
from ratebench.algorithms.oracles import ExactOracle, StochasticOracle
from ratebench.core.errors import ConfigError
from ratebench.envs.sampling import Counters, CountingSampler
from test_oracle import PER_ESTIMATE, REPLICATES, SMALL, assert_mean_equals, replicate
from test_oracle import flat as flat_grads  # (R, d) per replicate

SEEDS = [0, 1]
# larger steps than the defaults so that a few steps move every sequence visibly (and eta < 1 matters)
MOVING = dict(c_alpha=3.0, c_alpha_z=3.0, c_xi=3.0, k0=1.0, alpha_exponent=0.4, alpha_z_exponent=0.4,
              xi_exponent=0.6, lam_exponent=0.2)


def make(env: str, tabular: bool = False, **cfg) -> Bilevel:
    reward = NetConfig(kind="tabular", bound=2.0, bound_reading="project") if tabular else NetConfig(width=4, activation="tanh")
    algo = Bilevel(BilevelConfig(**cfg), ModelConfig(reward=reward, policy=NetConfig(width=4)), envs.make(SMALL[env]))
    algo.impl = "reference"
    return algo


def run(algo: Bilevel, steps: int):
    """(states after every step, counters) from one sampler."""
    state, counters = algo.init(SEEDS), Counters()
    sampler = CountingSampler(algo.problem, SEEDS, counters)
    states = []
    for _ in range(steps):
        state = algo.step(state, sampler)
        states.append([t.clone() for t in state.nu + state.y + state.z])
    return states, counters


@pytest.mark.parametrize("env", sorted(SMALL))
@pytest.mark.parametrize("oracle", ["stochastic", "exact_lower", "exact_upper"])
def test_momentum_with_eta_one_is_the_plain_step_on_the_same_draws(env, oracle):
    plain, plain_counts = run(make(env, oracle=oracle, **MOVING), 6)
    storm, storm_counts = run(make(env, oracle=oracle, momentum="storm", momentum_c=1.0, momentum_exponent=0.0,
                                   **MOVING), 6)
    for k, (a, b) in enumerate(zip(plain, storm)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {k}"
    assert (plain_counts.samples, plain_counts.queries) == (storm_counts.samples, storm_counts.queries)
    # the comparison is not empty: eta < 1 changes the trajectory of the same draws
    other, other_counts = run(make(env, oracle=oracle, momentum="storm", momentum_c=0.3, momentum_exponent=0.5,
                                   **MOVING), 6)
    assert not all(torch.equal(x, y) for x, y in zip(plain[-1], other[-1]))
    assert (other_counts.samples, other_counts.queries) == (plain_counts.samples, plain_counts.queries)  # no extra draws


@pytest.mark.parametrize("tabular", [False, True])
def test_exact_gradients_make_the_recursion_the_plain_exact_step(tabular):
    plain, _ = run(make("bandit", tabular, oracle="exact", **MOVING), 5)
    storm, counts = run(make("bandit", tabular, oracle="exact", momentum="storm", momentum_c=0.3,
                             momentum_exponent=0.5, **MOVING), 5)
    for k, (a, b) in enumerate(zip(plain, storm)):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), f"step {k}"
    assert counts.samples == 0


def flat(tensors) -> np.ndarray:
    return np.concatenate([t.detach().numpy().reshape(t.shape[0], -1) for t in tensors], 1)


@pytest.mark.parametrize("env", sorted(SMALL))
def test_recursion_and_updates_equal_a_numpy_reimplementation_of_the_same_sampled_gradients(env, monkeypatch):
    """Record the sampled gradients g(x_k; xi_k) and g(x_{k-1}; xi_k) the step computes (the arguments of its
    recursion), then rebuild d_k and the iterates in numpy from x_0 and those gradients alone."""
    calls = []
    real = bilevel_module.storm

    def recording(g, g_prev, d_prev, eta):
        calls.append(([flat([t]) for t in g], None if not d_prev else [flat([t]) for t in g_prev], eta))
        return real(g, g_prev, d_prev, eta)

    monkeypatch.setattr(bilevel_module, "storm", recording)
    algo = make(env, momentum="storm", momentum_c=0.5, momentum_exponent=0.5, **MOVING)
    state, sampler = algo.init(SEEDS), CountingSampler(algo.problem, SEEDS, Counters())
    x = {"z": [flat([t]) for t in state.z], "y": [flat([t]) for t in state.y], "nu": [flat([t]) for t in state.nu]}
    d = {"z": None, "y": None, "nu": None}
    steps = 5
    for k in range(steps):
        state = algo.step(state, sampler)
        assert len(calls) == 3 * (k + 1)  # z, y, nu
        eta_k = min(1.0, 0.5 / (k + MOVING["k0"]) ** 0.5)
        alpha_z = MOVING["c_alpha_z"] / (k + MOVING["k0"]) ** MOVING["alpha_z_exponent"]
        alpha = MOVING["c_alpha"] / (k + MOVING["k0"]) ** MOVING["alpha_exponent"]
        xi = MOVING["c_xi"] / (k + MOVING["k0"]) ** MOVING["xi_exponent"]
        for (name, lr), (g, g_prev, eta) in zip((("z", -alpha_z), ("y", alpha), ("nu", xi)), calls[-3:]):
            assert eta == pytest.approx(eta_k, rel=1e-15)
            assert (g_prev is None) == (k == 0)
            if k == 0:
                d[name] = [gi.copy() for gi in g]  # d_0 = g_0
            else:
                d[name] = [gi + (1 - eta_k) * (di - gpi) for gi, gpi, di in zip(g, g_prev, d[name])]
            x[name] = [xi_ - lr * di for xi_, di in zip(x[name], d[name])]
        for name, got in (("z", state.z), ("y", state.y), ("nu", state.nu)):
            for want, have in zip(x[name], got):
                np.testing.assert_allclose(flat([have]), want, rtol=0, atol=1e-13, err_msg=f"{name} at step {k}")
    assert any(abs(1 - c[2]) > 0.1 for c in calls)  # eta < 1 was exercised


# --- the estimate at the previous point on the current point's samples is unbiased for that point's gradient ---

# the z-test of tests/test_oracle.py (assert_mean_equals: REPLICATES estimates, Bonferroni at FAMILY_ALPHA)


class TwoPoints:
    """A current point (nu, theta) and a previous one (nu', theta') apart, replicated over REPLICATES seeds."""

    def __init__(self, env: str):
        self.algo = make(env)
        gen = torch.Generator().manual_seed(17)
        theta, nu = self.algo.policy.init([0]), self.algo.reward.init([0])
        theta[-2] = 0.7 * torch.randn(theta[-2].shape, generator=gen, dtype=torch.float64)
        self.theta, self.nu = theta, nu
        self.theta_prev = [p + 0.6 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in theta]
        self.nu_prev = [p + 0.3 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in nu]
        self.sampler = CountingSampler(self.algo.problem, list(range(REPLICATES)), Counters())

    def tables(self, nu):
        return [r.detach() for r in self.algo.reward.step_tables(nu)]

    def theta_estimate(self, method: str) -> torch.Tensor:
        """g^_theta at (nu', theta') from samples of pi_theta (the second surrogate of the two-point form)."""
        oracle, pol = StochasticOracle(self.algo.problem), self.algo.policy
        now, prev = replicate(self.theta, REPLICATES), replicate(self.theta_prev, REPLICATES)
        previous = (self.tables(replicate(self.nu_prev, REPLICATES)), pol.log_probs(prev))
        _, before = getattr(oracle, method)(self.sampler, self.tables(replicate(self.nu, REPLICATES)),
                                            pol.log_probs(now), PER_ESTIMATE, previous)
        return flat_grads(torch.autograd.grad(before.sum(), prev))

    def theta_exact(self, method: str) -> torch.Tensor:
        prev = [p.clone().requires_grad_(True) for p in self.theta_prev]
        value = getattr(ExactOracle(self.algo.problem), method)(None, self.tables(self.nu_prev),
                                                                 self.algo.policy.log_probs(prev), PER_ESTIMATE)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value.sum(), prev)])

    def nu_estimate(self, method: str) -> torch.Tensor:
        """g^_nu at (nu', theta') from samples of pi_theta."""
        oracle, pol = StochasticOracle(self.algo.problem), self.algo.policy
        with torch.no_grad():
            logp = pol.log_probs(replicate(self.theta, REPLICATES))
            logp_prev = pol.log_probs(replicate(self.theta_prev, REPLICATES))
        _, before = getattr(oracle, method)(self.sampler, logp, PER_ESTIMATE, logp_prev)
        nu = replicate(self.nu_prev, REPLICATES)
        grads = torch.autograd.grad(before(self.algo.reward.step_tables(nu)).sum(), nu)
        return flat_grads(grads)

    def nu_exact(self, method: str) -> torch.Tensor:
        nu = [p.clone().requires_grad_(True) for p in self.nu_prev]
        with torch.no_grad():
            logp = self.algo.policy.log_probs(self.theta_prev)
        fn = getattr(ExactOracle(self.algo.problem), method)(None, logp, PER_ESTIMATE)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(fn(self.algo.reward.step_tables(nu)).sum(), nu)])


@pytest.fixture(params=sorted(SMALL), scope="module")
def two(request):
    return TwoPoints(request.param)


@pytest.mark.parametrize("method", ["value_theta", "upper_theta"])
def test_previous_point_policy_estimates_are_unbiased(two, method):
    assert_mean_equals(two.theta_estimate(method), two.theta_exact(method))


@pytest.mark.parametrize("method", ["value_nu", "upper_nu"])
def test_previous_point_reward_estimates_are_unbiased(two, method):
    assert_mean_equals(two.nu_estimate(method), two.nu_exact(method))


@pytest.mark.parametrize("method", ["value_theta", "upper_theta", "value_nu", "upper_nu"])
def test_z_test_rejects_the_previous_point_estimate_without_importance_weights(two, method, monkeypatch):
    """The same samples read as if drawn from the previous policy (weights 1) estimate the wrong gradient."""
    import ratebench.algorithms.estimators as estimators

    ones = lambda traj, target, behaviour: torch.ones(traj.states.shape[:2], dtype=torch.float64)  # noqa: E731
    monkeypatch.setattr(oracles_module, "importance_weights", ones)
    monkeypatch.setattr(estimators, "importance_weights", ones)
    estimate, exact_value = ((two.theta_estimate, two.theta_exact) if method.endswith("theta")
                             else (two.nu_estimate, two.nu_exact))
    with pytest.raises(AssertionError, match="max \\|z\\|"):
        assert_mean_equals(estimate(method), exact_value(method))


# --- configuration ---

@pytest.mark.parametrize("fields, field, allowed", [
    ({"momentum": "adam"}, "algorithm.momentum", "['none', 'storm']"),
    ({"momentum": "storm", "momentum_c": 0.0}, "algorithm.momentum_c", "> 0"),
    ({"momentum": "storm", "momentum_exponent": 1.5}, "algorithm.momentum_exponent", "[0, 1]"),
    ({"momentum": "storm", "variant": "double_loop"}, "algorithm.momentum", "none"),
    ({"momentum": "storm", "inner_steps": 2}, "algorithm.inner_steps", "must be 1"),
])
def test_bad_momentum_fields_name_the_field_and_the_allowed_values(fields, field, allowed):
    with pytest.raises(ConfigError) as err:
        BilevelConfig(**fields).check()
    assert err.value.field == field and allowed in str(err.value)


def test_bad_momentum_on_the_command_line_exits_2_naming_the_field(expect_bad_input):
    expect_bad_input(["algorithm=bilevel", "algorithm.momentum=heavy_ball"], ["algorithm.momentum", "none", "storm"])
    expect_bad_input(["algorithm=bilevel", "algorithm.momentum=storm", "algorithm.momentum_exponent=2"],
                     ["algorithm.momentum_exponent", "[0, 1]"])


@pytest.mark.parametrize("impl", ["fast", "eager"])
def test_momentum_with_an_impl_other_than_reference_exits_2_before_compute(impl, expect_bad_input):
    expect_bad_input(["algorithm=bilevel", "algorithm.momentum=storm", f"impl={impl}"],
                     ["impl", "algorithm.momentum=storm", "allowed: reference"])


def test_momentum_cannot_batch_instances():
    assert "reference step only" in Bilevel.instance_batch_refusal(BilevelConfig(momentum="storm"))
    assert Bilevel.instance_batch_refusal(BilevelConfig()) is None
    assert not make("bandit", momentum="storm").has_eager_step()
