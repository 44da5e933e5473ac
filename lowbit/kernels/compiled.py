"""Fused kernels: the reference functions run through ``torch.compile`` (Inductor).

Eager torch makes one pass over memory per op (and the counter-based noise alone takes
a dozen); compiled, the quantizer becomes one reduction plus one fused pass, the
epilogue one pass. Same code, same arithmetic: the codes equal the reference's (tested).

Compilation needs a C++ compiler (CPU) or Triton (GPU). If it is unavailable the first
failure is reported once as a warning and the reference kernels are used from then on.
Set ``LOWBIT_COMPILE=0`` to never compile. Small tensors are not worth a compiled call.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import reference

MIN_NUMEL = 1 << 15  # below this, eager kernels are as fast as a compiled call
_enabled = os.environ.get("LOWBIT_COMPILE", "1") != "0" and hasattr(torch, "compile")
_compiled: dict[str, Callable[..., Any]] = {}


def _compile_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException

        errs += [BackendCompilerFailed, TorchDynamoException]
    except ImportError:  # pragma: no cover - very old torch
        pass
    try:
        from torch._inductor.exc import InductorError  # type: ignore[attr-defined]

        errs.append(InductorError)
    except ImportError:  # pragma: no cover - torch without InductorError
        pass
    return tuple(errs)


def enabled() -> bool:
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn compiled kernels on or off (process-wide switch, e.g. for tests)."""
    global _enabled
    _enabled = bool(flag)


def use_for(x: torch.Tensor) -> bool:
    return _enabled and x.numel() >= MIN_NUMEL and x.device.type in ("cpu", "cuda")


# Each kernel is specialised on its flags (bits, per-row, rounding), dtype and layout:
# a model meets a dozen variants, more than dynamo's default of 8 recompiles per function,
# after which it would silently run eager. Raise the limits (never lower them).
_LIMITS = {"recompile_limit": 64, "cache_size_limit": 64, "accumulated_recompile_limit": 1024,
           "accumulated_cache_size_limit": 1024}


def _raise_recompile_limits() -> None:
    import torch._dynamo.config as cfg

    for key, value in _LIMITS.items():
        if hasattr(cfg, key) and getattr(cfg, key) < value:
            setattr(cfg, key, value)


def run(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` through ``torch.compile`` (one compiled wrapper per ``name``); on a
    compiler failure, warn once and run ``fn`` eagerly from then on."""
    global _enabled
    f = _compiled.get(name)
    if f is None:
        _raise_recompile_limits()
        f = _compiled[name] = torch.compile(fn, dynamic=True)
    try:
        return f(*args)
    except _compile_errors() as exc:
        _enabled = False
        warnings.warn(f"lowbit: torch.compile failed ({type(exc).__name__}); using the "
                      "reference kernels from now on (same results, slower)", stacklevel=3)
        return fn(*args)


def quantize_codes(x: torch.Tensor, qmax: int, per_row: bool, stochastic: bool,
                   seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return run("quantize_codes", reference.quantize_codes, x, qmax, per_row, stochastic, seed)


def quantize_codes_fixed(x: torch.Tensor, amax: torch.Tensor, qmax: int, stochastic: bool,
                         seed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return run("quantize_codes_fixed", reference.quantize_codes_fixed, x, amax, qmax, stochastic, seed)


def dequantize_acc(acc: torch.Tensor, a_step: torch.Tensor, b_step: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return run("dequantize_acc", reference.dequantize_acc, acc, a_step, b_step, bias, out_dtype)
