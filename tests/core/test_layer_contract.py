"""The layer contract: an FQT layer's output behaves like the float module's.

Issue 11, items 4, 6, 7 and 17, for every lowbit autograd Function (FQTLinear, FQTConv2d):
in-place ops, views, ``retain_graph`` and double use of the output give exactly the
gradients of the same model with out-of-place ops; under ``torch.autocast`` the output has
the autocast dtype and exactly the values of the same layer run without autocast, cast;
empty inputs give what the float module gives (shapes, dtypes, zero gradients) on every
backend; mismatched dtypes raise at once, as ``nn.Linear``/``nn.Conv2d`` do.
"""

from __future__ import annotations

import contextlib
import gc
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import FQTConfig

BACKENDS = ["reference", "auto", "int8"]
LAYERS = ["linear", "linear3d", "conv"]


def float_forward(kind: str):
    """The unconverted module's forward (runs on the converted layer's parameters)."""
    return nn.Conv2d.forward if kind == "conv" else nn.Linear.forward


def make(kind: str, backend: str = "auto", recipe: str = "fqt-psq-4", dtype=torch.float32,
         bias: bool = True) -> tuple[nn.Module, torch.Tensor]:
    """A converted layer and an input for it, the same for the same arguments."""
    torch.manual_seed(0)
    if kind == "conv":
        m, x = nn.Conv2d(3, 4, 3, padding=1, bias=bias), torch.randn(2, 3, 5, 5)
    else:
        m = nn.Linear(8, 6, bias=bias)
        x = torch.randn(4, 8) if kind == "linear" else torch.randn(2, 3, 8)
    m = lowbit.convert(m.to(dtype), FQTConfig.from_recipe(recipe, backend=backend, seed=7))
    return m, x.to(dtype).requires_grad_()


# -- item 4: in-place ops, views, retain_graph, double use ------------------------------------
def _relu(y: torch.Tensor, inplace: bool) -> torch.Tensor:
    return F.relu(y, inplace=inplace)  # nn.ReLU(inplace=True)


def _iadd(y: torch.Tensor, inplace: bool) -> torch.Tensor:
    c = torch.linspace(-1, 1, y.shape[-1])
    if inplace:
        y += c
        return y
    return y + c


def _view_then_inplace(y: torch.Tensor, inplace: bool) -> torch.Tensor:
    if inplace:
        y[..., :2].mul_(2)  # a view of the output, modified in place
        y.flatten(1).relu_()
        return y
    scale = torch.ones(y.shape[-1])
    scale[:2] = 2
    return (y * scale).flatten(1).relu().view(y.shape)


def _double_use(y: torch.Tensor, inplace: bool) -> torch.Tensor:
    z = F.relu(y, inplace=inplace)
    return z * 3 + z  # the (modified) output used twice


OPS = {"relu_inplace": _relu, "iadd": _iadd, "view_then_inplace": _view_then_inplace,
       "double_use": _double_use}


def _grads(kind: str, backend: str, op, inplace: bool, twice: bool) -> list[torch.Tensor]:
    m, x = make(kind, backend)
    out = op(m(x), inplace)
    w = torch.linspace(-2, 3, out.numel()).reshape(out.shape)
    loss = (out * w).sum()
    loss.backward(retain_graph=twice)
    if twice:  # a second backward of the same graph: fresh noise, accumulated
        loss.backward()
    return [x.grad, m.weight.grad, m.bias.grad]


