"""softmax_pg against computations written here, apart from the package: the exact step is eta times the
gradient of J (central finite differences of an independent numpy evaluation of the KL-regularised value),
and the stochastic step is an unbiased estimate of that gradient (a z-test over seeds)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ratebench import envs
from ratebench.algorithms.softmax_pg import SoftmaxPG, smoothness
from ratebench.config import validate
from ratebench.envs.sampling import Counters, CountingSampler

TINY = {"bandit": ["env=bandit", "env.n_contexts=2", "env.n_actions=3", "env.beta=0.3"],
        "mdp": ["env=mdp", "env.n_states=2", "env.n_actions=2", "env.horizon=3", "env.beta=0.3"]}


def build(compose_config, env, *extra):
    v = validate(compose_config(["algorithm=softmax_pg", *TINY[env], *extra]))
    problem = envs.make(v.env)
    return SoftmaxPG(v.algorithm, v.model, problem), problem, v.seeds


def tables(problem):
    """The problem's data as plain numpy arrays (rewards per step, pi_ref, transitions, initial law)."""
    true = [r[0].numpy() for r in problem.true_step_tables()]
    steps = [(s.ref_logp.numpy(), s.next_idx.numpy(), s.next_prob.numpy()) for s in problem.steps]
    return true, steps, problem.init_prob.numpy(), problem.beta


def value_numpy(theta: list[np.ndarray], data) -> float:
    """J(theta) = E[sum_h r_h - beta log pi/pi_ref] by backward induction, written without the package."""
    true, steps, rho, beta = data
    v_next = None
    for h in reversed(range(len(steps))):
        ref, nxt, prob = steps[h]
        logits = theta[h] - theta[h].max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        q = true[h] - beta * (logp - ref)
        if v_next is not None:
            q = q + (v_next[nxt] * prob).sum(-1)
        v_next = (np.exp(logp) * q).sum(-1)
    return float(v_next @ rho)


def fd_gradient(theta: list[np.ndarray], data, h: float = 1e-6) -> list[np.ndarray]:
    grads = []
    for k, t in enumerate(theta):
        g = np.zeros_like(t)
        for idx in np.ndindex(t.shape):
            plus = [x.copy() for x in theta]
            minus = [x.copy() for x in theta]
            plus[k][idx] += h
            minus[k][idx] -= h
            g[idx] = (value_numpy(plus, data) - value_numpy(minus, data)) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("env", ["bandit", "mdp"])
def test_exact_step_is_eta_times_the_finite_difference_gradient(compose_config, env):
    algo, problem, _ = build(compose_config, env, "algorithm.oracle=exact", "algorithm.init_scale=1.0",
                             "seeds=[3,11]", "budget.steps=10")
    state = algo.init([3, 11])
    before = [t.clone() for t in state.theta]
    counters = Counters()
    state = algo.step(state, CountingSampler(problem, [3, 11], counters))
    assert counters.samples == 0 and counters.queries == 0  # the exact oracle draws nothing
    assert state.lr == pytest.approx(1 / smoothness(problem))
    data = tables(problem)
    for b in range(2):
        fd = fd_gradient([t[b].numpy() for t in before], data)
        for h, (new, old) in enumerate(zip(state.theta, before)):
            step = ((new[b] - old[b]) / state.lr).numpy()
            np.testing.assert_allclose(step, fd[h], rtol=1e-6, atol=1e-8, err_msg=f"{env} seed row {b} step {h}")
    # the two seeds started apart (init_scale): the comparison is not of one point twice
    assert not torch.allclose(before[0][0], before[0][1])


