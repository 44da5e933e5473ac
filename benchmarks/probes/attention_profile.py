"""Probe (docs/coverage.md, step time of attention): the CPU profile of one TinyGPT
layer's low-bit attention (forward + backward): self time per op, per call (mean of 3
profiled calls after 3 warm-up calls).

    python benchmarks/probes/attention_profile.py
"""

import collections
import sys

from torch.profiler import profile

sys.path.insert(0, "benchmarks")
from bench_attention import attention_fn  # noqa: E402

f = attention_fn("attention low-bit", "fqt-psq-8", "full")
for _ in range(3):
    f()
with profile() as prof:
    for _ in range(3):
        f()
agg: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
for e in prof.events():
    agg[e.name][0] += e.self_cpu_time_total / 3e3  # µs over 3 calls → ms per call
    agg[e.name][1] += 1
print("total self ms per call", round(sum(v[0] for v in agg.values()), 2))
for name, (ms, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:22]:
    print(f"{ms:7.2f} ms {int(n) // 3:4d}  {name[:90]}")
