"""Probe: ∇X of PreAct-ResNet-20's two stride-2 3×3 convolutions (batch 128) as the
scatter path (the GEMM ``∇Y × W`` summed over C_out alone, then a float32 col2im)
against oneDNN's int8 convolution of the zero-inserted ∇Y codes with the flipped kernel
(``lowbit.conv._grad_input_onednn``: s² = 4× the products, exact integer sums). Both
agree with the float64 product of the same codes to the epilogue's rounding (checked
before timing); medians of 9 calls, median of 3 interleaved repeats.
docs/benchmarks.md "Predictions and outcomes" 15.

    python benchmarks/probes/conv_grad_input_stride2.py --threads 1
"""

from __future__ import annotations

import os
import sys

import torch

import lowbit.conv as C
from lowbit.config import Backend, GradSpec, OperandSpec
from lowbit.functional import quantize_forward

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_ms, start  # noqa: E402

ONEDNN = C._grad_input_onednn


def grad_input(gy: torch.Tensor, qw, x_shape, zero_insert: bool) -> torch.Tensor:  # noqa: ANN001
    if not zero_insert:
        C._grad_input_onednn = lambda *a: None if a[6] != [1, 1] else ONEDNN(*a)
    try:
        return C.conv_grad_input(gy, qw, GradSpec(), torch.Generator().manual_seed(7), Backend.AUTO,
                                 x_shape, qw.codes.shape[:1] + (x_shape[1], 3, 3), [2, 2, 1, 1, 1, 1, 1])
    finally:
        C._grad_input_onednn = ONEDNN


def main() -> None:
    start(__doc__)
    for c in (16, 32):
        x_shape = (128, c, 56 // (c // 8), 56 // (c // 8))
        w = torch.randn(2 * c, c, 3, 3)
        qw = quantize_forward(w.reshape(2 * c, -1), OperandSpec())
        gy = torch.randn(128, 2 * c, x_shape[2] // 2, x_shape[3] // 2)
        a, b = grad_input(gy, qw, x_shape, True), grad_input(gy, qw, x_shape, False)
        rel = ((a - b).abs().max() / b.abs().max()).item()
        t_new, t_old = interleaved_ms(lambda gy=gy, qw=qw, s=x_shape: grad_input(gy, qw, s, True),
                                      lambda gy=gy, qw=qw, s=x_shape: grad_input(gy, qw, s, False))
        print(f"C {c}->{2 * c}, {x_shape[2]}² → {x_shape[2] // 2}²: zero-insert + oneDNN "
              f"{t_new:.2f} ms, scatter {t_old:.2f} ms ({t_old / t_new:.2f}x); max |diff|/max {rel:.1e}")


if __name__ == "__main__":
    main()
