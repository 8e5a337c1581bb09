"""Compiled steps: plain C files of the package, built with the machine's C compiler on first use.

A fast step in plain C (no torch headers) builds in about 2 s, where a torch C++ extension took
52 s and torch.compile 56 s here (docs/fast.md). The shared library is cached under the F-hat* cache folder
(RATEBENCH_CACHE, else ~/.cache/ratebench) in `kernels/`, keyed by the source, the compiler's version, the
flags and the CPU, so an edited source or another machine never loads a stale build. Parallel jobs may build
at once: each writes its own temporary file and renames it into place. `start_build` starts a build in the
background (a job does so before it solves F-hat*), and `load` waits for it rather than building again.

Without a compiler, or when the build fails, `load` warns once and returns None: the caller takes its eager
torch fast path, which computes the same step (tests/test_fast.py holds both to the reference).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from ratebench.core.cache import cache_dir

FLAGS = ["-O3", "-march=native", "-std=c99", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=off", "-pthread"]
# -march=native: this CPU's vector width (the build is keyed by the CPU); -ffp-contract=off: a product is fused into
# a multiply-add only where the C source says fma(), never at the compiler's choice (which differs between inlined
# copies of one loop), so two loops written to sum the same terms in the same order give the same bits on any compiler
# (bilevel_step.c's per-seed and vector-lane passes); never -ffast-math: NaN must survive (a diverged seed is found by
# its NaN) and sums must not be reordered behind our back; -pthread: a segment of steps splits its seeds across threads
DISABLE = "RATEBENCH_KERNELS"  # =0: never build or load a kernel (every fast step takes its eager path)
BUILD_SECONDS: dict[str, float] = {}  # source file name -> seconds its last build took in this process (0: from the cache)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one): the default thread count of the
    compiled kernels (the harness's step_threads, psi_gap's Newton)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cpu() -> str:
    """The CPU's model and instruction-set flags: a -march=native build must never load on a CPU without its
    instructions (a home folder shared by a cluster's nodes shares the cache)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags") and key not in found:
                    found[key] = line
                if len(found) == 2:
                    break
    except OSError:
        pass
    return "".join(found.values()) or platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


_IN_SCRATCH = 'TMPDIR="$0" "$@"; status=$?; rm -rf "$0"; exit $status'  # sh -c: the compiler with TMPDIR=$0, then $0 gone


class _Build:
    """One compiler process writing a temporary file beside its target (renamed into place when it succeeds)."""

    def __init__(self, cc: str, flags: list[str], source: Path, target: Path):
        if shutil.which(cc) is None:  # as Popen would say of it: the shell below would start and report it later
            raise FileNotFoundError(f"no such compiler: {cc}")
        self.target, self.tic = target, time.perf_counter()
        fd, self.tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        # its messages go to a file, not a pipe: nobody reads a pipe until load() waits, and a full one would stop the
        # compiler there; a session of its own: abandon() stops the driver and the passes it started (cc1, as, ld)
        self.messages = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by finish or abandon)
        # its passes' intermediate files (cc1's .s, as's .o) in a folder of its own: a pass killed by abandon() would
        # leave its file in the system's temporary folder. The folder goes with the build (_clean), and a shell in the
        # compiler's session removes it when the compiler ends: so also when this process is killed outright
        self.scratch = tempfile.mkdtemp(prefix="ratebench-cc-")
        try:
            self.process = subprocess.Popen(["/bin/sh", "-c", _IN_SCRATCH, self.scratch,
                                             cc, *flags, "-o", self.tmp, str(source), "-lm"],
                                            stdout=subprocess.DEVNULL, stderr=self.messages, start_new_session=True)
        except OSError:  # the compiler cannot start: nothing half-built is left in the cache folder
            self._clean()
            raise

    def _clean(self) -> None:
        self.messages.close()
        shutil.rmtree(self.scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)

    def finish(self) -> float:
        """Wait for the compiler; the target in place (or RuntimeError with its messages): the build's seconds."""
        try:
            self.process.wait(timeout=max(1.0, 300 - (time.perf_counter() - self.tic)))
        except subprocess.TimeoutExpired:
            self.abandon()
            raise
        self.messages.seek(0)
        messages = self.messages.read()
        if self.process.returncode == 0:
            os.replace(self.tmp, self.target)  # atomic: a parallel build of the same key writes the same bytes
        self._clean()
        if self.process.returncode != 0:
            raise RuntimeError(messages.strip()[-2000:])
        return time.perf_counter() - self.tic

    def abandon(self) -> None:
        """Stop the compiler and remove its temporary file (a build nobody waited for when the process ends)."""
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self._clean()


