"""Training-step benchmark: lowbit recipes against fp32, bf16 autocast and torchao.

Workloads (forward + backward of one training step, gradients for the input too):
  ffn   Linear(D→F) → GELU → Linear(F→D) on T tokens (default D=1024, F=4096, T=2048)
  gpt   the text task's transformer (4 layers, width 256, 16×128 tokens)

All modes of a workload are timed in one process, interleaved: ``--rounds`` rounds,
each timing ``--steps`` steps of every mode, so that the drift of a shared machine hits
all modes alike; the table reports the median step time, speedups against fp32 and bf16
of the same run, and the peak resident memory a step adds on top of the idle process
(each mode in its own subprocess, sampled every 0.5 ms). For lowbit modes a profiled step gives the
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


class Bench:
    """One (workload, mode): the converted model and its training step."""

    def __init__(self, workload: str, mode: str, size: str) -> None:
        self.workload, self.mode = workload, mode
        model, self.loss_fn = build(workload, size)
        self.amp, self.note = prepare(mode, model)
        self.params = list(model.parameters())
        self.times: list[float] = []

    def step(self) -> None:
        for p in self.params:
            p.grad = None
        if self.amp:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = self.loss_fn()
        else:
            loss = self.loss_fn()
        loss.backward()

    def timed(self, steps: int) -> None:
        for _ in range(steps):
            t0 = time.perf_counter()
            self.step()
            self.times.append(time.perf_counter() - t0)

    def breakdown(self) -> dict[str, float]:
        if self.mode in BASELINES:
            return {}
        from torch.profiler import profile

        with profile() as prof:
            self.step()
        totals = {e.key: e.cpu_time_total / 1e3 for e in prof.key_averages() if e.key in LABELS}
        return {k.split("::")[1]: round(totals.get(k, 0.0), 2) for k in LABELS}


def time_modes(workload: str, modes: list[str], size: str, warmup: int, steps: int,
               rounds: int) -> list[Result]:
    """Interleaved timing in one process: ``rounds`` rounds, each timing ``steps`` steps
    of every mode (order rotated per round), so that drifts of a shared machine hit all
    modes alike. Reports the median over all ``rounds × steps`` step times."""
    benches, skipped = [], []
    for mode in modes:
        try:
            benches.append(Bench(workload, mode, size))
        except RuntimeError as exc:  # optional baselines (torchao) may be absent
            skipped.append(Result(workload, mode, None, None, {}, f"skipped: {exc}"))
    for b in benches:
        for _ in range(warmup):
            b.step()
    for r in range(rounds):
        for b in benches[r % len(benches):] + benches[: r % len(benches)]:
            b.timed(steps)
        print(f"{workload}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    out = [Result(workload, b.mode, round(statistics.median(b.times) * 1e3, 2), None,
                  b.breakdown(), b.note) for b in benches]
    return out + skipped


def peak_memory(workload: str, mode: str, size: str, warmup: int, steps: int) -> float:
    """Peak resident memory (MB) that ``steps`` training steps add to the idle process."""
    b = Bench(workload, mode, size)
    for _ in range(max(warmup, 1)):
        b.step()
    with PeakRSS() as mem:
        b.timed(steps)
    return round(mem.peak - mem.base, 1)


def memory_subprocess(args: argparse.Namespace, workload: str, mode: str) -> float | None:
    cmd = [sys.executable, __file__, "--child", "--workload", workload, "--modes", mode,
           "--size", args.size, "--warmup", str(args.warmup), "--steps", "3",
           "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["peak_mb"] if proc.returncode == 0 and lines else None


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
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--inprocess", action="store_true", help="no memory subprocesses (smoke test)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        p.error("--steps and --rounds must be ≥ 1, --warmup ≥ 0")
    torch.set_num_threads(args.threads)
    workloads = [w for w in args.workload.split(",") if w]
    modes = [m for m in args.modes.split(",") if m]
    if args.child:
        peak = peak_memory(workloads[0], modes[0], args.size, args.warmup, args.steps)
        print(json.dumps({"peak_mb": peak}))
        return 0
    results = []
    for wl in workloads:
        rows = time_modes(wl, modes, args.size, args.warmup, args.steps, args.rounds)
        for r in rows:
            if not args.inprocess and r.ms is not None:
                r.peak_mb = memory_subprocess(args, wl, r.mode)
            print(f"{wl:4s} {r.mode:24s} {r.ms if r.ms else '-':>9} ms  {r.peak_mb} MB {r.note}",
                  file=sys.stderr, flush=True)
        results += rows
    print(f"torch {torch.__version__}, {args.threads} threads, size={args.size}; median of "
          f"{args.rounds} interleaved rounds × {args.steps} steps after {args.warmup} warm-up; "
          "peak MB: resident memory a step adds (own process per mode)")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
