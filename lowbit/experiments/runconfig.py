"""What defines a training run: :class:`TrainConfig`, validated on construction.

``None`` fields take the task's default when the config is built, so the saved
``config.json`` always holds concrete values. ``world_size`` is the number of
data-parallel ranks (``None``: as launched — torchrun's ``WORLD_SIZE``, else 1) and
``batch_size`` the global batch, split evenly over the ranks; ``grad_comm`` how their
gradients are averaged (``fp32``: DDP's all-reduce; ``int2``..``int8``: the unbiased
quantized hook of :mod:`lowbit.distributed`).
"""

from __future__ import annotations

import json

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from lowbit.config import ADAPTIVE_RECIPES, RECIPES, Backend, FQTConfig, recipe_families
from lowbit.formats import IntFormat
from lowbit.distributed import GRAD_COMM_NAMES, GradComm
from lowbit.formats import MAX_BITS, MIN_BITS

from .models import DEFAULT_MODEL, MODELS
from .tasks import TASK_CLASSES, TASKS

OPTIMIZERS = ("sgd", "adamw")
WEIGHT_FORMATS = ("fp32", "bf16-master", "bf16", "int8")
# Per-epoch metric columns measured in wall time: they differ between otherwise identical runs.
TIMING_FIELDS = ("step_time_ms", "samples_per_s", "tokens_per_s", "epoch_time_s")
# Fields a resumed run may change without invalidating the checkpoint. Not ``epochs``: the
# learning-rate schedule (warm-up, then cosine to 0) spans all of them, so a run extended
# on resume would follow neither its old schedule nor a fresh run's.
RESUMABLE_CHANGES = frozenset({"max_bad_steps", "out", "monitor_every"})
# Fields older checkpoints lack, with the value they ran with.
LEGACY_DEFAULTS = {"world_size": 1, "grad_comm": "fp32", "weights": "fp32", "opt_state": "fp32"}
DEFAULT_MONITOR_EVERY = 50  # steps between variance-monitor measurements


