"""Variance monitor and adaptive precision (lowbit.monitor, lowbit.varstats, lowbit.adaptive).

* the per-sample-norm SGD estimator equals brute-force per-sample gradients (Linear rows,
  sequences by ghost norm and by per-sample products, Conv2d with padding/stride/groups);
* the monitor's quantization variance equals the quantizer's exact expectation, and a
  Monte-Carlo z-test over repeated backward passes (both paths, the input-shift probe);
* Hadamard figures use the very signs the layer drew;
* the monitor does not change training; adaptive decisions are deterministic under a seed
  and survive kill-and-resume bitwise; state round-trips.
"""

from __future__ import annotations

import contextlib

import copy
import io
import json
import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import FQTConfig, GradSpec
from lowbit.adaptive import AdaptivePolicy
from lowbit.analysis.variance import qat_of, with_config
from lowbit.formats import IntFormat
from lowbit.functional import quantize_forward
from lowbit.monitor import VarianceMonitor, path_generator
from lowbit.quantizers import get_quantizer
from lowbit.varstats import per_sample_sq_norms, product_row_norms, sgd_variance, total_sq_norm

QUANT = ["ptq", "psq", "bhq", "hadamard"]
# float32 products summed in float64 against a float64 brute force: a few ulps of float32
# per product, relative to the largest term
REL = 1e-5


def _cfg(q: str, bits: int, paths: str = "both", seed: int = 0) -> FQTConfig:
    gi = GradSpec(bits, q) if paths in ("both", "x") else None
    gw = GradSpec(bits, q) if paths in ("both", "w") else None
    return FQTConfig(grad_input=gi, grad_weight=gw, backend="reference", seed=seed)


# -- the estimator --------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 1, 5, 9), (6, 3, 16, 16), (5, 20, 8, 8)],
                         ids=["one-row", "ghost", "per-sample-product"])
def test_per_sample_sq_norms_equal_brute_force(shape: tuple[int, int, int, int]) -> None:
    b, t, o, k = shape
    g = torch.Generator().manual_seed(0)
    a, u = torch.randn(b, t, o, generator=g), torch.randn(b, t, k, generator=g)
    brute = torch.stack([(a[n].double().t() @ u[n].double()).square().sum() for n in range(b)])
    torch.testing.assert_close(per_sample_sq_norms(a, u), brute, rtol=REL, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0, 10.0])
def test_total_norm_in_bfloat16_keeps_the_sgd_estimate(alpha: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2²⁶-MAC product takes the bfloat16 GEMM: formula (1) within 1e-3 relative of the
    float64 value (the documented bound is 5e-4 up to coherence 0.9; Gaussian operands
    whose shared mean ``alpha`` sets the coherence from ~0 to ~0.98, where the float32
    fallback must give the float32 product exactly). (The bfloat16 path forced on: a CPU
    without bfloat16 units takes float32.)"""
    import lowbit.varstats as V

    monkeypatch.setattr(V, "bf16_gemms_fast", lambda device: True)
    g = torch.Generator().manual_seed(0)
    n, o, k = 1024, 256, 256
    a = alpha * torch.randn(o, generator=g) + torch.randn(n, o, generator=g)
    u = alpha * torch.randn(k, generator=g) + torch.randn(n, k, generator=g)
    sq = per_sample_sq_norms(a[:, None], u[:, None])
    exact = float((a.double().t() @ u.double()).square().sum())
    got = total_sq_norm(a, u, sq)
    assert sgd_variance(sq, got) == pytest.approx(sgd_variance(sq, exact), rel=1e-3)
    if exact > 0.9 * n * float(sq.sum()):  # coherent: redone in float32 (GEMM and the
        # norm's accumulation: a few float32 ulps; the bfloat16 GEMM would be off by ~1e-5)
        assert got == pytest.approx(exact, rel=2e-6)
    # the rows of a·w as per-sample gradients (the ∇X probe of a Linear, one row per sample)
    w = u[:o].t().contiguous() / 16  # (O, K)
    s64 = a.double() @ w.double()
    ref = sgd_variance(s64.square().sum(1), float(s64.sum(0).square().sum()))
    assert sgd_variance(*product_row_norms(a, w)) == pytest.approx(ref, rel=1e-3)


def test_the_bfloat16_shortcut_only_where_bfloat16_gemms_are_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault kind 255 (a docs audit on an AMD EPYC with AVX2 only): the monitor's 2²⁶-MAC
    products ran in bfloat16 on every CPU, where torch's bfloat16 matmul without
    bfloat16 units runs at 0.9 GFLOP/s against 50 for float32 — a monitored FFN step took
    114–137 s against 1.6–2.7 s. The shortcut now needs AVX-512 BF16 or AMX-BF16 (or a
    GPU); elsewhere the product is the float32 one, exactly."""
    import lowbit.varstats as V
    from lowbit.kernels import cbuild

    for flags, fast in ((frozenset({"avx2", "fma"}), False), (frozenset({"avx512_bf16"}), True),
                        (frozenset({"amx_bf16"}), True)):
        monkeypatch.setattr(cbuild, "cpu_flags", lambda flags=flags: flags)
        assert V.bf16_gemms_fast(torch.device("cpu")) is fast
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # a V100
    assert V.bf16_gemms_fast(torch.device("cuda")) is False
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert V.bf16_gemms_fast(torch.device("cuda")) is True
    monkeypatch.setattr(cbuild, "cpu_flags", lambda: frozenset({"avx2"}))
    g = torch.Generator().manual_seed(0)
    a, u = torch.randn(1024, 256, generator=g), torch.randn(1024, 256, generator=g)  # 2²⁶ MACs
    sq = per_sample_sq_norms(a[:, None], u[:, None])
    assert total_sq_norm(a, u, sq) == float(V.squared_norms(a.t() @ u))
    w = u[:256].t().contiguous()
    got_sq, got_total = product_row_norms(a, w)
    p = a @ w
    assert torch.equal(got_sq, V.squared_norms(p, 1)) and got_total == float(V.squared_norms(p.sum(0)))


def test_sgd_variance_of_identical_samples_is_zero_not_negative() -> None:
    # A trial: 16 identical samples gave sgd_w = -2.29e-09 (the two sums equal up to their
    # rounding) and a ratio of inf read against a negative variance; at least 0 now, and a
    # non-finite estimate stays non-finite.
    sq = torch.full((16,), 0.1, dtype=torch.float64)
    assert sgd_variance(sq, 16 * 16 * 0.1 * (1 + 1e-15)) == 0.0
    assert not math.isfinite(sgd_variance(sq, math.inf)) and math.isnan(sgd_variance(sq, math.nan))
    assert sgd_variance(sq * math.inf, 1.0) == math.inf
    m = lowbit.convert(torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)),
                       FQTConfig.from_recipe("fqt-psq-8"))
    mon = VarianceMonitor(m, every=1, sgd="per-sample")
    x = torch.randn(1, 20).repeat(16, 1)
    with mon.step():
        torch.nn.functional.cross_entropy(m(x), torch.zeros(16, dtype=torch.long)).backward()
    assert all(v.sgd_w >= 0 for v in mon.history[-1].layers.values()), mon.history[-1].layers


def test_sgd_variance_is_the_sample_variance_over_b() -> None:
    g = torch.Generator().manual_seed(1)
    per = torch.randn(9, 4, 3, generator=g, dtype=torch.float64)  # per-sample gradients G_n
    b = per.shape[0]
    s2 = (b * per).var(0, unbiased=True).sum()  # sample variance of the B·G_n
    got = sgd_variance(per.square().sum((1, 2)), float(per.sum(0).square().sum()))
    assert got == pytest.approx(float(s2 / b), rel=1e-12)
    assert math.isnan(sgd_variance(per[:1].square().sum((1, 2)), 1.0))


def _layer_model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(12, 7)), torch.randn(9, 12)
    if kind == "sequence":
        return nn.Sequential(nn.Linear(12, 7)), torch.randn(5, 6, 12)
    if kind == "conv":
        return nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1)), torch.randn(5, 4, 7, 7)
    if kind == "conv-groups-same":
        return nn.Sequential(nn.Conv2d(4, 6, 3, padding="same", groups=2, bias=False)), torch.randn(5, 4, 6, 6)
    raise ValueError(kind)


