"""oneDNN's int8 convolution as an exact integer sum: ``acc = Σ x̂·ŵ`` of int8 codes.

A convolution of int8 codes (``lowbit.conv``'s output GEMM, and ∇X at stride 1) runs
directly on oneDNN's int8 convolution (``torch.ops.onednn.qconv2d_pointwise``) instead of
im2col + ``torch._int_mm``: no (N·H'·W', K) patch matrix is written and read back. The
op wants unsigned activations, so the codes enter as ``u8 = code + 128`` with zero point
128 (oneDNN subtracts ``128·Σw`` in its int32 accumulator: exact); activation and weight
scales are 1, so its float32 output is ``float(acc)`` — exact while ``|acc| < 2²⁴``,
guaranteed by ``K·128² < 2²⁴`` (``K = C/groups·kH·kW ≤`` :data:`MAX_K`). The caller then
applies the same epilogue (``acc·s_a·s_b + b``) as after ``_int_mm``, whose first step,
``acc.to(float32)``, gives the same float: the result is bitwise the im2col path's.

Where oneDNN's int8 kernels are not exact (without VNNI/AMX, ``vpmaddubsw`` saturates
pairs of u8·s8 products at 2¹⁵ and weights are pre-scaled), :func:`available` is false:
it requires a CPU with VNNI and, once per process, a probe of worst-case codes (every
activation 127 against weights all 127, all −127 and alternating) equal to the exact
float64 convolution. :func:`lowbit.flops` counts the op (``onednn.qconv2d_pointwise``).

Where lowbit's int8 GEMMs take the float32 route instead (a CPU without an int8 dot
product: ``lowbit.kernels.exact_f32.runs``), the same sums come from oneDNN's float32
convolution of the codes (``lowbit::int8_conv_f32``: exact, as every partial sum of at most
:data:`MAX_K` products is an integer below 2²⁴), under the same conditions and with the
same worst-case probe, once per process: :func:`conv_acc` returns the same float32
``float(acc)`` either way, so every result after it is the same bits. On the AMD EPYC
without AVX-512 it replaced im2col and float32 GEMMs of pieces (docs/benchmarks.md, "The
float32 route's convolutions").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from .. import grid_notes
from . import exact_f32

MAX_K = (2**24 - 1) // (128 * 128)  # 1023: float32 holds every int32 sum of ≤ this many terms
# Whether the weight prepack is told the input's shape. Off: oneDNN packs for its default
# blocked format, 2.7× cheaper for a 64-channel 3×3 weight (86 against 236 µs, Intel Xeon,
# 2 threads): prepack + convolution −12.6% at ResNet-20's 64-channel layers, within ±4% at
# the others (docs/benchmarks.md "The per-layer fixed cost"); the same exact sums either
# way. A switch for benchmarks/bench_toggle.py.
PREPACK_INPUT_SHAPE = False
# Whether convolutions of codes run as float32 convolutions where the float32 route runs
# (module docstring); off: im2col and the route's GEMMs. A switch for bench_toggle.py (f32-conv).
FLOAT32_CONV = True


def float32_engine(device: torch.device | str = "cpu") -> bool:
    """Whether :func:`conv_acc` runs on oneDNN's float32 convolution here: the float32
    route runs (``exact_f32.runs``), oneDNN's float32 convolutions are IEEE float32
    (``exact_f32.float32_convs_exact``), :data:`FLOAT32_CONV`, and the worst-case probe
    passed (once per process)."""
    return (FLOAT32_CONV and exact_f32.runs(device) and exact_f32.float32_convs_exact()
            and _float32_exact_here())


def _op_exists() -> bool:
    onednn = getattr(torch.ops, "onednn", None)
    return onednn is not None and hasattr(onednn, "qconv2d_pointwise") and hasattr(onednn, "qconv_prepack")


def prepack(w_codes: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
            groups: int, x_shape: Sequence[int] | None = None) -> torch.Tensor:
    """oneDNN's packed form of int8 weight codes ``w_codes`` (C_out, C/groups, kH, kW)
    for :func:`conv_acc` under this geometry: one weight scale (1, the codes themselves)
    and the activation zero point 128. ``x_shape``: told to the prepack only where
    :data:`PREPACK_INPUT_SHAPE` is on. Made once, it serves every piece of a batch. On the
    float32 engine (:func:`float32_engine`) the codes themselves (nothing to pack)."""
    if float32_engine(w_codes.device):
        return w_codes
    # one weight scale for the tensor (1: the codes themselves): a per-channel vector made
    # the prepack read every channel's scale as a tensor element (1,312 select/item ops per
    # cnn step); the same float(acc) either way
    packed = torch.ops.onednn.qconv_prepack(w_codes.contiguous(), torch.ones(1), 1.0, 128, list(stride),
                                            list(padding), list(dilation), groups,
                                            list(x_shape) if PREPACK_INPUT_SHAPE and x_shape is not None else None)
    grid_notes.derived(packed, w_codes)  # the prepack is not seen by a coverage trace
    return packed


def conv_acc(x_codes: torch.Tensor, w_codes: torch.Tensor, stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int], groups: int,
             packed: torch.Tensor | None = None) -> torch.Tensor:
    """``conv2d(x̂, ŵ)`` of int8 codes as float32 ``float(acc)``, exact: ``x_codes``
    (N, C, H, W) int8, or uint8 taken to hold ``code + 128`` (channels-last memory is
    what oneDNN reads without a copy — the ``int8_place_nhwc`` kernel writes it, see
    ``lowbit.conv``; other layouts are copied), ``w_codes`` (C_out, C/groups, kH, kW) int8, codes in
    [−127, 127] (or −128), or ``packed`` (:func:`prepack` of them under this geometry)
    → (N, C_out, H', W') float32, channels-last memory."""
    if float32_engine(x_codes.device):  # ``packed`` is the codes themselves there (prepack)
        return exact_f32.int_conv(x_codes, w_codes, stride, padding, dilation, groups)
    return _onednn_acc(x_codes, w_codes, stride, padding, dilation, groups, packed)


def _onednn_acc(x_codes: torch.Tensor, w_codes: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int, packed: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`conv_acc` on oneDNN's int8 convolution (what the probes test, called by them
    directly: the layer's own calls are what a caller wrapping ``conv_acc`` sees)."""
    ones, zero = torch.ones(1), torch.zeros(1, dtype=torch.int64)
    # code + 128, in x_codes' memory format
    xu = x_codes if x_codes.dtype == torch.uint8 else x_codes.view(torch.uint8) ^ 128
    geometry = (list(stride), list(padding), list(dilation), groups)
    if packed is None:
        packed = prepack(w_codes, *geometry, x_codes.shape)
    return torch.ops.onednn.qconv2d_pointwise(xu, 1.0, 128, packed, ones, zero, None, *geometry,
                                              1.0, 0, torch.float32, "none", [], "")


