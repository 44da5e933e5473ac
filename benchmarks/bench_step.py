"""Training-step benchmark: lowbit recipes against fp32, bf16 autocast and torchao.

Workloads (forward + backward of one training step, gradients for the input too):
  ffn   Linear(D→F) → GELU → Linear(F→D) on T tokens (default D=1024, F=4096, T=2048)
  gpt   the text task's transformer (4 layers, width 256, 16×128 tokens)

Each mode runs in its own subprocess (so peak memory is its own); the table reports the
median step time over ``--steps`` timed steps after ``--warmup`` steps, speedups against
fp32 and bf16 of the same run, and the peak resident memory the step adds on top of the
idle process (sampled every 0.5 ms). For lowbit modes a profiled step gives the
breakdown GEMM / quantize / transform / epilogue (CPU time inside lowbit's labelled
regions; the rest is the model's own ops: GELU, bias gradients, the loss).

    python benchmarks/bench_step.py                      # full table, both workloads
    python benchmarks/bench_step.py --workload ffn --modes fp32,bf16,fqt-psq-8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

BASELINES = ("fp32", "bf16", "torchao-int8")
LOWBIT = ("fqt-ptq-8", "fqt-psq-8", "fqt-bhq-8", "fqt-hadamard-8")
DEFAULT_MODES = BASELINES + LOWBIT + tuple(f"{m}+bf16" for m in LOWBIT) + ("fqt-psq-8:reference",)
LABELS = ("lowbit::gemm", "lowbit::quantize", "lowbit::transform", "lowbit::epilogue")


@dataclass
class Result:
    workload: str
    mode: str
    ms: float | None
    peak_mb: float | None
    breakdown: dict[str, float]
    note: str = ""


# -- workloads -----------------------------------------------------------------------------
def build(workload: str, size: str) -> tuple[nn.Module, callable]:
    torch.manual_seed(0)
    if workload == "ffn":
        d, f, t = (1024, 4096, 2048) if size == "full" else (64, 128, 64)
        model = nn.Sequential(nn.Linear(d, f), nn.GELU(), nn.Linear(f, d))
        x = torch.randn(t, d, requires_grad=True)  # (T, D)

        def loss() -> torch.Tensor:
            return model(x).float().square().mean()
    elif workload == "gpt":
        from lowbit.experiments.models import TinyGPT

        layers, width, batch, block = (4, 256, 16, 128) if size == "full" else (2, 64, 2, 16)
        model = TinyGPT(block_size=block, n_layer=layers, n_head=4, n_embd=width)
        g = torch.Generator().manual_seed(0)
        idx = torch.randint(0, 256, (batch, block), generator=g)  # (B, T)
        tgt = torch.randint(0, 256, (batch, block), generator=g)

        def loss() -> torch.Tensor:
            return model(idx, tgt)[1].float()
    else:
        raise ValueError(f"unknown workload {workload!r}; allowed: ffn, gpt")
    return model, loss


def prepare(mode: str, model: nn.Module) -> tuple[str | None, str]:
    """Convert ``model`` for ``mode``; returns (autocast dtype name or None, note)."""
    recipe, _, amp = mode.partition("+")
    if recipe == "fp32":
        return None, ""
    if recipe == "bf16":
        return "bf16", ""
    if recipe == "torchao-int8":
        try:
            from torchao import quantize_
            from torchao.prototype.quantized_training import int8_mixed_precision_training
        except ImportError as exc:
            raise RuntimeError(f"torchao not installed ({exc.name})") from None
        quantize_(model, int8_mixed_precision_training())
        return None, ""
    import lowbit

    name, _, backend = recipe.partition(":")
    cfg = lowbit.FQTConfig.from_recipe(name, backend=backend or "auto", seed=0)
    lowbit.convert(model, cfg)
    return (amp or None), ("reference kernels" if backend == "reference" else "")


# -- measurement ---------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS:
    """Samples this process's resident memory in a thread while active."""

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = _rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.0005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def run_one(workload: str, mode: str, size: str, warmup: int, steps: int, measure_memory: bool) -> Result:
    model, loss_fn = build(workload, size)
    amp, note = prepare(mode, model)
    params = [p for p in model.parameters()]

    def step() -> None:
        for p in params:
            p.grad = None
        if amp:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = loss_fn()
        else:
            loss = loss_fn()
        loss.backward()

    for _ in range(warmup):
        step()
    times = []
    mem = PeakRSS() if measure_memory and os.path.exists("/proc/self/statm") else None
    if mem:
        mem.__enter__()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if mem:
        mem.__exit__()
    breakdown: dict[str, float] = {}
    if mode not in BASELINES:
        from torch.profiler import profile

        with profile() as prof:
            step()
        totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in LABELS}
        breakdown = {k.split("::")[1]: round(totals.get(k, 0.0), 2) for k in LABELS}
    peak = round(mem.peak - mem.base, 1) if mem else None
    return Result(workload, mode, round(statistics.median(times) * 1e3, 2), peak, breakdown, note)


def run_subprocess(args: argparse.Namespace, workload: str, mode: str) -> Result:
    cmd = [sys.executable, __file__, "--child", "--workload", workload, "--modes", mode,
           "--size", args.size, "--warmup", str(args.warmup), "--steps", str(args.steps),
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return Result(workload, mode, None, None, {}, f"skipped: {err[:120]}")
    return Result(**json.loads(lines[-1]))


# -- report --------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    out = []
    for wl in dict.fromkeys(r.workload for r in results):
        rows = [r for r in results if r.workload == wl]
        base = {r.mode: r.ms for r in rows if r.ms}
        out.append(f"\n### {wl}\n")
        out.append("| mode | ms/step | × fp32 | × bf16 | peak MB | gemm | quantize | transform | epilogue | note |")
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            def ratio(ref: str, r: Result = r, base: dict = base) -> str:
                return f"{base[ref] / r.ms:.2f}" if r.ms and base.get(ref) else "-"
            b = r.breakdown
            cells = [f"{b[k]:.1f}" if k in b else "-" for k in ("gemm", "quantize", "transform", "epilogue")]
            ms = f"{r.ms:.1f}" if r.ms else "-"
            peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "-"
            out.append(f"| {r.mode} | {ms} | {ratio('fp32')} | {ratio('bf16')} | {peak} | "
                       + " | ".join(cells) + f" | {r.note} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="ffn,gpt", help="comma list of ffn, gpt")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma list: fp32, bf16, torchao-int8, a lowbit recipe, RECIPE+bf16 "
                        "(under bf16 autocast), RECIPE:reference")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--inprocess", action="store_true", help="no subprocesses, no memory (smoke test)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be ≥ 1 and --warmup ≥ 0")
    torch.set_num_threads(args.threads)
    workloads = [w for w in args.workload.split(",") if w]
    modes = [m for m in args.modes.split(",") if m]
    if args.child:
        r = run_one(workloads[0], modes[0], args.size, args.warmup, args.steps, measure_memory=True)
        print(json.dumps(asdict(r)))
        return 0
    results = []
    for wl in workloads:
        for mode in modes:
            if args.inprocess:
                try:
                    r = run_one(wl, mode, args.size, args.warmup, args.steps, measure_memory=False)
                except RuntimeError as exc:  # optional baselines (torchao) may be absent
                    r = Result(wl, mode, None, None, {}, f"skipped: {exc}")
            else:
                r = run_subprocess(args, wl, mode)
            results.append(r)
            print(f"{wl:4s} {mode:24s} {r.ms if r.ms else '-':>9} ms  {r.note}", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, {args.threads} threads, size={args.size}, "
          f"median of {args.steps} steps after {args.warmup} warm-up")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
