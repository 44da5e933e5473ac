"""lowbit.gradpair: both quantizations of ∇Y from one kernel are bitwise the two
separate quantizer calls (same codes, scales, noise streams), and apply only where they
can."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
import lowbit.functional as functional
from lowbit.config import Backend, FQTConfig, GradSpec
from lowbit.functional import block_state, quantize_gradient
from lowbit.gradpair import quantize_grad_pair, quantize_grad_pair_mixed
from lowbit.kernels import kernels_for

# symmetric and asymmetric integer grids, per row and per tensor, FP8, a block format
RECIPES = ["fqt-psq-8", "fqt-ptq-8", "fqt-psq-8a", "fqt-psq-fp8", "fqt-psq-nvfp4"]


def _counted(calls: list[bool]):  # noqa: ANN202
    """quantize_grad_pair, noting in ``calls`` whether each call applied."""
    def counted(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        out = quantize_grad_pair(*args, **kw)
        calls.append(out is not None)
        return out
    return counted


def _assert_same_operands(got_pair, want_pair) -> None:  # noqa: ANN001
    """Each pair operand bitwise its separate call's: codes (shape and bytes), scale,
    offset and block scale."""
    for got, want in zip(got_pair, want_pair, strict=True):
        assert got.codes.shape == want.codes.shape
        assert torch.equal(got.codes.view(torch.uint8), want.codes.view(torch.uint8))
        assert torch.equal(got.scale, want.scale)
        for name in ("offset", "block_scale"):
            u, v = getattr(got, name), getattr(want, name)
            assert (u is None and v is None) or torch.equal(u, v)


def _grads(recipe: str, dtype: torch.dtype, pair: bool, monkeypatch: pytest.MonkeyPatch,
           calls: list[int]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 384), nn.GELU(), nn.Linear(384, 96)).to(dtype)
    lowbit.convert(model, FQTConfig.from_recipe(recipe, seed=3))
    x = torch.randn(256, 96, dtype=dtype, requires_grad=True)  # ∇Y of 256×384: a compiled call
    monkeypatch.setattr(functional, "quantize_grad_pair", _counted(calls) if pair else (lambda *a, **k: None))
    model(x).float().square().mean().backward()
    monkeypatch.undo()
    return [x.grad, *(p.grad for p in model.parameters())]


def _assert_attention_pair_bitwise_apart(recipe: str, variant: str, n: int, monkeypatch: pytest.MonkeyPatch,
                                         owner: object, name: str) -> None:
    """lowbit's attention on heads of ``n`` rows — causal with grouped key/value heads, or
    with a float mask that wants its gradient and dropout — under ``recipe``: the
    gradients with ``owner.name`` (a pair function) as it is equal bitwise those where it
    declines (the separate calls), and it applied twice (∇O's pair and ∇S's)."""
    import lowbit.attention as A

    real = getattr(owner, name)

    def grads(pair: bool, calls: list[bool]) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(*shape, generator=g).requires_grad_()
                   for shape in ((2, 4, n, 32), (2, 2, n, 32), (2, 2, n, 32)))
        mask = torch.randn(n, n, generator=g).requires_grad_()
        cfg = FQTConfig.from_recipe(recipe, seed=4)

        def counted(*args, **kw):  # noqa: ANN002, ANN003, ANN202
            out = real(*args, **kw)
            calls.append(out is not None)
            return out

        monkeypatch.setattr(owner, name, counted if pair else (lambda *a, **k: None))
        # the whole ∇S (its pieces, which quantize each piece with the pair kernel, are
        # bitwise this path: test_attention.py::test_backward_in_pieces_is_bitwise_the_whole_backward)
        monkeypatch.setattr(A, "_in_pieces_ok", lambda *a: False)
        torch.manual_seed(5)  # dropout's mask
        if variant == "causal-gqa":
            out = A.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, state=block_state(cfg))
        else:
            out = A.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                 attn_mask=mask, dropout_p=0.2, state=block_state(cfg))
        out.square().sum().backward()
        monkeypatch.undo()
        return [t.grad for t in (q, k, v, mask) if t.grad is not None]

    calls: list[bool] = []
    fused, apart = grads(True, calls), grads(False, [])
    assert calls == [True, True]  # ∇O's pair and ∇S's pair
    assert len(fused) == len(apart) == (3 if variant == "causal-gqa" else 4)
    for a, b in zip(fused, apart):
        assert a.dtype == b.dtype and torch.equal(a, b)


# NVFP4 in float32 only: its compiled kernels cost ~60 s of compilation per input dtype on a
# fresh cache, and bfloat16 ∇Y is covered by the other recipes' pair kernels (the suite's time)
@pytest.mark.parametrize("recipe, dtype", [(r, d) for r in RECIPES for d in (torch.float32, torch.bfloat16)
                                           if not (r == "fqt-psq-nvfp4" and d == torch.bfloat16)],
                         ids=lambda v: {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(v, v))
def test_pair_gives_bitwise_the_separate_gradients(recipe: str, dtype: torch.dtype,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    fused = _grads(recipe, dtype, True, monkeypatch, calls)
    apart = _grads(recipe, dtype, False, monkeypatch, [])
    assert calls == [True, True]  # both layers' backward took the one-kernel path
    for a, b in zip(fused, apart):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["int8", "int4a", "fp8_e5m2", "nvfp4"])
def test_pair_operands_equal_quantize_gradient_on_each_path(fmt: str) -> None:
    g = torch.randn(200, 300) * torch.rand(200, 1).pow(3)
    spec_a, spec_w = GradSpec(quantizer="psq", format=fmt), GradSpec(quantizer="ptq", format="int8")
    k = kernels_for(Backend.AUTO, g.device)
    pair = quantize_grad_pair(g, spec_a, torch.Generator().manual_seed(1), spec_w,
                              torch.Generator().manual_seed(2), k)
    assert pair is not None
    want_a = quantize_gradient(g, spec_a, torch.Generator().manual_seed(1), k)
    want_w = quantize_gradient(g.t(), spec_w, torch.Generator().manual_seed(2), k)
    _assert_same_operands(pair, (want_a, want_w))


@pytest.mark.parametrize("why, spec_a, spec_w, backend", [
    ("row-mixing ∇X quantizer", GradSpec(quantizer="bhq"), GradSpec(), Backend.AUTO),
    ("row-mixing ∇X quantizer", GradSpec(quantizer="hadamard"), GradSpec(), Backend.AUTO),
    ("predicted range", GradSpec(range="predicted"), GradSpec(), Backend.AUTO),
    ("QAT ∇W path", GradSpec(), None, Backend.AUTO),
    ("reference backend", GradSpec(), GradSpec(), Backend.REFERENCE),
])
def test_pair_does_not_apply(why: str, spec_a, spec_w, backend: Backend) -> None:  # noqa: ANN001
    g = torch.randn(64, 32)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert quantize_grad_pair(g, spec_a, gen, spec_w, gen, kernels_for(backend, g.device)) is None, why
    assert torch.equal(gen.get_state(), state)  # nothing drawn


@pytest.mark.parametrize("fmt", ["mxfp8_e5m2", "mxfp4", "nvfp4"])
def test_conv_pair_declines_a_block_format_on_the_grad_input_side(fmt: str) -> None:
    """A convolution's ∇X rows take a block format channels innermost
    (``lowbit.conv.conv_rows``), not the kernel's (N, C_out·L) rows: no pair, nothing drawn;
    a block format on the ∇W side alone (its rows (C_out, N·L) either way) still pairs."""
    g = torch.randn(4, 32, 9)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    k = kernels_for(Backend.AUTO, g.device)
    assert quantize_grad_pair(g, GradSpec(format=fmt), gen, GradSpec(), gen, k) is None
    assert torch.equal(gen.get_state(), state)
    assert quantize_grad_pair(g, GradSpec(), gen, GradSpec(format=fmt), gen, k) is not None


def test_pair_does_not_apply_to_an_empty_gradient() -> None:
    g = torch.zeros(0, 32)
    assert quantize_grad_pair(g, GradSpec(), None, GradSpec(), None,
                              kernels_for(Backend.AUTO, g.device)) is None


def _mixed_grads(recipe: str, dtype: torch.dtype, pair: bool, monkeypatch: pytest.MonkeyPatch,
                 calls: list[bool]) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 384), nn.GELU(), nn.Linear(384, 96)).to(dtype)
    lowbit.convert(model, FQTConfig.from_recipe(recipe, seed=3))
    x = torch.randn(256, 96, dtype=dtype, requires_grad=True)
    x.data[:4] *= 1e3  # a few large rows: BHQ forms real groups

    def counted(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        out = quantize_grad_pair_mixed(*args, **kw)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(functional, "quantize_grad_pair_mixed", counted if pair else (lambda *a, **k: None))
    model(x).float().square().mean().backward()
    monkeypatch.undo()
    return [x.grad, *(p.grad for p in model.parameters())]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
# the C pair on int8 and int4, the two kernels through one op on FP8 (the compiled
# kernels' other formats take that same path: test_mixed_pair_operands_equal_…)
@pytest.mark.parametrize("recipe", ["fqt-bhq-8", "fqt-bhq-4", "fqt-bhq-fp8", "fqt-hadamard-8", "fqt-hadamard-4",
                                    "fqt-hadamard-fp8"])
def test_mixed_pair_gives_bitwise_the_separate_gradients(recipe: str, dtype: torch.dtype,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A linear layer's ∇Y under BHQ or Hadamard: its transformed rows and its columns
    quantized together (one C kernel where the formats allow it, else the two kernels
    through one op) give bitwise the gradients of the two separate quantizer calls."""
    calls: list[bool] = []
    fused = _mixed_grads(recipe, dtype, True, monkeypatch, calls)
    apart = _mixed_grads(recipe, dtype, False, monkeypatch, [])
    assert calls == [True, True]  # both layers' backward took the pair
    for a, b in zip(fused, apart):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("fmt_w", ["int8", "int4a", "fp8_e5m2"])
