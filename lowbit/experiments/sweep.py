"""``lowbit sweep``: run a grid of tasks × models × recipes × seeds, one run at a time.

    lowbit sweep --tasks digits --recipes fp,qat-8,fqt-psq-8 --seeds 0,1 --epochs 10 \\
        --out results/

Each run goes to ``OUT/{task}-{model}-{recipe}[-giB-gwB]-s{seed}``. A run whose
``metrics.json`` already holds all its epochs is skipped; a run with a checkpoint is
resumed; a folder holding a run of other settings (another ``--epochs``, learning rate,
batch size, model, backend, …: :func:`settings_diff`) is skipped with the differences
named, and the sweep goes on (the learning-rate schedule spans all epochs: a run is never
extended); a run that diverges is recorded (``status.json``) and the sweep goes on; a run
another process is training (its folder's lock, :func:`~.rundir.run_lock`) is skipped and
tried once more at the end, so several sweeps over one grid share its runs (two 1-thread
sweeps on 2 cores, say); the last lines name the runs that diverged or stayed held.
Checkpoints (``*.pt``) are git-ignored; the metric files are small enough to commit.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .models import DEFAULT_MODEL, MODEL_ARGS, MODELS, build_model, check_model_args
from .tasks import TASKS, make_task
from .train import (
    _as_option,
    add_training_arguments,
    check_out_dir,
    make_config,
    parse_list,
    parse_recipes,
    parse_seed,
    set_malloc,
    set_threads,
    training_fields,
)
from ..distributed import init_process_group_from_env
from .checkpoint import CheckpointError
from .rundir import DataMismatch, RunBusy, is_busy, read_config, recipe_refusal, run_lock
from .runconfig import RECIPE_OVERRIDES, changed_settings, launched_world_size, override_refused
from .trainer import TrainConfig, TrainingDiverged, remove_if_unused, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--tasks", default="digits", help=f"comma list of tasks: {', '.join(TASKS)} (default digits)")
    add("--models", help="comma list of models (default: each task's default); a model is "
        "used for the tasks that have it")  # fmt: skip
    add("--recipes", default="fp,qat-8,fqt-psq-8", help="comma list of recipes (default fp,qat-8,fqt-psq-8)")
    add("--seeds", default="0", help="comma list of seeds (default 0)")
    add("--out", required=True, help="folder holding one folder per run (this repository's study: results)")
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
        bare = [t for t in tasks if not any(m in MODELS[t] for m in models)]
        if bare:  # it had no run at all, silently
            raise ValueError(f"--models: none of {', '.join(models)} is a model of task {bare[0]!r} "
                             f"(its models: {', '.join(MODELS[bare[0]])}); drop the task or add one")
    seeds = list(dict.fromkeys(parse_seed("--seeds", s) for s in parse_list("--seeds", args.seeds)))
    # (once each: 0, 00 and +0 are one seed — a review counted 3 runs and trained one)
    recipes = parse_recipes("--recipes", args.recipes)
    common = training_fields(args)
    _recipe_overrides(common, recipes)
    _task_overrides(common, tasks)
    pairs = [(t, m or DEFAULT_MODEL[t]) for t in tasks
             for m in ([m for m in models if m in MODELS[t]] if models else [None])]
    _model_arg_overrides(common.get("model_kwargs") or {}, pairs)
    configs = []
    for seed in seeds:  # seeds outermost: a sweep cut short still covers every recipe once
        for task in tasks:
            for model in [m for m in models if m in MODELS[task]] if models else [None]:
                for recipe in recipes:
                    fields = dict(common, task=task, model=model, recipe=recipe, seed=seed)
                    for name in RECIPE_OVERRIDES:  # each run gets the settings that fit it
                        if override_refused(name, recipe):
                            fields[name] = None
                    for name, only in TASK_OVERRIDES.items():
                        if task != only:
                            fields[name] = None
                    if fields.get("model_kwargs"):  # the model arguments this run's model has
                        allowed = MODEL_ARGS[task][model or DEFAULT_MODEL[task]]
                        fields["model_kwargs"] = {k: v for k, v in fields["model_kwargs"].items() if k in allowed}
                    cfg = make_config(fields)  # (its errors name torchrun's option under a launch: _as_option)
                    cfg.out = str(Path(args.out) / cfg.run_name())
                    configs.append(cfg)
    return configs


# task-specific settings: the one task each applies to
TASK_OVERRIDES = {"steps_per_epoch": "text"}


def _task_overrides(common: dict, tasks: list[str]) -> None:
    """Task-specific settings (``--steps-per-epoch``: text) go to the runs of their task and
    are left out of the others, with a line naming those (a trial: a sweep over digits and
    text refused ``--steps-per-epoch``); ``ValueError`` where none of ``tasks`` is theirs."""
    for name, only in TASK_OVERRIDES.items():
        if common.get(name) is None:
            continue
        option = "--" + name.replace("_", "-")
        if only not in tasks:
            raise ValueError(f"{option} applies to the {only} task only, and --tasks is {','.join(tasks)}")
        others = [t for t in tasks if t != only]
        if others:
            _say(f"sweep: {option} {common[name]} is not used by {', '.join(others)} "
                 f"(it applies to the {only} task only)", flush=True)


def _model_arg_overrides(kwargs: dict, pairs: list[tuple[str, str]]) -> None:
    """``--model-arg`` NAME=VALUE goes to the runs whose model has NAME and is left out of
    the others, with a line naming those (a review: ``--tasks digits,text --model-arg
    n_layer=2`` was refused for the MLP); ``ValueError`` where no model of the sweep has it."""
    for key in kwargs:
        without = [f"{m} ({t})" for t, m in pairs if key not in MODEL_ARGS[t][m]]
        if len(without) == len(pairs):
            if len(pairs) == 1:  # train's words
                check_model_args(*pairs[0], {key: kwargs[key]}, "--model-arg ")
            raise ValueError(f"--model-arg {key} is an argument of none of the sweep's models: " + "; ".join(
                f"{m} ({t}) takes {', '.join(MODEL_ARGS[t][m])}" for t, m in pairs))
        if without:
            _say(f"sweep: --model-arg {key}={kwargs[key]} is not used by {', '.join(without)} "
                 "(not an argument of their model)", flush=True)


def _recipe_overrides(common: dict, recipes: list[str]) -> None:
    """Recipe-specific settings (``--grad-input-bits``, ``--grad-weight-bits``,
    ``--range-margin``) go to the recipes they fit and are left out of the others, with a
    line naming those (a mixed grid is the point of a sweep); ``ValueError`` where one fits
    none of ``recipes`` (it would be dropped from every run)."""
    for name in RECIPE_OVERRIDES:
        if common.get(name) is None:
            continue
        refused = {r: override_refused(name, r) for r in recipes}
        option = "--" + name.replace("_", "-")
        if all(refused.values()):
            raise ValueError(f"{option} applies to none of --recipes: {refused[recipes[0]]}")
        skipped = [r for r, why in refused.items() if why]
        if skipped:
            _say(f"sweep: {option} {common[name]} is not used by {', '.join(skipped)} "
                  f"({refused[skipped[0]]})", flush=True)


def settings_diff(cfg: TrainConfig) -> list[str]:
    """``"field (saved, now requested)"`` for every setting in which the run its folder
    holds differs from ``cfg`` — all of :class:`TrainConfig` but the fields a resumed run
    may change (:data:`~.runconfig.RESUMABLE_CHANGES`); empty where they agree or the
    folder has neither a ``config.json`` nor a ``metrics.json``. (A review found a sweep
    that compared ``epochs`` only and reported runs of another learning rate, batch size,
    model or backend as done.) A folder with a ``metrics.json`` but no readable
    ``config.json``, or a ``config.json`` without lowbit's ``train`` record, differs by
    that; with the same settings, a resolved quantization config other than today's
    (:func:`~.rundir.recipe_refusal`: another version's) is a difference too."""
    record = read_config(Path(cfg.out))
    saved = record.get("train") if isinstance(record.get("train"), dict) else None
    if saved is None and (Path(cfg.out) / "metrics.json").exists():
        # a metrics file with no readable settings: they cannot be checked, so the folder
        # is neither done nor resumable (a review: a 5-epoch run without its config.json
        # was "done" for a 3-epoch sweep)
        return ["config.json (missing or unreadable beside metrics.json: the settings cannot be checked)"]
    if saved is None and (Path(cfg.out) / "config.json").exists():
        # another program's file, or a damaged one: the trainer refuses to write over it
        # (a review: --dry-run listed such a folder as new and exited 0, the sweep exited 1)
        return ["config.json (not a lowbit run's record: no readable 'train' settings)"]
    if saved is None:
        return []
    diff = changed_settings(saved, cfg)
    # with the same settings, a recorded config other than today's comes from the version;
    # with other settings it differs through them (a trial: --backend alone was reported as
    # "recorded by another version" too)
    if not diff and recipe_refusal(Path(cfg.out), record.get("fqt"), cfg):
        diff.append(f"the quantization config {cfg.recipe} resolves to (recorded by another version)")
    return diff


def run_state(cfg: TrainConfig) -> str:
    """``done`` (all epochs in metrics.json and status ``done``), ``diverged``, ``other``
    (the folder holds a run of other settings, :func:`settings_diff` — another length among
    them: its schedule spans its own epochs — so it is neither done nor resumable), ``busy``
    (another process holds its folder's lock now), ``partial`` (a checkpoint to resume),
    ``restart`` (epochs recorded but no checkpoint — a committed run folder keeps its
    metrics, not its ``*.pt`` —: the run is redone from its start) or ``new``."""
    run_dir = Path(cfg.out)
    if settings_diff(cfg):
        return "other"
    status_file, metrics_file = run_dir / "status.json", run_dir / "metrics.json"
    try:
        status = json.loads(status_file.read_text())["status"] if status_file.exists() else None
        rows = json.loads(metrics_file.read_text()) if metrics_file.exists() else []
        finished = bool(rows) and rows[-1]["epoch"] >= cfg.epochs
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{run_dir}: its status.json or metrics.json is not readable "
                         f"({type(exc).__name__}: {exc}); repair or remove the folder") from None
    if status == "diverged":
        return "diverged"
    if finished and status == "done":  # all epochs but another status: killed before its last
        return "done"  # write (lowbit report does not count it either): resumed below
    if is_busy(run_dir):
        return "busy"
    if (run_dir / "last.pt").exists() or (run_dir / "prev.pt").exists():
        return "partial"
    return "restart" if rows else "new"  # epochs recorded, no checkpoint (not committed): redo


