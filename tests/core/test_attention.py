"""Low-bit attention (issue 13, item 3; docs/METHOD.md §7): the forward equals its simulated
reference exactly, the QAT backward is the gradient of the forward-quantized attention,
the FQT gradients are unbiased estimates of it, the integer path equals the reference,
masks / causal / GQA / dropout / checkpointing behave as torch's, and convert swaps
nn.MultiheadAttention, the Transformer layers and TinyGPT's attention."""

from __future__ import annotations

import copy
import dataclasses
import fractions
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_unbiased
from torch import nn

import lowbit
import lowbit.attention as A
from lowbit.kernels import avx512
import lowbit.attention_modules as AM
from lowbit import FQTConfig, OperandSpec
from lowbit.attention import Operand, batched_mm, scaled_dot_product_attention
from lowbit.config import Backend
from lowbit.functional import block_state, quantize_forward
from lowbit.ops import gradient_only_double_backward

FQT = FQTConfig.from_recipe("fqt-psq-8", seed=0)
B, H, L, S, E, EV = 2, 4, 6, 5, 8, 3


def qkv(heads_kv: int = H, grad: bool = True, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, E, generator=g)
    k = torch.randn(B, heads_kv, S, E, generator=g)
    v = torch.randn(B, heads_kv, S, EV, generator=g)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def qat(config: FQTConfig) -> FQTConfig:
    return dataclasses.replace(config, grad_input=None, grad_weight=None)


# -- the simulated reference, written out with autograd -----------------------------------------
class _STE(torch.autograd.Function):
    """``c·Q_f(t)`` (``c`` folded into the steps, as lowbit.attention does for Q) with the
    straight-through gradient of ``c·t``; Q_f over the whole tensor, a row per (batch,
    head, token)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, spec: OperandSpec, c: float) -> torch.Tensor:
        ctx.c = c
        q = quantize_forward(t.reshape(-1, t.shape[-1]), spec)
        return (q.codes * (q.step * c)).reshape(t.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple:
        return g * ctx.c, None, None


def deq(t: torch.Tensor, spec: OperandSpec, c: float = 1.0) -> torch.Tensor:
    return _STE.apply(t, spec, c)


def reference(q, k, v, mask=None, causal=False, gqa=False, dropout_p=0.0, spec=OperandSpec(8)):  # noqa: B008
    """P = softmax(c·Q_f(Q)Q_f(K)ᵀ + M), O = Q_f(P̃)·Q_f(V): plain torch, autograd through
    straight-through quantizers (the QAT gradient); dropout draws as attention_forward."""
    if gqa:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    scores = deq(q, spec, 1.0 / math.sqrt(q.shape[-1])) @ deq(k, spec).mT
    if mask is not None:
        scores = scores + mask
    dead = (scores == float("-inf")).all(-1, keepdim=True)  # fully masked rows: P = 0
    probs = torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    if dropout_p:
        keep = torch.empty(probs.reshape(-1, *probs.shape[-2:]).shape).bernoulli_(1 - dropout_p)
        probs = probs * keep.bool().reshape(probs.shape) * (1 / (1 - dropout_p))
    return deq(probs, spec) @ deq(v, spec)


def float_mask() -> torch.Tensor:
    m = torch.randn(B, 1, L, S, generator=torch.Generator().manual_seed(3))
    m[0, 0, 2] = float("-inf")  # a fully masked row
    return m


CASES = {  # name: (kwargs of attention, kv heads)
    "plain": ({}, H),
    "causal": ({"is_causal": True}, H),
    "bool-mask": ({"attn_mask": torch.rand(L, S, generator=torch.Generator().manual_seed(1)) > 0.4}, H),
    "float-mask": ({"attn_mask": float_mask()}, H),
    "gqa": ({"enable_gqa": True, "is_causal": True}, 2),
    "mqa": ({"enable_gqa": True}, 1),
}


def _ref_kwargs(kw: dict) -> dict:
    return {"mask": kw.get("attn_mask"), "causal": kw.get("is_causal", False), "gqa": kw.get("enable_gqa", False)}


@pytest.mark.parametrize("granularity", ["tensor", "row"])
@pytest.mark.parametrize("case", list(CASES))
def test_forward_equals_simulated_reference_exactly(case: str, granularity: str) -> None:
    kw, heads = CASES[case]
    spec = OperandSpec(8, granularity)
    cfg = dataclasses.replace(FQT, activation=spec, backend="reference")
    q, k, v = qkv(heads, grad=False)
    got = scaled_dot_product_attention(q, k, v, state=cfg, **kw)
    assert torch.equal(got, reference(q, k, v, spec=spec, **_ref_kwargs(kw)))
    if case == "float-mask":
        assert torch.equal(got[0, 0, 2], torch.zeros(EV))  # fully masked row → 0, as torch


@pytest.mark.parametrize("case", list(CASES) + ["dropout"])
def test_qat_backward_is_the_gradient_of_the_forward_quantized_attention(case: str) -> None:
    kw, heads = CASES.get(case, ({"dropout_p": 0.3, "attn_mask": float_mask()}, H))
    mask = kw.get("attn_mask")
    if mask is not None and mask.is_floating_point():
        kw = {**kw, "attn_mask": mask.clone().requires_grad_()}
    q, k, v = qkv(heads)
    w = torch.randn(B, H, L, EV, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(5)
    out = scaled_dot_product_attention(q, k, v, state=qat(FQT), **kw)
    inputs = (q, k, v) + ((kw["attn_mask"],) if mask is not None and mask.is_floating_point() else ())
    got = torch.autograd.grad((out * w).sum(), inputs)
    torch.manual_seed(5)
    ref = reference(q, k, v, dropout_p=kw.get("dropout_p", 0.0), **_ref_kwargs(kw))
    assert torch.equal(out, ref)
    want = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(got, want):
        # the same math, different float32 operation order (softmax backward written out,
        # batched GEMMs of dequantized codes vs autograd's): a few ulps of the largest value
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("quantizer", ["ptq", "psq", "bhq", "hadamard"])
def test_fqt_gradients_are_unbiased_for_the_qat_gradients(quantizer: str) -> None:
    """∇Q, ∇K, ∇V and ∇mask: E[FQT] = QAT, a 5σ z-test over 300 draws (conftest), with
    GQA, a float mask (differentiable, one row fully masked) and dropout (the same mask
    in every draw: the global RNG is reseeded before each forward)."""
    cfg = FQTConfig.from_recipe(f"fqt-{quantizer}-4", seed=0)
    q, k, v = qkv(2)
    mask = float_mask().requires_grad_()
    w = torch.randn(B, H, L, EV, generator=torch.Generator().manual_seed(9))
    kw = dict(attn_mask=mask, dropout_p=0.2, enable_gqa=True)

    def grads(state) -> torch.Tensor:
        torch.manual_seed(7)
        out = scaled_dot_product_attention(q, k, v, state=state, **kw)
        return torch.cat([g.flatten() for g in torch.autograd.grad((out * w).sum(), (q, k, v, mask))])

    exact = grads(qat(cfg))
    state = block_state(cfg)  # one noise stream: every backward call draws fresh noise
    draws = torch.stack([grads(state) for _ in range(300)])
    assert state.noise.counter == 300
    assert not torch.equal(draws[0], draws[1]), "draws must differ (fresh SR noise)"
    assert_unbiased(draws, exact)


def test_bhq_attention_on_integer_heads_is_unbiased() -> None:
    """BHQ's per-head groups with ``backend='int8'``: each head's integer GEMM, then
    ``T⁻¹`` on the product's rows — E[FQT] = QAT for ∇Q, ∇K, ∇V (a 5σ z-test over 300
    draws, conftest), causal, at 4 bits (the test above runs these small heads simulated
    under ``auto``; a review)."""
    cfg = FQTConfig.from_recipe("fqt-bhq-4", seed=0, backend="int8")
    q, k, v = qkv(2)
    w = torch.randn(B, H, L, EV, generator=torch.Generator().manual_seed(9))

    def grads(state) -> torch.Tensor:
        out = scaled_dot_product_attention(q, k, v, state=state, is_causal=True, enable_gqa=True)
        return torch.cat([g.flatten() for g in torch.autograd.grad((out * w).sum(), (q, k, v))])

    exact = grads(qat(cfg))
    state = block_state(cfg)
    draws = torch.stack([grads(state) for _ in range(300)])
    assert not torch.equal(draws[0], draws[1])
    assert_unbiased(draws, exact)


def test_a_quantizer_overriding_quantize_without_entries_still_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's quantizer whose ``quantize`` override has the signature from before
    ``entries`` existed runs in a Linear and in attention (a review: the new argument was
    passed to it positionally, a TypeError everywhere); attention then gives it the whole
    operand, as before. A quantizer that takes ``entries`` gets the heads."""
    from lowbit.quantizers import QUANTIZERS
    from lowbit.quantizers.bhq import BHQ

    seen = []

    class Old(BHQ):
        def quantize(self, a, fmt, generator=None, rounding="stochastic", backend="auto", tracker=None):  # noqa: ANN001, ANN201
            seen.append("old")
            return super().quantize(a, fmt, generator, rounding, backend, tracker)

    class New(BHQ):
        def quantize(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            seen.append(kwargs.get("entries"))
            return super().quantize(*args, **kwargs)

    for name, cls in (("old_bhq", Old), ("new_bhq", New)):
        monkeypatch.setitem(QUANTIZERS, name, cls())
        cfg = dataclasses.replace(FQT, grad_input=lowbit.GradSpec(8, name))
        seen.clear()
        q, k, v = qkv()
        scaled_dot_product_attention(q, k, v, state=cfg).sum().backward()
        layer = lowbit.convert(nn.Linear(4, 3), cfg)
        layer(torch.randn(5, 4, requires_grad=True)).sum().backward()
        assert seen == (["old"] * 3 if name == "old_bhq" else [B * H, B * H, None]), (name, seen)


def test_gradient_operands_are_quantized_independently(monkeypatch: pytest.MonkeyPatch) -> None:
    """∇O and ∇S are each quantized twice, by distinct generators, with the rows of each
    on its GEMM's non-summed dimension: ∇O (B·L, Ev) and ∇Oᵀ (B·Ev, L), ∇S (B·L, S) and
    ∇Sᵀ (B·S, L) — the transposes' PSQ from the batch as it lies
    (``gradpair.quantize_grad_w``, or alongside BHQ's rows per head:
    ``gradpair.quantize_grad_pair_mixed`` with the entries)."""
    seen = []
    real, real_w, real_mixed = A.quantize_gradient, A.quantize_grad_w, A.gradpair.quantize_grad_pair_mixed

    def spy_mixed(gy, spec_a, gen_a, spec_w, gen_w, k, entries=None, w_first=False):
        out = real_mixed(gy, spec_a, gen_a, spec_w, gen_w, k, entries, w_first)
        assert out is not None and entries == B * H  # BHQ's groups per head
        n = gy.shape[0] // entries
        seen.append((tuple(gy.shape), spec_a.quantizer, gen_a.initial_seed()))
        seen.append(((entries * gy.shape[1], n), spec_w.quantizer, gen_w.initial_seed()))
        assert tuple(out[0].codes.shape) == tuple(gy.shape) and tuple(out[1].codes.shape) == (entries * gy.shape[1], n)
        return out

    def spy(a, spec, gen, backend, tracker=None, entries=None):
        seen.append((tuple(a.shape), spec.quantizer, gen.initial_seed()))
        assert entries == B * H  # the rows are the heads' (BHQ's groups per head)
        return real(a, spec, gen, backend, tracker, entries)

    def spy_w(a, spec, gen, k, batched=False):
        out = real_w(a, spec, gen, k, batched)
        if out is not None:  # each entry's transpose: (B·C, N) of a (B, N, C)
            seen.append(((a.shape[0] * a.shape[2], a.shape[1]), spec.quantizer, gen.initial_seed()))
        return out

    monkeypatch.setattr(A, "quantize_gradient", spy)
    monkeypatch.setattr(A, "quantize_grad_w", spy_w)
    monkeypatch.setattr(A.gradpair, "quantize_grad_pair_mixed", spy_mixed)
    q, k, v = qkv()
    scaled_dot_product_attention(q, k, v, state=FQTConfig.from_recipe("fqt-bhq-5", seed=0)).sum().backward()
    bh = B * H
    assert sorted(s[:2] for s in seen) == sorted([
        ((bh * EV, L), "psq"), ((bh * L, EV), "bhq"), ((bh * L, S), "bhq"), ((bh * S, L), "psq")])
    assert len({s[2] for s in seen}) == 4


# -- the integer path ------------------------------------------------------------------------------
def test_per_head_integer_gemm_is_the_exact_integer_product() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (3, 5, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (3, 7, 64), dtype=torch.int8, generator=g)
    sa, sb = torch.rand(3, 5, 1, generator=g), torch.rand(3, 7, 1, generator=g)
    got = batched_mm(Operand(a, sa), Operand(b, sb).mT, Backend.INT8, torch.float32, "test")
    acc = (a.double() @ b.double().mT).float()  # exact: |sum| < 2²⁴
    assert torch.equal(got, acc * sa * sb.mT)


def test_left_scale_on_the_summed_dimension_is_never_integer(monkeypatch: pytest.MonkeyPatch) -> None:
    """A left operand whose steps run along the summed dimension ((B, 1, K): a transposed
    per-row operand) cannot be factored out of an integer sum: ``auto`` runs that GEMM
    simulated (the dequantized product), ``int8`` refuses it."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (3, 5, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (3, 64, 7), dtype=torch.int8, generator=g)
    sa, sb = torch.rand(3, 1, 64, generator=g), torch.rand(3, 1, 7, generator=g)
    monkeypatch.setattr(A, "LOOP_MIN_MACS", 1)
    got = batched_mm(Operand(a, sa), Operand(b, sb), Backend.AUTO, torch.float32, "test")
    want = (a.double() * sa.double()) @ (b.double() * sb.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    with pytest.raises(ValueError, match="cannot compute attention's test GEMM per head"):
        batched_mm(Operand(a, sa), Operand(b, sb), Backend.INT8, torch.float32, "test")


@pytest.mark.usefixtures("int_mm_engine")
def test_integer_path_equals_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.kernels import amx

    calls = []
    real = torch._int_mm  # every head's product, whichever lowbit function issues it
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    real_bmm = amx.int_bmm  # on AMX, a batch of heads per call
    monkeypatch.setattr(amx, "int_bmm", lambda a, b: calls.extend([1] * a.shape[0]) or real_bmm(a, b))
    out = {}
    for backend in ("int8", "reference"):
        q, k, v = qkv()
        o = scaled_dot_product_attention(q, k, v, is_causal=True,
                                         state=block_state(dataclasses.replace(FQT, backend=backend)))
        o.backward(torch.linspace(-1, 1, EV).expand_as(o))
        out[backend] = (o, q.grad, k.grad, v.grad)
    # QKᵀ twice (the backward recomputes P from the saved codes), P·V, ∇P, ∇V, ∇Q, ∇K
    assert len(calls) == 7 * B * H, "every head's seven products on _int_mm or the AMX batch"
    for a, b in zip(out["int8"], out["reference"]):
        # same random stream; exact integer sums vs float32 sums: float rounding only
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.detach().abs().max()))


def test_integer_and_reference_differ_only_by_flipped_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The integer and float sums of a GEMM round differently; a quantizer reading a
    result derived from one (∇O = 2·O of the loss ΣO², ∇S from ∇P) can then flip a
    stochastic-rounding decision: the two paths' gradient codes differ by one grid step
    in a few elements, never more; ∇O's row scales agree to float rounding, ∇S's may
    shift (below 1/127, see below) (README, "Both paths draw the same …"). 4 query heads
    of 128×64 over 2 key/value heads of 128×64 (GQA): each ∇O operand has 32,768 codes
    and each ∇S operand 65,536; with these seeds flips occur (0, 1, 3, 3 per operand)."""
    seen: dict[str, list[Operand]] = {}
    real = A.batched_product  # every GEMM of the attention, before its epilogue
    order = ("∇V", "∇P", "∇Q", "∇K")

    def gradient_operand(a: Operand, b: Operand, backend: Backend, dtype: torch.dtype, what: str,
                         got: dict[str, Operand]) -> tuple:
        if what in order:  # the quantized gradient is the left operand of these four
            assert what not in got  # one GEMM each (∇P in one piece at this size)
            got[what] = a
        return real(a, b, backend, dtype, what)

    for backend in ("int8", "reference"):
        got: dict[str, Operand] = {}
        monkeypatch.setattr(A, "batched_product", lambda *a, got=got: gradient_operand(*a, got=got))
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(*shape, generator=g).requires_grad_()
                   for shape in ((1, 4, 128, 64), (1, 2, 128, 64), (1, 2, 128, 64)))
        cfg = FQTConfig.from_recipe("fqt-psq-8", backend=backend, seed=1)
        scaled_dot_product_attention(q, k, v, enable_gqa=True, state=block_state(cfg)).square().sum().backward()
        seen[backend] = [got[w] for w in order]
    flips = []  # per operand, in call order: ∇Oᵀ (∇V), ∇O (∇P), ∇S (∇Q), ∇Sᵀ (∇K)
    for i, (a, b) in enumerate(zip(seen["int8"], seen["reference"], strict=True)):
        rel = float(((a.step - b.step).abs() / b.step).max())
        # ∇O = 2·O: its row maxima carry O's float rounding. ∇S = P ⊙ (∇P − rowsum(∇P ⊙ P))
        # cancels, which magnifies ∇P's rounding in a row's maximum (0.18% in this case);
        # below 1/127 a code x/step moves by less than one, so by at most one step
        assert rel < (1e-5 if i < 2 else 1 / 127), (i, rel)
        diff = (a.codes.int() - b.codes.int()).abs()
        assert int(diff.max()) <= 1  # at most one step
        flips.append(int(diff.sum()))
    assert len(flips) == 4 and sum(flips) > 0, flips  # the case this test is about occurs
    assert all(f < 1e-3 * 32_768 for f in flips), flips


