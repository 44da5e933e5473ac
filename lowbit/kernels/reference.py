"""Reference GEMM: dequantize both operands, multiply in float32.

This defines the semantics every fast path must reproduce (to float rounding).
"""

from __future__ import annotations

import torch


def scaled_mm(
    a_codes: torch.Tensor, a_step: torch.Tensor, b_codes: torch.Tensor, b_step: torch.Tensor
) -> torch.Tensor:
    """``(a_codes·a_step) @ (b_codes·b_step)`` in float32. Steps broadcast against their
    operand: (1, 1), (rows, 1) or (1, cols)."""
    return (a_codes.float() * a_step) @ (b_codes.float() * b_step)
