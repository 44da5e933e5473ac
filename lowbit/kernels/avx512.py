"""lowbit's CPU quantizer on AVX-512: ``quantize`` and ``quantize_pair`` for symmetric
integer grids (and a convolution's epilogue).

The compiled (Inductor) quantizer spends about 2 ns per element on the CPU, several
times a pass over memory (docs/benchmarks.md, "lowbit's AVX-512 quantizer"). This
module compiles ``quant_avx512.c`` (:mod:`.cbuild`: the system C compiler on first use,
cached) and runs it where it computes the same thing:

* the operand is a float32, bfloat16 or float16 CPU tensor (R, D) (converted to float32
  exactly, as the reference does), plain or an ``nn.Parameter``, non-empty, whose rows
  or columns are contiguous (a transposed view, such as ``∇Yᵀ`` for ``∇W``, is read
  column by column; its codes are written row-major either way); and nothing traces
  the call: no ``torch.compile``, ``make_fx`` or other dispatch mode (fake tensors
  included), ``jit.trace`` or ``vmap``/``grad`` wrapper (the C call would be invisible
  to them), and autograd does not record the operand (a double backward,
  ``create_graph=True``, differentiates the reference quantizer's steps);
* a stochastic rounding's seed is in [0, 2³²) (what ``draw_seed`` draws);
* the format is a symmetric integer grid (``int2`` … ``int8``) or FP8 (``fp8_e4m3``,
  ``fp8_e5m2``: each element rounded on its binade's spacing, the code the float8 byte;
  a separate self-test at first FP8 use, whose failure leaves FP8 on the compiled
  kernel), one scale per row or per tensor, rounding stochastic or to nearest.

Everything else (MX/NVFP4 blocks, asymmetric grids, predicted ranges, float64)
runs on the compiled or reference kernel as before. The steps are those of
:func:`lowbit.formats.grid_step` on the absmax the C code computes, the codes those of
:func:`lowbit.kernels.reference.quantize` bit for bit: the same IEEE division,
floor, comparison with the same counter-based noise, nearest-even rounding and clamp (the
C file's header gives the arithmetic). One exception: the FP8 codes of a group holding a
NaN (whose step is NaN, so every value dequantizes NaN either way) may be another NaN
bit pattern than the reference's (0xFF against 0x7F on the conv pair's ∇W side). A self-test compares the two on random,
all-zero, non-finite and tail-shaped operands, with one thread and with two, before the
kernel is used; a failed test, a missing compiler or a failed build is a
``RuntimeWarning`` and the compiled kernel runs instead. ``LOWBIT_AVX512=0`` turns it
off; so does ``LOWBIT_COMPILE=0`` (it runs where the dispatcher may use fused kernels).
It needs x86-64 Linux and a CPU with AVX-512 F/BW/DQ/VL, or with AVX2 and F16C: there
the same C file is built with each 512-bit intrinsic computed on two 256-bit halves
(``avx512_on_avx2.h``; :func:`isa`, :func:`build_flags`), the same values lane for lane,
and the same self-test decides whether it runs.

:func:`quantize_pair` quantizes an output gradient ``∇Y`` (N, out) both ways from one
read (:mod:`lowbit.gradpair`): the row codes (N, out) and the codes of ``∇Yᵀ`` written
row-major (out, N), the layout lowbit's AMX GEMM reads directly for ``∇W``.
:func:`quantize_batched_pair` does it for each entry of a batch (B, N, out) (attention's
``∇O`` and ``∇S``; the noise indices run on across entries), in the same two C calls with
a batch dimension (the ranges: whole entries per thread where there are at least as
many entries as threads, else each entry's rows split; the codes: (entry, 256-row
block) tiles spread over the threads). :func:`quantize_conv_pair` does the same for a convolution's ``∇Y`` (N, C_out, L): the
codes of (N, C_out·L) for ``∇X`` and of its channels (C_out, N·L) for ``∇W``, each
(sample, channel) segment read once for both ranges and once for both codes, where the
separate ``∇W`` quantizer first copied ``∇Y`` into channel-major order.

:func:`epilogue_nchw` is a convolution's epilogue: oneDNN's channels-last accumulator
(N, H', W', C) (or an ``_int_mm`` one) scaled to the layer's NCHW output, ``(float(acc)·s_a)·s_b
(+ bias)`` per element as the reference computes it, written transposed in 16 × 16
tiles (float32 output; the compiled epilogue runs the rest).

:func:`place_nhwc` places a convolution's row-major int8 codes (N, C·H·W) channels-last
(padded, zero-inserted, or as the uint8 ``code + 128`` oneDNN's convolution reads),
16 channels × 16 positions transposed in registers, where torch's strided copy moves one
byte at a time: the bytes of :func:`lowbit.kernels.im2col.place_codes`.

:func:`hadamard_forward_quantize` and :func:`hadamard_inverse` run the randomized block
Hadamard quantizer's transform (:mod:`lowbit.quantizers.hadamard`: signs, then the fast
Walsh–Hadamard butterflies) fused with the row quantizer, and its inverse on a GEMM's
output: each block of rows read once into a per-thread tile buffer, the reference's
floats bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import warnings
from collections.abc import Sequence
from typing import Any
from pathlib import Path

import torch
from ..scopes import scope
from torch.utils._python_dispatch import _disable_current_modes

from ..formats import FloatFormat, Format, Granularity, IntFormat, Rounding, grid_step
from . import cbuild, compiled
from ..userframe import user_stacklevel

SOURCE = Path(__file__).with_name("quant_avx512.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-mavx512f", "-mavx512bw",
         "-mavx512dq", "-mavx512vl")
CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl"})
# the same source on AVX2: each 512-bit intrinsic on two 256-bit halves (avx512_on_avx2.h);
# F16C for float16 operands (the C file has no fused multiply-add: no FMA needed)
SHIM = Path(__file__).with_name("avx512_on_avx2.h")
AVX2_FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-mavx2", "-mf16c")
AVX2_CPU_FLAGS = frozenset({"avx2", "f16c"})
_enabled = True  # the process-wide switch of set_enabled

_P, _I64, _I, _U32, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_float
_SIGNATURES = {
    "lowbit_row_absmax": [_P, _I, _I64, _I64, _I64, _P, _I],
    "lowbit_pair_absmax": [_P, _I, _I64, _I64, _I64, _I64, _I64, _P, _P, _P, _I],
    "lowbit_quantize_rows": [_P, _I, _I64, _I64, _I64, _P, _I64, _U32, _I, _F, _P, _I],
    "lowbit_quantize_pair": [_P, _I, _I64, _I64, _I64, _I64, _I64, _P, _I64, _U32, _I, _F, _P,
                             _P, _I64, _U32, _I, _F, _P, _I64, _I],
    "lowbit_seg_absmax": [_P, _I, _I64, _I64, _I64, _I64, _I64, _P, _I],
    "lowbit_seg_quantize_pair": [_P, _I, _I64, _I64, _I64, _I64, _I64, _P, _I64, _U32, _I, _F, _P,
                                 _P, _I64, _U32, _I, _F, _P, _I],
    "lowbit_seg_absmax_cl": [_P, _I, _I64, _I64, _I64, _I64, _I64, _P, _I],
    "lowbit_seg_quantize_pair_cl": [_P, _I, _I64, _I64, _I64, _I64, _I64, _P, _I64, _U32, _I, _F, _P,
                                    _P, _I64, _U32, _I, _F, _P, _I],
    "lowbit_epilogue_nchw": [_P, _I, _I64, _I64, _I64, _P, _I64, _P, _I64, _P, _P, _I, _I],
    "lowbit_epilogue_nhwc": [_P, _I, _I64, _I64, _I64, _P, _I64, _P, _I64, _P, _P, _I, _I],
    "lowbit_place_nhwc": [_P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _I64, _I, _I],
    "lowbit_epilogue_rows": [_P, _I64, _I64, _I64, _P, _I, _P, _I, _I64, _P, _I],
    "lowbit_grid_steps": [_P, _I64, _I, ctypes.c_double, ctypes.c_double, _P, _P],
    "lowbit_bhq_absmax": [_P, _I, _I64, _I64, _I64, _P, _P, _P, _P, _P, _I],
    "lowbit_bhq_inverse_rows": [_P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _I64, _I],
    "lowbit_bhq_group_sums": [_P, _I, _I64, _I64, _P, _P, _P, _I64, _P, _I],
    "lowbit_csr_ok": [_P, _P, _I64, _I64],
    "lowbit_bhq_sums_inverse": [_P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _P, _I64, _I],
    "lowbit_bhq_epilogue_inverse": [_P, _I64, _I64, _P, _I, _P, _I, _I64, _P, _P, _P, _P, _P, _I64, _I],
    "lowbit_bhq_group_quantize": [_P, _I, _I64, _I64, _I64, _P, _P, _P, _P, _P, _I64, ctypes.c_double,
                                  ctypes.c_double, _U32, _I, _F, _P, _P, _P, _I64, _P, _I],
    "lowbit_bhq_quantize_rows": [_P, _I, _I64, _I64, _I64, _P, _P, _P, _P, _P, _I64, _U32, _I, _F,
                                 _P, _I],
    "lowbit_had_quantize": [_P, _I, _I64, _I64, _I64, _I64, _I64, _P, _F, _F, ctypes.c_double, ctypes.c_double,
                            _U32, _I, _F, _P, _P, _P, _I64, _P, _I],
    "lowbit_had_inverse": [_P, _I64, _I64, _I64, _I64, _F, _P, _F, _F, _P, _I64, _I64, _I],
    "lowbit_had_forward": [_P, _I, _I64, _I64, _I64, _I64, _I64, _P, _P, _F, _F, _P, _I64, _I],
    "lowbit_dequantize_rows": [_P, _I64, _I64, _P, _I, _P, _I],
    "lowbit_cl_rows": [_P, _I64, _I64, _I64, _I64, _P, _I],
}
_RESTYPES = {"lowbit_had_quantize": ctypes.c_int, "lowbit_had_inverse": ctypes.c_int,
             "lowbit_had_forward": ctypes.c_int, "lowbit_csr_ok": ctypes.c_int}


def _check_csr(lib: ctypes.CDLL, crow: torch.Tensor, members: torch.Tensor, n_groups: int, rows: int) -> None:
    """``RuntimeError`` unless the C kernels may read ``rows`` rows through the CSR index
    (``lowbit_csr_ok``: ``crow`` from 0 to ``rows``, non-decreasing, ``members`` each row
    once; O(N + G) before each kernel that indexes by it; contiguous int64 ``crow`` of
    ``n_groups + 1`` and ``members`` of ``rows`` entries, as ``BlockHouseholder.index_ok``
    checked their shapes). A value changed where no version counter sees it (through
    ``.data`` or ``.numpy()``) made a kernel read and write outside its tensors, or leave
    a row's results uninitialised (reviews): now it is refused."""
    ok = lib.lowbit_csr_ok(crow.data_ptr(), members.data_ptr(), n_groups, rows)
    if ok < 0:
        raise MemoryError(f"lowbit: no memory for the {rows}-byte scratch of BHQ's index check")
    if not ok:
        raise RuntimeError("lowbit: a BHQ transform's group index (crow, members) was changed where its version "
                           "counter does not see it (through .data or .numpy()); its C kernels cannot read rows "
                           "through it. Build the transform again (lowbit.quantizers.bhq.bhq_transform)")


# HELD_FOR_C: a tensor whose address a C call reads is bound to a name for the call —
# ``t.contiguous().data_ptr()`` inline handed C the address of a temporary copy (of a
# strided ``t``) that was freed as soon as ``data_ptr()`` returned: the C code read freed
# memory (a review, 2026-12-06; README fault kind 230).

# the operand dtypes the C code reads (each converted to float32 exactly, as the
# reference's x.to(float32)), by the code it takes
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def cpu_has_avx512() -> bool:
    """Whether this CPU reports AVX-512 F, BW, DQ and VL (Linux ``/proc/cpuinfo``)."""
    return CPU_FLAGS <= cbuild.cpu_flags()


@functools.cache
def isa() -> str | None:
    """Which build of the kernel this CPU takes: ``"avx512"`` (AVX-512 F/BW/DQ/VL: the
    intrinsics as written), ``"avx2"`` (AVX2 and F16C but not those: each 512-bit
    intrinsic on two 256-bit halves, :data:`SHIM`), else ``None`` (no build). Read once
    per process (the dispatcher asks at every quantizer call)."""
    if cpu_has_avx512():
        return "avx512"
    return "avx2" if AVX2_CPU_FLAGS <= cbuild.cpu_flags() else None


def _shim_digest() -> str | OSError:
    """The first 16 hex digits of :data:`SHIM`'s SHA-256, or the ``OSError`` reading it
    raised (an installation that did not ship ``lowbit/kernels/*.h``, a file it may not
    read)."""
    try:
        return hashlib.sha256(SHIM.read_bytes()).hexdigest()[:16]
    except OSError as e:
        return e


def missing_shim() -> str | None:
    """Why this CPU's build cannot be made though the CPU could run it (the AVX2 build
    without a readable :data:`SHIM`), else ``None``."""
    digest = _shim_digest() if isa() == "avx2" else ""
    if not isinstance(digest, OSError):
        return None
    return (f"the AVX2 build's header {str(SHIM)!r} is missing from this installation of lowbit or cannot "
            f"be read ({digest.strerror or digest}; reinstall it: the package must ship lowbit/kernels/*.h)")


def build_flags() -> tuple[str, ...] | None:
    """The C compiler's flags for this CPU's build (:func:`isa`): :data:`FLAGS`, or
    :data:`AVX2_FLAGS` with the shim (:data:`SHIM`) and its SHA-256 as a macro (the cache
    key hashes the source and the flags, not the header: a changed shim is a new build);
    ``None`` where there is no build: no such CPU, or the shim missing from this
    installation (:func:`missing_shim` names it)."""
    which = isa()
    if which is None:
        return None
    if which == "avx512":
        return FLAGS
    digest = _shim_digest()  # (the C file includes it by a quoted name: found beside the source, no -I)
    if isinstance(digest, OSError):  # no AVX2 build (missing_shim says why)
        return None
    return AVX2_FLAGS + ("-DLOWBIT_AVX2_SHIM", f"-DLOWBIT_SHIM_SHA256={digest}")


def _warn(why: str, then: str | None = None) -> None:
    warnings.warn(f"lowbit: {why}; {then or 'the compiled quantizer runs instead'} (AVX-512 "
                  "quantizer, lowbit.kernels.avx512)", RuntimeWarning, stacklevel=user_stacklevel())


_switched_off = False  # LOWBIT_AVX512 said off when _library decided (once per process)


@cbuild.once
@compiled.disable_tracing
def _library() -> ctypes.CDLL | None:
    """The loaded, self-tested library, or ``None`` (module docstring). Decided once per
    process: ``LOWBIT_AVX512`` is read at the first use."""
    global _switched_off
    _switched_off = cbuild.switched_off("LOWBIT_AVX512")
    if _switched_off:
        return None
    flags = build_flags()
    if flags is None:
        if why := missing_shim():
            _warn(why)
        return None
    with _disable_current_modes():
        what = "AVX-512 quantizer" if flags is FLAGS else "AVX-512 quantizer's AVX2 build"
        return cbuild.load_tested(SOURCE, flags, _SIGNATURES, _warn, what, _self_test,
                                  "the reference quantizer", _RESTYPES)


def available() -> bool:
    """Whether the kernel can run on this machine (module docstring); builds and
    self-tests it on the first call (≈ 1 s with an empty cache). Whether lowbit's
    quantizers use it is :func:`in_use`."""
    return _library() is not None


def in_use() -> str | None:
    """``None`` when lowbit's quantizers run on this kernel where it applies, else why
    not: switched off (``LOWBIT_AVX512=0``, :func:`set_enabled`), fused kernels off
    (``LOWBIT_COMPILE=0``: the reference quantizers run), or not available here (neither
    AVX-512 nor AVX2/F16C, no compiler, a failed build or self-test, the AVX2 build's
    header missing: a warning said which). It reports
    the process's decision, not the environment as it is now (a review: ``LOWBIT_AVX512``
    set after the first use was reported as switching the kernel off, which kept running)."""
    if not compiled.enabled():
        return "fused kernels are off (LOWBIT_COMPILE=0 or compiled.set_enabled(False)): the reference quantizers run"
    if not _enabled:
        return "switched off by lowbit.kernels.avx512.set_enabled(False)"
    # the decision once made (LOWBIT_AVX512 read then), else the switch as the first use will
    # read it — without building the kernel to find out (a review of the fix)
    if _switched_off if _library.decided() else cbuild.switched_off("LOWBIT_AVX512"):  # type: ignore[attr-defined]
        return "switched off by LOWBIT_AVX512=0 (read at the kernel's first use in this process)"
    if isa() is None:
        return "this CPU lacks AVX-512 F/BW/DQ/VL and AVX2/F16C"
    if not available():
        return "the kernel could not be built or failed its self-test (see the warning)"
    return None


def set_enabled(flag: bool) -> None:
    """Use the kernel where it applies (``True``, the default) or never (``False``: the
    compiled quantizer runs instead; for tests and A/B benchmarks). Process-wide."""
    global _enabled
    _enabled = bool(flag)


def _int_grid(fmt: Format) -> bool:
    return isinstance(fmt, IntFormat) and not fmt.asymmetric and not fmt.block \
        and fmt.code_dtype == torch.int8