@pytest.mark.parametrize("twice", [False, True], ids=["once", "retain_graph"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("kind", LAYERS)
def test_inplace_ops_on_outputs_give_the_out_of_place_gradients(kind, op, twice) -> None:
    # same seed, same noise stream: the gradients must be bitwise equal
    a = _grads(kind, "auto", OPS[op], True, twice)
    b = _grads(kind, "auto", OPS[op], False, twice)
    for ga, gb in zip(a, b):
        assert torch.equal(ga, gb)


class _Watching(torch.overrides.TorchFunctionMode):
    """A ``__torch_function__`` mode that changes nothing: under it a converted layer
    must go through the ``lowbit::block_forward`` custom op (what a mode sees)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYERS)
def test_plain_eager_call_skips_the_dispatcher_with_the_same_values(kind, backend) -> None:
    """Plain eager calls run the block's functions through ``lowbit.ops._EagerBlock``
    (no dispatcher); under a mode the custom op runs. Same seed, same noise: the output
    and all three gradients bitwise equal."""
    got = {}
    for via_op in (False, True):
        m, x = make(kind, backend)
        with _Watching() if via_op else contextlib.nullcontext():
            y = m(x)
        node = y.grad_fn  # the block's node, under linear3d's reshape of the output
        while type(node).__name__.startswith(("View", "Reshape", "UnsafeView")):
            node = node.next_functions[0][0]
        assert ("_EagerBlock" in type(node).__name__) is not via_op, type(node).__name__
        y.backward(torch.linspace(-1, 2, y.numel()).reshape(y.shape))
        got[via_op] = [y.detach(), x.grad, m.weight.grad, m.bias.grad]
    for a, b in zip(got[False], got[True]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_output_is_not_a_view_of_a_function_internal(kind, backend) -> None:
    m, x = make(kind, backend)
    y = m(x)
    assert y._base is None  # a fresh tensor: autograd allows in-place ops on it
    _relu(y, True).sum().backward()  # the failing case: ReLU(inplace=True)


def test_inplace_on_a_saved_output_raises_as_for_the_float_module() -> None:
    # Modifying an output that a later op saved is an error for nn.Linear too: the same kind.
    for fqt in (False, True):
        m, x = make("linear", recipe="fqt-psq-4" if fqt else "fp")
        y = m(x)
        z = y * y  # saves y
        y.relu_()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            z.sum().backward()


# -- item 6: autocast ----------------------------------------------------------------------------
@pytest.mark.parametrize("cast", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", LAYERS)
def test_autocast_output_is_the_recipe_result_cast(kind, backend, cast) -> None:
    m_ac, x_ac = make(kind, backend)
    m, x = make(kind, backend)
    with torch.autocast("cpu", dtype=cast):
        y_ac = m_ac(x_ac)
    y = m(x)
    assert y_ac.dtype == cast
    assert torch.equal(y_ac, y.to(cast))  # the recipe's float32 arithmetic, then one cast
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(cast)
    y_ac.backward(g)
    y.backward(g.float())  # the same upstream values
    for p_ac, p in ((x_ac, x), (m_ac.weight, m.weight), (m_ac.bias, m.bias)):
        assert p_ac.grad.dtype == p.dtype == torch.float32  # gradients in the parameters' dtypes
        assert torch.equal(p_ac.grad, p.grad)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_autocast_allows_mixed_dtypes_as_torch_does(kind) -> None:
    _, x = make(kind)
    for layer_dtype, x_dtype in ((torch.float32, torch.bfloat16), (torch.float16, torch.float32)):
        m, _ = make(kind, dtype=layer_dtype)
        xm = x.detach().to(x_dtype)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(xm)
            float_out = float_forward(kind)(m, xm)
        assert out.dtype == float_out.dtype == torch.bfloat16
        if layer_dtype == torch.float32:  # x.bfloat16() rounds the input the same way both times
            m2, _ = make(kind)
            assert torch.equal(out, m2(xm.float()).to(torch.bfloat16))
    # float64 is not cast by autocast: mixing it with float32 is an error, as in torch
    m, _ = make(kind)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError) as err:
        m(x.detach().double())
    name = "fqt_conv2d" if kind == "conv" else "fqt_linear"
    assert str(err.value) == (f"{name}: input and weight must have the same dtype, but got "
                              "torch.float64 and torch.float32")


def test_float64_and_bf16_layers_keep_their_dtype() -> None:
    for kind in ("linear", "conv"):
        for dt in (torch.float64, torch.bfloat16):
            m, x = make(kind, dtype=dt)
            y = m(x)
            y.sum().backward()
            assert y.dtype == x.grad.dtype == m.weight.grad.dtype == m.bias.grad.dtype == dt


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("recipe", ["fqt-psq-8", "qat-8", "fqt-hadamard-8"])
@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_float64_layers_compute_in_float64(kind: str, recipe: str, backend: str) -> None:
    """float64 Conv2d/Conv1d (reference: all three GEMMs; auto: both backward ones) and
    QAT Linear's backward computed in float32: inputs scaled by 2⁻²⁰⁰ gave ∇W = 0, by 2²⁰⁰
    NaN; Linear's ∇X under a row transform (Hadamard, BHQ) ran its GEMM into float32
    before ``T⁻¹``. Every quantizer and GEMM here is equivariant under a power-of-two scale, so the
    scaled run must give exactly ``s·Y``, ``s·∇X`` and ``s²·∇W`` (same noise: one seed);
    and the float64 output is not rounded to float32's grid."""
    def run(s: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        m = {"linear": nn.Linear(24, 6, bias=False), "conv": nn.Conv2d(3, 4, 3, padding=1, bias=False),
             "conv1d": nn.Conv1d(3, 4, 3, padding=1, bias=False)}[kind].double()
        x = {"linear": torch.randn(5, 24), "conv": torch.randn(2, 3, 6, 6),
             "conv1d": torch.randn(2, 3, 7)}[kind].double()
        m = lowbit.convert(m, FQTConfig.from_recipe(recipe, backend=backend, seed=7))
        x = (x * s).requires_grad_()
        y = m(x)
        y.backward(torch.randn(y.shape, dtype=torch.float64) * s)
        return [y.detach(), x.grad, m.weight.grad]
    y, gx, gw = run(1.0)
    assert y.dtype == gx.dtype == gw.dtype == torch.float64
    assert not torch.equal(y, y.float().double())  # float64 sums, not float32 ones
    for s in (2.0 ** -200, 2.0 ** 200):
        ys, gxs, gws = run(s)
        assert torch.equal(ys, y * s) and torch.equal(gxs, gx * s) and torch.equal(gws, gw * (s * s))


# -- item 7: empty inputs ------------------------------------------------------------------------
EMPTY = {
    "linear_N0": (lambda: nn.Linear(8, 4), (0, 8)),
    "linear_2x0": (lambda: nn.Linear(8, 4), (2, 0, 8)),
    "linear_0x3": (lambda: nn.Linear(8, 4), (0, 3, 8)),
    "linear_in0": (lambda: nn.Linear(0, 4), (3, 0)),
    "linear_out0": (lambda: nn.Linear(8, 0), (3, 8)),
    "conv_N0": (lambda: nn.Conv2d(3, 4, 3), (0, 3, 8, 8)),
    "conv_N0_same": (lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="reflect"), (0, 3, 8, 8)),
    "conv_Cin0": (lambda: nn.Conv2d(0, 4, 3), (2, 0, 8, 8)),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", EMPTY)
def test_empty_inputs_give_what_the_float_module_gives(case, backend, dtype) -> None:
    build, shape = EMPTY[case]
    results = []
    for recipe in ("fp", "fqt-bhq-4", "fqt-psq-8-predicted"):
        torch.manual_seed(0)
        m = build().to(dtype)
        if m.bias is not None:
            with torch.no_grad():
                m.bias.copy_(torch.arange(1, m.bias.numel() + 1))  # a visible bias
        if recipe != "fp":
            m = lowbit.convert(m, FQTConfig.from_recipe(recipe, backend=backend, seed=0))
        x = torch.randn(shape, dtype=dtype, requires_grad=True)
        y = m(x)
        y.backward(torch.ones_like(y))
        results.append([y, x.grad, m.weight.grad, m.bias.grad])
    want = results[0]  # the float module's
    for got in results[1:]:
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.equal(a, b)


def test_empty_batch_records_no_predicted_range() -> None:
    m, _ = make("linear", recipe="fqt-psq-8-predicted")
    for _ in range(2):
        m(torch.randn(4, 8, requires_grad=True)).sum().backward()
    before = lowbit.range_state(m)[""]
    m(torch.randn(0, 8, requires_grad=True)).sum().backward()
    after = lowbit.range_state(m)[""]
    assert set(before) == set(after) == {"grad_input", "grad_weight"}
    for path, state in before.items():
        assert state["hist"] is not None and torch.equal(state["hist"], after[path]["hist"])
        assert state["stats"] == after[path]["stats"] and state["count"] == after[path]["count"]


@pytest.mark.parametrize("shape", [(2, 3, 0, 8), (2, 3, 1, 8)])
def test_conv_on_too_small_input_raises_torchs_error(shape) -> None:
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(RuntimeError) as want:
        conv(torch.randn(shape))
    with pytest.raises(RuntimeError) as got:
        lowbit.convert(conv, FQTConfig.from_recipe("fqt-psq-8"))(torch.randn(shape))
    assert str(got.value) == str(want.value)


# -- item 17: dtypes outside autocast ----------------------------------------------------------
MISMATCH = [  # (layer dtype, input dtype, bias dtype or None: the layer's)
    (torch.bfloat16, torch.float32, None),
    (torch.float32, torch.bfloat16, None),
    (torch.float32, torch.float64, None),
    (torch.bfloat16, torch.bfloat16, torch.float32),
]


@pytest.mark.parametrize("layer_dtype, x_dtype, bias_dtype", MISMATCH)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_mismatched_dtypes_raise_at_once(kind, layer_dtype, x_dtype, bias_dtype) -> None:
    m, x = make(kind, dtype=layer_dtype)
    if bias_dtype is not None:
        m.bias.data = m.bias.data.to(bias_dtype)
    with pytest.raises(RuntimeError):  # nn.Linear / nn.Conv2d refuse it too
        float_forward(kind)(m, x.detach().to(x_dtype))
    with pytest.raises(RuntimeError) as err:
        m(x.detach().to(x_dtype))
    name = "fqt_conv2d" if kind == "conv" else "fqt_linear"
    if bias_dtype is None:
        want = f"input and weight must have the same dtype, but got {x_dtype} and {layer_dtype}"
    else:
        want = f"bias and weight must have the same dtype, but got {bias_dtype} and {layer_dtype}"
    assert str(err.value) == f"{name}: {want}"


def test_linear_shape_mismatch_raises_even_on_empty_input() -> None:
    m, _ = make("linear")
    for x in (torch.randn(2, 5), torch.randn(0, 5), torch.tensor(1.0)):
        with pytest.raises(RuntimeError):
            nn.Linear(8, 6)(x)
        with pytest.raises(RuntimeError) as err:
            m(x)
        assert str(err.value) == (f"fqt_linear: input of shape {tuple(x.shape)} does not fit a "
                                  "weight of shape (6, 8): its last dimension must be 8")


# Bad arguments to the functional API: where torch's F.conv1d/F.conv2d/F.linear refuse them,
# lowbit refuses them too, on every recipe (the fp recipe is torch itself), naming the
# argument and the shapes the caller passed (not lowbit's internal 4-D views of a Conv1d).
X2, W2 = (2, 4, 8, 8), (8, 4, 3, 3)
BAD = {  # name: (function, x shape, weight shape, bias shape or None, kwargs, words of the error)
    "same-strided-2d": ("fqt_conv2d", X2, W2, None, {"stride": 2, "padding": "same"},
                        "padding='same' is not supported for strided convolutions"),
    "same-strided-1d": ("fqt_conv1d", (2, 4, 10), (8, 4, 3), None, {"stride": 2, "padding": "same"},
                        "padding='same' is not supported for strided convolutions"),
    "padding-string": ("fqt_conv2d", X2, W2, None, {"padding": "full"}, "invalid padding string 'full'"),
    "conv-bias-size": ("fqt_conv2d", X2, W2, (5,), {}, "expected bias to be 1-dimensional with 8 elements"),
    "conv1d-channels": ("fqt_conv1d", (2, 5, 10), (8, 4, 3), None, {},
                        "weight of size [8, 4, 3], expected input[2, 5, 10] to be 3-D with 4 channels"),
    "conv2d-groups": ("fqt_conv2d", X2, (8, 3, 3, 3), None, {"groups": 2},
                      "expected input[2, 4, 8, 8] to be 4-D with 6 channels"),
    "conv-weight-dims": ("fqt_conv2d", X2, (8, 4, 3), None, {}, "expected a 4-D weight"),
    "linear-1d-weight": ("fqt_linear", (2, 4), (4,), None, {}, "expected a 2-D weight (out, in)"),
    "linear-bias-size": ("fqt_linear", (2, 4), (3, 4), (5,), {}, "bias of shape (5,) does not fit"),
}
TORCH_OPS = {"fqt_conv2d": F.conv2d, "fqt_conv1d": F.conv1d, "fqt_linear": F.linear}


@pytest.mark.parametrize("recipe", ["fp", "fqt-psq-8"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_functional_arguments_raise_what_torch_raises_for(case, recipe) -> None:
    fn, xs, ws, bs, kw, words = BAD[case]
    x, w, b = torch.randn(xs), torch.randn(ws), None if bs is None else torch.randn(bs)
    if fn != "fqt_linear" or case != "linear-1d-weight":  # F.linear takes a 1-D weight
        with pytest.raises(RuntimeError):
            TORCH_OPS[fn](x, w, b, **kw)
    call = getattr(lowbit.functional, fn, None) or getattr(lowbit, fn)
    if case == "linear-1d-weight" and recipe == "fp":  # the fp recipe is F.linear: it takes it
        assert torch.equal(call(x, w, b, FQTConfig.from_recipe(recipe)), F.linear(x, w, b))
        return
    with pytest.raises(RuntimeError) as err:
        call(x, w, b, FQTConfig.from_recipe(recipe, seed=0), **kw)
    if recipe != "fp":  # fp is F.conv*/F.linear itself: torch's words
        assert words in str(err.value) and str(err.value).startswith(fn)


def test_linear_takes_a_one_element_bias_as_torch_broadcasts_it() -> None:
    x, w, b = torch.randn(2, 4), torch.randn(3, 4), torch.randn(1)
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=0)
    got = lowbit.functional.fqt_linear(x, w, b, cfg)
    want = lowbit.functional.fqt_linear(x, w, b.expand(3).clone(), cfg)
    assert torch.equal(got, want)
    # fault kind 254 (a new user's trial): a 0-d bias of a one-output weight was refused
    # ("bias of shape () ... must be (1,) or one element"), where F.linear takes it
    w1, b0 = torch.randn(1, 4), torch.tensor(2.0)
    assert torch.equal(lowbit.functional.fqt_linear(x, w1, b0, cfg),
                       lowbit.functional.fqt_linear(x, w1, b0.reshape(1), cfg))


def test_quantize_forward_and_gradient_refuse_other_shapes_and_specs() -> None:
    """Fault kind 254 (a new user's trial): ``quantize_forward`` took a 3-D operand and gave
    scales of no row's shape, a 0-d one an ``IndexError``, and another spec type an
    ``AttributeError``; now each is named."""
    from lowbit import GradSpec, OperandSpec
    from lowbit.functional import quantize_forward, quantize_gradient

    for shape in ((2, 3, 4), (4,), ()):
        with pytest.raises(ValueError, match=rf"quantize_forward expects a 2-D operand \(rows, in\): got shape "
                                             rf"{re.escape(str(shape))}"):
            quantize_forward(torch.randn(shape), OperandSpec(8, "row"))
    with pytest.raises(TypeError, match="spec must be an OperandSpec, got GradSpec .*use quantize_gradient"):
        quantize_forward(torch.randn(3, 4), GradSpec(8))
    with pytest.raises(TypeError, match="spec must be a GradSpec, got OperandSpec .*use quantize_forward"):
        quantize_gradient(torch.randn(3, 4), OperandSpec(8), None)
    assert quantize_forward(torch.randn(3, 4), OperandSpec(8, "row")).scale.shape == (3, 1)
    with pytest.raises(TypeError, match="the operand must be a torch.Tensor, got list"):
        quantize_forward([[1.0, 2.0]], OperandSpec(8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_double_backward_is_refused_where_terms_would_be_missing(kind: str, backend: str) -> None:
    """``create_graph=True`` (a gradient penalty): with quantized gradients the first
    backward's GEMMs multiply stochastically rounded codes, which have no derivative, so
    the penalty's gradient would silently be missing (the int8 path) or flow through the
    scales only (the reference path): a clear error on every backend instead. Under QAT
    the backward multiplies the forward's saved codes (no autograd history): the
    penalty's ∂/∂W came out 47–49% off the float module's, so it is refused too."""
    for recipe in ("fqt-psq-8", "qat-8"):
        layer, x = make(kind, backend, recipe)
        y = layer(x).square().sum()
        want = r"double backward \(create_graph=True\).*" + ("under QAT " if recipe == "qat-8" else "")
        with pytest.raises(RuntimeError, match=want + "is not defined"):
            torch.autograd.grad(y, x, create_graph=True)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradient_only_double_backward_gives_the_jacobian_transpose(kind: str) -> None:
    """Inside ``gradient_only_double_backward`` a QAT layer's first backward is
    differentiated with respect to its incoming gradient (``lowbit.analysis``'s ``Jᵀu``):
    exact, since the backward is linear in it — ``⟨∂⟨J·v, u⟩/∂v, w⟩ = ⟨J·w, u⟩`` for any
    ``w`` (float rounding: the two sides sum in other orders). Fault-free with quantized
    gradients: still refused there."""
    from lowbit.ops import gradient_only_double_backward
    layer, x = make(kind, "auto", "qat-8")
    y = layer(x)
    g = torch.Generator().manual_seed(1)
    v, w = (torch.randn(y.shape, generator=g).requires_grad_(i == 0) for i in range(2))
    u = torch.randn(x.shape, generator=g)
    with gradient_only_double_backward():
        (jv,) = torch.autograd.grad(y, x, v, create_graph=True, retain_graph=True)
        (h,) = torch.autograd.grad((jv * u).sum(), v)
    (jw,) = torch.autograd.grad(y, x, w)
    torch.testing.assert_close((h * w).sum(), (jw * u).sum(), rtol=1e-5, atol=0)
    layer, x = make(kind, "auto", "fqt-psq-8")
    y = layer(x)
    with gradient_only_double_backward(), pytest.raises(RuntimeError, match="stochastically rounded"):
        torch.autograd.grad(y, x, torch.ones_like(y), create_graph=True)


@pytest.mark.parametrize("fn", ["linear", "conv2d", "attention"])
def test_functional_calls_with_a_seeded_config_draw_new_noise_each_call(fn: str) -> None:
    """A bare seeded ``FQTConfig`` as ``state`` (the README's functional use): each call
    draws new rounding noise (it once reused the same noise on every call, so rounding
    errors never averaged out over steps), and the same call of a rerun (its index in
    the process) draws the same noise again."""
    from lowbit import functional as lf
    cfg = FQTConfig.from_recipe("fqt-psq-4", seed=0)
    g = torch.Generator().manual_seed(0)
    if fn == "linear":
        args = (torch.randn(8, 6, generator=g), torch.randn(5, 6, generator=g), None)
        call = lf.fqt_linear
    elif fn == "conv2d":
        args = (torch.randn(2, 3, 6, 6, generator=g), torch.randn(4, 3, 3, 3, generator=g), None)
        call = lf.fqt_conv2d
    else:
        args = tuple(torch.randn(2, 2, 5, 4, generator=g) for _ in range(3))
        call = lf.scaled_dot_product_attention

    def grad_of_first(start: int) -> torch.Tensor:
        lf._CALLS = __import__("itertools").count(start)  # the process's start-th such call
        a = [t.clone().requires_grad_() for t in args if t is not None]
        y = call(*a, None, state=cfg) if fn != "attention" else call(*a, state=cfg)
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)))  # off the grid
        return a[0].grad

    first, second = grad_of_first(0), grad_of_first(1)
    assert not torch.equal(first, second)  # a new stream per call
    assert torch.equal(first, grad_of_first(0))  # the same call index: the same noise
    a = [t.clone().requires_grad_() for t in args if t is not None]
    y1 = call(*a, None, state=cfg) if fn != "attention" else call(*a, state=cfg)
    y2 = call(*a, None, state=cfg) if fn != "attention" else call(*a, state=cfg)
    gy = torch.randn(y1.shape, generator=torch.Generator().manual_seed(3))  # off the grid
    g1, = torch.autograd.grad(y1, a[0], gy)
    g2, = torch.autograd.grad(y2, a[0], gy)
    assert not torch.equal(g1, g2)  # two calls in one program: two streams


def test_wrong_argument_types_get_a_type_error_naming_them() -> None:
    """``from_float`` on another module type, and a non-tensor input, raised
    ``AttributeError`` from deep inside; now ``TypeError`` naming what was expected."""
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=0)
    with pytest.raises(TypeError, match="FQTLinear.from_float expects a Linear module, got Conv2d"):
        lowbit.FQTLinear.from_float(nn.Conv2d(3, 3, 1), cfg)
    with pytest.raises(TypeError, match="FQTConv1d.from_float expects a Conv1d module, got Conv2d"):
        lowbit.FQTConv1d.from_float(nn.Conv2d(3, 3, 1), cfg)
    with pytest.raises(TypeError, match="fqt_linear: input must be a Tensor, not list"):
        lowbit.convert(nn.Linear(4, 4), cfg)([1.0, 2.0, 3.0, 4.0])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int32])
