"""Segments (Algorithm.run_segment): impl=fast's compiled bilevel step runs every step between two evaluation points
in one call (bilevel_step.c's bilevel_segment), seeds split across threads. What it must equal, bit for bit: the same
steps taken one call at a time (Bilevel.step, the per-step compiled path, which tests/test_fast.py holds to the
reference to 1e-12 at every step), each followed by the harness's non-finite check (_mark_diverged).

- every compiled case of tests/test_fast.py, in segments of random lengths with a checkpoint through disk in the
  middle of what would have been one segment (resume mid-segment), on 2 threads;
- the thread count changes no bit (1, 2 and 3 threads on 16 seeds, some of which diverge);
- a seed that goes non-finite is marked at its step and zeroed, as the per-step loop does, and when every seed has,
  the segment stops at the step where the last one did, with the per-step loop's counters;
- the harness: a job run in segments writes the metrics and records of the job run one step per call, on the
  sample clock and the step clock; a job killed (SIGKILL) at five random moments resumes to the same metrics.
"""
from __future__ import annotations

import json
import random
import time

import pandas as pd
import pytest
import torch
from ratebench.kill_drill import run_and_kill
from ratebench.runner import _mark_diverged, run_job
from test_fast import CASES, COMPILED, build, through_disk

SMALL = ["algorithm=bilevel", "algorithm.batch_traj=2", "algorithm.batch_pairs=2"]
# a depth-2 reward at N = M = 2 diverges on some seeds within a few hundred steps (width 32, the defaults)
DIVERGING = [*SMALL, "model.reward.depth=2", "model.reward.width=32", "model.policy.width=32", "n_seeds=16"]


def per_step(algo, state, sampler, alive, n):
    """n steps one call at a time, each followed by the harness's check: (state, {row: step it diverged at})."""
    died = {}
    for _ in range(n):
        state = algo.step(state, sampler)
        for row in _mark_diverged(algo, state, alive):  # {row: reason}
            died[row] = state.k
    return state, died


def segments(algo, state, sampler, alive, lengths):
    """Segments of these lengths: (state, {row: step it diverged at}), alive updated as the harness does."""
    died = {}
    for n in lengths:
        k = state.k
        state, steps, at = algo.run_segment(state, sampler, n, alive)
        assert steps == n or not alive.any()
        for row in ((at > 0) & alive).nonzero().flatten().tolist():
            died[row] = k + int(at[row])
        alive &= at == 0
    return state, died


def same(a_algo, a, b_algo, b, where):
    assert a.k == b.k and a_algo.schedule(a) == b_algo.schedule(b), where
    for key, t in a_algo.tensors(a).items():
        assert torch.equal(t, b_algo.tensors(b)[key]), f"{where}: {key}"


def lengths_to(n: int, rng: random.Random) -> list[int]:
    out = []
    while sum(out) < n:
        out.append(min(rng.choice([1, 1, 2, 3, 7, 20, 64, 150]), n - sum(out)))
    return out


@pytest.mark.parametrize("case", sorted(COMPILED))
def test_segments_are_the_per_step_run_bit_for_bit_through_a_checkpoint(compose_config, case):
    overrides, n = CASES[case]
    one, one_sampler, one_counters, seeds = build(compose_config, overrides, "fast")
    seg, seg_sampler, seg_counters, _ = build(compose_config, overrides, "fast")
    seg.step_threads = 2
    alive_one, alive_seg = torch.ones(len(seeds), dtype=torch.bool), torch.ones(len(seeds), dtype=torch.bool)
    a, b = one.init(seeds), seg.init(seeds)
    rng = random.Random(case)
    half = n // 2 + 3  # inside a segment of the first half's lengths (they cross it)
    a, died_one = per_step(one, a, one_sampler, alive_one, half)
    b, died_seg = segments(seg, b, seg_sampler, alive_seg, lengths_to(half, rng))
    same(one, a, seg, b, f"{case} at step {half}")
    # resume: state, sampler and counters through a checkpoint into a fresh algorithm, then segments on
    saved = through_disk({"algorithm": seg.state_dict(b), "sampler": seg_sampler.state_dict()})
    seg, seg_sampler, seg_counters2, _ = build(compose_config, overrides, "fast")
    vars(seg_counters2).update(vars(seg_counters))
    seg.step_threads = 2
    b = seg.load_state_dict(seg.init(seeds), saved["algorithm"])
    seg_sampler.load_state_dict(saved["sampler"])
    a, more_one = per_step(one, a, one_sampler, alive_one, n - half)
    b, more_seg = segments(seg, b, seg_sampler, alive_seg, lengths_to(n - half, rng))
    same(one, a, seg, b, f"{case} at step {n}")
    assert one_sampler.state_dict() == seg_sampler.state_dict()
    assert vars(one_counters) == vars(seg_counters2)
    assert {**died_one, **more_one} == {**died_seg, **more_seg}
    assert torch.equal(alive_one, alive_seg)


