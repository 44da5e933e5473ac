"""Low-precision weights and optimizer state, with no float32 master copy.

Storage formats (``FORMATS``), for weights and for optimizer state alike:

* ``"bf16"``: bfloat16, written with :func:`stochastic_round_bf16`.
* ``"int8"``: int8 codes ``c`` and float32 scales ``s``, value ``c·s``, written with
  stochastic rounding onto the grid ``s·{-127, …, 127}``. Weights (``ndim ≥ 2``) use one
  power-of-two scale per output channel (:func:`encode_int8_per_channel`); optimizer
  state uses one scale per block of ``BLOCK_SIZE`` elements (:func:`encode_int8_blockwise`).
  1-D parameters (biases, norm weights) always stay bfloat16: they are a negligible share
  of the memory, and a per-channel scale for them would cost more than it saves.

Every write rounds stochastically, so ``E[stored] = value``: an update computed in
float32 for one parameter at a time (the only float32 anywhere, and only transiently)
and written back is unbiased, ``E[w_{t+1} | w_t] = w_t − lr·d_t``; updates smaller than
one grid step, which round-to-nearest would drop, survive in expectation.

bfloat16 is the top half of a float32: adding uniform noise to the 16 low bits of the
float32 pattern and truncating them is stochastic rounding onto the bfloat16 grid.

Bytes per parameter (:func:`memory_breakdown`; ``r`` = row length, i.e. ``numel / rows``):

===================  =======================  ===============  ====================
optimizer            weights                  decode buffer    state
===================  =======================  ===============  ====================
SRSGD bf16/bf16      2                        0                2 (momentum)
SRSGD int8/int8      1 + 4/r                  2                1 + 4/128
SRAdamW bf16/bf16    2                        0                2 + 2
SRAdamW int8/int8    1 + 4/r                  2                (1 + 4/128) + 2
fp32 AdamW           4 (+ 4 master copy)      0                4 + 4
===================  =======================  ===============  ====================

int8 weights store 1 byte per parameter plus one 4-byte scale per row. The parameter
tensor itself then holds a bfloat16 *image* of the int8 weight (the decode, exact in
bfloat16), because autograd needs a floating-point leaf to run the forward and backward
passes on; it is a working buffer that a fused kernel dequantizing on the fly would not
need, so :func:`memory_breakdown` reports it apart from the authoritative weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
import torch.nn.functional as F

FORMATS = ("bf16", "int8")
BLOCK_SIZE = 128  # elements per scale in int8 optimizer state
_LOW16 = 0xFFFF
_INT8_MAX = 127
# bfloat16 subnormals are the multiples of 2^-133: the smallest power-of-two weight scale
# for which every c·s (|c| ≤ 127) is still a bfloat16 number.
_MIN_POW2_EXP = -133
_W_CODES, _W_SCALE = "weight_codes", "weight_scale"


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 → bfloat16 with stochastic rounding: ``E[result] = x`` for finite ``x``
    whose neighbours on the bfloat16 grid are finite. NaN and ±Inf stay as they are."""
    x = x.float()
    bits = x.view(torch.int32)
    noise = torch.randint(0, _LOW16 + 1, x.shape, generator=generator, dtype=torch.int32,
                          device=x.device)
    rounded = ((bits + noise) & ~_LOW16).view(torch.float32)
    # Non-finite inputs (and overflow past the largest bfloat16) keep their own value.
    out = torch.where(torch.isfinite(x) & torch.isfinite(rounded), rounded, x)
    return out.to(torch.bfloat16)  # exact: the low 16 bits are zero


# ---------------------------------------------------------------------------- int8 codes


def _int8_codes(rows: torch.Tensor, scale: torch.Tensor, generator: torch.Generator | None,
                stochastic: bool = True) -> torch.Tensor:
    """Codes ``c`` for the rows ``x`` of a 2-D float32 tensor, one scale ``s`` per row,
    given ``|x| ≤ 127·s``.

    Stochastic: with ``q = x/s`` and ``u ~ U[0, 1)``, ``c = ⌊q⌋ + [u < q − ⌊q⌋]``, so
    ``P(c = ⌊q⌋ + 1) = q − ⌊q⌋`` and ``E[c] = q``, i.e. ``E[c·s] = x`` (up to ``2^-24·s``
    from the float32 grid of ``u``). ``|q| ≤ 127`` makes ``c ∈ [-127, 127]``, so the final
    clamp never acts and cannot bias. Otherwise round-to-nearest. Rows whose scale is not
    finite (they held NaN or ±Inf) get codes 0: their NaN scale carries the non-finiteness.
    """
    q = torch.where(torch.isfinite(scale)[:, None], rows / scale[:, None], 0.0)
    if stochastic:
        low = q.floor()
        u = torch.rand(q.shape, generator=generator, device=q.device)
        q = low + (u < q - low).float()
    else:
        q = q.round()
    return q.clamp(-_INT8_MAX, _INT8_MAX).to(torch.int8)


