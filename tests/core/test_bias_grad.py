"""The bias gradient of linear and convolution blocks (``lowbit.functional.bias_grad``):
the float sum autograd forms, with no float32 copy of a bf16/fp16 gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lowbit
from lowbit import functional


class _LargestFloat32(TorchDispatchMode):
    """Records the largest float32 tensor any op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.numel = max(self.numel, t.numel())
        return out


@pytest.mark.parametrize("shape", [(37, 5), (6, 3, 4, 5), (1, 7), (9, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradient_sum_in_pieces_is_exact(monkeypatch: pytest.MonkeyPatch, shape: tuple,
                                              dtype: torch.dtype) -> None:
    """Small integers: every partial sum is exact in float32, so the pieces' sum must equal
    the one-piece float32 sum bitwise (a piece left out or counted twice shows)."""
    monkeypatch.setattr(functional, "BIAS_CHUNK", 2 * shape[1] + 1)  # several pieces
    g = torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = functional.bias_grad(g)
    want = g.float().sum((0, *range(2, g.dim())))
    assert got.dtype == torch.float32 and got.shape == (shape[1],)
    assert torch.equal(got, want)


def test_no_float32_copy_of_the_whole_gradient() -> None:
    g = torch.randn(4 * functional.BIAS_CHUNK // 256, 256, dtype=torch.bfloat16)
    with _LargestFloat32() as seen:
        got = functional.bias_grad(g)
    assert seen.numel <= functional.BIAS_CHUNK < g.numel()
    # not the same summation order as one float32 sum: float32 rounding, 1e-6 relative
    # to the sum of magnitudes per column (the worst-case bound of n·eps is far looser)
    scale = g.float().abs().sum(0)
    assert torch.allclose(got, g.float().sum(0), rtol=0, atol=float(scale.max()) * 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_float_gradient_sum_in_its_own_dtype(dtype: torch.dtype) -> None:
    g = torch.randn(33, 6, 2, dtype=dtype, generator=torch.Generator().manual_seed(1))
    got = functional.bias_grad(g)
    assert got.dtype == dtype and torch.equal(got, g.sum((0, 2)))


def test_float64_bias_gradient_is_not_summed_in_float32() -> None:
    """1 + 1e-12 per row: float32 loses the 1e-12 terms, float64 keeps them."""
    g = torch.full((1000, 1), 1 + 1e-12, dtype=torch.float64)
    assert functional.bias_grad(g).item() == pytest.approx(1000 * (1 + 1e-12), rel=0, abs=1e-12)
    assert float(g.sum(0, dtype=torch.float32)) == 1000.0  # what a float32 sum gave


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_layer_bias_gradient_is_the_float_one(layer: str) -> None:
    """The bias gradient is not quantized: a converted layer's equals ``∇Y`` summed, which
    an fp32 model's autograd computes (float64 model: exactly, to float64 rounding)."""
    torch.manual_seed(0)
    m = (nn.Linear(6, 4) if layer == "linear" else nn.Conv2d(3, 4, 3, padding=1)).double()
    x = torch.randn(5, 6, dtype=torch.float64) if layer == "linear" \
        else torch.randn(2, 3, 5, 5, dtype=torch.float64)
    g = torch.randn_like(m(x))
    q = lowbit.convert(nn.Sequential(m), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))[0]
    q(x).backward(g)
    want = g.sum((0, *range(2, g.dim())))
    assert q.bias.grad.dtype == torch.float64
    assert torch.allclose(q.bias.grad, want, rtol=1e-15, atol=1e-15)
