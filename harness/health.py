"""Seed health: whether a seed still runs where the analysis it is tested against applies (docs/metrics.md
"Seed health"). Pure functions over per-seed tensors, and `SeedHealth`, what one instance's check remembers
between evaluation points (checkpointed with the job). The harness calls it at every evaluation point and at
the end of the run; a seed's status is then

- `saturated` (at an evaluation point; the seed stops there, its last metric row is the one that showed it):
  an exact metric that was finite for every seed at the first evaluation point is non-finite while the
  parameters are finite; or an exact squared gradient norm (`grad_sq`, `psi_grad_sq`) that was positive there
  is exactly 0; or the deployed policy or the exact soft-optimal policy of the reward estimate has a
  log-probability below `health.min_log_prob` (default: log of the smallest normal float64, where the softmax
  underflows); or, with `health.max_abs_reward` set, the reward estimate leaves that bound;
- `stalled` (decided at the end of the run; the seed runs to the end and keeps its rows): its parameters did
  not change by more than `health.stall_rtol` (relative to their largest magnitude; 0 = bit for bit) between
  the first evaluation point of a decade and the end, at least one decade later.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
from ratebench.core.errors import ConfigError

LOG_TINY = math.log(sys.float_info.min)  # -708.396...: exp() of anything below is not a normal float64
ZERO_IS_UNDERFLOW = ("grad_sq", "psi_grad_sq")  # exact squared gradient norms: exactly 0 only by underflow


@dataclass
class HealthConfig:
    """`health.*`: when a seed stops counting as `completed` (docs/metrics.md "Seed health")."""

    enabled: bool = True  # false: no seed is ever `saturated` or `stalled` (every finite seed `completed`)
    min_log_prob: float = LOG_TINY  # a log-probability below this in the deployed policy or in pi*_nu: saturated
    max_abs_reward: Optional[float] = None  # |r_nu| above this anywhere in the reward table: saturated (null: no bound)
    stall_rtol: float = 0.0  # parameters moving at most this much (relative) over a decade or more: stalled


def check_health(cfg: HealthConfig) -> None:
    """Range checks of `health.*` (config only, no compute)."""
    if not cfg.min_log_prob < 0:
        raise ConfigError("health.min_log_prob", f"must be < 0 (a log-probability), got {cfg.min_log_prob}")
    if cfg.max_abs_reward is not None and not (cfg.max_abs_reward > 0 and math.isfinite(cfg.max_abs_reward)):
        raise ConfigError("health.max_abs_reward", f"must be null or a finite number > 0, got {cfg.max_abs_reward}")
    if not (0 <= cfg.stall_rtol < 1):
        raise ConfigError("health.stall_rtol", f"must be in [0, 1) (0: unchanged bit for bit), got {cfg.stall_rtol}")


# --- pure functions over per-seed tensors (leading axis B) ------------------------------------------------------
def min_log_prob(tables: list[torch.Tensor]) -> torch.Tensor:
    """The smallest log-probability of per-step log-prob tables [(B, n_h, A)]: (B,); NaN stays NaN."""
    per_step = torch.stack([t.detach().reshape(t.shape[0], -1).amin(1) for t in tables])
    nan = torch.stack([t.detach().reshape(t.shape[0], -1).isnan().any(1) for t in tables]).any(0)
    return per_step.amin(0).masked_fill(nan, math.nan)


def observe(problem, tables: dict, uses_true_reward: bool) -> dict[str, torch.Tensor]:
    """What the saturation check reads besides the metrics, from the rows Evaluator.evaluate_columns scored
    (`tables`: "logps" the deployed policies, "rewards" the reward estimate's step tables, and "star" pi*_nu where
    the evaluation solved it), a column per row like the metrics': the deployed policy's smallest log-probability,
    that of pi*_nu (the exact soft-optimal policy of the reward estimate) and the largest |r_nu| (NaN for a method
    handed the true reward: its pi* is the target, and at a small beta it is nearly deterministic by design)."""
    from ratebench.envs.exact import soft_optimal

    with torch.no_grad():
        deployed = min_log_prob(tables["logps"])
        if uses_true_reward:  # no estimate whose pi* could underflow
            nan = torch.full_like(deployed, math.nan)
            return {"min_log_prob": deployed, "min_log_prob_star": nan, "max_abs_reward": nan}
        rewards = [r.detach() for r in tables["rewards"]]
        star = min_log_prob(tables["star"] if "star" in tables else soft_optimal(problem, rewards)[0])
        largest = torch.stack([r.reshape(r.shape[0], -1).abs().amax(1) for r in rewards]).amax(0)
        return {"min_log_prob": deployed, "min_log_prob_star": star, "max_abs_reward": largest}


def finite_everywhere(metrics: dict[str, torch.Tensor]) -> list[str]:
    """The metric columns finite for every seed: what the first evaluation point says can be computed."""
    return [k for k, m in metrics.items() if bool(torch.isfinite(m).all())]


def saturation(metrics: dict[str, torch.Tensor], observed: dict[str, torch.Tensor], watched: list[str],
               positive: list[str], cfg: HealthConfig) -> list[str | None]:
    """Per seed, why it is saturated (one line with the numbers) or None: the first that holds of a watched
    metric non-finite, a positive squared gradient norm exactly 0, a log-probability below cfg.min_log_prob
    (or NaN), |r_nu| above cfg.max_abs_reward."""
    n = len(observed["min_log_prob"])
    reasons: list[str | None] = [None] * n
    checks = []
    if watched:
        bad = torch.stack([~torch.isfinite(metrics[k]) for k in watched])  # (metrics, B)
        checks.append((bad.any(0), lambda i: "not finite with finite parameters: " + ", ".join(
            f"{k} = {float(metrics[k][i]):g}" for k, b in zip(watched, bad[:, i].tolist()) if b)))
    for k in positive:
        checks.append((metrics[k] == 0, lambda i, k=k: f"{k} = 0 exactly: the exact gradient underflowed"
                       + _star_note(observed, i)))
    bound = cfg.min_log_prob
    for key, what in (("min_log_prob", "the deployed policy"), ("min_log_prob_star", "pi*_nu")):
        value = observed[key]
        has = ~torch.isnan(value) if key == "min_log_prob_star" else torch.ones(n, dtype=torch.bool)
        checks.append((has & ~(value >= bound), lambda i, key=key, what=what:
                       f"{what} has log-probability {float(observed[key][i]):.4g} < health.min_log_prob = {bound:.4g}: "
                       "its softmax underflows"))
    if cfg.max_abs_reward is not None:
        largest = observed["max_abs_reward"]
        checks.append((largest > cfg.max_abs_reward, lambda i: f"|r_nu| reaches {float(largest[i]):.4g} > "
                       f"health.max_abs_reward = {cfg.max_abs_reward:g}"))
    for mask, why in checks:
        for i in mask.nonzero().flatten().tolist():
            if reasons[i] is None:
                reasons[i] = why(i)
    return reasons


def _star_note(observed: dict[str, torch.Tensor], i: int) -> str:
    value = float(observed["min_log_prob_star"][i])
    return "" if math.isnan(value) else f" (smallest log pi*_nu = {value:.4g})"


def flat_parameters(tensors: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Every per-seed tensor (Algorithm.tensors) of each of several states of the same seeds as one row per seed:
    (states, B, P) float64, a copy made with one copy per tensor name."""
    with torch.no_grad():  # copies outside any graph (rather than a detach per tensor: a few hundred calls)
        return torch.cat([torch.stack([t[name] for t in tensors]).reshape(len(tensors), first.shape[0], -1)
                          .to(torch.float64) for name, first in tensors[0].items()], 2)


