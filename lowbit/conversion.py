"""What :func:`lowbit.convert` may swap without changing the model, and its report.

``convert`` replaces an ``nn.Linear`` / ``nn.Conv2d`` by an FQT layer that holds the same
parameters and runs the same GEMM with quantized operands. That is faithful only when the
module computes, owns and is hooked to nothing beyond what the plain class defines, and
when the module is actually *called* by its parent. :func:`skip_reason` checks exactly
that and names what would be lost; :func:`rebuild` moves what can be carried over
(``torch.nn.utils.parametrize`` parametrizations, plain attributes); and
:func:`disable_fused_fastpath` makes the parents that would bypass converted children
(PyTorch's fused transformer inference path) call them instead. Modules left alone are
listed in a :class:`ConversionReport` and in a :class:`ConversionWarning`.

:func:`quote_module` is how every message of lowbit's names a module: quoted, ``<root>``
for the model itself.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.utils import parametrize

from .formats import SUPPORTED_DTYPES

if TYPE_CHECKING:
    from .config import FQTConfig

# (attribute of nn.Module, what the reason calls it): every per-module hook registry
_HOOKS = (
    ("_forward_pre_hooks", "forward pre-hooks"),
    ("_forward_hooks", "forward hooks"),
    ("_backward_pre_hooks", "backward pre-hooks"),
    ("_backward_hooks", "backward hooks"),
    ("_state_dict_pre_hooks", "state_dict pre-hooks"),
    ("_state_dict_hooks", "state_dict hooks"),
    ("_load_state_dict_pre_hooks", "load_state_dict pre-hooks"),
    ("_load_state_dict_post_hooks", "load_state_dict post-hooks"),
)

# load_state_dict pre-hooks registered without the module (``with_module=False``) see
# only the state dict: they are carried to the replacement (weight_norm's key-renaming
# hook for checkpoints of the old weight_g/weight_v format is one).
_CARRIED = "_load_state_dict_pre_hooks"


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (FSDP2's ``fully_shard``, tensor parallelism): looked
    up where it is defined — ``torch.distributed.tensor`` (torch ≥ 2.5) or
    ``torch.distributed._tensor`` (2.4, whose ``torch.distributed.tensor`` is empty) —
    without importing anything (no DTensor exists before its module is loaded)."""
    for module in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(module), "DTensor", None)
        if isinstance(cls, type) and isinstance(t, cls):
            return True
    return False


def sharded_reason(*modules: nn.Module) -> str | None:
    """Why a module whose parameters are DTensors cannot be swapped, or ``None``: FSDP2
    sharded it from a module above (the layer keeps its class, with FSDP's load_state_dict
    post-hooks, which a new user's trial was told of instead), or tensor parallelism
    distributed it."""
    if any(is_dtensor(p) for m in modules for p in m._parameters.values()):
        return ("its parameters are DTensors, sharded by fully_shard (FSDP2) on a module above it "
                "or distributed by tensor parallelism: convert the model with lowbit.convert before "
                "fully_shard / parallelize_module")
    return None


def _module_free(module: nn.Module) -> bool:
    return all(getattr(h, "with_module", True) is False for h in getattr(module, _CARRIED).values())


MHA_REASON = ("child of nn.MultiheadAttention: its forward reads this layer's weight "
              "directly (F.multi_head_attention_forward) and never calls it, so a "
              "converted layer would not run")
OUT_PROJ_REASON = ("an nn.MultiheadAttention's out_proj (NonDynamicallyQuantizableLinear) converted on "
                   "its own: that attention reads its weight directly and never calls it, so a "
                   "converted layer would not run; convert the attention module or the model "
                   "holding it (its out_proj then converts with it)")
LAZY_REASON = ("lazy module with uninitialized parameters: run one forward pass to "
               "materialize it, then convert")


ROOT = "<root>"  # the model itself (fully qualified name "") in lowbit's messages


def quote_module(name: str) -> str:
    """A module's fully qualified name (``named_modules()``'s) as lowbit's messages, report
    texts and tables print it: quoted (``'2'``, ``'blocks.0.attn'``), so that an
    ``nn.Sequential`` index cannot read as a count ("in 2"), and :data:`ROOT` (``<root>``,
    unquoted: not a name) for the model itself, whose name ``""`` would print as nothing.
    Machine-readable outputs (report fields, dict keys, JSON) keep the bare names."""
    return repr(name) if name else ROOT


