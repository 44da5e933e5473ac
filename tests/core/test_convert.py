"""convert() never changes what a module computes, owns or is hooked to, and what lowbit
reports as quantized is what runs quantized (issue 11, items 2 and 3).

Modules that cannot be swapped faithfully (subclasses such as timm's Conv2dSame and
StdConv2d, hooked modules, lazy modules, MultiheadAttention's out_proj) must be left
alone: same object, same output bit for bit, same state_dict keys, listed with the exact
reason. Converted layers must really run: their ``ran`` flag moves and their output is
the quantized one (compared exactly with an independently built FQT layer)."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from conftest import SelfAttention

import lowbit
from lowbit import ConversionWarning, FQTConfig, FQTConv2d, FQTLinear
from lowbit.conversion import LAZY_REASON, MHA_REASON, ROOT, quote_module
from lowbit.attention_modules import FQTMultiheadAttention

FQT = FQTConfig.from_recipe("fqt-psq-8", seed=0)
FP = FQTConfig.from_recipe("fp")


def convert_quietly(model: nn.Module, config: FQTConfig = FQT, **kw):
    """convert(..., report=True), collecting its ConversionWarnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, report = lowbit.convert(model, config, report=True, **kw)
    msgs = [str(w.message) for w in caught if issubclass(w.category, ConversionWarning)]
    return model, report, msgs


