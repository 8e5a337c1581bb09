"""What `ratebench check` prints for claims that have no evidence at all: one line for all of them, not a
verdict block each. A claim without evidence has nothing to show in the verdict table (no p̂, no window,
no seeds); what the reader needs is which claims had none, why, and the command that makes some."""
from __future__ import annotations

import re

NO_RUNS = "no runs of experiment "  # the reason claim_evidence gives when the folder holds none of them
FOUND = re.compile(r"; experiments found: (.*)$")


def has_evidence(row: dict) -> bool:
    """A verdict row (commands.verdict_row) that was judged on runs: it has a fit (p̂, maybe NaN)."""
    return row.get("evidence", "p" in row)


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """(judged, without runs of their experiment, without evidence for another reason: runs there that do not
    match the experiment's config, tuning or too few instances). The last keep their own line: the reason
    names what differs."""
    judged = [r for r in rows if has_evidence(r)]
    absent = [r for r in rows if not has_evidence(r) and str(r.get("reason", "")).startswith(NO_RUNS)]
    other = [r for r in rows if not has_evidence(r) and r not in absent]
    return judged, absent, other


def no_evidence_line(absent: list[dict], where: str | None) -> str:
    """One line for every claim whose experiment has no runs under `where`: the claims (with their
    experiments), what the folder holds instead, and the command that makes a claim's evidence."""
    found = next((m.group(1) for m in (FOUND.search(str(r.get("reason", ""))) for r in absent) if m), None)
    names = ", ".join(f"{r['claim']} ({r['experiment']})" if r.get("experiment") not in (None, r["claim"]) else r["claim"]
                      for r in absent)  # (its experiment, when named otherwise)
    holds = (f"the runs there are of experiment(s) {found}" if found else
             "none of the runs there was made with experiment=<name>")
    return (f"no evidence under {where or 'the runs'} for {len(absent)} claim{'' if len(absent) == 1 else 's'} "
            f"(INCONCLUSIVE; {holds}): {names}. `ratebench check CLAIM` runs the claim's experiment and judges it; "
            f"`ratebench run -m experiment=NAME hydra.sweep.dir=DIR` makes its runs for `check --runs DIR`.")
