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


def quantize_codes_fixed(
    x: torch.Tensor, amax: torch.Tensor, qmax: int, stochastic: bool, seed: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Like :func:`quantize_codes`, but on a grid fixed in advance: ``step = amax/qmax``
    with ``amax`` given ((1, 1) per tensor or (R, 1) per row, all > 0), not read from ``x``.

    Values beyond ``±amax`` are clipped to ``±qmax`` codes. Also returns what the caller
    needs to account for that, in the granularity of ``amax``: the observed absmax
    (for the next prediction), the number of clipped elements, ``Σ (|x| − amax)₊²`` and
    ``Σ x²``. A group whose observed absmax is non-finite gets that as its step, so
    NaN/Inf propagate as on the dynamic path."""
    x = x.float()
    a = x.abs()
    obs = a.amax(dim=1, keepdim=True) if amax.shape[0] > 1 else a.amax().reshape(1, 1)
    y = x / amax * qmax
    q = torch.floor(y + counter_uniform(x.shape, seed)) if stochastic else torch.round(y)
    excess = (a - amax).clamp_min(0)
    step = torch.where(torch.isfinite(obs), amax / qmax, obs)
    return (q.clamp(-qmax, qmax).to(torch.int8), step, obs, (a > amax).sum(),
            (excess * excess).sum(), (x * x).sum())


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
