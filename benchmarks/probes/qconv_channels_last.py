"""Probe: oneDNN's exact int8 convolution (``lowbit.kernels.qconv.conv_acc``) of a
first-stage PreAct-ResNet-20 layer (128 × 16 × 28², 3×3, 16 → 16) fed NCHW codes
against channels-last codes (what ``Q_f`` of ``lowbit.conv.activation_rows`` gives):
results ``torch.equal`` before timing; medians of 9 calls, median of 3 interleaved
repeats. docs/benchmarks.md "Predictions and outcomes" 14.

    python benchmarks/probes/qconv_channels_last.py --threads 1
"""

from __future__ import annotations

import os
import sys

import torch

from lowbit.kernels import qconv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_ms, start  # noqa: E402


def main() -> None:
    start(__doc__)
    x = torch.randint(-127, 128, (128, 16, 28, 28), dtype=torch.int8)
    xl = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # same values, channels-last
    w = torch.randint(-127, 128, (16, 16, 3, 3), dtype=torch.int8)
    geometry = ((1, 1), (1, 1), (1, 1), 1)
    assert torch.equal(qconv.conv_acc(x, w, *geometry), qconv.conv_acc(xl, w, *geometry))
    t_nchw, t_cl = interleaved_ms(lambda: qconv.conv_acc(x, w, *geometry),
                                  lambda: qconv.conv_acc(xl, w, *geometry))
    print(f"conv_acc: NCHW codes {t_nchw:.2f} ms, channels-last codes {t_cl:.2f} ms "
          f"({t_nchw / t_cl:.2f}x)")


if __name__ == "__main__":
    main()
