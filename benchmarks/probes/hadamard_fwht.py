"""Probe (docs/benchmarks.md, "Hadamard as butterflies, and transposed gradients read as
they lie"): the Hadamard quantizer's quantize and inverse alone, the butterflies fused
with the quantizer (today) against the batched-GEMM transform before it (the
``hadamard-fwht`` toggle of ``bench_toggle.py`` off), on gradient shapes of the FFN,
the text GPT and GPT-2; medians of 15 calls (``_timing.median_ms``), interleaved per shape.

    python benchmarks/probes/hadamard_fwht.py --threads 1
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_toggle  # noqa: E402
from _timing import median_ms  # noqa: E402

from lowbit import allocator  # noqa: E402
from lowbit.kernels import kernels_for  # noqa: E402
from lowbit.quantizers.hadamard import Hadamard  # noqa: E402

SHAPES = ((2048, 4096, 1024), (2048, 1024, 4096), (2048, 256, 256), (512, 768, 768))  # ∇Y (N, out), inverse width


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()
    switch = bench_toggle.TOGGLES["hadamard-fwht"]()
    k, q = kernels_for("auto", "cpu"), Hadamard()
    print("| ∇Y (N, out) | inverse on (N, in) | quantize: butterflies | quantize: GEMM | inverse: butterflies | inverse: GEMM |")
    print("|---|---|---|---|---|---|")
    for n, d, e in SHAPES:
        g, gen = torch.randn(n, d), torch.Generator().manual_seed(0)
        ms = {}
        for on in (True, False):
            switch(on)
            op = q.quantize(g, "int8", gen, backend=k)
            y = torch.randn(op.codes.shape[0], e)
            ms[on] = (median_ms(lambda g=g, gen=gen: q.quantize(g, "int8", gen, backend=k), 15),
                      median_ms(lambda op=op, y=y: op.inverse(y), 15))
        print(f"| {n} × {d} | {n} × {e} | {ms[True][0]:.1f} ms | {ms[False][0]:.1f} ms | {ms[True][1]:.1f} ms "
              f"| {ms[False][1]:.1f} ms |")
    switch(True)


if __name__ == "__main__":
    main()