def _nan_unless_finite(scale: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """A row or block holding NaN or ±Inf gets scale NaN, so it decodes to NaN: a
    non-finite value never comes back finite."""
    return torch.where(torch.isfinite(absmax), scale, torch.nan)


def _pow2_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Smallest ``s = 2^k`` with ``absmax ≤ 127·s`` (``k ≥ -133``); all-zero rows get 1.

    Why a power of two: a code has at most 7 significant bits (``|c| ≤ 127``) and
    bfloat16 has 8, so ``c·2^k`` is exactly a bfloat16 number for ``-133 ≤ k ≤ 121``,
    i.e. for rows with ``absmax ≤ 127·2^121 ≈ 3.4e38``. The bfloat16 image of the weight that autograd sees is then the int8 weight itself,
    not a rounding of it."""
    a = torch.where(absmax > 0, absmax, float(_INT8_MAX)).double()
    k = torch.log2(a / _INT8_MAX).ceil().clamp_min(_MIN_POW2_EXP)
    k = k + (a > _INT8_MAX * torch.exp2(k)).double()  # in case log2 rounded down
    return _nan_unless_finite(torch.exp2(k).float(), absmax)


def _linear_scale(absmax: torch.Tensor) -> torch.Tensor:
    """``s ≈ absmax/127``, nudged up one float32 ulp where rounding made ``absmax/s > 127``
    (and at least the smallest normal float32); all-zero blocks get 1."""
    a = torch.where(absmax > 0, absmax, float(_INT8_MAX))
    s = (a / _INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    s = torch.where(a / s > _INT8_MAX, torch.nextafter(s, torch.full_like(s, torch.inf)), s)
    return _nan_unless_finite(s, absmax)


def encode_int8_per_channel(x: torch.Tensor, generator: torch.Generator | None = None, *,
                            stochastic: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (``ndim ≥ 2``) → int8 codes (shape of ``x``) and one float32 power-of-two
    scale per output channel, i.e. per row of ``x.flatten(1)``: ``scale[i] = 2^⌈log2(
    max|x[i]|/127)⌉``. Stochastic rounding (default) makes it unbiased,
    ``E[decode(encode(x))] = x``, and the decode is exact in bfloat16 (see
    :func:`_pow2_scale`). A row holding NaN or ±Inf decodes to NaN."""
    if x.ndim < 2:
        raise ValueError(f"per-channel int8 needs a tensor with ndim ≥ 2, got shape "
                         f"{tuple(x.shape)} (1-D parameters stay bfloat16)")
    rows = x.float().flatten(1)
    scale = _pow2_scale(rows.abs().amax(1))
    return _int8_codes(rows, scale, generator, stochastic).view(x.shape), scale


def decode_int8_per_channel(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes[i]·scale[i]`` per row, in float32."""
    return (codes.flatten(1).float() * scale[:, None]).view(codes.shape)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` flattened to float32, zero-padded to rows of ``BLOCK_SIZE``."""
    flat = x.float().flatten()
    return F.pad(flat, (0, -flat.numel() % BLOCK_SIZE)).view(-1, BLOCK_SIZE)


def encode_int8_blockwise(x: torch.Tensor, generator: torch.Generator | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimizer state → int8 codes (shape of ``x``) and one float32 scale
    ``max|block|/127`` per block of ``BLOCK_SIZE`` consecutive elements (the last block
    zero-padded), with stochastic rounding: ``E[decode(encode(x))] = x``. A block holding
    NaN or ±Inf decodes to NaN."""
    blocks = _blocks(x)
    scale = _linear_scale(blocks.abs().amax(1))
    codes = _int8_codes(blocks, scale, generator).flatten()[: x.numel()].clone()
    return codes.view(x.shape), scale


def decode_int8_blockwise(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``codes·scale`` block by block, in float32."""
    return (_blocks(codes) * scale[:, None]).flatten()[: codes.numel()].view(codes.shape)


# ------------------------------------------------------------------------------ optimizers


def _check_format(what: str, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")


def _drop(state: dict[str, Any], name: str) -> None:
    """Forget every stored form (bf16, or int8 codes + scale) of the entry ``name``."""
    for key in (name, f"{name}_codes", f"{name}_scale"):
        state.pop(key, None)


class _SROptimizer(torch.optim.Optimizer):
    """Base of the stochastic-rounding optimizers: loads and stores weights and state in
    their low-precision formats, and runs the step loop. A subclass only implements
    :meth:`_update`, the float32 update rule for one parameter.

    What is stored says how to read it (``weight_codes`` present ⇒ int8 weight; ``name``
    ⇒ bf16 state, ``name_codes`` ⇒ int8 state); the configured formats say how to write.
    """

    def __init__(self, params: Iterable[torch.Tensor], defaults: dict[str, Any],
                 generator: torch.Generator | None, weights: str, state: str) -> None:
        _check_format("weights", weights)
        _check_format("state", state)
        if not defaults["lr"] > 0:
            raise ValueError(f"lr must be > 0, got {defaults['lr']}")
        if not defaults["weight_decay"] >= 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {defaults['weight_decay']}")
        self.generator = generator
        self.weight_format = weights
        self.state_format = state
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Checks that the parameters are bfloat16; with ``weights="int8"``, encodes each
        weight (``ndim ≥ 2``) once with round-to-nearest (the smallest error for a one-off
        conversion; unbiasedness matters for the updates that accumulate, which all use
        stochastic rounding) and writes its exact bfloat16 image into the parameter."""
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        bad = [p.dtype for p in params if p.dtype != torch.bfloat16]
        if bad:
            self.param_groups.pop()
            raise TypeError(f"{type(self).__name__} keeps weights in bfloat16; got a {bad[0]} "
                            "parameter (convert the model with model.to(torch.bfloat16))")
        with torch.no_grad():
            for p in params:
                if self._int8_weight(p):
                    self._put_int8_weight(p, *encode_int8_per_channel(p, stochastic=False))

    def _int8_weight(self, p: torch.Tensor) -> bool:
        return self.weight_format == "int8" and p.ndim >= 2 and p.numel() > 0

    def _put_int8_weight(self, p: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
        st = self.state[p]
        _drop(st, "weight")
        st[_W_CODES], st[_W_SCALE] = codes, scale
        p.copy_(decode_int8_per_channel(codes, scale))  # exact: power-of-two scales

    def _load_weight(self, p: torch.Tensor) -> torch.Tensor:
        """The authoritative weight in float32: int8 codes·scales if stored, else ``p``."""
        st = self.state.get(p, {})
        if _W_CODES in st:
            return decode_int8_per_channel(st[_W_CODES], st[_W_SCALE])
        return p.float()

    def _store_weight(self, p: torch.Tensor, w: torch.Tensor) -> None:
        """Writes ``w`` with stochastic rounding (``E[stored] = w``): int8 per channel
        (fresh scales from ``w``) plus its bfloat16 image in ``p``, or bfloat16 in ``p``."""
        if self._int8_weight(p):
            self._put_int8_weight(p, *encode_int8_per_channel(w, self.generator))
        else:
            _drop(self.state.get(p, {}), "weight")
            p.copy_(stochastic_round_bf16(w, self.generator))

    def _load_state(self, p: torch.Tensor, name: str) -> torch.Tensor | None:
        """State entry ``name`` of ``p`` in float32, or None before the first write."""
        st = self.state.get(p, {})
        if name in st:
            return st[name].float()
        if f"{name}_codes" in st:
            return decode_int8_blockwise(st[f"{name}_codes"], st[f"{name}_scale"])
        return None

    def _store_state(self, p: torch.Tensor, name: str, x: torch.Tensor, fmt: str) -> None:
        """Writes state entry ``name`` in format ``fmt`` with stochastic rounding."""
        st = self.state[p]
        _drop(st, name)
        if fmt == "bf16":
            st[name] = stochastic_round_bf16(x, self.generator)
        else:
            st[f"{name}_codes"], st[f"{name}_scale"] = encode_int8_blockwise(x, self.generator)

    def _update(self, p: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                group: dict[str, Any]) -> torch.Tensor:
        """New float32 weight from weight ``w`` and gradient ``g`` (stores the state)."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    w = self._update(p, self._load_weight(p), p.grad.float(), group)
                    self._store_weight(p, w)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, but state tensors keep their
        saved dtypes (torch casts floating-point state to the parameter's dtype, which
        would turn float32 scales and int8 codes into bfloat16), and each int8 weight's
        bfloat16 image is rewritten from its codes. The rounding generator is the
        caller's: restore its state too for a bitwise-identical continuation."""
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        with torch.no_grad():
            for pid, p in zip(saved_ids, params):
                for key, value in state_dict["state"].get(pid, {}).items():
                    if isinstance(value, torch.Tensor):
                        self.state[p][key] = value.to(p.device)
                if _W_CODES in self.state.get(p, {}):
                    p.copy_(self._load_weight(p))


class SRSGD(_SROptimizer):
    """SGD with momentum for bfloat16 parameters, updated with stochastic rounding.

    ``d = g + λ w``; ``v ← μ v + d`` (if ``μ > 0``, else ``v = d``); ``w ← w − lr · v``,
    each in float32 for one parameter at a time and stored back with stochastic
    rounding (unbiased). ``weights``: ``"bf16"`` or ``"int8"`` (per-channel, ``ndim ≥ 2``
    only); ``state``: format of the momentum, ``"bf16"`` or ``"int8"`` (blockwise).
    ``generator`` seeds the rounding noise (reproducible runs). Bytes per parameter: see
    the module docstring.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None,
                 weights: str = "bf16", state: str = "bf16") -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
                         generator, weights, state)

    def _update(self, p: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                group: dict[str, Any]) -> torch.Tensor:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        d = g + wd * w if wd else g
        if mu:
            v = self._load_state(p, "momentum")
            d = d if v is None else mu * v + d
            self._store_state(p, "momentum", d, self.state_format)
        return w - lr * d


class SRAdamW(_SROptimizer):
    """AdamW for bfloat16 parameters, updated with stochastic rounding.

    At step ``t``: ``w ← w − lr·λ·w`` (decoupled weight decay);
    ``m ← β1 m + (1 − β1) g``; ``v ← β2 v + (1 − β2) g²``;
    ``w ← w − lr · m̂ / (√v̂ + ε)`` with ``m̂ = m / (1 − β1^t)``, ``v̂ = v / (1 − β2^t)``;
    all in float32 for one parameter at a time, stored back with stochastic rounding.

    ``state="bf16"`` stores ``m`` and ``v`` in bfloat16. ``state="int8"`` stores ``m`` in
    int8 blockwise and ``v`` still in bfloat16: ``v`` spans many orders of magnitude within
    a block (it is a square), and a linear 8-bit grid whose step is ``max/127`` rounds
    every ``v`` below about ``max/254`` to 0 or one step: ``1/√v̂`` then either explodes
    (``v = 0``, update ``m̂/ε``) or is badly wrong. bfloat16 has float32's exponent range,
    so it holds ``v`` with 0.4% relative precision at every magnitude. (8-bit Adam
    implementations store ``v`` with a non-linear, dynamic quantization map instead.)
    ``weights`` as for :class:`SRSGD`. ``generator`` seeds the rounding noise.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None,
                 weights: str = "bf16", state: str = "bf16") -> None:
        if not all(0 <= b < 1 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults, generator, weights, state)

    def _update(self, p: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                group: dict[str, Any]) -> torch.Tensor:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        t = self.state[p]["step"] = self.state[p].get("step", 0) + 1
        if wd:
            w = w - lr * wd * w
        m, v = self._load_state(p, "exp_avg"), self._load_state(p, "exp_avg_sq")
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
        v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
        self._store_state(p, "exp_avg", m, self.state_format)
        self._store_state(p, "exp_avg_sq", v, "bf16")  # see the class docstring
        return w - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


# --------------------------------------------------------------------------------- memory


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_breakdown(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Bytes per parameter held by the parameters and the optimizer, split into
    ``"weights"`` (the authoritative weight: int8 codes + scales where stored, else the
    parameter tensor), ``"decode_buffer"`` (the parameter tensor where it is only the
    bfloat16 image of an int8 weight), ``"state"`` (every other tensor in the optimizer
    state) and ``"total"``. Works for any optimizer (e.g. ``torch.optim.AdamW``)."""
    n = 0
    parts = {"weights": 0, "decode_buffer": 0, "state": 0}
    for group in optimizer.param_groups:
        for p in group["params"]:
            n += p.numel()
            st = optimizer.state.get(p, {})
            if _W_CODES in st:
                parts["weights"] += _nbytes(st[_W_CODES]) + _nbytes(st[_W_SCALE])
                parts["decode_buffer"] += _nbytes(p)
            else:
                parts["weights"] += _nbytes(p)
            parts["state"] += sum(_nbytes(v) for k, v in st.items()
                                  if isinstance(v, torch.Tensor) and k not in (_W_CODES, _W_SCALE))
    n = max(n, 1)
    out = {k: v / n for k, v in parts.items()}
    out["total"] = sum(parts.values()) / n
    return out


def bytes_per_parameter(optimizer: torch.optim.Optimizer) -> float:
    """Weights plus optimizer state (everything the parameters and the optimizer hold),
    in bytes per parameter: ``memory_breakdown(optimizer)["total"]``."""
    return memory_breakdown(optimizer)["total"]


__all__ = [
    "BLOCK_SIZE",
    "FORMATS",
    "SRAdamW",
    "SRSGD",
    "bytes_per_parameter",
    "decode_int8_blockwise",
    "decode_int8_per_channel",
    "encode_int8_blockwise",
    "encode_int8_per_channel",
    "memory_breakdown",
    "stochastic_round_bf16",
]
