"""Live variance monitor: quantization against minibatch variance, per layer (docs/METHOD.md §9).

FQT trains as well as QAT when the variance its gradient quantizers add is small against
the minibatch (SGD) variance (Theorem 2). :class:`VarianceMonitor` watches that ratio
while a model trains, from module hooks only (nothing in the layers changes, no extra
forward or backward pass, the training trajectory is bitwise the same with or without
it). Every ``every`` steps, for each converted layer, on the step's actual ``∇Y``:

The operands come from :mod:`lowbit.layergrads`, the formulas from :mod:`lowbit.varstats`.

* **∇W path**: ``quant_w = E‖∇W_FQT − ∇W_QAT‖²``, exact over the rounding noise
  (:func:`lowbit.varstats.product_noise`: the quantizer's per-element stochastic-rounding
  variances of ``Q_w(∇Yᵀ)`` pushed through its inverse transform and weighted by the
  squared norms of the rows of ``Q_f(X)``, im2col patches for a Conv2d);
  ``sgd_w``, the minibatch variance of the layer's weight (and bias) gradient;
  ``ratio_w``.
* **∇X path**: ``quant_x = E‖∇X_FQT − ∇X_QAT‖²`` (the same formula with ``Q_f(W)``; for a
  Conv2d each output element's weight counts the kernel taps that land inside the input).
  ∇X is not averaged over samples, so its own "minibatch variance" is not defined; its
  ratio is taken on a probe parameter, a shift ``β`` added to the layer's input
  (``x + β``, per feature; per channel for a Conv2d): ``∇β`` is the column sum of ∇X,
  which is exactly the gradient of a LayerNorm/BatchNorm shift feeding the layer (or of
  the previous layer's bias through linear ops). ``quant_x_shift`` is its quantization
  variance (:func:`lowbit.varstats.column_sum_noise`), ``sgd_x`` its minibatch variance,
  ``ratio_x`` their ratio.

**Minibatch variance**, two estimators (``sgd=``): ``per-sample`` — formula (1) of
:mod:`lowbit.varstats` from per-sample gradient norms (``∇β_n = Σ_{t∈n} ∇X_t`` for the
probe), exact algebra, unbiased when the samples' contributions are independent; and
``paired`` — ``½‖g_k − g_{k−1}‖²`` of the layer's QAT gradients on the monitored step and
the step before it (two independent minibatches; the weights moved by one optimizer step,
whose drift of the mean gradient adds ``½‖Δμ‖²``). BatchNorm in training mode couples the
samples of a batch, and formula (1) then overestimates the between-batch variance — by
up to 17× (median 2.4–7×) on PreAct-ResNet-20 (docs/results.md, "Variance monitor") — so ``auto`` (default)
pairs when the model holds a BatchNorm layer and uses per-sample norms otherwise. Both
are recorded (``sgd_w_samples``/``sgd_x_samples`` always; ``sgd_w``/``sgd_x`` the one used).
Both read the step's actual ``∇Y``, which carries the ∇X-path noise of the layers
downstream: they include that part of the quantization variance (the toolkit's ``sgd``,
measured with QAT gradients, does not).

"Variance" is always the trace of the covariance (summed over the group's entries), as
in :mod:`lowbit.analysis.variance`, whose measured figures the monitor's agree with
(docs/results.md, "Variance monitor"). Samples are the first dimension of a layer's input
(rows for a 2-D input; sequences for ``(B, T, C)``); a layer called more than once in a
step gets the per-sample ``sgd_*`` NaN (per-sample gradients then span calls; a warning
names it once: gradient accumulation is measured with ``sgd="paired"``) — the paired
estimate (BatchNorm models) stays finite, it needs no per-sample split — and its
``quant_*`` are summed. A layer whose ``∇Y`` sums to 0 over the samples (its output is
normalized over the batch) gives the probe no gradient (``‖Σ_n ∇β_n‖² ≤ FLAT_PROBE ·
Σ_n ‖∇β_n‖²``): its ``ratio_x`` is NaN, with a warning, and a policy leaves that path
(but for moving a width outside its ``min_bits..max_bits`` into that range).
Random transforms (``hadamard``) use the very signs the layer drew: the generator is
rebuilt from the layer's noise stream (:mod:`lowbit.noise`) before its backward runs.

Cost: on a monitored step, about one extra GEMM per layer the size of its ∇W GEMM
(``‖∇W_QAT‖²``; bfloat16 when large, where bfloat16 GEMMs are fast:
:func:`lowbit.varstats.bf16_gemms_fast`), elementwise passes over ∇Y per path (and per
candidate width under a policy), per-sample norms; paired: one ∇W-sized GEMM per layer on
the step before. Nothing on other steps but a forward hook that returns at once. The
input ``X`` of each layer is held from its forward to its backward on measured steps
only. Measured in docs/benchmarks.md ("Variance monitor overhead").

Not monitored (listed in :attr:`VarianceMonitor.skipped` with the reason): layers with a
stochastic-rounding forward (the codes the backward used are not observable) or with
predicted gradient ranges (their grid is not the operand's own), fp/QAT layers, and layers
whose gradient quantizer overrides ``quantize`` but inherits ``rounding_variance``
(:func:`lowbit.quantizers.base.variance_formula_gap`: the formula is not what runs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from .adaptive import AdaptivePolicy, Decision
from .config import GradSpec, describe, with_bits
from .conversion import quote_module
from .formats import IntFormat, Rounding, parse_format
from .layergrads import layer_grads, layer_totals
from .nn import FQTConv2d, FQTLinear, call_input, fqt_blocks
from .noise import Path, generator_for
from .ops import engine_needs
from .quantizers import get_quantizer
from .quantizers.base import variance_formula_gap
from .scalars import integer, real
from .varrecord import LayerVariance, StepRecord, ratio
from .varstats import paired_variance, path_noise, sgd_variance

log = logging.getLogger("lowbit.monitor")
PATHS = ("grad_input", "grad_weight")
# ‖Σ_n ∇β_n‖² ≤ FLAT_PROBE·Σ_n ‖∇β_n‖²: the probe's samples sum to 0 up to float rounding
# (≈ 1e-14 relative; independent samples give ≈ 1): a batch-normalized output.
FLAT_PROBE = 1e-8
_NOISE_PATH = {"grad_input": Path.GRAD_INPUT, "grad_weight": Path.GRAD_WEIGHT}


def path_generator(layer: FQTLinear | FQTConv2d, path: str, device: torch.device) -> torch.Generator:
    """The generator ``layer``'s next backward call draws ``path``'s noise from (its
    random transform's signs, for ``hadamard``): valid from the output's gradient hook,
    i.e. before that backward advances the layer's counter (:mod:`lowbit.noise`)."""
    noise = layer.noise
    return generator_for(noise.key(_NOISE_PATH[path], noise.counter), device)


def skip_reason(layer: FQTLinear | FQTConv2d) -> str | None:
    """Why ``layer`` cannot be monitored under its current config, or ``None``."""
    if not isinstance(layer, FQTConv2d) and not hasattr(layer, "linear_weight"):  # FQTLinear, HF FQTConv1D
        return f"{type(layer).__name__}: the monitor knows Linear (Hugging Face Conv1D) and Conv2d GEMMs only"
    cfg = layer.config
    if not cfg.is_fqt:
        return "gradients not quantized (fp or QAT recipe)"
    if any(s is not None and s.rounding is not Rounding.NEAREST for s in (cfg.weight, cfg.activation)):
        return "stochastic-rounding forward: the codes its backward used are not observable"
    if any(s is not None and s.predicted for s in (cfg.grad_input, cfg.grad_weight)):
        return "predicted gradient ranges: the grid is not the operand's own"
    if any(s is not None and s.rounding is not Rounding.STOCHASTIC for s in (cfg.grad_input, cfg.grad_weight)):
        return "round-to-nearest gradients: biased, no rounding variance to compare"
    if any(s is not None and parse_format(s.format).clips for s in (cfg.grad_input, cfg.grad_weight)):
        return "a *_spec gradient format: its scale rule clips (biased), no rounding variance to compare"
    if isinstance(layer, FQTConv2d) and layer.padding_mode != "zeros":
        return f"padding_mode={layer.padding_mode!r}: ∇X of the padded input is folded back"
    for s in (cfg.grad_input, cfg.grad_weight):
        gap = None if s is None else variance_formula_gap(get_quantizer(s.quantizer))
        if gap is not None:
            return f"{gap}: no rounding variance to compare"
    return None


class _Acc:
    """One layer's sums over the calls of the current monitored step."""

    def __init__(self) -> None:
        self.v = LayerVariance()
        self.quant: dict[str, dict[tuple[str, int], float]] = {"grad_input": {}, "grad_weight": {}}
        self.shift: dict[tuple[str, int], float] = {}
        self.flat_probe = False  # ∇β summed to 0 over the samples (a batch-normalized output)
        self.nonfinite = False  # a non-finite ∇Y or per-sample norm: no ratio is a measurement
        self.pair_nonfinite = False  # the paired step before overflowed: no ratio either
        self.unpaired = False  # paired, and the step before was not recorded (a forced step)
        self.unrecorded = False  # paired, and the step before not recorded (it raised; a state without it)


class _InertHook:
    """What a monitor's hook becomes in a copy of the model: nothing."""

    def __call__(self, *_: Any) -> None:
        return None


class _LayerHook:
    """A :class:`VarianceMonitor`'s forward hook on one layer. A copy of the model
    (``pickle``, ``copy.deepcopy``) gets an inert hook: a copy is driven by no monitor
    (as its layers' :class:`~lowbit.ops.BlockState` says), and a local function made
    pickling a monitored model fail while a deepcopy's hooks fed the original monitor."""

    def __init__(self, monitor: VarianceMonitor, name: str) -> None:
        self.monitor, self.name = monitor, name

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        self.monitor._on_forward(self.name, module, call_input(args, kwargs), output)

    def __reduce__(self) -> tuple:
        return (_InertHook, ())


def _block_node(output: torch.Tensor) -> Any:
    """The backward node of the block that made ``output`` (a converted layer's eager
    autograd Function: it carries ``grad_slots``), through at most a few single-input
    nodes (a reshape back to the caller's shape), or ``None`` (the custom op, a traced
    graph: the paths are then those that require a gradient)."""
    node = output.grad_fn
    for _ in range(4):
        if node is None or hasattr(node, "grad_slots"):
            return node
        nxt = [n for n, _ in node.next_functions if n is not None]
        node = nxt[0] if len(nxt) == 1 else None
    return None


def _unwrapped(name: str) -> str:
    """A layer's name without the leading ``_orig_mod.`` / ``module.`` prefixes that
    ``torch.compile`` and DDP wrappers add, however stacked."""
    while name.startswith(("_orig_mod.", "module.")):
        name = name.split(".", 1)[1]
    return name


def _layers_differ(saved: list[str], layers: dict[str, nn.Module]) -> str:
    """Why a monitor state's layer names are not this monitor's: a ``torch.compile`` or DDP
    wrapper's prefix on one side, the Hugging Face ``Conv1D`` layers an older lowbit did not
    monitor, or another model (a review: every mismatch was blamed on ``Conv1D``)."""
    mine = sorted(layers)
    text = f"monitor state is for layers {saved[:5]}{'…' if len(saved) > 5 else ''}, this monitor has " \
           f"{mine[:5]}{'…' if len(mine) > 5 else ''}"
    if sorted(map(_unwrapped, saved)) == sorted(map(_unwrapped, mine)):  # the same layers, other wrappers
        return text + (": the same layers under other wrappers (torch.compile's '_orig_mod.', DDP's 'module.' "
                       "prefixes): build the monitor on the model wrapped as it was when the state was saved")
    extra = sorted(set(mine) - set(saved))
    if extra and set(saved) <= set(mine) and all(type(layers[n]).__name__ == "FQTConv1D" for n in extra):
        return text + (f" (it monitors {extra[:3]}{'…' if len(extra) > 3 else ''} too: Hugging Face Conv1D "
                       "layers, which the lowbit that saved the state (before 2026-12-02) did not monitor; "
                       "resume with that lowbit or start afresh)")
    return text + ": another model's state"


def _one_rank(policy: AdaptivePolicy) -> None:
    """``ValueError`` where a policy would run on several ranks of a process group: each
    rank's policy decides from its own minibatch, so the ranks would quantize one layer at
    different widths and a checkpoint would hold one rank's decisions (a review; ``lowbit
    train`` refuses ``fqt-auto*`` with ``--nproc`` for that reason)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError(f"VarianceMonitor(policy=...) on {torch.distributed.get_world_size()} ranks: each rank's "
                         "policy would choose its own widths from its own minibatch; adaptive precision "
                         "runs in one process (an observe-only monitor, policy=None, runs on every rank)")


class VarianceMonitor:
    """Per-layer quantization and minibatch variance every ``every`` steps (module doc).

    ``model``: holds converted layers (``lowbit.convert`` first); hooks are added to the
    blocks :func:`lowbit.fqt_blocks` lists now (the converted layers and attention's GEMM
    blocks, in-projection alternatives included; monitorable ones, others in
    :attr:`skipped`). ``every``: a positive int, the monitored steps are those whose
    index (count of :meth:`step` blocks so far, from 0) is a multiple of it. ``policy``:
    an :class:`~lowbit.adaptive.AdaptivePolicy` that revises each layer's gradient bit
    widths from each monitored step's measurements (``None``: observe only).
    Raises ``TypeError``/``ValueError`` for a bad argument or a model without
    monitorable layers, and ``ValueError`` for a policy in a process group of several ranks
    (each rank's would choose its own widths). A monitored step that measures nothing (its
    backward outside the ``step()`` block, outputs that need no gradient, or no monitored
    layer run) is logged once per cause (logger ``lowbit.monitor``, WARNING).

    Use::

        mon = VarianceMonitor(model, every=50)
        for batch in data:
            with mon.step():
                loss_fn(model, batch).backward()
            opt.step()
        mon.history  # StepRecord per monitored step; mon.decisions under a policy
    """

    def __init__(self, model: nn.Module, every: int, *, policy: AdaptivePolicy | None = None,
                 sgd: str = "auto") -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if integer(every) is None or integer(every) < 1:  # type: ignore[operator]
            raise ValueError(f"every must be a positive int, got {every!r}")
        every = integer(every)  # a NumPy integer or a one-element tensor too (lowbit.scalars)
        if policy is not None and not isinstance(policy, AdaptivePolicy):
            raise TypeError(f"policy must be an AdaptivePolicy or None, got {type(policy).__name__}")
        if policy is not None:
            _one_rank(policy)
        if sgd not in ("auto", "per-sample", "paired"):
            raise ValueError(f"sgd must be 'auto', 'per-sample' or 'paired', got {sgd!r}")
        if sgd == "auto":  # BatchNorm couples the samples of a batch: formula (1) fails
            coupled = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
            sgd = "paired" if coupled else "per-sample"
        self.sgd = sgd
        self.every, self.policy = every, policy
        self.skipped: dict[str, str] = {}
        self.layers: dict[str, FQTLinear | FQTConv2d] = {}
        for name, layer in fqt_blocks(model).items():
            reason = skip_reason(layer)
            if reason is None:
                self.layers[name] = layer
            else:
                self.skipped[name] = reason
        if not self.layers:
            raise ValueError("no monitorable converted layer: "
                             + ("; ".join(f"{quote_module(n)}: {r}" for n, r in self.skipped.items())
                                or "convert the model with an fqt-* recipe first"))
        if policy is not None:
            _check_policy_fits(policy, self.layers)
        self._configs = {n: lay.config for n, lay in self.layers.items()}  # as checked
        self.steps = 0
        self._counted_steps = 0  # steps summed into _bit_sums (steps may be set: a resume)
        self.history: list[StepRecord] = []
        self.decisions: list[Decision] = []
        self._bit_sums = {n: {p: 0 for p in PATHS} for n in self.layers}
        self._grad_numel = {n: {p: 0 for p in PATHS} for n in self.layers}  # ∇Y size, paths that ran
        self._mode: str | None = None  # this step: "full", "totals" (paired: the step before) or None
        self._acc: dict[str, _Acc] = {}
        self._forwards = self._hooked = 0  # monitored layers' forwards this step; those needing a gradient
        self._totals: dict[str, list[torch.Tensor | None]] = {}
        self._warned: set[tuple[str, str]] = set()  # (layer, cause) already warned about
        self._pair: tuple[int, dict[str, list[torch.Tensor | None]], float] | None = None  # last step's totals, loss scale
        self._scale = 1.0  # the loss scale of the step being recorded
        self._handles = [lay.register_forward_hook(_LayerHook(self, n), with_kwargs=True)
                         for n, lay in self.layers.items()]
        self._closed = False  # close() removed the hooks: step() refuses
        for layer in self.layers.values() if policy is not None else ():
            layer._block.policy_driven = True  # no AdaptiveRecipeWarning from these (lowbit.ops)
        blocks = fqt_blocks(model) if policy is not None else {}
        self._undriven = []
        for n, why in self.skipped.items():  # their AdaptiveRecipeWarning says why
            if n in blocks:
                blocks[n]._block.undriven = why
                self._undriven.append(blocks[n])

    # -- the training loop's side -------------------------------------------------------
    def due(self) -> bool:
        """Whether the next :meth:`step` is a monitored one."""
        return self.steps % self.every == 0

    @contextlib.contextmanager
    def step(self, force: bool = False, loss_scale: float | torch.Tensor = 1.0) -> Iterator[None]:
        """Wrap one training step's forward and backward (not the optimizer step). On a
        monitored step (:meth:`due`, or ``force``) the layers are measured, a
        :class:`StepRecord` is appended to :attr:`history` and the policy decides.
        ``loss_scale``: the factor the loss was multiplied by before this backward (a
        ``GradScaler``'s ``get_scale()``): the figures are in the scaled gradient's units
        (their ratios are not), and the paired estimate brings the step before to this
        step's scale (a scale that grew or backed off between them mixed units: a review).
        Raises ``ValueError`` where a layer's config was changed since it was checked (a
        second ``convert``, ``layer.config = …``) to one the monitor cannot measure or the
        policy may not drive, or for a ``loss_scale`` that is not a finite number > 0;
        ``RuntimeError`` once the monitor is closed (:meth:`close`)."""
        if getattr(self, "_closed", False):  # (a monitor unpickled from before the flag: open)
            raise RuntimeError("lowbit: this VarianceMonitor is closed (close() removed its hooks), so it "
                               "measures nothing and records nothing; make a new VarianceMonitor to monitor "
                               "again (its state_dict() carries the history and policy over)")
        scale = math.nan if real(loss_scale) is None else real(loss_scale)
        if not 0 < scale < math.inf:
            raise ValueError(f"VarianceMonitor.step: loss_scale must be a finite number > 0 (the "
                             f"GradScaler's get_scale()), got {loss_scale!r}")
        self._recheck()
        self._counted_steps += 1
        for n, layer in self.layers.items():
            for p in PATHS:
                spec = getattr(layer.config, p)
                self._bit_sums[n][p] += 0 if spec is None else spec.bits
        before = self.sgd == "paired" and (self.steps + 1) % self.every == 0
        self._forced = bool(force) and not self.due()  # monitored off the schedule
        self._mode = "full" if force or self.due() else ("totals" if before else None)
        self._acc, self._totals, self._scale, self._forwards, self._hooked = {}, {}, scale, 0, 0
        try:
            yield
            if self._mode == "full":
                self._finish()
            if self._mode is not None and self.sgd == "paired":
                self._pair = (self.steps, self._totals, scale)
        finally:
            self._mode = None
            self._acc, self._totals = {}, {}
            self.steps += 1

    def _recheck(self) -> None:
        """The constructor's checks again for each layer whose config is no longer the one
        checked (a review: after ``convert`` to ``fp8-tensorwise`` the monitor reported a
        rounding variance for round-to-nearest gradients, and a policy rewrote a fixed
        recipe's widths)."""
        for name, layer in self.layers.items():
            if layer.config is self._configs[name]:
                continue
            reason = skip_reason(layer)
            if reason is not None:
                raise ValueError(f"VarianceMonitor: layer {quote_module(name)} was given a new config since the "
                                 f"monitor was built ({describe(layer.config)}), which it cannot "
                                 f"measure: {reason}; build a new VarianceMonitor (or close this one)")
            if self.policy is not None:
                _check_policy_fits(self.policy, {name: layer})
            self._configs[name] = layer.config

    def close(self) -> None:
        """Remove the hooks (the monitor then measures nothing, and its policy drives no
        layer any more); :meth:`step` raises from then on."""
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer in self.layers.values():
            layer._block.policy_driven = False
        for layer in self._undriven:
            layer._block.undriven = None

    # -- hooks ----------------------------------------------------------------------------
    def _on_forward(self, name: str, module: nn.Module, inp: Any, output: Any) -> None:
        if self._mode is None:
            return
        self._forwards += 1
        if not isinstance(output, torch.Tensor) or not output.requires_grad or not isinstance(inp, torch.Tensor):
            return
        self._hooked += 1  # a forward whose output's gradient will be measured
        x = inp.detach()
        x_grad = bool(inp.requires_grad)
        block = _block_node(output)

        def on_grad(gy: torch.Tensor) -> None:
            if x.numel() == 0 or gy.numel() == 0:  # nothing quantized (an expert given no
                return  # tokens, an empty batch): no variance, and nothing to reshape by rows
            # the paths this backward runs, as the block's own backward decides them (a trial:
            # torch.autograd.grad(loss, x) inside a monitored step counted a ∇W never computed)
            x_now, w_now = x_grad, None
            if block is not None:
                x_now, w_now = engine_needs(block, [bool(n) for n in block.needs_input_grad[1:4]])[:2]
                x_now = x_now and x_grad
            # no autocast: a backward run inside the user's autocast block computed the
            # figures' float32 products in bfloat16 (variances 3× off, even negative: a review)
            with torch.no_grad(), torch.autocast(gy.device.type, enabled=False):
                if self.sgd == "paired":  # this call's QAT gradients, for the pair
                    tot = self._totals.setdefault(name, [None, None])
                    for i, t in enumerate(layer_totals(module, x, gy.detach(), x_now, w_now)):
                        if t is not None:
                            tot[i] = t if tot[i] is None else tot[i] + t
                if self._mode == "full":
                    self._measure(name, module, x, x_now, gy.detach(), w_now)

        output.register_hook(on_grad)

    def _measure(self, name: str, layer: nn.Module, x: torch.Tensor, x_grad: bool,
                 gy: torch.Tensor, w_grad: bool | None = None) -> None:
        """One call's figures at the current spec and every candidate, added to the step."""
        acc = self._acc.setdefault(name, _Acc())
        v = acc.v
        v.calls += 1
        g = layer_grads(layer, x, gy, x_grad, w_grad)  # type: ignore[arg-type]
        v.samples, v.grad_rows = g.samples, gy.numel()
        for path in PATHS:
            op = getattr(g, path)
            if op is None:
                continue
            spec: GradSpec = getattr(layer.config, path)
            cands = [(spec.quantizer, spec.bits)]
            if self.policy is not None:
                cands = list(dict.fromkeys([*cands, *self.policy.candidates(path)]))
            for q, b in cands:
                gen = path_generator(layer, path, op.a.device)  # type: ignore[arg-type]
                fmt = spec.format if (q, b) == (spec.quantizer, spec.bits) else \
                    with_bits(spec, b).format  # the grid a decision would apply (asymmetric kept)
                quant, shift = path_noise(get_quantizer(q), op.a, fmt, gen, op.col_weight,
                                          op.row_groups, op.shift_weight)
                acc.quant[path][(q, b)] = acc.quant[path].get((q, b), 0.0) + quant
                if op.shift_weight is not None:
                    acc.shift[(q, b)] = acc.shift.get((q, b), 0.0) + shift
        one = v.calls == 1  # per-sample gradients of several calls would span calls
        if g.grad_weight is not None:
            v.sgd_w_samples = sgd_variance(g.w_sq, g.w_total) if one else math.nan
            if not (math.isfinite(g.w_total) and (g.w_sq is None or bool(g.w_sq.isfinite().all()))):
                acc.nonfinite = True
        if g.grad_input is not None:
            v.sgd_x_samples = sgd_variance(g.x_sq, g.x_total) if one else math.nan
            spread = float(g.x_sq.sum()) if g.x_sq is not None else 0.0
            if not (math.isfinite(spread) and math.isfinite(g.x_total)):
                acc.nonfinite = True  # not a flat probe: an overflowing or non-finite ∇Y
            elif spread > 0 and g.x_total <= FLAT_PROBE * spread:
                acc.flat_probe = True

    # -- end of a monitored step ----------------------------------------------------------
    def _finish(self) -> None:
        if self.layers and not self._acc:
            self._say_empty()
        rec = StepRecord(self.steps, {})
        ratios: dict[str, dict[str, dict[tuple[str, int], float]]] = {}
        prev = self._pair[1] if self._pair is not None and self._pair[0] == self.steps - 1 else None
        rescale = self._scale / self._pair[2] if prev is not None else 1.0  # to this step's loss scale
        for name, acc in self._acc.items():
            layer, v = self.layers[name], acc.v
            v.sgd_w, v.sgd_x = v.sgd_w_samples, v.sgd_x_samples
            if self.sgd == "paired":  # ½‖g_k − g_{k−1}‖²: two minibatches, nearly equal weights
                cur, old = self._totals.get(name, [None, None]), (prev or {}).get(name, [None, None])
                old = [o if o is None or rescale == 1.0 else o * rescale for o in old]
                # (the first step: none to pair, as documented)
                acc.unpaired = prev is None and self.steps > 0 and getattr(self, "_forced", False)
                acc.unrecorded = prev is None and self.steps > 0 and not acc.unpaired
                if any(t is not None and not bool(t.isfinite().all()) for t in cur):
                    acc.nonfinite = True
                elif any(t is not None and not bool(t.isfinite().all()) for t in old):
                    acc.pair_nonfinite = True  # the step before overflowed: no ratio, and said so
                v.sgd_w, v.sgd_x = (paired_variance(c, o) for c, o in zip(cur, old))
            for path, tag in (("grad_weight", "w"), ("grad_input", "x")):
                spec = getattr(layer.config, path)
                if spec is None or not acc.quant[path]:
                    continue
                cur = (spec.quantizer, spec.bits)
                setattr(v, f"bits_{tag}", spec.bits)
                setattr(v, f"quantizer_{tag}", spec.quantizer)
                if tag == "w":
                    v.quant_w = acc.quant[path][cur]
                    r = {k: math.nan if acc.nonfinite or acc.pair_nonfinite else ratio(q, v.sgd_w)
                         for k, q in acc.quant[path].items()}
                else:
                    v.quant_x, v.quant_x_shift = acc.quant[path][cur], acc.shift[cur]
                    r = {k: math.nan if acc.flat_probe or acc.nonfinite or acc.pair_nonfinite
                         else ratio(q, v.sgd_x)
                         for k, q in acc.shift.items()}
                setattr(v, f"ratio_{tag}", r[cur])
                if self.policy is not None:
                    setattr(v, f"candidates_{tag}", {f"{q}{b}": x for (q, b), x in r.items()})
                ratios.setdefault(name, {})[path] = r
                self._grad_numel[name][path] = v.grad_rows
            rec.layers[name] = v
            self._say_once(name, acc, v)
        self.history.append(rec)
        if self.policy is not None:
            self._decide(rec.step, ratios)

    def _say_once(self, name: str, acc: _Acc, v: LayerVariance) -> None:
        """A warning, once per layer and cause, where a ratio is NaN for a reason the user
        can act on (it was silent: ``fqt-auto`` then ran at fixed widths)."""
        causes = []
        layer = quote_module(name)
        if acc.flat_probe:
            causes.append(("flat", f"{layer}: ratio_x not measured: the layer's ∇Y sums to 0 over the "
                           "samples (its output is normalized over the batch, e.g. by BatchNorm), so "
                           "the input-shift probe has no gradient to compare with; a policy leaves "
                           "this ∇X path's width as it is"))
        if acc.nonfinite:
            causes.append(("nonfinite", f"{layer}: its ∇Y or the per-sample gradient norms are not "
                           "finite (an overflow or NaN upstream): this step's ratios are not "
                           "measurements; a policy leaves the layer as it is"))
        if acc.pair_nonfinite and not acc.nonfinite:
            causes.append(("pair-nonfinite", f"{layer}: the step before this one, the paired estimate's "
                           "other half, had a non-finite gradient (an overflow: a loss scaler's skipped "
                           "step): this step's ratios are not measurements; a policy leaves the layer as "
                           "it is (said once per layer)"))
        if acc.unpaired:  # (a trial: a forced step's ratios came out NaN without a word)
            causes.append(("unpaired", f"{layer}: the paired minibatch-variance estimate compares a "
                           "monitored step with the step before it, which the monitor records only "
                           f"before its due steps (every {self.every}); this step (step(force=True) off "
                           "that schedule) has none, so its ratios are NaN and a policy leaves the layer "
                           "as it is; force the step after a due one, or monitor every step"))
        if acc.unrecorded:  # the step before raised inside its step(), or a state lacked it (a review)
            causes.append(("unrecorded", f"{layer}: the paired minibatch-variance estimate compares a "
                           "monitored step with the step before it, which was not recorded (it raised "
                           "inside its step(), or the monitor's state was loaded without it), so this "
                           "step's ratios are NaN and a policy leaves the layer as it is"))
        if v.samples < 2 and v.calls == 1 and self.sgd == "per-sample":
            causes.append(("samples", f"{layer}: one sample in the minibatch: the per-sample "
                           "minibatch variance needs at least 2, so its ratios are NaN and a policy "
                           "leaves it as it is; VarianceMonitor(sgd='paired') compares two steps"))
        # the ratios the calls leave NaN (a new user's trial: "its ratios are NaN" was said of
        # a shared layer whose ∇X only one call needed, and whose ratio_x a policy acted on)
        spanned = [r for r in ("ratio_w", "ratio_x") if math.isnan(getattr(v, r))
                   and getattr(v, f"quantizer_{r[-1]}")]
        if v.calls > 1 and self.sgd == "per-sample" and spanned:
            one = len(spanned) == 1
            causes.append(("calls", f"{layer}: ran {v.calls} times in one monitored step (gradient "
                           "accumulation or a shared layer): per-sample minibatch variance cannot "
                           f"span calls, so its {' and '.join(spanned)} {'is' if one else 'are'} NaN and a "
                           f"policy leaves {'that path' if one else 'the layer'} as it is; "
                           "VarianceMonitor(sgd='paired') sums the calls' gradients"))
        for cause, text in causes:
            if (name, cause) not in self._warned:
                self._warned.add((name, cause))
                # logged (logger lowbit.monitor, level WARNING), its origin in the text: Python's
                # last-resort handler prints the message alone (a new user's walkthrough)
                # (a width outside the policy's range moves into it even then: a review)
                log.warning("lowbit.monitor: layer %s%s", text, "" if self.policy is None else
                            f" (but for a width outside min_bits..max_bits = {self.policy.min_bits}.."
                            f"{self.policy.max_bits}, which moves into that range)")

    def _say_empty(self) -> None:
        """A warning, once per cause, where a monitored step measured nothing: its record is
        empty and a policy decides nothing (a review: with the backward outside the block —
        the shape of an AMP loop — ``fqt-auto`` stayed at 8 bits without a word)."""
        cause = "backward" if self._hooked else "no-grad" if self._forwards else "forward"
        if ("", cause) in self._warned:
            return
        self._warned.add(("", cause))
        text = {"backward": "the monitored layers ran their forward inside `with monitor.step():` but no backward "
                            "reached them there: the figures are taken in the backward, so call loss.backward() "
                            "(or scaler.scale(loss).backward()) inside the block",
                "no-grad": "the monitored layers ran, but their outputs needed no gradient (frozen layers with an "
                           "input that needs none, or a forward under torch.no_grad()): no gradient GEMM to measure",
                "forward": "no monitored layer ran inside `with monitor.step():` (the forward and the backward "
                           "both belong inside the block)"}[cause]
        policy = "; the policy decides nothing and every width stays as it is" if self.policy is not None else ""
        log.warning("lowbit.monitor: step %d measured nothing: %s%s (said once)", self.steps, text, policy)

    def _current(self, name: str) -> tuple[str, int]:
        """``(quantizer, bits)`` of layer ``name``'s ∇X path now."""
        spec = self.layers[name].config.grad_input
        return spec.quantizer, spec.bits

    def _decide(self, step: int, ratios: dict[str, dict[str, dict[tuple[str, int], float]]]) -> None:
        """Apply the policy to every measured path; log and record each change."""
        assert self.policy is not None
        _one_rank(self.policy)  # a process group made after the monitor
        n_input = sum(math.isfinite(paths["grad_input"].get(self._current(name), math.nan))
                      for name, paths in ratios.items() if "grad_input" in paths)  # ∇X paths measured
        for name, paths in ratios.items():
            layer = self.layers[name]
            cfg = layer.config
            for path, r in paths.items():
                spec = getattr(cfg, path)
                cur = (spec.quantizer, spec.bits)
                new = self.policy.choose(path, cur, r, self.policy.path_target(path, n_input))
                if new == cur:
                    continue
                cfg = dataclasses.replace(cfg, **{path: with_bits(dataclasses.replace(spec, quantizer=new[0]), new[1])})
                d = Decision(step, name, path, cur[0], cur[1], new[0], new[1], r[cur], r[new])
                self.decisions.append(d)
                log.info("step %d: layer %s %s: %s%d -> %s%d (ratio %.3g -> %.3g)", step, quote_module(name), path,
                         cur[0], cur[1], new[0], new[1], r[cur], r[new])
            layer.config = self._configs[name] = cfg

    # -- summaries and checkpoints --------------------------------------------------------
    def mean_bits(self) -> dict[str, dict[str, float]]:
        """Mean configured bit width of each layer's paths over the steps so far (0 for a
        path in float; a path that never runs — a first layer's ∇X — still shows its
        configured width here), plus ``"all"``: per path and ``"both"``, the mean over
        the layers' paths that ran at a monitored step, weighted by their ``∇Y`` size
        (each path quantizes ∇Y once), so a path that never ran does not count there.
        The steps are those this monitor saw (restored with its state): a resumed run whose
        monitor started at a later step (``--monitor-every`` 0 → K) divided the widths
        summed since then by every step (a review: 1.33 bits for a 4-bit run)."""
        n = max(self._counted_steps, 1)
        out = {name: {p: s / n for p, s in paths.items()} for name, paths in self._bit_sums.items()}
        pairs = [(k, p, w) for k, d in self._grad_numel.items() for p, w in d.items() if w]
        if pairs:
            def mean(sel: list[tuple[str, str, int]]) -> float:
                tot = sum(w for _, _, w in sel)
                return sum(out[k][p] * w for k, p, w in sel) / tot if tot else math.nan
            out["all"] = {p: mean([x for x in pairs if x[1] == p]) for p in PATHS}
            out["all"]["both"] = mean(pairs)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bitwise (plain Python values, and the
        paired estimator's saved gradients as tensors under ``"pair"``): the
        step count, each layer's current gradient specs (the policy changes them), the
        decision log, the history and the bit sums."""
        specs = {n: {p: None if getattr(lay.config, p) is None else
                     [getattr(lay.config, p).quantizer, getattr(lay.config, p).bits] for p in PATHS}
                 for n, lay in self.layers.items()}
        return {"every": self.every, "steps": self.steps, "specs": specs,
                "policy": _policy_state(self.policy),
                "decisions": [asdict(d) for d in self.decisions],
                "history": [r.to_dict() for r in self.history],
                "bit_sums": {n: dict(p) for n, p in self._bit_sums.items()},
                "pair": None if self._pair is None else
                {"step": self._pair[0], "totals": {n: list(t) for n, t in self._pair[1].items()},
                 "loss_scale": self._pair[2]},
                "grad_numel": {n: dict(d) for n, d in self._grad_numel.items()},
                "counted_steps": self._counted_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (all but ``every``, which stays this
        monitor's); under a policy the layers take the saved gradient specs.
        Raises ``ValueError`` if the layers or the policy differ from this monitor's, or,
        without a policy, a layer's saved spec differs from its own (another recipe's state)."""
        if sorted(state["specs"]) != sorted(self.layers):
            raise ValueError(_layers_differ(sorted(state["specs"]), self.layers))
        mine = _policy_state(self.policy)
        if state["policy"] != mine:
            raise ValueError(f"monitor state has policy {state['policy']}, this monitor {mine}")
        for n, paths in state["specs"].items():
            layer, cfg = self.layers[n], self.layers[n].config
            for p, qb in paths.items():
                spec = getattr(cfg, p)
                if (qb is None) != (spec is None):
                    raise ValueError(f"monitor state: layer {quote_module(n)} path {p} is "
                                     f"{'float' if qb is None else 'quantized'} in the state")
                if qb is not None and self.policy is None and (spec.quantizer, spec.bits) != (qb[0], int(qb[1])):
                    # only a policy changes a layer's gradient spec; an observe-only monitor's
                    # state of another recipe rewrote a fixed one (a review)
                    raise ValueError(f"monitor state: layer {quote_module(n)} path {p} ran {qb[0]}{qb[1]} in the state, "
                                     f"{spec.quantizer}{spec.bits} here, and this monitor has no policy to "
                                     "change it: the state is another recipe's")
                if qb is not None:
                    cfg = dataclasses.replace(cfg, **{p: with_bits(dataclasses.replace(spec, quantizer=qb[0]), int(qb[1]))})
            layer.config = self._configs[n] = cfg
        self.steps = int(state["steps"])  # the interval stays the constructor's
        # states saved before the count was kept: every step was counted
        self._counted_steps = int(state.get("counted_steps", self.steps))
        pair = state.get("pair")
        self._pair = None if pair is None else (int(pair["step"]), {n: list(t) for n, t in pair["totals"].items()},
                                                float(pair.get("loss_scale", 1.0)))  # saved before: unscaled
        self.decisions = [Decision(**d) for d in state["decisions"]]
        self.history = [StepRecord.from_dict(r) for r in state["history"]]
        self._bit_sums = {n: {p: int(s) for p, s in d.items()} for n, d in state["bit_sums"].items()}
        self._grad_numel = {n: {p: int(w) for p, w in d.items()} for n, d in state["grad_numel"].items()}


def _check_policy_fits(policy: AdaptivePolicy, layers: dict[str, Any]) -> None:
    """``ValueError`` where ``policy`` would silently rewrite a layer it was not meant
    for: one converted with a fixed recipe (``config.adaptive`` unset: its bit widths
    were chosen, not left to a policy), or whose gradient quantizer is not among the
    policy's candidates for that path (the path would keep it while the policy's
    quantizers are meant)."""
    for name, layer in layers.items():
        cfg = layer.config
        if cfg.adaptive is None:
            raise ValueError(
                f"VarianceMonitor: policy given, but layer {quote_module(name)} was converted with a fixed recipe "
                f"({describe(cfg)}): the policy would rewrite its gradient bit widths. Convert with an "
                "adaptive recipe (FQTConfig.from_recipe('fqt-auto'|'fqt-auto-psq'|'fqt-auto-bhq')) "
                "and AdaptivePolicy.from_recipe of the same name, or monitor without a policy")
        for path, cands in (("grad_input", policy.grad_input), ("grad_weight", policy.grad_weight)):
            spec = getattr(cfg, path)
            if spec is not None and not isinstance(spec.format, IntFormat):
                raise ValueError(
                    f"VarianceMonitor: layer {quote_module(name)} quantizes {path} on {spec.format.name}, which "
                    "has no other bit width: a policy chooses integer widths (intB, intBa)")
            if spec is not None and spec.quantizer not in cands:
                raise ValueError(
                    f"VarianceMonitor: layer {quote_module(name)} quantizes {path} with {spec.quantizer!r}, not "
                    f"among the policy's candidates {list(cands)}: use AdaptivePolicy.from_recipe("
                    f"{cfg.adaptive!r}) for a model converted with {cfg.adaptive!r}")


def _policy_state(policy: AdaptivePolicy | None) -> dict[str, Any] | None:
    """The policy's fields as JSON values (tuples as lists), or None."""
    if policy is None:
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(policy).items()}


__all__ = ["LayerVariance", "StepRecord", "VarianceMonitor", "path_generator", "skip_reason"]
