"""benchmarks/gpu_check.sh and bench_step.py's ``--device`` option, on a machine without
a GPU (CI): the script stops with exit status 2 and a message naming the missing device,
writing nothing; ``--device cpu`` is the CPU benchmark as before (same model, same
step, same GEMM counts); ``--device cuda`` without a GPU is refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bench_smoke import ffn_tiny_flops, load

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_gpu_check_script_parses() -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the script would run in full")
def test_gpu_check_without_a_gpu_exits_2_with_the_reason(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"))
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"gpu_check: no CUDA device: torch {torch.__version__} (CUDA build: {torch.version.cuda}) "
        "sees no GPU. This script needs one NVIDIA GPU; on a CPU-only machine run the CPU "
        "benchmarks (docs/benchmarks.md).")
    assert not (tmp_path / "out").exists()  # nothing written


def test_gpu_check_names_a_python_without_torch(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=str(tmp_path / "no-such-python"))
    proc = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"gpu_check: no python interpreter '{tmp_path / 'no-such-python'}' (set PYTHON=...)"


def test_bench_step_device_cpu_is_the_cpu_step_as_before() -> None:
    """The Bench of ``device="cpu"`` holds the very workload ``build`` made (no copy) and
    its step gives bitwise the gradients of the plain step (convert, loss, backward)."""
    bench = load("bench_step")
    import lowbit
    from step_workloads import build

    b = bench.Bench("ffn", "fqt-psq-8", "tiny", "cpu")
    w = build("ffn", "tiny")
    assert bench.to_device(w, "cpu") is w
    lowbit.convert(w.model, lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    b.step()
    w.step_loss().backward()
    assert b.w.inputs[0].is_leaf and b.w.inputs[0].device.type == "cpu"
    assert torch.equal(b.w.inputs[0].grad, w.inputs[0].grad)
    for p, q in zip(b.params, w.model.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_bench_step_device_cpu_reports_as_before(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bench = load("bench_step")
    out = tmp_path / "r.json"
    rc = bench.main(["--size", "tiny", "--inprocess", "--steps", "1", "--warmup", "0", "--rounds", "1",
                     "--ceiling-n", "64", "--workload", "ffn", "--modes", "fp32,fqt-psq-8",
                     "--device", "cpu", "--json", str(out), "--malloc", "default"])
    assert rc == 0
    from lowbit import allocator

    # the policy in effect: an earlier in-process `lowbit train` (another test, the same
    # worker) may have set keep-freed, which glibc does not undo; the header says so
    assert f"size=tiny, device cpu, malloc {allocator.policy()};" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["device"] == "cpu"
    rows = {r["mode"]: r for r in data["results"]}
    assert rows["fp32"]["gemm_flops"] == rows["fqt-psq-8"]["gemm_flops"] == ffn_tiny_flops()
    assert rows["fqt-psq-8"]["real_share"] == 1.0 and rows["fp32"]["real_share"] == 0.0


@pytest.mark.parametrize("device, message", [
    ("tpu", "--device must be cpu or cuda[:N], got 'tpu'"),
    pytest.param("cuda", "--device cuda: no CUDA device is available", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is present")),
])
def test_bench_step_refuses_a_device_it_cannot_use(capsys: pytest.CaptureFixture[str], device: str,
                                                   message: str) -> None:
    bench = load("bench_step")
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", device, "--workload", "ffn"])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
