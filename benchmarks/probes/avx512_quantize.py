"""Probe (docs/benchmarks.md, "lowbit's AVX-512 quantizer"): the compiled (Inductor)
quantizer against lowbit's AVX-512 kernel (``lowbit.kernels.avx512``), on the operand
shapes of lowbit's workloads: one operand (per-row stochastic — float32, a transposed
view, bfloat16 — and per-tensor nearest, int8) and a Linear's two ∇Y quantizations (``quantize_pair``: rows for ∇X, columns for
∇W). Both through the dispatcher (``Kernels.run``), switched with
``avx512.set_enabled`` — but the per-tensor nearest call, which reaches the kernel
directly (``avx512.quantize``: on the AVX2 build the dispatcher keeps the compiled one for
it, ``avx512.prefers``); interleaved medians (``_timing``); every result checked bitwise
equal first. Needs a CPU with AVX-512, or with AVX2 and F16C (the kernel's AVX2
build, ``avx512.isa()``; the header line says which ran).

    python benchmarks/probes/avx512_quantize.py --threads 1
"""

import torch
from _timing import interleaved_ms, start

from lowbit.formats import Granularity, Rounding, parse_format
from lowbit.kernels import Backend, avx512, kernels_for

SHAPES = [("ffn ∇Y / gpt2 X", (2048, 1024)), ("ffn hidden", (2048, 4096)),
          ("gpt2 qkv ∇Y", (2048, 2304)), ("text gpt ∇Y", (2048, 768)),
          ("text gpt attention", (8192, 64)), ("cnn stage 1", (128, 12544)),
          ("cnn weight grad", (16, 100352))]


def main() -> None:
    start(__doc__)
    why = avx512.in_use()
    if why:
        raise SystemExit(f"lowbit's C quantizer is not in use: {why}")
    k = kernels_for(Backend.AUTO, "cpu")
    fmt = parse_format("int8")
    sr, rn = Rounding.STOCHASTIC, Rounding.NEAREST
    seed = torch.tensor(0x9E3779B9)
    print(f"threads {torch.get_num_threads()}; ms per call, compiled vs the C kernel's {avx512.isa()} build")
    print("| operand | shape | call | compiled ms | C kernel ms | speed-up | ns/element (C kernel) |")
    print("|---|---|---|---|---|---|---|")
    for name, shape in SHAPES:
        x = torch.randn(shape)
        xt, xb = x.t().contiguous().t(), x.bfloat16()
        calls = {"row SR": lambda x=x: k.run("quantize", x, fmt, Granularity.ROW, sr, seed),
                 "row SR, transposed view": lambda x=xt: k.run("quantize", x, fmt, Granularity.ROW, sr, seed),
                 "row SR, bf16": lambda x=xb: k.run("quantize", x, fmt, Granularity.ROW, sr, seed),
                 # the kernel itself: on its AVX2 build the dispatcher leaves this call to
                 # the compiled quantizer (avx512.prefers), which would time compiled twice
                 "tensor RN": lambda x=x: avx512.quantize(x, fmt, Granularity.TENSOR, rn, seed)
                 if avx512.in_use() is None else k.run("quantize", x, fmt, Granularity.TENSOR, rn, seed),
                 "pair SR": lambda x=x: k.run("quantize_pair", x, fmt, Granularity.ROW, sr, seed,
                                              fmt, Granularity.ROW, sr, seed)}
        for call, f in calls.items():
            avx512.set_enabled(False)
            want = f()
            avx512.set_enabled(True)
            got = f()
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True) if a is not None), (name, call)

            def off(f=f) -> object:  # noqa: ANN001
                avx512.set_enabled(False)
                return f()

            def on(f=f) -> object:  # noqa: ANN001
                avx512.set_enabled(True)
                return f()

            t_off, t_on = interleaved_ms(off, on)
            print(f"| {name} | {shape[0]}×{shape[1]} | {call} | {t_off:.2f} | {t_on:.2f} | "
                  f"{t_off / t_on:.2f}× | {t_on * 1e6 / x.numel():.2f} |")
    avx512.set_enabled(True)


if __name__ == "__main__":
    main()
