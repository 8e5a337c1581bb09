"""Benchmarks of impl=fast against impl=reference (issue 12), side by side in one run, as ratios:
steps/s of one outer step at 16 and 256 seeds, the first (warm-up) step and the break-even run
length, aten calls per step, and the CI smoke job end to end.

Run serially:  OMP_NUM_THREADS=1 .venv/bin/pytest bench/test_bench_fast.py -p no:xdist --benchmark-enable -s -q
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
from conftest import interleaved, record_ratio
from torch.utils._python_dispatch import TorchDispatchMode

from ratebench import envs
from ratebench.algorithms import ALGORITHMS
from ratebench.config import validate
from ratebench.runner import run_job
from ratebench.envs.sampling import Counters, CountingSampler

SMALL = ["algorithm.batch_traj=2", "algorithm.batch_pairs=2"]  # the theorem's regime: N = M = 2
CONFIGS = {  # id: (overrides, issue target for reference / fast, regression floor asserted here)
    # bilevel: impl=fast is the compiled step (bilevel_step.c); impl=eager is timed beside it
    "bilevel-16-default": (["algorithm=bilevel", "n_seeds=16"], 10.0, 8.0),
    "bilevel-16-N=M=2": (["algorithm=bilevel", "n_seeds=16", *SMALL], 10.0, 8.0),
    "bilevel-256-default": (["algorithm=bilevel", "n_seeds=256"], 5.0, 2.5),
    "bilevel-256-N=M=2": (["algorithm=bilevel", "n_seeds=256", *SMALL], 5.0, 3.0),
    "bilevel_double_loop-16": (["algorithm=bilevel_double_loop", "n_seeds=16"], None, 4.0),
    "bilevel-smoke-8-N=256-M=64": (["algorithm=bilevel", "n_seeds=8", "algorithm.batch_traj=256",
                                    "algorithm.batch_pairs=64", "algorithm.c_xi=8"], None, 2.0),
    "reward_mle-16": (["algorithm=reward_mle", "n_seeds=16"], None, 1.5),
    "dpo_online-16": (["algorithm=dpo", "algorithm.mode=online", "n_seeds=16"], None, 1.5),
    "ppo_rlhf_online-16": (["algorithm=ppo_rlhf", "algorithm.mode=online", "n_seeds=16"], None, 1.5),
    "ppo_rlhf_online-token-16": (["algorithm=ppo_rlhf", "algorithm.mode=online", "env=token", "n_seeds=16"], None, 1.5),
}


def build(compose_config, overrides, impl):
    v = validate(compose_config(overrides))
    problem = envs.make(v.env)
    algo = ALGORITHMS[v.algorithm.name](v.algorithm, v.model, problem)
    algo.impl = impl
    return algo, CountingSampler(problem, v.seeds, Counters()), v


class _CountOps(TorchDispatchMode):
    """aten calls dispatched (views included, nested calls of composite ops counted once each)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def profiler_aten_calls(algo, state, sampler) -> int:
    """aten calls of one step as torch.profiler counts them (the issue's measure: nested calls included)."""
    from torch.profiler import profile

    with profile() as prof:
        algo.step(state, sampler)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