def _per_sample_grads(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor,
                      wrt: str) -> torch.Tensor:
    """Brute force: each sample's gradient of ``⟨layer_QAT(x_n), ∇Y_n⟩`` with respect to
    the layer's parameters (``wrt="w"``) or to a shift of its input (``wrt="x"``: per
    feature / per channel), through the layer's quantized forward operands."""
    cfg = layer.config
    conv = isinstance(layer, lowbit.FQTConv2d)
    wq = quantize_forward(layer.weight.detach().reshape(layer.weight.shape[0], -1),
                          cfg.weight).dequantize().reshape(layer.weight.shape).double()
    out = []
    for n in range(x.shape[0]):
        if conv:
            xp, pad = layer._explicit_padding(x)
            xq = quantize_forward(xp.reshape(xp.shape[0], -1), cfg.activation).dequantize().reshape(xp.shape)
        else:
            xq = quantize_forward(x.reshape(-1, x.shape[-1]), cfg.activation).dequantize().reshape(x.shape)
        xn = xq[n:n + 1].double()
        w = wq.clone().requires_grad_()
        bias = None if layer.bias is None else layer.bias.detach().double().requires_grad_()
        if wrt == "w":
            if conv:
                y = F.conv2d(xn, w, bias, layer.stride, pad, layer.dilation, layer.groups)
            else:
                y = F.linear(xn, w, bias)
            gs = torch.autograd.grad((y * gy[n:n + 1].double()).sum(), [w] + ([bias] if bias is not None else []))
        else:
            if conv:
                beta = torch.zeros(1, x.shape[1], 1, 1, dtype=torch.float64, requires_grad=True)
                xs, pad = layer._explicit_padding(x[n:n + 1].double() * 0 + beta)  # ∇β does not depend on x
                y = F.conv2d(xs, w.detach(), None, layer.stride, pad, layer.dilation, layer.groups)
            else:
                beta = torch.zeros(x.shape[-1], dtype=torch.float64, requires_grad=True)
                y = F.linear(xn * 0 + beta, w.detach())
            gs = torch.autograd.grad((y * gy[n:n + 1].double()).sum(), [beta])
        out.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(out)  # (B, params)


@pytest.mark.parametrize("kind", ["linear", "sequence", "conv", "conv-groups-same"])
def test_monitor_sgd_equals_brute_force_per_sample_gradients(kind: str) -> None:
    model, x = _layer_model(kind)
    lowbit.convert(model, _cfg("psq", 8))
    layer = model[0]
    mon = VarianceMonitor(model, every=1)
    x = x.requires_grad_()
    with mon.step():
        y = model(x)
        r = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
        (y * r).sum().backward()  # ∇Y = r: the only layer, so ∇Y is exact under FQT too
    v = mon.history[-1].layers["0"]
    b = x.shape[0]
    for wrt, got in (("w", v.sgd_w), ("x", v.sgd_x)):
        per = _per_sample_grads(layer, x.detach(), r, wrt)
        brute = (b * per.square().sum() - per.sum(0).square().sum()) / (b - 1)
        assert got == pytest.approx(float(brute), rel=REL), wrt
    # the per-sample gradients add up to the layer's own QAT gradient: same operands
    with with_config(model, qat_of):
        model.zero_grad()
        (model(x.detach()) * r).sum().backward()
    qat = torch.cat([p.grad.reshape(-1) for p in layer.parameters()]).double()
    torch.testing.assert_close(_per_sample_grads(layer, x.detach(), r, "w").sum(0), qat,
                               rtol=1e-5, atol=1e-5 * float(qat.abs().max()))


def _two_layers(kind: str) -> tuple[nn.Sequential, torch.Tensor]:
    """Two bias-free layers with a ReLU between (positively homogeneous: a power-of-two
    scale passes through exactly) and an input, from torch's global RNG."""
    if kind == "linear":
        return nn.Sequential(nn.Linear(8, 6, bias=False), nn.ReLU(), nn.Linear(6, 4, bias=False)), torch.randn(16, 8)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(4, 2, 3, padding=1, bias=False)), torch.randn(4, 3, 6, 6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_monitor_of_a_float64_model_keeps_float64_range(kind: str) -> None:
    """The monitor cast ∇Y and the operands to float32 (and large products to bfloat16):
    a float64 model at inputs scaled by 2⁻²⁰⁰ measured 0 variance, at 2²⁰⁰ NaN. Every
    statistic is equivariant under a power-of-two scale (same noise: one seed), so the
    scaled run must give the unscaled one's times s⁴ (∇W paths) or s² (∇X paths), to
    float64 rounding."""
    def run(s: float) -> list[float]:
        torch.manual_seed(0)
        model, x = _two_layers(kind)
        model, x = model.double(), (x.double() * s).requires_grad_()
        lowbit.convert(model, _cfg("bhq", 4))
        mon = VarianceMonitor(model, every=1)
        with mon.step():
            y = model(x)
            (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * s
             ).sum().backward()
        v = mon.history[-1].layers["2"]
        return [v.sgd_w, v.sgd_x, v.quant_w, v.quant_x]
    base = run(1.0)
    assert all(math.isfinite(b) and b > 0 for b in base)
    for s in (2.0 ** -200, 2.0 ** 200):
        got = run(s)
        for g, b, p in zip(got, base, (s ** 4, s ** 2, s ** 4, s ** 2)):
            assert g / p == pytest.approx(b, rel=1e-12)


# -- quantization variance ------------------------------------------------------------------
@pytest.mark.parametrize("quantizer", QUANT)
def test_quant_variance_is_the_quantizers_expected_variance(quantizer: str) -> None:
    """With ``Q_f(X) = I`` the ∇W-path variance is ``expected_variance(∇Yᵀ)`` itself, and
    with ``Q_f(W) = I`` the ∇X-path one is ``expected_variance(∇Y)`` (formula (2) with
    unit row norms)."""
    d = 16
    lin = nn.Linear(d, d, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(d))  # 8-bit per-tensor: exactly I after Q_f
    model = lowbit.convert(nn.Sequential(lin), _cfg(quantizer, 4))
    mon = VarianceMonitor(model, every=1)
    x = torch.eye(d).requires_grad_()  # Q_f(X) = I exactly
    gy = torch.randn(d, d, generator=torch.Generator().manual_seed(5)) * torch.logspace(-3, 0, d)[:, None]
    seen = {}

    def grab(g: torch.Tensor) -> None:  # the generators the layer is about to use
        seen["w"] = path_generator(model[0], "grad_weight", g.device)
        seen["x"] = path_generator(model[0], "grad_input", g.device)

    with mon.step():
        y = model(x)
        y.register_hook(grab)
        y.backward(gy)
    v = mon.history[-1].layers["0"]
    q, fmt = get_quantizer(quantizer), IntFormat(4)
    assert v.quant_w == pytest.approx(float(q.expected_variance(gy.t(), fmt, seen["w"])), rel=1e-12)
    assert v.quant_x == pytest.approx(float(q.expected_variance(gy, fmt, seen["x"])), rel=1e-12)


def _mc_model(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    if kind == "sequence":
        m, x = nn.Sequential(nn.Linear(10, 12)), torch.randn(4, 5, 10)
    else:
        m, x = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)), torch.randn(3, 4, 6, 6)
    y = m(x)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    gy = gy * torch.logspace(-2, 0, gy.shape[0]).reshape(-1, *[1] * (gy.dim() - 1))  # unequal samples
    return m, x, gy


@pytest.mark.parametrize("kind", ["sequence", "conv"])
@pytest.mark.parametrize("quantizer", QUANT)
def test_quant_variance_monte_carlo(kind: str, quantizer: str) -> None:
    """``‖g_FQT − g_QAT‖²`` over R independent backward passes of one batch, against the
    monitor's figure on each pass: the mean of the differences is 0 (z-test at 5σ, CLT
    over R = 300 draws; for Hadamard the figure is given each draw's own signs, so the
    differences are paired per draw). Checked on ∇W, ∇X and the input-shift probe ∇β."""
    model, x, gy = _mc_model(kind)
    lowbit.convert(model, _cfg(quantizer, 3))
    layer = model[0]
    mon = VarianceMonitor(model, every=1)
    feat = (0, 2, 3) if kind == "conv" else tuple(range(x.dim() - 1))

    def grads() -> tuple[torch.Tensor, torch.Tensor]:
        xi = x.clone().requires_grad_()
        layer.weight.grad = None
        model(xi).backward(gy)
        return layer.weight.grad.double(), xi.grad.double()

    with with_config(model, qat_of):
        w0, x0 = grads()
    diffs = []
    for _ in range(300):
        with mon.step():
            w, gx = grads()
        v = mon.history[-1].layers["0"]
        diffs.append([float((w - w0).square().sum()) - v.quant_w,
                      float((gx - x0).square().sum()) - v.quant_x,
                      float((gx - x0).sum(feat).square().sum()) - v.quant_x_shift])
    d = torch.tensor(diffs, dtype=torch.float64)
    z = d.mean(0) / (d.std(0) / math.sqrt(d.shape[0]))
    assert z.abs().max() < 5, f"monitor variance differs from Monte-Carlo: z = {z.tolist()}"


