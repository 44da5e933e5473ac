"""lowbit.coverage: exact GEMM FLOPs, passes, formats and float reasons of one training
step, counted from what executed; the step leaves no trace; the CLI command.

FLOPs are exact integers (2·m·k·n per GEMM, 2·N·prod(w.shape)·prod(out spatial) per
convolution GEMM, 2·b·h·s_q·s_k·(d + d_v) per pair of attention GEMMs), so every count is
checked with ==.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from conftest import SelfAttention, same_nested

import lowbit
from lowbit.cli import main
from lowbit.coverage import OUTSIDE, SIMULATED, CoverageReport, GemmRow, coverage, default_loss
from lowbit.kernels import qconv
from lowbit.nn import range_state, rng_state

SIM = (SIMULATED, SIMULATED)
INT8 = ("int8", "int8")
FP32 = ("fp32", "fp32")


def by_gemm(report: CoverageReport) -> dict[tuple[str, str], tuple[int, str, tuple[str, ...]]]:
    """{(module, phase): (flops, kind, formats)}; fails if a (module, phase) repeats."""
    out = {}
    for r in report.rows:
        key = (r.module, r.phase)
        assert key not in out, f"two groups for {key}: {out[key]} and {r}"
        out[key] = (r.flops, r.kind, r.formats)
    return out


def converted(model: nn.Module, recipe: str, module_filter=None, **overrides: object) -> nn.Module:
    with warnings.catch_warnings():  # convert may warn about layers it leaves in float
        warnings.simplefilter("ignore")
        return lowbit.convert(model, lowbit.FQTConfig.from_recipe(recipe, seed=0, **overrides),
                              module_filter)


# -- MLP: every Linear has its three GEMMs --------------------------------------------------
N, D_IN, D_HID, D_OUT = 5, 8, 16, 4
L0 = 2 * N * D_IN * D_HID  # each GEMM of layer 0: 1280
L2 = 2 * N * D_HID * D_OUT  # each GEMM of layer 2: 640


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.ReLU(), nn.Linear(D_HID, D_OUT))


def mlp_step(model: nn.Module, input_grad: bool = True) -> CoverageReport:
    x = torch.randn(N, D_IN, requires_grad=input_grad)
    y = torch.tensor([0, 1, 2, 3, 0])
    return coverage(model, x, loss_fn=lambda out: F.cross_entropy(out, y))


def mlp_expected(kind: str, formats: tuple[str, ...]) -> dict:
    return {(m, p): (f, kind, formats) for m, f in (("0", L0), ("2", L2))
            for p in ("forward", "grad_input", "grad_weight")}


def test_mlp_fp_recipe_runs_all_float() -> None:
    rep = mlp_step(converted(mlp(), "fp"))
    assert by_gemm(rep) == mlp_expected("float", FP32)
    assert rep.total_flops == 3 * (L0 + L2) == 5760
    assert rep.lowbit_share == 0.0 and rep.float_share == 1.0
    assert {g["reason"] for g in rep.float_reasons()} == {"converted with the fp recipe (float by design)"}


NOT_SWAPPED = (": a kind convert swaps, left float — excluded by a module_filter, skipped (the conversion "
               "report's skipped says why), or not reached by convert")


def test_float_reasons_tell_an_excluded_layer_from_a_kind_lowbit_has_no_layer_for() -> None:
    """Fault kind 256 (a new user's trial): a layer a ``module_filter`` excluded and a
    ``ConvTranspose2d`` both read "X is not converted", as if lowbit could do nothing for
    either."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Flatten(), nn.Linear(256, 5))
    lowbit.convert(m, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0), module_filter=lambda mod, name: name != "0")
    reasons = {(g.module, g.reason) for g in coverage(m, torch.randn(2, 3, 8, 8)).rows if g.kind == "float"}
    assert reasons == {("0", "Conv2d is not converted" + NOT_SWAPPED),
                       ("1", "ConvTranspose2d is not converted: lowbit has no low-bit ConvTranspose2d (README, "
                             "\"What stays in float after convert\")")}


def test_unconverted_mlp_says_not_converted() -> None:
    rep = mlp_step(mlp())
    assert by_gemm(rep) == mlp_expected("float", FP32)
    reasons = rep.float_reasons()
    assert {g["reason"] for g in reasons} == {"Linear is not converted" + NOT_SWAPPED}
    assert sum(g["flops"] for g in reasons) == 5760


@pytest.mark.usefixtures("int_mm_engine")
def test_mlp_psq8_auto_runs_every_gemm_on_int8() -> None:
    rep = mlp_step(converted(mlp(), "fqt-psq-8"))
    assert by_gemm(rep) == mlp_expected("int8", INT8)
    assert all(r.op == "aten._int_mm" for r in rep.rows)
    assert rep.real_share == 1.0 and rep.simulated_share == 0.0 and rep.float_reasons() == []


def test_bf16_model_gemms_in_row_panels_keep_their_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 model's GEMMs run in row panels (``lowbit.kernels.int8.gemm``: several
    ``_int_mm`` calls, none with ∇W's weight-shaped output): still one int8 group per
    pass, each with the whole GEMM's FLOPs — ∇W labelled ``grad_weight`` by its scope."""
    from lowbit.kernels import amx, int8

    monkeypatch.setattr(amx, "MIN_ROWS", 16)
    monkeypatch.setattr(int8, "PANEL", 32 * 40)  # panels of ≥ 32 rows for 40 columns
    torch.manual_seed(0)
    model = converted(nn.Sequential(nn.Linear(40, 96)).bfloat16(), "fqt-psq-8")
    x = torch.randn(150, 40, dtype=torch.bfloat16, requires_grad=True)
    rep = coverage(model, x, loss_fn=lambda out: out.float().square().mean())
    gemm = 2 * 150 * 40 * 96
    assert by_gemm(rep) == {("0", p): (gemm, "int8", INT8) for p in ("forward", "grad_input", "grad_weight")}
    # panels of ⌊m / max(16, ⌊⌊PANEL/n⌋/16⌋·16)⌋: Y (150 × 96) 9, ∇X (150 × 40) 4, ∇W (96 × 40) 3
    assert {r.phase: r.calls for r in rep.rows} == {"forward": 9, "grad_input": 4, "grad_weight": 3}


def test_first_layer_without_input_grad_has_two_gemms() -> None:
    rep = mlp_step(converted(mlp(), "fqt-psq-8"), input_grad=False)
    expected = mlp_expected("int8", INT8)
    del expected[("0", "grad_input")]  # nothing asks for ∇x of the input
    assert by_gemm(rep) == expected


def test_mlp_reference_backend_is_simulated() -> None:
    rep = mlp_step(converted(mlp(), "fqt-psq-8", backend="reference"))
    assert by_gemm(rep) == mlp_expected("simulated", SIM)
    assert rep.simulated_share == 1.0 and rep.real_share == 0.0 and rep.lowbit_share == 1.0


def test_qat_backward_is_float_with_its_reason() -> None:
    rep = mlp_step(converted(mlp(), "qat-8"))
    got = by_gemm(rep)
    assert got[("0", "forward")] == (L0, "int8", INT8)
    assert got[("0", "grad_input")] == (L0, "float", ("fp32", SIMULATED))  # ∇Y is float
    assert rep.lowbit_share == pytest.approx((L0 + L2) / (3 * (L0 + L2)), rel=1e-12)
    reasons = {(g["phase"], g["reason"]) for g in rep.float_reasons()}
    assert reasons == {(p, f"the recipe keeps {p} in float (QAT: straight-through)")
                       for p in ("grad_input", "grad_weight")}


