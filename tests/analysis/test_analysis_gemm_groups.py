"""Every converted module that owns a weight GEMM is a parameter group of its own, and
attention's unbounded noise blanks only the groups it reaches (a review, 2026-12-07).

The analysis grouped by ``lowbit.nn.fqt_weight_layers`` (Linear, Conv2d, Conv1d): a Hugging
Face GPT-2's ``Conv1D`` layers — almost all its GEMMs — and an ``nn.MultiheadAttention``'s
``in_proj_weight`` were lumped into ``"other"`` with the norms and embeddings, and any
quantized attention product that ran set every group's bound to NaN, the layers after it
(whose gradients its noise never reaches) included.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import FQTConfig
from lowbit.analysis import gradient_variance, jacobian_spectrum, variance_profile
from lowbit.analysis._model import parameter_groups, qat_of

CFG = FQTConfig.from_recipe("fqt-psq-8", seed=0)


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


class Attn(nn.Module):
    """A Linear, a self-attention ``nn.MultiheadAttention``, then two Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.attn = nn.Linear(6, 16), nn.MultiheadAttention(16, 2, batch_first=True)
        self.mid, self.head = nn.Linear(16, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.mid(h))).mean(1)


def _attn_batches(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 5, 6, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def _attn_model() -> nn.Module:
    torch.manual_seed(0)
    return lowbit.convert(Attn(), CFG)


def test_a_multihead_attentions_in_projection_is_a_group_under_its_name() -> None:
    m = _attn_model()
    assert parameter_groups(m) == {
        "inp": ["inp.weight", "inp.bias"], "attn": ["attn.in_proj_weight", "attn.in_proj_bias"],
        "attn.out_proj": ["attn.out_proj.weight", "attn.out_proj.bias"],
        "mid": ["mid.weight", "mid.bias"], "head": ["head.weight", "head.bias"]}  # no "other"
    rep = gradient_variance(m, _ce, _attn_batches(), repeats=3, bound_batches=1)
    assert list(rep.groups) == ["inp", "attn", "attn.out_proj", "mid", "head", "total"]
    # the packed projection that ran has its quantizer noise; the alternatives never ran
    assert "attn.projections.qkv" in rep.layers and rep.layers["attn.projections.qkv"].gi_expected > 0
    assert not any(n.startswith("attn.projections.") and n != "attn.projections.qkv" for n in rep.layers)
    # its ∇W-path noise lands in the attention's group; out_proj's ∇X noise reaches it
    assert rep.pairs_data["attn.projections.qkv"]["attn"] > 0
    prof = variance_profile(m, _ce, _attn_batches(1), repeats=2)
    assert prof.layers == ["inp", "attn.projections.qkv", "attn.out_proj", "mid", "head"]


def test_attention_blanks_the_bound_of_the_groups_upstream_of_it_only() -> None:
    """The review's "an attention that ran blanks all groups' bounds": the Linears after it
    keep a finite bound (which holds); the groups its noise reaches, and the total, are
    undecided, named with the block in ``unbounded`` and the table's note."""
    rep = gradient_variance(_attn_model(), _ce, _attn_batches(), repeats=3, bound_batches=1)
    for g in ("attn.out_proj", "mid", "head"):
        assert math.isfinite(rep.groups[g].pred_data) and rep.groups[g].pred_data > 0, g
        assert math.isfinite(rep.groups[g].tightness_analytic), g
    for g in ("inp", "attn", "total"):
        assert math.isnan(rep.groups[g].pred_data), g
    assert rep.unbounded == {g: ["attn.attention"] for g in ("inp", "attn", "total")}
    assert rep.bound_violations() == [] and set(rep.bound_undecided()) == {"inp", "attn", "total"}
    assert "no bound for 'inp', 'attn' and total, which quantized attention products ('attn.attention')" \
        in rep.table()
    assert rep.to_dict()["unbounded"] == rep.unbounded
    # under QAT attention adds no noise: every group is bounded
    qat_attention = _attn_model()
    qat_attention.attn.attention.config = qat_of(CFG)
    rep = gradient_variance(qat_attention, _ce, _attn_batches(), repeats=3, bound_batches=1)
    assert rep.unbounded == {} and all(math.isfinite(g.pred_data) for g in rep.groups.values())


def test_finding_the_reach_leaves_the_model_as_it_was() -> None:
    """``unmodelled_reach`` runs a QAT forward and backward: every noise stream (a review:
    its backward ran under the model's own low-bit config, after the streams were
    restored, so the blocks upstream of the attention drew noise and took one step more
    than those after it) and the blocks' methods (its ``attend``
    wrapper is an instance attribute: left in place it would collect every later output
    and make the model unpicklable) are as before."""
    import pickle

    from lowbit.analysis.bounds import unmodelled_reach

    m = _attn_model()
    blocks = {"attn.attention": m.attn.attention}
    before = lowbit.nn.rng_state(m)
    m.attn.attention.ran = False
    reach = unmodelled_reach(m, _ce, _attn_batches(1)[0], parameter_groups(m), blocks)
    assert reach == {"attn.attention": ["inp", "attn"]}
    assert lowbit.nn.rng_state(m) == before
    assert m.attn.attention.ran  # as the forward leaves it (it ran)
    assert "attend" not in vars(m.attn.attention)
    pickle.dumps(m)
    rep = gradient_variance(m, _ce, _attn_batches(), repeats=2, bound_batches=1)
    assert rep.unbounded and "attend" not in vars(m.attn.attention)


def test_a_block_that_ran_unseen_reaches_every_group() -> None:
    """A block whose output is not seen (computed past ``__call__`` and ``attend``) but
    whose ``ran`` flag says it ran: its reach is not ruled out, every group; one that did
    not run reaches none. ``ran`` flags are left as running the model leaves them."""
    from lowbit.analysis.bounds import unmodelled_reach
    from lowbit.attention_modules import FQTScaledDotProductAttention

    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)
            self.odd = FQTScaledDotProductAttention(config=CFG)
            self.idle = FQTScaledDotProductAttention(config=CFG)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.odd.ran = True  # as a method other than attend would
            return self.b(self.a(x))

    m = lowbit.convert(M(), CFG)
    groups = parameter_groups(m)
    reach = unmodelled_reach(m, lambda mod, b: mod(b).sum(), torch.randn(3, 4), groups,
                             {"odd": m.odd, "idle": m.idle})
    assert reach == {"odd": ["a", "b"]} and m.odd.ran and not m.idle.ran


