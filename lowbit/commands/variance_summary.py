"""Writing ``lowbit variance``'s results (:mod:`lowbit.commands.variance`).

Outputs in ``--out``:

* ``variance.json`` — everything, keys:

  - ``command``, ``machine`` (platform, CPU count, torch version and threads), ``args``;
  - ``warmup``: ``steps``, ``lr``, ``loss_first``, ``loss_last``, ``window`` (means of the
    first/last ``window = min(10, ⌊steps/2⌋)`` steps);
  - ``groups``: parameter groups (converted layers by name, ``other``) and ``layers``;
  - ``spectra``: per bound batch, ``mode``, ``lam[layer][group]``, ``lam_total[layer]``,
    ``rel_change``, ``iters``, ``gram[layer]`` (see :class:`JacobianSpectrum`);
  - ``bound_note``: which groups got no bound and why (a model with low-bit attention,
    which the bound has no term for: the groups upstream of it and the total; the report's
    ``unbounded``), else ``null``;
  - ``bins``: ``layer`` (whose ∇Y, rows = samples), and per bit width of a symmetric integer format asked for, per quantizer the
    :class:`~lowbit.analysis.bins.BinHistogram` (``levels``, ``counts``, ``effective``,
    ``occupied``);
  - ``runs``: one per (quantizer, format, range, rounding) with ``quantizer``, ``format``,
    ``bits`` (element bits), ``rounding``, ``seconds``,
    ``report`` (:meth:`VarianceReport.to_dict`: ``groups[g]`` with ``sgd``, ``quant``,
    ``total`` and their ``*_se``, ``gap``, ``gap_se``, ``rel_gap``, ``z_grad``,
    ``z_rand``, ``max_abs_z``, ``quant_bound_batches``, ``pred_data``,
    ``pred_analytic``, ``tightness_data``, ``tightness_analytic``; ``layers[l]`` the
    quantizer variances of :class:`LayerNoise`; ``pairs_data``/``pairs_analytic``) and
    ``profile`` (:meth:`VarianceProfile.to_dict` or null);
  - ``seconds``: wall time per stage.

    With ``--ranges dynamic,predicted,predicted-clip`` every (quantizer, format) of a symmetric integer or FP8 grid is also
    measured with predicted gradient ranges (``lowbit.ranges``; ``predicted`` re-quantizes
    on overflow, ``predicted-clip`` clips): the histories are first filled by
    ``--range-calibration`` FQT backward passes on fresh training batches (no weight
    update), then frozen for the study; such runs add ``range`` and ``range_stats`` (the
    overflow counters of the study, :class:`~lowbit.ranges.RangeStats`) and skip the
    profile.

* ``variance.csv`` — one row per (quantizer, format, rounding, range, group) with the ``groups`` fields;
* ``bins_<B>bit.png`` — bin utilization; ``profile_<Q>_<F>.png`` — variance profile
  heatmaps; ``bounds.png`` — measured against predicted; ``summary.md``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from lowbit.analysis.variance import GroupVariance, VarianceProfile, VarianceReport
from lowbit.experiments.rundir import write_atomic

from .variance_data import describe_warmup


def command_line(opts: Any) -> str:
    """The command line as typed (``lowbit variance …``), or rebuilt from the options when
    ``run`` was called from Python."""
    argv = sys.argv
    if "variance" in argv:  # shell-quoted: a path with a space ran as another command (a trial)
        return shlex.join(["lowbit", *argv[argv.index("variance"):]])
    parts = ["lowbit", "variance", "--task", opts.task, "--quantizers", ",".join(opts.quantizers),
             "--formats", ",".join(opts.formats), "--rounding", ",".join(opts.roundings),
             "--out", str(opts.out),
             "--batches", str(opts.batches), "--batch-size", str(opts.batch_size),
             "--repeats", str(opts.repeats), "--seed", str(opts.seed),
             "--train-steps", str(opts.train_steps),
             "--spectrum", str(opts.spectrum), "--power-iters", str(opts.power_iters)]
    if opts.model:
        parts[2:2] = ["--model", opts.model]
    return shlex.join(parts)


def jsonable(x: object) -> object:
    """``json.dumps``'s ``default``: tensors as lists, other objects as their text."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def machine() -> dict:
    return {"platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}


CSV_FIELDS = [f for f in GroupVariance.__dataclass_fields__]


def write_csv(path: Path, runs: list[dict]) -> None:
    """One row per run and gradient group, written atomically (:func:`write_atomic`)."""
    fh = io.StringIO(newline="")
    w = csv.writer(fh)
    w.writerow(["quantizer", "format", "bits", "rounding", "range", "group", *CSV_FIELDS])
    for r in runs:
        for g, st in r["report"]["groups"].items():
            w.writerow([r["quantizer"], r["format"], r["bits"], r["rounding"], r["range"], g,
                        *[st[f] for f in CSV_FIELDS]])
    write_atomic(path, fh.getvalue())


def _e(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def _holds(rep: VarianceReport, ranges: str) -> str:
    """The summary's "bound holds" cell: yes, NO (with the groups beyond the 3σ level of
    Student's t: :meth:`VarianceReport.bound_violations`), or "–"
    where it is not decided: the bounds assume dynamic ranges (a predicted range's grid
    is not the operand's own), and without a standard error (``--repeats`` < 3) an
    excess cannot be told from the measurement's noise."""
    if ranges != "dynamic":
        return "– (dynamic-range bounds)"
    cells = []
    for k in ("data", "analytic"):
        if v := rep.bound_violations(k):
            cells.append("NO " + ",".join(v))
        elif u := rep.bound_undecided(k):
            nonfinite = [n for n in u if not (math.isfinite(rep.groups[n].quant_bound_batches)
                                              and math.isfinite(getattr(rep.groups[n], f"pred_{k}")))]
            cells.append(f"– (not computed: {','.join(nonfinite)})" if nonfinite else "– (needs --repeats ≥ 3)")
        else:
            cells.append("yes")
    return " / ".join(cells)


def _ratio(x: float) -> str:
    """A tightness ratio's cell: "–" where it was not computed (NaN: no bound, as for
    round-to-nearest runs)."""
    return "–" if math.isnan(x) else _e(x)


def _tight(g: GroupVariance) -> str:
    t = g.tightness_data
    if t > 1 and g.quant_bound_batches > 0 and math.isfinite(g.quant_bound_batches_se):
        return f"{t:.3g} ± {t * g.quant_bound_batches_se / g.quant_bound_batches:.2g}"
    return _ratio(t)


def _range_section(res: dict, reports: list[tuple[str, VarianceReport]]) -> list[str]:
    """Predicted against dynamic ranges: variance ratio, bias and overflow counters."""
    by_label = dict(reports)
    rows = []
    for run, (_, rep) in zip(res["runs"], reports):
        if run["range"] == "dynamic":
            continue
        st = run["range_stats"]
        # against the dynamic run of the same rounding (a review: a round-to-nearest row was
        # divided by the stochastic run and not marked nearest)
        nearest = run["rounding"] == "nearest"
        dyn = by_label.get(f"{run['quantizer']}-{run['format']}" + ("-nearest" if nearest else ""))
        g = rep.groups["total"]
        ratio = _e(g.quant / dyn.groups["total"].quant) if dyn and dyn.groups["total"].quant else "–"
        rows.append(f"| {run['quantizer']} | {run['format']} | {run['range']}{', nearest' if nearest else ''} | "
                    f"{_e(g.quant)} | {ratio} | "
                    f"{rep.max_abs_z:.2f} | {st['overflow_calls']} / {st['calls']} | "
                    f"{st['overflow_rate']:.2e} | {st['clipped_norm']:.2e} |")
    if not rows:
        return []
    return ["", "## Predicted ranges against dynamic ranges", "",
            ("| ∇X quantizer | format | range | quant var | / dynamic | max abs z (bias) "
             "| calls with overflow | elements beyond range | clipped norm / norm |"),
            "|---|---|---|---|---|---|---|---|---|", *rows, "",
            ("Histories filled by FQT backward passes on fresh training batches, then frozen; "
             "the counters cover the study's draws. `predicted` re-quantizes a call that "
             "overflows (unbiased), `predicted-clip` clips it (biased by the clipped mass).")]


def summary(res: dict, reports: list[tuple[str, VarianceReport]],
             profiles: list[tuple[str, VarianceProfile]]) -> str:
    m = res["machine"]
    lines = [f"# Variance study: {res['task']} / {res['model']}", "",
             f"Command: `{res['command']}`  ",
             (f"Machine: {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']} "
              f"({m['torch_threads']} threads); total {res['seconds']['total']:.0f} s  "),
             f"Data: {res['data']}; warm-up: {describe_warmup(res['warmup'])}", ""]
    # PTQ of the row's own format and rounding (a trial: a nearest row was divided into the
    # stochastic PTQ's variance, 6540 for PTQ against itself)
    ptq = {(run["format"], run["rounding"]): rep.groups["total"].quant for run, (_, rep) in zip(res["runs"], reports)
           if run["quantizer"] == "ptq" and run["range"] == "dynamic"}
    lines += ["## Decomposition, all parameters (Theorem 2)", "",
              ("| ∇X quantizer | format (bits) | SGD var | quant var | PTQ / this | total "
               "| gap / total (± s.e.) | max abs z (bias) | bound holds: data / analytic "
               "| tightness total: data / analytic |"),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for run, (_, rep) in zip(res["runs"], reports):
        q = run["quantizer"] + ("" if run["range"] == "dynamic" else f" ({run['range']} range)")
        q += ", nearest" if run["rounding"] == "nearest" else ""
        b = f"{run['format']} ({run['bits']})"
        g = rep.groups["total"]
        key = (run["format"], run["rounding"])
        ratio = _e(ptq[key] / g.quant) if key in ptq and g.quant > 0 else "–"
        zb = f" (batches: {run['z_batches']:.2f})" if "z_batches" in run else ""
        holds = "–" if not rep.bound_batches else _holds(rep, run["range"])
        lines.append(f"| {q} | {b} | {_e(g.sgd)} | {_e(g.quant)} | {ratio} | {_e(g.total)} | "
                     f"{g.rel_gap:+.3f} ± {g.gap_se / g.total if g.total else 0:.3f} | "
                     f"{rep.max_abs_z:.2f}{zb} | {holds} | " + (
                         # the bounds assume dynamic ranges: "–" for others, as per group below
                         "–" if not rep.bound_batches or run["range"] != "dynamic"
                         or (math.isnan(g.tightness_data) and math.isnan(g.tightness_analytic)) else
                         f"{_ratio(g.tightness_data)} / {_ratio(g.tightness_analytic)}") + " |")
    draws = res["args"].get("batches", 0) * res["args"].get("repeats", 0) if isinstance(res.get("args"), dict) else 0
    if res.get("bound_note"):  # the "–" bound cells, with their reason (a review)
        lines += ["", f"Bounds: {res['bound_note']}."]
    if reports and draws:
        lines += ["", (f"max abs z (bias) is at most √(batches × repeats) = {math.sqrt(draws):.2f} whatever the "
                       "bias (a z over n draws cannot exceed √n)" + (
                           ": fewer than 25 draws cannot show a bias at 5σ — raise --batches or --repeats"
                           if draws < 25 else "") + ".")]
    if reports and reports[0][1].bound_batches:
        lines += ["", "## Tightness per parameter group (measured / data-dependent bound)", "",
                  "| group | " + " | ".join(label for label, _ in reports) + " |",
                  "|---|" + "---|" * len(reports)]
        for gname in reports[0][1].groups:  # the bounds assume dynamic ranges: "–" for others
            lines.append(f"| {gname} | " + " | ".join(
                _tight(r.groups[gname]) if run["range"] == "dynamic" else "–"
                for run, (_, r) in zip(res["runs"], reports)) + " |")
        lines += ["", ("Where a group's only noise is its own ∇W-path noise (the last layer), the "
                  "prediction is exact, not a bound: the ratio straddles 1 and is shown ± its "
                  "standard error when above 1. A violation counts only beyond the 3σ level (a 0.13% "
                  "false alarm rate) of Student's t with the measurement's degrees of freedom: "
                  "9.2 s.e. with 4 draws on one batch, 3.3 with 30 degrees of freedom")]
        changes = [c for s in reports[0][1].spectra for row in s.rel_change.values()
                   for c in row.values()]
        if changes:
            changes.sort()
            lines.append(f"Power iteration ({reports[0][1].spectra[0].mode}): last relative "
                         f"change median {changes[len(changes) // 2]:.3g}, max {changes[-1]:.3g}.")
    if profiles:
        lines += ["", ("## Variance profile: each layer quantized alone, contribution to all "
                       "parameters (measured, and measured / data-dependent bound)"), "",
                  "± one standard error over the draws (jackknife; none below 3 repeats)", "",
                  "| layer | "
                  + " | ".join(f"{label} var | {label} tight." for label, _ in profiles)
                  + " |", "|---|" + "---|---|" * len(profiles)]
        p0 = profiles[0][1]
        for i, layer in enumerate(p0.layers):
            cells = []
            for _, p in profiles:
                meas = p.measured[i][-1]
                se = p.measured_se[i][-1] if p.measured_se else math.nan
                pred = p.pred_data[i][-1] if p.pred_data else math.nan
                pm = (lambda v: f" ± {_e(v)}") if math.isfinite(se) else (lambda v: "")  # noqa: E731
                cells += [_e(meas) + pm(se), _e(meas / pred) + pm(se / pred) if pred > 0 else "–"]
            lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    lines += _range_section(res, reports)
    bins = res["bins"]
    head = (f"## Bin utilization: ∇Y of `{bins['layer']}` {tuple(bins['shape'])}, "
            f"rows = {'tokens' if res.get('task') == 'text' else 'samples'}")
    if not bins["by_bits"]:  # measured on symmetric integer grids only (a new user's empty table)
        lines += ["", head, "", "Measured on symmetric integer grids (int2 … int8) only; none was asked for.", ""]
        return "\n".join(lines)
    lines += ["", head, "", "| bits | quantizer | effective fraction | occupied fraction |", "|---|---|---|---|"]
    for b, hs in bins["by_bits"].items():
        for q, h in hs.items():
            lines.append(f"| {b} | {q} | {h['effective']:.3f} | {h['occupied']:.3f} |")
    lines.append("")
    return "\n".join(lines)




__all__ = ["command_line", "jsonable", "machine", "summary", "write_csv"]