# -- CNN: standard, depthwise (groups) and pointwise convolutions -------------------------
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)  # (2, 4, 6, 6)
        self.dw = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4, bias=False)  # (2, 4, 3, 3)
        self.pw = nn.Conv2d(4, 6, 1)  # (2, 6, 3, 3)
        self.head = nn.Linear(6 * 9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pw(F.relu(self.dw(F.relu(self.conv1(x)))))
        return self.head(h.flatten(1))


# 2·N·prod(w.shape)·prod(out spatial), N = 2; the same for each of a conv's three GEMMs
CONV = {"conv1": 2 * 2 * (4 * 1 * 9) * 36, "dw": 2 * 2 * (4 * 1 * 9) * 9,
        "pw": 2 * 2 * (6 * 4) * 9, "head": 2 * 2 * 54 * 3}


def cnn_step(model: nn.Module) -> CoverageReport:
    x = torch.randn(2, 1, 6, 6)
    return coverage(model, x, loss_fn=lambda out: F.cross_entropy(out, torch.tensor([0, 2])))


def cnn_expected(kind_of: dict[str, str], formats_of: dict[str, tuple[str, ...]]) -> dict:
    out = {}
    for m, f in CONV.items():
        for p in ("forward", "grad_input", "grad_weight"):
            if (m, p) != ("conv1", "grad_input"):  # the image needs no gradient
                out[(m, p)] = (f, kind_of[m], formats_of[m])
    return out


def test_cnn_flops_exact_fp() -> None:
    torch.manual_seed(0)
    rep = cnn_step(SmallCNN())
    assert by_gemm(rep) == cnn_expected(dict.fromkeys(CONV, "float"), dict.fromkeys(CONV, FP32))
    assert rep.total_flops == 5184 * 2 + 1296 * 3 + 864 * 3 + 648 * 3
    ops = {(r.module, r.phase): r.op for r in rep.rows}
    assert ops[("dw", "grad_weight")] == "aten.convolution_backward"


def test_cnn_reference_backend_is_simulated() -> None:
    torch.manual_seed(0)
    rep = cnn_step(converted(SmallCNN(), "fqt-psq-8", backend="reference"))
    assert by_gemm(rep) == cnn_expected(dict.fromkeys(CONV, "simulated"), dict.fromkeys(CONV, SIM))


@pytest.mark.parametrize("recipe, backend", [("fqt-hadamard-4", "reference"), ("fqt-hadamard-4a", "auto")])
def test_hadamard_operands_inverted_before_the_gemm_count_as_low_bit(recipe: str, backend: str) -> None:
    """A review found Hadamard's operands counted as float32 where the inverse runs before
    the GEMM: its butterflies write through views of one buffer (``add(..., out=buf[0])``)
    and the trace kept the taint per tensor object; it now follows writes per storage."""
    torch.manual_seed(0)
    rep = cnn_step(converted(SmallCNN(), recipe, backend=backend))
    assert rep.float_share == 0 and rep.lowbit_share == 1, rep.float_reasons()


def test_hadamard_attention_with_partial_blocks_counts_as_low_bit() -> None:
    torch.manual_seed(0)
    model = converted(nn.Sequential(SelfAttention(64)), "fqt-hadamard-4")
    rep = coverage(model, torch.randn(1, 100, 64, requires_grad=True))  # 100 rows: no 64-row multiple
    assert rep.float_share == 0 and rep.lowbit_share == 1, rep.float_reasons()


def test_coverage_leaves_seeded_functional_calls_their_noise() -> None:
    """A review: a traced step advanced the count that names a seeded functional call's
    noise stream (lowbit.functional.call_state), so the next step's noise changed."""
    cfg = lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=3)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return lowbit.functional.fqt_linear(x, self.fc.weight, self.fc.bias, cfg)

    x = torch.randn(4, 8)
    torch.manual_seed(0)
    net = Net()
    before = lowbit.functional.call_count()
    coverage(net, x)
    assert lowbit.functional.call_count() == before


@pytest.mark.usefixtures("int_mm_engine")
def test_cnn_psq8_auto_is_all_low_bit() -> None:
    torch.manual_seed(0)
    rep = cnn_step(converted(SmallCNN(), "fqt-psq-8"))
    got = by_gemm(rep)
    want = {k: v[0] for k, v in cnn_expected(dict.fromkeys(CONV, ""), dict.fromkeys(CONV, ())).items()}
    # every pass counts the convolution's multiply-adds, as for fp and the reference:
    # conv1's ∇W (stride 1) runs one GEMM per kernel row over the padded rows
    # (lowbit.kernels.im2col.grad_weight_rows) and dw's ∇X (stride 2) may run on oneDNN
    # as a convolution of the zero-inserted ∇Y — their zero products are not the model's
    assert {k: v[0] for k, v in got.items()} == want
    assert rep.total_flops == cnn_step(SmallCNN()).total_flops
    assert all(kind in ("int8", "simulated") for _, kind, _ in got.values())
    assert got[("head", "forward")] == (CONV["head"], "int8", INT8)
    ops = {(r.module, r.phase): (r.op, r.calls) for r in rep.rows}
    # one per kernel row and piece of samples (grad_weight_rows: patches at most the
    # placed input's bytes, here 2 pieces), still listed as one row
    assert ops[("conv1", "grad_weight")] == ("aten._int_mm", 6)
    assert rep.lowbit_share == 1.0


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_operands_name_the_grid_their_codes_hold_not_only_the_storage_dtype(model: str) -> None:
    # int4/int5/int6 codes travel in int8 storage; the report names each operand's grid
    # as the quantizer that made it says (through im2col, the channels-last placement,
    # oneDNN's unsigned shift and its weight prepack), and the kind stays the kernel's
    from lowbit.config import GradSpec, OperandSpec
    from lowbit import grid_notes
    torch.manual_seed(0)
    net = SmallCNN() if model == "cnn" else mlp()
    rep = (cnn_step if model == "cnn" else mlp_step)(converted(
        net, "fqt-psq-4", weight=OperandSpec(5), activation=OperandSpec(6),
        grad_weight=GradSpec(quantizer="psq", format="int7")))
    got = {(r.module, r.phase): r.formats for r in rep.rows}
    assert all(r.kind == "int8" for r in rep.rows)
    layers = ("conv1", "dw", "pw", "head") if model == "cnn" else ("0", "2")
    for m in layers:
        fwd = got[(m, "forward")]
        assert (fwd[0].split(" ")[0], fwd[1].split(" ")[0]) == ("int6", "int5"), (m, fwd)
        assert got[(m, "grad_weight")] == ("int7", "int6"), m
        if (m, "grad_input") in got:
            gi = got[(m, "grad_input")]
            assert (gi[0].split(" ")[0], gi[1]) == ("int4", "int5"), (m, gi)
    assert not grid_notes.LISTENERS  # the tracer stopped listening
    # 8-bit codes keep their one label
    plain = (cnn_step if model == "cnn" else mlp_step)(converted(
        SmallCNN() if model == "cnn" else mlp(), "fqt-psq-8"))
    assert {f.split(" ")[0] for r in plain.rows for f in r.formats} == {"int8"}


@pytest.mark.parametrize("recipe, backend, why", [
    ("fqt-psq-8", "reference", "backend='reference'"),
    ("fqt-psq-fp8", "auto", "FP8 convolution has no _scaled_mm kernel"),
    ("fqt-psq-4a", "auto", "asymmetric grid"),
    ("fqt-psq-mxfp8", "auto", "block scales"),
])
def test_simulated_gemms_say_why(recipe: str, backend: str, why: str) -> None:
    # a simulated row names its cause (the reference backend, a format or geometry no real
    # low-bit kernel takes), as a float row does; printed under "simulated, and why"
    from lowbit import grid_notes
    torch.manual_seed(0)
    rep = cnn_step(converted(SmallCNN(), recipe, backend=backend))
    sim = [r for r in rep.rows if r.kind == "simulated"]
    assert sim and all(r.reason for r in sim)
    assert any(why in r.reason for r in sim), {r.reason for r in sim}
    assert "simulated, and why:" in str(rep) and why in str(rep)
    assert all(r.reason is None for r in rep.rows if r.kind not in ("float", "simulated"))
    assert rep.to_dict()["simulated"] and not grid_notes.REASONS


@pytest.mark.parametrize("recipe", ["fqt-psq-mxfp4", "fqt-bhq-nvfp4", "fqt-psq-mxfp8"])
def test_block_format_gemms_say_no_block_scaled_kernel_not_no_fp8_kernel(recipe: str) -> None:
    """A new user's trial (README fault kind 244): a linear layer's MXFP4/NVFP4 GEMMs
    said "no fp8 kernel takes it: an operand has block scales", as if an FP8 kernel were
    missing; a block format's reason names the block scales and the missing block-scaled
    kernel, whatever the element type."""
    from lowbit import grid_notes
    torch.manual_seed(0)
    rep = mlp_step(converted(mlp(), recipe))
    sim = {r.reason for r in rep.rows if r.kind == "simulated"}
    assert sim == {grid_notes.BLOCK_SCALED}, sim


def test_an_integer_and_an_fp8_operand_are_named_as_the_mix() -> None:
    """The same trial: int8 forward codes with FP8 gradient codes said the codes "are
    torch.float8_e5m2 and torch.int8, not fp8" — one of them is fp8; the cause is the mix."""
    from lowbit import FQTConfig, GradSpec
    torch.manual_seed(0)
    cfg = FQTConfig(grad_input=GradSpec(format="fp8_e5m2", quantizer="psq"),
                    grad_weight=GradSpec(format="fp8_e5m2", quantizer="psq"))
    rep = mlp_step(lowbit.convert(mlp(), cfg))
    sim = {r.reason for r in rep.rows if r.kind == "simulated"}
    assert sim and all("no kernel takes an integer and an FP8 operand together" in w
                       and "not fp8" not in w for w in sim), sim
    # convolutions and attention alike (a review: they said only "no FP8 kernel", though
    # int8 on both operands runs on their integer kernels)
    rep = cnn_step(lowbit.convert(SmallCNN(), cfg))
    conv = {r.reason for r in rep.rows if r.kind == "simulated" and r.module in ("conv1", "dw", "pw")}
    assert conv and all(w.startswith("its operands' codes are ") and "no convolution kernel takes FP8 "
                        "codes, alone or beside integer ones" in w for w in conv), conv
    mha = lowbit.convert(nn.MultiheadAttention(64, 2, batch_first=True), cfg)
    x = torch.randn(2, 128, 64)
    rep = coverage(mha, x, x, x, loss_fn=lambda o: o[0].square().mean(), model_kwargs={"need_weights": False})
    att = {r.reason for r in rep.rows if r.kind == "simulated"}
    assert att and any("lowbit's attention has no FP8 kernel, alone or beside integer codes" in w
                       for w in att), att


