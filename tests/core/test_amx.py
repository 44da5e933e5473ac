"""lowbit.kernels.amx: the AMX int8 GEMM gives the exact int32 sums of ``torch._int_mm``
on every layout, tail and thread count; lowbit's training step is bitwise the same with
it and without it; coverage counts it as an int8 GEMM in the right phase; its first use
inside a coverage trace or ``torch.compile`` is neither counted nor traced; and where it
cannot be built or is switched off, lowbit falls back to ``torch._int_mm`` with a
warning, never silently wrong. The kernel tests need a CPU with AMX (skipped elsewhere;
the fallback tests run everywhere)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_attention_heads_counted_as_int8, num_threads
from torch import nn

import lowbit
from lowbit.kernels import amx, int8

# Skipped only where the kernel is not meant to run, never because its self-test failed
# (test_kernel_builds_and_passes_its_self_test fails then).
WANTED = amx.cpu_has_amx() and os.environ.get("LOWBIT_AMX", "1") != "0" and amx._compiler() is not None
needs_amx = pytest.mark.skipif(not WANTED, reason="needs a CPU with AMX (amx_tile, amx_int8) and a C compiler")


@needs_amx
def test_kernel_builds_and_passes_its_self_test() -> None:
    assert amx.available()


def _codes(shape: tuple[int, int], transposed: bool, g: torch.Generator) -> torch.Tensor:
    """Random int8 codes of ``shape``, stored row-major or as the transpose of a
    row-major array (column-major strides)."""
    if transposed:
        return torch.randint(-128, 128, shape[::-1], dtype=torch.int8, generator=g).t()
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)


SHAPES = [(1, 1, 1), (16, 64, 16), (17, 33, 1), (37, 130, 45), (48, 200, 31), (64, 640, 192),
          (100, 63, 70), (16, 5000, 48), (300, 257, 129), (40, 128, 600)]


@needs_amx
@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("a_t, b_t", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_amx_sums_are_exact(m: int, k: int, n: int, a_t: bool, b_t: bool, threads: int) -> None:
    """Every dimension with and without a tail (M, N not multiples of 16 or 32, K not of
    64), both operand layouts, one thread, two, and more threads than blocks (the K
    split: (16, 5000, 48) has one block); more than one 256-column panel (N = 600)."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    a, b = _codes((m, k), a_t, g), _codes((k, n), b_t, g)
    with num_threads(threads):
        got = amx.kernel(a, b)
    assert torch.equal(got, _exact(a, b))


@needs_amx
def test_amx_longest_exact_sum_of_extreme_codes() -> None:
    """``K = MAX_K`` products of −128 · −128 (the largest int32 sum lowbit allows:
    2,147,467,264) and of −128 · 127, as ``_int_mm`` gives them; split over 2 threads."""
    k = int8.MAX_K
    a = torch.full((16, k), -128, dtype=torch.int8)
    b = torch.full((k, 16), -128, dtype=torch.int8)
    b[:, 8:] = 127
    with num_threads(2):
        got = amx.kernel(a, b)
    assert torch.equal(got[:, :8], torch.full((16, 8), 128 * 128 * k, dtype=torch.int32))
    assert torch.equal(got[:, 8:], torch.full((16, 8), -128 * 127 * k, dtype=torch.int32))