_FP8_KINDS = {"e4m3": 1, "e5m2": 2}  # the C code's grid kinds (codes16's mode bits 1-2)


def _kind(fmt: Format) -> int | None:
    """The C code's grid kind of ``fmt``: 0 a symmetric integer grid, 1 E4M3, 2 E5M2 (FP8
    with one float scale per row or tensor); None for what it does not compute (block,
    asymmetric formats)."""
    if _int_grid(fmt):
        return 0
    if isinstance(fmt, FloatFormat) and not fmt.block:
        return _FP8_KINDS.get(fmt.element.name)
    return None


def _grid(fmt: Format) -> int | None:
    """:func:`_kind` where the kernel takes it: FP8 grids once their self-test passed."""
    kind = _kind(fmt)
    return kind if kind == 0 or (kind is not None and _fp8_tested()) else None


@functools.cache
@compiled.disable_tracing
def _fp8_tested() -> bool:
    """The FP8 grids passed their own self-test (:func:`_fp8_self_test`; a failure is a
    warning, and FP8 formats then take the compiled quantizer; integer grids are not
    affected)."""
    lib = _library()
    if lib is None:
        return False
    with _disable_current_modes():
        return cbuild.self_tested(lambda: _fp8_self_test(lib), lambda why, then: _warn(why, "FP8 formats "
                                  "take the compiled quantizer"), "AVX-512 quantizer's FP8 rounding",
                                  "the reference quantizer")


def _mode(fmt: Format, rounding: Rounding) -> int:
    """codes16's mode: bit 0 stochastic rounding, bits 1-2 the grid kind (:func:`_grid`)."""
    return int(rounding is Rounding.STOCHASTIC) | (_kind(fmt) << 1)  # type: ignore[operator]


def _rows_contiguous(x: torch.Tensor) -> bool:
    return x.shape[1] <= 1 or x.stride(1) == 1


# The C kernels count elements in 32 bits; lowbit.noise.counter_uniform salts the noise of
# elements from 2³² on, which only the reference computes: larger operands (or parts of
# one, ``first`` included) run there.
NOISE_PERIOD = 1 << 32


def _operand_ok(x: torch.Tensor) -> bool:
    """A plain (or ``Parameter``) strided CPU tensor the C code can read as it is, outside
    any tracing: no ``torch.compile``, ``make_fx``/fake-tensor or other dispatch mode
    (the C call would be invisible to it), no ``jit.trace``, no ``vmap``/``grad``
    wrapper, and not recorded by autograd (a double backward differentiates the
    reference quantizer's steps)."""
    return x.dim() == 2 and (_rows_contiguous(x) or x.shape[0] <= 1 or x.stride(0) == 1) \
        and _readable(x)


def _readable(x: torch.Tensor, dtypes: object = DTYPES) -> bool:
    """:func:`_operand_ok` but for the shape: a non-empty plain strided CPU tensor of at
    most :data:`NOISE_PERIOD` elements, of a dtype the C code reads (one of ``dtypes``),
    outside any tracing."""
    return (type(x) in (torch.Tensor, torch.nn.Parameter) and x.layout == torch.strided
            and x.device.type == "cpu" and x.dtype in dtypes and 0 < x.numel() <= NOISE_PERIOD  # type: ignore[operator]
            and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and torch._C._len_torch_dispatch_stack() == 0
            and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and not (x.requires_grad and torch.is_grad_enabled()) and cbuild.plain_memory(x))


def _seed_ok(seed: torch.Tensor, rounding: Rounding) -> bool:
    """A stochastic rounding's seed is a one-element integer tensor in [0, 2³²) (what
    :func:`lowbit.noise.draw_seed` draws; the reference XORs all 64 bits)."""
    if rounding is not Rounding.STOCHASTIC:
        return True
    return (isinstance(seed, torch.Tensor) and seed.numel() == 1 and not seed.is_floating_point()
            and 0 <= int(seed) < 2**32)


def _check(what: str, ok: bool, detail: str) -> None:
    """``RuntimeError`` naming the call when the kernel does not take it."""
    if not ok:
        raise RuntimeError(f"lowbit.kernels.avx512.{what} does not take this call ({detail}, "
                           f"kernel available: {_library() is not None})")


def supports(x: torch.Tensor, fmt: Format, granularity: Granularity, rounding: Rounding,
             seed: torch.Tensor) -> bool:
    """Whether :func:`quantize` takes this call (module docstring) and the kernel is
    available."""
    return _operand_ok(x) and _grid(fmt) is not None and granularity in (Granularity.ROW, Granularity.TENSOR) \
        and rounding in (Rounding.STOCHASTIC, Rounding.NEAREST) and _seed_ok(seed, rounding) \
        and _enabled and available()


def prefers(x: torch.Tensor, fmt: Format, granularity: Granularity, rounding: Rounding,
            seed: torch.Tensor) -> bool:
    """:func:`supports`, less the calls the compiled quantizer runs faster (the
    dispatcher's choice; the codes are the same bits either way): on the AVX2 build
    (:func:`isa`), an integer grid per tensor rounded to nearest — 0.48–0.89× the
    compiled kernel's speed there, against 1.3–3.9× for every other kind of call
    (docs/benchmarks.md, "lowbit's C kernels on AVX2 CPUs")."""
    return supports(x, fmt, granularity, rounding, seed) and not (
        granularity == Granularity.TENSOR and rounding == Rounding.NEAREST and _kind(fmt) == 0
        and isa() == "avx2")


def supports_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                  seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                  seed_w: torch.Tensor) -> bool:
    """Whether :func:`quantize_pair` takes this call: both paths as :func:`supports`,
    and ``g``'s rows contiguous."""
    return supports(g, fmt_a, gran_a, rnd_a, seed_a) and _rows_contiguous(g) and _grid(fmt_w) is not None \
        and gran_w in (Granularity.ROW, Granularity.TENSOR) \
        and rnd_w in (Rounding.STOCHASTIC, Rounding.NEAREST) and _seed_ok(seed_w, rnd_w)


def _q_hi(qmax: float) -> float:
    """``grid_step``'s bound for a grid of ``qmax`` (``qmax`` plus half an ulp of it in
    float32: the step is the smallest float32 ``d`` with ``d · q_hi ≥ amax``), as the C
    code's ``grid_step1`` takes it with its inverse."""
    return qmax + 2.0 ** (math.frexp(qmax)[1] - 25)


def _steps(lib: ctypes.CDLL, amax: torch.Tensor, fmt: Format, granularity: Granularity
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(step, divisor) of each group from the per-row (or per-column) absmax (R, 1)
    float32: ``grid_step`` of the group's absmax (per tensor: of their maximum, NaN
    propagating), and the divisor (1 for an all-zero group) — in one C call
    (``lowbit_grid_steps``, bit for bit :func:`lowbit.formats.grid_step`'s float32 path),
    where the dozen small torch ops of ``grid_step`` cost 90–270 µs per quantization."""
    amax = amax.contiguous()
    rows = 1 if granularity is Granularity.TENSOR else amax.shape[0]
    step = torch.empty(rows, 1, dtype=torch.float32, device="cpu")
    div = torch.empty(rows, 1, dtype=torch.float32, device="cpu")
    q_hi = _q_hi(float(fmt.emax))
    lib.lowbit_grid_steps(amax.data_ptr(), amax.numel(), int(granularity is Granularity.TENSOR), q_hi,
                          1.0 / q_hi, step.data_ptr(), div.data_ptr())
    return step, div


def _seed(seed: torch.Tensor, rounding: Rounding) -> int:
    return int(seed) & 0xFFFFFFFF if rounding is Rounding.STOCHASTIC else 0


@compiled.disable_tracing
def _quantize(lib: ctypes.CDLL, x: torch.Tensor, fmt: Format, granularity: Granularity,
              rounding: Rounding, seed: torch.Tensor, threads: int) -> tuple[torch.Tensor, ...]:
    r, d = x.shape
    amax = torch.empty(r, 1, dtype=torch.float32, device="cpu")
    codes = torch.empty(r, d, dtype=torch.int8, device="cpu")
    sr, seed32, dt = _mode(fmt, rounding), _seed(seed, rounding), DTYPES[x.dtype]
    if _rows_contiguous(x):
        lib.lowbit_row_absmax(x.data_ptr(), dt, r, d, x.stride(0), amax.data_ptr(), threads)
        step, div = _steps(lib, amax, fmt, granularity)
        lib.lowbit_quantize_rows(x.data_ptr(), dt, r, d, x.stride(0), div.data_ptr(),
                                 1 if div.shape[0] > 1 else 0, seed32, sr, float(fmt.emax),
                                 codes.data_ptr(), threads)
        return codes.view(fmt.code_dtype), step
    # column-major x (a transposed view, e.g. ∇Yᵀ for ∇W): its rows are the columns of
    # m = xᵀ (d, r), which has contiguous rows; the pair kernel's column path, codes
    # written row-major (r, d)
    m = x.t()
    scratch = torch.empty(max(threads, 1) * r, dtype=torch.float32, device="cpu")
    lib.lowbit_pair_absmax(m.data_ptr(), dt, 1, 0, d, r, m.stride(0), None, amax.data_ptr(),
                           scratch.data_ptr(), threads)
    step, div = _steps(lib, amax, fmt, granularity)
    lib.lowbit_quantize_pair(m.data_ptr(), dt, 1, 0, d, r, m.stride(0), None, 0, 0, 0, 0.0, None,
                             div.data_ptr(), 1 if div.shape[0] > 1 else 0, seed32, sr,
                             float(fmt.emax), codes.data_ptr(), 0, threads)
    return codes.view(fmt.code_dtype), step


def quantize_part_into(x: torch.Tensor, fmt: Format, amax: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest codes of ``x`` (R, D) float32 with contiguous rows, a part of a
    larger operand quantized per tensor whose absmax over all its parts is ``amax`` (a
    one-element float32 tensor), written into ``out`` (R, D) contiguous, of the format's
    code dtype (int8, or the FP8 dtype): bitwise the
    codes :func:`quantize` gives those rows when it quantizes the whole operand per
    tensor (the same step, :func:`_steps` of ``amax``, and the same rounding). Returns the
    step (1, 1). ``RuntimeError`` where :func:`supports` refuses ``x`` per tensor
    round-to-nearest or ``out`` is not such a buffer."""
    _check("quantize_part_into", supports(x, fmt, Granularity.TENSOR, Rounding.NEAREST, torch.zeros((), dtype=torch.int64))
           and _rows_contiguous(x) and out.dtype == fmt.code_dtype and out.is_contiguous()
           and out.shape == x.shape and amax.numel() == 1 and amax.dtype == torch.float32,
           f"{fmt.name}, {x.dtype} {tuple(x.stride())} strides, out {out.dtype} {tuple(out.shape)}")
    lib, (r, d) = _library(), x.shape
    with scope("lowbit::avx512_quantize"):
        step, div = _steps(lib, amax.reshape(1, 1).to("cpu"), fmt, Granularity.TENSOR)
        lib.lowbit_quantize_rows(x.data_ptr(), DTYPES[x.dtype], r, d, x.stride(0), div.data_ptr(), 0, 0,
                                 _mode(fmt, Rounding.NEAREST), float(fmt.emax), out.data_ptr(),
                                 torch.get_num_threads())
    torch.autograd.graph.increment_version(out)  # written through its pointer
    return step


def quantize(x: torch.Tensor, fmt: Format, granularity: Granularity, rounding: Rounding,
             seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
    """:func:`lowbit.kernels.reference.quantize` of a float32/bfloat16/float16 (R, D) ``x`` with
    contiguous rows on a symmetric integer grid (:func:`supports`): ``(codes (R, D) int8
    row-major, step (R, 1) or (1, 1) float32, None, None)``, bitwise the reference's.
    ``seed``: 0-d int64 tensor in [0, 2³²) (read for stochastic rounding only). Uses
    ``torch.get_num_threads()`` threads. ``RuntimeError`` where :func:`supports` is
    false."""
    _check("quantize", supports(x, fmt, granularity, rounding, seed),
             f"{fmt.name}, {granularity.value}, {rounding.value}, {x.dtype} "
             f"{tuple(x.stride())} strides on {x.device}")
    return run_quantize(x, fmt, granularity, rounding, seed)


def run_quantize(x: torch.Tensor, fmt: Format, granularity: Granularity, rounding: Rounding,
                 seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
    """:func:`quantize` without its checks: the dispatcher's kernel, called only after
    :func:`supports` said yes (the checks are not paid twice per call)."""
    with scope("lowbit::avx512_quantize"):  # the C time, visible to the profiler
        codes, step = _quantize(_library(), x, fmt, granularity, rounding, seed, torch.get_num_threads())
    return codes, step, None, None


@compiled.disable_tracing
def _quantize_pair(lib: ctypes.CDLL, g: torch.Tensor, fmt_a: Format, gran_a: Granularity,
                   rnd_a: Rounding, seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity,
                   rnd_w: Rounding, seed_w: torch.Tensor, threads: int, first: int = 0) -> tuple[torch.Tensor, ...]:
    """(N, out) ``g``, or a batch (B, N, out) of them: codes (B·N, out) and (B·out, N);
    ``first``: the batch is entries ``first, first + 1, …`` of a larger one (their noise)."""
    g3 = g if g.dim() == 3 else g.unsqueeze(0)
    b, n, c = g3.shape
    ramax = torch.empty(b * n, 1, dtype=torch.float32, device="cpu")
    camax = torch.empty(b * c, 1, dtype=torch.float32, device="cpu")
    scratch = torch.empty(max(threads, 1) * c, dtype=torch.float32, device="cpu")
    dt, ld, bstride = DTYPES[g.dtype], g3.stride(1), g3.stride(0)
    lib.lowbit_pair_absmax(g3.data_ptr(), dt, b, bstride, n, c, ld, ramax.data_ptr(), camax.data_ptr(),
                           scratch.data_ptr(), threads)
    step_a, div_a = _steps(lib, ramax, fmt_a, gran_a)
    step_w, div_w = _steps(lib, camax, fmt_w, gran_w)
    codes_a = torch.empty(b * n, c, dtype=torch.int8, device="cpu")
    codes_w = torch.empty(b * c, n, dtype=torch.int8, device="cpu")
    lib.lowbit_quantize_pair(
        g3.data_ptr(), dt, b, bstride, n, c, ld,
        div_a.data_ptr(), 1 if div_a.shape[0] > 1 else 0, _seed(seed_a, rnd_a),
        _mode(fmt_a, rnd_a), float(fmt_a.emax), codes_a.data_ptr(),
        div_w.data_ptr(), 1 if div_w.shape[0] > 1 else 0, _seed(seed_w, rnd_w),
        _mode(fmt_w, rnd_w), float(fmt_w.emax), codes_w.data_ptr(), first, threads)
    return codes_a.view(fmt_a.code_dtype), step_a, codes_w.view(fmt_w.code_dtype), step_w


def supports_batched_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                          seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                          seed_w: torch.Tensor, first: int = 0) -> bool:
    """Whether :func:`quantize_batched_pair` takes this call: ``g`` (B, N, out) whose
    entries are as :func:`supports_pair` takes them (rows contiguous); ``first`` such that
    the last element's noise index, ``(first + B)·N·out``, stays within
    :data:`NOISE_PERIOD`."""
    return g.dim() == 3 and g.shape[0] > 0 and supports_pair(g[0], fmt_a, gran_a, rnd_a, seed_a, fmt_w,
                                                             gran_w, rnd_w, seed_w) and _readable(g) \
        and (first + g.shape[0]) * g.shape[1] * g.shape[2] <= NOISE_PERIOD


def quantize_batched_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                          seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                          seed_w: torch.Tensor, first: int = 0) -> tuple[torch.Tensor | None, ...]:
    """:func:`lowbit.gradpair.quantize_batched_pair` (both quantizations of a batch of
    gradients ``g`` (B, N, out), such as attention's ``∇S``, entries ``first, first + 1,
    …`` of a larger batch) on the kernel (:func:`supports_batched_pair`): ``(codes (B·N,
    out), step, None, None, codes (B·out, N) row-major, step, None, None)``, bitwise the
    reference's values. ``RuntimeError`` where :func:`supports_batched_pair` is false."""
    _check("quantize_batched_pair",
           supports_batched_pair(g, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w),
           f"{fmt_a.name}/{fmt_w.name}, {g.dtype} shape {tuple(g.shape)} strides {tuple(g.stride())} "
           f"on {g.device}")
    return run_quantize_batched_pair(g, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w, first)


def run_quantize_batched_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                              seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                              seed_w: torch.Tensor, first: int = 0) -> tuple[torch.Tensor | None, ...]:
    """:func:`quantize_batched_pair` without its checks (the dispatcher's kernel, after
    :func:`supports_batched_pair`)."""
    with scope("lowbit::avx512_quantize_batched_pair"):
        return _pair_result(_quantize_pair(_library(), g, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w,
                                           rnd_w, seed_w, torch.get_num_threads(), first))


def supports_batched_w(g: torch.Tensor, fmt: Format, granularity: Granularity, rounding: Rounding,
                       seed: torch.Tensor) -> bool:
    """Whether :func:`run_quantize_batched_w` takes this call: ``g`` (B, N, out) as
    :func:`supports_batched_pair` takes it, the ``∇W`` side's format, granularity and
    rounding as there."""
    return g.dim() == 3 and g.shape[0] > 0 and supports_pair(g[0], fmt, granularity, rounding, seed, fmt,
                                                             granularity, rounding, seed) and _readable(g)


