"""A/B of one lowbit optimisation inside one process: the training step with it and with
it switched off, interleaved (``--rounds`` rounds, order alternating), medians.

Both variants are the same converted model; a toggle switches the optimisation between
timed blocks by patching lowbit at run time, so the machine's drift hits both alike.
Toggles (each is "on" as lowbit ships it):

  pair         both quantizations of ∇Y from one kernel (``lowbit.gradpair``), in Linear
               and convolution layers and attention (∇O, ∇S); off: the two quantizer calls apart
  materialize  no zero gradients filled for the block op's saved codes and steps; off:
               autograd fills them (the behaviour before issue 14)
  hadamard-fwht  the Hadamard transform as butterflies (``lowbit.quantizers.hadamard.fwht``),
               fused with the quantizer on lowbit's AVX-512 kernels (and ∇Y's column ranges:
               the pair); off: the transform before it, one batched GEMM with each block's
               ``H·diag(s)``, written out, then the quantizer, the ∇W side apart (values
               differ by float rounding)
  amx          int8 GEMMs of at least ``amx.MIN_MACS`` multiply-adds, and attention's
               batches of head products, on lowbit's AMX kernel (``lowbit.kernels.amx``);
               off: all on ``torch._int_mm`` (the same sums). Needs a CPU with AMX.
  avx512       integer quantizers on lowbit's AVX-512 kernel (``lowbit.kernels.avx512``);
               off: the compiled (Inductor) quantizer (the same codes). Needs AVX-512, or AVX2
               and F16C (the kernel's AVX2 build).
  avx512-epilogue  a convolution's epilogue (channels-last accumulator → NCHW product) on
               lowbit's AVX-512 kernel; off: the compiled epilogue (the same values)
  amx-batched  attention's per-head int8 products as one batched AMX call
               (``lowbit::int8_bmm``); off: one ``torch._int_mm`` per head (the same sums).
               Needs a CPU with AMX.
  avx512-place  a convolution's int8 codes placed channels-last (u8 + 128 for oneDNN, padded
               for ∇W, zero-inserted for ∇X) on lowbit's AVX-512 kernel; off: torch's
               strided copies, and oneDNN's own reorder of NCHW codes (the same values)
  avx512-epilogue-rows  a Linear's and attention's in-place epilogue (int32 accumulator →
               float32 product over it) on lowbit's AVX-512 kernel; off: the compiled
               epilogue (the same values)
  avx512-fp8   FP8 (E4M3/E5M2) quantizers on lowbit's AVX-512 kernel; off: the compiled
               quantizer (the same codes)
  workspace    large CPU temporaries (attention's ≥ 32 MB score accumulators) reused across
               calls (``lowbit.kernels.workspace``); off: a fresh mmap each time (the same
               values)
  grid-steps   the quantizers' steps from their absmax in one C call (``lowbit_grid_steps``);
               off: :func:`lowbit.formats.grid_step`'s torch ops (the same bits)
  bhq-groups   BHQ's groups built from the row ranges in one C call (``lowbit.kernels.bhq_groups``:
               the sort, prefix sums, memberships and the CSR index of the group sums); off:
               the torch reference and the CSR index by a stable sort (the same bits)
  bhq-sums     BHQ's group sums on the CPU as sequential row sums on lowbit's AVX-512 kernel
               (``lowbit.kernels.avx512.run_bhq_group_sums``); off: the sparse × dense product
               (scatter-add below 2¹⁹ elements) they were before (values differ by rounding)
  avx512-row-absmax  the row ranges BHQ's groups start from on lowbit's AVX-512 kernel; off: the
               compiled (Inductor) ``row_absmax`` from ``compiled.MIN_NUMEL`` elements on, the
               reference below (the same values)
  hadamard-heads  attention's Hadamard-quantized gradients whose blocks stay within each
               head run on the integer kernels, ``T⁻¹`` on the product's rows; off: ``T⁻¹``
               on the operand and one simulated (float) GEMM, as before (values differ by rounding)
  conv-grad-w  a convolution's ∇W-side gradient codes read from ∇Y in place when the ∇X
               side cannot share the pair (BHQ, Hadamard); off: ∇Y copied channel-major first
               (the same codes)
  attention-grad-w  the same for attention's ∇O and ∇S (each head's transpose quantized as
               it lies) where the ∇X side does not pair its columns (since 2026-12-06 BHQ
               and Hadamard do: a user's row-mixing quantizer); off: the transposed copies
               (∇S's made in its own memory, entry by entry; the same codes)
  bhq-inverse  BHQ's inverse on a GEMM's output on lowbit's AVX-512 kernel, written over that
               fresh output; off: the compiled inverse into a new tensor (the same values)
  bhq-epilogue-inverse  an integer GEMM's epilogue and BHQ's inverse of its rows in one pass
               (``lowbit_bhq_epilogue_inverse``: the ∇X products of Linear layers and
               attention); off: the epilogue, then the inverse with its group sums, two
               kernels (the same values)
  bhq-entry-threads  attention's BHQ groups built for the entries (heads) on torch's threads
               (``lowbit.kernels.bhq_groups``); off: on one thread (the same groups)
  vnni-batched  attention's per-head int8 products as one batched call of lowbit's AVX-512
               VNNI kernel (``lowbit.kernels.vnni``, op ``lowbit::int8_bmm``) on a CPU without
               AMX; off: one ``torch._int_mm`` per head (the same sums)
  malloc       glibc recycles freed blocks (``lowbit.allocator.keep_freed_memory``); off:
               glibc's steady-state defaults (blocks ≥ 32 MiB mapped fresh, freed memory
               trimmed: ``M_MMAP_THRESHOLD`` 32 MiB, ``M_TRIM_THRESHOLD`` 64 MiB, then
               ``malloc_trim(0)``). Affects every mode, baselines included: run it on each
  bias-pieces  a bf16/float16 ∇Y's bias gradient upcast in pieces
               (``lowbit.functional.BIAS_CHUNK``); off: one float32 copy of ∇Y (the bias
               sum in another order, equal to float32 rounding; the memory is
               ``bench_step.py``'s peak MB)
  gemm-panels  a bf16/float16 GEMM output by row panels of 2²⁰ elements of its int32
               accumulator, as lowbit ships it (with AMX, one packing of the right
               operand for all panels); off: one whole accumulator
               (``lowbit.kernels.int8.PANEL`` = 0; the same values)
  softmax      attention's scores epilogue, mask and softmax (and ∇P's epilogue with the
               softmax backward) as one AVX-512 pass each (``lowbit.kernels.softmax``);
               off: the compiled epilogue, the mask addition and ATen's softmax (equal to
               float rounding)

  attention-pieces  attention's forward (round-to-nearest P̃, no dropout) and backward
               (per-row gradient scales: PSQ) in pieces of ``lowbit.attention.CHUNK_SCORES``
               score elements: P formed, quantized and multiplied piece by piece (the
               forward per tensor after a first pass for P's absmax), ∇S likewise; off:
               the whole (B·H, L, S) P and ∇S first (the same bits)

  eager-block  a converted layer's block in plain eager mode called through an
               ``autograd.Function`` (``lowbit.ops._EagerBlock``); off: through the
               ``lowbit::block_forward`` custom op and the dispatcher (the same values)
  prepack-no-shape  oneDNN's int8 convolution weights prepacked without the input's shape
               (``lowbit.kernels.qconv.PREPACK_INPUT_SHAPE`` False); off: told the shape, as
               before (the same sums)
  shared-input  an eager block saves its input instead of its int8 codes where the autograd
               node that made it keeps it anyway (``lowbit.ops.SHARE_SAVED_INPUT``), its
               backward making the same codes again; off: the codes saved (the same values)
  conv-grad-w-pieces  a convolution's kernel-row ∇W over pieces of samples
               (``lowbit.kernels.im2col.ROWS_IN_PIECES``); off: the whole batch at once
               (the same sums)
  conv-grad-w-half-pieces  the kernel-row ∇W's (and the im2col GEMMs') pieces of samples
               with patches of at most half the placed input's bytes
               (``lowbit.kernels.im2col.PIECE_SHARE`` 2); off: at most all of them (1:
               half as many pieces; the same sums)
  conv-acc-pieces  a convolution's ∇X on oneDNN's int8 convolution (its result bf16/fp16)
               over pieces of samples, each piece's float32 accumulator written into the
               result before the next exists (``lowbit.conv.ACC_IN_PIECES``); off: one
               accumulator of the whole batch (the same values)
  conv-im2col-pieces  a convolution's im2col GEMMs (output and ∇X where oneDNN does not
               take them, e.g. K > 1023) and its scattered ∇X over pieces of samples
               (``lowbit.kernels.im2col.IM2COL_IN_PIECES``); off: the whole batch (the
               same values)
  conv-pieces  all three of the pieces above at once (conv-acc-pieces,
               conv-grad-w-half-pieces, conv-im2col-pieces)
  f32-pieces-batched  on the exact float32 route (a CPU without an int8 dot product), a long
               sum's pieces several to one ``torch.bmm`` (``lowbit.kernels.exact_f32.PIECES_FLOOR``);
               off: one ``torch.mm`` a piece (the same sums)
  f32-conv     on the exact float32 route, a convolution of codes (output, stride-1 ∇X, and
               stride-2 ∇X of zero-inserted codes where the kernel covers more than a stride
               cell, ``conv.zero_insert_pays``) as one float32 convolution on oneDNN
               (``lowbit.kernels.qconv.FLOAT32_CONV``); off: im2col and the route's GEMMs
               (the same sums; stride-2 ∇X then the scatter path, within its rounding)

    python benchmarks/bench_toggle.py pair --workload ffn --mode fqt-psq-8 --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import Bench, add_malloc_arg, apply_malloc, machine  # noqa: E402
from step_workloads import WORKLOADS  # noqa: E402


def _pair() -> Callable[[bool], None]:
    import lowbit.attention as attention
    import lowbit.conv as conv
    import lowbit.functional as functional

    real = functional.quantize_grad_pair

    def switch(on: bool) -> None:
        for m in (functional, conv, attention):  # Linear's, the convolutions' and attention's backward
            m.quantize_grad_pair = real if on else (lambda *a, **k: None)
    return switch


def _materialize() -> Callable[[bool], None]:
    import lowbit.ops as ops

    flag = {"skip": True}
    real = ops._setup_context

    def setup(ctx, inputs, output) -> None:  # noqa: ANN001
        real(ctx, inputs, output)
        ctx.set_materialize_grads(not flag["skip"])

    ops.block_forward.register_autograd(ops._backward, setup_context=setup)
    ops._setup_context = setup  # the eager path (lowbit.ops._EagerBlock) calls it too

    def switch(on: bool) -> None:
        flag["skip"] = on
    return switch


def _hadamard_fwht() -> Callable[[bool], None]:
    from lowbit.formats import compute_dtype
    from lowbit.quantizers import hadamard as had
    from lowbit.quantizers.base import RowTransform, row_absmax

    cls = had.BlockHadamard
    fwht = (cls.forward, cls.forward_quantize, cls.inverse)

    def gemm(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:  # noqa: ANN001
        """Before 2026-12-03: ``H·diag(s_k)`` per block as one batched GEMM."""
        n, d = x.shape
        blocks = x.reshape(n // self.block, self.block, d)
        if n and d and x.dtype == torch.float32:
            amax = row_absmax(x, self.kernels).reshape(-1, self.block).amax(dim=1)
            if bool((((amax > 0) & (amax < had._TINY)) | (amax > had._HUGE)).any()):
                blocks = blocks.double()
        dt = blocks.dtype
        m = had.hadamard_matrix(self.block, x.device).to(dt) * self.signs.reshape(-1, 1, self.block).to(dt)
        return torch.matmul(m.transpose(1, 2) if inverse else m, blocks).reshape(n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        x = x.to(compute_dtype(x.dtype))
        pad = self.signs.shape[0] - x.shape[0]
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        return gemm(self, x, inverse=False)

    def inverse(self, y: torch.Tensor, out_dtype: torch.dtype = torch.float32,  # noqa: ANN001
                overwrite: bool = False) -> torch.Tensor:
        return gemm(self, y.to(compute_dtype(y.dtype)), inverse=True)[: self.n_rows].to(out_dtype)

    def switch(on: bool) -> None:
        cls.forward, cls.forward_quantize, cls.inverse = fwht if on else (
            forward, RowTransform.forward_quantize, inverse)
        had.Hadamard.pairs_columns = on  # (off: no pair either, whose kernel runs the butterflies)
    return switch


def _amx() -> Callable[[bool], None]:
    from lowbit.kernels import amx

    if not amx.available():
        raise SystemExit("no AMX kernel on this machine (lowbit.kernels.amx.available() is False)")
    threshold = amx.MIN_MACS
    batched = _amx_batched()

    def switch(on: bool) -> None:
        amx.MIN_MACS = threshold if on else 1 << 62
        batched(on)
    return switch


def _avx512() -> Callable[[bool], None]:
    from lowbit.kernels import avx512

    why = avx512.in_use()
    if why:
        raise SystemExit(f"lowbit's C quantizer (AVX-512, or its AVX2 build) is not in use: {why}")
    return avx512.set_enabled


def _avx512_op(op: str, run: str, supports: str) -> Callable[[], Callable[[bool], None]]:
    """A toggle of one AVX-512 kernel-table row: off, the dispatcher skips it."""
    def make() -> Callable[[bool], None]:
        from lowbit.kernels import Impl, avx512, register

        _avx512()  # refuses where the kernel is not in use
        flag = {"on": True}
        check = getattr(avx512, supports)
        register(op, Impl.NATIVE, getattr(avx512, run), ("cpu",), lambda *a: flag["on"] and check(*a))

        def switch(on: bool) -> None:
            flag["on"] = on
        return switch
    return make


def _amx_batched() -> Callable[[bool], None]:
    from lowbit.kernels import amx, int8

    if not amx.available():
        raise SystemExit("lowbit's AMX kernel is not available on this machine")
    real = int8.int_mm_batched

    def per_head(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=torch.int32, device=a.device)
        return real(a, b, out)

    def switch(on: bool) -> None:
        int8.int_mm_batched = real if on else per_head
    return switch


def _grid_steps() -> Callable[[bool], None]:
    from lowbit.formats import Granularity, grid_step
    from lowbit.kernels import avx512

    _avx512()  # refuses where the kernel is not in use
    real = avx512._steps

    def torch_ops(lib, amax, fmt, granularity):  # noqa: ANN001, ANN202 (the code before)
        if granularity is Granularity.TENSOR:
            amax = amax.amax().reshape(1, 1)
        step = grid_step(amax, fmt.emax)
        return step, torch.where(amax == 0, torch.ones_like(step), step)

    def switch(on: bool) -> None:
        avx512._steps = real if on else torch_ops
    return switch


def _avx512_fp8() -> Callable[[bool], None]:
    from lowbit.kernels import avx512

    _avx512()  # refuses where the kernel is not in use
    if not avx512._fp8_tested():
        raise SystemExit("lowbit's AVX-512 FP8 rounding failed its self-test on this machine")
    real = avx512._grid

    def switch(on: bool) -> None:
        avx512._grid = real if on else (lambda fmt: 0 if avx512._kind(fmt) == 0 else None)
    return switch


def _workspace() -> Callable[[bool], None]:
    from lowbit.kernels import workspace

    return workspace.set_enabled


def _softmax() -> Callable[[bool], None]:
    from lowbit.kernels import softmax

    if not softmax.available():
        raise SystemExit("lowbit's AVX-512 softmax kernel is not available on this machine")
    return softmax.set_enabled


def _bhq_groups() -> Callable[[bool], None]:
    from lowbit.kernels import bhq_groups

    if not bhq_groups.available():
        raise SystemExit("lowbit's BHQ group kernel is not available on this machine (no C compiler?)")
    return bhq_groups.set_enabled


def _bhq_sums() -> Callable[[bool], None]:
    import lowbit.quantizers.bhq as bhq

    _avx512()  # refuses where the kernel is not in use

    def switch(on: bool) -> None:
        bhq.SEQUENTIAL_DEVICES = frozenset({"cpu"}) if on else frozenset()  # off: the product; the kernel refuses
    return switch


def _hadamard_heads() -> Callable[[bool], None]:
    from lowbit.quantizers import hadamard as had

    within = had.BlockHadamard.within_entries

    def switch(on: bool) -> None:
        had.BlockHadamard.within_entries = within if on else (lambda self, rows: False)
    return switch


def _grad_w(module: str) -> Callable[[], Callable[[bool], None]]:
    """A toggle of ``module``'s ∇W-side gradient codes read in place
    (``lowbit.gradpair.quantize_grad_w``); off: that call returns None, the copy runs."""
    def make() -> Callable[[bool], None]:
        import importlib

        mod = importlib.import_module(module)
        real = mod.quantize_grad_w

        def switch(on: bool) -> None:
            mod.quantize_grad_w = real if on else (lambda *a, **kw: None)
        return switch
    return make


def _bhq_inverse() -> Callable[[bool], None]:
    from lowbit.kernels import Impl, avx512, register

    if not avx512.available():
        raise SystemExit("lowbit's C quantizer (AVX-512, or its AVX2 build) is not available on this machine")

    def switch(on: bool) -> None:
        register("bhq_inverse", Impl.NATIVE, avx512.run_bhq_inverse, ("cpu",),
                 avx512.supports_bhq_inverse if on else (lambda *a: False))
    return switch


def _bhq_epilogue_inverse() -> Callable[[bool], None]:
    from lowbit.kernels import Impl, avx512, register
    from lowbit.quantizers import bhq

    if not avx512.available():
        raise SystemExit("lowbit's C quantizer (AVX-512, or its AVX2 build) is not available on this machine")
    native = bhq._native

    def switch(on: bool) -> None:
        register("bhq_epilogue_inverse", Impl.NATIVE, native(avx512.run_bhq_epilogue_inverse), ("cpu",),
                 native(avx512.supports_bhq_epilogue_inverse) if on else (lambda *a: False))
    return switch


def _bhq_entry_threads() -> Callable[[bool], None]:
    from lowbit.kernels import bhq_groups

    if not bhq_groups.available():
        raise SystemExit("lowbit's BHQ group kernel is not available on this machine (no C compiler?)")
    real = bhq_groups._entry_groups

    def switch(on: bool) -> None:
        bhq_groups._entry_groups = real if on else (lambda lib, lam, entries, dtype: real(lib, lam, entries, dtype, 1))
    return switch


def _vnni_batched() -> Callable[[bool], None]:
    from lowbit.kernels import amx, int8, vnni

    if amx.available() or not vnni.available():
        raise SystemExit("the VNNI toggle needs a CPU with AVX-512 VNNI and without AMX")
    real = int8.batched_kernel

    def switch(on: bool) -> None:
        int8.batched_kernel = real if on else (lambda k: False)
    return switch


def _malloc() -> Callable[[bool], None]:
    from lowbit import allocator

    libc = allocator._libc()
    if libc is None:
        raise SystemExit("the malloc toggle needs glibc")
    # glibc's <malloc.h>: M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3, M_MMAP_MAX -4
    def switch(on: bool) -> None:
        if on:
            allocator.keep_freed_memory()
            return
        for param, value in ((-4, 65536), (-3, 32 * 2**20), (-1, 64 * 2**20)):
            libc.mallopt(param, value)
        libc.malloc_trim(0)
    return switch


def _bias_pieces() -> Callable[[bool], None]:
    import lowbit.functional as functional

    chunk = functional.BIAS_CHUNK

    def switch(on: bool) -> None:
        functional.BIAS_CHUNK = chunk if on else 1 << 62  # one piece: the whole ∇Y
    return switch


def _prepack_no_shape() -> Callable[[bool], None]:
    from lowbit.kernels import qconv

    def switch(on: bool) -> None:
        qconv.PREPACK_INPUT_SHAPE = not on
    return switch


def _eager_block() -> Callable[[bool], None]:
    from lowbit import ops
    plain = ops._plain_eager

    def switch(on: bool) -> None:
        ops._plain_eager = plain if on else (lambda *_: False)
    return switch


def _shared_input() -> Callable[[bool], None]:
    """Off: a block saves its input's codes even where autograd keeps the input anyway
    (``lowbit.ops.SHARE_SAVED_INPUT``)."""
    from lowbit import ops

    def switch(on: bool) -> None:
        ops.SHARE_SAVED_INPUT = on
    return switch


def _conv_grad_w_pieces() -> Callable[[bool], None]:
    """Off: a convolution's kernel-row ∇W on the whole batch at once
    (``lowbit.kernels.im2col.ROWS_IN_PIECES``)."""
    from lowbit.kernels import im2col

    def switch(on: bool) -> None:
        im2col.ROWS_IN_PIECES = on
    return switch


def _conv_grad_w_half_pieces() -> Callable[[bool], None]:
    """Off: the kernel-row ∇W's pieces with patches up to the placed input's bytes
    (``lowbit.kernels.im2col.PIECE_SHARE`` 1)."""
    from lowbit.kernels import im2col

    def switch(on: bool) -> None:
        im2col.PIECE_SHARE = 2 if on else 1
    return switch


def _conv_acc_pieces() -> Callable[[bool], None]:
    """Off: oneDNN's convolutions on the whole batch at once (``lowbit.conv.ACC_IN_PIECES``)."""
    import lowbit.conv as conv

    def switch(on: bool) -> None:
        conv.ACC_IN_PIECES = on
    return switch


