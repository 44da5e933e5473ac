"""Gradient variance of a converted model, measured by repeated backward passes.

Theorem 2 (METHOD.md §1) splits the variance of the FQT gradient into the minibatch
(SGD) variance of the QAT gradient and the quantization variance that the gradient
quantizers add. :func:`gradient_variance` measures all three on real minibatches, checks
that they add up, tests the FQT gradient for bias (Theorem 1), and compares the measured
quantization variance with the propagated bound of :mod:`lowbit.analysis.bounds`;
:func:`variance_profile` attributes it to the layer whose quantizer adds it.

"Variance" of a gradient ``g`` of a parameter group is always ``E‖g − E g‖²``, summed
over the group's entries (the trace of its covariance).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..config import FQTConfig
from ..nn import fqt_layers
from ._model import (
    TOTAL,
    FlatGrads,
    LossFn,
    capture,
    configured,
    frozen_buffers,
    parameter_groups,
    progress_bar,
    qat_of,
    with_config,
)
from .bounds import (
    JacobianSpectrum,
    LayerNoise,
    column_sums,
    jacobian_spectrum,
    layer_noise,
    propagate,
)


def _grads(model: nn.Module, loss_fn: LossFn, batch: object) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def quantization_variance(
    model: nn.Module, loss_fn: LossFn, batch: object, repeats: int = 8
) -> dict[str, float]:
    """``E‖g_FQT − g_QAT‖²`` on one minibatch, per parameter and in ``"total"``.

    ``g_QAT`` is computed exactly (the layers' configs with the gradient quantizers
    removed); the expectation over quantization noise is the mean of ``repeats``
    independent FQT backward passes — an unbiased estimate. ``loss_fn(model, batch)``
    returns the scalar loss.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
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


# -- estimators ---------------------------------------------------------------------------
def _var_from_gram(gram: torch.Tensor) -> float:
    """Unbiased sample variance ``1/(n−1)·Σ‖x_i − x̄‖²`` from the Gram matrix ``⟨x_i, x_j⟩``."""
    n = gram.shape[0]
    return float((gram.trace() - gram.sum() / n) / (n - 1))


def _var_loo(gram: torch.Tensor) -> torch.Tensor:
    """The sample variance with each ``x_i`` left out in turn (for the jackknife)."""
    n = gram.shape[0]
    m = n - 1
    tr = gram.trace() - gram.diagonal()
    tot = gram.sum() - 2 * gram.sum(1) + gram.diagonal()
    return (tr - tot / m) / (m - 1)


def _jackknife_se(loo: torch.Tensor) -> float:
    """Delete-one jackknife standard error from the leave-one-out estimates."""
    n = loo.shape[0]
    return float(((n - 1) / n * (loo - loo.mean()).pow(2).sum()).sqrt())


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
    quant_bound_batches: float = math.nan  # quant, on the batches with a predicted bound
    quant_bound_batches_se: float = math.nan  # its s.e. (jackknife over draws; needs R ≥ 3)
    pred_data: float = math.nan  # Theorem 2 bound with the exact data-dependent quantizer variance
    pred_analytic: float = math.nan  # ... with the quantizer's analytic variance bound
    tightness_data: float = math.nan  # quant_bound_batches / pred_data (≤ 1: bound holds)
    tightness_analytic: float = math.nan

    @property
    def max_abs_z(self) -> float:
        return max(abs(self.z_grad), abs(self.z_rand))


