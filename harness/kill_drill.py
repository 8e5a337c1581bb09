"""A job SIGKILLed at a chosen moment, as a crash or an OOM killer would stop it: the drill behind the
kill/resume test (tests/test_segments.py) and its 10^7-step benchmark (bench/test_bench_segments.py)."""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def run_and_kill(cfg, out_dir: Path, after_s: float) -> bool:
    """Start `run_job(cfg, out_dir)` in a forked child, SIGKILL it after `after_s` seconds and reap it.
    True when the kill landed (the job had not finished by then). The child never returns to the caller."""
    from ratebench.runner import run_job

    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            sys.stdout = sys.stderr = open(os.devnull, "w")
            run_job(cfg, out_dir)
            code = 0
        finally:
            os._exit(code)
    time.sleep(after_s)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == -signal.SIGKILL
