"""Integer convolutions (lowbit.conv) against the reference conv on the same operands.

The three GEMMs of a conv block run as int8 im2col GEMMs with exact integer sums; the
reference dequantizes and runs float32 convolutions. Both compute the same estimator, so
they differ only by float rounding, bounded here from first principles with
``u = 2⁻²⁴`` and ``A = Σ|â||b̂|`` (+ |bias|) per output element, computed in float64:

* integer path vs the exact float64 value ``E`` of the same codes: the sum is exact,
  then at most 4 roundings (int→float, × each scale, + bias): ``|int − E| ≤ 4u·A``, plus
  ``kH·kW·u·A`` for ∇X at stride > 1, whose col2im adds kH·kW float32 terms per element;
* reference vs ``E``: rounding of each dequantized operand and of their product (3u per
  term) and a K-term float32 sum ((K − 1)u), so ``|int − ref| ≤ (K + 8)u·A``.

The quantized operands are the same in both paths: the gradient quantizers draw from the
same seeded generator (the noise stream does not depend on the backend).
"""

from __future__ import annotations

import copy
import itertools

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import FQTConfig, FQTConv1d, FQTConv2d
from lowbit.config import Backend, GradSpec, OperandSpec
import lowbit.conv as C
from lowbit.conv import conv_grad_input, conv_grad_weight, conv_output, fqt_conv1d
from lowbit.functional import block_state, fqt_conv2d, quantize_forward, quantize_gradient
from lowbit.kernels import Encoded, int8 as int8_kernel, kernels_for
from lowbit.kernels import avx512, compiled, qconv
from lowbit.kernels.im2col import exact_gemm, gemm_nchw, im2col, nhwc, patches, place, sample_pieces

U = 2.0**-24
# (N, C_in, H, W, C_out, k, stride, padding, dilation, groups)
GEOMETRIES = {
    "plain": (3, 4, 9, 11, 6, 3, 1, 1, 1, 1),
    "stride2": (3, 4, 9, 11, 6, 3, 2, 1, 1, 1),
    "dilation2": (2, 3, 10, 9, 5, 3, 1, 2, 2, 1),
    "groups2": (3, 4, 8, 8, 6, 3, 2, 0, 1, 2),
    "depthwise": (2, 8, 7, 7, 8, 3, 1, 1, 1, 8),
    "depthwise_x2": (2, 4, 7, 9, 8, 3, 2, 1, 1, 4),
    "stride3_k2": (2, 3, 11, 10, 5, 2, 3, 1, 2, 1),
    "pointwise": (3, 5, 6, 6, 7, 1, 1, 0, 1, 1),
    "pad_beyond_kernel": (2, 3, 5, 6, 4, 1, 2, 2, 1, 1),  # padding > d(k−1): crop in ∇X
    "rect_kernel": (2, 3, 8, 9, 4, (2, 3), (1, 2), (0, 1), 1, 1),
    "rect_dilated": (2, 3, 9, 7, 4, (2, 3), 1, (1, 2), (2, 1), 1),  # stride 1: kernel-row ∇W
    # one sample, one output row: the patch view's rows overlap (row stride C < K), a
    # layout torch._int_mm on the CPU misreads unless copied (fault kind 24)
    "batch1_row": (1, 3, 1, 7, 4, (1, 3), 1, 0, 1, 1),
    "batch1_row_pad": (1, 2, 1, 9, 3, (1, 4), 1, (0, 2), 1, 1),
    "batch1_1x1_image": (1, 5, 1, 1, 2, 1, 1, 0, 1, 1),
    "batch1_stride2": (1, 3, 7, 8, 4, 3, 2, 1, 1, 1),  # ∇X of one sample, zero-inserted
    "smaller_than_kernel": (2, 3, 2, 3, 4, (3, 5), 2, (1, 2), 1, 1),  # H, W < the kernel, padded
    "pointwise_stride2": (2, 6, 7, 7, 5, 1, 2, 0, 1, 1),  # 1×1 stride 2: ∇X scatters (kH·kW ≤ s²)
}


def _pair(v):  # noqa: ANN001, ANN202
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _params(stride, padding, dilation, groups) -> list[int]:  # noqa: ANN001
    return [*_pair(stride), *_pair(padding), *_pair(dilation), groups]


