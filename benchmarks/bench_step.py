"""Training-step benchmark: lowbit recipes against fp32 and bf16 autocast, and the limit.

Workloads (benchmarks/step_workloads.py): ``ffn``, ``gpt`` (text-task TinyGPT),
``gpt2-block`` (one GPT-2-small block, 4 × 512 tokens) and ``cnn`` (PreAct-ResNet-20,
batch 128). One step = forward + backward, gradients for the input too, no optimizer.

All modes of a workload are timed in one process, interleaved: ``--rounds`` rounds, each
timing ``--steps`` steps of every mode (order rotated per round) and, in the same
rotation, the machine's GEMM ceilings (lowbit's int8 GEMM ``int8.int_mm`` — lowbit's
AMX kernel on CPUs with AMX, exact float32 GEMMs on CPUs without an int8 dot product
(``lowbit.kernels.exact_f32``), else ``torch._int_mm`` — bf16 and fp32 at 2048³), so that the drift of a shared machine hits all of them alike. Per mode the table
gives the median step time, speedups against fp32 and bf16 of the same run, and:

* GEMM GFLOP of the step, counted by ``lowbit.coverage`` from the aten ops that ran
  (mm/addmm/bmm, ``_int_mm``, ``_scaled_mm``, convolutions, attention), and the share
  of them that ran on real low-bit kernels (int8 ``_int_mm`` or FP8 ``_scaled_mm``;
  simulated GEMMs — dequantized codes in a float GEMM — do not count);
* floor: those FLOPs at the int8 ceiling — the step if nothing but integer GEMMs ran
  at the machine's best rate; ``× floor`` = step / floor;
* GEMM ms: CPU time inside GEMM ops in one profiled step; ``outside``: the share of
  that profiled step spent outside GEMM ops;
* for lowbit modes, CPU ms inside lowbit's labelled regions (quantize, transform,
  epilogue; ``lowbit::gemm`` is inside GEMM ms);
* peak MB: heap memory a step adds on top of the idle process, plus the buffers lowbit
  keeps between steps (``lowbit.kernels.workspace``); each mode in its own subprocess.
  Exact where a C compiler builds ``benchmarks/heap_peak.c``, which the subprocess
  preloads: the largest count of bytes malloc has handed out and not taken back, every
  malloc-family allocation (torch's, oneDNN's, lowbit's kernels', Python's large
  objects) counted however short-lived — not Python's small objects (pymalloc's own
  mmap'd arenas) or memory mapped directly, which ``mallinfo2`` does not count either;
  else (the header says which, and why) glibc ``mallinfo2``'s bytes in use sampled
  every 0.2 ms, which misses peaks shorter than that, as where ``LD_PRELOAD`` is set
  already (another allocator runs: the shim would bypass it). Unlike the resident size
  neither depends on what the allocator keeps cached.

    python benchmarks/bench_step.py                          # all workloads, default modes
    python benchmarks/bench_step.py --workload ffn --modes fp32,bf16,fqt-psq-8
    python benchmarks/bench_step.py --modes fqt-psq-8,fqt-psq-8@1,fqt-psq-8@1000000
    python benchmarks/bench_step.py --device cuda --workload ffn --inprocess   # on a GPU

``--malloc``: the C allocator's policy for the whole process (children included).
``keep-freed`` (the default) calls ``lowbit.allocator.keep_freed_memory()`` once the
arguments are checked, before the workloads are built: glibc then recycles freed blocks instead of mapping fresh pages for every
block over 32 MiB (module docstring of ``lowbit.allocator``: a float32 GELU over
2048 × 4096 took 12.8 ms with glibc's defaults, 2.6 ms so). ``default`` leaves glibc's
settings; the header names the policy of the run.

``--device cuda``: model, inputs and ceilings on the GPU, each timed step and GEMM
between ``torch.cuda.synchronize()`` calls; GEMM ms and the lowbit labels are the
profiler's device (kernel) times; peak MB is ``torch.cuda.max_memory_allocated`` above
the idle process. The default ``--device cpu`` is the CPU benchmark described above.

Modes: ``fp32``; ``bf16`` (autocast); ``torchao-int8`` and ``torchao-float8`` (torchao's
``convert_to_float8_training``, tensor-wise; CUDA with compute capability ≥ 8.9) if
installed; a lowbit recipe;
``RECIPE+bf16`` (under bf16 autocast); ``RECIPE:BACKEND`` (e.g. ``:reference``);
``RECIPE/float-attn`` (attention modules left unconverted: float attention);
``RECIPE@K`` runs ``lowbit.monitor.VarianceMonitor(model, every=K)``: ``@1`` measures
every step, a huge ``K`` times the idle hooks; the cost at interval K is
``(t@1 − t@huge)/K + (t@huge − t)``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
from pathlib import Path
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any
from dataclasses import asdict, dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_workloads import WORKLOADS, Workload, attention_note, build  # noqa: E402
from lowbit.experiments.rundir import write_atomic
from lowbit.experiments.train import check_out_file

BASELINES = ("fp32", "bf16", "torchao-int8", "torchao-float8")
LOWBIT = ("fqt-psq-8", "fqt-bhq-8", "fqt-hadamard-8")
DEFAULT_MODES = ("fp32", "bf16") + LOWBIT + tuple(f"{m}+bf16" for m in LOWBIT)
LABELS = ("lowbit::quantize", "lowbit::transform", "lowbit::epilogue")
CEILING_N = 2048


@dataclass
class Result:
    workload: str
    mode: str
    ms: float | None
    peak_mb: float | None = None
    breakdown: dict[str, float] = field(default_factory=dict)
    gemm_flops: int | None = None
    real_share: float | None = None
    gemm_ms: float | None = None
    profiled_ms: float | None = None
    note: str = ""


# -- modes -----------------------------------------------------------------------------------
def _not_attention(module: torch.nn.Module, name: str) -> bool:
    kind = type(module).__name__
    return "DotProductAttention" not in kind and "MultiheadAttention" not in kind


def prepare(mode: str, model: torch.nn.Module) -> tuple[bool, str]:
    """Convert ``model`` for ``mode``; returns (run under bf16 autocast, note)."""
    recipe, _, amp = mode.partition("+")
    recipe, _, keep = recipe.partition("/")
    if amp not in ("", "bf16"):
        raise ValueError(f"unknown autocast suffix {amp!r} in mode {mode!r}; allowed: +bf16")
    if keep not in ("", "float-attn"):
        raise ValueError(f"unknown suffix /{keep} in mode {mode!r}; allowed: /float-attn")
    if recipe == "fp32":
        return False, ""
    if recipe == "bf16":
        return True, ""
    if recipe == "torchao-int8":
        try:
            from torchao import quantize_
            from torchao.prototype.quantized_training import int8_mixed_precision_training
        except ImportError as exc:
            raise RuntimeError(f"torchao not installed ({exc.name})") from None
        quantize_(model, int8_mixed_precision_training())
        return False, ""
    if recipe == "torchao-float8":
        try:
            from torchao.float8 import convert_to_float8_training
        except ImportError as exc:
            raise RuntimeError(f"torchao not installed ({exc.name})") from None
        convert_to_float8_training(model)
        return False, ""
    import lowbit

    name, _, backend = recipe.partition(":")
    cfg = lowbit.FQTConfig.from_recipe(name, backend=backend or "auto", seed=0)
    lowbit.convert(model, cfg, _not_attention if keep else None)
    return amp == "bf16", (f"{backend} kernels" if backend else "")


def to_device(w: Workload, device: str) -> Workload:
    """``w`` with its model and inputs on ``device`` (leaf inputs stay leaves, with the
    same ``requires_grad``); on the CPU ``w`` itself, untouched."""
    if torch.device(device).type == "cpu":
        return w
    w.model.to(device)
    w.inputs = tuple(x.detach().to(device).requires_grad_(x.requires_grad)
                     if isinstance(x, torch.Tensor) else x for x in w.inputs)
    return w


def sync(device: str) -> None:
    """Wait for ``device``'s queued kernels (CUDA), so that a wall-clock time covers them."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Bench:
    """One (workload, mode): the converted model and its training step, on ``device``."""

    def __init__(self, workload: str, mode: str, size: str, device: str = "cpu") -> None:
        self.workload, self.mode, self.device = workload, mode, device
        self.w = to_device(build(workload, size), device)  # converted on the device
        recipe, _, every = mode.partition("@")
        self.amp, note = prepare(recipe, self.w.model)
        self.note = ", ".join(n for n in (note, attention_note(self.w.model)) if n)
        self.monitor = None
        if every:  # lowbit's variance monitor, every K steps
            from lowbit.monitor import VarianceMonitor

            self.monitor = VarianceMonitor(self.w.model, every=int(every))
        self.params = list(self.w.model.parameters())
        self.times: list[float] = []

    def step(self, after_forward: Callable[[], None] | None = None) -> None:
        """One training step; ``after_forward`` (a probe's) runs between the forward
        and the backward."""
        for p in self.params:
            p.grad = None
        for x in self.w.inputs:
            if isinstance(x, torch.Tensor):
                x.grad = None
        with contextlib.nullcontext() if self.monitor is None else self.monitor.step():
            with torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=self.amp):
                loss = self.w.step_loss()
            if after_forward is not None:
                after_forward()
            loss.backward()

    def timed(self, steps: int) -> None:
        for _ in range(steps):
            sync(self.device)
            t0 = time.perf_counter()
            self.step()
            sync(self.device)
            self.times.append(time.perf_counter() - t0)

    def profiled(self) -> tuple[list, float]:
        """(the profiler's events, wall ms) of one step, run after a warm-up step under
        the profiler."""
        from torch.profiler import profile, schedule

        got: dict[str, list] = {}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Warning: Profiler clears events")
            with profile(schedule=schedule(wait=0, warmup=1, active=1),
                         on_trace_ready=lambda p: got.setdefault("events", list(p.events()))) as prof:
                self.step()
                prof.step()
                sync(self.device)
                t0 = time.perf_counter()
                self.step()
                sync(self.device)
                wall = (time.perf_counter() - t0) * 1e3
                prof.step()
        return got["events"], wall

    def breakdown(self) -> tuple[dict[str, float], float, float]:
        """One profiled step: (lowbit label → CPU ms, CPU ms inside GEMM ops, the step's
        wall ms under the profiler); on CUDA device (kernel) ms instead of CPU ms."""
        from lowbit.flops import FORMULAS

        gemm_names = {p._qualified_op_name for p in FORMULAS}  # aten::mm, onednn::qconv2d_pointwise
        events, wall = self.profiled()
        where = "device" if torch.device(self.device).type == "cuda" else "cpu"
        gemm = sum(getattr(e, f"self_{where}_time_total") for e in events if e.name in gemm_names) / 1e3
        labels = {k: sum(getattr(e, f"{where}_time_total") for e in events if e.name == k) / 1e3
                  for k in LABELS}
        lowbit_mode = self.mode.split("+")[0] not in BASELINES
        breakdown = {k.split("::")[1]: round(v, 2) for k, v in labels.items()} if lowbit_mode else {}
        return breakdown, gemm, wall


