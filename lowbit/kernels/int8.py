"""Integer GEMM: int8 × int8 → int32 with ``torch._int_mm``, scales applied outside.

Exact for codes of ≤ 8 bits as long as the int32 accumulator cannot overflow:
``K · 127² < 2³¹`` ⇔ ``K ≤ MAX_K``. Scales may only sit on the non-summed dimensions
(rows of ``a``, columns of ``b``); the dispatcher checks this before choosing this path.
"""

from __future__ import annotations

import torch

MAX_K = (2**31 - 1) // (127 * 127)


def available(device: torch.device) -> bool:
    """``torch._int_mm`` exists for CPU and CUDA tensors in PyTorch ≥ 2.4."""
    return hasattr(torch, "_int_mm") and device.type in ("cpu", "cuda")


def shape_ok(m: int, k: int, n: int, device: torch.device) -> bool:
    if k > MAX_K or m == 0 or k == 0 or n == 0:
        return False
    if device.type == "cuda":  # cuBLASLt int8 constraints
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return True


def int_mm(a_codes: torch.Tensor, b_codes: torch.Tensor) -> torch.Tensor:
    """``a_codes @ b_codes`` with an exact int32 sum."""
    return torch._int_mm(a_codes, b_codes)  # (M, N) int32
