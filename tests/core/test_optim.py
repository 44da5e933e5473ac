"""Low-precision updates: stochastic rounding to bfloat16 and to int8 (per-channel
power-of-two scales for weights, blockwise scales for state) is unbiased, keeps updates
that round-to-nearest loses, and SRSGD / SRAdamW train with no float32 copy; memory is
accounted exactly, non-finite values stay non-finite, and checkpoints resume bitwise."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import assert_unbiased
from torch import nn

from lowbit.optim import (
    BLOCK_SIZE,
    SRSGD,
    SRAdamW,
    bytes_per_parameter,
    decode_int8_blockwise,
    decode_int8_per_channel,
    encode_int8_blockwise,
    encode_int8_per_channel,
    memory_breakdown,
    stochastic_round_bf16,
)


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


@pytest.mark.parametrize("bits", [0x7FFFFFFF, 0xFFFFFFFF, 0x7FFF8001, 0xFFFF8001, 0x7FFF8000, 0x7FFF4000,
                                  0x7FFF0001, 0x7FC00000],
                         ids=hex)
def test_nan_of_any_payload_stays_nan(bits: int) -> None:
    """A NaN whose bits lie near int32's top (CUDA's canonical 0x7FFFFFFF) wrapped past it
    in the rounding sum to ±0: a NaN gradient zeroed the weight and the optimizer state.
    Every draw of every NaN pattern stays NaN, in the optimizers too."""
    v = torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)
    assert torch.isnan(v).all()
    x = v.expand(1000).clone()
    assert torch.isnan(stochastic_round_bf16(x, torch.Generator().manual_seed(0))).all()
    for opt in (lambda ps: SRSGD(ps, lr=0.1, momentum=0.9), lambda ps: SRAdamW(ps, lr=0.1)):
        p = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        o = opt([p])
        p.grad_dtype = None  # a float32 gradient holding that NaN
        g = torch.zeros(4)
        g[0] = v[0]
        p.grad = g
        o.step()
        assert torch.isnan(p[0]) and torch.isfinite(p[1:]).all()
        assert all(torch.isnan(t.float().flatten()[0]) for t in o.state[p].values() if isinstance(t, torch.Tensor))


def test_settings_the_update_cannot_compute_with_are_refused_at_once() -> None:
    """Strings, Fraction/Decimal and tensors of other shapes were taken by float() when the
    optimizer was built and failed inside a step, after earlier groups were updated."""
    from decimal import Decimal
    from fractions import Fraction

    a = nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    for kw in ({"lr": "0.1"}, {"lr": Fraction(1, 10)}, {"lr": Decimal("0.1")}, {"lr": torch.tensor([[0.1]])},
               {"lr": 0.1, "momentum": "0.9"}, {"lr": 0.1, "weight_decay": "0.01"}):
        with pytest.raises(ValueError, match="must be"):
            SRSGD([a], **kw)
    for kw in ({"lr": 0.1, "betas": ("0.9", "0.999")}, {"lr": 0.1, "eps": "1e-8"}):
        with pytest.raises(ValueError, match="must be"):
            SRAdamW([a], **kw)
    import numpy as np
    SRSGD([a], lr=np.float32(0.1), momentum=torch.tensor(0.9))  # NumPy scalars and 0-d tensors: taken


def test_positional_arguments_follow_torch_optims_order() -> None:
    """A review: ``SRSGD(params, 0.1, 0.9, 0.5)`` took 0.5 as weight decay where
    ``torch.optim.SGD`` takes it as dampening (weights shrank 5% a step, silently). The
    positional order is torch's: SGD's ``dampening`` / ``nesterov`` and AdamW's ``amsgrad``
    are refused unless neutral; the generator and storage formats are keyword-only."""
    a = nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dampening=0.5"):
        SRSGD([a], 0.1, 0.9, 0.5)
    with pytest.raises(ValueError, match="nesterov=True"):
        SRSGD([a], 0.1, 0.9, 0, 0, True)
    with pytest.raises(ValueError, match="amsgrad=True"):
        SRAdamW([a], 1e-3, (0.9, 0.999), 1e-8, 0.01, True)
    with pytest.raises(TypeError):
        SRSGD([a], 0.1, 0.9, 0, 0.01, False, torch.Generator())  # generator= only by keyword
    o = SRSGD([a], 0.1, 0.9, 0, 0.01, False)  # torch.optim.SGD(params, lr, momentum, dampening, weight_decay, nesterov)
    t = torch.optim.SGD([nn.Parameter(torch.ones(4, 4))], 0.1, 0.9, 0, 0.01, False)
    assert {k: o.param_groups[0][k] for k in ("lr", "momentum", "weight_decay")} == \
        {k: t.param_groups[0][k] for k in ("lr", "momentum", "weight_decay")}
    w = SRAdamW([a], 1e-3, (0.8, 0.9), 1e-6, 0.05, False)
    assert (w.param_groups[0]["betas"], w.param_groups[0]["eps"], w.param_groups[0]["weight_decay"]) == \
        ((0.8, 0.9), 1e-6, 0.05)


def test_state_of_another_shape_is_refused_when_loaded() -> None:
    a, b = (nn.Parameter(torch.randn(4, 4).bfloat16()) for _ in range(2))
    o = SRSGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9, weights="int8", state="int8")
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    o.step()
    c = nn.Parameter(torch.randn(8, 2).bfloat16())
    o2 = SRSGD([{"params": [a]}, {"params": [c]}], lr=0.1, momentum=0.9, weights="int8", state="int8")
    with pytest.raises(ValueError, match=r"parameter 1 .* is \(4, 4\), but that parameter is \(8, 2\)"):
        o2.load_state_dict(o.state_dict())
    assert all(t.shape == c.shape for k, t in o2.state.get(c, {}).items()  # nothing loaded
               if isinstance(t, torch.Tensor) and not k.endswith("_scale"))


def test_meta_parameters_are_refused_by_name() -> None:
    p = nn.Parameter(torch.empty(4, 4, dtype=torch.bfloat16, device="meta"))
    o = SRSGD([p], lr=0.1)
    p.grad = torch.empty_like(p)
    with pytest.raises(RuntimeError, match="meta device"):
        o.step()


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
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(s["momentum"].dtype == torch.bfloat16 for s in opt.state.values())
    assert bytes_per_parameter(opt) == 4.0  # 2 (weight) + 2 (momentum)


def test_srsgd_validation() -> None:
    with pytest.raises(TypeError, match="keeps weights in bfloat16"):
        SRSGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr must be a finite number ≥ 0, got -0.1"):
        SRSGD(nn.Linear(2, 2).bfloat16().parameters(), lr=-0.1)
    SRSGD(nn.Linear(2, 2).bfloat16().parameters(), lr=0)  # as torch.optim.SGD (a schedule's end)


def test_param_group_settings_are_checked_as_the_defaults_are() -> None:
    """A param group's own lr, momentum, weight decay, betas or eps, given at construction,
    added later or changed before a step, is checked like the defaults: a group with
    lr = -1 used to be accepted and step the weights uphill."""
    a, b = nn.Linear(2, 2).bfloat16(), nn.Linear(2, 2).bfloat16()
    for bad, match in [({"lr": -1.0}, "param group 1: lr must be a finite number ≥ 0, got -1.0"),
                       ({"momentum": -0.5}, "param group 1: momentum must be a finite number ≥ 0, got -0.5"),
                       ({"momentum": float("nan")}, "param group 1: momentum must be a finite number ≥ 0, got nan"),
                       ({"weight_decay": -1.0}, "param group 1: weight_decay must be a finite")]:
        with pytest.raises(ValueError, match=match):
            SRSGD([{"params": a.parameters()}, {"params": b.parameters(), **bad}], lr=0.1)
    with pytest.raises(ValueError, match="param group 1: betas must be two numbers in"):
        SRAdamW([{"params": a.parameters()}, {"params": b.parameters(), "betas": (1.5, 2)}], lr=0.1)
    opt = SRSGD(a.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="param group 1: lr must be"):
        opt.add_param_group({"params": b.parameters(), "lr": float("nan")})
    assert len(opt.param_groups) == 1  # the refused group is not kept
    opt.param_groups[0]["lr"] = -1.0  # by hand, after construction
    a(torch.randn(3, 2, dtype=torch.bfloat16)).sum().backward()
    before = [p.clone() for p in a.parameters()]
    with pytest.raises(ValueError, match="param group 0: lr must be a finite number ≥ 0, got -1.0"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))  # nothing updated
    # numbers torch.optim takes: a tensor or NumPy lr
    import numpy as np

    SRSGD(b.parameters(), lr=torch.tensor(0.1), momentum=np.float32(0.9))
    with pytest.raises(ValueError, match="lr must be a finite number ≥ 0, got 'fast'"):
        SRSGD(b.parameters(), lr="fast")


# ------------------------------------------------------------------ int8 storage formats


def test_int8_per_channel_encode_is_unbiased_and_exact_in_bf16() -> None:
    g = torch.Generator().manual_seed(2)
    mags = torch.tensor([1e-30, 1e-6, 1e-2, 1.0, 3e2, 1e20, 1e-39])  # last row: subnormal
    x = torch.randn(7, 3, 5, generator=g) * mags[:, None, None]
    x[3, 0, 0] = -x[3].abs().amax()  # a value on the edge of the grid (code -127)
    x = torch.cat([x, torch.zeros(1, 3, 5)])  # an all-zero row
    draws = []
    for _ in range(2000):
        codes, scale = encode_int8_per_channel(x, g)
        draws.append(decode_int8_per_channel(codes, scale))
    draws = torch.stack(draws)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scale.dtype == torch.float32
    assert torch.equal(torch.frexp(scale).mantissa, torch.full_like(scale, 0.5))  # powers of 2
    assert torch.equal(draws, draws.bfloat16().float())  # codes·2^k is a bfloat16 number
    assert scale[-1] == 1 and not draws[:, -1].any()
    for row in range(7):  # rows one at a time: their magnitudes differ by up to 1e59
        assert_unbiased(draws[:, row], x[row])  # 5σ z-test (see conftest)


@pytest.mark.parametrize("shape", [(5, 0), (0, 5), (5, 0, 3), (0, 0)])
def test_int8_encodings_of_tensors_with_no_elements(shape: tuple[int, ...]) -> None:
    """A weight with no columns (``(5, 0)``) raised ``amax()``'s IndexError (a review):
    its channels have range 0, scale 1, and decode to the same empty shape."""
    x = torch.zeros(shape)
    codes, scale = encode_int8_per_channel(x)
    assert codes.shape == shape and scale.shape == (shape[0],) and bool((scale == 1).all())
    assert decode_int8_per_channel(codes, scale).shape == shape
    codes, scale = encode_int8_blockwise(x)
    assert codes.shape == shape and decode_int8_blockwise(codes, scale).shape == shape


def test_int8_blockwise_encode_is_unbiased() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, generator=g)  # 3 blocks of 128, the last one padded
    x[:128] *= 1e-4
    x[256:] *= 1e3
    draws = []
    for _ in range(2000):
        codes, scale = encode_int8_blockwise(x, g)
        draws.append(decode_int8_blockwise(codes, scale))
    draws = torch.stack(draws)
    assert codes.dtype == torch.int8 and codes.shape == (300,) and scale.shape == (3,)
    assert BLOCK_SIZE == 128
    for block in range(3):
        sl = slice(128 * block, 128 * (block + 1))
        assert_unbiased(draws[:, sl], x[sl])  # 5σ z-test (see conftest)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_int8_non_finite_never_decodes_finite(bad: float) -> None:
    x = torch.randn(4, 300)
    x[1, 5] = bad
    w = decode_int8_per_channel(*encode_int8_per_channel(x))
    assert torch.isnan(w[1]).all() and torch.isfinite(w[[0, 2, 3]]).all()  # NaN row
    s = decode_int8_blockwise(*encode_int8_blockwise(x))
    s = s.flatten()  # flat index 305 is in block 2 (elements 256 to 383): a NaN block
    assert torch.isnan(s[256:384]).all() and torch.isfinite(torch.cat([s[:256], s[384:]])).all()


@pytest.mark.parametrize("top", [3.3767e38, 3.39e38, torch.finfo(torch.float32).max])
def test_finite_values_near_float32s_max_stay_finite_in_storage(top: float) -> None:
    """A review: a row whose absmax lies in (127·2¹²¹, FLT_MAX] took k = 122 and a code
    of 64 decoded to 2¹²⁸ = Inf (p ≈ 0.76 at 3.39e38); bf16 stochastic rounding past the
    largest bfloat16 fell back to round-to-nearest, Inf above 3.3961e38. Every draw must
    stay finite (saturating at the largest finite grid value), the other rows unbiased."""
    x = torch.tensor([[top, 1.0, -2.0], [-top, 0.5, 3.0], [1.0, 2.0, 3.0]])
    for seed in range(64):
        g = torch.Generator().manual_seed(seed)
        w = decode_int8_per_channel(*encode_int8_per_channel(x, g))
        assert torch.isfinite(w).all() and w[0, 0] > 3.3e38 and w[1, 0] < -3.3e38
        b = decode_int8_blockwise(*encode_int8_blockwise(x, g))
        assert torch.isfinite(b).all()
        r = stochastic_round_bf16(x, g)
        assert torch.isfinite(r).all() and r[0, 0] > 3.3e38 and r[1, 0] < -3.3e38
    assert torch.equal(stochastic_round_bf16(torch.tensor([float("inf"), -float("inf")])),
                       torch.tensor([float("inf"), -float("inf")], dtype=torch.bfloat16))


# ------------------------------------------------------------------------- optimizers


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(torch.bfloat16)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> list[float]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(128, 8, generator=g).bfloat16()
    y = x.float().sum(1, keepdim=True)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x).float() - y).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_int8_weights_exact(opt: torch.optim.Optimizer) -> None:
    """The bf16 parameter is exactly the int8 weight (codes·scale), for every ndim ≥ 2 param."""
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state[p]
            assert ("weight_codes" in st) == (p.ndim >= 2)
            if p.ndim >= 2:
                assert st["weight_codes"].dtype == torch.int8
                w = decode_int8_per_channel(st["weight_codes"], st["weight_scale"])
                assert torch.equal(p.float(), w)


def test_srsgd_int8_update_is_unbiased() -> None:
    g = torch.Generator().manual_seed(4)
    w0 = (torch.randn(4, 32, generator=g) * torch.tensor([1e-3, 1.0, 10.0, 1e3])[:, None])
    grad = torch.randn(4, 32, generator=g) * w0.abs().amax(1, keepdim=True) / 127  # ~1 step
    lr = 0.3
    draws, target = [], None
    for _ in range(2000):  # independent one-step updates from the same weights
        p = nn.Parameter(w0.bfloat16())
        opt = SRSGD([p], lr=lr, generator=g, weights="int8")
        target = p.detach().float() - lr * grad.bfloat16().float() if target is None else target
        p.grad = grad.bfloat16()
        opt.step()
        draws.append(p.detach().float())
    _assert_int8_weights_exact(opt)
    draws = torch.stack(draws)
    for row in range(4):
        assert_unbiased(draws[:, row], target[row])  # 5σ z-test (see conftest)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_sradamw_trains_without_fp32_copy(fmt: str) -> None:
    model = _mlp()
    opt = SRAdamW(model.parameters(), lr=0.02, weight_decay=0.01,
                  generator=torch.Generator().manual_seed(0), weights=fmt, state=fmt)
    losses = _train(model, opt, 60)
    assert losses[-1] < 0.02 * losses[0]  # observed ≈ 0.004-0.005 for bf16 and int8
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for st in opt.state.values():
        for key, v in st.items():
            if key.endswith("_scale"):  # one float32 scale per row or per 128 elements
                assert fmt == "int8" and v.dtype == torch.float32 and v.ndim == 1
            elif key == "step":
                assert isinstance(v, int)
            else:
                assert v.dtype == (torch.int8 if key.endswith("_codes") else torch.bfloat16)
    if fmt == "int8":
        _assert_int8_weights_exact(opt)


# MLP Linear(8, 16) + Linear(16, 1): weights 16×8 and 1×16 (rows of 8 and 16), biases 16, 1;
# 161 parameters. int8 weights: 128 + 16·4 + 16 + 1·4 codes/scales + bf16 biases 2·17.
# int8 state: one block (4-byte scale) per tensor: 161 codes + 4·4 scales.
MLP_BYTES = {
    (SRSGD, "bf16"): {"weights": 2 * 161, "decode_buffer": 0, "state": 2 * 161},
    (SRSGD, "int8"): {"weights": 212 + 34, "decode_buffer": 2 * 144, "state": 161 + 16},
    (SRAdamW, "bf16"): {"weights": 2 * 161, "decode_buffer": 0, "state": 4 * 161},
    (SRAdamW, "int8"): {"weights": 212 + 34, "decode_buffer": 2 * 144,
                        "state": 161 + 16 + 2 * 161},  # m int8, v bf16
}


@pytest.mark.parametrize("cls, fmt", list(MLP_BYTES))
def test_memory_breakdown_counts_every_tensor(cls: type, fmt: str) -> None:
    model = _mlp()
    kwargs = {"momentum": 0.9} if cls is SRSGD else {}
    opt = cls(model.parameters(), lr=0.01, weights=fmt, state=fmt, **kwargs)
    _train(model, opt, 1)
    expected = {k: v / 161 for k, v in MLP_BYTES[cls, fmt].items()}
    expected["total"] = sum(MLP_BYTES[cls, fmt].values()) / 161
    assert memory_breakdown(opt) == expected
    assert bytes_per_parameter(opt) == expected["total"]


def test_int8_bytes_per_parameter_for_a_large_layer() -> None:
    # 512 rows of 256: weights 1 + 4/256 B, image 2 B, int8 momentum 1 + 4/128 B.
    layer = nn.Linear(256, 512, bias=False).bfloat16()
    opt = SRSGD(layer.parameters(), lr=0.01, momentum=0.9, weights="int8", state="int8")
    layer.weight.grad = torch.ones_like(layer.weight)
    opt.step()
    assert memory_breakdown(opt) == {"weights": 1.015625, "decode_buffer": 2.0,
                                     "state": 1.03125, "total": 4.046875}


def _make(cls: type, fmt: str) -> tuple[nn.Module, torch.optim.Optimizer, torch.Generator]:
    model, gen = _mlp(), torch.Generator().manual_seed(6)
    kwargs = {"momentum": 0.9, "weight_decay": 1e-3} if cls is SRSGD else {"weight_decay": 0.01}
    return model, cls(model.parameters(), lr=0.01, generator=gen, weights=fmt, state=fmt,
                      **kwargs), gen


@pytest.mark.parametrize("cls, fmt", list(MLP_BYTES))
def test_state_dict_round_trip_is_bitwise(cls: type, fmt: str) -> None:
    model, opt, gen = _make(cls, fmt)
    _train(model, opt, 3)
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), gen.get_state()))
    _train(model, opt, 3)
    model2, opt2, gen2 = _make(cls, fmt)
    _train(model2, opt2, 1)  # different state, to be overwritten
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    gen2.set_state(saved[2])
    for pid, st in saved[1]["state"].items():  # int8 codes and float32 scales kept their dtype
        p2 = list(model2.parameters())[pid]
        assert {k: v.dtype for k, v in opt2.state[p2].items() if isinstance(v, torch.Tensor)} == \
            {k: v.dtype for k, v in st.items() if isinstance(v, torch.Tensor)}
    _train(model2, opt2, 3)
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)
        for (k, v), (k2, v2) in zip(opt.state[p].items(), opt2.state[p2].items()):
            assert k == k2 and (torch.equal(v, v2) if isinstance(v, torch.Tensor) else v == v2)


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_non_finite_gradient_keeps_weight_non_finite(cls: type, fmt: str) -> None:
    model = _mlp()
    opt = cls(model.parameters(), lr=0.01, weights=fmt, state=fmt,
              **({"momentum": 0.9} if cls is SRSGD else {}))
    weight, bias = model[0].weight, model[0].bias
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    weight.grad[0, 0], weight.grad[1, 1], bias.grad[2] = float("nan"), float("inf"), -float("inf")
    opt.step()
    for _ in range(3):  # finite gradients afterwards do not heal them
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        assert not weight[0, 0].isfinite() and not weight[1, 1].isfinite()
        assert not bias[2].isfinite()


def test_validation_names_the_problem() -> None:
    params = list(_mlp().parameters())
    with pytest.raises(ValueError, match="weights must be one of 'bf16', 'int8', got 'fp8'"):
        SRSGD(params, lr=0.1, weights="fp8")
    with pytest.raises(ValueError, match="state must be one of 'bf16', 'int8', got 'int4'"):
        SRAdamW(params, lr=0.1, state="int4")
    with pytest.raises(ValueError, match="lr must be a finite number ≥ 0"):
        SRAdamW(params, lr=-1e-3)
    for betas in [(0.9, 1.0), (-0.1, 0.999), (0.9,)]:
        with pytest.raises(ValueError, match="betas must be two numbers in"):
            SRAdamW(params, lr=0.1, betas=betas)
    for eps in (-1e-8, float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number ≥ 0"):
            SRAdamW(params, lr=0.1, eps=eps)
    # what torch.optim takes (a new user's trial: refused where the docstring said otherwise)
    torch.optim.AdamW(params, lr=0.1, eps=0.0), torch.optim.SGD(params, lr=0.1, momentum=1.0)
    SRAdamW(params, lr=0.1, eps=0.0), SRSGD(params, lr=0.1, momentum=1.0)
    with pytest.raises(TypeError, match="SRAdamW keeps weights in bfloat16"):
        SRAdamW(nn.Linear(2, 2).parameters(), lr=0.1)
    opt = SRSGD(params, lr=0.1)
    with pytest.raises(TypeError, match="keeps weights in bfloat16"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 1  # the rejected group is not kept
    with pytest.raises(ValueError, match="ndim ≥ 2"):
        encode_int8_per_channel(torch.zeros(3))


# ------------------------------------------------ writes to parameters from outside the optimizer


def _grid_round(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: the per-row power-of-two grid step ``s`` (smallest with
    ``max|row| ≤ 127·s``) and ``w`` rounded to nearest (ties to even) on it, in float64."""
    w = w.double().flatten(1)
    s = torch.exp2(torch.ceil(torch.log2(w.abs().amax(1) / 127)))[:, None]
    return s, torch.round(w / s) * s


