"""`ratebench report`: one self-contained HTML file (figures embedded as base64 PNG) and its
Markdown twin: per claim the verdict, p̂ and CI, window, figures, diverged seeds, hashes, commands."""
from __future__ import annotations

import base64
import html
import shlex
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from ratebench.analysis import plots
from ratebench.analysis.claims import UPPER_BOUND_CAVEAT, what_it_would_take
from ratebench.analysis.curves import METRICS, has_positive
from ratebench.analysis.load import RunRecordError, read_record
from ratebench.analysis.tables import estimate_digits, markdown_table, number_text


def commands_of(seeds: pd.DataFrame) -> list[str]:
    """The command line that produced each run (from run.json provenance), one per run, each as a
    comment line naming the run folder and the command wrapped with shell continuations."""
    out = []
    for run_dir in sorted(set(seeds["run_dir"])):
        try:
            argv = read_record(Path(run_dir) / "run.json").get("provenance", {}).get("argv")
        except RunRecordError:
            argv = None
        text = " ".join([argv[0]] + [shlex.quote(a) for a in argv[1:]]) if argv else "(not recorded)"
        out.append(f"# {run_dir}\n{wrap_command(text)}")
    return out


def wrap_command(text: str, width: int = 96) -> str:
    """A long command line as several lines joined by ` \\` (still one command for a shell)."""
    words, lines, line = text.split(" "), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line + " \\")
            line = "    " + w
        else:
            line = f"{line} {w}" if line else w
    return "\n".join([*lines, line])


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary_line(loaded) -> str:
    seeds = loaded.seeds
    unhealthy = ", ".join(f"{int((seeds['status'] == s).sum())} {s}" for s in plots.UNHEALTHY)
    return (f"{plural(len(set(seeds['run_dir'])), 'run')}, {plural(len(seeds), 'seed')} "
            f"({unhealthy}, {(seeds['status'] == 'failed').sum()} failed).")


def provenance_line(command: str | None = None) -> str:
    """What made this report: package version, commit (+dirty), UTC date, the command."""
    import datetime

    import ratebench
    from ratebench.core.records import git_commit

    commit = git_commit(with_dirty=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"ratebench {ratebench.__version__} · commit {commit[:12] + commit[40:] if commit else 'unknown'} · "
            f"{date}" + (f" · `{command}`" if command else ""))


def _step(value) -> str:
    """A status step as recorded: an integer (a float column holds 40.0 when other seeds have none)."""
    try:
        return str(int(value)) if float(value) == int(value) else str(value)
    except (TypeError, ValueError, OverflowError):
        return str(value)


RUNTIME_NOTE = ("Fixed-target runtimes over the claim's ε range: ERT(ε) = samples spent by all seeds (each until it "
                "reached ε, or its whole budget if it never did) / seeds that reached ε, and the runtime ECDF; seeds "
                "that never reach ε count here instead of vanishing.")
UNHEALTHY_HEADING = "Unhealthy (diverged, saturated, stalled) and failed seeds"


def claim_section(v, curves, note: str, evidence_seeds: pd.DataFrame, fig_png: Path | None) -> dict:
    """Everything the report says about one claim, as plain values."""
    c, f = v.claim, v.fit
    bad = evidence_seeds[evidence_seeds["status"] != "completed"]

    take = what_it_would_take(v)
    return {
        "claim": c, "verdict": v.verdict, "reason": v.reason, "note": note, "fit": f, "figure": fig_png,
        "what_it_would_take": take["text"] if take else [],
        "diverged": [f"{r.run_dir} seed {r.seed}: {r.status} at step {_step(r.status_step)}"
                     + (f" ({r.message})" if isinstance(r.message, str) else "") for r in bad.itertuples()],
        "hashes": sorted(set(evidence_seeds["config_hash"])), "commands": commands_of(evidence_seeds),
        "reproduce": f"ratebench run -m experiment={c.experiment}",
        "sensitivity": f.arrays.get("sensitivity") if f is not None else None,
        "per_instance": dict(getattr(v, "per_instance", {}) or {}), "pooled": getattr(v, "pooled", None),
        "worst_instance": getattr(v, "worst_instance", None),
        "estimate": v.detail.get("estimate") or (None if f is None or c.form != "polynomial" else
                                                 {"name": "p̂", "value": f.p, "low": f.p_low, "high": f.p_high}),
    }


