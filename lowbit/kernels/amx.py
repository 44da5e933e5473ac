"""int8 × int8 → int32 GEMM on Intel AMX, for CPUs where ``torch._int_mm`` does not use it.

PyTorch 2.13's ``torch._int_mm`` on the CPU runs oneDNN's ``gemm_api`` s8·s8 kernel,
which does not use AMX; oneDNN's AMX int8 matmul (``onednn::qlinear_pointwise``) needs
its weight prepacked by a reorder that costs more than the GEMM it saves (docs/
benchmarks.md, "GEMM paths"). This module compiles ``amx_int8.c`` — TDPBSSD (signed ×
signed bytes, int32 sums) on 2 × 2 accumulator tiles, with its own cheap packing of the
right operand into the VNNI layout — with the system C compiler on first use, caches the
shared library (:func:`cache_dir`: ``$LOWBIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowbit``
or ``~/.cache/lowbit``; a temporary directory, with a warning, when that is not
writable), loads it with
:mod:`ctypes` and exposes it as the ``torch.library`` op ``lowbit::int8_mm`` so that
``lowbit.coverage`` counts it as an int8 GEMM, as it counts ``torch._int_mm``. (The op
hands a transposed left operand to ``torch._int_mm``, which is faster there.)

The result is the exact int32 sum, the same as ``torch._int_mm``'s (for ``K ≤``
:data:`lowbit.kernels.int8.MAX_K`, checked by the caller): a self-test compares the two
on random and extreme codes, with one thread and with two, before the kernel is used,
and the library is not used when it fails (a warning says so). The build and the
self-test run outside ``torch.compile`` and outside any dispatch mode (a coverage trace,
``FlopCounterMode``), so they are never traced or counted. It is used only where :func:`available` — x86-64 Linux,
a CPU with ``amx_tile`` and ``amx_int8``, the kernel's permission for AMX state granted
(Linux ≥ 5.16), a C compiler (``$CC``, else ``gcc``, else ``cc``), ``LOWBIT_AMX`` not
``0`` — and for the products where it is faster (:func:`worth_it`, on shapes alone).
Elsewhere :func:`lowbit.kernels.int8.int_mm` runs ``torch._int_mm`` as before.

:func:`int_bmm` (op ``lowbit::int8_bmm``) runs a batch of products — attention's heads,
below :func:`worth_it`'s size one by one — in one call, the entries spread over the
threads, each packed and multiplied as a single product is (same sums); on a CPU without
AMX the op runs :mod:`.vnni`'s AVX-512 VNNI kernel instead (same sums).
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import cbuild, compiled, vnni, workspace
from ..userframe import user_stacklevel

SOURCE = Path(__file__).with_name("amx_int8.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mamx-tile", "-mamx-int8", "-mavx512f")
MIN_ROWS = 256  # below, packing b costs more than the GEMM saves (a convolution's ∇W: 16–64 rows)
MIN_MACS = 1 << 25  # m·k·n: below, the op's fixed cost (≈ 15 µs) outweighs the gain
MAX_K = (2**31 - 1) // (128 * 128)  # the longest exact int32 sum of int8 codes (= int8.MAX_K)

_I64 = ctypes.c_int64
_ARGTYPES = [ctypes.c_void_p, _I64, _I64, ctypes.c_void_p, _I64, _I64, _I64, _I64, _I64,
             ctypes.c_void_p, _I64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
_P = ctypes.c_void_p
_PACK_ARGTYPES = [_P, _I64, _I64, _I64, _I64, _P, ctypes.c_int]
_BMM_ARGTYPES = [_I64, _P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _I64, _I64,
                 _P, _P, ctypes.c_int]


def cpu_has_amx() -> bool:
    """Whether this CPU reports the ``amx_tile`` and ``amx_int8`` flags (Linux
    ``/proc/cpuinfo``; ``False`` elsewhere)."""
    return {"amx_tile", "amx_int8"} <= cbuild.cpu_flags()


cache_dir = cbuild.cache_dir


def _self_test(lib: ctypes.CDLL) -> bool:
    """The kernel's sums equal ``torch._int_mm``'s: random codes in both operand layouts
    with tails in every dimension, more than one panel of columns, a long ``K`` over few
    blocks (split between threads), and the extreme codes (−128 · −128 summed over a
    long ``K``); with one thread and with two."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for m, k, n in ((37, 130, 45), (64, 256, 300), (16, 1000, 48)):
        a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g, device="cpu")
        b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g, device="cpu")
        cases += [(a, b), (a.t().contiguous().t(), b.t().contiguous().t())]
    cases.append((torch.full((32, 4096), -128, dtype=torch.int8, device="cpu"),
                  torch.full((4096, 32), -128, dtype=torch.int8, device="cpu")))
    for a, b in cases:
        want = torch._int_mm(a.contiguous(), b.contiguous())
        for threads in cbuild.test_threads(1, 2):
            out = torch.empty(a.shape[0], b.shape[1], dtype=torch.int32, device="cpu")
            _call(lib, a, b, out, threads)
            if not torch.equal(out, want):
                return False
            # row panels sharing one packing of b (a panel ending inside a 16-row tile)
            packed, rows = _pack(lib, b, threads), a.shape[0] // 2 + 3
            for i, j in ((0, rows), (rows, a.shape[0])):
                out = torch.empty(j - i, b.shape[1], dtype=torch.int32, device="cpu")
                _call(lib, a[i:j], b, out, threads, packed)
                if not torch.equal(out, want[i:j]):
                    return False
    # batches: more entries than threads and fewer, row-major and transposed entries, tails
    for bsz, m, k, n in ((5, 37, 70, 45), (1, 64, 64, 64), (3, 16, 200, 17)):
        a = torch.randint(-128, 128, (bsz, m, k), dtype=torch.int8, generator=g, device="cpu")
        b = torch.randint(-128, 128, (bsz, k, n), dtype=torch.int8, generator=g, device="cpu")
        for aa, bb in ((a, b), (a.mT.contiguous().mT, b.mT.contiguous().mT)):
            want = torch.bmm(aa.long(), bb.long()).int()  # exact int64 sums, no layout rules
            for threads in cbuild.test_threads(1, 2, 3):
                out = torch.empty(bsz, m, n, dtype=torch.int32, device="cpu")
                _call_batched(lib, aa, bb, out, threads)
                if not torch.equal(out, want):
                    return False
    return True


