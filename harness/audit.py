"""`ratebench audit`: one environment instance's landscape of F and the constants of the claim's
premises (weak gradient domination, lower-level domination, the schedule-imposed exponent).

The numbers come from envs/landscape.py; this module builds the instance, the policy network and
the reference values, joins logged run iterates, prints, writes the figure and caches the summary.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from ratebench.core.errors import ConfigError


class BadInput(ValueError):
    """A composition error already worded by ratebench.config.describe_error (it names the field)."""

DEFAULT_STARTS = 64  # multistart size of the landscape (and of F-hat* until global_reference is wired)
LAM_GRID = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)  # penalties of B(lam); the schedule's lam_k = (1 + k/k0)^(1/7) is ~4 at k = 10^6
TAU_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)  # WGD constants at which eps_bias(tau) is reported
POLICY_DRAWS = 64  # random policy networks of the lower-level check ...
POLICY_SCALES = (0.5, 1.0, 2.0, 4.0)  # ... their parameters are the network's init times these, in turn
AUDIT_VERSION = 4  # bump when a premise number's definition changes: old premise_summary entries are not reused
ALLOWED_KEYS = ("env=<name>, env.<field>=..., model.policy.<field>=..., model.reward.bound=..., "
                "algorithm.c_lam=... (or algorithm.lam_exponent)")


# ---------------------------------------------------------------------------------------------- reference

def reference(problem, env_config: dict, cache: str | None = None, reward_bound: float | None = None) -> dict:
    """The one door to F* and the local reference: dict(f_star, f_star_method, f_star_local,
    local_argmin, argmin), from the same cached GlobalReference the runs' `gap` uses
    (harness/fstar.py → envs/global_ref.py: exact face enumeration on the bandit, a batched
    multistart elsewhere), over the reward class (reward_bound: rewards in [-R, R]).
    f_star_local: L-BFGS of F from the true reward."""
    from ratebench.fstar import reference as global_reference

    ref = global_reference(problem, env_config, cache, reward_bound)
    return {"f_star": ref.value, "f_star_method": ref.method, "f_star_local": ref.local_value,
            "local_argmin": ref.local_argmin, "argmin": ref.argmin}


# ---------------------------------------------------------------------------------------------- arguments

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ratebench audit", description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="env overrides, e.g. env=mdp env.beta=0.5 env.instance_seed=[1,2,3,4]")
    p.add_argument("--starts", type=int, default=DEFAULT_STARTS, help=f"multistart size (default {DEFAULT_STARTS})")
    p.add_argument("--runs", help="folder of runs whose logged iterates (gap, grad_sq) join the WGD sample")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", default=None, help="folder of the figures (default: <cache folder>/audit, see docs/audit.md)")
    return p


INSTANCE_FAMILY = re.compile(r"^env\.instance_seed=\[(.*)\]$")


def _instance_seeds(overrides: list[str]) -> tuple[list[str], list[int] | None]:
    """Split off `env.instance_seed=[1,2,3]` (an instance family): (other overrides, seeds or None)."""
    rest, seeds = [], None
    for text in overrides:
        m = INSTANCE_FAMILY.match(text)
        if not m:
            rest.append(text)
            continue
        try:
            seeds = [int(s) for s in m.group(1).split(",") if s.strip()]
        except ValueError:
            raise ConfigError("env.instance_seed", f"a family must list integers, e.g. [1,2,3,4]; got {text!r}") from None
        if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError("env.instance_seed", f"a family must list distinct integers >= 0, got {text!r}")
    return rest, seeds


def _translate(text: str) -> str:
    """algorithm.c_lam is the schedule exponent c_lam (BilevelConfig.lam_exponent)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(text, f"an override is key=value; allowed keys: {ALLOWED_KEYS}")
    if key.lstrip("+~") in ("algorithm.c_lam", "algorithm.lam_exponent"):
        return f"algorithm.lam_exponent={value}"
    bare = key.lstrip("+~")
    if bare == "env" or bare.startswith("env.") or bare.startswith("model.policy.") or bare == "model.reward.bound":
        return text
    raise ConfigError(bare, f"not an audit setting; allowed: {ALLOWED_KEYS}")


