"""Float element types as a table read by the kernels (:data:`ELEMENTS`: E4M3, E5M2,
E2M1) and exact powers of two (:func:`pow2`) built from exponent bits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

@dataclass(frozen=True)
class Element:
    """A float element type: ``man_bits`` mantissa bits, smallest normal ``2^emin``,
    largest finite value ``max``, stored exactly in ``dtype``."""

    name: str
    man_bits: int
    emin: int
    max: float
    dtype: torch.dtype

    @property
    def bits(self) -> int:
        """Storage bits of one element: sign + exponent + mantissa."""
        return {"e4m3": 8, "e5m2": 8, "e2m1": 4}[self.name]

    @property
    def top_exp(self) -> int:
        """``⌊log2 max⌋``: the binade of the largest value."""
        return math.frexp(self.max)[1] - 1

    @property
    def max_spacing(self) -> float:
        """Grid spacing in the top binade, ``2^(top_exp − man_bits)``."""
        return 2.0 ** (self.top_exp - self.man_bits)

    def spacing_exp(self, a: torch.Tensor) -> torch.Tensor:
        """``k = max(⌊log2 a⌋, emin) − man_bits`` at magnitudes ``a ≥ 0`` (an int tensor):
        the grid spacing there is ``2^k``. Read from the exponent bits of float32/float64
        ``a`` (subnormal ``a`` falls under ``emin`` anyway), so a compiled kernel fuses it."""
        if a.dtype in _BITS:
            it, shift, mask, bias = _BITS[a.dtype]
            e = ((a.view(it) >> shift) & mask) - bias
        else:
            e = torch.frexp(a)[1] - 1  # a = f·2^(e+1), f ∈ [0.5, 1)
        return e.clamp_min(self.emin) - self.man_bits

    def spacing(self, a: torch.Tensor) -> torch.Tensor:
        """Grid spacing ``2^(max(⌊log2 a⌋, emin) − man_bits)`` at magnitudes ``a ≥ 0``
        (exact powers of two in ``a``'s dtype; some power of two at ``a = 0``)."""
        return pow2(self.spacing_exp(a), a.dtype)


# float dtype -> (int view, mantissa bits, exponent mask, exponent bias)
_BITS = {torch.float32: (torch.int32, 23, 0xFF, 127), torch.float64: (torch.int64, 52, 0x7FF, 1023)}


def pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2^k`` for integer ``k`` in the normal exponent range of ``dtype`` (exact)."""
    if dtype in _BITS:
        it, shift, _, bias = _BITS[dtype]
        return ((k.to(it) + bias) << shift).view(dtype)
    return torch.exp2(k.to(dtype))


ELEMENTS: dict[str, Element] = {
    "e4m3": Element("e4m3", 3, -6, 448.0, torch.float8_e4m3fn),
    "e5m2": Element("e5m2", 2, -14, 57344.0, torch.float8_e5m2),
    # E2M1 values {0, .5, 1, 1.5, 2, 3, 4, 6} are E4M3 values: stored as float8_e4m3fn.
    "e2m1": Element("e2m1", 1, 0, 6.0, torch.float8_e4m3fn),
}
