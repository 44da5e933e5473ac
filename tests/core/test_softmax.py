"""Attention's softmax with its scores' epilogue (``lowbit.kernels.softmax``): the AVX-512
kernel against the reference composition (the table's epilogue, the mask addition, ATen's
softmax) and against float64, its refusals, and its NaN / mask semantics."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from lowbit.kernels import Backend, Impl, kernels_for, softmax

needs_kernel = pytest.mark.skipif(not softmax.available(), reason="no AVX-512 softmax kernel on this machine")
REF = kernels_for(Backend.REFERENCE, "cpu")
AUTO = kernels_for(Backend.AUTO, "cpu")
# exp within 2 ulp, sums of up to a few hundred terms in another order, one reciprocal: a
# few ulp of float32 (6e-8 each); 4e-6 relative leaves a wide margin and still catches a
# wrong step, mask or row (off by orders of magnitude)
RTOL = 4e-6


def _case(b: int, lq: int, s: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-4000, 4000, (b, lq, s), generator=g, dtype=torch.int32)
    sa = torch.rand(b, lq, 1, generator=g) * 0.01
    sb = torch.rand(b, 1, s, generator=g) * 0.01
    return acc, sa, sb


def _close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-12) -> None:
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    torch.testing.assert_close(got.nan_to_num(0.0), want.nan_to_num(0.0), rtol=RTOL, atol=atol)


def _causal(lq: int, s: int) -> torch.Tensor:
    return torch.zeros(1, lq, s).masked_fill(torch.ones(lq, s, dtype=torch.bool).tril().logical_not(),
                                             float("-inf"))


@needs_kernel
@pytest.mark.parametrize("shape", [(3, 5, 19), (2, 33, 128), (4, 16, 16), (1, 7, 1), (2, 3, 200)])
@pytest.mark.parametrize("steps", ["row-col", "tensor", "row-tensor", "float"])
@pytest.mark.parametrize("mask", ["none", "causal", "per-entry"])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_equals_the_reference_to_float_rounding(shape: tuple[int, int, int], steps: str, mask: str,
                                                       threads: int) -> None:
    b, lq, s = shape
    acc, sa, sb = _case(b, lq, s, seed=sum(shape))
    if steps == "tensor":
        sa, sb = sa[:1, :1], sb[:1, :, :1]
    elif steps == "row-tensor":
        sb = sb[:1, :, :1]
    x = acc
    if steps == "float":
        x, sa, sb = acc.float() * 1e-3, None, None
    m, masked = None, False
    if mask == "causal":
        m = _causal(lq, s)
    elif mask == "per-entry":  # (b/heads, heads, L, S) expanded over heads: stride 0
        g = torch.Generator().manual_seed(7)
        base = torch.randn(b, 1, lq, s, generator=g).masked_fill(torch.rand(b, 1, lq, s, generator=g) < 0.3,
                                                                 float("-inf"))
        base[0, 0, 0] = float("-inf")  # a row the mask blocks entirely
        m, masked = base.expand(b, 1, lq, s), True
    want = softmax.reference(REF, x.clone(), sa, sb, m, masked, torch.float32)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            assert softmax.supports(AUTO, x, sa, sb, m, masked, torch.float32)
            got = softmax.run(AUTO, x.clone(), sa, sb, m, masked, torch.float32)
            gp = torch.randint(-4000, 4000, x.shape, dtype=torch.int32) if sa is not None else torch.randn(x.shape)
            want_g = softmax.reference_grad(REF, gp.clone(), sa, sb, want.clone(), torch.float32)
            got_g = softmax.run_grad(AUTO, gp.clone(), sa, sb, want.clone(), torch.float32)
    finally:
        torch.set_num_threads(before)
    _close(got, want)
    if mask == "per-entry":
        assert torch.equal(got[0, 0], torch.zeros(s))  # fully masked row → zeros, as torch's attention
    # ∇S = P ⊙ (∇P − rowsum(∇P ⊙ P)) cancels: absolute error relative to ∇P's magnitude
    g_mag = float((gp.float() if sa is None else gp.float() * sa * sb).abs().max())
    _close(got_g, want_g, atol=1e-6 * g_mag)


@needs_kernel
def test_kernel_is_close_to_the_float64_softmax() -> None:
    """The kernel's error against the exact softmax (float64) of the same float32 shifted
    scores ``x − max`` (the float32 subtraction's rounding is the algorithm's, torch's
    too) is float rounding: within 8 float32 ulp of each probability (its own exp, sum
    and reciprocal), over scores spread from 0 to −100 below the row maximum (exp's
    polynomial and its underflow edge)."""
    g = torch.Generator().manual_seed(11)
    x = -torch.rand(64, 1, 97, generator=g) * torch.logspace(-3, 2, 64).reshape(64, 1, 1)
    with torch.no_grad():
        got = softmax.run(AUTO, x.clone().reshape(1, 64, 97), None, None, None, False, torch.float32)
    shifted = (x - x.amax(dim=-1, keepdim=True)).double()
    exact = torch.softmax(shifted, dim=-1).reshape(1, 64, 97)
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert bool(((got.double() - exact).abs() <= 8 * ulp).all())


@needs_kernel
def test_nan_and_infinite_scores_follow_torch() -> None:
    """A NaN step or score makes its row NaN; an infinite one too (inf − inf); a row of
    −inf without a mask is NaN, with ``masked`` zeros — torch's softmax and lowbit's
    masked rows exactly."""
    acc, sa, sb = _case(2, 4, 21, seed=3)
    sa[0, 1, 0] = float("nan")
    sa[1, 2, 0] = float("inf")
    x = acc.float() * sa * sb
    x[1, 3] = float("-inf")
    for masked in (False, True):
        want = softmax.reference(REF, x.clone(), None, None, None, masked, torch.float32)
        with torch.no_grad():
            got = softmax.run(AUTO, x.clone(), None, None, None, masked, torch.float32)
        _close(got, want)
        assert bool(torch.isnan(got[0, 1]).all()) and bool(torch.isnan(got[1, 3]).all()) != masked


@needs_kernel
def test_unsupported_calls_run_the_reference() -> None:
    """float64, a non-contiguous input, a recorded input (``create_graph``), a mask whose
    last dimension is strided, and the kernel switched off: the dispatcher's reference."""
    acc, sa, sb = _case(2, 8, 16, seed=5)
    mask = _causal(8, 16)
    ok = (acc, sa, sb, mask, False, torch.float32)
    assert softmax.supports(AUTO, *ok)
    x64 = acc.double()
    assert not softmax.supports(AUTO, x64, None, None, None, False, torch.float64)
    assert not softmax.supports(AUTO, acc.mT.contiguous().mT, sa, sb, None, False, torch.float32)
    assert not softmax.supports(AUTO, acc.float().requires_grad_(), None, None, None, False, torch.float32)
    assert not softmax.supports(AUTO, acc, sa, sb, mask.mT.contiguous().mT, False, torch.float32)
    softmax.set_enabled(False)
    try:
        assert not softmax.supports(AUTO, *ok)
        got = AUTO.run("attention_softmax", AUTO, acc.clone(), sa, sb, mask, False, torch.float32)
        assert torch.equal(got, softmax.reference(AUTO, acc.clone(), sa, sb, mask, False, torch.float32))
    finally:
        softmax.set_enabled(True)


