"""Profiler scopes of lowbit's work (``lowbit::quantize``, ``lowbit::gemm``, …): the labels
``benchmarks/profile_step.py`` and ``benchmarks/bench_step.py`` group a step's time by.

:func:`scope` is ``torch.profiler.record_function`` while a profiler records (and under
``torch.compile``, as before), and a shared no-op context otherwise: entering a
``record_function`` is an op call, ≈ 3–5 µs with no profiler running (measured on the
project's CPU machine), and one CNN training step enters ≈ 430 of them.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.profiler import record_function

__all__ = ["recorded", "scope"]

_recording = torch._C._autograd._profiler_enabled
_NOTHING = contextlib.nullcontext()
_forced = [0]  # open recorded() blocks
_lock = threading.Lock()


def scope(name: str) -> Any:
    """A context manager labelling the work inside it ``name`` in a profile: a
    ``record_function(name)`` while a profiler records or a :func:`recorded` block is open,
    else a no-op. Under ``torch.compile`` it is ``record_function`` as before (dynamo drops
    the label without a graph break; the profiler check itself is a call dynamo cannot
    trace, hence ``is_compiling()`` first)."""
    if torch.compiler.is_compiling() or _forced[0] or _recording():
        return record_function(name)
    return _NOTHING


@contextlib.contextmanager
def recorded() -> Iterator[None]:
    """Every :func:`scope` inside is a ``record_function``, profiler or not: a dispatch
    mode that reads the scopes' ops (:class:`lowbit.gemm_trace.GemmTracer`) sees them.
    Process-wide (autograd may run the backward in other threads), counted under a lock."""
    with _lock:
        _forced[0] += 1
    try:
        yield
    finally:
        with _lock:
            _forced[0] -= 1
