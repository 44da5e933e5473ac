"""Format names: the named block formats, :data:`FORMAT_NAMES` and :func:`parse_format`
(an int of bits, a name or a format object to a format value)."""

from __future__ import annotations

import re

from .base import MAX_BITS, MIN_BITS, Grid, ScaleRule
from ..scalars import integer
from .values import BlockFormat, FloatFormat, Format, IntFormat

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
    if integer(spec) is not None:  # (a NumPy integer too: lowbit.scalars)
        return IntFormat(integer(spec))
    if not isinstance(spec, str):
        raise TypeError(f"a format must be an int (bits), a name or a format object, got {spec!r}")
    m = re.fullmatch(r"int([1-9]\d*)(a?)", spec)  # no leading zeros: "int08" is not a name
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
                     f"(bits of a symmetric integer grid) or one of {', '.join(FORMAT_NAMES)}, "
                     f"{', '.join(n + '_spec' for n in BLOCK_FORMATS)}")
