"""Fully quantized modules and the one-call model conversion.

``FQTLinear``, ``FQTConv2d`` and ``FQTConv1d`` subclass ``nn.Linear`` / ``nn.Conv2d`` /
``nn.Conv1d`` and keep their
parameters (same objects, same names), so a converted model loads the unconverted
model's ``state_dict`` and vice versa, and an optimizer built before conversion keeps
working. Each converted layer owns its stochastic-rounding noise stream
(:class:`lowbit.noise.NoiseStream`: base seed, fully qualified name, rank, a counter of
backward calls — the rule is in :mod:`lowbit.noise`): a seeded run is bitwise reproducible
on the CPU, and recomputation (activation checkpointing) sees the same noise.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import sys
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .config import Backend, FQTConfig, describe, not_a_config
from .conversion import (MHA_REASON, ConversionReport, ConversionWarning, SwapRule, disable_fused_fastpath,
                         quote_module, reads_out_proj, rebuild, skip_reason)
from .conv import fqt_conv1d
from .formats import check_dense
from .functional import Trackers, fqt_conv2d, fqt_linear, same_padding
from .noise import NoiseStream, current_rank, draw_base_seed
from .ops import GRAD_PATHS, BlockState
from .quantizers import Granularity
from . import ranges as ranges_module
from .ranges import RangeStats, RangeTracker

ModuleFilter = Callable[[nn.Module, str], bool]


def decline_fused_paths(module: nn.Module, args: tuple) -> None:
    """The forward pre-hook every converted layer carries; it does nothing. PyTorch's fused
    transformer inference path (``nn.TransformerEncoderLayer`` in ``eval()`` under
    ``no_grad``) reads ``linear1``/``linear2``'s and the attention's weights without
    calling those modules, and declines where any of its submodules has a forward hook
    ("forward pre-/hooks are attached to the module"): so a converted layer runs there
    even where ``convert`` never saw the encoder layer (a layer converted on its own and
    assigned into it; a review found it silently float). :func:`convert` also turns that
    path off on the encoder layers it converts (:func:`lowbit.conversion.disable_fused_fastpath`)."""
    return None


class _StochasticLayer:
    """A layer's :class:`~lowbit.ops.BlockState`: its config (reassignable), its noise
    stream, and the predicted-range trackers of its gradient paths (created when a spec
    asks for them). The layer's custom ops read it when they run."""

    _block: BlockState
    ran: bool = False  # set by every forward; see fqt_layers(model, ran=...)

    def _init_quant(self, config: FQTConfig, seed: int | None, name: str) -> None:
        """Base seed: ``seed`` if given, else ``config.seed``, else one draw from torch's
        global RNG (:mod:`lowbit.noise`); ``name``: the layer's fully qualified name."""
        if not isinstance(config, FQTConfig):
            raise not_a_config(config)
        if seed is None:
            seed = draw_base_seed() if config.seed is None else config.seed
        self._block = BlockState(config, NoiseStream(seed, name))
        self.register_forward_pre_hook(decline_fused_paths)  # type: ignore[attr-defined]

    @property
    def config(self) -> FQTConfig:
        return self._block.config

    @config.setter
    def config(self, value: FQTConfig) -> None:
        self._block.config = value  # checked there (TypeError), reseeded on a new seed

    @property
    def noise(self) -> NoiseStream:
        """This layer's noise stream (seed, name, counter)."""
        return self._block.noise

    @property
    def seed(self) -> int:
        """The base seed of this layer's noise stream."""
        return self._block.noise.seed

    @property
    def range_trackers(self) -> dict[str, RangeTracker]:
        return self._block.range_trackers

    @property
    def loss_scale(self) -> float:
        """The loss scale of the gradients this layer sees now (:class:`lowbit.amp.GradScaler`
        sets it): the range trackers it creates start in it."""
        return self._block.loss_scale

    @loss_scale.setter
    def loss_scale(self, value: float) -> None:
        self._block.loss_scale = float(value)

    def trackers(self) -> Trackers:
        """(grad_input, grad_weight) trackers for the current config (``None``: dynamic)."""
        return self._block.trackers()

    def tracker_key(self, path: str) -> tuple | None:
        """:meth:`lowbit.ops.BlockState.tracker_key`."""
        return self._block.tracker_key(path)

    def drop_unfit_trackers(self) -> None:
        """:meth:`lowbit.ops.BlockState.drop_unfit_trackers`."""
        self._block.drop_unfit_trackers()

    def rng_state(self) -> dict[str, Any]:
        """This layer's noise state ``{"seed", "name", "counter"}`` (for checkpoints)."""
        return self._block.noise.state_dict()

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self._block.noise.load_state_dict(state)

    def _extra(self, config: FQTConfig | None = None) -> str:
        """``recipe=…, seed=…, name=…`` of the layer's config, or of ``config`` (the one
        the layer runs, where it reads its own differently: attention's dynamic ranges)."""
        return f"recipe={describe(self.config if config is None else config)}, seed={self.seed}, " \
               f"name={self.noise.name!r}"


# torch modules with GEMMs that lowbit has no layer for: listed as skipped, not silently float
_NO_FQT_LAYER = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.RNNBase,
                 nn.RNNCellBase, nn.Bilinear)


def _e5m2(fmt: object) -> bool:
    return getattr(fmt, "code_dtype", None) == torch.float8_e5m2


