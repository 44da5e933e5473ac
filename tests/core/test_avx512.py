"""lowbit.kernels.avx512: the AVX-512 integer quantizer gives bitwise the reference
quantizer's codes and steps (every symmetric integer width, per row and per tensor,
stochastic and nearest, tails, row-strided views, all-zero and non-finite groups, any
thread count), for one operand and for both quantizations of an output gradient; the
dispatcher sends it exactly the calls it supports; a training step is bitwise the same
with and without it; where it cannot be built or is switched off, lowbit falls back to
the compiled quantizer with a warning. The kernel tests need a CPU with AVX-512 and a C
compiler (skipped elsewhere; the fallback tests run everywhere)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import num_threads
from torch import nn

import lowbit
from lowbit.formats import Granularity, Rounding, parse_format
from lowbit.gradpair import quantize_batched_pair as reference_batched_pair
from lowbit.gradpair import quantize_conv_pair as reference_conv_pair
from lowbit.gradpair import quantize_pair as reference_pair
from lowbit.kernels import Backend, avx512, cbuild, im2col, kernels_for, qconv, reference

# Skipped only where the kernel is not meant to run, never because its self-test failed
# (test_kernel_builds_and_passes_its_self_test fails then).
# (its AVX-512 build, or the same source on AVX2 through avx512_on_avx2.h: avx512.build_flags)
WANTED = avx512.build_flags() is not None and os.environ.get("LOWBIT_AVX512", "1") != "0" \
    and cbuild.compiler(lambda why, then: None) is not None
needs_avx512 = pytest.mark.skipif(not WANTED, reason="needs a CPU with AVX-512 F/BW/DQ/VL or AVX2/F16C, "
                                  "and a C compiler")

FORMATS = [parse_format(f"int{b}") for b in (2, 3, 4, 5, 8)]
SHAPES = [(1, 1), (1, 17), (17, 1), (16, 16), (33, 70), (300, 513), (257, 31)]


def _same(got: tuple, want: tuple) -> bool:
    """Codes equal; steps equal, NaN only where the other has NaN and ±Inf only equal to
    itself (the kernel's own check, ``avx512._same``); offsets and block scales both None."""
    for g, w in zip(got, want, strict=True):
        if g is None or w is None:
            if not (g is None and w is None):
                return False
        elif g.dtype != w.dtype:
            return False
        elif g.dtype.is_floating_point and g.element_size() == 1:  # FP8 codes: bytes, NaN's sign aside
            nan = g.float().isnan()
            if not (torch.equal(nan, w.float().isnan()) and torch.equal(g.view(torch.uint8)[~nan],
                                                                        w.view(torch.uint8)[~nan])):
                return False
        elif not avx512._same(g, w):
            return False
    return True


def _operand(shape: tuple[int, int], g: torch.Generator) -> torch.Tensor:
    """Values over many binades per column, so rows and columns get different steps."""
    return torch.randn(shape, generator=g) * torch.logspace(-4, 4, shape[1]) \
        * torch.logspace(2, -2, shape[0]).unsqueeze(1)


def _entries_operand(e: int, n: int, d: int) -> tuple[torch.Tensor, torch.Generator]:
    """A batch of ``e`` entries of ``n`` rows (``_operand``'s values, clamped to bfloat16's
    range) with a NaN first and −Inf last, the second entry of its own scale where ``e`` >
    2 (each entry's column ranges are its own), and the generator that made it."""
    g = torch.Generator().manual_seed(e * 131 + n * 7 + d)
    x = _operand((e * n, d), g).clamp(-6e4, 6e4)
    x[0, 0] = float("nan")
    x[-1, -1] = float("-inf")
    if e > 2:
        x[n:2 * n] *= 1e-3
    return x, g


@needs_avx512
def test_kernel_builds_and_passes_its_self_test() -> None:
    assert avx512.available()


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# every width in float32; bfloat16 and float16 (the same arithmetic after an exact
# conversion) at 4 and 8 bits
FORMAT_DTYPES = [(f, torch.float32) for f in FORMATS] + [
    (FORMATS[i], dt) for dt in (torch.bfloat16, torch.float16) for i in (2, 4)]


@needs_avx512
@pytest.mark.parametrize("transposed", [False, True], ids=["rows", "transposed"])
@pytest.mark.parametrize("fmt,dtype", FORMAT_DTYPES, ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_bitwise_the_reference(fmt, shape: tuple[int, int], dtype: torch.dtype,  # noqa: ANN001
                                        transposed: bool) -> None:
    """Every width, shape, granularity, rounding and thread count; bfloat16 and float16
    operands too (read as float32, exactly, as the reference does); row-major operands
    and transposed views (column-major: ∇Yᵀ of the ∇W path), codes row-major for both."""
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    x = _operand(shape, g).clamp(-6e4, 6e4).to(dtype)
    if transposed:
        x = x.t().contiguous().t()
        assert x.shape == shape and (x.stride(0) == 1 or shape[0] == 1)
    for gran in (Granularity.ROW, Granularity.TENSOR):
        for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
            seed = torch.randint(0, 2**32, (), generator=g)
            assert avx512.supports(x, fmt, gran, rnd, seed)
            want = reference.quantize(x, fmt, gran, rnd, seed)
            for threads in (1, 2, 3):
                with num_threads(threads):
                    got = avx512.quantize(x, fmt, gran, rnd, seed)
                assert _same(got, want), (gran, rnd, threads)
                assert got[0].is_contiguous()


@needs_avx512
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", [FORMATS[2], FORMATS[4]], ids=lambda f: f.name)
@pytest.mark.parametrize("shape", SHAPES + [(600, 1100)])
def test_pair_bitwise_the_reference(fmt, shape: tuple[int, int], dtype: torch.dtype) -> None:  # noqa: ANN001
    """Both quantizations of ∇Y (N, out): the row codes and the codes of ∇Yᵀ (written
    row-major), with the paths' settings mixed (row/tensor, stochastic/nearest, another
    width on the ∇W path); more than one 256 × 256 tile and tails in both dimensions;
    float32, bfloat16 and float16 gradients."""
    g = torch.Generator().manual_seed(7 + shape[0])
    x = _operand(shape, g).clamp(-6e4, 6e4).to(dtype)
    combos = [(Granularity.ROW, Rounding.STOCHASTIC, Granularity.ROW, Rounding.STOCHASTIC, fmt),
              (Granularity.TENSOR, Rounding.STOCHASTIC, Granularity.ROW, Rounding.NEAREST, FORMATS[0]),
              (Granularity.ROW, Rounding.NEAREST, Granularity.TENSOR, Rounding.STOCHASTIC, fmt)]
    for gran_a, rnd_a, gran_w, rnd_w, fmt_w in combos:
        seed_a, seed_w = torch.randint(0, 2**32, (2,), generator=g).unbind()
        args = (x, fmt, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w)
        assert avx512.supports_pair(*args)
        want = reference_pair(*args)
        for threads in (1, 2, 3):
            with num_threads(threads):
                got = avx512.quantize_pair(*args)
            assert _same(got, want), (gran_a, rnd_a, gran_w, rnd_w, threads)
            assert got[4].is_contiguous()  # ∇Yᵀ's codes row-major: the AMX GEMM reads them as they are


@needs_avx512
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5), (17, 33), (300, 513)])
def test_bhq_forward_quantize_bitwise_the_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """BHQ's fused transform and quantizer (``T x = x·s − 2v·dots[group]``, never
    written) against ``bhq._forward_quantize``: random groups, scales and Householder
    entries, a zero, a NaN and an infinite row; per row and per tensor, both roundings,
    int4 and int8, 1–3 threads."""
    from lowbit.quantizers.bhq import _forward_quantize

    g = torch.Generator().manual_seed(shape[0])
    n, d = shape
    x = _operand(shape, g).clamp(-6e4, 6e4).to(dtype)
    groups = max(1, n // 3)
    group = torch.randint(0, groups, (n,), generator=g)
    scale, v = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.3
    dots = torch.randn(groups, d, generator=g) * 10
    if n >= 4:  # an all-zero row of T x (divisor 1), a NaN one and an infinite one (its step NaN)
        x[0], v[0] = 0, 0
        x[1, d // 2] = float("nan")
        x[3, 0] = float("inf")
    for fmt in (FORMATS[2], FORMATS[4]):
        for gran in (Granularity.ROW, Granularity.TENSOR):
            for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
                seed = torch.randint(0, 2**32, (), generator=g)
                args = (x, dots, scale, v, group, fmt, gran, rnd, seed)
                assert avx512.supports_bhq(*args)
                want = _forward_quantize(*args)
                for threads in (1, 3):
                    with num_threads(threads):
                        assert _same(avx512.bhq_forward_quantize(*args), want), (fmt.name, gran, rnd)


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (513, 1000)])
def test_dequantize_kernels_bitwise_the_reference(shape: tuple[int, int]) -> None:
    # Encoded.dequantize's and attention's dequantization on the C kernel (the last compiled
    # kernels of BHQ's attention): the reference's values, bit for bit, NaN scales included,
    # and attention's in the codes' own memory layout (a transposed view stays transposed)
    from lowbit.attention import _dequantize as attention_reference
    from lowbit.kernels.encoded import dequantize as reference_dequantize
    g = torch.Generator().manual_seed(sum(shape))
    codes = torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
    for scale in (torch.rand(shape[0], 1, generator=g) * 1e-3, torch.rand(1, 1, generator=g)):
        scale[-1, 0] = float("nan")
        args = (codes, scale, None, None, 0, 1, torch.float32)
        assert avx512.supports_dequantize(*args)
        got, want = avx512.run_dequantize(*args), reference_dequantize(*args)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    batch = codes.reshape(1, *shape).expand(2, *shape).contiguous()
    step = torch.rand(1, 1, 1, generator=g)
    for c in (batch, batch.mT):
        assert avx512.supports_attention_dequantize(c, step)
        got, want = avx512.run_attention_dequantize(c, step), attention_reference(c, step)
        assert got.stride() == want.stride() and torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert not avx512.supports_attention_dequantize(batch[:, :1], step) or shape[0] == 1  # not dense
    assert not avx512.supports_dequantize(codes, scale.double(), None, None, 0, 1, torch.float32)


@needs_avx512
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5), (3, 17), (64, 16), (100, 33), (300, 513), (256, 1024)])
def test_hadamard_kernels_bitwise_the_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """The Hadamard quantizer on the AVX-512 kernels (the butterflies fused with the
    quantizer, and the inverse) against the same calls on the reference kernels: codes,
    steps and inverse bitwise equal — padded rows (100, 3 rows), blocks of 1 to 64 rows,
    row-strided views, int8 and int4, stochastic and nearest, NaN rows — and both
    kernels run (the dispatcher does not fall back)."""
    from lowbit.quantizers import hadamard as had

    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    full = _operand((shape[0], shape[1] + 3), g)
    full[min(2, shape[0] - 1), 1] = float("nan")
    x = full[:, 2:2 + shape[1]].to(dtype)  # a row-strided view
    ran = {"quantize": 0, "inverse": 0}
    real_q, real_i = avx512.hadamard_forward_quantize, avx512.hadamard_inverse

    def count(name, fn):  # noqa: ANN001, ANN202
        def wrapped(*a):  # noqa: ANN002, ANN202
            ran[name] += 1
            return fn(*a)
        return wrapped
    avx512.hadamard_forward_quantize = count("quantize", real_q)
    avx512.hadamard_inverse = count("inverse", real_i)
    try:
        for fmt in (FORMATS[2], FORMATS[4]):
            for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
                q = had.Hadamard()
                want = q.quantize(x, fmt, torch.Generator().manual_seed(3), rnd, Backend.REFERENCE)
                got = q.quantize(x, fmt, torch.Generator().manual_seed(3), rnd, Backend.AUTO)
                assert torch.equal(got.codes, want.codes) and avx512._same(got.scale, want.scale)
                y = torch.randn(got.codes.shape[0], 40, generator=g)
                assert avx512._same(got.inverse(y), want.inverse(y))
    finally:
        avx512.hadamard_forward_quantize, avx512.hadamard_inverse = real_q, real_i
    assert ran == {"quantize": 4, "inverse": 4}


@needs_avx512
@pytest.mark.parametrize("block", [1, 2, 4, 8, 16, 32, 64, 128, 256])
def test_hadamard_kernels_bitwise_the_reference_on_every_block_size(block: int) -> None:
    """The butterflies as the kernels group them (the first three stages per eight rows as
    they are read, the rest three, two or one at a time per tile) give bitwise the
    reference's stage-by-stage values on every block size the kernels take: the codes and
    steps of ``T x`` (padded rows, a NaN) and the inverse, into a new tensor or over its
    operand."""
    from lowbit.quantizers import hadamard as had

    g = torch.Generator().manual_seed(block)
    x = _operand((2 * block + 3, 37), g)
    x[1, 1] = float("nan")
    q = had.Hadamard(block)
    want = q.quantize(x, "int8", torch.Generator().manual_seed(3), backend=Backend.REFERENCE)
    got = q.quantize(x, "int8", torch.Generator().manual_seed(3), backend=Backend.AUTO)
    assert torch.equal(got.codes, want.codes) and avx512._same(got.scale, want.scale)
    y = torch.randn(got.codes.shape[0], 40, generator=g)
    assert avx512._same(got.inverse(y), want.inverse(y))
    mine = torch.cat([y, y], 1)[:, :40]  # y's values on strided rows, written over
    assert avx512._same(got.inverse(mine, overwrite=True), want.inverse(y))


