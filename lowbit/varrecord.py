"""What the variance monitor records (:mod:`lowbit.monitor`): one :class:`LayerVariance`
per layer and monitored step, gathered in a :class:`StepRecord`; plain values, so a
record round-trips through JSON (NaN for figures a step did not produce)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class LayerVariance:
    """One layer on one monitored step. Variances in squared gradient units (float;
    NaN where a path is not quantized or not computed); ``bits_*``/``quantizer_*``: the
    path's spec on that step (0 / "" when in float)."""

    samples: int = 0
    calls: int = 0
    grad_rows: int = 0  # elements of ∇Y (both paths quantize it once each)
    sgd_w_samples: float = math.nan  # per-sample-norm estimates (formula (1) of varstats)
    sgd_x_samples: float = math.nan
    sgd_w: float = math.nan  # the estimate the ratios use (per-sample or paired)
    quant_w: float = math.nan
    ratio_w: float = math.nan
    quant_x: float = math.nan
    sgd_x: float = math.nan
    quant_x_shift: float = math.nan
    ratio_x: float = math.nan
    bits_w: int = 0
    quantizer_w: str = ""
    bits_x: int = 0
    quantizer_x: str = ""
    candidates_w: dict[str, float] = field(default_factory=dict)  # "psq6" -> predicted ratio
    candidates_x: dict[str, float] = field(default_factory=dict)


@dataclass
class StepRecord:
    """What one monitored step measured: ``layers`` by fully qualified name."""

    step: int
    layers: dict[str, LayerVariance]

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "layers": {n: asdict(v) for n, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepRecord:
        return cls(int(d["step"]), {n: LayerVariance(**v) for n, v in d["layers"].items()})


def ratio(a: float, b: float) -> float:
    """``a / b`` for variances: NaN if either is NaN, 0 for 0/0, inf for a/0."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if b > 0:
        return a / b
    return 0.0 if a == 0 else math.inf


__all__ = ["LayerVariance", "StepRecord", "ratio"]