@pytest.mark.usefixtures("int_mm_engine")
def test_auto_backend_loops_heads_only_when_large(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.kernels import amx

    calls = []
    real = torch._int_mm  # every head's product, whichever lowbit function issues it
    monkeypatch.setattr(torch, "_int_mm", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    real_bmm = amx.int_bmm  # on AMX, a batch of heads per call
    monkeypatch.setattr(amx, "int_bmm", lambda a, b: calls.extend([1] * a.shape[0]) or real_bmm(a, b))
    q, k, v = qkv(grad=False)
    scaled_dot_product_attention(q, k, v, state=FQT)
    assert calls == []  # 6×5×8 per head: one batched (simulated) GEMM
    monkeypatch.setattr(A, "LOOP_MIN_MACS", 1)
    scaled_dot_product_attention(q, k, v, state=FQT)
    assert len(calls) == 2 * B * H


@pytest.mark.parametrize("what, cfg, message", [
    ("hadamard", FQTConfig.from_recipe("fqt-hadamard-8", backend="int8"),  # 64-row blocks over heads of 6
     "backend='int8' cannot compute attention's ∇P GEMM per head (an operand has a row "
     "transform (BlockHadamard) that mixes rows of different heads); use backend='auto' "
     "(simulated there)"),
    ("per-row V", dataclasses.replace(FQT, activation=OperandSpec(8, "row"), backend="int8"),
     "backend='int8' cannot compute attention's P·V GEMM per head (a scale on the summed "
     "dimension, or shapes the integer kernel refuses); use backend='auto' (simulated there)"),
    ("fp8", FQTConfig.from_recipe("fp8-tensorwise", backend="fp8"),  # a review: it blamed scales
     "backend='fp8' cannot compute attention's Q·Kᵀ GEMM per head (lowbit's attention has no "
     "FP8 kernel); use backend='auto' (simulated there)"),
])
def test_int8_backend_refuses_what_it_cannot_run(what: str, cfg: FQTConfig, message: str) -> None:
    """The refusal names the cause coverage gives for the same product (``_why_simulated``)."""
    q, k, v = qkv()
    with pytest.raises(ValueError) as err:
        scaled_dot_product_attention(q, k, v, state=cfg).sum().backward()
    assert str(err.value) == message


def _hadamard_operand(rows: int, cols: int, seed: int = 0) -> Operand:
    from lowbit.config import GradSpec
    from lowbit.functional import quantize_gradient

    g = torch.Generator().manual_seed(seed)
    a = torch.randn(3, rows, cols, generator=g) * torch.exp(torch.randn(3, rows, 1, generator=g))
    q = quantize_gradient(a.reshape(-1, cols), GradSpec(8, "hadamard"), g, Backend.AUTO)
    return Operand.of(q, (3, rows, cols), torch.float32)


def test_hadamard_blocks_within_heads_run_integer_then_the_inverse() -> None:
    """A Hadamard-quantized gradient whose 64-row blocks divide each head's rows keeps its
    codes and transform: the heads' integer GEMMs, then ``T⁻¹`` on the product's rows,
    equal the simulated product (``T⁻¹`` of the dequantized codes, times the right operand)
    to float rounding; a batch range of it gives the same rows bit for bit. Blocks that
    do not divide the rows (40 here) make the operand values (simulated)."""
    a = _hadamard_operand(128, 40)
    assert a.codes is not None and a.transform is not None
    g = torch.Generator().manual_seed(1)
    b = Operand(torch.randint(-127, 128, (3, 40, 64), dtype=torch.int8, generator=g),
                torch.rand(3, 1, 64, generator=g) * 0.01)
    got = batched_mm(a, b, Backend.INT8, torch.float32, "test")
    want = a.simulated().double() @ (b.codes.double() * b.step.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    assert torch.equal(batched_mm(a.entries(1, 3), b.entries(1, 3), Backend.INT8, torch.float32, "test"), got[1:3])
    scaled = batched_mm(a.scaled(0.5), b, Backend.AUTO, torch.float32, "test")
    torch.testing.assert_close(scaled, got * 0.5, rtol=1e-6, atol=0)
    assert torch.equal(batched_mm(a, b, Backend.REFERENCE, torch.float32, "test"), torch.matmul(
        a.simulated(), b.dequantize(torch.float32)))  # the reference backend: simulated
    unaligned = _hadamard_operand(40, 40)
    assert unaligned.codes is None and unaligned.values is not None


def test_hadamard_product_near_float32_max_stays_finite() -> None:
    """Rows the transform concentrates (every row of a 64-row block equal after the signs:
    ``H·D·x`` puts √64 = 8 times a row into one row) at a scale where the transform runs
    in float64: the product ``T·(a @ b)`` exceeds float32 before ``T⁻¹`` brings it back,
    so it is formed in the steps' float64 — finite, as the simulated path is (review
    finding: it was formed in float32 and overflowed)."""
    from lowbit.config import GradSpec
    from lowbit.functional import quantize_gradient

    def quant(x: torch.Tensor):  # noqa: ANN202
        return quantize_gradient(x, GradSpec(8, "hadamard"), torch.Generator().manual_seed(5), Backend.AUTO)

    row = torch.randn(1, 40, generator=torch.Generator().manual_seed(1))
    signs = quant(torch.randn(256, 40)).transform.signs  # the same draw for any 256-row operand
    b = Operand(torch.randint(-127, 128, (2, 40, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(2)),
                torch.full((2, 1, 64), 0.01))
    for s in (1e36, 2e37):
        q = quant(((signs[:, None] * row).double() * s).float())
        a = Operand.of(q, (2, 128, 40), torch.float32)
        assert a.transform is not None and q.scale.dtype == torch.float64
        exact = q.dequantize(torch.float64).reshape(2, 128, 40) @ (b.codes.double() * b.step.double())
        got = batched_mm(a, b, Backend.AUTO, torch.float32, "test")
        assert got.dtype == torch.float32 and bool(got.isfinite().all())
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-6 * float(exact.abs().max()))


@pytest.mark.parametrize("recipe, rtols", [("fqt-hadamard-8", (1e-5, 1e-5, 3e-3, 1e-5)),
                                           ("fqt-bhq-8", (1e-5, 1e-5, 3e-3, 1e-5))])
def test_row_mixing_attention_runs_every_product_on_integer_kernels(
        monkeypatch: pytest.MonkeyPatch, recipe: str, rtols: tuple[float, ...]) -> None:
    """fqt-hadamard-8 (64-row blocks within each head) and fqt-bhq-8 (groups per head) on
    heads of 128 × 64: all seven products integer (no simulated
    GEMM), ``backend="int8"`` accepts it, the result equals the reference backend's to
    the rounding of the sums (∇K's tolerance: ∇S cancels, and one flipped code is
    spread by the transform over its block of 64 rows; see the flipped-codes test), and
    computing ∇P in pieces (``CHUNK_SCORES``) gives the same bits."""
    from lowbit.kernels import int8

    calls = []
    real = int8.int_mm_batched
    monkeypatch.setattr(int8, "int_mm_batched", lambda a, b: calls.append(1) or real(a, b))

    def run(backend: str) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, 2, 128, 64, generator=g).requires_grad_() for _ in range(3))
        o = scaled_dot_product_attention(q, k, v, is_causal=True,
                                         state=block_state(FQTConfig.from_recipe(recipe, backend=backend, seed=1)))
        o.backward(torch.linspace(-1, 1, 64).expand_as(o))
        return o.detach(), q.grad, k.grad, v.grad

    fast = run("int8")
    assert len(calls) == 7
    ref = run("reference")
    for a, b, rtol in zip(fast, ref, rtols):
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))
    assert all(torch.equal(a, b) for a, b in zip(run("auto"), fast))
    monkeypatch.setattr(A, "CHUNK_SCORES", 128 * 128)  # ∇P one entry at a time
    assert all(torch.equal(a, b) for a, b in zip(run("auto"), fast))
    # lowbit.coverage counts the seven products as real int8 and the inverse transform's
    # own GEMM as the quantizer's (not as a float GEMM of the model)
    att = lowbit.ScaledDotProductAttention()
    model = lowbit.convert(nn.Sequential(att), FQTConfig.from_recipe(recipe, seed=1))
    x = torch.randn(1, 2, 128, 64, requires_grad=True)
    rep = lowbit.coverage(model[0], x, x, x, loss_fn=lambda out: out.square().mean())
    assert rep.float_share == 0.0 and rep.flops("simulated") == 0 and rep.flops("int8") == rep.total_flops > 0


