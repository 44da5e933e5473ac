"""Fast kernels against the reference on the same random stream: compiled quantizers
give identical codes, the fused epilogue equal values; the noise is uniform."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import counter_uniform
from lowbit.kernels import compiled, reference


@pytest.fixture
def force_compiled(monkeypatch: pytest.MonkeyPatch):
    if not compiled.enabled():
        pytest.skip("torch.compile disabled (LOWBIT_COMPILE=0 or unavailable)")
    monkeypatch.setattr(compiled, "MIN_NUMEL", 0)
    yield


@pytest.mark.parametrize("per_row", [True, False], ids=["row", "tensor"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_compiled_quantizer_equals_reference(force_compiled, per_row: bool, layout: str) -> None:
    x = torch.randn(96, 200) * torch.logspace(-3, 1, 96)[:, None]
    x[5] = 0.0
    if layout == "transposed":
        x = x.t()  # the ∇W path quantizes ∇Yᵀ without copying it
    seed = torch.tensor(987654321, dtype=torch.int64)
    for stochastic in (True, False):
        c1, s1 = compiled.quantize_codes(x, 7, per_row, stochastic, seed)
        c2, s2 = reference.quantize_codes(x, 7, per_row, stochastic, seed)
        assert torch.equal(c1, c2) and torch.equal(s1, s2)
    assert compiled._compiled.get("quantize_codes") is not None


def test_compiled_epilogue_equals_reference(force_compiled) -> None:
    acc = torch.randint(-(2**20), 2**20, (64, 48), dtype=torch.int32)
    a, b = torch.rand(64, 1), torch.rand(1, 48)
    torch.testing.assert_close(compiled.dequantize_acc(acc, a, b), reference.dequantize_acc(acc, a, b))


def test_counter_noise_is_uniform_and_seed_dependent() -> None:
    n = 200_000
    u = counter_uniform((n,), torch.tensor(1)).double()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    # mean 1/2 and variance 1/12 within 5 standard errors (se of mean: √(1/12/n))
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # Var(u²-ish) bound
    hist = torch.histc(u.float(), bins=20, min=0, max=1)
    expected = n / 20
    # χ² with 19 dof: mean 19, sd ≈ 6.2; 19 + 5·6.2 ≈ 50
    assert float(((hist - expected) ** 2 / expected).sum()) < 50
    # neighbouring elements and different seeds are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 5 / n**0.5
    v = counter_uniform((n,), torch.tensor(2)).double()
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 5 / n**0.5


def test_bhq_fast_transform_equals_reference(force_compiled) -> None:
    from lowbit.quantizers.bhq import bhq_transform

    x = torch.randn(64, 40) * torch.logspace(-4, 0, 64)[torch.randperm(64)][:, None]
    t = bhq_transform(x)
    y_ref, y_fast = t.forward(x), None
    t.use_compiled = True
    y_fast = t.forward(x)
    # different summation order (sparse product vs scatter-add): float32 rounding only
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6 * float(y_ref.abs().max()))
    torch.testing.assert_close(t.inverse(y_fast), x, rtol=1e-4, atol=1e-6 * float(x.abs().max()))
    # the fused transform + quantize kernel gives the reference's codes
    from lowbit.kernels import Backend

    seed = torch.tensor(42)
    fast = t.forward_quantize(x, 7, True, True, seed, Backend.AUTO)
    t.use_compiled = False
    ref = t.forward_quantize(x, 7, True, True, seed, Backend.REFERENCE)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
