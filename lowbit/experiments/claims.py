"""The paper's claims, stated from finished runs: ``lowbit report --claims``.

Issue 17 asks the study at convergence for "a plain statement for each claim — whether
it held, with the numbers; a claim that did not hold is reported as not holding". This
module makes those statements from the same runs as the report's tables, so that they are
regenerated, not rewritten, as runs finish:

* **8-bit FQT = FP**: ``fqt-psq-8`` against ``fp``, holds when FQT is worse by at most
  0.3 accuracy points (image tasks) or 1% of bits per byte (text) — one-sided: FQT better
  than FP by more than that also holds;
* **5-bit BHQ within 0.5 pt of QAT**: ``fqt-bhq-5`` against ``qat-8`` (the paper's
  8-bit-forward QAT baseline), worse by at most 0.5 points (1% bpb);
* **BHQ ≥ PSQ ≥ PTQ at 4 bits, beyond the seed spread**: each step of the order holds
  when the better recipe is better beyond the seed-to-seed noise;
* **Unbiased FP8 against round-to-nearest FP8**: ``fqt-psq-fp8`` (stochastic rounding,
  E5M2 gradients, per-tensor forward scales) against ``fp8-rowwise`` (torchao's
  round-to-nearest recipe: E4M3 gradients, per-row scales), reported as which is better
  and whether beyond the seed noise (a comparison, not a hypothesis with a threshold; the
  recipes differ in more than the rounding, which the statement says).

**Statistics: paired by seed.** A seed gives every recipe the same initial weights and
data order, so two recipes are compared on the seeds both have an outcome for, through
the per-seed differences ``d_s`` (how much worse the first recipe is on seed ``s``, in
the task's direction: accuracy higher, bits per byte lower). With ``n ≥ 2`` finished
pairs, mean ``d̄`` and standard error ``s_d/√n``, the one-sided 95% Student-t bounds are
``d̄ ± t₀.₉₅(n−1)·s_d/√n`` (``scipy.stats.t``):

* a "within" claim (worse by at most ``tol``; ``tol`` for bpb is 1% of the reference
  recipe's mean over the pairs) *holds* when the upper bound is ≤ ``tol`` (a one-sided
  equivalence test at 5%), *does not hold* when the lower bound is > ``tol``, and is
  *unresolved* otherwise — more seeds narrow the interval;
* a step of the order *holds* when the lower bound of the first recipe's gain is > 0,
  is *reversed* when the upper bound is < 0 (the claim does not hold), and is
  *unresolved* otherwise (the data do not separate them with that many seeds; the issue's
  rule: run a third seed);
* a claim still unresolved with ``SEED_BUDGET`` (3) or more paired seeds is *not shown*:
  the study's rule adds a third seed where a gap is within the noise and stops there, so
  an order "beyond the seed spread" that stays within it does not hold as stated, and a
  "within" claim is not established;
* the comparison gives the two-sided 95% interval of the gain and whether it excludes 0.

A claim needs at least 2 paired seeds with an outcome (fewer: *not yet measured*; no run
at all: *not measured*, naming the recipes), and recipes that trained: where every
recipe's mean final metric is near chance (accuracy below twice chance, bpb above 90% of
a uniform guess's 8 bits) the claim is *not judged* — equal untrained models "agree"
within any tolerance; one recipe near chance where the others learned is a result and
is judged. An accuracy moves in steps of one evaluated image, so the standard deviation
of its paired gains is taken as at least that step over √6 (:func:`paired`). A seed that diverged or finished without a
finite metric *failed*; the first recipe of a claim failing on a paired seed where the
other finished makes the claim (or step) not hold; the other recipe's failures are
named beside a verdict taken on the finished pairs (where it failed on every shared seed
and the first recipe finished them all, the first recipe is not worse). A run counts as finished when its
status is ``done`` and it has all its epochs; several runs of one seed: a finished one
is kept over a failed one, and the failed attempts are counted in the numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .tasks import TASK_CLASSES

if TYPE_CHECKING:  # pragma: no cover
    from .report import Run

MIN_SEEDS = 2  # paired seeds a claim needs before it is judged
SEED_BUDGET = 3  # issue 17: "at least 2 seeds each (3 where a gap is within 2 seed std)"
LEVEL = 0.95  # one-sided bounds for "within" and "order"; two-sided for "compare"


@dataclass(frozen=True)
class Claim:
    """One claim: ``kind`` "within" (``recipes[0]`` not worse than ``recipes[1]`` by more
    than the tolerance: ``points`` accuracy points, ``relative`` of a lower-is-better
    metric), "order" (``recipes`` best first, each beyond the seed noise) or "compare"."""

    text: str
    kind: str
    recipes: tuple[str, ...]
    points: float = 0.0
    relative: float = 0.0


CLAIMS = (
    Claim("8-bit FQT = FP: not worse by more than 0.3 pt / 1% bpb", "within", ("fqt-psq-8", "fp"), 0.3, 0.01),
    Claim("5-bit BHQ within 0.5 pt of QAT (1% bpb)", "within", ("fqt-bhq-5", "qat-8"), 0.5, 0.01),
    Claim("BHQ ≥ PSQ ≥ PTQ at 4 bits, beyond the seed spread", "order",
          ("fqt-bhq-4", "fqt-psq-4", "fqt-ptq-4")),
    Claim("unbiased FP8 (fqt-psq-fp8: stochastic rounding, E5M2 gradients, per-tensor scales) against "
          "round-to-nearest FP8 (fp8-rowwise: E4M3 gradients, per-row scales) — recipes that differ "
          "in more than the rounding", "compare", ("fqt-psq-fp8", "fp8-rowwise")),
)


@dataclass(frozen=True)
class Outcomes:
    """A recipe's seeds: ``values[seed]`` the final metric of a finished run, ``None``
    for a failed seed (diverged, or finished without a finite metric); ``retried``: failed
    attempts of seeds that also have a finished run (kept over them)."""

    values: dict
    retried: int

    def finished(self) -> list[float]:
        return [v for v in self.values.values() if v is not None]

    def failed(self, seeds: Sequence | None = None) -> list:
        return sorted((s for s, v in self.values.items() if v is None and (seeds is None or s in seeds)),
                      key=str)


def outcomes(runs: Sequence[Run], recipe: str, metric: str) -> Outcomes:
    """``recipe``'s outcome per seed (class docstring); a run counts once it is finished
    (status ``done`` with all epochs) or diverged."""
    attempts: dict = {}
    for r in sorted(runs, key=lambda r: str(r.path)):
        if r.label != recipe or not (r.complete or r.status == "diverged"):
            continue
        v = r.final(metric) if r.complete else None
        attempts.setdefault(r.train.get("seed"), []).append(v if v is not None and math.isfinite(v) else None)
    # a seed's value: its first finished attempt, else None (failed); only failed attempts of
    # a seed that finished count as "rerun" (a seed that failed twice was said to be rerun)
    values = {s: next((v for v in vs if v is not None), None) for s, vs in attempts.items()}
    retried = sum(vs.count(None) for s, vs in attempts.items() if values[s] is not None)
    return Outcomes(values, retried)


def _show(o: Outcomes, scale: float, digits: int) -> str:
    done = o.finished()
    text = "–"
    if done:
        text = f"{statistics.fmean(done) * scale:.{digits}f}"
        # one seed has no spread to show (± 0.00 read as none: a review)
        text += f" ± {statistics.stdev(done) * scale:.{digits}f} ({len(done)} seeds)" if len(done) > 1 else " (1 seed)"
    failed = len(o.failed())
    text += f", {failed} failed (diverged or no metric)" if failed else ""
    return text + (f", {o.retried} failed attempt(s) rerun" if o.retried else "")


@dataclass(frozen=True)
class Paired:
    """Per-seed gains of recipe a over recipe b on the seeds both finished (metric units,
    positive = a better), with the one-sided ``LEVEL`` bounds of their mean."""

    seeds: list
    gains: list[float]
    mean: float
    low: float  # one-sided lower bound of the mean gain
    high: float  # one-sided upper bound
    low2: float  # two-sided bounds
    high2: float


def paired(a: Outcomes, b: Outcomes, up: bool, resolution: float = 0.0) -> Paired:
    """The seeds both finished and the Student-t bounds of the mean paired gain
    (``scipy.stats.t``; ``n ≥ 2`` pairs, else NaN bounds). ``resolution``: the metric's
    step (one evaluation image of an accuracy); the gains' standard deviation is taken
    as at least ``resolution/√6``, the spread of a difference of two values each rounded
    to that grid (uniform errors of variance ``r²/12``): gains equal on every seed — two
    seeds often agree to the image — made the bounds collapse onto the mean and a
    one-image gap read "beyond the seed noise" (a review)."""
    from scipy.stats import t as student_t

    seeds = sorted((s for s in a.values if s in b.values and a.values[s] is not None
                    and b.values[s] is not None), key=str)
    gains = [(a.values[s] - b.values[s]) * (1 if up else -1) for s in seeds]
    n = len(gains)
    if n < 2:
        nan = math.nan
        return Paired(seeds, gains, statistics.fmean(gains) if gains else nan, nan, nan, nan, nan)
    mean, se = statistics.fmean(gains), max(statistics.stdev(gains), resolution / math.sqrt(6)) / math.sqrt(n)
    q1, q2 = student_t.ppf(LEVEL, n - 1), student_t.ppf(1 - (1 - LEVEL) / 2, n - 1)
    return Paired(seeds, gains, mean, mean - q1 * se, mean + q1 * se, mean - q2 * se, mean + q2 * se)


def _untrained(value: float, chance: float, up: bool) -> bool:
    """Whether a recipe's mean final metric is near what a model that learned nothing
    scores: accuracy below twice chance, or bits per byte above 90% of a uniform guess's."""
    return value < 2 * chance if up else value > 0.9 * chance