# -- torch's semantics -------------------------------------------------------------------------------
def test_fp_recipe_and_no_state_are_torchs_attention() -> None:
    q, k, v = qkv(2, grad=False)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    for state in (None, FQTConfig.from_recipe("fp")):
        assert torch.equal(scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True,
                                                        state=state), want)


def test_masks_agree_with_each_other() -> None:
    q, k, v = qkv(grad=False)
    causal = torch.ones(L, S, dtype=torch.bool).tril()
    additive = torch.zeros(L, S).masked_fill(~causal, float("-inf"))
    outs = [scaled_dot_product_attention(q, k, v, state=FQT, **kw) for kw in
            ({"is_causal": True}, {"attn_mask": causal}, {"attn_mask": additive},
             {"attn_mask": causal.expand(B, H, L, S)})]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_dropout_mask_is_kept_for_backward_and_recomputed_by_checkpointing() -> None:
    from torch.utils.checkpoint import checkpoint

    grads = []
    for ckpt in (False, True):
        q, k, v = qkv()
        state = block_state(FQT)
        torch.manual_seed(11)
        fn = lambda *t, st=state: scaled_dot_product_attention(*t, dropout_p=0.5, state=st)  # noqa: E731
        out = checkpoint(fn, q, k, v, use_reentrant=False) if ckpt else fn(q, k, v)
        out.backward(torch.ones_like(out))
        grads.append((out, q.grad, k.grad, v.grad, state.noise.counter))
    assert all(torch.equal(a, b) for a, b in zip(grads[0][:4], grads[1][:4]))
    assert grads[0][4] == grads[1][4] == 1


def test_dtypes_autocast_and_nan() -> None:
    q, k, v = qkv(grad=False)
    want = scaled_dot_product_attention(q, k, v, state=FQT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = scaled_dot_product_attention(q, k, v, state=FQT)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    out = scaled_dot_product_attention(qb, kb, vb, state=FQT)
    out.float().sum().backward()
    assert out.dtype == qb.grad.dtype == kb.grad.dtype == vb.grad.dtype == torch.bfloat16
    q[0, 0, 0, 0] = float("nan")  # one NaN: its (per-tensor) group is NaN, never finite
    assert torch.isnan(scaled_dot_product_attention(q, k, v, state=FQT)).all()
    # ... also in a row the mask blocks entirely (torch: zeros only for -inf scores)
    assert torch.isnan(scaled_dot_product_attention(q, k, v, attn_mask=float_mask(), state=FQT)).all()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"is_causal": True, "attn_mask": torch.ones(L, S, dtype=torch.bool)}, RuntimeError,
     "scaled_dot_product_attention: explicit attn_mask should not be set when is_causal=True"),
    ({"dropout_p": 1.5}, ValueError, "dropout_p must be a number in [0, 1], got 1.5"),
    ({"attn_mask": torch.ones(3, S)}, RuntimeError,
     f"attn_mask of shape (3, {S}) cannot be broadcast to the attention scores' shape ({B}, {H}, {L}, {S})"),
    ({"attn_mask": torch.ones(L, S, dtype=torch.int64)}, TypeError,
     "attn_mask must be a bool or floating tensor, got torch.int64"),
    # a review: a 1-D or 0-d mask ran under a quantized recipe where torch (the fp recipe)
    # raises IndexError; a scale of the wrong type did not name the argument
    ({"scale": "a"}, TypeError, "scaled_dot_product_attention(): argument 'scale' must be float, not str"),
    # torch refuses these too; a learned scale would have lost its gradient silently (a second review)
    ({"scale": torch.tensor([0.5])}, TypeError,
     "scaled_dot_product_attention(): argument 'scale' must be float, not a 1-d tensor"),
    ({"scale": torch.tensor(0.5, requires_grad=True)}, TypeError,
     "scaled_dot_product_attention(): argument 'scale' must be float, not a 0-d tensor that requires grad"),
    ({"scale": fractions.Fraction(1, 2)}, TypeError,
     "scaled_dot_product_attention(): argument 'scale' must be float, not Fraction"),
])
def test_bad_arguments_raise_named_errors(kwargs: dict, error: type, message: str) -> None:
    q, k, v = qkv(grad=False)
    with pytest.raises(error) as err:
        scaled_dot_product_attention(q, k, v, state=FQT, **kwargs)
    assert str(err.value) == message


