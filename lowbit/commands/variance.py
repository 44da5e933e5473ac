"""``lowbit variance``: variance decomposition, Theorem 2 bounds and bin utilization.

    lowbit variance --task fashion-mnist --quantizers ptq,psq,bhq,hadamard --bits 4 \\
        --out runs/variance --subset 4000 --train-steps 100 --batches 12 --repeats 4

``--formats int4,int4a,fp8_e5m2,mxfp4,nvfp4`` measures the ∇X path on those number
formats (:mod:`lowbit.formats`; instead of ``--bits``, which is shorthand for ``intB``),
``--rounding stochastic,nearest`` adds round-to-nearest runs (biased: their bias z-scores
are the bias that nearest-rounding FP8 recipes accept; with nearest rounding on the ∇X
path the FQT draws of one minibatch differ only by the ∇W path's stochastic noise, so the
z over ``--batches × --repeats`` draws is about ``√repeats`` times the z over the batches,
reported as ``z_batches`` — approximate where that ∇W noise is not small).

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
(their keys: :mod:`lowbit.commands.variance_summary`). The options and their checks:
:mod:`lowbit.commands.variance_args`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lowbit.analysis._model import (
    capture,
    frozen_buffers,
    gemm_layers,
    grad_input_operand,
    qat_of,
    with_config,
)
from lowbit.analysis.bins import bin_utilization, plot_bin_utilization
from lowbit.analysis.bounds import JacobianSpectrum, jacobian_spectrum
from lowbit.analysis.plots import plot_bounds, plot_profile
from lowbit.analysis.variance import (
    VarianceProfile,
    VarianceReport,
    gradient_variance,
    unbounded_note,
    variance_profile,
)
from lowbit.config import FQTConfig, GradSpec
from lowbit.conversion import quote_module
from lowbit.experiments.models import DEFAULT_MODEL, build_model
from lowbit.experiments.rundir import write_atomic
from lowbit.formats import IntFormat, Rounding, parse_format
from lowbit.jsonfile import dumps
from lowbit.nn import RangeWindow, convert, frozen_ranges
from lowbit.ranges import Overflow, RangeMode

from ..noise import torch_seed
from .variance_args import RESULTS, Options, add_arguments, validate
from .variance_data import Data, warmup
from .variance_summary import command_line, jsonable, machine, summary, write_csv


# -- the study ----------------------------------------------------------------------------
def _stage(opts: Options, text: str) -> None:
    """One line on stderr where there are no progress bars (stderr not a terminal: a log,
    ``| tee``, a batch job) and not ``--quiet``: a long measurement says what it is doing."""
    if opts.stages:
        print(f"lowbit variance: {text} ...", file=sys.stderr, flush=True)


def _bin_study(model: nn.Module, data: Data, batch: object,
               opts: Options) -> tuple[dict, list[Path]]:
    """Capture the clean (QAT) ∇Y of one layer and map it on every quantizer's grid."""
    layers = gemm_layers(model)
    with frozen_buffers(model), with_config(model, qat_of), capture(model) as rec:
        model.zero_grad(set_to_none=True)
        data.loss(model, batch).backward()
        model.zero_grad(set_to_none=True)
    eligible = [n for n, r in rec.items() if r.x_needs_grad and r.gy is not None]
    if opts.bin_layer is not None:
        if opts.bin_layer not in eligible:
            raise ValueError(f"--bin-layer must be one of {', '.join(map(quote_module, eligible))}, "
                             f"got {opts.bin_layer!r}")
        name = opts.bin_layer
    else:
        name = eligible[len(eligible) // 2]
    a = grad_input_operand(layers[name], rec[name].gy)
    out: dict = {"layer": name, "shape": list(a.shape), "by_bits": {}}
    paths = []
    # the study's grids are the symmetric ones (analysis.bins: IntFormat(bits)); an
    # asymmetric format's grid is another (a review: int4a read the int4 table)
    for bits in sorted({f.bits for f in map(parse_format, opts.formats) if isinstance(f, IntFormat)
                        and not f.asymmetric}):
        hists = bin_utilization(a, bits, opts.quantizers, torch.Generator().manual_seed(torch_seed(opts.seed)))
        out["by_bits"][str(bits)] = {q: h.to_dict() for q, h in hists.items()}
        paths.append(plot_bin_utilization(
            hists, opts.out / f"bins_{bits}bit.png",
            f"{opts.task}: ∇Y of {quote_module(name)} {tuple(a.shape)} (rows = {'tokens' if opts.task == 'text' else 'samples'}) on the {bits}-bit grid"))
    return out, paths


def _config(q: str, fmt: str, seed: int, ranges: str = "dynamic", margin: float = 1.25,
            history: int = 16, rounding: str = "stochastic") -> FQTConfig:
    """∇X path: ``q`` on ``fmt`` with ``rounding``; ∇W path: PSQ int8 (stochastic)."""
    kw: dict = {"range": RangeMode.DYNAMIC}  # the predicted-range settings for predicted ranges only
    if ranges != "dynamic":
        kw = {"range": RangeMode.PREDICTED, "margin": margin, "history": history,
              "overflow": Overflow.CLIP if ranges == "predicted-clip" else Overflow.REQUANTIZE}
    return FQTConfig(grad_input=GradSpec(quantizer=q, format=fmt, rounding=Rounding(rounding), **kw),
                     grad_weight=GradSpec(8, "psq", **kw), seed=seed)


def _calibrate(model: nn.Module, data: Data, cfg: FQTConfig, opts: Options) -> None:
    """Fill the predicted-range histories of ``cfg`` with FQT backward passes on fresh
    training batches (weights and BatchNorm statistics untouched)."""
    gen = torch.Generator().manual_seed(torch_seed(opts.seed + 7_777))
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
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(torch_seed(opts.seed))
    gen = torch.Generator().manual_seed(torch_seed(opts.seed))
    model_name = opts.model or DEFAULT_MODEL[opts.task]
    data = Data(opts)  # raises for missing data before --out exists (it was left empty)
    created = not opts.out.exists()
    opts.out.mkdir(parents=True, exist_ok=True)
    for name in RESULTS:  # --overwrite: every file of the earlier run (check_out_dir refused them without it)
        (opts.out / name).unlink(missing_ok=True)
    written: list[bool] = []  # set once the results are whole (variance.json, .csv, summary.md)
    try:
        return _study(opts, data, gen, model_name, seconds, t_start, written)
    except BaseException:
        if written:  # a failure after them (the bounds plot, a closed stdout) keeps them (a review)
            raise
        # an interrupted or failed study leaves no part of its results: a plot without its
        # variance.json was left, and refused the rerun as "an earlier run's" (a trial)
        for name in RESULTS:
            (opts.out / name).unlink(missing_ok=True)
        if created and not any(opts.out.iterdir()):
            opts.out.rmdir()
        raise


def _study(opts: Options, data: Data, gen: torch.Generator, model_name: str, seconds: dict[str, float],
           t_start: float, written: list[bool]) -> int:
    """The study of :func:`run` once ``opts.out`` exists: its measurements, files and summary
    (``written`` gets ``True`` once the results are whole)."""
    model = build_model(opts.task, model_name)
    model.train()
    convert(model, qat_of(_config(opts.quantizers[0], opts.formats[0], opts.seed)))

    t = time.perf_counter()
    if opts.train_steps:
        _stage(opts, f"warm-up ({opts.train_steps} training steps)")
    warm = warmup(model, data, opts, gen)
    seconds["warmup"] = time.perf_counter() - t
    batches = data.study(opts.batches, gen)

    t = time.perf_counter()
    spectra: list[JacobianSpectrum] = []
    # quantized attention products have no term in the bound: gradient_variance leaves the
    # groups upstream of them undecided and bounds the others (a review found every group's
    # bound skipped for a model with attention, the layers after it too)
    if opts.bound_batches:
        _stage(opts, f"Jacobian spectra of {opts.bound_batches} minibatch(es), for the bound")
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
    skipped = sorted({f"{fmt} with {rmode} ranges" for fmt, _, rmode, _ in combos
                      if rmode != "dynamic" and (parse_format(fmt).block or parse_format(fmt).asymmetric)})
    if skipped:  # (variance_args refuses a command where every combination is skipped)
        print(f"lowbit variance: not measured (predicted ranges serve symmetric integer and FP8 formats "
              f"only): {'; '.join(skipped)}", file=sys.stderr)
    # predicted ranges serve symmetric per-row/tensor formats only (the skipped ones named above)
    measured = [c for c in combos if c[2] == "dynamic" or not (parse_format(c[0]).block or parse_format(c[0]).asymmetric)]
    for i, (fmt, q, rmode, rnd) in enumerate(measured):
        _stage(opts, f"[{i + 1}/{len(measured)}] {_label(q, fmt, rmode, rnd)}: {opts.batches} minibatches × "
                     f"{opts.repeats} draws")
        t_run = time.perf_counter()
        bits = parse_format(fmt).element_bits
        cfg = _config(q, fmt, opts.seed, rmode, opts.range_margin, opts.range_history, rnd)
        extra: dict = {"range": rmode, "format": fmt, "rounding": rnd}
        if rmode == "dynamic":
            rep = gradient_variance(model, data.loss, batches, cfg, opts.repeats,
                                    spectra=spectra, seed=opts.seed, progress=opts.progress)
        else:
            _calibrate(model, data, cfg, opts)
            with frozen_ranges(model), RangeWindow(model) as window:
                rep = gradient_variance(model, data.loss, batches, cfg, opts.repeats,
                                        spectra=spectra, seed=opts.seed,
                                        progress=opts.progress)
            extra["range_stats"] = window.stats.to_dict()  # type: ignore[union-attr]
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
    # the bounds are computed for the operand's own dynamic grid (the summary says "–" for
    # predicted ranges): only those runs are plotted against them
    dynamic = [(label, rep) for label, rep in reports if "-predicted" not in label]
    seconds["total"] = time.perf_counter() - t_start

    groups = list(next(iter(reports))[1].groups) if reports else []
    unbounded = {g: b for _, rep in reports for g, b in rep.unbounded.items()}
    bound_note = None
    if unbounded:  # the "–" bound cells of the groups upstream of attention, with their reason
        bound_note = (f"{model_name} quantizes attention products, for which the Theorem 2 bound has no term: "
                      f"{unbounded_note(unbounded)}")
    result = {
        "command": command_line(opts),
        "machine": machine(), "args": {k: str(v) if isinstance(v, Path) else v
                                         for k, v in asdict(opts).items()},
        "task": opts.task, "model": model_name, "data": data.source, "warmup": warm,
        "groups": groups, "layers": list(gemm_layers(model)),
        "spectra": [s.to_dict() for s in spectra], "bound_note": bound_note, "bins": bins, "runs": runs,
        "seconds": seconds,
    }
    write_atomic(opts.out / "variance.json", dumps(result, indent=1, default=jsonable))
    write_csv(opts.out / "variance.csv", runs)
    text = summary(result, reports, profiles)
    write_atomic(opts.out / "summary.md", text)
    written.append(True)
    if spectra and dynamic:  # after the results are written
        plot_bounds(dynamic, opts.out / "bounds.png",
                    f"{opts.task}/{model_name}: quantization variance vs Theorem 2 bound")
    print(text)
    print(f"lowbit variance: wrote {opts.out}/variance.json, variance.csv, summary.md and plots "
          f"in {seconds['total']:.0f} s")
    return 0




__all__ = ["add_arguments", "run", "validate"]
