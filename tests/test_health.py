"""Seed health (harness/health.py): a seed that leaves the region where the exact metrics and the analysis apply is
`saturated`, one that stops moving is `stalled`, never `completed`; the statuses survive checkpoint/resume, are
decided per instance in a batched family, and no RuntimeWarning reaches the user on the way."""
from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import at_step
from ratebench.algorithms.bilevel import Bilevel
from ratebench.health import LOG_TINY, HealthConfig, SeedHealth, flat_parameters, relative_change, saturation
from ratebench.core.records import objective_value
from ratebench.runner import FINISHED, run_instances_or_skip, run_job

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# the theorem regime of conf/experiment/rate_bandit_small_batch.yaml (N = M = 2, default schedule, 16 seeds);
# instances 11-13 are named in no config (conf/ uses 0-4 and 100): held out from everything
SMALL_BATCH = ["env=bandit", "algorithm=bilevel", "algorithm.batch_traj=2", "algorithm.batch_pairs=2",
               "budget.samples=1000000000", "n_seeds=16"]
TINY = ["algorithm=bilevel", "seeds=[0,1,2]", "budget.samples=3000", "budget.evals_per_decade=2"]
ZERO_STEPS = ["algorithm.c_xi=5e-324", "algorithm.c_alpha=5e-324", "algorithm.c_alpha_z=5e-324"]  # 5e-324 / (k + k0)^a == 0.0


def _frame(folder):
    return pd.read_parquet(folder / "metrics.parquet")


def _last(frame):
    return frame.sort_values(["seed", "step"]).groupby("seed").tail(1).set_index("seed")


# --- the pure functions against values worked out by hand --------------------------------------------------------
def test_the_log_probability_floor_is_where_the_softmax_leaves_the_normal_floats():
    assert math.exp(LOG_TINY) == pytest.approx(sys.float_info.min, rel=1e-12)
    assert math.exp(LOG_TINY - 1) < sys.float_info.min  # below it a probability is subnormal, then exactly 0
    logits = torch.tensor([[0.0, -746.0]], dtype=torch.float64)
    assert torch.softmax(logits, -1)[0, 1] == 0  # what the floor stands for: the probability is gone


def test_saturation_names_each_reason_with_its_numbers():
    metrics = {"gap": torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64),
               "reward_err": torch.tensor([1.0, math.nan, 2.0, 3.0, 4.0], dtype=torch.float64),
               "grad_sq": torch.tensor([1e-3, 1e-3, 0.0, 1e-300, 1e-3], dtype=torch.float64),
               "psi_gap": torch.full((5,), math.nan, dtype=torch.float64)}  # NaN by design: not watched
    observed = {"min_log_prob": torch.tensor([-5.0, -5.0, -5.0, -5.0, -800.0], dtype=torch.float64),
                "min_log_prob_star": torch.tensor([-5.0, -5.0, -9e6, -700.0, -5.0], dtype=torch.float64),
                "max_abs_reward": torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)}
    reasons = saturation(metrics, observed, ["gap", "reward_err", "grad_sq"], ["grad_sq"], HealthConfig())
    assert reasons[0] is None and reasons[3] is None  # 1e-300 is tiny but not 0; -700 is above log(min normal)
    assert reasons[1] == "not finite with finite parameters: reward_err = nan"
    assert reasons[2].startswith("grad_sq = 0 exactly") and "-9e+06" in reasons[2]
    assert reasons[4].startswith("the deployed policy has log-probability -800 <")
    bounded = saturation(metrics, observed, [], [], HealthConfig(max_abs_reward=0.5))
    assert all(r.startswith("|r_nu| reaches 1 > health.max_abs_reward = 0.5") for r in (bounded[0], bounded[1], bounded[3]))


def test_relative_change_and_the_decade_memory():
    past = torch.tensor([[1.0, -4.0], [0.0, 0.0], [2.0, 2.0]], dtype=torch.float64)
    now = torch.tensor([[1.0, -4.0], [0.0, 1e-300], [2.0, 2.5]], dtype=torch.float64)
    assert relative_change(now, past).tolist() == [0.0, math.inf, 0.25]
    health = SeedHealth(HealthConfig(), 3)
    metrics = {"gap": torch.ones(3, dtype=torch.float64)}
    observed = {k: torch.zeros(3, dtype=torch.float64) for k in ("min_log_prob", "min_log_prob_star", "max_abs_reward")}
    for clock in (0, 1, 2, 5, 10):  # frozen from clock 1 (step = clock here): a decade is seen at clock 10
        health.evaluate(metrics, observed, past, clock, clock)
    assert all(why is not None for why in health.stalled())
    health.evaluate(metrics, observed, now, 12, 12)  # seed 0 still frozen since 1; 1 and 2 moved
    assert [s is not None for s in health.stalled()] == [True, False, False]
    assert health.stalled_step(0) == 1 and "from step 1 to step 12" in health.stalled()[0]
    assert [s["clock"] for s in health.snapshots] == [1, 10]  # the first point of each decade still needed


