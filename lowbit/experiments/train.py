"""``lowbit train``: train one model with one recipe.

    lowbit train --task digits --model cnn --recipe fqt-bhq-4 --epochs 10 --seed 0 \\
        --out runs/digits-cnn-bhq4          # add --resume to continue after a crash

Every value is checked before any work starts; a bad one exits with status 2 and one
line naming the option and its allowed values. Options take strings at the argparse
level and are converted here, so that the message is always that one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lowbit.config import RECIPES, backend_names, recipe_families

from .checkpoint import CheckpointError, load_checkpoint
from .launch import FAILURES, LAUNCH_DIR, RANK_ERROR
from .models import MODELS, check_model_args
from .rundir import SESSION_SETTINGS, is_busy, read_config, recipe_refusal, resume_refusal, write_status
from .runconfig import launched_world_size, unnamed_options
from .tasks import TASKS
from .trainer import TrainConfig, TrainingDiverged, check_run_dir, train

MODEL_ARG_HELP = "KEY=VALUE model constructor argument, repeatable (e.g. n_layer=2)"


SCHEDULE_NOTE = ("Optimizer and schedule: images train with SGD (momentum 0.9), text with AdamW "
                 "(betas 0.9, 0.95; 5% linear warm-up; gradient norm clipped at 1.0); both follow a "
                 "cosine schedule from --lr to 0 over all steps, weight decay on matrices and "
                 "kernels only. The optimizer, momentum and clipping are TrainConfig fields "
                 "(Python), not options.")


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by ``train`` and ``sweep`` (everything but what names a run)."""
    parser.epilog = SCHEDULE_NOTE
    add = parser.add_argument
    add("--epochs", default="10", help="number of epochs (default 10)")
    add("--batch-size", help="batch size (default: digits 64, fashion-mnist 128, text 32); images: "
        "an epoch is ⌊N/batch⌋ full batches of a fresh shuffle, the last N mod batch images of each "
        "shuffle left out (BatchNorm sees full batches)")
    add("--lr", help="peak learning rate (default: digits 0.05, fashion-mnist 0.1, text 1e-3)")
    add("--weight-decay", help="weight decay on matrices and kernels (default 5e-4; text 0.1)")
    add("--subset", help="images: keep N training images; text: keep the first N corpus bytes")
    add("--eval-subset", help="evaluate on the first N test images / validation windows")
    add("--steps-per-epoch", help="text only: optimizer steps per epoch (default 200)")
    add("--grad-input-bits", help="bits of the ∇X gradient quantizer, 2..8 (fqt-* recipes)")
    add("--grad-weight-bits", help="bits of the ∇W gradient quantizer, 2..8 (fqt-* recipes)")
    add("--range-margin", help="predicted-range margin ≥ 1 (fqt-*-predicted recipes; default 1.25)")
    add("--backend", default="auto", help=f"GEMM kernels: {backend_names()} (default auto)")
    add("--weights", default="fp32",
        help="weight storage: fp32, bf16-master (bf16 model + fp32 master copy), bf16 or "
        "int8 (SR updates, no fp32 copy)")
    add("--opt-state", help="optimizer state format: bf16 or int8 with --weights bf16 or int8 "
        "(default: as --weights); fp32 (the only value) with fp32 or bf16-master weights")
    add("--max-bad-steps", default="5", help="stop after N consecutive skipped steps: a non-finite loss or gradient, or a "
        "gradient norm past float32's range (5)")
    add("--monitor-every", help="variance monitor every N steps (lowbit.monitor; "
        "default 50, 0 off; fqt-auto* recipes need it)")
    add("--grad-comm", default="fp32", help="data-parallel gradient averaging: fp32 (DDP's "
        "all-reduce) or int2..int8 (unbiased stochastic rounding, lowbit.distributed)")
    add("--model-arg", action="append", default=[], metavar="KEY=VALUE", help=MODEL_ARG_HELP)
    add("--threads", help="CPU threads for torch (default: torch's choice)")
    add("--malloc", choices=("keep-freed", "default"), default="keep-freed",
        help="C allocator policy of this process: keep-freed (default; glibc recycles freed "
        "blocks instead of mapping fresh pages for each one over 32 MiB: "
        "lowbit.allocator.keep_freed_memory) or glibc's defaults")
    add("--no-progress", action="store_true", help="no progress bar (epoch lines only)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--task", default="digits", help=f"one of {', '.join(TASKS)} (default digits)")
    add("--model", help="per task: " + "; ".join(f"{t}: {', '.join(m)}" for t, m in MODELS.items()))
    add("--recipe", default="fp", help=f"{recipe_families()} (fqt-auto*: bit widths chosen "
        "from the measured variance; default fp)")
    add("--seed", default="0", help="seed of the weights, the data order and the SR noise")
    add("--out", help="run folder (default runs/<task>-<model>-<recipe>[-giB-gwB][-mMARGIN][-wFMT[-sFMT]]"
        "[-nN[-cCOMM]]-s<seed>; " + ", ".join(unnamed_options()) + " are not in the name, so a run "
        "that changes them needs its own --out)")
    add("--resume", action="store_true", help="continue from OUT/last.pt (or prev.pt); the settings "
        "this command line does not give are those OUT/config.json records (give --out); OUT must "
        "exist (a folder without a checkpoint starts afresh)")
    add("--nproc", help="data-parallel ranks: launches torchrun with N processes (default 1); "
        "under torchrun leave it out: the ranks are torchrun's --nproc-per-node (its WORLD_SIZE)")
    add_training_arguments(parser)


