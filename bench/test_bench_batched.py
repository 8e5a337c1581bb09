"""Benchmarks of batched seeds (issue #6): (a) one outer step with 32 batched seeds vs 32 single-seed
steps, (b) a 32-seed bandit run vs 32 sequential runs, (c) one exact evaluation vs one outer step and
the evaluation share of a run (also (g): bilevel), (d) steps/s against a roofline, cost per sample and
memory vs size."""
from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time

import pytest
import torch
from conftest import record_ratio

from ratebench import envs
from ratebench.algorithms import ALGORITHMS
from ratebench.config import validate
from ratebench.evaluation import Evaluator
from ratebench.fstar import f_star
from ratebench.config import plain
from ratebench.runner import run_job
from ratebench.envs.sampling import Counters, CountingSampler

B = 32
TARGET_BATCHED = 15.0  # per-seed throughput, batched / loop, at 32 seeds (acceptance floor)


def build(compose_config, name, seeds, extra=()):
    v = validate(compose_config([f"algorithm={name}", f"seeds={list(seeds)}", *extra]))
    problem = envs.make(v.env)
    return ALGORITHMS[name](v.algorithm, v.model, problem), problem, v


def fresh(algo, problem, seeds, state):
    """A copy of `state` and a new sampler with zeroed counters: every round steps from the same point."""
    return copy.deepcopy(state), CountingSampler(problem, list(seeds), Counters())


