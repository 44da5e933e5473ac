"""int8 GEMM engines on this CPU: ``torch._int_mm``, lowbit's exact float32 route
(``lowbit.kernels.exact_f32``: casts, float32 GEMMs in exact pieces, int32 result) and a
float32 ``torch.mm`` of operands already in float32 (the route's ceiling), medians.

    python benchmarks/probes/int8_engines.py [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from _timing import median_ms

from lowbit.kernels import exact_f32, int8

SHAPES = [(1024, 1024, 1024), (2048, 256, 768), (2048, 1024, 4096), (256, 2048, 768)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; int8.engine() = {int8.engine()}; GOP/s (ms)")
    for m, k, n in SHAPES:
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
        b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
        af, bf = a.float(), b.float()
        assert torch.equal(exact_f32.int_mm(a, b), torch._int_mm(a, b))  # the same exact sums
        ops = 2 * m * k * n
        times = {"torch._int_mm": median_ms(lambda a=a, b=b: torch._int_mm(a, b), 3),
                 "exact_f32.int_mm": median_ms(lambda a=a, b=b: exact_f32.int_mm(a, b), 7),
                 "float32 mm": median_ms(lambda af=af, bf=bf: af @ bf, 7)}
        print(f"{m}×{k}×{n}: " + " | ".join(f"{name} {ops / t / 1e6:.1f} ({t:.1f})" for name, t in times.items()))


if __name__ == "__main__":
    main()
