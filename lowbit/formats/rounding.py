"""Rounding onto a format's element grid — stochastic (unbiased, exact mean over the
noise alphabet) or to nearest — and the exact stochastic-rounding variance per element.
The math: :mod:`lowbit.formats`; the noise: :func:`lowbit.noise.counter_uniform`."""

from __future__ import annotations

import torch

from .elements import pow2
from .values import Format


def stochastic_round(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``floor(y) + [u < y − floor(y)]`` (as ``y``'s dtype) for noise ``u`` in [0, 1).

    ``y − floor(y)`` is exact for ``y ≥ 0`` and for ``|y| ≥ 1/2`` (and within 2⁻²⁵
    otherwise), and the comparison is exact, so with ``u`` uniform on the 2²⁴ values of
    :func:`~lowbit.noise.counter_uniform` the mean is ``y`` to within 2⁻²⁴ — unlike ``floor(y + u)``,
    whose addition rounds (see :mod:`lowbit.formats`)."""
    low = torch.floor(y)
    return low + (u < y - low).to(y.dtype)


def round_elements(y: torch.Tensor, fmt: Format, u: torch.Tensor | None) -> torch.Tensor:
    """``y`` (elements, ``|y| ≤ emax``) rounded onto ``fmt``'s element grid: stochastic
    with noise ``u`` in [0, 1), nearest-even for ``u=None`` (:mod:`lowbit.formats`). Exact:
    ``y/δ`` and ``ŷ = q·δ`` carry no rounding for a power-of-two spacing ``δ``."""
    if fmt.element is None:
        return torch.round(y) if u is None else stochastic_round(y, u)
    k = fmt.element.spacing_exp(y.abs())
    t = y * pow2(-k, y.dtype)  # y/δ, exact
    q = torch.round(t) if u is None else stochastic_round(t, u)
    return q * pow2(k, y.dtype)


def element_variance(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``(y − lo)(hi − y)`` per element (float64, element²): the variance of rounding
    ``y`` stochastically onto ``fmt``'s element grid (0 on grid points)."""
    sp = fmt.spacing(y.abs())
    t = y if sp is None else y * pow2(-fmt.element.spacing_exp(y.abs()), y.dtype)  # type: ignore[union-attr]
    frac = (t - torch.floor(t)).double()
    var = frac * (1 - frac)
    return var if sp is None else var * sp.double() ** 2


def element_spacing_sq(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``δ(|y|)²`` per element (float64): ``δ²/4`` bounds one element's SR variance."""
    sp = fmt.spacing(y.abs())
    return torch.ones_like(y, dtype=torch.float64) if sp is None else sp.double() ** 2
