"""Probe: ∇X of stride-2 convolutions as the scatter path (the GEMM ``∇Y × W`` summed
over C_out alone, then a float32 col2im) against oneDNN's int8 convolution of the
zero-inserted ∇Y codes with the flipped kernel (``lowbit.conv._grad_input_onednn``: s² =
4× the products, exact integer sums): PreAct-ResNet-20's two 3×3 stride-2 layers (batch
128) and a ResNet-style 1×1 stride-2 shortcut (batch 32, 128 → 256 channels at 28²).
The two results agree within col2im's float32 rounding (asserted before timing: 1e-5 of
the largest value); medians of 9 calls, median of 3 interleaved repeats.
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

PAYS = C.zero_insert_pays
CASES = (  # (batch, C_in, side, C_out, kernel, padding)
    (128, 16, 28, 32, 3, 1),
    (128, 32, 14, 64, 3, 1),
    (32, 128, 28, 256, 1, 0),
)


def grad_input(gy: torch.Tensor, qw, x_shape, k: int, p: int, zero_insert: bool) -> torch.Tensor:  # noqa: ANN001
    C.zero_insert_pays = lambda *a: zero_insert  # noqa: ARG005
    try:
        return C.conv_grad_input(gy, qw, GradSpec(), torch.Generator().manual_seed(7), Backend.AUTO,
                                 x_shape, (qw.codes.shape[0], x_shape[1], k, k), [2, 2, p, p, 1, 1, 1])
    finally:
        C.zero_insert_pays = PAYS


def main() -> None:
    start(__doc__)
    for n, c, side, co, k, p in CASES:
        x_shape = (n, c, side, side)
        qw = quantize_forward(torch.randn(co, c * k * k), OperandSpec())
        ho = (side + 2 * p - k) // 2 + 1
        gy = torch.randn(n, co, ho, ho)
        a, b = grad_input(gy, qw, x_shape, k, p, True), grad_input(gy, qw, x_shape, k, p, False)
        rel = ((a - b).abs().max() / b.abs().max()).item()
        assert rel < 1e-5, rel
        t_new, t_old = interleaved_ms(lambda gy=gy, qw=qw, s=x_shape, k=k, p=p: grad_input(gy, qw, s, k, p, True),
                                      lambda gy=gy, qw=qw, s=x_shape, k=k, p=p: grad_input(gy, qw, s, k, p, False))
        print(f"{k}x{k} stride 2, {c} -> {co} channels, {side}² → {ho}², batch {n}: zero-insert + oneDNN "
              f"{t_new:.2f} ms, scatter {t_old:.2f} ms ({t_old / t_new:.2f}x); max |diff|/max {rel:.1e}")


if __name__ == "__main__":
    main()
