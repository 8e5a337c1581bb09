"""`ratebench fit | plot | check | report | compare`: argument parsing and printing. What they
compute comes from the analysis's functions (groups.py, judgement.py, plots.py, report.py), their
bad-input checks from inputs.py, and a claim's experiment (its configs, its runs) from the harness
(ratebench.experiments)."""
from __future__ import annotations

import argparse
import functools
import json
import math
import re
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from ratebench.analysis import verdict_lines
from ratebench.analysis.claims import PASS, VIOLATED, Claim, Verdict, load_claim, n_unhealthy, what_it_would_take
from ratebench.analysis.curves import METRICS, X_AXES, group_keys, has_positive
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.groups import fit_groups, fit_rows, group_curves
from ratebench.analysis.inputs import (CONF_DIR, BadInput, check_by, check_fit_options, check_metric, default_claims,
                                       load_dir, named_claims)
from ratebench.analysis.judgement import claim_premise, has_premise
from ratebench.analysis.load import Loaded, RunRecordError
from ratebench.analysis.tables import estimate_digits, fit_display, fit_heading, latex_table, number_text, progress
from ratebench.core.errors import ConfigError
from ratebench.core.records import unwritable_reason
from ratebench.analysis.code_versions import evidence_code
from ratebench.experiments import (RunFailed, check_experiment_name, claim_evidence, ensure_experiment, evaluate_claim,
                                   experiment_configs)