@needs_amx
@pytest.mark.parametrize("threads", [1, 3])
def test_amx_reads_any_view(threads: int) -> None:
    """Views as ``int8.int_mm`` may be handed them: overlapping rows (an im2col view, row
    stride < K — read in place when K % 64 == 0 and M % 16 == 0, copied otherwise; the
    layout ``torch._int_mm`` misreads, fault kind 24), a stride-0 (expanded) operand, a
    storage offset, every-other-row and every-third-column slices, general strides."""
    g = torch.Generator().manual_seed(4)
    base = torch.randint(-128, 128, (1 << 16,), dtype=torch.int8, generator=g)
    big = torch.randint(-128, 128, (700, 900), dtype=torch.int8, generator=g)
    row = torch.randint(-128, 128, (1, 128), dtype=torch.int8, generator=g)
    pairs = [
        (base.as_strided((304, 128), (8, 1)), big[:128, :40]),  # in place, overlapping rows
        (base.as_strided((300, 128), (8, 1)), big[:128, :40]),  # copied (M % 16 != 0)
        (row.expand(64, 128), big[5:133, 7:57]),  # stride 0; an offset, row stride 900
        (big[1:601:2, 3:387:3], big[::5, :33][:128]),  # ::2 rows and ::3 columns; ::5 rows
        (base[17:].as_strided((50, 70), (3, 5)), base.as_strided((70, 45), (1, 71))),
    ]
    with num_threads(threads):
        for a, b in pairs:
            assert torch.equal(amx.kernel(a, b), _exact(a, b)), (a.stride(), b.stride())
            assert torch.equal(amx.int_mm(a, b), _exact(a, b))


@needs_amx
def test_int8_int_mm_routes_large_products_to_amx() -> None:
    """:func:`int8.int_mm` takes lowbit's op where :func:`amx.worth_it` says so (on
    shapes alone), ``_int_mm`` elsewhere; the op runs the AMX kernel on a row-major left
    operand and ``_int_mm`` on a transposed one; equal sums everywhere."""
    assert amx.available()  # built and self-tested here, not inside the profiled calls below
    g = torch.Generator().manual_seed(5)
    a, b = _codes((512, 256), False, g), _codes((256, 256), True, g)
    want = torch._int_mm(a, b.contiguous())
    assert amx.worth_it(512, 256, 256)
    assert not amx.worth_it(64, 256, 256)  # too few rows
    assert not amx.worth_it(256, 64, 256)  # too small
    for left, inner in ((a, False), (a.t().contiguous().t(), True)):
        with torch.profiler.profile() as prof:
            got = int8.int_mm(left, b)
        names = {e.name for e in prof.events()}
        assert "lowbit::int8_mm" in names and ("aten::_int_mm" in names) == inner
        assert torch.equal(got, want)
    with torch.profiler.profile() as prof:
        int8.int_mm(a[:64], b)
    names = {e.name for e in prof.events()}
    assert "aten::_int_mm" in names and "lowbit::int8_mm" not in names


