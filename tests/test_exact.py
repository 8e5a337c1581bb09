"""Exact quantities against independent computations: direct maximisation, enumeration,
finite differences and Monte-Carlo draws from the sampler (fixed seeds, stated false-alarm rates)."""
from __future__ import annotations

import math

import pytest
import torch

from ratebench import envs
from ratebench.algorithms.models import NetConfig, RewardModel
from ratebench.envs import bandit, exact, global_ref, mdp, token
from ratebench.envs.sampling import Counters, CountingSampler

from independent_solvers import torch_lbfgs

SMALL = {
    "bandit": bandit.BanditConfig(n_contexts=3, n_actions=4, feature_dim=3),
    "mdp": mdp.MDPConfig(n_states=3, n_actions=2, horizon=3),
    "token": token.TokenConfig(vocab=3, length=3),
}
Z_CRIT = 4.42  # two-sided normal quantile for a 1e-5 false-alarm rate per test


@pytest.fixture(params=sorted(SMALL))
def problem(request):
    return envs.make(SMALL[request.param])


def random_unit_rewards(problem, seed: int, batch: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, problem.n_units, generator=gen, dtype=torch.float64)


def random_policy(problem, seed: int, scale: float = 1.5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.log_softmax(scale * torch.randn(1, s.n_states, problem.n_actions, generator=gen,
                                                  dtype=torch.float64), -1) for s in problem.steps]


def enumerated_value(problem, rewards, logps) -> torch.Tensor:
    """J by summing over every trajectory: E[R - beta sum log pi/pi_ref] (independent of the
    backward recursion in exact.policy_value)."""
    q = exact.trajectory_probs(problem, logps)
    ret = exact.trajectory_returns(problem, rewards)
    log_ratio = exact.trajectory_returns(problem, [lp - s.ref_logp for lp, s in zip(logps, problem.steps)])
    return ((q * (ret - problem.beta * log_ratio)).sum(-1)) @ problem.init_prob


def test_policy_value_equals_enumeration(problem):
    rewards = problem.step_tables_from_units(random_unit_rewards(problem, 1))
    logps = random_policy(problem, 2)
    assert torch.allclose(exact.policy_value(problem, rewards, logps), enumerated_value(problem, rewards, logps),
                          rtol=0, atol=1e-12)


def test_soft_optimal_policy_matches_direct_maximisation(problem):
    """pi*_nu from soft backward induction = argmax of J over tabular softmax logits (L-BFGS)."""
    rewards = problem.step_tables_from_units(random_unit_rewards(problem, 3))
    star, _ = exact.soft_optimal(problem, rewards)
    logits = torch_lbfgs(lambda ls: -enumerated_value(problem, rewards, [torch.log_softmax(l, -1) for l in ls]).sum(),
                         [torch.zeros(1, s.n_states, problem.n_actions, dtype=torch.float64) for s in problem.steps],
                         rounds=5, tol=1e-13, history=50)
    direct = [torch.softmax(l, -1) for l in logits]
    for h, (p_direct, lp_star) in enumerate(zip(direct, star)):
        assert torch.allclose(p_direct, lp_star.exp(), atol=1e-6), f"step {h}"
    assert math.isclose(float(exact.optimal_value(problem, rewards)),
                        float(enumerated_value(problem, rewards, [d.log() for d in direct])), abs_tol=1e-10)


def test_bilevel_objective_gradient_matches_finite_differences(problem):
    units = random_unit_rewards(problem, 4)[0]
    x = units.clone().requires_grad_(True)
    F = lambda r: exact.bilevel_objective(problem, problem.step_tables_from_units(r[None]))[0]  # noqa: E731
    (grad,) = torch.autograd.grad(F(x), x)
    h = 1e-6
    fd = torch.stack([(F(units + h * e) - F(units - h * e)) / (2 * h) for e in torch.eye(problem.n_units,
                                                                                        dtype=torch.float64)])
    assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("label_noise", [0.0, 0.2])
