"""BHQ's groups from its row ranges: the kernel-table op ``bhq_groups`` (docs/METHOD.md §2; the
quantizer is :mod:`lowbit.quantizers.bhq`, whose docstring gives the rules).

``bhq_groups(lam, dtype)``: for the row ranges ``lam`` (N,) float64 (N ≥ 2, all finite, at
least one positive), a :class:`Groups`: each row's scale ``s`` and Householder vector entry
``v`` (N,) in ``dtype`` (float32 or float64), its group id (N,) int64 in ``[0, K)``, the
number of groups ``K``, and the groups' members as a CSR index (``crow`` (K + 1,) and
``members`` (N,) int64, ascending row ids within a group; ``None`` where not computed:
:func:`csr_index` gives it). The construction is O(N log N) bookkeeping in float64 (a sort,
prefix sums, a search), so every float32 range, subnormals included, stays exact.

Two implementations. :func:`reference`, in torch, defines it: about a hundred small ops
(≈ 1.5–2 ms per call at one thread, paid for every BHQ-quantized gradient). The native one
(:func:`run`; plain C, ``bhq_groups.c``, built by :mod:`.cbuild` on first use) does the
bookkeeping (a radix sort, prefix sums, group sizes and memberships, the gathers and the
scatter back to row order) and the scales' and vectors' elementwise float64 arithmetic in
three calls, with the reference's operations in the reference's order. ATen's ``sqrt``
and ``pow`` are not the C library's (its float64 ``sqrt`` is not correctly rounded), so
both stay torch's: the square roots depend on the group size alone and come from tables
over sizes 1..2ᵏ, 2ᵏ at least the largest group (:func:`_tables`, computed with the
reference's ops and kept), and the one power runs in torch on the (N,) bases before the
last call. Its results are the reference's
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
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import _disable_current_modes

from . import cbuild, compiled

SOURCE = Path(__file__).with_name("bhq_groups.c")
FLAGS = ("-O2", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing")
_enabled = True
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {"lowbit_bhq_groups": [_P, _I64] + [_P] * 10,
               "lowbit_bhq_bases": [_I64, _I64] + [_P] * 7 + [ctypes.c_double, _P, _P],
               "lowbit_bhq_scatter": [_I64, _P, _P, _P, _P, ctypes.c_int, _P, _P]}

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
    g = b.g
    is_large = torch.arange(g.shape[0], device=g.device) < b.k
    r, v_large, v_small, hmax = _by_size(g)
    v = torch.where(is_large, v_large, v_small)

    # Variance-minimising scales (overall scale is immaterial: rows are quantized per row):
    # s1 = (λ_large/√g)^(−1/3), s2 = (λ_small·max|H_g| / (g−1))^(−1/3).
    w1 = b.lam_large / r
    gm1 = torch.clamp(g - 1, min=1)
    # (a floor at the smallest normal float64 keeps s2 finite for subnormal float64 rows)
    w2 = torch.maximum(b.lam_small * hmax,
                       (MIN_SMALL_RATIO * b.lam_large).clamp_min(torch.finfo(torch.float64).tiny))
    s = torch.where(is_large, w1, w2 / gm1).pow(-1 / 3)
    s = torch.where(g > 1, s, torch.ones_like(s))
    # Back to the original row order.
    scale = torch.empty(g.shape[0], dtype=dtype, device=g.device)
    v_out = torch.empty(g.shape[0], dtype=dtype, device=g.device)
    scale[b.order] = s.to(dtype)
    v_out[b.order] = v.to(dtype)
    return scale, v_out


_TABLES: list[torch.Tensor] = []  # the largest tables made so far; smaller sizes are prefixes


def _tables(size: int) -> list[torch.Tensor]:
    """:func:`_by_size` of the group sizes 1..``size`` or more (float64, CPU), kept and
    grown by powers of two. ATen's float64 ``sqrt`` is elementwise (the same value
    wherever an element sits), so entry ``g − 1`` is the reference's value for a row of a
    group of ``g``; the self-test checks it."""
    if not _TABLES or _TABLES[0].shape[0] < size:
        grown = 1 << (size - 1).bit_length()
        _TABLES[:] = [t.contiguous() for t in _by_size(torch.arange(1, grown + 1, dtype=torch.float64,
                                                                    device="cpu"))]
    return list(_TABLES)


def reference(lam: torch.Tensor, dtype: torch.dtype) -> Groups:
    """``bhq_groups`` (module docstring) in torch; ``crow``/``members`` left ``None``."""
    b = _bookkeeping(lam)
    scale, v = _scales(b, dtype)
    grp = torch.empty(lam.shape[0], dtype=torch.long, device=lam.device)
    grp[b.order] = b.group
    return Groups(scale, v, grp, b.k, None, None)


# -- the native kernel ----------------------------------------------------------------------
def _warn(why: str, then: str | None = None) -> None:
    warnings.warn(f"lowbit: {why}; {then or 'the reference construction runs instead'} (BHQ groups, "
                  "lowbit.kernels.bhq_groups)", RuntimeWarning, stacklevel=6)


@cbuild.once
@compiled.disable_tracing
def _library() -> ctypes.CDLL | None:
    """The loaded, self-tested library, or ``None`` (module docstring)."""
    if cbuild.switched_off("LOWBIT_BHQ_GROUPS"):
        return None
    with _disable_current_modes():
        return cbuild.load_tested(SOURCE, FLAGS, _SIGNATURES, _warn, "BHQ group construction", _self_test,
                                  "the reference construction")


def available() -> bool:
    """Whether the kernel can run here (a compiler, a passed self-test); builds and tests
    it on the first call."""
    return _library() is not None


def set_enabled(flag: bool) -> None:
    """Use the kernel where it applies (``True``, the default) or never (``False``: the
    reference runs; for tests and A/B benchmarks). Process-wide."""
    global _enabled
    _enabled = bool(flag)


def supports(lam: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`run` takes this call: ``lam`` a plain contiguous float64 CPU vector
    meeting the op's conditions (at least two entries, all finite, one positive: the C
    code reads nothing else), ``dtype`` float32 or float64, the kernel available."""
    if not (type(lam) is torch.Tensor and lam.dtype == torch.float64 and lam.device.type == "cpu"
            and lam.layout == torch.strided and lam.dim() == 1 and lam.is_contiguous() and lam.shape[0] >= 2
            and dtype in (torch.float32, torch.float64) and _enabled and available()):
        return False
    top = float(lam.max())  # NaN if any entry is NaN
    return math.isfinite(top) and top > 0


