"""Gradient ranges known before the GEMM that produces the gradient (docs/METHOD.md §4.5).

A dynamic quantizer reads ``max |x|`` of the operand it rounds, which hardware only
knows once the whole accumulator output exists. A *predicted* range is fixed before:
each layer keeps, per gradient path, the absmax it observed on its last ``history``
calls and uses ``margin × max(history)`` as this call's range.

* **Granularity.** Per row where rows persist from step to step: the ∇W path's rows are
  the layer's output features, so PSQ there keeps one predicted range per feature.
  Elsewhere (∇X path rows are samples; BHQ and Hadamard mix rows anew each call) one
  range for the whole tensor.
* **Overflow.** Values beyond the predicted range are either clipped to the grid's end
  (``clip``: biased, the clipped mass is reported) or the call is quantized again with
  its own dynamic range (``requantize``: stays unbiased, costs a second pass). Both are
  counted.
* **Warm-up.** A tracker with no usable history quantizes dynamically (counted as
  ``dynamic_calls``) and records the range it saw.
* **Non-finite gradients** are quantized as usual but never enter the history: NaN/Inf
  propagate to their group as on the dynamic path — the row, for a per-row quantizer
  (PSQ) under a per-tensor range too; the whole operand for a per-tensor one (PTQ).
* **Formats.** A predicted range fixes one scale per row or tensor on a symmetric grid:
  integer (``intB``) and FP8 formats. Asymmetric grids (two ends to predict) and block
  formats (one scale per block, read from the block) are refused with a ``ValueError``.

Prediction uses only earlier calls, so given the data the rounding is still stochastic
rounding on a fixed grid: unbiased unless values are clipped.
"""

from __future__ import annotations

import enum
import math
import threading
import warnings
import weakref
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from .formats import Format, Granularity, Rounding, as_granularity, as_rounding, compute_dtype, grid_step
from .kernels import Encoded, Kernels
from .scalars import integer, real
from .userframe import user_stacklevel


class RangeMode(enum.Enum):
    """Where a gradient quantizer's range comes from."""

    DYNAMIC = "dynamic"  # max |x| of this very operand
    PREDICTED = "predicted"  # from earlier calls, known before the producing GEMM


class Overflow(enum.Enum):
    """What a predicted range does with values beyond it."""

    CLIP = "clip"  # clip to the end of the grid (biased; counted and measured)
    REQUANTIZE = "requantize"  # quantize this call again with its dynamic range


@dataclass
class RangeStats:
    """Counters of one tracker (plain numbers: JSON-friendly, summed over calls)."""

    calls: int = 0  # quantizations done through this tracker
    dynamic_calls: int = 0  # no usable history yet: quantized with the dynamic range
    overflow_calls: int = 0  # calls with at least one value beyond the predicted range
    requantized_calls: int = 0  # overflow calls quantized again (overflow="requantize")
    nonfinite_calls: int = 0  # calls whose operand held NaN/Inf (not recorded)
    elements: int = 0  # elements quantized with a predicted range
    overflow_elements: int = 0  # of which beyond the range
    # the sums of squares are in the unscaled loss's units: each call's divided by its
    # tracker's loss_scale² (lowbit.amp.GradScaler keeps that in step with its scale)
    clipped_sq: float = 0.0  # Σ (|x| − range)₊² over clipped calls (overflow="clip"), summed in float64
    total_sq: float = 0.0  # Σ x² over calls with a predicted range, summed in float64

    def __add__(self, other: RangeStats) -> RangeStats:
        return RangeStats(**{k: getattr(self, k) + getattr(other, k) for k in _STAT_FIELDS})

    def __sub__(self, other: RangeStats) -> RangeStats:
        return RangeStats(**{k: getattr(self, k) - getattr(other, k) for k in _STAT_FIELDS})

    def add_(self, other: RangeStats) -> None:
        """Add ``other``'s counts to these, in place (a tracker call's, once per call)."""
        for k in _STAT_FIELDS:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def overflow_rate(self) -> float:
        """Fraction of predicted-range elements beyond the range."""
        return self.overflow_elements / self.elements if self.elements else 0.0

    @property
    def clipped_norm(self) -> float:
        """``‖x − clip(x)‖ / ‖x‖`` over all predicted-range calls (0 without clipping); NaN
        where a sum is not finite (values past float64's square root, ~1.3e154, or a
        difference of such stats): never a 0 that reads as "nothing clipped"."""
        if not (math.isfinite(self.clipped_sq) and math.isfinite(self.total_sq)):
            return math.nan
        return math.sqrt(self.clipped_sq / self.total_sq) if self.total_sq > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "overflow_rate": self.overflow_rate,
                "clipped_norm": self.clipped_norm}


