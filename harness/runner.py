"""The harness: builds env + algorithm, owns the loop, counters, clock, evaluation schedule,
divergence handling, checkpoints (resume) and the run records of one job."""
from __future__ import annotations

import math
import os
import platform
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import ratebench
import ratebench.algorithms
from ratebench import checkpoint, envs
from ratebench.envs import penalty
from ratebench.allocator import retain_freed_memory
from ratebench.algorithms import ALGORITHMS
from ratebench import config
from ratebench.config import identity, plain, validate
from ratebench.envs.tabular import InstanceBatch
from ratebench.core.errors import ConfigError
from ratebench.core.kernels import usable_cores
from ratebench.evaluation import Evaluator, evaluation_points
from ratebench.fstar import MinPsiStore, entry_path, reference, true_objective
from ratebench.health import SeedHealth, flat_parameters, observe, zero_rows
from ratebench.live_log import live_logger
from ratebench.progress import Progress, Timing, console_enabled, say
from ratebench.core.records import (BASE_COLUMNS, atomic_write_json, atomic_write_parquet, code_fingerprint,
                               config_hash, git_commit, metrics_mismatch, remove_stale_temporaries)
from ratebench.envs.sampling import Counters, CountingSampler
from ratebench.signals import Interrupted, StopRequests

SEGMENT_SECONDS = 0.5  # at most about this much compute per segment call: a signal or a checkpoint waits no longer
SEGMENT_DIVERGED = ("non-finite values (inf or NaN) in the parameters (found inside a compiled segment, "
                    "which does not record the tensor)")  # the per-step check names the tensors
FINISHED = ("completed", "diverged", "saturated", "stalled")  # final outcomes: re-running the same config reproduces them
RESULT_FILES = ("metrics.parquet", "run.json", checkpoint.FILENAME)  # written atomically into a run folder
# Evaluation points close together are held and scored in one batched pass (Evaluator.evaluate_columns): a point is
# held while the next one is due within HOLD_STEPS outer steps of the first point held, up to HOLD_POINTS points
# and HOLD_BYTES of held state copies. The rule reads only the schedule and the counters, never a clock, so which
# points are scored together (and so every bit of their metrics) is the same in every run and every resume.
HOLD_STEPS = 1000
HOLD_POINTS = 32
HOLD_BYTES = 64 * 2**20


def provenance() -> dict:
    info = {"ratebench": ratebench.__version__, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "argv": sys.argv}
    info["git_commit"] = git_commit()
    return info


def resolve(cfg) -> tuple:
    """(validated config, resolved config dict, run_hash) of the job, under the code that runs it: ratebench's
    fingerprint and the sources of the plug-ins it uses (a changed plug-in re-runs: code_identity.py)."""
    from ratebench.code_identity import plugin_sources

    v = validate(cfg)
    plugins = plugin_sources(v.algorithm.name, v.env.name)
    return config.resolve(cfg, {"code": code_fingerprint(), **({"plugins": plugins} if plugins else {})}, v)


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
    if cfg.get("instances") is not None:
        raise ConfigError("instances", "a batched instance family writes one folder per instance: "
                                       "run it with run_instances_or_skip")
    out_dir = Path(out_dir)
    v, resolved, run_hash = resolve(cfg)
    refuse_replacing(out_dir, resolved, run_hash, bool(cfg.get("overwrite", False)))
    done = finished_record(out_dir, run_hash)
    if done is not None:
        checkpoint.remove(out_dir)  # left only by a kill between run.json's rename and its removal
        say(f"skipping {out_dir}: completed")
        return done, True
    torch.set_num_threads(int(cfg.threads))
    retain_freed_memory()  # a step's tensors reuse pages instead of faulting in new ones (allocator.py)
    if out_dir.is_dir():  # what a killed atomic write left (no other process writes this run's files)
        remove_stale_temporaries(out_dir, RESULT_FILES)
    with StopRequests() as stops:
        part = _Part(v, resolved, run_hash, out_dir, cfg)
        return _Job(cfg, [part], run_hash, out_dir, experiment, stops).run()[0], False