@functools.cache
def _exact_here() -> bool:
    """The probe of the module docstring (once per process), hidden from dispatch modes
    (a :mod:`lowbit.coverage` trace of the first step must not count its convolutions)."""
    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    if not _op_exists() or vnni is None or not vnni():
        return False
    from .cbuild import plain_torch

    with plain_torch(), torch.no_grad():
        return _probe()


@functools.cache
def _float32_exact_here() -> bool:
    """:func:`_probe` of the float32 engine (once per process), hidden from dispatch modes."""
    from .cbuild import plain_torch

    with plain_torch(), torch.no_grad():
        return _probe(exact_f32.int_conv)


def _probe(conv: Any = None) -> bool:
    """Worst-case codes (activations all 127 against weights all 127, all −127 and
    alternating; sums of 576 products) through ``conv`` (default: oneDNN's int8
    convolution, :func:`conv_acc`) equal to the exact float64 convolution."""
    conv = conv_acc if conv is None else conv
    try:
        x = torch.full((2, 64, 5, 5), 127, dtype=torch.int8)
        for value in (127, -127, None):
            w = torch.full((8, 64, 3, 3), 127 if value is None else value, dtype=torch.int8)
            if value is None:
                w[:, 1::2] = -127
            got = conv(x, w, (1, 1), (1, 1), (1, 1), 1)
            want = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
            if not torch.equal(got.double(), want):
                return False
        return True
    except RuntimeError:  # a build whose oneDNN op refuses these arguments
        return False


