"""Number formats as values: a grid of *elements* plus a rule for the scales (METHOD.md §6).

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
  ``m = min``: exact. Domain: ``max − min`` must be finite in the compute dtype.
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

Non-finite values are never made finite: a NaN or ±Inf in a group makes its scale (or
offset) non-finite, so every value of the group dequantizes non-finite. An all-zero group
(or block) has scale 0: codes 0, no variance. Arithmetic runs in :func:`compute_dtype`.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass

import torch

MIN_BITS = 2
MAX_BITS = 8
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class Rounding(enum.Enum):
    """How a real value is mapped to a grid level."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


class Granularity(enum.Enum):
    """Which elements share one scale (and offset): the whole tensor, or each row."""

    TENSOR = "tensor"
    ROW = "row"


class Grid(enum.Enum):
    """Integer grid: ``{−Q..Q}`` around 0, or ``2^b`` levels over ``[min, max]``."""

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


class ScaleRule(enum.Enum):
    """How a block scale is rounded onto its own grid (module docstring)."""

    UP = "up"  # smallest block scale that holds the block: nothing clips (unbiased)
    SPEC = "spec"  # the OCP MX / NVFP4 rule: may clip the largest elements (biased)


def check_bits(bits: int, field: str = "bits") -> int:
    """Validate a bit width: an int in ``MIN_BITS..MAX_BITS``."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{field} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{field} must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    return bits


def check_float_tensor(x: torch.Tensor, name: str = "input") -> None:
    """Raise a clear error for a non-tensor or a dtype the quantizers do not support."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {x.dtype}; supported dtypes: {allowed}")


def _coerce(value: object, enum_type: type[enum.Enum], field: str) -> enum.Enum:
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(repr(e.value) for e in enum_type)
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}") from None


# -- element types: a table, read by the kernels ----------------------------------------
@dataclass(frozen=True)
class Element:
    """A float element type: ``man_bits`` mantissa bits, smallest normal ``2^emin``,
    largest finite value ``max``, stored exactly in ``dtype``."""

    name: str
    man_bits: int
    emin: int
    max: float
    dtype: torch.dtype

    @property
    def bits(self) -> int:
        """Storage bits of one element: sign + exponent + mantissa."""
        return {"e4m3": 8, "e5m2": 8, "e2m1": 4}[self.name]

    @property
    def top_exp(self) -> int:
        """``⌊log2 max⌋``: the binade of the largest value."""
        return math.frexp(self.max)[1] - 1

    @property
    def max_spacing(self) -> float:
        """Grid spacing in the top binade, ``2^(top_exp − man_bits)``."""
        return 2.0 ** (self.top_exp - self.man_bits)

    def spacing_exp(self, a: torch.Tensor) -> torch.Tensor:
        """``k = max(⌊log2 a⌋, emin) − man_bits`` at magnitudes ``a ≥ 0`` (an int tensor):
        the grid spacing there is ``2^k``. Read from the exponent bits of float32/float64
        ``a`` (subnormal ``a`` falls under ``emin`` anyway), so a compiled kernel fuses it."""
        if a.dtype in _BITS:
            it, shift, mask, bias = _BITS[a.dtype]
            e = ((a.view(it) >> shift) & mask) - bias
        else:
            e = torch.frexp(a)[1] - 1  # a = f·2^(e+1), f ∈ [0.5, 1)
        return e.clamp_min(self.emin) - self.man_bits

    def spacing(self, a: torch.Tensor) -> torch.Tensor:
        """Grid spacing ``2^(max(⌊log2 a⌋, emin) − man_bits)`` at magnitudes ``a ≥ 0``
        (exact powers of two in ``a``'s dtype; some power of two at ``a = 0``)."""
        return pow2(self.spacing_exp(a), a.dtype)


# float dtype -> (int view, mantissa bits, exponent mask, exponent bias)
_BITS = {torch.float32: (torch.int32, 23, 0xFF, 127), torch.float64: (torch.int64, 52, 0x7FF, 1023)}


