"""``lowbit.coverage`` on a CUDA device: checks what the CPU tests cannot.

On CUDA the backward runs on the autograd engine's device thread; this checks that the
tracer still sees every backward GEMM there and attributes it to its module, that the
integer path (``torch._int_mm`` needs M > 16 and K, N multiples of 8 on CUDA) is counted
as int8 in all three GEMMs, that ``torch._scaled_mm`` FP8 GEMMs count as fp8, and prints
the table of a Hugging Face GPT-2 when ``transformers`` is there. Exits 1 on a failed
check. Run on a GPU machine: ``python benchmarks/coverage_cuda.py``.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

import torch
from torch import nn

import lowbit
from lowbit.experiments.models import TinyGPT

FAILED: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAILED ") + what)
    if not ok:
        FAILED.append(what)


def main() -> int:
    dev = torch.device("cuda")
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).to(dev)
    lowbit.convert(mlp, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    x = torch.randn(64, 64, device=dev, requires_grad=True)
    rep = lowbit.coverage(mlp, x, loss_fn=lambda out: out.square().mean())
    print(rep)
    got = {(r.module, r.phase): (r.flops, r.kind) for r in rep.rows}
    want = {(m, p): (2 * 64 * i * o, "int8") for m, i, o in (("0", 64, 128), ("2", 128, 32))
            for p in ("forward", "grad_input", "grad_weight")}
    check(got == want, "MLP fqt-psq-8 on CUDA: all 6 GEMMs int8, exact FLOPs, modules and passes")

    gpt = TinyGPT(block_size=64, n_layer=2, n_head=4, n_embd=128).to(dev)
    lowbit.convert(gpt, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    idx = torch.randint(0, 256, (8, 64), device=dev)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        rep = lowbit.coverage(gpt, idx, idx)
    print(rep.table(by="type"))
    check(all(r.module != "(outside model)" for r in rep.rows),
          "TinyGPT on CUDA (bf16 autocast): every GEMM attributed to a module")
    check(all(r.kind == "int8" for r in rep.rows if r.module_type == "FQTLinear"),
          "TinyGPT on CUDA: every FQTLinear GEMM int8")

    class FP8(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(64, 32, device=dev))

        def forward(self, a: torch.Tensor) -> torch.Tensor:
            one = torch.ones((), device=dev)
            b = self.w.detach().to(torch.float8_e4m3fn).t()  # (32, 64), column-major
            y = torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)
            return y.float().sum() * 0 + self.w.sum()

    a = torch.randn(32, 32, device=dev).to(torch.float8_e4m3fn)
    rep = lowbit.coverage(FP8(), a)
    check([(r.op, r.kind, r.flops) for r in rep.rows] == [("aten._scaled_mm", "fp8", 2 * 32 * 32 * 64)],
          "torch._scaled_mm FP8 on CUDA counted as fp8")

    if importlib.util.find_spec("transformers") is not None:
        import transformers as T

        warnings.simplefilter("ignore")
        model = T.GPT2LMHeadModel(T.GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=1000,
                                               n_positions=64)).to(dev)
        lowbit.convert(model, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
        ids = torch.randint(0, 1000, (4, 64), device=dev)
        rep = lowbit.coverage(model, ids, model_kwargs={"labels": ids})
        print(rep.table(by="type"))
        check(rep.total_flops > 0 and all(r.module != "(outside model)" for r in rep.rows),
              "HF GPT-2 on CUDA: GEMMs seen and attributed")
    print(f"{len(FAILED)} failed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
