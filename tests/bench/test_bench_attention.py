"""Smoke run of benchmarks/bench_attention.py on tiny shapes: both modes are timed and
really differ in what runs (no timing assertions: shared machines make timings noise)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import lowbit

ROOT = Path(__file__).resolve().parents[2]


def load():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "benchmarks" / "bench_attention.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_attention"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("part", ["step", "attention"])
def test_bench_attention_tiny(part: str, capsys: pytest.CaptureFixture[str]) -> None:
    bench = load()
    argv = ["--size", "tiny", "--rounds", "1", "--steps", "1", "--warmup", "0", "--part", part,
            "--malloc", "default"]  # the allocator policy is process-wide: not in pytest
    assert bench.main(argv) == 0
    rows = [ln.split(" | ")[0].lstrip("| ") for ln in capsys.readouterr().out.splitlines()
            if ln.startswith("| attention")]
    assert rows == ["attention float", "attention low-bit"]


def test_bench_attention_modes_differ_in_what_runs() -> None:
    bench = load()
    kinds = {}
    for mode in bench.MODES:
        w = bench.build("gpt", "tiny")
        keep = (lambda m, n: not isinstance(m, bench.ScaledDotProductAttention)) \
            if mode == bench.MODES[0] else None
        lowbit.convert(w.model, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0), keep)
        rep = lowbit.coverage(w.model, *w.inputs, loss_fn=w.loss)
        kinds[mode] = (rep.flops("float") > 0, rep.flops("simulated") > 0)
    assert kinds == {"attention float": (True, False), "attention low-bit": (False, True)}