@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
@pytest.mark.parametrize("quantizer", ["bhq", "hadamard"])
def test_mixed_pair_operands_equal_quantize_gradient_on_each_path(fmt_w: str, rounding: str, quantizer: str) -> None:
    g = torch.randn(200, 300) * torch.rand(200, 1).pow(3) * 10
    spec_a = GradSpec(quantizer=quantizer, format="int8", rounding=rounding)
    spec_w = GradSpec(quantizer="psq", format=fmt_w, rounding=rounding)
    k = kernels_for(Backend.AUTO, g.device)
    pair = quantize_grad_pair_mixed(g, spec_a, torch.Generator().manual_seed(1), spec_w,
                                    torch.Generator().manual_seed(2), k)
    assert pair is not None
    want_a = quantize_gradient(g, spec_a, torch.Generator().manual_seed(1), k)
    want_w = quantize_gradient(g.t(), spec_w, torch.Generator().manual_seed(2), k)
    _assert_same_operands(pair, (want_a, want_w))
    y = torch.randn(pair[0].codes.shape[0], 50)  # and the ∇X side's transform is quantize_gradient's
    # (Hadamard's rows padded to its blocks)
    assert torch.equal(pair[0].transform.inverse(y.clone()), want_a.transform.inverse(y.clone()))