def main(command: str, args: list[str], premise=None, premise_inputs=None) -> int:
    """premise: optional callable (env config dict, c_lam) -> {"wgd_floor", "implied_exponent", "q"}
    (the CLI passes ratebench.audit.premise_summary): check and report print the claim's premises on
    the evidence's instances. premise_inputs(algorithm, algorithm config) -> {"c_lam",
    "schedule_applies"} or None (default ratebench.audit.premise_inputs: the algorithm class's own)."""
    handlers = {"fit": fit_command, "plot": plot_command, "check": check_command, "report": report_command,
                "compare": compare_command}
    parser = PARSERS[command]()
    try:
        ns = parser.parse_args(args)
    except SystemExit as exc:  # --help → 0, argparse errors → 2
        return int(exc.code or 0)
    ns.premise = None if getattr(ns, "no_premise", True) else premise
    if ns.premise is not None and premise_inputs is None:
        from ratebench.audit import premise_inputs
    ns.premise_inputs = premise_inputs
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
    p = argparse.ArgumentParser(prog="ratebench check", description="Verdict per claim: exit 0 when "
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
                   help="exit 1 when any claim is not PASS (default) or only when one is VIOLATED "
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
    notes = [f"\n{r['label']}: {r['n_copies']} seed(s) with bit-identical curves in one run counted once "
             f"({r['n_seeds']} distinct seeds fitted)" for r in rows if r.get("n_copies")]
    return fit_heading(rows) + "\n" + fit_display(rows).to_string(index=False) + "".join(notes)


# ---------------------------------------------------------------------------------------------- check

def check_command(ns) -> int:
    claims = named_claims(ns.claims) or [load_claim(p) for p in default_claims()]  # all parsed before any compute
    if not claims:
        raise BadInput(f"no claim files given and none in {CONF_DIR / 'claims'}")
    opts = fit_options(ns)
    free = free_keys(ns)
    if ns.junit:
        writable_folder(Path(ns.junit).absolute().parent, "--junit")
    for c in claims:  # the experiments' configs (and their free_keys) before any run or fit
        for name in c.experiments:
            experiment_configs(name)
    if ns.runs:
        loaded = load_dir(ns.runs, ns.strict)
        verdicts = [_judged(loaded, ns.runs, c, opts, i, len(claims), free) for i, c in enumerate(claims, start=1)]
    else:
        for c in claims:  # every experiment must exist before any of them runs
            check_experiment_name(c)
        by_experiment: dict[str, list[Claim]] = {}
        for c in claims:
            for name in c.experiments:
                by_experiment.setdefault(name, []).append(c)
        runs_of = {}
        for name, group in by_experiment.items():  # each experiment runs (or is reused) once
            folder = ensure_experiment(name, Path(ns.workdir), [c.id for c in group])
            runs_of[name] = (load_dir(folder, ns.strict), str(folder))
        for c in claims:  # a difference claim reads the runs of both its experiments
            if len(c.experiments) > 1:
                parts = [runs_of[name] for name in c.experiments]
                runs_of[c.experiments] = (merged_runs([ld for ld, _ in parts]), " and ".join(w for _, w in parts))
        verdicts = [_judged(*runs_of[_runs_key(c)], c, opts, i, len(claims), free)
                    for i, c in enumerate(claims, start=1)]
    rows = []
    for claim, (v, _, note) in zip(claims, verdicts):
        row = verdict_row(v, note)
        if v.fit is not None:  # the code that computed the evidence (run.json provenance.code)
            loaded_c, where = (loaded, ns.runs) if ns.runs else runs_of[_runs_key(claim)]
            row["code"] = evidence_code(claim_evidence(loaded_c, claim, where, free)[0].seeds)
        if ns.premise is not None and has_premise(claim, ns.premise_inputs) and v.fit is not None:  # no evidence: no premise
            loaded_c, where = (loaded, ns.runs) if ns.runs else runs_of[_runs_key(claim)]
            print(f"[{claim.id}] premises on the evidence's instances (ratebench audit; cached after the first time)",
                  file=sys.stderr)
            prem = claim_premise(loaded_c, claim, ns.premise, ns.premise_inputs, experiment_configs(claim.experiment),
                                 where, free)
            if prem is not None:
                row.update(premise=prem["text"], premise_holds=prem["holds"], wgd_floor=prem["wgd_floor"],
                           implied_exponent=prem["implied_exponent"])
        rows.append(row)
    if ns.json:
        print(json.dumps([_jsonable(r) for r in rows], indent=2))
    else:
        print(format_verdicts(rows, ns.runs))
    if ns.junit:
        from ratebench.analysis.junit import junit_xml

        Path(ns.junit).write_text(junit_xml([_jsonable(r) for r in rows]))
    if ns.fail_on == "violated":
        return 1 if any(v.verdict == VIOLATED for v, _, _ in verdicts) else 0
    return 0 if all(v.verdict == PASS for v, _, _ in verdicts) else 1


def _runs_key(claim: Claim):
    """The key of check's loaded runs for a claim: its experiment, or both of a difference claim's."""
    return claim.experiments if len(claim.experiments) > 1 else claim.experiment


def merged_runs(parts: list[Loaded]) -> Loaded:
    """The runs of several experiment folders as one Loaded (a difference claim's two experiments)."""
    return Loaded(pd.concat([p.metrics for p in parts], ignore_index=True),
                  pd.concat([p.seeds for p in parts], ignore_index=True), [s for p in parts for s in p.skipped])


def _judged(loaded: Loaded, where: str, claim: Claim, opts: FitOptions, i: int, n: int, free: tuple = ()):
    """evaluate_claim, then one progress line: `[check 2/5] control_reward_mle: PASS`."""
    result = evaluate_claim(loaded, claim, opts, where=where, free=free)
    if result[0].fit is not None:  # a claim without evidence is said once, in the summary line (verdict_lines)
        progress(f"[check {i}/{n}] {claim.id}: {result[0].verdict}")
    return result


FORM_ROW_KEYS = {"geometric": ("rho", "rho_low", "rho_high", "per_decade", "per_decade_low", "per_decade_high")}


def verdict_row(v: Verdict, note: str = "") -> dict:
    """One claim's verdict as plain values (check --json): every form has form, claimed (text), estimate
    {name, value, low, high} and the seed counts; a polynomial claim also claimed_p, p, p_low, p_high and
    the fit's b, c, local exponent; a geometric one rho, rho_low, rho_high (and per_decade); a difference
    p_a, p_b and baseline_experiment; an exponent_curve per_value (value, predicted, verdict, p̂ and CI)."""
    c, f = v.claim, v.fit
    row = {"claim": c.id, "algorithm": c.algorithm, "form": c.form, "metric": c.metric, "x": c.x,
           "relation": c.relation, "claimed": c.claimed_text, "claimed_p": c.metric_exponent, "tolerance": c.tolerance,
           "verdict": v.verdict, "reason": v.reason, "eps_claim": [c.metric_eps_range[0], c.metric_eps_range[1]],
           "note": note, "experiment": c.experiment, "evidence": f is not None}
    if f is not None:
        row.update(eps_low=f.eps_low, eps_high=f.eps_high, n_seeds=f.n_seeds, n_diverged=f.n_diverged,
                   n_saturated=f.n_saturated, n_stalled=f.n_stalled, n_unhealthy=n_unhealthy(f), n_failed=f.n_failed)
        if c.form in ("polynomial", "exponent_curve"):
            row.update(p=f.p, p_low=f.p_low, p_high=f.p_high, b=f.b, c=f.c, p_local=f.p_local,
                       p_local_high=f.p_local_high, p_trend=f.p_trend)
        row.update({k: getattr(f, k) for k in FORM_ROW_KEYS.get(c.form, ())})
    else:
        row.update(n_seeds=0, n_diverged=0, n_saturated=0, n_stalled=0, n_unhealthy=0, n_failed=0)
    est = v.detail.get("estimate")
    if est is None and f is not None and c.form == "polynomial":
        est = {"name": "p̂", "value": f.p, "low": f.p_low, "high": f.p_high}
    if est is not None:
        row["estimate"] = _jsonable(est)
    if c.form == "geometric":
        row["claimed_rho"] = c.rho
    if c.form == "difference":
        fa, fb = v.detail.get("fit_a"), v.detail.get("fit_b")
        row.update(baseline_experiment=c.baseline_experiment, claimed_difference=c.difference / c.unit_power,
                   p_a=getattr(fa, "p", None), p_b=getattr(fb, "p", None), n_shared=v.detail.get("n_shared", 0))
    if c.form == "exponent_curve":
        row.update(parameter=c.parameter, predicted=c.predicted,
                   per_value=[_jsonable({k: r.get(k) for k in ("value", "predicted", "verdict", "p", "p_low", "p_high",
                                                               "n_seeds")}) for r in v.detail.get("per_value", [])])
    take = what_it_would_take(v)
    if take:
        row["what_it_would_take"] = take
    row.update(n_instances=max(len(v.per_instance), int(getattr(f, "n_instances", 1) or 1) if f is not None else 0),
               worst_instance=None if v.worst_instance is None else _jsonable({"i": v.worst_instance})["i"])
    return row


def _estimate_text(est: dict | None, part: str = "value") -> str:
    """'p̂ 0.95', 'ρ̂ 0.809996', ... (part value) or '[low, high]' (part ci): the number a verdict was decided
    on, named, to tables.estimate_digits figures."""
    if not est:
        return "-" if part == "value" else "[-, -]"
    digits = estimate_digits(est.get("name"))
    if part == "ci":
        return f"[{number_text(est.get('low'), digits)}, {number_text(est.get('high'), digits)}]"
    return f"{est['name']} {number_text(est.get('value'), digits)}"


def format_verdicts(rows: list[dict], where: str | None = None) -> str:
    """The verdict table and a line per judged claim; claims without evidence get no table row (verdict_lines)."""
    all_rows, (rows, absent, other) = rows, verdict_lines.split_rows(rows)
    if len(absent) == 1:  # one claim: its own reason says it in one line
        absent, other = [], [r for r in all_rows if r in absent or r in other]
    table = pd.DataFrame([{
        "claim": r["claim"], "form": r.get("form", "polynomial"), "metric": r["metric"], "claimed": r["claimed"],
        "estimate": _estimate_text(r.get("estimate")),
        "95% CI": _estimate_text(r.get("estimate"), "ci"),
        "ε window": f"[{number_text(r.get('eps_low'))}, {number_text(r.get('eps_high'))}]",
        "seeds": r.get("n_seeds", 0), "diverged": r.get("n_diverged", 0), "saturated": r.get("n_saturated", 0),
        "stalled": r.get("n_stalled", 0), "instances": r.get("n_instances", 0),
        "worst": "-" if r.get("worst_instance") is None or r.get("n_instances", 0) < 2 else r["worst_instance"],
        "verdict": r["verdict"]} for r in rows])
    lines = [table.to_string(index=False), ""] if rows else []

    def said(r: dict) -> str:
        return f"{r['claim']}: {r['verdict']} — {r['reason']}" + (f" ({r['note']})" if r["note"] else "")

    for r in rows:
        lines.append(said(r))
        if r.get("premise"):
            lines.append(f"    {r['premise']}")
        for text in r.get("code") or []:
            lines.append(f"    code: {text}")
        for pv in r.get("per_value") or []:
            lines.append(f"    {r.get('parameter')} = {number_text(pv.get('value'))}: {pv.get('verdict')}, p̂ "
                         f"{number_text(pv.get('p'))} [{number_text(pv.get('p_low'))}, {number_text(pv.get('p_high'))}] "
                         f"vs predicted {number_text(pv.get('predicted'))} ± {number_text(r.get('tolerance'))} "
                         f"({pv.get('n_seeds')} seeds)")
        for text in (r.get("what_it_would_take") or {}).get("text", []):
            lines.append(f"    what it would take — {text}")
    lines += [said(r) for r in other]
    lines += [verdict_lines.no_evidence_line(absent, where)] if absent else []
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
        paths = plots.figures(results, claims, out)
        for path in paths:
            print(path)
        pngs = [p.name for p in paths if p.suffix == ".png"]
        progress(f"[plot {i}/{len(metrics)}] {m}: {len(results)} group(s) → {', '.join(pngs) or 'no data'} "
                 f"({time.monotonic() - started:.1f} s)")
    return 0


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
            return claim_premise(loaded_, claim, ns.premise, ns.premise_inputs, experiment_configs(claim.experiment),
                                 ns.dir, free)

    command = "ratebench report " + " ".join(shlex.quote(a) for a in getattr(ns, "argv", [ns.dir]))
    paths = report.write_report(loaded, claims, fit_options(ns), out, functools.partial(evaluate_claim, free=free),
                                fit_groups, premise=premise,
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