@pytest.mark.parametrize("config", list(CONFIGS))
def test_fast_vs_reference_steps_per_second(benchmark, compose_config, config):
    overrides, target, floor = CONFIGS[config]
    runs = {}
    for impl in ("reference", "fast", "eager") if config.startswith("bilevel") else ("reference", "fast"):
        algo, sampler, v = build(compose_config, overrides, impl)
        state = algo.init(v.seeds)
        tic = time.perf_counter()
        state = algo.step(state, sampler)  # the first step: lazy layouts, draw plans, caches
        first = time.perf_counter() - tic
        for _ in range(3):
            state = algo.step(state, sampler)
        runs[impl] = [algo, sampler, state, first]
    probe = time.perf_counter()
    runs["reference"][2] = runs["reference"][0].step(runs["reference"][2], runs["reference"][1])
    per_round = max(3, min(200, int(0.3 / max(time.perf_counter() - probe, 1e-6))))
    times = {impl: [] for impl in runs}
    for impl, run in interleaved(runs):  # both see the same machine load
        algo, sampler, state, _ = run
        tic = time.process_time()
        for _ in range(per_round):
            state = algo.step(state, sampler)
        times[impl].append((time.process_time() - tic) / per_round)
        run[2] = state
    t = {impl: statistics.median(v) for impl, v in times.items()}
    algo, sampler, state, _ = runs["fast"]
    benchmark.pedantic(lambda: algo.step(state, sampler), rounds=3, iterations=1)
    ops = {}
    for impl, (algo, sampler, state, _) in runs.items():
        with _CountOps() as counter:
            algo.step(state, sampler)
        ops[impl] = (counter.n, profiler_aten_calls(algo, state, sampler))
    ratio = t["reference"] / t["fast"]
    path = runs["fast"][0].step_path()
    note = (f"reference {t['reference'] * 1e3:.2f} ms/step, fast ({path}) {t['fast'] * 1e3:.2f} ms/step (CPU time)"
            + (f"; issue target >= {target:g}" if target else ""))
    record_ratio(benchmark, f"fast_speedup[{config}]", ratio, note)
    if "eager" in t:
        assert path == "compiled"
        record_ratio(benchmark, f"compiled_over_eager[{config}]", t["eager"] / t["fast"],
                     f"eager {t['eager'] * 1e3:.2f} ms/step ({t['reference'] / t['eager']:.2f}x the reference)")
    record_ratio(benchmark, f"aten_calls_reference_over_fast[{config}]", ops["reference"][1] / ops["fast"][1],
                 f"torch.profiler aten calls per step: reference {ops['reference'][1]}, fast {ops['fast'][1]}; "
                 f"dispatched: {ops['reference'][0]} vs {ops['fast'][0]}")
    extra = runs["fast"][3] - t["fast"]  # the fast path's one-off cost: the first step minus a steady one
    record_ratio(benchmark, f"fast_first_step_ms[{config}]", runs["fast"][3] * 1e3,
                 f"warm-up = the first fast step ({'the C build, if not cached, and ' if path == 'compiled' else ''}"
                 f"layouts); reference's first step "
                 f"{runs['reference'][3] * 1e3:.1f} ms; break-even after "
                 f"{max(0.0, extra - (runs['reference'][3] - t['reference'])) / (t['reference'] - t['fast']):.2f} steps")
    assert ratio >= floor


@pytest.mark.parametrize("n_seeds,floor", [(16, 0.85), (256, 1.1)])
def test_reward_on_visited_units_vs_whole_table(benchmark, compose_config, n_seeds, floor):
    """The fast bilevel step at N = M = 2 with its MLP reward on the units its stages visit (what it chooses
    there) against the same step with the reward on the whole unit table, interleaved in one run. At 256 seeds
    the reward's arithmetic is what it saves (1.44x measured); at 16 seeds the passes were never the cost
    and the two are within this machine's noise (1.05x; 0.96-1.07x for a first version), so the floor there only catches a slowdown."""
    overrides = ["algorithm=bilevel", f"n_seeds={n_seeds}", *SMALL]
    runs = {}
    for reward_pass in ("table", "visited"):  # a choice of the eager step (the compiled one computes lazily)
        algo, sampler, v = build(compose_config, overrides, "eager")
        algo.reward_pass = reward_pass
        state = algo.init(v.seeds)
        for _ in range(4):
            state = algo.step(state, sampler)
        runs[reward_pass] = [algo, sampler, state]
    assert runs["visited"][0].reward_on_visited_units(*runs["visited"][0].set_schedule(runs["visited"][2]))
    per_round = 60 if n_seeds == 16 else 20
    times = {name: [] for name in runs}
    for name, run in interleaved(runs):
        tic = time.process_time()
        for _ in range(per_round):
            run[2] = run[0].step(run[2], run[1])
        times[name].append((time.process_time() - tic) / per_round)
    t = {name: statistics.median(v) for name, v in times.items()}
    benchmark.pedantic(lambda: None, rounds=1)
    record_ratio(benchmark, f"reward_on_visited_units_speedup[{n_seeds}-N=M=2]", t["table"] / t["visited"],
                 f"fast step with the reward on the whole table {t['table'] * 1e3:.2f} ms, on the visited units "
                 f"{t['visited'] * 1e3:.2f} ms (CPU time)")
    assert t["table"] / t["visited"] >= floor


