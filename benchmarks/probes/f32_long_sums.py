"""The exact float32 route's long sums (``lowbit.kernels.exact_f32``): the CNN's
convolution ∇W products (a few rows and columns, tens of thousands of summed terms) with
their pieces batched into one ``torch.bmm`` (``PIECES_FLOOR`` as shipped) and one
``torch.mm`` a piece (``PIECES_FLOOR`` 0), interleaved medians, against a float32
``torch.mm`` of operands already in float32 (no pieces: the route's ceiling, not exact).

    python benchmarks/probes/f32_long_sums.py [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from _timing import interleaved_ms, median_ms

from lowbit.kernels import exact_f32

# (M, K, N) of the cnn workload's kernel-row ∇W GEMMs (benchmarks/step_workloads.py,
# batch 128 of 28×28; grad_weight_rows: R output channels × kW·C columns), and one wide
# product (one torch.mm a piece) as a control
SHAPES = [(16, 18480, 48), (32, 5376, 96), (64, 1701, 192), (16, 15120, 3), (512, 4096, 512)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads; ms, medians (batched and one-a-piece interleaved)")
    print("| M×K×N | pieces | per bmm | batched | one mm a piece | float32 mm (ceiling) |")
    print("|---|---|---|---|---|---|")
    for m, k, n in SHAPES:
        print(row(m, k, n))


def row(m: int, k: int, n: int) -> str:
    """One shape's table row: the two groupings' sums compared, then the medians."""
    floor = exact_f32.PIECES_FLOOR
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
    step = exact_f32.piece_length(a, b)
    per = exact_f32.pieces_per_call(m, n, step, k // step)

    def with_floor(value: int):  # noqa: ANN202
        def run() -> torch.Tensor:
            exact_f32.PIECES_FLOOR = value
            try:
                return exact_f32.int_mm(a, b)
            finally:
                exact_f32.PIECES_FLOOR = floor
        return run
    batched, single = with_floor(floor), with_floor(0)
    assert torch.equal(batched(), single()), "the two groupings must give the same sums"
    tb, ts = interleaved_ms(batched, single, repeats=5, n=9)
    af, bf = a.float(), b.float()
    tf = median_ms(lambda: torch.mm(af, bf), 9)
    return f"| {m}×{k}×{n} | {-(-k // step)} | {per} | {tb:.3f} | {ts:.3f} | {tf:.3f} |"

if __name__ == "__main__":
    main()
