"""Hugging Face ``transformers`` models under ``lowbit.convert``.

Imported by ``convert`` only when ``transformers`` is loaded (it is an optional
dependency: ``pip install lowbit[hf]``); ``import lowbit`` never imports it.

* **Conv1D** (GPT-2, GPT, …): ``transformers.pytorch_utils.Conv1D`` holds its weight
  transposed, (in, out), and computes ``y = x @ W + b``. :class:`FQTConv1D` keeps that
  parameter (same object, same ``state_dict`` key and layout) and runs
  ``fqt_linear(x, Wᵀ, b)``: the three GEMMs of a Linear with ``out`` features, the
  weight's per-row scales per output feature.
* **Attention**: transformers' attention modules look their attention function up in
  ``ALL_ATTENTION_FUNCTIONS`` by ``config._attn_implementation``. This module registers
  :func:`lowbit_attention_forward` there (and transformers' SDPA mask builder, made to
  always build the mask: :func:`lowbit_mask`, in ``AttentionMaskInterface``) under the name
  ``"lowbit"``. :func:`prepare` gives every
  attention module of a ``PreTrainedModel`` whose attention lowbit can compute (torch SDPA's
  semantics: no attention sinks, logit softcapping, …; :func:`unsupported_features`) a child
  ``lowbit_attention`` (a :class:`~lowbit.attention_modules.ScaledDotProductAttention`, which
  ``convert`` then swaps for the quantized one, or leaves float where ``module_filter``
  says so); after the swap, the configs whose attention was converted are set to
  ``attn_implementation="lowbit"`` (``PreTrainedModel.set_attn_implementation``), the others
  lose their children and keep their implementation. What stays float (attention lowbit
  cannot compute or route: sinks, softcapping, ``_supports_sdpa = False``, attention computed
  by the model's own matmuls) is listed in the report's ``skipped``. The
  attention-implementation choice is not saved by ``save_pretrained``: the saved model loads
  into the unconverted class as usual.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dis
import functools
import inspect
import math
import re
import textwrap
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PretrainedConfig, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .attention_modules import FQTScaledDotProductAttention, ScaledDotProductAttention
from .config import FQTConfig
from .conversion import SwapRule, rebuild, register_probe, skip_reason
from .functional import fqt_linear
from .nn import _StochasticLayer, check_source

try:  # transformers ≥ 4.53: masks are built per attention implementation
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError:  # pragma: no cover - older transformers build masks for any name
    AttentionMaskInterface = sdpa_mask = None
try:
    from transformers.integrations.sdpa_attention import create_position_bias_mask
except ImportError:  # pragma: no cover - older transformers: no position_bias argument
    create_position_bias_mask = None

IMPLEMENTATION = "lowbit"
CHILD = "lowbit_attention"


class FQTConv1D(Conv1D, _StochasticLayer):
    """``transformers.pytorch_utils.Conv1D`` (``nf`` outputs, ``nx`` inputs, weight (nx,
    nf)) whose three GEMMs run under ``config`` as an ``FQTLinear`` with weight ``Wᵀ``
    would; seed and ``name`` key its noise stream as for ``FQTLinear``."""

    def __init__(self, nf: int, nx: int, *, config: FQTConfig, seed: int | None = None,
                 name: str = "", device: torch.device | str | None = None) -> None:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            super().__init__(nf, nx)
        self._init_quant(config, seed, name)

    @classmethod
    def from_float(cls, mod: Conv1D, config: FQTConfig, seed: int | None = None,
                   name: str = "") -> FQTConv1D:
        """Wrap ``mod``'s parameters (shared, not copied) in an ``FQTConv1D``; ``TypeError``
        if ``mod`` is not a ``transformers`` ``Conv1D``."""
        check_source(cls, mod, Conv1D)
        new = cls(mod.nf, mod.nx, config=config, seed=seed, name=name, device="meta")
        new.weight, new.bias = mod.weight, mod.bias
        return new.train(mod.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.weight.shape[0]:  # named by Conv1D's own weight
            raise RuntimeError(f"FQTConv1D: input of shape {tuple(x.shape)} does not fit a Conv1D "
                               f"weight of shape {tuple(self.weight.shape)} (nx, nf): its last "
                               f"dimension must be {self.weight.shape[0]}")  # fqt_linear named Wᵀ's
        self.ran = True
        return fqt_linear(x, self.weight.t(), self.bias, self._block)  # (*, nx) → (*, nf)

    # the FQTLinear view the variance monitor reads (lowbit.layergrads): weight Wᵀ (nf, nx)
    def linear_weight(self) -> torch.Tensor:
        """``weightᵀ``: the (nf, nx) = (out, in) weight of the ``FQTLinear`` it computes as."""
        return self.weight.t()

    @property
    def in_features(self) -> int:
        return self.nx

    @property
    def out_features(self) -> int:
        return self.nf

    def __repr__(self) -> str:
        return f"FQTConv1D(nf={self.nf}, nx={self.nx}, {self._extra()})"


register_probe(Conv1D, lambda: Conv1D(1, 1))  # built on meta, RNG untouched (register_probe)


def _swap_conv1d(mod: nn.Module, config: FQTConfig, seed: int, name: str) -> nn.Module | str:
    probe = FQTConv1D(1, 1, config=config, seed=0, device="meta")
    reason = skip_reason(mod, None, Conv1D, probe)
    if reason is None and type(mod) is not Conv1D:
        reason = "a parametrized Conv1D: its parametrizations would not be carried"
    if reason is None and mod.bias is None:
        reason = "bias is None (transformers' Conv1D always has one)"
    return reason or rebuild(mod, Conv1D, lambda m: FQTConv1D.from_float(m, config, seed, name))


SWAP_RULES = (SwapRule(Conv1D, FQTConv1D, _swap_conv1d),)


# -- attention ------------------------------------------------------------------------------
# Keyword arguments of transformers' attention-function interface that change what attention
# computes and that lowbit's attention (torch SDPA's semantics, like transformers' "sdpa")
# cannot compute, with what they are. A call passing one (not None) raises; convert keeps
# attention that passes one float (``prepare``).
UNSUPPORTED_KWARGS: dict[str, str] = {
    "softcap": "attention logit softcapping",
    "s_aux": "attention sinks",
    "sinks": "attention sinks",
    "indices": "sparse attention over selected key indices",
    "topk_indices": "sparse attention over selected key indices",
    "block_indices": "block-sparse attention",
    "head_mask": "a head mask on the attention weights",
}

# Keyword arguments transformers passes to every attention function (or that flow to it from
# the model's ``**kwargs``) that lowbit's attention handles or that do not change it, as for
# transformers' own sdpa_attention_forward: the mask builder (transformers' sdpa one, registered
# for "lowbit") already encodes sliding windows and packed sequences (``position_ids``,
# ``cu_seq_lens_*``), and the cache has been applied to key/value. ``output_attentions`` is
# honoured: the attention weights are returned. Any other keyword is ignored as
# ``sdpa_attention_forward`` ignores what it does not name (``token_type_ids`` flowing down
# from a tokenizer's output, say): lowbit computes what "sdpa" computes, and convert keeps
# float the attention of models that do not support "sdpa" (``_supports_sdpa = False``) or
# that pass one of :data:`UNSUPPORTED_KWARGS`. A keyword ``sdpa_attention_forward`` names
# and lowbit's attention does not take (:data:`SDPA_ONLY_KWARGS`, a newer transformers)
# raises: sdpa would honour it.
IGNORED_KWARGS: set[str] = {
    "output_attentions", "output_hidden_states", "output_router_logits", "return_dict",
    "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx",
    "sliding_window", "use_cache", "cache", "cache_position", "past_key_values", "past_key_value",
    "layer_idx", "encoder_hidden_states", "encoder_attention_mask", "position_embeddings",
    "num_items_in_batch", "deterministic",
}
try:  # the kwargs transformers declares as flowing through every model down to attention
    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
    from transformers.utils.generic import TransformersKwargs

    IGNORED_KWARGS |= set(FlashAttentionKwargs.__annotations__) | set(TransformersKwargs.__annotations__)
except ImportError:  # pragma: no cover - older transformers: the list above
    pass
IGNORED_KWARGS -= set(UNSUPPORTED_KWARGS)


def _sdpa_only_kwargs() -> set[str]:
    """The keywords transformers' ``sdpa_attention_forward`` names that
    :func:`lowbit_attention_forward` does not (empty with this transformers)."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:  # pragma: no cover - older transformers
        return set()
    named = {n for n, p in inspect.signature(sdpa_attention_forward).parameters.items()
             if p.kind is not inspect.Parameter.VAR_KEYWORD}
    return named - {"module", "query", "key", "value", "attention_mask", "dropout", "scaling",
                    "is_causal", "position_bias"}


