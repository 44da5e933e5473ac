"""int8 × int8 → int32 GEMMs summed exactly on float32 units, for CPUs without an int8
dot-product instruction.

On an x86 CPU with neither AVX-512 VNNI, AVX-VNNI nor AMX, PyTorch 2.13's
``torch._int_mm`` runs no vectorised kernel: 2.0 GOP/s at 1024³ on 2 threads of an AMD
EPYC (Zen 3, AVX2) where a float32 ``torch.mm`` reaches 165 GFLOP/s (docs/benchmarks.md,
"int8 GEMMs on a CPU without VNNI"). There, lowbit's integer GEMMs take this route: the
codes are cast to float32 and multiplied by ``torch.mm`` / ``torch.bmm`` in pieces of the
summed dimension short enough that every partial sum is an integer below 2²⁴ in
magnitude, so float32 represents each exactly whatever order the GEMM adds in; each
piece is converted to int32 and the pieces added. The result is the exact int32 sum:
bitwise ``torch._int_mm``'s (``tests/core/test_exact_f32.py``), and so every epilogue
after it gives the same bits as on the integer kernels.

The piece length is ``⌊(2²⁴ − 1) / (a_max·b_max)⌋`` terms, with ``a_max``/``b_max`` the
largest code magnitude of each operand (read once per call where ``K`` passes
:data:`SAFE_K` = 1,023, the length exact for any int8 codes): 1,040 for int8 codes in
[−127, 127], 1,032 where one operand holds −128 and 1,023 where both do, the whole sum
for 4-bit codes. Sums of more than :data:`MAX_K` terms are refused, as by every int8
GEMM of lowbit (their int32 result could wrap). It runs as the
ops ``lowbit::int8_mm_f32`` and ``lowbit::int8_bmm_f32``, which ``lowbit.coverage``
counts as int8 GEMMs (their operands are int8 codes and their results the int8 GEMM's
exact sums; :func:`runs` and ``lowbit.kernels.int8.engine()`` say which engine ran).

Convolutions of codes whose sums have at most :data:`SAFE_K` terms (``C/groups·kH·kW``:
every layer of a ResNet-20) run as one float32 convolution of the codes on oneDNN
(``lowbit::int8_conv_f32``, :func:`int_conv`): every partial sum is again an integer
below 2²⁴, so the float32 result is ``float(acc)`` of the exact int32 sums, as oneDNN's
int8 convolution gives it on a CPU with VNNI (``lowbit.kernels.qconv``), without the
(N·H'·W', K) float32 patch matrix of im2col and a GEMM.

The float32 GEMMs must run in IEEE float32 (:func:`float32_gemms_exact`: oneDNN may round
them to bf16 or tf32 under ``torch.set_float32_matmul_precision("medium"/"high")`` on a CPU with such
units — every such CPU has VNNI, so ``auto`` never picks this route there).

Which engine runs (:data:`ENGINE`): ``"auto"`` — this one on the CPU where
:data:`LACKS_INT8_DOT` (an x86-64 CPU reporting none of ``avx512_vnni``,
``avx_vnni``, ``amx_int8``), ``torch._int_mm`` elsewhere; ``"float32"`` — this one on
every CPU (tests, benchmarks); ``"int"`` — never. The environment variable
``LOWBIT_INT8_ENGINE`` sets the default.
"""

from __future__ import annotations

import os

import torch

from . import cbuild, vnni

ENGINES = ("auto", "float32", "int")
# Which engine runs an int8 GEMM on the CPU (module docstring); read at each call.
ENGINE = os.environ.get("LOWBIT_INT8_ENGINE", "auto")
INT8_DOT_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
REDUCED_FLOAT_FLAGS = frozenset({"avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16"})
_EXACT = 2**24 - 1  # float32 holds every integer of at most this magnitude
SAFE_K = _EXACT // (128 * 128)  # 1023: terms of any int8 codes summed exactly in float32
MAX_K = vnni.MAX_K  # the longest exact int32 sum of int8 codes (= int8.MAX_K)


