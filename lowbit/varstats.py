"""Per-layer gradient variances from the operands a layer already holds (docs/METHOD.md §9).

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

(the same formula for a sum-reduced loss; ``‖Σ_n G_n‖²`` of large products by a bfloat16
GEMM, :func:`total_sq_norm`). The per-sample norms need no per-sample
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

from .formats import IntFormat, compute_dtype
from .quantizers import GradQuantizer, Granularity

_CHUNK_ELEMS = 1 << 24  # largest intermediate (per-sample Grams or gradients) per chunk
_ROW_BLOCK = 1 << 16  # elements per block of rows in path_noise (row-separable quantizers)
_BF16_MACS = 1 << 26  # ‖Σ_n G_n‖² of products this large: bfloat16 GEMM (total_sq_norm)
_COHERENT = 0.9  # ... redone in float32 above this coherence ‖Σ G_n‖² / (B·Σ ‖G_n‖²)


_TINY_NORM = 2.0**-43  # a float32 norm below this may have lost its elements' squares (see squared_norms)


def squared_norms(x: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Squared 2-norms over ``dim`` (all of ``x`` for None) as float64, from one float32
    pass (``vector_norm`` accumulates in float32 with torch's cascade summation; float64
    for float64 ``x``, whose values may lie outside float32's range). torch's float32
    norm squares the elements in float32: below about 1e-19 they underflow (a gradient of
    1e-25 had norm 0, so ``sgd_w`` 0 and a ratio of inf: a review), above about 1e19 they
    overflow. A float32 norm under ``2⁻⁴³`` (which ``n ≤ 2⁴⁰`` elements reach only when
    all lie under ``2⁻⁶³``) or infinite is therefore computed again in float64."""
    r = torch.linalg.vector_norm(x, dim=dim, dtype=compute_dtype(x.dtype))
    if r.dtype == torch.float32:
        lost = (r < _TINY_NORM) | (r == math.inf)
        if bool(lost.any()):
            return torch.where(lost, torch.linalg.vector_norm(x, dim=dim, dtype=torch.float64), r.double()).square()
    return r.double().square()