SDPA_ONLY_KWARGS: set[str] = _sdpa_only_kwargs()

try:  # transformers ≥ 5: output_attentions recorded by hooks on the attention modules
    from transformers.utils.output_capturing import _active_collector
except ImportError:  # pragma: no cover - older transformers pass output_attentions down
    _active_collector = None


@functools.cache
def calls_attention_interface(cls: type) -> bool:
    """Does a transformers module class look its attention function up in
    ``ALL_ATTENTION_FUNCTIONS`` (a method referring to it)? Models themselves
    (``PreTrainedModel``, whose machinery refers to it too) do not."""
    if issubclass(cls, PreTrainedModel):
        return False
    return any("ALL_ATTENTION_FUNCTIONS" in code.co_names for code in _codes(cls))


def _library(obj: type | Callable[..., Any]) -> bool:
    """A class or function of Python's, torch's or lowbit's own (never an attention module
    that calls transformers' registry)."""
    return (obj.__module__ or "").split(".")[0] in ("builtins", "abc", "typing", "torch", "lowbit")


def _methods(cls: type) -> list[Any]:
    """The (unwrapped) Python functions ``cls`` has from its classes other than Python's,
    torch's and lowbit's: transformers' own, and a user's or ``trust_remote_code``
    module's (``transformers_modules.…``) built the same way (read only from
    transformers' classes before, such attention stayed float unreported: a review)."""
    fns = (inspect.unwrap(fn) for klass in cls.__mro__ if not _library(klass)
           for fn in vars(klass).values() if callable(fn))
    return [fn for fn in fns if hasattr(fn, "__code__")]


