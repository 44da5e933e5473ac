"""Probe (docs/benchmarks.md, "The optimizers' float64 weight write"): the time of one
``SRSGD`` step on a (3.5M, 2) bfloat16 weight (7M elements, random gradients ~1e-3), with
bf16 and int8 weights, one thread, medians of 7 steps. ``--whole`` rounds the float64 sum
``w + Δ`` of the whole weight at once (``lowbit.optim._PIECE`` raised past its size)
instead of in pieces of 2^16 elements; run it with ``PYTHONPATH`` at a tree before the
float64 sum (e98ecd4) for the float32 write it replaced.

    python benchmarks/probes/optim_weight_write.py [--whole]
"""

import argparse
import statistics
import time

import torch
from torch import nn

import lowbit.optim as optim

torch.set_num_threads(1)
parser = argparse.ArgumentParser()
parser.add_argument("--whole", action="store_true")
args = parser.parse_args()
if args.whole:
    optim._PIECE = 1 << 40
for fmt in ("bf16", "int8"):
    p = nn.Parameter(torch.full((3_500_000, 2), 127 / 64, dtype=torch.bfloat16))
    opt = optim.SRSGD([p], lr=1.0, weights=fmt, generator=torch.Generator().manual_seed(3))
    p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(4)).bfloat16() * 1e-3
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    print(f"{fmt}: median {statistics.median(times) * 1e3:.0f} ms")