def relative_change(current: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
    """max |current - past| / max |past| per row (..., B) of (..., B, P) (past broadcast against current): 0 when
    unchanged bit for bit, inf when past is all 0."""
    moved = (current - past).abs().amax(-1)
    scale = past.abs().amax(-1)
    return torch.where(moved == 0, torch.zeros_like(moved), moved / scale)


def zero_rows(tensors: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
    """Zero a stopped seed's slices in place (rows: a (B,) bool mask) so the batch it leaves stays finite."""
    with torch.no_grad():
        for t in tensors.values():
            t[rows] = 0


# --- what the check remembers ---------------------------------------------------------------------------------
class SeedHealth:
    """One instance's seed-health memory (n seeds): the columns the first evaluation point could compute, the
    parameter snapshots at the first evaluation point of each decade of the clock (those still needed), and
    per seed the step since which it has not moved (-1: it moved) and its last relative change."""

    def __init__(self, cfg: HealthConfig, n: int):
        self.cfg, self.n = cfg, n
        self.watched: list[str] | None = None
        self.positive: list[str] = []
        self.snapshots: list[dict] = []  # {"clock", "step", "params" (n, P)}, oldest first
        self.frozen_since = torch.full((n,), -1, dtype=torch.long)
        self.change = torch.full((n,), math.nan, dtype=torch.float64)
        self.last_step = 0

    def evaluate(self, metrics: dict[str, torch.Tensor], observed: dict[str, torch.Tensor], params: torch.Tensor,
                 clock: int, step: int) -> list[str | None]:
        """At an evaluation point: per seed the reason it is saturated here (or None); also advances the
        stall memory. Every seed is looked at; the harness keeps the verdicts of those still running."""
        return self.evaluate_many(metrics, observed, params[None], [clock], [step])[0]

    def evaluate_many(self, metrics: dict[str, torch.Tensor], observed: dict[str, torch.Tensor],
                      params: torch.Tensor, clocks: list[int], steps: list[int]) -> list[list[str | None]]:
        """evaluate() at several evaluation points in order: metrics and observed are columns of every point's n
        rows, point-major (Evaluator.evaluate_columns, observe), params (points, n, P) (flat_parameters), the others
        one entry per point. The saturation check runs on all the rows at once, the stall memory over the points in
        order."""
        points = len(clocks)
        if not self.cfg.enabled:
            return [[None] * self.n for _ in range(points)]
        if self.watched is None:  # what the first point could compute
            first = {k: m[:self.n] for k, m in metrics.items()}
            self.watched = finite_everywhere(first)
            self.positive = [k for k in ZERO_IS_UNDERFLOW if k in first and bool((first[k] > 0).all())]
        reasons = saturation(metrics, observed, self.watched, self.positive, self.cfg)
        self._track_stalls(params, clocks, steps)
        return [reasons[i * self.n:(i + 1) * self.n] for i in range(points)]

    def _track_stalls(self, params: torch.Tensor, clocks: list[int], steps: list[int]) -> None:
        """The stall memory advanced over points in order (params (points, n, P)): each point's parameters against the
        snapshot at the first point of the latest decade at least one decade before it (its reference), and a
        snapshot kept at the first point of each decade. Which snapshot each point compares with follows from the
        clocks alone, so the relative changes of all the points are taken at once. A seed's frozen-since step is then
        that of the reference of the first point of its last run of frozen points (kept from before when the run
        began earlier), -1 when the last point moved."""
        refs = []  # per point: its reference snapshot, or None
        for params_now, clock, step in zip(params, clocks, steps):
            past = [s for s in self.snapshots if 1 <= s["clock"] <= clock / 10]
            refs.append(past[-1] if past else None)
            if past:
                self.snapshots = [s for s in self.snapshots if s["clock"] >= past[-1]["clock"]]  # what later needs
            last = self.snapshots[-1]["clock"] if self.snapshots else 0
            if clock >= 1 and (last < 1 or math.floor(math.log10(clock)) > math.floor(math.log10(last))):
                self.snapshots.append({"clock": clock, "step": step, "params": params_now.clone()})
            self.last_step = step
        compared = [i for i, ref in enumerate(refs) if ref is not None]
        if not compared:
            return
        # (K, n): the points that share a reference are consecutive (references follow the clock), so each run of
        # them is compared with its one snapshot by broadcasting, without a copy of the snapshot per point
        runs = [[compared[0]]]
        for i in compared[1:]:
            if refs[i] is refs[runs[-1][-1]] and i == runs[-1][-1] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        changes = torch.cat([relative_change(params[run[0]:run[-1] + 1], refs[run[0]]["params"]) for run in runs])
        moved = ~(changes <= self.cfg.stall_rtol)  # NaN: moved
        K = len(compared)
        ref_steps = torch.tensor([refs[i]["step"] for i in compared], dtype=torch.long)
        run_start = torch.where(moved, torch.arange(K)[:, None], -1).amax(0) + 1  # first point of the last frozen run
        since = torch.where((run_start == 0) & (self.frozen_since >= 0), self.frozen_since,
                            ref_steps[run_start.clamp_max(K - 1)])
        self.frozen_since = torch.where(run_start == K, -1, since)
        self.change = changes[-1].clone()

    def stalled(self) -> list[str | None]:
        """At the end of the run: per seed why it is stalled (or None), from the last evaluation point's check."""
        if not self.cfg.enabled:
            return [None] * self.n
        return [None if since < 0 else
                f"parameters unchanged from step {since} to step {self.last_step} (largest relative change "
                f"{float(change):.3g} <= health.stall_rtol = {self.cfg.stall_rtol:g})"
                for since, change in zip(self.frozen_since.tolist(), self.change)]

    def stalled_step(self, i: int) -> int:
        return int(self.frozen_since[i])

    def state_dict(self) -> dict:
        return {"watched": self.watched, "positive": list(self.positive), "last_step": self.last_step,
                "snapshots": [dict(s, params=s["params"].clone()) for s in self.snapshots],
                "frozen_since": self.frozen_since.clone(), "change": self.change.clone()}

    def load_state_dict(self, saved: dict) -> None:
        self.watched = None if saved["watched"] is None else list(saved["watched"])
        self.positive, self.last_step = list(saved["positive"]), int(saved["last_step"])
        self.snapshots = [{"clock": int(s["clock"]), "step": int(s["step"]), "params": s["params"].clone()}
                          for s in saved["snapshots"]]
        self.frozen_since, self.change = saved["frozen_since"].clone(), saved["change"].clone()