def stall_memory_by_hand(points, rtol):
    """The stall rule of docs/metrics.md written out point by point, apart from SeedHealth: at each point the
    reference is the snapshot of the latest decade at least one decade back; a seed frozen against it keeps (or
    starts at the reference's step) its frozen-since step, a seed that moved resets it; a snapshot is taken at the
    first point of each decade. Returns (frozen_since, last change, snapshot clocks still needed)."""
    snapshots, since, change = [], None, None
    for params, clock, step in points:
        since = [-1] * len(params) if since is None else since
        past = [s for s in snapshots if 1 <= s[0] <= clock / 10]
        if past:
            clock_ref, step_ref, ref = past[-1]
            change = [0.0 if float((a - b).abs().max()) == 0 else float((a - b).abs().max() / b.abs().max())
                      for a, b in zip(params, ref)]
            since = [(step_ref if was < 0 else was) if c <= rtol else -1 for was, c in zip(since, change)]
            snapshots = [s for s in snapshots if s[0] >= clock_ref]
        if clock >= 1 and (not snapshots or math.floor(math.log10(clock)) > math.floor(math.log10(snapshots[-1][0]))):
            snapshots.append((clock, step, params.clone()))
    return since, change, [s[0] for s in snapshots]


@pytest.mark.parametrize("rtol", [0.0, 1e-3])
@pytest.mark.parametrize("batches", [[40], [1] * 40, [3, 17, 1, 19]], ids=["all-at-once", "one-by-one", "mixed"])
def test_the_stall_memory_over_held_points_is_the_rule_point_by_point(rtol, batches):
    """SeedHealth advanced over 40 evaluation points (clocks 0 to ~10^5, log-spaced) handed over in batches, as the
    harness hands held points, against stall_memory_by_hand: 6 seeds that freeze and thaw at different points (some
    by less than rtol), frozen-since steps, the last relative change and the snapshots kept, equal."""
    gen = torch.Generator().manual_seed(8)
    clocks = sorted({0, *[int(10 ** (k / 8)) for k in range(60)]})[:40]
    params, now = [], torch.randn(6, 5, generator=gen, dtype=torch.float64)
    for i in range(len(clocks)):
        moves = torch.rand(6, generator=gen) < torch.tensor([0.0, 0.1, 0.5, 0.9, 0.3, 1.0])
        size = torch.where(torch.arange(6) == 4, 1e-5, 1.0)  # seed 4 moves by less than rtol = 1e-3
        now = now + (moves * size)[:, None] * torch.randn(6, 5, generator=gen, dtype=torch.float64)
        params.append(now.clone())
    steps = [3 * c for c in clocks]
    health, at = SeedHealth(HealthConfig(stall_rtol=rtol), 6), 0
    metrics = {"gap": torch.ones(6, dtype=torch.float64)}
    observed = {k: torch.zeros(6, dtype=torch.float64) for k in ("min_log_prob", "min_log_prob_star", "max_abs_reward")}
    for size in batches:
        part = range(at, at + size)
        health.evaluate_many({k: m.repeat(size) for k, m in metrics.items()},
                             {k: m.repeat(size) for k, m in observed.items()}, torch.stack([params[i] for i in part]),
                             [clocks[i] for i in part], [steps[i] for i in part])
        at += size
    since, change, kept = stall_memory_by_hand(zip(params, clocks, steps), rtol)
    assert health.frozen_since.tolist() == since and 0 < sum(s >= 0 for s in since) < 6
    assert health.change.tolist() == change and health.last_step == steps[-1]
    assert [s["clock"] for s in health.snapshots] == kept