@compiled.disable_tracing
def _groups(lib: ctypes.CDLL, lam: torch.Tensor, dtype: torch.dtype) -> Groups:
    n = lam.shape[0]
    i64, f64 = {"dtype": torch.int64, "device": "cpu"}, {"dtype": torch.float64, "device": "cpu"}
    order, grp_sorted, group, members = (torch.empty(n, **i64) for _ in range(4))
    g, lam_large, lam_small, v, base = (torch.empty(n, **f64) for _ in range(5))
    crow, k, work = torch.empty(n + 1, **i64), torch.empty(2, **i64), torch.empty(3 * n, **i64)
    lib.lowbit_bhq_groups(lam.data_ptr(), n, order.data_ptr(), grp_sorted.data_ptr(), g.data_ptr(),
                          lam_large.data_ptr(), lam_small.data_ptr(), group.data_ptr(), crow.data_ptr(),
                          members.data_ptr(), k.data_ptr(), work.data_ptr())
    n_groups, largest = k.tolist()
    tabs = _tables(largest)  # the tables' references are held until the call returns
    lib.lowbit_bhq_bases(n, n_groups, g.data_ptr(), lam_large.data_ptr(), lam_small.data_ptr(),
                         *(t.data_ptr() for t in tabs), MIN_SMALL_RATIO, v.data_ptr(), base.data_ptr())
    s = torch.pow(base, -1 / 3, out=lam_small)  # _scales's power, on the same (N,) sorted bases
    scale, v_out = torch.empty(n, dtype=dtype, device="cpu"), torch.empty(n, dtype=dtype, device="cpu")
    lib.lowbit_bhq_scatter(n, order.data_ptr(), g.data_ptr(), s.data_ptr(), v.data_ptr(),
                           int(dtype == torch.float64), scale.data_ptr(), v_out.data_ptr())
    return Groups(scale, v_out, group, n_groups, crow[: n_groups + 1], members)


def run(lam: torch.Tensor, dtype: torch.dtype) -> Groups:
    """``bhq_groups`` on the kernel (the dispatcher's, after :func:`supports`)."""
    return _groups(_library(), lam, dtype)


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
            crow, members = csr_index(want.group, want.n_groups)
            if got.n_groups != want.n_groups or not all(
                    torch.equal(a, b) for a, b in ((got.scale, want.scale), (got.v, want.v),
                                                   (got.group, want.group), (got.crow, crow),
                                                   (got.members, members))):
                return False
    return True


__all__ = ["Groups", "MIN_SMALL_RATIO", "available", "csr_index", "householder_absmax", "reference", "run",
           "set_enabled", "supports"]
