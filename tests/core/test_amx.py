"""lowbit.kernels.amx: the AMX int8 GEMM gives the exact int32 sums of ``torch._int_mm``
on every layout, tail and thread count; lowbit's training step is bitwise the same with
it and without it; coverage counts it as an int8 GEMM; and where it cannot be built or
is switched off, lowbit falls back to ``torch._int_mm`` with a warning, never silently
wrong. The kernel tests need a CPU with AMX (skipped elsewhere: CI's fallback tests run
everywhere)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit.kernels import amx, int8

needs_amx = pytest.mark.skipif(not amx.available(), reason="needs a CPU with AMX (amx_tile, amx_int8)")


def _codes(shape: tuple[int, int], transposed: bool, g: torch.Generator) -> torch.Tensor:
    """Random int8 codes of ``shape``, stored row-major or as the transpose of a
    row-major array (column-major strides)."""
    if transposed:
        return torch.randint(-128, 128, shape[::-1], dtype=torch.int8, generator=g).t()
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)


SHAPES = [(1, 1, 1), (16, 64, 16), (17, 33, 1), (37, 130, 45), (48, 200, 31), (64, 640, 192),
          (100, 63, 70), (16, 5000, 48), (300, 257, 129)]


@needs_amx
@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("a_t, b_t", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_amx_sums_are_exact(m: int, k: int, n: int, a_t: bool, b_t: bool, threads: int) -> None:
    """Every dimension with and without a tail (M, N not multiples of 16 or 32, K not of
    64), both operand layouts, one thread, two, and more threads than blocks (the K
    split: (16, 5000, 48) has one block)."""
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    a, b = _codes((m, k), a_t, g), _codes((k, n), b_t, g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = amx.int_mm(a, b)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got, _exact(a, b))


@needs_amx
def test_amx_longest_exact_sum_of_extreme_codes() -> None:
    """``K = MAX_K`` products of −128 · −128 (the largest int32 sum lowbit allows:
    2,147,467,264) and of −128 · 127, as ``_int_mm`` gives them."""
    k = int8.MAX_K
    a = torch.full((16, k), -128, dtype=torch.int8)
    b = torch.full((k, 16), -128, dtype=torch.int8)
    b[:, 8:] = 127
    got = amx.int_mm(a, b)
    assert torch.equal(got[:, :8], torch.full((16, 8), 128 * 128 * k, dtype=torch.int32))
    assert torch.equal(got[:, 8:], torch.full((16, 8), -128 * 127 * k, dtype=torch.int32))


@needs_amx
def test_amx_writes_into_a_strided_out_and_leaves_the_rest() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = _codes((40, 96), False, g), _codes((96, 20), True, g)
    big = torch.full((40, 32), 7, dtype=torch.int32)
    out = big[:, 4:24]  # row stride 32 > N
    amx.int_mm(a, b, out)
    assert torch.equal(out, _exact(a, b))
    assert (big[:, :4] == 7).all() and (big[:, 24:] == 7).all()


@needs_amx
def test_amx_reads_overlapping_rows_as_meant() -> None:
    """An im2col-style view whose rows overlap (row stride < K), the layout
    ``torch._int_mm`` misreads (fault kind 24)."""
    g = torch.Generator().manual_seed(4)
    base = torch.randint(-128, 128, (4096,), dtype=torch.int8, generator=g)
    a = base.as_strided((300, 128), (8, 1))
    b = _codes((128, 40), False, g)
    assert torch.equal(amx.int_mm(a, b), _exact(a, b))


@needs_amx
def test_int8_int_mm_routes_large_products_to_amx() -> None:
    """:func:`int8.int_mm` takes the AMX kernel where :func:`amx.worth_it` says so,
    ``_int_mm`` elsewhere, with equal sums."""
    g = torch.Generator().manual_seed(5)
    a, b = _codes((512, 256), False, g), _codes((256, 256), True, g)
    assert amx.worth_it(a, b)
    assert not amx.worth_it(a.t().contiguous().t(), b)  # a transposed left operand
    assert not amx.worth_it(a[:64], b)  # too few rows
    with torch.profiler.profile() as prof:
        got = int8.int_mm(a, b)
    names = {e.name for e in prof.events()}
    assert "lowbit::amx_int_mm" in names and "aten::_int_mm" not in names
    assert torch.equal(got, torch._int_mm(a, b.contiguous()))


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
def test_coverage_counts_the_amx_gemm_as_int8() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512))
    lowbit.convert(model, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    rep = lowbit.coverage(model, torch.randn(512, 256, requires_grad=True))
    fwd = [r for r in rep.rows if r.phase == "forward"]
    assert [(r.op, r.flops, r.kind, r.formats) for r in fwd] == \
        [("lowbit.amx_int_mm", 2 * 512 * 256 * 512, "int8", ("int8", "int8"))]
    assert rep.real_share == 1.0


@needs_amx
def test_op_rejects_wrong_dtypes_and_shapes() -> None:
    a = torch.zeros(32, 64, dtype=torch.int8)
    with pytest.raises(TypeError, match="int8 operands and an int32 out"):
        torch.ops.lowbit.amx_int_mm(a.float(), a.t(), torch.empty(32, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="do not match"):
        torch.ops.lowbit.amx_int_mm(a, a, torch.empty(32, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="row-major out"):
        torch.ops.lowbit.amx_int_mm(a, a.t(), torch.empty(32, 32, dtype=torch.int32).t())


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
    """A compiler that rejects the source: a warning naming the cause, the kernel not
    used, ``int8.int_mm`` still exact on ``_int_mm``."""
    if not amx.cpu_has_amx():
        pytest.skip("the build is only attempted on a CPU with AMX")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(amx, "FLAGS", (*amx.FLAGS, "-no-such-flag"))
    amx._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not be built"):
            assert not amx.available()
        a = torch.ones(512, 256, dtype=torch.int8)
        assert int(int8.int_mm(a, a.t())[0, 0]) == 256
    finally:
        amx._library.cache_clear()
