"""The variance monitor in training runs: set-up, per-epoch columns, log and report figure.

The trainer (:mod:`.trainer`) runs a :class:`lowbit.monitor.VarianceMonitor` every
``TrainConfig.monitor_every`` steps (default 50; 0: off) on single-rank runs of a recipe
that quantizes gradients with dynamic ranges; ``fqt-auto*`` recipes attach their
:class:`lowbit.adaptive.AdaptivePolicy`. Per epoch, ``metrics.csv``/``metrics.json`` get:

* ``monitor_steps``: monitored steps in the epoch; ``ratio_w:<layer>`` / ``ratio_x:<layer>``:
  the mean over them of each layer's quantization/SGD variance ratio on the ∇W path and on
  the ∇X path's input-shift probe (:mod:`lowbit.monitor`); ``ratio_w_max`` /
  ``ratio_x_max`` over layers (columns absent in an epoch without a monitored step;
  ``ratio_{w,x}_max_inf`` true where the largest is infinite, which JSON writes as null);
* ``grad_bits_gi`` / ``grad_bits_gw`` / ``grad_bits_mean``: mean gradient bit widths since
  the start of training (since the resume, for a run resumed with the monitor turned on),
  over the layers' paths that run, weighted by their ∇Y size;
* adaptive recipes: ``bits_x:<layer>`` / ``bits_w:<layer>`` at the epoch's end (no
  ``bits_x`` for a layer whose ∇X path never runs, as a first layer's) and
  ``bit_changes``, the policy's decisions in the epoch.

``monitor.json`` in the run folder holds everything (each monitored step's per-layer
figures, every decision: step, layer, path, old → new spec, ratio); ``lowbit report``
plots the ratios per layer over training from it (:func:`plot_ratios`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from lowbit.adaptive import AdaptivePolicy
from lowbit.config import ADAPTIVE_RECIPES
from lowbit.atomic import write_atomic
from lowbit.jsonfile import dumps, number
from lowbit.monitor import VarianceMonitor, skip_reason
from lowbit.nn import fqt_layers

from .runconfig import TrainConfig

LOG = "monitor.json"
log = logging.getLogger("lowbit.train")


def make_monitor(model: nn.Module, cfg: TrainConfig, requested: bool = False) -> VarianceMonitor | None:
    """The run's monitor, or ``None``: ``monitor_every`` 0, several ranks, or no layer it
    can watch (fp, QAT, predicted ranges, round-to-nearest gradients:
    :func:`lowbit.monitor.skip_reason`). When a monitor is wanted (``monitor_every`` > 0)
    but none can run, says why in one line: a warning if the user asked for it
    (``requested``), an info line on the trainer's default."""
    if not cfg.monitor_every:
        return None
    if cfg.world_size > 1:
        why = f"the variance monitor is off with {cfg.world_size} data-parallel ranks (it measures single-process training only)"
    else:
        reasons = [skip_reason(lay) for lay in fqt_layers(model).values()]
        if any(r is None for r in reasons):
            policy = AdaptivePolicy.from_recipe(cfg.recipe) if cfg.recipe in ADAPTIVE_RECIPES else None
            return VarianceMonitor(model, cfg.monitor_every, policy=policy)
        why = ("no layer can be monitored: "
               + ("; ".join(sorted({r for r in reasons if r})) or "the model has no quantized layer"))
    msg = (f"monitor_every={cfg.monitor_every} with recipe {cfg.recipe}: {why} "
           f"(no monitor.json, no ratio_* columns)")
    if not requested and not cfg.fqt_config().is_fqt:
        return None  # fp / QAT on the default interval: nothing to monitor, nothing to say
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        (log.warning if requested else log.info)(msg)  # one line, not one per rank
    return None


def watch(monitor: VarianceMonitor | None) -> contextlib.AbstractContextManager:
    """``monitor.step()`` around a step's forward and backward (a no-op without one)."""
    return contextlib.nullcontext() if monitor is None else monitor.step()


def restore(monitor: VarianceMonitor | None, state: dict[str, Any], step: int) -> None:
    """Resume the monitor from a checkpoint (one without monitor state — an older run —
    starts a fresh monitor at the checkpoint's step)."""
    if monitor is None:
        return
    if state.get("monitor") is not None:
        monitor.load_state_dict(state["monitor"])
    else:
        monitor.steps = step


def _mean(values: list[float]) -> float:
    """The mean over the measured values: NaN (not measured) left out; an infinite ratio
    (a minibatch variance of 0) kept — it is a measurement, and the mean is then inf."""
    measured = [v for v in values if not math.isnan(v)]
    return statistics.fmean(measured) if measured else math.nan


def epoch_row(monitor: VarianceMonitor | None, first_step: int) -> dict[str, Any]:
    """The epoch's columns (module doc) from the records of steps ≥ ``first_step``."""
    if monitor is None:
        return {}
    recs = [r for r in monitor.history if r.step >= first_step]
    row: dict[str, Any] = {"monitor_steps": len(recs)}
    for tag in ("w", "x"):
        means = {}
        for name in monitor.layers:
            vals = [getattr(r.layers[name], f"ratio_{tag}") for r in recs if name in r.layers]
            if vals and not all(math.isnan(v) for v in vals):
                means[name] = _mean(vals)
        row |= {f"ratio_{tag}:{n}": v for n, v in means.items()}
        if means:
            row[f"ratio_{tag}_max"] = top = max(means.values())
            if top == math.inf:  # JSON keeps no Inf (written null = "not measured"): say it
                row[f"ratio_{tag}_max_inf"] = True
    bits = monitor.mean_bits().get("all", {})
    for key, path in (("gi", "grad_input"), ("gw", "grad_weight"), ("mean", "both")):
        if math.isfinite(bits.get(path, math.nan)):
            row[f"grad_bits_{key}"] = bits[path]
    if monitor.policy is not None:
        # a layer whose ∇X path never ran at a monitored step (a first layer) gets no bits_x
        ran_x = {n for r in monitor.history for n, v in r.layers.items() if not math.isnan(v.quant_x)}
        for name, lay in monitor.layers.items():
            for tag, path in (("x", "grad_input"), ("w", "grad_weight")):
                if tag == "x" and monitor.history and name not in ran_x:
                    continue
                spec = getattr(lay.config, path)
                row[f"bits_{tag}:{name}"] = 0 if spec is None else spec.bits
        row["bit_changes"] = sum(d.step >= first_step for d in monitor.decisions)
    return row


