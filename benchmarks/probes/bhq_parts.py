"""Probe (docs/benchmarks.md, "BHQ's fixed costs"): the parts of one BHQ quantization on
the dispatcher's kernels, per gradient shape of the text GPT and the FFN — the row ranges,
the groups' construction, the whole transform, the group sums (reference and native), one
``BHQ().quantize`` and the inverse on the product's shape; medians of 21 calls
(``_timing.median_ms``). Rows get log-normal scales, so BHQ forms real groups.

    python benchmarks/probes/bhq_parts.py --threads 1
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_ms, start  # noqa: E402

from lowbit import allocator  # noqa: E402
from lowbit.kernels import Kernels, kernels_for  # noqa: E402
from lowbit.quantizers.base import row_absmax  # noqa: E402
from lowbit.quantizers.bhq import BHQ, _group_sums, bhq_transform  # noqa: E402

SHAPES = ((2048, 256, 256), (2048, 1024, 256), (8192, 64, 64), (2048, 768, 768))  # ∇Y (N, out), inverse width


def parts(n: int, d: int, e: int, k: Kernels, q: BHQ) -> tuple[int, list[float]]:
    """(groups, ms of each part) for a ∇Y of ``n`` × ``d`` and an inverse on ``n`` × ``e``."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(n, d, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen) * 2)
    t = bhq_transform(g, k)
    t.kernels = k
    lam, w = row_absmax(g, k).double(), t.v * t.scale
    op = q.quantize(g, "int8", gen, backend=k)
    y = torch.randn(n, e)
    return t.n_groups, [median_ms(f, 21) for f in (
        lambda: row_absmax(g, k), lambda: k.run("bhq_groups", lam, torch.float32), lambda: bhq_transform(g, k),
        lambda: _group_sums(g, w, t), lambda: k.run("bhq_group_sums", g, w, t),
        lambda: q.quantize(g, "int8", gen, backend=k), lambda: op.inverse(y))]


def main() -> None:
    start(__doc__)
    allocator.keep_freed_memory()
    k, q = kernels_for("auto", "cpu"), BHQ()
    print("| ∇Y (N, out) | groups | ranges | construction | transform | sums: reference | sums: kernel "
          "| quantize | inverse |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, d, e in SHAPES:
        groups, ms = parts(n, d, e, k, q)
        print(f"| {n} × {d} | {groups} | " + " | ".join(f"{m:.2f} ms" for m in ms) + " |")


if __name__ == "__main__":
    main()