@dataclass
class VarianceReport:
    """What :func:`gradient_variance` measured. ``groups`` has one entry per parameter
    group (converted layers by name, ``"other"``) and ``"total"``; ``layers`` the mean
    quantizer noise of each layer's operands on the bound batches; ``pairs_data`` /
    ``pairs_analytic`` the predicted contribution of layer ``l``'s quantizers to group
    ``p`` (``[l][p]``), averaged over the bound batches."""

    config: dict
    batches: int
    repeats: int
    bound_batches: int
    groups: dict[str, GroupVariance]
    layers: dict[str, LayerNoise] = field(default_factory=dict)
    pairs_data: dict[str, dict[str, float]] = field(default_factory=dict)
    pairs_analytic: dict[str, dict[str, float]] = field(default_factory=dict)
    spectra: list[JacobianSpectrum] = field(default_factory=list)

    @property
    def max_abs_z(self) -> float:
        """Largest |z| of the bias tests over groups (``total`` included)."""
        return max(g.max_abs_z for g in self.groups.values())

    def bound_violations(self, which: str = "data", sigmas: float = 3.0) -> list[str]:
        """Groups whose measured quantization variance exceeds the predicted bound by more
        than ``sigmas`` standard errors of the measurement (where the bound is an equality
        — a group reached by its own ∇W-path noise only — the measurement straddles it, so
        a bare ``measured > bound`` would fire half the time)."""
        out = []
        for n, g in self.groups.items():
            pred = getattr(g, f"pred_{which}")
            se = g.quant_bound_batches_se if math.isfinite(g.quant_bound_batches_se) else 0.0
            if g.quant_bound_batches > pred + sigmas * se:
                out.append(n)
        return out

    def to_dict(self) -> dict:
        return {
            "config": self.config, "batches": self.batches, "repeats": self.repeats,
            "bound_batches": self.bound_batches,
            "groups": {n: asdict(g) | {"max_abs_z": g.max_abs_z} for n, g in self.groups.items()},
            "layers": {n: asdict(v) for n, v in self.layers.items()},
            "pairs_data": self.pairs_data, "pairs_analytic": self.pairs_analytic,
            "spectra": [s.to_dict() for s in self.spectra],
        }


