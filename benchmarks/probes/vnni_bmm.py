"""Attention's per-head int8 products: one ``torch._int_mm`` per head against one call of
lowbit's AVX-512 VNNI kernel (``lowbit.kernels.vnni``), at the head products and layouts a gpt2-block step hands it (batch 4 ×
12 heads, 512 tokens, head width 64). Medians of 20 after one warm-up call; freed memory
recycled (``lowbit.allocator``), the result buffers allocated once. The loop copies an
operand only where ``torch._int_mm`` cannot read it as it is (``int8.dense``), as lowbit's
per-head path does.

    python benchmarks/probes/vnni_bmm.py --threads 2
"""
from __future__ import annotations

import argparse

import torch
from _timing import median_ms

from lowbit import allocator
from lowbit.kernels import int8, vnni


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--heads", type=int, default=48)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    allocator.keep_freed_memory()
    if not vnni.available():
        raise SystemExit("lowbit's VNNI kernel is not available here")
    print(f"{a.heads} heads, {a.threads} threads\n")
    print("| product (M × K × N) | attention's | `_int_mm` per head ms | VNNI batch ms | GOP/s loop | GOP/s VNNI | × |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for (m, k, n), what, a_t, b_t in (((512, 64, 512), "QKᵀ (right operand Kᵀ: column-major)", False, True),
                                      ((512, 64, 512), "∇P = ∇O·Vᵀ, row-major right operand", False, False),
                                      ((512, 512, 64), "P·V and the backward's 512 × 512 × 64", False, False),
                                      ((64, 512, 512), "a backward product with 64-row entries", False, False)):
        x = torch.randint(-128, 128, (a.heads, m, k), dtype=torch.int8, generator=g)
        y = torch.randint(-128, 128, (a.heads, k, n), dtype=torch.int8, generator=g)
        x = x.mT.contiguous().mT if a_t else x
        y = y.mT.contiguous().mT if b_t else y
        out = torch.empty(a.heads, m, n, dtype=torch.int32)
        assert torch.equal(vnni.bmm_into(x, y, out), torch.bmm(x.long(), y.long()).int())
        def per_head(x=x, y=y, out=out) -> None:
            for i in range(a.heads):
                torch._int_mm(int8.dense(x[i]), int8.dense(y[i]), out=out[i])

        loop = median_ms(per_head, 20)
        batch = median_ms(lambda x=x, y=y, out=out: vnni.bmm_into(x, y, out), 20)
        ops = 2 * m * k * n * a.heads / 1e6
        print(f"| {m} × {k} × {n} | {what} | {loop:.2f} | {batch:.2f} | {ops / loop:.0f} | {ops / batch:.0f} | "
              f"{loop / batch:.2f} |")


if __name__ == "__main__":
    main()
