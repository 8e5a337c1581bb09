"""Figures (matplotlib, Agg): per metric, the log-log curves with IQM, median, 95% bootstrap band,
fitted decay and floor and claimed slopes, next to n_hit(ε) vs 1/ε with the fit; and an interval
(forest) plot of p̂ with its CI across groups. Okabe–Ito colours plus line styles and markers."""
from __future__ import annotations

import math
import re
import warnings
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FuncFormatter, LogFormatterSciNotation, LogLocator
from ratebench.analysis.runtime import (UNHEALTHY, expected_runtime, runtime_ecdf, runtime_matrix,  # noqa: F401
                                        shared_targets)
from ratebench.analysis.stats import bootstrap_counts, trimmed_mean
from ratebench.analysis.tables import number_text

METRIC_LABELS = {
    "gap": "gap  F(ν_t) − F*  (global inf)  [nats]",
    "gap_local": "gap_local  F(ν_t) − F_loc  (basin of ν_true)  [nats]",
    "lower_gap": "lower_gap  J*(ν_t) − J(ν_t, θ_t)  [reward units]",
    "grad_sq": "grad_sq  ‖∇F(ν_t)‖²  [nats²]",
    "pgrad_sq": "pgrad_sq  ‖ν_t − Π(ν_t − ∇F(ν_t))‖²  [nats²]",
    "psi_grad_sq": "psi_grad_sq  ‖∇ψ_λ(ν_t)‖²  [nats²]",
    "policy_gap": "policy_gap  J* − J(π_t)  [reward units]",
    "value_gap": "value_gap  max_π E_π[R] − E_π_t[R]  (no KL)  [reward units]",
    "target_policy_gap_excess": "target_policy_gap_excess  J(π_target) − J(π_t)  [reward units]",
    "psi_gap": "psi_gap  ψ_λ(ν_t) − min ψ_λ  [nats]",
    "reward_err": "reward_err  E[(ΔR_ν − ΔR*)²]  [reward units²]",
    "kl_ref": "kl_ref  KL(π_t ‖ π_ref)  [nats]",
}
X_LABELS = {"samples": "samples drawn (trajectories / context-action draws)",
            "queries": "preference queries (labels)", "step": "outer iterations"}
# Okabe & Ito (2008) colour-blind-safe qualitative palette (yellow left out: unreadable on white),
# each colour with its own line style and marker so that a greyscale print still tells groups apart
OKABE_ITO = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
STYLES = list(zip(("-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1)), (0, (3, 1, 1, 1, 1, 1))),
                  ("o", "s", "^", "D", "v", "P", "X"), OKABE_ITO))
MAX_GROUPS = len(STYLES)  # groups per figure; more go to further pages (<stem>_page2.png, ...)
CLAIM_STYLES = [(0, (2, 2)), (0, (6, 2)), (0, (1, 3))]
# Metrics whose n_hit(ε) has a rate meaning (they should fall to 0); kl_ref grows from 0 by design.
RATE_METRICS = ("gap", "gap_local", "lower_gap", "grad_sq", "pgrad_sq", "psi_grad_sq", "policy_gap", "value_gap",
                "target_policy_gap_excess",
                "psi_gap", "reward_err")
legend_number = partial(number_text, infinite="∞")  # an unbounded CI end reads as ∞ in a legend
SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


FORMATS = ("png", "pdf")  # what `ratebench plot` writes of each figure (a report only shows the PNG)


def power_of_ten(value: float, _pos=None) -> str:
    """Tick label 10⁻³ in plain Unicode (no mathtext: parsing it was most of plot's time)."""
    if not value > 0:
        return ""
    k = math.log10(value)
    if abs(k - round(k)) > 1e-9:
        return ""
    return "10" + str(round(k)).translate(SUPERSCRIPT)


class MinorPowerLabels(LogFormatterSciNotation):
    """matplotlib's minor tick labels of a log axis (they appear where the axis spans about a decade or less: 2×10³),
    in plain Unicode like power_of_ten's. Its mathtext labels were parsed ~1,000 times per `ratebench plot` of the
    README job (43 distinct labels: matplotlib's cache of 50 parses thrashes over the figures' sizes), ~10 s of a
    48 s profiled run."""

    def _non_decade_format(self, sign_string, base, fx, usetex):
        exponent = math.floor(fx)
        coeff = float(base) ** (fx - exponent)
        if abs(coeff - round(coeff)) < 1e-10:
            coeff = round(coeff)
        return f"{sign_string}{coeff:g}×{base}{str(exponent).translate(SUPERSCRIPT)}"

    def __call__(self, x, pos=None):
        label = super().__call__(x, pos)  # a decade (rare among minor ticks) comes as mathtext: 10^{k} in Unicode too
        decade = re.fullmatch(r"\$\\mathdefault\{(-?)(\d+)\^\{(-?\d+)\}\}\$", label)
        return f"{decade[1]}{decade[2]}{decade[3].translate(SUPERSCRIPT)}" if decade else label


def log_ticks(axis) -> None:
    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(power_of_ten))
    # minor ticks keep matplotlib's choice of labels (only where the axis spans about a decade or less), in Unicode
    axis.set_minor_formatter(MinorPowerLabels(base=10, labelOnlyBase=False))