def test_coverage_runs_its_step_inside_inference_mode_as_under_no_grad() -> None:
    """A new user's trial (README fault kind 246): inside ``torch.inference_mode()``
    coverage said "no floating tensor that requires grad … (frozen parameters, or pass
    loss_fn)", blaming the model; it runs its step there as under ``no_grad``, inputs
    made in inference mode included, and leaves the model as it was."""
    model = converted(mlp(), "fqt-psq-8")
    y = torch.tensor([0, 1, 2, 3, 0])  # (a tensor a loss_fn captures is the user's: made outside)
    want = str(coverage(model, torch.randn(N, D_IN), loss_fn=lambda out: F.cross_entropy(out, y)))
    with torch.inference_mode():
        x = torch.randn(N, D_IN)  # an inference tensor: copied for the step
        assert str(coverage(model, x, loss_fn=lambda out: F.cross_entropy(out, y))) == want
        assert torch.is_inference_mode_enabled()
    assert all(p.grad is None for p in model.parameters())


def test_the_coverage_command_runs_under_inference_mode(capsys: pytest.CaptureFixture[str]) -> None:
    """A review of fault kind 246: ``lowbit.cli.main(["coverage", ...])`` under
    ``inference_mode`` built its labels there, which its loss captured (torch: "Inference
    tensors cannot be saved for backward"); every command now runs with autograd on."""
    argv = ["coverage", "--task", "digits", "--recipe", "fqt-psq-8", "--batch-size", "8"]
    assert main(argv) == 0
    want = capsys.readouterr().out
    with torch.inference_mode():
        assert main(argv) == 0
    assert capsys.readouterr().out == want


def test_fp8_attention_says_it_has_no_fp8_kernel() -> None:
    torch.manual_seed(0)
    mha = converted(nn.MultiheadAttention(64, 2, batch_first=True), "fqt-psq-fp8")
    x = torch.randn(2, 128, 64)
    rep = coverage(mha, x, x, x, loss_fn=lambda o: o[0].square().mean(), model_kwargs={"need_weights": False})
    sim = {r.reason for r in rep.rows if r.kind == "simulated"}
    assert sim and all("FP8 codes: lowbit's attention has no FP8 kernel" in w for w in sim), sim


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8])
def test_float_operands_scaled_by_a_models_own_integer_tensor_stay_float(dtype: torch.dtype) -> None:
    # a padding mask as uint8/int8 times the activations is no dequantization: only codes
    # lowbit's quantizers made are (a review found such an attention reported simulated)
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            m = mask[..., None]
            return (self.q(x) * m) @ (self.k(x) * m).mT

    torch.manual_seed(0)
    mask = torch.ones(2, 5, dtype=dtype)
    mask[1, 3:] = 0
    rep = coverage(converted(Masked(), "fqt-psq-8"), torch.randn(2, 5, 8),
                   loss_fn=lambda o: o.square().mean(), model_kwargs={"mask": mask})
    kinds = {(r.op, r.phase): r.kind for r in rep.rows if r.module_type == "Masked"}
    assert kinds and set(kinds.values()) == {"float"}, kinds
    assert rep.simulated_share == 0.0


def test_converted_convolution_flops_do_not_depend_on_the_kernel() -> None:
    """A new-user trial: a 3×3 padded conv's ∇W on 8×8 images counted 25% more FLOPs on
    the integer path (the padded rows its per-kernel-row GEMMs multiply) than on the
    reference path, which inflated the low-bit share. Every backend now counts the
    convolution's multiply-adds, per layer and pass."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 10))
    x = torch.randn(16, 8, 8, 8)

    def flops_by_gemm(backend: str) -> tuple[dict, float]:
        m = lowbit.convert(copy.deepcopy(model), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0, backend=backend),
                           module_filter=lambda mod, n: isinstance(mod, nn.Conv2d))
        rep = coverage(m, x)
        return {(r.module, r.phase): r.flops for r in rep.rows}, rep.lowbit_share

    auto, share = flops_by_gemm("auto")
    ref, ref_share = flops_by_gemm("reference")
    fp = {(r.module, r.phase): r.flops for r in coverage(copy.deepcopy(model), x).rows}
    assert auto == ref == fp
    assert share == ref_share
    assert auto[("0", "grad_weight")] == auto[("0", "forward")] == 2 * 16 * (16 * 8 * 9) * 64


# -- attention --------------------------------------------------------------------------------

@pytest.mark.parametrize("recipe", ["fp", "fqt-psq-8"])
def test_multihead_attention_out_proj_and_attention_are_float(recipe: str) -> None:
    """nn.MultiheadAttention kept float (converted: tests/core/test_attention.py)."""
    torch.manual_seed(0)
    keep_float = {"module_filter": lambda m, n: not isinstance(m, nn.MultiheadAttention)}
    model = SelfAttention() if recipe == "fp" else converted(SelfAttention(), recipe, **keep_float)
    rep = coverage(model, torch.randn(2, 5, 16))  # B=2, T=5, E=16, 2 heads of 8
    bt, e = 10, 16
    out_proj = [r for r in rep.rows if r.weight == "attn.out_proj.weight"]
    assert {(r.phase, r.flops, r.kind, r.module) for r in out_proj} == {
        (p, 2 * bt * e * e, "float", "attn") for p in ("forward", "grad_input", "grad_weight")}
    attention = [r for r in rep.rows if "attention" in r.op]
    assert {(r.phase, r.flops, r.kind) for r in attention} == {
        ("forward", 2 * 2 * 2 * 5 * 5 * (8 + 8), "float"),  # QKᵀ and P·V
        ("backward", 4 * 2 * 2 * 5 * 5 * (8 + 8), "float")}  # ∇P, ∇V, ∇Q, ∇K
    in_proj = 2 * bt * e * 3 * e
    weight_grads = 2 * bt * e * 3 * e + 2 * bt * e * e
    assert rep.total_flops == in_proj + 2 * (2 * bt * e * e) + 3 * 3200 + weight_grads
    assert rep.lowbit_share == 0.0


def test_converted_attention_in_projection_gradient_is_labelled_grad_weight() -> None:
    """The in-projection block of a converted MultiheadAttention has no parameters of its
    own (it is handed ``in_proj_weight``): its ∇W GEMM is still labelled ``grad_weight``
    with that weight (it read ``backward``, unattributed, before), its ∇X GEMM
    ``grad_input``; all three of its GEMMs on int8."""
    torch.manual_seed(0)
    model = converted(SelfAttention(), "fqt-psq-8")
    x = torch.randn(2, 5, 16, requires_grad=True)
    rep = coverage(model, x)
    rows = {(r.phase, r.weight, r.kind, r.flops) for r in rep.rows if r.module == "attn.projections.qkv"}
    bt, e = 10, 16
    assert rows == {(p, "attn.in_proj_weight", "int8", 2 * bt * e * 3 * e)
                    for p in ("forward", "grad_input", "grad_weight")}


def test_grouped_query_attention_counts_query_heads() -> None:
    class GQA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Parameter(torch.randn(1, 4, 6, 8))
            self.kv = nn.Parameter(torch.randn(1, 2, 6, 8))

        def forward(self) -> torch.Tensor:
            return F.scaled_dot_product_attention(self.q, self.kv, self.kv, enable_gqa=True)

    rep = coverage(GQA())
    assert rep.flops(phase="forward") == 2 * 1 * 4 * 6 * 6 * (8 + 8)
    assert rep.total_flops - rep.flops(phase="forward") == 4 * 1 * 4 * 6 * 6 * (8 + 8)


# -- what executed, not what was swapped ------------------------------------------------------
class Bypass(nn.Module):
    """Reads ``proj``'s weight with F.linear: a converted ``proj`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(x, self.proj.weight, self.proj.bias))


