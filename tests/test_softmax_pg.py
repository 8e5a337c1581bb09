"""softmax_pg against computations written here, apart from the package: the exact step is eta times the
gradient of J (central finite differences of an independent numpy evaluation of the KL-regularised value),
and the stochastic step is an unbiased estimate of that gradient (a z-test over seeds)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from ratebench import envs
from ratebench.algorithms.softmax_pg import SoftmaxPG, smoothness
from ratebench.config import validate
from ratebench.envs.sampling import Counters, CountingSampler
from ratebench.runner import _mark_diverged, run_job

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


@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("env", ["bandit", "mdp"])
def test_exact_step_is_eta_times_the_finite_difference_gradient(compose_config, env, impl):
    """Both exact steps: autograd through the exact value (reference) and the closed-form gradient (fast)."""
    algo, problem, _ = build(compose_config, env, "algorithm.oracle=exact", "algorithm.init_scale=1.0",
                             "seeds=[3,11]", "budget.steps=10")
    algo.impl = impl
    assert algo.step_path() == ("reference" if impl == "reference" else "eager")
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
    algo.impl = "reference"  # the autograd step; the closed-form one is held to it below
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


# --- oracle=exact's fast path: the closed-form step (eager_step) and segments of it (run_segment) -----------------
EXACT = ["algorithm.oracle=exact", "algorithm.init_scale=1.0", "budget.steps=10"]


def fresh(compose_config, env, seeds, *extra):
    algo, problem, _ = build(compose_config, env, *EXACT, f"seeds={seeds}", *extra)
    return algo, CountingSampler(problem, seeds, Counters()), torch.ones(len(seeds), dtype=torch.bool)


def per_step(algo, state, sampler, alive, n):
    """n steps one call at a time, each followed by the harness's check: (state, {row: step it diverged at})."""
    died = {}
    for _ in range(n):
        state = algo.step(state, sampler)
        for row in _mark_diverged(algo, state, alive):
            died[row] = state.t
    return state, died


def segments(algo, state, sampler, alive, lengths):
    """Segments of these lengths, alive updated as the harness does: (state, {row: step it diverged at})."""
    died = {}
    for n in lengths:
        if not alive.any():  # the harness stops calling
            break
        t = state.t
        state, steps, at = algo.run_segment(state, sampler, n, alive)
        assert steps == n or not (alive & (at == 0)).any()
        for row in ((at > 0) & alive).nonzero().flatten().tolist():
            died[row] = t + int(at[row])
        alive &= at == 0
    return state, died


@pytest.mark.parametrize("env", ["bandit", "mdp"])
def test_the_closed_form_step_follows_the_autograd_step_for_2000_steps(compose_config, env):
    """The fast step (closed-form policy gradient) against the reference (autograd through envs.exact) at every one
    of 2,000 steps, decaying step size: to 1e-12, not bit for bit, because the two sum the same terms in another
    order (the gradient's chain rule vs its closed form), a difference of round-off only."""
    seeds = [3, 11, 5]
    ref, sampler, _ = fresh(compose_config, env, seeds, "algorithm.lr_exponent=0.3")
    fast, _, _ = fresh(compose_config, env, seeds, "algorithm.lr_exponent=0.3")
    ref.impl, fast.impl = "reference", "fast"
    a, b = ref.init(seeds), fast.init(seeds)
    start = [t.clone() for t in a.theta]
    for k in range(2000):
        a, b = ref.step(a, sampler), fast.step(b, sampler)
        assert a.t == b.t and a.lr == b.lr
        for x, y in zip(a.theta, b.theta):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-12, msg=f"{env} step {k + 1}")
    assert max(float((x - y).abs().max()) for x, y in zip(a.theta, start)) > 0.1  # the logits did move


