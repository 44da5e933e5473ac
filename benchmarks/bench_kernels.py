"""Kernel micro-benchmark of the ∇Y quantization: today's kernels against prototypes.

A layer's backward quantizes its output gradient ``∇Y`` (N, out) twice, independently:
row codes for ``∇X = Q_a(∇Y)·W`` and column codes for ``∇W = Q_w(∇Y)ᵀ·X``, and sums it
over rows for the bias gradient. Today that is two compiled quantizer calls (the second
on the transposed view) plus an eager sum. Prototypes timed here, on the same input and
noise seeds, each checked **bitwise** against today's codes and steps before timing:

  two-calls        today: ``quantize_codes(∇Y)`` + ``quantize_codes(∇Yᵀ)`` + ``∇Y.sum(0)``
  two-calls-i32    the same with the counter hash in int32 arithmetic
  one-graph        today's two quantizer functions and the sum traced as one compiled graph
  dual             one compiled kernel: both absmaxes, both code tensors (the column codes
                   written in ∇Y's layout and handed to the GEMM transposed), the bias sum
  dual-i32         ``dual`` with the int32 hash

The int32 hash computes the same 32-bit function as ``lowbit.formats.counter_uniform``
(multiplication mod 2³² is the low half of the int64 product; logical shifts are
arithmetic shifts masked), so the noise stream, and the codes, do not change.

    python benchmarks/bench_kernels.py --shape 2048,4096 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import machine  # noqa: E402

K1, K2 = 0x27D4EB2D, 0x45D9F3B  # the multipliers of lowbit.formats.counter_uniform


def _grid_step(absmax: torch.Tensor, qmax: int) -> torch.Tensor:
    from lowbit.formats import grid_step

    return grid_step(absmax, qmax)


def hash_u32(idx: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """``counter_uniform``'s noise for int32 element indices ``idx`` (any layout) and a
    0-d int64 ``seed`` in [0, 2³²), computed in int32 (wrapping) arithmetic."""
    s = torch.where(seed >= 2**31, seed - 2**32, seed).to(torch.int32)
    x = idx * K1 + s
    x = (((x >> 16) & 0xFFFF) ^ x) * K2
    x = (((x >> 16) & 0xFFFF) ^ x) * K2
    x = ((x >> 16) & 0xFFFF) ^ x
    return ((x >> 8) & 0xFFFFFF).to(torch.float32) * (2.0**-24)


def hash_u64(idx: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Today's ``counter_uniform`` arithmetic (int64, masked to 32 bits) on ``idx``."""
    m = 0xFFFFFFFF
    x = (idx.to(torch.int64) * K1 + seed) & m
    x = (((x >> 16) ^ x) * K2) & m
    x = (((x >> 16) ^ x) * K2) & m
    x = (x >> 16) ^ x
    return (x >> 8).to(torch.float32) * (2.0**-24)


