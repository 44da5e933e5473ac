"""How far lowbit's 8-bit attention forward is from float attention, per forward spec and
sequence length.

The recipes quantize Q, K, V and the probabilities P̃ per tensor (one scale for every
head): P̃'s scale is set by its largest entry (1 in a causal mask's first row), so a
head's small probabilities round to zero — more of them the longer the sequence (a late
query's probabilities are about 1/length). Per-row activation scales (one per batch, head
and query token) avoid that. Relative error ‖O − O_float‖ / ‖O_float‖ on random
(2, 4, L, 64) causal inputs, over all rows and over the last 64 query rows, 1 thread.

    python benchmarks/probes/attention_forward_precision.py --lengths 128,256,512,1024
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import lowbit
from lowbit import FQTConfig, OperandSpec


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128", help="comma-separated sequence lengths (default 128)")
    args = p.parse_args()
    torch.set_num_threads(1)
    specs = (("fqt-psq-8 (activation per tensor)", FQTConfig.from_recipe("fqt-psq-8")),
             ("fqt-psq-8, activation=OperandSpec(8, 'row')",
              FQTConfig.from_recipe("fqt-psq-8", activation=OperandSpec(8, "row"))))
    for n in (int(x) for x in args.lengths.split(",")):
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 4, n, 64) for _ in range(3))
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        for label, cfg in specs:
            out = lowbit.functional.scaled_dot_product_attention(q, k, v, is_causal=True, state=cfg)
            print(f"L={n} {label}: relative error vs float {rel(out, ref):.4f} "
                  f"(last 64 query rows {rel(out[..., -64:, :], ref[..., -64:, :]):.4f})")


if __name__ == "__main__":
    main()
