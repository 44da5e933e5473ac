"""Attention's softmax over its scores, with the scores' epilogue: the kernel-table ops
``attention_softmax`` and ``attention_softmax_grad`` (docs/METHOD.md §7; used by
:mod:`lowbit.attention`).

``attention_softmax(kernels, scores, a_step, b_step, mask, masked, dtype)``: the
probabilities ``P = softmax(S + M)`` (B, L, S) of the scores ``S`` — the int32
accumulator of the heads' integer ``Q·Kᵀ`` with its steps (``a_step`` (B, L, 1) or (1, 1,
1), ``b_step`` (B, 1, S) or (1, 1, 1): ``S = (float(acc)·a_step)·b_step``, the
``int8_epilogue``), or a float product with ``a_step = b_step = None``. ``mask``: None or
additive, (1, L, S) or a (*lead, L, S) view with ``prod(lead) = B``; ``masked``: rows the
mask blocks entirely become zeros, as torch's attention gives.

``attention_softmax_grad(kernels, grads, a_step, b_step, probs, dtype)``: ``∇S = P ⊙ (∇P −
rowsum(∇P ⊙ P))`` written over ``probs`` (B, L, S), ``∇P`` the epilogue of ``grads`` as above.

Two implementations. The reference (:func:`reference`, :func:`reference_grad`) composes the
table's ``int8_epilogue``, a mask addition and ATen's softmax (and its backward), each a
pass over the score-sized tensor. The native one (:func:`run`, :func:`run_grad`; AVX-512,
``softmax_avx512.c``, built by :mod:`.cbuild` on first use) reads the accumulator once and
writes ``P`` (or ``∇S``) over it, each row kept in L1 between its passes: on the text
task's attention (64 heads of 128 × 128 scores) the epilogue, the mask addition and the
softmax took four passes over 4 MB. Its values equal the reference's to float rounding,
not bit for bit: its ``exp`` (a degree-5 polynomial, within 2 ulp for x ≤ 0) and its
summation order are not ATen's. NaN rows, infinities, masked and fully masked rows are
the reference's exactly. A self-test compares the two (tolerance in :func:`_close`) on
tails, per-row, per-column and per-tensor steps, float inputs, masks with and without
dead rows, NaN and infinite steps, one and two threads, before first use; a failure, a
missing compiler or a failed build is a ``RuntimeWarning`` and the reference runs.
``LOWBIT_SOFTMAX=0`` (or :func:`set_enabled`) turns it off; ``LOWBIT_COMPILE=0`` too (it
runs only where the dispatcher may use fused kernels).

The native kernel takes float32 on the CPU, a contiguous (B, L, S) ``scores`` (int32 with
float32 steps, or float32 without), a mask whose last dimension is contiguous, outside
any tracing (``torch.compile``, dispatch modes, ``jit.trace``, functorch), with no input
autograd records (a double backward, ``create_graph=True``, runs the reference, out of
place, and differentiates it).
"""

from __future__ import annotations

import ctypes
import warnings

import torch
from ..scopes import scope
from torch.utils._python_dispatch import _disable_current_modes

from . import avx512, cbuild, compiled, int8
from ..userframe import user_stacklevel

SOURCE = avx512.SOURCE.with_name("softmax_avx512.c")
_enabled = True
_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "lowbit_attention_softmax": [_P, _I, _I64, _I64, _I64, _P, _I64, _P, _I, _I64, _P, _P, _I64, _I, _I],
    "lowbit_attention_softmax_grad": [_P, _I, _I64, _I64, _I64, _P, _I64, _P, _I, _I64, _P, _I],
}


# -- the reference: the table's epilogue, a mask addition, ATen's softmax -----------------------
def inplace_ok(t: torch.Tensor) -> bool:
    """Whether ATen's softmax and softmax-backward kernels may write over their input:
    on the CPU, where each row is reduced before it is written (the same bits as
    out of place: ``tests/core/test_attention.py::test_inplace_softmax_kernels_are_bitwise``),
    and not while autograd records (a double backward, ``create_graph=True``: ``out=``
    kernels and in-place writes to views are not differentiable)."""
    return t.device.type == "cpu" and t.is_contiguous() and not torch.is_grad_enabled()


def masked_softmax(scores: torch.Tensor, masked: bool, inplace: bool = False) -> torch.Tensor:
    """``softmax`` over the last dimension; with ``masked`` (an attention mask was added),
    rows whose scores are all ``-inf`` are set to 0, as torch's
    ``scaled_dot_product_attention`` gives (a NaN score keeps its row NaN). ``inplace``:
    written over ``scores`` on the CPU (:func:`inplace_ok`), the same values without a
    second score-sized buffer."""
    dead = (scores == float("-inf")).all(dim=-1, keepdim=True) if masked else None
    if inplace and inplace_ok(scores):
        probs = torch._softmax(scores, -1, False, out=scores)
    else:  # differentiable where autograd records (a double backward): dead rows' scores 0
        # first (a softmax of all -inf is NaN, and its backward NaN through an additive mask)
        probs = torch.softmax(scores if dead is None else scores.masked_fill(dead, 0.0), dim=-1)
    if dead is not None:  # out of place where autograd records (it saved the softmax's output)
        probs = probs.masked_fill(dead, 0.0) if probs.requires_grad else probs.masked_fill_(dead, 0.0)
    return probs