def resolve_instances(overrides: list[str]) -> list:
    """Validated run configs (ratebench.config.Validated, algorithm = bilevel) of every instance,
    checked before any compute. Raises ConfigError or BadInput, naming the field."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ratebench.config import compose, describe_error, validate

    rest, seeds = _instance_seeds(overrides)
    rest = ["algorithm=bilevel", "impl=reference"] + [_translate(t) for t in rest]  # the audit runs no step
    jobs = [rest] if seeds is None else [rest + [f"env.instance_seed={s}"] for s in seeds]
    out = []
    for job in jobs:
        try:
            out.append(validate(compose(job)))
        except (HydraException, OmegaConfBaseException) as exc:
            raise BadInput(describe_error(exc)) from None
    return out


def _check_runs_dir(path: str | None) -> list[Path]:
    if path is None:
        return []
    from ratebench.analysis.load import find_runs

    if not Path(path).is_dir():
        raise ConfigError("--runs", f"{path!r} is not a folder")
    found = find_runs(path)
    if not found:
        raise ConfigError("--runs", f"no run.json under {path!r}")
    return found


# ---------------------------------------------------------------------------------------------- compute

def _progress(label: str, message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"[audit {label}] {message}", file=sys.stderr, flush=True)


def run_points(run_files: list[Path], env_config: dict, reward_bound: float | None = None) -> tuple[list[float], list[float], int]:
    """(F values, ||grad F||, number of runs) of the logged iterates of the runs on this instance and reward
    class (model.reward.bound): F = gap + the run's own recorded f_star (so the audit's F* applies),
    ||grad F|| = sqrt(grad_sq)."""
    from ratebench.analysis.load import RunRecordError, read_metrics, read_record

    values, grads, n_runs = [], [], 0
    for run_json in run_files:
        try:
            record = read_record(run_json)
            if record["config"].get("env") != env_config or "f_star" not in record:
                continue
            if ((record["config"].get("model") or {}).get("reward") or {}).get("bound") != reward_bound:
                continue
            metrics = read_metrics(run_json.parent / "metrics.parquet")
        except RunRecordError as exc:
            print(f"ratebench audit: warning: skipped {exc}", file=sys.stderr)
            continue
        if not {"gap", "grad_sq"} <= set(metrics.columns):
            continue
        rows = metrics[metrics["grad_sq"].notna() & metrics["gap"].notna()]
        values += (rows["gap"] + float(record["f_star"])).tolist()
        grads += rows["grad_sq"].clip(lower=0).pow(0.5).tolist()
        n_runs += 1
    return values, grads, n_runs


def random_policy_params(problem, net_cfg, n_draws: int = POLICY_DRAWS, scales=POLICY_SCALES, seed: int = 0):
    """(PolicyModel, stacked params [(D, ...)]): D random draws of the policy network, every layer
    random (unlike the training init, whose zero last layer is pi_ref), scaled by `scales` in turn."""
    from ratebench.algorithms.models import PolicyModel, StackedMLP

    model = PolicyModel(problem, net_cfg)
    net = StackedMLP(model.net.sizes, net_cfg.activation, zero_last=False)
    params = net.init([seed * 100_003 + d for d in range(n_draws)], salt=3)
    factor = torch.tensor([scales[d % len(scales)] for d in range(n_draws)], dtype=torch.float64)
    return model, [p * factor.reshape(-1, *[1] * (p.dim() - 1)) for p in params]


def _summary_point(info: dict, row: int) -> dict:
    return {k: float(info[k][row]) for k in ("value", "policy_gap", "reward_err", "max_abs_reward", "grad_norm")}


def audit_instance(env, policy_net, c_lam: float, n_starts: int = DEFAULT_STARTS, run_files: list[Path] = (),
                   quiet: bool = False, reward_bound: float | None = None) -> dict:
    """Every audit number of one instance: env a validated env config dataclass, policy_net the
    policy network's NetConfig (lower-level check), c_lam the schedule's penalty exponent,
    reward_bound the reward class (model.reward.bound: tabular rewards in [-R, R], or None)."""
    from ratebench import envs
    from ratebench.config import plain
    from ratebench.envs import exact, landscape

    env_config = plain(env)
    seed = env.instance_seed  # the multistart's generator follows the instance
    label = f"{env.name} instance {seed}"
    clock = time.perf_counter()
    problem = envs.make(env)
    _progress(label, f"multistart of F from {n_starts} starts ({problem.n_units} unit rewards)", quiet)
    bound = reward_bound
    ref = reference(problem, env_config, reward_bound=bound)
    f_star = ref["f_star"]
    true_units = problem.true_unit_reward[None]
    info = landscape.describe_points(problem, torch.stack([true_units[0], ref["local_argmin"], ref["argmin"]]))
    enumerated = landscape.enumerated_landscape(problem, n_starts, seed, f_star, bound, ref["argmin"])
    if enumerated is not None:
        points = enumerated["points"]
    else:  # no face structure (mdp): the multistart's points and the global reference's argmin
        points = landscape.stationary_points(problem, n_starts, seed, f_star, bound)
        glob = landscape.describe_points(problem, ref["argmin"][None])
        glob["grad_norm"] = landscape.class_grad_norm(problem, ref["argmin"][None], bound)
        point = {k: float(v[0]) for k, v in glob.items()}
        points = sorted(points + [{**point, "gap": point["value"] - f_star, "kind": landscape._kind(point, bound),
                                   "share": 0.0, "label": "f_star_argmin", "units": ref["argmin"].tolist()}],
                        key=lambda p: p["value"])
    for p in points:
        p.setdefault("starts", round(p.get("share", 0.0) * n_starts))
        p.setdefault("label", "multistart")
    t_landscape = time.perf_counter() - clock

    run_values, run_grads, n_runs = run_points(list(run_files), env_config, bound)
    values = [p["value"] for p in points] + run_values
    grads = [p["grad_norm"] for p in points] + run_grads
    wgd = landscape.wgd(values, grads, f_star, TAU_GRID)
    interior = [p["gap"] for p in points if p["kind"] == "interior"]
    wgd["floor_interior"] = max(max(interior), 0.0) if interior else 0.0
    wgd["floor_kkt"] = None
    if enumerated is not None:  # exact: sums of per-group maxima, whatever the number of starts
        wgd["floor_enumerated"] = enumerated["floor"]
        wgd["floor_interior"] = enumerated["floor_interior"]
        wgd["floor_kkt"] = enumerated["floor_kkt"]
    wgd["n_run_points"] = len(run_values)

    _progress(label, f"lower level: {POLICY_DRAWS} random policy networks", quiet)
    model, params = random_policy_params(problem, policy_net, seed=seed)
    lower = landscape.lower_level_domination(problem, problem.true_step_tables(), model.log_probs, params, TAU_GRID)

    c_lam = float(c_lam)
    _progress(label, f"penalty bias B(lam) at lam = {list(LAM_GRID)} (c_lam = {c_lam:.4g})", quiet)
    bias = landscape.penalty_bias(problem, LAM_GRID, ref["local_argmin"], c_lam, bound=bound)
    elapsed = time.perf_counter() - clock
    _progress(label, f"done in {elapsed:.1f} s", quiet)
    return {
        "env": env_config, "reward_bound": bound, "n_starts": n_starts,
        "f_star": f_star, "f_star_method": ref["f_star_method"], "f_true": float(info["value"][0]),
        "f_star_local": ref["f_star_local"],
        "true_reward": _summary_point(info, 0), "local_minimiser": _summary_point(info, 1),
        "global_minimiser": _summary_point(info, 2),
        "j_star": float(exact.optimal_value(problem, problem.true_step_tables())[0]),
        "stationary_points": points,
        "landscape": None if enumerated is None else {k: v for k, v in enumerated.items() if k != "points"},
        "n_stationary": len(points) if enumerated is None else enumerated["n_stationary"],
        "n_converged": int(landscape.multistart(problem, n_starts, seed, bound).converged.sum()),
        "wgd": wgd, "lower_level": lower, "penalty_bias": bias,
        "runs": {"n_runs": n_runs, "n_points": len(run_values), "values": run_values, "grad_norms": run_grads},
        "seconds": {"landscape": t_landscape, "total": elapsed},
    }


def premise_inputs(algorithm: str, algorithm_config: dict) -> dict | None:
    """The algorithm's own premise inputs for a run's algorithm config (Algorithm.premise_inputs:
    {"c_lam", "schedule_applies"}), or None for an algorithm without premises or not installed."""
    from ratebench.algorithms import ALGORITHMS

    cls = ALGORITHMS.get(algorithm)
    return None if cls is None else cls.premise_inputs(dict(algorithm_config or {}))


def premise_summary(env_config: dict, c_lam: float, directory: str | None = None,
                    n_starts: int = DEFAULT_STARTS, reward_bound: float | None = None, projected: bool = False) -> dict:
    """{"wgd_floor", "implied_exponent", "q"} of one instance, cached on disk keyed by the env config,
    c_lam, the reward bound, the reading and AUDIT_VERSION (like harness/fstar.py): what `check`/`report`
    print next to a verdict. projected (a method that projects a tabular reward onto the box,
    model.reward.bound_reading=project): the floor over the box's KKT points, where such a method can stop;
    otherwise over every stationary point and face limit of the R tanh class."""
    from ratebench.core.cache import cache_dir
    from ratebench.core.records import atomic_write_json, config_hash

    keyed = {"env": env_config, "c_lam": float(c_lam), "n_starts": n_starts, "audit_version": AUDIT_VERSION}
    if reward_bound is not None:
        keyed["reward_bound"] = float(reward_bound)
    if projected:
        if reward_bound is None:
            raise ValueError("premise_summary: projected needs a reward_bound (the box)")
        keyed["projected"] = True
    key = config_hash(keyed)
    path = cache_dir(directory) / f"premise-{key}.json"
    if path.exists():
        try:
            entry = json.loads(path.read_text())
            return {k: float(entry[k]) for k in ("wgd_floor", "implied_exponent", "q")}
        except (ValueError, KeyError, TypeError):
            pass  # unreadable entry: recompute and overwrite
    from ratebench.algorithms.models import NetConfig
    from ratebench.config import to_dataclass
    from ratebench.envs import ENVIRONMENTS

    if env_config.get("name") not in ENVIRONMENTS:
        raise ConfigError("env", f"unknown environment {env_config.get('name')!r}; allowed: {sorted(ENVIRONMENTS)}")
    env = to_dataclass(env_config, ENVIRONMENTS[env_config["name"]][0], "env")
    ENVIRONMENTS[env.name][1](env)
    result = audit_instance(env, NetConfig(), c_lam, n_starts, quiet=True, reward_bound=reward_bound)
    floor = result["wgd"]["floor_kkt"] if projected else result["wgd"]["floor"]
    if floor is None:  # no face enumeration (the mdp): the KKT points are not listed
        raise ConfigError("model.reward.bound_reading", f"the premise of a projected reward needs the box's KKT points, "
                                                        f"enumerated on the bandit only; got env {env.name!r}")
    summary = {"wgd_floor": floor, "implied_exponent": result["penalty_bias"]["implied_exponent"],
               "q": result["penalty_bias"]["q"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {**summary, "env": env_config, "c_lam": float(c_lam)})
    return summary


# ---------------------------------------------------------------------------------------------- output

def _finite(obj):
    """JSON has no inf/NaN: those become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def format_table(result: dict) -> str:
    env = result["env"]
    lines = [f"== {env['name']} instance_seed={env['instance_seed']} beta={env['beta']} "
             f"({result['seconds']['total']:.1f} s)",
             f"F*          {result['f_star']:.6f}  ({result['f_star_method']})  "
             f"policy_gap {result['global_minimiser']['policy_gap']:.4g}  max|r| {result['global_minimiser']['max_abs_reward']:.3g}",
             f"F-hat_loc   {result['f_star_local']:.6f}  policy_gap {result['local_minimiser']['policy_gap']:.4g}",
             f"F(nu_true)  {result['f_true']:.6f}  policy_gap {result['true_reward']['policy_gap']:.4g}",
             ""]
    land = result.get("landscape")
    if land is not None:
        lines.append(f"stationary points by face enumeration: {result['n_stationary']} (product of per-group counts "
                     f"{land['n_per_group']}); the multistart's {result['n_converged']}/{result['n_starts']} converged "
                     f"starts reached {land['n_multistart_points']} of them ({land['n_unmatched']} group parts unmatched)")
    else:
        lines.append(f"stationary points ({len(result['stationary_points'])} distinct, "
                     f"{result['n_converged']}/{result['n_starts']} starts converged):")
    lines.append(f"  {'F':>9} {'gap':>9} {'|grad|':>8} {'policy_gap':>10} {'reward_err':>10} {'starts':>6}  kind, label")
    for p in result["stationary_points"]:
        lines.append(f"  {p['value']:9.6f} {p['gap']:9.2e} {p['grad_norm']:8.1e} {p['policy_gap']:10.4f} "
                     f"{p['reward_err']:10.4g} {p['starts']:6d}  {p['kind']}, {p['label']}")
    w, lo, b = result["wgd"], result["lower_level"], result["penalty_bias"]
    kkt = "" if w.get("floor_kkt") is None else f"; KKT points only {w['floor_kkt']:.4g}"
    lines += ["", f"WGD  floor (largest stationary gap) {w['floor']:.4g}; interior points only "
              f"{(w['floor_interior'] if w['floor_interior'] is not None else math.nan):.4g}{kkt}; "
              f"{w['n_points']} points ({w['n_run_points']} from runs)",
              "     " + "  ".join(f"eps_bias({t:g})={e:.3g}" for t, e in zip(w["tau"], w["eps_bias"])),
              f"lower level ({lo['n_draws']} random policy networks at nu_true): J*-J in [{lo['gap_min']:.3g}, "
              f"{lo['gap_max']:.3g}], tau_max {lo['tau_max']:.3g}, PL min |grad|^2/gap {lo['pl_min']:.3g}",
              "penalty bias  " + "  ".join(f"B({l:g})={x:.3g}{'' if ok else '*'}"
                                           for l, x, ok in zip(b["lam"], b["bias"], b["in_basin"])),
              f"              q = {b['q']:.3f} (between consecutive lam: "
              f"{', '.join(f'{x:.2f}' for x in b['q_pairs'])}), c_lam = {b['c_lam']:.4g}, implied exponent 1/(q c_lam) = "
              f"{b['implied_exponent']:.3f}" + ("   (* left the local basin, not fitted)" if not all(b["in_basin"]) else "")]
    return "\n".join(lines)


