"""logger=tensorboard (issue 15, item 8): every evaluation point reaches TensorBoard while the run
goes; off by default; the logger never changes the run's identity (run_hash)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from ratebench.cli import main

SMALL = ["budget.samples=2000", "n_seeds=2", "env.n_contexts=2", "env.n_actions=3", "env.feature_dim=2"]


def test_unknown_logger_is_refused_before_compute(tmp_path, capsys):
    assert main(["run", "logger=wandb", f"hydra.run.dir={tmp_path / 'r'}"]) == 2
    assert "logger: unknown logger 'wandb'; allowed: none, tensorboard" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_tensorboard_gets_every_evaluation_point(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    plain, logged = tmp_path / "plain", tmp_path / "logged"
    assert main(["run", *SMALL, f"hydra.run.dir={plain}"]) == 0
    assert main(["run", *SMALL, "logger=tensorboard", f"hydra.run.dir={logged}"]) == 0
    assert not (plain / "tensorboard").exists()  # off by default
    events = EventAccumulator(str(logged / "tensorboard"))
    events.Reload()
    points = sorted(pd.read_parquet(logged / "metrics.parquet")["samples"].unique())
    median = events.Scalars("reward_err/median")
    assert [e.step for e in median] == points
    assert {"gap/median", "reward_err/seed_0", "reward_err/seed_1"} <= set(events.Tags()["scalars"])
    hashes = [json.loads((d / "run.json").read_text())["run_hash"] for d in (plain, logged)]
    assert hashes[0] == hashes[1]  # watching a run is not another run
