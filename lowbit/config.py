"""Recipes: which operand of which GEMM is quantized, how, and on which number format.

One spec per operand of a layer's three GEMMs (docs/METHOD.md §1)::

    output       Y  = Q_f(X) · Q_f(W)ᵀ        weight, activation  (round-to-nearest)
    grad_input   ∇X = Q_a(∇Y) · Q_f(W)        grad_input          (unbiased, SR)
    grad_weight  ∇W = Q_w(∇Y)ᵀ · Q_f(X)       grad_weight         (unbiased, SR)

A spec set to ``None`` keeps that operand in floating point: ``fp`` has all four
``None``; QAT quantizes the forward only; FQT quantizes all four. Each spec's ``format``
is a :mod:`lowbit.formats` value (``bits=B`` is shorthand for ``format=IntFormat(B)``).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import warnings
from dataclasses import dataclass
from typing import TypeVar

from .formats import (
    MAX_BITS,
    MIN_BITS,
    AnyFormat,
    BlockFormat,
    FloatFormat,
    Grid,
    Format,
    IntFormat,
    Rounding,
    ScaleRule,
    check_bits,
    parse_format,
)
from .kernels import Backend
from .noise import check_seed
from .quantizers import QUANTIZERS, GradQuantizer, Granularity
from .ranges import Overflow, RangeMode, check_range_settings


def _coerce_enum(obj: object, field: str, enum_type: type[enum.Enum]) -> None:
    value = getattr(obj, field)
    if isinstance(value, enum_type):
        return
    try:
        object.__setattr__(obj, field, enum_type(value))
    except ValueError:
        allowed = ", ".join(repr(e.value) for e in enum_type)
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}") from None


_Spec = TypeVar("_Spec", "OperandSpec", "GradSpec")


def _resolve_format(spec: object) -> None:
    """Fold ``bits`` and ``format`` into one format (``format``) and its element width
    (``bits``). ``bits`` alone: a symmetric integer grid. Both: they must agree, for every
    format kind (``ValueError`` otherwise); to change an integer spec's width keeping its
    grid use :func:`with_bits`."""
    bits, fmt = spec.bits, spec.format
    if fmt is None:
        fmt = IntFormat(check_bits(8 if bits is None else bits, "bits"))
    else:
        try:
            fmt = parse_format(fmt)
        except (ValueError, TypeError) as exc:  # the field the user gave, named
            raise type(exc)(f"format={fmt!r}: {exc}") from None
        if bits is not None and check_bits(bits, "bits") != fmt.element_bits:
            raise ValueError(f"bits={bits!r} contradicts format={fmt.name!r} "
                             f"({fmt.element_bits}-bit elements); give one of them")
    object.__setattr__(spec, "format", fmt)
    object.__setattr__(spec, "bits", fmt.element_bits)


@dataclass(frozen=True)
class OperandSpec:
    """Forward quantizer of a weight or an activation: ``format`` (default ``int8``, or
    ``bits=B`` for ``intB``), one scale per tensor or per row (per output channel for
    weights, per sample or token for activations; block formats add their block scales
    along the input features — an MX format has only those: ``granularity='row'`` raises
    ``ValueError`` there), round-to-nearest by default; STE in the backward."""

    bits: int | None = None
    granularity: Granularity = Granularity.TENSOR
    rounding: Rounding = Rounding.NEAREST
    format: AnyFormat | str | int | None = None

    def __post_init__(self) -> None:
        _resolve_format(self)
        _coerce_enum(self, "granularity", Granularity)
        _coerce_enum(self, "rounding", Rounding)
        _no_row_scale(self)


def _spec_hint(value: object, kind: type) -> str:
    """What a spec field given a name or a width may have meant: a recipe name is a whole
    config (``FQTConfig.from_recipe``), a format name or width the spec's ``format``
    (a new user's trial: ``weight="int4"`` was pointed at ``from_recipe('int4')``, which
    raised "unknown recipe")."""
    if isinstance(value, str) and value in RECIPES:
        return f"; {value!r} is a recipe name: use FQTConfig.from_recipe({value!r}) for the whole config"
    return f"; for that format: {kind.__name__}(format={value!r})" if _a_format(value) else ""


def _a_format(value: object) -> bool:
    """Whether ``value`` is a format's name or width (:func:`parse_format` takes it)."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        return False
    try:
        parse_format(value)
    except (ValueError, TypeError):
        return False
    return True


