"""torch.compile and lowbit: a converted model compiles like the unconverted one (same
graphs, no graph break, no recompile per layer) and gives bitwise the eager results;
lowbit's own compiled kernels leave dynamo's global settings alone and never fall back to
eager silently, even with many layer shapes."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from conftest import int_codes, int_codes_fixed

import lowbit
from lowbit import FQTConfig, OperandSpec
from lowbit.kernels import avx512, compiled, reference

ROOT = Path(__file__).resolve().parents[2]
needs_compile = pytest.mark.skipif(not compiled.working(), reason="torch.compile disabled "
                                   "(LOWBIT_COMPILE=0) or failed in this process")


def dilated(n: int = 70, c: int = 3) -> nn.Module:
    """``n`` convolutions of distinct (kernel, dilation, padding) settings, then a Linear."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(n):
        k, d = 1 + 2 * (i % 3), 1 + i % 7 + 7 * (i // 21)
        layers += [nn.Conv2d(c, c, k, padding=d * (k // 2), dilation=d), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 8 * 8, 5))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(inplace=True),
                         nn.Linear(32, 5))


class InvertedResidual(nn.Module):
    """A MobileNetV3 block: 1×1 expand, depthwise 3×3, squeeze-excite, 1×1 project."""

    def __init__(self, c: int, e: int) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False),
                                nn.BatchNorm2d(e), nn.Hardswish())
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(e, e // 4, 1), nn.ReLU(inplace=True),
                                nn.Conv2d(e // 4, e, 1), nn.Hardsigmoid())
        self.project = nn.Sequential(nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw(self.expand(x))
        return x + self.project(h * self.se(h))


def mobilenet_v3_like() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Hardswish(),
                         *[InvertedResidual(8, e) for e in (16, 24, 32)],
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


MODELS = {"mlp": (mlp, (6, 12)), "cnn": (cnn, (4, 3, 8, 8)), "dilated70": (dilated, (2, 3, 8, 8)),
          "mobilenet_v3_like": (mobilenet_v3_like, (2, 3, 16, 16))}


def sr_forward(recipe: str) -> FQTConfig:
    cfg = FQTConfig.from_recipe(recipe, seed=0)
    return dataclasses.replace(cfg, activation=OperandSpec(8, rounding="stochastic"))


def train_step(model: nn.Module, run: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = run(xi)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [y.detach(), xi.grad] + [p.grad for p in model.parameters()]


# -- item 16: a converted model compiles like the unconverted one ---------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_converted_model_traces_into_the_same_single_graph(name: str) -> None:
    build, shape = MODELS[name]
    x = torch.randn(shape)
    plain = torch._dynamo.explain(build())(x)
    model = lowbit.convert(build(), FQTConfig.from_recipe("fqt-bhq-4", seed=0))
    conv = torch._dynamo.explain(model)(x)
    assert (plain.graph_count, plain.graph_break_count) == (1, 0)
    assert (conv.graph_count, conv.graph_break_count) == (1, 0), conv.break_reasons
    n_layers = len(lowbit.fqt_layers(model))
    calls = [n for g in conv.graphs for n in g.graph.nodes
             if n.op == "call_function" and "block_forward" in str(n.target)]
    assert len(calls) == n_layers  # one opaque op per converted layer


@needs_compile
@pytest.mark.parametrize("recipe", ["fqt-psq-8", "sr-forward:fqt-hadamard-4", "channels-last:fqt-psq-8"])
def test_compiled_training_is_bitwise_eager_without_recompiles(recipe: str) -> None:
    cfg = sr_forward(recipe.split(":")[1]) if recipe.startswith("sr-forward") else \
        FQTConfig.from_recipe(recipe.split(":")[-1], seed=0)
    # channels-last: the ops' fake outputs carry the real ones' strides (Y and ∇X channels-last)
    layout = torch.channels_last if recipe.startswith("channels-last") else torch.contiguous_format

    # Linear and Conv2d layers in one model. Its float ops are ReLU and reshapes, which
    # Inductor computes exactly; a GELU would differ from eager by float rounding (as it
    # does in the unconverted model), and so would everything downstream of it.
    def both() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding="same"), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.Flatten(),
                             nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 5))

    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=layout)
    eager = lowbit.convert(both().to(memory_format=layout), cfg)
    model = lowbit.convert(both().to(memory_format=layout), cfg)
    run = torch.compile(model)
    torch._dynamo.reset()
    counters.clear()
    for step in range(2):  # the second step: new noise (counter 1), no recompile
        torch.manual_seed(step)
        want = train_step(eager, eager, x)
        torch.manual_seed(step)
        got = train_step(model, run, x)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)), f"step {step}"
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1
    assert eager[0].noise.counter == model[0].noise.counter == 2


