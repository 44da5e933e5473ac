"""The formats themselves, as small frozen values: :class:`Format` (what every format
gives the kernels), :class:`IntFormat`, :class:`FloatFormat` and :class:`BlockFormat`.
The math of each: :mod:`lowbit.formats`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scalars import integer

from .base import Grid, ScaleRule, _coerce, check_bits, compute_dtype
from .elements import ELEMENTS, Element
from .scales import grid_step


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

    @property
    def clips(self) -> bool:
        """Whether a group's own largest values can fall outside its grid (and be clipped,
        a bias no rounding removes): only a block format under :attr:`ScaleRule.SPEC`."""
        return False

    def spacing(self, a: torch.Tensor) -> torch.Tensor | None:
        """Element grid spacing at magnitudes ``a`` (None: 1 everywhere, integers)."""
        return None if self.element is None else self.element.spacing(a)

    @property
    def spacing_factor(self) -> float:
        """Largest absolute grid spacing within a group (the tensor or row one scale is
        computed from) over the group's absmax, for scales from the group's own range: a
        data-free variance bound per element is ``(factor · absmax)² / 4`` (up to the
        scale's one-ulp round-up). For block formats it bounds a block's spacing against
        its group's absmax, not its own block's: an NVFP4 block whose E4M3 scale falls in
        E4M3's subnormal range has a far coarser spacing than ``factor`` times its own
        absmax (47.7× it for a block of 1e-8 beside a block of 1)."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, eq=True)
class IntFormat(Format):
    """Integer grid of ``bits`` bits (:mod:`lowbit.formats`): ``grid="symmetric"``, codes
    ``{−Q..Q}``, ``Q = 2^(b−1) − 1``, ``x̂ = c·absmax/Q``; ``grid="asymmetric"``,
    ``2^b`` levels over ``[min, max]``, ``x̂ = c·s + m`` with centred codes. Element
    spacing 1: SR variance ``p(1−p)·s²``, ``p`` the fractional part of ``y``."""

    bits: int
    grid: Grid = Grid.SYMMETRIC
    block = 0  # (class constants, not fields)
    element = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", check_bits(self.bits))  # (a NumPy integer: as an int)
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
    """Block-scaled float elements (:mod:`lowbit.formats`): ``block`` consecutive elements
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
        block = integer(self.block)
        if block is None or block < 1:
            raise ValueError(f"block must be a positive int, got {self.block!r}")
        object.__setattr__(self, "block", block)
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
    def clips(self) -> bool:  # type: ignore[override]
        return self.rule is ScaleRule.SPEC

    @property
    def spacing_factor(self) -> float:
        # Against the group's absmax (the docstring above): round-up at most doubles a
        # block scale that is a normal value (a power of two; an E4M3 value within the
        # group's power-of-two scale); a subnormal E4M3 block scale is at most E4M3's
        # smallest spacing times the group's scale, far below the group's largest spacing.
        return 2 * self.element.max_spacing / self.element.max
