"""FQTConfig: recipes, validation with messages naming field and allowed values."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import lowbit

from lowbit import RECIPES, Backend, FQTConfig, GradSpec, OperandSpec
from lowbit.config import Granularity


def test_all_named_recipes_build() -> None:
    for name in ["fp", "qat-8"] + [f"fqt-{q}-{b}" for q in ("ptq", "psq", "bhq", "hadamard") for b in range(4, 9)]:
        assert name in RECIPES
        FQTConfig.from_recipe(name)


def test_recipe_contents() -> None:
    fp = FQTConfig.from_recipe("fp")
    assert fp.is_fp and not fp.is_fqt
    qat = FQTConfig.from_recipe("qat-8")
    assert qat.weight.bits == 8 and qat.grad_input is None and qat.grad_weight is None
    bhq = FQTConfig.from_recipe("fqt-bhq-4")
    assert (bhq.grad_input.quantizer, bhq.grad_input.bits) == ("bhq", 4)
    assert (bhq.grad_weight.quantizer, bhq.grad_weight.bits) == ("psq", 8)  # per-column ∇W
    ptq = FQTConfig.from_recipe("fqt-ptq-5")
    assert (ptq.grad_weight.quantizer, ptq.grad_weight.bits) == ("ptq", 8)
    assert bhq.weight == OperandSpec(8) and bhq.activation.granularity is Granularity.TENSOR


def test_overrides_and_bits() -> None:
    c = FQTConfig.from_recipe("fqt-psq-8", backend="reference", seed=3)
    assert c.backend is Backend.REFERENCE and c.seed == 3
    c2 = c.with_grad_bits(grad_input=5, grad_weight=6)
    assert (c2.grad_input.bits, c2.grad_weight.bits) == (5, 6)
    assert FQTConfig.from_dict(c2.to_dict()) == c2


def test_to_dict_from_dict_round_trips_every_format() -> None:
    """Every recipe, and block formats no name describes (another block size, another
    name, the spec rule): ``from_dict(to_dict(c)) == c`` through JSON. A custom block format
    used to come back as the named one (block 32) or fail to load."""
    import json

    from lowbit.formats import BlockFormat, ScaleRule

    configs = [FQTConfig.from_recipe(r, seed=0) for r in RECIPES]
    clipping = BlockFormat("nvfp4", "e2m1", 8, "e4m3", ScaleRule.SPEC)  # biased: GradSpec warns
    with pytest.warns(UserWarning, match="clips a block's largest values"):
        configs += [FQTConfig(grad_input=GradSpec(format=f), grad_weight=GradSpec(format=f), seed=1)
                    for f in (BlockFormat("mxfp4", "e2m1", 16, "e8m0"), BlockFormat("mine", "e2m1", 32, "e8m0"),
                              clipping)]
    for c in configs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if c.grad_input is not None and c.grad_input.format is clipping else "error")
            assert FQTConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c, c
    assert FQTConfig.from_recipe("fqt-psq-nvfp4").to_dict()["grad_input"]["format"] == "nvfp4"  # names stay


def test_dicts_saved_by_older_versions_load() -> None:
    """A dynamic-range spec saved with predicted-range settings it never read (the default
    margin was 2.0 before 735fbfe; results/ holds such config.json files) loads, with the
    settings reset to the defaults: the refusal is for what a user passes in."""
    d = FQTConfig.from_recipe("fqt-psq-8", seed=0).to_dict()
    d["grad_input"]["margin"] = d["grad_weight"]["margin"] = 2.0
    d["grad_weight"].update(history=4, overflow="clip")
    assert FQTConfig.from_dict(d) == FQTConfig.from_recipe("fqt-psq-8", seed=0)
    p = FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0).with_ranges(margin=2.0)
    assert FQTConfig.from_dict(p.to_dict()).grad_input.margin == 2.0  # predicted: kept


def test_custom_config_strings_coerced() -> None:
    c = FQTConfig(weight=OperandSpec(6, "row"), activation=OperandSpec(8, "tensor"),
                  grad_input=GradSpec(4, "hadamard", "stochastic"), grad_weight=None, backend="int8")
    assert c.weight.granularity is Granularity.ROW and c.backend is Backend.INT8


@pytest.mark.parametrize("kwargs, match", [
    (dict(grad_input=lambda: GradSpec(4, "foo")), "quantizer must be one of ptq, psq, bhq, hadamard, got 'foo'"),
    (dict(weight=lambda: OperandSpec(9)), r"bits must be in 2..8, got 9"),
    (dict(grad_weight=lambda: GradSpec(1)), r"bits must be in 2..8, got 1"),
    # the field the user gave is named: format=, not bits=
    (dict(weight=lambda: OperandSpec(format=1)), r"^format=1: bits must be in 2..8, got 1"),
    (dict(grad_input=lambda: GradSpec(format="fp4")), r"^format='fp4': unknown format 'fp4'; allowed"),
    # predicted-range settings on a dynamic range would be ignored: refused
    (dict(grad_input=lambda: GradSpec(8, margin=3.0)),
     r"^margin=3.0: predicted-range settings, but this spec's range is dynamic \(give range='predicted'\)"),
    (dict(grad_weight=lambda: GradSpec(8, overflow="clip", history=4)), r"^history=4, overflow='clip': "),
    (dict(backend="gpu"), "backend must be one of 'auto', 'reference', 'int8', 'fp8', got 'gpu'"),
    (dict(weight=lambda: OperandSpec(8, "column")), "granularity must be one of 'tensor', 'row', got 'column'"),
    (dict(weight=None), "weight and activation must both be quantized or both be None"),
    (dict(weight=None, activation=None), "needs a quantized forward"),
])
def test_validation_messages(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        FQTConfig(**{k: v() if callable(v) else v for k, v in kwargs.items()})


def test_unknown_recipe_lists_allowed() -> None:
    with pytest.raises(ValueError, match=r"unknown recipe 'fqt-xyz-4'; allowed: fp, qat-B, fqt-\{ptq,psq,bhq,hadamard\}-B"):
        FQTConfig.from_recipe("fqt-xyz-4")
    with pytest.raises(ValueError, match="unknown recipe 'fqt-psq-3'"):
        FQTConfig.from_recipe("fqt-psq-3")


def test_frozen() -> None:
    c = FQTConfig.from_recipe("fqt-psq-8")
    with pytest.raises(AttributeError):
        c.seed = 1  # type: ignore[misc]


def test_from_dict_refuses_unknown_and_missing_keys() -> None:
    """A misspelt key (``grad_inputs``) silently left that path in float, and ``{}`` gave
    an all-float config (new-user trial): both raise, naming the keys."""
    d = FQTConfig.from_recipe("fqt-bhq-4", seed=3).to_dict()
    typo = dict(d)
    typo["grad_inputs"] = typo.pop("grad_input")
    with pytest.raises(TypeError, match=r"unknown keys \['grad_inputs'\].*missing keys \['grad_input'\]"):
        FQTConfig.from_dict(typo)
    with pytest.raises(TypeError, match=r"unknown keys \['seeed'\]"):
        FQTConfig.from_dict({**d, "seeed": 5})
    with pytest.raises(TypeError, match=r"missing keys \['weight', 'activation', 'grad_input', 'grad_weight'\]"):
        FQTConfig.from_dict({})
    with pytest.raises(TypeError, match="takes a dict, got list"):
        FQTConfig.from_dict([])  # type: ignore[arg-type]
    old = {k: v for k, v in d.items() if k != "adaptive"}  # saved before `adaptive` existed
    assert FQTConfig.from_dict(old) == FQTConfig.from_recipe("fqt-bhq-4", seed=3)


@pytest.mark.parametrize("ranges, text", [
    ({}, "fwd8/gi:psq8~pred/gw:psq8~pred"),
    ({"overflow": "requantize", "margin": 1.25, "history": 16}, "fwd8/gi:psq8~pred/gw:psq8~pred"),
    ({"overflow": "clip"}, "fwd8/gi:psq8~pred-clip/gw:psq8~pred-clip"),
    ({"margin": 2.0}, "fwd8/gi:psq8~pred-m2/gw:psq8~pred-m2"),
    ({"margin": 1.3000001}, "fwd8/gi:psq8~pred-m1.3000001/gw:psq8~pred-m1.3000001"),
    ({"history": 4}, "fwd8/gi:psq8~pred-h4/gw:psq8~pred-h4"),
    ({"overflow": "clip", "margin": 4, "history": 2}, "fwd8/gi:psq8~pred-clip-m4-h2/gw:psq8~pred-clip-m4-h2"),
])
def test_describe_shows_every_predicted_range_setting_that_changes_results(ranges: dict, text: str) -> None:
    # A review: overflow="clip" (biased) was labelled "~pred" like the default requantize
    # (unbiased), and margin and history not at all, in layer reprs, run configs and the report.
    import torch

    import lowbit

    cfg = FQTConfig.from_recipe("fqt-psq-8-predicted", seed=1)
    cfg = cfg.with_ranges(**ranges) if ranges else cfg
    assert lowbit.describe(cfg) == text
    assert f"recipe={text}," in repr(lowbit.convert(torch.nn.Linear(2, 2), cfg))
    mixed = FQTConfig(grad_input=GradSpec(4, "bhq", range="predicted", overflow="clip"))
    assert lowbit.describe(mixed) == "fwd8/gi:bhq4~pred-clip/gw:psq8"


def test_a_wrong_field_or_a_recipe_string_says_what_to_do() -> None:
    """A new user's tries: ``from_recipe(..., bits=4)`` ended in dataclasses' bare
    TypeError, ``convert(model, "fqt-psq-8")`` in "config must be an FQTConfig"."""
    with pytest.raises(TypeError, match=r"'bits' is not an FQTConfig field; fields: weight, .*with_grad_bits"):
        FQTConfig.from_recipe("fqt-psq-8", bits=4)
    with pytest.raises(TypeError, match=r"got str \(a recipe name: lowbit.FQTConfig.from_recipe\('fqt-psq-8'\)\)"):
        lowbit.convert(torch.nn.Linear(2, 2), "fqt-psq-8")
    # and FQTConfig("fqt-bhq-4") (the recipe as the first field, weight) named no way out
    with pytest.raises(TypeError, match=r"use FQTConfig.from_recipe\('fqt-bhq-4'\)"):
        FQTConfig("fqt-bhq-4")


def test_a_format_name_given_as_a_spec_points_at_the_spec() -> None:
    """A new user's trial (README fault kind 244): ``weight="int4"`` was answered "for the
    named recipe use FQTConfig.from_recipe('int4')", which raised "unknown recipe"."""
    for field, kind in (("weight", "an OperandSpec"), ("grad_input", "a GradSpec")):
        with pytest.raises(TypeError, match=rf"{field} must be {kind} or None, got 'int4'; "
                                            rf"for that format: {kind.split()[1]}\(format='int4'\)$"):
            FQTConfig.from_recipe("fqt-psq-8", **{field: "int4"})
    with pytest.raises(TypeError, match=r"got 'fp8_e4m3'; for that format: OperandSpec\(format='fp8_e4m3'\)"):
        FQTConfig(weight="fp8_e4m3", activation=OperandSpec())
    with pytest.raises(TypeError, match=r"got 'banana'$"):  # neither a recipe nor a format: no hint
        FQTConfig(grad_weight="banana")
    # where a whole config belongs: convert(model, "int4") was called "a recipe name" too
    with pytest.raises(TypeError, match=r"got str \(a format: a config's specs take it, e\.g\. "
                                        r"FQTConfig\(grad_input=GradSpec\(format='int4'\)\)"):
        lowbit.convert(torch.nn.Linear(2, 2), "int4")
    with pytest.raises(TypeError, match=r"got str \(not a recipe name: lowbit.RECIPES lists them\)"):
        lowbit.convert(torch.nn.Linear(2, 2), "fqt-psq-9")
    from lowbit.functional import block_state
    with pytest.raises(TypeError, match=r"got str \(a format: .*OperandSpec\(format='nvfp4'\)\)"):
        block_state("nvfp4")


