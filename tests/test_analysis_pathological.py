"""No RuntimeWarning, warning line or traceback from check, plot and report on pathological curves:
all NaN, +inf after the start, zeros, negative, 1e300 and subnormal (1e-320) values, one seed, and
mixed seed statuses (saturated, stalled, diverged, failed) with missing points."""
from __future__ import annotations

import numpy as np
import pytest
from ratebench.analysis import commands
from ratebench.analysis.synthetic import evaluation_grid, synthetic_values
from ratebench.synthetic_runs import write_run

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
X = evaluation_grid(1e5)


def _values(name: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = synthetic_values(X, 1.0, 6, rng, A=10.0)
    return {"all_nan": np.full((6, len(X)), np.nan),
            "inf_after_start": np.concatenate([np.ones((6, 1)), np.full((6, len(X) - 1), np.inf)], 1),
            "zeros": np.zeros((6, len(X))), "negative": -base, "huge": base * 1e300, "subnormal": base * 1e-321,
            "one_seed": base[:1], "mixed": np.where(rng.random(base.shape) < 0.3, np.nan, base)}[name]


MIXED = {str(s): {"status": st, "step": 3, "message": "constructed"}
         for s, st in enumerate(["completed", "saturated", "stalled", "diverged", "failed", "completed"])}


@pytest.mark.parametrize("name", ["all_nan", "inf_after_start", "zeros", "negative", "huge", "subnormal", "one_seed",
                                  "mixed"])
def test_check_plot_report_survive_pathological_curves(name, tmp_path, capsys):
    values = _values(name)
    write_run(tmp_path / "run", X, values, list(range(values.shape[0])), metric="reward_err", algorithm="reward_mle",
              env="bandit", experiment="control_bandit", status=MIXED if name in ("mixed", "huge") else None)
    runs = [("check", ["control", "--runs", str(tmp_path), "--n-boot", "200", "--json"]),
            ("plot", [str(tmp_path), "--metric", "reward_err", "--n-boot", "200"]),
            ("report", [str(tmp_path), "--claims", "control", "--n-boot", "200", "--no-premise"])]
    for command, args in runs:
        code = commands.main(command, args)
        err = capsys.readouterr().err
        assert code in (0, 1) and (code == 0 or command == "check"), (command, code, err)
        assert "Warning" not in err and "Traceback" not in err and "warning" not in err, (command, err)