def test_hadamard_uses_the_layers_own_signs() -> None:
    """With ``Q_f(X) = I`` the layer's ∇W is ``Q(∇Yᵀ) = T⁻¹·step·codes`` exactly, so the
    transform the monitor rebuilds must map it onto the grid; another draw does not."""
    d = 16
    model = lowbit.convert(nn.Sequential(nn.Linear(d, d, bias=False)), _cfg("hadamard", 4, "w"))
    layer = model[0]
    gy = torch.randn(d, d, generator=torch.Generator().manual_seed(7))
    q = get_quantizer("hadamard")
    got = {}

    def grab(g: torch.Tensor) -> None:
        a = g.t().float()
        got["t"] = q.transform(a, path_generator(layer, "grad_weight", g.device))
        wrong = torch.Generator().manual_seed(12345)
        got["other"] = q.transform(a, wrong)
        got["a"] = a

    y = model(torch.eye(d))
    y.register_hook(grab)
    y.backward(gy)
    for key, on_grid in (("t", True), ("other", False)):
        t = got[key]
        step = t.forward(got["a"]).abs().amax(1, keepdim=True) / IntFormat(4).qmax
        z = t.forward(layer.weight.grad.float()) / step
        off = float((z - z.round()).abs().max())
        assert (off < 1e-3) is on_grid, (key, off)


# -- the monitor in training ----------------------------------------------------------------
def _net(bn: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm2d(6)] if bn else []
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), *norm, nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 5 * 5, 16), nn.ReLU(), nn.Linear(16, 4))


def _via_checkpoint(state: dict) -> dict:
    """``state`` after torch.save / torch.load(weights_only=True), as the trainer stores it."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _train(steps: int, recipe: str, monitor: str | None, seed: int = 0,
           resume_at: int | None = None, bn: bool = False) -> tuple[list[torch.Tensor], list, dict]:
    """SGD on fixed random data; ``monitor``: None, "observe" or "adapt"; with
    ``resume_at`` the run is checkpointed there and continued in fresh objects."""
    g = torch.Generator().manual_seed(99)
    data = [(torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 4, (8,), generator=g))
            for _ in range(steps)]

    def build() -> tuple:
        model = lowbit.convert(_net(bn), FQTConfig.from_recipe(recipe, seed=seed, backend="reference"))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        mon = None
        if monitor == "observe":
            mon = VarianceMonitor(model, every=2)
        elif monitor == "adapt":
            mon = VarianceMonitor(model, every=2, policy=AdaptivePolicy.from_recipe(recipe, target=0.02))
        return model, opt, mon

    model, opt, mon = build()
    for i, (xb, yb) in enumerate(data):
        if i == resume_at:
            ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(),
                                  "rng": lowbit.rng_state(model), "mon": mon.state_dict()})
            model, opt, mon = build()  # "killed": fresh objects, state from the checkpoint
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
            lowbit.load_rng_state(model, ckpt["rng"])
            mon.load_state_dict(_via_checkpoint(ckpt["mon"]))
        opt.zero_grad()
        if mon is None:
            F.cross_entropy(model(xb), yb).backward()
        else:
            with mon.step():
                F.cross_entropy(model(xb), yb).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    return params, [] if mon is None else mon.decisions, {} if mon is None else mon.state_dict()


def _same(a: dict, b: dict) -> bool:
    """Equal to the last bit (floats by repr, NaN equal to NaN, tensors element by element)."""
    def plain(x: object) -> object:
        return x.double().tolist() if isinstance(x, torch.Tensor) else repr(x)
    return json.dumps(a, sort_keys=True, default=plain) == json.dumps(b, sort_keys=True, default=plain)


def test_monitor_leaves_training_bitwise_unchanged() -> None:
    rng = torch.get_rng_state()
    with_mon, _, state = _train(4, "fqt-hadamard-4", "observe")
    without, _, _ = _train(4, "fqt-hadamard-4", None)
    assert all(torch.equal(a, b) for a, b in zip(with_mon, without))
    assert len(state["history"]) == 2  # steps 0 and 2
    torch.set_rng_state(rng)


def test_adaptive_decisions_deterministic_and_resume_bitwise(caplog) -> None:  # noqa: ANN001
    with caplog.at_level("INFO", logger="lowbit.monitor"):
        p1, d1, s1 = _train(6, "fqt-auto", "adapt", seed=3)
    logged = [r.getMessage() for r in caplog.records if " -> " in r.getMessage()]
    assert [m.split(": ")[:2] for m in logged] == [  # each change logged, its layer quoted
        [f"step {d.step}", f"layer '{d.layer}' {d.path}"] for d in d1]
    p2, d2, s2 = _train(6, "fqt-auto", "adapt", seed=3)
    assert d1 and d1 == d2, "the policy must decide, and the same way under a seed"
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    p3, d3, s3 = _train(6, "fqt-auto", "adapt", seed=3, resume_at=3)
    assert d3 == d1 and _same(s3, s1)
    assert all(torch.equal(a, b) for a, b in zip(p1, p3))
    for dec in d1:  # every move lands on a candidate of the recipe
        assert dec.new_quantizer in ({"psq", "bhq"} if dec.path == "grad_input" else {"psq"})
        assert 2 <= dec.new_bits <= 8
    # the bit sums replay the decisions: a decision at step k applies from step k + 1
    for layer, paths in s1["bit_sums"].items():
        for path, total in paths.items():
            bits, expect = 8, 0
            for step in range(6):
                expect += bits
                for dec in d1:
                    if (dec.step, dec.layer, dec.path) == (step, layer, path):
                        bits = dec.new_bits
            assert total == expect, (layer, path)


def test_paired_estimate_is_half_the_squared_difference_of_qat_gradients() -> None:
    """``sgd="paired"``: on the monitored step, ``½‖g_k − g_{k−1}‖²`` of the layer's QAT
    weight + bias gradients on this step's and the previous step's minibatch (no optimizer
    step between them here, so it is exactly that). Only the ∇W path is quantized: a
    quantized ∇X path downstream would put its noise into this layer's ∇Y."""
    model = lowbit.convert(_net(), _cfg("psq", 4, "w"))
    mon = VarianceMonitor(model, every=2, sgd="paired")
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(3)]
    for xb, yb in batches:
        with mon.step():
            model.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
    assert [r.step for r in mon.history] == [0, 2]
    assert math.isnan(mon.history[0].layers["3"].sgd_w)  # step 0: no step before it
    qat = []
    with with_config(model, qat_of):
        for xb, yb in batches[1:]:
            model.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            qat.append({n: torch.cat([p.grad.reshape(-1).double() for p in lay.parameters()])
                        for n, lay in mon.layers.items()})
    for name, v in mon.history[1].layers.items():
        want = float((qat[1][name] - qat[0][name]).square().sum()) / 2
        assert v.sgd_w == pytest.approx(want, rel=1e-5), name
        assert v.ratio_w == pytest.approx(v.quant_w / want, rel=1e-5)
        assert not math.isnan(v.sgd_w_samples)  # the per-sample estimate is kept beside it


def test_batchnorm_models_pair_by_default_and_resume_bitwise() -> None:
    assert VarianceMonitor(lowbit.convert(_net(bn=True), _cfg("psq", 8)), every=1).sgd == "paired"
    assert VarianceMonitor(lowbit.convert(_net(), _cfg("psq", 8)), every=1).sgd == "per-sample"
    with pytest.raises(ValueError, match="sgd must be 'auto', 'per-sample' or 'paired', got 'x'"):
        VarianceMonitor(lowbit.convert(_net(), _cfg("psq", 8)), every=1, sgd="x")
    # killed after step 3 (the step before monitored step 4): its gradients are in the state
    p1, d1, s1 = _train(6, "fqt-auto", "adapt", seed=1, bn=True)
    p2, d2, s2 = _train(6, "fqt-auto", "adapt", seed=1, bn=True, resume_at=4)
    assert s1["pair"] is not None and d1 == d2 and _same(s1, s2)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_state_round_trip() -> None:
    _, _, state = _train(3, "fqt-auto-bhq", "adapt")
    model = lowbit.convert(_net(), FQTConfig.from_recipe("fqt-auto-bhq", seed=0))
    mon = VarianceMonitor(model, every=2, policy=AdaptivePolicy.from_recipe("fqt-auto-bhq", target=0.02))
    mon.load_state_dict(json.loads(json.dumps(state)))
    assert _same(mon.state_dict(), state)
    bits = {n: (lay.config.grad_input.bits, lay.config.grad_weight.bits) for n, lay in mon.layers.items()}
    assert bits == {n: (s["grad_input"][1], s["grad_weight"][1]) for n, s in state["specs"].items()}
    other = VarianceMonitor(lowbit.convert(_net(), FQTConfig.from_recipe("fqt-auto-bhq")), every=2)
    with pytest.raises(ValueError, match="monitor state has policy"):
        other.load_state_dict(state)