def _no_row_scale(spec: OperandSpec) -> None:
    """``granularity='row'`` on an MX format is refused: an MX format's only scales are
    its blocks' (the group scale is 1), so the setting would be dropped without a word (a
    new user's trial: ``OperandSpec(format="mxfp4", granularity="row")`` ran per tensor
    and showed ``~row``)."""
    fmt = spec.format
    if (spec.granularity is Granularity.ROW and isinstance(fmt, BlockFormat)
            and fmt.scale == "e8m0"):
        raise ValueError(f"granularity='row' has no effect on format={fmt.name!r}: an MX format "
                         f"has no per-row or per-tensor scale (each {fmt.block}-element block's "
                         "power-of-two scale is its only one); leave granularity at 'tensor'")


def _coerce_quantizer(spec: GradSpec) -> None:
    """``quantizer`` as its registered name: a name, or one of the objects in
    ``lowbit.QUANTIZERS`` (which ``quantize_grad`` and ``get_quantizer`` take; a new user's
    trial: ``GradSpec(quantizer=QUANTIZERS["psq"])`` was refused); anything else is a
    ``ValueError`` naming the field (an unhashable value raised a bare ``TypeError``)."""
    value = spec.quantizer
    for name, obj in QUANTIZERS.items():
        if value is obj:
            object.__setattr__(spec, "quantizer", name)
            return
    if not isinstance(value, str) or value not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {value!r}"
                         + (" (register your own first: lowbit.quantizers.register_quantizer)"
                            if isinstance(value, (str, GradQuantizer)) else ""))


_RANGE_DEFAULTS = {"margin": 1.25, "history": 16, "overflow": Overflow.REQUANTIZE}  # GradSpec's


@dataclass(frozen=True)
class GradSpec:
    """Gradient quantizer of one backward GEMM: ``quantizer`` in ``ptq``, ``psq``,
    ``bhq``, ``hadamard`` onto ``format`` (default ``int8``; ``bits=B`` for ``intB``);
    stochastic rounding (unbiased) by default — except on a ``*_spec`` block format, whose
    scale rule clips (biased: accepted to study the specification's numerics, with a
    ``UserWarning``).

    ``range``: ``dynamic`` (the operand's own absmax) or ``predicted`` (known before the
    GEMM that produces the gradient: ``margin`` × the largest absmax of the layer's last
    ``history`` calls; values beyond it handled per ``overflow``, see ``lowbit.ranges``);
    a predicted range needs a symmetric integer or FP8 format (``ValueError`` otherwise).
    """

    bits: int | None = None
    quantizer: str = "psq"
    rounding: Rounding = Rounding.STOCHASTIC
    range: RangeMode = RangeMode.DYNAMIC
    margin: float = 1.25  # measured: docs/results.md, "Gradient ranges known before the GEMM"
    history: int = 16
    overflow: Overflow = Overflow.REQUANTIZE
    format: AnyFormat | str | int | None = None

    def __post_init__(self) -> None:
        _resolve_format(self)
        _coerce_quantizer(self)
        _coerce_enum(self, "rounding", Rounding)
        _coerce_enum(self, "range", RangeMode)
        _coerce_enum(self, "overflow", Overflow)
        if getattr(self.format, "clips", False):
            warnings.warn(f"GradSpec: {self.format.name} clips a block's largest values (the "  # type: ignore[union-attr]
                          f"specification's scale rule), so its gradients are biased; "
                          f"{self.format.name.removesuffix('_spec')} rounds the block scale up "  # type: ignore[union-attr]
                          f"instead and is unbiased (the variance monitor skips such a layer)",
                          UserWarning, stacklevel=3)
        margin, history = check_range_settings(self.margin, self.history)  # as a float and an int
        object.__setattr__(self, "margin", margin)
        object.__setattr__(self, "history", history)
        if self.range is RangeMode.DYNAMIC:  # the predicted-range settings would be ignored
            given = [f"{k}={getattr(v, 'value', v)!r}" for k, default in _RANGE_DEFAULTS.items()
                     if (v := getattr(self, k)) != default]
            if given:
                raise ValueError(f"{', '.join(given)}: predicted-range settings, but this spec's "
                                 "range is dynamic (give range='predicted')")
        fmt = self.format
        if self.range is RangeMode.PREDICTED and (fmt.block or fmt.asymmetric):  # type: ignore[union-attr]
            raise ValueError(f"range='predicted' needs a symmetric integer or fp8 format (one "
                             f"scale per row or tensor, fixed ahead); format={fmt.name!r} has "  # type: ignore[union-attr]
                             f"{'block scales' if fmt.block else 'an asymmetric grid'}")  # type: ignore[union-attr]

    @property
    def predicted(self) -> bool:
        return self.range is RangeMode.PREDICTED

    def as_dynamic(self) -> GradSpec:
        """This spec with a dynamic range (the predicted-range settings back at their
        defaults); itself where it is dynamic already. What a block that keeps no range
        history (attention) runs a predicted spec as."""
        if not self.predicted:
            return self
        return dataclasses.replace(self, range=RangeMode.DYNAMIC, **_RANGE_DEFAULTS)


