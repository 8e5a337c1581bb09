"""Sensitivity table: final median metric of each configuration of a 2-D sweep (e.g. lam schedule x
step-size exponent), with where it stalls, drifts upward or diverges. `python -m ratebench.analysis.sensitivity DIR`."""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pandas as pd

from ratebench.analysis.load import load_runs

ROWS = "cfg.algorithm.xi_exponent"  # outer (nu) step exponent b
COLS = "cfg.algorithm.lam_exponent"  # penalty growth exponent c_lam
STALL = 0.5  # final median / initial median above this: the method stalls
DRIFT = 2.0  # final median / lowest median of the run above this: it drifts upward


def cell_summary(runs: pd.DataFrame, metric: str) -> dict:
    """One configuration's runs (all seeds) -> final median over seeds, fall, drift, diverged.

    Final = each seed's value at its last evaluation point; a diverged seed counts as +inf (it did
    not reach anything), so a cell where half the seeds diverge shows inf."""
    last = runs.sort_values("samples").groupby("seed").tail(1).set_index("seed")
    diverged = last["status"] != "completed"
    finals = last[metric].where(~diverged, np.inf)
    curve = runs[runs.status == "completed"].groupby("samples")[metric].median()
    initial = float(curve.iloc[0]) if len(curve) else np.nan
    lowest = float(curve.min()) if len(curve) else np.nan
    final = float(np.median(finals.to_numpy()))
    return {"final": final, "fall": initial / final if final > 0 else np.inf,
            "drift": final / lowest if lowest > 0 else np.nan, "diverged": int(diverged.sum()),
            "seeds": int(len(last)), "samples": int(runs.samples.max())}


def sensitivity_table(runs: pd.DataFrame, rows: str = ROWS, cols: str = COLS, metric: str = "gap") -> pd.DataFrame:
    """Rows of load_runs() (one per run, seed, evaluation point) -> one row per (rows, cols) value
    pair with the cell_summary columns. Runs of one cell may be split over several jobs."""
    for key in (rows, cols, metric, "status", "seed", "samples"):
        if key not in runs.columns:
            raise KeyError(f"column {key!r} not in the loaded runs; available: {sorted(runs.columns)[:30]}...")
    out = [{rows: r, cols: c, **cell_summary(group, metric)} for (r, c), group in runs.groupby([rows, cols])]
    return pd.DataFrame(out)


def _flag(row) -> str:
    notes = []
    if row["diverged"]:
        notes.append(f"{int(row['diverged'])}/{int(row['seeds'])} diverged")
    if row["fall"] < 1 / STALL:
        notes.append("stalls")
    if row["drift"] > DRIFT:
        notes.append("drifts up")
    return f" ({', '.join(notes)})" if notes else ""


def markdown(table: pd.DataFrame, rows: str = ROWS, cols: str = COLS, metric: str = "gap") -> str:
    """The table as Markdown: cells 'final median (fall x) [flags]'."""
    col_values = sorted(table[cols].unique())
    short = lambda key: key.split(".")[-1]
    lines = [f"| {short(rows)} \\ {short(cols)} | " + " | ".join(f"{v:.4g}" for v in col_values) + " |",
             "|---" * (len(col_values) + 1) + "|"]
    for r in sorted(table[rows].unique()):
        cells = []
        for c in col_values:
            match = table[(table[rows] == r) & (table[cols] == c)]
            if match.empty:
                cells.append("—")
                continue
            row = match.iloc[0]
            cells.append(f"{row['final']:.3g} ({row['fall']:.3g}x){_flag(row)}")
        lines.append(f"| {r:.4g} | " + " | ".join(cells) + " |")
    first = table.iloc[0]
    lines.append(f"\nFinal median `{metric}` over {int(first['seeds'])} seeds at {int(first['samples']):,d} samples; "
                 f"(fall) = initial median / final median; 'stalls' = fall < {1 / STALL:g}x, "
                 f"'drifts up' = final > {DRIFT:g}x the lowest median of the run.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ratebench.analysis.sensitivity", description=__doc__)
    parser.add_argument("dir", help="folder searched for run.json (e.g. a sensitivity_bandit sweep)")
    parser.add_argument("--rows", default=ROWS, help=f"config column of the table rows (default {ROWS})")
    parser.add_argument("--cols", default=COLS, help=f"config column of the table columns (default {COLS})")
    parser.add_argument("--metric", default="gap", help="metric column (default gap)")
    parser.add_argument("--require-fall", type=float, default=None, metavar="X",
                        help="exit 1 unless every cell's median fell >= X times and none drifts up (CI gate)")
    ns = parser.parse_args(argv)
    runs = load_runs(ns.dir)
    if runs.empty:
        print(f"error: no runs with metrics under {ns.dir}", file=sys.stderr)
        return 2
    try:
        table = sensitivity_table(runs, ns.rows, ns.cols, ns.metric)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print(markdown(table, ns.rows, ns.cols, ns.metric))
    if ns.require_fall is not None:
        bad = table[(table.fall < ns.require_fall) | (table.drift > DRIFT) | (table.diverged > 0)]
        if len(bad):
            print(f"FAIL: {len(bad)} cell(s) fell < {ns.require_fall:g}x, drift up or diverged", file=sys.stderr)
            return 1
        print(f"OK: every cell's median {ns.metric} fell >= {ns.require_fall:g}x without drifting up")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