FIGURE_FORMATS = ("png",)  # the figures report.md links and report.html embeds (`ratebench plot` adds the PDF): a
#                           PDF nobody links cost a quarter of a report's time


def write_report(loaded, claims, opts, out_dir: Path, evaluate_claim, fit_groups, premise=None,
                 command: str | None = None) -> list[Path]:
    """Compute every claim's verdict on the runs in `loaded` and write report.html + report.md.
    premise(loaded, claim) -> dict with "text" (or None): the claim's premises on its instances.
    command: the command line shown in the report's header. One progress line per claim and figure."""
    from ratebench.analysis.tables import progress
    from ratebench.analysis.fit import window_sensitivity

    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    sections = []
    for claim in claims:
        v, curves, note = evaluate_claim(loaded, claim, opts)
        evidence = loaded.seeds[loaded.seeds["algorithm"] == claim.algorithm]
        if curves is not None:
            evidence = curves.seeds
        png = runtime_png = None
        if curves is not None and v.fit is not None and v.fit.status != "no_data" and claim.form == "polynomial":
            key = {"algorithm": claim.algorithm, "env": claim.env or ",".join(sorted(set(curves.seeds["env"]))),
                   "config_hash": None}
            png = plots.metric_figure([(key, v.fit, curves)], [claim], fig_dir, stem=f"claim_{claim.id}",
                                      formats=FIGURE_FORMATS)[0]
            runtime = plots.runtime_figure([(key, v.fit, curves)], fig_dir, stem=f"claim_{claim.id}_runtime",
                                           eps_range=claim.metric_eps_range, title=" over the claim's ε range",
                                           formats=FIGURE_FORMATS)
            runtime_png = runtime[0] if runtime else None
            lo, hi = claim.metric_eps_range
            v.fit.arrays["sensitivity"] = window_sensitivity(curves, replace(opts, eps_min=lo, eps_max=hi))
        section = claim_section(v, curves, note, evidence, png)
        section["runtime_figure"] = runtime_png
        progress(f"[report] claim {claim.id}: {v.verdict}")
        prem = premise(loaded, claim) if premise is not None else None
        section["premise"] = prem["text"] if prem else None
        sections.append(section)
    overview = []
    for metric in [m for m in METRICS if m in loaded.metrics.columns
                   and has_positive(loaded.metrics[m])]:
        results = fit_groups(loaded, metric, "samples", ["algorithm", "env", "config_hash"], opts)
        paths = (plots.metric_figure(results, claims, fig_dir, formats=FIGURE_FORMATS)
                 + plots.runtime_figure(results, fig_dir, formats=FIGURE_FORMATS))
        progress(f"[report] {metric}: {plural(len(results), 'group')}, {plural(len(paths), 'figure')}")
        overview.append((metric, results, paths))
    out_dir.mkdir(parents=True, exist_ok=True)
    md, page = out_dir / "report.md", out_dir / "report.html"
    header = provenance_line(command)
    targets = target_table(overview)  # bootstraps each group's final values: once for both renderings
    md.write_text(render_markdown(sections, overview, loaded, md.parent, header, targets))
    page.write_text(render_html(sections, overview, loaded, header, targets))
    return [page, md]


def _final_with_band(curves) -> str:
    """The IQM at the last evaluation point with its 95% bootstrap band over seeds, as text."""
    iqm, _, band = plots.curve_bands(curves)
    seen = np.flatnonzero(np.isfinite(iqm))
    if not seen.size:
        return "-"
    j = seen[-1]
    return f"{number_text(iqm[j])} [{number_text(band[0, j])}, {number_text(band[1, j])}]"