def test_a_seed_whose_parameters_turn_nan_does_not_read_as_stalled():
    """A relative change that is NaN (NaN parameters) counts as a move, as in stall_memory_by_hand: of two seeds frozen
    from clock 1, the one whose parameters are NaN from clock 20 is not stalled at the end, the other is."""
    frozen = torch.ones(2, 3, dtype=torch.float64)
    clocks = [1, 2, 5, 10, 20, 50, 100]
    params = [frozen.clone() for _ in clocks]
    for later in params[4:]:
        later[1] = math.nan
    health = SeedHealth(HealthConfig(), 2)
    metrics = {"gap": torch.ones(2 * len(clocks), dtype=torch.float64)}
    observed = {k: torch.zeros(2 * len(clocks), dtype=torch.float64)
                for k in ("min_log_prob", "min_log_prob_star", "max_abs_reward")}
    health.evaluate_many(metrics, observed, torch.stack(params), clocks, clocks)
    since, _, _ = stall_memory_by_hand(zip(params, clocks, clocks), 0.0)
    assert health.frozen_since.tolist() == since == [1, -1]
    assert [why is not None for why in health.stalled()] == [True, False]


# --- constructed runs ------------------------------------------------------------------------------------------------
def test_flat_parameters_of_several_states_are_each_states_own_rows():
    """The batched copy (one per tensor name over the states) against each state's rows written out by hand: every
    tensor flattened per seed, float64, in the tensors' order."""
    gen = torch.Generator().manual_seed(3)
    states = [{"w": torch.randn(4, 3, 2, generator=gen), "lam": torch.randn(4, generator=gen),
               "z.0": torch.randn(4, 5, generator=gen).to(torch.float32)} for _ in range(3)]
    many = flat_parameters(states)
    assert len(many) == 3
    for state, flat in zip(states, many):
        by_hand = torch.tensor([[*state["w"][b].flatten().tolist(), float(state["lam"][b]),
                                 *[float(v) for v in state["z.0"][b]]] for b in range(4)], dtype=torch.float64)
        assert torch.equal(flat, by_hand)
    assert torch.equal(flat_parameters(states[1:2])[0], many[1])  # a state alone: the same rows
    many[0][0, 0] = 99.0  # copies, not views of the state
    assert float(states[0]["w"][0, 0, 0]) != 99.0


def test_an_absurd_step_size_saturates_every_seed_and_a_sane_one_none(compose_config, tmp_path):
    """c_xi = 1e6: the first nu-step throws the reward to ~1e8 beta, pi*_nu underflows: saturated at step 1, the
    seed's last row; c_xi = 1e170: the exact metrics overflow (NaN) with finite parameters. The default c_xi on
    the same budget: every seed completed (the check does not flag everything)."""
    for c_xi, cause in (("1e6", "grad_sq = 0 exactly"), ("1e170", "not finite with finite parameters")):
        record = run_job(compose_config(TINY + [f"algorithm.c_xi={c_xi}"]), tmp_path / c_xi)
        frame = _frame(tmp_path / c_xi)
        for seed, st in record["status"].items():
            assert st["status"] == "saturated" and st["step"] == 1 and st["reason"].startswith(cause), st
            assert frame.loc[frame.seed == int(seed), "step"].max() == 1  # stopped: the detection row is the last
        assert objective_value(frame, record, "policy_gap") == math.inf  # a sweeper never prefers it
    record = run_job(compose_config(TINY), tmp_path / "sane")
    assert {st["status"] for st in record["status"].values()} == {"completed"}
    assert _last(_frame(tmp_path / "sane")).samples.min() >= 3000


def test_steps_that_underflow_to_zero_stall_every_seed(compose_config, tmp_path):
    """Step constants 5e-324: every step size is 0.0, the parameters never change: stalled since the first
    evaluation point of the first decade (step 1), rows kept to the end. Steps of 1e-200 move the parameters by
    ~1e-200 of their size: completed at stall_rtol=0 (they changed), stalled at stall_rtol=1e-12."""
    record = run_job(compose_config(TINY + ZERO_STEPS), tmp_path / "zero")
    frame = _frame(tmp_path / "zero")
    last_step = int(frame.step.max())
    for st in record["status"].values():
        assert st == {"status": "stalled", "step": 1, "reason": f"parameters unchanged from step 1 to step {last_step} "
                      "(largest relative change 0 <= health.stall_rtol = 0)"}
    assert _last(frame).samples.min() >= 3000  # a stalled seed runs to the end and keeps its rows
    tiny = ["algorithm.c_xi=1e-200", "algorithm.c_alpha=1e-200", "algorithm.c_alpha_z=1e-200"]
    moving = run_job(compose_config(TINY + tiny), tmp_path / "tiny")
    assert {st["status"] for st in moving["status"].values()} == {"completed"}
    slow = run_job(compose_config(TINY + tiny + ["health.stall_rtol=1e-12"]), tmp_path / "rtol")
    assert {st["status"] for st in slow["status"].values()} == {"stalled"}
    off = run_job(compose_config(TINY + ZERO_STEPS + ["health.enabled=false"]), tmp_path / "off")
    assert {st["status"] for st in off["status"].values()} == {"completed"}