@needs_avx512
@pytest.mark.parametrize("case", ["tiny-chunk", "nan-and-huge", "huge"])
def test_hadamard_inverse_on_wide_rows_decides_wide_per_block(case: str) -> None:
    """Rows past the inverse's 1024-column chunks: a block is wide (the float64
    reference's) by its whole rows' largest magnitude, not a chunk's — a chunk of values
    ≈ 1e-20 in a block of O(1) ones, or a huge value beside a NaN (a block with a NaN is
    not wide), stays on the kernel, into a new tensor and over its operand, bitwise the
    reference (a review: in place, the kernel wrote the chunks and then handed the
    transformed operand to the reference); a wide block leaves the operand untouched."""
    from lowbit.quantizers import hadamard as had

    g = torch.Generator().manual_seed(4)
    y = torch.randn(64, 1100, generator=g)
    if case == "tiny-chunk":
        y[:, 1024:] = 1e-20
    else:
        y[1, 1050] = 2.0**101
        if case == "nan-and-huge":
            y[0, 0] = float("nan")
    signs = (torch.randint(0, 2, (64,), generator=g) * 2 - 1).float()
    c = float(had._c(64, torch.float32, y.device))
    want = had._inverse(y, signs, 64, 64, torch.float32)
    for overwrite in (False, True):
        mine = y.clone()
        version = mine._version
        got = avx512.hadamard_inverse(mine, signs, 64, c, had.WIDE, 64, overwrite)
        if case == "huge":
            assert got is None and torch.equal(mine, y) and mine._version == version  # the reference reads it as it was
        else:
            assert got is not None and avx512._same(got, want)
            # written over through its pointer: autograd's in-place check sees it (README rows 225, 229)
            assert (mine._version > version) == overwrite
        assert avx512._same(had._native_inverse(y.clone(), signs, 64, 64, torch.float32, overwrite), want)


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (3, 5, 7, 3), (2, 16, 4, 4), (4, 17, 5, 9), (2, 40, 33, 1),
                                   (5, 100, 3, 11), (16, 16, 28, 28)])
def test_cl_rows_bitwise_the_reshape(shape: tuple[int, ...]) -> None:
    """A channels-last ∇Y's NCHW rows from the AVX-512 transpose (16 × 16 tiles: channel
    and position tails, one sample, one position) equal torch's copy, and
    ``conv_rows`` takes them from it; 3-D operands with channels innermost too, 1–3
    threads; what it cannot take (NCHW memory, other dtypes, sample gaps that overlap) is
    refused."""
    from lowbit.conv import conv_rows
    from lowbit.config import GradSpec

    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(shape[0], shape[2] * shape[3], shape[1], generator=g).movedim(-1, 1)
    for t in (x, x3):
        for threads in (1, 3):
            with num_threads(threads):
                assert avx512.supports_cl_rows(t)
                got = avx512.cl_rows(t)
                assert got.is_contiguous() and torch.equal(got, t.reshape(shape[0], -1))
    ran = []
    real = avx512.cl_rows
    avx512.cl_rows = lambda t: ran.append(1) or real(t)
    try:
        assert torch.equal(conv_rows(x, GradSpec()), x.reshape(shape[0], -1))
    finally:
        avx512.cl_rows = real
    assert ran == ([] if x.is_contiguous() else [1])  # (C = 1 or one position: a view, no copy)
    assert not avx512.supports_cl_rows(x.double()) and not avx512.supports_cl_rows(x.bfloat16())
    if shape[1] > 1 and shape[2] * shape[3] > 1:
        assert not avx512.supports_cl_rows(torch.randn(shape).transpose(2, 3))  # NCHW memory, transposed
    if shape[0] > 1:
        assert not avx512.supports_cl_rows(x[:1].expand(shape))  # every sample the same memory


@needs_avx512
@pytest.mark.parametrize("shape", [(70, 2100), (128, 3000)])
def test_hadamard_kernels_on_wide_rows_bitwise_the_reference(shape: tuple[int, int]) -> None:
    """Rows wider than the inverse's column chunk (``HAD_CHUNK`` = 1024: it runs in tasks
    of a block's rows times 1024 columns, the last one shorter; the quantizer and the
    forward transform take whole rows): the codes and steps of ``T x``, ``T x`` itself and
    the inverse — into a new tensor, over its operand, and over strided rows — bitwise
    the reference's."""
    from lowbit.quantizers import hadamard as had

    g = torch.Generator().manual_seed(shape[1])
    x = _operand(shape, g)
    x[3, 1500] = float("nan")
    q = had.Hadamard()
    want = q.quantize(x, "int8", torch.Generator().manual_seed(3), backend=Backend.REFERENCE)
    got = q.quantize(x, "int8", torch.Generator().manual_seed(3), backend=Backend.AUTO)
    assert torch.equal(got.codes, want.codes) and avx512._same(got.scale, want.scale)
    assert avx512._same(got.transform.forward(x), want.transform.forward(x))
    y = torch.randn(got.codes.shape[0], shape[1], generator=g)
    assert avx512._same(got.inverse(y), want.inverse(y))
    for mine in (y.clone(), torch.cat([y, y], 1)[:, :shape[1]]):
        assert avx512._same(got.inverse(mine, overwrite=True), want.inverse(y))


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 5, 3), (4, 16, 16), (2, 100, 70), (3, 64, 513), (64, 2, 31), (1, 300, 33),
                                   (2, 40, 1100)])
@pytest.mark.parametrize("formats", [("int8", "int8", "row"), ("int4", "int8", "tensor"), ("int8", "fp8_e4m3", "row")],
                         ids="-".join)
def test_hadamard_quantize_pair_bitwise_the_two_kernels(shape: tuple[int, int, int],
                                                        formats: tuple[str, str, str]) -> None:
    """Hadamard's pair (a layer's ``∇Y``: ``T x``'s rows and ``x``'s columns, their ranges
    from the rows' read; with entries, attention's, each entry's transpose) against the
    reference op (the transform's quantizer, then the columns' on the reference kernels):
    entries (E, N rows each, D columns) with padded rows, blocks of 64 and 8 rows, a block
    with ±Inf (its rows from the float64 reference) and a NaN, or finite (every row's codes
    from the kernel), an entry of its own scale, float32, bfloat16 and strided rows of
    each, stochastic and nearest, 1–3 threads; what the kernel cannot take is refused."""
    from lowbit.quantizers import hadamard as had

    fmt_a, fmt_w, gran_w = parse_format(formats[0]), parse_format(formats[1]), Granularity(formats[2])
    e, n, d = shape
    x, g = _entries_operand(e, n, d)
    ref = kernels_for(Backend.REFERENCE, "cpu")
    finite_rows = []  # the kernel's rows finite: (a review) with ±Inf beside each NaN they never were
    xf = x.nan_to_num(0.0, 6e4, -6e4)
    operands = (x, x.bfloat16(), torch.cat([x, x], 1)[:, :d], xf, xf.bfloat16(), torch.cat([xf, xf], 1)[:, :d])
    for a in operands:
        for block in (64, 8):
            t = had.Hadamard(block).transform(a, torch.Generator().manual_seed(1), ref)
            for entries in sorted({0, e}):
                for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
                    args = (a, t, fmt_a, Granularity.ROW, rnd, torch.tensor(123), fmt_w, gran_w, rnd,
                            torch.tensor(2**32 - 5), entries)
                    want = had._quantize_pair(ref, *args)
                    assert want[4].shape == ((entries or 1) * d, e * n // (entries or 1))
                    for threads in (1, 3):
                        with num_threads(threads):
                            assert had._native_quantize_pair_ok(ref, *args)
                            assert _same(had._native_quantize_pair(ref, *args), want)
                    m = t.signs * had._c(t.block, torch.float32, "cpu")
                    rows = avx512.hadamard_quantize_pair(a, m, t.signs.shape[0], t.block, had.WIDE, *args[2:])
                    finite_rows.append(rows[0] is not None and bool(torch.isfinite(rows[1]).all()))
    assert all(finite_rows[len(finite_rows) // 2:])  # every finite operand's rows from the kernel
    t = had.Hadamard().transform(x, None, ref)
    rest = (fmt_a, Granularity.ROW, Rounding.STOCHASTIC, torch.tensor(1), fmt_w, gran_w, Rounding.STOCHASTIC,
            torch.tensor(1))
    for entries in (-1, True, 1.0, e * n + 1):
        assert not had._native_quantize_pair_ok(ref, x, t, *rest, entries)
    assert not had._native_quantize_pair_ok(ref, x, t, *rest[:4], parse_format("int4a"), *rest[5:], 0)
    assert not had._native_quantize_pair_ok(ref, x, t, parse_format("fp8_e4m3"), *rest[1:], 0)
    assert not had._native_quantize_pair_ok(ref, x, t, *rest[:7], torch.tensor(2**32), 0)


@needs_avx512
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hadamard_forward_alone_bitwise_the_reference(dtype: torch.dtype) -> None:
    """Where the fused quantizer does not take the format (FP8), the Hadamard transform
    runs alone on the AVX-512 kernel and the format's own quantizer after it: ``T x`` and
    the FP8 codes and steps bitwise the reference's (padded rows, a NaN, a strided view)."""
    from lowbit.quantizers import hadamard as had

    g = torch.Generator().manual_seed(5)
    x = _operand((100, 70), g)[:, 3:].to(dtype)
    x[7, 2] = float("nan")
    q = had.Hadamard()
    for fmt in ("fp8_e4m3", "fp8_e5m2"):
        want = q.quantize(x, fmt, torch.Generator().manual_seed(3), backend=Backend.REFERENCE)
        got = q.quantize(x, fmt, torch.Generator().manual_seed(3), backend=Backend.AUTO)
        assert avx512._same_fp8(got.codes, want.codes) and avx512._same(got.scale, want.scale)
    t_ref = q.transform(x, torch.Generator().manual_seed(1))
    t_auto = q.transform(x, torch.Generator().manual_seed(1), kernels_for(Backend.AUTO, x.device))
    assert avx512.supports_hadamard_forward(x, t_auto.signs, t_auto.signs.shape[0], t_auto.block)
    assert avx512._same(t_auto.forward(x), t_ref.forward(x))


@needs_avx512
@pytest.mark.parametrize("bad", [float("inf"), 2.0**101, 1e-30], ids=["inf", "huge", "tiny"])
def test_hadamard_kernels_hand_wide_blocks_to_the_float64_reference(bad: float) -> None:
    """A block the reference transforms in float64 (largest magnitude above 2¹⁰⁰ or in
    (0, 2⁻⁶⁰)) is detected by the kernels themselves and computed by the reference: the
    same float64 steps and inverse as ``backend="reference"`` — also where the inverse may
    write over its operand (the kernel writes nothing before it knows no block is wide)."""
    from lowbit.quantizers import hadamard as had

    g = torch.Generator().manual_seed(11)
    x = torch.randn(130, 70, generator=g)
    if bad < 1:
        x[64:128] = 1e-31  # one whole block tiny
    x[70, 3] = bad
    q = had.Hadamard()
    want = q.quantize(x, "int8", torch.Generator().manual_seed(2), backend=Backend.REFERENCE)
    got = q.quantize(x, "int8", torch.Generator().manual_seed(2), backend=Backend.AUTO)
    assert got.scale.dtype == want.scale.dtype == torch.float64
    assert torch.equal(got.codes, want.codes) and avx512._same(got.scale, want.scale)
    y = torch.randn(got.codes.shape[0], 9, generator=g)
    y[70, 0] = bad
    assert avx512._same(got.inverse(y), want.inverse(y))
    mine = y.clone()  # the kernel asked to write over it: the reference reads it untouched
    assert avx512._same(got.inverse(mine, overwrite=True), want.inverse(y))


@needs_avx512
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 17, 33), (48, 128, 64), (2, 300, 513)])
def test_batched_pair_bitwise_the_reference(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """A batch of gradients (B, N, out) (attention's ∇O and ∇S): codes of (B·N, out) and
    of each entry's transpose (B·out, N), the noise indices running on across entries;
    per row and per tensor, stochastic and nearest, 1–3 threads; entries with a row
    stride beyond their width."""
    g = torch.Generator().manual_seed(shape[1])
    b, n, c = shape
    x = (_operand((b * n, c), g).reshape(b, n, c) * torch.logspace(-2, 2, b).reshape(b, 1, 1))
    x = x.clamp(-6e4, 6e4).to(dtype)
    combos = [(Granularity.ROW, Rounding.STOCHASTIC, Granularity.ROW, Rounding.STOCHASTIC),
              (Granularity.TENSOR, Rounding.NEAREST, Granularity.ROW, Rounding.STOCHASTIC),
              (Granularity.ROW, Rounding.STOCHASTIC, Granularity.TENSOR, Rounding.NEAREST)]
    for a in (x, torch.cat([x, x], 2)[:, :, 1:c + 1]):
        for gran_a, rnd_a, gran_w, rnd_w in combos:
            seed_a, seed_w = torch.randint(0, 2**32, (2,), generator=g).unbind()
            args = (a, FORMATS[4], gran_a, rnd_a, seed_a, FORMATS[2], gran_w, rnd_w, seed_w)
            assert avx512.supports_batched_pair(*args)
            want = reference_batched_pair(*args)
            for threads in (1, 2, 3):
                with num_threads(threads):
                    got = avx512.quantize_batched_pair(*args)
                assert _same(got, want), (gran_a, rnd_a, gran_w, rnd_w, threads)
    refused = (x.mT, FORMATS[4], *combos[0][:2], torch.tensor(1), FORMATS[4], *combos[0][2:], torch.tensor(1))
    assert not avx512.supports_batched_pair(*refused) or c == 1 or n == 1  # columns contiguous only
    # a part of the batch, entries i:j told their place (``first = i``): the whole batch's
    # rows of both codes, per-row scales — on the kernel and on the reference
    i, j = b // 3, max(b // 3 + 1, 2 * b // 3)
    args = (x, FORMATS[4], *combos[0][:2], seed_a, FORMATS[2], *combos[0][2:], seed_w)
    whole = reference_batched_pair(*args)
    for part in (avx512.quantize_batched_pair(x[i:j], *args[1:], i), reference_batched_pair(x[i:j], *args[1:], i)):
        assert torch.equal(part[0], whole[0][i * n:j * n]) and torch.equal(part[1], whole[1][i * n:j * n])
        assert torch.equal(part[4], whole[4][i * c:j * c]) and torch.equal(part[5], whole[5][i * c:j * c])
    assert not avx512.supports_batched_pair(x[0], *refused[1:])  # 2-D: quantize_pair's


CONV_SHAPES = [(1, 1, 1), (2, 3, 1), (3, 5, 17), (8, 16, 49), (16, 4, 784), (5, 70, 196)]


@needs_avx512
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_pair_bitwise_the_reference(shape: tuple[int, int, int], dtype: torch.dtype) -> None:
    """Both quantizations of a convolution's ∇Y (N, C_out, L): (N, C_out·L) and
    (C_out, N·L), with the paths' settings mixed, segments with and without a 16-lane
    tail (L = 17, 49, 196), float32, bfloat16 and float16, one to three threads."""
    g = torch.Generator().manual_seed(11 + shape[2])
    n, c, length = shape
    x = (_operand((n * c, length), g).reshape(n, c, length)
         * torch.logspace(-3, 3, c).reshape(1, c, 1)).clamp(-6e4, 6e4).to(dtype)
    combos = [(Granularity.ROW, Rounding.STOCHASTIC, Granularity.ROW, Rounding.STOCHASTIC, FORMATS[4]),
              (Granularity.TENSOR, Rounding.STOCHASTIC, Granularity.ROW, Rounding.NEAREST, FORMATS[0]),
              (Granularity.ROW, Rounding.NEAREST, Granularity.TENSOR, Rounding.STOCHASTIC, FORMATS[2])]
    for gran_a, rnd_a, gran_w, rnd_w, fmt_w in combos:
        seed_a, seed_w = torch.randint(0, 2**32, (2,), generator=g).unbind()
        args = (x, FORMATS[4], gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w)
        assert avx512.supports_conv_pair(*args)
        want = reference_conv_pair(*args)
        for threads in (1, 2, 3):
            with num_threads(threads):
                got = avx512.quantize_conv_pair(*args)
            assert _same(got, want), (gran_a, rnd_a, gran_w, rnd_w, threads)
            assert got[0].shape == (n, c * length) and got[4].shape == (c, n * length)


@needs_avx512
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 7, 3), (4, 28, 28, 16), (3, 7, 7, 70), (2, 33)])
def test_conv_epilogue_bitwise_the_reference(shape: tuple[int, ...], acc_dtype: torch.dtype,
                                             out_dtype: torch.dtype) -> None:
    """A convolution's epilogue, channels-last accumulator (N, *spatial, C) → a new
    contiguous (N, C, *spatial), and its channels-last twin (the same values in the
    accumulator's memory): ``(float(acc)·s_a)·s_b (+ bias)`` bitwise the reference's,
    with position and channel tails (16 × 16 tiles), per-sample/per-tensor and
    per-channel/per-tensor scales, with and without a bias (float32 and bfloat16),
    accumulators beyond float32's 2²⁴ (rounded as ``.to(float32)`` rounds them), 1–3
    threads; written as float32 or as bfloat16 (the float32 value rounded to nearest
    even as torch's cast rounds it: ties, values past bfloat16's largest, Inf and NaN from
    an infinite scale included)."""
    g = torch.Generator().manual_seed(shape[-1])
    n, c = shape[0], shape[-1]
    acc = torch.randint(-2**30, 2**30, shape, generator=g, dtype=torch.int32)
    if acc_dtype == torch.float32:  # oneDNN's exact float(acc) of sums below 2²⁴
        acc = (acc // 128).float()
    ones = (1,) * (len(shape) - 2)
    sa, sb = torch.rand(n, *ones, 1, generator=g), torch.rand(*ones, 1, c, generator=g).reshape(1, *ones, c)
    sa[0] = 0.0
    bias = torch.randn(c, generator=g)
    cases = [(acc, sa, sb, None), (acc, sa[:1], sb, bias), (acc, sa, sb[..., :1], bias.bfloat16())]
    if out_dtype == torch.bfloat16:
        # acc 1 times scales halfway between bf16 neighbours (to even: down, then up) and
        # past bf16's largest finite (to Inf); an infinite sample scale (Inf, NaN at acc 0)
        small = acc.clone()
        small.reshape(-1)[:] = 1
        small.reshape(-1)[1::7] = 0
        tied = sb.clone()
        tied.reshape(-1)[:3] = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.3961e38])[:c]
        inf = sa.clone()
        inf.reshape(-1)[-1] = float("inf")
        cases += [(small, torch.ones_like(sa), tied, None), (small, inf, sb, None)]
    for a, s_a, s_b, b in cases:
        want = im2col.epilogue_nchw(a, s_a, s_b, b, out_dtype)
        want_cl = im2col.epilogue_nhwc(a, s_a, s_b, b, out_dtype)  # the channels-last twin
        assert want.dtype == out_dtype and avx512._same(want_cl, want)
        assert avx512.supports_epilogue_nchw(a, s_a, s_b, b, out_dtype)
        for threads in (1, 2, 3):
            with num_threads(threads):
                got = avx512.epilogue_nchw(a, s_a, s_b, b, out_dtype)
                got_cl = avx512.run_epilogue_nhwc(a.clone(), s_a, s_b, b, out_dtype)
            assert got.is_contiguous() and avx512._same(got, want), threads
            assert got_cl.movedim(1, -1).is_contiguous() and avx512._same(got_cl, want), threads


