"""Settings given as numbers: what users pass for a float or an int setting — Python
numbers, NumPy scalars (``np.float32(1.5)``, ``np.int64(16)``), one-element tensors —
read as a Python ``float`` or ``int``, bools refused. Each setting's own checks (range,
sign) come after; a setting stored in a config is stored as the Python number, so it
prints, compares and serializes as one (a trial: NumPy scalars were refused with the
message for a value out of range)."""

from __future__ import annotations

import numbers
import operator

import torch


def _is_bool(v: object) -> bool:
    return isinstance(v, bool) or type(v).__name__ == "bool_" or (
        isinstance(v, torch.Tensor) and v.dtype == torch.bool)


def real(v: object) -> float | None:
    """``v`` as a float where it is a real number (an int or float, a NumPy real scalar,
    a one-element real tensor), else ``None`` (bools, complex numbers, strings, tensors
    of more elements)."""
    if _is_bool(v):
        return None
    if isinstance(v, torch.Tensor):
        return float(v) if v.numel() == 1 and not v.is_complex() else None
    return float(v) if isinstance(v, numbers.Real) else None


def integer(v: object) -> int | None:
    """``v`` as an int where it is an integer (an int, a NumPy integer, a one-element
    integer tensor), else ``None`` (bools, floats — ``2.0`` included —, strings)."""
    if _is_bool(v) or (isinstance(v, torch.Tensor) and (v.numel() != 1 or v.is_floating_point()
                                                          or v.is_complex())):
        return None
    try:
        return operator.index(v.reshape(()) if isinstance(v, torch.Tensor) else v)  # type: ignore[arg-type]
    except TypeError:
        return None


__all__ = ["integer", "real"]