# -- GEMM FLOPs and ceilings ------------------------------------------------------------------
def count_flops(bench: Bench) -> tuple[int, float]:
    """(GEMM FLOPs of one step of ``bench``, share of them that ran on real low-bit
    kernels: int8 ``_int_mm`` or FP8 ``_scaled_mm``), traced by ``lowbit.coverage`` —
    the same step, under the mode's autocast; model state is put back afterwards."""
    from lowbit.coverage import coverage

    with torch.autocast(torch.device(bench.device).type, dtype=torch.bfloat16, enabled=bench.amp):
        rep = coverage(bench.w.model, *bench.w.inputs, loss_fn=bench.w.loss)
    return rep.total_flops, rep.real_share


class Ceilings:
    """The machine's GEMM rates at ``n``³: int8 as lowbit runs it
    (``lowbit.kernels.int8.int_mm``, int32 out: the AMX kernel on CPUs with AMX, exact
    float32 GEMMs on CPUs without an int8 dot product, else ``torch._int_mm``), bf16 and fp32 ``torch.mm``; timed once per round inside the
    modes' rotation."""

    KINDS = ("int8", "bf16", "fp32")

    def __init__(self, n: int = CEILING_N, device: str = "cpu") -> None:
        self.n, self.device = n, device
        g = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=g).to(device)
        b = torch.randn(n, n, generator=g).to(device)
        a8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=g).to(device)
        b8 = torch.randint(-127, 128, (n, n), dtype=torch.int8, generator=g).to(device)
        ab, bb = a.bfloat16(), b.bfloat16()
        from lowbit.kernels import int8

        self.fns = {"int8": lambda: int8.int_mm(a8, b8), "bf16": lambda: ab @ bb,
                    "fp32": lambda: a @ b}
        self.times: dict[str, list[float]] = {k: [] for k in self.KINDS}
        for f in self.fns.values():
            f()  # warm-up (threads, packing buffers)

    def timed(self, steps: int = 1) -> None:
        for kind, f in self.fns.items():
            for _ in range(steps):
                sync(self.device)
                t0 = time.perf_counter()
                f()
                sync(self.device)
                self.times[kind].append(time.perf_counter() - t0)

    def gflops(self) -> dict[str, float]:
        """Median GOP/s (= GFLOP/s: one multiply and one add per term) per kind."""
        return {k: 2 * self.n**3 / statistics.median(t) / 1e9 for k, t in self.times.items() if t}