def test_bandit_gradient_has_mei_closed_form(compose_config):
    """Mei et al. (2020) Lemma 10 form, bandit with KL to pi_ref: dJ/dtheta_a = pi_a (q_a - pi . q) per
    context, q = r - beta log pi/pi_ref (the finite differences above check the same step another way)."""
    algo, problem, _ = build(compose_config, "bandit", "algorithm.oracle=exact", "algorithm.init_scale=0.7",
                             "seeds=[2]", "budget.steps=10")
    state = algo.init([2])
    theta = state.theta[0][0].numpy().copy()
    state = algo.step(state, CountingSampler(problem, [2], Counters()))
    true, steps, rho, beta = tables(problem)
    pi = np.exp(theta - theta.max(-1, keepdims=True))
    pi /= pi.sum(-1, keepdims=True)
    q = true[0] - beta * (np.log(pi) - steps[0][0])
    closed = rho[:, None] * pi * (q - (pi * q).sum(-1, keepdims=True))
    np.testing.assert_allclose((state.theta[0][0].numpy() - theta) / state.lr, closed, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("env", ["bandit", "mdp"])
def test_stochastic_step_is_an_unbiased_gradient_estimate(compose_config, env):
    """Mean over 200 seeds (each its own stream) of (theta_1 - theta_0) / eta vs the exact gradient: every
    coordinate within 4.5 standard errors (two-sided false-alarm rate 7e-6 per coordinate, < 2e-4 over all).
    All seeds start at the same theta_0 (init_scale 0), so their estimates are i.i.d. draws of one estimator.
    Also counts: batch_traj samples per seed and step, no labels."""
    seeds = list(range(200))
    algo, problem, _ = build(compose_config, env, "algorithm.batch_traj=64", f"seeds={seeds}")
    counters = Counters()
    state = algo.init(seeds)
    before = [t.clone() for t in state.theta]
    state = algo.step(state, CountingSampler(problem, seeds, counters))
    assert (counters.samples, counters.queries) == (64, 0)
    exact = fd_gradient([t[0].numpy() for t in before], tables(problem))
    for h, (new, old) in enumerate(zip(state.theta, before)):
        est = ((new - old) / state.lr).numpy()  # (seeds, n_h, A)
        mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(len(seeds))
        z = (mean - exact[h]) / np.maximum(se, 1e-12)
        assert np.all(np.abs(z) < 4.5), f"{env} step {h}: z = {z}"
        assert np.all(se > 0)  # the estimates do vary: a deterministic copy of the exact step would pass trivially
    # and a biased estimator would fail: the exact gradient scaled by 1.5 is rejected at the same threshold
    est = ((state.theta[0] - before[0]) / state.lr).numpy()
    z_biased = (est.mean(0) - 1.5 * exact[0]) / (est.std(0, ddof=1) / np.sqrt(len(seeds)))
    assert np.any(np.abs(z_biased) >= 4.5)


def test_bad_options_are_refused_before_any_compute(expect_bad_input):
    expect_bad_input(["algorithm=softmax_pg", "algorithm.oracle=magic"], ["algorithm.oracle", "stochastic", "exact"])
    expect_bad_input(["algorithm=softmax_pg", "algorithm.batch_traj=1"], ["algorithm.batch_traj", ">= 2"])
    expect_bad_input(["algorithm=softmax_pg", "algorithm.lr_scale=0"], ["algorithm.lr_scale", "> 0"])
    expect_bad_input(["algorithm=softmax_pg", "algorithm.lr_exponent=2"], ["algorithm.lr_exponent", "[0, 1]"])
    expect_bad_input(["algorithm=softmax_pg", "algorithm.oracle=exact"], ["budget.steps"])
    expect_bad_input(["algorithm=softmax_pg", "algorithm.init_center=zero"], ["algorithm.init_center", "uniform"])


def test_initial_policy_is_centred_where_asked(compose_config):
    """init_center=ref starts every seed at pi_ref (init_scale 0), uniform at the uniform policy."""
    algo, problem, _ = build(compose_config, "bandit", "seeds=[0,1]")
    torch.testing.assert_close(algo.policy_log_probs(algo.init([0, 1]))[0],
                               problem.steps[0].ref_logp[None].expand(2, -1, -1))
    algo, problem, _ = build(compose_config, "bandit", "seeds=[0,1]", "algorithm.init_center=uniform")
    logp = algo.policy_log_probs(algo.init([0, 1]))[0]
    torch.testing.assert_close(logp, torch.full_like(logp, -np.log(problem.n_actions)))
