"""Probe (docs/benchmarks.md, "Hadamard's pair and its butterflies in registers"): the
parts of the randomized block Hadamard quantizer in a layer's backward, per gradient
shape of the text GPT — one ``Hadamard().quantize`` of ``∇Y``, the inverse on the
product's shape, and a layer's two gradient quantizations as the backward makes them
(``quantize_grad_pair_mixed``, transform included; attention's (B·N, C) operands with the
B = 64 heads as entries; where the pair does not apply, as on commits before it, the two
calls apart) beside PSQ's pair of the same operand; medians of 21 calls
(``_timing.median_ms``), the Hadamard and PSQ pairs interleaved (``_timing.interleaved_ms``).

    python benchmarks/probes/hadamard_parts.py --threads 2
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import interleaved_ms, median_ms, start  # noqa: E402

from lowbit import allocator  # noqa: E402
from lowbit.config import Backend, GradSpec  # noqa: E402
from lowbit.functional import quantize_gradient  # noqa: E402
from lowbit.gradpair import quantize_grad_pair, quantize_grad_pair_mixed  # noqa: E402
from lowbit.kernels import Kernels, kernels_for  # noqa: E402
from lowbit.quantizers.hadamard import Hadamard  # noqa: E402

# ∇Y (N, out), inverse width, entries (attention's heads: None for a linear layer's)
SHAPES = ((2048, 256, 256, None), (2048, 1024, 256, None), (2048, 768, 256, None), (2048, 256, 1024, None),
          (8192, 64, 128, 64), (8192, 128, 64, 64))


def _pair(g: torch.Tensor, entries: int | None, spec_a: GradSpec, spec_w: GradSpec, gen: torch.Generator,
          k: Kernels) -> None:
    """A layer's two gradient quantizations of ``g`` as its backward makes them."""
    if entries is not None:
        from lowbit import attention as att

        g3 = g.view(entries, -1, g.shape[1])
        a, _ = att._pair(g3, spec_a, gen, spec_w, gen, Backend.AUTO, True)
        if a is None:
            att.grad_operand(g3, spec_a, gen, Backend.AUTO)
            att.grad_operand_t(g3, spec_w, gen, Backend.AUTO)
    elif quantize_grad_pair_mixed(g, spec_a, gen, spec_w, gen, k) is None:
        quantize_gradient(g, spec_a, gen, k)
        quantize_gradient(g.t(), spec_w, gen, k)


def parts(n: int, d: int, e: int, entries: int | None, k: Kernels) -> list[float]:
    """ms of each part for a ∇Y of ``n`` × ``d`` and an inverse on ``n`` × ``e``."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(n, d, generator=gen) * torch.exp(torch.randn(n, 1, generator=gen))
    q = Hadamard()
    op = q.quantize(g, "int8", gen, backend=k)
    y = torch.randn(n, e)
    had, psq = GradSpec(quantizer="hadamard"), GradSpec(quantizer="psq")
    g3 = g.view(entries, n // entries, d) if entries else g
    pair_ms, psq_ms = interleaved_ms(
        lambda: _pair(g, entries, had, psq, gen, k),
        lambda: quantize_grad_pair(g3, psq, gen, psq, gen, k, batched=entries is not None), repeats=3, n=21)
    return [median_ms(lambda: q.quantize(g, "int8", gen, backend=k), 21), median_ms(lambda: op.inverse(y), 21),
            pair_ms, psq_ms]


def main() -> None:
    start(__doc__)
    allocator.keep_freed_memory()
    k = kernels_for("auto", "cpu")
    print("| ∇Y (N, out) | inverse on | quantize | inverse | Hadamard pair | PSQ pair |")
    print("|---|---|---|---|---|---|")
    for n, d, e, entries in SHAPES:
        ms = parts(n, d, e, entries, k)
        name = f"{n} × {d}" + (f" ({entries} heads)" if entries else "")
        print(f"| {name} | {n} × {e} | " + " | ".join(f"{m:.2f} ms" for m in ms) + " |")


if __name__ == "__main__":
    main()