def _gpt(n_layer: int, cfg: FQTConfig) -> nn.Module:
    from lowbit.config import with_bits
    from lowbit.experiments.models import build_model

    torch.manual_seed(0)
    model = lowbit.convert(build_model("text", "gpt", n_layer=n_layer, n_embd=16, n_head=2, block_size=8), cfg)
    # one layer quantizes ∇X on 4 bits: a frame that served every layer with one layer's
    # state would give its gradients the wrong width (as well as another layer's noise)
    model.blocks[0].mlp[0].config = dataclasses.replace(cfg, grad_input=with_bits(cfg.grad_input, 4))
    return model


@needs_compile
def test_a_transformer_with_lowbit_attention_compiles_once_not_once_per_layer() -> None:
    """Converted attention runs eagerly between compiled graphs (graph breaks), so the code
    after each break is one frame that every transformer block runs. The layer ops took
    each block's handle as a string constant, and dynamo guarded on it: the frame compiled
    once per layer (a new user's trial: a 10-layer model traced 28 graphs and hit dynamo's
    recompile limit, past which the layers ran eagerly). The ops now take the state as a
    tensor (``BlockState.ident``) and a trace key shared by equal configs: the graphs do
    not grow with depth, and each layer still reads its own state — its own noise and
    widths — so compiled training (``aot_eager``: eager kernels) is bitwise eager."""
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=0)
    x = torch.randint(0, 64, (2, 8))

    def loss_grads(model: nn.Module, run: nn.Module) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        out = run(x)
        out = out[0] if isinstance(out, tuple) else out
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return [out.detach()] + [p.grad for p in model.parameters()]

    graphs = {}
    for n_layer in (2, 6):
        eager, model = _gpt(n_layer, cfg), _gpt(n_layer, cfg)
        run = torch.compile(model, backend="aot_eager")
        torch._dynamo.reset()
        counters.clear()
        for step in range(2):
            torch.manual_seed(step)
            want = loss_grads(eager, eager)
            torch.manual_seed(step)
            got = loss_grads(model, run)
            assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)), (n_layer, step)
        graphs[n_layer] = counters["stats"]["unique_graphs"]
    assert graphs[6] == graphs[2], graphs  # not one more graph per layer


