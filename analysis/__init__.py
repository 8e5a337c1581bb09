"""ratebench.analysis: run records → rate fits, verdicts, figures, reports. The Python API (docs/api.md):

    from ratebench import analysis
    runs = analysis.load("runs/beta")                       # Loaded: .metrics, .seeds DataFrames
    table = analysis.fit(runs, metric="reward_err", by="cfg.env.beta")   # DataFrame, one row per group
    verdicts = analysis.check(["control"], runs="runs/control")         # [Verdict]
    diff = analysis.compare("runs/a", "runs/b", metric="gap")           # DataFrame, p̂_a − p̂_b, paired CI
    paths = analysis.plot(runs, metric="reward_err", by="cfg.env.beta")  # the figures of `ratebench plot`

The modules hold the pieces (load, curves, stats, fit, groups, evidence, judgement, claims, paired, labels,
plots, report; inputs: the bad-input checks shared with the CLI, commands.py). These functions and the CLI
stand above the harness: `check` takes what a claim's experiment resolves to, and runs it, from
ratebench.experiments; every other module of the analysis imports only ratebench.core."""
from __future__ import annotations

# The submodules `load` and `fit` share their names with API functions below: import them first, so
# that the functions (defined after) are what `ratebench.analysis.load` / `.fit` name as attributes.
from ratebench.analysis import fit as _fit_module  # noqa: F401
from ratebench.analysis import load as _load_module

__all__ = ["check", "compare", "fit", "load", "plot"]


def load(path, strict: bool = False):
    """Every run under path (searched for run.json): a Loaded with .metrics (one row per run, seed and
    evaluation point, cfg.* columns) and .seeds (one row per run and seed, with its status). Unreadable
    runs are skipped with a warning (strict=True: an error). ValueError when there are none."""
    loaded = _load_module.load(path, strict=strict)
    if loaded.seeds.empty:
        raise ValueError(f"{path}: no runs found (no readable run.json below it)")
    return loaded


def _as_loaded(runs, strict: bool = False):
    """A Loaded from a folder, a Loaded, or the metrics DataFrame of load(...).metrics / load_runs."""
    import pandas as pd

    if isinstance(runs, _load_module.Loaded):
        return runs
    if isinstance(runs, pd.DataFrame):
        keep = [c for c in runs.columns if c in _load_module.RUN_KEYS or c.startswith(("cfg.", "target."))
                or c in ("seed", "status")]
        seeds = runs.drop_duplicates(["run_dir", "seed"])[keep].reset_index(drop=True)
        return _load_module.Loaded(runs, seeds)
    return load(runs, strict=strict)