def _ffn_grads(seed: int) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256))
    lowbit.convert(model, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    x = torch.randn(512, 256, requires_grad=True)
    model(x).square().mean().backward()
    return [x.grad, *(p.grad for p in model.parameters())]


@needs_amx
def test_training_step_bitwise_the_same_with_and_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    on = _ffn_grads(0)
    monkeypatch.setattr(amx, "MIN_MACS", 1 << 62)  # every GEMM on torch._int_mm
    off = _ffn_grads(0)
    assert all(torch.equal(p, q) for p, q in zip(on, off, strict=True))


@needs_amx
def test_coverage_counts_the_amx_gemms_as_int8_in_their_phases() -> None:
    """All three GEMMs of a Linear large enough for AMX: each counted once, as int8, in
    its own phase (the op returns its product, which names the weight's gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512))
    lowbit.convert(model, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    rep = lowbit.coverage(model, torch.randn(512, 256, requires_grad=True))
    flops = 2 * 512 * 256 * 512
    assert sorted((r.phase, r.op, r.flops, r.kind, r.formats) for r in rep.rows) == sorted(
        (p, "lowbit.int8_mm", flops, "int8", ("int8", "int8"))
        for p in ("forward", "grad_input", "grad_weight"))
    assert rep.real_share == 1.0


_FIRST_USE = textwrap.dedent("""
    import torch, lowbit
    from torch import nn
    from lowbit.kernels import int8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512))
    lowbit.convert(model, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    rep = lowbit.coverage(model, torch.randn(512, 256, requires_grad=True))  # first AMX use
    print(sorted((r.op, r.phase, r.calls) for r in rep.rows))
    a = torch.randint(-128, 128, (512, 256), dtype=torch.int8)
    b = torch.randint(-128, 128, (256, 512), dtype=torch.int8)
    f = torch.compile(lambda a, b: int8.int_mm(a, b) + 1)
    print(torch.equal(f(a, b), torch._int_mm(a, b) + 1))
""")
_FIRST_COMPILE = textwrap.dedent("""
    import torch
    from lowbit.kernels import int8
    a = torch.randint(-128, 128, (512, 256), dtype=torch.int8)
    b = torch.randint(-128, 128, (256, 512), dtype=torch.int8)
    f = torch.compile(lambda a, b: int8.int_mm(a, b) + 1)  # the first AMX use, traced
    print(all(torch.equal(f(a, b), torch._int_mm(a, b) + 1) for _ in range(3)))
""")


def _fresh_process(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()


@needs_amx
def test_first_use_inside_coverage_is_not_counted() -> None:
    """A fresh process whose first AMX GEMM runs inside ``lowbit.coverage``: the
    self-test's own GEMMs are not counted as the model's (the build runs with every
    dispatch mode suspended)."""
    rows, compiled = _fresh_process(_FIRST_USE)
    assert rows == str(sorted(("lowbit.int8_mm", p, 1) for p in ("forward", "grad_input", "grad_weight")))
    assert compiled == "True"


@needs_amx
def test_first_use_under_torch_compile_is_not_traced() -> None:
    """A fresh process whose first AMX GEMM is inside a ``torch.compile``d function: the
    build and self-test run eagerly (traced, dynamo freed their packing buffers before
    the kernel wrote into them: a corrupted heap)."""
    assert _fresh_process(_FIRST_COMPILE) == ["True"]


@needs_amx
@pytest.mark.parametrize("bsz, m, k, n", [(1, 1, 1, 1), (5, 37, 70, 45), (64, 128, 64, 128), (3, 16, 200, 17),
                                          (2, 130, 300, 66), (3, 1, 15, 161)])
@pytest.mark.parametrize("a_t, b_t", [(False, False), (False, True), (True, False)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_amx_batched_sums_are_exact(bsz: int, m: int, k: int, n: int, a_t: bool, b_t: bool, threads: int) -> None:
    """``amx.int_bmm`` (one call for a batch, entries spread over the threads) equals each
    entry's ``torch._int_mm``: row-major and transposed entries (attention's ``Kᵀ``,
    ``∇Oᵀ``), a batch taken every other entry of a larger one, tails in every dimension,
    fewer entries than threads and more."""
    g = torch.Generator().manual_seed(bsz * 1000 + m)
    a = torch.randint(-128, 128, (2 * bsz, m, k), dtype=torch.int8, generator=g)[::2]
    b = torch.randint(-128, 128, (bsz, k, n), dtype=torch.int8, generator=g)
    a = a.mT.contiguous().mT if a_t else a
    b = b.mT.contiguous().mT if b_t else b
    want = torch.bmm(a.long(), b.long()).int()  # exact; no _int_mm layout rules (fault kind 24)
    with num_threads(threads):
        got = amx.int_bmm(a, b)
    assert got.dtype == torch.int32 and got.is_contiguous() and torch.equal(got, want)


@needs_amx
def test_amx_batched_extreme_codes_and_empty_batches() -> None:
    """−128 · −128 summed over a long K in every entry (exact in int32), and batches with
    no entries, no rows or no summed terms."""
    a = torch.full((3, 32, 4096), -128, dtype=torch.int8)
    got = amx.int_bmm(a, a.mT)
    assert bool((got == 4096 * 128 * 128).all())
    assert amx.int_bmm(torch.zeros(0, 4, 8, dtype=torch.int8), torch.zeros(0, 8, 5, dtype=torch.int8)).shape == (0, 4, 5)
    assert amx.int_bmm(torch.zeros(2, 0, 8, dtype=torch.int8), torch.zeros(2, 8, 5, dtype=torch.int8)).shape == (2, 0, 5)
    zero_k = amx.int_bmm(torch.zeros(2, 4, 0, dtype=torch.int8), torch.zeros(2, 0, 5, dtype=torch.int8))
    assert zero_k.shape == (2, 4, 5) and not zero_k.any()


@needs_amx
def test_attention_step_bitwise_the_same_with_and_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention's per-head products as one AMX batch or as ``torch._int_mm`` per head:
    the same outputs and gradients, bit for bit (causal, grouped-query)."""
    def run() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 4, 128, 64, generator=g, requires_grad=True)  # heads past LOOP_MIN_MACS
        k, v = (torch.randn(2, 2, 128, 64, generator=g, requires_grad=True) for _ in range(2))
        state = lowbit.functional.block_state(lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
        o = lowbit.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, state=state)
        o.square().sum().backward()
        return [o, q.grad, k.grad, v.grad]

    calls = []
    real = amx.int_bmm
    monkeypatch.setattr(amx, "int_bmm", lambda a, b: calls.append(a.shape[0]) or real(a, b))
    on = run()
    assert calls, "the AMX batch ran"
    monkeypatch.setattr(amx, "available", lambda: False)
    off = run()
    assert all(torch.equal(x, y) for x, y in zip(on, off, strict=True))