def test_shape_and_head_errors() -> None:
    q, k, v = qkv(grad=False)
    with pytest.raises(RuntimeError, match="^Expected query, key, and value to have the same dtype"):
        scaled_dot_product_attention(q, k.double(), v, state=FQT)
    with pytest.raises(RuntimeError, match=r"^enable_gqa: the query's heads \(4\) must be a multiple"):
        scaled_dot_product_attention(q, k[:, :3], v[:, :3], enable_gqa=True, state=FQT)
    with pytest.raises(RuntimeError, match="do not fit: query and key need the same feature size"):
        scaled_dot_product_attention(q, k[..., :3], v, state=FQT)


@pytest.mark.parametrize("activation, backend", [("tensor", "auto"), ("row", "auto"), ("tensor", "int8")])
def test_empty_inputs_give_torchs_result(activation: str, backend: str) -> None:
    """No query, key, batch or features: torch's empty or zero output and gradients,
    forward and backward — also with per-row activation steps (a new-user trial found the
    per-row step of an empty operand reshaped to (1, 1, 1)), and under the strict int8
    backend, which refused the empty products as GEMMs it could not run (a review)."""
    cfg = dataclasses.replace(FQT, activation=OperandSpec(8, activation), backend=Backend(backend))
    q, k, v = qkv(grad=False)
    if backend == "int8":  # E = 0: every score an empty sum, as under the auto backend
        auto = scaled_dot_product_attention(q[..., :0], k[..., :0], v, state=dataclasses.replace(cfg, backend=Backend.AUTO))
        got = scaled_dot_product_attention(q[..., :0], k[..., :0], v, state=cfg)
        # P·V on integer kernels here, simulated there (small heads): float rounding apart
        torch.testing.assert_close(got, auto, rtol=1e-6, atol=1e-6)
    for args in ((q[:, :, :0], k, v), (q, k[:, :, :0], v[:, :, :0]), (q[:0], k[:0], v[:0])):
        ours = [t.detach().clone().requires_grad_() for t in args]
        theirs = [t.detach().clone().requires_grad_() for t in args]
        want = F.scaled_dot_product_attention(*theirs)
        got = scaled_dot_product_attention(*ours, state=cfg)
        assert got.shape == want.shape and torch.equal(got, want)
        got.sum().backward()
        want.sum().backward()
        for a, b in zip(ours, theirs):
            assert a.grad.shape == b.grad.shape and torch.equal(a.grad, b.grad)


def test_zero_feature_queries_attend_uniformly_as_in_torch() -> None:
    """E = 0: every score is an empty sum (0), so the weights are uniform whatever the
    scale; torch's default scale 1/√E must not divide by zero (new-user trial)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 0), torch.randn(1, 2, 4, 0), torch.randn(1, 2, 4, 5)
    want = F.scaled_dot_product_attention(q, k, v)
    got = scaled_dot_product_attention(q, k, v, state=FQT)
    # uniform weights 1/4 are exact codes; each of v's 8-bit codes (round-to-nearest, one
    # step max|v|/127) is within half a step of v, so their mean too (+ float32 slack)
    half_step = v.abs().max().item() / 254
    torch.testing.assert_close(got, want, atol=half_step * (1 + 1e-5), rtol=0)
    assert torch.equal(got, scaled_dot_product_attention(q, k, v, scale=7.0, state=FQT))


@pytest.mark.parametrize("shape", [(2, 0, 8), (0, 3, 8)])
def test_multihead_attention_empty_sequence_or_batch(shape: tuple[int, ...]) -> None:
    """A (batch-first) zero-length sequence or empty batch gives torch's empty output
    (the out-projection's ``view(L, N, -1)`` failed on 0 elements), with masks too."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=True)
    mha = AM.FQTMultiheadAttention.from_float(ref, FQT, seed=0)
    x = torch.randn(*shape, requires_grad=True)
    kpm = torch.zeros(shape[0], shape[1], dtype=torch.bool)
    mask = torch.zeros(shape[0] * 2, shape[1], shape[1])
    for kw in ({}, {"key_padding_mask": kpm}, {"attn_mask": mask}):
        out, weights = mha(x, x, x, **kw)
        want, want_w = ref(x, x, x, **kw)
        assert out.shape == want.shape and weights.shape == want_w.shape
        out.sum().backward()
        assert x.grad.shape == x.shape


# -- modules and convert -----------------------------------------------------------------------------
def _float_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """FQTMultiheadAttention's GEMMs in float: F.linear and torch's attention."""
    def float_attention(q, k, v, mask=None, p=0.0, causal=False, scale=None, gqa=False, *,
                        state, need_weights=False):
        if not need_weights:
            return F.scaled_dot_product_attention(q, k, v, mask, p, causal), None
        w = torch.softmax(q @ k.mT / q.shape[-1] ** 0.5 + (0 if mask is None else mask), -1)
        return w @ v, w

    monkeypatch.setattr(AM, "fqt_linear", lambda x, w, b, state: F.linear(x, w, b))
    monkeypatch.setattr(AM, "attention", float_attention)


MHA_KW = {"packed": {}, "batch-first": {"batch_first": True}, "kdim-vdim": {"kdim": 6, "vdim": 5},
          "bias-kv-zero-attn": {"add_bias_kv": True, "add_zero_attn": True}, "no-bias": {"bias": False}}


@pytest.mark.parametrize("name", list(MHA_KW))
def test_multihead_attention_computes_what_torch_computes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With its GEMMs run in float, FQTMultiheadAttention's forward is torch's, for every
    option; so the quantized one is torch's with quantized GEMMs."""
    kw = MHA_KW[name]
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, **kw).eval()
    mha = AM.FQTMultiheadAttention.from_float(ref, FQT, seed=0, out_proj=False).eval()
    _float_kernels(monkeypatch)
    first = kw.get("batch_first", False)
    make = lambda n, d: torch.randn(3, n, d) if first else torch.randn(n, 3, d)  # noqa: E731
    q, k, v = make(L, 16), make(S, kw.get("kdim", 16)), make(S, kw.get("vdim", 16))
    kpm = torch.zeros(3, S, dtype=torch.bool)
    kpm[1, -2:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    blocked = torch.rand(3 * 4, L, S) < 0.3  # MultiheadAttention: True = may not attend
    blocked[..., 0] = False  # no fully masked row (torch's weights would be NaN there)
    calls = [((q, k, v), {}), ((q, k, v), {"key_padding_mask": kpm}),
             ((q, k, v), {"attn_mask": torch.randn(L, S), "need_weights": False}),
             ((q, k, v), {"attn_mask": blocked, "average_attn_weights": False}),
             ((q, k, v), {"key_padding_mask": kpm.float() * -1e4})]
    if "kdim" not in kw:
        calls += [((q, q, q), {}), ((q, k, k), {"need_weights": False}),
                  ((q, q, q), {"attn_mask": causal[:, :L], "is_causal": True, "need_weights": False})]
        unbatched = q[0] if first else q[:, 0]
        calls.append(((unbatched, unbatched, unbatched), {}))
    for args, kwargs in calls:
        got, want = mha(*args, **kwargs), ref(*args, **kwargs)
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)  # float32 op order
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)


def test_multihead_attention_converts_sharing_parameters_and_state_dict() -> None:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True)
    keys = list(ref.state_dict())
    params = dict(ref.named_parameters())
    model, report = lowbit.convert(ref, FQT, report=True)
    assert type(model) is AM.FQTMultiheadAttention and report.converted == ("", "out_proj")
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert type(model.out_proj) is lowbit.FQTLinear
    names = set(lowbit.rng_state(model))
    assert names == {"out_proj", "attention", *(f"projections.{r}" for r in ("qkv", "q", "kv", "k", "v"))}
    x = torch.randn(2, 5, 16, requires_grad=True)
    out, w = model(x, x, x)
    (out.sum() + w.sum()).backward()
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    again, report = lowbit.convert(model, FQTConfig.from_recipe("fqt-bhq-4", seed=1), report=True)
    assert again is model and report.converted == ("", "out_proj")
    assert model.attention.config == model.projections["qkv"].config == model.out_proj.config \
        == FQTConfig.from_recipe("fqt-bhq-4", seed=1)


class Mine(nn.MultiheadAttention):
    pass