def launched_world_size() -> int:
    """Ranks of the current launch: the default process group's size if initialised,
    else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"the environment's WORLD_SIZE must be an integer (torchrun sets it), "
                         f"got {text!r}") from None


RECIPE_OVERRIDES = ("grad_input_bits", "grad_weight_bits", "range_margin")


def override_refused(name: str, recipe: str) -> str | None:
    """Why the recipe-specific setting ``name`` (one of ``RECIPE_OVERRIDES``) does not
    apply to ``recipe``, or None where it does: gradient bits need an ``fqt-*`` recipe of
    fixed widths (an adaptive one picks its own) whose gradient format on that path is an
    integer one (FP8 and block formats have their own widths), the range margin an
    ``fqt-*-predicted`` one. :class:`TrainConfig` raises with the reason; ``lowbit sweep`` leaves the setting
    out of the runs it does not apply to and says so."""
    if name == "range_margin":
        return None if recipe.endswith("-predicted") else (
            f"range_margin needs an fqt-*-predicted recipe, got {recipe!r}")
    if name not in ("grad_input_bits", "grad_weight_bits"):
        raise ValueError(f"{name!r} is not one of {', '.join(RECIPE_OVERRIDES)}")
    if not recipe.startswith("fqt-"):
        return f"{name} needs an fqt-* recipe, got {recipe!r}"
    if recipe in ADAPTIVE_RECIPES:
        return (f"{name} conflicts with the adaptive recipe {recipe!r}: its widths are chosen "
                "per layer by the variance monitor")
    path = name.removesuffix("_bits")
    spec = getattr(FQTConfig.from_recipe(recipe), path, None) if recipe in RECIPES else None
    if spec is not None and not isinstance(spec.format, IntFormat):  # (a trial: refused without the option's name)
        return (f"{name} sets an integer width, and the {path} format of recipe {recipe!r} is "
                f"{spec.format.name!r}, which has its own width")
    return None


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
    grad_comm: str = "fp32"  # fp32 (DDP's all-reduce) | int2..int8 (quantized, unbiased)
    world_size: int | None = None  # data-parallel ranks; None: as launched
    monitor_every: int = DEFAULT_MONITOR_EVERY  # variance monitor interval in steps (lowbit.monitor); 0: off
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
            raise ValueError(f"recipe must be one of {recipe_families()}; got {self.recipe!r}")
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
            why = override_refused(name, self.recipe)
            if why:
                raise ValueError(why)
        if self.range_margin is not None:
            _finite("range_margin", self.range_margin, 1.0, True)
            why = override_refused("range_margin", self.recipe)
            if why:
                raise ValueError(why)
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
        if self.seed >= 2**63:  # epoch_seed works mod 2⁶³: seed + 2⁶³ would repeat seed's data order
            raise ValueError(f"seed must be below 2**63, got {self.seed}")
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
        if self.world_size is None:
            self.world_size = launched_world_size()
        _positive_int("world_size", self.world_size)
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of world_size "
                             f"({self.world_size}): it is the global batch, split evenly over ranks")
        if self.grad_comm not in GRAD_COMM_NAMES:
            raise ValueError(f"grad_comm must be one of {', '.join(GRAD_COMM_NAMES)}, "
                             f"got {self.grad_comm!r}")
        if self.grad_comm != "fp32" and self.world_size < 2:
            # (no option named but the launchers': a trial found `lowbit sweep` told to use
            # --nproc, which it does not have)
            raise ValueError(f"grad_comm {self.grad_comm} needs a data-parallel run of 2 or more "
                             "ranks: launch it with torchrun --nproc-per-node N (lowbit train: or "
                             "with --nproc N)")
        m = self.monitor_every
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"monitor_every must be a non-negative integer, got {m!r}")
        if self.recipe in ADAPTIVE_RECIPES and self.world_size > 1:
            # (no field or option named: "(--nproc 2)" reached torchrun and sweep users — a review)
            raise ValueError(f"{self.recipe} trains on a single rank only, not on {self.world_size} "
                             "data-parallel ranks: its bit widths come from the variance monitor, which "
                             "runs on one rank; train it in one process (without --nproc or torchrun), "
                             "or pick a fixed-width recipe")
        if self.recipe in ADAPTIVE_RECIPES and m < 1:
            raise ValueError(f"monitor_every must be ≥ 1 for {self.recipe}: its bit widths come "
                             f"from the variance monitor (got {m})")
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

    def grad_comm_config(self) -> GradComm | None:
        """The quantized gradient communication (``None``: DDP's fp32 all-reduce); its
        noise is seeded from ``seed``."""
        return GradComm.from_name(self.grad_comm, seed=self.seed)

    def run_name(self) -> str:
        """``{task}-{model}-{recipe}[-giB-gwB][-mMARGIN][-wFMT[-sFMT]][-nN[-cCOMM]]-s{seed}``
        (``-nN``: N data-parallel ranks; ``-cCOMM``: quantized gradient communication)."""
        bits = ""
        if self.grad_input_bits is not None or self.grad_weight_bits is not None:
            fqt = self.fqt_config()
            bits = f"-gi{fqt.grad_input.bits}-gw{fqt.grad_weight.bits}"
        if self.range_margin is not None:
            bits += f"-m{self.range_margin:g}"
        if self.weights != "fp32":
            bits += f"-w{self.weights}"
            bits += f"-s{self.opt_state}" if self.opt_state != self.default_state() else ""
        if self.world_size > 1:
            bits += f"-n{self.world_size}" + (f"-c{self.grad_comm}" if self.grad_comm != "fp32" else "")
        return f"{self.task}-{self.model}-{self.recipe}{bits}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})




def effective_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with a default spelled out where ``None`` stands for it (a new user's
    trial: a text run of ``steps_per_epoch`` None was "other settings" beside the same run
    with the documented default 200 written out)."""
    if settings.get("task") == "text" and settings.get("steps_per_epoch") is None:
        return settings | {"steps_per_epoch": TASK_CLASSES["text"].default_steps_per_epoch}
    return settings


# the command-line option of each TrainConfig field that has one under another name
# (the rest: --field-name; optimizer, momentum and grad_clip are the Python API's only)
_OPTION = {"model_kwargs": "--model-arg", "world_size": "--nproc", "optimizer": "optimizer", "momentum": "momentum",
           "grad_clip": "grad_clip"}
# the fields run_name() writes into the default run folder's name
NAMED_FIELDS = frozenset({"task", "model", "recipe", "grad_input_bits", "grad_weight_bits", "range_margin", "weights",
                          "opt_state", "world_size", "grad_comm", "seed"})


def option_of(field: str) -> str:
    """The ``lowbit train`` option that sets TrainConfig's ``field`` (``--model-arg`` for
    ``model_kwargs``, ``--nproc`` for ``world_size``; the field's own name where the
    command line has none)."""
    return _OPTION.get(field, "--" + field.replace("_", "-"))


def unnamed_options() -> list[str]:
    """The options that shape a run but are not in its default folder's name
    (:meth:`TrainConfig.run_name`): two runs that differ only in them need their own
    ``--out`` (a new user's trial: ``--help`` named four of the ten)."""
    return [option_of(f.name) for f in dataclasses.fields(TrainConfig)
            if f.name not in NAMED_FIELDS and f.name not in RESUMABLE_CHANGES and option_of(f.name).startswith("--")]


def changed_settings(saved: dict[str, Any], cfg: TrainConfig, options: bool = False) -> list[str]:
    """``"field (saved, now requested)"`` (with ``options``, the field's ``lowbit train``
    option: :func:`option_of`) for every setting in which a run recorded as
    ``saved`` (a checkpoint's ``train_config`` or config.json's ``train``) differs from
    ``cfg``: all fields but :data:`RESUMABLE_CHANGES` (``monitor_every`` counts for an
    adaptive recipe, whose bit widths are decided at the monitor's steps), with
    :data:`LEGACY_DEFAULTS` for what older records lack, both sides compared as JSON holds
    them (tuples as lists)."""
    old = effective_settings(json.loads(json.dumps(LEGACY_DEFAULTS | saved)))
    now = effective_settings(json.loads(json.dumps(cfg.to_dict())))
    free = RESUMABLE_CHANGES
    if cfg.fqt_config().adaptive is not None:  # fqt-auto: the monitor's interval is when the
        free = free - {"monitor_every"}  # policy decides bit widths, so it shapes the run
    return [f"{option_of(k) if options else k} ({old.get(k)!r}, now {v!r})" for k, v in now.items()
            if k not in free and old.get(k) != v]


__all__ = ["LEGACY_DEFAULTS", "NAMED_FIELDS", "changed_settings", "option_of", "unnamed_options", "OPTIMIZERS", "RESUMABLE_CHANGES", "TIMING_FIELDS", "TrainConfig",
           "WEIGHT_FORMATS", "RECIPE_OVERRIDES", "effective_settings", "launched_world_size", "override_refused"]