PREDICTED_SUFFIX = "-predicted"
def with_bits(spec: _Spec, bits: int) -> _Spec:
    """``spec`` with its integer format's width set to ``bits`` (grid, symmetric or
    asymmetric, kept). ``ValueError`` when ``bits`` is out of range, or differs from a
    non-integer format's element width (a float or block format has no other width)."""
    fmt = spec.format
    if not isinstance(fmt, IntFormat):
        if bits == fmt.element_bits:  # type: ignore[union-attr]
            return spec
        raise ValueError(f"bits={bits!r} contradicts format={fmt.name!r} "  # type: ignore[union-attr]
                         f"({fmt.element_bits}-bit elements): only integer formats change width")  # type: ignore[union-attr]
    return dataclasses.replace(spec, bits=None, format=IntFormat(check_bits(bits, "bits"), fmt.grid))


# Float recipe families: (forward format, gradient format). Forward round-to-nearest on the
# E4M3 element (block formats: their own element, as MX/NVFP4 training does); gradients
# stochastically rounded onto E5M2 (or the block format), the named quantizer on ∇X.
FLOAT_FAMILIES: dict[str, tuple[str, str]] = {
    "fp8": ("fp8_e4m3", "fp8_e5m2"),
    "mxfp8": ("mxfp8_e4m3", "mxfp8_e5m2"),
    "mxfp4": ("mxfp4", "mxfp4"),
    "nvfp4": ("nvfp4", "nvfp4"),
}
# Biased baselines with the numerics of torchao's float8 recipes of these names: all three
# GEMMs on FP8 operands, gradients rounded to nearest. tensorwise: E4M3 operands, E5M2
# gradient, one scale per tensor; rowwise: E4M3 everywhere, one scale per row (per column
# of ∇Y on the ∇W path). rowwise's W and X row scales lie on the summed dimension of the
# backward GEMMs, which therefore run simulated (README, "Execution").
BASELINES = ("fp8-tensorwise", "fp8-rowwise")


def _recipe_names() -> list[str]:
    bits = range(4, MAX_BITS + 1)
    fqt = [f"fqt-{q}-{b}" for q in QUANTIZERS for b in bits]
    return (["fp"] + [f"qat-{b}" for b in bits] + fqt + [n + PREDICTED_SUFFIX for n in fqt]
            + [n + "a" for n in fqt] + [f"fqt-{q}-{f}" for q in QUANTIZERS for f in FLOAT_FAMILIES]
            + list(BASELINES))


# Adaptive recipes: candidate quantizers of the (∇X, ∇W) paths, cheapest first. The config
# starts at 8 bits with the first of each; lowbit.adaptive.AdaptivePolicy.from_recipe then
# lets the variance monitor choose each layer's widths (fqt-auto: and its ∇X quantizer).
ADAPTIVE_RECIPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fqt-auto": (("psq", "bhq"), ("psq",)),
    "fqt-auto-psq": (("psq",), ("psq",)),
    "fqt-auto-bhq": (("bhq",), ("psq",)),
}