def test_hooked_or_subclassed_multihead_attention_is_left_alone() -> None:
    hooked = nn.MultiheadAttention(8, 2)
    hooked.register_forward_hook(lambda m, i, o: o)
    for mha, why in ((Mine(8, 2), "Mine is a subclass of nn.MultiheadAttention: its own forward, "
                      "parameters or state would be lost"),
                     (hooked, "has forward hooks: the converted layer would not carry them")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, report = lowbit.convert(nn.Sequential(mha), FQT, report=True)
        assert model[0] is mha and report.skipped["0"] == why
        assert report.skipped["0.out_proj"] == lowbit.conversion.MHA_REASON


def test_coverage_of_multihead_attention_is_all_low_bit() -> None:
    torch.manual_seed(0)
    model = lowbit.convert(nn.MultiheadAttention(16, 2, batch_first=True), FQT)
    x = torch.randn(2, 5, 16, requires_grad=True)
    rep = lowbit.coverage(model, x, x, x, loss_fn=lambda out: out[0].square().mean())
    bt, e, h, hd = 10, 16, 2, 8
    gemm = 2 * (2 * h) * 5 * 5 * hd  # one attention GEMM: 2·(b·h)·L·S·hd
    in_proj, out_proj = 2 * bt * e * 3 * e, 2 * bt * e * e  # each of their three GEMMs
    assert rep.flops(phase="forward") == in_proj + 2 * gemm + out_proj
    # six attention GEMMs, plus QKᵀ again in the backward (P is recomputed, not saved)
    assert rep.total_flops == 3 * in_proj + 7 * gemm + 3 * out_proj
    assert rep.lowbit_share == 1.0 and rep.float_share == 0.0
    assert rep.flops("int8") == 3 * in_proj + 3 * out_proj  # projections: integer GEMMs
    assert rep.flops("simulated") == 7 * gemm  # small heads: one batched simulated GEMM each


def test_inplace_softmax_kernels_are_bitwise() -> None:
    """The attention writes softmax over its scores and softmax's backward over ∇P on the
    CPU (``attention._inplace_ok``): ATen reduces each row before writing it, so the
    results are the out-of-place ones bit for bit — pinned here for the torch in use."""
    g = torch.Generator().manual_seed(0)
    for shape in ((48, 64, 512), (3, 7, 33), (2, 5, 1000)):
        x = torch.randn(shape, generator=g) * 5
        x[0, 0, :3] = float("-inf")
        want = torch.softmax(x, -1)
        assert torch.equal(torch._softmax(x.clone(), -1, False, out=x), want)
        gp = torch.randn(shape, generator=g)
        want_g = torch._softmax_backward_data(gp, want, -1, torch.float32)
        assert torch.equal(torch._softmax_backward_data(gp, want, -1, torch.float32, grad_input=gp),
                           want_g)


def _qkv_heads(b: int = 2, h: int = 3, length: int = 40, hd: int = 8) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(b, h, length, hd, generator=g, requires_grad=True) for _ in range(3))


