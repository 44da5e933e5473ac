"""``lowbit variance``: variance decomposition, Theorem 2 bounds and bin utilization.

    lowbit variance --task fashion-mnist --quantizers ptq,psq,bhq,hadamard --bits 4 \\
        --out runs/variance --subset 4000 --train-steps 100 --batches 12 --repeats 4

Steps: build the task's model, convert it with the QAT-8 forward (8-bit per-tensor
weights and activations, round-to-nearest) and, with ``--train-steps K``, train it for
``K`` QAT steps so that gradients look like mid-training ones. Draw ``--batches``
disjoint random minibatches (images) or random windows (text). Compute the Jacobian
spectra of Theorem 2 on the first ``--bound-batches`` of them (they depend on the
forward only, so they serve every quantizer). Then for each bit width ``B`` and
quantizer ``Q``: the recipe's forward, ``Q`` with ``B`` bits on the ∇X path, and
**per-column (PSQ) 8-bit** on the ∇W path for every ``Q`` — the ``fqt-Q-B`` recipes do
this too except ``fqt-ptq-B``, which keeps ∇W per-tensor; holding ∇W fixed makes the runs
differ in the ∇X quantizer only (8-bit ∇W noise is ~(1/18)² of 4-bit noise anyway). Each
run gets :func:`~lowbit.analysis.gradient_variance` and, for ``--profile`` quantizers,
:func:`~lowbit.analysis.variance_profile`.

Outputs in ``--out``:

* ``variance.json`` — everything, keys:

  - ``command``, ``machine`` (platform, CPU count, torch version and threads), ``args``;
  - ``warmup``: ``steps``, ``loss_first``, ``loss_last`` (mean of the first/last 10 steps);
  - ``groups``: parameter groups (converted layers by name, ``other``) and ``layers``;
  - ``spectra``: per bound batch, ``mode``, ``lam[layer][group]``, ``lam_total[layer]``,
    ``rel_change``, ``iters``, ``gram[layer]`` (see :class:`JacobianSpectrum`);
  - ``bins``: ``layer`` (whose ∇Y, rows = samples), and per bit width per quantizer the
    :class:`~lowbit.analysis.bins.BinHistogram` (``levels``, ``counts``, ``effective``,
    ``occupied``);
  - ``runs``: one per (quantizer, bits) with ``quantizer``, ``bits``, ``seconds``,
    ``report`` (:meth:`VarianceReport.to_dict`: ``groups[g]`` with ``sgd``, ``quant``,
    ``total`` and their ``*_se``, ``gap``, ``gap_se``, ``rel_gap``, ``z_grad``,
    ``z_rand``, ``max_abs_z``, ``quant_bound_batches``, ``pred_data``,
    ``pred_analytic``, ``tightness_data``, ``tightness_analytic``; ``layers[l]`` the
    quantizer variances of :class:`LayerNoise`; ``pairs_data``/``pairs_analytic``) and
    ``profile`` (:meth:`VarianceProfile.to_dict` or null);
  - ``seconds``: wall time per stage.

    With ``--ranges dynamic,predicted,predicted-clip`` every (quantizer, bits) is also
    measured with predicted gradient ranges (``lowbit.ranges``; ``predicted`` re-quantizes
    on overflow, ``predicted-clip`` clips): the histories are first filled by
    ``--range-calibration`` FQT backward passes on fresh training batches (no weight
    update), then frozen for the study; such runs add ``range`` and ``range_stats`` (the
    overflow counters of the study, :class:`~lowbit.ranges.RangeStats`) and skip the
    profile.

* ``variance.csv`` — one row per (quantizer, bits, range, group) with the ``groups`` fields;
* ``bins_<B>bit.png`` — bin utilization; ``profile_<Q><B>.png`` — variance profile
  heatmaps; ``bounds.png`` — measured against predicted; ``summary.md``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FQTConfig, GradSpec
from ..formats import MAX_BITS, MIN_BITS
from ..nn import convert, fqt_layers, frozen_ranges, range_stats
from ..quantizers import QUANTIZERS
from ..ranges import Overflow, RangeMode
from ._model import (
    LossFn,
    capture,
    frozen_buffers,
    grad_input_operand,
    progress_bar,
    qat_of,
    with_config,
)
from .bins import BinHistogram, bin_utilization, plot_bin_utilization
from .bounds import SPECTRUM_MODES, JacobianSpectrum, jacobian_spectrum
from .plots import plot_bounds, plot_profile
from .variance import (
    GroupVariance,
    VarianceProfile,
    VarianceReport,
    gradient_variance,
    variance_profile,
)

TASKS = ("digits", "fashion-mnist", "text")
DEFAULT_BATCH_SIZE = {"digits": 32, "fashion-mnist": 32, "text": 16}
DEFAULT_LR = {"digits": 0.05, "fashion-mnist": 0.05, "text": 1e-3}
DEFAULT_SUBSET = {"digits": None, "fashion-mnist": 10_000, "text": 2_000_000}
TEXT_BLOCK = 64  # tokens per window
RANGES = ("dynamic", "predicted", "predicted-clip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--task", required=True, help=f"one of {', '.join(TASKS)}")
    a("--model", default=None, help="model name for the task (default: the task's default)")
    a("--quantizers", default=",".join(QUANTIZERS),
      help=f"comma-separated ∇X-path quantizers from {', '.join(QUANTIZERS)}")
    a("--bits", default="4,8", help=f"comma-separated ∇X-path bit widths in {MIN_BITS}..{MAX_BITS}")
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


def _at_least(name: str, value: int, low: int) -> int:
    if value < low:
        raise ValueError(f"--{name} must be ≥ {low}, got {value}")
    return value


def validate(args: argparse.Namespace) -> Options:
    """Check the arguments; raise ``ValueError`` with a line naming the allowed values."""
    from ..experiments.models import MODELS
    from ..experiments.train import check_out_dir

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
    lr = DEFAULT_LR[args.task] if args.lr is None else args.lr
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    return Options(
        task=args.task, model=args.model, quantizers=quantizers,
        bits=_int_list(args.bits, "bits"), out=Path(check_out_dir("--out", args.out)), batches=batches,
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


# -- data and model -----------------------------------------------------------------------
def _image_loss(model: nn.Module, batch: object) -> torch.Tensor:
    x, y = batch  # (B, 1, H, W), (B,)
    return F.cross_entropy(model(x), y)


def _text_loss(model: nn.Module, batch: object) -> torch.Tensor:
    x, y = batch  # (B, T), (B, T)
    return model(x, y)[1]


class _Data:
    """Minibatches of the task: ``train(gen)`` for the warm-up, ``study(n)`` for the study."""

    def __init__(self, opts: Options) -> None:
        from ..experiments import data as D

        self.opts = opts
        if opts.task == "text":
            corpus, self.source = D.load_text_corpus(max_bytes=opts.subset)
            self.tokens, _ = D.split_text(corpus)
            self.loss: LossFn = _text_loss
            return
        if opts.task == "digits":
            d = D.load_digits_tensors(seed=opts.seed)
            x, y = d.x_train, d.y_train
            if opts.subset is not None:
                x, y = x[: opts.subset], y[: opts.subset]
            self.source = "sklearn digits"
        else:
            d = D.load_fashion_mnist(subset=opts.subset, seed=opts.seed)
            x, y = d.x_train, d.y_train
            self.source = f"fashion-mnist ({len(y)} training images)"
        self.x, self.y = x, y
        self.loss = _image_loss

    def _window(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from ..experiments.data import text_batches
        return text_batches(self.tokens, TEXT_BLOCK, self.opts.batch_size, gen)

    def train(self, steps: int, gen: torch.Generator):
        bs = self.opts.batch_size
        done = 0
        while done < steps:
            if self.opts.task == "text":
                yield self._window(gen)
                done += 1
                continue
            order = torch.randperm(len(self.y), generator=gen)
            for i in range(0, len(order) - bs + 1, bs):
                if done == steps:
                    return
                idx = order[i:i + bs]
                yield self.x[idx], self.y[idx]
                done += 1

    def study(self, n: int, gen: torch.Generator) -> list[object]:
        """``n`` disjoint random minibatches (text: random windows)."""
        bs = self.opts.batch_size
        if self.opts.task == "text":
            return [self._window(gen) for _ in range(n)]
        if n * bs > len(self.y):
            raise ValueError(f"--batches × --batch-size = {n * bs} exceeds the {len(self.y)} "
                             "training examples loaded (raise --subset or lower them)")
        order = torch.randperm(len(self.y), generator=gen)
        return [(self.x[order[i * bs:(i + 1) * bs]], self.y[order[i * bs:(i + 1) * bs]])
                for i in range(n)]


def _warmup(model: nn.Module, data: _Data, opts: Options, gen: torch.Generator) -> dict:
    """``train_steps`` QAT steps (SGD momentum 0.9 for images, AdamW for text)."""
    if opts.train_steps == 0:
        return {"steps": 0}
    params = [p for p in model.parameters() if p.requires_grad]
    if opts.task == "text":
        opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=0.01)
    else:
        opt = torch.optim.SGD(params, lr=opts.lr, momentum=0.9, weight_decay=5e-4)
    losses = []
    bar = progress_bar(opts.train_steps, "QAT warm-up", opts.progress)
    for batch in data.train(opts.train_steps, gen):
        opt.zero_grad(set_to_none=True)
        loss = data.loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
    bar.close()
    opt.zero_grad(set_to_none=True)
    k = min(10, len(losses))
    return {"steps": len(losses), "lr": opts.lr, "loss_first": sum(losses[:k]) / k,
            "loss_last": sum(losses[-k:]) / k}


# -- the study ----------------------------------------------------------------------------
def _bin_study(model: nn.Module, data: _Data, batch: object,
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
    for bits in opts.bits:
        hists = bin_utilization(a, bits, opts.quantizers, torch.Generator().manual_seed(opts.seed))
        out["by_bits"][str(bits)] = {q: h.to_dict() for q, h in hists.items()}
        paths.append(plot_bin_utilization(
            hists, opts.out / f"bins_{bits}bit.png",
            f"{opts.task}: ∇Y of {name} {tuple(a.shape)} (rows = samples) on the {bits}-bit grid"))
    return out, paths


def _config(q: str, bits: int, seed: int, ranges: str = "dynamic",
            margin: float = 1.25, history: int = 16) -> FQTConfig:
    mode = RangeMode.DYNAMIC if ranges == "dynamic" else RangeMode.PREDICTED
    kw = {"range": mode, "margin": margin, "history": history,
          "overflow": Overflow.CLIP if ranges == "predicted-clip" else Overflow.REQUANTIZE}
    return FQTConfig(grad_input=GradSpec(bits, q, **kw), grad_weight=GradSpec(8, "psq", **kw),
                     seed=seed)


def _calibrate(model: nn.Module, data: _Data, cfg: FQTConfig, opts: Options) -> None:
    """Fill the predicted-range histories of ``cfg`` with FQT backward passes on fresh
    training batches (weights and BatchNorm statistics untouched)."""
    gen = torch.Generator().manual_seed(opts.seed + 7_777)
    with with_config(model, lambda _: cfg), frozen_buffers(model):
        for batch in data.train(opts.range_calibration, gen):
            model.zero_grad(set_to_none=True)
            data.loss(model, batch).backward()
    model.zero_grad(set_to_none=True)


def _label(q: str, bits: int, ranges: str) -> str:
    return f"{q}-{bits}" + ("" if ranges == "dynamic" else f"-{ranges}")


def run(args: argparse.Namespace) -> int:
    opts = validate(args)
    from ..experiments.models import DEFAULT_MODEL, build_model

    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    model_name = opts.model or DEFAULT_MODEL[opts.task]
    data = _Data(opts)
    model = build_model(opts.task, model_name)
    model.train()
    convert(model, qat_of(_config(opts.quantizers[0], opts.bits[0], opts.seed)))

    t = time.perf_counter()
    warm = _warmup(model, data, opts, gen)
    seconds["warmup"] = time.perf_counter() - t
    batches = data.study(opts.batches, gen)

    t = time.perf_counter()
    spectra: list[JacobianSpectrum] = []
    for i in range(opts.bound_batches):
        spectra.append(jacobian_spectrum(model, data.loss, batches[i],
                                         _config(opts.quantizers[0], opts.bits[0], opts.seed),
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
    for bits in opts.bits:
        for q, rmode in ((q, r) for q in opts.quantizers for r in opts.ranges):
            t_run = time.perf_counter()
            cfg = _config(q, bits, opts.seed, rmode, opts.range_margin, opts.range_history)
            extra: dict = {"range": rmode}
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
            prof = None
            if rmode == "dynamic" and q in opts.profile and opts.profile_batches:
                pb = opts.profile_batches
                prof = variance_profile(model, data.loss, batches[:pb], cfg, opts.profile_repeats,
                                        spectra=spectra[:pb] if len(spectra) >= pb else None,
                                        seed=opts.seed, progress=opts.progress)
                plot_profile(prof, opts.out / f"profile_{q}{bits}.png",
                             f"{opts.task}/{model_name}: ∇X {q.upper()}-{bits}, ∇W PSQ-8, "
                             "one layer quantized at a time")
                profiles.append((f"{q}-{bits}", prof))
            reports.append((_label(q, bits, rmode), rep))
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
        "command": _command(opts),
        "machine": _machine(), "args": {k: str(v) if isinstance(v, Path) else v
                                         for k, v in asdict(opts).items()},
        "task": opts.task, "model": model_name, "data": data.source, "warmup": warm,
        "groups": groups, "layers": list(fqt_layers(model)),
        "spectra": [s.to_dict() for s in spectra], "bins": bins, "runs": runs,
        "seconds": seconds,
    }
    (opts.out / "variance.json").write_text(json.dumps(result, indent=1, default=_jsonable))
    _write_csv(opts.out / "variance.csv", runs)
    (opts.out / "summary.md").write_text(_summary(result, reports, profiles))
    print(f"lowbit variance: wrote {opts.out}/variance.json, variance.csv, summary.md and plots "
          f"in {seconds['total']:.0f} s")
    return 0


def _command(opts: Options) -> str:
    """The command line as typed (``lowbit variance …``), or rebuilt from the options when
    ``run`` was called from Python."""
    argv = sys.argv
    if "variance" in argv:
        return "lowbit " + " ".join(argv[argv.index("variance"):])
    parts = ["lowbit variance", f"--task {opts.task}", f"--quantizers {','.join(opts.quantizers)}",
             f"--bits {','.join(map(str, opts.bits))}", f"--out {opts.out}",
             f"--batches {opts.batches}", f"--batch-size {opts.batch_size}",
             f"--repeats {opts.repeats}", f"--seed {opts.seed}",
             f"--train-steps {opts.train_steps}",
             f"--spectrum {opts.spectrum}", f"--power-iters {opts.power_iters}"]
    if opts.model:
        parts.insert(2, f"--model {opts.model}")
    return " ".join(parts)


def _jsonable(x: object) -> object:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def _machine() -> dict:
    return {"platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


CSV_FIELDS = [f for f in GroupVariance.__dataclass_fields__]


def _write_csv(path: Path, runs: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["quantizer", "bits", "range", "group", *CSV_FIELDS])
        for r in runs:
            for g, st in r["report"]["groups"].items():
                w.writerow([r["quantizer"], r["bits"], r["range"], g,
                            *[st[f] for f in CSV_FIELDS]])


def _e(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def _tight(g: GroupVariance) -> str:
    t = g.tightness_data
    if t > 1 and g.quant_bound_batches > 0 and math.isfinite(g.quant_bound_batches_se):
        return f"{t:.3g} ± {t * g.quant_bound_batches_se / g.quant_bound_batches:.2g}"
    return _e(t)


def _range_section(res: dict, reports: list[tuple[str, VarianceReport]]) -> list[str]:
    """Predicted against dynamic ranges: variance ratio, bias and overflow counters."""
    by_label = dict(reports)
    rows = []
    for run, (_, rep) in zip(res["runs"], reports):
        if run["range"] == "dynamic":
            continue
        st = run["range_stats"]
        dyn = by_label.get(f"{run['quantizer']}-{run['bits']}")
        g = rep.groups["total"]
        ratio = _e(g.quant / dyn.groups["total"].quant) if dyn and dyn.groups["total"].quant else "–"
        rows.append(f"| {run['quantizer']} | {run['bits']} | {run['range']} | {_e(g.quant)} | {ratio} | "
                    f"{rep.max_abs_z:.2f} | {st['overflow_calls']} / {st['calls']} | "
                    f"{st['overflow_rate']:.2e} | {st['clipped_norm']:.2e} |")
    if not rows:
        return []
    return ["", "## Predicted ranges against dynamic ranges", "",
            ("| ∇X quantizer | bits | range | quant var | / dynamic | max abs z (bias) "
             "| calls with overflow | elements beyond range | clipped norm / norm |"),
            "|---|---|---|---|---|---|---|---|---|", *rows, "",
            ("Histories filled by FQT backward passes on fresh training batches, then frozen; "
             "the counters cover the study's draws. `predicted` re-quantizes a call that "
             "overflows (unbiased), `predicted-clip` clips it (biased by the clipped mass).")]


def _summary(res: dict, reports: list[tuple[str, VarianceReport]],
             profiles: list[tuple[str, VarianceProfile]]) -> str:
    m = res["machine"]
    lines = [f"# Variance study: {res['task']} / {res['model']}", "",
             f"Command: `{res['command']}`  ",
             (f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} "
              f"({m['torch_threads']} threads); total {res['seconds']['total']:.0f} s  "),
             f"Data: {res['data']}; warm-up: {res['warmup']}", ""]
    ptq = {int(label.split("-")[1]): r.groups["total"].quant for label, r in reports
           if label.startswith("ptq-") and label.count("-") == 1}
    lines += ["## Decomposition, all parameters (Theorem 2)", "",
              ("| ∇X quantizer | bits | SGD var | quant var | PTQ / this | total "
               "| gap / total (± s.e.) | max abs z (bias) | bound holds: data / analytic "
               "| tightness total: data / analytic |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label, rep in reports:
        q, b, *mode = label.split("-", 2)
        q = f"{q} ({mode[0]} range)" if mode else q
        g = rep.groups["total"]
        ratio = _e(ptq[int(b)] / g.quant) if int(b) in ptq and g.quant > 0 else "–"
        holds = "–" if not rep.bound_batches else " / ".join(
            "NO " + ",".join(v) if (v := rep.bound_violations(k)) else "yes"
            for k in ("data", "analytic"))
        lines.append(f"| {q} | {b} | {_e(g.sgd)} | {_e(g.quant)} | {ratio} | {_e(g.total)} | "
                     f"{g.rel_gap:+.3f} ± {g.gap_se / g.total if g.total else 0:.3f} | "
                     f"{rep.max_abs_z:.2f} | {holds} | {_e(g.tightness_data)} / "
                     f"{_e(g.tightness_analytic)} |")
    if reports and reports[0][1].bound_batches:
        lines += ["", "## Tightness per parameter group (measured / data-dependent bound)", "",
                  "| group | " + " | ".join(label for label, _ in reports) + " |",
                  "|---|" + "---|" * len(reports)]
        for gname in reports[0][1].groups:
            lines.append(f"| {gname} | " + " | ".join(_tight(r.groups[gname])
                                                     for _, r in reports) + " |")
        lines += ["", ("Where a group's only noise is its own ∇W-path noise (the last layer), the "
                  "prediction is exact, not a bound: the ratio straddles 1 and is shown ± its "
                  "standard error when above 1. A violation counts only beyond 3 s.e.")]
        changes = [c for s in reports[0][1].spectra for row in s.rel_change.values()
                   for c in row.values()]
        if changes:
            changes.sort()
            lines.append(f"Power iteration ({reports[0][1].spectra[0].mode}): last relative "
                         f"change median {changes[len(changes) // 2]:.3g}, max {changes[-1]:.3g}.")
    if profiles:
        lines += ["", ("## Variance profile: each layer quantized alone, contribution to all "
                       "parameters (measured, and measured / data-dependent bound)"), "",
                  "| layer | "
                  + " | ".join(f"{label} var | {label} tight." for label, _ in profiles)
                  + " |", "|---|" + "---|---|" * len(profiles)]
        p0 = profiles[0][1]
        for i, layer in enumerate(p0.layers):
            cells = []
            for _, p in profiles:
                meas = p.measured[i][-1]
                pred = p.pred_data[i][-1] if p.pred_data else math.nan
                cells += [_e(meas), _e(meas / pred) if pred > 0 else "–"]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += _range_section(res, reports)
    bins = res["bins"]
    lines += ["", (f"## Bin utilization: ∇Y of `{bins['layer']}` {tuple(bins['shape'])}, "
              "rows = samples"), "",
              "| bits | quantizer | effective fraction | occupied fraction |", "|---|---|---|---|"]
    for b, hs in bins["by_bits"].items():
        for q, h in hs.items():
            lines.append(f"| {b} | {q} | {h['effective']:.3f} | {h['occupied']:.3f} |")
    lines.append("")
    return "\n".join(lines)


__all__ = ["BinHistogram", "add_arguments", "run", "validate"]
