"""State you can trust (issue 14), one test (or more) per numbered break: a finished run of another
configuration is not replaced silently (3); results and checkpoints are verified before they are
reused (4, 5); resource bounds and unknown keys are refused from the config alone (6, 7); exit codes
(8). Kills, signals and write points: test_fault_injection.py; sweep workers: test_sweep_workers.py;
random inputs: test_fuzz_inputs.py."""
from __future__ import annotations

import json
from pathlib import Path

from ratebench.cli import main


def test_a_finished_run_of_another_config_is_not_replaced_silently(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "budget.samples=200", "n_seeds=2", f"hydra.run.dir={out}"]) == 0
    first = json.loads((out / "run.json").read_text())
    before = (out / "metrics.parquet").read_bytes()
    capsys.readouterr()
    code = main(["run", "algorithm=bilevel", "budget.samples=200", "n_seeds=2", f"hydra.run.dir={out}"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "hydra.run.dir" in lines[0] and first["run_hash"] in lines[0], err
    assert "overwrite=true" in lines[0]
    assert json.loads((out / "run.json").read_text()) == first and (out / "metrics.parquet").read_bytes() == before
    # the same config again is a skip, not a refusal
    assert main(["run", "budget.samples=200", "n_seeds=2", f"hydra.run.dir={out}"]) == 0
    assert "skipping" in capsys.readouterr().out
    # an explicit overwrite replaces it
    assert main(["run", "algorithm=bilevel", "budget.samples=200", "n_seeds=2", "overwrite=true",
                 f"hydra.run.dir={out}"]) == 0
    assert json.loads((out / "run.json").read_text())["algorithm"] == "bilevel"


# --- item 4: run.json records metrics.parquet's sha256 and rows; the skip and `fit` verify them ------------

SMALL = ["budget.samples=300", "seeds=[0,1]"]


def _tamper(parquet):
    """Rewrite metrics.parquet with its last rows dropped: a table that parses but is not the run's."""
    import pandas as pd

    frame = pd.read_parquet(parquet)
    frame.iloc[:-4].to_parquet(parquet, index=False)


def test_a_tampered_metrics_file_is_recomputed_not_skipped(compose_config, tmp_path, capsys):
    import hashlib

    import pandas as pd
    import pytest

    from ratebench.runner import run_job

    out = tmp_path / "run"
    record = run_job(compose_config(SMALL), out)
    original = pd.read_parquet(out / "metrics.parquet").drop(columns="wall_s")
    assert record["metrics_sha256"] == hashlib.sha256((out / "metrics.parquet").read_bytes()).hexdigest()
    assert record["metrics_rows"] == len(original)
    _tamper(out / "metrics.parquet")
    capsys.readouterr()
    with pytest.warns(UserWarning, match="recomputing .*does not match run.json"):
        again = run_job(compose_config(SMALL), out)
    assert "skipping" not in capsys.readouterr().out
    assert again["resumed_from_step"] is None
    pd.testing.assert_frame_equal(pd.read_parquet(out / "metrics.parquet").drop(columns="wall_s"), original,
                                  check_exact=True)


def test_fit_warns_and_skips_records_that_fail_validation(compose_config, tmp_path, capsys):
    """A metrics.parquet that does not match its run.json, and a run.json of the wrong shape, are warned
    about (naming the file) and skipped; the good run is fitted (exit 0). Before: the first was used
    as if whole, the second crashed with a traceback."""
    import shutil

    from ratebench.runner import run_job

    good, tampered, shapeless = tmp_path / "good", tmp_path / "tampered", tmp_path / "shapeless"
    run_job(compose_config(SMALL), good)
    shutil.copytree(good, tampered)
    _tamper(tampered / "metrics.parquet")
    shutil.copytree(good, shapeless)
    record = json.loads((good / "run.json").read_text())
    (shapeless / "run.json").write_text(json.dumps({**record, "seeds": "0,1", "status": ["completed"]}))
    capsys.readouterr()
    code = main(["fit", str(tmp_path), "--metric", "reward_err", "--n-boot", "100", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    warnings_ = [ln for ln in err.splitlines() if ln.startswith("warning: skipping run")]
    assert len(warnings_) == 2, err
    assert any(str(tampered / "metrics.parquet") in w and "does not match" in w for w in warnings_)
    assert any(str(shapeless / "run.json") in w and "wrong shape" in w for w in warnings_)
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["n_seeds"] == 2


# --- item 5: checkpoint checksum; F* cache entries validated ----------------------------------------------

def _flip_bytes_in_tensor_data(path, n=8):
    """Flip one byte in each of the n largest tensor records of checkpoint.pt (a torch zip archive)."""
    import io
    import zipfile

    raw = bytearray(path.read_bytes())
    start = raw.index(b"PK\x03\x04")  # the torch payload (after ratebench's checksum line, if any)
    with zipfile.ZipFile(io.BytesIO(bytes(raw[start:]))) as archive:
        infos = sorted((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: -i.file_size)[:n]
        for info in infos:
            local = bytes(raw[start + info.header_offset: start + info.header_offset + 30])
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            data = start + info.header_offset + 30 + name_len + extra_len
            raw[data + info.file_size - 1] ^= 0x40  # the top byte of the last value: sign/exponent of a float
    path.write_bytes(bytes(raw))
    return len(infos)


def test_a_corrupted_checkpoint_is_discarded_not_resumed(compose_config, tmp_path, monkeypatch, recwarn):
    """8 flipped bytes in checkpoint.pt: the job starts over with a warning, and its curve is the
    uninterrupted one (before: it resumed into a different curve)."""
    import pandas as pd
    import pytest

    from ratebench.algorithms.reward_mle import RewardMLE
    from ratebench.runner import run_job

    overrides = [*SMALL, "checkpoint_every_s=0"]
    run_job(compose_config(overrides), tmp_path / "straight")
    original = RewardMLE.step

    def killed_at_step_20(self, state, sampler):
        if state.t == 20:
            raise KeyboardInterrupt
        return original(self, state, sampler)

    monkeypatch.setattr(RewardMLE, "step", killed_at_step_20)
    with pytest.raises(KeyboardInterrupt):
        run_job(compose_config(overrides), tmp_path / "run")
    monkeypatch.setattr(RewardMLE, "step", original)
    assert _flip_bytes_in_tensor_data(tmp_path / "run" / "checkpoint.pt") == 8
    record = run_job(compose_config(overrides), tmp_path / "run")
    assert any("discarding checkpoint" in str(w.message) for w in recwarn.list)
    assert record["resumed_from_step"] is None
    curve = lambda d: pd.read_parquet(d / "metrics.parquet").drop(columns="wall_s")  # noqa: E731
    pd.testing.assert_frame_equal(curve(tmp_path / "run"), curve(tmp_path / "straight"), check_exact=True)


def test_fstar_cache_entries_are_validated_and_recomputed(tmp_path):
    """An F* cache entry edited to NaN, or raised above F(nu_true), is recomputed with a warning (a NaN
    F* gave all-NaN gaps; F* + 0.5 gave negative gaps, accepted)."""
    import math

    import pytest

    from ratebench import envs
    from ratebench.config import compose, plain, validate
    from ratebench.fstar import reference, true_objective

    v = validate(compose(["env.n_contexts=2", "env.n_actions=3"]))
    problem, env = envs.make(v.env), plain(v.env)
    good = reference(problem, env, str(tmp_path))
    entry_path = next(tmp_path.glob("fstar-*.json"))
    f_true = true_objective(problem)
    for edit in (lambda e: {**e, "f_star": float("nan")}, lambda e: {**e, "f_star": e["f_star"] + 0.5,
                                                                      "f_star_local": e["f_star_local"] + 0.5}):
        entry = json.loads(entry_path.read_text())
        entry_path.write_text(json.dumps(edit(entry)))
        with pytest.warns(UserWarning, match="recomputing the global reference"):
            ref = reference(problem, env, str(tmp_path))
        assert math.isfinite(ref.value) and ref.value == good.value <= f_true
        assert json.loads(entry_path.read_text())["f_star"] == good.value  # the cache is repaired


# --- items 6 and 7: resource bounds and unknown keys, from the config alone, exit 2, nothing made ----------

def test_out_of_bounds_configs_exit_2_naming_the_knob_estimate_and_limit(expect_bad_input, monkeypatch):
    monkeypatch.setenv("RATEBENCH_MEMORY_LIMIT", "1G")
    expect_bad_input(["n_seeds=100000000"], ["n_seeds", "estimated peak memory", "TB", "limit 859 MB"])
    expect_bad_input(["algorithm=bilevel", "model.reward.width=100000000"],
                     ["model.reward.width", "estimated peak memory", "limit 859 MB"])
    expect_bad_input(["algorithm=bilevel", "algorithm.batch_traj=1000000000", "algorithm.batch_pairs=1000000000"],
                     ["algorithm.batch", "step batches", "estimated peak memory", "limit 859 MB"])  # passed before
    expect_bad_input(["budget.evals_per_decade=1000000000"],  # hung before
                     ["budget.evals_per_decade", "4.3e+09 evaluation points", "at most 10000"])
    expect_bad_input(["+budget.sampels=1000"], ["budget.sampels", "unknown key", "did you mean budget.samples"])
    expect_bad_input(["+env.bta=2"], ["env.bta", "did you mean env.beta"])


def test_fit_caps_n_boot(tmp_path, capsys):
    code = main(["fit", str(tmp_path), "--n-boot", "100000000"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "--n-boot" in err and "100000]" in err and "100000000" in err, err


# --- item 8: exit codes: 2 bad input, 3 internal error (one line + traceback file), never a bare 1 ----------

def test_bad_files_and_folders_exit_2_before_compute(tmp_path, capsys, monkeypatch):
    from ratebench.analysis import commands

    claim = tmp_path / "claim.yaml"
    claim.write_bytes(b"id: x\nsource: \xff\xfe\n")
    assert main(["check", str(claim), "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(claim) in err and "UTF-8" in err, err

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setattr(commands, "fit_groups", lambda *a, **k: pytest_fail("plot computed before checking --out"))
    assert main(["plot", str(tmp_path), "--out", str(blocker / "figures")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out" in err and "not a folder" in err, err

    out = tmp_path / "run"
    monkeypatch.setenv("RATEBENCH_CACHE", str(blocker))  # a cache "folder" that cannot be read as one
    assert main(["run", "budget.samples=300", f"hydra.run.dir={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "RATEBENCH_CACHE" in err and str(blocker) in err, err
    assert not out.exists()  # no half-made output folder


def pytest_fail(message):
    import pytest

    pytest.fail(message)


def test_an_internal_error_exits_3_with_one_line_and_the_traceback_file(tmp_path, capsys, monkeypatch):
    from ratebench.algorithms.reward_mle import RewardMLE

    def broken(self, state, sampler):
        raise RuntimeError("an injected bug")

    monkeypatch.setattr(RewardMLE, "step", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    code = main(["run", "budget.samples=300", "n_seeds=2", f"hydra.run.dir={tmp_path / 'run'}"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 3
    assert len(err) == 1 and err[0].startswith("ratebench: internal error: RuntimeError: an injected bug"), err
    saved = Path(err[0].rsplit("traceback written to ", 1)[1])
    assert saved.parent == tmp_path and "Traceback" in saved.read_text() and "an injected bug" in saved.read_text()
    record = json.loads((tmp_path / "run" / "run.json").read_text())  # the failure is recorded, not lost
    assert {st["status"] for st in record["status"].values()} == {"failed"}


def test_a_failed_job_does_not_stop_its_sweep_and_sets_the_exit_status(tmp_path, capsys, monkeypatch):
    """A job that fails inside a sweep (here an injected bug in the middle job) leaves its status in
    the outcome log; the launcher runs the other jobs, and the sweep exits with the failure's 3."""
    import tempfile

    from ratebench import runner

    original = runner.run_or_skip

    def fails_for_301(cfg, out_dir, experiment=None):
        if cfg.budget.samples == 301:
            raise RuntimeError("an injected bug")
        return original(cfg, out_dir, experiment)

    monkeypatch.setattr(runner, "run_or_skip", fails_for_301)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # the traceback file goes under tmp_path
    sweep = tmp_path / "sweep"
    code = main(["run", "-m", "budget.samples=300,301,302", "n_seeds=2", "env.n_contexts=2", "env.n_actions=3",
                 f"hydra.sweep.dir={sweep}"])
    out = capsys.readouterr().out
    assert code == 3
    assert "ratebench: sweep of 3 jobs: 2 done, 0 skipped, 0 resumed, 1 failed" in out, out
    finished = sorted(json.loads(p.read_text())["config"]["budget"]["samples"] for p in sweep.rglob("run.json"))
    assert finished == [300, 302]


def test_a_sweep_removes_the_outcome_logs_of_killed_sweeps_and_its_own(tmp_path, monkeypatch):
    """A sweep killed by SIGKILL or SIGTERM never removes its outcome log; the next sweep removes the logs of
    launchers that no longer run, never a running launcher's, and its own when it ends."""
    import os
    import subprocess
    import sys
    import tempfile

    from ratebench import cli
    from ratebench.app import SWEEP_LOG_ENV

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.delenv(SWEEP_LOG_ENV, raising=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    killed = tmp_path / f"ratebench-sweep-{int(gone.stdout)}-x1.jsonl"  # its launcher has exited
    running = tmp_path / f"ratebench-sweep-{os.getppid()}-x2.jsonl"  # a launcher that still runs
    other = tmp_path / "ratebench-sweep-notes.jsonl"  # not named by a pid: not ours to judge
    for log in (killed, running, other):
        log.write_text('{"job": "j", "outcome": "done", "code": 0}\n')
    cli._start_sweep_log()
    mine = Path(os.environ[SWEEP_LOG_ENV])
    assert mine.parent == tmp_path and mine.name.startswith(f"ratebench-sweep-{os.getpid()}-")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, running.name, other.name])
    assert cli._print_sweep_summary() == 0 and not mine.exists()


def test_check_passes_on_the_status_of_a_failed_experiment_run(tmp_path, monkeypatch, capsys):
    """check runs its experiment in a child `ratebench run`; an internal error (3) or a signal (130,
    143) there is that status, not "bad input" (2), and never 1 (a verdict)."""
    import subprocess

    from ratebench import experiments
    from ratebench.analysis import commands

    for status in (3, 130, 143):
        monkeypatch.setattr(experiments.subprocess, "run", lambda cmd, status=status, **kw: subprocess.CompletedProcess(cmd, status))
        code = commands.main("check", ["control", "--workdir", str(tmp_path / str(status)), "--no-premise"])
        assert code == status, capsys.readouterr().err
        assert not (tmp_path / str(status) / "control_bandit" / ".complete").exists()
