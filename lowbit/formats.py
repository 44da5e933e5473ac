"""Number formats and rounding.

A :class:`IntFormat` is a signed, symmetric integer grid with ``bits`` bits:

    levels  q ∈ {-Q, ..., -1, 0, 1, ..., Q},   Q = 2**(bits-1) - 1

A real tensor ``x`` is mapped onto it with a positive ``step`` (the value of one grid
step) chosen from ``absmax = max |x|`` over the scaling group (:func:`grid_step`):
``step = absmax / Q``, rounded up where float rounding would put ``absmax / step`` above
``Q``. With ``y = x / step`` (one correctly rounded division, ``|y| ≤ Q``):

    nearest     q = round(y)                               (deterministic, biased)
    stochastic  q = floor(y) + [u < y − floor(y)],  u ~ U[0, 1)   (E[q]·step = x)

Stochastic rounding of a value whose fractional part (in grid steps) is ``p`` has
variance ``p (1 - p) · step² ≤ step² / 4``. Because ``|y| ≤ Q`` the codes never leave
the grid, so no clipping is needed and the estimate stays unbiased. For ``bits ≤ 8``
every code fits an ``int8``: that is what makes the integer GEMM path exact.

**Bias, exactly.** The noise ``u`` takes the 2²⁴ values ``k·2⁻²⁴`` (:func:`counter_uniform`),
so over the whole noise alphabet ``E[q] = floor(y) + ⌈2²⁴·f⌉/2²⁴`` with ``f = y − floor(y)``
(exact in floating point for ``y ≥ 0`` and ``|y| ≥ 1/2``; otherwise rounded by at most
2⁻²⁵): the bias is below 2⁻²⁴ of a step. The form ``floor(y + u)`` would round ``y + u``
first and be off by up to ``ulp(y)/2`` (2⁻¹⁸ of a step for ``|y|`` in [64, 128) in
float32). Beyond that, the only error is the rounding of ``y = x / step`` (half an ulp of
``y``) and the output dtype's own final rounding — over the whole finite range of the
input's dtype, subnormals included: the step is a representable number that is never
rounded after ``y`` is computed from it, and the arithmetic runs in
:func:`compute_dtype` (float64 for float64 inputs, float32 otherwise, which holds
every bfloat16/float16 value exactly).

Non-finite values are never made finite: a NaN or ±Inf in a scaling group gives that
group a non-finite step, so every dequantized value of the group is non-finite too.
An all-zero group has step 0: its codes are 0 and it adds no variance.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import torch

MIN_BITS = 2
MAX_BITS = 8
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Rounding(enum.Enum):
    """How a real value is mapped to a grid level."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


def check_bits(bits: int, field: str = "bits") -> int:
    """Validate a bit width: an int in ``MIN_BITS..MAX_BITS``."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{field} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{field} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return bits


def check_float_tensor(x: torch.Tensor, name: str = "input") -> None:
    """Raise a clear error for a non-tensor or a dtype the quantizers do not support."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {x.dtype}; supported dtypes: {allowed}")


@dataclass(frozen=True)
class IntFormat:
    """Signed symmetric integer grid ``{-Q..Q}``, ``Q = 2**(bits-1) - 1`` (see module doc)."""

    bits: int

    def __post_init__(self) -> None:
        check_bits(self.bits)

    @property
    def qmax(self) -> int:
        """Largest code ``Q``; the grid has ``2Q + 1`` levels and ``2Q`` bins."""
        return 2 ** (self.bits - 1) - 1

    def step(self, absmax: torch.Tensor) -> torch.Tensor:
        """Grid step of each group (:func:`grid_step`) in the compute dtype of
        ``absmax``: 0 for an all-zero group, non-finite where ``absmax`` is."""
        return grid_step(absmax.to(compute_dtype(absmax.dtype)), self.qmax)

    def scale_from_absmax(self, absmax: torch.Tensor) -> torch.Tensor:
        """:meth:`step` made safe to divide by: an all-zero group gets ``1/Q`` instead of 0
        (its values map to code 0 either way). Not a variance: use :meth:`step` for that."""
        step = self.step(absmax)
        return torch.where(step == 0, torch.full_like(step, 1 / self.qmax), step)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where quantizer arithmetic runs for inputs of ``dtype``: float64 for float64 (a
    float32 step would underflow or overflow for values like 1e-300 or 1e300), float32
    otherwise (it holds every float32/bfloat16/float16 value and step exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
        return _grid_step_f32(absmax, float(qmax))
    step = absmax / qmax  # float64: correct from 3 ulps below (some backends use 1/qmax)
    zero, inf = torch.zeros_like(step), torch.full_like(step, torch.inf)
    for _ in range(3):
        step = torch.nextafter(step, zero)
    for _ in range(6):  # the smallest valid step is at most 5 ulps above
        step = torch.where(div_rn(absmax, step) > qmax, torch.nextafter(step, inf), step)
    return step


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


def stochastic_round(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``floor(y) + [u < y − floor(y)]`` (as ``y``'s dtype) for noise ``u`` in [0, 1).

    ``y − floor(y)`` is exact for ``y ≥ 0`` and for ``|y| ≥ 1/2`` (and within 2⁻²⁵
    otherwise), and the comparison is exact, so with ``u`` uniform on the 2²⁴ values of
    :func:`counter_uniform` the mean is ``y`` to within 2⁻²⁴ — unlike ``floor(y + u)``,
    whose addition rounds (see the module docstring)."""
    low = torch.floor(y)
    return low + (u < y - low).to(y.dtype)


_MASK32 = 0xFFFFFFFF


def counter_uniform(shape: torch.Size | tuple[int, ...], seed: torch.Tensor) -> torch.Tensor:
    """``U[0,1)`` float32 noise as a pure function of (element index, ``seed``).

    A counter-based generator: element ``i`` (row-major index in ``shape``) gets
    ``h(i·K + seed mod 2³²)`` with ``h`` a two-round 32-bit integer mixer, keeping 24
    bits (the resolution of ``torch.rand`` in float32: the values ``k·2⁻²⁴``, so
    :func:`stochastic_round` is biased by less than 2⁻²⁴ of a grid step). Being
    a pure function of the index, the same noise comes out of the reference path, a
    compiled kernel or another device, whatever the memory layout. ``seed`` is a 0-d
    int64 tensor drawn from the layer's ``torch.Generator`` (:func:`draw_seed`).
    """
    n = 1
    for d in shape:
        n *= d
    x = torch.arange(n, device=seed.device, dtype=torch.int64).view(shape)
    x = (x * 0x27D4EB2D + seed) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (x >> 16) ^ x
    return (x >> 8).to(torch.float32) * (2.0**-24)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A fresh 32-bit seed (0-d int64 tensor on ``device``) from ``generator``
    (``None``: torch's global RNG). One draw per quantization call."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**32, (), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device)
