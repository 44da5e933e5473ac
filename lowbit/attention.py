"""Fully quantized scaled-dot-product attention: its six GEMMs by name (docs/METHOD.md §7).

For each batch entry and head, with queries ``Q`` (L, E), keys ``K`` (S, E), values
``V`` (S, Ev), scale ``c`` (default ``1/√E``) and an additive mask ``M``::

    scores      S  = c · Q_f(Q) · Q_f(K)ᵀ + M          forward spec (round-to-nearest)
                P  = softmax(S),  P̃ = P ⊙ keep/(1−p)   float (dropout: keep ~ Bernoulli(1−p))
    output      O  = Q_f(P̃) · Q_f(V)                   forward spec; P̃ ∈ [0, 1/(1−p)]
    grad_probs  ∇P̃ = Q_a(∇O) · Q_f(V)ᵀ                 grad_input spec, a scale per query token
    grad_value  ∇V = (Q_w(∇Oᵀ) · Q_f(P̃))ᵀ              grad_weight spec, a scale per value feature
                ∇S = P ⊙ (∇P − rowsum(∇P ⊙ P)),  ∇P = ∇P̃ ⊙ keep/(1−p)   float
    grad_query  ∇Q = c · Q_a(∇S) · Q_f(K)               grad_input spec, a scale per query token
    grad_key    ∇K = c · Q_w(∇Sᵀ) · Q_f(Q)              grad_weight spec, a scale per key token

Every gradient operand is oriented so that its rows are the dimension its GEMM does not
sum over (the rule of docs/METHOD.md §2), and ``∇O`` and ``∇S`` are each quantized twice, by
independent draws. The backward is straight-through for the forward quantizers, so with
unbiased gradient quantizers the result is an unbiased estimate of the QAT gradient (the
gradient of the forward-quantized attention, which ``grad_input = grad_weight = None``
computes exactly). The forward spec is the recipe's ``activation`` spec for all of
``Q, K, V, P̃``. Per tensor means one scale for the whole tensor of every batch entry and
head (as a Linear's activation scale spans the batch); per row, one per (batch, head,
token). Gradient ranges are always dynamic here (a predicted-range spec is read as
dynamic: attention keeps no range history).

Execution: each head's GEMM runs as an exact int32 product into one accumulator
(:func:`lowbit.kernels.int8.int_mm_batched`: the whole batch in one call of the AMX
kernel where the CPU has AMX, of the AVX-512 VNNI kernel where it has VNNI but no AMX,
exact float32 ``bmm`` calls of the codes where it has no int8 dot product
(:mod:`lowbit.kernels.exact_f32`), else ``torch._int_mm`` per head), with one batched epilogue
(:func:`batched_mm`), when both operands are int8 codes with
their steps off the summed dimension, the backend is not ``reference``, and each head's
GEMM is big enough to amortise one call per head
(:data:`LOOP_MIN_MACS`; ``backend="int8"`` always loops, or raises where it cannot);
otherwise all heads run as one batched float GEMM of the dequantized codes (simulated,
the same estimator; ``lowbit.coverage`` reports it so). Row-mixing gradient quantizers
(``bhq``, ``hadamard``) transform a gradient operand's rows (all heads' rows, B·R of
them) with the quantizer's ``entries`` set to the B heads (:func:`grad_operand`): BHQ
then builds each head's groups from that head's rows alone
(:func:`lowbit.quantizers.bhq.bhq_transform`; its per-head estimate is unbiased as the
whole operand's is, docs/METHOD.md §7), Hadamard's blocks are drawn over all rows as
ever. Where the transform stays within each head's rows — BHQ always, Hadamard where its
blocks divide the head's row count, as 64 divides 128 query tokens or 64 value features
— the heads' GEMMs run on the transformed codes like any others and ``T⁻¹`` is applied
to the product's rows (per head, since no group or block spans two); otherwise (Hadamard
blocks that do not divide) the inverse is applied to the operand before the GEMM, which
then runs simulated (rows of different heads meet different right operands). Noise: one backward call advances the state's counter once (:mod:`lowbit.noise`);
each of the four gradient operands gets its own generator split from its path's. Where
both of a gradient's quantizations are plain (PTQ/PSQ, dynamic range, a fused backend),
they come from one read of it (:func:`lowbit.gradpair.quantize_grad_pair` with
``batched=True``): ``∇S`` is then never transposed in memory for ``∇K``; the codes are
bitwise those of the two calls. With BHQ or Hadamard rows beside a plain transpose, the
pair is :func:`lowbit.gradpair.quantize_grad_pair_mixed` with the heads as entries (the
heads' column ranges from the transform's pass over the rows; bitwise the two calls too).

Memory: the forward keeps ``Q``, ``K``, ``V`` and ``P̃`` as codes, never a float (B, L, S)
tensor, and the backward recomputes ``P`` from the codes. On the CPU with lowbit's
AVX-512 kernels (or their AVX2 builds: ``lowbit.kernels.avx512.isa()``) neither pass forms the whole ``P`` or ``∇S`` where it need not: the
forward (round-to-nearest ``P̃``, no dropout, ``P̃`` not returned) forms ``P``, its codes
and ``P̃·V`` :data:`CHUNK_SCORES` score elements of entries at a time — per tensor after a
first pass that finds ``P``'s absmax (one more ``QKᵀ`` and softmax) — and the backward
with per-row gradient scales (PSQ) recomputes ``P``, forms ``∇S``, quantizes it with
the whole ``∇S``'s noise and multiplies piece by piece: bitwise the whole computation
(each step is per entry or per row, and the noise is indexed by the element's place in
the whole tensor) — with one exception: where a step is so large that an epilogue's
float32 intermediate could overflow (|∇S| or |Q|·|K| beyond about 1e34 / the summed
length), :func:`lowbit.kernels.int8.safe_scales` runs that call's epilogue in float64,
and a piece is a call: the other pieces keep float32 where the whole batch would have
gone float64 (1 ulp apart, both rounded once from exact sums). Pieces need the heads'
GEMMs on the integer kernels (:func:`_integer_heads`; a simulated batch of one entry
takes another path in torch). Otherwise ``P`` is formed whole and ``∇S`` written over it
in pieces. ``lowbit.coverage`` traces attention whole (the pieces need lowbit's AVX-512
kernels, which do not run under a trace): the same GEMMs, and where an untraced step would
make the forward's first pass (``P̃`` per tensor, in pieces) the traced one runs that
``QKᵀ`` too, so the trace counts it.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from . import grid_notes
from .scopes import scope

from . import gradpair
from .config import Backend, FQTConfig, GradSpec, OperandSpec
from .formats import Format, Granularity, IntFormat, Rounding, compute_dtype
from .functional import call_state, output_dtype, per_call, quantize_forward, quantize_gradient
from .gradpair import quantize_grad_pair, quantize_grad_w
from .kernels import Encoded, Impl, Kernels, avx512, compiled, fp8, int8, int8_applicable, kernels_for, register, register_fused
from .kernels.softmax import inplace_ok as _inplace_ok
from .kernels.softmax import masked_softmax
from .noise import Path, generator_for
from .attention_args import additive_mask, check_arguments
from .ops import (BlockState, engine_needs, flatten_operand, tensor_slots, refuse_double_backward, refuse_forward_transforms, unflatten_operand,
                  warn_if_not_adaptive)
from .quantizers import QuantizedOperand, get_quantizer
from .quantizers.base import GradQuantizer, Identity, RowTransform

# Per-head multiply-adds from which heads run one integer GEMM each (into one
# accumulator, one batched epilogue); below, one batched float GEMM of the dequantized
# codes is faster on the CPU. Measured over 64 heads, 1 thread, with a loop of
# torch._int_mm (benchmarks/probes/attention_heads_crossover.py): integer/batched time
# 2.0 at 32³, 0.96 at 64³, 0.60 at 128×64×128, 0.53 at 256×64×256. The batched AMX call
# (2026-12-02, a /tmp script, with its epilogue, 64 heads, 1 thread) crosses over at the
# same place: 0.25 vs 0.05 ms at 16³, 0.32 vs 0.13 ms at 32³, 0.54 vs 0.84 ms at 64³.
LOOP_MIN_MACS = 1 << 18
# Score elements per piece (4 MB of float32, whole entries): the forward's P and P̃·V and
# the backward's P, ∇S and their products in pieces where the recipe allows (module
# docstring, "Memory"), else the backward's ∇S written over P piece by piece
# (docs/benchmarks.md, "Attention in pieces", "Peak memory").
CHUNK_SCORES = 1 << 20
Generators = dict[Path, torch.Generator]


# -- batched GEMM operands -------------------------------------------------------------------
def _dequantize(codes: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return codes.to(step.dtype) * step


def _once(make: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``make``, called at most once (its result kept)."""
    return functools.cache(make)