@pytest.mark.parametrize("chunk", [exact.PAIR_CHUNK, 1])
def test_upper_loss_gradient_in_closed_form_equals_autograd_through_the_pair_table(problem, chunk, label_noise):
    """upper_loss's closed-form backward (exact._UpperLossBackward) against autograd through the pair table written
    out here, for the rewards and the policy alone and together, 3 seeds (one per chunk with chunk=1): the same
    value bits and gradients to 1e-14, and second derivatives (a Hessian in the rewards, one in the policy) to 1e-13."""
    problem.label_noise = label_noise
    problem.derived.pop("pair_probs", None)

    def plain(units, logits):
        return plain_tables(problem.step_tables_from_units(units), [torch.log_softmax(t, -1) for t in logits])

    def plain_tables(rewards, logps):
        ret = exact.trajectory_returns(problem, rewards)
        table = torch.nn.functional.softplus(ret[..., :, None] - ret[..., None, :])
        table = table - exact.true_pair_probs(problem) * (ret[..., :, None] - ret[..., None, :])
        prob = exact.trajectory_probs(problem, logps)
        return ((prob[..., :, None] * prob[..., None, :] * table).sum((-1, -2)) * problem.init_prob).sum(-1)

    units = random_unit_rewards(problem, 5, batch=3)
    logits = [2 * lp.expand(3, -1, -1) + 0.1 * torch.arange(3.0, dtype=torch.float64)[:, None, None]
              for lp in random_policy(problem, 6)]
    for wrt in ("rewards", "policy", "both"):
        u = units.clone().requires_grad_(wrt != "policy")
        x = [t.clone().requires_grad_(wrt != "rewards") for t in logits]
        leaves = [u] * (wrt != "policy") + x * (wrt != "rewards")
        value = exact.upper_loss(problem, problem.step_tables_from_units(u), [torch.log_softmax(t, -1) for t in x],
                                 chunk=chunk)
        with torch.no_grad():
            bare = exact.upper_loss(problem, problem.step_tables_from_units(u), [torch.log_softmax(t, -1) for t in x],
                                    chunk=chunk)
        assert torch.equal(value.detach(), bare)  # the forward is the no-grad path's, bit for bit
        got = torch.autograd.grad(value.sum(), leaves)
        want = torch.autograd.grad(plain(u, x).sum(), leaves)
        torch.testing.assert_close(value.detach(), plain(u, x).detach(), rtol=1e-14, atol=0)
        for g, w in zip(got, want):
            assert bool((w.abs() > 1e-6).any())
            torch.testing.assert_close(g, w, rtol=0, atol=1e-14)
    # second derivatives (create_graph): the Hessian in the first seed's rewards and first policy table
    hess = {}
    for name, f in (("closed form", lambda t: exact.upper_loss(problem, problem.step_tables_from_units(t[None]),
                                                                  [torch.log_softmax(x[:1], -1) for x in logits],
                                                                  chunk=chunk)[0]),
                    ("plain", lambda t: plain(t[None], [x[:1] for x in logits])[0])):
        hess[name] = torch.autograd.functional.hessian(f, units[0].clone())
    assert float(hess["plain"].abs().max()) > 1e-3
    torch.testing.assert_close(hess["closed form"], hess["plain"], rtol=0, atol=1e-13)
    def policy_hessian(loss):  # in the first policy table of the first seed
        def of_table(t):
            logps = [torch.log_softmax(t[None], -1)] + [torch.log_softmax(x[:1], -1) for x in logits[1:]]
            return loss(problem.step_tables_from_units(units[:1]), logps)[0]
        return torch.autograd.functional.hessian(of_table, logits[0][0].clone())

    torch.testing.assert_close(policy_hessian(lambda r, lp: exact.upper_loss(problem, r, lp, chunk=chunk)),
                               policy_hessian(plain_tables), rtol=0, atol=1e-13)


