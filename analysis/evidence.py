"""Which runs are a claim's evidence (pure functions over the seed table): runs of the claim's
experiment whose resolved config equals the experiment's, up to the keys that may vary (seeds,
instances, operational keys, the experiment's `free_keys`); the rest are named once with the keys
they differ in. The experiment's expected configs come from Hydra (commands.experiment_configs)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from ratebench.analysis.load import flatten_config
from ratebench.records import OPERATIONAL_KEYS

# keys that never make a run another experiment: algorithm seeds, environment instances (one run per
# instance, or a batched family), how a step is computed and the operational keys (records.OPERATIONAL_KEYS)
ALWAYS_FREE = ("seeds", "n_seeds", "env.instance_seed", "instances", "impl", "threads", *OPERATIONAL_KEYS)
PREFIX = "cfg."  # the seed table's config columns (load.flatten_config)


def expected_flat(config: dict) -> dict:
    """An experiment's resolved config (a plain dict, e.g. OmegaConf.to_container(compose(...),
    resolve=True)) as the seed table flattens a run's config: {'env.beta': 1.0, ...} (lists as JSON
    text, the seeds left out as run_keys leaves them out)."""
    config = {k: v for k, v in config.items() if k not in ("seeds", "hydra")}
    return {k[len(PREFIX):]: v for k, v in flatten_config(config, PREFIX.rstrip(".")).items()}


def is_free(key: str, free) -> bool:
    """key (dotted) is free when it or one of its parents is listed (`model` frees model.*)."""
    return any(key == f or key.startswith(f + ".") for f in free)


def _null(value) -> bool:
    if value is None:
        return True
    try:
        return bool(isinstance(value, float) and math.isnan(value))
    except TypeError:
        return False


def same_value(a, b) -> bool:
    """Equal as config values: null = NaN = absent, numbers by value (1 = 1.0, to 1e-12 relative; a
    bool is not a number), lists by their JSON text, else ==."""
    if _null(a) or _null(b):
        return _null(a) and _null(b)
    num = (int, float, np.integer, np.floating)
    if isinstance(a, (bool, np.bool_)) or isinstance(b, (bool, np.bool_)):
        return isinstance(a, (bool, np.bool_)) and isinstance(b, (bool, np.bool_)) and bool(a) == bool(b)
    if isinstance(a, num) and isinstance(b, num):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, (list, tuple)):
        a = json.dumps(list(a))
    if isinstance(b, (list, tuple)):
        b = json.dumps(list(b))
    return bool(a == b)


def config_differences(run: dict, expected: dict, free) -> list[str]:
    """The non-free keys (dotted, sorted) in which a run's flattened config differs from the
    expected one; a key only one side has counts as null on the other."""
    keys = (set(run) | set(expected))
    return sorted(k for k in keys if not is_free(k, free) and not same_value(run.get(k), expected.get(k)))


def run_configs(seeds: pd.DataFrame) -> dict[str, dict]:
    """{run_dir: flattened config (dotted keys, no cfg. prefix)} from the seed table's cfg.* columns."""
    cols = [c for c in seeds.columns if c.startswith(PREFIX)]
    first = seeds.drop_duplicates("run_dir")
    return {str(r): {c[len(PREFIX):]: v for c, v in zip(cols, vals)}
            for r, *vals in first[["run_dir", *cols]].itertuples(index=False, name=None)}


@dataclass
class Match:
    """The outcome for one claim: the seed rows that are evidence, and the runs that are not, each
    with the keys it differs in (relative to the closest expected config) and its values there."""

    seeds: pd.DataFrame
    rejected: dict = field(default_factory=dict)  # run_dir -> [differing keys]
    values: dict = field(default_factory=dict)  # key -> (set of run values, expected value)
    checked: bool = True  # False: no expected config (not a shipped experiment): the tag alone decided


def match_experiment(seeds: pd.DataFrame, experiment: str, expected: list[dict] | None, free) -> Match:
    """The seed rows of `experiment`'s runs that match one of its expected configs (flattened,
    expected_flat) up to the free keys. A run counts when it records this experiment, or records
    none (a plain `ratebench run` spelling the experiment out, or the copy the duplicate check kept)
    and matches. Runs recording the experiment that match no expected config are rejected; untagged
    runs that do not match are not the experiment's at all and are not listed. expected None (the
    experiment is not a shipped preset): the tag alone decides (Match.checked False)."""
    tag = seeds["experiment"]
    tagged = (tag == experiment).to_numpy()
    if expected is None:
        return Match(seeds[tagged], checked=False)
    untagged = tag.isna().to_numpy()
    candidates = seeds[tagged | untagged]
    configs = run_configs(candidates) if len(candidates) else {}
    keep, rejected, values = set(), {}, {}
    is_tagged = dict(zip(candidates["run_dir"].astype(str), (candidates["experiment"] == experiment)))
    for run_dir, cfg in configs.items():
        diffs = [config_differences(cfg, e, free) for e in expected]
        best = min(range(len(diffs)), key=lambda i: len(diffs[i]))
        if not diffs[best]:
            keep.add(run_dir)
        elif is_tagged[run_dir]:
            rejected[run_dir] = diffs[best]
            for k in diffs[best]:
                got, want = values.setdefault(k, (set(), expected[best].get(k)))
                got.add(_text(cfg.get(k)))
    return Match(candidates[candidates["run_dir"].astype(str).isin(keep)], rejected, values)


def _text(value) -> str:
    return "null" if _null(value) else f"{value:g}" if isinstance(value, float) else str(value)


def rejected_note(match: Match, seeds: pd.DataFrame, experiment: str) -> str:
    """'not evidence: 2 runs (32 seeds) of experiment X differ from its config in algorithm.lr_exponent
    (0.75; experiment 1), budget.samples (20000; experiment 100000)': the rejected runs, listed once."""
    if not match.rejected:
        return ""
    runs = set(match.rejected)
    n_seeds = int(seeds["run_dir"].astype(str).isin(runs).sum())
    keys = sorted({k for ks in match.rejected.values() for k in ks})
    parts = []
    for k in keys:
        got, want = match.values[k]
        shown = sorted(got)
        vals = ", ".join(shown[:3]) + (", ..." if len(shown) > 3 else "")
        parts.append(f"{k} ({vals}; experiment {_text(want)})")
    return (f"not evidence: {len(runs)} run(s) ({n_seeds} seeds) of experiment {experiment} differ from its "
            f"config in {', '.join(parts)}")


def sweep_combinations(params: dict, free) -> tuple[list[list[str]], list[str]]:
    """An experiment's `hydra.sweeper.params` ({key: "a,b,c" | "range(...)" | "interval(...)"}) as
    the override lists of its jobs, leaving out the free keys: (combinations, keys swept over a
    continuous range, which are free: a tuner's search space is not a fixed config)."""
    from itertools import product

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lists, continuous = [], []
    for key, value in (params or {}).items():
        if is_free(str(key), free):
            continue
        (ov,) = parser.parse_overrides([f"{key}={value}"])
        if not ov.is_sweep_override():
            lists.append([f"{key}={ov.get_value_element_as_str()}"])
        elif ov.is_discrete_sweep():
            lists.append([f"{key}={v}" for v in ov.sweep_string_iterator()])
        else:
            continuous.append(str(key))
    return [list(c) for c in product(*lists)], continuous
