"""Bad input: one message naming the field and what is allowed, exit 2, before any compute,
and no run folder left behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ratebench.cli import main

RATEBENCH = str(Path(sys.executable).with_name("ratebench"))

CASES = [  # overrides, words the message must contain
    (["env=foo"], ["env", "'foo'", "bandit", "mdp", "token"]),
    (["algorithm=bar"], ["algorithm", "'bar'", "reward_mle"]),
    (["env.beta=-1"], ["env.beta", "> 0", "-1"]),
    (["env.beta=0"], ["env.beta", "> 0"]),
    (["env.beta=inf"], ["env.beta", "finite"]),  # ran before: NaN j_star and policy_gap (issue 14, item 7)
    (["env.reward_scale=nan"], ["env.reward_scale", "finite"]),
    (["env.n_actions=1"], ["env.n_actions", ">= 2"]),
    (["env.n_contexts=1"], ["env.n_contexts", ">= 2"]),
    (["env=mdp", "env.n_states=1"], ["env.n_states", ">= 2"]),
    (["env=mdp", "env.horizon=1"], ["env.horizon", ">= 2"]),
    (["env=token", "env.vocab=1"], ["env.vocab", ">= 2"]),
    (["env=mdp", "env.n_states=10", "env.horizon=5"], ["env", "trajectory pairs", "env.max_pairs"]),
    (["env=token", "env.vocab=8", "env.length=5"], ["env", "trajectory pairs", "env.max_pairs"]),
    (["env=token", "env.vocab=50", "env.length=6"], ["env", "env.max_states"]),
    (["model.policy.width=0"], ["model.policy.width", ">= 1"]),
    (["model.reward.width=0"], ["model.reward.width", ">= 1"]),
    (["model.reward.kind=cnn"], ["model.reward.kind", "mlp", "linear"]),
    (["env.beta=abc"], ["env.beta", "abc"]),
    (["env.teacher=quadratic"], ["env.teacher", "linear", "neural"]),
    (["env.label_noise=0.7"], ["env.label_noise", "[0, 0.5)"]),
    (["seeds=[1,1]"], ["seeds", "repeat"]),
    (["n_seeds=0"], ["n_seeds", ">= 1"]),
    (["budget.samples=0"], ["budget.samples", ">= 1"]),
    (["algorithm.batch_pairs=0"], ["algorithm.batch_pairs", ">= 1"]),
    (["nonexistent=3"], ["nonexistent"]),
]


@pytest.mark.parametrize("overrides, words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_names_the_field_and_exits_2(overrides, words, expect_bad_input):
    expect_bad_input(overrides, words)


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["run", f"hydra.run.dir={blocker}/run"])
    err = capsys.readouterr().err
    assert code == 2 and "hydra.run.dir" in err and "not a folder" in err
    assert blocker.read_text() == "not a folder"


def test_sweep_with_one_bad_value_is_refused_before_any_job(tmp_path, capsys):
    code = main(["run", "-m", "env.beta=1.0,-2.0", f"hydra.sweep.dir={tmp_path}/sweep"])
    assert code == 2 and "env.beta" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "run, fit, plot, check, report" in capsys.readouterr().err


def test_console_script_exit_code_is_2(tmp_path):
    """The installed `ratebench` command, not just main(): exit status 2, message on stderr."""
    proc = subprocess.run([RATEBENCH, "run", "env.beta=-1", f"hydra.run.dir={tmp_path}/x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ratebench: error: env.beta: must be > 0, got -1.0"
    assert not (tmp_path / "x").exists()
