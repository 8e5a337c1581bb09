"""Claims (docs/analysis.md): a YAML record of a published rate, validated field by field, and the verdict
rule that turns a rate fit into PASS / VIOLATED / INCONCLUSIVE."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from ratebench.analysis import evidence
from ratebench.analysis.curves import METRICS, X_AXES, Curves
from ratebench.analysis.fit import FitOptions, RateFit, fit_rate
from ratebench.core.errors import ConfigError

RELATIONS = ("upper_bound", "equals")
CLAIM_ID = re.compile(r"[A-Za-z0-9_.-]+")
# ε may be stated in the metric's own unit or, for grad_sq, in gradient-norm units (ε_norm² = ε_sq).
UNIT_POWER = {("grad_sq", "grad_norm"): 2.0, ("pgrad_sq", "grad_norm"): 2.0}
REQUIRED = ("id", "source", "algorithm", "experiment", "metric", "x", "exponent", "relation", "epsilon")
# claim forms (docs/claim-meaning.md "Claim forms"): the fields each adds to the common ones, its relations
COMMON = ("id", "source", "algorithm", "experiment", "metric", "x", "epsilon")
FORMS = ("polynomial", "geometric", "difference", "exponent_curve")
FORM_FIELDS = {"polynomial": ("exponent", "relation"), "geometric": ("rho", "relation"),
               "difference": ("baseline_experiment", "difference", "relation"),
               "exponent_curve": ("parameter", "predicted", "tolerance")}
FORM_RELATIONS = {"polynomial": RELATIONS, "geometric": RELATIONS,
                  "difference": ("equals", "upper_bound", "lower_bound"), "exponent_curve": ("equals",)}
OWN_FIELDS = {"exponent": "polynomial", "rho": "geometric", "baseline_experiment": "difference",
              "difference": "difference", "parameter": "exponent_curve", "predicted": "exponent_curve"}
DOTTED_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
PASS, VIOLATED, INCONCLUSIVE = "PASS", "VIOLATED", "INCONCLUSIVE"
UPPER_BOUND_CAVEAT = ("A faster empirical rate (smaller p̂) is consistent with an upper bound on the sample "
                      "complexity; it is evidence on these problems, never a proof of the bound.")


@dataclass(frozen=True)
class Claim:
    """A claimed rate N(ε) ≤ C·ε^-exponent (upper_bound) or N(ε) ≍ ε^-exponent (equals ± tolerance),
    on `metric` against `x`, for ε in [eps_min, eps_max] stated in `eps_unit`."""

    id: str
    source: str
    algorithm: str
    experiment: str
    metric: str
    x: str
    exponent: float
    relation: str
    tolerance: float
    eps_unit: str
    eps_min: float
    eps_max: float
    env: str | None = None
    min_seeds: int = 4
    # held-out environment instances the evidence must cover: a count (at least this many distinct
    # env.instance_seed values outside the experiment's tuning instances) or an explicit tuple
    instances: int | tuple[int, ...] = 1
    # the largest fraction of unhealthy seeds (diverged, saturated, stalled) the evidence may hold; above
    # it the claim is INCONCLUSIVE: a rate read off the healthy seeds alone would be survivorship
    max_unhealthy: float = 0.25
    path: str = ""
    note: str = ""
    # the claim's form (docs/claim-meaning.md): polynomial (exponent above), geometric (metric ≤ C·rho^x),
    # difference (p_A − p_B of experiment and baseline_experiment), exponent_curve (p̂ against predicted(v))
    form: str = "polynomial"
    rho: float = float("nan")
    baseline_experiment: str | None = None
    difference: float = float("nan")
    parameter: str | None = None
    predicted: str | None = None

    @property
    def experiments(self) -> tuple[str, ...]:
        """The experiments whose runs are this claim's evidence (two for a difference claim)."""
        return (self.experiment,) if self.baseline_experiment is None else (self.experiment, self.baseline_experiment)

    @property
    def claimed_text(self) -> str:
        """The claim as one short phrase in metric units: '= 1 ± 0.2', 'ρ ≤ 0.81', 'p_A − p_B = 1 ± 0.3',
        'p(v) = 1/v ± 0.2'."""
        rel = {"upper_bound": "≤ ", "lower_bound": "≥ ", "equals": "= "}[self.relation]
        tol = f" ± {self.tolerance:g}" if self.relation == "equals" else ""
        if self.form == "geometric":
            return f"ρ {rel}{self.rho:g}{tol}"
        if self.form == "difference":
            return f"p_A − p_B {rel}{self.difference / self.unit_power:g}{tol}"
        if self.form == "exponent_curve":
            scale = "" if self.unit_power == 1 else f" / {self.unit_power:g}"
            return f"p({self.parameter}) = {self.predicted}{scale}{tol}"
        return f"{rel}{self.metric_exponent:g}{tol}"

    @property
    def unit_power(self) -> float:
        """metric = (ε in eps_unit)^unit_power."""
        return UNIT_POWER.get((self.metric, self.eps_unit), 1.0)

    @property
    def metric_exponent(self) -> float:
        """The claimed exponent for ε measured in the metric's own unit."""
        return self.exponent / self.unit_power

    @property
    def metric_eps_range(self) -> tuple[float, float]:
        return self.eps_min ** self.unit_power, self.eps_max ** self.unit_power

    @property
    def curve_slope(self) -> float:
        """Slope of log metric vs log x implied by the claim: metric ≈ x^(-1/p)."""
        return -1.0 / self.metric_exponent