def _on_int8_grid(w: torch.Tensor) -> bool:
    """Whether ``w`` lies on its rows' power-of-two int8 grids (:func:`_grid_round` leaves it)."""
    return torch.equal(_grid_round(w)[1], w.double().flatten(1))


def _zero_grad_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_model_load_state_dict_is_not_undone(cls: type, fmt: str) -> None:
    # Issue 11.1: the int8 codes captured at construction used to be written back
    # (max error 0.45, ~230 grid steps).
    torch.manual_seed(0)
    m = nn.Linear(16, 8).to(torch.bfloat16)
    opt = cls(m.parameters(), lr=1e-3, weights=fmt, weight_decay=0.0)  # a zero-gradient step: no change
    pre = nn.Linear(16, 8).to(torch.bfloat16).state_dict()
    m.load_state_dict(pre)
    _zero_grad_step(m, opt)
    assert torch.equal(m.bias, pre["bias"])  # 1-D: bfloat16, the parameter itself
    if fmt == "bf16":
        assert torch.equal(m.weight, pre["weight"])
        return
    # pre's weights are not on an int8 grid: re-encoded to nearest with fresh scales
    s, nearest = _grid_round(pre["weight"])
    err = (m.weight.double() - pre["weight"].double()).abs()
    assert torch.equal(m.weight.double(), nearest)
    assert torch.all(err <= s / 2) and err.max() > 0  # within half a grid step, not exact
    assert torch.all(s <= 2**-8)  # |w| ≤ 1/4 (init bound 1/√16) < 127·2^-8: error ≤ 2^-9
    _assert_int8_weights_exact(opt)


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
def test_weights_already_on_an_int8_grid_are_loaded_exactly(cls: type) -> None:
    source, src_opt, _ = _make(cls, "int8")  # weights saved from another int8 run
    _train(source, src_opt, 3)
    m = _mlp()
    opt = cls(m.parameters(), lr=1e-3, weights="int8")
    if cls is SRSGD:  # no momentum: a zero-gradient step does not move the weights
        _train(m, opt, 2)  # (AdamW's first moment would: it stays fresh)
    m.load_state_dict(source.state_dict())
    _zero_grad_step(m, opt)
    for p, q in zip(m.parameters(), source.parameters()):
        assert torch.equal(p, q)
    _assert_int8_weights_exact(opt)


