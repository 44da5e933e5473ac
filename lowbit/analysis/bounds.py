"""Theorem 2, made computable: predicted quantization variance of every parameter group.

In an FQT backward, every gradient quantizer adds zero-mean noise to an otherwise exact
(QAT) linear backward. With ``A = ∇Y_l`` the operand of layer ``l``'s ∇X GEMM and
``A_w = ∇Y_lᵀ`` the operand of its ∇W GEMM::

    ε_l = Q_a(∇Y_l) − ∇Y_l       enters  ∇X_l = (∇Y_l + ε_l)·Q_f(W_l)
    η_l = Q_w(∇Y_lᵀ) − ∇Y_lᵀ     enters  ∇W_l = (∇Y_lᵀ + η_l)·U_l,   U_l = Q_f(X_l) (im2col)

so the FQT gradient of parameter group ``p`` is ``g_QAT + Σ_l J_{l→p} ε_l + [p = l] η_l U_l``
where ``J_{l→p}`` is the linear map from a perturbation of ``∇Y_l`` on the ∇X path to
``∇θ_p`` — the QAT backward from layer ``l``'s ∇X GEMM down to ``θ_p``: ``∇Y_l ↦ ∇Y_l·Q_f(W_l)
= ∇X_l ↦ … ↦ ∇θ_p``. It is the transposed Jacobian ``(∂Y_l/∂θ_p)ᵀ`` of the QAT graph (STE),
non-zero only for groups upstream of ``l`` (``p ≠ l``: ``ε_l`` never reaches ``θ_l``; the
group of an attention's in-projection is its attention module's).

Each noise term has zero mean given everything computed before it, so cross terms vanish
and, exactly,

    E‖g_FQT,p − g_QAT,p‖² = Σ_l E‖J_{l→p} ε_l‖² + E‖η_p U_p‖²
                          ≤ Σ_l λ_max(J_{l→p}ᵀ J_{l→p}) · E‖ε_l‖² + E‖η_p U_p‖²        (∗)

and ``E‖η U‖² ≤ λ_max(UᵀU)·E‖η‖²``. What this module computes:

* ``λ_max(J_{l→p}ᵀJ_{l→p})`` by power iteration on ``JᵀJ`` in the space of ``∇Y_l``, with
  ``J·v`` a vector-Jacobian product (``autograd.grad(Y_l, θ_p, v, create_graph=True)``) and
  ``Jᵀ·u`` its derivative with respect to ``v`` (double backward) —
  :func:`jacobian_spectrum`. Power iteration approaches ``λ_max`` from below (the estimate
  ``‖JᵀJv‖`` for a unit ``v`` never exceeds it), so a bound that is not converged is
  slightly optimistic; each pair reports its last relative change.
* ``E‖ε_l‖²`` two ways, on the ``∇Y_l`` actually captured during FQT backward passes (so
  upstream layers see the noisy operand they really quantize): the quantizer's exact
  ``expected_variance`` given the data ("data") and its ``variance_bound`` ("analytic",
  docs/METHOD.md §2 — the paper's Theorem 2 bound).
* the ∇W-path term exactly: for per-row SR in a row-transformed basis ``T``,
  ``E‖η U‖² = Σ_j Σ_i (T⁻¹)²_ji Σ_n Var(ξ_in)·‖U_n‖²`` ("data"), and the analytic bound
  ``λ_max(UᵀU)·variance_bound(∇Yᵀ)``.

Both predictions are upper bounds of the measured quantization variance in expectation:
``tightness = measured / predicted ≤ 1`` means the bound holds.

The layers ``l`` are the GEMMs with a weight (:func:`~lowbit.analysis._model.gemm_layers`:
Linear, convolutions, Hugging Face ``Conv1D``, an ``nn.MultiheadAttention``'s
in-projections). Quantized attention products (activation × activation) have no term: their
noise enters the gradients of the groups upstream of them (:func:`unmodelled_reach`), whose
bound is then not computed; every other group's is.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import FQTConfig
from ..formats import IntFormat, Rounding, compute_dtype
from ..gradmode import saveable
from ..stepstate import measures
from ..noise import torch_seed
from ..ops import gradient_only_double_backward
from ..quantizers import GradQuantizer, get_quantizer
from ._model import (
    FQTLayer,
    LayerRecord,
    LossFn,
    capture,
    configured,
    frozen_buffers,
    gemm_layers,
    grad_input_operand,
    grad_weight_operand,
    owner_of,
    parameter_groups,
    progress_bar,
    qat_of,
    weight_gemm_input,
    with_config,
)


# -- one quantizer on one operand -------------------------------------------------------
def weighted_expected_variance(
    quantizer: str | GradQuantizer, a: torch.Tensor, fmt: IntFormat, col_weight: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``E‖(Q(a) − a)·U‖²`` over the rounding noise, given ``a`` (R, N) and the squared row
    norms ``col_weight[n] = ‖U_n‖²`` of ``U`` (N, K): the exact variance that the quantized
    operand of ``A·U`` adds to the product.

    With ``Q(a) = T⁻¹·SR(T·a)`` and independent rounding errors ``ξ`` of variance
    ``p(1−p)·step²``: ``Σ_j Σ_i (T⁻¹)²_ji Σ_n Var(ξ_in)·‖U_n‖²``. With ``col_weight = 1``
    this is the quantizer's ``expected_variance``. (Random transforms: given this draw.)
    """
    t, var = get_quantizer(quantizer).rounding_variance(a, fmt, generator)  # (R_pad, N) float64
    return t.inverse_sq(var @ col_weight.double().reshape(-1)).sum()


