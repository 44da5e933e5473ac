"""Kernels, and the one table that says which runs.

Every kernel is a row of ``_TABLE``: ``(operation, implementation, device) → kernel``,
with an optional ``supports(*args)`` check (dtypes, shapes, formats). Implementations:

* ``reference`` (any device): plain eager torch, float32 (float64 for float64 inputs) —
  it defines the semantics;
* ``native`` (cpu): lowbit's own C kernels where they compute the same thing faster —
  the integer quantizer on AVX-512 or AVX2 (:mod:`.avx512`, with the Hadamard and BHQ transforms
  fused into it) and BHQ's group bookkeeping (:mod:`.bhq_groups`, plain C), bit for bit
  the reference's, and attention's softmax
  fused with its scores' epilogue (:mod:`.softmax`), equal to the reference to float
  rounding (its ``exp`` and summation order are its own);
* ``compiled`` (cpu, cuda): the same function fused by ``torch.compile``
  (:mod:`.compiled`), for tensors large enough to pay for a compiled call;
* ``int8`` (``torch._int_mm``, or lowbit's AMX kernel :mod:`.amx` on CPUs with AMX, or
  exact float32 GEMMs of the codes on CPUs without an int8 dot product, :mod:`.exact_f32`;
  :mod:`.int8`) and ``fp8`` (``torch._scaled_mm``, :mod:`.fp8`):
  real low-bit GEMMs, exact where the scales sit on non-summed dimensions.

The backend is decided once per call: :func:`kernels_for` resolves a :class:`Backend`
and a device into a :class:`Kernels` object, and everything below a layer call (the
quantizers, their transforms, the GEMMs) asks that object, never ``compiled`` or
``torch._int_mm`` directly. ``Backend.REFERENCE`` only ever reads ``reference`` rows, so
it never compiles. Adding a kernel (a Triton GEMM, a new format's encoder) is one
:func:`register` call.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from .. import grid_notes
from ..scopes import scope

from ..formats import Format, Granularity, Rounding, as_granularity, as_rounding, compute_dtype, grid_step
from . import avx512, compiled, fp8, int8, reference, softmax
from .encoded import Encoded, dequantize

if TYPE_CHECKING:  # pragma: no cover
    from ..quantizers.base import RowTransform


class Backend(enum.Enum):
    """Which kernels run. ``AUTO``: the fastest path that computes the same estimator
    (integer or FP8 GEMMs, compiled quantizers); ``REFERENCE``: plain torch, simulated
    GEMMs; ``INT8`` / ``FP8``: like AUTO but an error where a GEMM cannot run on
    ``torch._int_mm`` / ``torch._scaled_mm``."""

    AUTO = "auto"
    REFERENCE = "reference"
    INT8 = "int8"
    FP8 = "fp8"


class Impl(enum.Enum):
    """A family of kernels (a column of the table)."""

    REFERENCE = "reference"
    NATIVE = "native"
    COMPILED = "compiled"
    INT8 = "int8"
    FP8 = "fp8"


ANY_DEVICE = "any"


@dataclass(frozen=True)
class Kernel:
    fn: Callable[..., Any]
    supports: Callable[..., bool] | None = None


_TABLE: dict[tuple[str, Impl, str], Kernel] = {}


def register(op: str, impl: Impl, fn: Callable[..., Any], devices: tuple[str, ...] = (ANY_DEVICE,),
             supports: Callable[..., bool] | None = None) -> None:
    """Add (or replace) the kernel ``fn`` of ``op`` for ``impl`` on ``devices``."""
    for d in devices:
        _TABLE[(op, impl, d)] = Kernel(fn, supports)


def _first_tensor(*args: Any) -> torch.Tensor:
    return next(a for a in args if isinstance(a, torch.Tensor))


def worth_fusing(x: torch.Tensor) -> bool:
    """Whether ``x`` is large enough (and on a device) for a compiled kernel to pay."""
    return compiled.use_for(x)


def register_fused(op: str, fn: Callable[..., Any]) -> None:
    """``fn`` (plain torch) as the reference kernel of ``op``, and its ``torch.compile``d
    copy as the compiled one on cpu/cuda for inputs of at least ``compiled.MIN_NUMEL``."""
    register(op, Impl.REFERENCE, fn)
    register(op, Impl.COMPILED, functools.partial(compiled.run, op, fn), ("cpu", "cuda"),
             lambda *args: worth_fusing(_first_tensor(*args)))


register_fused("quantize", reference.quantize)
register("quantize", Impl.NATIVE, avx512.run_quantize, ("cpu",), avx512.prefers)
register_fused("quantize_fixed", reference.quantize_fixed)
register_fused("int8_epilogue", reference.int8_epilogue)
register_fused("int8_epilogue_into", reference.int8_epilogue_into)
register("int8_epilogue_into", Impl.NATIVE, avx512.run_epilogue_into, ("cpu",), avx512.supports_epilogue_into)
register_fused("row_absmax", reference.row_absmax)
register("row_absmax", Impl.NATIVE, avx512.run_row_absmax, ("cpu",), avx512.supports_row_absmax)
register_fused("dequantize", dequantize)
register("dequantize", Impl.NATIVE, avx512.run_dequantize, ("cpu",), avx512.supports_dequantize)
register("attention_softmax", Impl.REFERENCE, softmax.reference)
register("attention_softmax", Impl.NATIVE, softmax.run, ("cpu",), softmax.supports)
register("attention_softmax_grad", Impl.REFERENCE, softmax.reference_grad)
register("attention_softmax_grad", Impl.NATIVE, softmax.run_grad, ("cpu",), softmax.supports_grad)
register("gemm", Impl.REFERENCE, lambda k, a, b, bias, out_dtype: reference.gemm(a, b, bias, out_dtype))
register("gemm", Impl.INT8, int8.gemm, ("cpu", "cuda"), int8.supports)
register("gemm", Impl.FP8, fp8.gemm, ("cpu", "cuda"), fp8.supports)

_GEMM_ORDER = {Backend.AUTO: (Impl.INT8, Impl.FP8), Backend.INT8: (Impl.INT8,),
               Backend.FP8: (Impl.FP8,), Backend.REFERENCE: ()}


@dataclass(frozen=True)
class Kernels:
    """The kernels of one call: ``backend`` on ``device`` (a device type), with compiled
    kernels allowed when ``fused``. Made by :func:`kernels_for`."""

    backend: Backend
    device: str
    fused: bool

    def lookup(self, op: str, impl: Impl) -> Kernel | None:
        return _TABLE.get((op, impl, self.device)) or _TABLE.get((op, impl, ANY_DEVICE))

    def run(self, op: str, *args: Any) -> Any:
        """``op`` on ``args``: where allowed (``fused``), the first of the native and the
        compiled kernel that supports them, else the reference one."""
        if self.fused:
            for impl in (Impl.NATIVE, Impl.COMPILED):
                k = self.lookup(op, impl)
                if k is not None and (k.supports is None or k.supports(*args)):
                    return k.fn(*args)
        k = self.lookup(op, Impl.REFERENCE)
        if k is None:
            raise KeyError(f"no kernel registered for operation {op!r}")
        return k.fn(*args)

    def quantize(self, x: torch.Tensor, fmt: Format, granularity: Granularity,
                 rounding: Rounding, seed: torch.Tensor) -> Encoded:
        """``x`` (R, D) on ``fmt`` (:func:`reference.quantize`); empty tensors give empty
        codes with zero scales, and draw nothing. ``granularity``/``rounding``: the enums
        or their names (``ValueError`` otherwise)."""
        granularity, rounding = as_granularity(granularity), as_rounding(rounding)
        if x.numel() == 0:
            return _empty(x, fmt, granularity)
        with scope("lowbit::quantize"):
            codes, scale, offset, bs = self.run("quantize", x, fmt, granularity, rounding, seed)
        return Encoded(codes, scale, offset, bs, fmt.block, kernels=self)

    def quantize_fixed(self, x: torch.Tensor, amax: torch.Tensor, fmt: Format, rounding: Rounding,
                       seed: torch.Tensor) -> tuple[Encoded, torch.Tensor, torch.Tensor,
                                                    torch.Tensor, torch.Tensor]:
        """``x`` on a grid fixed by ``amax`` (:func:`reference.quantize_fixed`): the
        operand and (observed absmax, clipped count, clipped Σ², Σ x²)."""
        rounding = as_rounding(rounding)
        if fmt.block or fmt.asymmetric:
            raise ValueError(f"a predicted range needs a format with one scale per row or "
                             f"tensor and a symmetric grid (intB, fp8_*), got {fmt.name}")
        if x.numel() == 0:
            dt = compute_dtype(x.dtype)
            zero = torch.zeros((), dtype=dt, device=x.device)
            enc = Encoded(torch.zeros(x.shape, dtype=fmt.code_dtype, device=x.device),
                          grid_step(amax.to(dt), fmt.emax))
            return enc, torch.zeros_like(amax, dtype=dt), zero.long(), zero, zero
        with scope("lowbit::quantize"):
            codes, step, *acct = self.run("quantize_fixed", x, amax, fmt, rounding, seed)
        return (Encoded(codes, step, kernels=self), *acct)  # type: ignore[return-value]

    def gemm(self, a: Encoded, b: Encoded, bias: torch.Tensor | None = None,
             out_dtype: torch.dtype = torch.float32, inverse: RowTransform | None = None) -> torch.Tensor:
        """``â @ b̂ + bias`` ((M, K) × (K, N)) as ``out_dtype``, by the first GEMM of the
        backend's order (int8, then fp8, under AUTO) that supports the operands, else
        the simulated reference GEMM. ``INT8``/``FP8`` raise where theirs cannot.
        ``inverse``: a row transform ``T`` of ``â``'s M rows (``bias`` must be ``None``):
        the result is ``T⁻¹(â @ b̂)``, the product in ``compute_dtype(out_dtype)`` until
        ``T⁻¹`` has run; the integer GEMM applies it in one pass with its epilogue where
        ``T`` has a kernel for that (:func:`lowbit.kernels.int8.gemm`), the same values."""
        if inverse is not None:
            if bias is not None:
                raise ValueError("Kernels.gemm: a bias is added after T⁻¹, not before (give bias=None with inverse)")
            k = self.lookup("gemm", Impl.INT8) if Impl.INT8 in _GEMM_ORDER[self.backend] else None
            if k is not None and k.supports(a, b):
                return k.fn(self, a, b, None, out_dtype, inverse=inverse)
            out = self.gemm(a, b, None, compute_dtype(out_dtype))
            with scope("lowbit::transform"):
                return inverse.inverse(out, out_dtype, overwrite=True)
        for impl in _GEMM_ORDER[self.backend]:
            k = self.lookup("gemm", impl)
            if k is not None and k.supports(a, b):
                return k.fn(self, a, b, bias, out_dtype)
        if self.backend is Backend.FP8 and fp8.supports(a, b, one_by_one=True):
            # a 1 × 1 product on the CPU: on _scaled_mm in oneDNN's order (lowbit.kernels.fp8)
            return fp8.gemm(self, a, b, bias, out_dtype)
        if self.backend in (Backend.INT8, Backend.FP8):
            what = "torch._int_mm (int8 codes" if self.backend is Backend.INT8 else \
                "torch._scaled_mm (fp8 codes, not both e5m2 off the CPU, float32 scales"
            raise ValueError(
                f"backend={self.backend.value!r} cannot compute this GEMM on {what}, scales and "
                f"offsets on non-summed dimensions only, no block scales, supported shapes): "
                f"{refusal_cause(self.backend, a, b)}; got a {tuple(a.codes.shape)} "
                f"{a.codes.dtype}, b {tuple(b.codes.shape)} {b.codes.dtype}, b scale "
                f"{tuple(b.scale.shape)} on {self.device}")
        with scope("lowbit::gemm"), grid_notes.simulating(lambda: simulated_cause(self.backend, a, b)):
            return self.lookup("gemm", Impl.REFERENCE).fn(self, a, b, bias, out_dtype)  # type: ignore[union-attr]


def simulated_cause(backend: Backend, a: Encoded, b: Encoded) -> str:
    """Why a GEMM of ``a`` and ``b`` runs simulated under ``backend``: the reference
    backend's choice, or what keeps the int8 or FP8 kernel (by the codes' dtype) from it
    (:func:`refusal_cause`)."""
    if backend is Backend.REFERENCE:
        return grid_notes.REFERENCE
    if a.block_scale is not None or b.block_scale is not None:
        return grid_notes.BLOCK_SCALED
    mix = fp8.mixed_codes(a.codes.dtype, b.codes.dtype)
    if mix:  # (a trial: "codes are float8_e5m2 and int8, not fp8" contradicted itself)
        return (f"its operands' codes are {mix}: no kernel takes an integer and an FP8 operand "
                "together (give the GEMM's two specs one kind of format)")
    kind = Backend.FP8 if a.codes.dtype in fp8.FP8_DTYPES else Backend.INT8
    return f"no {kind.value} kernel takes it: {refusal_cause(kind, a, b)}"


def refusal_cause(backend: Backend, a: Encoded, b: Encoded) -> str:
    """Why ``backend``'s GEMM (``INT8``: ``torch._int_mm``, ``FP8``: ``torch._scaled_mm``)
    cannot compute ``â @ b̂`` ((M, K) × (K, N)), in the words a user can act on: the
    first of codes, block scales, offsets, scales on the summed dimension ``K``, scale
    dtype, else shapes or device."""
    fp8_ok = fp8.FP8_DTYPES
    off_cpu = a.codes.device.type != "cpu"
    want = "int8" if backend is Backend.INT8 else "fp8 (not both e5m2 off the CPU)"
    ok = (a.codes.dtype == b.codes.dtype == torch.int8) if backend is Backend.INT8 else (
        a.codes.dtype in fp8_ok and b.codes.dtype in fp8_ok
        and not (a.codes.dtype == b.codes.dtype == torch.float8_e5m2 and off_cpu))
    if not ok:
        return f"its operands' codes are {a.codes.dtype} and {b.codes.dtype}, not {want}"
    if a.block_scale is not None or b.block_scale is not None:
        return "an operand has block scales (a block format)"
    if backend is Backend.FP8 and (a.offset is not None or b.offset is not None):
        return "an operand is on an asymmetric grid (an offset)"
    if a.scale.shape[1] != 1 or (a.offset is not None and a.offset.shape[1] != 1):
        return (f"a's scale {tuple(a.scale.shape)} lies on the summed dimension (one per "
                f"column of a)")
    if b.scale.shape[0] != 1 or (b.offset is not None and b.offset.shape[0] != 1):
        return (f"b's scale {tuple(b.scale.shape)} lies on the summed dimension (one per row "
                f"of b: e.g. weight.granularity='row' in ∇X = ∇Y·W, or "
                f"activation.granularity='row' in ∇W = ∇Yᵀ·X)")
    if backend is Backend.FP8 and not a.scale.dtype == b.scale.dtype == torch.float32:
        return f"its scales are {a.scale.dtype} and {b.scale.dtype}, not float32"
    if backend is Backend.INT8 and a.codes.shape[1] > int8.MAX_K:  # (a review: named as a shape rule)
        return (f"its sum has K = {a.codes.shape[1]} terms, past int8.MAX_K = {int8.MAX_K} (an int32 "
                "sum of that many 8-bit products could wrap)")
    return "the kernel does not take these shapes on this device"


def _empty(x: torch.Tensor, fmt: Format, granularity: Granularity) -> Encoded:
    rows = x.shape[0] if granularity is Granularity.ROW else 1
    dt = compute_dtype(x.dtype)
    scale = torch.zeros(rows, 1, dtype=dt, device=x.device)
    offset = torch.zeros_like(scale) if fmt.asymmetric else None
    bs = torch.zeros(x.shape[0], -(-x.shape[1] // fmt.block), dtype=dt, device=x.device) \
        if fmt.block else None
    return Encoded(torch.zeros(x.shape, dtype=fmt.code_dtype, device=x.device), scale, offset,
                   bs, fmt.block)


def kernels_for(backend: Backend | Kernels | str, device: torch.device | str) -> Kernels:
    """Decide the kernels of one call, once: ``backend`` (a :class:`Backend`, its value,
    or an already resolved :class:`Kernels`, returned as is) on ``device``; ``ValueError``
    naming the backends for anything else."""
    if isinstance(backend, Kernels):
        return backend
    if not isinstance(backend, Backend):
        try:
            backend = Backend(backend)
        except ValueError:
            allowed = ", ".join(repr(b.value) for b in Backend)
            raise ValueError(f"backend must be a lowbit.Backend or one of {allowed}, got {backend!r}") from None
    dev = torch.device(device).type
    return Kernels(backend, dev, backend is not Backend.REFERENCE and compiled.enabled())


def int8_applicable(a_codes: torch.Tensor, a_step: torch.Tensor, b_codes: torch.Tensor,
                    b_step: torch.Tensor) -> bool:
    """Whether ``int8`` computes ``(a_codes·a_step) @ (b_codes·b_step)`` exactly: int8
    codes, each step off the summed dimension (``a``'s per row or tensor, ``b``'s per
    column or tensor), shapes ``_int_mm`` accepts (:func:`int8.supports`)."""
    return int8.supports(Encoded(a_codes, a_step), Encoded(b_codes, b_step))


__all__ = ["ANY_DEVICE", "Backend", "Encoded", "Impl", "Kernel", "Kernels", "int8_applicable", "simulated_cause",
           "kernels_for", "refusal_cause", "register", "register_fused", "worth_fusing"]
