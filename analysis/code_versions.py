"""The code versions a verdict's evidence was computed with, read from its runs' run.json (provenance.code:
ratebench's version and commit, each plug-in's distribution version and source hash)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ratebench.analysis.load import RunRecordError, read_record


def describe(code: dict | None) -> str:
    """One line naming the code of a run: `ratebench 0.1.0 (abc1234); algorithm polsgd from mypkg 0.2 (source
    1a2b...)`; `code not recorded` for a run written before run.json recorded it."""
    if not isinstance(code, dict):
        return "code not recorded"
    rb = code.get("ratebench") or {}
    commit = str(rb.get("commit") or "")
    text = f"ratebench {rb.get('version', '?')} " + (f"({commit[:7]}{'+dirty' if commit.endswith('+dirty') else ''})"
                                                     if commit else f"(source {rb.get('fingerprint', '?')})")
    for p in code.get("plugins") or []:
        origin = f"{p.get('distribution')} {p.get('version')}" if p.get("distribution") else "an unpackaged module"
        text += f"; {str(p.get('kind', ''))[:-1]} {p.get('name')} from {origin} (source {p.get('source_hash')})"
    return text


def evidence_code(seeds: pd.DataFrame) -> list[str]:
    """The distinct code versions (describe) of the runs in a per-seed table (its run_dir column), sorted."""
    if seeds.empty:
        return []
    lines = set()
    for run_dir in set(seeds["run_dir"]):
        try:
            record = read_record(Path(run_dir) / "run.json")
        except RunRecordError:  # the loader read it already: a file gone since names no code
            continue
        lines.add(describe((record.get("provenance") or {}).get("code")))
    return sorted(lines)