def test_the_thread_count_changes_no_bit_and_divergence_is_marked_at_its_step(compose_config):
    results = []
    for threads, lengths in ((None, None), (1, [40, 200, 60]), (2, [40, 200, 60]), (3, [40, 200, 60]), (2, [1] * 300)):
        algo, sampler, counters, seeds = build(compose_config, DIVERGING, "fast")  # None: one step per call
        state, alive = algo.init(seeds), torch.ones(len(seeds), dtype=torch.bool)
        if threads is None:
            state, died = per_step(algo, state, sampler, alive, 300)
        else:  # [1] * 300: every divergence at a segment's last step (the next call must not reuse its old tables)
            algo.step_threads = threads
            state, died = segments(algo, state, sampler, alive, lengths)
        results.append((algo, state, died, alive.clone(), dict(vars(counters)), sampler.state_dict()))
    algo0, state0, died0, alive0, counters0, rng0 = results[0]
    assert 2 <= len(died0) < 16, f"the case must diverge on some seeds, not all: {died0}"
    for algo, state, died, alive, counters, rng in results[1:]:
        same(algo0, state0, algo, state, "threads")
        assert died == died0 and torch.equal(alive, alive0) and counters == counters0 and rng == rng0
        for row in died:  # zeroed at its step, then stepped on as the per-step loop does: finite or not, as there
            assert not alive[row]


def test_when_every_seed_diverges_the_segment_stops_where_the_per_step_loop_does(compose_config):
    blowing_up = [*DIVERGING, "algorithm.c_xi=3000", "algorithm.c_alpha=300", "n_seeds=4"]
    results = []
    for mode in ("per_step", "segment"):
        algo, sampler, counters, seeds = build(compose_config, blowing_up, "fast")
        state, alive = algo.init(seeds), torch.ones(len(seeds), dtype=torch.bool)
        if mode == "per_step":  # the harness's loop: while a seed is alive
            died = {}
            while alive.any():
                state, more = per_step(algo, state, sampler, alive, 1)
                died.update(more)
        else:
            algo.step_threads = 2
            state, steps, at = algo.run_segment(state, sampler, 500, alive)
            assert steps < 500
            died = {row: int(at[row]) for row in range(len(seeds))}
        results.append((state.k, died, dict(vars(counters)), sampler.state_dict(), algo.schedule(state)))
    assert results[0] == results[1]
    assert len(set(results[0][1].values())) > 1, "the seeds must diverge at different steps"


def clean_and_poisoned(compose_config, seeds: list[int], threads: int, row: int, steps: int):
    """One segment of `steps` steps on `threads` threads, run clean and with every parameter of seed row `row` set to
    NaN: ((tensors, died) clean, (tensors, died) poisoned)."""
    got = []
    for poison in (False, True):
        algo, sampler, _, seed_list = build(compose_config, [*SMALL, f"seeds={seeds}".replace(" ", "")], "fast")
        algo.step_threads = threads
        state = algo.init(seed_list)
        if poison:
            for t in algo.tensors(state).values():
                t[row] = float("nan")
        state, _, died = algo.run_segment(state, sampler, steps, torch.ones(len(seeds), dtype=torch.bool))
        got.append((algo.tensors(state), died))
    return got


