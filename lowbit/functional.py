"""Fully quantized linear and conv2d: three GEMMs by name.

    output       Y  = Q_f(X) · Q_f(W)ᵀ  (+ b)
    grad_input   ∇X = Q_a(∇Y) · Q_f(W)
    grad_weight  ∇W = Q_w(∇Y)ᵀ · Q_f(X)

The math lives in plain functions (``linear_output``, ``linear_grad_input``,
``linear_grad_weight``, ...) so that analysis code can call them without autograd; the
autograd Functions only wire them together. Weights are quantized once per step and
reused by the output and grad_input GEMMs; the activation is saved for the backward as
int8 codes plus scales. The two gradient quantizations of ``∇Y`` are independent draws
from the layer's generator.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from .config import Backend, FQTConfig, GradSpec, OperandSpec
from .formats import IntFormat
from .kernels import scaled_mm
from .quantizers import QuantizedRows, get_quantizer
from .quantizers.base import Identity
from .quantizers.forward import quantize_operand
from .ranges import RangeTracker

# Predicted-range trackers of a layer's (grad_input, grad_weight) paths; None: dynamic.
Trackers = tuple[RangeTracker | None, RangeTracker | None]
_DYNAMIC: Trackers = (None, None)


def quantize_forward(
    x2d: torch.Tensor, spec: OperandSpec, generator: torch.Generator | None = None,
    backend: Backend = Backend.AUTO,
) -> QuantizedRows:
    """``Q_f`` of a weight (out, in) or activation (N, in) operand."""
    return quantize_operand(x2d, spec.bits, spec.granularity, spec.rounding, generator, backend)


def quantize_gradient(
    a: torch.Tensor, spec: GradSpec, generator: torch.Generator | None,
    backend: Backend = Backend.AUTO, tracker: RangeTracker | None = None,
) -> QuantizedRows:
    """``Q_a`` / ``Q_w`` of a gradient operand whose rows are the non-summed dimension
    (range from ``tracker`` when the spec's range is predicted)."""
    q = get_quantizer(spec.quantizer)
    return q.quantize(a, IntFormat(spec.bits), generator, spec.rounding, backend,
                      tracker if spec.predicted else None)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (t.shape[0], rest): explicit sizes, so zero-size tensors reshape too."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _empty_product(m: int, n: int, like: torch.Tensor, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (m, n) result of a GEMM with an empty operand: nothing to quantize or to sum,
    so zeros (+ bias) on every backend, as ``F.linear`` gives. It draws no noise and
    records no range (an empty batch must not shrink a predicted range)."""
    out = torch.zeros(m, n, device=like.device)
    return (out if bias is None else out + bias.float()).to(out_dtype)


def _rows_times(q: QuantizedRows, b: QuantizedRows, backend: Backend,
                out_dtype: torch.dtype) -> torch.Tensor:
    """``T⁻¹ · (codes_a·step_a) @ B`` with ``B`` the dequantized ``b``: the inverse
    transform acts on the output rows, after the (integer) GEMM."""
    if isinstance(q.transform, Identity):  # cast fused into the GEMM's epilogue
        return scaled_mm(q.codes, q.step, b.codes, b.step, backend, out_dtype=out_dtype)
    return q.inverse(scaled_mm(q.codes, q.step, b.codes, b.step, backend), out_dtype)


# -- Linear: the three GEMMs ------------------------------------------------------------
def linear_output(qx: QuantizedRows, qw: QuantizedRows, backend: Backend,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Y = Q_f(X) Q_f(W)ᵀ + b``: (N, in) × (out, in)ᵀ → (N, out)."""
    if qx.codes.numel() == 0 or qw.codes.numel() == 0:
        return _empty_product(qx.codes.shape[0], qw.codes.shape[0], qx.codes, bias, out_dtype)
    return scaled_mm(qx.codes, qx.step, qw.codes.t(), qw.step.t(), backend, bias, out_dtype)


def linear_grad_input(
    gy: torch.Tensor, qw: QuantizedRows, spec: GradSpec | None,
    generator: torch.Generator | None, backend: Backend, out_dtype: torch.dtype = torch.float32,
    tracker: RangeTracker | None = None,
) -> torch.Tensor:
    """``∇X = Q_a(∇Y) Q_f(W)``: (N, out) × (out, in) → (N, in). ``spec=None``: QAT."""
    if gy.numel() == 0 or qw.codes.numel() == 0:
        return _empty_product(gy.shape[0], qw.codes.shape[1], gy, None, out_dtype)
    if spec is None:
        return (gy.float() @ qw.dequantize()).to(out_dtype)
    qa = quantize_gradient(gy, spec, generator, backend, tracker)
    return _rows_times(qa, qw, backend, out_dtype)


def linear_grad_weight(
    gy: torch.Tensor, qx: QuantizedRows, spec: GradSpec | None,
    generator: torch.Generator | None, backend: Backend, out_dtype: torch.dtype = torch.float32,
    tracker: RangeTracker | None = None,
) -> torch.Tensor:
    """``∇W = Q_w(∇Y)ᵀ Q_f(X)``: rows of ``∇Yᵀ`` are output features. (out, N) × (N, in)."""
    if gy.numel() == 0 or qx.codes.numel() == 0:
        return _empty_product(gy.shape[1], qx.codes.shape[1], gy, None, out_dtype)
    if spec is None:
        return (gy.float().t() @ qx.dequantize()).to(out_dtype)
    qa = quantize_gradient(gy.t(), spec, generator, backend, tracker)
    return _rows_times(qa, qx, backend, out_dtype)


def _save_rows(ctx: Any, *qs: QuantizedRows) -> None:
    ctx.save_for_backward(*[t for q in qs for t in (q.codes, q.step)])


def _load_rows(ctx: Any) -> list[QuantizedRows]:
    t = ctx.saved_tensors
    return [QuantizedRows(t[i], t[i + 1], Identity(t[i].shape[0])) for i in range(0, len(t), 2)]


class _FQTLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                config: FQTConfig, generator: torch.Generator | None,
                out_dtype: torch.dtype, trackers: Trackers) -> torch.Tensor:
        # x: (N, in), flattened by fqt_linear, so that the output is the GEMM's own fresh
        # (N, out) tensor: a view made in here could not be modified in place outside.
        with torch.autocast(x.device.type, enabled=False):  # our GEMMs pick their own types
            qx = quantize_forward(x, config.activation, generator, config.backend)
            qw = quantize_forward(weight, config.weight, generator, config.backend)
            y = linear_output(qx, qw, config.backend, bias, out_dtype)  # (N, out)
        _save_rows(ctx, qx, qw)
        ctx.config, ctx.generator, ctx.trackers = config, generator, trackers
        ctx.x_dtype, ctx.w_dtype = x.dtype, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor):  # type: ignore[override]
        qx, qw = _load_rows(ctx)  # gy: (N, out), read as is by the quantizers
        cfg = ctx.config
        gx = gw = gb = None
        with torch.autocast(gy.device.type, enabled=False):  # the recipe's arithmetic
            if ctx.needs_input_grad[0]:
                gx = linear_grad_input(gy, qw, cfg.grad_input, ctx.generator, cfg.backend,
                                       ctx.x_dtype, ctx.trackers[0])
            if ctx.needs_input_grad[1]:
                gw = linear_grad_weight(gy, qx, cfg.grad_weight, ctx.generator, cfg.backend,
                                        ctx.w_dtype, ctx.trackers[1])
            if ctx.b_dtype is not None and ctx.needs_input_grad[2]:
                gb = gy.sum(0, dtype=torch.float32).to(ctx.b_dtype)
        return gx, gw, gb, None, None, None, None


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``x`` computes in, and so the layer's output dtype: under autocast a
    floating tensor other than float64 is cast to the autocast dtype (as torch's autocast
    does for ``nn.Linear`` and ``nn.Conv2d``); otherwise ``x``'s own dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


