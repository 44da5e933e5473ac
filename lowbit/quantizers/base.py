"""The shape every gradient quantizer shares: transform → stochastic rounding → inverse.

A gradient operand ``A`` is always oriented so that its **rows are the dimension that
is not summed** by the GEMM that consumes it (``∇Y`` itself for ``∇X = ∇Y·W``, and
``∇Yᵀ`` for ``∇W = ∇Yᵀ·X``). A quantizer then

1. applies an invertible transform ``T`` that mixes rows only (identity for PTQ/PSQ,
   scale + block Householder for BHQ, random signs + block Hadamard for ``hadamard``);
2. quantizes ``T·A`` with stochastic rounding, one scale per row or per tensor;
3. applies ``T⁻¹`` — to the dequantized operand (simulated path), or, because ``T``
   acts on rows only, to the GEMM's output rows (integer path). Both give
   ``T⁻¹·Q(T·A)·B`` up to float rounding.

Every scale sits on rows, a non-summed dimension, so the integer GEMM stays exact.
The analytic variance of the estimate follows from the per-row rounding variance pushed
through ``T⁻¹`` with squared coefficients (:meth:`RowTransform.inverse_sq`).
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass

import torch
from torch.profiler import record_function

from ..formats import IntFormat, Rounding, compute_dtype, div_rn, draw_seed
from ..kernels import Backend, compiled, quantize_codes, quantize_codes_fixed
from ..ranges import Overflow, RangeTracker


class Granularity(enum.Enum):
    """Which elements share one scale."""

    TENSOR = "tensor"
    ROW = "row"


def absmax(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """``max |x|`` per tensor (shape (1, 1)) or per row (shape (R, 1)); NaN propagates."""
    a = x.abs()
    if granularity is Granularity.TENSOR:
        return a.amax().reshape(1, 1) if a.numel() else a.new_zeros(1, 1)
    return a.amax(dim=1, keepdim=True) if a.shape[1] else a.new_zeros(a.shape[0], 1)


def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(dim=1).to(compute_dtype(x.dtype))


def row_absmax(x: torch.Tensor, fast: bool = False) -> torch.Tensor:
    """``max_j |x_ij|`` per row (N,) in :func:`~lowbit.formats.compute_dtype` (float64
    for float64 ``x``, else float32); NaN propagates. ``fast``: fused by
    ``torch.compile`` for large inputs (never under ``Backend.REFERENCE``)."""
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0], dtype=compute_dtype(x.dtype))
    if fast and compiled.use_for(x):
        return compiled.run("row_absmax", _row_absmax, x)
    return _row_absmax(x)


def sr_seed(generator: torch.Generator | None, rounding: Rounding, device: torch.device) -> torch.Tensor:
    """The seed of one quantization call: drawn from ``generator`` for stochastic
    rounding, a constant 0 for round-to-nearest (which uses no noise)."""
    if rounding is Rounding.STOCHASTIC:
        return draw_seed(generator, device)
    return torch.zeros((), dtype=torch.int64, device=device)


def quantize_rows(
    y: torch.Tensor,
    fmt: IntFormat,
    granularity: Granularity,
    rounding: Rounding,
    generator: torch.Generator | None,
    backend: Backend = Backend.AUTO,
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and steps of a 2-D ``y``, one scale per row or per tensor."""
    seed = sr_seed(generator, rounding, y.device)
    return quantize_codes(y, fmt.qmax, granularity is Granularity.ROW,
                          rounding is Rounding.STOCHASTIC, seed, backend)


