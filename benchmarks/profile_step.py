"""Where the time of one training step goes: torch.profiler by lowbit scope and op.

Each op's self CPU time is charged to the innermost lowbit scope around it
(``lowbit::quantize``, ``lowbit::gemm``, ``lowbit::epilogue``, ``lowbit::transform``;
``model`` outside them: the model's own ops, autograd, the loss), then listed by op
within the scope. Compiled lowbit kernels show as ``## Call CompiledFxGraph …``; dynamo's
guard checks as ``TorchDynamo Cache Lookup``. One warm-up step runs under the profiler
first; the reported step is the next one.

    python benchmarks/profile_step.py --workload ffn --modes fqt-psq-8,fqt-bhq-8 --top 8
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import Bench, add_malloc_arg, apply_malloc, machine  # noqa: E402
from step_workloads import WORKLOADS  # noqa: E402

SCOPES = ("lowbit::quantize", "lowbit::gemm", "lowbit::epilogue", "lowbit::transform")


def _scope(event) -> str:  # noqa: ANN001
    e = event
    while e is not None:
        if e.name in SCOPES:
            return e.name.split("::")[1]
        e = e.cpu_parent
    return "model"


def profile_mode(workload: str, mode: str, size: str, warmup: int) -> tuple[float, dict[str, dict[str, list]]]:
    """(step wall ms under the profiler, scope → op → [self CPU ms, calls])."""
    b = Bench(workload, mode, size)
    for _ in range(warmup):
        b.step()
    events, wall = b.profiled()
    table: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    for e in events:
        if e.name in SCOPES:
            continue
        cell = table[_scope(e)][e.name]
        cell[0] += e.self_cpu_time_total / 1e3
        cell[1] += 1
    return wall, table


def render(workload: str, mode: str, wall: float, table: dict[str, dict[str, list]], top: int) -> str:
    lines = [f"\n#### {workload} · {mode}: {wall:.1f} ms under the profiler\n",
             "| scope | op | self CPU ms | calls | share of step |", "|---|---|---|---|---|"]
    totals = {s: sum(v[0] for v in ops.values()) for s, ops in table.items()}
    for scope in sorted(totals, key=lambda s: -totals[s]):
        lines.append(f"| **{scope}** | (all) | **{totals[scope]:.1f}** | | **{totals[scope] / wall:.0%}** |")
        ops = sorted(table[scope].items(), key=lambda kv: -kv[1][0])
        for name, (ms, calls) in ops[:top]:
            short = name if len(name) < 60 else name[:57] + "…"
            lines.append(f"| | `{short}` | {ms:.1f} | {calls} | {ms / wall:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="ffn", help="comma list of " + ", ".join(WORKLOADS))
    p.add_argument("--modes", default="fqt-psq-8,fqt-bhq-8,fqt-hadamard-8")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=6, help="ops listed per scope")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_malloc_arg(p)
    a = p.parse_args(argv)
    malloc = apply_malloc(a.malloc)
    torch.set_num_threads(a.threads)
    print(f"{machine()}; {a.threads} threads, size={a.size}, {malloc}")
    for w in a.workload.split(","):
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; allowed: {', '.join(WORKLOADS)}")
        for m in a.modes.split(","):
            wall, table = profile_mode(w, m, a.size, a.warmup)
            print(render(w, m, wall, table, a.top), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