def test_complex_and_integer_operands_are_refused_not_truncated(dtype: torch.dtype) -> None:
    """A complex input to ``fqt_linear``/``fqt_conv2d``/``fqt_conv1d`` (and a converted
    complex ``nn.Linear``) ran, keeping only the real part; now every entry point raises
    ``TypeError`` naming the argument and dtype, attention as torch's does, and
    ``convert`` leaves a complex layer float with the reason."""
    from lowbit import fqt_conv1d
    from lowbit.functional import fqt_conv2d, fqt_linear
    from lowbit.functional import scaled_dot_product_attention as sdpa
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=0)
    x, w = torch.ones(4, 8).to(dtype), torch.ones(3, 8).to(dtype)
    with pytest.raises(TypeError, match=rf"fqt_linear: input has dtype {dtype}"):
        fqt_linear(x, w, None, cfg)
    with pytest.raises(TypeError, match=rf"fqt_linear: weight has dtype {dtype}"):
        fqt_linear(torch.ones(4, 8), w, None, cfg)
    with pytest.raises(TypeError, match=rf"fqt_linear: bias has dtype {dtype}"):
        fqt_linear(torch.ones(4, 8), torch.ones(3, 8), torch.ones(3).to(dtype), cfg)
    with pytest.raises(TypeError, match=rf"fqt_conv2d: input has dtype {dtype}"):
        fqt_conv2d(torch.ones(1, 2, 5, 5).to(dtype), torch.ones(3, 2, 3, 3).to(dtype), None, cfg)
    with pytest.raises(TypeError, match=rf"fqt_conv1d: input has dtype {dtype}"):
        fqt_conv1d(torch.ones(1, 2, 5).to(dtype), torch.ones(3, 2, 3).to(dtype), None, cfg)
    with pytest.raises(TypeError, match=rf"query must be a floating tensor .*got {dtype}"):
        sdpa(*(torch.ones(1, 2, 4, 8).to(dtype) for _ in range(3)), state=cfg)
    if dtype.is_complex:  # nn.Linear has no integer parameters
        with pytest.warns(lowbit.ConversionWarning):
            m, rep = lowbit.convert(nn.Linear(8, 3).to(dtype), cfg, report=True)
        assert type(m) is nn.Linear and rep.converted == ()
        assert f"has dtype {dtype}" in rep.skipped[""]


