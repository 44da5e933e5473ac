"""Probe (tried, not adopted): both quantizations of a convolution's ∇Y (N, C_out, P)
from one compiled kernel — ∇X's operand the (N, C_out·P) view, ∇W's the strided
(C_out, N, P) view read in place (``reference.quantize`` reads an N-D operand as its
flattened rows) — against today's two calls, the second on a transposed copy. PSQ int8,
stochastic; every call reads a different tensor of a pool larger than the L3 cache (as
in a training step); median of 3 rounds over the pool. docs/benchmarks.md "Predictions
and outcomes" 16.

    python benchmarks/probes/conv_grad_pair.py --threads 1
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from lowbit.config import Backend, GradSpec
from lowbit.formats import Granularity, Rounding, parse_format
from lowbit.functional import quantize_gradient
from lowbit.kernels import compiled, kernels_for, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import start  # noqa: E402

FMT = parse_format("int8")


def pair(g3: torch.Tensor, seed_a: torch.Tensor, seed_w: torch.Tensor) -> tuple:
    """The two quantizer calls as one function (compiled as one kernel)."""
    return (*reference.quantize(g3.reshape(g3.shape[0], -1), FMT, Granularity.ROW, Rounding.STOCHASTIC, seed_a),
            *reference.quantize(g3.transpose(0, 1), FMT, Granularity.ROW, Rounding.STOCHASTIC, seed_w))


def main() -> None:
    start(__doc__)
    k = kernels_for(Backend.AUTO, "cpu")
    spec = GradSpec(quantizer="psq", format="int8")
    gen = torch.Generator().manual_seed(0)
    sa, sw = torch.tensor(123), torch.tensor(456)
    for shape in ((128, 16, 28, 28), (128, 32, 14, 14), (128, 64, 7, 7)):
        n, co = shape[:2]
        pool = [torch.randn(shape) for _ in range(24)]  # 24 × ≥ 1.6 MB floats: beyond L3

        def one(g: torch.Tensor, n: int = n, co: int = co) -> None:
            compiled.run("probe_conv_pair", pair, g.reshape(n, co, -1), sa, sw)

        def two(g: torch.Tensor, n: int = n, co: int = co) -> None:
            quantize_gradient(g.reshape(n, -1), spec, gen, k)
            quantize_gradient(g.transpose(0, 1).reshape(co, -1), spec, gen, k)

        times: dict[str, list[float]] = {"one kernel": [], "two calls": []}
        for f in (one, two):
            f(pool[0])
        for _ in range(3):
            for name, f in (("one kernel", one), ("two calls", two)):
                t0 = time.perf_counter()
                for g in pool:
                    f(g)
                times[name].append((time.perf_counter() - t0) / len(pool) * 1e3)
        print(shape, ", ".join(f"{name} {statistics.median(v):.2f} ms" for name, v in times.items()))


if __name__ == "__main__":
    main()
