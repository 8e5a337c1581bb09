"""The harness: builds env + algorithm, owns the loop, counters, clock, evaluation schedule,
divergence handling, checkpoints (resume) and the run records of one job."""
from __future__ import annotations

import os
import platform
import signal
import sys
import time
import warnings
from pathlib import Path

import pandas as pd
import torch

import ratebench
import ratebench.algorithms
from ratebench import checkpoint, envs
from ratebench.algorithms import ALGORITHMS
from ratebench.config import plain, validate
from ratebench.errors import ConfigError
from ratebench.evaluation import Evaluator, evaluation_points
from ratebench.fstar import reference, true_objective
from ratebench.live_log import live_logger
from ratebench.records import (BASE_COLUMNS, OPERATIONAL_KEYS, atomic_write_json, atomic_write_parquet, code_fingerprint,
                               config_hash, git_commit, metrics_mismatch, remove_stale_temporaries)
from ratebench.sampling import Counters, CountingSampler
from ratebench.signals import Interrupted, StopRequests

FINISHED = ("completed", "diverged")  # final outcomes: re-running the same config reproduces them
RESULT_FILES = ("metrics.parquet", "run.json", checkpoint.FILENAME)  # written atomically into a run folder


def provenance() -> dict:
    info = {"ratebench": ratebench.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "argv": sys.argv}
    info["git_commit"] = git_commit()
    return info


class Progress:
    """A live line per job: samples done, rate, ETA, current medians. On a terminal the line is
    rewritten in place (at most every `interval_s`); otherwise one line per decade of samples or
    per `log_interval_s`. Quiet under CI=true."""

    def __init__(self, label: str, budget: int, enabled: bool, start_samples: int = 0,
                 interval_s: float = 0.5, log_interval_s: float = 30.0, unit: str = "samples"):
        self.label, self.budget, self.unit = label, budget, unit
        self.enabled = enabled and os.environ.get("CI", "").lower() not in ("1", "true")
        self.live = self.enabled and sys.stdout.isatty()
        self.interval_s = interval_s if self.live else log_interval_s
        self.start, self.start_samples = time.perf_counter(), start_samples
        self.last_print, self.next_decade = -float("inf"), 10
        while self.next_decade <= start_samples:
            self.next_decade *= 10
        self.medians = ""

    def metrics(self, metrics: dict) -> None:
        """Remember the current per-seed metrics (B,) for the line."""
        if self.enabled:
            self.medians = " ".join(f"{k}={float(v.nanmedian()):.3g}" for k, v in metrics.items()
                                    if k in ("gap", "policy_gap", "reward_err") and len(v))

    def update(self, samples: int, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        decade = samples >= self.next_decade
        if not (final or decade or now - self.last_print >= self.interval_s):
            return
        while self.next_decade <= samples:
            self.next_decade *= 10
        self.last_print = now
        elapsed = now - self.start
        rate = (samples - self.start_samples) / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.budget - samples) / rate:6.0f}s" if rate > 0 and not final else "     -"
        line = (f"[{self.label}] {self.unit} {samples:>10,d}/{self.budget:,d} ({100 * samples / self.budget:5.1f}%)  "
                f"{rate:>9,.0f}/s  ETA {eta}  median {self.medians}")
        if self.live:
            print("\r" + line + ("\n" if final else ""), end="", flush=True)
        else:
            print(line, flush=True)


def resolve(cfg) -> tuple:
    """(validated config, resolved config dict, run_hash): the job's identity, a hash of the
    resolved config (seeds as a list, without the keys that cannot change a result) and of
    the code that computes it."""
    v = validate(cfg)
    resolved = plain(cfg)
    resolved["seeds"] = v.seeds
    resolved.pop("n_seeds", None)
    return v, resolved, config_hash({**identity(resolved), "code": code_fingerprint()})


def identity(resolved: dict) -> dict:
    return {k: val for k, val in resolved.items() if k not in OPERATIONAL_KEYS}


def other_finished_run(out_dir: Path, resolved: dict) -> str | None:
    """The run_hash of a finished run in out_dir of ANOTHER configuration or seed list (None if there
    is none): a folder is one run's record, and replacing another finished run silently loses it. The
    same config and seeds under changed code is not another run: it is recomputed (job identity)."""
    record = _run_record(out_dir)
    if record is None:
        return None
    same = (record.get("config_hash") == config_hash(_without_seeds(resolved))
            and record.get("seeds") == list(resolved.get("seeds", [])))
    if record.get("run_hash") and not same and _all_finished(record):
        return str(record["run_hash"])
    return None


