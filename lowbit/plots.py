"""Figure plumbing shared by :mod:`lowbit.analysis` and :mod:`lowbit.experiments`
(matplotlib, imported only when a figure is made): the Agg backend, and writing a figure.

A leaf module: it imports neither library, so both can use it without importing each
other (``tests/core/test_layering.py``)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend selected (figures are
    only written to files; no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close a matplotlib figure (``dpi`` dots per inch); returns the
    path. The format follows the file name's suffix (matplotlib's ``savefig``)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


__all__ = ["pyplot", "save_figure"]
