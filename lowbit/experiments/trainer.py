"""One training loop for every task and recipe, with crash-safe checkpoints.

    cfg = TrainConfig(task="digits", model="mlp", recipe="fqt-bhq-4", epochs=5, out="runs/x")
    result = train(cfg)             # or train(cfg, resume=True) after a crash
    result.history[-1]["accuracy"]

The run folder (:mod:`.rundir`) gets ``config.json`` (this TrainConfig, the resolved
FQTConfig), ``metrics.csv`` / ``metrics.json`` (one row per epoch), ``status.json``
(running, done or diverged) and ``last.pt`` / ``prev.pt``.
Images train with SGD (momentum 0.9) and text with AdamW (β = 0.9, 0.95, 5% warmup);
both follow a cosine schedule over all steps, stepped once per optimizer step. Weight
decay applies to matrices and conv kernels only (not biases or norm layers).

``weights``: ``fp32`` (torch's optimizers, float32 weights and state); ``bf16-master``
(the mixed-precision baseline: a bfloat16 model whose float32 master copy is what torch's
optimizer updates, copied back after each step); or low precision with no float32 copy
(``lowbit.optim.SRSGD`` / ``SRAdamW``): ``bf16`` weights and state, or ``int8`` weights
(per-channel scales) and int8 state (AdamW: first moment int8, second bf16);
``opt_state`` overrides the state format. All but ``fp32`` run the model in bfloat16
(:mod:`.precision`), so ``bf16-master`` is the baseline that differs from
``bf16``/``int8`` in the weight storage only.

The variance monitor (:mod:`.monitoring`, :mod:`lowbit.monitor`) measures each converted
layer's quantization and minibatch variance every ``monitor_every`` steps (default 50) and
logs them per epoch; ``fqt-auto*`` recipes let it choose the gradient bit widths. Its state
is in the checkpoint, so a resumed adaptive run makes the same decisions.

Data parallel (``world_size > 1``, under torchrun; :mod:`.parallel`): DDP over gloo,
each rank trains on its strided share of every global batch, gradients are averaged by
DDP's fp32 all-reduce or, with ``grad_comm``, quantized without bias
(:mod:`lowbit.distributed`). Only rank 0 evaluates and writes the run folder (but for
``status.json``'s ``failed``/``interrupted`` record, which the first rank to stop writes,
naming itself); the checkpoint holds every rank's random state. The loss logged and tested for finiteness
is the mean over ranks, so all ranks skip the same steps.

Reproducibility: the model is initialised under ``torch.manual_seed(torch_seed(seed))``
(so every recipe starts from the same weights; ``lowbit.noise.torch_seed``: seeds from
``2³²`` on folded to the 32 bits torch's CPU generator reads, else ``s`` and ``s + 2³²``
started alike), the stochastic-rounding noise is seeded from ``seed`` (and the rank),
and the data order of epoch ``e`` comes from a generator seeded with ``(seed, e)``. The same seed and world size give a bitwise identical run;
a resumed run with the same thread count is bitwise identical to an uninterrupted one (for fp32 all-reduce with
``N ≥ 3`` ranks only up to float rounding: DDP re-buckets the gradients after the first
step it runs, which reorders fp32 sums of three or more terms; integer and two-term sums
do not depend on the order).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from tqdm import tqdm

import lowbit
import lowbit.optim

from ..noise import torch_seed
from . import checkpoint as ckpt
from . import monitoring
from .parallel import Ranks
from .precision import MasterWeights, memory_row, to_bfloat16
from .runconfig import DEFAULT_MONITOR_EVERY, WEIGHT_FORMATS, TrainConfig, changed_settings
from .rundir import (
    LOCK,
    RunBusy,
    check_same_data,
    cpu_name,
    load_resumable,
    read_config,
    run_lock,
    write_config,
    write_metrics,
    write_status,
)
from .tasks import Task, make_task


def check_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool) -> None:
    """``ValueError`` where training ``cfg`` into ``run_dir`` would lose another run: a
    checkpoint there and no ``resume``, or :func:`_refuse_to_overwrite`'s cases. Run by
    :func:`train`, and by ``lowbit train --nproc N`` before it launches the ranks (which
    would otherwise start, each to find it)."""
    if not resume and ((run_dir / ckpt.LAST).exists() or (run_dir / ckpt.PREV).exists()):
        saved = read_config(run_dir).get("train")
        diff = changed_settings(saved, cfg, options=True) if isinstance(saved, dict) else []
        if diff:  # say what differs now, not only "pass --resume" (a new user's trial)
            raise ValueError(f"{run_dir} already holds a checkpoint of a run with other settings: "
                             f"{', '.join(diff)}. To train these settings, choose another --out; to "
                             f"continue that run, pass --resume and leave those options out (they are "
                             f"read from {run_dir / 'config.json'})")
        raise ValueError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose "
            "another --out"
        )
    _refuse_to_overwrite(run_dir, cfg, resume)


def _refuse_to_overwrite(run_dir: Path, cfg: TrainConfig, resume: bool) -> None:
    """``ValueError`` where training into ``run_dir`` would overwrite another run's results
    without a checkpoint to continue from (a committed run folder keeps its metrics, not its
    ``*.pt``): epochs in its ``metrics.json`` and no ``resume``; a ``config.json`` that is
    not a lowbit run's (without a checkpoint); without ``resume``, a run recorded as diverged;
    or, with ``resume``, a
    ``config.json`` recording other settings (:func:`~.runconfig.changed_settings`) or none
    that can be read beside epochs in ``metrics.json``. With ``resume`` and the same
    settings the run is redone from scratch, as ``lowbit sweep`` does for such a folder."""
    try:
        epochs = len(json.loads((run_dir / "metrics.json").read_text()))
    except (OSError, ValueError, TypeError):
        epochs = 0
    if epochs and not resume:
        raise ValueError(f"{run_dir} already holds a run's results ({epochs} epoch(s) in metrics.json, "
                         "no checkpoint): choose another --out, or pass --resume to redo that run")
    # a review: a diverged run of other settings (no epochs) and a folder holding another
    # program's config.json were trained over without a word
    foreign = ValueError(f"{run_dir} holds a config.json that is not a lowbit run's record (no readable "
                         "'train' settings) and no checkpoint: choose another --out")
    if not resume:
        saved_train = read_config(run_dir).get("train")
        if (run_dir / "config.json").exists() and not isinstance(saved_train, dict):
            raise foreign
        if _status(run_dir) == "diverged":  # a result (reports count it a failed seed): kept; a run
            # that crashed before its first epoch holds nothing to lose and is started afresh
            diff = changed_settings(saved_train, cfg) if isinstance(saved_train, dict) else []
            what = f"of other settings ({', '.join(diff)}) " if diff else ""
            raise ValueError(f"{run_dir} holds a run {what}recorded as diverged (status.json; reports count it "
                             "as a failed seed): choose another --out, or pass --resume to redo it (the options "
                             f"you leave out are read from {run_dir / 'config.json'}; those you give must match it)")
    if not resume or (run_dir / ckpt.LAST).exists() or (run_dir / ckpt.PREV).exists():
        return  # a checkpoint's own settings are checked when it is loaded (load_resumable)
    saved = read_config(run_dir).get("train")
    if not isinstance(saved, dict):
        if not epochs and (run_dir / "config.json").exists():
            raise foreign
        if epochs:  # results whose settings cannot be checked: not redone over (a review)
            raise ValueError(f"{run_dir} holds a run's results ({epochs} epoch(s) in metrics.json) but no "
                             "readable config.json beside them, so --resume cannot check they were made with "
                             "these settings: choose another --out (or move those results away)")
        return
    diff = changed_settings(saved, cfg)
    if diff:
        raise ValueError(f"{run_dir} holds a run of other settings ({', '.join(diff)}): choose another --out")


class TrainingDiverged(RuntimeError):
    """Too many consecutive skipped steps (:data:`BAD_STEPS`), or a non-finite evaluation
    loss (the model's outputs NaN/Inf: its accuracy would be an argmax over NaN)."""


# the steps the trainer skips: what --max-bad-steps counts
BAD_STEPS = "skipped steps (a non-finite loss or gradient, or a gradient norm past float32's range)"


@dataclass
class TrainResult:
    """What :func:`train` leaves behind: the metric rows and the trained model."""

    history: list[dict[str, Any]]
    model: nn.Module
    task: Task
    run_dir: Path


def build_optimizer(model: nn.Module, cfg: TrainConfig,
                    master: MasterWeights | None = None) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay on matrices and kernels (ndim ≥ 2) only. Low-precision
    ``cfg.weights``: their stochastic-rounding versions, noise seeded from ``cfg.seed``;
    with ``master``, the optimizer updates the master copies."""
    def pick(p: torch.Tensor) -> torch.Tensor:
        return p if master is None else master.of[id(p)]

    decay = [pick(p) for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [pick(p) for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.weights in ("bf16", "int8"):
        low = {"weights": cfg.weights, "state": cfg.opt_state,
               "generator": torch.Generator().manual_seed(epoch_seed(cfg.seed, -1))}
        if cfg.optimizer == "sgd":
            return lowbit.optim.SRSGD(groups, lr=cfg.lr, momentum=cfg.momentum, **low)
        return lowbit.optim.SRAdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.95), **low)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.95))


def cosine_schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps``, then cosine decay to 0 at ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s data generator: a fixed function of (seed, epoch)."""
    return (torch_seed(seed) * 1_000_003 + epoch * 7_919 + 17) % (2**63)



def _rank_state(model: nn.Module, data_gen: torch.Generator) -> dict[str, Any]:
    """What differs between ranks: random states (torch's, the layers' noise) and the
    predicted-range histories."""
    return {"rng": ckpt.capture_rng(model, data_gen), "ranges": lowbit.range_state(model)}


def _restore(state: dict[str, Any], ranks: Ranks, model: nn.Module, data_gen: torch.Generator,
             optimizer: torch.optim.Optimizer, scheduler: Any, master: MasterWeights | None,
             sr_gen: torch.Generator | None) -> None:
    """Load a checkpoint into this rank's model, optimizer and random states."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    mine = state["ranks"][ranks.rank] if "ranks" in state else state
    ckpt.restore_rng(model, data_gen, mine["rng"])
    lowbit.load_range_state(model, mine.get("ranges", {}))
    if sr_gen is not None:
        sr_gen.set_state(state["optim_rng"])  # saved by low-precision runs
    if master is not None:
        master.load(state["master"])


def _ranges_row(ranges: Any) -> dict[str, Any]:
    """Predicted gradient ranges: how often they were exceeded this epoch, over all ranks
    (none: {})."""
    if not ranges.calls:
        return {}
    return {"range_overflow_calls": ranges.overflow_calls,
            "range_requantized_calls": ranges.requantized_calls,
            "range_overflow_rate": ranges.overflow_rate, "range_clipped_norm": ranges.clipped_norm}


# --------------------------------------------------------------------------- the loop


def _status(run_dir: Path) -> str | None:
    """The ``status`` status.json records, or None (no readable file)."""
    try:
        return json.loads((run_dir / "status.json").read_text())["status"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _bad_step_reason(loss: torch.Tensor, grad_norm: torch.Tensor, params: list[torch.Tensor]) -> str:
    """Why a step is skipped, in words that are true: a non-finite loss, a non-finite
    gradient, or finite gradients whose norm overflows float32 (a review found the last
    reported as a "non-finite gradient norm")."""
    if not bool(torch.isfinite(loss)):
        return f"non-finite loss ({loss.item()})"
    if all(bool(torch.isfinite(p.grad).all()) for p in params if p.grad is not None):
        return f"gradient norm {grad_norm.item()}: the gradients are finite, their norm overflows float32"
    return f"non-finite gradient (norm {grad_norm.item()})"



def _diverged(run_dir: Path, main: bool, why: str) -> NoReturn:
    """Record the run as diverged (``status.json``, rank 0) and raise
    :class:`TrainingDiverged` naming ``why`` and the last good checkpoint."""
    last = run_dir / ckpt.LAST
    msg = f"training diverged: {why}; last good checkpoint: {last if last.exists() else 'none'}"
    if main:
        write_status(run_dir, "diverged", msg)
    raise TrainingDiverged(msg)

def train(
    cfg: TrainConfig, resume: bool = False, task: Task | None = None, progress: bool = True,
    monitor_requested: bool | None = None,
) -> TrainResult:
    """Train per ``cfg``; return the per-epoch metric rows (also written to ``cfg.out``)
    and the trained model (unwrapped from DDP; every rank returns the same rows).

    With ``resume`` the run continues from ``last.pt`` (or ``prev.pt`` if ``last.pt`` is
    unreadable); without a checkpoint it starts fresh. Raises :class:`TrainingDiverged`
    after ``cfg.max_bad_steps`` consecutive skipped steps (:data:`BAD_STEPS`); ``ValueError`` if the run
    folder holds a checkpoint and ``resume`` is False, or the launch's number of ranks is
    not ``cfg.world_size``; :class:`~.rundir.RunBusy` (a ``ValueError``) if another
    process holds the run folder's lock (:func:`~.rundir.run_lock`). ``monitor_requested``:
    the user asked for ``monitor_every`` (a warning, not an info line, when no layer can be
    monitored); ``None``: whenever
    ``cfg.monitor_every`` is not the default.
    """
    if monitor_requested is None:
        monitor_requested = cfg.monitor_every != DEFAULT_MONITOR_EVERY
    ranks = Ranks.start(cfg.world_size)
    try:
        return _train(cfg, resume, task, progress, ranks, monitor_requested)
    finally:
        ranks.close()


def _train(cfg: TrainConfig, resume: bool, task: Task | None, progress: bool,
           ranks: Ranks, monitor_requested: bool) -> TrainResult:
    """:func:`_train_locked` while rank 0 holds the run folder's lock (:func:`run_lock`);
    every rank raises :class:`RunBusy` if another process holds it."""
    run_dir, main = Path(cfg.out), ranks.is_main
    created = main and not run_dir.exists()
    with contextlib.ExitStack() as stack:
        busy = None
        if main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only file system, /proc: one line naming it (a review)
                raise ValueError(f"cannot create the run folder {run_dir}: {exc.strerror or exc}") from exc
            try:
                stack.enter_context(run_lock(run_dir))
            except RunBusy as exc:
                busy = str(exc)
        busy = ranks.broadcast(busy)
        if busy is not None:
            raise RunBusy(busy)
        # Every rank records why it stopped while status.json still says "running": the
        # first to stop is the cause (a rank records before it closes its connections, so
        # before the others see them close); a review found rank 0's "Connection closed by
        # peer" recorded where rank 1 had raised. (A done or diverged record stays.)
        # Only a run this process started (its checks passed, "running" written): a command
        # refused before that (other settings, a bad --resume) left a killed run's "running"
        # record rewritten as "failed" by the refusal's reason (a review).
        on = f" on rank {ranks.rank}" if ranks.world > 1 else ""
        started: list[bool] = []
        try:
            with _sigterm_as_interrupt():
                return _train_locked(cfg, resume, task, progress, ranks, monitor_requested, started)
        except KeyboardInterrupt as exc:  # status.json said "running" after the process had stopped
            if started and _status(run_dir) == "running":
                how = "SIGTERM" if isinstance(exc, Terminated) else "an interrupt (Ctrl-C)"
                write_status(run_dir, "interrupted", f"stopped by {how}{on}; the same "
                             "command with --resume (lowbit sweep: the same command) continues "
                             "from the last epoch checkpoint")
            raise
        except Exception as exc:  # an error (a refusal at the first step, an OOM…): not "running"
            if started and _status(run_dir) == "running":
                write_status(run_dir, "failed", f"stopped by an error{on}: {type(exc).__name__}: "
                             f"{str(exc)[:400]}; after fixing it, the same command with --resume "
                             "continues from the last epoch checkpoint (none: start again)")
            raise
        finally:
            if created:  # still holding the lock: no other process is using the folder
                remove_if_unused(run_dir)


def convert_or_refuse(model: nn.Module, fqt: lowbit.FQTConfig) -> None:
    """``lowbit.convert``, then refusing, before any step, a backend that will raise at the
    first pass needing a GEMM it cannot run (:func:`lowbit.nn.backend_conflicts`: a new
    user's trial found that refusal at the first step, after a multi-line warning); the
    conflicts decided by the data stay convert's warning. Where it refuses, convert's
    backend warning is not shown: the error says it in one line (a second trial saw the
    warning, with lowbit's own source line, printed before the same words); convert's
    other warnings are left as they are."""
    from lowbit.nn import BACKEND_WARNING, backend_conflicts, warn_backend_conflicts

    held = BACKEND_WARNING.set(False)  # convert's backend warning only: said below, or refused
    try:
        lowbit.convert(model, fqt)  # the conflicts are read off the converted layers
    finally:
        BACKEND_WARNING.reset(held)
    certain, _ = backend_conflicts(fqt, model)
    if not certain:  # the possible ones: convert's warning, as it would have given it
        warn_backend_conflicts(fqt, model, stacklevel=2)
    if certain:
        backend = lowbit.config.Backend(fqt.backend)
        kernels = "integer kernels" if backend is lowbit.config.Backend.INT8 else "torch._scaled_mm"
        raise ValueError(f"backend={backend.value!r} cannot run these GEMMs on {kernels}: "
                         + "; ".join(certain) + ". Use --backend auto (they run simulated, with the "
                         "same estimator) or another recipe")


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM while training (``kill``, a scheduler's time limit,
    torchrun stopping the ranks after one failed): handled as Ctrl-C is — the run is
    recorded ``interrupted`` — instead of ending with its status still ``running``."""


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread for the block (the previous
    handler restored after it); elsewhere (a thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _warn_other_threads(run_dir: Path) -> None:
    """A line on stderr where the run's epochs so far ran with another torch thread count
    (config.json's ``threads``): float reductions split over other threads round
    differently, so the resumed run is not bitwise the uninterrupted one."""
    before, now = read_config(run_dir).get("threads"), torch.get_num_threads()
    if isinstance(before, int) and before != now:
        print(f"warning: {run_dir} ran with {before} thread(s), it resumes with {now}: float "
              "reductions round differently with another thread count, so the run is not "
              "bitwise an uninterrupted one (--threads sets it)", file=sys.stderr)


def remove_if_unused(run_dir: Path) -> None:
    """Remove the run folder this process created when the run failed before writing a
    file into it (a bad model argument, a task that cannot load): an empty folder holding
    only the lock file looked like a run (``lowbit sweep`` listed it). Anything else in it
    is kept."""
    with contextlib.suppress(OSError):
        if {p.name for p in run_dir.iterdir()} <= {LOCK}:
            (run_dir / LOCK).unlink(missing_ok=True)
            run_dir.rmdir()


def _train_locked(cfg: TrainConfig, resume: bool, task: Task | None, progress: bool,
                  ranks: Ranks, monitor_requested: bool, started: list[bool]) -> TrainResult:
    """The run, in the locked folder; ``started`` gets an entry once its checks passed and
    ``status.json`` says "running" (every rank)."""
    run_dir, main = Path(cfg.out), ranks.is_main
    task = task or make_task(
        cfg.task,
        cfg.model,
        subset=cfg.subset,
        eval_subset=cfg.eval_subset,
        steps_per_epoch=cfg.steps_per_epoch,
        model_kwargs=cfg.model_kwargs,
    )
    fqt = cfg.fqt_config()

    torch.manual_seed(torch_seed(cfg.seed))
    model = task.build_model()  # same initial weights for every recipe of a seed
    if not fqt.is_fp:
        convert_or_refuse(model, fqt)
    if cfg.weights != "fp32":
        to_bfloat16(model)
    master = MasterWeights(list(model.parameters())) if cfg.weights == "bf16-master" else None
    optimizer = build_optimizer(model, cfg, master)
    monitor = monitoring.make_monitor(model, cfg, monitor_requested)  # variance monitor (+ adaptive bits), or None
    sr_gen = getattr(optimizer, "generator", None)  # the low-precision optimizers' noise
    steps_per_epoch = task.steps_per_epoch(cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = total_steps // 20 if cfg.optimizer == "adamw" else 0
    scheduler = cosine_schedule(optimizer, total_steps, warmup)
    data_gen = torch.Generator()

    if ranks.rank:  # after building the model (the same on every rank): torch's global
        # stream — dropout, augmentation — of each rank its own (the same masks on every
        # rank's rows are not the single-process run's independent draws)
        torch.manual_seed(int.from_bytes(hashlib.sha256(f"{cfg.seed}/rank{ranks.rank}".encode())
                                         .digest()[:8], "little") >> 1)
    check_run_dir(run_dir, cfg, resume)
    start_epoch, step, bad_in_a_row, history, comm_saved = 0, 0, 0, [], None
    if resume:
        if (run_dir / ckpt.LAST).exists() or (run_dir / ckpt.PREV).exists():
            check_same_data(run_dir, getattr(task, "source", None))  # before "resumed ..."
            _warn_other_threads(run_dir)
        state = load_resumable(run_dir, cfg)
        if state is not None:
            _restore(state, ranks, model, data_gen, optimizer, scheduler, master, sr_gen)
            start_epoch, step, history = state["epoch"], state["step"], list(state["history"])
            bad_in_a_row, comm_saved = state["bad_in_a_row"], state.get("comm")
            monitoring.restore(monitor, state, step)
    net, comm = ranks.wrap(model, cfg.grad_comm_config())  # DDP (+ hook) over several ranks
    if comm is not None and comm_saved is not None:
        comm.load_state_dict(comm_saved)

    if main:
        write_config(run_dir, cfg, fqt, steps_per_epoch, getattr(task, "source", None), start_epoch)
        write_metrics(run_dir, history)
        write_status(run_dir, "running")
    started.append(True)
    if start_epoch < cfg.epochs and bad_in_a_row >= cfg.max_bad_steps:  # a resume with a lower --max-bad-steps (a review:
        # the restored count was compared only after its next increment: "8/5 in a row"; a
        # finished run has no step left and stays "done")
        _diverged(run_dir, main, f"{bad_in_a_row} consecutive {BAD_STEPS} "
                                 f"before step {step}, restored from the checkpoint, reach max_bad_steps "
                                 f"{cfg.max_bad_steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    unit = task.throughput_unit

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not progress or not main or None,
        leave=False,
        desc=cfg.run_name(),
        dynamic_ncols=True,
        file=sys.stderr,
    )
    for epoch in range(start_epoch, cfg.epochs):
        data_gen.manual_seed(epoch_seed(cfg.seed, epoch))
        model.train()
        losses, step_times, units, bad_steps = [], [], 0, 0
        has_ranges = any(s is not None and s.predicted for m in lowbit.fqt_blocks(model).values()
                         for s in (m.config.grad_input, m.config.grad_weight))
        comm_before = 0.0 if comm is None else comm.bytes_sent
        epoch_first_step, epoch_t0 = step, time.perf_counter()
        # the epoch's range counters, counted apart (a window left open by an error only
        # counts on until it is collected: it never touches the trackers)
        window = lowbit.nn.RangeWindow(model)
        for full_batch in task.train_batches(cfg.batch_size, data_gen):
            t0 = time.perf_counter()
            batch = ranks.shard(full_batch)  # this rank's rows of the global batch
            buffers = [b.detach().clone() for b in model.buffers()]  # BN stats, to undo a bad step
            # predicted-range histories, to undo a bad step too (a review found one overflowing
            # step's absmax kept in them, zeroing the next steps' gradients on a coarse grid)
            ranges = lowbit.nn.snapshot_ranges(model) if has_ranges else None
            with monitoring.watch(monitor):  # measures every monitor_every steps
                loss = task.loss(net, batch)  # scalar
                model.zero_grad(set_to_none=True)
                loss.backward()  # DDP averages the gradients over ranks here
            loss = ranks.mean(loss)  # the global batch's loss: the same on every rank
            if cfg.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.get_total_norm(
                    [p.grad for p in params if p.grad is not None]
                )
            if bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)):
                if master is not None:
                    master.grads_in()
                optimizer.step()
                if master is not None:
                    master.weights_out()
                losses.append(loss.item())
                bad_in_a_row = 0
            else:  # skip the update, keep weights, BN statistics and range histories as they were
                with torch.no_grad():
                    for b, saved_b in zip(model.buffers(), buffers):
                        b.copy_(saved_b)
                if ranges is not None:
                    lowbit.nn.restore_ranges(ranges, counters=False)  # its calls stay counted
                bad_steps += 1
                bad_in_a_row += 1
                why = _bad_step_reason(loss, grad_norm, params)
                if main:
                    bar.write(f"step {step}: {why}; optimizer step "
                              f"skipped ({bad_in_a_row}/{cfg.max_bad_steps} in a row)", file=sys.stderr)
                if bad_in_a_row >= cfg.max_bad_steps:
                    bar.close()
                    # the last step's own reason: "non-finite" contradicted the step lines where
                    # the gradients were finite and only their norm overflowed (a trial)
                    _diverged(run_dir, main, f"{bad_in_a_row} consecutive {BAD_STEPS} (epoch {epoch + 1}, "
                                             f"step {step}; the last: {why})")
            scheduler.step()
            step += 1
            step_times.append(time.perf_counter() - t0)
            units += task.batch_units(full_batch)
            bar.update()
            if losses:
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")

        ranks.sync_buffers(model)  # rank 0's BatchNorm statistics: what it evaluates and saves
        # the epoch's predicted-range counts of every rank (rank 0's alone were its share)
        ranges_epoch = ranks.total(window.close())
        metrics = task.evaluate(model) if main else {}
        # NaN/Inf outputs: the other metrics (an argmax over NaN) are not results, and the
        # model is no checkpoint to resume from (a review found both kept: last.pt rotated,
        # the good one pushed to prev.pt, and the diverged one called "last good")
        eval_diverged = main and not math.isfinite(metrics["val_loss"])
        if eval_diverged:
            metrics = {k: (v if k == "val_loss" else None) for k, v in metrics.items()}
        per_rank = ranks.gather(_rank_state(model, data_gen))  # after evaluation, as resumed
        row = None
        if main:
            row = {
                "epoch": epoch + 1,
                "step": step,
                "lr": scheduler.get_last_lr()[0],
                "train_loss": statistics.fmean(losses) if losses else math.nan,
                **metrics,
                "step_time_ms": 1e3 * statistics.median(step_times),
                # at the median step, as step_time_ms (a mean over the epoch's sum of steps
                # counted the first step's compilation and disagreed with it by up to 100×)
                f"{unit}_per_s": units / len(step_times) / statistics.median(step_times),
                "bad_steps": bad_steps,
                **memory_row(optimizer, model if master is not None else None),
                **_ranges_row(ranges_epoch),
                **monitoring.epoch_row(monitor, epoch_first_step),
                "epoch_time_s": time.perf_counter() - epoch_t0,  # training + evaluation
                "cpu": cpu_name(),  # a resumed run may continue on another machine
            }
            if ranks.world > 1:  # bytes one rank sent per step, against an fp32 all-reduce
                sent = (ranks.allreduce_bytes(model) if comm is None
                        else (comm.bytes_sent - comm_before) / max(1, len(step_times)))
                row |= {"comm_bytes_per_step": sent,
                        "comm_bytes_fp32_per_step": ranks.allreduce_bytes(model, 4)}
            history.append(row)
            if not eval_diverged:
                ckpt.save_checkpoint(run_dir, {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "train_config": cfg.to_dict(),
                    "fqt_config": fqt.to_dict(),
                    **per_rank[0],  # rank 0's "rng" and "ranges" (the single-rank format)
                    "optim_rng": None if sr_gen is None else sr_gen.get_state(),
                    "master": None if master is None else master.state(),
                    "history": history,
                    "bad_in_a_row": bad_in_a_row,
                    "monitor": None if monitor is None else monitor.state_dict(),
                } | ({"world_size": ranks.world, "ranks": per_rank,
                      "comm": None if comm is None else comm.state_dict()} if ranks.world > 1 else {}))
            write_metrics(run_dir, history)
            monitoring.write_log(run_dir, monitor)
            shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if v is not None)
            bar.write(
                f"{cfg.run_name()} epoch {epoch + 1}/{cfg.epochs} step {step} "
                f"train_loss {row['train_loss']:.4f} {shown} "
                f"step {row['step_time_ms']:.1f} ms {row[f'{unit}_per_s']:.0f} {unit}/s"
                + (f" bad_steps {bad_steps}" if bad_steps else ""),
                file=sys.stderr,
            )
        row = ranks.broadcast(row)  # every rank returns the same history
        if not main:
            history.append(row)
        if not math.isfinite(row["val_loss"]):  # NaN/Inf outputs: accuracy of an argmax over NaN
            bar.close()
            _diverged(run_dir, main, f"the evaluation loss after epoch {epoch + 1} is {row['val_loss']} (the "
                                     "model's outputs are not finite); its metrics are not results and it was "
                                     "not checkpointed")
    bar.close()
    if main:
        write_status(run_dir, "done")
    return TrainResult(history, model, task, run_dir)


__all__ = [
    "WEIGHT_FORMATS",
    "MasterWeights",
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "check_run_dir",
    "convert_or_refuse",
    "remove_if_unused",
    "build_optimizer",
    "cosine_schedule",
    "epoch_seed",
    "to_bfloat16",
    "train",
    "write_metrics",
    "write_status",
]