@pytest.mark.parametrize("chunk", [exact.PAIR_CHUNK, 1])
def test_upper_loss_on_prebuilt_pair_tables_is_the_same_bits(problem, chunk, monkeypatch):
    """exact.pair_tables built once for several formulas (the evaluation's F, psi and psi's inner problem): upper_loss
    on them gives the value and gradients it computes alone, with and without autograd: bit for bit in one chunk;
    in chunks of one seed to rounding (a table built over three seeds is not always the bits of three built alone:
    where an element falls in a vectorised loop or its scalar tail takes another softplus); tables of other rewards
    change the value (they are what is used); and too large a table is not built."""
    units = random_unit_rewards(problem, 7, batch=3)
    logps = [lp.expand(3, -1, -1) for lp in random_policy(problem, 8)]
    pairs = exact.pair_tables(problem, problem.step_tables_from_units(units))
    assert pairs.losses.shape == pairs.margin_grad.shape == (3, *exact.true_pair_probs(problem).shape)
    results = {}
    for name, given in (("alone", None), ("prebuilt", pairs)):
        u = units.clone().requires_grad_(True)
        value = exact.upper_loss(problem, problem.step_tables_from_units(u), logps, chunk=chunk, pairs=given)
        with torch.no_grad():
            bare = exact.upper_loss(problem, problem.step_tables_from_units(units), logps, chunk=chunk, pairs=given)
        results[name] = (value.detach(), bare, torch.autograd.grad(value.sum(), u)[0])
    for got, want in zip(results["prebuilt"], results["alone"]):
        if chunk == exact.PAIR_CHUNK:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
    other = exact.pair_tables(problem, problem.step_tables_from_units(2 * units))
    assert not torch.equal(exact.upper_loss(problem, problem.step_tables_from_units(units), logps, pairs=other),
                           results["alone"][1])
    monkeypatch.setattr(exact, "PAIR_CHUNK", 3 * exact.true_pair_probs(problem).numel() - 1)
    assert exact.pair_tables(problem, problem.step_tables_from_units(units)) is None