@pytest.mark.parametrize("mask", ["causal", "dropout", "padding-bool", "padding-float"])
def test_attention_saves_no_float_scores(mask: str) -> None:
    """Between forward and backward the attention keeps Q, K, V and P̃ as int8 codes (and
    dropout's keep mask as bool), never a float (B, L, S) tensor: the backward recomputes
    P from the codes (``attention_probs``); a per-batch mask shared by the heads
    (B, 1, L, S) is kept at its own size, not per head."""
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    q, k, v = _qkv_heads()
    b, h, length = q.shape[:3]
    pad = torch.ones(b, 1, length, length, dtype=torch.bool).tril()
    kw = {"causal": {"is_causal": True}, "dropout": {"is_causal": True, "dropout_p": 0.3},
          "padding-bool": {"attn_mask": pad},
          "padding-float": {"attn_mask": torch.zeros(b, 1, length, length).masked_fill(~pad, -1e4)}}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = scaled_dot_product_attention(q, k, v, state=dataclasses.replace(FQT), **kw[mask])
    scores = b * h * length ** 2  # elements of one (B·H, L, S) tensor
    floats = [(tuple(t.shape), t.untyped_storage().nbytes()) for t in saved
              if t.is_floating_point() and t.untyped_storage().nbytes() >= 4 * scores // 2]
    assert floats == []  # nothing float of half a score tensor's bytes or more
    assert sum(t.dtype == torch.int8 and t.numel() == scores for t in saved) == 1  # P̃'s codes
    assert sum(t.dtype == torch.bool for t in saved) == (1 if mask == "dropout" else 0)
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def _skip_without_pieces(expected: bool) -> None:
    """Skip a case that expects attention in pieces on a CPU without lowbit's AVX-512
    kernels, which the pieces need (``lowbit.attention``'s docstring, "Memory")."""
    if expected and not avx512.available():
        pytest.skip("attention in pieces needs lowbit's AVX-512 kernels, not available on this machine")


def _attention_grads(monkeypatch: pytest.MonkeyPatch, pieces: bool, cfg: FQTConfig, length: int, hd: int,
                     kw: dict, weights: bool = False, nan: bool = False) -> tuple[list[torch.Tensor], list[bool]]:
    """O, ∇Q, ∇K, ∇V (and the float mask's gradient) of one step of 2 × 3 heads, with the
    forward and the backward in pieces of two entries allowed (``pieces``) or not; which
    way each backward went (``A._in_pieces_ok``'s answers)."""
    asked: list[bool] = []
    ok = A._in_pieces_ok

    def spy(*args: object) -> bool:
        asked.append(ok(*args) if pieces else False)  # type: ignore[arg-type]
        return asked[-1]

    monkeypatch.setattr(A, "_in_pieces_ok", spy)
    if not pieces:
        monkeypatch.setattr(A, "_forward_in_pieces_ok", lambda *args: False)
    monkeypatch.setattr(A, "CHUNK_SCORES", 2 * length * length)
    q, k, v = _qkv_heads(length=length, hd=hd)
    if nan:
        with torch.no_grad():
            q[1, 2, 3, 4] = float("nan")
    mask = kw.get("attn_mask")
    mask = mask.detach().clone().requires_grad_(mask.requires_grad) if mask is not None else None
    torch.manual_seed(5)  # dropout's keep mask
    out, w = A.attention(q, k, v, mask, kw.get("dropout_p", 0.0), kw.get("is_causal", False),
                         state=block_state(cfg), need_weights=weights)
    loss = out.square().sum() + (0 if w is None else (w * torch.arange(w.shape[-1])).sum())
    loss.backward()
    grads = [out.detach(), *(t.grad for t in (q, k, v))] + ([mask.grad] if mask is not None and mask.requires_grad
                                                             else [])
    return grads, asked


def _masks(length: int) -> dict[str, dict]:
    pad = torch.ones(2, 1, length, length, dtype=torch.bool).tril()
    additive = torch.zeros(2, 1, length, length).masked_fill(~pad, -1e4)
    return {"none": {}, "causal": {"is_causal": True}, "dropout": {"is_causal": True, "dropout_p": 0.3},
            "bool-per-batch": {"attn_mask": pad}, "float-expanded": {"attn_mask": additive.expand(2, 3, -1, -1)},
            "float-one": {"attn_mask": additive[0, 0]},
            # a bias per query, broadcast over the keys (stride 0): a review found its pieces
            # on the native softmax and the whole batch on ATen's (not bitwise)
            "float-per-query": {"attn_mask": torch.linspace(-2, 2, 2 * length).reshape(2, 1, length, 1)},
            "float-learned": {"attn_mask": additive.clone().requires_grad_()}}


@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fqt-ptq-8"])
@pytest.mark.parametrize("heads", [(40, 8), (64, 64)], ids=["simulated", "integer"])
@pytest.mark.parametrize("mask", ["none", "causal", "dropout", "bool-per-batch", "float-expanded",
                                  "float-one", "float-per-query", "float-learned", "need-weights"])
def test_backward_in_pieces_is_bitwise_the_whole_backward(monkeypatch: pytest.MonkeyPatch, recipe: str,
                                                          heads: tuple[int, int], mask: str) -> None:
    """With per-row gradient scales (PSQ) the backward recomputes P, forms ∇S, quantizes it
    and multiplies two entries at a time (``_grad_qk_in_pieces``): the same bits as the
    backward that forms the whole ∇S first, on the same noise stream, for every kind of
    mask, dropout and P̃'s own gradient (``need_weights``). Per-tensor scales (PTQ) and a
    mask that wants its gradient keep the whole ∇S (its scale and its gradient span every
    entry)."""
    length, hd = heads
    pieces = mask != "float-learned" and recipe == "fqt-psq-8" and hd == 64
    _skip_without_pieces(pieces)
    kw = _masks(length).get(mask, {"is_causal": True})
    cfg = FQTConfig.from_recipe(recipe, seed=0)
    got, asked = _attention_grads(monkeypatch, True, cfg, length, hd, kw, weights=mask == "need-weights")
    want, _ = _attention_grads(monkeypatch, False, cfg, length, hd, kw, weights=mask == "need-weights")
    # a mask's gradient: never asked; small heads (simulated GEMMs) and PTQ: the whole ∇S
    assert asked == ([] if mask == "float-learned" else [pieces])
    assert len(got) == len(want) == (5 if mask == "float-learned" else 4)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("activation", ["tensor", "row", "e4m3"])
@pytest.mark.parametrize("mask", ["none", "causal", "bool-per-batch", "float-expanded", "float-per-query", "nan",
                                  "all-masked"])
def test_forward_in_pieces_is_bitwise_the_whole_forward(monkeypatch: pytest.MonkeyPatch, activation: str,
                                                        mask: str) -> None:
    """The forward forms P, its codes and P̃·V two entries at a time (``_forward_in_pieces``;
    per tensor after a first pass for P's absmax): the output, the saved codes and so the
    gradients are bitwise those of the whole forward, per tensor and per row (E4M3 codes run
    simulated: the whole forward). Per tensor, a NaN in the queries or every key masked hands the call to the whole forward
    (the same NaN output and zero rows as always); per row the pieces keep it, NaN rows
    staying NaN and the other rows' bits unchanged."""
    _skip_without_pieces(activation != "e4m3")
    cfg = FQTConfig.from_recipe("fqt-psq-fp8", seed=0) if activation == "e4m3" else FQT
    if activation == "row":
        cfg = dataclasses.replace(cfg, activation=dataclasses.replace(cfg.activation,
                                                                      granularity=cfg.activation.granularity.ROW))
    kw = _masks(128).get(mask, {})
    if mask == "all-masked":
        kw = {"attn_mask": torch.zeros(128, 128, dtype=torch.bool)}
    called: list[object] = []
    real = A._forward_in_pieces
    monkeypatch.setattr(A, "_forward_in_pieces", lambda *a: called.append(real(*a)) or called[-1])
    got, _ = _attention_grads(monkeypatch, True, cfg, 128, 16, kw, nan=mask == "nan")  # 128² × 16: integer heads
    want, _ = _attention_grads(monkeypatch, False, cfg, 128, 16, kw, nan=mask == "nan")
    if activation == "e4m3":  # FP8 codes run simulated: the whole forward
        assert called == []
    else:  # per tensor the step needs a finite positive absmax; per row each row is its own
        assert len(called) == 1 and (called[0] is None) == (mask in ("nan", "all-masked") and activation != "row")
    for a, b in zip(got, want):
        assert torch.equal(a, b) or (a.isnan().any() and torch.equal(a.isnan(), b.isnan()))
    if mask == "nan":
        assert got[0].isnan().any()


@pytest.mark.parametrize("activation", ["tensor", "row"])
def test_coverage_counts_the_first_pass_of_a_forward_in_pieces(monkeypatch: pytest.MonkeyPatch,
                                                               activation: str) -> None:
    """Fault kind 252 (a new user's trial: a Llama's forward FLOPs 13% short in coverage):
    a traced step runs attention whole (the pieces' C kernels decline under a dispatch
    mode), so the first pass over P's absmax that an untraced per-tensor step makes (one
    more QKᵀ) was not counted. Untraced, the forward's QKᵀ runs twice per tensor (counted
    here by wrapping ``attention_probs``) and once per row; coverage now says the same."""
    _skip_without_pieces(True)
    cfg = FQT
    if activation == "row":
        cfg = dataclasses.replace(cfg, activation=dataclasses.replace(cfg.activation,
                                                                      granularity=cfg.activation.granularity.ROW))
    monkeypatch.setattr(A, "CHUNK_SCORES", 2 * 128 * 128)  # 6 entries: three pieces
    model = lowbit.convert(lowbit.ScaledDotProductAttention(), cfg)
    q, k, v = _qkv_heads(length=128, hd=16)
    entries: list[int] = []
    real = A.attention_probs

    def counted(qq, qk, mask, scale, shapes, *rest):  # entries of P each call forms
        entries.append(rest[3][1] - rest[3][0] if len(rest) > 3 and rest[3] is not None else shapes[0])
        return real(qq, qk, mask, scale, shapes, *rest)

    monkeypatch.setattr(A, "attention_probs", counted)
    out = model(q, k, v, is_causal=True)  # untraced: in pieces
    passes = sum(entries) / 6
    assert passes == (2 if activation == "tensor" else 1) and len(entries) == 3 * passes
    out.sum().backward()
    rep = lowbit.coverage(model, q, k, v, model_kwargs={"is_causal": True})
    gemm = 2 * 6 * 128 * 128 * 16  # one attention GEMM: 2·(b·h)·L·S·hd
    assert rep.flops(phase="forward") == (passes + 1) * gemm


def test_pieces_with_a_huge_head_agree_with_the_whole_to_float_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one documented exception to "bitwise" (module docstring): a gradient step so
    large that an epilogue's float32 intermediate could overflow sends that call's
    epilogue to float64 (``int8.safe_scales``), and a piece is a call. The other heads then
    differ from the whole batch's by float rounding only (both round exact integer sums
    once); every value stays finite."""
    weight = torch.ones(2, 3, 128, 16)
    weight[0, 0] *= 1e35  # one head's ∇O, so its ∇S steps, near float32's range

    def run(pieces: bool) -> list[torch.Tensor]:
        if not pieces:
            monkeypatch.setattr(A, "_in_pieces_ok", lambda *args: False)
        monkeypatch.setattr(A, "CHUNK_SCORES", 2 * 128 * 128)
        q, k, v = _qkv_heads(length=128, hd=16)
        (scaled_dot_product_attention(q, k, v, is_causal=True, state=block_state(FQT)) * weight).sum().backward()
        monkeypatch.undo()
        return [t.grad for t in (q, k, v)]

    for a, b in zip(run(True), run(False)):
        assert a.isfinite().all() and b.isfinite().all()
        torch.testing.assert_close(a[1:], b[1:], rtol=2e-7, atol=0)  # float32's rounding, relative
        torch.testing.assert_close(a[0, 1:], b[0, 1:], rtol=2e-7, atol=0)


@pytest.mark.parametrize("pieces", [True, False])
def test_attention_in_pieces_allocates_no_score_sized_buffer(monkeypatch: pytest.MonkeyPatch, pieces: bool) -> None:
    """The point of the pieces: the largest buffer a training step's forward and backward
    allocate is one piece of the scores (two entries here), not the (B·H, L, S) float32
    tensor the whole P and ∇S need (torch's profiler, ``self_cpu_memory_usage`` of each
    op). Entries of 512 × 512 scores (1 MiB each): larger than the float32 route's floor of
    copies (``exact_f32.COPY_FLOOR``), so its copies of P̃ are an entry at a time too."""
    from torch.profiler import ProfilerActivity, profile

    _skip_without_pieces(pieces)
    if not pieces:
        monkeypatch.setattr(A, "_in_pieces_ok", lambda *args: False)
        monkeypatch.setattr(A, "_forward_in_pieces_ok", lambda *args: False)
    monkeypatch.setattr(A, "CHUNK_SCORES", 2 * 512 * 512)
    q, k, v = _qkv_heads(length=512, hd=16)  # 6 entries of 512 × 512 scores
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Memory block of unknown size was allocated before the profiling"
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = scaled_dot_product_attention(q, k, v, is_causal=True, state=FQT).square().sum()
            loss.backward()
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    scores = 6 * 512 * 512 * 4
    assert largest == (2 * 512 * 512 * 4 if pieces else scores)


@pytest.mark.parametrize("heads", [(40, 8), (64, 64)], ids=["simulated", "integer"])
@pytest.mark.parametrize("switch", [False, True], ids=["same-config", "reference-in-backward"])
def test_recomputed_probs_give_the_gradients_of_the_forward_probs(
        monkeypatch: pytest.MonkeyPatch, heads: tuple[int, int], switch: bool) -> None:
    """The step with P recomputed in the backward and ∇S computed in pieces of two
    entries over P equals, bit for bit, the backward given the forward's own P in one
    piece (the design that saved P), on the same noise stream: small heads (one batched
    simulated GEMM) and 64×64 heads (per-head integer GEMMs). P is the forward's even
    when the state's config moves to the reference backend between forward and backward."""
    from lowbit.noise import NoiseStream
    from lowbit.ops import BlockState

    length, hd = heads
    q, k, v = _qkv_heads(length=length, hd=hd)
    b, h = q.shape[:2]
    monkeypatch.setattr(A, "CHUNK_SCORES", 2 * length * length)  # 3 pieces of 2 entries
    state = BlockState(FQT, NoiseStream(seed=3))
    out = scaled_dot_product_attention(q, k, v, is_causal=True, state=state)
    bwd = dataclasses.replace(FQT, backend="reference") if switch else FQT
    state.config = bwd
    out.square().sum().backward()

    monkeypatch.setattr(A, "CHUNK_SCORES", 1 << 62)  # one piece
    replay = NoiseStream(seed=3)
    flat = tuple(t.detach().reshape(b * h, length, hd) for t in (q, k, v))
    causal = torch.zeros(1, length, length).masked_fill_(
        torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    o, probs, _, keep, quant = A.attention_forward(
        *flat, causal, hd ** -0.5, 0.0, FQT, replay.forward_generators(q.device, A._forward_paths(FQT)),
        causal=True)
    assert torch.equal(o, out.detach().reshape(b * h, length, hd))
    grads = A.attention_backward(2 * o, None, quant, probs, keep, (b * h, length, length, hd, hd),
                                 hd ** -0.5, 0.0, bwd,
                                 replay.backward_generators(q.device, A._backward_paths(bwd)),
                                 (True, True, True, False))
    for got, want in zip((q.grad, k.grad, v.grad), grads):
        assert torch.equal(got.reshape(b * h, length, hd), want)


@pytest.mark.parametrize("native", [False, True], ids=["reference-softmax", "native-softmax"])
def test_double_backward_through_attention(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``create_graph=True`` (a double backward: ``lowbit.analysis.jacobian_spectrum``)
    under QAT runs every score-sized kernel out of place, with the same first-order
    gradients — bit for bit where the softmax's reference kernels run both times
    (``native`` off); with the AVX-512 softmax (:mod:`lowbit.kernels.softmax`) to its
    float rounding: it refuses inputs autograd records, so under ``create_graph`` the
    softmax backward of the recorded ``∇O`` runs the reference (the recomputed ``P``,
    from saved codes without a derivative, still runs the kernel). With quantized gradients it is refused
    with a clear error (their codes have no derivative: a second-order term would
    silently be missing)."""
    from lowbit.kernels import softmax

    if native and not softmax.available():
        pytest.skip("the AVX-512 softmax kernel is not available on this machine")
    monkeypatch.setattr(softmax, "_enabled", native)
    grads = []
    for create_graph in (False, True):
        q, k, v = _qkv_heads()
        mask = torch.zeros(2, 1, 40, 40, requires_grad=True)
        out = scaled_dot_product_attention(q, k, v, mask, state=FQTConfig.from_recipe("fqt-psq-8", seed=0))
        if create_graph:
            with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\).*not defined"):
                torch.autograd.grad(out.square().sum(), (q, k, v, mask), create_graph=True)
        for recipe in ("qat-8", "qat-4"):
            cfg = FQTConfig.from_recipe(recipe, seed=0)
            out = scaled_dot_product_attention(q, k, v, mask, state=cfg)
            if create_graph:  # outside the context: the terms through P, Q, K, V would be missing
                with pytest.raises(RuntimeError, match=r"under QAT is not defined"):
                    torch.autograd.grad(out.square().sum(), (q, k, v, mask), create_graph=True,
                                        retain_graph=True)
            with gradient_only_double_backward():
                g = torch.autograd.grad(out.square().sum(), (q, k, v, mask), create_graph=create_graph)
            if create_graph:  # recorded: differentiable in ∇O (the Jᵀu of jacobian_spectrum)
                assert all(x.requires_grad for x in g)
            grads.append([x.detach() for x in g])
    for a, b in zip(grads[:2], grads[2:]):
        if native:  # float rounding of exp and of the row sums (softmax._close's bound)
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6 * float(y.abs().max()))
        else:
            assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gradient_only_double_backward_of_attention_is_the_jacobian_transpose() -> None:
    """Under QAT inside ``gradient_only_double_backward``: ``⟨∂⟨J·v, u⟩/∂v, w⟩ = ⟨J·w, u⟩``
    for the attention's Jacobian to (Q, K, V) — the backward is linear in ∇O (float
    rounding: the sides sum in other orders)."""
    q, k, v = _qkv_heads()
    out = scaled_dot_product_attention(q, k, v, state=FQTConfig.from_recipe("qat-8", seed=0))
    g = torch.Generator().manual_seed(1)
    dv, w = (torch.randn(out.shape, generator=g).requires_grad_(i == 0) for i in range(2))
    us = [torch.randn(t.shape, generator=g) for t in (q, k, v)]
    with gradient_only_double_backward():
        jv = torch.autograd.grad(out, (q, k, v), dv, create_graph=True, retain_graph=True)
        (h,) = torch.autograd.grad(sum((a * b).sum() for a, b in zip(jv, us)), dv)
    jw = torch.autograd.grad(out, (q, k, v), w)
    torch.testing.assert_close((h * w).sum(), sum((a * b).sum() for a, b in zip(jw, us)), rtol=1e-5, atol=0)


def test_public_attention_backward_reads_probs_only() -> None:
    """``attention_backward`` leaves the caller's ``probs`` (which is also the forward's
    returned P̃ without dropout) as it was, unless handed over with ``reuse_probs``."""
    q, k, v = (t.detach().reshape(6, 40, 8) for t in _qkv_heads())
    o, probs, dropped, keep, quant = A.attention_forward(q, k, v, None, 8 ** -0.5, 0.0, FQT, {})
    before = probs.clone()
    A.attention_backward(2 * o, None, quant, probs, keep, (6, 40, 40, 8, 8), 8 ** -0.5, 0.0, FQT,
                         {}, (True, True, True, False))
    assert dropped is probs and torch.equal(probs, before)


def test_tinygpt_attention_converts_and_trains() -> None:
    from lowbit.experiments.models import TinyGPT

    torch.manual_seed(0)
    float_model = TinyGPT(block_size=16, n_layer=2, n_head=2, n_embd=32)
    model = copy.deepcopy(float_model)
    model, report = lowbit.convert(model, FQT, report=True)
    assert {n for n in report.converted if n.endswith("sdpa")} == {"blocks.0.attn.sdpa", "blocks.1.attn.sdpa"}
    assert list(model.state_dict()) == list(float_model.state_dict())  # checkpoints still load
    x = torch.randint(0, 256, (2, 16))
    rep = lowbit.coverage(model, x, torch.roll(x, -1, 1))
    assert rep.lowbit_share == 1.0
    gemm = 2 * (2 * 2) * 16 * 16 * 16  # one attention GEMM: 2·(b·h)·T·T·hd
    # 2 layers, forward 2 + backward 5 GEMMs (QKᵀ again: P is recomputed, not saved)
    assert rep.flops("simulated") == 2 * 7 * gemm
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(x, torch.roll(x, -1, 1))[1]
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] and model.blocks[0].attn.sdpa.noise.counter == 3
    keep_float = lambda m, n: not isinstance(m, AM.ScaledDotProductAttention)  # noqa: E731
    half = lowbit.convert(copy.deepcopy(float_model), FQT, keep_float)
    rep = lowbit.coverage(half, x, torch.roll(x, -1, 1))
    assert rep.flops("float") == 2 * 6 * gemm and rep.flops("simulated") == 0


class _QKVAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)
        self.sdpa = AM.ScaledDotProductAttention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).view(2, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)  # 3 × (B, H, T, hd)
        return self.sdpa(q, k, v, is_causal=True)


def test_torch_compile_gives_the_eager_steps() -> None:
    """Under torch.compile the attention runs eagerly between compiled graphs (it is an
    autograd.Function with its own noise stream): the same noise, so the same output bit
    for bit; the gradients reach the Linear through compiled view/permute backwards whose
    layout changes the order of its float32 bias sum: equal to float rounding."""
    torch.manual_seed(0)
    eager = lowbit.convert(_QKVAttention(), FQT)
    model = copy.deepcopy(eager)
    run = torch.compile(model)
    x = torch.randn(2, 5, 8)
    for step in range(2):
        outs = []
        for m, f in ((eager, eager), (model, run)):
            m.zero_grad()
            y = f(x)
            y.backward(torch.linspace(-1, 1, 4).expand_as(y))
            outs.append((y, m.qkv.weight.grad, m.qkv.bias.grad))
        (y0, *g0), (y1, *g1) = outs
        assert torch.equal(y0, y1), f"step {step}"
        for a, b in zip(g0, g1):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    assert eager.sdpa.noise.counter == model.sdpa.noise.counter == 2


def test_long_sequences_under_torch_compile_run_eagerly_as_eager() -> None:
    """Dynamo traced into the attention's autograd.Function, broke its graph at each host
    read of a scale and resumed inside lowbit's kernels, where at length 1024 it raised
    ``InternalTorchDynamoError`` from ``compiled.run`` (a review; 256 ran): the attention
    is now kept out of tracing, and its output and gradients are the eager ones."""
    torch.manual_seed(0)
    eager = AM.FQTMultiheadAttention.from_float(nn.MultiheadAttention(32, 2, batch_first=True), FQT, seed=0)
    model = copy.deepcopy(eager)
    run = torch.compile(lambda x: model(x, x, x, need_weights=False)[0], backend="eager")
    x = torch.randn(2, 1024, 32)
    y0, y1 = eager(x, x, x, need_weights=False)[0], run(x)
    assert torch.equal(y0, y1)
    g = torch.randn_like(y0)
    y0.backward(g)
    y1.backward(g)
    assert torch.equal(eager.in_proj_weight.grad, model.in_proj_weight.grad)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("masking", ["key_padding", "attn_mask"])
def test_multihead_attention_fully_masked_queries_as_torch(need_weights: bool, masking: str) -> None:
    """A query whose every key is masked: torch's need_weights=True path gives NaN weights
    and output, its need_weights=False (SDPA) path 0. The quantized module gave 0 on both
    (new-user trial); it now gives torch's NaN pattern, and finite values elsewhere."""
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=True)
    mha = AM.FQTMultiheadAttention.from_float(ref, FQT, seed=0)
    q, k = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    kw: dict = {"need_weights": need_weights}
    if masking == "key_padding":
        kpm = torch.zeros(2, 4, dtype=torch.bool)
        kpm[1] = True  # batch entry 1: every key padded
        kw["key_padding_mask"] = kpm
    else:
        allowed = torch.ones(3, 4, dtype=torch.bool)
        allowed[0] = False  # query 0 sees no key
        kw["attn_mask"] = ~allowed  # MHA's bool attn_mask: True = not allowed
    want, want_w = ref(q, k, k, **kw)
    got, got_w = mha(q, k, k, **kw)
    assert torch.equal(got.isnan(), want.isnan())
    assert bool(want.isnan().any()) == need_weights
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), atol=0.05, rtol=0.05)
    if need_weights:
        assert torch.equal(got_w.isnan(), want_w.isnan())
        torch.testing.assert_close(got_w.nan_to_num(), want_w.nan_to_num(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("through", ["output", "weights"])
def test_multihead_attention_nan_rows_reach_the_gradients(through: str) -> None:
    """The NaN rows of a fully masked query were written with masked_fill, whose backward
    gives 0 there: the loss was NaN while every gradient was finite and left that batch
    entry out (out_proj.bias.grad 10 instead of 15), so a step guard that checks the
    gradients applied the step. Now the gradients torch makes NaN are NaN here too."""
    torch.manual_seed(1)
    ref = nn.MultiheadAttention(8, 2)
    mha = AM.FQTMultiheadAttention.from_float(ref, FQT, seed=0)
    q, kv = torch.randn(5, 3, 8), torch.randn(6, 3, 8)
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1] = True  # batch entry 1: every key padded
    grads = []
    for module in (ref, mha):
        x = q.clone().requires_grad_()
        out, weights = module(x, kv, kv, key_padding_mask=kpm)
        loss = (out if through == "output" else weights).sum()
        assert loss.isnan()
        loss.backward()
        grads.append({"q": x.grad, "in_proj_weight": module.in_proj_weight.grad,
                      "out_proj.weight": module.out_proj.weight.grad})
    for name, want in grads[0].items():
        got = grads[1][name]
        if want is None:  # the weights do not depend on the out-projection
            assert got is None and through == "weights", name
            continue
        assert bool(want.isnan().any()) and bool(got.isnan().any()), name
        assert torch.equal(got.isnan(), want.isnan()), name


def test_a_broadcast_bool_mask_is_not_written_out_per_batch_entry() -> None:
    """transformers hands its causal mask as a bool (B, 1, L, S) view of stride 0 over
    the batch; the additive form was built at (B, 1, L, S) and saved whole for the
    backward (4·B·L·S bytes a layer, a review): now at its distinct elements (1, L, S),
    with outputs and gradients bitwise those of the materialized mask."""
    from lowbit.attention_args import additive_mask

    keep = torch.ones(L, S, dtype=torch.bool).tril()
    view = keep.expand(B, 1, L, S)  # stride 0 over the batch
    add = additive_mask(view, False, (B, H), L, S, torch.empty(0))
    assert add.shape == (1, L, S) and add.untyped_storage().nbytes() == L * S * 4
    pad = torch.tensor([True] * (S - 1) + [False]).expand(B, 1, L, S)  # stride 0 over B and L
    assert additive_mask(pad, False, (B, H), L, S, torch.empty(0)).untyped_storage().nbytes() == S * 4
    outs = []
    for mask in (view, view.contiguous(), pad, pad.contiguous()):
        q, k, v = qkv(seed=3)
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, state=block_state(FQT))  # fresh noise stream
        out.sum().backward()
        outs.append([out.detach(), q.grad, k.grad, v.grad])
    for a, b in ((outs[0], outs[1]), (outs[2], outs[3])):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_convert_leaves_attention_modules_it_cannot_swap_faithfully() -> None:
    """``convert`` swapped any ``ScaledDotProductAttention`` instance: a subclass with a
    learned logit scale and its own forward lost both (its output 23 off under the fp
    recipe, the parameter gone from the state dict), an instance with a buffer lost it.
    Now such modules stay float, listed in ``skipped`` with the reason."""
    class Temp(AM.ScaledDotProductAttention):
        def __init__(self) -> None:
            super().__init__()
            self.logit_scale = torch.nn.Parameter(torch.tensor(3.0))

        def forward(self, q, k, v, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN201
            return 10 * super().forward(q, k, v, scale=float(self.logit_scale))

    buffered = AM.ScaledDotProductAttention()
    buffered.register_buffer("bias", torch.zeros(1))
    patched = AM.ScaledDotProductAttention()
    patched.forward = lambda q, k, v, *a, **kw: 2 * F.scaled_dot_product_attention(q, k, v)
    q = torch.randn(1, 2, 5, 8)
    for mod, why in ((Temp(), "is a subclass of ScaledDotProductAttention"),
                     (buffered, r"owns more than ScaledDotProductAttention defines \(none\): \['bias'\]"),
                     (patched, r"owns more .*\['forward'\]")):
        model = torch.nn.Sequential(mod)
        with torch.no_grad():
            want = model[0](q, q, q)
        keys = list(model.state_dict())
        with pytest.warns(lowbit.ConversionWarning, match=why):
            model, report = lowbit.convert(model, FQTConfig.from_recipe("fp"), report=True)
        assert model[0] is mod and list(report.skipped) == ["0"] and list(model.state_dict()) == keys
        with torch.no_grad():
            assert torch.equal(model[0](q, q, q), want)
    converted = lowbit.convert(torch.nn.Sequential(AM.ScaledDotProductAttention()), FQT)
    assert type(converted[0]) is AM.FQTScaledDotProductAttention  # the plain module still converts


def test_a_broadcast_float_mask_leaf_gets_its_gradient_per_entry() -> None:
    """A float mask that is a stride-0 view made a leaf (``base.expand(B, H, L, S)
    .requires_grad_()``) needs its gradient per (batch, head) entry; the compaction meant
    for bool masks narrowed it too and gave entry [0, 0] the whole gradient (a second
    review). Now equal to the materialized mask's gradient."""
    base = torch.randn(1, 1, L, S, generator=torch.Generator().manual_seed(4))
    grads = []
    for mask in (base.expand(B, H, L, S).requires_grad_(), base.expand(B, H, L, S).clone().requires_grad_()):
        q, k, v = qkv(seed=5)
        scaled_dot_product_attention(q, k, v, attn_mask=mask, state=block_state(FQT)).sum().backward()
        grads.append(mask.grad)
    assert grads[0].shape == (B, H, L, S) and torch.equal(grads[0], grads[1])
    assert bool((grads[0].flatten(2).abs().sum(-1) > 0).all())  # every entry has its own gradient


def test_the_differentiable_masked_softmax_gives_zero_gradients_to_a_row_masked_whole() -> None:
    """Where autograd records (a double backward differentiates the reference), the
    softmax of a row whose scores are all ``-inf`` (NaN, zeroed after) gave NaN gradients
    through an additive mask (a review found the same in the Hugging Face float attention):
    the dead row's scores are 0 before the softmax now; its probabilities and gradients 0."""
    from lowbit.kernels.softmax import masked_softmax

    scores = torch.randn(2, 3, 4, requires_grad=True)
    mask = torch.zeros(2, 3, 4).index_fill_(1, torch.tensor([1]), -math.inf)
    mask[0, 0, 2] = -math.inf
    with torch.enable_grad():
        probs = masked_softmax(scores + mask, True)
    (grad,) = torch.autograd.grad((probs * torch.randn(2, 3, 4)).sum(), scores)
    live = torch.softmax(scores + mask, -1)
    assert torch.equal(probs[:, 1], torch.zeros(2, 4)) and torch.equal(probs[:, [0, 2]], live[:, [0, 2]])
    assert torch.isfinite(grad).all() and torch.equal(grad[:, 1], torch.zeros(2, 4))


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_a_mask_dtype_torch_refuses_is_refused_alike(autocast: bool) -> None:
    """A review: a float64, float16 or bfloat16 mask beside float32 queries ran under a
    low-bit recipe while torch (and so lowbit's own ``fp`` recipe) refuses it: a model that
    trained quantized failed as its float baseline. Every (query, mask) dtype pair is now
    refused or taken as torch takes it, under autocast too."""
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=0)
    dtypes = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
    for qd in dtypes:
        for md in dtypes:
            q, m = torch.randn(1, 2, 3, 16, dtype=qd), torch.zeros(3, 3, dtype=md)
            outcome = []
            for f in (F.scaled_dot_product_attention, lambda *a, **k: scaled_dot_product_attention(*a, **k, state=cfg)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    try:
                        f(q, q, q, attn_mask=m)
                        outcome.append("ran")
                    except RuntimeError as e:
                        assert "attn_mask dtype to be bool or float or to match query dtype" in str(e)
                        outcome.append("refused")
            assert outcome[0] == outcome[1], (qd, md)


@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "autocast"])
def test_query_key_value_dtypes_torch_refuses_are_refused_alike(autocast: bool) -> None:
    """A second review: autocast never casts float64, so torch refuses a float64 key beside a
    bfloat16 query under autocast too; lowbit checked the three dtypes only outside it
    (36 such combinations ran quantized and failed as the ``fp`` baseline)."""
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=0)
    dtypes = (torch.float32, torch.bfloat16, torch.float64)
    for qd in dtypes:
        for kd in dtypes:
            q, k = torch.randn(1, 2, 3, 16, dtype=qd), torch.randn(1, 2, 3, 16, dtype=kd)
            outcome = []
            for f in (F.scaled_dot_product_attention, lambda *a, **kw: scaled_dot_product_attention(*a, **kw, state=cfg)):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    try:
                        f(q, k, k)
                        outcome.append("ran")
                    except RuntimeError as e:
                        assert "Expected query, key, and value to have the same dtype" in str(e)
                        outcome.append("refused")
            assert outcome[0] == outcome[1], (qd, kd)