def _swa_average(p: torch.Tensor) -> None:
    """A weight-averaging write: AveragedModel's average of p and its double, copied back."""
    holder = nn.Module()
    holder.w = p
    swa = torch.optim.swa_utils.AveragedModel(holder)
    holder2 = copy.deepcopy(holder)
    with torch.no_grad():
        holder2.w.mul_(2)
    swa.update_parameters(holder2)
    with torch.no_grad():
        p.copy_(swa.module.w)


OUTSIDE_WRITES = {  # every kind of write the optimizer must see
    "copy_": lambda p: p.copy_(torch.linspace(-1, 1, p.numel()).view(p.shape)),
    "in-place under no_grad": lambda p: p.mul_(-3),
    "p.data (no version bump)": lambda p: p.data.add_(0.01),  # p._version unchanged
    "nn.init": lambda p: nn.init.normal_(p, generator=torch.Generator().manual_seed(9)),
    "EMA lerp_": lambda p: p.data.lerp_(torch.ones_like(p), 0.5),
    "AveragedModel": _swa_average,
}


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
@pytest.mark.parametrize("write", list(OUTSIDE_WRITES))
def test_every_outside_write_is_seen(cls: type, write: str) -> None:
    m = _mlp()
    opt = cls(m.parameters(), lr=0.01, weights="int8", state="int8", weight_decay=0.0,
              generator=torch.Generator().manual_seed(7))  # (a decay moves the weight: SRAdamW's default 1e-2)
    if cls is SRSGD:  # no momentum: a zero-gradient step leaves the weight where it is
        _train(m, opt, 2)  # (AdamW's first moment would move it: it stays fresh)
    p = m[0].weight
    version = p._version
    with torch.no_grad():
        OUTSIDE_WRITES[write](p)
    assert (p._version == version) == (write in ("p.data (no version bump)", "EMA lerp_"))
    written = p.detach().clone()
    s, nearest = _grid_round(written)
    _zero_grad_step(m, opt)  # exactly the written weight, rounded to nearest on its grid
    assert torch.equal(p.double().flatten(1), nearest)
    assert torch.all((nearest - written.double().flatten(1)).abs() <= s / 2)
    _assert_int8_weights_exact(opt)