def test_swapped_module_that_is_never_called_counts_as_float() -> None:
    torch.manual_seed(0)
    model = converted(Bypass(), "fqt-psq-8")
    assert isinstance(model.proj, lowbit.FQTLinear)  # swapped...
    rep = coverage(model, torch.randn(5, 8))
    got = by_gemm(rep)
    proj, head = 2 * 5 * 8 * 8, 2 * 5 * 8 * 4
    assert got == {("", "forward"): (proj, "float", FP32), ("", "grad_weight"): (proj, "float", FP32),
                   ("head", "forward"): (head, "int8", INT8), ("head", "grad_input"): (head, "int8", INT8),
                   ("head", "grad_weight"): (head, "int8", INT8)}
    assert rep.never_called == ("proj",)  # ...but never called
    assert rep.lowbit_share == pytest.approx(3 * head / (3 * head + 2 * proj), rel=1e-12)
    reasons = {g["reason"] for g in rep.float_reasons()}
    assert reasons == {"uses the weight of converted 'proj' (FQTLinear) directly; that layer's "
                       "forward is bypassed"}


class TwoOfAShape(nn.Module):
    """Two converted layers with weights of one shape; the forward uses ``b``'s weight
    directly and, when ``both``, calls ``a`` too."""

    def __init__(self, both: bool) -> None:
        super().__init__()
        self.a, self.b, self.both = nn.Linear(5, 5), nn.Linear(5, 5), both

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.b.weight)
        return self.a(y) if self.both else y


@pytest.mark.parametrize("both", [False, True], ids=["b-alone", "a-called-too"])
def test_weight_gradient_names_the_parameter_used_not_the_first_of_its_shape(both: bool) -> None:
    torch.manual_seed(0)
    rep = coverage(converted(TwoOfAShape(both), "fqt-psq-8"), torch.randn(3, 5, requires_grad=True))
    rows = {(r.module, r.phase): r.weight for r in rep.rows}
    assert rows[("", "forward")] == rows[("", "grad_weight")] == "b.weight"
    if both:
        assert rows[("a", "grad_weight")] == "a.weight"


def test_int_mm_and_scaled_mm_called_directly_are_counted() -> None:
    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 40))

        def forward(self, a8: torch.Tensor, b8: torch.Tensor, f8: torch.Tensor) -> torch.Tensor:
            i = torch._int_mm(a8, b8)  # (17, 24)
            one = torch.ones((), dtype=torch.float32)
            s = torch._scaled_mm(f8, f8.t(), one, one, out_dtype=torch.float32)  # (16, 16)
            return (self.w * 0).sum() + i.float().sum() * 0 + s.sum() * 0

    a8 = torch.ones(17, 40, dtype=torch.int8)
    b8 = torch.ones(40, 24, dtype=torch.int8)
    f8 = torch.ones(16, 32).to(torch.float8_e4m3fn)
    rep = coverage(Direct(), a8, b8, f8)
    got = {(r.op, r.phase): (r.flops, r.kind, r.formats) for r in rep.rows}
    assert got == {("aten._int_mm", "forward"): (2 * 17 * 40 * 24, "int8", INT8),
                   ("aten._scaled_mm", "forward"): (2 * 16 * 32 * 16, "fp8", ("fp8 e4m3", "fp8 e4m3"))}
    assert rep.real_share == 1.0


@pytest.mark.usefixtures("int_mm_engine")
def test_forward_recomputed_by_checkpointing_counts_as_forward() -> None:
    class Checkpointed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.utils.checkpoint.checkpoint(self.body, x, use_reentrant=False)

    rep = coverage(converted(Checkpointed(), "fqt-psq-8"), torch.randn(N, D_IN, requires_grad=True))
    single = {"body.0": L0, "body.2": L2}
    for r in rep.rows:
        assert (r.op, r.kind) == ("aten._int_mm", "int8")
        if r.phase == "forward":  # run once, then again (all or part of it) in the backward
            assert r.flops == r.calls * single[r.module] and r.calls in (1, 2)
        else:
            assert r.phase in ("grad_input", "grad_weight") and r.flops == single[r.module]
    assert {r.calls for r in rep.rows if (r.module, r.phase) == ("body.0", "forward")} == {2}


