"""Scaled-dot-product attention's argument contract, shared by every low-bit attention
entry point (:mod:`lowbit.attention`): the checks torch's
``scaled_dot_product_attention`` makes (same error types, messages naming the argument),
and the boolean, additive or causal mask turned into one additive (1 or B, L, S) mask.
"""

from __future__ import annotations

import torch

from .formats import SUPPORTED_DTYPES, check_dense, check_one_device
from .functional import output_dtype  # as autocast casts a tensor (meta keeps its dtype)
from .scalars import real


def check_arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool,
                    enable_gqa: bool) -> None:
    """Raise as ``torch.nn.functional.scaled_dot_product_attention`` does for arguments it
    refuses: non-floating (or complex, float8: outside
    :data:`~lowbit.formats.SUPPORTED_DTYPES`) or < 2-D ``query``/``key``/``value`` (``TypeError``), mixed dtypes
    outside autocast, tensors on more than one device, feature or length sizes that do not fit, GQA heads that do not
    divide, ``dropout_p`` outside [0, 1] (``ValueError``), a mask with ``is_causal``, a mask
    neither bool nor floating (``TypeError``), a floating mask neither float32 nor the
    query's dtype (after autocast's casts; ``RuntimeError``); a nested or sparse tensor (``RuntimeError``:
    lowbit's GEMMs take dense tensors)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_dense("scaled_dot_product_attention", name, t)
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be a floating tensor of shape (..., length, features), "
                            f"got {t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}"
                            f"{tuple(t.shape) if isinstance(t, torch.Tensor) else ''}")
    check_one_device("scaled_dot_product_attention", "query, key, value (and attn_mask)", query, key, value,
                     attn_mask if isinstance(attn_mask, torch.Tensor) else None)
    if not output_dtype(query) == output_dtype(key) == output_dtype(value):  # as autocast casts them: it
        # leaves float64 alone, so float64 beside another dtype is refused under autocast too (a review)
        raise RuntimeError(f"Expected query, key, and value to have the same dtype, but got "
                           f"query.dtype: {query.dtype}, key.dtype: {key.dtype} and value.dtype: {value.dtype}"
                           + (" (under autocast)" if autocast_on(query) else ""))
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"scaled_dot_product_attention: query {tuple(query.shape)}, key "
                           f"{tuple(key.shape)} and value {tuple(value.shape)} do not fit: query and "
                           "key need the same feature size, key and value the same length")
    if enable_gqa and (query.dim() < 3 or key.shape[-3] != value.shape[-3]
                       or key.shape[-3] == 0 or query.shape[-3] % key.shape[-3]):
        raise RuntimeError(f"enable_gqa: the query's heads ({query.shape[-3] if query.dim() > 2 else None}) "
                           f"must be a multiple of the key's and value's (equal) heads "
                           f"({key.shape[-3] if key.dim() > 2 else None}, {value.shape[-3] if value.dim() > 2 else None})")
    p = real(dropout_p)  # (torch's takes NumPy scalars and one-element tensors too)
    if p is None or not 0 <= p <= 1:
        raise ValueError(f"dropout_p must be a number in [0, 1], got {dropout_p!r}")
    if is_causal and attn_mask is not None:
        raise RuntimeError("scaled_dot_product_attention: explicit attn_mask should not be set "
                           "when is_causal=True")
    if attn_mask is not None and (not isinstance(attn_mask, torch.Tensor) or not (
            attn_mask.dtype == torch.bool or attn_mask.is_floating_point())):
        raise TypeError("attn_mask must be a bool or floating tensor, got "
                        f"{attn_mask.dtype if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__}")
    # torch's rule (a review: lowbit took a float64 mask that torch, and so the `fp` recipe,
    # refuses): a floating mask is float32 or the query's dtype, both as autocast casts them
    if attn_mask is not None and attn_mask.is_floating_point() \
            and output_dtype(attn_mask) not in (torch.float32, output_dtype(query)):
        raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, got "
                           f"attn_mask {attn_mask.dtype} and query {query.dtype}"
                           + (" (under autocast)" if autocast_on(query) else ""))


def autocast_on(t: torch.Tensor) -> bool:
    """Whether autocast is on for ``t``'s device (never for ``meta``/``lazy``, whose query
    raises in torch)."""
    return t.device.type not in ("meta", "lazy") and torch.is_autocast_enabled(t.device.type)



def additive_mask(attn_mask: torch.Tensor | None, is_causal: bool, lead: tuple[int, ...], lq: int,
                  s: int, like: torch.Tensor) -> torch.Tensor | None:
    """The additive mask as (1, L, S) when it is the same for every batch entry and head,
    else as (*lead, L, S) — an expanded view of the mask, so that a per-batch mask shared
    by the heads is not copied per head (whoever saves it keeps only its own storage);
    bool masks keep ``True`` positions (``False`` → ``-inf``), converted at the size of
    their distinct elements (a stride-0 dimension, e.g. transformers' causal mask expanded
    over the batch, stays size 1 until the final expanded view). A 1-D or 0-d mask
    broadcasts as any other (torch's CPU flash path raises ``IndexError`` for one with some
    4-D inputs and broadcasts it elsewhere — three reviews — so a quantized recipe takes it
    where the ``fp`` recipe, torch's, may not)."""
    if is_causal:  # top-left aligned, as torch: query i sees keys 0..i
        keep = torch.ones(lq, s, dtype=torch.bool, device=like.device).tril()
        return torch.zeros(1, lq, s, dtype=like.dtype, device=like.device).masked_fill(~keep, float("-inf"))
    if attn_mask is None:
        return None
    m = attn_mask
    if m.dtype == torch.bool:  # broadcast dimensions (stride 0, as transformers' masks come) at
        for d in range(m.dim()):  # size 1: not written out per batch entry (a review: 4·B·L·S
            if m.stride(d) == 0 and m.shape[d] > 1:  # bytes a layer); a float mask stays the
                m = m.narrow(d, 0, 1)  # view it is (its gradient is per entry, a second review)
        m = torch.zeros(m.shape, dtype=like.dtype, device=m.device).masked_fill(~m, float("-inf"))
    full = (*lead, lq, s)
    try:
        ok = torch.broadcast_shapes(m.shape, full) == torch.Size(full)
    except RuntimeError:
        ok = False
    if not ok:
        raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} cannot be broadcast to the "
                           f"attention scores' shape {full}")
    if all(d == 1 for d in m.shape[:-2]):
        return torch.broadcast_to(m.reshape(m.shape[-2:]), (lq, s)).reshape(1, lq, s)
    return m.expand(full)


__all__ = ["additive_mask", "check_arguments"]
