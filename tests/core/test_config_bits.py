"""``bits`` and ``format`` together must agree for every format kind; generator type checks."""

from __future__ import annotations

import re

import pytest
import torch

import lowbit
import lowbit.quantizers.hadamard
from lowbit import FQTConfig, GradSpec, OperandSpec
from lowbit.config import with_bits
from lowbit.formats import IntFormat, parse_format
from lowbit.quantizers import quantize_grad
from lowbit.storage import encode_int8_per_channel, stochastic_round_bf16


@pytest.mark.parametrize("make, msg", [
    (lambda: GradSpec(bits=8, quantizer="psq", format="int4"),
     "bits=8 contradicts format='int4' (4-bit elements); give one of them"),
    (lambda: OperandSpec(bits=4, format="int8a"),
     "bits=4 contradicts format='int8a' (8-bit elements); give one of them"),
    (lambda: OperandSpec(bits=5, format=IntFormat(6)),
     "bits=5 contradicts format='int6' (6-bit elements); give one of them"),
    (lambda: GradSpec(bits=4, format="fp8_e5m2"),
     "bits=4 contradicts format='fp8_e5m2' (8-bit elements); give one of them"),
    (lambda: GradSpec(bits=8, format="mxfp4"),
     "bits=8 contradicts format='mxfp4' (4-bit elements); give one of them"),
])
def test_bits_contradicting_format_raises(make, msg) -> None:
    with pytest.raises(ValueError, match=re.escape(msg)):
        make()


def test_bits_agreeing_or_omitted_is_accepted() -> None:
    assert GradSpec(bits=4, format="int4").format == IntFormat(4)
    assert OperandSpec(bits=8, format="int8a").format.name == "int8a"
    assert GradSpec(format="int5a").bits == 5
    assert GradSpec(bits=8, format="fp8_e5m2").format.name == "fp8_e5m2"


def test_with_bits_keeps_grid_and_rejects_float_width_change() -> None:
    s = with_bits(GradSpec(format="int8a", quantizer="bhq"), 4)
    assert (s.format.name, s.bits, s.quantizer) == ("int4a", 4, "bhq")
    f = GradSpec(format="fp8_e5m2")
    assert with_bits(f, 8) is f
    with pytest.raises(ValueError, match=re.escape(
            "bits=4 contradicts format='fp8_e5m2' (8-bit elements): only integer formats change width")):
        with_bits(f, 4)
    c = FQTConfig.from_recipe("fqt-psq-4a").with_grad_bits(grad_input=6, grad_weight=5)
    assert (c.grad_input.format.name, c.grad_weight.format.name) == ("int6a", "int5a")


@pytest.mark.parametrize("call, where", [
    (lambda g: quantize_grad(torch.ones(4, 4), "psq", 4, generator=g), "quantize_grad"),
    (lambda g: quantize_grad(torch.ones(4, 4), "bhq", "nvfp4", generator=g), "quantize_grad"),
    (lambda g: stochastic_round_bf16(torch.ones(4), g), "storage rounding"),
    (lambda g: encode_int8_per_channel(torch.ones(4, 4), g), "storage rounding"),
])
def test_generator_not_a_generator_raises_type_error(call, where) -> None:
    with pytest.raises(TypeError, match=re.escape(
            f"{where}: generator must be a torch.Generator or None, got int 0")):
        call(0)
    call(torch.Generator().manual_seed(0))  # the right type still works


def test_unknown_format_lists_the_spec_block_names() -> None:
    from lowbit.formats import parse_format
    with pytest.raises(ValueError, match=re.escape(
            "int8a, fp8_e4m3, fp8_e5m2, mxfp8_e4m3, mxfp8_e5m2, mxfp4, nvfp4, mxfp8_e4m3_spec, "
            "mxfp8_e5m2_spec, mxfp4_spec, nvfp4_spec")):
        parse_format("fp6")
    assert parse_format("nvfp4_spec").name == "nvfp4_spec"


def test_generator_type_checked_on_every_quantization_entry() -> None:
    from lowbit.functional import quantize_forward, quantize_gradient
    msg = "quantization: generator must be a torch.Generator or None, got int 0"
    x = torch.ones(4, 4)
    with pytest.raises(TypeError, match=re.escape(msg)):  # round-to-nearest: no draw, still checked
        quantize_forward(x, OperandSpec(8), 0, backend="reference")
    with pytest.raises(TypeError, match=re.escape(msg)):
        quantize_gradient(x, GradSpec(4, "psq"), 0, backend="reference")


