"""Forward quantizer ``Q_f`` for weights and activations.

Round-to-nearest on a symmetric ``bits``-bit grid, one scale per tensor or per row (per
output channel for a weight, per sample/token for an activation); the backward treats
it as the identity (straight-through estimator: the grid covers ``[-absmax, absmax]``, so
nothing is clipped).
"""

from __future__ import annotations

import torch

from ..formats import IntFormat, Rounding
from ..kernels import Backend
from .base import Granularity, Identity, QuantizedRows, quantize_rows


def quantize_operand(
    x2d: torch.Tensor,
    bits: int,
    granularity: Granularity,
    rounding: Rounding = Rounding.NEAREST,
    generator: torch.Generator | None = None,
    backend: Backend = Backend.AUTO,
) -> QuantizedRows:
    """int8 codes and steps of a 2-D operand (weights: (out, in); activations: (N, in))."""
    codes, step = quantize_rows(x2d, IntFormat(bits), granularity, rounding, generator, backend)
    return QuantizedRows(codes, step, Identity(x2d.shape[0]))
