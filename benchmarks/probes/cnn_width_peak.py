"""Probe (docs/benchmarks.md, "The CNN's peak under bf16's"): the exact peak heap of one
training step of a PreAct-ResNet-20 of other widths and batch than ``bench_step``'s cnn
workload (a wide layer's 3×3 GEMMs sum over more than ``qconv.MAX_K`` = 1023 products,
so oneDNN's convolution does not take them: the im2col and scatter paths run), bf16
autocast against lowbit's ``fqt-psq-8`` under it. Runs itself with
``benchmarks/heap_peak.c`` preloaded (every block malloc hands out counted); two warm-up
steps, then the peak of a third above the heap before it, as ``bench_step``'s peak MB.

    python benchmarks/probes/cnn_width_peak.py --widths 32,64,128 --batch 64 [--channels-last]
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_step  # noqa: E402

import lowbit  # noqa: E402
from lowbit import allocator  # noqa: E402
from lowbit.experiments.models import PreActResNet  # noqa: E402


def peak_mb(mode: str, widths: tuple[int, int, int], batch: int, channels_last: bool) -> float:
    lib = bench_step._shim()
    g = torch.Generator().manual_seed(0)
    model = PreActResNet(20, widths=widths, num_classes=10, in_channels=1)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    if mode != "bf16":
        model = lowbit.convert(model, lowbit.FQTConfig.from_recipe(mode, seed=0))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
        for p in model.parameters():
            p.grad = None

    for _ in range(2):
        step()
    base = lib.lowbit_heap_bytes()
    lib.lowbit_heap_reset_peak()
    step()
    return (lib.lowbit_heap_peak() - base) / 2**20


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="32,64,128", help="the three stage widths")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--modes", default="bf16,fqt-psq-8")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    rc = bench_step.rerun_with_shim()  # not preloaded yet: this script again, with the shim
    if rc is not None:
        return rc
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()
    widths = tuple(int(w) for w in args.widths.split(","))
    for mode in args.modes.split(","):
        mb = peak_mb(mode, widths, args.batch, args.channels_last)  # type: ignore[arg-type]
        label = "bf16 autocast" if mode == "bf16" else f"{mode} under bf16 autocast"
        print(f"widths {args.widths}, batch {args.batch}, {'channels-last' if args.channels_last else 'NCHW'}, "
              f"{label}: peak {mb:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