def _positive(y: np.ndarray) -> np.ndarray:
    """y with non-positive, subnormal (below the smallest normal float, ~2.2e-308) and non-finite
    entries as NaN: what a log axis can show (its ticks fail on subnormal limits)."""
    y = np.asarray(y, dtype=np.float64)
    return np.where(np.isfinite(y) & (y >= np.finfo(np.float64).tiny), y, np.nan)


def set_log_axes(ax, note_if_empty: str) -> None:
    """Log-log axes when the axis holds positive data on both coordinates; otherwise a linear
    y axis (symlog cannot show a curve that is all zero either) and a note saying why."""
    ax.set_xscale("log")
    log_ticks(ax.xaxis)
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    xs = [np.asarray(line.get_xdata(), dtype=float) for line in ax.get_lines()]
    tiny = np.finfo(np.float64).tiny
    if any((np.isfinite(y) & (y >= tiny) & np.isfinite(x) & (x >= tiny)).any()
           for x, y in zip(xs, ys) if y.size and x.size == y.size):
        ax.set_yscale("log")
        log_ticks(ax.yaxis)
    else:
        ax.text(0.5, 0.5, note_if_empty, transform=ax.transAxes, ha="center", va="center", fontsize=9,
                color="0.3", wrap=True)


def curve_bands(curves, n_boot: int = 500, seed: int = 0):
    """IQM (P,), median (P,) and the 95% bootstrap band (2, P) of the IQM over seeds."""
    ones = np.ones((1, curves.n_seeds), np.int32)
    iqm = trimmed_mean(curves.values, ones)[0]
    median = trimmed_mean(curves.values, ones, trim=0.5)[0]
    reps = trimmed_mean(curves.values, bootstrap_counts(curves.strata, n_boot, np.random.default_rng(seed)))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (no data at that x) stay NaN
        band = np.nanquantile(np.where(np.isfinite(reps), reps, np.nan), [0.025, 0.975], axis=0)
    return iqm, median, band


def group_label(key: dict) -> str:
    """The group's name: what differs between the groups shown (analysis/labels.py, set by fit_groups)."""
    return key.get("label") or f"algorithm={key.get('algorithm')} env={key.get('env')}"


def slope_text(claim) -> str:
    p = claim.metric_exponent
    return f"claim {claim.id}: N(ε) ∝ ε^-{p:.3g}  (curve slope −{1 / p:.2g}, n_hit slope {p:.3g})"