def backend_conflicts(config: FQTConfig, model: nn.Module) -> tuple[list[str], list[str]]:
    """``(certain, possible)``: the GEMMs of the converted ``model`` that ``backend="int8"``
    (or ``"fp8"``) of ``config`` will refuse at the first forward or backward that needs
    them, and those it may refuse depending on the data (Hadamard blocks against a
    sequence length), decided from the config: under ``"fp8"`` every convolution (no FP8 convolution kernel); a scale on a GEMM's
    summed dimension (per-output-channel weight scales in ∇X = ∇Y·W, per-sample
    activation scales in ∇W = ∇Yᵀ·X), Hadamard's row transform in attention's ∇P (by
    sequence length; BHQ's groups are built per head there and run), asymmetric gradient
    grids in attention and (``"int8"``)
    convolutions, a row-mixing ∇W quantizer on grouped convolutions. Empty for other
    backends. (A layer whose input needs no gradient, or whose weight is frozen, never runs
    the ∇X, or ∇W, GEMM named.) Under ``"fp8"`` also a float64 layer (certain) and a
    GEMM with both operands E5M2 (possible: CUDA refuses it, the CPU runs it)."""
    from .attention_modules import FQTMultiheadAttention, FQTScaledDotProductAttention  # they import this module
    backend = Backend(config.backend)
    found: list[str] = []
    possible: list[str] = []
    if backend not in (Backend.INT8, Backend.FP8):
        return found, possible
    if backend is Backend.FP8 and any(isinstance(m, (FQTConv2d, FQTConv1d)) for m in model.modules()):
        found.append("all three GEMMs of every convolution (there is no FP8 convolution kernel; the output "
                     "GEMM raises at the first forward)")
    # every converted layer (Hugging Face's FQTConv1D too), its parametrizations' originals
    # included (a second review: a parametrized weight lives in a child module)
    if backend is Backend.FP8 and any(p.dtype == torch.float64 for m in model.modules()
                                      if isinstance(m, _StochasticLayer) for p in m.parameters()):
        found.append("every GEMM of a float64 layer (torch._scaled_mm takes float32 scales; a float64 "
                     "layer's steps are float64: the first forward raises)")
    if backend is Backend.FP8:
        e5m2 = [name for name, (a, b) in (("Y = X·Wᵀ", (config.activation, config.weight)),
                                          ("∇X = ∇Y·W", (config.grad_input, config.weight)),
                                          ("∇W = ∇Yᵀ·X", (config.grad_weight, config.activation)))
                if a is not None and b is not None and _e5m2(a.format) and _e5m2(b.format)]
        if e5m2:
            possible.append(f"{', '.join(e5m2)} of every Linear on CUDA (both operands E5M2, which cuBLASLt "
                            "refuses; the CPU runs them)")
    if config.grad_input is not None and config.weight is not None and config.weight.granularity is Granularity.ROW:
        found.append("∇X = ∇Y·W of every Linear/convolution whose input needs a gradient (the weight's "
                     "per-output-channel scale, weight.granularity='row', lies on its summed dimension)")
    if config.grad_weight is not None and config.activation is not None \
            and config.activation.granularity is Granularity.ROW:
        found.append("∇W = ∇Yᵀ·X of every layer whose weight needs a gradient (the per-sample activation "
                     "scale, activation.granularity='row', lies on its summed dimension)")
    attention = any(isinstance(m, (FQTMultiheadAttention, FQTScaledDotProductAttention)) for m in model.modules())
    grads = [g for g in (config.grad_input, config.grad_weight) if g is not None]
    if backend is Backend.FP8 and attention and config.activation is not None:
        found.append("every attention product (lowbit's attention has no FP8 kernel; Q·Kᵀ raises at "
                     "the first forward)")
    if attention and config.grad_input is not None and config.grad_input.quantizer == "hadamard":
        possible.append("attention's ∇P per head (where the Hadamard block does not divide a head's "
                     "query rows, decided by the sequence length)")
    if attention and any(getattr(g.format, "asymmetric", False) for g in grads):
        found.append("attention's gradient products per head (an asymmetric gradient grid's offset)")
    convs = any(isinstance(m, (FQTConv2d, FQTConv1d)) for m in model.modules())
    if backend is Backend.INT8 and convs and any(getattr(g.format, "asymmetric", False) for g in grads):
        found.append("∇X and ∇W of every convolution (an asymmetric gradient grid's offset: code 0 is "
                     "not the value 0, which oneDNN's and the im2col GEMMs' zero padding assume)")
    grouped = any(isinstance(m, (FQTConv2d, FQTConv1d)) and m.groups > 1 for m in model.modules())
    if grouped and config.grad_weight is not None and config.grad_weight.quantizer in ("bhq", "hadamard"):
        found.append("∇W of grouped convolutions (the gradient's row transform mixes the groups' output channels)")
    return found, possible


# convert's backend warning held back (lowbit.experiments.trainer.convert_or_refuse says it
# itself, or refuses): a context variable, as a warnings filter would reset every
# once-per-place registry (a review saw warnings repeat at every call)
BACKEND_WARNING: contextvars.ContextVar[bool] = contextvars.ContextVar("lowbit_backend_warning", default=True)


def warn_backend_conflicts(config: FQTConfig, model: nn.Module, converted: bool = True,
                           stacklevel: int = 3) -> None:
    """A :class:`ConversionWarning` at ``convert`` for :func:`backend_conflicts`: a
    warning, not an error, as a layer whose input needs no gradient (the first) or whose
    weight is frozen never runs that GEMM (``lowbit train``, whose layers all train,
    refuses the certain ones). ``converted``: whether ``convert`` converted anything."""
    found, possible = backend_conflicts(config, model) if converted and BACKEND_WARNING.get() else ([], [])
    found = found + [f"possibly {p}" for p in possible]
    backend = Backend(config.backend)
    if found:
        kernels = "integer kernels" if backend is Backend.INT8 else "torch._scaled_mm"
        warnings.warn(f"lowbit.convert: backend={backend.value!r} cannot run these GEMMs on {kernels} and will "
                      "raise at the first pass that needs them: " + "; ".join(found)
                      + ". Use backend='auto' (they run simulated, with the same estimator) or change the spec",
                      ConversionWarning, stacklevel=stacklevel)


def check_source(cls: type, mod: object, expected: type) -> None:
    """``TypeError`` naming both types where ``cls.from_float`` is handed a module it
    cannot wrap (it would fail later on a missing attribute)."""
    if not isinstance(mod, expected):
        raise TypeError(f"{cls.__name__}.from_float expects a {expected.__name__} module, got "
                        f"{type(mod).__name__}")