@pytest.mark.parametrize("case", ["saturated", "stalled"])
def test_statuses_survive_checkpoint_and_resume(compose_config, tmp_path, monkeypatch, capsys, case):
    """Killed between two detections (saturated: the theorem regime on held-out instance 11, whose seeds
    saturate at different steps; stalled: after the first decade's snapshot), resumed: the same statuses and
    metrics as the uninterrupted run, and a finished run with such seeds is skipped, not recomputed."""
    overrides = (SMALL_BATCH + ["env.instance_seed=11", "budget.steps=1000"] if case == "saturated"
                 else TINY + ZERO_STEPS) + ["checkpoint_every_s=0"]
    kill_at = 300 if case == "saturated" else 20
    straight = run_job(compose_config(overrides), tmp_path / "straight")
    steps = sorted(st["step"] for st in straight["status"].values() if st["status"] == case)
    assert steps and (case == "stalled" or steps[0] < kill_at < steps[-1]), steps
    def interrupt(state):
        raise KeyboardInterrupt

    original = Bilevel.run_segment
    monkeypatch.setattr(Bilevel, "run_segment", at_step(Bilevel, kill_at, interrupt))  # the harness steps in segments
    with pytest.raises(KeyboardInterrupt):
        run_job(compose_config(overrides), tmp_path / "resumed")
    monkeypatch.setattr(Bilevel, "run_segment", original)
    resumed = run_job(compose_config(overrides), tmp_path / "resumed")
    assert "resuming" in capsys.readouterr().out and resumed["resumed_from_step"] > 0
    assert resumed["status"] == straight["status"]
    pd.testing.assert_frame_equal(_frame(tmp_path / "straight").drop(columns="wall_s"),
                                  _frame(tmp_path / "resumed").drop(columns="wall_s"), check_exact=True)
    run_job(compose_config(overrides), tmp_path / "resumed")
    assert "skipping" in capsys.readouterr().out and case in FINISHED


def test_the_small_batch_regime_leaves_no_broken_seed_completed(compose_config, tmp_path):
    """rate_bandit_small_batch's settings on held-out instance 11, 3000 steps. Reference: the same run with
    health.enabled=false. Every seed whose last reward_err is non-finite or whose last grad_sq is exactly 0 there is
    not completed here; the check changes nothing else (each seed's rows equal up to its saturation step)."""
    overrides = SMALL_BATCH + ["env.instance_seed=11", "budget.steps=3000"]
    checked = run_job(compose_config(overrides), tmp_path / "checked")["status"]
    unchecked = run_job(compose_config(overrides + ["health.enabled=false"]), tmp_path / "unchecked")["status"]
    assert {st["status"] for st in unchecked.values()} == {"completed"}
    ref, got = _frame(tmp_path / "unchecked"), _frame(tmp_path / "checked")
    last = _last(ref)
    broken = last.index[~np.isfinite(last.reward_err) | (last.grad_sq == 0)].tolist()
    assert broken, "the reference run has no broken seed: the test would prove nothing"
    assert all(checked[str(s)]["status"] != "completed" for s in broken), (broken, checked)
    saturated = [s for s, st in checked.items() if st["status"] == "saturated"]
    assert saturated
    for seed, st in checked.items():
        end = st["step"] if st["status"] == "saturated" else int(ref.step.max())
        mine = got[got.seed == int(seed)].drop(columns="wall_s").reset_index(drop=True)
        theirs = ref[(ref.seed == int(seed)) & (ref.step <= end)].drop(columns="wall_s").reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, theirs, check_exact=True)
    final = _last(got)
    completed = [int(s) for s, st in checked.items() if st["status"] == "completed"]
    assert np.isfinite(final.loc[completed, "reward_err"]).all() and (final.loc[completed, "grad_sq"] > 0).all()


