"""Per-layer gradient variances from the operands a layer already holds (METHOD.md §9).

Two estimators, both pure functions of one step's ``∇Y`` and ``Q_f(X)``, used by the live
monitor (:mod:`lowbit.monitor`) and checked against brute force in the tests.

**Minibatch (SGD) variance of a weight gradient.** A layer's weight gradient is a sum
over the minibatch's ``B`` samples, ``∇W = Σ_n G_n`` with ``G_n = Σ_{t∈n} a_tᵀ u_t``
(``a_t`` a row of ``∇Y``, ``u_t`` the matching row of the ∇W GEMM's other operand:
``Q_f(X)`` for a Linear, its im2col patches for a Conv2d; ``t`` runs over the sample's
tokens or spatial positions). With the loss a mean over samples, ``B·G_n`` is sample
``n``'s own gradient, and the variance of the minibatch gradient (trace of its
covariance, i.i.d. samples) is estimated without bias by ``S²/B``, ``S²`` the sample
variance of the ``B·G_n``::

    Var_SGD(∇W) ≈ (B · Σ_n ‖G_n‖² − ‖Σ_n G_n‖²) / (B − 1)                       (1)

(the same formula for a sum-reduced loss). The per-sample norms need no per-sample
gradients: for one row per sample ``‖G_n‖² = ‖a_n‖²‖u_n‖²``, and for ``T`` rows the
"ghost norm" ``‖G_n‖² = Σ_{t,t'} (a_t·a_t')(u_t·u_t') = ⟨A_nA_nᵀ, U_nU_nᵀ⟩``, which costs
``T²(O + K)`` per sample against ``T·O·K`` for forming ``G_n``; :func:`per_sample_sq_norms`
takes the cheaper (for convolutions, with ``T`` = H'·W' positions, forming ``G_n`` usually
wins; it is done in chunks of samples, never all at once). A bias adds ``‖Σ_{t∈n} a_t‖²``.
A grouped convolution is a block-diagonal GEMM: its groups' norms add.

**Quantization variance of a product.** A gradient quantizer returns
``Q(A) = T⁻¹ SR(T·A)`` with independent rounding errors ``ξ_in`` of variance ``v_in``
(:meth:`~lowbit.quantizers.base.GradQuantizer.rounding_variance`). The error of a
product ``Q(A)·U`` then has::

    E‖(Q(A) − A)·U‖² = Σ_j Σ_i (T⁻¹)²_ji Σ_n v_in ‖U_n‖²                            (2)

— :func:`product_noise` (``U_n`` row ``n`` of ``U``; the inner sum is ``v @ ‖U_n‖²``, the
outer one the transform's ``inverse_sq``). The error of the column sums
``𝟙ᵀ(Q(A) − A)·M`` (the gradient of a shift added to the layer's input, see
:mod:`lowbit.monitor`) is ``Σ_i c_i² Σ_n v_in ‖M_n‖²`` with ``c = (T⁻¹)ᵀ𝟙``
(:func:`column_sum_noise`).
"""

from __future__ import annotations

import math

import torch

_CHUNK_ELEMS = 1 << 24  # largest intermediate (per-sample Grams or gradients) per chunk


