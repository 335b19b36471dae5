"""Process settings that make training on a CPU fast. They hold for the whole process and are
never undone: ``quietstar train`` applies them on a CPU run, Python's ``train()`` only when asked
(``train(config, tune_cpu=True)``); the benchmarks apply ``keep_freed_memory`` to both sides of
every comparison."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import torch

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD_MAX = 32 * 2 ** 20  # glibc's ceiling on 64-bit systems


def tune_for_training() -> dict[str, bool]:
    """Applies both settings below; returns which took effect."""
    torch.set_flush_denormal(True)
    return {"flush_denormal": True, "keep_freed_memory": keep_freed_memory()}


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the system.

    A training step keeps every pass's activations alive until its backward, so the heap grows
    by hundreds of MiB and shrinks again every step; by default glibc hands that memory back
    and takes it again on the next step, page fault by page fault (measured: 10-15% of a CPU
    step). Tensors up to 32 MiB then come from the kept heap. The GPU's caching allocator
    does the same for CUDA memory. No-op (returns False) where the C library is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    ok &= mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)
    ok &= mallopt(_M_TOP_PAD, 64 * 2 ** 20)
    return bool(ok)