def test_a_batched_family_decides_health_per_instance(compose_config, tmp_path):
    """instances=[11,12] as one batch: each instance's statuses are those of its own job (c_xi=1e6 saturates
    every seed at step 1; with the step constants at 5e-324 every seed stalls)."""
    for name, extra in (("saturating", ["algorithm.c_xi=1e6"]), ("frozen", ZERO_STEPS)):
        folders, _ = run_instances_or_skip(compose_config(TINY + extra + ["instances=[11,12]"]), tmp_path / name)
        for folder, record in folders:
            k = int(folder.name.split("_")[1])
            alone = run_job(compose_config(TINY + extra + [f"env.instance_seed={k}"]), tmp_path / f"{name}_{k}")
            assert record["status"] == alone["status"]
            assert {st["status"] for st in record["status"].values()} == {"saturated" if name == "saturating" else "stalled"}


@pytest.mark.parametrize("override,words", [
    ("health.stall_rtol=-1", ["health.stall_rtol", "[0, 1)"]),
    ("health.min_log_prob=1", ["health.min_log_prob", "< 0"]),
    ("health.max_abs_reward=0", ["health.max_abs_reward", "> 0"]),
    ("+health.bogus=1", ["health.bogus", "unknown key"]),
])
def test_bad_health_settings_are_refused_before_compute(expect_bad_input, override, words):
    expect_bad_input(["algorithm=bilevel", override], words)


def test_objective_counts_a_saturated_or_stalled_seed_as_not_completed():
    frame = pd.DataFrame({"seed": [0, 1], "samples": [10, 10], "policy_gap": [0.1, 0.2]})
    for status in ("saturated", "stalled"):
        record = {"seeds": [0, 1], "status": {"0": {"status": "completed"}, "1": {"status": status}}}
        assert objective_value(frame, record, "policy_gap") == math.inf
    record = {"seeds": [0, 1], "status": {"0": {"status": "completed"}, "1": {"status": "completed"}}}
    assert objective_value(frame, record, "policy_gap") == pytest.approx(0.15)


@pytest.mark.slow
@pytest.mark.parametrize("instance", [12, 13])
def test_the_theorem_regime_in_full_reports_every_broken_seed(compose_config, tmp_path, instance):
    """rate_bandit_small_batch's full settings (220,000 steps, 16 seeds) on a held-out instance: no seed whose last
    reward_err is non-finite or whose last grad_sq is exactly 0 is completed, and some seed is saturated."""
    record = run_job(compose_config(SMALL_BATCH + [f"env.instance_seed={instance}", "budget.steps=220000"]), tmp_path)
    status = record["status"]
    final = _last(_frame(tmp_path))
    broken = final.index[~np.isfinite(final.reward_err) | (final.grad_sq == 0)].tolist()
    assert all(status[str(s)]["status"] != "completed" for s in broken), status
    assert any(st["status"] == "saturated" for st in status.values())
    for seed, st in status.items():
        if st["status"] == "saturated":
            assert final.loc[int(seed), "step"] == st["step"]
    counts = pd.Series([st["status"] for st in status.values()]).value_counts().to_dict()
    print(f"instance {instance}: {counts}")  # the counts reported in docs/metrics.md (pytest -s)


def test_a_method_handed_the_true_reward_is_not_saturated_by_its_target(compose_config, tmp_path):
    """softmax_pg_exact's setting (beta = 0.001): pi* of the TRUE reward has log-probabilities near -4000, far below
    health.min_log_prob, by design; a method optimising the truth has no reward estimate whose pi* could
    underflow, so its seeds are judged on their own policy and metrics only and complete (before, every seed was
    `saturated` at step 0 by its target)."""
    from ratebench import envs
    from ratebench.config import compose
    from ratebench.envs import bandit
    from ratebench.envs.exact import soft_optimal

    problem = envs.make(bandit.BanditConfig(beta=0.001, instance_seed=7))
    assert float(soft_optimal(problem, problem.true_step_tables())[0][0].min()) < LOG_TINY  # the case is real
    cfg = compose_config(["algorithm=softmax_pg", "algorithm.oracle=exact", "algorithm.init_center=uniform",
                          "env.beta=0.001", "env.instance_seed=7", "seeds=[0,1]", "budget.steps=30",
                          "budget.evals_per_decade=4"])
    record = run_job(cfg, tmp_path / "softmax_pg")
    assert {st["status"] for st in record["status"].values()} == {"completed"}, record["status"]
