"""Gradient quantizers: each is transform → stochastic rounding → inverse (see ``base``)."""

from __future__ import annotations

import torch

from ..formats import AnyFormat, Rounding, parse_format
from ..noise import check_generator
from .base import (
    GradQuantizer,
    Granularity,
    Identity,
    QuantizedOperand,
    RowTransform,
    absmax,
    check_operand,
)
from .bhq import BHQ
from .hadamard import Hadamard
from .psq import PSQ
from .ptq import PTQ

QUANTIZERS: dict[str, GradQuantizer] = {q.name: q for q in (PTQ(), PSQ(), BHQ(), Hadamard())}


_BUILT_IN = frozenset(QUANTIZERS)


def get_quantizer(name: str | GradQuantizer) -> GradQuantizer:
    """Look a quantizer up by name (``ptq``, ``psq``, ``bhq``, ``hadamard``, or one added
    with :func:`register_quantizer`)."""
    if isinstance(name, GradQuantizer):
        return name
    try:
        return QUANTIZERS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown quantizer {name!r}; allowed: {', '.join(QUANTIZERS)} (add your own with "
            "lowbit.quantizers.register_quantizer)"
        ) from None


def register_quantizer(quantizer: GradQuantizer, *, replace: bool = False) -> GradQuantizer:
    """Add ``quantizer`` (an instance of a :class:`GradQuantizer` subclass) to
    :data:`QUANTIZERS` under its ``name``, so that ``GradSpec(quantizer=name)``, recipes'
    specs, ``quantize_grad`` and the variance tools take it; returns it.

    The subclass gives ``name`` (a non-empty str), ``granularity`` (a :class:`Granularity`
    or its name, ``"tensor"`` / ``"row"``) and ``transform(a, generator, kernels)``
    returning a :class:`RowTransform` (:class:`Identity` for none); ``mixes_rows = True``
    if the transform mixes rows (then per-row ranges do not persist across steps). lowbit
    runs its own ``quantize`` (transform, rounding, ``T⁻¹`` on the GEMM's output); a
    subclass that overrides ``quantize`` should override ``rounding_variance`` too, or the
    variance monitor skips it (:func:`~lowbit.quantizers.base.variance_formula_gap`).
    Fused kernels stand in only for the library's own PTQ and PSQ; a user's quantizer
    runs its own code (``lowbit.gradpair``).

    ``TypeError`` for an object that is not a ``GradQuantizer`` (a class instead of an
    instance, say), ``ValueError`` for a missing or empty name or granularity, or a name
    already registered (a built-in name always; another with ``replace=False``)."""
    if isinstance(quantizer, type) or not isinstance(quantizer, GradQuantizer):
        what = f"the class {quantizer.__name__} (pass an instance: {quantizer.__name__}())" \
            if isinstance(quantizer, type) else type(quantizer).__name__
        raise TypeError(f"register_quantizer: expected a GradQuantizer instance, got {what}")
    name = getattr(quantizer, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_quantizer: {type(quantizer).__name__} has no name (set the class "
                         f"attribute name = '...'), got {name!r}")
    if not isinstance(getattr(quantizer, "granularity", None), Granularity):
        raise ValueError(f"register_quantizer: {type(quantizer).__name__} has no granularity (set the class "
                         "attribute granularity = Granularity.ROW or Granularity.TENSOR)")
    if name in _BUILT_IN or (name in QUANTIZERS and not replace and QUANTIZERS[name] is not quantizer):
        raise ValueError(f"register_quantizer: the name {name!r} is taken ({'lowbit' if name in _BUILT_IN else 'registered'}"
                         f"{'' if name in _BUILT_IN else '; pass replace=True to replace it'})")
    QUANTIZERS[name] = quantizer
    return quantizer


def quantize_grad(
    g: torch.Tensor,
    quantizer: str | GradQuantizer,
    fmt: int | str | AnyFormat,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Quantize a 2-D gradient (rows = samples or tokens; columns = the dimension the
    consuming GEMM sums over, along which block formats place their blocks) with an
    unbiased quantizer onto ``fmt`` — an int (bits of a symmetric integer grid), a format
    name (``"int4"``, ``"int4a"``, ``"fp8_e5m2"``, ``"mxfp4"``, ``"nvfp4"``, …:
    :data:`lowbit.formats.FORMAT_NAMES`) or a format object — and return the dequantized
    (simulated) result, same shape and dtype as ``g``.

    ``E[quantize_grad(g, ...)] = g`` over the rounding noise, over the whole finite range
    of ``g``'s dtype (subnormals included), up to ``g``'s dtype's own final rounding (see
    :mod:`lowbit.formats`) and, for Hadamard and BHQ, up to the rounding of their row
    mixing and its inverse, which run in ``g``'s compute dtype (float32; float64 for
    float64 ``g``): per element about float32's unit roundoff (2⁻²⁴) times the largest
    magnitude in its block or group — far below the rounding noise (about 10⁶× on
    ordinary gradients; :meth:`GradQuantizer.expected_variance` leaves it out), but large
    relative to a row 10⁶× smaller than its block's largest (a review measured 15% on such
    rows; pass float64 ``g`` where they matter). NaN/Inf propagate. That final rounding includes overflow: a
    value the grid places past the dtype's largest finite value ``M`` — a block format's
    top grid value or a transform's sums can pass it for ``|g|`` within a factor 4 of ``M``
    — becomes ±Inf there. Every ``g`` with ``|g| ≤ M/4`` gives a finite result under PTQ
    and PSQ; Hadamard (block ``b``, :data:`~lowbit.quantizers.hadamard.DEFAULT_BLOCK` = 64
    or the next power of two ≥ the rows) and BHQ (groups of up to all ``N`` rows) add the
    rounding noise of ``b`` (``N``) rows in their inverse, so a draw can reach about
    ``b·max|g|`` (twice that on a block format), and their bound is ``|g| ≤ M/(4b)``
    (BHQ: ``M/(4N)``) — tested for every quantizer and format, 2 to 8 bits, in float32,
    bfloat16, float16 and float64. Raises ``ValueError`` for an unknown
    quantizer or format name, ``TypeError``/``ValueError`` for a non-2-D or non-float ``g``,
    ``RuntimeError`` for a sparse or nested ``g``,
    ``TypeError`` for a ``generator`` that is neither a ``torch.Generator`` nor ``None``,
    ``ValueError`` for a ``g`` that requires grad (the quantizer is not differentiable),
    ``ValueError`` for a format that clips (``*_spec``: biased by the specification's
    scale rule; :meth:`GradQuantizer.quantize` takes it).
    """
    check_generator(generator, "quantize_grad")
    check_operand(g, "quantize_grad", "gradient", "g")
    q = get_quantizer(quantizer)
    fmt = parse_format(fmt)
    if fmt.clips:
        raise ValueError(f"quantize_grad is unbiased, and {fmt.name} is not: the specification's "
                         f"scale rule clips a block's largest values (use "
                         f"{fmt.name.removesuffix('_spec')}, or get_quantizer({q.name!r}).quantize "
                         f"to study the clipping)")
    if g.numel() == 0:
        return g.clone()
    return q.quantize(g, fmt, generator, Rounding.STOCHASTIC).dequantize(g.dtype)


__all__ = [
    "BHQ",
    "PSQ",
    "PTQ",
    "QUANTIZERS",
    "GradQuantizer",
    "Granularity",
    "Hadamard",
    "Identity",
    "QuantizedOperand",
    "RowTransform",
    "absmax",
    "check_operand",
    "get_quantizer",
    "quantize_grad",
    "register_quantizer",
]