# -- subclasses: the module a user or library wrote ---------------------------------------
class ScaledLinear(nn.Linear):
    """A Linear subclass with an extra parameter and its own forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.full((self.out_features,), 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


# timm.layers: padding.get_padding / get_same_padding / pad_same, conv2d_same.Conv2dSame,
# std_conv.StdConv2d, written out as timm defines them (timm itself needs torchvision).
def get_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    return ((stride - 1) + dilation * (kernel_size - 1)) // 2


def get_same_padding(x: int, k: int, s: int, d: int) -> int:
    return max((math.ceil(x / s) - 1) * s + (k - 1) * d + 1 - x, 0)


def pad_same(x: torch.Tensor, k, s, d, value: float = 0) -> torch.Tensor:
    ih, iw = x.size()[-2:]
    pad_h, pad_w = get_same_padding(ih, k[0], s[0], d[0]), get_same_padding(iw, k[1], s[1], d[1])
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)


class Conv2dSame(nn.Conv2d):
    """TensorFlow-like 'SAME' convolution: padding computed from the input in forward."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.weight.shape[-2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation, self.groups)


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardization computed in forward."""

    def __init__(self, in_channel, out_channels, kernel_size, stride=1, padding=None, dilation=1,
                 groups=1, bias=False, eps=1e-6):
        if padding is None:
            padding = get_padding(kernel_size, stride, dilation)
        super().__init__(in_channel, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


SUBCLASSES = {
    "linear-extra-param": (lambda: ScaledLinear(8, 8), (5, 8), "ScaledLinear", "Linear"),
    "timm-conv2d-same": (lambda: Conv2dSame(3, 4, 3, stride=2), (2, 3, 9, 9), "Conv2dSame", "Conv2d"),
    "timm-std-conv2d": (lambda: StdConv2d(3, 4, 3), (2, 3, 9, 9), "StdConv2d", "Conv2d"),
}


@pytest.mark.parametrize("case", SUBCLASSES)
def test_subclass_is_left_alone(case: str) -> None:
    make, shape, cls_name, base = SUBCLASSES[case]
    torch.manual_seed(0)
    model = nn.Sequential(make(), nn.Flatten())
    ref = copy.deepcopy(model)
    keys, sub = list(model.state_dict()), model[0]
    x = torch.randn(*shape)
    model, report, msgs = convert_quietly(model)
    reason = f"{cls_name} is a subclass of nn.{base}: its own forward, parameters or state would be lost"
    assert report.skipped == {"0": reason} and report.converted == ()
    assert msgs == [f"lowbit.convert left 1 layer(s) in float: '0': {reason}"]
    assert model[0] is sub and type(sub).__name__ == cls_name
    assert list(model.state_dict()) == keys
    assert torch.equal(model(x), ref(x))  # bit for bit: nothing changed
    if case == "timm-conv2d-same":
        assert model(x).shape == (2, 4 * 5 * 5)  # 'SAME' padding kept: 9×9, stride 2 → 5×5


def test_subclass_beside_plain_layers_only_plain_ones_convert() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    ref = copy.deepcopy(model)
    model, report, _ = convert_quietly(model)
    assert report.converted == ("2",) and set(report.skipped) == {"0"}
    x = torch.randn(6, 8)
    h = model[1](model[0](x))
    assert torch.equal(h, ref[1](ref[0](x)))  # the skipped subclass: bit-identical
    # the converted layer ran, quantized: equal to an FQT layer built on its own
    twin = FQTLinear.from_float(copy.deepcopy(ref[2]), FQT, seed=model[2].seed)
    lowbit.reset_ran(model)
    y = model(x)
    assert lowbit.fqt_layers(model, ran=True).keys() == {"2"}
    assert torch.equal(y, twin(h)) and not torch.equal(y, ref(x))


# -- hooks ----------------------------------------------------------------------------------
HOOKS = {
    "forward hooks": lambda m: m.register_forward_hook(lambda mod, i, o: o * 3),
    "forward pre-hooks": lambda m: m.register_forward_pre_hook(lambda mod, i: (i[0] * 2,)),
    "backward hooks": lambda m: m.register_full_backward_hook(lambda mod, gi, go: None),
    "backward pre-hooks": lambda m: m.register_full_backward_pre_hook(lambda mod, go: None),
    "state_dict pre-hooks": lambda m: m.register_state_dict_pre_hook(lambda mod, p, kv: None),
    "state_dict hooks": lambda m: m.register_state_dict_post_hook(lambda mod, sd, p, meta: None),
    "load_state_dict pre-hooks": lambda m: m.register_load_state_dict_pre_hook(
        lambda mod, sd, p, meta, strict, missing, unexpected, errors: None),
    "load_state_dict post-hooks": lambda m: m.register_load_state_dict_post_hook(lambda mod, keys: None),
}


@pytest.mark.parametrize("kind", HOOKS)
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_hooked_module_is_left_alone(kind: str, layer: str) -> None:
    torch.manual_seed(0)
    mod, x = (nn.Linear(6, 6), torch.randn(4, 6)) if layer == "linear" else \
        (nn.Conv2d(2, 3, 3), torch.randn(2, 2, 5, 5))
    handle = HOOKS[kind](mod)
    before = mod(x)
    model, report, msgs = convert_quietly(nn.Sequential(mod))
    reason = f"has {kind}: the converted layer would not carry them"
    assert report.skipped == {"0": reason} and model[0] is mod
    assert msgs == [f"lowbit.convert left 1 layer(s) in float: '0': {reason}"]
    assert torch.equal(model(x), before)
    handle.remove()  # the user's handle still works on the untouched module
    assert lowbit.convert(model, FQT)[0].__class__ in (FQTLinear, FQTConv2d)


def test_old_style_weight_norm_hook_is_left_alone() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates it
        mod = nn.utils.weight_norm(nn.Linear(6, 6))
    x = torch.randn(4, 6)
    before, keys = mod(x), list(mod.state_dict())
    model, report, _ = convert_quietly(nn.Sequential(mod))
    assert report.skipped == {"0": "has forward pre-hooks: the converted layer would not carry them"}
    assert torch.equal(model(x), before) and list(model[0].state_dict()) == keys


# -- parametrizations: converted, the weight computed through them -----------------------
PARAMETRIZE = {"weight_norm": nn.utils.parametrizations.weight_norm,
               "spectral_norm": nn.utils.parametrizations.spectral_norm,
               "orthogonal": nn.utils.parametrizations.orthogonal}


def _parametrized_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    p = PARAMETRIZE[kind]
    return nn.Sequential(p(nn.Conv2d(2, 3, 3, padding=1)), nn.Flatten(), p(nn.Linear(3 * 4 * 4, 5)))


@pytest.mark.parametrize("kind", PARAMETRIZE)
def test_parametrized_layers_convert_exactly(kind: str) -> None:
    model = _parametrized_model(kind)
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    model, report, msgs = convert_quietly(model, FP)
    assert report.converted == ("0", "2") and not report.skipped and msgs == []
    assert isinstance(model[0], FQTConv2d) and isinstance(model[2], FQTLinear)
    assert list(model.state_dict()) == keys  # parametrizations.weight.original*, _u, _v
    assert all(p is params[n] for n, p in model.named_parameters())  # shared, not copied
    # the fp recipe runs the same arithmetic: training forward (spectral norm's power
    # iteration updates _u/_v) and backward bit-identical to the unconverted model
    x = torch.randn(4, 2, 4, 4)
    model(x).square().sum().backward()
    ref(x).square().sum().backward()
    for (n, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b), n
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(a.grad, b.grad), n
    assert all(m.ran for m in lowbit.fqt_layers(model).values())
    copy.deepcopy(model)  # the analysis tools copy models


@pytest.mark.parametrize("kind", PARAMETRIZE)
def test_parametrized_layer_quantizes_the_parametrized_weight(kind: str) -> None:
    model = _parametrized_model(kind).eval()  # eval: spectral norm reuses its _u/_v
    lin = model[2]
    w = lin.weight.detach().clone()  # W = g·v/‖v‖ or W/σ(W), through the parametrization
    model, _, _ = convert_quietly(model)
    twin = FQTLinear(w.shape[1], w.shape[0], config=FQT, seed=model[2].seed)
    with torch.no_grad():
        twin.weight.copy_(w)
        twin.bias.copy_(lin.bias)
    x = torch.randn(4, w.shape[1])
    assert torch.equal(model[2](x), twin(x))  # Q_f(x)·Q_f(W)ᵀ with the parametrized W
    assert not torch.equal(model[2](x), F.linear(x, w, lin.bias))  # and it is quantized
    # the gradient reaches the parametrization's own parameters
    model[2](x).sum().backward()
    originals = [p for n, p in model[2].named_parameters() if "original" in n]
    assert originals and all(p.grad is not None and p.grad.abs().sum() > 0 for p in originals)


def test_weight_norm_loads_old_style_checkpoints_after_convert() -> None:
    """weight_norm's load_state_dict pre-hook (weight_g/weight_v keys → original0/1)
    never sees the module: it is carried to the converted layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 3)))
    model, report, _ = convert_quietly(model)
    assert report.converted == ("0",)
    g, v, b = torch.rand(3, 1), torch.randn(3, 4), torch.randn(3)
    model.load_state_dict({"0.weight_g": g, "0.weight_v": v, "0.bias": b})
    assert torch.equal(model[0].parametrizations.weight.original0, g)
    assert torch.equal(model[0].parametrizations.weight.original1, v)