def _case(name: str, bias: bool = True):  # noqa: ANN202
    n, c, h, w, co, k, s, p, d, g = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, c, h, w, generator=gen)
    wt = torch.randn(co, c // g, *_pair(k), generator=gen)
    b = torch.randn(co, generator=gen) if bias else None
    return x, wt, b, _params(s, p, d, g)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _check(int_out: torch.Tensor, ref_out: torch.Tensor, exact: torch.Tensor,
           absolute: torch.Tensor, k: int, scatter: int = 0) -> None:
    """The two bounds of the module docstring; ``absolute`` = A (float64); ``scatter``:
    the float32 terms col2im adds per element of ∇X (kH·kW, each rounding once)."""
    assert int_out.dtype == ref_out.dtype and int_out.shape == ref_out.shape == exact.shape
    assert ((int_out.double() - exact).abs() <= (4 + scatter) * U * absolute).all()
    assert ((int_out.double() - ref_out.double()).abs() <= (k + 8) * U * absolute).all()


def _grad_input_on_onednn(x_shape, w_shape, params) -> bool:  # noqa: ANN001
    """Whether ∇X runs as oneDNN's (exact-sum) convolution, not the scatter + col2im:
    the flipped kernel over ∇Y padded by ``d(k − 1) − p`` at stride 1, over the
    zero-inserted ∇Y (H + d(kH − 1), W + d(kW − 1)) unpadded at stride > 1."""
    s, p, d, g = params[0:2], params[2:4], params[4:6], params[6]
    ext = [d[i] * (w_shape[2 + i] - 1) for i in range(2)]
    pad = [ext[i] - p[i] for i in range(2)]
    y_size = [(x_shape[2 + i] + 2 * p[i] - ext[i] - 1) // s[i] + 1 for i in range(2)]
    size, conv_pad = (y_size, pad) if list(s) == [1, 1] else ([x_shape[2 + i] + ext[i] for i in range(2)], [0, 0])
    k = w_shape[0] // g * w_shape[2] * w_shape[3]
    return (min(pad) >= 0 and C.zero_insert_pays(w_shape, s)
            and qconv.available(torch.zeros(1, dtype=torch.int8), (1, k, *w_shape[2:]), 1, size, (1, 1),
                                conv_pad, d))


def _forward_operands(x, wt, spec=None):  # noqa: ANN001, ANN202
    spec = OperandSpec() if spec is None else spec
    return quantize_forward(_rows(x), spec), quantize_forward(_rows(wt), spec)


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_conv_output_integer_equals_reference(name: str) -> None:
    x, wt, b, params = _case(name)
    qx, qw = _forward_operands(x, wt)
    y_int = conv_output(qx, qw, x.shape, wt.shape, params, Backend.INT8, b)  # raises if not int8
    y_ref = conv_output(qx, qw, x.shape, wt.shape, params, Backend.REFERENCE, b)
    s, p, d, g = params[0:2], params[2:4], params[4:6], params[6]
    xd, wd = qx.dequantize(torch.float64).reshape(x.shape), qw.dequantize(torch.float64).reshape(wt.shape)
    exact = F.conv2d(xd, wd, b.double(), s, p, d, g)
    absolute = F.conv2d(xd.abs(), wd.abs(), b.double().abs(), s, p, d, g)
    _check(y_int, y_ref, exact, absolute, math.prod(wt.shape[1:]))


@pytest.mark.parametrize("quantizer", ["psq", "ptq"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_conv_grads_integer_equal_reference(name: str, quantizer: str) -> None:
    x, wt, _, params = _case(name, bias=False)
    s, p, d, g = params[0:2], params[2:4], params[4:6], params[6]
    qx, qw = _forward_operands(x, wt)
    y = F.conv2d(x, wt, None, s, p, d, g)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    spec = GradSpec(quantizer=quantizer)

    def run(fn, backend, *args):  # noqa: ANN001, ANN202
        return fn(gy, *args[:1], spec, torch.Generator().manual_seed(7), backend, *args[1:])

    gx_int = run(conv_grad_input, Backend.INT8, qw, x.shape, wt.shape, params)
    gx_ref = run(conv_grad_input, Backend.REFERENCE, qw, x.shape, wt.shape, params)
    qa = quantize_gradient(_rows(gy), spec, torch.Generator().manual_seed(7), Backend.REFERENCE)
    ad = qa.dequantize(torch.float64).reshape(gy.shape)
    wd = qw.dequantize(torch.float64).reshape(wt.shape)
    exact = torch.nn.grad.conv2d_input(x.shape, wd, ad, s, p, d, g)
    absolute = torch.nn.grad.conv2d_input(x.shape, wd.abs(), ad.abs(), s, p, d, g)
    _check(gx_int, gx_ref, exact, absolute, math.prod(wt.shape[2:]) * wt.shape[0] // g,
           scatter=0 if s == [1, 1] or _grad_input_on_onednn(x.shape, wt.shape, params)
           else math.prod(wt.shape[2:]))

    gw_int = run(conv_grad_weight, Backend.INT8, qx, x.shape, wt.shape, params)
    gw_ref = run(conv_grad_weight, Backend.REFERENCE, qx, x.shape, wt.shape, params)
    qa = quantize_gradient(_rows(gy.transpose(0, 1)), spec, torch.Generator().manual_seed(7),
                           Backend.REFERENCE)
    ad = qa.dequantize(torch.float64).reshape(gy.shape[1], gy.shape[0], *gy.shape[2:]).transpose(0, 1)
    xd = qx.dequantize(torch.float64).reshape(x.shape)
    exact = torch.nn.grad.conv2d_weight(xd, wt.shape, ad, s, p, d, g)
    absolute = torch.nn.grad.conv2d_weight(xd.abs(), wt.shape, ad.abs(), s, p, d, g)
    _check(gw_int, gw_ref, exact, absolute, gy.shape[0] * gy.shape[2] * gy.shape[3])


def _layer_run(backend: str, x, wt, b, params, gy, recipe="fqt-psq-8"):  # noqa: ANN001, ANN202
    cfg = FQTConfig.from_recipe(recipe, backend=backend, seed=3)
    xs, ws = x.clone().requires_grad_(), wt.clone().requires_grad_()
    bs = None if b is None else b.clone().requires_grad_()
    y = fqt_conv2d(xs, ws, bs, block_state(cfg), params[0:2], params[2:4], params[4:6], params[6])
    y.backward(gy)
    return y, xs.grad, ws.grad, None if bs is None else bs.grad


@pytest.mark.parametrize("name", ["plain", "stride2", "groups2", "depthwise"])
def test_layer_auto_equals_reference_same_noise_stream(name: str) -> None:
    """End to end through the block's custom ops: auto (integer) against reference on
    one seeded noise stream. The bound: each element within (K + 8)u of the largest
    |value| times K (A ≤ K·max|â|·max|b̂|, and max|â||b̂| ≤ the output's scale)."""
    x, wt, b, params = _case(name)
    s, p, d, g = params[0:2], params[2:4], params[4:6], params[6]
    gy = torch.randn(F.conv2d(x, wt, b, s, p, d, g).shape, generator=torch.Generator().manual_seed(5))
    got = _layer_run("auto", x, wt, b, params, gy)
    ref = _layer_run("reference", x, wt, b, params, gy)
    assert torch.equal(got[3], ref[3])  # ∇b: the same float sum of ∇Y on both
    for a, r in zip(got[:3], ref[:3]):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert not torch.equal(a, torch.zeros_like(a))
    # the forward/grad operands are the same (same stream): differences are rounding only
    y_ratio = (got[0] - ref[0]).abs().max() / ref[0].abs().max()
    assert y_ratio <= (math.prod(wt.shape[1:]) + 8) * U * math.prod(wt.shape[1:])


@pytest.mark.usefixtures("int_mm_engine")
def test_integer_path_runs_int_mm_and_no_float_convolution() -> None:
    """What runs under auto for a per-tensor int8 recipe: the output GEMM and ∇X (stride
    2: of the zero-inserted ∇Y codes) as oneDNN int8 convolutions (all groups; ∇X one per
    piece of samples where its result is bf16)
    where that is exact on this machine, else ``_int_mm`` once per group (∇X: the col2im
    GEMM); ∇W ``_int_mm`` once per group; no float convolution."""
    x, wt, b, params = _case("groups2")
    gy = torch.ones(F.conv2d(x, wt, b, params[0:2], params[2:4], params[4:6], params[6]).shape)
    _layer_run("auto", x, wt, b, params, gy)  # oneDNN's once-per-geometry probes (qconv.geometry_exact) run here
    with torch.profiler.profile() as prof:
        _layer_run("auto", x, wt, b, params, gy)
    names = [e.name for e in prof.events()]
    onednn = qconv.available(torch.zeros(1, dtype=torch.int8), wt.shape, params[6], x.shape[2:], params[0:2],
                             params[2:4], params[4:6])
    # Y in one call, ∇X in one per piece of samples where its result is narrower than float32 (conv.acc_pieces: 1 here)
    assert names.count("onednn::qconv2d_pointwise") == (1 + C.acc_pieces(x.shape[0], torch.float32, False)) * onednn
    # else Y one _int_mm per group, ∇X (stride 2, padding 0: col2im) one per group and piece
    # of samples (their float columns within a quarter of ∇X's bytes, im2col.sample_pieces)
    n, c, h, w = x.shape
    (ho, wo), (_, cg, kh, kw) = gy.shape[2:], wt.shape
    per = sample_pieces(n, n * ho * wo * kh * kw * cg * 4, n * h * w * c * 4 // 4, torch.device("cpu"))
    assert names.count("aten::_int_mm") == (1 + (1 - onednn) * (1 + -(-n // per))) * params[6]
    assert not any("aten::convolution" in n or "aten::_convolution" in n for n in names)


ONEDNN = pytest.mark.skipif(not qconv.available(torch.zeros(1, dtype=torch.int8), (1, 1, 1, 1), 1, (2, 2),
                                                (1, 1), (0, 0), (1, 1)),
                            reason="oneDNN's int8 convolution is not exact on this CPU (no VNNI, "
                                   "or the probe failed): lowbit uses im2col + _int_mm there")


@ONEDNN
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_onednn_conv_acc_is_the_exact_integer_sum(name: str) -> None:
    """qconv.conv_acc of int8 codes (extremes ±127 and random) equals the float64
    convolution of the codes exactly, for every geometry, up to K = MAX_K terms."""
    n, c, h, w, co, k, s, p, d, g = GEOMETRIES[name]
    gen = torch.Generator().manual_seed(2)
    for xc, wc in ((torch.randint(-127, 128, (n, c, h, w), dtype=torch.int8, generator=gen),
                    torch.randint(-127, 128, (co, c // g, *_pair(k)), dtype=torch.int8, generator=gen)),
                   (torch.full((n, c, h, w), 127, dtype=torch.int8),
                    torch.full((co, c // g, *_pair(k)), -127, dtype=torch.int8))):
        got = qconv.conv_acc(xc, wc, _pair(s), _pair(p), _pair(d), g)
        want = F.conv2d(xc.double(), wc.double(), None, _pair(s), _pair(p), _pair(d), g)
        assert got.dtype == torch.float32 and torch.equal(got.double(), want)
    big = torch.full((2, qconv.MAX_K, 1, 1), 127, dtype=torch.int8)  # |acc| = 1023·127² < 2²⁴
    got = qconv.conv_acc(big, torch.full((3, qconv.MAX_K, 1, 1), 127, dtype=torch.int8), (1, 1),
                         (0, 0), (1, 1), 1)
    assert torch.equal(got, torch.full((2, 3, 1, 1), float(qconv.MAX_K * 127 * 127)))
    assert not qconv.available(big, (3, qconv.MAX_K + 1, 1, 1), 1, (2, 2), (1, 1), (0, 0), (1, 1))  # float32 could round


@ONEDNN
@pytest.mark.parametrize("quantizer", ["psq", "bhq"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_onednn_path_bitwise_the_im2col_path(name: str, quantizer: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Y and ∇X through oneDNN's convolution are bitwise those of im2col + _int_mm (the
    same exact integer sums, then the same epilogue), per-tensor and per-sample scales.
    At stride > 1, ∇X without oneDNN is the scatter path, whose col2im adds kH·kW float32
    terms per element: there the two agree within that rounding, (kH·kW + 8)·u·A with A
    the float64 sum of |terms| (PSQ; BHQ's inverse transform follows either sum)."""
    x, wt, b, params = _case(name)
    stride1 = params[0:2] == [1, 1]
    runs = []
    for onednn in (True, False):
        if not onednn:
            monkeypatch.setattr(qconv, "available", lambda *a: False)
        for gran in ("tensor", "row"):
            spec = OperandSpec(bits=8, granularity=gran)
            qx, qw = quantize_forward(_rows(x), spec), quantize_forward(_rows(wt), spec)
            y = conv_output(qx, qw, x.shape, wt.shape, params, Backend.INT8, b)
            gy = torch.ones_like(y).cumsum(-1)
            gx = conv_grad_input(gy, qw, GradSpec(quantizer=quantizer),
                                 torch.Generator().manual_seed(7), Backend.AUTO, x.shape, wt.shape, params)
            runs.append((y, gx, gy, qw))
    for (y1, g1, gy, qw), (y2, g2, _, _) in zip(runs[:2], runs[2:]):
        assert torch.equal(y1, y2) and y1.is_contiguous()
        if stride1:
            assert torch.equal(g1, g2)
        elif quantizer == "psq":
            s, p, d, g = params[0:2], params[2:4], params[4:6], params[6]
            qa = quantize_gradient(_rows(gy), GradSpec(), torch.Generator().manual_seed(7), Backend.REFERENCE)
            ad = qa.dequantize(torch.float64).reshape(gy.shape).abs()
            wd = qw.dequantize(torch.float64).reshape(wt.shape).abs()
            absolute = torch.nn.grad.conv2d_input(x.shape, wd, ad, s, p, d, g)
            assert ((g1.double() - g2.double()).abs() <= (math.prod(wt.shape[2:]) + 8) * U * absolute).all()


@pytest.mark.parametrize("quantizer", ["psq", "bhq"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_grad_weight_kernel_rows_bitwise_the_im2col_path(name: str, quantizer: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """∇W through the kernel-row GEMMs (``im2col.grad_weight_rows``: stride 1, one group)
    is bitwise ∇W through the full im2col, per-tensor and per-sample activation scales
    (the latter on the summed dimension: simulated on both), PSQ and BHQ rows; where the
    kernel-row path does not apply both runs take the im2col path."""

    x, wt, _, params = _case(name, bias=False)
    gy = torch.randn(F.conv2d(x, wt, None, params[0:2], params[2:4], params[4:6], params[6]).shape,
                     generator=torch.Generator().manual_seed(2))
    runs, used = [], []
    real = C.grad_weight_rows
    for rows in (True, False):
        monkeypatch.setattr(C, "grad_weight_rows", (lambda *a: used.append(real(*a)) or used[-1])
                            if rows else (lambda *a: None))
        for gran in ("tensor", "row"):
            qx = quantize_forward(_rows(x), OperandSpec(bits=8, granularity=gran))
            runs.append(conv_grad_weight(gy, qx, GradSpec(quantizer=quantizer),
                                         torch.Generator().manual_seed(7), Backend.AUTO, x.shape,
                                         wt.shape, params))
    for a, b in zip(runs[:2], runs[2:]):
        assert torch.equal(a, b) and a.is_contiguous()
    applies = params[0:2] == [1, 1] and params[6] == 1
    assert any(r is not None for r in used) == applies  # taken where it applies


def test_grad_weight_kernel_rows_leave_long_sums_to_im2col() -> None:
    """Past int8.MAX_K terms per sum the kernel-row path declines (None): the im2col path
    splits such sums into exact chunks (:func:`exact_gemm`)."""
    from lowbit.kernels import im2col as I, int8, kernels_for

    side = 400  # N·Hp·W' = 1 · 402 · 400 > MAX_K = 131,071
    assert side * (side + 2) > int8.MAX_K
    x = torch.zeros(1, side + 2, side + 2, 1, dtype=torch.int8)
    a = Encoded(torch.zeros(2, side * side, dtype=torch.int8), torch.ones(1, 1))
    assert I.grad_weight_rows(kernels_for("auto", "cpu"), a, x.shape, lambda i, j: x[i:j], torch.ones(1, 1), (3, 3),
                              (1, 1)) is None


def test_saved_activation_is_int8() -> None:
    x, wt, b, params = _case("plain")
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=0)
    saved: list[torch.Tensor] = []
    xs = x.clone().requires_grad_()
    w = wt.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fqt_conv2d(xs, w, b, cfg, params[0:2], params[2:4], params[4:6], params[6])
    big = [t for t in saved if t.numel() >= x.numel()]
    assert big and all(t.dtype == torch.int8 for t in big)


def test_scale_on_summed_dimension_runs_simulated_or_refuses() -> None:
    """Per-output-channel weight scales sit on the summed dimension of ∇X (sum over
    output channels): ``int8`` refuses that GEMM with the dispatcher's message, ``auto``
    runs it simulated (the reference GEMM) within the rounding bound."""
    x, wt, _, params = _case("plain", bias=False)
    row = OperandSpec(granularity="row")
    qx, qw = _forward_operands(x, wt, row)
    gy = torch.randn(3, 6, 9, 11, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match="backend='int8' cannot compute this GEMM"):
        conv_grad_input(gy, qw, GradSpec(), torch.Generator().manual_seed(7), Backend.INT8,
                        x.shape, wt.shape, params)
    auto = conv_grad_input(gy, qw, GradSpec(), torch.Generator().manual_seed(7), Backend.AUTO,
                           x.shape, wt.shape, params)
    ref = conv_grad_input(gy, qw, GradSpec(), torch.Generator().manual_seed(7), Backend.REFERENCE,
                          x.shape, wt.shape, params)
    qa = quantize_gradient(_rows(gy), GradSpec(), torch.Generator().manual_seed(7), Backend.REFERENCE)
    ad, wd = qa.dequantize(torch.float64).reshape(gy.shape), qw.dequantize(torch.float64).reshape(wt.shape)
    absolute = torch.nn.grad.conv2d_input(x.shape, wd.abs(), ad.abs(), (1, 1), (1, 1), (1, 1), 1)
    k = 6 * 9
    assert ((auto.double() - ref.double()).abs() <= 2 * (k + 8) * U * absolute).all()
    # the output GEMM has both scales on non-summed dimensions: integer even per row
    y = conv_output(qx, qw, x.shape, wt.shape, params, Backend.INT8)
    assert y.shape == (3, 6, 9, 11)


@pytest.mark.parametrize("c,groups", [(16, 1), (12, 1), (6, 1), (3, 1), (16, 2), (24, 3), (8, 8), (32, 4)])
@pytest.mark.parametrize("n,h,kh", [(2, 7, 3), (1, 1, 1)])  # one sample, one row: a Conv1d's view
def test_im2col_by_definition(c: int, groups: int, n: int, h: int, kh: int) -> None:
    """im2col (copied in 8/4/2-byte words where the group's channel run allows, else byte
    by byte) is exactly its definition: column (i, j, c') of row (n, h, w) holds the
    padded code at (n, h·s + i·d, w·s + j·d, g·C/groups + c'), in a fresh row-major
    (rows, K) layout (strides (K, 1), as a GEMM reads it; one sample's one output row
    could be a view whose rows overlap, fault kind 24)."""
    w, kw = 6, 3
    ph = (kh - 1) // 2  # the padding keeps H
    codes = torch.randint(-127, 128, (n, c * h * w), dtype=torch.int8,
                          generator=torch.Generator().manual_seed(3))
    x = place(nhwc(codes, (n, c, h, w)), (h + 2 * ph, w + 2), (ph, 1))  # padded (N, H+2ph, W+2, C)
    cg = c // groups
    for s, d in ((1, 1), (2, 1), (1, 2)):
        p = patches(x, (kh, kw), (s, s), (d, d))
        ho, wo = p.shape[1], p.shape[2]
        ni, hi, wi, ii, ji, ci = torch.meshgrid(*(torch.arange(m) for m in (n, ho, wo, kh, kw, cg)),
                                                indexing="ij")
        for g in range(groups):
            want = x[ni, hi * s + ii * d, wi * s + ji * d, g * cg + ci].reshape(n * ho * wo, kh * kw * cg)
            got = im2col(p, g, groups)
            assert got.dtype == torch.int8 and got.stride() == (kh * kw * cg, 1) and torch.equal(got, want)


@pytest.mark.parametrize("c", [8, 3])  # copied in words, and byte by byte
def test_im2col_of_no_rows_has_its_columns(c: int) -> None:
    """Patches of zero samples give a (0, kH·kW·C) operand, in the word copy as well."""
    p = torch.zeros(0, 3, 3, 2, 2, c, dtype=torch.int8)
    assert im2col(p, 0, 1).shape == (0, 4 * c)


@pytest.mark.parametrize("fused", [False, True])
def test_gemm_nchw_bitwise_the_gemm_then_permute(fused: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """gemm_nchw (the epilogue writes (N, C, P)) is bitwise exact_gemm of the (N·P, C)
    product permuted, eager and compiled: per-sample and per-tensor activation scales,
    per-tensor and per-channel column scales, bias, float32 and bfloat16 outputs; a scale
    on the summed dimension takes the simulated GEMM, also bitwise."""
    monkeypatch.setattr(compiled, "MIN_NUMEL", 0 if fused else 1 << 62)
    monkeypatch.setattr(avx512, "_enabled", False)  # the compiled kernels, not the C quantizer
    gen = torch.Generator().manual_seed(5)
    n, p, k, c = 3, 20, 27, 8
    codes = torch.randint(-127, 128, (n * p, k), dtype=torch.int8, generator=gen)
    b_codes = torch.randint(-127, 128, (k, c), dtype=torch.int8, generator=gen)
    kern = kernels_for(Backend.AUTO, "cpu")
    a_scales = (torch.rand(n, 1, generator=gen), torch.rand(1, 1, generator=gen))
    b_scales = (torch.rand(1, c, generator=gen), torch.rand(1, 1, generator=gen),
                torch.rand(k, 1, generator=gen))  # the last on the summed dimension
    outs = ((None, torch.float32), (torch.randn(c, generator=gen), torch.float32),
            (torch.randn(c, generator=gen), torch.bfloat16))
    cases = list(itertools.product(range(2), range(3), range(3)))
    if fused:  # each compiled variant costs a compilation: every value of each factor, not every mix
        cases = [(0, 0, 0), (1, 1, 1), (0, 1, 2), (1, 0, 2), (0, 2, 0)]
    for i, j, m in cases:
        a_scale, b_scale, (bias, dt) = a_scales[i], b_scales[j], outs[m]
        b = Encoded(b_codes, b_scale)
        rows = a_scale if a_scale.shape[0] == 1 else a_scale.repeat_interleave(p, dim=0)
        want = exact_gemm(kern, Encoded(codes, rows), b, bias, dt)
        want = want.reshape(n, 4, 5, c).permute(0, 3, 1, 2).contiguous()
        got = gemm_nchw(kern, codes, a_scale, b, (4, 5), bias, dt)
        assert got.dtype == dt and got.is_contiguous() and got._base is None
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"60 rows are not samples of \(7,\) positions"):
        gemm_nchw(kern, codes, torch.rand(1, 1), Encoded(b_codes, torch.rand(1, c)), (7,))
    with pytest.raises(ValueError, match=r"the scale \(2, 1\) is neither"):
        gemm_nchw(kern, codes, torch.rand(2, 1), Encoded(b_codes, torch.rand(1, c)), (4, 5))


def test_long_sum_split_exact() -> None:
    """K > int8.MAX_K: chunks of exact int32 sums added in int64. All codes −128: the
    sum ``K·128² = 2³¹ + 2¹⁷`` overflows int32 and is a float32 number, so exact."""
    k = int8_kernel.MAX_K + 9
    a = Encoded(torch.full((2, k), -128, dtype=torch.int8), torch.tensor([[1.0]]))
    b = Encoded(torch.full((k, 3), -128, dtype=torch.int8), torch.tensor([[1.0]]))
    out = exact_gemm(kernels_for(Backend.INT8, "cpu"), a, b)
    assert k * 128 * 128 == 2**31 + 2**17
    assert torch.equal(out, torch.full((2, 3), float(2**31 + 2**17)))


def test_grad_weight_long_sum_through_conv() -> None:
    """∇W sums over N·H'·W' > MAX_K positions: integer (split) vs reference, bounded."""
    n = int8_kernel.MAX_K // (12 * 12) + 2
    x = torch.randn(n, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    wt = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    params = _params(1, 1, 1, 1)
    qx, _ = _forward_operands(x, wt)
    gy = torch.randn(n, 2, 12, 12, generator=torch.Generator().manual_seed(2))
    assert n * 144 > int8_kernel.MAX_K
    got = conv_grad_weight(gy, qx, GradSpec(), torch.Generator().manual_seed(7), Backend.INT8,
                           x.shape, wt.shape, params)
    ref = conv_grad_weight(gy, qx, GradSpec(), torch.Generator().manual_seed(7), Backend.REFERENCE,
                           x.shape, wt.shape, params)
    qa = quantize_gradient(_rows(gy.transpose(0, 1)), GradSpec(), torch.Generator().manual_seed(7),
                           Backend.REFERENCE)
    ad = qa.dequantize(torch.float64).reshape(2, n, 12, 12).transpose(0, 1)
    xd = qx.dequantize(torch.float64).reshape(x.shape)
    exact = torch.nn.grad.conv2d_weight(xd, wt.shape, ad, (1, 1), (1, 1), (1, 1), 1)
    absolute = torch.nn.grad.conv2d_weight(xd.abs(), wt.shape, ad.abs(), (1, 1), (1, 1), (1, 1), 1)
    _check(got, ref, exact, absolute, n * 144)


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 2, 2), (1, "same", 2, 1),
                                                            (1, "valid", 1, 4)])
@pytest.mark.parametrize("batch", [3, 1])  # batch 1: overlapping im2col rows (fault kind 24)
def test_conv1d_integer_equals_reference_and_conv2d(stride, padding, dilation, groups, batch) -> None:  # noqa: ANN001
    """fqt_conv1d is the conv2d block on a height-1 image: integer == reference within
    the bound (output and ∇X), and both equal fqt_conv2d on the unsqueezed operands bitwise."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 19, generator=gen)
    wt = torch.randn(8, 4 // groups, 3, generator=gen)
    b = torch.randn(8, generator=gen)
    outs = {}
    for be in ("int8", "reference"):
        cfg = FQTConfig.from_recipe("fqt-psq-8", backend=be, seed=1)
        xs, ws = x.clone().requires_grad_(), wt.clone().requires_grad_()
        y = fqt_conv1d(xs, ws, b, cfg, stride, padding, dilation, groups)
        y.backward(torch.ones_like(y))
        outs[be] = (y, xs.grad, ws.grad)
        assert y.shape == F.conv1d(x, wt, b, stride, padding, dilation, groups).shape
    p2 = (0, padding) if isinstance(padding, int) else padding
    y2 = fqt_conv2d(x.unsqueeze(2), wt.unsqueeze(2), b, FQTConfig.from_recipe("fqt-psq-8", seed=1),
                    (1, stride), p2, (1, dilation), groups)
    assert torch.equal(outs["int8"][0], y2.squeeze(2))
    # the length of each GEMM's sum: output C_in/g·k, ∇X C_out/g·k, ∇W N·L'
    for i, k in enumerate((3 * 4 // groups, 3 * 8 // groups, batch * y2.shape[-1])):
        ratio = (outs["int8"][i] - outs["reference"][i]).abs().max() / outs["reference"][i].abs().max()
        assert ratio <= (k + 8) * U * k


def test_convert_conv1d_exact_type_only() -> None:
    class MyConv1d(nn.Conv1d):
        pass

    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.ReLU(), MyConv1d(4, 4, 1))
    with pytest.warns(lowbit.ConversionWarning, match="MyConv1d is a subclass of nn.Conv1d"):
        model, rep = lowbit.convert(model, FQTConfig.from_recipe("fqt-psq-8", seed=0), report=True)
    assert type(model[0]) is FQTConv1d and type(model[2]) is MyConv1d
    assert rep.converted == ("0",) and set(rep.skipped) == {"2"}
    y = model(torch.randn(2, 2, 9))
    assert y.shape == (2, 4, 9)


def test_empty_batch() -> None:
    x, wt, b, params = _case("stride2")
    x = x[:0]
    for be in ("auto", "int8", "reference"):
        cfg = FQTConfig.from_recipe("fqt-psq-8", backend=be, seed=0)
        xs, ws, bs = x.clone().requires_grad_(), wt.clone().requires_grad_(), b.clone().requires_grad_()
        y = fqt_conv2d(xs, ws, bs, cfg, params[0:2], params[2:4], params[4:6], params[6])
        assert y.shape == (0, 6, 5, 6)
        y.sum().backward()
        assert xs.grad.shape == x.shape
        assert torch.equal(ws.grad, torch.zeros_like(wt)) and torch.equal(bs.grad, torch.zeros_like(b))


def test_autocast_output_is_the_float32_result_cast() -> None:
    """Under bf16 autocast the integer GEMMs are the same (the recipe's arithmetic); the
    output is the float32 result cast to bf16, the gradients are unchanged (float32)."""
    x, wt, b, params = _case("groups2")
    gy = torch.randn(3, 6, 3, 3, generator=torch.Generator().manual_seed(1))
    plain = _layer_run("auto", x, wt, b, params, gy)
    cfg = FQTConfig.from_recipe("fqt-psq-8", backend="auto", seed=3)
    xs, ws, bs = x.clone().requires_grad_(), wt.clone().requires_grad_(), b.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16):
        y = fqt_conv2d(xs, ws, bs, block_state(cfg), params[0:2], params[2:4], params[4:6], params[6])
    assert y.dtype == torch.bfloat16 and torch.equal(y, plain[0].to(torch.bfloat16))
    y.backward(gy.to(torch.bfloat16))  # ∇Y in bf16: the plain run on the same values
    plain_bf = _layer_run("auto", x, wt, b, params, gy.to(torch.bfloat16).float())
    assert torch.equal(xs.grad, plain_bf[1]) and torch.equal(ws.grad, plain_bf[2])
    assert xs.grad.dtype == torch.float32


def test_module_conv2d_and_conv1d_match_nn_shapes_and_run_integer() -> None:
    torch.manual_seed(0)
    cfg = FQTConfig.from_recipe("fqt-psq-8", backend="int8", seed=0)
    for plain, x in ((nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3), torch.randn(2, 3, 9, 9)),
                     (nn.Conv1d(3, 6, 3, stride=2, padding=1, groups=3), torch.randn(2, 3, 9))):
        cls = FQTConv2d if isinstance(plain, nn.Conv2d) else FQTConv1d
        layer = cls.from_float(plain, cfg)
        y = layer(x.requires_grad_())
        assert y.shape == plain(x).shape
        y.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("quantizer", ["bhq", "hadamard"])
@pytest.mark.parametrize("name", ["plain", "stride2", "groups2"])
def test_row_transforms_integer_equal_reference(name: str, quantizer: str) -> None:
    """BHQ/Hadamard transform (and pad: 3 samples → a block) the rows of ∇Y; the integer
    GEMMs run on all transformed rows and apply ``T⁻¹`` after (for ∇W with groups the
    transform mixes the groups' channels: that GEMM runs simulated, so it equals the
    reference bitwise). Bound, relative to the largest |value|: the first-order rounding
    of a K-term sum, (K + 8)·u·K (A ≤ K·max|term| ≤ K·max|result| does not hold under
    cancellation, so this is the same bound as the layer test: it catches any error of
    the GEMM's structure, which is O(1))."""
    x, wt, _, params = _case(name, bias=False)
    qx, qw = _forward_operands(x, wt)
    gy = torch.randn(F.conv2d(x, wt, None, params[0:2], params[2:4], params[4:6], params[6]).shape,
                     generator=torch.Generator().manual_seed(2))
    spec = GradSpec(quantizer=quantizer)
    for fn, op, k in ((conv_grad_input, qw, math.prod(wt.shape[2:]) * wt.shape[0] // params[6]),
                      (conv_grad_weight, qx, gy.shape[0] * gy.shape[2] * gy.shape[3])):
        mixed = fn is conv_grad_weight and params[6] > 1  # simulated: int8 refuses it (below)
        got, ref = (fn(gy, op, spec, torch.Generator().manual_seed(7), be, x.shape, wt.shape, params)
                    for be in (Backend.AUTO if mixed else Backend.INT8, Backend.REFERENCE))
        assert got.shape == ref.shape and got.dtype == ref.dtype
        if fn is conv_grad_weight and params[6] > 1:
            assert torch.equal(got, ref)
        assert (got - ref).abs().max() <= (k + 8) * U * k * ref.abs().max()


# -- backend="int8"/"fp8" refuse every convolution GEMM that would run simulated -----------------
_INT8_KERNEL = "integer kernels (oneDNN int8 convolution or torch._int_mm)"


def _refusal(backend: str, gemm: str, kernel: str, cause: str) -> str:
    import re
    return re.escape(f"backend={backend!r} cannot compute this GEMM (the convolution's {gemm}) on "
                     f"{kernel}: {cause}; use backend='auto' (simulated there)")


@pytest.mark.parametrize("module,x_shape", [(nn.Conv2d(2, 4, 3), (2, 2, 5, 5)),
                                            (nn.Conv1d(2, 4, 3), (2, 2, 5))], ids=["conv2d", "conv1d"])
def test_int8_backend_refuses_asymmetric_gradient_grid(module: nn.Module, x_shape: tuple) -> None:
    """fqt-psq-4a: ∇Y on an asymmetric grid has no integer conv kernel (code 0 is not 0);
    ``auto`` runs it simulated, ``int8`` must say so instead (it ran silently before)."""
    m = lowbit.convert(module, FQTConfig.from_recipe("fqt-psq-4a", seed=0, backend="int8"))
    y = m(torch.randn(*x_shape, requires_grad=True))  # the forward is symmetric int8: runs
    cause = "an operand is on an asymmetric grid (an offset: code 0 is not the value 0)"
    # both backward GEMMs are refused; ∇W runs first (its buffers freed before ∇X's)
    with pytest.raises(ValueError, match=_refusal("int8", "∇W", _INT8_KERNEL, cause)):
        y.sum().backward()


def test_fp8_backend_refuses_convolutions() -> None:
    m = lowbit.convert(nn.Conv2d(2, 4, 3), FQTConfig.from_recipe("fqt-psq-fp8", seed=0, backend="fp8"))
    cause = "FP8 convolution has no _scaled_mm kernel (lowbit runs it simulated)"
    with pytest.raises(ValueError, match=_refusal("fp8", "output", "torch._scaled_mm", cause)):
        m(torch.randn(2, 2, 5, 5))
    x, wt, _, params = _case("plain", bias=False)
    qx, qw = _forward_operands(x, wt)
    gy = torch.randn(3, 6, 9, 11, generator=torch.Generator().manual_seed(2))
    for gemm, call in (("∇X", conv_grad_input), ("∇W", conv_grad_weight)):
        with pytest.raises(ValueError, match=_refusal("fp8", gemm, "torch._scaled_mm", cause)):
            call(gy, qw if gemm == "∇X" else qx, GradSpec(), torch.Generator().manual_seed(7),
                 Backend.FP8, x.shape, wt.shape, params)


def test_int8_backend_names_the_scale_on_the_summed_dimension() -> None:
    x, wt, _, params = _case("plain", bias=False)
    qx, qw = _forward_operands(x, wt, OperandSpec(granularity="row"))
    gy = torch.randn(3, 6, 9, 11, generator=torch.Generator().manual_seed(2))
    cause = "the per-output-channel weight scale (weight.granularity='row') lies on the summed dimension of ∇X"
    with pytest.raises(ValueError, match=_refusal("int8", "∇X", _INT8_KERNEL, cause)):
        conv_grad_input(gy, qw, GradSpec(), torch.Generator().manual_seed(7), Backend.INT8,
                        x.shape, wt.shape, params)
    cause = "the per-sample activation scale (activation.granularity='row') lies on the summed dimension of ∇W"
    with pytest.raises(ValueError, match=_refusal("int8", "∇W", _INT8_KERNEL, cause)):
        conv_grad_weight(gy, qx, GradSpec(), torch.Generator().manual_seed(7), Backend.INT8,
                         x.shape, wt.shape, params)


def test_int8_backend_refuses_grouped_mixing_transform_and_block_formats() -> None:
    x, wt, _, params = _case("groups2", bias=False)
    qx, qw = _forward_operands(x, wt)
    gy = torch.randn(3, 6, 3, 3, generator=torch.Generator().manual_seed(2))
    with pytest.raises(ValueError, match=_refusal("int8", "∇W", _INT8_KERNEL, "with groups, the "
                                                  "gradient's row transform (BlockHouseholder) mixes "
                                                  "the groups' output channels")):
        conv_grad_weight(gy, qx, GradSpec(quantizer="bhq"), torch.Generator().manual_seed(7),
                         Backend.INT8, x.shape, wt.shape, params)
    qxb, qwb = _forward_operands(x, wt, OperandSpec(format="mxfp4"))
    cause = f"an operand's codes are {qxb.codes.dtype} (format not int8)"
    assert qxb.codes.dtype != torch.int8
    with pytest.raises(ValueError, match=_refusal("int8", "output", _INT8_KERNEL, cause)):
        conv_output(qxb, qwb, x.shape, wt.shape, params, Backend.INT8)


# -- channels-last models: PyTorch's memory-format rule, the NCHW path's values ------------------
def _cl_net() -> nn.Module:
    torch.manual_seed(0)
    # one input channel (a grayscale image: contiguous in both formats) and one output channel
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(16, 20, 3, stride=2, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(20, 20, 3, padding=1, groups=4, bias=False),
                         nn.Conv2d(20, 18, 1, stride=2, bias=False),
                         nn.Conv2d(18, 24, 3, padding=2, dilation=2, bias=False), nn.Conv2d(24, 1, 1))


@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fqt-bhq-8", "fqt-hadamard-8", "fqt-ptq-4", "fqt-bhq-4a",
                                    "fqt-psq-fp8", "fp8-rowwise", "reference", "qat-8", "sr-forward"])
def test_channels_last_model_equals_nchw_model_and_stays_channels_last(recipe: str) -> None:
    """A channels-last model (``model.to(memory_format=torch.channels_last)`` and a
    channels-last input) gives the NCHW model's output, input gradient and weight
    gradients bit for bit over two steps (integer, simulated and float paths; the
    activation codes read in NHWC order where round-to-nearest allows, in NCHW order under
    a stochastic-rounding forward), and its convolutions return channels-last Y and ∇X,
    as PyTorch's do. The last layer's bias gradient is compared too: its ∇Y (one channel)
    is the same memory in both (a bias gradient of a channels-last ∇Y is a float sum in
    that memory order, as PyTorch's own)."""
    import dataclasses
    cfg = FQTConfig.from_recipe("fqt-psq-8" if recipe in ("sr-forward", "reference") else recipe, seed=3,
                                backend="reference" if recipe == "reference" else "auto")
    if recipe == "sr-forward":
        cfg = dataclasses.replace(cfg, activation=OperandSpec(8, rounding="stochastic"))
    x, gy = torch.randn(5, 1, 12, 12), torch.randn(5, 1, 3, 3)
    runs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        model = lowbit.convert(_cl_net().to(memory_format=layout), cfg)
        formats: list[bool] = []

        def hook(mod: nn.Module, i: tuple, o: torch.Tensor, seen: list[bool] = formats) -> None:
            seen.append(o.is_contiguous(memory_format=torch.channels_last))

        for m in model:
            if isinstance(m, FQTConv2d):
                m.register_forward_hook(hook)
        xi = x.clone(memory_format=layout).requires_grad_()
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            xi.grad = None
            y = model(xi)
            y.backward(gy)
        runs.append((y.detach(), xi.grad, [p.grad for p in model.parameters()], formats))
    (y0, gx0, gp0, _), (y1, gx1, gp1, f1) = runs
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    assert all(torch.equal(a, b) for a, b in zip(gp0, gp1, strict=True))
    assert all(f1) and len(f1) == 12  # 6 layers × 2 steps
    assert gx1.stride() == torch.empty(x.shape, memory_format=torch.channels_last).stride()
    assert y0.is_contiguous() and gx0.stride() == x.stride()  # the NCHW model stays NCHW


def test_channels_last_layout_follows_pytorchs_rule() -> None:
    """``memory_layout``: channels-last output where the input or the weight is
    channels-last (PyTorch's convolutions; a one-channel input counts by its strides);
    the activation codes in NHWC order only for a channels-last contiguous input under
    an order-free activation quantizer (round to nearest, no block scales)."""
    cl = torch.channels_last
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    nearest, sr = OperandSpec(8), OperandSpec(8, rounding="stochastic")
    mx = OperandSpec(format="mxfp8_e4m3")
    assert C.memory_layout(x, w, nearest) == C.NCHW
    assert C.memory_layout(x.contiguous(memory_format=cl), w, nearest) == C.CL_CODES
    assert C.memory_layout(x, w.contiguous(memory_format=cl), nearest) == C.CL_OUT
    assert C.memory_layout(x.contiguous(memory_format=cl), w, sr) == C.CL_OUT
    assert C.memory_layout(x.contiguous(memory_format=cl), w, mx) == C.CL_OUT
    one, w1 = torch.randn(2, 1, 5, 5), torch.randn(6, 1, 3, 3)
    assert C.memory_layout(one.to(memory_format=cl), w1.to(memory_format=cl), nearest) == C.CL_CODES
    for xs, ws in ((x, w), (one, w1)):  # every combination as PyTorch's convolution decides it
        for xv in (xs, xs.to(memory_format=cl)):
            for wv in (ws, ws.to(memory_format=cl)):
                y = F.conv2d(xv, wv)
                torch_cl = y.is_contiguous(memory_format=cl) and not y.is_contiguous()
                assert (C.memory_layout(xv, wv, nearest) != C.NCHW) == torch_cl


def test_channels_last_empty_batch_and_fake_strides() -> None:
    """An empty channels-last batch gives an empty channels-last output and gradients
    (as an NCHW one does); Y's and ∇X's strides are exactly those the ops' fake
    implementations promise, also where a size-1 extent makes a tensor contiguous in both
    formats (one output channel, a 1×1 output) — on the integer and the simulated path."""
    from lowbit.ops import block_backward, block_forward

    cl = torch.channels_last
    layer = lowbit.convert(nn.Conv2d(3, 8, 3).to(memory_format=cl), FQTConfig.from_recipe("fqt-psq-8", seed=0))
    x = torch.randn(0, 3, 8, 8).contiguous(memory_format=cl).requires_grad_()
    y = layer(x)
    assert y.shape == (0, 8, 6, 6) and y.is_contiguous(memory_format=cl)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for recipe in ("fqt-psq-8", "fqt-psq-fp8"):
        for c_out, side in ((1, 5), (4, 3), (1, 3)):
            conv = lowbit.convert(nn.Conv2d(3, c_out, 3).to(memory_format=cl), FQTConfig.from_recipe(recipe, seed=0))
            x = torch.randn(2, 3, side, side).contiguous(memory_format=cl)
            params = [1, 1, 0, 0, 1, 1, 1, C.memory_layout(x, conv.weight, conv.config.activation)]
            args = ("conv2d", x, conv.weight, conv.bias, conv._block.trace_key, conv._block.ident, params, torch.float32)
            real = block_forward(*args)
            with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
                fake = block_forward(*args)
            assert real[0].stride() == fake[0].stride(), (recipe, c_out, side)
            meta = ([x.shape[0], *x.shape[1:]], x.dtype, list(conv.weight.shape), conv.weight.dtype, conv.bias.dtype)
            bargs = ("conv2d", torch.randn_like(real[0]), list(real[1:]), conv._block.ident, params, meta[0], meta[1],
                     meta[2], meta[3], meta[4], [0, 0], [True, True, True])
            got = block_backward(*bargs)
            with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
                want = block_backward(*bargs)
            assert [g.stride() for g in got] == [g.stride() for g in want], (recipe, c_out, side)


# -- fault kind: oneDNN's int8 convolution outside the geometries it computes -----------------
# Found by a new-user review (2026-12-04): under torch 2.13, qconv2d_pointwise left outputs
# unwritten (wrong sums, different on a second call) at an output width of 1, with padding
# beyond kernel − 1, and with dilation, and crashed the process on some dilated and strided
# 1×1 / 2×2 shapes. lowbit now routes only lowbit.kernels.qconv.geometry_ok geometries there.
# (conv class, in, out, kernel, stride, padding, dilation, groups, input shape)
ONEDNN_FAULTS = [
    (nn.Conv2d, 16, 16, 3, 2, 0, 3, 1, (4, 16, 15, 8)),   # output 1 wide, dilated: wrong Y
    (nn.Conv2d, 8, 2, 2, 2, 1, 2, 1, (2, 8, 9, 2)),
    (nn.Conv2d, 4, 4, 2, 2, 0, 3, 2, (2, 4, 12, 5)),
    (nn.Conv2d, 1, 2, 2, 1, 3, 1, 1, (2, 1, 6, 7)),       # padding > kernel − 1: unwritten outputs
    (nn.Conv2d, 1, 1, 2, 1, 1, 2, 1, (1, 1, 6, 1)),       # ∇X dilated, 1 wide
    (nn.Conv2d, 4, 8, (1, 2), (1, 3), 0, 1, 1, (1, 4, 12, 4)),  # no padding, output 1 wide
    (nn.Conv2d, 3, 3, 3, 2, 0, 1, 1, (1, 3, 12, 3)),
    (nn.Conv1d, 3, 1, 1, 2, 1, 3, 1, (2, 3, 1)),          # crashed the process
    (nn.Conv2d, 1, 1, 1, 3, 2, 2, 1, (1, 1, 6, 1)),       # crashed the process
]


def test_onednn_geometry_rule() -> None:
    """The rule itself: dilation 1, padding ≤ kernel − 1, output at least 2 wide."""
    ok = qconv.geometry_ok
    assert ok((28, 28), (3, 3), (1, 1), (1, 1), (1, 1)) and ok((7, 7), (3, 3), (2, 2), (1, 1), (1, 1))
    assert ok((1, 9), (1, 3), (1, 1), (0, 1), (1, 1))  # Conv1d: height-1 output is fine
    assert not ok((28, 28), (3, 3), (1, 1), (2, 2), (2, 2))  # dilation
    assert not ok((6, 7), (2, 2), (1, 1), (3, 3), (1, 1))  # padding > kernel − 1
    assert not ok((12, 3), (3, 3), (2, 2), (0, 0), (1, 1))  # output 1 wide


def test_onednn_faulty_geometries_give_the_reference_layer() -> None:
    """Each shape of the fault, as a converted layer on ``auto`` against ``reference`` on
    the same seed: output and ∇X within 1e-5 of the reference's scale (the bug's errors
    were O(1) and more), the same on a second call, and finite. All shapes in one
    subprocess (the faulty route crashed the process on some; a crash fails the test and
    the last case printed names the shape) — one process, not one per shape: each paid
    the import and the first compile of lowbit's kernels (9 × ≈ 8 s)."""
    import subprocess
    import sys
    code = """
import torch, lowbit
from torch import nn
from tests.core.test_conv import ONEDNN_FAULTS
def run(case, backend):
    cls, ci, co, k, s, p, d, g, shape = case
    torch.manual_seed(0)
    m = lowbit.convert(nn.Sequential(cls(ci, co, k, s, p, d, g)), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0, backend=backend))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    ys = [m(x) for _ in range(2)]
    gy = torch.randn(ys[0].shape, generator=torch.Generator().manual_seed(2))
    ys[0].backward(gy)
    return ys, x.grad
for i, case in enumerate(ONEDNN_FAULTS):
    print("case", i, case, flush=True)
    (y1, y2), gx = run(case, "auto")
    (r1, _), gr = run(case, "reference")
    assert torch.equal(y1, y2), ("a second call differs", i)
    assert torch.isfinite(y1).all() and torch.isfinite(gx).all(), i
    assert float((y1 - r1).abs().max()) <= 1e-5 * float(r1.abs().max() + 1), (i, float((y1 - r1).abs().max()))
    assert float((gx - gr).abs().max()) <= 1e-5 * float(gr.abs().max() + 1), (i, float((gx - gr).abs().max()))
print("done", len(ONEDNN_FAULTS))
"""
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert r.stdout.split("\n")[-2] == f"done {len(ONEDNN_FAULTS)}"


@ONEDNN
def test_onednn_route_only_where_exact() -> None:
    """``conv_acc`` on 300 random small geometries that :func:`qconv.geometry_ok` accepts
    (strides 1–3, kernels 1–5, padding ≤ kernel − 1, inputs 1–12 wide, groups, int8 and
    channels-last uint8 inputs): every sum exact against the float64 convolution of the
    codes, twice. In a subprocess: a crash fails the test instead of the run."""
    import subprocess
    import sys
    code = """
import random, torch
from lowbit.kernels import qconv
random.seed(5)
checked = 0
while checked < 300:
    n, c, o = random.choice([1, 2, 3]), random.choice([1, 2, 3, 4, 8, 16]), random.choice([1, 2, 3, 4, 8, 16])
    k = (random.choice([1, 2, 3, 5]), random.choice([1, 2, 3, 5]))
    s = (random.choice([1, 2, 3]), random.choice([1, 2, 3]))
    p = (random.randint(0, k[0] - 1), random.randint(0, k[1] - 1))
    h, w = random.choice([1, 2, 3, 4, 5, 7, 8, 12]), random.choice([1, 2, 3, 4, 5, 7, 8, 12])
    g = random.choice([1, c]) if o % c == 0 else 1
    if h + 2 * p[0] < k[0] or w + 2 * p[1] < k[1] or not qconv.geometry_ok((h, w), k, s, p, (1, 1)):
        continue
    x = torch.randint(-127, 128, (n, c, h, w), dtype=torch.int8)
    wt = torch.randint(-127, 128, (o, c // g, *k), dtype=torch.int8)
    want = torch.nn.functional.conv2d(x.double(), wt.double(), None, s, p, 1, g)
    for xi in (x, (x.view(torch.uint8) ^ 128).contiguous(memory_format=torch.channels_last)):
        for _ in range(2):
            got = qconv.conv_acc(xi, wt, s, p, (1, 1), g)
            assert torch.equal(got.double(), want), (n, c, o, h, w, k, s, p, g)
    checked += 1
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])


@ONEDNN
def test_convolutions_take_onednn_only_where_their_probe_is_exact() -> None:
    """torch 2.13's oneDNN int8 convolution gave wrong sums for grouped convolutions of
    ≥ 31 output channels a group with some input counts (a review: ``Conv2d(48, 96, 3,
    groups=2)``'s output 3.3× off under every recipe, ``Conv2d(192, 96, 3, stride=2,
    groups=4)``'s ∇X by 5e5), silently — at some input sizes and not others (a second
    review: 28×28 wrong where 8×8 was right); and (README fault kind 270, a new user's trial)
    an ungrouped ``Conv2d(4, 1, (2, 1), padding=(1, 0))`` on (3, 4, 14, 16) inputs 32% off,
    which the one probe per process passed, and ``Conv2d(51, 51, 3, stride=(1, 3), groups=3)``
    exact for one sample, wrong from two on. Each geometry, size and batch is probed once: where
    ``qconv.available`` says yes, ``conv_acc`` is exact; and a converted layer equals the
    reference backend's on the same noise, output and ∇X. In a subprocess (oneDNN may
    crash the process on geometries outside its gate)."""
    import subprocess
    import sys
    code = """
import copy, sys, torch, lowbit
from lowbit.kernels import qconv
torch.set_num_threads(int(sys.argv[1]))  # exactness depends on the thread count too
routed = 0
square = [(48, 96, 2, 1, 8), (96, 192, 4, 2, 8), (192, 96, 4, 2, 8), (64, 128, 2, 1, 8), (6, 64, 2, 1, 8),
          (32, 64, 2, 1, 8), (16, 16, 16, 1, 8), (16, 32, 16, 2, 8), (4, 64, 2, 1, 28), (10, 62, 2, 2, 14),
          (64, 4, 2, 1, 28), (24, 32, 2, 1, 20)]
cases = [(cin, cout, g, (3, 3), (s, s), (1, 1), (2, cin, hw, hw)) for cin, cout, g, s, hw in square]
# a trial of convolution shapes: an ungrouped geometry the one probe passed, and a grouped one
# exact for one sample and wrong from two on (two threads)
cases += [(4, 1, 1, (2, 1), (1, 1), (1, 0), (3, 4, 14, 16)), (51, 51, 3, (3, 3), (1, 3), (1, 1), (5, 51, 27, 27))]
for cin, cout, g, k, s, p, shape in cases:
    x = torch.randint(-127, 128, shape, dtype=torch.int8)
    w = torch.randint(-127, 128, (cout, cin // g, *k), dtype=torch.int8)
    if qconv.available(x, w.shape, g, shape[2:], s, p, (1, 1)):
        routed += 1
        want = torch.nn.functional.conv2d(x.double(), w.double(), None, s, p, 1, g)
        assert torch.equal(qconv.conv_acc(x, w, s, p, (1, 1), g).double(), want), (cin, cout, g)
    conv = torch.nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=g)
    xf = torch.randn(shape)
    out = []
    for be in ("auto", "reference"):
        q = lowbit.convert(copy.deepcopy(conv), lowbit.FQTConfig.from_recipe("fqt-psq-8", backend=be, seed=1))
        xi = xf.clone().requires_grad_(True)
        y = q(xi)
        y.backward(torch.ones_like(y))
        out.append((y.detach(), xi.grad))
    for a, b in zip(*out):
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (cin, cout, g, s, shape)
assert routed >= 2  # the depthwise and exact grouped geometries still take oneDNN
"""
    for threads in (1, 2):
        r = subprocess.run([sys.executable, "-c", code, str(threads)], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (threads, r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_grad_input_written_in_its_dtype_equals_the_float32_product_cast(monkeypatch: pytest.MonkeyPatch,
                                                                         layout: str) -> None:
    """Under bf16 autocast the ∇X epilogue writes bfloat16 itself where no row transform
    follows (PSQ): bitwise the float32 product cast, as before (the same seed and noise)."""
    def grads() -> list[torch.Tensor]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1))
        x = torch.randn(4, 3, 9, 9)
        if layout == "channels_last":
            m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        m = lowbit.convert(m, FQTConfig.from_recipe("fqt-psq-8", seed=1))
        x.requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            y = m(x)
        y.float().square().sum().backward()
        return [x.grad, *(p.grad for p in m.parameters())]

    seen: list[torch.dtype] = []
    real = lowbit.conv._grad_input_onednn
    monkeypatch.setattr(lowbit.conv, "_grad_input_onednn", lambda *a: seen.append(a[11]) or real(*a))  # dtype
    own = grads()
    assert torch.bfloat16 in seen  # the epilogue wrote ∇X's own dtype
    monkeypatch.setattr(lowbit.conv, "_grad_input_onednn", lambda *a: real(*a[:11], torch.float32, *a[12:]))
    for a, b in zip(own, grads()):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_grad_weight_kernel_rows_in_sample_pieces_equal_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel-row ∇W runs its samples in pieces (patches at most the placed input's
    size): the summed int32 products of the pieces are the whole batch's, so ∇W is
    bitwise the one-piece result; each piece's samples are placed for it alone (the
    whole placed input is never asked for)."""
    from lowbit.kernels import im2col as I, kernels_for

    g = torch.Generator().manual_seed(3)
    n, c, side, r = 13, 8, 7, 5  # pieces of 2 samples, the last of 1 (its own zero rows)
    x = torch.randint(-127, 128, (n, side + 2, side + 2, c), generator=g, dtype=torch.int8)
    x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1] = 0, 0, 0, 0  # placed: zero padding
    a = Encoded(torch.randint(-127, 128, (r, n * side * side), generator=g, dtype=torch.int8),
                torch.rand(r, 1, generator=g))
    k, calls = kernels_for("auto", "cpu"), []
    real = I._rows_acc
    monkeypatch.setattr(I, "_rows_acc", lambda *args: calls.append(args[1].shape[0]) or real(*args))
    placed: list[tuple[int, int]] = []
    pieces = I.grad_weight_rows(k, a, x.shape, lambda i, j: placed.append((i, j)) or x[i:j],
                                torch.full((1, 1), 0.5), (3, 3), (1, 1))
    assert len(calls) > 1 and sum(calls) == n and calls[-1] < calls[0]  # pieces of samples, every sample once
    assert [j - i for i, j in placed] == calls and placed[0][0] == 0 and placed[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(placed, placed[1:]))  # each placed once, in order
    monkeypatch.setattr(I, "ROWS_IN_PIECES", False)
    whole = I.grad_weight_rows(k, a, x.shape, lambda i, j: x[i:j], torch.full((1, 1), 0.5), (3, 3), (1, 1))
    exact = torch.tensor(0.5, dtype=torch.float64) * a.scale.double() * torch.einsum(  # every sum exact in float64
        "rnhw,nhwk->rk", a.codes.view(r, n, side, side).double(),
        patches(x, (3, 3), (1, 1), (1, 1)).reshape(n, side, side, -1).double())
    assert torch.equal(pieces, whole) and torch.allclose(pieces.double(), exact, rtol=1e-6, atol=0)


def test_conv_geometry_of_another_length_is_refused_not_run_as_another_convolution() -> None:
    """``padding=(0, 0, 2, 2)`` (F.pad's layout) slid into the dilation field and ran a
    dilated convolution where torch raises, through ``convert`` too (a review);
    ``stride=(2,)`` failed as "non-positive groups", ``stride=2.0`` inside oneDNN."""
    from lowbit.functional import fqt_conv2d

    cfg = FQTConfig.from_recipe("qat-8")
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    for kw in ({"padding": (0, 0, 2, 2)}, {"stride": 2.0}, {"dilation": (1, 1, 1)}, {"padding": -1}):
        with pytest.raises(RuntimeError, match="fqt_conv2d: expected"):
            fqt_conv2d(x, w, None, cfg, **kw)
    one = fqt_conv2d(x, w, None, cfg, stride=(2,), padding=(1,))  # one value for both, as torch
    assert torch.equal(one, fqt_conv2d(x, w, None, cfg, stride=2, padding=1))
    conv = nn.Conv2d(3, 4, 3, padding=(0, 0, 2, 2))
    with pytest.raises(RuntimeError):
        conv(x)  # torch refuses it at the forward
    lowbit.convert(conv, FQTConfig.from_recipe("fqt-psq-8", seed=0))
    with pytest.raises(RuntimeError, match="expected padding"):
        conv(x)
    with pytest.raises(RuntimeError, match="fqt_conv1d: expected stride"):
        lowbit.functional.fqt_conv1d(torch.randn(2, 3, 8), torch.randn(4, 3, 3), None, cfg, stride=(1, 1))


@pytest.mark.skipif(not qconv.available(torch.zeros(1, 8, 6, 6, dtype=torch.int8), (8, 8, 3, 3), 1, (6, 6),
                                        (1, 1), (1, 1), (1, 1)), reason="oneDNN's exact int8 convolution")
@pytest.mark.parametrize("stride", [1, 2])
def test_grad_input_codes_released_before_the_convolution(monkeypatch: pytest.MonkeyPatch, stride: int) -> None:
    """A layer's backward hands ∇X's codes over (``release``): they are emptied once
    oneDNN's unsigned operand is made, so neither the convolution nor the epilogue holds
    them (0.4 MB of ResNet-20's last layer at batch 128: the CNN step's peak,
    docs/benchmarks.md); ∇X is bitwise the held codes' result. Without ``release`` the
    caller's operand is left whole."""
    from lowbit.gradpair import quantize_grad_pair

    g = torch.Generator().manual_seed(5)
    x_shape, w_shape, params = (4, 8, 9, 9), (8, 8, 3, 3), [stride, stride, 1, 1, 1, 1, 1]
    qw = quantize_forward(torch.randn(8, 72, generator=g), OperandSpec(bits=8))
    h = (9 + 2 - 3) // stride + 1
    gy = torch.randn(4, 8, h, h, generator=g)
    seen: list[int] = []
    real = qconv.conv_acc
    runs = []
    for release in (False, True):
        qa, _ = quantize_grad_pair(gy.reshape(4, 8, -1), GradSpec(), torch.Generator().manual_seed(1), GradSpec(),
                                   torch.Generator().manual_seed(2), kernels_for("auto", "cpu"))
        monkeypatch.setattr(qconv, "conv_acc", lambda *a, q=qa, **kw: seen.append(q.codes.numel()) or real(*a, **kw))
        runs.append(conv_grad_input(gy, qw, GradSpec(), None, Backend.AUTO, x_shape, w_shape, params, qa=qa,
                                    release=release))
        assert (qa.codes.numel() == 0) == release
    # the convolution ran on oneDNN both times (once per piece of samples, conv.acc_pieces: 1 for float32); released before it
    pieces = C.acc_pieces(4, torch.float32, False)
    assert seen == [gy.numel()] * pieces + [0] * pieces
    assert torch.equal(runs[0], runs[1])


# -- block formats block along channels -----------------------------------------------------
BLOCK_FORMATS = [("mxfp8_e4m3", "mxfp8_e5m2"), ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4")]


def _channels_inner(t: torch.Tensor, spec: object) -> torch.Tensor:
    """``t`` (N, C, *spatial) quantized as (N, spatial·C) rows, dequantized, back in ``t``'s shape:
    the definition of a block-format convolution operand, written out."""
    rows = t.movedim(1, -1).reshape(t.shape[0], -1)
    q = quantize_forward(rows, spec) if isinstance(spec, OperandSpec) else quantize_gradient(rows, spec, None)
    return q.dequantize().reshape(t.shape[0], *t.shape[2:], t.shape[1]).movedim(-1, 1).contiguous()


@pytest.mark.parametrize("fwd, grad", BLOCK_FORMATS)
def test_block_formats_take_their_blocks_along_channels(fwd: str, grad: str) -> None:
    """A block format's (MXFP8, MXFP4, NVFP4) 32 (16) consecutive elements of a
    convolution's X, W and ∇X's ∇Y are channels at one position, the dimension the
    convolution sums over (an MX convolution kernel's blocks): forward and ∇X are the float
    convolutions of those operands, bit for bit, and an outlier at one position widens
    only that position's block — every other position of its channel keeps its codes."""
    cfg = FQTConfig(activation=OperandSpec(format=fwd), weight=OperandSpec(format=fwd),
                    grad_input=GradSpec(format=grad, rounding="nearest"),
                    grad_weight=GradSpec(format=grad, rounding="nearest"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 5, 5, generator=g, requires_grad=True)
    w = torch.randn(8, 64, 3, 3, generator=g, requires_grad=True)  # ∇X and ∇W both wanted: the pair's case
    bias = torch.randn(8, generator=g)
    y = fqt_conv2d(x, w, bias, block_state(cfg), 1, 1)
    xq, wq = _channels_inner(x.detach(), cfg.activation), _channels_inner(w.detach(), cfg.weight)
    assert torch.equal(y, F.conv2d(xq, wq, bias, 1, 1))
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    want = torch.nn.grad.conv2d_input(x.shape, wq, _channels_inner(gy, cfg.grad_input), 1, 1)
    assert torch.equal(x.grad, want)
    # ∇W's ∇Y: rows (C_out, N·H'·W'), blocked along the samples and positions it sums over
    gw_rows = quantize_gradient(gy.transpose(0, 1).reshape(8, -1), cfg.grad_weight, None).dequantize()
    want_w = torch.nn.grad.conv2d_weight(xq, w.shape, gw_rows.reshape(8, *gy.shape[0:1], *gy.shape[2:]).transpose(0, 1),
                                         1, 1)
    assert torch.equal(w.grad, want_w)
    # an outlier in channel 0 at (0, 0): only the block at that position changes
    x2 = x.detach().clone()
    x2[0, 0, 0, 0] = 1e4
    q1, q2 = (C.conv_values(C._conv2d_quantize_x(v, cfg, [1, 1, 1, 1, 1, 1, 1]), v.shape) for v in (x.detach(), x2))
    changed = (q1 != q2).any(1)  # (N, H, W): positions where some channel's value changed
    assert changed[0, 0, 0] and int(changed.sum()) == 1


@pytest.mark.parametrize("fwd, grad", BLOCK_FORMATS[:1])
def test_block_format_conv1d_and_the_monitors_operands_take_channels_inner(fwd: str, grad: str) -> None:
    """Conv1d (the conv2d block on a height-1 image) blocks along channels too, and the
    operands the variance monitor (:mod:`lowbit.layergrads`) and :mod:`lowbit.analysis`
    rebuild are those the layer quantized: ∇Y's rows (and their column weights) in the
    same (position, channel) order, X's values the layer's."""
    from lowbit.analysis._model import grad_input_operand, weight_gemm_input
    from lowbit.layergrads import conv2d_grads

    cfg = FQTConfig(activation=OperandSpec(format=fwd), weight=OperandSpec(format=fwd),
                    grad_input=GradSpec(format=grad), grad_weight=GradSpec(format=grad))
    g = torch.Generator().manual_seed(1)
    c1 = FQTConv1d.from_float(nn.Conv1d(64, 4, 3, padding=1), cfg)
    x1 = torch.randn(2, 64, 7, generator=g)
    want = F.conv1d(_channels_inner(x1, cfg.activation), _channels_inner(c1.weight.detach(), cfg.weight), c1.bias, 1, 1)
    assert torch.equal(c1(x1), want)
    u = weight_gemm_input(c1, x1)  # the ∇W GEMM's Q_f(X): im2col of the layer's values
    assert torch.equal(u, F.unfold(_channels_inner(x1, cfg.activation).unsqueeze(2), (1, 3), padding=(0, 1))
                       .transpose(1, 2).reshape(-1, 64 * 3))
    c2 = FQTConv2d.from_float(nn.Conv2d(64, 8, 3, padding=1), cfg)
    x2, gy = torch.randn(2, 64, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)
    rows = gy.movedim(1, -1).reshape(2, -1)  # (N, H·W·C_out)
    assert torch.equal(grad_input_operand(c2, gy), rows)
    got = conv2d_grads(c2, x2, gy, True, True, True).grad_input
    int_grad = FQTConfig(activation=cfg.activation, weight=cfg.weight, grad_input=GradSpec(), grad_weight=GradSpec())
    nchw = FQTConv2d.from_float(nn.Conv2d(64, 8, 3, padding=1), int_grad)
    nchw.load_state_dict(c2.state_dict(), strict=False)
    ref = conv2d_grads(nchw, x2, gy, True, True, True).grad_input  # the same Q_f(W), ∇Y's rows NCHW (int8)
    assert torch.equal(got.a, rows) and torch.equal(ref.a, gy.reshape(2, -1))
    perm = lambda v: v.reshape(8, 16).t().reshape(-1)  # noqa: E731 - (C_out, P) column order → (P, C_out)
    assert torch.equal(got.col_weight, perm(ref.col_weight)) and torch.equal(got.shift_weight, perm(ref.shift_weight))


@ONEDNN
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fqt-bhq-8"])
def test_grad_input_in_sample_pieces_is_bitwise_the_whole_batch(monkeypatch: pytest.MonkeyPatch, channels_last: bool,
                                                                dtype: torch.dtype, recipe: str) -> None:
    """∇X on oneDNN runs its samples in pieces (``conv.acc_pieces``: ``ACC_PIECES`` where
    the result is narrower than the float32 accumulator, bf16 here; one for a float32
    result): every gradient bitwise the one-piece run's, with
    a sample whose ∇Y is ~1e36 (its per-sample scale sends the epilogue to float64: the
    scales are made safe once, so every piece computes in the same dtype) and a batch
    that is no multiple of the piece count; the convolution never sees more than a
    piece's samples."""
    g = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(6, 6, 3, padding=1)
    x = torch.randn(7, 6, 9, 9, generator=g)
    gy = torch.randn(7, 6, 9, 9, generator=g)
    gy[3] *= 1e36
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    real, seen = qconv.conv_acc, []
    monkeypatch.setattr(qconv, "conv_acc", lambda *a, **k: seen.append(a[0].shape[0]) or real(*a, **k))

    def grads(pieces: bool) -> tuple[torch.Tensor, ...]:
        monkeypatch.setattr(C, "ACC_IN_PIECES", pieces)
        model = lowbit.convert(copy.deepcopy(conv), FQTConfig.from_recipe(recipe, seed=5)).to(memory_format=fmt)
        xs = x.to(dtype, copy=True).contiguous(memory_format=fmt).requires_grad_()  # a bf16 input: a bf16 ∇X
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = model(xs)
        y.backward(gy.to(y.dtype).to(memory_format=fmt))
        return xs.grad, model.weight.grad, model.bias.grad, torch.tensor(seen)

    *whole, calls_whole = grads(False)
    *parts, calls = grads(True)
    for a, b in zip(whole, parts):
        assert torch.equal(a, b)
    assert parts[0].isfinite().all() and parts[0][3].abs().max() > 1e30  # the float64 route ran
    epilogue_dtype = torch.float32 if recipe == "fqt-bhq-8" else dtype  # BHQ's T⁻¹ reads a float32 product
    pieces = C.acc_pieces(7, epilogue_dtype, channels_last and epilogue_dtype == torch.float32)
    # pieces where the result is narrower, or where the float32 engine copies the codes
    assert pieces == (C.ACC_PIECES if epilogue_dtype == torch.bfloat16 or qconv.float32_engine() else 1)
    assert C.ACC_PIECES > 1
    n_bwd = len(calls) - 1  # the forward's convolution: one call of all samples
    assert calls[0] == 7 and n_bwd == pieces and calls[1:].sum() == calls_whole[1:].sum()
    assert calls[1:].max() <= -(-calls_whole[1:].max() // pieces)


@ONEDNN
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_epilogue_pieces_share_one_epilogue_dtype(channels_last: bool) -> None:
    """``conv._conv_epilogue`` in pieces (forced to 3 here, float32 results, where a
    dtype change shows in the bits) against one piece: bitwise, with one sample's scale
    so large that the epilogue runs in float64 (``int8.safe_scales``) — decided once for
    the whole batch, not per piece (a piece without that sample would otherwise round its
    products in float32: 28% of such products differ in the last bit)."""
    g = torch.Generator().manual_seed(6)
    n, c, h = 7, 8, 6
    codes = torch.randint(-127, 128, (n, c, h, h), generator=g, dtype=torch.int8)
    xu = (codes.view(torch.uint8) ^ 128).contiguous(memory_format=torch.channels_last)
    w = torch.randint(-127, 128, (c, c, 3, 3), generator=g, dtype=torch.int8)
    sa = torch.rand(n, 1, generator=g) + 0.5
    sa[5] = 1e33  # past float32's safe range for K = 72 products (1e33·72·2¹⁴ > 3.4e38): float64 for the batch
    sb = torch.rand(1, 1, generator=g) * 1e-3  # the products themselves stay finite
    k = kernels_for("auto", "cpu")
    geometry = ((1, 1), (1, 1), (1, 1), 1)
    got = [C._conv_epilogue(k, [xu], w, geometry, sa, sb, None, torch.float32, 72, channels_last, pieces=p)
           for p in (1, 3)]
    assert torch.equal(got[0], got[1]) and got[0][5].abs().max() > 1e30 and got[0].isfinite().all()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_im2col_paths_in_sample_pieces_are_bitwise_the_whole_batch(monkeypatch: pytest.MonkeyPatch, stride: int,
                                                                   dtype: torch.dtype,
                                                                   layout: torch.memory_format) -> None:
    """A convolution oneDNN does not take (K = 120·9 > qconv.MAX_K: a wide layer) runs its
    output and ∇X GEMMs on im2col patches (∇X: gathered at stride 1, scattered at stride
    2), now in pieces of samples (``im2col.sample_pieces``: patches, or the scatter's
    float columns, at most the input's / ∇X's bytes): every gradient bitwise the
    whole-batch run's, with a sample ~1e36 large in the input and in ∇Y (the epilogue's
    float64 route, decided once for the batch), 7 samples (no multiple of the piece)."""
    from lowbit.kernels import im2col as I

    g = torch.Generator().manual_seed(9)
    conv = nn.Conv2d(120, 120, 3, stride=stride, padding=1)  # K = 1080 for Y and for ∇X
    x = torch.randn(7, 120, 6, 6, generator=g)
    x[2] *= 1e36
    gy = torch.randn(7, 120, (6 - 1) // stride + 1, (6 - 1) // stride + 1, generator=g)
    gy[4] *= 1e36
    calls: list[int] = []  # rows of each im2col GEMM (+: output, gathered ∇X), samples of each scatter (−)
    real, real_scatter = I.gemm_nchw, C.col2im
    monkeypatch.setattr(I, "gemm_nchw", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    monkeypatch.setattr(C, "col2im", lambda *a, **k: calls.append(-a[0].shape[0]) or real_scatter(*a, **k))
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=2, activation=OperandSpec(bits=8, granularity="row"))

    def grads(pieces: bool) -> tuple[torch.Tensor, ...]:
        monkeypatch.setattr(I, "IM2COL_IN_PIECES", pieces)
        model = lowbit.convert(copy.deepcopy(conv), cfg).to(memory_format=layout)
        xs = x.to(dtype, copy=True).contiguous(memory_format=layout).requires_grad_()
        calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = model(xs)
        y.backward(gy.to(y.dtype).contiguous(memory_format=layout))
        return y.detach(), xs.grad, model.weight.grad, model.bias.grad, torch.tensor(calls)

    *whole, calls_whole = grads(False)
    *parts, calls_parts = grads(True)
    for a, b in zip(whole, parts):
        assert a.dtype == b.dtype and torch.equal(a, b)
    # the output's and ∇X's GEMMs ran in pieces, every row once: im2col (+) for Y, and for ∇X
    # at stride 1 (gathered); ∇X scattered (−: samples per col2im) at stride 2
    w, p = calls_whole[calls_whole > 0], calls_parts[calls_parts > 0]
    assert len(w) == (2 if stride == 1 else 1) and len(p) > len(w) and p.sum() == w.sum()
    w, p = calls_whole[calls_whole < 0], calls_parts[calls_parts < 0]
    assert (len(p) > len(w) > 0 and p.sum() == w.sum()) if stride == 2 else len(w) == len(p) == 0


@pytest.mark.parametrize("pieces", [False, True])
def test_gathered_grad_input_writes_its_own_dtype_bitwise_the_float32_cast(monkeypatch: pytest.MonkeyPatch,
                                                                           pieces: bool) -> None:
    """Where no ``T⁻¹`` follows, the stride-1 im2col ∇X (``_grad_input_gather``, K > 1023)
    lets its epilogue write ∇X's bf16 (no float32 result and its cast): bitwise the
    float32 epilogue's values cast to bf16, per-sample scales, whole batch or pieces."""
    from lowbit.gradpair import quantize_grad_pair
    from lowbit.kernels import im2col as I

    monkeypatch.setattr(I, "IM2COL_IN_PIECES", pieces)
    g = torch.Generator().manual_seed(12)
    n, c, h = 5, 120, 5  # K = 120·9 = 1080 > qconv.MAX_K: the im2col path
    qw = quantize_forward(torch.randn(c, c * 9, generator=g), OperandSpec(bits=8))
    gy = torch.randn(n, c, h, h, generator=g) * torch.logspace(-3, 3, n).reshape(n, 1, 1, 1)
    qa, _ = quantize_grad_pair(gy.reshape(n, c, -1), GradSpec(), torch.Generator().manual_seed(1), GradSpec(),
                               torch.Generator().manual_seed(2), kernels_for("auto", "cpu"))
    shape = (n, c, h, h)
    got = C._grad_input_gather(qa, qw, shape, shape, (c, c, 3, 3), (1, 1), (1, 1), 1, Backend.AUTO, torch.bfloat16)
    want = C._grad_input_gather(qa, qw, shape, shape, (c, c, 3, 3), (1, 1), (1, 1), 1, Backend.AUTO, torch.float32)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))


def test_sample_pieces_only_on_the_cpu() -> None:
    """The im2col paths' pieces (``im2col.sample_pieces``) run on the CPU only: on CUDA a
    piece's GEMM could fall under ``_int_mm``'s shape rules (more than 16 rows) and run
    simulated, or raise under ``backend='int8'`` (a review); the whole batch there."""
    from lowbit.kernels import im2col as I

    assert I.sample_pieces(8, 10**6, 10**5, torch.device("cpu")) == 1
    assert I.sample_pieces(8, 10**6, 5 * 10**5, torch.device("cpu")) == 4
    assert I.sample_pieces(8, 10**6, 10**5, torch.device("cuda")) == 8
    assert I.sample_pieces(8, 10**6, 10**5, torch.device("meta")) == 8


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gemm_nchw_out_of_another_shape_or_dtype_is_refused(backend: str) -> None:
    """``im2col.gemm_nchw``'s ``out=`` (a piece of samples of a larger result) takes only
    the result's own shape and dtype, on the integer route and on the reference one (a
    copy would broadcast one sample over three, or cast, in silence: README fault kind 225)."""
    from lowbit.kernels import im2col as I

    a = torch.randint(-127, 128, (6, 10), dtype=torch.int8)  # 1 sample of 2 × 3 positions
    b = Encoded(torch.randint(-127, 128, (10, 4), dtype=torch.int8), torch.ones(1, 1))
    k = kernels_for(backend, "cpu")
    for out in (torch.empty(3, 4, 2, 3), torch.empty(1, 4, 2, 3, dtype=torch.bfloat16)):
        with pytest.raises(ValueError, match="epilogue out"):
            I.gemm_nchw(k, a, torch.ones(1, 1), b, (2, 3), None, torch.float32, out)
    out = torch.empty(1, 4, 2, 3)
    assert I.gemm_nchw(k, a, torch.ones(1, 1), b, (2, 3), None, torch.float32, out) is out


@pytest.mark.parametrize("weight_gran", ["tensor", "row"])
def test_scatter_pieces_make_scales_safe_only_for_the_integer_gemm(monkeypatch: pytest.MonkeyPatch,
                                                                   weight_gran: str) -> None:
    """The scattered ∇X (stride 2, 1×1) makes its epilogue's scales safe once for all
    pieces only where its GEMM runs on the integer kernel (a per-tensor weight scale): a
    per-output-channel weight scale lies on the summed dimension, the GEMM runs simulated
    and dequantizes with the scales as they come — float64 scales there gave other bits
    than the code before pieces (a review) — so it keeps them, and the whole batch."""
    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 1, stride=2)
    x = torch.randn(9, 8, 8, 8, generator=g)
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=1, weight=OperandSpec(bits=8, granularity=weight_gran))
    model = lowbit.convert(conv, cfg)
    seen: list[tuple[int, torch.dtype]] = []
    inside = [False]
    real, real_scatter = C.exact_gemm, C._grad_input_scatter

    def scatter(*a: object) -> torch.Tensor:
        inside[0] = True
        try:
            return real_scatter(*a)
        finally:
            inside[0] = False
    monkeypatch.setattr(C, "_grad_input_scatter", scatter)
    monkeypatch.setattr(C, "exact_gemm", lambda k, a, b, *r: (inside[0] and seen.append((a.codes.shape[0],
                                                                                          a.scale.dtype)))
                        or real(k, a, b, *r))
    monkeypatch.setattr(C, "sample_pieces", lambda n, *a: 4)  # pieces of 4 samples (the rule's own sizes aside)
    xs = x.requires_grad_()
    y = model(xs)
    gy = torch.randn(y.shape, generator=g)
    gy[4] *= 1e36  # a per-sample scale past float32's safe range
    y.backward(gy)
    if weight_gran == "tensor":  # integer GEMMs in pieces, the scales float64 for each
        assert [r for r, _ in seen] == [4 * 16, 4 * 16, 16] and {d for _, d in seen} == {torch.float64}
    else:  # simulated: one GEMM of the whole batch, its scales as they came
        assert seen == [(9 * 16, torch.float32)]
    assert xs.grad.isfinite().all()