# -- the policy and the edges ---------------------------------------------------------------
def test_policy_fewest_bits_with_hysteresis() -> None:
    pol = AdaptivePolicy(target=0.1, down=0.5, min_bits=4, max_bits=8, grad_input=("psq", "bhq"))
    r = {("psq", b): 0.2 * 4.0 ** (6 - b) for b in range(4, 9)} | \
        {("bhq", b): 0.1 * 4.0 ** (6 - b) for b in range(4, 9)}
    t = 0.1
    assert pol.choose("grad_input", ("psq", 6), r, t) == ("bhq", 6)  # 0.2 > 0.1: fewest bits meeting it
    assert pol.choose("grad_input", ("psq", 7), r, t) == ("psq", 7)  # 0.05 ≤ 0.1, nothing ≤ 0.05 below
    r2 = {k: v / 8 for k, v in r.items()}
    assert pol.choose("grad_input", ("psq", 8), r2, t) == ("bhq", 5)  # bhq5: 0.05 ≤ 0.5·0.1, bhq4: 0.2
    assert pol.choose("grad_input", ("psq", 8), r2, t / 4) == ("bhq", 6)  # a smaller share: more bits
    assert pol.choose("grad_weight", ("psq", 8), {("psq", b): 1.0 for b in range(4, 9)}, t) == ("psq", 8)
    nan = {k: math.nan for k in r}
    assert pol.choose("grad_input", ("psq", 6), nan, t) == ("psq", 6)
    # moving up, a candidate with fewer bits than now is a move down and needs down·target
    # (a review: psq6 at 1.2·target went to bhq5 at 0.9·target, past the hysteresis)
    r3 = {c: 1.0 for c in pol.candidates("grad_input")} | {("psq", 6): 0.12, ("bhq", 5): 0.09, ("psq", 7): 0.03}
    assert pol.choose("grad_input", ("psq", 6), r3, t) == ("psq", 7)
    assert pol.choose("grad_input", ("psq", 6), r3 | {("bhq", 5): 0.04}, t) == ("bhq", 5)
    assert pol.candidates("grad_input")[:3] == [("psq", 4), ("bhq", 4), ("psq", 5)]
    # the budget: half to the ∇W path, the other half split over the ∇X paths
    assert pol.path_target("grad_weight", 10) == pytest.approx(0.05)
    assert pol.path_target("grad_input", 10) == pytest.approx(0.005)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 0}, "target must be a positive finite number"),
    ({"down": 2}, "down must be at most 1"),
    ({"input_share": 1}, r"input_share must be a number in \(0, 1\), got 1"),
    ({"min_bits": 6, "max_bits": 5}, r"min_bits \(6\) exceeds max_bits \(5\)"),
    ({"grad_input": ("psq", "nope")}, "grad_input must be a non-empty tuple of distinct quantizers"),
    ({"grad_input": ("psq", "psq")}, "grad_input must be a non-empty tuple of distinct quantizers"),
    ({"target": "0.1"}, "target must be a real number"),
    ({"grad_weight": "psq"}, "grad_weight must be a non-empty tuple"),
    ({"grad_input": 3}, "grad_input must be a non-empty tuple"),
])
def test_policy_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptivePolicy(**kwargs)


def test_policy_moves_a_width_outside_its_range_into_it_and_never_to_a_nan_ratio() -> None:
    """The fqt-auto recipes start at 8 bits; under ``max_bits=6`` a path whose 8-bit ratio
    met the target but no ≤ 6-bit one the hysteresis threshold stayed at 8 bits for ever
    (a review): a current spec outside the candidates goes to the fewest-bit candidate
    meeting the target, else the lowest-ratio one at ``max_bits``. A NaN-ratio candidate
    listed first was chosen by ``min`` when moving up."""
    pol = AdaptivePolicy.from_recipe("fqt-auto-psq", max_bits=6)
    r = {("psq", b): 0.04 * 4.0 ** (6 - b) for b in range(2, 9)}  # 6 bits: 0.04, within 0.05
    t = pol.path_target("grad_weight", 1)  # 0.05
    assert pol.choose("grad_weight", ("psq", 8), r, t) == ("psq", 6)
    assert pol.choose("grad_weight", ("psq", 8), {k: 4 * v for k, v in r.items()}, t) == ("psq", 6)  # none meets it
    assert pol.choose("grad_input", ("bhq", 6), r | {("bhq", 6): 0.01}, t) == ("psq", 6)  # an unlisted quantizer
    two = AdaptivePolicy(grad_input=("bhq", "psq"))
    ratios = {("bhq", 8): math.nan, ("psq", 8): 1.0, ("bhq", 7): math.nan, ("psq", 7): 2.0}
    assert two.choose("grad_input", ("psq", 8), ratios, 0.05) == ("psq", 8)
    # NumPy's scalars are numbers too (kept as float)
    assert AdaptivePolicy(target=np.float32(0.25), input_share=np.float64(0.5)).target == 0.25
    # a trial: a path the monitor cannot measure (NaN) stayed at the 8-bit start under
    # max_bits=6; it goes to its quantizer at the nearest allowed width
    assert pol.choose("grad_weight", ("psq", 8), {k: math.nan for k in r}, t) == ("psq", 6)
    # an unlisted quantizer unmeasured: the first listed one at the width clamped (a review:
    # bhq4 went to psq8, the last candidate)
    assert AdaptivePolicy(grad_weight=("psq",)).choose("grad_weight", ("bhq", 4), {c: math.nan for c in
                                                       [("bhq", 4), *pol.candidates("grad_weight")]}, t) == ("psq", 4)
    low = AdaptivePolicy.from_recipe("fqt-auto-psq", min_bits=5)
    assert low.choose("grad_weight", ("psq", 3), {("psq", b): math.nan for b in range(2, 9)}, t) == ("psq", 5)
    # and at max_bits, with none meeting the target, PSQ and BHQ swapped places on the
    # ratios' noise (3.53e-5 against 3.36e-5): another quantizer only at down × the ratio
    both = AdaptivePolicy(target=1e-6, grad_input=("psq", "bhq"))
    noisy = {c: 1.0 for c in both.candidates("grad_input")} | {("psq", 8): 3.53e-5, ("bhq", 8): 3.36e-5}
    assert both.choose("grad_input", ("psq", 8), noisy, 1e-6) == ("psq", 8)
    assert both.choose("grad_input", ("psq", 8), noisy | {("bhq", 8): 1.7e-5}, 1e-6) == ("bhq", 8)


def test_policy_takes_any_iterable_of_quantizers_whole() -> None:
    """A generator was used up by the check and stored as () (the ∇X paths then stayed at
    the start width); any iterable is read once into the tuple."""
    assert AdaptivePolicy(grad_input=(q for q in ["psq", "bhq"])).grad_input == ("psq", "bhq")
    assert AdaptivePolicy(grad_weight=["psq"]).grad_weight == ("psq",)


def test_adaptive_recipes() -> None:
    for name, gi in (("fqt-auto", ("psq", "bhq")), ("fqt-auto-psq", ("psq",)), ("fqt-auto-bhq", ("bhq",))):
        assert name in lowbit.RECIPES
        cfg = FQTConfig.from_recipe(name, seed=1)
        assert (cfg.grad_input.bits, cfg.grad_input.quantizer) == (8, gi[0])
        assert (cfg.grad_weight.bits, cfg.grad_weight.quantizer) == (8, "psq")
        assert AdaptivePolicy.from_recipe(name).grad_input == gi
    with pytest.raises(ValueError, match="'fqt-psq-8' is not an adaptive recipe"):
        AdaptivePolicy.from_recipe("fqt-psq-8")