@needs_compile
def test_a_compiled_model_follows_a_new_forward_format_after_convert() -> None:
    """A compiled model kept the forward formats it was traced with (block sizes, the fake
    kernel's shapes): converted again from MXFP4 to NVFP4 it gave wrong ∇W silently under
    ``aot_eager`` (Inductor crashed). A config change in the forward specs or backend now
    gives the block a new ident and trace key, so the compiled graph is traced again;
    gradient-only changes (QAT twins, adaptive widths) keep them."""
    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(8, 64)
    model = lowbit.convert(mlp(), FQTConfig.from_recipe("fqt-psq-mxfp4", seed=0))
    run = torch.compile(model, backend="aot_eager")
    train_step(model, run, x)
    ident, key = model[0]._block.ident, model[0]._block.trace_key
    lowbit.convert(model, dataclasses.replace(FQTConfig.from_recipe("fqt-psq-mxfp4", seed=0), grad_weight=None))
    # gradient specs only: the trace stays valid
    assert model[0]._block.ident is ident and model[0]._block.trace_key == key
    lowbit.convert(model, FQTConfig.from_recipe("fqt-psq-nvfp4", seed=0))
    assert not torch.equal(model[0]._block.ident, ident) and model[0]._block.trace_key != key
    eager = lowbit.convert(mlp(), FQTConfig.from_recipe("fqt-psq-nvfp4", seed=0))
    lowbit.load_rng_state(eager, lowbit.rng_state(model))  # the same noise step
    got, want = train_step(model, run, x), train_step(eager, eager, x)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_compiled_model_with_checkpointing_matches_eager() -> None:
    """torch.compile's recompute of a checkpointed region sees the original noise too."""
    from torch.utils.checkpoint import checkpoint

    class Ckpt(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return checkpoint(self.inner, x, use_reentrant=False)

    x = torch.randn(6, 12)
    cfg = sr_forward("fqt-psq-4")
    eager = lowbit.convert(mlp(), cfg)
    model = lowbit.convert(mlp(), cfg)
    run = torch.compile(Ckpt(model), backend="aot_eager")  # AOT's partitioner decides recompute
    torch.manual_seed(3)
    want = train_step(eager, eager, x)
    torch.manual_seed(3)
    got = train_step(model, run, x)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


# -- item 15: lowbit's kernels change no global setting and do not fall back silently -------
def _config_snapshot() -> dict:
    import torch._inductor.config as inductor_config

    return {"dynamo": torch._dynamo.config.get_config_copy(),
            "inductor": inductor_config.get_config_copy()}


@needs_compile
def test_every_kernel_leaves_dynamo_config_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    before = copy.deepcopy(_config_snapshot())
    monkeypatch.setattr(compiled, "MIN_NUMEL", 0)  # every kernel through torch.compile
    monkeypatch.setattr(avx512, "_enabled", False)  # the compiled kernels, not the C quantizer
    x = torch.randn(16, 40)
    seed = torch.tensor(7, dtype=torch.int64)
    int_codes(x, 7, True, True, seed, fused=True)
    int_codes_fixed(x, x.abs().amax().reshape(1, 1), 7, True, seed, fused=True)
    compiled.run("int8_epilogue", reference.int8_epilogue,
                 torch.randint(-99, 99, (16, 8), dtype=torch.int32), torch.rand(16, 1),
                 torch.rand(1, 8), None, None, None, None, 0, None, torch.float32)
    for recipe in ("fqt-bhq-4", "fqt-hadamard-4", "fqt-psq-4-predicted"):  # row_absmax, BHQ's
        model = lowbit.convert(mlp(), FQTConfig.from_recipe(recipe, seed=0))  # fused kernels,
        for _ in range(2):  # the fixed-grid quantizer once ranges are predicted
            train_step(model, model, torch.randn(64, 12))
    assert {k for k in compiled._compiled} >= {"quantize", "quantize_fixed",
                                               "int8_epilogue", "row_absmax",
                                               "bhq_forward_quantize", "bhq_inverse"}
    assert compiled.failure() is None
    assert _config_snapshot() == before


@needs_compile
def test_kernels_compile_each_variant_once_on_many_layer_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "MIN_NUMEL", 0)
    monkeypatch.setattr(avx512, "_enabled", False)  # the compiled kernels, not the C quantizer
    # fresh variants: one compiled by an earlier test at much larger sizes may be
    # recompiled here for Inductor's size-dependent choices (split reductions), which is
    # not what this test is about
    monkeypatch.setattr(compiled, "_compiled", {})
    model = lowbit.convert(dilated(), FQTConfig.from_recipe("fqt-psq-8", seed=0))
    graphs, variants = counters["stats"]["unique_graphs"], compiled.variant_count()
    with warnings.catch_warnings():
        # lowbit's fallback warning fails the test (not every warning: torch's own
        # deprecation warnings, raised inside Inductor's first compile, would then break it)
        warnings.filterwarnings("error", message="lowbit: torch.compile failed")
        for batch in (2, 3):
            train_step(model, model, torch.randn(batch, 3, 8, 8))
        # the same kernels called from inside a compiled model (another dispatch context)
        train_step(model, torch.compile(model, backend="aot_eager"), torch.randn(2, 3, 8, 8))
    assert compiled.failure() is None
    new_graphs = counters["stats"]["unique_graphs"] - graphs
    # every compiled graph is the model's (one) or the first of a new kernel variant: no
    # variant recompiled (so none can reach dynamo's recompile limit and run eagerly)
    assert new_graphs == 1 + compiled.variant_count() - variants


