"""Kernels and the dispatcher that picks one.

``reference`` (plain eager torch, float32 — float64 for float64 inputs) defines the
semantics; ``compiled`` runs the same functions fused by ``torch.compile`` (never under
``Backend.REFERENCE``); ``int8`` (``torch._int_mm``) computes the GEMM
exactly in integers when the scales allow it. Every path gives the reference's result up
to float rounding, on the same random stream.
"""

from __future__ import annotations

import enum

import torch
from torch.profiler import record_function

from ..formats import compute_dtype, grid_step
from . import compiled, int8, reference


class Backend(enum.Enum):
    """Which kernels run. ``AUTO``: the fastest path that computes the same estimator
    (integer GEMMs, compiled quantizers); ``REFERENCE``: plain torch, simulated GEMMs;
    ``INT8``: like AUTO but an error where the integer GEMM cannot be used."""

    AUTO = "auto"
    REFERENCE = "reference"
    INT8 = "int8"


def quantize_codes(
    x: torch.Tensor, qmax: int, per_row: bool, stochastic: bool, seed: torch.Tensor,
    backend: Backend = Backend.AUTO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and steps of a 2-D operand (see :func:`reference.quantize_codes`)."""
    if x.numel() == 0:  # nothing to scale: step 0, as for an all-zero group
        rows = x.shape[0] if per_row else 1
        return torch.zeros(x.shape, dtype=torch.int8, device=x.device), torch.zeros(
            rows, 1, dtype=compute_dtype(x.dtype), device=x.device)
    with record_function("lowbit::quantize"):
        if backend is not Backend.REFERENCE and compiled.use_for(x):
            return compiled.quantize_codes(x, qmax, per_row, stochastic, seed)
        return reference.quantize_codes(x, qmax, per_row, stochastic, seed)


def quantize_codes_fixed(
    x: torch.Tensor, amax: torch.Tensor, qmax: int, stochastic: bool, seed: torch.Tensor,
    backend: Backend = Backend.AUTO,
) -> tuple[torch.Tensor, ...]:
    """Codes on a grid fixed ahead of time, plus overflow accounting (see
    :func:`reference.quantize_codes_fixed`)."""
    if x.numel() == 0:
        dt = compute_dtype(x.dtype)
        zero = torch.zeros((), dtype=dt, device=x.device)
        return (torch.zeros(x.shape, dtype=torch.int8, device=x.device),
                grid_step(amax.to(dt), qmax), torch.zeros_like(amax, dtype=dt), zero.long(),
                zero, zero)
    with record_function("lowbit::quantize"):
        if backend is not Backend.REFERENCE and compiled.use_for(x):
            return compiled.quantize_codes_fixed(x, amax, qmax, stochastic, seed)
        return reference.quantize_codes_fixed(x, amax, qmax, stochastic, seed)


def int8_applicable(a_codes: torch.Tensor, b_codes: torch.Tensor, b_step: torch.Tensor) -> bool:
    """The integer path computes the same estimator when ``b``'s scale is not on the
    summed dimension (shape (1, 1) or (1, N)) and the shapes suit ``_int_mm``."""
    m, k = a_codes.shape
    n = b_codes.shape[1]
    return (
        a_codes.dtype == torch.int8
        and b_codes.dtype == torch.int8
        and b_step.shape[0] == 1
        and int8.available(a_codes.device)
        and int8.shape_ok(m, k, n, a_codes.device)
    )


def scaled_mm(
    a_codes: torch.Tensor,
    a_step: torch.Tensor,
    b_codes: torch.Tensor,
    b_step: torch.Tensor,
    backend: Backend = Backend.AUTO,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(a_codes·a_step) @ (b_codes·b_step) + bias`` by the fastest path that computes
    it, returned as ``out_dtype`` (bias add and cast fused into the epilogue).

    ``a_step`` is (1, 1) or (M, 1); ``b_step`` is (1, 1), (1, N) or (K, 1) — the last
    only on the reference path. ``Backend.INT8`` raises if the integer path cannot
    compute this product; ``AUTO`` then uses the reference GEMM (the same estimator).
    """
    if backend is not Backend.REFERENCE and int8_applicable(a_codes, b_codes, b_step):
        with record_function("lowbit::gemm"):
            acc = int8.int_mm(a_codes, b_codes)
        with record_function("lowbit::epilogue"):
            if compiled.use_for(acc):
                return compiled.dequantize_acc(acc, a_step, b_step, bias, out_dtype)
            return reference.dequantize_acc(acc, a_step, b_step, bias, out_dtype)
    if backend is Backend.INT8:
        raise ValueError(
            "backend='int8' cannot compute this GEMM: it needs int8 codes, scales on "
            f"non-summed dimensions and suitable shapes; got a {tuple(a_codes.shape)} "
            f"{a_codes.dtype}, b {tuple(b_codes.shape)} {b_codes.dtype}, b_step {tuple(b_step.shape)}"
        )
    with record_function("lowbit::gemm"):
        return reference.scaled_mm(a_codes, a_step, b_codes, b_step, bias, out_dtype)


__all__ = ["Backend", "int8_applicable", "quantize_codes", "quantize_codes_fixed", "scaled_mm"]
