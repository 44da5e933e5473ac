"""What a quantization kernel returns: codes on a format plus their scales.

``x̂ = codes · block_scale · scale + offset`` (see :mod:`lowbit.formats`): ``codes``
(R, C) int8 (integer grids) or float8 (float elements); ``scale`` one per row (R, 1) or
per tensor (1, 1), in the compute dtype; ``offset`` like ``scale`` (asymmetric grids) or
None; ``block_scale`` one per ``block`` consecutive elements along ``block_dim`` (block
formats) or None. :meth:`Encoded.t` transposes all of it (a scale per row becomes one per
column), so a GEMM's right operand ``Wᵀ`` is ``encode(W).t()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from . import Kernels


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
               block_scale: torch.Tensor | None, block: int, block_dim: int,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``codes · block_scale · scale + offset`` as ``out_dtype``, computed in the scale's
    dtype (float64 where either is): exact for power-of-two block scales, then one
    rounding per multiply/add. The reference kernel of ``Encoded.dequantize``."""
    dt = torch.promote_types(scale.dtype, out_dtype)
    v = codes.to(dt)
    if block_scale is not None:
        r, c = v.shape
        bs = block_scale.to(dt).repeat_interleave(block, dim=block_dim)
        v = v * (bs[:, :c] if block_dim == 1 else bs[:r, :])
    v = v * scale
    if offset is not None:
        v = v + offset
    return v.to(out_dtype)


@dataclass
class Encoded:
    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None
    block_scale: torch.Tensor | None = None
    block: int = 0
    block_dim: int = 1
    kernels: Kernels | None = None  # of the call that made it (None: reference dequantize)

    @property
    def plain(self) -> bool:
        """``x̂ = codes · scale`` (no offset, no block scales): what a scaled GEMM takes."""
        return self.offset is None and self.block_scale is None

    def t(self) -> Encoded:
        """The transposed operand (views, no copy)."""
        def tr(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else v.t()
        return Encoded(self.codes.t(), self.scale.t(), tr(self.offset), tr(self.block_scale),
                       self.block, 1 - self.block_dim, self.kernels)

    def dequantize(self, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``x̂`` as ``out_dtype`` (:func:`dequantize`), by the fused kernel where the
        call's kernels allow it (same arithmetic)."""
        args = (self.codes, self.scale, self.offset, self.block_scale, self.block,
                self.block_dim, out_dtype)
        return dequantize(*args) if self.kernels is None else self.kernels.run("dequantize", *args)


__all__ = ["Encoded", "dequantize"]
