"""Timing shared by the probes: the median wall time of repeated calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_ms(f: Callable[[], object], n: int = 9) -> float:
    """Median over ``n`` calls of ``f`` (after one warm-up call), in milliseconds."""
    f()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def interleaved_ms(a: Callable[[], object], b: Callable[[], object], repeats: int = 3,
                   n: int = 9) -> tuple[float, float]:
    """``(a, b)``: the median of ``repeats`` interleaved :func:`median_ms` of each, so a
    shared machine's drift hits both alike."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(median_ms(a, n))
        tb.append(median_ms(b, n))
    return statistics.median(ta), statistics.median(tb)


def start(doc: str) -> None:
    """A probe's command line (``--threads``, default 1), applied to torch."""
    import argparse

    import torch

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(p.parse_args().threads)
