"""FLOPs of the aten ops that multiply matrices: GEMMs, convolutions, attention.

One formula per op (as ``torch.utils.flop_counter`` has), plus the ops it lacks or
miscounts: ``_int_mm``, ``_grouped_mm`` (Mixture-of-Experts layers), the fused recurrent
layers (``nn.LSTM``/``GRU``/``RNN`` as ``mkldnn_rnn_layer``, ``_cudnn_rnn``, ``miopen_rnn``),
``dot``/``vdot``/``cdist``, the CPU flash
attention, grouped-query attention, and the weight gradient of grouped (depthwise)
convolutions. A GEMM of an ``(m, k)`` by a
``(k, n)`` matrix counts ``2·m·k·n`` FLOPs (one multiply and one add per term); bias
adds, softmax and other elementwise work are not counted.

Each formula returns the op's *parts*: one per GEMM the op computes that coverage
reports apart. ``convolution_backward`` gives its ``grad_input`` and ``grad_weight``
parts; attention gives one part holding its internal GEMMs, counted as
``QKᵀ`` and ``P·V`` forward (2 GEMMs) and ``∇P = ∇O·Vᵀ``, ``∇V = Pᵀ·∇O``,
``∇Q = ∇S·K``, ``∇K = ∇Sᵀ·Q`` backward (4 GEMMs; the flash kernels' recomputation of
``QKᵀ`` is not counted), over the full ``s_q × s_k`` score matrix even when causal,
as ``FlopCounterMode`` does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from .kernels import amx as _amx  # noqa: F401  (defines lowbit::int8_mm)
from .kernels import exact_f32 as _exact_f32  # noqa: F401  (defines lowbit::int8_mm_f32)

aten = torch.ops.aten


class Part(NamedTuple):
    """One GEMM (or group of GEMMs) of an op.

    ``role``: the pass when the op itself says it — ``"grad_input"`` / ``"grad_weight"``
    for ``convolution_backward``, ``"backward"`` for attention backward ops — else ``None``. ``operands``: the
    tensors multiplied (their dtypes are the GEMM's operand formats)."""

    role: str | None
    flops: int
    operands: tuple[torch.Tensor, ...]


Formula = Callable[[Sequence[Any], Any], list[Part]]


def _inner(t: torch.Tensor) -> int:
    """Length of the summed dimension of ``t`` as the left operand (packed FP4 holds two
    values per byte)."""
    packed = getattr(torch, "float4_e2m1fn_x2", None)
    return t.shape[-1] * (2 if packed is not None and t.dtype == packed else 1)


def _mm(i: int, j: int) -> Formula:
    """``args[i] @ args[j]``, both 2-D: ``2·m·k·n``."""
    def f(args: Sequence[Any], out: Any) -> list[Part]:
        a, b = args[i], args[j]
        return [Part(None, 2 * a.shape[0] * _inner(a) * out.shape[-1], (a, b))]
    return f


def _bmm(i: int, j: int) -> Formula:
    """``args[i] @ args[j]``, both 3-D (b, m, k) × (b, k, n): ``2·b·m·k·n``."""
    def f(args: Sequence[Any], out: Any) -> list[Part]:
        a, b = args[i], args[j]
        return [Part(None, 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2], (a, b))]
    return f


def _offs_total(offs: Any, full: int) -> int:
    """The groups' total extent along the ragged dimension: ``offs[-1]`` (the rows past it
    are not computed), or ``full`` without offsets (or where the value cannot be read)."""
    if not isinstance(offs, torch.Tensor) or offs.numel() == 0:
        return full
    try:
        return int(offs[-1])
    except (RuntimeError, TypeError, ValueError):  # a fake or meta tensor: no value
        return full


def _grouped_mm(args: Sequence[Any], out: Any) -> list[Part]:
    """``_grouped_mm(a, b, offs)`` (Mixture-of-Experts layers: each group of rows by its own
    matrix): 2-D × 3-D (groups of ``a``'s rows, ``b`` (G, K, N)) ``2·rows·K·N``; 3-D × 2-D
    (groups of ``b``'s columns) ``2·M·K·cols``; 2-D × 2-D (groups along the summed
    dimension) ``2·M·K·N``; 3-D × 3-D ``2·G·M·K·N`` — rows, columns or K counted to
    ``offs[-1]``."""
    a, b = args[0], args[1]
    offs = args[2] if len(args) > 2 else None
    if a.dim() == 2 and b.dim() == 3:
        flops = 2 * _offs_total(offs, a.shape[0]) * a.shape[1] * b.shape[2]
    elif a.dim() == 3 and b.dim() == 2:
        flops = 2 * a.shape[1] * a.shape[2] * _offs_total(offs, b.shape[1])
    elif a.dim() == 2 and b.dim() == 2:
        flops = 2 * a.shape[0] * _offs_total(offs, a.shape[1]) * b.shape[1]
    else:
        flops = 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return [Part(None, flops, (a, b))]


