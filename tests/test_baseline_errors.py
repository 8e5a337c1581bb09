"""Bad input to the baselines: one message naming the field and the allowed values, exit 2 from the
`ratebench` command, before any compute, and no run folder left behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


RATEBENCH = str(Path(sys.executable).with_name("ratebench"))

CASES = [  # overrides, words the message must contain
    (["algorithm=dpo", "algorithm.loss=foo"], ["algorithm.loss", "'foo'", "sigmoid", "ipo", "hinge"]),
    (["algorithm=dpo", "algorithm.mode=batch"], ["algorithm.mode", "'batch'", "offline", "online", "iterative"]),
    (["algorithm=ppo_rlhf", "algorithm.mode=batch"], ["algorithm.mode", "'batch'", "offline", "online"]),
    (["algorithm=dpo", "algorithm.batch_pairs=64"],  # default first offline prefix: 32 pairs
     ["algorithm.batch_pairs", "algorithm.first_pairs=32", "<=", "64"]),
    (["algorithm=ppo_rlhf", "algorithm.batch_pairs=64", "algorithm.first_pairs=16"],
     ["algorithm.batch_pairs", "algorithm.first_pairs=16", "<=", "64"]),
    (["algorithm=dpo", "algorithm.beta=-1"], ["algorithm.beta", "> 0", "-1"]),
    (["algorithm=ppo_rlhf", "algorithm.rollouts=1"], ["algorithm.rollouts", ">= 2"]),
    (["algorithm=ppo_rlhf", "algorithm.pair_fraction=1.5"], ["algorithm.pair_fraction", "(0, 1)"]),
    (["algorithm=ppo_rlhf", "algorithm.gae_lambda=2"], ["algorithm.gae_lambda", "[0, 1]"]),
    (["algorithm=ppo_rlhf", "algorithm.clip=0"], ["algorithm.clip", "> 0"]),
]


@pytest.mark.parametrize("overrides, words", CASES[:3], ids=[" ".join(c[0]) for c in CASES[:3]])
def test_cli_exits_2_naming_the_field_and_allowed_values(overrides, words, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([RATEBENCH, "run", *overrides, f"hydra.run.dir={out}"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("ratebench: error: "), proc.stderr
    for word in words:
        assert word in proc.stderr, f"{word!r} missing from {proc.stderr!r}"
    assert not out.exists()


@pytest.mark.parametrize("overrides, words", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_in_process_exit_2(overrides, words, expect_bad_input):
    expect_bad_input(overrides, words)


def test_online_mode_has_no_dataset_so_any_batch_is_fine(compose_config):
    """The batch-vs-dataset check applies to the modes that train on a dataset only."""
    from ratebench.config import validate

    validate(compose_config(["algorithm=dpo", "algorithm.mode=online", "algorithm.batch_pairs=64"]))
    validate(compose_config(["algorithm=ppo_rlhf", "algorithm.reward_oracle=true", "algorithm.batch_pairs=64"]))