def judge(claim: Claim, runs: Sequence[Run]) -> tuple[str, str]:
    """``(numbers, verdict)`` of ``claim`` on the runs of one task and setting (module
    docstring: paired by seed, one-sided 95% Student-t bounds)."""
    task = TASK_CLASSES[runs[0].train["task"]]
    metric, up = task.primary_metric, task.higher_is_better
    scale, digits, unit = (100.0, 2, " pt") if metric == "accuracy" else (1.0, 4, f" {metric}")
    labels = {r.label for r in runs}
    if missing := [c for c in claim.recipes if c not in labels]:
        return "–", f"not measured: no run of {', '.join(missing)}"
    outs = [outcomes(runs, c, metric) for c in claim.recipes]
    numbers = "; ".join(f"{c} {_show(o, scale, digits)}" for c, o in zip(claim.recipes, outs))
    # models that learned nothing tell nothing: not judged where every recipe with a finished
    # seed is near chance (a schedule too short for any); one recipe near chance where the
    # others learned is a result (a review: "8-bit FQT = FP" was "not judged" when only the
    # FQT run failed to learn, the order claim when only PTQ did)
    means = {c: statistics.fmean(o.finished()) for c, o in zip(claim.recipes, outs) if o.finished()}
    if means and all(_untrained(m, task.chance, up) for m in means.values()):
        shown = ", ".join(f"{c} {m * scale:.{digits}f}{unit}" for c, m in means.items())
        return numbers, (f"not judged: no recipe trained (means {shown}; chance "
                         f"{task.chance * scale:.{digits}f}{unit}): train longer")

    def fmt(x: float) -> str:
        return f"{x * scale:.{digits}f}{unit}"

    # an accuracy moves in steps of one evaluated image (paired()); the runs' own count
    evaluated = {r.train.get("eval_subset") or getattr(task, "eval_examples", 0) for r in runs}
    resolution = 1.0 / min(evaluated) if metric == "accuracy" and min(evaluated, default=0) > 0 else 0.0

    def fmt_seeds(seeds: list) -> str:
        return ",".join(str(s) for s in seeds)

    steps, verdicts, open_pairs = [], [], []
    for (ca, a), (cb, b) in zip(zip(claim.recipes, outs), zip(claim.recipes[1:], outs[1:])):
        common = sorted((s for s in a.values if s in b.values), key=str)
        if len(common) < MIN_SEEDS:  # this step waits; another may already decide (a review)
            verdicts.append("unmeasured")
            steps.append(f"{ca} and {cb} share {len(common)} seed(s) with an outcome; {MIN_SEEDS} needed")
            continue
        lost = [s for s in a.failed(common) if b.values[s] is not None]
        other = b.failed(common)
        p = paired(a, b, up, resolution)
        head = f"on seeds {fmt_seeds(p.seeds)}" if p.seeds else "no seed finished by both"
        notes = (f"; {cb} failed on seed(s) {fmt_seeds(other)}" if other else "")
        if lost:
            verdicts.append("no")
            steps.append(f"{ca} failed on seed(s) {fmt_seeds(lost)}, where {cb} finished")
            continue
        if not p.seeds and other and not a.failed(common):  # b failed on every shared seed
            verdicts.append("yes")
            steps.append(f"{ca} finished where {cb} failed, on every shared seed ({fmt_seeds(other)})")
            continue
        if len(p.seeds) < 2:
            verdicts.append("open")
            steps.append(f"{ca} against {cb}: {head}, too few finished pairs to judge{notes}")
            continue
        if claim.kind == "within":
            deficit, lo, hi = -p.mean, -p.high, -p.low  # bounds of how much worse a is
            ref = [b.values[s] for s in p.seeds]
            tol = claim.points / 100 if metric == "accuracy" else claim.relative * statistics.fmean(ref)
            tol_text = fmt(tol) + (f" ({claim.relative:.0%} of {cb})" if metric != "accuracy" else "")
            how = "worse" if deficit > 0 else "better" if deficit < 0 else "equal"
            detail = (f"{ca} is {how}" + (f" by {fmt(abs(deficit))}" if deficit else "")
                      + f" {head} (paired; {LEVEL:.0%} one-sided bounds of how much worse: "
                      f"{fmt(lo)} to {fmt(hi)}; allowed: ≤ {tol_text}){notes}")
            slack = 1e-9 * max(abs(tol), 1.0)
            verdicts.append("yes" if hi <= tol + slack else "no" if lo > tol + slack else "open")
            open_pairs += [len(p.seeds)] if verdicts[-1] == "open" else []
            steps.append(detail)
            continue
        how = "better than" if p.mean > 0 else "worse than" if p.mean < 0 else "equal to"
        if claim.kind == "compare":
            beyond = p.low2 > 0 or p.high2 < 0
            bounds = f"two-sided {LEVEL:.0%} interval {fmt(p.low2)} to {fmt(p.high2)}"
        else:
            beyond = p.low > 0 or p.high < 0
            bounds = f"one-sided {LEVEL:.0%} bounds {fmt(p.low)} to {fmt(p.high)}"
        verdicts.append("yes" if p.low > 0 and beyond else "no" if beyond else "open")
        open_pairs += [len(p.seeds)] if verdicts[-1] == "open" else []
        steps.append(f"{ca} {how} {cb}" + (f" by {fmt(abs(p.mean))}" if p.mean else "")
                     + f" {head} (paired gain, {bounds}: "
                     + f"{'beyond' if beyond else 'within'} the seed noise){notes}")
    detail = "; ".join(steps)
    if claim.kind == "compare":
        return numbers, (f"not yet measured ({detail})" if "unmeasured" in verdicts else detail)
    if "no" in verdicts:
        return numbers, f"does not hold: {detail}"
    if "unmeasured" in verdicts:
        return numbers, f"not yet measured ({detail})"
    if "open" in verdicts and min(open_pairs, default=0) >= SEED_BUDGET:
        return numbers, (f"not shown with {min(open_pairs)} seeds, the study's budget (a gap within the "
                         f"seed noise gets a third seed, then stands): {detail}")
    if "open" in verdicts:
        return numbers, f"unresolved (more seeds narrow the bounds): {detail}"
    return numbers, f"holds: {detail}"


def lines(runs: Sequence[Run]) -> list[str]:
    """Markdown: a table of the claims that name a recipe run in this task and setting
    (the others would only say "not measured"), or one line saying none does."""
    present = {r.label for r in runs}
    relevant = [c for c in CLAIMS if present & set(c.recipes)]
    if not relevant:
        return ["None of the study's claims names a recipe run here.", ""]
    out = ["| claim | recipes: mean ± std | verdict |", "|---|---|---|"]
    for claim in relevant:
        numbers, verdict = judge(claim, runs)
        out.append(f"| {claim.text} | {numbers} | {verdict} |")
    return out + [""]


__all__ = ["CLAIMS", "SEED_BUDGET", "Claim", "Outcomes", "Paired", "judge", "lines", "outcomes", "paired"]