def test_an_in_projection_is_propagated_through_as_a_linear() -> None:
    """Its ∇X noise reaches the groups upstream of it, not its own weight (that is the ∇W
    path): its spectrum row has ``inp``, not ``attn``; out_proj's reaches ``attn``."""
    m = _attn_model()
    sp = jacobian_spectrum(m, _ce, _attn_batches(1)[0], mode="pairs", iters=3)
    assert set(sp.lam["attn.projections.qkv"]) == {"inp"}
    assert {"inp", "attn"} <= set(sp.lam["attn.out_proj"])
    assert "attn.projections.qkv" in sp.gram and "attn.projections.q" not in sp.gram


def test_cross_attention_and_separate_projection_weights_are_grouped_too() -> None:
    """``key is value`` (projections ``q`` and ``kv``, slices of ``in_proj_weight``) and
    ``kdim != embed_dim`` (``q/k/v_proj_weight``): each GEMM is a layer, all in the group of
    the attention module."""
    class Cross(nn.Module):
        def __init__(self, kdim: int | None) -> None:
            super().__init__()
            self.q, self.mem = nn.Linear(6, 16), nn.Linear(6, kdim or 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True, kdim=kdim, vdim=kdim)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            mem = self.mem(x)
            return self.head(self.attn(self.q(x), mem, mem, need_weights=False)[0]).mean(1)

    for kdim, own, layers in ((None, ["attn.in_proj_weight", "attn.in_proj_bias"], {"q", "kv"}),
                              (8, ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight",
                                   "attn.in_proj_bias"], {"q", "k", "v"})):
        torch.manual_seed(0)
        m = lowbit.convert(Cross(kdim), CFG)
        assert parameter_groups(m)["attn"] == own
        rep = gradient_variance(m, _ce, _attn_batches(), repeats=3, bound_batches=1)
        assert {n.rpartition(".")[2] for n in rep.layers if n.startswith("attn.projections.")} == layers
        assert math.isfinite(rep.groups["head"].pred_data) and math.isnan(rep.groups["attn"].pred_data)
        assert all(rep.pairs_data[f"attn.projections.{r}"]["attn"] > 0 for r in layers)  # their ∇W noise