def median_time(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def step_timer(compose_config, name, seeds):
    """A zero-argument callable that takes one outer step from the (warmed-up) initial state."""
    algo, problem, v = build(compose_config, name, seeds)
    state = algo.init(v.seeds)
    algo.step(copy.deepcopy(state), CountingSampler(problem, v.seeds, Counters()))  # warm-up (lazy caches)

    def one_step():
        s, sampler = fresh(algo, problem, v.seeds, state)
        tic = time.perf_counter()
        algo.step(s, sampler)
        return time.perf_counter() - tic

    return one_step


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_outer_step_32_batched_vs_32_single(benchmark, compose_config, name):
    batched = step_timer(compose_config, name, range(B))
    singles = [step_timer(compose_config, name, [s]) for s in range(B)]
    probe = batched()
    rounds = max(1, min(20, int(2.0 / max(probe, 1e-6))))
    t_batched = statistics.median(batched() for _ in range(rounds))
    t_loop = statistics.median(sum(one() for one in singles) for _ in range(max(1, rounds // 4)))
    benchmark.pedantic(batched, rounds=1, iterations=1)
    ratio = record_ratio(benchmark, f"a_step_32_seeds[{name}]", t_loop / t_batched,
                         f"32 single-seed steps / one 32-seed step (target >= {TARGET_BATCHED:g}); "
                         f"batched {t_batched * 1e3:.2f} ms, loop {t_loop * 1e3:.1f} ms")
    assert ratio >= TARGET_BATCHED


def test_b_bandit_run_32_seeds_vs_32_sequential(benchmark, compose_config, tmp_path):
    common = ["env=bandit", "algorithm=reward_mle", "budget.samples=5000", "progress=false"]
    run_job(compose_config(common + ["seeds=[0]"]), tmp_path / "warm")  # F-hat* cached, imports done
    counter = iter(range(10_000))

    def batched_run():
        return run_job(compose_config(common + [f"n_seeds={B}"]), tmp_path / f"b{next(counter)}")

    def sequential_runs():
        for s in range(B):
            run_job(compose_config(common + [f"seeds=[{s}]"]), tmp_path / f"s{next(counter)}")

    t_batched = median_time(batched_run, 3)
    t_seq = median_time(sequential_runs, 1)
    record = benchmark.pedantic(batched_run, rounds=1, iterations=1)
    ratio = record_ratio(benchmark, "b_bandit_run_32_seeds", t_seq / t_batched,
                         f"32 sequential 1-seed runs / one 32-seed run, 5,000 samples (target >= {TARGET_BATCHED:g}); "
                         f"batched {t_batched:.2f} s, sequential {t_seq:.1f} s")
    share = record["eval_wall_s"] / (record["eval_wall_s"] + record["wall_s"])
    record_ratio(None, "b_eval_share_of_run(5e3 samples)", share, "evaluation time / (evaluation + steps)")
    assert ratio >= TARGET_BATCHED


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_c_exact_evaluation_vs_outer_step(benchmark, compose_config, name):
    algo, problem, v = build(compose_config, name, range(B))
    fstar, _ = f_star(problem, plain(v.env))
    evaluator = Evaluator(problem, fstar, algo)
    state = algo.init(v.seeds)
    state = algo.step(state, CountingSampler(problem, v.seeds, Counters()))
    evaluator(state)  # warm-up
    step = step_timer(compose_config, name, range(B))
    t_step = statistics.median(step() for _ in range(5))
    t_eval = median_time(lambda: evaluator(state), 10)
    benchmark.pedantic(evaluator, args=(state,), rounds=5, iterations=1)
    record_ratio(benchmark, f"c_eval_per_step[{name}]", t_eval / t_step,
                 f"one exact evaluation / one outer step, 32 seeds; eval {t_eval * 1e3:.2f} ms, step {t_step * 1e3:.2f} ms")


def network_calls_of_one_step(algo, problem, seeds, state):
    """Every network evaluation one outer step makes: {net id: (net, input, params, calls)}.
    Counted by wrapping StackedMLP.__call__ and the linear reward model's matrix product."""
    from ratebench.algorithms.models import RewardModel, StackedMLP

    calls, mlp_call, unit_rewards = {}, StackedMLP.__call__, RewardModel.unit_rewards

    def counted_mlp(self, params, x):
        entry = calls.setdefault(id(self), [self, x, params, 0])
        entry[3] += 1
        return mlp_call(self, params, x)

    def counted_units(self, params):
        if self.net is None:
            entry = calls.setdefault(id(self), [None, self.problem.unit_features, params, 0])
            entry[3] += 1
        return unit_rewards(self, params)

    StackedMLP.__call__, RewardModel.unit_rewards = counted_mlp, counted_units
    impl, algo.impl = algo.impl, "reference"  # the reference's network evaluations define the work
    try:
        algo.step(copy.deepcopy(state), CountingSampler(problem, list(seeds), Counters()))
    finally:
        StackedMLP.__call__, RewardModel.unit_rewards = mlp_call, unit_rewards
        algo.impl = impl
    return calls


def roofline_seconds_per_step(calls, repeat: int = 5) -> float:
    """The same batched matrix products as one step with no Python between them: for every network,
    one forward + backward over its parameters stacked `calls` times along the seed axis (B * calls)."""
    work = []
    for net, x, params, n in calls.values():
        stacked = [p.detach().repeat(n, *[1] * (p.dim() - 1)).requires_grad_(True) for p in params]
        forward = (lambda s, x=x: s[0] @ x.T) if net is None else (lambda s, net=net, x=x: net(s, x))
        work.append((forward, stacked))

    def run():
        for forward, stacked in work:
            torch.autograd.grad(forward(stacked).sum(), stacked)

    run()
    return median_time(run, repeat)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_d_steps_per_second_vs_roofline(benchmark, compose_config, name):
    algo, problem, v = build(compose_config, name, range(B))
    state = algo.init(v.seeds)
    calls = network_calls_of_one_step(algo, problem, v.seeds, state)
    step = step_timer(compose_config, name, range(B))
    t_step = statistics.median(step() for _ in range(5))
    t_roof = roofline_seconds_per_step(calls)
    benchmark.pedantic(step, rounds=3, iterations=1)
    n_calls = sum(c[3] for c in calls.values())
    record_ratio(benchmark, f"d_fraction_of_roofline[{name}]", t_roof / t_step,
                 f"roofline {1 / t_roof:,.0f} steps/s vs achieved {1 / t_step:,.0f} steps/s "
                 f"(32 seeds; {n_calls} network evaluations per step)")


def test_e_cost_per_sample_flat_from_1e4_to_1e6(benchmark, compose_config, tmp_path):
    """Whole run_job (set-up, steps, evaluations, records) per sample, 32 seeds, at 1e4, 1e5, 1e6 samples.
    Gated on process CPU time (robust to other users of a shared machine); wall time reported too.
    Smaller runs are repeated (median) because a 1e4 run takes well under a second."""
    common = ["algorithm=reward_mle", f"n_seeds={B}", "progress=false"]  # default batch: 8 samples per step
    run_job(compose_config(common + ["budget.samples=1000"]), tmp_path / "warm")
    counter = iter(range(1000))
    cpu, wall, shares = {}, {}, {}
    for budget, repeats in ((10_000, 5), (100_000, 2), (1_000_000, 1)):
        runs = []
        for _ in range(repeats):
            tic, tic_cpu = time.perf_counter(), time.process_time()
            rec = run_job(compose_config(common + [f"budget.samples={budget}"]), tmp_path / f"r{next(counter)}")
            runs.append(((time.process_time() - tic_cpu) / rec["counters"]["samples"],
                         (time.perf_counter() - tic) / rec["counters"]["samples"],
                         rec["eval_wall_s"] / (time.perf_counter() - tic)))
        cpu[budget], wall[budget], shares[budget] = (statistics.median(r[i] for r in runs) for i in range(3))
    benchmark.pedantic(lambda: None, rounds=1)
    spread = max(cpu.values()) / min(cpu.values())
    record_ratio(benchmark, "e_cpu_cost_per_sample_max_over_min", spread,
                 "1e4..1e6 samples, 32 seeds (target <= 1.5); CPU us/sample: "
                 + ", ".join(f"{b:.0e}: {1e6 * t:.2f}" for b, t in cpu.items()))
    record_ratio(None, "e_wall_cost_per_sample_max_over_min", max(wall.values()) / min(wall.values()),
                 "wall us/sample (shared machine): " + ", ".join(f"{b:.0e}: {1e6 * t:.2f}" for b, t in wall.items()))
    for budget, share in shares.items():
        record_ratio(None, f"e_eval_share_of_run({budget:.0e} samples)", share, "evaluation / whole run (target <= 0.2)")
    assert spread <= 1.5
    assert max(shares.values()) <= 0.2


@pytest.mark.parametrize("algorithm", ["bilevel", "bilevel_double_loop"])
def test_g_eval_share_of_a_bilevel_run(benchmark, compose_config, tmp_path, algorithm):
    """Evaluation share of a whole 32-seed, 1e5-sample bilevel run (the costly case: psi_gap solves
    one inner problem per seed at every evaluation point; the other algorithms are < 1 %).
    Both parts are timed inside the same run (run.json eval_wall_s vs wall_s)."""
    common = [f"algorithm={algorithm}", "progress=false"]
    run_job(compose_config(common + ["seeds=[0]", "budget.samples=2000"]), tmp_path / "warm")  # F-hat*, imports
    record = benchmark.pedantic(lambda: run_job(compose_config(common + [f"n_seeds={B}", "budget.samples=100000"]),
                                                tmp_path / "run"), rounds=1, iterations=1)
    share = record["eval_wall_s"] / (record["eval_wall_s"] + record["wall_s"])
    record_ratio(benchmark, f"g_eval_share_of_run[{algorithm}](1e5 samples)", share,
                 f"evaluation / (evaluation + steps), 32 seeds (target <= 0.2); eval {record['eval_wall_s']:.2f} s, "
                 f"steps {record['wall_s']:.2f} s")
    assert share <= 0.2


MEMORY_PROBE = """
import json, resource, sys, pathlib
from hydra import compose, initialize_config_module
from ratebench.config import register
from ratebench.runner import run_job
register()
with initialize_config_module(config_module="ratebench.conf", version_base="1.3"):
    cfg = compose(config_name="config", overrides=sys.argv[2:])
rec = run_job(cfg, pathlib.Path(sys.argv[1]))
print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def test_f_peak_memory_vs_evaluation_points(benchmark, tmp_path):
    """Peak RSS of a 32-seed 1e5-sample run with 1 vs 100 evaluation points per decade; the extra
    must stay within the size of the extra stored rows (plus allocator noise)."""
    import pandas as pd

    rss, rows = {}, {}
    for per_decade in (1, 100):
        out = tmp_path / str(per_decade)
        proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(out), f"n_seeds={B}", "budget.samples=100000",
                               "algorithm.batch_pairs=64", f"budget.evals_per_decade={per_decade}", "progress=false"],
                              capture_output=True, text=True, check=True, timeout=600)
        rss[per_decade] = json.loads(proc.stdout.strip().splitlines()[-1])["maxrss_kb"] * 1024
        rows[per_decade] = pd.read_parquet(out / "metrics.parquet").memory_usage(deep=True).sum()
    benchmark.pedantic(lambda: None, rounds=1)
    growth, stored = rss[100] - rss[1], rows[100] - rows[1]
    record_ratio(benchmark, "f_peak_rss_growth_MB(1->100 evals/decade)", growth / 2**20,
                 f"extra stored rows {stored / 2**20:.2f} MB; peak RSS {rss[1] / 2**20:.0f} -> {rss[100] / 2**20:.0f} MB")
    assert growth <= 3 * stored + 16 * 2**20