RECIPES: tuple[str, ...] = tuple(_recipe_names()) + tuple(ADAPTIVE_RECIPES)


def recipe_families() -> str:
    """The recipe families of :data:`RECIPES`, as one line for help texts and errors."""
    q = ",".join(QUANTIZERS)
    return (f"fp, qat-B, fqt-{{{q}}}-B[a] and fqt-{{{q}}}-B-predicted with B in 4..{MAX_BITS}, "
            f"fqt-{{{q}}}-{{{','.join(FLOAT_FAMILIES)}}}, {', '.join(BASELINES)}, "
            f"{', '.join(ADAPTIVE_RECIPES)}")


def backend_names() -> str:
    """The :class:`Backend` values, as ``auto, reference, int8 or fp8``."""
    names = [b.value for b in Backend]
    return ", ".join(names[:-1]) + " or " + names[-1]

_BACKEND_FORMATS = {Backend.INT8: (IntFormat, "integer (intB, intBa)"),
                    Backend.FP8: (FloatFormat, "fp8 (fp8_e4m3, fp8_e5m2)")}


def _recipe(name: str) -> dict[str, object]:
    """The four specs of a recipe name in :data:`RECIPES` (not adaptive ones)."""
    none = {"weight": None, "activation": None, "grad_input": None, "grad_weight": None}
    if name == "fp":
        return none
    if name in BASELINES:
        row = name == "fp8-rowwise"
        gran = Granularity.ROW if row else Granularity.TENSOR
        fwd = OperandSpec(format="fp8_e4m3", granularity=gran)
        grad = "fp8_e4m3" if row else "fp8_e5m2"
        q = "psq" if row else "ptq"
        return {"weight": fwd, "activation": fwd,
                "grad_input": GradSpec(quantizer=q, format=grad, rounding=Rounding.NEAREST),
                "grad_weight": GradSpec(quantizer=q, format=grad, rounding=Rounding.NEAREST)}
    m = re.fullmatch(r"qat-(\d+)|fqt-([a-z]+)-(\w+?)(a?)(-predicted)?", name)
    assert m is not None, name
    if m.group(1):
        b = int(m.group(1))
        return {**none, "weight": OperandSpec(b), "activation": OperandSpec(b)}
    q, kind, asym = m.group(2), m.group(3), bool(m.group(4))
    qw = "ptq" if q == "ptq" else "psq"  # per-column ∇W path (per-tensor for ptq)
    if kind in FLOAT_FAMILIES:
        fwd, grad = FLOAT_FAMILIES[kind]
        return {"weight": OperandSpec(format=fwd), "activation": OperandSpec(format=fwd),
                "grad_input": GradSpec(quantizer=q, format=grad),
                "grad_weight": GradSpec(quantizer=qw, format=grad)}
    rng = RangeMode.PREDICTED if m.group(5) else RangeMode.DYNAMIC
    b = int(kind)
    return {"weight": OperandSpec(), "activation": OperandSpec(),
            "grad_input": GradSpec(quantizer=q, range=rng, format=f"int{b}{'a' if asym else ''}"),
            "grad_weight": GradSpec(quantizer=qw, range=rng, format=f"int8{'a' if asym else ''}")}