def _mean_pairs(acc: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    if not acc:
        return {}
    return {lay: {p: sum(a[lay][p] for a in acc) / len(acc) for p in acc[0][lay]} for lay in acc[0]}


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
    progress: bool = False,
) -> VarianceReport:
    """Theorem 2 measured: SGD, quantization and total variance of the FQT gradient.

    ``model`` runs under ``config`` (``None``: the model's own converted layers, which
    must quantize gradients; given: swapped into the converted layers for the duration,
    or, for an unconverted model, applied to a converted deep copy — the caller's model
    is never changed). The model stays in its current mode (train: BatchNorm uses batch
    statistics, as in training); buffers are restored afterwards. Its forward must be
    deterministic given the batch (no dropout), or dropout noise is counted as
    quantization noise. ``loss_fn(model, batch)`` returns the scalar loss.

    For each of the ``B ≥ 3`` ``batches`` (i.i.d. minibatches), one QAT gradient ``q_b``
    (gradient quantizers removed, same forward) and ``R = repeats ≥ 2`` FQT gradients
    ``f_b,r`` with fresh quantization noise. Per parameter group, all unbiased:

    * ``sgd = 1/(B−1)·Σ_b ‖q_b − q̄‖²``, the minibatch variance of the QAT gradient;
    * ``quant = mean_b 1/(R−1)·Σ_r ‖f_b,r − f̄_b‖²``, the quantization variance given the
      minibatch, averaged over minibatches (centred on the draws' mean, so it does not
      assume unbiasedness);
    * ``total = 1/(B−1)·Σ_b ‖t_b − t̄‖²`` with ``t_b = f_b,1``: one FQT draw per minibatch;
    * ``gap = total − (sgd + quant)``: zero in expectation when the FQT gradient is an
      unbiased estimate of the QAT one (law of total variance). ``*_se`` are delete-one
      jackknife standard errors over batches (the three estimates share batches, so the
      gap's error is much smaller than theirs: the SGD part cancels), ``rel_gap =
      gap/total``;
    * bias (Theorem 1): projections ``s = ⟨f_b,r − q_b, u⟩`` of all ``B·R`` draws on a
      direction ``u`` chosen without the noise — the group's QAT gradient direction
      ``q_b/‖q_b‖`` (``z_grad``) and a fixed random unit vector (``z_rand``) — give
      ``z = Σ s / √(Σ s²)``: N(0, 1) under "no bias" for independent zero-mean draws.

    On the first ``bound_batches`` batches the quantizers' variances are also computed on
    the ``∇Y`` captured during every FQT draw and propagated with the Jacobian spectra
    of :func:`~lowbit.analysis.bounds.jacobian_spectrum` (``spectra[i]``, if given, is
    batch ``i``'s — it depends on the forward only, so one serves every quantizer; the
    rest are computed with ``spectrum_mode``/``power_iters``/``power_tol``). ``pred_*``
    are then the bounds (∗) of that module and ``tightness_* = quant_bound_batches /
    pred_*``: ≤ 1 where the bound holds, up to the measurement's standard error
    ``quant_bound_batches_se`` (delete-one jackknife over the draws of each bound batch;
    needs ``repeats ≥ 3``) — :meth:`VarianceReport.bound_violations` flags only excesses
    beyond 3 of them. ``seed`` seeds the random directions and the Hadamard sign draws of
    the predictions (the layers' own generators draw the FQT noise).
    """
    batches = list(batches)
    n_b, reps = len(batches), int(repeats)
    if n_b < 3:
        raise ValueError(f"gradient_variance needs at least 3 batches (jackknife), got {n_b}")
    if reps < 2:
        raise ValueError(f"repeats must be ≥ 2 (the quantization variance is a sample "
                         f"variance over repeats), got {repeats}")
    spectra = list(spectra or [])
    n_bound = max(int(bound_batches), len(spectra)) if bound_batches or spectra else 0
    if n_bound > n_b:
        raise ValueError(f"bound_batches ({n_bound}) exceeds the number of batches ({n_b})")
    gen = torch.Generator().manual_seed(seed)

    with configured(model, config) as m, frozen_buffers(m):
        layers = fqt_layers(m)
        cfgs = {n: lay.config for n, lay in layers.items()}
        groups = parameter_groups(m)
        flat = FlatGrads(m, groups)
        slices = dict(flat.slices) | {TOTAL: slice(0, flat.numel)}
        names = list(slices)
        rand_dir = torch.randn(flat.numel, generator=gen, dtype=torch.float64)
        rand_u = {g: rand_dir[sl] / rand_dir[sl].norm() for g, sl in slices.items()}

        qs = torch.empty(n_b, flat.numel)  # QAT gradients
        ts = torch.empty(n_b, flat.numel)  # one FQT draw per batch
        quant_b = torch.empty(n_b, len(names), dtype=torch.float64)
        quant_b_se = torch.empty(n_b, len(names), dtype=torch.float64)
        zsum = {k: torch.zeros(len(names), dtype=torch.float64) for k in ("grad", "rand")}
        zsq = {k: torch.zeros(len(names), dtype=torch.float64) for k in ("grad", "rand")}
        noise_acc: dict[str, LayerNoise] = {}
        pairs_d: list = []
        pairs_a: list = []

        bar = progress_bar(n_b * (1 + reps), "gradient variance", progress)
        for b, batch in enumerate(batches):
            bounded = b < n_bound
            if bounded and b >= len(spectra):
                spectra.append(jacobian_spectrum(m, loss_fn, batch, mode=spectrum_mode,
                                                 iters=power_iters, tol=power_tol, seed=seed + b,
                                                 progress=progress))
            with with_config(m, qat_of):
                q = flat.grads(m, loss_fn, batch)
            bar.update(1)
            qs[b] = q
            qd = q.double()
            grad_u = {}
            for g, sl in slices.items():
                nrm = qd[sl].norm()
                grad_u[g] = qd[sl] / nrm if nrm > 0 else torch.zeros_like(qd[sl])
            draws = torch.empty(reps, flat.numel, dtype=torch.float64)  # f_b,r − q_b
            noise_b: dict[str, LayerNoise] = {n: LayerNoise() for n in layers}
            for r in range(reps):
                cm = capture(m, grads=True) if bounded else contextlib.nullcontext({})
                with cm as rec:
                    f = flat.grads(m, loss_fn, batch)
                for name, lrec in rec.items():
                    if lrec.calls:
                        sp = spectra[b]
                        ws = (sp.col_norms[name], sp.gram[name]) if name in sp.col_norms else None
                        noise_b[name].add(layer_noise(layers[name], lrec, ws, gen))
                bar.update(1)
                if r == 0:
                    ts[b] = f
                draws[r] = d = (f - q).double()
                for i, g in enumerate(names):
                    dg = d[slices[g]]
                    for k, u in (("grad", grad_u[g]), ("rand", rand_u[g])):
                        s = float(dg @ u)
                        zsum[k][i] += s
                        zsq[k][i] += s * s
            for i, g in enumerate(names):
                quant_b[b, i], quant_b_se[b, i] = _within(draws[:, slices[g]])
            if bounded:
                for name, nz in noise_b.items():
                    if nz.draws:
                        noise_acc.setdefault(name, LayerNoise()).add(nz)
                pd, pa = propagate(spectra[b], {n: v for n, v in noise_b.items() if v.draws},
                                   list(groups))
                pairs_d.append(pd)
                pairs_a.append(pa)
        bar.close()

    stats: dict[str, GroupVariance] = {}
    pred_d = [column_sums(p, list(groups)) for p in pairs_d]
    pred_a = [column_sums(p, list(groups)) for p in pairs_a]
    for i, g in enumerate(names):
        sl = slices[g]
        gq = qs[:, sl].double() @ qs[:, sl].double().t()
        gt = ts[:, sl].double() @ ts[:, sl].double().t()
        qb = quant_b[:, i]
        sgd, tot, quant = _var_from_gram(gq), _var_from_gram(gt), float(qb.mean())
        loo_s, loo_t = _var_loo(gq), _var_loo(gt)
        loo_q = (qb.sum() - qb) / (n_b - 1)
        gap = tot - sgd - quant
        st = GroupVariance(
            numel=sl.stop - sl.start,
            sgd=sgd, sgd_se=_jackknife_se(loo_s),
            quant=quant, quant_se=_jackknife_se(loo_q),
            total=tot, total_se=_jackknife_se(loo_t),
            gap=gap, gap_se=_jackknife_se(loo_t - loo_s - loo_q),
            rel_gap=gap / tot if tot > 0 else 0.0,
            z_grad=_z(zsum["grad"][i], zsq["grad"][i]),
            z_rand=_z(zsum["rand"][i], zsq["rand"][i]),
        )
        if n_bound:
            st.quant_bound_batches = float(qb[:n_bound].mean())
            st.quant_bound_batches_se = float(quant_b_se[:n_bound, i].pow(2).sum().sqrt()) / n_bound
            st.pred_data = sum(p[g] for p in pred_d) / n_bound
            st.pred_analytic = sum(p[g] for p in pred_a) / n_bound
            st.tightness_data = _ratio(st.quant_bound_batches, st.pred_data)
            st.tightness_analytic = _ratio(st.quant_bound_batches, st.pred_analytic)
        stats[g] = st
    return VarianceReport(
        config=_config_summary(cfgs), batches=n_b, repeats=reps, bound_batches=n_bound,
        groups=stats, layers=noise_acc, pairs_data=_mean_pairs(pairs_d),
        pairs_analytic=_mean_pairs(pairs_a), spectra=spectra[:n_bound],
    )