def test_update_after_an_outside_write_starts_from_the_written_weight() -> None:
    # Exact reference: the written weight, rounded to nearest on its grid, plus Δ = −lr·g
    # (float32) in float64, stochastically rounded with the optimizer's own noise stream.
    p = nn.Parameter(torch.randn(4, 32).bfloat16())
    gen = torch.Generator().manual_seed(8)
    opt = SRSGD([p], lr=0.1, weights="int8", generator=gen)
    with torch.no_grad():
        p.copy_(torch.randn(4, 32))
    p.grad = torch.randn(4, 32).bfloat16()
    ref_gen = torch.Generator().manual_seed(0)
    ref_gen.set_state(gen.get_state())
    w = decode_int8_per_channel(*encode_int8_per_channel(p.detach(), stochastic=False))
    expected = decode_int8_per_channel(*encode_int8_per_channel(w.double() + (-0.1 * p.grad.float()).double(),
                                                                ref_gen))
    opt.step()
    assert torch.equal(p.float(), expected)


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_dtype_device_or_shape_change_is_refused_before_any_update(cls: type, fmt: str) -> None:
    model, opt, _ = _make(cls, fmt)
    _train(model, opt, 1)
    name = cls.__name__
    first = model[0].weight
    before = [p.detach().clone() for p in model.parameters()]

    model.float()  # .to() after the optimizer was built
    with pytest.raises(TypeError, match=rf"^{name} keeps weights in bfloat16, but parameter 0 of "
                       r"param group 0 is now torch.float32 \(changed after the optimizer was "
                       r"built, e.g. by model.to\(\)\); convert it back with "
                       r"\.to\(torch.bfloat16\)$"):
        opt.step()
    model.bfloat16()  # back: new storage, the same values — not a write, nothing re-encoded
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)

    key = next(k for k, v in opt.state[first].items() if isinstance(v, torch.Tensor))
    assert (key in ("weight_codes", "momentum_codes", "exp_avg_codes")) == (fmt == "int8")
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)  # .to() keeps the objects
    try:
        model.to("meta")  # another device (meta: no GPU needed to test it)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert first is model[0].weight and first.device.type == "meta"
    with pytest.raises(RuntimeError, match=rf"^parameter 0 of param group 0 is a \(16, 8\) tensor "
                       rf"on meta but its optimizer state '{key}' is \(16, 8\) on cpu: the "
                       r"parameter was moved or replaced after the optimizer was built; build "
                       r"the optimizer after model.to\(\), or load this optimizer's state_dict "
                       r"into one built on the moved model$"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        torch.utils.swap_tensors(p, nn.Parameter(b.clone()))
    first.data = torch.zeros(4, 8, dtype=torch.bfloat16)  # replaced by another shape
    first.grad = torch.zeros_like(first)
    with pytest.raises(RuntimeError, match=rf"is a \(4, 8\) tensor on cpu but its optimizer "
                       rf"state '{key}' is \(16, 8\) on cpu"):
        opt.step()
    first.data = before[0].clone()
    for p, b in zip(model.parameters(), before):  # nothing was updated by the refused steps
        assert torch.equal(p, b)


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
def test_optimizer_load_state_dict_does_not_overwrite_a_reloaded_model(cls: type) -> None:
    model, opt, _ = _make(cls, "int8")
    _train(model, opt, 2)
    opt_saved = copy.deepcopy(opt.state_dict())
    other, other_opt, _ = _make(cls, "int8")
    _train(other, other_opt, 5)  # different weights, on an int8 grid
    other_weights = copy.deepcopy(other.state_dict())
    ref_saved = copy.deepcopy(opt_saved)
    for pid, p in enumerate(other.parameters()):
        if p.ndim >= 2:  # on the grid: round-to-nearest encodes other's weights exactly
            codes, scale = encode_int8_per_channel(p.detach(), stochastic=False)
            assert torch.equal(decode_int8_per_channel(codes, scale), p.float())
            ref_saved["state"][pid] |= {"weight_codes": codes, "weight_scale": scale}
    for order in ("model first", "optimizer first"):
        model2, opt2, _ = _make(cls, "int8")
        if order == "model first":
            model2.load_state_dict(other_weights)
            opt2.load_state_dict(opt_saved)
        else:
            opt2.load_state_dict(opt_saved)
            model2.load_state_dict(other_weights)
        assert all(torch.equal(p, other_weights[k]) for k, p in model2.state_dict().items())
        _zero_grad_step(model2, opt2)  # the loaded model wins over the optimizer's codes:
        model3, opt3, _ = _make(cls, "int8")  # as if the saved codes were other's weights
        model3.load_state_dict(other_weights)
        opt3.load_state_dict(ref_saved)
        _zero_grad_step(model3, opt3)
        for p, p3 in zip(model2.parameters(), model3.parameters()):
            assert torch.equal(p, p3)
        _assert_int8_weights_exact(opt2)


def _reference_step(cls: type, w: torch.Tensor, g: torch.Tensor, st: dict[str, Any], t: int,
                    gen: torch.Generator, fmt: str) -> torch.Tensor:
    """One SRSGD (lr 0.01, momentum 0.9, wd 1e-3) or SRAdamW (lr 0.01, wd 0.01) step on a
    float32 weight with the public codecs, drawing noise in the optimizers' order (state,
    then weight): the update Δ in float32, the new weight w + Δ in float64; returns the
    stored weight in float32."""
    def store(x: torch.Tensor, f: str) -> torch.Tensor:
        if f == "bf16":
            return stochastic_round_bf16(x, gen).float()
        return decode_int8_blockwise(*encode_int8_blockwise(x, gen))

    if cls is SRSGD:
        d = g + 1e-3 * w
        d = d if "v" not in st else 0.9 * st["v"] + d
        st["v"] = store(d, fmt)
        delta = -0.01 * d
    else:
        m = 0.1 * g if "m" not in st else 0.9 * st["m"] + 0.1 * g
        v = 0.001 * g * g if "v" not in st else 0.999 * st["v"] + 0.001 * g * g
        st["m"], st["v"] = store(m, fmt), store(v, "bf16")
        delta = -0.01 * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8) - (0.01 * 0.01) * w
    w = w.double() + delta.double()
    if fmt == "int8" and w.ndim >= 2:
        return decode_int8_per_channel(*encode_int8_per_channel(w, gen))
    return stochastic_round_bf16(w, gen).float()


@pytest.mark.parametrize("cls, fmt", list(MLP_BYTES))
def test_trajectory_without_outside_writes_equals_the_reference(cls: type, fmt: str) -> None:
    # The check for outside writes must not change the normal path: no re-encoding, no
    # extra noise drawn. Five steps, bitwise against the update rules written out.
    model, opt, gen = _make(cls, fmt)
    ref_gen = torch.Generator().manual_seed(6)
    ws = [decode_int8_per_channel(*encode_int8_per_channel(p.detach(), stochastic=False))
          if fmt == "int8" and p.ndim >= 2 else p.float() for p in model.parameters()]
    states: list[dict[str, Any]] = [{} for _ in ws]
    grads = torch.Generator().manual_seed(10)
    for t in range(1, 6):
        for i, p in enumerate(model.parameters()):
            p.grad = torch.randn(p.shape, generator=grads).bfloat16()
            ws[i] = _reference_step(cls, ws[i], p.grad.float(), states[i], t, ref_gen, fmt)
        opt.step()
        for p, w in zip(model.parameters(), ws):
            assert torch.equal(p.float(), w)
    assert torch.equal(gen.get_state(), ref_gen.get_state())


def test_trainer_master_copy_sees_outside_writes() -> None:
    # The same fault in the trainer's float32 master copy (--weights bf16-master).
    from lowbit.experiments.trainer import MasterWeights

    torch.manual_seed(0)
    m = nn.Linear(16, 8).to(torch.bfloat16)
    master = MasterWeights(list(m.parameters()))
    opt = torch.optim.SGD([w for _, w in master.pairs], lr=0.5)
    m.weight.grad = torch.ones_like(m.weight)
    master.grads_in(), opt.step(), master.weights_out()
    fine = master.pairs[0][1].detach().clone()  # float32 master, off the bfloat16 grid
    assert not torch.equal(fine, fine.bfloat16().float())
    pre = nn.Linear(16, 8).to(torch.bfloat16).state_dict()
    m.load_state_dict(pre)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    master.grads_in(), opt.step(), master.weights_out()
    assert torch.equal(m.weight, pre["weight"]) and torch.equal(m.bias, pre["bias"])
    assert torch.equal(master.pairs[0][1], pre["weight"].float())
    m.weight.grad = torch.ones_like(m.weight)  # untouched masters keep their float32 bits
    master.grads_in()
    assert torch.equal(master.pairs[0][1], pre["weight"].float())


