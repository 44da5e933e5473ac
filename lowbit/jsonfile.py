"""Valid JSON for lowbit's result files (``variance.json``, ``monitor.json``, coverage's
``--json``, …). JSON has no NaN or Infinity, and ``json.dumps`` writes them as bare
tokens that other readers refuse (reviews found them in ``variance.json``, then in
``monitor.json``): :func:`strict` writes NaN as ``null`` and ±inf as ``"inf"``/``"-inf"``,
and :func:`dumps` refuses anything else that is not JSON."""

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


def dumps(x: object, **kwargs: Any) -> str:
    """``json.dumps(strict(x), allow_nan=False, **kwargs)``: valid JSON text."""
    return json.dumps(strict(x), allow_nan=False, **kwargs)


__all__ = ["dumps", "strict"]