_STAT_FIELDS = tuple(f.name for f in fields(RangeStats))  # (asdict copies: on every tracker call)

# Open lowbit.nn.RangeWindow objects, held weakly (a window dropped unclosed stops
# counting): every tracker call's counts are handed to each (``count(tracker, counts)``),
# which keeps those of its model's trackers. Read and changed under _WINDOWS_LOCK only
# (open_windows, window_opened, window_closed): a window opened or closed in one thread
# while another thread's backward walked the set raised "Set changed size during
# iteration" there (a review).
OPEN_WINDOWS: weakref.WeakSet = weakref.WeakSet()
_WINDOWS_LOCK = threading.Lock()


def open_windows() -> list:
    """A snapshot of the open ``RangeWindow`` objects (thread-safe)."""
    with _WINDOWS_LOCK:
        return list(OPEN_WINDOWS)


def window_opened(window: object) -> None:
    with _WINDOWS_LOCK:
        OPEN_WINDOWS.add(window)


def window_closed(window: object) -> None:
    with _WINDOWS_LOCK:
        OPEN_WINDOWS.discard(window)


def check_range_settings(margin: Any, history: Any) -> tuple[float, int]:
    """``(margin, history)`` as a float and an int; ``ValueError`` unless ``margin`` is a
    finite real number ≥ 1 and ``history`` a positive integer — NumPy scalars and
    one-element tensors taken, bools refused (a trial: ``np.float32(1.5)`` was refused as
    if below 1): the predicted-range settings of a ``GradSpec`` and of a
    :class:`RangeTracker` (a NaN margin made every code NaN, an infinite one every code 0,
    uncounted: a review)."""
    m, h = real(margin), integer(history)
    if m is None or not 1 <= m < float("inf"):
        raise ValueError(f"margin must be a finite number ≥ 1, got {margin!r}")
    if h is None or h < 1:
        raise ValueError(f"history must be a positive integer, got {history!r}")
    return m, h