def test_ci_smoke_job_fast_vs_reference(benchmark, compose_config, tmp_path):
    """One smoke_bilevel job (instance 1, 8 seeds, N = 256, M = 64) at a tenth of its budget, whole run_job
    (set-up, steps, evaluations, records): what CI pays per job, fast vs reference."""
    common = ["experiment=smoke_bilevel", "env.instance_seed=1", "budget.samples=300000", "progress=false"]
    run_job(compose_config(common + ["budget.samples=3000"]), tmp_path / "warm")  # F-hat* cached
    walls, records = {}, {}
    for impl in ("reference", "fast", "reference", "fast"):
        tic = time.perf_counter()
        records[impl] = run_job(compose_config(common + [f"impl={impl}", "overwrite=true"]), tmp_path / impl)
        walls.setdefault(impl, []).append(time.perf_counter() - tic)
        (tmp_path / impl / "run.json").unlink()  # impl is operational: the next run would be skipped
    benchmark.pedantic(lambda: None, rounds=1)
    wall = {impl: min(v) for impl, v in walls.items()}
    steps = {impl: r["wall_s"] for impl, r in records.items()}
    record_ratio(benchmark, "ci_smoke_job_wall_reference_over_fast", wall["reference"] / wall["fast"],
                 f"run_job wall: reference {wall['reference']:.1f} s, fast {wall['fast']:.1f} s "
                 f"(steps only: {steps['reference']:.1f} s vs {steps['fast']:.1f} s; "
                 f"evaluation {records['fast']['eval_wall_s']:.1f} s, the same for both)")
    assert wall["fast"] < wall["reference"]


