"""``lowbit variance``: variance decomposition, Theorem 2 bounds and bin utilization.

    lowbit variance --task fashion-mnist --quantizers ptq,psq,bhq,hadamard --bits 4 \\
        --out runs/variance --subset 4000 --train-steps 100 --batches 12 --repeats 4

``--formats int4,int4a,fp8_e5m2,mxfp4,nvfp4`` measures the ∇X path on those number
formats (:mod:`lowbit.formats`; instead of ``--bits``, which is shorthand for ``intB``),
``--rounding stochastic,nearest`` adds round-to-nearest runs (biased: their bias z-scores
are the bias that nearest-rounding FP8 recipes accept; with nearest rounding the FQT
draws of one minibatch are identical, so the z over ``--batches × --repeats`` draws is
``√repeats`` times the z over the batches, reported as ``z_batches``).

Steps: build the task's model, convert it with the QAT-8 forward (8-bit per-tensor
weights and activations, round-to-nearest) and, with ``--train-steps K``, train it for
``K`` QAT steps so that gradients look like mid-training ones. Draw ``--batches``
disjoint random minibatches (images) or random windows (text). Compute the Jacobian
spectra of Theorem 2 on the first ``--bound-batches`` of them (they depend on the
forward only, so they serve every quantizer). Then for each format ``F`` and
quantizer ``Q``: the recipe's forward, ``Q`` on ``F`` on the ∇X path, and
**per-column (PSQ) 8-bit** on the ∇W path for every ``Q`` — the ``fqt-Q-B`` recipes do
this too except ``fqt-ptq-B``, which keeps ∇W per-tensor; holding ∇W fixed makes the runs
differ in the ∇X quantizer only (8-bit ∇W noise is ~(1/18)² of 4-bit noise anyway). Each
run gets :func:`~lowbit.analysis.gradient_variance` and, for ``--profile`` quantizers,
:func:`~lowbit.analysis.variance_profile`.

Outputs in ``--out``: ``variance.json``, ``variance.csv``, plots and ``summary.md``
(their keys: :mod:`lowbit.commands.variance_summary`).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.analysis._model import (
    capture,
    frozen_buffers,
    grad_input_operand,
    qat_of,
    with_config,
)
from lowbit.analysis.bins import bin_utilization, plot_bin_utilization
from lowbit.analysis.bounds import SPECTRUM_MODES, JacobianSpectrum, jacobian_spectrum
from lowbit.analysis.plots import plot_bounds, plot_profile
from lowbit.analysis.variance import VarianceProfile, VarianceReport, gradient_variance, variance_profile
from lowbit.config import FQTConfig, GradSpec
from lowbit.experiments.models import DEFAULT_MODEL, MODELS, build_model
from lowbit.experiments.train import check_out_dir
from lowbit.formats import FORMAT_NAMES, MAX_BITS, MIN_BITS, IntFormat, Rounding, parse_format
from lowbit.nn import convert, fqt_layers, frozen_ranges, range_stats
from lowbit.quantizers import QUANTIZERS
from lowbit.ranges import Overflow, RangeMode

from .variance_data import Data, warmup
from .variance_summary import command_line, jsonable, machine, summary, write_csv

TASKS = ("digits", "fashion-mnist", "text")
DEFAULT_BATCH_SIZE = {"digits": 32, "fashion-mnist": 32, "text": 16}
DEFAULT_LR = {"digits": 0.05, "fashion-mnist": 0.05, "text": 1e-3}
DEFAULT_SUBSET = {"digits": None, "fashion-mnist": 10_000, "text": 2_000_000}
RANGES = ("dynamic", "predicted", "predicted-clip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--task", required=True, help=f"one of {', '.join(TASKS)}")
    a("--model", default=None, help="model name for the task (default: the task's default)")
    a("--quantizers", default=",".join(QUANTIZERS),
      help=f"comma-separated ∇X-path quantizers from {', '.join(QUANTIZERS)}")
    a("--bits", default="4,8", help=f"comma-separated ∇X-path bit widths in {MIN_BITS}..{MAX_BITS} "
      "(symmetric integer grids; ignored with --formats)")
    a("--formats", default=None,
      help=f"comma-separated ∇X-path formats from {', '.join(FORMAT_NAMES)} (block formats "
      "also as NAME_spec: the OCP/NVFP4 scale rule that may clip)")
    a("--rounding", default="stochastic",
      help="comma-separated gradient rounding modes: stochastic, nearest (default stochastic)")
    a("--out", required=True, help="output folder (created)")
    a("--batches", type=int, default=12, help="minibatches for the decomposition (≥ 3)")
    a("--batch-size", type=int, default=None,
      help="minibatch size (default: 32 images, 16 windows)")
    a("--repeats", type=int, default=4, help="FQT draws per minibatch (≥ 2)")
    a("--seed", type=int, default=0)
    a("--subset", type=int, default=None,
      help="training images to load (fashion-mnist, default 10000; digits: all) or text bytes")
    a("--train-steps", type=int, default=0, help="QAT warm-up steps before measuring")
    a("--lr", type=float, default=None, help="warm-up learning rate (SGD images, AdamW text)")
    a("--bound-batches", type=int, default=1, help="minibatches with a Theorem 2 bound (0: none)")
    a("--spectrum", default="layer",
      help=f"Jacobian constants: {' or '.join(SPECTRUM_MODES)} (see jacobian_spectrum)")
    a("--power-iters", type=int, default=6, help="power-iteration steps per Jacobian constant")
    a("--ranges", default="dynamic",
      help=f"comma-separated gradient range modes from {', '.join(RANGES)} (default dynamic)")
    a("--range-margin", type=float, default=1.25,
      help="predicted range = margin × the largest recent absmax (≥ 1, default 1.25)")
    a("--range-history", type=int, default=16,
      help="predicted range: calls whose absmax is remembered (default 16)")
    a("--range-calibration", type=int, default=16,
      help="FQT backward passes that fill the predicted-range histories (default 16)")
    a("--profile", default=None,
      help="quantizers to profile layer by layer (default: all of --quantizers; 'none': off)")
    a("--profile-batches", type=int, default=1, help="minibatches of the profile")
    a("--profile-repeats", type=int, default=2, help="draws per minibatch and layer (≥ 2)")
    a("--bin-layer", default=None, help="layer whose ∇Y goes in the bin figure (default: middle)")
    a("--threads", type=int, default=None,
      help="torch CPU threads (default: torch's choice; 1 is often faster on a busy machine)")
    a("--quiet", action="store_true", help="no progress bars")


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


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} must be comma-separated integers in {MIN_BITS}..{MAX_BITS}, "
                         f"got {text!r}") from None
    bad = [v for v in vals if not MIN_BITS <= v <= MAX_BITS]
    if not vals or bad:
        raise ValueError(f"--{what} must be integers in {MIN_BITS}..{MAX_BITS}, got {text!r}")
    return vals


def _names(text: str, what: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    bad = [v for v in vals if v not in QUANTIZERS]
    if not vals or bad:
        raise ValueError(f"--{what}: unknown quantizer(s) {', '.join(bad) or repr(text)}; "
                         f"allowed: {', '.join(QUANTIZERS)}")
    return vals


def _formats(text: str) -> list[str]:
    vals = [x.strip() for x in text.split(",") if x.strip()]
    if not vals:
        raise ValueError("--formats must name at least one format")
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


def validate(args: argparse.Namespace) -> Options:
    """Check the arguments; raise ``ValueError`` with a line naming the allowed values."""
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}, got {args.task!r}")
    if args.model is not None and args.model not in MODELS[args.task]:
        raise ValueError(f"--model for task {args.task!r} must be one of "
                         f"{', '.join(MODELS[args.task])}, got {args.model!r}")
    if args.spectrum not in SPECTRUM_MODES:
        raise ValueError(f"--spectrum must be one of {', '.join(SPECTRUM_MODES)}, "
                         f"got {args.spectrum!r}")
    quantizers = _names(args.quantizers, "quantizers")
    if args.profile is None:
        profile = quantizers
    elif args.profile.strip().lower() == "none":
        profile = []
    else:
        profile = _names(args.profile, "profile")
    batches = _at_least("batches", args.batches, 3)
    bound = _at_least("bound-batches", args.bound_batches, 0)
    if bound > batches:
        raise ValueError(f"--bound-batches ({bound}) must be ≤ --batches ({batches})")
    pbatches = _at_least("profile-batches", args.profile_batches, 0)
    if pbatches > batches:
        raise ValueError(f"--profile-batches ({pbatches}) must be ≤ --batches ({batches})")
    if args.subset is not None:
        _at_least("subset", args.subset, 1)
    ranges = [x.strip() for x in args.ranges.split(",") if x.strip()]
    if not ranges or any(r not in RANGES for r in ranges):
        raise ValueError(f"--ranges must be a comma-separated list from {', '.join(RANGES)}, "
                         f"got {args.ranges!r}")
    margin = args.range_margin
    if not (math.isfinite(margin) and margin >= 1):
        raise ValueError(f"--range-margin must be a finite number ≥ 1, got {margin}")
    roundings = [x.strip() for x in args.rounding.split(",") if x.strip()]
    if not roundings or any(r not in ("stochastic", "nearest") for r in roundings):
        raise ValueError(f"--rounding must be a comma-separated list from stochastic, nearest, "
                         f"got {args.rounding!r}")
    bits = _int_list(args.bits, "bits")
    formats = [f"int{b}" for b in bits] if args.formats is None else _formats(args.formats)
    lr = DEFAULT_LR[args.task] if args.lr is None else args.lr
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    return Options(
        task=args.task, model=args.model, quantizers=quantizers,
        bits=sorted({parse_format(f).element_bits for f in formats}), formats=formats,
        roundings=list(dict.fromkeys(roundings)), out=Path(check_out_dir("--out", args.out)), batches=batches,
        batch_size=_at_least("batch-size", args.batch_size or DEFAULT_BATCH_SIZE[args.task], 2),
        repeats=_at_least("repeats", args.repeats, 2), seed=_at_least("seed", args.seed, 0),
        subset=args.subset if args.subset is not None else DEFAULT_SUBSET[args.task],
        train_steps=_at_least("train-steps", args.train_steps, 0), lr=lr,
        bound_batches=bound, spectrum=args.spectrum,
        power_iters=_at_least("power-iters", args.power_iters, 1), profile=profile,
        profile_batches=pbatches,
        profile_repeats=_at_least("profile-repeats", args.profile_repeats, 2),
        bin_layer=args.bin_layer,
        threads=None if args.threads is None else _at_least("threads", args.threads, 1),
        progress=not args.quiet, ranges=list(dict.fromkeys(ranges)),
        range_calibration=_at_least("range-calibration", args.range_calibration, 1),
        range_margin=margin, range_history=_at_least("range-history", args.range_history, 1),
    )


# -- the study ----------------------------------------------------------------------------
def _bin_study(model: nn.Module, data: Data, batch: object,
               opts: Options) -> tuple[dict, list[Path]]:
    """Capture the clean (QAT) ∇Y of one layer and map it on every quantizer's grid."""
    layers = fqt_layers(model)
    with frozen_buffers(model), with_config(model, qat_of), capture(model) as rec:
        model.zero_grad(set_to_none=True)
        data.loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
    eligible = [n for n, r in rec.items() if r.x_needs_grad and r.gy is not None]
    if opts.bin_layer is not None:
        if opts.bin_layer not in eligible:
            raise ValueError(f"--bin-layer must be one of {', '.join(eligible)}, "
                             f"got {opts.bin_layer!r}")
        name = opts.bin_layer
    else:
        name = eligible[len(eligible) // 2]
    a = grad_input_operand(layers[name], rec[name].gy)
    out: dict = {"layer": name, "shape": list(a.shape), "by_bits": {}}
    paths = []
    for bits in sorted({f.bits for f in map(parse_format, opts.formats) if isinstance(f, IntFormat)}):
        hists = bin_utilization(a, bits, opts.quantizers, torch.Generator().manual_seed(opts.seed))
        out["by_bits"][str(bits)] = {q: h.to_dict() for q, h in hists.items()}
        paths.append(plot_bin_utilization(
            hists, opts.out / f"bins_{bits}bit.png",
            f"{opts.task}: ∇Y of {name} {tuple(a.shape)} (rows = samples) on the {bits}-bit grid"))
    return out, paths


def _config(q: str, fmt: str, seed: int, ranges: str = "dynamic", margin: float = 1.25,
            history: int = 16, rounding: str = "stochastic") -> FQTConfig:
    """∇X path: ``q`` on ``fmt`` with ``rounding``; ∇W path: PSQ int8 (stochastic)."""
    mode = RangeMode.DYNAMIC if ranges == "dynamic" else RangeMode.PREDICTED
    kw = {"range": mode, "margin": margin, "history": history,
          "overflow": Overflow.CLIP if ranges == "predicted-clip" else Overflow.REQUANTIZE}
    return FQTConfig(grad_input=GradSpec(quantizer=q, format=fmt, rounding=Rounding(rounding), **kw),
                     grad_weight=GradSpec(8, "psq", **kw), seed=seed)


def _calibrate(model: nn.Module, data: Data, cfg: FQTConfig, opts: Options) -> None:
    """Fill the predicted-range histories of ``cfg`` with FQT backward passes on fresh
    training batches (weights and BatchNorm statistics untouched)."""
    gen = torch.Generator().manual_seed(opts.seed + 7_777)
    with with_config(model, lambda _: cfg), frozen_buffers(model):
        for batch in data.train(opts.range_calibration, gen):
            model.zero_grad(set_to_none=True)
            data.loss(model, batch).backward()
    model.zero_grad(set_to_none=True)


def _label(q: str, fmt: str, ranges: str, rounding: str = "stochastic") -> str:
    return (f"{q}-{fmt}" + ("" if ranges == "dynamic" else f"-{ranges}")
            + ("" if rounding == "stochastic" else "-nearest"))


def run(args: argparse.Namespace) -> int:
    opts = validate(args)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    model_name = opts.model or DEFAULT_MODEL[opts.task]
    data = Data(opts)
    model = build_model(opts.task, model_name)
    model.train()
    convert(model, qat_of(_config(opts.quantizers[0], opts.formats[0], opts.seed)))

    t = time.perf_counter()
    warm = warmup(model, data, opts, gen)
    seconds["warmup"] = time.perf_counter() - t
    batches = data.study(opts.batches, gen)

    t = time.perf_counter()
    spectra: list[JacobianSpectrum] = []
    for i in range(opts.bound_batches):
        spectra.append(jacobian_spectrum(model, data.loss, batches[i],
                                         _config(opts.quantizers[0], opts.formats[0], opts.seed),
                                         mode=opts.spectrum,
                                         iters=opts.power_iters, seed=opts.seed + i,
                                         progress=opts.progress))
    seconds["spectra"] = time.perf_counter() - t

    t = time.perf_counter()
    bins, _ = _bin_study(model, data, batches[0], opts)
    seconds["bins"] = time.perf_counter() - t

    runs: list[dict] = []
    reports: list[tuple[str, VarianceReport]] = []
    profiles: list[tuple[str, VarianceProfile]] = []
    t = time.perf_counter()
    combos = [(f, q, r, rd) for f in opts.formats for q in opts.quantizers for r in opts.ranges
              for rd in opts.roundings]
    for fmt, q, rmode, rnd in combos:
        if rmode != "dynamic" and (parse_format(fmt).block or parse_format(fmt).asymmetric):
            continue  # predicted ranges serve symmetric per-row/tensor formats only
        t_run = time.perf_counter()
        bits = parse_format(fmt).element_bits
        cfg = _config(q, fmt, opts.seed, rmode, opts.range_margin, opts.range_history, rnd)
        extra: dict = {"range": rmode, "format": fmt, "rounding": rnd}
        if rmode == "dynamic":
            rep = gradient_variance(model, data.loss, batches, cfg, opts.repeats,
                                    spectra=spectra, seed=opts.seed, progress=opts.progress)
        else:
            _calibrate(model, data, cfg, opts)
            before = range_stats(model)["total"]
            with frozen_ranges(model):
                rep = gradient_variance(model, data.loss, batches, cfg, opts.repeats,
                                        spectra=spectra, seed=opts.seed,
                                        progress=opts.progress)
            extra["range_stats"] = (range_stats(model)["total"] - before).to_dict()
        if rnd == "nearest":  # identical draws per batch: the z over the batches alone
            extra["z_batches"] = rep.max_abs_z / math.sqrt(opts.repeats)
        prof = None
        if rmode == "dynamic" and rnd == "stochastic" and q in opts.profile and opts.profile_batches:
            pb = opts.profile_batches
            prof = variance_profile(model, data.loss, batches[:pb], cfg, opts.profile_repeats,
                                    spectra=spectra[:pb] if len(spectra) >= pb else None,
                                    seed=opts.seed, progress=opts.progress)
            plot_profile(prof, opts.out / f"profile_{q}_{fmt}.png",
                         f"{opts.task}/{model_name}: ∇X {q.upper()} {fmt}, ∇W PSQ int8, "
                         "one layer quantized at a time")
            profiles.append((f"{q}-{fmt}", prof))
        reports.append((_label(q, fmt, rmode, rnd), rep))
        runs.append({"quantizer": q, "bits": bits, **extra,
                     "seconds": time.perf_counter() - t_run,
                     "report": rep.to_dict(), "profile": prof.to_dict() if prof else None})
    seconds["runs"] = time.perf_counter() - t
    if spectra:
        plot_bounds(reports, opts.out / "bounds.png",
                    f"{opts.task}/{model_name}: quantization variance vs Theorem 2 bound")
    seconds["total"] = time.perf_counter() - t_start

    groups = list(next(iter(reports))[1].groups) if reports else []
    result = {
        "command": command_line(opts),
        "machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v
                                         for k, v in asdict(opts).items()},
        "task": opts.task, "model": model_name, "data": data.source, "warmup": warm,
        "groups": groups, "layers": list(fqt_layers(model)),
        "spectra": [s.to_dict() for s in spectra], "bins": bins, "runs": runs,
        "seconds": seconds,
    }
    (opts.out / "variance.json").write_text(json.dumps(result, indent=1, default=jsonable))
    write_csv(opts.out / "variance.csv", runs)
    (opts.out / "summary.md").write_text(summary(result, reports, profiles))
    print(f"lowbit variance: wrote {opts.out}/variance.json, variance.csv, summary.md and plots "
          f"in {seconds['total']:.0f} s")
    return 0




__all__ = ["add_arguments", "run", "validate"]
