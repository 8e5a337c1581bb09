"""`ratebench compare` (issue 15, item 6): the difference of two exponents with a paired bootstrap CI
over the (instance, seed) pairs both groups ran, on synthetic curves with a known difference."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from ratebench.analysis import commands
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.paired import exponent_difference
from ratebench.analysis.synthetic import evaluation_grid, synthetic_curves, synthetic_values
from ratebench.synthetic_runs import write_run

OPTS = FitOptions(n_boot=500)


def shared_noise(b: float, instances=None):
    """8 seeds whose noise is the same draw for every b: what pairing is for."""
    return synthetic_curves(b, 8, np.random.default_rng(7), instances=instances)


def test_known_difference_is_recovered_with_a_ci_that_excludes_zero():
    d = exponent_difference(shared_noise(1.0), shared_noise(0.5), OPTS)  # p = 1 vs p = 2
    assert d["status"] == "ok" and d["boot_unit"] == "seed" and d["n_shared"] == 8
    assert d["diff_low"] <= -1.0 <= d["diff_high"] and d["diff_high"] < 0
    assert abs(d["diff"] + 1.0) < 0.1


def test_pairing_uses_the_same_draws_for_both_groups():
    same = exponent_difference(shared_noise(0.7), shared_noise(0.7), OPTS)
    assert same["diff"] == 0.0 and same["diff_low"] == 0.0 and same["diff_high"] == 0.0  # unpaired: a wide CI


def _permuted_with_extra_seeds(curves, order, extra):
    """The same seeds' curves in another row order, plus `extra` seeds (ids 100, 101, ...) the other group lacks."""
    values = np.concatenate([curves.values[order], synthetic_curves(0.7, extra, np.random.default_rng(3)).values])
    seeds = pd.concat([curves.seeds.iloc[order], pd.DataFrame({"seed": 100 + np.arange(extra), "status": "completed",
                       "config_hash": "synthetic-0", "run_dir": "synthetic", "cfg.env.instance_seed": 0})],
                      ignore_index=True)
    n = len(seeds)
    return type(curves)(curves.metric, curves.x_name, curves.x, values, np.array(["synthetic-0"] * n), seeds,
                        np.ones(n, bool), np.zeros(n, np.int64))


def test_pairing_matches_seeds_by_id_not_by_row_and_drops_unshared_seeds():
    """b holds a's 8 seeds in reverse row order plus 3 seeds a lacks: pairing by (instance, seed) id gives
    the identical-groups answer (CI [0, 0] up to summation order, 1e-6, on the 8 shared seeds); pairing
    rows, or resampling the groups apart, gives a CI of about ±0.02 here."""
    a = shared_noise(0.7)
    b = _permuted_with_extra_seeds(a, np.arange(8)[::-1], 3)
    d = exponent_difference(a, b, OPTS)
    assert d["n_shared"] == 8 and max(abs(d["diff"]), abs(d["diff_low"]), abs(d["diff_high"])) < 1e-6, d


def test_instances_are_the_resampling_unit_and_unshared_seeds_are_left_out():
    inst = np.repeat([1, 2, 3, 4], 2)
    d = exponent_difference(shared_noise(1.0, inst), shared_noise(0.5, inst), OPTS)
    assert d["boot_unit"] == "instance" and d["n_units"] == 4 and d["diff_low"] <= -1.0 <= d["diff_high"]
    other = synthetic_curves(1.0, 8, np.random.default_rng(0), instances=np.full(8, 9))  # no pair in common
    assert exponent_difference(shared_noise(1.0), other, OPTS)["status"] == "too_few_shared"


def test_compare_command_prints_a_csv_row_per_pair(tmp_path, capsys):
    x = evaluation_grid(1e5)
    for name, b in (("fast", 1.0), ("slow", 0.5)):
        write_run(tmp_path / name, x, synthetic_values(x, b, 8, np.random.default_rng(7)), list(range(8)),
                  metric="gap", algorithm=name, env="bandit",
                  config={"algorithm": {"name": name}, "env": {"name": "bandit"}})
    assert commands.main("compare", [str(tmp_path), "--metric", "gap", "--by", "algorithm", "--format", "csv",
                                     "--n-boot", "300"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert list(table["a"]) == ["algorithm=fast"] and list(table["b"]) == ["algorithm=slow"]
    assert table["diff_low"][0] <= -1.0 <= table["diff_high"][0]
    assert commands.main("compare", [str(tmp_path), "--by", "env"]) == 2  # one group: nothing to compare
    assert "compare needs at least 2" in capsys.readouterr().err


def test_compare_counts_bit_identical_seeds_of_one_run_once():
    """a's 8 seeds plus 8 copies of seed 0's curve under new seed ids in the same run (a deterministic method from
    one start repeated): the paired difference is the one on the 8 distinct seeds, and the copies are reported."""
    a, b = shared_noise(1.0), shared_noise(0.5)

    def with_copies(curves):
        values = np.concatenate([curves.values, np.repeat(curves.values[:1], 8, 0)])
        extra = curves.seeds.iloc[[0] * 8].assign(seed=100 + np.arange(8))
        seeds = pd.concat([curves.seeds, extra], ignore_index=True)
        n = len(seeds)
        return type(curves)(curves.metric, curves.x_name, curves.x, values, np.array([curves.strata[0]] * n), seeds,
                            np.ones(n, bool), np.zeros(n, np.int64))

    plain = exponent_difference(a, b, OPTS)
    doubled = exponent_difference(with_copies(a), with_copies(b), OPTS)
    assert doubled["n_shared"] == plain["n_shared"] == 8
    assert (doubled["diff"], doubled["diff_low"], doubled["diff_high"]) == (plain["diff"], plain["diff_low"],
                                                                           plain["diff_high"])
    assert doubled["n_distinct"] == (8, 8) and doubled["copies"]["A"] and doubled["copies"]["B"]
    assert doubled["copies"] == {"A": {0: (16, 8)}, "B": {0: (16, 8)}} and plain["copies"] == {"A": {}, "B": {}}