def test_gradient_through_reward_network_matches_finite_differences(problem):
    model = RewardModel(problem, NetConfig(kind="mlp", width=5, activation="tanh"))
    params = model.init([0])
    F = lambda ps: exact.bilevel_objective(problem, model.step_tables(ps))[0]  # noqa: E731
    leaves = [p.clone().requires_grad_(True) for p in params]
    grads = torch.autograd.grad(F(leaves), leaves)
    h = 1e-6
    for i, p in enumerate(params):
        flat = p.reshape(-1)
        for j in range(0, flat.numel(), max(1, flat.numel() // 4)):
            plus = [q.clone() for q in params]
            minus = [q.clone() for q in params]
            plus[i].reshape(-1)[j] += h
            minus[i].reshape(-1)[j] -= h
            fd = (F(plus) - F(minus)) / (2 * h)
            assert math.isclose(float(grads[i].reshape(-1)[j]), float(fd), rel_tol=1e-5, abs_tol=1e-8)


def test_reward_error_equals_explicit_pair_sum(problem):
    rewards = problem.step_tables_from_units(random_unit_rewards(problem, 5))
    q = exact.trajectory_probs(problem, problem.ref_log_probs())[0]
    d = (exact.trajectory_returns(problem, rewards) - exact.trajectory_returns(problem, problem.true_step_tables()))[0]
    pairwise = (q[:, :, None] * q[:, None, :] * (d[:, :, None] - d[:, None, :]) ** 2).sum((1, 2))
    assert math.isclose(float(exact.reward_error(problem, rewards)), float(pairwise @ problem.init_prob),
                        rel_tol=1e-12)


def test_kl_to_ref_equals_enumeration(problem):
    logps = random_policy(problem, 6)
    q = exact.trajectory_probs(problem, logps)
    log_ratio = exact.trajectory_returns(problem, [lp - s.ref_logp for lp, s in zip(logps, problem.steps)])
    assert math.isclose(float(exact.kl_to_ref(problem, logps)), float((q * log_ratio).sum(-1) @ problem.init_prob),
                        rel_tol=1e-12)


def test_local_reference_is_a_minimum(problem):
    value, argmin = global_ref.local_reference(problem)  # F_loc, the one L-BFGS home (envs/global_ref.py)
    F = lambda r: float(exact.bilevel_objective(problem, problem.step_tables_from_units(r[None]))[0])  # noqa: E731
    assert value <= F(problem.true_unit_reward) + 1e-12
    for seed in range(5):
        assert value <= F(random_unit_rewards(problem, 100 + seed)[0]) + 1e-12
    x = argmin.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(exact.bilevel_objective(problem, problem.step_tables_from_units(x[None]))[0], x)
    assert float(grad.norm()) < 1e-5


# --- Monte Carlo against the sampler ------------------------------------------------------
def sampler_for(problem, seed=0):
    return CountingSampler(problem, [seed], Counters())


def test_value_of_random_policy_matches_monte_carlo(problem):
    logps = random_policy(problem, 7)
    n = 100_000
    traj = sampler_for(problem, 1).trajectories(logps, n)
    ref = problem.ref_log_probs()
    g = traj.returns(problem.true_step_tables()) - problem.beta * (traj.log_prob(logps) - traj.log_prob(ref))
    exact_j = float(exact.policy_value(problem, problem.true_step_tables(), logps))
    z = (float(g.mean()) - exact_j) / (float(g.std()) / n**0.5)
    assert abs(z) < Z_CRIT, f"J exact {exact_j:.5f}, MC {float(g.mean()):.5f}, z={z:.2f}"


def test_sampler_trajectory_frequencies_match_exact_probabilities(problem):
    """Pearson chi-square of sampled trajectory counts vs exact probabilities (alpha = 1e-5)."""
    from scipy import stats

    logps = random_policy(problem, 8, scale=0.7)
    n = 60_000
    traj = sampler_for(problem, 2).trajectories(logps, n)
    table = problem.trajectory_table()
    G, m, H = table.states.shape
    keys_all = _trajectory_keys(problem, table.states.reshape(G * m, H), table.actions.reshape(G * m, H))
    expected = (exact.trajectory_probs(problem, logps)[0] * problem.init_prob[:, None]).reshape(-1)
    keep = expected > 0
    lookup = {int(k): i for i, k in enumerate(keys_all[keep])}
    observed = torch.zeros(int(keep.sum()), dtype=torch.float64)
    for k in _trajectory_keys(problem, traj.states[0], traj.actions[0]).tolist():
        observed[lookup[k]] += 1
    exp_counts = n * expected[keep]
    assert math.isclose(float(observed.sum()), n)
    chi2 = float(((observed - exp_counts) ** 2 / exp_counts).sum())
    p_value = stats.chi2.sf(chi2, df=int(keep.sum()) - 1)
    assert p_value > 1e-5, f"chi2={chi2:.1f}, p={p_value:.2e}"


def _trajectory_keys(problem, states, actions):
    key = torch.zeros(states.shape[0], dtype=torch.long)
    for h, step in enumerate(problem.steps):
        key = (key * step.n_states + states[:, h]) * problem.n_actions + actions[:, h]
    return key


@pytest.mark.parametrize("label_noise", [0.0, 0.2])
def test_bradley_terry_oracle_frequencies(label_noise):
    """Per (context, a, a') cell: label frequency vs eta + (1-2 eta) sigma(dR*); Pearson
    chi-square over all cells with a 1e-5 false-alarm rate."""
    from scipy import stats

    problem = envs.make(bandit.BanditConfig(n_contexts=3, n_actions=3, feature_dim=3, label_noise=label_noise,
                                            reward_scale=2.0))
    n = 600_000  # power: a 5% error in the BT slope is rejected (checked by mutating the oracle)
    pairs = sampler_for(problem, 3).pairs(problem.ref_log_probs(), n)
    x, a, b = pairs.first.states[0, :, 0], pairs.first.actions[0, :, 0], pairs.second.actions[0, :, 0]
    r = problem.true_unit_reward.reshape(3, 3)
    p = label_noise + (1 - 2 * label_noise) * torch.sigmoid(r[x, a] - r[x, b])
    cell = (x * 3 + a) * 3 + b
    y = pairs.label[0]
    chi2, df = 0.0, 0
    for c in cell.unique():
        mask = cell == c
        n_c, p_c = int(mask.sum()), float(p[mask][0])
        chi2 += (float(y[mask].sum()) - n_c * p_c) ** 2 / (n_c * p_c * (1 - p_c))
        df += 1
    assert df == 27  # every (x, a, a') cell was drawn
    assert stats.chi2.sf(chi2, df) > 1e-5, f"chi2={chi2:.1f} on {df} cells"


def test_upper_loss_matches_monte_carlo(problem):
    """Exact f(nu, theta) vs the mean BT loss on sampled, labelled pairs from the policy."""
    rewards = problem.step_tables_from_units(random_unit_rewards(problem, 9))
    logps = random_policy(problem, 10)
    n = 100_000
    pairs = sampler_for(problem, 4).pairs(logps, n)
    margin = pairs.first.returns(rewards) - pairs.second.returns(rewards)
    loss = exact.bradley_terry_nll(margin, pairs.label)[0]
    f = float(exact.upper_loss(problem, rewards, logps))
    z = (float(loss.mean()) - f) / (float(loss.std()) / n**0.5)
    assert abs(z) < Z_CRIT, f"f exact {f:.5f}, MC {float(loss.mean()):.5f}, z={z:.2f}"


def test_sampler_counts_samples_and_queries(problem):
    counters = Counters()
    sampler = CountingSampler(problem, [0, 1], counters)
    sampler.trajectories(problem.ref_log_probs(), 5)
    sampler.pairs(problem.ref_log_probs(), 7)
    assert (counters.samples, counters.queries) == (5 + 14, 7)


@pytest.mark.parametrize("with_grad", [False, True])
def test_trajectory_gather_equals_a_loop_over_the_trajectories(problem, with_grad):
    """TrajectoryTable.gather (indices built with the table; a step read in order is not indexed) against the sum
    over steps of each trajectory's table entries, read one trajectory at a time: bit for bit, and never a view of
    the tables (a caller may write into it). The bandit's in-order path is taken, and the mdp's and token task's
    first step indexes (so both paths are compared here)."""
    gen = torch.Generator().manual_seed(3)
    tables = [torch.randn(5, s.n_states, problem.n_actions, generator=gen, dtype=torch.float64)
              .requires_grad_(with_grad) for s in problem.steps]
    table = problem.trajectory_table()
    G, m, H = table.states.shape
    expected = torch.empty(5, G, m, dtype=torch.float64)
    with torch.no_grad():
        for g in range(G):
            for i in range(m):
                value = tables[0][:, table.states[g, i, 0], table.actions[g, i, 0]]
                for h in range(1, H):
                    value = value + tables[h][:, table.states[g, i, h], table.actions[g, i, h]]
                expected[:, g, i] = value
    got = table.gather(tables)
    assert torch.equal(got.detach(), expected) and got.requires_grad == with_grad
    assert all(got.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in tables)
    in_order = [index is None for index in table.step_index]
    assert all(in_order) == (problem.horizon == 1)  # a bandit's one step; a longer task's first step is not
    if with_grad:  # the gradient of a sum of reads: each entry's count of trajectories through it
        table.gather(tables).sum().backward()
        for h in range(H):
            flat = (table.states[..., h] * problem.n_actions + table.actions[..., h]).reshape(-1)
            visits = torch.bincount(flat, minlength=tables[h][0].numel()).to(torch.float64)
            assert torch.equal(tables[h].grad, visits.reshape(tables[h].shape[1:]).expand_as(tables[h]))
