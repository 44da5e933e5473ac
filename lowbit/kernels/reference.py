"""Reference kernels in plain torch: they define the semantics of every fast path.

``quantize_codes`` is the whole quantizer of one operand (absmax → grid → rounding →
int8); ``scaled_mm`` dequantizes both operands and multiplies in float32 (float64 for
float64 operands). The compiled kernels (``compiled.py``) run these very functions
through ``torch.compile``; nothing here is compiled.
"""

from __future__ import annotations

import torch

from ..formats import compute_dtype, counter_uniform, div_rn, grid_step, stochastic_round


def _round(y: torch.Tensor, stochastic: bool, seed: torch.Tensor) -> torch.Tensor:
    return stochastic_round(y, counter_uniform(y.shape, seed)) if stochastic else torch.round(y)


def quantize_codes(
    x: torch.Tensor, qmax: int, per_row: bool, stochastic: bool, seed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and steps ((R, 1) per row, (1, 1) per tensor) of a 2-D ``x``.

    ``step = grid_step(absmax, qmax)``, ``y = x / step`` correctly rounded
    (:func:`~lowbit.formats.div_rn`, ``|y| ≤ qmax``), then
    :func:`~lowbit.formats.stochastic_round` with ``u`` from :func:`counter_uniform`, or
    ``round(y)``. Arithmetic and steps in :func:`~lowbit.formats.compute_dtype` (float64
    for float64 ``x``, float32 otherwise), so ``E[codes]·step = x`` over the whole finite
    range of ``x``'s dtype, subnormals included. All-zero groups get step 0 (codes 0);
    NaN/Inf make the group's step non-finite, so they propagate."""
    x = x.to(compute_dtype(x.dtype))
    a = x.abs()
    amax = a.amax(dim=1, keepdim=True) if per_row else a.amax().reshape(1, 1)
    step = grid_step(amax, qmax)
    q = _round(div_rn(x, torch.where(amax == 0, torch.ones_like(step), step)), stochastic, seed)
    # |y| ≤ qmax makes the clamp a no-op on finite groups (it only tames NaN rows' codes).
    return q.clamp(-qmax, qmax).to(torch.int8), step


def quantize_codes_fixed(
    x: torch.Tensor, amax: torch.Tensor, qmax: int, stochastic: bool, seed: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """Like :func:`quantize_codes`, but on a grid fixed in advance: ``step =
    grid_step(amax, qmax)`` with ``amax`` given ((1, 1) per tensor or (R, 1) per row, all
    > 0), not read from ``x``.

    Values beyond ``±amax`` are clipped to ``±qmax`` codes. Also returns what the caller
    needs to account for that, in the granularity of ``amax``: the observed absmax
    (for the next prediction), the number of clipped elements, ``Σ (|x| − amax)₊²`` and
    ``Σ x²``. A group whose observed absmax is non-finite gets that as its step, so
    NaN/Inf propagate as on the dynamic path."""
    x = x.to(compute_dtype(x.dtype))
    amax = amax.to(x.dtype)
    a = x.abs()
    obs = a.amax(dim=1, keepdim=True) if amax.shape[0] > 1 else a.amax().reshape(1, 1)
    step = grid_step(amax, qmax)
    q = _round(div_rn(x, step), stochastic, seed)
    excess = (a - amax).clamp_min(0)
    step = torch.where(torch.isfinite(obs), step, obs)
    return (q.clamp(-qmax, qmax).to(torch.int8), step, obs, (a > amax).sum(),
            (excess * excess).sum(), (x * x).sum())


def scaled_mm(
    a_codes: torch.Tensor, a_step: torch.Tensor, b_codes: torch.Tensor, b_step: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``(a_codes·a_step) @ (b_codes·b_step) + bias`` in the steps' dtype (float32, or
    float64 where a step is), cast to ``out_dtype``. Steps broadcast against their
    operand: (1, 1), (rows, 1) or (1, cols)."""
    dt = torch.promote_types(a_step.dtype, b_step.dtype)
    out = (a_codes.to(dt) * a_step) @ (b_codes.to(dt) * b_step)
    return _finish(out, bias, out_dtype)


def dequantize_acc(
    acc: torch.Tensor, a_step: torch.Tensor, b_step: torch.Tensor,
    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Epilogue of an integer GEMM: ``diag(a_step) · acc · diag(b_step) + bias``, in the
    steps' dtype."""
    return _finish(acc.to(torch.promote_types(a_step.dtype, b_step.dtype)) * a_step * b_step,
                   bias, out_dtype)


def _finish(out: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(out_dtype)