class FQTLinear(nn.Linear, _StochasticLayer):
    """``nn.Linear`` whose three GEMMs run under an :class:`FQTConfig`. Accepts inputs of
    any leading shape ``(*, in_features)``."""

    # which dimension of the input indexes the minibatch's samples, for the variance
    # monitor's per-sample gradients (lowbit.layergrads): 0, or 1 for a sequence-first
    # layer — convert marks those it knows (nn.MultiheadAttention's out-projection, the
    # Linear layers of batch_first=False Transformer layers); set it on your own
    sample_dim = 0

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 config: FQTConfig, seed: int | None = None, name: str = "",
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quant(config, seed, name)

    @classmethod
    def from_float(cls, mod: nn.Linear, config: FQTConfig, seed: int | None = None,
                   name: str = "") -> FQTLinear:
        """Wrap ``mod``'s parameters (shared, not copied) in an ``FQTLinear``. Noise:
        base seed ``seed``, else ``config.seed``, else one global-RNG draw; ``name`` (the
        fully qualified name; ``convert`` passes it) keys the stream (:mod:`lowbit.noise`).
        ``TypeError`` if ``mod`` is not an ``nn.Linear``."""
        check_source(cls, mod, nn.Linear)
        new = cls(mod.in_features, mod.out_features, mod.bias is not None,
                  config=config, seed=seed, name=name, device="meta")
        new.weight, new.bias = mod.weight, mod.bias
        new.train(mod.training)
        return new

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name: layer(input=x))
        self.ran = True  # a constant store: no torch.compile guard or graph break
        return fqt_linear(input, self.weight, self.bias, self._block)

    def linear_weight(self) -> torch.Tensor:
        """The (out_features, in_features) weight its GEMMs use: ``weight`` itself (the
        monitor reads Linear-like layers through this: Hugging Face ``FQTConv1D`` too)."""
        return self.weight

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._extra()}"


