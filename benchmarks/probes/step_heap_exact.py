"""Probe (docs/benchmarks.md, "The CNN's peak under bf16's"): where in a training step the
heap peaks, counted exactly. Runs itself with ``benchmarks/heap_peak.c`` preloaded
(``bench_step.heap_shim``: every block malloc hands out is counted), takes two warm-up
steps of a ``bench_step`` workload and mode (the C allocator recycling freed memory, as
``bench_step`` sets it) and a third that measures the step's peak, then one step under
``sys.setprofile``: at every Python call and return it reads the shim's peak since the
previous event and resets it, so each peak is charged to the Python frame it happened
under (a C call's transient buffers included). Prints the step's peak and the heap where
its forward ends (MB above the heap before the step, as ``bench_step``'s peak MB without
its workspace term), then the largest peaks of the profiled step, one line per distinct
innermost frame. Only peaks within ``--window`` MB of the step's peak are recorded; the
peak is reset after recording and what the recording keeps (its dict, linecache) is
subtracted from every later reading, so its own allocations stay out of the readings.
Memory does not depend on the machine's load.

    python benchmarks/probes/step_heap_exact.py --workload cnn-cl --mode fqt-psq-8+bf16
"""

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import bench_step  # noqa: E402

from lowbit import allocator  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="cnn")
    p.add_argument("--mode", default="fqt-psq-8+bf16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=float, default=0.6, help="record peaks within this many MB of the step's")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()
    rc = bench_step.rerun_with_shim()  # not preloaded yet: this script again, with the shim
    if rc is not None:
        return rc
    lib = bench_step._shim()
    torch.set_num_threads(args.threads)
    allocator.keep_freed_memory()
    b = bench_step.Bench(args.workload, args.mode, "full", "cpu")
    for _ in range(2):
        b.step()
    forward_end: list[float] = []
    base = lib.lowbit_heap_bytes()
    lib.lowbit_heap_reset_peak()
    b.step(after_forward=lambda: forward_end.append((lib.lowbit_heap_bytes() - base) / 2**20))
    step_peak = lib.lowbit_heap_peak() - base
    above = step_peak - int(args.window * 2**20)
    peaks: dict[str, int] = {}
    own = [0]  # bytes the recording keeps (the dict, linecache): subtracted from every reading

    def profile(frame, event, arg) -> None:  # noqa: ANN001
        peak = lib.lowbit_heap_peak() - base - own[0]
        if peak >= above:
            before = lib.lowbit_heap_bytes()
            where = " <- ".join(f"{os.path.basename(f.filename)}:{f.name}:{f.lineno}"
                                for f in reversed(traceback.extract_stack(frame)[-6:]))
            peaks[where] = max(peaks.get(where, 0), peak)
            own[0] += lib.lowbit_heap_bytes() - before
        lib.lowbit_heap_reset_peak()  # after recording: its transient allocations are not the step's

    base = lib.lowbit_heap_bytes()
    lib.lowbit_heap_reset_peak()
    sys.setprofile(profile)
    b.step()
    sys.setprofile(None)
    print(f"{args.workload} {args.mode}: step peak {step_peak / 2**20:.2f} MB, heap where the forward ends "
          f"{forward_end[0]:.2f} MB (above the heap before the step)")
    seen: set[str] = set()
    for where, peak in sorted(peaks.items(), key=lambda kv: -kv[1]):
        head = where.split(" <- ")[0]
        if head in seen:
            continue
        seen.add(head)
        print(f"{peak / 2**20:8.3f} MB  {where[:220]}")
        if len(seen) >= args.top:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