def pow2(k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2^k`` for integer ``k`` in the normal exponent range of ``dtype`` (exact)."""
    if dtype in _BITS:
        it, shift, _, bias = _BITS[dtype]
        return ((k.to(it) + bias) << shift).view(dtype)
    return torch.exp2(k.to(dtype))


ELEMENTS: dict[str, Element] = {
    "e4m3": Element("e4m3", 3, -6, 448.0, torch.float8_e4m3fn),
    "e5m2": Element("e5m2", 2, -14, 57344.0, torch.float8_e5m2),
    # E2M1 values {0, .5, 1, 1.5, 2, 3, 4, 6} are E4M3 values: stored as float8_e4m3fn.
    "e2m1": Element("e2m1", 1, 0, 6.0, torch.float8_e4m3fn),
}


class Format:
    """What every format gives the kernels: ``name``, ``emax`` (largest element),
    ``code_dtype``, ``block`` (columns per block scale; 0: none), ``asymmetric``,
    ``element`` (the float element, or None for integers), and :meth:`spacing`."""

    name: str
    block: int
    asymmetric: bool
    element: Element | None

    @property
    def emax(self) -> float:
        raise NotImplementedError

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.int8 if self.element is None else self.element.dtype

    @property
    def element_bits(self) -> int:
        """Bits per element (the codes' width; block and group scales come on top)."""
        return self.bits if self.element is None else self.element.bits  # type: ignore[attr-defined]

    def spacing(self, a: torch.Tensor) -> torch.Tensor | None:
        """Element grid spacing at magnitudes ``a`` (None: 1 everywhere, integers)."""
        return None if self.element is None else self.element.spacing(a)

    @property
    def spacing_factor(self) -> float:
        """Largest absolute grid spacing of a group (or block) over its absmax, for
        scales from the group's own range: a data-free variance bound per element is
        ``(factor · absmax)² / 4`` (up to the scale's one-ulp round-up)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=True)
class IntFormat(Format):
    """Integer grid of ``bits`` bits (module docstring): ``grid="symmetric"``, codes
    ``{−Q..Q}``, ``Q = 2^(b−1) − 1``, ``x̂ = c·absmax/Q``; ``grid="asymmetric"``,
    ``2^b`` levels over ``[min, max]``, ``x̂ = c·s + m`` with centred codes. Element
    spacing 1: SR variance ``p(1−p)·s²``, ``p`` the fractional part of ``y``."""

    bits: int
    grid: Grid = Grid.SYMMETRIC
    block = 0  # (class constants, not fields)
    element = None

    def __post_init__(self) -> None:
        check_bits(self.bits)
        object.__setattr__(self, "grid", _coerce(self.grid, Grid, "grid"))

    @property
    def asymmetric(self) -> bool:  # type: ignore[override]
        return self.grid is Grid.ASYMMETRIC

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"int{self.bits}{'a' if self.asymmetric else ''}"

    @property
    def qmax(self) -> int:
        """Largest level: ``Q`` (symmetric: ``2Q + 1`` levels) or ``2^b − 1``
        (asymmetric: levels ``0..2^b − 1`` before centring)."""
        return 2**self.bits - 1 if self.asymmetric else 2 ** (self.bits - 1) - 1

    @property
    def zero_code(self) -> int:
        """The shift of stored codes: ``2^(b−1)`` for asymmetric grids, 0 otherwise."""
        return 2 ** (self.bits - 1) if self.asymmetric else 0

    @property
    def emax(self) -> float:
        return float(self.qmax)

    @property
    def spacing_factor(self) -> float:
        return 2.0 / self.qmax if self.asymmetric else 1.0 / self.qmax

    def step(self, absmax: torch.Tensor) -> torch.Tensor:
        """Grid step of each group (:func:`grid_step`) in the compute dtype of
        ``absmax``: 0 for an all-zero group, non-finite where ``absmax`` is."""
        return grid_step(absmax.to(compute_dtype(absmax.dtype)), self.qmax)

    def scale_from_absmax(self, absmax: torch.Tensor) -> torch.Tensor:
        """:meth:`step` made safe to divide by: an all-zero group gets ``1/Q`` instead of 0
        (its values map to code 0 either way). Not a variance: use :meth:`step` for that."""
        step = self.step(absmax)
        return torch.where(step == 0, torch.full_like(step, 1 / self.qmax), step)


@dataclass(frozen=True)
class FloatFormat(Format):
    """OCP FP8 elements with one float scale per tensor or row, ``s = absmax/emax``:
    ``e4m3`` (max 448, 3 mantissa bits, subnormals to 2⁻⁹; forward operands) or ``e5m2``
    (max 57344, 2 mantissa bits, subnormals to 2⁻¹⁶; gradients). Resolution is relative:
    ``δ ≤ 2^−p·|y|`` for normal elements, so a value's SR variance grows with its
    magnitude, ``≤ δ(|y|)²/4`` element²."""

    element_name: str = "e4m3"
    block = 0
    asymmetric = False

    def __post_init__(self) -> None:
        if self.element_name not in ("e4m3", "e5m2"):
            raise ValueError(f"FloatFormat element must be 'e4m3' or 'e5m2', got {self.element_name!r}")

    @property
    def element(self) -> Element:  # type: ignore[override]
        return ELEMENTS[self.element_name]

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"fp8_{self.element_name}"

    @property
    def emax(self) -> float:
        return self.element.max

    @property
    def spacing_factor(self) -> float:
        return self.element.max_spacing / self.element.max


@dataclass(frozen=True)
class BlockFormat(Format):
    """Block-scaled float elements (module docstring): ``block`` consecutive elements
    along the summed dimension share a scale from the ``scale`` grid — ``"e8m0"`` (a power
    of two, OCP MX) or ``"e4m3"`` (an E4M3 value times one scale per group, NVFP4) — rounded
    per ``rule``. A real GEMM on such operands needs block-scaled hardware; lowbit
    emulates it exactly (dequantize, float GEMM)."""

    format_name: str
    element_name: str
    block: int
    scale: str
    rule: ScaleRule = ScaleRule.UP
    asymmetric = False

    def __post_init__(self) -> None:
        if self.element_name not in ELEMENTS:
            raise ValueError(f"block format element must be one of {', '.join(ELEMENTS)}, "
                             f"got {self.element_name!r}")
        if self.scale not in ("e8m0", "e4m3"):
            raise ValueError(f"block scale must be 'e8m0' or 'e4m3', got {self.scale!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block must be a positive int, got {self.block!r}")
        object.__setattr__(self, "rule", _coerce(self.rule, ScaleRule, "rule"))

    @property
    def element(self) -> Element:  # type: ignore[override]
        return ELEMENTS[self.element_name]

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.format_name if self.rule is ScaleRule.UP else f"{self.format_name}_spec"

    @property
    def emax(self) -> float:
        return self.element.max

    @property
    def spacing_factor(self) -> float:
        # Round-up at most doubles a block scale (a power of two; an E4M3 value, also in
        # its subnormal range, within the group's power-of-two scale).
        return 2 * self.element.max_spacing / self.element.max


BLOCK_FORMATS: dict[str, BlockFormat] = {
    "mxfp8_e4m3": BlockFormat("mxfp8_e4m3", "e4m3", 32, "e8m0"),
    "mxfp8_e5m2": BlockFormat("mxfp8_e5m2", "e5m2", 32, "e8m0"),
    "mxfp4": BlockFormat("mxfp4", "e2m1", 32, "e8m0"),
    "nvfp4": BlockFormat("nvfp4", "e2m1", 16, "e4m3"),
}
FORMAT_NAMES: tuple[str, ...] = (
    tuple(f"int{b}" for b in range(MIN_BITS, MAX_BITS + 1))
    + tuple(f"int{b}a" for b in range(MIN_BITS, MAX_BITS + 1))
    + ("fp8_e4m3", "fp8_e5m2") + tuple(BLOCK_FORMATS))
AnyFormat = IntFormat | FloatFormat | BlockFormat


def parse_format(spec: int | str | Format) -> AnyFormat:
    """A format from an int (bits of a symmetric integer grid, as before formats existed),
    a name of :data:`FORMAT_NAMES` (``int2``…``int8``, ``int2a``…``int8a``, ``fp8_e4m3``,
    ``fp8_e5m2``, ``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp4``, ``nvfp4``; a block name with
    ``_spec`` uses :attr:`ScaleRule.SPEC`) or a format object (returned as is). Raises
    ``ValueError`` naming the allowed names, ``TypeError`` for other types."""
    if isinstance(spec, Format):
        return spec  # type: ignore[return-value]
    if isinstance(spec, int) and not isinstance(spec, bool):
        return IntFormat(spec)
    if not isinstance(spec, str):
        raise TypeError(f"a format must be an int (bits), a name or a format object, got {spec!r}")
    m = re.fullmatch(r"int(\d+)(a?)", spec)
    if m and MIN_BITS <= int(m.group(1)) <= MAX_BITS:
        return IntFormat(int(m.group(1)), Grid.ASYMMETRIC if m.group(2) else Grid.SYMMETRIC)
    if spec in ("fp8_e4m3", "fp8_e5m2"):
        return FloatFormat(spec[4:])
    if spec in BLOCK_FORMATS:
        return BLOCK_FORMATS[spec]
    if spec.endswith("_spec") and spec[:-5] in BLOCK_FORMATS:
        b = BLOCK_FORMATS[spec[:-5]]
        return BlockFormat(b.format_name, b.element_name, b.block, b.scale, ScaleRule.SPEC)
    raise ValueError(f"unknown format {spec!r}; allowed: an int in {MIN_BITS}..{MAX_BITS} "
                     f"(bits of a symmetric integer grid) or one of {', '.join(FORMAT_NAMES)}")


# -- arithmetic shared by every kernel ----------------------------------------------------
def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where quantizer arithmetic runs for inputs of ``dtype``: float64 for float64 (a
    float32 step would underflow or overflow for values like 1e-300 or 1e300), float32
    otherwise (it holds every float32/bfloat16/float16 value and step exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def div_rn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a / b`` correctly rounded (IEEE round-to-nearest) in ``a``'s dtype, on every
    backend. Eager torch and compiled CPU kernels divide so; Triton's float32 ``/`` does
    not (``div.full.f32``, up to 2 ulps off: 29% of random quotients differed on an H200),
    so under ``torch.compile`` on CUDA a float32 quotient takes :func:`_div_rn_wide`."""
    if a.dtype == torch.float32 and a.device.type == "cuda" and torch.compiler.is_compiling():
        return _div_rn_wide(a, b)
    return a / b


def _div_rn_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float32 ``a / b`` as ``a · (1/b)`` in float64, rounded once to float32: equal to the
    correctly rounded quotient. The float64 value is within 2⁻⁵² (relative) of ``a/b``,
    while a quotient of two 24-bit numbers is either representable or at least 2⁻⁴⁹ from
    every float32 rounding boundary, so the final rounding lands where direct rounding
    would (tested on CPU). One float64 multiply per element; ``1/b`` is per group."""
    return (a.double() * (1.0 / b.double())).float()


def grid_step(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The smallest step ``s`` in ``absmax``'s dtype with ``div_rn(absmax, s) ≤ qmax``:
    every ``|x| ≤ absmax`` then maps to ``|x / s| ≤ qmax`` (correctly rounded division is
    monotone), and ``s`` is ``absmax / qmax`` rounded up where rounding to nearest would
    not do. A pure function of ``(absmax, qmax)``: the same bits on every device and
    backend. Valid from the smallest subnormal (a step below it would be 0: the step is
    then the smallest positive number) to the largest finite ``absmax``. ``qmax`` has
    fewer than 24 significant bits (every grid's largest element does).

    All-zero groups get 0; NaN and ±Inf stay non-finite. A step is used as it is, never
    rounded again: ``q·step`` with ``q`` the codes is what a quantizer estimates."""
    if absmax.dtype == torch.float32:
        # NaN passed on explicitly: compiled, ``view(int32)`` of a NaN gives -1 (all bits
        # set), which the ulp arithmetic below would turn into a step of 0 (NaN → finite)
        return torch.where(torch.isnan(absmax), absmax, _grid_step_f32(absmax, float(qmax)))
    step = absmax / qmax  # float64: correct from 3 ulps below (some backends use 1/qmax)
    zero, inf = torch.zeros_like(step), torch.full_like(step, torch.inf)
    for _ in range(3):
        step = torch.nextafter(step, zero)
    for _ in range(6):  # the smallest valid step is at most 5 ulps above
        step = torch.where(div_rn(absmax, step) > qmax, torch.nextafter(step, inf), step)
    return step


def _grid_step_f32(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """:func:`grid_step` for float32, with exact float64 products and integer ulp steps
    only (no division, no ``nextafter``: libdevice's flushes subnormals under Triton).
    ``RN(a/s) ≤ q ⇔ a ≤ s·q_hi`` with ``q_hi = q + ulp(q)/2`` (a tie rounds to ``q``,
    whose last mantissa bit is 0), and ``s·q_hi`` (24 × 25 bits) is exact in float64."""
    a = absmax.double()
    q_hi = qmax + 2.0 ** (math.frexp(qmax)[1] - 25)
    bits = (a * (1.0 / q_hi)).float().view(torch.int32)  # within an ulp of the answer
    best = (bits + 1).view(torch.float32)
    for k in (0, -1):  # the smallest valid of the three neighbours
        c = (bits + k).view(torch.float32)
        best = torch.where(c.double() * q_hi >= a, c, best)
    return best


def pow2_step(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """The smallest power of two ``t`` with ``absmax / t ≤ qmax`` (exact; 0 for 0,
    non-finite for non-finite ``absmax``): the up-rounded E8M0 scale of an MX block."""
    r = absmax / qmax
    f, e = torch.frexp(r)  # r = f·2^e, f ∈ [0.5, 1)
    t = torch.exp2(torch.where(f == 0.5, e - 1, e).to(r.dtype))
    tiny = torch.full_like(r, torch.finfo(r.dtype).smallest_normal * torch.finfo(r.dtype).eps)
    t = torch.where((r == 0) & (absmax > 0), tiny, t)  # r underflowed: the smallest subnormal
    t = torch.where(absmax > qmax * t, 2 * t, t)  # qmax·t is exact
    t = torch.where(absmax == 0, torch.zeros_like(t), t)
    return torch.where(torch.isfinite(absmax), t, absmax)


def round_up_on(r: torch.Tensor, element: Element) -> torch.Tensor:
    """The smallest value of ``element``'s grid ``≥ r`` (``r ≥ 0``, at most its max)."""
    sp = element.spacing(r)
    return torch.ceil(r / sp) * sp


def stochastic_round(y: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``floor(y) + [u < y − floor(y)]`` (as ``y``'s dtype) for noise ``u`` in [0, 1).

    ``y − floor(y)`` is exact for ``y ≥ 0`` and for ``|y| ≥ 1/2`` (and within 2⁻²⁵
    otherwise), and the comparison is exact, so with ``u`` uniform on the 2²⁴ values of
    :func:`counter_uniform` the mean is ``y`` to within 2⁻²⁴ — unlike ``floor(y + u)``,
    whose addition rounds (see the module docstring)."""
    low = torch.floor(y)
    return low + (u < y - low).to(y.dtype)


def round_elements(y: torch.Tensor, fmt: Format, u: torch.Tensor | None) -> torch.Tensor:
    """``y`` (elements, ``|y| ≤ emax``) rounded onto ``fmt``'s element grid: stochastic
    with noise ``u`` in [0, 1), nearest-even for ``u=None`` (module docstring). Exact:
    ``y/δ`` and ``ŷ = q·δ`` carry no rounding for a power-of-two spacing ``δ``."""
    if fmt.element is None:
        return torch.round(y) if u is None else stochastic_round(y, u)
    k = fmt.element.spacing_exp(y.abs())
    t = y * pow2(-k, y.dtype)  # y/δ, exact
    q = torch.round(t) if u is None else stochastic_round(t, u)
    return q * pow2(k, y.dtype)


def element_variance(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``(y − lo)(hi − y)`` per element (float64, element²): the variance of rounding
    ``y`` stochastically onto ``fmt``'s element grid (0 on grid points)."""
    sp = fmt.spacing(y.abs())
    t = y if sp is None else y * pow2(-fmt.element.spacing_exp(y.abs()), y.dtype)  # type: ignore[union-attr]
    frac = (t - torch.floor(t)).double()
    var = frac * (1 - frac)
    return var if sp is None else var * sp.double() ** 2


def element_spacing_sq(y: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``δ(|y|)²`` per element (float64): ``δ²/4`` bounds one element's SR variance."""
    sp = fmt.spacing(y.abs())
    return torch.ones_like(y, dtype=torch.float64) if sp is None else sp.double() ** 2


_MASK32 = 0xFFFFFFFF


def counter_uniform(shape: torch.Size | tuple[int, ...], seed: torch.Tensor) -> torch.Tensor:
    """``U[0,1)`` float32 noise as a pure function of (element index, ``seed``).

    A counter-based generator: element ``i`` (row-major index in ``shape``) gets
    ``h(i·K + seed mod 2³²)`` with ``h`` a two-round 32-bit integer mixer, keeping 24
    bits (the resolution of ``torch.rand`` in float32: the values ``k·2⁻²⁴``, so
    :func:`stochastic_round` is biased by less than 2⁻²⁴ of a grid step). Being
    a pure function of the index, the same noise comes out of the reference path, a
    compiled kernel or another device, whatever the memory layout. ``seed`` is a 0-d
    int64 tensor drawn from the layer's ``torch.Generator`` (:func:`draw_seed`).
    """
    n = 1
    for d in shape:
        n *= d
    x = torch.arange(n, device=seed.device, dtype=torch.int64).view(shape)
    x = (x * 0x27D4EB2D + seed) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (x >> 16) ^ x
    return (x >> 8).to(torch.float32) * (2.0**-24)


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A fresh 32-bit seed (0-d int64 tensor on ``device``) from ``generator``
    (``None``: torch's global RNG). One draw per quantization call."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**32, (), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device)


__all__ = ["BLOCK_FORMATS", "ELEMENTS", "FORMAT_NAMES", "MAX_BITS", "MIN_BITS", "SUPPORTED_DTYPES",
           "AnyFormat", "BlockFormat", "Element", "FloatFormat", "Format", "Granularity", "Grid", "IntFormat",
           "Rounding", "ScaleRule", "check_bits", "check_float_tensor", "compute_dtype",
           "counter_uniform", "draw_seed", "element_spacing_sq", "element_variance", "grid_step",
           "parse_format", "pow2", "pow2_step", "round_elements", "round_up_on", "stochastic_round"]