def _run_record(out_dir: Path) -> dict | None:
    """out_dir/run.json as a dict with a `status` mapping, or None (absent, unreadable, wrong shape)."""
    import json

    try:
        record = json.loads((Path(out_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("status"), dict) else None


def _all_finished(record: dict) -> bool:
    statuses = [s.get("status") if isinstance(s, dict) else None for s in record["status"].values()]
    return bool(statuses) and all(s in FINISHED for s in statuses)


def _without_seeds(resolved: dict) -> dict:
    """What run.json's config_hash hashes: the result-changing config without the seeds."""
    return {k: val for k, val in identity(resolved).items() if k != "seeds"}


def refuse_replacing(out_dir: Path, resolved: dict, run_hash: str, overwrite: bool, where: str = "hydra.run.dir") -> None:
    other = other_finished_run(out_dir, resolved)
    if other and not overwrite:
        raise ConfigError(where, f"{str(out_dir)!r} holds a finished run of another configuration (run_hash {other}; "
                                 f"this run is {run_hash}); choose another folder or pass overwrite=true to replace it")


def finished_record(out_dir: Path, run_hash: str) -> dict | None:
    """The run.json in out_dir if it records this exact run (same run_hash) with every seed finished."""
    record = _run_record(out_dir)
    if record is not None and record.get("run_hash") == run_hash and _all_finished(record):
        why = metrics_mismatch(Path(out_dir) / "metrics.parquet", record)
        if why is None:
            return record
        warnings.warn(f"recomputing {out_dir}: {why}", stacklevel=2)
    return None


def run_job(cfg, out_dir: Path, experiment: str | None = None) -> dict:
    """Run one configured job and write metrics.parquet + run.json into out_dir. A finished run
    with the same run_hash is skipped; an interrupted one resumes from out_dir/checkpoint.pt."""
    return run_or_skip(cfg, out_dir, experiment)[0]


def run_or_skip(cfg, out_dir: Path, experiment: str | None = None) -> tuple[dict, bool]:
    """(run record, True if out_dir already held this run finished and nothing was computed)."""
    out_dir = Path(out_dir)
    v, resolved, run_hash = resolve(cfg)
    refuse_replacing(out_dir, resolved, run_hash, bool(cfg.get("overwrite", False)))
    done = finished_record(out_dir, run_hash)
    if done is not None:
        checkpoint.remove(out_dir)  # left only by a kill between run.json's rename and its removal
        print(f"skipping {out_dir}: completed", flush=True)
        return done, True
    torch.set_num_threads(int(cfg.threads))
    if out_dir.is_dir():  # what a killed atomic write left (no other process writes this run's files)
        remove_stale_temporaries(out_dir, RESULT_FILES)
    with StopRequests() as stops:
        return _Job(cfg, v, resolved, run_hash, out_dir, experiment, stops).run(), False


class _Job:
    """One job's loop. Everything that must survive a restart is in `_snapshot()`."""

    def __init__(self, cfg, v, resolved, run_hash, out_dir, experiment, stops: StopRequests | None = None):
        self.v, self.resolved, self.run_hash, self.out_dir, self.experiment = v, resolved, run_hash, out_dir, experiment
        self.stops = stops or StopRequests()
        self.problem = problem = envs.make(v.env)
        self.reference = reference(problem, plain(v.env), cfg.cache_dir)
        self.f_true = true_objective(problem)
        self.algo = ALGORITHMS[v.algorithm.name](v.algorithm, v.model, problem)
        self.algo.impl = v.impl
        self.counters = Counters()
        self.sampler = CountingSampler(problem, v.seeds, self.counters)
        self.evaluator = Evaluator(problem, self.reference, self.algo)
        self.state = self.algo.init(v.seeds)
        self.seeds = torch.tensor(v.seeds)  # (B,)
        self.alive = torch.ones(len(v.seeds), dtype=torch.bool)  # (B,)
        self.status = {s: {"status": "completed"} for s in v.seeds}
        self.budget = int(cfg.budget.samples)
        self.step_budget = None if cfg.budget.steps is None else int(cfg.budget.steps)
        # the evaluation clock: samples, or outer steps when the run is step-budgeted (budget.steps)
        self.clock_name = "samples" if self.step_budget is None else "step"
        self.points = evaluation_points(self.step_budget or self.budget, int(cfg.budget.evals_per_decade))
        self.checkpoint_every_s = float(cfg.checkpoint_every_s)
        self.rows: list[pd.DataFrame] = []
        self.wall = self.eval_s = self.checkpoint_s = 0.0
        self.next_point, self.last_recorded = 0, None
        self.resumed_from = self._restore()
        self.progress = Progress(f"{v.env.name}/{v.algorithm.name} {out_dir.name}", self.step_budget or self.budget,
                                 bool(cfg.progress), start_samples=self._clock(),
                                 unit="steps" if self.step_budget else "samples")
        self.last_checkpoint = time.perf_counter()
        self.live_log = live_logger(cfg.get("logger"), out_dir)  # logger=tensorboard: watch a long run

    # --- checkpoints -----------------------------------------------------------------------------
    def _snapshot(self, written_on: str = "schedule") -> dict:
        """written_on: "schedule" (checkpoint_every_s) or the signal that stopped the job (SIGTERM, ...)."""
        rows = pd.concat(self.rows, ignore_index=True) if self.rows else pd.DataFrame()
        return {"run_hash": self.run_hash, "algorithm": self.algo.state_dict(self.state),
                "sampler": self.sampler.state_dict(), "counters": dict(vars(self.counters)),
                "alive": self.alive.clone(), "status": {str(s): dict(st) for s, st in self.status.items()},
                "rows": checkpoint.frame_to_columns(rows), "wall": self.wall, "eval_s": self.eval_s,
                "next_point": self.next_point, "last_recorded": self.last_recorded,
                "psi_reference": self._psi_cache(), "written_on": written_on}

    def _psi_cache(self) -> dict:
        """min psi_lam per solved lam (envs/penalty.py PsiReference): each solve is warm-started from the
        nearest solved lam, so a resumed run needs the same cache to reproduce psi_gap exactly."""
        ref = self.problem.derived.get("psi_reference")
        cache = ref.cache if ref is not None else {}
        return {"lam": torch.tensor(list(cache), dtype=torch.float64),
                "value": torch.tensor([v for v, _ in cache.values()], dtype=torch.float64),
                "argmin": [x for _, x in cache.values()]}

    def _restore(self) -> int | None:
        saved = checkpoint.load(self.out_dir, self.run_hash)
        if saved is None:
            return None
        self.state = self.algo.load_state_dict(self.state, saved["algorithm"])
        self.sampler.load_state_dict(saved["sampler"])
        for key, value in saved["counters"].items():
            setattr(self.counters, key, int(value))
        self.alive = saved["alive"].clone()
        self.status = {int(s): dict(st) for s, st in saved["status"].items()}
        self.rows = [checkpoint.columns_to_frame(saved["rows"])] if saved["rows"] else []
        self.wall, self.eval_s = float(saved["wall"]), float(saved["eval_s"])
        self.next_point, self.last_recorded = int(saved["next_point"]), saved["last_recorded"]
        psi = saved["psi_reference"]
        if len(psi["lam"]):
            from ratebench.envs.penalty import PsiReference

            ref = self.problem.derived.setdefault("psi_reference", PsiReference(self.problem))
            ref.cache = {float(lam): (float(value), x) for lam, value, x in zip(psi["lam"], psi["value"], psi["argmin"])}
        print(f"resuming {self.out_dir} from step {self.counters.step} ({self.counters.samples:,d} samples; "
              f"checkpoint written on {saved.get('written_on', 'schedule')})", flush=True)
        return self.counters.step

    def _maybe_checkpoint(self, at_evaluation: bool) -> None:
        """At an evaluation point once checkpoint_every_s has passed (0: at every one); between
        evaluation points (late, sparse ones) only once a positive interval has passed."""
        elapsed = time.perf_counter() - self.last_checkpoint
        if elapsed < self.checkpoint_every_s or (not at_evaluation and self.checkpoint_every_s <= 0):
            return
        tic = time.perf_counter()
        checkpoint.save(self.out_dir, self._snapshot())
        self.last_checkpoint = time.perf_counter()
        self.checkpoint_s += self.last_checkpoint - tic

    # --- the loop ----------------------------------------------------------------------------------
    def _clock(self) -> int:
        """Where the run is on its evaluation schedule: the sample counter, or the step counter."""
        return getattr(self.counters, self.clock_name)

    def _budget_left(self) -> bool:
        """Neither budget.samples nor budget.steps (if set) is reached."""
        return self.counters.samples < self.budget and (self.step_budget is None
                                                         or self.counters.step < self.step_budget)

    def _record(self) -> None:
        tic = time.perf_counter()
        metrics = self.evaluator(self.state)  # each (B,)
        alive, counters = self.alive, self.counters
        frame = pd.DataFrame({"seed": self.seeds[alive].numpy(), "step": counters.step,
                              "samples": counters.samples, "queries": counters.queries,
                              **{k: m[alive].numpy() for k, m in metrics.items()},
                              **{k: float(x) for k, x in self.algo.schedule(self.state).items()},
                              "wall_s": self.wall})
        self.rows.append(frame)
        self.live_log.log(frame)
        self.last_recorded = self._clock()
        while self.next_point < len(self.points) and self.points[self.next_point] <= self._clock():
            self.next_point += 1
        self.eval_s += time.perf_counter() - tic
        self.progress.metrics({k: m[alive] for k, m in metrics.items()})
        self.progress.update(self._clock(), final=not self._budget_left())

    def run(self) -> dict:
        counters, error = self.counters, None
        if self.resumed_from is None:
            self._record()
        self.stops.deferring = True  # from here a signal stops the loop at the end of a step, after a checkpoint
        while self._budget_left() and self.alive.any():
            tic = time.perf_counter()
            try:
                self.state = self.algo.step(self.state, self.sampler)
            except Exception as exc:  # an exception cannot be pinned on one seed: all fail
                error = exc
                for s in self.seeds[self.alive].tolist():
                    self.status[s] = {"status": "failed", "step": counters.step,
                                      "message": f"{type(exc).__name__}: {exc}"}
                break
            counters.step += 1
            self.wall += time.perf_counter() - tic
            _mark_diverged(self.algo, self.state, self.alive, self.seeds, self.status, counters.step)
            at_point = self.next_point < len(self.points) and self._clock() >= self.points[self.next_point]
            if at_point and self.alive.any():
                self._record()
            else:
                self.progress.update(self._clock())
            self._maybe_checkpoint(at_evaluation=at_point)
            if self.stops.signum is not None:
                self._stop(self.stops.signum)
        if error is None and self.alive.any() and self.last_recorded != self._clock():
            self._record()
        self.live_log.close()
        record = self._write_records()
        if error is not None:
            raise error
        if self.stops.signum is not None:  # arrived while the records were written: the job is complete
            print(f"ratebench: interrupted after {self.out_dir} completed", file=sys.stderr, flush=True)
            raise Interrupted(self.stops.signum)
        return record

    def _stop(self, signum: int) -> None:
        """SIGTERM / SIGINT in the loop: checkpoint now (the state is consistent at the end of a step),
        one line, and Interrupted (exit 128 + signum)."""
        checkpoint.save(self.out_dir, self._snapshot(written_on=signal.Signals(signum).name))
        print(f"ratebench: interrupted at step {self.counters.step}; re-run to resume ({self.out_dir})",
              file=sys.stderr, flush=True)
        raise Interrupted(signum)

    def _write_records(self) -> dict:
        metrics = pd.concat(self.rows, ignore_index=True) if self.rows else pd.DataFrame(columns=BASE_COLUMNS)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_sha256 = atomic_write_parquet(self.out_dir / "metrics.parquet", metrics)
        v, resolved = self.v, self.resolved
        without_seeds = _without_seeds(resolved)
        record = {
            "algorithm": v.algorithm.name, "env": v.env.name, "experiment": self.experiment, "seeds": v.seeds,
            "status": {str(s): st for s, st in self.status.items()}, "config": resolved,
            "config_hash": config_hash(without_seeds), "run_hash": self.run_hash,
            "f_star": self.reference.value, "f_star_method": self.reference.method,
            "f_star_n_minima": self.reference.n_minima, "f_star_local": self.reference.local_value,
            "f_true": self.f_true, "j_star": self.evaluator.j_star, "target": None, **self.evaluator.targets,
            "counters": vars(self.counters),
            "wall_s": self.wall, "eval_wall_s": self.eval_s, "checkpoint_wall_s": self.checkpoint_s,
            "resumed_from_step": self.resumed_from, "metrics_sha256": metrics_sha256, "metrics_rows": len(metrics),
            "version": ratebench.__version__, "provenance": provenance(),
        }
        atomic_write_json(self.out_dir / "run.json", record)  # the completion marker: written last
        checkpoint.remove(self.out_dir)
        return record


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