def _mv(i: int, j: int) -> Formula:
    """``args[i] @ args[j]``, (m, k) × (k,): ``2·m·k``."""
    def f(args: Sequence[Any], out: Any) -> list[Part]:
        a, v = args[i], args[j]
        return [Part(None, 2 * a.shape[0] * a.shape[1], (a, v))]
    return f


def _sparse_mm(i: int, j: int) -> Formula:
    """``args[i] @ args[j]`` with a sparse (m, k) ``args[i]`` (COO or CSR) and a dense
    (k, n) ``args[j]``: ``2·nnz·n`` (BHQ's group sums: lowbit.quantizers.bhq)."""
    def f(args: Sequence[Any], out: Any) -> list[Part]:
        a, b = args[i], args[j]
        return [Part(None, 2 * int(a._nnz()) * b.shape[-1], (a, b))]
    return f


def conv_flops(x_shape: Sequence[int], w_shape: Sequence[int], y_shape: Sequence[int],
               transposed: bool) -> int:
    """Multiply-adds of a convolution, ×2: ``2·N·prod(w.shape)·prod(spatial)``, where
    ``spatial`` is the output's (the input's for a transposed convolution). ``w``'s
    second dimension is already ``C_in/groups``, so groups (depthwise) are counted
    right. The two backward GEMMs of a convolution multiply the same pairs, so each
    costs the same."""
    spatial = (x_shape if transposed else y_shape)[2:]
    return 2 * x_shape[0] * math.prod(w_shape) * math.prod(spatial)


def _conv(args: Sequence[Any], out: Any) -> list[Part]:
    x, w, transposed = args[0], args[1], bool(args[6])
    return [Part(None, conv_flops(x.shape, w.shape, out.shape, transposed), (x, w))]


def _conv_backward(args: Sequence[Any], out: Any) -> list[Part]:
    grad_out, x, w, transposed, mask = args[0], args[1], args[2], bool(args[7]), args[10]
    n = conv_flops(x.shape, w.shape, grad_out.shape, transposed)
    parts = []
    if mask[0]:
        parts.append(Part("grad_input", n, (grad_out, w)))
    if mask[1]:
        parts.append(Part("grad_weight", n, (grad_out, x)))
    return parts


def attention_flops(q_shape: Sequence[int], k_shape: Sequence[int], v_shape: Sequence[int],
                    gemms: int) -> int:
    """``gemms`` GEMMs of attention over (b, h, s, d) tensors, half of them with the
    head size of ``q``/``k`` and half with ``v``'s: ``gemms·b·h·s_q·s_k·(d + d_v)``.
    ``h`` is the query's head count (grouped-query attention repeats key/value heads)."""
    b, h, s_q, d = q_shape
    s_k, d_v = k_shape[2], v_shape[3]
    return gemms * b * h * s_q * s_k * (d + d_v)


def _sdpa(args: Sequence[Any], out: Any) -> list[Part]:
    q, k, v = args[0], args[1], args[2]
    return [Part(None, attention_flops(q.shape, k.shape, v.shape, 2), (q, k, v))]


def _sdpa_backward(args: Sequence[Any], out: Any) -> list[Part]:
    grad_out, q, k, v = args[0], args[1], args[2], args[3]
    return [Part("backward", attention_flops(q.shape, k.shape, v.shape, 4), (grad_out, q, k, v))]


def _steps(x: torch.Tensor) -> int:
    """Time steps × batch of a recurrent layer's input ((T, B, I), (B, T, I) or a packed
    (ΣT, I)): every row of ``x``."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def _rnn(i: int, weights: Callable[[Sequence[Any]], Sequence[Any]], role: str | None,
         times: int) -> Formula:
    """A fused recurrent layer (``mkldnn_rnn_layer`` on the CPU, ``_cudnn_rnn``,
    ``miopen_rnn``; their backward ops): every 2-D weight (input-hidden, hidden-hidden,
    projection) multiplies one row per time step and batch entry — ``2·steps·Σ numel`` —
    ``times`` over (the backward: the input/hidden gradients and the weight gradients,
    2×). A review found LSTMs' GEMMs missing from coverage's totals, not even listed."""
    def f(args: Sequence[Any], out: Any) -> list[Part]:
        x = args[i]
        mats = [w for w in weights(args) if isinstance(w, torch.Tensor) and w.dim() == 2]
        return [Part(role, times * 2 * _steps(x) * sum(w.numel() for w in mats), (x, *mats))]
    return f


def _dot(args: Sequence[Any], out: Any) -> list[Part]:
    """``dot``/``vdot`` of two length-``n`` vectors: ``2·n``."""
    return [Part(None, 2 * args[0].numel(), (args[0], args[1]))]


def _cdist(i: int, j: int, role: str | None) -> Formula:
    """``cdist`` of (…, P, M) and (…, R, M) point sets (and its backward): ``2·B·P·R·M``,
    a GEMM's count (``torch.cdist`` computes p = 2 through one)."""
    def f(args: Sequence[Any], out: Any) -> list[Part]:
        a, b = args[i], args[j]
        batch = math.prod(a.shape[:-2])
        return [Part(role, 2 * batch * a.shape[-2] * b.shape[-2] * a.shape[-1], (a, b))]
    return f


