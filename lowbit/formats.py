"""Number formats and rounding.

A :class:`IntFormat` is a signed, symmetric integer grid with ``bits`` bits:

    levels  q ∈ {-Q, ..., -1, 0, 1, ..., Q},   Q = 2**(bits-1) - 1

A real tensor ``x`` is mapped onto it with a positive ``scale`` (the value of one grid
step) chosen from ``absmax = max |x|`` over the scaling group, ``scale = absmax / Q``:

    nearest     q = round(x / scale)                       (deterministic, biased)
    stochastic  q = floor(x / scale + u),  u ~ U[0, 1)     (E[q] · scale = x: unbiased)

Stochastic rounding of a value whose fractional part (in grid steps) is ``p`` has
variance ``p (1 - p) · scale² ≤ scale² / 4``. Because ``|x| / scale ≤ Q`` the codes never
leave the grid, so no clipping is needed and the estimate stays unbiased. For
``bits ≤ 8`` every code fits an ``int8``: that is what makes the integer GEMM path exact.

Non-finite values are never made finite: a NaN or ±Inf in a scaling group gives that
group a non-finite scale, so every dequantized value of the group is non-finite too.
"""

from __future__ import annotations

import enum
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

    def scale_from_absmax(self, absmax: torch.Tensor) -> torch.Tensor:
        """Grid step for each group. An all-zero group gets step 1 (its codes are 0);
        NaN/Inf stay non-finite so that they propagate."""
        absmax = absmax.float()
        safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        return safe / self.qmax


_MASK32 = 0xFFFFFFFF


def counter_uniform(shape: torch.Size | tuple[int, ...], seed: torch.Tensor) -> torch.Tensor:
    """``U[0,1)`` float32 noise as a pure function of (element index, ``seed``).

    A counter-based generator: element ``i`` (row-major index in ``shape``) gets
    ``h(i·K + seed mod 2³²)`` with ``h`` a two-round 32-bit integer mixer, keeping 24
    bits (the resolution of ``torch.rand`` in float32: bias ≤ 2⁻²⁴ of a grid step). Being
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
