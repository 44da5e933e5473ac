"""Per-step overheads found by profiling the training step (issue 14), each pinned by the
exact count of the ops that caused it."""

from __future__ import annotations

import math

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
@pytest.mark.parametrize("n, scale", [(256, 1.0), (200, 1.0), (64, 1e-25), (128, 1e35), (5, 1.0), (3, 1.0)])
def test_hadamard_butterflies_are_the_orthonormal_sylvester_transform(n: int, scale: float,
                                                                      dtype: torch.dtype) -> None:
    """The Hadamard transform runs as the fast Walsh–Hadamard butterflies (``b·log₂ b``
    additions per column instead of a ``b × b`` matrix product; fused with the quantizer
    on AVX-512): forward ``H·(s ⊙ x)`` and inverse ``s ⊙ (H·y)`` equal the product with
    the orthonormal Sylvester matrix to float rounding (float32: 2⁻²⁰ relative to the
    block's norm, a few ulps of ``log₂ b`` additions), padded rows zero, float64 where
    a block's largest value is outside [2⁻⁶⁰, 2¹⁰⁰] (in float64 exact to 1e-12), and
    the inverse undoes the forward."""
    from lowbit.quantizers.hadamard import Hadamard, hadamard_matrix

    g = torch.Generator().manual_seed(n)
    x = (torch.randn(n, 48, generator=g, dtype=torch.float64) * scale).to(dtype)
    t = Hadamard().transform(x, torch.Generator().manual_seed(1))
    b, rows = t.block, t.signs.shape[0]
    wide = x.dtype == torch.float64 or scale != 1.0  # beyond [2⁻⁶⁰, 2¹⁰⁰]: float64 blocks
    dt = torch.float64 if wide else torch.float32
    xs = torch.cat([x.double(), x.new_zeros(rows - n, 48, dtype=torch.float64)]) * t.signs[:, None].double()
    h = (hadamard_matrix(b) * math.sqrt(b)).round().double() / math.sqrt(b)  # ±1/√b in float64
    want = torch.matmul(h, xs.reshape(-1, b, 48)).reshape(-1, 48)  # H·(s ⊙ x) in float64
    got = t.forward(x)
    tol = 1e-12 if wide else 2.0**-20
    norm = xs.reshape(-1, b, 48).norm(dim=1, keepdim=True).expand(-1, b, 48).reshape(-1, 48)
    assert got.dtype == dt and got.shape == (rows, 48)
    assert bool(((got.double() - want).abs() <= tol * norm).all())
    y = torch.randn(rows, 24, generator=g, dtype=torch.float64) * scale
    want_inv = (torch.matmul(h, y.reshape(-1, b, 24)).reshape(-1, 24) * t.signs[:, None].double())[:n]
    got_inv = t.inverse(y.to(dt), torch.float64)
    ynorm = y.reshape(-1, b, 24).norm(dim=1, keepdim=True).expand(-1, b, 24).reshape(-1, 24)[:n]
    assert bool(((got_inv - want_inv).abs() <= tol * ynorm).all())
    back = t.inverse(got, torch.float64)  # T⁻¹ T x = x
    assert bool(((back - x.double()).abs() <= 4 * tol * norm[:n]).all())