@pytest.mark.parametrize("why, spec_a, spec_w, backend", [
    ("a ∇X quantizer that does not mix rows", GradSpec(quantizer="psq"), GradSpec(), Backend.AUTO),
    ("predicted range", GradSpec(quantizer="bhq", range="predicted"), GradSpec(), Backend.AUTO),
    ("predicted ∇W range", GradSpec(quantizer="bhq"), GradSpec(range="predicted"), Backend.AUTO),
    ("QAT ∇W path", GradSpec(quantizer="bhq"), None, Backend.AUTO),
    ("QAT ∇X path", None, GradSpec(), Backend.AUTO),
    ("reference backend", GradSpec(quantizer="bhq"), GradSpec(), Backend.REFERENCE),
])
def test_mixed_pair_does_not_apply(why: str, spec_a, spec_w, backend: Backend) -> None:  # noqa: ANN001
    g = torch.randn(64, 32)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    k = kernels_for(backend, g.device)
    assert quantize_grad_pair_mixed(g, spec_a, gen, spec_w, gen, k) is None, why
    assert torch.equal(gen.get_state(), state)  # nothing drawn
    assert quantize_grad_pair_mixed(torch.zeros(0, 32), GradSpec(quantizer="bhq"), gen, GradSpec(), gen,
                                    kernels_for(Backend.AUTO, "cpu")) is None  # an empty gradient


