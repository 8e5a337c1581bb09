"""Which runs are a claim's evidence (pure functions over the seed table): runs of the claim's
experiment whose resolved config equals the experiment's, up to the keys that may vary (seeds,
instances, operational keys, the experiment's `free_keys`); the rest are named once with the keys
they differ in. The experiment's expected configs (ExperimentConfigs) are composed by Hydra in the harness
(ratebench.experiments.experiment_configs) and handed in."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from ratebench.analysis.curves import INSTANCE_COLUMN
from ratebench.analysis.load import flatten_config
from ratebench.core.records import OPERATIONAL_KEYS

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


def config_differences(run: dict, expected: dict, free, defaults: dict | None = None) -> list[str]:
    """The non-free keys (dotted, sorted) in which a run's flattened config differs from the
    expected one; a key only one side has counts as null on the other — except a key the run lacks
    (written by code from before the key existed) where the expected value is the key's default
    (`defaults`, flattened): a new key's default keeps the old behaviour, so that run is what the
    experiment asks for."""
    defaults = defaults or {}
    keys = (set(run) | set(expected))
    return sorted(k for k in keys if not is_free(k, free) and not same_value(run.get(k), expected.get(k))
                  and not (_null(run.get(k)) and k in defaults and same_value(defaults[k], expected.get(k))))


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


def match_experiment(seeds: pd.DataFrame, experiment: str, expected: list[dict] | None, free,
                     defaults: dict | None = None) -> Match:
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
        diffs = [config_differences(cfg, e, free, defaults) for e in expected]
        best = min(range(len(diffs)), key=lambda i: len(diffs[i]))
        if not diffs[best]:
            keep.add(run_dir)
        elif is_tagged[run_dir]:
            rejected[run_dir] = diffs[best]
            for k in diffs[best]:
                got, want = values.setdefault(k, (set(), expected[best].get(k)))
                got.add(_text(cfg.get(k)))
    return Match(candidates[candidates["run_dir"].astype(str).isin(keep)], rejected, values)


INSTANCE_COL, TUNING_COL = INSTANCE_COLUMN, "cfg.tuning_instances"


def held_out(seeds: pd.DataFrame, tuning, instances, where: str = "the runs") -> tuple[pd.DataFrame, str, str | None]:
    """(seed rows on held-out instances, note, missing). Rows on an instance that the experiment
    (`tuning`, a set) or the run's own `tuning_instances` names are dropped (the note says which);
    `instances` is the claim's: a count of distinct held-out instances the evidence must cover, or a
    tuple of exactly those (rows on others dropped). missing: why the claim cannot be judged, or None."""
    instance = seeds[INSTANCE_COL] if INSTANCE_COL in seeds.columns else pd.Series(0, index=seeds.index)
    instance = pd.to_numeric(instance, errors="coerce").fillna(0).astype(int)
    tuned = instance.isin(set(tuning)).astype(bool)
    if TUNING_COL in seeds.columns:
        tuned |= pd.Series([int(i) in set(json.loads(t) if isinstance(t, str) else (t or []))
                            for i, t in zip(instance, seeds[TUNING_COL])], index=seeds.index, dtype=bool)
    note = ""
    if tuned.any():
        note = f"runs on tuning instance(s) {sorted(set(map(int, instance[tuned])))} are not evidence"
        seeds, instance = seeds[~tuned], instance[~tuned]
    found = sorted(set(map(int, instance)))
    missing = None
    if isinstance(instances, tuple):
        absent = sorted(set(instances) - set(found))
        if absent:
            missing = f"the claim names instances {list(instances)}; no held-out runs of {absent} under {where}"
        seeds = seeds[instance.isin(instances)]
    elif len(found) < instances:
        missing = (f"{len(found)} held-out instance(s) {found} under {where}; the claim needs ≥ {instances}"
                   + (f" ({note})" if note else ""))
    return seeds, note, missing


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


# ---------------------------------------------------------------------------------------------- what it would take

def decision_boundaries(relation: str, p_claim: float, tolerance: float = 0.0) -> list[float]:
    """The exponents a CI must clear to decide a claim: p_claim (upper_bound: PASS below, VIOLATED
    above), or the band's edges p ± tol (equals: PASS inside, VIOLATED outside)."""
    return [p_claim] if relation == "upper_bound" else [p_claim - tolerance, p_claim + tolerance]


