"""`ratebench fit | plot | report` on synthetic run folders with known exponents: the JSON
contract, divergence shown in the table, bad input (exit 2), figures and the report files."""
from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from ratebench.analysis import commands
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run
from ratebench.cli import main as cli_main

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")  # numerical trouble is a status, never a warning

X = evaluation_grid(1e5)


@pytest.fixture(scope="module")
def two_algorithms(tmp_path_factory):
    """alg_fast: b = 1 (p = 1), alg_slow: b = 0.5 (p = 2), 2 runs × 6 seeds each; one alg_slow
    seed diverges half way."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(3)
    for name, b in (("alg_fast", 1.0), ("alg_slow", 0.5)):
        for r in range(2):
            vals = synthetic_values(X, b, 6, rng)
            if name == "alg_slow" and r == 1:
                vals[0, 25:] = np.inf
            write_run(root / name / f"job{r}", X, vals, list(range(6 * r, 6 * r + 6)), metric="gap",
                      algorithm=name, env="bandit", config={"algorithm": {"name": name}, "env": {"name": "bandit"}},
                      experiment="none")
    return root


def test_fit_json_contract_and_known_exponents(two_algorithms, capsys):
    assert commands.main("fit", [str(two_algorithms), "--json"]) == 0
    rows = {r["algorithm"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"alg_fast", "alg_slow"}
    for r in rows.values():
        assert {"algorithm", "env", "metric", "x", "p", "p_low", "p_high", "n_seeds"} <= set(r)
        assert r["metric"] == "gap" and r["x"] == "samples" and r["env"] == "bandit"
        assert r["p_low"] <= r["p"] <= r["p_high"]
    assert rows["alg_fast"]["p_low"] <= 1.0 <= rows["alg_fast"]["p_high"]
    assert rows["alg_slow"]["p_low"] <= 2.0 <= rows["alg_slow"]["p_high"]
    assert rows["alg_fast"]["n_seeds"] == 12 and rows["alg_slow"]["n_diverged"] == 1
    assert rows["alg_slow"]["n_seeds"] == 12  # the diverged seed is kept (censored), not dropped


def test_fit_table_shows_diverged_seeds_and_sensitivity(two_algorithms, capsys):
    assert commands.main("fit", [str(two_algorithms), "--sensitivity", "--n-boot", "300"]) == 0
    out = capsys.readouterr().out
    slow = next(line for line in out.splitlines() if line.strip().startswith("algorithm=alg_slow"))
    assert re.search(r"\b12\s+1\s+0\s+ok", slow), slow  # seeds 12, diverged 1, failed 0
    assert "window sensitivity" in out and "decades=3.0" in out


@pytest.mark.parametrize("args,needle", [
    (["--metric", "wrong"], "allowed: gap"),
    (["--by", "nonsense"], "--by: unknown column"),
    (["--n-boot", "5"], "--n-boot"),
])
def test_fit_bad_input_exits_2_with_one_message(two_algorithms, capsys, args, needle):
    assert commands.main("fit", [str(two_algorithms), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_help_works_for_every_command(capsys):
    for command in ("fit", "plot", "check", "report"):
        assert cli_main([command, "--help"]) == 0
        assert f"ratebench {command}" in capsys.readouterr().out


def test_plot_writes_png_and_pdf_per_metric(two_algorithms, tmp_path, capsys):
    assert commands.main("plot", [str(two_algorithms), "--out", str(tmp_path), "--n-boot", "300"]) == 0
    for ext in ("png", "pdf"):
        f = tmp_path / f"gap_vs_samples.{ext}"
        assert f.exists() and f.stat().st_size > 10_000
    assert (tmp_path / "gap_vs_samples.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "gap_vs_samples.pdf").read_bytes()[:4] == b"%PDF"


def test_report_is_self_contained_with_verdict_and_hashes(two_algorithms, tmp_path):
    claim = tmp_path / "fast.yaml"
    claim.write_text("id: fast_is_linear\nsource: test\nalgorithm: alg_fast\nexperiment: none\nmetric: gap\n"
                     "x: samples\nexponent: 1.5\nrelation: upper_bound\nepsilon: {unit: gap, min: 1.0e-4, max: 1.0}\n")
    slow = tmp_path / "slow.yaml"
    slow.write_text(claim.read_text().replace("fast_is_linear", "slow_claim").replace("alg_fast", "alg_slow"))
    out = tmp_path / "rep"
    assert commands.main("report", [str(two_algorithms), "--claims", str(claim), str(slow), "--out", str(out),
                                    "--n-boot", "300"]) == 0
    page, md = (out / "report.html").read_text(), (out / "report.md").read_text()
    for text in (page, md):
        assert "fast_is_linear" in text and "PASS" in text and "never a proof" in text
        run = json.loads((two_algorithms / "alg_fast" / "job0" / "run.json").read_text())
        assert run["config_hash"] in text
    for text in (page, md):  # the diverged seed is listed with its run and step
        assert f"{two_algorithms / 'alg_slow' / 'job1'} seed 6: diverged at step 25" in text
        assert "slow_claim" in text and "VIOLATED" in text  # p = 2 > 1.5
    assert re.search(r"^ratebench \S+ · commit \S+ · \d{4}-\d\d-\d\d \d\d:\d\d UTC · `ratebench report ", md, re.M)
    assert "| group | p̂ | 95% CI |" in md and "algorithm=alg_fast" in md  # real tables, groups named
    assert md.count("```") == 4  # only the recorded commands of the two claims are code blocks
    assert "<span class='PASS'>PASS</span>" in page and ".PASS{background:" in page  # coloured badges
    assert "2 runs, 12 seeds" in md or "4 runs, 24 seeds" in md
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert images and base64.b64decode(images[0])[:4] == b"\x89PNG"
    assert "src=\"figures" not in page  # nothing linked from the HTML: one file


def test_fit_counts_bit_identical_seeds_of_one_run_once(tmp_path, capsys):
    """A run whose 16 seeds are 8 curves, each twice (a deterministic method), is fitted as the run of the 8
    distinct curves: the same p̂, CI and n_seeds (the dedupe of check and report, groups.distinct_curves), and
    the output says how many were dropped."""
    vals = synthetic_values(X, 1.0, 8, np.random.default_rng(5))
    config = {"algorithm": {"name": "alg"}, "env": {"name": "bandit"}}
    write_run(tmp_path / "distinct" / "job", X, vals, list(range(8)), metric="gap", algorithm="alg", env="bandit",
              config=config)
    write_run(tmp_path / "copies" / "job", X, np.vstack([vals, vals]), list(range(16)), metric="gap",
              algorithm="alg", env="bandit", config=config)
    rows = {}
    for name in ("distinct", "copies"):
        assert commands.main("fit", [str(tmp_path / name), "--json", "--n-boot", "400"]) == 0
        [rows[name]] = json.loads(capsys.readouterr().out)
    want, got = rows["distinct"], rows["copies"]
    assert (got["p"], got["p_low"], got["p_high"], got["n_seeds"]) == \
        (want["p"], want["p_low"], want["p_high"], want["n_seeds"]) and want["n_seeds"] == 8
    assert (got["n_copies"], want["n_copies"]) == (8, 0)
    assert commands.main("fit", [str(tmp_path / "copies"), "--n-boot", "400"]) == 0
    assert "8 seed(s) with bit-identical curves in one run counted once (8 distinct seeds fitted)" in capsys.readouterr().out