# -- timing -----------------------------------------------------------------------------------
def time_modes(workload: str, modes: list[str], size: str, warmup: int, steps: int, rounds: int,
               ceilings: Ceilings | None, device: str = "cpu") -> list[Result]:
    """Interleaved timing in one process: ``rounds`` rounds, each timing ``steps`` steps
    of every mode (order rotated per round) and the GEMM ceilings, so that drifts of a
    shared machine hit all alike. Reports the median over all ``rounds × steps`` steps."""
    benches: list[Bench] = []
    skipped = []
    for mode in modes:
        try:
            benches.append(Bench(workload, mode, size, device))
        except RuntimeError as exc:  # optional baselines (torchao) may be absent
            skipped.append(Result(workload, mode, None, note=f"skipped: {exc}"))
    for b in benches:
        for _ in range(warmup):
            b.step()
    items: list = benches + ([ceilings] if ceilings is not None else [])
    for r in range(rounds):
        for b in items[r % len(items):] + items[: r % len(items)]:
            b.timed(steps if isinstance(b, Bench) else 1)
        print(f"{workload}: round {r + 1}/{rounds}", file=sys.stderr, flush=True)
    out = []
    for b in benches:
        breakdown, gemm_ms, wall = b.breakdown()
        total, real = count_flops(b)
        out.append(Result(workload, b.mode, round(statistics.median(b.times) * 1e3, 2),
                          breakdown=breakdown, gemm_flops=total,
                          real_share=round(real, 3),
                          gemm_ms=round(gemm_ms, 2), profiled_ms=round(wall, 2), note=b.note))
    return out + skipped


