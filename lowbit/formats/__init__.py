"""Number formats as values: a grid of *elements* plus a rule for the scales (docs/METHOD.md §6).

A format maps a 2-D operand ``x`` (rows × columns; the columns are the dimension the
consuming GEMM sums over) to codes ``c`` and back:

    x̂ = c · s · b + m

``s`` one scale per scaling group (the tensor or a row), ``b`` one block scale per
``block`` consecutive columns (block formats only, else 1), ``m`` one offset per group
(asymmetric integer grids only, else 0). Elements ``y = (x − m)/(s·b)`` are rounded to
the element grid, whose spacing around ``|y|`` is ``δ(|y|)``: 1 for integers;
``2^(max(e, e_min) − p)`` inside the binade ``[2^e, 2^(e+1))`` for a float element with
``p`` mantissa bits. With ``lo = ⌊y/δ⌋·δ`` and ``hi = lo + δ`` (both on the grid):

    nearest     ŷ = round(y/δ)·δ                     (ties to even: IEEE for floats)
    stochastic  ŷ = lo + δ·[u < y/δ − ⌊y/δ⌋],  u ~ U[0, 1)     E[ŷ] = y

``y/δ`` is exact (δ is a power of two) and the comparison is exact, so with ``u`` on the
2⁻²⁴ lattice of :func:`counter_uniform` the mean is ``y`` within 2⁻²⁴ of a step
(:func:`stochastic_round`; ``floor(y + u)`` would round first). One element's SR variance
is ``(y − lo)(hi − y)`` element², times ``(s·b)²``; summed, the exact variance of the
quantizer given ``x`` (:func:`element_variance`). Every scale rule keeps ``|y| ≤ emax``
(the largest element), so stochastic rounding never clips and stays unbiased:

* :class:`IntFormat` ``(bits, "symmetric")``: ``c ∈ {−Q..Q}``, ``Q = 2^(b−1) − 1``,
  ``s = absmax/Q`` (:func:`grid_step`: rounded up one ulp where needed), 0 exact.
* :class:`IntFormat` ``(bits, "asymmetric")`` (the original paper's code): ``2^b`` levels
  over ``[min, max]`` of the group, ``s = (max − min)/(2^b − 1)``; codes are stored
  centred, ``c = q − 2^(b−1) ∈ [−2^(b−1), 2^(b−1) − 1]`` (8-bit codes ``0..255`` as
  ``q − 128`` in int8), with ``m = min + 2^(b−1)·s``. A constant group has ``s = 0`` and
  ``m = min``: exact. Domain: a group whose ``(max − min)·2^(b−1)/(2^b − 1)`` passes the
  compute dtype's largest value (values beyond ±0.75·max at 2 bits, ±0.996·max at 8)
  overflows its offset ``m`` or its lowest level ``−2^(b−1)·s``, and dequantizes
  non-finite (a range ``max − min`` up to that bound, even past the dtype's max, is
  handled: the step comes from halved values).
* :class:`FloatFormat` ``e4m3`` / ``e5m2`` (OCP FP8: max 448 / 57344, 3 / 2 mantissa bits,
  subnormals down to 2⁻⁹ / 2⁻¹⁶): ``s = absmax/emax`` per tensor or row.
* :class:`BlockFormat`: ``mxfp8_e4m3``, ``mxfp8_e5m2`` (block 32, a power-of-two block
  scale, OCP MX), ``mxfp4`` (E2M1 elements 0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6; block 32),
  ``nvfp4`` (E2M1, block 16, an E4M3 block scale times a per-group scale). With
  :attr:`ScaleRule.UP` (lowbit's default) each block scale is the smallest value on its own
  grid with ``bamax/(s·b) ≤ emax``: nothing clips. :attr:`ScaleRule.SPEC` follows the
  specifications (MX: the shared exponent ``⌊log2 bamax⌋ − ⌊log2 emax⌋``, rounded down;
  NVFP4: ``s = gamax/2688``, ``b`` = the nearest E4M3 value of ``bamax/(6s)``), which can
  push the largest elements past ``emax``: they are clipped to ``±emax`` (biased).
  lowbit's NVFP4 group scale is a power of two, so ``s·b`` is exact.
  Range limits of the emulation (found by a review, 2026-12-04): an MX block scale is a
  power of two over the compute dtype's whole exponent range, not clamped to E8M0's
  ``[2⁻¹²⁷, 2¹²⁷]`` — a block of float32 subnormals gets a scale down to ≈ 2⁻¹⁴⁹ and a
  float64 block above ≈ ``emax·2¹²⁷`` one above 2¹²⁷, which MX hardware cannot encode
  (lowbit stays unbiased there; hardware would flush or saturate). An NVFP4 group scale
  is at least 2⁹ times the dtype's smallest subnormal (E4M3 block scales are multiples of
  2⁻⁹), so ``s·b`` stays exact for groups of subnormals too (a smaller one made ``s·b``
  round or underflow: elements past 6 or a block quantized to 0, biased; a review,
  2026-12-05).

Non-finite values are never made finite: a NaN or ±Inf in a group makes its scale (or
offset) non-finite, so every value of the group dequantizes non-finite (for MX formats,
whose group scale is 1, every value of the block: its block scale). An all-zero group
(or block) has scale 0: codes 0, no variance. Arithmetic runs in :func:`compute_dtype`.

The package, one concept per module: :mod:`~lowbit.formats.base` (enums, bit widths,
dtypes, :func:`compute_dtype`), :mod:`~lowbit.formats.elements` (the float element table),
:mod:`~lowbit.formats.scales` (steps and block scales), :mod:`~lowbit.formats.values` (the
format classes), :mod:`~lowbit.formats.names` (:func:`parse_format`) and
:mod:`~lowbit.formats.rounding` (SR, nearest, exact variance). The counter-based noise
(:func:`counter_uniform`, :func:`draw_seed`) lives with every other noise stream in
:mod:`lowbit.noise` and is re-exported here.
"""

from __future__ import annotations

from ..noise import counter_uniform, draw_seed
from .base import (
    MAX_BITS,
    MIN_BITS,
    SUPPORTED_DTYPES,
    Granularity,
    Grid,
    Rounding,
    ScaleRule,
    as_granularity,
    as_rounding,
    check_bits,
    check_dense,
    check_one_device,
    check_float_tensor,
    compute_dtype,
)
from .elements import ELEMENTS, Element, pow2
from .names import BLOCK_FORMATS, FORMAT_NAMES, AnyFormat, parse_format
from .rounding import element_spacing_sq, element_variance, round_elements, stochastic_round
from .scales import div_rn, grid_step, pow2_step, round_up_on
from .values import BlockFormat, FloatFormat, Format, IntFormat

__all__ = ["BLOCK_FORMATS", "ELEMENTS", "FORMAT_NAMES", "MAX_BITS", "MIN_BITS", "SUPPORTED_DTYPES",
           "AnyFormat", "BlockFormat", "Element", "FloatFormat", "Format", "Granularity", "Grid", "IntFormat",
           "Rounding", "ScaleRule", "as_granularity", "as_rounding", "check_bits", "check_dense", "check_float_tensor", "check_one_device", "compute_dtype",
           "counter_uniform", "div_rn", "draw_seed", "element_spacing_sq", "element_variance", "grid_step",
           "parse_format", "pow2", "pow2_step", "round_elements", "round_up_on", "stochastic_round"]