def test_adaptive_recipe_without_its_policy_warns_once_per_layer_and_says_so() -> None:
    """An ``fqt-auto*`` config trained without the policy that chooses its widths runs its
    fixed 8-bit start (bitwise fqt-psq-8): each layer warns once, naming the recipe and
    what drives it (fault kind 26); under ``VarianceMonitor(policy=...)`` nothing warns,
    and after ``close()`` the layers are no longer driven. The recipe name survives
    ``to_dict``/``from_dict``; explicit widths on it are refused."""
    import warnings

    from lowbit.ops import AdaptiveRecipeWarning

    def steps(mon: VarianceMonitor | None, model: nn.Module, n: int = 2) -> list:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(n):
                x = torch.randn(8, 2, 5, 5)
                if mon is None:
                    model(x).square().mean().backward()
                else:
                    with mon.step():
                        model(x).square().mean().backward()
        return [w for w in caught if issubclass(w.category, AdaptiveRecipeWarning)]

    cfg = FQTConfig.from_recipe("fqt-auto", seed=0)
    assert cfg.adaptive == "fqt-auto" and FQTConfig.from_dict(cfg.to_dict()) == cfg
    assert FQTConfig.from_recipe("fqt-psq-8").adaptive is None
    plain = lowbit.convert(_net(False), cfg)
    got = steps(None, plain)
    assert len(got) == len(lowbit.fqt_layers(plain))  # once per layer, not per step
    assert "of recipe 'fqt-auto' trains at the recipe's fixed 8-bit start: the recipe chooses " \
           "gradient bit widths only for the layers that " \
           "lowbit.monitor.VarianceMonitor(model, every, policy=lowbit.adaptive.AdaptivePolicy" \
           ".from_recipe('fqt-auto')) drives" in str(got[0].message)
    assert {str(w.message).split("'")[1] for w in got} == set(lowbit.fqt_layers(plain))  # names the layer
    driven = lowbit.convert(_net(False), cfg)
    mon = VarianceMonitor(driven, every=1, policy=AdaptivePolicy.from_recipe("fqt-auto"))
    assert not mon.skipped and steps(mon, driven) == []
    mon.close()
    assert all(not lay._block.policy_driven for lay in lowbit.fqt_layers(driven).values())
    # a layer the monitor cannot drive says why it stays at 8 bits (a Conv1d here)
    mixed = lowbit.convert(nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(9, 4)), cfg)
    mon = VarianceMonitor(mixed, every=1, policy=AdaptivePolicy.from_recipe("fqt-auto"))
    assert set(mon.skipped) == {"0"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mon.step():
            mixed(torch.randn(8, 2, 5)).square().mean().backward()
    got = [str(w.message) for w in caught if issubclass(w.category, AdaptiveRecipeWarning)]
    assert got == [f"lowbit: layer '0' of recipe 'fqt-auto' trains at the recipe's fixed 8-bit start: "
                   f"the VarianceMonitor attached to the model cannot drive it ({mon.skipped['0']})"]
    mon.close()
    assert mixed[0]._block.undriven is None
    with pytest.raises(ValueError, match="gradient bits conflict with the adaptive recipe 'fqt-auto'"):
        cfg.with_grad_bits(4)
    with pytest.raises(ValueError, match="adaptive must be one of fqt-auto, fqt-auto-psq, fqt-auto-bhq"):
        FQTConfig(adaptive="fqt-psq-8")


def test_a_copy_of_an_adapted_layer_warns_with_the_widths_it_has() -> None:
    """A new user's trial: a ``copy.deepcopy`` of an ``fqt-auto`` model whose policy had
    adapted its widths warned that each layer "trains at the recipe's fixed 8-bit start",
    while the copy kept the adapted widths; the warning now names them."""
    import dataclasses
    import warnings

    from lowbit.config import describe
    from lowbit.ops import AdaptiveRecipeWarning

    cfg = FQTConfig.from_recipe("fqt-auto", seed=0)
    model = lowbit.convert(_net(False), cfg)
    layer = lowbit.fqt_layers(model)["3"]  # as a policy leaves it: ∇X at 4-bit BHQ
    layer.config = dataclasses.replace(layer.config, grad_input=dataclasses.replace(
        layer.config.grad_input, bits=4, format="int4", quantizer="bhq"))
    twin = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        twin(torch.randn(8, 2, 5, 5)).square().mean().backward()
    got = {str(w.message).split("'")[1]: str(w.message) for w in caught
           if issubclass(w.category, AdaptiveRecipeWarning)}
    widths = describe(twin[3].config).split("/", 1)[1]
    assert widths.endswith("/auto:fqt-auto")  # describe marks the adaptive recipe; the warning names it apart
    widths = widths.rsplit("/", 1)[0]
    assert widths.startswith("gi:bhq4")
    assert f"layer '3' of recipe 'fqt-auto' trains at the gradient widths it has now, fixed ({widths}):" in got["3"]
    assert "trains at the recipe's fixed 8-bit start:" in got["5"]  # not adapted: the start


def test_a_closed_monitor_refuses_to_step() -> None:
    """A new user's trial: after ``close()``, ``with monitor.step():`` still counted a
    step, appended an empty record and warned that no monitored layer ran inside the
    block (blaming the training loop)."""
    model = lowbit.convert(_net(), _cfg("psq", 8))
    mon = VarianceMonitor(model, every=1)
    with mon.step():
        model(torch.randn(8, 2, 5, 5)).square().mean().backward()
    mon.close()
    with pytest.raises(RuntimeError, match=r"VarianceMonitor is closed \(close\(\) removed its hooks\)"):
        with mon.step():
            model(torch.randn(8, 2, 5, 5)).square().mean().backward()
    assert len(mon.history) == 1 and mon.steps == 1


def test_monitor_errors_and_skips() -> None:
    with pytest.raises(ValueError, match="every must be a positive int, got 0"):
        VarianceMonitor(lowbit.convert(_net(), _cfg("psq", 8)), every=0)
    with pytest.raises(ValueError, match="no monitorable converted layer: convert the model"):
        VarianceMonitor(_net(), every=1)
    with pytest.raises(ValueError, match="gradients not quantized"):
        VarianceMonitor(lowbit.convert(_net(), FQTConfig.from_recipe("qat-8")), every=1)
    model = lowbit.convert(_net(), FQTConfig.from_recipe("fqt-psq-8"))
    model[5].config = FQTConfig.from_recipe("fqt-psq-8-predicted")
    mon = VarianceMonitor(model, every=1)
    assert set(mon.skipped) == {"5"} and "predicted" in mon.skipped["5"]
    assert set(mon.layers) == {"0", "3"}
    # a clipping (*_spec) gradient format is biased: no rounding variance to report
    with pytest.warns(UserWarning, match="mxfp4_spec clips a block's largest values"):
        model[5].config = FQTConfig(grad_input=GradSpec(quantizer="psq", format="mxfp4_spec"))
    mon = VarianceMonitor(model, every=1)
    assert set(mon.skipped) == {"5"} and "_spec" in mon.skipped["5"]


def test_a_copy_of_a_monitored_model_is_not_monitored() -> None:
    """Pickling a monitored model failed (the hook was a local function) and a deepcopy's
    hooks fed the original monitor. A copy now trains unmonitored (its layers say so too,
    BlockState's rule), and the original monitor sees only the original's steps."""
    import pickle

    torch.manual_seed(0)
    model = lowbit.convert(_net(), _cfg("psq", 8))
    mon = VarianceMonitor(model, every=1)
    x, y = torch.randn(16, 2, 5, 5), torch.randint(0, 4, (16,))
    with mon.step():
        F.cross_entropy(model(x), y).backward()
    measured = mon.history[-1].layers
    assert set(measured) == set(mon.layers)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        n = len(mon.history)
        with mon.step():  # a monitored step of the copy alone: nothing reaches mon
            F.cross_entropy(clone(x), y).backward()
        assert len(mon.history) == n or not mon.history[-1].layers
        with mon.step():
            F.cross_entropy(model(x), y).backward()
        assert set(mon.history[-1].layers) == set(mon.layers)  # the original is still measured


def test_a_policy_on_a_fixed_recipe_or_other_quantizers_is_refused() -> None:
    """A policy rewrites gradient bit widths: on a model converted with a fixed recipe
    (``fqt-psq-4``) it once silently turned the requested psq8 ∇W into psq3/psq4 and kept
    ∇X on psq although the policy's was bhq. Refused at construction, naming the layer;
    a matching adaptive recipe and policy are accepted."""
    fixed = lowbit.convert(_net(), FQTConfig.from_recipe("fqt-psq-4", seed=0))
    with pytest.raises(ValueError, match=r"fixed recipe .*adaptive recipe"):
        VarianceMonitor(fixed, every=1, policy=AdaptivePolicy.from_recipe("fqt-auto-bhq"))
    auto_psq = lowbit.convert(_net(), FQTConfig.from_recipe("fqt-auto-psq", seed=0))
    with pytest.raises(ValueError, match=r"quantizes grad_input with 'psq', not among"):
        VarianceMonitor(auto_psq, every=1, policy=AdaptivePolicy(grad_input=("bhq",)))
    VarianceMonitor(auto_psq, every=1, policy=AdaptivePolicy.from_recipe("fqt-auto-psq"))


def _mlp(bn: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64)] + ([nn.BatchNorm1d(64)] if bn else [])
    return lowbit.convert(nn.Sequential(*layers, nn.ReLU(), nn.Linear(64, 4)),
                          FQTConfig.from_recipe("fqt-psq-8", seed=0))