STARTED: dict[Path, _Build] = {}  # target -> its build started by start_build, until load() waits for it
ATTEMPTED: set[Path] = set()  # targets load() has built or tried to in this process: start_build leaves them alone


@functools.cache
def _version(cc: str) -> str:
    """The compiler's `--version` text (part of a build's key), asked once per compiler per process."""
    return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30, check=False).stdout


def _plan(source: Path, optimise: str, extra: tuple[str, ...]) -> tuple[str, list[str], Path] | None:
    """(compiler, flags, the cached library's path) of a build, or None without a compiler."""
    cc = _compiler()
    if cc is None:
        return None
    version = _version(cc)
    flags = [*(optimise if flag == "-O3" else flag for flag in FLAGS), *extra]
    key = hashlib.sha256("\0".join([source.read_text(), version, *flags, platform.machine(), _cpu()]).encode())
    folder = cache_dir(None) / "kernels"
    folder.mkdir(parents=True, exist_ok=True)
    return cc, flags, folder / f"{source.stem}-{key.hexdigest()[:16]}.so"


def start_build(source: Path, optimise: str = "-O3", extra: tuple[str, ...] = ()) -> bool:
    """Start building what load(source, optimise, extra) will load, in a compiler process of its own, when it is
    neither cached nor started: a job's set-up (F-hat*, an instance's tables) then runs while the compiler does, and
    load() waits for this build instead of starting one. Never raises and never warns: what fails is load()'s to
    report, when it waits for the build. True if a build started."""
    if os.environ.get(DISABLE, "1") == "0":
        return False
    try:
        plan = _plan(source, optimise, extra)
        if plan is None or plan[2].exists() or plan[2] in STARTED or plan[2] in ATTEMPTED:
            return False
        STARTED[plan[2]] = _Build(*plan[:2], source, plan[2])
        return True
    except (OSError, subprocess.SubprocessError):
        return False


@atexit.register
def _abandon_started() -> None:
    for build in STARTED.values():
        build.abandon()
    STARTED.clear()


os.register_at_fork(after_in_child=lambda: STARTED.clear())  # a forked child leaves its parent's compilers to the parent


@functools.cache
def load(source: Path, optimise: str = "-O3", extra: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The shared library built from the C file `source` (package data beside the module that calls it), or None
    (warned once). `optimise` replaces FLAGS' -O3; `extra` flags go after FLAGS (a later -march wins; tests build
    other lane widths and instruction sets so); both are part of the cache key. A build that start_build began is
    waited for (its failure is reported like a build's here)."""
    if os.environ.get(DISABLE, "1") == "0":
        return None
    source_name = source.name
    try:
        plan = _plan(source, optimise, extra)
        if plan is None:
            warnings.warn(f"no C compiler (cc, gcc or $CC): {source_name} not built; the eager fast path runs",
                          stacklevel=2)
            return None
        cc, flags, target = plan
        ATTEMPTED.add(target)
        started = STARTED.pop(target, None)
        if target.exists():
            if started is not None:
                started.abandon()  # another process put the same build in place meanwhile
            BUILD_SECONDS[source_name] = 0.0
        else:
            BUILD_SECONDS[source_name] = (started or _Build(cc, flags, source, target)).finish()
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"could not build {source_name} ({exc}); the eager fast path runs", stacklevel=2)
        return None
