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

    def codes(
        self,
        x: torch.Tensor,
        absmax: torch.Tensor,
        rounding: Rounding,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Integer-valued float32 codes of ``x`` for groups with the given ``absmax``
        (broadcastable to ``x``). ``noise`` holds the ``u ~ U[0,1)`` draws for
        stochastic rounding (same shape as ``x``)."""
        absmax = absmax.float()
        safe = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        # x / absmax ∈ [-1, 1] is well defined even for denormal ranges, where
        # absmax / qmax would underflow.
        y = x.float() / safe * self.qmax
        if rounding is Rounding.NEAREST:
            q = torch.round(y)
        else:
            if noise is None:
                raise ValueError("stochastic rounding needs a noise tensor")
            q = torch.floor(y + noise)
        # Rounding error of y near ±Q can push a code one level out; clamping there is
        # harmless (it only moves values already within float rounding of ±Q).
        return q.clamp_(-self.qmax, self.qmax)


def uniform_noise(
    shape: torch.Size | tuple[int, ...],
    device: torch.device,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``U[0,1)`` float32 draws from an explicit generator (``None``: torch's global RNG)."""
    return torch.rand(shape, device=device, dtype=torch.float32, generator=generator)