@dataclass(frozen=True)
class FQTConfig:
    """Full recipe of a converted model. ``seed`` seeds the stochastic-rounding
    generators of the converted layers (``None``: drawn from torch's global RNG at
    conversion, so ``torch.manual_seed`` makes runs reproducible). ``adaptive``: the
    ``fqt-auto*`` recipe (:data:`ADAPTIVE_RECIPES`) this config is the 8-bit start of, or
    ``None``; its widths change only under a ``VarianceMonitor`` with that recipe's
    ``AdaptivePolicy`` — a layer whose backward runs without one warns once."""

    weight: OperandSpec | None = OperandSpec()
    activation: OperandSpec | None = OperandSpec()
    grad_input: GradSpec | None = GradSpec()
    grad_weight: GradSpec | None = GradSpec()
    backend: Backend = Backend.AUTO
    seed: int | None = None
    adaptive: str | None = None

    def __post_init__(self) -> None:
        for name, kind in (("weight", OperandSpec), ("activation", OperandSpec),
                           ("grad_input", GradSpec), ("grad_weight", GradSpec)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                article = "an" if kind.__name__[0] in "AEIOU" else "a"
                raise TypeError(f"{name} must be {article} {kind.__name__} or None, got {value!r}"
                                f"{_spec_hint(value, kind)}")
        if (self.weight is None) != (self.activation is None):
            raise ValueError("weight and activation must both be quantized or both be None")
        if self.weight is None and (self.grad_input or self.grad_weight):
            raise ValueError("gradient quantization (FQT) needs a quantized forward "
                             "(weight and activation specs); got weight=None")
        _coerce_enum(self, "backend", Backend)
        if self.backend in _BACKEND_FORMATS:
            kind, allowed = _BACKEND_FORMATS[self.backend]
            for name in ("weight", "activation", "grad_input", "grad_weight"):
                spec = getattr(self, name)
                if spec is not None and not isinstance(spec.format, kind):
                    raise ValueError(f"backend={self.backend.value!r} runs {allowed} GEMMs only; "
                                     f"{name}.format is {spec.format.name!r} (use backend='auto')")
        if self.seed is not None:
            object.__setattr__(self, "seed", check_seed(self.seed))
        if self.adaptive is not None and (not isinstance(self.adaptive, str)
                                          or self.adaptive not in ADAPTIVE_RECIPES):
            raise ValueError(f"adaptive must be one of {', '.join(ADAPTIVE_RECIPES)} or None, "
                             f"got {self.adaptive!r}")
        if self.adaptive is not None and (self.grad_input is None or self.grad_weight is None):
            raise ValueError(f"adaptive={self.adaptive!r} chooses the widths of quantized gradients; "
                             "this config's gradient paths are float (a review: fp/qat recipes took it)")

    @property
    def is_fp(self) -> bool:
        return self.weight is None

    @property
    def is_fqt(self) -> bool:
        return self.grad_input is not None or self.grad_weight is not None

    @classmethod
    def from_recipe(cls, name: str, **overrides: object) -> FQTConfig:
        """A named recipe (:data:`RECIPES`; the README has the table):

        * ``fp``; ``qat-B`` (forward ``intB`` only);
        * ``fqt-Q-B`` with ``Q`` in ptq, psq, bhq, hadamard and ``B`` in 4..8: forward int8
          per-tensor; ∇X path ``intB`` with ``Q``; ∇W path int8, per-tensor for ptq,
          per-column (psq) otherwise; ``fqt-Q-Ba``: the same on asymmetric grids (``intBa``,
          ``int8a``); ``fqt-Q-B-predicted``: predicted gradient ranges on both paths;
        * ``fqt-Q-F`` with ``F`` in fp8, mxfp8, mxfp4, nvfp4 (:data:`FLOAT_FAMILIES`):
          forward round-to-nearest E4M3 (block formats: their own element), gradients
          stochastically rounded onto E5M2 (or the block format), ``Q`` on ∇X and per-column
          (psq; ptq for ptq) on ∇W;
        * ``fp8-tensorwise``, ``fp8-rowwise``: torchao's biased FP8 baselines (all GEMMs on
          FP8 operands, gradients rounded to nearest; rowwise's backward GEMMs simulated);
        * ``fqt-auto[-psq|-bhq]``: the 8-bit start of an adaptive recipe (``adaptive=name``);
          its bit widths are chosen only under
          ``VarianceMonitor(model, every, policy=AdaptivePolicy.from_recipe(name))``, and a
          layer that trains without one warns once (it runs the fixed 8-bit start).

        Keyword ``overrides`` replace fields (e.g. ``backend="reference"``, ``seed=0``).
        Raises ``ValueError`` naming the families for an unknown name."""
        if not isinstance(name, str):
            raise TypeError(f"recipe name must be a str, got {name!r}")
        if name in ADAPTIVE_RECIPES:  # the starting point; the policy is lowbit.adaptive's
            gi, gw = ADAPTIVE_RECIPES[name]
            cfg = cls(grad_input=GradSpec(MAX_BITS, gi[0]), grad_weight=GradSpec(MAX_BITS, gw[0]),
                      adaptive=name)
        elif name in RECIPES:
            cfg = cls(**_recipe(name))  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown recipe {name!r}; allowed: {recipe_families()}")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in overrides if k not in fields]
        if unknown:
            raise TypeError(f"from_recipe: {unknown[0]!r} is not an FQTConfig field; fields: "
                            f"{', '.join(fields)} (gradient widths: config.with_grad_bits(...) "
                            "or a recipe name such as 'fqt-psq-4')")
        return dataclasses.replace(cfg, **overrides) if overrides else cfg

    def with_grad_bits(self, grad_input: int | None = None, grad_weight: int | None = None) -> FQTConfig:
        """Same recipe with other gradient bit widths (``None`` keeps a path as is); the
        grid (symmetric or asymmetric) is kept. Integer gradient formats only."""
        asked = grad_input is not None or grad_weight is not None  # 0 too: it is a request (refused)
        if not self.is_fqt and asked:
            raise ValueError("gradient bits can only be set on an fqt-* recipe")
        if self.adaptive is not None and asked:
            raise ValueError(f"gradient bits conflict with the adaptive recipe {self.adaptive!r}: "
                             "its widths are chosen per layer by the variance monitor")
        gi, gw = self.grad_input, self.grad_weight
        for path, spec, bits in (("grad_input", gi, grad_input), ("grad_weight", gw, grad_weight)):
            if bits is not None and spec is None:  # dropped without a word before (a review)
                raise ValueError(f"{path} is float in this config: it has no bits to set")
            if bits is not None and spec is not None and not isinstance(spec.format, IntFormat):
                raise ValueError(f"{path} bits apply to integer formats; this recipe's {path} "
                                 f"format is {spec.format.name!r}")
        if grad_input is not None and gi is not None:
            gi = with_bits(gi, grad_input)
        if grad_weight is not None and gw is not None:
            gw = with_bits(gw, grad_weight)
        return dataclasses.replace(self, grad_input=gi, grad_weight=gw)

    def with_ranges(self, **fields: object) -> FQTConfig:
        """Same recipe with other predicted-range settings (``margin``, ``history``,
        ``overflow``) on every gradient spec whose range is predicted. ``TypeError`` for
        another field (``quantizer=`` or ``range=`` changed the recipe itself without a
        word: a review)."""
        other = sorted(set(fields) - set(_RANGE_DEFAULTS))
        if other:
            raise TypeError(f"with_ranges sets {', '.join(sorted(_RANGE_DEFAULTS))}, not {', '.join(other)}")
        if not any(g is not None and g.predicted for g in (self.grad_input, self.grad_weight)):
            raise ValueError("range settings apply to predicted ranges: use an "
                             "fqt-*-predicted recipe or GradSpec(range='predicted')")
        def upd(g: GradSpec | None) -> GradSpec | None:
            return dataclasses.replace(g, **fields) if g is not None and g.predicted else g
        return dataclasses.replace(self, grad_input=upd(self.grad_input),
                                   grad_weight=upd(self.grad_weight))

    def to_dict(self) -> dict:
        """JSON-friendly form (enums as their values; a format by its name, or a block
        format that no name describes — another block size, say — by its fields)."""
        def conv(x: object) -> object:
            if isinstance(x, enum.Enum):
                return x.value
            if isinstance(x, Format):
                return x.name if _named(x) else {
                    f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}  # type: ignore[arg-type]
            if isinstance(x, (OperandSpec, GradSpec)):
                return {f.name: conv(getattr(x, f.name)) for f in dataclasses.fields(x)}
            return x
        return {f.name: conv(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> FQTConfig:
        """Inverse of :meth:`to_dict`; dicts saved before formats existed (``bits`` only)
        load as integer formats, and before ``adaptive`` existed without it. ``TypeError``
        for a key that is not a field (a misspelt ``grad_inputs`` would otherwise leave
        that path in float) or a missing operand/gradient spec (``None`` where float:
        :meth:`to_dict` always writes all four)."""
        if not isinstance(d, dict):
            raise TypeError(f"FQTConfig.from_dict takes a dict, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        missing = [k for k in ("weight", "activation", "grad_input", "grad_weight") if k not in d]
        if unknown or missing:
            raise TypeError("FQTConfig.from_dict: " + "; ".join(
                ([f"unknown keys {unknown} (fields: {sorted(fields)})"] if unknown else [])
                + ([f"missing keys {missing} (a float path is saved as null)"] if missing else [])))
        def spec(key: str, kind: type, v: dict | None) -> object:
            if v is not None and not isinstance(v, dict):  # ("int8" gave AttributeError: a review)
                raise TypeError(f"FQTConfig.from_dict: {key} must be a dict of {kind.__name__} fields "
                                f"or None, got {type(v).__name__} {v!r}")
            allowed = {f.name for f in dataclasses.fields(kind)}
            if v is not None and (extra := sorted(set(v) - allowed)):
                raise TypeError(f"FQTConfig.from_dict: {key} has unknown keys {extra} ({kind.__name__} "
                                f"fields: {sorted(allowed)})")
            if v is not None and kind is GradSpec and v.get("range", "dynamic") == "dynamic":
                # saved before dynamic specs refused them (and when the default margin was
                # 2.0): predicted-range settings a dynamic range never read
                v = {**v, **{k: getattr(d, "value", d) for k, d in _RANGE_DEFAULTS.items()}}
            if v is not None and isinstance(v.get("format"), dict):  # a block format's fields
                f = v["format"]
                v = {**v, "format": BlockFormat(f["format_name"], f["element_name"], f["block"],
                                                f["scale"], ScaleRule(f["rule"]))}
            return None if v is None else kind(**v)
        return cls(weight=spec("weight", OperandSpec, d.get("weight")),
                   activation=spec("activation", OperandSpec, d.get("activation")),
                   grad_input=spec("grad_input", GradSpec, d.get("grad_input")),
                   grad_weight=spec("grad_weight", GradSpec, d.get("grad_weight")),
                   backend=d.get("backend", "auto"), seed=d.get("seed"), adaptive=d.get("adaptive"))




def config_hint(value: object) -> str:
    """What a name given where a config belongs may have meant: a recipe name gets the
    call that makes its config, a format name (or width) the specs that take it, another
    string where the recipe names are listed (a new user's trial: every string was called
    "a recipe name", ``"int4"`` too, and the call offered raised "unknown recipe")."""
    if isinstance(value, str) and value in RECIPES:
        return f" (a recipe name: lowbit.FQTConfig.from_recipe({value!r}))"
    if _a_format(value):
        return (f" (a format: a config's specs take it, e.g. FQTConfig(grad_input=GradSpec("
                f"format={value!r})) or OperandSpec(format={value!r}))")
    return " (not a recipe name: lowbit.RECIPES lists them)" if isinstance(value, str) else ""


def not_a_config(value: object) -> TypeError:
    """The ``TypeError`` for a ``config`` that is not an :class:`FQTConfig`, with
    :func:`config_hint`."""
    return TypeError(f"config must be an FQTConfig, got {type(value).__name__}{config_hint(value)}")

__all__ = ["ADAPTIVE_RECIPES", "BASELINES", "FLOAT_FAMILIES", "MIN_BITS", "RECIPES", "Backend", "backend_names", "recipe_families", "FQTConfig", "GradSpec", "OperandSpec", "Overflow",
           "RangeMode"]


def _named(fmt: Format) -> bool:
    """Whether ``parse_format(fmt.name)`` gives ``fmt`` back (every integer and FP8
    format, and the block formats of :data:`lowbit.formats.BLOCK_FORMATS`)."""
    try:
        return parse_format(fmt.name) == fmt
    except ValueError:
        return False


def _format_text(fmt: Format) -> str:
    """A format's name in :func:`describe`; a block format that is not the one its name
    gives (another block size, scale or element) adds them — ``mxfp4[e2m1/16/e8m0]``:
    two configs differing there printed alike (a review)."""
    if isinstance(fmt, BlockFormat) and not _named(fmt):
        return f"{fmt.name}[{fmt.element_name}/{fmt.block}/{fmt.scale}]"
    return fmt.name


def _forward_text(spec: OperandSpec | None) -> str:
    """A forward operand's part of :func:`describe`: the bits of a symmetric integer grid,
    else the format's name; ``~sr`` for stochastic rounding, ``~row`` for per-row scales;
    ``fp`` where the operand stays float."""
    if spec is None:
        return "fp"
    f = spec.format
    text = str(spec.bits) if isinstance(f, IntFormat) and f.grid is Grid.SYMMETRIC else _format_text(f)
    text += "~sr" if spec.rounding is Rounding.STOCHASTIC else ""
    return text + ("~row" if spec.granularity is Granularity.ROW else "")


def _range_text(spec: GradSpec) -> str:
    """A gradient path's predicted-range part of :func:`describe`: ``~pred``, then each
    setting that differs from :class:`GradSpec`'s default: ``-clip`` (overflow clipped:
    biased), ``-m{margin}``, ``-h{history}``; ``""`` for a dynamic range."""
    if not spec.predicted:
        return ""
    text = "~pred"
    if spec.overflow is not _RANGE_DEFAULTS["overflow"]:
        text += f"-{spec.overflow.value}"
    if spec.margin != _RANGE_DEFAULTS["margin"]:
        m = f"{spec.margin:g}"
        text += f"-m{m if float(m) == spec.margin else repr(float(spec.margin))}"
    if spec.history != _RANGE_DEFAULTS["history"]:
        text += f"-h{spec.history}"
    return text


def describe(config: FQTConfig) -> str:
    """Short human-readable form of a config, e.g. ``fwd8/gi:bhq4/gw:psq8`` (symmetric
    integer grids by their bits); other formats by name, e.g.
    ``fwd:fp8_e4m3/gi:psq·fp8_e5m2/gw:psq·fp8_e5m2``; forward operands with different
    specs each by their own, ``fwd:w8·a4`` (``~sr`` stochastic rounding, ``~row`` per-row
    scales, ``fp`` a float operand); ``~rtn`` marks a gradient path rounded to nearest
    (biased), ``~pred`` predicted ranges, followed by every range setting that differs
    from the default (which changes the results): ``-clip`` for ``overflow="clip"``
    (biased), ``-m2`` for ``margin=2``, ``-h4`` for ``history=4``, e.g.
    ``gi:psq8~pred-clip-m2``. An adaptive config (``fqt-auto*``, whose gradient widths a
    monitor's policy changes as it trains) ends in ``/auto:`` and its recipe, e.g.
    ``fwd8/gi:psq8/gw:psq8/auto:fqt-auto`` (the widths it has now): without it the recipe's
    8-bit start read as ``fqt-psq-8``. ``TypeError`` for anything
    but an :class:`FQTConfig` (a model's layers carry theirs: ``lowbit.fqt_layers``)."""
    if not isinstance(config, FQTConfig):
        raise TypeError(f"describe takes an FQTConfig, got {type(config).__name__} (a converted "
                        "model's configs: {name: layer.config for name, layer in "
                        "lowbit.fqt_layers(model).items()})")
    if config.is_fp:
        return "fp"
    w, a = _forward_text(config.weight), _forward_text(config.activation)
    if w == a:  # one spec for both operands: fwd8, fwd:fp8_e4m3
        parts = [f"fwd{w}" if w.isdigit() else f"fwd:{w}"]
    else:  # they differ (a review found fwd8 printed for 4-bit or FP8 activations)
        parts = [f"fwd:w{w}·a{a}"]
    for name, spec in (("gi", config.grad_input), ("gw", config.grad_weight)):
        if spec is None:
            parts.append(f"{name}:fp")
            continue
        f = spec.format
        plain = isinstance(f, IntFormat) and f.grid is Grid.SYMMETRIC
        text = f"{spec.quantizer}{spec.bits}" if plain else f"{spec.quantizer}·{_format_text(f)}"
        text += _range_text(spec)
        text += "~rtn" if spec.rounding is Rounding.NEAREST else ""
        parts.append(f"{name}:{text}")
    if config.adaptive is not None:
        parts.append(f"auto:{config.adaptive}")
    return "/".join(parts)
