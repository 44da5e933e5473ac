"""BHQ's group construction (lowbit.kernels.bhq_groups): the C bookkeeping is the torch
reference bit for bit, its CSR index is the reference's, and every kernel set builds the
same transform."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch

from lowbit.kernels import Backend, Impl, bhq_groups, cbuild, kernels_for
from lowbit.quantizers import bhq

needs_kernel = pytest.mark.skipif(not bhq_groups.available(), reason="no C compiler for the BHQ group kernel")


def avx512_available() -> bool:
    from lowbit.kernels import avx512

    return avx512.available()
AUTO, REF = kernels_for(Backend.AUTO, "cpu"), kernels_for(Backend.REFERENCE, "cpu")


def _ranges(seed: int) -> torch.Tensor:
    """Row ranges as BHQ sees them: float32 absmax values widened to float64, with ties,
    zeros, spikes and a spread of magnitudes that varies with the seed."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 4000, (1,), generator=g))
    spread = float(torch.rand(1, generator=g)) * 12
    lam = torch.exp(torch.randn(n, generator=g, dtype=torch.float64) * spread).float().double()
    if seed % 3 == 0:
        lam = lam.round()  # many ties and zeros
    if seed % 4 == 1:
        lam[int(torch.randint(0, n, (1,), generator=g))] = 1e30  # one huge row
    if seed % 5 == 2:
        lam[torch.rand(n, generator=g) < 0.5] = 0.0
    if not bool((lam > 0).any()):
        lam[0] = 1.0
    return lam


