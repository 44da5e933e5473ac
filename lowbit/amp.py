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
was skipped and multiplies them by the scale's change (exact: the factors are powers of
two by default). Models without predicted ranges are unaffected (nothing to keep).

A step counts as skipped when :meth:`update` lowered the scale (torch's backoff, which
happens exactly when an inf/NaN was found). With an explicit ``update(new_scale)`` that
signal is gone: the histories are rescaled but a skipped step is not undone — call
:func:`lowbit.nn.snapshot_ranges` / ``lowbit.nn.restore_ranges(snapshot, counters=False)``
yourself then.
:meth:`update` reads the scale to the host twice (``get_scale()`` before and after
torch's update: two device syncs on a GPU).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .nn import RangeSnapshot, rescale_ranges, restore_ranges, snapshot_ranges


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler(device, **kwargs)`` that keeps ``model``'s predicted
    gradient ranges in step with the loss scale (module docstring).

    Use it exactly as torch's::

        scaler = lowbit.amp.GradScaler(model, "cuda")
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    ``model``: the converted ``nn.Module`` whose layers' range histories to keep (the
    one the scaled loss is computed from). ``TypeError`` if it is not an ``nn.Module``.
    Gradient accumulation works as with torch's: the snapshot is taken at the first
    :meth:`scale` after an :meth:`update`."""

    def __init__(self, model: nn.Module, device: str = "cuda", **kwargs: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradScaler(model, ...): model must be an nn.Module (the converted "
                            f"model), got {type(model).__name__}")
        super().__init__(device, **kwargs)
        self.model = model
        self._ranges: RangeSnapshot | None = None

    def scale(self, outputs):  # noqa: ANN001, ANN201 - torch's signature
        if self.is_enabled() and self._ranges is None:
            self._ranges = snapshot_ranges(self.model)
        return super().scale(outputs)

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


__all__ = ["GradScaler"]
