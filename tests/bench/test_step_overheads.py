"""Per-step overheads found by profiling the training step (issue 14), each pinned by the
exact count of the ops that caused it."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit


class OpCounter(TorchDispatchMode):
    """Counts aten ops by overload packet name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_backward_fills_no_zero_gradients_for_saved_codes() -> None:
    """Only the block's output y carries a gradient: autograd must not materialise zero
    gradients for the four saved outputs (codes and steps of x and W); it filled four
    (rows, cols)-sized zeros per layer backward before (3% of an FFN step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    lowbit.convert(model, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    x = torch.randn(40, 32, requires_grad=True)
    loss = model(x).square().mean()
    with OpCounter() as ops:
        loss.backward()
    assert ops.counts.get("zeros", 0) == 0
    assert ops.counts.get("zeros_like", 0) == 0
    assert ops.counts["block_backward"] == 2  # both layers' backward ran, once each
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