@compiled.disable_tracing
def _quantize_batched_w(lib: ctypes.CDLL, g: torch.Tensor, fmt: Format, granularity: Granularity,
                        rounding: Rounding, seed: torch.Tensor, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, c = g.shape
    camax = torch.empty(b * c, 1, dtype=torch.float32, device="cpu")
    scratch = torch.empty(max(threads, 1) * c, dtype=torch.float32, device="cpu")
    dt, ld, bstride = DTYPES[g.dtype], g.stride(1), g.stride(0)
    lib.lowbit_pair_absmax(g.data_ptr(), dt, b, bstride, n, c, ld, None, camax.data_ptr(), scratch.data_ptr(),
                           threads)
    step, div = _steps(lib, camax, fmt, granularity)
    codes = torch.empty(b * c, n, dtype=torch.int8, device="cpu")
    lib.lowbit_quantize_pair(g.data_ptr(), dt, b, bstride, n, c, ld, None, 0, 0, 0, 0.0, None,
                             div.data_ptr(), 1 if div.shape[0] > 1 else 0, _seed(seed, rounding),
                             _mode(fmt, rounding), float(fmt.emax), codes.data_ptr(), 0, threads)
    return codes.view(fmt.code_dtype), step


def run_quantize_batched_w(g: torch.Tensor, fmt: Format, granularity: Granularity, rounding: Rounding,
                           seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
    """The ``∇W`` half of :func:`quantize_batched_pair` alone (``lowbit.gradpair.quantize_batched_w``):
    ``g`` (B, N, out) → (codes (B·out, N) of each entry's transpose, row-major, step,
    None, None), read in place — no transposed copy — bitwise the reference's; after
    :func:`supports_batched_w` (the dispatcher's kernel)."""
    with scope("lowbit::avx512_quantize"):
        codes, step = _quantize_batched_w(_library(), g, fmt, granularity, rounding, seed, torch.get_num_threads())
    return codes, step, None, None


def _pair_result(out: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor | None, ...]:
    """(codes, step, codes, step) as the kernel table's eight tensors (no offsets or
    block scales)."""
    codes_a, step_a, codes_w, step_w = out
    return codes_a, step_a, None, None, codes_w, step_w, None, None


def quantize_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                  seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                  seed_w: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """:func:`lowbit.gradpair.quantize_pair` (both quantizations of ``g`` (N, out)) on
    the kernel (:func:`supports_pair`): ``(codes (N, out), step, None, None, codesᵀ
    (out, N) row-major, stepᵀ, None, None)``, bitwise the reference's values.
    ``RuntimeError`` where :func:`supports_pair` is false."""
    _check("quantize_pair", supports_pair(g, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w),
             f"{fmt_a.name}/{fmt_w.name}, {g.dtype} {tuple(g.stride())} strides on {g.device}")
    return run_quantize_pair(g, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w)


def run_quantize_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                      seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                      seed_w: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """:func:`quantize_pair` without its checks (the dispatcher's kernel, after
    :func:`supports_pair`)."""
    with scope("lowbit::avx512_quantize_pair"):
        return _pair_result(_quantize_pair(_library(), g, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w,
                                           rnd_w, seed_w, torch.get_num_threads()))


def supports_conv_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                       seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                       seed_w: torch.Tensor) -> bool:
    """Whether :func:`quantize_conv_pair` takes this call: ``g`` (N, C_out, L) readable as
    :func:`supports` says, its last dimension contiguous or (channels-last) its channels,
    and both formats, granularities, roundings and seeds as :func:`supports` takes them."""
    return g.dim() == 3 and (_seg_layout(g) or _channels_last(g)) and _readable(g) \
        and all(_grid(f) is not None and gr in (Granularity.ROW, Granularity.TENSOR)
                and r in (Rounding.STOCHASTIC, Rounding.NEAREST) and _seed_ok(sd, r)
                for f, gr, r, sd in ((fmt_a, gran_a, rnd_a, seed_a), (fmt_w, gran_w, rnd_w, seed_w))) \
        and _enabled and available()


def _seg_layout(g: torch.Tensor) -> bool:
    """``g`` (N, C, L) with each (sample, channel) segment contiguous."""
    return g.shape[2] <= 1 or g.stride(2) == 1


def _channels_last(g: torch.Tensor) -> bool:
    """``g`` (N, C, L) with each position's channels contiguous (a channels-last ∇Y)."""
    return g.shape[1] <= 1 or g.stride(1) == 1


def _seg_kernels(lib: ctypes.CDLL, g: torch.Tensor) -> tuple[Any, Any, tuple]:
    """(absmax, quantize-pair) C functions for ``g``'s layout and their leading arguments:
    the segment kernels where segments are contiguous, else their channels-last twins
    (the same values and codes, read as 16 × 16 tiles)."""
    n, c, length = g.shape
    if _seg_layout(g):
        return lib.lowbit_seg_absmax, lib.lowbit_seg_quantize_pair, (
            g.data_ptr(), DTYPES[g.dtype], n, c, length, g.stride(0), g.stride(1))
    return lib.lowbit_seg_absmax_cl, lib.lowbit_seg_quantize_pair_cl, (
        g.data_ptr(), DTYPES[g.dtype], n, c, length, g.stride(0), g.stride(2))


@compiled.disable_tracing
def _quantize_conv_pair(lib: ctypes.CDLL, g: torch.Tensor, fmt_a: Format, gran_a: Granularity,
                        rnd_a: Rounding, seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity,
                        rnd_w: Rounding, seed_w: torch.Tensor, threads: int) -> tuple[torch.Tensor, ...]:
    n, c, length = g.shape
    seg = torch.empty(n, c, dtype=torch.float32, device="cpu")  # absmax of each (sample, channel)
    absmax, quantize_pair, args = _seg_kernels(lib, g)
    absmax(*args, seg.data_ptr(), threads)
    step_a, div_a = _steps(lib, seg.amax(1, keepdim=True), fmt_a, gran_a)  # NaN propagates
    step_w, div_w = _steps(lib, seg.amax(0).reshape(c, 1), fmt_w, gran_w)
    codes_a = torch.empty(n, c * length, dtype=torch.int8, device="cpu")
    codes_w = torch.empty(c, n * length, dtype=torch.int8, device="cpu")
    quantize_pair(
        *args, div_a.data_ptr(), 1 if div_a.shape[0] > 1 else 0, _seed(seed_a, rnd_a),
        _mode(fmt_a, rnd_a), float(fmt_a.emax), codes_a.data_ptr(),
        div_w.data_ptr(), 1 if div_w.shape[0] > 1 else 0, _seed(seed_w, rnd_w),
        _mode(fmt_w, rnd_w), float(fmt_w.emax), codes_w.data_ptr(), threads)
    return codes_a.view(fmt_a.code_dtype), step_a, codes_w.view(fmt_w.code_dtype), step_w


def quantize_conv_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                       seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                       seed_w: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """:func:`lowbit.gradpair.quantize_conv_pair` (both quantizations of a convolution's
    ``∇Y``, ``g`` (N, C_out, L)) on the kernel (:func:`supports_conv_pair`): ``(codes
    (N, C_out·L), step, None, None, codes (C_out, N·L), step, None, None)``, codes
    row-major, bitwise the reference's values; each ``(sample, channel)`` segment of ``g``
    is read once for the ranges and once for both codes. ``RuntimeError`` where
    :func:`supports_conv_pair` is false."""
    _check("quantize_conv_pair",
           supports_conv_pair(g, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w),
           f"{fmt_a.name}/{fmt_w.name}, {g.dtype} shape {tuple(g.shape)} strides {tuple(g.stride())} "
           f"on {g.device}")
    return run_quantize_conv_pair(g, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w)


def run_quantize_conv_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                           seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                           seed_w: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """:func:`quantize_conv_pair` without its checks (the dispatcher's kernel, after
    :func:`supports_conv_pair`)."""
    with scope("lowbit::avx512_quantize_conv_pair"):
        return _pair_result(_quantize_conv_pair(_library(), g, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w,
                                                rnd_w, seed_w, torch.get_num_threads()))


def supports_conv_w(g: torch.Tensor, fmt: Format, gran: Granularity, rnd: Rounding, seed: torch.Tensor) -> bool:
    """Whether :func:`run_quantize_conv_w` takes this call: as :func:`supports_conv_pair`
    for the ``∇W`` side alone."""
    return supports_conv_pair(g, fmt, gran, rnd, seed, fmt, gran, rnd, seed)


@compiled.disable_tracing
def _quantize_conv_w(lib: ctypes.CDLL, g: torch.Tensor, fmt: Format, gran: Granularity, rnd: Rounding,
                     seed: torch.Tensor, threads: int) -> tuple[torch.Tensor, ...]:
    n, c, length = g.shape
    seg = torch.empty(n, c, dtype=torch.float32, device="cpu")  # absmax of each (sample, channel)
    absmax, quantize_pair, args = _seg_kernels(lib, g)
    absmax(*args, seg.data_ptr(), threads)
    step, div = _steps(lib, seg.amax(0).reshape(c, 1), fmt, gran)  # NaN propagates
    codes = torch.empty(c, n * length, dtype=torch.int8, device="cpu")
    mode, emax, stride = _mode(fmt, rnd), float(fmt.emax), 1 if div.shape[0] > 1 else 0
    quantize_pair(*args, div.data_ptr(), 0, 0, mode, emax, None,  # no ∇X codes
                                 div.data_ptr(), stride, _seed(seed, rnd), mode, emax, codes.data_ptr(), threads)
    return codes.view(fmt.code_dtype), step


def run_quantize_conv_w(g: torch.Tensor, fmt: Format, gran: Granularity, rnd: Rounding,
                        seed: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """:func:`lowbit.gradpair.quantize_conv_w` (a convolution's ``∇Y`` (N, C_out, L)
    quantized as its channels (C_out, N·L), without the channel-major copy) on the kernel,
    after :func:`supports_conv_w`: ``(codes, step, None, None)``, bitwise the reference's."""
    with scope("lowbit::avx512_quantize_conv_w"):
        codes, step = _quantize_conv_w(_library(), g, fmt, gran, rnd, seed, torch.get_num_threads())
        return codes, step, None, None


def _out_ok(out: torch.Tensor | None, acc: torch.Tensor, out_dtype: torch.dtype, channels_last: bool) -> bool:
    """Whether an epilogue's ``out`` is ``None``, or a plain CPU tensor of ``out_dtype``
    shaped (N, C, *spatial) after ``acc`` (N, *spatial, C), in the layout the kernel
    writes (contiguous; channels-last memory with ``channels_last``), holding no
    byte of ``acc``."""
    if out is None:
        return True
    shape = (acc.shape[0], acc.shape[-1], *acc.shape[1:-1])
    mem = out.movedim(1, -1) if channels_last else out
    return (type(out) is torch.Tensor and out.layout == torch.strided and out.device.type == "cpu"
            and out.dtype == out_dtype and tuple(out.shape) == shape and mem.is_contiguous()
            and not (out.requires_grad and torch.is_grad_enabled()) and out.numel() > 0
            and not _overlap(out, acc))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a``'s and ``b``'s bytes (each contiguous) share any address."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def supports_epilogue_nchw(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                           bias: torch.Tensor | None, out_dtype: torch.dtype,
                           out: torch.Tensor | None = None, channels_last: bool = False) -> bool:
    """Whether :func:`epilogue_nchw` takes this call: ``acc`` (N, *spatial, C) int32 or
    float32, contiguous; ``a_scale`` float32 (N or 1, 1, …, 1), ``b_scale`` float32
    (1, …, 1, C or 1), ``bias`` ``None`` or (C,) floating (an ``nn.Parameter`` too), all
    strided CPU tensors autograd does not record; ``out_dtype`` float32 or bfloat16 (the
    float32 value rounded to nearest even, as torch's cast); ``out`` ``None`` or as
    :func:`_out_ok` (``channels_last``: :func:`run_epilogue_nhwc`'s layout)."""
    if not (acc.dim() >= 2 and acc.is_contiguous() and out_dtype in (torch.float32, torch.bfloat16)
            and _readable(acc, (torch.int32, torch.float32)) and _out_ok(out, acc, out_dtype, channels_last)):
        return False
    n, c = acc.shape[0], acc.shape[-1]
    ones = (1,) * (acc.dim() - 2)  # the reference broadcasts the scales by shape
    parts = (a_scale, b_scale) if bias is None else (a_scale, b_scale, bias)
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided
               and t.device.type == "cpu" and not (t.requires_grad and torch.is_grad_enabled())
               and cbuild.plain_memory(t) for t in parts) \
        and a_scale.dtype == b_scale.dtype == torch.float32 \
        and tuple(a_scale.shape) in ((n, *ones, 1), (1, *ones, 1)) \
        and tuple(b_scale.shape) in ((1, *ones, c), (1, *ones, 1)) \
        and (bias is None or (bias.is_floating_point() and bias.shape == (c,))) and _enabled and available()


def supports_epilogue_nhwc(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                           bias: torch.Tensor | None, out_dtype: torch.dtype,
                           out: torch.Tensor | None = None) -> bool:
    """Whether :func:`run_epilogue_nhwc` takes this call: as
    :func:`supports_epilogue_nchw`, ``out`` in channels-last memory."""
    return supports_epilogue_nchw(acc, a_scale, b_scale, bias, out_dtype, out, channels_last=True)


