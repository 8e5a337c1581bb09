"""Seed health in the fit: saturated seeds are censored after their status step, stalled seeds are
fitted as recorded, non-finite values in a completed seed are +inf from there on and counted, and no
fit, check or stats code raises a RuntimeWarning on pathological curves (huge, subnormal, zero, NaN)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from ratebench.analysis import commands
from ratebench.analysis.curves import Curves, build_curves, n_hit
from ratebench.analysis.fit import FitOptions, fit_floor, fit_rate
from ratebench.analysis.load import SEED_STATUSES, load
from ratebench.analysis.stats import iqm, trimmed_mean
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

X = evaluation_grid(1e5)


def _write(folder, values, status, metric="reward_err"):
    """A run folder whose rows hold `values` as given (NaN and inf included: a completed seed's
    recorded values, not a divergence), with the per-seed status records `status`."""
    seeds = list(range(values.shape[0]))
    write_run(folder, X, np.ones_like(values), seeds, metric=metric, status=status, experiment="health")
    frames = [pd.DataFrame({"seed": s, "step": np.arange(len(X)), "samples": X.astype(np.int64),
                            "queries": (X // 2).astype(np.int64), metric: values[s], "gap": 1.0})
              for s in seeds]
    pd.concat(frames, ignore_index=True).to_parquet(folder / "metrics.parquet", index=False)
    return folder


@pytest.fixture
def sick_run(tmp_path):
    rng = np.random.default_rng(5)
    v = synthetic_values(X, 1.0, 10, rng)
    v[0, 21:] = 1e-9  # saturated at step 20: its later rows (tiny values) are not data
    v[1, 31:] = v[1, 30]  # stalled at step 30: frozen, its rows are real values of a frozen iterate
    v[2, 25:] = np.nan  # completed, metric NaN from point 25 (after finite values)
    v[2, 35:] = 1e279
    v[3, 40] = np.inf  # completed, one +inf point, then finite again
    v[4, 30:] = 1e279  # completed, frozen at a huge finite value: data, not censored
    status = {"0": {"status": "saturated", "step": 20, "reason": "iterate left the ball"},
              "1": {"status": "stalled", "step": 30, "reason": "grad_sq is 0"}}
    return _write(tmp_path / "run", v, status), v


def test_seed_statuses_include_saturated_and_stalled():
    assert {"completed", "diverged", "saturated", "stalled", "failed"} <= set(SEED_STATUSES)


def test_saturated_censored_stalled_kept_nonfinite_censored_and_counted(sick_run):
    folder, v = sick_run
    loaded = load(folder)
    seeds = loaded.seeds.set_index("seed")
    assert seeds.at[0, "status"] == "saturated" and seeds.at[0, "status_step"] == 20
    assert seeds.at[0, "message"] == "iterate left the ball"
    curves = build_curves(loaded.metrics, loaded.seeds, "reward_err", "samples")
    assert curves.n_seeds == 10  # every seed is fitted: none vanishes
    want = v.copy()  # the reference, by the rules written out: censored = +inf from the point on
    want[0, 21:] = np.inf  # rows after step 20 (step = point index here)
    want[2, 25:] = np.inf  # from the first non-finite value on
    want[3, 40:] = np.inf
    np.testing.assert_array_equal(curves.values, want)
    assert curves.nonfinite.tolist() == [False, False, True, True] + [False] * 6
    health = curves.health()
    assert health == {"diverged": 0, "saturated": 3, "stalled": 1, "failed": 0, "unhealthy": 4}
    nh = n_hit(curves.x, curves.values, np.array([1.0, 1e-2, 1e-4]))
    assert np.isinf(nh[[0, 2, 3]]).all()  # censored seeds never reach ε
    assert np.isfinite(nh[1, 0])  # the stalled seed's own (frozen) values are used
    fit = fit_rate(curves, FitOptions(n_boot=200))
    assert (fit.n_saturated, fit.n_stalled, fit.n_unhealthy, fit.n_diverged) == (3, 1, 4, 0)
    row = fit.row()
    assert row["n_saturated"] == 3 and row["n_unhealthy"] == 4


def test_metric_nan_by_design_is_not_counted(tmp_path):
    v = synthetic_values(X, 1.0, 6, np.random.default_rng(1))
    v[:, :] = np.nan  # a metric the algorithm does not define: NaN in every row
    curves = build_curves(*_loaded(_write(tmp_path / "r", v, {})), "reward_err", "samples")
    assert not curves.nonfinite.any() and np.isnan(curves.values).all()
    assert fit_rate(curves, FitOptions(n_boot=50)).status == "no_data"


def _loaded(folder):
    lo = load(folder)
    return lo.metrics, lo.seeds


PATHOLOGICAL = {
    "huge_frozen": lambda v: v.__setitem__((slice(0, 4), slice(30, None)), 1e279),
    "near_overflow": lambda v: v.__setitem__((slice(0, 5), slice(20, None)), 1.7e308),
    "subnormal": lambda v: v.__setitem__((slice(0, 5), slice(25, None)), 1e-310),
    "zeros": lambda v: v.__setitem__((slice(0, 6), slice(10, None)), 0.0),
    "all_huge": lambda v: v.__setitem__((slice(None), slice(None)), 1e279),
    "all_zero": lambda v: v.__setitem__((slice(None), slice(None)), 0.0),
    "mixed": lambda v: (v.__setitem__((0, slice(30, None)), 1e300), v.__setitem__((1, slice(None)), 1e-320),
                        v.__setitem__((2, slice(20, None)), np.inf), v.__setitem__((3, slice(None)), 0.0)),
}


@pytest.mark.parametrize("case", sorted(PATHOLOGICAL))
def test_no_runtime_warning_on_pathological_curves(case):
    v = synthetic_values(X, 0.5, 12, np.random.default_rng(2))
    PATHOLOGICAL[case](v)
    seeds = pd.DataFrame({"seed": np.arange(12), "status": "completed", "config_hash": "h", "run_dir": "r"})
    curves = Curves("reward_err", "samples", X, v, np.array(["h"] * 12), seeds, np.ones(12, bool))
    for opts in (FitOptions(n_boot=200), FitOptions(n_boot=200, eps_min=1e-3, eps_max=1.0)):
        fit = fit_rate(curves, opts)  # a RuntimeWarning fails the test (pytestmark)
        assert fit.status in ("ok", "too_narrow", "too_few_levels", "too_few_seeds", "no_data")
        for name in ("p", "p_low", "p_high", "b", "c"):
            assert not np.isnan(getattr(fit, name)) or fit.status != "ok", (name, fit.status)


def test_trimmed_mean_keeps_ordinary_values_beside_a_huge_one():
    """A frozen seed at 1e279 among ordinary values must not round the others to 0: the IQM of the
    middle values is their plain mean (reference computed directly)."""
    col = np.array([1e279, 0.02, 0.03, 0.01, 0.05, 1e-310, 0.04, 0.06])
    got = iqm(col[:, None], 0)[0]
    middle = np.sort(col)[2:6]  # 8 values, 25 % trimmed each side: the 4 middle ones
    assert got == pytest.approx(middle.mean(), rel=1e-6)
    counts = np.array([[0, 0, 0, 0, 0, 4, 0, 0]], np.int32)  # a resample of the subnormal seed only
    assert trimmed_mean(col[:, None], counts)[0, 0] == pytest.approx(1e-310, rel=1e-6)


def test_fit_floor_ignores_points_beyond_its_dynamic_range():
    x = np.logspace(2, 5, 20)
    y = 3.0 * x ** -0.7
    b, c, A = fit_floor(x, np.vstack([y, np.where(np.arange(20) == 19, 1e279, y)]))
    assert b[0] == pytest.approx(0.7, rel=1e-3) and b[1] == pytest.approx(0.7, rel=1e-3)
    assert c[1] == 0 and A[1] == pytest.approx(3.0, rel=1e-2)


def test_fit_command_counts_seed_health_without_warning(sick_run, tmp_path, capsys):
    folder, _ = sick_run
    assert commands.main("fit", [str(folder), "--metric", "reward_err", "--json", "--n-boot", "200"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert (row["n_saturated"], row["n_stalled"], row["n_unhealthy"]) == (3, 1, 4)