def heap_shim() -> tuple[str | None, str]:
    """``(path, "")`` of ``heap_peak.c`` built as a shared library (C, whatever the
    compiler; cached beside lowbit's kernels, :func:`lowbit.kernels.cbuild.cache_dir`)
    and checked to export its counters, or ``(None, why)`` where it cannot be preloaded —
    no C compiler, a failed build, a path ``LD_PRELOAD`` would split (a space or colon),
    or an ``LD_PRELOAD`` set already (another allocator, such as jemalloc, which the shim
    would bypass for glibc's): peak memory is then sampled."""
    from lowbit.kernels import cbuild

    if os.environ.get("LD_PRELOAD"):
        return None, ("LD_PRELOAD is set already: the allocator it loads is what runs "
                      "(glibc's mallinfo2 counts only what glibc's malloc hands out)")
    src = Path(__file__).resolve().parent / "heap_peak.c"
    cc = cbuild.compiler(lambda msg, _: None)
    if cc is None:
        return None, "no C compiler"
    # lowbit's own build: cached under a hash of the source, compiler, flags and version,
    # built as C (-x c) whatever $CC is, a damaged file built again
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, errors="replace", check=True).stdout
        out = cbuild._compile(cc, version, src, ["-O2", "-shared", "-fPIC"], cbuild.cache_dir())
    except (cbuild.BuildError, OSError, subprocess.CalledProcessError):
        return None, "its build failed"
    if any(ch in str(out) for ch in " :"):
        return None, f"its path {str(out)!r} holds a space or colon, which LD_PRELOAD splits"
    try:
        lib = ctypes.CDLL(str(out))
    except OSError:
        return None, "the built library does not load"
    if not all(hasattr(lib, f) for f in ("malloc", "lowbit_heap_peak", "lowbit_heap_bytes")):
        return None, "the built library lacks its counters"
    return str(out), ""