@needs_amx
def test_coverage_counts_attention_heads_on_amx_as_int8() -> None:
    """Attention's head products through ``lowbit::int8_bmm`` are counted as int8 GEMMs
    with the batch's FLOPs."""
    assert_attention_heads_counted_as_int8()


@needs_amx
@pytest.mark.parametrize("b_t", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_panels_share_one_packing_of_the_right_operand(
        monkeypatch: pytest.MonkeyPatch, b_t: bool, threads: int) -> None:
    """A bf16 GEMM output by row panels on AMX packs its right operand once
    (``amx.pack_right``), not once a panel (+12% of the FFN step when it did), and has
    the bits of one GEMM; the op reads a given packing instead of ``b``."""
    from lowbit.kernels import Backend, Encoded, kernels_for, reference

    g = torch.Generator().manual_seed(11)
    m, k, n = 1100, 192, 200  # 4 panels of 275 rows (row tiles of 16 end inside them)
    a = Encoded(_codes((m, k), False, g), torch.rand(m, 1, generator=g) * 1e-2)
    b = Encoded(_codes((k, n), b_t, g), torch.rand(1, n, generator=g) * 1e-2)
    monkeypatch.setattr(amx, "MIN_MACS", 1)
    monkeypatch.setattr(int8, "PANEL", 256 * n)
    packs = []
    pack = amx.pack_right
    monkeypatch.setattr(amx, "pack_right", lambda x: packs.append(x.shape) or pack(x))
    kern = kernels_for(Backend.AUTO, "cpu")
    assert int8.panel_rows(a, b, torch.bfloat16) == 256
    with num_threads(threads):
        got = int8.gemm(kern, a, b, None, torch.bfloat16)
    assert packs == [(k, n)]
    want = reference.int8_epilogue(_exact(a.codes, b.codes), a.scale, b.scale, None, None, None, None,
                                   k, None, torch.bfloat16)
    assert torch.equal(got, want)
    packed = pack(b.codes)  # the op with a packing: the same sums, b itself not read
    assert torch.equal(amx.int_mm(a.codes[:300], b.codes, packed), _exact(a.codes[:300], b.codes))
    assert torch.equal(amx.int_mm(a.codes[:300], torch.zeros_like(b.codes), packed),
                       _exact(a.codes[:300], b.codes))


@needs_amx
def test_op_rejects_wrong_dtypes_shapes_and_too_long_sums() -> None:
    a = torch.zeros(32, 64, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8 operands"):
        torch.ops.lowbit.int8_mm(a.float(), a.t())
    with pytest.raises(TypeError, match="int8 operands"):
        amx.kernel(a.float(), a.t())
    with pytest.raises(ValueError, match="do not match"):
        torch.ops.lowbit.int8_mm(a, a)
    long = torch.zeros(1, amx.MAX_K + 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="can overflow"):
        torch.ops.lowbit.int8_mm(long, long.t())
    batch = torch.zeros(2, 8, 16, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8 operands"):
        torch.ops.lowbit.int8_bmm(batch.float(), batch.mT)
    with pytest.raises(ValueError, match="do not match"):
        torch.ops.lowbit.int8_bmm(batch, batch)
    with pytest.raises(ValueError, match="do not match"):
        torch.ops.lowbit.int8_bmm(batch, batch[:1].mT)
    with pytest.raises(ValueError, match="can overflow"):
        torch.ops.lowbit.int8_bmm(long.unsqueeze(0), long.t().unsqueeze(0))
    with pytest.raises(ValueError, match="not a packing of a"):
        torch.ops.lowbit.int8_mm(a, a.t(), torch.zeros(64 * 16, dtype=torch.int8))  # (64, 32) needs 64·32
    with pytest.raises(ValueError, match=r"a \(K, N\) operand"):
        amx.pack_right(batch)
    with pytest.raises(TypeError, match="int8 operands"):
        amx.pack_right(a.float())
    assert amx.pack_right(a.t()).numel() == 64 * 32
    assert amx.MAX_K == int8.MAX_K


def test_switched_off_by_environment() -> None:
    """``LOWBIT_AMX=0``: not available, and lowbit's GEMMs run on ``torch._int_mm``."""
    code = ("import torch; from lowbit.kernels import amx, int8; print(amx.available()); "
            "a = torch.ones(512, 256, dtype=torch.int8); "
            "print(int(int8.int_mm(a, a.t())[0, 0]))")
    env = {**os.environ, "LOWBIT_AMX": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["False", "256"]


def test_build_failure_warns_and_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A compiler that rejects the flags: a warning naming the cause, the kernel not
    used, ``int8.int_mm`` still exact on ``_int_mm``."""
    if not amx.cpu_has_amx():
        pytest.skip("the build is only attempted on a CPU with AMX")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(amx, "FLAGS", (*amx.FLAGS, "-no-such-flag"))
    amx._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built.*no-such-flag"):
            assert not amx.available()
        a = torch.ones(512, 256, dtype=torch.int8)
        assert int(int8.int_mm(a, a.t())[0, 0]) == 256
    finally:
        amx._library.cache_clear()


@needs_amx
def test_unusable_cache_directory_warns_and_builds_in_a_temporary_one(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(not_a_dir))
    amx._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="cache directory .*a-file.* is not usable.*LOWBIT_CACHE_DIR"):
            assert amx.available()
    finally:
        amx._library.cache_clear()


@needs_amx
def test_cc_that_is_not_found_is_named_before_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "no-such-compiler --flag")
    with pytest.warns(RuntimeWarning, match="CC='no-such-compiler --flag' is not found; using "):
        cc = amx._compiler()
    assert cc is not None and os.path.basename(cc[0]) in ("gcc", "cc")


@needs_amx
@pytest.mark.parametrize("what", ["default-dtype", "self-test-raises"])
def test_self_test_is_robust_and_a_failure_falls_back(monkeypatch: pytest.MonkeyPatch, what: str) -> None:
    """The self-test's operands are int8 CPU tensors whatever torch's defaults; any
    exception in it is a warning and ``torch._int_mm`` runs, never an error in training."""
    amx._library.cache_clear()
    old = torch.get_default_dtype()
    try:
        if what == "default-dtype":
            torch.set_default_dtype(torch.float64)
            assert amx.available()
        else:
            monkeypatch.setattr(amx, "_self_test", lambda lib: 1 / 0)
            with pytest.warns(RuntimeWarning, match="self-test failed.*ZeroDivisionError"):
                assert not amx.available()
        a = torch.ones(512, 256, dtype=torch.int8)
        assert int(int8.int_mm(a, a.t())[0, 0]) == 256
    finally:
        torch.set_default_dtype(old)
        monkeypatch.undo()
        amx._library.cache_clear()