def test_masks_and_scales_torch_takes_are_taken() -> None:
    """Reviews: torch broadcasts a 1-D or 0-d mask (but for some 4-D inputs on its CPU
    flash path, which raises ``IndexError``), and so does lowbit, everywhere: the same
    output as the mask written out as (L, S). A ``bool``, NumPy or 0-d tensor scale is a
    number to torch."""
    import numpy as np

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    keep = torch.tensor([True, True, False, True, False])
    for query, key, value in ((q, k, v), (q[0], k[0], v[0]), (q[None, None], k[None, None], v[None, None]),
                              (q[None], k[None], v[None])):
        got = scaled_dot_product_attention(query, key, value, attn_mask=keep, state=FQT)
        want = scaled_dot_product_attention(query, key, value, attn_mask=keep.expand(6, 5), state=FQT)
        assert torch.equal(got, want)
    for sc in (True, torch.tensor(0.5), torch.tensor(True), np.float32(0.5), np.bool_(True), np.int64(2)):
        assert torch.equal(scaled_dot_product_attention(q, k, v, scale=sc, state=FQT),
                           scaled_dot_product_attention(q, k, v, scale=float(sc), state=FQT))


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_refuses_the_key_padding_masks_torch_refuses(need_weights: bool) -> None:
    """A review: a transposed (S, N) ``key_padding_mask`` (as many elements as (N, S)) was
    viewed as (N, S), masking other keys of other samples without a word; one of another
    size raised a ``view`` error naming no argument; an integer one was called a dtype
    mismatch. Each now raises torch's own error, the same as the float module's."""
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(16, 4)
    conv = lowbit.convert(nn.Sequential(copy.deepcopy(plain)), FQTConfig.from_recipe("fqt-psq-8", seed=0))[0]
    assert type(conv).__name__ == "FQTMultiheadAttention"
    x, kx = torch.randn(6, 3, 16), torch.randn(7, 3, 16)  # L = 6, N = 3, S = 7
    for kpm in (torch.zeros(7, 3, dtype=torch.bool), torch.zeros(3, 8, dtype=torch.bool),
                torch.zeros(3, 7, dtype=torch.int64)):
        errors = []
        for m in (plain, conv):
            with pytest.raises(AssertionError) as err:
                m(x, kx, kx, key_padding_mask=kpm, need_weights=need_weights)
            errors.append(str(err.value))
        assert errors[0] == errors[1], errors
    ok = torch.zeros(3, 7, dtype=torch.bool)
    ok[0, 0] = True
    assert conv(x, kx, kx, key_padding_mask=ok, need_weights=need_weights)[0].shape == (6, 3, 16)


