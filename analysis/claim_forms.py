"""The verdict rules of the claim forms other than polynomial (docs/claim-meaning.md "Claim forms"):
geometric (metric ≤ C·ρ^x, judged on geometric.fit_geometric's ρ̂), difference (p_A − p_B, judged with
the paired bootstrap of `ratebench compare`, paired.exponent_difference) and exponent_curve (p̂ at each
value of a swept parameter against a predicted curve, each value judged by the polynomial rule)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
from ratebench.analysis.claims import (
    INCONCLUSIVE,
    PASS,
    RANK,
    VIOLATED,
    Claim,
    Verdict,
    claim_options,
    coverage,
    judge,
    unhealthy_reason,
)
from ratebench.analysis.curves import Curves
from ratebench.analysis.expression import ExpressionError, predict
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.geometric import GeometricFit, fit_geometric
from ratebench.analysis.paired import exponent_difference, restrict

# ---------------------------------------------------------------------------------------------- geometric

def slower_than_geometric(fit: GeometricFit) -> bool:
    """The geometric model is rejected in the slow direction: the cost per decade of ε (x per decade)
    on the window's lower half exceeds the upper half's, the 95 % CI of their difference wholly above
    the stability tolerance (stable_tol × the cost per decade). A polynomial decay n^-b costs 10^(1/b)
    times more x per decade with every decade of ε; a geometric one the same on every decade."""
    stab = fit.arrays.get("stability")
    return bool(stab is not None and np.isfinite(stab["d_low"]) and stab["d_low"] > stab["tol"])


def geometric_verdict(claim: Claim, fit: GeometricFit | None) -> Verdict:
    """The verdict of a geometric claim on one fit (one instance; claims.judge combines instances), at
    95 %. VIOLATED on a window of at least min_decades when (a) the CI of ρ̂ rules out the claim
    (upper_bound: ρ̂'s lower end above the claimed ρ, i.e. slower; equals: the CI misses ρ ± tolerance)
    or (b) the geometric model is rejected as too slow (slower_than_geometric: the cost per decade grows
    down the window, as a polynomial decay's does). PASS when the window reaches ε_min (coverage), the
    cost per decade is stable across the window (fit.asymptotic) and the CI lies at or below the claimed
    ρ (upper_bound) or inside ρ ± tolerance (equals). INCONCLUSIVE otherwise, with too few seeds or
    levels, and when more than max_unhealthy of the seeds are unhealthy."""
    if fit is None:
        return Verdict(claim, INCONCLUSIVE, "no runs of this algorithm in the evidence", None)
    unhealthy = unhealthy_reason(claim, fit)
    if unhealthy:
        return Verdict(claim, INCONCLUSIVE, unhealthy, fit)
    if fit.status not in ("ok", "too_narrow"):
        return Verdict(claim, INCONCLUSIVE, f"{fit.status}: {fit.reason}", fit)
    if fit.n_seeds < claim.min_seeds:
        return Verdict(claim, INCONCLUSIVE, f"{fit.n_seeds} seeds fitted, the claim needs ≥ {claim.min_seeds}", fit)
    covered, cover_text = coverage(claim, fit)
    rho, tol = claim.rho, claim.tolerance
    unit = "steps" if claim.x == "step" else claim.x
    ci = (f"ρ̂ {fit.rho:.6g} CI [{fit.rho_low:.6g}, {fit.rho_high:.6g}] per {claim.x} ({fit.per_decade:.3g} "
          f"{unit} per decade of ε, CI [{fit.per_decade_low:.3g}, {fit.per_decade_high:.3g}])")
    band = (rho - tol, rho + tol)
    if claim.relation == "upper_bound" and fit.rho_low > rho:
        contradiction = f"{ci} lies above the claimed ρ = {rho:.6g}: slower than claimed"
    elif claim.relation == "equals" and (fit.rho_high < band[0] or fit.rho_low > band[1]):
        contradiction = f"{ci} misses [{band[0]:.6g}, {band[1]:.6g}]"
    elif slower_than_geometric(fit):
        stab = fit.arrays["stability"]
        contradiction = (f"not geometric: the cost per decade of ε grows down the window, {stab['top']:.3g} {unit} "
                         f"per decade on its upper half vs {stab['bottom']:.3g} on its lower half (difference 95% CI "
                         f"[{stab['d_low']:.3g}, {stab['d_high']:.3g}], above +{stab['tol']:.2g}), as a polynomial "
                         f"decay's does; {ci}")
    else:
        contradiction = None
    if contradiction and fit.status == "too_narrow":
        return Verdict(claim, INCONCLUSIVE, f"{contradiction}, but on a window too narrow to contradict a rate "
                                            f"({fit.reason}; {cover_text})", fit)
    if contradiction:
        return Verdict(claim, VIOLATED, f"{contradiction} ({cover_text})", fit)
    if not covered:
        return Verdict(claim, INCONCLUSIVE, cover_text + (f" ({fit.reason})" if fit.status == "too_narrow" else ""),
                       fit)
    if not fit.asymptotic:
        return Verdict(claim, INCONCLUSIVE, f"not asymptotic: {fit.asymptotic_reason} ({ci}; {cover_text})", fit)
    if claim.relation == "upper_bound" and fit.rho_high <= rho:
        return Verdict(claim, PASS, f"{ci} ≤ {rho:.6g}; {cover_text}", fit)
    if claim.relation == "equals" and band[0] <= fit.rho_low and fit.rho_high <= band[1]:
        return Verdict(claim, PASS, f"{ci} inside [{band[0]:.6g}, {band[1]:.6g}]; {cover_text}", fit)
    return Verdict(claim, INCONCLUSIVE, f"{ci} contains a boundary of the claim ({claim.claimed_text}; {cover_text})",
                   fit)


def _geometric_note(claim: Claim, per: dict, worst, pooled: GeometricFit, with_window: bool = True) -> str:
    if len(per) <= 1:
        return ""
    rhos = ", ".join(f"{k}: {f.rho:.6g}" for k, f in per.items())
    return (f" | worst instance {worst} of {len(per)} (ρ̂ per instance {rhos}; pooled ρ̂ {pooled.rho:.6g} CI "
            f"[{pooled.rho_low:.6g}, {pooled.rho_high:.6g}])")


def judge_geometric(claim: Claim, curves: Curves, opts: FitOptions | None = None) -> Verdict:
    """A geometric claim on every instance of the evidence (claims.judge with fit_geometric)."""
    v = judge(claim, curves, opts, fitter=fit_geometric, rule=geometric_verdict, score=lambda f: f.rho_high,
              note=_geometric_note)
    if v.fit is not None:
        v.detail["estimate"] = {"name": "ρ̂", "value": v.fit.rho, "low": v.fit.rho_low, "high": v.fit.rho_high}
    return v


# ---------------------------------------------------------------------------------------------- difference

def difference_verdict(claim: Claim, d: dict) -> Verdict:
    """The verdict of a difference claim on exponent_difference's result d (pooled over instances, the
    paired bootstrap resampling instances, then seeds), at 95 %, in metric units (difference/unit_power).
    INCONCLUSIVE without a difference (too few shared seeds, no p̂ in a group), when a group is unhealthy
    beyond max_unhealthy, or when either fit is not asymptotic. VIOLATED when both fits span at least
    min_decades (status ok) and the CI contradicts the claim: equals, it misses difference ± tolerance;
    upper_bound, its lower end is above the claimed difference; lower_bound, its upper end is below.
    PASS when in addition both windows reach ε_min (coverage) and the CI lies inside the band / at or
    below / at or above the claimed difference. INCONCLUSIVE otherwise."""
    fa, fb = d.get("fit_a"), d.get("fit_b")
    fit = fa
    if d["status"] in ("too_few_shared", "no_exponent"):
        return Verdict(claim, INCONCLUSIVE, f"{d['status']}: {d['reason']}", fit)
    for name, f in ((claim.experiment, fa), (claim.baseline_experiment, fb)):
        why = unhealthy_reason(claim, f)
        if why:
            return Verdict(claim, INCONCLUSIVE, f"{name}: {why}", fit)
        if not f.asymptotic:
            return Verdict(claim, INCONCLUSIVE, f"{name}: not asymptotic: {f.asymptotic_reason}", fit)
    claimed, tol = claim.difference / claim.unit_power, claim.tolerance
    band = (claimed - tol, claimed + tol)
    lo, hi = d["diff_low"], d["diff_high"]
    ci = (f"p̂_A − p̂_B = {d['diff']:.3g} CI [{lo:.3g}, {hi:.3g}] (p̂_A {fa.p:.3g} on {claim.experiment}, p̂_B "
          f"{fb.p:.3g} on {claim.baseline_experiment}; {d['n_shared']} shared (instance, seed) pairs, paired "
          f"bootstrap over {d['n_units']} {d['boot_unit']}s)")
    if claim.relation == "equals":
        against, inside = (hi < band[0] or lo > band[1]), (band[0] <= lo and hi <= band[1])
        target = f"[{band[0]:.3g}, {band[1]:.3g}]"
    elif claim.relation == "upper_bound":
        against, inside, target = lo > claimed, hi <= claimed, f"≤ {claimed:.3g}"
    else:
        against, inside, target = hi < claimed, lo >= claimed, f"≥ {claimed:.3g}"
    covers = [coverage(claim, f) for f in (fa, fb)]
    cover_text = f"A: {covers[0][1]}; B: {covers[1][1]}"
    narrow = [f for f in (fa, fb) if f.status != "ok"]
    if against and narrow:
        return Verdict(claim, INCONCLUSIVE, f"{ci} is outside {target}, but a fit is not ok "
                                            f"({'; '.join(f'{f.status}: {f.reason}' for f in narrow)})", fit)
    if against:
        return Verdict(claim, VIOLATED, f"{ci} is outside {target} ({cover_text})", fit)
    if not all(c for c, _ in covers):
        return Verdict(claim, INCONCLUSIVE, f"{ci}; a window does not reach ε_min ({cover_text})", fit)
    if inside:
        return Verdict(claim, PASS, f"{ci} inside {target}; {cover_text}", fit)
    return Verdict(claim, INCONCLUSIVE, f"{ci} straddles a boundary of {target} ({cover_text})", fit)


def judge_difference(claim: Claim, a: Curves, b: Curves, opts: FitOptions | None = None) -> Verdict:
    """A difference claim on the curves of its experiment (a) and of its baseline_experiment (b), paired by
    (env.instance_seed, seed); seeds of one run with bit-identical curves count once in each."""
    opts = claim_options(claim, opts or FitOptions())
    d = exponent_difference(a, b, opts)  # it counts bit-identical seeds of one run once
    v = difference_verdict(claim, d)
    v.pooled = d.get("fit_b")
    v.detail.update(estimate={"name": "p̂_A − p̂_B", "value": d["diff"], "low": d["diff_low"], "high": d["diff_high"]},
                    fit_a=d.get("fit_a"), fit_b=d.get("fit_b"), n_shared=d["n_shared"], boot_unit=d["boot_unit"],
                    copies=d["copies"])
    if d["copies"]["A"] or d["copies"]["B"]:
        v.reason += (f" | seeds with bit-identical curves in one run counted once (A: {d['n_distinct'][0]} distinct, "
                     f"B: {d['n_distinct'][1]} distinct)")
    return v


# ---------------------------------------------------------------------------------------------- exponent_curve

def parameter_column(claim: Claim) -> str:
    return f"cfg.{claim.parameter}"


def parameter_values(claim: Claim, curves: Curves) -> np.ndarray:
    """The swept parameter's value of every fitted seed (S,), NaN where the run does not record it."""
    col = parameter_column(claim)
    fitted = curves.seeds[np.asarray(curves.used, bool)]
    if col not in fitted.columns:
        return np.full(curves.n_seeds, np.nan)
    return pd.to_numeric(fitted[col], errors="coerce").to_numpy(np.float64)


def judge_exponent_curve(claim: Claim, curves: Curves, opts: FitOptions | None = None) -> Verdict:
    """An exponent_curve claim: the evidence split by the value v of claim.parameter, each value judged by
    the polynomial rule (claims.judge: per instance, worst instance) as `equals predicted(v) ± tolerance`.
    PASS when every value passes (and there are ≥ 2 values), VIOLATED when some value is VIOLATED (its p̂
    CI wholly outside predicted(v) ± tolerance on a window of at least min_decades, or a stall or floor
    above ε_min), INCONCLUSIVE otherwise; the per-value results are in detail['per_value'] and the reason.
    The verdict's fit is the deciding value's (the first VIOLATED, else INCONCLUSIVE, else the largest CI
    upper end relative to its band)."""
    values = parameter_values(claim, curves)
    found = np.unique(values[np.isfinite(values)])
    if not len(found):
        return Verdict(claim, INCONCLUSIVE, f"no run of the evidence records a numeric {claim.parameter}", None)
    per_value, verdicts = [], {}
    for v in found:
        sub = restrict(curves, values == v)
        try:
            pred = predict(claim.predicted, float(v))
        except ExpressionError as exc:
            verdicts[v] = Verdict(claim, INCONCLUSIVE, f"predicted {claim.predicted!r} {exc}", None)
            per_value.append({"value": float(v), "predicted": np.nan, "verdict": INCONCLUSIVE,
                              "reason": verdicts[v].reason})
            continue
        if not pred > 0:
            verdicts[v] = Verdict(claim, INCONCLUSIVE, f"predicted({v:g}) = {pred:.3g} is not a positive exponent", None)
        else:
            claim_v = replace(claim, form="polynomial", exponent=pred, relation="equals")
            verdicts[v] = judge(claim_v, sub, opts)
        f = verdicts[v].fit
        per_value.append({"value": float(v), "predicted": pred / claim.unit_power, "verdict": verdicts[v].verdict,
                          "p": getattr(f, "p", np.nan), "p_low": getattr(f, "p_low", np.nan),
                          "p_high": getattr(f, "p_high", np.nan), "n_seeds": getattr(f, "n_seeds", 0),
                          "reason": verdicts[v].reason})
    ranks = [RANK[verdicts[v].verdict] for v in found]
    if min(ranks) == RANK[VIOLATED]:
        outcome = VIOLATED
    elif min(ranks) == RANK[PASS] and len(found) >= 2:
        outcome = PASS
    else:
        outcome = INCONCLUSIVE

    def off(row):  # how far the CI's far end lies from the predicted value, relative to the tolerance
        return max(abs(row.get("p_high", np.nan) - row["predicted"]), abs(row.get("p_low", np.nan) - row["predicted"]))

    decide = min(range(len(found)), key=lambda i: (ranks[i], -np.nan_to_num(off(per_value[i]), nan=np.inf)))
    lines = "; ".join(
        f"{claim.parameter} = {r['value']:g}: {r['verdict']}, p̂ {r.get('p', np.nan):.3g} "
        f"[{r.get('p_low', np.nan):.3g}, {r.get('p_high', np.nan):.3g}] vs predicted {r['predicted']:.3g} ± "
        f"{claim.tolerance:g}" for r in per_value)
    head = {VIOLATED: "some value's p̂ contradicts the predicted curve",
            PASS: "every value's p̂ CI lies within predicted ± tolerance",
            INCONCLUSIVE: ("only one value of the parameter in the evidence: a curve needs ≥ 2"
                           if len(found) < 2 and min(ranks) == RANK[PASS] else "no value contradicts the curve, "
                           "not every value passes")}[outcome]
    deciding = verdicts[found[decide]]
    reason = (f"{head} ({lines}) | deciding value {claim.parameter} = {found[decide]:g}: {deciding.reason}")
    return Verdict(claim, outcome, reason, deciding.fit, per_instance=deciding.per_instance, pooled=deciding.pooled,
                   worst_instance=deciding.worst_instance,
                   detail={"per_value": per_value, "deciding_value": float(found[decide]),
                           "estimate": {"name": f"p̂ at {claim.parameter} = {found[decide]:g}",
                                        "value": getattr(deciding.fit, "p", np.nan),
                                        "low": getattr(deciding.fit, "p_low", np.nan),
                                        "high": getattr(deciding.fit, "p_high", np.nan)}})