def geometry_ok(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether oneDNN's int8 convolution computes every output of an input of spatial
    ``size`` (H, W) under this geometry: no dilation, ``padding ≤ kernel − 1`` in each
    dimension (so no output reads padding alone) and an output at least 2 wide. Outside
    these, torch 2.13's ``qconv2d_pointwise`` gave wrong sums (outputs left unwritten,
    different on a second call) or crashed the process: of 5,000 random small shapes with
    dilation 1 and ``padding ≤ kernel − 1``, every wrong result had an output width of 1;
    with larger padding or with dilation, wrong sums and segmentation faults at output
    widths above 1 too (``tests/core/test_conv.py::test_onednn_route_only_where_exact``)."""
    out_w = (size[1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return (all(d == 1 for d in dilation) and all(0 <= p <= k - 1 for p, k in zip(padding, kernel))
            and out_w >= 2)


def geometry_exact(groups: int, w_shape: tuple[int, ...], size: tuple[int, int], stride: tuple[int, ...],
                  padding: tuple[int, ...], batch: int = 1) -> bool:
    """Whether oneDNN's int8 convolution gives the exact sums for this geometry, grouped
    or not (``w_shape`` (C_out, C/groups, kH, kW)), on a batch of ``batch`` inputs of
    spatial ``size``, probed once per process: random codes of that batch and size against
    the exact float32 convolution.
    torch 2.13's ``qconv2d_pointwise`` got grouped convolutions wrong — the same wrong
    sums on every call — for groups of 31 or more output channels with 1, 2, 3, 5–7, 9,
    10, 13, 17, 24, 28 or 31 input channels (a review: ``Conv2d(48, 96, 3, groups=2)``'s
    output 3.3× off, ``Conv2d(192, 96, 3, stride=2, groups=4)``'s ∇X by 5e5), which the
    one probe of ungrouped codes did not see; and whether a geometry is right depends on
    the spatial size, not monotonically (a second review: ``(24, 32, groups=2)`` wrong at
    some sizes from 12 to 30 and right between), so the probe runs at the layer's own size,
    and with the thread count in use (wrong at 28×28 with one thread and not with two, on
    the Intel Xeon): once per geometry, input size and thread count, costing about two
    single-sample convolutions of the layer (int8 and an exact float32 one; one thread,
    Intel Xeon: 9 ms for 64 channels at 56², 49 ms for 128 at 112², 0.43 s for 256 at
    224²; a model whose input size changes every batch pays it for each new size). A
    third review (a new user's trial of convolution shapes) found both faults this probe
    had assumed away: an ungrouped ``Conv2d(4, 1, (2, 1), padding=(1, 0))`` on 14 × 16
    inputs wrong (32% of the output), which the one probe of :func:`_exact_here` had
    passed, and ``Conv2d(51, 51, 3, stride=(1, 3), groups=3)`` on 27 × 27 inputs exact for
    one sample and wrong from two on (on two threads): so every geometry is probed, at the
    call's own batch (a probe per batch size too: twice a layer's convolution, once; the
    benchmark CNN's first `fqt-psq-8` step, batch 128: 8 probes, 137 ms of 575, Intel Xeon, 2 threads).
    Hidden from dispatch modes, as :func:`_exact_here`."""
    return _probe_geometry(groups, tuple(w_shape), (max(int(batch), 1), *size), tuple(stride), tuple(padding),
                          torch.get_num_threads())


@functools.lru_cache(maxsize=4096)
def _probe_geometry(groups: int, w_shape: tuple[int, ...], shape: tuple[int, ...], stride: tuple[int, ...],
                   padding: tuple[int, ...], threads: int) -> bool:
    """:func:`geometry_exact`'s probe, cached per geometry, input shape ``(batch, H, W)``
    and thread count."""
    from .cbuild import plain_torch

    co, cg = w_shape[0], w_shape[1]
    g = torch.Generator().manual_seed(co * 7919 + cg)
    with plain_torch(), torch.no_grad():
        try:
            x = torch.randint(-127, 128, (shape[0], cg * groups, *shape[1:]), dtype=torch.int8, generator=g)
            w = torch.randint(-127, 128, tuple(w_shape), dtype=torch.int8, generator=g)
            got = _onednn_acc(x, w, stride, padding, (1, 1), groups)
        except RuntimeError:  # a geometry this build's op refuses
            return False
        # float32 is exact here: every partial sum of K = C/groups·kH·kW ≤ MAX_K products
        # of codes stays below 2²⁴ (MAX_K's definition), in any order — and float32's
        # convolution is several times cheaper than float64's at a layer's full size
        want = torch.nn.functional.conv2d(x.float(), w.float(), None, stride, padding, 1, groups)
        return bool(torch.equal(got, want))


def available(x_codes: torch.Tensor, w_shape: Sequence[int], groups: int, size: Sequence[int],
              stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> bool:
    """Whether :func:`conv_acc` is exact for these operands: int8 codes on the CPU,
    ``K = C/groups·kH·kW ≤ MAX_K``, a geometry oneDNN computes (:func:`geometry_ok`; ``size``
    the input's spatial (H, W)), and either the float32 engine runs (:func:`float32_engine`)
    or this machine's oneDNN passes the int8 probe and the geometry's own probe at this
    batch (:func:`geometry_exact`; ``x_codes``' first dimension is the batch: the faults are
    the int8 op's)."""
    k = w_shape[1] * w_shape[2] * w_shape[3]
    if not (x_codes.device.type == "cpu" and x_codes.dtype == torch.int8 and 0 < k <= MAX_K
            and x_codes.numel() > 0 and geometry_ok(size, w_shape[2:], stride, padding, dilation)):
        return False
    if float32_engine(x_codes.device):
        return True
    batch = x_codes.shape[0] if x_codes.dim() > 1 else 1
    return _exact_here() and geometry_exact(groups, tuple(w_shape), tuple(size), tuple(stride), tuple(padding),
                                           batch)


__all__ = ["FLOAT32_CONV", "MAX_K", "available", "conv_acc", "float32_engine", "geometry_ok", "geometry_exact",
           "prepack"]
