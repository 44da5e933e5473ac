"""Loss scaling with predicted gradient ranges: :class:`GradScaler`.

``torch.amp.GradScaler`` multiplies the loss by a scale ``s`` before ``backward`` and
skips the optimizer step when a gradient overflowed, halving ``s`` (growing it after a
run of good steps). A model converted with a ``*-predicted`` recipe (docs/METHOD.md §4.5)
keeps, per layer, a history of the gradients' absmax — in units of the loss scale of the
step that recorded it. With torch's scaler alone, two things go silently wrong:

* a skipped step still records its (finite) ranges: at ``s = 2^16`` on a float16 model
  the history then holds ranges about 10× those of later steps, and the next ``history``
  calls quantize on a grid that much too coarse (about 3 of 8 bits lost);
* a change of ``s`` by a factor ``f`` leaves the history off by ``f``: after a growth
  step (``f = 2``) every prediction is half the real range (overflow: requantized or
  clipped), after a backoff twice too coarse.

:class:`GradScaler` is ``torch.amp.GradScaler`` with both fixed: it snapshots the
model's range histories at the first :meth:`scale` of a step (as lowbit's trainer does,
:func:`lowbit.nn.snapshot_ranges`), and in :meth:`update` restores them when the step
was skipped and rescales them by the scale's change (:func:`lowbit.nn.rescale_ranges`:
exact for PTQ, PSQ and Hadamard, whose factors are powers of two by default; BHQ's
transformed ranges follow the gradient's as ``c^(2/3)``, rescaled so, to float rounding).
Each tracker also keeps the loss scale its history is in (``loss_scale``): at the first
:meth:`scale` of a step a history in other units — recorded without loss scaling, or
loaded — is brought to this scale, and the counters' sums of squares
(:class:`lowbit.ranges.RangeStats`) are kept in the unscaled loss's units. Models without
predicted ranges are unaffected (nothing to keep).

A step counts as skipped when :meth:`update` lowered the scale (torch's backoff, which
happens exactly when an inf/NaN was found). With an explicit ``update(new_scale)`` that
signal is gone: the histories are rescaled but a skipped step is not undone — call
:func:`lowbit.nn.snapshot_ranges` / ``lowbit.nn.restore_ranges(snapshot, counters=False)``
yourself then.
:meth:`update` reads the scale to the host twice (``get_scale()`` before and after
torch's update: two device syncs on a GPU).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .kernels import compiled
from .nn import RangeSnapshot, fqt_blocks, rescale_ranges, restore_ranges, snapshot_ranges


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler(device, *args, **kwargs)`` that keeps ``model``'s predicted
    gradient ranges in step with the loss scale (module docstring).

    Use it as torch's, with the model first::

        scaler = lowbit.amp.GradScaler(model, "cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    ``model``: the converted ``nn.Module`` whose layers' range histories to keep (the
    one the scaled loss is computed from). ``TypeError`` if it is not an ``nn.Module``.
    Gradient accumulation works as with torch's: the snapshot is taken at the first
    :meth:`scale` after an :meth:`update`. Inside ``torch.compile`` that snapshot runs
    eagerly (traced, its counters guarded the graph: a recompile every step)."""

    def __init__(self, model: nn.Module, device: str = "cuda", *args: Any, **kwargs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradScaler(model, ...): model must be an nn.Module (the converted "
                            f"model), got {type(model).__name__}")
        super().__init__(device, *args, **kwargs)  # torch's positional order after the model
        self.model = model
        self._ranges: RangeSnapshot | None = None
        self._known_scale: float | None = None  # the scale as update() read it (None: _init_scale's)

    def scale(self, outputs):  # noqa: ANN001, ANN201 - torch's signature
        if self.is_enabled() and self._ranges is None:
            self._begin_step()
        return super().scale(outputs)

    @compiled.disable_tracing
    def _begin_step(self) -> None:
        """The step's snapshot; every history brought to the current scale's units, and the
        layers told the scale (their new trackers start in it). A history whose unit is not
        known (a range state saved before trackers kept it) is taken to be in this scale's,
        with a warning."""
        s = float(self._init_scale if self._known_scale is None else self._known_scale)
        unknown = 0
        for m in fqt_blocks(self.model).values():
            m.loss_scale = s
            for t in m.range_trackers.values():
                if t.loss_scale is None:  # (kept as assumed: a restore of the unknown state keeps it, a review)
                    t.loss_scale = t.assumed_loss_scale = s
                    unknown += 1
                elif t.loss_scale != s and s > 0:
                    t.rescale(s / t.loss_scale)
        if unknown:
            warnings.warn(f"lowbit.amp.GradScaler: {unknown} predicted-range histories do not say which loss "
                          f"scale they were recorded at (a range state saved before lowbit kept it); they are "
                          f"taken to be at this scaler's ({s:g})", RuntimeWarning, stacklevel=3)
        self._ranges = snapshot_ranges(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._known_scale = None  # the loaded scale (torch keeps it as _init_scale)

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        if not self.is_enabled():
            return super().update(new_scale)
        old = self.get_scale()
        super().update(new_scale)
        new = self.get_scale()
        snapshot, self._ranges = self._ranges, None
        if new_scale is None and new < old and snapshot is not None:  # torch's backoff: skipped
            restore_ranges(snapshot, counters=False)  # its non-finite calls stay counted
        if new != old and old > 0 and new > 0:
            rescale_ranges(self.model, new / old)
            for m in fqt_blocks(self.model).values():
                m.loss_scale = new
        self._known_scale = new


__all__ = ["GradScaler"]
