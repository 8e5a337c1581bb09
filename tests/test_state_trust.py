"""State you can trust (issue 14): a run folder holding a finished run of another configuration
is refused before any compute (exit 2, both run hashes named) unless overwrite=true."""
from __future__ import annotations

import json

from ratebench.cli import main


def test_a_finished_run_of_another_config_is_not_replaced_silently(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "budget.samples=200", "n_seeds=2", f"hydra.run.dir={out}"]) == 0
    first = json.loads((out / "run.json").read_text())
    before = (out / "metrics.parquet").read_bytes()
    capsys.readouterr()
    code = main(["run", "algorithm=bilevel", "budget.samples=200", "n_seeds=2", f"hydra.run.dir={out}"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "hydra.run.dir" in lines[0] and first["run_hash"] in lines[0], err
    assert "overwrite=true" in lines[0]
    assert json.loads((out / "run.json").read_text()) == first and (out / "metrics.parquet").read_bytes() == before
    # the same config again is a skip, not a refusal
    assert main(["run", "budget.samples=200", "n_seeds=2", f"hydra.run.dir={out}"]) == 0
    assert "skipping" in capsys.readouterr().out
    # an explicit overwrite replaces it
    assert main(["run", "algorithm=bilevel", "budget.samples=200", "n_seeds=2", "overwrite=true",
                 f"hydra.run.dir={out}"]) == 0
    assert json.loads((out / "run.json").read_text())["algorithm"] == "bilevel"
