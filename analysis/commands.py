"""`ratebench fit | plot | check | report`: argument parsing, bad-input checks (exit 2) and the
glue from run folders to tables, verdicts, figures and reports. The statistics live in fit.py."""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from ratebench.analysis import evidence
from ratebench.analysis.claims import (
    INCONCLUSIVE,
    PASS,
    VIOLATED,
    Claim,
    Verdict,
    find_claim,
    judge,
    load_claim,
    n_unhealthy,
    verdict,
    what_it_would_take,
)
from ratebench.analysis.curves import METRICS, X_AXES, build_curves, group_keys, has_positive
from ratebench.analysis.fit import FitOptions, RateFit, fit_rate, window_sensitivity
from ratebench.analysis.labels import group_config, group_labels, natural_order, short_key
from ratebench.analysis.load import Loaded, RunRecordError, load, read_record
from ratebench.analysis.tables import latex_table, number_text
from ratebench.catalog import claim_files, conf_dir
from ratebench.errors import ConfigError
from ratebench.records import code_fingerprint, unwritable_reason

CONF_DIR = conf_dir()  # the installed package's conf/ (one home: ratebench.catalog)
MAX_N_BOOT = 100_000  # bootstrap replicates: 2000 (default) gives stable 95% bounds; 1e8 would exhaust memory


class BadInput(Exception):
    """One message for stderr; the command exits 2."""


class RunFailed(Exception):
    """A `ratebench run` that check started exited with `code` (never 1: runs do not return verdicts)."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def main(command: str, args: list[str], premise=None) -> int:
    """premise: optional callable (env config dict, c_lam) -> {"wgd_floor", "implied_exponent", "q"}
    (the CLI passes ratebench.audit.premise_summary): check and report print the claim's premises on
    the evidence's instances. Analysis computes no landscape itself; it is handed the function."""
    handlers = {"fit": fit_command, "plot": plot_command, "check": check_command, "report": report_command,
                "compare": compare_command}
    parser = PARSERS[command]()
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help → 0, argparse errors → 2
        return int(exc.code or 0)
    ns.premise = None if getattr(ns, "no_premise", True) else premise
    ns.argv = list(args)
    try:
        fit_options(ns)  # the options' bounds (--n-boot, ...) before any run is read
        # numerical trouble in a fit (curves of 1e300 or 1e-320) ends as NaN / ±inf, which the fit reports as
        # a status; it never reaches the user as a RuntimeWarning
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            return handlers[command](ns)
    except (BadInput, ConfigError, RunRecordError) as exc:
        print(f"ratebench {command}: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:  # check's experiment run failed: its status, not "bad input"
        print(f"ratebench {command}: error: {exc}", file=sys.stderr)
        return exc.code if exc.code != 1 else 3  # 1 is check's own verdict status


# ---------------------------------------------------------------------------------------------- parsers

def _add_fit_options(p: argparse.ArgumentParser) -> None:
    d = FitOptions()
    p.add_argument("--strict", action="store_true", help="a run record that cannot be read is an error (exit 2)")
    p.add_argument("--n-boot", type=int, default=d.n_boot, help=f"bootstrap replicates (default {d.n_boot})")
    p.add_argument("--boot-seed", type=int, default=d.seed, help="bootstrap RNG seed (default 0)")
    p.add_argument("--reach", type=float, default=d.reach,
                   help=f"window: fraction of seeds that must reach ε (default {d.reach})")
    p.add_argument("--decades", type=float, default=d.decades,
                   help=f"window: last decades of x treated as asymptotic (default {d.decades})")
    p.add_argument("--tail", type=float, default=d.tail,
                   help=f"window: decades of x kept after n_hit as evidence of staying (default {d.tail})")
    p.add_argument("--floor-factor", type=float, default=d.floor_factor,
                   help=f"window: ε ≥ this × fitted floor (default {d.floor_factor})")
    p.add_argument("--nhit-decades", type=float, default=d.nhit_decades,
                   help=f"window: IQM n_hit within the last this many decades of x (default {d.nhit_decades})")
    p.add_argument("--min-decades", type=float, default=d.min_decades,
                   help=f"a window spanning fewer decades of ε is too_narrow: no PASS (default {d.min_decades})")


def _fit_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratebench fit", description="Fit the sample-complexity exponent p "
                                "(log n_hit vs log 1/ε) and the decay exponent b (metric ≈ c + A·n^-b) per "
                                "(algorithm, env, config) of the runs under DIR, with seed-bootstrap 95% CIs.")
    p.add_argument("dir", help="folder searched recursively for run.json")
    p.add_argument("--metric", default="gap", help=f"metric column (default gap); one of {', '.join(METRICS)}")
    p.add_argument("--x", default="samples", choices=X_AXES, help="x axis (default samples)")
    p.add_argument("--by", default="algorithm,env,config_hash",
                   help="comma-separated grouping columns (default algorithm,env,config_hash; e.g. "
                        "algorithm,env pools configurations, bootstrap stratified by config_hash)")
    p.add_argument("--format", default="table", choices=FIT_FORMATS,
                   help="table (default, for reading), json (a list of objects), csv (one row per group, every "
                        "field, for pandas/R/spreadsheets) or latex (a booktabs table of the displayed columns)")
    p.add_argument("--json", action="store_const", const="json", dest="format", help="the same as --format json")
    p.add_argument("--sensitivity", action="store_true", help="also print the window-sensitivity table per group")
    _add_fit_options(p)
    return p


