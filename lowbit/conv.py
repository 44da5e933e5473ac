"""Fully quantized convolutions: the three GEMMs of a conv layer by name.

    conv_output       Y  = Q_f(X) ⊛ Q_f(W)  (+ b)
    conv_grad_input   ∇X = Q_a(∇Y) ⊛ᵀ Q_f(W)   (the transposed convolution)
    conv_grad_weight  ∇W = Q_w(∇Y) ⋆ Q_f(X)    (correlation over samples and positions)

The reference (``backend="reference"``, and wherever an operand is not plain int8 codes
on a symmetric grid) dequantizes and runs float32 convolutions (float64 for float64
operands): it defines the estimator.
Otherwise each is an integer GEMM on im2col patches of the int8 codes, channels-last
(:mod:`lowbit.kernels.im2col`), or oneDNN's exact int8 convolution
(:mod:`lowbit.kernels.qconv`), one GEMM per group, with the same quantized operands
(same noise stream) and an exact int32/int64 sum, scaled once:

* output: rows (sample, output position) × columns output channels, summed over
  (kernel position, input channel of the group); scales: the activation's per tensor or
  per sample (rows), the weight's per tensor or per output channel (columns);
* ∇X, the transposed convolution: a convolution of ``∇Y``'s codes (padded by
  ``d(k − 1) − p``; at stride > 1 placed ``s`` apart among zeros) with the flipped
  kernel, rows (sample, input position), summed over (kernel position, output channel),
  on oneDNN where it is exact (at stride > 1: where :func:`zero_insert_pays`); otherwise,
  at stride 1 the same as im2col GEMMs, at stride > 1 the GEMM ``∇Y`` (rows (sample,
  output position)) × ``W``, summed over output channels, then col2im (float32 adds).
  ``Q_a`` has rows = samples, so its scale and its row transform (BHQ/Hadamard mix
  samples) sit on the output's sample rows: ``T⁻¹`` applies after the GEMM (and the
  scatter), as for Linear. A per-output-channel weight scale is on the summed
  dimension: that GEMM runs simulated;
* ∇W: rows output channels (``Q_w``'s rows: scale and transform) × columns (kernel
  position, input channel), summed over (sample, output position) — ``N·H'·W'`` may
  exceed ``int8.MAX_K``, so the sum is split (:func:`~lowbit.kernels.im2col.exact_gemm`);
  at stride 1 with one group and a per-tensor activation scale, one GEMM per kernel row
  on patches of the kernel's columns only (:func:`~lowbit.kernels.im2col.grad_weight_rows`,
  bitwise the same). A per-sample activation scale is on the summed dimension, and with groups a row
  transform (BHQ/Hadamard) mixes the groups' output channels: both run simulated.

The integer result differs from the reference only by float32 rounding: the integer
sums are exact, the epilogue rounds ``acc·s_a·s_b``, and ∇X's col2im (stride > 1 without
oneDNN) adds kH·kW float32 terms per element, where the reference rounds every term of
its float32 sums.
``backend="int8"``/``"fp8"`` raise ``ValueError`` (:func:`lowbit.conv_dispatch.refuse_simulated`) wherever a
GEMM would run simulated: FP8 convolutions always (no ``_scaled_mm`` convolution kernel),
int8 on non-int8 codes, asymmetric grids, block scales, a scale on the summed dimension,
or a grouped ∇W under a mixing transform.
The backward GEMMs run inside ``lowbit::grad_input`` / ``lowbit::grad_weight`` profiler
scopes, which name their pass to :mod:`lowbit.coverage`.
Block formats (MXFP8, MXFP4, NVFP4; always simulated here) take their blocks along
channels: X, W and ∇X's ∇Y are quantized as rows with the channels innermost — (N, H·W·C),
W as (C_out, kH·kW·C/g) — so a block runs along channels, the summed dimension
(:func:`conv_rows`, :func:`conv_values`; where C is not a multiple of the block, a block
also takes the next position's first channels); ∇W's ∇Y rows (C_out, N·H'·W') are blocked
along the samples and positions it sums over. Other formats keep NCHW rows. The three
GEMM functions below take block-format operands in that order (``conv_rows``).
Conv1d is the conv2d block on a height-1 image. ``params`` of a block: (stride_h,
stride_w, padding_h, padding_w, dilation_h, dilation_w, groups[, layout]).

**Memory layout** (``layout``, conv2d only; :func:`memory_layout` decides it from the
call's tensors): PyTorch's rule — the output (and ∇X) is channels-last where the input or
the weight is — kept, so that a channels-last model's BatchNorm and ReLU stay on their
channels-last kernels. ``CL_OUT``: oneDNN's (N, H', W', C) accumulator becomes Y without
a transposing pass, ∇X likewise, and a channels-last ∇Y is quantized where it lies (the
pair kernel reads it in 16 × 16 tiles). ``CL_CODES`` adds X's codes in NHWC order, read
from the input's own memory, where the activation quantizer is order-free (round to
nearest, no block scales: each code depends on its value and its sample's or the
tensor's scale only), so oneDNN and ∇W's placement read them without a transpose. The
codes, the noise indices and every value are those of the NCHW path (tested bitwise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from . import grid_notes
from .scopes import scope
from torch._prims_common import are_strides_like_channels_last_or_false, suggest_memory_format

from .config import Backend, FQTConfig, GradSpec
from .conv_dispatch import integer_path, refuse_simulated, run_simulated, simulated_cause
from .gradpair import quantize_grad_w, quantize_grad_pair
from .functional import (Generators, bias_grad, call_state, per_call, check_conv_args, check_conv_padding, check_dtypes,
                         conv_geometry, output_dtype, quantize_forward, quantize_gradient, same_padding)
from .kernels import Encoded, Kernels, avx512, int8, kernels_for, qconv
from .kernels.im2col import (channels_last, col2im, exact_gemm, grad_weight_rows, im2col, integer_route,
                             patch_gemm_nchw, patches, sample_pieces)
from .formats import Rounding, compute_dtype
from .noise import Path
from .ops import BlockKind, BlockMeta, BlockState, Trackers, apply_block, in_format, register_kind
from .quantizers import QuantizedOperand
from .quantizers.base import Identity, is_identity
from .ranges import RangeTracker


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


NCHW, CL_OUT, CL_CODES = 0, 1, 2  # a conv2d block's layout (params[7]; absent: NCHW)


def _suggested(t: torch.Tensor) -> torch.memory_format:
    """``suggest_memory_format(t)`` for a 4-D ``t``, also under ``torch.jit.trace``
    (whose traced sizes are tensors, which it refuses: "Expected bool"): there its test
    on ``t``'s sizes and strides read as integers, the same answer."""
    if torch.jit.is_tracing():  # the trace is specialised to these sizes anyway
        cl = are_strides_like_channels_last_or_false([int(n) for n in t.shape], [int(n) for n in t.stride()])
        return torch.channels_last if cl and t.dim() == 4 and t.layout == torch.strided else torch.contiguous_format
    return suggest_memory_format(t)


