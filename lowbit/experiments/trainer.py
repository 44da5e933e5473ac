"""One training loop for every task and recipe, with crash-safe checkpoints.

    cfg = TrainConfig(task="digits", model="mlp", recipe="fqt-bhq-4", epochs=5, out="runs/x")
    result = train(cfg)             # or train(cfg, resume=True) after a crash
    result.history[-1]["accuracy"]

The run folder gets ``config.json`` (this TrainConfig, the resolved FQTConfig),
``metrics.csv`` / ``metrics.json`` (one row per epoch), ``status.json`` (running, done or
diverged) and ``last.pt`` / ``prev.pt``.
Images train with SGD (momentum 0.9) and text with AdamW (β = 0.9, 0.95, 5% warmup);
both follow a cosine schedule over all steps, stepped once per optimizer step. Weight
decay applies to matrices and conv kernels only (not biases or norm layers).

``weights``: ``fp32`` (torch's optimizers, float32 weights and state); ``bf16-master``
(the mixed-precision baseline: a bfloat16 model whose float32 master copy is what torch's
optimizer updates, copied back after each step); or low precision with no float32 copy
(``lowbit.optim.SRSGD`` / ``SRAdamW``): ``bf16`` weights and state, or ``int8`` weights
(per-channel scales) and int8 state (AdamW: first moment int8, second bf16);
``opt_state`` overrides the state format. All but ``fp32`` run the model in bfloat16
(inputs cast on entry, logits cast to float32 for the loss), so ``bf16-master`` is the
baseline that differs from ``bf16``/``int8`` in the weight storage only.

Reproducibility: the model is initialised under ``torch.manual_seed(seed)`` (so every
recipe starts from the same weights), the stochastic-rounding generators are seeded from
``seed``, and the data order of epoch ``e`` comes from a generator seeded with
``(seed, e)``. A resumed run is bitwise identical to an uninterrupted one.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

import lowbit
import lowbit.optim
from lowbit.config import RECIPES, Backend, FQTConfig
from lowbit.formats import MAX_BITS, MIN_BITS

from . import checkpoint as ckpt
from .models import DEFAULT_MODEL, MODELS
from .tasks import TASK_CLASSES, TASKS, Task, make_task

OPTIMIZERS = ("sgd", "adamw")
WEIGHT_FORMATS = ("fp32", "bf16-master", "bf16", "int8")
# Fields a resumed run may change without invalidating the checkpoint.
RESUMABLE_CHANGES = frozenset({"epochs", "max_bad_steps", "out"})


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainResult:
    """What :func:`train` leaves behind: the metric rows and the trained model."""

    history: list[dict[str, Any]]
    model: nn.Module
    task: Task
    run_dir: Path


def _positive_int(name: str, value: object, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _finite(name: str, value: object, lo: float, lo_inclusive: bool, hi: float = math.inf) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= lo if lo_inclusive else value > lo) and value < hi
    if not ok:
        bound = f"{'≥' if lo_inclusive else '>'} {lo}" + (f" and < {hi}" if hi < math.inf else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


@dataclass
class TrainConfig:
    """Everything that defines a run. ``None`` fields take the task's default when the
    config is built, so the saved ``config.json`` always holds concrete values."""

    task: str = "digits"
    model: str | None = None
    recipe: str = "fp"
    grad_input_bits: int | None = None  # override the recipe's ∇X bits (fqt-* only)
    grad_weight_bits: int | None = None  # override the recipe's ∇W bits (fqt-* only)
    range_margin: float | None = None  # override the predicted-range margin (*-predicted only)
    backend: str = "auto"
    epochs: int = 10
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    optimizer: str | None = None  # sgd (images) or adamw (text)
    momentum: float = 0.9  # SGD momentum / AdamW β1
    grad_clip: float | None = None  # max gradient norm; text default 1.0, 0 disables
    seed: int = 0
    subset: int | None = None  # images: training images kept; text: corpus bytes kept
    eval_subset: int | None = None  # evaluate on the first N images / windows only
    steps_per_epoch: int | None = None  # text only
    max_bad_steps: int = 5
    weights: str = "fp32"  # fp32 | bf16-master | bf16 | int8 (the last two: no float32 copy)
    opt_state: str | None = None  # bf16 | int8 (default: as weights); fp32 weights: fp32
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    out: str = "runs/run"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        self.model = self.model or DEFAULT_MODEL[self.task]
        if self.model not in MODELS[self.task]:
            raise ValueError(
                f"model for task {self.task!r} must be one of "
                f"{', '.join(MODELS[self.task])}, got {self.model!r}"
            )
        if self.recipe not in RECIPES:
            raise ValueError(
                f"recipe must be one of fp, qat-B, fqt-{{ptq,psq,bhq,hadamard}}-B "
                f"(B in 4..8), got {self.recipe!r}"
            )
        for name in ("grad_input_bits", "grad_weight_bits"):
            bits = getattr(self, name)
            if bits is None:
                continue
            if (
                isinstance(bits, bool)
                or not isinstance(bits, int)
                or not MIN_BITS <= bits <= MAX_BITS
            ):
                raise ValueError(
                    f"{name} must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}"
                )
            if not self.recipe.startswith("fqt-"):
                raise ValueError(f"{name} needs an fqt-* recipe, got {self.recipe!r}")
        if self.range_margin is not None:
            _finite("range_margin", self.range_margin, 1.0, True)
            if not self.recipe.endswith("-predicted"):
                raise ValueError(f"range_margin needs an fqt-*-predicted recipe, got {self.recipe!r}")
        allowed_backends = [b.value for b in Backend]
        if self.backend not in allowed_backends:
            raise ValueError(
                f"backend must be one of {', '.join(allowed_backends)}, got {self.backend!r}"
            )
        task_cls = TASK_CLASSES[self.task]
        if self.batch_size is None:
            self.batch_size = task_cls.default_batch_size
        self.lr = task_cls.default_lr if self.lr is None else self.lr
        if self.weight_decay is None:
            self.weight_decay = task_cls.default_weight_decay
        self.optimizer = self.optimizer or task_cls.optimizer
        if self.grad_clip is None and self.task == "text":
            self.grad_clip = 1.0
        _positive_int("epochs", self.epochs)
        _positive_int("batch_size", self.batch_size)
        _finite("lr", self.lr, 0.0, False)
        _finite("weight_decay", self.weight_decay, 0.0, True)
        _finite("momentum", self.momentum, 0.0, True, 1.0)
        if self.grad_clip is not None:
            _finite("grad_clip", self.grad_clip, 0.0, True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        _positive_int("subset", self.subset, allow_none=True)
        _positive_int("eval_subset", self.eval_subset, allow_none=True)
        _positive_int("steps_per_epoch", self.steps_per_epoch, allow_none=True)
        if self.steps_per_epoch is not None and self.task != "text":
            raise ValueError(
                "steps_per_epoch applies to the text task only (images use full epochs)"
            )
        _positive_int("max_bad_steps", self.max_bad_steps)
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"weights must be one of {', '.join(WEIGHT_FORMATS)}, got {self.weights!r}")
        self.opt_state = self.opt_state or self.default_state()
        allowed_state = ("fp32",) if self.weights in ("fp32", "bf16-master") else ("bf16", "int8")
        if self.opt_state not in allowed_state:
            raise ValueError(f"opt_state with {self.weights} weights must be one of "
                             f"{', '.join(allowed_state)}, got {self.opt_state!r}")
        if not str(self.out):
            raise ValueError("out must be a folder path, got an empty string")
        self.out = str(self.out)

    def default_state(self) -> str:
        """The optimizer-state format that goes with ``weights`` unless overridden."""
        return "fp32" if self.weights in ("fp32", "bf16-master") else self.weights

    def fqt_config(self) -> FQTConfig:
        """The resolved recipe: backend, SR seed and gradient-bit overrides applied."""
        cfg = FQTConfig.from_recipe(self.recipe, backend=self.backend, seed=self.seed)
        if self.grad_input_bits is not None or self.grad_weight_bits is not None:
            cfg = cfg.with_grad_bits(self.grad_input_bits, self.grad_weight_bits)
        if self.range_margin is not None:
            cfg = cfg.with_ranges(margin=float(self.range_margin))
        return cfg

    def run_name(self) -> str:
        """``{task}-{model}-{recipe}[-giB-gwB][-mMARGIN][-wFMT[-sFMT]]-s{seed}``."""
        bits = ""
        if self.grad_input_bits is not None or self.grad_weight_bits is not None:
            fqt = self.fqt_config()
            bits = f"-gi{fqt.grad_input.bits}-gw{fqt.grad_weight.bits}"
        if self.range_margin is not None:
            bits += f"-m{self.range_margin:g}"
        if self.weights != "fp32":
            bits += f"-w{self.weights}"
            bits += f"-s{self.opt_state}" if self.opt_state != self.default_state() else ""
        return f"{self.task}-{self.model}-{self.recipe}{bits}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------- pieces


class MasterWeights:
    """float32 master copies of a bfloat16 model's parameters (the mixed-precision
    baseline): the optimizer updates the masters, the model gets their bfloat16 rounding."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.pairs = [(p, p.detach().float().clone().requires_grad_(True)) for p in params]
        self.of = {id(p): m for p, m in self.pairs}

    @torch.no_grad()
    def grads_in(self) -> None:
        """Gradients to the masters. A parameter written from outside since the last
        ``weights_out`` (load_state_dict, copy_, ...) no longer equals its master's
        rounding: that master takes its value, so the write is not undone."""
        for p, m in self.pairs:
            r = m.to(p.dtype)
            if not (torch.equal(p, r) or torch.allclose(p, r, rtol=0, atol=0, equal_nan=True)):
                m.copy_(p)
            m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def weights_out(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)

    def state(self) -> list[torch.Tensor]:
        return [m.detach().clone() for _, m in self.pairs]

    @torch.no_grad()
    def load(self, masters: list[torch.Tensor]) -> None:
        for (_, m), saved in zip(self.pairs, masters, strict=True):
            m.copy_(saved)
        self.weights_out()


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