# ------------------------------------------------------------------ sparse gradients


def _embedding_model(fmt: str) -> tuple[nn.Module, nn.Embedding]:
    """A dense layer first, then a sparse-gradient embedding whose weights (small integers)
    and updates (lr 0.25, integer gradients) are exact in bfloat16 and on an int8 grid."""
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.randint(-8, 9, (10, 4)).float())
    return nn.ModuleDict({"lin": nn.Linear(4, 4), "emb": emb}).to(torch.bfloat16), emb


def _sparse_backward(model: nn.Module) -> None:
    idx = torch.tensor([1, 2, 2])  # row 2 twice: an uncoalesced gradient of 2 there
    model["emb"](idx).float().sum().backward()
    model["lin"](torch.ones(1, 4, dtype=model["lin"].weight.dtype)).float().sum().backward()


@pytest.mark.parametrize("cls, kwargs", [(SRSGD, {"momentum": 0.9}), (SRSGD, {"weight_decay": 0.1}),
                                         (SRAdamW, {})])
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_sparse_gradient_is_refused_before_any_update(cls: type, kwargs: dict, fmt: str) -> None:
    # A review (nn.Embedding(sparse=True)): the step updated the dense layer, then failed on
    # the embedding with "Cannot access storage of SparseTensorImpl" — a half-applied step.
    model, emb = _embedding_model(fmt)
    opt = cls(model.parameters(), lr=0.25, weights=fmt, state=fmt, **kwargs)
    _sparse_backward(model)
    assert emb.weight.grad.layout == torch.sparse_coo
    before = [p.detach().clone() for p in model.parameters()]
    state = [copy.deepcopy(opt.state.get(p, {})) for p in model.parameters()]
    why = ("supports sparse gradients only as plain SGD: in COO layout, with momentum 0 and "
           "weight_decay 0" if cls is SRSGD else "does not support sparse gradients")
    with pytest.raises(RuntimeError, match=rf"^{cls.__name__} {why}.*: parameter 2 of param group 0 "
                       r"has a torch.sparse_coo gradient \(e.g. from nn.Embedding\(sparse=True\)\); "
                       r"nothing was updated"):
        opt.step()
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for p, s in zip(model.parameters(), state):  # no state written (int8: the codes from the start)
        st = opt.state.get(p, {})
        assert st.keys() == s.keys() and all(torch.equal(st[k], v) for k, v in s.items())


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_srsgd_without_momentum_steps_a_sparse_gradient_as_torch_sgd(fmt: str) -> None:
    model, emb = _embedding_model(fmt)
    ref_model, _ = _embedding_model(fmt)
    ref_model.float()
    opt = SRSGD(model.parameters(), lr=0.25, weights=fmt, generator=torch.Generator().manual_seed(0))
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.25)
    w0 = emb.weight.detach().float().clone()
    for _ in range(2):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad()
            _sparse_backward(m)
            o.step()
    assert torch.equal(emb.weight.float(), ref_model["emb"].weight)  # exact: on both grids
    expected = w0.clone()
    expected[1] -= 2 * 0.25
    expected[2] -= 2 * 2 * 0.25
    assert torch.equal(emb.weight.float(), expected)  # untouched rows kept bit for bit
    if fmt == "int8":
        _assert_int8_weights_exact(opt)


# ------------------------------------------- settings and state dicts of other optimizers


@pytest.mark.parametrize("cls, setting", [
    (SRSGD, {"maximize": True}), (SRSGD, {"nesterov": True}), (SRSGD, {"dampening": 0.1}),
    (SRAdamW, {"amsgrad": True}), (SRAdamW, {"maximize": True}), (SRAdamW, {"capturable": True}),
    (SRAdamW, {"differentiable": True}),
])
def test_torch_settings_not_implemented_are_refused(cls: type, setting: dict) -> None:
    # A review: SRSGD([{"params": ..., "maximize": True}]) stepped downhill, silently.
    (key, value), = setting.items()
    a, b = nn.Linear(2, 2).bfloat16(), nn.Linear(2, 2).bfloat16()
    match = rf"param group 1: {cls.__name__} does not implement {key}={value!r}, which would change"
    with pytest.raises(ValueError, match=match):
        cls([{"params": a.parameters()}, {"params": b.parameters(), **setting}], lr=0.1)
    opt = cls(a.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match.replace("group 1", "group 1")):
        opt.add_param_group({"params": b.parameters(), **setting})
    assert len(opt.param_groups) == 1
    opt.param_groups[0].update(setting)  # by hand, before a step: nothing updated
    a(torch.ones(1, 2, dtype=torch.bfloat16)).sum().backward()
    before = [p.detach().clone() for p in a.parameters()]
    with pytest.raises(ValueError, match=match.replace("group 1", "group 0")):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), before))


def test_torch_settings_at_neutral_values_are_accepted() -> None:
    a = nn.Linear(2, 2).bfloat16()
    neutral = {"maximize": False, "foreach": True, "fused": None, "differentiable": False,
               "capturable": False}
    SRSGD([{"params": a.parameters(), "nesterov": False, "dampening": 0, **neutral}], lr=0.1)
    SRAdamW([{"params": a.parameters(), "amsgrad": False, "decoupled_weight_decay": True, **neutral}],
            lr=0.1, weight_decay=0.1)
    SRAdamW([{"params": a.parameters(), "decoupled_weight_decay": False}], lr=0.1, weight_decay=0.0)  # no decay
    with pytest.raises(ValueError, match=r"SRAdamW does not implement decoupled_weight_decay=False "
                       r"with weight_decay=0.1: its weight decay is decoupled"):
        SRAdamW([{"params": a.parameters(), "decoupled_weight_decay": False}], lr=0.1, weight_decay=0.1)
    with pytest.raises(ValueError, match=r"SRSGD does not implement decoupled_weight_decay=True "
                       r"with weight_decay=0.1: its weight decay is added to the gradient"):
        SRSGD([{"params": a.parameters(), "decoupled_weight_decay": True}], lr=0.1, weight_decay=0.1)


def _grad_steps(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 5) -> None:
    """``steps`` steps on random gradients (bfloat16 values, in the parameters' dtype)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).bfloat16().to(p.dtype)
        opt.step()


def _torch_sgd_state(**kwargs: Any) -> dict[str, Any]:
    model = _mlp().float()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, **kwargs)
    _grad_steps(model, opt, 2)
    return opt.state_dict()


def test_load_state_dict_refuses_another_optimizers_state() -> None:
    # A review: torch.optim.SGD's state loaded into SRSGD silently; its 'momentum_buffer'
    # was never read (the momentum restarted from zero), nesterov and maximize ignored.
    model, opt, gen = _make(SRSGD, "bf16")
    _train(model, opt, 1)
    mine = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"^SRSGD cannot load this state dict: its per-parameter "
                       r"state has 'momentum_buffer', which SRSGD does not write \(it writes "
                       r"'momentum', 'momentum_codes', 'momentum_scale', 'weight_codes', "
                       r"'weight_scale'\)"):
        opt.load_state_dict(_torch_sgd_state(momentum=0.9, weight_decay=1e-3))
    with pytest.raises(ValueError, match=r"^SRSGD.load_state_dict: saved param group 0: SRSGD does "
                       r"not implement maximize=True, nesterov=True, which would change the update"):
        opt.load_state_dict(_torch_sgd_state(momentum=0.9, nesterov=True, maximize=True))
    adamw_model, adamw, _ = _make(SRAdamW, "bf16")
    _train(adamw_model, adamw, 1)
    with pytest.raises(ValueError, match=r"saved param group 0: lacks momentum, which SRSGD reads"):
        opt.load_state_dict(adamw.state_dict())
    with pytest.raises(ValueError, match=r"'momentum', which SRAdamW does not write"):
        adamw.load_state_dict({**mine, "param_groups": [
            {**g, "betas": (0.9, 0.999), "eps": 1e-8} for g in mine["param_groups"]]})
    # refused before anything was loaded: the optimizer continues as one never offered them
    assert _state_equal(opt.state_dict(), mine)
    opt.load_state_dict(_torch_sgd_state())  # plain SGD: no state, neutral settings
    assert not opt.state and opt.param_groups[0]["nesterov"] is False


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
def test_a_state_of_the_same_model_grouped_otherwise_is_refused_as_such(cls: type) -> None:
    """A new user's trial: the state of the same model saved under two param groups
    (weights, biases) and loaded into an optimizer of one group was blamed on "another
    model's parameters" (the shape check paired parameters in flattened order before
    torch's layout check); now torch's words, with the sizes, and nothing loaded."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)).bfloat16()
    kw = {"lr": 0.1, "momentum": 0.9} if cls is SRSGD else {"lr": 0.01}
    grouped = cls([{"params": [p for p in model.parameters() if p.ndim > 1]},
                   {"params": [p for p in model.parameters() if p.ndim == 1]}], **kw)
    model(torch.randn(4, 20).bfloat16()).float().sum().backward()
    grouped.step()
    one = cls(model.parameters(), **kw)
    with pytest.raises(ValueError, match=r"different number of parameter groups \(2 saved, 1 here\)"):
        one.load_state_dict(grouped.state_dict())
    swapped = cls([{"params": [p for p in model.parameters() if p.ndim == 1]},
                   {"params": [p for p in model.parameters() if p.ndim > 1][:1]},
                   ], **kw)
    with pytest.raises(ValueError, match=r"doesn't match the size of optimizer's group \(sizes \[2, 2\] saved, "
                       r"\[2, 1\] here\)"):
        swapped.load_state_dict(grouped.state_dict())
    assert not one.state and not swapped.state


