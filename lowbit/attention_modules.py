"""Attention modules whose GEMMs run low-bit, and how ``lowbit.convert`` swaps them in.

* :class:`ScaledDotProductAttention` is ``F.scaled_dot_product_attention`` as a module:
  the place in a model where ``convert`` can put quantized attention (TinyGPT calls its
  attention through one; the Hugging Face integration adds one to every attention module,
  :mod:`lowbit.hf`). :class:`FQTScaledDotProductAttention` runs
  :func:`lowbit.functional.scaled_dot_product_attention` under its recipe and noise stream.
* :class:`FQTMultiheadAttention` is ``nn.MultiheadAttention`` with every GEMM low-bit: the
  in-projection (``fqt_linear`` on ``in_proj_weight`` or ``q/k/v_proj_weight``), both
  attention products, and ``out_proj``, which it calls (``nn.MultiheadAttention`` reads
  its weight instead), so ``convert`` swaps ``out_proj`` for an ``FQTLinear``. It keeps
  the float module's parameters (same objects, same ``state_dict`` keys); the noise
  streams live in parameter-free child blocks (``projections.*``, ``attention``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, dynamic_grads
from .attention_args import autocast_on
from .config import FQTConfig
from .conversion import SwapRule, hooks_reason, mha_reason, reads_out_proj
from .formats import check_dense
from .functional import fqt_linear
from .nn import FQTLinear, _StochasticLayer, check_source


def _child(name: str, sub: str) -> str:
    return f"{name}.{sub}" if name else sub


def _nan_where(dead: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """NaN where ``dead``, 1 elsewhere, in ``like``'s dtype: a factor whose product writes
    NaN into those rows and keeps their gradient path (``masked_fill`` would cut it)."""
    return torch.where(dead, float("nan"), 1.0).to(like.dtype)

class ScaledDotProductAttention(nn.Module):
    """``F.scaled_dot_product_attention`` as a module (no parameters): call attention
    through one, and ``lowbit.convert`` makes it low-bit. Same arguments as the function."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        kw = {"enable_gqa": True} if enable_gqa else {}  # the argument exists from torch 2.5
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, **kw)