def _rank() -> int:
    """This process's rank in the sweep's process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _say(*args: object, **kwargs: object) -> None:
    """``print`` on the launch's rank 0 only (the process group's rank, else torchrun's
    ``RANK``): the grid's listing, each run's status and result are the same on every rank
    (a review: under torchrun every line came once per rank). A run's error is printed by
    every rank (``print``): it may be one rank's; a run busy or diverged is decided alike on
    every rank (rank 0's state, the all-reduced loss) and said once."""
    if launched_world_size() <= 1 or _rank_of_launch() == 0:  # a leftover RANK alone is no launch
        print(*args, **kwargs)


def _rank_of_launch() -> int:
    """The process group's rank, else torchrun's ``RANK`` (0 where unset or not a number)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def _agreed_state(cfg: TrainConfig) -> str:
    """:func:`run_state`, decided by rank 0 and the same on every rank under torchrun (its
    refusal too): each rank reading the folder itself raced rank 0's lock — a review found
    rank 1 seeing "busy" and starting anew a run rank 0 resumed, and the job hung."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return run_state(cfg)
    box: list = [None]
    if _rank() == 0:
        try:
            box = [("state", run_state(cfg))]
        except ValueError as exc:
            box = [("refused", str(exc))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "refused":
        raise ValueError(value)
    return value


@contextlib.contextmanager
def _removed_if_unused(run_dir: Path, created: bool):  # noqa: ANN202
    """On leaving, the run folder this sweep made removed where nothing but its lock was
    written into it (a run refused before its first file left a folder holding only
    ``.lock``: a review; :func:`~.trainer.remove_if_unused`)."""
    try:
        yield
    finally:
        if created:
            remove_if_unused(run_dir)


def _run_one(cfg: TrainConfig, tag: str, args: argparse.Namespace) -> str:
    """Train one run of the grid unless it is done, diverged or held by another process:
    the state is checked while this process holds the run folder's lock (a single-process
    launch; data-parallel ranks rely on the trainer's own lock), so a run another sweep
    finished or recorded as diverged meanwhile is never retrained. Returns the outcome:
    ``done``, ``diverged``, ``busy``, ``other`` or ``failed`` (refused or stopped by an
    error, printed: the sweep goes on with the other runs; a folder this call made and
    nothing was written into is removed)."""
    run_dir = Path(cfg.out)
    # under torchrun rank 0 alone makes the folder and tidies it up (rank 1, done with the
    # previous run first, made it and rank 0 then left a lock-only folder: a review)
    main = _rank() == 0
    created = main and not run_dir.exists()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_lock(run_dir) if launched_world_size() == 1 else contextlib.nullcontext()
    try:
        with lock, _removed_if_unused(run_dir, created):
            state = _agreed_state(cfg)
            if state in ("done", "diverged"):
                _say(f"{tag} {cfg.run_name()}: {state}, skipped")
                return state
            if state == "other":
                diff = settings_diff(cfg)
                why = " (the schedule spans all epochs: a run is not extended)" \
                    if any(d.startswith("epochs ") for d in diff) else ""
                _say(f"{tag} {cfg.run_name()}: skipped, its folder holds a run of other settings: "
                      f"{', '.join(diff)}{why}; use another --out", flush=True)
                return state
            what = {"partial": "resuming", "restart": "restarting (epochs recorded, no checkpoint: "
                    "redone from the start)"}.get(state, "start")
            _say(f"{tag} {cfg.run_name()}: {what}", flush=True)
            t0 = time.perf_counter()
            result = train(cfg, resume=state in ("partial", "restart"), progress=not args.no_progress,
                           monitor_requested=args.monitor_every is not None)
    except TrainingDiverged as exc:
        _say(f"{tag} {cfg.run_name()}: {exc}", flush=True)
        return "diverged"
    except RunBusy as exc:  # another sweep (or lowbit train) has it: go on with the rest
        _say(f"{tag} {cfg.run_name()}: skipped for now, {exc}", flush=True)
        return "busy"
    except (DataMismatch, CheckpointError) as exc:  # its folder holds epochs of another
        # dataset, or checkpoints none of which loads: skipped as a run of other settings
        print(f"{tag} {cfg.run_name()}: skipped, {exc}", flush=True)
        return "other"
    except Exception as exc:  # a refusal (a backend that cannot run the model's GEMMs, data
        # not found, an unreadable folder…) or an error mid-run: printed, the other runs go on
        # (a review: one refused run stopped the rest of the grid). Under torchrun only a
        # refusal every rank raises alike (ValueError, before training): an error on one
        # rank left the others in the run's collectives while it went on, and the job hung
        # (a second review); torchrun stops the job on anything else.
        if launched_world_size() > 1 and not isinstance(exc, ValueError):
            raise
        why = _as_option(str(exc)) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
        print(f"{tag} {cfg.run_name()}: failed, {why}", flush=True)  # a TrainConfig field named as its option
        return "failed"
    last = result.history[-1]
    shown = ", ".join(f"{k} {last[k]:.4f}" for k in ("accuracy", "bpb") if k in last)
    _say(f"{tag} {cfg.run_name()}: {shown} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return "done"


def _state_or_failed(cfg: TrainConfig, dry_run: bool) -> tuple[str, str]:
    """(``run_state``, why) for the listing: ``failed`` with the reason where the run will
    be refused before its first step — its folder unreadable, or (``dry_run``: the sweep
    itself finds it when the run starts) a backend that cannot run the model's GEMMs or a
    model that cannot be built (:func:`backend_refusal`) — as the sweep then reports it."""
    try:
        state = run_state(cfg)
        if dry_run and state in ("new", "restart", "partial"):
            task_why, batch_why = _data_refusal(cfg.task, cfg.model, cfg.subset, cfg.eval_subset,
                                                cfg.steps_per_epoch, json.dumps(cfg.model_kwargs, sort_keys=True),
                                                cfg.batch_size)
            why = task_why or backend_refusal(cfg) or batch_why  # the trainer's order
            if why is not None:
                return "failed", why
    except Exception as exc:  # the run's own failure, as _run_one reports it
        return "failed", str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    return state, ""


@functools.cache
def _data_refusal(task: str, model: str | None, subset: int | None, eval_subset: int | None,
                  steps_per_epoch: int | None, model_kwargs: str, batch_size: int) -> tuple[str | None, str | None]:
    """Why the run's data refuses it before its first step, as the trainer says it (the
    option named): building the task (a subset or evaluation subset larger than the data),
    then — after the backend's check, in the trainer — the batch (larger than the training
    set); ``None`` each where it passes. The task built once per distinct data settings, for
    ``--dry-run`` (a review: it listed such runs as new and exited 0 where the sweep exits 1).
    Other errors (data not installed) propagate, as :func:`_state_or_failed` reports them."""
    try:
        built = make_task(task, model, subset=subset, eval_subset=eval_subset, steps_per_epoch=steps_per_epoch,
                          model_kwargs=json.loads(model_kwargs))
    except ValueError as exc:
        return _as_option(str(exc)), None
    try:
        built.steps_per_epoch(batch_size)
    except ValueError as exc:
        return None, _as_option(str(exc))
    return None, None


@functools.cache
def _backend_refusal(task: str, model: str, model_kwargs: str, fqt: str) -> str | None:
    import lowbit

    from .trainer import convert_or_refuse

    net = build_model(task, model, **json.loads(model_kwargs))
    with warnings.catch_warnings():  # the refusal below says it in one line
        warnings.simplefilter("ignore")
        try:
            convert_or_refuse(net, lowbit.FQTConfig.from_dict(json.loads(fqt)))
        except ValueError as exc:
            return str(exc)
    return None


def backend_refusal(cfg: TrainConfig) -> str | None:
    """Why training ``cfg`` will be refused before its first step because its backend
    (``int8``, ``fp8``) cannot run the model's GEMMs, or ``None`` — the trainer's own check
    (``trainer.convert_or_refuse``) on a freshly built model, once per model and recipe, so
    that ``--dry-run`` says what the sweep will (a review: it listed such runs as new and
    exited 0 where the sweep exited 1)."""
    if cfg.backend in ("auto", "reference"):
        return None
    fqt = cfg.fqt_config()
    if fqt.is_fp:
        return None
    return _backend_refusal(cfg.task, cfg.model, json.dumps(cfg.model_kwargs, sort_keys=True),
                            json.dumps(fqt.to_dict(), sort_keys=True))


def run(args: argparse.Namespace) -> int:
    check_out_dir("--out", args.out)
    configs = grid(args)
    set_threads(args.threads)
    set_malloc(args.malloc)
    listed = [_state_or_failed(cfg, args.dry_run) for cfg in configs]
    states = [state for state, _ in listed]
    _say(f"sweep: {len(configs)} runs -> {args.out} ("
          + ", ".join(f"{states.count(s)} {s}" for s in ("done", "partial", "restart", "busy",
                                                          "diverged", "other", "failed", "new")
                      if s in states) + ")")  # fmt: skip
    if args.dry_run:  # what the sweep would do, with the reasons it gives, and its exit status
        for cfg, (state, failed) in zip(configs, listed):
            why = f" (other settings: {', '.join(settings_diff(cfg))})" if state == "other" else \
                f" ({failed})" if failed else ""
            _say(f"  {state:8s} {cfg.out}{why}")
        return 1 if "other" in states or "failed" in states else 0
    # Under torchrun, one process group for the whole grid: each run creating and destroying
    # its own made the next run's gloo rendezvous fail ("connectFullMesh failed") or hang,
    # intermittently (a review); the trainer then uses this group and leaves it open.
    owns = launched_world_size() > 1 and not dist.is_initialized() \
        and init_process_group_from_env(torch.device("cpu"))
    try:
        outcomes = {cfg.run_name(): _run_one(cfg, f"[{i}/{len(configs)}]", args)
                    for i, cfg in enumerate(configs, 1)}
        # runs another process held: once more at the end (it may have finished or died since)
        for cfg in [c for c in configs if outcomes[c.run_name()] == "busy"]:
            outcomes[cfg.run_name()] = _run_one(cfg, "[again]", args)
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()
    for what, label in (("diverged", "diverged"), ("failed", "failed (refused or stopped by an error, "
                                                   "named above)"),
                        ("busy", "still held by another process, not finished by this sweep"),
                        ("other", "skipped: their folders hold runs of other settings or data, or no "
                                   "loadable checkpoint (named above)")):
        names = [n for n, o in outcomes.items() if o == what]
        if names:
            _say(f"sweep: {len(names)} run(s) {label}: {', '.join(names)}")
    # exit 1 where a run asked for has no result of these settings (`sweep && report` must
    # not report stale folders); a diverged run is a result (the report counts it failed)
    return 1 if any(o in ("busy", "other", "failed") for o in outcomes.values()) else 0
