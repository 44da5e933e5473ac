"""GEMM kernels and the dispatcher that picks one.

``reference`` (pure torch, float32) defines the semantics; ``int8`` (``torch._int_mm``)
computes the same product exactly in integers when the scales allow it.
"""

from __future__ import annotations

import torch

from ..config import Backend
from . import int8, reference


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
) -> torch.Tensor:
    """``(a_codes·a_step) @ (b_codes·b_step)`` by the fastest path that computes it.

    ``a_step`` is (1, 1) or (M, 1); ``b_step`` is (1, 1), (1, N) or (K, 1) — the last
    only on the reference path. ``Backend.INT8`` raises if the integer path cannot
    compute this product; ``AUTO`` falls back to the reference silently (by design:
    the fallback is the same estimator).
    """
    if backend is not Backend.REFERENCE and int8_applicable(a_codes, b_codes, b_step):
        return int8.scaled_mm(a_codes, a_step, b_codes, b_step)
    if backend is Backend.INT8:
        raise ValueError(
            "backend='int8' cannot compute this GEMM: it needs int8 codes, scales on "
            f"non-summed dimensions and suitable shapes; got a {tuple(a_codes.shape)} "
            f"{a_codes.dtype}, b {tuple(b_codes.shape)} {b_codes.dtype}, b_step {tuple(b_step.shape)}"
        )
    return reference.scaled_mm(a_codes, a_step, b_codes, b_step)


__all__ = ["int8_applicable", "scaled_mm"]
