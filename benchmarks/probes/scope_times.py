"""Probe: wall-clock time per lowbit scope in training steps, without a profiler.

``torch.profiler`` inflates a converted step far more than a float one (docs/benchmarks.md,
"The custom op's dispatch in eager mode"), so its shares are not the step's real times.
This probe replaces ``lowbit.scopes.scope`` in every loaded lowbit module by a wall-clock
timer (``time.perf_counter``; nested scopes charge their time to the innermost, as
``profile_step.py`` does) and runs ``--steps`` steps of a ``bench_step`` workload per mode
after ``--warmup``, all modes in one process, interleaved by round. Prints per mode the
median step and each scope's median milliseconds a step (``other`` = the step outside
lowbit's scopes: the model's own ops, autograd, Python).

    python benchmarks/probes/scope_times.py --workload gpt --modes fqt-psq-8,fqt-bhq-8 --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_step  # noqa: E402

import lowbit  # noqa: E402, F401  (loads the modules whose scope is replaced)
from lowbit import scopes  # noqa: E402

_stack: list[list] = []  # open scopes: [name, start, time of nested scopes]
_totals: dict[str, float] = defaultdict(float)


@contextlib.contextmanager
def _timed(name: str) -> Iterator[None]:
    entry = [name, time.perf_counter(), 0.0]
    _stack.append(entry)
    try:
        yield
    finally:
        _stack.pop()
        spent = time.perf_counter() - entry[1]
        _totals[name] += spent - entry[2]
        if _stack:
            _stack[-1][2] += spent


def _install() -> list:
    """Every loaded lowbit module whose ``scope`` is ``lowbit.scopes.scope``, now timed."""
    original, patched = scopes.scope, []
    for name, mod in list(sys.modules.items()):
        if name.startswith("lowbit") and getattr(mod, "scope", None) is original:
            mod.scope = _timed  # type: ignore[attr-defined]
            patched.append(mod)
    return patched


def main(argv: list[str] | None = None) -> dict[str, dict[str, list[float]]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="gpt")
    p.add_argument("--modes", default="fqt-psq-8,fqt-bhq-8,fqt-hadamard-8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    bench_step.add_malloc_arg(p)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    malloc = bench_step.apply_malloc(a.malloc)
    modes = a.modes.split(",")
    benches = {m: bench_step.Bench(a.workload, m, a.size, "cpu") for m in modes}
    for b in benches.values():
        for _ in range(a.warmup):
            b.step()
    original = scopes.scope
    patched = _install()
    steps: dict[str, list[float]] = defaultdict(list)
    parts: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in modes}
    try:
        for r in range(a.rounds):
            for m in (modes if r % 2 == 0 else modes[::-1]):
                for _ in range(a.steps):
                    _totals.clear()
                    t = time.perf_counter()
                    benches[m].step()
                    dt = time.perf_counter() - t
                    steps[m].append(dt)
                    for k, v in _totals.items():
                        parts[m][k].append(v)
                    parts[m]["other"].append(dt - sum(_totals.values()))
    finally:
        for mod in patched:
            mod.scope = original
    print(f"{bench_step.machine()}; {a.threads} threads, {malloc}; {a.workload}; {len(patched)} modules' scopes timed; "
          f"medians of {a.rounds} rounds x {a.steps} steps")
    names = sorted({k for m in modes for k in parts[m]}, key=lambda k: (k == "other", k))
    print("| mode | step ms | " + " | ".join(n.replace("lowbit::", "") for n in names) + " |")
    print("|---|---|" + "---|" * len(names))
    n_steps = a.rounds * a.steps
    for m in modes:
        cells = [f"{statistics.median(parts[m][n] + [0.0] * (n_steps - len(parts[m][n]))) * 1e3:.1f}"
                 for n in names]
        print(f"| {m} | {statistics.median(steps[m]) * 1e3:.1f} | " + " | ".join(cells) + " |")
    return parts


if __name__ == "__main__":
    main()
