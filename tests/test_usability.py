"""Issue 15 on a real tiny sweep (reward_mle, env.beta=0.5,1.0, 2 seeds, 2,000 samples, made once):
sweep folders named by the swept value, re-runs skip, fit tables and exports name the β groups."""
from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from ratebench.analysis import commands
from ratebench.cli import main as cli_main

SWEEP = ["run", "-m", "env.beta=0.5,1.0", "budget.samples=2000", "n_seeds=2", "env.n_contexts=2", "env.n_actions=3",
         "env.feature_dim=2"]  # a small bandit: its exact F* takes no time


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("beta_sweep")
    assert cli_main([*SWEEP, f"hydra.sweep.dir={root}"]) == 0
    return root


def test_sweep_folders_are_named_by_the_swept_value_and_rerun_skips(sweep, capsys):
    dirs = sorted(p.parent for p in sweep.rglob("run.json"))
    assert [d.name.split("-")[0] for d in dirs] == ["env.beta=0.5", "env.beta=1.0"]
    for d in dirs:
        assert d.name.endswith(json.loads((d / "run.json").read_text())["run_hash"])
    capsys.readouterr()
    assert cli_main([*SWEEP, f"hydra.sweep.dir={sweep}"]) == 0
    out = capsys.readouterr().out
    assert all(f"skipping {d}: completed" in out for d in dirs), out
    assert "ratebench: sweep of 2 jobs: 0 done, 2 skipped, 0 resumed, 0 failed" in out  # the summary line


def test_a_sweep_set_by_the_config_is_named_and_summarised_like_run_m(sweep, capsys):
    """`hydra.mode: MULTIRUN` from the config (as the rate_* experiment files set it, no -m on the
    command line) names job folders by the swept values too: this re-run finds the -m sweep's folders."""
    args = [a for a in SWEEP if a != "-m"] + ["hydra.mode=MULTIRUN", f"hydra.sweep.dir={sweep}"]
    capsys.readouterr()
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "ratebench: sweep of 2 jobs: 0 done, 2 skipped, 0 resumed, 0 failed" in out, out
    assert sorted(p.parent.name.split("-")[0] for p in sweep.rglob("run.json")) == ["env.beta=0.5", "env.beta=1.0"]


def test_fit_by_beta_shows_the_beta_column_and_labels(sweep, capsys):
    assert commands.main("fit", [str(sweep), "--metric", "reward_err", "--by", "cfg.env.beta", "--n-boot", "200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "env.beta" in lines[1].split()
    assert lines[2].split()[:2] == ["env.beta=0.5", "0.5"] and lines[3].split()[:2] == ["env.beta=1", "1.0"]
    assert commands.main("fit", [str(sweep), "--metric", "reward_err", "--json", "--n-boot", "200"]) == 0
    assert [r["label"] for r in json.loads(capsys.readouterr().out)] == ["env.beta=0.5", "env.beta=1"]


def test_fit_exports_csv_that_parses_and_latex(sweep, capsys):
    assert commands.main("fit", [str(sweep), "--metric", "reward_err", "--format", "csv", "--n-boot", "200"]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(frame["label"]) == ["env.beta=0.5", "env.beta=1"] and len(frame) == 2
    assert {"p", "p_low", "p_high", "n_seeds", "config_hash"} <= set(frame.columns) and frame["p"].dtype == float
    assert commands.main("fit", [str(sweep), "--metric", "reward_err", "--format", "latex", "--n-boot", "200"]) == 0
    latex = capsys.readouterr().out
    assert latex.startswith("\\begin{table}") and "\\toprule" in latex and "env.beta=0.5 &" in latex
    assert "p̂" not in latex and "\\hat p" in latex


def test_api_walkthrough_runs_and_returns_dataframes(sweep, tmp_path, monkeypatch):
    """docs/api.md: its bash block is this module's sweep; its Python blocks run, in order."""
    text = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text()
    (bash,) = re.findall(r"```bash\n(.*?)\n```", text, re.DOTALL)
    assert bash.split() == ["ratebench", *SWEEP, "hydra.sweep.dir=runs/beta"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "beta").symlink_to(sweep)
    namespace: dict = {}
    blocks = re.findall(r"```python\n(.*?)\n```", text, re.DOTALL)
    assert len(blocks) >= 6
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - the page's own code
    for name in ("table", "diff", "curve"):
        assert isinstance(namespace[name], pd.DataFrame), name
    assert namespace["verdict"].verdict == "INCONCLUSIVE"
    assert "reward_err_vs_samples.png" in [p.name for p in namespace["paths"]]


def test_api_refuses_bad_fit_options_like_the_cli(sweep):
    """analysis.fit(..., n_boot=5) silently gave NaN CIs; the API now has the CLI's bounds."""
    from ratebench import analysis

    for options, words in (({"n_boot": 5}, "--n-boot must be in"), ({"reach": 3.0}, "--reach must be in"),
                           ({"min_decades": -1}, "--min-decades must be >= 0"), ({"nboot": 500}, "unknown fit option")):
        with pytest.raises(commands.BadInput, match=words):
            analysis.fit(sweep, metric="reward_err", **options)
