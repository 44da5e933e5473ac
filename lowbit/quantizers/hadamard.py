"""Randomized block Hadamard quantizer (beyond the paper).

Random signs ``±1`` on the rows, then an orthonormal Walsh–Hadamard transform on blocks
of ``b`` consecutive rows (``b`` a power of two: :data:`DEFAULT_BLOCK` = 64 unless the
quantizer is built with another, capped at the next power of two ≥ the row count; rows
are zero-padded to a multiple of ``b``), then per-row stochastic rounding.
The transform is orthogonal and symmetric per block, so ``T⁻¹ = D·H`` inverts it exactly
and the rounding variance is carried back unchanged in total.

It spreads an outlier row over its block. Since rows are the non-summed dimension
(samples on the ∇X path, output features on the ∇W path), the inverse is applied to the
GEMM's output rows and the integer GEMM stays exact.
"""

from __future__ import annotations

import math

import torch

from ..formats import AnyFormat, compute_dtype, parse_format
from ..kernels import Kernels
from .base import GradQuantizer, Granularity, RowTransform, row_absmax

DEFAULT_BLOCK = 64
# float32 blocks whose largest value is below _TINY (float32 BLAS kernels may flush
# subnormal products to zero) or above _HUGE (a sum of b values of up to max/√b each can
# overflow) are transformed in float64, and the transformed operand stays float64.
_TINY = 2.0**-60
_HUGE = 2.0**100


def hadamard_matrix(b: int, device: torch.device | None = None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of order ``b`` (a power of two)."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {b}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


def block_size_for(n_rows: int, block: int) -> int:
    """The block actually used: ``block`` capped at the next power of two ≥ ``n_rows``."""
    return min(block, 1 << max(n_rows - 1, 0).bit_length())


class BlockHadamard(RowTransform):
    def __init__(self, signs: torch.Tensor, n_rows: int, block: int, kernels: Kernels | None = None,
                 h: torch.Tensor | None = None):
        self.signs = signs  # (N_padded,) ±1 float32
        self.n_rows = n_rows
        self.block = block
        self.kernels = kernels
        self.h = hadamard_matrix(block, signs.device) if h is None else h

    def _apply(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        """``H·D x`` (``inverse``: ``D·H x``) block by block, ``D`` the signs, in ``x``'s
        dtype, or in float64 (and returned as float64) for a float32 ``x`` with blocks
        outside [_TINY, _HUGE]. The signs are folded into each block's matrix
        (``H·diag(s_k)``, or its transpose ``diag(s_k)·H``: exact sign flips), so one
        batched GEMM does the block's work; the sums are bitwise those of multiplying by
        the signs apart (negating terms negates a rounded sum exactly)."""
        n, d = x.shape
        blocks = x.reshape(n // self.block, self.block, d)  # (nb, b, D)
        if n and d and x.dtype == torch.float32:
            amax = row_absmax(x, self.kernels).reshape(-1, self.block).amax(dim=1)  # (nb,)
            if bool((((amax > 0) & (amax < _TINY)) | (amax > _HUGE)).any()):
                blocks = blocks.double()
        dt = blocks.dtype
        m = self.h.to(dt) * self.signs.reshape(-1, 1, self.block).to(dt)  # (nb, b, b): H·diag(s_k)
        return torch.matmul(m.transpose(1, 2) if inverse else m, blocks).reshape(n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(compute_dtype(x.dtype))
        pad = self.signs.shape[0] - x.shape[0]
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        return self._apply(x, inverse=False)

    def inverse(self, y: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> torch.Tensor:
        y = y.to(compute_dtype(y.dtype))
        return self._apply(y, inverse=True)[: self.n_rows].to(out_dtype)

    def within_entries(self, rows: int) -> bool:
        """Blocks of ``block`` rows never cross an entry of ``rows`` rows when ``block``
        divides ``rows`` and no rows were padded."""
        return rows > 0 and rows % self.block == 0 and self.signs.shape[0] == self.n_rows

    def entries(self, lo: int, hi: int) -> BlockHadamard:
        if not 0 <= lo <= hi <= self.n_rows:
            raise ValueError(f"rows {lo}:{hi} are not a range within the transform's {self.n_rows} rows")
        if lo % self.block or hi % self.block:
            raise ValueError(f"rows {lo}:{hi} do not start and end on blocks of {self.block} rows")
        return BlockHadamard(self.signs[lo:hi], hi - lo, self.block, self.kernels, self.h)

    def inverse_sq(self, var: torch.Tensor) -> torch.Tensor:
        # Every entry of H is ±1/√b: each output row gets the block's mean variance.
        means = var.reshape(-1, self.block).mean(dim=1, keepdim=True)
        return means.expand(-1, self.block).reshape(-1)[: self.n_rows]


class Hadamard(GradQuantizer):
    name = "hadamard"
    granularity = Granularity.ROW
    mixes_rows = True

    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        hadamard_matrix(block)  # validates the block size
        self.block = block

    def transform(self, a: torch.Tensor, generator: torch.Generator | None,
                  kernels: Kernels | None = None) -> RowTransform:
        n = a.shape[0]
        b = block_size_for(n, self.block)
        n_pad = -(-n // b) * b if n else 0
        # drawn where the generator lives (a CPU generator may serve a CUDA tensor), then moved
        dev = a.device if generator is None else generator.device
        bits = torch.randint(0, 2, (n_pad,), generator=generator, device=dev).to(a.device)
        return BlockHadamard(bits.float() * 2 - 1, n, b, kernels)

    def variance_bound(self, a: torch.Tensor, fmt: AnyFormat | int | str) -> torch.Tensor:
        """Sign-free bound: every entry of block ``k`` after the transform is at most
        ``c_k = max_d ‖A_block_k[:, d]‖₂`` (Cauchy–Schwarz), and so is every range it
        joins (row, tensor or block), so no grid spacing exceeds ``f·c_k`` with ``f`` the
        format's :attr:`~lowbit.formats.Format.spacing_factor` (``1/Q`` on a symmetric
        integer grid): ``Var ≤ Σ_k n_k · D · (f·c_k)² / 4`` with ``n_k`` real rows in block
        ``k`` (up to the scale's one-ulp round-up). 0-d float64; the norms are taken on ``a``
        scaled by a power of two (exact), so squares of extreme values neither underflow
        nor overflow."""
        fmt = parse_format(fmt)
        a = a.double()
        n, d = a.shape
        if n == 0 or d == 0:
            return a.new_zeros(())
        b = block_size_for(n, self.block)
        n_pad = -(-n // b) * b
        x = torch.cat([a, a.new_zeros(n_pad - n, d)]) if n_pad > n else a
        top = x.abs().amax()
        ok = torch.isfinite(top) & (top > 0)  # unit: a power of two in [top/2, top)
        unit = torch.where(ok, torch.exp2(torch.frexp(top)[1].double() - 1), torch.ones_like(top))
        c = (x / unit).reshape(-1, b, d).pow(2).sum(dim=1).sqrt().amax(dim=1) * unit  # (nb,)
        rows = torch.full_like(c, b)
        rows[-1] = n - (c.shape[0] - 1) * b
        return (rows * d * (c * fmt.spacing_factor) ** 2 / 4).sum()