# -- Jacobian spectra -----------------------------------------------------------------
@dataclass
class JacobianSpectrum:
    """The propagation constants of one minibatch (they depend on the forward only, so
    one spectrum serves every gradient quantizer and bit width).

    ``lam[l][p]``: ``λ_max(J_{l→p}ᵀJ_{l→p})`` for each layer ``l`` whose ∇X is computed and
    each group ``p`` upstream of it; ``rel_change[l][p]``: the last power-iteration step's
    relative change; ``iters[l][p]``: iterations used. ``gram[l]``: ``λ_max(U_lᵀU_l)``;
    ``col_norms[l]``: ``‖U_n‖²`` per row of ``U_l`` (∇W path; absent for grouped convs).
    ``mode="layer"`` (see :func:`jacobian_spectrum`) also fills ``lam_total[l]``, the
    constant for all upstream parameters together.
    """

    mode: str = "pairs"
    lam: dict[str, dict[str, float]] = field(default_factory=dict)
    lam_total: dict[str, float] = field(default_factory=dict)
    rel_change: dict[str, dict[str, float]] = field(default_factory=dict)
    iters: dict[str, dict[str, int]] = field(default_factory=dict)
    gram: dict[str, float] = field(default_factory=dict)
    col_norms: dict[str, torch.Tensor] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"mode": self.mode, "lam": self.lam, "lam_total": self.lam_total,
                "rel_change": self.rel_change, "iters": self.iters,
                "gram": self.gram}