_BY_NAME: dict[str, Formula] = {
    "mm": _mm(0, 1), "addmm": _mm(1, 2), "_addmm_activation": _mm(1, 2), "_int_mm": _mm(0, 1),
    "_scaled_mm": _mm(0, 1), "bmm": _bmm(0, 1), "baddbmm": _bmm(1, 2), "addbmm": _bmm(1, 2),
    "mv": _mv(0, 1), "addmv": _mv(1, 2), "_sparse_addmm": _sparse_mm(1, 2), "_sparse_mm": _sparse_mm(0, 1),
    "convolution": _conv, "_convolution": _conv, "convolution_backward": _conv_backward,
    "_grouped_mm": _grouped_mm,
    "mkldnn_rnn_layer": _rnn(0, lambda a: a[1:3], None, 1),
    "mkldnn_rnn_layer_backward": _rnn(0, lambda a: a[1:3], "backward", 2),
    "_cudnn_rnn": _rnn(0, lambda a: a[1], None, 1), "_cudnn_rnn_backward": _rnn(0, lambda a: a[1], "backward", 2),
    "miopen_rnn": _rnn(0, lambda a: a[1], None, 1), "miopen_rnn_backward": _rnn(0, lambda a: a[1], "backward", 2),
    "dot": _dot, "vdot": _dot, "_cdist_forward": _cdist(0, 1, None), "_cdist_backward": _cdist(1, 2, "backward"),
    "_euclidean_dist": _cdist(0, 1, None),  # cdist's p = 2 through a GEMM (its backward: mm)
}
for _kind in ("flash_attention_for_cpu", "flash_attention", "efficient_attention", "cudnn_attention",
              "fused_attention_overrideable"):
    _BY_NAME[f"_scaled_dot_product_{_kind}"] = _sdpa
    _BY_NAME[f"_scaled_dot_product_{_kind}_backward"] = _sdpa_backward
# ops this torch has (older versions lack some attention variants)
FORMULAS: dict[Any, Formula] = {getattr(aten, n): f for n, f in _BY_NAME.items() if hasattr(aten, n)}


def _qconv(args: Sequence[Any], out: Any) -> list[Part]:
    """``onednn::qconv2d_pointwise(qx, x_scale, x_zp, packed_w, …)``: lowbit.conv's exact
    int8 convolution (lowbit.kernels.qconv); the packed weight keeps its logical shape."""
    x, w = args[0], args[3]
    return [Part(None, conv_flops(x.shape, w.shape, out.shape, False), (x, w))]


def _trilinear(args: Sequence[Any], out: Any) -> list[Part]:
    """``aten._trilinear(i1, i2, i3, expand1, expand2, expand3, sumdim)`` (``nn.Bilinear``
    and its gradients): each operand unsqueezed at its ``expand`` dimensions, all broadcast
    to one index space, summed over ``sumdim``: a multiply-add per point of that space,
    ``2·∏`` of its sizes (``2·N·O·I1·I2`` for a Bilinear's forward, as fvcore counts it)."""
    shapes = []
    for t, expand in zip(args[:3], args[3:6], strict=True):
        shape = list(t.shape)
        for d in sorted(expand):
            shape.insert(d, 1)
        shapes.append(shape)
    return [Part(None, 2 * math.prod(torch.broadcast_shapes(*shapes)), tuple(args[:3]))]


FORMULAS[torch.ops.aten._trilinear] = _trilinear  # was listed as not counted, outside the shares
FORMULAS[torch.ops.lowbit.int8_mm] = _mm(0, 1)  # lowbit.kernels.amx's int8 GEMM
FORMULAS[torch.ops.lowbit.int8_bmm] = _bmm(0, 1)  # and its batch of them (attention's heads)
FORMULAS[torch.ops.lowbit.int8_mm_f32] = _mm(0, 1)  # lowbit.kernels.exact_f32's (CPUs without VNNI)
FORMULAS[torch.ops.lowbit.int8_bmm_f32] = _bmm(0, 1)


