"""Text-task training step with lowbit's attention against the same step with attention
kept in float (issue 13, item 5: "no slower than with attention in float").

Both modes convert the workload with one recipe; ``attention float`` keeps its
``ScaledDotProductAttention`` modules float with a ``module_filter`` (the step of the
text task before attention was quantized: torch's fused attention kernel), ``attention
low-bit`` converts them too. Modes are timed interleaved in one process (``--rounds``
rounds of ``--steps`` steps each, order rotated), so that a shared machine's drift hits
both alike; the table gives the median and the minimum step time. ``--part attention``
times the attention alone (forward + backward of one layer's shapes).

    python benchmarks/bench_attention.py                          # gpt workload, fqt-psq-8
    python benchmarks/bench_attention.py --workload gpt2-block --recipe fqt-bhq-8
    python benchmarks/bench_attention.py --part attention
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lowbit  # noqa: E402
from lowbit.attention_modules import ScaledDotProductAttention  # noqa: E402
from bench_step import add_malloc_arg, apply_malloc  # noqa: E402
from step_workloads import build  # noqa: E402

MODES = ("attention float", "attention low-bit")


def step_fn(mode: str, workload: str, recipe: str, size: str) -> Callable[[], None]:
    w = build(workload, size)
    keep_float = (lambda m, n: not isinstance(m, ScaledDotProductAttention)) if mode == MODES[0] else None
    lowbit.convert(w.model, lowbit.FQTConfig.from_recipe(recipe, seed=0), keep_float)
    params = list(w.model.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        w.step_loss().backward()
    return step


def attention_fn(mode: str, recipe: str, size: str) -> Callable[[], None]:
    """One TinyGPT layer's attention (16 × 4 heads × 128 tokens × 64), causal."""
    b, h, t, d = (16, 4, 128, 64) if size == "full" else (2, 2, 16, 8)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, generator=g, requires_grad=True) for _ in range(3))
    state = lowbit.functional.block_state(lowbit.FQTConfig.from_recipe(recipe, seed=0))

    def step() -> None:
        if mode == MODES[0]:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = lowbit.functional.scaled_dot_product_attention(q, k, v, is_causal=True, state=state)
        out.backward(torch.ones_like(out))
    return step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="gpt", choices=("gpt", "gpt2-block"))
    p.add_argument("--part", default="step", choices=("step", "attention"))
    p.add_argument("--recipe", default="fqt-psq-8")
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_malloc_arg(p)
    args = p.parse_args(argv)
    malloc = apply_malloc(args.malloc)
    if args.rounds < 1 or args.steps < 1 or args.warmup < 0:
        p.error("--rounds and --steps must be ≥ 1, --warmup ≥ 0")
    torch.set_num_threads(args.threads)
    fns = {m: (step_fn(m, args.workload, args.recipe, args.size) if args.part == "step"
               else attention_fn(m, args.recipe, args.size)) for m in MODES}
    for fn in fns.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for m in MODES[r % 2:] + MODES[:r % 2]:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fns[m]()
                times[m].append(time.perf_counter() - t0)
    what = f"{args.workload} training step" if args.part == "step" else "attention forward + backward"
    print(f"{what}, {args.recipe}, size {args.size}, torch {torch.__version__}, {args.threads} "
          f"threads, {malloc}; {args.rounds} interleaved rounds × {args.steps} steps after {args.warmup} "
          "warm-up\n")
    print("| mode | median ms | min ms | median × attention float |")
    print("|---|---|---|---|")
    base = statistics.median(times[MODES[0]])
    for m in MODES:
        med = statistics.median(times[m])
        print(f"| {m} | {1e3 * med:.1f} | {1e3 * min(times[m]):.1f} | {med / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