class FQTConv2d(nn.Conv2d, _StochasticLayer):
    """``nn.Conv2d`` (stride, padding incl. ``'same'``/padding modes, dilation, groups,
    bias) whose three GEMMs run under an :class:`FQTConfig`: on integer kernels (oneDNN's
    int8 convolution or im2col + ``torch._int_mm``) where the operands allow, else
    simulated (:mod:`lowbit.conv`; ``lowbit.coverage`` shows which ran)."""

    def __init__(self, *args, config: FQTConfig, seed: int | None = None, name: str = "",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(config, seed, name)

    @classmethod
    def from_float(cls, mod: nn.Conv2d, config: FQTConfig, seed: int | None = None,
                   name: str = "") -> FQTConv2d:
        """Wrap ``mod``'s parameters (shared, not copied) in an ``FQTConv2d`` (seed and
        ``name`` as for :meth:`FQTLinear.from_float`). ``TypeError`` if ``mod`` is not an
        ``nn.Conv2d`` (``nn.Conv1d`` for :class:`FQTConv1d`)."""
        check_source(cls, mod, nn.Conv1d if issubclass(cls, nn.Conv1d) else nn.Conv2d)
        new = cls(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride,
                  padding=mod.padding, dilation=mod.dilation, groups=mod.groups,
                  bias=mod.bias is not None, padding_mode=mod.padding_mode,
                  config=config, seed=seed, name=name, device="meta")
        new.weight, new.bias = mod.weight, mod.bias
        new.train(mod.training)
        return new

    def _explicit_padding(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Turn padding modes and string padding into a pre-padded input plus int padding."""
        if self.padding_mode != "zeros":
            return nn.functional.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode), (0, 0)
        if self.padding == "valid":
            return x, (0, 0)
        if self.padding == "same":
            return nn.functional.pad(x, same_padding(self.kernel_size, self.dilation)), (0, 0)
        return x, _pair(self.padding)

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name: layer(input=x))
        self.ran = True  # a constant store: no torch.compile guard or graph break
        check_dense("fqt_conv2d", "input", input)  # before padding fails inside torch
        x, padding = self._explicit_padding(input)
        return fqt_conv2d(x, self.weight, self.bias, self._block, self.stride, padding,
                          self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._extra()}"


class FQTConv1d(nn.Conv1d, _StochasticLayer):
    """``nn.Conv1d`` (stride, padding incl. ``'same'``/padding modes, dilation, groups,
    bias) whose three GEMMs run under an :class:`FQTConfig` (:func:`lowbit.conv.fqt_conv1d`:
    the conv2d GEMMs on a height-1 image)."""

    def __init__(self, *args, config: FQTConfig, seed: int | None = None, name: str = "",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._init_quant(config, seed, name)

    # wrap ``mod``'s parameters (shared, not copied), as FQTConv2d.from_float does
    from_float = classmethod(FQTConv2d.from_float.__func__)  # type: ignore[assignment]

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (torch's name: layer(input=x))
        self.ran = True  # a constant store: no torch.compile guard or graph break
        check_dense("fqt_conv1d", "input", input)  # before padding fails inside torch
        x = input
        if self.padding_mode != "zeros":
            x = nn.functional.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return fqt_conv1d(x, self.weight, self.bias, self._block, self.stride, 0,
                              self.dilation, self.groups)
        return fqt_conv1d(x, self.weight, self.bias, self._block, self.stride, self.padding,
                          self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._extra()}"


_FQT_LAYERS = (FQTLinear, FQTConv2d, FQTConv1d)
_PLAIN = {nn.Linear: FQTLinear, nn.Conv2d: FQTConv2d, nn.Conv1d: FQTConv1d}


def convert(model: nn.Module, config: FQTConfig, module_filter: ModuleFilter | None = None,
            *, report: bool = False) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Swap every ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` in ``model`` (any depth) for its FQT
    version under ``config``, in place, and return ``model`` (``(model, report)`` with
    ``report=True``: a :class:`ConversionReport`). A ``model`` that is itself such a layer
    cannot change class in place: the converted layer is returned (use the return value).

    Attention too (:mod:`lowbit.attention_modules`): ``nn.MultiheadAttention`` becomes an
    ``FQTMultiheadAttention`` (in- and out-projections and both attention products
    low-bit; inside ``nn.Transformer*Layer`` as well), lowbit's own
    ``ScaledDotProductAttention`` modules (TinyGPT calls attention through one) an
    ``FQTScaledDotProductAttention``. Hugging Face models (:mod:`lowbit.hf`, when
    ``transformers`` is loaded): ``Conv1D`` becomes ``FQTConv1D``, and attention runs
    through lowbit via transformers' attention registry (``attn_implementation="lowbit"``).

    Only faithful swaps are made (:func:`lowbit.conversion.skip_reason`): a module whose
    class is a subclass, that carries hooks, owns extra parameters/buffers, is not yet
    materialized (lazy) or is read by its parent without being called
    (``out_proj`` of an ``nn.MultiheadAttention`` left float: under every name it has, also
    where a converted attention shares it) is left alone, listed in the report's
    ``skipped`` with the reason and in one :class:`ConversionWarning`; so are torch's GEMM
    layers lowbit has no layer for (``Conv3d``, ``ConvTranspose*``, ``RNN``/``LSTM``/``GRU``
    and their cells, ``Bilinear``). A model in which nothing was converted, skipped or
    excluded by ``module_filter`` (its GEMMs are functional calls, or it has none) gets a
    :class:`ConversionWarning` saying so. Parametrized
    layers (``torch.nn.utils.parametrizations.weight_norm``/``spectral_norm``, …) are
    converted with their parametrizations; plain instance attributes are carried over.
    ``nn.TransformerEncoderLayer``s holding converted layers lose their fused inference
    path, which would bypass them (:func:`lowbit.conversion.disable_fused_fastpath`).

    ``module_filter(module, fully_qualified_name)`` returning False leaves a module
    alone. Parameters are shared, names unchanged. A module reachable under several
    names becomes one converted layer. Converting again is idempotent: already-converted
    layers only take the new config (and restart their :attr:`ran` flag); where the new
    config's ``seed`` differs from the old one's, their noise streams restart from it (as a
    fresh conversion with that seed would give them), else the streams go on — but for
    copies of a converted block (``nn.TransformerEncoder``'s clones, ``copy.deepcopy``),
    which share the original's stream until converted again: each gets its own, under its
    name in ``model``.
    Raises ``TypeError`` if ``model`` is not an ``nn.Module`` or ``config`` not an
    :class:`FQTConfig`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, FQTConfig):
        raise not_a_config(config)
    if module_filter is not None and not callable(module_filter):
        raise TypeError(f"module_filter must be a callable (module, name) -> bool, got "
                        f"{type(module_filter).__name__}")
    if module_filter is not None:  # asked once per (module, name): a filter may keep state
        module_filter = _asked_once(module_filter)
    base = draw_base_seed() if config.seed is None else config.seed  # noise: lowbit.noise
    converted: list[str] = []
    skipped: dict[str, str] = {}
    excluded: list[str] = []
    probes: dict[type[nn.Module], nn.Module] = {}
    memo: dict[int, nn.Module] = {}
    kept: set[int] = set()  # ids of the already-converted blocks met
    from .attention_modules import FQTMultiheadAttention, aliased_attention_out_projs, extensions  # they import this module

    rules, finish = extensions(model)  # attention, Hugging Face
    aliased = aliased_attention_out_projs(model)  # out_proj id -> its attention
    started: set[int] = set()  # ids of the modules whose visit has begun
    deferred: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, name, out_proj) met before its attention
    just_deferred: list[nn.Module] = []  # swap's signal to visit: do not memoise this one

    def swap(module: nn.Module, name: str, parent: nn.Module | None) -> nn.Module:
        if module_filter is not None and not module_filter(module, name):
            excluded.append(name)
            return module
        if isinstance(module, _FQT_LAYERS):
            kept.add(id(module))
            module.config, module.ran = config, False
            module.drop_unfit_trackers()  # another range setting: its history starts afresh
            converted.append(name)
            return module
        plain = next(p for p in _PLAIN if isinstance(module, p))
        cls = _PLAIN[plain]
        if plain not in probes:  # what an FQT layer holds, for attribute clashes
            probe = nn.Linear(1, 1, device="meta") if plain is nn.Linear else plain(1, 1, 1, device="meta")
            probes[plain] = cls.from_float(probe, config, seed=0)
        holders = aliased.get(id(module), ())
        if any(id(h) not in started for h in holders):  # an out_proj met before an attention holding it:
            deferred.append((parent, name, module))  # decided once every one is (below)
            just_deferred.append(module)
            return module
        # the attentions holding it as they end up (the one being visited: its replacement,
        # ``parent``): any left float reads its weight, so it stays float under every name
        ends = [memo.get(id(h), parent) for h in holders]
        reason = MHA_REASON if any(reads_out_proj(e) for e in ends) else \
            skip_reason(module, parent, plain, probes[plain])
        if reason is not None:
            skipped[name] = reason
            return module
        converted.append(name)
        return rebuild(module, plain, lambda m: cls.from_float(m, config, seed=base, name=name))

    def swap_by(rule: SwapRule, module: nn.Module, name: str, parent: nn.Module | None) -> nn.Module:
        if module_filter is not None and not module_filter(module, name):
            excluded.append(name)
            return module
        if module_filter is not None and _attention_turned_down(module_filter, parent, name):
            excluded.append(name.rpartition(".")[0])  # the attention module the filter turned down
            return module
        if isinstance(module, rule.fqt):
            kept.update(id(b) for b in fqt_blocks(module).values())
            module.config = config
            for block in fqt_blocks(module).values():  # its products and projections too
                block.ran = False
                block.drop_unfit_trackers()
            converted.append(name)
            return module
        new = rule.swap(module, config, base, name)
        if isinstance(new, str):
            skipped[name] = new
            return module
        converted.append(name)
        return new

    def visit(module: nn.Module, prefix: str, parent: nn.Module | None) -> nn.Module:
        if id(module) in memo:  # shared module: convert once, reuse everywhere
            return memo[id(module)]
        started.add(id(module))
        rule = next((r for r in rules if isinstance(module, (r.fqt, r.plain))), None)
        if rule is None and isinstance(module, tuple(_PLAIN)):
            new = swap(module, prefix, parent)
            if just_deferred:  # not memoised: met again under its attention, decided there
                just_deferred.clear()
                return new
        else:
            if rule is None and isinstance(module, _NO_FQT_LAYER) and \
                    (module_filter is None or module_filter(module, prefix)):
                skipped[prefix] = (f"{type(module).__name__} has no lowbit layer: its own GEMMs run in float "
                                   "(README 'What stays in float')")  # its children are still converted
            new = module if rule is None else swap_by(rule, module, prefix, parent)
            internal = rule.internal if rule is not None and isinstance(new, rule.fqt) else ()
            for name, child in list(new._modules.items()):  # aliases too (named_children dedups)
                if child is None or name in internal:
                    continue
                sub = visit(child, f"{prefix}.{name}" if prefix else name, new)
                if sub is not child:
                    setattr(new, name, sub)
        memo[id(module)] = new
        return new

    model = visit(model, "", None)
    for parent, name, out_proj in deferred:  # each as the out_proj became
        done = memo.get(id(out_proj), out_proj)
        if done is out_proj:  # float: a float attention holding it reads its weight
            if getattr(parent, "calls_out_proj", False):  # a converted one calls it
                skipped[name] = MHA_REASON + " (shared with a float nn.MultiheadAttention)"
            elif reads_out_proj(parent):
                skipped[name] = MHA_REASON
        elif parent is not None and not reads_out_proj(parent):
            setattr(parent, name.rpartition(".")[2], done)
    _rekey_kept(model, kept)
    _mark_sequence_first(model, FQTMultiheadAttention)
    warn_backend_conflicts(config, model, bool(converted))
    for name, why in finish(model).items():  # attention lowbit cannot route or compute
        if module_filter is None or _filter_wants(module_filter, model, name):
            skipped[name] = why
    # a block finish took out again (an attention left float) is not converted (a review found it listed)
    present = {n for n, _ in model.named_modules(remove_duplicate=False)}
    converted[:] = [c for c in converted if c in present]
    fastpath = disable_fused_fastpath(
        model, lambda m: isinstance(m, (*_FQT_LAYERS, FQTMultiheadAttention)))
    set_excluded = set(excluded)
    if skipped:
        listing = "; ".join(f"{quote_module(n)}: {why}" for n, why in skipped.items())
        warnings.warn(f"lowbit.convert left {len(skipped)} layer(s) in float: {listing}",
                      ConversionWarning, stacklevel=2)
    elif not converted and (names := [n for n in getattr(module_filter, "none", ()) if n in set_excluded]):
        # a filter without a `return` (or ending in a print) excludes every module in silence
        # (a new user's trial); only None answers that excluded a module count (a review: the
        # modules lowbit has no layer for are asked too)
        warnings.warn(f"lowbit.convert converted nothing: module_filter returned None (read as False: "
                      f"excluded) for {len(names)} module(s) ({', '.join(map(quote_module, names[:3]))}"
                      f"{', …' if len(names) > 3 else ''}); a filter must return True for the modules to "
                      "convert — does it lack a return?", ConversionWarning, stacklevel=2)
    elif not converted and not excluded:  # a model of functional GEMMs came back as it was
        warnings.warn(f"lowbit.convert converted nothing: {type(model).__name__} holds no module lowbit "
                      "has a layer for (nn.Linear, nn.Conv1d, nn.Conv2d, attention modules, transformers' "
                      "Conv1D); GEMMs called as functions (F.linear, torch.matmul, @) are not converted, "
                      "so it trains in float unless it calls lowbit's functional API itself (fqt_linear, "
                      "fqt_conv2d, …) — lowbit.coverage(model, x) lists what runs in float",
                      ConversionWarning, stacklevel=2)
    if not report:
        return model
    return model, ConversionReport(tuple(converted), skipped, tuple(excluded), fastpath)


def _rekey_kept(model: nn.Module, kept: set[int]) -> None:
    """Give the already-converted blocks ``convert`` met (``kept``: their ids) that share
    one ``(seed, name)`` with another block of ``model`` the stream a fresh conversion
    would, keyed by their names in ``model``: copies of a converted block
    (``nn.TransformerEncoder``'s clones, ``copy.deepcopy``) kept the original's name, so
    every copy drew the same noise (a review). A block alone on its stream keeps its
    name (reseeded or not: siblings converted again one call each would get one name
    relative to each call's root, a second review found)."""
    blocks = fqt_blocks(model)
    keys = Counter((b.noise.seed, b.noise.name) for b in blocks.values())
    for fqn, b in blocks.items():
        if id(b) in kept and b.noise.name != fqn and keys[(b.noise.seed, b.noise.name)] > 1:
            b._block.noise = NoiseStream(b.noise.seed, fqn)


def _mark_sequence_first(model: nn.Module, mha: type[nn.Module]) -> None:
    """``sample_dim = 1`` on the FQTLinear layers that see (L, N, E) inputs: those of
    ``batch_first=False`` Transformer layers, and the out-projection of ``mha``
    (:class:`~lowbit.attention_modules.FQTMultiheadAttention`, which calls it on
    sequence-first rows whatever its ``batch_first``; convert swaps it separately). The
    variance monitor then takes their samples from dimension 1, not token positions."""
    for m in model.modules():
        lins = []
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and \
                not getattr(m.self_attn, "batch_first", False):
            lins = [m.linear1, m.linear2]
        elif isinstance(m, mha):
            lins = [m.out_proj]
        for lin in lins:
            if isinstance(lin, FQTLinear):
                lin.sample_dim = 1


def fqt_layers(model: nn.Module, *, ran: bool | None = None) -> dict[str, _StochasticLayer]:
    """Every module of ``model`` that ``convert`` made run GEMMs under a recipe, by fully
    qualified name: the converted layers (``FQTLinear``, ``FQTConv2d``, ``FQTConv1d``, Hugging
    Face ``FQTConv1D``) and the attention products of converted attention. With
    ``ran=True`` only those whose forward has run since conversion or :func:`reset_ran`,
    with ``ran=False`` only those that have not (converted, yet bypassed or unused). The
    in-projection blocks of a converted ``nn.MultiheadAttention`` are left to
    :func:`fqt_blocks`: they are alternatives of one projection (packed ``qkv``, ``q`` +
    ``kv``, or ``q``, ``k``, ``v``, chosen per call by which inputs are the same tensor),
    so most of them never run in a given model without being bypassed."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _StochasticLayer)
            and not getattr(m, "alternative", False) and (ran is None or m.ran == ran)}


def fqt_weight_layers(model: nn.Module) -> dict[str, FQTLinear | FQTConv2d | FQTConv1d]:
    """The converted ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` layers of ``model`` by
    name: the layers whose ``weight`` is the (out, in) weight or the kernel of their GEMM.
    Hugging Face ``Conv1D`` ((in, out) weight), an ``nn.MultiheadAttention``'s
    in-projections (blocks running on their parent's weight) and attention products are not
    among them; :mod:`lowbit.analysis` models the first two as well
    (:func:`lowbit.analysis._model.gemm_layers`)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _FQT_LAYERS)}


def reset_ran(model: nn.Module) -> None:
    """Clear the :attr:`ran` flag of every module :func:`fqt_layers` lists (before a step
    whose coverage is to be checked with :func:`fqt_layers` ``(model, ran=...)``)."""
    for m in fqt_layers(model).values():
        m.ran = False


def call_input(args: tuple, kwargs: dict[str, Any]) -> Any:
    """The input of a layer's call as a forward hook registered ``with_kwargs=True`` sees
    it: the first positional argument, else the keyword torch's layers name it
    (``input``; ``x`` for Hugging Face's ``Conv1D``); ``None`` where there is neither.
    A model may call ``layer(input=x)``: a hook reading ``args[0]`` failed there."""
    if args:
        return args[0]
    return next((kwargs[k] for k in ("input", "x") if k in kwargs), None)


def fqt_blocks(model: nn.Module) -> dict[str, _StochasticLayer]:
    """Every module of ``model`` that runs GEMMs under a recipe and owns a noise stream,
    by name: the converted layers (:func:`fqt_layers`) and the GEMM blocks of converted
    attention (:mod:`lowbit.attention_modules`: attention products, in-projections).
    Each has ``config`` (settable), ``noise`` and ``range_trackers``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _StochasticLayer)}


def rng_state(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Every converted layer's and attention block's noise state ``{"seed", "name",
    "counter"}`` by module name (plain ints and strings: save it in checkpoints;
    :mod:`lowbit.noise` has the rule)."""
    return {n: m.rng_state() for n, m in fqt_blocks(model).items()}


def load_rng_state(model: nn.Module, state: dict[str, dict[str, Any]]) -> None:
    """Restore what :func:`rng_state` returned; layer names must match both ways
    (``KeyError`` naming the state's layers this model does not have, or this model's
    layers the state lacks — they would silently keep their current noise)."""
    if not isinstance(state, dict):
        raise TypeError(f"rng state must be a dict (from lowbit.rng_state), got {type(state).__name__}")
    layers = fqt_blocks(model)
    extra, lacking = sorted(set(state) - set(layers)), sorted(set(layers) - set(state))
    if extra:
        raise KeyError(f"rng state names layers this model does not have: {extra[:5]}")
    if lacking:
        raise KeyError(f"rng state lacks {len(lacking)} of this model's layers: {lacking[:5]} (a state "
                       "saved for another model, or by a lowbit that did not yet convert them)")
    for name, s in state.items():
        layers[name].set_rng_state(s)


def range_state(model: nn.Module) -> dict[str, dict[str, dict[str, Any]]]:
    """Every predicted-range tracker's history and counters, by layer and path (save it
    in checkpoints next to :func:`rng_state`: a resumed run is then bitwise identical).
    The histories are this process's own: under DDP each rank predicts from its own
    gradients, so each rank saves and loads its own state (each entry records its
    ``rank``; :func:`load_range_state` warns where another rank's is loaded).
    A predicted path that has no tracker yet (before its first backward) is listed as
    ``{"created": False, "rank": …}``, a tracker's entry carries ``"created": True``: a
    loader that fills only the keys of the dict it loads into —
    ``torch.distributed.checkpoint.load`` into a fresh model's ``range_state`` — then
    leaves an entry that says it was created but holds no history, which
    :func:`load_range_state` refuses (it had restarted every history without a word: a
    new user's trial). Save and load each rank's state whole (``torch.save`` /
    ``torch.load``)."""
    rank = current_rank()
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for n, m in fqt_blocks(model).items():
        paths = {p: {**t.state_dict(), "rank": rank, "created": True} for p, t in m.range_trackers.items()}
        for p in GRAD_PATHS:  # a predicted path before its first backward: a placeholder
            if p not in paths and m.tracker_key(p) is not None:
                paths[p] = {"created": False, "rank": rank}
        if paths:
            out[n] = paths
    return out


def _asked_once(module_filter: ModuleFilter) -> ModuleFilter:
    """``module_filter`` answering each (module, name) from its first answer: ``convert``
    may need an answer twice (a Hugging Face attention the swap asked about is asked again
    for its ``lowbit_attention`` child, :func:`_attention_turned_down`), and a filter that
    counts or keeps state must see each question once, in the traversal's order (a review:
    a filter converting the first attention it met converted none)."""
    answers: dict[tuple[int, str], tuple[nn.Module, bool]] = {}

    def ask(module: nn.Module, name: str) -> bool:
        got = answers.get((id(module), name))
        if got is None or got[0] is not module:  # (the module kept: its id is not reused)
            said = module_filter(module, name)
            if said is None:
                ask.none.append(name)  # type: ignore[attr-defined]
            got = answers[(id(module), name)] = (module, bool(said))
        return got[1]

    ask.none = []  # type: ignore[attr-defined]  # names it answered None for (read by convert)
    return ask


def _attention_turned_down(module_filter: ModuleFilter, parent: nn.Module | None, name: str) -> bool:
    """Whether ``name`` is the ``lowbit_attention`` child :mod:`lowbit.hf` gave a Hugging
    Face attention module (``parent``) that ``module_filter`` rejects: its products stay
    float as the filter says (the child alone was asked, a review found), as
    :func:`_filter_wants` reads the same filter."""
    hf = sys.modules.get("lowbit.hf")  # loaded where such children exist
    if hf is None or parent is None or name.rpartition(".")[2] != hf.CHILD:
        return False
    return not module_filter(parent, name.rpartition(".")[0])


def _filter_wants(module_filter: ModuleFilter, model: nn.Module, name: str) -> bool:
    """Whether ``module_filter`` would have converted the attention at ``name`` (which stays
    float for a reason of its own): it accepts the module and the ``lowbit_attention`` child
    it would have been given (a float placeholder; how filters that keep attention float
    name it)."""
    from .attention_modules import ScaledDotProductAttention
    from .hf import CHILD  # entries come from lowbit.hf only (transformers loaded)
    module = model.get_submodule(name)
    child = f"{name}.{CHILD}" if name else CHILD
    return bool(module_filter(module, name)) and bool(module_filter(ScaledDotProductAttention(), child))


def load_range_state(model: nn.Module, state: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Restore what :func:`range_state` returned: afterwards every layer's trackers are
    exactly the saved ones (created as they were saved). A layer or gradient path the
    state lacks or lists as not created had no tracker when it was saved (:func:`range_state`
    lists such a predicted path as ``{"created": False, …}``; a state saved by a lowbit
    before that left it out, ``{}`` before the first backward): its tracker is removed, so
    it starts with no history, as in a fresh model. Rolling a model back to a checkpoint therefore
    equals loading that checkpoint into a fresh model (as with :func:`load_rng_state`,
    nothing of the current state survives the load).

    ``TypeError`` for a state that is not a dict; ``KeyError`` naming layers this model
    does not have, or paths that are not gradient paths; ``ValueError`` naming entries that
    say a tracker was saved but hold no history (a loader that filled only a fresh model's
    keys, :func:`range_state`), or trackers
    saved under other predicted-range settings than the layer's config asks for (its
    next backward would replace them: the history silently lost); nothing is changed
    when it raises."""
    if not isinstance(state, dict):
        raise TypeError(f"range state must be a dict (from lowbit.range_state), got {type(state).__name__}")
    layers = fqt_blocks(model)
    missing = sorted(set(state) - set(layers))
    if missing:
        raise KeyError(f"range state names layers this model does not have: {missing[:5]}")
    bad = sorted(f"{n}/{p}" for n, paths in state.items() for p in paths if p not in GRAD_PATHS)
    if bad:
        raise KeyError(f"range state names paths that are not gradient paths {GRAD_PATHS}: {bad[:5]}")
    # a path listed before its first backward (created False) had no tracker: none is made
    state = {n: {p: s for p, s in paths.items() if s.get("created", True) is not False}
             for n, paths in state.items()}
    hollow = sorted(f"{n}/{p}" for n, paths in state.items() for p, s in paths.items()
                    if not {"hist", "count", "stats", "key"} <= set(s))
    if hollow:
        raise ValueError(f"range state entries {hollow[:3]} say a tracker was saved but hold no history "
                         "(hist, count, stats, key): a loader that fills only the keys of the dict it loads "
                         "into — torch.distributed.checkpoint.load into lowbit.range_state of a model before "
                         "its first backward — left them out; save and load each rank's lowbit.range_state "
                         "whole (torch.save / torch.load), as the README's checkpoint section does")
    unfit = [f"{n}/{p} (saved {tuple(s['key'])}, the layer's config needs {layers[n].tracker_key(p)})"
             for n, paths in state.items() for p, s in paths.items()
             if tuple(s["key"]) != layers[n].tracker_key(p)]
    if unfit:  # its next backward would replace (or ignore) it: refuse instead
        raise ValueError("range state was saved under other predicted-range settings (history, margin, "
                         f"per row, overflow, quantizer) than the layers' configs: {unfit[:3]}")
    rank = current_rank()
    others = sorted({s["rank"] for paths in state.values() for s in paths.values()
                     if isinstance(s.get("rank"), int) and s["rank"] != rank})
    if others:
        # a new user's trial: the usual rank-0-only checkpoint gave every rank rank 0's
        # histories, and the resumed run silently stopped being bitwise
        warnings.warn(f"load_range_state: this state holds what rank {', '.join(map(str, others))} saved, "
                      f"this process is rank "
                      f"{rank}: predicted ranges are each rank's own (its own gradients), so the run "
                      "continues unbiased but not bitwise as the uninterrupted one; for a bitwise resume "
                      "save lowbit.range_state(model) on every rank and load each rank's own",
                      UserWarning, stacklevel=2)
    loaded: dict[str, dict[str, RangeTracker]] = {}
    for name, paths in state.items():  # all built before any layer changes
        for path, s in paths.items():
            t = RangeTracker(*s["key"])
            t.load_state_dict(s)
            loaded.setdefault(name, {})[path] = t
    for name, layer in layers.items():
        layer.range_trackers.clear()
        layer.range_trackers.update(loaded.get(name, {}))


RangeSnapshot = list  # [(layer, its trackers, their states)]: what restore_ranges takes


def snapshot_ranges(model: nn.Module) -> RangeSnapshot:
    """Every converted layer's predicted-range trackers as they are now (the tracker
    objects and copies of their states), so that :func:`restore_ranges` can undo a step:
    a skipped training step, a :func:`lowbit.coverage` trace. Empty-handed layers are
    kept too, so trackers a step creates are removed again."""
    return [(m, dict(m.range_trackers), {p: t.state_dict() for p, t in m.range_trackers.items()})
            for m in fqt_blocks(model).values()]


def restore_ranges(snapshot: RangeSnapshot, counters: bool = True) -> None:
    """Put back what :func:`snapshot_ranges` saw: the same trackers, in their states.
    ``counters=False`` puts back the range histories only and keeps the trackers' counters
    (:class:`lowbit.ranges.RangeStats`) as they are now: a skipped training step's calls
    ran, and its non-finite operands (why it was skipped) stay counted (undone with the
    history, ``nonfinite_calls`` read 0 under every skip: a review)."""
    for m, trackers, states in snapshot:
        made = {p: t for p, t in m.range_trackers.items() if p not in trackers}  # by the step
        m.range_trackers.clear()
        m.range_trackers.update(trackers)
        for p, t in trackers.items():
            kept = t.stats
            t.load_state_dict(states[p])
            if not counters:
                t.stats = kept
        if not counters:  # a first step's trackers: no history, their counts kept (a review)
            for p, t in made.items():
                t.clear_history()
                m.range_trackers[p] = t


def rescale_ranges(model: nn.Module, factor: float) -> None:
    """The gradients' unit of every predicted-range tracker of ``model`` changed by
    ``factor`` (a new loss scale, :class:`lowbit.amp.GradScaler`): each recorded range
    is multiplied by ``factor`` to the power its call's transform gave (BHQ's transformed
    range follows the gradient's as ``c^(2/3)``), its ``loss_scale`` by ``factor``
    (:meth:`lowbit.ranges.RangeTracker.rescale`)."""
    for m in fqt_blocks(model).values():
        for t in m.range_trackers.values():
            t.rescale(factor)


def range_stats(model: nn.Module) -> dict[str, RangeStats]:
    """Overflow counters of every predicted-range tracker, keyed ``layer/path``, plus
    ``"total"`` (their sum; all zero when no layer predicts its ranges)."""
    out = {f"{n}/{p}": dataclasses.replace(t.stats) for n, m in fqt_blocks(model).items()
           for p, t in m.range_trackers.items()}  # copies: read now, not updated later
    total = RangeStats()
    for s in out.values():
        total = total + s
    out["total"] = total
    return out


class RangeWindow:
    """The predicted-range counters of the calls ``model``'s trackers make between its
    creation and :meth:`close`: each call's own counts are added to the window as the call
    ends (``lowbit.ranges.OPEN_WINDOWS``), so the window is exact where a difference of
    running totals is not (``range_stats(model)["total"] − before`` lost an epoch's sums of
    squares — its clipped mass — after one call with huge values, a float64 cancellation:
    a review), and whatever the block does to the trackers (created, dropped by a new
    ``convert``, states put back by ``restore_ranges``/``load_range_state``) it counts the
    calls made, once; a :func:`lowbit.coverage` trace inside it is not counted (coverage
    leaves training as if it had not run). The trackers' own counters are not touched.
    Use it as a context manager (``with RangeWindow(model) as w:``; ``w.stats`` after the
    block) or call :meth:`close`: an open window is held weakly and costs each call of its
    model's trackers a set lookup (another model's, a walk over its modules); one dropped
    unclosed stops counting."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.stats: RangeStats | None = None
        self._counted = RangeStats()
        self._mine: weakref.WeakSet = weakref.WeakSet(self._trackers())
        ranges_module.window_opened(self)

    def _trackers(self) -> list[RangeTracker]:
        return [t for m in fqt_blocks(self.model).values() for t in m.range_trackers.values()]

    def count(self, tracker: RangeTracker, counts: RangeStats) -> None:
        """Add one call's ``counts`` where ``tracker`` is one of the model's (the model's
        trackers are read again for a tracker not known as its: one created, or a module
        attached, since — so a call of another model's tracker costs a walk over this
        model's modules while the window is open)."""
        if tracker not in self._mine:
            self._mine = weakref.WeakSet(self._trackers())
            if tracker not in self._mine:
                return
        self._counted.add_(counts)

    def close(self) -> RangeStats:
        """The window's counters (summed over the model's trackers). Idempotent."""
        if self.stats is None:
            ranges_module.window_closed(self)
            self.stats = self._counted
        return self.stats

    def __enter__(self) -> RangeWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def uncounted_ranges() -> Iterator[None]:
    """The block's tracker calls left out of every open :class:`RangeWindow` (each
    window's counts put back as they were: :func:`lowbit.coverage`'s trace, which leaves
    the trackers as they were too)."""
    saved = [(w, dataclasses.replace(w._counted)) for w in ranges_module.open_windows()]
    try:
        yield
    finally:
        for w, counted in saved:
            w._counted = counted


@contextlib.contextmanager
def frozen_ranges(model: nn.Module) -> Iterator[None]:
    """Predicted ranges predict and count but record no history inside the block (for
    repeated draws of one minibatch, e.g. variance measurements)."""
    layers = list(fqt_blocks(model).values())
    for m in layers:
        m.trackers()  # create the trackers the current config needs
    trackers = [t for m in layers for t in m.range_trackers.values()]
    saved = [t.frozen for t in trackers]
    try:
        for t in trackers:
            t.frozen = True
        yield
    finally:
        for t, f in zip(trackers, saved):
            t.frozen = f


__all__ = ["FQTConv1d", "FQTConv2d", "FQTLinear", "convert", "decline_fused_paths", "describe", "fqt_blocks",
           "fqt_layers", "rescale_ranges",
           "fqt_weight_layers", "frozen_ranges",
           "load_range_state", "load_rng_state", "RangeWindow", "range_state", "range_stats", "reset_ran",
           "restore_ranges", "rng_state", "snapshot_ranges", "uncounted_ranges", "warn_backend_conflicts"]