class ConversionWarning(UserWarning):
    """``convert`` left a Linear/Conv2d alone because it could not swap it faithfully."""


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """What one :func:`lowbit.convert` call did.

    * ``converted``: fully qualified names of the layers that are FQT layers under the
      new config after the call (newly swapped or already converted), in module order
      (``""`` is the root module itself).
    * ``skipped``: Linear/Conv2d modules selected by the filter but left alone, name →
      reason (what a swap would have lost or bypassed).
    * ``excluded``: names the ``module_filter`` turned down.
    * ``fastpath_disabled``: ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder``
      modules whose fused inference path is turned off because it would bypass
      converted ``linear1``/``linear2``/``self_attn`` (see :func:`disable_fused_fastpath`).
    """

    converted: tuple[str, ...]
    skipped: Mapping[str, str]
    excluded: tuple[str, ...]
    fastpath_disabled: tuple[str, ...]

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} layers, skipped {len(self.skipped)}, "
                 f"excluded by the filter {len(self.excluded)}"]
        lines += [f"  skipped {quote_module(name)}: {why}" for name, why in self.skipped.items()]
        lines += [f"  fused fast path off: {quote_module(name)}" for name in self.fastpath_disabled]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class SwapRule:
    """One more kind of module ``convert`` swaps, beyond ``nn.Linear``/``nn.Conv2d``
    (attention: :mod:`lowbit.attention_modules`; Hugging Face: :mod:`lowbit.hf`).

    A module that is an instance of ``fqt`` is already converted: it only takes the new
    config. Otherwise an instance of ``plain`` is replaced by ``swap(module, config, seed,
    name)``, which returns the replacement (sharing the parameters) or the reason it
    cannot be made faithfully (then the module is left alone and reported). ``internal``
    names children of ``fqt`` modules that belong to them (their own GEMM blocks), which
    ``convert`` does not visit."""

    plain: type[nn.Module]
    fqt: type[nn.Module]
    swap: Callable[[nn.Module, FQTConfig, int, str], nn.Module | str]
    internal: tuple[str, ...] = ()


def hooks_reason(module: nn.Module) -> str | None:
    """Why hooks on ``module`` prevent a swap (they would not be carried), or ``None``:
    load_state_dict pre-hooks that never see the module are carried by :func:`rebuild`."""
    hooks = [label for attr, label in _HOOKS
             if getattr(module, attr, None) and not (attr == _CARRIED and _module_free(module))]
    return f"has {', '.join(hooks)}: the converted layer would not carry them" if hooks else None


