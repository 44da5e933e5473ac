"""Batched int8 × int8 → int32 GEMM on AVX-512 VNNI, for attention's per-head products.

On a CPU without AMX, attention's head products (e.g. GPT-2's 512 × 64 × 512 per head)
ran as one ``torch._int_mm`` per head; at those shapes oneDNN reaches 370–730 GOP/s on
the project's AMD EPYC against ≈ 1,500 at 2048 × 768 × 3072, and the score-sized
``QKᵀ`` products are bound by writing their int32 results (docs/benchmarks.md, "A
batched int8 GEMM on AVX-512 VNNI"). This module compiles ``vnni_int8.c``
(:mod:`.cbuild`: the system C compiler on first use, cached): VPDPBUSD on 8 × 32 register
blocks, the left codes stored as ``a + 128`` (unsigned) and the sum corrected by
``128 · colsum(b)``, the right operand packed four ``k`` at a time, the batch spread over
the threads, full blocks of large results written with streaming stores. The sums are
exact — the same int32 values as ``torch._int_mm`` — for ``K ≤`` :data:`MAX_K` (the same
bound as every int8 GEMM of lowbit, ``K·128² < 2³¹``): VPDPBUSD, the column sums' shift
and the correction all wrap modulo 2³², so the offset sum ``Σ(a + 128)·b`` may pass
int32's range on the way; the corrected sum is the true one whenever that fits. A self-test compares them with exact int64 products before first
use (random and extreme codes, tails in every dimension, both operand layouts, one to
three threads, streaming on and off) and the kernel is not used when it fails.

It runs the op ``lowbit::int8_bmm`` (:func:`lowbit.kernels.amx.int_bmm`) where the AMX
kernel is not available: a CPU reporting ``avx512f``, ``avx512bw`` and ``avx512_vnni``,
a C compiler, ``LOWBIT_VNNI`` not ``0``. A left operand whose rows are not contiguous,
or a right operand neither row-contiguous nor column-contiguous with ``K % 4 == 0``, is
copied row-major first.
"""

from __future__ import annotations

import ctypes
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import cbuild, compiled
from ..userframe import user_stacklevel

SOURCE = Path(__file__).with_name("vnni_int8.c")
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vnni")
CPU_FLAGS = frozenset({"avx512f", "avx512bw", "avx512_vnni"})
MAX_K = (2**31 - 1) // (128 * 128)  # the longest exact int32 sum of int8 codes (= amx.MAX_K)
STREAM_BYTES = 8 << 20  # results from this size on are written with streaming stores
NR, MR = 32, 8  # the kernel's register block: columns per panel, rows per block

_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {"lowbit_vnni_int_bmm": [_I64, _P, _I64, _I64, _I64, _P, _I64, _I64, _I64, _I64, _I64,
                                       _I64, _P, _I64, _I64, _P, _P, _P, _I, _I]}


def cpu_has_vnni() -> bool:
    """Whether this CPU reports AVX-512 F, BW and VNNI (Linux ``/proc/cpuinfo``)."""
    return CPU_FLAGS <= cbuild.cpu_flags()


def _warn(why: str, then: str | None = None) -> None:
    warnings.warn(f"lowbit: {why}; " + (then or "one torch._int_mm per batch entry runs instead")
                  + " (VNNI int8 GEMM, lowbit.kernels.vnni)", RuntimeWarning, stacklevel=user_stacklevel())


