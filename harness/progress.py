"""What a job says while it runs: the live progress line on the console (samples, rate, ETA, current
medians) and the job's log file. Hydra opens `<output folder>/app.log` for every job; `job_log()` points
the `ratebench.run` logger at it for the job's duration, so the file carries the run's own lines (progress,
resume, the records written, errors) and its warnings, whatever the console shows."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from typing import NamedTuple

RUN_LOG = logging.getLogger("ratebench.run")

ETA_MIN_STEPS = 10  # steps timed after the first (which carries one-off costs: first calls, caches) before an ETA
ETA_MIN_SECONDS = 2.0  # ... and this long since the job's loop started: a shorter job needs no ETA


@contextlib.contextmanager
def job_log():
    """For one job: RUN_LOG writes to the log files Hydra attached to the root logger (app.log; none when
    Hydra's job logging is off) and not to the console, whose lines are printed as they always were; every
    warning raised meanwhile is logged too (and shown as usual)."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    saved = RUN_LOG.handlers[:], RUN_LOG.propagate, RUN_LOG.level
    RUN_LOG.handlers[:], RUN_LOG.propagate = files, False
    RUN_LOG.setLevel(logging.INFO)
    show = warnings.showwarning

    def shown_and_logged(message, category, filename, lineno, file=None, line=None):
        RUN_LOG.warning("%s: %s", category.__name__, message)
        show(message, category, filename, lineno, file, line)

    warnings.showwarning = shown_and_logged
    try:
        yield RUN_LOG
    finally:
        warnings.showwarning = show
        RUN_LOG.handlers[:], RUN_LOG.propagate = saved[0], saved[1]
        RUN_LOG.setLevel(saved[2])


def console_enabled(progress: bool) -> bool:
    """Whether a job's progress lines reach the console: progress=true and not under CI=true."""
    return progress and os.environ.get("CI", "").lower() not in ("1", "true")


def say(message: str, error: bool = False) -> None:
    """One line of the job's: printed (stdout, or stderr for an error) and logged."""
    print(message, file=sys.stderr if error else sys.stdout, flush=True)
    if RUN_LOG.handlers:  # inside job_log(); elsewhere (a job run from Python) the line is printed only
        RUN_LOG.log(logging.ERROR if error else logging.INFO, message)


class Timing(NamedTuple):
    """Where the job's time went so far (runner._Job): outer steps taken, algorithm seconds and evaluation
    seconds (cumulative), and evaluation points still ahead."""

    step: int
    algo_s: float
    eval_s: float
    evals_left: int


def eta_seconds(units_left: float, algo_s_per_unit: float, evals_left: int, eval_s_each: float) -> float:
    """Remaining time as the job spends it: algorithm time per sample (or step) for the units left, plus the
    measured cost of one evaluation for each evaluation point left. Evaluation points are log-spaced, so a
    job's early rate (dense evaluations) says little about its late one: the two are timed apart."""
    return max(units_left, 0) * algo_s_per_unit + max(evals_left, 0) * eval_s_each


class Progress:
    """A live line per job: samples done, rate, ETA, current medians. On a terminal the line is rewritten
    in place (at most every `interval_s`); otherwise one line per decade of samples or per `log_interval_s`.
    The console is quiet under CI=true or progress=false; the job's log file gets the line at the second
    cadence either way. No ETA until ETA_MIN_STEPS steps after the first have been timed and
    ETA_MIN_SECONDS have passed: the first steps carry one-off costs that would inflate it."""

    def __init__(self, label: str, budget: int, enabled: bool, start_samples: int = 0,
                 interval_s: float = 0.5, log_interval_s: float = 30.0, unit: str = "samples", clock=time.perf_counter):
        self.label, self.budget, self.unit, self.clock = label, budget, unit, clock
        self.enabled = console_enabled(enabled)
        self.live = self.enabled and sys.stdout.isatty()
        self.interval_s = interval_s if self.live else log_interval_s
        self.log_interval_s = log_interval_s
        self.start, self.start_samples = clock(), start_samples
        self.last_print = self.last_log = -float("inf")
        self.next_decade = 10
        while self.next_decade <= start_samples:
            self.next_decade *= 10
        self.medians = ""
        self.origin: tuple | None = None  # (step, units, algo_s, eval_s, evaluations) once the first step is done
        self.first_step: int | None = None
        self.evaluations, self.last_eval_s = 0, 0.0

    SHOWN = ("gap", "policy_gap", "reward_err")  # the metrics whose medians the line shows

    def metrics(self, metrics: dict) -> None:
        """Remember the current per-seed metrics (B,) for the line (those of SHOWN it is given)."""
        self.medians = " ".join(f"{k}={float(v.nanmedian()):.3g}" for k, v in metrics.items()
                                if k in self.SHOWN and len(v))

    def _time(self, units: int, timing: Timing | None) -> None:
        """Count evaluations (eval_s grew) and fix the ETA's origin after the first step."""
        if timing is None:
            return
        if timing.eval_s > self.last_eval_s:
            self.evaluations += 1
            self.last_eval_s = timing.eval_s
        if self.first_step is None:
            self.first_step = timing.step
        elif self.origin is None and timing.step > self.first_step:
            self.origin = (timing.step, units, timing.algo_s, timing.eval_s, self.evaluations)

    def eta(self, units: int, timing: Timing | None, now: float) -> float | None:
        """Seconds left, or None while too little has been timed (see the class)."""
        if timing is None or self.origin is None or now - self.start < ETA_MIN_SECONDS:
            return None
        step0, units0, algo0, eval0, evals0 = self.origin
        if timing.step - step0 < ETA_MIN_STEPS or units <= units0:
            return None
        per_eval = ((timing.eval_s - eval0) / (self.evaluations - evals0) if self.evaluations > evals0
                    else timing.eval_s / max(self.evaluations, 1))
        left = eta_seconds(self.budget - units, (timing.algo_s - algo0) / (units - units0), timing.evals_left, per_eval)
        return left if math.isfinite(left) else None

    def update(self, samples: int, final: bool = False, timing: Timing | None = None) -> None:
        now = self.clock()
        self._time(samples, timing)
        decade = samples >= self.next_decade
        show = self.enabled and (final or decade or now - self.last_print >= self.interval_s)
        log = bool(RUN_LOG.handlers) and (final or decade or now - self.last_log >= self.log_interval_s)
        if not (show or log):
            return
        while self.next_decade <= samples:
            self.next_decade *= 10
        elapsed = now - self.start
        rate = (samples - self.start_samples) / elapsed if elapsed > 0 else 0.0
        left = None if final else self.eta(samples, timing, now)
        eta = f"{left:6.0f}s" if left is not None else "     -"
        # no medians until the first evaluation points are scored (held points: docs/fast.md)
        line = (f"[{self.label}] {self.unit} {samples:>10,d}/{self.budget:,d} ({100 * samples / self.budget:5.1f}%)  "
                f"{rate:>9,.0f}/s  ETA {eta}" + (f"  median {self.medians}" if self.medians else ""))
        if show:
            self.last_print = now
            if self.live:
                print("\r" + line + ("\n" if final else ""), end="", flush=True)
            else:
                print(line, flush=True)
        if log:
            self.last_log = now
            RUN_LOG.info(line)
