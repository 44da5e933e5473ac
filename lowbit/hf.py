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
  :func:`lowbit_attention_forward` there (and transformers' SDPA mask builder in
  ``AttentionMaskInterface``) under the name ``"lowbit"``. :func:`prepare` gives every
  attention module of a ``PreTrainedModel`` a child ``lowbit_attention`` (a
  :class:`~lowbit.attention_modules.ScaledDotProductAttention`, which ``convert`` then
  swaps for the quantized one, or leaves float where ``module_filter`` says so), and after
  the swap the model is set to ``attn_implementation="lowbit"``
  (``PreTrainedModel.set_attn_implementation``). The attention-implementation choice is not
  saved by ``save_pretrained``: the saved model loads into the unconverted class as usual.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from .attention_modules import ScaledDotProductAttention
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


register_probe(Conv1D, lambda: Conv1D(1, 1))


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
@functools.cache
def calls_attention_interface(cls: type) -> bool:
    """Does a transformers module class look its attention function up in
    ``ALL_ATTENTION_FUNCTIONS`` (a method referring to it)? Models themselves
    (``PreTrainedModel``, whose machinery refers to it too) do not."""
    if issubclass(cls, PreTrainedModel):
        return False
    for klass in cls.__mro__:
        if not klass.__module__.startswith("transformers."):
            continue
        for fn in vars(klass).values():
            code = getattr(inspect.unwrap(fn) if callable(fn) else None, "__code__", None)
            if code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names:
                return True
    return False


def lowbit_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None,
                             dropout: float = 0.0, scaling: float | None = None,
                             is_causal: bool | None = None, position_bias: torch.Tensor | None = None,
                             **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface, computed by ``module.lowbit_attention``:
    the same arguments and conventions as transformers' ``sdpa_attention_forward``
    (query (B, H, L, E), key/value (B, H_kv, S, E); bool or additive mask; causal when
    there is no mask; grouped-query heads) → ``(output (B, L, H, E), None)``."""
    block = module._modules.get(CHILD)
    if block is None:
        raise RuntimeError(f"attn_implementation={IMPLEMENTATION!r} reached a "
                           f"{type(module).__name__} without a {CHILD!r} child: run lowbit.convert "
                           "on the PreTrainedModel (it adds one to every attention module it finds)")
    if kwargs.get("softcap") is not None:
        raise ValueError("lowbit attention does not support softcap (nor does transformers' sdpa)")
    groups = getattr(module, "num_key_value_groups", 1)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_len = query.shape[2]
    causal = bool(q_len > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_len:  # prefill of a longer static cache, as sdpa does
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = None if position_bias is None else position_bias[..., :q_len]
    if position_bias is not None:
        attention_mask = create_position_bias_mask(position_bias, attention_mask, causal, query, key)
        causal = False
    out = block(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=causal,
                scale=scaling, enable_gqa=groups > 1)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(IMPLEMENTATION, lowbit_attention_forward)
if AttentionMaskInterface is not None:
    AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


def prepare(model: nn.Module) -> Callable[[nn.Module], dict[str, str]]:
    """Give each attention module under a ``PreTrainedModel`` in ``model`` a float
    ``lowbit_attention`` child (for ``convert`` to swap), and return the step ``convert``
    runs afterwards: switch those models to ``attn_implementation="lowbit"``. Attention
    modules with no ``PreTrainedModel`` above them in ``model`` (``convert`` on a part of a
    model) cannot be switched: they are returned as skipped, name → reason."""
    owners: dict[str, PreTrainedModel] = {}
    skipped: dict[str, str] = {}
    for name, m in model.named_modules():
        if isinstance(m, PreTrainedModel):
            owners.setdefault(name, m)
        if not calls_attention_interface(type(m)):
            continue
        owner = next((o for o in owners if o == "" or name.startswith(o + ".")), None)
        if owner is None:
            skipped[name] = ("transformers picks this module's attention by the config of its "
                             "PreTrainedModel, which is not in the converted module: convert "
                             "the PreTrainedModel")
        elif CHILD not in m._modules:
            m.add_module(CHILD, ScaledDotProductAttention())

    def finish(model: nn.Module) -> dict[str, str]:
        for name, m in model.named_modules():  # outermost first: it sets its submodels too
            if not isinstance(m, PreTrainedModel) or not any(
                    CHILD in sub._modules for sub in m.modules()):
                continue
            if m.config._attn_implementation != IMPLEMENTATION:
                m.set_attn_implementation(IMPLEMENTATION)
            if m.config._attn_implementation != IMPLEMENTATION:
                skipped[name] = (f"{type(m).__name__} does not let transformers switch its "
                                 "attention implementation: its attention stays float")
        return skipped

    return finish


__all__ = ["CHILD", "FQTConv1D", "IMPLEMENTATION", "SWAP_RULES", "calls_attention_interface",
           "lowbit_attention_forward", "prepare"]
