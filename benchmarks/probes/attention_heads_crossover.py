"""Probe (lowbit.attention.LOOP_MIN_MACS): one attention GEMM over 64 heads of int8 codes
(per-row steps on the left, per-column on the right), the per-head integer path (one
``torch._int_mm`` per head into one accumulator, one batched epilogue) against the
batched simulated GEMM (dequantize both, one float32 ``bmm``), at several head sizes;
medians of 15 interleaved calls after 3 warm-up, 1 thread.

    python benchmarks/probes/attention_heads_crossover.py
"""

import statistics
import time

import torch

import lowbit.attention as A
from lowbit.attention import Operand, batched_mm
from lowbit.config import Backend

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
print("m x k x n per head, MACs, per-head integer ms, batched simulated ms, ratio")
for m, k, n in ((16, 16, 16), (32, 32, 32), (64, 32, 64), (64, 64, 64), (128, 64, 128), (256, 64, 256)):
    a = Operand(torch.randint(-127, 128, (64, m, k), dtype=torch.int8, generator=g), torch.rand(64, m, 1))
    b = Operand(torch.randint(-127, 128, (64, k, n), dtype=torch.int8, generator=g), torch.rand(64, 1, n))
    times = {0: [], 1 << 62: []}
    for limit in (0, 1 << 62, 0, 1 << 62, 0, 1 << 62):
        A.LOOP_MIN_MACS = limit
        batched_mm(a, b, Backend.AUTO, torch.float32, "probe")
    for _ in range(15):
        for limit in times:
            A.LOOP_MIN_MACS = limit
            start = time.perf_counter()
            batched_mm(a, b, Backend.AUTO, torch.float32, "probe")
            times[limit].append((time.perf_counter() - start) * 1e3)
    i, s = statistics.median(times[0]), statistics.median(times[1 << 62])
    print(f"{m}x{k}x{n}  {m * k * n:>8}  {i:7.3f}  {s:7.3f}  {i / s:5.2f}")
