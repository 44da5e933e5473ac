"""Smoke runs of the CPU benchmarks: tiny shapes, no timing assertions (timings on shared
machines are noise; the benchmarks report medians against same-run baselines). What is
checked is what the tables are made of: every row present, FLOP counts equal to the
workloads' own formulas, the floor computed from them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def ffn_tiny_flops() -> int:
    """FLOPs of the tiny FFN step (D=64, F=128, T=64): 2 layers × 3 GEMMs × 2·T·D·F."""
    return 2 * 3 * 2 * 64 * 64 * 128


def test_bench_step_smoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bench = load("bench_step")
    out = tmp_path / "r.json"
    modes = "fp32,bf16,torchao-int8,fqt-psq-8,fqt-bhq-8+bf16,fqt-hadamard-8,fqt-psq-8:reference"
    rc = bench.main(["--size", "tiny", "--inprocess", "--steps", "1", "--warmup", "0", "--rounds", "1",
                     "--ceiling-n", "64", "--workload", "ffn,gpt", "--modes", modes, "--json", str(out),
                     "--malloc", "default"])  # the allocator policy is process-wide: not in pytest
    assert rc == 0
    text = capsys.readouterr().out
    for mode in modes.split(","):
        assert f"| {mode} |" in text
    assert "GEMM ceilings at 64³" in text
    data = json.loads(out.read_text())
    assert set(data["ceilings_gflops"]) == {"int8", "bf16", "fp32"}
    rows = data["results"]
    assert len(rows) == 14
    timed = [r for r in rows if r["ms"] is not None]
    assert all(r["ms"] > 0 and r["gemm_ms"] >= 0 and r["profiled_ms"] > 0 for r in timed)
    lowbit_rows = [r for r in rows if r["mode"].startswith("fqt")]
    assert all(set(r["breakdown"]) == {"quantize", "transform", "epilogue"} for r in lowbit_rows)
    ffn = {r["mode"]: r for r in rows if r["workload"] == "ffn"}
    # every mode of the FFN runs the same six GEMMs; the integer path runs all of them on
    # _int_mm, the reference path none (it dequantizes), the float modes none
    for mode in ("fp32", "bf16", "fqt-psq-8", "fqt-hadamard-8", "fqt-psq-8:reference"):
        assert ffn[mode]["gemm_flops"] == ffn_tiny_flops()
    assert ffn["fqt-psq-8"]["real_share"] == 1.0
    assert ffn["fqt-psq-8:reference"]["real_share"] == 0.0
    assert ffn["fp32"]["real_share"] == 0.0
    gpt = {r["mode"]: r for r in rows if r["workload"] == "gpt"}
    assert gpt["fp32"]["note"] == "attention float"


def test_bench_step_rejects_unknown_workload(capsys: pytest.CaptureFixture[str]) -> None:
    bench = load("bench_step")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--workload", "resnet"])
    assert exc.value.code == 2
    assert "unknown workload 'resnet'; allowed: ffn, gpt, gpt2-block, cnn" in capsys.readouterr().err


@pytest.mark.parametrize("workload", ["gpt2-block", "cnn", "cnn-cl"])
def test_new_workloads_build_and_step(workload: str) -> None:
    workloads = load("step_workloads")
    w = workloads.build(workload, "tiny")
    loss = w.step_loss()
    assert loss.dim() == 0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None for p in w.model.parameters())
    if workload == "cnn-cl":  # the model and its input in channels-last memory
        assert w.inputs[0].is_contiguous(memory_format=torch.channels_last)
        assert all(p.is_contiguous(memory_format=torch.channels_last) for p in w.model.parameters() if p.dim() == 4)


@pytest.mark.usefixtures("int_mm_engine")
def test_profile_step_charges_int_mm_to_the_gemm_scope() -> None:
    prof = load("profile_step")
    wall, table = prof.profile_mode("ffn", "fqt-psq-8", "tiny", warmup=1)
    assert wall > 0
    # the tiny FFN's six GEMMs all run as _int_mm inside lowbit::gemm, none outside it
    assert table["gemm"]["aten::_int_mm"][1] == 6
    assert "aten::_int_mm" not in table["model"]
    assert set(table) <= {"model", "quantize", "gemm", "epilogue", "transform"}
    text = prof.render("ffn", "fqt-psq-8", wall, table, top=3)
    assert "| **gemm** | (all) |" in text


def test_first_step_measure_and_table() -> None:
    first = load("bench_first_step")
    row = first.measure("ffn", "fqt-psq-8", "tiny", steps=1)
    assert set(row) == {"workload", "mode", "dynamo_import_ms", "build_ms", "first_ms",
                        "second_ms", "steady_ms", "variants"}
    assert row["first_ms"] > 0 and row["steady_ms"] > 0
    text = first.table([{"workload": "ffn", "mode": "fqt-psq-8", "cold": row, "warm": row}])
    assert text.splitlines()[2].startswith("| ffn | fqt-psq-8 |")


def test_scope_times_probe_times_the_scopes_and_restores_them(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks" / "probes"))
    spec = importlib.util.spec_from_file_location("scope_times", ROOT / "benchmarks" / "probes" / "scope_times.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import lowbit.kernels
    from lowbit import scopes

    parts = mod.main(["--workload", "ffn", "--modes", "fqt-psq-8,fqt-bhq-8", "--size", "tiny", "--steps", "1",
                      "--rounds", "1", "--warmup", "1", "--threads", str(torch.get_num_threads()),
                      "--malloc", "default"])  # the allocator policy is process-wide: not in pytest
    for m in ("fqt-psq-8", "fqt-bhq-8"):
        assert sum(parts[m]["lowbit::gemm"]) > 0 and len(parts[m]["other"]) == 1
    assert sum(parts["fqt-bhq-8"].get("lowbit::transform", [0.0])) > 0  # BHQ's transform scope seen
    assert lowbit.kernels.scope is scopes.scope  # every patched module restored
    assert "| fqt-bhq-8 |" in capsys.readouterr().out


@pytest.mark.parametrize("toggle", ["shared-input", "conv-grad-w-pieces", "conv-acc-pieces",
                                    "conv-grad-w-half-pieces", "conv-im2col-pieces", "conv-pieces", "f32-conv"])
def test_todays_toggles_run_and_are_left_on(toggle: str, capsys: pytest.CaptureFixture[str]) -> None:
    bt = load("bench_toggle")
    from lowbit import conv, ops
    from lowbit.kernels import im2col, qconv

    assert bt.main([toggle, "--workload", "cnn", "--mode", "fqt-psq-8+bf16", "--size", "tiny", "--rounds", "1",
                    "--steps", "1", "--warmup", "1", "--threads", str(torch.get_num_threads()),
                    "--malloc", "default"]) == 0  # the allocator policy is process-wide: not in pytest
    assert ops.SHARE_SAVED_INPUT and im2col.ROWS_IN_PIECES and conv.ACC_IN_PIECES  # on, as lowbit ships
    assert im2col.IM2COL_IN_PIECES
    assert im2col.PIECE_SHARE == 2 and qconv.FLOAT32_CONV
    assert f"{toggle}: on" in capsys.readouterr().out


def test_bhq_epilogue_inverse_toggle_runs_and_is_left_on(capsys: pytest.CaptureFixture[str]) -> None:
    """``bench_toggle.py bhq-epilogue-inverse`` times a BHQ text GPT with and without the
    one-pass kernel and leaves it as lowbit ships it: a BHQ layer's ∇X product then runs
    it (its profiler scope)."""
    from torch.profiler import profile

    import lowbit
    from lowbit.kernels import avx512

    if not avx512.available():
        pytest.skip("lowbit's C quantizer is not available on this CPU")
    bt = load("bench_toggle")
    assert bt.main(["bhq-epilogue-inverse", "--workload", "gpt", "--mode", "fqt-bhq-8", "--size", "tiny",
                    "--rounds", "1", "--steps", "1", "--warmup", "1", "--threads", str(torch.get_num_threads()),
                    "--malloc", "default"]) == 0
    assert "bhq-epilogue-inverse: on" in capsys.readouterr().out
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(64, 96))
    lowbit.convert(layer, lowbit.FQTConfig.from_recipe("fqt-bhq-8", seed=1))
    x = torch.randn(256, 64, requires_grad=True)
    with profile() as prof:
        layer(x).square().mean().backward()
    assert any(e.name == "lowbit::avx512_bhq_epilogue_inverse" for e in prof.events())


def test_heap_peak_shim_counts_a_short_lived_allocation_exactly(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    """``benchmarks/heap_peak.c`` preloaded into a child (as ``bench_step``'s memory
    subprocess does): a 10 MB tensor alive for microseconds — shorter than any sampling
    period — is the step's peak within 1% (malloc's usable size rounds up a few pages),
    and the count returns to its start once the tensor is freed. Each allocator entry
    point is exercised (``posix_memalign`` through torch, ``malloc``/``realloc``/
    ``calloc``/``free`` through ctypes)."""
    import os
    import subprocess

    bench = load("bench_step")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))  # built here, not found in a warm cache
    shim, why = bench.heap_shim()
    if shim is None:
        pytest.skip(f"benchmarks/heap_peak.c not built: {why}")
    code = (
        "import ctypes, json, sys, torch\n"
        f"sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
        "import bench_step\n"
        "lib = bench_step._shim()\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype = libc.realloc.restype = libc.calloc.restype = ctypes.c_void_p\n"
        "libc.realloc.argtypes = [ctypes.c_void_p, ctypes.c_size_t]\n"
        "libc.free.argtypes = [ctypes.c_void_p]\n"
        "base = lib.lowbit_heap_bytes(); lib.lowbit_heap_reset_peak()\n"
        "x = torch.empty(10 * 2**20, dtype=torch.uint8); del x\n"
        "torch_peak = lib.lowbit_heap_peak() - base\n"
        "lib.lowbit_heap_reset_peak()\n"
        "p = libc.malloc(2**20); p = libc.realloc(p, 3 * 2**20); q = libc.calloc(1, 2**20)\n"
        "libc_peak = lib.lowbit_heap_peak() - base\n"
        "libc.free(p); libc.free(q)\n"
        "print(json.dumps([torch_peak, libc_peak, lib.lowbit_heap_bytes() - base]))\n")
    env = dict(os.environ, LD_PRELOAD=shim)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    torch_peak, libc_peak, left = json.loads(proc.stdout.splitlines()[-1])
    assert 10 * 2**20 <= torch_peak <= 1.01 * 10 * 2**20
    assert 4 * 2**20 <= libc_peak <= 1.01 * 4 * 2**20  # realloc's 3 MB and calloc's 1 MB at once
    assert abs(left) < 2**16  # both freed (a few small Python objects may remain)
    assert bench._shim() is None  # not preloaded into this process: bench_step samples here
    monkeypatch.setenv("LD_PRELOAD", "libjemalloc.so.2")  # another allocator preloaded: left to run
    assert bench.heap_shim()[0] is None and bench.heap_shim()[1].startswith("LD_PRELOAD is set already")
    monkeypatch.delenv("LD_PRELOAD")
    monkeypatch.setenv("CC", "g++")  # a C++ compiler: built as C, the symbols unmangled
    if __import__("shutil").which("g++"):
        gpp, why_gpp = bench.heap_shim()  # its own build (another compiler), loadable: C symbols
        assert why_gpp == "" and gpp is not None and gpp != shim
    monkeypatch.delenv("CC")
    Path(shim).unlink()  # (never written in place: this process has it mapped)
    Path(shim).write_bytes(b"not a library")  # a damaged cache file: built again, not a crash
    assert bench.heap_shim() == (shim, "")