def write_figure(result: dict, out_dir: Path) -> Path:
    """Landscape (stationary F vs policy_gap, global and local minima marked) and the WGD scatter
    (F - F* vs ||grad F|| with the envelope tau (F - F*) - eps_bias(tau) = ||grad F||)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    env = result["env"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    pts = result["stationary_points"]
    for kind, marker in (("interior", "o"), ("asymptotic", "x")):
        sel = [p for p in pts if p["kind"] == kind]
        left.scatter([p["policy_gap"] for p in sel], [p["value"] for p in sel], marker=marker,
                     s=[20 + 200 * p["share"] for p in sel], label=f"{kind} stationary points")
    g, loc = result["global_minimiser"], result["local_minimiser"]
    left.scatter([g["policy_gap"]], [result["f_star"]], marker="*", s=200, c="k", label=f"F* ({result['f_star_method']})")
    left.scatter([loc["policy_gap"]], [result["f_star_local"]], marker="D", s=60, c="tab:red", label="local minimum (true basin)")
    left.axhline(result["f_true"], ls=":", c="gray", label="F(nu_true)")
    left.set_xlabel("policy_gap of pi*_nu (true reward)")
    left.set_ylabel("F")
    left.set_title(f"{env['name']} instance {env['instance_seed']}: stationary points of F")
    left.legend(fontsize=7)

    gaps = np.array([p["gap"] for p in pts] + [v - result["f_star"] for v in result["runs"]["values"]])
    grads = np.array([p["grad_norm"] for p in pts] + result["runs"]["grad_norms"])
    n_pts = len(pts)
    floor_grad = 1e-12
    right.scatter(np.maximum(grads[:n_pts], floor_grad), np.maximum(gaps[:n_pts], 1e-12), marker="x", label="stationary points")
    if len(gaps) > n_pts:
        right.scatter(np.maximum(grads[n_pts:], floor_grad), np.maximum(gaps[n_pts:], 1e-12), s=6, alpha=0.4,
                      label="run iterates")
    x = np.logspace(-12, max(1.0, math.log10(max(grads.max(), 1e-12)) + 0.5), 200)
    w = result["wgd"]
    for tau, eps in list(zip(w["tau"], w["eps_bias"]))[::2]:
        right.plot(x, (x + eps) / tau, lw=1, label=f"tau={tau:g}: (|grad|+eps_bias)/tau")
    right.axhline(w["floor"], ls="--", c="k", label=f"floor {w['floor']:.3g}")
    positive = gaps[gaps > 0]
    if positive.size:
        right.set_ylim(bottom=positive.min() / 3)
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("||grad F||")
    right.set_ylabel("F - F*")
    right.set_title("weak gradient domination: points must lie below each line")
    right.legend(fontsize=7)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = "" if result.get("reward_bound") is None else f"-bound{result['reward_bound']:g}"
    path = out_dir / f"audit-{env['name']}-{env['instance_seed']}{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_dir(out: str | None) -> Path:
    """--out, or <cache folder>/audit (the F* cache's folder: $RATEBENCH_CACHE or ~/.cache/ratebench), never the
    current folder unless asked."""
    if out is not None:
        return Path(out)
    from ratebench.core.cache import cache_dir

    return cache_dir(None) / "audit"


def main(args: list[str]) -> int:
    ns_or_code = _parse(args)
    if isinstance(ns_or_code, int):
        return ns_or_code
    ns, instances, run_files = ns_or_code
    torch.set_num_threads(1)
    results = []
    for v in instances:
        result = audit_instance(v.env, v.model.policy, v.algorithm.lam_exponent, ns.starts, run_files,
                                reward_bound=v.model.reward.bound)
        result["figure"] = str(write_figure(result, figure_dir(ns.out)))
        results.append(result)
        if not ns.json:
            print(format_table(result) + f"\nfigure: {result['figure']}\n", flush=True)
    if ns.json:
        out = results[0] if len(results) == 1 else {"instances": results}
        print(json.dumps(_finite(out), indent=1))
    return 0


def _parse(args: list[str]):
    """(argparse namespace, validated instances, run files), or an exit code (0 for --help, 2 bad input)."""
    try:
        ns = _parser().parse_intermixed_args(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    try:
        if ns.starts < 2:
            raise ConfigError("--starts", f"must be >= 2 (the true reward and zero come first), got {ns.starts}")
        out = figure_dir(ns.out).absolute()
        probe = out
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            raise ConfigError("--out", f"cannot create folder {str(out)!r}: {str(probe)!r} is not a folder")
        instances = resolve_instances(ns.overrides)
        run_files = _check_runs_dir(ns.runs)
    except (ConfigError, BadInput) as exc:
        print(f"ratebench audit: error: {exc}", file=sys.stderr)
        return 2
    return ns, instances, run_files