@pytest.mark.parametrize("kind", LAYERS)
def test_meta_device_layers_give_shapes_as_the_float_module(kind: str) -> None:
    """On ``meta`` (shape inference, deferred init) a converted layer gives the float
    module's output shape and dtype, and its backward runs, as ``nn.Linear``/``nn.Conv2d``
    do (it raised an autocast error)."""
    m, x = make(kind)
    m, x = m.to("meta"), x.detach().to("meta").requires_grad_()
    y, want = m(x), float_forward(kind)(m, x)
    assert y.device.type == "meta" and y.shape == want.shape and y.dtype == want.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and m.weight.grad.shape == m.weight.shape


def test_convert_lists_gemm_layers_it_has_no_layer_for() -> None:
    """``Conv3d``, ``ConvTranspose2d``, ``LSTM``, ``Bilinear`` stay float: the report said
    "converted 0 layers, skipped 0" and nothing warned; now each is skipped with the reason."""
    model = nn.Sequential(nn.Conv3d(2, 2, 1), nn.ConvTranspose2d(2, 2, 1), nn.LSTM(4, 4), nn.Bilinear(3, 3, 2),
                          nn.Linear(4, 4))
    with pytest.warns(lowbit.ConversionWarning, match="left 4 layer"):
        _, rep = lowbit.convert(model, FQTConfig.from_recipe("fqt-psq-8", seed=0), report=True)
    assert rep.converted == ("4",) and sorted(rep.skipped) == ["0", "1", "2", "3"]
    assert "LSTM has no lowbit layer" in rep.skipped["2"]


