"""Probe (docs/benchmarks.md, "On the Intel Xeon machine"): which oneDNN kernel runs each
GEMM path lowbit could use at ``n³`` (default 2048³), and its throughput — ``torch._int_mm``
(s8·s8 → s32, lowbit's GEMM), ``onednn::qlinear_pointwise`` (u8·s8 → f32 with scales: the
brgemm int8 matmul, AMX where the CPU has it) with its weight packed once, the same with
the weight packed in every call (``onednn::qlinear_prepack``: in training both operands
change every step), bf16 ``mm`` and fp32 ``mm``. Each is checked exact (integer paths) or
against float64; medians of 9 calls after one warm-up. ``qlinear_prepack`` must be given
a contiguous (N, K) weight: a transposed view is packed as if it were contiguous (wrong
products), and an unpacked int8 weight crashes ``qlinear_pointwise``.

    python benchmarks/probes/gemm_paths.py --threads 1
    ONEDNN_VERBOSE=1 python benchmarks/probes/gemm_paths.py --n 1024 2>&1 | grep exec   # kernel names
"""

import argparse

import torch
from _timing import median_ms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--n", type=int, default=2048)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    n = args.n
    g = torch.Generator().manual_seed(0)
    a8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=g)
    b8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=g)
    exact = a8.double() @ b8.double()
    # qlinear computes x·wᵀ with x = a + 128 (u8, zero point 128) and w = bᵀ (s8, per-channel)
    xu = (a8.view(torch.uint8) ^ 128).contiguous()
    packed = torch.ops.onednn.qlinear_prepack(b8.t().contiguous(), [n, n])
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.int64)

    wt = b8.t().contiguous()

    def qlinear(pack: bool = False) -> torch.Tensor:
        w = torch.ops.onednn.qlinear_prepack(wt, [n, n]) if pack else packed
        return torch.ops.onednn.qlinear_pointwise(xu, 1.0, 128, w, ones, zeros, None, 1.0, 0,
                                                  torch.float32, "none", [], "")

    af, bf = a8.float(), b8.float()
    ab, bb = af.bfloat16(), bf.bfloat16()
    paths = {
        "int8 torch._int_mm": (lambda: torch._int_mm(a8, b8), True),
        "int8 onednn::qlinear_pointwise": (qlinear, True),
        "  the same, packed in every call": (lambda: qlinear(pack=True), True),
        "bf16 mm": (lambda: ab @ bb, False),
        "fp32 mm": (lambda: af @ bf, False),
    }
    print(f"{n}³, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    for name, (f, is_exact) in paths.items():
        err = (f().double() - exact).abs().max().item() / exact.abs().max().item()
        ms = median_ms(f)
        check = "exact" if is_exact and err == 0 else f"max rel err {err:.1e}"
        print(f"{name:32s} {ms:8.2f} ms  {2 * n**3 / ms / 1e6:7.0f} GOP/s  ({check})")


if __name__ == "__main__":
    main()
