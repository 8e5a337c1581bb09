"""The commands a new user tries first (issue 15, item 3): --version, list, check by claim name from
any folder, ratebench's own `run --help`, and shell completion that answers a query."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import ratebench
import ratebench.conf
import yaml
from ratebench.algorithms import ALGORITHMS
from ratebench.analysis.claims import find_claim
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run
from ratebench.cli import main
from ratebench.envs import ENVIRONMENTS

CONF = Path(ratebench.conf.__file__).parent


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"ratebench {ratebench.__version__}"


def test_list_names_every_shipped_algorithm_env_experiment_and_claim(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("  ")}
    shipped = {p.stem for sub in ("algorithm", "env", "experiment", "claims") for p in (CONF / sub).glob("*.yaml")}
    assert shipped <= listed and set(ALGORITHMS) <= listed and set(ENVIRONMENTS) <= listed
    for line in out.splitlines():
        if line.startswith("  "):
            assert len(line.split(None, 1)) == 2, f"no description: {line!r}"
    assert main(["list", "claims"]) == 0
    claims = capsys.readouterr().out
    assert "[id control_reward_mle, polynomial] Known-rate control" in claims and "algorithms" not in claims
    assert main(["list", "nonsense"]) == 2 and "allowed: algorithms, envs" in capsys.readouterr().err


def test_check_finds_a_claim_by_name_or_id_from_another_folder(tmp_path, monkeypatch, capsys):
    assert find_claim("control", CONF / "claims") == CONF / "claims" / "control.yaml"
    assert find_claim("control_reward_mle", CONF / "claims") == CONF / "claims" / "control.yaml"
    assert find_claim("my/own.yaml", CONF / "claims") == Path("my/own.yaml")
    monkeypatch.chdir(tmp_path)
    runs = tmp_path / "runs"
    runs.mkdir()
    x = evaluation_grid(1e3)
    write_run(runs / "r", x, synthetic_values(x, 1.0, 4, np.random.default_rng(0)), [0, 1, 2, 3])
    code = main(["check", "control", "--runs", str(runs), "--n-boot", "100"])
    out = capsys.readouterr()
    assert code == 1 and "cannot read claim file" not in out.err, out.err  # found; no evidence: INCONCLUSIVE
    assert "control_reward_mle" in out.out and "no runs of experiment 'control_bandit'" in out.out


def test_run_help_is_ratebenchs_own(capsys):
    with pytest.raises(SystemExit) as exc:  # Hydra exits after printing its help
        main(["run", "--help"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("ratebench run:") and "Config groups" in out and "env.instance_seed=K" in out
    assert "  algorithm=   bilevel, bilevel_benchopt" in out
    assert "_schema" not in out and "Examples:" in out and "--multirun,-m" in out


def test_shell_completion_installs_for_ratebench_and_answers_a_query(capsys, monkeypatch):
    assert main(["-sc", "install=bash"]) == 0
    script = capsys.readouterr().out
    assert script.rstrip().endswith("-F hydra_bash_completion ratebench") and "query=bash" in script
    monkeypatch.setenv("COMP_LINE", "ratebench run env=")
    assert main(["-sc", "query=bash"]) == 0
    assert capsys.readouterr().out.split() == [f"env={name}" for name in sorted(yaml.safe_load(
        (CONF / "env" / f"{n}.yaml").read_text())["name"] for n in ENVIRONMENTS)]
    monkeypatch.setenv("COMP_LINE", "ratebench li")
    assert main(["-sc", "query=bash"]) == 0 and capsys.readouterr().out.split() == ["list"]


def test_plot_and_report_take_claim_names_like_check(tmp_path, monkeypatch):
    """`report --claims control` from any folder: the same claim lookup as check (claims.find_claim)."""
    import numpy as np

    from ratebench.analysis import commands
    from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
    from ratebench.synthetic_runs import write_run

    x = evaluation_grid(1e4)
    write_run(tmp_path / "runs" / "r", x, synthetic_values(x, 1.0, 4, np.random.default_rng(0)), list(range(4)),
              metric="reward_err", algorithm="reward_mle", env="bandit")
    monkeypatch.chdir(tmp_path)
    assert [c.id for c in commands.named_claims(["control", "control_reward_mle_a075"])] == [
        "control_reward_mle", "control_reward_mle_a075"]
    assert commands.main("report", ["runs", "--claims", "control", "--no-premise", "--n-boot", "100"]) == 0
    assert "control_reward_mle" in (tmp_path / "runs" / "report" / "report.md").read_text()
