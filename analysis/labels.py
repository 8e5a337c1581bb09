"""Group labels named by what differs: every table, legend and heading names a group of runs by the
config keys whose values differ between the groups shown (`env.beta=0.5`, `algorithm=dpo
algorithm.mode=online`), with a short config hash only to tell apart groups that nothing else does."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from ratebench.core.records import OPERATIONAL_KEYS

SCOPED = ("algorithm", "env")  # a knob of algorithm X (env X) is compared only among groups of the same X
MIXED = object()  # a key that takes several values inside one pooled group: it does not name the group


def short_key(column: str) -> str:
    """`cfg.env.beta` → `env.beta`; `cfg.algorithm.name` → `algorithm` (what a user types in an override)."""
    key = column.removeprefix("cfg.")
    for scope in SCOPED:
        if key == f"{scope}.name":
            return scope
    return key


def value_text(value: Any) -> str:
    """A config value as an override would spell it: 0.5, true, null, dpo, [1, 2]."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def natural_order(label: str) -> list:
    """Sort key that puts `c_xi=2` before `c_xi=10`: numbers compare as numbers."""
    parts = re.split(r"(-?\d+(?:\.\d+)?(?:e-?\d+)?)", label)
    return [(0, float(t), "") if i % 2 else (1, 0.0, t) for i, t in enumerate(parts)]


def group_config(seed_rows: pd.DataFrame) -> dict[str, Any]:
    """One group's resolved config from its seed rows' `cfg.*` columns: {short key: value}, MIXED for
    a key with several values in the group (pooled configurations); keys absent from it are left out."""
    out: dict[str, Any] = {}
    for col in seed_rows.columns:
        if not col.startswith("cfg.") or col[4:].split(".")[0] in OPERATIONAL_KEYS:  # cannot tell results apart
            continue
        values = {value_text(v) for v in seed_rows[col] if not _absent(v)}
        if len(values) == 1:
            out[short_key(col)] = values.pop()
        elif values:
            out[short_key(col)] = MIXED
    return out


def _absent(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _scope(key: str) -> str | None:
    head = key.split(".", 1)[0]
    return head if head in SCOPED and key != head else None


def differing_keys(configs: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """For every group, the keys that name it: those whose values differ between the groups (a key of
    `algorithm.*` / `env.*` only between groups of the same algorithm / env), in the order algorithm,
    env, then the others sorted. A key MIXED or absent in a group does not name that group."""
    keys = sorted({k for c in configs for k in c}, key=lambda k: (k not in SCOPED, SCOPED.index(k)
                                                                  if k in SCOPED else 0, k))
    out: list[list[str]] = [[] for _ in configs]
    for key in keys:
        scope = _scope(key)
        for i, config in enumerate(configs):
            mine = config.get(key, MIXED)
            if mine is MIXED:
                continue
            peers = [c for c in configs if scope is None or c.get(scope) == config.get(scope)]
            seen = {c[key] if key in c and c[key] is not MIXED else None for c in peers}
            if len(seen) > 1:
                out[i].append(key)
    return out


def group_labels(configs: Sequence[Mapping[str, Any]], hashes: Sequence[str] | None = None) -> list[str]:
    """A label per group: `key=value` for the keys that differ between the groups (differing_keys);
    with nothing differing, the group's algorithm and env. Groups whose labels still coincide get
    their short config hash appended (`[1a2b3c]`) as a tie-breaker."""
    labels = []
    for config, keys in zip(configs, differing_keys(configs)):
        keys = keys or [k for k in SCOPED if config.get(k, MIXED) is not MIXED]
        labels.append(" ".join(f"{k}={config[k]}" for k in keys) or "all runs")
    if hashes is not None:
        counts = pd.Series(labels).value_counts()
        labels = [f"{lab} [{str(h)[:6]}]" if counts[lab] > 1 and h else lab for lab, h in zip(labels, hashes)]
    return labels