def _conv_f32(args: Sequence[Any], out: Any) -> list[Part]:
    """``lowbit::int8_conv_f32(x, w, …)``: lowbit.conv's exact convolution of codes on
    float32 units (lowbit.kernels.exact_f32, CPUs without VNNI)."""
    x, w = args[0], args[1]
    return [Part(None, conv_flops(x.shape, w.shape, out.shape, False), (x, w))]


FORMULAS[torch.ops.lowbit.int8_conv_f32] = _conv_f32

if hasattr(getattr(torch.ops, "onednn", None), "qconv2d_pointwise"):
    FORMULAS[torch.ops.onednn.qconv2d_pointwise] = _qconv



def _torch_formula(f: Formula) -> Callable[..., int]:
    """``f`` as a ``torch.utils.flop_counter`` formula (raw arguments, the output as
    ``out_val``): the sum of its parts."""
    def formula(*args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return sum(p.flops for p in f(args, out_val))
    return formula


def _register_with_flop_counter() -> None:
    """lowbit's own GEMM ops (the AMX/VNNI int8 products, their exact float32 routes):
    ``FlopCounterMode`` counted 0 for the int8 GEMMs it saw (lowbit's attention, run
    eagerly under the mode) — a model's FLOPs silently short (a review, 2026-12-07). Not
    ``aten._int_mm``, torch's op, which has no formula in torch: registering one in torch's
    global table made any later registration of it (a library's own) fail as a duplicate
    (a review); lowbit's attention on that route counts 0 for its products."""
    from torch.utils import flop_counter

    for op in (torch.ops.lowbit.int8_mm, torch.ops.lowbit.int8_bmm, torch.ops.lowbit.int8_mm_f32,
               torch.ops.lowbit.int8_bmm_f32, torch.ops.lowbit.int8_conv_f32):
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(_torch_formula(FORMULAS[op]))


_register_with_flop_counter()

ATTENTION_OPS = frozenset(p for p, f in FORMULAS.items() if f in (_sdpa, _sdpa_backward))

# Names of aten ops that multiply matrices; one of these without a formula is reported
# as seen but not counted, never silently dropped.
_MATMUL_NAME = re.compile(r"(^|_)([a-z0-9]*mm|(add)?mv|matmul|einsum|[a-z]*linear|transformer|v?dot|cdist|euclidean_dist)($|_)"
                          r"|(^|_)conv(\dd|olution|_)|attention"
                          r"|_rnn($|_)|(^|_)(lstm|gru|rnn_tanh|rnn_relu)$")  # not the elementwise *_cell ops


# weight packing and packed-parameter getters of other namespaces (quantized::linear_prepack,
# conv2d_stride, mkldnn::_reorder_conv2d_weight): named like GEMMs, multiplying nothing (a review)
# (anchored: quantized::linear_dynamic_fp16_unpacked_weight and _wrapped_quantized_linear_prepacked
# are GEMMs; quantized::conv2d_transpose is a getter, aten's conv_transpose2d and
# cudnn_convolution_transpose are not: a second review)
_NOT_PRODUCTS = re.compile(r"(^|_)(prepack|unpack)(_fp16|_legacy|_sizes)?$|^_?reorder"
                           r"|_(stride|padding|dilation|groups|output_padding)$")
_QUANTIZED_GETTER = re.compile(r"^conv\d?d?_transpose$")  # quantized::conv2d_transpose: is it transposed


def parts(func: torch._ops.OpOverload, args: Sequence[Any], out: Any) -> list[Part] | None:
    """The GEMM parts of one executed aten op, or ``None`` when it multiplies no
    matrices (or has no formula: see :func:`looks_like_gemm`)."""
    f = FORMULAS.get(func.overloadpacket)
    return None if f is None else f(args, out)


def looks_like_gemm(func: torch._ops.OpOverload) -> bool:
    """An op with no formula whose name says it multiplies matrices, in any namespace
    (aten's, and others': ``quantized::linear_dynamic`` of torch's dynamic quantization
    was neither counted nor listed: a review)."""
    name = func.overloadpacket.__name__
    getter = func.namespace == "quantized" and _QUANTIZED_GETTER.match(name) is not None
    return (func.overloadpacket not in FORMULAS and not name.startswith(("upsample", "_upsample"))
            and not _NOT_PRODUCTS.search(name) and not getter and bool(_MATMUL_NAME.search(name)))


__all__ = ["ATTENTION_OPS", "FORMULAS", "Part", "attention_flops", "conv_flops",
           "looks_like_gemm", "parts"]
