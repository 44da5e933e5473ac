"""First-step cost of a converted model: compiling lowbit's kernels, cold and warm.

lowbit's quantizer and epilogue kernels are compiled by ``torch.compile`` (Inductor) on
first use, one variant per kernel, dtype and layout, so the first training step of a
fresh process pays for compilation. For each workload and mode this runs one fresh
interpreter with an **empty** Inductor cache (a new ``TORCHINDUCTOR_CACHE_DIR``), then a
second fresh interpreter on the **same**, now warm, cache directory (what a restarted job
sees: dynamo traces again, Inductor's FX-graph and C++ caches hit). Each reports the
build + convert time, the first step, the second step and the median of the next
``--steps`` steps, and how many lowbit kernel variants were compiled. The import of
``torch._dynamo`` (a few seconds; lowbit's custom ops need it at their first call even
when nothing is compiled) is timed apart, before the first step.

    python benchmarks/bench_first_step.py                          # all workloads
    python benchmarks/bench_first_step.py --workload ffn --modes bf16,fqt-psq-8
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import Bench, machine  # noqa: E402
from step_workloads import WORKLOADS  # noqa: E402
from lowbit.experiments.rundir import write_atomic
from lowbit.experiments.train import check_out_file

MODES = ("bf16", "fqt-psq-8", "fqt-psq-8+bf16", "fqt-bhq-8", "fqt-hadamard-8")


def measure(workload: str, mode: str, size: str, steps: int) -> dict:
    """One process's first steps of (workload, mode), in ms. ``torch._dynamo`` (which
    the first call of any ``torch.library`` custom op imports, compiled or not) is
    imported first and timed apart: every mode that uses lowbit pays it once."""
    t0 = time.perf_counter()
    import torch._dynamo  # noqa: F401

    dynamo_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    b = Bench(workload, mode, size)
    built = time.perf_counter()
    b.timed(2 + steps)
    try:
        from lowbit.kernels import compiled

        variants = compiled.variant_count()
    except (ImportError, AttributeError):  # a lowbit without compiled kernels
        variants = None
    ms = [t * 1e3 for t in b.times]
    return {"workload": workload, "mode": mode, "dynamo_import_ms": dynamo_ms,
            "build_ms": (built - t0) * 1e3,
            "first_ms": ms[0], "second_ms": ms[1],
            "steady_ms": statistics.median(ms[2:]) if steps else None, "variants": variants}


def run_child(workload: str, mode: str, size: str, steps: int, cache: str, threads: int) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
    cmd = [sys.executable, __file__, "--one", workload, mode, "--size", size,
           "--steps", str(steps), "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{workload}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cold_and_warm(workload: str, mode: str, size: str, steps: int, threads: int) -> dict:
    """The child run twice on one fresh cache directory: empty, then warm."""
    with tempfile.TemporaryDirectory(prefix="lowbit-inductor-") as cache:
        cold = run_child(workload, mode, size, steps, cache, threads)
        warm = run_child(workload, mode, size, steps, cache, threads)
    return {"workload": workload, "mode": mode, "cold": cold, "warm": warm}


def table(rows: list[dict]) -> str:
    lines = ["| workload | mode | steady step ms | first step, empty cache | first step, warm cache "
             "| second step (empty / warm) | kernel variants | build + convert ms | import torch._dynamo |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, w = r["cold"], r["warm"]
        steady = c["steady_ms"]

        def first(x: dict, steady: float | None = steady) -> str:
            extra = f" (+{(x['first_ms'] - steady) / 1e3:.1f} s)" if steady else ""
            return f"{x['first_ms'] / 1e3:.2f} s{extra}"
        lines.append(f"| {r['workload']} | {r['mode']} | {steady:.0f} | {first(c)} | {first(w)} | "
                     f"{c['second_ms']:.0f} / {w['second_ms']:.0f} | {c['variants']} | "
                     f"{c['build_ms']:.0f} | {c['dynamo_import_ms'] / 1e3:.1f} s |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default=",".join(WORKLOADS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--steps", type=int, default=3, help="steps timed after the first two")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json", default=None)
    p.add_argument("--one", nargs=2, metavar=("WORKLOAD", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.json:  # checked before the measurement, not after it
        check_out_file("--json", a.json)
    if a.steps < 1:
        p.error("--steps must be ≥ 1")
    torch.set_num_threads(a.threads)
    if a.one:
        print(json.dumps(measure(*a.one, a.size, a.steps)))
        return 0
    header = machine()
    rows = []
    for w in a.workload.split(","):
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; allowed: {', '.join(WORKLOADS)}")
        for m in a.modes.split(","):
            rows.append(cold_and_warm(w, m, a.size, a.steps, a.threads))
            print(f"{w} {m}: {rows[-1]['cold']['first_ms']:.0f} / {rows[-1]['warm']['first_ms']:.0f} ms",
                  file=sys.stderr, flush=True)
    print(f"{header} (at start), load {os.getloadavg()[0]:.2f} at end; {a.threads} threads, "
          f"size={a.size}; each row: two fresh processes on one new Inductor cache directory\n")
    print(table(rows))
    if a.json:
        write_atomic(Path(a.json), json.dumps({"machine": header, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