def test_mx_formats_refuse_a_row_scale_and_ptq_is_psq_there() -> None:
    """The same trial: an MX format's only scales are its blocks' (the group scale is 1),
    so ``OperandSpec(format="mxfp4", granularity="row")`` ran per tensor and showed
    ``~row``; it is refused by name. NVFP4 has a group scale: per row is taken. And, as
    the README's recipe table says, PTQ and PSQ are one quantizer on an MX format: the
    same gradients, bit for bit."""
    for name in ("mxfp4", "mxfp8_e4m3", "mxfp8_e5m2"):
        with pytest.raises(ValueError, match=rf"granularity='row' has no effect on format='{name}'"):
            OperandSpec(format=name, granularity="row")
    assert OperandSpec(format="nvfp4", granularity="row").granularity.value == "row"
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for fmt in ("mxfp4", "mxfp8"):
        grads = []
        for q in ("ptq", "psq"):
            m = lowbit.convert(copy.deepcopy(base), FQTConfig.from_recipe(f"fqt-{q}-{fmt}", seed=0))
            torch.nn.functional.cross_entropy(m(x), y).backward()
            grads.append([p.grad for p in m.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(*grads)), fmt


def test_config_helpers_refuse_what_they_would_ignore_and_labels_name_block_settings() -> None:
    """A review of the config API: ``with_grad_bits`` dropped a width for a float path,
    ``with_ranges`` took any GradSpec field (``quantizer=`` changed the recipe),
    ``adaptive=`` was taken by fp/qat recipes, ``from_dict`` failed with
    ``AttributeError`` on a spec that is not a dict, and ``describe`` printed a block-16
    MXFP4 like the recipe's block 32."""
    from lowbit.formats import BlockFormat

    with pytest.raises(ValueError, match="grad_input is float in this config"):
        FQTConfig(grad_input=None).with_grad_bits(grad_input=4)
    pred = FQTConfig.from_recipe("fqt-psq-8-predicted")
    with pytest.raises(TypeError, match="with_ranges sets history, margin, overflow, not quantizer"):
        pred.with_ranges(quantizer="bhq")
    assert pred.with_ranges(margin=2.0).grad_input.margin == 2.0
    # (an adaptive recipe's grad specs may be given: its starting grid — int8a, say — which
    # the policy's widths then follow: tests/core/test_monitor_inputs.py)
    for name in ("fp", "qat-8"):
        with pytest.raises(ValueError, match="this config's gradient paths are float"):
            FQTConfig.from_recipe(name, adaptive="fqt-auto")
    d = FQTConfig.from_recipe("fqt-psq-8").to_dict()
    with pytest.raises(TypeError, match="weight must be a dict of OperandSpec fields or None, got str"):
        FQTConfig.from_dict({**d, "weight": "int8"})
    with pytest.raises(TypeError, match=r"grad_input has unknown keys \['per_row'\]"):
        FQTConfig.from_dict({**d, "grad_input": {**d["grad_input"], "per_row": True}})
    mx16 = BlockFormat("mxfp4", "e2m1", 16, "e8m0")
    custom = FQTConfig(weight=OperandSpec(format=mx16), activation=OperandSpec(format=mx16))
    assert lowbit.describe(custom).startswith("fwd:mxfp4[e2m1/16/e8m0]")
    assert lowbit.describe(FQTConfig.from_recipe("fqt-psq-mxfp4")).startswith("fwd:mxfp4/")


def test_quantize_forward_refuses_an_integer_operand() -> None:
    from lowbit.functional import quantize_forward

    with pytest.raises(TypeError, match="quantize_forward: the operand has dtype torch.int32"):
        quantize_forward(torch.arange(16, dtype=torch.int32).reshape(4, 4), OperandSpec())


def test_unhashable_or_mistyped_names_are_refused_naming_the_field() -> None:
    """Fault kind 251 (a new user's trial): a list where a name belongs raised Python's
    bare ``TypeError: unhashable type`` (a dict lookup before any type check); a registered
    quantizer object, which ``quantize_grad`` takes, was refused by ``GradSpec``; a float
    ``bits`` beside a ``format`` passed through the ``!=`` comparison."""
    from lowbit.adaptive import AdaptivePolicy
    from lowbit.experiments.models import build_model

    with pytest.raises(ValueError, match=r"quantizer must be one of .*got \['psq'\]"):
        GradSpec(quantizer=["psq"])
    with pytest.raises(ValueError, match=r"adaptive must be one of .*got \['fqt-auto'\]"):
        FQTConfig.from_recipe("fqt-psq-8", adaptive=["fqt-auto"])
    with pytest.raises(ValueError, match=r"\['fqt-auto'\] is not an adaptive recipe"):
        AdaptivePolicy.from_recipe(["fqt-auto"])
    with pytest.raises(ValueError, match="grad_input must be a non-empty tuple of distinct quantizers"):
        AdaptivePolicy(grad_input=[["psq"]])
    with pytest.raises(ValueError, match=r"unknown task \['text'\]"):
        build_model(["text"])
    with pytest.raises(ValueError, match=r"unknown model \['gpt'\] for task 'text'"):
        build_model("text", ["gpt"])
    assert GradSpec(quantizer=lowbit.QUANTIZERS["bhq"]) == GradSpec(quantizer="bhq")
    with pytest.raises(ValueError, match="quantizer must be one of"):  # another instance: not registered
        GradSpec(quantizer=type(lowbit.QUANTIZERS["psq"])())
    with pytest.raises(TypeError, match="bits must be an int in 2..8, got 8.0"):
        OperandSpec(bits=8.0, format="int8")
    with pytest.raises(TypeError, match="bits must be an int in 2..8, got True"):
        GradSpec(bits=True, format="int4")
    assert OperandSpec(bits=4, format="int4").bits == 4
