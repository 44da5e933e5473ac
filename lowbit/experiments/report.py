"""``lowbit report``: turn run folders into markdown tables and plots.

    lowbit report --runs results/ --out docs/

Reads every ``config.json`` + ``metrics.json`` under ``--runs`` and writes, between the
markers ``<!-- BEGIN lowbit report -->`` and ``<!-- END lowbit report -->`` of
``OUT/results.md`` (the rest of the file is kept), one table per task and setting:
rows are recipes; columns the final metric as mean ± std over seeds, the number of
seeds, the time per step and its ratio to qat-8. Plots go to ``OUT/figures/``: learning
curves per task, and the final metric against the gradient bits, one line per quantizer.

``--section NAME`` writes between markers of its own (:func:`markers`: ``BEGIN lowbit
report: NAME`` in an HTML comment) instead, figures named ``NAME-…``, so reports of
several run folders (a short-schedule grid, a study at convergence) share one
``results.md``; a file whose markers of that section are not exactly one BEGIN before one
END is refused, not overwritten. Columns beyond the metric: the wall time per run (sum of
the epochs' ``epoch_time_s``, training + evaluation; mean over seeds) and, for runs with
the variance monitor (:mod:`.monitoring`), the largest per-layer quantization/SGD variance
ratio on the ∇X and ∇W paths in epochs 1, ⌊(n+1)/2⌋ and n (mean over seeds). Under each
table, the CPUs that trained its epochs (each epoch row's ``cpu``).
``--claims`` adds, after each table, the paper's claims stated from its finished runs
(:mod:`.claims`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lowbit.plots import pyplot, save_figure
from lowbit.config import FQTConfig
from lowbit.config import describe
from lowbit.formats import Grid, IntFormat, Rounding
from lowbit.quantizers import QUANTIZERS

from . import claims, monitoring
from .runconfig import DEFAULT_MONITOR_EVERY, effective_settings
from .rundir import data_kind, write_atomic
from .tasks import TASK_CLASSES
from .trainer import WEIGHT_FORMATS

BEGIN, END = "<!-- BEGIN lowbit report -->", "<!-- END lowbit report -->"
SECTION_NAME = r"[A-Za-z0-9][A-Za-z0-9_.]*(-[A-Za-z0-9_.]+)*"
SECTION_RULE = ("a letter or digit, then letters, digits, '_', '.' and single '-' between "
                "them")
# Settings that tell runs of one table apart from each other (not from other tables).
PER_RUN_FIELDS = frozenset(
    {"recipe", "seed", "out", "grad_input_bits", "grad_weight_bits", "backend", "max_bad_steps",
     "weights", "opt_state", "range_margin", "grad_comm", "monitor_every"}
)
HEADER = """# Results

Measured numbers of `lowbit` experiments. The section between the report markers is
generated: run the sweep that fills `results/`, then `lowbit report --runs results/ --out
docs/` (`--section NAME` for a section of its own); everything outside the markers is
written by hand and kept.

"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", required=True, help="folder of run folders (a sweep's --out)")
    parser.add_argument("--out", required=True,
                        help="folder for results.md and figures/ (its generated section is rewritten; "
                        "this repository's study: --runs results --out docs)")
    parser.add_argument("--claims", action="store_true",
                        help="after each table, state the paper's claims that name a recipe in it, "
                        "from its finished runs (lowbit.experiments.claims: 8-bit FQT = FP, 5-bit BHQ "
                        "vs QAT, BHQ ≥ PSQ ≥ PTQ at 4 bits, unbiased vs round-to-nearest FP8)")
    parser.add_argument("--section", help="name of the report section (its own BEGIN/END markers "
                        f"in results.md) and prefix of its figures: {SECTION_RULE}; default: "
                        "the unnamed section")