register_fused("attention_dequantize", _dequantize)  # a dispatcher row like every kernel
register("attention_dequantize", Impl.NATIVE, avx512.run_attention_dequantize, ("cpu",),
         avx512.supports_attention_dequantize)


@dataclass(frozen=True)
class Operand:
    """One side of a batched GEMM, (B, R, C): int8 ``codes`` times ``step`` ((1, 1, 1),
    (B, R, 1) per row or, transposed, (B, 1, C) per column), or — ``codes`` None — float
    ``values``: dequantized low-bit values (``lowbit``) or a float (QAT) operand.

    Codes of a row-mixing quantizer whose transform stays within entries (Hadamard blocks
    that divide R) carry it as ``transform``: the product's rows then take ``T⁻¹``
    (:func:`batched_mm`), and ``simulated`` gives the values where the GEMM runs simulated
    (``T⁻¹`` of the dequantized codes, as for any other row transform)."""

    codes: torch.Tensor | None = None
    step: torch.Tensor | None = None
    values: torch.Tensor | None = None
    lowbit: bool = True
    transform: RowTransform | None = None
    simulated: Callable[[], torch.Tensor] | None = None
    why: str | None = None  # values made from codes here: why (for a coverage trace)

    @classmethod
    def of(cls, q: QuantizedOperand, shape: tuple[int, int, int], dtype: torch.dtype) -> Operand:
        """``q`` (rows flattened to B·R) as a (B, R, C) operand; a row transform other than
        the identity (unless it stays within entries), an offset or block scales
        (asymmetric and block formats) are applied here, on the operand."""
        aligned = q.offset is None and q.block_scale is None and q.transform.within_entries(shape[1])
        if not (q.plain or aligned):
            why = (grid_notes.BLOCK_SCALED if q.block_scale is not None else
                   "an operand has an offset (an asymmetric grid)" if q.offset is not None else
                   f"an operand has a row transform ({type(q.transform).__name__}) that mixes rows "
                   "of different heads")
            return cls(values=q.dequantize(dtype).reshape(shape), why=why)
        per_row = q.step.shape[0] != 1  # (0 rows: an empty operand's steps are per row too)
        step = q.step.reshape(shape[0], shape[1], 1) if per_row else q.step.reshape(1, 1, 1)
        if q.plain:
            return cls(q.codes.reshape(shape), step)
        return cls(q.codes.reshape(shape), step, transform=q.transform,
                   simulated=_once(lambda: q.dequantize(dtype).reshape(shape)))

    @property
    def mT(self) -> Operand:  # noqa: N802 (as torch.Tensor.mT)
        if self.codes is None or self.transform is not None:
            values = self.values if self.codes is None else self.simulated()
            return Operand(values=values.mT, lowbit=self.lowbit, why=self.why or _transform_why(self))
        return Operand(self.codes.mT, self.step.mT)

    def entries(self, i: int, j: int) -> Operand:
        """Batch entries ``i:j`` of this operand (views)."""
        if self.codes is None:
            return Operand(values=self.values[i:j], lowbit=self.lowbit, why=self.why)
        step = self.step if self.step.shape[0] == 1 else self.step[i:j]
        if self.transform is None:
            return Operand(self.codes[i:j], step)
        rows, whole = self.codes.shape[1], self.simulated
        return Operand(self.codes[i:j], step, transform=self.transform.entries(i * rows, j * rows),
                       simulated=lambda: whole()[i:j])

    def scaled(self, c: float) -> Operand:
        """``c`` times this operand: folded into the steps (or the values)."""
        if self.codes is None:
            return Operand(values=self.values * c, lowbit=self.lowbit, why=self.why)
        if self.transform is None:
            return Operand(self.codes, self.step * c)
        whole = self.simulated
        return Operand(self.codes, self.step * c, transform=self.transform,
                       simulated=_once(lambda: whole() * c))

    def dequantize(self, dtype: torch.dtype, kernels: Kernels | None = None) -> torch.Tensor:
        """The values (the steps' dtype for codes), through ``kernels``' dispatcher row
        ``attention_dequantize`` (compiled for large operands on a fused backend: the same
        arithmetic, an exact cast and one multiply), or plain torch without ``kernels``;
        with a ``transform``, its :attr:`simulated` values."""
        if self.codes is None:
            return self.values.to(dtype)
        if self.transform is not None:
            return self.simulated().to(dtype)
        if kernels is not None:
            return kernels.run("attention_dequantize", self.codes, self.step)
        return _dequantize(self.codes, self.step)

    def head(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes[i], self.step[i if self.step.shape[0] > 1 else 0]


def batched_product(a: Operand, b: Operand, backend: Backend, dtype: torch.dtype, what: str
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, Kernels]:
    """``a @ b`` per batch entry ((B, M, K) × (B, K, N)) before its epilogue: ``(acc,
    a_step, b_step, kernels)`` with the exact int32 (B, M, N) accumulator of the heads'
    integer GEMMs (:func:`lowbit.kernels.int8.int_mm_batched`: one AMX or VNNI call for the
    batch, exact float32 ``bmm`` calls on a CPU without an int8 dot product, else
    ``torch._int_mm`` per head), whose value is ``(acc·a_step)·b_step`` (steps per row
    of ``a``, per column of ``b``), or ``(product in dtype, None, None, kernels)`` where
    the GEMM runs simulated (module docstring); ``kernels``: the call's kernels."""
    n_batch, m, k = (a.codes if a.codes is not None else a.values).shape
    n = (b.codes if b.codes is not None else b.values).shape[2]
    kernels = kernels_for(backend, (a.codes if a.codes is not None else a.values).device)
    both = a.codes is not None and b.codes is not None and b.transform is None
    integer = both and backend is not Backend.REFERENCE and n_batch > 0 \
        and int8_applicable(*a.head(0), *b.head(0))
    if integer and (backend.value == "int8" or m * k * n >= LOOP_MIN_MACS):
        with scope("lowbit::gemm"):
            return int8.int_mm_batched(a.codes, b.codes), a.step, b.step, kernels
    if 0 in (n_batch, m, k, n):  # nothing to multiply: every backend's zero (empty) product
        like = a.codes if a.codes is not None else a.values  # (a strict backend refused it: a review)
        return like.new_zeros((n_batch, m, n), dtype=dtype), None, None, kernels
    if backend.value in ("int8", "fp8") and a.lowbit and b.lowbit:  # no silent simulation
        why = "lowbit's attention has no FP8 kernel" if backend is Backend.FP8 else \
            _why_simulated(a, b, backend, integer, m * k * n)  # the reason coverage gives
        raise ValueError(f"backend={backend.value!r} cannot compute attention's {what} GEMM "
                         f"per head ({why}); use backend='auto' (simulated there)")
    a_values, b_values = a.dequantize(dtype, kernels), b.dequantize(dtype, kernels)
    with scope("lowbit::gemm"), grid_notes.simulating(lambda: _why_simulated(a, b, backend, integer, m * k * n)):
        return torch.matmul(a_values, b_values), None, None, kernels


def _transform_why(o: Operand) -> str | None:
    return None if o.transform is None else \
        f"the right operand has a row transform ({type(o.transform).__name__}) on its summed dimension"


def _why_simulated(a: Operand, b: Operand, backend: Backend, integer: bool, macs: int) -> str:
    """Why :func:`batched_product` runs a batch simulated (for a coverage trace): the
    reference backend, heads too small to pay, what made an operand values (a block
    format, an offset, a row transform across heads), FP8 codes (no batched FP8 kernel
    here), else the integer kernel's refusal."""
    if backend is Backend.REFERENCE:
        return grid_notes.REFERENCE
    if integer:
        return (f"heads too small for the per-head integer GEMM to pay (under LOOP_MIN_MACS = "
                f"{LOOP_MIN_MACS:,} multiply-adds a head): one batched float GEMM of the codes")
    why = a.why or b.why or _transform_why(b)
    if why is not None:
        return why
    mix = fp8.mixed_codes(*(o.codes.dtype for o in (a, b) if o.codes is not None))
    if mix:  # int8 on both would be real: the mix named, not only FP8 (a review)
        return (f"its operands' codes are {mix}: lowbit's attention has no FP8 kernel, alone or beside "
                "integer codes (int8 specs on both run on the integer kernels; one batched float GEMM "
                "of the codes)")
    if any(o.codes is not None and o.codes.dtype != torch.int8 for o in (a, b)):
        return "FP8 codes: lowbit's attention has no FP8 kernel (one batched float GEMM of the codes)"
    return "a scale on the summed dimension, or shapes the integer kernel refuses"


def batched_mm(a: Operand, b: Operand, backend: Backend, dtype: torch.dtype, what: str) -> torch.Tensor:
    """``a @ b`` per batch entry: (B, M, K) × (B, K, N) → (B, M, N) in ``dtype``: the
    :func:`batched_product` and, for integer heads, one batched ``int8_epilogue``
    (``acc · a_step · b_step``, the steps broadcast per row of ``a`` and per column of
    ``b``) — no per-head dispatch, scaling or stacking (measured: docs/coverage.md,
    "Why not 100% real integer")."""
    acc, a_step, b_step, kernels = batched_product(a, b, backend, dtype, what)
    if a_step is None:
        return acc
    # with a row transform, the product T·(a @ b) in the steps' dtype (float64 where the
    # transform ran in float64: T·(a @ b) may be up to √block times a @ b, past float32)
    mid = dtype if a.transform is None else torch.promote_types(torch.promote_types(a_step.dtype, b_step.dtype),
                                                                 dtype)
    with scope("lowbit::epilogue"):
        if a.transform is not None and mid == dtype:  # T⁻¹ with the epilogue where it has a kernel for it
            out = a.transform.epilogue_inverse(kernels, acc, a_step, b_step, a.codes.shape[2], dtype)
            if out is not None:
                return out.view(acc.shape)
        out = int8.epilogue(kernels, acc, a_step, b_step, None, None, None, None, a.codes.shape[2], None, mid)
    if a.transform is None:
        return out
    n_batch, m, n = out.shape  # T⁻¹ on the product's rows, which stay within their entries
    with scope("lowbit::transform"):
        return a.transform.inverse(out.reshape(n_batch * m, n), dtype, overwrite=True).reshape(n_batch, m, n)


# -- the math, without autograd ------------------------------------------------------------
def attention_probs(qq: QuantizedOperand, qk: QuantizedOperand, mask: torch.Tensor | None,
                    scale: float, shapes: tuple[int, ...], dtype: torch.dtype, backend: Backend,
                    masked: bool, entries: tuple[int, int] | None = None) -> torch.Tensor:
    """``P = softmax(c · Q_f(Q) · Q_f(K)ᵀ + M)`` (B, L, S) in ``dtype`` from the forward
    codes ``qq``, ``qk`` (``shapes`` = (B, L, S, E, Ev)); ``masked``: zero the rows the
    mask blocks entirely (:func:`masked_softmax`); the epilogue, the mask and the softmax
    are the kernel-table op ``attention_softmax`` (:mod:`lowbit.kernels.softmax`: fused on
    AVX-512 CPUs, to float rounding). Deterministic in its arguments, so the
    backward recomputes ``P`` from the saved codes instead of keeping it (a float32
    (B, L, S) tensor: 48 MB for one GPT-2-small block of 4 × 512 tokens), a few entries
    at a time where it can (:func:`attention_backward`). ``entries`` = (i, j): entries
    ``i:j`` of ``P`` alone ((j − i, L, S), the same values as those entries of the whole)."""
    b, lq, s, e, _ = shapes
    a = Operand.of(qq, (b, lq, e), dtype).scaled(scale)  # c in Q's steps
    k = Operand.of(qk, (b, s, e), dtype).mT
    if entries is not None and entries != (0, b):  # the whole batch: the mask as it is
        a, k = a.entries(*entries), k.entries(*entries)
        mask = None if mask is None else _mask_entries(mask, *entries)
    acc, a_step, b_step, kernels = batched_product(a, k, backend, dtype, "Q·Kᵀ")  # (B, L, S)
    # a new tensor from the GEMM, which no one else sees: P is written over it
    return kernels.run("attention_softmax", kernels, acc, a_step, b_step, mask, masked, dtype)


def _mask_entries(mask: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """Entries ``i:j`` of an additive mask (1, L, S) or (*lead, L, S) with ``prod(lead)``
    entries (an expanded view is fine): the mask itself where one serves every entry, a
    view where the entries are one slice of it, else a copy of those entries alone."""
    lead = mask.shape[:-2]
    if lead.numel() == 1:
        return mask
    try:
        return mask.view(-1, *mask.shape[-2:])[i:j]
    except RuntimeError:  # an expanded (*lead) view: gather the piece's entries
        index = torch.unravel_index(torch.arange(i, j), tuple(lead))
        # a broadcast (stride-0) L or S dimension stays broadcast, so that the piece's
        # softmax takes the whole batch's kernel (a review: a (B, 1, L, 1) mask's gathered
        # pieces ran the native softmax, the whole batch ATen's: not bitwise the whole)
        rows, cols = (1 if mask.stride(-2) == 0 else mask.shape[-2]), (1 if mask.stride(-1) == 0 else mask.shape[-1])
        return mask[..., :rows, :cols][index].expand(j - i, *mask.shape[-2:])


def _dropout_scale(p: float) -> float:
    return 0.0 if p >= 1 else 1.0 / (1.0 - p)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      scale: float, dropout_p: float, config: FQTConfig, gens: Generators,
                      causal: bool = False, keep_probs: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None,
                                 tuple[QuantizedOperand, ...]]:
    """``q`` (B, L, E), ``k`` (B, S, E), ``v`` (B, S, Ev), ``mask`` additive (1, L, S) or
    (*lead, L, S) with ``prod(lead) = B`` (an expanded view is fine), or None (``causal``: it is the causal mask, which blocks no row entirely), all in one
    float dtype → ``(O (B, L, Ev), P, P̃ (B, L, S), keep (bool or
    None), (Q_f(q), Q_f(k), Q_f(v), Q_f(P̃)))``. Dropout draws ``keep`` from torch's
    global RNG (as ``F.dropout``: recomputation under checkpointing sees the same).

    Without ``keep_probs`` (the caller wants neither ``P`` nor ``P̃``: returned as None) and
    without dropout, where :func:`_forward_in_pieces_ok` says so (round to nearest, a scale
    per tensor — then over more than one piece — or per row, integer heads, lowbit's
    AVX-512 quantizer), the scores are formed :data:`CHUNK_SCORES` elements of entries at a
    time (:func:`_forward_in_pieces`), so no score-sized float buffer exists: the same
    outputs and codes, bitwise (but for :func:`lowbit.kernels.int8.safe_scales`'s float64
    epilogue, decided per call, so per piece: module docstring)."""
    b, lq, e = q.shape
    s, ev = k.shape[1], v.shape[2]
    dt, spec, gen, be = q.dtype, config.activation, gens.get(Path.ACTIVATION), config.backend
    qq = quantize_forward(q.reshape(b * lq, e), spec, gen, be)
    qk = quantize_forward(k.reshape(b * s, e), spec, gen, be)
    if not keep_probs and dropout_p == 0 and _forward_in_pieces_ok(spec, be, (b, lq, s, e, ev), dt):
        qv = quantize_forward(v.reshape(b * s, ev), spec, gen, be)
        done = _forward_in_pieces(qq, qk, qv, mask, scale, (b, lq, s, e, ev), dt, spec, be, causal)
        if done is not None:
            return done[0], None, None, None, (qq, qk, qv, done[1])
        # a NaN, an infinity or all zeros in P̃: the whole computation below, as always
    elif not keep_probs and dropout_p == 0 and grid_notes.LISTENERS and spec.granularity is Granularity.TENSOR \
            and _forward_in_pieces_untraced(spec, be, (b, lq, s, e, ev), dt):
        # traced (lowbit.coverage): the pieces' C kernels do not run under a dispatch mode,
        # so the whole computation below runs; the first pass over P's absmax that an
        # untraced step makes is one more QKᵀ (and softmax): run it, so the trace counts it
        # (a new user's trial: a Llama's forward FLOPs were 13% short)
        attention_probs(qq, qk, mask, scale, (b, lq, s, e, ev), dt, be, mask is not None and not causal)
    probs = attention_probs(qq, qk, mask, scale, (b, lq, s, e, ev), dt, be,
                            mask is not None and not causal)  # (B, L, S); causal: none dead
    keep = None
    dropped = probs
    if dropout_p > 0:
        keep = torch.empty_like(probs).bernoulli_(1 - dropout_p).bool()
        dropped = probs * keep * _dropout_scale(dropout_p)
    qp = quantize_forward(dropped.reshape(b * lq, s), spec, gen, be)
    qv = quantize_forward(v.reshape(b * s, ev), spec, gen, be)
    out = batched_mm(Operand.of(qp, (b, lq, s), dt), Operand.of(qv, (b, s, ev), dt), be, dt, "P·V")
    return out, probs, dropped, keep, (qq, qk, qv, qp)


def _pieces(n: int, lq: int, s: int) -> list[tuple[int, int]]:
    """Entries ``i:j`` of each piece: :data:`CHUNK_SCORES` score elements of whole entries
    (at least one entry)."""
    per = max(1, CHUNK_SCORES // max(1, lq * s))
    return [(i, min(n, i + per)) for i in range(0, n, per)]


def _integer_heads(shapes: tuple[int, ...], backend: Backend, *formats: Format) -> bool:
    """Whether every per-head GEMM of attention's pieces runs on the integer kernels:
    symmetric integer codes (no offset, block scale or FP8: those run simulated) and heads
    of at least :data:`LOOP_MIN_MACS` multiply-adds (``backend="int8"`` loops at any size).
    Then a piece's products are each entry's exact integer sums and per-row epilogues,
    the values the whole batch gets; a simulated batch of one entry is not (torch's
    batch-one matmul takes another path)."""
    _, lq, s, e, ev = shapes
    if not all(isinstance(f, IntFormat) and not f.asymmetric and not f.block for f in formats):
        return False
    return backend is Backend.INT8 or lq * s * min(e, ev) >= LOOP_MIN_MACS


def _forward_in_pieces_ok(spec: OperandSpec, backend: Backend, shapes: tuple[int, ...],
                          dtype: torch.dtype) -> bool:
    """Whether :func:`_forward_in_pieces` takes scores of ``shape`` (B, L, S): the forward
    spec rounds to nearest (no noise to place) with a scale per tensor or per row, a fused
    backend, and lowbit's AVX-512 quantizer takes such a ``P̃`` (the one kernel that
    quantizes a part with the whole operand's step), the heads' GEMMs integer
    (:func:`_integer_heads`); per tensor, only scores of more than one piece (its first
    pass costs one more ``QKᵀ`` and softmax: +5% of a GPT-2-small block's step at one
    thread, docs/benchmarks.md "Attention in pieces")."""
    b, lq, s = shapes[:3]
    if spec.rounding is not Rounding.NEAREST or spec.granularity not in (Granularity.TENSOR, Granularity.ROW) \
            or b == 0 or not kernels_for(backend, torch.device("cpu")).fused \
            or not _integer_heads(shapes, backend, spec.format):
        return False
    if spec.granularity is Granularity.TENSOR and len(_pieces(b, lq, s)) == 1:
        return False  # one piece: the first pass would cost time and save no memory
    probe = torch.empty(1, s, dtype=dtype)
    return avx512.supports(probe, spec.format, spec.granularity, spec.rounding, torch.zeros((), dtype=torch.int64))


def _forward_in_pieces_untraced(spec: OperandSpec, backend: Backend, shapes: tuple[int, ...],
                                dtype: torch.dtype) -> bool:
    """:func:`_forward_in_pieces_ok` as a step outside the dispatch modes running now
    would answer it (a :class:`lowbit.gemm_trace.GemmTracer` makes lowbit's C kernels
    decline, and ``lowbit.coverage`` turns the fused kernels off, so the traced step runs
    whole)."""
    with _disable_current_modes(), compiled.as_untraced():
        return _forward_in_pieces_ok(spec, backend, shapes, dtype)


def _forward_in_pieces(qq: QuantizedOperand, qk: QuantizedOperand, qv: QuantizedOperand, mask: torch.Tensor | None,
                       scale: float, shapes: tuple[int, ...], dtype: torch.dtype, spec: OperandSpec, backend: Backend,
                       causal: bool) -> tuple[torch.Tensor, QuantizedOperand] | None:
    """``(O (B, L, Ev), Q_f(P))`` with ``P`` formed :data:`CHUNK_SCORES` elements of entries
    at a time (after :func:`_forward_in_pieces_ok`; no dropout): per piece ``P``
    (:func:`attention_probs` of its entries), its codes, and its ``O = Q_f(P)·Q_f(V)``.
    Per tensor, ``P``'s absmax over all pieces comes first (a first pass that forms each
    piece and keeps only its maximum: one more ``QKᵀ`` and softmax per entry), and every
    piece is quantized with the whole tensor's step
    (:func:`lowbit.kernels.avx512.quantize_part_into`); per row, each piece's rows are
    quantized as they come. ``None`` (nothing kept) where ``P``'s absmax is not a finite
    positive number — a NaN or an infinity, or every row masked — which the whole
    computation handles as it always has (per tensor only: per row a non-finite row is its
    own)."""
    b, lq, s, e, ev = shapes
    masked = mask is not None and not causal
    pieces = _pieces(b, lq, s)
    k = kernels_for(backend, torch.device("cpu"))
    amax = None
    if spec.granularity is Granularity.TENSOR:
        amax = torch.zeros((), dtype=torch.float32)
        for i, j in pieces:
            # P ≥ 0 (softmax): its absmax is its max, NaN propagating
            amax = torch.maximum(amax, attention_probs(qq, qk, mask, scale, shapes, dtype, backend, masked,
                                                       (i, j)).amax().float())
        if not (torch.isfinite(amax) and amax > 0):
            return None
    codes = torch.empty(b * lq, s, dtype=spec.format.code_dtype)
    steps = torch.empty(b * lq, 1, dtype=torch.float32) if amax is None else None
    out = torch.empty(b, lq, ev, dtype=dtype)
    vo = Operand.of(qv, (b, s, ev), dtype)
    step = None
    for i, j in pieces:
        probs = attention_probs(qq, qk, mask, scale, shapes, dtype, backend, masked, (i, j)).reshape(-1, s)
        rows = slice(i * lq, j * lq)
        if amax is None:  # per row: the piece's rows are whole rows
            enc = k.quantize(probs, spec.format, spec.granularity, spec.rounding, torch.zeros((), dtype=torch.int64))
            codes[rows], steps[rows], part_step = enc.codes, enc.scale, enc.scale  # type: ignore[index]
        else:
            step = part_step = avx512.quantize_part_into(probs, spec.format, amax, codes[rows])
        del probs
        part = QuantizedOperand.of(Encoded(codes[rows], part_step, kernels=k), Identity((j - i) * lq))
        grid_notes.note(part.codes, spec.format)
        out[i:j] = batched_mm(Operand.of(part, ((j - i), lq, s), dtype), vo.entries(i, j), backend, dtype, "P·V")
    whole = Encoded(codes, steps if amax is None else step, kernels=k)
    grid_notes.note(codes, spec.format)
    return out, QuantizedOperand.of(whole, Identity(b * lq))


def _split(gen: torch.Generator | None, n: int) -> list[torch.Generator | None]:
    """``n`` independent generators drawn from ``gen`` (its next ``n`` draws)."""
    if gen is None:
        return [None] * n
    seeds = torch.randint(0, 2**63 - 1, (n,), generator=gen, device=gen.device)
    return [generator_for(int(x), gen.device) for x in seeds.tolist()]


def grad_operand(a: torch.Tensor, spec: GradSpec | None, gen: torch.Generator | None,
                 backend: Backend) -> Operand:
    """A gradient operand (B, R, C) whose rows R are its GEMM's non-summed dimension,
    quantized by ``spec`` (``None``: float, QAT)."""
    if spec is None:
        return Operand(values=a, lowbit=False)
    if a.numel() == 0:
        return Operand(values=a)
    # each entry's rows transformed on their own where the quantizer can (BHQ's groups per
    # head), so the heads' GEMMs may run on the integer kernels (module docstring)
    entries = a.shape[0] if _per_entry(get_quantizer(spec.quantizer)) else None
    q = quantize_gradient(a.reshape(-1, a.shape[2]), spec, gen, backend, entries=entries)
    return Operand.of(q, tuple(a.shape), a.dtype)  # type: ignore[arg-type]


def _per_entry(q: object) -> bool:
    """Whether the quantizer builds a transform per entry (overrides
    :meth:`~lowbit.quantizers.base.GradQuantizer.entry_transform`) and its ``quantize``
    takes ``entries`` (a user's quantizer may override ``quantize`` with the signature it
    had before: it then gets the whole operand, as before)."""
    cls = type(q)
    return cls.entry_transform is not GradQuantizer.entry_transform and _takes_entries(cls.quantize)


@functools.cache
def _takes_entries(fn: Callable[..., Any]) -> bool:
    params = inspect.signature(fn).parameters
    return "entries" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def grad_operand_t(a: torch.Tensor, spec: GradSpec | None, gen: torch.Generator | None,
                   backend: Backend, reuse: bool = False) -> Operand:
    """:func:`grad_operand` of each entry's transpose of ``a`` (B, N, C), i.e. of
    ``a.mT`` (B, C, N): quantized from ``a`` as it lies where the spec is plain
    (:func:`lowbit.gradpair.quantize_grad_w`: the same operand, bit for bit, without a
    transposed copy), else from the transpose (:func:`_transposed`: with ``reuse``, made
    in ``a``'s own memory)."""
    q = quantize_grad_w(a, spec, gen, kernels_for(backend, a.device), batched=True)
    if q is None:
        return grad_operand(_transposed(a, reuse), spec, gen, backend)
    b, n, c = a.shape
    return Operand.of(q, (b, c, n), a.dtype)


def attention_backward(g_out: torch.Tensor, g_dropped: torch.Tensor | None, quant: tuple[QuantizedOperand, ...],
                       probs: torch.Tensor | Callable[[int, int], torch.Tensor], keep: torch.Tensor | None,
                       shapes: tuple[int, ...], scale: float, dropout_p: float, config: FQTConfig,
                       gens: Generators, needs: tuple[bool, bool, bool, bool], reuse_probs: bool = False
                       ) -> tuple[torch.Tensor | None, ...]:
    """``(∇Q, ∇K, ∇V, ∇S)`` (None where ``needs`` says not wanted; ``∇S`` is the mask's
    gradient) from ``g_out`` (B, L, Ev) and the gradient ``g_dropped`` of the returned
    ``P̃`` (or None), given what :func:`attention_forward` returned; ``shapes`` = (B, L, S,
    E, Ev). ``reuse_probs``: the caller hands ``probs`` over (its values are lost): on the
    CPU ``∇S`` is then written over it in pieces and transposed in place for ``∇K``, so
    one score-sized float buffer is live at a time (pass it without keeping a reference
    for its memory to go); otherwise ``probs`` is only read.

    ``probs`` may instead be a function ``(i, j) ↦ P`` of entries ``i:j`` (a new tensor,
    handed over): where both gradient specs are plain with a scale per row (PSQ), ``∇Q``
    and ``∇K`` are wanted without ``∇S``, and lowbit's AVX-512 pair kernel takes ``∇S``,
    ``P`` is then recomputed, turned into ``∇S``, quantized and multiplied
    :data:`CHUNK_SCORES` elements of entries at a time (:func:`_grad_qk_in_pieces`), so no
    score-sized buffer exists at all — bitwise the values of the whole-batch computation
    (each step is per entry, and the noise is indexed by the element's place in the whole
    ``∇S``); otherwise it is called once for all entries."""
    b, lq, s, e, ev = shapes
    # predicted specs run dynamic here (module docstring): the pair kernel and the pieces take them
    gi, gw = (None if g is None else g.as_dynamic() for g in (config.grad_input, config.grad_weight))
    dt, be = g_out.dtype, config.backend
    rows_gen = _split(gens.get(Path.GRAD_INPUT), 2)  # ∇O, ∇S with a scale per query token
    cols_gen = _split(gens.get(Path.GRAD_WEIGHT), 2)  # ∇Oᵀ, ∇Sᵀ: per value feature, key token
    qq, qk, qv, qp = (Operand.of(q, sh, dt) for q, sh in
                      zip(quant, ((b, lq, e), (b, s, e), (b, s, ev), (b, lq, s))))
    # c of ∇Q = c·∇S·K and ∇K = c·∇Sᵀ·Q, in K's and Q's steps (values where not plain codes)
    qk_c = qk.scaled(scale) if needs[0] else None
    qq_c = qq.scaled(scale) if needs[1] else None
    gq = gk = gv = gs = None
    scores = needs[0] or needs[1] or needs[3]
    # ∇O for ∇P (rows: query tokens) and for ∇V (rows: value features) from one read
    go, go_t = _pair(g_out, gi, rows_gen[0], gw, cols_gen[0], be, needs[2] and scores, w_first=True)
    if needs[2]:
        if go_t is None:
            go_t = grad_operand_t(g_out, gw, cols_gen[0], be)
        gv = batched_mm(go_t, qp, be, dt, "∇V").mT
        del go_t
    if scores:
        if go is None:
            go = grad_operand(g_out, gi, rows_gen[0], be)
        if callable(probs):
            if needs[0] and needs[1] and not needs[3] and _in_pieces_ok(gi, gw, be, shapes, dt, config.activation):
                gq, gk = _grad_qk_in_pieces(go, qv.mT, qq_c, qk_c, probs, g_dropped, keep, dropout_p, gi,
                                            rows_gen[1], gw, cols_gen[1], be, dt, shapes)
                return gq, gk, gv, None
            probs, reuse_probs = probs(0, b), True
        gs = _grad_scores(go, qv.mT, probs, g_dropped, keep, dropout_p, be, dt, reuse_probs)
        del probs, go
        # ∇S for ∇Q (rows: query tokens) and ∇Sᵀ for ∇K (rows: key tokens) from one read
        gs_q, gs_k = _pair(gs, gi, rows_gen[1], gw, cols_gen[1], be, needs[0] and needs[1])
        if gs_q is not None:
            if not needs[3]:
                gs = None  # the float ∇S goes: its two operands are int8 codes
            gq = batched_mm(gs_q, qk_c, be, dt, "∇Q")
            del gs_q
            gk = batched_mm(gs_k, qq_c, be, dt, "∇K")
            return gq, gk, gv, gs if needs[3] else None
        if needs[0]:
            gq = batched_mm(grad_operand(gs, gi, rows_gen[1], be), qk_c, be, dt, "∇Q")
        if needs[1]:
            gs_t = grad_operand_t(gs, gw, cols_gen[1], be, reuse=not needs[3])
            if not needs[3]:
                del gs
                gs = None
            gk = batched_mm(gs_t, qq_c, be, dt, "∇K")
    return gq, gk, gv, gs if needs[3] else None


def _in_pieces_ok(spec_a: GradSpec | None, spec_w: GradSpec | None, backend: Backend,
                  shapes: tuple[int, ...], dtype: torch.dtype, forward: OperandSpec) -> bool:
    """Whether :func:`_grad_qk_in_pieces` takes a ``∇S`` of ``shape`` (B, L, S): both specs
    plain (:func:`lowbit.gradpair.quantize_grad_pair` takes them) with a scale per row —
    per query token for ``∇Q``, per key token for ``∇K``, so each piece's scales are its
    own — a fused backend, no autograd recording (``create_graph``), and lowbit's AVX-512
    pair kernel taking such a ``∇S`` (the only kernel that quantizes a part of a batch
    with the whole batch's noise), and the heads' GEMMs integer (:func:`_integer_heads`,
    with the forward spec ``forward`` of Q, K and V)."""
    if not (gradpair.plain(spec_a) and gradpair.plain(spec_w)) or torch.is_grad_enabled():
        return False
    if not all(get_quantizer(sp.quantizer).granularity is Granularity.ROW for sp in (spec_a, spec_w)):
        return False
    if not _integer_heads(shapes, backend, forward.format, spec_a.format, spec_w.format):  # type: ignore[union-attr]
        return False
    k = kernels_for(backend, torch.device("cpu"))
    probe = torch.empty(1, shapes[1], shapes[2], dtype=dtype)
    seed = torch.zeros((), dtype=torch.int64)
    return k.fused and shapes[0] > 0 and avx512.supports_batched_pair(
        probe, spec_a.format, Granularity.ROW, spec_a.rounding, seed,  # type: ignore[union-attr]
        spec_w.format, Granularity.ROW, spec_w.rounding, seed)  # type: ignore[union-attr]


def _grad_qk_in_pieces(g_out: Operand, v_t: Operand, q_c: Operand, k_c: Operand,
                       probs_of: Callable[[int, int], torch.Tensor], g_dropped: torch.Tensor | None,
                       keep: torch.Tensor | None, dropout_p: float, spec_a: GradSpec, gen_a: torch.Generator | None,
                       spec_w: GradSpec, gen_w: torch.Generator | None, backend: Backend, dtype: torch.dtype,
                       shapes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(∇Q, ∇K)`` (B, L, E), (B, S, E) in ``dtype`` (``shapes`` = (B, L, S, E, Ev)),
    :data:`CHUNK_SCORES` elements of entries at a time (after :func:`_in_pieces_ok`): per
    piece ``P`` (``probs_of``), ``∇S`` written over it (:func:`_grad_scores`), its two
    operands from one read with the whole ``∇S``'s noise (``quantize_batched_pair`` told
    the piece's first entry), and the piece's ``∇Q = c·Q_a(∇S)·Q_f(K)`` and ``∇K =
    c·Q_w(∇Sᵀ)·Q_f(Q)``; ``q_c``, ``k_c``: Q's and K's operands with ``c`` in their steps.
    The seeds are drawn once, as :func:`lowbit.gradpair.quantize_grad_pair` draws them for
    the whole ``∇S``."""
    n, lq, s, e, _ = shapes
    k = kernels_for(backend, torch.device("cpu"))
    like = torch.empty(0, dtype=dtype)
    drawn_a = gradpair.draw(like, spec_a, gen_a, n * lq, k)
    drawn_w = gradpair.draw(like, spec_w, gen_w, n * s, k)
    gq, gk = torch.empty(n, lq, e, dtype=dtype), torch.empty(n, s, e, dtype=dtype)
    for i, j in _pieces(n, lq, s):
        gs = _grad_scores(g_out.entries(i, j), v_t.entries(i, j), probs_of(i, j),
                          None if g_dropped is None else g_dropped[i:j], None if keep is None else keep[i:j],
                          dropout_p, backend, dtype, reuse_probs=True)
        qa, qw = gradpair.run_pair("quantize_batched_pair", gs, spec_a, drawn_a, spec_w, drawn_w, k, i)
        del gs  # its codes hold it now
        gq[i:j] = batched_mm(Operand.of(qa, (j - i, lq, s), dtype), k_c.entries(i, j), backend, dtype, "∇Q")
        gk[i:j] = batched_mm(Operand.of(qw, (j - i, s, lq), dtype), q_c.entries(i, j), backend, dtype, "∇K")
    return gq, gk


def _pair(g: torch.Tensor, spec_a: GradSpec | None, gen_a: torch.Generator | None,
          spec_w: GradSpec | None, gen_w: torch.Generator | None, backend: Backend, wanted: bool,
          w_first: bool = False) -> tuple[Operand | None, Operand | None]:
    """Both gradient operands of ``g`` (B, N, C) — its rows (B, N, C) and each entry's
    transpose (B, C, N) — quantized from one read (:func:`lowbit.gradpair.quantize_grad_pair`,
    bitwise :func:`grad_operand` and :func:`grad_operand_t`, drawing in the same order:
    ``w_first`` where the transpose's was drawn first), where ``wanted`` and the specs allow
    it; with a row-mixing ``Q_a`` that builds its transform per entry and quantizes the
    columns alongside (BHQ, Hadamard), :func:`lowbit.gradpair.quantize_grad_pair_mixed`
    with the entries; else ``(None, None)`` and nothing drawn."""
    if not wanted:
        return None, None
    k = kernels_for(backend, g.device)
    pair = quantize_grad_pair(g, spec_a, gen_a, spec_w, gen_w, k, batched=True, w_first=w_first)
    if pair is None and spec_a is not None and g.dim() == 3 and _per_entry(get_quantizer(spec_a.quantizer)):
        pair = gradpair.quantize_grad_pair_mixed(g.reshape(-1, g.shape[2]), spec_a, gen_a, spec_w, gen_w, k,
                                                 entries=g.shape[0], w_first=w_first)
    if pair is None:
        return None, None
    bn, n, c = g.shape
    return Operand.of(pair[0], (bn, n, c), g.dtype), Operand.of(pair[1], (bn, c, n), g.dtype)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A copy of the distinct elements of ``t`` (an expanded view: its stride-0 dimensions
    of size > 1 kept at size 1), which ``.expand(t.shape)`` turns back into ``t``'s values:
    the mask as it was at the forward, at the size of the user's mask, not of the scores."""
    for d in range(t.dim()):
        if t.stride(d) == 0 and t.shape[d] > 1:
            t = t.narrow(d, 0, 1)
    return t.clone()


def _grad_scores(g_out: Operand, v_t: Operand, probs: torch.Tensor, g_dropped: torch.Tensor | None,
                 keep: torch.Tensor | None, dropout_p: float, backend: Backend, dtype: torch.dtype,
                 reuse_probs: bool) -> torch.Tensor:
    """``∇S = P ⊙ (∇P − rowsum(∇P ⊙ P))`` (B, L, S), ``∇P = Q_a(∇O)·Q_f(V)ᵀ`` (plus
    ``g_dropped``, through dropout's mask), from ``g_out`` (B, L, Ev) and ``v_t`` (B, Ev,
    S). With ``reuse_probs``, on the CPU (:func:`_inplace_ok`), ``∇P`` is computed
    :data:`CHUNK_SCORES` elements of entries at a time and ``∇S`` written over ``probs``, so that no second score-sized
    buffer exists; each entry's values are those of the one-piece computation (its GEMM,
    epilogue and softmax backward are per entry and per row). Without dropout the epilogue
    and the softmax backward are one op (:func:`grad_scores_op`), in pieces or not."""
    def grad_probs(i: int, j: int) -> torch.Tensor:  # ∇P of entries i:j, a new tensor
        gp = batched_mm(g_out.entries(i, j), v_t.entries(i, j), backend, dtype, "∇P")
        if g_dropped is not None:
            gp = gp.add_(g_dropped[i:j])
        if keep is not None:
            gp = gp.mul_(keep[i:j]).mul_(_dropout_scale(dropout_p))
        return gp

    n, lq, s = probs.shape
    # ∇P's epilogue and the softmax backward as one op (not with a row transform: its T⁻¹
    # comes between them)
    fused = g_dropped is None and keep is None and g_out.transform is None
    if not (reuse_probs and _inplace_ok(probs)):
        if fused and probs.device.type == "cpu" and not _recorded(probs, g_out, v_t):
            # the op writes over its P: a copy, the caller's kept
            return grad_scores_op(g_out, v_t, probs.clone(), backend, dtype)
        return torch._softmax_backward_data(grad_probs(0, n), probs, -1, dtype)
    per = max(1, CHUNK_SCORES // max(1, lq * s))
    for i in range(0, n, per):
        j = min(n, i + per)
        if fused:
            grad_scores_op(g_out.entries(i, j), v_t.entries(i, j), probs[i:j], backend, dtype)
        else:
            torch._softmax_backward_data(grad_probs(i, j), probs[i:j], -1, dtype, grad_input=probs[i:j])
    return probs


def _recorded(probs: torch.Tensor, *operands: Operand) -> bool:
    """Whether autograd records an op on ``probs`` or the operands (``create_graph=True``):
    then ∇S must come from differentiable, out-of-place ops."""
    if not torch.is_grad_enabled():
        return False
    parts = [probs, *(t for o in operands for t in (o.codes, o.step, o.values) if t is not None)]
    return any(t.requires_grad for t in parts)


def grad_scores_op(g_out: Operand, v_t: Operand, probs: torch.Tensor, backend: Backend,
                   dtype: torch.dtype) -> torch.Tensor:
    """``∇S`` of ``∇P = Q_a(∇O)·Q_f(V)ᵀ`` (no dropout) written over ``probs`` (contiguous, on
    the CPU): the GEMM (:func:`batched_product`), then the kernel-table op
    ``attention_softmax_grad`` (its epilogue and the softmax backward; fused on AVX-512
    CPUs, :mod:`lowbit.kernels.softmax`)."""
    acc, a_step, b_step, kernels = batched_product(g_out, v_t, backend, dtype, "∇P")
    return kernels.run("attention_softmax_grad", kernels, acc, a_step, b_step, probs, dtype)


def _transposed(t: torch.Tensor, reuse: bool) -> torch.Tensor:
    """``t.mT`` of a (B, N, N) ``t``: with ``reuse`` (no one reads ``t`` afterwards) and a
    square contiguous ``t``, each entry is transposed in its own place (one (N, N) copy
    at a time), so that the row quantizer, which needs rows contiguous, reads it without
    a second score-sized buffer; the same values in the same layout as the copy
    ``t.mT.reshape(-1, N)`` makes otherwise."""
    if not reuse or t.shape[1] != t.shape[2] or not _inplace_ok(t):
        return t.mT
    for entry in t.unbind(0):
        entry.copy_(entry.mT.clone())
    return t


# -- autograd ------------------------------------------------------------------------------
def dynamic_grads(config: FQTConfig) -> FQTConfig:
    """``config`` as attention runs it: its gradient specs' ranges dynamic
    (:meth:`lowbit.config.GradSpec.as_dynamic`; attention keeps no range history)."""
    return dataclasses.replace(config, **{p: None if (g := getattr(config, p)) is None else g.as_dynamic()
                                          for p in ("grad_input", "grad_weight")})


def _forward_paths(config: FQTConfig) -> tuple[Path, ...]:
    return (Path.ACTIVATION,) if config.activation.rounding is Rounding.STOCHASTIC else ()


def _backward_paths(config: FQTConfig) -> tuple[Path, ...]:
    return tuple(p for p, s in ((Path.GRAD_INPUT, config.grad_input),
                                (Path.GRAD_WEIGHT, config.grad_weight)) if s is not None)


class _Attention(torch.autograd.Function):
    """``(O, P̃)`` of (B, L, E)/(B, S, E)/(B, S, Ev) inputs; ``P̃`` is empty unless asked for."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                state: BlockState, scale: float, dropout_p: float, out_dtype: torch.dtype,
                need_weights: bool, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cfg, dt = state.config, compute_dtype(q.dtype)
        with torch.autocast(q.device.type, enabled=False):  # the recipe's arithmetic
            gens = state.noise.forward_generators(q.device, _forward_paths(cfg))
            m = None if mask is None else mask.to(dt)
            out, probs, dropped, keep, quant = attention_forward(
                q.to(dt), k.to(dt), v.to(dt), m, scale, dropout_p, cfg, gens, causal, keep_probs=need_weights)
        # P is recomputed from Q_f(Q), Q_f(K) in the backward (attention_probs), not saved
        ctx.save_for_backward(*(t for x in quant for t in flatten_operand(x, out)),
                              None if m is None else _compact(m), keep)
        ctx.masked, ctx.compute_dtype, ctx.backend = mask is not None and not causal, dt, cfg.backend
        ctx.blocks = [x.block for x in quant]
        ctx.state, ctx.scale, ctx.dropout_p = state, scale, dropout_p
        ctx.shapes = (q.shape[0], q.shape[1], k.shape[1], q.shape[2], v.shape[2])
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, None if mask is None else mask.dtype)
        ctx.mask_shape = None if mask is None else mask.shape
        ctx.grad_slots = tensor_slots(q, k, v, mask)  # their edges: which the backward's caller asks for
        ctx.set_materialize_grads(False)
        weights = dropped.to(out_dtype) if need_weights else out.new_empty(0, dtype=out_dtype)
        if not need_weights:
            ctx.mark_non_differentiable(weights)
        return out.to(out_dtype), weights

    @staticmethod
    def backward(ctx: Any, g_out: torch.Tensor | None, g_weights: torch.Tensor | None) -> tuple:
        *codes, mask, keep = ctx.saved_tensors
        mask = None if mask is None else mask.expand(ctx.mask_shape)
        b, lq, s, e, ev = ctx.shapes
        needs = tuple(engine_needs(ctx, [bool(n) for n in ctx.needs_input_grad[:4]]))
        state: BlockState = ctx.state
        warn_if_not_adaptive(state)
        cfg, dt = state.config, ctx.compute_dtype
        if torch.is_grad_enabled():  # create_graph=True
            refuse_double_backward(cfg)
        quant = tuple(unflatten_operand(codes[4 * i:4 * i + 4], blk) for i, blk in enumerate(ctx.blocks))
        if g_out is None:
            g_out = quant[0].codes.new_zeros(b, lq, ev, dtype=dt)
        with torch.autocast(g_out.device.type, enabled=False):
            gens = state.noise.backward_generators(g_out.device, _backward_paths(cfg))
            gd = None if g_weights is None or g_weights.numel() == 0 else g_weights.to(dt)
            def probs(i: int, j: int) -> torch.Tensor:  # P recomputed, held by attention_backward alone
                return attention_probs(quant[0], quant[1], mask, ctx.scale, ctx.shapes, dt, ctx.backend,
                                       ctx.masked, (i, j))  # the forward's backend: the forward's P

            grads = attention_backward(g_out.to(dt), gd, quant, probs, keep, ctx.shapes, ctx.scale,
                                       ctx.dropout_p, cfg, gens, needs)
        gq, gk, gv, gs = (None if g is None else g.to(d) for g, d in zip(grads, ctx.dtypes))
        if gs is not None and len(ctx.mask_shape) == 3 and ctx.mask_shape[0] == 1 and gs.shape[0] != 1:
            gs = gs.sum(0, keepdim=True)  # one mask for every entry
        elif gs is not None and len(ctx.mask_shape) > 3:
            gs = gs.view(ctx.mask_shape)  # the expanded (*lead, L, S) view's gradient
        return gq, gk, gv, gs, None, None, None, None, None, None


# -- the public function ---------------------------------------------------------------------
@compiled.disable_tracing
def _run_attention(*args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``_Attention.apply`` kept out of dynamo's tracing: under ``torch.compile`` it runs
    eagerly between compiled graphs, as the README says. Dynamo traced into it before,
    breaking its graph at each host read of a scale and resuming in lowbit's kernels,
    where it failed on long sequences (an ``InternalTorchDynamoError`` from
    ``compiled.run`` at length 1024: a review)."""
    return _Attention.apply(*args)


def _scale_value(scale: object) -> float:
    """``scale`` as a float, taking what torch's ``scaled_dot_product_attention`` takes: a
    real number (``bool`` and NumPy scalars included) or a 0-d tensor that needs no
    gradient; ``TypeError`` naming the argument otherwise, as torch's (reviews: a bare
    ``float("a")`` said "could not convert string to float"; a learned 0-d scale would
    have lost its gradient silently)."""
    numpy_number = type(scale).__module__ == "numpy" and getattr(getattr(scale, "dtype", None), "kind", "") in "biuf"
    if isinstance(scale, (int, float)) or (numpy_number and getattr(scale, "ndim", 1) == 0) or \
            (isinstance(scale, torch.Tensor) and scale.dim() == 0 and not scale.requires_grad):
        return float(scale)  # (not numbers.Real: torch refuses a Fraction, a second review)
    what = f"a {scale.dim()}-d tensor" + (" that requires grad" if scale.requires_grad else "") \
        if isinstance(scale, torch.Tensor) else type(scale).__name__
    raise TypeError(f"scaled_dot_product_attention(): argument 'scale' must be float, not {what}")


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
              scale: float | None = None, enable_gqa: bool = False, *,
              state: BlockState | FQTConfig, need_weights: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`scaled_dot_product_attention` that also returns ``P̃`` (..., L, S), the
    attention weights after dropout that the ``P·V`` GEMM used (before its quantization),
    when ``need_weights`` (else ``None``). Gradients flow through it too. Needs a
    non-``fp`` recipe when ``need_weights``."""
    check_arguments(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    state = call_state(state)
    if state.config.is_fp:
        if need_weights:
            raise ValueError("need_weights needs a quantized recipe; under fp use torch's own "
                             "attention (nn.MultiheadAttention does)")
        kw = {"enable_gqa": True} if enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, **kw), None
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # key/value heads serve groups of queries
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    lq, e, s, ev = query.shape[-2], query.shape[-1], key.shape[-2], value.shape[-1]
    try:
        lead = tuple(torch.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2]))
    except RuntimeError:
        raise RuntimeError(f"scaled_dot_product_attention: the batch dimensions of query "
                           f"{tuple(query.shape)}, key {tuple(key.shape)} and value "
                           f"{tuple(value.shape)} do not broadcast") from None
    out_dtype = output_dtype(query)
    n = math.prod(lead)
    q3, k3, v3 = (t.expand(*lead, *t.shape[-2:]).reshape(n, *t.shape[-2:]) for t in (query, key, value))
    mask = additive_mask(attn_mask, is_causal, lead, lq, s, q3)
    # torch's default 1/√E; with E = 0 every score is an empty sum, 0 at any scale
    c = (1.0 / math.sqrt(e) if e else 1.0) if scale is None else _scale_value(scale)
    refuse_forward_transforms("lowbit attention")
    if torch.jit.is_tracing():  # a review: it failed in torch's JIT (aten::view of a dtype)
        raise RuntimeError("lowbit attention: torch.jit.trace would record its forward's operations "
                           "without its backward (the gradients of quantization's rounding); use "
                           "torch.export (run the exported program under torch.no_grad) or torch.compile")
    if query.device.type == "meta":  # a model on meta: no values to quantize; the float product gives
        # the shapes, dtypes and autograd history (reviews: torch's autocast query raised there, then
        # empty outputs cut the backward)
        scores = q3.to(out_dtype) @ k3.to(out_dtype).mT * c
        probs = torch.softmax(scores if mask is None else scores + mask.reshape(-1, lq, s).to(out_dtype), -1)
        out = (probs @ v3.to(out_dtype)).reshape(*lead, lq, ev)
        return out, probs.reshape(*lead, lq, s) if need_weights else None
    out, weights = _run_attention(q3, k3, v3, mask, state, c, float(dropout_p), out_dtype,
                                  need_weights, bool(is_causal))
    out = out.reshape(*lead, lq, ev)
    return out, weights.reshape(*lead, lq, s) if need_weights else None


@per_call(None)
def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *,
                                 state: BlockState | FQTConfig | None = None) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with its GEMMs quantized under
    ``state`` (module docstring; the math is docs/METHOD.md §7).

    ``query`` (..., Hq, L, E), ``key`` (..., H, S, E), ``value`` (..., H, S, Ev) → (..., Hq,
    L, Ev); batch dimensions broadcast; ``enable_gqa``: ``Hq`` a multiple of ``H``, key and
    value heads each serving ``Hq/H`` consecutive query heads. ``attn_mask``: bool (True
    takes part) or float (added to the scores, differentiable), broadcastable to (...,
    L, S); ``is_causal``: query ``i`` sees keys ``0..i`` (not with ``attn_mask``);
    ``dropout_p`` in [0, 1], applied to ``P`` in float with a mask from torch's global RNG;
    ``scale`` defaults to ``1/√E``. A fully masked row gives zeros, as in torch.

    ``state``: a :class:`~lowbit.ops.BlockState` (recipe, noise stream; a layer passes its
    own) or an :class:`FQTConfig` (new noise every call, :func:`lowbit.functional.call_state`);
    ``None`` or the ``fp`` recipe: torch's own float attention. The output has the dtype of
    ``query`` (the autocast dtype under autocast); the GEMMs run in float32 (float64 for
    float64 inputs) whatever autocast says; gradients come in the inputs' dtypes.
    Raises ``RuntimeError``/``TypeError``/``ValueError`` naming the problem for mismatched
    shapes or dtypes, a mask with ``is_causal``, a bad ``dropout_p`` or GQA head counts,
    and (``backend="int8"``) a GEMM that cannot run on integer kernels."""
    if state is None:
        if not any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
            check_arguments(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
        kw = {"enable_gqa": True} if enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, **kw)
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                     state=state)[0]


__all__ = ["CHUNK_SCORES", "LOOP_MIN_MACS", "Operand", "attention", "attention_backward", "attention_forward",
           "attention_probs",
           "batched_mm", "grad_operand", "masked_softmax", "scaled_dot_product_attention"]