# --------------------------------------------------------------------------- parsing


def parse_int(option: str, text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{option} must be an integer, got {text!r}") from None


SEED_LIMIT = 2**63  # torch.manual_seed and the trainer's epoch_seed (mod 2⁶³) take seeds below it


def parse_seed(option: str, text: str) -> int:
    """A command-line seed: an integer in ``[0, 2**63)``; ``ValueError`` naming ``option``
    otherwise (a seed outside would alias one inside: README fault kind 25)."""
    value = parse_int(option, text)
    if value is None or not 0 <= value < SEED_LIMIT:
        raise ValueError(f"{option} must be an integer in [0, 2**63), got {text!r}")
    return value


def parse_list(option: str, text: str) -> list[str]:
    """A non-empty comma list (items stripped, duplicates dropped, order kept);
    ``ValueError`` naming ``option`` otherwise, and for an empty item (``fp,,qat-8``: a
    name lost between the commas is not dropped without a word)."""
    parts = [s.strip() for s in text.split(",")]
    if not any(parts):
        raise ValueError(f"{option} must be a non-empty comma-separated list, got {text!r}")
    if not all(parts):
        raise ValueError(f"{option} has an empty item (two commas, or one at an end): {text!r}")
    return list(dict.fromkeys(parts))


def parse_recipes(option: str, text: str) -> list[str]:
    """:func:`parse_list` of recipe names; ``ValueError`` naming ``option`` for an unknown
    name (with every family allowed)."""
    names = parse_list(option, text)
    for name in names:
        if name not in RECIPES:
            raise ValueError(f"{option}: unknown recipe {name!r}; allowed: {recipe_families()}")
    return names


def parse_float(option: str, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{option} must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{option} must be finite, got {text!r}")
    return value


def parse_model_args(items: list[str]) -> dict[str, Any]:
    """``["n_layer=2", "dropout=0.1", "widths=8,16,32"]`` →
    ``{"n_layer": 2, "dropout": 0.1, "widths": (8, 16, 32)}``: an integer, else a finite
    number, or a tuple of integers when the value holds commas; anything else stays the
    text, for :func:`~lowbit.experiments.models.check_model_args`, which checks names
    first, then types and ranges, against the model."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--model-arg must look like KEY=VALUE, got {item!r}")
        if key in out:
            raise ValueError(f"--model-arg {key} is given twice")
        option = f"--model-arg {key}"
        if "," in text:
            try:
                out[key] = tuple(int(t) for t in text.split(","))
            except ValueError:
                out[key] = text  # check_model_args names what the argument must be (or that it is none)
            continue
        try:
            out[key] = int(text)
        except ValueError:
            try:
                out[key] = parse_float(option, text)
            except ValueError:
                # not a number: check_model_args says first whether the model has such an
                # argument, then what it must be (a new user's walkthrough: "n_layer must be
                # a number" where mlp has no n_layer at all)
                out[key] = text
    return out


def _writable(folder: Path) -> bool:
    """Whether a file can be made in the existing ``folder``: a temporary file made and
    removed there (``os.access`` says yes to root on a read-only mount or in ``/sys``,
    where the command then failed after its measurement, a review)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_named(option: str, path: str | None, what: str) -> None:
    """``ValueError`` naming ``option`` where ``path`` is given but empty (or blanks): a
    shell variable that expanded to nothing read as the current folder, or as the default
    one, without a word (a new user's trial: ``lowbit train --out ""``)."""
    if path is not None and not str(path).strip():
        raise ValueError(f"{option} must name a {what}, got an empty string")


def check_out_dir(option: str, path: str, results: tuple[str, ...] = (),
                  overwrite: bool = False) -> str:
    """``path`` as a folder a command will create or write into, checked before any work
    (``ValueError`` naming ``option``): not a file, nor under one; the folder (or the
    nearest one above it that exists) writable; and, unless ``overwrite``, holding none of
    ``results`` (the names of the files an earlier run of the command wrote there: its
    measurement would be replaced without a word)."""
    check_named(option, path, "folder")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{option} must be a folder, but {path} is a file")
    held = [name for name in results if (p / name).exists()]
    if held and not overwrite:
        raise ValueError(f"{option}: {path} already holds {', '.join(held)} from an earlier run; "
                         "choose another folder, or pass --overwrite to replace them")
    for folder in (p.absolute(), *p.absolute().parents):
        if folder.exists():
            if not folder.is_dir():
                raise ValueError(f"{option}: {folder} is a file, cannot create {path}")
            if not _writable(folder):
                raise ValueError(f"{option}: cannot write in {folder}" + ("" if folder == p.absolute() else
                                                                          f", so cannot create {path}"))
            break
    return path


def check_out_file(option: str, path: str) -> str:
    """``path`` as a file a command will write at its end (:func:`lowbit.experiments.rundir.write_atomic`:
    a temporary file beside the link-resolved path, renamed over it), checked before any
    work: not a folder nor another non-regular file (a pipe, a device: the rename would
    replace it, or fail after the work, as ``--json /dev/stdout`` did, a review), in a folder
    that exists and is writable (``ValueError`` naming ``option``)."""
    check_named(option, path, "file")
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{option} must be a file, but {path} is a folder")
    real = Path(os.path.realpath(p))
    if real.exists() and not real.is_file():
        raise ValueError(f"{option}: {path} is not a regular file (a pipe or a device); give a file's path")
    parent = real.parent
    if not parent.is_dir():
        raise ValueError(f"{option}: the folder {parent} does not exist")
    if not _writable(parent) or (real.exists() and not os.access(real, os.W_OK)):
        raise ValueError(f"{option}: {path} is not writable")
    return path


def training_fields(args: argparse.Namespace) -> dict[str, Any]:
    """TrainConfig fields from the shared options (values converted, not yet validated)."""
    # A value that fails here or in TrainConfig raises with the option's name.
    ints = ("epochs", "batch_size", "subset", "eval_subset", "steps_per_epoch",
            "grad_input_bits", "grad_weight_bits", "max_bad_steps", "monitor_every")  # fmt: skip
    fields: dict[str, Any] = {
        k: parse_int(f"--{k.replace('_', '-')}", getattr(args, k)) for k in ints
    }
    for k in ("lr", "weight_decay", "range_margin"):
        fields[k] = parse_float(f"--{k.replace('_', '-')}", getattr(args, k))
    fields["backend"] = args.backend
    fields["weights"] = args.weights
    fields["opt_state"] = args.opt_state
    fields["grad_comm"] = args.grad_comm
    fields["model_kwargs"] = parse_model_args(args.model_arg)
    if fields["monitor_every"] is None:  # not given: TrainConfig's default
        del fields["monitor_every"]
    return fields


def check_threads(threads: int) -> int:
    """``--threads`` checked: a positive integer, at most this machine's logical CPUs (a
    review's ``--threads 100000`` ran the process out of memory while importing SciPy and
    surfaced as a misleading ImportError)."""
    cpus = os.cpu_count() or 1
    if threads < 1 or threads > cpus:
        raise ValueError(f"--threads must be an integer from 1 to this machine's {cpus} logical CPUs, "
                         f"got {threads}")
    return threads


def set_threads(text: str | None) -> None:
    """Apply ``--threads`` (torch's intra-op CPU threads; :func:`check_threads`)."""
    threads = parse_int("--threads", text)
    if threads is not None:
        torch.set_num_threads(check_threads(threads))


def set_malloc(choice: str) -> None:
    """Apply ``--malloc`` (:mod:`lowbit.allocator`; process-wide, so only in lowbit's own
    command-line processes, once their options are checked)."""
    if choice == "keep-freed":
        from lowbit import allocator

        allocator.keep_freed_memory()  # False off glibc: nothing to change there


def make_config(fields: dict[str, Any]) -> TrainConfig:
    """Build a TrainConfig with checked model arguments, turning a ValueError into a
    one-line usage error that names the option."""
    try:
        cfg = TrainConfig(**fields)
    except ValueError as exc:
        raise ValueError(_as_option(str(exc))) from None
    cfg.model_kwargs = check_model_args(cfg.task, cfg.model, cfg.model_kwargs, "--model-arg ")
    return cfg


OPTION_NAMES = {"world_size": "--nproc", "model_kwargs": "--model-arg"}  # fields named otherwise


def _as_option(message: str) -> str:
    """``batch_size must ...`` → ``--batch-size must ...`` (name the CLI option of a
    TrainConfig field; other messages are left as they are). ``world_size``, which the
    command line sets with ``--nproc``, is named ``--nproc`` (a review found "--world-size
    is 2 ...": no such option), also as a word inside the message, not inside a path;
    under a multi-rank launch, where torchrun set it, ``torchrun's --nproc-per-node``."""
    name, sep, rest = message.partition(" ")
    try:  # under torchrun the ranks are its --nproc-per-node: --nproc cannot be typed there (a review)
        ranks = "torchrun's --nproc-per-node" if launched_ranks() else "--nproc"
    except ValueError:
        ranks = "--nproc"
    if sep and name in TrainConfig.__dataclass_fields__:
        option = ranks if name == "world_size" else OPTION_NAMES.get(name, "--" + name.replace("_", "-"))
        message = f"{option} {rest}"
    if ranks != "--nproc":  # "world_size (2)": the launch's ranks, in train and sweep alike
        message = re.sub(r"(?<![\w/.~-])world_size \((\d+)\)", r"the launch's \1 ranks (torchrun "
                         "--nproc-per-node)", message)
    return re.sub(r"(?<![\w/.~-])world_size(?![\w/.-])", ranks, message)  # the word, not in a path


def launched_ranks() -> bool:
    """Whether this process is one of several ranks of a launch: torchrun's
    ``WORLD_SIZE`` above 1 (``WORLD_SIZE=1`` left in the environment is a single process,
    which ``--nproc N`` launches ranks from: a review found it refused). ``ValueError``
    for a ``WORLD_SIZE`` that is not an integer (:func:`~.runconfig.launched_world_size`)."""
    return launched_world_size() > 1


def given_options(args: argparse.Namespace) -> set[str] | None:
    """The ``lowbit train`` options (argparse destinations) its command line sets,
    abbreviations included: the line after the command, parsed again with every default
    suppressed. ``None`` where the line is unknown (``run`` called without
    :func:`lowbit.cli.main`): then every option counts as given."""
    argv = getattr(args, "_argv", None)
    if argv is None or args.command not in argv:
        return None
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(argv[argv.index(args.command) + 1:])
    return set(vars(given))


# TrainConfig fields a resumed run does not take from its record: where it is (--out) and
# how many ranks run it (--nproc launches them; a run of several ranks asks for it)
NOT_RESUMED = frozenset({"out", "world_size"})
OPTION_OF_FIELD = {"model_kwargs": "model_arg"}  # field -> argparse destination, where they differ
NAMING = ("task", "model", "recipe", "seed", "epochs")  # always named in the "resuming" line
LAUNCHED = "LOWBIT_TRAIN_LAUNCHED"  # set in the ranks `lowbit train --nproc N` starts


def recorded_settings(out: Path) -> tuple[dict[str, Any] | None, str]:
    """The TrainConfig fields ``out``'s run recorded and where they were read:
    ``config.json``'s ``train`` record — with the latest session's ``monitor_every`` and
    ``max_bad_steps`` (its last ``resumed`` entry's: the record keeps the first session's,
    a review) — else (a missing or damaged file) the newest readable checkpoint's
    ``train_config``; ``(None, "")`` where neither is there."""
    record = read_config(out)
    saved = record.get("train")
    if isinstance(saved, dict):
        resumed = record.get("resumed")
        last = resumed[-1] if isinstance(resumed, list) and resumed and isinstance(resumed[-1], dict) else {}
        return saved | {k: last[k] for k in SESSION_SETTINGS if k in last}, str(out / "config.json")
    try:
        loaded = load_checkpoint(out)
    except CheckpointError:
        return None, ""
    if loaded is None or not isinstance(loaded[0].get("train_config"), dict):
        return None, ""
    return loaded[0]["train_config"], str(loaded[1])


def resumed_settings(out: Path, fields: dict[str, Any], given: set[str] | None) -> tuple[str, list[str]]:
    """With ``--resume``: every setting ``out``'s run recorded (:func:`recorded_settings`)
    that the command line does not give replaces the default in ``fields`` (in place).
    Returns where the settings were read (``""``: nowhere, ``fields`` unchanged) and
    ``"field value"`` for the run-naming settings and those that differ from the defaults of
    its task, model and recipe. ``given`` ``None`` (the line unknown): nothing taken.
    ``ValueError`` for a run of several ranks resumed without ``--nproc`` (or torchrun).
    Settings the line gives stay; one the run cannot change is the trainer's error."""
    if given is None:
        return "", []
    saved, source = recorded_settings(out)
    if saved is None:
        return "", []
    ranks = saved.get("world_size") or 1
    if isinstance(ranks, int) and ranks > 1 and "nproc" not in given and not launched_ranks():
        # both launches named (a trial: under `torchrun --nproc-per-node 1` the advice "--nproc 2"
        # could not be typed: torchrun's parser refuses --nproc as an ambiguous abbreviation)
        raise ValueError(f"{out} is a run of {ranks} data-parallel ranks: resume it on {ranks} ranks "
                         f"(lowbit train --nproc {ranks} ..., or torchrun --nproc-per-node {ranks} -m "
                         "lowbit train ... without --nproc)")
    taken = {}
    for name in TrainConfig.__dataclass_fields__:
        if name in NOT_RESUMED or name not in saved or OPTION_OF_FIELD.get(name, name) in given:
            continue
        value = saved[name]
        if name == "model_kwargs" and isinstance(value, dict):  # JSON lists back to tuples
            value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
        fields[name] = taken[name] = value
    try:
        base = TrainConfig(task=fields["task"], model=fields["model"], recipe=fields["recipe"])
    except (ValueError, TypeError, KeyError):
        base = None
    shown = [f"{k} {v!r}" for k, v in taken.items()
             if k in NAMING or base is None or getattr(base, k, None) != v]
    return source, shown


def run(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    if args.recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {recipe_families()}; got {args.recipe!r}")
    fields = training_fields(args)
    fields.update(task=args.task, model=args.model, recipe=args.recipe,
                  seed=parse_seed("--seed", args.seed))  # fmt: skip
    nproc = parse_int("--nproc", args.nproc)
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc}")
    launch = nproc is not None and nproc > 1 and not launched_ranks()
    if nproc is not None:
        fields["world_size"] = nproc
    source = ""
    out = args.out
    check_named("--out", out, "folder")
    if args.resume and not out:  # the folder these options name (a data-parallel run's has
        # -nN: after --nproc), its settings read as with --out (a new user's trial: without
        # --out the defaults were compared)
        with contextlib.suppress(ValueError):
            out = str(Path("runs") / make_config(dict(fields)).run_name())
    if args.resume and out:
        source, taken = resumed_settings(Path(out), fields, given_options(args))
        if taken and not os.environ.get(LAUNCHED) and int(os.environ.get("RANK", "0")) == 0:
            print(f"lowbit train: resuming {out} with the settings {source} records: "
                  f"{', '.join(taken)}", file=sys.stderr)
    try:
        cfg = make_config(fields)
    except ValueError as exc:
        if not source:
            raise
        raise ValueError(f"{exc} (the settings this command line does not give were read from {source}, "
                         "as --resume does)") from None
    set_threads(args.threads)
    set_malloc(args.malloc)
    cfg.out = check_out_dir("--out", out or str(Path("runs") / cfg.run_name()))
    if args.resume and not Path(cfg.out).exists():  # a misspelt folder would train anew, silently
        where = "" if args.out else (" (the default folder of these settings: give the run's "
                                     "folder with --out)")
        raise ValueError(f"--resume: {cfg.out} does not exist{where}, so there is no run to continue "
                         "(check the folder's name, or drop --resume to start a new run there)")
    if launch:  # every value checked, the run folder too: now the same command on nproc ranks
        check_run_dir(Path(cfg.out), cfg, args.resume)
        record = read_config(Path(cfg.out)) if args.resume else {}
        saved = record.get("train")
        if isinstance(saved, dict):  # the recorded settings, refused before N processes start
            # (the ranks check the checkpoint itself, and load it)
            where = Path(cfg.out) / "config.json"
            refusal = resume_refusal(where, saved, Path(cfg.out), cfg) or \
                recipe_refusal(where, record.get("fqt"), cfg)
            if refusal:
                raise ValueError(refusal)
        if is_busy(Path(cfg.out)):
            raise ValueError(f"{cfg.out} is being trained by another process (its .lock): choose another --out")
        return _torchrun(args, cfg.world_size, cfg.out)
    try:
        result = train(cfg, resume=args.resume, progress=not args.no_progress,
                       monitor_requested=args.monitor_every is not None)
    except (TrainingDiverged, CheckpointError) as exc:
        print(f"lowbit train: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # a value that only the data can check (e.g. --subset)
        raise ValueError(_as_option(str(exc))) from exc
    last = result.history[-1] if result.history else {}
    shown = ", ".join(f"{k} {last[k]:.4f}" for k in ("accuracy", "val_loss", "bpb") if k in last)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{cfg.run_name()}: {shown or 'no epochs run'} -> {cfg.out}")
    return 0


def _torchrun(args: argparse.Namespace, nproc: int, out: str) -> int:
    """``lowbit train`` with the same options on ``nproc`` local ranks under torchrun
    (``python -m torch.distributed.run --standalone``, through :mod:`.launch`); returns the
    exit status: 0, 2 for a usage error the ranks found (the data's, e.g. ``--subset``
    past the dataset: one line, once), ``128 + signal`` after passing a SIGINT or SIGTERM
    this process received on to torchrun (:func:`wait_forwarding_signals`), else 1 with
    the failed ranks named (:func:`explain_ending`)."""
    argv = [sys.executable, "-m", "lowbit.experiments.launch", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "lowbit", "train"]
    given = given_options(args)  # the ranks get the options the line gave (with --resume, they
    for key, value in (vars(args) | {"out": out}).items():  # read the rest as this process did)
        if key.startswith("_") or key in ("command", "nproc") or value in (None, False, []):
            continue
        if given is not None and key not in given and key != "out":
            continue
        option = "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            argv += [option] if v is True else [option, str(v)]
    with tempfile.TemporaryDirectory(prefix="lowbit-launch-") as folder:
        env = dict(os.environ, **{LAUNCHED: "1", LAUNCH_DIR: folder})
        # its own process group: a Ctrl-C at the terminal reaches torchrun once, from here
        started = time.time()  # a status.json record older than this is another run's
        proc = subprocess.Popen(argv, env=env, process_group=0)
        code, signum = wait_forwarding_signals(proc)
        if signum is not None and code != 0:  # the ranks stopped (status.json: interrupted)
            name = signal.Signals(signum).name
            print(f"lowbit train: {'interrupted' if signum == signal.SIGINT else f'terminated ({name})'}",
                  file=sys.stderr)
            return 128 + signum
        if code < 0:  # torchrun itself killed by a signal (its ranks got SIGTERM from it, if alive)
            print(f"lowbit train: torchrun {_how_ended(code)}", file=sys.stderr)
            return 128 - code
        return explain_ending(Path(folder), Path(out), code, since=started) if code else 0


FORWARDED = {signal.SIGINT: signal.SIGINT, signal.SIGTERM: signal.SIGTERM}
if hasattr(signal, "SIGHUP"):  # a closed terminal: stop the ranks as SIGTERM does (recorded)
    FORWARDED[signal.SIGHUP] = signal.SIGTERM


def wait_forwarding_signals(proc: subprocess.Popen) -> tuple[int, int | None]:
    """Wait for ``proc`` while every SIGINT and SIGTERM this process receives is sent on
    to it (SIGHUP as SIGTERM), never killing it: torchrun stops its ranks on either, and
    they record the run ``interrupted``. A review found ``subprocess.call`` leaving the
    ranks training on after a SIGTERM (the launcher died alone) or orphaned after a
    Ctrl-C (it SIGKILLed torchrun). Returns ``proc``'s exit status and the first signal
    received (``None``: none); the previous handlers are restored. Outside the main
    thread (no handlers can be set there): a plain wait."""
    got: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        got.append(signum)
        proc.send_signal(FORWARDED[signal.Signals(signum)])  # nothing if it has ended

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in FORWARDED:
            previous[signum] = signal.signal(signum, forward)
    try:
        code = proc.wait()  # retried after each handler (PEP 475)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return code, got[0] if got else None


def _how_ended(code: int) -> str:
    """A rank's exit status in words."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
        return f"was killed by signal {-code}"
    return {130: "was interrupted (SIGINT)", 143: "was terminated (SIGTERM)"}.get(code, f"exited with status {code}")


def _root_cause(failures: dict[int, dict], recorded: int | None = None) -> int:
    """The rank whose failure stopped the job: the earliest torchrun saw (whole seconds),
    among those a rank killed by a signal other than the SIGTERM/SIGINT torchrun stops the
    others with (it recorded nothing); else ``recorded``, the rank ``status.json`` names as
    the first to stop (a rank records before its connections close, so before the others
    fail: finer than torchrun's seconds); else one that exited on its own. (A trial: a
    ``kill -TERM`` of rank 1 was blamed on rank 0, whose "Connection closed by peer"
    exit torchrun saw in the same second, though status.json named rank 1.)"""
    def order(rank: int) -> tuple:
        code = failures[rank]["exitcode"]
        stopped = code in (-signal.SIGTERM, -signal.SIGINT, 130, 143)
        return failures[rank]["time"], 0 if code < 0 and not stopped else 1 if not stopped else 2, rank
    first = min(failures, key=order)
    if order(first)[1] == 0 or recorded not in failures:
        return first
    return recorded  # type: ignore[return-value]  (a record of this launch: _recorded_rank)


_RECORDED = re.compile(r"stopped by (?:SIGTERM|an interrupt \(Ctrl-C\)|an error) on rank (\d+)\b")


def _recorded_rank(out: Path, since: float | None = None) -> int | None:
    """The rank ``status.json``'s ``failed``/``interrupted`` record names as the first to
    stop (the trainer's words: "stopped by … on rank R"), else ``None``; ``None`` too for a
    record written before ``since`` (the launch's start: a run that failed before writing
    "running" — building the model, restoring a checkpoint — left the previous run's
    record, which a review found blamed)."""
    path = out / "status.json"
    try:
        if since is not None and path.stat().st_mtime < since:
            return None
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") not in ("failed", "interrupted"):
        return None
    m = _RECORDED.match(str(record.get("message") or ""))
    return int(m.group(1)) if m else None


def explain_ending(folder: Path, out: Path, code: int, since: float | None = None) -> int:
    """After torchrun ended with ``code`` ≠ 0: the ranks' usage errors (:func:`.launch.report_usage_error`)
    printed once each, status 2; else one line naming each failed rank (``failures.json``,
    :mod:`.launch`; their tracebacks are above it), status ``code``. A rank killed by a
    signal (SIGKILL: the out-of-memory killer, a crashed machine) records nothing itself,
    and rank 0 recorded what it saw next (gloo's "Connection closed by peer", or the
    SIGTERM torchrun stopped it with): ``status.json`` is rewritten to name the rank and
    the signal (a review). The rank ``status.json`` names as the first to stop is taken as
    the cause where it was written at or after ``since`` (the launch's start; ``None``:
    any record) and no rank was killed by such a signal first (:func:`_root_cause`)."""
    errors = {int(p.name[4:-6]): p.read_text().strip() for p in folder.glob(RANK_ERROR.format("*"))}
    if errors:  # a value the ranks found wrong: every rank says the same, once is enough
        for line in dict.fromkeys(errors[r] for r in sorted(errors)):
            print(line, file=sys.stderr)
        return 2
    try:
        failures = {int(r): f for r, f in json.loads((folder / FAILURES).read_text()).items()}
    except (OSError, ValueError):
        return code  # torchrun failed before any rank (its own message is above)
    if not failures:
        return code
    root = _root_cause(failures, _recorded_rank(out, since))
    others = [f"rank {r} {_how_ended(failures[r]['exitcode'])}" for r in sorted(failures) if r != root]
    what = f"rank {root} {_how_ended(failures[root]['exitcode'])}"
    print(f"lowbit train: {what}" + (f"; then {', '.join(others)}" if others else "")
          + f" (the job stopped: {out / 'status.json'})", file=sys.stderr)
    if failures[root]["exitcode"] < 0:
        _record_killed_rank(out, what)
    return code


def _record_killed_rank(out: Path, what: str) -> None:
    """``status.json`` naming the rank a signal killed, where the run still reads as
    running or as stopped by what the other ranks saw next."""
    try:
        record = json.loads((out / "status.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(record, dict) or record.get("status") not in ("running", "failed", "interrupted"):
        return  # done or diverged: that is the run's own ending
    seen = str(record.get("message") or "")
    for advice in ("; after fixing it", "; the same command"):  # said once, below
        seen = seen.partition(advice)[0]
    then = f"; the other ranks then: {seen}" if seen else ""
    with contextlib.suppress(OSError):
        write_status(out, "failed", f"stopped because {what}{then}; the same command with --resume "
                     "continues from the last epoch checkpoint (none: start again)")
