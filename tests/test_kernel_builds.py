"""Compilers started ahead (core/kernels.py start_build): a job starts the builds of its compiled step and of psi_gap's
Newton before it solves F-hat*, and load() waits for them instead of building again. A build nobody waits for is
stopped when the process ends, a failed one is reported by load() as any failed build, and a forked child never
touches its parent's compilers."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import pandas as pd
import pytest
from ratebench.algorithms.bilevel_kernel import SOURCE
from ratebench.core import kernels
from ratebench.envs.penalty import NEWTON_OPTIMISE, NEWTON_SOURCE


@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty kernels cache, and no build started, tried or loaded (load() is cached per process) for it; the
    process's loads are forgotten again afterwards, so that later tests load from their own cache folder."""
    monkeypatch.setenv("RATEBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels, "STARTED", {})
    monkeypatch.setattr(kernels, "ATTEMPTED", set())
    kernels.load.cache_clear()
    yield tmp_path / "kernels"
    kernels.load.cache_clear()


def count_builds(monkeypatch) -> list:
    """Every compiler process started from now on (kernels._Build), in a list."""
    made, original = [], kernels._Build.__init__

    def counted(self, *args):
        original(self, *args)
        made.append(self)

    monkeypatch.setattr(kernels._Build, "__init__", counted)
    return made


def test_load_waits_for_the_started_build_instead_of_building_again(fresh_cache, monkeypatch):
    made = count_builds(monkeypatch)
    kernels.start_build(NEWTON_SOURCE, NEWTON_OPTIMISE)
    kernels.start_build(NEWTON_SOURCE, NEWTON_OPTIMISE)  # already started: nothing more
    assert len(made) == 1 and made[0].process.poll() is None  # compiling in the background
    lib = kernels.load.__wrapped__(NEWTON_SOURCE, NEWTON_OPTIMISE)
    assert lib is not None and hasattr(lib, "split_newton")
    assert len(made) == 1 and kernels.BUILD_SECONDS["penalty_newton.c"] > 0 and not kernels.STARTED
    assert [p.name for p in fresh_cache.iterdir()] == [made[0].target.name]  # the library, no temporary file left
    kernels.start_build(NEWTON_SOURCE, NEWTON_OPTIMISE)  # cached now: nothing to start
    assert len(made) == 1 and not kernels.STARTED


def test_a_failed_started_build_is_reported_by_load_once_and_leaves_nothing(fresh_cache, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a compiler that fails every build
    made = count_builds(monkeypatch)
    kernels.start_build(SOURCE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # start_build itself says nothing
        kernels.start_build(SOURCE)
    with pytest.warns(UserWarning, match="could not build bilevel_step.c"):
        assert kernels.load.__wrapped__(SOURCE) is None
    assert len(made) == 1  # load waited for the started build rather than running the compiler again
    assert not list(fresh_cache.iterdir())
    kernels.start_build(SOURCE)  # load tried this one: not started again in this process
    assert len(made) == 1


def test_a_compiler_that_cannot_start_leaves_nothing_and_start_build_says_no(fresh_cache, monkeypatch, tmp_path):
    fresh_cache.mkdir()
    with pytest.raises(OSError):
        kernels._Build(str(tmp_path / "no-such-cc"), [], NEWTON_SOURCE, fresh_cache / "target.so")
    assert not list(fresh_cache.iterdir())  # no temporary file left behind
    monkeypatch.setattr(kernels, "_Build", lambda *args: (_ for _ in ()).throw(FileNotFoundError("no-such-cc")))
    assert kernels.start_build(NEWTON_SOURCE, NEWTON_OPTIMISE) is False and not kernels.STARTED


def test_a_started_build_runs_to_its_end_without_anyone_reading_its_messages(fresh_cache, monkeypatch, tmp_path):
    """A compiler that writes more than a pipe holds (64 KiB) to stderr still finishes before load() is called: its
    messages go to a file. (Through a pipe it would wait for a reader until load(), and the build would no longer
    overlap F-hat*.) The library then loads from that build."""
    chatty = tmp_path / "chatty-cc"
    chatty.write_text('#!/bin/sh\nhead -c 300000 /dev/zero | tr "\\0" w >&2\nexec cc "$@"\n')
    chatty.chmod(0o755)
    monkeypatch.setenv("CC", str(chatty))
    made = count_builds(monkeypatch)
    kernels.start_build(NEWTON_SOURCE, NEWTON_OPTIMISE)
    assert len(made) == 1
    made[0].process.wait(timeout=60)  # never returns (TimeoutExpired) if the compiler is stuck writing
    assert made[0].process.returncode == 0
    assert kernels.load.__wrapped__(NEWTON_SOURCE, NEWTON_OPTIMISE) is not None and len(made) == 1


def test_a_build_nobody_waits_for_is_stopped_when_the_process_ends(tmp_path):
    script = ("import sys, time; from ratebench.core import kernels; from ratebench.algorithms.bilevel_kernel import SOURCE; "
              "kernels.start_build(SOURCE); build = next(iter(kernels.STARTED.values())); time.sleep(0.2); "
              "assert build.process.poll() is None; print(build.process.pid)")  # still compiling when the process exits
    scratch = tmp_path / "tmp"  # the process's temporary folder: cc1 writes its assembly there
    scratch.mkdir()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "RATEBENCH_CACHE": str(tmp_path), "TMPDIR": str(scratch)})
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout)  # the compiler driver, leader of its own process group (cc1, as, ld: its passes)
    for _ in range(50):  # the passes it started are killed with it; their reaping may take a moment
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert not list((tmp_path / "kernels").iterdir())  # neither a temporary file nor a library
    assert not list(scratch.iterdir())  # nor a killed pass's intermediate file


