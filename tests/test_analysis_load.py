"""Loading run records: the tidy table, flattened config columns, seed statuses (diverged seeds
counted, never dropped), and broken records (warned and skipped, or an error with --strict)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from ratebench.analysis import commands
from ratebench.analysis.load import RunRecordError, load, load_runs, load_seed_status
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # numerical trouble is a status, never a warning

X = evaluation_grid(1e4)


def make_runs(root, n_runs=3, seeds_per_run=4, diverge=None, b=1.0, metric="gap"):
    """n_runs runs of one configuration; diverge = (run, seed index, point index) gets +inf from there."""
    rng = np.random.default_rng(0)
    cfg = {"algorithm": {"name": "synthetic", "batch_pairs": 4}, "env": {"name": "synthetic", "beta": 0.5},
           "budget": {"samples": 10000}, "tags": ["a", "b"]}
    for r in range(n_runs):
        vals = synthetic_values(X, b, seeds_per_run, rng)
        if diverge and diverge[0] == r:
            vals[diverge[1], diverge[2]:] = np.inf
        seeds = list(range(r * seeds_per_run, (r + 1) * seeds_per_run))
        write_run(root / f"job{r}", X, vals, seeds, metric=metric, config=cfg)
    return root


def test_tidy_table_has_one_row_per_seed_and_point_with_config_columns(tmp_path):
    make_runs(tmp_path)
    frame = load_runs(tmp_path)
    assert len(frame) == 3 * 4 * len(X)
    for col in ("algorithm", "env", "experiment", "config_hash", "run_hash", "run_dir", "status", "gap",
                "samples", "cfg.algorithm.batch_pairs", "cfg.env.beta", "cfg.budget.samples", "cfg.tags"):
        assert col in frame.columns, col
    assert (frame["cfg.env.beta"] == 0.5).all() and (frame["cfg.tags"] == '["a", "b"]').all()
    assert frame["config_hash"].nunique() == 1 and frame["run_hash"].nunique() == 3
    assert frame.groupby(["run_dir", "seed"]).size().eq(len(X)).all()
    assert len(load_seed_status(tmp_path)) == 12


def test_diverged_seed_is_counted_with_its_step_and_has_no_rows_after(tmp_path):
    make_runs(tmp_path, diverge=(1, 2, 10))
    seeds = load_seed_status(tmp_path)
    bad = seeds[seeds["status"] == "diverged"]
    assert len(seeds) == 12 and len(bad) == 1
    assert bad["seed"].item() == 6 and bad["status_step"].item() == 10 and bad["n_points"].item() == 10
    frame = load_runs(tmp_path)
    assert (frame[frame["seed"] == 6]["status"] == "diverged").all()
    assert frame[frame["seed"] == 6]["samples"].max() == X[9]


def test_seed_without_any_row_is_still_in_the_status_table(tmp_path):
    make_runs(tmp_path, n_runs=1, diverge=(0, 0, 0))  # diverged before the first evaluation
    seeds = load_seed_status(tmp_path)
    assert len(seeds) == 4 and seeds.set_index("seed").at[0, "n_points"] == 0
    assert seeds.set_index("seed").at[0, "status"] == "diverged"


@pytest.mark.parametrize("damage", ["truncate_parquet", "garbage_parquet", "truncate_json", "missing_parquet"])
def test_broken_record_warns_naming_the_file_and_the_rest_is_analysed(tmp_path, damage):
    make_runs(tmp_path)
    bad = tmp_path / "job1"
    if damage == "truncate_parquet":
        data = (bad / "metrics.parquet").read_bytes()
        (bad / "metrics.parquet").write_bytes(data[: len(data) // 2])
    elif damage == "garbage_parquet":
        (bad / "metrics.parquet").write_bytes(b"not a parquet file at all")
    elif damage == "truncate_json":
        text = (bad / "run.json").read_text()
        (bad / "run.json").write_text(text[: len(text) // 2])
    else:
        (bad / "metrics.parquet").unlink()
    with pytest.warns(UserWarning, match=str(bad)):
        loaded = load(tmp_path)
    assert sorted(set(loaded.seeds["run_dir"])) == [str(tmp_path / "job0"), str(tmp_path / "job2")]
    assert len(loaded.skipped) == 1 and str(bad) in loaded.skipped[0][0]
    with pytest.raises(RunRecordError, match=str(bad)):
        load(tmp_path, strict=True)


def test_fit_warns_on_broken_record_and_strict_exits_2(tmp_path, capsys):
    make_runs(tmp_path, n_runs=3, seeds_per_run=4)
    (tmp_path / "job2" / "metrics.parquet").write_bytes(b"PAR1 truncated")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the command reports on stderr, it does not leak warnings
        assert commands.main("fit", [str(tmp_path), "--json", "--n-boot", "200"]) == 0
    captured = capsys.readouterr()
    assert str(tmp_path / "job2" / "metrics.parquet") in captured.err
    rows = json.loads(captured.out)
    assert len(rows) == 1 and rows[0]["n_seeds"] == 8  # the other two runs are analysed
    assert commands.main("fit", [str(tmp_path), "--strict"]) == 2
    err = capsys.readouterr().err
    assert "job2" in err and err.count("\n") == 1


def test_empty_or_missing_directory_is_bad_input(tmp_path, capsys):
    assert commands.main("fit", [str(tmp_path)]) == 2
    assert "no runs found" in capsys.readouterr().err
    assert commands.main("fit", [str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