def _state_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(s.keys() == b["state"][k].keys() and all(
        torch.equal(v, b["state"][k][n]) if isinstance(v, torch.Tensor) else v == b["state"][k][n]
        for n, v in s.items()) for k, s in a["state"].items())


def test_torch_adamw_state_dict_loads_into_sradamw() -> None:
    # The same update rule and state keys: a float32 AdamW run continues in SRAdamW, its
    # next weights within one bfloat16 step of torch's continuing in float32.
    ref_model = _mlp().float()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01, weight_decay=0.01)
    _grad_steps(ref_model, ref, 3)
    model = _mlp()
    model.load_state_dict(ref_model.state_dict())  # rounded to bfloat16
    ref_model.load_state_dict(model.state_dict())  # the same weights on both sides
    opt = SRAdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # as from a checkpoint
    assert all(s["step"] == 3 and isinstance(s["step"], int) for s in opt.state.values())
    _grad_steps(ref_model, ref, 1, seed=6)
    _grad_steps(model, opt, 1, seed=6)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        ulp = q.detach().abs() * 2.0**-7 + 1e-30  # a bfloat16 step (or less) at q
        assert torch.all((p.float() - q).abs() <= ulp * 1.001)


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
def test_a_generator_that_is_not_one_is_refused_at_construction(cls: type) -> None:
    # a seed integer was accepted and failed at the first step, after SRAdamW's step count
    # had already moved (a review)
    p = nn.Parameter(torch.randn(4, 4).bfloat16())
    with pytest.raises(TypeError, match=f"{cls.__name__}: generator must be a torch.Generator or None"):
        cls([p], lr=1e-3, generator=123)


# -- torch.optim machinery: compile, copies, hooks (a review, fault kind 169) --------------
def _trained_step(cls: type, model: nn.Module, **kw: Any) -> torch.optim.Optimizer:
    opt = cls(model.parameters(), lr=0.1, generator=torch.Generator().manual_seed(1), **kw)
    model(torch.randn(5, 8, generator=torch.Generator().manual_seed(2)).bfloat16()).sum().backward()
    return opt


@pytest.mark.parametrize("cls, kw", [(SRSGD, {"momentum": 0.9}), (SRAdamW, {})])
def test_step_under_torch_compile_runs_eagerly_with_the_same_bits(cls: type, kw: dict) -> None:
    """``torch.compile`` of a function calling ``step()`` (two parameter shapes: dynamo
    recompiled with dynamic shapes, where ``torch.randint(generator=…)`` failed to trace)
    runs the step eagerly: the same weights as an eager step."""
    got, want = (nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2)).bfloat16() for _ in range(2))
    want.load_state_dict(got.state_dict())
    o_got = _trained_step(cls, got, weights="int8", state="int8", **kw)
    o_want = _trained_step(cls, want, weights="int8", state="int8", **kw)
    torch.compile(o_got.step)()
    o_want.step()
    for a, b in zip(got.parameters(), want.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
def test_copies_keep_formats_and_generator(cls: type) -> None:
    """``copy.deepcopy`` and pickling (``torch.save(optimizer)``) keep the storage formats
    and the generator (torch's ``__getstate__`` keeps only defaults, state and groups: a
    copy raised ``AttributeError`` at its first step); the copy steps as the original."""
    import io

    model = nn.Linear(8, 4).bfloat16()
    opt = _trained_step(cls, model, weights="int8", state="int8")
    opt.step()  # state to copy
    dup = copy.deepcopy({"m": model, "o": opt})
    buf = io.BytesIO()
    torch.save({"m": model, "o": opt}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4)).bfloat16()
    for c in ({"m": model, "o": opt}, dup, loaded):  # copies hold no gradients: the same one
        c["o"].zero_grad()
        c["m"](x).sum().backward()
        c["o"].step()
        assert (c["o"].weight_format, c["o"].state_format) == ("int8", "int8")
        assert torch.equal(c["m"].weight, model.weight) and torch.equal(c["m"].bias, model.bias)


