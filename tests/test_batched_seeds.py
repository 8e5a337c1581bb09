"""Batched seeds: every registered algorithm advances a batch of seeds in one process, and each
seed's trajectory equals running that seed alone (to float64 round-off)."""
from __future__ import annotations

import time

import pandas as pd
import pytest
import torch

from ratebench import envs
from ratebench.algorithms import ALGORITHMS
from ratebench.config import validate
from ratebench.runner import run_job
from ratebench.envs.sampling import Counters, CountingSampler

BATCH = [5, 0]  # unsorted, not starting at 0: a seed's stream must not depend on its position
MAX_STEPS = 1000  # the horizon; algorithms whose outer step is a whole refit stop at TIME_CAP_S
TIME_CAP_S = 1.0
FULL_HORIZON = {"reward_mle": MAX_STEPS, "bilevel": MAX_STEPS}  # always the full 1,000 (bilevel: ~12 s)
COMPARE_EVERY = 25  # steps between compared snapshots (the last step is always compared)
RTOL, ATOL = 1e-9, 1e-12  # float64 round-off (batched vs unbatched matmul kernels may differ in the last bits)


def trajectory(compose_config, name, seeds, n_steps=None, extra=()):
    """{step: {name: (B, ...)}} every COMPARE_EVERY steps and at the last step."""
    v = validate(compose_config([f"algorithm={name}", f"seeds={seeds}", *extra]))
    problem = envs.make(v.env)
    algo = ALGORITHMS[name](v.algorithm, v.model, problem)
    sampler = CountingSampler(problem, v.seeds, Counters())
    state, out, start, step = algo.init(v.seeds), {}, time.perf_counter(), 0
    while step < (n_steps or MAX_STEPS):
        state = algo.step(state, sampler)
        step += 1
        last = step == n_steps or (n_steps is None and (step == MAX_STEPS or time.perf_counter() - start > TIME_CAP_S))
        if step % COMPARE_EVERY == 0 or last:
            out[step] = {k: t.detach().clone() for k, t in algo.tensors(state).items()}
        if last:
            break
    return out


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_each_seed_of_a_batch_equals_its_solo_run(compose_config, name):
    batched = trajectory(compose_config, name, BATCH, n_steps=FULL_HORIZON.get(name))
    n = max(batched)
    for i, seed in enumerate(BATCH):
        solo = trajectory(compose_config, name, [seed], n_steps=n)
        assert solo.keys() == batched.keys()
        for step, tensors in solo.items():
            for key, t in tensors.items():
                where = f"{name} seed {seed} step {step}/{n} {key}"
                torch.testing.assert_close(batched[step][key][i:i + 1], t, rtol=RTOL, atol=ATOL,
                                           msg=lambda m, where=where: f"{where}: {m}")


@pytest.mark.parametrize("name", ["dpo", "ppo_rlhf"])
def test_online_modes_match_solo_runs_over_1000_steps(compose_config, name):
    """Online DPO / PPO-RLHF take one cheap step per outer iteration, so the full 1,000-step
    horizon is affordable (their offline outer steps are whole refits, capped above)."""
    extra = ["algorithm.mode=online"]
    batched = trajectory(compose_config, name, BATCH, n_steps=MAX_STEPS, extra=extra)
    for i, seed in enumerate(BATCH):
        solo = trajectory(compose_config, name, [seed], n_steps=MAX_STEPS, extra=extra)
        for step, tensors in solo.items():
            for key, t in tensors.items():
                torch.testing.assert_close(batched[step][key][i:i + 1], t, rtol=RTOL, atol=ATOL)


def test_seeds_are_not_the_same_stream(compose_config):
    """The comparison above would pass trivially if every seed drew the same numbers."""
    batched = trajectory(compose_config, "reward_mle", BATCH, n_steps=5)[5]["nu.0"]
    assert not torch.equal(batched[0], batched[1])


def test_batched_run_records_equal_solo_runs(compose_config, tmp_path):
    """End to end through run_job: a seed's rows of a 3-seed run are the rows of its solo run."""
    cfg = compose_config(["seeds=[5,0,3]", "budget.samples=1000"])
    run_job(cfg, tmp_path / "batch")
    batch = pd.read_parquet(tmp_path / "batch" / "metrics.parquet").drop(columns="wall_s")
    for seed in (3,):
        run_job(compose_config([f"seeds=[{seed}]", "budget.samples=1000"]), tmp_path / str(seed))
        solo = pd.read_parquet(tmp_path / str(seed) / "metrics.parquet").drop(columns="wall_s")
        mine = batch[batch.seed == seed].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, solo, check_exact=False, rtol=1e-9, atol=1e-12)


def test_n_seeds_is_seeds_zero_to_n(compose_config):
    assert validate(compose_config(["n_seeds=4"])).seeds == [0, 1, 2, 3]