def add_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``scores + mask`` for the (B, L, S) ``scores`` of a new GEMM result: ``mask`` is
    (1, L, S) or an expanded (*lead, L, S) view with ``prod(lead) = B``; in place where
    allowed."""
    if mask.dim() == 3:
        return scores.add_(mask) if inplace_ok(scores) else scores + mask
    full = scores.view(mask.shape)
    return (full.add_(mask) if inplace_ok(scores) else full + mask).view(scores.shape)


def _epilogue(kernels, scores: torch.Tensor, a_step: torch.Tensor | None,  # noqa: ANN001
              b_step: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if a_step is None:
        return scores
    with scope("lowbit::epilogue"):
        return int8.epilogue(kernels, scores, a_step, b_step, None, None, None, None, 0, None, dtype)


def reference(kernels, scores: torch.Tensor, a_step: torch.Tensor | None,  # noqa: ANN001
              b_step: torch.Tensor | None, mask: torch.Tensor | None, masked: bool,
              dtype: torch.dtype) -> torch.Tensor:
    """``attention_softmax`` (module docstring) as three passes: ``kernels``' epilogue,
    the mask's addition, ATen's softmax (in place where :func:`inplace_ok`)."""
    scores = _epilogue(kernels, scores, a_step, b_step, dtype)
    if mask is not None:
        scores = add_mask(scores, mask)  # a new tensor from the GEMM: no one else sees it
    return masked_softmax(scores, masked, inplace=True)


def reference_grad(kernels, grads: torch.Tensor, a_step: torch.Tensor | None,  # noqa: ANN001
                   b_step: torch.Tensor | None, probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``attention_softmax_grad`` (module docstring): ``kernels``' epilogue, then ATen's
    softmax backward written over ``probs`` (contiguous, CPU, autograd not recording)."""
    gp = _epilogue(kernels, grads, a_step, b_step, dtype)
    return torch._softmax_backward_data(gp, probs, -1, dtype, grad_input=probs)


# -- the native kernel ----------------------------------------------------------------------
def _warn(why: str, then: str | None = None) -> None:
    warnings.warn(f"lowbit: {why}; {then or 'the reference softmax runs instead'} (attention "
                  "softmax, lowbit.kernels.softmax)", RuntimeWarning, stacklevel=user_stacklevel())


@cbuild.once
@compiled.disable_tracing
def _library() -> ctypes.CDLL | None:
    """The loaded, self-tested library, or ``None`` (module docstring)."""
    # AVX-512 only: its AVX2 build (avx512_on_avx2.h, as the quantizer's) was measured slower
    # than the reference there (the text GPT's fqt-psq-8 step +4.5%; docs/benchmarks.md,
    # "lowbit's C kernels on AVX2 CPUs")
    if cbuild.switched_off("LOWBIT_SOFTMAX") or not avx512.cpu_has_avx512():
        return None
    with _disable_current_modes():
        return cbuild.load_tested(SOURCE, avx512.FLAGS, _SIGNATURES, _warn, "attention softmax kernel",
                                  _self_test, "the reference softmax")


def available() -> bool:
    """Whether the kernel can run here (AVX-512, a compiler, a passed self-test); builds and
    tests it on the first call."""
    return _library() is not None


def set_enabled(flag: bool) -> None:
    """Use the kernel where it applies (``True``, the default) or never (``False``: the
    reference runs; for tests and A/B benchmarks). Process-wide."""
    global _enabled
    _enabled = bool(flag)


def _steps_ok(scores: torch.Tensor, a_step: torch.Tensor | None, b_step: torch.Tensor | None) -> bool:
    b, lq, s = scores.shape
    if a_step is None or b_step is None:
        return a_step is None and b_step is None and scores.dtype == torch.float32
    return scores.dtype == torch.int32 and a_step.dtype == b_step.dtype == torch.float32 \
        and tuple(a_step.shape) in ((b, lq, 1), (1, 1, 1)) and tuple(b_step.shape) in ((b, 1, s), (1, 1, 1)) \
        and all(type(t) is torch.Tensor and t.layout == torch.strided and t.device.type == "cpu"
                and not (t.requires_grad and torch.is_grad_enabled()) and cbuild.plain_memory(t)
                for t in (a_step, b_step)) \
        and int8.safe_scales(a_step, b_step, 0)[0].dtype == torch.float32  # else: the reference, in float64


