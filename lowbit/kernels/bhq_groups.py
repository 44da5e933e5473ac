"""BHQ's groups from its row ranges: the kernel-table op ``bhq_groups`` (docs/METHOD.md §2; the
quantizer is :mod:`lowbit.quantizers.bhq`, whose docstring gives the rules).

``bhq_groups(lam, dtype)``: for the row ranges ``lam`` (N,) float32 or float64 (N ≥ 2;
made float64, exact), ``None`` where a range is NaN or +Inf or none is positive (BHQ then
takes groups of one: :func:`lowbit.quantizers.bhq.bhq_transform`), else — the ranges'
maximum finite and positive; ranges are absolute values, and a negative or −Inf one goes
to :func:`reference` as it is — a :class:`Groups`: each row's scale ``s`` and Householder vector entry
``v`` (N,) in ``dtype`` (float32 or float64), its group id (N,) int64 in ``[0, K)``, the
number of groups ``K``, the groups' members as a CSR index (``crow`` (K + 1,) and
``members`` (N,) int64, ascending row ids within a group; ``None`` where not computed:
:func:`csr_index` gives it), and ``v·s`` and ``2v`` in ``dtype`` (what BHQ's kernels read).
The construction is O(N log N) bookkeeping in float64 (a sort, prefix sums, a search), so
every float32 range, subnormals included, stays exact; the scales' power ``(·)^(−1/3)`` is
:func:`inv_cbrt`, elementwise IEEE arithmetic that C computes bit for bit too.

Two implementations. :func:`reference`, in torch, defines it: about a hundred small ops
(≈ 1.5–2 ms per call at one thread, paid for every BHQ-quantized gradient). The native one
(:func:`run`; plain C, ``bhq_groups.c``, built by :mod:`.cbuild` on first use) does the
bookkeeping (a radix sort, prefix sums, group sizes and memberships, the gathers and the
scatter back to row order) and the scales' and vectors' elementwise float64 arithmetic,
the inverse cube root included, in one call (``lowbit_bhq_build``, which checks the
ranges first, so the op's ``None`` needs no torch reduction; :func:`checked_reference`
is its result for ranges outside the conditions), with the reference's operations in the
reference's order. ATen's ``sqrt`` is not the C library's (its float64 ``sqrt`` is not
correctly rounded), so it stays torch's: the square roots depend on the group size alone
and come from tables over sizes 1..2ᵏ (:func:`_tables`, computed with the reference's
ops and kept); where they do not reach the largest group, the call stops before the
scales, the tables grow, and a second call finishes. (Until 2026-12-06
the power was ``torch.pow(base, -1/3)`` between two of three calls: ATen's vectorised
float64 ``pow`` may give an element another last bit than its scalar tail loop, and the
exponent −1/3 is not exact in float64 — up to 119 ulp from the cube root over float64's
range, where :func:`inv_cbrt` is the correctly rounded value or its neighbour; no float32
scale of 2·10⁶ random bases
changed.) Attention's entries (op ``bhq_entry_groups``) are independent and go to torch's
threads (OpenMP; a compiler without it builds the same code for one thread, with a
warning: :func:`lowbit.kernels.cbuild.load`).
Its results are the reference's
bit for bit (a self-test checks ties, one huge row, equal rows, zeros, subnormal and huge
ranges, two to thousands of rows, before first use; a failure, a missing compiler or a
failed build is a ``RuntimeWarning`` and the reference runs). It also returns the CSR
index, which the reference leaves to :func:`csr_index` (a stable sort): the same index
either way. ``LOWBIT_BHQ_GROUPS=0`` (or :func:`set_enabled`) turns it off;
``LOWBIT_COMPILE=0`` too (it runs only where the dispatcher may use fast kernels).
"""

from __future__ import annotations

import ctypes
import math
import threading
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import cbuild, compiled
from ..userframe import user_stacklevel