def _onednn_conv(w_shape: tuple, size: tuple, stride: tuple) -> bool:
    """Whether a converted Conv2d of this geometry (padding 1) runs oneDNN's exact int8
    convolution on this machine (``lowbit.kernels.qconv``), not im2col + an int8 GEMM."""
    return qconv.available(torch.zeros(1, dtype=torch.int8), w_shape, 1, size, stride, (1, 1), (1, 1))


@needs_avx512
@pytest.mark.parametrize("bias", [False, True])
def test_conv_layers_use_the_epilogue_with_and_without_bias(monkeypatch: pytest.MonkeyPatch, bias: bool) -> None:
    """A converted ``nn.Conv2d``'s forward runs its epilogue on the kernel, its bias (an
    ``nn.Parameter``) included."""
    assert avx512.available()  # built and self-tested before the count
    calls = []
    real = avx512._epilogue_nchw
    monkeypatch.setattr(avx512, "_epilogue_nchw", lambda *a: calls.append(a[4] is not None) or real(*a))
    model = lowbit.convert(nn.Conv2d(8, 16, 3, padding=1, bias=bias), lowbit.FQTConfig.from_recipe("fqt-psq-8"))
    model(torch.randn(4, 8, 12, 12))
    # oneDNN's convolution: one accumulator; else im2col's GEMM, one per piece of samples
    pieces = 1 if _onednn_conv((16, 8, 3, 3), (12, 12), (1, 1)) else \
        -(-4 // im2col.sample_pieces(4, 4 * 12 * 12 * 3 * 3 * 8, 4 * 14 * 14 * 8 // im2col.PIECE_SHARE,
                                     torch.device("cpu")))
    assert calls == [bias] * pieces


def test_conv_epilogue_refuses_what_it_cannot_compute() -> None:
    """A non-contiguous accumulator, an int64 one, a float16 output, float64 scales,
    scales of another length or of another shape with the same length (the reference
    broadcasts by shape: a (N,) scale would scale channels), or a bias autograd records
    are refused (the compiled epilogue runs them)."""
    acc = torch.randint(-99, 99, (2, 4, 4, 8), dtype=torch.int32)
    sa, sb = torch.rand(2, 1, 1, 1), torch.rand(1, 1, 1, 8)
    refused = [(acc.transpose(1, 2), sa, sb, None, torch.float32), (acc.long(), sa, sb, None, torch.float32),
               (acc, sa, sb, None, torch.float16), (acc, sa.double(), sb, None, torch.float32),
               (acc, sa, sb[..., :3], None, torch.float32), (acc, sa, sb, torch.ones(3), torch.float32),
               (acc, sa.reshape(2), sb, None, torch.float32), (acc, sa.reshape(1, 1, 1, 2), sb, None, torch.float32),
               (acc, sa, sb.reshape(8, 1, 1, 1), None, torch.float32),
               (acc, sa, sb, torch.ones(8, requires_grad=True), torch.float32)]
    for args in refused:
        assert not avx512.supports_epilogue_nchw(*args)
        with pytest.raises(RuntimeError, match="does not take this call"):
            avx512.epilogue_nchw(*args)
    assert avx512.supports_epilogue_nchw(acc, sa, sb, None, torch.float32) == avx512.available()
    with torch.no_grad():  # a layer's bias (an nn.Parameter) inside the block op: taken
        bias = nn.Parameter(torch.ones(8))
        assert avx512.supports_epilogue_nchw(acc, sa, sb, bias, torch.float32) == avx512.available()



@needs_avx512
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_conv_epilogue_into_pieces_of_a_result(channels_last: bool, out_dtype: torch.dtype) -> None:
    """The convolution epilogues write into ``out`` (a piece of samples of a larger result,
    ``lowbit.conv``'s accumulator in pieces): bitwise the reference op with ``out``
    (NCHW: ``int8_epilogue_nchw``; channels-last: ``int8_epilogue_nhwc``) and the whole
    result, nothing outside the piece touched; an ``out`` of another dtype, shape or
    layout, or sharing bytes with ``acc``, is refused (the reference runs it)."""
    g = torch.Generator().manual_seed(8)
    acc = torch.randint(-2**20, 2**20, (5, 6, 7, 20), generator=g).float()  # (N, H, W, C)
    sa, sb, bias = torch.rand(5, 1, 1, 1, generator=g), torch.rand(1, 1, 1, 20, generator=g), torch.randn(20)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    native = avx512.run_epilogue_nhwc if channels_last else avx512.run_epilogue_nchw
    supports = avx512.supports_epilogue_nhwc if channels_last else avx512.supports_epilogue_nchw
    ref = im2col.epilogue_nhwc if channels_last else im2col.epilogue_nchw
    want = ref(acc, sa, sb, bias, out_dtype)
    for fn in (native, ref):
        out = torch.full((5, 20, 6, 7), 7.0, dtype=out_dtype).contiguous(memory_format=fmt)
        assert supports(acc[1:3].clone(), sa[1:3], sb, bias, out_dtype, out[1:3])
        got = fn(acc[1:3].clone(), sa[1:3], sb, bias, out_dtype, out[1:3])
        assert got.data_ptr() == out[1:3].data_ptr() and torch.equal(out[1:3], want[1:3])
        assert (out[:1] == 7).all() and (out[3:] == 7).all()  # outside the piece: untouched
    piece = acc[1:3].clone()
    bad = [torch.empty(2, 20, 6, 7, dtype=torch.float16).contiguous(memory_format=fmt),
           torch.empty(2, 20, 6, 8, dtype=out_dtype).contiguous(memory_format=fmt),
           torch.empty(2, 20, 6, 7, dtype=out_dtype).contiguous(
               memory_format=torch.contiguous_format if channels_last else torch.channels_last),
           piece.view(out_dtype)[..., :20].movedim(-1, 1) if out_dtype == torch.float32 else
           piece.view(torch.bfloat16)[..., :20].movedim(-1, 1)]
    for out in bad:
        assert not supports(piece, sa[1:3], sb, bias, out_dtype, out)
    with pytest.raises(ValueError, match="epilogue out"):  # the reference copies neither broadcast nor cast
        ref(piece, sa[1:3], sb, bias, out_dtype, torch.empty(1, 20, 6, 7, dtype=out_dtype).contiguous(memory_format=fmt))
    for fn in (native, ref):  # a write autograd sees: a tensor saved for backward then written raises, both routes
        t = torch.randn(2, 20, 6, 7, requires_grad=True)
        u = (t * 1).to(out_dtype).contiguous(memory_format=fmt)
        loss = u.sin().float().sum()  # sin saves u
        with torch.no_grad():
            fn(piece.clone(), sa[1:3], sb, bias, out_dtype, u)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


PLACEMENTS = [  # (N, C, H, W), size, offset, stride: no padding, padding, zero insertion
    ((1, 1, 1, 1), (1, 1), (0, 0), (1, 1)), ((2, 3, 5, 7), (7, 9), (1, 1), (1, 1)),
    ((4, 16, 28, 28), (28, 28), (0, 0), (1, 1)), ((4, 16, 28, 28), (30, 30), (1, 1), (1, 1)),
    ((3, 70, 7, 7), (9, 11), (0, 2), (1, 1)), ((2, 17, 1, 33), (3, 35), (1, 1), (1, 1)),
    ((2, 32, 7, 7), (15, 15), (1, 1), (2, 2)), ((2, 5, 4, 6), (12, 9), (2, 0), (3, 1))]


@needs_avx512
@pytest.mark.parametrize("unsigned", [False, True])
@pytest.mark.parametrize("case", PLACEMENTS, ids=str)
def test_place_nhwc_bitwise_the_reference(case: tuple, unsigned: bool) -> None:
    """Row-major int8 codes (N, C·H·W) placed channels-last into a (N, H₂, W₂, C) tensor
    at an offset and a stride: the same bytes as :func:`im2col.place_codes` (int8, or
    uint8 ``code + 128`` with the uncovered entries 128), every code value −128…127,
    channel and position tails of the 16 × 16 tiles, 1–3 threads."""
    shape, size, offset, stride = case
    g = torch.Generator().manual_seed(shape[1])
    codes = torch.randint(-128, 128, (shape[0], shape[1] * shape[2] * shape[3]), generator=g,
                          dtype=torch.int8)
    want = im2col.place_codes(codes, shape, size, offset, stride, unsigned)
    assert want.shape == (shape[0], *size, shape[1]) and want.dtype == (torch.uint8 if unsigned else torch.int8)
    assert avx512.supports_place_nhwc(codes, shape, size, offset, stride, unsigned)
    for threads in (1, 2, 3):
        with num_threads(threads):
            got = avx512.place_nhwc(codes, shape, size, offset, stride, unsigned)
        assert got.dtype == want.dtype and got.is_contiguous() and torch.equal(got, want), threads


def test_place_nhwc_refuses_what_it_cannot_write() -> None:
    """Cropping (a negative offset, or codes past the end), non-contiguous or non-int8
    codes and a shape that is not the codes' (negative extents whose product matches
    included: the C loop would run past its buffer) are refused (the reference places or
    rejects them)."""
    codes = torch.randint(-128, 128, (2, 3 * 4 * 5), dtype=torch.int8)
    shape = (2, 3, 4, 5)
    refused = [(codes, shape, (4, 5), (-1, 0)), (codes, shape, (4, 5), (0, 1)),
               (codes, shape, (6, 5), (0, 0), (2, 1)), (codes[:, ::2], (2, 3, 2, 5), (2, 5), (0, 0)),
               (codes.short(), shape, (4, 5), (0, 0)), (codes, (2, 3, 5, 4, 1), (4, 5), (0, 0)),
               (codes, (1, 3, 4, 5), (4, 5), (0, 0)),
               (codes, (2, 3, -4, -5), (1, 1), (0, 0))]  # negative extents: (−4)·(−5) = 20
    for args in refused:
        assert not avx512.supports_place_nhwc(*args)
        with pytest.raises(RuntimeError, match="does not take this call"):
            avx512.place_nhwc(*args)
    assert avx512.supports_place_nhwc(codes, shape, (6, 7), (1, 1)) == avx512.available()


