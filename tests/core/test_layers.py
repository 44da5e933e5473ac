"""FQT layers and convert(): the integer path equals the reference, the FQT gradient is
an unbiased estimate of the QAT gradient, conversion is complete, idempotent and keeps
state_dict compatibility; saved activations are int8; NaN propagates."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import assert_unbiased
from torch import nn

import lowbit
from lowbit import FQTConfig, FQTConv2d, FQTLinear
from lowbit.analysis.variance import qat_of, with_config
from lowbit.kernels import int8 as int8_kernel

QUANT = ["ptq", "psq", "bhq", "hadamard"]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, groups=2),
                         nn.Flatten(), nn.Linear(8 * 3 * 3, 4))


def grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


# (in_features, out_features, input shape): a summed dimension of 1 in each GEMM — the
# forward (in = 1), ∇X (out = 1), ∇W (one row) — gives operands with degenerate strides
# that torch._int_mm on the CPU misreads unless copied (README fault kind 24)
SHAPES = [(12, 16, (3, 7, 12)), (1, 16, (3, 7, 1)), (12, 1, (3, 7, 12)), (12, 16, (1, 12)),
          (1, 1, (1, 1))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}to{s[1]}x{'x'.join(map(str, s[2]))}")
@pytest.mark.parametrize("quantizer", QUANT)
def test_integer_path_equals_reference(quantizer: str, shape: tuple,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = int8_kernel.int_mm
    monkeypatch.setattr(int8_kernel, "int_mm", lambda *a: calls.append(1) or real(*a))
    fan_in, fan_out, x_shape = shape
    x = torch.randn(*x_shape)  # (B, T, C): any leading shape
    out = {}
    for backend in ("int8", "reference"):
        torch.manual_seed(1)
        layer = nn.Linear(fan_in, fan_out)
        cfg = FQTConfig.from_recipe(f"fqt-{quantizer}-4", backend=backend, seed=5)
        m = lowbit.convert(nn.Sequential(layer), cfg)
        xi = x.clone().requires_grad_()
        y = m(xi)
        (y * torch.linspace(-1, 1, fan_out)).sum().backward()
        out[backend] = (y.detach(), xi.grad, layer.weight.grad, layer.bias.grad)
    assert len(calls) == 3, "output, grad_input and grad_weight must all run on _int_mm"
    for a, b in zip(out["int8"], out["reference"]):
        # same random stream, exact integer sums vs float32 sums: float rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


def test_per_channel_weight_falls_back_to_reference_for_grad_input() -> None:
    # A per-output-channel weight scale sits on the summed dim of ∇X = Q(∇Y)·Q_f(W):
    # AUTO uses the reference GEMM there; forcing int8 is refused with a clear error.
    spec = lowbit.OperandSpec(8, "row")
    cfg = dataclasses.replace(FQTConfig.from_recipe("fqt-psq-8"), weight=spec)
    m = lowbit.convert(nn.Linear(4, 4), cfg)
    m(torch.randn(5, 4)).sum().backward()
    m2 = lowbit.convert(nn.Linear(4, 4), dataclasses.replace(cfg, backend="int8"))
    with pytest.raises(ValueError, match="backend='int8' cannot compute this GEMM"):
        m2(torch.randn(5, 4, requires_grad=True)).sum().backward()


@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("quantizer", ["ptq", "psq", "bhq"])
def test_fqt_gradient_unbiased_for_qat_gradient(make, quantizer: str) -> None:
    model = lowbit.convert(make(), FQTConfig.from_recipe(f"fqt-{quantizer}-4", seed=0))
    torch.manual_seed(2)
    x = torch.randn(16, 12) if make is mlp else torch.randn(16, 2, 8, 8)
    y = torch.randint(0, 5 if make is mlp else 4, (16,))
    with with_config(model, qat_of):
        exact = grads(model, x, y)
    draws = torch.stack([grads(model, x, y) for _ in range(300)])
    assert not torch.equal(draws[0], draws[1]), "draws must differ (fresh SR noise)"
    assert_unbiased(draws, exact)


def test_fp_recipe_is_exact() -> None:
    ref, m = mlp(), lowbit.convert(mlp(), FQTConfig.from_recipe("fp"))
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    assert torch.equal(grads(ref, x, y), grads(m, x, y))


class Custom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(2)])
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2), "b": nn.Linear(4, 2, bias=False)})
        self.conv = nn.Conv2d(1, 4, 3, padding="same", padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = self.conv(x.reshape(-1, 1, 2, 2)).mean((1, 2, 3))  # (B,)
        for b in self.blocks:
            x = b(x)
        return self.heads["a"](x) + self.heads["b"](x) + img[:, None]


def test_convert_nested_state_dict_and_idempotence() -> None:
    torch.manual_seed(0)
    ref = Custom()
    model = copy.deepcopy(ref)
    cfg = FQTConfig.from_recipe("fqt-bhq-4")
    params_before = {n: p for n, p in model.named_parameters()}
    assert lowbit.convert(model, cfg) is model
    layers = lowbit.fqt_layers(model)
    assert set(layers) == {"blocks.0.0", "blocks.1.0", "heads.a", "heads.b", "conv"}
    assert isinstance(model.blocks[0][1], nn.LayerNorm)  # others untouched
    assert all(p is params_before[n] for n, p in model.named_parameters())  # shared params
    # state_dict loads both ways with the same keys
    assert model.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(model.state_dict())
    model.load_state_dict(ref.state_dict())
    # idempotent
    lowbit.convert(model, cfg)
    assert not any(isinstance(m.weight, FQTLinear) for m in layers.values())
    assert lowbit.fqt_layers(model).keys() == layers.keys()
    assert all(type(m) in (FQTLinear, FQTConv2d) for m in lowbit.fqt_layers(model).values())
    # the converted model still runs forward and backward, and qat-8 ≈ fp
    x = torch.randn(3, 4)
    model(x).sum().backward()
    lowbit.convert(model, FQTConfig.from_recipe("qat-8"))
    torch.testing.assert_close(model(x), ref(x), rtol=0.05, atol=0.05)


def test_module_filter_receives_name() -> None:
    seen = []
    m = Custom()
    lowbit.convert(m, FQTConfig.from_recipe("fqt-psq-8"),
                   module_filter=lambda mod, name: seen.append(name) or name.startswith("heads"))
    assert "heads.a" in seen and "conv" in seen
    assert set(lowbit.fqt_layers(m)) == {"heads.a", "heads.b"}


@pytest.mark.parametrize("kw", [
    dict(stride=2, padding=1), dict(dilation=2, padding=2), dict(groups=3, bias=False),
    dict(padding="same"), dict(padding="valid", stride=(1, 2)), dict(padding=1, padding_mode="circular"),
])
def test_conv2d_variants_match_float(kw: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, **kw)
    q = FQTConv2d.from_float(copy.deepcopy(conv), FQTConfig.from_recipe("qat-8"))
    x = torch.randn(2, 3, 9, 9)
    y, yq = conv(x), q(x)
    assert y.shape == yq.shape
    # 8-bit per-tensor forward: error ≈ a few grid steps of the output scale
    torch.testing.assert_close(yq, y, rtol=0.03, atol=0.03 * float(y.detach().abs().max()))
    fqt = FQTConv2d.from_float(copy.deepcopy(conv), FQTConfig.from_recipe("fqt-bhq-4"))
    fqt(x).square().sum().backward()
    assert torch.isfinite(fqt.weight.grad).all()


def test_saved_activations_are_int8() -> None:
    layer = lowbit.convert(nn.Linear(64, 64), FQTConfig.from_recipe("fqt-psq-8"))
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, t.numel()))
        return t

    x = torch.randn(32, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    big = [(dt, n) for dt, n in saved if n >= 32 * 64]
    assert big and all(dt == torch.int8 for dt, _ in big), saved


def test_nan_in_gradient_propagates() -> None:
    for q in QUANT:
        layer = lowbit.convert(nn.Linear(8, 8), FQTConfig.from_recipe(f"fqt-{q}-4"))
        x = torch.randn(4, 8, requires_grad=True)
        g = torch.ones(4, 8)
        g[1, 2] = float("nan")
        layer(x).backward(g)
        assert not torch.isfinite(layer.weight.grad).all()
        assert not torch.isfinite(x.grad).all()


def test_seeded_training_step_reproducible() -> None:
    def run(seed: int) -> torch.Tensor:
        m = lowbit.convert(mlp(), FQTConfig.from_recipe("fqt-bhq-4", seed=seed))
        return grads(m, torch.ones(4, 12), torch.zeros(4, dtype=torch.long))
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_rng_state_round_trip() -> None:
    m = lowbit.convert(mlp(), FQTConfig.from_recipe("fqt-psq-4", seed=0))
    x, y = torch.randn(4, 12), torch.randint(0, 5, (4,))
    grads(m, x, y)
    state = lowbit.rng_state(m)
    a = grads(m, x, y)
    lowbit.load_rng_state(m, state)
    assert torch.equal(a, grads(m, x, y))


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="config must be an FQTConfig"):
        lowbit.convert(nn.Linear(2, 2), "fqt-psq-8")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lowbit.convert("model", FQTConfig())  # type: ignore[arg-type]


def test_int8_backend_conflicts_are_named_at_convert() -> None:
    """What ``backend='int8'`` refuses at the first backward that needs it, decidable from
    the config, is named already by ``convert`` (a warning: the first layer's ∇X or a
    frozen weight's ∇W never run): per-row weight scales (∇X), per-sample activation
    scales (∇W), an asymmetric gradient grid in attention, a row-mixing ∇W quantizer on
    grouped convolutions. None for what int8 runs — BHQ in attention among them (its
    groups are built per head: the heads' products run on the integer kernels)."""
    int8 = FQTConfig.from_recipe("fqt-psq-8", backend="int8")
    with pytest.warns(lowbit.ConversionWarning, match=r"∇X = ∇Y·W of every Linear"):
        lowbit.convert(nn.Linear(4, 4), dataclasses.replace(int8, weight=lowbit.OperandSpec(8, "row")))
    with pytest.warns(lowbit.ConversionWarning, match=r"∇W = ∇Yᵀ·X of every layer"):
        lowbit.convert(nn.Linear(4, 4), dataclasses.replace(int8, activation=lowbit.OperandSpec(8, "row")))
    with pytest.warns(lowbit.ConversionWarning, match=r"asymmetric gradient grid"):
        lowbit.convert(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                       FQTConfig.from_recipe("fqt-psq-8a", backend="int8"))
    with pytest.warns(lowbit.ConversionWarning, match=r"∇W of grouped convolutions"):
        lowbit.convert(nn.Conv2d(4, 4, 3, groups=2), dataclasses.replace(int8, grad_weight=lowbit.GradSpec(quantizer="bhq")))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", lowbit.ConversionWarning)
        lowbit.convert(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), int8)
        bhq_attention = lowbit.convert(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                                       FQTConfig.from_recipe("fqt-bhq-4", backend="int8"))
        bhq_attention(torch.randn(2, 5, 8, requires_grad=True)).sum().backward()  # runs, as announced
        lowbit.convert(nn.Linear(4, 4), FQTConfig.from_recipe("fqt-bhq-4", backend="int8"))
        lowbit.convert(nn.Linear(4, 4), FQTConfig.from_recipe("fqt-psq-8a", backend="int8"))
        lowbit.convert(nn.Conv2d(4, 4, 3), dataclasses.replace(int8, grad_weight=lowbit.GradSpec(quantizer="bhq")))


def test_fp8_backend_conflicts_are_named_at_convert() -> None:
    """The same for ``backend='fp8'`` (a review found none named): fp8-rowwise's per-row
    scales on the summed dimensions, and convolutions (no FP8 convolution kernel: the
    first forward raises). None for per-tensor FP8 Linear layers, which run on it."""
    rowwise = FQTConfig.from_recipe("fp8-rowwise", backend="fp8")
    with pytest.warns(lowbit.ConversionWarning, match=r"backend='fp8' cannot run these GEMMs on torch._scaled_mm.*"
                                                      r"∇X = ∇Y·W of every Linear.*∇W = ∇Yᵀ·X of every layer"):
        lowbit.convert(nn.Linear(32, 32), rowwise)
    fp8 = FQTConfig.from_recipe("fqt-psq-fp8", backend="fp8")
    with pytest.warns(lowbit.ConversionWarning, match=r"all three GEMMs of every convolution"):
        model = lowbit.convert(nn.Sequential(nn.Conv2d(3, 4, 3)), fp8)
    with pytest.raises(ValueError, match="FP8 convolution has no _scaled_mm kernel"):
        model(torch.randn(1, 3, 8, 8))  # what the warning announced
    # attention products (a review: named by nothing, then "a scale on the summed dimension")
    with pytest.warns(lowbit.ConversionWarning, match=r"every attention product \(lowbit's attention has no FP8"):
        attn = lowbit.convert(nn.MultiheadAttention(16, 2, batch_first=True), fp8)
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="attention's Q·Kᵀ GEMM per head \\(lowbit's attention has no FP8 kernel"):
        attn(x, x, x)  # what the warning announced
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", lowbit.ConversionWarning)
        lowbit.convert(nn.Linear(32, 32), fp8)