def memory_layout(x: torch.Tensor, weight: torch.Tensor, activation: Any) -> int:
    """The layout of a conv2d block on ``x`` (N, C, H, W) and ``weight``: ``NCHW``
    unless PyTorch's convolutions would return channels-last here (the input's or the
    weight's suggested memory format is channels-last); then ``CL_CODES`` where ``x`` is
    channels-last contiguous and ``activation`` (an ``OperandSpec``) is order-free, else
    ``CL_OUT`` (module docstring)."""
    cl = torch.channels_last
    if x.dim() != 4 or weight.dim() != 4 or not (_suggested(x) == cl or _suggested(weight) == cl):
        return NCHW
    order_free = activation is not None and activation.rounding is Rounding.NEAREST \
        and not activation.format.block
    return CL_CODES if order_free and x.is_contiguous(memory_format=cl) else CL_OUT


def _layout(params: Sequence[int]) -> int:
    return int(params[7]) if len(params) > 7 else NCHW


def out_format(params: Sequence[int]) -> torch.memory_format:
    """The memory format of a conv2d block's Y and ∇X."""
    return torch.channels_last if _layout(params) != NCHW else torch.contiguous_format


def channels_inner(spec: Any) -> bool:
    """Whether a convolution operand quantized under ``spec`` (an ``OperandSpec`` or
    ``GradSpec``; ``None``: not quantized) takes its rows with the channels innermost: a
    block format's (MXFP8, MXFP4, NVFP4) blocks of 32 (16) consecutive elements then run
    along channels — the dimension a convolution sums over, as an MX convolution kernel
    blocks it (docs/METHOD.md §6) — not along positions of one channel. Where the channel
    count (``C/g`` for a weight) is not a multiple of the block, a block also takes the
    first channels of the next position (kernel tap)."""
    return spec is not None and bool(spec.format.block)


def conv_rows(t: torch.Tensor, spec: Any) -> torch.Tensor:
    """A convolution operand ``t`` (N, C, *spatial) — X, W (C_out, C/g, kH, kW), or ∇Y on
    the ∇X path — as the rows its quantizer takes: (N, C·spatial) in NCHW order (a copy
    of channels-last memory: :func:`lowbit.kernels.avx512.cl_rows` where it runs), or
    (N, spatial·C) where :func:`channels_inner` (block formats; a view of channels-last
    memory, a copy of NCHW memory)."""
    if channels_inner(spec) and t.dim() > 2:
        return _rows(t.movedim(1, -1))
    # a channels-last t's NCHW rows are a copy: the AVX-512 transpose where it runs, else torch's
    return avx512.cl_rows(t) if t.dim() > 2 and not t.is_contiguous() and avx512.supports_cl_rows(t) else _rows(t)


def conv_values(q: QuantizedOperand, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q``'s dequantized values as ``dtype`` in ``shape`` (N, C, *spatial), contiguous,
    from rows in :func:`conv_rows`'s order (channels innermost where ``q`` has block
    scales)."""
    if not q.block or len(shape) < 3:
        return _dq(q, shape, dtype)
    return q.dequantize(dtype).reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1).contiguous()


def conv_quantized(t: torch.Tensor, spec: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``Q_f(t)`` of a convolution's ``X`` or ``W`` (N, C, *spatial) as a converted layer
    makes it (rows in :func:`conv_rows`'s order, round to nearest), dequantized as ``dtype``
    (default :func:`~lowbit.formats.compute_dtype` of ``t``'s), in ``t``'s shape: the
    operand the variance monitor and :mod:`lowbit.analysis` rebuild."""
    return conv_values(quantize_forward(conv_rows(t, spec), spec), t.shape, dtype or compute_dtype(t.dtype))


def _x_rows(x: torch.Tensor, layout: int, spec: Any = None) -> torch.Tensor:
    """The activation operand: (N, C·H·W), or under ``CL_CODES`` the (N, H·W·C) view of
    x's channels-last memory, and for block formats (N, H·W·C) whatever the memory
    (:func:`conv_rows`)."""
    return _rows(x.permute(0, 2, 3, 1)) if layout == CL_CODES else conv_rows(x, spec)