def _compiler() -> list[str] | None:
    """The C compiler command (:func:`lowbit.kernels.cbuild.compiler`)."""
    return cbuild.compiler(_warn)


def _warn(why: str, then: str | None = "torch._int_mm runs instead") -> None:
    """A ``RuntimeWarning`` from lowbit's first int8 GEMM that needs the kernel."""
    warnings.warn(f"lowbit: {why}" + (f"; {then}" if then else "") + " (AMX int8 GEMM, "
                  "lowbit.kernels.amx)", RuntimeWarning, stacklevel=user_stacklevel())


@cbuild.once
@compiled.disable_tracing
def _library() -> ctypes.CDLL | None:
    """The loaded, self-tested library, or ``None`` (module docstring). Runs eagerly
    and with every dispatch mode suspended: its own GEMMs are not the caller's."""
    if cbuild.switched_off("LOWBIT_AMX") or not cpu_has_amx():
        return None
    with _disable_current_modes():
        lib = cbuild.load(SOURCE, FLAGS, lambda why, then: _warn(why, then or "torch._int_mm runs instead"),
                          "AMX kernel")
        if lib is None:
            return None
        try:  # a library without them (built as C++ by a $CC of g++): a warning, not a crash
            request, mm, bmm = lib.lowbit_amx_request, lib.lowbit_amx_int_mm, lib.lowbit_amx_int_bmm
            pack = lib.lowbit_amx_pack_b
        except AttributeError as e:
            _warn(f"the AMX kernel's library lacks a function ({e})")
            return None
        request.restype = ctypes.c_int
        if not request():
            _warn("Linux refused the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM; needs Linux ≥ 5.16)")
            return None
        mm.restype, mm.argtypes = None, _ARGTYPES
        bmm.restype, bmm.argtypes = None, _BMM_ARGTYPES
        pack.restype, pack.argtypes = None, _PACK_ARGTYPES
        if not cbuild.self_tested(lambda: _self_test(lib), lambda why, then: _warn(why), "AMX kernel",
                                  "torch._int_mm"):
            return None
    return lib


