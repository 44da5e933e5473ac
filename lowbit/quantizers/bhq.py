"""BHQ: block Householder quantizer (docs/METHOD.md §2), applied in O(N·D).

When a few rows are huge and the rest tiny, PSQ's variance is dominated by the huge
rows. BHQ groups each large row with a share of the small rows, scales the large row by
``s1`` and the small ones by ``s2``, and reflects the group with the Householder matrix
``H_g = I − 2vvᵀ``, ``v ∝ e1 − 𝟙/√g``, which maps ``e1`` to ``𝟙/√g``: the large row's
content is spread evenly over its group, so every row of the group uses its bins.

With row ranges ``λ`` (``max |row|``), sorted descending:

* the number ``z`` of small rows is the first ``z ≥ 1`` with
  ``z · λ_(N−z−1) > Σ_{k<N−z} λ_k`` (at most ``N − 1``); the other ``K = N − z`` are large;
* large row ``i`` gets ``round(cumsum(z·λ_i / Σλ_large))`` differences of small rows,
  taken in sorted order;
* ``s1 = (λ_large/√g)^(−1/3)``, ``s2 = (λ_small·max|H_g| / (g−1))^(−1/3)`` with
  ``λ_small`` the largest small range of the group.

``T = H·S`` is applied as a rank-1 update per group (``x − 2v(vᵀx)``, the group sums ``vᵀx``
added row by row in ascending order on the CPU), never as a dense N×N matrix;
``T⁻¹ = S⁻¹·H``.
"""

from __future__ import annotations

import itertools
import math
import warnings

import torch
from ..scopes import scope

from ..formats import Format, Granularity, Rounding, compute_dtype
from ..kernels import (Backend, Encoded, Impl, Kernels, avx512, bhq_groups, int8, kernels_for, reference, register,
                       register_fused)
from ..kernels.bhq_groups import csr_index
from .base import GradQuantizer, RowTransform, row_absmax