def test_a_process_killed_outright_during_a_build_leaves_no_temporary_folder(tmp_path):
    """SIGKILL runs no exit handler: the compiler, in its own session, finishes alone, and its temporary folder (its
    passes' TMPDIR) is removed by the shell that runs it, not left in the system's temporary folder."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    script = ("import os, signal; from ratebench.core import kernels; from ratebench.algorithms.bilevel_kernel import "
              "SOURCE; kernels.start_build(SOURCE); build = next(iter(kernels.STARTED.values())); "
              "print(build.process.pid, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "RATEBENCH_CACHE": str(tmp_path), "TMPDIR": str(scratch)})
    assert done.returncode == -9, done.stderr
    pid = int(done.stdout)
    for _ in range(1200):  # the compiler runs to its end (~7 s here); no longer a process of ours to wait for
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    time.sleep(0.2)
    assert not list(scratch.iterdir())  # its folder went with it


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_forgets_its_parents_compilers(fresh_cache):
    kernels.start_build(NEWTON_SOURCE, NEWTON_OPTIMISE)
    assert len(kernels.STARTED) == 1
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing started, and its exit kills nothing
        os.write(write, str(len(kernels.STARTED)).encode())
        os._exit(0)
    os.close(write)
    assert os.read(read, 16) == b"0"
    os.waitpid(pid, 0)
    build = next(iter(kernels.STARTED.values()))
    assert build.process.poll() is None or build.process.returncode == 0  # the child's exit did not kill it
    assert kernels.load.__wrapped__(NEWTON_SOURCE, NEWTON_OPTIMISE) is not None


def test_a_cold_job_compiles_while_it_solves_f_star(compose_config, fresh_cache, monkeypatch, tmp_path, capsys):
    """At the moment F-hat* is solved, both compilers are running; the job then takes the compiled step and the
    compiled Newton, and its metrics equal those of the same job with every build done before it started. With
    progress on, the cold job says what its set-up does before it does it; the warm one says nothing of it."""
    from ratebench import runner

    monkeypatch.setenv("CI", "")  # the console of a user's `ratebench run` (progress on)

    seen, original = [], runner.reference

    def watched(*args, **kwargs):
        seen.append(sorted(t.name.split("-")[0] for t in kernels.STARTED))
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "reference", watched)
    cfg = compose_config(["algorithm=bilevel", "seeds=[0,1]", "budget.samples=3000"])
    record = runner.run_job(cfg, tmp_path / "cold")
    assert seen == [["bilevel_step", "penalty_newton"]]
    captured = capsys.readouterr()
    said = [line for line in captured.out.splitlines() if "first run here" in line]
    assert said == [("[bandit/bilevel cold] first run here: compiling bilevel_step.c, penalty_newton.c and solving the "
                     "global reference F* of this bandit instance (once: cached for later runs)")]
    assert record["provenance"]["step_path"] == "compiled" and record["provenance"]["psi_newton_path"] == "compiled"
    assert record["startup_wall_s"]["kernel"] >= 0 and not kernels.STARTED
    warm = runner.run_job(cfg, tmp_path / "warm")  # every build in place now: nothing started
    assert seen[-1] == [] and warm["provenance"]["step_path"] == "compiled"
    assert "first run here" not in capsys.readouterr().out
    monkeypatch.setenv("CI", "true")  # a new instance's F* to solve, but no console: nothing said
    runner.run_job(compose_config(["algorithm=bilevel", "seeds=[0]", "budget.samples=500", "env.instance_seed=7"]),
                   tmp_path / "quiet")
    assert "first run here" not in capsys.readouterr().out
    cold, again = (pd.read_parquet(tmp_path / name / "metrics.parquet").drop(columns="wall_s") for name in ("cold", "warm"))
    pd.testing.assert_frame_equal(cold, again, check_exact=True)