@pytest.mark.parametrize("env", ["bandit", "mdp"])
def test_segments_are_the_per_step_run_bit_for_bit_through_a_checkpoint(compose_config, env, tmp_path):
    """2,000 steps in segments of random lengths, with the state saved to disk and loaded into a fresh algorithm in
    the middle of what would have been one segment, equal 2,000 single steps (the same closed-form step, each
    followed by the harness's non-finite check) bit for bit."""
    seeds = [0, 4, 9]
    one, sampler, alive = fresh(compose_config, env, seeds)
    assert one.segment_samples(one.init(seeds)) == 0  # impl=fast, oracle=exact: segments, no samples per step
    want, _ = per_step(one, one.init(seeds), sampler, alive, 2000)
    rng = np.random.default_rng(5)
    lengths = rng.integers(1, 300, size=40).tolist()
    lengths = lengths[:next(i for i in range(len(lengths)) if sum(lengths[:i + 1]) >= 2000)]
    lengths.append(2000 - sum(lengths))
    cut = len(lengths) // 2
    seg, sampler, alive = fresh(compose_config, env, seeds)
    state, died = segments(seg, seg.init(seeds), sampler, alive, lengths[:cut] + [lengths[cut] // 2])
    torch.save(seg.state_dict(state), tmp_path / "state.pt")
    seg, sampler, _ = fresh(compose_config, env, seeds)
    state = seg.load_state_dict(seg.init(seeds), torch.load(tmp_path / "state.pt", weights_only=True))
    state, _ = segments(seg, state, sampler, alive, [lengths[cut] - lengths[cut] // 2] + lengths[cut + 1:])
    assert not died and state.t == want.t == 2000 and state.lr == want.lr
    for x, y in zip(state.theta, want.theta):
        assert torch.equal(x, y)


def test_a_non_finite_seed_is_marked_and_zeroed_at_its_step_as_the_per_step_loop_does(compose_config):
    """The exact step keeps finite logits finite (the gradient is bounded), so non-finite values are put in: NaN in
    seed row 2 at the start, +inf in row 5 after step 4, -inf in every other row after step 30. The segments mark
    each at the step the per-step loop does (1, 5, 31), zero it, and stop at step 31 where the last one died."""
    seeds = list(range(8))
    out = []
    for mode in ("per_step", "segment"):
        algo, sampler, alive = fresh(compose_config, "bandit", seeds)
        run = (lambda st, n: per_step(algo, st, sampler, alive, n)) if mode == "per_step" else \
            (lambda st, n: segments(algo, st, sampler, alive, [n // 3, n - n // 3]))
        state = algo.init(seeds)
        state.theta[0][2, 0, 0] = float("nan")
        state, died = run(state, 4)
        state.theta[0][5, 1, 2] = float("inf")
        state, more = run(state, 26)
        died.update(more)
        for row in (0, 1, 3, 4, 6, 7):
            state.theta[0][row, 0, 1] = float("-inf")
        state, more = run(state, 20)
        died.update(more)
        out.append((state, died))
    (a, a_died), (b, b_died) = out
    assert a_died == b_died == {2: 1, 5: 5, **{row: 31 for row in (0, 1, 3, 4, 6, 7)}}
    assert b.t == 31 and a.t == 50  # the segment stops where the last seed died; the per-step loop ran on
    last = [0, 1, 3, 4, 6, 7]  # zeroed at step 31, where the segment stopped (rows 2 and 5 stepped on from zero)
    for x in b.theta:
        assert torch.equal(x[last], torch.zeros_like(x[last])) and torch.isfinite(x).all()


def test_a_job_in_segments_writes_the_per_step_jobs_records(compose_config, tmp_path, monkeypatch):
    """The harness on the step clock: impl=fast (segments to each evaluation point) writes the metrics the one-step-
    per-call loop does, exactly."""
    job = compose_config(["algorithm=softmax_pg", *TINY["bandit"], *EXACT[:2], "budget.steps=3000", "seeds=[0,1]",
                          "progress=false", "checkpoint_every_s=0"])
    seg = run_job(job, tmp_path / "segments")
    monkeypatch.setattr(SoftmaxPG, "segment_samples", lambda self, state: None)
    one = run_job(job, tmp_path / "per_step")
    a = pd.read_parquet(tmp_path / "segments" / "metrics.parquet").drop(columns="wall_s")
    b = pd.read_parquet(tmp_path / "per_step" / "metrics.parquet").drop(columns="wall_s")
    assert len(a) > 10
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert seg["counters"] == one["counters"] and seg["counters"]["samples"] == 0