# -- the step leaves no trace ---------------------------------------------------------------
def test_coverage_restores_everything_a_step_changes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Dropout(0.5), nn.Linear(64, 3))
    converted(model, "fqt-psq-8-predicted")
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 3, (8,))

    def loss(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    loss(model(x)).backward()  # grads, range histories and BN statistics exist
    model.eval()
    twin = copy.deepcopy(model)
    grads = {n: p.grad for n, p in model.named_parameters()}
    cpu_rng = torch.get_rng_state()
    coverage(model, x, loss_fn=loss)
    assert all(p.grad is grads[n] for n, p in model.named_parameters())
    assert not any(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert same_nested(rng_state(model), rng_state(twin))
    for m in (model, twin):  # the next step is bitwise the same as if coverage never ran
        m.zero_grad(set_to_none=True)  # (deepcopy does not copy .grad)
        m.train()
        torch.manual_seed(1)
        loss(m(x)).backward()
    for (n, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a.grad, b.grad)
    assert same_nested(rng_state(model), rng_state(twin))
    assert same_nested(range_state(model), range_state(twin))


def test_a_converted_multihead_attention_is_not_reported_as_never_called() -> None:
    """FQTMultiheadAttention reaches its attention product through ``attend(...)``, not
    its ``__call__``: the report read only module calls and listed it as never run while
    counting its GEMMs; the ``ran`` flag says it ran. A bypassed layer is still listed."""
    torch.manual_seed(0)
    model = converted(SelfAttention(), "fqt-psq-8")
    rep = coverage(model, torch.randn(2, 5, 16))
    assert rep.never_called == ()
    assert {r.phase for r in rep.rows if r.op == "aten.bmm"} == {"forward", "backward"}  # it ran
    assert not any(m.ran for m in lowbit.fqt_layers(model).values())  # flags restored

    class Bypass(nn.Module):  # calls head's weight directly: head never runs
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, self.head.weight)

    assert coverage(converted(Bypass(), "fqt-psq-8"), torch.randn(3, 4)).never_called == ("head",)


def test_coverage_restores_attention_in_projections_too() -> None:
    """The in-projection blocks of a converted nn.MultiheadAttention (listed by
    ``fqt_blocks``, not ``fqt_layers``) get their ``ran`` flags and predicted-range
    histories back as well."""
    from lowbit.nn import fqt_blocks, reset_ran

    torch.manual_seed(0)
    model = converted(SelfAttention(), "fqt-psq-8-predicted")
    x = torch.randn(2, 5, 16)
    model(x).square().mean().backward()  # range histories exist
    reset_ran(model)
    blocks = fqt_blocks(model)
    for m in blocks.values():
        m.ran = False
    assert any("projections" in n and m.range_trackers for n, m in blocks.items())
    ranges = range_state(model)
    coverage(model, x)
    assert not any(m.ran for m in blocks.values())
    assert same_nested(range_state(model), ranges)


# -- loss and argument errors ----------------------------------------------------------------
def test_default_loss_prefers_the_models_own_loss() -> None:
    logits = torch.randn(2, 3, requires_grad=True)
    loss = logits.sum()
    assert default_loss((logits, loss)) is loss
    got = default_loss({"a": logits, "b": logits * 2})
    assert torch.equal(got, logits.sum() + (logits * 2).sum())


def test_bad_arguments_raise_named_errors() -> None:
    with pytest.raises(TypeError, match="^model must be an nn.Module, got function$"):
        coverage(lambda x: x, torch.ones(1))
    with pytest.raises(ValueError, match=r"^the loss must be a floating 0-d tensor that requires "
                       r"grad, got a tensor of shape \(5, 4\), dtype torch.float32, requires_grad=True$"):
        coverage(mlp(), torch.randn(5, 8), loss_fn=lambda out: out)
    with pytest.raises(ValueError, match="^by must be 'module' or 'type', got 'x'$"):
        mlp_step(mlp()).table(by="x")


def test_report_table_and_dict() -> None:
    rep = mlp_step(converted(mlp(), "qat-8"))
    text = str(rep)
    assert text == rep.table()
    assert text.splitlines()[1] == ("low-bit 33.3% (real int8/fp8 33.3%, simulated 0.0%), float "
                                    "66.7%; forward alone: low-bit 100.0%")
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["total_flops"] == 5760 and d["flops_by_kind"]["int8"] == 1920
    assert d["flops_by_phase"] == {"forward": 1920, "grad_input": 1920, "grad_weight": 1920,
                                   "backward": 0}


def test_the_text_names_modules_quoted_and_the_model_itself_as_root(capsys: pytest.CaptureFixture[str]) -> None:
    """A new user's trial: in an ``nn.Sequential`` the text read "… in 2, +1 more" — a count,
    not a module — and the model itself "(root)". The text (table, float and simulated
    lines, never-ran and not-counted lines, the CLI's) quotes every module it names and
    calls the model itself ``<root>``; the rows and ``to_dict()`` keep the bare names."""
    rep = mlp_step(converted(mlp(), "qat-8"))  # ∇X and ∇W float in layers 0 and 2
    lines = str(rep).splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("module "))
    assert {line.split()[0] for line in lines[head + 1:lines.index("", head)]} == {"'0'", "'2'"}
    floats = [line for line in lines if line.startswith("  FQTLinear ")]
    assert len(floats) == 2 and all(re.search(r" in '[02]', \+1 more — the recipe keeps", x) for x in floats)
    assert {r.module for r in rep.rows} == {"0", "2"}
    assert {m for g in rep.to_dict()["float"] for m in g["modules"]} == {"0", "2"}
    # the model itself running a GEMM with a converted layer's weight, which never runs
    torch.manual_seed(0)
    text = str(coverage(converted(Bypass(), "fqt-psq-8"), torch.randn(5, 8)))
    assert "<root>  Bypass" in text and "(root)" not in text
    assert " in <root> — uses the weight of converted 'proj' (FQTLinear) directly" in text
    assert "converted layers that never ran: 'proj'" in text.splitlines()
    # every line that names a module, on a report built by hand
    made = CoverageReport((GemmRow("", "Net", "aten.mm", "forward", FP32, "float", 600, 1, None, "why"),
                           GemmRow(OUTSIDE, "-", "aten.mm", "forward", FP32, "float", 200, 1, None, "loss"),
                           GemmRow("2", "FQTLinear", "aten._int_mm", "forward", INT8, "int8", 200, 1, "2.weight")),
                          unaccounted=(("aten.foo", "", 3), ("aten.bar", "0", 1)), never_called=("0", "1"))
    lines = made.table().splitlines()
    assert [line.split()[0] for line in lines[4:7]] == ["<root>", "(outside", "'2'"]
    assert "  Net aten.mm forward: 600 (60.0%) in <root> — why" in lines
    assert "  - aten.mm forward: 200 (20.0%) in (outside model) — loss" in lines
    assert lines[-3:] == ["converted layers that never ran: '0', '1'",
                          "not counted (no FLOP formula): aten.foo in <root>, 3 calls",
                          "not counted (no FLOP formula): aten.bar in '0', 1 calls"]
    assert main(["coverage", "--task", "digits", "--model", "mlp", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(out) if line.startswith("module "))
    rows = itertools.takewhile(lambda line: line and not line.startswith("lowbit.int8"), out[head + 1:])
    assert {line.split()[0] for line in rows} == {"'net.1'", "'net.3'", "'net.5'"}


# -- the command line ------------------------------------------------------------------------
def test_cli_prints_the_table_and_writes_json(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    out = tmp_path / "cov.json"
    rc = main(["coverage", "--task", "digits", "--model", "mlp", "--batch-size", "4",
               "--by", "type", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "low-bit 100.0% (real int8/fp8 100.0%, simulated 0.0%), float 0.0%" in text
    # digits MLP 64 → 128 → 128 → 10 on 4 images; the images need no gradient
    total = 2 * (2 * 4 * 64 * 128) + 3 * (2 * 4 * 128 * 128) + 3 * (2 * 4 * 128 * 10)
    assert json.loads(out.read_text())["total_flops"] == total == 555008


def test_cli_on_an_adaptive_recipe_says_once_what_the_table_shows(capfd: pytest.CaptureFixture[str]) -> None:
    """A new user: ``lowbit coverage --recipe fqt-auto`` printed an AdaptiveRecipeWarning per
    layer, pointing at lowbit's own source and at a policy the command cannot attach."""
    assert main(["coverage", "--task", "digits", "--model", "mlp", "--batch-size", "4", "--recipe", "fqt-auto"]) == 0
    out, err = capfd.readouterr()
    assert "AdaptiveRecipeWarning" not in err and "trains at the recipe's fixed" not in err
    assert "fqt-auto changes its gradient widths as it trains" in out and "starting widths" in out


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "--task must be one of digits, fashion-mnist, text, got 'nope'"),
    (["--model", "gpt"], "--model for task digits must be one of mlp, cnn, got 'gpt'"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--by", "layer"], "--by must be module or type, got 'layer'"),
    # checked before the training step runs, not when the report is written after it
    (["--json", "/nonexistent-lowbit-dir/x.json"], "--json: the folder /nonexistent-lowbit-dir does not exist"),
    (["--json", "/"], "--json must be a file, but / is a folder"),
])
def test_cli_bad_values_exit_2_with_one_line(argv: list[str], message: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["coverage", *argv]) == 2
    assert capsys.readouterr().err == f"lowbit coverage: error: {message}\n"


# -- asymmetric grids (intBa): x̂ = codes·s + z is a dequantized operand ---------------------
def test_mlp_asymmetric_gradient_grid_reference_is_simulated() -> None:
    """``x̂ = codes·s + z``: adding the grid's offset keeps the operand dequantized (the
    gradient GEMMs were reported ``fp32 × sim`` float before)."""
    for recipe in ("fqt-psq-4a", "fqt-bhq-8a", "fqt-ptq-4a"):
        rep = mlp_step(converted(mlp(), recipe, backend="reference"))
        assert by_gemm(rep) == mlp_expected("simulated", SIM), recipe
        assert rep.simulated_share == 1.0 and rep.float_reasons() == []


def test_mlp_asymmetric_gradient_grid_auto_is_int8() -> None:
    rep = mlp_step(converted(mlp(), "fqt-psq-4a"))
    want = mlp_expected("int8", INT8)  # the int8 kernel; the gradients' grids named
    for m in ("0", "2"):
        want[(m, "grad_input")] = (want[(m, "grad_input")][0], "int8", ("int4a", "int8"))
        want[(m, "grad_weight")] = (want[(m, "grad_weight")][0], "int8", ("int8a", "int8"))
    assert by_gemm(rep) == want
    assert rep.real_share == 1.0 and rep.float_reasons() == []


def test_cnn_asymmetric_gradient_grid_is_all_low_bit() -> None:
    """Conv's ∇X/∇W with an asymmetric gradient grid run simulated (the offset is no zero
    code for the integer path), the forward on oneDNN int8 (where exact, else im2col and an
    int8 GEMM), the Linear on _int_mm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))
    x, y = torch.randn(3, 2, 5, 5, requires_grad=True), torch.tensor([0, 1, 2])
    rep = coverage(converted(model, "fqt-psq-4a"), x, loss_fn=lambda o: F.cross_entropy(o, y))
    conv, lin = 2 * 3 * (4 * 2 * 9) * 25, 2 * 3 * 100 * 3  # 10800, 1800
    # oneDNN's int8 convolution (unsigned codes) where it is exact here, else im2col + _int_mm
    onednn = qconv.available(torch.zeros(1, dtype=torch.int8), (4, 2, 3, 3), 1, (5, 5), (1, 1), (1, 1), (1, 1))
    assert by_gemm(rep) == {
        ("0", "forward"): (conv, "int8", ("int8 (u8 + 128)", "int8") if onednn else INT8),
        ("0", "grad_input"): (conv, "simulated", SIM), ("0", "grad_weight"): (conv, "simulated", SIM),
        ("3", "forward"): (lin, "int8", INT8), ("3", "grad_input"): (lin, "int8", ("int4a", "int8")),
        ("3", "grad_weight"): (lin, "int8", ("int8a", "int8"))}
    assert rep.lowbit_share == 1.0 and rep.float_reasons() == []


def test_int8_refusal_names_the_cause() -> None:
    """The dispatcher's refusal says why (here the per-output-channel weight scale lies on
    the summed dimension of ∇X = ∇Y·W), not only the operands' shapes."""
    import dataclasses
    import re
    cfg = dataclasses.replace(lowbit.FQTConfig.from_recipe("fqt-psq-8", backend="int8"),
                              weight=lowbit.OperandSpec(8, "row"))
    m = lowbit.convert(nn.Linear(4, 8), cfg)
    y = m(torch.randn(2, 4, requires_grad=True))
    msg = ("backend='int8' cannot compute this GEMM on torch._int_mm (int8 codes, scales and "
           "offsets on non-summed dimensions only, no block scales, supported shapes): b's scale "
           "(8, 1) lies on the summed dimension (one per row of b: e.g. weight.granularity='row' "
           "in ∇X = ∇Y·W, or activation.granularity='row' in ∇W = ∇Yᵀ·X); got a (2, 8) "
           "torch.int8, b (8, 4) torch.int8, b scale (8, 1) on cpu")
    with pytest.raises(ValueError, match=re.escape(msg)):
        y.sum().backward()


def test_coverage_fp8_backend_refuses_a_cnn() -> None:
    """``backend="fp8"`` has no FP8 convolution: coverage's step raises instead of
    reporting simulated conv GEMMs as if fp8 had been asked and granted."""
    torch.manual_seed(0)
    model = converted(nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(36, 3)),
                      "fqt-psq-fp8", backend="fp8")
    with pytest.raises(ValueError, match="FP8 convolution has no _scaled_mm kernel"):
        coverage(model, torch.randn(3, 2, 5, 5))