# -- lazy modules ---------------------------------------------------------------------------
def test_lazy_module_is_skipped_then_converts_once_materialized() -> None:
    model, ref = nn.Sequential(nn.LazyLinear(4)), nn.Sequential(nn.LazyLinear(4))
    model, report, msgs = convert_quietly(model)
    assert report.skipped == {"0": LAZY_REASON}
    assert msgs == [f"lowbit.convert left 1 layer(s) in float: '0': {LAZY_REASON}"]
    x = torch.randn(2, 3)
    torch.manual_seed(0)
    y = model(x)  # used to fail here; materializes as a plain nn.Linear
    torch.manual_seed(0)
    assert torch.equal(y, ref(x)) and type(model[0]) is nn.Linear
    model, report, msgs = convert_quietly(model)
    assert report.converted == ("0",) and msgs == [] and type(model[0]) is FQTLinear


# -- what a module owns beyond nn.Linear ----------------------------------------------------
def _with_buffer(m: nn.Module) -> None:
    m.register_buffer("mask", torch.ones(6, 6))


def _with_param(m: nn.Module) -> None:
    m.register_parameter("scale", nn.Parameter(torch.ones(6)))


def _with_child(m: nn.Module) -> None:
    m.add_module("act", nn.ReLU())


def _with_forward(m: nn.Module) -> None:
    m.forward = lambda x: nn.Linear.forward(m, x) * 2


class Tagged(torch.Tensor):
    """A tensor subclass (as DTensor or a float8 tensor would be)."""


def _with_subclass_weight(m: nn.Module) -> None:
    m.weight = nn.Parameter(m.weight.detach().as_subclass(Tagged))


OWNS = {
    "buffer": (_with_buffer, "owns buffers ['mask']"),
    "parameter": (_with_param, "owns extra parameters ['scale']"),
    "submodule": (_with_child, "owns submodules ['act']"),
    "instance-forward": (_with_forward, "instance attributes ['forward'] would clash with FQTLinear's own"),
    "tensor-subclass-weight": (_with_subclass_weight, "weight is a Tagged, not a plain nn.Parameter"),
}


@pytest.mark.parametrize("case", OWNS)
def test_module_owning_more_is_left_alone(case: str) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    add, reason = OWNS[case]
    add(lin)
    x = torch.randn(3, 6)
    before, keys = lin(x), list(lin.state_dict())
    model, report, _ = convert_quietly(nn.Sequential(lin))
    assert report.skipped == {"0": reason} and model[0] is lin
    assert torch.equal(torch.as_tensor(model(x)), torch.as_tensor(before))
    assert list(model.state_dict()) == [f"0.{k}" for k in keys]


def test_a_weight_of_another_dtype_or_a_compiled_layer_is_skipped_with_its_own_reason() -> None:
    """A review: a float8 or int8 weight was skipped "lowbit quantizes real floating tensors
    only (a complex operand would lose its imaginary part)" (float8 is real, neither is
    complex), and a layer compiled with ``Module.compile()`` as an attribute clash."""
    allowed = "float32, float16, bfloat16, float64 only"
    for dtype, tail in ((torch.float8_e4m3fn, ""), (torch.int8, ""),
                        (torch.complex64, " (a complex operand would lose its imaginary part)")):
        lin = nn.Linear(4, 4)
        lin.weight = nn.Parameter(lin.weight.detach().to(dtype), requires_grad=False)
        _, report, _ = convert_quietly(nn.Sequential(lin))
        assert report.skipped == {"0": f"weight has dtype {dtype}: lowbit's layers compute in {allowed}{tail}"}
    lin = nn.Linear(4, 4)
    lin.compile()  # nothing compiled until it is called
    model, report, _ = convert_quietly(nn.Sequential(lin))
    assert model[0] is lin and report.skipped == {
        "0": "this layer was compiled with Module.compile() (its compiled call runs the float layer): "
             "convert the model before compiling it"}


def test_plain_attributes_are_carried_over() -> None:
    lin = nn.Linear(4, 4)
    lin._is_hf_initialized = True  # transformers tags every module like this
    lin.note = {"owner": "me"}
    model, report, msgs = convert_quietly(nn.Sequential(lin))
    assert report.converted == ("0",) and msgs == []
    assert model[0]._is_hf_initialized is True and model[0].note is lin.note


