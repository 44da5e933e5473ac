"""The training-step workloads of the CPU benchmarks (bench_step.py, bench_first_step.py).

Each workload is a model, its inputs and a loss of its output; one training step is
``loss(model(*inputs)).backward()`` (forward + backward, gradients for the inputs too
where they are floating, no optimizer). Shapes (``size="full"``; ``"tiny"`` for smoke
runs):

  ffn         Linear(1024→4096) → GELU → Linear(4096→1024) on 2048 tokens
  gpt         the text task's TinyGPT: 4 layers, width 256, 4 heads, 16 × 128 tokens
  gpt2-block  one GPT-2-small-shaped block (pre-LayerNorm; width 768, 12 heads, MLP
              3072) on 4 × 512 tokens: lowbit.experiments.models.Block
  cnn         PreAct-ResNet-20 (widths 16/32/64), batch 128 of 1×28×28, 10 classes
  cnn-cl      the same model and batch in channels-last memory
              (``model.to(memory_format=torch.channels_last)``, PyTorch's advice for
              CNNs on CPU: BatchNorm and ReLU run faster there)

The attention of ``gpt`` and ``gpt2-block`` is a ``ScaledDotProductAttention`` module,
which ``lowbit.convert`` swaps for lowbit's quantized attention when this lowbit has it:
:func:`attention_note` says which ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

WORKLOADS = ("ffn", "gpt", "gpt2-block", "cnn", "cnn-cl")


@dataclass
class Workload:
    """``model``; ``inputs`` (passed as ``model(*inputs)``); ``loss`` of the output."""

    name: str
    model: nn.Module
    inputs: tuple[Any, ...]
    loss: Callable[[Any], torch.Tensor]

    def step_loss(self) -> torch.Tensor:
        return self.loss(self.model(*self.inputs))


def _square_mean(out: torch.Tensor) -> torch.Tensor:
    return out.float().square().mean()


def build(workload: str, size: str = "full") -> Workload:
    """The seeded model, inputs and loss of ``workload`` (module docstring)."""
    torch.manual_seed(0)
    full = size == "full"
    g = torch.Generator().manual_seed(0)
    if workload == "ffn":
        d, f, t = (1024, 4096, 2048) if full else (64, 128, 64)
        model: nn.Module = nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d))
        x = torch.randn(t, d, generator=g, requires_grad=True)  # (T, D)
        return Workload(workload, model, (x,), _square_mean)
    if workload == "gpt":
        from lowbit.experiments.models import TinyGPT

        layers, width, batch, block = (4, 256, 16, 128) if full else (2, 64, 2, 16)
        model = TinyGPT(block_size=block, n_layer=layers, n_head=4, n_embd=width)
        idx = torch.randint(0, 256, (batch, block), generator=g)  # (B, T)
        tgt = torch.randint(0, 256, (batch, block), generator=g)
        return Workload(workload, model, (idx, tgt), lambda out: out[1].float())
    if workload == "gpt2-block":
        from lowbit.experiments.models import Block

        width, heads, batch, tokens = (768, 12, 4, 512) if full else (64, 4, 2, 16)
        model = Block(width, heads)  # MLP 4 × width = 3072
        x = torch.randn(batch, tokens, width, generator=g, requires_grad=True)  # (B, T, C)
        return Workload(workload, model, (x,), _square_mean)
    if workload in ("cnn", "cnn-cl"):
        from lowbit.experiments.models import preact_resnet20

        batch, side = (128, 28) if full else (4, 8)
        model = preact_resnet20(num_classes=10, in_channels=1)
        x = torch.randn(batch, 1, side, side, generator=g)  # (N, 1, H, W)
        y = torch.randint(0, 10, (batch,), generator=g)
        if workload == "cnn-cl":
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        return Workload(workload, model, (x,), lambda out: F.cross_entropy(out.float(), y.to(out.device)))
    raise ValueError(f"unknown workload {workload!r}; allowed: {', '.join(WORKLOADS)}")


def attention_note(model: nn.Module) -> str:
    """How the model's attention runs after conversion: ``""`` for a model without
    attention, ``"attention low-bit"`` where lowbit swapped its attention modules for
    quantized ones (``FQT…Attention``), else ``"attention float"``."""
    names = [type(m).__name__ for m in model.modules()]
    if not any("Attention" in n for n in names):
        return ""
    lowbit_attn = any(n.startswith("FQT") and "Attention" in n for n in names)
    return "attention low-bit" if lowbit_attn else "attention float"
