"""Gradient variance of a converted model, measured by repeated backward passes.

Theorem 2 (docs/METHOD.md §1) splits the variance of the FQT gradient into the minibatch
(SGD) variance of the QAT gradient and the quantization variance that the gradient
quantizers add; data parallelism with quantized gradient communication adds a third
term, the communication-quantization variance (docs/METHOD.md §8).
:func:`gradient_variance` measures them on real minibatches, checks that they add up,
tests the FQT gradient (and the communicated one) for bias (Theorem 1), and compares the
measured quantization variance with the propagated bound of :mod:`lowbit.analysis.bounds`;
:func:`~lowbit.analysis.profile.variance_profile` attributes it to the layer whose
quantizer adds it.

"Variance" of a gradient ``g`` of a parameter group is always ``E‖g − E g‖²``, summed
over the group's entries (the trace of its covariance).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..config import FQTConfig
from ..conversion import quote_module
from ..distributed import GradComm
from ..gradmode import saveable, training_grad_mode
from ..stepstate import measures
from ..nn import fqt_blocks
from ..noise import torch_seed
from ._model import (
    OTHER,
    TOTAL,
    FlatGrads,
    LossFn,
    capture,
    check_batches,
    configured,
    frozen_buffers,
    gemm_layers,
    parameter_groups,
    progress_bar,
    qat_of,
    require_fqt,
    weight_groups,
    with_config,
)
from .bounds import (
    JacobianSpectrum,
    LayerNoise,
    column_sums,
    jacobian_spectrum,
    layer_noise,
    propagate,
    unmodelled_reach,
)
from .dataparallel import comm_average, parameter_index, rank_grads
from .estimators import BiasTest, jackknife_se, ratio, unit, var_from_gram, var_loo, within
from .profile import VarianceProfile, variance_profile


def _grads(model: nn.Module, loss_fn: LossFn, batch: object) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with training_grad_mode():  # called under no_grad or inference_mode too (lowbit.gradmode)
        loss_fn(model, saveable(batch)).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@measures
def quantization_variance(
    model: nn.Module, loss_fn: LossFn, batch: object, repeats: int = 8
) -> dict[str, float]:
    """``E‖g_FQT − g_QAT‖²`` on one minibatch, per parameter and in ``"total"``.

    ``g_QAT`` is computed exactly (the layers' configs with the gradient quantizers
    removed); the expectation over quantization noise is the mean of ``repeats``
    independent FQT backward passes — an unbiased estimate. ``loss_fn(model, batch)``
    returns the scalar loss. ``ValueError`` for a model without converted layers that
    quantize gradients (nothing to measure), or ``repeats`` < 1.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    check_batches([batch])
    require_fqt(model)  # an unconverted model measured 0, as if it were exact
    with frozen_buffers(model):
        with with_config(model, qat_of):
            exact = _grads(model, loss_fn, batch)
        acc = {n: 0.0 for n in exact}
        for _ in range(repeats):
            g = _grads(model, loss_fn, batch)
            for n in acc:
                acc[n] += float((g[n] - exact[n]).double().pow(2).sum()) / repeats
    model.zero_grad(set_to_none=True)
    acc["total"] = sum(acc.values())
    return acc




# -- the decomposition ---------------------------------------------------------------------
@dataclass
class GroupVariance:
    """Variance of one parameter group's gradient (see :func:`gradient_variance`)."""

    numel: int
    sgd: float  # minibatch variance of the QAT gradient
    sgd_se: float
    quant: float  # quantization variance (same minibatch, fresh noise), mean over batches
    quant_se: float
    total: float  # variance of the FQT gradient across minibatches
    total_se: float
    gap: float  # total − (sgd + quant)
    gap_se: float
    rel_gap: float  # gap / total
    z_grad: float  # bias test along the QAT gradient's direction
    z_rand: float  # bias test along a fixed random direction
    comm: float = math.nan  # communication-quantization variance (data parallel, measured)
    comm_se: float = math.nan
    comm_expected: float = math.nan  # ... exact: (1/N²)·Σ_r Var Q(g_r), mean over draws
    z_comm_grad: float = math.nan  # bias test of the communicated average, QAT direction
    z_comm_rand: float = math.nan  # ... along a fixed random direction
    quant_bound_batches: float = math.nan  # quant, on the batches with a predicted bound
    quant_bound_batches_se: float = math.nan  # its s.e. (jackknife over draws; needs R ≥ 3)
    quant_bound_batches_df: float = math.nan  # that s.e.'s degrees of freedom (Satterthwaite)
    pred_data: float = math.nan  # Theorem 2 bound with the exact data-dependent quantizer variance
    pred_analytic: float = math.nan  # ... with the quantizer's analytic variance bound
    tightness_data: float = math.nan  # quant_bound_batches / pred_data (≤ 1: bound holds)
    tightness_analytic: float = math.nan

    @property
    def max_abs_z(self) -> float:
        if math.isnan(self.z_grad) or math.isnan(self.z_rand):  # non-finite draws: nothing tested
            return math.nan
        zs = (self.z_grad, self.z_rand, self.z_comm_grad, self.z_comm_rand)  # comm: NaN if not measured
        return max(abs(z) for z in zs if not math.isnan(z))