def test_gradient_accumulation_is_named_and_paired_measures_it(caplog) -> None:
    """Micro-batches accumulated inside one monitored step made every per-sample ratio
    NaN without a word, and fqt-auto then ran at fixed widths. Now a warning (once per
    layer) names the cause and the remedy; sgd='paired' sums the calls and measures."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)) for _ in range(3)]
    for sgd in ("per-sample", "paired"):
        model = _mlp(bn=False)
        mon = VarianceMonitor(model, every=1, sgd=sgd)
        caplog.clear()
        with caplog.at_level("WARNING", logger="lowbit.monitor"):
            for x, y in batches:
                with mon.step():
                    for xs, ys in zip(x.chunk(4), y.chunk(4)):  # 4 micro-batches
                        (F.cross_entropy(model(xs), ys) / 4).backward()
        v = mon.history[-1].layers["2"]
        warned = [r.message for r in caplog.records if "ran 4 times in one monitored step" in r.message]
        if sgd == "per-sample":
            assert math.isnan(v.ratio_w) and math.isnan(v.ratio_x)
            assert len(warned) == 3  # once per layer, not once per step
            # naming the layer quoted: "layer 2: ran 4 times" read as a count (a new user's trial)
            assert sorted(w.split(": ran ")[0] for w in warned) == [f"lowbit.monitor: layer '{n}'" for n in "024"]
            said = {w.split("'")[1]: w for w in warned}  # the ratios the calls left NaN (the first layer has no ∇X)
            assert "so its ratio_w and ratio_x are NaN and a policy leaves the layer as it is" in said["2"]
            assert "so its ratio_w is NaN and a policy leaves that path as it is" in said["0"]
        else:
            assert math.isfinite(v.ratio_w) and math.isfinite(v.ratio_x) and not warned


def test_a_shared_layer_is_said_to_lose_only_the_ratios_its_calls_span(caplog) -> None:
    """A new user's trial: a layer called twice, of which only one call needs ∇X, has a
    finite ratio_x that a policy acts on, but the warning said "its ratios are NaN and a
    policy leaves it as it is"; it now names the ratio the calls left NaN."""
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # b on the input (no ∇X) and on a(x)
            return self.c(self.b(x) + self.b(torch.relu(self.a(x))))

    model = lowbit.convert(Shared(), FQTConfig.from_recipe("fqt-psq-8", seed=0))
    mon = VarianceMonitor(model, every=1)
    with caplog.at_level("WARNING", logger="lowbit.monitor"):
        for _ in range(2):
            with mon.step():
                model(torch.randn(32, 16)).square().mean().backward()
    v = mon.history[-1].layers["b"]
    assert v.calls == 2 and math.isnan(v.ratio_w) and math.isfinite(v.ratio_x)
    (said,) = [r.message for r in caplog.records if "ran 2 times" in r.message]
    assert "so its ratio_w is NaN and a policy leaves that path as it is" in said


@pytest.mark.parametrize("sgd", ["per-sample", "paired"])
def test_a_batch_normalized_output_leaves_the_input_probe_unmeasured(sgd: str, caplog) -> None:
    """A layer whose output feeds BatchNorm has ∇Y summing to 0 over the samples, so its
    ∇X probe (an input shift) has no gradient: the paired estimate was ≈ 1e-16 and
    ratio_x ≈ 6e8 (fqt-auto pinned the path at 8 bits), the per-sample one 1e-4. Now
    ratio_x is NaN there with a warning; the layer without BatchNorm is measured."""
    g = torch.Generator().manual_seed(1)
    for bn in (False, True):
        model = _mlp(bn)
        mon = VarianceMonitor(model, every=2, sgd=sgd)
        caplog.clear()
        with caplog.at_level("WARNING", logger="lowbit.monitor"):
            for _ in range(3):
                x, y = torch.randn(256, 32, generator=g), torch.randint(0, 4, (256,), generator=g)
                with mon.step():
                    F.cross_entropy(model(x), y).backward()
        v = mon.history[-1].layers["2"]
        flat = [r.message for r in caplog.records if "sums to 0 over the samples" in r.message]
        assert math.isfinite(v.ratio_w)
        assert math.isnan(v.ratio_x) == bn and bool(flat) == bn
        assert math.isfinite(mon.history[-1].layers["5" if bn else "4"].ratio_x)  # not normalized


def _small_mlp(recipe: str) -> nn.Module:
    torch.manual_seed(0)
    return lowbit.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
                          FQTConfig.from_recipe(recipe, seed=0))


@pytest.mark.parametrize("sgd", ["per-sample", "paired"])
def test_a_call_with_no_rows_is_skipped_not_a_crash(sgd: str) -> None:
    """An expert given no tokens (or an empty batch) made the monitored step raise inside
    ``backward()`` (``reshape(0, -1)``: a review); the same step runs without the monitor.
    The empty call adds nothing; the other calls are measured."""
    class MoE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
            self.head = nn.Linear(6, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            route, out = (x[:, 0] > 100).long(), torch.zeros_like(x)  # expert 1 gets nothing
            for i, e in enumerate(self.experts):
                idx = (route == i).nonzero().squeeze(1)
                out = out.index_add(0, idx, e(x[idx]))
            return self.head(out.relu())

    torch.manual_seed(0)
    m = lowbit.convert(MoE(), FQTConfig.from_recipe("fqt-psq-4", seed=0))
    mon = VarianceMonitor(m, every=1, sgd=sgd)
    for _ in range(2):
        with mon.step():
            m(torch.randn(8, 6, requires_grad=True)).square().sum().backward()
    rec = mon.history[-1].layers
    assert "experts.1" not in rec and math.isfinite(rec["experts.0"].quant_w) and rec["head"].quant_w > 0


@pytest.mark.parametrize("recipe, match", [
    ("fp8-tensorwise", "round-to-nearest gradients"), ("fqt-psq-4-predicted", "predicted gradient ranges")])
def test_a_config_changed_after_construction_is_checked_again(recipe: str, match: str) -> None:
    """A second ``convert`` after the monitor was built: it went on reporting a rounding
    variance for round-to-nearest gradients (and ``quant_w = 0``, ``ratio_x = inf`` for
    predicted ranges: a review). Now the step says why it cannot measure."""
    m = _small_mlp("fqt-psq-4")
    mon = VarianceMonitor(m, every=1)
    lowbit.convert(m, FQTConfig.from_recipe(recipe, seed=0))
    with pytest.raises(ValueError, match=f"layer '0' was given a new config.*{match}"):
        with mon.step():
            m(torch.randn(5, 6, requires_grad=True)).sum().backward()
    assert mon.steps == 0 and mon.history == []


def test_a_policy_does_not_drive_a_layer_reconverted_to_a_fixed_recipe() -> None:
    """``fqt-auto`` with a policy, then the model converted again with ``fqt-psq-4``: the
    policy rewrote the fixed recipe's widths (``psq2``) — what kind 40 refuses at
    construction (a review)."""
    m = _small_mlp("fqt-auto")
    mon = VarianceMonitor(m, every=1, policy=AdaptivePolicy.from_recipe("fqt-auto"))
    with mon.step():
        m(torch.randn(5, 6, requires_grad=True)).sum().backward()
    lowbit.convert(m, FQTConfig.from_recipe("fqt-psq-4", seed=0))
    with pytest.raises(ValueError, match="converted with a fixed recipe"):
        with mon.step():
            m(torch.randn(5, 6, requires_grad=True)).sum().backward()
    assert m[0].config.grad_input.bits == 4


def test_mean_bits_count_the_steps_the_monitor_saw() -> None:
    """A run resumed without monitor state (``--monitor-every`` 0 → K) set ``steps`` to
    the checkpoint's step and divided the widths summed since by all of them (1.33 bits
    for a 4-bit ∇X: a review); the state keeps the count, and states saved before it
    was kept read as every step counted."""
    from lowbit.experiments import monitoring

    m = _small_mlp("fqt-bhq-4")
    mon = VarianceMonitor(m, every=2)
    monitoring.restore(mon, {"monitor": None}, step=100)
    for _ in range(4):
        with mon.step():
            m(torch.randn(16, 6)).sum().backward()
    assert mon.mean_bits()["2"] == {"grad_input": 4.0, "grad_weight": 8.0}
    state = mon.state_dict()
    again = VarianceMonitor(_small_mlp("fqt-bhq-4"), every=2)
    again.load_state_dict(state)
    assert again.mean_bits() == mon.mean_bits()
    del state["counted_steps"]  # an older state: steps and sums from step 0
    again.load_state_dict(state)
    assert again.mean_bits()["2"]["grad_input"] == pytest.approx(4.0 * 4 / 104)


def _paired_run(scales: list[float], inf_at: int | None = None, autocast_backward: bool = False,
                pass_scale: bool = True) -> VarianceMonitor:
    """Three steps of ``_net(bn=True)`` (paired estimate, ∇W quantized at 4 bits), the
    loss of step ``k`` multiplied by ``scales[k]`` (a loss scaler's) and that scale passed
    to the monitor; ``inf_at``: that step's loss gradient holds an ``inf``."""
    model = lowbit.convert(_net(bn=True), _cfg("psq", 4, "w"))
    mon = VarianceMonitor(model, every=2, sgd="paired")  # steps 0 and 2 measured, 2 paired with 1
    g = torch.Generator().manual_seed(4)
    for k, s in enumerate(scales):
        xb, yb = torch.randn(8, 2, 5, 5, generator=g), torch.randint(0, 4, (8,), generator=g)
        with mon.step(loss_scale=s if pass_scale else 1.0):
            model.zero_grad()
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast_backward):
                out = model(xb)
                if k == inf_at:
                    out = out + torch.zeros_like(out).index_fill_(0, torch.tensor([0]), 1.0).mul(1e38).mul(10)
                (F.cross_entropy(out.float(), yb) * s).backward()
    return mon


