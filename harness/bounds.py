"""Resource bounds of a run from its config alone, before any allocation or folder: the number of
evaluation points, and an estimate of peak memory against the memory available (config.validate)."""
from __future__ import annotations

import math
import os

from ratebench.core.errors import ConfigError

MAX_EVAL_POINTS = 10_000  # each is an exact evaluation of every seed (ms to s): more would not finish
MEMORY_ENV = "RATEBENCH_MEMORY_LIMIT"  # bytes (or e.g. 4G): overrides the available memory, e.g. in tests
MEMORY_SHARE = 0.8  # refuse a run estimated to need more than this share of the available memory
FLOAT = 8  # float64 / int64
NET_COPIES = 8  # per activation of a network evaluated on every unit: forward, backward, exact-evaluation copies
PAIR_COPIES = 4  # per (seed, trajectory pair) of exact evaluation: reward difference, probability, BCE, gradient
ROW_BYTES = 30 * FLOAT * 3  # per metric row (~30 columns) held as rows, a concatenated frame and a checkpoint copy
STEP_SAMPLES = 4  # samples of one step per unit of its batch knobs (Algorithm.step_batches) and time step: the
#                  bilevel step's four estimates, an upper bound for the others
SAMPLE_COPIES = 16  # per sample of a step: uniforms, indices, log-probs, returns, weights, their gathers
#                     (64 seeds at N = 4,096, M = 1,024 on the bandit: estimated 168 MB, measured 184 MB)


def evaluation_point_count(clock_budget: int, per_decade: int) -> float:
    """How many log-spaced points evaluation_points() walks through: per_decade per decade, plus 0
    and the final one (an upper bound on the distinct points)."""
    return per_decade * math.log10(max(clock_budget, 1)) + 2


def available_memory() -> int | None:
    """$RATEBENCH_MEMORY_LIMIT, else MemAvailable of /proc/meminfo, else the physical memory (bytes)."""
    text = os.environ.get(MEMORY_ENV, "").strip()
    if text:
        scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(text[-1].upper(), 1)
        try:
            return int(float(text[:-1] if scale > 1 else text) * scale)
        except ValueError:
            raise ConfigError(MEMORY_ENV, f"must be a number of bytes (suffix K, M, G or T allowed), got {text!r}") from None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def check_bounds(cfg, env, model, n_seeds: int, seeds_key: str, algorithm_class=None) -> None:
    """Refuse (ConfigError naming the knob, the estimate and the limit) a run whose evaluation grid or
    estimated peak memory is out of bounds. Called before the seed list is even materialised. The step
    batches are the algorithm class's (Algorithm.step_batches; none without a class), the sizes the env's."""
    clock_budget = cfg.budget.steps if cfg.budget.steps is not None else cfg.budget.samples
    points = evaluation_point_count(int(clock_budget), int(cfg.budget.evals_per_decade))
    if points > MAX_EVAL_POINTS:
        raise ConfigError("budget.evals_per_decade", f"{cfg.budget.evals_per_decade} per decade over "
                          f"{math.log10(max(clock_budget, 1)):.2g} decades is {points:.3g} evaluation points; allowed: "
                          f"at most {MAX_EVAL_POINTS} (each is an exact evaluation of every seed)")
    from ratebench.envs import sizes

    units, pairs, horizon = sizes(env)
    batch_knobs = algorithm_class.step_batches(cfg.algorithm) if algorithm_class is not None else {}
    samples = STEP_SAMPLES * sum(batch_knobs.values()) * horizon
    widths = {"model.reward.width": model.reward.width, "model.policy.width": model.policy.width}
    mlps = [net for net in (model.reward, model.policy) if net.kind == "mlp"]  # a linear reward has no width
    nets = n_seeds * units * sum(net.width * max(net.depth, 1) for net in mlps)
    terms = {"networks": nets * NET_COPIES * FLOAT, "pair tables": n_seeds * pairs * PAIR_COPIES * FLOAT,
             "evaluation grid": n_seeds * points * ROW_BYTES, "step batches": n_seeds * samples * SAMPLE_COPIES * FLOAT}
    estimate = sum(terms.values())
    limit = available_memory()
    if limit is None or estimate <= MEMORY_SHARE * limit:
        return
    dominant = max(terms, key=terms.get)
    knob = seeds_key
    if dominant == "networks" and max(widths.values()) > n_seeds:
        knob = max(widths, key=widths.get)
    if dominant == "step batches" and max(batch_knobs.values(), default=0) > n_seeds:
        knob = "algorithm." + max(batch_knobs, key=batch_knobs.get)
    detail = {"networks": f"seeds x units x width = {n_seeds:,} x {units:,} x {max(widths.values()):,}",
              "pair tables": f"seeds x trajectory pairs = {n_seeds:,} x {pairs:,}",
              "evaluation grid": f"seeds x evaluation points = {n_seeds:,} x {points:.0f}",
              "step batches": f"seeds x samples per step = {n_seeds:,} x {samples:,}"}[dominant]
    raise ConfigError(knob, f"estimated peak memory {_size(estimate)} (mostly {dominant}: {detail}) exceeds the "
                            f"limit {_size(MEMORY_SHARE * limit)} ({MEMORY_SHARE:.0%} of the {_size(limit)} available); "
                            + (f"use a smaller {knob}" if knob in widths or knob.startswith("algorithm.") else
                               "use fewer seeds per job (split them over a sweep) or a smaller environment"))