# -- the benchmark that measures first-step time (docs/benchmarks.md) runs ------------------
def test_bench_compile_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_compile", ROOT / "benchmarks" / "bench_compile.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_compile"] = bench
    spec.loader.exec_module(bench)
    assert bench.main(["--size", "tiny", "--inprocess", "--steps", "1", "--backend", "eager",
                       "--workload", "mlp,dilated"]) == 0
    text = capsys.readouterr().out
    for mode in bench.MODES:
        assert f"| mlp | {mode} | 1 (0) |" in text and f"| dilated | {mode} | 1 (0) |" in text


def test_equal_sizes_are_a_variant_not_a_recompile(monkeypatch: pytest.MonkeyPatch) -> None:
    # dynamo's duck sizing makes sizes equal at the first call one symbol: a square
    # operand, then a wide one, recompiled the variant (toward dynamo's recompile limit)
    from lowbit.functional import quantize_forward

    monkeypatch.setattr(compiled, "MIN_NUMEL", 0)
    monkeypatch.setattr(avx512, "_enabled", False)  # the compiled kernels, not the C quantizer
    monkeypatch.setattr(compiled, "_compiled", {})
    graphs = counters["stats"]["unique_graphs"]
    for shape in [(16, 16), (16, 32), (24, 24), (40, 24)]:
        quantize_forward(torch.randn(*shape), OperandSpec())
    assert compiled.variant_count() == 2  # (a, a) and (a, b) size patterns
    assert counters["stats"]["unique_graphs"] - graphs == 2  # each compiled once


