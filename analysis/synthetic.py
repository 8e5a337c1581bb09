"""Synthetic curves with a known decay exponent (metric = c + A·n^-b·noise) for calibrating the
fitter and benchmarking it, as Curves objects (run folders of them: ratebench.synthetic_runs)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from ratebench.analysis.curves import Curves


def evaluation_grid(budget: float = 1e5, per_decade: int = 10, first: float = 8.0) -> np.ndarray:
    """0 then log-spaced integers from `first` to budget, like the harness's schedule. (P,)"""
    k = np.arange(np.ceil(np.log10(first) * per_decade), np.floor(np.log10(budget) * per_decade) + 1)
    pts = np.unique(np.round(10.0 ** (k / per_decade)))
    return np.concatenate([[0.0], pts[pts < budget], [float(budget)]])


def synthetic_values(x: np.ndarray, b: float, n_seeds: int, rng: np.random.Generator, A: float = 1.0,
                     floor: float = 0.0, seed_noise: float = 0.3, point_noise: float = 0.1,
                     rho: float = 0.0, tail_A: float = 0.0, tail_b: float = 0.0) -> np.ndarray:
    """(S, P) metric = floor + (A·n^-b + tail_A·n^-tail_b)·exp(seed_noise·z_s + point_noise·e_{s,j});
    z_s a per-seed level, e an AR(1) sequence over the evaluation points (correlation rho) with unit
    variance. The optional second term is a slower tail (tail_b < b) under a fast transient, or a
    bias phase under a variance phase. n = 0 is recorded as n = 1 (the start value A + tail_A)."""
    z = rng.standard_normal((n_seeds, 1))
    e = rng.standard_normal((n_seeds, len(x)))
    for j in range(1, len(x)):
        e[:, j] = rho * e[:, j - 1] + np.sqrt(1 - rho ** 2) * e[:, j]
    n = np.maximum(x, 1.0)[None, :]
    return floor + (A * n ** -b + tail_A * n ** -tail_b) * np.exp(seed_noise * z + point_noise * e)


def synthetic_curves(b: float, n_seeds: int, rng: np.random.Generator, metric: str = "gap",
                     budget: float = 1e5, instances: np.ndarray | None = None, **kw) -> Curves:
    """Curves of n_seeds synthetic seeds; instances (S,) labels them with environment instances
    (recorded as the `cfg.env.instance_seed` column, one configuration per instance)."""
    x = evaluation_grid(budget)
    values = synthetic_values(x, b, n_seeds, rng, **kw)
    inst = np.zeros(n_seeds, np.int64) if instances is None else np.asarray(instances, np.int64)
    strata = np.array([f"synthetic-{i}" for i in inst])
    seeds = pd.DataFrame({"seed": np.arange(n_seeds), "status": "completed", "config_hash": strata,
                          "run_dir": "synthetic", "cfg.env.instance_seed": inst})
    return Curves(metric, "samples", x, values, strata, seeds, np.ones(n_seeds, bool), inst)