@needs_avx512
def test_conv_layers_place_their_codes_on_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A converted ``nn.Conv2d`` step places its codes channels-last on the kernel: X's
    codes as u8 for oneDNN's forward convolution and padded for ∇W (at stride 1 one
    piece of samples at a time, each sample once: ``grad_weight_rows``), ∇Y's as u8 for
    ∇X (zero-inserted at stride 2)."""
    assert avx512.available()
    calls = []
    real = avx512._place_nhwc
    monkeypatch.setattr(avx512, "_place_nhwc",
                        lambda *a: calls.append((a[6], tuple(a[5]), a[2][0])) or real(*a))
    for stride in (1, 2):
        calls.clear()
        model = lowbit.convert(nn.Conv2d(8, 16, 3, stride=stride, padding=1), lowbit.FQTConfig.from_recipe("fqt-psq-8"))
        model(torch.randn(4, 8, 12, 12, requires_grad=True)).sum().backward()
        unsigned = sorted(c[:2] for c in calls if c[0])
        padded = [c for c in calls if not c[0]]
        if not _onednn_conv((16, 8, 3, 3), (12, 12), (stride, stride)):
            # im2col + the integer GEMM (no VNNI: oneDNN's convolution is not exact): X
            # padded for Y's patches and for ∇W's (at stride 1 one piece of samples at a
            # time), ∇Y padded for ∇X's at stride 1 (at stride 2: col2im, no placing)
            whole = [c for c in padded if c[2] == 4]
            assert not unsigned and all(c[1] == (1, 1) for c in padded), (stride, calls)
            assert len(whole) == 2 and sum(c[2] for c in padded) - 8 == 4 * (stride == 1), (stride, calls)
            assert (len(padded) > 3) == (stride == 1), (stride, calls)
            continue
        assert unsigned == [(True, (1, 1)), (True, (stride, stride))], (stride, calls)
        assert all(c[1] == (1, 1) for c in padded) and sum(c[2] for c in padded) == 4, (stride, calls)
        assert (len(padded) > 1) == (stride == 1), (stride, calls)  # stride 2: the im2col path, whole


@needs_avx512
def test_conv_pair_strided_and_nonfinite_operands() -> None:
    """Sample and channel strides other than the contiguous ones (a slice of a larger
    gradient, every other channel), channels-last ∇Y (each position's channels
    contiguous: a channels-last model's; with channel and position tails, bfloat16),
    all-zero and NaN/±Inf segments: the reference's codes and steps, NaN never made
    finite."""
    base = torch.randn(6, 20, 60)
    base[1, 2] = 0.0
    base[2, 3, 7], base[3, 4, 0], base[4, 5, 59] = float("nan"), float("inf"), -float("inf")
    seed = torch.tensor(2024)
    cl = base.transpose(1, 2).contiguous().transpose(1, 2)  # channels-last: 16 × 16 tiles
    for x in (base, base[1:5, 2:18, 5:55], base[:, ::2, :33], cl, cl[1:5, 2:19, 5:55], cl.bfloat16()[:, 3:]):
        for gran in (Granularity.ROW, Granularity.TENSOR):
            args = (x, FORMATS[4], gran, Rounding.STOCHASTIC, seed, FORMATS[2], gran,
                    Rounding.STOCHASTIC, seed)
            assert avx512.supports_conv_pair(*args)
            got = avx512.quantize_conv_pair(*args)
            assert _same(got, reference_conv_pair(*args))
    got = avx512.quantize_conv_pair(base, FORMATS[4], Granularity.ROW, Rounding.STOCHASTIC, seed,
                                    FORMATS[4], Granularity.ROW, Rounding.STOCHASTIC, seed)
    assert torch.isnan(got[1][2]) and torch.isnan(got[5][3])  # the sample's and the channel's step
    assert not torch.isfinite(got[1][3]) and not torch.isfinite(got[5][5])


def test_conv_pair_refuses_what_it_cannot_read() -> None:
    """Neither the positions nor the channels contiguous, a 2-D operand, block
    (MXFP8) or asymmetric formats, float64 and seeds outside 32 bits are refused (the
    compiled kernel runs them)."""
    g = torch.randn(4, 8, 25)
    seed = torch.tensor(3)
    ok = (FORMATS[4], Granularity.ROW, Rounding.STOCHASTIC, seed)
    refused = [(torch.randn(4, 16, 50)[:, ::2, ::2], *ok, *ok), (g[:, :, 0], *ok, *ok),
               (g.double(), *ok, *ok), (g, parse_format("mxfp8_e4m3"), *ok[1:], *ok),
               (g, *ok, parse_format("int4a"), *ok[1:]),
               (g, *ok, FORMATS[4], Granularity.ROW, Rounding.STOCHASTIC, torch.tensor(2**32))]
    for args in refused:
        assert not avx512.supports_conv_pair(*args)
        with pytest.raises(RuntimeError, match="does not take this call"):
            avx512.quantize_conv_pair(*args)
    assert avx512.supports_conv_pair(g, *ok, *ok) == avx512.available()


@needs_avx512
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_nonfinite_and_extreme_groups(dtype: torch.dtype) -> None:
    """All-zero rows (step 0, codes 0), NaN (step NaN, codes 0) and ±Inf rows (non-finite
    step), subnormals, the dtype's largest values and -0.0: the same as the reference,
    and NaN never made finite."""
    info = torch.finfo(dtype)
    x = torch.randn(9, 40)
    x[0] = 0.0
    x[1, 3] = float("nan")
    x[2, 0], x[3, 5] = float("inf"), -float("inf")
    x[4] = info.tiny * torch.linspace(-1, 1, 40) * 1e-2  # subnormals of the dtype
    x[5] = info.max * torch.linspace(-1, 1, 40)
    x[6] = -0.0
    x[7, :] = float("nan")
    x = x.to(dtype)
    seed = torch.tensor(123456789)
    for fmt in (FORMATS[2], FORMATS[4]):
        for gran in (Granularity.ROW, Granularity.TENSOR):
            for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
                got = avx512.quantize(x, fmt, gran, rnd, seed)
                assert _same(got, reference.quantize(x, fmt, gran, rnd, seed))
                assert _same(avx512.quantize_pair(x, fmt, gran, rnd, seed, fmt, gran, rnd, seed),
                             reference_pair(x, fmt, gran, rnd, seed, fmt, gran, rnd, seed))
                if gran is Granularity.ROW:
                    assert torch.isnan(got[1][1]) and torch.isnan(got[1][7]) and not torch.isfinite(got[1][2])
                    assert float(got[1][0]) == 0.0 and not got[0][0].any()
                    assert got[0][4].any()  # subnormals quantize on their own row's scale


@needs_avx512
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_grid_steps_bitwise_grid_step_over_float32(bits: int) -> None:
    """The C steps (``lowbit_grid_steps``) equal :func:`lowbit.formats.grid_step` on 2²⁰
    random float32 bit patterns (every exponent, subnormals included), per row and per
    tensor, and their divisors are 1 exactly where the absmax is 0."""
    from lowbit.formats import grid_step

    g = torch.Generator().manual_seed(bits)
    pattern = torch.randint(0, 0x7F800000, (1 << 20,), generator=g, dtype=torch.int32)
    amax = torch.cat([pattern.view(torch.float32), torch.tensor([0.0, float("inf")])]).reshape(-1, 1)
    fmt = parse_format(f"int{bits}")
    lib = avx512._library()
    for gran in (Granularity.ROW, Granularity.TENSOR):
        ref = amax.amax().reshape(1, 1) if gran is Granularity.TENSOR else amax
        want = grid_step(ref, fmt.emax)
        step, div = avx512._steps(lib, amax, fmt, gran)
        assert torch.equal(step.view(torch.int32), want.view(torch.int32))
        assert torch.equal(div, torch.where(ref == 0, torch.ones_like(want), want))


@needs_avx512
@pytest.mark.parametrize("case", ["2d-row-col-bias", "2d-tensor", "3d-per-entry", "3d-shared-cols", "tail"])
def test_epilogue_into_bitwise_the_reference(case: str) -> None:
    """The in-place row-major epilogue (a Linear's and attention's ``int8_epilogue_into``)
    writes the reference's float32 bits over the accumulator, and refuses offsets, a
    strided accumulator and scales it would misread."""
    g = torch.Generator().manual_seed(len(case))
    shape = {"2d-row-col-bias": (33, 70), "2d-tensor": (5, 16), "3d-per-entry": (4, 9, 35),
             "3d-shared-cols": (2, 16, 48), "tail": (3, 1)}[case]
    acc = torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int32)
    lead, m, n = shape[:-2], shape[-2], shape[-1]
    sa = torch.rand(*lead, m, 1, generator=g)
    sb = torch.rand(*lead, 1, n, generator=g)
    bias = torch.randn(n, generator=g) if case in ("2d-row-col-bias", "tail") else None
    if case == "2d-tensor":
        sa, sb = sa[:1], sb[:, :1]
    if case == "3d-shared-cols":
        sb = sb[:1]
    args = (sa, sb, None, None, None, None, 0, bias)
    assert avx512.supports_epilogue_into(acc, *args)
    want = reference.int8_epilogue(acc, sa, sb, None, None, None, None, 0, bias, torch.float32)
    got = acc.clone()
    version = got._version
    avx512.run_epilogue_into(got, *args)
    assert torch.equal(got.view(torch.float32).view(torch.int32), want.view(torch.int32))
    assert got._version > version  # written over through its pointer: autograd sees it (README row 225)
    assert not avx512.supports_epilogue_into(acc, sa, sb, sa, None, None, None, 0, bias)  # an offset
    if acc.dim() == 2 and n > 1:
        assert not avx512.supports_epilogue_into(acc.t(), sb.t(), sa.t(), None, None, None, None, 0)
        assert not avx512.supports_epilogue_into(acc, torch.rand(1, 2), sb, None, None, None, None, 0)


@needs_avx512
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("shape", [(1, 1), (17, 1), (33, 70), (300, 513)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_codes_bitwise_the_reference(name: str, shape: tuple[int, int], dtype: torch.dtype) -> None:
    """E4M3 and E5M2 codes (per row and per tensor, stochastic and nearest) of row-major
    and transposed operands, and both codes of the pair, are the reference's bytes, the
    steps its bits; values span 2⁻²⁰…2⁴ of the row maximum, so elements land on every
    binade, the subnormals included, and −0.0 keeps its sign."""
    fmt = parse_format(name)
    g = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    x = (torch.randn(shape, generator=g) * torch.exp2(torch.randint(-20, 4, shape, generator=g).float())).to(dtype)
    x[0, 0] = -0.0
    if shape[1] >= 8:  # the grid's max and exact halfway points (half to even): row max 448 / 57344 → step 1
        top = fmt.emax
        x[-1, :8] = torch.tensor([top, 1.0625, -1.0625, 3 * 2**-10, 2**-11, 432.0, 248.0, -440.0]).to(dtype)
    seed_a, seed_w = torch.tensor(77), torch.tensor(0xABCDEF)
    kern = avx512._library()
    for gran in (Granularity.ROW, Granularity.TENSOR):
        for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
            for a in (x, x.t()):
                assert avx512.supports(a, fmt, gran, rnd, seed_a)
                got = avx512.quantize(a, fmt, gran, rnd, seed_a)
                want = reference.quantize(a, fmt, gran, rnd, seed_a)
                assert got[0].dtype == fmt.code_dtype and avx512._same_fp8(got[0], want[0])
                assert torch.equal(got[1], want[1])
            pair = avx512._quantize_pair(kern, x, fmt, gran, rnd, seed_a, fmt, gran, rnd, seed_w, 1)
            want_t = reference.quantize(x.t(), fmt, gran, rnd, seed_w)
            assert avx512._same_fp8(pair[2], want_t[0]) and torch.equal(pair[3], want_t[1])


@needs_avx512
def test_fp8_nonfinite_groups_and_block_formats() -> None:
    """A NaN or infinite value makes its group's codes NaN and its step non-finite, as the
    reference; block formats (MXFP8, NVFP4) and asymmetric grids are not taken."""
    fmt = parse_format("fp8_e4m3")
    x = torch.randn(4, 40)
    x[1, 3], x[2, 5] = float("nan"), float("inf")
    got = avx512.quantize(x, fmt, Granularity.ROW, Rounding.NEAREST, torch.tensor(0))
    want = reference.quantize(x, fmt, Granularity.ROW, Rounding.NEAREST, torch.tensor(0))
    assert avx512._same_fp8(got[0], want[0]) and avx512._same(got[1], want[1])
    assert bool(torch.isnan(got[0][1].float()).all()) and not bool(torch.isfinite(got[1][1:3]).any())
    for other in ("mxfp8_e4m3", "nvfp4", "int8a"):
        assert not avx512.supports(x, parse_format(other), Granularity.ROW, Rounding.NEAREST, torch.tensor(0))


@needs_avx512
def test_row_strided_views() -> None:
    """A view whose rows are contiguous but not adjacent (row stride > columns), and a
    slice starting mid-row."""
    base = torch.randn(70, 130)
    seed = torch.tensor(99)
    fmt = FORMATS[4]
    for x in (base[:, 3:100], base[5:60, 64:], base[::2, :50]):
        assert x.stride(1) == 1 and x.stride(0) > x.shape[1]
        assert _same(avx512.quantize(x, fmt, Granularity.ROW, Rounding.STOCHASTIC, seed),
                     reference.quantize(x, fmt, Granularity.ROW, Rounding.STOCHASTIC, seed))
        args = (x, fmt, Granularity.ROW, Rounding.STOCHASTIC, seed, fmt, Granularity.ROW,
                Rounding.STOCHASTIC, seed)
        assert _same(avx512.quantize_pair(*args), reference_pair(*args))


def test_supports_only_what_it_computes() -> None:
    """float32/bfloat16/float16 CPU rows of a symmetric integer or FP8 (E4M3, E5M2) grid, per
    row or tensor, stochastic or nearest, not recorded by autograd: anything else (blocks,
    asymmetric grids,
    float64, operands with neither rows nor columns contiguous, an operand of a double
    backward) is refused,
    and the dispatcher runs the compiled or reference kernel."""
    x = torch.randn(64, 64)
    seed = torch.tensor(1)
    ok = (Granularity.ROW, Rounding.STOCHASTIC, seed)
    refused = [(x, parse_format("mxfp8_e4m3"), *ok), (x, parse_format("nvfp4"), *ok),
               (x, parse_format("int4a"), *ok), (x.double(), FORMATS[4], *ok),
               (x[:, ::2], FORMATS[4], *ok),
               (x.clone().requires_grad_(), FORMATS[4], *ok)]  # recorded: a double backward
    for args in refused:
        assert not avx512.supports(*args), args[1].name
        with pytest.raises(RuntimeError, match="does not take this call"):
            avx512.quantize(*args)
    assert avx512.supports(x, FORMATS[4], *ok) == avx512.available()
    with torch.no_grad():
        assert avx512.supports(x.clone().requires_grad_(), FORMATS[4], *ok) == avx512.available()


@needs_avx512
def test_dispatcher_runs_it_and_the_result_equals_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = avx512._quantize
    monkeypatch.setattr(avx512, "_quantize", lambda *a: calls.append(1) or real(*a))
    k = kernels_for(Backend.AUTO, "cpu")
    x, seed = torch.randn(100, 70), torch.tensor(5)
    got = k.quantize(x, FORMATS[4], Granularity.ROW, Rounding.STOCHASTIC, seed)
    want = reference.quantize(x, FORMATS[4], Granularity.ROW, Rounding.STOCHASTIC, seed)
    assert calls and torch.equal(got.codes, want[0]) and torch.equal(got.scale, want[1])
    calls.clear()
    kernels_for(Backend.REFERENCE, "cpu").quantize(x, FORMATS[4], Granularity.ROW, Rounding.STOCHASTIC, seed)
    assert not calls  # the reference backend never leaves plain torch


def _bitwise_with_and_without(grads) -> None:  # noqa: ANN001
    """``grads()`` with the kernels and without (the compiled ones): equal bit for bit;
    the first run did call the kernel's quantizers (not a comparison of two compiled runs:
    any ``lowbit::avx512_*quantize*`` scope — BHQ's and Hadamard's fused ones included;
    on the AVX2 build a per-tensor nearest operand runs compiled, ``avx512.prefers``)."""
    with torch.profiler.profile() as prof:
        on = grads()
    assert any(e.name.startswith("lowbit::avx512_") and "quantize" in e.name and "dequantize" not in e.name
               for e in prof.events())
    avx512.set_enabled(False)
    try:
        off = grads()
    finally:
        avx512.set_enabled(True)
    assert all(torch.equal(p, q) for p, q in zip(on, off, strict=True))


@needs_avx512
@pytest.mark.parametrize("recipe,amp", [("fqt-psq-8", False), ("fqt-ptq-4", False), ("fqt-psq-8", True),
                                        ("fqt-bhq-8", False), ("fqt-hadamard-8", False),
                                        ("fqt-psq-fp8", False), ("fp8-rowwise", False)])
def test_training_step_bitwise_the_same_with_and_without_it(recipe: str, amp: bool) -> None:
    """Two FFN steps, gradients equal bit for bit; under bf16 autocast the kernel reads
    the bf16 activations and gradients."""
    def grads() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
        lowbit.convert(model, lowbit.FQTConfig.from_recipe(recipe, seed=0))
        x = torch.randn(512, 256, requires_grad=True)
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = model(x).float().square().mean()
            loss.backward()
        return [x.grad, *(p.grad for p in model.parameters())]

    _bitwise_with_and_without(grads)


@needs_avx512
@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fqt-ptq-4", "fqt-bhq-8", "fp8-rowwise"])
def test_cnn_training_step_bitwise_the_same_with_and_without_it(recipe: str) -> None:
    """Two steps of a small CNN (3×3 and strided, grouped and 1×1 convolutions, a Linear
    head): gradients equal bit for bit with the kernels (quantizers, the convolutions'
    ∇Y pair and epilogue) and without (the compiled ones)."""
    def grads() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.ReLU(),
                              nn.Conv2d(16, 32, 3, stride=2, padding=1, groups=2), nn.ReLU(),
                              nn.Conv2d(32, 24, 1), nn.Flatten(), nn.Linear(24 * 64, 10))
        lowbit.convert(model, lowbit.FQTConfig.from_recipe(recipe, seed=0))
        x = torch.randn(64, 3, 16, 16, requires_grad=True)
        for _ in range(2):
            model(x).square().mean().backward()
        return [x.grad, *(p.grad for p in model.parameters())]

    _bitwise_with_and_without(grads)


def test_switched_off_by_environment() -> None:
    """``LOWBIT_AVX512=0``: not available, and quantization still works (compiled or
    reference kernel)."""
    code = ("import torch; from lowbit.kernels import avx512, kernels_for; "
            "from lowbit.formats import parse_format, Granularity, Rounding; "
            "print(avx512.available()); "
            "e = kernels_for('auto', 'cpu').quantize(torch.ones(4, 4), parse_format('int8'), "
            "Granularity.ROW, Rounding.NEAREST, torch.tensor(0)); print(int(e.codes[0, 0]))")
    env = {**os.environ, "LOWBIT_AVX512": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["False", "127"]


def test_build_failure_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:  # noqa: ANN001
    """A compiler that rejects the flags: a warning naming the cause, the kernel not
    used, quantization still the reference's."""
    if avx512.build_flags() is None:
        pytest.skip("the build is only attempted on a CPU with AVX-512, or AVX2 with F16C")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    name = "FLAGS" if avx512.isa() == "avx512" else "AVX2_FLAGS"
    monkeypatch.setattr(avx512, name, (*getattr(avx512, name), "-no-such-flag"))
    avx512._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*no-such-flag.*compiled quantizer runs instead"):
            assert not avx512.available()
        x, seed = torch.randn(40, 40), torch.tensor(3)
        got = kernels_for(Backend.AUTO, "cpu").quantize(x, FORMATS[4], Granularity.ROW, Rounding.STOCHASTIC, seed)
        assert torch.equal(got.codes, reference.quantize(x, FORMATS[4], Granularity.ROW,
                                                         Rounding.STOCHASTIC, seed)[0])
    finally:
        avx512._library.cache_clear()


