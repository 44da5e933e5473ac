"""Which kernel a convolution's GEMM may run on (:mod:`lowbit.conv`).

A conv GEMM runs on integer kernels (oneDNN's int8 convolution or ``torch._int_mm`` on
im2col patches) when :func:`integer_path` holds for its operands; otherwise it runs
simulated (dequantized operands, float32 convolution), which ``backend="auto"`` accepts
and ``backend="int8"``/``"fp8"`` refuse with the cause (:func:`refuse_simulated`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import Backend
from .quantizers import QuantizedOperand


def integer_path(backend: Backend, *ops: QuantizedOperand) -> bool:
    """Whether the conv GEMMs on ``ops`` run on integer kernels: not the reference
    backend, every operand int8 codes with no offset (a zero code is then the value 0,
    so padding and zero insertion are exact) and no block scale, on cpu/cuda."""
    return Backend(backend) is not Backend.REFERENCE and all(
        q.codes.dtype == torch.int8 and q.offset is None and q.block_scale is None
        and q.codes.device.type in ("cpu", "cuda") and q.codes.numel() > 0 for q in ops)


def refuse_simulated(backend: Backend, gemm: str, ops: Sequence[QuantizedOperand],
                     cause: str | None = None) -> None:
    """``backend="int8"``/``"fp8"``: raise ``ValueError`` naming the convolution's ``gemm``
    (``"output"``, ``"∇X"``, ``"∇W"``) and why it cannot run on the backend's kernel, where
    it would otherwise run simulated (``cause`` given by the caller, else read from the
    operands ``ops``); other backends, and empty operands, pass. FP8 convolutions have no
    ``torch._scaled_mm`` kernel in :mod:`lowbit.kernels`'s table."""
    be = Backend(backend)
    if be not in (Backend.INT8, Backend.FP8) or any(q.codes.numel() == 0 for q in ops):
        return
    if be is Backend.FP8:
        cause, kernel = "FP8 convolution has no _scaled_mm kernel (lowbit runs it simulated)", \
            "torch._scaled_mm"
    else:
        kernel = "integer kernels (oneDNN int8 convolution or torch._int_mm)"
        for q in ops:
            if cause is not None:
                break
            if q.codes.dtype != torch.int8:
                cause = f"an operand's codes are {q.codes.dtype} (format not int8)"
            elif q.offset is not None:
                cause = "an operand is on an asymmetric grid (an offset: code 0 is not the value 0)"
            elif q.block_scale is not None:
                cause = "an operand has block scales (a block format)"
            elif q.codes.device.type not in ("cpu", "cuda"):
                cause = f"the operands are on {q.codes.device.type}"
    raise ValueError(f"backend={be.value!r} cannot compute this GEMM (the convolution's {gemm}) on "
                     f"{kernel}: {cause}; use backend='auto' (simulated there)")
