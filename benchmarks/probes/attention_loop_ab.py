"""Probe (docs/coverage.md, "Why not 100% real integer"): one TinyGPT layer's low-bit
attention (forward + backward), heads batched (the default) vs one integer GEMM per head
(``lowbit.attention.LOOP_MIN_MACS = 0``), 9 interleaved rounds × 2 calls, 1 thread.

    python benchmarks/probes/attention_loop_ab.py
"""

import statistics
import sys
import time

import torch

import lowbit.attention as A

sys.path.insert(0, "benchmarks")
from bench_attention import attention_fn  # noqa: E402

torch.set_num_threads(1)
f = attention_fn("attention low-bit", "fqt-psq-8", "full")
default = A.LOOP_MIN_MACS
times: dict[str, list[float]] = {"batched (default)": [], "per head (LOOP_MIN_MACS=0)": []}
for v in (default, 0, default, 0):  # warm-up, both variants
    A.LOOP_MIN_MACS = v
    f()
for _ in range(9):
    for name, v in (("batched (default)", default), ("per head (LOOP_MIN_MACS=0)", 0)):
        A.LOOP_MIN_MACS = v
        for _ in range(2):
            start = time.perf_counter()
            f()
            times[name].append((time.perf_counter() - start) * 1e3)
A.LOOP_MIN_MACS = default
for name, ts in times.items():
    print(f"{name}: median {statistics.median(ts):.1f} ms, min {min(ts):.1f} ms")
