"""Probe (docs/benchmarks.md, "The per-layer fixed cost"): ``qconv.conv_acc`` (oneDNN's
weight prepack + int8 convolution) with the prepack told the input's shape and without
(``lowbit.kernels.qconv.PREPACK_INPUT_SHAPE``), at PreAct-ResNet-20's convolutions (batch
128: the three stages, a stride-2 one, the stem, a ∇X-shaped one), results asserted
equal; medians of 5 interleaved medians of 15 calls (``_timing.interleaved_ms``).

    python benchmarks/probes/qconv_prepack_shape.py --threads 2
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_ms, start  # noqa: E402

from lowbit.kernels import qconv  # noqa: E402

# (x shape, w shape, stride, padding)
CASES = (((128, 16, 28, 28), (16, 16, 3, 3), (1, 1), (1, 1)),
         ((128, 32, 14, 14), (32, 32, 3, 3), (1, 1), (1, 1)),
         ((128, 64, 7, 7), (64, 64, 3, 3), (1, 1), (1, 1)),
         ((128, 16, 28, 28), (32, 16, 3, 3), (2, 2), (1, 1)),
         ((128, 1, 28, 28), (16, 1, 3, 3), (1, 1), (1, 1)),
         ((128, 32, 29, 29), (16, 32, 3, 3), (1, 1), (0, 0)))


def main() -> None:
    start(__doc__)
    total = [0.0, 0.0]
    for xs, ws, stride, padding in CASES:
        x = torch.randint(0, 256, xs, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        w = torch.randint(-127, 128, ws, dtype=torch.int8)

        def run(shape: bool, x: torch.Tensor = x, w: torch.Tensor = w, stride: tuple = stride,
                padding: tuple = padding) -> torch.Tensor:
            qconv.PREPACK_INPUT_SHAPE = shape
            return qconv.conv_acc(x, w, stride, padding, (1, 1), 1)

        assert torch.equal(run(True), run(False))
        told, untold = interleaved_ms(lambda: run(True), lambda: run(False), repeats=5, n=15)
        total[0] += told
        total[1] += untold
        print(f"x {xs}, w {ws}, stride {stride}: shape told {told:.3f} ms, not {untold:.3f} ms "
              f"({(untold / told - 1) * 100:+.1f}%)")
    print(f"sum: told {total[0]:.2f} ms, not {total[1]:.2f} ms ({(total[1] / total[0] - 1) * 100:+.1f}%)")
    qconv.PREPACK_INPUT_SHAPE = False


if __name__ == "__main__":
    main()
