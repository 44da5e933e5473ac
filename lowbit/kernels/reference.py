"""Reference kernels in plain torch: they define the semantics of every fast path.

``quantize_codes`` is the whole quantizer of one operand (absmax → grid → rounding →
int8); ``scaled_mm`` dequantizes both operands and multiplies in float32. The compiled
kernels (``compiled.py``) run these very functions through ``torch.compile``.
"""

from __future__ import annotations

import torch

from ..formats import counter_uniform


def quantize_codes(
    x: torch.Tensor, qmax: int, per_row: bool, stochastic: bool, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and float32 steps ((R, 1) per row, (1, 1) per tensor) of a 2-D ``x``.

    ``q = floor(x/step + u)`` (stochastic, ``u`` from :func:`counter_uniform`) or
    ``round(x/step)``, ``step = absmax/qmax``; computed as ``x/absmax·qmax`` so that
    denormal ranges do not overflow. All-zero groups get step ``1/qmax`` (codes 0);
    NaN/Inf make the group's step non-finite, so they propagate."""
    x = x.float()
    a = x.abs()
    amax = a.amax(dim=1, keepdim=True) if per_row else a.amax().reshape(1, 1)
    safe = torch.where(amax == 0, torch.ones_like(amax), amax)
    y = x / safe * qmax
    q = torch.floor(y + counter_uniform(x.shape, seed)) if stochastic else torch.round(y)
    # Float rounding of y + u just below qmax + 1 can give qmax + 1: clamp (harmless).
    return q.clamp(-qmax, qmax).to(torch.int8), safe / qmax


def scaled_mm(
    a_codes: torch.Tensor, a_step: torch.Tensor, b_codes: torch.Tensor, b_step: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(a_codes·a_step) @ (b_codes·b_step) + bias`` in float32, cast to ``out_dtype``.
    Steps broadcast against their operand: (1, 1), (rows, 1) or (1, cols)."""
    out = (a_codes.float() * a_step) @ (b_codes.float() * b_step)
    return _finish(out, bias, out_dtype)


def dequantize_acc(
    acc: torch.Tensor, a_step: torch.Tensor, b_step: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Epilogue of an integer GEMM: ``diag(a_step) · acc · diag(b_step) + bias``."""
    return _finish(acc.float() * a_step * b_step, bias, out_dtype)


def _finish(out: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)