def test_a_segment_never_reads_another_seeds_memory(compose_config):
    """A NaN seed (every parameter) leaves the others' segment bit for bit, and is marked at the first step."""
    (clean, died_clean), (poisoned, died_poisoned) = clean_and_poisoned(compose_config, [3, 0, 5], 3, 1, 50)
    assert died_clean.tolist() == [0, 0, 0] and died_poisoned.tolist() == [0, 1, 0]
    for key, t in clean.items():
        assert torch.equal(poisoned[key][[0, 2]], t[[0, 2]]), key


def test_a_nan_seed_leaves_the_other_lanes_of_its_block_bit_for_bit(compose_config):
    """On one thread a segment steps its seeds VL = 8 at a time as the lanes of one vector (bilevel_step.c "a block of
    seeds as vector lanes"): a NaN seed sharing a block with seven others (and a second, partial block) leaves
    theirs bit for bit, is marked at the first step, and the clean run is the per-step run."""
    seeds = [3, 0, 5, 7, 11, 13, 17, 19, 23, 29]
    (clean, died_clean), (poisoned, died_poisoned) = clean_and_poisoned(compose_config, seeds, 1, 2, 60)
    assert died_clean.tolist() == [0] * 10 and died_poisoned.tolist() == [0, 0, 1] + [0] * 7
    others = [row for row in range(10) if row != 2]
    for key, t in clean.items():
        assert torch.equal(poisoned[key][others], t[others]), key
    one, sampler, _, seeds_ = build(compose_config, [*SMALL, f"seeds={seeds}".replace(" ", "")], "fast")
    state, _ = per_step(one, one.init(seeds_), sampler, torch.ones(10, dtype=torch.bool), 60)
    for key, t in one.tensors(state).items():
        assert torch.equal(t, clean[key]), key


def test_an_instance_batch_in_lanes_is_the_per_step_run_bit_for_bit(compose_config):
    """Rows of an instance batch differ in their log pi_ref, teacher and transitions: in a block of lanes each lane
    reads its own row's tables (9 rows: a block of 8 and a partial one, 1 thread). A block that read its first lane's
    log pi_ref for every lane fails here."""
    from ratebench import envs
    from ratebench.algorithms import ALGORITHMS
    from ratebench.config import validate
    from ratebench.envs.sampling import Counters, CountingSampler
    from ratebench.envs.tabular import InstanceBatch

    runs = []
    for mode in ("per_step", "segment"):
        problems = [envs.make(validate(compose_config(["env=mdp", f"env.instance_seed={k}"])).env) for k in (1, 2, 3)]
        v = validate(compose_config(["env=mdp", *SMALL]))
        seeds = [0, 5, 9] * 3
        problem = InstanceBatch(problems, torch.arange(3).repeat_interleave(3))
        algo = ALGORITHMS[v.algorithm.name](v.algorithm, v.model, problem)
        algo.impl, algo.step_threads = "fast", 1
        sampler = CountingSampler(problem, seeds, Counters())
        state, alive = algo.init(seeds), torch.ones(9, dtype=torch.bool)
        if mode == "per_step":
            state, died = per_step(algo, state, sampler, alive, 40)
        else:
            state, died = segments(algo, state, sampler, alive, [7, 1, 32])
        runs.append((algo, state, died, sampler.state_dict()))
    (a_algo, a, a_died, a_rng), (b_algo, b, b_died, b_rng) = runs
    same(a_algo, a, b_algo, b, "instance batch")
    assert a_died == b_died and a_rng == b_rng
    rows = a_algo.tensors(a)["z.0"]
    assert not torch.equal(rows[0], rows[3]), "the instances must differ"