def units_to_decide(p_hat: float, p_low: float, p_high: float, n_units: int, boundaries: list[float],
                    alpha: float = 0.05, power: float = 0.8) -> dict:
    """How many independent units (seeds, or instances when the bootstrap resampled instances) one
    more check would need to decide, sized like a fixed-sample test: the CI's half-width on the side
    of the nearest boundary b gives the per-unit standard deviation σ₁ = h·√n / z_{1−α/2}; with the
    exponent where p̂ is now (a plug-in), n* = ⌈(σ₁ (z_{1−α/2} + z_{power}) / |p̂ − b|)²⌉ units give
    the next check at level α that power of a CI clear of b. Returns {"n_needed", "more", "boundary",
    "sigma_unit", "power", "alpha"}; n_needed None when the CI gives no spread (an unbounded or
    degenerate end), +inf when p̂ sits on b."""
    from scipy.stats import norm

    out = {"n_needed": None, "more": None, "boundary": np.nan, "sigma_unit": np.nan, "power": power, "alpha": alpha}
    if not (np.isfinite(p_hat) and n_units >= 1 and boundaries):
        return out
    b = min(boundaries, key=lambda v: abs(p_hat - v))
    h = (p_high - p_hat) if b > p_hat else (p_hat - p_low)
    out["boundary"] = b
    if not (np.isfinite(h) and h > 0):
        return out
    z = norm.ppf(1 - alpha / 2)
    sigma = h * math.sqrt(n_units) / z
    out["sigma_unit"] = sigma
    d = abs(p_hat - b)
    if d == 0:
        out["n_needed"], out["more"] = math.inf, math.inf
        return out
    n = math.ceil((sigma * (z + norm.ppf(power)) / d) ** 2)
    out["n_needed"], out["more"] = n, max(n - n_units, 0)
    return out


def sequential_error(looks: int, alpha: float = 0.05) -> float:
    """The bound on the chance that any of `looks` checks, each at level alpha, gives a wrong
    decisive verdict (Bonferroni: looks·alpha, at most 1). Stopping as soon as one check decides is
    a group-sequential test; this is its error rate without any further correction."""
    return min(1.0, looks * alpha)


def what_it_would_take(relation: str, p_claim: float, tolerance: float, fit, eps_min: float, budget_now: float,
                       x_name: str = "samples", alpha: float = 0.05) -> dict:
    """For an INCONCLUSIVE verdict: the budget per seed at which the fitted curve reaches ε_min
    (fit.budget_to_eps_min, shown when finite and beyond the budget run) and, when the CI itself is
    undecided (it holds a decision boundary), the units one more check would need (units_to_decide)
    with the error rate of checking twice (this look and the next, sequential_error). Returns
    {"budget_to_eps_min", "more_units", "unit", "n_needed", "error_two_looks", "text": [lines]}."""
    out = {"budget_to_eps_min": None, "more_units": None, "unit": None, "n_needed": None, "error_two_looks": None,
           "text": []}
    if fit is None:
        return out
    budget = getattr(fit, "budget_to_eps_min", float("nan"))
    if budget is not None and np.isfinite(budget) and budget > 0:
        out["budget_to_eps_min"] = float(budget)
        if not budget <= budget_now:
            out["text"].append(f"budget: the fitted curve reaches ε_min = {eps_min:.3g} after about {budget:.3g} "
                               f"{x_name} per seed (this evidence ran {budget_now:.3g})")
    bounds = decision_boundaries(relation, p_claim, tolerance)
    undecided = np.isfinite(fit.p_low) and any(fit.p_low <= b <= fit.p_high for b in bounds)
    if not undecided:
        return out
    unit = "instances" if getattr(fit, "boot_unit", "seed") == "instance" else "seeds"
    n_units = int(fit.n_instances if unit == "instances" else fit.n_seeds)
    plan = units_to_decide(fit.p, fit.p_low, fit.p_high, n_units, bounds, alpha)
    out["unit"] = unit
    error = sequential_error(2, alpha)
    out["error_two_looks"] = error
    if plan["n_needed"] is None:
        out["text"].append(f"{unit}: the CI [{fit.p_low:.3g}, {fit.p_high:.3g}] has an unbounded end (levels some "
                           f"resamples never reach): more budget, not more {unit}, is what it lacks")
        return out
    if plan["n_needed"] == math.inf:
        out["text"].append(f"{unit}: p̂ = {fit.p:.3g} sits on the boundary {plan['boundary']:.3g}: no number of "
                           f"{unit} decides if that is where the exponent is")
        return out
    out["more_units"], out["n_needed"] = int(plan["more"]), int(plan["n_needed"])
    out["text"].append(
        f"{unit}: about {plan['more']} more {unit} ({n_units} → {plan['n_needed']}) give one more check an "
        f"{plan['power']:.0%} chance that its {1 - alpha:.0%} CI clears {plan['boundary']:.3g}, if the exponent is "
        f"where p̂ = {fit.p:.3g} is now (spread per {unit[:-1]} σ ≈ {plan['sigma_unit']:.2g}, from this CI); "
        f"stopping at the first decisive of these two checks errs with probability ≤ {error:.0%} "
        f"(Bonferroni over looks; to keep a whole sequence of K looks at {alpha:.0%}, judge each at {alpha:.0%}/K: "
        f"analysis.check(..., alpha={alpha}/K))")
    return out


@dataclass(frozen=True)
class ExperimentConfigs:
    """What `ratebench run -m experiment=<name>` resolves to: one flattened config per job of its sweep
    (evidence.expected_flat), the keys its runs may vary in (evidence.ALWAYS_FREE, its `free_keys`, keys
    swept over a continuous range), and its tuning instances. configs None: not a shipped preset."""

    configs: tuple | None
    free: tuple
    tuning: frozenset = frozenset()
    defaults: dict = field(default_factory=dict)  # flattened defaults of its algorithm and env (config_differences)
