"""Which layer's gradient quantizers add how much variance to which parameter group
(:func:`variance_profile`), measured one layer at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..config import FQTConfig
from ..gradmode import saveable
from ..stepstate import measures
from ..nn import fqt_blocks
from ..noise import torch_seed
from ._model import (
    TOTAL,
    FlatGrads,
    InProjectionGemm,
    LossFn,
    capture,
    check_batches,
    configured,
    frozen_buffers,
    gemm_layers,
    parameter_groups,
    progress_bar,
    qat_of,
    weight_groups,
    with_config,
)
from .bounds import JacobianSpectrum, layer_noise, propagate
from .estimators import within


@contextlib.contextmanager
def _only_layer(model: nn.Module, name: str) -> Iterator[None]:
    """Gradient quantization on layer ``name`` only; every other layer and every attention
    block (:func:`~lowbit.nn.fqt_blocks`: their products' quantizers would add their noise
    to every row) runs QAT."""
    layers = fqt_blocks(model)
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


@measures
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

    For each layer ``l`` (:func:`~lowbit.analysis._model.gemm_layers`: Linear, convolutions,
    Hugging Face ``Conv1D``, the in-projections an ``nn.MultiheadAttention`` calls) in
    turn, only ``l`` quantizes gradients (its ∇X and ∇W
    paths as configured) and every other layer runs QAT; the quantization variance of
    each group is the unbiased sample variance over ``repeats ≥ 2`` draws per batch,
    averaged over ``batches`` (standard error by a jackknife over draws: ``repeats ≥ 3``).
    By Theorem 2 the contributions add up, but each quantizer sees a clean ``∇Y`` here:
    where downstream noise widens the ranges upstream quantizers must cover (coarse PTQ),
    a column's sum falls short of the all-layers quantization variance. Cost: ``L·B·R``
    backward passes. ``config`` as in :func:`gradient_variance`. With ``spectra`` (one per batch,
    for all batches), the predicted pair bounds from the QAT ``∇Y`` come along.
    """
    batches = [saveable(b) for b in batches]  # inference tensors copied (lowbit.gradmode)
    if not batches:
        raise ValueError("variance_profile needs at least one batch")
    check_batches(batches)
    if repeats < 2:
        raise ValueError(f"repeats must be ≥ 2, got {repeats}")
    if spectra is not None and len(spectra) < len(batches):
        raise ValueError(f"spectra must give one spectrum per batch ({len(batches)}), "
                         f"got {len(spectra)}")
    gen = torch.Generator().manual_seed(torch_seed(seed))
    with configured(model, config) as m, frozen_buffers(m):
        layers = gemm_layers(m)
        groups = parameter_groups(m)
        homes = weight_groups(m, groups)
        flat = FlatGrads(m, groups)
        slices = dict(flat.slices) | {TOTAL: slice(0, flat.numel)}
        # an attention's in-projection alternatives that its calls do not take (packed qkv
        # runs, q/k/v/kv do not) get no row: nothing of theirs to quantize
        with with_config(m, qat_of), capture(m, grads=False) as rec:
            loss_fn(m, batches[0])
        names = [n for n, lay in layers.items() if rec[n].calls or not isinstance(lay, InProjectionGemm)]
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
                    dd, da = propagate(sp, {name: nz}, list(groups), homes)
                    for j, p in enumerate(slices):  # the groups, then "total"
                        pd[i, j] += dd[name][p] / len(batches)
                        pa[i, j] += da[name][p] / len(batches)
                draws = torch.empty(repeats, flat.numel, dtype=torch.float64)
                with _only_layer(m, name):
                    for r in range(repeats):
                        draws[r] = (flat.grads(m, loss_fn, batch) - q).double()
                        bar.update(1)
                for j, sl in enumerate(slices.values()):
                    v, se = within(draws[:, sl])
                    meas[i, j] += v / len(batches)
                    meas_se2[i, j] += se**2 / len(batches) ** 2
        bar.close()
    return VarianceProfile(
        layers=names, groups=list(slices), measured=meas.tolist(),
        measured_se=meas_se2.sqrt().tolist(), batches=len(batches),
        repeats=repeats, pred_data=pd.tolist() if spectra is not None else [],
        pred_analytic=pa.tolist() if spectra is not None else [],
    )


__all__ = ["VarianceProfile", "variance_profile"]
