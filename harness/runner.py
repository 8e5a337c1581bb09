"""The harness: builds env + algorithm, owns the loop, counters, clock, evaluation schedule,
divergence handling and the run records of one job."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import ratebench
from ratebench import envs
from ratebench.algorithms import ALGORITHMS
from ratebench.config import plain, validate
from ratebench.evaluation import Evaluator, evaluation_points
from ratebench.fstar import f_star
from ratebench.records import BASE_COLUMNS, atomic_write_json, atomic_write_parquet, config_hash
from ratebench.sampling import Counters, CountingSampler


def provenance() -> dict:
    info = {"ratebench": ratebench.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "argv": sys.argv}
    try:
        here = Path(ratebench.__file__).resolve().parent
        info["git_commit"] = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                            text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


class Progress:
    """One line per decade of samples: done, rate, ETA, current medians. Quiet under CI=true."""

    def __init__(self, label: str, budget: int, enabled: bool):
        self.label, self.budget = label, budget
        self.enabled = enabled and os.environ.get("CI", "").lower() not in ("1", "true")
        self.start, self.next_decade = time.perf_counter(), 10

    def update(self, samples: int, metrics: dict, final: bool = False) -> None:
        if not self.enabled or (samples < self.next_decade and not final):
            return
        while self.next_decade <= samples:
            self.next_decade *= 10
        elapsed = time.perf_counter() - self.start
        rate = samples / elapsed if elapsed > 0 else float("nan")
        eta = (self.budget - samples) / rate if rate and not final else 0.0
        med = " ".join(f"{k}={float(v.nanmedian()):.3g}" for k, v in metrics.items()
                       if k in ("gap", "policy_gap", "reward_err"))
        print(f"[{self.label}] samples {samples:>9,d}/{self.budget:,d}  {rate:,.0f}/s  ETA {eta:5.0f}s  "
              f"median {med}", flush=True)


def run_job(cfg, out_dir: Path, experiment: str | None = None) -> dict:
    """Run one configured job and write metrics.parquet + run.json into out_dir."""
    v = validate(cfg)
    torch.set_num_threads(int(cfg.threads))
    resolved = plain(cfg)
    resolved["seeds"] = v.seeds
    resolved.pop("n_seeds", None)
    problem = envs.make(v.env)
    fstar, _ = f_star(problem, plain(v.env), cfg.cache_dir)
    algo = ALGORITHMS[v.algorithm.name](v.algorithm, v.model, problem)
    counters = Counters()
    sampler = CountingSampler(problem, v.seeds, counters)
    evaluator = Evaluator(problem, fstar, algo)
    state = algo.init(v.seeds)
    seeds = torch.tensor(v.seeds)
    alive = torch.ones(len(v.seeds), dtype=torch.bool)
    status = {s: {"status": "completed"} for s in v.seeds}
    budget = int(cfg.budget.samples)
    points = evaluation_points(budget, int(cfg.budget.evals_per_decade))
    progress = Progress(f"{v.env.name}/{v.algorithm.name}", budget, bool(cfg.progress))
    rows: list[pd.DataFrame] = []
    wall, next_point = 0.0, 0
    last_recorded = None

    def record():
        nonlocal last_recorded, next_point
        metrics = evaluator(state)
        frame = pd.DataFrame({"seed": seeds[alive].numpy(), "step": counters.step,
                              "samples": counters.samples, "queries": counters.queries,
                              **{k: v_[alive].numpy() for k, v_ in metrics.items()},
                              **{k: float(x) for k, x in algo.schedule(state).items()},
                              "wall_s": wall})
        rows.append(frame)
        last_recorded = counters.samples
        while next_point < len(points) and points[next_point] <= counters.samples:
            next_point += 1
        progress.update(counters.samples, {k: m[alive] for k, m in metrics.items()},
                        final=counters.samples >= budget)

    error = None
    record()
    while counters.samples < budget and alive.any():
        tic = time.perf_counter()
        try:
            state = algo.step(state, sampler)
        except Exception as exc:  # an exception cannot be pinned on one seed: all fail
            error = exc
            for s in seeds[alive].tolist():
                status[s] = {"status": "failed", "step": counters.step, "message": f"{type(exc).__name__}: {exc}"}
            break
        counters.step += 1
        wall += time.perf_counter() - tic
        _mark_diverged(algo, state, alive, seeds, status, counters.step)
        if next_point < len(points) and counters.samples >= points[next_point] and alive.any():
            record()
    if error is None and alive.any() and last_recorded != counters.samples:
        record()
    metrics = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=BASE_COLUMNS)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_parquet(out_dir / "metrics.parquet", metrics)
    without_seeds = {k: val for k, val in resolved.items() if k != "seeds"}
    record_json = {
        "algorithm": v.algorithm.name, "env": v.env.name, "experiment": experiment, "seeds": v.seeds,
        "status": {str(s): st for s, st in status.items()}, "config": resolved,
        "config_hash": config_hash(without_seeds), "run_hash": config_hash(resolved),
        "f_star": fstar, "j_star": evaluator.j_star, "counters": vars(counters),
        "wall_s": wall, "version": ratebench.__version__, "provenance": provenance(),
    }
    atomic_write_json(out_dir / "run.json", record_json)
    if error is not None:
        raise error
    return record_json


def _mark_diverged(algo, state, alive, seeds, status, step) -> None:
    """A seed with a non-finite tensor is diverged at this step; its slices are zeroed so the
    batch stays finite, and it gets no further metric rows. Other seeds continue."""
    tensors = algo.tensors(state)
    finite = torch.ones_like(alive)
    for t in tensors.values():
        finite &= torch.isfinite(t.detach().reshape(t.shape[0], -1)).all(1)
    newly = alive & ~finite
    if newly.any():
        for s in seeds[newly].tolist():
            status[s] = {"status": "diverged", "step": step}
        alive &= finite
        with torch.no_grad():
            for t in tensors.values():
                t[newly] = 0
