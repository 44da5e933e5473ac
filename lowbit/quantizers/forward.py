"""Compatibility: ``quantize_operand`` of the API before formats (tests written against
it). The library quantizes forward operands with one kernel call in
:func:`lowbit.functional.quantize_forward`."""

from __future__ import annotations

import torch

from ..formats import IntFormat, Rounding
from ..kernels import Backend, kernels_for
from .base import Granularity, Identity, QuantizedOperand, sr_seed


def quantize_operand(x2d: torch.Tensor, bits: int, granularity: Granularity,
                     rounding: Rounding = Rounding.NEAREST, generator: torch.Generator | None = None,
                     backend: Backend = Backend.AUTO) -> QuantizedOperand:
    """int8 codes and steps of a 2-D operand on a symmetric ``bits``-bit grid."""
    enc = kernels_for(backend, x2d.device).quantize(x2d, IntFormat(bits), granularity, rounding,
                                                   sr_seed(generator, rounding, x2d.device))
    return QuantizedOperand.of(enc, Identity(x2d.shape[0]))