def write_log(run_dir: Path, monitor: VarianceMonitor | None) -> None:
    """``monitor.json``: the monitor's full state and mean bits (written whole, atomically)."""
    if monitor is None:
        return
    state = {k: v for k, v in monitor.state_dict().items() if k != "pair"}  # pair: tensors
    # valid JSON: a first layer's ∇X ratio and a BatchNorm model's first step are NaN (null here;
    # a new user's JSON reader refused the bare NaN tokens)
    text = dumps(state | {"sgd": monitor.sgd, "mean_bits": monitor.mean_bits()}, indent=1)
    write_atomic(run_dir / LOG, text + "\n")


def plot_ratios(runs: list[Any], path: Path) -> bool:
    """Quantization/SGD variance ratio per layer against the training step, one column
    per recipe (seed 0's run, else the first), ∇W path on top and the ∇X probe below,
    layers coloured by depth; reads each run's ``monitor.json``. False if none has one."""
    logs: dict[str, dict] = {}
    for run in sorted(runs, key=lambda r: (r.sort_key(), r.train.get("seed", 0))):
        file = Path(run.path) / LOG
        if run.label not in logs and file.exists():
            try:  # a log cut by a crash: this run's column is left out, not the report
                logs[run.label] = json.loads(file.read_text())
            except (OSError, ValueError) as e:
                print(f"lowbit report: {file} is not a readable monitor log ({e}); its variance "
                      "figure column is left out", file=sys.stderr)
    if not logs:
        return False
    from lowbit.plots import pyplot

    plt = pyplot()  # report time only

    from lowbit.plots import save_figure

    # at least 6.4 in wide: one recipe's title and labels fit; 6.4 in tall: the two rows'
    # labels apart (new users' walkthroughs)
    fig, axes = plt.subplots(2, len(logs), figsize=(max(6.4, 3.2 * len(logs)), 6.4), squeeze=False,
                             sharey="row")
    cmap = plt.get_cmap("viridis")
    for col, (label, log) in enumerate(logs.items()):
        names = list(log["specs"])
        for row, tag in enumerate(("w", "x")):
            ax = axes[row][col]
            drawn = False
            for i, name in enumerate(names):
                pts = [(r["step"], number(r["layers"][name][f"ratio_{tag}"])) for r in log["history"]
                       if name in r["layers"]]  # written by lowbit.jsonfile: null, "inf" (a review)
                pts = [(s, v) for s, v in pts if math.isfinite(v) and v > 0]
                if pts:
                    ax.plot(*zip(*pts), color=cmap(i / max(1, len(names) - 1)), lw=1, marker=".", ms=3)
                    drawn = True
            if drawn:
                ax.set_yscale("log")
            else:  # e.g. a BatchNorm model's only monitored step (its ratios are undefined there)
                ax.text(0.5, 0.5, "no finite ratio", ha="center", va="center", transform=ax.transAxes,
                        fontsize=8)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(label, fontsize=8)
            else:
                ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel("quant / SGD variance\n" + ("∇W path" if tag == "w" else "∇X (shift probe)"),
                              fontsize=8)
    fig.suptitle(f"{runs[0].train['task']} — {runs[0].train['model']}: variance ratio per layer "
                 "(dark: first layers, yellow: last)", fontsize=9)
    save_figure(fig, path)
    return True


def describe_adaptive(train: dict[str, Any]) -> str | None:
    """The GEMM-operands text of an ``fqt-auto*`` run (its widths change as it trains),
    ``None`` for other recipes."""
    if train.get("recipe") not in ADAPTIVE_RECIPES:
        return None
    pol = AdaptivePolicy.from_recipe(train["recipe"])
    def path(qs: tuple[str, ...]) -> str:
        return f"{','.join(qs)}{pol.min_bits}–{pol.max_bits}"
    return f"fwd8/gi:{path(pol.grad_input)}/gw:{path(pol.grad_weight)} adaptive"


def bits_note(done: list[Any]) -> list[str]:
    """A table note with the mean gradient bits of adaptive runs (mean over seeds)."""
    vals = [(r.rows[-1].get("grad_bits_gi"), r.rows[-1].get("grad_bits_gw")) for r in done
            if r.train.get("recipe") in ADAPTIVE_RECIPES and r.rows]
    vals = [(gi, gw) for gi, gw in vals if gi is not None and gw is not None]
    if not vals:
        return []
    gi, gw = statistics.fmean(v[0] for v in vals), statistics.fmean(v[1] for v in vals)
    return [f"mean gradient bits ∇X {gi:.2f}, ∇W {gw:.2f}"]


__all__ = ["LOG", "bits_note", "describe_adaptive", "epoch_row", "make_monitor", "plot_ratios",
           "restore", "watch", "write_log"]
