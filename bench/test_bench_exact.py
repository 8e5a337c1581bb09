"""F with its gradient on the default mdp's 256 multistart rows (what the multistart of F-hat* evaluates ~480 times):
exact.upper_loss's closed-form backward against autograd through the same pair table (exact._pair_table and
exact._pair_form, the code before), in one process with the jobs' malloc setting (conftest), rounds alternating.

    OMP_NUM_THREADS=1 .venv/bin/pytest bench/test_bench_exact.py -p no:xdist --benchmark-enable -s -q
"""
from __future__ import annotations

import time

import torch
from conftest import interleaved, record_ratio

from ratebench import envs
from ratebench.envs import exact


def autograd_through_the_pair_table(problem, rewards):
    """F as upper_loss computed it before its closed-form backward: every op on the tables recorded by autograd."""
    logps = exact.soft_optimal(problem, rewards)[0]
    returns, prob = exact.trajectory_returns(problem, rewards), exact.trajectory_probs(problem, logps)
    pair_probs = exact.true_pair_probs(problem)
    return torch.cat([exact._pair_form(prob[part], exact._pair_table(returns[part], pair_probs), problem.init_prob)
                      for part in exact.seed_chunks(problem, returns.shape[0])])


def test_f_and_its_gradient_on_the_mdp_multistart_rows(benchmark, compose_config):
    problem = envs.make(compose_config(["env=mdp"]).env)
    gen = torch.Generator().manual_seed(0)
    units = problem.true_unit_reward[None] + 0.5 * torch.randn(256, problem.n_units, generator=gen,
                                                               dtype=torch.float64)
    grads = {}

    def arm(objective):
        def timed():
            leaf = units.clone().requires_grad_(True)
            tic = time.perf_counter()
            value = objective(problem, problem.step_tables_from_units(leaf))
            grads[objective] = (value.detach(), torch.autograd.grad(value.sum(), leaf)[0])
            return time.perf_counter() - tic
        return timed

    times = {"autograd": [], "closed form": []}
    for name, timed in interleaved({"autograd": arm(autograd_through_the_pair_table),
                                    "closed form": arm(exact.bilevel_objective)}, rounds=6):
        times[name].append(timed())
    benchmark.pedantic(lambda: None, rounds=1)
    (v0, g0), (v1, g1) = grads.values()
    assert torch.equal(v0, v1) and torch.allclose(g0, g1, rtol=0, atol=1e-13)
    before, after = min(times["autograd"]), min(times["closed form"])
    record_ratio(benchmark, "f_and_grad_mdp_256_rows_speedup", before / after,
                 f"F + grad F on 256 rows of the default mdp: autograd through the pair table {before * 1e3:.0f} ms, "
                 f"closed form {after * 1e3:.0f} ms (best of 6 rounds, order alternating, 1 thread)")
    assert before / after > 1.0
