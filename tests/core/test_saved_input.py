"""A block saves its input instead of its codes where autograd keeps that input anyway.

Issue 14 (peak memory): after a ReLU, which keeps its output for its own backward, a
converted convolution or Linear saves that same tensor and quantizes it again in the
backward (``lowbit.ops.kept_by_autograd``, ``SHARE_SAVED_INPUT``) instead of holding its
int8 codes beside it. Round-to-nearest makes the codes a function of x alone, so every
gradient is bitwise the one the saved codes give (same seed, same noise); where the codes
could differ (a stochastic-rounding activation) or nothing else keeps x (a leaf, a GELU's
output, saved-tensor hooks), the codes are saved as before.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import FQTConfig, OperandSpec, ops


def _model(kind: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "conv":
        layer, x = nn.Conv2d(4, 6, 3, padding=1), torch.randn(3, 4, 6, 6)
    elif kind == "conv-cl":
        layer, x = nn.Conv2d(4, 6, 3, padding=1), torch.randn(3, 4, 6, 6)
        layer, x = layer.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    elif kind == "conv1d":
        layer, x = nn.Conv1d(4, 6, 3, padding=1), torch.randn(3, 4, 9)
    else:
        layer, x = nn.Linear(8, 5), torch.randn(7, 8)
    return layer, x.requires_grad_()


def _run(kind: str, recipe: str, share: bool, act=F.relu, autocast: bool = False,
         hooks: bool = False, **overrides) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(output and gradients, what the block saved, the block's input)."""
    layer, x = _model(kind)
    m = lowbit.convert(layer, FQTConfig.from_recipe(recipe, seed=3, **overrides))
    old, ops.SHARE_SAVED_INPUT = ops.SHARE_SAVED_INPUT, share
    try:
        with torch.autocast("cpu", torch.bfloat16) if autocast else contextlib.nullcontext(), \
                torch.autograd.graph.save_on_cpu() if hooks else contextlib.nullcontext():
            h = act(x * 1.5)
            y = m(h)
        node = y.grad_fn
        while type(node).__name__.startswith(("Squeeze", "View", "Reshape", "UnsafeView")):
            node = node.next_functions[0][0]
        saved = list(node.saved_tensors) if not hooks else []
        y.float().square().sum().backward()
    finally:
        ops.SHARE_SAVED_INPUT = old
    return [y.detach(), x.grad, m.weight.grad, m.bias.grad], saved, h


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fqt-bhq-4", "fqt-hadamard-8", "fqt-psq-mxfp8",
                                    "fqt-psq-nvfp4", "fp8-rowwise", "qat-4"])
@pytest.mark.parametrize("kind", ["conv", "conv-cl", "conv1d", "linear"])
def test_saving_the_input_gives_the_gradients_of_the_saved_codes(kind: str, recipe: str,
                                                                 autocast: bool) -> None:
    """Bitwise equal output and gradients (x, W, b) with the input saved as with its codes;
    the block then holds no code tensor of x's size, only x itself (ReLU's own tensor)."""
    shared, saved, h = _run(kind, recipe, True, autocast=autocast)
    codes, saved_codes, _ = _run(kind, recipe, False, autocast=autocast)
    for a, b in zip(shared, codes):
        assert torch.equal(a, b)
    assert saved[0].data_ptr() == h.data_ptr() and saved[0].dtype == h.dtype
    assert saved_codes[0].data_ptr() != h.data_ptr() and saved_codes[0].numel() == h.numel()
    assert len(saved) == len(saved_codes) - 3  # x for its codes, scale, offset, block scale


@pytest.mark.parametrize("case", ["stochastic-activation", "leaf", "gelu", "saved-tensor-hooks",
                                  "switched-off"])
def test_codes_are_saved_where_the_input_would_cost_memory_or_change_them(case: str) -> None:
    kw: dict = {}
    if case == "stochastic-activation":  # codes of another draw in the backward: not the same
        kw = {"activation": OperandSpec(bits=8, rounding="stochastic")}
    act = {"leaf": lambda t: t.detach().requires_grad_(), "gelu": F.gelu}.get(case, F.relu)
    if case == "saved-tensor-hooks":  # what is saved is the hooks' decision: codes, as before
        layer, x = _model("conv")
        m = lowbit.convert(layer, FQTConfig.from_recipe("fqt-psq-8", seed=3))
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            h = F.relu(x)
            assert not ops.kept_by_autograd(h)
            y = m(h)
        assert y.grad_fn.saved_tensors[0].dtype == torch.int8
        return
    _, saved, h = _run("conv", "fqt-psq-8", case != "switched-off", act=act, **kw)
    assert saved[0].dtype == torch.int8 and saved[0].numel() == h.numel()


