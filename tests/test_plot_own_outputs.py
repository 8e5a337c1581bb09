"""`ratebench plot` and `report` on what the suite itself produces (issue 14, item 1): the README's
main job (`ratebench run algorithm=bilevel`, whose kl_ref starts at exactly 0 and grows), a run with
3 seeds (a group with a finite p̂ but no ok fit), and metrics that are zero or negative everywhere.
Every figure is written and every panel's log axis holds only positive data."""
from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
from ratebench.analysis import commands, plots
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run
from ratebench.cli import main as cli_main


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The README's main command, smaller: bilevel on the default bandit."""
    root = tmp_path_factory.mktemp("main_job")
    runs = {}
    for n_seeds in (8, 3):
        out = root / f"seeds{n_seeds}"
        assert cli_main(["run", "algorithm=bilevel", f"n_seeds={n_seeds}", "budget.samples=4000",
                         f"hydra.run.dir={out}"]) == 0
        runs[n_seeds] = out
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("n_seeds", [8, 3])
def test_plot_and_report_on_the_main_job(main_job, n_seeds, capsys):
    run = main_job[n_seeds]
    assert commands.main("plot", [str(run), "--n-boot", "200"]) == 0
    written = {p.name for p in (run / "figures").glob("*.png")}
    for metric in ("gap", "grad_sq", "policy_gap", "psi_gap", "reward_err", "kl_ref"):
        assert f"{metric}_vs_samples.png" in written, (metric, written)
    assert commands.main("report", [str(run), "--n-boot", "200"]) == 0
    assert (run / "report" / "report.html").stat().st_size > 1000
    assert (run / "report" / "report.md").exists()
    # the report's folder holds the figures report.md links (report.html embeds the same), and nothing else
    linked = set(re.findall(r"\]\(figures/([^)]+)\)", (run / "report" / "report.md").read_text()))
    assert linked and {p.name for p in (run / "report" / "figures").iterdir()} == linked
    capsys.readouterr()


def _axes_after_draw(results, claims):
    fig, (left, right) = plt.subplots(1, 2)
    plots.draw_curves(left, results, claims)
    plots.draw_nhit(right, results, claims)
    return fig, left, right


def _fit_results(tmp_path, values, metric):
    x = evaluation_grid(1e4)
    write_run(tmp_path / "run", x, values(x), list(range(6)), metric=metric)
    from ratebench.analysis.load import load

    loaded = load(tmp_path)
    from ratebench.analysis.fit import FitOptions

    return commands.fit_groups(loaded, metric, "samples", ["algorithm", "env", "config_hash"], FitOptions(n_boot=100))


@pytest.mark.parametrize("fill", [0.0, -1.0])
def test_non_positive_metric_gets_a_linear_axis_not_a_crash(tmp_path, fill):
    results = _fit_results(tmp_path, lambda x: np.full((6, len(x)), fill), "gap")
    fig, left, right = _axes_after_draw(results, [])
    fig.tight_layout()  # raised "Data cannot be log-scaled" before
    assert left.get_yscale() == "linear" and right.get_yscale() == "linear"
    assert any("no positive values" in t.get_text() for t in left.texts)
    plt.close(fig)


def test_positive_curves_keep_log_axes_and_only_positive_points(tmp_path):
    rng = np.random.default_rng(0)

    def values(x):
        v = synthetic_values(x, 0.5, 6, rng)
        v[:, 1] = 0.0  # an exact zero at one point must not force a linear axis
        return v

    results = _fit_results(tmp_path, values, "gap")
    fig, left, right = _axes_after_draw(results, [])
    assert left.get_yscale() == "log" and right.get_yscale() == "log"
    for ax in (left, right):
        for line in ax.get_lines():
            y = np.asarray(line.get_ydata(), float)
            assert not (np.isfinite(y) & (y <= 0)).any(), line.get_label()
    plt.close(fig)


def test_growing_metric_has_no_rate_panel_and_no_decay_line(tmp_path):
    results = _fit_results(tmp_path, lambda x: np.tile(1 - 1 / np.maximum(x, 1.0), (6, 1)), "kl_ref")
    paths = plots.metric_figure(results, [], tmp_path / "fig")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    fig, ax = plt.subplots()
    plots.draw_curves(ax, results, [])
    assert not any("fit" in str(line.get_label()) for line in ax.get_lines())
    plt.close(fig)


def test_profile_panel_draws_the_fits_local_exponents(tmp_path):
    rng = np.random.default_rng(4)
    results = _fit_results(tmp_path, lambda x: synthetic_values(x, 0.5, 6, rng), "gap")
    fit = results[0][1]
    prof = fit.arrays["profile"]
    assert len(prof) >= 2
    fig, ax = plt.subplots()
    plots.draw_profile(ax, results, [])
    (line,) = [ln for ln in ax.get_lines() if "local p" in str(ln.get_label())]
    np.testing.assert_allclose(line.get_xdata(), 1 / prof["eps_center"].to_numpy())
    np.testing.assert_allclose(line.get_ydata(), prof["p"].to_numpy())
    plt.close(fig)