def test_same_tells_nan_and_inf_from_finite_values() -> None:
    """The comparison the tests and the self-test use: a NaN or ±Inf step that became
    finite (or the reverse) is a difference."""
    a = torch.tensor([1.0, float("nan"), float("inf")])
    assert avx512._same(a, a.clone())
    assert not avx512._same(a, torch.tensor([1.0, 0.5, float("inf")]))
    assert not avx512._same(a, torch.tensor([1.0, float("nan"), torch.finfo(torch.float32).max]))
    assert not avx512._same(a, a.double())


def test_seeds_outside_32_bits_are_refused() -> None:
    """The reference XORs all 64 bits of the seed into the hash; the kernel reads 32:
    a stochastic call with a seed outside [0, 2³²) is not the kernel's (draw_seed never
    makes one). Nearest rounding reads no seed."""
    x, fmt = torch.randn(8, 8), FORMATS[4]
    for seed in (2**32, -1, 2**40):
        assert not avx512.supports(x, fmt, Granularity.ROW, Rounding.STOCHASTIC, torch.tensor(seed))
    assert avx512.supports(x, fmt, Granularity.ROW, Rounding.STOCHASTIC, torch.tensor(2**32 - 1)) \
        == avx512.available()
    assert avx512.supports(x, fmt, Granularity.ROW, Rounding.NEAREST, torch.tensor(2**40)) == avx512.available()


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 5), (17, 33), (300, 513)])
def test_bhq_inverse_bitwise_the_reference(shape: tuple[int, int]) -> None:
    """BHQ's inverse ``S⁻¹(y − 2v·dots[group])`` on the kernel against
    ``bhq._apply_inverse``: a new tensor, or written over ``y`` with ``overwrite``; NaN
    and ±Inf values and a zero scale as the reference; 1–3 threads; and a Linear's and a
    convolution's backward under ``fqt-bhq-8`` bitwise with and without it."""
    from lowbit.quantizers.bhq import _apply_inverse

    g = torch.Generator().manual_seed(shape[0])
    n, d = shape
    y = _operand(shape, g).clamp(-6e4, 6e4)
    y[0, 0] = float("nan")
    y[-1, -1] = float("inf")
    groups = max(1, n // 3)
    group = torch.randint(0, groups, (n,), generator=g)
    scale, v = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.3
    scale[n // 2] = 0.0
    dots = torch.randn(groups, d, generator=g) * 10
    want = _apply_inverse(y, dots, scale, v, group, torch.float32)
    for threads in (1, 3):
        with num_threads(threads):
            assert avx512.supports_bhq_inverse(y, dots, scale, v, group, torch.float32)
            assert _same(avx512.run_bhq_inverse(y, dots, scale, v, group, torch.float32), want)
            y2 = y.clone()
            version = y2._version
            got = avx512.run_bhq_inverse(y2, dots, scale, v, group, torch.float32, True)
            assert got.data_ptr() == y2.data_ptr() and _same(got, want)
            assert y2._version > version  # written over through its pointer: autograd sees it (README row 225)
    assert not avx512.supports_bhq_inverse(y, dots, scale, v, group, torch.bfloat16)
    assert not avx512.supports_bhq_inverse(y.double(), dots.double(), scale.double(), v.double(), group,
                                           torch.float64)


@needs_avx512
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_row_absmax_bitwise_the_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    """The row absmax BHQ's ranges come from, on the kernel, against
    ``reference.row_absmax``: NaN rows stay NaN, ±Inf stay Inf, strided rows, 1–3
    threads; the dispatcher sends it plain rows and keeps the reference elsewhere."""
    g = torch.Generator().manual_seed(shape[1])
    x = _operand(shape, g).clamp(-6e4, 6e4).to(dtype)
    x[0, 0] = float("nan")
    x[-1, -1] = float("-inf")
    for a in (x, x[:, 1:] if shape[1] > 1 else x):
        for threads in (1, 3):
            with num_threads(threads):
                assert avx512.supports_row_absmax(a)
                assert avx512._same(avx512.run_row_absmax(a), reference.row_absmax(a))
                assert avx512._same(kernels_for(Backend.AUTO, "cpu").run("row_absmax", a), reference.row_absmax(a))
    assert not avx512.supports_row_absmax(x.t()) or min(shape) == 1  # columns (unless one row or column)
    assert not avx512.supports_row_absmax(x.double())


def _test_groups(n: int, groups: str, g: torch.Generator) -> object:
    """A user-built ``BlockHouseholder`` of ``n`` rows: ``"two"`` groups of which one holds
    nearly every row (one task does them all), ``"many"`` of ~3 rows, or ids that leave
    groups ``"empty"``; a zero scale."""
    from lowbit.quantizers.bhq import BlockHouseholder

    n_groups = {"two": 2, "many": max(1, n // 3), "empty": n + 5}[groups]
    group = torch.randint(0, n_groups, (n,), generator=g)
    if groups == "two":
        group = (torch.rand(n, generator=g) < 0.02).long()
    scale, v = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.3
    scale[n // 2] = 0.0
    return BlockHouseholder(scale, v, group, n_groups)


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 5), (17, 33), (300, 513), (2048, 96), (40, 64), (9, 130)])
@pytest.mark.parametrize("groups", ["two", "many", "empty"])  # "two": one holds nearly every row
def test_bhq_sums_inverse_bitwise_the_two_ops(shape: tuple[int, int], groups: str) -> None:
    """BHQ's inverse with its own group sums (one kernel, group by group) against the
    reference's two ops, ``sequential_group_sums`` then ``_apply_inverse``: two groups of
    which one holds nearly every row (one task does them all), many, and ids that leave
    groups empty (the text GPT's gradients have ~1,000 groups of ~2 rows); NaN and ±Inf values and a zero scale; 1–3 threads, a new tensor or ``y``
    overwritten; what it cannot take is refused."""
    from lowbit.quantizers.bhq import BlockHouseholder, _apply_inverse, sequential_group_sums

    g = torch.Generator().manual_seed(shape[0] + len(groups))
    n, d = shape
    y = _operand(shape, g).clamp(-6e4, 6e4)
    y[0, 0] = float("nan")
    y[-1, -1] = float("inf")
    t = _test_groups(n, groups, g)
    scale, v, group, n_groups = t.scale, t.v, t.group, t.n_groups
    want = _apply_inverse(y, sequential_group_sums(y, v, t), scale, v, group, torch.float32)
    for threads in (1, 3):
        with num_threads(threads):
            assert avx512.supports_bhq_sums_inverse(y, v, scale, t, torch.float32)
            assert _same(avx512.run_bhq_sums_inverse(y, v, scale, t, torch.float32), want)
            if d > 1:  # rows apart in memory (a row stride past the width: bands of 64 and a tail)
                part = y[:, 1:]
                assert avx512.supports_bhq_sums_inverse(part, v, scale, t, torch.float32)
                assert _same(avx512.run_bhq_sums_inverse(part, v, scale, t, torch.float32),
                             _apply_inverse(part, sequential_group_sums(part, v, t), scale, v, group, torch.float32))
            y2 = y.clone()
            version = y2._version
            got = avx512.run_bhq_sums_inverse(y2, v, scale, t, torch.float32, True)
            assert got.data_ptr() == y2.data_ptr() and _same(got, want)
            assert y2._version > version  # written over through its pointer (README row 225)
    assert not avx512.supports_bhq_sums_inverse(y, v, scale, t, torch.bfloat16)
    assert not avx512.supports_bhq_sums_inverse(y.double(), v.double(), scale.double(),
                                                BlockHouseholder(scale.double(), v.double(), group, n_groups),
                                                torch.float64)
    for wrong in (n_groups, -1):  # an id past the groups, a negative one
        bad = group.clone()
        bad[0] = wrong
        assert not avx512.supports_bhq_sums_inverse(y, v, scale, BlockHouseholder(scale, v, bad, n_groups),
                                                    torch.float32)


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 5), (17, 33), (300, 513), (2048, 96), (2, 40, 64), (3, 9, 130)])
@pytest.mark.parametrize("groups", ["two", "many", "empty"])  # "two": one holds nearly every row
def test_bhq_epilogue_inverse_bitwise_the_two_ops(shape: tuple[int, ...], groups: str) -> None:
    """A GEMM's epilogue and BHQ's inverse in one pass (``lowbit_bhq_epilogue_inverse``)
    against the two ops it replaces, the reference's ``int8_epilogue_into`` then
    ``sequential_group_sums`` and ``_apply_inverse``: per-row and one ``a`` scale, per-column
    and one ``b`` scale, per entry for a batched (B, M, N) product (attention's), a zero, a
    huge and an infinite row scale (NaN and ±Inf outputs), int32 sums up to ±2³¹; groups as
    in the sums-inverse test; 1–3 threads; written over the sums. What it cannot take is refused."""
    from lowbit.quantizers.bhq import BlockHouseholder, _apply_inverse, sequential_group_sums

    g = torch.Generator().manual_seed(sum(shape) + len(groups))
    lead, n = shape[:-2], shape[-1]
    rows = shape[0] if len(shape) == 2 else shape[0] * shape[1]
    acc = torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int32)
    acc.view(-1)[: min(8, acc.numel())] = torch.tensor([0, 1, -1, 2**31 - 1, -2**31, 7, 3, 5],
                                                       dtype=torch.int32)[: min(8, acc.numel())]
    t = _test_groups(rows, groups, g)
    scale, v, group, n_groups = t.scale, t.v, t.group, t.n_groups
    sa_rows = torch.logspace(-12, -8, rows).reshape(*lead, -1, 1)
    sa_rows.view(-1)[0] = 1e30
    sa_rows.view(-1)[-1] = float("inf")
    sb_cols = torch.logspace(-3, 1, n).reshape(*([1] * len(lead)), 1, n)
    sb_entry = (torch.rand(*lead, 1, n, generator=g) + 0.5) * 1e-2 if lead else sb_cols
    for sa in (sa_rows, torch.tensor(3e-9)):
        for sb in (sb_cols, sb_entry, torch.tensor(0.25)):
            mid = reference.int8_epilogue(acc, sa, sb, None, None, None, None, 7, None, torch.float32)
            mid = mid.reshape(rows, n)
            want = _apply_inverse(mid, sequential_group_sums(mid, v, t), scale, v, group, torch.float32)
            for threads in (1, 3):
                with num_threads(threads):
                    a = acc.clone()
                    assert avx512.supports_bhq_epilogue_inverse(a, sa, sb, 7, t, torch.float32)
                    version = a._version
                    got = avx512.run_bhq_epilogue_inverse(a, sa, sb, 7, t, torch.float32)
                    assert got.data_ptr() == a.data_ptr() and a._version > version
                    assert avx512._same(got, want), (sa.shape, sb.shape, threads)
    assert not avx512.supports_bhq_epilogue_inverse(acc, sa_rows, sb_cols, 7, t, torch.bfloat16)
    assert not avx512.supports_bhq_epilogue_inverse(acc.float(), sa_rows, sb_cols, 7, t, torch.float32)
    assert not avx512.supports_bhq_epilogue_inverse(acc, sa_rows.double(), sb_cols, 7, t, torch.float32)
    t64 = BlockHouseholder(scale.double(), v.double(), group, n_groups)
    assert not avx512.supports_bhq_epilogue_inverse(acc, sa_rows, sb_cols, 7, t64, torch.float32)
    short = BlockHouseholder(scale[1:], v[1:], group[1:], n_groups)  # rows other than the product's
    assert not avx512.supports_bhq_epilogue_inverse(acc, sa_rows, sb_cols, 7, short, torch.float32)
    for wrong in (n_groups, -1):  # an id past the groups, a negative one
        bad = group.clone()
        bad[0] = wrong
        assert not avx512.supports_bhq_epilogue_inverse(acc, sa_rows, sb_cols, 7,
                                                        BlockHouseholder(scale, v, bad, n_groups), torch.float32)