def _plot_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratebench plot", description="PNG and PDF figures, one per metric: "
                                "metric vs x (IQM, median, 95%% bootstrap band, fitted line, claimed slopes) and "
                                "n_hit(ε) vs 1/ε with the fit and the claimed slope.")
    p.add_argument("dir", help="folder searched recursively for run.json")
    p.add_argument("--metric", action="append", help="metric (repeatable; default every metric with data)")
    p.add_argument("--x", default="samples", choices=X_AXES)
    p.add_argument("--out", help="output folder (default DIR/figures)")
    p.add_argument("--claims", nargs="*", help="claim files whose slopes are drawn (default conf/claims/*.yaml)")
    p.add_argument("--by", default="algorithm,env,config_hash", help="grouping columns, as for fit")
    _add_fit_options(p)
    return p


def _check_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratebench check", description="Verdict per claim (SPEC §7): exit 0 when "
                                "every claim passes, 1 when one is VIOLATED or INCONCLUSIVE, 2 on bad input. "
                                "Without --runs, each claim's experiment is run (or reused) under --workdir.")
    p.add_argument("claims", nargs="*", help="claim names (`control`, as `ratebench list claims` shows them), claim ids, "
                   "or claim YAML files (default: every shipped claim)")
    p.add_argument("--runs", help="analyse the runs under this folder instead of running the experiments")
    p.add_argument("--workdir", default="ratebench-runs", help="cache of experiment runs (default ./ratebench-runs)")
    p.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    p.add_argument("--no-premise", action="store_true",
                   help="do not print the premises (WGD floor, schedule-imposed exponent) of bilevel claims; "
                        "their first computation per instance takes ~10 s (bandit) to minutes (mdp), then cached")
    _add_free_option(p)
    p.add_argument("--fail-on", choices=("any", "violated"), default="any",
                   help="exit 1 when any claim is not PASS (default, SPEC §8) or only when one is VIOLATED "
                        "(CI smoke checks: INCONCLUSIVE is reported but does not fail)")
    p.add_argument("--junit", metavar="FILE", help="also write the verdicts as a JUnit XML report to FILE: one testcase "
                   "per claim, VIOLATED a failure, INCONCLUSIVE skipped, each with its reason (docs/ci.md)")
    _add_fit_options(p)
    return p


def _report_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratebench report", description="One self-contained HTML report (figures "
                                "embedded) and its Markdown twin for the runs under DIR: verdict per claim, p̂ "
                                "and CI, window, figures, diverged seeds, config hashes and commands.")
    p.add_argument("dir", help="folder searched recursively for run.json")
    p.add_argument("--claims", nargs="*", help="claim files (default: conf/claims/*.yaml whose algorithm has runs)")
    p.add_argument("--out", help="output folder (default DIR/report)")
    _add_fit_options(p)
    p.add_argument("--no-premise", action="store_true",
                   help="leave out the premises (WGD floor, schedule-imposed exponent) of bilevel claims")
    _add_free_option(p)
    return p


def _add_free_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--free", action="append", default=[], metavar="KEY[,KEY]",
                   help="also count runs of the claim's experiment that differ from its config in these keys "
                        "(dotted, e.g. budget.samples; repeatable); the verdict's note names them")


def free_keys(ns) -> tuple:
    """--free as a tuple of dotted keys, each checked for its form (letters, digits, '_', '.')."""
    keys = tuple(k.strip() for v in getattr(ns, "free", []) or [] for k in v.split(",") if k.strip())
    bad = [k for k in keys if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", k)]
    if bad:
        raise BadInput(f"--free: {bad} are not dotted config keys (e.g. budget.samples, algorithm.lr_exponent)")
    return keys


def _compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratebench compare", description="The difference of sample-complexity "
                                "exponents p̂_a − p̂_b between every pair of groups, with a paired bootstrap 95%% CI "
                                "over the (instance, seed) pairs both groups ran: instances resampled, then seeds "
                                "within each (the same draw for both groups).")
    p.add_argument("dir", help="folder searched recursively for run.json")
    p.add_argument("--metric", default="gap", help=f"metric column (default gap); one of {', '.join(METRICS)}")
    p.add_argument("--x", default="samples", choices=X_AXES, help="x axis (default samples)")
    p.add_argument("--by", default="algorithm", help="grouping columns (default algorithm), as for fit")
    p.add_argument("--format", default="table", choices=("table", "json", "csv"), help="output format")
    _add_fit_options(p)
    return p


PARSERS = {"fit": _fit_parser, "plot": _plot_parser, "check": _check_parser, "report": _report_parser,
           "compare": _compare_parser}


def fit_options(ns, **extra) -> FitOptions:
    return check_fit_options(FitOptions(n_boot=ns.n_boot, seed=ns.boot_seed, reach=ns.reach, decades=ns.decades,
                                        tail=ns.tail, floor_factor=ns.floor_factor, nhit_decades=ns.nhit_decades,
                                        min_decades=ns.min_decades, **extra))


def check_fit_options(opts: FitOptions) -> FitOptions:
    """The bounds of the fit options, for the CLI's flags and the Python API's keywords alike."""
    if not 100 <= opts.n_boot <= MAX_N_BOOT:
        raise BadInput(f"--n-boot must be in [100, {MAX_N_BOOT}] (memory and time grow with replicates x seeds x "
                       f"ε levels per group), got {opts.n_boot}")
    if opts.seed < 0:
        raise BadInput(f"--boot-seed must be >= 0, got {opts.seed}")
    if not 0.5 <= opts.reach <= 1:
        raise BadInput(f"--reach must be in [0.5, 1], got {opts.reach}")
    for name in ("decades", "tail", "floor_factor", "nhit_decades", "min_decades"):
        if not getattr(opts, name) >= 0:
            raise BadInput(f"--{name.replace('_', '-')} must be >= 0, got {getattr(opts, name)}")
    return opts


