"""Adaptive precision: each layer's gradient bit width chosen from measured variance.

Theorem 2 (docs/METHOD.md §1, §9): FQT trains like QAT while the variance its quantizers add
is small against the minibatch (SGD) variance. A quantization/SGD variance ratio ``r``
makes the gradient as noisy as an SGD gradient of batch ``B/(1 + r)``, so the default
target ``r ≤ 0.1`` costs at most what a 9% smaller batch would — well inside the range
where SGD's progress per step barely changes — while each bit removed cuts the GEMM
operands' width. :class:`AdaptivePolicy` picks, per layer and gradient path, the
**fewest bits** (then the first listed quantizer) whose predicted ratio meets that path's
share of the target.

**The budget is per parameter group, not per quantizer.** Theorem 2 sums, for a layer's
weight gradient, its own ∇W-path noise and the ∇X-path noise of *every* layer downstream
of it. Giving each path the whole target lets these add up: a first version that did
(every path ≤ 0.1) chose 2–3-bit ∇X paths and lost 5.7 points on Fashion-MNIST (while
matching on text; docs/results.md, "Adaptive precision"). So the ∇W path gets
``(1 − input_share)·target`` and each of the ``L`` measured ∇X paths
``input_share·target / L`` (default ``input_share`` 0.5): a group's total then stays
within ``target`` wherever each ∇X path's ratio, measured on the input-shift probe of
:mod:`lowbit.monitor`, bounds its relative contribution upstream.

The prediction is exact, not extrapolated: on each monitored step the monitor evaluates
the quantizer's expected variance on the step's actual ``∇Y`` at every candidate width
and quantizer (:mod:`lowbit.monitor`). Ratios scale roughly as 4^-bits, so one width
spans a 4× band; **hysteresis** keeps a layer from flapping on the noise of one batch's
SGD estimate: a path moves up as soon as its current ratio exceeds its target, and down
only to a width whose ratio is at most ``down ×`` its target (default 0.5: with 4× per
bit the stable band spans a factor of about 8).

Why a policy held by the monitor and not a field of ``GradSpec``: a layer's
``GradSpec`` says what its backward runs *now* (what lowbit reports as quantized is what
ran quantized); the decision needs measurements only the monitor has, and changes the
spec between steps. The recipes ``fqt-auto*`` (``lowbit.config.ADAPTIVE_RECIPES``) give
the starting config (8 bits, first candidate quantizer) and
:meth:`AdaptivePolicy.from_recipe` the policy; the trainer attaches both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ADAPTIVE_RECIPES
from .scalars import real
from .formats import MAX_BITS, MIN_BITS, check_bits
from .quantizers import QUANTIZERS

DEFAULT_TARGET = 0.1
DEFAULT_DOWN = 0.5
DEFAULT_INPUT_SHARE = 0.5


@dataclass(frozen=True)
class Decision:
    """One change of one layer's gradient path: at monitored step ``step`` (the
    monitor's step index), ``path`` (``grad_input``/``grad_weight``) of ``layer`` went
    from ``old_quantizer``/``old_bits`` (measured ratio ``ratio``) to the new spec
    (predicted ratio ``new_ratio`` on the same ∇Y); it applies from the next step."""

    step: int
    layer: str
    path: str
    old_quantizer: str
    old_bits: int
    new_quantizer: str
    new_bits: int
    ratio: float
    new_ratio: float


@dataclass(frozen=True)
class AdaptivePolicy:
    """Keep each parameter group's quantization/SGD variance ratio within ``target``: each
    path gets its share (:meth:`path_target`, module doc) and the fewest bits in
    ``min_bits..max_bits`` (default 2..8: every width the integer format has — the ratio,
    not a floor, decides) that meet it; candidates are every width with each quantizer
    of ``grad_input`` / ``grad_weight`` (listed cheapest first: at equal width, where a
    path must move, the first that meets the target wins; a path whose current spec, a
    candidate, meets its target keeps it — its quantizer too, even where a cheaper one listed earlier at
    the same width meets it now: no flip-flop between quantizers on a ratio's noise).
    Hysteresis: down only where the ratio is at most ``down`` times the path's target.
    Raises ``ValueError`` naming the field for bad values."""

    target: float = DEFAULT_TARGET
    down: float = DEFAULT_DOWN
    input_share: float = DEFAULT_INPUT_SHARE
    min_bits: int = MIN_BITS
    max_bits: int = MAX_BITS
    grad_input: tuple[str, ...] = ("psq",)
    grad_weight: tuple[str, ...] = ("psq",)

    def __post_init__(self) -> None:
        for name in ("target", "down", "input_share"):  # real numbers (NumPy's too), kept as float
            v = getattr(self, name)
            if real(v) is None:  # (one-element tensors too: lowbit.scalars)
                raise ValueError(f"{name} must be a real number, got {v!r}")
            object.__setattr__(self, name, real(v))
        for name in ("target", "down"):
            v = getattr(self, name)
            if not 0 < v < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {v!r}")
        if self.down > 1:
            raise ValueError(f"down must be at most 1 (a hysteresis factor), got {self.down!r}")
        v = self.input_share
        if not 0 < v < 1:
            raise ValueError(f"input_share must be a number in (0, 1), got {v!r}")
        object.__setattr__(self, "min_bits", check_bits(self.min_bits, "min_bits"))
        object.__setattr__(self, "max_bits", check_bits(self.max_bits, "max_bits"))
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits ({self.min_bits}) exceeds max_bits ({self.max_bits})")
        for name in ("grad_input", "grad_weight"):
            qs = getattr(self, name)
            if not isinstance(qs, str):
                try:  # a generator is read once: the check below must not use it up
                    qs = tuple(qs)
                except TypeError:
                    pass
            if isinstance(qs, str) or not isinstance(qs, tuple) or not qs \
                    or any(not isinstance(q, str) or q not in QUANTIZERS for q in qs) \
                    or len(set(qs)) != len(qs):
                raise ValueError(f"{name} must be a non-empty tuple of distinct quantizers from "
                                 f"{', '.join(QUANTIZERS)}, got {qs!r}")
            object.__setattr__(self, name, tuple(qs))

    @classmethod
    def from_recipe(cls, name: str, **overrides: object) -> AdaptivePolicy:
        """The policy of an ``fqt-auto*`` recipe (``lowbit.config.ADAPTIVE_RECIPES``);
        ``overrides`` replace fields (``target=0.05``). ``ValueError`` for other names."""
        if not isinstance(name, str) or name not in ADAPTIVE_RECIPES:  # (a list: unhashable)
            raise ValueError(f"{name!r} is not an adaptive recipe; allowed: {', '.join(ADAPTIVE_RECIPES)}")
        gi, gw = ADAPTIVE_RECIPES[name]
        return cls(**{"grad_input": gi, "grad_weight": gw, **overrides})  # type: ignore[arg-type]

    def candidates(self, path: str) -> list[tuple[str, int]]:
        """``(quantizer, bits)`` of ``path`` in order of preference: fewest bits first,
        then the order the quantizers are listed in."""
        qs = getattr(self, path)
        return [(q, b) for b in range(self.min_bits, self.max_bits + 1) for q in qs]

    def path_target(self, path: str, input_paths: int) -> float:
        """The ratio ``path`` may reach: ``(1 − input_share)·target`` for ``grad_weight``,
        ``input_share·target / input_paths`` for each of the ``input_paths`` ∇X paths."""
        if path == "grad_weight":
            return (1 - self.input_share) * self.target
        return self.input_share * self.target / max(1, input_paths)

    def choose(self, path: str, current: tuple[str, int],
               ratios: dict[tuple[str, int], float], target: float) -> tuple[str, int]:
        """The spec ``path`` should run from the next step, given the ratios measured on
        this step at the current spec and at each candidate (``ratios`` must hold them)
        and the path's ``target`` (:meth:`path_target`). Unchanged when the current ratio
        is NaN (no SGD estimate), but for a current spec outside the candidates. Such a
        spec (a width outside ``min_bits..max_bits``, as the recipes' 8-bit start under
        ``max_bits < 8``, or an unlisted quantizer) is left for the fewest-bit candidate
        meeting the target without hysteresis, else the lowest-ratio one at ``max_bits``;
        unmeasured (NaN), for the candidate nearest it: its quantizer (an unlisted one: the
        first listed), its width clamped to ``min_bits..max_bits`` (a trial: a path the
        monitor cannot measure stayed at 8 bits under ``max_bits=6``). At ``max_bits`` with
        no candidate meeting the target, another quantizer replaces the current one only at
        a ratio ``down`` times lower (a trial: PSQ and BHQ swapped places on the ratios'
        noise). Candidates whose ratio is NaN are never chosen by their ratio."""
        r_cur = ratios[current]
        allowed = current in self.candidates(path)
        if math.isnan(r_cur):
            if allowed:
                return current
            listed = getattr(self, path)
            return (current[0] if current[0] in listed else listed[0],
                    min(max(current[1], self.min_bits), self.max_bits))
        order = [c for c in self.candidates(path) if c in ratios]
        if r_cur > target or not allowed:
            for c in order:
                # fewer bits than now (another quantizer) is a move down: it must meet the
                # hysteresis threshold too (a review found psq6 → bhq5 at 0.9 × target)
                if ratios[c] <= (self.down * target if allowed and c[1] < current[1] else target):
                    return c
            top = [c for c in order if c[1] == self.max_bits and not math.isnan(ratios[c])]
            if not top:
                return current
            best = min(top, key=lambda c: ratios[c])
            if allowed and current in top and not ratios[best] <= self.down * r_cur:
                return current  # hysteresis between quantizers at max_bits
            return best
        for c in order:
            if c[1] < current[1] and ratios[c] <= self.down * target:
                return c
        return current


__all__ = ["DEFAULT_DOWN", "DEFAULT_INPUT_SHARE", "DEFAULT_TARGET", "AdaptivePolicy", "Decision"]