def test_bhq_group_sums_are_counted_as_quantizer_transforms(monkeypatch) -> None:
    """BHQ's group sums on a float32 gradient of ≥ 2¹⁹ elements off the CPU are one sparse
    × dense product (``aten._sparse_addmm``): counted with the quantizers' own GEMMs
    (2·nnz·n FLOPs), not listed as a matrix op without a formula (a new user's finding).
    On the CPU they are sequential sums, no GEMM; the sparse path is forced here."""
    import lowbit.quantizers.bhq as bhq

    monkeypatch.setattr(bhq, "SEQUENTIAL_DEVICES", frozenset())
    torch.manual_seed(0)
    model = lowbit.convert(nn.Linear(256, 2048), lowbit.FQTConfig.from_recipe("fqt-bhq-8", seed=0))
    x = torch.randn(256, 256, requires_grad=True)  # ∇Y: 256 × 2048 = 2¹⁹ elements
    rep = lowbit.coverage(model, x, loss_fn=lambda out: out.square().mean())
    assert rep.unaccounted == ()
    # the group sums of ∇Y (nnz = 256 rows, 2048 columns); ∇X's (256 × 256) take the
    # scatter-add path, below 2¹⁹ elements
    assert rep.quantizer_flops == 2 * 256 * 2048 and rep.quantizer_calls == 1
    monkeypatch.setattr(bhq, "SEQUENTIAL_DEVICES", frozenset({"cpu"}))  # the CPU's own: no GEMM to count
    rep = lowbit.coverage(model, x, loss_fn=lambda out: out.square().mean())
    assert rep.unaccounted == () and rep.quantizer_flops == 0 and rep.quantizer_calls == 0


def test_coverage_refuses_a_model_whose_backward_steps_an_optimizer() -> None:
    """torch's "optimizer step in backward" (post-accumulate-grad hooks): coverage's
    backward ran the hooks and changed the parameters, which it cannot put back; it now
    refuses such a model before running anything, naming the parameters."""
    model = lowbit.convert(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)),
                           lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    opts = {p: torch.optim.SGD([p], lr=0.1) for p in model.parameters()}
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda q: (opts[q].step(), opts[q].zero_grad()))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"post-accumulate-grad hooks of \['0.weight', '0.bias', '2.weight'\]"):
        lowbit.coverage(model, torch.randn(3, 6))
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fp"])
def test_a_convolution_called_by_keyword_counts_as_a_positional_call(recipe: str) -> None:
    """A review: the tracer's post-hook read ``args[0]``; a convolution called
    ``conv(input=x)`` counted no FLOPs, so the report's shares left it out."""
    class Net(nn.Module):
        def __init__(self, keyword: bool) -> None:
            super().__init__()
            self.conv, self.keyword = nn.Conv2d(3, 8, 3), keyword

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(input=x) if self.keyword else self.conv(x)

    reports = []
    for keyword in (False, True):
        torch.manual_seed(0)
        model = lowbit.convert(Net(keyword), lowbit.FQTConfig.from_recipe(recipe, seed=0))
        reports.append(coverage(model, torch.randn(2, 3, 8, 8, requires_grad=True)).to_dict())
    assert reports[0]["total_flops"] > 0 and reports[0]["total_flops"] == reports[1]["total_flops"]
    assert reports[0]["flops_by_kind"] == reports[1]["flops_by_kind"]