def _sr_codes(x: torch.Tensor, amax: torch.Tensor, qmax: int, u: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    from lowbit.formats import stochastic_round

    step = _grid_step(amax, qmax)
    q = stochastic_round(x / torch.where(amax == 0, torch.ones_like(step), step), u)
    return q.clamp(-qmax, qmax).to(torch.int8), step


def quantize_rows(x: torch.Tensor, qmax: int, seed: torch.Tensor, wide: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Today's per-row SR quantizer (``reference.quantize_codes``), noise by row-major
    index of ``x``'s shape, with the int64 (``wide``) or the int32 hash."""
    x = x.float()
    r, c = x.shape
    idx = torch.arange(r * c, dtype=torch.int64 if wide else torch.int32, device=x.device).view(r, c)
    u = hash_u64(idx, seed) if wide else hash_u32(idx, seed)
    return _sr_codes(x, x.abs().amax(dim=1, keepdim=True), qmax, u)


def dual_quantize(gy: torch.Tensor, qmax: int, seed_rows: torch.Tensor, seed_cols: torch.Tensor,
                  wide: bool) -> tuple[torch.Tensor, ...]:
    """From one read of ``gy`` (N, out): row codes (N, out) + row steps (N, 1) — equal to
    ``quantize_rows(gy, seed_rows)`` — and column codes *in gy's layout* (N, out) +
    column steps (out, 1) — their transpose equals ``quantize_rows(gy.t(), seed_cols)`` —
    and the bias gradient ``gy.sum(0)`` (out,)."""
    x = gy.float()
    n, o = x.shape
    dt = torch.int64 if wide else torch.int32
    hash_ = hash_u64 if wide else hash_u32
    idx = torch.arange(n * o, dtype=dt, device=x.device)
    u_rows = hash_(idx.view(n, o), seed_rows)
    u_cols = hash_(idx.view(o, n).t(), seed_cols)  # element (i, j) has index j·N + i
    a = x.abs()
    q_rows, s_rows = _sr_codes(x, a.amax(dim=1, keepdim=True), qmax, u_rows)
    q_cols, s_cols = _sr_codes(x, a.amax(dim=0, keepdim=True), qmax, u_cols)
    return q_rows, s_rows, q_cols, s_cols.t(), x.sum(0)


def one_graph(gy: torch.Tensor, qmax: int, seed_rows: torch.Tensor, seed_cols: torch.Tensor,
              wide: bool) -> tuple[torch.Tensor, ...]:
    """Today's two quantizer calls and the bias sum, unchanged, traced as one graph (the
    column codes come out (out, N), as today)."""
    q_rows, s_rows = quantize_rows(gy, qmax, seed_rows, wide)
    q_cols, s_cols = quantize_rows(gy.t(), qmax, seed_cols, wide)
    return q_rows, s_rows, q_cols, s_cols, gy.float().sum(0)


def _compiled(fn):  # noqa: ANN001, ANN202
    return torch.compile(fn, dynamic=True, fullgraph=True)


def candidates(qmax: int) -> dict:
    """name → fn(gy, seed_rows, seed_cols) → (row codes, row steps, col codes (out, N) or
    a transposed view, col steps, bias grad)."""
    rows64, rows32 = _compiled(quantize_rows), _compiled(quantize_rows)
    dual64, dual32 = _compiled(dual_quantize), _compiled(dual_quantize)
    graph64 = _compiled(one_graph)

    def two(fn, wide):  # noqa: ANN001, ANN202
        def run(gy, s1, s2):  # noqa: ANN001, ANN202
            qr, sr = fn(gy, qmax, s1, wide)
            qc, sc = fn(gy.t(), qmax, s2, wide)
            return qr, sr, qc, sc, gy.sum(0, dtype=torch.float32)
        return run

    def dual(fn, wide):  # noqa: ANN001, ANN202
        def run(gy, s1, s2):  # noqa: ANN001, ANN202
            qr, sr, qc, sc, gb = fn(gy, qmax, s1, s2, wide)
            return qr, sr, qc.t(), sc, gb
        return run

    def graph(gy, s1, s2):  # noqa: ANN001, ANN202
        return graph64(gy, qmax, s1, s2, True)

    return {"two-calls": two(rows64, True), "two-calls-i32": two(rows32, False),
            "one-graph": graph, "dual": dual(dual64, True), "dual-i32": dual(dual32, False)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2048,4096", help="N,out of ∇Y")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n, o = (int(v) for v in a.shape.split(","))
    g = torch.Generator().manual_seed(0)
    gy = (torch.randn(n, o, generator=g) * torch.rand(n, 1, generator=g).pow(4)).to(getattr(torch, a.dtype))
    s1, s2 = torch.tensor(0xDEADBEEF), torch.tensor(12345)
    qmax = 127
    cands = candidates(qmax)
    want = None
    for name, fn in cands.items():  # compile, then check bitwise against today's kernels
        got = fn(gy, s1, s2)
        if want is None:
            want = got
        for i, (w, x) in enumerate(zip(want[:4], got[:4])):
            if not torch.equal(w, x):
                raise SystemExit(f"{name}: output {i} differs from two-calls")
        # a float32 sum of N terms is within N·2⁻²⁴·Σ|x| of the exact one (any order)
        exact, bound = gy.double().sum(0), n * 2.0**-24 * gy.double().abs().sum(0)
        if not bool(((got[4].double() - exact).abs() <= bound).all()):
            raise SystemExit(f"{name}: bias gradient differs beyond float rounding")
    times: dict[str, list[float]] = {k: [] for k in cands}
    names = list(cands)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            for _ in range(a.reps):
                t0 = time.perf_counter()
                cands[name](gy, s1, s2)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["two-calls"])
    print(f"{machine()}; {a.threads} threads; ∇Y {n}×{o} {a.dtype}; medians of "
          f"{a.rounds} interleaved rounds × {a.reps}; every candidate's codes and steps "
          "bitwise equal to two-calls\n")
    print("| kernel | ms | × two-calls |\n|---|---|---|")
    for name in names:
        t = statistics.median(times[name])
        print(f"| {name} | {t * 1e3:.2f} | {base / t:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
