"""Peak memory of a stride-2 convolution's step on the exact float32 route
(``lowbit.kernels.qconv.FLOAT32_CONV``): im2col and the route's GEMMs (the route before),
one float32 convolution of the whole batch's codes, and the same in pieces of samples
(``lowbit.conv.acc_pieces``, as shipped). ``Conv2d(c, c, 3, padding=1)``, ReLU,
``Conv2d(c, c, 3, stride=2, padding=1)``; the most bytes the second step holds at once
(torch's profiler memory events), in MiB.

    python benchmarks/probes/conv_f32_peak.py [--batch 128] [--size 28]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import lowbit
from lowbit import conv
from lowbit.kernels import exact_f32, qconv


def peak_mib(f) -> float:  # noqa: ANN001
    """The most MiB ``f()`` holds allocated at once (the running total of the profiler's
    memory events, less what was allocated before it ran)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        f()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(str(Path(d) / "trace.json"))
        events = json.loads((Path(d) / "trace.json").read_text())["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    base = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return (max(e["args"]["Total Allocated"] for e in mem) - base) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=28)
    args = ap.parse_args()
    exact_f32.ENGINE = "float32"
    torch.set_num_threads(1)
    print("| channels, recipe | im2col + GEMMs | float32 conv, whole batch | float32 conv, pieces (shipped) |")
    print("|---|---|---|---|")
    for c, recipe in ((64, "fqt-psq-8"), (112, "fqt-bhq-8")):
        torch.manual_seed(0)
        base = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, stride=2, padding=1))
        x = torch.randn(args.batch, c, args.size, args.size, requires_grad=True)
        cells = []
        for f32, pieces in ((False, True), (True, False), (True, True)):
            qconv.FLOAT32_CONV, conv.ACC_IN_PIECES = f32, pieces
            model = lowbit.convert(copy.deepcopy(base), lowbit.FQTConfig.from_recipe(recipe, seed=0))

            def step() -> None:
                model(x).square().mean().backward()  # noqa: B023 - run within the iteration
            step()
            cells.append(f"{peak_mib(step):.1f}")
        qconv.FLOAT32_CONV, conv.ACC_IN_PIECES = True, True
        print(f"| {c}, `{recipe}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