def cpu_lacks_int8_dot(flags: frozenset[str] | None = None) -> bool:
    """Whether this is an x86-64 CPU (Linux ``/proc/cpuinfo``; or one reporting ``flags``)
    with none of :data:`INT8_DOT_FLAGS`: one where ``torch._int_mm`` has no fast kernel.
    ``False`` where the flags cannot be read (other architectures, other systems). Read
    once, at import, into :data:`LACKS_INT8_DOT`."""
    flags = cbuild.cpu_flags() if flags is None else flags
    return bool(flags) and not flags & INT8_DOT_FLAGS


# this CPU's answers, read once here: a call traced by torch.compile reads no file
LACKS_INT8_DOT = cpu_lacks_int8_dot()
# a unit oneDNN may run float32 GEMMs on in bf16, fp16 or tf32-like precision
REDUCED_FLOAT_UNITS = bool(cbuild.cpu_flags() & REDUCED_FLOAT_FLAGS)


def float32_gemms_exact() -> bool:
    """Whether a float32 ``torch.mm`` on the CPU multiplies and adds in IEEE float32 here:
    the CPU has no reduced-precision float unit (:data:`REDUCED_FLOAT_UNITS`), or oneDNN
    is told IEEE float32 — ``torch.backends.mkldnn.matmul.fp32_precision`` ``"ieee"``
    (``"none"``/``"default"``: not overridden; ``torch.set_float32_matmul_precision("high")``
    makes it ``"tf32"``, ``"medium"`` ``"bf16"``); on a torch without that setting,
    ``torch.get_float32_matmul_precision() == "highest"``."""
    if not REDUCED_FLOAT_UNITS:
        return True
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return torch.get_float32_matmul_precision() == "highest"
    return precision in ("none", "ieee", "default")


def float32_convs_exact() -> bool:
    """:func:`float32_gemms_exact` for oneDNN's float32 convolutions
    (``torch.backends.mkldnn.conv.fp32_precision``), and oneDNN is built in: the
    convolution then runs ``aten.mkldnn_convolution``'s direct algorithm (no Winograd, no
    NNPACK), exact on integer values whose partial sums stay below 2²⁴."""
    mkldnn = getattr(torch.backends, "mkldnn", None)
    if mkldnn is None or not mkldnn.is_available() or not hasattr(torch.ops.aten, "mkldnn_convolution"):
        return False
    if not REDUCED_FLOAT_UNITS:
        return True
    precision = getattr(getattr(mkldnn, "conv", None), "fp32_precision", None)
    if precision is None:
        return torch.get_float32_matmul_precision() == "highest"
    return precision in ("none", "ieee", "default")


def runs(device: torch.device | str = "cpu") -> bool:
    """Whether an int8 GEMM on ``device`` takes this module's route under :data:`ENGINE`
    (module docstring): on the CPU only, and only where :func:`float32_gemms_exact`.
    ``ValueError`` for an :data:`ENGINE` outside :data:`ENGINES`, or ``"float32"`` where
    float32 GEMMs may round to bf16, fp16 or tf32 (the sums would not be exact)."""
    if ENGINE not in ENGINES:
        raise ValueError(f"lowbit.kernels.exact_f32.ENGINE (or LOWBIT_INT8_ENGINE) must be one of "
                         f"{', '.join(map(repr, ENGINES))}, got {ENGINE!r}")
    if torch.device(device).type != "cpu" or ENGINE == "int":
        return False
    if ENGINE == "auto":
        return LACKS_INT8_DOT and float32_gemms_exact()
    if not float32_gemms_exact():
        raise ValueError("lowbit.kernels.exact_f32.ENGINE (or LOWBIT_INT8_ENGINE) is 'float32', but the "
                         f"float32 matmul precision ({torch.get_float32_matmul_precision()!r}) lets this CPU "
                         "round float32 GEMMs to bf16/fp16/tf32, so their integer sums would not be exact: use "
                         "torch.set_float32_matmul_precision('highest') or the 'auto' engine")
    return True


