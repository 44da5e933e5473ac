"""The paper's claims, stated from finished runs: ``lowbit report --claims``.

Issue 17 asks the study at convergence for "a plain statement for each claim — whether
it held, with the numbers; a claim that did not hold is reported as not holding". This
module makes those statements from the same runs as the report's tables, so that they are
regenerated, not rewritten, as runs finish:

* **8-bit FQT = FP**: ``fqt-psq-8`` against ``fp``, holds when FQT's mean is worse by at
  most 0.3 accuracy points (image tasks) or 1% of bits per byte (text) — one-sided: FQT
  better than FP by more than that also holds;
* **5-bit BHQ within 0.5 pt of QAT**: ``fqt-bhq-5`` against ``qat-8`` (the paper's
  8-bit-forward QAT baseline), worse by at most 0.5 points (1% bpb);
* **BHQ ≥ PSQ ≥ PTQ at 4 bits, beyond the seed spread**: each step of the order holds
  when the better recipe's mean exceeds the other's by more than twice the larger of the
  two seed standard deviations; a gap in the right direction but inside that is
  *unresolved* (the issue's rule: a third seed where a gap is within 2 seed standard
  deviations);
* **Unbiased FP8 against round-to-nearest FP8**: ``fqt-psq-fp8`` (stochastic rounding,
  E5M2 gradients, per-tensor forward scales) against ``fp8-rowwise`` (torchao's
  round-to-nearest recipe: E4M3 gradients, per-row scales), reported as which is better
  and whether beyond the seed spread (a comparison, not a hypothesis with a threshold;
  the recipes differ in more than the rounding, which the statement says).

"Worse" and "better" follow the task's direction (accuracy higher, bpb lower). A claim
needs at least 2 seeds with an outcome for each recipe it names (fewer: *not yet
measured*; no run at all: *not measured*, naming the recipes); a seed that diverged or
finished without a finite metric counts as *failed*, ranked below every finished seed
(a recipe that fails is worse). Means and sample standard deviations are over the
finished seeds, one run per seed. A "within" claim whose margin to its tolerance is
inside 2 seed standard deviations is *unresolved*, whatever the number of seeds (below 3
the verdict asks for a third; from 3 on it says the margin is not beyond the spread with
that many: the point estimate alone does not decide an equivalence that close). A step
of the order whose gap is inside the spread is *unresolved* while some recipe has fewer
than 3 seeds; with 3 or more it makes the order claim *not hold* (it says "beyond the
seed spread").
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
    Claim("8-bit FQT = FP: not worse by more than 0.3 pt / 1% bpb", "within", ("fqt-psq-8", "fp"), 0.3, 0.01),
    Claim("5-bit BHQ within 0.5 pt of QAT (1% bpb)", "within", ("fqt-bhq-5", "qat-8"), 0.5, 0.01),
    Claim("BHQ ≥ PSQ ≥ PTQ at 4 bits, beyond the seed spread", "order",
          ("fqt-bhq-4", "fqt-psq-4", "fqt-ptq-4")),
    Claim("unbiased FP8 (fqt-psq-fp8: stochastic rounding, E5M2 gradients, per-tensor scales) against "
          "round-to-nearest FP8 (fp8-rowwise: E4M3 gradients, per-row scales) — recipes that differ "
          "in more than the rounding", "compare", ("fqt-psq-fp8", "fp8-rowwise")),
)


@dataclass(frozen=True)
class Stats:
    """A recipe's seeds: mean and sample std of the finished ones' final metric, how many
    finished, and how many failed (diverged, or finished without a finite metric)."""

    mean: float
    std: float
    seeds: int
    failed: int


def _stats(runs: Sequence[Run], recipe: str, metric: str) -> Stats | None:
    """One run per seed (the first folder of a seed counted twice is kept); None until
    ``MIN_SEEDS`` seeds have an outcome (finished or failed)."""
    values: list[float] = []
    failed, seen = 0, set()
    for r in sorted(runs, key=lambda r: str(r.path)):
        if r.label != recipe or r.train.get("seed") in seen or not (r.complete or r.status == "diverged"):
            continue
        seen.add(r.train.get("seed"))
        v = r.final(metric) if r.complete else None
        if v is None or not math.isfinite(v):
            failed += 1
        else:
            values.append(v)
    if len(values) + failed < MIN_SEEDS:
        return None
    mean = statistics.fmean(values) if values else math.nan
    return Stats(mean, statistics.stdev(values) if len(values) > 1 else 0.0, len(values), failed)


def _show(s: Stats, scale: float, digits: int) -> str:
    text = f"{s.mean * scale:.{digits}f} ± {s.std * scale:.{digits}f} ({s.seeds} seeds)" if s.seeds else "–"
    return text + (f", {s.failed} failed (diverged or no metric)" if s.failed else "")


def judge(claim: Claim, runs: Sequence[Run]) -> tuple[str, str]:
    """``(numbers, verdict)`` of ``claim`` on the runs of one task and setting. A failed
    seed (diverged, or finished without a finite metric) ranks below every finished one:
    it fails a claim that its recipe is not worse, and wins a step of the order for the
    other recipe."""
    task = TASK_CLASSES[runs[0].train["task"]]
    metric, up = task.primary_metric, task.higher_is_better
    scale, digits, unit = (100.0, 2, " pt") if metric == "accuracy" else (1.0, 4, f" {metric}")
    labels = {r.label for r in runs}
    if missing := [c for c in claim.recipes if c not in labels]:
        return "–", f"not measured: no run of {', '.join(missing)}"
    stats = [_stats(runs, c, metric) for c in claim.recipes]
    if any(s is None for s in stats):
        done = ", ".join(f"{c}: {st.seeds + st.failed if st else _outcomes(runs, c)}"
                         for c, st in zip(claim.recipes, stats))
        return "–", f"not yet measured (seeds with an outcome {done}; {MIN_SEEDS} needed)"
    st: list[Stats] = stats  # type: ignore[assignment]
    numbers = "; ".join(f"{c} {_show(x, scale, digits)}" for c, x in zip(claim.recipes, st))
    few = min(x.seeds + x.failed for x in st) < 3  # the rule: a third seed where a gap is within 2σ
    more = "run a third seed" if few else f"not beyond the seed spread with {min(x.seeds + x.failed for x in st)} seeds"

    def gain(a: Stats, b: Stats) -> float:  # how much better a is than b (metric units)
        return a.mean - b.mean if up else b.mean - a.mean

    def spread(a: Stats, b: Stats) -> float:
        return SPREAD_SIGMAS * max(a.std, b.std)

    def fmt(x: float) -> str:
        return f"{x * scale:.{digits}f}{unit}"

    if claim.kind == "within":
        a, b = st
        if a.failed:
            return numbers, f"does not hold: {claim.recipes[0]} failed on {a.failed} seed(s)"
        if b.failed:
            return numbers, f"holds: {claim.recipes[1]} failed on {b.failed} seed(s), {claim.recipes[0]} on none"
        tol = claim.points / 100 if metric == "accuracy" else claim.relative * b.mean
        deficit = -gain(a, b)
        tol_text = fmt(tol) + (f" ({claim.relative:.0%})" if metric != "accuracy" else "")
        holds = deficit <= tol + 1e-9 * max(abs(tol), abs(b.mean))  # a tie at the tolerance holds
        detail = (f"{claim.recipes[0]} is {'worse' if deficit > 0 else 'better' if deficit < 0 else 'equal'}"
                  + (f" by {fmt(abs(deficit))}" if deficit else "") + f" (allowed: worse by ≤ {tol_text})")
        if abs(deficit - tol) <= spread(a, b):
            return numbers, (f"unresolved ({more}): {detail}; the margin to the tolerance is within the "
                             f"seed spread (2σ = {fmt(spread(a, b))})")
        return numbers, f"{'holds' if holds else 'does not hold'}: {detail}"
    steps, wrong, within = [], False, False
    for (ca, a), (cb, b) in zip(zip(claim.recipes, st), zip(claim.recipes[1:], st[1:])):
        if a.failed or b.failed:  # a failed seed ranks below every finished one
            g_sign = (b.failed > 0) - (a.failed > 0) if a.failed != b.failed else 0
            wrong |= g_sign < 0
            within |= g_sign == 0
            steps.append(f"{ca} failed on {a.failed} seed(s), {cb} on {b.failed}")
            continue
        g, sp = gain(a, b), spread(a, b)
        beyond = abs(g) > sp
        wrong |= beyond and g < 0
        within |= not beyond
        how = "better than" if g > 0 else "worse than" if g < 0 else "equal to"
        steps.append(f"{ca} {how} {cb}" + (f" by {fmt(abs(g))}" if g else "")
                     + f", {'beyond' if beyond else 'within'} the seed spread (2σ = {fmt(sp)})")
    detail = "; ".join(steps)
    if claim.kind == "compare":
        return numbers, detail
    if wrong:  # one step of the order reversed beyond the spread
        return numbers, f"does not hold: {detail}"
    if within:
        return numbers, (f"unresolved (a gap within 2 seed standard deviations: {more}): {detail}" if few
                         else f"does not hold ({more}): {detail}")
    return numbers, f"holds: {detail}"


def _outcomes(runs: Sequence[Run], recipe: str) -> int:
    return len({r.train.get("seed") for r in runs
                if r.label == recipe and (r.complete or r.status == "diverged")})


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


__all__ = ["CLAIMS", "Claim", "judge", "lines"]
