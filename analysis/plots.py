"""Figures (matplotlib, Agg): per metric, the log-log curves with IQM, median, 95% bootstrap band,
fitted decay and claimed slopes, next to n_hit(ε) vs 1/ε with the fit; greyscale-readable."""
from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from ratebench.analysis.stats import bootstrap_counts, trimmed_mean

METRIC_LABELS = {
    "gap": "gap  F(ν_t) − F*  (global inf)  [nats]",
    "gap_local": "gap_local  F(ν_t) − F_loc  (basin of ν_true)  [nats]",
    "lower_gap": "lower_gap  J*(ν_t) − J(ν_t, θ_t)  [reward units]",
    "grad_sq": "grad_sq  ‖∇F(ν_t)‖²  [nats²]",
    "psi_grad_sq": "psi_grad_sq  ‖∇ψ_λ(ν_t)‖²  [nats²]",
    "policy_gap": "policy_gap  J* − J(π_t)  [reward units]",
    "psi_gap": "psi_gap  ψ_λ(ν_t) − min ψ_λ  [nats]",
    "reward_err": "reward_err  E[(ΔR_ν − ΔR*)²]  [reward units²]",
    "kl_ref": "kl_ref  KL(π_t ‖ π_ref)  [nats]",
}
X_LABELS = {"samples": "samples drawn (trajectories / context-action draws)",
            "queries": "preference queries (labels)", "step": "outer iterations"}
STYLES = [("-", "o", "0.0"), ("--", "s", "0.35"), (":", "^", "0.55"), ("-.", "D", "0.2"),
          ((0, (5, 1, 1, 1)), "v", "0.45"), ((0, (1, 1)), "P", "0.65")]
MAX_GROUPS = 6
# Metrics whose n_hit(ε) has a rate meaning (they should fall to 0); kl_ref grows from 0 by design.
RATE_METRICS = ("gap", "grad_sq", "policy_gap", "psi_gap", "reward_err")


def _positive(y: np.ndarray) -> np.ndarray:
    """y with non-positive and non-finite entries as NaN: what a log axis can show."""
    y = np.asarray(y, dtype=np.float64)
    return np.where(np.isfinite(y) & (y > 0), y, np.nan)


def set_log_axes(ax, note_if_empty: str) -> None:
    """Log-log axes when the axis holds positive data on both coordinates; otherwise a linear
    y axis (symlog cannot show a curve that is all zero either) and a note saying why."""
    ax.set_xscale("log")
    ys = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    if any((np.isfinite(y) & (y > 0)).any() for y in ys if y.size):
        ax.set_yscale("log")
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


def label_of(key: dict, many_configs: bool) -> str:
    text = f"{key.get('algorithm')} / {key.get('env')}"
    if many_configs and key.get("config_hash"):
        text += f" [{str(key['config_hash'])[:6]}]"
    return text


def slope_text(claim) -> str:
    p = claim.metric_exponent
    return f"claim {claim.id}: ε^-{p:g} ⇒ slope −1/{p:g} = {-1 / p:.3g}"


