"""FP8 GEMM with ``torch._scaled_mm``: float8 codes, float32 scales per tensor or per
row of ``a`` / per column of ``b`` (never on the summed dimension).

On the CPU (PyTorch ≥ 2.6) ``_scaled_mm`` emulates: it makes both operands row-major,
converts them to float32, multiplies by the scales and calls ``matmul`` — bit for bit the
simulated reference GEMM, which multiplies row-major operands too (tested, M from 1 to
64). Except where both scales are single numbers: then, on a CPU with AMX-INT8 (AMX-FP16
for mixed E4M3/E5M2), ATen sends the product to oneDNN's FP8 matmul, which sums in another
order (found on an Intel Xeon with AMX, 2026-12-01). So on the CPU lowbit passes
tensor-wise scales row-wise, as (M, 1) and (1, N) tensors, and leaves a 1 × 1 product,
whose scales are single numbers whatever their shape, to the reference GEMM under
``backend="auto"``; ``backend="fp8"`` runs it on ``_scaled_mm`` (oneDNN's order there: the
values of the reference to float32 rounding, as cuBLASLt's on CUDA; ``supports(...,
one_by_one=True)``). Both operands E5M2 run on the CPU as any other pair (the emulation
takes them, bitwise the reference). On CUDA (ATen's ``_scaled_mm_out_cuda``
and its meta function) it needs compute capability ≥ 8.9 (Ada, Hopper, Blackwell), ``a``
row-major (``stride = (s, 1)``, ``s > 1``) and ``b`` column-major (``stride = (1, s)``,
``s > 1``), both 16-byte aligned (cuBLASLt), ``K`` and ``N`` multiples of 16 (``M`` free),
float32 scales, 0-d or (M, 1) and (1, N), contiguous, and not both operands E5M2.
:func:`shape_ok` checks the shapes; :func:`row_major` / :func:`col_major` copy an operand
whose layout does not fit. A combination that the installed torch still refuses (row-wise
scales with float32 output, on a torch or GPU whose row-wise kernel writes bf16 only) is
found by one probe on a 16×16 product, reported once, and left to the reference GEMM (the
same estimator, simulated).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from .encoded import Encoded
from .reference import finish
from ..userframe import user_stacklevel

if TYPE_CHECKING:  # pragma: no cover
    from . import Kernels

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def mixed_codes(*dtypes: torch.dtype) -> str | None:
    """``"torch.float8_e5m2 and torch.int8"`` where one GEMM's operand codes mix FP8 and
    integer dtypes (no kernel takes both together: a coverage reason names the mix, not a
    missing FP8 kernel — a new user's trial), else ``None``."""
    fp8 = [d in FP8_DTYPES for d in dtypes]
    if not any(fp8) or all(fp8):
        return None
    return " and ".join(str(d) for d in dict.fromkeys(dtypes))
_probed: dict[tuple, bool] = {}


def available(device: torch.device | str) -> bool:
    dev = torch.device(device)
    if not hasattr(torch, "_scaled_mm"):
        return False
    if dev.type == "cpu":
        return True
    return dev.type == "cuda" and torch.cuda.get_device_capability(dev) >= (8, 9)


def _scales(a: Encoded, b: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales as ``_scaled_mm`` takes them: both 0-d (tensor-wise) or (M, 1) and (1, N)
    (row-wise; a tensor-wise side is expanded, which changes no value). On the CPU always
    row-wise: the emulation, bit for bit the reference there (module docstring)."""
    m, n = a.codes.shape[0], b.codes.shape[1]
    if a.scale.numel() == 1 and b.scale.numel() == 1 and a.codes.device.type != "cpu":
        return a.scale.reshape(()), b.scale.reshape(())
    return a.scale.expand(m, 1).contiguous(), b.scale.expand(1, n).contiguous()


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` (M, K) if it is row-major as cuBLASLt reads it (``stride = (s, 1)`` with
    ``s > 1`` and ``s ≥ K``: rows that overlap are misread, 16-byte aligned), else a
    row-major copy (same values)."""
    if t.stride(1) == 1 and t.stride(0) > 1 and t.stride(0) >= t.shape[1] and _aligned(t):
        return t
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)  # strides (K, 1)
    return out.copy_(t)


def col_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` (K, N) if it is column-major as cuBLASLt reads it (``stride = (1, s)`` with
    ``s > 1`` and ``s ≥ K``, 16-byte aligned), else a column-major copy (same values)."""
    if t.stride(0) == 1 and t.stride(1) > 1 and t.stride(1) >= t.shape[0] and _aligned(t):
        return t
    out = torch.empty(t.shape[1], t.shape[0], dtype=t.dtype, device=t.device)
    return out.copy_(t.t()).t()  # strides (1, K)


_col_major = col_major  # the name before the CUDA audit


def shape_ok(m: int, k: int, n: int, device: torch.device | str, one_by_one: bool = False) -> bool:
    """Whether ``torch._scaled_mm`` takes an (m, k) × (k, n) product on ``device``:
    non-empty, on CUDA ``k`` and ``n`` multiples of 16, on the CPU not 1 × 1 unless
    ``one_by_one`` (module docstring)."""
    if m <= 0 or k <= 0 or n <= 0:
        return False
    if torch.device(device).type == "cpu":  # a 1 × 1 product may go to oneDNN (docstring)
        return m * n > 1 or one_by_one
    return torch.device(device).type != "cuda" or (k % 16 == 0 and n % 16 == 0)


def _probe(a: Encoded, b: Encoded) -> bool:
    """Whether this torch runs this (device, dtypes, scaling) at all, tried once on CUDA."""
    dev = a.codes.device
    rowwise = a.scale.numel() > 1 or b.scale.numel() > 1
    key = (str(dev), a.codes.dtype, b.codes.dtype, rowwise)
    if key not in _probed:
        ta = torch.zeros(16, 16, device=dev).to(a.codes.dtype)
        tb = torch.zeros(16, 16, device=dev).to(b.codes.dtype).t()
        sa = torch.ones((16, 1) if rowwise else (), device=dev)
        sb = torch.ones((1, 16) if rowwise else (), device=dev)
        try:
            torch._scaled_mm(ta, tb, sa, sb, out_dtype=torch.float32)
            _probed[key] = True
        except RuntimeError as exc:
            _probed[key] = False
            warnings.warn(f"lowbit: torch._scaled_mm refuses {a.codes.dtype} × {b.codes.dtype} "
                          f"{'row' if rowwise else 'tensor'}-wise scaling with float32 output on "
                          f"{dev} ({str(exc).splitlines()[0]}); those GEMMs run simulated", stacklevel=user_stacklevel())
    return _probed[key]


def supports(a: Encoded, b: Encoded, one_by_one: bool = False) -> bool:
    """FP8 codes on both sides (off the CPU not both E5M2: cuBLASLt's rule), plain scales
    (no offset, no blocks) in float32 on non-summed dimensions, and the device's layout and
    shape rules (``one_by_one``: :func:`shape_ok`'s)."""
    m, k = a.codes.shape
    n = b.codes.shape[1]
    dev = a.codes.device
    ok = (a.codes.dtype in FP8_DTYPES and b.codes.dtype in FP8_DTYPES
          and not (a.codes.dtype == b.codes.dtype == torch.float8_e5m2 and dev.type != "cpu")
          and a.plain and b.plain and a.scale.shape[1] == 1 and b.scale.shape[0] == 1
          and a.scale.dtype == b.scale.dtype == torch.float32
          and shape_ok(m, k, n, dev, one_by_one) and available(dev))
    if ok and dev.type == "cuda":
        ok = _probe(a, b)
    return ok


def gemm(kernels: Kernels, a: Encoded, b: Encoded, bias: torch.Tensor | None,
         out_dtype: torch.dtype) -> torch.Tensor:
    """``â @ b̂ + bias`` on ``torch._scaled_mm`` (float32 output, then the bias and the
    cast, as the reference does)."""
    from ..scopes import scope

    sa, sb = _scales(a, b)
    with scope("lowbit::gemm"):
        out = torch._scaled_mm(row_major(a.codes), col_major(b.codes), sa, sb,
                               out_dtype=torch.float32)
    return finish(out, bias, out_dtype)