INSTANCE_DIR = "instance_{}"  # a batched family's folder of instance k, inside the job's run folder


def instance_parts(cfg, out_dir: Path) -> list[tuple[Path, object, dict, str]]:
    """(folder, validated config, resolved config, run_hash) of each instance k of a batched family: the config of
    instance k's own job (env.instance_seed=k, instances=null) and its folder out_dir/instance_<k>/. Its run_hash
    is that of `ratebench run env.instance_seed=k ...`: the folders are interchangeable."""
    import copy

    from omegaconf import open_dict, read_write

    parts = []
    for k in validate(cfg).instances:
        part = copy.deepcopy(cfg)
        with read_write(part), open_dict(part):
            part.instances = None
            part.env.instance_seed = k
        parts.append((Path(out_dir) / INSTANCE_DIR.format(k), *resolve(part)))
    return parts


def refuse_replacing_job(cfg, out_dir: Path, parts: list | None = None) -> None:
    """refuse_replacing for the folder(s) a job writes: out_dir, or each instance folder of a batched family
    (`parts`: instance_parts(cfg, out_dir), when the caller has them already)."""
    overwrite = bool(cfg.get("overwrite", False))
    if cfg.get("instances") is None:
        _, resolved, run_hash = resolve(cfg)
        refuse_replacing(Path(out_dir), resolved, run_hash, overwrite)
        return
    for folder, _, resolved, run_hash in parts or instance_parts(cfg, out_dir):
        refuse_replacing(folder, resolved, run_hash, overwrite, where="instances")


def run_instances_or_skip(cfg, out_dir: Path, experiment: str | None = None) -> tuple[list[tuple[Path, dict]], bool]:
    """A batched instance family (cfg.instances): every instance's seeds as rows of one batch, one step for all,
    each instance's records written to out_dir/instance_<k>/ exactly as its own job would write them (same
    run_hash, same metrics). The checkpoint of the whole batch lives in out_dir. Returns ([(folder, record)],
    True if every instance folder already held its run finished and nothing was computed)."""
    out_dir = Path(out_dir)
    _, _, batch_hash = resolve(cfg)  # validates the family (instances, algorithm) before anything is built
    parts = instance_parts(cfg, out_dir)
    refuse_replacing_job(cfg, out_dir, parts)
    done = [finished_record(d, run_hash) for d, _, _, run_hash in parts]
    if all(record is not None for record in done):
        checkpoint.remove(out_dir)
        say(f"skipping {out_dir}: every instance completed")
        return [(d, record) for (d, *_), record in zip(parts, done)], True
    torch.set_num_threads(int(cfg.threads))
    retain_freed_memory()  # a step's tensors reuse pages instead of faulting in new ones (allocator.py)
    for d in [out_dir] + [d for d, *_ in parts]:
        if d.is_dir():
            remove_stale_temporaries(d, RESULT_FILES)
    with StopRequests() as stops:
        job_parts = [_Part(v, resolved, run_hash, d, cfg) for d, v, resolved, run_hash in parts]
        records = _Job(cfg, job_parts, batch_hash, out_dir, experiment, stops).run()
    return [(p.out_dir, record) for p, record in zip(job_parts, records)], False


def _say_one_off_work(cfg, v, out_dir, builds: list[str], solves_f_star: bool) -> None:
    """One console line (with progress on) before a set-up that compiles (builds: the sources whose builds started)
    or solves F* for the first time here, since it can take tens of seconds before the first progress line: what it
    does, and that it is cached after."""
    work = [f"compiling {', '.join(builds)}"] if builds else []
    if solves_f_star:
        work.append(f"solving the global reference F* of this {v.env.name} instance")
    if work and console_enabled(bool(cfg.progress)):
        say(f"[{v.env.name}/{v.algorithm.name} {Path(out_dir).name}] first run here: {' and '.join(work)} "
            "(once: cached for later runs)")


