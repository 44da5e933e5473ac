"""A user's own gradient quantizer: registered, used by recipes, and run as written
(README "Your own quantizer"; fault kind 262)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import GradSpec
from lowbit.monitor import VarianceMonitor
from lowbit.quantizers import (QUANTIZERS, PSQ, GradQuantizer, Granularity, Identity, RowTransform,
                               register_quantizer)


@pytest.fixture(autouse=True)
def _registry():  # noqa: ANN202
    """Each test's registrations undone."""
    saved = dict(QUANTIZERS)
    yield
    QUANTIZERS.clear()
    QUANTIZERS.update(saved)


class Halve(Identity):
    """``T = ½·I``: exact in float, so its quantizer's codes and gradients are PSQ's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 0.5

    def inverse(self, y: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> torch.Tensor:
        return (y * 2).to(out_dtype)

    def inverse_sq(self, v: torch.Tensor) -> torch.Tensor:
        return v * 4


class HalveQ(GradQuantizer):
    name = "halve"
    granularity = Granularity.ROW

    def transform(self, a, generator, kernels=None):  # noqa: ANN001, ANN201
        return Halve(a.shape[0])


def _grads(quantizer: str, backend: str, granularity_of: str | None = None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 10))
    spec = GradSpec(quantizer=quantizer, bits=4)
    cfg = lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=7, backend=backend, grad_input=spec, grad_weight=spec)
    model = lowbit.convert(model, cfg)
    x = torch.randn(64, 48, requires_grad=True)
    model(x).square().mean().backward()
    return [x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_an_identity_subclass_is_a_transform_like_any_other(backend: str) -> None:
    """A new user's trial: a quantizer whose transform subclasses ``Identity`` with
    ``T = ½·I`` had its ``forward`` applied and its ``inverse`` skipped (lowbit took any
    ``Identity`` for no transform): every gradient halved, ``E[Q(g)] = ½·g``. ``T`` and
    ``T⁻¹`` are exact here, so the gradients are PSQ's, bit for bit, and one quantization
    dequantizes to PSQ's."""
    register_quantizer(HalveQ())
    for got, want in zip(_grads("halve", backend), _grads("psq", backend), strict=True):
        assert torch.equal(got, want)
    g = torch.randn(6, 10)
    ours = QUANTIZERS["halve"].quantize(g, 4, torch.Generator().manual_seed(3), backend=backend).dequantize()
    psq = QUANTIZERS["psq"].quantize(g, 4, torch.Generator().manual_seed(3), backend=backend).dequantize()
    assert torch.equal(ours, psq)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_granularity_name_is_the_granularity(backend: str) -> None:
    """A new user's trial: ``granularity = "row"`` on a subclass ran per row on the
    reference kernels and per tensor on the fused ones, silently, and a misspelt one trained
    per tensor on ``auto``. Now the name is the member (class or instance), and a wrong one
    a ``ValueError`` at the class statement (or the assignment)."""
    class RowPSQ(PSQ):
        name = "rowpsq"
        granularity = "row"

    assert RowPSQ.granularity is Granularity.ROW
    register_quantizer(RowPSQ())
    for got, want in zip(_grads("rowpsq", backend), _grads("psq", backend), strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="granularity must be a lowbit.Granularity or one of 'tensor', 'row', "
                                         "got 'per-channel'"):
        class Typo(PSQ):  # noqa: F841
            granularity = "per-channel"
    q = PSQ()
    q.granularity = "tensor"
    assert q.granularity is Granularity.TENSOR
    with pytest.raises(ValueError, match="granularity must be"):
        q.granularity = "rows"


def test_register_quantizer_checks_what_it_is_given() -> None:
    """The documented way in (it was ``QUANTIZERS[name] = …``, found in the tests only):
    a class instead of an instance, no name, no granularity, a built-in's name or a
    registered one are refused with the fix; a registered name is a recipe's quantizer."""
    with pytest.raises(TypeError, match=r"got the class HalveQ \(pass an instance: HalveQ\(\)\)"):
        register_quantizer(HalveQ)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a GradQuantizer instance, got str"):
        register_quantizer("halve")  # type: ignore[arg-type]

    class NoName(HalveQ):
        name = ""

    class NoGranularity(GradQuantizer):
        name = "nogran"

        def transform(self, a, generator, kernels=None):  # noqa: ANN001, ANN201
            return Identity(a.shape[0])

    class Shadow(HalveQ):
        name = "psq"

    with pytest.raises(ValueError, match="has no name"):
        register_quantizer(NoName())
    with pytest.raises(ValueError, match="has no granularity"):
        register_quantizer(NoGranularity())
    with pytest.raises(ValueError, match=r"the name 'psq' is taken \(lowbit\)"):
        register_quantizer(Shadow())
    with pytest.raises(ValueError, match=r"quantizer must be one of .* got 'halve' \(register your own first"):
        GradSpec(quantizer="halve")
    first = register_quantizer(HalveQ())
    assert register_quantizer(first) is first  # the same object again: nothing to replace
    with pytest.raises(ValueError, match="'halve' is taken .*replace=True"):
        register_quantizer(HalveQ())
    second = register_quantizer(HalveQ(), replace=True)
    assert QUANTIZERS["halve"] is second and GradSpec(quantizer="halve").quantizer == "halve"
    assert QUANTIZERS["psq"].name == "psq" and type(QUANTIZERS["psq"]) is PSQ


