"""A claim's evidence, its verdict and its premises, as functions of the loaded runs, the claim and
what the claim's experiment resolves to (evidence.ExperimentConfigs: the harness composes it,
ratebench.experiments). The premises' numbers come from functions the caller hands in: the landscape
(ratebench.audit.premise_summary) and the algorithm's own premise inputs (Algorithm.premise_inputs)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ratebench.analysis import evidence
from ratebench.analysis.claims import INCONCLUSIVE, Claim, Verdict, judge
from ratebench.analysis.curves import build_curves
from ratebench.analysis.evidence import ExperimentConfigs
from ratebench.analysis.fit import FitOptions
from ratebench.analysis.groups import distinct_curves, warn_identical_curves
from ratebench.analysis.inputs import BadInput
from ratebench.analysis.load import Loaded, read_record


def claim_evidence(loaded: Loaded, claim: Claim, expected: ExperimentConfigs, where: str = "the runs",
                   free: tuple = ()) -> tuple[Loaded, str, str | None]:
    """(evidence, note, missing). The evidence is the runs of the claim's own experiment (and
    algorithm, env) whose resolved config equals the experiment's (`expected`, what the experiment
    resolves to) up to its free keys (evidence.py;
    `free`: keys freed for this check only, `check --free`), on held-out instances. No fallback to
    other runs of the algorithm: evidence produced for another purpose (another sweep, a tuning
    screen, the experiment with an override) is not the claim's evidence; the runs of the experiment
    that differ are named once in the note. Runs on an instance that their config or the experiment
    names in `tuning_instances` are dropped (the note says so). `missing` is the reason the claim
    cannot be judged (no runs, no matching runs, too few or the wrong instances)."""
    seeds = loaded.seeds[loaded.seeds["algorithm"] == claim.algorithm]
    if claim.env:
        seeds = seeds[seeds["env"] == claim.env]
    free_keys = tuple(expected.free) + tuple(free) + ((claim.parameter,) if claim.parameter else ())
    match = evidence.match_experiment(seeds, claim.experiment, list(expected.configs) if expected.configs else None,
                                      free_keys, expected.defaults)
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


def evaluate_claim(loaded: Loaded, claim: Claim, opts: FitOptions, expected: ExperimentConfigs,
                   where: str = "the runs", free: tuple = (), baseline: ExperimentConfigs | None = None
                   ) -> tuple[Verdict, object, str]:
    """Pool all configurations of the evidence (bootstrap stratified by config hash) and judge it by
    the claim's form (docs/claim-meaning.md): polynomial per environment instance (claims.judge),
    geometric likewise on ρ̂ (claim_forms.judge_geometric), exponent_curve per value of its parameter
    (claim_forms.judge_exponent_curve), difference on the paired runs of its two experiments
    (claim_forms.judge_difference; `baseline`: what baseline_experiment resolves to). The curves returned
    are those of the worst instance (the ones v.fit was fitted on; all the evidence when it holds one
    instance; the experiment's own for a difference)."""
    from ratebench.analysis import claim_forms

    chosen, note, missing = claim_evidence(loaded, claim, expected, where, free)
    if missing or chosen.seeds.empty:
        return Verdict(claim, INCONCLUSIVE, missing or "no evidence", None), None, note
    if claim.metric not in chosen.metrics.columns:
        raise BadInput(f"{claim.path}: metric {claim.metric!r} is not in the run records")
    curves = build_curves(chosen.metrics, chosen.seeds, claim.metric, claim.x)
    warn_identical_curves(curves, f"claim {claim.id}")
    if claim.form == "difference":
        base_claim = replace(claim, experiment=claim.baseline_experiment, baseline_experiment=None)
        base_chosen, base_note, base_missing = claim_evidence(loaded, base_claim, baseline or ExperimentConfigs(None, ()),
                                                              where, free)
        note = "; ".join(n for n in (note, base_note and f"baseline: {base_note}") if n)
        if base_missing or base_chosen.seeds.empty:
            return (Verdict(claim, INCONCLUSIVE, f"baseline_experiment: {base_missing or 'no evidence'}", None),
                    None, note)
        if claim.metric not in base_chosen.metrics.columns:
            raise BadInput(f"{claim.path}: metric {claim.metric!r} is not in the baseline's run records")
        base = build_curves(base_chosen.metrics, base_chosen.seeds, claim.metric, claim.x)
        return claim_forms.judge_difference(claim, curves, base, opts), curves, note
    if claim.form == "exponent_curve":
        return claim_forms.judge_exponent_curve(claim, curves, opts), curves, note
    v = claim_forms.judge_geometric(claim, curves, opts) if claim.form == "geometric" else judge(claim, curves, opts)
    curves, _ = distinct_curves(curves)
    if len(v.per_instance) > 1:
        curves = curves.subset(v.worst_instance)
    return v, curves, note


def has_premise(claim: Claim, premise_inputs) -> bool:
    """Whether the claim's algorithm states premises: premise_inputs(algorithm, algorithm config) gives
    them (Algorithm.premise_inputs; None for an algorithm without)."""
    return premise_inputs is not None and premise_inputs(claim.algorithm, {}) is not None


def claim_premise(loaded: Loaded, claim: Claim, premise_fn, premise_inputs, expected: ExperimentConfigs,
                  where: str = "the runs", free: tuple = ()) -> dict | None:
    """The claim's premises on the instances of its evidence (claims on an algorithm with premises:
    has_premise): per instance the weak-gradient-domination floor (in `gap` units: the largest gap
    among stationary points of F, below which the assumption guarantees nothing) and the exponent the
    λ-schedule imposes, 1/(q·c_λ) with B(λ) ∝ λ^-q. premise_fn(env config, c_λ[, reward_bound=R, projected=True]) gives
    the landscape's numbers, premise_inputs(algorithm, algorithm config) the run's {"c_lam",
    "schedule_applies"}. `holds` is False when the floor lies above the claim's ε_min on a `gap` claim."""
    if premise_fn is None or not has_premise(claim, premise_inputs):
        return None
    chosen, _, missing = claim_evidence(loaded, claim, expected, where, free)
    if missing or chosen.seeds.empty:
        return None
    per_instance = {}
    for run_dir in sorted(set(chosen.seeds["run_dir"])):
        config = read_record(Path(run_dir) / "run.json")["config"]
        env, algo = config["env"], config.get("algorithm", {})
        key = int(env.get("instance_seed", 0))
        reward = (config.get("model") or {}).get("reward") or {}  # the reward class the runs used
        kwargs = {} if reward.get("bound") is None else {"reward_bound": reward["bound"]}
        if reward.get("bound_reading") == "project":  # a projected method stops at the box's KKT points
            kwargs["projected"] = True
        if key not in per_instance:
            inputs = premise_inputs(claim.algorithm, algo)
            summary = dict(premise_fn(env, inputs["c_lam"], **kwargs))
            summary.update(c_lam=float(inputs["c_lam"]), schedule_applies=bool(inputs["schedule_applies"]))
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