# Builds of bilevel_step.c with other lanes than this CPU's (VL = 8 on AVX-512, else 4): 8 and 2 lanes on any CPU (GCC's
# vector extension emulates what the CPU lacks), plain x86-64 (4 lanes, fma() one lane at a time: no FMA unit), and
# x86-64-v3 (4 AVX2 lanes: their intrinsics, which an AVX-512 CPU's own build never takes). -O1 builds in ~4 s; no bit
# may depend on the optimisation level either (-ffp-contract=off, no fast-math)
LANE_BUILDS = {"8 lanes": ("-DVL=8",), "2 lanes": ("-DVL=2",), "x86-64 without fma": ("-march=x86-64",),
               "x86-64-v3 avx2 lanes": ("-march=x86-64-v3",)}
X86_64_V3 = {"avx2", "fma", "bmi1", "bmi2", "movbe", "f16c", "lzcnt", "xsave"}  # what an x86-64-v3 build may execute
THIRTEEN = [f"seeds=[{','.join(map(str, range(13)))}]"]  # a full block and a partial one at each width
LANE_CASES = {
    "bandit": [*SMALL, *THIRTEEN],
    "bandit-bounded": [*SMALL, *THIRTEEN, "model.reward.bound=2"],
    "bandit-linear-reward": [*SMALL, *THIRTEEN, "model.reward.kind=linear"],
    "mdp": ["algorithm=bilevel", "env=mdp", "algorithm.batch_traj=2", "algorithm.batch_pairs=2", *THIRTEEN],
    "token-double-loop": ["algorithm=bilevel", "env=token", "algorithm.variant=double_loop", "algorithm.eps=0.08",
                          *THIRTEEN],
    "diverging": DIVERGING,
}


@pytest.mark.parametrize("lanes", sorted(LANE_BUILDS))
@pytest.mark.parametrize("case", sorted(LANE_CASES))
def test_every_lane_width_gives_the_per_step_runs_bits(compose_config, monkeypatch, lanes, case):
    """A segment built with other lanes (VL) or without the CPU's vector instructions is the per-step run of this
    CPU's own build bit for bit: a lane is a seed of its own, so the width must change nothing. Code that assumed 8
    lanes (as the kernel did before CPUs without AVX-512 got 4) fails here on every machine."""
    import platform

    from ratebench.algorithms import bilevel_kernel
    from ratebench.core import kernels

    if LANE_BUILDS[lanes][0].startswith("-march") and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"-march=x86-64 builds only on x86-64 ({platform.machine()})")
    lacking = X86_64_V3 - set(kernels._cpu().replace("abm", "lzcnt").split())
    if "v3" in lanes and lacking:
        pytest.skip(f"this CPU cannot run an x86-64-v3 build (no {', '.join(sorted(lacking))})")
    one, one_sampler, _, seeds = build(compose_config, LANE_CASES[case], "fast")
    a, alive_one = one.init(seeds), torch.ones(len(seeds), dtype=torch.bool)
    a, died_one = per_step(one, a, one_sampler, alive_one, 90)
    built = kernels.load(bilevel_kernel.SOURCE, "-O1", LANE_BUILDS[lanes])
    assert built is not None, f"bilevel_step.c did not build with {LANE_BUILDS[lanes]}"
    monkeypatch.setattr(bilevel_kernel, "load", lambda source, *args, **kwargs: built)
    seg, seg_sampler, _, _ = build(compose_config, LANE_CASES[case], "fast")
    seg.step_threads = 2
    b, alive_seg = seg.init(seeds), torch.ones(len(seeds), dtype=torch.bool)
    b, died_seg = segments(seg, b, seg_sampler, alive_seg, [7, 1, 20, 62])
    assert seg._compiled.lib is built  # the segments ran on the other build
    same(one, a, seg, b, f"{case}, {lanes}")
    assert died_one == died_seg and torch.equal(alive_one, alive_seg)
    assert one_sampler.state_dict() == seg_sampler.state_dict()