class RangeTracker:
    """Predicted range of one gradient path of one layer.

    ``history`` past absmax observations (a ring buffer of shape (history, R): R rows when
    ``per_row``, else 1); the prediction is ``margin × max`` over them. ``frozen``
    trackers predict and count but do not record (for repeated draws of one minibatch).
    ``ValueError`` for a ``margin`` that is not a finite number ≥ 1, a ``history`` that is
    not a positive integer, or an unknown ``overflow``.
    """

    def __init__(self, history: int, margin: float, per_row: bool, overflow: Overflow | str,
                 quantizer: str = "") -> None:
        self.margin, self.history = check_range_settings(margin, history)
        self.per_row = per_row
        self.overflow = Overflow(overflow)
        self.quantizer = quantizer  # whose transformed operand the ranges describe
        self.frozen = False
        # the loss scale of the gradients it sees: its sums of squares are divided by its
        # square (lowbit.amp.GradScaler sets it; rescale follows the scale's changes); None:
        # not known (a state saved before it was kept), taken as 1 until a scaler adopts it
        self.loss_scale: float | None = 1.0
        # per history slot, how its range follows the gradient's (rescale): the
        # transform's range_exponent at the call that recorded it (BHQ 2/3, 1 for its
        # groups of one: a review)
        self._exp: list[float] = [1.0] * self.history
        self._call_exponent = 1.0  # the running quantize call's
        self.stats = RangeStats()
        self._call: RangeStats | None = None  # the counts of the quantize call running
        self._hist: torch.Tensor | None = None
        self._count = 0

    def __setstate__(self, state: dict[str, Any]) -> None:
        """An unpickled tracker (a pickled converted model); one pickled before the loss
        scale and the exponents were kept gets them as :meth:`load_state_dict` does."""
        self.__dict__.update(state)
        if "loss_scale" not in state:
            self.loss_scale = None
        if "_exp" not in state:
            self._exp = [2 / 3 if self.quantizer == "bhq" else 1.0] * self.history
        self._call_exponent = 1.0

    def key(self) -> tuple:
        """What must match for a tracker to be reused (or its state loaded)."""
        return (self.history, self.margin, self.per_row, self.overflow.value, self.quantizer)

    def predict(self) -> torch.Tensor | None:
        """This call's range, (R, 1) or (1, 1) > 0 and finite, in the history's dtype
        (float32; float64 once a float64 gradient was recorded); ``None`` without history.

        A row that was all zero in every recorded call gets the largest row's range
        (it has no range of its own to go by). ``absmax · margin`` past the dtype's largest
        value is that value (an infinite range made every code 0 and dequantized to
        ``0 · inf = NaN``: a review)."""
        if self._hist is None or self._count == 0 or self._hist.shape[1] == 0:
            return None
        seen = self._hist[: min(self._count, self.history)].amax(dim=0)  # (R,)
        top = seen.amax()
        if not bool(top > 0):
            return None
        seen = torch.where(seen > 0, seen, top)
        return (seen * self.margin).clamp(max=torch.finfo(seen.dtype).max).reshape(-1, 1)

    def quantize(self, y: torch.Tensor, fmt: Format, granularity: Granularity, rounding: Rounding,
                 seed: torch.Tensor, kernels: Kernels, exponent: float = 1.0) -> Encoded:
        """``y`` (the transformed operand, (R, D)) on ``fmt`` with this call's predicted
        range: dynamic while there is no history; on overflow clipped or quantized again
        with its own range (``overflow``). Counts the call in :attr:`stats` and records
        the observed range, with ``exponent`` (how ``y``'s range follows the gradient's:
        the transform's ``range_exponent``, for :meth:`rescale`); an empty ``y`` gives empty
        codes and is neither counted nor recorded. Raises ``ValueError`` for formats a
        predicted range cannot serve (module docstring)."""
        granularity, rounding = as_granularity(granularity), as_rounding(rounding)
        if fmt.block or fmt.asymmetric:
            raise ValueError(f"range='predicted' needs a symmetric integer or fp8 format (one "
                             f"scale per row or tensor); {fmt.name} has "
                             f"{'block scales' if fmt.block else 'an asymmetric grid'}")
        if y.numel() == 0:
            # nothing to quantize, no range to record or count: an empty batch must not
            # shrink a predicted range (a 0-column operand recorded zeros), nor a 0-row one
            # leave a history of no rows (the next prediction crashed: a review)
            return kernels.quantize(y, fmt, granularity, rounding, seed)
        st = RangeStats()  # this call's counts, added to stats (and to any open window) at its end
        self._call = st  # record() counts into it during the call
        self._call_exponent = exponent
        try:
            return self._quantize(y, fmt, granularity, rounding, seed, kernels, st)
        finally:
            self._call = None
            self._add(st)

    def _add(self, d: RangeStats) -> None:
        """Add one call's counts to :attr:`stats` (in place) and to every open
        :class:`lowbit.nn.RangeWindow` that counts this tracker."""
        self.stats.add_(d)
        for w in open_windows():
            w.count(self, d)

    def _quantize(self, y: torch.Tensor, fmt: Format, granularity: Granularity, rounding: Rounding,
                  seed: torch.Tensor, kernels: Kernels, st: RangeStats) -> Encoded:
        if self.per_row and self._hist is not None and self._hist.shape[1] != y.shape[0]:
            if self.frozen:  # a frozen history is kept: this call alone runs dynamic
                st.calls += 1
                st.dynamic_calls += 1
                return kernels.quantize(y, fmt, granularity, rounding, seed)
            # the layer changed shape (a vocabulary resized, a weight replaced): its history
            # describes other rows; start afresh, as a freshly converted layer would
            warnings.warn(f"predicted range: the operand now has {y.shape[0]} rows, the recorded "
                          f"history {self._hist.shape[1]} (the layer's output features changed); "
                          "its range history restarts (its next call dynamic, later ones predicted from the calls since)",
                          RuntimeWarning, stacklevel=user_stacklevel())
            self._hist, self._count = None, 0
        st.calls += 1
        amax = self.predict()
        if amax is None:
            st.dynamic_calls += 1
            a = y.abs()
            if self.per_row:
                self.record(a.amax(dim=1, keepdim=True) if a.shape[1] else a.new_zeros(a.shape[0], 1))
            else:
                self.record(a.amax().reshape(1, 1) if a.numel() else a.new_zeros(1, 1))
            return kernels.quantize(y, fmt, granularity, rounding, seed)
        # a float64 history's range on a float32 operand: at most float32's largest value; a
        # float32 history on a float64 operand (a Hadamard block moved to float64 for its
        # magnitudes) at most its own (clamping it to float64's raised: a review)
        amax = amax.clamp(max=min(torch.finfo(amax.dtype).max, torch.finfo(compute_dtype(y.dtype)).max))
        enc, observed, n_over, clipped_sq, total_sq = kernels.quantize_fixed(
            y, amax.to(y.device), fmt, rounding, seed)
        self.record(observed)
        finite = torch.isfinite(observed).reshape(-1)
        if not bool(finite.all()):
            # NaN/Inf groups propagate (their scale is the non-finite absmax); the finite
            # rows still get the overflow handling — clipped or requantized and counted —
            # as in a call without them (a review found them clipped silently)
            if not self.per_row and granularity is Granularity.ROW:
                # a per-tensor prediction for a per-row quantizer (PSQ's ∇X, whose rows do not
                # persist): the non-finite rows alone propagate, as on the dynamic path (a
                # review: one NaN row made every row NaN)
                dt = enc.scale.dtype  # the compute dtype, in which quantize_fixed took its step
                row_amax = y.abs().amax(dim=1, keepdim=True).to(dt)  # (R, 1)
                finite = torch.isfinite(row_amax).reshape(-1)
                step = grid_step(amax.to(device=y.device, dtype=dt), fmt.emax)  # the finite rows' step
                enc.scale = torch.where(finite[:, None], step.expand(y.shape[0], 1), row_amax)
                amax = amax.expand(y.shape[0], 1)
            if not (bool(finite.all()) or (finite.shape[0] == y.shape[0] and bool(finite.any()))):
                return enc
            rows = y[finite].to(compute_dtype(y.dtype)).abs()
            excess = (rows - amax.to(y.device)[finite].to(rows.dtype)).clamp_min(0)
            n_over, clipped_sq, total_sq = (excess > 0).sum(), excess.double().square().sum(), \
                rows.double().square().sum()  # float64, as quantize_fixed's sums
            st.elements += rows.numel()
        else:
            st.elements += y.numel()
        n_over = int(n_over)
        st.overflow_elements += n_over
        unit = (self.loss_scale or 1.0)**2  # (a trial: the same training under a GradScaler reported 5e5× the mass)
        st.total_sq += float(total_sq) / unit
        if n_over:
            st.overflow_calls += 1
            if self.overflow is Overflow.REQUANTIZE:
                st.requantized_calls += 1
                return kernels.quantize(y, fmt, granularity, rounding, seed)
            st.clipped_sq += float(clipped_sq) / unit
        return enc

    def record(self, observed: torch.Tensor) -> None:
        """Add one call's absmax ((R, 1) or (1, 1)) to the history (not when frozen or
        non-finite), kept in the gradient's compute dtype: float32, float64 for float64
        (a float32 history turned finite float64 ranges past 3.4e38 into Inf, counted as
        non-finite, and those below 1e-45 into 0)."""
        obs = observed.detach().reshape(-1)
        obs = obs.to(compute_dtype(obs.dtype))
        if obs.numel() == 0:  # an empty operand has no range to record
            return
        if not bool(torch.isfinite(obs).all()):
            if self._call is not None:
                self._call.nonfinite_calls += 1
            else:
                self._add(RangeStats(nonfinite_calls=1))
            return
        if self.frozen:
            return
        if self._hist is None:
            self._hist = obs.new_zeros(self.history, obs.numel())
        elif self._hist.shape[1] != obs.numel():
            raise ValueError(
                f"predicted range: this tracker holds {self._hist.shape[1]} rows, the gradient "
                f"has {obs.numel()}; per-row ranges need the same rows every call")
        if obs.dtype == torch.float64 and self._hist.dtype != torch.float64:
            self._hist = self._hist.double()  # float32 ranges are exact in float64
        self._hist[self._count % self.history] = obs.to(self._hist.device, self._hist.dtype)
        self._exp[self._count % self.history] = self._call_exponent if self._call is not None else 1.0
        self._count += 1

    def clear_history(self) -> None:
        """Forget every recorded range (the counters stay): the next call is dynamic."""
        self._hist, self._count = None, 0
        self._exp = [1.0] * self.history

    def rescale(self, factor: float) -> None:
        """The gradients' unit changed by ``factor`` > 0 (finite; a real number, NumPy
        scalar or one-element tensor), e.g. a loss scale went from ``s`` to ``factor·s``
        (:mod:`lowbit.amp`): each recorded range is multiplied by ``factor`` to the power
        its call recorded (the transform's ``range_exponent``: 1 for PTQ, PSQ and Hadamard,
        exact for powers of two; 2/3 for BHQ's transform, to float rounding — 1 for its
        groups of one), and :attr:`loss_scale` by ``factor``. ``ValueError`` for another
        ``factor``."""
        f = real(factor)
        if f is None or not (math.isfinite(f) and f > 0):
            raise ValueError(f"rescale factor must be a finite number > 0, got {factor!r}")
        if self._hist is not None:
            if all(e == 1 for e in self._exp):
                self._hist.mul_(f)
            else:
                self._hist.mul_(torch.tensor([f**e for e in self._exp], dtype=self._hist.dtype,
                                             device=self._hist.device)[:, None])
        if self.loss_scale is not None:
            self.loss_scale *= f

    def state_dict(self) -> dict[str, Any]:
        return {"hist": None if self._hist is None else self._hist.clone(), "count": self._count,
                "stats": asdict(self.stats), "key": list(self.key()), "loss_scale": self.loss_scale,
                "exponents": list(self._exp)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, mine = tuple(state["key"]), self.key()
        if saved != mine:
            raise ValueError(f"range state was saved with (history, margin, per_row, overflow, "
                             f"quantizer) = {saved}, this tracker has {mine}")
        self._hist = None if state["hist"] is None else state["hist"].clone()
        self._count = int(state["count"])
        self.stats = RangeStats(**state["stats"])
        ls = state.get("loss_scale")  # saved before it was kept: not known (a GradScaler adopts its own)
        # (not known, where a scaler already took it to be one: that one — a loop's own
        # restore_ranges of a snapshot taken before put None back, a review)
        self.loss_scale = getattr(self, "assumed_loss_scale", None) if ls is None else float(ls)
        exps = state.get("exponents")  # saved before: BHQ's transform's (its usual) or 1
        self._exp = [float(e) for e in exps] if isinstance(exps, list) and len(exps) == self.history else \
            [2 / 3 if self.quantizer == "bhq" else 1.0] * self.history


__all__ = ["Overflow", "RangeMode", "RangeStats", "RangeTracker", "check_range_settings"]
