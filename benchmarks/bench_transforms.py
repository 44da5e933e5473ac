"""Micro-benchmark of the Hadamard and BHQ row transforms: today's passes against prototypes.

A row-mixing gradient quantizer costs, on top of PSQ, its forward transform (before the
quantizer), its inverse (on the GEMM's output rows) and, for BHQ, building the groups.
Timed here per call on a gradient ``∇Y`` (N, out) and a GEMM output (N, in), interleaved,
medians; each prototype is checked against today's result first.

Hadamard (signs ``s``, block ``b`` = 64, orthonormal ``H``):
  today      ``x·s``, an absmax pass over the operand (the float64 range check), then
             ``H`` applied blockwise by one broadcast GEMM; the same three steps inverted
  folded     ``H·diag(s_k)`` per block (a (N/b, b, b) tensor), one batched GEMM forward
             and its transpose inverse, the range check kept as today
  folded-nocheck  ``folded`` without the two absmax passes (what the check costs)
  H8⊗H8-nocheck   ``H₆₄ = H₈ ⊗ H₈`` applied as two batched GEMMs with 8-row blocks (a
             quarter of the FLOPs; sums in another order, so not bitwise today's)

BHQ (group sums ``Σ_{r∈g} w_r x_r``, twice per call: forward and inverse):
  sparse     today: COO → CSR (sorts N entries) and a sparse × dense GEMM
  index_add  one compiled kernel: the weighting fused into a scatter-add

    python benchmarks/bench_transforms.py --shape 2048,768,256 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import quantize_rows  # noqa: E402
from bench_step import machine  # noqa: E402

TINY, HUGE = 2.0**-60, 2.0**100  # lowbit.quantizers.hadamard's float64 thresholds


def hadamard_matrix(b: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / b**0.5


def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(dim=1)


_absmax = torch.compile(_row_absmax, dynamic=True, fullgraph=True)
_quantize = torch.compile(quantize_rows, dynamic=True, fullgraph=True)


def _needs_f64(x: torch.Tensor, b: int) -> bool:
    amax = _absmax(x).reshape(-1, b).amax(dim=1)
    return bool((((amax > 0) & (amax < TINY)) | (amax > HUGE)).any())


def had_today(gy: torch.Tensor, out: torch.Tensor, signs: torch.Tensor, h: torch.Tensor,
              seed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    b = h.shape[0]
    n, d = gy.shape

    def apply_h(x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(x.shape[0] // b, b, x.shape[1])
        if _needs_f64(x, b):
            blocks = blocks.double()
        return torch.matmul(h.to(blocks.dtype), blocks).reshape(x.shape)

    y = apply_h(gy * signs[:, None])
    codes, step = _quantize(y, 127, seed, True)
    inv = apply_h(out) * signs[:, None]
    return codes, step, inv


def had_folded(gy: torch.Tensor, out: torch.Tensor, signs: torch.Tensor, h: torch.Tensor,
               seed: torch.Tensor, check: bool = True) -> tuple[torch.Tensor, ...]:
    b = h.shape[0]
    hs = h[None] * signs.view(-1, 1, b)  # (nb, b, b): H·diag(s_k), exact (sign flips)

    def apply(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(x.shape[0] // b, b, x.shape[1])
        if check and _needs_f64(x, b):
            m, blocks = m.double(), blocks.double()
        return torch.bmm(m, blocks).reshape(x.shape)

    y = apply(hs, gy)
    codes, step = _quantize(y, 127, seed, True)
    inv = apply(hs.transpose(1, 2), out)
    return codes, step, inv


def _h8x8(x: torch.Tensor, h8: torch.Tensor) -> torch.Tensor:
    """``H₆₄ x`` per 64-row block as ``(H₈ ⊗ H₈) x``: H₈ on the outer then the inner
    index of the row within its block (Sylvester: ``H₆₄ = H₈ ⊗ H₈``), 32 FLOPs an
    element instead of 128."""
    n, d = x.shape
    y = torch.matmul(h8, x.reshape(n // 64, 8, 8 * d))  # (nb, 8, 8·D): outer index
    return torch.matmul(h8, y.reshape(n // 8, 8, d)).reshape(n, d)  # inner index


def had_two_stage(gy: torch.Tensor, out: torch.Tensor, signs: torch.Tensor, h8: torch.Tensor,
                  seed: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``folded-nocheck`` with ``H₆₄`` applied as ``H₈ ⊗ H₈`` (signs as today)."""
    y = _h8x8(gy * signs[:, None], h8)
    codes, step = _quantize(y, 127, seed, True)
    inv = _h8x8(out, h8) * signs[:, None]
    return codes, step, inv


