"""Tuning through Hydra's Optuna sweeper (issue 13 item 3): a job returns its `objective` (the mean over
seeds of the final value of a metric, +inf if a seed did not complete) and the sweeper's best trial is
the run folder with the smallest such value, recomputed here from the folders' own files."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from ratebench.cli import main
from ratebench.core.records import objective_value


def _record(status: dict) -> dict:
    return {"seeds": [int(s) for s in status], "status": {str(s): {"status": v} for s, v in status.items()}}


def test_objective_is_the_mean_final_value_and_inf_when_a_seed_did_not_complete():
    frame = pd.DataFrame({"seed": [0, 0, 1, 1, 2, 2], "samples": [10, 20, 20, 10, 10, 20],
                          "policy_gap": [0.5, 0.1, 0.3, 0.9, 0.4, 0.2]})
    # seed 1's rows are out of order: its final value (samples = 20) is 0.3, not its last row's 0.9
    assert objective_value(frame, _record({0: "completed", 1: "completed", 2: "completed"}), "policy_gap") == \
        pytest.approx((0.1 + 0.3 + 0.2) / 3, abs=1e-15)
    assert objective_value(frame, _record({0: "completed", 1: "diverged", 2: "completed"}), "policy_gap") == np.inf
    assert objective_value(frame, _record({0: "completed", 1: "completed", 2: "completed", 3: "completed"}),
                           "policy_gap") == np.inf  # a seed without rows
    broken = frame.assign(policy_gap=[0.5, np.nan, 0.3, 0.9, 0.4, 0.2])
    assert objective_value(broken, _record({0: "completed", 1: "completed", 2: "completed"}), "policy_gap") == np.inf


def test_the_optuna_sweepers_best_trial_is_the_folder_with_the_lowest_objective(tmp_path):
    out = tmp_path / "tune"
    code = main(["run", "-m", "experiment=tune_compare_dpo", "budget.samples=400", "n_seeds=2",
                 "hydra.sweeper.n_trials=3", "hydra.sweeper.n_jobs=1", "hydra.launcher.n_jobs=1", "progress=false",
                 f"hydra.sweep.dir={out}"])
    assert code == 0
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    trials = []
    for run_json in sorted(out.glob("*/run.json")):
        record = json.loads(run_json.read_text())
        metrics = pd.read_parquet(run_json.parent / "metrics.parquet")
        trials.append((objective_value(metrics, record, "policy_gap"), record["config"]["algorithm"]["lr"], record))
    assert len(trials) == 3 and len({t[1] for t in trials}) == 3  # three distinct step sizes were tried
    value, lr, record = min(trials, key=lambda t: t[0])
    assert best["best_value"] == pytest.approx(value, rel=1e-12)
    assert best["best_params"]["algorithm.lr"] == pytest.approx(lr, rel=1e-12)
    assert record["config"]["tuning_instances"] == [0] and record["config"]["env"]["instance_seed"] == 0


def test_an_interpolated_override_is_resolved_against_the_whole_config():
    """The tuning files tie one constant to another (`c_alpha_z: ${algorithm.c_alpha}`): the typed copy of
    the node resolves it from the root, and the run is the same run as with the value written out."""
    from ratebench.config import compose, validate
    from ratebench.runner import resolve

    tied = compose(["algorithm=bilevel", "algorithm.c_alpha=5.0", "algorithm.c_alpha_z=${algorithm.c_alpha}"])
    assert validate(tied).algorithm.c_alpha_z == 5.0
    explicit = compose(["algorithm=bilevel", "algorithm.c_alpha=5.0", "algorithm.c_alpha_z=5.0"])
    assert resolve(tied)[2] == resolve(explicit)[2]