def test_a_compiler_failure_keeps_the_c_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel variant that fails to compile runs eagerly (same results) and the others
    stay compiled; a second failure before anything compiled (a missing compiler fails
    every variant) makes all compiled kernels run eagerly, reported once; neither switches
    off the native C kernels, and ``avx512.in_use()`` does not blame ``LOWBIT_COMPILE``
    for it. Once a variant has compiled, failures stay their variant's, however many
    (a review: float64 block formats fail in several size patterns)."""
    from torch._dynamo.exc import TorchDynamoException

    from lowbit.formats import IntFormat, Rounding
    from lowbit.kernels import _TABLE, Impl, Kernel, kernels_for
    from lowbit.quantizers import Granularity

    def broken(fn, **kwargs):  # what a machine without a working C++ compiler gives
        def call(*args):
            raise TorchDynamoException("no C++ compiler")
        return call

    monkeypatch.setattr(compiled, "_failure", None)
    monkeypatch.setattr(compiled, "_variant_failures", [])
    monkeypatch.setattr(compiled, "_compiled_once", False)
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(torch, "compile", broken)
    x = torch.randn(64, 1024)  # above MIN_NUMEL
    args = (torch.randint(-99, 99, (64, 8), dtype=torch.int32), torch.rand(64, 1),
            torch.rand(1, 8), None, None, None, None, 0, None, torch.float32)
    with pytest.warns(UserWarning, match=r"no C\+\+ compiler.*that kernel variant runs eagerly"):
        out = compiled.run("int8_epilogue", reference.int8_epilogue, *args)
    assert compiled.failure() is None and compiled.working()  # one variant: the others stay compiled
    with pytest.warns(UserWarning, match=r"no C\+\+ compiler.*C kernels are unaffected"):
        out = compiled.run("int8_epilogue", reference.int8_epilogue, *args[:-1], torch.float64)  # another variant
    torch.testing.assert_close(out, reference.int8_epilogue(*args[:-1], torch.float64), rtol=0, atol=0)
    assert "int8_epilogue" in compiled.failure() and "no C++ compiler" in compiled.failure()
    assert compiled.enabled() and not compiled.working() and not compiled.use_for(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once
        compiled.run("int8_epilogue", reference.int8_epilogue, *args)
    k = kernels_for("auto", "cpu")
    assert k.fused  # the native kernels stay allowed
    if avx512.available():
        assert avx512.in_use() is None
        calls = []
        native = _TABLE[("quantize", Impl.NATIVE, "cpu")]
        spy = Kernel(lambda *a: calls.append(1) or native.fn(*a), native.supports)
        monkeypatch.setitem(_TABLE, ("quantize", Impl.NATIVE, "cpu"), spy)
        k.quantize(x, IntFormat(8), Granularity.ROW, Rounding.STOCHASTIC,
                   torch.tensor(3, dtype=torch.int64))
        assert calls == [1]
    # once a variant has compiled, failures stay their variant's, however many
    monkeypatch.setattr(compiled, "_failure", None)
    monkeypatch.setattr(compiled, "_variant_failures", [])
    monkeypatch.setattr(compiled, "_compiled_once", True)
    monkeypatch.setattr(compiled, "_compiled", {})
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        with pytest.warns(UserWarning, match="that kernel variant runs eagerly"):
            compiled.run("int8_epilogue", reference.int8_epilogue, *args[:-1], dtype)
    assert compiled.failure() is None and compiled.working() and len(compiled.variant_failures()) == 3


@pytest.mark.parametrize("compile_flag", ["0", "1"])
def test_lowbit_imports_and_trains_where_torchs_compiler_cannot_import(
        tmp_path: Path, compile_flag: str) -> None:
    """An unusable ``TORCHINDUCTOR_CACHE_DIR`` (here: below a file) makes importing
    ``torch._dynamo`` raise; lowbit still imports and runs forward and backward (with or
    without ``LOWBIT_COMPILE``), warns once naming the variable, records it as the compiler
    failure, and keeps its C kernels where compiling was allowed. torch's optimizers import
    dynamo themselves: they raise torch's own error naming the directory (not an
    unrelated AssertionError left by an import lowbit swallowed)."""
    import subprocess

    blocker = tmp_path / "file"
    blocker.write_text("")
    code = (
        "import warnings, torch, lowbit\n"
        "from lowbit.kernels import avx512, compiled\n"
        "m = lowbit.convert(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(),\n"
        "    torch.nn.Linear(256, 4)), lowbit.FQTConfig.from_recipe('fqt-psq-8', seed=0))\n"
        "m(torch.randn(512, 256)).square().mean().backward()\n"
        "assert all(p.grad.isfinite().all() for p in m.parameters())\n"
        "print('FAILURE', compiled.failure())\n"
        "print('NATIVE', avx512.in_use() is None, avx512.available())\n"
        "import lowbit.optim, lowbit.experiments.report  # lowbit's optimizers: no dynamo import\n"
        "try:\n"
        "    torch.optim.SGD(m.parameters(), lr=0.1)\n"
        "except Exception as exc:\n"
        "    print('OPTIM', type(exc).__name__, exc)\n")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(blocker / "cache"),
           "LOWBIT_COMPILE": compile_flag}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("torch's compiler cannot be imported") == 1, out.stderr[-3000:]
    assert f"FAILURE torch's compiler cannot be imported (TORCHINDUCTOR_CACHE_DIR={blocker}/cache: " \
           f"{blocker} is not a directory)" in out.stdout
    assert f"OPTIM NotADirectoryError [Errno 20] Not a directory: '{blocker}/cache'" in out.stdout
    native, available = out.stdout.split("NATIVE ")[1].splitlines()[0].split()
    if compile_flag == "1" and os.environ.get("LOWBIT_AVX512", "1") != "0":
        assert native == available  # the C quantizer runs wherever it can


def test_disable_tracing_without_a_reason_argument_still_disables(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: ``torch.compiler.disable(reason=…)`` exists from torch 2.8; before it the
    ``TypeError`` was read as the compiler failing to import, and every later function was
    left undisabled with lowbit's compiled kernels running eagerly. Without the argument,
    the function is disabled and nothing is recorded as a failure."""
    real = torch.compiler.disable
    seen = []

    def old_disable(fn=None, recursive=True):  # noqa: ANN001, ANN202 - torch 2.4–2.7's signature
        seen.append(fn)
        return real(fn, recursive)

    monkeypatch.setattr(torch.compiler, "disable", old_disable)
    before = compiled.failure()

    def f(x: torch.Tensor) -> torch.Tensor:
        return x + 1

    g = compiled.disable_tracing(f)
    assert seen == [f] and g is not f and compiled.failure() == before
    assert torch.equal(g(torch.ones(2)), torch.full((2,), 2.0))


