"""Both quantizations of an output gradient from one read: ``Q_a(∇Y)`` and ``Q_w(∇Yᵀ)``.

A layer's backward quantizes its output gradient ``∇Y`` (N, out) twice, independently
(docs/METHOD.md §1): rows for ``∇X = Q_a(∇Y)·Q_f(W)``, and ``∇Yᵀ``'s rows — ``∇Y``'s columns —
for ``∇W = Q_w(∇Yᵀ)·Q_f(X)``. Done apart, each quantizer reads ``∇Y`` (twice: its range,
then its rounding) and the second reads it transposed. :func:`quantize_pair` is the two
quantizer calls as one function; its compiled kernel (``quantize_pair`` in the kernel
table) reads ``∇Y`` once for both ranges and once for both code tensors.

It computes exactly what the two separate calls compute: the same reference quantizer
on ``∇Y`` and on ``∇Yᵀ``, the same seeds drawn from the same two generators in the same
order (each quantizer's transform draws first, then its rounding seed), so the codes
and scales are bitwise those of :func:`lowbit.functional.quantize_gradient` on each path
(tested). It applies where both paths quantize stochastically or to nearest with a
dynamic range, with quantizers that do not mix rows (``ptq``, ``psq``: an identity
transform); otherwise :func:`quantize_grad_pair` returns ``None`` and the caller
quantizes each path apart.

A convolution's ``∇Y`` (N, C_out, H', W') is the same pair with columns (sample,
position) on the ``∇W`` side: (N, C_out·H'·W') rows for ``∇X``, (C_out, N·H'·W') for
``∇W`` (:func:`quantize_conv_pair`, ``quantize_conv_pair`` in the kernel table), used by
:mod:`lowbit.conv`; done apart, the ``∇W`` quantizer first copies ``∇Y`` into
channel-major order. A batch of gradients (B, N, out) — attention's ``∇O`` and ``∇S``,
one entry per (batch, head) — pairs its rows (B·N, out) with each entry's transpose
(B·out, N) (:func:`quantize_batched_pair`), used by :mod:`lowbit.attention`.

A linear layer's pair where ``∇X``'s quantizer is BHQ or Hadamard (they mix rows, within
groups or blocks) is :func:`quantize_grad_pair_mixed`: the transform makes its transformed
rows' codes and ``∇Y``'s column ranges in one read (BHQ group by group, Hadamard block by
block), then the columns' codes; attention's batch (the columns each head's transpose)
too, with ``entries``. Where only the ``∇W`` side is plain otherwise (a row-mixing ``∇X``
quantizer on a convolution, or where the mixed pair does not apply),
:func:`quantize_grad_w` quantizes that side alone, reading a convolution's or attention's
gradient as it lies instead of copying it channel-major or transposed first.
"""

from __future__ import annotations

import functools
import inspect

import torch
from . import grid_notes
from .scopes import scope

from .config import GradSpec
from .formats import Format, Granularity, Rounding
from .kernels import Encoded, Impl, Kernels, avx512, reference, register, register_fused
from .quantizers import QuantizedOperand, get_quantizer
from .quantizers.base import GradQuantizer, Identity, check_operand, checked_transform, is_identity, sr_seed
from .quantizers.psq import PSQ
from .quantizers.ptq import PTQ


def quantize_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                  seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                  seed_w: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """``reference.quantize(g, fmt_a, …)`` then ``reference.quantize(gᵀ, fmt_w, …)``:
    ``g`` (N, out) → (codes (N, out), scale, offset, block scale) of ``g`` followed by
    the same four of ``gᵀ`` (codes (out, N))."""
    return (*reference.quantize(g, fmt_a, gran_a, rnd_a, seed_a),
            *reference.quantize(g.t(), fmt_w, gran_w, rnd_w, seed_w))


def quantize_conv_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                       seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                       seed_w: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """A convolution's :func:`quantize_pair`: ``g`` (N, C_out, L) — ``∇Y`` with its
    output positions flattened — quantized as (N, C_out·L) (``Q_a``: rows = samples) and
    as its channels (C_out, N·L) (``Q_w``: rows = output channels, columns (sample,
    position)): the eight tensors of ``reference.quantize`` on each, codes row-major."""
    n, c, length = g.shape
    return (*reference.quantize(g.reshape(n, c * length), fmt_a, gran_a, rnd_a, seed_a),
            *reference.quantize(g.transpose(0, 1).reshape(c, n * length), fmt_w, gran_w, rnd_w, seed_w))


