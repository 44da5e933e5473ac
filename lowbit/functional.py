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
    return scaled_mm(qx.codes, qx.step, qw.codes.t(), qw.step.t(), backend, bias, out_dtype)


def linear_grad_input(
    gy: torch.Tensor, qw: QuantizedRows, spec: GradSpec | None,
    generator: torch.Generator | None, backend: Backend, out_dtype: torch.dtype = torch.float32,
    tracker: RangeTracker | None = None,
) -> torch.Tensor:
    """``∇X = Q_a(∇Y) Q_f(W)``: (N, out) × (out, in) → (N, in). ``spec=None``: QAT."""
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
        x2d = x.reshape(-1, x.shape[-1])  # (N, in)
        with torch.autocast(x.device.type, enabled=False):  # our GEMMs pick their own types
            qx = quantize_forward(x2d, config.activation, generator, config.backend)
            qw = quantize_forward(weight, config.weight, generator, config.backend)
            y = linear_output(qx, qw, config.backend, bias, out_dtype)  # (N, out)
        _save_rows(ctx, qx, qw)
        ctx.config, ctx.generator, ctx.trackers = config, generator, trackers
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        qx, qw = _load_rows(ctx)
        cfg = ctx.config
        gy = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out), read as is by the quantizers
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = linear_grad_input(gy, qw, cfg.grad_input, ctx.generator, cfg.backend, ctx.x_dtype,
                                   ctx.trackers[0])
            gx = gx.reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            gw = linear_grad_weight(gy, qx, cfg.grad_weight, ctx.generator, cfg.backend, ctx.w_dtype,
                                    ctx.trackers[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(0, dtype=torch.float32).to(ctx.w_dtype)
        return gx, gw, gb, None, None, None, None


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """``x``'s dtype, or the autocast dtype when autocast is on (as ``nn.Linear`` does)."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def fqt_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               config: FQTConfig, generator: torch.Generator | None = None,
               trackers: Trackers = _DYNAMIC) -> torch.Tensor:
    """Linear layer under ``config`` (``fp``: plain ``F.linear``). Under autocast the
    output has the autocast dtype; the GEMMs themselves run as the config says.
    ``trackers``: the (grad_input, grad_weight) range trackers of predicted specs."""
    if config.is_fp:
        return F.linear(x, weight, bias)
    return _FQTLinearFn.apply(x, weight, bias, config, generator, output_dtype(x), trackers)


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
        qx = quantize_forward(x.reshape(x.shape[0], -1), config.activation, generator, be)  # rows: samples
        qw = quantize_forward(weight.reshape(weight.shape[0], -1), config.weight, generator, be)  # rows: out ch.
        xd, wd = _conv_rows_dequant(qx, x.shape), _conv_rows_dequant(qw, weight.shape)
        y = F.conv2d(xd, wd, None if bias is None else bias.float(), stride, padding, dilation, groups)
        _save_rows(ctx, qx, qw)
        ctx.config, ctx.generator, ctx.conv, ctx.trackers = config, generator, conv, trackers
        ctx.x_shape, ctx.w_shape, ctx.x_dtype, ctx.w_dtype = x.shape, weight.shape, x.dtype, weight.dtype
        ctx.has_bias = bias is not None
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        qx, qw = _load_rows(ctx)
        cfg, (stride, padding, dilation, groups) = ctx.config, ctx.conv
        g = grad_out.float()  # (B, C_out, H, W)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gi = g
            if cfg.grad_input is not None:  # rows = samples
                gi = quantize_gradient(g.reshape(g.shape[0], -1), cfg.grad_input, ctx.generator,
                                       cfg.backend, ctx.trackers[0])
                gi = gi.dequantize().reshape(g.shape)
            wd = _conv_rows_dequant(qw, ctx.w_shape)
            gx = torch.nn.grad.conv2d_input(ctx.x_shape, wd, gi, stride, padding, dilation, groups)
            gx = gx.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gw_in = g
            if cfg.grad_weight is not None:  # rows = output channels
                gt = g.transpose(0, 1).reshape(g.shape[1], -1)
                gq = quantize_gradient(gt, cfg.grad_weight, ctx.generator, cfg.backend,
                                       ctx.trackers[1]).dequantize()
                gw_in = gq.reshape(g.shape[1], g.shape[0], *g.shape[2:]).transpose(0, 1)
            xd = _conv_rows_dequant(qx, ctx.x_shape)
            gw = torch.nn.grad.conv2d_weight(xd, ctx.w_shape, gw_in, stride, padding, dilation, groups)
            gw = gw.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(dim=(0, 2, 3)).to(ctx.w_dtype)
        return gx, gw, gb, None, None, None, None


def fqt_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               config: FQTConfig, generator: torch.Generator | None = None,
               stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1,
               trackers: Trackers = _DYNAMIC) -> torch.Tensor:
    """Conv2d under ``config`` (reference kernels; ``fp``: plain ``F.conv2d``)."""
    if config.is_fp:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _FQTConv2dFn.apply(x, weight, bias, config, generator,
                              (stride, padding, dilation, groups), trackers)


__all__ = [
    "fqt_conv2d",
    "fqt_linear",
    "linear_grad_input",
    "linear_grad_weight",
    "linear_output",
    "quantize_forward",
    "quantize_gradient",
]