@compiled.disable_tracing
def _epilogue_nchw(lib: ctypes.CDLL, acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None, threads: int, out_dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    n, c = acc.shape[0], acc.shape[-1]
    spatial = acc.shape[1:-1]
    p = acc.numel() // (n * c)
    sa, sb = a_scale.reshape(-1).contiguous(), b_scale.reshape(-1).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()  # the reference's bias.to(float32)
    if out is None:
        out = torch.empty(n, c, *spatial, dtype=out_dtype, device="cpu")
    lib.lowbit_epilogue_nchw(acc.data_ptr(), int(acc.dtype == torch.int32), n, p, c, sa.data_ptr(),
                             int(sa.numel() > 1), sb.data_ptr(), int(sb.numel() > 1),
                             None if b is None else b.data_ptr(), out.data_ptr(),
                             int(out_dtype == torch.bfloat16), threads)
    torch.autograd.graph.increment_version(out)  # written through its pointer: autograd's in-place check sees it
    return out


def epilogue_nchw(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`lowbit.kernels.im2col.epilogue_nchw` on the kernel: ``acc`` (N, *spatial,
    C) → a new contiguous (N, C, *spatial) ``out_dtype`` (float32 or bfloat16), or
    ``out`` written and returned, ``(float(acc)·s_a)·s_b (+ bias)`` per element, bitwise
    the reference's; the transposing write in 16 × 16 tiles. ``RuntimeError`` where
    :func:`supports_epilogue_nchw` is false."""
    _check("epilogue_nchw", supports_epilogue_nchw(acc, a_scale, b_scale, bias, out_dtype, out),
           f"{acc.dtype} {tuple(acc.shape)} strides {tuple(acc.stride())}, scales {a_scale.dtype}/"
           f"{b_scale.dtype}, out {out_dtype}" + ("" if out is None else
                                                 f" into {out.dtype} {tuple(out.shape)} strides {tuple(out.stride())}"))
    return run_epilogue_nchw(acc, a_scale, b_scale, bias, out_dtype, out)


def run_epilogue_nchw(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`epilogue_nchw` without its checks (the dispatcher's kernel, after
    :func:`supports_epilogue_nchw`)."""
    with scope("lowbit::avx512_epilogue"):
        return _epilogue_nchw(_library(), acc, a_scale, b_scale, bias, torch.get_num_threads(), out_dtype, out)


@compiled.disable_tracing
def _epilogue_nhwc(lib: ctypes.CDLL, acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None, threads: int, out_dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    n, c = acc.shape[0], acc.shape[-1]
    p = acc.numel() // (n * c)
    sa, sb = a_scale.reshape(-1).contiguous(), b_scale.reshape(-1).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()  # the reference's bias.to(float32)
    if out is not None:
        out = out.movedim(1, -1)  # (N, *spatial, C): its memory
    elif acc.dtype == out_dtype == torch.float32:
        out = acc
    else:
        out = torch.empty(acc.shape, dtype=out_dtype, device="cpu")
    lib.lowbit_epilogue_nhwc(acc.data_ptr(), int(acc.dtype == torch.int32), n, p, c, sa.data_ptr(),
                             int(sa.numel() > 1), sb.data_ptr(), int(sb.numel() > 1),
                             None if b is None else b.data_ptr(), out.data_ptr(),
                             int(out_dtype == torch.bfloat16), threads)
    torch.autograd.graph.increment_version(out)  # written through its pointer (out, or acc written over)
    return out.movedim(-1, 1)


def run_epilogue_nhwc(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                      bias: torch.Tensor | None, out_dtype: torch.dtype,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`lowbit.kernels.im2col.epilogue_nhwc` on the kernel (after
    :func:`supports_epilogue_nhwc`): ``acc`` (N, *spatial, C) → (N, C, *spatial)
    ``out_dtype`` (float32 or bfloat16) in ``acc``'s channels-last memory, ``(float(acc)·
    s_a)·s_b (+ bias)`` per element, bitwise the reference's; written into ``out`` where
    given, else a float32 ``acc`` is overwritten by a float32 result (each element read
    before it is written), otherwise the result is a new buffer."""
    with scope("lowbit::avx512_epilogue"):
        return _epilogue_nhwc(_library(), acc, a_scale, b_scale, bias, torch.get_num_threads(), out_dtype, out)


def _epilogue_rows_layout(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor
                          ) -> tuple[bool, bool, int] | None:
    """(per-row ``a_scale``, per-column ``b_scale``, ``b_scale``'s entry stride) where
    :func:`run_epilogue_into` reads the scales as they broadcast against ``acc`` (…, M,
    N); ``None`` where it cannot."""
    lead, m, n = acc.shape[:-2], acc.shape[-2], acc.shape[-1]
    rows = lead.numel() * m
    if a_scale.numel() == 1:
        sa_rows = False
    elif a_scale.dim() == acc.dim() and a_scale.shape[-1] == 1 and a_scale.numel() == rows:
        sa_rows = True
    else:
        return None
    if b_scale.numel() == 1:
        return sa_rows, False, 0
    if b_scale.dim() == acc.dim() and b_scale.shape[-1] == n and b_scale.shape[-2] == 1:
        if b_scale.numel() == n:
            return sa_rows, True, 0
        if b_scale.shape[:-2] == lead:
            return sa_rows, True, n
    return None


def supports_epilogue_into(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                           a_offset: torch.Tensor | None, b_offset: torch.Tensor | None,
                           rowsum: torch.Tensor | None, colsum: torch.Tensor | None, k: int,
                           bias: torch.Tensor | None = None) -> bool:
    """Whether :func:`run_epilogue_into` takes this call: ``acc`` (…, M, N) int32,
    contiguous, outside any tracing; float32 scales broadcasting as per row (or one) and
    per column of each entry (or one); no offsets; ``bias`` ``None`` or (N,) floating;
    all plain strided CPU tensors autograd does not record."""
    if not (acc.dim() >= 2 and acc.is_contiguous() and _readable(acc, (torch.int32,))
            and a_offset is None and b_offset is None):
        return False
    parts = (a_scale, b_scale) if bias is None else (a_scale, b_scale, bias)
    return all(type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided
               and t.device.type == "cpu" and not (t.requires_grad and torch.is_grad_enabled())
               and cbuild.plain_memory(t) for t in parts) \
        and a_scale.dtype == b_scale.dtype == torch.float32 \
        and (bias is None or (bias.is_floating_point() and tuple(bias.shape) == (acc.shape[-1],))) \
        and _epilogue_rows_layout(acc, a_scale, b_scale) is not None and _enabled and available()


@compiled.disable_tracing
def _epilogue_into(lib: ctypes.CDLL, acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None, threads: int) -> None:
    sa_rows, sb_cols, sb_bstride = _epilogue_rows_layout(acc, a_scale, b_scale)  # type: ignore[misc]
    m, n = acc.shape[-2], acc.shape[-1]
    sa, sb = a_scale.contiguous(), b_scale.contiguous()
    b = None if bias is None else bias.detach().to(torch.float32).contiguous()  # the reference's bias.to(float32)
    lib.lowbit_epilogue_rows(acc.data_ptr(), acc.numel() // n, m, n, sa.data_ptr(), int(sa_rows), sb.data_ptr(),
                             int(sb_cols), sb_bstride, None if b is None else b.data_ptr(), threads)
    torch.autograd.graph.increment_version(acc)  # written over through its pointer


def run_epilogue_into(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                      a_offset: torch.Tensor | None, b_offset: torch.Tensor | None,
                      rowsum: torch.Tensor | None, colsum: torch.Tensor | None, k: int,
                      bias: torch.Tensor | None = None) -> None:
    """:func:`lowbit.kernels.reference.int8_epilogue_into` on the kernel (after
    :func:`supports_epilogue_into`): ``(float(acc)·a_scale)·b_scale (+ bias)`` written as
    float32 over ``acc``'s bytes, bit for bit the reference's, in one pass (no compiled
    call and its guards)."""
    with scope("lowbit::avx512_epilogue_rows"):
        _epilogue_into(_library(), acc, a_scale, b_scale, bias, torch.get_num_threads())


def supports_place_nhwc(codes: torch.Tensor, shape: Sequence[int], size: Sequence[int],
                        offset: Sequence[int], stride: Sequence[int] = (1, 1),
                        unsigned: bool = False) -> bool:
    """Whether :func:`place_nhwc` takes this call: ``codes`` a contiguous int8 (N, C·H·W)
    CPU tensor outside any tracing, ``shape`` (N, C, H, W) of it (every entry ≥ 1), and every code landing
    inside ``size`` (``offset ≥ 0``, ``offset + (H − 1)·stride < size``; cropping runs
    the reference)."""
    if not (len(shape) == 4 and min(shape) >= 1 and codes.dim() == 2 and codes.is_contiguous()
            and _readable(codes, (torch.int8,)) and tuple(codes.shape) == (shape[0], math.prod(shape[1:]))):
        return False
    return all(offset[i] >= 0 and stride[i] >= 1 and offset[i] + (shape[2 + i] - 1) * stride[i] < size[i]
               for i in range(2)) and _enabled and available()


@compiled.disable_tracing
def _place_nhwc(lib: ctypes.CDLL, codes: torch.Tensor, shape: Sequence[int], size: Sequence[int],
                offset: Sequence[int], stride: Sequence[int], unsigned: bool, threads: int) -> torch.Tensor:
    n, c, h, w = shape
    covered = (h, w) == tuple(size) and tuple(stride) == (1, 1)  # no entry left to fill
    dtype = torch.uint8 if unsigned else torch.int8
    out = torch.empty(n, size[0], size[1], c, dtype=dtype, device="cpu") if covered else \
        torch.full((n, size[0], size[1], c), 128 if unsigned else 0, dtype=dtype, device="cpu")
    start = out.data_ptr() + (offset[0] * size[1] + offset[1]) * c
    lib.lowbit_place_nhwc(codes.data_ptr(), n, c, h, w, start, size[0] * size[1] * c,
                          stride[0] * size[1] * c, stride[1] * c, 0x80 if unsigned else 0, threads)
    return out


def place_nhwc(codes: torch.Tensor, shape: Sequence[int], size: Sequence[int], offset: Sequence[int],
               stride: Sequence[int] = (1, 1), unsigned: bool = False) -> torch.Tensor:
    """:func:`lowbit.kernels.im2col.place_codes` on the kernel: int8 codes (N, C·H·W) →
    a new contiguous (N, size[0], size[1], C) int8 (``unsigned``: uint8 ``code + 128``)
    tensor, the same bytes, transposed in 16 × 16 tiles in registers where torch's strided
    copy moves one byte at a time. ``RuntimeError`` where :func:`supports_place_nhwc` is
    false."""
    _check("place_nhwc", supports_place_nhwc(codes, shape, size, offset, stride, unsigned),
           f"{codes.dtype} {tuple(codes.shape)} of {tuple(shape)} into {tuple(size)} at "
           f"{tuple(offset)}, stride {tuple(stride)}")
    return run_place_nhwc(codes, shape, size, offset, stride, unsigned)


def run_place_nhwc(codes: torch.Tensor, shape: Sequence[int], size: Sequence[int], offset: Sequence[int],
                   stride: Sequence[int] = (1, 1), unsigned: bool = False) -> torch.Tensor:
    """:func:`place_nhwc` without its checks (the dispatcher's kernel, after
    :func:`supports_place_nhwc`)."""
    with scope("lowbit::avx512_place_nhwc"):
        return _place_nhwc(_library(), codes, shape, size, offset, stride, unsigned,
                           torch.get_num_threads())


def supports_bhq(x: torch.Tensor, dots: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                 group: torch.Tensor, fmt: Format, granularity: Granularity, rounding: Rounding,
                 seed: torch.Tensor) -> bool:
    """Whether :func:`bhq_forward_quantize` takes this call: ``x`` (N, D) as
    :func:`supports` with contiguous rows; ``scale``, ``v`` (N,) float32 and ``group``
    (N,) int64 with ids in [0, G), ``dots`` (G, D) float32, all plain strided CPU tensors
    (the C code reads ``dots[group[r]]`` and ``scale[r]``, ``v[r]`` for every row)."""
    n, d = x.shape
    parts = (dots, scale, v, group)
    if not (supports(x, fmt, granularity, rounding, seed) and _int_grid(fmt) and _rows_contiguous(x)
            and all(type(t) is torch.Tensor and t.layout == torch.strided and t.device.type == "cpu"
                    for t in parts)
            and scale.dtype == v.dtype == dots.dtype == torch.float32 and group.dtype == torch.int64
            and scale.shape == v.shape == group.shape == (n,) and dots.dim() == 2
            and dots.shape[1] == d and dots.shape[0] > 0):
        return False
    return _ids_in(group, dots.shape[0])


@compiled.disable_tracing
def _bhq_quantize(lib: ctypes.CDLL, x: torch.Tensor, dots: torch.Tensor, scale: torch.Tensor,
                  v: torch.Tensor, group: torch.Tensor, fmt: Format, granularity: Granularity,
                  rounding: Rounding, seed: torch.Tensor, threads: int) -> tuple[torch.Tensor, ...]:
    r, d = x.shape
    dots, scale, group = dots.contiguous(), scale.contiguous(), group.contiguous()
    v2 = (2 * v).contiguous()  # the reference's 2 * v[:, None], exact
    tr = (scale.data_ptr(), v2.data_ptr(), group.data_ptr(), dots.data_ptr())
    amax = torch.empty(r, 1, dtype=torch.float32, device="cpu")
    dt = DTYPES[x.dtype]
    lib.lowbit_bhq_absmax(x.data_ptr(), dt, r, d, x.stride(0), *tr, amax.data_ptr(), threads)
    step, div = _steps(lib, amax, fmt, granularity)
    codes = torch.empty(r, d, dtype=torch.int8, device="cpu")
    lib.lowbit_bhq_quantize_rows(x.data_ptr(), dt, r, d, x.stride(0), *tr, div.data_ptr(),
                                 1 if div.shape[0] > 1 else 0, _seed(seed, rounding),
                                 int(rounding is Rounding.STOCHASTIC), float(fmt.emax),
                                 codes.data_ptr(), threads)
    return codes, step


def bhq_forward_quantize(x: torch.Tensor, dots: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                         group: torch.Tensor, fmt: Format, granularity: Granularity,
                         rounding: Rounding, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
    """BHQ's transform and quantizer in one pass pair (``lowbit.quantizers.bhq``'s
    ``_forward_quantize``: ``T x = x·s − 2v·dots[group]`` per element, never written,
    then :func:`quantize`'s arithmetic): ``x`` (N, D); ``dots`` (G, D), ``scale`` and
    ``v`` (N,) float32; ``group`` (N,) int64. Bitwise the reference's codes and steps.
    ``RuntimeError`` where :func:`supports_bhq` is false."""
    _check("bhq_forward_quantize", supports_bhq(x, dots, scale, v, group, fmt, granularity, rounding, seed),
             f"{fmt.name}, {x.dtype} {tuple(x.stride())} strides, transform in {scale.dtype}")
    return run_bhq_forward_quantize(x, dots, scale, v, group, fmt, granularity, rounding, seed)


def run_bhq_forward_quantize(x: torch.Tensor, dots: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                             group: torch.Tensor, fmt: Format, granularity: Granularity,
                             rounding: Rounding, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
    """:func:`bhq_forward_quantize` without its checks (the dispatcher's kernel, after
    :func:`supports_bhq`: its group-id range check is not paid twice)."""
    with scope("lowbit::avx512_bhq_quantize"):
        codes, step = _bhq_quantize(_library(), x, dots, scale, v, group, fmt, granularity, rounding,
                                    seed, torch.get_num_threads())
    return codes, step, None, None


def _ids_in(group: torch.Tensor, n_groups: int) -> bool:
    """Whether every id of ``group`` lies in [0, ``n_groups``) (none: yes; ``group.min()``
    of an empty one raised: a review)."""
    if group.numel() == 0:
        return True
    lo, hi = torch.aminmax(group)
    return bool(lo >= 0) and bool(hi < n_groups)


def _index_ok(t: object, rows: int) -> bool:
    """Whether ``t`` is a BHQ transform whose groups the C kernels may index an operand of
    ``rows`` rows by (``BlockHouseholder.index_ok``: checked once per transform)."""
    check = getattr(t, "index_ok", None)
    return callable(check) and bool(check(rows))


def _weights(t: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A BHQ transform's ``(v·s, 2v)``: its ``weights()`` (kept from its construction), or
    torch's products for another transform with BHQ's fields."""
    get = getattr(t, "weights", None)
    return get() if callable(get) else (t.v * t.scale, 2 * t.v)  # type: ignore[attr-defined]


def _rows_apart(y: torch.Tensor) -> bool:
    """Whether ``y``'s rows (contiguous ones) lie in separate memory, so that a kernel may
    write its result over them (an expanded ``y`` shares one row: a review)."""
    return y.shape[0] <= 1 or y.stride(0) >= y.shape[1]


def supports_bhq_rows(x: torch.Tensor, t: object, fmt: Format, granularity: Granularity, rounding: Rounding,
                      seed: torch.Tensor) -> bool:
    """Whether :func:`run_bhq_quantize` takes this call: ``x`` (N, D) as :func:`supports`
    takes it per row on an integer grid, with contiguous rows; ``t`` a
    ``BlockHouseholder`` of ``x``'s N rows with float32 ``scale`` and ``v`` whose index
    the kernel may read (:func:`_index_ok`)."""
    return granularity is Granularity.ROW and supports(x, fmt, granularity, rounding, seed) and _int_grid(fmt) \
        and _rows_contiguous(x) and _index_ok(t, x.shape[0]) \
        and t.scale.dtype == t.v.dtype == torch.float32  # type: ignore[attr-defined]


def run_bhq_quantize(x: torch.Tensor, t: object, fmt: Format, granularity: Granularity, rounding: Rounding,
                     seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
    """BHQ's quantizer with its transform ``t`` (``lowbit.quantizers.bhq``'s ``bhq_quantize``:
    its group sums, then :func:`bhq_forward_quantize`), group by group
    (``lowbit_bhq_group_quantize``: a group's sums, then its rows' ranges and codes while
    they are in cache; no sums written), after :func:`supports_bhq_rows`: ``(codes (N, D),
    step (N, 1), None, None)``, bitwise those kernels' values."""
    crow, members = t.csr()  # type: ignore[attr-defined]
    w, v2 = _weights(t)
    with scope("lowbit::avx512_bhq_quantize"):
        codes, step, _ = _bhq_group_quantize(_library(), x, w, t.scale, t.v, crow,  # type: ignore[attr-defined]
                                             members, t.n_groups, fmt, rounding, seed,  # type: ignore[attr-defined]
                                             torch.get_num_threads(), v2=v2)
    return codes, step, None, None


def supports_bhq_pair(x: torch.Tensor, t: object, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                      seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                      seed_w: torch.Tensor) -> bool:
    """Whether :func:`run_bhq_quantize_pair` takes this call: the ``∇X`` side as
    :func:`supports_bhq_rows` takes it, the ``∇W`` side (``x``'s columns) as
    :func:`supports_pair` takes its own."""
    return _columns_ok(fmt_w, gran_w, rnd_w, seed_w) and supports_bhq_rows(x, t, fmt_a, gran_a, rnd_a, seed_a)


def _columns_ok(fmt_w: Format, gran_w: Granularity, rnd_w: Rounding, seed_w: torch.Tensor) -> bool:
    """Whether :func:`_column_codes` takes a pair's ``∇W`` side: a grid the pair kernel
    quantizes on, per row or per tensor, stochastic or nearest, with a seed it takes."""
    return _grid(fmt_w) is not None and gran_w in (Granularity.ROW, Granularity.TENSOR) \
        and rnd_w in (Rounding.STOCHASTIC, Rounding.NEAREST) and _seed_ok(seed_w, rnd_w)


def _column_codes(lib: ctypes.CDLL, x: torch.Tensor, camax: torch.Tensor, entries: int, fmt_w: Format,
                  gran_w: Granularity, rnd_w: Rounding, seed_w: torch.Tensor, threads: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A pair's ``∇W`` side from its column ranges ``camax`` (made in the ``∇X`` side's
    read): the codes of ``xᵀ`` (D, N) row-major — with ``entries`` > 0, of each entry's
    transpose (entries · D, N / entries) — and their steps, :func:`quantize`'s values
    (``lowbit_quantize_pair``'s column pass alone)."""
    r, d = x.shape
    er = r // entries if entries else r  # rows of an entry
    step_w, div_w = _steps(lib, camax, fmt_w, gran_w)
    codes_w = torch.empty(max(entries, 1) * d, er, dtype=torch.int8, device="cpu")
    ld = x.stride(0) if r > 1 else d
    lib.lowbit_quantize_pair(x.data_ptr(), DTYPES[x.dtype], max(entries, 1), er * ld, er, d, ld, None, 0, 0, 0,
                             0.0, None, div_w.data_ptr(), 1 if div_w.shape[0] > 1 else 0, _seed(seed_w, rnd_w),
                             _mode(fmt_w, rnd_w), float(fmt_w.emax), codes_w.data_ptr(), 0, threads)
    return codes_w.view(fmt_w.code_dtype), step_w


@compiled.disable_tracing
def _bhq_group_quantize(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                        crow: torch.Tensor, members: torch.Tensor, n_groups: int, fmt: Format, rnd: Rounding,
                        seed: torch.Tensor, threads: int, columns: bool = False, entry_rows: int = 0,
                        v2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``lowbit_bhq_group_quantize``: (codes (N, D) int8 of ``T x``'s rows, their steps
    (N, 1), ``x``'s column absmax where ``columns`` — (D, 1), or with ``entry_rows`` > 0
    (``x`` a batch of entries of that many rows) each entry's, (N / entry_rows · D, 1) —
    else None). ``v2``: ``2 * v`` where the caller has it."""
    r, d = x.shape
    w, scale, crow, members = w.contiguous(), scale.contiguous(), crow.contiguous(), members.contiguous()
    _check_csr(lib, crow, members, n_groups, r)
    v2 = (2 * v if v2 is None else v2).contiguous()  # the reference's 2 * v[:, None], exact
    codes = torch.empty(r, d, dtype=torch.int8, device="cpu")
    step = torch.empty(r, 1, dtype=torch.float32, device="cpu")
    entry_rows = entry_rows if columns else 0
    ncm = (r // entry_rows if entry_rows else 1) * d  # column maxima a thread keeps
    camax = torch.empty(ncm, 1, dtype=torch.float32, device="cpu") if columns else None
    scratch = torch.empty(max(threads, 1) * (2 * d + ncm), dtype=torch.float32, device="cpu")
    qmax = float(fmt.emax)
    q_hi = _q_hi(qmax)
    lib.lowbit_bhq_group_quantize(x.data_ptr(), DTYPES[x.dtype], r, d, x.stride(0) if r > 1 else d,
                                  scale.data_ptr(), w.data_ptr(), v2.data_ptr(), crow.data_ptr(),
                                  members.data_ptr(), n_groups, q_hi, 1.0 / q_hi, _seed(seed, rnd),
                                  int(rnd is Rounding.STOCHASTIC), qmax, codes.data_ptr(), step.data_ptr(),
                                  None if camax is None else camax.data_ptr(), entry_rows, scratch.data_ptr(),
                                  threads)
    return codes, step, camax


@compiled.disable_tracing
def _bhq_group_quantize_pair(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
                             v: torch.Tensor, crow: torch.Tensor, members: torch.Tensor, n_groups: int,
                             fmt_a: Format, rnd_a: Rounding, seed_a: torch.Tensor, fmt_w: Format,
                             gran_w: Granularity, rnd_w: Rounding, seed_w: torch.Tensor,
                             threads: int, entries: int = 0, v2: torch.Tensor | None = None
                             ) -> tuple[torch.Tensor, ...]:
    """The rows' codes and steps, then the columns' (``entries`` > 0: ``x`` a batch of that
    many entries, the columns each entry's own: codes (entries · D, N / entries))."""
    r, d = x.shape
    er = r // entries if entries else r  # rows of an entry
    codes_a, step_a, camax = _bhq_group_quantize(lib, x, w, scale, v, crow, members, n_groups, fmt_a, rnd_a,
                                                 seed_a, threads, columns=True, entry_rows=er if entries else 0,
                                                 v2=v2)
    codes_w, step_w = _column_codes(lib, x, camax, entries, fmt_w, gran_w, rnd_w, seed_w, threads)  # type: ignore[arg-type]
    return codes_a, step_a, codes_w, step_w


def run_bhq_quantize_pair(x: torch.Tensor, t: object, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                          seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                          seed_w: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """BHQ's pair (``lowbit.quantizers.bhq``'s ``bhq_quantize_pair``): the codes of
    ``T x``'s rows (BHQ's transform ``t``: its group sums, then :func:`bhq_forward_quantize`)
    and of ``x``'s columns (:func:`quantize` of ``xᵀ``), after :func:`supports_bhq_pair`:
    ``(codes (N, D), step, None, None, codes (D, N) row-major, step, None, None)``,
    bitwise those kernels' values. Group by group (``lowbit_bhq_group_quantize``): a
    group's sums, then its rows' ranges and codes while they are in cache, no sums
    written, with the columns' ranges from the same read; then the columns' codes."""
    crow, members = t.csr()  # type: ignore[attr-defined]
    w, v2 = _weights(t)
    with scope("lowbit::avx512_bhq_quantize_pair"):
        return _pair_result(_bhq_group_quantize_pair(
            _library(), x, w, t.scale, t.v, crow, members, t.n_groups,  # type: ignore[attr-defined]
            fmt_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w, torch.get_num_threads(), v2=v2))


def supports_bhq_batched_pair(x: torch.Tensor, t: object, entries: int, fmt_a: Format, gran_a: Granularity,
                              rnd_a: Rounding, seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity,
                              rnd_w: Rounding, seed_w: torch.Tensor) -> bool:
    """Whether :func:`run_bhq_quantize_batched_pair` takes this call: as
    :func:`supports_bhq_pair`, with ``entries`` a positive int dividing ``x``'s rows."""
    return isinstance(entries, int) and not isinstance(entries, bool) and entries > 0 \
        and x.dim() == 2 and x.shape[0] % entries == 0 \
        and supports_bhq_pair(x, t, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w)


def run_bhq_quantize_batched_pair(x: torch.Tensor, t: object, entries: int, fmt_a: Format, gran_a: Granularity,
                                  rnd_a: Rounding, seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity,
                                  rnd_w: Rounding, seed_w: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """BHQ's batched pair (``lowbit.quantizers.bhq``'s ``bhq_quantize_batched_pair``):
    ``x`` (B·N, D) holds ``entries`` = B entries of N rows (attention's heads); the codes
    of ``T x``'s rows as :func:`run_bhq_quantize_pair`'s, and of each entry's columns —
    :func:`quantize` of the entries' transposes (B·D, N), as
    :func:`run_quantize_batched_w` gives them — after :func:`supports_bhq_batched_pair`:
    ``(codes (B·N, D), step, None, None, codes (B·D, N), step, None, None)``, bitwise
    those kernels' values; the entries' column ranges come from the rows' group pass
    (each row's into its entry's), not from a read of their own."""
    crow, members = t.csr()  # type: ignore[attr-defined]
    w, v2 = _weights(t)
    with scope("lowbit::avx512_bhq_quantize_pair"):
        return _pair_result(_bhq_group_quantize_pair(
            _library(), x, w, t.scale, t.v, crow, members, t.n_groups,  # type: ignore[attr-defined]
            fmt_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w, torch.get_num_threads(), entries, v2=v2))


def supports_bhq_inverse(y: torch.Tensor, dots: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                         group: torch.Tensor, out_dtype: torch.dtype, overwrite: bool = False) -> bool:
    """Whether :func:`run_bhq_inverse` takes this call: float32 ``y`` (N, D) with
    contiguous rows (apart in memory where ``overwrite``), ``dots`` (G, D), ``scale``,
    ``v`` (N,) float32 and ``group`` (N,) int64 with ids in [0, G), a float32 result,
    plain CPU tensors outside autograd recording."""
    parts = (y, dots, scale, v, group)
    if not (out_dtype == torch.float32 and y.dim() == 2 and _rows_contiguous(y) and y.shape[1] > 0
            and (not overwrite or _rows_apart(y))
            and all(type(t) is torch.Tensor and t.layout == torch.strided and t.device.type == "cpu"
                    and not (t.requires_grad and torch.is_grad_enabled()) and cbuild.plain_memory(t) for t in parts)
            and y.dtype == scale.dtype == v.dtype == dots.dtype == torch.float32 and group.dtype == torch.int64
            and scale.shape == v.shape == group.shape == (y.shape[0],) and dots.dim() == 2
            and dots.shape[1] == y.shape[1] and dots.shape[0] > 0 and _enabled and available()):
        return False
    return _ids_in(group, dots.shape[0])


@compiled.disable_tracing
def _bhq_inverse(lib: ctypes.CDLL, y: torch.Tensor, dots: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                 group: torch.Tensor, overwrite: bool, threads: int) -> torch.Tensor:
    r, d = y.shape
    dots, scale, group = dots.contiguous(), scale.contiguous(), group.contiguous()
    v2 = (2 * v).contiguous()  # the reference's 2 * v[:, None], exact
    out = y if overwrite else torch.empty(r, d, dtype=torch.float32, device="cpu")
    lib.lowbit_bhq_inverse_rows(y.data_ptr(), r, d, y.stride(0) if r > 1 else d, scale.data_ptr(), v2.data_ptr(),
                                group.data_ptr(), dots.data_ptr(), out.data_ptr(), out.stride(0) if r > 1 else d,
                                threads)
    torch.autograd.graph.increment_version(out)  # written through its pointer (y itself with overwrite)
    return out


def run_bhq_inverse(y: torch.Tensor, dots: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                    group: torch.Tensor, out_dtype: torch.dtype, overwrite: bool = False) -> torch.Tensor:
    """BHQ's inverse ``S⁻¹(y − 2v·dots[group])`` (``lowbit.quantizers.bhq``'s
    ``bhq_inverse``) of float32 rows on the kernel, after :func:`supports_bhq_inverse`:
    bitwise the reference's values; written over ``y`` with ``overwrite`` (the caller's
    fresh tensor), else to a new one."""
    with scope("lowbit::avx512_bhq_inverse"):
        return _bhq_inverse(_library(), y, dots, scale, v, group, overwrite, torch.get_num_threads())


def supports_bhq_sums_inverse(y: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, t: object,
                              out_dtype: torch.dtype, overwrite: bool = False) -> bool:
    """Whether :func:`run_bhq_sums_inverse` takes this call: float32 ``y`` (N, D) with
    contiguous rows (apart in memory where ``overwrite``), ``v`` and ``scale`` (N,)
    float32 on the CPU, outside autograd recording, a float32 result; ``t`` a
    ``BlockHouseholder`` whose index the kernel may read (:func:`_index_ok`)."""
    parts = (y, scale, v)
    return out_dtype == torch.float32 and y.dim() == 2 and _rows_contiguous(y) and y.shape[1] > 0 \
        and (not overwrite or _rows_apart(y)) \
        and all(type(a) is torch.Tensor and a.layout == torch.strided and a.device.type == "cpu"
                and not (a.requires_grad and torch.is_grad_enabled()) for a in parts) \
        and y.dtype == scale.dtype == v.dtype == torch.float32 and scale.shape == v.shape == (y.shape[0],) \
        and _enabled and available() and _index_ok(t, y.shape[0])


@compiled.disable_tracing
def _bhq_sums_inverse(lib: ctypes.CDLL, y: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                      crow: torch.Tensor, members: torch.Tensor, n_groups: int, overwrite: bool,
                      threads: int, v2: torch.Tensor | None = None) -> torch.Tensor:
    r, d = y.shape
    v, scale, crow, members = v.contiguous(), scale.contiguous(), crow.contiguous(), members.contiguous()
    _check_csr(lib, crow, members, n_groups, r)
    v2 = (2 * v if v2 is None else v2).contiguous()  # the reference's 2 * v[:, None], exact
    out = y if overwrite else torch.empty(r, d, dtype=torch.float32, device="cpu")
    lib.lowbit_bhq_sums_inverse(y.data_ptr(), d, y.stride(0) if r > 1 else d, scale.data_ptr(), v.data_ptr(),
                                v2.data_ptr(), crow.data_ptr(), members.data_ptr(), n_groups, out.data_ptr(),
                                out.stride(0) if r > 1 else d, threads)
    torch.autograd.graph.increment_version(out)  # written through its pointer (y itself with overwrite)
    return out


def run_bhq_sums_inverse(y: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, t: object,
                         out_dtype: torch.dtype, overwrite: bool = False) -> torch.Tensor:
    """BHQ's inverse with its own group sums (``lowbit.quantizers.bhq``'s
    ``bhq_sums_inverse``: ``bhq_group_sums`` of ``y`` weighted by ``v``, then
    ``bhq_inverse``) of float32 rows in one kernel, after
    :func:`supports_bhq_sums_inverse`: bitwise the two ops' values (a NaN's sign bit
    aside, as :func:`run_bhq_group_sums`); each group's rows are summed, then inverted
    while in cache (``y`` read from memory once, no sums written). Written over ``y``
    with ``overwrite``."""
    crow, members = t.csr()  # type: ignore[attr-defined]
    # 2v as the transform keeps it where v is its own (inverse() passes it on in its dtype)
    v2 = _weights(t)[1] if v is t.v else None  # type: ignore[attr-defined]
    with scope("lowbit::avx512_bhq_inverse"):
        return _bhq_sums_inverse(_library(), y, v, scale, crow, members, t.n_groups,  # type: ignore[attr-defined]
                                 overwrite, torch.get_num_threads(), v2)


def supports_bhq_epilogue_inverse(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, k: int,
                                   t: object, out_dtype: torch.dtype) -> bool:
    """Whether :func:`run_bhq_epilogue_inverse` takes this call: what
    :func:`supports_epilogue_into` takes without bias or offsets (``acc`` (…, M, N) int32,
    contiguous; float32 scales per row or one, per column of each entry or one), a
    float32 result, and ``t`` a ``BlockHouseholder`` of ``acc``'s R = …·M rows with
    float32 ``scale`` and ``v`` (R,) whose index the kernel may read (:func:`_index_ok`)."""
    if not (out_dtype == torch.float32 and acc.shape[-1] > 0
            and supports_epilogue_into(acc, a_scale, b_scale, None, None, None, None, k)):
        return False
    rows = acc.numel() // acc.shape[-1]
    parts = (getattr(t, "scale", None), getattr(t, "v", None))
    return all(type(p) is torch.Tensor and p.layout == torch.strided and p.device.type == "cpu"
               and p.dtype == torch.float32 and p.shape == (rows,) and not (p.requires_grad and torch.is_grad_enabled())
               and cbuild.plain_memory(p) for p in parts) and _index_ok(t, rows)


@compiled.disable_tracing
def _bhq_epilogue_inverse(lib: ctypes.CDLL, acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                          t: object, threads: int) -> torch.Tensor:
    sa_rows, sb_cols, sb_bstride = _epilogue_rows_layout(acc, a_scale, b_scale)  # type: ignore[misc]
    m, n = acc.shape[-2], acc.shape[-1]
    rows = acc.numel() // n
    sa, sb = a_scale.contiguous(), b_scale.contiguous()
    v, scale = t.v.contiguous(), t.scale.contiguous()  # type: ignore[attr-defined]
    crow, members = (c.contiguous() for c in t.csr())  # type: ignore[attr-defined]
    _check_csr(lib, crow, members, t.n_groups, rows)  # type: ignore[attr-defined]
    v2 = _weights(t)[1].contiguous()
    lib.lowbit_bhq_epilogue_inverse(acc.data_ptr(), n, m, sa.data_ptr(), int(sa_rows), sb.data_ptr(), int(sb_cols),
                                    sb_bstride, scale.data_ptr(), v.data_ptr(), v2.data_ptr(), crow.data_ptr(),
                                    members.data_ptr(), t.n_groups, threads)  # type: ignore[attr-defined]
    torch.autograd.graph.increment_version(acc)  # written over through its pointer
    return acc.view(torch.float32).view(rows, n)


def run_bhq_epilogue_inverse(acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, k: int, t: object,
                             out_dtype: torch.dtype) -> torch.Tensor:
    """``T⁻¹`` of a GEMM's float32 epilogue (``lowbit.quantizers.bhq``'s op
    ``bhq_epilogue_inverse``: ``int8_epilogue_into``, then ``bhq_sums_inverse`` in place)
    in one kernel, after :func:`supports_bhq_epilogue_inverse`: bit for bit the two ops'
    values (a NaN's sign bit aside, as :func:`run_bhq_sums_inverse`), group by group, the
    int32 sums read from memory once and the (R, N) float32 result written over them."""
    with scope("lowbit::avx512_bhq_epilogue_inverse"):
        return _bhq_epilogue_inverse(_library(), acc, a_scale, b_scale, t, torch.get_num_threads())


def supports_row_absmax(x: torch.Tensor) -> bool:
    """Whether :func:`run_row_absmax` takes this call: ``x`` (R, D), D ≥ 1, float32,
    bfloat16 or float16 with contiguous rows (as :func:`_readable`)."""
    return x.dim() == 2 and x.shape[1] > 0 and _rows_contiguous(x) and _readable(x) and _enabled \
        and available()


def run_row_absmax(x: torch.Tensor) -> torch.Tensor:
    """``max_j |x_ij|`` per row (R,) float32, NaN where the row holds one
    (:func:`lowbit.kernels.reference.row_absmax`, exact: no rounding), after
    :func:`supports_row_absmax`."""
    with scope("lowbit::avx512_row_absmax"):
        return _row_absmax(_library(), x, torch.get_num_threads())


@compiled.disable_tracing
def _row_absmax(lib: ctypes.CDLL, x: torch.Tensor, threads: int) -> torch.Tensor:
    r, d = x.shape
    amax = torch.empty(r, dtype=torch.float32, device="cpu")
    lib.lowbit_row_absmax(x.data_ptr(), DTYPES[x.dtype], r, d, x.stride(0) if r > 1 else d, amax.data_ptr(),
                          threads)
    return amax


def _row_absmax_self_test(lib: ctypes.CDLL, x: torch.Tensor) -> bool:
    """The row absmax against :func:`lowbit.kernels.reference.row_absmax`: NaN and ±Inf
    rows, −0.0, strided rows, one row, bfloat16 and float16, one and two threads."""
    from .reference import row_absmax as ref

    z = torch.zeros(3, 20, dtype=torch.float32, device="cpu")
    z[1] = -0.0
    z[2, 19] = float("-inf")
    for a in (x, x[:, 1:], x[:1], z, x.bfloat16(), x.nan_to_num(0.0).half()):
        for threads in cbuild.test_threads(1, 2):
            if not _same(_row_absmax(lib, a, threads), ref(a)):
                return False
    return True


@compiled.disable_tracing
def _bhq_group_sums(lib: ctypes.CDLL, x: torch.Tensor, w: torch.Tensor, crow: torch.Tensor,
                    members: torch.Tensor, n_groups: int, threads: int) -> torch.Tensor:
    d = x.shape[1]
    w, crow, members = w.contiguous(), crow.contiguous(), members.contiguous()
    _check_csr(lib, crow, members, n_groups, x.shape[0])
    dots = torch.empty(n_groups, d, dtype=torch.float32, device="cpu")
    lib.lowbit_bhq_group_sums(x.data_ptr(), DTYPES[x.dtype], d, x.stride(0) if x.shape[0] > 1 else d,
                              w.data_ptr(), crow.data_ptr(), members.data_ptr(), n_groups, dots.data_ptr(),
                              threads)
    return dots


def supports_bhq_group_sums(x: torch.Tensor, w: torch.Tensor, t: object) -> bool:
    """Whether :func:`run_bhq_group_sums` takes this call: ``x`` (N, D) float32, bfloat16 or
    float16 with contiguous rows (as :func:`_readable`), ``w`` (N,) float32 on the CPU,
    outside autograd recording; ``t`` a ``BlockHouseholder`` whose CSR index the kernel may
    read (:func:`_index_ok`: a user-built one with a wrong index made it read outside ``x``)."""
    return x.dim() == 2 and _rows_contiguous(x) and _readable(x) and type(w) is torch.Tensor \
        and w.layout == torch.strided and w.device.type == "cpu" and w.dtype == torch.float32 \
        and w.shape == (x.shape[0],) and not (w.requires_grad and torch.is_grad_enabled()) \
        and _enabled and available() and _index_ok(t, x.shape[0])


def run_bhq_group_sums(x: torch.Tensor, w: torch.Tensor, t: object) -> torch.Tensor:
    """BHQ's group sums ``dots[j] = Σ_{r∈j} w_r x_r`` (G, D) float32 (``lowbit.quantizers.bhq``'s
    ``bhq_group_sums``: each group's rows added one by one in ascending order, each
    product rounded first), after :func:`supports_bhq_group_sums`: bitwise the
    reference's on the CPU, but for the sign bit of a NaN (the operands of an addition
    come in another order, and x86 passes on the first NaN's sign: a review). ``t``: the ``BlockHouseholder`` whose groups are summed."""
    crow, members = t.csr()  # type: ignore[attr-defined]
    with scope("lowbit::avx512_bhq_group_sums"):
        return _bhq_group_sums(_library(), x, w, crow, members, t.n_groups,  # type: ignore[attr-defined]
                               torch.get_num_threads())


HADAMARD_MAX_BLOCK = 256  # the C kernel's HAD_MAX_B: a tile of b rows × 16 columns in registers/L1


def _hadamard_block_ok(block: int, rows: int, n: int) -> bool:
    return 0 < block <= HADAMARD_MAX_BLOCK and block & (block - 1) == 0 and rows % block == 0 and rows >= n


def _plain_f32(t: torch.Tensor, n: int) -> bool:
    return (type(t) is torch.Tensor and t.layout == torch.strided and t.device.type == "cpu"
            and t.dtype == torch.float32 and tuple(t.shape) == (n,) and cbuild.plain_memory(t))


def supports_hadamard(x: torch.Tensor, m: torch.Tensor, rows: int, block: int, wide: tuple[float, float], fmt: Format,
                      granularity: Granularity, rounding: Rounding, seed: torch.Tensor) -> bool:
    """Whether :func:`hadamard_forward_quantize` takes this call: ``x`` (N, D) as
    :func:`supports` with contiguous rows on a symmetric int8 grid, one scale per row,
    ``m`` (rows,) float32 on the CPU, ``block`` a power of two ≤
    :data:`HADAMARD_MAX_BLOCK` dividing ``rows ≥ N``."""
    return (supports(x, fmt, granularity, rounding, seed) and _int_grid(fmt) and _rows_contiguous(x)
            and granularity is Granularity.ROW
            and _hadamard_block_ok(block, rows, x.shape[0]) and _plain_f32(m, rows))


def _had_status(status: int) -> bool:
    """Whether a Hadamard kernel's result stands: 0 yes, 1 a wide block (the reference
    runs instead), -1 ``MemoryError`` (its tile buffer)."""
    if status < 0:
        raise MemoryError("lowbit's AVX-512 Hadamard kernel could not allocate its tile buffer")
    return status == 0


@compiled.disable_tracing
def _hadamard_quantize(lib: ctypes.CDLL, x: torch.Tensor, m: torch.Tensor, rows: int, block: int,
                       wide: tuple[float, float], fmt: Format, granularity: Granularity, rounding: Rounding,
                       seed: torch.Tensor, threads: int, columns: bool = False, entry_rows: int = 0
                       ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``lowbit_had_quantize``: (codes (rows, D) int8, steps (rows, 1) — both ``None``
    where a block is wide —, ``x``'s column absmax where ``columns``: (D, 1), or with
    ``entry_rows`` > 0 each entry's (N / entry_rows · D, 1); else ``None``)."""
    n, d = x.shape
    qmax = float(fmt.emax)
    q_hi = _q_hi(qmax)
    step = torch.empty(rows, 1, dtype=torch.float32, device="cpu")
    codes = torch.empty(rows, d, dtype=torch.int8, device="cpu")
    entry_rows = entry_rows if columns else 0
    ncm = (n // entry_rows if entry_rows else 1) * d
    camax = torch.empty(ncm, 1, dtype=torch.float32, device="cpu") if columns else None
    scratch = torch.empty(max(threads, 1) * ncm, dtype=torch.float32, device="cpu") if columns else None
    m = m.contiguous()  # held for the call (HELD_FOR_C)
    status = lib.lowbit_had_quantize(x.data_ptr(), DTYPES[x.dtype], n, rows, d, x.stride(0) if n > 1 else d, block,
                                     m.data_ptr(), *wide, q_hi, 1.0 / q_hi, _seed(seed, rounding),
                                     int(rounding is Rounding.STOCHASTIC), qmax, step.data_ptr(), codes.data_ptr(),
                                     None if camax is None else camax.data_ptr(), entry_rows,
                                     None if scratch is None else scratch.data_ptr(), threads)
    return (codes, step, camax) if _had_status(status) else (None, None, camax)


def hadamard_forward_quantize(x: torch.Tensor, m: torch.Tensor, rows: int, block: int, wide: tuple[float, float],
                              fmt: Format,
                              granularity: Granularity, rounding: Rounding, seed: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor, None, None] | None:
    """The randomized block Hadamard transform and the quantizer in one pass pair
    (``lowbit.quantizers.hadamard``'s ``_forward_quantize``; ``T x`` is never written to
    memory):
    ``x`` (N, D) zero-padded to ``rows`` rows, each row times ``m[r]`` (its sign times
    ``1/√block``), the Walsh–Hadamard butterflies on each ``block`` rows, then
    :func:`quantize`'s arithmetic → ``(codes (rows, D) int8, step, None, None)``,
    bitwise the reference's; ``None`` where a block of ``b`` rows of ``x`` has its largest
    magnitude above ``wide[0]`` or in ``(0, wide[1])`` (the reference then transforms in
    float64). Each block of rows is read once into a per-thread buffer of 16-column tiles
    (``block`` × D floats, in L2 at GEMM widths), transformed and quantized there.
    ``MemoryError`` if that buffer cannot be allocated; ``RuntimeError`` where :func:`supports_hadamard` is false."""
    _check("hadamard_forward_quantize", supports_hadamard(x, m, rows, block, wide, fmt, granularity, rounding, seed),
           f"{fmt.name}, {x.dtype} {tuple(x.shape)} {tuple(x.stride())} strides, block {block}, {rows} rows")
    with scope("lowbit::avx512_hadamard_quantize"):
        codes, step, _ = _hadamard_quantize(_library(), x, m, rows, block, wide, fmt, granularity, rounding, seed,
                                            torch.get_num_threads())
    return None if codes is None else (codes, step, None, None)


def supports_hadamard_pair(x: torch.Tensor, m: torch.Tensor, rows: int, block: int, wide: tuple[float, float],
                           fmt_a: Format, gran_a: Granularity, rnd_a: Rounding, seed_a: torch.Tensor,
                           fmt_w: Format, gran_w: Granularity, rnd_w: Rounding, seed_w: torch.Tensor,
                           entries: int = 0) -> bool:
    """Whether :func:`hadamard_quantize_pair` takes this call: the rows as
    :func:`supports_hadamard` takes them, the columns as :func:`supports_bhq_pair` takes
    its own, ``entries`` 0 or a positive int dividing ``x``'s rows."""
    return (isinstance(entries, int) and not isinstance(entries, bool) and entries >= 0
            and _columns_ok(fmt_w, gran_w, rnd_w, seed_w)
            and supports_hadamard(x, m, rows, block, wide, fmt_a, gran_a, rnd_a, seed_a)
            and (entries == 0 or x.shape[0] % entries == 0))


@compiled.disable_tracing
def hadamard_quantize_pair(x: torch.Tensor, m: torch.Tensor, rows: int, block: int, wide: tuple[float, float],
                           fmt_a: Format, gran_a: Granularity, rnd_a: Rounding, seed_a: torch.Tensor,
                           fmt_w: Format, gran_w: Granularity, rnd_w: Rounding, seed_w: torch.Tensor,
                           entries: int = 0) -> tuple[torch.Tensor | None, ...]:
    """A layer's two gradient quantizations where ``∇X``'s is the randomized block
    Hadamard transform: :func:`hadamard_forward_quantize`'s codes of ``T x`` (rows, D) and
    :func:`quantize`'s of ``x``'s columns — ``xᵀ`` (D, N), or with ``entries`` > 0 (``x``
    a batch of that many entries of N / entries rows: attention's heads) each entry's
    transpose (entries · D, N / entries) — the columns' ranges taken in the rows' read
    (``lowbit_had_quantize``), then the columns' codes: ``(codes_a, step_a, codes_w,
    step_w)``, bitwise those kernels' values; ``codes_a`` and ``step_a`` ``None`` where a
    block is wide (:func:`hadamard_forward_quantize`'s ``None``: the caller runs the
    reference for the rows). ``MemoryError`` if the tile buffer cannot be allocated;
    ``RuntimeError`` where :func:`supports_hadamard_pair` is false."""
    _check("hadamard_quantize_pair", supports_hadamard_pair(x, m, rows, block, wide, fmt_a, gran_a, rnd_a, seed_a,
                                                            fmt_w, gran_w, rnd_w, seed_w, entries),
           f"{fmt_a.name}/{fmt_w.name}, {x.dtype} {tuple(x.shape)} {tuple(x.stride())} strides, block {block}, "
           f"{rows} rows, entries {entries!r}")
    return run_hadamard_quantize_pair(x, m, rows, block, wide, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w,
                                      seed_w, entries)


@compiled.disable_tracing
def run_hadamard_quantize_pair(x: torch.Tensor, m: torch.Tensor, rows: int, block: int, wide: tuple[float, float],
                               fmt_a: Format, gran_a: Granularity, rnd_a: Rounding, seed_a: torch.Tensor,
                               fmt_w: Format, gran_w: Granularity, rnd_w: Rounding, seed_w: torch.Tensor,
                               entries: int = 0) -> tuple[torch.Tensor | None, ...]:
    """:func:`hadamard_quantize_pair` without its checks (the dispatcher's kernel, after
    :func:`supports_hadamard_pair`: ``lowbit.quantizers.hadamard``'s native op checks it)."""
    lib, threads = _library(), torch.get_num_threads()
    with scope("lowbit::avx512_hadamard_quantize_pair"):
        codes_a, step_a, camax = _hadamard_quantize(lib, x, m, rows, block, wide, fmt_a, gran_a, rnd_a, seed_a,
                                                    threads, columns=True,
                                                    entry_rows=x.shape[0] // entries if entries else 0)
        codes_w, step_w = _column_codes(lib, x, camax, entries, fmt_w, gran_w, rnd_w, seed_w,  # type: ignore[arg-type]
                                        threads)
    return codes_a, step_a, codes_w, step_w


def supports_hadamard_forward(x: torch.Tensor, m: torch.Tensor, rows: int, block: int) -> bool:
    """Whether :func:`hadamard_forward` takes this call: ``x`` (N, D), ``D > 0``, float32,
    bfloat16 or float16 with contiguous rows, outside autograd recording and tracing;
    ``m`` and ``block`` as :func:`supports_hadamard`'s."""
    return (x.dim() == 2 and x.shape[1] > 0 and _rows_contiguous(x) and _readable(x)
            and _hadamard_block_ok(block, rows, x.shape[0]) and _plain_f32(m, rows) and _enabled and available())


@compiled.disable_tracing
def _hadamard_forward(lib: ctypes.CDLL, x: torch.Tensor, m: torch.Tensor, rows: int, block: int,
                      wide: tuple[float, float], threads: int) -> torch.Tensor | None:
    n, d = x.shape
    out = torch.empty(rows, d, dtype=torch.float32, device="cpu")
    ones = torch.ones(rows, dtype=torch.float32, device="cpu")
    m = m.contiguous()  # held for the call (HELD_FOR_C)
    status = lib.lowbit_had_forward(x.data_ptr(), DTYPES[x.dtype], n, rows, d, x.stride(0) if n > 1 else d, block,
                                    m.data_ptr(), ones.data_ptr(), *wide, out.data_ptr(), d, threads)
    return out if _had_status(status) else None


def hadamard_forward(x: torch.Tensor, m: torch.Tensor, rows: int, block: int,
                     wide: tuple[float, float]) -> torch.Tensor | None:
    """``T x`` (rows, D) float32 of ``x`` (N, D) zero-padded to ``rows`` rows, as
    :func:`hadamard_forward_quantize` transforms it, written out (for formats the fused
    quantizer does not take): bitwise ``lowbit.quantizers.hadamard``'s ``_forward``;
    ``None`` where a block is wide. ``RuntimeError`` where
    :func:`supports_hadamard_forward` is false."""
    _check("hadamard_forward", supports_hadamard_forward(x, m, rows, block),
           f"{x.dtype} {tuple(x.shape)} {tuple(x.stride())} strides, block {block}, {rows} rows")
    with scope("lowbit::avx512_hadamard_forward"):
        return _hadamard_forward(_library(), x, m, rows, block, wide, torch.get_num_threads())


def supports_hadamard_inverse(y: torch.Tensor, signs: torch.Tensor, block: int, n_out: int) -> bool:
    """Whether :func:`hadamard_inverse` takes this call: float32 ``y`` (rows, D) with
    contiguous rows, ``D > 0``, ``signs`` (rows,) float32, ``block`` as
    :func:`supports_hadamard`'s, ``n_out ≤ rows``, plain CPU tensors outside autograd
    recording and tracing."""
    return (y.dim() == 2 and y.dtype == torch.float32 and y.shape[1] > 0 and _rows_contiguous(y)
            and _readable(y, (torch.float32,)) and _plain_f32(signs, y.shape[0])
            and _hadamard_block_ok(block, y.shape[0], n_out) and _enabled and available())


@compiled.disable_tracing
def _hadamard_inverse(lib: ctypes.CDLL, y: torch.Tensor, signs: torch.Tensor, block: int, c: float,
                      wide: tuple[float, float], n_out: int, threads: int, overwrite: bool = False
                      ) -> torch.Tensor | None:
    rows, d = y.shape
    out = y if overwrite else torch.empty(n_out, d, dtype=torch.float32, device="cpu")
    ld = y.stride(0) if rows > 1 else d
    signs = signs.contiguous()  # held for the call (HELD_FOR_C)
    status = lib.lowbit_had_inverse(y.data_ptr(), rows, d, ld, block, c, signs.data_ptr(), *wide,
                                    out.data_ptr(), n_out, ld if overwrite else d, threads)
    if overwrite and status != 1:  # written through its pointer (out of memory: some threads' parts, -1)
        torch.autograd.graph.increment_version(y)  # autograd's in-place check sees it; wide (1): nothing written
    if not _had_status(status):
        return None
    return out[:n_out] if overwrite else out


def hadamard_inverse(y: torch.Tensor, signs: torch.Tensor, block: int, c: float, wide: tuple[float, float],
                     n_out: int, overwrite: bool = False) -> torch.Tensor | None:
    """``T⁻¹ y = D·H y`` of a float32 (rows, D) ``y``, its first ``n_out`` rows as a
    float32 tensor: each row times ``c`` (the float32 ``1/√block``), the butterflies,
    then times its sign — bitwise ``lowbit.quantizers.hadamard``'s ``_inverse``; ``None``
    where a block of ``y`` is wide (as :func:`hadamard_forward_quantize`'s: the reference
    then runs in float64). With ``overwrite`` (``y`` the caller's fresh tensor, its rows
    apart in memory) the result is written over ``y`` (its first ``n_out`` rows, a view;
    ``y`` left as it was where a block is wide); else a new tensor.
    ``RuntimeError`` where :func:`supports_hadamard_inverse` is false."""
    _check("hadamard_inverse", supports_hadamard_inverse(y, signs, block, n_out),
           f"{y.dtype} {tuple(y.shape)} {tuple(y.stride())} strides, block {block}, {n_out} rows out")
    with scope("lowbit::avx512_hadamard_inverse"):
        return _hadamard_inverse(_library(), y, signs, block, c, wide, n_out, torch.get_num_threads(),
                                 overwrite and _rows_apart(y))


def supports_cl_rows(t: torch.Tensor) -> bool:
    """Whether :func:`cl_rows` takes ``t``: a float32 (N, C, *spatial) CPU tensor, at least
    3-D, whose channels lie innermost in memory with each sample's positions dense
    (channels-last: ``t.movedim(1, -1)[i]`` contiguous), samples apart, outside autograd
    recording and tracing, on a machine where the kernel runs."""
    if not (t.dim() >= 3 and _readable(t, (torch.float32,)) and _enabled and available()):
        return False
    inner = t.movedim(1, -1)
    return inner[0].is_contiguous() and (t.shape[0] == 1 or t.stride(0) >= inner[0].numel())


@compiled.disable_tracing
def cl_rows(t: torch.Tensor) -> torch.Tensor:
    """``t.reshape(N, -1)`` of a channels-last ``t`` (:func:`supports_cl_rows`): its rows
    (N, C·spatial) in NCHW order, a new contiguous tensor, the same values — each sample's
    (positions, channels) matrix transposed in 16 × 16 tiles in registers
    (``lowbit_cl_rows``) instead of torch's strided copy (≈ 5× the time at (128, 16, 28, 28):
    docs/benchmarks.md "Hadamard's pair…"). ``RuntimeError`` where
    :func:`supports_cl_rows` is false."""
    _check("cl_rows", supports_cl_rows(t), f"{t.dtype} {tuple(t.shape)} {tuple(t.stride())} strides")
    n, c = t.shape[0], t.shape[1]
    length = t[0, 0].numel()
    out = torch.empty(n, c * length, dtype=torch.float32, device="cpu")
    with scope("lowbit::avx512_cl_rows"):
        _library().lowbit_cl_rows(t.data_ptr(), n, c, length, t.stride(0) if n > 1 else c * length, out.data_ptr(),
                                  torch.get_num_threads())
    return out


def _self_test(lib: ctypes.CDLL) -> bool:
    """The kernel's codes and steps equal the reference's: random rows with tails, an
    all-zero row, NaN and ±Inf rows, float32, bfloat16 and float16, row-major and
    transposed operands, int8 and int4, per row and per tensor, stochastic and nearest,
    both functions, with one thread and with two."""
    from ..formats import parse_format
    from .reference import quantize as ref

    cpu = {"dtype": torch.float32, "device": "cpu"}  # whatever torch's defaults are
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 53, generator=g, **cpu) * torch.logspace(-3, 3, 53, **cpu)
    x[3] = 0.0
    x[5, 7], x[6, 0], x[6, 9] = float("nan"), float("inf"), -float("inf")
    seed = torch.tensor(0xDEADBEEF, device="cpu")
    cases = [(x, Granularity.ROW), (x[:, 2:40], Granularity.ROW), (x[7:], Granularity.TENSOR),
             (x.bfloat16(), Granularity.ROW), (x[:, 2:40].half(), Granularity.TENSOR),
             (x.t(), Granularity.ROW), (x[:30, 1:].bfloat16().t(), Granularity.TENSOR)]
    for fmt in (parse_format("int8"), parse_format("int4")):
        for a, gran in cases:
            for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
                want = ref(a, fmt, gran, rnd, seed)
                want_t = ref(a.t(), fmt, gran, rnd, seed)
                for threads in cbuild.test_threads(1, 2):
                    codes, step = _quantize(lib, a, fmt, gran, rnd, seed, threads)
                    if not (torch.equal(codes, want[0]) and _same(step, want[1])):
                        return False
                    if not _rows_contiguous(a):
                        continue
                    pair = _quantize_pair(lib, a, fmt, gran, rnd, seed, fmt, gran, rnd, seed, threads)
                    if not (torch.equal(pair[0], want[0]) and _same(pair[1], want[1])
                            and torch.equal(pair[2], want_t[0]) and _same(pair[3], want_t[1])):
                        return False
    return _steps_self_test(lib) and _batched_pair_self_test(lib, x) and _conv_pair_self_test(lib, x) \
        and _epilogue_self_test(lib) and _epilogue_rows_self_test(lib) and _bhq_self_test(lib, x) \
        and _place_self_test(lib) and _hadamard_self_test(lib, x) and _row_absmax_self_test(lib, x) \
        and _cl_rows_self_test(lib, x)


def _cl_rows_self_test(lib: ctypes.CDLL, x: torch.Tensor) -> bool:
    """The channels-last transpose against torch's reshape: channel and position tails
    (17 channels, 45 positions), NaN and ±Inf carried, one and two threads."""
    t = torch.cat([x.flatten(), x.flatten()])[:3 * 17 * 45].reshape(3, 17, 5, 9).contiguous(
        memory_format=torch.channels_last)
    want = t.reshape(3, -1)
    for threads in cbuild.test_threads(1, 2):
        out = torch.empty(3, 17 * 45, dtype=torch.float32, device="cpu")
        lib.lowbit_cl_rows(t.data_ptr(), 3, 17, 45, t.stride(0), out.data_ptr(), threads)
        if not _same(out, want):
            return False
    return True


def _epilogue_rows_self_test(lib: ctypes.CDLL) -> bool:
    """The in-place row-major epilogue against the reference: 2-D and batched
    accumulators, column tails, per-row/per-tensor and per-column (shared or per entry)
    scales, with and without a bias, a NaN and an infinite scale, one and two threads."""
    from .reference import int8_epilogue as ref

    cpu = {"dtype": torch.float32, "device": "cpu"}  # whatever torch's defaults are
    g = torch.Generator().manual_seed(5)
    acc = torch.randint(-2**30, 2**30, (3, 7, 37), generator=g, dtype=torch.int32, device="cpu")
    sa = torch.rand(3, 7, 1, generator=g, **cpu)
    sb = torch.rand(3, 1, 37, generator=g, **cpu)
    sa[1, 2, 0], sb[2, 0, 5] = float("nan"), float("inf")
    bias = torch.randn(37, generator=g, **cpu)
    cases = [(acc, sa, sb, None), (acc, sa[:1, :1], sb[:1], bias), (acc, sa, sb[:1, :, :1], None),
             (acc[0], sa[0], sb[0], bias), (acc[0, :, :16].contiguous(), sa[0, :, :1][:1], sb[0, :, :16], None)]
    for a, s_a, s_b, b in cases:
        want = ref(a, s_a, s_b, None, None, None, None, 0, b, torch.float32)
        for threads in cbuild.test_threads(1, 2):
            got = a.clone()
            _epilogue_into(lib, got, s_a, s_b, b, threads)
            if not _same(got.view(torch.float32), want):
                return False
    return True


def _fp8_self_test(lib: ctypes.CDLL) -> bool:
    """E4M3 and E5M2 codes (compared as bytes) and steps against the reference: random
    rows over many binades (so that elements land in the subnormal range), an all-zero
    row, NaN and ±Inf rows, −0.0, float32 and bfloat16, row-major and transposed, per row
    and per tensor, stochastic and nearest, the pair, the batched pair and the
    convolution pair, one and two threads."""
    from ..formats import parse_format
    from .reference import quantize as ref

    cpu = {"dtype": torch.float32, "device": "cpu"}  # whatever torch's defaults are
    g = torch.Generator().manual_seed(6)
    x = torch.randn(37, 53, generator=g, **cpu) * torch.logspace(-6, 3, 53, **cpu)
    x[3] = 0.0
    x[4, :5] = -0.0
    x[5, 7], x[6, 0], x[6, 9] = float("nan"), float("inf"), -float("inf")
    seed_a, seed_w = torch.tensor(0x1234567, device="cpu"), torch.tensor(0xFEDCBA98, device="cpu")

    def same(got: tuple, want: tuple) -> bool:
        return all(_same_fp8(gc, wc) and _same(gs, ws)
                   for gc, gs, wc, ws in zip(got[::2], got[1::2], want[::2], want[1::2]))

    for name in ("fp8_e4m3", "fp8_e5m2"):
        fmt = parse_format(name)
        for a, gran in ((x, Granularity.ROW), (x[:, 2:40], Granularity.TENSOR), (x.bfloat16(), Granularity.ROW),
                        (x.t(), Granularity.ROW), (x[7:].t(), Granularity.TENSOR)):
            for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
                want = ref(a, fmt, gran, rnd, seed_a)[:2]
                want_t = ref(a.t(), fmt, gran, rnd, seed_w)[:2]
                for threads in cbuild.test_threads(1, 2):
                    if not same(_quantize(lib, a, fmt, gran, rnd, seed_a, threads), want):
                        return False
                    if _rows_contiguous(a) and not same(
                            _quantize_pair(lib, a, fmt, gran, rnd, seed_a, fmt, gran, rnd, seed_w, threads),
                            (*want, *want_t)):
                        return False
        g3 = x[:36].reshape(4, 9, 53)
        for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
            want = (*ref(g3.reshape(36, 53), fmt, Granularity.ROW, rnd, seed_a)[:2],
                    *ref(g3.mT.reshape(4 * 53, 9), fmt, Granularity.ROW, rnd, seed_w)[:2])
            c3 = x[:36, :52].reshape(4, 9, 52)
            want_c = (*ref(c3.reshape(4, -1), fmt, Granularity.ROW, rnd, seed_a)[:2],
                      *ref(c3.transpose(0, 1).reshape(9, -1), fmt, Granularity.ROW, rnd, seed_w)[:2])
            for threads in cbuild.test_threads(1, 2):
                got = _quantize_pair(lib, g3, fmt, Granularity.ROW, rnd, seed_a, fmt, Granularity.ROW, rnd,
                                     seed_w, threads)
                got_c = _quantize_conv_pair(lib, c3, fmt, Granularity.ROW, rnd, seed_a, fmt, Granularity.ROW,
                                            rnd, seed_w, threads)
                if not (same(got, want) and same(got_c, want_c)):
                    return False
    return True


def _steps_self_test(lib: ctypes.CDLL) -> bool:
    """The C steps against :func:`lowbit.formats.grid_step`: zero, subnormals, values over
    the whole float32 range, the largest finite value, ±Inf and NaN, per row and per
    tensor (with and without a NaN), on every integer grid's ``emax``."""
    from ..formats import parse_format

    cpu = {"dtype": torch.float32, "device": "cpu"}  # whatever torch's defaults are
    g = torch.Generator().manual_seed(9)
    tiny = torch.finfo(torch.float32).tiny
    a = torch.cat([torch.tensor([0.0, 1e-45, 3e-42, tiny, tiny * 1.5, 1.0, 127.0, 3.4028235e38,
                                 float("inf"), float("nan")], **cpu),
                   torch.exp(torch.empty(300, **cpu).uniform_(-100, 88, generator=g))]).reshape(-1, 1)
    for bits in range(2, 9):
        fmt = parse_format(f"int{bits}")
        for amax, gran in ((a, Granularity.ROW), (a[:-301], Granularity.TENSOR), (a, Granularity.TENSOR)):
            ref = amax.amax().reshape(1, 1) if gran is Granularity.TENSOR else amax
            want = grid_step(ref, fmt.emax)
            step, div = _steps(lib, amax, fmt, gran)
            if not (_same(step, want) and _same(div, torch.where(ref == 0, torch.ones_like(want), want))):
                return False
    return True


def _batched_pair_self_test(lib: ctypes.CDLL, x: torch.Tensor) -> bool:
    """The pair of a batch (B, N, out) against the reference on the batch's rows and on
    each entry's transpose: contiguous, strided entries and bfloat16; fewer entries than
    threads and more; a part of the batch (``first``) against the whole batch's codes."""
    from ..formats import parse_format
    from .reference import quantize as ref

    g3 = x[:36].reshape(4, 9, 53)
    seed_a, seed_w = torch.tensor(5, device="cpu"), torch.tensor(0xABCDEF01, device="cpu")
    for a, gran in ((g3, Granularity.ROW), (g3[:, :, 3:50], Granularity.ROW), (g3[:1].bfloat16(), Granularity.TENSOR)):
        b, n, c = a.shape
        for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
            fmt = parse_format("int8" if rnd is Rounding.STOCHASTIC else "int4")
            want_a = ref(a.reshape(b * n, c), fmt, gran, rnd, seed_a)
            want_w = ref(a.mT.reshape(b * c, n), fmt, gran, rnd, seed_w)
            for threads in cbuild.test_threads(1, 2):
                got = _quantize_pair(lib, a, fmt, gran, rnd, seed_a, fmt, gran, rnd, seed_w, threads)
                if not (torch.equal(got[0], want_a[0]) and _same(got[1], want_a[1])
                        and torch.equal(got[2], want_w[0]) and _same(got[3], want_w[1])):
                    return False
                if gran is Granularity.ROW and b > 2:  # entries 1, 2 alone: the whole batch's rows
                    part = _quantize_pair(lib, a[1:3], fmt, gran, rnd, seed_a, fmt, gran, rnd, seed_w, threads, 1)
                    if not (torch.equal(part[0], want_a[0][n:3 * n]) and torch.equal(part[2], want_w[0][c:3 * c])):
                        return False
    return True


def _epilogue_self_test(lib: ctypes.CDLL) -> bool:
    """The NCHW and NHWC epilogues against the reference: int32 and float32 accumulators, channel
    and position tails, per-sample/per-channel and per-tensor scales, with and without a
    bias, a NaN and an infinite scale."""
    from .im2col import epilogue_nchw as ref
    from .im2col import epilogue_nhwc as ref_nhwc

    cpu = {"dtype": torch.float32, "device": "cpu"}  # whatever torch's defaults are
    g = torch.Generator().manual_seed(2)
    acc = torch.randint(-2**20, 2**20, (3, 5, 7, 19), generator=g, dtype=torch.int32, device="cpu")
    sa = torch.rand(3, 1, 1, 1, generator=g, **cpu)
    sb = torch.rand(1, 1, 1, 19, generator=g, **cpu)
    sb[0, 0, 0, 4], sa[2] = float("nan"), float("inf")
    bias = torch.randn(19, generator=g, **cpu)
    for a in (acc, acc.float(), acc[:, :3, :6, :16].contiguous()):
        c = a.shape[-1]
        for s_a, s_b, b in ((sa, sb[..., :c], bias[:c]), (sa[:1], sb[..., :1], None)):
            for threads in cbuild.test_threads(1, 2):
                if not _same(_epilogue_nchw(lib, a, s_a, s_b, b, threads), ref(a, s_a, s_b, b, torch.float32)):
                    return False
                if not _same(_epilogue_nhwc(lib, a.clone(), s_a, s_b, b, threads),
                             ref_nhwc(a, s_a, s_b, b, torch.float32)):
                    return False
    return True


def _conv_pair_self_test(lib: ctypes.CDLL, x: torch.Tensor) -> bool:
    """The convolution pair, and its ``∇W`` side alone, against the reference on ``x``'s
    values as (N, C, L) with segment tails, a strided view and bfloat16, per row and per
    tensor."""
    from ..formats import parse_format
    from .reference import quantize as ref

    g3 = x[:36, :52].reshape(4, 9, 52)
    g20 = x[:36, :50].reshape(2, 18, 50)[:, :, :45]  # 18 channels: a channel tail in a 16 × 16 tile

    def cl(t: torch.Tensor) -> torch.Tensor:  # the same values, channels-last
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    seed_a, seed_w = torch.tensor(77, device="cpu"), torch.tensor(0xFFFFFFFF, device="cpu")
    for a, gran in ((g3, Granularity.ROW), (g3[:, 1:, 3:50], Granularity.ROW),
                    (g3.bfloat16(), Granularity.TENSOR), (cl(g3), Granularity.ROW),
                    (cl(g20), Granularity.ROW), (cl(g20).half(), Granularity.TENSOR),
                    (cl(g3.bfloat16())[:, 2:, 1:], Granularity.ROW)):
        n, c, length = a.shape
        for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
            fmt = parse_format("int8" if rnd is Rounding.STOCHASTIC else "int4")
            want_a = ref(a.reshape(n, -1), fmt, gran, rnd, seed_a)
            want_w = ref(a.transpose(0, 1).reshape(c, -1), fmt, gran, rnd, seed_w)
            for threads in cbuild.test_threads(1, 2):
                got = _quantize_conv_pair(lib, a, fmt, gran, rnd, seed_a, fmt, gran, rnd, seed_w, threads)
                if not (torch.equal(got[0], want_a[0]) and _same(got[1], want_a[1])
                        and torch.equal(got[2], want_w[0]) and _same(got[3], want_w[1])):
                    return False
                codes_w, step_w = _quantize_conv_w(lib, a, fmt, gran, rnd, seed_w, threads)  # ∇W side alone
                if not (torch.equal(codes_w, want_w[0]) and _same(step_w, want_w[1])):
                    return False
    return True


def _bhq_self_test(lib: ctypes.CDLL, x: torch.Tensor) -> bool:
    """BHQ's fused transform-and-quantize against ``bhq._forward_quantize``, its pair with
    the columns against ``bhq._forward_quantize_pair`` on the reference kernels, and its
    inverse against ``bhq._apply_inverse`` (out of place, in place, strided rows), on a
    random transform of ``x``'s rows (groups of 1–4 rows)."""
    from ..formats import parse_format
    from ..quantizers.bhq import _apply_inverse, _forward_quantize

    cpu = {"dtype": torch.float32, "device": "cpu"}
    g = torch.Generator().manual_seed(1)
    n, d = x.shape
    group = torch.randint(0, 9, (n,), generator=g, device="cpu")
    scale = torch.rand(n, generator=g, **cpu) + 0.5
    v = torch.randn(n, generator=g, **cpu) * 0.3
    dots = torch.randn(9, d, generator=g, **cpu)
    seed = torch.tensor(12345, device="cpu")
    for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
        want = _forward_quantize(x, dots, scale, v, group, parse_format("int8"), Granularity.ROW, rnd, seed)
        for threads in cbuild.test_threads(1, 2):
            codes, step = _bhq_quantize(lib, x, dots, scale, v, group, parse_format("int8"),
                                        Granularity.ROW, rnd, seed, threads)
            if not (torch.equal(codes, want[0]) and _same(step, want[1])):
                return False
    from ..quantizers.bhq import BlockHouseholder, sequential_group_sums
    from .reference import quantize as quantize_ref
    t = BlockHouseholder(scale, v, group, 9)  # and the pair, group by group, with x's columns
    crow, members = t.csr()
    # the CPU's definition, whatever bhq's settings (SEQUENTIAL_DEVICES emptied, SPARSE_MIN_NUMEL
    # lowered by a benchmark toggle or a test): the reference pair op summed the groups by a sparse
    # product then, and the self-test failed on an AVX-512 CPU, switching the kernel off
    dots_pair = sequential_group_sums(x, v * scale, t)
    for fmt_w, rnd in ((parse_format("int8"), Rounding.STOCHASTIC), (parse_format("int4"), Rounding.NEAREST)):
        args = (parse_format("int8"), Granularity.ROW, rnd, seed, fmt_w, Granularity.ROW, rnd, torch.tensor(7))
        want = (*_forward_quantize(x, dots_pair, scale, v, group, *args[:4]),
                *quantize_ref(x.t(), *args[4:]))
        for threads in cbuild.test_threads(1, 2):
            got = _bhq_group_quantize_pair(lib, x, v * scale, scale, v, crow, members, 9, args[0], rnd, seed,
                                           fmt_w, Granularity.ROW, rnd, torch.tensor(7), threads)
            if not all(_same(a, b) for a, b in zip(got, (want[0], want[1], want[4], want[5]))):
                return False
            codes, step, none = _bhq_group_quantize(lib, x, v * scale, scale, v, crow, members, 9, args[0], rnd,
                                                    seed, threads)
            if none is not None or not (_same(codes, want[0]) and _same(step, want[1])):
                return False
    want_inv = _apply_inverse(x, dots, scale, v, group, torch.float32)  # and the inverse
    for threads in cbuild.test_threads(1, 2):
        for y, overwrite in ((x, False), (x.clone(), True), (x[:, 1:], False)):
            ref = want_inv if y.shape == x.shape else _apply_inverse(y, dots[:, 1:], scale, v, group, torch.float32)
            got = _bhq_inverse(lib, y, dots if y.shape == x.shape else dots[:, 1:], scale, v, group, overwrite, threads)
            if not _same(got, ref) or (overwrite and got.data_ptr() != y.data_ptr()):
                return False
    return _bhq_group_sums_self_test(lib, x)


def _bhq_group_sums_self_test(lib: ctypes.CDLL, x: torch.Tensor) -> bool:
    """BHQ's group sums against ``bhq.sequential_group_sums`` (the CPU's definition,
    whatever ``bhq``'s settings), and the inverse with its own sums against the two ops:
    one group, many, empty ones, a band edge (300 columns), strided rows, in place,
    bfloat16, NaN and ±Inf, one and two threads."""
    from ..quantizers.bhq import BlockHouseholder, _apply_inverse
    from ..quantizers.bhq import sequential_group_sums as _group_sums

    cpu = {"dtype": torch.float32, "device": "cpu"}  # whatever torch's defaults are
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(41, 300, generator=g, **cpu) * torch.logspace(-20, 20, 300, **cpu)
    wide[5, 7], wide[9, 299] = float("nan"), float("-inf")
    for a in (x, x[:, 1:], wide, wide[:, 3:290], wide.bfloat16()):
        n = a.shape[0]
        w = torch.randn(n, generator=g, **cpu)
        for n_groups in (1, 3, n + 2):
            group = torch.randint(0, n_groups, (n,), generator=g, device="cpu")
            t = BlockHouseholder(w, w, group, n_groups)
            want = _group_sums(a, w, t)
            crow, members = t.csr()
            for threads in cbuild.test_threads(1, 2):
                if not _same(_bhq_group_sums(lib, a, w, crow, members, n_groups, threads), want):
                    return False
            if a.dtype == torch.float32:  # the inverse with its own sums, against the two ops
                s = torch.rand(n, generator=g, **cpu) + 0.5
                want_inv = _apply_inverse(a, _group_sums(a, w, t), s, w, group, torch.float32)
                for threads in cbuild.test_threads(1, 2):
                    for y, overwrite in ((a, False), (a.clone(), True)):
                        got = _bhq_sums_inverse(lib, y, w, s, crow, members, n_groups, overwrite, threads)
                        if not _same(got, want_inv) or (overwrite and got.data_ptr() != y.data_ptr()):
                            return False
    return True


def _hadamard_self_test(lib: ctypes.CDLL, x: torch.Tensor) -> bool:
    """The Hadamard transform-and-quantize and its inverse against
    ``hadamard._forward_quantize`` and ``hadamard._inverse``, and the column ranges taken
    in the same read (all rows', or each of three entries') against ``amax``, and the
    inverse written over its operand (nothing written where a block is wide) and in
    column chunks (rows past ``HAD_CHUNK`` columns): blocks of 1 to 256 rows (every way
    the kernels group the butterflies), padded rows, NaN rows, bfloat16, strided rows,
    int8 and int4, stochastic and nearest, one thread and two; and the fallback signal for
    a huge element and a tiny block."""
    from ..formats import parse_format
    from ..quantizers.hadamard import WIDE, _c, _forward, _forward_quantize, _inverse

    g = torch.Generator().manual_seed(7)
    finite = x.nan_to_num(posinf=1e3, neginf=-1e3)  # (37, 53) with a NaN and tails
    seed = torch.tensor(0x9E3779B9, device="cpu")
    for a, block in ((finite, 64), (finite[:33, 1:], 8), (finite[:3], 4), (finite[:1], 1),
                     (finite.bfloat16(), 128), (finite[:30], 2), (finite[:20], 32), (finite[5:], 256)):
        rows = -(-a.shape[0] // block) * block
        signs = (torch.randint(0, 2, (rows,), generator=g, device="cpu") * 2 - 1).float()
        m = signs * _c(block, torch.float32, signs.device)
        for fmt in (parse_format("int8"), parse_format("int4")):
            for rnd in (Rounding.STOCHASTIC, Rounding.NEAREST):
                want = _forward_quantize(a, signs, block, fmt, Granularity.ROW, rnd, seed)
                for threads in cbuild.test_threads(1, 2):
                    er = a.shape[0] // 3 if a.shape[0] % 3 == 0 else 0  # each of 3 entries' columns, or all
                    got = _hadamard_quantize(lib, a, m, rows, block, WIDE, fmt, Granularity.ROW, rnd, seed,
                                             threads, columns=True, entry_rows=er)
                    cols = a.float().reshape(3 if er else 1, -1, a.shape[1]).abs().amax(1).reshape(-1, 1)
                    if got[0] is None or not (torch.equal(got[0], want[0]) and _same(got[1], want[1])
                                              and _same(got[2], cols)):
                        return False
        for threads in cbuild.test_threads(1, 2):
            got_fwd = _hadamard_forward(lib, a, m, rows, block, WIDE, threads)
            if got_fwd is None or not _same(got_fwd, _forward(a, signs, block)):
                return False
        y = torch.randn(rows, 21, generator=g, dtype=torch.float32, device="cpu")
        c = float(_c(block, torch.float32, signs.device))
        for n_out in (a.shape[0], rows):
            want_inv = _inverse(y, signs, block, n_out, torch.float32)
            for threads in cbuild.test_threads(1, 2):
                got_inv = _hadamard_inverse(lib, y, signs, block, c, WIDE, n_out, threads)
                mine = torch.cat([y, y], 1)[:, :21]  # in place, over strided rows
                over = _hadamard_inverse(lib, mine, signs, block, c, WIDE, n_out, threads, overwrite=True)
                if got_inv is None or not _same(got_inv, want_inv) or over is None or not _same(over, want_inv) \
                        or over.data_ptr() != mine.data_ptr():
                    return False
    wide_rows = torch.randn(64, 1100, generator=g, dtype=torch.float32, device="cpu")  # past HAD_CHUNK columns
    signs = (torch.randint(0, 2, (64,), generator=g, device="cpu") * 2 - 1).float()
    wide_rows[5, 1050] = float("nan")
    want = _forward_quantize(wide_rows, signs, 64, parse_format("int8"), Granularity.ROW, Rounding.STOCHASTIC, seed)
    cols = wide_rows.reshape(2, 32, -1).abs().amax(1).reshape(-1, 1)  # two entries' column ranges
    tiny_chunk = wide_rows.nan_to_num(0.0)
    tiny_chunk[:, 1024:] = 1e-20  # a chunk that alone would be wide, its block not (a review)
    for threads in cbuild.test_threads(1, 2):
        for y in (wide_rows.nan_to_num(0.0), tiny_chunk):
            want_inv = _inverse(y, signs, 64, 64, torch.float32)
            mine = y.clone()
            got, over = (_hadamard_inverse(lib, y, signs, 64, 0.125, WIDE, 64, threads),
                         _hadamard_inverse(lib, mine, signs, 64, 0.125, WIDE, 64, threads, True))
            if got is None or over is None or not (_same(got, want_inv) and _same(over, want_inv)):
                return False
        got = _hadamard_quantize(lib, wide_rows, signs * 0.125, 64, 64, WIDE, parse_format("int8"), Granularity.ROW,
                                 Rounding.STOCHASTIC, seed, threads, columns=True, entry_rows=32)
        if got[0] is None or not (torch.equal(got[0], want[0]) and _same(got[1], want[1]) and _same(got[2], cols)):
            return False
    signs = torch.ones(64, dtype=torch.float32, device="cpu")
    for bad in (float("inf"), 2.0**101, 1e-20):  # a huge element, and a tiny block
        big = finite.clone() if bad > 1 else torch.full_like(finite, 1e-21)
        big[4, 4] = bad
        if _hadamard_quantize(lib, big, signs, 64, 64, WIDE, parse_format("int8"), Granularity.ROW,
                              Rounding.NEAREST, seed, 1)[0] is not None \
                or _hadamard_inverse(lib, torch.cat([big, big[:27]]), signs, 64, 0.125, WIDE, 64,
                                     cbuild.test_threads(2)[0]) is not None:
            return False
        mine = torch.cat([big, big[:27]])  # in place: nothing written where a block is wide
        kept = mine.clone()
        if _hadamard_inverse(lib, mine, signs, 64, 0.125, WIDE, 64, cbuild.test_threads(2)[0], True) is not None \
                or not _same(mine, kept):
            return False
    return True


def _place_self_test(lib: ctypes.CDLL) -> bool:
    """The channels-last placement against the reference: channel counts below, at and
    past a 16-lane tile, position tails, padding, zero insertion (stride 2), int8 and
    uint8 + 128, with one thread and with two."""
    from .im2col import place_codes as ref

    g = torch.Generator().manual_seed(3)
    for shape, size, offset, stride in (((2, 1, 5, 7), (5, 7), (0, 0), (1, 1)),
                                        ((3, 16, 4, 4), (6, 6), (1, 1), (1, 1)),
                                        ((2, 19, 3, 11), (5, 13), (1, 1), (1, 1)),
                                        ((2, 40, 7, 5), (15, 11), (2, 1), (2, 2))):
        codes = torch.randint(-128, 128, (shape[0], math.prod(shape[1:])), generator=g,
                              dtype=torch.int8, device="cpu")
        for unsigned in (False, True):
            want = ref(codes, shape, size, offset, stride, unsigned)
            for threads in cbuild.test_threads(1, 2):
                got = _place_nhwc(lib, codes, shape, size, offset, stride, unsigned, threads)
                if not (got.dtype == want.dtype and torch.equal(got, want)):
                    return False
    return True


def _same_fp8(a: torch.Tensor, b: torch.Tensor) -> bool:
    """FP8 codes: the same bytes, except that a NaN equals any NaN (the reference's NaN
    sign bit depends on its operand's memory layout: 0x7F from a contiguous operand, 0xFF
    from a transposed one; both are NaN in E4M3FN and E5M2)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = torch.isnan(a.float())
    return bool(torch.equal(nan, torch.isnan(b.float()))) and \
        bool(torch.equal(a.view(torch.uint8)[~nan], b.view(torch.uint8)[~nan]))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and values, NaN where the other has NaN (the steps of a NaN
    group); ±Inf only equal to itself."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan = torch.isnan(a)
    return bool(torch.equal(nan, torch.isnan(b))) and bool(torch.equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0)))


# -- dequantization ------------------------------------------------------------------------
def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense, positive strides: its elements fill ``numel`` consecutive
    slots from ``data_ptr`` (contiguous, or a transposed contiguous tensor)."""
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def supports_dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                        block_scale: torch.Tensor | None, block: int, block_dim: int,
                        out_dtype: torch.dtype) -> bool:
    """Whether :func:`run_dequantize` takes this call (``Encoded.dequantize``'s arguments):
    int8 ``codes`` (R, C) with contiguous rows, a float32 ``scale`` (R, 1) or (1, 1), no
    offset or block scales, float32 out, outside tracing."""
    return (offset is None and block_scale is None and out_dtype == torch.float32
            and codes.dim() == 2 and codes.is_contiguous() and _readable(codes, (torch.int8,))
            and _readable(scale, (torch.float32,)) and scale.dim() == 2 and scale.shape[1] == 1
            and scale.shape[0] in (1, codes.shape[0]) and scale.is_contiguous() and _enabled and available())


def run_dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                   block_scale: torch.Tensor | None, block: int, block_dim: int,
                   out_dtype: torch.dtype) -> torch.Tensor:
    """``codes · scale`` (R, C) float32 (:func:`lowbit.kernels.encoded.dequantize`, bitwise:
    an exact conversion, one multiply), after :func:`supports_dequantize`."""
    with scope("lowbit::avx512_dequantize"):
        return _dequantize(_library(), codes, scale, scale.shape[0] != 1)


def supports_attention_dequantize(codes: torch.Tensor, step: torch.Tensor) -> bool:
    """Whether :func:`run_attention_dequantize` takes this call: int8 ``codes`` (B, R, C),
    dense (contiguous or a transposed contiguous view), a float32 ``step`` of one element
    (any shape), outside tracing."""
    return (codes.dim() == 3 and _readable(codes, (torch.int8,)) and _dense(codes)
            and _readable(step, (torch.float32,)) and step.numel() == 1 and _enabled and available())


def run_attention_dequantize(codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``codes · step`` (``lowbit.attention``'s ``_dequantize``, bitwise), float32, in
    ``codes``' memory layout (as torch's elementwise product keeps it), after
    :func:`supports_attention_dequantize`."""
    with scope("lowbit::avx512_dequantize"):
        return _dequantize(_library(), codes, step.reshape(1), False)


@compiled.disable_tracing
def _dequantize(lib: ctypes.CDLL, codes: torch.Tensor, scale: torch.Tensor, per_row: bool) -> torch.Tensor:
    out = torch.empty_strided(codes.shape, codes.stride(), dtype=torch.float32, device="cpu")
    rows, cols = (codes.shape[0], codes.numel() // codes.shape[0]) if per_row else (1, codes.numel())
    scale = scale.contiguous()  # held for the call (HELD_FOR_C)
    lib.lowbit_dequantize_rows(codes.data_ptr(), rows, cols, scale.data_ptr(), int(per_row),
                               out.data_ptr(), torch.get_num_threads())
    return out


__all__ = ["AVX2_CPU_FLAGS", "CPU_FLAGS", "build_flags", "isa", "missing_shim", "prefers", "available", "run_attention_dequantize", "run_dequantize", "bhq_forward_quantize", "cpu_has_avx512", "epilogue_nchw", "in_use", "place_nhwc", "quantize",
           "run_epilogue_into", "supports_epilogue_into", "supports_epilogue_nhwc",
           "quantize_batched_pair", "quantize_conv_pair", "quantize_pair", "run_bhq_forward_quantize", "run_epilogue_nchw", "run_place_nhwc", "run_quantize",
           "run_quantize_batched_pair", "run_quantize_conv_pair", "run_quantize_pair", "set_enabled", "supports", "supports_batched_pair",
           "supports_bhq", "supports_conv_pair", "supports_epilogue_nchw", "supports_pair", "supports_place_nhwc"]
