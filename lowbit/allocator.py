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


@functools.cache
def _startup_environment() -> dict[str, str]:
    """The environment this process started with — what glibc read its ``MALLOC_*``
    settings from (``/proc/self/environ``; a variable set later in ``os.environ`` changes
    nothing: a review found it reported as the policy). ``os.environ`` where ``/proc`` is
    missing."""
    try:
        with open("/proc/self/environ", "rb") as f:
            raw = f.read()
    except OSError:
        import os

        return dict(os.environ)
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        name = key.decode(errors="replace")
        if sep and name.startswith("glibc.") and "GLIBC_TUNABLES" in out:
            # glibc writes a NUL over each ':' of GLIBC_TUNABLES in the block it read:
            # the later settings follow as items of their own (a review)
            out["GLIBC_TUNABLES"] += ":" + item.decode(errors="replace")
        elif sep:
            out[name] = value.decode(errors="replace")
    return out


def _startup_setting(env: dict[str, str], variable: str, tunable: str) -> int | None:
    """A malloc setting glibc took from the start-up environment: ``GLIBC_TUNABLES``'
    ``glibc.malloc.<tunable>`` (which glibc reads after the ``MALLOC_*`` variables), else
    ``variable``; ``None`` where neither gives an integer."""
    value = env.get(variable)
    for item in env.get("GLIBC_TUNABLES", "").split(":"):
        key, sep, v = item.partition("=")
        if sep and key == f"glibc.malloc.{tunable}":
            value = v
    try:
        return int(value, 0) if value is not None else None
    except ValueError:
        return None


def _environment_keeps_freed() -> bool:
    """Whether the start-up environment set both of :func:`keep_freed_memory`'s settings:
    no ``mmap`` for any block, and a trim threshold at least its ``2**31 − 1`` (a smaller
    one, ``0`` say, still gives freed memory back)."""
    env = _startup_environment()
    mmap_max = _startup_setting(env, "MALLOC_MMAP_MAX_", "mmap_max")
    trim = _startup_setting(env, "MALLOC_TRIM_THRESHOLD_", "trim_threshold")
    return _libc() is not None and mmap_max == 0 and trim is not None and trim >= _TRIM


def policy() -> str:
    """``"keep-freed"`` after a successful :func:`keep_freed_memory` in this process,
    ``"keep-freed (environment)"`` where the environment the process started with set
    both of its settings (:func:`recycles_freed_memory`), else ``"default"``: the label
    benchmarks print beside their numbers."""
    if _state["policy"] == "default" and _environment_keeps_freed():
        return "keep-freed (environment)"
    return _state["policy"]


def recycles_freed_memory() -> bool:
    """Whether large blocks come back from glibc's heap without new page faults: after
    :func:`keep_freed_memory`, or where the environment the process started with (glibc
    reads it then, not later) set ``mmap_max`` to 0 and the trim threshold to at least
    ``2**31 − 1`` — as ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` or the
    same ``GLIBC_TUNABLES`` (``mmap_max`` 0 alone still lets glibc trim freed memory back
    to the system). Then a pool of reused buffers (:mod:`lowbit.kernels.workspace`) has
    nothing to save."""
    return _state["policy"] == "keep-freed" or _environment_keeps_freed()
