"""im2col of integer codes, channels-last, and an integer GEMM whose long sums stay exact.

A convolution's GEMMs read patches of their operand: ``patches(x)[n, h, w, i, j, c] =
x[n, h·s + i·d, w·s + j·d, c]`` of the zero-padded channels-last tensor. Built here as an
``as_strided`` view of the int8 codes (no float copy: DESIGN.md "Measured anchors", 16
channels at 28²: int8 patches + ``torch._int_mm`` 2.2 ms, where ``F.unfold`` of floats +
``_int_mm`` took 46 ms), then one int8 copy into the (rows, K) operand of the GEMM. A
zero code is the value 0 only on a symmetric grid: callers pad codes of offset-free
operands only.

:func:`exact_gemm` sums over any ``K``: ``torch._int_mm``'s int32 accumulator is exact
while ``K·128² < 2³¹`` (``int8.MAX_K``); longer sums are split into chunks of
``int8.CHUNK_K`` (a multiple of 8, as ``_int_mm`` needs on CUDA), each an exact int32
product, added exactly in int64, then scaled once by the same epilogue as one GEMM.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch
from .. import grid_notes
from ..scopes import scope

from . import Backend, Impl, Kernels, avx512, int8, reference, register, register_fused
from .encoded import Encoded


def channels_last(codes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Row-major codes (N, C·H·W) of a (N, C, H, W) tensor as contiguous (N, H, W, C)."""
    n, c, h, w = shape
    return codes.reshape(n, c, h, w).permute(0, 2, 3, 1).contiguous()