def target_table(overview) -> pd.DataFrame:
    """Each group against its own population target (algorithms/targets.py): the target's policy_gap and what it is,
    the final policy_gap and target_policy_gap_excess (IQM [95% band]), and the rate of approach to the
    target: the decay exponent b̂ of the excess (c + A·n^-b) and p̂ of its n_hit(ε), with CIs. Empty when
    no run records a target. Slow and biased separate here: a large target policy_gap is bias, a large
    final excess or a small b̂ is slowness."""
    fits = {metric: results for metric, results, _ in overview}
    gaps = {key["label"]: (fit, curves) for key, fit, curves in fits.get("policy_gap", [])}
    rows = []
    for key, fit, curves in fits.get("target_policy_gap_excess", []):
        level = plots.target_level(curves, "policy_gap")
        if not np.isfinite(level) or key["label"] not in gaps:
            continue
        what = curves.seeds["target.what"].dropna().unique() if "target.what" in curves.seeds else []
        rows.append({"group": key["label"], "target": "; ".join(map(str, what)) or "-",
                     "target policy_gap": number_text(level),
                     "final policy_gap": _final_with_band(gaps[key["label"]][1]),
                     "final excess": _final_with_band(curves),
                     "decay b̂ of the excess [95% CI]": f"{number_text(fit.b)} [{number_text(fit.b_low)}, {number_text(fit.b_high)}]",
                     "p̂ of the excess [95% CI]": f"{number_text(fit.p)} [{number_text(fit.p_low)}, {number_text(fit.p_high)}] ({fit.status})"})
    return pd.DataFrame(rows)


TARGET_NOTE = ("target = what the method converges to with infinite data from its own sampling scheme "
               "(run.json `target`, algorithms/targets.py); excess = policy_gap − target policy_gap. A large target "
               "policy_gap is bias, a large final excess or a slow decay is slowness.")


def _fit_table(results) -> pd.DataFrame:
    """The fit table of `ratebench fit` (groups named by what differs), one home for its columns."""
    from ratebench.analysis.groups import fit_rows
    from ratebench.analysis.tables import fit_display

    if not results:
        return pd.DataFrame()
    return fit_display(fit_rows(results, results[0][1].metric, results[0][1].x_name))


def _estimate(s) -> tuple[str, str, str]:
    """(estimate, low, high) as text for a verdict table: p̂ of a polynomial claim, the form's estimate
    (ρ̂, p̂_A − p̂_B, the deciding value's p̂) of the others, '-' without one."""
    est = s.get("estimate")
    if not est:
        return "-", "-", "-"
    digits = estimate_digits(est["name"])
    shown = number_text(est["value"], digits)
    return (shown if s["claim"].form == "polynomial" else f"{est['name']} {shown}", number_text(est["low"], digits),
            number_text(est["high"], digits))


def _claim_rows(s) -> list[tuple[str, str]]:
    c, f = s["claim"], s["fit"]
    experiments = " vs ".join(c.experiments)
    rows = [("source", c.source), ("claim file", c.path), ("algorithm / experiment", f"{c.algorithm} / {experiments}"),
            ("metric vs x", f"{c.metric} vs {c.x}; ε stated in {c.eps_unit} units, range "
                            f"[{c.eps_min:g}, {c.eps_max:g}]"),
            (f"claimed ({c.form}, metric units)", c.claimed_text), ("verdict", s["verdict"]), ("why", s["reason"])]
    est = s.get("estimate")
    if est and c.form != "polynomial":
        shown = f"{number_text(est['value'], 6)} [{number_text(est['low'], 6)}, {number_text(est['high'], 6)}]"
        rows.append((f"{est['name']} and 95% CI", shown))
    if f is not None and c.form in ("geometric", "difference"):
        rows += [("fitting window (ε)", f"[{number_text(f.eps_low)}, {number_text(f.eps_high)}], {f.n_levels} levels"),
                 ("seeds", (f"{f.n_seeds} fitted, {f.n_diverged} diverged, {f.n_saturated} saturated, "
                            f"{f.n_stalled} stalled, {f.n_failed} failed"))]
    elif f is not None:
        rows += [("p̂ and 95% CI", f"{number_text(f.p)} [{number_text(f.p_low)}, {number_text(f.p_high)}]"),
                 ("fitting window (ε)", f"[{number_text(f.eps_low)}, {number_text(f.eps_high)}], {f.n_levels} levels"),
                 ("decay exponent b̂ (c + A·n^-b)", f"{number_text(f.b)} [{number_text(f.b_low)}, {number_text(f.b_high)}], floor ĉ = {number_text(f.c)} "
                                                   f"[{number_text(f.c_low)}, {number_text(f.c_high)}]"),
                 ("seeds", f"{f.n_seeds} fitted, {f.n_diverged} diverged, {f.n_saturated} saturated, "
                           f"{f.n_stalled} stalled, {f.n_failed} failed, {f.n_strata} configuration(s)")]
    name, key = ("ρ̂", "rho") if c.form == "geometric" else ("p̂", "p")
    digits = estimate_digits(name)
    if len(s.get("per_instance", {})) > 1 and c.form != "difference":
        def est(fit):
            return (f"{number_text(getattr(fit, key), digits)} [{number_text(getattr(fit, key + '_low'), digits)}, "
                    f"{number_text(getattr(fit, key + '_high'), digits)}]")

        parts = [f"{i}: {est(fi)} {fi.status}" + (" (worst)" if i == s["worst_instance"] else "")
                 for i, fi in s["per_instance"].items()]
        rows.append((f"{name} per instance (judged on the worst)", "; ".join(parts)))
        pooled = s.get("pooled")
        if pooled is not None:
            rows.append(("pooled over instances (hierarchical bootstrap)", est(pooled)))
    if f is not None and np.isfinite(getattr(f, "p_local", np.nan)):
        rows.append(("local exponent at ε_min", f"{number_text(f.p_local)} [{number_text(f.p_local_low)}, {number_text(f.p_local_high)}], "
                                                f"trend {number_text(f.p_trend)} per decade of 1/ε"))
    if s.get("premise"):
        rows.append(("premise (ratebench audit)", s["premise"]))
    if s.get("what_it_would_take"):
        rows.append(("what it would take", "; ".join(s["what_it_would_take"])))
    if s["note"]:
        rows.append(("note", s["note"]))
    if c.relation == "upper_bound":
        rows.append(("reading", UPPER_BOUND_CAVEAT))
    return rows


