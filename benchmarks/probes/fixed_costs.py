"""Probe (docs/benchmarks.md, "The per-layer fixed cost"): what a converted step costs
apart from its arithmetic. A step at ``--size tiny`` (the same layers on a few samples)
is almost all fixed cost: its time minus fp32's is what lowbit adds per step whatever
the batch. Then the parts of that cost measured one at a time: oneDNN's weight prepack
per convolution weight shape (twice a step per conv layer: forward and ∇X), a
``qconv2d_pointwise`` call on a tiny input, the dispatch of a ``torch.library`` custom op
(the form of ``lowbit::block_forward``/``block_backward``) against a plain call, and a
``torch.compiler.disable`` wrapper. Medians (``_timing.median_ms``).

    python benchmarks/probes/fixed_costs.py --threads 2
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _timing import median_ms, start  # noqa: E402
from bench_step import Bench  # noqa: E402

from lowbit.kernels import qconv  # noqa: E402

WORKLOADS = ("cnn", "gpt", "ffn")
MODES = ("fp32", "fqt-psq-8")
WEIGHTS = ((16, 1), (16, 16), (32, 32), (64, 64))  # PreAct-ResNet-20's 3×3 kernels (C_out, C)


def step_ms(workload: str, mode: str) -> float:
    bench = Bench(workload, mode, "tiny")
    for _ in range(5):
        bench.step()
    return median_ms(bench.step, 41)


def prepack_ms(co: int, c: int) -> float:
    w = torch.randint(-127, 128, (co, c, 3, 3), dtype=torch.int8)
    ones = torch.ones(1)
    return median_ms(lambda: torch.ops.onednn.qconv_prepack(w, ones, 1.0, 128, [1, 1], [1, 1], [1, 1], 1,
                                                            [4, c, 8, 8]), 41)


def pointwise_ms() -> float:
    x, w = torch.randint(-127, 128, (4, 16, 8, 8), dtype=torch.int8), torch.randint(
        -127, 128, (16, 16, 3, 3), dtype=torch.int8)
    return median_ms(lambda: qconv.conv_acc(x, w, (1, 1), (1, 1), (1, 1), 1), 41)


@torch.library.custom_op("lowbit_probe::identity", mutates_args=())
def _identity(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def main() -> None:
    start(__doc__)
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    for w in WORKLOADS:
        ms = {m: step_ms(w, m) for m in MODES}
        print(f"tiny {w:4s}: " + ", ".join(f"{m} {v:.2f} ms" for m, v in ms.items())
              + f"; fixed cost of fqt-psq-8 {ms['fqt-psq-8'] - ms['fp32']:.2f} ms a step")
    if qconv.available(torch.zeros(1, 1, 1, 1, dtype=torch.int8), (1, 1, 1, 1), 1, (8, 8), (1, 1), (0, 0), (1, 1)):
        for co, c in WEIGHTS:
            print(f"onednn qconv_prepack of a ({co}, {c}, 3, 3) int8 weight: {prepack_ms(co, c) * 1e3:.0f} µs")
        print(f"conv_acc (prepack + qconv2d_pointwise) on 4 × 16 × 8 × 8: {pointwise_ms() * 1e3:.0f} µs")
    x = torch.zeros(4)
    plain = median_ms(lambda: [x.clone() for _ in range(100)], 21) * 10
    op = median_ms(lambda: [_identity(x) for _ in range(100)], 21) * 10
    disabled = torch.compiler.disable(lambda t: t)
    wrap = median_ms(lambda: [disabled(x) for _ in range(100)], 21) * 10
    print(f"custom op call {op:.1f} µs against the same clone {plain:.1f} µs: {op - plain:.1f} µs dispatch")
    print(f"torch.compiler.disable wrapper: {wrap:.2f} µs a call")


if __name__ == "__main__":
    main()