def test_convert_still_converts_the_children_of_a_layer_it_has_no_layer_for() -> None:
    """A subclass of ``nn.LSTM`` holding an ``nn.Linear``: the LSTM is listed as skipped,
    its Linear child is converted as anywhere else."""
    class ProjectedLSTM(nn.LSTM):
        def __init__(self) -> None:
            super().__init__(8, 8)
            self.head = nn.Linear(8, 4)

    with pytest.warns(lowbit.ConversionWarning, match="ProjectedLSTM has no lowbit layer"):
        model, rep = lowbit.convert(nn.Sequential(ProjectedLSTM()), FQTConfig.from_recipe("fqt-psq-8", seed=0),
                                    report=True)
    assert isinstance(model[0].head, lowbit.FQTLinear) and rep.converted == ("0.head",)


@pytest.mark.parametrize("where", ["inference_mode", "meta_device", "fake_mode"])
def test_a_state_made_inside_a_mode_trains_as_any(where: str) -> None:
    """A block's state reaches the ops as a tensor (``BlockState.ident``), made whenever a
    state is built, copied or given new forward formats — whatever the caller is inside
    then. A review: made under ``torch.inference_mode`` (an evaluation with a temporary
    config) it was an inference tensor, and every later training step failed to save it;
    converted under ``torch.device("meta")`` (meta initialisation, then ``to_empty``) it
    was a meta tensor the first forward could not read; under a fake mode it would be a
    fake one. It is a plain CPU tensor now."""
    import copy
    import dataclasses

    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowbit import OperandSpec
    from lowbit.analysis import with_config

    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=0)
    x = torch.randn(4, 8)

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))

    if where == "inference_mode":
        m = lowbit.convert(mlp(), cfg)
        with torch.inference_mode(), with_config(m, lambda c: dataclasses.replace(c, activation=OperandSpec(4))):
            m(x)  # new forward formats: the states registered again inside the mode
        with torch.inference_mode():
            m = copy.deepcopy(m)
    elif where == "meta_device":
        with torch.device("meta"):
            m = lowbit.convert(mlp(), cfg)
        m = m.to_empty(device="cpu")
        with torch.no_grad():
            for p in m.parameters():
                p.normal_()
    else:  # a real model converted while a fake mode is on (a tracer's): its parameters stay real
        m = mlp()
        with FakeTensorMode(allow_non_fake_inputs=True):
            m = lowbit.convert(m, cfg)
    for layer in (m[0], m[2]):
        assert type(layer._block.ident) is torch.Tensor and layer._block.ident.device.type == "cpu"
        assert not layer._block.ident.is_inference()
    m(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_functional_call_under_checkpointing_recomputes_its_forward_noise() -> None:
    """A bare seeded config with a stochastically rounded forward, under activation
    checkpointing: the recompute must quantize X with the forward's noise (a stream named
    by a call counter gave it a new one, so ∇W paired codes that did not make Y)."""
    import dataclasses

    from torch.utils.checkpoint import checkpoint

    from lowbit.formats import Rounding
    from lowbit.functional import fqt_linear
    base = FQTConfig.from_recipe("fqt-psq-4", seed=0)
    cfg = dataclasses.replace(base, activation=dataclasses.replace(base.activation, rounding=Rounding.STOCHASTIC))
    w0 = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    grads = []
    for ck in (False, True):
        torch.manual_seed(0)
        x, w = torch.randn(4, 6).requires_grad_(), w0.clone().requires_grad_()
        y = checkpoint(lambda x, w=w: fqt_linear(x, w, None, cfg), x, use_reentrant=False) if ck else \
            fqt_linear(x, w, None, cfg)
        y.backward(torch.randn(4, 5, generator=torch.Generator().manual_seed(1)))
        grads.append((x.grad, w.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("recipe", ["fqt-psq-8", "qat-8"])
def test_forward_mode_ad_and_vmap_are_refused_not_silently_wrong(recipe: str) -> None:
    # torch.func.jvp/jacfwd through a converted layer returned zero tangents without a word,
    # and vmap ran a per-sample fallback (other scales than the batched call): a review
    from lowbit.functional import scaled_dot_product_attention
    torch.manual_seed(0)
    cfg = lowbit.FQTConfig.from_recipe(recipe)
    lin = lowbit.convert(nn.Sequential(nn.Linear(4, 3)), cfg)
    conv = lowbit.convert(nn.Sequential(nn.Conv2d(2, 3, 3)), cfg)
    x, img = torch.randn(5, 4), torch.randn(2, 2, 6, 6)
    for f, a in ((lin, x), (conv, img)):
        with pytest.raises(RuntimeError, match=r"jvp/jacfwd \(forward-mode AD\) through a lowbit"):
            torch.func.jvp(f, (a,), (torch.ones_like(a),))
        with pytest.raises(RuntimeError, match=r"jvp/jacfwd"):
            torch.func.jacfwd(f)(a)
        with pytest.raises(RuntimeError, match=r"torch.func.vmap through a lowbit.*ordinary autograd"):
            torch.func.vmap(f)(a.unsqueeze(1))
        with torch.no_grad(), pytest.raises(RuntimeError, match=r"vmap .*call the layer on the batched input"):
            torch.func.vmap(f)(a.unsqueeze(1))  # batched inference: autograd is not the advice (a trial)
    q = torch.randn(1, 2, 8, 4)
    if recipe.startswith("fqt"):
        with pytest.raises(RuntimeError, match=r"lowbit attention: torch.func.jvp"):
            torch.func.jvp(lambda t: scaled_dot_product_attention(t, t, t, state=cfg), (q,), (q,))
    assert lin(x).shape == (5, 3)  # ordinary calls unaffected


def test_a_traced_graph_from_another_process_names_its_problem() -> None:
    # a jit.trace / torch.export saved in one process named its layers' states by number,
    # which in a loading process is another layer's: it ran with that layer's recipe and
    # noise (a review: max error 0.23); idents now carry the process's mark
    from lowbit import ops
    lin = lowbit.convert(nn.Sequential(nn.Linear(4, 3)), FQTConfig.from_recipe("fqt-psq-8"))
    ident = lin[0]._block.ident
    assert int(ident[1]) == ops._PROCESS_NUMBER and ops._state_of(ident) is lin[0]._block
    other = ident.clone()
    other[1] = 0 if ops._PROCESS_NUMBER != 0 else 1
    with pytest.raises(RuntimeError, match="belongs to another process"):
        ops._state_of(other)


def test_a_state_freed_before_its_backward_is_named_as_such() -> None:
    from lowbit import ops
    from lowbit.functional import block_state
    state = block_state(FQTConfig.from_recipe("fqt-psq-8"))
    ident = state.ident.clone()
    assert ops._state_of(ident) is state
    del state
    gc.collect()
    with pytest.raises(RuntimeError, match="no longer exists"):
        ops._state_of(ident)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels-last"])
def test_a_jit_trace_of_converted_convolutions_runs_as_the_model(channels_last: bool) -> None:
    """A review: ``torch.jit.trace`` of a model with a converted ``Conv2d`` failed
    ("Expected bool, got Tensor": the layout check read traced sizes), while the README
    said a trace runs. The traced model's output and gradients are the eager model's
    (a second model, converted with the same seed: the same noise)."""
    def make() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3))
        return lowbit.convert(m, FQTConfig.from_recipe("fqt-psq-8", seed=5))

    x = torch.randn(2, 3, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    eager, traced_from = make(), make()
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(traced_from, (x,), check_trace=False)
    grads = []
    for m, model in ((eager, eager), (traced, traced_from)):
        xi = x.clone().requires_grad_(True)
        out = m(xi)
        out.square().sum().backward()
        grads.append([out.detach(), xi.grad, *(p.grad for p in model.parameters())])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_a_jit_trace_through_lowbit_attention_is_refused_with_the_way_out() -> None:
    """A review: ``torch.jit.trace`` of a converted ``nn.MultiheadAttention`` failed inside
    torch's JIT ("INTERNAL ASSERT FAILED ... aten::view"), and a trace would have recorded
    the attention's forward operations without its backward. It is refused by name;
    ``torch.export`` runs it as the model does (without gradients)."""
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return self.attn(q, q, q, need_weights=False)[0]

    torch.manual_seed(0)
    m = lowbit.convert(Block(), FQTConfig.from_recipe("fqt-psq-8", seed=1)).eval()
    x = torch.randn(2, 5, 16)
    with pytest.raises(RuntimeError, match=r"lowbit attention: torch.jit.trace would record .* use torch.export"):
        torch.jit.trace(m, (x,), check_trace=False)
    from lowbit.kernels import softmax
    exported = torch.export.export(m, (x,)).module()  # its graph: the reference softmax
    softmax.set_enabled(False)  # the native one is within a tolerance of it, not bitwise
    try:
        with torch.no_grad():
            assert torch.equal(exported(x), m(x))
            # with a mask and the weights (MHA's default): its dead-row check read values,
            # and export stopped on the data-dependent branch (a review)
            mask = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -math.inf)
            weighted = lowbit.convert(nn.Sequential(nn.MultiheadAttention(16, 2, batch_first=True)),
                                      FQTConfig.from_recipe("fqt-psq-8", seed=1))[0].eval()

            class Weighted(nn.Module):
                def forward(self, q: torch.Tensor) -> torch.Tensor:
                    return weighted(q, q, q, attn_mask=mask, need_weights=True)[1]

            got = torch.export.export(Weighted(), (x,)).module()(x)
            assert torch.equal(got, weighted(x, x, x, attn_mask=mask, need_weights=True)[1])
    finally:
        softmax.set_enabled(True)


@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_layers_take_their_input_by_torchs_keyword_name(kind: str) -> None:
    """A review: ``nn.Linear``/``nn.Conv*d`` are called ``layer(input=x)`` in some models;
    the converted layers named the argument ``x`` and raised TypeError after convert."""
    torch.manual_seed(0)
    plain, x = {"linear": (nn.Linear(8, 6), torch.randn(4, 8)),
                "conv": (nn.Conv2d(3, 4, 3, padding=1), torch.randn(2, 3, 5, 5)),
                "conv1d": (nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect"), torch.randn(2, 3, 9))}[kind]
    assert torch.equal(plain(input=x), plain(x))
    m = lowbit.convert(plain, FQTConfig.from_recipe("fqt-psq-8", seed=1))
    assert torch.equal(m(input=x), m(x))


@pytest.mark.parametrize("recipe", ["fqt-psq-8", "qat-8"])
def test_nested_and_sparse_inputs_are_refused_by_name(recipe: str) -> None:
    """A review: a nested tensor reached a reshape inside ``fqt_linear`` ("view(): cannot
    view shape (2, j1, 4)", or torch's "Internal error ... please file an issue"). Layers
    and the attention function name the problem instead."""
    lin = lowbit.convert(nn.Linear(4, 3), FQTConfig.from_recipe(recipe, seed=0))
    parts = [torch.randn(2, 4), torch.randn(3, 4)]
    for nested in (torch.nested.nested_tensor(parts, layout=torch.jagged), torch.nested.nested_tensor(parts)):
        with pytest.raises(RuntimeError, match="input is a nested tensor"):
            lin(nested)
    with pytest.raises(RuntimeError, match="input is a torch.sparse_coo tensor"):
        lin(torch.randn(3, 4).to_sparse())
    for conv, x in ((nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), torch.randn(1, 3, 5, 5)),
                    (nn.Conv1d(3, 4, 3, padding="same", padding_mode="circular"), torch.randn(1, 3, 7))):
        conv = lowbit.convert(conv, FQTConfig.from_recipe(recipe, seed=0))  # pads before its GEMMs
        with pytest.raises(RuntimeError, match="input is a torch.sparse_coo tensor.*to_dense"):
            conv(x.to_sparse())
    q = torch.nested.nested_tensor([torch.randn(2, 5, 8), torch.randn(2, 3, 8)], layout=torch.jagged)
    with pytest.raises(RuntimeError, match="query is a nested tensor"):
        lowbit.functional.scaled_dot_product_attention(q, q, q, state=FQTConfig.from_recipe(recipe, seed=0))


def test_a_weight_left_on_meta_is_refused_not_read_as_memory() -> None:
    """A review: a converted layer whose weight was never loaded off ``meta`` (a
    ``load_state_dict(strict=False, assign=True)`` without the head, a forgotten
    ``to_empty``) returned uninitialised CPU memory (NaN, 1e15) where ``nn.Linear`` raises:
    the dispatcher took the op's fake kernel for the meta operand. Layers and lowbit
    attention now refuse operands on more than one device; an all-meta call still gives
    the shapes."""
    from lowbit.functional import scaled_dot_product_attention
    cfg = FQTConfig.from_recipe("fqt-psq-4", seed=1)
    with torch.device("meta"):
        layers = {"linear": (nn.Linear(8, 4), (2, 8)), "conv": (nn.Conv2d(3, 4, 3), (2, 3, 8, 8)),
                  "conv1d": (nn.Conv1d(3, 4, 3), (2, 3, 9))}
        mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    lowbit.convert(mha, cfg)
    for name, (layer, shape) in layers.items():
        layer = lowbit.convert(layer, cfg)
        for grad in (False, True):
            with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match=r"on one device, got cpu, meta"):
                layer(torch.randn(shape))
        assert layer(torch.randn(shape, device="meta")).device.type == "meta", name
    q = torch.randn(4, 2, 8)
    with pytest.raises(RuntimeError, match="on one device, got cpu, meta"):
        mha[0](q, q, q)
    q4 = torch.randn(1, 2, 3, 8)
    for k, mask in ((q4.to("meta"), None), (q4, torch.zeros(3, 3, device="meta"))):
        with pytest.raises(RuntimeError, match=r"expected query, key, value \(and attn_mask\) on one device"):
            scaled_dot_product_attention(q4, k, q4, attn_mask=mask, state=cfg)
    # all on meta: the shapes (a second review: attention raised in torch's autocast query)
    qm = q4.to("meta")
    assert scaled_dot_product_attention(qm, qm, qm, state=cfg).shape == (1, 2, 3, 8)
    with torch.device("meta"):
        enc = lowbit.convert(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), cfg)
    assert enc(torch.randn(2, 5, 16, device="meta")).shape == (2, 5, 16)
    q = torch.randn(4, 2, 8, device="meta")
    attn = lowbit.convert(nn.Sequential(nn.MultiheadAttention(8, 2, device="meta")), cfg)[0]
    out, weights = attn(q, q, q)
    assert out.shape == (4, 2, 8) and weights.shape == (2, 4, 4) and out.device.type == "meta"
    out.sum().backward()  # a third review: empty outputs had no history, the weights no gradient
    assert attn.in_proj_weight.grad.shape == (24, 8)
    for masks in ({"attn_mask": torch.zeros(4, 4, device="meta")},  # a fourth: its dead-row check read values
                  {"key_padding_mask": torch.zeros(2, 4, dtype=torch.bool, device="meta")}):
        out, weights = attn(q, q, q, **masks)
        assert out.shape == (4, 2, 8) and weights.shape == (2, 4, 4)
    with pytest.raises(RuntimeError, match="cannot be broadcast"):  # nor was the mask's shape checked
        scaled_dot_product_attention(qm, qm, qm, torch.zeros(7, 9, device="meta"), state=cfg)


