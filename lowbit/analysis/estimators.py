"""Estimators shared by the variance measurements: sample variances from Gram matrices,
delete-one jackknife standard errors, and the bias z-score.

A set of draws ``x_1..x_n`` (vectors) enters through its Gram matrix ``⟨x_i, x_j⟩``:
the unbiased sample variance ``1/(n−1)·Σ‖x_i − x̄‖²`` (trace of the covariance) and its
leave-one-out versions come from it without forming the differences.
"""

from __future__ import annotations

import math

import torch

from ..varrecord import ratio  # NaN-aware: NaN if either is NaN, 0 for 0/0, inf for a/0


def var_from_gram(gram: torch.Tensor) -> float:
    """Unbiased sample variance ``1/(n−1)·Σ‖x_i − x̄‖²`` from the Gram matrix ``⟨x_i, x_j⟩``."""
    n = gram.shape[0]
    return float((gram.trace() - gram.sum() / n) / (n - 1))


def var_loo(gram: torch.Tensor) -> torch.Tensor:
    """The sample variance with each ``x_i`` left out in turn (for the jackknife)."""
    n = gram.shape[0]
    m = n - 1
    tr = gram.trace() - gram.diagonal()
    tot = gram.sum() - 2 * gram.sum(1) + gram.diagonal()
    return (tr - tot / m) / (m - 1)


def jackknife_se(loo: torch.Tensor) -> float:
    """Delete-one jackknife standard error from the leave-one-out estimates."""
    n = loo.shape[0]
    return float(((n - 1) / n * (loo - loo.mean()).pow(2).sum()).sqrt())



def within(draws: torch.Tensor) -> tuple[float, float]:
    """Unbiased sample variance ``1/(R−1)·Σ_r ‖d_r − d̄‖²`` of ``R`` draws (rows) and its
    delete-one jackknife standard error (NaN for ``R < 3``)."""
    gram = draws @ draws.t()
    var = var_from_gram(gram)
    se = jackknife_se(var_loo(gram)) if draws.shape[0] >= 3 else math.nan
    return var, se


def z_score(s: torch.Tensor, s2: torch.Tensor) -> float:
    """``Σs / √Σs²``; 0 where there is no noise at all (``Σs² = 0``); NaN where a draw was
    not finite (a review found NaN gradients reported as z = 0, "no bias")."""
    s, s2 = float(s), float(s2)
    if math.isnan(s) or math.isnan(s2) or math.isinf(s2):
        return math.nan
    return s / math.sqrt(s2) if s2 > 0 else 0.0




class BiasTest:
    """Running ``Σ s`` and ``Σ s²`` of the projections ``s = ⟨d, u⟩`` of noise draws ``d``
    on two directions per group (``"grad"``: the group's QAT gradient, ``"rand"``: a fixed
    random one; ``dirs[kind][group]``, unit vectors): :func:`z_score` of each."""

    def __init__(self, slices: dict[str, slice]) -> None:
        self.slices = slices
        self.sum = {k: torch.zeros(len(slices), dtype=torch.float64) for k in ("grad", "rand")}
        self.sq = {k: torch.zeros(len(slices), dtype=torch.float64) for k in ("grad", "rand")}

    def add(self, d: torch.Tensor, dirs: dict[str, dict[str, torch.Tensor]]) -> None:
        for i, (g, sl) in enumerate(self.slices.items()):
            for k in ("grad", "rand"):
                s = float(d[sl] @ dirs[k][g])
                self.sum[k][i] += s
                self.sq[k][i] += s * s

    def z(self, kind: str, i: int) -> float:
        return z_score(self.sum[kind][i], self.sq[kind][i])


def unit(v: torch.Tensor) -> torch.Tensor:
    """``v/‖v‖`` (zeros for a zero vector), the norm taken in float64: torch's float32 norm
    squares each element in float32, which underflows below about 1e-19 (a direction of
    1e-25 gradients read as zero) and overflows above about 1e19."""
    nrm = float(torch.linalg.vector_norm(v, dtype=torch.float64))
    return (v.double() / nrm).to(v.dtype) if nrm > 0 else torch.zeros_like(v)  # a norm past float32's range too


__all__ = ["BiasTest", "jackknife_se", "ratio", "unit", "var_from_gram", "var_loo", "within",
           "z_score"]
