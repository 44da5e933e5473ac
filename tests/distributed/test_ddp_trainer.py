"""The trainer on 2 gloo ranks: replicas in sync, the same seed and world size give the
same bits, rank 0 alone writes the run folder, and a job with one rank SIGKILLed under
torchrun resumes to exactly the uninterrupted run."""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel
from _kill_rank import CONFIG
from _ranks import run_ranks

import lowbit

from lowbit.experiments.runconfig import TIMING_FIELDS
from lowbit.experiments.trainer import TrainConfig, train

HERE = Path(__file__).parent
BN_CONFIG = {"task": "digits", "model": "cnn", "recipe": "fqt-psq-4-predicted", "subset": 128,
             "eval_subset": 32, "batch_size": 32, "epochs": 1, "lr": 0.1, "seed": 0}
TIMEOUT = 120  # seconds for one torchrun job (about 10 s alone; the CPUs are shared)


def _train_twice(rank: int, world: int, root: str) -> dict:
    out = {}
    for name in ("a", "b"):
        result = train(TrainConfig(**CONFIG, out=f"{root}/{name}"), progress=False)
        out[name] = result.model.state_dict()
        out[name + "_history"] = result.history
        out[name + "_rng"] = torch.get_rng_state()  # torch's global stream after training
    # BatchNorm and predicted ranges: a CNN whose ranks update running statistics on their
    # own shards, and count their own range overflows
    result = train(TrainConfig(**BN_CONFIG, out=f"{root}-bn"), progress=False)  # beside root: not in its report
    out["bn"] = result.model.state_dict()
    out["bn_history"] = result.history
    out["bn_ranges"] = lowbit.range_stats(result.model)["total"]  # this rank's own, one epoch
    del result
    gc.collect()
    out["ddp_alive"] = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("ddp")
    return root, run_ranks(_train_twice, str(root), timeout=TIMEOUT)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _strip(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
            for r in history]


def test_replicas_stay_bitwise_in_sync_and_runs_repeat(reference):
    _, (r0, r1) = reference
    assert _same(r0["a"], r1["a"])  # the two replicas after 24 steps
    assert _same(r0["a"], r0["b"])  # same seed, same world size: the same bits
    assert r0["a_history"] == r1["a_history"]  # every rank returns rank 0's rows


def test_replicas_with_batchnorm_end_every_epoch_with_rank_zeros_buffers(reference):
    """BatchNorm's running statistics are updated by each rank on its own shard; DDP
    broadcasts rank 0's at each forward, so after an epoch's last step rank 1 held its own
    and train() returned them (a review). Now every buffer is rank 0's at each epoch's end."""
    _, (r0, r1) = reference
    assert any("running_mean" in k for k in r0["bn"])  # the model has BatchNorm
    assert _same(r0["bn"], r1["bn"])  # every parameter and buffer, bit for bit


def test_range_columns_count_every_rank(reference):
    """range_* columns were rank 0's share of the epoch's predicted-range calls (a review);
    they are the sums over ranks, the rate recomputed from the summed counts."""
    _, (r0, r1) = reference
    a, b = r0["bn_ranges"], r1["bn_ranges"]  # each rank's own counts (one epoch, from zero)
    assert b.overflow_calls > 0  # rank 1 has a share to lose
    row = r0["bn_history"][-1]
    assert row == r1["bn_history"][-1]
    assert row["range_overflow_calls"] == a.overflow_calls + b.overflow_calls
    assert row["range_requantized_calls"] == a.requantized_calls + b.requantized_calls
    assert row["range_overflow_rate"] == (a + b).overflow_rate
    assert row["range_clipped_norm"] == (a + b).clipped_norm


def test_each_rank_draws_its_own_global_stream(reference):
    """Dropout and augmentation draw from torch's global generator, which every rank had
    seeded alike: the same masks on every rank's rows (correlated, unlike a single
    process's draws). Each rank has its own stream now, the same from run to run."""
    _, (r0, r1) = reference
    assert not torch.equal(r0["a_rng"], r1["a_rng"])
    assert torch.equal(r0["a_rng"], r0["b_rng"]) and torch.equal(r1["a_rng"], r1["b_rng"])


def test_train_releases_the_ddp_wrapper(reference):
    # The comm hook's state is held by DDP's C++ reducer; a reference from it back to the
    # DDP model was a cycle gc cannot collect: every train() leaked the model, its buckets
    # and the process group until interpreter teardown, where gloo aborted (SIGABRT).
    _, (r0, r1) = reference
    assert r0["ddp_alive"] == 0 and r1["ddp_alive"] == 0


