"""Reference kernels in plain torch: they define the semantics of every fast path.

``quantize`` is the whole quantizer of one operand on any format (ranges → scales →
elements → rounding → codes); ``gemm`` dequantizes both operands and multiplies in
float32 (float64 where a scale is float64): the *simulated* GEMM, exact for block formats
too; ``int8_epilogue`` turns an exact integer accumulator into the same product. The
compiled kernels (``compiled.py``) run these very functions through ``torch.compile``;
nothing here is compiled. Format math: :mod:`lowbit.formats`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..formats import (
    ELEMENTS,
    Format,
    Granularity,
    Rounding,
    ScaleRule,
    compute_dtype,
    counter_uniform,
    div_rn,
    grid_step,
    pow2_step,
    round_elements,
    round_up_on,
)
from .encoded import Encoded

_E4M3 = ELEMENTS["e4m3"]


def _group(t: torch.Tensor, granularity: Granularity, op: str) -> torch.Tensor:
    """``op`` (amax/amin) over each group: (R, 1) per row, (1, 1) per tensor."""
    if granularity is Granularity.ROW:
        return getattr(t, op)(dim=1, keepdim=True)
    return getattr(t, op)().reshape(1, 1)


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s == 0, torch.ones_like(s), s)


def prepare(x: torch.Tensor, fmt: Format, granularity: Granularity
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Elements before rounding and the scales of a 2-D ``x`` (compute dtype):
    ``(y (R, D), scale, offset or None, block_scale (R, ⌈D/block⌉) or None)`` with
    ``|y| ≤ emax`` (``0 ≤ y ≤ 2^b − 1`` on asymmetric grids; clipped there under
    :attr:`ScaleRule.SPEC`). Rounding ``y`` onto the element grid gives the codes."""
    if fmt.block:
        return _prepare_blocks(x, fmt, granularity)
    if fmt.asymmetric:
        lo, hi = _group(x, granularity, "amin"), _group(x, granularity, "amax")
        rng = hi - lo
        # a group of finite values whose range alone passes the dtype's largest value (within
        # a factor 2 of it): the same grid from halved values (halving is exact there), so
        # step and offset stay finite instead of an Inf step making every element NaN
        big = torch.isinf(rng) & torch.isfinite(hi) & torch.isfinite(lo)
        step = grid_step(torch.where(big, hi / 2 - lo / 2, rng), fmt.emax)
        step = torch.where(big, 2 * step, step)
        y = torch.where(big, div_rn(x / 2 - lo / 2, _nonzero(step / 2)), div_rn(x - lo, _nonzero(step)))
        return y, step, lo + fmt.zero_code * step, None
    amax = _group(x.abs(), granularity, "amax")
    step = grid_step(amax, fmt.emax)
    return div_rn(x, torch.where(amax == 0, torch.ones_like(step), step)), step, None, None