def piece_length(a: torch.Tensor, b: torch.Tensor) -> int:
    """The most terms of ``a``'s and ``b``'s codes (int8) whose sum float32 holds
    exactly in any order: ``⌊(2²⁴ − 1) / (a_max·b_max)⌋`` (module docstring); the whole
    length where either operand is all zeros or empty."""
    def mag(t: torch.Tensor) -> int:
        if t.numel() == 0:
            return 0
        lo, hi = torch.aminmax(t)
        return max(-int(lo), int(hi))

    prod = mag(a) * mag(b)
    return max(1, _EXACT // prod) if prod else max(1, a.shape[-1])


def _check(a: torch.Tensor, b: torch.Tensor, batched: bool, name: str) -> None:
    """The rules of every int8 GEMM of lowbit (:func:`.vnni.check_operands`: int8, shapes
    that match, ``K ≤`` :data:`MAX_K`) for a batch, or one product (``batched`` false)."""
    what = f"lowbit::{name}"
    if not batched:
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"{what}: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not match")
        a, b = a[None], b[None]
    vnni.check_operands(a, b, what)


# float32 copies and partial results one torch.bmm of a long sum's pieces may make (8 MiB):
# a CNN's ∇W (16 × 18,480 @ 18,480 × 48) ran as 18 torch.mm of one piece each, 1.15 ms on
# 2 threads, and as one bmm of its 17 whole pieces plus one mm of the rest 0.61 ms
# (docs/benchmarks.md, "The float32 route's long sums")
PIECES_FLOOR = 1 << 21


