"""Give freed tensors back to the operating system in a CPU run (Linux, glibc).

glibc serves an allocation from its heap once it is smaller than a threshold that grows with
every large block freed (up to 32 MiB), and a heap hole between live blocks is never returned.
A CPU training step allocates and frees gigabytes of activations in blocks of a few MiB, so the
resident set of a 5-step `make run` of the 0.5B model reached 20.2 GB while about 15 GB was
live (bench/results/loop.md). A fixed threshold of 1 MiB puts every block from 1 MiB up in its
own mapping, unmapped when freed: the resident set follows what is live. Small blocks stay on
the heap, whose free top is trimmed past 64 MiB.
"""
from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["return_freed_memory", "trim_freed_memory"]

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20
TRIM_THRESHOLD_BYTES = 64 << 20


def return_freed_memory() -> bool:
    """Set glibc's thresholds for this process; False (and nothing done) without glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


def trim_freed_memory() -> bool:
    """Give the free pages of every glibc heap back to the system now (`malloc_trim(0)`), e.g.
    between steps; False (and nothing done) without glibc. Unlike the thresholds above it costs
    no page fault per allocation: freed blocks are reused within a step and returned after it."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        malloc_trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes, malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    malloc_trim(0)
    return True
