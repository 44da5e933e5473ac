"""Forward quantizer ``Q_f`` for weights and activations.

Round-to-nearest on a symmetric ``bits``-bit grid, one scale per tensor or per row (per
output channel for a weight, per sample/token for an activation); the backward treats
it as the identity (straight-through estimator: the grid covers ``[-absmax, absmax]``, so
nothing is clipped).
"""

from __future__ import annotations

import torch

from ..formats import IntFormat, Rounding, uniform_noise
from .base import Granularity, Identity, QuantizedRows, absmax


def quantize_operand(
    x2d: torch.Tensor,
    bits: int,
    granularity: Granularity,
    rounding: Rounding = Rounding.NEAREST,
    generator: torch.Generator | None = None,
) -> QuantizedRows:
    """int8 codes and steps of a 2-D operand (weights: (out, in); activations: (N, in))."""
    fmt = IntFormat(bits)
    x = x2d.float()
    amax = absmax(x, granularity)
    noise = uniform_noise(x.shape, x.device, generator) if rounding is Rounding.STOCHASTIC else None
    codes = fmt.codes(x, amax, rounding, noise).to(torch.int8)
    return QuantizedRows(codes, fmt.scale_from_absmax(amax), Identity(x.shape[0]))