# ---------------------------------------------------------------------------------------------- analysis glue

def load_dir(path, strict: bool) -> Loaded:
    """Every run under path; bad input (missing folder, no runs) → BadInput."""
    root = Path(path)
    if not root.exists():
        raise BadInput(f"{root}: no such folder")
    if not root.is_dir():
        raise BadInput(f"{root}: not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load(root, strict=strict)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    if loaded.seeds.empty:
        skipped = f" ({len(loaded.skipped)} unreadable)" if loaded.skipped else ""
        raise BadInput(f"{root}: no runs found (no readable run.json below it{skipped}); "
                       "make some with `ratebench run ... hydra.run.dir=...`")
    return loaded


def check_metric(loaded: Loaded, metric: str, x_name: str) -> None:
    available = [m for m in METRICS if m in loaded.metrics.columns]
    if metric not in available:
        raise BadInput(f"--metric: unknown metric {metric!r}; allowed: {', '.join(available)}")
    if x_name not in loaded.metrics.columns:
        raise BadInput(f"--x: column {x_name!r} is not in the run records; allowed: "
                       f"{', '.join(x for x in X_AXES if x in loaded.metrics.columns)}")


def check_by(loaded: Loaded, by: list[str]) -> None:
    bad = [k for k in by if k not in loaded.seeds.columns]
    if bad:
        allowed = ["algorithm", "env", "experiment", "config_hash"] + [c for c in loaded.seeds.columns
                                                                         if c.startswith("cfg.")]
        raise BadInput(f"--by: unknown column(s) {bad}; allowed: {', '.join(allowed)}")


def group_curves(loaded: Loaded, metric: str, x_name: str, by: list[str]) -> list[tuple[dict, object]]:
    """(group key dict, curves) for every group of runs, each key with its `label` (named by what
    differs between the groups, analysis/labels.py), in the natural order of the labels."""
    out, configs = [], []
    seeds = loaded.seeds.copy()
    metrics = loaded.metrics
    for key, seed_rows in seeds.groupby(by, dropna=False, sort=True):
        configs.append(group_config(seed_rows))
        key = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        runs = set(seed_rows["run_dir"])
        rows = metrics[metrics["run_dir"].isin(runs)]
        curves = build_curves(rows, seed_rows, metric, x_name)
        if len(runs) > 1:
            warn_identical_curves(curves, f"group {key}")
        key["config_hashes"] = sorted(set(seed_rows["config_hash"]))
        for col in ("algorithm", "env"):  # pooled over them: name what was pooled
            key.setdefault(col, ",".join(sorted(set(map(str, seed_rows[col])))))
        out.append((key, curves))
    hashes = [k.get("config_hash") or ",".join(k["config_hashes"]) for k, _ in out]
    for (key, _), label in zip(out, group_labels(configs, hashes)):
        key["label"] = label
    return sorted(out, key=lambda r: natural_order(r[0]["label"]))


def fit_groups(loaded: Loaded, metric: str, x_name: str, by: list[str], opts: FitOptions,
               sensitivity: bool = False) -> list[tuple[dict, RateFit, object]]:
    """(group key dict, fit, curves) for every group of runs (group_curves)."""
    out = []
    for key, curves in group_curves(loaded, metric, x_name, by):
        fit = fit_rate(curves, opts)
        if sensitivity and fit.status != "no_data":
            fit.arrays["sensitivity"] = window_sensitivity(curves, opts)
        out.append((key, fit, curves))
    return out


def fit_rows(results, metric: str, x_name: str) -> list[dict]:
    rows = []
    skip = ("algorithm", "env", "config_hash", "config_hashes", "label")
    for key, fit, _ in results:
        row = {"label": key.get("label"), "algorithm": key.get("algorithm"), "env": key.get("env"),
               "config_hash": key.get("config_hash"), **{k: v for k, v in key.items() if k not in skip},
               "config_hashes": key["config_hashes"], "metric": metric, "x": x_name}
        r = fit.row()
        r.pop("metric"), r.pop("x_name")
        row.update(r)
        rows.append(row)
    return rows


def fit_command(ns) -> int:
    loaded = load_dir(ns.dir, ns.strict)
    check_metric(loaded, ns.metric, ns.x)
    by = group_keys(ns.by)
    check_by(loaded, by)
    results = fit_groups(loaded, ns.metric, ns.x, by, fit_options(ns), ns.sensitivity)
    rows = fit_rows(results, ns.metric, ns.x)
    if ns.format != "table":
        print(format_fit_rows(rows, ns.format))
        return 0
    print(format_fit_table(rows))
    if ns.sensitivity:
        for key, fit, _ in results:
            if "sensitivity" in fit.arrays:
                print(f"\nwindow sensitivity: {key['label']}")
                print(fit.arrays["sensitivity"].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
            if "profile" in fit.arrays:
                at = fit.arrays["profile_trend"]["eps_eval"]
                print(f"\nlocal exponent p(ε) on half-decade sub-windows (trend {number_text(fit.p_trend)} per decade "
                      f"of 1/ε; at ε = {at:.3g}: {number_text(fit.p_local)} [{number_text(fit.p_local_low)}, "
                      f"{number_text(fit.p_local_high)}]): {key['label']}")
                print(fit.arrays["profile"].to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    return 0


def _jsonable(row: dict) -> dict:
    out = {}
    for k, v in row.items():
        if isinstance(v, (np.floating, float)):
            v = float(v)
            out[k] = v if math.isfinite(v) else None
        elif isinstance(v, np.integer):
            out[k] = int(v)
        else:
            out[k] = v
    return out


def fit_display(rows: list[dict]) -> pd.DataFrame:
    """The fit table as shown: one row per group, named by what differs between the groups
    (`group`), then the --by columns beyond algorithm/env/config_hash (`env.beta`), then the fit."""
    extra = [k for k in rows[0] if k.startswith("cfg.")] if rows else []
    return pd.DataFrame([{
        "group": r["label"], **{short_key(k): r[k] for k in extra},
        "p̂": number_text(r["p"]), "95% CI": f"[{number_text(r['p_low'])}, {number_text(r['p_high'])}]", "b̂": number_text(r["b"]),
        "b CI": f"[{number_text(r['b_low'])}, {number_text(r['b_high'])}]", "floor ĉ": number_text(r["c"]),
        "ε window": f"[{number_text(r['eps_low'])}, {number_text(r['eps_high'])}]", "levels": r["n_levels"],
        "seeds": r["n_seeds"], "diverged": r["n_diverged"], "failed": r["n_failed"],
        "status": r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"} for r in rows])


def fit_heading(rows: list[dict]) -> str:
    metric, x = rows[0]["metric"], rows[0]["x"]
    return f"metric {metric} vs {x}: p = exponent of n_hit(ε) ~ ε^-p; b = decay exponent of {metric} ≈ c + A·{x}^-b"


FIT_FORMATS = ("table", "json", "csv", "latex")


def format_fit_rows(rows: list[dict], fmt: str) -> str:
    """`fit --format json|csv|latex`: JSON and CSV hold every field of every row (NaN/±inf as null in
    JSON, empty in CSV; lists joined by ';'), LaTeX the displayed table with its heading as caption."""
    if fmt == "json":
        return json.dumps([_jsonable(r) for r in rows], indent=2)
    if fmt == "csv":
        flat = [{k: ";".join(map(str, v)) if isinstance(v, list) else v for k, v in _jsonable(r).items()} for r in rows]
        return pd.DataFrame(flat).to_csv(index=False).rstrip("\n")
    if fmt == "latex":
        return latex_table(fit_display(rows), caption=fit_heading(rows))
    raise BadInput(f"--format: unknown format {fmt!r}; allowed: {', '.join(FIT_FORMATS)}")


def format_fit_table(rows: list[dict]) -> str:
    return fit_heading(rows) + "\n" + fit_display(rows).to_string(index=False)


# ---------------------------------------------------------------------------------------------- check

def default_claims() -> list[Path]:
    return claim_files()


def named_claims(names: list[str]) -> list[Claim]:
    """Claims from names, ids or paths (claims.find_claim), all parsed before any compute: for check,
    plot and report alike."""
    from ratebench.experiments import claims_by_name

    return claims_by_name(names)


MAX_SWEEP_JOBS = 256  # expected configs composed per experiment; a larger discrete sweep frees its swept keys


@dataclass(frozen=True)
class ExperimentConfigs:
    """What `ratebench run -m experiment=<name>` resolves to: one flattened config per job of its sweep
    (evidence.expected_flat), the keys its runs may vary in (evidence.ALWAYS_FREE, its `free_keys`, keys
    swept over a continuous range), and its tuning instances. configs None: not a shipped preset."""

    configs: tuple | None
    free: tuple
    tuning: frozenset = frozenset()


@functools.lru_cache(maxsize=64)
def experiment_configs(name: str) -> ExperimentConfigs:
    """The expected resolved configs of experiment `name`, composed by Hydra as `ratebench run -m
    experiment=<name>` composes each job (the sweep's discrete values expanded, free keys left out).
    A name that is not a file in conf/experiment/ (runs tagged by hand) has none: ExperimentConfigs(None)."""
    from omegaconf import OmegaConf
    from ratebench.config import compose

    if not EXPERIMENT_NAME.fullmatch(name) or name.startswith(".") or not experiment_file(name).exists():
        return ExperimentConfigs(None, evidence.ALWAYS_FREE)
    where = f"{experiment_file(name)}"
    try:
        with_hydra = compose([f"experiment={name}"], with_hydra=True)
        base = compose([f"experiment={name}"])
    except Exception as exc:  # noqa: BLE001 (Hydra raises several types: all mean the preset does not compose)
        raise BadInput(f"{where}: cannot compose experiment {name!r} ({type(exc).__name__}: {exc})") from None
    declared = [str(k) if isinstance(k, str) else k for k in (base.get("free_keys") or [])]
    flat_base = evidence.expected_flat(OmegaConf.to_container(base, resolve=True))
    unknown = [k for k in declared if not isinstance(k, str)
               or not any(key == k or key.startswith(k + ".") for key in flat_base)]
    if unknown:
        raise BadInput(f"{where}: free_keys: {unknown} name no key of the experiment's config; list dotted keys "
                       f"such as budget.samples or algorithm.lr_exponent")
    free = tuple(evidence.ALWAYS_FREE) + tuple(declared)
    node = OmegaConf.select(with_hydra, "hydra.sweeper.params", default=None)
    params = {str(k): str(v) for k, v in node.items_ex(resolve=False)} if node is not None else {}
    combos, continuous = evidence.sweep_combinations(params, free)
    if len(combos) > MAX_SWEEP_JOBS:
        continuous += [k for k in params if not evidence.is_free(k, free)]
        combos = [[]]
    free += tuple(continuous)
    configs = [flat_base if not combo else
               evidence.expected_flat(OmegaConf.to_container(compose([f"experiment={name}", *combo]), resolve=True))
               for combo in combos]
    tuning = frozenset(int(i) for c in configs for i in json.loads(c.get("tuning_instances") or "[]"))
    return ExperimentConfigs(tuple(configs), free, tuning)


def claim_evidence(loaded: Loaded, claim: Claim, where: str = "the runs",
                   free: tuple = ()) -> tuple[Loaded, str, str | None]:
    """(evidence, note, missing). The evidence is the runs of the claim's own experiment (and
    algorithm, env) whose resolved config equals the experiment's up to its free keys (evidence.py;
    `free`: keys freed for this check only, `check --free`), on held-out instances. No fallback to
    other runs of the algorithm: evidence produced for another purpose (another sweep, a tuning
    screen, the experiment with an override) is not the claim's evidence; the runs of the experiment
    that differ are named once in the note. Runs on an instance that their config or the experiment
    names in `tuning_instances` are dropped (the note says so). `missing` is the reason the claim
    cannot be judged (no runs, no matching runs, too few or the wrong instances)."""
    seeds = loaded.seeds[loaded.seeds["algorithm"] == claim.algorithm]
    if claim.env:
        seeds = seeds[seeds["env"] == claim.env]
    expected = experiment_configs(claim.experiment)
    free_keys = tuple(expected.free) + tuple(free)
    match = evidence.match_experiment(seeds, claim.experiment, list(expected.configs) if expected.configs else None,
                                      free_keys)
    tagged = seeds[seeds["experiment"] == claim.experiment]
    rejected = evidence.rejected_note(match, seeds, claim.experiment)
    notes = [rejected] if rejected and not match.seeds.empty else []
    if free:
        notes.append(f"keys freed for this check: {', '.join(free)}")
    if not match.checked:
        notes.append(f"experiment {claim.experiment!r} is not a file in conf/experiment: its runs are matched by "
                     f"their experiment tag only, their configs are not compared")
    seeds = match.seeds
    if seeds.empty:
        if tagged.empty:
            found = sorted({str(e) for e in loaded.seeds["experiment"].dropna()}) if len(loaded.seeds) else []
            missing = (f"no runs of experiment {claim.experiment!r} ({claim.algorithm}"
                       + (f" on {claim.env}" if claim.env else "") + f") under {where}"
                       + (f"; experiments found: {', '.join(found)}" if found else ""))
        else:
            missing = f"no run under {where} matches the config of experiment {claim.experiment}; {rejected}"
        return Loaded(loaded.metrics.iloc[:0], seeds, loaded.skipped), "; ".join(notes), missing
    seeds, tuning_note, missing = evidence.held_out(seeds, expected.tuning, claim.instances, where)
    if tuning_note:
        notes.insert(0, tuning_note)
    runs = set(seeds["run_dir"])
    return (Loaded(loaded.metrics[loaded.metrics["run_dir"].isin(runs)], seeds, loaded.skipped), "; ".join(notes),
            missing)


def evaluate_claim(loaded: Loaded, claim: Claim, opts: FitOptions, where: str = "the runs",
                   free: tuple = ()) -> tuple[Verdict, object, str]:
    """Pool all configurations of the evidence (bootstrap stratified by config hash) and judge it
    per environment instance (claims.judge). The curves returned are those of the worst instance
    (the ones v.fit was fitted on; all the evidence when it holds one instance)."""
    chosen, note, missing = claim_evidence(loaded, claim, where, free)
    if missing or chosen.seeds.empty:
        return Verdict(claim, INCONCLUSIVE, missing or "no evidence", None), None, note
    if claim.metric not in chosen.metrics.columns:
        raise BadInput(f"{claim.path}: metric {claim.metric!r} is not in the run records")
    curves = build_curves(chosen.metrics, chosen.seeds, claim.metric, claim.x)
    warn_identical_curves(curves, f"claim {claim.id}")
    v = judge(claim, curves, opts)
    if len(v.per_instance) > 1:
        curves = curves.subset(v.worst_instance)
    return v, curves, note


def claim_premise(loaded: Loaded, claim: Claim, premise_fn, where: str = "the runs", free: tuple = ()) -> dict | None:
    """The claim's premises on the instances of its evidence (bilevel claims only): per instance the
    weak-gradient-domination floor (in `gap` units: the largest gap among stationary points of F, below
    which the assumption guarantees nothing) and the exponent the λ-schedule imposes, 1/(q·c_λ) with
    B(λ) ∝ λ^-q. `holds` is False when the floor lies above the claim's ε_min on a `gap` claim."""
    if premise_fn is None or claim.algorithm != "bilevel":
        return None
    chosen, _, missing = claim_evidence(loaded, claim, where, free)
    if missing or chosen.seeds.empty:
        return None
    per_instance = {}
    for run_dir in sorted(set(chosen.seeds["run_dir"])):
        config = read_record(Path(run_dir) / "run.json")["config"]
        env, algo = config["env"], config.get("algorithm", {})
        key = int(env.get("instance_seed", 0))
        bound = ((config.get("model") or {}).get("reward") or {}).get("bound")  # the reward class the runs used
        if key not in per_instance:
            summary = (dict(premise_fn(env, float(algo.get("lam_exponent", 1 / 7)), reward_bound=bound))
                       if bound is not None else dict(premise_fn(env, float(algo.get("lam_exponent", 1 / 7)))))
            summary["c_lam"] = float(algo.get("lam_exponent", 1 / 7))
            summary["schedule_applies"] = algo.get("variant", "single_loop") == "single_loop"
            per_instance[key] = summary
    floors = [p["wgd_floor"] for p in per_instance.values()]
    exps = [p["implied_exponent"] for p in per_instance.values() if p["schedule_applies"]]
    lo_eps = claim.metric_eps_range[0]
    holds = not (claim.metric == "gap" and max(floors) > lo_eps)
    text = (f"premise on instance(s) {sorted(per_instance)}: weak gradient domination floor "
            f"{_span(floors)} in gap units — the assumption guarantees nothing below that gap here"
            + (f"; the claim's ε_min is {lo_eps:.3g}: PREMISE FAILS" if not holds else
               "" if claim.metric == "gap" else f" (this claim reads {claim.metric})"))
    if exps:
        text += (f"; the λ-schedule imposes the asymptotic exponent 1/(q·c_λ) = {_span(exps)} "
                 f"(q = {_span([p['q'] for p in per_instance.values()])}, c_λ = "
                 f"{_span([p['c_lam'] for p in per_instance.values()])}) by construction, whatever the algorithm does")
    return {"text": text, "holds": holds, "per_instance": per_instance, "wgd_floor": max(floors),
            "implied_exponent": exps}


def _span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.3g}" if abs(hi - lo) <= 1e-3 * max(abs(hi), 1e-12) else f"{lo:.3g}–{hi:.3g}"


def identical_curves(curves) -> list[tuple[int, str, str]]:
    """(seed, run_dir, run_dir) for every pair of fitted rows from different runs that share a seed
    and have the same curve to the last bit: pooled configurations whose knob did not change the
    result (or a copy with another run_hash). Pooling them counts one seed's evidence twice."""
    fitted = curves.seeds[curves.used].reset_index(drop=True)
    first: dict[tuple, str] = {}
    pairs = []
    for i, (seed, run_dir) in enumerate(zip(fitted["seed"], fitted["run_dir"])):
        if not np.isfinite(curves.values[i]).any():  # no data (e.g. grad_sq of DPO): nothing is duplicated
            continue
        key = (int(seed), np.nan_to_num(curves.values[i], nan=-1.0, posinf=-2.0).tobytes())
        if key in first and first[key] != run_dir:
            pairs.append((int(seed), first[key], str(run_dir)))
        first.setdefault(key, str(run_dir))
    return pairs


def warn_identical_curves(curves, what: str) -> None:
    pairs = identical_curves(curves)
    if pairs:
        shown = "; ".join(f"seed {s}: {a} = {b}" for s, a, b in pairs[:3]) + (" ..." if len(pairs) > 3 else "")
        warnings.warn(f"{what}: {len(pairs)} seed curves are identical across pooled runs (the same seed gave the "
                      f"same result in different configurations, so the pooled CI counts it more than once): {shown}",
                      stacklevel=2)


EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def experiment_dir(workdir: Path, experiment: str) -> Path:
    """One folder per experiment: claims that share an experiment share its runs."""
    return Path(workdir) / experiment


def experiment_file(name: str) -> Path:
    """experiment/<name>.yaml in the conf folder that has it (ratebench's, a plug-in's, a claim file's own);
    a path that does not exist when none has it."""
    from ratebench.registry import find_file

    return find_file("experiment", name) or CONF_DIR / "experiment" / f"{name}.yaml"


def check_experiment_name(claim: Claim) -> None:
    """The experiment must be a shipped preset named without path parts (it names a folder)."""
    from ratebench.registry import conf_folders, files

    source = experiment_file(claim.experiment)
    known = sorted({p.stem for p in files("experiment")})
    if not EXPERIMENT_NAME.fullmatch(claim.experiment) or claim.experiment.startswith(".") or not source.exists():
        folders = ", ".join(str(f / "experiment") for f in conf_folders())
        raise BadInput(f"{claim.path}: experiment: no experiment {claim.experiment!r} in {folders}; "
                       f"allowed: {', '.join(known)}")


def experiment_digest(name: str) -> str:
    """What a finished sweep's marker records: the experiment file and the result-producing code.
    Either changing means the runs must be re-made (the sweep itself skips jobs that are still valid)."""
    from ratebench.code_identity import installed_plugins_hash

    plugins = installed_plugins_hash().encode()  # empty without plug-ins: the digest of ratebench alone
    return hashlib.sha256(experiment_file(name).read_bytes() + code_fingerprint().encode() + plugins).hexdigest()[:16]


def ensure_experiment(experiment: str, workdir: Path, claim_ids: list[str]) -> Path:
    """Run `ratebench run -m experiment=<name>` into workdir/<name> unless a finished sweep of the
    same experiment file and code is there (marker .complete holds their hash)."""
    out = experiment_dir(workdir, experiment)
    digest = experiment_digest(experiment)
    marker = out / ".complete"
    label = ",".join(claim_ids)
    if marker.exists() and marker.read_text().strip() == digest:
        print(f"[{label}] reusing finished runs of experiment {experiment} in {out}", file=sys.stderr)
        return out
    cmd = [sys.executable, "-c", "import sys; from ratebench.cli import main; sys.exit(main())",
           "run", "-m", f"experiment={experiment}", f"hydra.sweep.dir={out}"]
    print(f"[{label}] running: ratebench run -m experiment={experiment} hydra.sweep.dir={out}", file=sys.stderr)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if result.returncode != 0:  # the run's own status: 2 bad input, 3 internal error, 130/143 a signal
        raise RunFailed(result.returncode, f"[{label}] `ratebench run -m experiment={experiment}` exited "
                                           f"{result.returncode}")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest + "\n")
    return out


def check_command(ns) -> int:
    claims = named_claims(ns.claims) or [load_claim(p) for p in default_claims()]  # all parsed before any compute
    if not claims:
        raise BadInput(f"no claim files given and none in {CONF_DIR / 'claims'}")
    opts = fit_options(ns)
    free = free_keys(ns)
    if ns.junit:
        writable_folder(Path(ns.junit).absolute().parent, "--junit")
    for c in claims:  # the experiments' configs (and their free_keys) before any run or fit
        experiment_configs(c.experiment)
    if ns.runs:
        loaded = load_dir(ns.runs, ns.strict)
        verdicts = [_judged(loaded, c, opts, ns.runs, i, len(claims), free) for i, c in enumerate(claims, start=1)]
    else:
        for c in claims:  # every experiment must exist before any of them runs
            check_experiment_name(c)
        by_experiment: dict[str, list[Claim]] = {}
        for c in claims:
            by_experiment.setdefault(c.experiment, []).append(c)
        runs_of = {}
        for name, group in by_experiment.items():  # each experiment runs (or is reused) once
            folder = ensure_experiment(name, Path(ns.workdir), [c.id for c in group])
            runs_of[name] = (load_dir(folder, ns.strict), str(folder))
        verdicts = [_judged(runs_of[c.experiment][0], c, opts, runs_of[c.experiment][1], i, len(claims), free)
                    for i, c in enumerate(claims, start=1)]
    rows = []
    for claim, (v, _, note) in zip(claims, verdicts):
        row = verdict_row(v, note)
        from ratebench.analysis.code_versions import evidence_code

        loaded_c, where = (loaded, ns.runs) if ns.runs else runs_of[claim.experiment]
        row["code"] = evidence_code(claim_evidence(loaded_c, claim, where, free)[0].seeds)  # what computed it
        if ns.premise is not None and claim.algorithm == "bilevel":
            loaded_c, where = (loaded, ns.runs) if ns.runs else runs_of[claim.experiment]
            print(f"[{claim.id}] premises on the evidence's instances (ratebench audit; cached after the first time)",
                  file=sys.stderr)
            prem = claim_premise(loaded_c, claim, ns.premise, where, free)
            if prem is not None:
                row.update(premise=prem["text"], premise_holds=prem["holds"], wgd_floor=prem["wgd_floor"],
                           implied_exponent=prem["implied_exponent"])
        rows.append(row)
    if ns.json:
        print(json.dumps([_jsonable(r) for r in rows], indent=2))
    else:
        print(format_verdicts(rows))
    if ns.junit:
        from ratebench.analysis.junit import junit_xml

        Path(ns.junit).write_text(junit_xml([_jsonable(r) for r in rows]))
    if ns.fail_on == "violated":
        return 1 if any(v.verdict == VIOLATED for v, _, _ in verdicts) else 0
    return 0 if all(v.verdict == PASS for v, _, _ in verdicts) else 1


def _judged(loaded: Loaded, claim: Claim, opts: FitOptions, where: str, i: int, n: int, free: tuple = ()):
    """evaluate_claim, then one progress line: `[check 2/5] control_reward_mle: PASS`."""
    result = evaluate_claim(loaded, claim, opts, where=where, free=free)
    progress(f"[check {i}/{n}] {claim.id}: {result[0].verdict}")
    return result


def verdict_row(v: Verdict, note: str = "") -> dict:
    c, f = v.claim, v.fit
    row = {"claim": c.id, "algorithm": c.algorithm, "metric": c.metric, "x": c.x, "relation": c.relation,
           "claimed_p": c.metric_exponent, "tolerance": c.tolerance, "verdict": v.verdict, "reason": v.reason,
           "eps_claim": [c.metric_eps_range[0], c.metric_eps_range[1]], "note": note}
    if f is not None:
        row.update(p=f.p, p_low=f.p_low, p_high=f.p_high, eps_low=f.eps_low, eps_high=f.eps_high,
                   n_seeds=f.n_seeds, n_diverged=f.n_diverged, n_saturated=f.n_saturated, n_stalled=f.n_stalled,
                   n_unhealthy=n_unhealthy(f), n_failed=f.n_failed, b=f.b, c=f.c,
                   p_local=f.p_local, p_local_high=f.p_local_high, p_trend=f.p_trend)
    else:
        row.update(n_seeds=0, n_diverged=0, n_saturated=0, n_stalled=0, n_unhealthy=0, n_failed=0)
    take = what_it_would_take(v)
    if take:
        row["what_it_would_take"] = take
    row.update(n_instances=max(len(v.per_instance), 1 if f is not None else 0),
               worst_instance=None if v.worst_instance is None else _jsonable({"i": v.worst_instance})["i"])
    return row


def format_verdicts(rows: list[dict]) -> str:
    table = pd.DataFrame([{
        "claim": r["claim"], "metric": r["metric"],
        "claimed": ("≤ " if r["relation"] == "upper_bound" else "= ") + number_text(r["claimed_p"]) +
                   (f" ± {number_text(r['tolerance'])}" if r["relation"] == "equals" else ""),
        "p̂": number_text(r.get("p")), "95% CI": f"[{number_text(r.get('p_low'))}, {number_text(r.get('p_high'))}]",
        "ε window": f"[{number_text(r.get('eps_low'))}, {number_text(r.get('eps_high'))}]",
        "seeds": r.get("n_seeds", 0), "diverged": r.get("n_diverged", 0), "saturated": r.get("n_saturated", 0),
        "stalled": r.get("n_stalled", 0), "instances": r.get("n_instances", 0),
        "worst": "-" if r.get("worst_instance") is None or r.get("n_instances", 0) < 2 else r["worst_instance"],
        "verdict": r["verdict"]} for r in rows])
    lines = [table.to_string(index=False), ""]
    for r in rows:
        lines.append(f"{r['claim']}: {r['verdict']} — {r['reason']}" + (f" ({r['note']})" if r["note"] else ""))
        if r.get("premise"):
            lines.append(f"    {r['premise']}")
        for text in r.get("code") or []:
            lines.append(f"    code: {text}")
        for text in (r.get("what_it_would_take") or {}).get("text", []):
            lines.append(f"    what it would take — {text}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plot, report

def writable_folder(path: Path, option: str) -> Path:
    """path as an output folder that can be made and written, checked before any compute (BadInput if not)."""
    why = unwritable_reason(path)
    if why:
        raise BadInput(f"{option}: cannot write the output folder {str(path)!r}: {why}")
    return Path(path)


def plot_command(ns) -> int:
    from ratebench.analysis import plots

    writable_folder(Path(ns.out) if ns.out else Path(ns.dir) / "figures", "--out")
    loaded = load_dir(ns.dir, ns.strict)
    metrics = ns.metric or [m for m in METRICS if m in loaded.metrics.columns
                            and has_positive(loaded.metrics[m])]
    for m in metrics:
        check_metric(loaded, m, ns.x)
    by = group_keys(ns.by)
    check_by(loaded, by)
    claims = named_claims(ns.claims) if ns.claims is not None else [load_claim(p) for p in default_claims()]
    out = Path(ns.out) if ns.out else Path(ns.dir) / "figures"
    out.mkdir(parents=True, exist_ok=True)
    opts = fit_options(ns)
    for i, m in enumerate(metrics, start=1):
        started = time.monotonic()
        results = fit_groups(loaded, m, ns.x, by, opts)
        paths = (plots.metric_figure(results, claims, out) + plots.interval_figure(results, claims, out)
                 + plots.runtime_figure(results, out))
        for path in paths:
            print(path)
        pngs = [p.name for p in paths if p.suffix == ".png"]
        progress(f"[plot {i}/{len(metrics)}] {m}: {len(results)} group(s) → {', '.join(pngs) or 'no data'} "
                 f"({time.monotonic() - started:.1f} s)")
    return 0


def progress(message: str) -> None:
    """One progress line on stderr (a figure, a claim); quiet under CI=true."""
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        print(message, file=sys.stderr, flush=True)


def report_command(ns) -> int:
    from ratebench.analysis import report

    writable_folder(Path(ns.out) if ns.out else Path(ns.dir) / "report", "--out")
    free = free_keys(ns)
    loaded = load_dir(ns.dir, ns.strict)
    algorithms = set(loaded.seeds["algorithm"])
    if ns.claims:
        claims = named_claims(ns.claims)
    else:
        claims = [c for c in (load_claim(p) for p in default_claims()) if c.algorithm in algorithms]
    out = Path(ns.out) if ns.out else Path(ns.dir) / "report"
    premise = None
    if ns.premise is not None:
        def premise(loaded_, claim):
            return claim_premise(loaded_, claim, ns.premise, ns.dir, free)
    command = "ratebench report " + " ".join(shlex.quote(a) for a in getattr(ns, "argv", [ns.dir]))
    paths = report.write_report(loaded, claims, fit_options(ns), out,
                                functools.partial(evaluate_claim, free=free), fit_groups, premise=premise,
                                command=command)
    for p in paths:
        print(p)
    return 0


# ---------------------------------------------------------------------------------------------- compare

def compare_command(ns) -> int:
    from ratebench.analysis.paired import difference_table

    loaded = load_dir(ns.dir, ns.strict)
    check_metric(loaded, ns.metric, ns.x)
    by = group_keys(ns.by)
    check_by(loaded, by)
    groups = [(key["label"], curves) for key, curves in group_curves(loaded, ns.metric, ns.x, by)]
    if len(groups) < 2:
        raise BadInput(f"--by {ns.by}: {len(groups)} group under {ns.dir}; compare needs at least 2")
    table = difference_table(groups, fit_options(ns))
    if ns.format == "json":
        print(json.dumps([_jsonable(r) for r in table.to_dict("records")], indent=2))
    elif ns.format == "csv":
        print(table.to_csv(index=False).rstrip("\n"))
    else:
        print(f"p̂_a − p̂_b on {ns.metric} vs {ns.x} (N(ε) ∝ ε^-p; < 0: a needs fewer {ns.x}), paired bootstrap "
              f"95% CI over the (instance, seed) pairs both groups ran")
        shown = pd.DataFrame({"a": table["a"], "b": table["b"], "p̂_a": table["p_a"].map(number_text),
                              "p̂_b": table["p_b"].map(number_text), "p̂_a − p̂_b": table["diff"].map(number_text),
                              "95% CI": [f"[{number_text(lo)}, {number_text(hi)}]" for lo, hi in zip(table["diff_low"],
                                                                                       table["diff_high"])],
                              "shared": table["n_shared"], "unit": table["boot_unit"],
                              "status": [st if st == "ok" else f"{st}: {why}" for st, why in
                                         zip(table["status"], table["reason"])]})
        print(shown.to_string(index=False))
    return 0
