"""How much of a training step runs low-bit, on a zoo of models: docs/coverage.md.

Each model is built (seeded, random weights), converted with one recipe, and traced for
one training step by ``lowbit.coverage`` on a synthetic batch (coverage depends on shapes
and the recipe, not on values). Printed as Markdown: one summary table, then per model
what stays float and why.

    python benchmarks/coverage_models.py                         # every model, fqt-psq-8
    python benchmarks/coverage_models.py --models vit,mobilenet --recipe fqt-bhq-4 --backend reference

Models: ``tinygpt`` (the text task's TinyGPT, 4×256, 32×128 tokens), ``resnet20``
(PreAct-ResNet-20, 128 Fashion-MNIST-sized images), ``vit`` (a ViT built from
``nn.TransformerEncoder``), ``mha`` (``nn.MultiheadAttention`` alone), ``mobilenet`` (a
MobileNetV2-style CNN: inverted residuals with depthwise 3×3 convolutions), and, when
``transformers`` is installed, ``gpt2``, ``llama`` and ``bert`` from small configs.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.experiments.models import TinyGPT, preact_resnet20

Case = tuple[nn.Module, tuple[Any, ...], dict[str, Any], Callable[[Any], torch.Tensor] | None, str]


# -- models written here ---------------------------------------------------------------------
class ViT(nn.Module):
    """Patch embedding (a stride-``patch`` Conv2d), a class token, learned positions, a
    pre-LayerNorm ``nn.TransformerEncoder`` (GELU MLP) and a linear head."""

    def __init__(self, image: int = 28, patch: int = 4, dim: int = 128, depth: int = 4,
                 heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, patch, stride=patch)
        tokens = (image // patch) ** 2 + 1
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos  # (B, N+1, D)
        return self.head(self.norm(self.encoder(t))[:, 0])  # (B, classes)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` alone, as self-attention (no attention weights returned)."""

    def __init__(self, dim: int = 256, heads: int = 4) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]  # (B, T, D)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expand, 3×3 depthwise, 1×1 project; residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.residual else y


class MobileNet(nn.Module):
    """MobileNetV2-style CNN for 1-channel images: stem, inverted residual stages
    ``(expand, channels, blocks, stride)``, a 1×1 conv to ``last``, pooling, a linear head."""

    def __init__(self, stages: tuple[tuple[int, int, int, int], ...] = (
            (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1)),
            stem: int = 16, last: int = 256, classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem),
                                   nn.ReLU6()]
        c = stem
        for t, c_out, n, s in stages:
            for i in range(n):
                layers.append(InvertedResidual(c, c_out, s if i == 0 else 1, t))
                c = c_out
        layers += [nn.Conv2d(c, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(last, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))  # (B, classes)


# -- the zoo ---------------------------------------------------------------------------------
def _images(model: nn.Module, batch: int, size: int, note: str) -> Case:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return model, (x,), {}, lambda out: F.cross_entropy(out.float(), y), note


def _hf(name: str, tiny: bool) -> Case:
    import transformers as T

    b, t, vocab = (2, 16, 100) if tiny else (8, 128, 1000)
    d, layers, heads = (32, 1, 2) if tiny else (256, 4, 4)
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(0))
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=t)
        model, kw = T.GPT2LMHeadModel(cfg), {"labels": ids}
    elif name == "llama":
        cfg = T.LlamaConfig(hidden_size=d, intermediate_size=int(d * 8 / 3), num_hidden_layers=layers,
                            num_attention_heads=heads, num_key_value_heads=heads // 2,
                            vocab_size=vocab, max_position_embeddings=t)
        model, kw = T.LlamaForCausalLM(cfg), {"labels": ids}
    else:
        cfg = T.BertConfig(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                           intermediate_size=4 * d, vocab_size=vocab, max_position_embeddings=t,
                           num_labels=2)
        model, kw = T.BertForSequenceClassification(cfg), {"labels": torch.arange(b) % 2}
    note = (f"{type(model).__name__}: {layers} layers, width {d}, {heads} heads, vocab {vocab}; "
            f"{b}×{t} tokens; attention: {model.config._attn_implementation}")
    return model, (ids,), kw, None, note


