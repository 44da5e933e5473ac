"""``lowbit demo``: a few minutes on a CPU that show what FQT does.

Trains the same digits model from the same initial weights with full precision, QAT and
FQT at 8 and 4 gradient bits with per-tensor (PTQ), per-sample (PSQ) and block
Householder (BHQ) gradient quantizers, then prints one table: final validation accuracy
and loss, the quantization variance of the gradient (``E‖g_FQT − g_QAT‖²`` on a fixed
batch of the trained model, summed over parameters) and the median time per step.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lowbit.analysis import quantization_variance
from lowbit.experiments.train import (check_named, check_out_dir, make_config, parse_int, parse_recipes, parse_seed,
                                     set_threads)
from lowbit.experiments.trainer import train

RECIPES = ("fp", "qat-8", "fqt-ptq-8", "fqt-psq-8", "fqt-bhq-8", "fqt-ptq-4", "fqt-psq-4",
           "fqt-bhq-4")  # fmt: skip
DEFAULT_EPOCHS = 8
VARIANCE_BATCH = 256  # first training images, the same batch for every recipe
VARIANCE_REPEATS = 16


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--epochs", default=str(DEFAULT_EPOCHS), help=f"epochs per recipe ({DEFAULT_EPOCHS})")
    add("--model", default="cnn", help="digits model: cnn or mlp (default cnn)")
    add("--seed", default="0", help="seed of the weights, data order and SR noise (default 0)")
    add("--out", help="keep the run folders here (default: a temporary folder)")
    add("--threads", default="1", help="CPU threads for torch (default 1: the models are tiny)")
    add("--recipes", default=",".join(RECIPES), help="comma list of recipes (default: all eight)")
    add("--progress", action="store_true", help="show a progress bar per run")


def run(args: argparse.Namespace) -> int:
    epochs, seed = parse_int("--epochs", args.epochs), parse_seed("--seed", args.seed)
    # Validate everything before the first run starts.
    configs = [
        make_config({"task": "digits", "model": args.model, "recipe": r, "epochs": epochs,
                     "seed": seed})
        for r in parse_recipes("--recipes", args.recipes)
    ]  # fmt: skip
    check_named("--out", args.out, "folder")
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
        root = Path(check_out_dir("--out", args.out) if args.out else tmp)
        where = (f"runs in {root}" if args.out else "runs in a temporary folder, removed at the "
                 "end (--out keeps them)")
        print(f"lowbit demo: digits {args.model}, {epochs} epoch{'s' * (epochs != 1)}, seed {seed}; {where}")
        t_start = time.perf_counter()
        width = max(10, *(len(c.recipe) for c in configs))  # the recipe column fits the longest name
        rows = []
        for cfg in configs:
            cfg.out = str(root / cfg.run_name())
            result = train(cfg, resume=args.out is not None, progress=args.progress)
            last = result.history[-1]
            variance = None
            if cfg.fqt_config().is_fqt:
                batch = result.task.fixed_batch(VARIANCE_BATCH)
                stats = quantization_variance(
                    result.model, result.task.loss, batch, VARIANCE_REPEATS
                )
                variance = stats["total"]
            rows.append((cfg.recipe, last["accuracy"], last["val_loss"], variance, last["step_time_ms"],
                         _nearest_gradients(cfg.fqt_config())))  # fmt: skip
            print(f"  {cfg.recipe:{width}s} done: accuracy {100 * last['accuracy']:.2f}%", flush=True)
        wall = time.perf_counter() - t_start

    print()
    print(f"| {'recipe':{width}s} | val accuracy | val loss | grad quantization variance | step (ms) |")
    print(f"|{'-' * (width + 2)}|--------------|----------|----------------------------|-----------|")
    marked = any(r[5] and r[3] is not None for r in rows)
    for recipe, acc, loss, var, ms, biased in rows:
        shown = ("-" if var is None else f"{var:.3e}") + (" *" if biased and var is not None else "  " if marked else "")
        print(f"| {recipe:{width}s} | {100 * acc:11.2f}% | {loss:8.4f} | {shown:>26s} | {ms:9.1f} |")
    print()
    print(f"variance: E||g_FQT - g_QAT||^2 summed over parameters, one fixed batch of "
          f"{VARIANCE_BATCH} training images, {VARIANCE_REPEATS} repeats; step: median of the "
          f"last epoch. Wall time {wall:.0f} s.")  # fmt: skip
    if marked:
        print("*: round-to-nearest gradients (biased): that mean squared error is mostly the "
              "squared bias, not rounding variance.")
    return 0


def _nearest_gradients(config: object) -> bool:
    """Whether a recipe rounds a gradient to nearest (``fp8-*``: biased), so that its
    E‖g_FQT − g_QAT‖² is mostly bias², not variance."""
    from lowbit.formats import Rounding

    return any(spec is not None and spec.rounding is Rounding.NEAREST
               for spec in (getattr(config, "grad_input", None), getattr(config, "grad_weight", None)))