def test_fullgraph_compilation_through_lowbit_attention_names_the_way() -> None:
    """A review: ``torch.compile(fullgraph=True)`` of a model with lowbit attention
    stopped at its eager island with torch's hint alone — "Remove the
    ``torch.compiler.disable`` call", in lowbit's source. The reason now says what runs
    eagerly and to compile without ``fullgraph``. In a process of its own: after that
    failed compile torch 2.13 holds one more reference to every tensor a later Python
    frame makes (not seen by ``gc``; no such residue after a compile without
    ``fullgraph``), so ``lowbit.kernels.workspace`` reuses nothing more in that process
    (safe, slower) — and ``tests/core/test_workspace.py`` failed when it ran after this
    test in the same worker."""
    import subprocess
    import sys

    code = (
        "import torch, lowbit\n"
        "from torch import nn\n"
        "class Attend(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.attn = lowbit.ScaledDotProductAttention()\n"
        "    def forward(self, q):\n"
        "        return self.attn(q, q, q)\n"
        "m = lowbit.convert(Attend(), lowbit.FQTConfig.from_recipe('fqt-psq-8', seed=1))\n"
        "try:\n"
        "    torch.compile(m, backend='eager', fullgraph=True)(torch.randn(1, 2, 4, 8))\n"
        "except Exception as e:\n"
        "    print('RAISED', type(e).__name__, str(e).replace(chr(10), ' '))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"RAISED .*_run_attention runs eagerly between compiled graphs.*compile without "
                     r"fullgraph=True", out.stdout), out.stdout[-2000:]


