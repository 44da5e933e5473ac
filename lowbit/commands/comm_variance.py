"""``lowbit comm-variance``: the variance that quantized gradient communication adds to a
data-parallel step, beside the minibatch and GEMM-quantization variance.

    lowbit comm-variance --task fashion-mnist --recipe fqt-psq-8 --world-size 2 \\
        --grad-comm fp32,int8,int4 --batches 8 --repeats 4 --train-steps 100 --out runs/cv

Builds the task's model (seeded), converts it with ``--recipe``, trains it for
``--train-steps`` QAT steps (so the gradients look like mid-training ones: SGD with
momentum for images, AdamW for text, the task's learning rate), draws ``--batches``
global minibatches of ``--batch-size`` from the task's training stream, then for each
``--grad-comm`` runs :func:`lowbit.analysis.gradient_variance` with ``world_size`` ranks
(each batch split ``r::N``, as the trainer does). Writes ``comm_variance.json`` (the
arguments, the warm-up losses and, per communication, the report of
:meth:`~lowbit.analysis.VarianceReport.to_dict` and the bytes one rank sends per step)
and ``summary.md`` (the ``total`` group of each run); prints the table.
"""

from __future__ import annotations

import argparse
import itertools
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from lowbit.analysis import gradient_variance, with_config
from lowbit.analysis.variance import VarianceReport, qat_of
from lowbit.config import ADAPTIVE_RECIPES, RECIPES, FQTConfig
from lowbit.distributed import GRAD_COMM_NAMES, GradComm, step_bytes
from lowbit.experiments.models import DEFAULT_MODEL, MODELS
from lowbit.experiments.rundir import write_atomic
from lowbit.experiments.tasks import TASKS, Task, make_task
from lowbit.experiments.train import check_out_dir, parse_int, parse_list, parse_seed, set_threads
from lowbit.nn import convert

from ..noise import torch_seed
from .variance_data import describe_warmup, loss_trend
from lowbit.jsonfile import dumps

DEFAULT_BATCH_SIZE = {"digits": 64, "fashion-mnist": 64, "text": 16}
RESULTS = ("comm_variance.json", "summary.md")  # what a run writes into --out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--task", required=True, help=f"one of {', '.join(TASKS)}")
    add("--model", help="model for the task (default: the task's default)")
    add("--recipe", default="fqt-psq-8", help="the GEMM recipe (default fqt-psq-8)")
    add("--grad-comm", default="fp32,int8", help="comma-separated, each fp32 or int2..int8")
    add("--world-size", default="2", help="simulated data-parallel ranks ≥ 2 (default 2)")
    add("--batches", default="8", help="global minibatches (≥ 3, default 8)")
    add("--batch-size", help="global batch (default: 64 images, 16 text windows)")
    add("--repeats", default="4", help="FQT draws per minibatch (≥ 2, default 4)")
    add("--train-steps", default="100", help="QAT warm-up steps (default 100)")
    add("--subset", help="training images / text bytes to load (default: the task's)")
    add("--seed", default="0", help="seed of the weights, the batches and all noise")
    add("--threads", help="CPU threads for torch")
    add("--out", required=True, help="output folder (one holding an earlier comm_variance.json "
        "is refused unless --overwrite)")
    add("--overwrite", action="store_true", help="replace the results an earlier run left in --out")


def _at_least(option: str, text: str | None, low: int) -> int:
    value = parse_int(option, text)
    if value is None or value < low:
        raise ValueError(f"{option} must be an integer ≥ {low}, got {text!r}")
    return value


