"""Compiled steps: plain C files of the package, built with the machine's C compiler on first use.

A fast step in plain C (no torch headers) builds in about 2 s, where a torch C++ extension took
52 s and torch.compile 56 s here (docs/fast.md). The shared library is cached under the F-hat* cache folder
(RATEBENCH_CACHE, else ~/.cache/ratebench) in `kernels/`, keyed by the source, the compiler's version, the
flags and the CPU, so an edited source or another machine never loads a stale build. Parallel jobs may build
at once: each writes its own temporary file and renames it into place.

Without a compiler, or when the build fails, `load` warns once and returns None: the caller takes its eager
torch fast path, which computes the same step (tests/test_fast.py holds both to the reference).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
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


@functools.cache
def load(source: Path, optimise: str = "-O3", extra: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The shared library built from the C file `source` (package data beside the module that calls it), or None
    (warned once). `optimise` replaces FLAGS' -O3; `extra` flags go after FLAGS (a later -march wins; tests build
    other lane widths and instruction sets so); both are part of the cache key."""
    if os.environ.get(DISABLE, "1") == "0":
        return None
    source_name = source.name
    cc = _compiler()
    if cc is None:
        warnings.warn(f"no C compiler (cc, gcc or $CC): {source_name} not built; the eager fast path runs", stacklevel=2)
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        flags = [*(optimise if flag == "-O3" else flag for flag in FLAGS), *extra]
        key = hashlib.sha256("\0".join([source.read_text(), version, *flags, platform.machine(), _cpu()]).encode())
        folder = cache_dir(None) / "kernels"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{source.stem}-{key.hexdigest()[:16]}.so"
        if not target.exists():
            tic = time.perf_counter()
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
            os.close(fd)
            done = subprocess.run([cc, *flags, "-o", tmp, str(source), "-lm"], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                os.unlink(tmp)
                raise RuntimeError(done.stderr.strip()[-2000:])
            os.replace(tmp, target)  # atomic: a parallel build of the same key writes the same bytes
            BUILD_SECONDS[source_name] = time.perf_counter() - tic
        else:
            BUILD_SECONDS[source_name] = 0.0
        return ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"could not build {source_name} ({exc}); the eager fast path runs", stacklevel=2)
        return None
