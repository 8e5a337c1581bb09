"""The Python API's figures and verdict numbers: analysis.plot writes what `ratebench plot` writes (the same
PNG bytes), and a Verdict's p, CI, window and counts are those of the fit the verdict was decided on, as
the lower-level evaluate_claim and verdict_row compute them."""
from __future__ import annotations

import math

import numpy as np
import pytest
from ratebench import analysis
from ratebench.analysis import commands
from ratebench import experiments
from ratebench.analysis.claims import load_claim
from ratebench.analysis.inputs import CONF_DIR, BadInput
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.load import load
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run

X = evaluation_grid(1e5)
CONTROL = CONF_DIR / "claims" / "control.yaml"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Control evidence on two instances (2 runs x 6 seeds each), and one untagged run of another β."""
    root = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(3)
    for instance in (1, 2):
        for r in range(2):
            seeds = list(range(6 * r, 6 * r + 6))
            write_run(root / f"i{instance}-job{r}", X, synthetic_values(X, 1.0 + 0.1 * instance, 6, rng, A=10.0), seeds,
                      metric="reward_err", algorithm="reward_mle", env="bandit",
                      config={"algorithm": {"name": "reward_mle"}, "env": {"name": "bandit", "instance_seed": instance}},
                      experiment="control_bandit")
    return root


def test_verdict_numbers_are_those_of_its_deciding_fit(runs):
    (v,) = analysis.check("control", runs=runs, n_boot=300)
    ref, _, _ = experiments.evaluate_claim(load(runs), load_claim(CONTROL), FitOptions(n_boot=300))
    assert ref.fit is not None and len(ref.per_instance) == 2
    worst = ref.per_instance[ref.worst_instance]
    assert (v.verdict, v.reason) == (ref.verdict, ref.reason)
    assert (v.p, v.p_low, v.p_high) == (worst.p, worst.p_low, worst.p_high) == (ref.fit.p, ref.fit.p_low, ref.fit.p_high)
    assert v.ci == (ref.fit.p_low, ref.fit.p_high) and v.window == (ref.fit.eps_low, ref.fit.eps_high)
    assert (v.p_local, v.status, v.n_seeds, v.n_diverged) == (ref.fit.p_local, ref.fit.status, 12, 0)
    assert all(math.isfinite(value) for value in (v.p, *v.ci, *v.window))
    row = commands.verdict_row(ref)  # what `check --json` prints
    assert (row["p"], row["p_low"], row["p_high"], row["eps_low"], row["eps_high"]) == (v.p, *v.ci, *v.window)
    assert (row["n_seeds"], row["n_unhealthy"], row["n_instances"]) == (v.n_seeds, v.n_unhealthy, v.n_instances) == (12, 0, 2)
    assert v.has_evidence and row["evidence"]


def test_a_verdict_without_evidence_has_nan_numbers_and_zero_counts(runs):
    (v,) = analysis.check("control_a075", runs=runs, n_boot=300)
    assert not v.has_evidence and v.fit is None and v.verdict == "INCONCLUSIVE"
    assert all(math.isnan(value) for value in (v.p, *v.ci, *v.window, v.p_local))
    assert (v.n_seeds, v.n_diverged, v.n_unhealthy, v.n_instances, v.status) == (0, 0, 0, 0, "no_data")


def test_plot_writes_the_figures_of_the_plot_command(runs, tmp_path):
    cli_out, api_out = tmp_path / "cli", tmp_path / "api"
    assert commands.main("plot", [str(runs), "--metric", "reward_err", "--out", str(cli_out), "--n-boot", "200"]) == 0
    paths = analysis.plot(runs, metric="reward_err", out=api_out, n_boot=200)
    cli_png = sorted(p.name for p in cli_out.glob("*.png"))
    assert sorted(p.name for p in paths if p.suffix == ".png") == cli_png and len(cli_png) == 3
    assert all(p.exists() and p.parent == api_out for p in paths)
    for name in cli_png:  # the same figures to the byte: the same groups, fits, bands and claimed slopes
        assert (api_out / name).read_bytes() == (cli_out / name).read_bytes(), name
    # claims=[]: no claimed slope on the figure, so the curves figure differs from the command's
    bare = analysis.plot(load(runs), metric=["reward_err"], out=tmp_path / "bare", claims=[], n_boot=200)
    main_png = "reward_err_vs_samples.png"
    assert [p.name for p in bare if p.suffix == ".png"] == [p.name for p in paths if p.suffix == ".png"]
    assert (tmp_path / "bare" / main_png).read_bytes() != (cli_out / main_png).read_bytes()


def test_plot_refuses_bad_input_like_the_command(runs, tmp_path):
    with pytest.raises(BadInput, match="--metric: unknown metric 'nope'"):
        analysis.plot(runs, metric="nope", out=tmp_path / "f")
    with pytest.raises(BadInput, match="--by: unknown column"):
        analysis.plot(runs, metric="reward_err", by="cfg.env.nope", out=tmp_path / "f")
    with pytest.raises(BadInput, match="--n-boot must be in"):
        analysis.plot(runs, metric="reward_err", out=tmp_path / "f", n_boot=5)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(BadInput, match="out: cannot write the output folder"):
        analysis.plot(runs, metric="reward_err", out=blocker / "figures")
    assert not (tmp_path / "f").exists()  # nothing written before the refusal