# -- modules that read a child's weight without calling it ------------------------------
class AttnBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mha(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("mode", ["train", "eval-no-grad"])
def test_multihead_attention_kept_float_does_not_claim_out_proj(mode: str) -> None:
    """A MultiheadAttention the filter keeps float reads out_proj's weight without calling
    it: out_proj is not converted (it would not run). (Converted MHA: test_attention.py.)"""
    torch.manual_seed(0)
    model = AttnBlock()
    ref = copy.deepcopy(model)
    keep_float = lambda m, n: not isinstance(m, nn.MultiheadAttention)  # noqa: E731
    model, report, msgs = convert_quietly(model, module_filter=keep_float)
    assert report.excluded == ("mha",)
    assert report.skipped == {"mha.out_proj": MHA_REASON} and report.converted == ("head",)
    assert msgs == [f"lowbit.convert left 1 layer(s) in float: 'mha.out_proj': {MHA_REASON}"]
    assert type(model.mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert set(lowbit.fqt_layers(model)) == {"head"}
    x = torch.randn(2, 5, 8)
    with torch.set_grad_enabled(mode == "train"):
        model.train(mode == "train"), ref.train(mode == "train")
        # need_weights=False, as the model calls it (the other path rounds differently)
        a, b = model.mha(x, x, x, need_weights=False)[0], ref.mha(x, x, x, need_weights=False)[0]
        assert torch.equal(a, b)  # attention untouched, bit for bit
        lowbit.reset_ran(model)
        y = model(x)
    twin = FQTLinear.from_float(copy.deepcopy(ref.head), FQT, seed=model.head.seed).train(mode == "train")
    assert model.head.ran and torch.equal(y, twin(a))


class AliasedOutProj(nn.Module):
    """An attention's out_proj also held under another name, registered first or second."""

    def __init__(self, alias_first: bool, hooked: bool = False) -> None:
        super().__init__()
        attn = nn.MultiheadAttention(8, 2, batch_first=True)
        if hooked:  # convert refuses the attention itself
            attn.register_forward_hook(lambda *a: None)
        if alias_first:
            self.head = attn.out_proj
        self.attn = attn
        if not alias_first:
            self.head = attn.out_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0])


@pytest.mark.parametrize("alias_first", [False, True])
@pytest.mark.parametrize("why", ["filter", "hook"])
def test_an_out_proj_of_a_float_attention_stays_float_under_every_name(alias_first: bool, why: str) -> None:
    """A review: with ``self.head = attn.out_proj`` registered before the attention, the
    first name reached converted the layer, so the float attention read a converted
    layer's weight (its output projection silently float, no reason given) and every later
    convert refused the attention, blaming lowbit's own layer. Now the layer stays float,
    named with the reason, whichever name comes first; converting again without the filter
    converts both."""
    torch.manual_seed(0)
    model = AliasedOutProj(alias_first, hooked=why == "hook")
    keep_float = (lambda m, n: not isinstance(m, nn.MultiheadAttention)) if why == "filter" else None  # noqa: E731
    model, report, _ = convert_quietly(model, module_filter=keep_float)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert model.head is model.attn.out_proj and report.converted == ()
    assert report.skipped.get("attn.out_proj") == MHA_REASON
    if why == "filter":
        model, report, _ = convert_quietly(model)
        assert report.skipped == {} and type(model.attn) is FQTMultiheadAttention
        assert model.head is model.attn.out_proj and isinstance(model.head, FQTLinear)


@pytest.mark.parametrize("order", [("a", "b", "head"), ("b", "head", "a"), ("head", "b", "a")])
def test_an_out_proj_shared_by_a_float_and_a_converted_attention_stays_float_everywhere(order) -> None:
    """Reviews: with ``b.out_proj = a.out_proj`` and ``a`` kept float, the result depended
    on the attributes' order — the ``FQTLinear`` that ``b`` converted was put into the float
    ``a``, or ``b``'s out_proj stayed float without a word. Now, in every order, a float
    attention holding it keeps it float under every name, and each attention's name says so."""
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            a, b = nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2)
            b.out_proj = a.out_proj
            for k in order:
                setattr(self, k, {"a": a, "b": b, "head": a.out_proj}[k])

    model, report, _ = convert_quietly(Two(), module_filter=lambda m, n: n != "a")
    assert type(model.a) is nn.MultiheadAttention and type(model.b) is FQTMultiheadAttention
    assert model.a.out_proj is model.b.out_proj is model.head
    assert type(model.head) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert set(report.skipped) == {"a.out_proj", "b.out_proj"} and report.converted == ("b",)
    assert all(r.startswith(MHA_REASON) for r in report.skipped.values())


def test_the_filter_is_asked_once_per_module_and_name() -> None:
    """A second review: the alias check asked the filter about every attention before the
    swaps, and the swap asked again, so a filter that converts the first attention it
    meets converted none. Each (module, name) is asked once, in the order of before."""
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a1, self.a2 = nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2)

    asked: list[str] = []

    def first_attention_only(m: nn.Module, name: str) -> bool:
        asked.append(name)
        return not isinstance(m, nn.MultiheadAttention) or sum(n.count(".") == 0 for n in asked) == 1

    model, report, _ = convert_quietly(Two(), module_filter=first_attention_only)
    assert asked == ["a1", "a1.out_proj", "a2", "a2.out_proj"]
    assert type(model.a1) is FQTMultiheadAttention and type(model.a2) is nn.MultiheadAttention
    assert report.excluded == ("a2",) and report.skipped == {"a2.out_proj": MHA_REASON}
    # an out_proj met under another name before its attention: decided after the attention,
    # the filter asked in the traversal's order all the same (a third review)
    aliased = Two()
    aliased.head = aliased.a2.out_proj
    aliased._modules = {k: aliased._modules[k] for k in ("a1", "head", "a2")}
    asked.clear()
    model, report, _ = convert_quietly(aliased, module_filter=first_attention_only)
    assert asked == ["a1", "a1.out_proj", "head", "a2", "a2.out_proj"]
    assert type(model.a1) is FQTMultiheadAttention and type(model.a2) is nn.MultiheadAttention
    assert model.head is model.a2.out_proj and type(model.head) is nn.modules.linear.NonDynamicallyQuantizableLinear