def check_dtypes(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ``RuntimeError`` naming both dtypes where ``nn.Linear``/``nn.Conv2d`` would
    refuse them: input, weight and bias must compute in one dtype (:func:`output_dtype`),
    so they must be equal outside autocast; under autocast they may mix as torch allows."""
    if output_dtype(x) != output_dtype(weight):
        raise RuntimeError(f"{op}: input and weight must have the same dtype, but got "
                           f"{x.dtype} and {weight.dtype}")
    if bias is not None and output_dtype(bias) != output_dtype(weight):
        raise RuntimeError(f"{op}: bias and weight must have the same dtype, but got "
                           f"{bias.dtype} and {weight.dtype}")


def fqt_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               config: FQTConfig, generator: torch.Generator | None = None,
               trackers: Trackers = _DYNAMIC) -> torch.Tensor:
    """Linear layer under ``config`` (``fp``: plain ``F.linear``): ``x`` (*, in),
    ``weight`` (out, in), ``bias`` (out,) → (*, out), any leading shape, empty ones too.

    The output dtype is :func:`output_dtype` of ``x`` (the autocast dtype under autocast);
    the GEMMs run in the recipe's arithmetic whatever autocast says; gradients have the
    dtypes of ``x``, ``weight`` and ``bias``. ``trackers``: the (grad_input, grad_weight)
    range trackers of predicted specs. Raises ``RuntimeError`` as ``nn.Linear`` does for
    mismatched dtypes (:func:`check_dtypes`) or shapes."""
    if config.is_fp:
        return F.linear(x, weight, bias)
    check_dtypes("fqt_linear", x, weight, bias)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"fqt_linear: input of shape {tuple(x.shape)} does not fit a weight "
                           f"of shape {tuple(weight.shape)}: its last dimension must be {weight.shape[1]}")
    x2d = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (N, in)
    y = _FQTLinearFn.apply(x2d, weight, bias, config, generator, output_dtype(x), trackers)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])  # (*, out)


# -- Conv2d: the same three GEMMs as convolutions (simulated) ---------------------------
def _conv_rows_dequant(q: QuantizedRows, shape: torch.Size) -> torch.Tensor:
    return q.dequantize().reshape(shape)


class _FQTConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                config: FQTConfig, generator: torch.Generator | None, conv: tuple,
                trackers: Trackers) -> torch.Tensor:
        stride, padding, dilation, groups = conv
        be = config.backend
        out_dtype = output_dtype(x)  # the autocast dtype under autocast, as nn.Conv2d
        with torch.autocast(x.device.type, enabled=False):  # the recipe's arithmetic
            qx = quantize_forward(_rows(x), config.activation, generator, be)  # rows: samples
            qw = quantize_forward(_rows(weight), config.weight, generator, be)  # rows: out ch.
            xd, wd = _conv_rows_dequant(qx, x.shape), _conv_rows_dequant(qw, weight.shape)
            b = None if bias is None else bias.float()
            y = F.conv2d(xd, wd, b, stride, padding, dilation, groups)  # fresh: not a view
        _save_rows(ctx, qx, qw)
        ctx.config, ctx.generator, ctx.conv, ctx.trackers = config, generator, conv, trackers
        ctx.x_shape, ctx.w_shape, ctx.x_dtype, ctx.w_dtype = x.shape, weight.shape, x.dtype, weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        qx, qw = _load_rows(ctx)
        cfg, (stride, padding, dilation, groups) = ctx.config, ctx.conv
        gx = gw = gb = None
        with torch.autocast(grad_out.device.type, enabled=False):  # the recipe's arithmetic
            g = grad_out.float()  # (B, C_out, H, W)
            empty = g.numel() == 0 or qx.codes.numel() == 0  # nothing to quantize or to sum
            if ctx.needs_input_grad[0] and empty:
                gx = g.new_zeros(ctx.x_shape, dtype=ctx.x_dtype)
            elif ctx.needs_input_grad[0]:
                gi = g
                if cfg.grad_input is not None:  # rows = samples
                    gi = quantize_gradient(_rows(g), cfg.grad_input, ctx.generator,
                                           cfg.backend, ctx.trackers[0])
                    gi = gi.dequantize().reshape(g.shape)
                wd = _conv_rows_dequant(qw, ctx.w_shape)
                gx = torch.nn.grad.conv2d_input(ctx.x_shape, wd, gi, stride, padding, dilation, groups)
                gx = gx.to(ctx.x_dtype)
            if ctx.needs_input_grad[1] and empty:
                gw = g.new_zeros(ctx.w_shape, dtype=ctx.w_dtype)
            elif ctx.needs_input_grad[1]:
                gw_in = g
                if cfg.grad_weight is not None:  # rows = output channels
                    gt = _rows(g.transpose(0, 1))
                    gq = quantize_gradient(gt, cfg.grad_weight, ctx.generator, cfg.backend,
                                           ctx.trackers[1]).dequantize()
                    gw_in = gq.reshape(g.shape[1], g.shape[0], *g.shape[2:]).transpose(0, 1)
                xd = _conv_rows_dequant(qx, ctx.x_shape)
                gw = torch.nn.grad.conv2d_weight(xd, ctx.w_shape, gw_in, stride, padding, dilation, groups)
                gw = gw.to(ctx.w_dtype)
            if ctx.b_dtype is not None and ctx.needs_input_grad[2]:  # (C_out,)
                gb = (g.new_zeros(ctx.w_shape[0]) if empty else g.sum(dim=(0, 2, 3))).to(ctx.b_dtype)
        return gx, gw, gb, None, None, None, None


def fqt_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               config: FQTConfig, generator: torch.Generator | None = None,
               stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
               trackers: Trackers = _DYNAMIC) -> torch.Tensor:
    """Conv2d under ``config`` (``fp``: plain ``F.conv2d``): ``x`` (N, C_in, H, W),
    ``weight`` (C_out, C_in/groups, kH, kW), ``bias`` (C_out,) → (N, C_out, H', W'), empty
    batches too. The same contract as :func:`fqt_linear`: output dtype
    :func:`output_dtype` of ``x``, the recipe's arithmetic under autocast (the three GEMMs
    are simulated: dequantize, then a float32 convolution), gradients in the dtypes of
    ``x``, ``weight`` and ``bias``, ``RuntimeError`` for mismatched dtypes."""
    if config.is_fp:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    check_dtypes("fqt_conv2d", x, weight, bias)
    return _FQTConv2dFn.apply(x, weight, bias, config, generator,
                              (stride, padding, dilation, groups), trackers)


__all__ = [
    "check_dtypes",
    "fqt_conv2d",
    "fqt_linear",
    "linear_grad_input",
    "linear_grad_weight",
    "linear_output",
    "output_dtype",
    "quantize_forward",
    "quantize_gradient",
]