def _conv_im2col_pieces() -> Callable[[bool], None]:
    """Off: a convolution's im2col GEMMs and scatter on the whole batch
    (``lowbit.kernels.im2col.IM2COL_IN_PIECES``)."""
    from lowbit.kernels import im2col

    def switch(on: bool) -> None:
        im2col.IM2COL_IN_PIECES = on
    return switch


def _conv_pieces() -> Callable[[bool], None]:
    """Off: every convolution piece switch above off at once."""
    switches = (_conv_acc_pieces(), _conv_grad_w_half_pieces(), _conv_im2col_pieces())

    def switch(on: bool) -> None:
        for s in switches:
            s(on)
    return switch


def _attention_pieces() -> Callable[[bool], None]:
    import lowbit.attention as attention

    ok, forward_ok = attention._in_pieces_ok, attention._forward_in_pieces_ok

    def switch(on: bool) -> None:
        attention._in_pieces_ok = ok if on else (lambda *_: False)
        attention._forward_in_pieces_ok = forward_ok if on else (lambda *_: False)
    return switch


def _f32_pieces_batched() -> Callable[[bool], None]:
    """Off: a long sum's pieces on the exact float32 route one ``torch.mm`` each
    (``lowbit.kernels.exact_f32.PIECES_FLOOR`` 0)."""
    from lowbit.kernels import exact_f32

    floor = exact_f32.PIECES_FLOOR

    def switch(on: bool) -> None:
        exact_f32.PIECES_FLOOR = floor if on else 0
    return switch


