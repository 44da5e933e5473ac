"""Low-precision storage of weights and optimizer state, written with stochastic rounding.

Formats (``FORMATS``), for weights and for optimizer state alike:

* ``"bf16"``: bfloat16, written with :func:`stochastic_round_bf16`.
* ``"int8"``: int8 codes ``c`` and float32 scales ``s``, value ``c·s``, written with
  stochastic rounding onto the grid ``s·{-127, …, 127}``. Weights (``ndim ≥ 2``) use one
  power-of-two scale per row, dimension 0 — a Linear or Conv weight's output channels,
  Hugging Face ``Conv1D``'s input features (:func:`encode_int8_per_channel`; the decode is
  exact in bfloat16); optimizer state uses one scale per block of ``BLOCK_SIZE`` elements
  (:func:`encode_int8_blockwise`).

Stochastic rounding makes every write unbiased, ``E[decode(encode(x))] = x``; a row or
block holding NaN or ±Inf decodes to NaN. bfloat16 is the top half of a float32: adding
uniform noise to the 16 low bits of the float32 pattern and truncating them is
stochastic rounding onto the bfloat16 grid. A float64 input is rounded from its own value
(45 noise bits below bfloat16's 7, or a float64 uniform for int8 codes): what
:mod:`lowbit.optim` writes, ``w + Δ`` formed in float64, where a float32 sum would already
have rounded an update below ``2^-24·|w|`` to nearest (a new user's trial: those updates
were lost, not kept in expectation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .noise import check_generator

FORMATS = ("bf16", "int8")
BLOCK_SIZE = 128  # elements per scale in int8 optimizer state
_LOW16 = 0xFFFF
_LOW45 = (1 << 45) - 1  # a float64's mantissa bits below bfloat16's 7
_BF16_MAX = float(torch.finfo(torch.bfloat16).max)
_F32_TINY = float(torch.finfo(torch.float32).tiny)  # 2^-126: below it bfloat16's step is 2^-133
_INT8_MAX = 127
# bfloat16 subnormals are the multiples of 2^-133: the smallest power-of-two weight scale
# for which every c·s (|c| ≤ 127) is still a bfloat16 number.
_MIN_POW2_EXP = -133


def _draw_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    """Where noise for ``like`` is drawn: on ``generator``'s device (a CPU generator may
    serve CUDA parameters; the draw is then moved, and equals the CPU one), else on
    ``like``'s device from torch's default generator there. ``TypeError`` for a
    ``generator`` that is neither a ``torch.Generator`` nor ``None``."""
    check_generator(generator, "storage rounding")
    return like.device if generator is None else generator.device


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 (or float64) → bfloat16 with stochastic rounding: ``E[result] = x`` for
    finite ``x`` whose neighbours on the bfloat16 grid are finite. NaN and ±Inf stay as
    they are; a finite ``|x|`` past the largest bfloat16 (3.3895e38, whose upper neighbour
    would be ``2¹²⁸``, not a number) saturates to it: finite, and biased there only.

    ``x`` of another dtype is read as float32. A float64 ``x`` is rounded from its own
    value, with 45 random bits below bfloat16's (``P(up)`` exact to ``2^-45`` of a step;
    its own draw, an int64 per element): ``x`` closer to a grid point than float32 can
    tell still moves in expectation."""
    if x.dtype == torch.float64:
        return _stochastic_round_bf16_f64(x, generator)
    x = x.float()
    bits = x.view(torch.int32)
    noise = torch.randint(0, _LOW16 + 1, x.shape, generator=generator, dtype=torch.int32,
                          device=_draw_device(generator, x)).to(x.device)
    rounded = ((bits + noise) & ~_LOW16).view(torch.float32)
    # a NaN whose bits are within the noise's reach of the int32 top (0x7FFF0001–0x7FFFFFFF,
    # CUDA's canonical 0x7FFFFFFF among them) may wrap past it to ±0 in the sum: finite
    # results of non-finite x
    ok = torch.isfinite(rounded) & torch.isfinite(x)
    out = torch.where(ok, rounded, x)  # non-finite inputs keep their own value
    if not bool(ok.all()):  # rare: a non-finite x, or a finite one rounded past the largest
        # bfloat16, which takes it (the lower neighbour in magnitude: round-to-nearest of x
        # turned those above 3.3961e38 into Inf)
        out = torch.where(ok | ~torch.isfinite(x), out, (bits & ~_LOW16).view(torch.float32))
    return out.to(torch.bfloat16)  # exact: the low 16 bits are zero