def _options(**options):
    """FitOptions from keywords, with the CLI's bounds (inputs.BadInput naming the option)."""
    import dataclasses

    from ratebench.analysis.fit import FitOptions
    from ratebench.analysis.inputs import BadInput, check_fit_options

    allowed = [f.name for f in dataclasses.fields(FitOptions)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise BadInput(f"unknown fit option(s) {unknown}; allowed: {allowed}")
    return check_fit_options(FitOptions(**options))


def fit(runs, metric: str = "gap", x: str = "samples", by="algorithm,env,config_hash", **options):
    """The table of `ratebench fit` as a DataFrame, one row per group: `label` (named by what differs
    between the groups), the grouping columns, p, p_low, p_high, b, c, the ε window, seeds, status, ...
    runs: a folder, load(...) or its .metrics frame; by: columns (`cfg.env.beta`, ...); options: any
    FitOptions field (n_boot=500, reach=0.9, ...). Bad input raises inputs.BadInput (one line)."""
    import pandas as pd
    from ratebench.analysis.curves import group_keys
    from ratebench.analysis.groups import fit_groups, fit_rows
    from ratebench.analysis.inputs import check_by, check_metric

    loaded = _as_loaded(runs)
    check_metric(loaded, metric, x)
    keys = group_keys(by)
    check_by(loaded, keys)
    results = fit_groups(loaded, metric, x, keys, _options(**options))
    return pd.DataFrame(fit_rows(results, metric, x))


def plot(runs, metric=None, x: str = "samples", by="algorithm,env,config_hash", out=None, claims=None,
         **options) -> list:
    """The figures of `ratebench plot` (PNG and PDF paths, in the order written): per metric the curves with
    the fit and n_hit(ε) panels, the interval plot of p̂ and the fixed-target runtimes (analysis/plots.py).
    runs: a folder, load(...) or its .metrics frame; metric: a name or a list (None: every metric with positive
    values); by: grouping columns as for fit; out: the folder (None: <runs>/figures for a folder, else
    ./figures); claims: names, ids, paths or Claim objects whose slopes are drawn on figures of their own
    algorithm and metric (None: every shipped claim, as the command; [] none); options: any FitOptions field."""
    from pathlib import Path

    from ratebench.analysis import commands, plots
    from ratebench.analysis.claims import Claim, load_claim
    from ratebench.analysis.curves import METRICS, group_keys, has_positive

    loaded = _as_loaded(runs)
    metrics = ([metric] if isinstance(metric, str) else list(metric)) if metric is not None else [
        m for m in METRICS if m in loaded.metrics.columns and has_positive(loaded.metrics[m])]
    for m in metrics:
        commands.check_metric(loaded, m, x)
    keys = group_keys(by)
    commands.check_by(loaded, keys)
    opts = _options(**options)
    if claims is None:
        shown = [load_claim(p) for p in commands.default_claims()]
    else:
        items = [claims] if isinstance(claims, (str, Path, Claim)) else list(claims)
        shown = [c if isinstance(c, Claim) else commands.named_claims([str(c)])[0] for c in items]
    folder = Path(out) if out is not None else (Path(runs) / "figures" if isinstance(runs, (str, Path)) else Path("figures"))
    commands.writable_folder(folder, "out")
    folder.mkdir(parents=True, exist_ok=True)
    return [path for m in metrics for path in plots.figures(commands.fit_groups(loaded, m, x, keys, opts), shown, folder)]


def check(claims, runs=None, workdir: str = "ratebench-runs", **options) -> list:
    """A Verdict per claim (`.verdict` PASS / VIOLATED / INCONCLUSIVE, `.reason`; `.p`, `.ci`, `.window`, `.n_seeds`,
    `.n_instances`, ... read from `.fit`, the deciding fit; `.per_instance`: a fit per instance; `.detail`: the
    form's estimate (ρ̂, p̂_A − p̂_B) and an exponent_curve's per-value results, docs/claim-meaning.md).
    claims: names (`control`), ids, paths or Claim objects (one or a list). runs: a folder or load(...)
    holding the evidence; None runs (or reuses, under workdir) each claim's experiment as the CLI does."""
    from pathlib import Path

    from ratebench.analysis import commands
    from ratebench.analysis.claims import Claim
    from ratebench.analysis.inputs import named_claims
    from ratebench.experiments import check_experiment_name, ensure_experiment, evaluate_claim

    items = [claims] if isinstance(claims, (str, Path, Claim)) else list(claims)
    named = named_claims([str(c) for c in items if not isinstance(c, Claim)])  # shipped, plug-in or by path
    parsed = [c if isinstance(c, Claim) else named.pop(0) for c in items]
    opts = _options(**options)
    given = None if runs is None else _as_loaded(runs)  # the evidence, loaded once for every claim
    by_experiment = {}  # else each experiment runs (or is reused) and is loaded once, as in `ratebench check`
    verdicts = []
    for claim in parsed:
        if given is None:
            check_experiment_name(claim)
            for name in claim.experiments:  # a difference claim's two experiments
                if name not in by_experiment:
                    by_experiment[name] = load(ensure_experiment(name, Path(workdir), [claim.id]))
        loaded = given if given is not None else commands.merged_runs([by_experiment[n] for n in claim.experiments])
        verdicts.append(evaluate_claim(loaded, claim, opts)[0])
    return verdicts


def compare(a, b=None, metric: str = "gap", x: str = "samples", by="algorithm", **options):
    """p̂_a − p̂_b with a paired bootstrap CI over the (instance, seed) pairs both ran (paired.py), as a
    DataFrame with one row per pair: a, b, p_a, p_b, diff, diff_low, diff_high, n_shared, boot_unit, ...
    compare(a, b): all runs of a against all runs of b (folders, load(...) or frames); compare(a, by=...):
    every pair of groups of a, as `ratebench compare`."""
    from ratebench.analysis.curves import build_curves, group_keys
    from ratebench.analysis.groups import group_curves
    from ratebench.analysis.inputs import check_by, check_metric
    from ratebench.analysis.paired import difference_table

    opts = _options(**options)
    if b is None:
        loaded = _as_loaded(a)
        check_metric(loaded, metric, x)
        keys = group_keys(by)
        check_by(loaded, keys)
        groups = [(k["label"], c) for k, c in group_curves(loaded, metric, x, keys)]
    else:
        groups = []
        for name, runs in (("a", a), ("b", b)):
            loaded = _as_loaded(runs)
            check_metric(loaded, metric, x)
            groups.append((str(runs) if isinstance(runs, (str, bytes)) or hasattr(runs, "__fspath__") else name,
                           build_curves(loaded.metrics, loaded.seeds, metric, x)))
    return difference_table(groups, opts)
