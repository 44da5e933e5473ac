"""``lowbit coverage``: which GEMMs of one training step run low-bit.

    lowbit coverage --task text --model gpt --recipe fqt-psq-8
    lowbit coverage --task fashion-mnist --recipe fqt-bhq-4 --backend reference --by type

Builds the task's model (seeded), converts it with the recipe, runs one training step on
a synthetic batch of the task's shape — coverage depends on shapes and the recipe, not on
the data, so no dataset is loaded — and prints :func:`lowbit.coverage`'s table. A bad
value exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import ADAPTIVE_RECIPES, FQTConfig, backend_names, recipe_families
from lowbit.coverage import coverage
from lowbit.experiments.models import DEFAULT_MODEL, MODELS, build_model
from lowbit.experiments.rundir import write_atomic
from lowbit.experiments.tasks import TASK_CLASSES, TASKS
from lowbit.jsonfile import dumps
from lowbit.ops import AdaptiveRecipeWarning
from lowbit.experiments.trainer import convert_or_refuse
from lowbit.experiments.train import (
    MODEL_ARG_HELP,
    check_out_file,
    parse_int,
    parse_model_args,
    parse_seed,
    set_threads,
)

from ..noise import torch_seed

IMAGE_SIZE = {"digits": 8, "fashion-mnist": 28}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--task", default="digits", help=f"one of {', '.join(TASKS)} (default digits)")
    add("--model", help="per task: " + "; ".join(f"{t}: {', '.join(m)}" for t, m in MODELS.items()))
    add("--recipe", default="fqt-psq-8", help=f"{recipe_families()} (default fqt-psq-8)")
    add("--backend", default="auto", help=f"GEMM kernels: {backend_names()} (default auto)")
    add("--batch-size", help="batch size (default: the task's: digits 64, fashion-mnist 128, text 32)")
    add("--model-arg", action="append", default=[], metavar="KEY=VALUE", help=MODEL_ARG_HELP)
    add("--by", default="module", help="table rows per module (default) or per module type")
    add("--seed", default="0", help="seed of the weights, the batch and the SR noise (default 0)")
    add("--json", help="also write the report's numbers (report.to_dict()) to this file")
    add("--threads", help="CPU threads for torch (default: torch's choice)")


def synthetic_batch(task: str, model: nn.Module, batch_size: int,
                    generator: torch.Generator) -> tuple[tuple[torch.Tensor, ...], Any]:
    """``(inputs, loss_fn)`` of one training step of ``task``: random images with random
    labels and cross-entropy, or random byte windows of the model's block size with the
    model's own next-byte loss (``loss_fn=None``)."""
    if task == "text":
        t = int(getattr(model, "block_size", 128))
        x = torch.randint(0, 256, (batch_size, t), generator=generator)  # (B, T)
        return (x, torch.roll(x, -1, dims=1)), None
    size = IMAGE_SIZE[task]
    x = torch.randn(batch_size, 1, size, size, generator=generator)  # (B, 1, H, W)
    y = torch.randint(0, 10, (batch_size,), generator=generator)  # (B,)
    return (x,), lambda logits: F.cross_entropy(logits.float(), y)


def run(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    name = args.model or DEFAULT_MODEL[args.task]
    if name not in MODELS[args.task]:
        raise ValueError(f"--model for task {args.task} must be one of "
                         f"{', '.join(MODELS[args.task])}, got {name!r}")
    if args.by not in ("module", "type"):
        raise ValueError(f"--by must be module or type, got {args.by!r}")
    if args.json:
        check_out_file("--json", args.json)  # before the step, not after it
    seed = parse_seed("--seed", args.seed)
    batch = parse_int("--batch-size", args.batch_size)
    if batch is None:
        batch = TASK_CLASSES[args.task].default_batch_size
    if batch < 1:
        raise ValueError(f"--batch-size must be a positive integer, got {batch}")
    config = FQTConfig.from_recipe(args.recipe, backend=args.backend, seed=seed)
    model_kwargs = parse_model_args(args.model_arg)
    set_threads(args.threads)
    torch.manual_seed(torch_seed(seed))
    try:
        model = build_model(args.task, name, **model_kwargs)
    except TypeError as exc:  # an unknown keyword in --model-arg
        raise ValueError(f"--model-arg: {exc}") from None
    convert_or_refuse(model, config)  # a backend that cannot run its GEMMs: one line (a new user)
    inputs, loss_fn = synthetic_batch(args.task, model, batch, torch.Generator().manual_seed(torch_seed(seed)))
    with warnings.catch_warnings():  # no policy to attach here: the note below says so once
        warnings.simplefilter("ignore", AdaptiveRecipeWarning)  # (a new user: one warning per layer)
        report = coverage(model, *inputs, loss_fn=loss_fn)
    print(f"lowbit coverage: task {args.task}, model {name}, recipe {args.recipe} "
          f"(backend {args.backend}), batch {batch}, synthetic data")
    if args.recipe in ADAPTIVE_RECIPES:
        print(f"{args.recipe} changes its gradient widths as it trains (`lowbit train` attaches its "
              "policy); the table shows its starting widths")
    print(report.table(by=args.by))
    if args.json:
        write_atomic(Path(args.json), dumps(report.to_dict(), indent=1) + "\n")
    return 0