def _codes(cls: type) -> list[Any]:
    """The code objects of :func:`_methods`."""
    return [fn.__code__ for fn in _methods(cls)]


def _constant_names(code: Any) -> set[str]:
    """The strings among the constants of ``code`` and of the code nested in it (the keyword
    names of its calls are among them)."""
    names: set[str] = set()
    for const in code.co_consts:
        if isinstance(const, str):
            names.add(const)
        elif isinstance(const, tuple):
            names.update(c for c in const if isinstance(c, str))
        elif hasattr(const, "co_consts"):
            names |= _constant_names(const)
    return names


@functools.cache
def _feature_kwargs(cls: type) -> tuple[tuple[str, str | None], ...]:
    """The :data:`UNSUPPORTED_KWARGS` that ``cls``'s methods pass by keyword (to its attention
    function), each with the ``self`` attribute it passes (``softcap=self.x`` → ``"x"``) or
    ``None`` for any other expression; a literal ``None`` is left out. Read from the source
    (empty where there is none)."""
    found: list[tuple[str, str | None]] = []
    for code in _codes(cls):
        if not set(UNSUPPORTED_KWARGS) & _constant_names(code):
            continue  # cheap pre-check: the keyword names of its calls are constants
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(code)))
        except (OSError, TypeError, SyntaxError):
            found += [(k, None) for k in UNSUPPORTED_KWARGS if k in str(code.co_consts)]
            continue
        for node in ast.walk(tree):
            for kw in node.keywords if isinstance(node, ast.Call) else ():
                if kw.arg not in UNSUPPORTED_KWARGS:
                    continue
                v = kw.value
                if isinstance(v, ast.Constant) and v.value is None:
                    continue
                attr = v.attr if (isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name)
                                  and v.value.id == "self") else None
                found.append((kw.arg, attr))
    return tuple(dict.fromkeys(found))


_MISSING = object()


def unsupported_features(module: nn.Module) -> list[str]:
    """What attention ``module`` (a transformers module calling ``ALL_ATTENTION_FUNCTIONS``)
    asks of its attention function that lowbit's attention cannot compute, as
    ``"attention sinks (s_aux)"``-style strings: the :data:`UNSUPPORTED_KWARGS` its code
    passes (unless it passes a ``self`` attribute that is ``None`` on ``module``), and
    ``attn_logit_softcapping`` set in its config."""
    out: list[str] = []
    for kw, attr in _feature_kwargs(type(module)):
        if attr is not None and getattr(module, attr, _MISSING) is None:
            continue
        out.append(f"{UNSUPPORTED_KWARGS[kw]} ({kw})")
    cap = getattr(getattr(module, "config", None), "attn_logit_softcapping", None)
    if cap is not None and not any(f.startswith(UNSUPPORTED_KWARGS["softcap"]) for f in out):
        out.append(f"{UNSUPPORTED_KWARGS['softcap']} (config.attn_logit_softcapping={cap})")
    return list(dict.fromkeys(out))