def _dq_x(qx: QuantizedOperand, x_shape: Sequence[int], layout: int,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """X's dequantized (N, C, H, W) values as ``dtype`` from codes in either order,
    contiguous: a simulated float convolution then sums in the NCHW path's order."""
    if layout == CL_CODES:
        n, c, h, w = x_shape
        return in_format(qx.dequantize(dtype).reshape(n, h, w, c).permute(0, 3, 1, 2))
    return in_format(conv_values(qx, x_shape, dtype))


def _place(k: Kernels, codes: torch.Tensor, *args: Any) -> torch.Tensor:
    """The kernel-table op ``int8_place_nhwc`` on ``codes``; the placed codes hold the same
    grid (told to a running coverage trace: :func:`lowbit.grid_notes.derived`)."""
    out = k.run("int8_place_nhwc", codes, *args)
    grid_notes.derived(out, codes)
    return out


def _placed_x(k: Kernels, qx: QuantizedOperand, x_shape: Sequence[int], padding: Sequence[int],
              layout: int, samples: slice = slice(None)) -> torch.Tensor:
    """X's codes zero-padded by ``padding``, (N, H + 2p, W + 2p, C) int8 (only the
    ``samples``' rows): placed by the transposing kernel from NCHW codes, a padded copy
    from NHWC ones."""
    n, c, h, w = x_shape
    size = (h + 2 * padding[0], w + 2 * padding[1])
    rows = qx.codes[samples]  # a sample's codes are one row
    if layout != CL_CODES:
        return _place(k, rows, (rows.shape[0], c, h, w), size, padding)
    codes = rows.view(rows.shape[0], h, w, c)
    if list(padding) == [0, 0]:
        return codes
    out = codes.new_zeros(codes.shape[0], *size, c)
    out[:, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = codes
    return out


def _geometry(params: Sequence[int]) -> tuple[list[int], list[int], list[int], int]:
    return list(params[0:2]), list(params[2:4]), list(params[4:6]), int(params[6])


def _valid(x_shape: Sequence[int], w_shape: Sequence[int], params: Sequence[int]) -> bool:
    """Whether ``F.conv2d`` accepts this geometry (else the reference path runs it and
    raises torch's own error)."""
    stride, padding, dilation, groups = _geometry(params)
    if len(x_shape) != 4 or len(w_shape) != 4 or groups < 1 or x_shape[1] != w_shape[1] * groups \
            or w_shape[0] % groups or min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        return False
    return all(x_shape[2 + i] + 2 * padding[i] >= dilation[i] * (w_shape[2 + i] - 1) + 1
               for i in range(2))


def _per_row(scale: torch.Tensor, repeat: int) -> torch.Tensor:
    """A per-sample (N, 1) scale repeated over each sample's ``repeat`` GEMM rows."""
    return scale if scale.shape[0] == 1 else scale.repeat_interleave(repeat, dim=0)


def _group(scale: torch.Tensor, g: int, size: int) -> torch.Tensor:
    return scale if scale.shape[0] == 1 else scale[g * size:(g + 1) * size]


def _weight_rows(qw: QuantizedOperand, w_shape: Sequence[int]) -> torch.Tensor:
    """W's codes (C_out, C/g, kH, kW) as (C_out, kH·kW·C/g), column order (i, j, c)."""
    co, cg, kh, kw = w_shape
    return qw.codes.reshape(co, cg, kh, kw).permute(0, 2, 3, 1).reshape(co, kh * kw * cg)


def _dq(q: QuantizedOperand, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q``'s dequantized values as ``dtype`` (the compute dtype of the simulated
    convolution: float64 for float64 operands), reshaped to ``shape``."""
    return q.dequantize(dtype).reshape(shape)


def _onednn(k: Kernels, codes: torch.Tensor, w_shape: Sequence[int], groups: int, size: Sequence[int],
            stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether a convolution of ``codes`` (an input of spatial ``size``) by a ``w_shape``
    kernel under this geometry runs on oneDNN's exact int8 convolution
    (:mod:`lowbit.kernels.qconv`): integer kernels allowed, and exact there."""
    return k.backend in (Backend.AUTO, Backend.INT8) and \
        qconv.available(codes, w_shape, groups, size, stride, padding, dilation)


def _unsigned_nhwc(k: Kernels, codes: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Row-major int8 codes of a (N, C, H, W) tensor as the uint8 ``code + 128``
    (N, C, H, W) operand of oneDNN's convolution: channels-last memory, which oneDNN reads
    without a copy, where the AVX-512 ``int8_place_nhwc`` kernel writes it (one transposing
    pass); from the reference kernel, NCHW memory, which oneDNN copies."""
    n, c, h, w = shape
    return _place(k, codes, shape, (h, w), (0, 0), (1, 1), True).permute(0, 3, 1, 2)


def _epilogue(k: Kernels, acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, length: int,
              channels_last: bool = False, out: torch.Tensor | None = None, safe: bool = False) -> torch.Tensor:
    """``acc·s_a·s_b + bias`` of an exact (N, C, H, W) float32 accumulator in
    channels-last memory (oneDNN's) of sums of ``length`` code products, ``a_scale`` per
    sample or tensor, ``b_scale`` per channel or tensor → (N, C, H, W), contiguous, or
    with ``channels_last`` in the accumulator's channels-last memory (possibly written
    over it), or written into ``out`` (that layout): the epilogue of the integer GEMM, the
    same arithmetic (in float64 where float32 could overflow:
    :func:`lowbit.kernels.int8.safe_scales`; ``safe``: the caller made them so already)."""
    if not safe:
        a_scale, b_scale = int8.safe_scales(a_scale, b_scale, length, shift=True)  # (a convolution's: no offsets)
    args = (acc.permute(0, 2, 3, 1), a_scale.reshape(-1, 1, 1, 1), b_scale.reshape(1, 1, 1, -1), bias, out_dtype)
    with scope("lowbit::epilogue"):
        return k.run("int8_epilogue_nhwc" if channels_last else "int8_epilogue_nchw", *args,
                     *(() if out is None else (out,)))


# Whether ∇X on oneDNN's convolution runs its samples in pieces where the epilogue writes a
# narrower result or the convolution copies the codes to float32 (False: the whole batch at
# once; a benchmark toggle, bench_toggle.py conv-acc-pieces), and how many (the output's
# convolution runs whole)
ACC_IN_PIECES = True
ACC_PIECES = 3


def acc_pieces(n: int, out_dtype: torch.dtype, in_place: bool) -> int:
    """How many pieces of samples :func:`_conv_epilogue` runs oneDNN's convolution of
    ``n`` samples in: :data:`ACC_PIECES` (at most ``n``; 2 for 4 samples, as pieces of
    ``⌈n / ACC_PIECES⌉`` samples make) where the result is narrower than
    the float32 accumulator (bfloat16, float16) — the whole accumulator beside the result
    was then the largest pair of buffers of a CNN's backward (docs/benchmarks.md "The
    CNN's peak under bf16's") — or where the convolution runs on float32 copies of the
    codes (:func:`lowbit.kernels.qconv.float32_engine`: a zero-inserted ∇Y's copy is as
    large as ∇X; whole, a wide stride-2 ∇X's step peaked 6–8% above the route before it, a
    review), else one (a float32 result is as large as the accumulator, or written over
    it: ``in_place``)."""
    if not ACC_IN_PIECES:
        return 1
    if qconv.float32_engine() or (not in_place and out_dtype.itemsize < 4):
        per = -(-n // max(1, min(n, ACC_PIECES)))  # samples a piece: the pieces are that many apart
        return -(-n // per) if n else 1
    return 1


def _conv_epilogue(k: Kernels, held: list[torch.Tensor], w_codes: torch.Tensor, geometry: tuple[Any, ...],
                   a_scale: torch.Tensor, b_scale: torch.Tensor, bias: torch.Tensor | None,
                   out_dtype: torch.dtype, length: int, channels_last: bool,
                   pieces: int | None = None) -> torch.Tensor:
    """oneDNN's exact convolution (:func:`lowbit.kernels.qconv.conv_acc`, ``geometry`` its
    stride, padding, dilation and groups) of the codes ``held[0]`` — handed over (popped),
    so they are freed once the last piece has read them — with ``w_codes``, and its
    :func:`_epilogue`, in :func:`acc_pieces` pieces of samples: each piece's float32
    accumulator is written into its samples of the result and freed before the next
    exists, so the whole accumulator (4 bytes a result element) never sits beside the
    result. The weight is packed once for all pieces; each element gets the same exact
    sum and the same epilogue (its scales made safe once, over the whole batch: the same
    dtype for every piece), so the result is bitwise the one-piece one."""
    xu = held.pop()
    n = xu.shape[0]
    if pieces is None:
        pieces = acc_pieces(n, out_dtype, channels_last and out_dtype == torch.float32)
    if pieces == 1:
        with scope("lowbit::gemm"):
            acc = qconv.conv_acc(xu, w_codes, *geometry)
        del xu  # freed before the epilogue's output exists
        return _epilogue(k, acc, a_scale, b_scale, bias, out_dtype, length, channels_last)
    a_scale, b_scale = int8.safe_scales(a_scale, b_scale, length, shift=True)  # one dtype for every piece (no offsets)
    with scope("lowbit::gemm"):
        packed = qconv.prepack(w_codes, *geometry, xu.shape)
    per, out = -(-n // pieces), None
    for n0 in range(0, n, per):
        with scope("lowbit::gemm"):
            acc = qconv.conv_acc(xu[n0:n0 + per], w_codes, *geometry, packed=packed)
        if out is None:  # (N, C_out, H', W') in the epilogue's layout
            out = torch.empty(n, *acc.shape[1:], dtype=out_dtype,
                              memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        sa = a_scale[n0:n0 + per] if a_scale.shape[0] > 1 else a_scale
        _epilogue(k, acc, sa, b_scale, bias, out_dtype, length, channels_last, out[n0:n0 + per], safe=True)
        del acc
    return out  # type: ignore[return-value]


# -- the three GEMMs ---------------------------------------------------------------------
def conv_output(qx: QuantizedOperand, qw: QuantizedOperand, x_shape: Sequence[int],
                w_shape: Sequence[int], params: Sequence[int], backend: Backend,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Y = Q_f(X) ⊛ Q_f(W) + b``: ``qx`` rows = samples of X (N, C, H, W), ``qw`` rows
    = output channels of W (C_out, C/groups, kH, kW), each in :func:`conv_rows`'s order
    (channels innermost for block formats) → Y (N, C_out, H', W') as
    ``out_dtype`` (contiguous, or channels-last under a channels-last ``params`` layout
    where oneDNN runs it). ``qx``'s codes in NHWC order under ``CL_CODES``."""
    stride, padding, dilation, groups = _geometry(params)
    layout = _layout(params)
    if not _valid(x_shape, w_shape, params) or not integer_path(backend, qx, qw) \
            or Backend(backend) is Backend.FP8:
        if _valid(x_shape, w_shape, params):  # else torch's own error, below
            refuse_simulated(backend, "output", (qx, qw))
        dt = compute_dtype(out_dtype)  # float64 operands compute in float64
        b = None if bias is None else bias.to(dt)
        with grid_notes.simulating(lambda: simulated_cause(backend, (qx, qw))):
            y = F.conv2d(_dq_x(qx, x_shape, layout, dt), conv_values(qw, w_shape, dt), b, stride, padding,
                         dilation, groups)
        return y.to(out_dtype)
    n, c, h, w = x_shape
    co, cg, kh, kw = w_shape
    k = kernels_for(backend, qx.codes.device)
    if _onednn(k, qx.codes, w_shape, groups, (h, w), stride, padding, dilation):  # exact sums
        held = [qx.codes.view(n, h, w, c).permute(0, 3, 1, 2) if layout == CL_CODES else
                _unsigned_nhwc(k, qx.codes, x_shape)]  # an unsigned copy (NCHW layouts): handed over
        return _conv_epilogue(k, held, qw.codes.view(w_shape), (stride, padding, dilation, groups), qx.scale,
                              qw.scale, bias, out_dtype, cg * kh * kw, layout != NCHW, pieces=1)
    x = _placed_x(k, qx, x_shape, padding, layout)
    wl = _weight_rows(qw, w_shape)
    if groups == 1:  # the epilogue writes (N, C_out, H'·W'), in pieces of samples
        return patch_gemm_nchw(k, x, (kh, kw), stride, dilation, qx.scale, Encoded(wl, qw.scale).t(), bias,
                               out_dtype)
    p = patches(x, (kh, kw), stride, dilation)  # (N, H', W', kH, kW, C) view
    ho, wo = p.shape[1], p.shape[2]
    a_scale = _per_row(qx.scale, ho * wo)
    cog = co // groups
    outs = [exact_gemm(k, Encoded(im2col(p, g, groups), a_scale),
                       Encoded(wl[g * cog:(g + 1) * cog], _group(qw.scale, g, cog)).t(),
                       None if bias is None else bias[g * cog:(g + 1) * cog], compute_dtype(out_dtype))
            for g in range(groups)]
    y = outs[0] if groups == 1 else torch.cat(outs, 1)  # (N·H'·W', C_out)
    return y.reshape(n, ho, wo, co).permute(0, 3, 1, 2).to(out_dtype, memory_format=torch.contiguous_format)


def conv_grad_input(gy: torch.Tensor, qw: QuantizedOperand, spec: GradSpec | None,
                    generator: torch.Generator | None, backend: Backend, x_shape: Sequence[int],
                    w_shape: Sequence[int], params: Sequence[int],
                    out_dtype: torch.dtype = torch.float32,
                    tracker: RangeTracker | None = None,
                    qa: QuantizedOperand | None = None, release: bool = False) -> torch.Tensor:
    """``∇X = Q_a(∇Y) ⊛ᵀ Q_f(W)``: ``gy`` (N, C_out, H', W'), quantized with rows =
    samples (``spec=None``: QAT, float ``gy``), ``qw`` rows = output channels of W
    ``w_shape`` → ∇X ``x_shape`` (N, C, H, W) (channels-last under a channels-last
    ``params`` layout where oneDNN runs it). ``qa``: ``Q_a(∇Y)`` already quantized, its
    rows in :func:`conv_rows`'s order (:func:`lowbit.gradpair.quantize_grad_pair`, which
    declines block formats on this side; ``gy`` then gives only its shape);
    ``release``: the caller hands ``qa`` over — its codes are dropped (``qa.codes``
    emptied) once oneDNN's operand is made from them, so they are not held through the
    convolution and its epilogue."""
    stride, padding, dilation, groups = _geometry(params)
    dt = compute_dtype(out_dtype)  # float32; float64 for float64 operands
    g = gy.to(dt) if qa is None else gy  # with qa, only its shape is read
    if g.numel() == 0 or qw.codes.numel() == 0:
        return g.new_zeros(x_shape, dtype=out_dtype)
    if spec is None:  # float ∇Y read contiguous: the NCHW path's sums, whatever its layout
        return torch.nn.grad.conv2d_input(x_shape, conv_values(qw, w_shape, dt), in_format(g), stride, padding,
                                          dilation, groups).to(out_dtype)
    if qa is None:
        qa = quantize_gradient(conv_rows(g, spec), spec, generator, backend, tracker)
    if not integer_path(backend, qa, qw) or Backend(backend) is Backend.FP8:
        with run_simulated(backend, "∇X", (qa, qw)):
            return torch.nn.grad.conv2d_input(x_shape, conv_values(qw, w_shape, dt), conv_values(qa, g.shape, dt),
                                              stride, padding, dilation, groups).to(out_dtype)
    if qw.scale.shape[0] != 1:
        refuse_simulated(backend, "∇X", (qa, qw), "the per-output-channel weight scale "
                         "(weight.granularity='row') lies on the summed dimension of ∇X")
    # a row transform may pad the sample rows (BHQ blocks): the GEMMs run on all R of them
    r = qa.codes.shape[0]
    g_shape, xr_shape = (r, *g.shape[1:]), (r, *x_shape[1:])
    nhwc = _layout(params) != NCHW
    # without a row transform the epilogue writes ∇X's own dtype (one bf16 buffer, not a
    # float32 one and its cast: the same values); T⁻¹ needs the float32 product
    edt = out_dtype if type(qa.transform) is Identity and r == x_shape[0] else dt
    gx = _grad_input_onednn(qa, qw, g_shape, xr_shape, w_shape, padding, stride, dilation, groups,
                            backend, nhwc, edt, release)
    if gx is not None and nhwc:  # rows (sample, position, channel): T⁻¹ acts on rows alike
        n, c, h, w = x_shape
        return qa.inverse(gx, out_dtype, overwrite=True).reshape(n, h, w, c).permute(0, 3, 1, 2)
    if gx is None and stride == [1, 1]:
        gx = _grad_input_gather(qa, qw, g_shape, xr_shape, w_shape, padding, dilation, groups, backend, edt)
    elif gx is None:
        gx = _grad_input_scatter(qa, qw, g_shape, xr_shape, w_shape, padding, stride, dilation,
                                 groups, backend, dt)  # (R, C, H, W), a view of the padded sums
        if type(qa.transform) is Identity and gx.shape[0] == x_shape[0]:  # cast from the sums: no float copy first
            return gx.to(out_dtype, memory_format=torch.contiguous_format)
        gx = gx.reshape(gx.shape[0], -1)
    return qa.inverse(gx, out_dtype, overwrite=True).reshape(x_shape)  # T⁻¹ on the sample rows: (N, C·H·W)


def zero_insert_pays(w_shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether ∇X at ``stride`` runs oneDNN's convolution of the zero-inserted ∇Y: always
    at stride 1; at stride > 1 only where the kernel covers more positions than a stride
    cell (``kH·kW > sH·sW``): a 3×3 stride-2 ∇X is 1.1–2.1× faster there, while a 1×1 or
    2×2 stride-2 one (a ResNet shortcut, a patch embedding) multiplies ``s²``× the products
    for sums the scatter path's GEMM does at full length (docs/benchmarks.md "Predictions
    and outcomes" 15)."""
    return list(stride) == [1, 1] or w_shape[2] * w_shape[3] > stride[0] * stride[1]


def _grad_input_onednn(qa: QuantizedOperand, qw: QuantizedOperand, g_shape: Sequence[int],
                       x_shape: Sequence[int], w_shape: Sequence[int], padding: Sequence[int],
                       stride: Sequence[int], dilation: Sequence[int], groups: int,
                       backend: Backend, channels_last: bool = False,
                       dtype: torch.dtype = torch.float32, release: bool = False) -> torch.Tensor | None:
    """∇X as oneDNN's int8 convolution of ∇Y's codes with the flipped kernel, where it is
    exact (:func:`_onednn`), ``d(k − 1) ≥ p`` and :func:`zero_insert_pays`; else ``None``.
    At stride 1 oneDNN pads ∇Y by ``d(k − 1) − p``; at stride > 1 the codes are first
    placed ``s`` apart in a zero-code (N, H + d(kH − 1), W + d(kW − 1), C_out) uint8
    tensor (the ``int8_place_nhwc`` kernel, a zero code as 128: the transposed
    convolution's zero insertion), so the convolution multiplies ``s²``× the products of
    the scatter path, most of them by zero codes, in one fast kernel instead of a GEMM
    summing over C_out alone and a float col2im. Every sum is exact in the integer
    accumulator. (N, C·H·W) ``dtype`` (float32, float64 for float64 operands, or ∇X's own
    dtype where no ``T⁻¹`` follows); with ``channels_last`` (N, H·W·C). ``release``:
    ``qa.codes`` emptied once the unsigned operand is made (:func:`conv_grad_input`)."""
    n, c, h, w = x_shape
    co, cg, kh, kw = w_shape
    ext = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
    pad = [ext[0] - padding[0], ext[1] - padding[1]]
    k = kernels_for(backend, qa.codes.device)
    cog = co // groups
    size = tuple(g_shape[2:]) if list(stride) == [1, 1] else (h + ext[0], w + ext[1])
    conv_pad = pad if list(stride) == [1, 1] else [0, 0]  # the zero-inserted input is padded already
    if min(pad) < 0 or qw.scale.shape[0] != 1 or not zero_insert_pays(w_shape, stride) \
            or not _onednn(k, qa.codes, (c, cog, kh, kw), groups, size, (1, 1), conv_pad, dilation):
        return None
    # the flipped kernel, per group (C_out/g, C/g) → (C/g, C_out/g): (C, C_out/g, kH, kW)
    wt = qw.codes.reshape(groups, cog, cg, kh, kw).transpose(1, 2).flip(3, 4).reshape(c, cog, kh, kw)
    with scope("lowbit::grad_input"):
        if list(stride) != [1, 1]:  # zero codes (u8 128) inserted, oneDNN pads nothing
            held = [_place(k, qa.codes, g_shape, (h + ext[0], w + ext[1]), pad, stride,
                           True).permute(0, 3, 1, 2)]
            pad = [0, 0]
        else:
            held = [_unsigned_nhwc(k, qa.codes, g_shape)]
        if release:  # the codes' last reader was the placement: not held through the GEMM
            qa.codes = qa.codes.new_empty(0)
        # the unsigned channels-last copy handed over: freed once the convolution read it
        gx = _conv_epilogue(k, held, wt, ((1, 1), pad, dilation, groups), qa.scale, qw.scale, None, dtype,
                            cog * kh * kw, channels_last)
    return gx.permute(0, 2, 3, 1).reshape(n, h * w * c) if channels_last else gx.reshape(n, c * h * w)


def _grad_input_gather(qa: QuantizedOperand, qw: QuantizedOperand, g_shape: Sequence[int],
                       x_shape: Sequence[int], w_shape: Sequence[int], padding: Sequence[int],
                       dilation: Sequence[int], groups: int, backend: Backend,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stride 1: ∇X as a convolution of ∇Y's codes, padded by ``d(k − 1) − p`` (cropped
    where negative), with the flipped kernel — im2col GEMMs, one per group, with every
    sum in the integer accumulator. (N, C·H·W) before ``T⁻¹``: ``dtype`` (∇X's own where
    no ``T⁻¹`` follows, written by the epilogue) with one group and a per-tensor weight
    scale (:func:`patch_gemm_nchw`, in pieces of samples), else its compute dtype."""
    n, c, h, w = x_shape
    co, cg, kh, kw = w_shape
    ext = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
    k = kernels_for(backend, qa.codes.device)
    cog = co // groups
    gz = _place(k, qa.codes, g_shape, (h + ext[0], w + ext[1]),
               (ext[0] - padding[0], ext[1] - padding[1]))
    wf = qw.codes.reshape(co, cg, kh, kw).flip(2, 3).permute(2, 3, 0, 1)  # (kH, kW, C_out, C/g)
    if groups == 1 and qw.scale.shape[0] == 1:  # the epilogue writes (N, C, H·W), in pieces of samples
        with scope("lowbit::grad_input"):
            gx = patch_gemm_nchw(k, gz, (kh, kw), (1, 1), dilation, qa.scale,
                                 Encoded(wf.reshape(kh * kw * co, cg), qw.scale), None, dtype)
        return gx.reshape(n, c * h * w)
    p = patches(gz, (kh, kw), (1, 1), dilation)  # (N, H, W, kH, kW, C_out)
    a_scale = _per_row(qa.scale, h * w)
    outs = []
    with scope("lowbit::grad_input"):
        for gi in range(groups):
            b_codes = wf[:, :, gi * cog:(gi + 1) * cog].reshape(kh * kw * cog, cg)
            b_scale = _group(qw.scale, gi, cog)
            if b_scale.shape[0] != 1:  # per output channel: on the summed dimension
                b_scale = b_scale.reshape(1, cog, 1).expand(kh * kw, cog, 1).reshape(-1, 1)
            outs.append(exact_gemm(k, Encoded(im2col(p, gi, groups), a_scale),
                                   Encoded(b_codes, b_scale), None, compute_dtype(dtype)))
    gx = outs[0] if groups == 1 else torch.cat(outs, 1)  # (N·H·W, C)
    return gx.reshape(n, h, w, c).permute(0, 3, 1, 2).reshape(n, c * h * w)


def _grad_input_scatter(qa: QuantizedOperand, qw: QuantizedOperand, g_shape: Sequence[int],
                        x_shape: Sequence[int], w_shape: Sequence[int], padding: Sequence[int],
                        stride: Sequence[int], dilation: Sequence[int], groups: int,
                        backend: Backend, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stride > 1: the GEMM ``∇Y`` (rows (sample, output position)) × ``W`` (output
    channel × (kernel position, input channel)), then col2im, adding kH·kW ``dtype`` terms
    per element (a gather would multiply s² inserted zeros), in pieces of samples whose
    float columns hold at most a quarter of ∇X's bytes (:func:`sample_pieces`; the epilogue's
    dtype decided once for the batch: bitwise the whole). (N, C, H, W) ``dtype`` before
    ``T⁻¹``: a channels-last view into the padded sums, which the caller casts or copies."""
    n, c, h, w = x_shape
    co, cg, kh, kw = w_shape
    _, _, ho, wo = g_shape
    a_codes = channels_last(qa.codes, g_shape).reshape(n * ho * wo, co)  # rows (sample, position)
    a_scale = _per_row(qa.scale, ho * wo)
    wl = _weight_rows(qw, w_shape)
    k = kernels_for(backend, qa.codes.device)
    cog = co // groups
    out = a_scale.new_zeros(n, h + 2 * padding[0], w + 2 * padding[1], c, dtype=dtype)  # padded, channels-last
    # the samples in pieces whose float columns hold at most a quarter of ∇X's bytes
    # (sample_pieces): the whole batch's were kH·kW/(sH·sW)× it; the epilogue's dtype decided once
    per = sample_pieces(n, n * ho * wo * kh * kw * cg * out.element_size(), out.numel() * out.element_size() // 4,
                        out.device)
    with scope("lowbit::grad_input"):
        for gi in range(groups):
            rows = slice(gi * cog, (gi + 1) * cog)
            b = Encoded(wl[rows], _group(qw.scale, gi, cog))  # per output channel: on the summed dimension
            sa, group_per = a_scale, per
            if per < n and integer_route(k, a_scale, b):  # the integer GEMM's scales made safe once, for every piece
                sa, b_scale = int8.safe_scales(a_scale, b.scale, cog)
                b = Encoded(b.codes, b_scale)
            else:  # a simulated GEMM dequantizes with the scales as they come: the whole batch, as before
                group_per = n
            for n0 in range(0, n, group_per):
                p_rows = group_per * ho * wo
                a = Encoded(a_codes[n0 * ho * wo:n0 * ho * wo + p_rows, rows].contiguous(),
                            sa[n0 * ho * wo:n0 * ho * wo + p_rows] if sa.shape[0] > 1 else sa)
                cols = exact_gemm(k, a, b, None, dtype)  # (piece·H'·W', kH·kW·C/g)
                col2im(cols.reshape(-1, ho, wo, kh, kw, cg), out[n0:n0 + group_per], stride, dilation,
                       slice(gi * cg, (gi + 1) * cg))
                del cols
    return out[:, padding[0]:padding[0] + h, padding[1]:padding[1] + w].permute(0, 3, 1, 2)


def conv_grad_weight(gy: torch.Tensor, qx: QuantizedOperand, spec: GradSpec | None,
                     generator: torch.Generator | None, backend: Backend, x_shape: Sequence[int],
                     w_shape: Sequence[int], params: Sequence[int],
                     out_dtype: torch.dtype = torch.float32,
                     tracker: RangeTracker | None = None,
                     qa: QuantizedOperand | None = None) -> torch.Tensor:
    """``∇W = Q_w(∇Y) ⋆ Q_f(X)``: ``gy`` (N, C_out, H', W') quantized with rows = output
    channels (columns (sample, position)) → ∇W ``w_shape`` (C_out, C/groups, kH, kW).
    ``qa``: ``Q_w(∇Y)`` (C_out, N·H'·W') already quantized
    (:func:`lowbit.gradpair.quantize_grad_pair`; ``gy`` then gives only its shape)."""
    stride, padding, dilation, groups = _geometry(params)
    dt = compute_dtype(out_dtype)  # float32; float64 for float64 operands
    g = gy.to(dt) if qa is None else gy  # with qa, only its shape is read
    if g.numel() == 0 or qx.codes.numel() == 0:
        return g.new_zeros(w_shape, dtype=out_dtype)
    if spec is None:  # float ∇Y read contiguous: the NCHW path's sums, whatever its layout
        return torch.nn.grad.conv2d_weight(_dq_x(qx, x_shape, _layout(params), dt), w_shape, in_format(g),
                                           stride, padding, dilation, groups).to(out_dtype)
    if qa is None and tracker is None:  # the channels read in place, not copied first
        qa = quantize_grad_w(g.reshape(g.shape[0], g.shape[1], -1), spec, generator,
                                  kernels_for(backend, g.device))
    if qa is None:
        qa = quantize_gradient(_rows(g.transpose(0, 1)), spec, generator, backend, tracker)
    # a transform mixing output channels across groups: a group's GEMM would need all rows
    mixed = groups > 1 and not is_identity(qa.transform)
    if mixed or not integer_path(backend, qa, qx) or Backend(backend) is Backend.FP8:
        with run_simulated(backend, "∇W", (qa, qx), "with groups, the gradient's row transform "
                           f"({type(qa.transform).__name__}) mixes the groups' output channels"
                           if mixed and integer_path(backend, qa, qx) else None):
            ga = _dq(qa, (g.shape[1], g.shape[0], *g.shape[2:]), dt).transpose(0, 1)
            return torch.nn.grad.conv2d_weight(_dq_x(qx, x_shape, _layout(params), dt), w_shape, ga, stride,
                                               padding, dilation, groups).to(out_dtype)
    if qx.scale.shape[0] != 1:
        refuse_simulated(backend, "∇W", (qa, qx), "the per-sample activation scale "
                         "(activation.granularity='row') lies on the summed dimension of ∇W")
    co, cg, kh, kw = w_shape
    k = kernels_for(backend, g.device)
    layout = _layout(params)
    gw = None
    if groups == 1 and stride == [1, 1] and qx.scale.shape[0] == 1:  # kernel-row GEMMs on a third of im2col's bytes
        placed = (x_shape[0], x_shape[2] + 2 * padding[0], x_shape[3] + 2 * padding[1], x_shape[1])
        with scope("lowbit::grad_weight"):  # X placed a piece of samples at a time
            gw = grad_weight_rows(k, Encoded(qa.codes, qa.scale), placed,
                                  lambda n0, n1: _placed_x(k, qx, x_shape, padding, layout, slice(n0, n1)),
                                  qx.scale, (kh, kw), dilation, dt)
    if gw is None:
        x = _placed_x(k, qx, x_shape, padding, layout)
        p = patches(x, (kh, kw), stride, dilation)  # (N, H', W', kH, kW, C)
        b_scale = _per_row(qx.scale, p.shape[1] * p.shape[2])  # per sample: on the summed dim
        cog = co // groups if groups > 1 else qa.codes.shape[0]  # all R rows (a transform may pad)
        with scope("lowbit::grad_weight"):
            outs = [exact_gemm(k, Encoded(qa.codes[gi * cog:(gi + 1) * cog], _group(qa.scale, gi, cog)),
                               Encoded(im2col(p, gi, groups), b_scale), None, dt)
                    for gi in range(groups)]
        gw = outs[0] if groups == 1 else torch.cat(outs, 0)  # (C_out, kH·kW·C/g)
    gw = qa.inverse(gw, dt, overwrite=True)  # T⁻¹ on the output-channel rows
    return gw.reshape(co, kh, kw, cg).permute(0, 3, 1, 2).to(out_dtype, memory_format=torch.contiguous_format)


# -- the block kinds ---------------------------------------------------------------------
def _conv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    config: FQTConfig, gens: Generators, params: Sequence[int],
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, QuantizedOperand, QuantizedOperand]:
    """Forward of a conv2d block: ``x`` (N, C, H, W) → ``(Y (N, C_out, H', W'), Q_f(x)
    (rows: samples), Q_f(W) (rows: output channels))``."""
    be = config.backend
    with torch.autocast(x.device.type, enabled=False):  # the recipe's arithmetic
        qx = quantize_forward(_x_rows(x, _layout(params), config.activation), config.activation,
                              gens.get(Path.ACTIVATION), be)
        qw = quantize_forward(conv_rows(weight, config.weight), config.weight, gens.get(Path.WEIGHT), be)
        y = conv_output(qx, qw, x.shape, weight.shape, params, be, bias, out_dtype)
    return y, qx, qw


def _conv2d_quantize_x(x: torch.Tensor, config: FQTConfig, params: Sequence[int]) -> QuantizedOperand:
    """``Q_f(x)`` of a conv2d block's input as :func:`_conv2d_forward` makes it (round to
    nearest: no generator)."""
    return quantize_forward(_x_rows(x, _layout(params), config.activation), config.activation, None,
                            config.backend)


def _conv2d_backward(gy: torch.Tensor, qx: QuantizedOperand, qw: QuantizedOperand, cfg: FQTConfig,
                     gens: Generators, trackers: Trackers, meta: BlockMeta, needs: Sequence[bool]
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(∇X, ∇W, ∇b)`` of a conv2d block from ``gy`` (N, C_out, H', W')."""
    gx = gw = gb = None
    be, p = cfg.backend, meta.params
    with torch.autocast(gy.device.type, enabled=False):  # the recipe's arithmetic
        qa_x = qa_w = None
        if needs[0] and needs[1] and qx.codes.numel() and qw.codes.numel():
            # both quantizations of ∇Y from one read where they allow it (lowbit.gradpair);
            # the separate calls read gy as the quantizers do (float64 kept: compute_dtype)
            pair = quantize_grad_pair(gy.reshape(gy.shape[0], gy.shape[1], -1), cfg.grad_input,
                                      gens.get(Path.GRAD_INPUT), cfg.grad_weight,
                                      gens.get(Path.GRAD_WEIGHT), kernels_for(be, gy.device))
            if pair is not None:
                qa_x, qa_w = pair
                del pair  # each code tensor is freed as soon as its GEMM is done
        # ∇W first: its codes and buffers are freed before ∇X's accumulator and result
        # exist (each path draws from its own generator: the order changes no value)
        if needs[1]:
            gw = conv_grad_weight(gy, qx, cfg.grad_weight, gens.get(Path.GRAD_WEIGHT), be,
                                  meta.x_shape, meta.w_shape, p, meta.w_dtype, trackers[1], qa_w)
            qa_w = None
        if needs[0]:
            gx = conv_grad_input(gy, qw, cfg.grad_input, gens.get(Path.GRAD_INPUT), be,
                                 meta.x_shape, meta.w_shape, p, meta.x_dtype, trackers[0], qa_x,
                                 release=qa_x is not None)  # the pair's codes: lowbit's own
            qa_x = None
        if meta.b_dtype is not None and needs[2]:  # (C_out,)
            empty = gy.numel() == 0 or qx.codes.numel() == 0
            gb = (gy.new_zeros(meta.w_shape[0]) if empty else bias_grad(gy)).to(meta.b_dtype)
    return gx, gw, gb


def _conv2d_out_shape(x_shape: Sequence[int], w_shape: Sequence[int], params: Sequence[int]) -> list[int]:
    """(N, C_out, H', W'), ``H' = ⌊(H + 2p − d(k − 1) − 1)/s⌋ + 1`` (as ``nn.Conv2d``)."""
    s, p, d = params[0:2], params[2:4], params[4:6]
    hw = [(x_shape[2 + i] + 2 * p[i] - d[i] * (w_shape[2 + i] - 1) - 1) // s[i] + 1 for i in range(2)]
    return [x_shape[0], w_shape[0], *hw]


# conv1d: the conv2d block on (N, C, 1, L) with a (C_out, C/g, 1, k) kernel
def _conv1d_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    config: FQTConfig, gens: Generators, params: Sequence[int],
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, QuantizedOperand, QuantizedOperand]:
    y, qx, qw = _conv2d_forward(x.unsqueeze(2), weight.unsqueeze(2), bias, config, gens, params,
                                out_dtype)
    return y.squeeze(2), qx, qw


def _conv1d_backward(gy: torch.Tensor, qx: QuantizedOperand, qw: QuantizedOperand, cfg: FQTConfig,
                     gens: Generators, trackers: Trackers, meta: BlockMeta, needs: Sequence[bool]
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    xs, ws = meta.x_shape, meta.w_shape
    m2 = BlockMeta(meta.params, [xs[0], xs[1], 1, xs[2]], meta.x_dtype,
                   [ws[0], ws[1], 1, ws[2]], meta.w_dtype, meta.b_dtype)
    gx, gw, gb = _conv2d_backward(gy.unsqueeze(2), qx, qw, cfg, gens, trackers, m2, needs)
    return (None if gx is None else gx.reshape(xs), None if gw is None else gw.reshape(ws), gb)


def _conv1d_out_shape(x_shape: Sequence[int], w_shape: Sequence[int], params: Sequence[int]) -> list[int]:
    n, co, _, lo = _conv2d_out_shape([x_shape[0], x_shape[1], 1, x_shape[2]],
                                     [w_shape[0], w_shape[1], 1, w_shape[2]], params)
    return [n, co, lo]


register_kind("conv2d", BlockKind(_conv2d_forward, _conv2d_backward, _conv2d_out_shape, out_format,
                                  _conv2d_quantize_x))
register_kind("conv1d", BlockKind(_conv1d_forward, _conv1d_backward, _conv1d_out_shape,
                                  quantize_x=lambda x, config, params: _conv2d_quantize_x(
                                      x.unsqueeze(2), config, params)))


@per_call(3)
def fqt_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               state: BlockState | FQTConfig, stride: Any = 1, padding: Any = 0,
               dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    """Conv1d under ``state`` (``fp``: plain ``F.conv1d``): ``x`` (N, C_in, L) or
    unbatched (C_in, L), ``weight`` (C_out, C_in/groups, k), ``bias`` (C_out,) →
    (N, C_out, L'); ``padding`` an int, ``"valid"`` or ``"same"`` (zeros). The contract
    of :func:`lowbit.functional.fqt_conv2d` (dtypes, autocast, errors); the GEMMs are
    those of the conv2d block on a height-1 image."""
    state = call_state(state)
    if state.config.is_fp:
        return F.conv1d(x, weight, bias, stride, padding, dilation, groups)
    check_dtypes("fqt_conv1d", x, weight, bias)
    if x.dim() == 2:  # unbatched, as nn.Conv1d accepts
        return fqt_conv1d(x.unsqueeze(0), weight, bias, state, stride, padding, dilation, groups)[0]
    if x.dim() != 3 or weight.dim() != 3:
        raise RuntimeError(f"fqt_conv1d: expected a 3-D input (N, C, L) and a 3-D weight, got "
                           f"{tuple(x.shape)} and {tuple(weight.shape)}")
    groups = check_conv_args("fqt_conv1d", x, weight, bias, groups, 1)
    (s,) = conv_geometry("fqt_conv1d", "stride", stride, 1, 1)
    (d,) = conv_geometry("fqt_conv1d", "dilation", dilation, 1, 1)
    check_conv_padding("fqt_conv1d", padding, (s,))
    if padding == "same":
        x, padding = F.pad(x, same_padding(weight.shape[2:], (d,))), 0
    elif padding == "valid":
        padding = 0
    (p,) = conv_geometry("fqt_conv1d", "padding", padding, 1, 0)
    return apply_block("conv1d", x, weight, bias, state, [1, s, 0, p, 1, d, groups], output_dtype(x))


__all__ = ["channels_inner", "conv_grad_input", "conv_grad_weight", "conv_output", "conv_quantized", "conv_rows",
           "conv_values",
           "fqt_conv1d", "integer_path", "refuse_simulated"]