def rerun_with_shim() -> int | None:
    """For a probe that needs the exact heap count: ``None`` where :func:`heap_shim`'s
    library is preloaded in this process; otherwise this script run again with it
    preloaded (its exit status), or 2 with the reason on stderr where it cannot be."""
    if _shim() is not None:
        return None
    shim, why = heap_shim()
    if shim is None:
        print(f"heap_peak.c cannot be preloaded: {why}", file=sys.stderr)
        return 2
    return subprocess.run([sys.executable, *sys.argv], env={**os.environ, "LD_PRELOAD": shim},
                          check=False).returncode


def _shim() -> Any:
    """The preloaded :func:`heap_shim` library's counters (ctypes), or ``None``."""
    lib = ctypes.CDLL(None)
    if not hasattr(lib, "lowbit_heap_peak"):
        return None
    lib.lowbit_heap_bytes.restype = lib.lowbit_heap_peak.restype = ctypes.c_longlong
    return lib


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                 "usmblks", "fsmblks", "uordblks", "fordblks",
                                                 "keepcost")]


def _heap_mb() -> Callable[[], float]:
    """Bytes in use by malloc (glibc ``mallinfo2``: ``uordblks + hblkhd``), in MB: what
    the process's tensors hold, whatever the allocator keeps cached or gives back to the
    system (which makes the resident size jump by tens of MB between identical runs).
    Falls back to the resident size where glibc's ``mallinfo2`` is missing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        def rss() -> float:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        return rss

    def heap() -> float:
        m = libc.mallinfo2()
        return (m.uordblks + m.hblkhd) / 2**20
    return heap


class PeakMemory:
    """Samples the heap in use (:func:`_heap_mb`) in a thread while active (every 0.2 ms)."""

    def __enter__(self) -> PeakMemory:
        self._read = _heap_mb()
        self.base = self.peak = self._read()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(0.0002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def peak_memory(workload: str, mode: str, size: str, warmup: int, steps: int,
                device: str = "cpu") -> float:
    """Peak heap memory (MB) that a training step adds to the idle process: the largest
    over ``steps`` steps, each measured from the heap in use just before it (CUDA: GPU
    memory allocated by torch, ``max_memory_allocated`` above ``memory_allocated``)."""
    b = Bench(workload, mode, size, device)
    for _ in range(max(warmup, 1)):
        b.step()
    peaks = []
    if torch.device(device).type == "cuda":
        for _ in range(steps):
            sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            b.step()
            sync(device)
            peaks.append((torch.cuda.max_memory_allocated(device) - base) / 2**20)
        return round(max(peaks), 1)
    from lowbit.kernels import workspace

    shim = _shim()
    for _ in range(steps):
        if shim is not None:  # exact: every allocation counted (heap_peak.c preloaded)
            base = shim.lowbit_heap_bytes()
            shim.lowbit_heap_reset_peak()
            b.step()
            peak = (shim.lowbit_heap_peak() - base) / 2**20
        else:
            with PeakMemory() as mem:
                b.step()
            peak = mem.peak - mem.base
        # buffers lowbit keeps between steps (lowbit.kernels.workspace) are in the idle
        # heap the step starts from; they are the step's memory, so they count here
        peaks.append(peak + workspace.held_bytes() / 2**20)
    return round(max(peaks), 1)


def memory_subprocess(args: argparse.Namespace, workload: str, mode: str) -> float | None:
    cmd = [sys.executable, __file__, "--child", "--workload", workload, "--modes", mode,
           "--size", args.size, "--warmup", str(args.warmup), "--steps", "3",
           "--threads", str(args.threads), "--device", args.device, "--malloc", args.malloc]
    env = dict(os.environ)
    shim, why = heap_shim() if args.device == "cpu" else (None, "")
    if shim is not None:
        env["LD_PRELOAD"] = shim
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return None
    got = json.loads(lines[-1])
    PEAK_METHODS.add(_PEAK_WORDS[got["peak_method"]] + (f" (heap_peak.c not preloaded: {why})"
                                                         if got["peak_method"] == "sampled" else ""))
    return got["peak_mb"]


# how the subprocesses measured peak memory: the header says
PEAK_METHODS: set[str] = set()
_PEAK_WORDS = {"exact": "peak MB exact (benchmarks/heap_peak.c preloaded: every block malloc hands out)",
               "sampled": "peak MB sampled every 0.2 ms",
               "cuda": "peak MB torch.cuda.max_memory_allocated"}


# -- report -----------------------------------------------------------------------------------
def machine() -> str:
    """CPU model, cores, torch version, date and the 1-minute load average."""
    from lowbit.experiments.rundir import cpu_name

    cpu = cpu_name()
    gpu = (f", {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
           if torch.cuda.is_available() else "")
    return (f"{cpu}, {os.cpu_count()} cores{gpu}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, load {os.getloadavg()[0]:.2f}")


def table(results: list[Result], ceil: dict[str, float]) -> str:
    out = []
    for wl in dict.fromkeys(r.workload for r in results):
        rows = [r for r in results if r.workload == wl]
        base = {r.mode: r.ms for r in rows if r.ms}
        out.append(f"\n### {wl}\n")
        out.append("| mode | ms/step | × fp32 | × bf16 | peak MB | GEMM GFLOP (real low-bit) | floor ms | "
                   "× floor | GEMM ms | outside GEMMs | quantize | transform | epilogue | note |")
        out.append("|" + "---|" * 14)
        for r in rows:
            def ratio(ref: str, r: Result = r, base: dict = base) -> str:
                return f"{base[ref] / r.ms:.2f}" if r.ms and base.get(ref) else "-"
            floor = (r.gemm_flops / 1e9 / ceil["int8"] * 1e3) if r.gemm_flops and ceil.get("int8") else None
            cells = [
                r.mode, f"{r.ms:.1f}" if r.ms else "-", ratio("fp32"), ratio("bf16"),
                f"{r.peak_mb:.1f}" if r.peak_mb is not None else "-",
                f"{r.gemm_flops / 1e9:.3g} ({r.real_share:.0%})" if r.gemm_flops else "-",
                f"{floor:.1f}" if floor else "-",
                f"{r.ms / floor:.2f}" if floor and r.ms else "-",
                f"{r.gemm_ms:.1f}" if r.gemm_ms is not None else "-",
                f"{1 - r.gemm_ms / r.profiled_ms:.0%}" if r.gemm_ms is not None and r.profiled_ms else "-",
                *(f"{r.breakdown[k]:.1f}" if k in r.breakdown else "-"
                  for k in ("quantize", "transform", "epilogue")),
                r.note,
            ]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def add_malloc_arg(p: argparse.ArgumentParser) -> None:
    """The ``--malloc`` option shared by the step benchmarks."""
    p.add_argument("--malloc", choices=("keep-freed", "default"), default="keep-freed",
                   help="C allocator policy: keep-freed (lowbit.allocator.keep_freed_memory, "
                        "the default) or glibc's defaults")


def apply_malloc(choice: str) -> str:
    """Set the allocator policy ``choice`` and return its label for the header: the
    policy in effect (``lowbit.allocator.policy``), which for ``default`` is another where
    this process already keeps freed memory — glibc's settings are not undone (an in-process
    call after ``lowbit train``'s, as in the tests) —, said on stderr."""
    from lowbit import allocator

    if choice == "keep-freed" and not allocator.keep_freed_memory():
        print("warning: not glibc; --malloc keep-freed changes nothing", file=sys.stderr)
    if choice == "default" and allocator.policy() != "default":
        print(f"warning: --malloc default, but this process already runs {allocator.policy()!r} "
              "(set earlier in it, and not undone): the numbers are under that policy", file=sys.stderr)
    return f"malloc {allocator.policy()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default=",".join(WORKLOADS), help="comma list of " + ", ".join(WORKLOADS))
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help="comma list: fp32, bf16, torchao-int8, a lowbit recipe, RECIPE+bf16 "
                        "(under bf16 autocast), RECIPE:BACKEND, RECIPE/float-attn, "
                        "RECIPE@K (variance monitor)")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--ceiling-n", type=int, default=CEILING_N, help="GEMM size of the ceilings")
    p.add_argument("--inprocess", action="store_true", help="no memory subprocesses (smoke test)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    add_malloc_arg(p)
    args = p.parse_args(argv)
    if args.json:  # checked before the measurement, not after it
        check_out_file("--json", args.json)
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1 or args.ceiling_n < 1:
        p.error("--steps, --rounds and --ceiling-n must be ≥ 1, --warmup ≥ 0")
    workloads = [w for w in args.workload.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; allowed: {', '.join(WORKLOADS)}")
    try:
        dev_type = torch.device(args.device).type
    except RuntimeError:
        dev_type = ""
    if dev_type not in ("cpu", "cuda"):
        p.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if dev_type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available (torch {torch.__version__})")
    malloc = apply_malloc(args.malloc)  # process-wide: only once the arguments are valid
    torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    if args.child:
        peak = peak_memory(workloads[0], modes[0], args.size, args.warmup, args.steps, args.device)
        method = "exact" if _shim() is not None else "sampled"
        print(json.dumps({"peak_mb": peak, "peak_method": method if args.device == "cpu" else "cuda"}))
        return 0
    header = machine()
    ceilings = Ceilings(args.ceiling_n, args.device)
    results = []
    for wl in workloads:
        rows = time_modes(wl, modes, args.size, args.warmup, args.steps, args.rounds, ceilings,
                          args.device)
        for r in rows:
            if not args.inprocess and r.ms is not None:
                r.peak_mb = memory_subprocess(args, wl, r.mode)
            print(f"{wl:10s} {r.mode:24s} {r.ms if r.ms else '-':>9} ms  {'-' if r.peak_mb is None else r.peak_mb} MB {r.note}",
                  file=sys.stderr, flush=True)
        results += rows
    ceil = ceilings.gflops()
    from lowbit.kernels import avx512, int8

    print(f"{header} (at start), load {os.getloadavg()[0]:.2f} at end; {args.threads} threads, "
          f"size={args.size}, device {args.device}, {malloc}; median of {args.rounds} interleaved rounds × {args.steps} steps "
          f"after {args.warmup} warm-up" + "".join(f"; {m}" for m in sorted(PEAK_METHODS))
          + ("" if not str(args.device).startswith("cpu") else f"; C quantizer: its {avx512.isa()} build"
             if avx512.in_use() is None else f"; C quantizer off ({avx512.in_use()})"))
    print(f"GEMM ceilings at {args.ceiling_n}³ (medians of {len(ceilings.times['int8'])} in the same "
          f"rotation; int8 on {int8.engine(args.device)}): " + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in ceil.items())
          + (f"; int8/bf16 {ceil['int8'] / ceil['bf16']:.2f}×, bf16/fp32 {ceil['bf16'] / ceil['fp32']:.2f}×"
             if len(ceil) == 3 else ""))
    print(table(results, ceil))
    if args.json:
        write_atomic(Path(args.json), json.dumps({
            "machine": header, "device": args.device, "malloc": malloc, "ceilings_gflops": ceil,
            "peak_methods": sorted(PEAK_METHODS),
            "results": [asdict(r) for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