def test_an_overflowed_step_before_a_paired_one_gives_no_ratio(caplog) -> None:  # noqa: ANN001
    """An ``inf`` in the step before a monitored one (kept as the pair's other half: a
    trainer skips the update but keeps going) gave ``½‖g − inf‖² = inf`` and a ratio of 0,
    which sent ``fqt-auto`` down to 2 bits without a warning (a review). Now the figure is
    NaN and the layer is named as not finite."""
    with caplog.at_level("WARNING", logger="lowbit.monitor"):
        mon = _paired_run([1.0, 1.0, 1.0], inf_at=1)
    rec = mon.history[-1]
    assert rec.step == 2
    assert all(math.isnan(v.sgd_w) and math.isnan(v.ratio_w) for v in rec.layers.values())
    said = [r.message for r in caplog.records]
    assert any("the step before this one, the paired estimate's other half, had a non-finite" in m for m in said)
    assert not any("its ∇Y or the per-sample gradient norms are not finite" in m for m in said)  # this step's are
    clean = _paired_run([1.0, 1.0, 1.0]).history[-1]
    assert all(math.isfinite(v.ratio_w) for v in clean.layers.values())


def test_a_backward_inside_autocast_gives_the_same_figures() -> None:
    """The monitor's hooks ran inside the user's ``torch.autocast`` when the backward did,
    so its float32 products ran in bfloat16 (variances 3× off, some negative: a review).
    They now run with autocast off: the figures of a backward inside the block equal
    those of the same backward outside it (the layers' gradients are the same either way)."""
    def run(inside: bool) -> list[tuple[float, float]]:
        model = lowbit.convert(_mlp(False), _cfg("psq", 8))
        mon = VarianceMonitor(model, every=1, sgd="per-sample")
        g = torch.Generator().manual_seed(2)
        x, y = torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)
        with mon.step():
            with torch.autocast("cpu", torch.bfloat16):
                loss = F.cross_entropy(model(x).float(), y)
                if inside:
                    loss.backward()
            if not inside:
                loss.backward()
        return [(v.sgd_w, v.quant_w) for v in mon.history[-1].layers.values()]
    inside, outside = run(True), run(False)
    assert inside == outside and all(s > 0 and q > 0 for s, q in outside)


def test_the_paired_estimate_brings_the_step_before_to_this_steps_loss_scale() -> None:
    """A loss scale that changed between the two paired steps (a ``GradScaler`` growing
    from 1024 to 2048) mixed units: ``½‖s_k·g_k − s_{k−1}·g_{k−1}‖²`` (a review). With the
    scale passed (``mon.step(loss_scale=…)``) the estimate is ``s_k²`` times the unscaled
    run's, exactly (powers of two), and so the ratio is the unscaled run's; not passed,
    it is not."""
    plain = _paired_run([1.0, 1.0, 1.0]).history[-1]
    scaled = _paired_run([1024.0, 1024.0, 2048.0]).history[-1]
    unpassed = _paired_run([1024.0, 1024.0, 2048.0], pass_scale=False).history[-1]
    for name, v in plain.layers.items():
        assert scaled.layers[name].sgd_w == pytest.approx(2048.0**2 * v.sgd_w, rel=1e-9)
        assert scaled.layers[name].ratio_w == pytest.approx(v.ratio_w, rel=1e-6)
        assert unpassed.layers[name].ratio_w != pytest.approx(v.ratio_w, rel=1e-2)
    for good in (np.float32(1024.0), np.int64(2), torch.tensor(2.0), torch.tensor([4])):
        with VarianceMonitor(lowbit.convert(_net(), _cfg("psq", 8)), every=1).step(loss_scale=good):
            pass
    for bad in (0.0, -1.0, math.inf, math.nan, True, "2", torch.ones(2), np.float32(-1), torch.tensor(1j)):
        with pytest.raises(ValueError, match="loss_scale must be a finite number > 0"):
            with VarianceMonitor(lowbit.convert(_net(), _cfg("psq", 8)), every=1).step(loss_scale=bad):
                pass


