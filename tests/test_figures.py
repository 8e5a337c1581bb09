"""Figures (issue 15, item 2) on synthetic groups in-process: colour, one legend entry per group plus
one shared key, extra pages instead of a silent drop, claim slopes only on their own algorithm's
figures, the fitted floor drawn, readable labels, and the interval (forest) plot of p̂."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pytest
from ratebench.analysis import commands, plots
from ratebench.analysis.claims import parse_claim
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.load import load
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run

N_GROUPS = 8  # one more than an axis shows


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    """N_GROUPS configurations of one algorithm differing in c_xi (decay n^-b, b from 0.5 to 1.2);
    the third one has an error floor 3e-3."""
    root = tmp_path_factory.mktemp("groups")
    x = evaluation_grid(3e4)
    rng = np.random.default_rng(0)
    for i, b in enumerate(np.linspace(0.5, 1.2, N_GROUPS)):
        values = synthetic_values(x, b, 6, rng) + (3e-3 if i == 2 else 0.0)
        write_run(root / f"g{i}", x, values, list(range(6)), metric="gap", algorithm="bilevel", env="bandit",
                  config={"algorithm": {"name": "bilevel", "c_xi": float(i + 1)}, "env": {"name": "bandit"}})
    results = commands.fit_groups(load(root), "gap", "samples", ["algorithm", "env", "config_hash"],
                                  FitOptions(n_boot=200))
    return root, results


def claim(algorithm: str):
    return parse_claim({"id": f"c_{algorithm}", "source": "test", "algorithm": algorithm, "experiment": "none",
                        "metric": "gap", "x": "samples", "exponent": 3.5, "relation": "upper_bound",
                        "epsilon": {"unit": "gap", "min": 1e-4, "max": 0.1}})


def test_png_has_colour(groups, tmp_path):
    _, results = groups
    paths = plots.metric_figure(results[:2], [claim("bilevel")], tmp_path)
    assert [p.name for p in paths] == ["gap_vs_samples.png", "gap_vs_samples.pdf"]
    image = mpimg.imread(paths[0])[..., :3]
    spread = image.max(axis=2) - image.min(axis=2)  # 0 for grey pixels
    assert (spread > 0.3).mean() > 0.002, "no coloured pixels"


def test_one_legend_entry_per_group_one_shared_key_and_no_group_dropped(groups, monkeypatch):
    _, results = groups
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, stem, formats=(): saved.append((stem, fig)) or [])
    plots.metric_figure(results, [claim("bilevel")], "unused")
    assert [stem for stem, _ in saved] == ["gap_vs_samples", "gap_vs_samples_page2"]  # 7 + 1: none dropped
    (_, first), (_, second) = saved
    group_legend, key_legend = first.legends
    texts = [t.get_text() for t in group_legend.get_texts()]
    assert len(texts) == plots.MAX_GROUPS and len(second.legends[0].get_texts()) == N_GROUPS - plots.MAX_GROUPS
    assert [t.split()[0] for t in texts[:3]] == ["algorithm.c_xi=1", "algorithm.c_xi=2", "algorithm.c_xi=3"]
    assert texts[0].startswith("algorithm.c_xi=1  (n=6)") and "p̂ = " in texts[0]
    keys = [t.get_text() for t in key_legend.get_texts()]
    assert len(keys) == len(plots.key_entries(True, [claim("bilevel")], any_floor=True))
    assert "median over seeds (thin)" in keys and "fitted floor ĉ" in keys
    assert sum("fitting window" in k for k in texts + keys) == 1  # the marker convention, once
    assert any("claim c_bilevel: N(ε) ∝ ε^-3.5" in k for k in keys)
    assert not any("−1/" in k or "0 + " in k for k in texts + keys)
    floor_lines = [ln for ln in first.axes[0].get_lines() if len(ln.get_xdata()) == 2
                   and ln.get_ydata()[0] == ln.get_ydata()[1]]
    assert results[2][1].c > 0 and np.isclose(floor_lines[0].get_ydata()[0], results[2][1].c)  # dashed floor


def test_claim_slopes_only_on_figures_of_the_claims_algorithm(groups):
    _, results = groups
    assert plots.claims_for(results, [claim("bilevel"), claim("reward_mle")]) == [claim("bilevel")]
    kl = parse_claim({"id": "k", "source": "t", "algorithm": "bilevel", "experiment": "none", "metric": "kl_ref",
                      "x": "samples", "exponent": 1, "relation": "upper_bound",
                      "epsilon": {"unit": "kl_ref", "min": 1e-4, "max": 0.1}})
    assert plots.claims_for(results, [kl]) == []


def test_interval_plot_shows_every_group_with_its_ci(groups, tmp_path):
    _, results = groups
    paths = plots.interval_figure(results, [claim("bilevel")], tmp_path)
    assert [p.name for p in paths] == ["gap_vs_samples_p_intervals.png", "gap_vs_samples_p_intervals.pdf"]
    rows = plots.interval_rows(results)
    assert len(rows) == N_GROUPS and all(lo <= p <= hi for _, p, lo, hi, _ in rows)
    image = mpimg.imread(paths[0])[..., :3]
    assert ((image.max(axis=2) - image.min(axis=2)) > 0.3).any()


def test_tick_labels_are_plain_powers_of_ten():
    assert plots.power_of_ten(1e-3) == "10⁻³" and plots.power_of_ten(100.0) == "10²" and plots.power_of_ten(3.0) == ""


def test_minor_tick_labels_of_an_axis_within_a_decade_are_plain_text():
    """Where a log axis spans under a decade matplotlib labels its minor ticks; log_ticks keeps which, as Unicode
    (no mathtext: no `$`), with the values they stand for."""
    fig, ax = plt.subplots()
    ax.set_yscale("log")
    plots.log_ticks(ax.yaxis)
    ax.set_ylim(1.5e-3, 8e-3)
    fig.canvas.draw()
    labels = {round(t.get_loc(), 12): t.label1.get_text() for t in ax.yaxis.get_minor_ticks() if t.label1.get_text()}
    plt.close(fig)
    assert labels and not any("$" in text for text in labels.values())
    for value, text in labels.items():
        coeff, exponent = text.split("×10")
        assert float(coeff) * 10.0 ** int(exponent.translate(str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789"))) == \
            pytest.approx(value, rel=1e-9)


def _boxes(fig):
    renderer = fig.canvas.get_renderer()
    return [item.get_window_extent(renderer) for item in (*fig.legends, *fig.axes)]


@pytest.mark.parametrize("draw", ["metric", "runtime"])
def test_legends_never_overlap_each_other_or_the_panels(groups, monkeypatch, draw):
    """The groups' legend and the key sit below the panels; long group names push the key below the groups'
    legend instead of under its text (the main job's figure had them overlapping)."""
    _, results = groups
    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, out, stem, formats=(): saved.append(fig) or [])
    long_names = [({**key, "label": f"{key['label']} " + "with a long configuration name " * 8}, fit, curves)
                  for key, fit, curves in results[:2]]
    for chosen in (results[:2], long_names):
        if draw == "metric":
            plots.metric_figure(chosen, [claim("bilevel")], "unused")
        else:
            plots.runtime_figure(chosen, "unused")
    short, long = saved
    for fig in saved:
        (groups_box, key_box, *panels) = _boxes(fig)
        assert not groups_box.overlaps(key_box), (groups_box, key_box)
        assert all(box.y1 <= min(p.y0 for p in panels) for box in (groups_box, key_box))
    (groups_box, key_box, *_) = _boxes(short)
    assert np.isclose(groups_box.y1, key_box.y1) and groups_box.x1 < key_box.x0  # side by side when they fit
    (groups_box, key_box, *_) = _boxes(long)
    assert key_box.y1 <= groups_box.y0 and groups_box.x1 > _boxes(short)[1].x0  # stacked: they would have overlapped