def _backward_gemms(fn) -> int:  # noqa: ANN001
    """How many GEMM ops ``fn`` (a backward) ran, by torch's profiler (each GEMM the same
    count of events on a machine, so ratios compare). The ops are those lowbit counts FLOPs
    of (:data:`lowbit.flops.FORMULAS`), as ``bench_step.py`` does: a fixed list of names
    missed the AMX kernel's ``lowbit::int8_bmm`` (0 GEMMs counted on an AMX CPU)."""
    from torch.profiler import ProfilerActivity, profile
    from lowbit.flops import FORMULAS
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    gemms = {op._qualified_op_name for op in FORMULAS}
    return sum(e.name in gemms for e in prof.events())


@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fqt-bhq-8"])
def test_gradients_the_backward_does_not_ask_for_are_not_computed(recipe: str) -> None:
    """A new user's trial (README fault kind 246): ``loss.backward(inputs=[x])`` and
    ``torch.autograd.grad(loss, x)`` (adversarial examples, saliency, a GAN's generator
    step) quantized and multiplied every ∇W, which autograd then dropped — the GEMMs of a
    full backward. Only the asked-for gradients run now, bitwise those of a full backward
    on the same noise; frozen weights aside, as torch's own layers do."""
    import copy
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    x0, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def run(how: str) -> tuple:
        m = lowbit.convert(copy.deepcopy(base), lowbit.FQTConfig.from_recipe(recipe, seed=3))
        x = x0.clone().requires_grad_(True)
        loss = F.cross_entropy(m(x), y)
        if how == "grad":
            n = _backward_gemms(lambda: x.__setattr__("grad", torch.autograd.grad(loss, x)[0]))
        else:
            inputs = {"all": None, "x": [x], "w0": [m[0].weight]}[how]
            n = _backward_gemms(lambda: loss.backward(inputs=inputs))
        return n, x.grad, [p.grad for p in m.parameters()]

    n_all, gx, grads = run("all")
    for how in ("x", "grad"):
        n, gx_only, only = run(how)
        assert 2 * n == n_all, (how, n, n_all)  # the three ∇X GEMMs of six
        assert torch.equal(gx_only, gx) and all(g is None for g in only), how
    n, gx_w, only = run("w0")  # layer 0's ∇W needs the ∇X of layers 2 and 1, not layer 0's own
    assert 2 * n == n_all and gx_w is None
    assert torch.equal(only[0], grads[0]) and all(g is None for g in only[1:])