def quantize_batched_pair(g: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                          seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                          seed_w: torch.Tensor, first: int = 0) -> tuple[torch.Tensor | None, ...]:
    """:func:`quantize_pair` of a batch of gradients ``g`` (B, N, out) — attention's
    ``∇O`` or ``∇S``, one entry per (batch, head) —: ``reference.quantize`` of the rows
    (B·N, out) and of each entry's transpose, (B·out, N). ``first``: ``g`` is entries
    ``first, first + 1, …`` of a larger batch, whose noise they get (per-row scales: each
    row lies within one entry, so the part's codes are those rows of the whole batch's)."""
    b, n, c = g.shape
    return (*reference.quantize(g.reshape(b * n, c), fmt_a, gran_a, rnd_a, seed_a, first * n * c),
            *reference.quantize(g.mT.reshape(b * c, n), fmt_w, gran_w, rnd_w, seed_w, first * n * c))


register_fused("quantize_pair", quantize_pair)
register("quantize_pair", Impl.NATIVE, avx512.run_quantize_pair, ("cpu",), avx512.supports_pair)
def quantize_conv_w(g: torch.Tensor, fmt: Format, gran: Granularity, rnd: Rounding,
                    seed: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The ``∇W`` half of :func:`quantize_conv_pair`: ``g`` (N, C_out, L) quantized as its
    channels (C_out, N·L) — ``reference.quantize`` of that (copied) matrix."""
    n, c, length = g.shape
    return reference.quantize(g.transpose(0, 1).reshape(c, n * length), fmt, gran, rnd, seed)


def quantize_batched_w(g: torch.Tensor, fmt: Format, gran: Granularity, rnd: Rounding,
                       seed: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """The ``∇W`` half of :func:`quantize_batched_pair`: each entry of ``g`` (B, N, out)
    transposed, (B·out, N), quantized — ``reference.quantize`` of that (copied) matrix."""
    b, n, c = g.shape
    return reference.quantize(g.mT.reshape(b * c, n), fmt, gran, rnd, seed)


register_fused("quantize_batched_pair", quantize_batched_pair)
register("quantize_batched_pair", Impl.NATIVE, avx512.run_quantize_batched_pair, ("cpu",),
         avx512.supports_batched_pair)
register_fused("quantize_batched_w", quantize_batched_w)
register("quantize_batched_w", Impl.NATIVE, avx512.run_quantize_batched_w, ("cpu",), avx512.supports_batched_w)
register_fused("quantize_conv_w", quantize_conv_w)
register("quantize_conv_w", Impl.NATIVE, avx512.run_quantize_conv_w, ("cpu",), avx512.supports_conv_w)
register_fused("quantize_conv_pair", quantize_conv_pair)
register("quantize_conv_pair", Impl.NATIVE, avx512.run_quantize_conv_pair, ("cpu",),
         avx512.supports_conv_pair)


def _identity_quantizer(q: GradQuantizer) -> bool:
    """Whether ``q`` quantizes as the library's identity-transform quantizers do: PTQ or
    PSQ, or a subclass that overrides none of ``quantize``, ``transform`` and
    ``entry_transform`` (on its class or instance) — only then may a pair kernel stand in
    for its ``quantize`` call (a user's override, or a transform of its own, was bypassed
    or refused: a review)."""
    return _own(q, "quantize", GradQuantizer.quantize) and _own(q, "entry_transform", GradQuantizer.entry_transform) \
        and type(q).transform in (PTQ.transform, PSQ.transform) and "transform" not in getattr(q, "__dict__", {}) \
        and not q.mixes_rows


def _own(obj: object, name: str, library: object) -> bool:
    """Whether ``obj``'s method ``name`` is the library's ``library``: not overridden by a
    subclass nor set on the instance (a review: an instance's own ``quantize`` was
    bypassed too)."""
    return getattr(type(obj), name, None) is library and name not in getattr(obj, "__dict__", {})


def plain(spec: GradSpec | None) -> bool:
    """Whether ``spec`` quantizes rows on their own: low-bit (not None), a dynamic range
    (not predicted) and a quantizer that does not mix rows, PTQ or PSQ as the library
    defines them (:func:`_identity_quantizer`; not BHQ, Hadamard, a user's own)."""
    return spec is not None and not spec.predicted and _identity_quantizer(get_quantizer(spec.quantizer))


def _pairs_columns(t: object) -> bool:
    """Whether ``t``'s ``forward_quantize_pair`` stands for its ``forward_quantize`` (then
    the columns'): it has one, and no class below the one defining it overrides
    ``forward_quantize`` alone (a subclass's own ``forward_quantize`` was bypassed: a
    review)."""
    mro = type(t).__mro__
    owner = next((c for c in mro if "forward_quantize_pair" in vars(c)), None)
    return owner is not None and all("forward_quantize" not in vars(c) for c in mro[:mro.index(owner)]) \
        and "forward_quantize" not in getattr(t, "__dict__", {})


def _pair_takes_entries(t: object) -> bool:
    """Whether the ``forward_quantize_pair`` that ``t.forward_quantize_pair(…)`` calls takes
    ``entries``: an instance's own (checked each time: a cache would keep the instance
    alive), else its class's (cached)."""
    own = getattr(t, "__dict__", {}).get("forward_quantize_pair")
    return _takes_entries(own) if own is not None else _class_takes_entries(type(t).forward_quantize_pair)


def _takes_entries(fn: object) -> bool:
    try:
        params = inspect.signature(fn).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):  # no signature to read (a builtin): do not hand it one
        return False
    return "entries" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


_class_takes_entries = functools.cache(_takes_entries)


def draw(gy: torch.Tensor, spec: GradSpec, gen: torch.Generator | None, rows: int, k: Kernels
          ) -> tuple[Granularity, Rounding, torch.Tensor, Identity]:
    """What :func:`lowbit.functional.quantize_gradient` draws before it rounds, for a plain
    ``spec`` on ``rows`` rows: its transform (an identity, which draws nothing and sees
    the row count only), then its rounding seed; with the quantizer's granularity."""
    q = get_quantizer(spec.quantizer)
    with scope("lowbit::transform"):
        t = q.transform(gy.new_empty(rows, 0), gen, k)
        t.kernels = k
    if not is_identity(t):  # pragma: no cover - a quantizer not marked mixes_rows
        raise TypeError(f"quantizer {q.name!r} does not mix rows but has a {type(t).__name__} transform")
    return q.granularity, spec.rounding, sr_seed(gen, spec.rounding, gy.device), t


def quantize_grad_w(gy: torch.Tensor, spec: GradSpec | None, gen: torch.Generator | None, k: Kernels,
                    batched: bool = False) -> QuantizedOperand | None:
    """The ``∇W`` side of :func:`quantize_grad_pair` alone, for when the ``∇X`` side cannot
    join it (a row-mixing ``Q_a`` on a convolution, or where :func:`quantize_grad_pair_mixed`
    does not apply), read in place instead of copied first:
    a convolution's ``gy`` (N, C_out, L) as its channels (C_out, N·L), bitwise
    ``quantize_gradient(gy.transpose(0, 1).reshape(C_out, -1), spec, gen, k)``; with
    ``batched``, attention's ``gy`` (B, N, out) as each entry's transpose (B·out, N),
    bitwise ``quantize_gradient(gy.mT.reshape(-1, N), spec, gen, k)``. ``None`` (nothing
    drawn) where that does not apply (as :func:`quantize_grad_pair` says for its ``∇W``
    side)."""
    if gy.dim() != 3 or not (k.fused and gy.numel() and plain(spec)):
        return None
    op, rows = ("quantize_batched_w", gy.shape[0] * gy.shape[2]) if batched else ("quantize_conv_w", gy.shape[1])
    gran, rnd, seed, t = draw(gy, spec, gen, rows, k)  # type: ignore[arg-type]
    with scope("lowbit::quantize"):
        out = k.run(op, gy, spec.format, gran, rnd, seed)  # type: ignore[union-attr]
    grid_notes.note(out[0], spec.format)  # type: ignore[union-attr]
    return QuantizedOperand.of(Encoded(*out, spec.format.block, kernels=k), t)  # type: ignore[union-attr]


def quantize_grad_pair(gy: torch.Tensor, spec_a: GradSpec | None, gen_a: torch.Generator | None,
                       spec_w: GradSpec | None, gen_w: torch.Generator | None, k: Kernels,
                       batched: bool = False, w_first: bool = False
                       ) -> tuple[QuantizedOperand, QuantizedOperand] | None:
    """``(Q_a(∇Y), Q_w(∇Yᵀ))`` of ``gy`` (N, out) from one kernel, bitwise what
    ``quantize_gradient(gy, spec_a, gen_a, k)`` and ``quantize_gradient(gy.t(), spec_w,
    gen_w, k)`` give; ``None`` (nothing drawn) where that does not apply: a spec that is
    ``None`` (QAT), predicted or row-mixing (``bhq``, ``hadamard``), fused kernels off
    (``Backend.REFERENCE``) or an empty ``gy``.

    A convolution's ``gy`` (N, C_out, L) (output positions flattened) gives the codes of
    (N, C_out·L) and of (C_out, N·L) (:func:`quantize_conv_pair`): bitwise what
    ``quantize_gradient`` gives on ``gy.reshape(N, -1)`` and on
    ``gy.transpose(0, 1).reshape(C_out, -1)``, without that copy. With ``batched``, ``gy``
    (B, N, out) is a batch of gradients (attention's, one entry per batch and head): the
    codes of (B·N, out) and of each entry's transpose (B·out, N), bitwise what
    ``quantize_gradient`` gives on ``gy.reshape(-1, out)`` and ``gy.mT.reshape(-1, N)``.
    A convolution's pair with a block format on the ``∇X`` side is ``None`` too: that
    side's rows are channels innermost there (:func:`lowbit.conv.conv_rows`), not the
    (N, C_out·L) rows this kernel makes.
    The seeds are drawn as the two calls draw them: ``Q_a``'s first, or with ``w_first``
    ``Q_w``'s (where the caller quantized that path first: it matters when both draw
    from torch's global generator, ``gen_a = gen_w = None``)."""
    if gy.dim() != (3 if batched else gy.dim()) or gy.dim() not in (2, 3):
        raise ValueError("quantize_grad_pair: gy must be (N, out) or (N, C_out, L), or (B, N, out) with "
                         f"batched=True; got shape {tuple(gy.shape)}, batched={batched}")
    if not (k.fused and gy.numel() and plain(spec_a) and plain(spec_w)):
        return None
    if gy.dim() == 3 and not batched and spec_a.format.block:  # type: ignore[union-attr]
        return None  # a convolution's ∇X rows take block formats channels innermost (lowbit.conv.conv_rows)
    if gy.dim() == 2:
        op, rows_a, rows_w = "quantize_pair", gy.shape[0], gy.shape[1]
    elif batched:
        op, rows_a, rows_w = "quantize_batched_pair", gy.shape[0] * gy.shape[1], gy.shape[0] * gy.shape[2]
    else:
        op, rows_a, rows_w = "quantize_conv_pair", gy.shape[0], gy.shape[1]
    ops = {}
    paths = (("a", spec_a, gen_a, rows_a), ("w", spec_w, gen_w, rows_w))
    for key, spec, gen, rows in (paths[::-1] if w_first else paths):
        ops[key] = draw(gy, spec, gen, rows, k)  # type: ignore[arg-type]
    return run_pair(op, gy, spec_a, ops["a"], spec_w, ops["w"], k)  # type: ignore[arg-type]


def quantize_grad_pair_mixed(gy: torch.Tensor, spec_a: GradSpec | None, gen_a: torch.Generator | None,
                             spec_w: GradSpec | None, gen_w: torch.Generator | None, k: Kernels,
                             entries: int | None = None, w_first: bool = False
                             ) -> tuple[QuantizedOperand, QuantizedOperand] | None:
    """:func:`quantize_grad_pair` of a linear layer's ``gy`` (N, out) where ``Q_a`` mixes
    rows with a transform that quantizes ``∇Y``'s columns alongside its own rows (a
    quantizer whose ``pairs_columns`` is true: BHQ, :meth:`BlockHouseholder.forward_quantize_pair
    <lowbit.quantizers.bhq.BlockHouseholder.forward_quantize_pair>`; Hadamard,
    :meth:`BlockHadamard.forward_quantize_pair
    <lowbit.quantizers.hadamard.BlockHadamard.forward_quantize_pair>`): bitwise what
    ``quantize_gradient(gy, spec_a, gen_a, k)`` and ``quantize_gradient(gy.t(), spec_w,
    gen_w, k)`` give, drawn in that order (``Q_a``'s transform and seed, then ``Q_w``'s;
    with ``w_first`` ``Q_w``'s first).
    With ``entries``, ``gy`` (B·N, C) is attention's batch of B entries of N rows (its
    ``∇O`` or ``∇S``, reshaped) and the pair is what :func:`lowbit.attention.grad_operand`
    and :func:`lowbit.attention.grad_operand_t` give: ``quantize_gradient(gy, spec_a, gen_a,
    k, entries=B)`` (the transform built per entry: ``Q_a``'s ``entry_transform``) and
    :func:`quantize_grad_w` of ``gy.reshape(B, N, C)`` with ``batched`` (each entry's
    transpose, (B·C, N)); only for a quantizer whose ``entry_transform`` is its own (else
    ``None``).
    ``None`` (nothing drawn) where that does not apply: ``Q_a`` without ``pairs_columns``
    or with its own ``quantize`` (a subclass's override runs as written), predicted or
    ``None``, ``Q_w`` not plain (:func:`plain`), fused kernels off, an empty or non-2-D
    ``gy``. A subclass whose transform has no ``forward_quantize_pair``, or its own
    ``forward_quantize`` (:func:`_pairs_columns`), gets the two quantizations made apart,
    drawn in the same order."""
    if gy.dim() != 2 or not (k.fused and gy.numel()) or spec_a is None or spec_a.predicted or not plain(spec_w):
        return None
    q = get_quantizer(spec_a.quantizer)
    if not getattr(q, "pairs_columns", False) or not _own(q, "quantize", GradQuantizer.quantize):
        return None  # (a subclass's own quantize runs as the user wrote it)
    if entries is not None and (isinstance(entries, bool) or not isinstance(entries, int) or entries < 1
                                or gy.shape[0] % entries or type(q).entry_transform is GradQuantizer.entry_transform):
        return None  # (no transform per entry: the caller's separate calls decide what runs)
    check_operand(gy, f"{q.name}.quantize")
    rows_w = gy.shape[1] * (entries or 1)
    drawn_w = draw(gy, spec_w, gen_w, rows_w, k) if w_first else None  # type: ignore[arg-type]
    with scope("lowbit::transform"):
        t = checked_transform(q, q.transform(gy, gen_a, k) if entries is None else q.entry_transform(gy, entries, gen_a, k))
        t.kernels = k
    seed_a = sr_seed(gen_a, spec_a.rounding, gy.device)
    if drawn_w is None:
        drawn_w = draw(gy, spec_w, gen_w, rows_w, k)  # type: ignore[arg-type]
    gran_w, rnd_w, seed_w, t_w = drawn_w
    if not _pairs_columns(t) or (entries is not None and not _pair_takes_entries(t)):
        # a subclass's own transform, or its forward_quantize_pair of the signature before
        # entries (attention never called it then: a review): the two quantizations apart, as drawn
        enc_a = t.forward_quantize(gy, spec_a.format, q.granularity, spec_a.rounding, seed_a)
        with scope("lowbit::quantize"):
            if entries is None:
                out = k.quantize(gy.t(), spec_w.format, gran_w, rnd_w, seed_w)  # type: ignore[union-attr]
            else:
                out = k.run("quantize_batched_w", gy.reshape(entries, -1, gy.shape[1]), spec_w.format,  # type: ignore[union-attr]
                            gran_w, rnd_w, seed_w)
                out = Encoded(*out, spec_w.format.block, kernels=k)  # type: ignore[union-attr, misc]
        enc_w = out
    else:
        enc_a, enc_w = t.forward_quantize_pair(gy, spec_a.format, q.granularity, spec_a.rounding, seed_a,  # type: ignore[union-attr]
                                               spec_w.format, gran_w, rnd_w, seed_w,  # type: ignore[union-attr]
                                               **({} if entries is None else {"entries": entries}))
    grid_notes.note(enc_a.codes, spec_a.format)
    grid_notes.note(enc_w.codes, spec_w.format)  # type: ignore[union-attr]
    return QuantizedOperand.of(enc_a, t), QuantizedOperand.of(enc_w, t_w)


def run_pair(op: str, gy: torch.Tensor, spec_a: GradSpec, drawn_a: tuple, spec_w: GradSpec, drawn_w: tuple,
             k: Kernels, *extra: object) -> tuple[QuantizedOperand, QuantizedOperand]:
    """The kernel-table pair op ``op`` on ``gy`` with what :func:`draw` drew for each side
    (``extra``: the op's further arguments, e.g. ``quantize_batched_pair``'s first entry):
    the two operands, their grids noted for a coverage trace."""
    (gran_a, rnd_a, seed_a, t_a), (gran_w, rnd_w, seed_w, t_w) = drawn_a, drawn_w
    with scope("lowbit::quantize"):
        out = k.run(op, gy, spec_a.format, gran_a, rnd_a, seed_a, spec_w.format, gran_w, rnd_w, seed_w, *extra)
    enc_a = Encoded(*out[:4], spec_a.format.block, kernels=k)  # type: ignore[union-attr]
    enc_w = Encoded(*out[4:], spec_w.format.block, kernels=k)  # type: ignore[union-attr]
    grid_notes.note(enc_a.codes, spec_a.format)  # type: ignore[union-attr]
    grid_notes.note(enc_w.codes, spec_w.format)  # type: ignore[union-attr]
    return QuantizedOperand.of(enc_a, t_a), QuantizedOperand.of(enc_w, t_w)


__all__ = ["quantize_batched_pair", "quantize_batched_w", "quantize_conv_pair", "quantize_conv_w",
           "quantize_grad_pair", "quantize_grad_pair_mixed", "quantize_grad_w", "quantize_pair"]