class RowTransform(abc.ABC):
    """An invertible linear map acting on the rows of ``(R, D)`` matrices."""

    n_rows: int  # rows of the original operand (the transformed one may be padded)
    use_compiled: bool = False  # set by the quantizer: fused kernels allowed (not REFERENCE)

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def inverse(self, y: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``T⁻¹ y`` cropped to the original ``n_rows`` rows, as ``out_dtype``."""

    def forward_quantize(
        self, x: torch.Tensor, qmax: int, per_row: bool, stochastic: bool,
        seed: torch.Tensor, backend: Backend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes and steps of ``T x``. Transforms with a fused kernel override this."""
        with record_function("lowbit::transform"):
            y = self.forward(x)
        return quantize_codes(y, qmax, per_row, stochastic, seed, backend)

    @abc.abstractmethod
    def inverse_sq(self, v: torch.Tensor) -> torch.Tensor:
        """For independent per-row noise of total variance ``v`` (shape (R,)), the
        variance each output row of ``T⁻¹`` receives: ``Σ_i (T⁻¹)_ji² v_i``, cropped."""


class Identity(RowTransform):
    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse(self, y: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return y.to(out_dtype)

    def inverse_sq(self, v: torch.Tensor) -> torch.Tensor:
        return v


@dataclass
class QuantizedRows:
    """``T⁻¹ · diag(step) · codes``: the quantized operand before its inverse transform.

    ``codes`` are int8 (``|codes| ≤ 2**(bits-1) - 1``), ``step`` is (R, 1) or (1, 1)
    in the compute dtype (float32; float64 for float64 operands), 0 for an all-zero
    group; ``transform`` maps rows back. A group holding NaN/Inf has a non-finite step
    (its int8 codes are then meaningless), so its values stay non-finite.
    """

    codes: torch.Tensor
    step: torch.Tensor
    transform: RowTransform

    def dequantize(self, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``T⁻¹ · diag(step) · codes`` as ``out_dtype``, computed in the step's dtype
        (float64 if ``out_dtype`` is: then exactly, up to the inverse transform's
        rounding)."""
        dt = torch.promote_types(self.step.dtype, out_dtype)
        return self.inverse(self.codes.to(dt) * self.step, out_dtype)

    def inverse(self, out: torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``T⁻¹`` applied to the rows of a GEMM output (or of the dequantized operand),
        returned as ``out_dtype``."""
        if isinstance(self.transform, Identity):
            return out.to(out_dtype)
        with record_function("lowbit::transform"):
            return self.transform.inverse(out, out_dtype)


def _quantize_predicted(
    t: RowTransform, a: torch.Tensor, qmax: int, per_row: bool, stochastic: bool,
    seed: torch.Tensor, backend: Backend, tracker: RangeTracker,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and steps of ``T a`` on the grid the tracker predicts (see ``lowbit.ranges``):
    dynamic while it has no history; on overflow clipped or quantized again."""
    with record_function("lowbit::transform"):
        y = t.forward(a)
    st = tracker.stats
    st.calls += 1
    amax = tracker.predict()
    if amax is None:
        st.dynamic_calls += 1
        tracker.record(absmax(y, Granularity.ROW if tracker.per_row else Granularity.TENSOR))
        return quantize_codes(y, qmax, per_row, stochastic, seed, backend)
    codes, step, observed, n_over, clipped_sq, total_sq = quantize_codes_fixed(
        y, amax.to(y.device), qmax, stochastic, seed, backend)
    tracker.record(observed)
    if not bool(torch.isfinite(observed).all()):  # NaN/Inf: propagate, count nothing else
        return codes, step
    n_over = int(n_over)
    st.elements += y.numel()
    st.overflow_elements += n_over
    st.total_sq += float(total_sq)
    if n_over:
        st.overflow_calls += 1
        if tracker.overflow is Overflow.REQUANTIZE:
            st.requantized_calls += 1
            return quantize_codes(y, qmax, per_row, stochastic, seed, backend)
        st.clipped_sq += float(clipped_sq)
    return codes, step


class GradQuantizer(abc.ABC):
    """Unbiased gradient quantizer: a row transform plus per-row or per-tensor SR."""

    name: str
    granularity: Granularity
    mixes_rows: bool = False  # the transform mixes rows (so per-row ranges do not persist)

    @abc.abstractmethod
    def transform(self, a: torch.Tensor, generator: torch.Generator | None,
                  fast: bool = False) -> RowTransform:
        """The row transform for operand ``a`` ((R, D)); ``fast``: compiled kernels
        allowed while building it (the quantizer passes ``backend is not REFERENCE``)."""

    def quantize(
        self,
        a: torch.Tensor,
        fmt: IntFormat,
        generator: torch.Generator | None = None,
        rounding: Rounding = Rounding.STOCHASTIC,
        backend: Backend = Backend.AUTO,
        tracker: RangeTracker | None = None,
    ) -> QuantizedRows:
        """Transform, then round ``T·a`` onto ``fmt`` (noise seeded from ``generator``).
        The grid's range is ``T·a``'s own (dynamic), or ``tracker``'s prediction."""
        fast = backend is not Backend.REFERENCE
        with record_function("lowbit::transform"):
            t = self.transform(a, generator, fast)
            t.use_compiled = fast
        seed = sr_seed(generator, rounding, a.device)
        args = (fmt.qmax, self.granularity is Granularity.ROW, rounding is Rounding.STOCHASTIC,
                seed, backend)
        if tracker is None:
            codes, step = t.forward_quantize(a, *args)
        else:
            codes, step = _quantize_predicted(t, a, *args, tracker)
        return QuantizedRows(codes, step, t)

    # -- analytic variance ------------------------------------------------------------
    def rounding_variance(
        self, a: torch.Tensor, fmt: IntFormat, generator: torch.Generator | None = None
    ) -> tuple[RowTransform, torch.Tensor]:
        """The transform of ``a`` and the stochastic-rounding variance ``p(1−p)·step²`` of
        each element of ``T·a`` (float64, shape of ``T·a``; ``p`` its fractional part on
        the grid, exactly as the kernels compute it). An all-zero group adds 0."""
        a = a.to(compute_dtype(a.dtype))
        t = self.transform(a, generator)
        y = t.forward(a)
        step = self._row_step(y, fmt)
        z = div_rn(y, torch.where(step == 0, torch.ones_like(step), step))
        frac = (z - torch.floor(z)).double()
        return t, frac * (1 - frac) * step.double() ** 2

    def _row_step(self, y: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
        """The kernels' grid step of each row of ``y`` (R, 1): 0 for all-zero groups."""
        return fmt.step(absmax(y, self.granularity)).expand(y.shape[0], 1)

    def expected_variance(
        self, a: torch.Tensor, fmt: IntFormat, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``E‖Q(a) − a‖²`` over the rounding noise (0-d float64): ``Σ p(1−p)·step²`` per
        transformed element, pushed through ``T⁻¹``. (For random transforms: given that
        draw.)"""
        t, var = self.rounding_variance(a, fmt, generator)
        return t.inverse_sq(var.sum(dim=1)).sum()

    def variance_bound(self, a: torch.Tensor, fmt: IntFormat) -> torch.Tensor:
        """Upper bound on ``E‖Q(a) − a‖²`` (METHOD.md §2), 0-d float64: ``step²/4`` per
        element of ``T·a``; an all-zero group (step 0) has no variance and adds 0."""
        a = a.to(compute_dtype(a.dtype))
        t = self.transform(a, None)
        y = t.forward(a)
        step = self._row_step(y, fmt).double()
        row_var = y.shape[1] * step.squeeze(1) ** 2 / 4
        return t.inverse_sq(row_var).sum()