def per_sample_sq_norms(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``‖a_nᵀ u_n‖²_F`` for every sample ``n``: ``a`` (B, T, O), ``u`` (B, T, K) →
    (B,) float64. Ghost norm (Gram matrices, ``T²(O+K)`` per sample) or the per-sample
    product (``T·O·K``), whichever costs less, in float32 products summed in float64,
    in chunks of samples whose intermediate holds at most 2²⁴ elements."""
    if a.dim() != 3 or u.dim() != 3 or a.shape[:2] != u.shape[:2]:
        raise ValueError(f"per_sample_sq_norms needs a (B, T, O) and u (B, T, K) with the same "
                         f"B and T, got {tuple(a.shape)} and {tuple(u.shape)}")
    b, t, o = a.shape
    k = u.shape[2]
    a, u = a.float(), u.float()
    if t == 1:
        return a.square().sum((1, 2)).double() * u.square().sum((1, 2)).double()
    ghost = t * (o + k) < o * k
    per = t * t if ghost else o * k
    step = max(1, _CHUNK_ELEMS // max(per, 1))
    out = []
    for s in range(0, b, step):
        ac, uc = a[s:s + step], u[s:s + step]
        if ghost:
            prod = (ac @ ac.transpose(1, 2)) * (uc @ uc.transpose(1, 2))  # (b, T, T)
            out.append(prod.double().sum((1, 2)))
        else:
            out.append((ac.transpose(1, 2) @ uc).double().square().sum((1, 2)))  # G_n: (b, O, K)
    return torch.cat(out) if out else a.new_zeros(0, dtype=torch.float64)


def sgd_variance(sq_norms: torch.Tensor, total_sq: float) -> float:
    """Formula (1): ``(B·Σ_n ‖G_n‖² − ‖Σ_n G_n‖²)/(B − 1)`` from the per-sample squared
    norms ``sq_norms`` (B,) and ``total_sq = ‖Σ_n G_n‖²``; NaN for ``B < 2`` (a single
    sample has no sample variance)."""
    b = sq_norms.shape[0]
    if b < 2:
        return math.nan
    return float((b * sq_norms.double().sum() - total_sq) / (b - 1))


def weight_grad_sq_norms(a: torch.Tensor, u: torch.Tensor, bias: bool,
                         groups: int = 1) -> tuple[torch.Tensor, float]:
    """Per-sample ``‖G_n‖²`` (B,) float64 and ``‖Σ_n G_n‖²`` of a weight gradient
    ``Σ_n a_nᵀ u_n`` (plus the bias gradient ``Σ_{t∈n} a_t`` when ``bias``).

    ``a`` (B, T, O): the output gradient rows of each sample; ``u`` (B, T, K): the
    matching rows of the ∇W GEMM's other operand. ``groups`` > 1 (grouped convolution):
    output features and ``u``'s columns split into that many contiguous blocks, block
    ``g`` of ``a`` multiplying block ``g`` of ``u`` only."""
    o, k = a.shape[2], u.shape[2]
    if o % groups or k % groups:
        raise ValueError(f"groups={groups} must divide both {o} outputs and {k} inputs")
    og, kg = o // groups, k // groups
    sq = a.new_zeros(a.shape[0], dtype=torch.float64)
    total = 0.0
    for g in range(groups):
        ag, ug = a[:, :, g * og:(g + 1) * og], u[:, :, g * kg:(g + 1) * kg]
        sq = sq + per_sample_sq_norms(ag, ug)
        full = ag.reshape(-1, og).float().t() @ ug.reshape(-1, kg).float()  # (O_g, K_g)
        total += float(full.double().square().sum())
    if bias:
        per = a.float().sum(1).double()  # (B, O): each sample's bias gradient
        sq = sq + per.square().sum(1)
        total += float(per.sum(0).square().sum())
    return sq, total


def product_noise(t: object, var: torch.Tensor, col_weight: torch.Tensor,
                  row_groups: torch.Tensor | None = None) -> float:
    """Formula (2): ``E‖(Q(A) − A)·U‖²`` from the quantizer's transform ``t`` and rounding
    variances ``var`` (R_pad, N) float64 (``rounding_variance``), with ``col_weight``
    (N,) = ``‖U_n‖²``. Grouped products (a grouped convolution's ∇W): ``col_weight``
    (N, G) holds each group's ``‖U_n‖²`` and ``row_groups`` (R,) the group of every output
    row of ``A`` (rows may be mixed across groups by ``T``, so each output row ``j`` is
    weighted with its own group's column)."""
    w = col_weight.double().to(var.device)
    if row_groups is None:
        return float(t.inverse_sq(var @ w).sum())  # type: ignore[attr-defined]
    r = var @ w  # (R_pad, G)
    total = 0.0
    for g in range(w.shape[1]):
        total += float(t.inverse_sq(r[:, g])[row_groups == g].sum())  # type: ignore[attr-defined]
    return total


def inverse_column_sums(t: object, n_pad: int, device: torch.device) -> torch.Tensor:
    """``c = (T⁻¹)ᵀ𝟙`` (n_pad,) float64: ``c_i = Σ_j (T⁻¹)_ji``, the weight with which row
    ``i`` of the transformed operand reaches the column sums after the inverse. Obtained
    as the gradient of ``Σ T⁻¹y`` with respect to ``y`` (the transforms are linear maps
    written in differentiable torch ops), so it holds for every transform."""
    with torch.enable_grad():
        y = torch.zeros(n_pad, 1, dtype=torch.float64, device=device, requires_grad=True)
        out = t.inverse(y, torch.float64).sum()  # type: ignore[attr-defined]
        (c,) = torch.autograd.grad(out, y)
    return c.reshape(-1).double()


def column_sum_noise(t: object, var: torch.Tensor, col_weight: torch.Tensor) -> float:
    """``E‖𝟙ᵀ(Q(A) − A)·M‖²`` = ``Σ_i c_i² Σ_n v_in ‖M_n‖²`` with ``c = (T⁻¹)ᵀ𝟙``
    (:func:`inverse_column_sums`), ``var`` (R_pad, N) the rounding variances and
    ``col_weight`` (N,) = ``‖M_n‖²``."""
    c = inverse_column_sums(t, var.shape[0], var.device)
    return float((c.square() * (var @ col_weight.double().to(var.device))).sum())


__all__ = ["column_sum_noise", "inverse_column_sums", "per_sample_sq_norms", "product_noise",
           "sgd_variance", "weight_grad_sq_norms"]
