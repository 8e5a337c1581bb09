"""Clean stops of a running job: SIGTERM and SIGINT ask the loop to checkpoint at the end of the
current step and exit 143 / 130; a sweep worker whose launcher died is stopped the same way."""
from __future__ import annotations

import os
import signal
import sys
import threading

LAUNCHER_ENV = "RATEBENCH_LAUNCHER_PID"  # set by `ratebench run`; a sweep worker compares it with its parent
WATCH_INTERVAL_S = 0.2  # how often a sweep worker checks that its launcher is alive
GRACE_S = 30.0  # an orphaned worker that has not stopped cleanly by then exits anyway


class Interrupted(BaseException):
    """A job stopped by a signal (after its checkpoint when it was in the loop). BaseException, like
    KeyboardInterrupt: no `except Exception` on the way may swallow it. `code` is the exit status."""

    def __init__(self, signum: int, message: str = ""):
        self.signum, self.code = signum, 128 + signum
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")


class StopRequests:
    """Handlers for SIGTERM and SIGINT while a job runs (main thread only; restored on exit). While
    `deferring`, a signal is only recorded in `signum` (the loop checkpoints at the end of the step,
    so the checkpoint is consistent); otherwise, or on a second signal, it raises Interrupted at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self.deferring = False
        self._saved: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.deferring and self.signum is None:
            self.signum = signum
            return
        when = "again, before the checkpoint was written" if self.deferring else "before the first step"
        print(f"ratebench: interrupted {when}; re-run to start or resume", file=sys.stderr, flush=True)
        raise Interrupted(signum)

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._saved[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)
        self._saved.clear()


class ParentWatch:
    """Run in a sweep worker (a process whose parent is the `ratebench run` launcher, e.g. a joblib /
    loky worker): a daemon thread polls os.getppid(); once the launcher has died (the worker is
    re-parented) it sends the worker SIGTERM, so the job checkpoints and the worker exits instead of
    computing its job to the end beside the re-run. Polling, not prctl(PR_SET_PDEATHSIG): that signal
    fires when the *thread* that forked the worker exits, and loky forks replacement workers from its
    executor-manager thread, which may end while the launcher lives. Inactive in the launcher itself."""

    def __init__(self):
        launcher = os.environ.get(LAUNCHER_ENV, "")
        self.parent = os.getppid()
        self.active = launcher.isdigit() and int(launcher) == self.parent and self.parent != os.getpid()
        self.orphaned = threading.Event()
        self._done = threading.Event()

    def _watch(self) -> None:
        while not self._done.wait(WATCH_INTERVAL_S):
            if os.getppid() != self.parent:
                self.orphaned.set()
                os.kill(os.getpid(), signal.SIGTERM)
                if not self._done.wait(GRACE_S):
                    os._exit(128 + signal.SIGTERM)
                return

    def __enter__(self) -> ParentWatch:
        if self.active:
            threading.Thread(target=self._watch, name="ratebench-parent-watch", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()

    def exit_if_orphaned(self, code: int) -> None:
        """An orphaned worker has nobody to report to: leave without returning into the launcher's
        machinery (its result pipe is gone)."""
        if self.orphaned.is_set():
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
