"""Low-precision updates: stochastic rounding to bfloat16 is unbiased, keeps updates
that round-to-nearest loses, and SRSGD trains bfloat16 weights with no float32 copy."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unbiased
from torch import nn

from lowbit.optim import SRSGD, bytes_per_parameter, stochastic_round_bf16


def test_stochastic_round_bf16_is_unbiased_and_on_grid() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, generator=g) * torch.logspace(-20, 20, 64)
    x[0] = -x[0]
    draws = torch.stack([stochastic_round_bf16(x, g).float() for _ in range(2000)])
    assert draws.dtype == torch.float32 and torch.equal(draws, draws.bfloat16().float())
    assert_unbiased(draws, x)  # 5σ z-test (see conftest)
    lo, hi = draws.amin(0), draws.amax(0)
    assert torch.all(hi.bfloat16().float() == hi) and torch.all(lo <= x) and torch.all(x <= hi)


def test_non_finite_values_are_kept() -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0])
    y = stochastic_round_bf16(x).float()
    assert torch.isnan(y[0]) and y[1] == float("inf") and y[2] == -float("inf") and y[3] == 1.0


def test_small_updates_survive_in_expectation() -> None:
    # 1 + 1e-4 is 1 in bfloat16 (ulp 2^-7): round-to-nearest loses every such update.
    w = torch.ones(4096)
    step = torch.full_like(w, 1e-4)
    rtn = (w + step).bfloat16().float()
    sr = stochastic_round_bf16(w + step, torch.Generator().manual_seed(1)).float()
    assert torch.equal(rtn, w)
    # mean of 4096 draws of {1, 1 + 2^-7}: within 5σ of 1 + 1e-4
    se = (2**-7) * (1e-4 / 2**-7) ** 0.5 / 4096**0.5
    assert abs(float(sr.mean()) - (1 + 1e-4)) < 5 * se


def test_srsgd_trains_bf16_weights_without_fp32_copy() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(torch.bfloat16)
    opt = SRSGD(model.parameters(), lr=0.05, momentum=0.9, generator=torch.Generator().manual_seed(0))
    x = torch.randn(128, 8).bfloat16()
    y = x.float().sum(1, keepdim=True).bfloat16()
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = (model(x).float() - y.float()).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.2 * losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(s["momentum"].dtype == torch.bfloat16 for s in opt.state.values())
    assert bytes_per_parameter(opt) == 4.0  # 2 (weight) + 2 (momentum)


def test_srsgd_validation() -> None:
    with pytest.raises(TypeError, match="keeps weights in bfloat16"):
        SRSGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr must be > 0"):
        SRSGD(nn.Linear(2, 2).bfloat16().parameters(), lr=0)
