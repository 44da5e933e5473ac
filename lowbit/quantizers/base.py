"""The shape every gradient quantizer shares: transform → stochastic rounding → inverse.

A gradient operand ``A`` is always oriented so that its **rows are the dimension that
is not summed** by the GEMM that consumes it (``∇Y`` itself for ``∇X = ∇Y·W``, and
``∇Yᵀ`` for ``∇W = ∇Yᵀ·X``). A quantizer then

1. applies an invertible transform ``T`` that mixes rows only (identity for PTQ/PSQ,
   scale + block Householder for BHQ, random signs + block Hadamard for ``hadamard``);
2. rounds ``T·A`` onto a format (:mod:`lowbit.formats`) with stochastic rounding, one
   scale per row or per tensor (block formats add block scales along the summed columns);
3. applies ``T⁻¹`` — to the dequantized operand (simulated path), or, because ``T``
   acts on rows only, to the GEMM's output rows (integer/FP8 path). Both give
   ``T⁻¹·Q(T·A)·B`` up to float rounding.

Every row scale sits on rows, a non-summed dimension, so the integer and FP8 GEMMs stay
exact. The analytic variance of the estimate follows from the per-element rounding
variance pushed through ``T⁻¹`` with squared coefficients (:meth:`RowTransform.inverse_sq`).
Kernels come from the call's :class:`~lowbit.kernels.Kernels` (decided once per call).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from .. import grid_notes
from ..scopes import scope

from ..formats import (
    AnyFormat,
    Format,
    Granularity,
    Rounding,
    as_granularity,
    as_rounding,
    check_dense,
    check_float_tensor,
    compute_dtype,
    draw_seed,
    element_spacing_sq,
    element_variance,
    parse_format,
)
from ..kernels import Backend, Encoded, Kernels, kernels_for, reference
from ..noise import check_generator

if TYPE_CHECKING:  # pragma: no cover
    from ..ranges import RangeTracker


def absmax(x: torch.Tensor, granularity: Granularity) -> torch.Tensor:
    """``max |x|`` per tensor (shape (1, 1)) or per row (shape (R, 1)); NaN propagates.
    ``granularity``: a :class:`Granularity` or its name; ``ValueError`` otherwise."""
    a = x.abs()
    if as_granularity(granularity) is Granularity.TENSOR:
        return a.amax().reshape(1, 1) if a.numel() else a.new_zeros(1, 1)
    return a.amax(dim=1, keepdim=True) if a.shape[1] else a.new_zeros(a.shape[0], 1)


def row_absmax(x: torch.Tensor, kernels: Kernels | None = None) -> torch.Tensor:
    """``max_j |x_ij|`` per row (N,) in :func:`~lowbit.formats.compute_dtype` (float64
    for float64 ``x``, else float32); NaN propagates. ``kernels``: the call's kernels
    (default: reference)."""
    if x.shape[1] == 0:
        return x.new_zeros(x.shape[0], dtype=compute_dtype(x.dtype))
    return (kernels or _reference(x)).run("row_absmax", x)


def _reference(x: torch.Tensor) -> Kernels:
    return kernels_for(Backend.REFERENCE, x.device)


def sr_seed(generator: torch.Generator | None, rounding: Rounding, device: torch.device) -> torch.Tensor:
    """The seed of one quantization call: drawn from ``generator`` for stochastic
    rounding, a constant 0 for round-to-nearest (which uses no noise). ``TypeError`` for a
    ``generator`` that is neither a ``torch.Generator`` nor ``None``, whatever the rounding."""
    check_generator(generator, "quantization")
    if rounding is Rounding.STOCHASTIC:
        return draw_seed(generator, device)
    return torch.zeros((), dtype=torch.int64, device=device)


class RowTransform(abc.ABC):
    """An invertible linear map acting on the rows of ``(R, D)`` matrices."""

    n_rows: int  # rows of the original operand (the transformed one may be padded)
    kernels: Kernels | None = None  # the call's kernels (set by the quantizer); None: reference

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def inverse(self, y: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> torch.Tensor:
        """``T⁻¹ y`` cropped to the original ``n_rows`` rows, as ``out_dtype``.
        ``overwrite``: the caller no longer needs ``y`` (a fresh GEMM output), so the
        result may be written over it."""

    def epilogue_inverse(self, kernels: Kernels, acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                         k: int, out_dtype: torch.dtype) -> torch.Tensor | None:
        """``T⁻¹`` of an integer GEMM's output in one pass with its epilogue, or ``None``
        where this transform has no such kernel (the caller then runs the epilogue and
        :meth:`inverse`, the same values). ``acc``: the GEMM's int32 sums (…, M, N) with
        …·M = the transform's rows, handed over (overwritten where a tensor is
        returned); ``a_scale``, ``b_scale``: the epilogue's scales as they broadcast
        against ``acc`` (``lowbit.kernels.int8.epilogue``), ``k`` the summed dimension.
        Returns the (…·M, N) result as ``out_dtype``. Here: ``None``."""
        return None

    def forward_quantize(self, x: torch.Tensor, fmt: Format, granularity: Granularity,
                         rounding: Rounding, seed: torch.Tensor) -> Encoded:
        """``T x`` on ``fmt``. Transforms with a fused kernel override this."""
        with scope("lowbit::transform"):
            y = self.forward(x)
        return (self.kernels or _reference(x)).quantize(y, fmt, granularity, rounding, seed)

    def within_entries(self, rows: int) -> bool:
        """Whether the transform maps rows only within consecutive entries of ``rows`` rows
        (block-diagonal by entry, no padding rows): then a batched GEMM of the transformed
        codes may run entry by entry and :meth:`inverse` apply to its output rows
        (attention's heads; :meth:`entries` gives an entry range's own transform). False
        unless a transform says otherwise."""
        return False

    def entries(self, lo: int, hi: int) -> RowTransform:
        """The transform of rows ``lo:hi``, entry boundaries where :meth:`within_entries`."""
        raise NotImplementedError(f"{type(self).__name__} does not split by entries")

    @abc.abstractmethod
    def inverse_sq(self, v: torch.Tensor) -> torch.Tensor:
        """For independent per-row noise of total variance ``v`` (shape (R,)), the
        variance each output row of ``T⁻¹`` receives: ``Σ_i (T⁻¹)_ji² v_i``, cropped."""


class Identity(RowTransform):
    """No transform: ``T = I``. Only this class itself means "no transform" to lowbit
    (:func:`is_identity`); a subclass is a transform like any other, its ``forward`` and
    ``inverse`` both run."""

    def __init__(self, n_rows: int) -> None:
        self.n_rows = n_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse(self, y: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> torch.Tensor:
        return y.to(out_dtype)

    def inverse_sq(self, v: torch.Tensor) -> torch.Tensor:
        return v


def is_identity(t: object) -> bool:
    """Whether ``t`` is :class:`Identity` itself, the transform lowbit may skip (no
    ``T⁻¹`` on the GEMM's output, a cast fused into its epilogue). A subclass is not: a
    user's ``Identity`` subclass with ``T = ½·I`` had its ``forward`` applied and its
    ``inverse`` skipped — every gradient halved (a new user's trial)."""
    return type(t) is Identity


@dataclass
class QuantizedOperand:
    """``T⁻¹ · x̂``: the encoded operand ``x̂ = codes · block_scale · scale + offset``
    (:class:`~lowbit.kernels.Encoded`) and the ``transform`` that maps its rows back.

    ``codes`` (R, C) int8 or float8; ``scale`` (R, 1) or (1, 1) in the compute dtype
    (for integer grids, the grid step; 0 for an all-zero group); ``offset`` like
    ``scale`` (asymmetric grids) or None; ``block_scale`` (R, ⌈C/block⌉) (block formats)
    or None. A group holding NaN/Inf has a non-finite scale, so its values stay
    non-finite."""

    codes: torch.Tensor
    scale: torch.Tensor
    transform: RowTransform
    offset: torch.Tensor | None = None
    block_scale: torch.Tensor | None = None
    block: int = 0
    kernels: Kernels | None = None  # of the call that made it (None: reference dequantize)

    @classmethod
    def of(cls, enc: Encoded, transform: RowTransform) -> QuantizedOperand:
        return cls(enc.codes, enc.scale, transform, enc.offset, enc.block_scale, enc.block,
                   enc.kernels)

    @property
    def enc(self) -> Encoded:
        """The encoded operand, for the GEMM kernels."""
        return Encoded(self.codes, self.scale, self.offset, self.block_scale, self.block,
                       kernels=self.kernels)

    @property
    def step(self) -> torch.Tensor:
        """:attr:`scale` (the name from before formats: the grid step of an integer grid)."""
        return self.scale

    @property
    def plain(self) -> bool:
        """No row transform, offset or block scale: ``codes · scale`` is the operand."""
        return self.offset is None and self.block_scale is None and is_identity(self.transform)

    def dequantize(self, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``T⁻¹ · x̂`` as ``out_dtype``, computed in the scale's dtype (float64 if
        ``out_dtype`` is: then exactly, up to the inverse transform's rounding)."""
        dt = torch.promote_types(self.scale.dtype, out_dtype)
        return self.inverse(self.enc.dequantize(dt), out_dtype, overwrite=True)

    def inverse(self, out: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> torch.Tensor:
        """``T⁻¹`` applied to the rows of a GEMM output (or of the dequantized operand),
        returned as ``out_dtype``; ``overwrite``: ``out`` is the caller's fresh tensor,
        which the result may be written over (:meth:`RowTransform.inverse`)."""
        if is_identity(self.transform):
            return out.to(out_dtype)
        with scope("lowbit::transform"):
            return self.transform.inverse(out, out_dtype, overwrite)



def checked_transform(q: GradQuantizer, t: object) -> RowTransform:
    """``t``, what ``q.transform`` (or ``entry_transform``) returned, if it is a
    :class:`RowTransform`; ``TypeError`` naming the contract otherwise (a user's transform
    returning a tensor failed later with ``'Tensor' object has no attribute
    'forward_quantize'``: a new user's trial)."""
    if not isinstance(t, RowTransform):
        raise TypeError(f"quantizer {getattr(q, 'name', type(q).__name__)!r}: transform must return a "
                        f"lowbit.quantizers.RowTransform (Identity for none), got {type(t).__name__}")
    return t


def variance_formula_gap(q: GradQuantizer) -> str | None:
    """Why :meth:`GradQuantizer.rounding_variance` (and so ``expected_variance``,
    ``variance_bound`` and the variance monitor) may not describe what ``q.quantize``
    runs, or ``None``: a subclass (or the instance) overrides ``quantize`` below the class
    whose ``rounding_variance`` it inherits — the formula is then the base class's (a new
    user's trial: a monitor reported an 8-bit variance, 10⁴× too small, for a quantizer
    that rounded to 2 bits)."""
    own = getattr(q, "__dict__", {})
    if "quantize" in own and "rounding_variance" not in own:
        return f"quantizer {q.name!r} has its own quantize (set on the instance) but not its own rounding_variance"
    mro = type(q).__mro__
    by = {m: next((c for c in mro if m in vars(c)), None) for m in ("quantize", "rounding_variance")}
    if by["quantize"] is not by["rounding_variance"] and by["rounding_variance"] in mro[mro.index(by["quantize"]):]:
        return (f"quantizer {q.name!r}: {by['quantize'].__name__} overrides quantize but inherits "
                f"{by['rounding_variance'].__name__}'s rounding_variance, whose formula need not be what runs "
                "(override rounding_variance too)")
    return None


def refuse_clipping(fmt: AnyFormat, what: str) -> None:
    """``ValueError`` naming ``what`` where ``fmt`` clips (:attr:`Format.clips`): the
    variance formulas are those of an unbiased quantizer."""
    if fmt.clips:
        raise ValueError(f"{what}: {fmt.name} takes its block scales by the specification's rule, "
                         f"which clips a block's largest values — a bias, not rounding variance; "
                         f"the variance formulas hold for unbiased formats only (use "
                         f"{fmt.name.removesuffix('_spec')}, or measure draws of quantize)")


def check_operand(a: torch.Tensor, op: str, what: str = "operand", var: str = "a") -> None:
    """The checks of every quantizer entry point (a review found the quantizer methods
    without those of :func:`lowbit.quantize_grad`: a 3-D operand took per-column scales,
    a complex one lost its imaginary part, one requiring grad got a zero gradient):
    ``TypeError`` for a non-tensor or a dtype lowbit does not quantize, ``RuntimeError`` for
    a sparse or nested one (:func:`lowbit.formats.check_dense`), ``ValueError`` for a
    non-2-D operand or one that requires grad while grad mode is on (not differentiable)."""
    check_float_tensor(a, what)
    check_dense(op, what, a)  # a sparse or nested one failed inside torch (a review)
    if a.dim() != 2:
        raise ValueError(f"{op} expects a 2-D {what} (rows, features), got shape {tuple(a.shape)}")
    if a.requires_grad and torch.is_grad_enabled():  # its graph would run through the scale only
        raise ValueError(f"{op} is not differentiable: pass {var}.detach() (or call it under torch.no_grad())")


class GradQuantizer(abc.ABC):
    """Gradient quantizer: a row transform plus per-row or per-tensor rounding; unbiased
    with stochastic rounding on every format whose groups cannot clip (all but the
    ``*_spec`` block formats: :attr:`lowbit.formats.Format.clips`)."""

    name: str
    granularity: Granularity
    mixes_rows: bool = False  # the transform mixes rows (so per-row ranges do not persist)
    # the transform also quantizes the operand's columns in one pass (lowbit.gradpair.quantize_grad_pair_mixed)
    pairs_columns: bool = False
    # how the transformed operand's range follows the gradient's: range(T(c·g)) =
    # c**range_exponent · range(T g) for c > 0 (a linear transform: 1); what a predicted
    # range's history is rescaled by when a loss scale changes (lowbit.nn.rescale_ranges).
    # A transform may say otherwise for its own call (its own range_exponent attribute)
    range_exponent: float = 1.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's ``granularity`` as a :class:`Granularity`: the name ``"row"`` ran per
        row on the reference kernels and per tensor on the fused ones, silently, and a
        misspelt one trained as per tensor (a new user's trial); ``ValueError`` for a value
        that is not a granularity, at the class statement."""
        super().__init_subclass__(**kwargs)
        if "granularity" in vars(cls):
            cls.granularity = as_granularity(vars(cls)["granularity"])

    def __setattr__(self, name: str, value: Any) -> None:
        # an instance's own granularity, as a subclass's (__init_subclass__)
        super().__setattr__(name, as_granularity(value) if name == "granularity" else value)

    @abc.abstractmethod
    def transform(self, a: torch.Tensor, generator: torch.Generator | None,
                  kernels: Kernels | None = None) -> RowTransform:
        """The row transform for operand ``a`` ((R, D)), built with ``kernels``
        (default: reference)."""

    def entry_transform(self, a: torch.Tensor, entries: int, generator: torch.Generator | None,
                        kernels: Kernels | None = None) -> RowTransform:
        """The row transform for ``a`` (R, D) whose rows are ``entries`` consecutive entries
        of ``R / entries`` rows (attention's heads): one that keeps rows within their entry
        where the quantizer can build it so (BHQ: groups per entry); by default
        :meth:`transform`, whose :meth:`RowTransform.within_entries` says whether it does."""
        return self.transform(a, generator, kernels)

    def quantize(
        self,
        a: torch.Tensor,
        fmt: AnyFormat | int | str,
        generator: torch.Generator | None = None,
        rounding: Rounding | str = Rounding.STOCHASTIC,
        backend: Backend | Kernels = Backend.AUTO,
        tracker: RangeTracker | None = None,
        entries: int | None = None,
    ) -> QuantizedOperand:
        """Transform, then round ``T·a`` onto ``fmt`` (noise seeded from ``generator``).
        The range is ``T·a``'s own (dynamic), or ``tracker``'s prediction. ``rounding``: a
        :class:`Rounding` or its name (``"stochastic"``, ``"nearest"``); ``ValueError`` for
        anything else. ``entries``: ``a``'s rows are that many consecutive entries of equal
        size, to be transformed each on its own where the quantizer can
        (:meth:`entry_transform`; attention's gradient operands); ``ValueError`` where it
        does not divide ``a``'s rows."""
        check_operand(a, f"{self.name}.quantize")
        fmt = parse_format(fmt)
        rounding = as_rounding(rounding)
        if entries is not None and (isinstance(entries, bool) or not isinstance(entries, int) or entries < 1
                                    or a.shape[0] % entries):
            raise ValueError(f"entries={entries!r} must be a positive int dividing the operand's {a.shape[0]} rows")
        k = kernels_for(backend, a.device)
        with scope("lowbit::transform"):
            t = checked_transform(self, self.transform(a, generator, k) if entries is None
                                  else self.entry_transform(a, entries, generator, k))
            t.kernels = k
        seed = sr_seed(generator, rounding, a.device)
        if tracker is None:
            enc = t.forward_quantize(a, fmt, self.granularity, rounding, seed)
        else:
            with scope("lowbit::transform"):
                y = t.forward(a)
            enc = tracker.quantize(y, fmt, self.granularity, rounding, seed, k,
                                   getattr(t, "range_exponent", self.range_exponent))
        grid_notes.note(enc.codes, fmt)
        return QuantizedOperand.of(enc, t)

    # -- analytic variance ------------------------------------------------------------
    def _elements(self, a: torch.Tensor, fmt: AnyFormat | int | str,
                  generator: torch.Generator | None
                  ) -> tuple[RowTransform, torch.Tensor, torch.Tensor, AnyFormat]:
        """The transform, the elements ``y`` of ``T·a`` before rounding and each
        element's absolute scale (both (R, D); the kernels' own arithmetic)."""
        fmt = parse_format(fmt)
        a = a.to(compute_dtype(a.dtype))
        t = checked_transform(self, self.transform(a, generator))
        x = t.forward(a)
        y, scale, _, bs = reference.prepare(x, fmt, self.granularity)
        s = scale.double().expand_as(y)
        if bs is not None:
            s = s * bs.double().repeat_interleave(fmt.block, dim=1)[:, : y.shape[1]]
        return t, y, s, fmt

    def rounding_variance(
        self, a: torch.Tensor, fmt: AnyFormat | int | str, generator: torch.Generator | None = None
    ) -> tuple[RowTransform, torch.Tensor]:
        """The transform of ``a`` and the stochastic-rounding variance ``(y − lo)(hi − y)·s²``
        of each element of ``T·a`` (float64, shape of ``T·a``; exactly as the kernels
        compute ``y`` and ``s``). All-zero groups add 0; an empty ``a`` gives an empty
        variance (identity transform). Raises ``ValueError`` for a format
        that clips (``*_spec``): its error is not this variance alone but a clipping bias
        too, which these formulas (and :meth:`expected_variance`, :meth:`variance_bound`)
        do not have — measure such a format's error from draws of :meth:`quantize`."""
        check_operand(a, f"{self.name}.rounding_variance")
        refuse_clipping(parse_format(fmt), f"{self.name}.rounding_variance")
        if a.numel() == 0:  # nothing to round (quantize takes empty operands too)
            return Identity(a.shape[0]), torch.zeros(a.shape, dtype=torch.float64, device=a.device)
        t, y, s, fmt = self._elements(a, fmt, generator)
        return t, element_variance(y, fmt) * s * s

    def expected_variance(
        self, a: torch.Tensor, fmt: AnyFormat | int | str, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``E‖Q(a) − a‖²`` over the rounding noise (0-d float64): the per-element SR
        variances, pushed through ``T⁻¹``. (For random transforms: given that draw.)
        ``ValueError`` for a format that clips, as :meth:`rounding_variance`."""
        check_operand(a, f"{self.name}.expected_variance")
        refuse_clipping(parse_format(fmt), f"{self.name}.expected_variance")
        if a.numel() == 0:
            return torch.zeros((), dtype=torch.float64, device=a.device)
        t, var = self.rounding_variance(a, fmt, generator)
        return t.inverse_sq(var.sum(dim=1)).sum()

    def variance_bound(self, a: torch.Tensor, fmt: AnyFormat | int | str) -> torch.Tensor:
        """Upper bound on ``E‖Q(a) − a‖²`` (docs/METHOD.md §2), 0-d float64: ``(δ·s)²/4`` per
        element of ``T·a``, ``δ`` its element grid spacing and ``s`` its absolute scale
        (``step²/4`` on an integer grid); an all-zero group has no variance and adds 0.
        ``ValueError`` for a format that clips, as :meth:`rounding_variance`."""
        check_operand(a, f"{self.name}.variance_bound")
        refuse_clipping(parse_format(fmt), f"{self.name}.variance_bound")
        if a.numel() == 0:
            return torch.zeros((), dtype=torch.float64, device=a.device)
        t, y, s, fmt = self._elements(a, fmt, None)
        per_elem = element_spacing_sq(y, fmt) * s * s / 4
        return t.inverse_sq(per_elem.sum(dim=1)).sum()
