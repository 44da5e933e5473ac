"""What a converted layer's backward GEMMs multiply, rebuilt from its hooks.

For the variance formulas of :mod:`lowbit.varstats`, from the layer's input ``X`` (seen
by a forward hook) and its output gradient ``∇Y`` (seen by a hook on the output, before
the layer's backward runs), under the layer's current config:

* ``grad_weight``: the operand ``A = ∇Yᵀ`` that ``Q_w`` quantizes (rows = output features;
  columns = tokens, or (sample, position) pairs of a Conv2d in row-major order) and
  ``col_weight[n] = ‖U_n‖²`` for the other operand ``U`` = ``Q_f(X)`` (a Linear) or its
  im2col patches (a Conv2d: ``F.unfold`` of the padded ``Q_f(X)``; per group for a grouped
  convolution, with ``row_groups`` the group of each output channel). Also the
  per-sample squared norms of the weight (+ bias) gradient and the norm of their sum.
* ``grad_input``: ``A = ∇Y`` as ``Q_a`` quantizes it (rows = tokens for a Linear, samples
  for a Conv2d) and ``col_weight`` = the squared norm each column's error reaches ∇X with:
  ``‖Q_f(W)_o‖²`` for a Linear; for a Conv2d, output element ``(o, q)`` adds
  ``Σ_{c,k} Q_f(W)²_{o,c,k}`` over the taps ``k`` that land inside the input at ``q``
  (a convolution of the input's indicator with ``Σ_c W²``). ``shift_weight``: the same
  for the column sums of ∇X per input feature/channel (the input-shift probe of
  :mod:`lowbit.monitor`): ``‖Q_f(W)_o‖²`` for a Linear, ``Σ_c (Σ_{k inside} W_{o,c,k})²``
  for a Conv2d; and the probe's per-sample gradients ``Σ_{t∈n} ∇X_t`` (QAT).

Samples are the first dimension of ``X``. The forward operands are quantized as the
layer does (round-to-nearest: deterministic, so they are the very values it used).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .formats import compute_dtype
from .conv import channels_inner, conv_quantized, conv_rows
from .functional import quantize_forward
from .nn import FQTConv2d, FQTLinear
from .varstats import squared_norms, product_row_norms, weight_grad_sq_norms


@dataclass
class PathOperand:
    """One gradient path: the quantized operand ``a`` (R, N), its column weights
    ``col_weight`` (N,) or (N, G), ``row_groups`` (R,) for grouped products, and the
    probe's column weights ``shift_weight`` (N,) (∇X path only)."""

    a: torch.Tensor
    col_weight: torch.Tensor
    row_groups: torch.Tensor | None = None
    shift_weight: torch.Tensor | None = None


@dataclass
class LayerGrads:
    """A layer's backward GEMM operands on one call. ``sq``/``total``: per-sample squared
    norms (B,) and ``‖Σ_n G_n‖²`` of the weight (+ bias) gradient (``grad_weight`` set) and of
    the input-shift probe (``grad_input`` set)."""

    samples: int
    grad_weight: PathOperand | None = None
    grad_input: PathOperand | None = None
    w_sq: torch.Tensor | None = None
    w_total: float = math.nan
    x_sq: torch.Tensor | None = None
    x_total: float = math.nan


def _dequant(x2d: torch.Tensor, spec: object) -> torch.Tensor:
    """``Q_f(x2d)`` dequantized in :func:`~lowbit.formats.compute_dtype` (float64 for float64)."""
    return quantize_forward(x2d, spec).dequantize(compute_dtype(x2d.dtype))  # type: ignore[arg-type]



