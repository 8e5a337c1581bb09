"""The sensitivity table: final medians, falls, drift and divergence per cell, from synthetic rows."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from ratebench.analysis.sensitivity import markdown, sensitivity_table

ROWS, COLS = "cfg.algorithm.xi_exponent", "cfg.algorithm.lam_exponent"


def synthetic_runs() -> pd.DataFrame:
    """Cell (b=0.5, c=0): seeds decay 1/n; cell (b=0.5, c=0.1): dips then drifts up, one seed diverged."""
    samples = np.array([0, 10, 100, 1000])
    rows = []
    for seed in range(3):
        for s, v in zip(samples, [1.0, 0.1, 0.01, 0.001 * (seed + 1)]):
            rows.append({ROWS: 0.5, COLS: 0.0, "seed": seed, "samples": s, "gap": v, "status": "completed"})
        drift = [1.0, 0.1, 0.05, 0.5]
        status = "diverged" if seed == 2 else "completed"
        for s, v in zip(samples[: 2 if seed == 2 else 4], drift):
            rows.append({ROWS: 0.5, COLS: 0.1, "seed": seed, "samples": s, "gap": v, "status": status})
    return pd.DataFrame(rows)


def test_cells_report_final_median_fall_drift_and_divergence():
    table = sensitivity_table(synthetic_runs(), ROWS, COLS).set_index(COLS)
    good, bad = table.loc[0.0], table.loc[0.1]
    assert good["final"] == pytest.approx(0.002) and good["fall"] == pytest.approx(500)
    assert good["drift"] == pytest.approx(1.0) and good["diverged"] == 0
    assert bad["final"] == pytest.approx(0.5)  # median of (0.5, 0.5, inf for the diverged seed)
    assert bad["diverged"] == 1 and bad["drift"] == pytest.approx(10.0)
    text = markdown(sensitivity_table(synthetic_runs(), ROWS, COLS), ROWS, COLS)
    assert "0.002 (500x)" in text and "1/3 diverged" in text and "drifts up" in text


def test_missing_column_names_it():
    with pytest.raises(KeyError, match="cfg.algorithm.nope"):
        sensitivity_table(synthetic_runs(), "cfg.algorithm.nope", COLS)