def test_multihead_attention_masks_with_weights_follow_torchs_dtype_rule() -> None:
    """A second review: with ``need_weights=True`` (its default) torch's
    ``nn.MultiheadAttention`` wants a float mask in the query's dtype (its weights path
    multiplies with ``baddbmm``); the converted module took the looser SDPA rule (a float32
    mask beside bfloat16 queries), so the ``fp`` baseline of a model failed where its
    quantized run did not. Every (query, masks, need_weights, autocast) case now agrees."""
    torch.manual_seed(0)
    for qd in (torch.bfloat16, torch.float32, torch.float64):
        plain = nn.MultiheadAttention(16, 2, batch_first=True).to(qd)
        conv = lowbit.convert(nn.Sequential(copy.deepcopy(plain)), FQTConfig.from_recipe("fqt-psq-8", seed=0))[0]
        x = torch.randn(2, 3, 16, dtype=qd)
        kinds = (None, torch.bool, torch.float32, torch.bfloat16, torch.float64)
        # both masks together too: torch adds them (a second review: each checked alone refused
        # a bool causal mask beside a float32 padding mask in a float64 model)
        for autocast, weights, ad, kd in itertools.product((False, True), (True, False), kinds, kinds):
            masks = {}
            if ad is not None:
                masks["attn_mask"] = torch.zeros(3, 3, dtype=ad) if ad != torch.bool else torch.ones(3, 3).triu(1).bool()
            if kd is not None:
                masks["key_padding_mask"] = torch.zeros(2, 3, dtype=kd)
            outcome = []
            for m in (plain, conv):
                try:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                        m(x, x, x, need_weights=weights, **masks)
                    outcome.append("ran")
                except RuntimeError:
                    outcome.append("refused")
            assert outcome[0] == outcome[1], (qd, autocast, weights, ad, kd)