def _warmup(model: torch.nn.Module, task: Task, steps: int, batch_size: int,
            gen: torch.Generator) -> dict:
    """``steps`` QAT steps; the mean loss of the first and last 10."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=task.default_lr, momentum=0.9)
           if task.optimizer == "sgd" else torch.optim.AdamW(params, lr=task.default_lr))
    losses: list[float] = []
    with with_config(model, qat_of):
        while len(losses) < steps:
            for batch in task.train_batches(batch_size, gen):
                if len(losses) == steps:
                    break
                opt.zero_grad(set_to_none=True)
                loss = task.loss(model, batch)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
    model.zero_grad(set_to_none=True)
    return {"steps": len(losses), **loss_trend(losses)}


def _row(name: str, rep: VarianceReport, sent: float, fp32: float) -> str:
    g = rep.groups["total"]
    comm = "–" if math.isnan(g.comm) else f"{g.comm:.4g} ± {g.comm_se:.2g}"
    exact = "–" if math.isnan(g.comm_expected) else f"{g.comm_expected:.4g}"
    return (f"| {name} | {g.sgd:.4g} | {g.quant:.4g} | {comm} | {exact} | {g.total:.4g} | "
            f"{g.gap:+.2g} ± {g.gap_se:.2g} | {g.max_abs_z:.2f} | {sent:,.0f} "
            f"({fp32 / sent:.2f}×) |")


def run(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    model_name = args.model or DEFAULT_MODEL[args.task]
    if model_name not in MODELS[args.task]:
        raise ValueError(f"--model must be one of {', '.join(MODELS[args.task])}, got {model_name!r}")
    if args.recipe not in RECIPES:
        raise ValueError(f"--recipe must be a named recipe (fqt-psq-8, ...), got {args.recipe!r}")
    if args.recipe in ADAPTIVE_RECIPES:  # it failed later with a message about QAT configs (a new user)
        raise ValueError(f"--recipe {args.recipe}: an adaptive recipe's widths come from the variance "
                         "monitor while `lowbit train` runs; comm-variance measures a fixed recipe "
                         "(fqt-psq-8, fqt-psq-4, ...)")
    comms = parse_list("--grad-comm", args.grad_comm)  # empty items refused, repeats measured once
    for c in comms:
        if c not in GRAD_COMM_NAMES:
            raise ValueError(f"--grad-comm values must be in {', '.join(GRAD_COMM_NAMES)}, got {c!r}")
    world = _at_least("--world-size", args.world_size, 2)
    n_batches = _at_least("--batches", args.batches, 3)
    repeats = _at_least("--repeats", args.repeats, 2)
    steps = _at_least("--train-steps", args.train_steps, 0)
    seed = parse_seed("--seed", args.seed)
    batch_size = _at_least("--batch-size", args.batch_size or str(DEFAULT_BATCH_SIZE[args.task]),
                           world)
    if batch_size % world:
        raise ValueError(f"--batch-size ({batch_size}) must be a multiple of --world-size ({world})")
    subset = None if args.subset is None else _at_least("--subset", args.subset, 1)
    out = Path(check_out_dir("--out", args.out, RESULTS, args.overwrite))
    set_threads(args.threads)
    cfg = FQTConfig.from_recipe(args.recipe, seed=seed)
    if not cfg.is_fqt:
        raise ValueError(f"--recipe must quantize gradients (fqt-*), got {args.recipe!r}")

    t0 = time.perf_counter()
    task = make_task(args.task, model_name, subset=subset)
    try:
        task.steps_per_epoch(batch_size)
    except ValueError as e:
        raise ValueError(f"--batch-size {batch_size}: {e} loaded (raise --subset or lower --batch-size)") from None
    out.mkdir(parents=True, exist_ok=True)  # before the measurement, which a failure here would lose
    torch.manual_seed(torch_seed(seed))
    model = convert(task.build_model(), cfg)
    model.train()
    gen = torch.Generator().manual_seed(torch_seed(seed))
    warm = _warmup(model, task, steps, batch_size, gen)
    batches: list = []
    while len(batches) < n_batches:  # a fresh pass over the data when one runs out
        batches += itertools.islice(task.train_batches(batch_size, gen), n_batches - len(batches))
    numels = [p.numel() for p in model.parameters() if p.requires_grad]
    fp32 = step_bytes(None, numels, world)
    runs, rows = [], []
    for i, name in enumerate(comms):
        comm = GradComm.from_name(name, seed=seed)
        if not sys.stderr.isatty():  # no progress bar there: one line per communication scheme
            print(f"lowbit comm-variance: [{i + 1}/{len(comms)}] {name}: {n_batches} batches × {repeats} draws ...",
                  file=sys.stderr, flush=True)
        t = time.perf_counter()
        rep = gradient_variance(model, task.loss, batches, repeats=repeats, world_size=world,
                                comm=comm, seed=seed, progress=sys.stderr.isatty())
        sent = step_bytes(comm, numels, world)
        runs.append({"grad_comm": name, "bytes_per_step": sent, "bytes_fp32_per_step": fp32,
                     "seconds": time.perf_counter() - t, "report": rep.to_dict()})
        rows.append(_row(name, rep, sent, fp32))
    header = (f"{args.task} ({model_name}), {args.recipe}, {world} ranks, {n_batches} global "
              f"batches of {batch_size}, {repeats} draws each, after {describe_warmup(warm)}; "
              "variances of the "
              "whole gradient (trace), bytes one rank sends per step\n\n"
              "| grad comm | sgd | GEMM quant | comm (measured) | comm (exact) | total | "
              "gap = total − sum | max abs z | bytes/step (vs fp32) |\n"
              "|---|---|---|---|---|---|---|---|---|\n")
    table = header + "\n".join(rows) + "\n"
    write_atomic(out / "comm_variance.json", dumps({
        "command": shlex.join(["lowbit", *sys.argv[1:]]), "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "data": getattr(task, "source", None),  # which copy of the data (config.json's "data")
        "warmup": warm, "runs": runs, "seconds": time.perf_counter() - t0,
        "torch": torch.__version__, "threads": torch.get_num_threads()}, indent=1, default=str) + "\n")
    write_atomic(out / "summary.md", table)
    print(table)
    return 0