def claims_for(results, claims) -> list:
    """The claims whose slopes belong on a figure of these groups: the claim's metric and x, and an
    algorithm among the groups' (a bilevel claim on a reward_mle figure would be read as its claim)."""
    if not results:
        return []
    fit = results[0][1]
    algorithms = {a for k, _, _ in results for a in str(k.get("algorithm", "")).split(",")}
    return [c for c in claims if c.metric == fit.metric and c.x == fit.x_name and c.algorithm in algorithms
            and getattr(c, "form", "polynomial") == "polynomial"]  # a slope to draw: the polynomial form's


def _anchor(x: np.ndarray, y: np.ndarray):
    j = np.flatnonzero(np.isfinite(y) & (y > 0))
    return (x[j[len(j) // 3]], y[j[len(j) // 3]], x[j[-1]]) if len(j) else None


TARGET_STYLE = (0, (1, 1.5))  # the population target's level: dotted, in the group's colour
TARGET_GID = "population-target"  # marks the line (tests find it by this)
ROUND_OFF = 1e-12  # a target level below this in size is a 0 computed in float64 (e.g. J* - J(pi*))


def target_level(curves, metric: str) -> float:
    """The group's population target of `metric` (run.json `target`, column target.<metric>): the median
    over its runs (instances differ), NaN when the runs record none for this metric."""
    column = f"target.{metric}"
    if column not in curves.seeds.columns:
        return np.nan
    values = pd.to_numeric(curves.seeds[column], errors="coerce").to_numpy(float)
    values = values[np.isfinite(values)]
    if not values.size:
        return np.nan
    level = float(np.median(values))
    return 0.0 if abs(level) < ROUND_OFF else level


def draw_curves(ax, results, claims) -> None:
    """IQM (thick, markers) with its 95% band, median (thin), fitted c + A·n^-b over the asymptotic
    points (wide, translucent), the fitted floor ĉ (dashed) and the method's population target (dotted)
    per group; claimed slopes (black)."""
    anchor = None
    for (key, fit, curves), (ls, mk, colour) in zip(results, STYLES):
        pos = curves.x > 0
        x = curves.x[pos]
        iqm, median, band = (_positive(a[..., pos]) for a in curve_bands(curves))
        ax.fill_between(x, band[0], band[1], where=np.isfinite(band[0]) & np.isfinite(band[1]), color=colour,
                        alpha=0.15, linewidth=0)
        ax.plot(x, iqm, ls=ls, color=colour, marker=mk, markevery=max(len(x) // 8, 1), ms=4, lw=1.6,
                label=group_label(key))
        ax.plot(x, median, ls=ls, color=colour, lw=0.7, alpha=0.9)
        draw_unhealthy(ax, curves, colour)
        decays = fit.metric in RATE_METRICS and (fit.A > 0 or fit.c > 0)  # kl_ref grows; A = c = 0: no decay
        if np.isfinite(fit.b) and decays:
            xs = x[fit.arrays["asym"][pos]] if "asym" in fit.arrays else x
            ax.plot(xs, _positive(fit.c + fit.A * xs ** -fit.b), color=colour, ls="-", lw=4, alpha=0.3)
            if fit.c > 0:
                ax.plot([x[0], x[-1]], [fit.c, fit.c], color=colour, ls=(0, (4, 3)), lw=1.0)
        level = target_level(curves, fit.metric)
        if level > 0:  # a target of 0 (the method is unbiased) has no place on a log axis: the legend says it
            ax.plot([x[0], x[-1]], [level, level], color=colour, ls=TARGET_STYLE, lw=1.6, gid=TARGET_GID)
        if anchor is None:
            anchor = _anchor(x, iqm)
    for claim, ls in zip(claims, CLAIM_STYLES):
        if anchor is None:
            break
        x0, y0, x1 = anchor
        xs = np.array([x0, x1])
        ax.plot(xs, y0 * (xs / x0) ** claim.curve_slope, color="0.0", ls=ls, lw=1.2)
    set_log_axes(ax, "no positive values to show on a log axis\n(linear axis)")


def draw_nhit(ax, results, claims) -> None:
    """IQM n_hit(ε) per group, filled inside the fitting window and hollow outside, the fitted line
    of slope p̂; claimed slopes (black) from the first group's fit."""
    anchor = None
    for (key, fit, curves), (ls, mk, colour) in zip(results, STYLES):
        levels = fit.arrays.get("levels")
        if levels is None:
            continue
        inv = 1.0 / levels["eps"].to_numpy()
        n = 10.0 ** levels["iqm_log10_nhit"].to_numpy()
        win = levels["window"].to_numpy() & (fit.status == "ok")
        ok = np.isfinite(n) & (n > 0) & np.isfinite(inv)
        ax.plot(inv[ok & ~win], n[ok & ~win], ls="none", marker=mk, mfc="white", mec=colour, ms=4)
        ax.plot(inv[ok & win], n[ok & win], ls="none", marker=mk, color=colour, ms=5)
        if np.isfinite(fit.p) and (win & np.isfinite(inv)).any():  # a finite p̂ with a non-ok status has no window
            xs = inv[win & np.isfinite(inv)]
            ax.plot(xs, 10 ** fit.log10_C * xs ** fit.p, color=colour, ls=ls, lw=1.6)
            if anchor is None:
                anchor = (xs.min(), 10 ** fit.log10_C * xs.min() ** fit.p, xs.max())
    for claim, ls in zip(claims, CLAIM_STYLES):
        if anchor is None:
            break
        x0, y0, x1 = anchor
        xs = np.array([x0, x1])
        ax.plot(xs, y0 * (xs / x0) ** claim.metric_exponent, color="0.0", ls=ls, lw=1.2)
    set_log_axes(ax, "no ε level reached by the seeds:\nno n_hit(ε) to show")


def draw_profile(ax, results, claims) -> None:
    """Local exponent p(ε) on half-decade sub-windows (fit.arrays["profile"]) with its 95% CI, and the
    claimed exponent: a p(ε) still rising at the smallest ε means the window is pre-asymptotic."""
    shown = False
    for (key, fit, _), (ls, mk, colour) in zip(results, STYLES):
        prof = fit.arrays.get("profile")
        if prof is None or not len(prof):
            continue
        x = _positive(1.0 / prof["eps_center"].to_numpy(dtype=float))  # 1/ε overflows for subnormal ε: not shown
        keep = np.isfinite(x)
        x = x[keep]
        shown = shown or bool(x.size)
        lo, hi = prof["p_low"].to_numpy(dtype=float)[keep], prof["p_high"].to_numpy(dtype=float)[keep]
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.fill_between(x, lo, hi, where=ok, color=colour, alpha=0.15, linewidth=0)
        ax.plot(x, prof["p"].to_numpy(dtype=float)[keep], ls=ls, marker=mk, color=colour, ms=4,
                label=f"{group_label(key)}: local p(ε)")
    for claim, ls in zip(claims, CLAIM_STYLES):
        ax.axhline(claim.metric_exponent, color="0.0", ls=ls, lw=1.2)
    if shown:  # a log axis needs positive data (its ticks fail without any)
        ax.set_xscale("log")
        log_ticks(ax.xaxis)


UNHEALTHY_GID = "unhealthy-seed"
UNHEALTHY_STYLE = (0, (1, 1.2))  # densely dotted: one per unhealthy seed  # marks the thin per-seed traces of unhealthy seeds (tests find them by this)


def health_counts(curves) -> dict[str, int]:
    """{status: seeds} of the group's unhealthy seeds (UNHEALTHY), those with at least one."""
    status = curves.seeds["status"] if len(curves.seeds) else pd.Series([], dtype=object)
    return {s: int((status == s).sum()) for s in UNHEALTHY if int((status == s).sum())}


def health_text(counts: dict[str, int]) -> str:
    """', 3 diverged, 2 stalled' (empty when every seed is healthy)."""
    return "".join(f", {n} {s}" for s, n in counts.items())


def draw_unhealthy(ax, curves, colour) -> int:
    """One thin translucent trace per unhealthy seed that has values (its metric as recorded, +inf after a
    divergence not drawn): a diverged, saturated or stalled seed stays visible, never averaged away."""
    if not len(curves.seeds) or not curves.n_seeds:
        return 0
    status = curves.seeds["status"].to_numpy()[np.asarray(curves.used, bool)]  # (S,) the rows of values
    rows = np.flatnonzero(np.isin(status, UNHEALTHY))
    pos = curves.x > 0
    for i in rows:
        ax.plot(curves.x[pos], _positive(curves.values[i, pos]), color=colour, lw=1.0, alpha=0.8, ls=UNHEALTHY_STYLE,
                gid=UNHEALTHY_GID)
    return len(rows)


def group_entry(key, fit, colour, ls, mk, target: float = np.nan, health: dict | None = None) -> Line2D:
    """One legend entry per group: its name, seeds (and how many are unhealthy), its population target,
    and what was fitted, in words."""
    counts = health if health is not None else ({"diverged": fit.n_diverged} if fit.n_diverged else {})
    text = f"{group_label(key)}  (n={fit.n_seeds}" + health_text(counts) + ")"
    if np.isfinite(target):
        text += f"; target {legend_number(target)}"
    if fit.metric in RATE_METRICS:
        if np.isfinite(fit.p):
            text += f": p̂ = {legend_number(fit.p)} [{legend_number(fit.p_low)}, {legend_number(fit.p_high)}]"
            text += "" if fit.status == "ok" else f" ({fit.status})"
        else:
            text += f": no p̂ ({fit.status})"
        if np.isfinite(fit.b) and (fit.A > 0 or fit.c > 0):
            text += f"; decay ∝ n^-{fit.b:.2g}" + (f", floor {fit.c:.2g}" if fit.c > 0 else "")
    return Line2D([], [], color=colour, ls=ls, marker=mk, ms=5, lw=1.6, label=text)


def key_entries(rate_panel: bool, claims, any_floor: bool, any_target: bool = False,
                any_unhealthy: bool = False) -> list:
    """The shared key of the drawing conventions, once per figure (not per group)."""
    grey = "0.35"
    entries = [Line2D([], [], color=grey, lw=1.6, marker="o", ms=4, label="IQM over seeds (thick)"),
               Patch(color=grey, alpha=0.25, label="95% bootstrap band of the IQM"),
               Line2D([], [], color=grey, lw=0.7, label="median over seeds (thin)")]
    if any_unhealthy:
        entries.append(Line2D([], [], color=grey, lw=1.0, ls=UNHEALTHY_STYLE, alpha=0.8,
                              label="one unhealthy seed (diverged / saturated / stalled)"))
    if rate_panel:
        entries.append(Line2D([], [], color=grey, lw=4, alpha=0.3, label="fitted c + A·n^-b (asymptotic points)"))
        if any_floor:
            entries.append(Line2D([], [], color=grey, ls=(0, (4, 3)), lw=1.0, label="fitted floor ĉ"))
        if any_target:
            entries.append(Line2D([], [], color=grey, ls=TARGET_STYLE, lw=1.6,
                                  label="population target (infinite data, the method's own pairs)"))
        entries += [Line2D([], [], color=grey, ls="none", marker="o", ms=5, label="n_hit(ε) inside the fitting window"),
                    Line2D([], [], color=grey, ls="none", marker="o", mfc="white", ms=4, label="n_hit(ε) outside it"),
                    Line2D([], [], color=grey, lw=1.6, label="fitted n_hit ∝ ε^-p̂")]
    entries += [Line2D([], [], color="0.0", ls=ls, lw=1.2, label=slope_text(c)) for c, ls in zip(claims, CLAIM_STYLES)]
    return entries


def pages(results: list, per_page: int = MAX_GROUPS) -> list[list]:
    """Groups split into figures of at most per_page groups each: never a silent drop."""
    return [results[i:i + per_page] for i in range(0, len(results), per_page)]


def metric_figure(results, claims, out_dir: Path, stem: str | None = None, formats: tuple = FORMATS) -> list[Path]:
    """Figures (PNG + PDF: `formats`) for one metric: results = [(key, fit, curves)] of fit_groups. Up to
    MAX_GROUPS groups per figure; more groups give further pages `<stem>_page2.png`, ... Claims are
    drawn only on figures of their own metric, x and algorithm (claims_for)."""
    results = [r for r in results if r[1].status != "no_data"]
    if not results:
        return []
    claims = claims_for(results, claims)
    metric, x_name = results[0][1].metric, results[0][1].x_name
    stem = stem or f"{metric}_vs_{x_name}"
    paths = []
    chunks = pages(results)
    for number, chunk in enumerate(chunks, start=1):
        suffix = "" if number == 1 else f"_page{number}"
        title = f" (page {number} of {len(chunks)})" if len(chunks) > 1 else ""
        paths += _one_figure(chunk, claims, metric, x_name, Path(out_dir), stem + suffix, title, formats)
    return paths


def figures(results, claims, out_dir: Path) -> list[Path]:
    """Every figure of one metric (what `ratebench plot` writes per metric): the curves and n_hit panels
    (metric_figure), the interval plot of p̂ (interval_figure) and the fixed-target runtimes (runtime_figure)."""
    return (metric_figure(results, claims, out_dir) + interval_figure(results, claims, out_dir)
            + runtime_figure(results, out_dir))


def _one_figure(results, claims, metric, x_name, out_dir: Path, stem: str, title: str, formats: tuple) -> list[Path]:
    rate_panel = metric in RATE_METRICS
    profile_panel = rate_panel and any(len(f.arrays.get("profile", ())) for _, f, _ in results)
    n_panels = 1 + rate_panel + profile_panel
    fig, axes = plt.subplots(1, n_panels, figsize=(6.2 * n_panels, 4.8), squeeze=False)
    left = axes[0, 0]
    draw_curves(left, results, claims)
    left.set_xlabel(X_LABELS.get(x_name, x_name))
    left.set_ylabel(METRIC_LABELS.get(metric, metric))
    left.set_title(f"{metric} vs {x_name}{title}")
    if rate_panel:
        right = axes[0, 1]
        draw_nhit(right, results, claims)
        right.set_xlabel(f"1/ε  (ε in {metric} units)")
        right.set_ylabel(f"n_hit(ε): {x_name} until {metric} stays ≤ ε")
        right.set_title("sample complexity n_hit(ε) vs 1/ε")
    if profile_panel:
        prof_ax = axes[0, 2]
        draw_profile(prof_ax, results, claims)
        prof_ax.set_xlabel(f"1/ε  (ε in {metric} units)")
        prof_ax.set_ylabel("local exponent p(ε)")
        prof_ax.set_title("local exponent: flat = asymptotic, rising = not yet")
    for ax in axes[0]:
        ax.grid(True, which="major", color="0.88", lw=0.6)
    targets = [target_level(c, metric) for _, _, c in results]
    health = [health_counts(c) for _, _, c in results]
    groups = [group_entry(k, f, colour, ls, mk, t, h)
              for (k, f, _), (ls, mk, colour), t, h in zip(results, STYLES, targets, health)]
    any_floor = any(f.c > 0 and np.isfinite(f.b) for _, f, _ in results)
    keys = key_entries(rate_panel, claims, any_floor, any(t > 0 for t in targets), any(health))
    fig.tight_layout()
    legends_below(fig, groups, keys, key_columns=2 if len(keys) > 5 else 1)
    return _save(fig, out_dir, stem, formats)


def legends_below(fig, groups: list, keys: list, key_columns: int = 1) -> tuple:
    """The groups' legend below the panels at the left and the key of the conventions at the right; when
    the two would overlap (long group names), the key goes below the groups' legend instead. Call after
    tight_layout (which leaves figure legends out); the saved figure grows to hold both (bbox_inches)."""
    style = {"fontsize": 8, "frameon": False, "title_fontsize": 8, "alignment": "left"}
    first = fig.legend(handles=groups, loc="upper left", bbox_to_anchor=(0.0, 0.0), ncol=1, title="groups", **style)
    second = fig.legend(handles=keys, loc="upper right", bbox_to_anchor=(1.0, 0.0), ncol=key_columns, title="key",
                        **style)
    renderer = fig.canvas.get_renderer()
    to_figure = fig.transFigure.inverted()
    left, right = (legend.get_window_extent(renderer).transformed(to_figure) for legend in (first, second))
    if left.x1 + LEGEND_GAP > right.x0:  # side by side they would overlap: stack them
        second.remove()
        second = fig.legend(handles=keys, loc="upper left", bbox_to_anchor=(0.0, left.y0 - LEGEND_GAP),
                            ncol=key_columns, title="key", **style)
    return first, second


LEGEND_GAP = 0.01  # figure fraction between the two legends


def _save(fig, out_dir: Path, stem: str, formats: tuple = FORMATS) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{ext}" for ext in formats]
    for p in paths:
        fig.savefig(p, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return paths


def interval_rows(results) -> list[tuple[str, float, float, float, str]]:
    """(label, p̂, CI low, CI high, status) per group with a finite p̂: what the interval plot shows."""
    return [(group_label(k), f.p, f.p_low, f.p_high, f.status) for k, f, _ in results if np.isfinite(f.p)]


def interval_figure(results, claims, out_dir: Path, stem: str | None = None) -> list[Path]:
    """Interval (forest) plot: p̂ with its 95% CI per group, one row each, on one axis (the rliable
    habit: compare interval estimates, not point estimates); the claimed exponents as vertical lines.
    A CI whose upper end is +∞ (unreached levels) is drawn as an arrow to the edge. [] without p̂."""
    rows = interval_rows(results)
    if not rows or results[0][1].metric not in RATE_METRICS:
        return []
    claims = claims_for(results, claims)
    fit = results[0][1]
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.42 * len(rows)))
    finite = [v for _, p, lo, hi, _ in rows for v in (p, lo, hi) if np.isfinite(v)]
    finite += [c.metric_exponent for c in claims]
    top = max(finite) * 1.15 if finite else 1.0
    for i, (label, p, lo, hi, status) in enumerate(rows):
        _, mk, colour = STYLES[i % len(STYLES)]
        y = len(rows) - 1 - i
        hi_drawn = hi if np.isfinite(hi) else top
        if np.isfinite(lo):
            ax.plot([lo, hi_drawn], [y, y], color=colour, lw=2.2, solid_capstyle="butt")
            if not np.isfinite(hi):
                ax.annotate("", xy=(top, y), xytext=(lo, y), arrowprops={"arrowstyle": "->", "color": colour})
        ax.plot([p], [y], marker=mk, color=colour, ms=7, mfc=colour if status == "ok" else "white")
    for claim, ls in zip(claims, CLAIM_STYLES):
        ax.axvline(claim.metric_exponent, color="0.0", ls=ls, lw=1.2, label=f"claim {claim.id}: p = "
                                                                            f"{claim.metric_exponent:.3g}")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([f"{label}  ({status})" if status != "ok" else label for label, *_, status in rows][::-1],
                       fontsize=8)
    ax.set_xlabel(f"p̂: N(ε) ∝ ε^-p on {fit.metric} vs {fit.x_name}, 95% bootstrap CI (hollow: status not ok)")
    ax.set_xlim(left=0, right=top)
    ax.grid(True, axis="x", color="0.88", lw=0.6)
    ax.set_title(f"sample-complexity exponent per group: {fit.metric}")
    if claims:
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, Path(out_dir), stem or f"{fit.metric}_vs_{fit.x_name}_p_intervals")


def runtime_figure(results, out_dir: Path, stem: str | None = None, eps_range: tuple | None = None,
                   title: str = "", formats: tuple = FORMATS) -> list[Path]:
    """Fixed-target runtimes that count failures (analysis/runtime.py), one figure per metric: left,
    ERT(ε) against 1/ε per group (filled markers where every seed reached ε, hollow where some never
    did: their budget is in the numerator); right, the runtime ECDF per group, the fraction of (seed,
    ε-target) pairs reached by n, over targets shared by every group (eps_range: a claim's ε range,
    else from the median start to the smallest value any seed ends at). [] without a rate metric or data."""
    results = [r for r in results if r[1].status != "no_data"]
    if not results or results[0][1].metric not in RATE_METRICS:
        return []
    metric, x_name = results[0][1].metric, results[0][1].x_name
    mats = [runtime_matrix(c) for _, _, c in results]
    lo, hi = eps_range if eps_range else (None, None)
    targets = shared_targets([v for _, v, _ in mats], [x for x, _, _ in mats], lo=lo, hi=hi)
    if not targets.size:
        return []
    levels = shared_targets([v for _, v, _ in mats], [x for x, _, _ in mats], per_decade=20, lo=lo, hi=hi)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12.4, 4.8))
    handles = []
    for ((key, fit, curves), (x, values, budget)), (ls, mk, colour) in zip(zip(results, mats), STYLES):
        ert = expected_runtime(x, values, levels, budget)
        inv = 1.0 / levels
        ok = np.isfinite(ert["ert"]) & np.isfinite(inv) & (ert["ert"] > 0)
        every = ok & (ert["reached"] == ert["n_seeds"])
        left.plot(inv[ok], ert["ert"][ok], ls=ls, color=colour, lw=1.4)
        left.plot(inv[every], ert["ert"][every], ls="none", marker=mk, color=colour, ms=4)
        left.plot(inv[ok & ~every], ert["ert"][ok & ~every], ls="none", marker=mk, mfc="white", mec=colour, ms=4)
        frac = runtime_ecdf(x, values, targets)
        pos = x > 0
        right.step(x[pos], frac[pos], where="post", ls=ls, color=colour, lw=1.6)
        smallest = ert["reached"][-1]
        health = health_text(health_counts(curves))
        handles.append(Line2D([], [], color=colour, ls=ls, marker=mk, ms=5, lw=1.6,
                              label=f"{group_label(key)}  (n={ert['n_seeds']}{health}; ε = {levels[-1]:.2g} reached "
                                    f"by {smallest}; {frac[-1]:.0%} of (seed, target) pairs by the end)"))
    set_log_axes(left, "no ε level reached by any seed:\nno ERT to show")
    left.set_xlabel(f"1/ε  (ε in {metric} units)")
    left.set_ylabel(f"ERT(ε): {x_name} spent by all seeds / seeds that reached ε")
    left.set_title(f"expected running time{title}")
    right.set_xscale("log")
    log_ticks(right.xaxis)
    right.set_ylim(-0.02, 1.02)
    right.set_xlabel(X_LABELS.get(x_name, x_name))
    right.set_ylabel("fraction of (seed, ε-target) pairs reached")
    right.set_title(f"runtime ECDF over {len(targets)} targets ε ∈ [{targets.min():.2g}, {targets.max():.2g}]")
    for ax in (left, right):
        ax.grid(True, which="major", color="0.88", lw=0.6)
    grey = "0.35"
    keys = [Line2D([], [], color=grey, ls="none", marker="o", ms=5, label="ERT: every seed reached ε"),
            Line2D([], [], color=grey, ls="none", marker="o", mfc="white", ms=5,
                   label="ERT: some seeds never did (their budget counted)"),
            Line2D([], [], color=grey, lw=1.6, drawstyle="steps-post",
                   label="ECDF: below 1 at the end = pairs never reached")]
    fig.tight_layout()
    legends_below(fig, handles, keys)
    return _save(fig, Path(out_dir), stem or f"{metric}_vs_{x_name}_runtime", formats)