# -- Hugging Face Conv1D --------------------------------------------------------------------
needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers (an optional dependency) is not installed")


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(bos_token_id=0, eos_token_id=0, vocab_size=50, n_layer=1, n_embd=32, n_head=2,
                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return lowbit.convert(GPT2LMHeadModel(cfg), FQTConfig.from_recipe("fqt-psq-8"))


def _lm(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


@needs_transformers
def test_hf_gpt2_conv1d_layers_are_groups_of_their_own() -> None:
    m = _gpt2()
    groups = parameter_groups(m)
    conv1d = [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert list(groups) == [*conv1d, "lm_head", "other"]
    for name in conv1d:
        assert groups[name] == [f"{name}.weight", f"{name}.bias"]
    assert groups["lm_head"] == ["transformer.wte.weight"]  # tied
    assert groups["other"] == ["transformer.wpe.weight", "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
                               "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
                               "transformer.ln_f.weight", "transformer.ln_f.bias"]
    ids = torch.randint(0, 50, (24, 8), generator=torch.Generator().manual_seed(0))
    rep = gradient_variance(m, _lm, [ids[i:i + 8] for i in range(0, 24, 8)], repeats=3, bound_batches=1)
    assert set(rep.layers) == {*conv1d, "lm_head"}
    # after the attention product: bounded (and the bound holds); at or before it: undecided
    for name in conv1d[1:]:
        assert math.isfinite(rep.groups[name].pred_data) and rep.groups[name].pred_data > 0, name
    assert set(rep.unbounded) == {conv1d[0], "lm_head", "other", "total"}
    assert rep.bound_violations() == [] and rep.bound_violations("analytic") == []


class _Net(nn.Module):
    def __init__(self, layer: type) -> None:
        super().__init__()
        self.a, self.b = layer(10, 16), layer(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@needs_transformers
def test_a_conv1d_is_measured_and_bounded_as_the_linear_it_computes() -> None:
    """``Conv1D`` holds ``Wᵀ`` and runs ``fqt_linear(x, Wᵀ, b)`` with the noise stream an
    ``FQTLinear`` of its name would have: the same model built of Linears gives the same
    groups, measurements, per-layer noise and bounds."""
    from transformers.pytorch_utils import Conv1D

    lin = _Net(lambda i, o: nn.Linear(i, o))
    conv = _Net(lambda i, o: Conv1D(o, i))
    with torch.no_grad():
        for name in ("a", "b"):
            getattr(conv, name).weight.copy_(getattr(lin, name).weight.t())
            getattr(conv, name).bias.copy_(getattr(lin, name).bias)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 10, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(3)]
    reps = [gradient_variance(lowbit.convert(net, CFG), _ce, batches, repeats=3, bound_batches=1)
            for net in (lin, conv)]
    assert list(reps[1].groups) == list(reps[0].groups) == ["a", "b", "total"]
    for name, g0 in reps[0].groups.items():
        g1 = reps[1].groups[name]
        for f in ("sgd", "quant", "quant_bound_batches", "pred_data", "pred_analytic"):
            assert getattr(g1, f) == pytest.approx(getattr(g0, f), rel=1e-5), (name, f)
    for name in ("a", "b"):
        assert reps[1].layers[name].gw_exact == pytest.approx(reps[0].layers[name].gw_exact, rel=1e-5)
    # a config passed for an already converted model of Conv1D layers only: swapped in, the
    # model itself measured (it was taken for unconverted, and a deep copy measured)
    m = lowbit.convert(_Net(lambda i, o: Conv1D(o, i)), CFG)
    before = lowbit.nn.rng_state(m)
    calls = []  # the model itself ran (its ran flags are put back afterwards: lowbit.stepstate)
    m.a.register_forward_hook(lambda *_: calls.append(1))
    gradient_variance(m, _ce, batches, FQTConfig.from_recipe("fqt-psq-4", seed=0), repeats=2)
    assert calls and lowbit.nn.rng_state(m) == before and m.a.config == CFG


@needs_transformers
def test_data_parallel_communication_with_conv1d_groups() -> None:
    from lowbit.distributed import GradComm

    m = _gpt2()
    ids = torch.randint(0, 50, (24, 8), generator=torch.Generator().manual_seed(1))
    rep = gradient_variance(m, _lm, [ids[i:i + 8] for i in range(0, 24, 8)], repeats=2, world_size=2,
                            comm=GradComm(bits=4, block=16))
    assert "transformer.h.0.mlp.c_fc" in rep.groups
    assert all(g.comm_expected > 0 for g in rep.groups.values())


def test_the_unbounded_note_quotes_modules_and_leaves_other_and_total_bare() -> None:
    """The table's note and ``lowbit variance``'s name the groups as the table's rows do:
    a converted module quoted, ``other`` and ``total`` bare (a review: ``'other'`` read as a
    module), at most three names, then "…"."""
    from lowbit.analysis.variance import group_label, unbounded_note

    assert [group_label(n) for n in ("0", "other", "total", "")] == ["'0'", "other", "total", "<root>"]
    blocks = ["mha.attention"]
    assert unbounded_note({"mha": blocks, "other": blocks, "total": blocks}) == (
        "no bound for 'mha', other and total, which quantized attention products ('mha.attention') add noise "
        "to (the groups upstream of them)")
    many = {n: [f"b{i}" for i in range(5)] for n in ("a", "b", "c", "d", "total")}
    assert unbounded_note(many).startswith("no bound for 'a', 'b', 'c', … and total, which quantized attention "
                                           "products ('b0', 'b1', 'b2', …)")
