"""Scales onto a grid, bit-identical on every device and backend: correctly rounded
division (:func:`div_rn`), the smallest integer-grid step that holds a group
(:func:`grid_step`), up-rounded power-of-two and element-grid block scales
(:func:`pow2_step`, :func:`round_up_on`). The format math: :mod:`lowbit.formats`."""

from __future__ import annotations

import math

import torch

from .elements import Element


def div_rn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` correctly rounded (IEEE round-to-nearest) in ``a``'s dtype, on every
    backend. Eager torch and compiled CPU kernels divide so; Triton's float32 ``/`` does
    not (``div.full.f32``, up to 2 ulps off: 29% of random quotients differed on an H200),
    so under ``torch.compile`` on CUDA a float32 quotient takes :func:`_div_rn_wide`."""
    if a.dtype == torch.float32 and a.device.type == "cuda" and torch.compiler.is_compiling():
        return _div_rn_wide(a, b)
    return a / b


def _div_rn_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 ``a / b`` as ``a · (1/b)`` in float64, rounded once to float32: equal to the
    correctly rounded quotient. The float64 value is within 2⁻⁵² (relative) of ``a/b``,
    while a quotient of two 24-bit numbers is either representable or at least 2⁻⁴⁹ from
    every float32 rounding boundary, so the final rounding lands where direct rounding
    would (tested on CPU). One float64 multiply per element; ``1/b`` is per group."""
    return (a.double() * (1.0 / b.double())).float()


def grid_step(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The smallest step ``s`` in ``absmax``'s dtype with ``div_rn(absmax, s) ≤ qmax``:
    every ``|x| ≤ absmax`` then maps to ``|x / s| ≤ qmax`` (correctly rounded division is
    monotone), and ``s`` is ``absmax / qmax`` rounded up where rounding to nearest would
    not do. A pure function of ``(absmax, qmax)``: the same bits on every device and
    backend. Valid from the smallest subnormal (a step below it would be 0: the step is
    then the smallest positive number) to the largest finite ``absmax``. ``qmax`` has
    fewer than 24 significant bits (every grid's largest element does).

    All-zero groups get 0; NaN and ±Inf stay non-finite. A step is used as it is, never
    rounded again: ``q·step`` with ``q`` the codes is what a quantizer estimates."""
    if absmax.dtype == torch.float32:
        # NaN passed on explicitly: compiled, ``view(int32)`` of a NaN gives -1 (all bits
        # set), which the ulp arithmetic below would turn into a step of 0 (NaN → finite)
        return torch.where(torch.isnan(absmax), absmax, _grid_step_f32(absmax, float(qmax)))
    if absmax.dtype == torch.float64:
        return torch.where(torch.isnan(absmax), absmax, _grid_step_f64(absmax, float(qmax)))
    # other dtypes (lowbit's quantizers pass float32 or float64 only): the chained loop
    step = absmax / qmax  # correct from 3 ulps below (some backends use 1/qmax)
    zero, inf = torch.zeros_like(step), torch.full_like(step, torch.inf)
    for _ in range(3):
        step = torch.nextafter(step, zero)
    for _ in range(6):  # the smallest valid step is at most 5 ulps above
        step = torch.where(div_rn(absmax, step) > qmax, torch.nextafter(step, inf), step)
    return step


def _grid_step_f64(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """:func:`grid_step` for float64 (``absmax ≥ 0``; NaN is the caller's): the loop of
    the generic branch — start 3 ulps below ``absmax / qmax`` (stopping at 0), then step
    up one ulp while ``div_rn(absmax, step) > qmax``, at most 6 times — with every
    candidate computed from the start's bits instead of from the previous one. The
    quotient only falls as the step grows (correctly rounded division is monotone), so
    the loop's number of steps up is the number of the 6 candidates that fail: the same
    step, bit for bit (``tests/core/test_kernels.py``). For non-negative float64,
    ``bits + 1`` is ``nextafter(·, inf)`` (0 → the smallest subnormal, the largest finite
    → inf) and ``bits − 1`` is ``nextafter(·, 0)``. The chained loop, compiled, inlined
    each step into the next (3⁶ copies): 80 s of Inductor code generation for one
    float64 quantizer on the CPU."""
    bits = torch.clamp_min((absmax / qmax).view(torch.int64) - 3, 0)
    count = torch.zeros_like(bits)
    for k in range(6):
        c = (bits + k).view(torch.float64)
        count = count + (div_rn(absmax, c) > qmax).to(torch.int64)
    return (bits + count).view(torch.float64)


def _grid_step_f32(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """:func:`grid_step` for float32, with exact float64 products and integer ulp steps
    only (no division, no ``nextafter``: libdevice's flushes subnormals under Triton).
    ``RN(a/s) ≤ q ⇔ a ≤ s·q_hi`` with ``q_hi = q + ulp(q)/2`` (a tie rounds to ``q``,
    whose last mantissa bit is 0), and ``s·q_hi`` (24 × 25 bits) is exact in float64."""
    a = absmax.double()
    q_hi = qmax + 2.0 ** (math.frexp(qmax)[1] - 25)
    bits = (a * (1.0 / q_hi)).float().view(torch.int32)  # within an ulp of the answer
    best = (bits + 1).view(torch.float32)
    for k in (0, -1):  # the smallest valid of the three neighbours
        c = (bits + k).view(torch.float32)
        best = torch.where(c.double() * q_hi >= a, c, best)
    return best


def pow2_step(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The smallest power of two ``t`` with ``absmax / t ≤ qmax`` (exact; 0 for 0,
    non-finite for non-finite ``absmax``): the up-rounded E8M0 scale of an MX block."""
    r = absmax / qmax
    f, e = torch.frexp(r)  # r = f·2^e, f ∈ [0.5, 1)
    t = torch.exp2(torch.where(f == 0.5, e - 1, e).to(r.dtype))
    tiny = torch.full_like(r, torch.finfo(r.dtype).smallest_normal * torch.finfo(r.dtype).eps)
    t = torch.where((r == 0) & (absmax > 0), tiny, t)  # r underflowed: the smallest subnormal
    t = torch.where(absmax > qmax * t, 2 * t, t)  # qmax·t is exact
    t = torch.where(absmax == 0, torch.zeros_like(t), t)
    return torch.where(torch.isfinite(absmax), t, absmax)


def round_up_on(r: torch.Tensor, element: Element) -> torch.Tensor:
    """The smallest value of ``element``'s grid ``≥ r`` (``r ≥ 0``, at most its max)."""
    sp = element.spacing(r)
    return torch.ceil(r / sp) * sp