def linear_grads(layer: FQTLinear, x: torch.Tensor, gy: torch.Tensor, weight_path: bool,
                 input_path: bool, bias: bool) -> LayerGrads:
    """Operands of an ``FQTLinear`` call: ``x`` (*, in), ``gy`` (*, out) in compute dtype.
    The samples are ``x``'s dimension ``layer.sample_dim`` (0, or 1 for a sequence-first
    layer): every other leading dimension is tokens of a sample."""
    cfg, n_in, n_out = layer.config, layer.in_features, layer.out_features
    d = getattr(layer, "sample_dim", 0) if x.dim() > 2 else 0
    b = x.shape[d] if x.dim() > 1 else 1
    a = gy.reshape(-1, n_out)  # (N, out): the rows the layer quantizes, in its order

    def by_sample(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(N, k) rows in ``like``'s layout → (B, T, k), samples first."""
        return rows.reshape(*like.shape[:-1], -1).movedim(d, 0).reshape(b, -1, rows.shape[-1])

    out = LayerGrads(b)
    if weight_path:
        u = _dequant(x.reshape(-1, n_in), cfg.activation)  # (N, in)
        out.grad_weight = PathOperand(a.t(), squared_norms(u, 1))
        out.w_sq, out.w_total = weight_grad_sq_norms(by_sample(a, gy), by_sample(u, x), bias)
    if input_path:
        wq = _dequant(layer.linear_weight().detach(), cfg.weight)  # (out, in)
        wn = squared_norms(wq, 1)  # (out,)
        out.grad_input = PathOperand(a, wn, shift_weight=wn)
        out.x_sq, out.x_total = product_row_norms(by_sample(a, gy).sum(1), wq)  # rows (B, in)
    return out


def conv2d_grads(layer: FQTConv2d, x: torch.Tensor, gy: torch.Tensor, weight_path: bool,
                 input_path: bool, bias: bool) -> LayerGrads:
    """Operands of an ``FQTConv2d`` call: ``x`` (B, C_in, H, W) or unbatched, ``gy``
    (B, C_out, H', W') in compute dtype. Zero padding only (other modes fold ∇X back)."""
    if x.dim() == 3:  # unbatched
        x, gy = x.unsqueeze(0), gy.unsqueeze(0)
    cfg = layer.config
    xp, padding = layer._explicit_padding(x)  # what fqt_conv2d receives
    b, c_out, groups = x.shape[0], layer.out_channels, layer.groups
    geom = dict(stride=layer.stride, padding=padding, dilation=layer.dilation)
    a_rows = gy.reshape(b, c_out, -1)  # (B, C_out, P)
    out = LayerGrads(b)
    if weight_path:
        xq = conv_quantized(xp, cfg.activation)
        cols = F.unfold(xq, layer.kernel_size, **geom)  # (B, C_in·k², P)
        kg = cols.shape[1] // groups
        col_w = torch.stack([squared_norms(cols[:, g * kg:(g + 1) * kg], 1).reshape(-1)
                             for g in range(groups)], 1)  # (B·P, G)
        a_w = gy.transpose(0, 1).reshape(c_out, -1)  # (C_out, B·P)
        if groups > 1:
            rows = torch.arange(c_out, device=gy.device) // (c_out // groups)
            out.grad_weight = PathOperand(a_w, col_w, rows)
        else:
            out.grad_weight = PathOperand(a_w, col_w[:, 0])
        out.w_sq, out.w_total = weight_grad_sq_norms(a_rows.transpose(1, 2), cols.transpose(1, 2),
                                                     bias, groups)
    if input_path:
        w = layer.weight.detach()
        wq = conv_quantized(w, cfg.weight)  # (C_out, C_g, kh, kw)
        reach, taps = _conv_taps(layer, x, wq, geom)  # (1, C_out, H', W'), (G, O_g, C_g, P)
        shift_w = squared_norms(taps, 2).reshape(c_out, -1)  # (C_out, P)
        if channels_inner(cfg.grad_input):  # ∇Y's rows as the layer quantizes them: (P, C_out) order
            a_x, col_x, shift_w = conv_rows(gy, cfg.grad_input), conv_rows(reach, cfg.grad_input), shift_w.t()
        else:
            a_x, col_x = gy.reshape(b, -1), reach
        out.grad_input = PathOperand(a_x, col_x.reshape(-1), shift_weight=shift_w.reshape(-1))
        a_g = a_rows.reshape(b, groups, c_out // groups, -1)  # (B, G, O_g, P)
        shift = torch.einsum("bgop,gocp->bgc", a_g, taps).reshape(b, -1)  # (B, C_in): ∇β_n
        out.x_sq, out.x_total = product_row_norms(shift, torch.eye(shift.shape[1], device=shift.device))
    return out


def _conv_taps(layer: FQTConv2d, x: torch.Tensor, wq: torch.Tensor, geom: dict) -> tuple:
    """``reach`` (1, C_out, H', W'): ``Σ_{c,k inside} W²`` per output element, and ``taps``
    (G, O_g, C_g, P): ``Σ_{k inside} W_{o,c,k}`` per output position — kernel taps that land
    on the real input, not on padding (module doc)."""
    ones = torch.ones(1, 1, *x.shape[2:], device=x.device, dtype=wq.dtype)  # as wq
    inside, _ = layer._explicit_padding(ones)  # 1 on the input, 0 on padding
    reach = F.conv2d(inside.double(), squared_norms(wq, 1).unsqueeze(1), **geom)  # float64: W²'s range
    taps = F.conv2d(inside, wq.reshape(-1, 1, *wq.shape[2:]), **geom)  # (1, C_out·C_g, H', W')
    return reach, taps.reshape(layer.groups, layer.out_channels // layer.groups, wq.shape[1], -1)


def layer_totals(layer: FQTLinear | FQTConv2d, x: torch.Tensor, gy: torch.Tensor,
                 x_requires_grad: bool, w_grad: bool | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One call's QAT weight (+ bias) gradient ``Σ_n G_n`` (flattened, in compute dtype; ``None``
    unless the ∇W path is quantized and the weight trains) and its input-shift probe
    gradient ``Σ_n ∇β_n`` (``None`` unless the ∇X path is quantized and the input needs a
    gradient): what the paired minibatch-variance estimate of :mod:`lowbit.monitor`
    compares between two steps. ``w_grad``: whether this backward computes the weight's
    gradient (default: whether the weight requires one)."""
    cfg, gy = layer.config, gy.to(compute_dtype(gy.dtype))  # float64 keeps its range
    w = (layer.weight if isinstance(layer, FQTConv2d) else layer.linear_weight()).detach()  # (out, in, …)
    want_w = cfg.grad_weight is not None and (layer.weight.requires_grad if w_grad is None else w_grad)
    want_x = cfg.grad_input is not None and x_requires_grad
    bias = layer.bias is not None and layer.bias.requires_grad
    w_tot = x_tot = None
    if isinstance(layer, FQTConv2d):
        if x.dim() == 3:  # unbatched
            x, gy = x.unsqueeze(0), gy.unsqueeze(0)
        xp, padding = layer._explicit_padding(x)
        geom = dict(stride=layer.stride, padding=padding, dilation=layer.dilation)
        if want_w:
            xq = conv_quantized(xp, cfg.activation)
            w_tot = torch.nn.grad.conv2d_weight(xq, w.shape, gy, groups=layer.groups, **geom)
            w_tot = torch.cat([w_tot.reshape(-1), gy.sum((0, 2, 3))]) if bias else w_tot.reshape(-1)
        if want_x:
            wq = conv_quantized(w, cfg.weight)
            _, taps = _conv_taps(layer, x, wq, geom)
            g = gy.sum(0).reshape(layer.groups, layer.out_channels // layer.groups, -1)  # (G, O_g, P)
            x_tot = torch.einsum("gop,gocp->gc", g, taps).reshape(-1)  # (C_in,)
        return w_tot, x_tot
    a = gy.reshape(-1, layer.out_features)  # (N, out)
    if want_w:
        w_tot = (a.t() @ _dequant(x.reshape(-1, layer.in_features), cfg.activation)).reshape(-1)
        w_tot = torch.cat([w_tot, a.sum(0)]) if bias else w_tot
    if want_x:
        x_tot = a.sum(0) @ _dequant(w, cfg.weight)  # (in,)
    return w_tot, x_tot


def layer_grads(layer: FQTLinear | FQTConv2d, x: torch.Tensor, gy: torch.Tensor,
                x_requires_grad: bool, w_grad: bool | None = None) -> LayerGrads:
    """:func:`linear_grads` or :func:`conv2d_grads` for the paths the layer's backward
    quantizes on this call (∇W if its weight requires grad — ``w_grad``: whether this
    backward computes it —, ∇X if its input does)."""
    cfg = layer.config
    weight_path = cfg.grad_weight is not None and (layer.weight.requires_grad if w_grad is None else w_grad)
    input_path = cfg.grad_input is not None and x_requires_grad
    bias = layer.bias is not None and layer.bias.requires_grad
    fn = conv2d_grads if isinstance(layer, FQTConv2d) else linear_grads
    return fn(layer, x, gy.to(compute_dtype(gy.dtype)), weight_path, input_path, bias)  # type: ignore[arg-type]


__all__ = ["LayerGrads", "PathOperand", "conv2d_grads", "layer_grads", "layer_totals", "linear_grads"]