def _encoder_layer() -> nn.TransformerEncoderLayer:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)


def _unfused(layer: nn.TransformerEncoderLayer, x: torch.Tensor) -> torch.Tensor:
    """TransformerEncoderLayer's unfused path (norm_first=False, no masks, no dropout),
    written out with the layer's own submodules."""
    x = layer.norm1(x + layer.self_attn(x, x, x, need_weights=False)[0])
    return layer.norm2(x + layer.linear2(layer.activation(layer.linear1(x))))


def test_encoder_layer_runs_quantized_in_eval_no_grad() -> None:
    layer = _encoder_layer().eval()
    ref = copy.deepcopy(layer)
    model, report, _ = convert_quietly(layer)
    assert report.converted == ("self_attn", "self_attn.out_proj", "linear1", "linear2")
    assert report.skipped == {}
    assert report.fastpath_disabled == ("",)
    x = torch.randn(2, 5, 16)
    linears = {"self_attn.out_proj", "linear1", "linear2", "self_attn.attention"}
    with torch.no_grad():
        lowbit.reset_ran(model)  # the attention product's flag too
        assert not model.self_attn.attention.ran
        y = model(x)
        assert set(lowbit.fqt_layers(model, ran=True)) == linears and model.self_attn.attention.ran
        # the in-projection that ran says so; its alternatives are fqt_blocks' only
        assert model.self_attn.projections.qkv.ran
        assert not any(n.startswith("self_attn.projections") for n in lowbit.fqt_layers(model))
        assert torch.equal(y, _unfused(model, x))  # the unfused path, quantized GEMMs
        assert not torch.equal(y, ref(x))  # not the float fused path
        # the flag back on: the converted layers' forward pre-hooks alone keep the fused
        # path off (PyTorch declines it where a submodule has forward hooks)
        model.activation_relu_or_gelu = 1
        lowbit.reset_ran(model)
        assert torch.equal(model(x), y) and set(lowbit.fqt_layers(model, ran=True)) == linears
        # without either, the fused path bypasses the converted layers, and the ran flags
        # tell: that is what lowbit.coverage reads
        for m in model.modules():
            m._forward_pre_hooks.clear()
        lowbit.reset_ran(model)
        assert torch.equal(model(x), ref(x))
        assert set(lowbit.fqt_layers(model, ran=False)) == linears
        assert not model.self_attn.attention.ran


@pytest.mark.parametrize("parts", ["linears", "attention"])
def test_layers_converted_on_their_own_run_inside_an_encoder_layer(parts: str) -> None:
    """A review: ``layer.linear1 = lowbit.convert(layer.linear1, cfg)`` (convert never
    sees the encoder layer, so it cannot turn its fused path off) ran float in ``eval()``
    under ``no_grad``: the fused kernel read the weights and never called the converted
    layers. Every converted layer carries a no-op forward pre-hook, which makes PyTorch
    decline that path: they run, as in the unfused layer."""
    layer = _encoder_layer().eval()
    ref = copy.deepcopy(layer)
    cfg = FQTConfig.from_recipe("fqt-psq-4", seed=1)
    names = {"linear1", "linear2"} if parts == "linears" else {"self_attn.out_proj", "self_attn.attention"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lowbit.ConversionWarning)
        if parts == "linears":
            layer.linear1, layer.linear2 = lowbit.convert(layer.linear1, cfg), lowbit.convert(layer.linear2, cfg)
        else:
            layer.self_attn = lowbit.convert(nn.Sequential(layer.self_attn), cfg)[0]
    assert layer.activation_relu_or_gelu  # untouched: convert never saw the encoder layer
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        lowbit.reset_ran(layer)
        y = layer(x)
        assert set(lowbit.fqt_layers(layer, ran=True)) == names
        assert torch.equal(y, _unfused(layer, x)) and not torch.equal(y, ref(x))


