"""How far an eager-mode fast path can go (issue 12's >= 10x / >= 5x targets): the network passes of a bilevel
step, timed alone in the same run as the implementations. This is why impl=fast's bilevel step is compiled C
(algorithms/bilevel_step.c): the eager step (impl=eager) cannot pass this ceiling, and the compiled one is timed
beside it here.

Each impl runs the policy (z and y stacked) forward and backward once per z/y step on its whole (S, A) table
(sampling needs pi at the visited states, the log-softmax's gradient touches every action of a state). The
reference runs the reward network on its whole unit table; the fast step does too, unless its stages visit
fewer steps than there are units (Bilevel.reward_on_visited_units: N = M = 2 on the bandit, 8 trajectories
per stage of 48 units), where it runs one forward per stage on the visited units and one backward on the nu
step's. `reward_pass` below times whichever the fast step makes. So

    ceiling = reference step time / time of the fast step's network passes alone

bounds the steps/s ratio of any implementation that makes those passes with torch's eager kernels, whatever it
does with the rest of the step (sampling, RNG, weights, scatters: all of it free). The policy pass alone bounds
any reward pass:

    ceiling without the reward pass = reference step time / time of the policy pass alone

Run serially:  OMP_NUM_THREADS=1 .venv/bin/pytest bench/test_bench_floor.py -p no:xdist --benchmark-enable -s -q
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from conftest import interleaved, record_ratio
from test_bench_fast import CONFIGS, _CountOps, build


BILEVEL = [c for c in CONFIGS if c.startswith("bilevel-")]


def policy_pass(algo, state):
    """One forward and one backward of the policy (z and y stacked) as the fast step makes them, on a gradient
    of the right shape (its values do not change the cost)."""
    zy = algo._stacked_policies(state)[0]  # the step's own stacked z and y (cached by the last step: no copy)
    logp, acts = algo.policy.table(zy)
    algo.policy.backward(zy, acts, logp, torch.ones_like(logp))


def reward_pass(algo, state):
    """The reward network's passes as the fast step makes them: a forward and a backward on the whole unit table,
    or (on the visited units) a forward per stage on its (2N + 2M) H steps and a backward on the nu step's, at
    units drawn here (where they are does not change the cost)."""
    n_traj, n_pairs, inner = algo.set_schedule(state)
    if not algo.reward_on_visited_units(n_traj, n_pairs, inner):
        units, reward_acts = algo.reward.units(state.nu)
        algo.reward.backward(state.nu, reward_acts, torch.ones_like(units))
        return
    B, shape = state.nu[0].shape[0], (2 * n_traj + 2 * n_pairs, algo.problem.horizon)
    n_units = algo.problem.unit_features.shape[-2]
    for _ in range(inner + 1):
        _, acts = algo.reward.visited_units(state.nu, torch.randint(0, n_units, (B, *shape)))
    algo.reward.backward(state.nu, acts, torch.ones(B, shape[0] * shape[1], dtype=torch.float64))


def trivial_op_seconds() -> float:
    """Dispatcher + Python cost of one eager op on a tiny tensor (what an op costs before any arithmetic)."""
    x = torch.zeros(16, dtype=torch.float64)
    n, tic = 20_000, time.process_time()
    for _ in range(n):
        x.add(1.0)
    return (time.process_time() - tic) / n


def warmed_up(compose_config, overrides, impl, steps: int = 4) -> list:
    """[algorithm, sampler, state] after a few steps (layouts, draw plans and the policy cache built)."""
    algo, sampler, v = build(compose_config, overrides, impl)
    state = algo.init(v.seeds)
    for _ in range(steps):
        state = algo.step(state, sampler)
    return [algo, sampler, state]


@pytest.mark.parametrize("config", BILEVEL)
def test_eager_ceiling_of_the_bilevel_step(benchmark, compose_config, config):
    overrides, target, _ = CONFIGS[config]
    runs = {impl: warmed_up(compose_config, overrides, impl) for impl in ("reference", "eager", "fast")}
    assert runs["fast"][0].step_path() == "compiled"
    work = {"reference": lambda r=runs["reference"]: r.__setitem__(2, r[0].step(r[2], r[1])),
            "eager": lambda r=runs["eager"]: r.__setitem__(2, r[0].step(r[2], r[1])),
            "compiled": lambda r=runs["fast"]: r.__setitem__(2, r[0].step(r[2], r[1])),
            "policy": lambda r=runs["eager"]: policy_pass(r[0], r[2]),
            "reward": lambda r=runs["eager"]: reward_pass(r[0], r[2])}
    tic = time.process_time()
    work["reference"]()
    per_round = max(3, min(200, int(0.3 / max(time.process_time() - tic, 1e-6))))
    times = {name: [] for name in work}
    for name, f in interleaved(work):  # all of them see the same load
        tic = time.process_time()
        for _ in range(per_round):
            f()
        times[name].append((time.process_time() - tic) / per_round)
    t = {name: statistics.median(x) for name, x in times.items()}
    t["passes"] = t["policy"] + t["reward"]
    benchmark.pedantic(work["policy"], rounds=3, iterations=1)
    op = trivial_op_seconds()
    ops = {}
    for name in ("eager", "policy", "reward"):
        with _CountOps() as counter:
            work[name]()
        ops[name] = counter.n
    rest = ops["eager"] - ops["policy"] - ops["reward"]  # the eager step's other dispatched ops: sampling, RNG, weights, scatters
    ceiling = record_ratio(
        benchmark, f"eager_ceiling[{config}]", t["reference"] / t["passes"],
        f"reference {t['reference'] * 1e3:.2f} ms/step, eager {t['eager'] * 1e3:.2f}, the network passes alone "
        f"{t['passes'] * 1e3:.2f} ms ({t['passes'] / t['eager']:.0%} of the eager step; the reward pass "
        f"{t['reward'] * 1e3:.2f} ms of it); measured eager / reference "
        f"{t['reference'] / t['eager']:.2f}x, compiled (impl=fast) / reference {t['reference'] / t['compiled']:.2f}x"
        + (f"; issue target {target:g}x" if target else ""))
    record_ratio(benchmark, f"eager_ceiling_at_this_op_count[{config}]",
                 t["reference"] / (t["passes"] + rest * op),
                 f"the passes plus the fast step's {rest} other dispatched ops at {op * 1e6:.1f} us each (one trivial "
                 f"eager op: dispatch and Python, no arithmetic)")
    record_ratio(benchmark, f"eager_ceiling_without_the_reward_pass[{config}]", t["reference"] / t["policy"],
                 f"the policy pass alone {t['policy'] * 1e3:.2f} ms: the bound whatever the reward pass costs")
    assert t["passes"] < t["eager"]  # the passes are part of the eager step: a ceiling above what is measured
    assert ceiling > t["reference"] / t["eager"]
