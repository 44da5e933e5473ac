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

The arithmetic (the reference, :func:`_forward` and :func:`_inverse`; the AVX-512 kernels
of :mod:`lowbit.kernels.avx512` compute the same floats): ``T x`` multiplies each row by
``s_r·c`` (``c`` = ``1/√b`` rounded to the compute dtype: exact for ``b`` a power of four,
as 64), then runs the ``log₂ b`` butterfly stages of the fast Walsh–Hadamard transform
(:func:`fwht`: rows ``j`` and ``j + h`` of each ``2h`` rows become their sum and difference,
``h = 1, 2, …, b/2``): ``b·log₂ b`` additions per column of a block instead of the ``b²``
multiply-adds of a matrix product (the product is the Sylvester matrix
:func:`hadamard_matrix`, up to float rounding). ``T⁻¹ y`` multiplies by ``c``, runs the
butterflies, then multiplies by the signs. A float32 operand with a block whose largest
magnitude is above :data:`_HUGE` (Inf included: a sum of ``b`` values could overflow) or
in ``(0, _TINY)`` (``c·x`` would round subnormal values, and the quantizer's unbiasedness
would be lost to it) is transformed in float64 and stays float64.
"""

from __future__ import annotations

import math

import torch

from ..formats import AnyFormat, Format, Granularity, Rounding, compute_dtype, parse_format
from ..kernels import Impl, Kernels, avx512, kernels_for, reference, register
from ..kernels.encoded import Encoded
from ..scalars import integer
from ..scopes import scope
from .base import GradQuantizer, RowTransform, check_operand, refuse_clipping

DEFAULT_BLOCK = 64
# a float32 operand with a block of largest magnitude above _HUGE (a sum of b values of up
# to max/√b each can overflow float32) or in (0, _TINY) (subnormal products round) is
# transformed in float64
_TINY = 2.0**-60
_HUGE = 2.0**100
WIDE = (_HUGE, _TINY)  # the AVX-512 kernels' check of the same rule


def check_block(b: int) -> None:
    """``ValueError`` unless ``b`` is a power of two (checked, not built: a b×b matrix, a review)."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {b}")


def hadamard_matrix(b: int, device: torch.device | None = None) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of order ``b`` (a power of two)."""
    check_block(b)
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


def block_size_for(n_rows: int, block: int) -> int:
    """The block actually used: ``block`` capped at the next power of two ≥ ``n_rows``."""
    return min(block, 1 << max(n_rows - 1, 0).bit_length())


def fwht(u: torch.Tensor) -> torch.Tensor:
    """The unnormalised Walsh–Hadamard transform along dim 1 of ``u`` (nb, b, D), ``b`` a
    power of two: ``log₂ b`` butterfly stages, ``h = 1, 2, …, b/2``, each mapping rows
    ``(j, j + h)`` of every ``2h`` rows to ``(u_j + u_{j+h}, u_j − u_{j+h})`` — the
    product with the unnormalised Sylvester matrix ``√b·H_b``, in this order of additions
    (the order the AVX-512 kernel follows). A new (nb, b, D) tensor; ``u`` is only read.
    Each stage is one addition and one subtraction written into the other of two
    buffers (no temporaries: 3× faster in eager torch than stacking new tensors), or,
    where autograd records ``u``, stacked (the same operations, differentiable)."""
    nb, b, d = u.shape
    if u.requires_grad and torch.is_grad_enabled():
        h = 1
        while h < b:
            v = u.reshape(nb, b // (2 * h), 2, h, d)
            u = torch.stack((v[:, :, 0] + v[:, :, 1], v[:, :, 0] - v[:, :, 1]), dim=2).reshape(nb, b, d)
            h *= 2
        return u if b > 1 else u.clone()
    src, spare = u, None
    h = 1
    while h < b:
        dst = torch.empty(nb, b, d, dtype=u.dtype, device=u.device) if spare is None else spare
        v, w = src.reshape(nb, b // (2 * h), 2, h, d), dst.view(nb, b // (2 * h), 2, h, d)
        torch.add(v[:, :, 0], v[:, :, 1], out=w[:, :, 0])
        torch.sub(v[:, :, 0], v[:, :, 1], out=w[:, :, 1])
        spare = src if src is not u else None
        src = dst
        h *= 2
    return src if src is not u else u.clone()


def _c(b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``1/√b`` rounded to ``dtype``."""
    return torch.tensor(1.0 / math.sqrt(b), dtype=dtype, device=device)