def test_an_encoder_whose_layers_were_converted_one_by_one_names_its_nested_path() -> None:
    """A review: converting each layer of an ``nn.TransformerEncoder`` on its own left the
    encoder's nested-tensor path on; in ``eval()`` with a padding mask the converted
    attention then got a nested tensor and said only that it does not take one. The
    error names the encoder's path and the two ways out."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(_encoder_layer(), num_layers=2).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", lowbit.ConversionWarning)
        for layer in enc.layers:
            lowbit.convert(layer, FQTConfig.from_recipe("fqt-psq-8", seed=1))
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"query is a nested tensor.*nn.TransformerEncoder "
                                                             r"in eval\(\) .*use_nested_tensor = False"):
        enc(torch.randn(2, 5, 16), src_key_padding_mask=pad)
    enc.use_nested_tensor = False
    with torch.no_grad():
        assert enc(torch.randn(2, 5, 16), src_key_padding_mask=pad).shape == (2, 5, 16)


def test_an_attention_out_proj_converted_on_its_own_is_left_alone_with_the_reason() -> None:
    """A review: ``mha.out_proj = lowbit.convert(mha.out_proj, cfg)`` converted it without a
    word, and it never ran (``nn.MultiheadAttention`` reads its weight directly), in train
    and eval. ``convert`` leaves it alone and says why and what to convert instead."""
    mha = nn.MultiheadAttention(16, 2)
    with pytest.warns(ConversionWarning, match=r"out_proj \(NonDynamicallyQuantizableLinear\) converted on its "
                                               r"own.*convert the attention module"):
        out, report = lowbit.convert(mha.out_proj, FQT, report=True)
    assert out is mha.out_proj and report.converted == () and list(report.skipped) == [""]


def test_encoder_layer_train_mode() -> None:
    layer = _encoder_layer().train()
    ref = copy.deepcopy(layer)
    x = torch.randn(2, 5, 16)
    exact, _, _ = convert_quietly(copy.deepcopy(layer), FP)
    assert torch.equal(exact(x), ref(x))  # fp recipe: the same float computation
    model, _, _ = convert_quietly(layer)
    y = model(x)
    assert set(lowbit.fqt_layers(model, ran=True)) == {"self_attn.out_proj", "linear1", "linear2",
                                                       "self_attn.attention"}
    assert not torch.equal(y, ref(x))
    (y * torch.linspace(-1, 1, 16)).sum().backward()  # y.sum() after LayerNorm has zero gradient
    assert model.linear1.weight.grad.abs().sum() > 0


def test_encoder_nested_tensor_path_is_turned_off() -> None:
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(_encoder_layer(), num_layers=2, enable_nested_tensor=True).eval()
    assert enc.use_nested_tensor  # the fused nested-tensor path applies to the float model
    model, report, _ = convert_quietly(enc)
    assert report.fastpath_disabled == ("layers.0", "layers.1", "")
    assert report.skipped == {}
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad():
        lowbit.reset_ran(model)
        y = model(x, src_key_padding_mask=pad)
        assert lowbit.fqt_layers(model, ran=False) == {}
        out = x
        for layer in model.layers:  # the layers on the padded batch, not a nested tensor
            out = layer(out, src_key_padding_mask=pad)
        assert torch.equal(y, out)
        assert y[1, 3:].abs().sum() > 0  # the nested path would have zeroed the padding


def test_decoder_layer_has_no_fast_path_to_turn_off() -> None:
    torch.manual_seed(0)
    dec = nn.TransformerDecoderLayer(16, 2, 32, dropout=0.0, batch_first=True).eval()
    model, report, _ = convert_quietly(dec)
    assert report.converted == ("self_attn", "self_attn.out_proj", "multihead_attn",
                                "multihead_attn.out_proj", "linear1", "linear2")
    assert report.fastpath_disabled == () and report.skipped == {}
    with torch.no_grad():
        model(torch.randn(2, 5, 16), torch.randn(2, 4, 16))
    assert lowbit.fqt_layers(model, ran=False) == {}


# -- the report, shared modules, the root, the ran flag -----------------------------------
def test_plain_model_converts_without_warning() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Conv2d(1, 1, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lowbit.convert(model, FQT) is model  # without report=: the model only
    model, report = lowbit.convert(model, FQT, module_filter=lambda m, n: n != "2", report=True)
    assert report.converted == ("0",) and report.excluded == ("2",) and report.skipped == {}
    assert str(report) == "converted 1 layers, skipped 0, excluded by the filter 1"


def test_shared_module_becomes_one_converted_layer() -> None:
    lin = nn.Linear(4, 4)
    model = nn.Module()
    model.a, model.b = lin, lin
    model, report, _ = convert_quietly(model)
    assert model.a is model.b and isinstance(model.a, FQTLinear)
    assert report.converted == ("a",)


def test_root_module() -> None:
    model, report, _ = convert_quietly(nn.Linear(3, 2))
    assert type(model) is FQTLinear and report.converted == ("",)
    hooked = nn.Linear(3, 2)
    hooked.register_forward_hook(lambda m, i, o: o)
    model, report, msgs = convert_quietly(hooked)
    assert model is hooked and set(report.skipped) == {""}
    assert msgs[0].startswith("lowbit.convert left 1 layer(s) in float: <root>: has forward hooks")


def test_messages_name_modules_quoted_and_the_model_itself_as_root() -> None:
    """A new user's trial: in an ``nn.Sequential`` the warning read "in float: 0: …; 2: …" —
    a count, not a module. Every message names a module quoted (``'2'``) and the model itself
    ``<root>`` (its name ``""`` printed as nothing); the report's fields keep the bare names."""
    assert (quote_module("2"), quote_module("blocks.0.fc"), quote_module("")) == ("'2'", "'blocks.0.fc'", ROOT)
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    for i in (0, 2):
        model[i].register_forward_hook(lambda m, args, out: out)
    _, report, msgs = convert_quietly(model)
    why = "has forward hooks: the converted layer would not carry them"
    assert report.skipped == {"0": why, "2": why}
    assert msgs == [f"lowbit.convert left 2 layer(s) in float: '0': {why}; '2': {why}"]
    assert str(report).splitlines()[1:] == [f"  skipped '0': {why}", f"  skipped '2': {why}"]
    # the fused fast path turned off in a Sequential's layer '0'
    enc = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    _, report, _ = convert_quietly(enc)
    assert report.fastpath_disabled == ("0",) and str(report).splitlines()[-1] == "  fused fast path off: '0'"
    # the model itself: skipped, and a filter answering None for it
    root = nn.Linear(3, 3)
    root.register_forward_hook(lambda m, i, o: o)
    _, report, msgs = convert_quietly(root)
    assert set(report.skipped) == {""} and str(report).splitlines()[1] == f"  skipped <root>: {why}"
    _, report, msgs = convert_quietly(nn.Linear(3, 3), module_filter=lambda m, name: None)
    assert report.excluded == ("",) and msgs[0].startswith(
        "lowbit.convert converted nothing: module_filter returned None (read as False: excluded) for 1 "
        "module(s) (<root>); ")


