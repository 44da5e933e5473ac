"""Bin utilization: where a gradient's values land on each quantizer's integer grid.

A quantizer maps operand ``A`` (rows = the non-summed dimension) to ``T·A`` (its row
transform) and divides each row (or the whole tensor) by its grid step
``absmax / Q``, so every value lands in ``[−Q, Q]``, ``Q = 2^(bits−1) − 1``. Stochastic
rounding then picks one of the two neighbouring levels. A quantizer that leaves most
values in the few bins around 0 (PTQ on a gradient with a few large rows) wastes its
bits: the variance per element is ``~step²/4`` whatever the value.

For each quantizer :func:`bin_histogram` counts the mapped values per level (rounded
to the nearest level, i.e. the bin of width 1 around it) and summarizes:

* ``effective`` — ``exp(H)/(2Q+1)`` with ``H`` the entropy (nats) of the level
  histogram: the fraction of the grid an equally informative uniform use would fill;
* ``occupied`` — the fraction of the ``2Q+1`` levels holding at least one value.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..formats import IntFormat, compute_dtype
from ..quantizers import QUANTIZERS, absmax, check_operand, get_quantizer
from ..quantizers.base import checked_transform
from .plots import save_figure


@dataclass
class BinHistogram:
    """Counts of mapped values per grid level ``levels = [−Q, …, Q]``."""

    quantizer: str
    bits: int
    levels: list[int]
    counts: list[int]
    effective: float
    occupied: float

    def to_dict(self) -> dict:
        return asdict(self)


def mapped_values(a: torch.Tensor, quantizer: str, bits: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """``T·A / step`` — the operand on the quantizer's integer grid before rounding
    (values in ``[−Q, Q]``; padded rows of a Hadamard transform included)."""
    check_operand(a, "mapped_values")  # 2-D, a float dtype lowbit quantizes (a review: complex taken)
    q, fmt = get_quantizer(quantizer), IntFormat(bits)
    a = a.to(compute_dtype(a.dtype))  # float64 keeps its range
    y = checked_transform(q, q.transform(a, generator)).forward(a)
    step = fmt.scale_from_absmax(absmax(y, q.granularity))
    return y / step


def bin_histogram(a: torch.Tensor, quantizer: str, bits: int,
                  generator: torch.Generator | None = None) -> BinHistogram:
    """Histogram of ``a`` (2-D, rows = non-summed dimension) on ``quantizer``'s grid.
    Counts hold the finite mapped values; where ``a`` holds NaN or ±Inf (its group's scale
    is not a number, so no value of that group lands on a level) the utilization figures
    are NaN, not those of the values left over."""
    qmax = IntFormat(bits).qmax
    v = mapped_values(a, quantizer, bits, generator)
    finite = torch.isfinite(v)
    non_finite = not bool(finite.all()) or not bool(torch.isfinite(a).all())
    v = v[finite]
    idx = torch.round(v).clamp(-qmax, qmax).long() + qmax
    counts = torch.bincount(idx, minlength=2 * qmax + 1)
    n = int(counts.sum())
    levels = 2 * qmax + 1
    if non_finite:
        eff = occ = math.nan
    elif n == 0:
        eff = occ = 0.0
    else:
        p = counts[counts > 0].double() / n
        eff = math.exp(float(-(p * p.log()).sum())) / levels
        occ = int((counts > 0).sum()) / levels
    return BinHistogram(get_quantizer(quantizer).name, bits, list(range(-qmax, qmax + 1)),
                        counts.tolist(), eff, occ)


def bin_utilization(a: torch.Tensor, bits: int, quantizers: Iterable[str] = tuple(QUANTIZERS),
                    generator: torch.Generator | None = None) -> dict[str, BinHistogram]:
    """:func:`bin_histogram` for each quantizer, by name."""
    return {q: bin_histogram(a, q, bits, generator) for q in quantizers}


def plot_bin_utilization(hists: dict[str, BinHistogram], path: str | Path,
                         title: str | None = None) -> Path:
    """One bar chart per quantizer (log counts per level); writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(hists)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False,
                             sharey=True)
    for ax, (name, h) in zip(axes.flat, hists.items()):
        ax.bar(h.levels, h.counts, width=0.85, color="tab:blue")
        ax.set_yscale("log")
        ax.set_title(f"{name.upper()}: eff. {h.effective:.0%}, occupied {h.occupied:.0%}",
                     fontsize=9)
        ax.set_xlabel(f"level ({h.bits}-bit grid)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes[0][0].set_ylabel("values", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=110)


__all__ = ["BinHistogram", "bin_histogram", "bin_utilization", "mapped_values",
           "plot_bin_utilization"]
