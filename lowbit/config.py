"""Recipes: which operand of which GEMM is quantized, how, and with how many bits.

One spec per operand of a layer's three GEMMs (METHOD.md §1)::

    output       Y  = Q_f(X) · Q_f(W)ᵀ        weight, activation  (round-to-nearest)
    grad_input   ∇X = Q_a(∇Y) · Q_f(W)        grad_input          (unbiased, SR)
    grad_weight  ∇W = Q_w(∇Y)ᵀ · Q_f(X)       grad_weight         (unbiased, SR)

A spec set to ``None`` keeps that operand in floating point: ``fp`` has all four
``None``; QAT quantizes the forward only; FQT quantizes all four.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from dataclasses import dataclass

from .formats import MAX_BITS, MIN_BITS, Rounding, check_bits
from .kernels import Backend
from .quantizers import QUANTIZERS, Granularity
from .ranges import Overflow, RangeMode


def _coerce_enum(obj: object, field: str, enum_type: type[enum.Enum]) -> None:
    value = getattr(obj, field)
    if isinstance(value, enum_type):
        return
    try:
        object.__setattr__(obj, field, enum_type(value))
    except ValueError:
        allowed = ", ".join(repr(e.value) for e in enum_type)
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}") from None


@dataclass(frozen=True)
class OperandSpec:
    """Forward quantizer of a weight or an activation: ``bits``-bit symmetric grid,
    one scale per tensor or per row (per output channel for weights, per sample or
    token for activations), round-to-nearest by default; STE in the backward."""

    bits: int = 8
    granularity: Granularity = Granularity.TENSOR
    rounding: Rounding = Rounding.NEAREST

    def __post_init__(self) -> None:
        check_bits(self.bits, "bits")
        _coerce_enum(self, "granularity", Granularity)
        _coerce_enum(self, "rounding", Rounding)


@dataclass(frozen=True)
class GradSpec:
    """Gradient quantizer of one backward GEMM: ``quantizer`` in ``ptq``, ``psq``,
    ``bhq``, ``hadamard``; stochastic rounding (unbiased) by default.

    ``range``: ``dynamic`` (the operand's own absmax) or ``predicted`` (known before the
    GEMM that produces the gradient: ``margin`` × the largest absmax of the layer's last
    ``history`` calls; values beyond it handled per ``overflow``, see ``lowbit.ranges``).
    """

    bits: int = 8
    quantizer: str = "psq"
    rounding: Rounding = Rounding.STOCHASTIC
    range: RangeMode = RangeMode.DYNAMIC
    margin: float = 1.25  # measured: docs/results.md, "Predicted gradient ranges"
    history: int = 16
    overflow: Overflow = Overflow.REQUANTIZE

    def __post_init__(self) -> None:
        check_bits(self.bits, "bits")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(
                f"quantizer must be one of {', '.join(QUANTIZERS)}, got {self.quantizer!r}"
            )
        _coerce_enum(self, "rounding", Rounding)
        _coerce_enum(self, "range", RangeMode)
        _coerce_enum(self, "overflow", Overflow)
        m = self.margin
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not 1 <= m < float("inf"):
            raise ValueError(f"margin must be a finite number ≥ 1, got {m!r}")
        h = self.history
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"history must be a positive integer, got {h!r}")

    @property
    def predicted(self) -> bool:
        return self.range is RangeMode.PREDICTED


PREDICTED_SUFFIX = "-predicted"


def _recipe_names() -> list[str]:
    bits = range(4, MAX_BITS + 1)
    fqt = [f"fqt-{q}-{b}" for q in QUANTIZERS for b in bits]
    return ["fp"] + [f"qat-{b}" for b in bits] + fqt + [n + PREDICTED_SUFFIX for n in fqt]


# Adaptive recipes: candidate quantizers of the (∇X, ∇W) paths, cheapest first. The config
# starts at 8 bits with the first of each; lowbit.adaptive.AdaptivePolicy.from_recipe then
# lets the variance monitor choose each layer's widths (fqt-auto: and its ∇X quantizer).
ADAPTIVE_RECIPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fqt-auto": (("psq", "bhq"), ("psq",)),
    "fqt-auto-psq": (("psq",), ("psq",)),
    "fqt-auto-bhq": (("bhq",), ("psq",)),
}

RECIPES: tuple[str, ...] = tuple(_recipe_names()) + tuple(ADAPTIVE_RECIPES)


@dataclass(frozen=True)
class FQTConfig:
    """Full recipe of a converted model. ``seed`` seeds the stochastic-rounding
    generators of the converted layers (``None``: drawn from torch's global RNG at
    conversion, so ``torch.manual_seed`` makes runs reproducible)."""

    weight: OperandSpec | None = OperandSpec()
    activation: OperandSpec | None = OperandSpec()
    grad_input: GradSpec | None = GradSpec()
    grad_weight: GradSpec | None = GradSpec()
    backend: Backend = Backend.AUTO
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, kind in (("weight", OperandSpec), ("activation", OperandSpec),
                           ("grad_input", GradSpec), ("grad_weight", GradSpec)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__} or None, got {value!r}")
        if (self.weight is None) != (self.activation is None):
            raise ValueError("weight and activation must both be quantized or both be None")
        if self.weight is None and (self.grad_input or self.grad_weight):
            raise ValueError("gradient quantization (FQT) needs a quantized forward "
                             "(weight and activation specs); got weight=None")
        _coerce_enum(self, "backend", Backend)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")

    @property
    def is_fp(self) -> bool:
        return self.weight is None

    @property
    def is_fqt(self) -> bool:
        return self.grad_input is not None or self.grad_weight is not None

    @classmethod
    def from_recipe(cls, name: str, **overrides: object) -> FQTConfig:
        """A named recipe: ``fp``; ``qat-B``; ``fqt-Q-B`` with ``Q`` in ptq, psq, bhq,
        hadamard and ``B`` in 4..8 (forward 8-bit per-tensor; ∇X path ``B`` bits with
        ``Q``; ∇W path 8 bits, per-tensor for ptq, per-column (psq) otherwise);
        ``fqt-Q-B-predicted``: the same with predicted gradient ranges on both paths;
        ``fqt-auto[-psq|-bhq]``: the 8-bit start of an adaptive recipe (its bit widths are
        then chosen by ``lowbit.adaptive.AdaptivePolicy.from_recipe(name)``).
        Keyword ``overrides`` replace fields (e.g. ``backend="reference"``, ``seed=0``)."""
        if not isinstance(name, str):
            raise TypeError(f"recipe name must be a str, got {name!r}")
        if name in ADAPTIVE_RECIPES:  # the starting point; the policy is lowbit.adaptive's
            gi, gw = ADAPTIVE_RECIPES[name]
            cfg = cls(grad_input=GradSpec(MAX_BITS, gi[0]), grad_weight=GradSpec(MAX_BITS, gw[0]))
            return dataclasses.replace(cfg, **overrides) if overrides else cfg
        m = re.fullmatch(r"fp|qat-(\d+)|fqt-([a-z]+)-(\d+)(-predicted)?", name)
        if m is None or name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; allowed: fp, qat-B, "
                             f"fqt-{{{','.join(QUANTIZERS)}}}-B[-predicted] with B in 4..{MAX_BITS}, "
                             f"{', '.join(ADAPTIVE_RECIPES)}")
        if name == "fp":
            cfg = cls(weight=None, activation=None, grad_input=None, grad_weight=None)
        elif m.group(1):
            b = int(m.group(1))
            cfg = cls(weight=OperandSpec(b), activation=OperandSpec(b),
                      grad_input=None, grad_weight=None)
        else:
            q, b = m.group(2), int(m.group(3))
            rng = RangeMode.PREDICTED if m.group(4) else RangeMode.DYNAMIC
            cfg = cls(grad_input=GradSpec(b, q, range=rng),
                      grad_weight=GradSpec(8, "ptq" if q == "ptq" else "psq", range=rng))
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def with_grad_bits(self, grad_input: int | None = None, grad_weight: int | None = None) -> FQTConfig:
        """Same recipe with other gradient bit widths (``None`` keeps a path as is)."""
        if not self.is_fqt and (grad_input or grad_weight):
            raise ValueError("gradient bits can only be set on an fqt-* recipe")
        gi, gw = self.grad_input, self.grad_weight
        if grad_input is not None and gi is not None:
            gi = dataclasses.replace(gi, bits=grad_input)
        if grad_weight is not None and gw is not None:
            gw = dataclasses.replace(gw, bits=grad_weight)
        return dataclasses.replace(self, grad_input=gi, grad_weight=gw)

    def with_ranges(self, **fields: object) -> FQTConfig:
        """Same recipe with other predicted-range settings (``margin``, ``history``,
        ``overflow``) on every gradient spec whose range is predicted."""
        if not any(g is not None and g.predicted for g in (self.grad_input, self.grad_weight)):
            raise ValueError("range settings apply to predicted ranges: use an "
                             "fqt-*-predicted recipe or GradSpec(range='predicted')")
        def upd(g: GradSpec | None) -> GradSpec | None:
            return dataclasses.replace(g, **fields) if g is not None and g.predicted else g
        return dataclasses.replace(self, grad_input=upd(self.grad_input),
                                   grad_weight=upd(self.grad_weight))

    def to_dict(self) -> dict:
        """JSON-friendly form (enums as their values)."""
        def conv(x: object) -> object:
            if isinstance(x, enum.Enum):
                return x.value
            if isinstance(x, dict):
                return {k: conv(v) for k, v in x.items()}
            return x
        return conv(dataclasses.asdict(self))  # type: ignore[return-value]

    @classmethod
    def from_dict(cls, d: dict) -> FQTConfig:
        def spec(kind: type, v: dict | None) -> object:
            return None if v is None else kind(**v)
        return cls(weight=spec(OperandSpec, d.get("weight")),
                   activation=spec(OperandSpec, d.get("activation")),
                   grad_input=spec(GradSpec, d.get("grad_input")),
                   grad_weight=spec(GradSpec, d.get("grad_weight")),
                   backend=d.get("backend", "auto"), seed=d.get("seed"))


__all__ = ["ADAPTIVE_RECIPES", "MIN_BITS", "RECIPES", "Backend", "FQTConfig", "GradSpec", "OperandSpec", "Overflow",
           "RangeMode"]