@pytest.mark.parametrize("cls, key", [(SRSGD, "momentum"), (SRAdamW, "betas")])
def test_one_element_tensor_settings_step_a_0d_parameter(cls: type, key: str) -> None:
    """Settings given as one-element 1-d tensors (accepted, as torch accepts them) step a
    0-d parameter (CLIP's ``logit_scale``) as the plain numbers do — they broadcast it to
    shape (1,) and failed half-way through the step, earlier parameters updated."""
    results = []
    for tensors in (False, True):
        lin, scale = nn.Linear(4, 3).bfloat16(), nn.Parameter(torch.tensor(2.0, dtype=torch.bfloat16))
        torch.manual_seed(0)
        lin.reset_parameters()
        t = (lambda v: torch.tensor([v])) if tensors else (lambda v: v)
        setting = {"momentum": t(0.9)} if key == "momentum" else {"betas": (t(0.9), t(0.99))}
        opt = cls([{"params": lin.parameters()}, {"params": [scale]}], lr=t(0.01), weight_decay=t(0.1),
                  generator=torch.Generator().manual_seed(3), **setting)
        for _ in range(2):
            opt.zero_grad()
            (lin(torch.ones(2, 4, dtype=torch.bfloat16)).sum() * scale).backward()
            opt.step()
        assert scale.shape == () and all(v.shape == () for v in opt.state[scale].values()
                                         if isinstance(v, torch.Tensor))
        results.append([p.detach().clone() for p in (*lin.parameters(), scale)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_load_state_dict_runs_torchs_hooks_on_the_saved_dtypes() -> None:
    """Load hooks as torch documents them: a pre-hook's returned dict is what loads (it
    was overwritten by the original's), and is what the checks read (a hook renaming
    ``torch.optim.SGD``'s ``momentum_buffer`` was refused before it ran); post-hooks see
    the restored int8 codes and float32 scales (they saw torch's bfloat16 casts)."""
    model = nn.Linear(8, 4).bfloat16()
    src = _trained_step(SRSGD, model, momentum=0.9, weights="int8", state="int8")
    src.step()
    dst = SRSGD(model.parameters(), lr=0.1, momentum=0.9, weights="int8", state="int8")

    def zero(_: Any, sd: dict) -> dict:
        sd = copy.deepcopy(sd)
        for st in sd["state"].values():
            st["momentum_codes"].zero_()
        return sd
    seen = []
    dst.register_load_state_dict_pre_hook(zero)
    dst.register_load_state_dict_post_hook(lambda o: seen.append(
        {k: v.dtype for k, v in o.state[model.weight].items()}))
    dst.load_state_dict(src.state_dict())
    assert not dst.state[model.weight]["momentum_codes"].any()
    assert seen == [{"momentum_codes": torch.int8, "momentum_scale": torch.float32,
                     "weight_codes": torch.int8, "weight_scale": torch.float32}]
    assert src.state[model.weight]["momentum_codes"].any()  # the caller's dict untouched

    ref = nn.Linear(8, 4)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref(torch.randn(2, 8)).sum().backward()
    sgd.step()
    mine = SRSGD(nn.Linear(8, 4).bfloat16().parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum_buffer"):
        mine.load_state_dict(sgd.state_dict())
    mine.register_load_state_dict_pre_hook(lambda _, sd: {**sd, "state": {
        k: {"momentum": v["momentum_buffer"]} for k, v in sd["state"].items()}})
    mine.load_state_dict(sgd.state_dict())
    assert torch.equal(mine.state[mine.param_groups[0]["params"][0]]["momentum"],
                       sgd.state[ref.weight]["momentum_buffer"])  # its saved dtype kept


@pytest.mark.parametrize("key", ["weights", "state", "generator"])
def test_per_optimizer_settings_in_a_param_group_are_refused(key: str) -> None:
    """``weights``/``state``/``generator`` in a param group were silently ignored (the
    group stayed bf16): refused, naming the key and where it belongs."""
    enc, head = nn.Linear(4, 4).bfloat16(), nn.Linear(4, 2).bfloat16()
    value = torch.Generator() if key == "generator" else "int8"
    with pytest.raises(ValueError, match=f"'{key}' set in a param group.*per optimizer"):
        SRSGD([{"params": enc.parameters(), key: value}, {"params": head.parameters()}], lr=0.1)


def test_frozen_weights_are_not_rewritten_by_the_constructor() -> None:
    """``weights="int8"`` encodes the weights it will step; a frozen one (``requires_grad``
    False) kept its bfloat16 values (it was rounded onto the int8 grid for no update)."""
    enc, head = nn.Linear(16, 16).bfloat16(), nn.Linear(16, 2).bfloat16()
    enc.requires_grad_(False)
    before, head_before = enc.weight.clone(), head.weight.clone()
    opt = SRSGD([*enc.parameters(), *head.parameters()], lr=0.1, weights="int8")
    assert torch.equal(enc.weight, before) and "weight_codes" not in opt.state.get(enc.weight, {})
    assert not torch.equal(head.weight, head_before) and _on_int8_grid(head.weight)
    assert not opt.state  # the codes come at the first step (a new optimizer's state is empty, as torch's)


def test_sradamw_defaults_are_torch_adamws() -> None:
    """A new user: ``SRAdamW`` defaulted to no weight decay where ``torch.optim.AdamW``
    decays by 1e-2, so a drop-in swap silently lost its weight decay."""
    import inspect

    ours, theirs = inspect.signature(SRAdamW).parameters, inspect.signature(torch.optim.AdamW).parameters
    for name in ("betas", "eps", "weight_decay"):
        assert ours[name].default == theirs[name].default, name


def test_a_step_that_fails_while_writing_state_is_not_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """``SRAdamW`` counted a step before writing its state, so a step that failed half-way
    (a review: a sharded parameter's state write) left ``step`` one ahead of the moments —
    the next bias correction used the wrong ``t``. Counted once the state is written."""
    from lowbit.optim import SRAdamW

    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    opt = SRAdamW([p], lr=0.1, generator=torch.Generator().manual_seed(0))
    p.grad = torch.ones_like(p)
    opt.step()
    assert opt.state[p]["step"] == 1
    real = opt._store_state

    def fail_on_second(q, name, x, fmt):  # noqa: ANN001, ANN202
        if name == "exp_avg_sq":
            raise RuntimeError("a write that fails")
        return real(q, name, x, fmt)

    monkeypatch.setattr(opt, "_store_state", fail_on_second)
    with pytest.raises(RuntimeError, match="a write that fails"):
        opt.step()
    assert opt.state[p]["step"] == 1


# An update below half a float32 ulp of the weight vanished in the float32 sum w + Δ, before
# any stochastic rounding (a new user's trial: 0 of 2e7 elements moved where 128 should).
# Here Δ is just under half a float32 ulp of w, so the float32 sum is w itself; each element
# must move one grid step (s) down with probability |Δ|/s. N elements, the count of moves
# tested against N·|Δ|/s at 5σ (binomial; the expected count is ≥ 36, so 5σ ≤ 0.84 of it:
# a count of 0 fails).
def _assert_moves_in_expectation(p: nn.Parameter, w: float, step: float, delta: float) -> None:
    moved = p.detach().float() != w
    assert bool((p.detach().float()[moved] == w - step).all())  # one step, downwards
    n, prob = p.numel(), delta / step
    expected, sd = n * prob, (n * prob * (1 - prob)) ** 0.5
    count = int(moved.sum())
    assert abs(count - expected) < 5 * sd, (count, expected, sd)


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_updates_below_float32_precision_move_the_weight_in_expectation(fmt: str) -> None:
    # w = 127/64: int8 code 127 at scale 2^-6 (step 2^-6); bfloat16 step below it 2^-7
    w, n = 127 / 64, 10_000_000 if fmt == "int8" else 5_000_000  # P(move) 3.8e-6, 7.6e-6
    half_ulp = 2.0**-24 * 0.5 * 2  # float32's ulp in [1, 2) is 2^-23: half of it 2^-24
    delta = 0.99 * half_ulp
    assert float(torch.tensor(w) - torch.tensor(delta)) == w  # the float32 sum: w
    p = nn.Parameter(torch.full((n // 2, 2), w, dtype=torch.bfloat16))
    opt = SRSGD([p], lr=1.0, weights=fmt, generator=torch.Generator().manual_seed(3))
    p.grad = torch.full_like(p, delta)  # not exact in bfloat16: the Δ that ran is its value
    delta = float(p.grad[0, 0])
    opt.step()
    _assert_moves_in_expectation(p, w, 2.0**-6 if fmt == "int8" else 2.0**-7, delta)


def test_a_small_decoupled_weight_decay_is_not_lost() -> None:
    # A trial: SRAdamW(lr=1e-6, weight_decay=0.01) left the weights bitwise those of
    # weight_decay=0: w − lr·λ·w, applied apart in float32, rounded back to w.
    w, n, lr, wd = 1.0, 5_000_000, 2.9e-6, 1e-2  # lr·λ = 2.9e-8 < 2^-25, half an ulp below 1
    assert float(torch.tensor(w) - torch.tensor(lr * wd)) == w
    p = nn.Parameter(torch.full((n,), w, dtype=torch.bfloat16))
    opt = SRAdamW([p], lr=lr, weight_decay=wd, generator=torch.Generator().manual_seed(4))
    p.grad = torch.zeros_like(p)  # Adam's own term is 0 (m = v = 0): the decay alone
    opt.step()
    _assert_moves_in_expectation(p, w, 2.0**-8, float(torch.tensor(lr * wd * w, dtype=torch.float32)))


def test_float64_values_round_stochastically_to_bf16_and_int8_from_their_own_value() -> None:
    # The codecs' float64 form, which the optimizers write through: one grid step apart,
    # P(up) is the float64 value's own fraction (5σ, N = 400,000); non-finite values stay.
    gen = torch.Generator().manual_seed(5)
    n, frac = 400_000, 0.3
    for fmt, lo, step in (("bf16", 1.0, 2.0**-7), ("int8", 1.0, 2.0**-6),
                          ("bf16", 2.0**-130, 2.0**-133), ("bf16", -2.0**-130, 2.0**-133),
                          ("bf16", -3.0, 2.0**-6)):
        x = torch.full((n // 2, 2), lo + frac * step * (1 if lo > 0 else -1), dtype=torch.float64)
        if fmt == "bf16":
            y = stochastic_round_bf16(x, gen).double()
        else:
            y = decode_int8_per_channel(*encode_int8_per_channel(x, gen)).double()
        up = (y - lo).abs() == step
        assert bool(((y == lo) | up).all()), (fmt, lo)
        se = (frac * (1 - frac) / n) ** 0.5
        assert abs(float(up.double().mean()) - frac) < 5 * se, (fmt, lo)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e39, -1e39], dtype=torch.float64)
    y = stochastic_round_bf16(x, gen).float()
    assert y[0].isnan() and y[1] == float("inf") and y[2] == -float("inf")
    assert y[3] == torch.finfo(torch.bfloat16).max and y[4] == -torch.finfo(torch.bfloat16).max


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
def test_a_refused_param_group_leaves_every_weight_unwritten(cls: type) -> None:
    # A trial: group 1's float32 LayerNorm was refused after group 0 had been rounded onto
    # the int8 grid; the error named neither the group nor the parameter.
    torch.manual_seed(0)
    lin, norm = nn.Linear(64, 64).bfloat16(), nn.LayerNorm(64)
    before = lin.weight.detach().clone()
    with pytest.raises(TypeError, match=r"parameter 0 of param group 1 is torch.float32 .*no weight was written"):
        cls([{"params": lin.parameters()}, {"params": norm.parameters()}], lr=1e-3, weights="int8")
    assert torch.equal(lin.weight, before)
    cls([{"params": lin.parameters()}, {"params": norm.bfloat16().parameters()}], lr=1e-3, weights="int8")
    assert _on_int8_grid(lin.weight) and not torch.equal(lin.weight, before)


@pytest.mark.parametrize("cls", [SRSGD, SRAdamW])
def test_a_state_dict_of_other_storage_formats_is_refused(cls: type) -> None:
    # A trial: an int8/int8 checkpoint loaded into a bf16/bf16 optimizer and went on in
    # bf16, silently; and its weight codes then pulled bf16 weights onto the int8 grid.
    model, opt, _ = _make(cls, "int8")
    _train(model, opt, 2)
    saved = opt.state_dict()
    assert all(g["weight_format"] == "int8" and g["state_format"] == "int8" for g in saved["param_groups"])
    for weights, state in (("bf16", "bf16"), ("bf16", "int8"), ("int8", "bf16")):
        other = cls(model.parameters(), lr=0.01, weights=weights, state=state)
        built = {k: sorted(v) for k, v in other.state.items()}  # (int8 weights: their codes)
        with pytest.raises(ValueError, match=rf"param group 0 was saved with weights='int8', state='int8', "
                           rf"and this optimizer stores weights='{weights}', state='{state}'; nothing was loaded"):
            other.load_state_dict(saved)
        assert {k: sorted(v) for k, v in other.state.items()} == built
    again = cls(model.parameters(), lr=0.01, weights="int8", state="int8")
    again.load_state_dict(saved)  # the same formats: loads, and the keys stay out of its groups
    assert "weight_format" not in again.param_groups[0]
    assert torch.equal(again.state_dict()["state"][0]["weight_codes"], saved["state"][0]["weight_codes"])
    # without the record (torch's optimizers, older saves): loads; codes a bf16 optimizer
    # finds are dropped, the parameter is the weight (a step at lr 0 leaves it bitwise)
    legacy = {**saved, "param_groups": [{**{k: v for k, v in g.items() if not k.endswith("_format")}, "lr": 0.0}
                                        for g in saved["param_groups"]]}
    bf = cls(model.parameters(), lr=0.01, weights="bf16")
    bf.load_state_dict(legacy)
    with torch.no_grad():
        model[0].weight.normal_(0, 0.02)
    before = [p.detach().clone() for p in model.parameters()]
    _zero_grad_step(model, bf)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all("weight_codes" not in bf.state.get(p, {}) for p in model.parameters())


def test_torchs_keyword_arguments_are_taken_as_torch_takes_them() -> None:
    # A trial: SRAdamW's docstring refused maximize=True with a ValueError; the constructor
    # raised TypeError for maximize=False too (as for foreach=/fused= on both).
    a = nn.Linear(2, 2).bfloat16()
    SRSGD(a.parameters(), maximize=False, foreach=True, differentiable=False, fused=None)
    SRAdamW(a.parameters(), maximize=False, foreach=False, capturable=False, differentiable=False, fused=None)
    assert SRSGD(a.parameters()).defaults["lr"] == torch.optim.SGD(a.parameters()).defaults["lr"]
    for cls, key in ((SRSGD, "maximize"), (SRSGD, "differentiable"), (SRAdamW, "maximize"),
                     (SRAdamW, "capturable"), (SRAdamW, "differentiable")):
        with pytest.raises(ValueError, match=rf"{cls.__name__} does not implement {key}=True"):
            cls(a.parameters(), lr=0.1, **{key: True})


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_the_weight_write_in_pieces_draws_as_the_whole_tensors_codec(fmt: str) -> None:
    # _store_weight rounds w + Δ on the CPU in pieces of 2^16 elements (whole rows for
    # int8: 131 rows of 500 a piece here, 3 pieces): bitwise the codec of the whole float64
    # tensor on the same generator state (a review: pieces in another order passed every
    # test, whose weights were smaller than one piece)
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(300, 500).bfloat16())
    gen = torch.Generator().manual_seed(9)
    opt = SRSGD([p], lr=0.5, weights=fmt, generator=gen)
    w = p.detach().float().clone()  # the weight the step starts from (int8: its grid, exact)
    p.grad = torch.randn(300, 500).bfloat16()
    x = w.double() + (-0.5 * p.grad.float()).double()
    ref = torch.Generator().manual_seed(0)
    ref.set_state(gen.get_state())
    expected = stochastic_round_bf16(x, ref).float() if fmt == "bf16" else \
        decode_int8_per_channel(*encode_int8_per_channel(x, ref))
    opt.step()
    assert p.numel() > 2 * 2**16 and torch.equal(p.float(), expected)
    assert torch.equal(gen.get_state(), ref.get_state())


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize(("cls", "kw"), [(SRAdamW, {}), (SRSGD, {"momentum": 0.9, "weight_decay": 0.01})])
def test_distributed_checkpoint_resumes_bitwise(tmp_path, cls: type, kw: dict, flatten: bool) -> None:  # noqa: ANN001
    """A new user's trial: ``torch.distributed.checkpoint`` (``get_state_dict``, ``dcp.save``,
    then ``get_state_dict`` of a fresh model and optimizer as the dict to load into,
    ``dcp.load``, ``set_state_dict``) resumed int8 weights and state without Adam's moments
    and step (and SGD's momentum), without a word: a fresh optimizer's state held its
    weight codes, so DCP took it for initialised and its dict lacked every other key
    (DCP fills only the keys it finds); with biases the load raised torch's "Missing
    optimizer state". Now the resumed run is the uninterrupted one, bit for bit, nested
    or flattened (``StateDictOptions(flatten_optimizer_state_dict=True)``)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    opts = StateDictOptions(flatten_optimizer_state_dict=flatten)
    x = torch.randn(16, 8).bfloat16()

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).bfloat16()
        return m, cls(m.parameters(), lr=1e-2, weights="int8", state="int8",
                      generator=torch.Generator().manual_seed(1), **kw)

    def step(m: nn.Module, o: torch.optim.Optimizer) -> None:
        m(x).float().pow(2).mean().backward()
        o.step()
        o.zero_grad()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's own, without a process group
        m, o = build()
        for _ in range(3):
            step(m, o)
        msd, osd = get_state_dict(m, o, options=opts)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path))
        gen = o.generator.get_state()
        for _ in range(3):
            step(m, o)
        m2, o2 = build()
        msd2, osd2 = get_state_dict(m2, o2, options=opts)
        sd = {"model": msd2, "optim": osd2}
        dcp.load(sd, checkpoint_id=str(tmp_path))
        set_state_dict(m2, o2, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=opts)
        o2.generator.set_state(gen)
        assert {p: sorted(st) for p, st in zip(m.parameters(), (o2.state[q] for q in m2.parameters()))} \
            == {p: sorted(st) for p, st in zip(m.parameters(), (o.state[q] for q in m.parameters()))}
        for _ in range(3):
            step(m2, o2)
    for a, b in zip(m.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(m.parameters(), m2.parameters(), strict=True):
        assert all(torch.equal(v, o2.state[q][k]) if isinstance(v, torch.Tensor) else v == o2.state[q][k]
                   for k, v in o.state[p].items())


@pytest.mark.parametrize("drop", [("exp_avg_codes", "exp_avg_scale"), ("exp_avg_sq",), ("step",), ("exp_avg_scale",),
                                  ("weight_codes",)], ids="+".join)
def test_a_state_dict_missing_part_of_a_parameters_state_is_refused(drop: tuple[str, ...]) -> None:
    """The other half of the trial above: a state dict that holds a parameter's step but not
    its moments (or the reverse, or codes without their scales) restarted what it lacked
    from zero; now ``ValueError`` naming the parameter and the keys, nothing loaded."""
    model, opt, _ = _make(SRAdamW, "int8")
    _train(model, opt, 2)
    saved = opt.state_dict()
    pid = next(iter(saved["state"]))
    st = {k: v for k, v in saved["state"][pid].items() if k not in drop}
    assert len(st) == len(saved["state"][pid]) - len(drop)
    broken = {**saved, "state": {**saved["state"], pid: st}}
    fresh = SRAdamW(model.parameters(), lr=0.01, weights="int8", state="int8")
    with pytest.raises(ValueError, match=rf"parameter {pid} \(in param-group order\) has .*nothing was loaded"):
        fresh.load_state_dict(broken)
    assert not fresh.state
    fresh.load_state_dict(saved)  # whole: loads


def test_a_weight_without_the_constructors_codes_steps_from_itself() -> None:
    """A review of the change above: keeping no codes at construction must not change a
    step. A weight frozen when the optimizer was built (so not put on its grid), then
    unfrozen, takes its first step from its own value, rounded stochastically — ``E[w₁] =
    w₀ + Δ`` — not from its round-to-nearest codes (half a grid step of bias measured); the
    same after a ``torch.optim`` state dict without codes is loaded (it replaces the state,
    as it replaced stored codes); a weight the constructor put on its grid keeps those
    codes through ``copy.deepcopy``."""
    from lowbit.optim import decode_int8_per_channel

    lin = nn.Linear(16, 8, bias=False).bfloat16()
    lin.requires_grad_(False)
    opt = SRSGD(lin.parameters(), lr=0.0, weights="int8", generator=torch.Generator().manual_seed(3))
    lin.requires_grad_(True)
    before = lin.weight.detach().clone()
    assert not _on_int8_grid(before)
    lin.weight.grad = torch.zeros_like(lin.weight)
    opt.step()
    want = decode_int8_per_channel(*encode_int8_per_channel(before.double(), torch.Generator().manual_seed(3)))
    assert torch.equal(lin.weight.float(), want.float())

    torch.manual_seed(0)
    lin = nn.Linear(16, 8, bias=False).bfloat16()
    opt = SRAdamW(lin.parameters(), lr=1e-3, weights="int8", generator=torch.Generator().manual_seed(4))
    assert _on_int8_grid(lin.weight) and lin.weight in opt._on_grid
    twin = copy.deepcopy(opt)
    assert [p in twin._on_grid for g in twin.param_groups for p in g["params"]] == [True]
    ref = torch.optim.AdamW([torch.nn.Parameter(lin.weight.detach().float())], lr=1e-3)
    ref.param_groups[0]["params"][0].grad = torch.ones(8, 16)
    ref.step()
    opt.load_state_dict(ref.state_dict())
    assert len(opt._on_grid) == 0  # the loaded state has no codes: the weight steps from itself