def test_rank_zero_writes_the_run_folder(reference):
    root, (r0, _) = reference
    run = root / "a"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["world_size"] == 2 and config["train"]["grad_comm"] == "int8"
    assert config["run"] == "digits-mlp-fqt-psq-8-n2-cint8-s0"
    rows = json.loads((run / "metrics.json").read_text())
    assert [r["step"] for r in rows] == [8, 16, 24]  # 256 images / global batch 32
    n = sum(t.numel() for k, t in r0["a"].items() if "running" not in k)
    assert rows[0]["comm_bytes_fp32_per_step"] == 4 * n  # ring, 2 ranks: 2(N−1)/N·4 B
    assert rows[0]["comm_bytes_per_step"] < n * 1.1  # int8 codes + block scales
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    assert state["comm"]["steps"] == 24
    assert json.loads((run / "status.json").read_text())["status"] == "done"
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp"))


def test_sigkill_of_one_rank_ends_the_job_and_resume_is_bitwise(reference, tmp_path, capsys):
    root, _ = reference
    env = dict(os.environ, OMP_NUM_THREADS="1")
    killed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(HERE / "_kill_rank.py"), str(tmp_path), "12"],  # dies in epoch 2 of 3
        env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert killed.returncode != 0, killed.stderr[-2000:]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 1
    args = [f"--{k.replace('_', '-')}={v}" for k, v in CONFIG.items()]
    # a resume the checkpoint refuses (another epoch count) is one line before any rank
    # starts, not each rank's refusal and torchrun's traceback (a review)
    from lowbit.cli import main

    other = [a for a in args if not a.startswith("--epochs=")] + ["--epochs=5"]
    assert main(["train", "--nproc=2", *other, f"--out={tmp_path}", "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot resume" in err and "epochs" in err, err
    resumed = subprocess.run(  # lowbit train --nproc 2 launches torchrun -m lowbit train
        [sys.executable, "-m", "lowbit", "train", "--nproc=2", *args, f"--out={tmp_path}",
         "--resume", "--no-progress"], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stderr and "-> " + str(tmp_path) in resumed.stdout
    a = torch.load(root / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "last.pt", weights_only=True)
    assert _same(a["model"], b["model"])
    assert _strip(a["history"]) == _strip(b["history"])


@pytest.mark.parametrize("argv, match", [
    (["--grad-comm", "int8"], "--grad-comm int8 needs a data-parallel run"),
    (["--nproc", "2", "--batch-size", "33"], "--batch-size \\(33\\) must be a multiple of --nproc"),
    (["--nproc", "2", "--grad-comm", "int9"], "--grad-comm must be one of fp32, int2"),
])
def test_train_rejects_bad_distributed_options_before_launching(tmp_path, capsys, argv, match):
    from lowbit.cli import main

    assert main(["train", "--out", str(tmp_path / "run"), *argv]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # nothing launched, nothing written


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_grad_comm_on_one_rank_names_launches_the_command_can_take(tmp_path, capsys, command):
    """A new user's trial (README fault kind 245): ``lowbit sweep --grad-comm int8`` on one
    process was told "--nproc ≥ 2", an option sweep does not have (torchrun's
    ``--nproc-per-node`` is its only way to ranks)."""
    from lowbit.cli import main

    extra = ["--task", "digits", "--recipe", "fp"] if command == "train" else ["--tasks", "digits",
                                                                               "--recipes", "fp"]
    assert main([command, *extra, "--grad-comm", "int8", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lowbit {command}: error: --grad-comm int8 needs a data-parallel run of 2 or "
                          "more ranks: launch it with torchrun --nproc-per-node N (lowbit train: or "
                          "with --nproc N)"), err
    assert "--nproc ≥" not in err and not (tmp_path / "run").exists()


def test_under_torchrun_the_ranks_are_named_as_torchruns_option(monkeypatch):
    """A review of fault kind 245: under torchrun, where ``--nproc`` cannot be typed,
    ``lowbit train`` said "must be a multiple of --nproc (2)"; torchrun's option is named."""
    from lowbit.experiments.train import _as_option

    msg = "batch_size (33) must be a multiple of world_size (2): it is the global batch"
    assert _as_option(msg).startswith("--batch-size (33) must be a multiple of --nproc (2)")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert _as_option(msg).startswith("--batch-size (33) must be a multiple of the launch's 2 ranks "
                                      "(torchrun --nproc-per-node)")
    assert _as_option("world_size must be a positive integer").startswith("torchrun's --nproc-per-node must")


def test_train_config_world_size():
    cfg = TrainConfig(task="digits", recipe="fqt-psq-8", world_size=2, grad_comm="int4")
    assert cfg.run_name() == "digits-mlp-fqt-psq-8-n2-cint4-s0"
    assert cfg.grad_comm_config().bits == 4 and TrainConfig(task="digits").world_size == 1
    with pytest.raises(ValueError, match="world_size is 2 but this process was not launched"):
        train(TrainConfig(task="digits", world_size=2, out="unused"), progress=False)


def test_report_tells_quantized_communication_apart(reference):
    from lowbit.experiments.report import load_runs, table

    root, _ = reference
    runs = load_runs(root)
    assert {r.label for r in runs} == {"fqt-psq-8, int8 grad comm"}
    text = "\n".join(table(runs, []))
    assert "world_size 2" in text and "MB/step sent per rank" in text and "| 2 |" in text