def test_a_broken_transform_or_quantize_is_named() -> None:
    """A transform that returns a tensor, or a ``quantize`` that returns one, failed deep
    inside lowbit (``'Tensor' object has no attribute 'forward_quantize'`` / ``'codes'``);
    now a ``TypeError`` naming the quantizer and what it must return."""
    class TensorTransform(HalveQ):
        name = "tensor_transform"

        def transform(self, a, generator, kernels=None):  # noqa: ANN001, ANN201
            return a

    class TensorQuantize(PSQ):
        name = "tensor_quantize"

        def quantize(self, a, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
            return a

    register_quantizer(TensorTransform())
    register_quantizer(TensorQuantize())
    with pytest.raises(TypeError, match="'tensor_transform': transform must return a lowbit.quantizers.RowTransform"):
        QUANTIZERS["tensor_transform"].quantize(torch.randn(4, 8), 4)
    for name, match in (("tensor_transform", "transform must return"), ("tensor_quantize", "quantize must return")):
        with pytest.raises(TypeError, match=f"'{name}': {match}"):
            _grads(name, "auto")
    assert issubclass(Halve, RowTransform)


def test_the_monitor_skips_a_quantizer_whose_variance_formula_is_not_what_runs() -> None:
    """A new user's trial: a PSQ subclass whose ``quantize`` always rounds to 2 bits, on an
    8-bit spec: the variance monitor reported PSQ's 8-bit formula (10⁴× too small). A
    subclass that overrides ``quantize`` but inherits ``rounding_variance`` is now listed in
    ``skipped`` with the reason; one that overrides both is monitored."""
    class TwoBits(PSQ):
        name = "two_bits"

        def quantize(self, a, fmt, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
            return super().quantize(a, 2, *args, **kwargs)

    class TwoBitsWithFormula(TwoBits):
        name = "two_bits_formula"

        def rounding_variance(self, a, fmt, generator=None):  # noqa: ANN001, ANN201
            return super().rounding_variance(a, 2, generator)

    register_quantizer(TwoBits())
    register_quantizer(TwoBitsWithFormula())
    for name, monitored in (("two_bits", False), ("two_bits_formula", True), ("psq", True)):
        model = nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 6))
        spec = GradSpec(quantizer=name, bits=8)
        model = lowbit.convert(model, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=1, grad_input=spec,
                                                                    grad_weight=spec))
        if monitored:
            mon = VarianceMonitor(model, every=1)
            assert not mon.skipped and set(mon.layers) == {"0", "2"}
        else:
            with pytest.raises(ValueError, match="'two_bits': TwoBits overrides quantize but inherits GradQuantizer's rounding_variance"):
                VarianceMonitor(model, every=1)  # no layer left to monitor: the reasons in the error


def test_a_bhq_transform_subclass_with_its_own_inverse_runs_it() -> None:
    """A review of the one-pass epilogue and inverse (README fault kind 262): a user's
    ``BlockHouseholder`` subclass with its own ``inverse`` had it skipped on the fused
    kernels (the kernel applied BHQ's), so a transform that scaled its rows got gradients
    4× off. Its ``inverse`` runs on every ∇X product, and a subclass that only wraps
    ``inverse`` gives BHQ's gradients bit for bit."""
    from lowbit.quantizers.bhq import BHQ, BlockHouseholder

    calls = []

    class Counted(BlockHouseholder):
        def inverse(self, y, out_dtype=torch.float32, overwrite=False):  # noqa: ANN001, ANN201
            calls.append(y.shape)
            return super().inverse(y, out_dtype, overwrite)

    class CountedBHQ(BHQ):
        name = "counted_bhq"

        def transform(self, a, generator, kernels=None):  # noqa: ANN001, ANN201
            t = super().transform(a, generator, kernels)
            t.__class__ = Counted
            return t

    register_quantizer(CountedBHQ())
    got = _grads("counted_bhq", "auto")
    assert len(calls) == 4  # both layers, both paths (∇X and ∇W: the spec is on both)
    for a, b in zip(got, _grads("bhq", "auto"), strict=True):
        assert torch.equal(a, b)