def _prepare_blocks(x: torch.Tensor, fmt: Format, granularity: Granularity
                    ) -> tuple[torch.Tensor, torch.Tensor, None, torch.Tensor]:
    r, d = x.shape
    blk, el, up = fmt.block, fmt.element, fmt.rule is ScaleRule.UP  # type: ignore[attr-defined]
    nb = -(-d // blk)
    xb = (x if d == nb * blk else F.pad(x, (0, nb * blk - d))).view(r, nb, blk)  # (R, nb, block)
    bamax = xb.abs().amax(dim=2)  # (R, nb)
    if fmt.scale == "e8m0":  # type: ignore[attr-defined]  # MX: a power of two per block
        scale = torch.ones(1, 1, dtype=x.dtype, device=x.device)
        if up:
            bs = pow2_step(bamax, el.max)
        else:  # OCP MX: 2^(⌊log2 bamax⌋ − ⌊log2 emax⌋)
            e = torch.frexp(bamax)[1] - 1 - el.top_exp
            bs = torch.where(bamax == 0, torch.zeros_like(bamax), torch.exp2(e.to(x.dtype)))
            bs = torch.where(torch.isfinite(bamax), bs, bamax)
    else:  # NVFP4: an E4M3 value per block times one scale per group
        gamax = _group(x.abs(), granularity, "amax")
        top = _E4M3.max * el.max  # 2688: the largest element of the largest block
        if up:
            # a power of two, at least 2⁹ times the smallest subnormal: E4M3 block scales are
            # multiples of 2⁻⁹, so bs·scale is exact (a subnormal group scale made it round:
            # elements past 6, biased, in float64 too; or underflow to 0 in float32)
            scale = pow2_step(gamax, top)
            fi = torch.finfo(scale.dtype)
            scale = torch.where(scale > 0, scale.clamp_min(fi.smallest_normal * fi.eps * 2.0**9), scale)
            bs = round_up_on(bamax / _nonzero(scale) / el.max, _E4M3)
            bs = torch.where(bamax > el.max * bs * scale, bs + _E4M3.spacing(bs), bs)
        else:
            scale = gamax / top
            ratio = bamax / (el.max * _nonzero(scale))
            bs = ratio.to(torch.float8_e4m3fn).to(x.dtype)  # nearest E4M3 (may round down)
    es = bs * scale  # (R, nb): the element scale of each block
    # Elements in x's own (R, D) layout, each divided by its block's scale (a padded 3-D
    # layout here makes Inductor's dynamic-shape index arithmetic an order slower).
    y = div_rn(x, _nonzero(es).repeat_interleave(blk, dim=1)[:, :d])
    if not up:
        y = y.clamp(-el.max, el.max)  # the spec's rule may clip (biased)
    return y, scale, None, bs


def _codes(q: torch.Tensor, fmt: Format) -> torch.Tensor:
    """Rounded elements as stored codes: centred for asymmetric grids; integer codes
    clamped, NaN as 0 (a no-op on finite groups: it only tames non-finite groups, whose
    scale is non-finite, so that every kernel stores the same codes)."""
    if fmt.element is not None:
        return q.to(fmt.code_dtype)
    low = -fmt.zero_code if fmt.asymmetric else -fmt.emax
    high = low + fmt.emax if fmt.asymmetric else fmt.emax
    d = q - fmt.zero_code
    return torch.where(d == d, d, 0.0).clamp(low, high).to(torch.int8)  # NaN → 0


def quantize(x: torch.Tensor, fmt: Format, granularity: Granularity, rounding: Rounding,
             seed: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                          torch.Tensor | None]:
    """``(codes, scale, offset, block_scale)`` of a 2-D ``x`` on ``fmt`` (see
    :class:`~lowbit.kernels.encoded.Encoded`): :func:`prepare`, then
    :func:`~lowbit.formats.round_elements` with ``u`` from :func:`counter_uniform` (stochastic)
    or to nearest. Arithmetic and scales in :func:`~lowbit.formats.compute_dtype`, so
    ``E[x̂] = x`` over the whole finite range of ``x``'s dtype, subnormals included (NVFP4
    too: its group scale is kept ≥ 2⁹ subnormal spacings, :mod:`lowbit.formats`).
    All-zero groups and blocks get scale 0; NaN/Inf make their group's scale non-finite.
    ``first``: the noise of elements ``first, first + 1, …`` (``x`` is a part of a larger
    operand, starting at its element ``first``: a part of whole rows, per-row scales)."""
    x = x.to(compute_dtype(x.dtype))
    y, scale, offset, bs = prepare(x, fmt, granularity)
    u = counter_uniform(y.shape, seed, first) if rounding is Rounding.STOCHASTIC else None
    return _codes(round_elements(y, fmt, u), fmt), scale, offset, bs


def quantize_fixed(x: torch.Tensor, amax: torch.Tensor, fmt: Format, rounding: Rounding,
                   seed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Like :func:`quantize` (symmetric integer and FP8 formats), but on a grid fixed in
    advance: ``scale = grid_step(amax, emax)`` with ``amax`` given ((1, 1) per tensor or
    (R, 1) per row, all > 0), not read from ``x``.

    Values beyond ``±amax`` are clipped to ``±emax`` elements. Also returns what the caller
    needs to account for that, in the granularity of ``amax``: the observed absmax (for the
    next prediction), the number of clipped elements, ``Σ (|x| − amax)₊²`` and ``Σ x²`` (both
    float64: a float32 square of a finite value past 1.8e19 was Inf, which poisoned a
    tracker's running sums for good, a review). A group of ``amax`` (a row, or the whole
    tensor) whose observed absmax is non-finite gets that as its scale, so NaN/Inf
    propagate to it (:class:`lowbit.ranges.RangeTracker` narrows a per-tensor group to
    its non-finite rows for a per-row quantizer, as on the dynamic path)."""
    x = x.to(compute_dtype(x.dtype))
    amax = amax.to(x.dtype)
    a = x.abs()
    obs = a.amax(dim=1, keepdim=True) if amax.shape[0] > 1 else a.amax().reshape(1, 1)
    step = grid_step(amax, fmt.emax)
    y = div_rn(x, step).clamp(-fmt.emax, fmt.emax)
    u = counter_uniform(y.shape, seed) if rounding is Rounding.STOCHASTIC else None
    excess = (a - amax).clamp_min(0)
    step = torch.where(torch.isfinite(obs), step, obs)
    return (_codes(round_elements(y, fmt, u), fmt), step, obs, (a > amax).sum(),
            excess.double().square().sum(), x.double().square().sum())


def gemm(a: Encoded, b: Encoded, bias: torch.Tensor | None = None,
         out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The simulated GEMM ``â @ b̂ + bias``: both operands dequantized in their scales'
    dtype (float32, or float64 where a scale is) into row-major tensors, one float GEMM,
    cast to ``out_dtype``. Row-major because the float GEMM's summation order can depend
    on the operands' layout (MKL's kernels for fewer than 16 rows do), and row-major is
    what ``torch._scaled_mm``'s CPU emulation multiplies (:mod:`.fp8`): the same bits."""
    dt = torch.promote_types(a.scale.dtype, b.scale.dtype)
    return finish(a.dequantize(dt).contiguous() @ b.dequantize(dt).contiguous(), bias, out_dtype)


def int8_epilogue(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                  a_offset: torch.Tensor | None, b_offset: torch.Tensor | None,
                  a_rowsum: torch.Tensor | None, b_colsum: torch.Tensor | None, k: int,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32
                  ) -> torch.Tensor:
    """The product from the exact integer accumulator ``acc = Σ_k c_ik r_kj`` (docs/METHOD.md
    §6): ``Σ_k (s_i c_ik + m_i)(t_j r_kj + n_j) = s_i t_j acc_ij + m_i t_j Σ_k r_kj +
    s_i n_j Σ_k c_ik + K m_i n_j`` — the rank-1 terms only where an offset exists. In the
    scales' dtype, cast to ``out_dtype``."""
    dt = torch.promote_types(a_scale.dtype, b_scale.dtype)
    out = acc.to(dt) * a_scale * b_scale
    if a_offset is not None:
        out = out + a_offset * (b_colsum.to(dt) * b_scale)
    if b_offset is not None:
        out = out + (a_rowsum.to(dt) * a_scale) * b_offset
    if a_offset is not None and b_offset is not None:
        out = out + k * a_offset * b_offset
    return finish(out, bias, out_dtype)


def int8_epilogue_into(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                       a_offset: torch.Tensor | None, b_offset: torch.Tensor | None,
                       a_rowsum: torch.Tensor | None, b_colsum: torch.Tensor | None, k: int,
                       bias: torch.Tensor | None = None) -> None:
    """:func:`int8_epilogue` to float32, written over the int32 ``acc``'s own bytes
    (``acc.view(torch.float32)`` holds the product afterwards; float32 scales only).
    Each element is read before it is written, in one elementwise pass: compiled
    (:mod:`.compiled`) it needs no second buffer of the accumulator's size — the
    product's float32 result is as large as its int32 sum, and the step's peak memory
    and the first touch of a fresh buffer's pages are what this saves. Returns
    ``None``: a compiled function that returned the view would allocate its output."""
    acc.view(torch.float32).copy_(int8_epilogue(acc, a_scale, b_scale, a_offset, b_offset,
                                                a_rowsum, b_colsum, k, bias, torch.float32))


def finish(out: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``out + bias`` in ``out``'s dtype, cast to ``out_dtype``."""
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(out_dtype)


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """``max_j |x_ij|`` per row (R,) in the compute dtype; NaN propagates."""
    return x.abs().amax(dim=1).to(compute_dtype(x.dtype))