def _weighted(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.to(w.dtype) * w[:, None]


SPARSE_MIN_NUMEL = 1 << 19  # off the CPU, the sparse product from this size on (measured on a CPU, where it was used until 2026-12-03)
SEQUENTIAL_DEVICES = frozenset({"cpu"})  # where the group sums are added row by row (no sparse product)


def sequential_group_sums(x: torch.Tensor, w: torch.Tensor, t: BlockHouseholder) -> torch.Tensor:
    """``dots[g] = Σ_{r∈g} w_r x_r`` (G, D) in ``w``'s dtype, each group's rows added one by
    one in ascending row order (``index_add_``'s order), each product rounded first, from
    +0: the CPU's definition (:func:`_group_sums`), whatever its settings."""
    wx = _weighted(x, w)  # (N, D)
    return wx.new_zeros(t.n_groups, x.shape[1]).index_add_(0, t.group, wx)


def _group_sums(x: torch.Tensor, w: torch.Tensor, t: BlockHouseholder) -> torch.Tensor:
    """``dots[g] = Σ_{r∈g} w_r x_r`` (G, D) over the groups of ``t``, in ``w``'s dtype.

    On the CPU (``SEQUENTIAL_DEVICES``), each group's rows are added one by one in
    ascending row order, each product ``w_r x_r`` rounded first, to a sum that starts at
    +0: a weighting pass and ``index_add_`` (which adds in index order). The native kernel
    (:func:`lowbit.kernels.avx512.run_bhq_group_sums`) sums in that order too, so every
    kernel set gives the same bits. On other devices, float32 operands of at least
    ``SPARSE_MIN_NUMEL`` elements take one sparse (G × N, N non-zeros) × dense product on
    the groups' CSR index (:meth:`BlockHouseholder.csr`; it reads ``x`` once and writes
    only (G, D), where the scatter-add first writes a fresh (N, D) buffer), summed in the
    device library's order."""
    if x.device.type in SEQUENTIAL_DEVICES or x.dtype != torch.float32 or w.dtype != torch.float32 \
            or x.numel() < SPARSE_MIN_NUMEL:
        return sequential_group_sums(x, w, t)
    crow, members = t.csr()
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        mat = torch.sparse_csr_tensor(crow, members, w[members], (t.n_groups, x.shape[0]),
                                      check_invariants=False)
        return torch.sparse.mm(mat, x)  # (G, D)


def _native_group_sums_ok(x: torch.Tensor, w: torch.Tensor, t: BlockHouseholder) -> bool:
    """The native kernel sums in the sequential order: only where the reference does."""
    return x.device.type in SEQUENTIAL_DEVICES and avx512.supports_bhq_group_sums(x, w, t)


def _apply_forward(x: torch.Tensor, dots: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                   group: torch.Tensor) -> torch.Tensor:
    """``T x = H S x = S x − 2 v · dots[group]`` with ``dots = Σ_group v s x``."""
    return x.to(scale.dtype) * scale[:, None] - 2 * v[:, None] * dots[group]


def _apply_inverse(y: torch.Tensor, dots: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                   group: torch.Tensor, out_dtype: torch.dtype, overwrite: bool = False) -> torch.Tensor:
    """``T⁻¹ y = S⁻¹ H y = S⁻¹ (y − 2 v · dots[group])`` with ``dots = Σ_group v y``
    (all of one dtype). ``overwrite``: the caller no longer needs ``y``, so a kernel may
    write the result over it (the native one does; this one returns a new tensor)."""
    return ((y - 2 * v[:, None] * dots[group]) / scale[:, None]).to(out_dtype)


def _forward_quantize(x: torch.Tensor, dots: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                      group: torch.Tensor, fmt: Format, granularity: Granularity,
                      rounding: Rounding, seed: torch.Tensor) -> tuple:
    """Transform and quantize in one kernel (``T x`` is never written to memory)."""
    return reference.quantize(_apply_forward(x, dots, scale, v, group), fmt, granularity,
                              rounding, seed)


def _sums_inverse(k: Kernels, y: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, t: BlockHouseholder,
                  out_dtype: torch.dtype, overwrite: bool = False) -> torch.Tensor:
    """``T⁻¹ y``: the group sums ``Σ_group v y`` (op ``bhq_group_sums``), then the inverse
    (op ``bhq_inverse``), each on the call's kernels ``k``. The native kernel of this op
    (:func:`lowbit.kernels.avx512.run_bhq_sums_inverse`) does both from one read of ``y``,
    bit for bit."""
    dots = k.run("bhq_group_sums", y, v, t)
    return k.run("bhq_inverse", y, dots, scale, v, t.group, out_dtype, overwrite)


def _quantize_rows(k: Kernels, x: torch.Tensor, t: BlockHouseholder, fmt: Format, granularity: Granularity,
                   rounding: Rounding, seed: torch.Tensor) -> tuple:
    """``T x``'s rows on ``fmt`` (codes, scale, offset, block scale): the group sums (op
    ``bhq_group_sums``), then the fused transform and quantizer (op
    ``bhq_forward_quantize``), each on the call's kernels ``k``. The native kernel of this
    op (:func:`lowbit.kernels.avx512.run_bhq_quantize`) does both group by group from one
    read of ``x``, bit for bit."""
    with scope("lowbit::transform"):
        dots = k.run("bhq_group_sums", x, t.weights()[0], t)
    return k.run("bhq_forward_quantize", x, dots, t.scale, t.v, t.group, fmt, granularity, rounding, seed)


def _epilogue_inverse(k: Kernels, acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor, n_sum: int,
                      t: BlockHouseholder, out_dtype: torch.dtype) -> torch.Tensor:
    """``T⁻¹`` of an integer GEMM's output: its float32 epilogue ``(float(acc)·a_scale)·b_scale``
    written over the int32 sums ``acc`` (…, M, N) (op ``int8_epilogue_into``; float32
    scales), then :meth:`BlockHouseholder.inverse` of its (…·M, N) rows in place, each on
    the call's kernels ``k``. The native kernel of this op
    (:func:`lowbit.kernels.avx512.run_bhq_epilogue_inverse`) does both group by group,
    reading and writing the output once, bit for bit."""
    k.run("int8_epilogue_into", acc, a_scale, b_scale, None, None, None, None, n_sum, None)
    with scope("lowbit::transform"):  # (its group sums are quantizer work to a GEMM trace)
        return t.inverse(acc.view(torch.float32).view(-1, acc.shape[-1]), out_dtype, overwrite=True)


def _forward_quantize_pair(k: Kernels, x: torch.Tensor, t: BlockHouseholder, fmt_a: Format, gran_a: Granularity,
                           rnd_a: Rounding, seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity,
                           rnd_w: Rounding, seed_w: torch.Tensor) -> tuple:
    """A layer's two gradient quantizations where ``∇X``'s is BHQ's transform ``t``:
    ``T x``'s rows (op ``bhq_quantize``: what :meth:`BlockHouseholder.forward_quantize`
    does) and ``x``'s columns, i.e. ``xᵀ``'s rows (op ``quantize``), each on the call's
    kernels ``k``: the eight tensors of the two (codes, scale, offset, block scale). The
    native kernel of this op (:func:`lowbit.kernels.avx512.run_bhq_quantize_pair`) makes
    the columns' ranges in the same read as the rows' codes, bit for bit."""
    return (*k.run("bhq_quantize", k, x, t, fmt_a, gran_a, rnd_a, seed_a),
            *k.run("quantize", x.t(), fmt_w, gran_w, rnd_w, seed_w))


def _forward_quantize_batched_pair(k: Kernels, x: torch.Tensor, t: BlockHouseholder, entries: int, fmt_a: Format,
                                   gran_a: Granularity, rnd_a: Rounding, seed_a: torch.Tensor, fmt_w: Format,
                                   gran_w: Granularity, rnd_w: Rounding, seed_w: torch.Tensor) -> tuple:
    """:func:`_forward_quantize_pair` of ``x`` (B·N, D) holding ``entries`` = B entries of
    N rows (attention's heads), the ``∇W`` side each entry's transpose (B·D, N) (op
    ``quantize``: what :func:`lowbit.gradpair.quantize_grad_w` gives with ``batched``).
    The native kernel of this op (:func:`lowbit.kernels.avx512.run_bhq_quantize_batched_pair`)
    makes each entry's column ranges in the rows' group pass, bit for bit."""
    n = x.shape[0] // entries
    cols = x.reshape(entries, n, x.shape[1]).mT.reshape(-1, n)
    return (*k.run("bhq_quantize", k, x, t, fmt_a, gran_a, rnd_a, seed_a),
            *k.run("quantize", cols, fmt_w, gran_w, rnd_w, seed_w))


def _native(fn):  # noqa: ANN001, ANN202
    """A native kernel of an op whose first argument is the call's kernels (its reference
    composes other ops on them): ``fn`` without that argument."""
    return lambda k, *args: fn(*args)


register_fused("bhq_forward", _apply_forward)
register_fused("bhq_inverse", _apply_inverse)
register_fused("bhq_forward_quantize", _forward_quantize)
register("bhq_forward_quantize", Impl.NATIVE, avx512.run_bhq_forward_quantize, ("cpu",), avx512.supports_bhq)
register("bhq_inverse", Impl.NATIVE, avx512.run_bhq_inverse, ("cpu",), avx512.supports_bhq_inverse)
register("bhq_sums_inverse", Impl.REFERENCE, _sums_inverse)
register("bhq_sums_inverse", Impl.NATIVE, _native(avx512.run_bhq_sums_inverse), ("cpu",),
         _native(avx512.supports_bhq_sums_inverse))
register("bhq_epilogue_inverse", Impl.REFERENCE, _epilogue_inverse)
register("bhq_epilogue_inverse", Impl.NATIVE, _native(avx512.run_bhq_epilogue_inverse), ("cpu",),
         _native(avx512.supports_bhq_epilogue_inverse))
register("bhq_quantize", Impl.REFERENCE, _quantize_rows)
register("bhq_quantize", Impl.NATIVE, _native(avx512.run_bhq_quantize), ("cpu",), _native(avx512.supports_bhq_rows))
register("bhq_quantize_pair", Impl.REFERENCE, _forward_quantize_pair)
register("bhq_quantize_pair", Impl.NATIVE, _native(avx512.run_bhq_quantize_pair), ("cpu",),
         _native(avx512.supports_bhq_pair))
register("bhq_quantize_batched_pair", Impl.REFERENCE, _forward_quantize_batched_pair)
register("bhq_quantize_batched_pair", Impl.NATIVE, _native(avx512.run_bhq_quantize_batched_pair), ("cpu",),
         _native(avx512.supports_bhq_batched_pair))
register("bhq_group_sums", Impl.REFERENCE, _group_sums)
register("bhq_group_sums", Impl.NATIVE, avx512.run_bhq_group_sums, ("cpu",), _native_group_sums_ok)
register("bhq_groups", Impl.REFERENCE, bhq_groups.checked_reference)
register("bhq_groups", Impl.NATIVE, bhq_groups.run, ("cpu",), bhq_groups.supports)
register("bhq_entry_groups", Impl.REFERENCE, bhq_groups.entry_reference)
register("bhq_entry_groups", Impl.NATIVE, bhq_groups.run_entries, ("cpu",), bhq_groups.supports_entries)


def _state(a: object) -> tuple | None:
    """What an in-place write, a ``.data`` swap or a replacement changes about a field: the
    tensor itself and its storage (both held: no other tensor or buffer takes their ``id``
    or address while the memo lives), its version, address, shape, strides and dtype; None
    for what keeps no version (an inference tensor), is not a strided tensor, or has no
    storage of its own (a functorch transform's wrapper, a fake tensor: their addresses
    raise — BHQ inside ``torch.func.grad`` failed there, a review); then nothing is
    memoized on it."""
    if not isinstance(a, torch.Tensor) or a.layout != torch.strided or a.is_inference() \
            or torch._C._functorch.is_functorch_wrapped_tensor(a):
        return None
    try:
        ptr = a.data_ptr()
    except RuntimeError:  # no storage (a fake or meta-like tensor)
        return None
    return (a, a._version, ptr, a.shape, a.stride(), a.dtype, a.untyped_storage())


def _same_state(a: object, st: tuple | None) -> bool:
    """Whether ``a`` is still the field :func:`_state` saw as ``st``. (A write through
    ``.data`` or ``.numpy()`` into the same storage moves nothing it reads: as for any
    tensor, it is not seen — the C kernels bound-check the index they read rows through
    each call, ``lowbit.kernels.avx512._check_csr``.)"""
    return st is not None and a is st[0] and a._version == st[1] and a.data_ptr() == st[2] \
        and a.shape == st[3] and a.stride() == st[4] and a.dtype == st[5]  # type: ignore[attr-defined]


class BlockHouseholder(RowTransform):
    """Per-row scale ``s`` and Householder vector entries ``v`` with group ids.

    ``T = H·S``, ``T⁻¹ = S⁻¹·H``; each group's ``vᵀx`` is summed over its weighted rows
    (:func:`_group_sums`: one summation order on every kernel set), then one pass applies the rank-1
    update: O(N·D). The call's kernels fuse that pass (and the quantizer) where allowed;
    the arithmetic is the same, bit for bit.
    """

    def __init__(self, scale: torch.Tensor, v: torch.Tensor, group: torch.Tensor, n_groups: int,
                 kernels: Kernels | None = None, csr: tuple[torch.Tensor, torch.Tensor] | None = None,
                 entry_groups: tuple[int, ...] | None = None):
        self.n_rows = scale.shape[0]
        self.scale = scale  # (N,) in the compute dtype (float32; float64 for float64 input)
        self.v = v  # (N,) same dtype, 0 for groups of one
        self.group = group  # (N,) int64
        self.n_groups = n_groups
        self.kernels = kernels
        self._csr = csr
        # groups built per entry (bhq_transform's entries): each entry's number of groups,
        # entry e's numbered after those of the entries before it
        self.entry_groups = entry_groups
        self._group_starts = None if entry_groups is None else [0, *itertools.accumulate(entry_groups)]
        # memo of index_ok(): (the fields' signature it holds for, the verdict); set by
        # bhq_transform, which builds the index so (_built)
        self._index_memo: tuple[tuple, bool] | None = None
        self._library_built = False
        # (v·s, 2v) as the construction made them (_keep: the same bits as torch's
        # products), for the fields they were made from: see weights()
        self._weights: tuple | None = None

    def _keep(self, derived: tuple[torch.Tensor, torch.Tensor] | None) -> BlockHouseholder:
        """Keep the construction's ``(v·s, 2v)`` for :meth:`weights` (lowbit's own
        construction only: not a constructor argument, which a user could hand values of
        another length the kernels then read past)."""
        if derived is not None and all(d.shape == self.scale.shape and d.dtype == self.scale.dtype
                                       and d.device == self.scale.device for d in derived):
            self._weights = (self._weights_key(), *derived)
        return self

    def __getstate__(self) -> dict:
        """A copy (``copy.deepcopy``, pickle, ``torch.save``) keeps neither memo: its
        tensors are new objects whose versions say nothing of the original's (a copy of a
        transform changed in place carried the version its kept ``v·s`` was made at: stale,
        a review), so its index is checked again and ``v·s``, ``2v`` computed again."""
        state = self.__dict__.copy()
        state.update(_weights=None, _index_memo=None, _library_built=False)
        return state

    def _weights_key(self) -> tuple | None:
        """:func:`_state` of ``scale`` and ``v`` (None where either keeps none: then nothing
        is kept)."""
        key = (_state(self.scale), _state(self.v))
        return None if None in key else key

    def _kept_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The construction's ``(v·s, 2v)`` while ``scale`` and ``v`` are the tensors they
        were made from, unchanged (:func:`_same_state`); else None."""
        key = None if self._weights is None else self._weights[0]
        if key is None or not (_same_state(self.scale, key[0]) and _same_state(self.v, key[1])):
            return None
        return self._weights[1], self._weights[2]  # type: ignore[index]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(v·s, 2v)`` (N,) in the transform's dtype: the group sums' weights and the
        rank-1 update's factor, as torch's ``v * scale`` and ``2 * v`` give them — the
        construction's (:func:`bhq_transform`: the same bits) where ``scale`` and ``v``
        are still the tensors it made, unchanged; a field replaced or written in place
        gets them computed again."""
        kept = self._kept_weights()
        return kept if kept is not None else (self.v * self.scale, 2 * self.v)

    def csr(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(crow, members)``: group ``j``'s rows are ``members[crow[j]:crow[j + 1]]``,
        ascending (:func:`lowbit.kernels.bhq_groups.csr_index`; computed once)."""
        if self._csr is None:
            self._csr = csr_index(self.group, self.n_groups)
        return self._csr

    def index_ok(self, n_rows: int) -> bool:
        """Whether C kernels may index an operand of ``n_rows`` rows by this transform's
        groups: ``scale``, ``v`` and ``group`` are strided CPU tensors of ``n_rows``
        entries, ``group`` int64 with ids in [0, ``n_groups``), and the CSR index (given, or
        :meth:`csr`'s) is ``group``'s: ``crow`` (G + 1,) from 0 to N, non-decreasing,
        ``members`` each row once, ascending within its group. Checked once per state of
        those fields (a field replaced or changed in place is checked again;
        :func:`bhq_transform`'s are built so): the reference ops read ``group`` alone, and
        a kernel indexing by a wrong index read and wrote outside its tensors (a review)."""
        if not self._memo_holds():
            ok = self._check_index()
            self._index_memo = (self._signature(), ok)  # (csr() may have made the index)
            self._library_built = False  # the memo is now a check's, not the construction's (a review)
        return self._index_memo[1] and self.n_rows == n_rows  # type: ignore[index]

    def _parts(self) -> tuple:
        return (self.scale, self.v, self.group, *(self._csr or ()))

    def _signature(self) -> tuple | None:
        """The fields :meth:`index_ok` reads: the sizes and each tensor's :func:`_state`
        (the tensor itself — held, so no other object takes its ``id``: a replaced field
        freed and its id reused passed for the old one, a review — its version, storage and
        shape); None where a field keeps no state (an inference tensor keeps no version:
        then nothing is memoized, it is checked each time)."""
        states = tuple(_state(a) for a in self._parts())
        return None if None in states else (self.n_rows, self.n_groups, self.entry_groups, states)

    def _memo_holds(self) -> bool:
        """Whether :meth:`index_ok`'s memo is for the fields as they are now: the same
        sizes, and each field the same object, version, storage and shape."""
        memo = self._index_memo
        sig = None if memo is None else memo[0]
        if sig is None or sig[0] != self.n_rows or sig[1] != self.n_groups or sig[2] != self.entry_groups:
            return False
        parts, states = self._parts(), sig[3]
        if len(parts) != len(states):
            return False
        for a, st in zip(parts, states):
            if not _same_state(a, st):
                return False
        return True

    def _check_index(self) -> bool:
        n, g = self.n_rows, self.n_groups
        parts = (self.scale, self.v, self.group)
        if not (isinstance(g, int) and not isinstance(g, bool) and (g > 0 or n == 0)
                and all(type(a) is torch.Tensor and a.layout == torch.strided and a.device.type == "cpu"
                        and a.shape == (n,) for a in parts) and self.group.dtype == torch.int64):
            return False
        if n:
            lo, hi = torch.aminmax(self.group)
            if not (bool(lo >= 0) and bool(hi < g)):
                return False
        crow, members = self.csr()
        if not (all(type(a) is torch.Tensor and a.layout == torch.strided and a.device.type == "cpu"
                    and a.dtype == torch.int64 for a in (crow, members))
                and crow.shape == (g + 1,) and members.shape == (n,)):
            return False
        sizes = crow.diff()
        if not (int(crow[0]) == 0 and int(crow[-1]) == n and bool((sizes >= 0).all())):
            return False
        if n == 0:
            return True
        lo, hi = torch.aminmax(members)
        if not (bool(lo >= 0) and bool(hi < n)):
            return False
        owner = torch.repeat_interleave(torch.arange(g), sizes)  # the group of each member slot
        same = owner[1:] == owner[:-1]
        return bool(torch.equal(self.group[members], owner)) and bool((torch.bincount(members, minlength=n) == 1).all()) \
            and bool((members.diff()[same] > 0).all())

    def _k(self, x: torch.Tensor) -> Kernels:
        return self.kernels or kernels_for(Backend.REFERENCE, x.device)

    @property
    def entry_rows(self) -> int | None:
        """Rows of each entry where the groups were built per entry, else None."""
        if self.entry_groups is None:
            return None
        return self.n_rows // len(self.entry_groups) if self.entry_groups else 0

    def within_entries(self, rows: int) -> bool:
        """Groups built per entry of ``entry_rows`` rows never cross an entry of ``rows``
        rows when ``entry_rows`` divides ``rows``."""
        er = self.entry_rows
        return bool(er) and rows > 0 and rows % er == 0  # type: ignore[operator]

    def entries(self, lo: int, hi: int) -> BlockHouseholder:
        """The transform of rows ``lo:hi`` (whole entries of :attr:`entry_rows`): their
        scales, vectors and groups, renumbered from 0, with their part of the CSR index."""
        er = self.entry_rows
        if er is None:
            raise ValueError("the transform's groups span the whole operand (built without entries): "
                             "it does not split by entries")
        if not er or not 0 <= lo <= hi <= self.n_rows or lo % er or hi % er:
            raise ValueError(f"rows {lo}:{hi} are not whole entries of the transform's groups "
                             f"({self.n_rows} rows, entries of {er})")
        g0, g1 = self._group_starts[lo // er], self._group_starts[hi // er]  # type: ignore[index]
        crow, members = self.csr()
        m0, m1 = int(crow[g0]), int(crow[g1])
        kept = self._kept_weights()
        part = BlockHouseholder(self.scale[lo:hi], self.v[lo:hi], self.group[lo:hi] - g0, g1 - g0, self.kernels,
                                (crow[g0:g1 + 1] - m0, members[m0:m1] - lo),
                                self.entry_groups[lo // er:hi // er])._keep(  # type: ignore[index]
                                    None if kept is None else (kept[0][lo:hi], kept[1][lo:hi]))
        if self._library_built and self._memo_holds():
            _built(part)  # a whole-entry part of a library-built index, unchanged since, is one
        return part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self._k(x)
        dots = k.run("bhq_group_sums", x, self.weights()[0], self)
        return k.run("bhq_forward", x, dots, self.scale, self.v, self.group)

    def forward_quantize(self, x: torch.Tensor, fmt: Format, granularity: Granularity,
                         rounding: Rounding, seed: torch.Tensor) -> Encoded:
        k = self._k(x)
        if x.numel() == 0:
            return super().forward_quantize(x, fmt, granularity, rounding, seed)
        with scope("lowbit::quantize"):
            codes, scale, offset, bs = k.run("bhq_quantize", k, x, self, fmt, granularity, rounding, seed)
        return Encoded(codes, scale, offset, bs, fmt.block, kernels=k)

    def forward_quantize_pair(self, x: torch.Tensor, fmt_a: Format, gran_a: Granularity, rnd_a: Rounding,
                              seed_a: torch.Tensor, fmt_w: Format, gran_w: Granularity, rnd_w: Rounding,
                              seed_w: torch.Tensor, entries: int | None = None) -> tuple[Encoded, Encoded]:
        """``∇Y`` (N, D) ``x``'s two quantizations: :meth:`forward_quantize`'s codes of
        ``T x`` (N, D) and those of ``xᵀ`` (D, N: ``x``'s columns, untransformed) on
        ``fmt_w`` — bitwise what ``forward_quantize(x, fmt_a, …)`` and an identity's
        ``forward_quantize(x.t(), fmt_w, …)`` give, from one kernel where the call's
        kernels have it (op ``bhq_quantize_pair``). With ``entries``, ``x`` (B·N, D) is
        that many entries of N rows (attention's heads; the transform's groups built per
        entry) and the second operand each entry's transpose (B·D, N), bitwise an
        identity's ``forward_quantize`` of ``x.reshape(B, N, D).mT.reshape(-1, N)`` (op
        ``bhq_quantize_batched_pair``). ``x`` must not be empty."""
        k = self._k(x)
        with scope("lowbit::quantize"):
            if entries is None:
                out = k.run("bhq_quantize_pair", k, x, self, fmt_a, gran_a, rnd_a, seed_a, fmt_w, gran_w, rnd_w,
                            seed_w)
            else:
                out = k.run("bhq_quantize_batched_pair", k, x, self, entries, fmt_a, gran_a, rnd_a, seed_a, fmt_w,
                            gran_w, rnd_w, seed_w)
        return (Encoded(*out[:4], fmt_a.block, kernels=k), Encoded(*out[4:], fmt_w.block, kernels=k))

    def epilogue_inverse(self, kernels: Kernels, acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                         k: int, out_dtype: torch.dtype) -> torch.Tensor | None:
        """:meth:`RowTransform.epilogue_inverse`: on fused kernels, for int32 ``acc``
        without offsets whose epilogue stays in float32 (``lowbit.kernels.int8.safe_scales``)
        and a float32 result, the op ``bhq_epilogue_inverse`` (the epilogue, then
        :meth:`inverse`; one pass on the CPU's kernel); else — and for a subclass (or an
        instance) with its own ``inverse`` — ``None``."""
        if not (kernels.fused and out_dtype == torch.float32 and acc.dtype == torch.int32 and acc.dim() >= 2
                and acc.numel() // max(acc.shape[-1], 1) == self.scale.shape[0]):
            return None
        if type(self).inverse is not BlockHouseholder.inverse or "inverse" in vars(self):
            return None  # a user's own inverse runs as written (a review: the kernel skipped it, gradients ×4)
        a_scale, b_scale = int8.safe_scales(a_scale, b_scale, k, shift=True)
        if torch.promote_types(a_scale.dtype, b_scale.dtype) != torch.float32:
            return None
        return kernels.run("bhq_epilogue_inverse", kernels, acc, a_scale, b_scale, k, self, out_dtype)

    def inverse(self, y: torch.Tensor, out_dtype: torch.dtype = torch.float32,
                overwrite: bool = False) -> torch.Tensor:
        # In the transform's dtype, or float64 where y is (a float64 GEMM output or a
        # dequantization asked for in float64): the inverse adds no rounding of its own.
        dt = torch.promote_types(torch.promote_types(y.dtype, self.scale.dtype), torch.float32)
        y, v, scale = y.to(dt), self.v.to(dt), self.scale.to(dt)
        k = self._k(y)
        return k.run("bhq_sums_inverse", k, y, v, scale, self, out_dtype, overwrite)

    def inverse_sq(self, var: torch.Tensor) -> torch.Tensor:
        # Σ_i H_ji² r_i = r_j (1 − 4 v_j²) + 4 v_j² Σ_{i∈group} v_i² r_i, then / s_j².
        v2 = self.v.double() ** 2
        var = var.double()
        grp = var.new_zeros(self.n_groups).index_add_(0, self.group, v2 * var)
        out = var * (1 - 4 * v2) + 4 * v2 * grp[self.group]
        # a sum of non-negative terms: an infinite one makes it +inf, where the formula's
        # (1 − 4v²) < 0 gave −inf + inf = NaN (a review; the other quantizers said inf)
        nan = var.new_zeros(self.n_groups).index_add_(0, self.group, var.isnan().double())[self.group] > 0
        out = torch.where(out.isnan() & ~nan, math.inf, out)
        return out / self.scale.double() ** 2


def _built(t: BlockHouseholder) -> BlockHouseholder:
    """``t`` as :func:`bhq_transform` (or :meth:`BlockHouseholder.entries` of such a one)
    built it: its index is ``group``'s by construction (the groups kernel is self-tested
    against the torch definition and ``csr_index``), so :meth:`BlockHouseholder.index_ok`
    need not check it while its fields stay as built; on the CPU only (the C kernels')."""
    t._library_built = True
    t._index_memo = (t._signature(), t.group.device.type == "cpu")
    return t


def bhq_transform(a: torch.Tensor, kernels: Kernels | None = None, entries: int | None = None) -> BlockHouseholder:
    """Build the BHQ transform for ``a`` (N, D): the groups and scales of the module
    docstring from the row ranges, by the kernel-table op ``bhq_groups``
    (:mod:`lowbit.kernels.bhq_groups`: O(N log N) bookkeeping in float64, so that every
    float32 range, subnormals included, stays exact); the transform itself runs in the
    compute dtype (float64 for float64 ``a``). ``kernels``: the call's kernels (default:
    reference).

    ``entries``: the rows are that many consecutive entries of ``N / entries`` rows
    (attention's batch entries and heads); each entry's groups are then built from its
    own rows alone (the op ``bhq_entry_groups``; an entry of one row, or whose ranges are
    not finite or all zero, gets groups of one), so that the transform never mixes rows of
    two entries (:meth:`BlockHouseholder.within_entries`). On the CPU's fused backends the
    op is one C call for all entries; the reference backend runs its torch definition, a
    Python loop over the entries (≈ 0.1 ms each: 180 ms for 1,536 heads); off the CPU a
    fused backend takes the CPU kernel's groups (the ranges copied there and the groups
    back). ``ValueError`` where ``entries`` does not divide ``N``."""
    n = a.shape[0]
    dev = a.device
    dt = compute_dtype(a.dtype)
    if entries is not None:
        if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1 or n % entries:
            raise ValueError(f"entries={entries!r} must be a positive int dividing the operand's {n} rows")
        k = kernels or kernels_for(Backend.REFERENCE, dev)
        lam = row_absmax(a, kernels)  # the op makes the ranges float64
        if dev.type != "cpu" and k.fused:
            # off the CPU the groups come from the CPU's kernel (one copy of the (N,) ranges
            # each way): the torch definition loops over the entries in Python, a few
            # device syncs each (module docstring of lowbit.kernels.bhq_groups)
            groups = kernels_for(k.backend, "cpu").run("bhq_entry_groups", lam.cpu(), entries, dt)
            groups = groups._replace(**{f: getattr(groups, f).to(dev) for f in ("scale", "v", "group", "crow", "members",
                                                                                "w", "v2")
                                        if getattr(groups, f) is not None})
        else:
            groups = k.run("bhq_entry_groups", lam, entries, dt)
        csr = None if groups.crow is None else (groups.crow, groups.members)
        return _built(BlockHouseholder(groups.scale, groups.v, groups.group, groups.n_groups, kernels, csr,
                                       groups.entry_groups)._keep(_derived(groups)))
    # (N,) in the compute dtype; the op reads them as float64 and gives None for an
    # all-zero gradient or a non-finite one
    groups = (kernels or kernels_for(Backend.REFERENCE, dev)).run("bhq_groups", row_absmax(a, kernels), dt) \
        if n > 1 else None
    if groups is None:
        # One row, an all-zero gradient, or a non-finite one: groups of one, unit scale
        # (non-finite values then propagate through the per-row quantizer unchanged).
        ones = torch.ones(n, dtype=dt, device=dev)
        return _built(BlockHouseholder(ones, torch.zeros_like(ones), torch.arange(n, device=dev), n, kernels))
    csr = None if groups.crow is None else (groups.crow, groups.members)
    return _built(BlockHouseholder(groups.scale, groups.v, groups.group, groups.n_groups, kernels,
                                   csr)._keep(_derived(groups)))


def _derived(groups: object) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The construction's ``(v·s, 2v)`` where it made them (:class:`lowbit.kernels.bhq_groups.Groups`)."""
    w, v2 = getattr(groups, "w", None), getattr(groups, "v2", None)
    return None if w is None or v2 is None else (w, v2)


class BHQ(GradQuantizer):
    name = "bhq"
    granularity = Granularity.ROW
    mixes_rows = True
    # its transform quantizes ∇Y's columns alongside its rows (BlockHouseholder.forward_quantize_pair:
    # lowbit.gradpair.quantize_grad_pair_mixed; a subclass's own transform without it gets the two calls)
    pairs_columns = True
    # its scales go as λ^(−1/3) (module docstring), so T(c·g) = c^(2/3)·T(g): a loss scale
    # multiplied by c multiplies the transformed ranges by c^(2/3), not c (a trial: the
    # history was rescaled by c, 2^(1/3) too wide after each growth step); an operand of one
    # row per entry gets groups of one, unit scale: 1 for that call (a review)
    range_exponent = 2 / 3

    def transform(self, a: torch.Tensor, generator: torch.Generator | None,
                  kernels: Kernels | None = None) -> RowTransform:
        return _with_exponent(bhq_transform(a, kernels), a.shape[0])

    def entry_transform(self, a: torch.Tensor, entries: int, generator: torch.Generator | None,
                        kernels: Kernels | None = None) -> RowTransform:
        """Groups within each of the ``entries`` entries (:func:`bhq_transform`)."""
        return _with_exponent(bhq_transform(a, kernels, entries), a.shape[0] // entries)


def _with_exponent(t: BlockHouseholder, rows: int) -> BlockHouseholder:
    """``t`` with its call's ``range_exponent``: 2/3, or 1 where each entry is one row
    (groups of one, unit scale: the identity). (All-zero and non-finite operands get groups
    of one too, but record a zero range or none.)"""
    t.range_exponent = BHQ.range_exponent if rows > 1 else 1.0
    return t