def _within(draws: torch.Tensor) -> tuple[float, float]:
    """Unbiased sample variance ``1/(R−1)·Σ_r ‖d_r − d̄‖²`` of ``R`` draws (rows) and its
    delete-one jackknife standard error (NaN for ``R < 3``)."""
    gram = draws @ draws.t()
    var = _var_from_gram(gram)
    se = _jackknife_se(_var_loo(gram)) if draws.shape[0] >= 3 else math.nan
    return var, se


def _z(s: torch.Tensor, s2: torch.Tensor) -> float:
    return float(s / s2.sqrt()) if s2 > 0 else 0.0


def _ratio(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return 0.0 if a == 0 else math.inf


def _config_summary(cfgs: dict[str, FQTConfig]) -> dict:
    """The config of the layers (one dict if they all share it, else by layer)."""
    uniq = {str(c.to_dict()): c for c in cfgs.values()}
    if len(uniq) == 1:
        return next(iter(uniq.values())).to_dict()
    return {n: c.to_dict() for n, c in cfgs.items()}


# -- attribution to layers ----------------------------------------------------------------
@contextlib.contextmanager
def _only_layer(model: nn.Module, name: str) -> Iterator[None]:
    """Gradient quantization on layer ``name`` only; every other layer runs QAT."""
    layers = fqt_layers(model)
    saved = {n: lay.config for n, lay in layers.items()}
    try:
        for n, lay in layers.items():
            if n != name:
                lay.config = qat_of(lay.config)
        yield
    finally:
        for n, lay in layers.items():
            lay.config = saved[n]


@dataclass
class VarianceProfile:
    """``measured[i][j]``: quantization variance that layer ``layers[i]``'s gradient
    quantizers (both paths, all other layers QAT) add to group ``groups[j]``'s gradient
    (``groups`` ends with ``"total"``), ``measured_se`` its standard error;
    ``pred_data``/``pred_analytic``: the matching bounds from :mod:`lowbit.analysis.bounds`
    where spectra were given (else empty)."""

    layers: list[str]
    groups: list[str]
    measured: list[list[float]]
    measured_se: list[list[float]]  # jackknife over draws (NaN when repeats < 3)
    batches: int
    repeats: int
    pred_data: list[list[float]] = field(default_factory=list)
    pred_analytic: list[list[float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def variance_profile(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Iterable[object],
    config: FQTConfig | None = None,
    repeats: int = 2,
    *,
    spectra: Sequence[JacobianSpectrum] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> VarianceProfile:
    """Which layer's quantizer adds how much variance to which parameter group.

    For each converted layer ``l`` in turn, only ``l`` quantizes gradients (its ∇X and ∇W
    paths as configured) and every other layer runs QAT; the quantization variance of
    each group is the unbiased sample variance over ``repeats ≥ 2`` draws per batch,
    averaged over ``batches`` (standard error by a jackknife over draws: ``repeats ≥ 3``).
    By Theorem 2 the contributions add up, but each quantizer sees a clean ``∇Y`` here:
    where downstream noise widens the ranges upstream quantizers must cover (coarse PTQ),
    a column's sum falls short of the all-layers quantization variance. Cost: ``L·B·R``
    backward passes. ``config`` as in :func:`gradient_variance`. With ``spectra`` (one per batch,
    for all batches), the predicted pair bounds from the QAT ``∇Y`` come along.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("variance_profile needs at least one batch")
    if repeats < 2:
        raise ValueError(f"repeats must be ≥ 2, got {repeats}")
    if spectra is not None and len(spectra) < len(batches):
        raise ValueError(f"spectra must give one spectrum per batch ({len(batches)}), "
                         f"got {len(spectra)}")
    gen = torch.Generator().manual_seed(seed)
    with configured(model, config) as m, frozen_buffers(m):
        layers = fqt_layers(m)
        groups = parameter_groups(m)
        flat = FlatGrads(m, groups)
        slices = dict(flat.slices) | {TOTAL: slice(0, flat.numel)}
        names = list(layers)
        meas = torch.zeros(len(names), len(slices), dtype=torch.float64)
        meas_se2 = torch.zeros_like(meas)
        pd = torch.zeros_like(meas)
        pa = torch.zeros_like(meas)
        bar = progress_bar(len(batches) * (1 + len(names) * repeats), "variance profile", progress)
        for b, batch in enumerate(batches):
            with with_config(m, qat_of), capture(m, grads=spectra is not None) as rec:
                q = flat.grads(m, loss_fn, batch)
            bar.update(1)
            for i, name in enumerate(names):
                if spectra is not None and rec[name].calls:
                    sp = spectra[b]
                    ws = (sp.col_norms[name], sp.gram[name]) if name in sp.col_norms else None
                    nz = layer_noise(layers[name], rec[name], ws, gen)  # the layer's own config
                    dd, da = propagate(sp, {name: nz}, list(groups))
                    for j, p in enumerate(slices):  # the groups, then "total"
                        pd[i, j] += dd[name][p] / len(batches)
                        pa[i, j] += da[name][p] / len(batches)
                draws = torch.empty(repeats, flat.numel, dtype=torch.float64)
                with _only_layer(m, name):
                    for r in range(repeats):
                        draws[r] = (flat.grads(m, loss_fn, batch) - q).double()
                        bar.update(1)
                for j, sl in enumerate(slices.values()):
                    v, se = _within(draws[:, sl])
                    meas[i, j] += v / len(batches)
                    meas_se2[i, j] += se**2 / len(batches) ** 2
        bar.close()
    return VarianceProfile(
        layers=names, groups=list(slices), measured=meas.tolist(),
        measured_se=meas_se2.sqrt().tolist(), batches=len(batches),
        repeats=repeats, pred_data=pd.tolist() if spectra is not None else [],
        pred_analytic=pa.tolist() if spectra is not None else [],
    )


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