def group_sums_sparse(x: torch.Tensor, w: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    n = x.shape[0]
    idx = torch.stack([group, torch.arange(n)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mat = torch.sparse_coo_tensor(idx, w, (n_groups, n)).coalesce().to_sparse_csr()
        return torch.sparse.mm(mat, x)


def _group_sums_index_add(x: torch.Tensor, w: torch.Tensor, group: torch.Tensor,
                          dots: torch.Tensor) -> torch.Tensor:
    return dots.index_add(0, group, x * w[:, None])


_index_add = torch.compile(_group_sums_index_add, dynamic=True, fullgraph=True)


def group_sums_index_add(x: torch.Tensor, w: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    return _index_add(x, w, group, x.new_zeros(n_groups, x.shape[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2048,768,256", help="N, out (∇Y columns), in (∇X columns)")
    p.add_argument("--groups", type=int, default=256, help="BHQ groups (large rows)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n, o, i = (int(v) for v in a.shape.split(","))
    g = torch.Generator().manual_seed(0)
    gy = torch.randn(n, o, generator=g) * torch.rand(n, 1, generator=g).pow(4)
    out = torch.randn(n, i, generator=g)
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    h = hadamard_matrix(64)
    seed = torch.tensor(987654321)
    group = torch.randint(0, a.groups, (n,), generator=g)
    w = torch.randn(n, generator=g)
    cases = {
        "psq quantize alone (no transform)": lambda: _quantize(gy, 127, seed, True),
        "hadamard today": lambda: had_today(gy, out, signs, h, seed),
        "hadamard folded": lambda: had_folded(gy, out, signs, h, seed),
        "hadamard folded-nocheck": lambda: had_folded(gy, out, signs, h, seed, check=False),
        "hadamard H8⊗H8-nocheck": lambda: had_two_stage(gy, out, signs, hadamard_matrix(8), seed),
        "bhq group sums sparse ×2": lambda: (group_sums_sparse(gy, w, group, a.groups),
                                             group_sums_sparse(out, w, group, a.groups)),
        "bhq group sums index_add ×2": lambda: (group_sums_index_add(gy, w, group, a.groups),
                                                group_sums_index_add(out, w, group, a.groups)),
    }
    ref = had_today(gy, out, signs, h, seed)
    for name in ("hadamard folded", "hadamard folded-nocheck", "hadamard H8⊗H8-nocheck"):
        got = cases[name]()
        same = [torch.equal(x, y) for x, y in zip(ref, got)]
        err = (got[2] - ref[2]).abs().max().item()
        print(f"{name}: codes equal {same[0]}, steps equal {same[1]}, inverse equal {same[2]} "
              f"(max |Δ| {err:.2e})", file=sys.stderr)
    s_ref = group_sums_sparse(gy, w, group, a.groups)
    s_new = group_sums_index_add(gy, w, group, a.groups)
    print(f"group sums: max |Δ| {(s_ref - s_new).abs().max().item():.2e}", file=sys.stderr)
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for f in cases.values():
        f()
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for _ in range(a.reps):
                t0 = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - t0)
    print(f"{machine()}; {a.threads} threads; ∇Y {n}×{o}, GEMM output {n}×{i}, {a.groups} BHQ "
          f"groups; medians of {a.rounds} interleaved rounds × {a.reps}\n")
    print("| transform | ms |\n|---|---|")
    for name in names:
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