def render_markdown(sections, overview, loaded, base: Path, header: str = "", targets: pd.DataFrame | None = None) -> str:
    lines = ["# ratebench report", "", *([header, ""] if header else []), summary_line(loaded), ""]
    if loaded.skipped:
        lines += ["Unreadable run records (skipped):", ""] + [f"- `{d}`: {m}" for d, m in loaded.skipped] + [""]
    lines += ["## Verdicts", "", "| claim | metric | claimed | p̂ | 95% CI | ε window | verdict |", "|---|---|---|---|---|---|---|"]
    for s in sections:
        c, f = s["claim"], s["fit"]
        claimed, (est, low, high) = c.claimed_text, _estimate(s)
        lines.append(f"| {c.id} | {c.metric} | {claimed} | {est} | [{low}, {high}] | "
                     f"[{number_text(f.eps_low) if f else '-'}, {number_text(f.eps_high) if f else '-'}] | **{s['verdict']}** |")
    lines += ["", UPPER_BOUND_CAVEAT, ""]
    for s in sections:
        c = s["claim"]
        lines += [f"## Claim `{c.id}`: {s['verdict']}", ""]
        lines += [f"- **{k}**: {v}" for k, v in _claim_rows(s)]
        if s["figure"]:
            lines += ["", f"![{c.id}]({Path(s['figure']).relative_to(base)})"]
        if s.get("runtime_figure"):
            lines += ["", RUNTIME_NOTE, "", f"![{c.id} runtimes]({Path(s['runtime_figure']).relative_to(base)})"]
        if s["sensitivity"] is not None:
            lines += ["", "Window sensitivity (how p̂ moves with the fitting window):", "",
                      markdown_table(s["sensitivity"])]
        lines += ["", f"{UNHEALTHY_HEADING}:" if s["diverged"] else f"{UNHEALTHY_HEADING}: none", ""]
        lines += [f"- {d}" for d in s["diverged"]]
        lines += ["", f"Config hashes: {', '.join(f'`{h}`' for h in s['hashes'])}", "",
                  f"Reproduce: `{s['reproduce']}`; the commands recorded in the runs:", "", "```"]
        lines += s["commands"] + ["```", ""]
    if targets is not None and not targets.empty:
        lines += ["## Each method against its own population target", "", TARGET_NOTE, "", markdown_table(targets), ""]
    lines += ["## All runs", ""]
    for metric, results, pngs in overview:
        lines += [f"### {metric}", "", markdown_table(_fit_table(results)), ""]
        lines += [line for png in pngs for line in (f"![{metric}]({Path(png).relative_to(base)})", "")]
    return "\n".join(lines) + "\n"


