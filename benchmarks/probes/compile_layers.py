"""Graphs torch.compile traces for a converted transformer as its depth grows: lowbit's
TinyGPT or a Hugging Face GPT-2 (random weights, from a config), converted with
``fqt-psq-8``, three training steps (AdamW) under ``torch.compile``; prints dynamo's
unique graphs. With converted attention (eager between compiled graphs), the frames
between breaks should compile once for all layers, not once per layer.

    python benchmarks/probes/compile_layers.py --model gpt2 --layers 2,12 [--use-cache]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch._dynamo.utils import counters

import lowbit


def build(model: str, n_layer: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if model == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=100, n_positions=64,
                                          bos_token_id=0, eos_token_id=0))
    from lowbit.experiments.models import build_model

    return build_model("text", "gpt", n_layer=n_layer, n_embd=64, n_head=4, block_size=32)


def graphs(model: str, n_layer: int, use_cache: bool) -> int:
    """Dynamo's unique graphs over three compiled training steps."""
    m = lowbit.convert(build(model, n_layer), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    run = torch.compile(m)
    opt = torch.optim.AdamW(m.parameters(), 1e-3)
    ids = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    counters.clear()
    for _ in range(3):
        if model == "gpt2":
            loss = run(ids, labels=ids, use_cache=use_cache).loss
        else:
            out = run(ids)
            loss = (out[0] if isinstance(out, tuple) else out).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    return counters["stats"]["unique_graphs"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("gpt2", "tinygpt"), default="gpt2")
    ap.add_argument("--layers", default="2,12")
    ap.add_argument("--use-cache", action="store_true", help="GPT-2's KV cache on (its default)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    for n in (int(v) for v in args.layers.split(",")):
        print(f"{args.model}, {n} layers, use_cache={args.use_cache}: {graphs(args.model, n, args.use_cache)} graphs")


if __name__ == "__main__":
    main()
