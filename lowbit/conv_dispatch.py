"""Which kernel a convolution's GEMM may run on (:mod:`lowbit.conv`).

A conv GEMM runs on integer kernels (oneDNN's int8 convolution or ``torch._int_mm`` on
im2col patches) when :func:`integer_path` holds for its operands; otherwise it runs
simulated (dequantized operands, float32 convolution), which ``backend="auto"`` accepts
and ``backend="int8"``/``"fp8"`` refuse with the cause (:func:`refuse_simulated`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from . import grid_notes
from .config import Backend
from .kernels.fp8 import FP8_DTYPES, mixed_codes
from .quantizers import QuantizedOperand


def integer_path(backend: Backend, *ops: QuantizedOperand) -> bool:
    """Whether the conv GEMMs on ``ops`` run on integer kernels: not the reference
    backend, every operand int8 codes with no offset (a zero code is then the value 0,
    so padding and zero insertion are exact) and no block scale, on cpu/cuda."""
    return Backend(backend) is not Backend.REFERENCE and all(
        q.codes.dtype == torch.int8 and q.offset is None and q.block_scale is None
        and q.codes.device.type in ("cpu", "cuda") and q.codes.numel() > 0 for q in ops)


def simulated_cause(backend: Backend, ops: Sequence[QuantizedOperand], cause: str | None = None) -> str:
    """Why a convolution's GEMM on ``ops`` runs simulated: ``cause`` where the caller knows
    it; the reference backend's choice; FP8 codes or backend (no convolution kernel takes
    them); else the first operand that keeps the integer kernels off."""
    be = Backend(backend)
    if cause is not None:
        return cause
    if be is Backend.REFERENCE:
        return grid_notes.REFERENCE
    wrong = next((q.codes.dtype for q in ops if q.codes.dtype != torch.int8), None)
    if be is Backend.INT8 and wrong is not None:  # the format is the first thing to change there
        return f"an operand's codes are {wrong} (format not int8)"
    if any(q.block_scale is not None for q in ops):
        return grid_notes.BLOCK_SCALED
    if any(q.offset is not None for q in ops):
        return "an operand is on an asymmetric grid (an offset: code 0 is not the value 0)"
    mix = mixed_codes(*(q.codes.dtype for q in ops))
    if mix:  # int8 on both would be real: the mix named, not only FP8 (a review)
        return (f"its operands' codes are {mix}: no convolution kernel takes FP8 codes, alone or "
                "beside integer ones (int8 specs on both operands run on the integer kernels)")
    if be is Backend.FP8 or wrong in FP8_DTYPES:
        return "FP8 convolution has no _scaled_mm kernel (lowbit runs it simulated)"
    if wrong is not None:
        return f"an operand's codes are {wrong} (format not int8)"
    device = next((q.codes.device.type for q in ops if q.codes.device.type not in ("cpu", "cuda")), None)
    return f"the operands are on {device}" if device else "no integer kernel takes these operands"


def refuse_simulated(backend: Backend, gemm: str, ops: Sequence[QuantizedOperand],
                     cause: str | None = None) -> None:
    """``backend="int8"``/``"fp8"``: raise ``ValueError`` naming the convolution's ``gemm``
    (``"output"``, ``"∇X"``, ``"∇W"``) and why it cannot run on the backend's kernel, where
    it would otherwise run simulated (``cause`` given by the caller, else read from the
    operands ``ops``: :func:`simulated_cause`); other backends, and empty operands, pass.
    FP8 convolutions have no ``torch._scaled_mm`` kernel in :mod:`lowbit.kernels`'s table."""
    be = Backend(backend)
    if be not in (Backend.INT8, Backend.FP8) or any(q.codes.numel() == 0 for q in ops):
        return
    kernel = "torch._scaled_mm" if be is Backend.FP8 else \
        "integer kernels (oneDNN int8 convolution or torch._int_mm)"
    raise ValueError(f"backend={be.value!r} cannot compute this GEMM (the convolution's {gemm}) on "
                     f"{kernel}: {simulated_cause(be, ops, cause)}; use backend='auto' (simulated there)")


@contextlib.contextmanager
def run_simulated(backend: Backend, gemm: str, ops: Sequence[QuantizedOperand],
                  cause: str | None = None) -> Iterator[None]:
    """Around a convolution's simulated GEMM: :func:`refuse_simulated` first, then the
    GEMM inside, its reason told to a running coverage trace (:mod:`lowbit.grid_notes`)."""
    refuse_simulated(backend, gemm, ops, cause)
    with grid_notes.simulating(lambda: simulated_cause(backend, ops, cause)):
        yield