SOURCE = Path(__file__).with_name("bhq_groups.c")
FLAGS = ("-O2", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing")
_enabled = True
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {"lowbit_bhq_groups": [_P, _I64] + [_P] * 10,
               "lowbit_bhq_finish": [_I64, _I64] + [_P] * 8 + [ctypes.c_double, ctypes.c_int] + [_P] * 4,
               "lowbit_bhq_build": [_P, ctypes.c_int, _I64, ctypes.c_double, ctypes.c_int] + [_P] * 4 + [_I64]
               + [_P] * 3,
               "lowbit_bhq_build_entries": [_P, ctypes.c_int, _I64, _I64, ctypes.c_double, ctypes.c_int] + [_P] * 4
               + [_I64] + [_P] * 4 + [ctypes.c_int]}
_RESTYPES = {"lowbit_bhq_build": _I64, "lowbit_bhq_build_entries": _I64}

# Smallest ratio λ_small/λ_large used for the small-row scale: keeps s2/s1 ≤ ~1e4·g^(1/3)
# finite when a group's small rows are all zero (their scale is then immaterial).
MIN_SMALL_RATIO = 1e-12


class Groups(NamedTuple):
    scale: torch.Tensor  # (N,) dtype
    v: torch.Tensor  # (N,) dtype, 0 for groups of one
    group: torch.Tensor  # (N,) int64
    n_groups: int
    crow: torch.Tensor | None  # (K + 1,) int64
    members: torch.Tensor | None  # (N,) int64
    entry_groups: tuple[int, ...] | None = None  # groups per entry (``bhq_entry_groups``), else None
    w: torch.Tensor | None = None  # (N,) dtype: v * scale
    v2: torch.Tensor | None = None  # (N,) dtype: 2 * v


def householder_absmax(g: torch.Tensor) -> torch.Tensor:
    """``max |H_g|`` for ``H_g = I − 2vvᵀ``, ``v ∝ e1 − 𝟙/√g`` (g ≥ 2).

    ``H e1 = 𝟙/√g`` and ``H`` is symmetric, so its first row and column hold ``1/√g``;
    the rest is ``H_jj = 1 − c`` on the diagonal and ``H_jk = −c`` off it (j ≠ k, both
    ≥ 2), with ``c = 1 / (√g (√g − 1))``. The off-diagonal ``−c`` exists only for
    ``g ≥ 3``: ``H_2 = [[1, 1], [1, −1]]/√2``, whose largest entry is ``1/√2``, not ``c``.
    """
    r = g.sqrt()
    c = 1.0 / (r * (r - 1.0))
    diag = torch.maximum(1.0 / r, (1.0 - c).abs())
    return torch.where(g >= 3, torch.maximum(diag, c), diag)


INV_CBRT_MAGIC = 0x553EF0FF289DD796  # the first guess's constant (float64 bits)
INV_CBRT_STEPS = 4  # Newton steps: a first guess within 3.5% reaches ~1e-19 after four (e → −2e²)
INV_CBRT_THIRD = 1 / 3  # (the float64 nearest 1/3)
INV_CBRT_TINY = torch.finfo(torch.float64).tiny  # below it (subnormal), the base is scaled by 2⁵⁴ first


def inv_cbrt(b: torch.Tensor) -> torch.Tensor:
    """``b^(−1/3)`` of contiguous float64 ``b`` (> 0, subnormals included; other values give
    some number BHQ never uses), elementwise: a subnormal ``b`` (below float64's smallest
    normal: a float64 operand's subnormal range, or a small row's floored base divided by
    ``g − 1``) is taken as ``b·2⁵⁴`` and its result times ``2¹⁸``, both exact (the first
    guess assumes a normal number: a review found the large row's scale 3,250× too small
    there); then a first guess from the bits (``INV_CBRT_MAGIC − bits // 3``, within 3.5%)
    and :data:`INV_CBRT_STEPS` Newton steps ``y ← y + y·((1 − (b·y)·(y·y))·INV_CBRT_THIRD)``,
    each operation rounded as IEEE float64 arithmetic rounds it (no division) — so the C
    kernel (``bhq_groups.c``'s ``inv_cbrt``) and torch on any device give the same bits.
    The correctly rounded cube root's inverse or its neighbour (< 1.2 ulp; a review found
    29 of 250,000 random bases off by one) from the smallest subnormal to float64's
    largest value (checked against 60-digit decimals in ``tests/core/test_bhq_groups.py``;
    ``b·y`` and ``y·y`` stay normal there)."""
    small = b < INV_CBRT_TINY
    b = torch.where(small, b * 2.0**54, b)
    y = (INV_CBRT_MAGIC - b.view(torch.int64).div(3, rounding_mode="floor")).view(torch.float64)
    for _ in range(INV_CBRT_STEPS):
        y = y + y * ((1 - (b * y) * (y * y)) * INV_CBRT_THIRD)
    return torch.where(small, y * 2.0**18, y)


def csr_index(group: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(crow, members)`` of the groups ``group`` (N,) int64: group ``j``'s rows are
    ``members[crow[j]:crow[j + 1]]``, ascending."""
    members = torch.argsort(group, stable=True)
    crow = torch.zeros(n_groups + 1, dtype=torch.int64, device=group.device)
    torch.cumsum(torch.bincount(group, minlength=n_groups), 0, out=crow[1:])
    return crow, members


class _Sorted(NamedTuple):
    """The bookkeeping, rows in sorted order (ranges descending)."""

    order: torch.Tensor  # (N,) int64: the rows, sorted
    k: int  # groups; the first k sorted rows are the large ones, group i the i-th
    group: torch.Tensor  # (N,) int64 group ids
    g: torch.Tensor  # (N,) float64 size of the row's group
    lam_large: torch.Tensor  # (N,) float64 range of the group's large row
    lam_small: torch.Tensor  # (N,) float64 range of the group's first small row (0: none)


def _bookkeeping(lam: torch.Tensor) -> _Sorted:
    """Sort, prefix sums, group sizes and memberships (quantizers/bhq.py's rules)."""
    n, dev = lam.shape[0], lam.device
    order = torch.argsort(lam, descending=True, stable=True)
    ls = lam[order]
    prefix = torch.cumsum(ls, 0)
    z_cand = torch.arange(1, n, device=dev)  # candidate numbers of small rows
    k_cand = n - z_cand  # number of large rows left
    cond = z_cand.double() * ls[k_cand - 1] > prefix[k_cand - 1]
    z = int(z_cand[cond.int().argmax()]) if bool(cond.any()) else n - 1
    k = n - z

    # Share of small rows for each large row, proportional to its range.
    total = prefix[k - 1]
    cum = torch.round(torch.cumsum(z * ls[:k] / total, 0)).long()
    cum[-1] = z
    cum = torch.cummax(cum.clamp(0, z), 0).values
    start = torch.cat([cum.new_zeros(1), cum[:-1]])  # first small index of each group
    size = (cum - start + 1).double()  # group sizes g ≥ 1

    # Group id of every row, in sorted order.
    small_group = torch.searchsorted(cum, torch.arange(z, device=dev), right=True)
    group_sorted = torch.cat([torch.arange(k, device=dev), small_group])
    lam_small_first = torch.zeros(k, dtype=torch.float64, device=dev)
    has_small = cum > start
    lam_small_first[has_small] = ls[k + start[has_small]]
    return _Sorted(order, k, group_sorted, size[group_sorted], ls[:k][group_sorted], lam_small_first[group_sorted])


def _by_size(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parts of the scales and vectors that depend on the group size ``g`` alone (the
    square roots), elementwise over ``g``: ``(√g, v of a large row, v of a small row,
    max|H_max(g, 2)|)``."""
    # Householder vector entries: v ∝ e1 − 𝟙/√g, ‖e1 − 𝟙/√g‖² = 2 − 2/√g.
    r = g.sqrt()
    norm = torch.sqrt(torch.clamp(2 - 2 / r, min=0))
    den = torch.where(norm > 0, norm, torch.ones_like(norm))
    zero = torch.zeros_like(r)
    v_large = torch.where(g > 1, (1 - 1 / r) / den, zero)
    v_small = torch.where(g > 1, (-1 / r) / den, zero)
    return r, v_large, v_small, householder_absmax(torch.clamp(g, min=2))


def _scales(b: _Sorted, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, v)`` (N,) in ``dtype`` and row order from the bookkeeping ``b``."""
    is_large = torch.arange(b.g.shape[0], device=b.g.device) < b.k
    return _scales_of(b.g, is_large, b.lam_large, b.lam_small, b.order, dtype)


def _scales_of(g: torch.Tensor, is_large: torch.Tensor, lam_large: torch.Tensor, lam_small: torch.Tensor,
               order: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_scales` on the bookkeeping's arrays (sorted order; ``order``: each sorted
    row's place). The power ``(·)^(−1/3)`` is :func:`inv_cbrt`, elementwise."""
    r, v_large, v_small, hmax = _by_size(g)
    v = torch.where(is_large, v_large, v_small)

    # Variance-minimising scales (overall scale is immaterial: rows are quantized per row):
    # s1 = (λ_large/√g)^(−1/3), s2 = (λ_small·max|H_g| / (g−1))^(−1/3).
    w1 = lam_large / r
    gm1 = torch.clamp(g - 1, min=1)
    # (a floor at the smallest normal float64 keeps s2 finite for subnormal float64 rows)
    w2 = torch.maximum(lam_small * hmax,
                       (MIN_SMALL_RATIO * lam_large).clamp_min(torch.finfo(torch.float64).tiny))
    s = inv_cbrt(torch.where(is_large, w1, w2 / gm1).contiguous())
    s = torch.where(g > 1, s, torch.ones_like(s))
    # Back to the original row order.
    scale = torch.empty(g.shape[0], dtype=dtype, device=g.device)
    v_out = torch.empty(g.shape[0], dtype=dtype, device=g.device)
    scale[order] = s.to(dtype)
    v_out[order] = v.to(dtype)
    return scale, v_out


_TABLES: list[torch.Tensor] = []  # the largest tables made so far; smaller sizes are prefixes
_TABLES_LOCK = threading.Lock()


def _tables(size: int) -> list[torch.Tensor]:
    """:func:`_by_size` of the group sizes 1..``size`` or more (float64, CPU), kept and
    grown by powers of two. They only ever grow and a caller gets at least ``size``: the
    kept ones are read, and grown ones published only where larger, under one lock
    (unlocked, a thread that had checked for a smaller size replaced another's grown
    tables with its own between that one's growth and its read: the C code then read past
    their end — a review). They are computed outside the lock and outside the caller's
    functorch transforms, torch function and dispatch modes (:func:`.cbuild.plain_torch`:
    a mode seeing those ops, and building groups itself, re-entered the lock — a
    deadlock; under ``torch.func.grad`` the kept tables were wrapped tensors without
    storage — reviews; the tables every later call shares are torch's plain values).
    ATen's float64 ``sqrt`` is elementwise (the same value wherever an element sits), so
    entry ``g − 1`` is the reference's value for a row of a group of ``g``; the self-test
    checks it."""
    with _TABLES_LOCK:
        if _TABLES and _TABLES[0].shape[0] >= size:
            return list(_TABLES)
    grown = 1 << (size - 1).bit_length()
    with cbuild.plain_torch():
        tabs = [t.contiguous() for t in _by_size(torch.arange(1, grown + 1, dtype=torch.float64, device="cpu"))]
    with _TABLES_LOCK:
        if not _TABLES or _TABLES[0].shape[0] < grown:
            _TABLES[:] = tabs
        return list(_TABLES)


def _table_args(size: int) -> tuple[list[torch.Tensor], list[int]]:
    """``(tables, [entries, r, vl, vs, hm addresses])``: :func:`_tables` of at least
    ``size``, and what the C calls read of those very tensors (which the caller holds for
    the call). Taken from the list returned, not kept beside ``_TABLES``: a cache of the
    addresses, published apart from the tables, let another thread growing them pair the
    new tables with the old, freed addresses (a review: C read freed memory)."""
    tabs = _tables(size)
    return tabs, [tabs[0].shape[0], *(t.data_ptr() for t in tabs)]


def reference(lam: torch.Tensor, dtype: torch.dtype) -> Groups:
    """The groups of float64 ranges ``lam`` meeting the conditions (module docstring) in
    torch; ``crow``/``members`` left ``None``: the definition."""
    b = _bookkeeping(lam)
    scale, v = _scales(b, dtype)
    grp = torch.empty(lam.shape[0], dtype=torch.long, device=lam.device)
    grp[b.order] = b.group
    return Groups(scale, v, grp, b.k, None, None, None, v * scale, 2 * v)


def checked_reference(lam: torch.Tensor, dtype: torch.dtype) -> Groups | None:
    """``bhq_groups`` in torch (the op's reference): ``None`` where a range is NaN or
    +Inf or none is positive (the ranges' maximum not finite and positive), else
    :func:`reference` of the ranges in float64 (a negative or −Inf range included, as
    it is)."""
    lam = lam.double()
    top = float(lam.max())  # NaN where any range is NaN (torch.max propagates it)
    return reference(lam, dtype) if math.isfinite(top) and top > 0 else None


def entry_reference(lam: torch.Tensor, entries: int, dtype: torch.dtype) -> Groups:
    """``bhq_entry_groups``: the groups of ``lam`` (N,) float64 (float32 taken, made
    float64), ``entries`` consecutive entries of ``N / entries`` rows each (attention's
    heads), every entry's built from its own ranges alone — :func:`reference`'s rules on
    the entry, or groups of one where the entry has one row or its ranges are not finite
    or all zero — numbered for the whole operand (entry ``e``'s groups after those of
    entries ``< e``); ``entry_groups``: each entry's number of groups; ``w``, ``v2`` as
    :func:`reference`'s. The scales come from :func:`_scales_of` over all entries' arrays
    (elementwise). ``crow``/``members`` left ``None``. The definition (:func:`run_entries`
    is the native kernel)."""
    lam = lam.double()
    n, dev = lam.shape[0], lam.device
    r = n // entries if entries else 0
    parts = []  # per entry, in its sorted order: (order, g, is_large, λ_large, λ_small, group, k)
    for x in lam.view(entries, r).unbind(0):
        top = float(x.max()) if r else 0.0  # NaN if any range is NaN
        if r >= 2 and math.isfinite(top) and top > 0:
            b = _bookkeeping(x)
            parts.append((b.order, b.g, torch.arange(r, device=dev) < b.k, b.lam_large, b.lam_small, b.group, b.k))
        else:  # groups of one: g = 1 gives s = 1, v = 0 (bhq_transform's rule for a whole operand)
            ar, zero = torch.arange(r, device=dev), torch.zeros(r, dtype=torch.float64, device=dev)
            parts.append((ar, zero + 1, torch.ones(r, dtype=torch.bool, device=dev), zero, zero, ar, r))
    offsets = [0]
    for p in parts:
        offsets.append(offsets[-1] + p[6])
    if not parts:
        empty = lam.new_zeros(0, dtype=dtype)
        return Groups(empty, empty, lam.new_zeros(0, dtype=torch.long), 0, None, None, (), empty, empty)
    order = torch.cat([p[0] + e * r for e, p in enumerate(parts)])
    cat = [torch.cat([p[i] for p in parts]) for i in range(1, 5)]
    scale, v = _scales_of(*cat, order, dtype)
    group = torch.empty(n, dtype=torch.long, device=dev)
    group[order] = torch.cat([p[5] + o for p, o in zip(parts, offsets)])
    return Groups(scale, v, group, offsets[-1], None, None, tuple(p[6] for p in parts), v * scale, 2 * v)


# -- the native kernel ----------------------------------------------------------------------
def _warn(why: str, then: str | None = None) -> None:
    warnings.warn(f"lowbit: {why}; {then or 'the reference construction runs instead'} (BHQ groups, "
                  "lowbit.kernels.bhq_groups)", RuntimeWarning, stacklevel=user_stacklevel())


@cbuild.once
@compiled.disable_tracing
def _library() -> ctypes.CDLL | None:
    """The loaded, self-tested library, or ``None`` (module docstring)."""
    if cbuild.switched_off("LOWBIT_BHQ_GROUPS"):
        return None
    with _disable_current_modes():
        return cbuild.load_tested(SOURCE, FLAGS, _SIGNATURES, _warn, "BHQ group construction", _self_test,
                                  "the reference construction", _RESTYPES)


def available() -> bool:
    """Whether the kernel can run here (a compiler, a passed self-test); builds and tests
    it on the first call."""
    return _library() is not None


def set_enabled(flag: bool) -> None:
    """Use the kernel where it applies (``True``, the default) or never (``False``: the
    reference runs; for tests and A/B benchmarks). Process-wide."""
    global _enabled
    _enabled = bool(flag)


def _plain_ranges(lam: torch.Tensor, dtype: torch.dtype) -> bool:
    """``lam`` a plain contiguous float32 or float64 CPU vector (not a functorch
    transform's wrapper, no dispatch mode active: the outputs would be tensors without
    storage, whose null address C wrote through — a review), ``dtype`` float32 or
    float64, the kernel available: what the C calls read (the values they check)."""
    return (type(lam) is torch.Tensor and lam.dtype in (torch.float32, torch.float64) and lam.device.type == "cpu"
            and lam.layout == torch.strided and lam.dim() == 1 and lam.is_contiguous()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._functorch.is_functorch_wrapped_tensor(lam)
            and cbuild.plain_memory(lam) and dtype in (torch.float32, torch.float64) and _enabled and available())


def supports(lam: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`run` takes this call: ``lam`` a plain contiguous float32 or float64
    CPU vector of at least two ranges, ``dtype`` float32 or float64, the kernel available.
    The values are the C code's to check (one read, no torch op): ranges outside the
    op's conditions (a NaN, an infinity, a negative range — ranges are absolute values: a
    review found other groups than the reference's for negative ones —, none positive)
    make :func:`run` return :func:`checked_reference`'s result."""
    return _plain_ranges(lam, dtype) and lam.shape[0] >= 2


def _addr(t: torch.Tensor, i: int) -> int:
    """The address of ``t``'s ``i``-th int64 (t int64, contiguous)."""
    return t.data_ptr() + 8 * i


@compiled.disable_tracing
def _groups(lib: ctypes.CDLL, lam: torch.Tensor, dtype: torch.dtype) -> Groups | None:
    """``lowbit_bhq_build``: the groups in one C call from three allocations (the kept
    (4, N) scales and vectors, the kept group/members/crow index, the scratch); where the
    square-root tables are too small for the largest group, they grow and
    ``lowbit_bhq_finish`` runs on the scratch's arrays; where the ranges are outside the
    op's conditions, :func:`checked_reference`."""
    n = lam.shape[0]
    out = torch.empty(4, n, dtype=dtype, device="cpu")  # scale, v, w = v·s, v2 = 2v
    idx = torch.empty(3 * n + 1, dtype=torch.int64, device="cpu")  # group, members, crow
    work = torch.empty(9 * n + 2, dtype=torch.int64, device="cpu")
    tabs, args = _table_args(1)
    f64 = int(dtype == torch.float64)
    k = lib.lowbit_bhq_build(lam.data_ptr(), int(lam.dtype == torch.float64), n, MIN_SMALL_RATIO, f64, *args[1:],
                             args[0], out.data_ptr(), idx.data_ptr(), work.data_ptr())
    if k == 0:
        return checked_reference(lam, dtype)
    if k < 0:  # the tables grow to the largest group; the scales from the scratch's arrays
        k, largest = work[9 * n:].tolist()
        tabs, args = _table_args(largest)
        if args[0] < largest:  # (never: _tables gives at least what it is asked; C reads entry largest − 1)
            raise RuntimeError(f"lowbit: BHQ's square-root tables hold {args[0]} sizes, the largest group {largest}")
        size = n * out.element_size()
        lib.lowbit_bhq_finish(n, k, _addr(work, n), _addr(work, 3 * n), _addr(work, 4 * n), _addr(work, 5 * n),
                              *args[1:], MIN_SMALL_RATIO, f64, *(out.data_ptr() + i * size for i in range(4)))
    scale, v, w, v2 = out.unbind(0)
    return Groups(scale, v, idx[:n], k, idx[2 * n: 2 * n + k + 1], idx[n: 2 * n], None, w, v2)


def run(lam: torch.Tensor, dtype: torch.dtype) -> Groups | None:
    """``bhq_groups`` on the kernel (the dispatcher's, after :func:`supports`)."""
    return _groups(_library(), lam, dtype)


def supports_entries(lam: torch.Tensor, entries: int, dtype: torch.dtype) -> bool:
    """Whether :func:`run_entries` takes this call: ``lam`` a plain contiguous float32 or
    float64 CPU vector of ``entries`` ≥ 1 equal entries, ``dtype`` float32 or float64, the
    kernel available. NaN and +Inf are the kernel's (groups of one where
    :func:`entry_reference` gives them); a negative or −Inf range beside a finite maximum
    would not be (a review), so the C code checks for one and :func:`run_entries` then
    returns :func:`entry_reference`'s result."""
    return _plain_ranges(lam, dtype) and isinstance(entries, int) and not isinstance(entries, bool) \
        and entries >= 1 and lam.shape[0] % entries == 0


@compiled.disable_tracing
def _entry_groups(lib: ctypes.CDLL, lam: torch.Tensor, entries: int, dtype: torch.dtype,
                  threads: int | None = None) -> Groups:
    """``lowbit_bhq_build_entries``: the entries' groups in one C call, the entries on
    ``threads`` threads (default: torch's number; they are independent, so the result
    does not depend on it); :func:`entry_reference` where a range is negative."""
    n = lam.shape[0]
    r = n // entries
    threads = max(1, min(torch.get_num_threads() if threads is None else threads, entries))
    out = torch.empty(4, n, dtype=dtype, device="cpu")  # scale, v, w = v·s, v2 = 2v
    idx = torch.empty(3 * n + 1, dtype=torch.int64, device="cpu")  # group, members, crow
    k = torch.empty(2 * entries, dtype=torch.int64, device="cpu")
    work = torch.empty(6 * n + entries * (r + 1) + 3 * r * threads, dtype=torch.int64, device="cpu")
    tabs, args = _table_args(max(r, 1))  # held until the call returns
    n_groups = lib.lowbit_bhq_build_entries(lam.data_ptr(), int(lam.dtype == torch.float64), entries, r,
                                            MIN_SMALL_RATIO, int(dtype == torch.float64), *args[1:], args[0],
                                            out.data_ptr(), idx.data_ptr(), k.data_ptr(), work.data_ptr(), threads)
    if n_groups == 0 and n:
        return entry_reference(lam, entries, dtype)
    scale, v, w, v2 = out.unbind(0)
    return Groups(scale, v, idx[:n], n_groups, idx[2 * n: 2 * n + n_groups + 1], idx[n: 2 * n],
                  tuple(k.tolist()[::2]), w, v2)


def run_entries(lam: torch.Tensor, entries: int, dtype: torch.dtype) -> Groups:
    """``bhq_entry_groups`` on the kernel (the dispatcher's, after :func:`supports_entries`)."""
    return _entry_groups(_library(), lam, entries, dtype)


# -- self-test ------------------------------------------------------------------------------
def _cases() -> list[torch.Tensor]:
    """Row-range vectors that reach every branch: ties, one huge row, equal rows, zeros,
    subnormal and huge ranges, many groups, two rows."""
    g = torch.Generator().manual_seed(7)
    f64 = {"dtype": torch.float64}
    out = [torch.tensor([1.0, 0.0], **f64), torch.tensor([0.0, 3.0, 3.0], **f64), torch.ones(5, **f64),
           torch.tensor([1e30] + [1e-30] * 40, **f64), torch.tensor([5e-324, 1e-310, 2.0, 0.0], **f64)]
    for n in (2, 3, 7, 64, 257, 3000):
        u = torch.rand(n, generator=g, **f64)
        out += [u, u ** 8, torch.exp(torch.randn(n, generator=g, **f64) * 6),
                torch.randint(0, 4, (n,), generator=g).to(torch.float64)]  # many ties
        spike = u * 1e-3
        spike[n // 2] = 1e3
        out.append(spike)
    out.append(torch.rand(5000, generator=g, **f64).float().double() * 2.0**-130)  # float32 subnormals
    return out


def _self_test(lib: ctypes.CDLL) -> bool:
    """The kernel against :func:`reference` and :func:`csr_index` (module docstring), bit for bit."""
    for lam in _cases():
        for dtype in (torch.float32, torch.float64):
            want = reference(lam, dtype)
            got = _groups(lib, lam, dtype)
            if not _same(got, want):
                return False
    for lam, entries in _entry_cases():
        for dtype in (torch.float32, torch.float64):
            want = entry_reference(lam, entries, dtype)
            for threads in cbuild.test_threads(1, 3):  # one thread and several (at most torch's)
                if not _same(_entry_groups(lib, lam, entries, dtype, threads), want):
                    return False
    return True


def _same(got: Groups, want: Groups) -> bool:
    """``got`` (the kernel's, with its CSR index) is ``want`` (a reference's) bit for bit."""
    crow, members = csr_index(want.group, want.n_groups)
    return got.n_groups == want.n_groups and got.entry_groups == want.entry_groups and all(
        torch.equal(a, b) for a, b in ((got.scale, want.scale), (got.v, want.v), (got.group, want.group),
                                       (got.crow, crow), (got.members, members), (got.w, want.w),
                                       (got.v2, want.v2)))


def _entry_cases() -> list[tuple[torch.Tensor, int]]:
    """Entries of every kind side by side: ordinary, one huge row, all zero, a NaN, an
    infinity, ties; entries of one and two rows."""
    g = torch.Generator().manual_seed(11)
    f64 = {"dtype": torch.float64}
    mixed = torch.rand(6, 40, generator=g, **f64) ** 4
    mixed[1, 7] = 1e6
    mixed[2] = 0
    mixed[3, 5] = math.nan
    mixed[4, 0] = math.inf
    mixed[5] = 0.5
    return [(mixed.reshape(-1), 6), (torch.rand(5, generator=g, **f64), 5), (torch.rand(8, generator=g, **f64), 4),
            (torch.rand(300, generator=g, **f64), 1), (torch.exp(torch.randn(64 * 33, generator=g, **f64) * 4), 64)]


__all__ = ["Groups", "MIN_SMALL_RATIO", "available", "csr_index", "entry_reference", "householder_absmax",
           "reference", "run", "run_entries", "set_enabled", "supports", "supports_entries"]