@needs_avx512
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("formats", [("int8", "int8", "row"), ("int4", "int8", "tensor"), ("int8", "fp8_e4m3", "row"),
                                     ("int2", "int4", "row")], ids="-".join)
def test_bhq_quantize_pair_bitwise_the_two_kernels(shape: tuple[int, int], formats: tuple[str, str, str]) -> None:
    """BHQ's pair (group by group: a group's sums, its rows' ``T x`` ranges and codes, and
    ``x``'s column ranges from one read; then the columns' codes) against the reference
    op, the group sums and the two quantizations apart on the reference kernels:
    stochastic and nearest, float32 and bfloat16 with NaN and ±Inf, strided rows, groups
    of one to many rows and empty ones, 1–3 threads; what it cannot take is refused."""
    import lowbit.quantizers.bhq as bhq

    fmt_a, fmt_w, gran_w = parse_format(formats[0]), parse_format(formats[1]), Granularity(formats[2])
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    n, d = shape
    x = _operand(shape, g).clamp(-6e4, 6e4)
    x[0, 0] = float("nan")
    x[-1, -1] = float("-inf")
    groups = max(1, n // 3) + 2
    scale, v = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.3
    t = bhq.BlockHouseholder(scale, v, torch.randint(0, groups, (n,), generator=g), groups)
    ref = kernels_for(Backend.REFERENCE, "cpu")
    for a in (x, x.bfloat16(), torch.cat([x, x], 1)[:, :d]):
        for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
            args = (a, t, fmt_a, Granularity.ROW, rnd, torch.tensor(123), fmt_w, gran_w, rnd, torch.tensor(2**32 - 5))
            want = bhq._forward_quantize_pair(ref, *args)
            for threads in (1, 3):
                with num_threads(threads):
                    assert avx512.supports_bhq_pair(*args)
                    assert _same(avx512.run_bhq_quantize_pair(*args), want)
    args = (x, t, fmt_a, Granularity.ROW, Rounding.STOCHASTIC, torch.tensor(1))
    assert not avx512.supports_bhq_pair(*args, parse_format("int4a"), gran_w, Rounding.STOCHASTIC, torch.tensor(1))
    assert not avx512.supports_bhq_pair(*args, fmt_w, gran_w, Rounding.STOCHASTIC, torch.tensor(2**32))
    assert not avx512.supports_bhq_pair(x, t, parse_format("fp8_e4m3"), Granularity.ROW, Rounding.STOCHASTIC,
                                        torch.tensor(1), fmt_w, gran_w, Rounding.STOCHASTIC, torch.tensor(1))
    assert not avx512.supports_bhq_pair(x.double(), t, *args[2:], fmt_w, gran_w, Rounding.STOCHASTIC,
                                        torch.tensor(1))
    t64 = bhq.BlockHouseholder(scale.double(), v.double(), t.group, groups)
    assert not avx512.supports_bhq_pair(x, t64, *args[2:], fmt_w, gran_w, Rounding.STOCHASTIC, torch.tensor(1))


@needs_avx512
@pytest.mark.parametrize("shape", [(1, 5, 3), (4, 16, 16), (6, 17, 70), (3, 40, 513), (64, 2, 31), (5, 1, 9)])
@pytest.mark.parametrize("formats", [("int8", "int8", "row"), ("int4", "int8", "tensor"), ("int8", "fp8_e4m3", "row")],
                         ids="-".join)
def test_bhq_quantize_batched_pair_bitwise_the_two_kernels(shape: tuple[int, int, int],
                                                           formats: tuple[str, str, str]) -> None:
    """BHQ's batched pair (attention's: ``x`` (B·N, D) of B entries; the second operand each
    entry's transpose (B·D, N), its ranges from the rows' group pass, each row's into its
    entry's) against the reference op (BHQ's rows, then the entries' transposes on the
    reference kernels): groups per entry (``bhq_transform`` with the entries) and groups
    across entries, stochastic and nearest, float32 and bfloat16 with NaN and ±Inf,
    strided rows, entries of one row, 1–3 threads; what it cannot take is refused."""
    import lowbit.quantizers.bhq as bhq

    fmt_a, fmt_w, gran_w = parse_format(formats[0]), parse_format(formats[1]), Granularity(formats[2])
    e, n, d = shape
    x, g = _entries_operand(e, n, d)
    scale, v = torch.rand(e * n, generator=g) + 0.5, torch.randn(e * n, generator=g) * 0.3
    groups = max(1, e * n // 3) + 2
    across = bhq.BlockHouseholder(scale, v, torch.randint(0, groups, (e * n,), generator=g), groups)
    ref = kernels_for(Backend.REFERENCE, "cpu")
    for a in (x, x.bfloat16(), torch.cat([x, x], 1)[:, :d]):
        per_entry = bhq.bhq_transform(a.float().nan_to_num(0.0, 1.0, 1.0), kernels_for(Backend.AUTO, "cpu"), e)
        for t in (per_entry, across):
            for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
                args = (a, t, e, fmt_a, Granularity.ROW, rnd, torch.tensor(123), fmt_w, gran_w, rnd,
                        torch.tensor(2**32 - 5))
                want = bhq._forward_quantize_batched_pair(ref, *args)
                assert want[4].shape == (e * d, n)
                for threads in (1, 3):
                    with num_threads(threads):
                        assert avx512.supports_bhq_batched_pair(*args)
                        assert _same(avx512.run_bhq_quantize_batched_pair(*args), want)
    rest = (fmt_a, Granularity.ROW, Rounding.STOCHASTIC, torch.tensor(1), fmt_w, gran_w, Rounding.STOCHASTIC,
            torch.tensor(1))
    assert avx512.supports_bhq_batched_pair(x, across, e, *rest)
    for entries in (0, -1, True, 1.0, e * n + 1 if e * n > 1 else 2):
        assert not avx512.supports_bhq_batched_pair(x, across, entries, *rest)
    assert not avx512.supports_bhq_batched_pair(x, across, e, *rest[:4], parse_format("int4a"), *rest[5:])


def _outcome(f) -> tuple:  # noqa: ANN001
    """``f()``'s tensors, or the type of the error it raised."""
    try:
        out = f()
    except (RuntimeError, ValueError, IndexError) as e:
        return (type(e),)
    return tuple(out) if isinstance(out, tuple) else (out,)


@needs_avx512
@pytest.mark.parametrize("case", ["group longer", "group shorter", "no groups", "id past the groups",
                                  "negative id", "members past the rows", "a row twice", "members of another group",
                                  "descending members", "short crow"])
def test_bhq_kernels_refuse_an_index_they_cannot_trust(case: str) -> None:
    """A user-built ``BlockHouseholder`` whose groups or CSR index do not describe the
    operand's rows is not read by the C kernels (they indexed rows through it: a process
    crash or heap corruption, uninitialised codes — a review): every BHQ entry point
    gives on the fast kernels what it gives on the reference ones, a value or the same
    error."""
    import lowbit.quantizers.bhq as bhq

    n, d = 6, 40
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    scale, v = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.3
    group, n_groups, csr = torch.tensor([0, 1, 0, 2, 1, 0]), 3, None
    good = bhq.BlockHouseholder(scale, v, group, n_groups).csr()
    crow, members = good
    if case == "group longer":
        group = torch.zeros(8, dtype=torch.int64)
    elif case == "group shorter":
        group = torch.zeros(2, dtype=torch.int64)
    elif case == "no groups":
        n_groups = 0
    elif case == "id past the groups":
        group = group.clone()
        group[1] = 5
    elif case == "negative id":
        group = group.clone()
        group[1] = -1
    elif case == "members past the rows":
        csr = (crow, torch.where(members == 5, 10**6, members))
    elif case == "a row twice":
        csr = (crow, torch.where(members == 5, 4, members))
    elif case == "members of another group":
        csr = (crow, members.flip(0))
    elif case == "descending members":
        csr = (crow, torch.cat([members[:3].flip(0), members[3:]]))
    else:  # "short crow"
        csr = (crow[:-1], members)
    fmt, rnd, seed = parse_format("int8"), Rounding.STOCHASTIC, torch.tensor(3)
    results = []
    for backend in (Backend.AUTO, Backend.REFERENCE):
        t = bhq.BlockHouseholder(scale, v, group, n_groups, kernels_for(backend, "cpu"), csr)
        results.append([
            _outcome(lambda t=t: t.forward_quantize(x, fmt, Granularity.ROW, rnd, seed)),
            _outcome(lambda t=t: t.forward_quantize_pair(x, fmt, Granularity.ROW, rnd, seed, fmt, Granularity.ROW,
                                                         rnd, seed)),
            _outcome(lambda t=t: t.inverse(x.clone(), overwrite=True)),
        ])
    for fast, ref in zip(*results, strict=True):
        assert len(fast) == len(ref)
        for a, b in zip(fast, ref, strict=True):
            if isinstance(a, type):
                assert a is b
            else:
                enc = (a, b) if isinstance(a, torch.Tensor) else ((a.codes, b.codes), (a.scale, b.scale))
                pairs = [enc] if isinstance(a, torch.Tensor) else enc
                for u, w in pairs:
                    assert avx512._same(u, w)


@needs_avx512
@pytest.mark.parametrize("case", ["scale replaced", "group replaced", "fewer groups", "more groups",
                                  "group changed in place", "a part of wrong entries", "no rows, a wrong crow",
                                  "v changed in place", "scale changed in place", "v replaced, same values",
                                  "group changed in place in inference mode"])
def test_bhq_kernels_check_a_transform_changed_after_it_was_built(case: str) -> None:
    """A transform :func:`bhq_transform` built (its index trusted, its ``v·s`` and ``2v``
    kept) whose fields a user then replaces or changes in place — also under
    ``torch.inference_mode``, whose tensors keep no version — a part of a user-built one
    whose entries cross its groups, an empty one with a wrong index: the fast kernels give
    the reference's value or error (they indexed by the old index: wrong codes, a crash —
    a review)."""
    import contextlib

    import lowbit.quantizers.bhq as bhq

    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 32, generator=g) * torch.exp(torch.randn(64, 1, generator=g) * 2)
    fmt, rnd, seed = parse_format("int8"), Rounding.NEAREST, torch.tensor(0)
    results = []
    for backend in (Backend.AUTO, Backend.REFERENCE):
        k = kernels_for(backend, "cpu")
        mode = torch.inference_mode() if "inference" in case else contextlib.nullcontext()
        with mode:
            t, y = bhq.bhq_transform(x.clone() if "inference" in case else x, k), x
            t.kernels = k
            t.forward_quantize(y, fmt, Granularity.ROW, rnd, seed)  # (its index checked and memoized)
            if "inference" in case:
                t.group[3] = (t.group[3] + 1) % t.n_groups
        if case == "v changed in place":
            t.v.mul_(3)
        elif case == "scale changed in place":
            t.scale.mul_(0.5)
        elif case == "v replaced, same values":
            t.v = t.v.clone()
        elif "inference" in case:
            pass
        elif case == "scale replaced":
            t.scale = torch.ones(1)
        elif case == "group replaced":
            t.group = torch.zeros(64, dtype=torch.int64)
        elif case == "fewer groups":
            t.n_groups = 1
        elif case == "more groups":
            t.n_groups = 100000
        elif case == "group changed in place":
            t.group[3] = (t.group[3] + 1) % t.n_groups
        elif case == "a part of wrong entries":
            whole = bhq.BlockHouseholder(torch.ones(4), torch.tensor([.5, .5, -.5, -.5]), torch.tensor([0, 1, 0, 1]),
                                         2, k, None, (1, 1))
            whole.forward_quantize(x[:4], fmt, Granularity.ROW, rnd, seed)  # (its own index holds)
            t, y = whole.entries(0, 2), x[:2]
        else:
            e = torch.empty(0)
            t, y = bhq.BlockHouseholder(e, e, torch.empty(0, dtype=torch.int64), 1, k,
                                        (torch.tensor([0, 1 << 20]), torch.empty(0, dtype=torch.int64))), x[:0]
        results.append([
            _outcome(lambda t=t, y=y: t.forward_quantize(y, fmt, Granularity.ROW, rnd, seed)),
            _outcome(lambda t=t, y=y: t.forward_quantize_pair(y, fmt, Granularity.ROW, rnd, seed, fmt,
                                                              Granularity.ROW, rnd, seed)),
            _outcome(lambda t=t, y=y: t.inverse(y.clone(), overwrite=True)),
            _outcome(lambda t=t, y=y, k=k: k.run("bhq_group_sums", y, t.v * t.scale, t)),
        ])
    for fast, ref in zip(*results, strict=True):
        assert len(fast) == len(ref)
        for a, b in zip(fast, ref, strict=True):
            if isinstance(a, type):
                assert a is b
            elif isinstance(a, torch.Tensor):
                assert avx512._same(a, b)
            else:
                assert avx512._same(a.codes, b.codes) and avx512._same(a.scale, b.scale)


@needs_avx512
def test_bhq_kernels_run_under_inference_mode() -> None:
    """Under ``torch.inference_mode`` (inference tensors keep no version counter, which
    the index check reads) BHQ's transform, quantizer and inverse run on the fast kernels
    and equal the reference ones."""
    import lowbit.quantizers.bhq as bhq

    fmt, rnd, seed = parse_format("int8"), Rounding.NEAREST, torch.tensor(0)
    got = []
    with torch.inference_mode():
        x = torch.randn(64, 32) * torch.exp(torch.randn(64, 1))
        y = torch.randn(64, 16)
        for backend in (Backend.AUTO, Backend.REFERENCE):
            k = kernels_for(backend, "cpu")
            t = bhq.bhq_transform(x, k)
            t.kernels = k
            got.append((t.forward_quantize(x, fmt, Granularity.ROW, rnd, seed).codes, t.inverse(y)))
    assert all(avx512._same(a, b) for a, b in zip(*got, strict=True))


@needs_avx512
def test_bhq_inverse_over_rows_sharing_memory_is_not_written_in_place() -> None:
    """``overwrite=True`` on rows that share memory (an expanded ``y``): the kernels do not
    write over them (every row then came out as the last one written: a review)."""
    import lowbit.quantizers.bhq as bhq

    base = torch.randn(1, 8)
    t = bhq.bhq_transform(torch.randn(4, 8) * torch.tensor([[1.0], [100.0], [0.01], [3.0]]),
                          kernels_for(Backend.AUTO, "cpu"))
    ref = bhq.BlockHouseholder(t.scale, t.v, t.group, t.n_groups, kernels_for(Backend.REFERENCE, "cpu"))
    expected = ref.inverse(base.expand(4, 8).clone())
    assert not avx512.supports_bhq_sums_inverse(base.expand(4, 8), t.v, t.scale, t, torch.float32, True)
    assert avx512._same(t.inverse(base.expand(4, 8), overwrite=True), expected)


@needs_avx512
def test_bhq_layers_bitwise_with_and_without_the_native_inverse() -> None:
    """A BHQ-converted CNN's and a GPT-2-style transformer's gradients are the same bits
    whichever kernel runs ``T⁻¹`` on the ``∇X`` products: the epilogue and the inverse in one
    pass (``bhq_epilogue_inverse``: the Linear layers' and attention's integer GEMMs), the
    sums and the inverse in one kernel (``bhq_sums_inverse``: the convolution's, and the
    rest once the first is off), the two ops apart, the reference."""
    import lowbit
    from lowbit.kernels import Impl, register

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(64, 2, batch_first=True)
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.nn.functional.gelu(x + self.attn(x, x, x, need_weights=False)[0]))

    def grads(attention: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        if attention:
            model, x = Block(), torch.randn(4, 128, 64, requires_grad=True)
        else:
            model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(),
                                        torch.nn.Linear(8 * 64, 300), torch.nn.GELU(), torch.nn.Linear(300, 7))
            x = torch.randn(64, 3, 8, 8, requires_grad=True)
        lowbit.convert(model, lowbit.FQTConfig.from_recipe("fqt-bhq-8", seed=2))
        model(x).square().mean().backward()
        return [x.grad, *(p.grad for p in model.parameters())]

    k = kernels_for(Backend.AUTO, "cpu")
    ops = ("bhq_epilogue_inverse", "bhq_sums_inverse", "bhq_inverse")
    saved = {op: k.lookup(op, Impl.NATIVE) for op in ops}
    for attention, first in ((False, (2, 1, 0)), (True, (5, 0, 0))):  # per op, the calls of the first run
        runs = []
        try:
            for off in range(len(ops) + 1):  # the first `off` kernels switched off
                calls = {op: 0 for op in ops}
                for i, op in enumerate(ops):
                    kern = saved[op]

                    def counted(*a, op=op, kern=kern, calls=calls):  # noqa: ANN001, ANN202
                        calls[op] += 1
                        return kern.fn(*a)

                    register(op, Impl.NATIVE, counted, ("cpu",), (lambda *a: False) if i < off else kern.supports)
                runs.append(grads(attention))
                if off == 0:
                    assert tuple(calls.values()) == first, calls
                elif off < len(ops):
                    assert calls[ops[off]] == sum(first), calls  # every ∇X inverse, on the next kernel
        finally:
            for op, kern in saved.items():  # the table's own rows again
                register(op, Impl.NATIVE, kern.fn, ("cpu",), kern.supports)
        for run in runs[1:]:
            assert all(torch.equal(a, b) for a, b in zip(runs[0], run, strict=True))