@dataclass
class Run:
    path: Path
    train: dict[str, Any]
    fqt: dict[str, Any]
    rows: list[dict[str, Any]]
    status: str  # done, diverged, running, interrupted, failed
    data: str | None = None  # config.json's record of the data read (rundir.write_config)

    @property
    def complete(self) -> bool:
        """Finished: status ``done`` and every epoch in the metrics (a run still
        ``running`` or ``interrupted`` with all its rows is not counted as a seed)."""
        return (
            self.status == "done"
            and bool(self.rows)
            and (self.rows[-1]["epoch"] >= self.train["epochs"])
        )

    @property
    def label(self) -> str:
        """Recipe name, plus the gradient bits when overridden, a backend other than auto,
        low-precision weights / optimizer state, quantized communication and an adaptive
        recipe's monitor interval other than the default."""
        label = self.train["recipe"]
        if self.train.get("grad_input_bits") or self.train.get("grad_weight_bits"):
            fqt = FQTConfig.from_dict(self.fqt)
            label += f" gi{fqt.grad_input.bits}/gw{fqt.grad_weight.bits}"
        margins = {g["margin"] for g in (self.fqt.get("grad_input"), self.fqt.get("grad_weight"))
                   if g and g.get("range") == "predicted"}
        if margins:
            label += " margin " + "/".join(f"{m:g}" for m in sorted(margins))
        weights = self.train.get("weights", "fp32")
        if weights != "fp32":
            state = self.train.get("opt_state", weights)
            if state == "int8" and self.train.get("optimizer") == "adamw":
                state = "int8 m / bf16 v"  # SRAdamW keeps its second moment in bf16
            label += f", {weights} weights + {state} state"
        if self.train.get("grad_comm", "fp32") != "fp32":  # quantized data-parallel averaging
            label += f", {self.train['grad_comm']} grad comm"
        every = self.train.get("monitor_every", DEFAULT_MONITOR_EVERY)
        if monitoring.describe_adaptive(self.train) and every != DEFAULT_MONITOR_EVERY:
            # an adaptive run's widths follow its monitor's interval: another recipe in effect
            label += f", monitor every {every}"  # (a review found them averaged as seeds)
        backend = self.train.get("backend", "auto")
        return label if backend == "auto" else f"{label} [{backend}]"

    def sort_key(self) -> tuple:
        """fp, then qat-B, then fqt grouped by quantizer; more bits first; dynamic ranges
        before predicted ones (wider margin first); fp32 weights before bf16 and int8."""
        fqt = FQTConfig.from_dict(self.fqt)
        weights = WEIGHT_FORMATS.index(self.train.get("weights", "fp32"))
        if fqt.is_fp:
            return 0, 0, 0, 0, 0, 0, weights
        if not fqt.is_fqt:
            return 1, 0, -fqt.weight.bits, 0, 0, 0, weights
        gi, gw = fqt.grad_input, fqt.grad_weight
        margin = -gi.margin if gi.predicted else 0
        return 2, list(QUANTIZERS).index(gi.quantizer), -gi.bits, -gw.bits, gi.predicted, margin, weights

    def final(self, metric: str) -> float | None:
        """The last epoch's ``metric``; None where missing or not finite (a hand-written
        or legacy NaN is no result: the tables and claims leave it out)."""
        v = self.rows[-1].get(metric) if self.rows else None
        return v if isinstance(v, (int, float)) and math.isfinite(v) else None

    def step_ms(self) -> float:
        """Median over epochs of each epoch's median step time."""
        return statistics.median(r["step_time_ms"] for r in self.rows)

    def wall_s(self) -> float | None:
        """Wall seconds of the whole run (its epochs' ``epoch_time_s``); None for runs
        recorded before that column existed."""
        times = [r.get("epoch_time_s") for r in self.rows]
        return None if not times or None in times else float(sum(times))

    def ratio_trace(self, tag: str) -> tuple[float, float, float] | None:
        """``ratio_{tag}_max`` (the monitor's largest per-layer quantization/SGD variance
        ratio, ``tag`` "x" or "w") in the first, middle and last epoch; None if any of
        them has no monitored step."""
        n = len(self.rows)
        rows = [self.rows[i] for i in (0, (n - 1) // 2, n - 1)] if n else []
        # an infinite ratio is kept (JSON wrote it null, beside a flag): not "not measured"
        picked = [math.inf if r.get(f"ratio_{tag}_max_inf") else r.get(f"ratio_{tag}_max") for r in rows]
        return None if not picked or None in picked else tuple(picked)  # type: ignore[return-value]


def _check_rows(rows: Any) -> None:
    """``ValueError`` unless ``rows`` is what the trainer writes: a list of per-epoch dicts,
    each with an integer ``epoch`` and a number ``step_time_ms`` (a hand-edited or cut
    file crashed the report later with ``error: epoch``, naming no folder: a review)."""
    if not isinstance(rows, list):
        raise ValueError(f"metrics.json holds a {type(rows).__name__}, not a list of epochs")
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and isinstance(r.get("epoch"), int)
                and isinstance(r.get("step_time_ms"), (int, float))):
            raise ValueError(f"metrics.json row {i} lacks an integer 'epoch' or a number 'step_time_ms'")


def load_runs(root: Path) -> list[Run]:
    """Every run folder below ``root`` (a ``config.json`` beside a ``metrics.json``). A
    folder whose files are unreadable or not a lowbit run's (an empty file, a saved
    Hugging Face model's ``config.json``) is skipped with a line on stderr naming it,
    not an error that stops the whole report."""
    runs = []
    for config_file in sorted(root.rglob("config.json")):
        run_dir = config_file.parent
        metrics_file, status_file = run_dir / "metrics.json", run_dir / "status.json"
        if not metrics_file.exists():
            continue
        try:
            config = json.loads(config_file.read_text())
            status = (
                json.loads(status_file.read_text())["status"] if status_file.exists() else "running"
            )
            rows = json.loads(metrics_file.read_text())
            _check_rows(rows)
            data_kind(config.get("data"))  # a record that is not a string: not readable
            runs.append(Run(run_dir, config["train"], config["fqt"], rows, status, config.get("data")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"lowbit report: skipped {run_dir}: not a readable lowbit run "
                  f"({type(exc).__name__}: {exc})", file=sys.stderr)
    return runs


# Settings added to config.json after runs were recorded, with the value those runs had:
# a run with the default is the same setting as one that predates the field.
LATER_DEFAULTS = {"world_size": 1}


def _settings(run: Run) -> tuple[tuple[str, str], ...]:
    """The settings that runs sharing a table must agree on, as printable text: defaults
    spelled out where ``None`` stands for them, as sweep and resume compare them
    (``runconfig.effective_settings``; a review: a text run of ``steps_per_epoch`` None and
    one of the default 200 written out landed in two tables, their seeds apart)."""
    return tuple(
        sorted((k, v if isinstance(v, str) else json.dumps(v))
               for k, v in effective_settings(run.train).items()
               if k not in PER_RUN_FIELDS and LATER_DEFAULTS.get(k, object()) != v)
    )  # fmt: skip


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def markers(name: str | None) -> tuple[str, str]:
    """The BEGIN/END markers of the section ``name`` (None: the unnamed section)."""
    if name is None:
        return BEGIN, END
    if not re.fullmatch(SECTION_NAME, name):
        raise ValueError(f"--section: {SECTION_RULE} (it goes into an HTML comment and figure "
                         f"names), got {name!r}")
    return f"<!-- BEGIN lowbit report: {name} -->", f"<!-- END lowbit report: {name} -->"


def _minutes(seconds: list[float]) -> str:
    """The mean of ``seconds`` in minutes (3 decimals below a minute), or – if empty."""
    if not seconds:
        return "–"
    m = statistics.fmean(seconds) / 60
    return f"{m:.1f}" if m >= 1 else f"{m:.3f}"


def _ratios(done: list[Run]) -> str:
    """``∇X a → b → c; ∇W …``: the mean over seeds of :meth:`Run.ratio_trace`, or –."""
    parts = []
    for tag, what in (("x", "∇X"), ("w", "∇W")):
        traces = [t for r in done if (t := r.ratio_trace(tag)) is not None]
        if traces:
            means = [statistics.fmean(t[i] for t in traces) for i in range(3)]
            parts.append(f"{what} " + " → ".join(f"{m:.2g}" for m in means))
    return "; ".join(parts) or "–"


def _fmt(value: float, std: float | None, scale: float, digits: int) -> str:
    text = f"{value * scale:.{digits}f}"
    return text + (f" ± {std * scale:.{digits}f}" if std is not None else "")


def _memory_and_range_notes(done: list[Run]) -> list[str]:
    """Bytes per parameter of weights + optimizer state, and how often predicted gradient
    ranges overflowed (over all epochs of all seeds), when the runs logged them."""
    notes = []
    if done and (bpp := done[0].rows[-1].get("bytes_per_param")) is not None:
        stored = done[0].rows[-1].get("bytes_per_param_stored", bpp)
        held, kept = f"{bpp:.2f}", f"{stored:.2f}"  # compared as printed (a trial: "3.03 (3.03 stored)",
        notes.append(f"{held} B/param" + (f" ({kept} stored)" if kept != held else ""))  # a last-bit difference)
    overflow = [row["range_overflow_calls"] for r in done for row in r.rows
                if "range_overflow_calls" in row]
    if overflow:
        notes.append(f"range overflow in {sum(overflow)} quantizer calls")
    if done and (sent := done[0].rows[-1].get("comm_bytes_per_step")) is not None:
        notes.append(f"{sent / 1e6:.3g} MB/step sent per rank")
    return notes


def _distinction(key: tuple, siblings: list[tuple]) -> str:
    """What tells table ``key`` apart from the other tables of its task and model
    (``siblings``, keys of :func:`one_per_seed`): the settings in which they differ, and
    the dataset; empty where it is the only one."""
    if len(siblings) < 2:
        return ""
    mine = dict(key[2])
    differ = sorted({k for other in siblings for k, v in other[2] if mine.get(k) != v}
                    | {k for other in siblings for k in mine if k not in dict(other[2])})
    parts = [f"{k} {mine.get(k, '–')}" for k in differ]
    if len({other[3] for other in siblings}) > 1:
        parts.append(f"data {key[3] or 'not recorded'}")
    return ", ".join(parts)


def table(runs: list[Run], figure_names: list[str],
          repeat_notes: dict[str, list[str]] | None = None, distinction: str = "") -> list[str]:
    """Markdown lines for one task/setting: a row per recipe (label); ``repeat_notes``
    (label → notes, :func:`_repeat_notes`): what folders left out as repeats add;
    ``distinction``: what sets this table apart from others of its task and model, in its
    heading (:func:`_distinction`)."""
    first = runs[0].train
    task_cls = TASK_CLASSES[first["task"]]
    metric = task_cls.primary_metric
    scale, digits, unit = (100.0, 2, " (%)") if metric == "accuracy" else (1.0, 4, "")
    by_label: dict[str, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=Run.sort_key):
        by_label[run.label].append(run)
    done_ms = {lab: [r.step_ms() for r in rs if r.complete] for lab, rs in by_label.items()}
    qat8 = statistics.fmean(done_ms["qat-8"]) if done_ms.get("qat-8") else None

    settings = ", ".join(f"{k} {v}" for k, v in _settings(runs[0]) if k not in ("task", "model")
                         and v not in ("null", "{}"))  # fmt: skip
    better = "higher" if task_cls.higher_is_better else "lower"
    lines = [
        f"### {first['task']} — {first['model']}" + (f" ({distinction})" if distinction else ""),
        "",
        f"Settings: {settings}. Final {metric} after {first['epochs']} epoch{'s' * (first['epochs'] != 1)} "
        + f"({better} is better), mean ± std over seeds.",
        "",
        f"| recipe | GEMM operands | {metric}{unit} | seeds | step (ms) | vs qat-8 | wall/run (min) "
        "| variance ratio, epoch 1 → mid → last | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lab, group in by_label.items():
        done = [r for r in group if r.complete]
        finals = [v for r in done if (v := r.final(metric)) is not None]
        notes = []
        if n_div := sum(r.status == "diverged" for r in group):
            notes.append(f"{n_div} diverged")
        if n_fail := sum(r.status == "failed" and not r.complete for r in group):
            notes.append(f"{n_fail} stopped by an error (its status.json says which)")
        if n_nan := len(done) - len(finals):  # counted by the claims as failed; said here too
            notes.append(f"{n_nan} finished without a finite {metric}")
        notes += (repeat_notes or {}).get(lab, [])
        partial = [r for r in group if not r.complete and r.status not in ("diverged", "failed")]
        if partial:  # how far each got (a study that spans sessions reports as it goes)
            at = ", ".join(f"{len(r.rows)}/{r.train['epochs']}" for r in partial)
            notes.append(f"{len(partial)} unfinished (epochs done: {at})")
        notes += _memory_and_range_notes(done) + monitoring.bits_note(done)
        score = _fmt(*_mean_std(finals), scale, digits) if finals else "–"
        ms = statistics.fmean(done_ms[lab]) if done_ms[lab] else None
        ratio = f"{ms / qat8:.2f}×" if ms is not None and qat8 else "–"
        fqt_desc = monitoring.describe_adaptive(group[0].train) or describe(FQTConfig.from_dict(group[0].fqt))
        wall = _minutes([w for r in done if (w := r.wall_s()) is not None])
        lines.append(f"| {lab} | {fqt_desc} | {score} | {len(finals)} | "
                     f"{f'{ms:.1f}' if ms is not None else '–'} | {ratio} | {wall} | {_ratios(done)} | "
                     f"{'; '.join(notes)} |")  # fmt: skip
    lines += ["", data_line(runs), machines_line(runs), ""]
    lines += [f"![{name}](figures/{name})" for name in figure_names]
    return lines + [""]


def data_line(runs: list[Run]) -> str:
    """Which dataset the table's runs read (``config.json``'s ``data``; one per table,
    :func:`one_per_seed`), and how many runs predate the record."""
    sources = sorted({r.data for r in runs if r.data})
    missing = sum(not r.data for r in runs)
    if not sources:
        return "Data: not recorded (runs from before lowbit wrote it to config.json)."
    note = (f"; not recorded by {missing} of {len(runs)} runs, which predate the record and are "
            "counted with them" if missing else "")
    return f"Data: {'; '.join(sources)}{note}."


def machines_line(runs: list[Run]) -> str:
    """Which CPUs trained the table's epochs (each epoch row's ``cpu``): step and wall
    times compare only within one machine, and a study that spans sessions can span
    machines."""
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # cpu → [epochs, runs]
    for run in runs:
        seen = set()
        for row in run.rows:
            cpu = row.get("cpu") or "not recorded"
            counts[cpu][0] += 1
            if cpu not in seen:
                seen.add(cpu)
                counts[cpu][1] += 1
    parts = [f"{cpu} ({e} epoch{'s' * (e != 1)} of {n} run{'s' * (n != 1)})"
             for cpu, (e, n) in sorted(counts.items())]
    note = " (\"not recorded\": epochs trained before lowbit recorded the CPU)" if "not recorded" in counts else ""
    return f"Machines: {'; '.join(parts) or 'none yet'}{note}."


def plot_curves(runs: list[Run], path: Path) -> None:
    """Primary metric against epoch (accuracy in %, as the tables), mean over seeds, one
    line per recipe: over its finished seeds where it has any (a seed still running would
    cut every seed's curve at its epoch), else over the unfinished ones up to the epoch
    they all reached."""
    metric = TASK_CLASSES[runs[0].train["task"]].primary_metric
    scale, unit = (100.0, " (%)") if metric == "accuracy" else (1.0, "")
    by_label: dict[str, list[Run]] = defaultdict(list)
    for run in sorted(runs, key=Run.sort_key):
        if run.rows:
            by_label[run.label].append(run)
    plt = pyplot()  # matplotlib when a figure is made (importing the CLI leaves it alone)
    fig, ax = plt.subplots(figsize=(6, 4))
    for lab, group in by_label.items():
        group = [r for r in group if r.complete] or group
        n = min(len(r.rows) for r in group)
        values = [[r.rows[i].get(metric) for r in group] for i in range(n)]
        mean = [statistics.fmean(v) * scale if None not in v else float("nan") for v in values]
        ax.plot([group[0].rows[i]["epoch"] for i in range(n)], mean, marker=".", label=lab)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric + unit)
    ax.set_title(f"{runs[0].train['task']} — {runs[0].train['model']}: {metric} per epoch")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no legend (and no warning) before any epoch ends
        ax.legend(fontsize=8)
    save_figure(fig, path)


def bits_points(runs: list[Run], metric: str) -> tuple[dict, dict]:
    """Final values by ∇X quantizer and bits, and the fp / qat-8 references. Only runs
    that differ in the gradient quantizer and its width count: dynamic ranges, float32
    weights, a symmetric integer grid rounded stochastically (an FP8, MX, asymmetric-grid
    or round-to-nearest run at the same "bits" is another format: averaged in, it made
    one point of seeds of different recipes), and each recipe as named: a run whose
    ``--grad-input-bits``/``--grad-weight-bits`` override it is another recipe (a review
    found ``fqt-psq-8`` with a 2-bit ∇W averaged into the PSQ-8 point, each seed twice)."""
    points: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    refs: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        value = run.final(metric)
        if (not run.complete or value is None or run.train.get("weights", "fp32") != "fp32"
                or monitoring.describe_adaptive(run.train)  # adaptive: no fixed width
                or run.train.get("grad_input_bits") is not None
                or run.train.get("grad_weight_bits") is not None
                or run.train.get("grad_comm", "fp32") != "fp32"  # quantized averaging: another row
                or run.train.get("backend", "auto") != "auto"):  # another backend: another row
            continue  # (its seeds were averaged into the recipe's point, each seed twice: a review)
        fqt = FQTConfig.from_dict(run.fqt)
        if fqt.grad_input is not None:
            gi = fqt.grad_input
            plain = isinstance(gi.format, IntFormat) and gi.format.grid is Grid.SYMMETRIC \
                and gi.rounding is Rounding.STOCHASTIC
            if plain and not gi.predicted:
                points[gi.quantizer][gi.bits].append(value)
        elif run.train["recipe"] in ("fp", "qat-8"):
            refs[run.train["recipe"]].append(value)
    return points, refs


def plot_bits(runs: list[Run], path: Path) -> bool:
    """Final metric against ∇X bits, one line per quantizer; fp and qat-8 as references."""
    metric = TASK_CLASSES[runs[0].train["task"]].primary_metric
    points, refs = bits_points(runs, metric)
    if not points:
        return False
    scale, unit = (100.0, " (%)") if metric == "accuracy" else (1.0, "")  # as the tables
    plt = pyplot()  # matplotlib when a figure is made (importing the CLI leaves it alone)
    fig, ax = plt.subplots(figsize=(6, 4))
    for quantizer, by_bits in sorted(points.items()):
        bits = sorted(by_bits)
        means = [scale * statistics.fmean(by_bits[b]) for b in bits]
        stds = [scale * statistics.stdev(by_bits[b]) if len(by_bits[b]) > 1 else 0.0 for b in bits]
        ax.errorbar(bits, means, yerr=stds, marker="o", capsize=3, label=quantizer.upper())
    for name, style in (("fp", "--"), ("qat-8", ":")):
        if refs[name]:
            ax.axhline(scale * statistics.fmean(refs[name]), color="gray", linestyle=style, label=name)
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("gradient bits (∇X path)")
    ax.set_ylabel(f"final {metric}{unit}")
    ax.set_title(f"{runs[0].train['task']} — {runs[0].train['model']}: {metric} vs gradient bits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def _preference(run: Run, metric: str) -> tuple:
    """Which of several folders of one (setting, recipe, seed) the report counts: a
    finished run with a finite ``metric`` before a failed one (diverged, or finished
    without a finite metric: the claims' :func:`~lowbit.experiments.claims.outcomes`
    reading — the table kept a NaN copy where the claims took the finite one, a review)
    before an unfinished one, then the one with more epochs, then the first by path (a
    review found an empty, stale folder that sorted first hiding a finished run)."""
    value = run.final(metric) if run.complete else None
    finite = value is not None and math.isfinite(value)
    rank = 0 if run.complete and run.status != "diverged" and finite \
        else 1 if run.status == "diverged" or run.complete else 2
    return rank, -len(run.rows), str(run.path)


def _setting(run: Run) -> tuple:
    """(task, model, settings): what runs sharing a table agree on (and a dataset)."""
    return run.train["task"], run.train["model"], _settings(run)


def _data_groups(runs: list[Run]) -> dict[int, str | None]:
    """Each run's dataset for grouping (by ``id``): the one it recorded
    (:func:`~.rundir.data_kind`); for a run recorded before lowbit wrote the field, the
    one dataset its (task, model, settings) runs recorded, or ``None`` where they recorded
    none or several (then it is a table of its own: never averaged with a guess)."""
    recorded: dict[tuple, set[str]] = defaultdict(set)
    for run in runs:
        if kind := data_kind(run.data):
            recorded[_setting(run)].add(kind)
    out = {}
    for run in runs:
        kinds = recorded[_setting(run)]
        out[id(run)] = data_kind(run.data) or (next(iter(kinds)) if len(kinds) == 1 else None)
    return out


def one_per_seed(runs: list[Run], data: dict[int, str | None] | None = None
                 ) -> tuple[dict[tuple, list[Run]], list[Run]]:
    """The runs grouped by (task, model, settings, dataset — ``data``, by default
    :func:`_data_groups`: runs of two datasets never share a table), one per recipe and
    seed (the one :func:`_preference` puts first), and the runs left out as repeats (path
    order)."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    seen_seeds: set[tuple] = set()
    duplicates = []
    data = _data_groups(runs) if data is None else data
    for run in sorted(runs, key=lambda r: _preference(r, TASK_CLASSES[r.train["task"]].primary_metric)):
        key = (*_setting(run), data[id(run)])
        if (key, run.label, run.train.get("seed")) in seen_seeds:
            duplicates.append(run)
            continue
        seen_seeds.add((key, run.label, run.train.get("seed")))
        groups[key].append(run)
    for group in groups.values():  # the tables list runs in path order, as before
        group.sort(key=lambda r: str(r.path))
    return groups, sorted(duplicates, key=lambda r: str(r.path))


def _repeat_notes(group: list[Run], repeats: list[Run]) -> dict[str, list[str]]:
    """Per recipe label of ``group`` (one table's runs, one per seed), what its
    ``repeats`` (the same table's other folders of those seeds) add: a diverged attempt of
    a seed whose counted run finished ("an earlier attempt diverged (seed 1; rerun)"), and
    an unfinished rerun of a seed whose counted run diverged ("seed 1 being rerun, epochs
    done: 3/20") — a table row must not hide either."""
    kept = {(r.label, r.train.get("seed")): r for r in group}
    rerun: dict[str, list] = defaultdict(list)
    running: dict[str, list[str]] = defaultdict(list)
    for r in repeats:
        seed = r.train.get("seed")
        counted = kept.get((r.label, seed))
        if counted is None:
            continue
        if r.status == "diverged" and counted.complete and counted.status != "diverged":
            rerun[r.label].append(seed)
        elif counted.status == "diverged" and not r.complete and r.status != "diverged":
            running[r.label].append(f"seed {seed} being rerun, epochs done: "
                                    f"{len(r.rows)}/{r.train['epochs']}")
    notes: dict[str, list[str]] = defaultdict(list)
    for label, seeds in rerun.items():
        seeds = sorted(set(seeds), key=str)
        notes[label].append(f"an earlier attempt diverged (seed{'s' * (len(seeds) > 1)} "
                            f"{', '.join(map(str, seeds))}; rerun)")
    for label, text in running.items():
        notes[label] += text
    return notes


def render(runs: list[Run], figures_dir: Path, command: str, prefix: str = "",
           with_claims: bool = False) -> str:
    """The generated section (without markers); writes the figures (names start with
    ``prefix``); ``with_claims``: each table followed by :func:`claims.lines`."""
    data = _data_groups(runs)
    groups, duplicates = one_per_seed(runs, data)
    repeats: dict[tuple, list[Run]] = defaultdict(list)  # each table's left-out folders
    for r in duplicates:
        repeats[(*_setting(r), data[id(r)])].append(r)
    lines = [f"Generated by `{command}` from {len(runs) - len(duplicates)} runs.", ""]
    if duplicates:
        lines += [f"Ignored {len(duplicates)} run folder(s) repeating a recipe and seed already "
                  f"counted (a finished run is kept before a diverged or unfinished one, then the one "
                  f"with more epochs; a diverged one is named in its table's notes): "
                  f"{', '.join(str(r.path) for r in duplicates)}.", ""]
    seen: dict[str, int] = defaultdict(int)
    for key, group in sorted(groups.items(), key=lambda kv: (kv[0][:2], str(kv[0][3]))):
        task, model = key[:2]
        siblings = [k for k in groups if k[:2] == (task, model)]
        stem = f"{prefix}{task}-{model}"
        seen[stem] += 1
        if seen[stem] > 1:
            stem += f"-{seen[stem]}"
        names = [f"{stem}-curves.png"]
        plot_curves(group, figures_dir / names[0])
        if plot_bits(group, figures_dir / f"{stem}-bits.png"):
            names.append(f"{stem}-bits.png")
        if monitoring.plot_ratios(group, figures_dir / f"{stem}-variance.png"):
            names.append(f"{stem}-variance.png")
        lines += table(group, names, _repeat_notes(group, repeats[key]), _distinction(key, siblings))
        if with_claims:
            lines += ["Claims (`lowbit.experiments.claims`: finished and diverged runs, one per seed; "
                      "recipes compared paired by seed, with one-sided 95% Student-t bounds of the "
                      "per-seed differences):", ""] + claims.lines(group + repeats[key])
    lines.append("Step times: median per epoch, median over epochs, mean over seeds, measured "
                 "in the same sweep, on the machines each table's \"Machines\" line names (runs "
                 "sharing a machine's cores slow each other: compare within a sweep). Wall/run: "
                 "the epochs' training + evaluation time (not start-up or checkpoint writes), "
                 "mean over the finished seeds that logged it (– for runs recorded before "
                 "epochs did). Variance ratio: the monitor's largest per-layer "
                 "quantization/SGD variance ratio (lowbit.monitor) in epochs 1, ⌊(n+1)/2⌋ and "
                 "n, mean over the finished seeds with a monitored step in all three (– if "
                 "none: no monitor, or epochs shorter than its interval).")  # fmt: skip
    return "\n".join(lines)


def section_text(path: Path, name: str | None = None) -> str:
    """The text of ``path`` (or a new file's) holding section ``name``'s markers once each,
    BEGIN first (a new section appended at the end): ``ValueError`` otherwise — checked by
    :func:`run` before any work, so that nothing is drawn for a file it will refuse."""
    begin, end = markers(name)
    text = path.read_text() if path.exists() else HEADER + f"{begin}\n{end}\n"
    counts = (text.count(begin), text.count(end))
    if counts == (0, 0):  # a new section, at the end
        return text.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    if counts != (1, 1) or text.index(begin) > text.index(end):
        # anything else would replace text outside the section (a marker quoted in prose,
        # a lost END): refuse rather than overwrite the hand-written part
        raise ValueError(f"{path} holds {counts[0]} {begin!r} and {counts[1]} {end!r}; "
                         "expected one of each, BEGIN first (or neither): fix the file by hand")
    return text


def _figures_of(text: str, section: str | None = "") -> set[str]:
    """The figure files ``text`` shows (``![…](figures/NAME)``), or, with ``section`` not
    ``""``, those of that section of the file's text (between its markers): file names
    only (a name with a path in it is not a figure this report wrote)."""
    if section != "":
        begin, end = markers(section)
        text = text.split(begin, 1)[1].split(end, 1)[0] if begin in text and end in text else ""
    return {n for n in re.findall(r"!\[[^\]]*\]\(figures/([^)\s]+)\)", text) if "/" not in n and n not in ("..", ".")}


def write_section(path: Path, body: str, name: str | None = None) -> None:
    """Replace the text between the markers of section ``name`` of ``path`` (appended
    if absent; the file created if needed). ``ValueError`` if the file holds a marker of
    the section more than once, only one of the two, or END before BEGIN (nothing written)."""
    begin, end = markers(name)
    text = section_text(path, name)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    write_atomic(path, f"{head}{begin}\n{body.rstrip()}\n{end}{tail}")  # the hand-written part
    # is never lost to a crash mid-write: the old file or the new one, whole


def run(args: argparse.Namespace) -> int:
    from .train import check_named, check_out_dir, check_out_file

    check_named("--runs", args.runs, "folder")  # "" read the current folder's runs
    root, out = Path(args.runs), Path(args.out)
    if not root.is_dir():
        raise ValueError(f"--runs must be a folder of run folders, got {args.runs!r}")

    check_out_dir("--out", args.out)  # a folder, or creatable as one
    markers(args.section)  # a bad name fails before any work
    if out.is_dir():  # results.md and figures/ checked before anything is drawn (reviews: a folder
        # results.md ended in IsADirectoryError's traceback, a file figures in FileExistsError's,
        # and a results.md of broken markers was refused after the figures were redrawn)
        check_out_file("--out's results.md", str(out / "results.md"))
        check_out_dir("--out's figures", str(out / "figures"))
        section_text(out / "results.md", args.section)
    runs = load_runs(root)
    if not runs:
        raise ValueError(f"no runs (config.json + metrics.json) under {root}")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    command = shlex.join(["lowbit", "report", "--runs", str(args.runs), "--out", str(args.out)]
                         + (["--section", args.section] if args.section else []) + (["--claims"] if args.claims else []))
    before = _figures_of(section_text(out / "results.md", args.section), args.section)
    body = render(runs, out / "figures", command, f"{args.section}-" if args.section else "",
                  args.claims)
    write_section(out / "results.md", body, args.section)
    for name in before - _figures_of(body):  # the section's earlier figures it no longer shows
        (out / "figures" / name).unlink(missing_ok=True)  # (a trial: stale ones were left)
    ignored = len(one_per_seed(runs)[1])
    print(f"report: {len(runs) - ignored} runs" + (f" ({ignored} folder(s) ignored as repeats)" if ignored else "")
          + f" -> {out / 'results.md'}, {out / 'figures'}")
    return 0
