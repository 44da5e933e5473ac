"""Probe (docs/coverage.md, "Why not 100% real integer"): 64 raw ``torch._int_mm`` calls
of 128×64×128 against one batched float32 ``bmm`` of the same int8 codes (outputs
checked equal), medians of 21 interleaved calls, 1 thread.

    python benchmarks/probes/attention_perhead_int_mm.py
"""

import statistics
import time

import torch

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
qa = torch.randint(-127, 128, (64, 128, 64), dtype=torch.int8, generator=g)
kb = torch.randint(-127, 128, (64, 64, 128), dtype=torch.int8, generator=g)
qf, kf = qa.float(), kb.float()


def batched() -> torch.Tensor:
    return torch.bmm(qf, kf)


def per_head() -> torch.Tensor:
    return torch.stack([torch._int_mm(qa[h], kb[h]) for h in range(64)])


assert torch.equal(batched(), per_head().float())
times: dict[str, list[float]] = {"batched float32 bmm": [], "64 x _int_mm": []}
for _ in range(21):
    for name, fn in (("batched float32 bmm", batched), ("64 x _int_mm", per_head)):
        start = time.perf_counter()
        fn()
        times[name].append((time.perf_counter() - start) * 1e3)
for name, ts in times.items():
    print(f"{name}: median {statistics.median(ts):.2f} ms")