def _scores_ok(scores: torch.Tensor, dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and scores.dim() == 3 and scores.is_contiguous() \
        and avx512._readable(scores, (torch.int32, torch.float32))


def _mask_ok(mask: torch.Tensor | None, batch: int, lq: int, s: int) -> bool:
    if mask is None:
        return True
    return type(mask) is torch.Tensor and mask.dtype == torch.float32 and mask.device.type == "cpu" \
        and mask.layout == torch.strided and mask.dim() >= 3 and tuple(mask.shape[-2:]) == (lq, s) \
        and (s == 1 or mask.stride(-1) == 1) and mask.shape[:-2].numel() in (1, batch) \
        and not (mask.requires_grad and torch.is_grad_enabled()) and cbuild.plain_memory(mask)


def supports(kernels, scores: torch.Tensor, a_step: torch.Tensor | None,  # noqa: ANN001
             b_step: torch.Tensor | None, mask: torch.Tensor | None, masked: bool,
             dtype: torch.dtype) -> bool:
    """Whether :func:`run` takes this call (module docstring) and the kernel is available."""
    return _scores_ok(scores, dtype) and _steps_ok(scores, a_step, b_step) \
        and _mask_ok(mask, *scores.shape) and _enabled and available()


def supports_grad(kernels, grads: torch.Tensor, a_step: torch.Tensor | None,  # noqa: ANN001
                  b_step: torch.Tensor | None, probs: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether :func:`run_grad` takes this call: ``grads`` as :func:`run`'s scores,
    ``probs`` a contiguous float32 tensor of its shape."""
    return _scores_ok(grads, dtype) and _steps_ok(grads, a_step, b_step) \
        and probs.shape == grads.shape and probs.is_contiguous() \
        and avx512._readable(probs, (torch.float32,)) and _enabled and available()


def _step_args(a_step: torch.Tensor | None, b_step: torch.Tensor | None, s: int) -> tuple:
    """(sa, sa_stride, sb, sb_cols, sb_bstride, keep-alive tensors) for the C call."""
    if a_step is None:
        return None, 0, None, 0, 0, ()
    sa, sb = a_step.reshape(-1).contiguous(), b_step.reshape(-1).contiguous()
    cols = sb.numel() > 1
    return sa.data_ptr(), int(sa.numel() > 1), sb.data_ptr(), int(cols), s if cols else 0, (sa, sb)


def _mask_offsets(mask: torch.Tensor) -> torch.Tensor | None:
    """Each batch entry's element offset into ``mask`` (its (*lead) indices times
    strides), or None when one (L, S) mask serves every entry."""
    lead, strides = mask.shape[:-2], mask.stride()[:-2]
    if lead.numel() == 1:
        return None
    off = torch.zeros((), dtype=torch.int64)
    for n, st in zip(lead, strides):
        off = off.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st
    return off.reshape(-1).contiguous()


@compiled.disable_tracing
def _softmax(lib: ctypes.CDLL, scores: torch.Tensor, a_step: torch.Tensor | None, b_step: torch.Tensor | None,
             mask: torch.Tensor | None, masked: bool, threads: int) -> torch.Tensor:
    b, lq, s = scores.shape
    sa, sa_st, sb, sb_cols, sb_b, keep = _step_args(a_step, b_step, s)
    moff = None if mask is None else _mask_offsets(mask)
    lib.lowbit_attention_softmax(scores.data_ptr(), int(a_step is not None), b, lq, s, sa, sa_st, sb, sb_cols,
                                 sb_b, None if mask is None else mask.data_ptr(),
                                 None if moff is None else moff.data_ptr(),
                                 0 if mask is None else mask.stride(-2), int(masked), threads)
    torch.autograd.graph.increment_version(scores)  # written over through its pointer
    del keep
    return scores.view(torch.float32)


@compiled.disable_tracing
def _softmax_grad(lib: ctypes.CDLL, grads: torch.Tensor, a_step: torch.Tensor | None,
                  b_step: torch.Tensor | None, probs: torch.Tensor, threads: int) -> torch.Tensor:
    b, lq, s = grads.shape
    sa, sa_st, sb, sb_cols, sb_b, keep = _step_args(a_step, b_step, s)
    lib.lowbit_attention_softmax_grad(grads.data_ptr(), int(a_step is not None), b, lq, s, sa, sa_st, sb,
                                      sb_cols, sb_b, probs.data_ptr(), threads)
    torch.autograd.graph.increment_version(probs)  # written over through its pointer
    del keep
    return probs


def run(kernels, scores: torch.Tensor, a_step: torch.Tensor | None, b_step: torch.Tensor | None,  # noqa: ANN001
        mask: torch.Tensor | None, masked: bool, dtype: torch.dtype) -> torch.Tensor:
    """``attention_softmax`` on the kernel (the dispatcher's, after :func:`supports`):
    ``P`` (B, L, S) float32, written over ``scores``' bytes."""
    with scope("lowbit::avx512_softmax"):
        return _softmax(_library(), scores, a_step, b_step, mask, masked, torch.get_num_threads())


def run_grad(kernels, grads: torch.Tensor, a_step: torch.Tensor | None,  # noqa: ANN001
             b_step: torch.Tensor | None, probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``attention_softmax_grad`` on the kernel (after :func:`supports_grad`): ``∇S``
    written over ``probs``, returned."""
    with scope("lowbit::avx512_softmax_grad"):
        return _softmax_grad(_library(), grads, a_step, b_step, probs, torch.get_num_threads())


# -- self-test ------------------------------------------------------------------------------
def _close(got: torch.Tensor, want: torch.Tensor, atol: float = 1e-12) -> bool:
    """Equal NaN positions; elsewhere within 4e-6 relative plus ``atol`` absolute (for
    ``∇S``, which cancels: 1e-6 of the row quantities' magnitude). ``exp`` within 2 ulp,
    a 128-term sum re-ordered (a few ulp) and the reciprocal's rounding stay below 4e-6 ≈
    33 ulp of float32 with a wide margin; a wrong mask, step or row, or probabilities
    flushed to zero (above 1e-12), would be off by orders of magnitude."""
    nan = torch.isnan(want)
    if not torch.equal(nan, torch.isnan(got)):
        return False
    g, w = got.masked_fill(nan, 0).double(), want.masked_fill(nan, 0).double()
    return bool(((g - w).abs() <= 4e-6 * w.abs() + atol).all())


def _self_test(lib: ctypes.CDLL) -> bool:
    """The kernel against :func:`reference` / :func:`reference_grad` (module docstring)."""
    from . import Backend, kernels_for

    ref_k = kernels_for(Backend.REFERENCE, "cpu")
    cpu = {"dtype": torch.float32, "device": "cpu"}  # whatever torch's defaults are
    g = torch.Generator().manual_seed(4)
    for b, lq, s in ((3, 5, 19), (2, 33, 48), (1, 4, 1)):
        acc = torch.randint(-3000, 3000, (b, lq, s), generator=g, dtype=torch.int32, device="cpu")
        sa_r, sb_c = torch.rand(b, lq, 1, generator=g, **cpu) * 0.01, torch.rand(b, 1, s, generator=g, **cpu) * 0.01
        sa_t, sb_t = torch.full((1, 1, 1), 0.003, **cpu), torch.full((1, 1, 1), 0.002, **cpu)
        causal = torch.zeros(1, lq, s, **cpu).masked_fill(torch.ones(lq, s, dtype=torch.bool).tril().logical_not(),
                                                          float("-inf"))
        per_entry = torch.randn(b, 1, lq, s, generator=g, **cpu).expand(b, 2, lq, s)[:, :1]
        per_entry = per_entry.masked_fill(torch.rand(per_entry.shape, generator=g) < 0.3, float("-inf"))
        per_entry[0, 0, 1] = float("-inf")  # a dead row
        steps = [(sa_r, sb_c), (sa_t, sb_t), (sa_r, sb_t), (None, None)]
        bad = sa_r.clone()
        bad[0, 0, 0], bad[-1, -1, 0] = float("nan"), float("inf")
        steps.append((bad, sb_c))
        for sa, sb in steps:
            x = acc if sa is not None else acc.float() * 1e-3
            for mask, masked in ((None, False), (causal, False), (per_entry, True)):
                want = reference(ref_k, x.clone(), sa, sb, mask, masked, torch.float32)
                gp = torch.randn(x.shape, generator=g, **cpu) if sa is None else \
                    torch.randint(-3000, 3000, x.shape, generator=g, dtype=torch.int32, device="cpu")
                want_g = reference_grad(ref_k, gp.clone(), sa, sb, want.clone(), torch.float32)
                for threads in cbuild.test_threads(1, 2):
                    got = _softmax(lib, x.clone(), sa, sb, mask, masked, threads)
                    if not _close(got, want):
                        return False
                    got_g = _softmax_grad(lib, gp, sa, sb, want.clone(), threads)
                    scale = float(_epilogue(ref_k, gp.clone(), sa, sb, torch.float32).abs().nan_to_num(0, 0, 0).max())
                    if not _close(got_g, want_g, 1e-6 * scale):
                        return False
    return True


__all__ = ["add_mask", "available", "inplace_ok", "masked_softmax", "reference", "reference_grad", "run",
           "run_grad", "set_enabled", "supports", "supports_grad"]