def test_ran_flag_and_reset() -> None:
    torch.manual_seed(0)
    model = lowbit.convert(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), FQT)
    assert set(lowbit.fqt_layers(model, ran=False)) == {"0", "1"}
    model[0](torch.randn(2, 4))
    assert set(lowbit.fqt_layers(model, ran=True)) == {"0"}
    model(torch.randn(2, 4))
    assert set(lowbit.fqt_layers(model, ran=True)) == {"0", "1"}
    lowbit.reset_ran(model)
    assert lowbit.fqt_layers(model, ran=True) == {}
    model(torch.randn(2, 4))
    lowbit.convert(model, FP)  # a new config restarts the flags
    assert lowbit.fqt_layers(model, ran=True) == {}


def test_converting_again_restarts_every_ran_flag_attention_included() -> None:
    torch.manual_seed(0)
    model = lowbit.convert(SelfAttention(8), FQT)
    model(torch.randn(2, 3, 8))
    assert lowbit.fqt_layers(model, ran=True)  # its projections and products ran
    lowbit.convert(model, FP)
    assert lowbit.fqt_layers(model, ran=True) == {}
    assert not any(b.ran for b in lowbit.fqt_blocks(model).values())


def test_ran_flag_under_torch_compile() -> None:
    """The flag is a constant attribute store: set on every compiled call, and it causes
    no recompilation (a counter would be guarded and recompile on every call)."""
    import torch._dynamo.testing

    torch._dynamo.reset()
    model = lowbit.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), FP)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    frames = []
    for _ in range(3):
        lowbit.reset_ran(model)
        compiled(torch.randn(2, 4))
        assert set(lowbit.fqt_layers(model, ran=True)) == {"0", "2"}
        frames.append(counter.frame_count)
    assert frames[0] >= 1 and frames[1] == frames[2] == frames[0]


def _grads_after_one_step(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    out = model(x)
    (out[0] if isinstance(out, tuple) else out).pow(2).sum().backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["linear", "conv", "mha"])
def test_converting_again_with_another_seed_reseeds_the_noise(kind: str) -> None:
    """Found by a new-user trial: a second convert with a new seed changed the config but
    kept the first seed's noise (config and noise disagreed). It must give bitwise the
    fresh conversion's gradients with that seed; the same seed keeps the stream."""
    torch.manual_seed(0)
    base, x = {
        "linear": (nn.Sequential(nn.Linear(16, 8)), torch.randn(32, 16)),
        "conv": (nn.Sequential(nn.Conv2d(3, 4, 3)), torch.randn(4, 3, 6, 6)),
        "mha": (nn.Sequential(nn.MultiheadAttention(8, 2, batch_first=True)), torch.randn(2, 5, 8)),
    }[kind]
    if kind == "mha":
        base = nn.Sequential(_SelfAttention(base[0]))

    def cfg(seed: int) -> FQTConfig:
        return FQTConfig.from_recipe("fqt-psq-4", seed=seed)

    fresh5 = _grads_after_one_step(lowbit.convert(copy.deepcopy(base), cfg(5)), x)
    fresh0 = _grads_after_one_step(lowbit.convert(copy.deepcopy(base), cfg(0)), x)
    again = lowbit.convert(lowbit.convert(copy.deepcopy(base), cfg(0)), cfg(5))
    assert all(s["seed"] == 5 and s["counter"] == 0 for s in lowbit.rng_state(again).values())
    got = _grads_after_one_step(again, x)
    assert all(torch.equal(a, b) for a, b in zip(got, fresh5))
    assert not all(torch.equal(a, b) for a, b in zip(got, fresh0))
    # the same seed again (or none) keeps each stream where it is
    before = lowbit.rng_state(again)
    assert any(s["counter"] == 1 for s in before.values())  # (an MHA's unused projections stay at 0)
    lowbit.convert(again, cfg(5))
    lowbit.convert(again, FQTConfig.from_recipe("fqt-psq-8"))
    assert lowbit.rng_state(again) == before


class _SelfAttention(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.mha = mha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


def test_an_old_transformers_breaks_only_models_that_need_it(monkeypatch) -> None:
    """transformers imported (for a tokenizer, say) but older than lowbit's Hugging Face
    support: convert on a plain model failed with a bare ImportError of AttentionInterface.
    Now a model without HF modules converts; one with them gets the version it needs."""
    import sys

    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "lowbit.hf", None)  # `from . import hf` raises ImportError
    monkeypatch.delattr(lowbit, "hf", raising=False)  # (once imported, it is the package's attribute)
    model = lowbit.convert(nn.Sequential(nn.Linear(4, 4)), FQTConfig.from_recipe("fqt-psq-8"))
    assert isinstance(model[0], lowbit.FQTLinear)

    class Fake(nn.Linear):
        pass

    Fake.__module__ = "transformers.models.fake.modeling_fake"
    with pytest.raises(ImportError, match=r"needs transformers ≥ 4\.51 .* the model holds Fake"):
        lowbit.convert(nn.Sequential(Fake(4, 4)), FQTConfig.from_recipe("fqt-psq-8"))


