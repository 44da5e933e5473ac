"""Figure plumbing shared by :mod:`lowbit.analysis` and :mod:`lowbit.experiments`
(matplotlib, imported only when a figure is made): the Agg backend, and writing a figure.

A leaf module (below both; it imports only :mod:`lowbit.atomic`): it imports neither library, so both can use it without importing each
other (``tests/core/test_layering.py``)."""

from __future__ import annotations

from pathlib import Path

from .atomic import replace_with


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend selected (figures are
    only written to files; no display is needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out, write and close a matplotlib figure (``dpi`` dots per inch); returns the
    path. The format follows the file name's suffix (matplotlib's ``savefig``; ``png``
    without one). Written whole or not at all (:func:`lowbit.atomic.replace_with`): a
    report killed while saving left an empty PNG that the previous ``results.md`` still
    showed (a new user's trial)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    try:
        replace_with(path, lambda f: fig.savefig(f, dpi=dpi, format=fmt))
    finally:
        plt.close(fig)
    return path


__all__ = ["pyplot", "save_figure"]