def test_mixed_pair_keeps_a_subclass_s_own_transform_and_quantize(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BHQ subclass with its own transform (not BHQ's: no column pair) gets the two
    quantizations made as the separate calls make them, in their order; one with its own
    ``quantize`` is not paired (its override runs: tests/core/test_attention.py)."""
    from lowbit.quantizers import QUANTIZERS
    from lowbit.quantizers.base import Identity
    from lowbit.quantizers.bhq import BHQ

    class OwnTransform(BHQ):
        def transform(self, a, generator, kernels=None):  # noqa: ANN001, ANN201
            torch.rand(1, generator=generator)  # it draws: the order matters
            return Identity(a.shape[0])

    class OwnQuantize(BHQ):
        def quantize(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            return super().quantize(*args, **kwargs)

    monkeypatch.setitem(QUANTIZERS, "own_transform", OwnTransform())
    monkeypatch.setitem(QUANTIZERS, "own_quantize", OwnQuantize())
    g = torch.randn(64, 32)
    k = kernels_for(Backend.AUTO, g.device)
    spec_a, spec_w = GradSpec(quantizer="own_transform"), GradSpec()
    pair = quantize_grad_pair_mixed(g, spec_a, torch.Generator().manual_seed(1), spec_w,
                                    torch.Generator().manual_seed(2), k)
    want_a = quantize_gradient(g, spec_a, torch.Generator().manual_seed(1), k)
    want_w = quantize_gradient(g.t(), spec_w, torch.Generator().manual_seed(2), k)
    _assert_same_operands(pair, (want_a, want_w))
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert quantize_grad_pair_mixed(g, GradSpec(quantizer="own_quantize"), gen, spec_w, gen, k) is None
    assert torch.equal(gen.get_state(), state)


def test_attention_pair_keeps_a_transform_whose_pair_takes_no_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    """A BHQ transform subclass whose ``forward_quantize_pair`` has the signature before
    ``entries`` (linear layers call it so) is not handed attention's ``entries`` (a
    ``TypeError`` in the backward, which trained before: a review): attention's two
    quantizations are made apart, bitwise the separate calls."""
    import lowbit.attention as att
    from lowbit.quantizers import QUANTIZERS
    from lowbit.quantizers.bhq import BHQ, BlockHouseholder

    class PairOld(BlockHouseholder):
        def forward_quantize_pair(self, x, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w,  # noqa: ANN001, ANN201
                                  seed_w):
            return super().forward_quantize_pair(x, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w, seed_w)

    class MyBHQ(BHQ):
        name = "my_bhq"

        def entry_transform(self, a, entries, generator, kernels=None):  # noqa: ANN001, ANN201
            t = super().entry_transform(a, entries, generator, kernels)
            t.__class__ = PairOld
            return t

    class InstanceOld(BHQ):  # the old signature as the instance's own attribute (a review)
        name = "instance_old"

        def entry_transform(self, a, entries, generator, kernels=None):  # noqa: ANN001, ANN201
            t = super().entry_transform(a, entries, generator, kernels)
            base = t.forward_quantize_pair
            t.forward_quantize_pair = lambda x, fa, ga, ra, sa, fw, gw, rw, sw: base(x, fa, ga, ra, sa, fw, gw, rw, sw)
            return t

    monkeypatch.setitem(QUANTIZERS, "my_bhq", MyBHQ())
    monkeypatch.setitem(QUANTIZERS, "instance_old", InstanceOld())
    g = torch.randn(3, 16, 8) * torch.exp(torch.randn(3, 16, 1))
    k = kernels_for(Backend.AUTO, g.device)
    for name in ("my_bhq", "instance_old"):
        spec_a, spec_w = GradSpec(quantizer=name), GradSpec()
        pair = quantize_grad_pair_mixed(g.reshape(-1, 8), spec_a, torch.Generator().manual_seed(1), spec_w,
                                        torch.Generator().manual_seed(2), k, entries=3)
        want_a = att.grad_operand(g, spec_a, torch.Generator().manual_seed(1), Backend.AUTO)
        want_w = att.grad_operand_t(g, spec_w, torch.Generator().manual_seed(2), Backend.AUTO)
        assert pair is not None and isinstance(pair[0].transform, PairOld if name == "my_bhq" else BlockHouseholder)
        for got, want in zip(pair, (want_a, want_w), strict=True):
            assert torch.equal(got.codes, want.codes.reshape(got.codes.shape)) \
                and torch.equal(got.scale.reshape(-1), want.step.reshape(-1))


@pytest.mark.parametrize("grad_input, user", [("bhq", "own quantize"), ("psq", "own quantize"),
                                              ("bhq", "own transform"), ("psq", "own transform"),
                                              ("users", "own forward_quantize"), ("bhq", "instance's quantize"),
                                              ("users", "instance's forward_quantize")])
def test_a_users_quantizer_is_never_stood_in_for_by_a_pair_kernel(grad_input: str, user: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A user's quantizer with its own ``quantize``, or its own transform (rows not mixed),
    on the ∇W side, or a BHQ whose transform has its own ``forward_quantize`` on the ∇X
    side: the gradients are those of the separate calls, the user's code ran (a review:
    the pair kernels stood in for it, or refused the transform with a TypeError)."""
    from lowbit.quantizers import QUANTIZERS
    from lowbit.quantizers.base import RowTransform
    from lowbit.quantizers.bhq import BHQ, BlockHouseholder
    from lowbit.quantizers.psq import PSQ

    ran: list[str] = []

    class OwnQuantize(PSQ):
        def quantize(self, a, fmt, generator=None, rounding="stochastic", backend="auto", tracker=None):  # noqa: ANN001, ANN201
            ran.append("quantize")
            return super().quantize(a.clamp(-1e-3, 1e-3), fmt, generator, rounding, backend, tracker)

    class Halving(RowTransform):
        def __init__(self, n: int) -> None:
            self.n_rows, self.kernels = n, None

        def forward(self, x):  # noqa: ANN001, ANN201
            ran.append("transform")
            return x * 0.5

        def inverse(self, y, out_dtype=torch.float32, overwrite=False):  # noqa: ANN001, ANN201
            return (y * 2).to(out_dtype)

        def inverse_sq(self, var):  # noqa: ANN001, ANN201
            return var * 4

    class OwnTransform(PSQ):
        def transform(self, a, generator, kernels=None):  # noqa: ANN001, ANN201
            return Halving(a.shape[0])

    class HalvingBH(BlockHouseholder):
        def forward_quantize(self, x, *args):  # noqa: ANN001, ANN002, ANN201
            ran.append("forward_quantize")
            return super().forward_quantize(x * 0.5, *args)

    class OwnForwardQuantize(BHQ):
        def transform(self, a, generator, kernels=None):  # noqa: ANN001, ANN201
            t = super().transform(a, generator, kernels)
            return HalvingBH(t.scale, t.v, t.group, t.n_groups, t.kernels, t.csr())

    class InstanceForwardQuantize(BHQ):
        def transform(self, a, generator, kernels=None):  # noqa: ANN001, ANN201
            t = super().transform(a, generator, kernels)
            real = t.forward_quantize
            t.forward_quantize = lambda x, *args: ran.append("forward_quantize") or real(x * 0.5, *args)
            return t

    def instance_quantize() -> PSQ:
        q = PSQ()
        real = q.quantize
        q.quantize = lambda a, *args, **kw: ran.append("quantize") or real(a.clamp(-1e-3, 1e-3), *args, **kw)
        return q

    quantizers = {"own quantize": OwnQuantize, "own transform": OwnTransform, "own forward_quantize": OwnForwardQuantize,
                  "instance's quantize": instance_quantize, "instance's forward_quantize": InstanceForwardQuantize}
    monkeypatch.setitem(QUANTIZERS, "users", quantizers[user]())
    spec_a, spec_w = GradSpec(quantizer=grad_input), GradSpec()
    if grad_input != "users":  # a ∇W-side quantizer
        spec_w = GradSpec(quantizer="users")
    cfg = FQTConfig(grad_input=spec_a, grad_weight=spec_w, seed=3)

    def grads(paired: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(24, 64), nn.GELU(), nn.Linear(64, 8))
        lowbit.convert(model, cfg)
        x = torch.randn(64, 24, requires_grad=True)
        with pytest.MonkeyPatch.context() as m:
            if not paired:
                m.setattr(functional, "quantize_grad_pair", lambda *a, **k: None)
                m.setattr(functional, "quantize_grad_pair_mixed", lambda *a, **k: None)
            model(x).square().mean().backward()
        return [x.grad, *(p.grad for p in model.parameters())]

    got = grads(True)
    assert ran, "the user's code did not run"
    want = grads(False)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_attention_runs_a_users_entry_transform(monkeypatch: pytest.MonkeyPatch) -> None:
    """A PSQ whose ``entry_transform`` is its own, on both gradient sides of attention:
    the pair kernels do not stand in for it (they called ``transform``, never the user's
    code: a review); the gradients are the separate calls'."""
    import lowbit.attention as A
    from lowbit.attention import scaled_dot_product_attention
    from lowbit.quantizers import QUANTIZERS
    from lowbit.quantizers.psq import PSQ

    ran: list[str] = []

    class PerHead(PSQ):
        def entry_transform(self, a, entries, generator, kernels=None):  # noqa: ANN001, ANN201
            ran.append("entry_transform")
            return super().entry_transform(a, entries, generator, kernels)

    monkeypatch.setitem(QUANTIZERS, "per_head", PerHead())
    spec = GradSpec(quantizer="per_head")
    cfg = FQTConfig(grad_input=spec, grad_weight=spec, seed=3)

    def grads(paired: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 4, 128, 16, requires_grad=True) for _ in range(3))
        with pytest.MonkeyPatch.context() as m:
            if not paired:
                m.setattr(A, "quantize_grad_pair", lambda *a, **kw: None)
                m.setattr(A, "quantize_grad_w", lambda *a, **kw: None)
                m.setattr(A, "_in_pieces_ok", lambda *a, **kw: False)
            scaled_dot_product_attention(q, k, v, state=block_state(cfg)).square().sum().backward()
        return [q.grad, k.grad, v.grad]

    got = grads(True)
    assert ran, "the user's entry_transform did not run"
    for a, b in zip(got, grads(False), strict=True):
        assert torch.equal(a, b)