@needs_avx512
def test_bhq_arguments_it_cannot_read_are_refused() -> None:
    """The C code reads ``scale[r]``, ``v[r]`` and ``dots[group[r]]`` for every row: a
    broadcast (1,) scale, a short ``v``, group ids outside [0, G) (negative ones the
    reference wraps), ``dots`` of another width are refused, and the dispatcher's
    result is still the reference's."""
    from lowbit.kernels import kernels_for
    from lowbit.quantizers.bhq import _forward_quantize

    n, d, groups = 12, 20, 3
    x = torch.randn(n, d)
    ok = {"dots": torch.randn(groups, d), "scale": torch.rand(n) + 0.5, "v": torch.randn(n) * 0.3,
          "group": torch.randint(0, groups, (n,))}
    rest = (FORMATS[4], Granularity.ROW, Rounding.STOCHASTIC, torch.tensor(7))

    def call(**kw: torch.Tensor) -> tuple:
        a = {**ok, **kw}
        return (x, a["dots"], a["scale"], a["v"], a["group"], *rest)

    assert avx512.supports_bhq(*call())
    bad = [{"scale": torch.tensor([1.5])}, {"v": torch.randn(n - 1)},
           {"group": torch.full((n,), groups)}, {"group": torch.full((n,), -1)},
           {"group": torch.full((n,), 1 << 40)}, {"dots": torch.randn(groups, d + 1)},
           {"dots": torch.randn(0, d)}, {"scale": ok["scale"].double()}]
    k = kernels_for("auto", "cpu")
    for kw in bad:
        args = call(**kw)
        assert not avx512.supports_bhq(*args), kw
    args = call(group=torch.full((n,), -1))  # the reference wraps a negative id
    assert _same(k.run("bhq_forward_quantize", *args), _forward_quantize(*args))


@needs_avx512
def test_bhq_infinite_transform_keeps_its_infinite_step() -> None:
    """An infinite scale makes a row's absmax Inf: its step stays non-finite (lanes past
    the row's end are not part of the maximum), as in the reference."""
    from lowbit.quantizers.bhq import _forward_quantize

    n, d = 4, 21  # 21 columns: a tail of 5 lanes
    x, dots = torch.randn(n, d), torch.randn(2, d)
    scale, v, group = torch.tensor([1.0, float("inf"), 2.0, 1.0]), torch.zeros(n), torch.tensor([0, 1, 0, 1])
    args = (x, dots, scale, v, group, FORMATS[4], Granularity.ROW, Rounding.NEAREST, torch.tensor(0))
    got = avx512.bhq_forward_quantize(*args)
    assert _same(got, _forward_quantize(*args)) and torch.isinf(got[1][1])


@needs_avx512
def test_not_used_under_tracing_vmap_or_dispatch_modes() -> None:
    """Under ``make_fx`` (a dispatch mode: the C call would be invisible, the traced graph
    would return uninitialised memory), ``vmap`` (wrapped tensors without storage) and
    ``jit.trace`` the kernel is not chosen; the results are the reference's."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lowbit.kernels import kernels_for

    k, fmt, seed = kernels_for("auto", "cpu"), FORMATS[4], torch.tensor(3)
    x = torch.randn(40, 30)

    def q(t: torch.Tensor) -> torch.Tensor:
        return k.run("quantize", t, fmt, Granularity.ROW, Rounding.STOCHASTIC, seed)[0]

    want = reference.quantize(x, fmt, Granularity.ROW, Rounding.STOCHASTIC, seed)[0]
    assert torch.equal(make_fx(q)(x)(x), want)
    xs = torch.randn(3, 40, 30)
    got = torch.func.vmap(q)(xs)
    assert torch.equal(got, torch.stack([q(t) for t in xs]))
    seen = []
    real = avx512._quantize
    try:
        avx512._quantize = lambda *a: seen.append(1) or real(*a)
        make_fx(q)(x)
        torch.func.vmap(q)(xs)
    finally:
        avx512._quantize = real
    assert not seen


@needs_avx512
def test_weights_as_parameters_use_it() -> None:
    """A layer's weight reaches the quantizer as an ``nn.Parameter`` (inside the layer's
    autograd function, grad mode off): the kernel takes it."""
    w = torch.nn.Parameter(torch.randn(64, 32))
    args = (FORMATS[4], Granularity.TENSOR, Rounding.NEAREST, torch.tensor(0))
    with torch.no_grad():
        assert avx512.supports(w, *args)
        assert _same(avx512.quantize(w, *args), reference.quantize(w.detach(), *args))
    assert not avx512.supports(w, *args)  # recorded by autograd


@needs_avx512
@pytest.mark.parametrize("what", ["default-dtype", "self-test-raises"])
def test_self_test_is_robust_and_a_failure_falls_back(monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """The self-test builds its own float32 CPU data whatever torch's defaults
    (``set_default_dtype(float64)`` crashed every quantization before); any exception in
    it is a warning and the compiled quantizer runs, never an error in training."""
    avx512._library.cache_clear()
    old = torch.get_default_dtype()
    try:
        if what == "default-dtype":
            torch.set_default_dtype(torch.float64)
            assert avx512.available()
        else:
            monkeypatch.setattr(avx512, "_self_test", lambda lib: 1 / 0)
            with pytest.warns(RuntimeWarning, match="self-test failed.*ZeroDivisionError"):
                assert not avx512.available()
        x, seed = torch.randn(30, 20, dtype=torch.float32), torch.tensor(9)
        from lowbit.kernels import kernels_for
        got = kernels_for("auto", "cpu").quantize(x, FORMATS[4], Granularity.ROW, Rounding.STOCHASTIC, seed)
        assert torch.equal(got.codes, reference.quantize(x, FORMATS[4], Granularity.ROW,
                                                         Rounding.STOCHASTIC, seed)[0])
    finally:
        torch.set_default_dtype(old)
        monkeypatch.undo()
        avx512._library.cache_clear()


@needs_avx512
def test_self_test_ignores_the_group_sums_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The group sums' self-test compares with the CPU's definition itself, so building the
    library while ``bhq``'s sparse path is forced (a benchmark toggle, a test) does not
    fail it and switch the whole kernel off (a reviewer's finding)."""
    import lowbit.quantizers.bhq as bhq

    monkeypatch.setattr(bhq, "SEQUENTIAL_DEVICES", frozenset())
    monkeypatch.setattr(bhq, "SPARSE_MIN_NUMEL", 0)
    avx512._library.cache_clear()
    try:
        assert avx512.available()
    finally:
        avx512._library.cache_clear()


def test_in_use_says_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """``in_use()``: ``None`` where lowbit's quantizers run on the kernel, else the
    reason, for each switch (``available()`` only says whether it could run)."""
    from lowbit.kernels import compiled

    assert (avx512.in_use() is None) == (WANTED and compiled.enabled())
    monkeypatch.setattr(compiled, "_enabled", False)
    assert "LOWBIT_COMPILE=0" in avx512.in_use()
    monkeypatch.setattr(compiled, "_enabled", True)
    avx512.set_enabled(False)
    try:
        assert "set_enabled(False)" in avx512.in_use()
    finally:
        avx512.set_enabled(True)
    # the process's decision, made at the first use: the switch set later changes nothing,
    # and in_use says so (a review: it said "switched off" while the kernel kept running)
    before = avx512.in_use()
    monkeypatch.setenv("LOWBIT_AVX512", "0")
    assert avx512.in_use() == before
    try:
        avx512._library.cache_clear()  # a fresh decision, with the switch off
        assert avx512.in_use() == "switched off by LOWBIT_AVX512=0 (read at the kernel's first use in this process)"
        assert not avx512.available()
    finally:
        monkeypatch.delenv("LOWBIT_AVX512")
        avx512._library.cache_clear()
    assert avx512.in_use() == before