_ATTENTION_NAME = re.compile(r"Attention|Attn")


# names a method computing activation × activation products refers to
_PRODUCT_NAMES = frozenset({"softmax", "matmul", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention"})


def _reaches_product(cls: type, depth: int = 2) -> bool:
    """Whether the code of ``cls``'s methods — their nested functions, and the functions
    of their module they name (``depth`` levels: MPT's remote code keeps a module-level
    ``scaled_multihead_dot_product_attention``) — multiplies activations or normalizes
    scores: an ``@`` (``BINARY_OP`` matmul) or a name in :data:`_PRODUCT_NAMES`."""
    seen: set[int] = set()
    todo = [(fn, depth) for fn in _methods(cls)]
    while todo:
        fn, left = todo.pop()
        codes = [fn.__code__]
        while codes:
            code = codes.pop()
            if id(code) in seen:
                continue
            seen.add(id(code))
            if _PRODUCT_NAMES & set(code.co_names) or any(
                    ins.opname == "BINARY_OP" and ins.argrepr in ("@", "@=") for ins in dis.get_instructions(code)):
                return True
            codes += [c for c in code.co_consts if hasattr(c, "co_code")]
            if left > 0:
                glob = getattr(fn, "__globals__", {})
                todo += [(inspect.unwrap(g), left - 1) for n in code.co_names
                         if inspect.isfunction(g := glob.get(n)) and not _library(g)]
    return False


def _own_attention(cls: type) -> bool:
    """A module class of a Hugging Face model (transformers' own, remote code, a user's;
    not torch's or lowbit's) named like attention (``…Attention…``/``…Attn…``) that does
    not call the attention registry: it computes attention with its own code. A class
    not of transformers is left out where none of the code it reaches multiplies
    activations (:func:`_reaches_product`): a squeeze-and-excitation ``ChannelAttention``
    or a ``PreAttnNorm`` was listed as float attention (a review); a name test alone
    missed ``@`` and helper functions (a second review)."""
    if _library(cls) or issubclass(cls, PreTrainedModel) or _ATTENTION_NAME.search(cls.__name__) is None \
            or calls_attention_interface(cls):
        return False
    return cls.__module__.startswith("transformers.") or _reaches_product(cls)


def _check_kwargs(module: nn.Module, kwargs: dict[str, Any]) -> None:
    bad = [k for k, v in kwargs.items() if v is not None and k not in IGNORED_KWARGS
           and (k in UNSUPPORTED_KWARGS or k in SDPA_ONLY_KWARGS)]
    if not bad:
        return
    what = ", ".join(f"{k} ({UNSUPPORTED_KWARGS.get(k, 'transformers sdpa honours it, lowbit does not yet')})"
                     for k in bad)
    raise ValueError(
        f"lowbit attention cannot honour what {type(module).__name__} passes to its attention "
        f"function: {what}; it computes torch's scaled_dot_product_attention as transformers' "
        "'sdpa' does. Keep this attention float: "
        f"lowbit.convert(..., module_filter=lambda m, name: not name.endswith({CHILD!r})), or, "
        "if an argument does not change attention, add its name to lowbit.hf.IGNORED_KWARGS")


def _weights_requested(kwargs: dict[str, Any]) -> bool:
    """Does the caller want the attention weights: ``output_attentions=True`` passed down, or
    transformers recording the attention modules' outputs (``output_attentions`` of a model
    whose attention weights are captured by hooks)?"""
    if kwargs.get("output_attentions"):
        return True
    collector = None if _active_collector is None else _active_collector.get()
    return bool(collector) and any("attention" in key for key in collector)


def _float_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     mask: torch.Tensor | None, dropout: float, causal: bool, scale: float | None,
                     groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float attention that also returns its weights (transformers' eager computation, with
    torch SDPA's conventions: bool mask True takes part, float mask added, upper-left causal,
    a fully masked row gives zeros): query (B, H, L, E), key/value (B, H_kv, S, E) →
    output (B, H, L, Ev), weights after dropout (B, H, L, S)."""
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    # rows masked whole are 0 (torch's SDPA), their scores set to 0 before the softmax too:
    # softmax of all -inf is NaN, whose backward reached ∇Q/∇K through an additive mask (a review)
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1, dtype=torch.float32).to(query.dtype)
    weights = weights.masked_fill(dead, 0.0)
    if dropout > 0:  # transformers passes 0 outside training
        weights = nn.functional.dropout(weights, p=dropout, training=True)
    return torch.matmul(weights, value), weights


def lowbit_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function interface, computed by ``module.lowbit_attention``:
    the same arguments and conventions as transformers' ``sdpa_attention_forward``
    (query (B, H, L, E), key/value (B, H_kv, S, E); bool or additive mask; causal when
    there is no mask; grouped-query heads) → ``(output (B, L, H, E), weights)``. ``weights``
    is ``None`` unless the caller asks for the attention weights (``output_attentions``):
    then (B, H, L, S), after dropout, as transformers' eager attention returns them
    (from the quantized product under a low-bit recipe, computed in float otherwise).

    Raises ``RuntimeError`` if ``module`` has no ``lowbit_attention`` child (the model was
    switched to ``attn_implementation="lowbit"`` without ``lowbit.convert``) and
    ``ValueError`` for a keyword argument (not None) it cannot honour (attention sinks,
    softcapping, …: :data:`UNSUPPORTED_KWARGS`; one transformers' sdpa names and lowbit does
    not take: :data:`SDPA_ONLY_KWARGS`); other keywords are ignored, as sdpa ignores them."""
    block = module._modules.get(CHILD)
    if block is None:
        raise RuntimeError(f"attn_implementation={IMPLEMENTATION!r} reached a "
                           f"{type(module).__name__} without a {CHILD!r} child: run lowbit.convert "
                           "on the PreTrainedModel (it adds one to every attention module it converts); "
                           "for a float model built from a converted model's config, build it from a "
                           "copy set back to torch's attention: c = copy.deepcopy(config); "
                           "c._attn_implementation = 'sdpa' (not the config itself: it is shared, and "
                           "switching it switches the converted model's attention to float too)")
    _check_kwargs(module, kwargs)
    need_weights = _weights_requested(kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len = query.shape[2]
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_len and not need_weights:  # prefill of a longer static cache, as sdpa does
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = None if position_bias is None else position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        causal = False
    weights = None
    if not need_weights:
        out = block(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal,
                    scale=scaling, enable_gqa=groups > 1)
    elif isinstance(block, FQTScaledDotProductAttention) and not block.config.is_fp:
        out, weights = block.attend(query, key, value, attention_mask, dropout, causal, scaling,
                                    groups > 1, need_weights=True)
    else:  # float attention (left float by the filter, or the fp recipe): eager's computation
        if isinstance(block, FQTScaledDotProductAttention):
            block.ran = True
        out, weights = _float_attention(query, key, value, attention_mask, dropout, causal, scaling, groups)
    return out.transpose(1, 2).contiguous(), weights


def lowbit_mask(*args: Any, **kwargs: Any) -> Any:
    """transformers' SDPA mask builder, always building the mask: sdpa's may return ``None``
    and leave causality to ``is_causal``, which only holds while queries and keys end
    together — transformers guards the cases that break it (queries dropped before
    KV-shared layers, ``logits_to_keep > 1``, a static cache's prefill) only for the name
    ``"sdpa"`` (Gemma 4), so under ``"lowbit"`` they gave wrong logits."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register(IMPLEMENTATION, lowbit_attention_forward)
if AttentionMaskInterface is not None:
    AttentionMaskInterface.register(IMPLEMENTATION, lowbit_mask)


def _implementation(config: Any) -> str | None:
    return getattr(config, "_attn_implementation", None)


def _own_configs(model: nn.Module) -> dict[int, PretrainedConfig]:
    """Give ``model``'s modules their own copies of the transformers configs they hold
    (``module.config``), so that switching the attention implementation changes no other
    model: transformers shares one config object between models built from it
    (``GPT2LMHeadModel(conf)`` twice, ``from_config(model.config)``). One deep copy with a
    shared memo: modules that shared a config (or a composite config's sub-config) still
    share its copy. Returns ``id(old config) → copy``."""
    memo: dict[int, Any] = {}
    held = [m for m in model.modules() if isinstance(m.__dict__.get("config"), PretrainedConfig)]
    for m in held:
        copy.deepcopy(m.__dict__["config"], memo)
    for m in held:
        m.__dict__["config"] = memo[id(m.__dict__["config"])]
    return {k: v for k, v in memo.items() if isinstance(v, PretrainedConfig)}


def prepare(model: nn.Module) -> Callable[[nn.Module], dict[str, str]]:
    """Give each attention module under a ``PreTrainedModel`` in ``model`` that lowbit's
    attention can compute a float ``lowbit_attention`` child (for ``convert`` to swap), and
    return the step ``convert`` runs afterwards (``finish``), which returns what stays float,
    name → reason.

    Attention is routed per configuration (transformers picks the attention function by
    ``config._attn_implementation``; the attention modules sharing a config form a group).
    A group stays as it is, float, without children, and is listed, when one of its modules
    asks for what lowbit's attention (torch SDPA's semantics) cannot compute
    (:func:`unsupported_features`: attention sinks, logit softcapping, …) or its model says
    it cannot run SDPA (``_supports_sdpa = False``). Attention modules with no
    ``PreTrainedModel`` above them (``convert`` on a part of a model) cannot be switched,
    and transformers modules named like attention that compute it with their own code
    (DeBERTa-v2, XLNet, …: never calling ``ALL_ATTENTION_FUNCTIONS``) cannot be routed:
    both are listed too.

    ``finish`` switches to ``attn_implementation="lowbit"`` the groups in which ``convert``
    made at least one child an ``FQTScaledDotProductAttention`` (the others of the group keep
    a float child: torch's SDPA); in groups where none was converted (``module_filter``) it
    removes the children and leaves the implementation as it was."""
    owners: dict[str, PreTrainedModel] = {}
    skipped: dict[str, str] = {}
    groups: dict[int, dict[str, nn.Module]] = {}  # id(config) → attention modules by name
    configs: dict[int, Any] = {}
    reasons: dict[int, str] = {}  # id(config) → the first module that must stay float
    own: dict[str, str] = {}  # module name → why it must stay float
    registry_names: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel):
            owners.setdefault(name, m)
        if not calls_attention_interface(type(m)):
            continue
        registry_names.append(name)
        above = [o for o in owners if o == "" or name.startswith(o + ".")]
        if not above:
            skipped[name] = ("transformers picks this module's attention by the config of its "
                             "PreTrainedModel, which is not in the converted module: convert "
                             "the PreTrainedModel")
            continue
        owner = owners[above[-1]]  # the innermost
        config = getattr(m, "config", None)
        config = config if _implementation(config) is not None else owner.config
        key = id(config)
        groups.setdefault(key, {})[name] = m
        configs[key] = config
        features = unsupported_features(m)
        impl = _implementation(config)
        if features:
            own[name] = (f"{type(m).__name__} asks its attention function for {', '.join(features)}, "
                         "which lowbit's attention (torch SDPA's semantics) cannot compute: it "
                         f"stays float ({impl!r} attention)")
            reasons.setdefault(key, name)
        elif not getattr(type(owner), "_supports_sdpa", True):
            own[name] = (f"{type(owner).__name__} does not support torch's scaled_dot_product_"
                         "attention (_supports_sdpa = False), whose semantics lowbit's attention "
                         f"has: it stays float ({impl!r} attention)")
            reasons.setdefault(key, name)
    for key, mods in groups.items():
        if key in reasons:
            for name, m in mods.items():
                skipped[name] = own.get(name) or (
                    f"shares its config with {reasons[key]}, which stays float "
                    f"({own[reasons[key]]}); transformers picks one attention function per config")
                if isinstance(m._modules.get(CHILD), ScaledDotProductAttention):
                    del m._modules[CHILD]  # added by an earlier convert
        else:
            for m in mods.values():
                if CHILD not in m._modules:
                    m.add_module(CHILD, ScaledDotProductAttention())
    # attention-named transformers modules that compute attention themselves: innermost ones,
    # not part of (or around) a module using the registry or a torch/lowbit attention module
    routed = [n for n, m in model.named_modules()
              if n in registry_names or isinstance(m, (nn.MultiheadAttention, ScaledDotProductAttention))]
    # (a user's class only in a Hugging Face model: elsewhere no registry is expected)
    selfmade = [n for n, m in model.named_modules() if _own_attention(type(m))
                and (owners or type(m).__module__.startswith("transformers."))]

    def related(a: str, b: str) -> bool:  # one contains the other
        return a == b or a == "" or b == "" or a.startswith(b + ".") or b.startswith(a + ".")

    for name in selfmade:
        if any(related(name, r) for r in routed):
            continue
        if any(o != name and o.startswith(name + "." if name else "") for o in selfmade):
            continue  # an attention-named module inside it is listed instead
        cls = type(model.get_submodule(name)).__name__
        skipped[name] = (f"{cls} computes attention with its own code, not through transformers' "
                         "attention interface (ALL_ATTENTION_FUNCTIONS): lowbit cannot route it, "
                         "its attention products stay float (its Linear layers are converted)")
    own_code = [n for n in skipped if n in selfmade]  # such modules, listed

    def finish(model: nn.Module) -> dict[str, str]:
        switch: set[int] = set()
        for key, mods in groups.items():
            if key in reasons:
                continue
            if any(isinstance(m._modules.get(CHILD), FQTScaledDotProductAttention) for m in mods.values()):
                switch.add(key)
            else:  # nothing converted here (module_filter): leave attention as it was
                for m in mods.values():
                    if CHILD in m._modules:
                        del m._modules[CHILD]
        for key in switch:  # unpickled alone (torch.load of the whole model), they import
            for m in groups[key].values():  # lowbit.hf, which registers "lowbit" again
                if isinstance(m._modules.get(CHILD), FQTScaledDotProductAttention):
                    m._modules[CHILD].hf_attention = True
        def leave_float(key: int, why: str) -> None:  # the group's lowbit children out, said so
            for name, m in groups[key].items():
                m._modules.pop(CHILD, None)
                skipped[name] = why

        if switch and own_code:  # switching would hand that code lowbit's mask format (bool where
            # eager's was additive: a user's attention stopped being causal, a review): none switch
            for key in switch:
                leave_float(key, f"the model also computes attention with its own code ({own_code[0]}), to "
                                 "which switching transformers' attention implementation would hand lowbit's "
                                 "mask format: this attention stays float")
            return skipped
        if switch:  # a config object may be shared (a twin model, a teacher): switch copies
            copies = _own_configs(model)
            configs.update({key: copies.get(id(c), c) for key, c in configs.items()})
        before = {key: _implementation(config) for key, config in configs.items()}
        done: set[int] = set()
        for name, m in owners.items():  # outermost first: it sets its submodels too
            under = {k for k, mods in groups.items()
                     if any(name == "" or n.startswith(name + ".") for n in mods)} - done
            if not under or not under <= switch:
                continue
            if any(_implementation(configs[k]) != IMPLEMENTATION for k in under):
                m.set_attn_implementation(IMPLEMENTATION)
            done |= under
        for key in switch - done:  # beside attention that stays: only this config
            owner = next((o for o in reversed(owners.values()) if o.config is configs[key]), None)
            if owner is not None:
                owner.set_attn_implementation({"": IMPLEMENTATION})
        for key, config in configs.items():
            if key not in switch and _implementation(config) != before[key]:
                config._attn_implementation_internal = before[key]  # switched along: restore
            elif key in switch and _implementation(config) != IMPLEMENTATION:
                # transformers' set_attn_implementation declines, with a log line only, where it
                # cannot read the model's source (a class defined in a notebook) or its file holds
                # another attention class; these modules were read to call the attention interface
                # (calls_attention_interface): set it as the restore above does (a review found
                # them reported converted while they ran float; a model with own-code attention
                # never gets here: above)
                config._attn_implementation_internal = IMPLEMENTATION
                if _implementation(config) == IMPLEMENTATION:
                    continue
                leave_float(key, f"{type(model).__name__} does not let transformers switch this attention's "
                                 "implementation: it stays float")  # still not switched
        return skipped

    return finish


__all__ = ["CHILD", "FQTConv1D", "IGNORED_KWARGS", "IMPLEMENTATION", "SDPA_ONLY_KWARGS", "SWAP_RULES", "UNSUPPORTED_KWARGS",
           "calls_attention_interface", "lowbit_attention_forward", "prepare", "unsupported_features"]