class FQTScaledDotProductAttention(ScaledDotProductAttention, _StochasticLayer):
    """:class:`ScaledDotProductAttention` whose two forward and four backward GEMMs run
    under ``config`` (:func:`lowbit.functional.scaled_dot_product_attention`); seed and
    ``name`` key its noise stream as for :class:`~lowbit.FQTLinear`."""

    def __init__(self, *, config: FQTConfig, seed: int | None = None, name: str = "") -> None:
        super().__init__()
        self._init_quant(config, seed, name)

    @classmethod
    def from_float(cls, mod: ScaledDotProductAttention, config: FQTConfig, seed: int | None = None,
                   name: str = "") -> FQTScaledDotProductAttention:
        check_source(cls, mod, ScaledDotProductAttention)
        return cls(config=config, seed=seed, name=name).train(mod.training)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if state.get("hf_attention"):  # a Hugging Face model's (lowbit.hf marks it): a model
            # unpickled in a new process calls attn_implementation "lowbit", which importing
            # lowbit.hf registers with transformers
            import lowbit.hf  # noqa: F401

    def trackers(self) -> tuple[None, None]:
        """Attention's gradient ranges are dynamic (lowbit.attention): no trackers."""
        return None, None

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                is_causal: bool = False, scale: float | None = None,
                enable_gqa: bool = False) -> torch.Tensor:
        return self.attend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
               is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
               need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output and, with ``need_weights``, the attention weights after dropout
        (:func:`lowbit.attention.attention`)."""
        self.ran = True
        return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                         state=self._block, need_weights=need_weights)

    def extra_repr(self) -> str:
        # the recipe as attention runs it: predicted gradient ranges are dynamic here (a new
        # user's trial: "gi:psq4~pred" was shown for ranges attention never predicts)
        return self._extra(dynamic_grads(self.config))


class InProjection(nn.Module, _StochasticLayer):
    """The noise stream and recipe of one in-projection GEMM of
    :class:`FQTMultiheadAttention`; the weight stays where the attention module keeps it
    (``forward(x, weight, bias)`` is ``fqt_linear`` under this block's state). One of
    several alternatives per attention module (``alternative``: listed by
    :func:`lowbit.fqt_blocks`, not by :func:`lowbit.fqt_layers`)."""

    alternative = True

    def __init__(self, *, config: FQTConfig, seed: int | None = None, name: str = "") -> None:
        super().__init__()
        self._init_quant(config, seed, name)

    def forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self.ran = True
        return fqt_linear(x, weight, bias, self._block)

    def extra_repr(self) -> str:
        return self._extra()


class FQTMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with its in-projection, both attention GEMMs and its
    out-projection under ``config`` (module docstring). Same arguments and outputs as the
    float module — ``key_padding_mask``, ``attn_mask`` (bool or float, 2-D or 3-D),
    ``need_weights`` (the weights after dropout, averaged over heads by default, as torch
    returns them), ``is_causal`` (a hint that ``attn_mask`` is causal), ``batch_first``,
    unbatched inputs, ``kdim``/``vdim``, ``add_bias_kv``, ``add_zero_attn`` — computed as
    ``F.multi_head_attention_forward`` does, with the GEMMs quantized. Under the ``fp``
    recipe it is the float module's own forward. The fused inference path is never taken.

    Self-attention (``query is key is value``, packed weights) projects with one GEMM on
    ``in_proj_weight`` (block ``projections.qkv``); otherwise one GEMM per projection
    (``projections.q/k/v``), as torch does, except that an encoder-decoder call
    (``key is value``) projects key and value with one GEMM (``projections.kv``)."""

    calls_out_proj = True  # lowbit.conversion.skip_reason: out_proj runs, so it may convert
    internal = ("attention", "projections")  # child blocks that convert does not visit

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False, *, config: FQTConfig,
                 seed: int | None = None, name: str = "", device: Any = None, dtype: Any = None) -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                         vdim, batch_first, device=device, dtype=dtype)
        roles = ("qkv", "q", "kv", "k", "v") if self._qkv_same_embed_dim else ("q", "k", "v")
        self.projections = nn.ModuleDict({r: InProjection(
            config=config, seed=seed, name=_child(name, f"projections.{r}")) for r in roles})
        self.attention = FQTScaledDotProductAttention(config=config, seed=seed,
                                                      name=_child(name, "attention"))
        self.out_proj = FQTLinear.from_float(self.out_proj, config, seed, _child(name, "out_proj"))
        self.out_proj.sample_dim = 1  # forward calls it on (L, N, E) rows

    @classmethod
    def from_float(cls, mod: nn.MultiheadAttention, config: FQTConfig, seed: int | None = None,
                   name: str = "", out_proj: bool = True) -> FQTMultiheadAttention:
        """Wrap ``mod``'s parameters (shared, not copied) and plain attributes; its
        ``out_proj`` module is kept and, with ``out_proj=True``, converted to an
        ``FQTLinear`` (``convert`` passes False and converts it like any Linear, so a
        ``module_filter`` may keep it float). ``seed``/``name`` as for ``FQTLinear``;
        ``TypeError`` if ``mod`` is not an ``nn.MultiheadAttention``."""
        check_source(cls, mod, nn.MultiheadAttention)
        new = cls(mod.embed_dim, mod.num_heads, mod.dropout, add_bias_kv=mod.bias_k is not None,
                  add_zero_attn=mod.add_zero_attn, kdim=mod.kdim, vdim=mod.vdim,
                  batch_first=mod.batch_first, config=config, seed=seed, name=name, device="meta")
        for key, p in mod._parameters.items():
            setattr(new, key, p)
        new.bias_k, new.bias_v = mod.bias_k, mod.bias_v
        new.out_proj = (FQTLinear.from_float(mod.out_proj, config, seed, _child(name, "out_proj"))
                        if out_proj else mod.out_proj)
        if out_proj:
            new.out_proj.sample_dim = 1  # forward calls it on (L, N, E) rows
        plain = set(vars(nn.MultiheadAttention(1, 1, device="meta")))
        new.__dict__.update({k: v for k, v in vars(mod).items() if k not in plain})
        return new.train(mod.training)

    @property
    def config(self) -> FQTConfig:
        return self.attention.config

    @config.setter
    def config(self, value: FQTConfig) -> None:
        for block in (*self.projections.values(), self.attention):
            block.config = value
        if isinstance(self.out_proj, _StochasticLayer):
            self.out_proj.config = value

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.config.is_fp:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask,
                                   average_attn_weights, is_causal)
        for what, t in (("query", query), ("key", key), ("value", value)):
            check_dense("FQTMultiheadAttention", what, t)
        if need_weights and not autocast_on(query):  # torch's weights path (baddbmm) takes one dtype:
            # its masks, bool ones made the query's dtype, added together (a review; a second one:
            # each checked alone refused a bool causal mask beside a float32 padding mask in float64)
            # (an integer mask is left to torch's "only bool and floating types" below, a review)
            given = [query.dtype if m.dtype == torch.bool else m.dtype
                     for m in (attn_mask, key_padding_mask) if m is not None
                     and (m.dtype == torch.bool or m.is_floating_point())]
            merged = given[0] if len(given) == 1 else torch.promote_types(*given) if given else query.dtype
            if merged != query.dtype:
                raise RuntimeError(f"nn.MultiheadAttention with need_weights=True: the masks (attn_mask "
                                   f"{None if attn_mask is None else attn_mask.dtype}, key_padding_mask "
                                   f"{None if key_padding_mask is None else key_padding_mask.dtype}) add up to "
                                   f"{merged}, not the query's dtype {query.dtype} (torch refuses it too)")
        batched = query.dim() == 3
        if self.batch_first and batched:  # keep the "is" relations that pick the projections
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        return (out.transpose(1, 0) if self.batch_first and batched else out), weights

    def _project(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``F._in_projection_packed`` / ``F._in_projection`` with low-bit GEMMs."""
        p, e = self.projections, self.embed_dim
        if not self._qkv_same_embed_dim:
            b = (None,) * 3 if self.in_proj_bias is None else self.in_proj_bias.chunk(3)
            return (p["q"](query, self.q_proj_weight, b[0]), p["k"](key, self.k_proj_weight, b[1]),
                    p["v"](value, self.v_proj_weight, b[2]))
        w, b = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            qkv = p["qkv"](query, w, b).unflatten(-1, (3, e))
            return qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        ws, bs = w.split([e, e, e]), (None,) * 3 if b is None else b.split([e, e, e])
        q = p["q"](query, ws[0], bs[0])
        if key is value:
            kv = p["kv"](key, w[e:], None if b is None else b[e:]).unflatten(-1, (2, e))
            return q, kv[..., 0, :], kv[..., 1, :]
        return q, p["k"](key, ws[1], bs[1]), p["v"](value, ws[2], bs[2])

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None, need_weights: bool,
                attn_mask: torch.Tensor | None, average: bool, is_causal: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.multi_head_attention_forward`` on (L, N, E) inputs (sequence first)."""
        h = self.num_heads
        batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, h)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask", target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                               "Transformer module method `generate_square_subsequent_mask` to "
                               "create this mask.")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # the hint says causal: let attention build the mask
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                          other_name="", target_type=query.dtype, check_other=False)
            is_causal = False
        if embed_dim != self.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {self.embed_dim}, but got {embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")
        q, k, v = self._project(query, key, value)  # (L, N, E), (S, N, E), (S, N, E)
        src_len = k.shape[0]
        if key_padding_mask is not None:  # torch's checks (a review: a transposed (S, N) mask of
            # as many elements was viewed as (N, S), masking other keys of other samples)
            for d, want in enumerate((bsz, src_len)):
                if key_padding_mask.dim() != 2 or key_padding_mask.shape[d] != want:
                    raise AssertionError(f"Expected key_padded_mask.shape[{d}] to be {want}, but got "
                                         f"{key_padding_mask.shape[d] if d < key_padding_mask.dim() else None}")
        if attn_mask is not None:
            want = (tgt_len, src_len) if attn_mask.dim() == 2 else (bsz * h, tgt_len, src_len)
            if attn_mask.dim() not in (2, 3) or tuple(attn_mask.shape) != want:
                raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is "
                                   f"{tuple(attn_mask.shape)}, but should be {want}.")
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.dim() == 2 else attn_mask
        pad_masks = []
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            pad_masks.append(1)
        hd = embed_dim // h
        q, k, v = (t.reshape(t.shape[0], bsz * h, hd).transpose(0, 1) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = torch.zeros(bsz * h, 1, hd, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            pad_masks.append(1)
        for _ in pad_masks:  # the added key positions take part
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, h, -1, -1).reshape(bsz * h, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        if attn_mask is not None:  # (1, L, S) stays broadcast; (N·H, 1|L, S) → (N, H, 1|L, S)
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else \
                attn_mask.view(bsz, h, attn_mask.shape[1], src_len)  # (no -1: bsz may be 0)
        q4, k4, v4 = (t.view(bsz, h, t.shape[1], hd) for t in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        out, weights = self.attention.attend(q4, k4, v4, attn_mask, dropout_p, is_causal,
                                             need_weights=need_weights)  # (N, H, L, hd)
        # a query whose every key is masked: torch's explicit softmax (this path of
        # F.multi_head_attention_forward) gives NaN weights and, through the out-projection,
        # a NaN output row, while lowbit's attention gives 0 there, as torch's
        # need_weights=False (SDPA) path does. The rows are set after the out-projection:
        # before it, a NaN would reach every row through its per-tensor input scale. They
        # are multiplied by NaN, not filled: masked_fill's backward gives 0 there, so a NaN
        # loss had finite gradients that silently left those rows out (a step guard that
        # checks the gradients applied it); the product's backward carries the NaN, as
        # torch's softmax does.
        dead = None
        if need_weights and attn_mask is not None and attn_mask.device.type != "meta":  # meta: no values
            dead = torch.isneginf(attn_mask).all(-1).expand(out.shape[:-1])  # (N, H, L)
            # traced (torch.export, torch.compile): applied whatever the values, the same result
            # without a data-dependent branch (a review: export stopped on the host read)
            if torch.compiler.is_compiling() or bool(dead.any()):
                weights = weights * _nan_where(dead.unsqueeze(-1), weights)
                dead = dead.any(1).t().unsqueeze(-1)  # (L, N, 1): a head's NaN reaches the row
            else:
                dead = None
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)  # sequence-first rows:
        out = self.out_proj(out)  # its samples are dimension 1 (sample_dim, set by convert)
        out = out.view(tgt_len, bsz, out.shape[-1])  # (no -1: tgt_len or bsz may be 0)
        if dead is not None:
            out = out * _nan_where(dead, out)
        if weights is not None and average:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights


# -- how convert swaps them in -----------------------------------------------------------------
def sdpa_reason(mod: nn.Module) -> str | None:
    """Why a :class:`ScaledDotProductAttention` cannot become an
    :class:`FQTScaledDotProductAttention` that computes the same thing, or ``None``: it
    must be exactly that class (a subclass's own forward, e.g. a learned logit scale,
    would be lost), own no parameters, buffers or children (the converted module has
    none), have no instance ``forward``, and carry no hooks."""
    cls = type(mod)
    if cls is not ScaledDotProductAttention:
        return (f"{cls.__qualname__} is a subclass of ScaledDotProductAttention: its own forward, "
                "parameters or state would be lost")
    owned = sorted({*mod._parameters, *mod._buffers, *mod._modules} | ({"forward"} & set(vars(mod))))
    if owned:
        return f"owns more than ScaledDotProductAttention defines (none): {owned}"
    return hooks_reason(mod)


def _swap_sdpa(mod: nn.Module, config: FQTConfig, seed: int, name: str) -> nn.Module | str:
    return sdpa_reason(mod) or FQTScaledDotProductAttention.from_float(mod, config, seed, name)


def _mha_refusal(mod: nn.Module) -> str | None:
    """Why ``convert`` leaves the ``nn.MultiheadAttention`` ``mod`` float, or ``None``."""
    clash = sorted(k for k in set(vars(mod)) if k in ("attention", "projections", "config"))
    if clash:
        return f"instance attributes {clash} would clash with FQTMultiheadAttention's own"
    return mha_reason(mod)


def _swap_mha(mod: nn.Module, config: FQTConfig, seed: int, name: str) -> nn.Module | str:
    return _mha_refusal(mod) or FQTMultiheadAttention.from_float(mod, config, seed, name, out_proj=False)


def aliased_attention_out_projs(model: nn.Module) -> dict[int, list[nn.Module]]:
    """``id(out_proj) → the attentions holding it`` for the plain
    ``nn.MultiheadAttention`` modules of ``model`` whose ``out_proj`` is reachable under
    more than one name (``self.head = attn.out_proj``, or two attentions sharing one). Such
    an attention reads ``out_proj.weight`` and never calls it: where one stays float, the
    ``out_proj`` must stay float under every name, so ``convert`` decides it once every
    attention holding it has been met (reviews: the first name met converted it; a pre-pass
    that asked the module filter early changed what a filter that keeps state chose; with
    two attentions sharing it the result depended on their order)."""
    names: dict[int, int] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        names[id(mod)] = names.get(id(mod), 0) + 1
    out: dict[int, list[nn.Module]] = {}
    for _, mod in model.named_modules():
        if reads_out_proj(mod) and names.get(id(mod.out_proj), 0) > 1:
            out.setdefault(id(mod.out_proj), []).append(mod)
    return out


SWAP_RULES = (
    SwapRule(ScaledDotProductAttention, FQTScaledDotProductAttention, _swap_sdpa),
    SwapRule(nn.MultiheadAttention, FQTMultiheadAttention, _swap_mha, FQTMultiheadAttention.internal),
)


def extensions(model: nn.Module) -> tuple[tuple[SwapRule, ...], Callable[[nn.Module], dict[str, str]]]:
    """What ``convert`` swaps beyond Linear/Conv2d in ``model``, and what it runs after
    swapping (name → reason for what it could not route). With Hugging Face models (when
    ``transformers`` is loaded) this prepares ``model`` first (:func:`lowbit.hf.prepare`)."""
    if sys.modules.get("transformers") is None:  # not imported (or blocked): no HF modules
        return SWAP_RULES, lambda m: {}
    try:
        from . import hf
    except ImportError as e:  # a transformers older than lowbit's Hugging Face support
        hf_modules = [type(m).__name__ for m in model.modules()
                      if type(m).__module__.startswith("transformers.")]
        if hf_modules:  # the model needs it: say which version
            raise ImportError(f"lowbit's Hugging Face support needs transformers ≥ {HF_MIN_VERSION} "
                              f"(AttentionInterface); this one is {_version('transformers')} and the "
                              f"model holds {hf_modules[0]} ({e})") from None
        return SWAP_RULES, lambda m: {}  # a model without HF modules converts without it

    return SWAP_RULES + hf.SWAP_RULES, hf.prepare(model)


HF_MIN_VERSION = "4.51"  # AttentionInterface (transformers PR 36889), the registry lowbit.hf uses


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


__all__ = ["FQTMultiheadAttention", "FQTScaledDotProductAttention", "InProjection",
           "SWAP_RULES", "ScaledDotProductAttention", "extensions"]
