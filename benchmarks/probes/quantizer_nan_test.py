"""Probe: the compiled quantizer with the stored-code NaN rule written as ``nan_to_num``
(before 2026-12-01) against ``where(d == d, d, 0)`` (now), same process, same input.

Inductor lowered ``nan_to_num`` to a scalar ``std::isnan`` loop per 16-lane vector
(``TORCH_LOGS=output_code``); the comparison stays a vector compare. Codes are checked
``torch.equal`` before timing. docs/benchmarks.md "Predictions and outcomes" 11.

    python benchmarks/probes/quantizer_nan_test.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lowbit.formats import Granularity, Rounding, parse_format
from lowbit.kernels import Backend, compiled, kernels_for, reference


def _codes_nan_to_num(q: torch.Tensor, fmt) -> torch.Tensor:  # noqa: ANN001 (the old rule)
    if fmt.element is not None:
        return q.to(fmt.code_dtype)
    low = -fmt.zero_code if fmt.asymmetric else -fmt.emax
    high = low + fmt.emax if fmt.asymmetric else fmt.emax
    return (q - fmt.zero_code).nan_to_num(0.0).clamp(low, high).to(torch.int8)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="2048,4096")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    x = torch.randn(*map(int, a.shape.split(",")), generator=torch.Generator().manual_seed(0))
    k, fmt, seed = kernels_for(Backend.AUTO, "cpu"), parse_format("int8"), torch.tensor(12345)
    new = reference._codes
    for rounding, gran in ((Rounding.NEAREST, Granularity.TENSOR), (Rounding.STOCHASTIC, Granularity.ROW)):
        times, codes = {}, {}
        for name, rule in (("nan_to_num", _codes_nan_to_num), ("where", new)):
            reference._codes = rule
            compiled._compiled.clear()  # recompile with this rule
            f = lambda g=gran, r=rounding: k.quantize(x, fmt, g, r, seed)  # noqa: E731
            codes[name] = f().codes
            f()
            ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            times[name] = statistics.median(ts) * 1e3
        reference._codes = new
        assert torch.equal(codes["nan_to_num"], codes["where"])
        print(f"{rounding.value:10s} {gran.value:6s} {a.shape}: nan_to_num {times['nan_to_num']:.2f} ms, "
              f"where {times['where']:.2f} ms ({times['nan_to_num'] / times['where']:.2f}x)")


if __name__ == "__main__":
    main()