def _conv_grads(recipe: str, pair: bool, monkeypatch: pytest.MonkeyPatch, calls: list[bool],
                dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    import lowbit.conv as conv

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.Flatten(1), nn.Unflatten(1, (8, 64)),
                          nn.Conv1d(8, 4, 3, padding=2))
    lowbit.convert(model.to(dtype), FQTConfig.from_recipe(recipe, seed=3))
    x = torch.randn(32, 3, 16, 16, dtype=dtype, requires_grad=True)  # ∇Y of the first conv: 32·16·256 elements
    monkeypatch.setattr(conv, "quantize_grad_pair", _counted(calls) if pair else (lambda *a, **k: None))
    model(x).float().square().mean().backward()
    monkeypatch.undo()
    return [x.grad, *(p.grad for p in model.parameters())]


# float64 models with one recipe: each format's float64 kernels cost 15-40 s of compilation on
# a fresh cache; the float64 ∇Y is cast the same way whatever the format (the suite's time)
@pytest.mark.parametrize("recipe, dtype", [(r, d) for r in ("fqt-psq-8", "fqt-ptq-4", "fqt-psq-8a", "fqt-psq-fp8")
                                           for d in (torch.float32, torch.bfloat16, torch.float64)
                                           if d != torch.float64 or r == "fqt-psq-8"], ids=str)
