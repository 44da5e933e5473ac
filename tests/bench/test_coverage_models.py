"""Smoke run of benchmarks/coverage_models.py (the docs/coverage.md tables) on tiny
shapes: every model traces, and the shares that hold by construction today hold."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_zoo():
    spec = importlib.util.spec_from_file_location("coverage_models", ROOT / "benchmarks" / "coverage_models.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["coverage_models"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_coverage_models_tiny(capsys: pytest.CaptureFixture[str]) -> None:
    zoo = load_zoo()
    assert zoo.main(["--size", "tiny", "--models", "tinygpt,resnet20,vit,mha,mobilenet"]) == 0
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert set(zoo.MODELS) - set(zoo.HF_MODELS) <= set(rows)
    # columns: model, FLOPs, low-bit, real, simulated, float, forward low-bit
    for name in ("tinygpt", "vit", "mha", "mobilenet", "resnet20"):  # attention converts too
        assert rows[name][2] == "100.0%" and rows[name][5] == "0.0%", rows[name]
