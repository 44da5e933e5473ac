"""lowbit.kernels.exact_f32: int8 GEMMs summed on float32 units are the exact int32 sums
(compared with int64 products, so == holds or the route is wrong), whatever the piece
length, layout or code range; which CPUs take the route; a converted model's step is
bitwise the same on either engine, and coverage counts the route as int8 GEMMs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.coverage import coverage
from lowbit.kernels import Encoded, exact_f32, int8, kernels_for


def exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The int32 sums of int8 ``a @ b`` by a float64 GEMM: every partial sum in any order
    is an integer of magnitude at most 128²·K < 2⁵³, so float64 holds each exactly (an
    int64 GEMM gives the same values, and took 25 s at 512×2100×2048: no BLAS kernel)."""
    assert a.shape[-1] * 128 * 128 < 2**53
    return (a.double() @ b.double()).int()


@pytest.mark.parametrize("k", [1, 1023, 1024, 1040, 1041, 2081, 2500])
@pytest.mark.parametrize("low", [-127, -128])
def test_sums_equal_int64_products_across_pieces(k: int, low: int) -> None:
    # worst case for float32: every code at the grid's end, all products of one sign
    g = torch.Generator().manual_seed(k)
    a = torch.randint(low, 128, (9, k), dtype=torch.int8, generator=g)
    b = torch.randint(low, 128, (k, 7), dtype=torch.int8, generator=g)
    a[0], b[:, 0] = low, low  # |Σ| = k·low²: past 2²⁴ from k = 1041 (127) / 1025 (-128)
    a[1], b[:, 1] = 127, low
    want = exact(a, b)
    assert torch.equal(exact_f32.int_mm(a, b), want)
    assert torch.equal(exact_f32.int_mm(a.t().contiguous().t(), b.t().contiguous().t()), want)
    batch = exact_f32.int_bmm(torch.stack([a, a.flip(0)]), torch.stack([b, b.flip(1)]))
    assert torch.equal(batch, torch.stack([want, exact(a.flip(0), b.flip(1))]))


@pytest.mark.parametrize("shapes,groups", [(((8, 16, 2048), (8, 2048, 64)), 8), (((6, 64, 64), (6, 64, 64)), 1),
                                           (((9, 1, 512), (9, 512, 1)), 1),
                                           (((100, 64, 256), (100, 256, 64)), 9)],
                         ids=["copies-larger", "floor", "short-rows", "result-larger"])
