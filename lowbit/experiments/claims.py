"""The paper's claims, stated from finished runs: ``lowbit report --claims``.

Issue 17 asks the study at convergence for "a plain statement for each claim — whether
it held, with the numbers; a claim that did not hold is reported as not holding". This
module makes those statements from the same runs as the report's tables, so that they are
regenerated, not rewritten, as runs finish:

* **8-bit FQT matches FP**: ``fqt-psq-8`` against ``fp``, holds when FQT's mean is worse
  by at most 0.3 accuracy points (image tasks) or 1% of bits per byte (text);
* **5-bit BHQ within 0.5 pt of QAT**: ``fqt-bhq-5`` against ``qat-8`` (the paper's
  8-bit-forward QAT baseline), worse by at most 0.5 points (1% bpb);
* **BHQ ≥ PSQ ≥ PTQ at 4 bits, beyond the seed spread**: each step of the order holds
  when the better recipe's mean exceeds the other's by more than twice the larger of the
  two seed standard deviations; a gap in the right direction but inside that is
  *unresolved* (the issue's rule: a third seed where a gap is within 2 seed standard
  deviations);
* **Unbiased FP8 against round-to-nearest FP8**: ``fqt-psq-fp8`` (stochastic rounding)
  against ``fp8-rowwise`` (round-to-nearest), reported as which is better and whether
  beyond the seed spread (a comparison, not a hypothesis with a threshold).

"Worse" and "better" follow the task's direction (accuracy higher, bpb lower). A claim
needs at least 2 finished seeds of each recipe it names (fewer: *not yet measured*; no
run at all: *not measured*, naming the recipes). Means and sample standard
deviations are over seeds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .tasks import TASK_CLASSES

if TYPE_CHECKING:  # pragma: no cover
    from .report import Run

MIN_SEEDS = 2
SPREAD_SIGMAS = 2.0  # "beyond the seed spread": more than 2 seed standard deviations apart


@dataclass(frozen=True)
class Claim:
    """One claim: ``kind`` "within" (``recipes[0]`` not worse than ``recipes[1]`` by more
    than the tolerance: ``points`` accuracy points, ``relative`` of a lower-is-better
    metric), "order" (``recipes`` best first, each beyond the seed spread) or "compare"."""

    text: str
    kind: str
    recipes: tuple[str, ...]
    points: float = 0.0
    relative: float = 0.0


CLAIMS = (
    Claim("8-bit FQT matches FP (within 0.3 pt / 1% bpb)", "within", ("fqt-psq-8", "fp"), 0.3, 0.01),
    Claim("5-bit BHQ within 0.5 pt of QAT (1% bpb)", "within", ("fqt-bhq-5", "qat-8"), 0.5, 0.01),
    Claim("BHQ ≥ PSQ ≥ PTQ at 4 bits, beyond the seed spread", "order",
          ("fqt-bhq-4", "fqt-psq-4", "fqt-ptq-4")),
    Claim("unbiased FP8 (stochastic rounding) against round-to-nearest FP8", "compare",
          ("fqt-psq-fp8", "fp8-rowwise")),
)


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float
    seeds: int


def _stats(runs: Sequence[Run], recipe: str, metric: str) -> Stats | None:
    values = [v for r in runs if r.complete and r.label == recipe and (v := r.final(metric)) is not None]
    if len(values) < MIN_SEEDS:
        return None
    return Stats(statistics.fmean(values), statistics.stdev(values), len(values))


def _show(s: Stats, scale: float, digits: int) -> str:
    return f"{s.mean * scale:.{digits}f} ± {s.std * scale:.{digits}f} ({s.seeds} seeds)"


def judge(claim: Claim, runs: Sequence[Run]) -> tuple[str, str]:
    """``(numbers, verdict)`` of ``claim`` on the finished runs of one task and setting."""
    task = TASK_CLASSES[runs[0].train["task"]]
    metric, up = task.primary_metric, task.higher_is_better
    scale, digits, unit = (100.0, 2, " pt") if metric == "accuracy" else (1.0, 4, f" {metric}")
    labels = {r.label for r in runs}
    if missing := [c for c in claim.recipes if c not in labels]:
        return "–", f"not measured: no run of {', '.join(missing)}"
    stats = [_stats(runs, c, metric) for c in claim.recipes]
    if any(s is None for s in stats):
        done = ", ".join(f"{c}: {sum(r.complete and r.label == c for r in runs)}" for c in claim.recipes)
        return "–", f"not yet measured (finished seeds {done}; {MIN_SEEDS} needed)"
    numbers = "; ".join(f"{c} {_show(s, scale, digits)}" for c, s in zip(claim.recipes, stats))  # type: ignore[arg-type]

    def gain(a: Stats, b: Stats) -> float:  # how much better a is than b (metric units)
        return a.mean - b.mean if up else b.mean - a.mean

    def spread(a: Stats, b: Stats) -> float:
        return SPREAD_SIGMAS * max(a.std, b.std)

    if claim.kind == "within":
        a, b = stats  # type: ignore[misc]
        tol = claim.points / 100 if metric == "accuracy" else claim.relative * b.mean
        deficit = -gain(a, b)
        tol_text = f"{tol * scale:.{digits}f}{unit}" + (f" ({claim.relative:.0%})" if metric != "accuracy" else "")
        verdict = "holds" if deficit <= tol else "does not hold"
        return numbers, (f"{verdict}: {claim.recipes[0]} is {'worse' if deficit > 0 else 'better'} "
                         f"by {abs(deficit) * scale:.{digits}f}{unit} (allowed: worse by ≤ {tol_text})")
    steps, wrong, within = [], False, False
    for (ca, a), (cb, b) in zip(zip(claim.recipes, stats), zip(claim.recipes[1:], stats[1:])):
        g, sp = gain(a, b), spread(a, b)  # type: ignore[arg-type]
        beyond = abs(g) > sp
        wrong |= beyond and g < 0
        within |= not beyond
        steps.append(f"{ca} {'better' if g > 0 else 'worse'} than {cb} by {abs(g) * scale:.{digits}f}{unit}, "
                     f"{'beyond' if beyond else 'within'} the seed spread (2σ = {sp * scale:.{digits}f}{unit})")
    detail = "; ".join(steps)
    if claim.kind == "compare":
        return numbers, detail
    if wrong:  # one step of the order reversed beyond the spread
        return numbers, f"does not hold: {detail}"
    if within:
        return numbers, f"unresolved (a gap within 2 seed standard deviations: run a third seed): {detail}"
    return numbers, f"holds: {detail}"


def lines(runs: Sequence[Run]) -> list[str]:
    """Markdown: a table of every claim for the runs of one task and setting."""
    out = ["| claim | recipes: mean ± std | verdict |", "|---|---|---|"]
    for claim in CLAIMS:
        numbers, verdict = judge(claim, runs)
        out.append(f"| {claim.text} | {numbers} | {verdict} |")
    return out + [""]


__all__ = ["CLAIMS", "Claim", "judge", "lines"]