def pieces_per_call(m: int, n: int, step: int, pieces: int) -> int:
    """How many of the ``pieces`` ``step``-long pieces of an (M, K) × (K, N) sum one
    ``torch.bmm`` takes: as many as keep their float32 copies (``(M + N)·step`` floats a
    piece) and partial results (``M·N`` a piece) within :data:`PIECES_FLOOR` floats; at
    least one (then one ``torch.mm`` a piece, as for a wide product, whose pieces' GEMMs
    are efficient and whose copies would not fit)."""
    per_piece = (m + n) * step + m * n
    return max(1, min(pieces, PIECES_FLOOR // per_piece))


def _sum_batched(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, step: int, per: int) -> torch.Tensor:
    """``out`` (M, N) int32 = the exact sums of ``a`` (M, K) @ ``b`` (K, N), the whole
    ``step``-long pieces ``per`` at a time as one ``torch.bmm`` of their float32 copies
    ((q, M, step) @ (q, step, N)), the last, shorter piece as one ``torch.mm``. Each
    piece's partial sums are integers below 2²⁴ (exact in float32), added into ``out``
    in int32 one piece at a time after the copies are freed (no (q, M, N) temporary
    beside the bmm's result); every running sum is a partial sum of ``K ≤``
    :data:`MAX_K` terms, below 2³¹, so the result is the same exact sum as piece by
    piece."""
    k = a.shape[1]
    whole = k // step
    first = True
    for p0 in range(0, whole, per):
        q = min(per, whole - p0)
        s0, s1 = p0 * step, (p0 + q) * step
        af = a[:, s0:s1].unflatten(1, (q, step)).transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        bf = b[s0:s1].unflatten(0, (q, step)).to(torch.float32, memory_format=torch.contiguous_format)
        parts = torch.bmm(af, bf)
        del af, bf
        for i in range(q):
            if first:
                out.copy_(parts[i])  # integers below 2²⁴: exact in float32 and in int32
            else:
                out.add_(parts[i].to(torch.int32))
            first = False
        del parts  # (no view of it outlives the loop: the next group's copies come after)
    if whole * step < k:  # the last, shorter piece (after at least one whole one)
        out.add_(torch.mm(a[:, whole * step:].float(), b[whole * step:].float()).to(torch.int32))
    return out


def _sum(mm, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` (int32) = the exact sums of ``mm(a, b)`` over the last dimension of ``a``,
    piece by piece (module docstring); the pieces of a single product (``a`` 2-D) several
    to a ``torch.bmm`` where :func:`pieces_per_call` allows."""
    k = a.shape[-1]
    if k == 0 or out.numel() == 0:
        return out.zero_()
    # any int8 codes (|code| ≤ 128) sum exactly over SAFE_K terms: no read of their range
    step = k if k <= SAFE_K else piece_length(a, b)
    if a.dim() == 2 and step < k:
        per = pieces_per_call(a.shape[0], b.shape[1], step, k // step)
        if per > 1:
            return _sum_batched(a, b, out, step, per)
    for s in range(0, k, step):
        part = mm(a[..., s:s + step].float(), b[..., s:s + step, :].float())
        if s == 0:
            out.copy_(part)  # integers below 2²⁴: exact in float32 and in int32
        else:
            out.add_(part.to(torch.int32))
    return out


_LIB = torch.library.Library("lowbit", "FRAGMENT")
_LIB.define("int8_mm_f32(Tensor a, Tensor b) -> Tensor")
_LIB.define("int8_bmm_f32(Tensor a, Tensor b) -> Tensor")


def _mm_cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check(a, b, False, "int8_mm_f32")
    return _sum(torch.mm, a, b, torch.empty(a.shape[0], b.shape[1], dtype=torch.int32, device=a.device))


# float32 copies every batched call may make whatever its result (1 MiB): short products
# (one query row against 512 keys) ran 4-7x slower one entry per torch.bmm (a review)
COPY_FLOOR = 1 << 18


def entries_per_call(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> int:
    """How many batch entries of ``a (B, M, K) @ b (B, K, N)`` one ``torch.bmm`` of their
    float32 copies takes: as many as keep those copies (``(M + N)·K`` floats an entry)
    within the call's own int32 result (``B·M·N``) or :data:`COPY_FLOOR` floats, whichever
    is larger, at least one. Attention's ``P̃·V`` and ``P̃ᵀ·∇O`` had their whole (B, L, S)
    codes copied to float32, the score-sized buffer its pieces exist to avoid (a review,
    2026-12-07); entries are independent, so the sums are the same bits in any grouping."""
    b, m, k = a_shape
    n = b_shape[2]
    per_entry = (m + n) * k
    if per_entry == 0:
        return max(b, 1)
    return max(1, min(b, max(b * m * n, COPY_FLOOR) // per_entry))


def _bmm_cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check(a, b, True, "int8_bmm_f32")
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=torch.int32, device=a.device)
    if out.numel() == 0 or a.shape[2] == 0:
        return out.zero_()
    step = entries_per_call(tuple(a.shape), tuple(b.shape))
    for e in range(0, a.shape[0], step):
        _sum(torch.bmm, a[e:e + step], b[e:e + step], out[e:e + step])
    return out


_LIB.define("int8_conv_f32(Tensor x, Tensor w, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor")


def _check_conv(x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
                groups: int) -> list[int]:
    """``x`` (N, C, H, W) int8 codes or uint8 ``code + 128``, ``w`` (C_out, C/groups, kH,
    kW) int8, summed lengths ``C/groups·kH·kW ≤`` :data:`SAFE_K`, two strides and
    dilations ≥ 1 and paddings ≥ 0, an output of at least one position: its (H', W')
    (the real and the fake kernel refuse alike, naming the op: a review found the fake one
    giving shapes where torch's convolution raises)."""
    what = "lowbit::int8_conv_f32"
    if x.dtype not in (torch.int8, torch.uint8) or w.dtype != torch.int8:
        raise TypeError(f"{what}: needs int8 (or uint8 code + 128) activations and int8 weights, "
                        f"got {x.dtype} and {w.dtype}")
    if x.dim() != 4 or w.dim() != 4 or groups < 1 or x.shape[1] != w.shape[1] * groups or w.shape[0] % groups:
        raise ValueError(f"{what}: shapes {tuple(x.shape)} and {tuple(w.shape)} (groups={groups}) do not match")
    if not (len(stride) == len(padding) == len(dilation) == 2 and min(stride) >= 1 and min(dilation) >= 1
            and min(padding) >= 0):
        raise ValueError(f"{what}: needs two strides and dilations ≥ 1 and two paddings ≥ 0, got stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    k = w.shape[1] * w.shape[2] * w.shape[3]
    if k > SAFE_K:
        raise ValueError(f"{what}: sums of {k} terms (C/groups·kH·kW) can pass 2²⁴, where float32 stops "
                         f"being exact; at most {SAFE_K}")
    size = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (w.shape[2 + i] - 1) - 1) // stride[i] + 1
            for i in range(2)]
    if min(size) < 1:
        raise ValueError(f"{what}: a {tuple(w.shape[2:])} kernel (dilation {dilation}) does not fit the "
                         f"{tuple(x.shape[2:])} input padded by {padding}")
    return size


def _conv_cpu(x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
              groups: int) -> torch.Tensor:
    _check_conv(x, w, stride, padding, dilation, groups)
    xf = x.to(torch.float32, memory_format=torch.channels_last)
    if x.dtype == torch.uint8:
        xf.sub_(128.0)  # code + 128 back to the code: exact
    wf = w.to(torch.float32, memory_format=torch.channels_last)
    # the direct algorithm, whatever torch's backend choice would be (NNPACK's Winograd
    # is not exact): float(acc), channels-last memory
    return torch.ops.aten.mkldnn_convolution(xf, wf, None, padding, stride, dilation, groups)


_LIB.impl("int8_mm_f32", _mm_cpu, "CPU")
_LIB.impl("int8_bmm_f32", _bmm_cpu, "CPU")
_LIB.impl("int8_conv_f32", _conv_cpu, "CPU")


@torch.library.register_fake("lowbit::int8_mm_f32", lib=_LIB)
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check(a, b, False, "int8_mm_f32")
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


@torch.library.register_fake("lowbit::int8_bmm_f32", lib=_LIB)
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check(a, b, True, "int8_bmm_f32")
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.int32)


@torch.library.register_fake("lowbit::int8_conv_f32", lib=_LIB)
def _(x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
      groups: int) -> torch.Tensor:
    size = _check_conv(x, w, stride, padding, dilation, groups)
    return x.new_empty((x.shape[0], w.shape[0], *size), dtype=torch.float32).contiguous(
        memory_format=torch.channels_last)


def int_conv(x: torch.Tensor, w: torch.Tensor, stride: list[int], padding: list[int], dilation: list[int],
             groups: int) -> torch.Tensor:
    """``conv2d(x̂, ŵ)`` of codes as float32 ``float(acc)``, exact (module docstring):
    ``x`` (N, C, H, W) int8 codes, or uint8 holding ``code + 128`` (oneDNN's int8 operand),
    any memory format; ``w`` (C_out, C/groups, kH, kW) int8 → (N, C_out, H', W') float32
    in channels-last memory, as ``lowbit.kernels.qconv.conv_acc`` on the int8 kernel (the
    op ``lowbit::int8_conv_f32``). ``TypeError`` for other dtypes, ``ValueError`` for
    shapes that do not match, sums of more than :data:`SAFE_K` terms, strides or
    dilations below 1, negative padding, or a kernel that does not fit the padded input.
    The caller checks :func:`runs` and :func:`float32_convs_exact`."""
    return torch.ops.lowbit.int8_conv_f32(x, w, list(stride), list(padding), list(dilation), groups)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``: (M, K) × (K, N) int8 CPU tensors, any strides, ``K ≤`` :data:`MAX_K` →
    a new (M, N) int32 tensor of the exact sums (the op ``lowbit::int8_mm_f32``; module
    docstring). ``TypeError`` for other dtypes, ``ValueError`` for shapes that do not
    match or a longer ``K``."""
    return torch.ops.lowbit.int8_mm_f32(a, b)


def int_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[i] @ b[i]`` for each batch entry: (B, M, K) × (B, K, N) int8 CPU tensors → a new
    (B, M, N) int32 tensor of the exact sums (the op ``lowbit::int8_bmm_f32``). Errors as
    :func:`int_mm`."""
    return torch.ops.lowbit.int8_bmm_f32(a, b)


__all__ = ["COPY_FLOOR", "ENGINE", "ENGINES", "INT8_DOT_FLAGS", "entries_per_call", "LACKS_INT8_DOT", "MAX_K",
           "PIECES_FLOOR", "REDUCED_FLOAT_FLAGS", "REDUCED_FLOAT_UNITS", "SAFE_K", "cpu_lacks_int8_dot",
           "float32_convs_exact", "float32_gemms_exact", "int_bmm", "int_conv", "int_mm", "piece_length", "pieces_per_call", "runs"]