def _same(got: bhq_groups.Groups, want: bhq_groups.Groups) -> None:
    assert got.n_groups == want.n_groups
    for name in ("scale", "v", "group", "w", "v2"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert torch.equal(want.w, want.v * want.scale) and torch.equal(want.v2, 2 * want.v)


def test_inv_cbrt_is_the_cube_root_rounded_or_its_neighbour() -> None:
    """The scales' power (·)^(−1/3) (``inv_cbrt``: a first guess from the bits, four Newton
    steps of IEEE operations) against 60-digit decimals over float64's range — the smallest
    and largest normal, subnormals (a float64 operand's subnormal ranges, a small row's
    floored base over ``g − 1``: a review found them far off before they were scaled),
    powers of two and of three, exact cubes, random bases of every exponent: the correctly rounded value or its neighbour (ATen's ``pow(b, -1/3)``, the definition until
    2026-12-06, was up to ~120 ulp off at the range's ends: its exponent is not −1/3)."""
    from decimal import Decimal, getcontext
    import math

    getcontext().prec = 60
    g = torch.Generator().manual_seed(0)
    f = torch.finfo(torch.float64)
    special = [f.tiny, f.max, 1.0, 8.0, 27.0, 0.125, 2.0**-1022 * 3, 2.0**1000, 3.0**600, 3.0**-600, 1e-300, 1e300,
               5e-324, 1e-315, 1e-310, f.tiny / 2, f.tiny / 3, f.tiny * (1 - 2.0**-52),  # subnormals (a review)
               9.880218568103649, 1.513443244641586e-308]  # a neighbour of the correctly rounded value
    rand = torch.exp2(torch.rand(600, generator=g, dtype=torch.float64) * 2090 - 1070) \
        * (1 + torch.rand(600, generator=g, dtype=torch.float64))
    b = torch.cat([torch.tensor(special, dtype=torch.float64), rand.clamp(5e-324, f.max)])
    y = bhq_groups.inv_cbrt(b)
    for bi, yi in zip(b.tolist(), y.tolist(), strict=True):
        rounded = float(Decimal(bi) ** (Decimal(-1) / Decimal(3)))  # the correctly rounded value
        assert abs(yi - rounded) <= math.ulp(rounded), (bi, yi)  # it or a neighbour (a review: not always it)
    assert bhq_groups.inv_cbrt(torch.tensor([8.0, 0.125], dtype=torch.float64)).tolist() == [0.5, 2.0]
    # elementwise: an element's value does not depend on where it sits (ATen's pow did)
    assert torch.equal(bhq_groups.inv_cbrt(b[7:].clone()), y[7:])


@needs_kernel
@pytest.mark.parametrize("seed", range(40))
def test_kernel_is_the_reference_bit_for_bit(seed: int) -> None:
    _kernel_is_reference(_ranges(seed))


def _kernel_is_reference(lam: torch.Tensor) -> None:
    """The kernel's groups and CSR index of ``lam`` are the reference's, in both dtypes."""
    for dtype in (torch.float32, torch.float64):
        want = bhq_groups.reference(lam, dtype)
        got = bhq_groups.run(lam, dtype)
        _same(got, want)
        crow, members = bhq_groups.csr_index(want.group, want.n_groups)
        assert torch.equal(got.crow, crow) and torch.equal(got.members, members)


@needs_kernel
def test_kernel_scales_over_float64s_range_are_the_reference() -> None:
    """Ranges from the smallest subnormal to 1e300 (float64 gradients'): the kernel's
    inverse cube roots of the bases are ``inv_cbrt``'s, bit for bit, in both dtypes."""
    g = torch.Generator().manual_seed(3)
    for n in (2, 40, 300, 3000):
        lam = torch.exp2(torch.rand(n, generator=g, dtype=torch.float64) * 2000 - 1000)
        lam[0] = 5e-324
        lam[-1] = 1e300
        _kernel_is_reference(lam)


@needs_kernel
@pytest.mark.parametrize("n", [2, 3, 15, 16, 17, 31, 33, 64, 127, 128, 255, 256, 257])
def test_small_operands_merge_sort_as_the_reference(n: int) -> None:
    """Below the kernel's SMALL_SORT (256) keys a merge sort replaces the radix sort: the
    same stable order, so the same groups, on ties, zeros and a spike, at the sizes around
    its insertion runs (16) and the switch."""
    g = torch.Generator().manual_seed(n)
    for lam in (torch.randint(0, 4, (n,), generator=g).double(), torch.rand(n, generator=g, dtype=torch.float64) ** 6,
                torch.cat([torch.full((n - 1,), 0.5, dtype=torch.float64), torch.tensor([1e20], dtype=torch.float64)])):
        if not bool((lam > 0).any()):
            lam[n // 2] = 1.0
        _kernel_is_reference(lam)


@needs_kernel
def test_self_test_cases_pass() -> None:
    assert bhq_groups._self_test(bhq_groups._library())


@pytest.mark.skipif(cbuild.compiler(lambda *a: None) is None or cbuild.switched_off("LOWBIT_BHQ_GROUPS")
                    or cbuild.switched_off("LOWBIT_COMPILE"), reason="no C compiler, or the kernel switched off")
def test_kernel_builds_and_passes_its_self_test_where_a_compiler_is() -> None:
    """With a C compiler the kernel builds and passes its self-test (a kernel that fails it
    runs the reference with a warning, and its bit-for-bit tests above skip: this one
    fails instead)."""
    assert bhq_groups.available()


def test_csr_index_lists_each_group_in_ascending_rows() -> None:
    group = torch.tensor([2, 0, 2, 1, 0, 2])
    crow, members = bhq_groups.csr_index(group, 4)
    assert crow.tolist() == [0, 2, 3, 6, 6]
    assert members.tolist() == [1, 4, 3, 0, 2, 5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_kernel_set_builds_the_same_transform(dtype: torch.dtype) -> None:
    """The dispatcher's construction (native where available) and the reference one give
    the same transform, and the dispatcher's group sums (native kernel) the reference's, on
    an operand of ≥ 2¹⁹ elements and a small one."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, 160, generator=g, dtype=dtype) * torch.exp(torch.randn(4096, 1, generator=g, dtype=dtype) * 3)
    fast, ref = bhq.bhq_transform(x, AUTO), bhq.bhq_transform(x, REF)
    assert ref._csr is None and (fast._csr is not None) == (bhq_groups.available() and AUTO.fused)
    _same(bhq_groups.Groups(fast.scale, fast.v, fast.group, fast.n_groups, None, None, None, *fast.weights()),
          bhq_groups.Groups(ref.scale, ref.v, ref.group, ref.n_groups, None, None, None, *ref.weights()))
    w = fast.v * fast.scale
    assert torch.equal(AUTO.run("bhq_group_sums", x, w, fast), REF.run("bhq_group_sums", x, w, ref))
    small = x[:512, :64]
    ts, tr = bhq.bhq_transform(small, AUTO), bhq.bhq_transform(small, REF)
    assert torch.equal(AUTO.run("bhq_group_sums", small, ts.v * ts.scale, ts),
                       REF.run("bhq_group_sums", small, tr.v * tr.scale, tr))


def test_kept_weights_follow_the_fields() -> None:
    """``weights()`` — ``(v·s, 2v)`` kept from the construction, for the kernels — are
    torch's products of the fields as they are now: the construction's tensors while the
    fields are unchanged (also in a whole-entry part), computed again after a field is
    replaced or written in place, and for inference tensors (which keep no version)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 24, generator=g) * torch.exp(torch.randn(256, 1, generator=g) * 2)

    def check(t: bhq.BlockHouseholder) -> tuple[torch.Tensor, torch.Tensor]:
        w, v2 = t.weights()
        assert torch.equal(w, t.v * t.scale) and torch.equal(v2, 2 * t.v)
        return w, v2

    for k in (AUTO, REF):
        t = bhq.bhq_transform(x, k)
        assert check(t)[0] is t.weights()[0]  # kept, not recomputed
        t.scale.mul_(2)  # written in place: its version moves
        check(t)
        t.v = t.v * 3  # replaced
        check(t)
        e = bhq.bhq_transform(x, k, entries=8)
        part = e.entries(32, 96)
        assert check(part)[0] is part.weights()[0]
        t = bhq.bhq_transform(x, k)
        t.scale.mul_(2)  # then copied: the copy's versions say nothing of the original's (a review)
        for c in (copy.deepcopy(t), pickle.loads(pickle.dumps(t))):
            check(c)
            assert c.index_ok(x.shape[0])
        with torch.inference_mode():
            ti = bhq.bhq_transform(x.clone(), k)
            check(ti)
            ti.scale.mul_(2)
            check(ti)


def test_index_check_follows_swaps_and_parts_of_a_failed_check() -> None:
    """The C kernels index rows by a transform's groups only while its memoized check holds:
    a field's contents swapped through ``.data`` (its version does not move) is checked
    again, and a whole-entry part of a transform whose re-check failed is not trusted as
    built (both passed, and the kernels read outside the tensors: a review); the kept
    ``v·s`` follows a ``.data`` swap of ``scale`` too."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(8, 6, generator=g) * torch.exp(torch.randn(8, 1, generator=g) * 2)
    t = bhq.bhq_transform(x, AUTO)
    assert t.index_ok(8)
    crow, members = t.csr()
    members.data = torch.full_like(members, 10**9)
    assert not t.index_ok(8)
    t = bhq.bhq_transform(x, AUTO)
    t.scale.data = t.scale.clone() * 2
    w, v2 = t.weights()
    assert torch.equal(w, t.v * t.scale) and torch.equal(v2, 2 * t.v)
    t = bhq.bhq_transform(x, AUTO, entries=2)
    crow, members = t.csr()
    members[1] = 10**9
    assert not t.index_ok(8)
    assert not t.entries(0, 4).index_ok(4)  # the part holding the bad member
    other = t.entries(4, 8)  # (its own slice of the index is whole: checked, not trusted)
    assert not other._library_built and other.index_ok(4) == other._check_index()


def test_index_check_follows_a_data_swap_to_other_strides() -> None:
    """A field swapped through ``.data`` for a view of the same address and shape but other
    strides (lowbit's fields sit in larger storage) is checked again (it passed: a review)."""
    g = torch.Generator().manual_seed(10)
    x = torch.randn(64, 6, generator=g) * torch.exp(torch.randn(64, 1, generator=g) * 2)
    t = bhq.bhq_transform(x, AUTO)
    assert t.index_ok(64)
    crow, members = t.csr()
    members.data = members.as_strided((64,), (0,))
    assert not t.index_ok(64)
    t = bhq.bhq_transform(x, AUTO)
    t.scale.data = t.scale.as_strided((64,), (0,))
    w, _ = t.weights()
    assert torch.equal(w, t.v * t.scale)


WRITE_UNSEEN = """
import torch
from lowbit.formats import Granularity, Rounding, parse_format
from lowbit.kernels import Backend, kernels_for
from lowbit.quantizers import bhq
x = torch.randn(64, 16) * torch.exp(torch.randn(64, 1) * 2)
t = bhq.bhq_transform(x, kernels_for(Backend.AUTO, "cpu"))
assert t.index_ok(64)
crow, members = t.csr()
keep = members.clone()
for write in ("out of range", "a row twice"):  # no version counter sees either write
    members.numpy()[:] = keep.numpy()
    members.numpy()[5] = 10**9 if write == "out of range" else int(keep[6])  # (row keep[5] left out)
    try:
        t.forward_quantize(x, parse_format("int8"), Granularity.ROW, Rounding.NEAREST, torch.tensor(0))
    except RuntimeError as e:
        print(write, "refused:", "version counter does not see it" in str(e))
"""


@pytest.mark.skipif(not avx512_available(), reason="lowbit's AVX-512 kernels do not run here")
def test_an_index_written_where_no_version_sees_it_is_refused_not_read() -> None:
    """A member id written through ``.numpy()`` after the index was checked (no version
    moves) — out of range, or a row listed twice (another left out) — the C kernels check
    the index each call and refuse it with a ``RuntimeError`` (they read and wrote outside
    their tensors: a crash; or left the row's results uninitialised: reviews). In a
    subprocess: a crash must not take the test run with it."""
    out = subprocess.run([sys.executable, "-c", WRITE_UNSEEN], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0 and "out of range refused: True" in out.stdout \
        and "a row twice refused: True" in out.stdout, (out.returncode, out.stdout, out.stderr[-2000:])


def test_degenerate_operands_are_groups_of_one() -> None:
    """One row, all zeros, a NaN or an infinity: no op runs; groups of one, unit scale."""
    for x in (torch.randn(1, 8), torch.zeros(5, 8), torch.tensor([[1.0, float("nan")], [2.0, 3.0]]),
              torch.tensor([[1.0, float("inf")], [2.0, 3.0]])):
        for k in (AUTO, REF):
            t = bhq.bhq_transform(x, k)
            assert t.n_groups == x.shape[0] and torch.equal(t.scale, torch.ones(x.shape[0]))
            assert torch.equal(t.v, torch.zeros(x.shape[0]))


def assert_refused(lam: torch.Tensor) -> None:
    """The kernel takes neither op for ``lam`` (a functorch wrapper, say)."""
    assert not bhq_groups.supports(lam, torch.float32) and not bhq_groups.supports_entries(lam, 1, torch.float32)


@needs_kernel
def test_unsupported_calls_and_switch_run_the_reference() -> None:
    lam = _ranges(1)
    assert bhq_groups.supports(lam, torch.float32)
    assert bhq_groups.supports(lam.float(), torch.float32)  # float32 ranges: made float64 in C, exact
    assert not bhq_groups.supports(lam.half(), torch.float32)
    assert not bhq_groups.supports(lam, torch.bfloat16)
    assert not bhq_groups.supports(torch.stack([lam, lam], 1)[:, 0], torch.float32)  # strided
    assert REF.lookup("bhq_groups", Impl.NATIVE) is not None
    assert REF.run("bhq_groups", lam, torch.float32).crow is None  # the reference backend: torch
    bhq_groups.set_enabled(False)
    try:
        assert not bhq_groups.supports(lam, torch.float32)
        assert AUTO.run("bhq_groups", lam, torch.float32).crow is None
    finally:
        bhq_groups.set_enabled(True)
    assert (AUTO.run("bhq_groups", lam, torch.float32).crow is not None) == AUTO.fused
    f64 = {"dtype": torch.float64}
    for bad in (torch.zeros(0, **f64), torch.ones(1, **f64)):  # the C code would read past them
        assert not bhq_groups.supports(bad, torch.float32)
    # under a dispatch mode (a fake mode made the outputs fake: C wrote through their null
    # address, a segfault) or for a functorch wrapper (no storage): the reference (a review)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        assert not bhq_groups.supports(lam, torch.float32) and not bhq_groups.supports_entries(lam, 1, torch.float32)
    torch.func.grad(lambda x: (assert_refused(x * lam) or x).sum())(torch.ones_like(lam))
    # outside the op's conditions — a NaN or an infinite range, all zeros: None, BHQ's groups
    # of one; a negative or −Inf range beside a positive one (ranges are absolute values; the
    # groups code assumes none, and gave other groups than the reference's: a review) — the
    # C code checks the values first and returns the checked reference's result
    lib = bhq_groups._library()
    for bad, degenerate in ((torch.tensor([1.0, float("nan")], **f64), True),
                            (torch.tensor([float("inf"), 1.0], **f64), True), (torch.zeros(4, **f64), True),
                            (torch.tensor([1.0, 0.5, float("-inf")], **f64), False),
                            (torch.tensor([2.0, -1.0, 0.5], **f64), False)):
        for ranges in (bad, bad.float()):
            assert bhq_groups.supports(ranges, torch.float32)
            work = torch.empty(9 * ranges.shape[0] + 2, dtype=torch.int64)
            assert lib.lowbit_bhq_build(ranges.data_ptr(), int(ranges.dtype == torch.float64), ranges.shape[0],
                                        0.0, 0, None, None, None, None, 0, None, None, work.data_ptr()) == 0
            got, want = AUTO.run("bhq_groups", ranges, torch.float32), bhq_groups.checked_reference(ranges,
                                                                                                     torch.float32)
            assert (got is None) == (want is None) == degenerate
            if not degenerate:
                _same(got, want)
        if not degenerate:
            assert bhq_groups.supports_entries(bad, 1, torch.float32)
            want, got = bhq_groups.entry_reference(bad, 1, torch.float32), AUTO.run("bhq_entry_groups", bad, 1,
                                                                                    torch.float32)
            assert all(torch.equal(getattr(want, f), getattr(got, f)) for f in ("scale", "v", "group"))


@needs_kernel
@pytest.mark.parametrize("seed", range(6))
def test_float32_ranges_are_their_float64_values(seed: int) -> None:
    """Float32 ranges (what ``row_absmax`` gives a float32 or bfloat16 gradient) are read
    as their exact float64 values: the groups of the float64 copy, bit for bit, for the
    whole operand and per entry."""
    lam = _ranges(seed).float()
    for dtype in (torch.float32, torch.float64):
        _same(bhq_groups.run(lam, dtype), bhq_groups.reference(lam.double(), dtype))
        entries = 1 + seed % 3
        lam_e = lam[: lam.shape[0] // entries * entries]
        _same(bhq_groups.run_entries(lam_e, entries, dtype), bhq_groups.entry_reference(lam_e.double(), entries, dtype))


@needs_kernel
def test_square_root_tables_cover_the_largest_group() -> None:
    """One huge row and N − 1 tiny ones make one group of N rows: the tables grow to it
    (index g − 1) and the native construction is the reference's, bit for bit."""
    lam = torch.full((5000,), 1e-30, dtype=torch.float64)
    lam[17] = 1e30
    kept = list(bhq_groups._TABLES)
    bhq_groups._TABLES[:] = []  # whatever this process grew: two sizes here
    try:
        bhq_groups._tables(2)
        for dtype in (torch.float32, torch.float64):
            got, want = bhq_groups.run(lam, dtype), bhq_groups.reference(lam, dtype)
            assert got.n_groups == want.n_groups == 1
            assert bhq_groups._TABLES[0].shape[0] >= 5000  # grown: the call's second half ran on them
            _same(got, want)
            assert torch.equal(got.crow, torch.tensor([0, 5000])) and torch.equal(got.members, torch.arange(5000))
            bhq_groups._TABLES[:] = []
            bhq_groups._tables(2)
    finally:
        bhq_groups._TABLES[:] = kept


def _pause_in_tables(paused, resume, timeout: float):  # noqa: ANN001, ANN202
    """A ``sys.settrace`` function that, the first time a line of ``bhq_groups._tables``
    (or its return) runs with the kept tables at 8192 entries or more, sets ``paused`` and
    waits for ``resume`` (at most ``timeout`` seconds)."""
    code = bhq_groups._tables.__code__

    def local(frame, event, arg):  # noqa: ANN001, ANN202
        if event in ("line", "return") and bhq_groups._TABLES and bhq_groups._TABLES[0].shape[0] >= 8192 \
                and not paused.is_set():
            paused.set()
            resume.wait(timeout)
        return local

    return lambda frame, event, arg: local if frame.f_code is code else None


@needs_kernel
def test_tables_grown_by_another_thread_mid_call_are_never_read_freed() -> None:
    """A thread growing the square-root tables, paused just after it replaced them, while
    this one builds groups that need the grown tables: the groups are the reference's.
    (The tables' addresses were cached apart from the tables and published in a second
    statement: in that window a call paired the new tables with the old, freed addresses
    and its C code read freed memory — a review.)"""
    import threading

    lam = torch.full((5000,), 1e-30, dtype=torch.float64)
    lam[17] = 1e30  # one group of 5000 rows: the tables must reach 5000
    kept = list(bhq_groups._TABLES)
    bhq_groups._TABLES[:] = []
    bhq_groups._tables(2)
    replaced, resume = threading.Event(), threading.Event()
    pause_after_replacing = _pause_in_tables(replaced, resume, 2)  # (under the tables' lock: this call waits it out)

    def grow() -> None:
        before = sys.gettrace()
        sys.settrace(pause_after_replacing)
        try:
            bhq_groups._tables(8192)
        finally:
            sys.settrace(before)

    t = threading.Thread(target=grow)
    try:
        t.start()
        assert replaced.wait(10)
        for dtype in (torch.float32, torch.float64):
            _same(bhq_groups.run(lam, dtype), bhq_groups.reference(lam, dtype))
    finally:
        resume.set()
        t.join(10)
        bhq_groups._TABLES[:] = kept


@needs_kernel
def test_tables_never_shrink_under_a_call_that_grew_them(monkeypatch) -> None:  # noqa: ANN001
    """Another thread that had checked the tables for a smaller size (1024) and builds its
    own while this one grows them to 8192 for a group of 5000: this call still reads
    tables of at least 5000 entries, and the groups are the reference's. (Unlocked, the
    other thread's smaller tables replaced the grown ones between this call's growth and
    its read, and the C code read past their end — a second review; now grown tables are
    published, under a lock, only where larger.) Every wait is bounded (2 s)."""
    import threading

    lam = torch.full((5000,), 1e-30, dtype=torch.float64)
    lam[17] = 1e30
    want = bhq_groups.reference(lam, torch.float64)
    kept = list(bhq_groups._TABLES)
    bhq_groups._TABLES[:] = []
    bhq_groups._tables(2)
    c_in, a_grown, c_done = threading.Event(), threading.Event(), threading.Event()
    by_size = bhq_groups._by_size

    def slow_by_size(g):  # noqa: ANN001, ANN202
        if threading.current_thread().name == "smaller":  # past its size check: wait for the growth
            c_in.set()
            a_grown.wait(2)
        return by_size(g)

    monkeypatch.setattr(bhq_groups, "_by_size", slow_by_size)
    pause_after_growth = _pause_in_tables(a_grown, c_done, 2)

    def smaller() -> None:
        try:
            bhq_groups._tables(1024)
        finally:
            c_done.set()

    t = threading.Thread(target=smaller, name="smaller")
    try:
        t.start()
        assert c_in.wait(10)
        before = sys.gettrace()  # (coverage's or a debugger's tracer: put back after)
        sys.settrace(pause_after_growth)
        try:
            got = bhq_groups.run(lam, torch.float64)
        finally:
            sys.settrace(before)
        _same(got, want)
        assert bhq_groups._TABLES[0].shape[0] >= 5000
    finally:
        a_grown.set()
        t.join(10)
        bhq_groups._TABLES[:] = kept


@needs_kernel
def test_tables_grow_outside_the_callers_torch_modes() -> None:
    """Under a user's torch function mode that builds BHQ groups itself when it sees a
    ``sqrt``: growing the tables neither shows the mode their ops nor waits on itself
    (under the tables' lock, the mode re-entered it: a deadlock — a third review), and
    the groups are the reference's. Run in a thread with a bounded join."""
    import threading

    from torch.overrides import TorchFunctionMode

    lam = torch.full((5000,), 1e-30, dtype=torch.float64)
    lam[17] = 1e30
    small = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    seen: list[str] = []

    class Nested(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if getattr(func, "__name__", "") == "sqrt":
                seen.append("sqrt")
                bhq_groups.run(small, torch.float64)
            return func(*args, **(kwargs or {}))

    kept = list(bhq_groups._TABLES)
    bhq_groups._TABLES[:] = []
    bhq_groups._tables(2)
    out: dict = {}

    def work() -> None:
        with Nested():
            out["got"] = bhq_groups.run(lam, torch.float64)

    t = threading.Thread(target=work, daemon=True)
    try:
        t.start()
        t.join(30)
        assert not t.is_alive(), "the tables' growth waited on itself"
        assert seen == [] and bhq_groups._TABLES[0].shape[0] >= 5000
        _same(out["got"], bhq_groups.reference(lam, torch.float64))
    finally:
        if not t.is_alive():
            bhq_groups._TABLES[:] = kept


@needs_kernel
def test_a_compiler_without_openmp_builds_it_for_one_thread(tmp_path) -> None:  # noqa: ANN001
    """A C compiler that refuses ``-fopenmp`` (Apple's clang) still builds the kernel,
    without OpenMP, with one warning saying so: the entries then go on one thread, the
    same groups (the threaded build made such a compiler fall back to the slow torch
    reference). In a process that has not imported torch's libgomp first, the library
    loads: its C calls no OpenMP function without it."""
    cc = tmp_path / "cc-no-openmp"
    cc.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "unsupported option -fopenmp" >&2; '
                  'exit 1; }; done\nexec ' + " ".join(cbuild.compiler(lambda *a: None)) + ' "$@"\n')
    cc.chmod(0o755)
    code = ("import warnings, torch\n"
            "from lowbit.kernels import bhq_groups as b\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ok = b.available()\n"
            "print(ok, [str(x.message).split(' (the C compiler')[0] for x in w])\n"
            "lam = torch.rand(6 * 40, dtype=torch.float64) ** 4\n"
            "got, want = b.run_entries(lam, 6, torch.float32), b.entry_reference(lam, 6, torch.float32)\n"
            "print(torch.equal(got.scale, want.scale) and torch.equal(got.group, want.group))\n"
            "import glob, ctypes, subprocess, sys\n"
            "(so,) = glob.glob(sys.argv[1] + '/bhq_groups-*[!w].so')\n"
            "print(subprocess.run([sys.executable, '-c', f'import ctypes; ctypes.CDLL({so!r}); print(1)'],\n"
            "                     capture_output=True, text=True).stdout.strip())")
    cache = tmp_path / "cache"
    env = {**os.environ, "CC": str(cc), "LOWBIT_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", code, str(cache)], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.splitlines() == [
        "True ['lowbit: the BHQ group construction was built without OpenMP']", "True", "1"], out.stderr


def test_switched_off_by_the_environment() -> None:
    code = "from lowbit.kernels import bhq_groups; print(bhq_groups.available())"
    env = {**os.environ, "LOWBIT_BHQ_GROUPS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- groups per entry (attention's heads) -------------------------------------------------------
def _entry_ranges(seed: int) -> tuple[torch.Tensor, int]:
    """Entries of the kinds :func:`_ranges` makes, side by side, with an all-zero entry, a
    NaN one and an infinite one among them where the seed says."""
    g = torch.Generator().manual_seed(100 + seed)
    entries, r = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 300, (1,), generator=g))
    lam = torch.cat([_ranges(seed * 10 + e)[:r] for e in range(entries)])
    lam = torch.cat([lam, lam.new_ones(entries * r - lam.shape[0])])  # entries of r rows each
    bad = int(torch.randint(0, entries, (1,), generator=g))
    if seed % 3 == 1:
        lam[bad * r:(bad + 1) * r] = 0.0
    if seed % 4 == 2:
        lam[bad * r] = float("nan") if seed % 8 == 2 else float("inf")
    return lam, entries


@needs_kernel
@pytest.mark.parametrize("seed", range(24))
def test_entry_kernel_is_the_entry_reference_bit_for_bit(seed: int) -> None:
    lam, entries = _entry_ranges(seed)
    for dtype in (torch.float32, torch.float64):
        want = bhq_groups.entry_reference(lam, entries, dtype)
        got = bhq_groups.run_entries(lam, entries, dtype)
        _same(got, want)
        assert got.entry_groups == want.entry_groups and sum(want.entry_groups) == want.n_groups
        crow, members = bhq_groups.csr_index(want.group, want.n_groups)
        assert torch.equal(got.crow, crow) and torch.equal(got.members, members)
        # the entries on several threads (each its own scratch), more threads than entries too
        threads = 1 + seed % 4
        again = bhq_groups._entry_groups(bhq_groups._library(), lam, entries, dtype, threads)
        _same(again, want)
        assert again.entry_groups == want.entry_groups
        assert torch.equal(again.crow, crow) and torch.equal(again.members, members)


@pytest.mark.parametrize("seed", range(8))
def test_entry_groups_are_each_entrys_own(seed: int) -> None:
    """Each entry's groups are those :func:`reference` builds from its ranges alone (the
    same groups; scales and vectors to float64 rounding: the power is taken over all
    entries at once, and ATen's vectorised ``pow`` may differ from its scalar one in the
    last bit) — groups of one, unit scale, where the entry is one row, all zero or not
    finite — and no group spans two entries."""
    lam, entries = _entry_ranges(seed)
    r = lam.shape[0] // entries
    got = bhq_groups.entry_reference(lam, entries, torch.float64)
    start = 0
    for e, x in enumerate(lam.view(entries, r).unbind(0)):
        rows = slice(e * r, (e + 1) * r)
        top = float(x.max()) if r else 0.0
        if r >= 2 and top == top and 0 < top < float("inf"):
            want = bhq_groups.reference(x, torch.float64)
            torch.testing.assert_close(got.scale[rows], want.scale, rtol=4e-16, atol=0)
            torch.testing.assert_close(got.v[rows], want.v, rtol=4e-16, atol=0)
        else:
            want = bhq_groups.Groups(torch.ones(r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64),
                                     torch.arange(r), r, None, None)
            assert torch.equal(got.scale[rows], want.scale) and torch.equal(got.v[rows], want.v)
        assert torch.equal(got.group[rows] - start, want.group) and got.entry_groups[e] == want.n_groups
        start += want.n_groups


def test_entry_transform_splits_by_entries_and_refuses_what_does_not_divide() -> None:
    """``bhq_transform(x, entries=E)``: within entries of its rows (and of their
    multiples), and :meth:`entries` gives a range's own transform — the same scales,
    vectors, groups (renumbered) and CSR index, so its inverse is those rows' inverse of the
    whole, bit for bit. ``entries`` must divide the rows; a whole-operand transform is not
    within entries, nor does it split."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6 * 20, 16, generator=g) * torch.exp(torch.randn(120, 1, generator=g) * 3)
    for k in (AUTO, REF):
        t = bhq.bhq_transform(x, k, entries=6)
        assert t.entry_rows == 20 and t.within_entries(20) and t.within_entries(60) and not t.within_entries(10)
        part = t.entries(40, 100)
        assert part.n_rows == 60 and part.n_groups == sum(t.entry_groups[2:5]) == int(part.group.max()) + 1
        crow, members = bhq_groups.csr_index(part.group, part.n_groups)
        assert all(torch.equal(a, b) for a, b in zip(part.csr(), (crow, members)))
        y = torch.randn(120, 7, generator=g)
        assert torch.equal(part.inverse(y[40:100].clone()), t.inverse(y)[40:100])
        with pytest.raises(ValueError, match="whole entries"):
            t.entries(10, 40)
    with pytest.raises(ValueError, match="entries=7 must be a positive int dividing the operand's 120 rows"):
        bhq.bhq_transform(x, AUTO, entries=7)
    whole = bhq.bhq_transform(x, AUTO)
    assert not whole.within_entries(20)
    with pytest.raises(ValueError, match="span the whole operand"):
        whole.entries(0, 20)
