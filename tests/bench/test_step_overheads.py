"""Per-step overheads found by profiling the training step (issue 14), each pinned by the
exact count of the ops that caused it."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n, scale", [(256, 1.0), (200, 1.0), (64, 1e-25), (128, 1e35), (5, 1.0)])
def test_hadamard_folded_signs_are_bitwise_the_signs_apart(n: int, scale: float, dtype: torch.dtype) -> None:
    """The Hadamard transform folds its random signs into each block's matrix (one
    batched GEMM instead of a sign pass and a GEMM; 2× faster at the text model's shapes):
    forward ``H·(s ⊙ x)`` and inverse ``s ⊙ (H·y)`` stay bitwise what they were, padded
    rows, float64 blocks (tiny or huge values) and every dtype included."""
    from lowbit.quantizers.hadamard import Hadamard, hadamard_matrix

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, 48, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = Hadamard().transform(x, torch.Generator().manual_seed(1))
    b = t.block
    wide = x.dtype == torch.float64 or scale != 1.0  # beyond [2⁻⁶⁰, 2¹⁰⁰]: float64 blocks
    dt = torch.float64 if wide else torch.float32
    xs = torch.cat([x.to(dt), x.new_zeros(t.signs.shape[0] - n, 48, dtype=dt)]) * t.signs[:, None].to(dt)
    h = hadamard_matrix(b).to(dt)
    want = torch.matmul(h, xs.reshape(-1, b, 48)).reshape(-1, 48)  # H·(s ⊙ x), signs apart
    got = t.forward(x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    y = torch.randn(t.signs.shape[0], 24, generator=g, dtype=torch.float64).to(dt) * scale
    want_inv = (torch.matmul(h, y.reshape(-1, b, 24)).reshape(-1, 24) * t.signs[:, None].to(dt))[:n]
    assert torch.equal(t.inverse(y, dt), want_inv)
