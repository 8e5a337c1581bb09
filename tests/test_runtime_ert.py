"""Fixed-target runtimes that count failures (analysis/runtime.py): ERT(ε) and the runtime ECDF on a
hand-computed example, against an independent brute-force computation on random curves (NaN gaps,
divergence), and in `ratebench plot` / `report`."""
from __future__ import annotations

import math

import numpy as np
import pytest
from ratebench.analysis import commands, runtime
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")


def test_hand_computed_example():
    # x:          0    10    100   1000
    x = np.array([0.0, 10.0, 100.0, 1000.0])
    values = np.array([[1.0, 0.4, 0.05, 0.02],   # stays <= 0.5 from 10, <= 0.1 from 100
                       [1.0, 0.6, 0.3, 0.2],     # <= 0.5 from 100, never <= 0.1
                       [1.0, 0.3, 0.7, 0.08]])   # <= 0.5 only from 1000 (it went back up), <= 0.1 from 1000
    eps = np.array([0.5, 0.1, 0.01])
    out = runtime.expected_runtime(x, values, eps)
    # eps 0.5: all reached, at 10, 100, 1000 -> (10 + 100 + 1000) / 3
    # eps 0.1: seeds 0 and 2 at 100 and 1000; seed 1 never: its budget 1000 -> (100 + 1000 + 1000) / 2
    # eps 0.01: nobody -> +inf, spent 3000
    assert out["ert"][0] == pytest.approx(1110 / 3) and out["ert"][1] == pytest.approx(2100 / 2)
    assert out["ert"][2] == np.inf and out["spent"][2] == 3000 and list(out["reached"]) == [3, 2, 0]
    # ECDF over the targets {0.5, 0.1}: pairs hit at 10, 100 (seed 0), 100 (seed 1), 1000, 1000 (seed 2); 6 pairs
    frac = runtime.runtime_ecdf(x, values, np.array([0.5, 0.1]))
    assert frac == pytest.approx([0, 1 / 6, 3 / 6, 5 / 6])


def test_a_diverged_seed_is_charged_the_budget_it_is_censored_to():
    x = np.array([0.0, 10.0, 100.0, 1000.0])
    values = np.array([[1.0, 0.2, 0.1, 0.05], [1.0, 0.2, np.inf, np.inf], [1.0, np.nan, 0.1, np.nan]])
    assert list(runtime.seed_budget(x, values)) == [1000.0, 1000.0, 100.0]
    out = runtime.expected_runtime(x, values, np.array([0.15]))
    # seed 0 at 100; seed 1 never (charged 1000); seed 2 stays <= 0.15 from 100 (its last evaluation)
    assert out["ert"][0] == pytest.approx((100 + 1000 + 100) / 2)


def brute_force(x, values, eps, budget):
    """ERT and ECDF by loops, straight from the definitions (independent of curves.n_hit)."""
    S, E = values.shape[0], len(eps)
    hit = np.full((S, E), math.inf)
    for s in range(S):
        seen = [j for j in range(len(x)) if not math.isnan(values[s, j])]
        for e in range(E):
            for j in seen:
                if all(values[s, k] <= eps[e] for k in seen if k >= j):
                    hit[s, e] = x[j]
                    break
    ert = []
    for e in range(E):
        spent = sum(hit[s, e] if hit[s, e] < math.inf else budget[s] for s in range(S))
        n = sum(hit[s, e] < math.inf for s in range(S))
        ert.append(spent / n if n else math.inf)
    ecdf = [sum(hit[s, e] <= xj for s in range(S) for e in range(E)) / (S * E) for xj in x]
    return np.array(ert), np.array(ecdf)


@pytest.mark.parametrize("seed", range(6))
def test_matches_a_brute_force_computation_on_random_curves(seed):
    rng = np.random.default_rng(seed)
    x = evaluation_grid(1e4)
    values = synthetic_values(x, 0.8, 9, rng, A=5.0, point_noise=0.4)
    values[rng.random(values.shape) < 0.1] = np.nan  # missing evaluations
    values[2, 20:] = np.inf  # a divergence
    values[4, :] = np.nan  # a seed without values
    eps = np.geomspace(3.0, 0.003, 17)
    budget = runtime.seed_budget(x, values)
    out = runtime.expected_runtime(x, values, eps)
    ert, ecdf = brute_force(x, values, eps, budget)
    assert np.array_equal(np.isinf(out["ert"]), np.isinf(ert))
    fin = np.isfinite(ert)
    assert out["ert"][fin] == pytest.approx(ert[fin], rel=1e-12)
    assert runtime.runtime_ecdf(x, values, eps) == pytest.approx(ecdf, abs=1e-12)


def test_unhealthy_seeds_left_out_of_the_fit_matrix_still_count():
    import pandas as pd
    from ratebench.analysis.curves import Curves

    x = np.array([0.0, 10.0, 100.0])
    values = np.array([[1.0, 0.1, 0.01]])
    seeds = pd.DataFrame({"seed": [0, 1, 2], "status": ["completed", "stalled", "failed"],
                          "last_samples": [100, 40, 10], "run_dir": "r", "config_hash": "h"})
    curves = Curves("gap", "samples", x, values, np.array(["h"]), seeds, np.array([True, False, False]))
    x2, v2, budget = runtime.runtime_matrix(curves)
    assert v2.shape == (2, 3) and list(budget) == [100.0, 40.0]  # the stalled seed joins; a failed run does not
    out = runtime.expected_runtime(x2, v2, np.array([0.05]), budget)
    assert out["ert"][0] == pytest.approx((100 + 40) / 1)


def test_shared_targets_span_start_to_the_best_final_value():
    x = np.array([0.0, 10.0, 100.0])
    a = np.array([[1.0, 0.5, 0.05], [1.0, 0.8, 0.3]])
    t = runtime.shared_targets([a], [x], per_decade=10)
    assert t.max() <= 0.65 and t.min() >= 0.05 * (1 - 1e-9) and t.max() >= 0.5  # median start 0.65, best end 0.05
    assert runtime.shared_targets([a], [x], lo=1e-3, hi=1.0).tolist() == pytest.approx(
        list(10 ** (-np.arange(0, 31) / 10)))
    assert runtime.shared_targets([np.full((2, 3), np.nan)], [x]).size == 0


def test_plot_and_report_draw_the_runtime_figures(tmp_path, capsys):
    x = evaluation_grid(1e5)
    rng = np.random.default_rng(3)
    values = synthetic_values(x, 1.0, 8, rng, A=10.0)
    values[0, 30:] = np.inf
    write_run(tmp_path / "run", x, values, list(range(8)), metric="reward_err", algorithm="reward_mle", env="bandit",
              experiment="control_bandit")
    assert commands.main("plot", [str(tmp_path), "--metric", "reward_err", "--n-boot", "200"]) == 0
    assert (tmp_path / "figures" / "reward_err_vs_samples_runtime.png").stat().st_size > 10_000
    assert commands.main("report", [str(tmp_path), "--claims", "control", "--n-boot", "200", "--no-premise"]) == 0
    md = (tmp_path / "report" / "report.md").read_text()
    assert "figures/claim_control_reward_mle_runtime.png" in md and "figures/reward_err_vs_samples_runtime.png" in md
    assert (tmp_path / "report" / "figures" / "claim_control_reward_mle_runtime.png").exists()