def available() -> bool:
    """Whether the AMX kernel can run here (module docstring). Builds and self-tests it
    on the first call (≈ 1 s with an empty cache)."""
    return _library() is not None


def worth_it(m: int, k: int, n: int) -> bool:
    """Whether an (m, k) × (k, n) product is one where the AMX kernel is worth running
    (benchmarks/probes/amx_int_mm.py): at least :data:`MIN_MACS` multiply-adds and at
    least :data:`MIN_ROWS` rows to share the packing of the right operand. On shapes
    alone, so that ``lowbit.coverage`` (whose trace may see other operand layouts than a
    compiled step) reports the kernel that training runs."""
    return m >= MIN_ROWS and m * k * n >= MIN_MACS


def _packed_numel(k: int, n: int) -> int:
    """Bytes of the right operand (k, n) packed into the VNNI layout (K rounded up to 64,
    N to 16)."""
    return -(-k // 64) * 64 * (-(-n // 16) * 16)


@compiled.disable_tracing
def _pack(lib: ctypes.CDLL, b: torch.Tensor, threads: int) -> torch.Tensor:
    """``b`` (K, N) int8 packed into the kernel's VNNI layout: a new int8 tensor of
    :func:`_packed_numel` bytes."""
    k, n = b.shape
    packed = torch.empty(_packed_numel(k, n), dtype=torch.int8, device="cpu")
    lib.lowbit_amx_pack_b(b.data_ptr(), b.stride(0), b.stride(1), k, n, packed.data_ptr(), threads)
    return packed


@compiled.disable_tracing
def _call(lib: ctypes.CDLL, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
          threads: int, packed_b: torch.Tensor | None = None) -> None:
    """The C kernel on ``a``, ``b`` into ``out``; its packing buffers are allocated here
    and referenced until the call returns. ``packed_b``: ``b`` already packed
    (:func:`pack_right`), which the kernel then does not read."""
    m, k = a.shape
    n = b.shape[1]
    kp, mp = -(-k // 64) * 64, -(-m // 16) * 16
    given = packed_b is not None
    if not given:
        packed_b = torch.empty(_packed_numel(k, n), dtype=torch.int8, device="cpu")
    direct_a = a.stride(1) == 1 and k == kp and m == mp
    packed_a = torch.empty(0 if direct_a else mp * kp, dtype=torch.int8, device="cpu")
    lib.lowbit_amx_int_mm(a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0),
                          b.stride(1), m, k, n, out.data_ptr(), out.stride(0), packed_b.data_ptr(),
                          packed_a.data_ptr(), threads, int(given))
    torch.autograd.graph.increment_version(out)  # written through its pointer
    del packed_a, packed_b  # alive until here


@compiled.disable_tracing
def _call_batched(lib: ctypes.CDLL, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor,
                  threads: int) -> None:
    """The batched C kernel on ``a`` (B, M, K), ``b`` (B, K, N) into ``out`` (B, M, N)
    int32 (rows of each entry contiguous); one packing slice per thread."""
    bsz, m, k = a.shape
    n = b.shape[2]
    kp, np_, mp = -(-k // 64) * 64, -(-n // 16) * 16, -(-m // 16) * 16
    packed_b = torch.empty(threads * np_ * kp, dtype=torch.int8, device="cpu")
    packed_a = torch.empty(threads * mp * kp, dtype=torch.int8, device="cpu")
    lib.lowbit_amx_int_bmm(bsz, a.data_ptr(), a.stride(0), a.stride(1), a.stride(2), b.data_ptr(),
                           b.stride(0), b.stride(1), b.stride(2), m, k, n, out.data_ptr(), out.stride(0),
                           out.stride(1), packed_b.data_ptr(), packed_a.data_ptr(), threads)
    torch.autograd.graph.increment_version(out)  # written through its pointer
    del packed_a, packed_b  # alive until here


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"lowbit::int8_mm takes int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"lowbit::int8_mm: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not match")
    if a.shape[1] > MAX_K:
        raise ValueError(f"lowbit::int8_mm: K = {a.shape[1]} > {MAX_K}, past which an int32 "
                         "sum of int8 codes can overflow (split the sum)")


def _check_packed(b: torch.Tensor, packed_b: torch.Tensor | None) -> None:
    if packed_b is not None and (packed_b.dtype != torch.int8 or packed_b.dim() != 1
                                 or packed_b.numel() != _packed_numel(*b.shape)
                                 or packed_b.device.type != "cpu" or not packed_b.is_contiguous()):
        raise ValueError(f"lowbit::int8_mm: packed_b ({packed_b.dtype}, {tuple(packed_b.shape)}) is "
                         f"not a packing of a {tuple(b.shape)} operand (lowbit.kernels.amx.pack_right)")


def reads_left(a: torch.Tensor) -> bool:
    """Whether the op ``lowbit::int8_mm`` runs the AMX kernel on the left operand ``a``
    (M, K): all but a transposed (column-major) one, which goes to ``torch._int_mm``."""
    return a.stride(1) == 1 or a.shape[1] <= 1


_LIB = torch.library.Library("lowbit", "FRAGMENT")
_LIB.define("int8_mm(Tensor a, Tensor b, Tensor? packed_b=None) -> Tensor")


def _int8_mm_cpu(a: torch.Tensor, b: torch.Tensor, packed_b: torch.Tensor | None = None) -> torch.Tensor:
    _check(a, b)
    _check_packed(b, packed_b)
    if not reads_left(a):
        # a transposed left operand (a Linear's ∇W = Q(∇Y)ᵀ·Q(X)): torch._int_mm reads it
        # as it is, faster than the transpose the tiles need (0.36–0.93× on AMX at the text
        # GPT's and GPT-2's ∇W shapes; docs/benchmarks.md). The same sums.
        from .int8 import dense

        return torch._int_mm(dense(a), dense(b))
    return kernel(a, b, packed_b)


_LIB.impl("int8_mm", _int8_mm_cpu, "CPU")


@torch.library.register_fake("lowbit::int8_mm", lib=_LIB)
def _(a: torch.Tensor, b: torch.Tensor, packed_b: torch.Tensor | None = None) -> torch.Tensor:
    _check(a, b)
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


def _check_batched(a: torch.Tensor, b: torch.Tensor) -> None:
    vnni.check_operands(a, b, "lowbit::int8_bmm")  # the same rules (vnni.MAX_K == MAX_K)


_LIB.define("int8_bmm(Tensor a, Tensor b) -> Tensor")


def _int8_bmm_cpu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check_batched(a, b)
    lib = _library()
    if lib is None and not vnni.available():
        raise RuntimeError("neither the AMX nor the VNNI kernel is available on this machine "
                           "(lowbit.kernels.amx.available() and lowbit.kernels.vnni.available() "
                           "are False)")
    out = workspace.empty((a.shape[0], a.shape[1], b.shape[2]), torch.int32)  # reused when large
    if out.numel() and a.shape[2]:
        if lib is not None:
            _call_batched(lib, a, b, out, torch.get_num_threads())
        else:  # a CPU without AMX: AVX-512 VNNI (lowbit.kernels.vnni)
            vnni.bmm_into(a, b, out)
    elif out.numel():  # no summed terms: every sum is 0
        out.zero_()
    return out


_LIB.impl("int8_bmm", _int8_bmm_cpu, "CPU")


@torch.library.register_fake("lowbit::int8_bmm", lib=_LIB)
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check_batched(a, b)
    return a.new_empty((a.shape[0], a.shape[1], b.shape[2]), dtype=torch.int32)


def int_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a[i] @ b[i]`` for each entry of a batch: (B, M, K) × (B, K, N) int8 CPU tensors,
    any strides, ``K ≤`` :data:`MAX_K` → a new (B, M, N) int32 tensor of exact sums (from
    32 MB on, a reused unreferenced buffer: :mod:`lowbit.kernels.workspace`), the
    entries spread over the threads in one call (the op ``lowbit::int8_bmm``, which
    ``lowbit.coverage`` counts as int8 GEMMs): attention's per-head products, where one
    ``torch._int_mm`` call per head costs more in dispatch than the product. Runs the AMX
    kernel where :func:`available`, else :mod:`.vnni`'s (``K ≤ vnni.MAX_K``). Raises
    ``RuntimeError`` where neither is available, ``TypeError``/``ValueError`` for wrong
    dtypes or shapes."""
    return torch.ops.lowbit.int8_bmm(a, b)


def int_mm(a: torch.Tensor, b: torch.Tensor, packed_b: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` ((M, K) × (K, N) int8 CPU tensors, any strides, ``K ≤`` :data:`MAX_K`)
    as the exact int32 sum, a new (M, N) row-major tensor: the op ``lowbit::int8_mm``,
    which runs the AMX kernel, except for a transposed (column-major) ``a``
    (:func:`reads_left` false), which it hands to ``torch._int_mm`` (faster there; that
    route runs whether or not AMX is available). ``packed_b``: :func:`pack_right` of this
    ``b``, made once for several products with it (the row panels of
    :func:`lowbit.kernels.int8.gemm`); the kernel then reads it instead of packing ``b``
    again — the caller keeps ``b`` unchanged since. Raises ``RuntimeError`` where
    :func:`available` is false and the AMX kernel would run, ``TypeError``/``ValueError``
    for wrong dtypes or shapes (a ``packed_b`` of another size). :func:`kernel` runs the
    AMX kernel on any layout."""
    return torch.ops.lowbit.int8_mm(a, b, packed_b)


def _lib_or_raise() -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("the AMX kernel is not available on this machine "
                           "(lowbit.kernels.amx.available() is False)")
    return lib


def pack_right(b: torch.Tensor) -> torch.Tensor:
    """The right operand ``b`` ((K, N) int8 CPU tensor, any strides) packed once into the
    kernel's VNNI layout, for :func:`int_mm`'s ``packed_b``: a new 1-D int8 tensor of
    ``⌈K/64⌉·64 · ⌈N/16⌉·16`` bytes (``amx_int8.c``). ``RuntimeError`` where
    :func:`available` is false, ``TypeError``/``ValueError`` for another dtype or a
    ``K`` past :data:`MAX_K`."""
    if b.dim() != 2:
        raise ValueError(f"lowbit.kernels.amx.pack_right: a (K, N) operand, got shape {tuple(b.shape)}")
    _check(b.new_empty((0, b.shape[0])), b)  # its dtype and K
    return _pack(_lib_or_raise(), b, torch.get_num_threads())


def kernel(a: torch.Tensor, b: torch.Tensor, packed_b: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` on the AMX kernel whatever the layouts (:func:`int_mm` without its
    ``torch._int_mm`` branch; outside the op, so not seen by ``lowbit.coverage``): for
    tests and benchmarks of the kernel itself. ``RuntimeError`` where :func:`available`
    is false."""
    _check(a, b)
    _check_packed(b, packed_b)
    lib = _lib_or_raise()
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.int32, device="cpu")
    _call(lib, a, b, out, torch.get_num_threads(), packed_b)
    return out


__all__ = ["MAX_K", "MIN_MACS", "MIN_ROWS", "available", "cache_dir", "cpu_has_amx", "int_bmm", "int_mm", "kernel",
           "pack_right", "reads_left", "worth_it"]
