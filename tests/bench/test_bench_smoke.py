"""Smoke run of the step benchmark: tiny shapes, no timing assertions (timings on shared
machines are noise; the benchmark itself reports medians against same-run baselines)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "bench_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_step"] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def test_bench_step_smoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bench = load_bench()
    out = tmp_path / "r.json"
    modes = "fp32,bf16,torchao-int8,fqt-psq-8,fqt-bhq-8+bf16,fqt-hadamard-8,fqt-psq-8:reference"
    rc = bench.main(["--size", "tiny", "--inprocess", "--steps", "1", "--warmup", "0", "--rounds", "1",
                     "--workload", "ffn,gpt", "--modes", modes, "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    for mode in modes.split(","):
        assert f"| {mode} |" in text
    import json

    rows = json.loads(out.read_text())
    assert len(rows) == 14
    lowbit_rows = [r for r in rows if r["mode"].startswith("fqt")]
    assert all(r["ms"] and r["ms"] > 0 for r in lowbit_rows)
    assert all(set(r["breakdown"]) == {"gemm", "quantize", "transform", "epilogue"} for r in lowbit_rows)