def nhwc(codes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Row-major codes (N, C·H·W) of a (N, C, H, W) tensor as a (N, H, W, C) view."""
    n, c, h, w = shape
    return codes.reshape(n, c, h, w).permute(0, 2, 3, 1)


def place(x: torch.Tensor, size: Sequence[int], offset: Sequence[int],
          stride: Sequence[int] = (1, 1)) -> torch.Tensor:
    """A contiguous zero (N, size[0], size[1], C) tensor holding ``x`` (N, H, W, C, any
    strides: a channels-last view is copied once) at ``offset + i·stride`` per spatial
    dimension; entries falling outside are dropped. Zero padding (offset ≥ 0), cropping
    (offset < 0) and the zero insertion of a transposed convolution (stride > 1) in one
    copy; only what ``x`` does not cover is zeroed."""
    n, h, w, c = x.shape
    src: list[slice] = []
    dst: list[slice] = []
    for ext, full, off, s in ((h, size[0], offset[0], stride[0]), (w, size[1], offset[1], stride[1])):
        first = max(0, -(off // s))  # source indices i with 0 ≤ off + i·s < full
        last = min(ext, (full - 1 - off) // s + 1)
        if last <= first:
            return x.new_zeros(n, size[0], size[1], c)
        src.append(slice(first, last))
        dst.append(slice(off + first * s, off + (last - 1) * s + 1, s))
    if tuple(stride) != (1, 1):
        out = x.new_zeros(n, size[0], size[1], c)
    else:  # a block: zero the border around it only
        out = x.new_empty(n, size[0], size[1], c)
        (h0, h1), (w0, w1) = (dst[0].start, dst[0].stop), (dst[1].start, dst[1].stop)
        out[:, :h0].zero_()
        out[:, h1:].zero_()
        out[:, h0:h1, :w0].zero_()
        out[:, h0:h1, w1:].zero_()
    out[:, dst[0], dst[1]] = x[:, src[0], src[1]]
    return out


def place_codes(codes: torch.Tensor, shape: Sequence[int], size: Sequence[int],
                offset: Sequence[int], stride: Sequence[int] = (1, 1),
                unsigned: bool = False) -> torch.Tensor:
    """:func:`place` of row-major int8 codes (N, C·H·W) of a (N, C, H, W) tensor: a new
    channels-last (N, size[0], size[1], C) int8 tensor (zero where the codes do not land),
    contiguous; ``unsigned``: every entry as uint8 ``code + 128`` (the zeros become 128), the
    operand of oneDNN's u8 convolution (:mod:`.qconv`) — where nothing is padded or
    inserted, in the codes' own NCHW memory order (oneDNN then copies it channels-last).
    The reference of the ``int8_place_nhwc`` kernel
    (:func:`lowbit.kernels.avx512.place_nhwc`: the same values, always contiguous)."""
    x = nhwc(codes, shape)
    if unsigned and tuple(size) == tuple(shape[2:]) and tuple(offset) == (0, 0) and tuple(stride) == (1, 1):
        return x.view(torch.uint8) ^ 128  # one elementwise pass, no transposing copy
    out = place(x, size, offset, stride)
    return out.view(torch.uint8) ^ 128 if unsigned else out


register("int8_place_nhwc", Impl.REFERENCE, place_codes)
register("int8_place_nhwc", Impl.NATIVE, avx512.run_place_nhwc, ("cpu",), avx512.supports_place_nhwc)


def patches(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
            dilation: Sequence[int]) -> torch.Tensor:
    """The (N, H', W', kH, kW, C) view of the (already padded) contiguous channels-last
    ``x`` (N, H, W, C): ``H' = ⌊(H − d(k − 1) − 1)/s⌋ + 1``."""
    n, h, w, c = x.shape
    ho = (h - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    wo = (w - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    sn, sh, sw, sc = x.stride()
    return x.as_strided((n, ho, wo, kernel[0], kernel[1], c),
                        (sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], sc))


_WORDS = ((8, torch.int64), (4, torch.int32), (2, torch.int16))


def as_words(*ts: torch.Tensor) -> list[torch.Tensor] | None:
    """One-byte tensors of the same shape, each with a contiguous last dimension, viewed in
    the widest word (8, 4 or 2 bytes) that divides that dimension and every tensor's
    other strides and storage offset: the same bytes in up to 8× fewer elements (torch
    copies a strided int8 tensor one byte at a time). ``None`` where no word does."""
    if any(t.element_size() != 1 or t.stride(-1) != 1 for t in ts):
        return None
    for size, word in _WORDS:
        if ts[0].shape[-1] % size == 0 and all(
                t.storage_offset() % size == 0 and all(s % size == 0 for s in t.stride()[:-1]) for t in ts):
            return [t.view(word) for t in ts]
    return None


def im2col(p: torch.Tensor, group: int, groups: int) -> torch.Tensor:
    """Group ``group`` of the patches ``p`` (N, H', W', kH, kW, C) as the contiguous
    (N·H'·W', kH·kW·C/groups) operand, column order (i, j, c). One-byte codes are copied
    in the widest word (8, 4 or 2 bytes) that divides the group's contiguous channel run
    and every stride: the same bytes, bitwise, in up to 8× fewer copied elements (torch
    copies a strided int8 tensor one byte at a time: 9.3 → 2.5 ms for a 14 MB operand,
    docs/benchmarks.md "Predictions and outcomes" 7)."""
    n, ho, wo, kh, kw, c = p.shape
    cg = c // groups
    sel = p[..., group * cg:(group + 1) * cg]
    words = as_words(sel)
    if words is not None:
        return words[0].contiguous().view(n * ho * wo, kh * kw * words[0].shape[-1]).view(sel.dtype)
    # contiguous() then view, never reshape: reshape returns a view where it can, and for
    # one sample's one output row that view's rows overlap (fault kind 24)
    return sel.contiguous().view(n * ho * wo, kh * kw * cg)


def col2im(cols: torch.Tensor, out: torch.Tensor, stride: Sequence[int],
           dilation: Sequence[int], channels: slice) -> None:
    """Add ``cols`` (N, H', W', kH, kW, Cg) into ``out[..., channels]`` ((N, H, W, C),
    padded): the adjoint of :func:`patches` (a transposed convolution's scatter), in
    ``out``'s dtype, one strided add per kernel position."""
    _, ho, wo, kh, kw, _ = cols.shape
    for i in range(kh):
        for j in range(kw):
            h0, w0 = i * dilation[0], j * dilation[1]
            out[:, h0:h0 + stride[0] * (ho - 1) + 1:stride[0],
                w0:w0 + stride[1] * (wo - 1) + 1:stride[1], channels] += cols[:, :, :, i, j]


def chunks_supported(a: Encoded, b: Encoded) -> bool:
    """Whether every ``int8.CHUNK_K``-long chunk of the sum of ``a @ b`` runs on
    ``torch._int_mm`` (:func:`int8.supports` of the first chunk and of the last, shorter
    one: the rules are per shape, the same for the chunks in between)."""
    k, c = a.codes.shape[1], int8.CHUNK_K
    last = k - (k - 1) // c * c if k else 0

    def chunk(size: int) -> tuple[Encoded, Encoded]:
        return (Encoded(a.codes[:, :size], a.scale, a.offset, a.block_scale),
                Encoded(b.codes[:size], b.scale, b.offset, b.block_scale))
    return int8.supports(*chunk(min(k, c))) and int8.supports(*chunk(last))


def exact_gemm(kernels: Kernels, a: Encoded, b: Encoded, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``â @ b̂ + bias`` ((M, K) × (K, N)) as :meth:`Kernels.gemm`, for any ``K``: where
    the integer GEMM applies but ``K > int8.MAX_K``, the sum is split into exact int32
    chunks added in int64 and scaled once (the ``int8_epilogue`` of one GEMM)."""
    k, c = a.codes.shape[1], int8.CHUNK_K
    if k <= int8.MAX_K or kernels.backend not in (Backend.AUTO, Backend.INT8) \
            or not chunks_supported(a, b) or a.offset is not None or b.offset is not None:
        return kernels.gemm(a, b, bias, out_dtype)  # one GEMM (or not integer: simulated)
    acc = torch.zeros(a.codes.shape[0], b.codes.shape[1], dtype=torch.int64, device=a.codes.device)
    for s in range(0, k, c):
        acc += int8.int_mm(a.codes[:, s:s + c].contiguous(), b.codes[s:s + c].contiguous())
    return kernels.run("int8_epilogue", acc, *int8.safe_scales(a.scale, b.scale, k, shift=True), None, None, None, None, k,
                       bias, out_dtype)


# Whether grad_weight_rows runs its samples in pieces (False: the whole batch at once; a
# benchmark toggle, benchmarks/bench_toggle.py conv-grad-w-pieces), and the placed input's
# bytes over a piece's patches' there and in patch_gemm_nchw (about kW·PIECE_SHARE and
# kH·kW·PIECE_SHARE pieces)
ROWS_IN_PIECES = True
PIECE_SHARE = 2


def grad_weight_rows(kernels: Kernels, a: Encoded, x_shape: Sequence[int],
                     place: Callable[[int, int], torch.Tensor], x_scale: torch.Tensor,
                     kernel: Sequence[int], dilation: Sequence[int],
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """∇W of a stride-1 convolution without the full im2col: ``a`` the gradient codes
    (R, N·H'·W') with rows = output channels and their scale (per row or tensor), the
    activation codes ``x`` zero-padded channels-last (N, Hp, Wp, C) = ``x_shape``, given
    as ``place(n0, n1)``: samples ``n0:n1`` of ``x``, contiguous (1-byte codes), with the
    per-tensor ``x_scale`` (1, 1) → (R, kH·kW·C) in ``out_dtype``, column order (i, j, c):
    bitwise :func:`exact_gemm` of ``a`` and ``im2col(patches(x))`` (the same integer sums,
    the same epilogue).

    The patches are built over the kernel's columns only — ``X3[(n, h, w), (j, c)] =
    x[n, h, w + j·d, c]`` for every padded row ``h`` — a third of im2col's bytes for a
    3×3 kernel; kernel row ``i`` then reads ``X3`` shifted by ``i·d·W'`` rows, against
    ``a`` placed on the same (n, h, w) grid with zero rows where ``h ≥ H'`` (a shift past
    a sample's last output row multiplies zeros). One exact int32 GEMM per kernel row
    (summed length ``N·Hp·W'``), the accumulators side by side, one epilogue. The samples
    go in pieces whose patches hold at most ``x``'s bytes over :data:`PIECE_SHARE` (about
    ``kW·PIECE_SHARE`` pieces; the int32 sums of the pieces added: the same exact sums),
    so the patches — and the right operand ``_int_mm`` packs from them, as large — never
    take ≈ ``kW``× the input's memory at once; each piece's samples of ``x`` are placed
    for it alone (``place``) and dropped once patched, so the whole placed input is never
    held either; one patches buffer and one padded-codes buffer serve every piece. Returns
    ``None`` (the caller uses :func:`im2col`) where that length exceeds ``int8.MAX_K``, or
    off the CPU (``_int_mm``'s CUDA shape rules are the im2col path's to check).
    Measured: docs/benchmarks.md "Predictions and outcomes" 13."""
    n, hp, wp, c = x_shape
    kh, kw = kernel
    ho, wo = hp - dilation[0] * (kh - 1), wp - dilation[1] * (kw - 1)
    length = n * hp * wo
    if a.codes.device.type != "cpu" or not 0 < length <= int8.MAX_K or min(ho, wo) < 1 \
            or a.codes.shape[1] != n * ho * wo:
        return None
    # samples in pieces whose column patches are at most half the placed input's size
    # (about 2·kW pieces): the patches of the whole batch were ≈ kW× it, the largest buffer
    # of a CNN's backward, and _int_mm packs about as many bytes again; the integer sums
    # are exact, so the pieces' sum is the whole's
    per = min(n, max(1, n * wp // (wo * kw * PIECE_SHARE))) if ROWS_IN_PIECES else n
    r = a.codes.shape[0]
    codes = a.codes.view(r, n, ho * wo)
    step = dilation[0] * wo  # rows between kernel rows i and i + 1
    # one patches buffer and one padded-codes buffer for every piece: the rows past a
    # piece's end that the last kernel rows' shifts read, and the codes' rows h ≥ H'
    # (zero gradient), are zero
    x3 = a.codes.new_empty(per * hp * wo + (kh - 1) * step, kw * c)
    x3[per * hp * wo:].zero_()
    ap = a.codes.new_empty(r, per, hp, wo)
    ap[:, :, ho:].zero_()
    acc = a.codes.new_empty(kh, r, kw * c, dtype=torch.int32)  # kernel row i's sums at acc[i]
    for n0 in range(0, n, per):
        n1 = min(n, n0 + per)
        _rows_acc(codes[:, n0:n1], place(n0, n1), (kh, kw), dilation, x3, ap, acc, n0 == 0)
    del x3, ap
    acc = acc.transpose(0, 1).reshape(r, kh * kw * c)  # columns (i, j, c)
    with scope("lowbit::epilogue"):
        return int8.epilogue(kernels, acc, a.scale, x_scale, None, None, None, None,
                             a.codes.shape[1], None, out_dtype)


def _rows_acc(codes: torch.Tensor, x: torch.Tensor, kernel: Sequence[int], dilation: Sequence[int],
              x3: torch.Tensor, ap: torch.Tensor, acc: torch.Tensor, first: bool) -> None:
    """The int32 sums of :func:`grad_weight_rows` over the placed samples ``x`` (n, Hp,
    Wp, C) and their gradient codes ``codes`` (R, n, H'·W'), written (``first``) or added
    into ``acc`` (kH, R, kW·C), kernel row ``i`` at ``acc[i]``: ``x``'s column patches
    copied into the front of ``x3``, the codes into ``ap`` (R, ≥ n, Hp, W'), whose rows
    h ≥ H' are zero, as are ``x3``'s rows past the end of a whole piece (a shorter last
    piece zeroes its own)."""
    kh, kw = kernel
    n, hp, _, c = x.shape
    r, wo = codes.shape[0], ap.shape[3]
    ho, length = hp - dilation[0] * (kh - 1), n * hp * wo
    step = dilation[0] * wo  # rows between kernel rows i and i + 1
    sn, sh, sw, sc = x.stride()
    dst, src = x3[:length].view(n, hp, wo, kw, c), x.as_strided((n, hp, wo, kw, c), (sn, sh, sw, sw * dilation[1], sc))
    words = as_words(dst, src)  # C-byte runs copied as words (im2col's rule)
    (dst, src) = words if words is not None else (dst, src)
    dst.copy_(src)
    grid_notes.derived(x3, x)  # the buffer holds x's codes now (a coverage trace's grid)
    del x, src, dst, words  # the placed samples (the caller's only reference): their patches are what the GEMMs read
    if length + (kh - 1) * step < x3.shape[0]:  # a shorter last piece: the rows its shifts read past its end
        x3[length:length + (kh - 1) * step].zero_()
    ap[:, :n, :ho] = codes.view(r, n, ho, wo)
    a = ap[:, :n].view(r, length)  # rows R apart by a whole piece's codes
    with scope("lowbit::gemm"):
        for i in range(kh):
            part = int8.int_mm(a, x3[i * step:i * step + length])
            if first:
                acc[i].copy_(part)
            else:
                acc[i].add_(part)
            del part


def epilogue_nchw(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`reference.int8_epilogue` of ``acc`` (N, *spatial, C) int32 (no offsets),
    written as a new contiguous (N, C, *spatial) tensor (never a view: a layer returns
    it), or into ``out`` (that shape, contiguous, ``out_dtype``: a piece of a larger
    result) and returned: ``a_scale`` (N, 1, …, 1) or all ones, ``b_scale`` (1, …, 1, C)
    or all ones, ``bias`` (C,) or ``None``. Per element the same operations as the
    epilogue of the (N·P, C) GEMM output, so bitwise the same values."""
    res = reference.int8_epilogue(acc, a_scale, b_scale, None, None, None, None, 0, bias, out_dtype).movedim(-1, 1)
    return res.clone(memory_format=torch.contiguous_format) if out is None else _into(out, res, out_dtype)


def _into(out: torch.Tensor, res: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """``res`` copied into ``out``, which must have its shape and ``out_dtype`` (an epilogue's
    ``out``: a copy would broadcast or cast in silence); ``ValueError`` otherwise."""
    if out.shape != res.shape or out.dtype != out_dtype:
        raise ValueError(f"epilogue out: expected {out_dtype} {tuple(res.shape)}, got {out.dtype} {tuple(out.shape)}")
    return out.copy_(res)


register_fused("int8_epilogue_nchw", epilogue_nchw)
register("int8_epilogue_nchw", Impl.NATIVE, avx512.run_epilogue_nchw, ("cpu",), avx512.supports_epilogue_nchw)


def epilogue_nhwc(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`epilogue_nchw`'s values in the accumulator's own layout: ``acc`` (N,
    *spatial, C) → (N, C, *spatial) whose memory is channels-last (a channels-last
    model's output, with no transposing pass), or into ``out`` (that shape and memory,
    ``out_dtype``) and returned. Without ``out`` the native kernel may write over a float32
    ``acc``; callers pass one they do not read again."""
    res = reference.int8_epilogue(acc, a_scale, b_scale, None, None, None, None, 0, bias, out_dtype)
    return res.contiguous().movedim(-1, 1) if out is None else _into(out, res.movedim(-1, 1), out_dtype)


register_fused("int8_epilogue_nhwc", epilogue_nhwc)
register("int8_epilogue_nhwc", Impl.NATIVE, avx512.run_epilogue_nhwc, ("cpu",), avx512.supports_epilogue_nhwc)


def gemm_nchw(kernels: Kernels, a_codes: torch.Tensor, a_scale: torch.Tensor, b: Encoded,
              spatial: Sequence[int], bias: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """``â @ b̂ + bias`` as :func:`exact_gemm`, for ``a``'s rows (sample, position):
    ``a_codes`` (N·P, K) with ``P = prod(spatial)``, ``a_scale`` per sample (N, 1) or per
    tensor (1, 1), ``b`` (K, C) → a new contiguous (N, C, *spatial) in ``out_dtype``, or
    written into ``out`` (that shape, contiguous: a piece of samples of a larger result)
    and returned. With the integer GEMM in one piece (``K ≤ int8.MAX_K``) the epilogue
    writes that layout in its one pass (:func:`epilogue_nchw`); otherwise
    :func:`exact_gemm` with the scale repeated over each sample's rows, then a permuting
    copy. Raises ``ValueError`` where the rows are not N samples of P positions or the
    scale is neither."""
    m, c, p = a_codes.shape[0], b.codes.shape[1], math.prod(spatial)
    n = m // p if p else 0
    if p == 0 or m != n * p or a_scale.shape[0] not in (1, n):
        raise ValueError(f"gemm_nchw: {m} rows are not samples of {tuple(spatial)} positions, or "
                         f"the scale {tuple(a_scale.shape)} is neither per sample nor per tensor")
    ones = (1,) * len(spatial)
    if a_codes.shape[1] <= int8.MAX_K and kernels.backend in (Backend.AUTO, Backend.INT8) \
            and b.offset is None and int8.supports(Encoded(a_codes, a_scale[:1]), b):
        with scope("lowbit::gemm"):
            acc = int8.int_mm(a_codes, b.codes)
        sa, sb = int8.safe_scales(a_scale, b.scale, a_codes.shape[1], shift=True)  # (no offsets here)
        with scope("lowbit::epilogue"):
            return kernels.run("int8_epilogue_nchw", acc.view(n, *spatial, c),
                               sa.reshape(sa.shape[0], *ones, 1), sb.reshape(*ones, 1, sb.shape[1]), bias,
                               out_dtype, *(() if out is None else (out,)))
    rows = a_scale if a_scale.shape[0] == 1 else a_scale.repeat_interleave(p, dim=0)
    y = exact_gemm(kernels, Encoded(a_codes, rows), b, bias, out_dtype).reshape(n, *spatial, c).movedim(-1, 1)
    return y.clone(memory_format=torch.contiguous_format) if out is None else _into(out, y, out_dtype)


# The patches of an im2col GEMM (patch_gemm_nchw) in pieces of samples (False: the whole
# batch at once; a benchmark toggle, benchmarks/bench_toggle.py conv-im2col-pieces)
IM2COL_IN_PIECES = True


def sample_pieces(n: int, patch_bytes: int, budget: int, device: torch.device) -> int:
    """Samples per piece for patches of ``patch_bytes`` (all ``n`` samples): pieces whose
    patches hold at most ``budget`` bytes (at least one sample a piece), on the CPU; ``n``
    elsewhere (on CUDA a piece's GEMM could fall under ``_int_mm``'s shape rules — more
    than 16 rows — and run simulated) and where :data:`IM2COL_IN_PIECES` is off."""
    if not IM2COL_IN_PIECES or patch_bytes <= budget or torch.device(device).type != "cpu":
        return n
    return min(n, max(1, n * budget // patch_bytes))


def integer_route(kernels: Kernels, a_scale: torch.Tensor, b: Encoded) -> bool:
    """Whether :meth:`Kernels.gemm` of int8 codes with ``a_scale`` (per row or tensor) and
    ``b`` (K ≤ ``int8.MAX_K``, C) runs on the integer GEMM — whose epilogue makes its
    scales safe (:func:`int8.safe_scales`), so a caller may make them safe once for
    several pieces of rows — rather than a simulated one, which dequantizes with the
    scales as they come."""
    k = b.codes.shape[0]
    rows = Encoded(torch.zeros(1, k, dtype=torch.int8, device=b.codes.device), a_scale[:1])
    return kernels.backend in (Backend.AUTO, Backend.INT8) and 0 < k <= int8.MAX_K and int8.supports(rows, b)


def patch_gemm_nchw(kernels: Kernels, x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int],
                    dilation: Sequence[int], a_scale: torch.Tensor, b: Encoded,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """:func:`gemm_nchw` of ``im2col(patches(x))``: ``x`` the placed codes (N, Hp, Wp, C)
    (contiguous channels-last, 1-byte), ``a_scale`` per sample (N, 1) or per tensor,
    ``b`` (kH·kW·C, C_out) → (N, C_out, H', W') in ``out_dtype``, contiguous. The samples
    go in pieces whose patches hold at most ``x``'s bytes over :data:`PIECE_SHARE`
    (:func:`sample_pieces`; about ``kH·kW·PIECE_SHARE`` pieces at stride 1: the whole
    batch's patches were ≈ ``kH·kW``× ``x``): each piece's patches, int32 product and
    epilogue, written into its samples of the result, before the next piece's exist. The
    epilogue's scales are made safe once for the whole batch (:func:`int8.safe_scales`),
    so every piece rounds in the same dtype: bitwise the one-piece result."""
    p = patches(x, kernel, stride, dilation)  # (N, H', W', kH, kW, C) view
    n, ho, wo = p.shape[:3]
    per = sample_pieces(n, n * ho * wo * kernel[0] * kernel[1] * x.shape[3], x.numel() // PIECE_SHARE, x.device)
    if per >= n or not integer_route(kernels, a_scale, b):  # (elsewhere the scales' dtype is the GEMM's own)
        return gemm_nchw(kernels, im2col(p, 0, 1), a_scale, b, (ho, wo), bias, out_dtype)
    sa, sb = int8.safe_scales(a_scale, b.scale, b.codes.shape[0])  # one dtype for every piece
    b = dataclasses.replace(b, scale=sb)
    out = torch.empty(n, b.codes.shape[1], ho, wo, dtype=out_dtype, device=x.device)
    for n0 in range(0, n, per):
        gemm_nchw(kernels, im2col(p[n0:n0 + per], 0, 1), sa[n0:n0 + per] if sa.shape[0] > 1 else sa, b,
                  (ho, wo), bias, out_dtype, out[n0:n0 + per])
    return out


__all__ = ["as_words", "channels_last", "chunks_supported", "col2im", "epilogue_nchw", "epilogue_nhwc", "exact_gemm",
           "gemm_nchw", "grad_weight_rows", "im2col", "integer_route", "nhwc", "patch_gemm_nchw", "patches", "place",
           "place_codes", "sample_pieces"]