class _Part:
    """One instance of a job: its identity (config, run_hash, folder), its exact references and evaluator, the
    status and metric rows of its seeds. A job has one; a batched instance family one per instance."""

    def __init__(self, v, resolved, run_hash, out_dir: Path, cfg):
        tic = time.perf_counter()
        self.v, self.resolved, self.run_hash, self.out_dir = v, resolved, run_hash, Path(out_dir)
        self.problem = envs.make(v.env)
        self.algo = ALGORITHMS[v.algorithm.name](v.algorithm, v.model, self.problem)  # steps a single job
        self.algo.impl = v.impl
        self.algo.step_threads = step_threads(cfg)
        # the compilers of the step and of psi_gap's Newton run in processes of their own while F* is solved (cold
        # start: the longer of the two, not their sum); the job waits for them before its first step
        builds = self.algo.start_kernel_build() + penalty.start_newton_build(self.problem)
        _say_one_off_work(cfg, v, out_dir, builds, not entry_path(plain(v.env), cfg.cache_dir, v.model.reward.bound).exists())
        self.reference = reference(self.problem, plain(v.env), cfg.cache_dir, v.model.reward.bound)  # F* over the reward class
        self.f_true = true_objective(self.problem)
        self.evaluator = Evaluator(self.problem, self.reference, self.algo)
        if "psi_reference" in self.problem.derived:  # min psi_lam per lam from the cache folder too, like F-hat*
            self.problem.derived["psi_reference"].store = MinPsiStore(plain(v.env), cfg.cache_dir)
        self.status = {s: {"status": "completed"} for s in v.seeds}
        self.health = SeedHealth(v.health, len(v.seeds))  # saturated / stalled seeds (harness/health.py)
        self.rows: list[pd.DataFrame] = []
        self.live_log = live_logger(cfg.get("logger"), self.out_dir)  # logger=tensorboard: watch a long run
        self.setup_s = time.perf_counter() - tic  # the environment, F-hat* (cached or solved), the evaluator

    def psi_cache(self) -> dict:
        """min psi_lam per solved lam (envs/penalty.py PsiReference): each solve is warm-started from the
        nearest solved lam, so a resumed run needs the same cache to reproduce psi_gap exactly."""
        ref = self.problem.derived.get("psi_reference")
        cache = ref.cache if ref is not None else {}
        return {"lam": torch.tensor(list(cache), dtype=torch.float64),
                "value": torch.tensor([v for v, _ in cache.values()], dtype=torch.float64),
                "argmin": [x for _, x in cache.values()]}

    def restore_psi_cache(self, psi: dict) -> None:
        if len(psi["lam"]):
            from ratebench.envs.penalty import PsiReference

            ref = self.problem.derived.setdefault("psi_reference", PsiReference(self.problem))
            ref.cache = {float(lam): (float(value), x) for lam, value, x in zip(psi["lam"], psi["value"], psi["argmin"])}