def _stochastic_round_bf16_f64(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """:func:`stochastic_round_bf16` of a float64 ``x``: noise ``n`` uniform on
    ``[0, 2^45)``; for ``|x| ≥ 2^-126`` (bfloat16's normal numbers) the float32 method on
    the float64 pattern — ``n`` added to its 45 low mantissa bits, which are then
    truncated; below, where bfloat16's grid is the multiples of ``2^-133``, ``q = x·2^133``
    rounds to ``⌊q⌋ + [n < (q − ⌊q⌋)·2^45]``. Finite ``|x|`` past the largest bfloat16
    takes it; NaN and ±Inf stay."""
    xc = x.clamp(-_BF16_MAX, _BF16_MAX)  # on the grid: no noise carries it past (NaN stays NaN)
    noise = torch.randint(0, _LOW45 + 1, x.shape, generator=generator, dtype=torch.int64,
                          device=_draw_device(generator, x)).to(x.device)
    out = ((xc.view(torch.int64) + noise) & ~_LOW45).view(torch.float64)
    small = (xc.abs() < _F32_TINY) & (xc != 0)  # (±0: kept by the above)
    if bool(small.any()):  # rare: bfloat16's subnormals
        q = xc * 2.0**133  # exact (a power of two), |q| < 2^7 where used
        low = q.floor()
        sub = (low + (noise.double() < (q - low) * 2.0**45).double()) * 2.0**-133
        out = torch.where(small, sub, out)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        out = torch.where(finite, out, x)
    return out.to(torch.bfloat16)  # exact: on the grid


# ---------------------------------------------------------------------------- int8 codes


def _int8_codes(rows: torch.Tensor, scale: torch.Tensor, generator: torch.Generator | None,
                stochastic: bool = True) -> torch.Tensor:
    """Codes ``c`` for the rows ``x`` of a 2-D float32 (or float64) tensor, one scale
    ``s`` per row, given ``|x| ≤ 127·s``.

    Stochastic: with ``q = x/s`` and ``u ~ U[0, 1)``, ``c = ⌊q⌋ + [u < q − ⌊q⌋]``, so
    ``P(c = ⌊q⌋ + 1) = q − ⌊q⌋`` and ``E[c] = q``, i.e. ``E[c·s] = x`` (up to ``2^-24·s``
    from the float32 grid of ``u``; float64 rows: a float64 ``u``, up to ``2^-53·s``). ``|q| ≤ 127`` makes ``c ∈ [-127, 127]``, so the
    clamp to 127 never acts and cannot bias. Codes also stop at ``⌊FLT_MAX/s⌋`` where that
    is less than 127 (a row whose absmax is within a factor 2 of float32's largest value:
    ``c·s`` would decode to Inf), saturating there: biased only for those values, finite
    as they are. Otherwise round-to-nearest. Rows whose scale is not
    finite (they held NaN or ±Inf) get codes 0: their NaN scale carries the non-finiteness.
    """
    finite = torch.isfinite(scale)
    q = torch.where(finite[:, None], rows / scale[:, None], 0.0)
    if stochastic:
        low = q.floor()
        u = torch.rand(q.shape, generator=generator, dtype=q.dtype,
                       device=_draw_device(generator, q)).to(q.device)
        q = low + (u < q - low).to(q.dtype)
    else:
        q = q.round()
    top = (torch.finfo(torch.float32).max / scale.double()).floor().clamp(max=_INT8_MAX)
    top = torch.where(finite, top, float(_INT8_MAX)).to(q.dtype)[:, None]  # (R, 1)
    return q.clamp(-top, top).to(torch.int8)  # one pass, per-row bounds


def _nan_unless_finite(scale: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """A row or block holding NaN or ±Inf gets scale NaN, so it decodes to NaN: a
    non-finite value never comes back finite."""
    return torch.where(torch.isfinite(absmax), scale, torch.nan)


def _pow2_scale(absmax: torch.Tensor) -> torch.Tensor:
    """Smallest ``s = 2^k`` with ``absmax ≤ 127·s`` (``k ≥ -133``); all-zero rows get 1.

    Why a power of two: a code has at most 7 significant bits (``|c| ≤ 127``) and
    bfloat16 has 8, so ``c·2^k`` is exactly a bfloat16 number for ``-133 ≤ k ≤ 121``,
    i.e. for rows with ``absmax ≤ 127·2^121 ≈ 3.3766e38``; a row above (up to float32's
    3.4028e38) gets ``k = 122`` and codes up to 63 (:func:`_int8_codes`: ``64·2^122`` is
    ``2^128``, Inf), exact in bfloat16 too. The bfloat16 image of the weight that autograd sees is then the int8 weight itself,
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
    scale per row of ``x.flatten(1)`` (dimension 0: an ``nn.Linear``/``nn.Conv*`` weight's
    output channels; Hugging Face ``Conv1D``'s (in, out) weight: its input features):
    ``scale[i] = 2^⌈log2(
    max|x[i]|/127)⌉``. Stochastic rounding (default) makes it unbiased,
    ``E[decode(encode(x))] = x``, and the decode is exact in bfloat16 (see
    :func:`_pow2_scale`). A row holding NaN or ±Inf decodes to NaN. A float64 ``x`` is
    rounded from its own value (``x/s`` in float64: exact, a power-of-two scale), any
    other dtype as float32."""
    if x.ndim < 2:
        raise ValueError(f"per-channel int8 needs a tensor with ndim ≥ 2, got shape "
                         f"{tuple(x.shape)} (1-D parameters stay bfloat16)")
    rows = (x if x.dtype == torch.float64 else x.float()).flatten(1)
    # a channel of no elements has range 0 (amax over an empty dimension raises)
    scale = _pow2_scale(rows.abs().amax(1) if rows.shape[1] else rows.new_zeros(rows.shape[0]))
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


__all__ = [
    "BLOCK_SIZE",
    "FORMATS",
    "decode_int8_blockwise",
    "decode_int8_per_channel",
    "encode_int8_blockwise",
    "encode_int8_per_channel",
    "stochastic_round_bf16",
]