def test_conv_pair_gives_bitwise_the_separate_gradients(recipe: str, dtype: torch.dtype,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Conv2d (stride 1, stride 2 with groups, 1×1) and Conv1d: the convolution's pair of
    ∇Y quantizations (N, C_out·L) and (C_out, N·L) from one kernel, bitwise the
    gradients of the two separate quantizer calls — float32, bfloat16 and float64 models
    (the separate calls quantize ``∇Y`` as float32)."""
    calls: list[bool] = []
    fused = _conv_grads(recipe, True, monkeypatch, calls, dtype)
    apart = _conv_grads(recipe, False, monkeypatch, [], dtype)
    assert calls == [True] * 4  # every conv's backward took the one-kernel path
    for a, b in zip(fused, apart):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("layout", ["contiguous", "channels-last"])
@pytest.mark.parametrize("fmt", ["int8", "int4a", "fp8_e5m2"])
def test_conv_pair_operands_equal_quantize_gradient_on_each_path(fmt: str, layout: str) -> None:
    """A convolution's ∇Y (N, C_out, H'·W'): the pair's operands are those of
    ``quantize_gradient`` on (N, C_out·H'·W') and on (C_out, N·H'·W'), whichever kernel
    runs it (the AVX-512 one takes contiguous int8 grids; the compiled one the rest)."""
    g4 = torch.randn(16, 24, 14, 14) * torch.rand(1, 24, 1, 1).pow(3)
    if layout == "channels-last":
        g4 = g4.contiguous(memory_format=torch.channels_last)
    g = g4.reshape(16, 24, 196)
    spec_a, spec_w = GradSpec(quantizer="psq", format=fmt), GradSpec(quantizer="psq", format="int8")
    k = kernels_for(Backend.AUTO, g.device)
    pair = quantize_grad_pair(g, spec_a, torch.Generator().manual_seed(1), spec_w,
                              torch.Generator().manual_seed(2), k)
    assert pair is not None
    want_a = quantize_gradient(g.reshape(16, -1), spec_a, torch.Generator().manual_seed(1), k)
    want_w = quantize_gradient(g.transpose(0, 1).reshape(24, -1), spec_w, torch.Generator().manual_seed(2), k)
    _assert_same_operands(pair, (want_a, want_w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", ["int8", "int4", "int4a", "fp8_e4m3"])
@pytest.mark.parametrize("quantizer", ["ptq", "psq"])
def test_conv_grad_w_alone_equals_quantize_gradient(quantizer: str, fmt: str, dtype: torch.dtype) -> None:
    """The ∇W side of a convolution's ∇Y (N, C_out, L) alone (when a row-mixing ∇X
    quantizer keeps the pair apart), read in place: the operand of ``quantize_gradient``
    on the channel-major copy (C_out, N·L), codes and scales, with segment tails and a
    NaN (its channel's step NaN, every code of it a NaN code; an FP8 NaN code's sign bit
    is allowed to differ: the reference's own sign depends on memory layout)."""
    from lowbit.gradpair import quantize_grad_w
    from lowbit.kernels import avx512

    g = (torch.randn(6, 20, 37) * torch.rand(1, 20, 1).pow(3)).to(dtype)
    g[2, 5, 11] = float("nan")
    k = kernels_for(Backend.AUTO, g.device)
    for rounding in ("stochastic", "nearest"):
        spec = GradSpec(quantizer=quantizer, format=fmt, rounding=rounding)
        got = quantize_grad_w(g, spec, torch.Generator().manual_seed(4), k)
        want = quantize_gradient(g.transpose(0, 1).reshape(20, -1), spec, torch.Generator().manual_seed(4), k)
        assert got.codes.shape == want.codes.shape and (got.offset is None) == (want.offset is None)
        assert got.offset is None or avx512._same(got.offset, want.offset)
        if fmt.startswith("fp8"):
            assert avx512._same_fp8(got.codes, want.codes)
        else:
            assert torch.equal(got.codes.view(torch.uint8), want.codes.view(torch.uint8))
        assert avx512._same(got.scale, want.scale)  # NaN where the other is NaN
    # not for a row-mixing quantizer, a predicted range or the reference backend: nothing drawn
    gen = torch.Generator().manual_seed(4)
    state = gen.get_state()
    assert quantize_grad_w(g, GradSpec(quantizer="bhq"), gen, k) is None
    assert quantize_grad_w(g, GradSpec(), gen, kernels_for(Backend.REFERENCE, g.device)) is None
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("recipe", ["fqt-bhq-8", "fqt-hadamard-4"])
def test_conv_grad_w_alone_gives_bitwise_the_copied_path(recipe: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-mixing ∇X quantizers: the convolutions' gradients with the ∇W side read in
    place equal those with the channel-major copy, bit for bit, and the in-place path ran."""
    import lowbit.conv as conv

    def grads(in_place: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, stride=2, padding=1))
        lowbit.convert(model, FQTConfig.from_recipe(recipe, seed=3))
        x = torch.randn(8, 3, 16, 16, requires_grad=True)
        if not in_place:
            monkeypatch.setattr(conv, "quantize_grad_w", lambda *a: None)
        model(x).square().mean().backward()
        monkeypatch.undo()
        return [x.grad, *(p.grad for p in model.parameters())]

    calls: list[bool] = []
    real = conv.quantize_grad_w
    monkeypatch.setattr(conv, "quantize_grad_w", lambda *a: calls.append(True) or real(*a))
    fast = grads(True)
    assert len(calls) == 2
    for a, b in zip(fast, grads(False), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quantizer", ["ptq", "psq"])
def test_batched_grad_w_alone_equals_quantize_gradient(quantizer: str, dtype: torch.dtype) -> None:
    """The ∇W side of attention's batched gradient (B, N, out) alone (when a row-mixing
    ∇X quantizer keeps the pair apart), read as it lies: the operand of
    ``quantize_gradient`` on the transposed copy (B·out, N), codes and scales, with a NaN
    (its row's step NaN) and tails of the 16-lane tiles; nothing drawn where it does not
    apply."""
    from lowbit.gradpair import quantize_grad_w
    from lowbit.kernels import avx512

    g = (torch.randn(5, 37, 20) * torch.rand(1, 1, 20).pow(3)).to(dtype)
    g[2, 11, 5] = float("nan")
    k = kernels_for(Backend.AUTO, g.device)
    for rounding in ("stochastic", "nearest"):
        spec = GradSpec(quantizer=quantizer, format="int8", rounding=rounding)
        got = quantize_grad_w(g, spec, torch.Generator().manual_seed(4), k, batched=True)
        want = quantize_gradient(g.mT.reshape(-1, 37), spec, torch.Generator().manual_seed(4), k)
        assert got.codes.shape == want.codes.shape == (100, 37)
        assert torch.equal(got.codes, want.codes) and avx512._same(got.scale, want.scale)
    gen = torch.Generator().manual_seed(4)
    state = gen.get_state()
    assert quantize_grad_w(g, GradSpec(quantizer="hadamard"), gen, k, batched=True) is None
    assert quantize_grad_w(g, GradSpec(), gen, kernels_for(Backend.REFERENCE, g.device), batched=True) is None
    assert torch.equal(gen.get_state(), state)


@pytest.mark.parametrize("recipe", ["fqt-bhq-8", "fqt-hadamard-8", "fqt-bhq-4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_grad_w_alone_gives_bitwise_the_transposed_path(recipe: str, dtype: torch.dtype,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-mixing ∇X quantizers in attention: ∇Q, ∇K, ∇V with the ∇W sides of ∇O and ∇S
    read as they lie equal those with the transposed copies, bit for bit, and the
    in-place path ran for both — beside the rows per head (``quantize_grad_pair_mixed``
    with the entries: the entries' column ranges from the rows' read), which equals the
    two apart (the ∇W side alone, ``quantize_grad_w``) too."""
    import lowbit.attention as att
    import lowbit.gradpair as gp

    state = lowbit.functional.block_state(FQTConfig.from_recipe(recipe, seed=3))

    def grads() -> list[torch.Tensor]:
        state.noise.load_state_dict({**state.noise.state_dict(), "counter": 0})  # the same noise each time
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 3, 64, 16, dtype=dtype).mul_(torch.rand(2, 3, 64, 1, dtype=dtype) * 8)
                   .requires_grad_() for _ in range(3))
        att.attention(q, k, v, is_causal=True, state=state)[0].square().sum().backward()
        return [q.grad, k.grad, v.grad]

    calls: list[bool] = []
    mixed: list[bool] = []
    real, real_mixed = att.quantize_grad_w, gp.quantize_grad_pair_mixed

    def counted(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        out = real(*a, **kw)
        calls.append(out is not None)
        return out

    def counted_mixed(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        out = real_mixed(*a, **kw)
        mixed.append(out is not None)
        return out
    monkeypatch.setattr(att, "quantize_grad_w", counted)
    monkeypatch.setattr(gp, "quantize_grad_pair_mixed", counted_mixed)
    fast = grads()
    assert (mixed, calls) == ([True, True], [])  # ∇O and ∇S, in place
    monkeypatch.setattr(gp, "quantize_grad_pair_mixed", lambda *a, **kw: None)  # apart, ∇W in place
    apart = grads()
    assert calls == [True, True]
    monkeypatch.setattr(att, "quantize_grad_w", lambda *a, **kw: None)  # apart, ∇W from transposed copies
    for a, b, c in zip(fast, apart, grads(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_pair_refuses_other_shapes() -> None:
    g = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"\(N, out\) or \(N, C_out, L\)"):
        quantize_grad_pair(g, GradSpec(), None, GradSpec(), None, kernels_for(Backend.AUTO, g.device))


@pytest.mark.parametrize("layout", ["contiguous", "strided-entries"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "int4a", "fp8_e5m2"])
def test_batched_pair_operands_equal_quantize_gradient_on_each_path(fmt: str, layout: str) -> None:
    """A batch of gradients (B, N, out) — attention's ∇O or ∇S, one entry per (batch,
    head) —: the pair's operands are those of ``quantize_gradient`` on (B·N, out) and on
    each entry's transpose (B·out, N), whichever kernel runs it."""
    g = torch.randn(6, 70, 96) * torch.rand(6, 1, 96).pow(3)
    if layout == "strided-entries":  # entries with a row stride beyond their width
        g = torch.randn(6, 70, 128)[:, :, 16:112]
    spec_a, spec_w = GradSpec(quantizer="psq", format=fmt), GradSpec(quantizer="ptq", format="int8")
    k = kernels_for(Backend.AUTO, g.device)
    pair = quantize_grad_pair(g, spec_a, torch.Generator().manual_seed(1), spec_w,
                              torch.Generator().manual_seed(2), k, batched=True)
    assert pair is not None
    want_a = quantize_gradient(g.reshape(-1, 96), spec_a, torch.Generator().manual_seed(1), k)
    want_w = quantize_gradient(g.mT.reshape(-1, 70), spec_w, torch.Generator().manual_seed(2), k)
    _assert_same_operands(pair, (want_a, want_w))
    with pytest.raises(ValueError, match="batched=True"):
        quantize_grad_pair(g[0], spec_a, None, spec_w, None, k, batched=True)


@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fqt-ptq-4", "fqt-psq-8a", "fqt-psq-fp8"])
@pytest.mark.parametrize("variant", ["causal-gqa", "mask-grad-dropout"])
def test_attention_pair_gives_bitwise_the_separate_gradients(recipe: str, variant: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """lowbit's attention: ∇O (for ∇P and ∇V) and ∇S (for ∇Q and ∇K) each quantized both
    ways from one read, bitwise the gradients of the separate quantizer calls — with a
    causal mask and grouped key/value heads, and with a float mask that wants its own
    gradient and dropout."""
    import lowbit.attention as A

    _assert_attention_pair_bitwise_apart(recipe, variant, 96, monkeypatch, A, "quantize_grad_pair")


def test_attention_runs_a_predicted_recipe_as_dynamic_with_its_pair(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new user's trial: attention reads a predicted-range gradient spec as dynamic
    (it keeps no range history), but handed the spec on as predicted, so ∇O's and ∇S's
    pair kernel declined it, and its repr showed ``~pred``. Now it runs the pair, and
    shows the ranges it uses."""
    import lowbit.attention as A

    _assert_attention_pair_bitwise_apart("fqt-psq-8-predicted", "causal-gqa", 96, monkeypatch, A,
                                         "quantize_grad_pair")
    layer = lowbit.convert(nn.Sequential(lowbit.ScaledDotProductAttention()),
                           FQTConfig.from_recipe("fqt-psq-4-predicted", seed=0))
    assert "~pred" not in repr(layer) and "gi:psq4/gw:psq8" in repr(layer)


@pytest.mark.parametrize("recipe", ["fqt-hadamard-8", "fqt-hadamard-4", "fqt-bhq-8"])
@pytest.mark.parametrize("variant", ["causal-gqa", "mask-grad-dropout"])
def test_attention_mixed_pair_gives_bitwise_the_separate_gradients(recipe: str, variant: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """lowbit's attention under a row-mixing ``∇X`` quantizer (Hadamard, BHQ): ∇O and ∇S
    each quantized as transformed rows and each head's columns from one read
    (``quantize_grad_pair_mixed`` with the heads as entries), bitwise the gradients of
    the separate calls — heads of 128 rows (Hadamard's blocks within a head: the integer
    path) with a causal mask and grouped key/value heads, and of 96 rows (blocks across
    heads) with a float mask that wants its gradient and dropout."""
    import lowbit.attention as A

    _assert_attention_pair_bitwise_apart(recipe, variant, 128 if variant == "causal-gqa" else 96, monkeypatch,
                                         A.gradpair, "quantize_grad_pair_mixed")


def test_attention_pair_draws_in_the_separate_calls_order_from_the_global_generator() -> None:
    """Without generators (``attention_backward`` with ``gens={}``: every path draws from
    torch's global RNG) the pairs draw their seeds in the order the separate calls did
    (∇Oᵀ before ∇O, ∇S before ∇Sᵀ), so the gradients are bitwise the same."""
    import lowbit.attention as A
    from lowbit.config import FQTConfig as Cfg

    cfg = Cfg.from_recipe("fqt-psq-8", seed=0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 64, 16, generator=g) for _ in range(3))
    runs = []
    for pair in (True, False):
        real = A.quantize_grad_pair
        if not pair:
            A.quantize_grad_pair = lambda *a, **kw: None
        try:
            torch.manual_seed(7)
            o, probs, _, keep, quant = A.attention_forward(q, k, v, None, 0.25, 0.0, cfg, {})
            runs.append(A.attention_backward(2 * o, None, quant, probs, keep, (6, 64, 64, 16, 16), 0.25,
                                             0.0, cfg, {}, (True, True, True, False)))
        finally:
            A.quantize_grad_pair = real
    for a, b in zip(*runs):
        assert (a is None and b is None) or torch.equal(a, b)