def weight_gemm_stats(layer: FQTLayer, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
    """``(‖U_n‖² per row n, λ_max(UᵀU))`` of the ∇W GEMM's ``U = Q_f(X)`` (im2col for a
    conv) for the layer input ``x``; ``None`` where ∇W is not one GEMM (grouped conv)."""
    u = weight_gemm_input(layer, x)
    if u is None:
        return None
    ud = u.double()
    gram = ud.t() @ ud
    # a NaN/Inf input: the eigensolver does not converge (LinAlgError); λ is not a number
    lam = float(torch.linalg.eigvalsh(gram)[-1]) if bool(torch.isfinite(gram).all()) else math.nan
    # float64, as every use reads it: float32 would overflow past ~1e19 (|u|) and lose
    # columns whose squares sum under ~1e-45 (the float32 norms' fault kind, README row 201)
    return ud.pow(2).sum(1), lam


@contextlib.contextmanager
def _double_differentiable_attention() -> Iterator[None]:
    """Fused CPU attention kernels have no double backward; the math one does."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: the math kernel is the only one on the CPU anyway
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _sqnorm(ts: list[torch.Tensor]) -> torch.Tensor:
    return sum((t.double() ** 2).sum() for t in ts)


def _power_iteration(y: torch.Tensor, params: list[torch.Tensor], iters: int, tol: float,
                     generator: torch.Generator) -> tuple[float, float, int, list[bool]]:
    """``λ_max(JᵀJ)`` for ``J·v = ∂⟨v, y⟩/∂params``: returns λ, the last relative change,
    the iterations used and which ``params`` ``y`` depends on."""
    # the draw in float32 (as ever); held in y's compute dtype: JᵀJv of a float64 model
    # may lie outside float32's range
    v = torch.randn(y.shape, generator=generator, dtype=torch.float32).to(y.device, compute_dtype(y.dtype))
    v = v / v.norm()
    lam, change, used = 0.0, math.inf, [False] * len(params)
    for k in range(1, iters + 1):
        v = v.detach().requires_grad_(True)
        jv = torch.autograd.grad(y, params, v.to(y.dtype), create_graph=True, retain_graph=True,
                                 allow_unused=True)
        used = [g is not None for g in jv]
        jv = [g for g in jv if g is not None and g.requires_grad]
        if not jv:
            return 0.0, 0.0, k, used  # J is zero (no path)
        sq = _sqnorm(jv)  # vᵀJᵀJv
        (h,) = torch.autograd.grad(sq, v, retain_graph=True)  # 2·JᵀJv
        h = h.detach().double()
        new = float(h.norm()) / 2  # ‖JᵀJv‖ ≤ λ_max for a unit v
        change = abs(new - lam) / new if new > 0 else 0.0
        lam = new
        if new == 0 or change < tol:
            break
        v = (h / h.norm()).to(v.dtype)
    return lam, change, k, used


SPECTRUM_MODES = ("pairs", "layer")


@measures
def jacobian_spectrum(
    model: nn.Module, loss_fn: LossFn, batch: object, config: FQTConfig | None = None, *,
    mode: str = "pairs", iters: int = 8, tol: float = 1e-2, seed: int = 0,
    progress: bool = False,
) -> JacobianSpectrum:
    """Propagation constants of Theorem 2 on one minibatch (see the module docstring).

    Runs one QAT forward (the configs' gradient quantizers removed; buffers restored
    afterwards), then power iteration — ``iters`` steps at most, fewer once the estimate
    moves by less than ``tol`` — each step a vector-Jacobian product plus a double
    backward over the part of the graph between the parameters and ``Y_l``:

    * ``mode="pairs"``: for each layer ``l`` with a computed ∇X and each parameter group
      ``p`` upstream of it, ``λ_max(J_{l→p}ᵀJ_{l→p})``. Cost ≈ ``iters`` × 3 backward
      passes over each pair's segment: about ``L/3`` times the cost of ``"layer"``;
    * ``mode="layer"``: one power iteration per layer for ``J_l``, the map to *all*
      upstream parameters at once; ``lam[l][p]`` is then ``λ_max(J_lᵀJ_l)`` for every
      upstream ``p`` — a valid but looser bound per group (``J_pᵀJ_p ≼ J_lᵀJ_l``), and
      ``lam_total[l]`` gives the tighter bound of the total.

    ``config`` as in :func:`lowbit.analysis.gradient_variance`.
    """
    if iters < 1:
        raise ValueError(f"iters must be ≥ 1, got {iters}")
    if mode not in SPECTRUM_MODES:
        raise ValueError(f"mode must be one of {', '.join(SPECTRUM_MODES)}, got {mode!r}")
    batch = saveable(batch)  # inference tensors copied (lowbit.gradmode)
    gen = torch.Generator().manual_seed(torch_seed(seed))
    out = JacobianSpectrum(mode=mode)
    with configured(model, config) as m, frozen_buffers(m), with_config(m, qat_of), \
            _double_differentiable_attention(), gradient_only_double_backward(), \
            capture(m, inputs=True, outputs=True, grads=False) as rec:
        groups = parameter_groups(m)
        params = dict(m.named_parameters())
        layers = gemm_layers(m)
        m.zero_grad(set_to_none=True)
        loss_fn(m, batch)  # forward only: the graph up to every Y_l is kept via rec[l].y
        layers = {n: layer for n, layer in layers.items() if rec[n].calls}
        for name, layer in layers.items():
            stats = weight_gemm_stats(layer, rec[name].x)
            if stats is not None:
                out.col_norms[name], out.gram[name] = stats
        todo = []  # (layer, [(group, param names)])
        for name, layer in layers.items():
            r = rec[name]
            own = owner_of(name, layer)  # Y_l's direct dependence on it is the ∇W path, not ε_l's
            if r.x_needs_grad and r.y is not None and r.y.requires_grad:
                todo.append((name, [(g, ns) for g, ns in groups.items() if g != own]))
        if mode == "pairs":
            todo = [(name, [gp]) for name, gps in todo
                    for gp in _upstream(rec[name].y, gps, params, gen)]
        bar = progress_bar(len(todo), "jacobian spectra", progress)
        for name, gps in todo:
            ps = [params[n] for _, ns in gps for n in ns]
            lam, change, k, used = _power_iteration(rec[name].y, ps, iters, tol, gen)
            i = 0
            for g, ns in gps:
                if any(used[i:i + len(ns)]):
                    out.lam.setdefault(name, {})[g] = lam
                    out.rel_change.setdefault(name, {})[g] = change
                    out.iters.setdefault(name, {})[g] = k
                i += len(ns)
            if mode == "layer":
                out.lam_total[name] = lam
            bar.update(1)
        bar.close()
        for r in rec.values():
            r.y = None
    return out


def _upstream(y: torch.Tensor, gps: list[tuple[str, list[str]]], params: dict[str, torch.Tensor],
              gen: torch.Generator) -> list[tuple[str, list[str]]]:
    """The groups (restricted to their parameters) that ``y`` depends on."""
    names = [n for _, ns in gps for n in ns]
    probe = torch.randn(y.shape, generator=gen).to(y)
    reach = torch.autograd.grad(y, [params[n] for n in names], probe, retain_graph=True,
                                allow_unused=True)
    used = {n for n, g in zip(names, reach) if g is not None}
    return [(g, [n for n in ns if n in used]) for g, ns in gps if any(n in used for n in ns)]


def unmodelled_reach(model: nn.Module, loss_fn: LossFn, batch: object,
                     groups: dict[str, list[str]], blocks: dict[str, nn.Module]) -> dict[str, list[str]]:
    """The groups of ``groups`` each of ``blocks`` (GEMM blocks the bound has no term for:
    quantized attention products) can add gradient noise to, by block name: the groups
    whose parameters its output depends on — its backward's noise flows from its inputs
    upstream, never to the parameters downstream of it. Read from the autograd graph of one
    QAT forward and backward on ``batch`` (noise streams and buffers restored; the blocks'
    ``ran`` flags as any forward leaves them: set where they ran, else as they were): a
    dependence, not its size. The output is taken where the block computes it
    (``attend``, which ``nn.MultiheadAttention`` and Hugging Face's attention call past the
    module's ``__call__``; else the forward); a block that ran with no output seen reaches
    every group, one that did not run none (absent)."""
    params = dict(model.named_parameters())
    names = [n for ns in groups.values() for n in ns]
    outs: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, output: object) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor):
            outs.setdefault(name, []).append(out)

    def attend(name: str, method: Callable) -> Callable:
        def wrapped(*args: object, **kwargs: object) -> object:
            result = method(*args, **kwargs)
            keep(name, result)
            return result
        return wrapped

    was = {n: b.ran for n, b in blocks.items()}
    handles, patched = [], []
    for n, b in blocks.items():
        b.ran = False
        if callable(getattr(b, "attend", None)):
            b.attend = attend(n, b.attend)  # an instance attribute, deleted below
            patched.append(b)
        else:
            handles.append(b.register_forward_hook(lambda mod, args, out, n=n: keep(n, out)))
    reach: dict[str, list[str]] = {}
    try:
        # the backward below runs under the QAT config too: under the model's own, each
        # block between an attention output and the parameters ran a quantized backward,
        # drawing noise and updating range trackers after the streams were restored (a review)
        with frozen_buffers(model), with_config(model, qat_of), torch.enable_grad():
            loss_fn(model, batch)
            ran = {n for n, b in blocks.items() if b.ran}
            for name in ran:
                if name not in outs:  # ran, but its output was not seen: every group (not ruled out)
                    reach[name] = list(groups)
                    continue
                ys = [y for y in outs[name] if y.requires_grad]
                if not ys:
                    reach[name] = []
                    continue
                grads = torch.autograd.grad(ys, [params[n] for n in names], [torch.ones_like(y) for y in ys],
                                            retain_graph=True, allow_unused=True) if names else []
                used = {n for n, g in zip(names, grads) if g is not None}
                reach[name] = [g for g, ns in groups.items() if any(n in used for n in ns)]
    finally:
        for h in handles:
            h.remove()
        for b in patched:
            del b.attend
        for n, b in blocks.items():
            b.ran = b.ran or was[n]
    return {n: reach[n] for n in blocks if n in reach}


# -- quantizer variances on captured operands -----------------------------------------
@dataclass
class LayerNoise:
    """Quantization noise of one layer's two gradient operands (mean over captured draws).

    ``gi_*``: ∇X path, ``E‖ε‖²`` given ``∇Y`` (``expected``) and its analytic bound
    (``bound``); ``gw_expected``/``gw_bound``: the same for ``∇Yᵀ`` on the ∇W path;
    ``gw_exact = E‖η·U‖²`` (what lands in ∇W) and ``gw_propagated = λ_max(UᵀU)·gw_bound``.
    """

    gi_expected: float = 0.0
    gi_bound: float = 0.0
    gw_expected: float = 0.0
    gw_bound: float = 0.0
    gw_exact: float = math.nan
    gw_propagated: float = math.nan
    draws: int = 0

    def add(self, other: LayerNoise) -> None:
        """Running mean over draws."""
        n = self.draws + other.draws
        if self.draws == 0:  # (0 · NaN would poison the mean)
            self.__dict__.update(other.__dict__)
            return
        for f in ("gi_expected", "gi_bound", "gw_expected", "gw_bound", "gw_exact",
                  "gw_propagated"):
            a, b = getattr(self, f), getattr(other, f)
            setattr(self, f, (a * self.draws + b * other.draws) / n if n else 0.0)
        self.draws = n


def layer_noise(layer: FQTLayer, record: LayerRecord,
                wstats: tuple[torch.Tensor, float] | None = None,
                generator: torch.Generator | None = None) -> LayerNoise:
    """:class:`LayerNoise` of ``layer`` from the ``∇Y`` captured in ``record`` under the
    layer's current config (paths whose spec is ``None`` add nothing). ``wstats`` is
    :func:`weight_gemm_stats` of the layer's input (without it the ∇W terms are NaN)."""
    cfg, gy, out = layer.config, record.gy, LayerNoise(draws=1)
    if gy is None:
        return out
    # a round-to-nearest path adds a bias, not the stochastic-rounding variance the
    # bound is about: its terms are not computed (NaN), as the monitor skips it
    if cfg.grad_input is not None and record.x_needs_grad:
        q, fmt = get_quantizer(cfg.grad_input.quantizer), cfg.grad_input.format
        a = grad_input_operand(layer, gy)
        if cfg.grad_input.rounding is Rounding.NEAREST:
            out.gi_expected = out.gi_bound = math.nan
        else:
            out.gi_expected = float(q.expected_variance(a, fmt, generator))
            out.gi_bound = float(q.variance_bound(a, fmt))
    if cfg.grad_weight is not None and layer.weight.requires_grad:  # a frozen weight: no ∇W GEMM
        q, fmt = get_quantizer(cfg.grad_weight.quantizer), cfg.grad_weight.format
        a = grad_weight_operand(layer, gy)
        if cfg.grad_weight.rounding is Rounding.NEAREST:
            out.gw_expected = out.gw_bound = out.gw_exact = out.gw_propagated = math.nan
        else:
            out.gw_expected = float(q.expected_variance(a, fmt, generator))
            out.gw_bound = float(q.variance_bound(a, fmt))
            if wstats is not None:
                out.gw_exact = float(weighted_expected_variance(q, a, fmt, wstats[0], generator))
                out.gw_propagated = wstats[1] * out.gw_bound
    else:
        out.gw_exact = out.gw_propagated = 0.0
    return out


def propagate(spectrum: JacobianSpectrum, noise: dict[str, LayerNoise],
              groups: list[str], weight_groups: dict[str, str] | None = None,
              ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Per (layer, group) predicted contributions of (∗): ``(data, analytic)``, each
    ``pred[l][p] = λ_{l→p}·E‖ε_l‖² + [p = g(l)]·(∇W term)`` with the data-dependent or the
    analytic quantizer variance, ``g(l)`` the group holding layer ``l``'s weight
    (``weight_groups``, :func:`lowbit.analysis._model.weight_groups`: a tied weight's
    first layer; default: the layer's own group); ``pred[l]["total"]`` bounds layer
    ``l``'s contribution to all parameters (the sum over groups, or with
    ``spectrum.lam_total`` where known)."""
    data: dict[str, dict[str, float]] = {}
    analytic: dict[str, dict[str, float]] = {}
    for name, nz in noise.items():
        lam = spectrum.lam.get(name, {})
        home = weight_groups.get(name) if weight_groups is not None else (name if name in groups else None)
        for out, var, w in ((data, nz.gi_expected, nz.gw_exact),
                            (analytic, nz.gi_bound, nz.gw_propagated)):
            row = {p: lam.get(p, 0.0) * var for p in groups}
            if home in row:
                row[home] += w
            if name in spectrum.lam_total:
                row["total"] = spectrum.lam_total[name] * var + (w if home in row else 0.0)
            else:
                row["total"] = sum(row.values())
            out[name] = row
    return data, analytic


def column_sums(pairs: dict[str, dict[str, float]], groups: list[str]) -> dict[str, float]:
    """``Σ_l pairs[l][p]`` per group ``p`` and for ``"total"``."""
    return {p: sum(row.get(p, 0.0) for row in pairs.values()) for p in [*groups, "total"]}


# -- helpers ----------------------------------------------------------------------------
__all__ = [
    "SPECTRUM_MODES",
    "JacobianSpectrum",
    "LayerNoise",
    "column_sums",
    "jacobian_spectrum",
    "layer_noise",
    "propagate",
    "unmodelled_reach",
    "weight_gemm_stats",
    "weighted_expected_variance",
]