@pytest.mark.parametrize("seed", [0, 1])
def test_copies_of_a_converted_block_get_their_own_noise_when_the_parent_is_converted(seed: int) -> None:
    """A review: ``nn.TransformerEncoder`` deep-copies a converted layer, and converting
    the parent (with the same seed or another) kept every copy's noise name — all copies
    drew the same noise (a SharedNoiseWarning every step, the warning's own advice did
    not help). Each block must take the stream a fresh conversion gives it: bitwise the
    gradients of the unconverted stack converted once."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0)
    plain = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    converted_layer = lowbit.convert(copy.deepcopy(layer), FQTConfig.from_recipe("fqt-psq-8", seed=0))
    stacked = nn.TransformerEncoder(converted_layer, num_layers=3, enable_nested_tensor=False)
    stacked.load_state_dict(plain.state_dict())
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lowbit.noise.SharedNoiseWarning)
        again = lowbit.convert(stacked, cfg)
        assert {n: b.noise.name for n, b in lowbit.fqt_blocks(again).items()} == \
            {n: n for n in lowbit.fqt_blocks(again)}
        x = torch.randn(5, 2, 16)
        got = _grads_after_one_step(again, x)
    fresh = _grads_after_one_step(lowbit.convert(copy.deepcopy(plain), cfg), x)
    assert all(torch.equal(a, b) for a, b in zip(got, fresh))


def test_a_converted_submodule_converted_again_with_its_seed_keeps_its_stream() -> None:
    """The rekeying above touches only copies sharing a stream and reseeded blocks: a
    block converted again alone (same seed) keeps its name and counter."""
    model = lowbit.convert(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), FQTConfig.from_recipe("fqt-psq-8", seed=3))
    model(torch.randn(3, 4)).sum().backward()
    before = lowbit.rng_state(model)
    lowbit.convert(model[1], FQTConfig.from_recipe("fqt-psq-4", seed=3))
    assert lowbit.rng_state(model) == before and model[1].noise.name == "1"
    # reseeded one call each (a second review: both were renamed "" relative to their own
    # call and shared one stream): each keeps its name, restarted from the new seed
    for layer in (model[0], model[1]):
        lowbit.convert(layer, FQTConfig.from_recipe("fqt-psq-8", seed=5))
    assert [(m.noise.seed, m.noise.name, m.noise.counter) for m in model] == [(5, "0", 0), (5, "1", 0)]


def test_a_model_with_nothing_to_convert_is_warned_about() -> None:
    """A model whose GEMMs are functional (``F.linear`` on its own parameters) came back
    unchanged without a word and trained in float (a new user's trial); a model with
    nothing converted because the filter excluded it all is not warned about."""
    import torch.nn.functional as F

    class Dense(nn.Module):
        def __init__(self, i: int, o: int) -> None:
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(o, i)), nn.Parameter(torch.zeros(o))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.w, self.b)

    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=0)
    for model in (nn.Sequential(Dense(8, 16), nn.ReLU(), Dense(16, 2)), nn.Sequential(nn.ReLU(), nn.LayerNorm(4))):
        with pytest.warns(lowbit.ConversionWarning, match=r"converted nothing: Sequential holds no module "
                          r"lowbit has a layer for .* GEMMs called as functions \(F\.linear"):
            lowbit.convert(model, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.convert(nn.Sequential(nn.Linear(4, 4)), cfg, module_filter=lambda m, n: False)
        lowbit.convert(nn.Sequential(nn.Linear(4, 4)), cfg)


def test_a_filter_returning_none_that_converts_nothing_is_warned_about() -> None:
    """A new user's trial: a ``module_filter`` without a ``return`` (or ending in a print)
    answers None, read as "exclude", and the model stayed float without a word. A filter
    answering False on purpose, or None for some modules while others convert, is not
    warned about (a falsy answer is an answer)."""
    two = lambda: nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))  # noqa: E731
    _, report, msgs = convert_quietly(two(), module_filter=lambda m, name: isinstance(m, nn.Linear) and None)
    assert report.converted == () and len(report.excluded) == 2
    assert msgs == ["lowbit.convert converted nothing: module_filter returned None (read as False: excluded) "
                    "for 2 module(s) ('0', '1'); a filter must return True for the modules to convert — "
                    "does it lack a return?"]
    _, report, msgs = convert_quietly(two(), module_filter=lambda m, name: False)
    assert report.converted == () and msgs == []
    _, report, msgs = convert_quietly(two(), module_filter=lambda m, name: True if name == "1" else None)
    assert report.converted == ("1",) and msgs == []
    # None for modules lowbit has no layer for excludes nothing: a filter keeping its Linear
    # float on purpose (False) is not told it lacks a return (a review)
    with_others = nn.Sequential(nn.LSTM(4, 4), nn.Linear(4, 4), nn.Conv3d(1, 1, 1))
    _, report, msgs = convert_quietly(with_others, module_filter=lambda m, name: False if isinstance(m, nn.Linear)
                                      else None)
    assert report.excluded == ("1",) and not any("module_filter returned None" in msg for msg in msgs)
