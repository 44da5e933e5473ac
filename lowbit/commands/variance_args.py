"""The options of ``lowbit variance`` (:mod:`lowbit.commands.variance`): the argparse
arguments, their defaults per task, and :func:`validate`, which checks them all before
anything runs and raises ``ValueError`` with one line naming the allowed values."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from lowbit.analysis.bounds import SPECTRUM_MODES
from lowbit.experiments.models import MODELS
from lowbit.experiments.train import check_out_dir, check_threads, parse_list, parse_seed
from lowbit.formats import FORMAT_NAMES, MAX_BITS, MIN_BITS, IntFormat, parse_format
from lowbit.quantizers import QUANTIZERS

TASKS = ("digits", "fashion-mnist", "text")
DEFAULT_BATCH_SIZE = {"digits": 32, "fashion-mnist": 32, "text": 16}
DEFAULT_LR = {"digits": 0.05, "fashion-mnist": 0.05, "text": 1e-3}
DEFAULT_SUBSET = {"digits": None, "fashion-mnist": 10_000, "text": 2_000_000}
RANGES = ("dynamic", "predicted", "predicted-clip")
DEFAULT_BITS = "4,8"  # --bits without --formats
# every name a run can write into --out: an earlier run's are refused, or with --overwrite
# all removed before measuring, so that no figure of another run stays beside the new tables
# (a review found the old bins_4bit.png beside a run without bins); names, not patterns, so
# that a user's own profile_picture.png is neither removed nor taken for a result (a second)
_FORMAT_SPELLINGS = (*FORMAT_NAMES, *(f"{n}_spec" for n in FORMAT_NAMES if parse_format(n).block),
                     *(str(b) for b in range(MIN_BITS, MAX_BITS + 1)))
RESULTS = ("variance.json", "variance.csv", "summary.md", "bounds.png",
           *(f"bins_{b}bit.png" for b in range(MIN_BITS, MAX_BITS + 1)),
           *(f"profile_{q}_{f}.png" for q in QUANTIZERS for f in _FORMAT_SPELLINGS))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--task", required=True, help=f"one of {', '.join(TASKS)}")
    a("--model", default=None, help="model name for the task (default: the task's default)")
    a("--quantizers", default=",".join(QUANTIZERS),
      help=f"comma-separated ∇X-path quantizers from {', '.join(QUANTIZERS)}")
    a("--bits", default=None, help=f"comma-separated ∇X-path bit widths in {MIN_BITS}..{MAX_BITS} "
      "(symmetric integer grids; not with --formats; default 4,8)")
    a("--formats", default=None,
      help=f"comma-separated ∇X-path formats from {', '.join(FORMAT_NAMES)} (block formats "
      "also as NAME_spec: the OCP/NVFP4 scale rule that may clip)")
    a("--rounding", default="stochastic",
      help="comma-separated gradient rounding modes: stochastic, nearest (default stochastic)")
    a("--out", required=True, help="output folder (created; one holding an earlier run's "
      "results — variance.json, variance.csv, summary.md, its figures — is refused unless "
      "--overwrite; an interrupted run leaves none of its own)")
    a("--overwrite", action="store_true", help="replace the results an earlier run left in --out")
    a("--batches", type=int, default=12, help="minibatches for the decomposition (≥ 3)")
    a("--batch-size", type=int, default=None,
      help="minibatch size (default: 32 images, 16 windows)")
    a("--repeats", type=int, default=4, help="FQT draws per minibatch (≥ 2)")
    a("--seed", default="0", help="seed of the weights, the batches and the rounding noise")
    a("--subset", type=int, default=None,
      help="training images to load (fashion-mnist, default 10000; digits: all) or text bytes")
    a("--train-steps", type=int, default=0, help="QAT warm-up steps before measuring")
    a("--lr", type=float, default=None,
      help="warm-up learning rate (SGD images, AdamW text; with --train-steps only)")
    a("--bound-batches", type=int, default=1,
      help="minibatches with a Theorem 2 bound (0: none; with low-bit attention, which the bound "
           "does not cover, the groups upstream of it get none, with a note)")
    a("--spectrum", default=None,
      help=f"Jacobian constants: {' or '.join(SPECTRUM_MODES)} (see jacobian_spectrum; default layer; "
           "with a bound only)")
    a("--power-iters", type=int, default=None,
      help="power-iteration steps per Jacobian constant (default 6; with a bound only)")
    a("--ranges", default="dynamic",
      help=f"comma-separated gradient range modes from {', '.join(RANGES)} (default dynamic)")
    a("--range-margin", type=float, default=None,
      help="predicted range = margin × the largest recent absmax (≥ 1, default 1.25; "
           "with predicted --ranges only)")
    a("--range-history", type=int, default=None,
      help="predicted range: calls whose absmax is remembered (default 16; with predicted --ranges only)")
    a("--range-calibration", type=int, default=None,
      help="FQT backward passes that fill the predicted-range histories (default 16; with "
           "predicted --ranges only)")
    a("--profile", default=None,
      help="quantizers to profile layer by layer (default: all of --quantizers; 'none': off)")
    a("--profile-batches", type=int, default=None, help="minibatches of the profile (default 1)")
    a("--profile-repeats", type=int, default=None, help="draws per minibatch and layer (≥ 2, default 4; from "
      "3 on the profile shows standard errors, without which a ratio of 2 draws can read as a bound violation)")
    a("--bin-layer", default=None, help="layer whose ∇Y goes in the bin figure (default: middle)")
    a("--threads", type=int, default=None,
      help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    a("--quiet", action="store_true", help="no progress bars (where stderr is not a terminal: one line per stage instead)")


# -- argument checks ----------------------------------------------------------------------
@dataclass
class Options:
    task: str
    model: str | None
    quantizers: list[str]
    bits: list[int]
    formats: list[str]
    roundings: list[str]
    out: Path
    batches: int
    batch_size: int
    repeats: int
    seed: int
    subset: int | None
    train_steps: int
    lr: float
    bound_batches: int
    spectrum: str
    power_iters: int
    profile: list[str]
    profile_batches: int
    profile_repeats: int
    bin_layer: str | None
    threads: int | None
    progress: bool
    ranges: list[str]
    range_calibration: int
    range_margin: float
    range_history: int
    stages: bool = False  # one line per stage on stderr (no progress bars: not a terminal)


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in parse_list(f"--{what}", text)]
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated integers in {MIN_BITS}..{MAX_BITS}, "
                         f"got {text!r}") from None
    bad = [v for v in vals if not MIN_BITS <= v <= MAX_BITS]
    if not vals or bad:
        raise ValueError(f"--{what} must be integers in {MIN_BITS}..{MAX_BITS}, got {text!r}")
    return list(dict.fromkeys(vals))  # a width given twice is measured once (one column each)


def _names(text: str, what: str) -> list[str]:
    vals = parse_list(f"--{what}", text)  # an empty item is refused, not dropped
    bad = [v for v in vals if v not in QUANTIZERS]
    if not vals or bad:
        raise ValueError(f"--{what}: unknown quantizer(s) {', '.join(bad) or repr(text)}; "
                         f"allowed: {', '.join(QUANTIZERS)}")
    return list(dict.fromkeys(vals))  # a quantizer given twice is measured once


def _formats(text: str) -> list[str]:
    vals = parse_list("--formats", text)
    for v in vals:
        try:
            parse_format(v)
        except ValueError:
            raise ValueError(f"--formats: unknown format {v!r}; allowed: {', '.join(FORMAT_NAMES)} "
                             "(block formats also as NAME_spec)") from None
    return list(dict.fromkeys(vals))


def _at_least(name: str, value: int, low: int) -> int:
    if value < low:
        raise ValueError(f"--{name} must be ≥ {low}, got {value}")
    return value


# options that only tune one stage, each with its default and what turns the stage on: given
# where that stage does not run they would do nothing, yet be recorded as used (a trial)
_STAGE_OPTIONS = {
    "lr": (None, "the warm-up (--train-steps N)"),
    "range_margin": (1.25, "predicted ranges (--ranges predicted or predicted-clip)"),
    "range_history": (16, "predicted ranges (--ranges predicted or predicted-clip)"),
    "range_calibration": (16, "predicted ranges (--ranges predicted or predicted-clip)"),
    "profile_batches": (1, "the profile (--profile, not none)"),
    "profile_repeats": (4, "the profile (--profile, not none)"),
    "spectrum": ("layer", "the bound (--bound-batches ≥ 1)"),
    "power_iters": (6, "the bound (--bound-batches ≥ 1)"),
    "bin_layer": (None, "the bin figure (a symmetric integer format: --bits, or intB in --formats)"),
}


def _stage_options(args: argparse.Namespace, runs: dict[str, bool]) -> None:
    """``ValueError`` for an option of :data:`_STAGE_OPTIONS` given where its stage does not
    run (``runs``: stage description → whether it runs); then each unset one takes its
    default."""
    for name, (default, stage) in _STAGE_OPTIONS.items():
        value = getattr(args, name)
        if value is not None and not runs[stage]:
            raise ValueError(f"--{name.replace('_', '-')} applies to {stage}, which this command does not "
                             "run: leave it out, or ask for that stage")
        if value is None and default is not None:
            setattr(args, name, default)


def validate(args: argparse.Namespace) -> Options:
    """Check the arguments; raise ``ValueError`` with a line naming the allowed values."""
    args = argparse.Namespace(**vars(args))  # (defaults filled in below: the caller's is kept)
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    if args.model is not None and args.model not in MODELS[args.task]:
        raise ValueError(f"--model for task {args.task!r} must be one of "
                         f"{', '.join(MODELS[args.task])}, got {args.model!r}")
    if args.spectrum is not None and args.spectrum not in SPECTRUM_MODES:
        raise ValueError(f"--spectrum must be one of {', '.join(SPECTRUM_MODES)}, "
                         f"got {args.spectrum!r}")
    quantizers = _names(args.quantizers, "quantizers")
    if args.profile is None:
        profile = quantizers
    elif args.profile.strip().lower() == "none":
        profile = []
    else:
        profile = _names(args.profile, "profile")
        outside = [q for q in profile if q not in quantizers]
        if outside:  # a profile runs on a quantizer's own measurement: it was silently skipped
            raise ValueError(f"--profile names {', '.join(outside)}, not among --quantizers "
                             f"({', '.join(quantizers)}): add it there, or leave it out of --profile")
    batches = _at_least("batches", args.batches, 3)
    bound = _at_least("bound-batches", args.bound_batches, 0)
    if bound > batches:
        raise ValueError(f"--bound-batches ({bound}) must be ≤ --batches ({batches})")
    ranges = parse_list("--ranges", args.ranges)
    if any(r not in RANGES for r in ranges):
        raise ValueError(f"--ranges must be a comma-separated list from {', '.join(RANGES)}, "
                         f"got {args.ranges!r}")
    train_steps = _at_least("train-steps", args.train_steps, 0)
    if args.formats is not None and args.bits is not None:
        raise ValueError("--bits and --formats both given: --formats names the widths "
                         "(int4, fp8_e4m3, ...); pass one of them")
    bits = _int_list(args.bits or DEFAULT_BITS, "bits")
    formats = [f"int{b}" for b in bits] if args.formats is None else _formats(args.formats)
    predicted = "predicted ranges (--ranges predicted or predicted-clip)"
    binned = [f for f in formats if isinstance(parse_format(f), IntFormat) and not parse_format(f).asymmetric]
    _stage_options(args, {"the warm-up (--train-steps N)": train_steps > 0,
                          predicted: any(r != "dynamic" for r in ranges),
                          "the profile (--profile, not none)": bool(profile),
                          "the bound (--bound-batches ≥ 1)": bound > 0,
                          _STAGE_OPTIONS["bin_layer"][1]: bool(binned)})
    pbatches = _at_least("profile-batches", args.profile_batches, 0)
    if pbatches > batches:
        raise ValueError(f"--profile-batches ({pbatches}) must be ≤ --batches ({batches})")
    if args.subset is not None:
        _at_least("subset", args.subset, 1)
    margin = args.range_margin
    if not (math.isfinite(margin) and margin >= 1):
        raise ValueError(f"--range-margin must be a finite number ≥ 1, got {margin}")
    roundings = parse_list("--rounding", args.rounding)
    if any(r not in ("stochastic", "nearest") for r in roundings):
        raise ValueError(f"--rounding must be a comma-separated list from stochastic, nearest, "
                         f"got {args.rounding!r}")
    # predicted ranges serve symmetric per-row/tensor formats only (commands.variance skips
    # the other combinations): refuse a command that would measure nothing at all
    unserved = [f for f in formats if parse_format(f).block or parse_format(f).asymmetric]
    if "dynamic" not in ranges and len(unserved) == len(formats):
        raise ValueError(f"--ranges {','.join(ranges)} serves symmetric integer and FP8 formats only, and "
                         f"{', '.join(unserved)} {'is a block or asymmetric format' if len(unserved) == 1 else 'are block or asymmetric formats'}"
                         f": nothing would be measured (add dynamic to --ranges, or another format)")
    clipping = [f for f in formats if parse_format(f).clips]
    if bound and clipping:
        raise ValueError(f"--bound-batches {bound}: the variance bound holds for unbiased formats only, and "
                         f"{', '.join(clipping)} {'clips' if len(clipping) == 1 else 'clip'} (the specification's scale "
                         f"rule); pass --bound-batches 0")
    lr = DEFAULT_LR[args.task] if args.lr is None else args.lr
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    return Options(
        task=args.task, model=args.model, quantizers=quantizers,
        bits=sorted({parse_format(f).element_bits for f in formats}), formats=formats,
        roundings=list(dict.fromkeys(roundings)), out=Path(check_out_dir("--out", args.out, RESULTS, args.overwrite)), batches=batches,
        batch_size=_at_least("batch-size", DEFAULT_BATCH_SIZE[args.task] if args.batch_size is None
                             else args.batch_size, 2),  # 0 is refused, not taken for "default"
        repeats=_at_least("repeats", args.repeats, 2), seed=parse_seed("--seed", args.seed),
        subset=args.subset if args.subset is not None else DEFAULT_SUBSET[args.task],
        train_steps=train_steps, lr=lr,
        bound_batches=bound, spectrum=args.spectrum,
        power_iters=_at_least("power-iters", args.power_iters, 1), profile=profile,
        profile_batches=pbatches,
        profile_repeats=_at_least("profile-repeats", args.profile_repeats, 2),
        bin_layer=args.bin_layer,
        threads=None if args.threads is None else check_threads(args.threads),
        progress=not args.quiet and sys.stderr.isatty(), ranges=list(dict.fromkeys(ranges)),
        stages=not args.quiet and not sys.stderr.isatty(),
        range_calibration=_at_least("range-calibration", args.range_calibration, 1),
        range_margin=margin, range_history=_at_least("range-history", args.range_history, 1),
    )



__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_LR", "DEFAULT_SUBSET", "RANGES", "TASKS", "Options",
           "add_arguments", "validate"]
