"""Probe (docs/benchmarks.md, "BHQ's fixed costs" and "BHQ's sums in registers…"): the parts
of one BHQ quantization on the dispatcher's kernels, per gradient shape of the text GPT and
the FFN — the row ranges, the groups' construction, the whole transform, the group sums
(reference and native), one ``BHQ().quantize``, the inverse on the product's shape, and a
layer's two gradient quantizations as the backward makes them (``quantize_grad_pair_mixed``,
transform included; attention's (B·N, C) operands with the B = 64 heads as entries) beside
PSQ's pair of the same operand; medians of 21 calls (``_timing.median_ms``). Rows get
log-normal scales, so BHQ forms real groups.

    python benchmarks/probes/bhq_parts.py --threads 2
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import median_ms, start  # noqa: E402

from lowbit import allocator  # noqa: E402
from lowbit.config import GradSpec  # noqa: E402
from lowbit.gradpair import quantize_grad_pair, quantize_grad_pair_mixed  # noqa: E402
from lowbit.kernels import Kernels, kernels_for  # noqa: E402
from lowbit.quantizers.base import row_absmax  # noqa: E402
from lowbit.quantizers.bhq import BHQ, _group_sums, bhq_transform  # noqa: E402

# ∇Y (N, out), inverse width, entries (attention's heads: None for a linear layer's)
SHAPES = ((2048, 256, 256, None), (2048, 1024, 256, None), (2048, 768, 768, None), (8192, 64, 64, None),
          (8192, 64, 128, 64), (8192, 128, 64, 64))


def parts(n: int, d: int, e: int, entries: int | None, k: Kernels, q: BHQ) -> tuple[int, list[float]]:
    """(groups, ms of each part) for a ∇Y of ``n`` × ``d`` and an inverse on ``n`` × ``e``."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(n, d, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen) * 2)
    t = bhq_transform(g, k, entries)
    t.kernels = k
    lam, w = row_absmax(g, k).double(), t.v * t.scale
    op = q.quantize(g, "int8", gen, backend=k, entries=entries)
    y = torch.randn(n, e)
    bhq, psq, psq_w = GradSpec(quantizer="bhq"), GradSpec(quantizer="psq"), GradSpec(quantizer="psq")
    g3 = g.view(entries, n // entries, d) if entries else g
    construct = (lambda: k.run("bhq_groups", lam, torch.float32)) if entries is None else \
        (lambda: k.run("bhq_entry_groups", lam, entries, torch.float32))
    return t.n_groups, [median_ms(f, 21) for f in (
        lambda: row_absmax(g, k), construct, lambda: bhq_transform(g, k, entries),
        lambda: _group_sums(g, w, t), lambda: k.run("bhq_group_sums", g, w, t),
        lambda: q.quantize(g, "int8", gen, backend=k, entries=entries), lambda: op.inverse(y),
        (lambda: quantize_grad_pair_mixed(g, bhq, gen, psq_w, gen, k)) if entries is None else
        (lambda: _attention_pair(g3, bhq, psq_w, gen)),
        lambda: quantize_grad_pair(g3, psq, gen, psq_w, gen, k, batched=entries is not None))]


def _attention_pair(g3: torch.Tensor, spec_a: GradSpec, spec_w: GradSpec, gen: torch.Generator) -> None:
    """Attention's two quantizations of a (B, N, C) gradient as its backward makes them: the
    pair where it applies (:func:`lowbit.attention._pair`), else the two calls apart (as
    lowbit did before the pair took BHQ: the same probe runs on older commits)."""
    from lowbit import attention as att
    from lowbit.config import Backend

    a, _ = att._pair(g3, spec_a, gen, spec_w, gen, Backend.AUTO, True)
    if a is None:
        att.grad_operand(g3, spec_a, gen, Backend.AUTO)
        att.grad_operand_t(g3, spec_w, gen, Backend.AUTO)


def main() -> None:
    start(__doc__)
    allocator.keep_freed_memory()
    k, q = kernels_for("auto", "cpu"), BHQ()
    print("| ∇Y (N, out) | groups | ranges | construction | transform | sums: reference | sums: kernel "
          "| quantize | inverse | BHQ pair | PSQ pair |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n, d, e, entries in SHAPES:
        groups, ms = parts(n, d, e, entries, k, q)
        name = f"{n} × {d}" + (f" ({entries} heads)" if entries else "")
        print(f"| {name} | {groups} | " + " | ".join(f"{m:.2f} ms" for m in ms) + " |")


if __name__ == "__main__":
    main()