def _img(path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(Path(path).stem)}" style="max-width:100%" src="data:image/png;base64,{data}">'


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, escape=True, border=0, classes="t")


def render_html(sections, overview, loaded, header: str = "", targets: pd.DataFrame | None = None) -> str:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>ratebench report</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#111}"
             "table.t,table.kv{border-collapse:collapse;font-size:13px}"
             "table.t td,table.t th,table.kv td{border:1px solid #bbb;padding:3px 6px}"
             ".PASS,.VIOLATED,.INCONCLUSIVE{font-weight:bold;color:#fff;padding:1px 7px;border-radius:4px}"
             ".PASS{background:#1a7f37}.VIOLATED{background:#cf222e}.INCONCLUSIVE{background:#9a6700}"
             "pre{background:#f4f4f4;padding:6px;white-space:pre-wrap;overflow-wrap:anywhere}"
             ".meta{color:#555;font-size:13px}",
             "</style></head><body><h1>ratebench report</h1>",
             f"<p class='meta'>{html.escape(header)}</p>" if header else "",
             f"<p>{html.escape(summary_line(loaded))}</p>"]
    if loaded.skipped:
        parts.append("<p>Unreadable run records (skipped):</p><ul>" +
                     "".join(f"<li><code>{e(d)}</code>: {e(m)}</li>" for d, m in loaded.skipped) + "</ul>")
    parts.append("<h2>Verdicts</h2><table class='t'><tr><th>claim</th><th>metric</th><th>claimed</th><th>p̂</th>"
                 "<th>95% CI</th><th>ε window</th><th>verdict</th></tr>")
    for s in sections:
        c, f = s["claim"], s["fit"]
        claimed, (est, low, high) = c.claimed_text, _estimate(s)
        parts.append(f"<tr><td>{e(c.id)}</td><td>{c.metric}</td><td>{e(claimed)}</td><td>{e(est)}</td>"
                     f"<td>[{low}, {high}]</td>"
                     f"<td>[{number_text(f.eps_low) if f else '-'}, {number_text(f.eps_high) if f else '-'}]</td>"
                     f"<td class='{s['verdict']}'>{s['verdict']}</td></tr>")
    parts.append(f"</table><p>{e(UPPER_BOUND_CAVEAT)}</p>")
    for s in sections:
        c = s["claim"]
        parts.append(f"<h2>Claim <code>{e(c.id)}</code>: <span class='{s['verdict']}'>{s['verdict']}</span></h2>")
        parts.append("<table class='kv'>" + "".join(f"<tr><td>{e(k)}</td><td>{e(str(v))}</td></tr>"
                                                     for k, v in _claim_rows(s)) + "</table>")
        if s["figure"]:
            parts.append(_img(s["figure"]))
        if s.get("runtime_figure"):
            parts.append(f"<p>{e(RUNTIME_NOTE)}</p>" + _img(s["runtime_figure"]))
        if s["sensitivity"] is not None:
            parts.append("<p>Window sensitivity (how p̂ moves with the fitting window):</p>" +
                         _table(s["sensitivity"].round(4)))
        parts.append(f"<p>{UNHEALTHY_HEADING}: " + ("none</p>" if not s["diverged"] else
                     "</p><ul>" + "".join(f"<li>{e(d)}</li>" for d in s["diverged"]) + "</ul>"))
        parts.append(f"<p>Config hashes: {', '.join(f'<code>{e(h)}</code>' for h in s['hashes'])}</p>")
        parts.append(f"<p>Reproduce: <code>{e(s['reproduce'])}</code>; the commands recorded in the runs:</p>"
                     f"<pre>{e(chr(10).join(s['commands']))}</pre>")
    if targets is not None and not targets.empty:
        parts.append(f"<h2>Each method against its own population target</h2><p>{e(TARGET_NOTE)}</p>"
                     + _table(targets))
    parts.append("<h2>All runs</h2>")
    for metric, results, pngs in overview:
        parts.append(f"<h3>{e(metric)}</h3>" + _table(_fit_table(results)))
        parts += [_img(png) for png in pngs]
    parts.append("</body></html>")
    return "\n".join(parts)
