"""offline_rlhf against computations written here, apart from the package: the MLE against scipy's minimiser of
the Bradley-Terry likelihood over the raw drawn pairs (not the algorithm's count table), the Gibbs policy against
pi_ref exp(r / beta) / Z in numpy, the pessimistic bonus against its formula over the raw pairs, the counters,
and the unregularised value_gap against enumeration."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize, root

from ratebench import envs
from ratebench.algorithms.offline_rlhf import OfflineRLHF
from ratebench.config import validate
from ratebench.core.errors import ConfigError
from ratebench.envs import exact
from ratebench.envs.sampling import Counters, CountingSampler

TINY = {"bandit": ["env=bandit", "env.n_contexts=3", "env.n_actions=3", "env.beta=0.5"],
        "mdp": ["env=mdp", "env.n_states=2", "env.n_actions=2", "env.horizon=3", "env.beta=0.5"]}
BATCH, STEPS = 8, 5


def build(compose_config, env, *extra):
    v = validate(compose_config(["algorithm=offline_rlhf", f"algorithm.batch_pairs={BATCH}", *TINY[env], *extra]))
    problem = envs.make(v.env)
    return OfflineRLHF(v.algorithm, v.model, problem), problem, v.seeds


def run(algo, problem, seeds, steps=STEPS):
    counters = Counters()
    sampler = CountingSampler(problem, seeds, counters)
    state = algo.init(seeds)
    for _ in range(steps):
        state = algo.step(state, sampler)
    return state, counters


def raw_pairs(problem, seeds, features, steps=STEPS):
    """The same draws as the algorithm's (same seeds, same calls), as raw per-pair feature differences and
    labels: (B, n, d), (B, n). The behaviour policy is uniform, written here."""
    sampler = CountingSampler(problem, seeds, Counters())
    uniform = [torch.full((1, s.n_states, problem.n_actions), -math.log(problem.n_actions), dtype=torch.float64)
               for s in problem.steps]
    diffs, labels = [], []
    for _ in range(steps):
        pairs = sampler.pairs(uniform, BATCH)
        cols = []
        for k in range(features.shape[1]):  # Phi_k(tau): the k-th feature summed along the trajectory
            tables = problem.step_tables_from_units(features[:, k][None])
            cols.append(pairs.first.returns(tables) - pairs.second.returns(tables))
        diffs.append(torch.stack(cols, -1))
        labels.append(pairs.label)
    return torch.cat(diffs, 1).numpy(), torch.cat(labels, 1).numpy()


def scipy_mle(dphi: np.ndarray, y: np.ndarray, ridge: float) -> np.ndarray:
    """argmin sum_i [log(1 + e^{m_i}) - y_i m_i] + ridge/2 |theta|^2, m_i = dphi_i . theta, by scipy (a trust
    region, then the gradient's root)."""
    def f(theta):
        m = dphi @ theta
        return np.sum(np.logaddexp(0, m) - y * m) + 0.5 * ridge * theta @ theta

    def g(theta):
        m = dphi @ theta
        return dphi.T @ (1 / (1 + np.exp(-m)) - y) + ridge * theta

    def hess(theta):
        s = 1 / (1 + np.exp(-(dphi @ theta)))
        return (dphi.T * (s * (1 - s))) @ dphi + ridge * np.eye(dphi.shape[1])

    start = minimize(f, np.zeros(dphi.shape[1]), jac=g, hess=hess, method="trust-exact").x
    out = root(g, start, jac=hess, method="hybr", tol=1e-14)  # polished as the root of the gradient
    assert np.abs(g(out.x)).max() < 1e-10
    return out.x


@pytest.mark.parametrize("env,features", [("bandit", "linear"), ("bandit", "tabular"), ("mdp", "linear")])
def test_mle_matches_scipy_on_the_raw_pairs(compose_config, env, features):
    algo, problem, seeds = build(compose_config, env, f"algorithm.features={features}")
    state, _ = run(algo, problem, seeds)
    dphi, y = raw_pairs(problem, seeds, algo.phi)
    for b in range(len(seeds)):
        expected = scipy_mle(dphi[b], y[b], algo.cfg.ridge)
        np.testing.assert_allclose(state.theta[b].numpy(), expected, atol=1e-7, rtol=1e-7)


def test_mle_refit_from_a_warm_start_equals_a_cold_fit(compose_config):
    """The warm start changes where Newton starts, not where it ends (a strictly convex loss)."""
    algo, problem, seeds = build(compose_config, "bandit")
    state, _ = run(algo, problem, seeds)
    cold = algo.fit(state.count, state.wins, torch.zeros_like(state.theta))
    far = algo.fit(state.count, state.wins, torch.full_like(state.theta, 30.0))
    np.testing.assert_allclose(cold.numpy(), state.theta.numpy(), atol=1e-9)
    np.testing.assert_allclose(far.numpy(), state.theta.numpy(), atol=1e-9)


def test_gibbs_policy_is_the_closed_form(compose_config):
    """Bandit: pi(a|x) = pi_ref(a|x) exp(r_hat(x, a) / beta) / Z(x), r_hat = phi theta_hat (pessimism none)."""
    algo, problem, seeds = build(compose_config, "bandit")
    state, _ = run(algo, problem, seeds)
    ref = problem.steps[0].ref_logp.numpy()  # (X, A)
    phi = problem.unit_features.numpy()  # (X A, d)
    for b in range(len(seeds)):
        r = (phi @ state.theta[b].numpy()).reshape(ref.shape)
        w = np.exp(ref) * np.exp(r / problem.beta)
        expected = np.log(w / w.sum(1, keepdims=True))
        np.testing.assert_allclose(algo.policy_log_probs(state)[0][b].numpy(), expected, atol=1e-12)


def test_lcb_bonus_and_pessimistic_policy_match_their_formulas(compose_config):
    """bonus(x, a) = gamma sqrt((phi - v_x)^T Sigma^-1 (phi - v_x)), Sigma = sum_i dphi_i dphi_i^T + ridge I over the
    raw pairs, v_x the uniform mean of phi(x, .); the policy is pi_ref exp((r_hat - bonus) / beta) / Z."""
    gamma = 0.7
    algo, problem, seeds = build(compose_config, "bandit", "algorithm.pessimism=lcb", f"algorithm.bonus={gamma}")
    state, _ = run(algo, problem, seeds)
    dphi, _ = raw_pairs(problem, seeds, algo.phi)
    ref = problem.steps[0].ref_logp.numpy()
    X, A = ref.shape
    phi = problem.unit_features.numpy().reshape(X, A, -1)
    centred = (phi - phi.mean(1, keepdims=True)).reshape(X * A, -1)
    for b in range(len(seeds)):
        sigma = dphi[b].T @ dphi[b] + algo.cfg.ridge * np.eye(dphi.shape[2])
        bonus = gamma * np.sqrt(np.einsum("ui,ij,uj->u", centred, np.linalg.inv(sigma), centred))
        np.testing.assert_allclose(state.penalty[b].numpy(), bonus, rtol=1e-10, atol=1e-12)
        r = (phi.reshape(X * A, -1) @ state.theta[b].numpy() - bonus).reshape(X, A)
        w = np.exp(ref + r / problem.beta)
        np.testing.assert_allclose(algo.policy_log_probs(state)[0][b].numpy(), np.log(w / w.sum(1, keepdims=True)),
                                   atol=1e-12)
    assert float(state.penalty.min()) > 0  # the switch does something: every unit is lowered


def test_pessimism_changes_the_policy_and_none_leaves_it(compose_config):
    """The switch: lcb with bonus 0 is the plain MLE policy; a positive bonus moves it."""
    base, problem, seeds = build(compose_config, "bandit")
    zero, _, _ = build(compose_config, "bandit", "algorithm.pessimism=lcb", "algorithm.bonus=0")
    some, _, _ = build(compose_config, "bandit", "algorithm.pessimism=lcb", "algorithm.bonus=1")
    pol = [a.policy_log_probs(run(a, problem, seeds)[0])[0] for a in (base, zero, some)]
    torch.testing.assert_close(pol[0], pol[1], rtol=0, atol=1e-14)
    assert float((pol[0] - pol[2]).abs().max()) > 1e-3


def test_counts_two_samples_and_one_query_per_pair(compose_config):
    algo, problem, seeds = build(compose_config, "mdp")
    state, counters = run(algo, problem, seeds, steps=3)
    assert (counters.samples, counters.queries) == (2 * BATCH * 3, BATCH * 3)
    assert torch.equal(state.count.sum(1), torch.full((len(seeds),), float(BATCH * 3), dtype=torch.float64))


def test_value_gap_against_enumeration(compose_config):
    """exact.expected_return = sum over enumerated trajectories of P(tau) R(tau); exact.max_return = the best
    deterministic policy's return, found here by trying every deterministic policy of a tiny MDP."""
    algo, problem, seeds = build(compose_config, "mdp")
    state, _ = run(algo, problem, seeds)
    logps = algo.policy_log_probs(state)
    true = problem.true_step_tables()
    probs = exact.trajectory_probs(problem, logps)  # (B, G, m)
    returns = exact.trajectory_returns(problem, true)  # (1, G, m)
    enumerated = ((probs * returns).sum(-1) @ problem.init_prob).numpy()
    np.testing.assert_allclose(exact.expected_return(problem, true, logps).numpy(), enumerated, atol=1e-12)
    shapes = [(s.n_states, problem.n_actions) for s in problem.steps]
    cells = [(h, s) for h, (n, _) in enumerate(shapes) for s in range(n)]
    best = -np.inf
    for choice in np.ndindex(*([problem.n_actions] * len(cells))):
        tables = [torch.full((1, n, a), -1e300, dtype=torch.float64).clamp(min=-1e30) for n, a in shapes]
        for (h, s), a in zip(cells, choice):
            tables[h][0, s, a] = 0.0
        value = float(((exact.trajectory_probs(problem, tables) * returns).sum(-1) @ problem.init_prob)[0])
        best = max(best, value)
    assert abs(float(exact.max_return(problem, true)[0]) - best) < 1e-12


@pytest.mark.parametrize("field,value", [("pessimism", "optimism"), ("behaviour", "greedy"), ("features", "mlp"),
                                         ("ridge", "0"), ("bonus", "-1"), ("batch_pairs", "0")])
def test_bad_config_names_the_field(compose_config, field, value):
    v = validate(compose_config(["algorithm=offline_rlhf", *TINY["bandit"]]))
    setattr(v.algorithm, field, type(getattr(v.algorithm, field))(value))
    with pytest.raises(ConfigError, match=f"algorithm.{field}"):
        v.algorithm.check()