def _work(t: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """``t`` in :func:`~lowbit.formats.compute_dtype` (float32; float64 where ``t`` or one
    of ``others``, the operands it is multiplied with, is float64)."""
    wide = any(o.dtype == torch.float64 for o in (t, *others))
    return t.to(torch.float64 if wide else torch.float32)


def _low(*ts: torch.Tensor) -> bool:
    """Whether the bfloat16 shortcut may take these operands: not float64 ones (bfloat16
    has float32's range, not float64's), and only where a bfloat16 GEMM is the faster one
    (:func:`bf16_gemms_fast`)."""
    return all(t.dtype != torch.float64 for t in ts) and all(bf16_gemms_fast(t.device) for t in ts)


_BF16_UNITS = frozenset({"avx512_bf16", "amx_bf16"})


def bf16_gemms_fast(device: torch.device) -> bool:
    """Whether bfloat16 GEMMs outrun float32's on ``device``: CUDA GPUs with bfloat16 tensor
    cores (compute capability 8.0 and up: not a V100 or T4, a review), and CPUs with
    bfloat16 units (AVX-512 BF16, AMX-BF16). Elsewhere the float32 GEMM (torch's bfloat16
    matmul without such units: an AMD EPYC with AVX2 only ran it at 0.9 GFLOP/s against 50
    for float32 — a docs audit found a monitored FFN step at 114–137 s against 1.6–2.7 s
    unmonitored)."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type != "cpu":
        return False
    from .kernels import cbuild  # (the kernels package imports this module's users)
    return bool(cbuild.cpu_flags() & _BF16_UNITS)


def _pow2_scale(x: torch.Tensor) -> torch.Tensor:
    """Per sample of ``x`` (b, T, K), the power of two ``2^(e−1) ≤ absmax < 2^e``, (b, 1, 1)
    in ``x``'s dtype (1 for an all-zero or non-finite sample): dividing by it is exact and
    brings the values into [0, 2), so the Gram entries of a sample neither overflow nor
    underflow as its squares did (a Gram sums T products: cancellation between tokens
    stays float32's). ``2^e`` itself overflowed for an absmax in float32's top binade."""
    m = x.abs().amax((1, 2), keepdim=True)
    ok = torch.isfinite(m) & (m > 0)
    e = torch.frexp(torch.where(ok, m, torch.ones_like(m))).exponent
    return torch.ldexp(torch.ones_like(m), e - 1)


def _per_sample(a: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-sample ``‖a_nᵀu_n‖²`` (B,) float64, and ``Σ_n a_nᵀu_n`` (O, K) when it comes
    for free (the per-sample-product branch), else ``None``."""
    b, t, o = a.shape
    k = u.shape[2]
    a, u = _work(a, u), _work(u, a)
    if t == 1:
        return squared_norms(a, (1, 2)) * squared_norms(u, (1, 2)), None
    ghost = t * (o + k) < o * k
    per = t * t if ghost else o * k
    step = max(1, _CHUNK_ELEMS // max(per, 1))
    out, total = [], None
    for s in range(0, b, step):
        ac, uc = a[s:s + step], u[s:s + step]
        if ghost:
            # each factor's Gram in its own range (a power of two taken out per sample: exact),
            # the product and the scales' squares in float64 — float32 Grams of values past
            # ~1e19 overflowed and below ~1e-19 lost their squares (fault kind 201, a review)
            sa, su = _pow2_scale(ac), _pow2_scale(uc)
            an, un = ac / sa, uc / su
            prod = (an @ an.transpose(1, 2)).double() * (un @ un.transpose(1, 2)).double()  # (b, T, T)
            out.append(prod.sum((1, 2)) * (sa.double().reshape(-1) * su.double().reshape(-1)) ** 2)
        else:
            g = ac.transpose(1, 2) @ uc  # G_n: (b, O, K)
            out.append(squared_norms(g, (1, 2)))
            total = g.sum(0) if total is None else total + g.sum(0)
    sq = torch.cat(out) if out else a.new_zeros(0, dtype=torch.float64)
    return sq, (None if ghost else total)


def per_sample_sq_norms(a: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``‖a_nᵀ u_n‖²_F`` for every sample ``n``: ``a`` (B, T, O), ``u`` (B, T, K) →
    (B,) float64. Ghost norm (Gram matrices, ``T²(O+K)`` per sample) or the per-sample
    product (``T·O·K``), whichever costs less, in float32 products (float64 for float64
    operands) summed in float64,
    in chunks of samples whose intermediate holds at most 2²⁴ elements."""
    if a.dim() != 3 or u.dim() != 3 or a.shape[:2] != u.shape[:2]:
        raise ValueError(f"per_sample_sq_norms needs a (B, T, O) and u (B, T, K) with the same "
                         f"B and T, got {tuple(a.shape)} and {tuple(u.shape)}")
    return _per_sample(a, u)[0]


def total_sq_norm(a: torch.Tensor, u: torch.Tensor, sq: torch.Tensor) -> float:
    """``‖aᵀu‖²_F`` for ``a`` (N, O), ``u`` (N, K) given the per-sample squared norms ``sq``
    whose sum bounds it (``‖Σ_n G_n‖² ≤ B·Σ_n ‖G_n‖²``).

    Products of at least 2²⁶ multiply-adds run in bfloat16 where that is faster
    (:func:`bf16_gemms_fast`: float32 accumulation, 4× a float32 GEMM on CPUs with
    AVX-512 BF16; float32 on CPUs without bfloat16 units). Its input rounding (relative 2⁻⁹ per element,
    independent signs) moves ``‖aᵀu‖²`` by a relative 1e-5–5e-5 (measured, Gaussian
    operands 1024×256×256), so formula (1) by that times ``c/(1 − c)``, ``c`` the
    coherence ``‖aᵀu‖² / (B·Σ‖G_n‖²)``: at most 5e-4 for ``c ≤ 0.9``, far below (1)'s own
    sampling error (≥ √(2/B)). Above ``c = 0.9`` (the samples' gradients nearly coincide
    and (1) subtracts two close numbers) the product is redone in float32. Float64
    operands skip bfloat16 (float32's range) and multiply in float64."""
    n, o = a.shape
    k = u.shape[1]
    if n * o * k >= _BF16_MACS and _low(a, u):
        total = float(squared_norms(a.bfloat16().t() @ u.bfloat16()))
        if total <= _COHERENT * sq.shape[0] * float(sq.sum()):
            return total
    return float(squared_norms(_work(a, u).t() @ _work(u, a)))


def product_row_norms(a: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Rows ``s_n`` of ``a·w`` (``a`` (B, O), ``w`` (O, K)) as per-sample gradients: their
    squared norms (B,) float64 and ``‖Σ_n s_n‖²``. In bfloat16 for products of at least
    2²⁶ multiply-adds where that is faster (:func:`bf16_gemms_fast`), redone in float32 above coherence 0.9 — the rule and bound of
    :func:`total_sq_norm`."""
    def norms(p: torch.Tensor) -> tuple[torch.Tensor, float]:
        return squared_norms(p, 1), float(squared_norms(_work(p).sum(0)))

    b, o = a.shape
    if b * o * w.shape[1] >= _BF16_MACS and _low(a, w):
        sq, total = norms(a.bfloat16() @ w.bfloat16())
        if total <= _COHERENT * b * float(sq.sum()):
            return sq, total
    return norms(_work(a, w) @ _work(w, a))


def sgd_variance(sq_norms: torch.Tensor, total_sq: float) -> float:
    """Formula (1): ``(B·Σ_n ‖G_n‖² − ‖Σ_n G_n‖²)/(B − 1)`` from the per-sample squared
    norms ``sq_norms`` (B,) and ``total_sq = ‖Σ_n G_n‖²``; NaN for ``B < 2`` (a single
    sample has no sample variance). At least 0: the two sums are equal where every sample
    gives one gradient (a variance of 0), and their difference then left rounding's sign —
    a negative variance (a trial: ``-2.29e-09``; a non-finite one stays as it is)."""
    b = sq_norms.shape[0]
    if b < 2:
        return math.nan
    v = float((b * sq_norms.double().sum() - total_sq) / (b - 1))
    return max(v, 0.0) if math.isfinite(v) else v


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
        sq_g, full = _per_sample(ag, ug)
        sq = sq + sq_g
        if full is None:  # (O_g, K_g): a GEMM unless the per-sample products gave it
            total += total_sq_norm(ag.reshape(-1, og), ug.reshape(-1, kg), sq_g)
        else:
            total += float(squared_norms(full))
    if bias:
        per = _work(a).sum(1)  # (B, O): each sample's bias gradient
        sq = sq + squared_norms(per, 1)
        total += float(squared_norms(per.sum(0)))
    return sq, total


def paired_variance(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """``½‖a − b‖²`` of two minibatch gradients (NaN when either is missing, their shapes
    differ, or either holds a non-finite value — an overflowed step's gradient is no
    measurement, and its ``inf`` made every ratio 0: a review): unbiased for the
    minibatch variance when both come from independent minibatches at the same weights
    (``E‖a − b‖² = 2·Var``); one optimizer step apart, the drift ``Δμ`` of the mean
    gradient adds ``½‖Δμ‖²``."""
    if a is None or b is None or a.shape != b.shape or not (bool(a.isfinite().all()) and bool(b.isfinite().all())):
        return math.nan
    return float((a.double() - b.double()).square().sum()) / 2


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


def path_noise(quantizer: GradQuantizer, a: torch.Tensor, fmt: IntFormat,
               generator: torch.Generator | None, col_weight: torch.Tensor,
               row_groups: torch.Tensor | None = None,
               shift_weight: torch.Tensor | None = None) -> tuple[float, float]:
    """``(E‖(Q(A) − A)·U‖², E‖𝟙ᵀ(Q(A) − A)·M‖²)`` (formula (2) and
    :func:`column_sum_noise`; the second NaN without ``shift_weight``) for ``quantizer``
    at ``fmt`` on ``a``, its noise drawn from ``generator`` (random transforms).

    A quantizer whose steps are per row and whose transform mixes no rows (PSQ) is
    evaluated on blocks of rows — the same arithmetic, on temporaries that stay in cache
    (``rounding_variance`` of a whole large operand writes several operand-sized float64
    arrays); its ``T⁻¹`` is the identity, so both sums are sums over rows."""
    if quantizer.granularity is Granularity.ROW and not quantizer.mixes_rows:
        a = a.contiguous()
        step = max(1, _ROW_BLOCK // max(a.shape[1], 1))
        quant = shift = 0.0
        for r in range(0, a.shape[0], step):
            t, var = quantizer.rounding_variance(a[r:r + step], fmt, generator)
            groups = None if row_groups is None else row_groups[r:r + step]
            quant += product_noise(t, var, col_weight, groups)
            if shift_weight is not None:
                shift += float((var @ shift_weight.double().to(var.device)).sum())  # c = 𝟙
        return quant, shift if shift_weight is not None else math.nan
    t, var = quantizer.rounding_variance(a, fmt, generator)
    quant = product_noise(t, var, col_weight, row_groups)
    return quant, (math.nan if shift_weight is None else column_sum_noise(t, var, shift_weight))


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


__all__ = ["column_sum_noise", "inverse_column_sums", "paired_variance", "path_noise", "per_sample_sq_norms", "product_noise",
           "product_row_norms", "sgd_variance", "squared_norms", "total_sq_norm", "weight_grad_sq_norms"]