def test_seed_alone_equals_seed_in_a_256_batch(compose_config):
    """Per-seed streams at benchmark size: seed 200 of a 256-seed fast batch == seed 200 run alone."""
    got = {}
    for seeds in ("n_seeds=256", "seeds=[200]"):
        algo, sampler, v = build(compose_config, ["algorithm=bilevel", seeds], "fast")
        state = algo.init(v.seeds)
        for _ in range(20):
            state = algo.step(state, sampler)
        i = v.seeds.index(200)
        got[seeds] = {k: t[i] for k, t in algo.tensors(state).items()}
    for key, t in got["seeds=[200]"].items():
        torch.testing.assert_close(got["n_seeds=256"][key], t, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("algorithm,env", [("dpo", "bandit"), ("dpo", "token"), ("ppo_rlhf", "token")])
def test_offline_refit_fast_vs_reference(benchmark, compose_config, algorithm, env):
    """Offline DPO's step is a refit, and so is most of offline PPO-RLHF's (its reward model): 300 minibatch SGD
    steps on a fixed prefix of 512 pi_ref pairs, 16 seeds, timed from the same parameters, dataset and RNG
    position (fit_on_dataset vs DPO._fast_fit / PPORLHF._fast_rm_fit)."""
    import copy

    from ratebench.algorithms.policy_opt import PairDataset, fit_on_dataset

    algo, sampler, v = build(compose_config, [f"env={env}", f"algorithm={algorithm}", "n_seeds=16"], "fast")
    state = algo.init(v.seeds)
    data = PairDataset()
    data.extend(sampler.pairs(algo.ref, 512))
    if algorithm == "dpo":
        fits = {"reference": lambda rng: fit_on_dataset(state.theta, algo.pair_loss, data, 32, 300, 1.0, rng),
                "fast": lambda rng: algo._fast_fit(state.theta, data, 300, rng)}
    else:
        fits = {"reference": lambda rng: fit_on_dataset(state.nu, algo.rm_loss, data, 32, 300, 1.0, rng),
                "fast": lambda rng: algo._fast_rm_fit(state.nu, data, 300, rng)}
    times = {impl: [] for impl in fits}
    for impl, fit in interleaved(fits, rounds=5):
        rng = copy.deepcopy(state.rng)
        tic = time.process_time()
        fit(rng)
        times[impl].append(time.process_time() - tic)
    t = {impl: statistics.median(x) for impl, x in times.items()}
    benchmark.pedantic(lambda: fits["fast"](copy.deepcopy(state.rng)), rounds=2, iterations=1)
    ratio = record_ratio(benchmark, f"fast_speedup[{algorithm}_offline_refit-{env}-16]", t["reference"] / t["fast"],
                         f"300 SGD steps on 512 pairs: reference {t['reference'] * 1e3:.0f} ms, fast {t['fast'] * 1e3:.0f} ms")
    assert ratio >= 1.5


def test_offline_ppo_rlhf_run_fast_vs_reference(benchmark, compose_config):
    """A whole offline PPO-RLHF run's steps (token task, 16 seeds, to 2.5e4 samples, no evaluation): the reward-
    model refits and the PPO iterations between them, from the same initial state, interleaved rounds."""
    def run(impl):
        algo, sampler, v = build(compose_config, ["env=token", "algorithm=ppo_rlhf", "n_seeds=16"], impl)
        state = algo.init(v.seeds)
        tic = time.process_time()
        while sampler.samples < 25_000:
            state = algo.step(state, sampler)
        return time.process_time() - tic, algo.tensors(state)

    times = {"reference": [], "fast": []}
    for _ in range(2):
        for impl in times:
            seconds, tensors = run(impl)
            times[impl].append(seconds)
            if impl == "reference":
                want = tensors
            else:  # the reward model (fit on pi_ref pairs only) is the same run's to round-off; the policy is not:
                # PPO here amplifies a 1e-15 perturbation of theta to 1e-1 within 15 steps in the reference itself
                # (docs/fast.md), so a free-running policy cannot be compared (tests/test_fast.py is the exact check)
                assert all(torch.allclose(tensors[k], t, rtol=0, atol=1e-12) for k, t in want.items() if k.startswith("nu"))
    benchmark.pedantic(lambda: None, rounds=1)
    t = {impl: min(x) for impl, x in times.items()}
    ratio = record_ratio(benchmark, "fast_speedup[ppo_rlhf_offline_run-token-16-to-2.5e4]", t["reference"] / t["fast"],
                         f"CPU time of the steps: reference {t['reference']:.1f} s, fast {t['fast']:.1f} s")
    assert ratio >= 1.5


def test_compiled_step_build_seconds(benchmark, monkeypatch, tmp_path):
    """impl=fast's one-off cost for the bilevel step: building bilevel_step.c with the machine's C compiler into an
    empty cache (issue 12: warm-up <= 30 s per configuration), then loading it from the cache, as every later job
    on this machine does. One build serves every configuration: sizes are arguments, not compiled in."""
    from ratebench.core import kernels
    from ratebench.algorithms.bilevel_kernel import SOURCE

    monkeypatch.setenv("RATEBENCH_CACHE", str(tmp_path))
    tic = time.perf_counter()
    assert kernels.load.__wrapped__(SOURCE) is not None
    build_s = time.perf_counter() - tic
    tic = time.perf_counter()
    assert kernels.load.__wrapped__(SOURCE) is not None
    cached_s = time.perf_counter() - tic
    assert kernels.BUILD_SECONDS["bilevel_step.c"] == 0.0  # the second load built nothing
    benchmark.pedantic(lambda: None, rounds=1)
    record_ratio(benchmark, "compiled_build_s[bilevel_step.c]", build_s,
                 f"wall seconds to build into an empty cache (issue target <= 30 s); from the cache {cached_s * 1e3:.1f} ms")
    assert build_s <= 30.0


def _uniform_one_call_each(self, *shape):
    """CounterRng.uniform before the lookahead (the baseline of the bench below, kept as it was): from an explicit
    prefetch where one covers the request, else one _draw call of its own."""
    n = 1
    for s in shape:
        n *= s
    ahead, offset = self._ahead, self.counter - self._ahead_start
    if ahead is not None and 0 <= offset and offset + n <= ahead.shape[1]:
        u = ahead[:, offset:offset + n]
    else:
        u = self._draw(self.counter, n)
    self.counter += n
    return u.reshape(len(self.keys), *shape)


@pytest.mark.parametrize("config", ["reward_mle-16", "dpo_online-16", "ppo_rlhf_online-16"])
def test_eager_steps_with_uniforms_drawn_ahead(benchmark, compose_config, config, monkeypatch):
    """impl=fast's eager steps (no compiled step) with CounterRng.uniform serving its draws from a block computed
    ahead (core/rng.py LOOKAHEAD) against the uniform() before it (each call not covered by an explicit prefetch
    draws its own): steps/s, one run, arms interleaved. The same numbers either way (tests/test_fast.py); both arms
    have the harness-free step only (the non-finite check is not in Algorithm.step)."""
    from ratebench.core import rng

    drawn_ahead = rng.CounterRng.uniform
    runs = {}
    for arm in ("one_call_each", "drawn_ahead"):
        algo, sampler, v = build(compose_config, CONFIGS[config][0], "fast")
        runs[arm] = [algo, sampler, algo.init(v.seeds)]
    times = {arm: [] for arm in runs}
    for arm, run in interleaved(runs):
        monkeypatch.setattr(rng.CounterRng, "uniform", _uniform_one_call_each if arm == "one_call_each" else drawn_ahead)
        algo, sampler, state = run
        tic = time.perf_counter()
        for _ in range(100):
            state = algo.step(state, sampler)
        times[arm].append((time.perf_counter() - tic) / 100)
        run[2] = state
    benchmark.pedantic(lambda: None, rounds=1)
    t = {arm: statistics.median(x) for arm, x in times.items()}
    ratio = record_ratio(benchmark, f"drawn_ahead_speedup[{config}]", t["one_call_each"] / t["drawn_ahead"],
                         f"eager step {t['one_call_each'] * 1e6:.0f} -> {t['drawn_ahead'] * 1e6:.0f} us (median of 7 "
                         f"rounds of 100 steps)")
    assert ratio >= 0.95  # never slower beyond this machine's noise