@needs_avx512
def test_damaged_cached_library_is_rebuilt(tmp_path) -> None:  # noqa: ANN001
    """A cached ``.so`` that cannot be loaded is named in a warning, rebuilt, and used (in
    fresh processes: overwriting a library a process has loaded would crash that
    process). Three kinds of damage — garbage, a copy cut short (dlopen of that killed
    the process with SIGBUS: a review), four flipped bytes (SIGILL in the self-test) —
    each fail the SHA-256 check that decides a rebuild (checked on copies, no dlopen);
    the rebuild itself runs end to end for the flipped bytes, the damage only a digest
    sees (one rebuild, not one per kind: each is a ≈ 30 s C build)."""
    from lowbit.kernels import cbuild

    env = {**os.environ, "LOWBIT_CACHE_DIR": str(tmp_path)}
    code = ("import warnings; warnings.simplefilter('always'); "
            "from lowbit.kernels import avx512; print(avx512.available())")

    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              check=True, timeout=120)

    assert run().stdout.split() == ["True"]
    (so,) = tmp_path.glob("quant_avx512-*.so")
    good = so.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 3: len(good) // 3 + 4] = b"\xff\xff\xff\xff"
    copies = tmp_path / "copies"
    copies.mkdir()
    for i, content in enumerate((good, b"not an ELF file", good[: len(good) // 2], bytes(flipped))):
        copy = copies / f"{i}-{so.name}"
        copy.write_bytes(content)
        cbuild._digest_file(copy).write_bytes(cbuild._digest_file(so).read_bytes())
        assert cbuild._intact(copy) is (i == 0), i
    so.unlink()
    so.write_bytes(bytes(flipped))
    second = run()
    assert second.stdout.split() == ["True"], second.stderr
    assert "is damaged or of an older lowbit" in second.stderr and "building it again" in second.stderr
    assert so.read_bytes() == good or so.read_bytes()[:4] == b"\x7fELF"
    assert cbuild._intact(so)


@needs_avx512
def test_kernels_bump_the_version_of_what_they_write() -> None:
    """``quantize_part_into`` writes its codes into the caller's ``out`` through its
    pointer: the write bumps ``out``'s version, as an ATen op's would (README fault kind
    225; the epilogues', BHQ's inverses' and softmax's bumps are asserted in their own
    tests)."""
    x = torch.randn(4, 32)
    out = torch.empty(4, 32, dtype=torch.int8)
    version = out._version
    step = avx512.quantize_part_into(x, parse_format("int8"), x.abs().amax().reshape(1), out)
    assert out._version > version and step.shape == (1, 1) and out.abs().max() == 127


@needs_avx512
def test_strided_side_vectors_are_held_for_the_c_call() -> None:
    """A strided vector the C code reads beside the operand (Hadamard's multipliers and
    signs, a per-row dequantization scale) gives the contiguous copy's results, bit for
    bit, call after call: its contiguous copy is held for the call (``t.contiguous()
    .data_ptr()`` inline handed C the address of a temporary freed before it was read —
    a review, README fault kind 230)."""
    from lowbit.quantizers import hadamard as had

    g = torch.Generator().manual_seed(9)
    x = torch.randn(512, 64, generator=g)
    seed, fmt = torch.tensor(77), parse_format(8)
    base = (torch.randint(0, 2, (1024,), generator=g) * 2 - 1).float()
    strided, plain = base[::2], base[::2].contiguous()
    c = float(had._c(16, torch.float32, "cpu"))
    codes = torch.randint(-127, 128, (512, 64), generator=g, dtype=torch.int8)
    scales = torch.rand(1024, generator=g) + 0.5
    for _ in range(20):  # a freed temporary is reused by the next allocations: many tries
        m_s, m_p = (plain * c).repeat_interleave(2)[::2], plain * c
        assert not m_s.is_contiguous()
        got = avx512.hadamard_forward_quantize(x, m_s, 512, 16, had.WIDE, fmt, Granularity.ROW,
                                               Rounding.STOCHASTIC, seed)
        want = avx512.hadamard_forward_quantize(x, m_p, 512, 16, had.WIDE, fmt, Granularity.ROW,
                                                Rounding.STOCHASTIC, seed)
        assert _same(got, want)
        assert avx512._same(avx512.hadamard_forward(x, m_s, 512, 16, had.WIDE),
                            avx512.hadamard_forward(x, m_p, 512, 16, had.WIDE))
        assert avx512._same(avx512.hadamard_inverse(x.clone(), strided, 16, c, had.WIDE, 512),
                            avx512.hadamard_inverse(x.clone(), plain, 16, c, had.WIDE, 512))
        assert avx512._same(avx512._dequantize(avx512._library(), codes, scales[::2], True),
                            avx512._dequantize(avx512._library(), codes, scales[::2].contiguous(), True))


_GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap, sys, torch
from lowbit.formats import Granularity, Rounding, parse_format
from lowbit.kernels import avx512, reference
from lowbit.kernels.im2col import place_codes

assert avx512.available()
page = mmap.PAGESIZE
buf = mmap.mmap(-1, 2 * page)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
if libc.mprotect(base + page, page, 0) != 0:  # PROT_NONE: any byte past the first page faults
    sys.exit("mprotect failed")

def at_page_end(src):
    # a copy of src whose last byte is the first page's last byte
    n = src.numel() * src.element_size()
    t = torch.frombuffer(buf, dtype=src.dtype, count=src.numel(), offset=page - n).view(src.shape)
    t.copy_(src)
    return t

int8, seed = parse_format("int8"), torch.tensor(5)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape in ((3, 13), (1, 1), (2, 33)):
        x = at_page_end(torch.randn(shape).to(dtype))
        for gran in (Granularity.ROW, Granularity.TENSOR):
            want = reference.quantize(x, int8, gran, Rounding.STOCHASTIC, seed)
            got = avx512.quantize(x, int8, gran, Rounding.STOCHASTIC, seed)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (dtype, shape)
            pair = avx512.quantize_pair(x, int8, gran, Rounding.STOCHASTIC, seed, int8, gran,
                                        Rounding.STOCHASTIC, seed)
            assert torch.equal(pair[0], want[0]), (dtype, shape)
        xt = at_page_end(torch.randn(shape[::-1]).to(dtype)).t()  # read column by column
        got = avx512.quantize(xt, int8, Granularity.ROW, Rounding.NEAREST, seed)
        want = reference.quantize(xt, int8, Granularity.ROW, Rounding.NEAREST, seed)
        assert torch.equal(got[0], want[0]), (dtype, shape, "transposed")
acc = at_page_end(torch.randint(-999, 999, (2, 3, 5, 7), dtype=torch.int32))  # (N, H, W, C)
sa, sb = torch.rand(2, 1, 1, 1), torch.rand(1, 1, 1, 7)
got = avx512.epilogue_nchw(acc, sa, sb, None, torch.float32)
assert torch.equal(got, ((acc.float() * sa) * sb).permute(0, 3, 1, 2)), "epilogue"
codes = at_page_end(torch.randint(-128, 128, (2, 3 * 5 * 7), dtype=torch.int8))
got = avx512.place_nhwc(codes, (2, 3, 5, 7), (7, 9), (1, 1))
assert torch.equal(got, place_codes(codes, (2, 3, 5, 7), (7, 9), (1, 1))), "place"
print("ok")
"""


@needs_avx512
def test_the_kernel_reads_nothing_past_its_operands() -> None:
    """Operands whose last byte is the last byte before a page that may not be read
    (``mprotect``, ``PROT_NONE``): float32, bfloat16 and float16 rows and columns with
    tails of every kind, int32 accumulators and int8 codes. A masked load emulated by a
    read of its whole 64 bytes (as SIMDe 0.8.2 does; ``avx512_on_avx2.h`` uses vmaskmov)
    faults there; the kernel gives the reference's values instead. In a child process, so a fault
    is this test's failure, not the run's."""
    out = subprocess.run([sys.executable, "-c", _GUARD_PAGE_SCRIPT], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", (out.returncode, out.stderr[-2000:])


@pytest.mark.parametrize("header", ["missing", "unreadable"])
def test_a_missing_avx2_header_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path, header: str) -> None:  # noqa: ANN001
    """An installation without ``avx512_on_avx2.h`` on an AVX2 CPU (faked here): the
    quantizer warns, names the file, and the compiled quantizer runs; no
    ``FileNotFoundError`` out of a training step (a review: ``build_flags`` read it
    unguarded, so every quantizer call raised)."""
    monkeypatch.setattr(avx512, "isa", lambda: "avx2")
    shim = tmp_path / "avx512_on_avx2.h"
    if header == "unreadable":
        shim.mkdir()  # reading it raises IsADirectoryError, an OSError (a review: no warning then)
    monkeypatch.setattr(avx512, "SHIM", shim)
    avx512._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="avx512_on_avx2.h' is missing from this installation of lowbit or "
                                                "cannot be read"):
            assert not avx512.available()
        assert avx512.build_flags() is None
        x = torch.randn(8, 40, requires_grad=True)
        model = lowbit.convert(nn.Linear(40, 24), lowbit.FQTConfig.from_recipe("fqt-psq-8"))
        model(x).sum().backward()
        assert x.grad is not None and x.grad.isfinite().all()
    finally:
        avx512._library.cache_clear()


@needs_avx512
def test_dispatcher_leaves_to_the_compiled_quantizer_what_it_runs_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """``avx512.prefers``: on the kernel's AVX2 build an integer grid per tensor rounded to
    nearest runs on the compiled quantizer (measured 0.45–0.89× its speed there,
    docs/benchmarks.md), every other call the kernel takes on the kernel; on the AVX-512
    build every such call. The dispatcher follows it (the kernel's profiler scope), and
    the codes are the same bits either way."""
    from torch.profiler import profile

    x, seed = torch.randn(64, 80), torch.tensor(1)
    fp8 = parse_format("fp8_e4m3")
    assert avx512.available() and avx512._fp8_tested()  # built for this CPU before isa() is faked
    for build in ("avx512", "avx2"):
        monkeypatch.setattr(avx512, "isa", lambda build=build: build)
        for fmt in (FORMATS[4], FORMATS[2], fp8):
            for gran in (Granularity.ROW, Granularity.TENSOR):
                for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
                    compiled_faster = build == "avx2" and gran == Granularity.TENSOR and rnd == Rounding.NEAREST \
                        and fmt is not fp8
                    assert avx512.prefers(x, fmt, gran, rnd, seed) == (avx512.supports(x, fmt, gran, rnd, seed)
                                                                      and not compiled_faster)
                    with profile() as prof:
                        got = kernels_for(Backend.AUTO, "cpu").run("quantize", x, fmt, gran, rnd, seed)
                    ran = any(e.name == "lowbit::avx512_quantize" for e in prof.events())
                    assert ran == avx512.prefers(x, fmt, gran, rnd, seed), (build, fmt.name, gran, rnd)
                    assert _same(got, reference.quantize(x, fmt, gran, rnd, seed))


def test_a_negative_view_or_zero_tensor_is_read_by_its_values() -> None:
    """A new user's trial (README fault kind 259): ``z.conj().imag`` is a float32 view
    whose values are the negation of its memory (torch's lazy negative bit); the C
    quantizer read the memory, so every sign came back flipped (``quantize_grad``,
    ``quantize_forward``, each quantizer), and a ``ZeroTensor`` (no memory) crashed the
    process. The C kernels' gates now send both to the compiled or reference kernel, which
    see the values: each quantizer gives on such a view what it gives on a plain copy of
    its values (``resolve_neg``), and an attention mask with the negative bit what its
    resolved copy gives."""
    import lowbit
    from lowbit.functional import quantize_forward
    from lowbit.kernels import cbuild

    torch.manual_seed(0)
    z = torch.complex(torch.randn(1, 300), torch.randn(1, 300))
    g = z.conj().imag  # (1, 300), values = −memory
    views = (g, torch._neg_view(torch.randn(37, 65)), torch._neg_view(torch.randn(65, 37)).t())
    assert all(v.is_neg() for v in views) and not cbuild.plain_memory(g)
    for v in views:
        for name in ("psq", "ptq", "bhq", "hadamard"):
            q = lowbit.get_quantizer(name)
            for rnd in ("nearest", "stochastic"):
                gen = torch.Generator().manual_seed(3) if rnd == "stochastic" else None
                got = q.quantize(v, "int8", gen, rnd, "auto").dequantize()
                gen = torch.Generator().manual_seed(3) if rnd == "stochastic" else None
                want = q.quantize(v.resolve_neg(), "int8", gen, rnd, "auto").dequantize()
                if name == "hadamard":  # the view takes the compiled transform, the copy the C one:
                    # equal to float rounding (README), so codes one or two steps apart at most —
                    # a step is 1/127 of a row's range; the flipped signs were 2× the range off
                    torch.testing.assert_close(got, want, rtol=0, atol=2 / 127 * want.abs().max().item())
                else:
                    assert torch.equal(got, want), (name, rnd, tuple(v.shape))
        fwd = quantize_forward(v, lowbit.OperandSpec(8, "tensor")).dequantize()
        assert torch.equal(fwd, quantize_forward(v.resolve_neg(), lowbit.OperandSpec(8, "tensor")).dequantize())
    zero = torch._efficientzerotensor((3, 5))
    assert torch.equal(lowbit.get_quantizer("psq").quantize(zero, "int8", None, "nearest", "auto").dequantize(),
                       torch.zeros(3, 5))

    from lowbit.attention import scaled_dot_product_attention as sdpa
    qkv = [torch.randn(1, 2, 128, 64) for _ in range(3)]
    cfg = lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=1)
    mask = torch._neg_view(torch.randn(128, 128).clamp(max=0)).reshape(1, 1, 128, 128)
    assert mask.is_neg()
    from lowbit.functional import call_count, set_call_count
    before = call_count()
    try:
        set_call_count(0)
        got = sdpa(*qkv, attn_mask=mask, state=cfg)
        set_call_count(0)
        want = sdpa(*qkv, attn_mask=mask.resolve_neg(), state=cfg)
    finally:
        set_call_count(before)
    assert torch.equal(got, want)
