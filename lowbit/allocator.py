"""The C allocator's policy for large blocks, which sets what a CPU step's big tensors cost.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a block of more
than ``M_MMAP_THRESHOLD`` bytes (dynamic, at most 32 MiB on 64-bit Linux) with a fresh
``mmap`` and gives it back with ``munmap`` when freed, so every such tensor of every step
pays one page fault per 4 KiB page on first touch. A float32 activation of 2048 × 4096
(32 MiB) is just over that line; the same tensor in bf16 is under it and is recycled from
the heap. Measured on the project's AMD EPYC machine (2 threads, torch 2.13.0+cpu;
``benchmarks/bench_step.py``): ``F.gelu`` on a 2048 × 4096 float32 tensor takes 12.8 ms
with glibc's defaults and 2.6 ms with :func:`keep_freed_memory` (bf16: 1.3 ms either way) —
the fault cost, not the arithmetic. The fully quantized step keeps float32 activations
between its integer GEMMs, so it pays that toll where a bf16 step does not.

:func:`keep_freed_memory` tells glibc to serve every block from its heap
(``mallopt(M_MMAP_MAX, 0)``) and to keep freed memory instead of trimming it back to the
system (``mallopt(M_TRIM_THRESHOLD, 2**31 - 1)``) — the same policy as PyTorch's CUDA
caching allocator, and the effect PyTorch's CPU performance-tuning guide gets by
preloading tcmalloc or jemalloc. The cost: the process's resident memory stays at its
peak; memory is reused, not returned. It is process-wide, so lowbit never calls it on
import: benchmarks call it (their ``--malloc default`` turns it off) and users may.
The same policy without code: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``
in the environment before Python starts.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["keep_freed_memory", "policy", "recycles_freed_memory"]

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM = 2**31 - 1  # mallopt takes an int

_state = {"policy": "default"}


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None on a C library without ``mallopt`` (musl, macOS, Windows)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Serve every ``malloc`` block from glibc's heap and keep freed memory for reuse.

    Returns True when glibc accepted both settings, False where the C library is not
    glibc (nothing is changed there). Process-wide and not undone; idempotent. The
    module docstring gives the measured effect and the cost (resident memory stays at
    its peak)."""
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _TRIM))
    if ok:
        _state["policy"] = "keep-freed"
    return ok


def policy() -> str:
    """``"keep-freed"`` after a successful :func:`keep_freed_memory` in this process (or
    with ``MALLOC_MMAP_MAX_=0`` in the environment), else ``"default"``: the label
    benchmarks print beside their numbers."""
    import os

    if _state["policy"] == "default" and os.environ.get("MALLOC_MMAP_MAX_") == "0":
        return "keep-freed (environment)"
    return _state["policy"]


def recycles_freed_memory() -> bool:
    """Whether large blocks come back from glibc's heap without new page faults: after
    :func:`keep_freed_memory`, or with both of its environment settings (``MALLOC_MMAP_MAX_=0``
    alone still lets glibc trim freed memory back to the system). Then a pool of reused
    buffers (:mod:`lowbit.kernels.workspace`) has nothing to save."""
    import os

    if _state["policy"] == "keep-freed":
        return True
    return os.environ.get("MALLOC_MMAP_MAX_") == "0" and "MALLOC_TRIM_THRESHOLD_" in os.environ
