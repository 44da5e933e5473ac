"""Symmetric vs asymmetric 4-bit integer grids on synthetic gradients: the ratio
``expected_variance(x, "int4a") / expected_variance(x, "int4")`` per quantizer.

The exact stochastic-rounding variance ``E‖Q(x) − x‖²`` over the rounding noise
(``GradQuantizer.expected_variance``, docs/METHOD.md §6; no sampling) of three 64 × 256
float32 tensors drawn from one seeded generator:

* ``gaussian``: i.i.d. N(0, 1) — dense, two-signed rows;
* ``one-signed``: |N(0, 1)| — every row on one side of 0;
* ``70% zeros``: N(0, 1) with each element set to exactly 0 with probability 0.7 (the
  zeros of ReLU's dead units or a causal mask).

``int4`` is the symmetric grid ``{−7..7}·absmax/7``; ``int4a`` the original paper's
asymmetric grid ``min + k·(max − min)/15`` (``lowbit.formats``). BHQ and Hadamard are
given the same transform draw for both formats (a generator reseeded per call).
Quoted in docs/results.md, "Number formats", symmetric vs asymmetric bullet.

Run: ``python benchmarks/format_variance_ratios.py [--seed 0] [--rows 64] [--cols 256]``
(CPU, about a second).
"""

from __future__ import annotations

import argparse

import torch

from lowbit.quantizers import QUANTIZERS, get_quantizer


def tensors(seed: int, rows: int, cols: int) -> dict[str, torch.Tensor]:
    """The three test tensors (float32, (rows, cols)) from one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(rows, cols, generator=g)
    one_signed = torch.randn(rows, cols, generator=g).abs()
    sparse = torch.randn(rows, cols, generator=g)
    sparse = sparse.masked_fill(torch.rand(rows, cols, generator=g) < 0.7, 0.0)
    return {"gaussian": gauss, "one-signed": one_signed, "70% zeros": sparse}


def ratio(quantizer: str, x: torch.Tensor, seed: int) -> float:
    """``expected_variance`` on ``int4a`` over that on ``int4`` (same transform draw)."""
    q = get_quantizer(quantizer)
    va = q.expected_variance(x, "int4a", torch.Generator().manual_seed(seed))
    vs = q.expected_variance(x, "int4", torch.Generator().manual_seed(seed))
    return float(va / vs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--cols", type=int, default=256)
    args = p.parse_args()
    xs = tensors(args.seed, args.rows, args.cols)
    print(f"int4a / int4 expected variance, {args.rows} x {args.cols}, seed {args.seed}")
    print("| quantizer | " + " | ".join(xs) + " |")
    print("|---|" + "---|" * len(xs))
    for name in QUANTIZERS:
        print(f"| {name} | " + " | ".join(f"{ratio(name, x, args.seed):.2f}x" for x in xs.values()) + " |")


if __name__ == "__main__":
    main()
