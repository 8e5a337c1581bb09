"""The job's progress line and log: no ETA until enough steps are timed (the README's main job showed
"ETA 611s" at its start, a first step's one-off costs extrapolated), then an ETA that matches the time the
job actually has left, evaluations and steps timed apart; and app.log carries the run's lines."""
from __future__ import annotations

import numpy as np
import pytest
from ratebench.cli import main
from ratebench.evaluation import evaluation_points
from ratebench.progress import ETA_MIN_SECONDS, ETA_MIN_STEPS, Progress, Timing

BUDGET, PER_STEP = 200_000, 80  # samples, samples per step
FIRST_STEP_S, STEP_S = 3.0, 0.004  # the first step carries one-off costs (first calls, caches)
FIRST_EVAL_S, EVAL_S = 1.0, 0.02


def simulate():
    """A job as the runner drives it: an evaluation at 0 and whenever a step crosses an evaluation point (one
    evaluation however many points it crosses), progress.update after every step. Yields (samples, timing,
    now, true seconds left); the clock is simulated, so the truth is exact."""
    points = evaluation_points(BUDGET, 10)
    now = algo = evals = 0.0
    samples, step, next_point, first = 0, 0, 0, True
    events = []

    def evaluate():
        nonlocal now, evals, next_point, first
        cost = FIRST_EVAL_S if first else EVAL_S
        first = False
        now += cost
        evals += cost
        while next_point < len(points) and points[next_point] <= samples:
            next_point += 1

    evaluate()
    events.append((samples, Timing(step, algo, evals, len(points) - next_point), now))
    while samples < BUDGET:
        cost = FIRST_STEP_S if step == 0 else STEP_S
        now += cost
        algo += cost
        samples, step = samples + PER_STEP, step + 1
        if (next_point < len(points) and samples >= points[next_point]) or samples >= BUDGET:
            evaluate()
        events.append((samples, Timing(step, algo, evals, len(points) - next_point), now))
    end = now
    return [(s, t, at, end - at) for s, t, at in events]


def test_no_eta_until_enough_is_timed_then_the_time_actually_left():
    clock = [0.0]
    progress = Progress("test", BUDGET, enabled=False, clock=lambda: clock[0])
    shown, naive = [], []
    for samples, timing, now, left in simulate():
        clock[0] = now
        progress.update(samples, timing=timing)
        eta = progress.eta(samples, timing, now)
        if eta is None:
            assert timing.step <= ETA_MIN_STEPS or now < ETA_MIN_SECONDS, (samples, timing)
        else:
            shown.append((samples, eta, left))
            naive.append((BUDGET - samples) * now / samples)  # the old ETA: the cumulative rate extrapolated
    assert shown, "an ETA must appear once enough steps are timed"
    samples, eta, left = zip(*shown)
    rel = np.abs(np.array(eta) - np.array(left)) / np.array(left).clip(min=1e-9)
    late = np.array(left) > 1.0  # the last second: a few evaluations more or less are a large share of it
    assert rel[late].max() < 0.05, rel[late].max()
    # the scenario discriminates: extrapolating the cumulative rate is off by a factor at the first ETA shown
    assert abs(naive[0] - left[0]) / left[0] > 1.0


def test_the_first_line_has_no_eta(capsys, monkeypatch):
    monkeypatch.delenv("CI", raising=False)  # the suite sets CI=true: no progress on the console
    clock = [0.0]
    progress = Progress("test", BUDGET, enabled=True, clock=lambda: clock[0])
    for samples, timing, now, _ in simulate()[:3]:  # the start, the slow first step, one more step
        clock[0] = now
        progress.update(samples, timing=timing)
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("ETA      -" in line for line in lines), lines


@pytest.mark.parametrize("progress", ["true", "false"])
def test_app_log_carries_the_runs_lines(tmp_path, capsys, monkeypatch, progress):
    monkeypatch.delenv("CI", raising=False)
    out = tmp_path / "run"
    assert main(["run", "budget.samples=2000", "n_seeds=2", f"progress={progress}", f"hydra.run.dir={out}"]) == 0
    printed = capsys.readouterr().out
    log = (out / "app.log").read_text().splitlines()
    wrote = f"ratebench: wrote {out}/metrics.parquet and run.json (2,000 samples, 2 seeds)"
    assert wrote in printed and log[-1].endswith("- " + wrote), log[-1:]
    final = [line for line in log if "samples      2,000/2,000 (100.0%)" in line]
    assert len(final) == 1 and "[ratebench.run][INFO]" in final[0]
    assert sum("samples " in line for line in log) >= 4  # the start and each decade of samples, whatever the console
    assert ("(100.0%)" in printed) == (progress == "true")


def test_the_line_shows_the_medians_of_the_last_point_scored(tmp_path, monkeypatch):
    """The final line's medians (gap, policy_gap, reward_err: Progress.SHOWN, and no other metric) are those of the
    run's last evaluation point in metrics.parquet, 3 seeds (an odd count: torch's median is the middle value)."""
    import pandas as pd

    monkeypatch.delenv("CI", raising=False)
    out = tmp_path / "run"
    assert main(["run", "budget.samples=2000", "n_seeds=3", "progress=false", f"hydra.run.dir={out}"]) == 0
    final = [line for line in (out / "app.log").read_text().splitlines() if "(100.0%)" in line]
    frame = pd.read_parquet(out / "metrics.parquet")
    last = frame[frame["samples"] == frame["samples"].max()]
    assert len(final) == 1 and len(last) == 3
    shown = final[0].split("  median ")[1].split()
    assert shown == [f"{k}={float(last[k].median()):.3g}" for k in Progress.SHOWN]