def _batchnorm_float32_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` computed in float32 against float32 running statistics, returned in
    ``x``'s dtype (the parameters may be bfloat16: gradients flow through the casts)."""
    bn._check_input_dim(x)
    factor = 0.0
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    y = F.batch_norm(x.float(), bn.running_mean if track else None,
                     bn.running_var if track else None,
                     None if bn.weight is None else bn.weight.float(),
                     None if bn.bias is None else bn.bias.float(), batch_stats, factor, bn.eps)
    return y.to(x.dtype)


def _float32_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Keep ``bn``'s running statistics in float32 and normalise in float32: they are
    statistics, not weights, and a bfloat16 running average drops the small updates a
    momentum of 0.1 makes."""
    for name in ("running_mean", "running_var"):
        if getattr(bn, name) is not None:
            setattr(bn, name, getattr(bn, name).float())
    bn.forward = types.MethodType(_batchnorm_float32_forward, bn)  # survives deepcopy


def to_bfloat16(model: nn.Module) -> nn.Module:
    """Parameters and buffers to bfloat16 (BatchNorm statistics stay float32, see
    :func:`_float32_batchnorm`); floating inputs are cast on entry (a forward
    pre-hook), so the task's data need not change."""
    model.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _float32_batchnorm(m)

    def cast(_: nn.Module, args: tuple) -> tuple:
        return tuple(a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a
                     for a in args)

    model.register_forward_pre_hook(cast)
    return model


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
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def _json_number(x: Any) -> Any:
    """Non-finite floats become null in JSON (never a made-up number)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.json`` and ``metrics.csv`` from the full history (atomically)."""
    rows = [{k: _json_number(v) for k, v in row.items()} for row in history]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    tmp = run_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, run_dir / "metrics.json")
    tmp = run_dir / ".metrics.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, run_dir / "metrics.csv")


def write_status(run_dir: Path, status: str, message: str = "") -> None:
    """``status.json``: ``running``, ``done`` or ``diverged`` (with the message)."""
    (run_dir / "status.json").write_text(json.dumps({"status": status, "message": message}) + "\n")


def _log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


def _load_resumable(run_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start fresh), checked against ``cfg``."""
    loaded = ckpt.load_checkpoint(run_dir)
    if loaded is None:
        _log(f"no checkpoint in {run_dir}; starting fresh")
        return None
    state, path = loaded
    saved = state["train_config"]
    diff = [k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if diff:
        raise ValueError(
            f"cannot resume {path}: it was made with a different "
            + ", ".join(f"{k} ({saved.get(k)!r}, now {getattr(cfg, k)!r})" for k in diff)
        )
    if state["epoch"] > cfg.epochs:
        raise ValueError(f"cannot resume {path}: {state['epoch']} epochs are done, more than "
                         f"epochs={cfg.epochs}")  # fmt: skip
    _log(f"resumed {path} at epoch {state['epoch']}, step {state['step']}")
    return state


def _memory_row(optimizer: torch.optim.Optimizer, bf16_model: nn.Module | None = None,
                ) -> dict[str, float]:
    """Bytes per parameter: everything held (``bytes_per_param``) and the stored training
    state alone, weights + optimizer state without a decode buffer (``..._stored``).
    ``bf16_model``: the optimizer holds float32 masters of this model's bfloat16
    parameters, which count too."""
    mem = lowbit.optim.memory_breakdown(optimizer)
    extra = 0.0
    if bf16_model is not None:
        ps = list(bf16_model.parameters())
        extra = sum(p.numel() * p.element_size() for p in ps) / max(1, sum(p.numel() for p in ps))
    return {"bytes_per_param": mem["total"] + extra,
            "bytes_per_param_stored": mem["weights"] + mem["state"] + extra}


def _write_config(run_dir: Path, cfg: TrainConfig, fqt: FQTConfig, steps_per_epoch: int) -> None:
    config = {
        "run": cfg.run_name(),
        "train": cfg.to_dict(),
        "fqt": fqt.to_dict(),
        "recipe": lowbit.describe(fqt),
        "steps_per_epoch": steps_per_epoch,
        "threads": torch.get_num_threads(),
        "lowbit": lowbit.__version__,
        "torch": torch.__version__,
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=1) + "\n")


# --------------------------------------------------------------------------- the loop


def train(
    cfg: TrainConfig, resume: bool = False, task: Task | None = None, progress: bool = True
) -> TrainResult:
    """Train per ``cfg``; return the per-epoch metric rows (also written to ``cfg.out``)
    and the trained model.

    With ``resume`` the run continues from ``last.pt`` (or ``prev.pt`` if ``last.pt`` is
    unreadable); without a checkpoint it starts fresh. Raises :class:`TrainingDiverged`
    after ``cfg.max_bad_steps`` consecutive non-finite steps.
    """
    run_dir = Path(cfg.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = task or make_task(
        cfg.task,
        cfg.model,
        subset=cfg.subset,
        eval_subset=cfg.eval_subset,
        steps_per_epoch=cfg.steps_per_epoch,
        model_kwargs=cfg.model_kwargs,
    )
    fqt = cfg.fqt_config()

    torch.manual_seed(cfg.seed)
    model = task.build_model()  # same initial weights for every recipe of a seed
    if not fqt.is_fp:
        lowbit.convert(model, fqt)
    if cfg.weights != "fp32":
        to_bfloat16(model)
    master = MasterWeights(list(model.parameters())) if cfg.weights == "bf16-master" else None
    optimizer = build_optimizer(model, cfg, master)
    sr_gen = getattr(optimizer, "generator", None)  # the low-precision optimizers' noise
    steps_per_epoch = task.steps_per_epoch(cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    warmup = total_steps // 20 if cfg.optimizer == "adamw" else 0
    scheduler = cosine_schedule(optimizer, total_steps, warmup)
    data_gen = torch.Generator()

    if not resume and (run_dir / ckpt.LAST).exists():
        raise ValueError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose "
            "another --out"
        )
    start_epoch, step, bad_in_a_row, history = 0, 0, 0, []
    if resume:
        state = _load_resumable(run_dir, cfg)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            ckpt.restore_rng(model, data_gen, state["rng"])
            lowbit.load_range_state(model, state.get("ranges", {}))
            if sr_gen is not None:
                sr_gen.set_state(state["optim_rng"])  # saved by low-precision runs
            if master is not None:
                master.load(state["master"])
            start_epoch, step, history = state["epoch"], state["step"], list(state["history"])
            bad_in_a_row = state["bad_in_a_row"]

    _write_config(run_dir, cfg, fqt, steps_per_epoch)
    write_metrics(run_dir, history)
    write_status(run_dir, "running")
    params = [p for p in model.parameters() if p.requires_grad]
    unit = task.throughput_unit

    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not progress or None,
        leave=False,
        desc=cfg.run_name(),
        dynamic_ncols=True,
        file=sys.stderr,
    )
    for epoch in range(start_epoch, cfg.epochs):
        data_gen.manual_seed(epoch_seed(cfg.seed, epoch))
        model.train()
        losses, step_times, units, bad_steps = [], [], 0, 0
        ranges_before = lowbit.range_stats(model)["total"]
        for batch in task.train_batches(cfg.batch_size, data_gen):
            t0 = time.perf_counter()
            buffers = [b.detach().clone() for b in model.buffers()]  # BN stats, to undo a bad step
            loss = task.loss(model, batch)  # scalar
            model.zero_grad(set_to_none=True)
            loss.backward()
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
            else:  # skip the update, keep the weights and BN statistics as they were
                with torch.no_grad():
                    for b, saved_b in zip(model.buffers(), buffers):
                        b.copy_(saved_b)
                bad_steps += 1
                bad_in_a_row += 1
                bar.write(
                    f"step {step}: non-finite loss ({loss.item()}) or gradient norm "
                    f"({grad_norm.item()}); optimizer step skipped "
                    f"({bad_in_a_row}/{cfg.max_bad_steps} in a row)",
                    file=sys.stderr,
                )
                if bad_in_a_row >= cfg.max_bad_steps:
                    bar.close()
                    last = run_dir / ckpt.LAST
                    msg = (
                        f"training diverged: {bad_in_a_row} consecutive steps with a non-finite "
                        f"loss or gradient (epoch {epoch + 1}, step {step}); last good "
                        f"checkpoint: {last if last.exists() else 'none'}"
                    )
                    write_status(run_dir, "diverged", msg)
                    raise TrainingDiverged(msg)
            scheduler.step()
            step += 1
            step_times.append(time.perf_counter() - t0)
            units += task.batch_units(batch)
            bar.update()
            if losses:
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")

        metrics = task.evaluate(model)
        ranges = lowbit.range_stats(model)["total"] - ranges_before
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": scheduler.get_last_lr()[0],
            "train_loss": statistics.fmean(losses) if losses else math.nan,
            **metrics,
            "step_time_ms": 1e3 * statistics.median(step_times),
            f"{unit}_per_s": units / sum(step_times),
            "bad_steps": bad_steps,
            **_memory_row(optimizer, model if master is not None else None),
        }
        if ranges.calls:  # predicted gradient ranges: how often they were exceeded
            row |= {"range_overflow_calls": ranges.overflow_calls,
                    "range_requantized_calls": ranges.requantized_calls,
                    "range_overflow_rate": ranges.overflow_rate,
                    "range_clipped_norm": ranges.clipped_norm}
        history.append(row)
        ckpt.save_checkpoint(
            run_dir,
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "train_config": cfg.to_dict(),
                "fqt_config": fqt.to_dict(),
                "rng": ckpt.capture_rng(model, data_gen),
                "ranges": lowbit.range_state(model),
                "optim_rng": None if sr_gen is None else sr_gen.get_state(),
                "master": None if master is None else master.state(),
                "history": history,
                "bad_in_a_row": bad_in_a_row,
            },
        )
        write_metrics(run_dir, history)
        shown = " ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        bar.write(
            f"{cfg.run_name()} epoch {epoch + 1}/{cfg.epochs} step {step} "
            f"train_loss {row['train_loss']:.4f} {shown} "
            f"step {row['step_time_ms']:.1f} ms {row[f'{unit}_per_s']:.0f} {unit}/s"
            + (f" bad_steps {bad_steps}" if bad_steps else ""),
            file=sys.stderr,
        )
    bar.close()
    write_status(run_dir, "done")
    return TrainResult(history, model, task, run_dir)


__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDiverged",
    "build_optimizer",
    "cosine_schedule",
    "epoch_seed",
    "train",
    "write_metrics",
    "write_status",
]
