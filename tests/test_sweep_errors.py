"""Bad sweep input (duplicate seeds, n_seeds < 1, unknown launcher, bad checkpoint interval):
one message naming the field and what is allowed, exit 2, nothing created."""
from __future__ import annotations

import pytest

from ratebench.cli import main

CASES = [  # overrides, words the message must contain
    (["seeds=[0,1,0]"], ["seeds", "repeat", "[0]"]),
    (["-m", "seeds=[2,2],[0,1]"], ["seeds", "repeat", "[2]"]),
    (["n_seeds=0"], ["n_seeds", ">= 1", "0"]),
    (["-m", "n_seeds=2,-1"], ["n_seeds", ">= 1", "-1"]),
    (["-m", "hydra/launcher=foo"], ["launcher", "'", "foo", "basic", "joblib", "submitit_local", "submitit_slurm"]),
    (["hydra/launcher=foo"], ["launcher", "foo", "joblib", "submitit_slurm"]),
    (["checkpoint_every_s=-1"], ["checkpoint_every_s", ">= 0"]),
    (["threads=0"], ["threads", ">= 1"]),
    (["step_threads=-1"], ["step_threads", ">= 0", "-1"]),
    (["-m", "experiment=tune_compare_dpo", "hydra/launcher=basic"],  # a key the chosen launcher lacks
     ["hydra.launcher.n_jobs", "BasicLauncherConf"]),
    (["objective=polcy_gap"], ["objective", "polcy_gap", "policy_gap", "target_policy_gap_excess"]),
]


@pytest.mark.parametrize("overrides,words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_sweep_input_exits_2_naming_the_field(overrides, words, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["run", *overrides, f"hydra.sweep.dir={out}", f"hydra.run.dir={out}"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("ratebench: error:") and len(err.strip().splitlines()) == 1, err
    for word in words:
        assert word in err, f"{word!r} not in {err!r}"
    assert not out.exists()


@pytest.mark.parametrize("overrides,why", [(["experiment=smoke_bilevel"], "hydra.mode: MULTIRUN"),
                                           (["-m", "env.beta=0.5,1.0", "budget.samples=200"], "-m")])
def test_a_sweep_given_only_hydra_run_dir_is_refused_naming_hydra_sweep_dir(overrides, why, tmp_path, capsys,
                                                                            monkeypatch):
    """A sweep writes under hydra.sweep.dir (default multirun/) and Hydra ignores hydra.run.dir: a sweep given only
    hydra.run.dir would have written where the user did not look. Refused before any job starts."""
    import ratebench.app

    monkeypatch.chdir(tmp_path)
    started = []
    monkeypatch.setattr(ratebench.app, "hydra_entry", lambda: started.append(True))
    out = tmp_path / "mine"
    code = main(["run", *overrides, f"hydra.run.dir={out}"])
    err = capsys.readouterr().err
    assert code == 2 and not started, err
    assert err.startswith("ratebench: error: hydra.run.dir:") and len(err.strip().splitlines()) == 1, err
    assert why in err and "hydra.sweep.dir=DIR" in err
    assert not out.exists() and not (tmp_path / "multirun").exists()
    # with hydra.sweep.dir the sweep goes where it is told: it starts
    assert main(["run", *overrides, f"hydra.run.dir={out}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]) == 0 and started