def _wide(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (rows, D) in float64 where it is float32 with a block of ``block`` rows whose
    largest magnitude (NaN if it holds a NaN) is above :data:`_HUGE` or in (0, :data:`_TINY`)."""
    if x.dtype == torch.float32 and x.numel():
        amax = x.abs().reshape(-1, block * x.shape[1]).amax(dim=1)
        if bool((((amax > 0) & (amax < _TINY)) | (amax > _HUGE)).any()):
            return x.double()
    return x


def _forward(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """``T x`` (rows, D) of ``x`` (N, D), ``rows = len(signs)``: the module docstring's
    arithmetic, in ``x``'s compute dtype (float64 for a wide block: :func:`_wide`)."""
    x = x.to(compute_dtype(x.dtype))
    rows, (n, d) = signs.shape[0], x.shape
    if rows > n:
        x = torch.cat([x, x.new_zeros(rows - n, d)])
    x = _wide(x, block)
    m = signs.to(x.dtype) * _c(block, x.dtype, x.device)  # s_r·c: an exact sign flip
    return fwht((x * m[:, None]).reshape(rows // block, block, d)).reshape(rows, d)


def _forward_quantize(x: torch.Tensor, signs: torch.Tensor, block: int, fmt: Format,
                      granularity: Granularity, rounding: Rounding, seed: torch.Tensor) -> tuple:
    """``T x`` (:func:`_forward`) quantized (:func:`lowbit.kernels.reference.quantize`)."""
    return reference.quantize(_forward(x, signs, block), fmt, granularity, rounding, seed)


def _native_forward_quantize(x: torch.Tensor, signs: torch.Tensor, block: int, fmt: Format,
                             granularity: Granularity, rounding: Rounding, seed: torch.Tensor) -> tuple:
    """:func:`_forward_quantize` on the AVX-512 kernel (``T x`` never written), the
    reference where a block is transformed in float64 (module docstring)."""
    m = signs * _c(block, torch.float32, signs.device)
    out = avx512.hadamard_forward_quantize(x, m, signs.shape[0], block, WIDE, fmt, granularity, rounding, seed)
    return _forward_quantize(x, signs, block, fmt, granularity, rounding, seed) if out is None else out


def _native_forward_quantize_ok(x: torch.Tensor, signs: torch.Tensor, block: int, fmt: Format,
                                granularity: Granularity, rounding: Rounding, seed: torch.Tensor) -> bool:
    return signs.dtype == torch.float32 and avx512.supports_hadamard(
        x, signs, signs.shape[0], block, WIDE, fmt, granularity, rounding, seed)


def _native_forward(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """:func:`_forward` on the AVX-512 kernel, the reference where a block is transformed
    in float64 (module docstring)."""
    m = signs * _c(block, torch.float32, signs.device)
    out = avx512.hadamard_forward(x, m, signs.shape[0], block, WIDE)
    return _forward(x, signs, block) if out is None else out


def _native_forward_ok(x: torch.Tensor, signs: torch.Tensor, block: int) -> bool:
    return signs.dtype == torch.float32 and avx512.supports_hadamard_forward(x, signs, signs.shape[0], block)


def _inverse(y: torch.Tensor, signs: torch.Tensor, block: int, n_out: int, out_dtype: torch.dtype,
             overwrite: bool = False) -> torch.Tensor:
    """``T⁻¹ y`` of ``y`` (rows, D), its first ``n_out`` rows as ``out_dtype``: the module
    docstring's arithmetic in ``y``'s compute dtype (float64 for a wide block: :func:`_wide`).
    ``overwrite`` (``y`` is the caller's to write over) is the native kernel's; here a new
    tensor."""
    y = _wide(y.to(compute_dtype(y.dtype)), block)
    rows, d = y.shape
    u = fwht((y * _c(block, y.dtype, y.device)).reshape(rows // block, block, d)).reshape(rows, d)
    return (u * signs.to(y.dtype)[:, None])[:n_out].to(out_dtype)


def _native_inverse(y: torch.Tensor, signs: torch.Tensor, block: int, n_out: int, out_dtype: torch.dtype,
                    overwrite: bool = False) -> torch.Tensor:
    """:func:`_inverse` on the AVX-512 kernel (with ``overwrite``, written over ``y``), the
    reference where a block is transformed in float64 (module docstring)."""
    out = avx512.hadamard_inverse(y, signs, block, _c(block, torch.float32, y.device).item(), WIDE, n_out,
                                  overwrite)
    return _inverse(y, signs, block, n_out, out_dtype) if out is None else out.to(out_dtype)


def _native_inverse_ok(y: torch.Tensor, signs: torch.Tensor, block: int, n_out: int,
                       out_dtype: torch.dtype, overwrite: bool = False) -> bool:
    return avx512.supports_hadamard_inverse(y, signs, block, n_out)


def _quantize_pair(k: Kernels, x: torch.Tensor, t: BlockHadamard, fmt_a: Format, gran_a: Granularity,
                   rnd_a: Rounding, seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                   seed_w: torch.Tensor, entries: int = 0) -> tuple:
    """A layer's two gradient quantizations where ``∇X``'s is the transform ``t``: ``T x``'s
    rows (:meth:`BlockHadamard.forward_quantize`) and ``x``'s columns — ``xᵀ``'s rows, or
    with ``entries`` > 0 each entry's transpose (entries · D, N / entries) — (op
    ``quantize``), each on the call's kernels ``k``: the eight tensors of the two (codes,
    scale, offset, block scale). The native kernel of this op
    (:func:`lowbit.kernels.avx512.hadamard_quantize_pair`) makes the columns' ranges in
    the rows' read, bit for bit."""
    a = t.forward_quantize(x, fmt_a, gran_a, rnd_a, seed_a)
    cols = x.t() if not entries else x.reshape(entries, -1, x.shape[1]).mT.reshape(-1, x.shape[0] // entries)
    return (a.codes, a.scale, a.offset, a.block_scale, *k.run("quantize", cols, fmt_w, gran_w, rnd_w, seed_w))


def _native_quantize_pair(k: Kernels, x: torch.Tensor, t: BlockHadamard, fmt_a: Format, gran_a: Granularity,
                          rnd_a: Rounding, seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity,
                          rnd_w: Rounding, seed_w: torch.Tensor, entries: int = 0) -> tuple:
    """:func:`_quantize_pair` on the AVX-512 kernel; the rows from the reference where a
    block is transformed in float64 (module docstring: the columns are ``x``'s own)."""
    m = t.signs * _c(t.block, torch.float32, t.signs.device)
    codes_a, step_a, codes_w, step_w = avx512.run_hadamard_quantize_pair(
        x, m, t.signs.shape[0], t.block, WIDE, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w, entries)
    rows = (codes_a, step_a, None, None) if codes_a is not None else \
        _forward_quantize(x, t.signs, t.block, fmt_a, gran_a, rnd_a, seed_a)
    return (*rows, codes_w, step_w, None, None)


def _native_quantize_pair_ok(k: Kernels, x: torch.Tensor, t: BlockHadamard, fmt_a: Format, gran_a: Granularity,
                             rnd_a: Rounding, seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity,
                             rnd_w: Rounding, seed_w: torch.Tensor, entries: int = 0) -> bool:
    return type(t) is BlockHadamard and t.signs.dtype == torch.float32 and avx512.supports_hadamard_pair(
        x, t.signs, t.signs.shape[0], t.block, WIDE, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w,
        entries)


register("hadamard_forward", Impl.REFERENCE, _forward)
register("hadamard_forward", Impl.NATIVE, _native_forward, ("cpu",), _native_forward_ok)
register("hadamard_forward_quantize", Impl.REFERENCE, _forward_quantize)
register("hadamard_forward_quantize", Impl.NATIVE, _native_forward_quantize, ("cpu",), _native_forward_quantize_ok)
register("hadamard_inverse", Impl.REFERENCE, _inverse)
register("hadamard_inverse", Impl.NATIVE, _native_inverse, ("cpu",), _native_inverse_ok)
register("hadamard_quantize_pair", Impl.REFERENCE, _quantize_pair)
register("hadamard_quantize_pair", Impl.NATIVE, _native_quantize_pair, ("cpu",), _native_quantize_pair_ok)


class BlockHadamard(RowTransform):
    def __init__(self, signs: torch.Tensor, n_rows: int, block: int, kernels: Kernels | None = None):
        self.signs = signs  # (N_padded,) ±1 float32
        self.n_rows = n_rows
        self.block = block
        self.kernels = kernels

    def _k(self, x: torch.Tensor) -> Kernels:
        return self.kernels or kernels_for("reference", x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._k(x).run("hadamard_forward", x, self.signs, self.block)

    def forward_quantize(self, x: torch.Tensor, fmt: Format, granularity: Granularity,
                         rounding: Rounding, seed: torch.Tensor) -> Encoded:
        """The fused AVX-512 transform-and-quantize where it takes the call (the
        kernel-table op ``hadamard_forward_quantize``); otherwise the transform, then the
        call's own quantizer (native or compiled where those take the format)."""
        k = self._k(x)
        native = k.lookup("hadamard_forward_quantize", Impl.NATIVE) if k.fused and x.numel() else None
        args = (x, self.signs, self.block, fmt, granularity, rounding, seed)
        if native is None or not native.supports(*args):  # type: ignore[misc]
            return super().forward_quantize(x, fmt, granularity, rounding, seed)
        with scope("lowbit::quantize"):
            codes, scale, offset, bs = native.fn(*args)
        return Encoded(codes, scale, offset, bs, fmt.block, kernels=k)

    def forward_quantize_pair(self, x: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                              seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                              seed_w: torch.Tensor, entries: int | None = None) -> tuple[Encoded, Encoded]:
        """``∇Y`` (N, D) ``x``'s two quantizations: :meth:`forward_quantize`'s codes of
        ``T x`` (rows, D) and those of ``xᵀ`` (D, N: ``x``'s columns, untransformed) on
        ``fmt_w`` — bitwise what ``forward_quantize(x, fmt_a, …)`` and an identity's
        ``forward_quantize(x.t(), fmt_w, …)`` give, the columns' ranges taken in the rows'
        read where the call's kernels have it (op ``hadamard_quantize_pair``). With
        ``entries``, ``x`` (B·N, D) is that many entries of N rows (attention's heads) and
        the second operand each entry's transpose (B·D, N), bitwise an identity's
        ``forward_quantize`` of ``x.reshape(B, N, D).mT.reshape(-1, N)``. ``x`` must not be
        empty."""
        k = self._k(x)
        with scope("lowbit::quantize"):
            out = k.run("hadamard_quantize_pair", k, x, self, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w,
                        seed_w, entries or 0)
        return Encoded(*out[:4], fmt_a.block, kernels=k), Encoded(*out[4:], fmt_w.block, kernels=k)

    def inverse(self, y: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> torch.Tensor:
        return self._k(y).run("hadamard_inverse", y, self.signs, self.block, self.n_rows, out_dtype, overwrite)

    def within_entries(self, rows: int) -> bool:
        """Blocks of ``block`` rows never cross an entry of ``rows`` rows when ``block``
        divides ``rows`` and no rows were padded."""
        return rows > 0 and rows % self.block == 0 and self.signs.shape[0] == self.n_rows

    def entries(self, lo: int, hi: int) -> BlockHadamard:
        if not 0 <= lo <= hi <= self.n_rows:
            raise ValueError(f"rows {lo}:{hi} are not a range within the transform's {self.n_rows} rows")
        if lo % self.block or hi % self.block:
            raise ValueError(f"rows {lo}:{hi} do not start and end on blocks of {self.block} rows")
        return BlockHadamard(self.signs[lo:hi], hi - lo, self.block, self.kernels)

    def inverse_sq(self, var: torch.Tensor) -> torch.Tensor:
        # Every entry of H is ±1/√b: each output row gets the block's mean variance.
        means = var.reshape(-1, self.block).mean(dim=1, keepdim=True)
        return means.expand(-1, self.block).reshape(-1)[: self.n_rows]


class Hadamard(GradQuantizer):
    name = "hadamard"
    granularity = Granularity.ROW
    mixes_rows = True
    # its transform quantizes ∇Y's columns alongside its rows (BlockHadamard.forward_quantize_pair:
    # lowbit.gradpair.quantize_grad_pair_mixed; a subclass's own transform without it gets the two calls)
    pairs_columns = True

    def __init__(self, block: int = DEFAULT_BLOCK) -> None:
        b = integer(block)  # (True was taken as block 1; a NumPy integer is one)
        if b is None:
            raise TypeError(f"Hadamard block size must be an int, got {block!r}")
        check_block(b)
        self.block = b

    def transform(self, a: torch.Tensor, generator: torch.Generator | None,
                  kernels: Kernels | None = None) -> RowTransform:
        n = a.shape[0]
        b = block_size_for(n, self.block)
        n_pad = -(-n // b) * b if n else 0
        # drawn where the generator lives (a CPU generator may serve a CUDA tensor), then moved
        dev = a.device if generator is None else generator.device
        bits = torch.randint(0, 2, (n_pad,), generator=generator, device=dev).to(a.device)
        return BlockHadamard(bits.float() * 2 - 1, n, b, kernels)

    def entry_transform(self, a: torch.Tensor, entries: int, generator: torch.Generator | None,
                        kernels: Kernels | None = None) -> RowTransform:
        """:meth:`transform`, drawn and built as for the whole operand: its blocks stay
        within entries of ``R / entries`` rows where the block divides them
        (:meth:`BlockHadamard.within_entries`). Its own, so that attention's gradients take
        the pair with each entry's columns (:func:`lowbit.gradpair.quantize_grad_pair_mixed`)."""
        return self.transform(a, generator, kernels)

    def variance_bound(self, a: torch.Tensor, fmt: AnyFormat | int | str) -> torch.Tensor:
        """Sign-free bound: every entry of block ``k`` after the transform is at most
        ``c_k = max_d ‖A_block_k[:, d]‖₂`` (Cauchy–Schwarz), and so is every range it
        joins (row, tensor or block), so no grid spacing exceeds ``f·c_k`` with ``f`` the
        format's :attr:`~lowbit.formats.Format.spacing_factor` (``1/Q`` on a symmetric
        integer grid): ``Var ≤ Σ_k n_k · D · (f·c_k)² / 4`` with ``n_k`` real rows in block
        ``k`` (up to the scale's one-ulp round-up). 0-d float64; the norms are taken on ``a``
        scaled by a power of two (exact), so squares of extreme values neither underflow
        nor overflow. ``ValueError`` for a format that clips (``*_spec``)."""
        check_operand(a, f"{self.name}.variance_bound")
        fmt = parse_format(fmt)
        refuse_clipping(fmt, f"{self.name}.variance_bound")
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