def _f32_conv() -> Callable[[bool], None]:
    """Off: convolutions of codes on the float32 route as im2col and float32 GEMMs of
    pieces, not one float32 convolution (``lowbit.kernels.qconv.FLOAT32_CONV``)."""
    from lowbit.kernels import qconv

    def switch(on: bool) -> None:
        qconv.FLOAT32_CONV = on
    return switch


def _gemm_panels() -> Callable[[bool], None]:
    from lowbit.kernels import int8

    def switch(on: bool) -> None:
        int8.PANEL = 1 << 20 if on else 0
    return switch


TOGGLES: dict[str, Callable[[], Callable[[bool], None]]] = {
    "pair": _pair, "materialize": _materialize, "hadamard-fwht": _hadamard_fwht, "amx": _amx,
    "amx-batched": _amx_batched,
    "avx512": _avx512,
    "avx512-epilogue": _avx512_op("int8_epilogue_nchw", "run_epilogue_nchw", "supports_epilogue_nchw"),
    "avx512-place": _avx512_op("int8_place_nhwc", "run_place_nhwc", "supports_place_nhwc"),
    "avx512-epilogue-rows": _avx512_op("int8_epilogue_into", "run_epilogue_into", "supports_epilogue_into"),
    "softmax": _softmax, "grid-steps": _grid_steps, "avx512-fp8": _avx512_fp8,
    "workspace": _workspace, "bhq-groups": _bhq_groups, "bhq-sums": _bhq_sums,
    "avx512-row-absmax": _avx512_op("row_absmax", "run_row_absmax", "supports_row_absmax"),
    "hadamard-heads": _hadamard_heads, "conv-grad-w": _grad_w("lowbit.conv"),
    "attention-grad-w": _grad_w("lowbit.attention"),
    "bhq-inverse": _bhq_inverse, "bhq-epilogue-inverse": _bhq_epilogue_inverse, "bhq-entry-threads": _bhq_entry_threads, "malloc": _malloc,
    "vnni-batched": _vnni_batched, "bias-pieces": _bias_pieces, "prepack-no-shape": _prepack_no_shape,
    "gemm-panels": _gemm_panels, "eager-block": _eager_block, "attention-pieces": _attention_pieces,
    "shared-input": _shared_input, "conv-grad-w-pieces": _conv_grad_w_pieces,
    "conv-acc-pieces": _conv_acc_pieces, "conv-grad-w-half-pieces": _conv_grad_w_half_pieces,
    "conv-im2col-pieces": _conv_im2col_pieces, "conv-pieces": _conv_pieces,
    "f32-pieces-batched": _f32_pieces_batched, "f32-conv": _f32_conv}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("toggle", choices=sorted(TOGGLES))
    p.add_argument("--workload", default="ffn", choices=WORKLOADS)
    p.add_argument("--mode", default="fqt-psq-8")
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    add_malloc_arg(p)
    a = p.parse_args(argv)
    malloc = apply_malloc(a.malloc)
    torch.set_num_threads(a.threads)
    header = machine()
    switch = TOGGLES[a.toggle]()
    b = Bench(a.workload, a.mode, a.size)
    times: dict[bool, list[float]] = {True: [], False: []}
    for on in (True, False):
        switch(on)
        for _ in range(a.warmup):
            b.step()
    for r in range(a.rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):
            switch(on)
            b.times = []
            b.timed(a.steps)
            times[on] += b.times
    switch(True)
    t_on, t_off = (statistics.median(times[v]) * 1e3 for v in (True, False))
    print(f"{header}; {a.threads} threads, {malloc}; {a.workload} {a.mode}, {a.toggle}: on {t_on:.1f} ms, "
          f"off {t_off:.1f} ms ({(t_on - t_off) / t_off:+.1%}); medians of {a.rounds} rounds × "
          f"{a.steps} steps each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
