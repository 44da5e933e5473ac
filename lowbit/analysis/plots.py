"""Figures of the variance study (matplotlib, Agg backend): the variance profile
heatmap and measured quantization variance against the Theorem 2 bound."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..plots import pyplot, save_figure
from .variance import VarianceProfile, VarianceReport


def _short(name: str) -> str:
    return name.replace("blocks.", "b").replace(".conv", ".c")


def plot_profile(profile: VarianceProfile, path: str | Path, title: str | None = None) -> Path:
    """Heatmap of ``log10`` measured contribution (row: the one layer whose gradients are
    quantized; column: parameter group), and, when the profile carries predictions, a
    second panel with the tightness ``measured / bound`` (data-dependent bound)."""
    import numpy as np

    plt = pyplot()
    meas = np.array(profile.measured, dtype=float)
    panels = [("log10 quantization variance", np.log10(np.where(meas > 0, meas, np.nan)))]
    if profile.pred_data:
        pred = np.array(profile.pred_data, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where((pred > 0) & (meas > 0), meas / pred, np.nan)
        panels.append(("log10 measured / bound", np.log10(ratio)))
    h = 0.28 * len(profile.layers) + 1.8
    w = 0.3 * len(profile.groups) + 2.5
    fig, axes = plt.subplots(1, len(panels), figsize=(w * len(panels), h), squeeze=False)
    for ax, (label, z) in zip(axes[0], panels):
        im = ax.imshow(np.ma.masked_invalid(z), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(profile.groups)))
        ax.set_xticklabels([_short(g) for g in profile.groups], rotation=90, fontsize=6)
        ax.set_yticks(range(len(profile.layers)))
        ax.set_yticklabels([_short(n) for n in profile.layers], fontsize=6)
        ax.set_xlabel("parameter group (gradient)", fontsize=8)
        ax.set_ylabel("layer whose gradients are quantized", fontsize=8)
        ax.set_title(label, fontsize=8)
        cb = fig.colorbar(im, ax=ax)
        cb.ax.tick_params(labelsize=6)
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=90)


def plot_bounds(reports: Sequence[tuple[str, VarianceReport]], path: str | Path,
                title: str | None = None) -> Path:
    """Measured quantization variance (bound batches) against the predicted bound, one
    point per parameter group (``total`` as a star) and run; filled markers: the
    data-dependent bound, hollow: the analytic one. Below the diagonal = bound holds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    lo, hi = math.inf, -math.inf
    for k, (label, rep) in enumerate(reports):
        color = f"C{k % 10}"
        for flavour, fill in (("data", True), ("analytic", False)):
            xs, ys, xt, yt = [], [], [], []
            for name, g in rep.groups.items():
                x, y = getattr(g, f"pred_{flavour}"), g.quant_bound_batches
                if not (x > 0 and y > 0 and math.isfinite(x)):
                    continue
                (xt if name == "total" else xs).append(x)
                (yt if name == "total" else ys).append(y)
                lo, hi = min(lo, x, y), max(hi, x, y)
            face = color if fill else "none"
            ax.scatter(xs, ys, s=14, facecolors=face, edgecolors=color,
                       label=f"{label} ({flavour})")
            ax.scatter(xt, yt, s=80, marker="*", facecolors=face, edgecolors=color)
    if lo < hi:
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = bound")
    if lo <= hi:  # a log scale needs a positive point (a new user's run had none: matplotlib raised)
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no finite positive bound to plot", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
    ax.set_xlabel("predicted bound (Theorem 2)", fontsize=8)
    ax.set_ylabel("measured quantization variance", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper left")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, path, dpi=110)


__all__ = ["plot_bounds", "plot_profile"]
