"""Keep freed memory in the process instead of handing it back to the OS after every step.

A step allocates and frees the same few-MB tensors over and over (at 256 seeds the reward network's
activations are 3 MB). glibc's malloc returns the top of its heap to the OS whenever more than its trim
threshold is free there, and serves large blocks with fresh mmaps; either way the next step's tensors
land on new pages, and each page costs a minor fault (zero-fill) on first touch: hundreds per eager step and
thousands per reference step at 256 seeds, whose cost bench/RESULTS.md ("Memory") measures. Raising the two
thresholds makes malloc reuse the pages.

Only glibc is touched (elsewhere this is a no-op), and only when the user has not set either threshold
through glibc's own environment: MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or a glibc.malloc.*_threshold
entry of GLIBC_TUNABLES wins (that is the opt-out). The cost: memory freed below the process's peak is kept for reuse
rather than returned, so the resident size stays at the peak of the steps (a few MB above what it
would be; torch itself is most of it).
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest accepted value on 64-bit: blocks below it come from the heap
TRIM_THRESHOLD = 2**30  # free memory at the heap top kept before any is returned to the OS
_OWN_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def thresholds_set_in_environment() -> bool:
    """True when the environment sets glibc's mmap or trim threshold itself (then the user's setting wins)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return (any(name in os.environ for name in _OWN_SETTINGS)
            or any(f"glibc.malloc.{t}_threshold" in tunables for t in ("mmap", "trim")))


@functools.cache  # once per process: later calls return the first call's outcome
def retain_freed_memory() -> str:
    """Set glibc's mmap and trim thresholds for this process; returns what was done, in words."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: allocator left as it is"
    if thresholds_set_in_environment():
        return "malloc thresholds set in the environment: allocator left to them"
    libc = ctypes.CDLL(None)
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "glibc: mmap threshold 32 MiB, trim threshold 1 GiB" if ok else "glibc refused mallopt: allocator left as it is"
