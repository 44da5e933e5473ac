"""FP8 GEMM with ``torch._scaled_mm``: float8 codes, float32 scales per tensor or per
row of ``a`` / per column of ``b`` (never on the summed dimension).

On the CPU (PyTorch ≥ 2.6) ``_scaled_mm`` dequantizes and multiplies in float32, which is
bit for bit the simulated reference GEMM (tested). On CUDA it needs compute capability
≥ 8.9 (Ada, Hopper, Blackwell), ``a`` row-major and ``b`` column-major (copied here when
they are not), every dimension a multiple of 16, and not both operands E5M2; a
combination that the installed torch still refuses is found by one probe on a 16×16
product, reported once, and left to the reference GEMM (the same estimator, simulated).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from .encoded import Encoded
from .reference import finish

if TYPE_CHECKING:  # pragma: no cover
    from . import Kernels

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
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
    (row-wise; a tensor-wise side is expanded, which changes no value)."""
    m, n = a.codes.shape[0], b.codes.shape[1]
    if a.scale.numel() == 1 and b.scale.numel() == 1:
        return a.scale.reshape(()), b.scale.reshape(())
    return a.scale.expand(m, 1).contiguous(), b.scale.expand(1, n).contiguous()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(0) == 1 else t.t().contiguous().t()


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
                          f"{dev} ({str(exc).splitlines()[0]}); those GEMMs run simulated", stacklevel=4)
    return _probed[key]


def supports(a: Encoded, b: Encoded) -> bool:
    """FP8 codes on both sides (not both E5M2), plain scales (no offset, no blocks) in
    float32 on non-summed dimensions, and the device's layout and shape rules."""
    m, k = a.codes.shape
    n = b.codes.shape[1]
    dev = a.codes.device
    ok = (a.codes.dtype in FP8_DTYPES and b.codes.dtype in FP8_DTYPES
          and not (a.codes.dtype == b.codes.dtype == torch.float8_e5m2)
          and a.plain and b.plain and a.scale.shape[1] == 1 and b.scale.shape[0] == 1
          and a.scale.dtype == b.scale.dtype == torch.float32
          and m > 0 and k > 0 and n > 0 and available(dev))
    if ok and dev.type == "cuda":
        ok = m % 16 == 0 and k % 16 == 0 and n % 16 == 0 and _probe(a, b)
    return ok


def gemm(kernels: Kernels, a: Encoded, b: Encoded, bias: torch.Tensor | None,
         out_dtype: torch.dtype) -> torch.Tensor:
    """``â @ b̂ + bias`` on ``torch._scaled_mm`` (float32 output, then the bias and the
    cast, as the reference does)."""
    from torch.profiler import record_function

    sa, sb = _scales(a, b)
    with record_function("lowbit::gemm"):
        out = torch._scaled_mm(a.codes.contiguous(), _col_major(b.codes), sa, sb,
                               out_dtype=torch.float32)
    return finish(out, bias, out_dtype)
