"""``lowbit sweep``: run a grid of tasks × models × recipes × seeds, one run at a time.

    lowbit sweep --tasks digits --recipes fp,qat-8,fqt-psq-8 --seeds 0,1 --epochs 10 \\
        --out results/

Each run goes to ``OUT/{task}-{model}-{recipe}[-giB-gwB]-s{seed}``. A run whose
``metrics.json`` already holds all its epochs is skipped; a run with a checkpoint is
resumed; a run that diverges is recorded (``status.json``) and the sweep goes on; a run
another process is training (its folder's ``.lock``) is skipped, so several sweeps over
one grid share its runs (two 1-thread sweeps on 2 cores, say).
Checkpoints (``*.pt``) are git-ignored; the metric files are small enough to commit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .models import MODELS
from .tasks import TASKS
from .train import (
    add_training_arguments,
    check_out_dir,
    make_config,
    parse_list,
    parse_recipes,
    parse_seed,
    set_threads,
    training_fields,
)
from .rundir import RunBusy
from .trainer import TrainConfig, TrainingDiverged, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--tasks", default="digits", help=f"comma list of tasks: {', '.join(TASKS)}")
    add("--models", help="comma list of models (default: each task's default); a model is "
        "used for the tasks that have it")  # fmt: skip
    add("--recipes", default="fp,qat-8,fqt-psq-8", help="comma list of recipes")
    add("--seeds", default="0", help="comma list of seeds (default 0)")
    add("--out", default="results", help="folder holding one folder per run (default results)")
    add("--dry-run", action="store_true", help="list the runs and their state, train nothing")
    add_training_arguments(parser)


def grid(args: argparse.Namespace) -> list[TrainConfig]:
    """The runs of the sweep, each a validated TrainConfig (out = its run folder)."""
    tasks = parse_list("--tasks", args.tasks)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"--tasks: unknown task {t!r}; allowed: {', '.join(TASKS)}")
    models = parse_list("--models", args.models) if args.models else None
    if models:
        known = {m for t in tasks for m in MODELS[t]}
        unknown = [m for m in models if m not in known]
        if unknown:
            raise ValueError(f"--models: {unknown[0]!r} is not a model of {', '.join(tasks)}; "
                             f"allowed: {', '.join(sorted(known))}")  # fmt: skip
    seeds = [parse_seed("--seeds", s) for s in parse_list("--seeds", args.seeds)]
    recipes = parse_recipes("--recipes", args.recipes)
    common = training_fields(args)
    configs = []
    for seed in seeds:  # seeds outermost: a sweep cut short still covers every recipe once
        for task in tasks:
            for model in [m for m in models if m in MODELS[task]] if models else [None]:
                for recipe in recipes:
                    fields = dict(common, task=task, model=model, recipe=recipe, seed=seed)
                    if not recipe.startswith("fqt-"):  # gradient bits apply to fqt-* only
                        fields.update(grad_input_bits=None, grad_weight_bits=None)
                    cfg = make_config(fields)
                    cfg.out = str(Path(args.out) / cfg.run_name())
                    configs.append(cfg)
    return configs


def run_state(cfg: TrainConfig) -> str:
    """``done`` (all epochs in metrics.json), ``diverged``, ``partial`` or ``new``."""
    run_dir = Path(cfg.out)
    status_file, metrics_file = run_dir / "status.json", run_dir / "metrics.json"
    if status_file.exists() and json.loads(status_file.read_text())["status"] == "diverged":
        return "diverged"
    if metrics_file.exists():
        rows = json.loads(metrics_file.read_text())
        if rows and rows[-1]["epoch"] >= cfg.epochs:
            return "done"
    return "partial" if (run_dir / "last.pt").exists() or (run_dir / "prev.pt").exists() else "new"


def run(args: argparse.Namespace) -> int:
    check_out_dir("--out", args.out)
    configs = grid(args)
    set_threads(args.threads)
    states = [run_state(cfg) for cfg in configs]
    print(f"sweep: {len(configs)} runs -> {args.out} ("
          + ", ".join(f"{states.count(s)} {s}" for s in ("done", "partial", "diverged", "new")
                      if s in states) + ")")  # fmt: skip
    if args.dry_run:
        for cfg, state in zip(configs, states):
            print(f"  {state:8s} {cfg.out}")
        return 0
    diverged = []
    for i, cfg in enumerate(configs, 1):
        state = run_state(cfg)  # now, not at the start: another sweep may have run it since
        if state in ("done", "diverged"):
            print(f"[{i}/{len(configs)}] {cfg.run_name()}: {state}, skipped")
            if state == "diverged":
                diverged.append(cfg.run_name())
            continue
        print(f"[{i}/{len(configs)}] {cfg.run_name()}: {'resuming' if state == 'partial' else 'start'}",
              flush=True)  # fmt: skip
        t0 = time.perf_counter()
        try:
            # resume=True also when it was new: without a checkpoint it starts fresh, and a
            # run another sweep finished meanwhile is returned as it is, not retrained
            result = train(cfg, resume=True, progress=not args.no_progress,
                           monitor_requested=args.monitor_every is not None)
        except TrainingDiverged as exc:
            print(f"[{i}/{len(configs)}] {cfg.run_name()}: {exc}", flush=True)
            diverged.append(cfg.run_name())
            continue
        except RunBusy as exc:  # another sweep (or lowbit train) has it: go on with the rest
            print(f"[{i}/{len(configs)}] {cfg.run_name()}: skipped, {exc}", flush=True)
            continue
        last = result.history[-1]
        shown = ", ".join(f"{k} {last[k]:.4f}" for k in ("accuracy", "bpb") if k in last)
        print(f"[{i}/{len(configs)}] {cfg.run_name()}: {shown} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    if diverged:
        print(f"sweep: {len(diverged)} run(s) diverged: {', '.join(diverged)}")
    return 0