def test_one_infinite_parameter_marks_its_seed_as_nan_does(compose_config):
    """The segment's non-finite check (exponent bits) finds +inf and -inf in a single entry, as torch.isfinite does
    in the per-step loop, and leaves a clean seed alone."""
    got = []
    for mode in ("per_step", "segment"):
        algo, sampler, _, seeds = build(compose_config, [*SMALL, "seeds=[3,0,5,7]"], "fast")
        state, alive = algo.init(seeds), torch.ones(4, dtype=torch.bool)
        tensors = list(algo.tensors(state).values())
        tensors[0].view(4, -1)[0, 0] = float("inf")  # seed row 0: one weight of the first network
        tensors[-1].view(4, -1)[1, -1] = float("-inf")  # row 1: the last entry of the last tensor
        tensors[len(tensors) // 2].view(4, -1)[3, 1] = float("nan")  # row 3
        if mode == "per_step":
            state, died = per_step(algo, state, sampler, alive, 5)
            got.append(died)
        else:
            algo.step_threads = 2
            state, steps, at = algo.run_segment(state, sampler, 5, alive)
            got.append({row: int(at[row]) for row in range(4) if at[row] > 0})
    assert got[0] == got[1] == {0: 1, 1: 1, 3: 1}


JOB = [*SMALL, "seeds=[0,1,2]", "progress=false", "checkpoint_every_s=0"]


@pytest.mark.parametrize("clock", [["budget.samples=8000"], ["budget.steps=600", "algorithm.variant=double_loop",
                                                               "algorithm.eps=0.08"],
                                   ["budget.samples=3000", "model.reward.depth=2", "seeds=[0,1,2,3,4,5]",
                                        "health.enabled=false"]],
                         ids=["samples", "steps-double-loop", "diverging"])
def test_a_job_in_segments_writes_the_per_step_jobs_records(compose_config, tmp_path, monkeypatch, clock):
    import ratebench.algorithms.bilevel as bilevel_module

    seg = run_job(compose_config([*JOB, *clock]), tmp_path / "segments")
    monkeypatch.setattr(bilevel_module.Bilevel, "segment_samples", lambda self, state: None)  # one step per call
    one = run_job(compose_config([*JOB, *clock]), tmp_path / "per_step")
    a = pd.read_parquet(tmp_path / "segments" / "metrics.parquet").drop(columns="wall_s")
    b = pd.read_parquet(tmp_path / "per_step" / "metrics.parquet").drop(columns="wall_s")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    # the same outcome per seed: status and step (a diverged seed's reason names its tensors only on the per-step path)
    assert seg["counters"] == one["counters"]
    assert ({k: (st["status"], st.get("step")) for k, st in seg["status"].items()}
            == {k: (st["status"], st.get("step")) for k, st in one["status"].items()})
    if "health.enabled=false" in clock:  # the saturation check would stop these seeds before they diverge
        assert any(s["status"] == "diverged" for s in seg["status"].values()), seg["status"]


def test_a_long_job_killed_five_times_resumes_to_the_uninterrupted_metrics(compose_config, tmp_path):
    """SIGKILL at five random moments (fixed seed) of a job that checkpoints at every evaluation point; each re-run
    resumes from its last checkpoint. CI-sized (2e5 steps); bench/ runs the long one."""
    cfg = compose_config([*JOB, "budget.steps=200000", "budget.samples=100000000"])
    straight = tmp_path / "straight"
    tic = time.perf_counter()
    run_job(cfg, straight)
    whole = time.perf_counter() - tic  # kills land at fractions of this, so a faster or busier machine kills as often
    killed, rng, kills = tmp_path / "killed", random.Random(29), 0
    for _ in range(5):
        # five kills stop the job before 75 % of its work is done
        kills += run_and_kill(cfg, killed, rng.uniform(0.05, 0.15) * whole)
    assert kills >= 3, "the job finished before most kills: make it longer"
    assert (killed / "checkpoint.pt").exists() or (killed / "run.json").exists()
    record = run_job(cfg, killed)
    assert record["resumed_from_step"] is not None or kills == 0
    a = pd.read_parquet(straight / "metrics.parquet").drop(columns="wall_s")
    b = pd.read_parquet(killed / "metrics.parquet").drop(columns="wall_s")
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert json.loads((straight / "run.json").read_text())["counters"] == record["counters"]