def test_batched_float_copies_stay_within_the_result(monkeypatch: pytest.MonkeyPatch, shapes: tuple,
                                                     groups: int) -> None:
    """A batched product's float32 copies of its codes (all of a group of entries, both
    operands at once) are at most its int32 result's size, one entry's, or
    ``COPY_FLOOR`` floats (``entries_per_call``): attention's ``P̃·V`` copied the whole
    (B, L, S) codes, a score-sized buffer; a one-row product ran an entry per call. The
    sums are the exact ones in any grouping; the profiler sees no larger allocation."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(3)
    a = torch.randint(-128, 128, shapes[0], dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, shapes[1], dtype=torch.int8, generator=g)
    real, seen = exact_f32._sum, []
    monkeypatch.setattr(exact_f32, "_sum", lambda mm, x, y, out: seen.append(x.shape[0]) or real(mm, x, y, out))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        got = exact_f32.int_bmm(a, b)
    (n, m, k), w = a.shape, b.shape[2]
    bound = max(n * m * w, (m + w) * k, exact_f32.COPY_FLOOR)
    assert sum(seen) == n and len(seen) == groups and max(seen) * (m + w) * k <= bound, seen
    assert max(e.self_cpu_memory_usage for e in prof.events()) <= bound * 4
    assert torch.equal(got, torch.stack([exact(x, y) for x, y in zip(a, b)]))


@pytest.mark.parametrize("m,k,n,calls", [(16, 18480, 48, [17]), (300, 5000, 200, [3, 1]), (64, 2080, 40, [2]),
                                         (512, 2100, 2048, [])],
                         ids=["one-call", "groups", "no-remainder", "wide"])
def test_long_sums_batch_their_pieces_within_the_bound(monkeypatch: pytest.MonkeyPatch, m: int, k: int, n: int,
                                                        calls: list[int]) -> None:
    """A long sum's whole pieces go several to a ``torch.bmm`` (the ∇W of a CNN's first
    layers: 18 one-piece GEMMs were 3× slower), at most as many as keep the call's float32
    copies and partial results within ``PIECES_FLOOR`` floats (``pieces_per_call``); a
    wide product keeps one ``torch.mm`` a piece; the shorter last piece is its own
    ``torch.mm``. The sums are the exact ones, in either operand layout."""
    g = torch.Generator().manual_seed(k)
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
    a[0], b[:, 0] = 127, 127  # a partial sum past 2²⁴ from 1,041 terms: pieces must not overflow
    want = exact(a, b)
    real, seen = torch.bmm, []

    def bmm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append((x.shape[0], x.numel() + y.numel() + x.shape[0] * x.shape[1] * y.shape[2]))
        return real(x, y)
    monkeypatch.setattr(torch, "bmm", bmm)
    for x, y in ((a, b), (a.t().contiguous().t(), b.t().contiguous().t())):
        seen.clear()
        assert torch.equal(exact_f32.int_mm(x, y), want)
        assert [q for q, _ in seen] == calls
        assert all(size <= exact_f32.PIECES_FLOOR for _, size in seen), seen


def _peak_bytes(f) -> int:  # noqa: ANN001
    """The most bytes ``f()`` holds allocated at once on the CPU (torch's profiler: the
    running total of its memory events, less what was allocated before ``f`` ran)."""
    import json
    import tempfile
    from pathlib import Path

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        f()
    with tempfile.TemporaryDirectory() as d:
        prof.export_chrome_trace(str(Path(d) / "trace.json"))
        events = json.loads((Path(d) / "trace.json").read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    if not memory:
        return 0
    before = memory[0]["args"]["Total Allocated"] - memory[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in memory) - before


@pytest.mark.parametrize("m,k,n", [(412, 5000, 437), (16, 18480, 48)], ids=["two-a-call", "one-call"])
def test_long_sums_hold_no_more_than_the_bound_at_once(m: int, k: int, n: int) -> None:
    """While a long sum's pieces run batched, the memory held at once is at most one
    call's copies and partial results (``PIECES_FLOOR`` floats) beside the int32 result
    and one int32 piece added into it (a review: the partial results were summed through
    a float64 copy of all of them, and one group's outlived the next group's copies —
    1.5× the bound at 412×5000×437)."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
    a[0], b[:, 0] = -128, -128  # pieces of 1,023 terms
    step = exact_f32.piece_length(a, b)
    assert exact_f32.pieces_per_call(m, n, step, k // step) > 1  # the batched path runs
    got = {}
    peak = _peak_bytes(lambda: got.setdefault("out", exact_f32.int_mm(a, b)))
    assert torch.equal(got["out"], exact(a, b))
    assert peak <= 4 * (exact_f32.PIECES_FLOOR + 2 * m * n), (peak, exact_f32.PIECES_FLOOR)


def test_piece_length_follows_the_codes_range() -> None:
    full = torch.full((2, 3), 127, dtype=torch.int8)
    assert exact_f32.piece_length(full, full.t()) == 1040  # ⌊(2²⁴−1)/127²⌋
    low = full.clone()
    low[0, 0] = -128
    assert exact_f32.piece_length(low, full.t()) == (2**24 - 1) // (128 * 127)
    four = torch.full((2, 3), -8, dtype=torch.int8)
    assert exact_f32.piece_length(four, four.t()) == (2**24 - 1) // 64
    assert exact_f32.piece_length(torch.zeros(2, 3, dtype=torch.int8), full.t()) == 3
    assert exact_f32.SAFE_K == 1023


@pytest.mark.parametrize("shape", [(0, 4, 3), (3, 0, 4), (3, 4, 0)])
def test_empty_products(shape: tuple[int, int, int]) -> None:
    m, k, n = shape
    a, b = torch.ones(m, k, dtype=torch.int8), torch.ones(k, n, dtype=torch.int8)
    assert torch.equal(exact_f32.int_mm(a, b), torch.zeros(m, n, dtype=torch.int32))
    assert torch.equal(exact_f32.int_bmm(a[None], b[None]), torch.zeros(1, m, n, dtype=torch.int32))


def test_bad_operands_raise() -> None:
    a = torch.ones(2, 3, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8 operands"):
        exact_f32.int_mm(a.float(), a.t())
    with pytest.raises(ValueError, match="do not match"):
        exact_f32.int_mm(a, a)
    with pytest.raises(ValueError, match="do not match"):
        exact_f32.int_bmm(a[None].expand(2, 2, 3), a.t()[None])


def test_engine_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact_f32, "ENGINE", "float32")
    assert exact_f32.runs("cpu") and int8.engine("cpu") == "float32"
    assert not exact_f32.runs("meta")  # the CPU only
    monkeypatch.setattr(exact_f32, "ENGINE", "int")
    assert not exact_f32.runs("cpu") and int8.engine("cpu") != "float32"
    monkeypatch.setattr(exact_f32, "ENGINE", "fast")
    with pytest.raises(ValueError, match="LOWBIT_INT8_ENGINE"):
        exact_f32.runs("cpu")


@pytest.mark.parametrize(("flags", "lacks"), [
    ({"avx2", "fma"}, True),  # Zen 3, Haswell–Skylake client: no int8 dot product
    ({"avx2", "avx512f", "avx512_vnni"}, False),
    ({"avx2", "avx_vnni"}, False),
    ({"avx512f", "amx_int8", "amx_tile"}, False),
    (set(), False),  # flags unknown (not x86-64 Linux): torch._int_mm as before
])
def test_auto_takes_the_route_only_without_an_int8_dot_product(monkeypatch: pytest.MonkeyPatch,
                                                               flags: set[str], lacks: bool) -> None:
    assert exact_f32.LACKS_INT8_DOT is exact_f32.cpu_lacks_int8_dot()  # this CPU's answer, read at import
    assert exact_f32.cpu_lacks_int8_dot(frozenset(flags)) is lacks
    monkeypatch.setattr(exact_f32, "LACKS_INT8_DOT", lacks)
    monkeypatch.setattr(exact_f32, "ENGINE", "auto")
    assert exact_f32.runs("cpu") is lacks


def test_routing_traces_under_torch_compile() -> None:
    """The engine's choice reads no file when a compiled graph traces it (the CPU's flags
    are read at import: a first read under ``fullgraph=True`` failed, Dynamo cannot trace
    ``open``)."""
    a, b = torch.ones(20, 12, dtype=torch.int8), torch.ones(12, 8, dtype=torch.int8)
    fn = torch.compile(lambda x, y: int8.int_mm(x, y) + 1, fullgraph=True, backend="eager")
    assert bool((fn(a, b) == 13).all())


class Tiny(nn.Module):
    """A Linear, attention with 4 heads of 32 features on 128 tokens (each head's GEMM
    past ``attention.LOOP_MIN_MACS``: the heads run integer GEMMs), a Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(12, 128)
        self.attn = lowbit.ScaledDotProductAttention()
        self.out = nn.Linear(128, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)  # (B, T, 128)
        b, t, _ = h.shape
        q = h.view(b, t, 4, 32).transpose(1, 2)
        o = self.attn(q, q, q, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, t, 128))


@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fqt-bhq-8"])
def test_a_step_is_bitwise_the_same_on_either_engine(monkeypatch: pytest.MonkeyPatch, recipe: str) -> None:
    x = torch.randn(2, 128, 12, generator=torch.Generator().manual_seed(1))
    grads = {}
    for engine in ("int", "float32"):
        monkeypatch.setattr(exact_f32, "ENGINE", engine)
        model = lowbit.convert(Tiny(), lowbit.FQTConfig.from_recipe(recipe, seed=0))
        loss = model(x).square().mean()
        loss.backward()
        grads[engine] = (loss.detach(), [p.grad for p in model.parameters()])
    (l0, g0), (l1, g1) = grads["int"], grads["float32"]
    assert torch.equal(l0, l1)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1, strict=True))


def test_coverage_counts_the_route_as_int8_gemms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact_f32, "ENGINE", "float32")
    model = lowbit.convert(Tiny(), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    rep = coverage(model, torch.randn(2, 128, 12))
    assert rep.real_share == 1.0 and {r.kind for r in rep.rows} == {"int8"}
    ops = {(r.module, r.phase): r.op for r in rep.rows}
    assert {op for (m, _), op in ops.items() if m != "attn"} == {"lowbit.int8_mm_f32"}
    assert {op for (m, _), op in ops.items() if m == "attn"} == {"lowbit.int8_bmm_f32"}


def test_sums_past_max_k_are_refused() -> None:
    a = torch.ones(1, exact_f32.MAX_K + 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="MAX_K"):
        exact_f32.int_mm(a, a.t())
    with pytest.raises(ValueError, match="MAX_K"):
        exact_f32.int_bmm(a[None], a.t()[None])


@pytest.mark.parametrize("engine", ["float32", "int"])
def test_out_must_be_int32_of_the_result_shape(monkeypatch: pytest.MonkeyPatch, engine: str) -> None:
    """On every engine: a cast, a broadcast or a shorter batch is refused, not written."""
    monkeypatch.setattr(exact_f32, "ENGINE", engine)
    a, b = torch.ones(5, 4, dtype=torch.int8), torch.ones(4, 6, dtype=torch.int8)
    out = torch.empty(5, 6, dtype=torch.int32)
    assert int8.int_mm(a, b, out=out) is out and bool((out == 4).all())
    for bad in (torch.empty(5, 6), torch.empty(3, 5, 6, dtype=torch.int32)):  # a cast, a broadcast
        with pytest.raises(ValueError, match="out must be an int32 tensor of shape"):
            int8.int_mm(a, b, out=bad)
    a2, b2 = torch.stack([a, a]), torch.stack([b, b])
    for bad in (torch.empty(2, 5, 6, dtype=torch.int64), torch.zeros(1, 5, 6, dtype=torch.int32)):
        with pytest.raises(ValueError, match="out must be an int32 tensor of shape"):
            int8.int_mm_batched(a2, b2, out=bad)


def test_forced_float32_engine_runs_before_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ENGINE = "float32"`` means every CPU int8 GEMM, the AMX/VNNI ones included, and
    ``int8.engine()`` says so."""
    from lowbit.kernels import amx

    def refuse(*args: object) -> None:
        raise AssertionError("the AMX/VNNI kernel ran")

    monkeypatch.setattr(exact_f32, "ENGINE", "float32")
    monkeypatch.setattr(amx, "available", lambda: True)
    monkeypatch.setattr(amx, "worth_it", lambda *args: True)
    monkeypatch.setattr(amx, "int_mm", refuse)
    monkeypatch.setattr(amx, "int_bmm", refuse)
    monkeypatch.setattr(amx, "pack_right", refuse)
    a, b = torch.ones(64, 32, dtype=torch.int8), torch.ones(32, 48, dtype=torch.int8)
    assert int8.engine("cpu") == "float32" and not int8.runs_amx(a, 48)
    assert bool((int8.int_mm(a, b) == 32).all()) and bool((int8.int_mm_batched(a[None], b[None]) == 32).all())
    monkeypatch.setattr(int8, "panel_size", lambda: 48 * 16)  # a bf16 output by panels: no AMX packing
    out = int8.gemm(kernels_for("auto", "cpu"), Encoded(a, torch.ones(64, 1)), Encoded(b, torch.ones(1, 48)),
                    None, torch.bfloat16)
    assert bool((out == 32).all())


def test_float32_engine_refused_where_float32_gemms_may_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under ``set_float32_matmul_precision("medium"/"high")`` oneDNN may run float32 GEMMs
    in bf16/tf32 on a CPU with such units: forcing the route raises, ``auto`` keeps
    ``torch._int_mm``."""
    monkeypatch.setattr(exact_f32, "REDUCED_FLOAT_UNITS", True)
    monkeypatch.setattr(exact_f32, "LACKS_INT8_DOT", True)
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("medium", "high"):  # mkldnn's fp32 precision bf16, tf32
            torch.set_float32_matmul_precision(precision)
            assert not exact_f32.float32_gemms_exact()
            monkeypatch.setattr(exact_f32, "ENGINE", "float32")
            with pytest.raises(ValueError, match="would not be exact"):
                exact_f32.runs("cpu")
            monkeypatch.setattr(exact_f32, "ENGINE", "auto")
            assert not exact_f32.runs("cpu")
        torch.set_float32_matmul_precision("highest")
        assert exact_f32.float32_gemms_exact() and exact_f32.runs("cpu")
    finally:
        torch.set_float32_matmul_precision(before)


def test_coverage_text_explains_the_route(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exact_f32, "ENGINE", "float32")
    model = lowbit.convert(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
                           lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    text = str(coverage(model, torch.randn(5, 8)))
    assert "int8 codes summed exactly on float32 units" in text
    monkeypatch.setattr(exact_f32, "ENGINE", "int")
    assert "float32 units" not in str(coverage(model, torch.randn(5, 8)))


# -- convolutions of codes on float32 units (lowbit::int8_conv_f32, lowbit.kernels.qconv) ------
CONV_GEOMETRIES = {  # (N, C, H, W, C_out, k, stride, padding, dilation, groups)
    "3x3": (2, 16, 9, 7, 8, 3, 1, 1, 1, 1), "stride2": (3, 8, 10, 10, 6, 3, 2, 1, 1, 1),
    "groups": (2, 12, 6, 6, 9, 3, 1, 0, 1, 3), "1x1": (4, 32, 5, 5, 16, 1, 1, 0, 1, 1),
    "dilated": (1, 4, 12, 12, 4, 3, 1, 2, 2, 1), "longest": (2, exact_f32.SAFE_K, 1, 1, 3, 1, 1, 0, 1, 1)}


@pytest.mark.parametrize("name", list(CONV_GEOMETRIES))
def test_convolutions_of_codes_are_the_exact_sums_on_float32_units(name: str) -> None:
    """``int_conv`` of int8 codes — random, all at the grid's ends (every product one
    sign, the sums up to SAFE_K·128² < 2²⁴), given as int8 in either memory format or as
    uint8 ``code + 128`` — equals the float64 convolution of the codes exactly, as float32
    in channels-last memory (what oneDNN's int8 convolution returns)."""
    import torch.nn.functional as F

    n, c, h, w, co, k, s, p, d, g = CONV_GEOMETRIES[name]
    gen = torch.Generator().manual_seed(c)
    cases = [(torch.randint(-128, 128, (n, c, h, w), dtype=torch.int8, generator=gen),
              torch.randint(-128, 128, (co, c // g, k, k), dtype=torch.int8, generator=gen))]
    for xv, wv in ((127, 127), (-128, -128), (-128, 127)):
        cases.append((torch.full((n, c, h, w), xv, dtype=torch.int8), torch.full((co, c // g, k, k), wv, dtype=torch.int8)))
    for x, wt in cases:
        want = F.conv2d(x.double(), wt.double(), None, s, p, d, g)
        for xi in (x, x.contiguous(memory_format=torch.channels_last), x.view(torch.uint8) ^ 128):
            got = exact_f32.int_conv(xi, wt, [s, s], [p, p], [d, d], g)
            assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(got.double(), want), (name, xi.dtype)


def test_convolutions_past_the_exact_length_or_of_other_dtypes_are_refused() -> None:
    x = torch.zeros(1, exact_f32.SAFE_K + 1, 1, 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="at most 1023"):
        exact_f32.int_conv(x, x[:1], [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(TypeError, match="int8"):
        exact_f32.int_conv(x.float(), x[:1], [1, 1], [0, 0], [1, 1], 1)
    with pytest.raises(ValueError, match="do not match"):
        exact_f32.int_conv(x, x[:1, :5], [1, 1], [0, 0], [1, 1], 1)
    # what torch's convolution refuses, refused by name by the real and the fake kernel alike (a review)
    from torch._subclasses.fake_tensor import FakeTensorMode

    a, w = torch.zeros(1, 4, 4, 4, dtype=torch.int8), torch.zeros(4, 4, 3, 3, dtype=torch.int8)
    bad = [((a, torch.zeros(5, 2, 3, 3, dtype=torch.int8), [1, 1], [0, 0], [1, 1], 2), "do not match"),
           ((a, torch.zeros(4, 4, 5, 5, dtype=torch.int8), [1, 1], [0, 0], [1, 1], 1), "does not fit"),
           ((a, w, [1, 1], [-1, 0], [1, 1], 1), "paddings ≥ 0"), ((a, w, [0, 1], [0, 0], [1, 1], 1), "strides"),
           ((a, w, [1], [0, 0], [1, 1], 1), "two strides")]
    for args, message in bad:
        with pytest.raises(ValueError, match=f"lowbit::int8_conv_f32: .*{message}"):
            exact_f32.int_conv(*args)
        with FakeTensorMode() as mode, pytest.raises(ValueError, match=f"lowbit::int8_conv_f32: .*{message}"):
            exact_f32.int_conv(*(mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args))


def test_a_cnn_runs_its_convolutions_on_the_op_and_coverage_counts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the float32 engine a converted CNN's output GEMMs and stride-1 ∇X run as
    ``lowbit::int8_conv_f32`` (no oneDNN int8 op, no float convolution of dequantized
    values), which coverage counts as int8 GEMMs with the convolution's FLOPs."""
    from lowbit.flops import conv_flops
    from lowbit.kernels import qconv

    monkeypatch.setattr(exact_f32, "ENGINE", "float32")
    torch.manual_seed(0)
    model = lowbit.convert(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)),
                           lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    x = torch.randn(4, 3, 10, 10)
    assert qconv.float32_engine()
    rep = coverage(model, x)
    assert rep.real_share == 1.0 and {r.kind for r in rep.rows} == {"int8"}
    conv_rows = [r for r in rep.rows if r.op == "lowbit.int8_conv_f32"]
    assert {(r.module, r.phase) for r in conv_rows} >= {("0", "forward"), ("2", "forward"), ("2", "grad_input")}
    assert next(r for r in conv_rows if (r.module, r.phase) == ("2", "forward")).flops == \
        conv_flops((4, 8, 10, 10), (8, 8, 3, 3), (4, 8, 10, 10), False)
    with torch.profiler.profile() as prof:
        model(x).sum().backward()
    names = [e.name for e in prof.events()]
    # two outputs whole, one ∇X (the first layer's input needs none) in pieces of samples (conv.acc_pieces)
    pieces = lowbit.conv.acc_pieces(4, torch.float32, False)
    assert pieces > 1 and names.count("lowbit::int8_conv_f32") == 2 + pieces
    assert not any(n in ("aten::convolution", "onednn::qconv2d_pointwise") for n in names)


def test_the_float32_engine_leaves_convolutions_that_could_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where oneDNN may run float32 convolutions in bf16 (a CPU with such units, told
    ``torch.backends.mkldnn.conv.fp32_precision = "bf16"``) the engine is off and
    ``qconv.available`` falls back to what the machine's int8 kernels allow; the
    ``FLOAT32_CONV`` switch does the same."""
    from lowbit.kernels import qconv

    monkeypatch.setattr(exact_f32, "ENGINE", "float32")
    codes = torch.zeros(1, 8, 6, 6, dtype=torch.int8)
    geometry = ((8, 8, 3, 3), 1, (6, 6), (1, 1), (1, 1), (1, 1))
    assert exact_f32.float32_convs_exact() and qconv.float32_engine() and qconv.available(codes, *geometry)
    conv = getattr(torch.backends.mkldnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        monkeypatch.setattr(exact_f32, "REDUCED_FLOAT_UNITS", True)
        before = conv.fp32_precision
        try:
            conv.fp32_precision = "bf16"
            assert not exact_f32.float32_convs_exact() and not qconv.float32_engine()
            assert qconv.available(codes, *geometry) == (qconv._exact_here())  # the int8 kernel's own answer
        finally:
            conv.fp32_precision = before
    monkeypatch.setattr(qconv, "FLOAT32_CONV", False)
    assert not qconv.float32_engine()


def test_the_float32_engine_gives_the_int8_engines_bits() -> None:
    """On a CPU whose oneDNN int8 convolution is exact (VNNI), the float32 engine's
    ``conv_acc`` is bitwise the int8 engine's, so a step does not depend on which ran."""
    from lowbit.kernels import qconv

    if not qconv._exact_here():
        pytest.skip("oneDNN's int8 convolution is not exact here (no VNNI): nothing to compare with")
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(-127, 128, (4, 32, 9, 9), dtype=torch.int8, generator=gen)
    wt = torch.randint(-127, 128, (16, 32, 3, 3), dtype=torch.int8, generator=gen)
    old_engine = exact_f32.ENGINE
    try:
        exact_f32.ENGINE = "int"
        want = qconv.conv_acc(x, wt, (1, 1), (1, 1), (1, 1), 1)
        exact_f32.ENGINE = "float32"
        got = qconv.conv_acc(x, wt, (1, 1), (1, 1), (1, 1), 1)
    finally:
        exact_f32.ENGINE = old_engine
    assert torch.equal(got, want)


@pytest.mark.parametrize("recipe", ["fqt-psq-8", "fqt-bhq-8"])
def test_a_stride_2_grad_input_holds_no_more_than_the_route_before(monkeypatch: pytest.MonkeyPatch,
                                                                   recipe: str) -> None:
    """A review: ∇X of a 3×3 stride-2 convolution on the float32 engine copied the whole
    batch's zero-inserted codes to float32, and its step peaked 6–8% above im2col and the
    route's GEMMs (64 and 112 channels, batch 128). Run in pieces of samples
    (``conv.acc_pieces``) it holds no more than that route (the profiler's memory events)."""
    import copy

    from lowbit.kernels import qconv

    monkeypatch.setattr(exact_f32, "ENGINE", "float32")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, stride=2, padding=1))
    x = torch.randn(32, 32, 16, 16, requires_grad=True)
    peaks = {}
    for f32 in (False, True):
        monkeypatch.setattr(qconv, "FLOAT32_CONV", f32)
        model = lowbit.convert(copy.deepcopy(base), lowbit.FQTConfig.from_recipe(recipe, seed=0))

        def step() -> None:
            model(x).square().mean().backward()  # noqa: B023 - called within the iteration
        step()
        peaks[f32] = _peak_bytes(step)
    assert peaks[True] <= peaks[False], peaks