def test_a_user_dispatch_mode_runs_the_compiled_kernels_eagerly() -> None:
    """A new user's trial (README fault kind 258): lowbit's attention (operands of at least
    ``compiled.MIN_NUMEL`` elements: the compiled kernels) under torch's ``FlopCounterMode``
    or any user ``TorchDispatchMode`` raised ``RuntimeError: … found no compiled frames``
    (``torch.compile`` does not compile under such a mode). Under the mode each compiled
    kernel now runs its function eagerly, and no kernel variant is marked as failed: the
    output bitwise the one outside the mode, the gradients equal to float rounding (the
    compiled epilogues' fused arithmetic against the eager ops, as the README says of the
    fused kernels: 4 float32 ulp measured; rtol 1e-5)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode
    from lowbit.functional import call_count, scaled_dot_product_attention as sdpa, set_call_count

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(0)
    q0, k0, v0 = (torch.randn(1, 4, 128, 64, generator=g) for _ in range(3))
    assert q0.numel() >= compiled.MIN_NUMEL and compiled.working()
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=2)

    def step(mode: object) -> tuple:
        set_call_count(0)
        q, k, v = (t.clone().requires_grad_(True) for t in (q0, k0, v0))
        with mode if mode is not None else contextlib.nullcontext():
            out = sdpa(q, k, v, is_causal=True, state=cfg)
            out.square().sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    before, failures = call_count(), compiled.variant_failures()
    try:
        want = step(None)
        for mode in (FlopCounterMode(display=False), Passthrough()):
            got = step(mode)
            assert torch.equal(got[0], want[0]), type(mode).__name__
            for a, b in zip(got[1:], want[1:]):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        set_call_count(before)
    assert compiled.variant_failures() == failures and compiled.failure() is None


def test_a_functional_call_with_a_bare_config_compiles_as_it_runs_eagerly() -> None:
    """A new user's trial (README fault kind 264): ``torch.compile`` of a function (or a
    module's forward) calling ``fqt_linear(x, W, None, cfg)`` with a bare seeded config
    raised "block state … no longer exists" at the backward: each such call makes a new
    state, which dynamo traced once and the graph then named after it was freed. Such a
    call now runs eagerly under compile (a graph break): outputs and gradients bitwise
    eager's, two calls drawing two streams, for ``fqt_linear`` and ``fqt_conv2d``."""
    import torch._dynamo

    from lowbit.functional import call_count, fqt_conv2d, fqt_linear, set_call_count

    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=1)
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 16, generator=g), torch.randn(6, 16, generator=g)
    k, img = torch.randn(4, 3, 3, 3, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    calls = (lambda w: fqt_linear(x, w, None, cfg), lambda k: fqt_conv2d(img, k, None, cfg, padding=1))
    before = call_count()
    try:
        for fn, weight in zip(calls, (w, k), strict=True):
            runs = []
            for compile_it in (False, True):
                torch._dynamo.reset()
                set_call_count(0)
                p = weight.clone().requires_grad_(True)
                f = torch.compile(fn) if compile_it else fn
                outs = [f(p) for _ in range(2)]
                (outs[0].square().sum() + outs[1].sum()).backward()
                runs.append((outs[0].detach(), outs[1].detach(), p.grad))
            assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    finally:
        set_call_count(before)