def test_inplace_change_of_the_saved_input_raises_as_for_the_float_module() -> None:
    """The saved input is ReLU's output; changing it in place after the block is
    autograd's error for the float model too (ReLU saved it): the same kind."""
    for fqt in (False, True):
        layer, x = _model("conv")
        m = lowbit.convert(layer, FQTConfig.from_recipe("fqt-psq-8" if fqt else "fp"))
        h = F.relu(x)
        y = m(h)
        h.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_kept_by_autograd_names_the_outputs_nodes_keep() -> None:
    x = torch.randn(5, requires_grad=True)
    assert ops.kept_by_autograd(torch.relu(x)) and ops.kept_by_autograd(torch.sigmoid(x))
    assert not ops.kept_by_autograd(F.gelu(x))  # GELU keeps its input
    assert not ops.kept_by_autograd(x)  # a leaf
    assert not ops.kept_by_autograd(torch.relu(x).view(5, 1))  # a view: another tensor


@pytest.mark.parametrize("end", ["relu", "batchnorm"])
def test_a_checkpointed_producer_is_not_recomputed_by_the_check(end: str) -> None:
    """A checkpointed segment feeding a converted layer: the check reads what the
    segment's last node saved without unpacking it (unpacking recomputes the segment:
    BatchNorm's running statistics updated again, the recomputed activations held), and
    the block saves its codes there (the checkpoint decides what lives)."""
    import torch.utils.checkpoint as cp

    counts = {}
    for share in (False, True):
        old, ops.SHARE_SAVED_INPUT = ops.SHARE_SAVED_INPUT, share
        try:
            torch.manual_seed(0)
            seg = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                *([nn.ReLU()] if end == "relu" else []))
            head = lowbit.convert(nn.Conv2d(8, 4, 3, padding=1), FQTConfig.from_recipe("fqt-psq-8", seed=3))
            h = cp.checkpoint(seg, torch.randn(2, 3, 6, 6), use_reentrant=False)
            assert not ops.kept_by_autograd(h)
            head(h).square().sum().backward()
            counts[share] = (int(seg[1].num_batches_tracked), head.weight.grad.clone())
        finally:
            ops.SHARE_SAVED_INPUT = old
    assert counts[True][0] == counts[False][0] == 2  # the forward and the checkpoint's one recomputation
    assert torch.equal(counts[True][1], counts[False][1])


def test_a_producer_whose_saved_tensors_were_freed_is_not_an_error() -> None:
    """The producer's backward already ran (its saved output freed): the layer's forward
    runs as before, saving its codes."""
    torch.manual_seed(0)
    c1 = nn.Conv2d(3, 8, 3, padding=1)
    c2 = lowbit.convert(nn.Conv2d(8, 6, 3, padding=1), FQTConfig.from_recipe("fqt-psq-8", seed=3))
    h = F.relu(c1(torch.randn(2, 3, 7, 7, requires_grad=True)))
    h.sum().backward()  # frees ReLU's saved output
    assert not ops.kept_by_autograd(h)
    (g,) = torch.autograd.grad(c2(h).square().sum(), c2.weight)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_codes_made_again_carry_no_autograd_history() -> None:
    """Under a recorded (create_graph) backward the codes made again from x are made
    without history: the weight gradient of a QAT layer has none, as with saved codes."""
    torch.manual_seed(0)
    m = lowbit.convert(nn.Linear(8, 5), FQTConfig.from_recipe("qat-8"))
    x = torch.randn(7, 8, requires_grad=True)
    h = F.relu(x)
    y = m(h)
    assert type(y.grad_fn).__name__.startswith("_EagerBlock") and y.grad_fn.saved_tensors[0].data_ptr() == h.data_ptr()
    with ops.gradient_only_double_backward():
        # a loss linear in y: ∇Y is a constant, so ∇W = ∇Yᵀ·Q(x) has no history either
        (gw,) = torch.autograd.grad((y * torch.linspace(-1, 1, 5)).sum(), m.weight, create_graph=True)
    assert not gw.requires_grad
