"""Tests for lowbit.experiments.models."""

import pytest
import torch
from torch import nn

from lowbit.experiments import models as M


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_digits_models_shapes(name):
    model = M.build_model("digits", name)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.parametrize("depth, n_conv", [(20, 19), (56, 55)])
def test_preact_resnet_depth(depth, n_conv):
    model = M.PreActResNet(depth)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(convs) == n_conv and len(linears) == 1 and len(convs) + len(linears) == depth


@pytest.mark.parametrize("size", [28, 32])
def test_preact_resnet_shapes(size):
    model = M.build_model("fashion-mnist", "preact-resnet20")
    assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    rgb = M.preact_resnet56(in_channels=3, num_classes=7, widths=(8, 16, 32))
    assert rgb(torch.randn(2, 3, size, size)).shape == (2, 7)
    with pytest.raises(ValueError, match="depth"):
        M.PreActResNet(21)


def test_tiny_gpt_shapes_and_loss():
    model = M.build_model("text", "gpt", block_size=16, n_layer=2, n_head=2, n_embd=32)
    idx = torch.randint(0, 256, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 256) and loss is None
    logits, loss = model(idx, targets=idx)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5
    loss.backward()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_tiny_gpt_is_causal():
    torch.manual_seed(0)
    model = M.TinyGPT(block_size=12, n_layer=2, n_head=2, n_embd=32).eval()
    idx = torch.randint(0, 256, (2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 256
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().amax() > 1e-4


def test_tiny_gpt_gemms_are_plain_linears():
    model = M.TinyGPT(n_layer=1, n_embd=64, n_head=4)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert names == {
        "blocks.0.attn.qkv",
        "blocks.0.attn.proj",
        "blocks.0.mlp.0",
        "blocks.0.mlp.2",
        "head",
    }


def test_registry():
    assert M.MODELS == {
        "digits": ("mlp", "cnn"),
        "fashion-mnist": ("preact-resnet20", "preact-resnet56"),
        "text": ("gpt",),
    }
    for task, name in M.DEFAULT_MODEL.items():
        assert name in M.MODELS[task]
    assert isinstance(M.build_model("digits"), M.DigitsMLP)
    assert isinstance(M.build_model("digits", "mlp", hidden=16), M.DigitsMLP)
    with pytest.raises(ValueError, match="mlp, cnn"):
        M.build_model("digits", "resnet")
    with pytest.raises(ValueError, match="allowed tasks"):
        M.build_model("imagenet", "mlp")
