"""Tasks: what to train on and how to score it.

A :class:`Task` bundles a dataset, a model family, a loss and an evaluation, so the
trainer can run one loop for all of them::

    task = make_task("digits", "mlp")
    model = task.build_model()
    for batch in task.train_batches(epoch, generator):   # a fresh order per epoch
        loss = task.loss(model, batch)                   # scalar
    metrics = task.evaluate(model)                       # {"accuracy": ...}

* ``digits``: scikit-learn's 8×8 digits (1,438 train / 359 validation), MLP or CNN.
* ``fashion-mnist``: 60k/10k 28×28 images, PreAct-ResNet-20/56, random crop (pad 2) and
  horizontal flip; ``subset`` keeps that many training images.
* ``text``: a byte-level TinyGPT on the python3.11-doc reStructuredText; an epoch is a
  fixed number of random windows; metrics are the validation loss and bits per byte
  (loss / ln 2). ``subset`` keeps the first that many bytes of the corpus.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from .models import DEFAULT_MODEL, MODEL_ARGS, MODELS, build_model, check_model_args

Batch = tuple[torch.Tensor, torch.Tensor]
TASKS: tuple[str, ...] = tuple(MODELS)


class Task:
    """Base class: a dataset, a model family, a loss and an evaluation."""

    name: str
    primary_metric: str  # the number a report leads with
    higher_is_better: bool
    chance: float  # the primary metric of a model that learned nothing (claims: untrained)
    throughput_unit: str  # "samples" or "tokens"
    optimizer: str  # "sgd" or "adamw"
    default_batch_size: int
    default_lr: float
    default_weight_decay: float

    def __init__(self, model: str, model_kwargs: dict[str, Any] | None = None) -> None:
        self.model_name = model
        self.model_kwargs = dict(model_kwargs or {})
        if model in MODEL_ARGS.get(getattr(self, "name", ""), {}):  # before a task reads them (block_size 0 divided by zero)
            check_model_args(self.name, model, self.model_kwargs, "model argument ")

    def build_model(self) -> nn.Module:
        try:
            return build_model(self.name, self.model_name, **self.model_kwargs)
        except TypeError as exc:  # an unknown keyword in model_kwargs
            raise ValueError(f"model {self.model_name!r}: {exc}") from None

    def steps_per_epoch(self, batch_size: int) -> int:
        raise NotImplementedError

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def batch_units(self, batch: Batch) -> int:
        """Samples (images) or tokens (text) in a batch, for throughput."""
        return batch[1].numel()

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        raise NotImplementedError

    def fixed_batch(self, size: int) -> Batch:
        """A deterministic training batch (for variance measurements)."""
        raise NotImplementedError


class ImageTask(Task):
    """Classification of ``(N, 1, H, W)`` images with cross-entropy; metric: accuracy."""

    primary_metric = "accuracy"
    higher_is_better = True
    chance = 0.1  # ten classes (digits, Fashion-MNIST)
    eval_split = "test"  # what the evaluated images are (digits: a validation split)
    eval_examples = 0  # images evaluated without --eval-subset (each task's; 0: unknown)
    throughput_unit = "samples"
    optimizer = "sgd"

    def __init__(
        self,
        model: str,
        images: D.ImageData,
        augment_padding: int | None,
        eval_subset: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, model_kwargs)
        self.data = images
        self.augment_padding = augment_padding
        if eval_subset is not None and eval_subset > len(images.y_eval):
            raise ValueError(f"eval_subset must be at most {len(images.y_eval)} (the {self.eval_split} "
                             f"images), got {eval_subset}")
        n_eval = len(images.y_eval) if eval_subset is None else eval_subset
        self.x_eval, self.y_eval = images.x_eval[:n_eval], images.y_eval[:n_eval]

    def steps_per_epoch(self, batch_size: int) -> int:
        n = len(self.data.y_train)
        if batch_size > n:
            raise ValueError(f"batch_size ({batch_size}) exceeds the {n} training images")
        return n // batch_size  # drop_last: every step sees a full batch (BatchNorm)

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        """One epoch of full minibatches in a random order; ``ValueError`` (at the first
        ``next``) where ``batch_size`` exceeds the training images: no full batch exists,
        and a caller that draws passes until it has enough batches would loop for ever
        (``lowbit comm-variance`` did, a review)."""
        self.steps_per_epoch(batch_size)
        x, y = self.data.x_train, self.data.y_train
        for xb, yb in D.iterate_batches(x, y, batch_size, True, generator, drop_last=True):
            if self.augment_padding is not None:
                xb = D.random_crop_flip(xb, self.augment_padding, generator)  # (B, 1, H, W)
            yield xb, yb

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch  # (B, 1, H, W), (B,)
        return F.cross_entropy(model(x).float(), y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 1000) -> dict[str, float]:
        was_training = model.training
        model.eval()
        correct, total_loss = 0, 0.0
        for xb, yb in D.iterate_batches(self.x_eval, self.y_eval, batch_size, False, None):
            logits = model(xb).float()  # (B, classes)
            total_loss += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
        model.train(was_training)
        n = len(self.y_eval)
        return {"accuracy": correct / n, "val_loss": total_loss / n}

    def fixed_batch(self, size: int) -> Batch:
        return self.data.x_train[:size], self.data.y_train[:size]


class DigitsTask(ImageTask):
    name = "digits"
    eval_examples = 359  # round(1797 × 0.2): the validation split evaluated
    eval_split = "validation"
    default_batch_size = 64
    default_lr = 0.05
    default_weight_decay = 5e-4

    def __init__(
        self,
        model: str,
        subset: int | None = None,
        eval_subset: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        images = D.load_digits_tensors(val_fraction=0.2, seed=0)
        if subset is not None:
            if subset > len(images.y_train):
                raise ValueError(f"subset must be at most {len(images.y_train)}, got {subset}")
            images = images._replace(
                x_train=images.x_train[:subset], y_train=images.y_train[:subset]
            )
        super().__init__(model, images, None, eval_subset, model_kwargs)
        self.source = "digits:sklearn.datasets.load_digits"  # embedded in scikit-learn


class FashionMNISTTask(ImageTask):
    name = "fashion-mnist"
    eval_examples = 10_000  # the test images
    default_batch_size = 128
    default_lr = 0.1
    default_weight_decay = 5e-4

    def __init__(
        self,
        model: str,
        subset: int | None = None,
        eval_subset: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        images = D.load_fashion_mnist(subset=subset, seed=0)
        super().__init__(model, images, 2, eval_subset, model_kwargs)
        self.source = f"fashion-mnist:{D.find_fashion_mnist()['train_images'].parent}"  # which copy


class TextTask(Task):
    """Byte-level language modelling; an epoch is ``steps_per_epoch`` random windows."""

    name = "text"
    primary_metric = "bpb"
    higher_is_better = False
    chance = 8.0  # a uniform guess over 256 byte values
    throughput_unit = "tokens"
    optimizer = "adamw"
    default_batch_size = 32
    default_lr = 1e-3
    default_weight_decay = 0.1
    default_steps_per_epoch = 200
    eval_windows = 64  # non-overlapping validation windows scored each epoch

    def __init__(
        self,
        model: str,
        subset: int | None = None,
        steps_per_epoch: int | None = None,
        eval_subset: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, model_kwargs)
        self.block_size = int(self.model_kwargs.get("block_size", 128))
        # the last 5% is validation, which must hold one window of block_size + 1 bytes (a
        # review's --subset 10 was refused in terms of split_text's val_fraction argument)
        least = 20 * (self.block_size + 2)
        if subset is not None and subset < least:
            raise ValueError(f"--subset must be at least {least} bytes for the text task (its 5% "
                             f"validation split holds one {self.block_size}-byte window), got {subset}")
        corpus, self.source = D.load_text_corpus(max_bytes=subset)
        self.train_data, self.val_data = D.split_text(corpus, val_fraction=0.05)
        self.n_steps = steps_per_epoch or self.default_steps_per_epoch
        available = (len(self.val_data) - 1) // self.block_size
        if eval_subset is not None and eval_subset > available:
            raise ValueError(f"eval_subset must be at most {available} (the validation windows of "
                             f"{self.block_size} bytes), got {eval_subset}")
        n_windows = min(eval_subset or self.eval_windows, available)
        if n_windows < 1:  # the whole corpus read: only a shorter block helps (a review)
            fix = ("use a larger --subset" if subset is not None and len(corpus) >= subset
                   else f"use a block_size of at most {len(self.val_data) - 1} (--model-arg block_size=N)")
            raise ValueError(
                f"the validation split ({len(self.val_data)} bytes) is shorter than one "
                f"block of {self.block_size} bytes and its next-byte targets; {fix}"
            )
        t = n_windows * self.block_size
        self.x_eval = self.val_data[:t].long().view(n_windows, self.block_size)  # (W, T)
        self.y_eval = self.val_data[1 : t + 1].long().view(n_windows, self.block_size)  # (W, T)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.n_steps

    def train_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
        for _ in range(self.n_steps):
            yield D.text_batches(self.train_data, self.block_size, batch_size, generator)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch  # (B, T), (B, T)
        return model(x, y)[1]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batch_size: int = 16) -> dict[str, float]:
        was_training = model.training
        model.eval()
        total = 0.0
        for xb, yb in D.iterate_batches(self.x_eval, self.y_eval, batch_size, False, None):
            total += float(model(xb, yb)[1]) * yb.numel()
        model.train(was_training)
        val_loss = total / self.y_eval.numel()
        return {"val_loss": val_loss, "bpb": val_loss / math.log(2)}

    def fixed_batch(self, size: int) -> Batch:
        return D.text_batches(
            self.train_data, self.block_size, size, torch.Generator().manual_seed(0)
        )


TASK_CLASSES: dict[str, type[Task]] = {
    "digits": DigitsTask,
    "fashion-mnist": FashionMNISTTask,
    "text": TextTask,
}


def make_task(
    task: str,
    model: str | None = None,
    *,
    subset: int | None = None,
    eval_subset: int | None = None,
    steps_per_epoch: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Task:
    """Build task ``task`` (one of :data:`TASKS`) with ``model`` (``DEFAULT_MODEL`` if None)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")
    model = model or DEFAULT_MODEL[task]
    if model not in MODELS[task]:
        raise ValueError(
            f"unknown model {model!r} for task {task!r}; allowed: {', '.join(MODELS[task])}"
        )
    common = {"subset": subset, "eval_subset": eval_subset, "model_kwargs": model_kwargs}
    if task == "text":
        return TextTask(model, steps_per_epoch=steps_per_epoch, **common)
    if steps_per_epoch is not None:
        raise ValueError("steps_per_epoch applies to the text task only (images use full epochs)")
    if task == "digits":
        return DigitsTask(model, **common)
    return FashionMNISTTask(model, **common)


__all__ = [
    "TASKS",
    "TASK_CLASSES",
    "Batch",
    "DigitsTask",
    "FashionMNISTTask",
    "ImageTask",
    "Task",
    "TextTask",
    "make_task",
]