def _layouts(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a`` with contiguous rows and ``b`` row- or column-contiguous (with ``K % 4 == 0``
    for the latter): the layouts the kernel packs fast; others copied row-major."""
    if a.shape[2] > 1 and a.stride(2) != 1:
        a = a.contiguous()
    col_ok = b.stride(1) == 1 and b.shape[1] % 4 == 0
    if b.shape[2] > 1 and b.stride(2) != 1 and not col_ok:
        b = b.contiguous()
    return a, b


@compiled.disable_tracing
def _call(lib: ctypes.CDLL, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, threads: int,
          stream: bool) -> None:
    """The C kernel on ``a`` (B, M, K), ``b`` (B, K, N) into ``out`` (B, M, N) int32 with
    contiguous rows; packing buffers allocated here, one slice per thread."""
    bsz, m, k = a.shape
    n = b.shape[2]
    kq, nb, mp = -(-k // 4), -(-n // NR), -(-m // MR) * MR
    packed_a = torch.empty(threads * mp * kq * 4, dtype=torch.uint8)
    packed_b = torch.empty(threads * nb * kq * NR * 4, dtype=torch.int8)
    colsums = torch.empty(threads * nb * NR, dtype=torch.int32)
    lib.lowbit_vnni_int_bmm(bsz, a.data_ptr(), a.stride(0), a.stride(1), a.stride(2), b.data_ptr(),
                            b.stride(0), b.stride(1), b.stride(2), m, k, n, out.data_ptr(), out.stride(0),
                            out.stride(1), packed_a.data_ptr(), packed_b.data_ptr(), colsums.data_ptr(),
                            int(stream), threads)
    torch.autograd.graph.increment_version(out)  # written through its pointer
    del packed_a, packed_b, colsums  # alive until here


def _self_test(lib: ctypes.CDLL) -> bool:
    """Sums equal exact int64 products: tails in M, K, N; more entries than threads and
    fewer; row-major, transposed and strided operands; extreme codes over a long K (up to
    :data:`MAX_K`, where the offset sum wraps); streaming stores on and off."""
    g = torch.Generator().manual_seed(0)
    for bsz, m, k, n in ((5, 37, 70, 45), (1, 64, 64, 64), (3, 16, 200, 17), (2, 9, 3, 33), (3, 8, 64, 96)):
        a = torch.randint(-128, 128, (bsz, m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-128, 128, (bsz, k, n), dtype=torch.int8, generator=g)
        kk = max(k - 1, 1)  # strided: rows longer than K
        for aa, bb in ((a, b), (a, b.mT.contiguous().mT), (a.mT.contiguous().mT, b),
                       (a[:, :, :kk], b[:, :kk])):
            want = torch.bmm(aa.long(), bb.long()).int()
            for threads in cbuild.test_threads(1, 2, 3):
                for stream in (False, True):
                    out = torch.empty(want.shape, dtype=torch.int32)
                    x, y = _layouts(aa, bb)
                    _call(lib, x, y, out, threads, stream)
                    if not torch.equal(out, want):
                        return False
    for va, vb, k in ((-128, -128, 4096), (-128, 127, 4096), (127, 127, 4096), (127, -128, MAX_K)):
        # the last: the offset sum 255·(-128)·K wraps past int32; the corrected one does not
        a = torch.full((1, 8, k), va, dtype=torch.int8)
        b = torch.full((1, k, 32), vb, dtype=torch.int8)
        out = torch.empty(1, 8, 32, dtype=torch.int32)
        _call(lib, a, b, out, 2, True)
        if not bool((out.long() == va * vb * k).all()):
            return False
    return True


@cbuild.once
@compiled.disable_tracing
def _library() -> ctypes.CDLL | None:
    """The loaded, self-tested library, or ``None`` (module docstring)."""
    if cbuild.switched_off("LOWBIT_VNNI") or not cpu_has_vnni():
        return None
    with _disable_current_modes():
        return cbuild.load_tested(SOURCE, FLAGS, _SIGNATURES, _warn, "VNNI int8 GEMM", _self_test,
                                  "exact int64 products")


def available() -> bool:
    """Whether the kernel can run here (module docstring); builds and self-tests it on the
    first call."""
    return _library() is not None


def check_operands(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """``TypeError`` unless ``a`` and ``b`` are int8, ``ValueError`` unless they are
    (B, M, K) and (B, K, N) with ``K ≤`` :data:`MAX_K`; ``what`` names the caller."""
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"{what} takes int8 operands, got {a.dtype} and {b.dtype}")
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"{what}: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not match")
    if a.shape[2] > MAX_K:
        raise ValueError(f"{what}: K = {a.shape[2]} > MAX_K = {MAX_K}, past which an int32 sum of int8 "
                         "codes can overflow (split the sum)")


def _check(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    what = "lowbit VNNI int8 GEMM"
    check_operands(a, b, what)
    want = (a.shape[0], a.shape[1], b.shape[2])
    if out.dtype != torch.int32 or tuple(out.shape) != want:
        raise ValueError(f"{what}: out must be int32 of shape {want}, got {out.dtype} {tuple(out.shape)}")
    if any(t.device.type != "cpu" for t in (a, b, out)):
        raise ValueError(f"{what}: CPU tensors only")
    if out.shape[2] > 1 and out.stride(2) != 1:
        raise ValueError(f"{what}: out's rows must be contiguous")


def bmm_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out[i] = a[i] @ b[i]``: (B, M, K) × (B, K, N) int8 CPU tensors, any strides, ``K ≤``
    :data:`MAX_K`, into ``out`` (B, M, N) int32 with contiguous rows; exact sums; returns
    ``out``. Raises ``RuntimeError`` where :func:`available` is false, ``TypeError`` for
    non-int8 operands, ``ValueError`` for shapes that do not match, ``K`` past
    :data:`MAX_K` or a wrong ``out``. Used by the op ``lowbit::int8_bmm``; call
    :func:`lowbit.kernels.amx.int_bmm` to be counted by ``lowbit.coverage``."""
    _check(a, b, out)
    lib = _library()
    if lib is None:
        raise RuntimeError("the VNNI kernel is not available on this machine "
                           "(lowbit.kernels.vnni.available() is False)")
    if out.numel() == 0:
        return out
    if a.shape[2] == 0:  # no summed terms
        return out.zero_()
    a, b = _layouts(a, b)
    _call(lib, a, b, out, torch.get_num_threads(), out.numel() * 4 >= STREAM_BYTES)
    return out


__all__ = ["CPU_FLAGS", "MAX_K", "available", "bmm_into", "check_operands", "cpu_has_vnni"]