def test_reference_backend_never_runs_the_kernel() -> None:
    acc, sa, sb = _case(2, 8, 16, seed=6)
    assert REF.lookup("attention_softmax", Impl.NATIVE) is not None
    got = REF.run("attention_softmax", REF, acc.clone(), sa, sb, None, False, torch.float32)
    assert torch.equal(got, torch.softmax(acc.float() * sa * sb, -1))


def test_switched_off_by_the_environment() -> None:
    code = "from lowbit.kernels import softmax; print(softmax.available())"
    env = {**os.environ, "LOWBIT_SOFTMAX": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@needs_kernel
def test_softmax_kernels_bump_the_version_of_what_they_write_over() -> None:
    """The native softmax writes ``P`` over the scores, its backward ``∇S`` over ``P``,
    through their pointers: each bumps the tensor's version, so a tensor autograd saved
    and the kernel then wrote raises autograd's in-place error as an ATen op would
    (README fault kind 225)."""
    g = torch.Generator().manual_seed(3)
    scores, probs = torch.randn(2, 4, 16, generator=g), torch.rand(2, 4, 16, generator=g)
    v0 = scores._version
    softmax.run(AUTO, scores, None, None, None, False, torch.float32)
    assert scores._version > v0
    v1 = probs._version
    softmax.run_grad(AUTO, torch.randn(2, 4, 16, generator=g), None, None, probs, torch.float32)
    assert probs._version > v1