class _Job:
    """One job's loop over its parts' seeds, stepped as one batch (rows part-major: part p owns rows
    p * n_seeds ... (p + 1) * n_seeds - 1). Everything that must survive a restart is in `_snapshot()`."""

    def __init__(self, cfg, parts: list[_Part], run_hash, out_dir, experiment, stops: StopRequests | None = None):
        tic = time.perf_counter()
        self.parts, self.run_hash, self.out_dir, self.experiment = parts, run_hash, Path(out_dir), experiment
        self.v = v = parts[0].v
        self.stops = stops or StopRequests()
        n = len(v.seeds)
        if len(parts) == 1:
            self.problem, self.algo = parts[0].problem, parts[0].algo
        else:  # a batched instance family: the stepping algorithm sees every instance's tables, row by row
            self.problem = InstanceBatch([p.problem for p in parts], torch.arange(len(parts)).repeat_interleave(n))
            self.algo = ALGORITHMS[v.algorithm.name](v.algorithm, v.model, self.problem)
            self.algo.impl = v.impl
            self.algo.step_threads = step_threads(cfg)
        self.part_rows = [slice(i * n, (i + 1) * n) for i in range(len(parts))]
        rows = v.seeds * len(parts)  # a seed's streams do not depend on its instance: as in its own job
        self.counters = Counters()
        self.sampler = CountingSampler(self.problem, rows, self.counters)
        self.state = self.algo.init(rows)
        self.seeds = torch.tensor(rows)  # (B,)
        self.alive = torch.ones(len(rows), dtype=torch.bool)  # (B,)
        self.budget = int(cfg.budget.samples)
        self.step_budget = None if cfg.budget.steps is None else int(cfg.budget.steps)
        # the evaluation clock: samples, or outer steps when the run is step-budgeted (budget.steps)
        self.clock_name = "samples" if self.step_budget is None else "step"
        self.points = evaluation_points(self.step_budget or self.budget, int(cfg.budget.evals_per_decade))
        self.checkpoint_every_s = float(cfg.checkpoint_every_s)
        self.wall = self.eval_s = self.checkpoint_s = 0.0
        self.next_point, self.last_recorded = 0, None
        self.held: list[dict] = []  # evaluation points recorded but not yet scored (HOLD_STEPS), checkpointed
        self.held_bytes = 0
        self.resumed_from = self._restore()
        setup = time.perf_counter() - tic + sum(p.setup_s for p in parts)
        tic = time.perf_counter()
        self.algo.segment_samples(self.state)  # builds (or loads) a compiled step now, not inside the first step
        if any(penalty.split_newton_applies(p.problem) for p in parts):
            penalty.newton_library()  # and psi_gap's compiled Newton, not inside the first evaluation
        self.startup = {"imports": _imports_s(), "setup": setup, "kernel": time.perf_counter() - tic}
        self.progress = Progress(f"{v.env.name}/{v.algorithm.name} {self.out_dir.name}", self.step_budget or self.budget,
                                 bool(cfg.progress), start_samples=self._clock(),
                                 unit="steps" if self.step_budget else "samples")
        self.last_checkpoint = time.perf_counter()

    # --- checkpoints -----------------------------------------------------------------------------
    def _snapshot(self, written_on: str = "schedule") -> dict:
        """written_on: "schedule" (checkpoint_every_s) or the signal that stopped the job (SIGTERM, ...)."""
        def rows(part):
            return checkpoint.frame_to_columns(pd.concat(part.rows, ignore_index=True) if part.rows else pd.DataFrame())

        return {"run_hash": self.run_hash, "algorithm": self.algo.state_dict(self.state),
                "sampler": self.sampler.state_dict(), "counters": dict(vars(self.counters)),
                "alive": self.alive.clone(),
                "status": [{str(s): dict(st) for s, st in part.status.items()} for part in self.parts],
                "rows": [rows(part) for part in self.parts], "wall": self.wall, "eval_s": self.eval_s,
                "next_point": self.next_point, "last_recorded": self.last_recorded,
                "psi_reference": [part.psi_cache() for part in self.parts],
                "health": [part.health.state_dict() for part in self.parts], "written_on": written_on,
                "held": [dict(h, state=self.algo.state_dict(h["state"])) for h in self.held]}

    def _restore(self) -> int | None:
        saved = checkpoint.load(self.out_dir, self.run_hash)
        if saved is None:
            return None
        self.state = self.algo.load_state_dict(self.state, saved["algorithm"])
        self.sampler.load_state_dict(saved["sampler"])
        for key, value in saved["counters"].items():
            setattr(self.counters, key, int(value))
        self.alive = saved["alive"].clone()
        for part, status, rows, psi, health in zip(self.parts, saved["status"], saved["rows"], saved["psi_reference"],
                                                   saved["health"]):
            part.status = {int(s): dict(st) for s, st in status.items()}
            part.health.load_state_dict(health)
            part.rows = [checkpoint.columns_to_frame(rows)] if rows else []
            part.restore_psi_cache(psi)
        self.wall, self.eval_s = float(saved["wall"]), float(saved["eval_s"])
        self.next_point, self.last_recorded = int(saved["next_point"]), saved["last_recorded"]
        # held points come back as they were held (their states into fresh ones: nothing shared with the loop's)
        self.held = [dict(h, alive=h["alive"].clone(),
                          state=self.algo.load_state_dict(self.algo.init(self.seeds.tolist()), h["state"]))
                     for h in saved.get("held", [])]
        self.held_bytes = sum(self._state_bytes(h["state"]) for h in self.held)
        say(f"resuming {self.out_dir} from step {self.counters.step} ({self.counters.samples:,d} samples; "
              f"checkpoint written on {saved.get('written_on', 'schedule')})")
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

    def _timing(self) -> Timing:
        """Steps, algorithm and evaluation seconds so far and evaluation points ahead: what the ETA reads."""
        return Timing(self.counters.step, self.wall, self.eval_s, len(self.points) - self.next_point)

    def _budget_left(self) -> bool:
        """Neither budget.samples nor budget.steps (if set) is reached."""
        return self.counters.samples < self.budget and (self.step_budget is None
                                                         or self.counters.step < self.step_budget)

    def _record(self) -> None:
        """At an evaluation point: hold a copy of the state with its counters, and score the points held so far
        when the rule (HOLD_STEPS) says not to wait for the next one."""
        tic = time.perf_counter()
        later = self.next_point
        while later < len(self.points) and self.points[later] <= self._clock():
            later += 1
        state = self.algo.select_rows(self.state, slice(None))  # a copy: the loop steps on from here
        size = self._state_bytes(state)
        hold = self._may_hold(later, size)
        self.held.append({"state": state, "step": self.counters.step, "samples": self.counters.samples,
                          "queries": self.counters.queries, "clock": self._clock(), "wall": self.wall,
                          "alive": self.alive.clone()})
        self.held_bytes += size
        self.last_recorded, self.next_point = self._clock(), later
        if not hold:
            self._score_held()
        self.eval_s += time.perf_counter() - tic
        self.progress.update(self._clock(), final=not self._budget_left(), timing=self._timing())

    def _state_bytes(self, state) -> int:
        return sum(t.nbytes for t in self.algo.tensors(state).values())

    def _may_hold(self, later: int, size: int) -> bool:
        """Whether the point being recorded can wait for the next one (HOLD_STEPS, HOLD_POINTS, HOLD_BYTES): from
        the schedule and the counters only."""
        if not self._budget_left() or later >= len(self.points) or not self.alive.any():
            return False
        if len(self.held) + 1 >= HOLD_POINTS or self.held_bytes + size > HOLD_BYTES:
            return False
        first = self.held[0]["step"] if self.held else self.counters.step
        return self._steps_at(self.points[later]) - first <= HOLD_STEPS

    def _steps_at(self, point: int) -> int:
        """The step count at which the clock reaches `point`: exact on the step clock; on the sample clock from the
        samples per step so far (one step ahead before the first; a step that draws none never reaches it). The
        same for every impl, so a run and its reference-path twin hold the same points."""
        if self.step_budget is not None:
            return point
        if not self.counters.step:
            return 1
        if not self.counters.samples:
            return 2**62
        return self.counters.step + math.ceil((point - self.counters.samples) * self.counters.step / self.counters.samples)

    def _score_held(self) -> None:
        """The exact metrics and the seed-health check of every held point in one pass per part
        (Evaluator.evaluate_columns, health.observe, SeedHealth.evaluate_many), then in the points' order their
        rows and verdicts. A seed found saturated at a point has no rows after it (it stepped on meanwhile; a
        status from those steps is replaced) and is zeroed now."""
        held, self.held, self.held_bytes = self.held, [], 0
        if not held:
            return
        schedule = [self.algo.schedule(h["state"]) for h in held]
        saturated = torch.zeros_like(self.alive)
        shown = []
        for i, part in enumerate(self.parts):
            rows = self.part_rows[i]
            states = [h["state"] if len(self.parts) == 1 else self.algo.select_rows(h["state"], rows) for h in held]
            tables = {}  # the rows' policies and reward tables as scored, which the health check reads too
            scored = part.evaluator.evaluate_columns(states, tables)  # (points x n_seeds,): exact, on the part's instance
            reasons = part.health.evaluate_many(scored, observe(part.problem, tables, part.algo.uses_true_reward),
                                                flat_parameters([part.algo.tensors(s) for s in states]),
                                                [h["clock"] for h in held], [h["step"] for h in held])
            # (points, n_seeds): a seed is found saturated at the first point where it runs and its check fails, and
            # gets rows up to that point (the frame's rows, point-major as they were held)
            alive = torch.stack([h["alive"][rows] for h in held])
            failed = torch.tensor([[why is not None for why in point] for point in reasons]) & alive
            found = failed & (failed.cumsum(0) == 1)
            kept = (alive & (found.cumsum(0) - found.long() == 0)).numpy()
            for point, j in found.nonzero().tolist():
                part.status[self._part_seed(j)] = {"status": "saturated", "step": held[point]["step"],
                                                   "reason": reasons[point][j]}
            saturated[rows] |= found.any(0)
            counts = kept.sum(1)  # a point's values repeated on its rows

            def per_point(values, dtype=None, counts=counts):
                return np.repeat(np.asarray(values, dtype=dtype), counts)

            frame = pd.DataFrame({"seed": np.tile(self.seeds[rows].numpy(), len(held))[kept.reshape(-1)],
                                  **{k: per_point([h[k] for h in held], np.int64) for k in ("step", "samples", "queries")},
                                  **{k: m.numpy().reshape(kept.shape)[kept] for k, m in scored.items()},
                                  **{k: per_point([float(x[k]) for x in schedule]) for k in schedule[0]},
                                  "wall_s": per_point([h["wall"] for h in held])})
            part.rows.append(frame)
            part.live_log.log(frame)
            alive = held[-1]["alive"][rows] & ~saturated[rows]
            shown.append({k: scored[k][-len(alive):][alive] for k in Progress.SHOWN if k in scored})
        if saturated.any():  # stopped like a diverged seed: zeroed so the batch stays finite, no further rows
            self.alive &= ~saturated
            zero_rows(self.algo.tensors(self.state), saturated)
        self.progress.metrics({k: torch.cat([m[k] for m in shown]) for k in shown[0]})

    def _mark_stalled(self) -> None:
        """At the end of the run: a seed still running whose parameters have not moved for a decade is stalled."""
        for i, part in enumerate(self.parts):
            alive = self.alive[self.part_rows[i]].tolist()
            for j, why in enumerate(part.health.stalled()):
                if why is not None and alive[j]:
                    part.status[self._part_seed(j)] = {"status": "stalled", "step": part.health.stalled_step(j),
                                                      "reason": why}

    def _part_seed(self, j: int) -> int:
        """The seed of a part's row j."""
        return int(self.v.seeds[j])

    def _row_owner(self, row: int) -> tuple[_Part, int]:
        """(part, seed) of batch row `row`."""
        return self.parts[row // len(self.v.seeds)], int(self.seeds[row])

    def run(self) -> dict:
        counters, error = self.counters, None
        if self.resumed_from is None:
            self._record()
        self.stops.deferring = True  # from here a signal stops the loop at the end of a step, after a checkpoint
        while self._budget_left() and self.alive.any():
            tic = time.perf_counter()
            try:
                diverged = self._advance()
            except Exception as exc:  # an exception cannot be pinned on one seed: all fail
                error = exc
                for row in self.alive.nonzero().flatten().tolist():
                    part, seed = self._row_owner(row)
                    message = f"{type(exc).__name__}: {exc}"
                    part.status[seed] = {"status": "failed", "step": counters.step, "message": message,
                                         "reason": message.splitlines()[0]}
                break
            self.wall += time.perf_counter() - tic
            for row, step, reason in diverged:
                part, seed = self._row_owner(row)
                part.status[seed] = {"status": "diverged", "step": step, "reason": reason}
            at_point = self.next_point < len(self.points) and self._clock() >= self.points[self.next_point]
            if at_point and self.alive.any():
                self._record()
            else:
                self.progress.update(self._clock(), timing=self._timing())
            self._maybe_checkpoint(at_evaluation=at_point)
            if self.stops.signum is not None:
                self._stop(self.stops.signum)
        try:  # the points held before the end (or before an error in the loop: they were reached)
            self._score_held()
        except Exception:
            if error is None:
                raise  # else the loop's error is the one reported
        if error is None and self.alive.any() and self.last_recorded != self._clock():
            self._record()
        if error is None:
            self._mark_stalled()
        for part in self.parts:
            part.live_log.close()
        records = [self._write_records(part) for part in self.parts]
        checkpoint.remove(self.out_dir)  # after every part's run.json: a kill in between resumes and rewrites them
        if error is not None:
            raise error
        if self.stops.signum is not None:  # arrived while the records were written: the job is complete
            say(f"ratebench: interrupted after {self.out_dir} completed", error=True)
            raise Interrupted(self.stops.signum)
        return records

    def _advance(self) -> list[tuple[int, int, str]]:
        """One step, or a segment of steps in one call where the algorithm runs segments (Algorithm.run_segment):
        as many as reach the next evaluation point or the budget, capped at about SEGMENT_SECONDS of compute so a
        signal or a due checkpoint waits no longer. Advances the step counter; returns the (row, step, reason) of each
        seed that diverged (its parameters went non-finite at the end of that step: zeroed, no more rows)."""
        per_step = self.algo.segment_samples(self.state)
        if per_step is None:
            self.state = self.algo.step(self.state, self.sampler)
            self.counters.step += 1
            return [(row, self.counters.step, why) for row, why in _mark_diverged(self.algo, self.state, self.alive).items()]
        n, start, tic = self._segment_steps(per_step), self.counters.step, time.perf_counter()
        self.state, steps, died = self.algo.run_segment(self.state, self.sampler, n, self.alive)
        self.counters.step += steps
        self._step_s = (time.perf_counter() - tic) / steps
        newly = (died > 0) & self.alive
        self.alive &= ~newly
        return [(row, start + int(died[row]), SEGMENT_DIVERGED) for row in newly.nonzero().flatten().tolist()]

    def _segment_steps(self, per_step: int) -> int:
        """Steps to the next evaluation point, to the budget (samples or steps: the per-step loop's stopping points,
        since each step draws per_step samples), and about SEGMENT_SECONDS of compute (at most 4x the last
        segment's length, from one step at first)."""
        def steps_to(samples: int) -> int:  # a step that draws nothing (an exact oracle) never reaches a sample count
            return -(-(samples - self.counters.samples) // per_step) if per_step else 2**62

        n = steps_to(self.budget)
        if self.step_budget is not None:
            n = min(n, self.step_budget - self.counters.step)
        if self.next_point < len(self.points):
            target = self.points[self.next_point]
            n = min(n, target - self.counters.step if self.step_budget is not None else steps_to(target))
        step_s = getattr(self, "_step_s", None)
        cap = 1 if step_s is None else min(4 * self._last_segment, max(1, int(SEGMENT_SECONDS / max(step_s, 1e-9))))
        self._last_segment = max(1, min(n, cap))
        return self._last_segment

    def _stop(self, signum: int) -> None:
        """SIGTERM / SIGINT in the loop: checkpoint now (the state is consistent at the end of a step),
        one line, and Interrupted (exit 128 + signum)."""
        checkpoint.save(self.out_dir, self._snapshot(written_on=signal.Signals(signum).name))
        say(f"ratebench: interrupted at step {self.counters.step}; re-run to resume ({self.out_dir})", error=True)
        raise Interrupted(signum)

    def _write_records(self, part: _Part) -> dict:
        metrics = pd.concat(part.rows, ignore_index=True) if part.rows else pd.DataFrame(columns=BASE_COLUMNS)
        part.out_dir.mkdir(parents=True, exist_ok=True)
        metrics_sha256 = atomic_write_parquet(part.out_dir / "metrics.parquet", metrics)
        v, resolved = part.v, part.resolved
        without_seeds = _without_seeds(resolved)
        info = provenance()
        from ratebench.code_identity import run_code

        info["code"] = run_code(v.algorithm.name, v.env.name)  # ratebench's version/commit, the plug-ins' sources
        info["step_path"] = self.algo.step_path()  # impl=fast: compiled where it builds, else eager (docs/fast.md)
        info["psi_newton_path"] = penalty.newton_path(part.problem)  # compiled / torch agree to ~1e-13, not bit for bit
        if len(self.parts) > 1:  # how it was computed, not what: wall times are the whole batch's
            info["instance_batch"] = {"instances": [p.v.env.instance_seed for p in self.parts],
                                      "run_hash": self.run_hash}
        record = {
            "algorithm": v.algorithm.name, "env": v.env.name, "experiment": self.experiment, "seeds": v.seeds,
            "status": {str(s): st for s, st in part.status.items()}, "config": resolved,
            "config_hash": config_hash(without_seeds), "run_hash": part.run_hash,
            "f_star": part.reference.value, "f_star_method": part.reference.method,
            "f_star_n_minima": part.reference.n_minima, "f_star_local": part.reference.local_value,
            "f_true": part.f_true, "j_star": part.evaluator.j_star, "target": None, **part.evaluator.targets,
            "counters": vars(self.counters),
            "wall_s": self.wall, "eval_wall_s": self.eval_s, "checkpoint_wall_s": self.checkpoint_s,
            "startup_wall_s": self.startup,
            "resumed_from_step": self.resumed_from, "metrics_sha256": metrics_sha256, "metrics_rows": len(metrics),
            "version": ratebench.__version__, "provenance": info,
        }
        atomic_write_json(part.out_dir / "run.json", record)  # the completion marker: written last
        return record


def _uptime() -> float | None:
    """Seconds since boot (Linux), or None."""
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _process_age() -> float | None:
    """Seconds since this process started (Linux /proc), or None."""
    now = _uptime()
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return None if now is None else max(0.0, now - started)


_IMPORTED_AFTER_S = _process_age()  # the interpreter's start and the imports up to this module


def _imports_s() -> float | None:
    """Seconds from the process's start to ratebench.runner imported, for the process's first job only (later jobs
    of a worker process import nothing): 0.0 for them, None where /proc is missing."""
    global _IMPORTED_AFTER_S
    seconds, _IMPORTED_AFTER_S = _IMPORTED_AFTER_S, 0.0
    return seconds


def step_threads(cfg) -> int:
    """Threads of a compiled segment: cfg.step_threads, or every core this process may use when it is 0."""
    return int(cfg.get("step_threads", 0) or 0) or usable_cores()


def _mark_diverged(algo, state, alive) -> dict[int, str]:
    """A seed with a non-finite tensor is diverged at this step; its slices are zeroed so the
    batch stays finite, and it gets no further metric rows. Other seeds continue. Returns the
    rows that diverged at this step, each with the reason (which tensors hold inf or NaN)."""
    tensors = algo.tensors(state)
    with torch.no_grad():  # every step of an eager run: one sum per tensor says "all finite" (a NaN or inf makes it
        #                   non-finite; finite values that overflow it only send it to the check per row below)
        total = sum(t.sum() for t in tensors.values())
        if not isinstance(total, torch.Tensor) or bool(total.isfinite()):
            return {}
    finite = torch.ones_like(alive)
    for t in tensors.values():
        finite &= torch.isfinite(t.detach().reshape(t.shape[0], -1)).all(1)
    newly = alive & ~finite
    if not newly.any():
        return {}
    reasons = {row: "non-finite values (inf or NaN) in the parameters "
               + ", ".join(name for name, t in tensors.items() if not bool(torch.isfinite(t[row]).all()))
               for row in newly.nonzero().flatten().tolist()}
    alive &= finite
    zero_rows(tensors, newly)
    return reasons
