"""torch.compile of a converted model: graphs, recompiles and first-step time.

For each workload (a small CNN, an MLP, and a stack of differently dilated convolutions)
and each mode — the float model and the ``fqt-psq-8`` conversion, each eager and under
``torch.compile`` — one fresh subprocess (with an empty Inductor cache, so compilation is
really paid) builds the model, times its first training step (forward + backward + SGD
step; for compiled modes this includes compilation) and the median of the next
``--steps`` steps, and reports the graphs and graph breaks dynamo makes of it
(``torch._dynamo.explain``), the model graphs dynamo compiled in the timed run (a
recompile per layer would show here) and, apart, the variants of lowbit's own fused
kernels compiled on first use (``lowbit.kernels.compiled``; eager runs pay them too).

    python benchmarks/bench_compile.py                        # all workloads, markdown table
    python benchmarks/bench_compile.py --workload cnn --json compile.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn
from lowbit.experiments.rundir import write_atomic
from lowbit.experiments.train import check_out_file

WORKLOADS = ("cnn", "mlp", "dilated")
MODES = ("fp32", "fp32+compile", "fqt-psq-8", "fqt-psq-8+compile")


def build(workload: str, size: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """(model, input, target classes); ``size="tiny"`` for smoke runs."""
    torch.manual_seed(0)
    tiny = size == "tiny"
    if workload == "mlp":
        b, d, h = (8, 32, 32) if tiny else (128, 784, 512)
        model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
        x = torch.randn(b, d)  # (B, D)
    elif workload == "cnn":
        b, c, s = (4, 4, 8) if tiny else (64, 16, 28)
        model = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm2d(2 * c), nn.ReLU(),
            nn.Conv2d(2 * c, 4 * c, 3, stride=2, padding=1), nn.BatchNorm2d(4 * c), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10))
        x = torch.randn(b, 1, s, s)  # (B, 1, H, W)
    elif workload == "dilated":
        n, b, c, s = (6, 2, 4, 8) if tiny else (70, 8, 8, 16)
        layers: list[nn.Module] = []
        for i in range(n):  # 70 distinct (kernel, dilation) settings in the full size
            k, d = 1 + 2 * (i % 3), 1 + i % 7 + 7 * (i // 21)
            layers += [nn.Conv2d(c, c, k, padding=d * (k // 2), dilation=d), nn.ReLU()]
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * s * s, 10))
        x = torch.randn(b, c, s, s)
    else:
        raise ValueError(f"unknown workload {workload!r}; allowed: {', '.join(WORKLOADS)}")
    return model, x, torch.randint(0, 10, (x.shape[0],))


def measure(workload: str, mode: str, size: str, steps: int, backend: str) -> dict:
    """Run one (workload, mode) in this process and return its row."""
    import lowbit
    from lowbit.kernels import compiled
    from torch._dynamo.utils import counters

    model, x, y = build(workload, size)
    if mode.startswith("fqt"):
        lowbit.convert(model, lowbit.FQTConfig.from_recipe(mode.split("+")[0], seed=0))
    explain = torch._dynamo.explain(model)(x)
    torch._dynamo.reset()
    counters.clear()
    run = torch.compile(model, backend=backend) if mode.endswith("+compile") else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(run(x), y).backward()
        opt.step()
        return (time.perf_counter() - t) * 1e3

    first = step()
    rest = [step() for _ in range(steps)]
    return {"workload": workload, "mode": mode, "first_ms": first,
            "step_ms": statistics.median(rest) if rest else None,
            "graphs": explain.graph_count, "breaks": explain.graph_break_count,
            "model_graphs": counters["stats"]["unique_graphs"] - compiled.variant_count(),
            "kernel_variants": compiled.variant_count()}


def run_isolated(workload: str, mode: str, size: str, steps: int, backend: str) -> dict:
    """:func:`measure` in a fresh interpreter with an empty Inductor cache."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        cmd = [sys.executable, __file__, "--one", workload, mode, "--size", size,
               "--steps", str(steps), "--backend", backend]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{workload}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = ["| workload | mode | graphs (breaks) | model graphs compiled | lowbit kernel variants "
             "compiled | first step ms | step ms |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        step = "–" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
        lines.append(f"| {r['workload']} | {r['mode']} | {r['graphs']} ({r['breaks']}) | "
                     f"{r['model_graphs']} | {r['kernel_variants']} | {r['first_ms']:.0f} | {step} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default=",".join(WORKLOADS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--steps", type=int, default=5, help="steps timed after the first")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--json", default=None)
    p.add_argument("--one", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--inprocess", action="store_true", help="no subprocesses (smoke tests)")
    a = p.parse_args(argv)
    if a.json:  # checked before the measurement, not after it
        check_out_file("--json", a.json)
    if not a.inprocess:  # a smoke run inside a test session leaves its thread count alone
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if a.one:
        print(json.dumps(measure(*a.one, a.size, a.steps, a.backend)))
        return 0
    rows = []
    for w in a.workload.split(","):
        for m in a.modes.split(","):
            if m not in MODES:
                p.error(f"unknown mode {m!r}; allowed: {', '.join(MODES)}")
            one = measure if a.inprocess else run_isolated
            rows.append(one(w, m, a.size, a.steps, a.backend))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, backend {a.backend}\n")
    print(table(rows))
    if a.json:
        write_atomic(Path(a.json), json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