_MHA_PARAMS = frozenset({"in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                         "in_proj_bias", "bias_k", "bias_v"})


def reads_out_proj(module: nn.Module | None) -> bool:
    """A float ``nn.MultiheadAttention`` (not lowbit's, which sets ``calls_out_proj``): its
    forward reads ``out_proj.weight`` and never calls ``out_proj``."""
    return isinstance(module, nn.MultiheadAttention) and not getattr(module, "calls_out_proj", False)


def mha_reason(module: nn.Module) -> str | None:
    """Why an ``nn.MultiheadAttention`` cannot become an ``FQTMultiheadAttention`` that
    computes the same thing, or ``None``: it must be exactly that class, without hooks or
    parameters, buffers or children beyond the standard ones, and its ``out_proj`` (which
    the converted module calls, where the float one reads its weight) a plain Linear
    without hooks, since they would start to fire."""
    cls = type(module)
    if cls is not nn.MultiheadAttention:
        return (f"{cls.__qualname__} is a subclass of nn.MultiheadAttention: its own forward, "
                "parameters or state would be lost")
    extra = sorted(set(module._parameters) - _MHA_PARAMS)
    if extra or module._buffers or set(module._modules) != {"out_proj"}:
        owned = extra or sorted(module._buffers) or sorted(set(module._modules) - {"out_proj"})
        return f"owns more than nn.MultiheadAttention defines: {owned}"
    out = module.out_proj
    sharded = sharded_reason(module, out) if isinstance(out, nn.Module) else None
    if sharded:
        return sharded
    if type(out) not in (nn.Linear, NonDynamicallyQuantizableLinear) or hooks_reason(out):
        return ("its out_proj is not a plain Linear without hooks (the converted module calls "
                "out_proj, the float one never does)")
    return hooks_reason(module)


# classes that are their base in all but name (NonDynamicallyQuantizableLinear only keeps
# torch's dynamic quantization away from nn.MultiheadAttention.out_proj)
_SAME_AS = {nn.Linear: (NonDynamicallyQuantizableLinear,)}
_PROBES: dict[type[nn.Module], Callable[[], nn.Module]] = {
    nn.Linear: lambda: nn.Linear(1, 1, device="meta"),
    nn.Conv2d: lambda: nn.Conv2d(1, 1, 1, device="meta"),
    nn.Conv1d: lambda: nn.Conv1d(1, 1, 1, device="meta"),
}


def register_probe(base: type[nn.Module], make: Callable[[], nn.Module]) -> None:
    """How to build a small plain ``base`` (for :func:`skip_reason`'s attribute check).
    ``make`` runs once, on first use, under ``torch.device("meta")`` and with the random
    number generators forked: a probe whose ``__init__`` initializes its weights
    (transformers' ``Conv1D`` draws from ``torch.normal``) leaves the caller's random
    stream where it was (a review: the first ``convert`` of a GPT-2 in a process moved it,
    so two seeded runs in one process differed)."""
    _PROBES[base] = make
    _plain_keys.cache_clear()


@functools.cache
def _plain_keys(base: type[nn.Module]) -> frozenset[str]:
    """Instance attributes every plain ``base`` module has (hook registries, sizes, …)."""
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        return frozenset(_PROBES[base]().__dict__)


def _parametrized_names(module: nn.Module) -> frozenset[str]:
    return frozenset(module.parametrizations) if parametrize.is_parametrized(module) else frozenset()


def skip_reason(module: nn.Module, parent: nn.Module | None, base: type[nn.Module],
                replacement: nn.Module) -> str | None:
    """Why ``module`` (an instance of ``base``: ``nn.Linear`` or ``nn.Conv2d``, child of
    ``parent``) cannot be replaced faithfully by a layer like ``replacement`` (an
    instance of the FQT class, e.g. on the meta device), or ``None`` if it can.

    Faithful means: its class is exactly ``base`` (or ``base`` with
    ``torch.nn.utils.parametrize`` parametrizations, which :func:`rebuild` carries over),
    its parameters are initialized plain ``nn.Parameter``s named ``weight``/``bias`` of a
    dtype lowbit quantizes (:data:`~lowbit.formats.SUPPORTED_DTYPES`; not complex), it
    owns no other parameters, buffers or submodules, carries no module hooks (except
    load_state_dict pre-hooks that never see the module, which are carried), has no
    instance attribute that ``replacement`` defines itself (e.g. an instance ``forward``),
    and its parent calls it (``nn.MultiheadAttention`` reads ``out_proj.weight`` instead;
    lowbit's ``FQTMultiheadAttention`` calls it). ``nn.MultiheadAttention``'s
    ``NonDynamicallyQuantizableLinear`` counts as a plain ``nn.Linear``, except converted
    on its own (no parent): it exists only as that attention's ``out_proj``.
    """
    if reads_out_proj(parent):
        return MHA_REASON
    if parent is None and type(module) is NonDynamicallyQuantizableLinear:  # convert(mha.out_proj)
        return OUT_PROJ_REASON
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return LAZY_REASON
    cls = type(module)
    params = _parametrized_names(module)
    if not (cls is base or cls in _SAME_AS.get(base, ()) or (params and cls.__bases__ == (base,))):
        if cls.__name__.startswith("FSDP"):  # torch's fully_shard made it: too late to convert
            return (f"{cls.__qualname__} is a module fully_shard (FSDP2) has already sharded: convert "
                    f"the model with lowbit.convert before fully_shard")
        where = "nn." if base.__module__.startswith("torch.") else f"{base.__module__}."
        return (f"{cls.__qualname__} is a subclass of {where}{base.__name__}: its own forward, "
                f"parameters or state would be lost")
    sharded = sharded_reason(module)  # (before the hooks, which FSDP2 registers)
    if sharded:
        return sharded
    hooks = hooks_reason(module)
    if hooks:
        return hooks
    extra = sorted(set(module._parameters) - {"weight", "bias"})
    if extra:
        return f"owns extra parameters {extra}"
    if "weight" not in params and not isinstance(module._parameters.get("weight"), nn.Parameter):
        return "weight is not a registered nn.Parameter"
    for name in ("weight", "bias"):
        p = module._parameters.get(name)
        if p is not None and type(p) is not nn.Parameter:
            return f"{name} is a {type(p).__name__}, not a plain nn.Parameter"
        if p is not None and p.dtype not in SUPPORTED_DTYPES:
            why = " (a complex operand would lose its imaginary part)" if p.is_complex() else ""
            return (f"{name} has dtype {p.dtype}: lowbit's layers compute in "
                    f"{', '.join(str(d).removeprefix('torch.') for d in SUPPORTED_DTYPES)} only{why}")
    if module._buffers:
        return f"owns buffers {sorted(module._buffers)}"
    children = sorted(set(module._modules) - ({"parametrizations"} if params else set()))
    if children:
        return f"owns submodules {children}"
    clash = sorted(k for k in set(module.__dict__) - _plain_keys(base) if hasattr(replacement, k))
    if "_compiled_call_impl" in clash:  # Module.compile(): its compiled call is the float layer's
        return ("this layer was compiled with Module.compile() (its compiled call runs the float "
                "layer): convert the model before compiling it")
    if clash:
        return (f"instance attributes {clash} would clash with "
                f"{type(replacement).__name__}'s own")
    return None


class _Placeholder(nn.Module):
    """Registered only to create a parametrized class; replaced at once by the
    original module's parametrizations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _meta_twin(module: nn.Module, base: type[nn.Module], names: frozenset[str]) -> nn.Module:
    """A plain ``base`` on the meta device with ``module``'s hyperparameters, built
    without reading a parametrized tensor (reading one can run the parametrization,
    e.g. a power iteration of spectral norm that updates its buffers)."""
    has_bias = "bias" in names or module._parameters.get("bias") is not None
    if base is nn.Linear:
        twin = nn.Linear(module.in_features, module.out_features, bias=has_bias, device="meta")
    else:
        twin = base(module.in_channels, module.out_channels, module.kernel_size,
                         stride=module.stride, padding=module.padding, dilation=module.dilation,
                         groups=module.groups, bias=has_bias, padding_mode=module.padding_mode,
                         device="meta")
    return twin.train(module.training)


def rebuild(module: nn.Module, base: type[nn.Module],
            make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    """The replacement of ``module`` (which passed :func:`skip_reason`): ``make`` builds
    it from a plain ``base`` sharing the parameters (``from_float``), then the
    parametrizations (the same ``ParametrizationList`` objects: same parameters, same
    buffers, same ``state_dict`` keys) and the plain instance attributes are carried over.
    A parametrized weight is then computed through its parametrization on every forward,
    exactly as in ``module``."""
    names = _parametrized_names(module)
    extras = {k: v for k, v in module.__dict__.items() if k not in _plain_keys(base)}
    if not names:
        new = make(module)
    else:
        new = make(_meta_twin(module, base, names))
        for name in ("weight", "bias"):
            if name in names:
                parametrize.register_parametrization(new, name, _Placeholder(), unsafe=True)
            else:
                setattr(new, name, module._parameters.get(name))
        new.parametrizations = module.parametrizations
    new.__dict__.update(extras)
    carried = getattr(module, _CARRIED)
    if carried:  # module-free by skip_reason; share the dict so that handles still remove
        if getattr(new, _CARRIED):
            getattr(new, _CARRIED).update(carried)
        else:
            setattr(new, _CARRIED, carried)
    return new


def disable_fused_fastpath(model: nn.Module, converted: Callable[[nn.Module], bool]) -> tuple[str, ...]:
    """Turn off PyTorch's fused transformer inference path wherever it would bypass a
    converted layer; return the names of the modules changed or already off for it.

    In ``eval()`` under ``no_grad``, ``nn.TransformerEncoderLayer.forward`` may call
    ``torch._transformer_encoder_layer_fwd``, which reads ``linear1.weight``,
    ``linear2.weight`` and the attention's weights directly and never calls ``linear1``,
    ``linear2`` or ``self_attn``: converted layers
    there would silently not run. The unfused path is PyTorch's reference definition of
    the same layer (the fused one must match it), so turning the fused one off changes
    which kernels compute the float parts, and makes the converted layers run in every
    mode. One output changes visibly: with a ``src_key_padding_mask`` in ``eval()`` the
    nested-tensor path returns 0 at padded positions, the regular path (PyTorch's own in
    ``train()``) values computed from the padded tokens; unpadded positions agree. ``torch.backends.mha.set_fastpath_enabled(False)`` would do it for every
    model in the process, so instead the per-module flags that these modules compute at
    construction to decide whether the fused path applies are set to "does not apply":
    ``activation_relu_or_gelu = 0`` on the encoder layer (the unfused path calls
    ``self.activation`` and never reads the flag) and ``use_nested_tensor = False`` on an
    ``nn.TransformerEncoder`` holding such a layer (its nested-tensor path hands padded
    batches to the fused layers).
    """
    names: list[str] = []
    off: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoderLayer) and any(
                converted(c) for c in (m.linear1, m.linear2, m.self_attn)):
            m.activation_relu_or_gelu = 0
            off.add(id(m))
            names.append(name)
    for name, m in model.named_modules():
        if isinstance(m, nn.TransformerEncoder) and any(id(layer) in off for layer in m.layers):
            m.use_nested_tensor = False
            names.append(name)
    return tuple(names)


__all__ = ["ROOT", "ConversionReport", "ConversionWarning", "SwapRule", "disable_fused_fastpath",
           "hooks_reason", "mha_reason", "quote_module", "rebuild", "register_probe", "skip_reason"]
