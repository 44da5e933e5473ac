"""lowbit.kernels.vnni: the batched AVX-512 VNNI int8 GEMM gives exact int32 sums on every
layout, tail, thread count and store path; attention's step is bitwise the same with it
and with one ``torch._int_mm`` per head; coverage counts it as an int8 GEMM; where it is
switched off or its self-test fails, the per-head loop runs, never something wrong. The
kernel tests need a CPU with AVX-512 VNNI (skipped elsewhere); the routing tests need one
without AMX (where AMX is present, its own batched kernel runs: tests/core/test_amx.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_attention_heads_counted_as_int8, num_threads

import lowbit
from lowbit.kernels import amx, int8, vnni

# Skipped only where the kernel is not meant to run, never because its self-test failed.
WANTED = vnni.cpu_has_vnni() and os.environ.get("LOWBIT_VNNI", "1") != "0" and amx._compiler() is not None
needs_vnni = pytest.mark.skipif(not WANTED, reason="needs a CPU with AVX-512 F/BW/VNNI and a C compiler")
routes_to_vnni = pytest.mark.skipif(not WANTED or amx.available(),
                                    reason="needs AVX-512 VNNI and no AMX (else the AMX kernel runs)")


@needs_vnni
def test_kernel_builds_and_passes_its_self_test() -> None:
    assert vnni.available()


@needs_vnni
@pytest.mark.parametrize("bsz, m, k, n", [(1, 1, 1, 1), (5, 37, 70, 45), (48, 64, 64, 64), (3, 16, 200, 17),
                                          (2, 130, 300, 66), (3, 1, 15, 161), (2, 9, 3, 33), (4, 24, 64, 96)])
@pytest.mark.parametrize("a_t, b_t", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("stream", [False, True])
def test_vnni_sums_are_exact(monkeypatch: pytest.MonkeyPatch, bsz: int, m: int, k: int, n: int, a_t: bool,
                             b_t: bool, threads: int, stream: bool) -> None:
    """``vnni.bmm_into`` equals exact int64 products: row-major and transposed entries
    (attention's ``Kᵀ``, ``∇Sᵀ``), a batch taken every other entry of a larger one, tails
    in M, K (not a multiple of 4) and N (not a multiple of 32), fewer entries than
    threads and more, plain and streaming stores."""
    monkeypatch.setattr(vnni, "STREAM_BYTES", 0 if stream else 1 << 62)
    g = torch.Generator().manual_seed(bsz * 1000 + m + k)
    a = torch.randint(-128, 128, (2 * bsz, m, k), dtype=torch.int8, generator=g)[::2]
    b = torch.randint(-128, 128, (bsz, k, n), dtype=torch.int8, generator=g)
    a = a.mT.contiguous().mT if a_t else a
    b = b.mT.contiguous().mT if b_t else b
    want = torch.bmm(a.long(), b.long()).int()
    out = torch.full((bsz, m, n), 7, dtype=torch.int32)
    with num_threads(threads):
        vnni.bmm_into(a, b, out)
    assert torch.equal(out, want)


@needs_vnni
@pytest.mark.parametrize("va, vb", [(127, -128), (127, 127), (-128, -128), (-128, 127)])
def test_vnni_longest_exact_sum_of_extreme_codes(va: int, vb: int) -> None:
    """At ``K = MAX_K`` (lowbit's bound for every int8 GEMM, ``K·128² < 2³¹``) the offset
    sum ``Σ(a + 128)·b`` reaches ±255·128·K, past int32's range; it wraps, and the corrected
    products are exact for every pair of extreme codes."""
    k = vnni.MAX_K
    a = torch.full((1, 8, k), va, dtype=torch.int8)
    b = torch.full((1, k, 32), vb, dtype=torch.int8)
    out = torch.empty(1, 8, 32, dtype=torch.int32)
    version = out._version
    vnni.bmm_into(a, b, out)
    assert bool((out.long() == va * vb * k).all())
    assert out._version > version  # written through its pointer: autograd sees it (README fault kind 225)
    assert vnni.MAX_K == amx.MAX_K == int8.MAX_K
    with pytest.raises(ValueError, match="can overflow"):
        vnni.bmm_into(torch.zeros(1, 1, k + 1, dtype=torch.int8), torch.zeros(1, k + 1, 1, dtype=torch.int8),
                      torch.empty(1, 1, 1, dtype=torch.int32))


@needs_vnni
def test_bmm_into_rejects_wrong_dtypes_shapes_and_outputs() -> None:
    """Nothing reaches the raw pointers unchecked: a wrong dtype, mismatched shapes or
    batches, or an ``out`` of the wrong dtype or shape is an error naming it."""
    a, b = torch.ones(2, 4, 8, dtype=torch.int8), torch.ones(2, 8, 4, dtype=torch.int8)
    out = torch.empty(2, 4, 4, dtype=torch.int32)
    with pytest.raises(TypeError, match="int8 operands"):
        vnni.bmm_into(a.float(), b, out)
    with pytest.raises(ValueError, match="do not match"):
        vnni.bmm_into(a, b[:1], out)
    with pytest.raises(ValueError, match="do not match"):
        vnni.bmm_into(a, a, out)
    with pytest.raises(ValueError, match="out must be int32"):
        vnni.bmm_into(a, b, out.long())
    with pytest.raises(ValueError, match="out must be int32"):
        vnni.bmm_into(a, b, out[:, :3])
    with pytest.raises(ValueError, match="rows must be contiguous"):
        vnni.bmm_into(a, b, out.mT.contiguous().mT)
    assert int(vnni.bmm_into(a, b, out)[1, 3, 3]) == 8
    zero_k = torch.full((2, 4, 4), 5, dtype=torch.int32)
    assert not vnni.bmm_into(torch.ones(2, 4, 0, dtype=torch.int8), torch.ones(2, 0, 4, dtype=torch.int8), zero_k).any()


@routes_to_vnni
def test_batched_products_route_to_vnni_and_long_sums_do_not(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = vnni.bmm_into
    monkeypatch.setattr(vnni, "bmm_into", lambda a, b, out: calls.append(a.shape) or real(a, b, out))
    a = torch.randint(-128, 128, (6, 64, 32), dtype=torch.int8)
    b = torch.randint(-128, 128, (6, 32, 40), dtype=torch.int8)
    assert torch.equal(int8.int_mm_batched(a, b), torch.bmm(a.long(), b.long()).int())
    assert calls == [(6, 64, 32)]
    assert int8.batched_kernel(vnni.MAX_K) and not int8.batched_kernel(vnni.MAX_K + 1)


@routes_to_vnni
def test_attention_step_bitwise_the_same_with_and_without_vnni(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attention's per-head products as one VNNI batch or as ``torch._int_mm`` per head:
    the same outputs and gradients, bit for bit (causal, grouped-query)."""
    def run() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 4, 128, 64, generator=g, requires_grad=True)
        k, v = (torch.randn(2, 2, 128, 64, generator=g, requires_grad=True) for _ in range(2))
        state = lowbit.functional.block_state(lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
        o = lowbit.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, state=state)
        o.square().sum().backward()
        return [o, q.grad, k.grad, v.grad]

    calls = []
    real = vnni.bmm_into
    monkeypatch.setattr(vnni, "bmm_into", lambda a, b, out: calls.append(1) or real(a, b, out))
    on = run()
    assert calls, "the VNNI batch ran"
    monkeypatch.setattr(int8, "batched_kernel", lambda k: False)
    n = len(calls)
    off = run()
    assert len(calls) == n, "the per-head loop ran"
    assert all(torch.equal(x, y) for x, y in zip(on, off, strict=True))


@routes_to_vnni
def test_coverage_counts_attention_heads_on_vnni_as_int8() -> None:
    assert_attention_heads_counted_as_int8()


def test_switched_off_by_environment() -> None:
    """``LOWBIT_VNNI=0``: not available, and a batch still gets its exact sums."""
    code = ("import torch; from lowbit.kernels import vnni, int8; print(vnni.available()); "
            "a = torch.ones(3, 64, 32, dtype=torch.int8); "
            "print(int(int8.int_mm_batched(a, a.mT)[2, 0, 0]))")
    env = {**os.environ, "LOWBIT_VNNI": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.split()
    assert out == ["False", "32"]


@routes_to_vnni
def test_self_test_failure_warns_and_the_loop_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    vnni._library.cache_clear()
    try:
        monkeypatch.setattr(vnni, "_self_test", lambda lib: False)
        with pytest.warns(RuntimeWarning, match="VNNI"):
            assert not vnni.available()
        assert not int8.batched_kernel(64)
        a = torch.ones(3, 64, 32, dtype=torch.int8)
        assert int(int8.int_mm_batched(a, a.mT)[2, 0, 0]) == 32
    finally:
        monkeypatch.undo()
        vnni._library.cache_clear()