def test_a_gradient_not_computed_records_no_predicted_range() -> None:
    """A review of fault kind 246: a path whose gradient the backward did not ask for
    records no range in its predicted-range tracker (as a frozen weight's path records
    none), so the next full step predicts from the ranges of the gradients that ran; the
    asked-for ∇X paths record theirs."""
    from lowbit.nn import range_stats
    m = lowbit.convert(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)),
                       lowbit.FQTConfig.from_recipe("fqt-psq-4-predicted", seed=3))
    x = torch.randn(8, 16, requires_grad=True)
    F.cross_entropy(m(x), torch.randint(0, 4, (8,))).backward(inputs=[x])
    stats = range_stats(m)
    assert stats["0/grad_input"].calls == stats["2/grad_input"].calls == 1
    assert stats["0/grad_weight"].calls == stats["2/grad_weight"].calls == 0
    F.cross_entropy(m(x), torch.randint(0, 4, (8,))).backward()
    assert range_stats(m)["2/grad_weight"].calls == 1


def test_attention_computes_only_the_gradients_asked_for() -> None:
    """The same (fault kind 246) for lowbit's attention: ``backward(inputs=[v])`` ran ∇Q's
    and ∇K's GEMMs too; now ∇V's alone, bitwise a full backward's."""
    from lowbit.attention import scaled_dot_product_attention as sdpa
    from lowbit.functional import call_count, set_call_count
    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(2, 2, 128, 64, generator=g) for _ in range(3))
    cfg = lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=1)

    def run(only_v: bool) -> tuple:
        set_call_count(0)  # the same call's noise (each functional call draws its own)
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        out = sdpa(q, k, v, is_causal=True, state=cfg)
        n = _backward_gemms(lambda: out.square().sum().backward(inputs=[v] if only_v else None))
        return n, q.grad, k.grad, v.grad

    before = call_count()
    try:
        n_all, gq, gk, gv = run(False)
        n_v, gq_v, gk_v, gv_v = run(True)
    finally:
        set_call_count(before)
    assert n_v < n_all and gq_v is None and gk_v is None and torch.equal(gv_v, gv)


@pytest.mark.parametrize("case", ["grad_weight", "grad_input", "forward", "float64 grad_weight"])
def test_asymmetric_grids_stay_finite_where_the_simulated_gemm_does(case: str) -> None:
    """A new user's trial (README fault kind 268): an asymmetric grid's epilogue adds
    rank-1 offset terms (``m_a·Σr·s_b``, ``Σc·s_a·m_b``, ``k·m_a·m_b``) whose float32
    intermediates passed float32's maximum where the product does not — ``fqt-psq-4a``
    activations of 2e35 over 4,096 tokens gave ∇W all NaN on the integer path, finite
    (2.4e34) on the reference; the same for ∇X (a weight of 3e38), an ``int8a`` forward
    (inputs of 1e37) and a float64 layer's ∇W (inputs of 1.6e308). The epilogue now runs
    in float64 where those bounds pass float32's range, and scaled by powers of two where
    they pass float64's: the integer path equals the reference within float32 rounding
    (4e-7 of the largest value measured; 1e-5 allowed), every value finite as there."""
    dt = torch.float64 if case.startswith("float64") else torch.float32
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g, dtype=dt) * 0.1
    recipe, over = "fqt-psq-4a", {}
    if case == "grad_input":
        w = torch.rand(32, 64, generator=g, dtype=dt) * 3e38
        x, gy = torch.rand(32, 64, generator=g, dtype=dt), torch.randn(32, 32, generator=g, dtype=dt) * 1e-3
    elif case == "forward":
        w = torch.rand(32, 64, generator=g, dtype=dt) * 1e-3
        x, gy = 1e37 + torch.rand(16, 64, generator=g, dtype=dt) * 2e37, torch.randn(16, 32, generator=g, dtype=dt)
        recipe, over = "fqt-psq-8", {"activation": lowbit.OperandSpec(format="int8a"),
                                     "weight": lowbit.OperandSpec(format="int8a")}
    else:
        x = torch.rand(4096, 64, generator=g, dtype=dt) * (1.6e308 if dt == torch.float64 else 2e35)
        gy = torch.randn(4096, 32, generator=g, dtype=dt) * 1e-3
    got = {}
    for backend in ("auto", "reference"):
        layer = lowbit.convert(nn.Linear(64, 32, bias=False).to(dt),
                               lowbit.FQTConfig.from_recipe(recipe, backend=backend, seed=0, **over))
        with torch.no_grad():
            layer.weight.copy_(w)
        xx = x.clone().requires_grad_()
        y = layer(xx)
        y.backward(gy)
        got[backend] = {"forward": y.detach(), "grad_input": xx.grad, "grad_weight": layer.weight.grad}
    name = case.split()[-1]
    a, r = got["auto"][name], got["reference"][name]
    assert torch.isfinite(r).all() and torch.isfinite(a).all()
    assert float((a - r).abs().max()) <= 1e-5 * float(r.abs().max())


def test_asymmetric_epilogue_leaves_float32_where_no_intermediate_can_overflow() -> None:
    """A review of row 268's first bound: the product of the two sides' largest factors
    sat k·2⁷ above any real term, so GEMMs far from overflow (activations of 1e31) moved
    to float64 and changed bits. Each term is bounded on its own now: float32 stays where
    every intermediate fits, float64 comes where one may not."""
    from lowbit.kernels import int8
    k = 4096  # ∇W = ∇Yᵀ·X over 4,096 tokens: ∇Yᵀ on an asymmetric grid (fqt-psq-4a), X symmetric
    gy_step, gy_offset = torch.tensor([[2e-3 / 255]]), torch.tensor([[-1e-3]])
    for x_max, widened in ((1e31, False), (1e33, False), (1e34, False), (2e35, True)):
        x_step = torch.tensor([[x_max / 127]])  # its Σ_k r·s_b reaches k·2⁷·s_b ≈ k·x_max
        got = int8._offsets_safe(gy_step, x_step, gy_offset, None, k)
        assert got is not None and (got[0].dtype == torch.float64) is widened, x_max
