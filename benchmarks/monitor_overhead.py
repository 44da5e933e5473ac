"""Cost of lowbit's variance monitor on a training step (forward + backward).

Three modes per workload, timed interleaved (``--rounds`` rounds of ``--steps`` steps
each, so that a shared machine's drift hits all alike; medians reported):

* ``plain``: the converted model, no monitor;
* ``idle``: a :class:`lowbit.monitor.VarianceMonitor` whose hooks are installed but whose
  interval is never reached (the cost every step pays);
* ``monitored``: ``every=1``, every step measured.

The cost at interval ``K`` is ``(t_monitored − t_idle)/K + (t_idle − t_plain)``.
Workloads as ``bench_step.py``: ``ffn`` Linear(1024→4096) → GELU → Linear(4096→1024) on
2048 tokens; ``gpt`` the text task's TinyGPT (4 layers, width 256, 16 × 128 tokens).

    python benchmarks/monitor_overhead.py --device cpu --threads 2 --recipe fqt-psq-8
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import statistics
import sys
import time

import torch
from torch import nn

import lowbit
from lowbit.monitor import VarianceMonitor
from lowbit.experiments.rundir import write_atomic
from lowbit.experiments.train import check_out_file


def build(workload: str, device: str) -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    if workload == "ffn":
        model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).to(device)
        x = torch.randn(2048, 1024, device=device, requires_grad=True)  # (T, D)
        return model, lambda: model(x).float().square().mean()
    from lowbit.experiments.models import TinyGPT

    model = TinyGPT(block_size=128, n_layer=4, n_head=4, n_embd=256).to(device)
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 256, (16, 128), generator=g).to(device)  # (B, T)
    tgt = torch.randint(0, 256, (16, 128), generator=g).to(device)
    return model, lambda: model(idx, tgt)[1].float()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(workload: str, recipe: str, device: str, warmup: int, steps: int, rounds: int) -> dict:
    runs = {}
    for mode in ("plain", "idle", "monitored"):
        model, loss_fn = build(workload, device)
        lowbit.convert(model, lowbit.FQTConfig.from_recipe(recipe, seed=0))
        mon = None if mode == "plain" else VarianceMonitor(model, every=1 if mode == "monitored" else 10**9)
        runs[mode] = (model, loss_fn, mon, [])

    def step(mode: str) -> float:
        model, loss_fn, mon, _ = runs[mode]
        for p in model.parameters():
            p.grad = None
        sync(device)
        t0 = time.perf_counter()
        if mon is None:
            loss_fn().backward()
        else:
            with mon.step():
                loss_fn().backward()
        sync(device)
        return time.perf_counter() - t0

    for mode in runs:
        for _ in range(warmup):
            step(mode)
    modes = list(runs)
    for r in range(rounds):
        for mode in modes[r % 3:] + modes[:r % 3]:
            runs[mode][3].extend(step(mode) for _ in range(steps))
    ms = {m: 1e3 * statistics.median(v[3]) for m, v in runs.items()}
    extra, idle = ms["monitored"] - ms["idle"], ms["idle"] - ms["plain"]
    return {"workload": workload, "recipe": recipe, "device": device, "ms": ms,
            "monitored_extra_ms": extra, "idle_extra_ms": idle,
            **{f"overhead_at_{k}": (extra / k + idle) / ms["plain"] for k in (25, 50, 100)}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", default="ffn,gpt")
    p.add_argument("--recipe", default="fqt-psq-8")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--json")
    a = p.parse_args(argv)
    if a.json:  # checked before the measurement, not after it
        check_out_file("--json", a.json)
    torch.set_num_threads(a.threads)
    out = []
    for w in a.workload.split(","):
        r = measure(w, a.recipe, a.device, a.warmup, a.steps, a.rounds)
        out.append(r)
        print(f"{w} {a.recipe} {a.device} threads {a.threads}: plain {r['ms']['plain']:.1f} ms, "
              f"idle {r['ms']['idle']:.1f}, monitored {r['ms']['monitored']:.1f}; overhead at "
              f"K=50 {100 * r['overhead_at_50']:.1f}%, K=100 {100 * r['overhead_at_100']:.1f}%",
              flush=True)
    if a.json:
        write_atomic(Path(a.json), json.dumps({"args": vars(a), "torch": torch.__version__,
                                               "results": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
