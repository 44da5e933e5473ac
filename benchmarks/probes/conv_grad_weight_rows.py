"""Probe: ∇W of PreAct-ResNet-20's 3×3 stride-1 convolutions (batch 128) through the
full im2col (``kH·kW·C`` columns per output position, one GEMM) against the kernel-row
GEMMs of ``lowbit.kernels.im2col.grad_weight_rows`` (``kW·C`` columns, one GEMM per
kernel row). ``conv_grad_weight`` end to end (quantization of ∇Y included), results
``torch.equal`` before timing; medians of 9 calls, median of 3 interleaved repeats.
docs/benchmarks.md "Predictions and outcomes" 13.

    python benchmarks/probes/conv_grad_weight_rows.py --threads 1
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

ROWS = C.grad_weight_rows


def grad_weight(gy: torch.Tensor, qx, x_shape, c: int, use_rows: bool) -> torch.Tensor:  # noqa: ANN001
    """``conv_grad_weight`` of a 3×3 stride-1 padding-1 convolution, with or without the
    kernel-row GEMMs."""
    C.grad_weight_rows = ROWS if use_rows else (lambda *args: None)
    try:
        return C.conv_grad_weight(gy, qx, GradSpec(), torch.Generator().manual_seed(1),
                                  Backend.AUTO, x_shape, (c, c, 3, 3), [1, 1, 1, 1, 1, 1, 1])
    finally:
        C.grad_weight_rows = ROWS


def main() -> None:
    start(__doc__)
    g = torch.Generator().manual_seed(0)
    for c, h in ((16, 28), (32, 14), (64, 7)):
        x = torch.randn(128, c, h, h, generator=g)
        gy = torch.randn(128, c, h, h, generator=g)
        qx = quantize_forward(x.reshape(128, -1), OperandSpec(bits=8))
        assert torch.equal(grad_weight(gy, qx, x.shape, c, True), grad_weight(gy, qx, x.shape, c, False))
        f, k = interleaved_ms(lambda: grad_weight(gy, qx, x.shape, c, False),  # noqa: B023
                              lambda: grad_weight(gy, qx, x.shape, c, True))  # noqa: B023
        print(f"128x{c}x{h}x{h}, 3x3: full im2col {f:.2f} ms, kernel rows {k:.2f} ms ({f / k:.2f}x)")


if __name__ == "__main__":
    main()