def test_tiny_gradients_are_measured_not_lost_to_float32_squares() -> None:
    """torch's float32 norm squares each element in float32, so a gradient of 1e-25 had
    norm 0: ``sgd_w`` 0 and a ratio of inf (a review). Norms that small (or infinite) are
    computed again in float64: the loss scaled by 1e-25 (or 1e20) gives the unscaled
    run's ratios, every variance the scale² times the unscaled one."""
    def run(scale: float) -> list[tuple[float, float, float]]:
        model = lowbit.convert(_mlp(False), _cfg("psq", 8))
        mon = VarianceMonitor(model, every=1, sgd="per-sample")
        g = torch.Generator().manual_seed(3)
        x, y = torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)
        with mon.step():
            (F.cross_entropy(model(x), y) * scale).backward()
        return [(v.sgd_w, v.quant_w, v.ratio_w) for v in mon.history[-1].layers.values()]
    plain = run(1.0)
    for scale in (1e-25, 1e20):
        for (s0, q0, r0), (s, q, r) in zip(plain, run(scale), strict=True):
            assert s == pytest.approx(scale**2 * s0, rel=1e-3) and q == pytest.approx(scale**2 * q0, rel=1e-3)
            assert r == pytest.approx(r0, rel=1e-3), (scale, r, r0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_column_weights_keep_their_range_in_a_float32_model(kind: str) -> None:
    """The quantization variance weights each column's rounding error by ``‖U_n‖²`` (the
    other operand's squared row norms: activations on the ∇W path, weights on the ∇X
    path). Summed as float32 squares they underflowed to 0 for activations near 1e-24
    (``quant_w`` 0) and overflowed to inf near 1e21 (a review of fault kind 200). A power
    of two ``s`` on the input scales layer 2's ∇W-path figures by ``s²``; on layer 2's
    weight, its ∇X-path figures by ``s²`` (the loss's ∇Y does not change): to float32
    rounding of the unscaled run's norms (1e-5)."""
    def run(s_x: float, s_w: float) -> tuple[float, float, float, float]:
        torch.manual_seed(0)
        model, x = _two_layers(kind)
        with torch.no_grad():
            model[2].weight.mul_(s_w)
        lowbit.convert(model, _cfg("psq", 8))
        mon = VarianceMonitor(model, every=1)
        x = (x * s_x).requires_grad_()
        with mon.step():
            y = model(x)
            (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        v = mon.history[-1].layers["2"]
        return v.sgd_w, v.quant_w, v.sgd_x, v.quant_x
    base = run(1.0, 1.0)
    assert all(math.isfinite(b) and b > 0 for b in base)
    for s in (2.0 ** -80, 2.0 ** 70):
        w_path, x_path = run(s, 1.0)[:2], run(1.0, s)[2:]
        for got, want in zip((*w_path, *x_path), base, strict=True):
            assert got / s**2 == pytest.approx(want, rel=1e-5), (s, got, want)


def test_per_sample_gram_norms_keep_their_range() -> None:
    """Tokens of few rows and wide layers take the Gram route for the per-sample norms
    (``‖a_nᵀu_n‖² = Σ (a_n a_nᵀ) ⊙ (u_n u_nᵀ)``): its float32 Grams gave a negative
    ``sgd_w`` for inputs at 2⁻⁸⁰ and inf/NaN from 2⁶⁰ (a review of fault kind 201). A power
    of two on the input scales layer 2's ∇W figures by its square (float32 rounding, 1e-5)."""
    def run(s: float) -> tuple[float, float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.ReLU(), nn.Linear(64, 64, bias=False))
        lowbit.convert(model, _cfg("psq", 8))
        mon = VarianceMonitor(model, every=1, sgd="per-sample")
        x = (torch.randn(8, 4, 64) * s).requires_grad_()
        with mon.step():
            y = model(x)
            (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        v = mon.history[-1].layers["2"]
        return v.sgd_w, v.quant_w
    base = run(1.0)
    assert all(math.isfinite(b) and b > 0 for b in base)
    for s in (2.0 ** -80, 2.0 ** 60, 2.0 ** 70):
        for got, want in zip(run(s), base, strict=True):
            assert got / s**2 == pytest.approx(want, rel=1e-5), (s, got, want)
    # a sample whose absmax is in float32's top binade: its scale 2^128 was inf (a second
    # review); against float64 per-sample products
    from lowbit.varstats import per_sample_sq_norms
    g = torch.Generator().manual_seed(1)
    a, u = torch.randn(3, 4, 64, generator=g), torch.randn(3, 4, 64, generator=g)
    a[0] *= 2.0 ** 126  # absmax in [2^127, 2^128)
    want = torch.einsum("bto,btk->bok", a.double(), u.double()).square().sum((1, 2))
    got = per_sample_sq_norms(a, u)
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


def test_a_monitored_step_that_measures_nothing_says_why(caplog) -> None:
    """A review: with the backward outside ``with mon.step():`` (an AMP loop's shape) every
    record was empty and ``fqt-auto`` stayed at 8 bits without a word. A warning, once per
    cause, says what ran where; the empty record is kept."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)
    torch.manual_seed(0)
    model = lowbit.convert(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)),
                           FQTConfig.from_recipe("fqt-auto", seed=0))
    mon = VarianceMonitor(model, every=1, policy=AdaptivePolicy.from_recipe("fqt-auto"))
    with caplog.at_level("WARNING", logger="lowbit.monitor"):
        for _ in range(2):
            with mon.step():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        with mon.step():  # nothing ran inside
            pass
    said = [r.getMessage() for r in caplog.records if "measured nothing" in r.getMessage()]
    assert len(said) == 2 and "call loss.backward()" in said[0] and "policy decides nothing" in said[0]
    assert "no monitored layer ran" in said[1]
    assert [len(r.layers) for r in mon.history] == [0, 0, 0] and mon.decisions == []
    # frozen monitored layers (their outputs need no gradient), the backward inside: that cause
    frozen = _mlp(bn=False).requires_grad_(False)
    model2 = nn.Sequential(frozen, nn.Linear(4, 4))
    mon2 = VarianceMonitor(model2, every=1)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lowbit.monitor"):
        with mon2.step():
            F.cross_entropy(model2(x), y).backward()
    said = [r.getMessage() for r in caplog.records if "measured nothing" in r.getMessage()]
    assert len(said) == 1 and "needed no gradient" in said[0]


def test_a_state_of_another_recipe_or_layout_is_refused_with_the_cause() -> None:
    """Two reviews' findings: a state of an ``fqt-bhq-4`` model loaded into an
    observe-only monitor of an ``fqt-psq-8`` one rewrote its gradient specs (only a policy
    changes them), and a state saved on a ``torch.compile``'d model was blamed on Hugging
    Face's Conv1D. NumPy integers are an ``every`` too."""
    saved = VarianceMonitor(_small_mlp("fqt-bhq-4"), every=5).state_dict()
    model = _small_mlp("fqt-psq-8")
    before = str(model[0].config)
    with pytest.raises(ValueError, match="ran bhq4 in the state, psq8 here, and this monitor has no policy"):
        VarianceMonitor(model, every=5).load_state_dict(saved)
    assert str(model[0].config) == before
    compiled = VarianceMonitor(torch.compile(_small_mlp("fqt-psq-8")), every=5).state_dict()
    with pytest.raises(ValueError, match="the same layers under other wrappers"):
        VarianceMonitor(_small_mlp("fqt-psq-8"), every=5).load_state_dict(compiled)
    stacked = dict(compiled, specs={"_orig_mod.module." + k.removeprefix("_orig_mod."): v
                                    for k, v in compiled["specs"].items()})  # compile of DDP
    with pytest.raises(ValueError, match="the same layers under other wrappers"):
        VarianceMonitor(_small_mlp("fqt-psq-8"), every=5).load_state_dict(stacked)
    deeper = lowbit.convert(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
                            FQTConfig.from_recipe("fqt-psq-8", seed=0))
    with pytest.raises(ValueError, match="another model's state"):
        VarianceMonitor(deeper, every=5).load_state_dict(VarianceMonitor(_small_mlp("fqt-psq-8"), every=5).state_dict())
    assert VarianceMonitor(_small_mlp("fqt-psq-8"), every=np.int64(5)).every == 5


def test_a_backward_that_does_not_compute_the_weights_gradient_is_not_counted() -> None:
    # A trial: torch.autograd.grad(loss, x) inside a monitored step (an adversarial example,
    # a saliency map) computes no ∇W — the layers skip it (fault kind 246) — yet the
    # monitor counted its ∇W quantization: quant_w came out twice the draws' variance.
    def figures(with_input_grad: bool) -> dict:
        torch.manual_seed(0)
        m = lowbit.convert(torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5)),
                           FQTConfig.from_recipe("fqt-psq-4", seed=0))
        mon = VarianceMonitor(m, every=1, sgd="paired")
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(32, 20, generator=g), torch.randint(0, 5, (32,), generator=g)
        with mon.step():
            if with_input_grad:
                xa = x.clone().requires_grad_(True)
                torch.autograd.grad(torch.nn.functional.cross_entropy(m(xa), y), xa)
            torch.nn.functional.cross_entropy(m(x), y).backward()
        return {n: v.quant_w for n, v in mon.history[-1].layers.items()}

    plain, both = figures(False), figures(True)
    for name in plain:  # one ∇W call each (the noise draws differ: within 20%, not 2×)
        assert 0.8 < both[name] / plain[name] < 1.25, (name, both[name], plain[name])


def test_a_forced_step_without_its_paired_step_says_why_its_ratios_are_nan(caplog) -> None:  # noqa: ANN001
    # A trial: step(force=True) under sgd="paired" off the monitor's schedule gave NaN ratios
    # and no word (the step before is recorded only before due steps).
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(32, 32, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(5)]
    model = _mlp(bn=False)
    mon = VarianceMonitor(model, every=100, sgd="paired")
    with caplog.at_level("WARNING", logger="lowbit.monitor"):
        for i, (x, y) in enumerate(batches):
            with mon.step(force=(i == 3)):
                F.cross_entropy(model(x), y).backward()
    v = mon.history[-1].layers["2"]
    assert mon.history[-1].step == 3 and math.isnan(v.ratio_w)
    said = [r.message for r in caplog.records if "records only before its due steps (every 100)" in r.message]
    assert len(said) == 3 and all("force the step after a due one" in m for m in said)
    # a step before that raised inside its step() is named as such, not as a forced step (a review)
    model = _mlp(bn=False)
    mon = VarianceMonitor(model, every=1, sgd="paired")
    caplog.clear()
    with caplog.at_level("WARNING", logger="lowbit.monitor"):
        for i, (x, y) in enumerate(batches[:3]):
            with pytest.raises(RuntimeError) if i == 1 else contextlib.nullcontext(), mon.step():
                F.cross_entropy(model(x), y).backward()
                if i == 1:
                    raise RuntimeError("a failed step")
    messages = [r.message for r in caplog.records]
    assert not any("step(force=True)" in m for m in messages)
    assert sum("which was not recorded (it raised inside its step()" in m for m in messages) == 3