def build(name: str, tiny: bool) -> Case:
    """The model, its inputs, keyword inputs, loss (None: the model's own) and a note."""
    torch.manual_seed(0)
    if name == "tinygpt":
        kw = dict(block_size=16, n_layer=1, n_head=2, n_embd=32) if tiny else {}
        model = TinyGPT(**kw)
        b, t = (2, 16) if tiny else (32, 128)
        x = torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(0))
        return model, (x, torch.roll(x, -1, 1)), {}, None, (
            f"the text task's model: {model.blocks.__len__()} blocks, width "
            f"{model.head.in_features}; {b}×{t} bytes")
    if name == "resnet20":
        b = 4 if tiny else 128
        return _images(preact_resnet20(), b, 28, f"19 convolutions + linear head, 28×28 images, "
                       f"batch {b} (the fashion-mnist task)")
    if name == "vit":
        kw = dict(dim=32, depth=1, heads=2) if tiny else dict(dim=128, depth=4, heads=4)
        b = 2 if tiny else 32
        return _images(ViT(**kw), b, 28, f"28×28 images, patch 4 (50 tokens), width {kw['dim']}, "
                       f"depth {kw['depth']}, {kw['heads']} heads, pre-LN, GELU; batch {b}")
    if name == "mha":
        mha = SelfAttention(32, 2) if tiny else SelfAttention()
        b, t = (2, 8) if tiny else (8, 128)
        x = torch.randn(b, t, mha.attn.embed_dim, generator=torch.Generator().manual_seed(0))
        return mha, (x,), {}, None, f"width {mha.attn.embed_dim}, {mha.attn.num_heads} heads; {b}×{t} tokens"
    if name == "mobilenet":
        net = MobileNet(((1, 8, 1, 1), (6, 16, 1, 2)), 8, 32) if tiny else MobileNet()
        b = 4 if tiny else 128
        convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
        dw = sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in net.modules())
        return _images(net, b, 28, f"{convs} convolutions ({dw} depthwise 3×3), 28×28 images, "
                       f"batch {b}")
    if name in HF_MODELS:
        return _hf(name, tiny)
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}")


HF_MODELS = ("gpt2", "llama", "bert")
MODELS = ("tinygpt", "resnet20", "vit", "mha", "mobilenet", *HF_MODELS)


def measure(name: str, recipe: str, backend: str, tiny: bool) -> tuple[lowbit.CoverageReport, str, float]:
    model, args, kwargs, loss_fn, note = build(name, tiny)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowbit.convert(model, lowbit.FQTConfig.from_recipe(recipe, backend=backend, seed=0))
    for w in caught:
        if issubclass(w.category, getattr(lowbit, "ConversionWarning", Warning)):
            note += f"; convert warned: {str(w.message).split(':')[0]}"
    t0 = time.perf_counter()
    report = lowbit.coverage(model, *args, loss_fn=loss_fn, model_kwargs=kwargs)
    return report, note, time.perf_counter() - t0


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _si(n: float) -> str:
    return next((f"{n / s:.3g} {u}" for u, s in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))
                 if n >= s), f"{n:.0f}")


def markdown(results: list[tuple[str, lowbit.CoverageReport, str]]) -> str:
    lines = ["| model | GEMM FLOPs / step | low-bit | real int8/fp8 | simulated | float | "
             "forward low-bit |", "|---|---|---|---|---|---|---|"]
    for name, rep, _ in results:
        lines.append(f"| {name} | {_si(rep.total_flops)} | {_pct(rep.lowbit_share)} | "
                     f"{_pct(rep.real_share)} | {_pct(rep.simulated_share)} | {_pct(rep.float_share)} | "
                     f"{_pct(rep.share('low-bit', 'forward'))} |")
    for name, rep, note in results:
        lines += ["", f"### {name}", "", note, "", "| what stays float | op | pass | share | why |",
                  "|---|---|---|---|---|"]
        for g in rep.float_reasons():
            lines.append(f"| {g['module_type']} ({len(g['modules'])}×) | {g['op']} | {g['phase']} | "
                         f"{_pct(g['flops'] / rep.total_flops)} | {g['reason']} |")
        if not rep.float_reasons():
            lines.append("| nothing | | | | |")
        sim = {r.module_type for r in rep.rows if r.kind == "simulated"}
        if sim:
            lines += ["", f"Simulated (reference kernels): {', '.join(sorted(sim))}."]
        if rep.never_called:
            lines += ["", f"Converted but never called: {', '.join(rep.never_called)}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    p.add_argument("--recipe", default="fqt-psq-8")
    p.add_argument("--backend", default="auto")
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--tables", action="store_true",
                   help="also print each model's report.table(by='type') (docs/coverage.md, 'Per model')")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    for n in names:
        if n not in MODELS:
            p.error(f"unknown model {n!r}; allowed: {', '.join(MODELS)}")
    has_hf = importlib.util.find_spec("transformers") is not None
    results = []
    for name in names:
        if name in HF_MODELS and not has_hf:
            print(f"{name}: skipped (transformers is not installed)", file=sys.stderr)
            continue
        rep, note, seconds = measure(name, args.recipe, args.backend, args.size == "tiny")
        print(f"{name}: traced in {seconds:.1f} s", file=sys.stderr)
        results.append((name, rep, note))
    print(f"recipe {args.recipe}, backend {args.backend}, torch {torch.__version__}\n")
    print(markdown(results))
    if args.tables:
        for name, rep, note in results:
            print(f"\n### {name}\n\n{note}\n\n```\n{rep.table(by='type')}\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
