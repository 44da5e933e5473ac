"""Probe: attention's per-head integer GEMMs, one ``int8.int_mm`` per head (a stride check
and three selects each; before 2026-12-01) against ``int8.int_mm_batched`` (one check per
batch, ``unbind``), at TinyGPT's and GPT-2's head shapes, the six products of one layer
(Q·Kᵀ, P·V, ∇P, ∇V, ∇Q, ∇K). Same int32 results (``torch.equal``) before timing; medians
of 11 calls, median of 3 interleaved repeats. docs/benchmarks.md "Predictions and
outcomes" 12.

    python benchmarks/probes/attention_heads_batched.py --threads 1
"""

from __future__ import annotations

import os
import sys

import torch

from lowbit.kernels import int8

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_ms, start  # noqa: E402


def per_head(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    for i in range(a.shape[0]):
        int8.int_mm(a[i], b[i], out=out[i])


def main() -> None:
    start(__doc__)
    g = torch.Generator().manual_seed(0)

    def codes(*shape: int) -> torch.Tensor:
        return torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)

    # (batch·heads, L, E): TinyGPT 16 × 4 heads of 128 × 64; GPT-2 block 4 × 12 of 512 × 64
    for name, bh, seq, e in (("TinyGPT layer", 64, 128, 64), ("GPT-2 block", 48, 512, 64)):
        q, k, v = codes(bh, seq, e), codes(bh, seq, e), codes(bh, seq, e)
        pr, go, gs = codes(bh, seq, seq), codes(bh, seq, e), codes(bh, seq, seq)
        products = [(q, k.mT), (pr, v), (go, v.mT), (go.mT, pr), (gs, k), (gs.mT, q)]
        outs = [torch.empty(bh, x.shape[1], y.shape[2], dtype=torch.int32) for x, y in products]

        def run(f, products=products, outs=outs) -> None:  # noqa: ANN001
            for (x, y), o in zip(products, outs):
                f(x, y, o)
        ref = [torch.empty_like(o) for o in outs]
        for (x, y), o in zip(products, ref):
            per_head(x, y, o)
        run(int8.int_mm_batched)
        assert all(torch.equal(o, r) for o, r in zip(outs, ref))
        b, n = interleaved_ms(lambda: run(per_head), lambda: run(int8.int_mm_batched), n=11)  # noqa: B023
        print(f"{name} ({bh} heads, {seq}×{e}): per head {b:.2f} ms, batched {n:.2f} ms "
              f"({b / n:.2f}×) for the six products")


if __name__ == "__main__":
    main()
