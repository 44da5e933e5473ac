"""What every format shares: the rounding, granularity, grid and scale-rule enums, the
supported bit widths and input dtypes with their validation, and :func:`compute_dtype`
(where quantizer arithmetic runs). The format math: :mod:`lowbit.formats`."""

from __future__ import annotations

import enum

import torch

from ..scalars import integer

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


def _as(enum_type: type[enum.Enum], value: object, what: str) -> enum.Enum:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(repr(e.value) for e in enum_type)
        raise ValueError(f"{what} must be a lowbit.{enum_type.__name__} or one of {allowed}, "
                         f"got {value!r}") from None


def as_rounding(value: object) -> Rounding:
    """``value`` as a :class:`Rounding` (the member itself, or its name ``"nearest"`` /
    ``"stochastic"``); ``ValueError`` naming the allowed values otherwise — a misspelt
    name must not quietly round to nearest where stochastic rounding was meant."""
    return _as(Rounding, value, "rounding")  # type: ignore[return-value]


def as_granularity(value: object) -> Granularity:
    """``value`` as a :class:`Granularity` (the member, or ``"tensor"`` / ``"row"``);
    ``ValueError`` naming the allowed values otherwise."""
    return _as(Granularity, value, "granularity")  # type: ignore[return-value]


class Grid(enum.Enum):
    """Integer grid: ``{−Q..Q}`` around 0, or ``2^b`` levels over ``[min, max]``."""

    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


class ScaleRule(enum.Enum):
    """How a block scale is rounded onto its own grid (:mod:`lowbit.formats`)."""

    UP = "up"  # smallest block scale that holds the block: nothing clips (unbiased)
    SPEC = "spec"  # the OCP MX / NVFP4 rule: may clip the largest elements (biased)


def check_bits(bits: int, field: str = "bits") -> int:
    """A bit width as an int in ``MIN_BITS..MAX_BITS`` (NumPy integers and one-element
    integer tensors read as ints: :mod:`lowbit.scalars`); ``TypeError`` for a non-integer
    (bools included), ``ValueError`` out of range."""
    b = integer(bits)
    if b is None:
        raise TypeError(f"{field} must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    if not MIN_BITS <= b <= MAX_BITS:
        raise ValueError(f"{field} must be in {MIN_BITS}..{MAX_BITS}, got {b}")
    return b


def check_float_tensor(x: torch.Tensor, name: str = "input") -> None:
    """Raise a clear error for a non-tensor or a dtype the quantizers do not support."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {x.dtype}; supported dtypes: {allowed}")


def check_one_device(op: str, what: str, *tensors: torch.Tensor | None) -> None:
    """``RuntimeError`` naming ``op``, ``what`` (the operands' names) and their devices where
    the given tensors (``None`` skipped) are not on one device: a weight left on ``meta``
    reached the op's fake kernel and gave uninitialised memory (a review)."""
    devices = [t.device for t in tensors if t is not None]
    if any(d != devices[0] for d in devices):
        raise RuntimeError(f"{op}: expected {what} on one device, got {', '.join(str(d) for d in devices)}"
                           + (" (a weight still on 'meta' was never loaded: load_state_dict(..., assign=True) "
                              "or to_empty() first)" if any(d.type == "meta" for d in devices) else ""))


def check_dense(op: str, what: str, t: object) -> None:
    """``RuntimeError`` naming ``op``, ``what`` and the layout where ``t`` is a nested or
    sparse tensor: lowbit's quantizers and low-bit GEMMs take dense (strided) tensors
    (checked before a padding or reshape would fail inside torch, with torch's "Internal
    error")."""
    if isinstance(t, torch.Tensor) and (t.is_nested or t.layout != torch.strided):
        kind, hint = ("a nested tensor", "pad it: nested.to_padded_tensor(0), masking the padding; an "
                      "nn.TransformerEncoder in eval() with a src_key_padding_mask makes one (its "
                      "nested-tensor path): convert the encoder or the model holding it, which turns "
                      "that path off, or set its use_nested_tensor = False") \
            if t.is_nested else (f"a {t.layout} tensor", "t.to_dense()")
        raise RuntimeError(f"{op}: {what} is {kind}; lowbit's quantizers and low-bit GEMMs take dense (strided) "
                           f"tensors ({hint})")


def _coerce(value: object, enum_type: type[enum.Enum], field: str) -> enum.Enum:
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(repr(e.value) for e in enum_type)
        raise ValueError(f"{field} must be one of {allowed}, got {value!r}") from None



def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where quantizer arithmetic runs for inputs of ``dtype``: float64 for float64 (a
    float32 step would underflow or overflow for values like 1e-300 or 1e300), float32
    otherwise (it holds every float32/bfloat16/float16 value and step exactly)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
