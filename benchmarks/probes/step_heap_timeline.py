"""Probe (docs/benchmarks.md, "Where the CNN's extra step memory sits"): where in a
training step the heap peaks. Samples the heap in use (``bench_step._heap_mb``: glibc
``mallinfo2``) every 0.5 ms around one step of a ``bench_step`` workload and mode (after
two warm-up steps, the C allocator recycling freed memory as ``bench_step`` sets it), with
the main thread's Python stack at each reading; prints the peak above the heap before the
step, the heap where the forward ends, the deepest lowbit/torch frames at the largest
readings, and a 60-point timeline. Memory does not depend on the machine's load.

    python benchmarks/probes/step_heap_timeline.py --workload cnn --mode fqt-psq-8+bf16
"""

import argparse
import collections
import os
import sys
import threading
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_step  # noqa: E402

from lowbit import allocator  # noqa: E402


def frames(ident: int) -> str:
    """The main thread's lowbit, benchmark and torch.nn frames, innermost first."""
    fr = sys._current_frames().get(ident)
    stack = traceback.extract_stack(fr)[-6:] if fr is not None else []
    keep = ("lowbit", "bench", "torch/nn")
    return " <- ".join(f"{f.name}:{f.lineno}" for f in reversed(stack) if any(k in f.filename for k in keep))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="cnn")
    p.add_argument("--mode", default="fqt-psq-8+bf16")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()
    b = bench_step.Bench(args.workload, args.mode, "full", "cpu")
    for _ in range(2):
        b.step()
    read, main_ident = bench_step._heap_mb(), threading.main_thread().ident
    base = read()
    samples: list[tuple[float, str]] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            samples.append((read() - base, frames(main_ident)))
            time.sleep(0.0005)

    forward_end: list[float] = []
    t = threading.Thread(target=run, daemon=True)
    t.start()
    b.step(after_forward=lambda: forward_end.append(read() - base))
    stop.set()
    t.join()
    peak = max(samples)
    print(f"{args.workload} {args.mode}: peak {peak[0]:.1f} MB above the idle heap, at {peak[1]}")
    print(f"heap where the forward ends (the saved activations and the loss): {forward_end[0]:.1f} MB")
    top: dict[str, float] = collections.defaultdict(float)
    for v, k in samples:
        top[k] = max(top[k], v)
    for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{v:7.1f}  {k[:200]}")
    print("--- timeline (reading index, MB, frames)")
    stride = max(1, len(samples) // 60)
    for i in range(0, len(samples), stride):
        v, k = max(samples[i:i + stride])
        print(f"{i:6d} {v:6.1f}  {k[:150]}")


if __name__ == "__main__":
    main()