@pytest.mark.parametrize("call, error, match", [
    (lambda: parse_format("int08"), ValueError, "unknown format 'int08'"),
    (lambda: lowbit.convert(torch.nn.Linear(2, 2), lowbit.FQTConfig.from_recipe("fqt-psq-8"), module_filter=3),
     TypeError, "module_filter must be a callable"),
    (lambda: lowbit.FQTConfig.from_recipe("qat-8").with_grad_bits(0), ValueError, "only be set on an fqt"),
    (lambda: lowbit.quantizers.hadamard.Hadamard(block=True), TypeError, "block size must be an int"),
    (lambda: lowbit.quantize_grad(torch.randn(2, 3, requires_grad=True), "psq", 8), ValueError,
     "not differentiable"),
])
def test_inputs_a_review_found_accepted_are_refused(call, error, match) -> None:
    # a review (2026-12-04): each was accepted silently or failed far from the argument
    with pytest.raises(error, match=match):
        call()


def test_integer_and_real_settings_take_numpy_scalars_and_one_element_tensors() -> None:
    # The kind of a trial's finding (predicted-range margin=np.float32(1.5) refused as if
    # below 1): every int or float setting takes NumPy scalars and one-element tensors,
    # stores the Python number (configs print, compare and serialize as before) and still
    # refuses bools.
    import json

    import numpy as np

    from lowbit.adaptive import AdaptivePolicy
    from lowbit.distributed import GradComm
    from lowbit.formats import BlockFormat
    from lowbit.noise import NoiseStream

    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=np.int64(3), activation=OperandSpec(bits=np.int64(6)),
                                grad_input=GradSpec(bits=torch.tensor(4), quantizer="psq"))
    assert (cfg.seed, cfg.activation.format.bits, cfg.grad_input.format.bits) == (3, 6, 4)
    assert type(cfg.seed) is int and type(cfg.activation.format.bits) is int
    assert FQTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert IntFormat(np.int8(5)) == IntFormat(5)
    mx = parse_format("mxfp4")
    assert BlockFormat(mx.format_name, mx.element_name, np.int64(32), mx.scale) == mx
    pol = AdaptivePolicy(min_bits=np.int64(3), max_bits=np.int32(7))
    assert (type(pol.min_bits), pol.min_bits, pol.max_bits) == (int, 3, 7)
    comm = GradComm(bits=np.int64(4), block=np.int64(64), seed=np.uint8(1))
    assert (comm.bits, comm.block, comm.seed) == (4, 64, 1) and type(comm.block) is int
    assert lowbit.quantizers.hadamard.Hadamard(np.int64(16)).block == 16
    assert NoiseStream(np.int64(7), "x").seed == 7
    q = torch.randn(1, 2, 4, 8)
    torch.testing.assert_close(lowbit.attention.scaled_dot_product_attention(q, q, q, dropout_p=np.float32(0.0)),
                               lowbit.attention.scaled_dot_product_attention(q, q, q))
    for bad in (True, np.bool_(True), 2.0, "8", torch.tensor([8, 8])):
        with pytest.raises(TypeError, match="bits must be an int"):
            IntFormat(bad)
        with pytest.raises(TypeError, match="seed must be an int"):
            NoiseStream(bad, "x")


def test_formats_monitor_policy_and_conv_geometry_take_numpy_integers_too() -> None:
    # A review of the test above: format=np.int64(4), AdaptivePolicy(target=tensor),
    # VarianceMonitor(every=tensor) and a converted Conv2d(groups=np.int64(2), stride=...)
    # were still refused where torch (or bits=) takes them.
    import numpy as np

    from lowbit.adaptive import AdaptivePolicy
    from lowbit.monitor import VarianceMonitor

    assert parse_format(np.int64(4)) == IntFormat(4)
    assert GradSpec(format=np.int64(4)).format == IntFormat(4) and OperandSpec(format=np.int8(6)).format == IntFormat(6)
    assert AdaptivePolicy(target=torch.tensor(0.1)).target == pytest.approx(0.1)
    conv = torch.nn.Conv2d(4, 4, 3, stride=np.int64(2), padding=np.int64(1), groups=np.int64(2))
    x = torch.randn(2, 4, 8, 8)
    ref = conv(x)
    conv = lowbit.convert(conv, FQTConfig.from_recipe("fqt-psq-8"))  # (the root module: a new one)
    assert conv(x).shape == ref.shape
    assert VarianceMonitor(conv, every=torch.tensor(4)).every == 4
