"""Which grid a tensor of codes holds, told to the GEMM tracers running now.

A GEMM's int8 operand may hold the codes of any integer grid from int2 to int8 (``int4``,
an asymmetric ``int5a``…), and an FP8 one the elements of an MX or NVFP4 format: the
storage dtype does not say which. Where lowbit makes codes, it calls :func:`note` with the
format; a :class:`lowbit.gemm_trace.GemmTracer` that is tracing (``lowbit.coverage``)
records it, carries it through the aten ops that copy or reshape codes, and reports the
grid of each GEMM operand. Where lowbit runs a GEMM simulated (dequantized codes in a float
GEMM), it says why inside :func:`simulating`, and the trace gives that reason on the row.
With no tracer running, each of these is one list check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch


class Listener(Protocol):
    def note_grid(self, codes: torch.Tensor, name: str) -> None: ...

    def grid_of(self, t: torch.Tensor) -> str | None: ...


LISTENERS: list[Listener] = []  # tracers tracing now (GemmTracer.tracing adds and removes itself)
REASONS: list[str] = []  # why the GEMMs running now are simulated, innermost last (while tracing)
REFERENCE = "backend='reference': lowbit's reference path (dequantized codes in a float GEMM)"
# why a GEMM of a block format runs simulated, in coverage and traces (a new user's trial:
# MXFP4/NVFP4 GEMMs were said to find "no fp8 kernel", as if an FP8 kernel were missing)
BLOCK_SCALED = ("an operand has block scales (a block format: MX, NVFP4), and lowbit has no "
                "block-scaled GEMM kernel: emulated exactly (dequantized codes in a float GEMM)")


def note(codes: torch.Tensor, fmt: Any) -> None:
    """``codes`` hold codes on ``fmt``'s grid (a :class:`lowbit.formats.Format`, named by
    its ``name``: ``int4``, ``int8a``, ``fp8_e4m3``, ``mxfp8_e4m3``…)."""
    if LISTENERS:
        for listener in LISTENERS:
            listener.note_grid(codes, fmt.name)


def derived(out: torch.Tensor, src: torch.Tensor) -> None:
    """``out`` holds ``src``'s codes, moved by a kernel the tracer does not see (a C
    kernel placing codes channels-last): the same grid."""
    if LISTENERS:
        for listener in LISTENERS:
            name = listener.grid_of(src)
            if name is not None:
                listener.note_grid(out, name)


@contextlib.contextmanager
def simulating(why: Callable[[], str]) -> Iterator[None]:
    """The GEMMs inside run simulated for the reason ``why()`` returns (called only while a
    trace listens): a user can act on it (``backend='reference'``, an asymmetric grid, a
    block format, a kernel the device lacks)."""
    if not LISTENERS:
        yield
        return
    REASONS.append(why())
    try:
        yield
    finally:
        REASONS.pop()