def test_grouped_mm_experts_are_counted_as_float() -> None:
    """Mixture-of-Experts experts run as ``torch._grouped_mm`` (transformers 5) had no FLOP
    formula: left out of the totals, the headline read ~99% low-bit for a step mostly in
    float. Counted now, for each layout, to ``offs[-1]`` (rows past it are not computed)."""
    from lowbit.flops import parts

    def flops(*args):
        out = torch._grouped_mm(*args)
        return parts(torch.ops.aten._grouped_mm.default, args, out)[0].flops

    bf = torch.bfloat16
    offs = torch.tensor([3, 7, 9], dtype=torch.int32)
    assert flops(torch.randn(10, 8, dtype=bf), torch.randn(3, 8, 16, dtype=bf), offs) == 2 * 9 * 8 * 16
    offs = torch.tensor([8, 16, 24], dtype=torch.int32)
    assert flops(torch.randn(3, 4, 8, dtype=bf), torch.randn(8, 24, dtype=bf), offs) == 2 * 4 * 8 * 24
    assert flops(torch.randn(4, 24, dtype=bf), torch.randn(24, 8, dtype=bf), offs) == 2 * 4 * 24 * 8
    assert flops(torch.randn(3, 4, 8, dtype=bf), torch.randn(3, 8, 8, dtype=bf)) == 2 * 3 * 4 * 8 * 8

    class Experts(nn.Module):  # transformers' layout: 3-D expert weights, grouped rows
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(16, 4)
            self.w = nn.Parameter(torch.randn(4, 16, 16) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.router(x)
            order = h.argmax(-1).sort().indices
            counts = torch.bincount(h.argmax(-1), minlength=4)
            offs = counts.cumsum(0).to(torch.int32)
            y = torch._grouped_mm(x[order].to(torch.bfloat16), self.w.to(torch.bfloat16), offs)
            return y.float().sum() + h.sum()

    torch.manual_seed(0)
    m = lowbit.convert(Experts(), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    rep = coverage(m, torch.randn(32, 16), loss_fn=lambda out: out)
    assert rep.unaccounted == ()
    expert = sum(r.flops for r in rep.rows if r.op == "aten._grouped_mm")
    assert expert >= 2 * 32 * 16 * 16  # the forward's grouped GEMM at least (backward too)
    assert rep.lowbit_share < 0.5  # the router alone is low-bit: most of the step is float


def _module_flops(r: CoverageReport, module: str, phase: str) -> int:
    return sum(g.flops for g in r.rows if g.module == module and g.phase == phase)


def test_fused_recurrent_layers_dot_and_cdist_are_counted_as_float() -> None:
    """``nn.LSTM`` runs as ``mkldnn_rnn_layer`` (+ backward) on the CPU, which had no FLOP
    formula and no GEMM-like name: a model of an LSTM and a converted head read "low-bit
    100%" with the LSTM's 6.3M FLOPs gone, not even "not counted" (a review); ``dot``,
    ``vdot`` and ``cdist`` the same."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.LSTM(32, 64, batch_first=True), nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.rnn(x)[0][:, -1])

    m = lowbit.convert(Net(), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    r = coverage(m, torch.randn(8, 16, 32), loss_fn=lambda o: o.sum())
    b, t, i, h = 8, 16, 32, 64
    lstm = t * 2 * b * 4 * h * (i + h)  # w_ih (4H, I) and w_hh (4H, H), every step and sample
    assert _module_flops(r, "rnn", "forward") == lstm
    assert _module_flops(r, "rnn", "backward") == 2 * lstm
    assert r.total_flops == 3 * lstm + 3 * 2 * b * 64 * 10 and r.lowbit_share < 0.01 and not r.unaccounted

    class Dist(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(20, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cdist(x, self.w).sum() + torch.dot(x[0], self.w[0])

    r = coverage(Dist(), torch.randn(30, 64, requires_grad=True))
    assert r.flops(phase="forward") == 2 * 30 * 20 * 64 + 2 * 64 and not r.unaccounted


def test_bilinear_products_are_counted_and_other_namespaces_gemms_listed() -> None:
    """``nn.Bilinear`` (``aten._trilinear``) was listed as not counted while the headline
    read "low-bit 100.0%" beside a converted head; a ``torch.ao`` dynamic-quantized Linear
    (``quantized::linear_dynamic``) was neither counted nor listed (a review)."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bil, self.head = nn.Bilinear(16, 24, 32), nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.bil(x[:, :16], x))

    m = lowbit.convert(Net(), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    r = coverage(m, torch.randn(8, 24, requires_grad=True), loss_fn=lambda o: o.sum())
    n, o, i1, i2 = 8, 32, 16, 24
    assert _module_flops(r, "bil", "forward") == 2 * n * o * i1 * i2
    # ∇x1, ∇x2 and ∇A: each one trilinear over the same index space, ∇A the weight's gradient
    assert _module_flops(r, "bil", "grad_input") == 2 * 2 * n * o * i1 * i2
    assert _module_flops(r, "bil", "grad_weight") == 2 * n * o * i1 * i2
    assert {(g.weight, g.reason) for g in r.rows if g.module == "bil"} == {("bil.weight", "Bilinear is not converted: lowbit has no low-bit Bilinear (README, "
                                                                   "\"What stays in float after convert\")")}
    assert not r.unaccounted and 0 < r.lowbit_share < 0.1

    class Packs(nn.Module):  # packs its weight in the step: the packing multiplies nothing
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(32, 64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = torch.quantize_per_tensor(self.w.detach(), 0.05, 0, torch.qint8)
            return torch.ops.quantized.linear_dynamic(x, torch.ops.quantized.linear_prepack(q, None))

    class Fp16(nn.Module):  # a GEMM whose name holds "unpacked" (a second review)
        def __init__(self) -> None:
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(32, 64)), nn.Parameter(torch.zeros(32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.quantized.linear_dynamic_fp16_unpacked_weight(x, self.w.detach(), self.b.detach())

    dyn = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(64, 32)), {nn.Linear}, torch.qint8)
    for model, op in ((dyn, "linear_dynamic"), (Packs(), "linear_dynamic"), (Fp16(), "linear_dynamic_fp16_unpacked_weight")):
        r = coverage(nn.Sequential(model, nn.Linear(32, 4)), torch.randn(8, 64))
        assert [(o, calls) for o, _, calls in r.unaccounted] == [(f"quantized.{op}", 1)]


def test_a_layer_pass_counts_the_forwards_it_differentiates_and_unpadded_rows() -> None:
    """A converted convolution's ∇X and ∇W doubled under activation checkpointing (the
    recompute's forward was added to the FLOPs each backward pass was scaled to) and
    with an extra ``no_grad`` forward; a Hadamard Linear's ∇X counted the rows padded to
    its block (65 rows as 128). Each pass now counts the layer's work, as the float model's
    ops do (a review)."""
    import torch.utils.checkpoint as cp

    class Net(nn.Module):
        def __init__(self, mode: str) -> None:
            super().__init__()
            self.mode, self.c1 = mode, nn.Conv2d(4, 8, 3, padding=1)
            self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.c1(x)
            if self.mode == "checkpoint":
                return cp.checkpoint(self.body, h, use_reentrant=False)
            if self.mode == "no_grad":
                with torch.no_grad():
                    t = self.body[0](h)
                return self.body(h) - t.sum()
            return self.body(h)

    x, per = torch.randn(2, 4, 6, 6), 2 * 2 * 8 * 8 * 9 * 36  # one pass of body.0
    for mode, forwards in (("plain", 1), ("checkpoint", 2), ("no_grad", 2)):
        torch.manual_seed(0)
        m = lowbit.convert(Net(mode), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
        r = coverage(m, x, loss_fn=lambda o: o.sum())
        got = {p: _module_flops(r, "body.0", p) for p in ("forward", "grad_input", "grad_weight")}
        assert got == {"forward": forwards * per, "grad_input": per, "grad_weight": per}, (mode, got)
    for rows in (33, 65):
        lin = lowbit.convert(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)),
                             lowbit.FQTConfig.from_recipe("fqt-hadamard-8", seed=0))
        r = coverage(lin, torch.randn(rows, 64), loss_fn=lambda o: o.sum())
        for phase in ("forward", "grad_input", "grad_weight"):
            assert _module_flops(r, "2", phase) == 2 * rows * 64 * 64, (rows, phase)


def test_a_linear_fed_a_parameter_names_its_own_weight_and_its_weight_gradient() -> None:
    """``proj(self.latents)`` (learned queries or latents): the float layer's ∇W was
    called ∇X and every row named ``latents`` as the weight (a review)."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.latents, self.proj = nn.Parameter(torch.randn(16, 32)), nn.Linear(32, 24)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(self.latents) + x

    per = 2 * 16 * 32 * 24
    for model in (Net(), lowbit.convert(Net(), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))):
        r = coverage(model, torch.randn(16, 24), loss_fn=lambda o: o.sum())
        assert {p: r.flops(phase=p) for p in ("forward", "grad_input", "grad_weight")} == \
            {"forward": per, "grad_input": per, "grad_weight": per}
        assert {g.weight for g in r.rows} == {"proj.weight"}


@pytest.mark.parametrize("recipe", ["fp", "fqt-psq-8", "fqt-bhq-8"])
def test_every_convolution_row_names_its_weight(recipe: str) -> None:
    """A review: a convolution's ∇W rows (``convolution_backward``'s, whose operands hold no
    parameter) and every row of a converted convolution on the oneDNN / kernel-row paths
    (prepacked codes) had ``weight`` None, where a Linear's rows name theirs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 5), nn.Unflatten(1, (5, 1)), nn.Conv1d(5, 4, 1))
    if recipe != "fp":
        model = lowbit.convert(model, lowbit.FQTConfig.from_recipe(recipe, seed=0))
    r = coverage(model, torch.randn(2, 3, 8, 8))
    named = {(g.module, g.phase): g.weight for g in r.rows}
    assert named == {(m, p): f"{m}.weight" for m in ("0", "2", "4", "6") for p in ("forward", "grad_input", "grad_weight")
                     if (m, p) != ("0", "grad_input")}  # the input needs no gradient


@pytest.mark.parametrize("recipe", ["fp", "fqt-psq-8"])
def test_a_weight_normed_layer_names_its_parametrization_and_its_passes(recipe: str) -> None:
    """A second review: a converted weight-normed convolution's rows had no weight; and a
    float weight-normed Linear whose ∇X has its weight's shape (batch 2, Linear(144, 2))
    had its ∇X counted as ∇W (2304 FLOPs of ∇W, none of ∇X)."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv2d(3, 4, 3)), nn.Flatten(), weight_norm(nn.Linear(144, 2)))
    if recipe != "fp":
        model = lowbit.convert(model, lowbit.FQTConfig.from_recipe(recipe, seed=0))
    r = coverage(model, torch.randn(2, 3, 8, 8))
    named = {(g.module, g.phase): g.weight for g in r.rows}
    assert named == {(m, p): f"{m}.parametrizations.weight.original1" for m in ("0", "2")
                     for p in ("forward", "grad_input", "grad_weight") if (m, p) != ("0", "grad_input")}
    assert r.flops(phase="grad_input") == r.flops(phase="grad_weight") - 2 * 2 * 4 * 36 * 27  # conv ∇W alone


@pytest.mark.parametrize("fullgraph", [False, True])
def test_a_compiled_model_is_traced_as_its_original_module(fullgraph: bool) -> None:
    """A review: ``coverage(torch.compile(m, fullgraph=True), x)`` raised torch's "found
    no compiled frames" (compiled code does not run under a dispatch mode), and the default
    compile's rows carried ``_orig_mod.`` names. The original module is traced: the same
    rows as the eager model."""
    torch.manual_seed(0)
    model = lowbit.convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)),
                           lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    x = torch.randn(2, 3, 8, 8)
    eager = coverage(model, x)
    compiled = coverage(torch.compile(model, fullgraph=fullgraph), x)
    assert [(g.module, g.phase, g.flops, g.weight) for g in compiled.rows] == \
        [(g.module, g.phase, g.flops, g.weight) for g in eager.rows]


def test_a_linears_passes_count_the_weight_it_multiplies_not_its_attributes() -> None:
    """A review: sizing a Linear from ``in_features``/``out_features`` counted a layer
    whose weight was replaced by a (32, 64) one as (64, 64): its ∇X and ∇W twice their
    work. The call's own input and output size it."""
    torch.manual_seed(0)
    model = lowbit.convert(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)),
                           lowbit.FQTConfig.from_recipe("fqt-hadamard-8", seed=0))
    model[2].weight, model[2].bias = nn.Parameter(torch.randn(32, 64)), nn.Parameter(torch.randn(32))
    r = coverage(model, torch.randn(65, 64))
    work = {p: sum(g.flops for g in r.rows if g.module == "2" and g.phase == p) for p in ("forward", "grad_input", "grad_weight")}
    assert work == {p: 2 * 65 * 64 * 32 for p in work}
    # nor the output a forward hook reshaped (a second review: a quarter of the work counted)
    heads = lowbit.convert(nn.Sequential(nn.Linear(64, 64)), lowbit.FQTConfig.from_recipe("fqt-hadamard-8", seed=0))
    heads[0].register_forward_hook(lambda m, a, out: out.unflatten(-1, (4, 16)))  # (65, 4, 16)
    r = coverage(heads, torch.randn(65, 64), loss_fn=lambda o: o.sum())
    assert {p: sum(g.flops for g in r.rows if g.phase == p) for p in ("forward", "grad_weight")} \
        == {p: 2 * 65 * 64 * 64 for p in ("forward", "grad_weight")}


