"""Probe (docs/benchmarks.md, "lowbit's AMX int8 GEMM"): ``torch._int_mm`` against the
AMX kernel of ``lowbit.kernels.amx`` (``amx.kernel``: on every layout, also those the op
``lowbit::int8_mm`` hands to ``_int_mm``) and bf16 ``mm``, on the GEMM shapes of
lowbit's workloads — the FFN's, gpt2-block's and the text GPT's Linear GEMMs (forward,
∇X, ∇W with their operand layouts: ``x @ Wᵀ`` reads a transposed weight, ``∇Y @ W`` a
row-major one, ``∇Yᵀ @ X`` a transposed left operand), a convolution's ∇W, attention's
per-head products and small squares that place :data:`lowbit.kernels.amx.MIN_MACS`.
Both kernels get the operands in the layout lowbit has (``_int_mm`` reads a transposed
operand itself). Interleaved medians (``_timing``), every AMX result checked equal to
``_int_mm``'s. Needs a CPU with AMX.

    python benchmarks/probes/amx_int_mm.py --threads 1
"""

import argparse

import torch
from _timing import interleaved_ms

from lowbit.kernels import amx, int8


def cases() -> list[tuple[str, int, int, int, str]]:
    """(name, m, k, n, layout): ``nt`` a @ bᵀ (b stored (n, k)), ``nn`` row-major b,
    ``tn`` aᵀ stored (k, m) @ row-major b."""
    out = []
    for name, tokens, d, h in (("ffn", 2048, 1024, 4096), ("gpt2", 2048, 768, 3072)):
        out += [(f"{name} fwd up", tokens, d, h, "nt"), (f"{name} dX up", tokens, h, d, "nn"),
                (f"{name} dW up", h, tokens, d, "tn")]
    # PreAct-ResNet-20's weight-gradient GEMMs (im2col by kernel row: C_out × N·P × C_in·k_w)
    out += [("conv dW s1", 16, 107520, 48, "nn"), ("conv dW s2", 32, 28672, 96, "nn"),
            ("conv dW s3", 64, 8064, 192, "nn")]
    # the text GPT's Linear GEMMs (2048 tokens, width 256, MLP 1024)
    out += [("text qkv fwd", 2048, 256, 768, "nt"), ("text qkv dX", 2048, 768, 256, "nn"),
            ("text qkv dW", 768, 2048, 256, "tn"), ("text fc dW", 1024, 2048, 256, "tn"),
            ("text fc2 dW", 256, 2048, 1024, "tn")]
    out += [("attn QK^T", 512, 64, 512, "nt"), ("attn PV", 512, 512, 64, "nn"),
            ("text GEMM", 2048, 256, 256, "nt")]
    out += [(f"square {s}", s, s, s, "nt") for s in (64, 96, 128, 192, 256)]
    return out


def operands(m: int, k: int, n: int, layout: str, g: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    def r(*shape: int) -> torch.Tensor:
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
    a = r(k, m).t() if layout == "tn" else r(m, k)
    b = r(n, k).t() if layout == "nt" else r(k, n)
    return a, b


def time_case(m: int, k: int, n: int, layout: str, g: torch.Generator
              ) -> tuple[float, float, float]:
    """(``_int_mm``, AMX, bf16) median ms of one case; the AMX sums checked first."""
    a, b = operands(m, k, n, layout, g)
    ac, bc = int8.dense(a), int8.dense(b)  # the operands as lowbit hands them to _int_mm
    assert torch.equal(amx.kernel(a, b), torch._int_mm(ac, bc))
    af, bf = a.bfloat16(), b.bfloat16()
    t_int, t_amx = interleaved_ms(lambda: torch._int_mm(ac, bc), lambda: amx.kernel(a, b))
    t_bf = interleaved_ms(lambda: af @ bf, lambda: None)[0]
    return t_int, t_amx, t_bf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not amx.available():
        raise SystemExit("no AMX kernel on this machine (lowbit.kernels.amx.available() is False)")
    g = torch.Generator().manual_seed(0)
    print(f"{torch.get_num_threads()} thread(s), torch {torch.__version__}, MIN_MACS = {amx.MIN_MACS}")
    print(f"{'GEMM':14s} {'m×k×n':>16s} {'layout':6s} {'_int_mm ms':>10s} {'AMX ms':>8s} "
          f"{'bf16 ms':>8s} {'AMX/_int_mm':>11s} {'AMX GOP/s':>9s}")
    for name, m, k, n, layout in cases():
        t_int, t_amx, t_bf = time_case(m, k, n, layout, g)
        print(f"{name:14s} {f'{m}×{k}×{n}':>16s} {layout:6s} {t_int:10.3f} {t_amx:8.3f} {t_bf:8.3f} "
              f"{t_int / t_amx:11.2f} {2 * m * k * n / t_amx / 1e6:9.0f}")

if __name__ == "__main__":
    main()
