"""Probe (docs/benchmarks.md, "BHQ group by group"): BHQ's group-by-group C kernels on the
text GPT step's own gradients, against the ops they replace, each pair checked bit for bit.

The operands are captured from a ``fqt-bhq-8`` step of ``bench_step``'s ``gpt`` workload
(one of each shape): a linear layer's ``∇Y`` with its transform, and the products BHQ's
inverse undoes. Per shape, medians of 21 calls, hot (the same call repeated) and cold (a
64 MB write between calls, so the operand comes from memory as in a step):

* the pair: the separate ops (native group sums, ``bhq_forward_quantize`` and the column
  quantizer, as before 2026-12-06) against ``run_bhq_quantize_pair`` (one group-by-group
  pass for the rows' codes and the columns' ranges, then the columns' codes);
* the inverse: the group sums then ``bhq_inverse`` against ``run_bhq_sums_inverse``.

    python benchmarks/probes/bhq_group_kernels.py --threads 2
"""

import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _timing import median_ms, start  # noqa: E402
from bench_step import Bench  # noqa: E402

from lowbit import allocator  # noqa: E402
from lowbit.formats import Granularity, Rounding, parse_format  # noqa: E402
from lowbit.kernels import Backend, Impl, avx512, kernels_for, register  # noqa: E402
from lowbit.quantizers import bhq  # noqa: E402


def capture() -> tuple[dict, dict]:
    """One step's operands: ``∇Y`` with its transform by shape, and the inverse's ``y``
    with its transform by shape."""
    pairs: dict = {}
    inverses: dict = {}
    real_pair, real_inv = bhq.BlockHouseholder.forward_quantize_pair, bhq.BlockHouseholder.inverse

    def pair(self, x, *args):  # noqa: ANN001, ANN002, ANN202
        pairs.setdefault(tuple(x.shape), (x.clone(), self))
        return real_pair(self, x, *args)

    def inverse(self, y, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        inverses.setdefault(tuple(y.shape), (y.clone(), self))
        return real_inv(self, y, *args, **kw)

    bhq.BlockHouseholder.forward_quantize_pair, bhq.BlockHouseholder.inverse = pair, inverse
    try:
        b = Bench("gpt", "fqt-bhq-8", "full")
        for _ in range(2):
            b.step()
    finally:
        bhq.BlockHouseholder.forward_quantize_pair, bhq.BlockHouseholder.inverse = real_pair, real_inv
    return pairs, inverses


def main() -> None:
    start(__doc__)
    allocator.keep_freed_memory()
    k = kernels_for(Backend.AUTO, "cpu")
    flush = torch.zeros(16 << 20)
    pairs, inverses = capture()
    int8 = parse_format("int8")
    rnd = Rounding.STOCHASTIC

    def timed(f):  # noqa: ANN001, ANN202
        def cold() -> object:
            flush.add_(1.0)
            return f()
        return median_ms(f, 21), median_ms(cold, 21) - median_ms(lambda: flush.add_(1.0), 21)

    print("| operand | groups | pair: separate ops / one kernel, hot ms | cold ms |")
    print("|---|---|---|---|")
    rows_kernel = k.lookup("bhq_quantize", Impl.NATIVE)
    for shape, (x, t) in sorted(pairs.items()):
        args = (x, t, int8, Granularity.ROW, rnd, torch.tensor(5), int8, Granularity.ROW, rnd, torch.tensor(6))
        fused = functools.partial(avx512.run_bhq_quantize_pair, *args)
        separate = functools.partial(bhq._forward_quantize_pair, k, *args)
        register("bhq_quantize", Impl.NATIVE, rows_kernel.fn, ("cpu",), lambda *a: False)  # the ops before
        try:
            assert all(avx512._same(u, w) for u, w in zip(fused(), separate()) if u is not None)
            (hs, cs), (hf, cf) = timed(separate), timed(fused)
        finally:
            register("bhq_quantize", Impl.NATIVE, rows_kernel.fn, ("cpu",), rows_kernel.supports)
        print(f"| ∇Y {shape[0]} × {shape[1]} | {t.n_groups} | {hs:.3f} / {hf:.3f} | {cs:.3f} / {cf:.3f} |")
    for shape, (y, t) in sorted(inverses.items()):
        if shape[0] < 100:
            continue
        fused = functools.partial(avx512.run_bhq_sums_inverse, y, t.v, t.scale, t, torch.float32)
        separate = functools.partial(bhq._sums_inverse, k, y, t.v, t.scale, t, torch.float32)
        assert avx512._same(fused(), separate())
        (hs, cs), (hf, cf) = timed(separate), timed(fused)
        print(f"| T⁻¹ of {shape[0]} × {shape[1]} | {t.n_groups} | {hs:.3f} / {hf:.3f} | {cs:.3f} / {cf:.3f} |")


if __name__ == "__main__":
    main()
