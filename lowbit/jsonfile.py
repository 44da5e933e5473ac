"""Valid JSON for lowbit's result files (``variance.json``, ``monitor.json``, coverage's
``--json``, …). JSON has no NaN or Infinity, and ``json.dumps`` writes them as bare
tokens that other readers refuse (reviews found them in ``variance.json``, then in
``monitor.json``): :func:`strict` writes NaN as ``null`` and ±inf as ``"inf"``/``"-inf"``,
:func:`dumps` refuses anything else that is not JSON, and :func:`number` reads such a
number back."""

from __future__ import annotations

import json
import math
from typing import Any

import torch


def strict(x: object) -> object:
    """``x`` with every non-finite float made valid JSON: NaN as ``None``, ±inf as
    ``"inf"``/``"-inf"``; tensors as (nested) lists; dicts, lists and tuples walked.
    Dump the result with ``allow_nan=False`` (:func:`dumps` does)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else str(x)
    if isinstance(x, torch.Tensor):
        return strict(x.tolist())
    if isinstance(x, dict):
        return {k: strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict(v) for v in x]
    return x


def number(v: object) -> float:
    """A number :func:`strict` wrote, read back: ``None`` → NaN, ``"inf"``/``"-inf"`` →
    ±inf, an int or float → itself as float; ``TypeError`` for anything else."""
    if v is None:
        return math.nan
    if v in ("inf", "-inf"):
        return float(v)  # type: ignore[arg-type]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    raise TypeError(f"not a number lowbit.jsonfile writes: {v!r}")


def dumps(x: object, **kwargs: Any) -> str:
    """``json.dumps(strict(x), allow_nan=False, **kwargs)``: valid JSON text."""
    return json.dumps(strict(x), allow_nan=False, **kwargs)


__all__ = ["dumps", "number", "strict"]
