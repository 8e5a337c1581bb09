"""Seed health in check, plot and report: unhealthy seeds (diverged, saturated, stalled) are counted
beside each other, a claim whose evidence holds more than its `max_unhealthy` share of them is
INCONCLUSIVE with that reason, figures draw each unhealthy seed and count them in the legend, and
the report lists them with their step and reason."""
from __future__ import annotations

import json

import matplotlib
import numpy as np
import pytest
from ratebench.analysis import commands, plots
from ratebench.analysis.claims import INCONCLUSIVE, PASS, parse_claim, verdict
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run
from ratebench.core.errors import ConfigError

from test_claims import base_claim, fake_fit

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
X = evaluation_grid(1e5)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "a lot", True])
def test_bad_max_unhealthy_is_named(bad):
    with pytest.raises(ConfigError) as info:
        parse_claim(base_claim(max_unhealthy=bad), "c.yaml")
    assert info.value.field == "c.yaml: max_unhealthy" and "[0, 1]" in str(info.value)


@pytest.mark.parametrize("diverged,saturated,stalled,want", [
    (0, 0, 0, PASS), (2, 1, 1, PASS),  # 4 of 16 = 25 %: at the limit, not above it
    (0, 3, 2, INCONCLUSIVE), (5, 0, 0, INCONCLUSIVE), (1, 1, 3, INCONCLUSIVE),
])
def test_more_unhealthy_seeds_than_the_claim_allows_is_inconclusive(diverged, saturated, stalled, want):
    claim = parse_claim(base_claim())  # max_unhealthy default 0.25
    fit = fake_fit(1.0, 0.9, 1.1, n_diverged=diverged, n_saturated=saturated, n_stalled=stalled,
                   n_unhealthy=diverged + saturated + stalled)
    v = verdict(claim, fit)
    assert v.verdict == want, v.reason
    if want == INCONCLUSIVE:
        bad = diverged + saturated + stalled
        assert v.reason.startswith(f"unhealthy seeds: {bad} of 16") and "max_unhealthy 25%" in v.reason
        for n, word in ((diverged, "diverged"), (saturated, "saturated"), (stalled, "stalled")):
            assert (f"{n} {word}" in v.reason) == bool(n)
    # a claim may allow more: the same fit passes under max_unhealthy 0.5 (none of these exceed 5 of 16)
    assert verdict(parse_claim(base_claim(max_unhealthy=0.5)), fit).verdict == PASS


def health_runs(root, statuses: dict[int, dict], n_seeds=12, budget=1e5, diverge=()):
    """One run of the control experiment with synthetic 1/t curves; `statuses` given per seed, `diverge`
    seeds get +inf from the middle on (recorded as diverged there)."""
    rng = np.random.default_rng(7)
    x = evaluation_grid(budget)
    values = synthetic_values(x, 1.0, n_seeds, rng, A=10.0)
    for s in diverge:
        values[s, len(x) // 2:] = np.inf
    write_run(root / "run", x, values, list(range(n_seeds)), metric="reward_err", algorithm="reward_mle",
              env="bandit", status={str(s): st for s, st in statuses.items()}, experiment="control_bandit")
    return root


def test_check_counts_unhealthy_seeds_and_refuses_a_verdict_on_many(tmp_path, capsys):
    health_runs(tmp_path, {}, diverge=(0, 1, 2, 3))  # 4 of 12 diverged: 33 % > 25 %
    code = commands.main("check", ["control", "--runs", str(tmp_path), "--json", "--n-boot", "200"])
    (row,) = json.loads(capsys.readouterr().out)
    assert code == 1 and row["verdict"] == INCONCLUSIVE and row["n_diverged"] == 4 and row["n_unhealthy"] == 4
    assert row["reason"].startswith("unhealthy seeds: 4 of 12 (33%: 4 diverged)"), row["reason"]
    commands.main("check", ["control", "--runs", str(tmp_path), "--n-boot", "200"])
    header, first = capsys.readouterr().out.splitlines()[:2]
    cols = header.split()
    assert cols[cols.index("diverged") + 1: cols.index("diverged") + 3] == ["saturated", "stalled"]


def test_figures_and_report_mark_unhealthy_seeds(tmp_path, capsys):
    statuses = {3: {"status": "saturated", "step": 40, "message": "reward_err became non-finite"},
                5: {"status": "stalled", "step": 55, "message": "grad_sq underflowed to 0"}}
    health_runs(tmp_path, statuses, diverge=(0,))
    from ratebench.analysis.commands import fit_groups, load_dir
    from ratebench.analysis.fit import FitOptions

    loaded = load_dir(tmp_path, False)
    results = fit_groups(loaded, "reward_err", "samples", ["algorithm", "env", "config_hash"], FitOptions(n_boot=200))
    (key, fit, curves), = results
    assert plots.health_counts(curves) == {"diverged": 1, "saturated": 1, "stalled": 1}
    fig, ax = matplotlib.pyplot.subplots()
    plots.draw_curves(ax, results, [])
    traced = [ln for ln in ax.get_lines() if ln.get_gid() == plots.UNHEALTHY_GID]
    # every unhealthy seed that has values in the fitted matrix gets its own trace
    status = curves.seeds["status"].to_numpy()[curves.used]
    assert len(traced) == int(np.isin(status, plots.UNHEALTHY).sum()) >= 1
    entry = plots.group_entry(key, fit, "k", "-", "o", health=plots.health_counts(curves))
    assert "(n=" in entry.get_label() and "1 diverged, 1 saturated, 1 stalled)" in entry.get_label()
    matplotlib.pyplot.close(fig)
    assert commands.main("report", [str(tmp_path), "--claims", "control", "--n-boot", "200", "--no-premise"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "1 diverged, 1 saturated, 1 stalled, 0 failed" in md  # the summary line
    run_dir = tmp_path / "run"
    assert f"{run_dir} seed 3: saturated at step 40 (reward_err became non-finite)" in md
    assert f"{run_dir} seed 5: stalled at step 55 (grad_sq underflowed to 0)" in md