@pytest.mark.parametrize("recipe", ["fp", "fqt-psq-8"])
def test_a_parametrized_weight_runs_once_per_forward_under_the_trace(recipe: str) -> None:
    """A review: the trace's layer hook read ``module.weight`` to size the layer (three
    times for a convolution), and each read ran the parametrization again, its GEMMs
    counted each time (a spectral-normed convolution's power iteration 4×)."""
    from torch.nn.utils.parametrizations import orthogonal, spectral_norm

    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Conv2d(3, 4, 3)), nn.Flatten(), orthogonal(nn.Linear(144, 144)))
    if recipe != "fp":
        model = lowbit.convert(model, lowbit.FQTConfig.from_recipe(recipe, seed=0))
    runs = {"conv": 0, "linear": 0}
    model[0].parametrizations.weight[0].register_forward_hook(lambda *a: runs.__setitem__("conv", runs["conv"] + 1))
    model[2].parametrizations.weight[0].register_forward_hook(lambda *a: runs.__setitem__("linear", runs["linear"] + 1))
    coverage(model, torch.randn(3, 3, 8, 8))
    assert runs == {"conv": 1, "linear": 1}


def test_a_sum_past_max_k_is_named_as_such() -> None:
    """A Linear's ∇W over more than int8.MAX_K rows runs simulated (an int32 sum of that
    length could wrap); the reason said "the kernel does not take these shapes"."""
    from lowbit.kernels import Backend, Encoded, int8, refusal_cause

    k = int8.MAX_K + 1
    a = Encoded(torch.zeros(8, k, dtype=torch.int8), torch.ones(8, 1))
    b = Encoded(torch.zeros(k, 8, dtype=torch.int8), torch.ones(1, 8))
    assert f"K = {k} terms, past int8.MAX_K = {int8.MAX_K}" in refusal_cause(Backend.INT8, a, b)


def test_a_call_differentiated_twice_counts_twice_and_a_tied_weight_is_the_layers_own() -> None:
    """A review of the fixes above: ∇X of a layer call differentiated by
    ``autograd.grad`` and then by the backward counted once (the passes were matched to
    forward calls as a set); a layer sharing a square weight owned by another had its ∇X
    called ∇W where the rows equal the weight's."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    x = torch.randn(8, 32, requires_grad=True)

    def twice(o: torch.Tensor) -> torch.Tensor:
        torch.autograd.grad(o.square().sum(), x, retain_graph=True)
        return o.sum()

    r = coverage(lowbit.convert(copy.deepcopy(mlp), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0)),
                 x, loss_fn=twice)
    assert _module_flops(r, "0", "grad_input") == 2 * 2 * 8 * 32 * 64
    assert _module_flops(r, "2", "grad_input") == 2 * 2 * 8 * 64 * 16

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)))

    r = coverage(Tied(), torch.randn(16, 16, requires_grad=True), loss_fn=lambda o: o.square().sum())
    for m in ("a", "b"):
        assert {p: _module_flops(r, m, p) for p in ("forward", "grad_input", "grad_weight")} == \
            {"forward": 8192, "grad_input": 8192, "grad_weight": 8192}, m


def test_keyword_inputs_outside_model_kwargs_are_named() -> None:
    """``coverage(gpt2, input_ids=ids)`` — how HF models are called — raised Python's bare
    "unexpected keyword argument" (a new user's trial): the error names ``model_kwargs``."""
    with pytest.raises(TypeError, match=r"got keyword arguments \['input_ids', 'labels'\]: pass the model's "
                       r"keyword inputs as model_kwargs=dict\(input_ids=…, labels=…\)"):
        coverage(nn.Linear(2, 2), input_ids=torch.zeros(1), labels=torch.zeros(1))


def test_a_root_product_with_a_childs_weight_is_its_grad_input_not_a_layers_grad_weight() -> None:
    """A tied head at the model's root (``h @ emb.weight.T`` after a converted Linear and a
    ReLU): its ∇h, (28, 16), was read as a padded ∇W of the converted (16, 16) ``fc``
    ("uses the weight of converted fc directly; that layer's forward is bypassed": a new
    user's trial) — only lowbit's layers pad rows."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(50, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.fc(self.emb(x))) @ self.emb.weight.T

    torch.manual_seed(0)
    m = lowbit.convert(Net(), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    for tokens in (7, 4):  # 4·4 rows: ∇h is (16, 16), fc.weight's very shape (a second review)
        r = coverage(m, torch.randint(0, 50, (4, tokens)))
        root = sorted((g.phase, g.weight, g.reason) for g in r.rows if g.module == "")
        assert root == [(p, "emb.weight", "Net is not converted (emb.weight): a functional GEMM in its forward "
                                          "(convert swaps modules, not calls)")
                        for p in ("forward", "grad_input", "grad_weight")]
        assert sorted(g.phase for g in r.rows if g.module == "fc" and g.kind == "int8") == \
            ["forward", "grad_input", "grad_weight"]


def test_a_loss_fn_of_model_and_batch_is_refused_by_name() -> None:
    """A new user's trial: ``gradient_variance``'s ``loss_fn(model, batch)`` passed to
    coverage failed inside the step with Python's "missing 1 required positional
    argument"; it is refused first, naming both signatures. One-argument callables
    (a lambda, ``torch.sum``, a bound method) pass."""
    m = lowbit.convert(nn.Linear(4, 4), lowbit.FQTConfig.from_recipe("fqt-psq-8"))
    with pytest.raises(TypeError, match=r"coverage's loss_fn takes the model's output alone \(loss_fn\(output\) -> "
                                        r"loss\), got a function of 2 required arguments; "
                                        r"lowbit.analysis.gradient_variance's takes \(model, batch\)"):
        coverage(m, torch.randn(2, 4), loss_fn=lambda model, batch: model(batch).sum())
    for fn in (lambda out: out.sum(), torch.sum, torch.randn(1).new_tensor(0.0).add, lambda out, scale=2.0: out.sum()):
        assert isinstance(coverage(m, torch.randn(2, 4), loss_fn=lambda out, f=fn: f(out).sum()), CoverageReport)

    def against(target):  # noqa: ANN001, ANN202 - a decorator-made loss of the output alone
        def deco(fn):  # noqa: ANN001, ANN202
            @functools.wraps(fn)
            def loss(out):  # noqa: ANN001, ANN202
                return fn(out, target)
            return loss
        return deco

    # its signature is loss(out), not the wrapped F.mse_loss(input, target) (a review)
    assert isinstance(coverage(m, torch.randn(2, 4), loss_fn=against(torch.zeros(2, 4))(F.mse_loss)), CoverageReport)

    def logged(fn):  # noqa: ANN001, ANN202 - a pass-through decorator: (*args, **kwargs)
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return fn(*args, **kwargs)
        return wrapper

    # what a pass-through wrapper passes on to counts (a second review)
    for two in (logged(lambda model, batch: model(batch).sum()), torch.compile(lambda model, batch: 0)):
        with pytest.raises(TypeError, match="got a function of 2 required arguments"):
            coverage(m, torch.randn(2, 4), loss_fn=two)
    assert isinstance(coverage(m, torch.randn(2, 4), loss_fn=logged(lambda out: out.sum())), CoverageReport)


@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fqt-bhq-4", "fqt-hadamard-fp8"])
def test_flop_counter_mode_counts_a_converted_model_as_the_float_one(recipe: str) -> None:
    """torch's ``FlopCounterMode`` saw a converted layer as the opaque ops
    ``lowbit::block_forward``/``block_backward`` and counted 0 FLOPs for every converted
    model: an MFU silently wrong. With their formulas it counts what the float model's
    GEMMs count, exactly (a CNN with a strided convolution, a Conv1d, linear layers; the
    ∇x of the first layer wanted and not), and lowbit's attention its batched products as
    they run: 2 forward, 5 backward (its backward recomputes ``QKᵀ``), each
    ``2·B·H·L·S·d``."""
    from torch.utils.flop_counter import FlopCounterMode

    from lowbit.functional import scaled_dot_product_attention

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.depthwise = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
            self.conv1d = nn.Conv1d(8, 8, 3, padding=1, groups=2)
            self.head = nn.Sequential(nn.Linear(8 * 64, 64), nn.GELU(), nn.Linear(64, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.depthwise(torch.relu(self.conv(x)))).flatten(2)
            return self.head(torch.relu(self.conv1d(h)).flatten(1))

    def count(model: nn.Module, x: torch.Tensor) -> int:
        with FlopCounterMode(display=False) as fc:
            model(x).square().mean().backward()
        return fc.get_total_flops()

    for grad_x in (True, False):
        torch.manual_seed(0)
        model = Net()
        x = torch.randn(16, 3, 16, 16, requires_grad=grad_x)
        want = count(model, x)
        assert want > 0
        assert count(lowbit.convert(copy.deepcopy(model), lowbit.FQTConfig.from_recipe(recipe, seed=1)), x) == want
    b, h, length, d = 1, 4, 128, 64
    q, k, v = (torch.randn(b, h, length, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        scaled_dot_product_attention(q, k, v, is_causal=True, state=lowbit.FQTConfig.from_recipe(recipe, seed=2)) \
            .square().sum().backward()
    assert fc.get_total_flops() == 7 * 2 * b * h * length * length * d