def find_claim(name: str, claims_dir) -> Path:
    """A claim named by its file stem (`control`) or its id (`control_reward_mle`) among the claim
    files in claims_dir (a folder, or a list of them: the conf folders' claims/), else `name` itself as a path."""
    folders = [claims_dir] if isinstance(claims_dir, (str, Path)) else list(claims_dir)
    files = [p for folder in folders for p in sorted(Path(folder).glob("*.yaml"))]
    for p in files:
        if p.stem == name:
            return p
    for p in files:
        try:
            data = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(data, dict) and data.get("id") == name:
            return p
    return Path(name)


def load_claim(path) -> Claim:
    """Read and validate one claim file; every problem raises ConfigError naming the field."""
    path = Path(path)
    where = f"{path}"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(where, f"cannot read claim file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(where, f"not UTF-8 text (byte {exc.start}: {exc.reason}); a claim file is YAML") from None
    except yaml.YAMLError as exc:
        raise ConfigError(where, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(where, "a claim file must hold a mapping of fields " + ", ".join(REQUIRED))
    return parse_claim(data, where)


def parse_claim(data: dict, where: str = "claim") -> Claim:
    def field(name):
        return f"{where}: {name}"

    form = data.get("form", "polynomial")
    if form is None:
        form = "polynomial"
    if form not in FORMS:
        raise ConfigError(field("form"), f"unknown form {form!r}; allowed: {', '.join(FORMS)}")
    required = COMMON + FORM_FIELDS[form]
    for name in required:
        if name not in data or data[name] is None:
            raise ConfigError(field(name), f"missing; a {form} claim needs {', '.join(required)}")
    for name, owner in OWN_FIELDS.items():
        if name in data and owner != form:
            raise ConfigError(field(name), f"not a field of a {form} claim (it belongs to form: {owner}); "
                                           f"a {form} claim states {', '.join(FORM_FIELDS[form])}")
    for name in ("id", "source", "algorithm", "experiment"):
        if not isinstance(data[name], str) or not data[name].strip():
            raise ConfigError(field(name), f"must be a non-empty string, got {data[name]!r}")
    if not CLAIM_ID.fullmatch(data["id"]) or data["id"].startswith("."):
        raise ConfigError(field("id"), f"must be letters, digits, '_', '.' or '-' (it names files and folders), "
                                       f"got {data['id']!r}")
    if data["metric"] not in METRICS:
        raise ConfigError(field("metric"), f"unknown metric {data['metric']!r}; allowed: {', '.join(METRICS)}")
    if data["x"] not in X_AXES:
        raise ConfigError(field("x"), f"unknown x {data['x']!r}; allowed: {', '.join(X_AXES)}")
    extra = _form_fields(form, data, field)
    relation = data.get("relation", "equals")
    if relation not in FORM_RELATIONS[form]:
        raise ConfigError(field("relation"), f"unknown relation {relation!r} for a {form} claim; allowed: "
                                             f"{', '.join(FORM_RELATIONS[form])}")
    tolerance = 0.0
    if relation == "equals":
        if data.get("tolerance") is None:
            what = {"polynomial": "p must lie within exponent ± tolerance", "geometric": "ρ within rho ± tolerance",
                    "difference": "p_A − p_B within difference ± tolerance",
                    "exponent_curve": "p̂ within predicted(v) ± tolerance"}[form]
            raise ConfigError(field("tolerance"), f"required when relation is equals ({what})")
        tolerance = _positive(data["tolerance"], field("tolerance"))
    elif form != "polynomial" and data.get("tolerance") is not None:
        raise ConfigError(field("tolerance"), f"only with relation: equals (this claim's relation is {relation})")
    eps = data["epsilon"]
    if not isinstance(eps, dict):
        raise ConfigError(field("epsilon"), "must be a mapping with unit, min, max")
    units = [data["metric"]] + [u for (m, u) in UNIT_POWER if m == data["metric"]]
    if form == "geometric":
        units = [data["metric"]]  # ρ is per unit of x: a change of ε's unit would square it, not rescale it
    if eps.get("unit") not in units:
        raise ConfigError(field("epsilon.unit"), f"must state the unit of ε, got {eps.get('unit')!r}; "
                                                 f"allowed for metric {data['metric']}: {', '.join(units)}")
    eps_min = _positive(eps.get("min"), field("epsilon.min"))
    eps_max = _positive(eps.get("max"), field("epsilon.max"))
    if not eps_min < eps_max:
        raise ConfigError(field("epsilon"), f"min must be < max, got min={eps_min}, max={eps_max}")
    min_seeds = data.get("min_seeds", 4)
    if isinstance(min_seeds, bool) or not isinstance(min_seeds, int) or min_seeds < 2:
        raise ConfigError(field("min_seeds"), f"must be an integer >= 2, got {min_seeds!r}")
    instances = data.get("instances", 1)
    if isinstance(instances, list) and instances and all(isinstance(i, int) and not isinstance(i, bool) for i in instances):
        if len(set(instances)) != len(instances):
            raise ConfigError(field("instances"), f"must not repeat an instance, got {instances}")
        instances = tuple(instances)
    elif not (isinstance(instances, int) and not isinstance(instances, bool) and instances >= 1):
        raise ConfigError(field("instances"), f"must be a count >= 1 or a list of env.instance_seed values, got {instances!r}")
    max_unhealthy = data.get("max_unhealthy", 0.25)
    if isinstance(max_unhealthy, bool) or not isinstance(max_unhealthy, (int, float)) \
            or not 0.0 <= float(max_unhealthy) <= 1.0:
        raise ConfigError(field("max_unhealthy"), f"must be a fraction in [0, 1], got {max_unhealthy!r}")
    env = data.get("env")
    if env is not None and not isinstance(env, str):
        raise ConfigError(field("env"), f"must be an environment name, got {env!r}")
    return Claim(id=data["id"], source=data["source"], algorithm=data["algorithm"], experiment=data["experiment"],
                 metric=data["metric"], x=data["x"], exponent=extra.pop("exponent", float("nan")), relation=relation,
                 tolerance=tolerance, eps_unit=eps["unit"], eps_min=eps_min, eps_max=eps_max, env=env,
                 min_seeds=min_seeds, instances=instances, max_unhealthy=float(max_unhealthy), path=where,
                 note=str(data.get("note", "")), form=form, **extra)


def _form_fields(form: str, data: dict, field) -> dict:
    """The checked values of a form's own fields (FORM_FIELDS), as Claim keyword arguments."""
    if form == "polynomial":
        return {"exponent": _positive(data["exponent"], field("exponent"))}
    if form == "geometric":
        rho = _positive(data["rho"], field("rho"))
        if not rho < 1:
            raise ConfigError(field("rho"), f"must be a contraction factor in (0, 1) per unit of x, got {data['rho']!r}")
        return {"rho": rho}
    if form == "difference":
        base = data["baseline_experiment"]
        if not isinstance(base, str) or not base.strip():
            raise ConfigError(field("baseline_experiment"), f"must be a non-empty experiment name, got {base!r}")
        if base == data["experiment"]:
            raise ConfigError(field("baseline_experiment"), f"must name another experiment than `experiment` "
                                                            f"({base!r}): the claim compares two")
        diff = data["difference"]
        if isinstance(diff, bool) or not isinstance(diff, (int, float)):
            try:
                diff = float(diff)
            except (TypeError, ValueError):
                raise ConfigError(field("difference"), f"must be a number (the claimed p_A − p_B), got {diff!r}") from None
        if not math.isfinite(diff):
            raise ConfigError(field("difference"), f"must be a finite number (the claimed p_A − p_B), got {diff!r}")
        return {"baseline_experiment": base, "difference": float(diff)}
    param, predicted = data["parameter"], data["predicted"]
    if not isinstance(param, str) or not DOTTED_KEY.fullmatch(param):
        raise ConfigError(field("parameter"), f"must be a dotted config key the experiment sweeps (e.g. "
                                              f"algorithm.lr_exponent), got {param!r}")
    from ratebench.analysis.expression import ExpressionError, parse_expression

    try:
        parse_expression(predicted)
    except ExpressionError as exc:
        raise ConfigError(field("predicted"), str(exc)) from None
    return {"parameter": param, "predicted": str(predicted)}


def _positive(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)  # "7/2" is not accepted, "3.5" or 3.5 is
        except (TypeError, ValueError):
            raise ConfigError(where, f"must be a positive number, got {value!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(where, f"must be a positive number, got {value!r}")
    return float(value)


@dataclass
class Verdict:
    """A claim's verdict. fit: the fit the verdict was decided on (the worst instance when the
    evidence holds several); per_instance: one fit per environment instance; pooled: the fit of all
    instances together (hierarchical bootstrap), shown beside; worst_instance: the deciding one."""

    claim: Claim
    verdict: str
    reason: str
    fit: RateFit | None
    per_instance: dict = field(default_factory=dict)
    pooled: RateFit | None = None
    worst_instance: object = None
    # form-specific results (docs/claim-meaning.md): estimate {name, value, low, high} for every form but
    # polynomial, per-value rows of an exponent_curve, the two fits of a difference, copies counted once
    detail: dict = field(default_factory=dict)

    # The numbers the verdict was decided on, read from `fit` (NaN / 0 when there was no evidence), so that
    # `verdict.p` reads as `ratebench check` prints it: p̂ and its 95% CI, the ε window, seeds and instances.
    def _of(self, name: str, empty=float("nan")):
        return empty if self.fit is None else getattr(self.fit, name, empty)

    p = property(lambda self: self._of("p"), doc="p̂: n_hit(ε) ∝ ε^-p on the deciding fit")
    p_low = property(lambda self: self._of("p_low"), doc="lower end of p̂'s bootstrap 95% CI")
    p_high = property(lambda self: self._of("p_high"), doc="upper end of p̂'s bootstrap 95% CI")
    ci = property(lambda self: (self.p_low, self.p_high), doc="(p_low, p_high)")
    eps_low = property(lambda self: self._of("eps_low"), doc="smallest ε of the fitting window")
    eps_high = property(lambda self: self._of("eps_high"), doc="largest ε of the fitting window")
    window = property(lambda self: (self.eps_low, self.eps_high), doc="the fitting window (eps_low, eps_high)")
    p_local = property(lambda self: self._of("p_local"), doc="local exponent at ε_min (or the window's bottom)")
    status = property(lambda self: self._of("status", "no_data"), doc="the fit's status (ok, too_narrow, ...)")
    n_seeds = property(lambda self: self._of("n_seeds", 0), doc="seeds in the deciding fit")
    n_diverged = property(lambda self: self._of("n_diverged", 0), doc="diverged seeds among them")
    n_unhealthy = property(lambda self: 0 if self.fit is None else n_unhealthy(self.fit),
                           doc="diverged, saturated or stalled seeds among them")
    n_instances = property(lambda self: max(len(self.per_instance), 0 if self.fit is None else 1),
                           doc="environment instances of the evidence")
    has_evidence = property(lambda self: self.fit is not None, doc="False: no runs to judge (INCONCLUSIVE)")


GRID_STEP = 10 ** (1 / FitOptions().per_decade)  # a window "reaches" ε_min when its lowest level is within one step
COVER_REACH = FitOptions().reach  # ... and this fraction of the seeds stay ≤ ε_min at the end


def coverage(claim: Claim, fit: RateFit) -> tuple[bool, str]:
    """Does the fitting window reach the claim's ε_min (its lowest level within one grid step of
    ε_min, and ≥ 75 % of the seeds staying ≤ ε_min) and span the required decades (else the fit
    is `too_narrow`)? Returns (covered, "window covers [a, b] of the claimed [ε_min, ε_max]")."""
    lo, hi = claim.metric_eps_range
    text = (f"window covers [{fit.eps_low:.3g}, {fit.eps_high:.3g}] of the claimed [{lo:.3g}, {hi:.3g}]"
            if fit.n_levels else f"no window in the claimed [{lo:.3g}, {hi:.3g}]")
    reaches = fit.eps_low <= lo * GRID_STEP * (1 + 1e-9) and fit.reach_eps_min >= COVER_REACH
    return bool(reaches and fit.status != "too_narrow"), text


def _floor_above(fit: RateFit, eps_min: float) -> bool:
    """The fitted floor's whole 95 % CI lies above ε_min: the metric cannot reach the claimed range."""
    return bool(fit.c > 0 and np.isfinite(fit.c_low) and fit.c_low > eps_min)


def _pb_disagree(fit: RateFit) -> bool:
    """p̂ (from n_hit) and 1/b̂ (from the decay fit) disagree beyond both CIs."""
    inv_lo, inv_hi = 1.0 / fit.b_high, 1.0 / fit.b_low  # CI of 1/b
    return bool(np.isfinite(fit.p_low) and np.isfinite(inv_lo) and (fit.p_low > inv_hi or fit.p_high < inv_lo))


def verdict(claim: Claim, fit: RateFit | None) -> Verdict:
    """The verdict rule (docs/analysis.md) at 95 %, on one fit (one instance; judge() combines
    instances). upper_bound: PASS only if the window reaches ε_min and spans ≥ min_decades (coverage), the local exponent's
    trend at ε_min stays below p_claim, p̂ and 1/b̂ do not disagree with 1/b̂ above p_claim, and
    the CI's upper end ≤ p_claim; VIOLATED if its lower end > p_claim (on a window of at least
    min_decades, as for equals), the metric stalls above
    the ε range (final IQM above ε_min and a log-log decay whose whole CI is slower than
    1/(p_claim + tol)), or the fitted floor's CI lies above ε_min. equals (± tol): PASS if covered
    and the CI lies inside [p−tol, p+tol], VIOLATED if it misses that band entirely on a window of at
    least min_decades (or stall, floor). INCONCLUSIVE otherwise, and when the fit has too few seeds or ε levels. Exponents are
    compared in the metric's unit."""
    if fit is None:
        return Verdict(claim, INCONCLUSIVE, "no runs of this algorithm in the evidence", None)
    unhealthy = unhealthy_reason(claim, fit)
    if unhealthy:
        return Verdict(claim, INCONCLUSIVE, unhealthy, fit)
    p_claim = claim.metric_exponent
    lo_eps, _ = claim.metric_eps_range
    slowest = 1.0 / (p_claim + claim.tolerance)  # decay exponent the claim implies at the least
    if fit.status != "no_data" and _stalls(fit, lo_eps, slowest):
        return Verdict(claim, VIOLATED, f"the metric stalls above the ε range: final IQM {fit.final_iqm:.3g} > "
                                        f"ε_min = {lo_eps:.3g} and its log-log decay over the last decades, "
                                        f"{fit.decay:.3g} (95% CI up to {fit.decay_high:.3g}), is slower than "
                                        f"the claimed 1/{p_claim + claim.tolerance:.3g} = {slowest:.3g}", fit)
    if fit.status != "no_data" and _floor_above(fit, lo_eps):
        return Verdict(claim, VIOLATED, f"cannot reach the claimed range: the fitted floor ĉ = {fit.c:.3g} "
                                        f"(95% CI [{fit.c_low:.3g}, {fit.c_high:.3g}]) lies above ε_min = "
                                        f"{lo_eps:.3g}", fit)
    covered, cover_text = coverage(claim, fit)
    if fit.status not in ("ok", "too_narrow"):
        return Verdict(claim, INCONCLUSIVE, f"{fit.status}: {fit.reason}", fit)
    if fit.n_seeds < claim.min_seeds:
        return Verdict(claim, INCONCLUSIVE, f"{fit.n_seeds} seeds fitted, the claim needs ≥ {claim.min_seeds}", fit)
    if not fit.asymptotic:  # the window's exponent is not shown to be the rate (fit.rate_agrees_with_tail)
        return Verdict(claim, INCONCLUSIVE, f"not asymptotic: {fit.asymptotic_reason}", fit)
    ci = f"CI [{fit.p_low:.3g}, {fit.p_high:.3g}]"
    band = (p_claim - claim.tolerance, p_claim + claim.tolerance)
    if claim.relation == "upper_bound" and fit.p_low > p_claim:  # steeper than claimed on the covered part
        contradiction = f"{ci} lies above the claimed {p_claim:.3g}"
    elif claim.relation == "equals" and (fit.p_high < band[0] or fit.p_low > band[1]):
        contradiction = f"{ci} misses [{band[0]:.3g}, {band[1]:.3g}]"
    else:
        contradiction = None
    if contradiction and fit.status == "too_narrow":  # a window under a decade (n_hit on a 0.1-decade x grid,
        # so p̂ is quantised: exactly 1 on the exact-oracle grad_sq runs) cannot contradict a rate, only fail to show it
        return Verdict(claim, INCONCLUSIVE, f"{contradiction}, but on a window too narrow to contradict a rate "
                                            f"({fit.reason}; {cover_text})", fit)
    if contradiction:
        return Verdict(claim, VIOLATED, f"{contradiction} ({cover_text})", fit)
    if claim.relation == "upper_bound":
        if not covered:
            return Verdict(claim, INCONCLUSIVE, f"{cover_text}" + _narrow(fit), fit)
        if fit.p_local_high >= p_claim:
            rising = "rising towards" if fit.p_trend > 0 else "at ε_min could reach"
            return Verdict(claim, INCONCLUSIVE, f"pre-asymptotic: local exponent {rising} p_claim = {p_claim:.3g} "
                                                f"(trend at ε_min {fit.p_local:.3g}, 95% CI up to "
                                                f"{fit.p_local_high:.3g}; {ci}; {cover_text})", fit)
        if _pb_disagree(fit) and 1.0 / fit.b_low > p_claim:
            return Verdict(claim, INCONCLUSIVE, f"p̂ = {fit.p:.3g} ({ci}) and 1/b̂ = {1 / fit.b:.3g} (CI up to "
                                                f"{1 / fit.b_low:.3g} > {p_claim:.3g}) disagree beyond their CIs "
                                                f"({cover_text})", fit)
        if fit.p_high <= p_claim:
            return Verdict(claim, PASS, f"{ci} ≤ {p_claim:.3g}; {cover_text}. {UPPER_BOUND_CAVEAT}", fit)
        return Verdict(claim, INCONCLUSIVE, f"{ci} contains the claimed {p_claim:.3g} ({cover_text})", fit)
    if not covered:
        return Verdict(claim, INCONCLUSIVE, f"{cover_text}" + _narrow(fit), fit)
    if band[0] <= fit.p_low and fit.p_high <= band[1]:
        return Verdict(claim, PASS, f"{ci} inside [{band[0]:.3g}, {band[1]:.3g}]; {cover_text}", fit)
    return Verdict(claim, INCONCLUSIVE, f"{ci} overlaps but is not inside [{band[0]:.3g}, {band[1]:.3g}] "
                                        f"({cover_text})", fit)


def n_unhealthy(fit: RateFit) -> int:
    """Seeds that are not healthy: diverged, saturated or stalled (fit.n_unhealthy, or their sum)."""
    return int(fit.n_unhealthy or (fit.n_diverged + fit.n_saturated + fit.n_stalled))


def unhealthy_reason(claim: Claim, fit: RateFit) -> str:
    """Why the evidence's seed health cannot carry a verdict ('' when it can): more than
    claim.max_unhealthy of the fitted seeds are diverged, saturated or stalled."""
    bad = n_unhealthy(fit)
    if not bad:
        return ""
    share = bad / fit.n_seeds if fit.n_seeds else 1.0
    if share <= claim.max_unhealthy:
        return ""
    parts = [f"{n} {name}" for n, name in ((fit.n_diverged, "diverged"), (fit.n_saturated, "saturated"),
                                           (fit.n_stalled, "stalled")) if n]
    return (f"unhealthy seeds: {bad} of {fit.n_seeds} ({share:.0%}: {', '.join(parts) or 'unhealthy'}) exceed the "
            f"claim's max_unhealthy {claim.max_unhealthy:.0%}; a rate read off the healthy seeds alone would "
            f"ignore the ones that never converged")


def _narrow(fit: RateFit) -> str:
    return f" ({fit.reason})" if fit.status == "too_narrow" else ""


def _stalls(fit: RateFit, eps_min: float, slowest: float) -> bool:
    """Still above the smallest claimed ε at the end, and decaying significantly slower than the
    claim allows over the asymptotic points (the whole CI of the log-log decay below 1/p)."""
    return bool(math.isfinite(fit.decay_high) and fit.decay_high < slowest and fit.final_iqm > eps_min)


RANK = {VIOLATED: 0, INCONCLUSIVE: 1, PASS: 2}


def claim_options(claim: Claim, opts: FitOptions) -> FitOptions:
    """The fit options of a claim: its ε range (metric units) and its minimum seed count."""
    lo, hi = claim.metric_eps_range
    return replace(opts, eps_min=lo, eps_max=hi, min_seeds=claim.min_seeds)


def judge(claim: Claim, curves: Curves, opts: FitOptions | None = None, fitter=fit_rate, rule=None,
          score=None, note=None) -> Verdict:
    """The claim on every environment instance of the evidence: one fit per instance (seed
    bootstrap within it) and the pooled fit (hierarchical bootstrap: instances, then seeds). A
    bound must hold on each instance: PASS only if every instance passes, VIOLATED if any is
    violated, else INCONCLUSIVE; the verdict, its fit and its reason are those of the worst
    instance (the first VIOLATED, else INCONCLUSIVE, else the largest CI upper end). The reason
    line also names the covered ε range, the worst instance and the local-exponent trend.
    Seeds of one run with bit-identical curves count once (groups.distinct_curves). When every run's
    seeds are one curve (a deterministic method from one start), the instances are the only
    replication: each instance is judged on its one curve (a point estimate, zero-width CI) and the
    claim's min_seeds is checked against the number of distinct curves over all instances.
    fitter, rule, score, note: the form's fit (fit_rate), verdict rule (verdict), the number that ranks
    passing instances (fit.p_high) and the reason's evidence note (_evidence_note)."""
    from ratebench.analysis.groups import distinct_curves

    rule, score, note = rule or verdict, score or (lambda f: f.p_high), note or _evidence_note
    opts = claim_options(claim, opts or FitOptions())
    curves, copies = distinct_curves(curves)
    labels = list(curves.instance_labels)
    counts = {lab: int((curves.instances == lab).sum()) for lab in labels}
    deterministic = bool(copies) and all(n == 1 for n in counts.values())
    copy_note = _copies_note(copies, deterministic)
    if deterministic:
        if len(labels) < claim.min_seeds:
            fit = fit_single(fitter, curves.subset(labels[0]) if len(labels) == 1 else curves, replace(opts, min_seeds=1))
            return Verdict(claim, INCONCLUSIVE, f"{len(labels)} distinct curve(s) over {len(labels)} instance(s), the "
                                                f"claim needs ≥ {claim.min_seeds}{copy_note}", fit,
                           detail={"copies": copies, "deterministic": True})
        claim_i, opts = replace(claim, min_seeds=1), replace(opts, min_seeds=1)
    else:
        claim_i = claim
    if len(labels) <= 1:
        fit = fit_single(fitter, curves, opts)
        per = {labels[0] if labels else 0: fit}
        pooled = fit
    else:
        per = {lab: fit_single(fitter, curves.subset(lab), opts) for lab in labels}
        pooled = fitter(curves, opts)
    verdicts = {lab: rule(claim_i, f) for lab, f in per.items()}

    def badness(lab):
        value = score(per[lab])
        return RANK[verdicts[lab].verdict], -(value if np.isfinite(value) else np.inf)

    worst = min(verdicts, key=badness)
    v = verdicts[worst]
    text = note(claim, per, worst, pooled, with_window="window covers [" not in v.reason)
    return Verdict(claim, v.verdict, v.reason + text + copy_note, v.fit, per_instance=per, pooled=pooled,
                   worst_instance=worst, detail={**v.detail, "copies": copies, "deterministic": deterministic})


def fit_single(fitter, curves: Curves, opts: FitOptions):
    """fitter(curves, opts), also for a group of one curve (which the bootstrap fits cannot resample:
    it is fitted as two copies, its CI zero-width, and reported as the one seed it is)."""
    if curves.n_seeds != 1:
        return fitter(curves, opts)
    used = np.asarray(curves.used, bool)
    one = curves.seeds[used]
    doubled = Curves(curves.metric, curves.x_name, curves.x, np.repeat(curves.values, 2, axis=0),
                     np.repeat(curves.strata, 2), pd.concat([one, one], ignore_index=True), np.ones(2, bool),
                     np.repeat(curves.instances, 2), np.repeat(curves.nonfinite, 2),
                     None if curves.noise is None else np.repeat(curves.noise, 2, axis=0))
    fit = fitter(doubled, opts)
    health = curves.health()
    fit.n_seeds = 1
    fit.n_diverged, fit.n_failed, fit.n_saturated = health["diverged"], health["failed"], health["saturated"]
    fit.n_stalled, fit.n_unhealthy = health["stalled"], health["unhealthy"]
    return fit


def _copies_note(copies: dict, deterministic: bool) -> str:
    """' | the 4 seeds of each run gave one curve: counted once ...' (empty without copies)."""
    if not copies:
        return ""
    parts = ", ".join(f"{k}: {a} → {b}" for k, (a, b) in copies.items())
    if deterministic:
        return (f" | deterministic: the seeds of each run gave one curve, counted once (seeds → distinct curves per "
                f"instance {parts}); the instances are the replication")
    return f" | seeds with bit-identical curves in one run counted once (per instance {parts})"


def _evidence_note(claim: Claim, per: dict, worst, pooled: RateFit, with_window: bool = True) -> str:
    """' | window ...; worst instance ...; local exponent ...' for the reason line (the window is
    left out when the reason already says what it covers)."""
    f = per[worst]
    lo, hi = claim.metric_eps_range
    window = (f"window covers [{f.eps_low:.3g}, {f.eps_high:.3g}] of the claimed [{lo:.3g}, {hi:.3g}]"
              if f.n_levels else f"no window in the claimed [{lo:.3g}, {hi:.3g}]")
    parts = [window] if with_window else []
    if len(per) > 1:
        ps = ", ".join(f"{k}: {v.p:.3g}" for k, v in per.items())
        parts.append(f"worst instance {worst} of {len(per)} (p̂ per instance {ps}; pooled p̂ {pooled.p:.3g} "
                     f"CI [{pooled.p_low:.3g}, {pooled.p_high:.3g}])")
    if np.isfinite(f.p_local):
        trend = f", trend {f.p_trend:+.2g} per decade of 1/ε" if np.isfinite(f.p_trend) else ""
        parts.append(f"local exponent at ε_min {f.p_local:.3g} [{f.p_local_low:.3g}, {f.p_local_high:.3g}]{trend}")
    return (" | " + "; ".join(parts)) if parts else ""


def what_it_would_take(v: Verdict) -> dict | None:
    """For an INCONCLUSIVE verdict with a fit: evidence.what_it_would_take (projected budget, seeds for
    one more check and its error rate), or None when there is nothing to say."""
    c, f = v.claim, v.fit
    if v.verdict != INCONCLUSIVE or f is None or c.form != "polynomial":
        return None
    x = f.arrays.get("curve_x")
    budget_now = float(np.max(x)) if x is not None and len(x) else float("nan")
    take = evidence.what_it_would_take(c.relation, c.metric_exponent, c.tolerance, f, c.metric_eps_range[0],
                                       budget_now, c.x)
    return take if take["text"] else None