def group_label(name: str) -> str:
    """A parameter group's name as tables and notes print it: a converted module's quoted
    (:func:`lowbit.conversion.quote_module`), ``other`` and ``total`` bare."""
    return name if name in (OTHER, TOTAL) else quote_module(name)


def unbounded_note(unbounded: dict[str, list[str]]) -> str:
    """What :attr:`VarianceReport.unbounded` (group → the attention blocks whose noise
    reaches it) means, in one clause: "no bound for 'a', 'b' and total, which quantized
    attention products ('attn') add noise to (the groups upstream of them)" — at most three
    names of each, then "…"."""
    def few(xs: list[str]) -> str:
        return ", ".join(map(group_label, xs[:3])) + (", …" if len(xs) > 3 else "")

    blocks = list(dict.fromkeys(b for bs in unbounded.values() for b in bs))
    return (f"no bound for {few([n for n in unbounded if n != TOTAL])} and total, which quantized "
            f"attention products ({few(blocks)}) add noise to (the groups upstream of them)")


@dataclass
class VarianceReport:
    """What :func:`gradient_variance` measured. ``groups`` has one entry per parameter
    group (converted layers by name, ``"other"``) and ``"total"``; ``layers`` the mean
    quantizer noise of each layer's operands on the bound batches; ``pairs_data`` /
    ``pairs_analytic`` the predicted contribution of layer ``l``'s quantizers to group
    ``p`` (``[l][p]``), averaged over the bound batches; ``unbounded`` the groups whose
    bound is not computed because quantized attention products (which the bound has no
    term for) add noise to their gradients, each with those blocks' names (the groups
    upstream of them; ``"total"`` with every such block)."""

    config: dict
    batches: int
    repeats: int
    bound_batches: int
    groups: dict[str, GroupVariance]
    layers: dict[str, LayerNoise] = field(default_factory=dict)
    pairs_data: dict[str, dict[str, float]] = field(default_factory=dict)
    pairs_analytic: dict[str, dict[str, float]] = field(default_factory=dict)
    spectra: list[JacobianSpectrum] = field(default_factory=list)
    world_size: int = 1
    comm: dict | None = None  # the GradComm, with world_size > 1 and quantized communication
    unbounded: dict[str, list[str]] = field(default_factory=dict)

    @property
    def max_abs_z(self) -> float:
        """Largest |z| of the bias tests over groups (``total`` included); NaN if any
        group's test saw non-finite draws."""
        zs = [g.max_abs_z for g in self.groups.values()]
        return math.nan if any(math.isnan(z) for z in zs) else max(zs)

    def bound_violations(self, which: str = "data", sigmas: float = 3.0) -> list[str]:
        """Groups whose measured quantization variance exceeds the predicted bound by more
        than the one-sided level of ``sigmas`` normal standard deviations (3: a false alarm
        0.13% of the time where the bound holds with equality — a group reached by its own
        ∇W-path noise only, where the measurement straddles it): the excess over its
        standard error is Student-t with ``quant_bound_batches_df`` degrees of freedom
        (:func:`critical_t`; a few draws per batch give a t with ~3 of them, which passed
        3 s.e. 2.9% of the time at 3 σ read as normal: a review)."""
        return [n for n, g in self.groups.items() if math.isfinite(g.quant_bound_batches_se)
                and g.quant_bound_batches > getattr(g, f"pred_{which}")
                + critical_t(sigmas, g.quant_bound_batches_df) * g.quant_bound_batches_se]

    def bound_undecided(self, which: str = "data") -> list[str]:
        """Groups whose measurement exceeds the bound but has no standard error (fewer
        than 3 draws per bound batch), or where the measurement or the bound is not a
        finite number (non-finite gradients; a bound not computed: a grouped
        convolution's, a group upstream of a quantized attention product,
        :attr:`unbounded`): whether the bound holds there is not decided — a bare
        ``measured > bound`` would fire about half the time where it is an equality."""
        return [n for n, g in self.groups.items()
                if not (math.isfinite(g.quant_bound_batches) and math.isfinite(getattr(g, f"pred_{which}")))
                or (not math.isfinite(g.quant_bound_batches_se)
                    and g.quant_bound_batches > getattr(g, f"pred_{which}"))]

    def table(self) -> str:
        """One row per parameter group (``total`` last): its size, the minibatch (SGD) and
        quantization variances with their standard errors, their ratio, with quantized
        communication (``comm``) its variance beside its exact expectation, the total and
        the relative gap ``(total − sgd − quant [− comm])/total``, the largest bias |z|, and the
        measured/predicted ratio of the Theorem 2 bound (– where not computed, inf where the
        bound is 0 and the measurement is not). Variances
        are traces (sums over the group's entries), in squared gradient units. A converted
        layer's group is named as its module, quoted (``'0'``; ``<root>`` for the model itself:
        :func:`lowbit.conversion.quote_module`), beside ``other`` and ``total``."""
        def num(x: float, se: float | None = None) -> str:
            if math.isnan(x):  # not computed
                return "–"
            if math.isinf(x):  # e.g. a measured variance against a bound of 0: a violation
                return "inf" if x > 0 else "-inf"
            return f"{x:.3g}" if se is None or not math.isfinite(se) else f"{x:.3g} ± {se:.2g}"

        head = (f"gradient variance: {self.batches} minibatches × {self.repeats} draws"
                + (f", {self.world_size} ranks" if self.world_size > 1 else ""))
        # the communication term where measured: the gap subtracts it, and a table without it
        # showed a total 3.6× sgd + quant beside a gap of 0.4% (a new user's trial)
        has_comm = self.comm is not None
        rows = [("group", "numel", "sgd", "quant", "quant/sgd", *(("comm", "comm expected") if has_comm else ()),
                 "total", "gap/total", "max |z|", "quant/bound")]
        names = [n for n in self.groups if n != "total"] + (["total"] if "total" in self.groups else [])
        def tight(g: GroupVariance) -> str:  # ± its standard error above 1, as `lowbit variance`'s summary
            t = g.tightness_data
            se = t * g.quant_bound_batches_se / g.quant_bound_batches \
                if t > 1 and g.quant_bound_batches > 0 and math.isfinite(g.quant_bound_batches_se) else None
            return num(t, se)

        for n in names:
            g = self.groups[n]
            label = group_label(n)
            rows.append((label, str(g.numel), num(g.sgd, g.sgd_se), num(g.quant, g.quant_se),
                         num(g.quant / g.sgd if g.sgd > 0 else math.nan),
                         *((num(g.comm, g.comm_se), num(g.comm_expected)) if has_comm else ()),
                         num(g.total, g.total_se), num(g.rel_gap), num(g.max_abs_z), tight(g)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        # what the last column is, and why it may be empty (a new user's walkthrough: "–"
        # under a header "bound (data)", with no reason)
        if not self.bound_batches:
            why = "not computed: bound_batches=0 (pass bound_batches=1 or more)"
        else:  # (a second review: one cause named for every "–" blamed attention wrongly)
            why = (f"bound_batches={self.bound_batches}; \"–\" where the bound has no term (quantized "
                   "attention products, a grouped convolution's ∇W, gradients rounded to nearest) "
                   "or a value is not finite")
            if _rounds_to_nearest(self.config):  # (a trial: fp8-tensorwise's "–" everywhere, unexplained)
                why += ("; this config rounds gradients to nearest (biased): Theorem 2 bounds the "
                        "variance of unbiased stochastic rounding only")
            if self.unbounded:  # which groups attention left without a bound, and which blocks
                why += f"; {unbounded_note(self.unbounded)}"
        note = ("quant/bound: the measured quantization variance over the data-dependent bound "
                f"(≤ 1: the bound holds, up to its standard error, shown above 1: where a group's only "
                f"noise is its own ∇W-path noise — the last layer — the bound is an equality and the "
                f"ratio straddles 1; bound_violations() decides), on the first minibatches; {why}")
        return "\n".join([head, "", *lines, "", note])

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict:
        return {
            "config": self.config, "batches": self.batches, "repeats": self.repeats,
            "bound_batches": self.bound_batches,
            "groups": {n: asdict(g) | {"max_abs_z": g.max_abs_z} for n, g in self.groups.items()},
            "layers": {n: asdict(v) for n, v in self.layers.items()},
            "pairs_data": self.pairs_data, "pairs_analytic": self.pairs_analytic,
            "spectra": [s.to_dict() for s in self.spectra],
            "world_size": self.world_size, "comm": self.comm, "unbounded": self.unbounded,
        }


def _mean_pairs(acc: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    if not acc:
        return {}
    return {lay: {p: sum(a[lay][p] for a in acc) / len(acc) for p in acc[0][lay]} for lay in acc[0]}



def satterthwaite_df(se: torch.Tensor, df_each: int) -> float:
    """Degrees of freedom of ``sqrt(Σ se_b²)``, the standard error of a mean over batches
    whose own standard errors ``se_b`` each have ``df_each`` of them (Welch–Satterthwaite:
    ``(Σ se_b²)² / Σ (se_b⁴ / df_each)``); NaN where it is not defined (no finite, nonzero
    error)."""
    v = se.double().pow(2)
    den = float(v.pow(2).sum()) / df_each if df_each > 0 else 0.0
    return float(v.sum()) ** 2 / den if den > 0 and math.isfinite(den) else math.nan


def critical_t(sigmas: float, df: float) -> float:
    """The Student-t quantile with ``df`` degrees of freedom at the one-sided level of
    ``sigmas`` standard normal deviations (``Φ(sigmas)``): 3 σ at 3 degrees of freedom is
    9.2 standard errors, at 30 3.3; ``sigmas`` itself where ``df`` is not finite."""
    if not math.isfinite(df) or df <= 0:
        return sigmas
    from scipy.stats import norm, t

    return float(t.ppf(norm.cdf(sigmas), df))


@measures
def gradient_variance(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[object],
    config: FQTConfig | None = None,
    repeats: int = 4,
    *,
    bound_batches: int = 0,
    spectra: Sequence[JacobianSpectrum] | None = None,
    spectrum_mode: str = "pairs",
    power_iters: int = 8,
    power_tol: float = 1e-2,
    seed: int = 0,
    world_size: int = 1,
    comm: GradComm | None = None,
    progress: bool = False,
) -> VarianceReport:
    """Theorem 2 measured: SGD, quantization (and communication) variance of the FQT gradient.

    ``model`` runs under ``config`` (``None``: the model's own converted layers, which
    must quantize gradients; given: swapped into the converted layers for the duration,
    or, for an unconverted model, applied to a converted deep copy — the caller's model
    is never changed). The model stays in its current mode (train: BatchNorm uses batch
    statistics, as in training); buffers are restored afterwards. Its forward must be
    deterministic given the batch (no dropout), or dropout noise is counted as
    quantization noise. ``loss_fn(model, batch)`` returns the scalar loss.

    ``world_size = N > 1`` measures a data-parallel step (:mod:`.dataparallel`): every
    gradient below is the average of the ``N`` shards' gradients (rank ``r``: rows
    ``r::N`` of the batch, a tensor or tuple of tensors), averaged exactly or, with
    ``comm``, by the quantized communication of :mod:`lowbit.distributed`.

    For each of the ``B ≥ 3`` ``batches`` (i.i.d. minibatches), one QAT gradient ``q_b``
    (gradient quantizers removed, same forward) and ``R = repeats ≥ 2`` FQT gradients
    ``f_b,r`` with fresh quantization noise; with ``comm``, two communicated averages
    ``c_b,r``, ``c'_b,r`` of each draw's per-rank gradients with fresh communication noise.
    Per parameter group, all unbiased:

    * ``sgd = 1/(B−1)·Σ_b ‖q_b − q̄‖²``, the minibatch variance of the QAT gradient;
    * ``quant = mean_b 1/(R−1)·Σ_r ‖f_b,r − f̄_b‖²``, the quantization variance given the
      minibatch, averaged over minibatches (centred on the draws' mean, so it does not
      assume unbiasedness);
    * ``comm = mean_b,r ‖c_b,r − c'_b,r‖²/2``: the communication-quantization variance
      given the per-rank gradients (centred likewise), and ``comm_expected``, its exact
      value ``(1/N²)·Σ_r Var Q(g_r)`` (:func:`lowbit.distributed.quantized_mean`; with
      the rounding into bfloat16 for bfloat16 parameters, whose averages are taken in
      their own dtype as the hook takes them: :func:`.dataparallel.comm_average`)
      averaged over the same draws;
    * ``total = 1/(B−1)·Σ_b ‖t_b − t̄‖²`` with ``t_b = f_b,1`` (``c_b,1`` with ``comm``):
      one draw per minibatch;
    * ``gap = total − (sgd + quant [+ comm])``: zero in expectation when the estimate is
      unbiased (law of total variance). ``*_se`` are delete-one jackknife standard errors
      over batches (the estimates share batches, so the gap's error is much smaller than
      theirs: the SGD part cancels), ``rel_gap = gap/total``;
    * bias (Theorem 1): projections ``s = ⟨f_b,r − q_b, u⟩`` of all ``B·R`` draws on a
      direction ``u`` chosen without the noise — the group's QAT gradient direction
      ``q_b/‖q_b‖`` (``z_grad``) and a fixed random unit vector (``z_rand``) — give
      ``z = Σ s / √(Σ s²)``: N(0, 1) under "no bias" for independent zero-mean draws,
      and never above ``√(B·R)`` whatever the bias (Cauchy–Schwarz: fewer than 25 draws
      cannot show a bias at 5σ);
      ``z_comm_*`` the same for ``c_b,r − f_b,r`` (the communication's own bias).

    On the first ``bound_batches`` batches the quantizers' variances are also computed on
    the ``∇Y`` captured during every FQT draw and propagated with the Jacobian spectra
    of :func:`~lowbit.analysis.bounds.jacobian_spectrum` (``spectra[i]``, if given, is
    batch ``i``'s — it depends on the forward only, so one serves every quantizer; the
    rest are computed with ``spectrum_mode``/``power_iters``/``power_tol``). ``pred_*``
    are then the bounds (∗) of that module and ``tightness_* = quant_bound_batches /
    pred_*``: ≤ 1 where the bound holds, up to the measurement's standard error
    ``quant_bound_batches_se`` (delete-one jackknife over the draws of each bound batch;
    needs ``repeats ≥ 3``; ``quant_bound_batches_df`` its Satterthwaite degrees of
    freedom) — :meth:`VarianceReport.bound_violations` flags only excesses beyond the
    3σ level of Student's t with those degrees of freedom; single-rank only. The bound has
    no term for quantized attention products: the groups whose parameters an attention
    product that runs depends on (upstream of it: its noise flows there; found on each bound
    batch's graph, :func:`~lowbit.analysis.bounds.unmodelled_reach`) and ``total`` get
    ``pred_* = NaN`` (undecided, listed in :attr:`VarianceReport.unbounded`); every other
    group keeps its bound. ``seed`` seeds the random directions and the
    Hadamard sign draws of the predictions (the layers' own streams draw the FQT noise,
    ``comm.seed`` the communication noise). Raises ``ValueError`` for fewer than 3
    batches, ``repeats < 2``, ``comm`` without ``world_size ≥ 2`` or bounds with it.
    """
    batches = [saveable(b) for b in batches]  # inference tensors copied (lowbit.gradmode)
    n_b, reps, world = len(batches), int(repeats), int(world_size)
    if n_b < 3:
        raise ValueError(f"gradient_variance needs at least 3 batches (jackknife), got {n_b}")
    if reps < 2:
        raise ValueError(f"repeats must be ≥ 2 (the quantization variance is a sample "
                         f"variance over repeats), got {repeats}")
    if world < 1 or (comm is not None and world < 2):
        raise ValueError(f"world_size must be ≥ 1, and ≥ 2 with comm; got {world_size}")
    check_batches(batches, world)
    spectra = list(spectra or [])
    n_bound = max(int(bound_batches), len(spectra)) if bound_batches or spectra else 0
    if n_bound > n_b:
        raise ValueError(f"bound_batches ({n_bound}) exceeds the number of batches ({n_b})")
    if n_bound and world > 1:
        raise ValueError("bound_batches/spectra need world_size 1 (the bound is per rank)")
    gen = torch.Generator().manual_seed(torch_seed(seed))

    with configured(model, config) as m, frozen_buffers(m):
        layers = gemm_layers(m)
        # GEMM blocks the bound has no term for (attention products) that quantize gradients
        unmodelled = {n: b for n, b in fqt_blocks(m).items() if n not in layers and b.config.is_fqt}
        unbounded: dict[str, list[str]] = {}  # group → those blocks whose noise reaches it
        cfgs = {n: lay.config for n, lay in layers.items()}
        groups = parameter_groups(m)
        homes = weight_groups(m, groups)  # where each layer's ∇W noise lands (tied weights)
        flat = FlatGrads(m, groups)
        index = parameter_index(m, flat)
        slices = dict(flat.slices) | {TOTAL: slice(0, flat.numel)}
        names = list(slices)
        rand_dir = torch.randn(flat.numel, generator=gen, dtype=torch.float64)
        dirs = {"rand": {g: unit(rand_dir[sl]) for g, sl in slices.items()}}

        def draw(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
            """The (averaged) gradient, and the per-rank ones with world_size > 1."""
            if world == 1:
                return flat.grads(m, loss_fn, batch), None
            per = rank_grads(m, loss_fn, batch, flat, world)
            return per.sum(0) / world, per

        qs = torch.empty(n_b, flat.numel, dtype=flat.dtype)  # QAT gradients
        ts = torch.empty(n_b, flat.numel, dtype=flat.dtype)  # one FQT (communicated) draw per batch
        quant_b = torch.empty(n_b, len(names), dtype=torch.float64)
        quant_b_se = torch.empty(n_b, len(names), dtype=torch.float64)
        comm_b = torch.zeros(n_b, len(names), dtype=torch.float64)
        comm_exp_b = torch.zeros(n_b, len(names), dtype=torch.float64)
        bias, bias_comm = BiasTest(slices), BiasTest(slices)
        noise_acc: dict[str, LayerNoise] = {}
        pairs_d: list = []
        pairs_a: list = []
        call = 0  # communication calls so far: fresh noise for each

        bar = progress_bar(n_b * (1 + reps), "gradient variance", progress)
        for b, batch in enumerate(batches):
            bounded = b < n_bound
            if bounded and b >= len(spectra):
                spectra.append(jacobian_spectrum(m, loss_fn, batch, mode=spectrum_mode,
                                                 iters=power_iters, tol=power_tol, seed=seed + b,
                                                 progress=progress))
            if bounded and unmodelled:  # the groups their noise reaches get no bound (upstream ones)
                for block, reached in unmodelled_reach(m, loss_fn, batch, groups, unmodelled).items():
                    for g in [*reached, TOTAL] if reached else []:
                        if block not in unbounded.setdefault(g, []):
                            unbounded[g].append(block)
            with with_config(m, qat_of):
                q, _ = draw(batch)
            bar.update(1)
            qs[b] = q
            dirs["grad"] = {g: unit(q.double()[sl]) for g, sl in slices.items()}
            draws = torch.empty(reps, flat.numel, dtype=torch.float64)  # f_b,r − q_b
            noise_b: dict[str, LayerNoise] = {n: LayerNoise() for n in layers}
            for r in range(reps):
                cm = capture(m, grads=True) if bounded else contextlib.nullcontext({})
                with cm as rec:
                    f, per = draw(batch)
                for name, lrec in rec.items():
                    if lrec.calls:
                        sp = spectra[b]
                        ws = (sp.col_norms[name], sp.gram[name]) if name in sp.col_norms else None
                        noise_b[name].add(layer_noise(layers[name], lrec, ws, gen))
                bar.update(1)
                t = f
                if comm is not None:  # two communicated averages of this draw
                    t, var = comm_average(per, flat, index, comm, call)
                    t2, _ = comm_average(per, flat, index, comm, call + 1)
                    call += 2
                    dc, dd = (t - f).double(), (t - t2).double()
                    bias_comm.add(dc, dirs)
                    for i, sl in enumerate(slices.values()):
                        comm_b[b, i] += float(dd[sl] @ dd[sl]) / 2 / reps
                        comm_exp_b[b, i] += float(var[sl].sum()) / reps
                if r == 0:
                    ts[b] = t
                draws[r] = d = (f - q).double()
                bias.add(d, dirs)
            for i, g in enumerate(names):
                quant_b[b, i], quant_b_se[b, i] = within(draws[:, slices[g]])
            if bounded:
                for name, nz in noise_b.items():
                    if nz.draws:
                        noise_acc.setdefault(name, LayerNoise()).add(nz)
                pd, pa = propagate(spectra[b], {n: v for n, v in noise_b.items() if v.draws},
                                   list(groups), homes)
                pairs_d.append(pd)
                pairs_a.append(pa)
        bar.close()
    unbounded = {g: unbounded[g] for g in names if g in unbounded}  # in the groups' order

    stats: dict[str, GroupVariance] = {}
    pred_d = [column_sums(p, list(groups)) for p in pairs_d]
    pred_a = [column_sums(p, list(groups)) for p in pairs_a]
    for i, g in enumerate(names):
        sl = slices[g]
        gq = qs[:, sl].double() @ qs[:, sl].double().t()
        gt = ts[:, sl].double() @ ts[:, sl].double().t()
        qb, cb = quant_b[:, i], comm_b[:, i]
        sgd, tot, quant, com = var_from_gram(gq), var_from_gram(gt), float(qb.mean()), float(cb.mean())
        loo_s, loo_t = var_loo(gq), var_loo(gt)
        loo_q, loo_c = (qb.sum() - qb) / (n_b - 1), (cb.sum() - cb) / (n_b - 1)
        gap = tot - sgd - quant - com
        st = GroupVariance(
            numel=sl.stop - sl.start,
            sgd=sgd, sgd_se=jackknife_se(loo_s),
            quant=quant, quant_se=jackknife_se(loo_q),
            total=tot, total_se=jackknife_se(loo_t),
            gap=gap, gap_se=jackknife_se(loo_t - loo_s - loo_q - loo_c),
            rel_gap=gap / tot if tot > 0 else (math.nan if not math.isfinite(tot) else 0.0),
            z_grad=bias.z("grad", i), z_rand=bias.z("rand", i),
        )
        if comm is not None:
            st.comm, st.comm_se = com, jackknife_se(loo_c)
            st.comm_expected = float(comm_exp_b[:, i].mean())
            st.z_comm_grad, st.z_comm_rand = bias_comm.z("grad", i), bias_comm.z("rand", i)
        if n_bound:
            st.quant_bound_batches = float(qb[:n_bound].mean())
            st.quant_bound_batches_se = float(quant_b_se[:n_bound, i].pow(2).sum().sqrt()) / n_bound
            st.quant_bound_batches_df = satterthwaite_df(quant_b_se[:n_bound, i], reps - 1)
            # the bound has no term for attention products' quantizers (lowbit.attention):
            # for the groups their noise reaches (upstream of them, and the total) it is not
            # computed (undecided), not a violation; every other group's bound stands
            blank = math.nan if g in unbounded else 0.0
            st.pred_data = sum(p[g] for p in pred_d) / n_bound + blank
            st.pred_analytic = sum(p[g] for p in pred_a) / n_bound + blank
            st.tightness_data = ratio(st.quant_bound_batches, st.pred_data)
            st.tightness_analytic = ratio(st.quant_bound_batches, st.pred_analytic)
        stats[g] = st
    return VarianceReport(
        config=_config_summary(cfgs), batches=n_b, repeats=reps, bound_batches=n_bound,
        groups=stats, layers=noise_acc, pairs_data=_mean_pairs(pairs_d),
        pairs_analytic=_mean_pairs(pairs_a), spectra=spectra[:n_bound], world_size=world,
        comm=None if comm is None else asdict(comm), unbounded=unbounded,
    )


def _rounds_to_nearest(config: dict) -> bool:
    """Whether a :attr:`VarianceReport.config` (one config's dict, or one per layer) rounds
    a gradient path to nearest."""
    configs = [config] if "grad_input" in config or "grad_weight" in config else list(config.values())
    return any(isinstance(c, dict) and isinstance(c.get(k), dict) and c[k].get("rounding") == "nearest"
               for c in configs for k in ("grad_input", "grad_weight"))


def _config_summary(cfgs: dict[str, FQTConfig]) -> dict:
    """The config of the layers (one dict if they all share it, else by layer)."""
    uniq = {str(c.to_dict()): c for c in cfgs.values()}
    if len(uniq) == 1:
        return next(iter(uniq.values())).to_dict()
    return {n: c.to_dict() for n, c in cfgs.items()}


__all__ = [
    "GroupVariance",
    "VarianceProfile",
    "VarianceReport",
    "gradient_variance",
    "qat_of",
    "quantization_variance",
    "variance_profile",
    "with_config",
]