def draw_curves(ax, results, claims) -> None:
    many = len({k.get("config_hash") for k, _, _ in results}) > len({k.get("algorithm") for k, _, _ in results})
    anchor = None
    for (key, fit, curves), (ls, mk, grey) in zip(results, STYLES):
        pos = curves.x > 0
        x = curves.x[pos]
        iqm, median, band = (_positive(a[..., pos]) for a in curve_bands(curves))
        label = label_of(key, many)
        ax.fill_between(x, band[0], band[1], where=np.isfinite(band[0]) & np.isfinite(band[1]), color=grey,
                        alpha=0.18, linewidth=0)
        ax.plot(x, iqm, ls=ls, color=grey, marker=mk, markevery=max(len(x) // 8, 1), ms=4, lw=1.6,
                label=f"{label}: IQM ± 95% band (n={curves.n_seeds}, diverged {fit.n_diverged})")
        ax.plot(x, median, ls=ls, color=grey, lw=0.8, alpha=0.8)
        decays = fit.metric in RATE_METRICS and (fit.A > 0 or fit.c > 0)  # kl_ref grows; A = c = 0: no decay
        if np.isfinite(fit.b) and decays:
            xs = x[fit.arrays["asym"][pos]] if "asym" in fit.arrays else x
            ax.plot(xs, fit.c + fit.A * xs ** -fit.b, color="0.0", ls=ls, lw=2.6, alpha=0.3,
                    label=f"{label}: fit {fit.c:.2g} + {fit.A:.2g}·n^-{fit.b:.3g}")
        if anchor is None and np.isfinite(iqm).any():
            j = np.flatnonzero(np.isfinite(iqm) & (iqm > 0))
            anchor = (x[j[len(j) // 3]], iqm[j[len(j) // 3]], x[j[-1]]) if len(j) else None
    for claim, ls in zip(claims, [(0, (2, 2)), (0, (6, 2)), (0, (1, 3))]):
        if anchor is None:
            break
        x0, y0, x1 = anchor
        xs = np.array([x0, x1])
        ax.plot(xs, y0 * (xs / x0) ** claim.curve_slope, color="0.0", ls=ls, lw=1.2, label=slope_text(claim))
    set_log_axes(ax, "no positive values to show on a log axis\n(linear axis)")


def draw_nhit(ax, results, claims) -> None:
    many = len({k.get("config_hash") for k, _, _ in results}) > len({k.get("algorithm") for k, _, _ in results})
    anchor = None
    for (key, fit, curves), (ls, mk, grey) in zip(results, STYLES):
        levels = fit.arrays.get("levels")
        if levels is None:
            continue
        inv = 1.0 / levels["eps"].to_numpy()
        n = 10.0 ** levels["iqm_log10_nhit"].to_numpy()
        win = levels["window"].to_numpy() & (fit.status == "ok")
        ok = np.isfinite(n) & (n > 0)
        label = label_of(key, many)
        ax.plot(inv[ok & ~win], n[ok & ~win], ls="none", marker=mk, mfc="white", mec=grey, ms=4)
        ax.plot(inv[ok & win], n[ok & win], ls="none", marker=mk, color=grey, ms=5,
                label=f"{label}: IQM n_hit (filled = fitting window, hollow = outside)")
        if np.isfinite(fit.p) and win.any():  # a finite p̂ with a non-ok status has no window to draw on
            xs = inv[win]
            ax.plot(xs, 10 ** fit.log10_C * xs ** fit.p, color=grey, ls=ls, lw=1.6,
                    label=f"{label}: p̂ = {fit.p:.3g} [{fit.p_low:.3g}, {fit.p_high:.3g}]")
            if anchor is None:
                anchor = (xs.min(), 10 ** fit.log10_C * xs.min() ** fit.p, xs.max())
    for claim, ls in zip(claims, [(0, (2, 2)), (0, (6, 2)), (0, (1, 3))]):
        if anchor is None:
            break
        x0, y0, x1 = anchor
        xs = np.array([x0, x1])
        ax.plot(xs, y0 * (xs / x0) ** claim.metric_exponent, color="0.0", ls=ls, lw=1.2,
                label=f"claim {claim.id}: slope {claim.metric_exponent:g}")
    set_log_axes(ax, "no ε level reached by the seeds:\nno n_hit(ε) to show")


def draw_profile(ax, results, claims) -> None:
    """Local exponent p(ε) on half-decade sub-windows (fit.arrays["profile"]) with its 95% CI, and the
    claimed exponent: a p(ε) still rising at the smallest ε means the window is pre-asymptotic."""
    for (key, fit, _), (ls, mk, grey) in zip(results, STYLES):
        prof = fit.arrays.get("profile")
        if prof is None or not len(prof):
            continue
        x = 1.0 / prof["eps_center"].to_numpy()
        lo, hi = prof["p_low"].to_numpy(dtype=float), prof["p_high"].to_numpy(dtype=float)
        ok = np.isfinite(lo) & np.isfinite(hi)
        ax.fill_between(x, lo, hi, where=ok, color=grey, alpha=0.18, linewidth=0)
        ax.plot(x, prof["p"].to_numpy(dtype=float), ls=ls, marker=mk, color=grey, ms=4,
                label=f"{label_of(key, False)}: local p(ε), half-decade windows")
    for claim, ls in zip(claims, [(0, (2, 2)), (0, (6, 2)), (0, (1, 3))]):
        ax.axhline(claim.metric_exponent, color="0.0", ls=ls, lw=1.2, label=f"claim {claim.id}: p = {claim.metric_exponent:g}")
    ax.set_xscale("log")


def metric_figure(results, claims, out_dir: Path, stem: str | None = None) -> list[Path]:
    """One figure (PNG + PDF) for one metric: results = [(key, fit, curves)] of fit_groups."""
    results = [r for r in results if r[1].status != "no_data"]
    if not results:
        return []
    results = results[:MAX_GROUPS]
    metric, x_name = results[0][1].metric, results[0][1].x_name
    rate_panel = metric in RATE_METRICS
    profile_panel = rate_panel and any(len(f.arrays.get("profile", ())) for _, f, _ in results)
    n_panels = 1 + rate_panel + profile_panel
    fig, axes = plt.subplots(1, n_panels, figsize=(6.2 * n_panels, 4.8), squeeze=False)
    left = axes[0, 0]
    draw_curves(left, results, claims)
    left.set_xlabel(X_LABELS.get(x_name, x_name))
    left.set_ylabel(METRIC_LABELS.get(metric, metric))
    left.set_title(f"{metric} vs {x_name}")
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
        ax.grid(True, which="major", color="0.85", lw=0.6)
    handles, labels = [], []
    for ax in axes[0]:
        h, l_ = ax.get_legend_handles_labels()
        handles += h
        labels += l_
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{metric}_vs_{x_name}"
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for p in paths:
        fig.savefig(p, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return paths
