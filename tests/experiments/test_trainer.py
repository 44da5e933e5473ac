"""Tests for the training loop, tasks and checkpoints (lowbit.experiments.trainer & co).

Runs are tiny (a few hundred images, a handful of steps): they check the plumbing — files,
resume, bitwise reproducibility, bad-step handling — not the accuracy.
"""

from __future__ import annotations

import os
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import same_nested

from lowbit.experiments import checkpoint as ckpt
from lowbit.experiments import data as D
from lowbit.experiments import tasks as T
from lowbit.experiments.rundir import cpu_name
from lowbit.experiments.runconfig import TIMING_FIELDS
from lowbit.experiments.trainer import TrainConfig, TrainingDiverged, train

DIGITS = {"task": "digits", "subset": 256, "eval_subset": 64, "batch_size": 32}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two
    OpenMP threads that wait for each other make a step up to 50× slower."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Interrupt(Exception):
    pass


class _InterruptAt:
    """Wraps a task; raises after ``at`` training batches (a crash mid-epoch)."""

    def __init__(self, task: T.Task, at: int) -> None:
        self.task, self.at, self.seen = task, at, 0

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def train_batches(self, batch_size, generator):
        for batch in self.task.train_batches(batch_size, generator):
            self.seen += 1
            if self.seen > self.at:
                raise _Interrupt
            yield batch


class _NaNLoss:
    """Wraps a task; the loss of the listed (0-based) steps is NaN."""

    def __init__(self, task: T.Task, bad_steps: set[int]) -> None:
        self.task, self.bad, self.calls = task, bad_steps, 0

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def loss(self, model, batch):
        loss = self.task.loss(model, batch)
        self.calls += 1
        return loss * math.nan if self.calls - 1 in self.bad else loss


# --------------------------------------------------------------------------- tasks end to end


@pytest.mark.parametrize("model, recipe", [("mlp", "fqt-bhq-4"), ("cnn", "fqt-psq-8")])
def test_digits_trains_and_writes_run_files(tmp_path, model, recipe):
    cfg = TrainConfig(**DIGITS, model=model, recipe=recipe, epochs=3, lr=0.1, out=str(tmp_path))
    result = train(cfg, progress=False)
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0], losses  # learning happens even with 4-bit gradients
    assert [row["step"] for row in result.history] == [8, 16, 24]  # 256 // 32 steps per epoch
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["recipe"] == recipe and config["train"]["model"] == model
    assert config["fqt"] == cfg.fqt_config().to_dict() and config["fqt"]["seed"] == 0
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert rows == result.history
    keys = {"epoch", "step", "train_loss", "accuracy", "step_time_ms", "samples_per_s", "epoch_time_s"}
    assert keys | {"bad_steps"} <= set(rows[0])
    # wall seconds of the epoch (training + evaluation): at least its steps' median time
    assert all(r["epoch_time_s"] * 1e3 >= r["step_time_ms"] > 0 for r in rows)
    # the CPU that trained each epoch (a resumed run may continue on another machine)
    assert all(r["cpu"] == cpu_name() and r["cpu"] for r in rows)
    csv_lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("epoch,step,")
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "done"
    assert (tmp_path / "last.pt").exists() and (tmp_path / "prev.pt").exists()


@pytest.mark.skipif(
    not D.FASHION_MNIST_DEBIAN_DIR.is_dir(),
    reason=f"Fashion-MNIST not installed ({D.FASHION_MNIST_INSTALL})",
)
def test_fashion_mnist_resnet20_on_a_subset(tmp_path):
    cfg = TrainConfig(
        task="fashion-mnist", recipe="fqt-psq-8", epochs=1, subset=64, eval_subset=64,
        batch_size=32, out=str(tmp_path),
    )  # fmt: skip
    result = train(cfg, progress=False)
    (row,) = result.history
    assert row["step"] == 2 and 0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["train_loss"])
    assert type(result.task) is T.FashionMNISTTask and result.task.augment_padding == 2


def test_fashion_mnist_augmentation_is_seeded():
    images = D.ImageData(torch.randn(8, 1, 28, 28), torch.arange(8), torch.zeros(1, 1, 28, 28),
                         torch.zeros(1, dtype=torch.long))  # fmt: skip
    task = T.ImageTask("preact-resnet20", images, augment_padding=2)
    task.name = "fashion-mnist"
    a = list(task.train_batches(4, torch.Generator().manual_seed(3)))
    b = list(task.train_batches(4, torch.Generator().manual_seed(3)))
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b))
    assert not torch.equal(a[0][0], images.x_train[:4])  # cropped and flipped


def test_text_tiny_gpt_trains_and_reports_bits_per_byte(tmp_path):
    cfg = TrainConfig(
        task="text", recipe="fqt-psq-8", epochs=2, steps_per_epoch=3, batch_size=4,
        subset=100_000, eval_subset=4, out=str(tmp_path),
        model_kwargs={"n_layer": 2, "n_embd": 64, "n_head": 4, "block_size": 32},
    )  # fmt: skip
    result = train(cfg, progress=False)
    assert [row["step"] for row in result.history] == [3, 6]
    last = result.history[-1]
    assert last["bpb"] == pytest.approx(last["val_loss"] / math.log(2))
    assert last["val_loss"] < math.log(256)  # better than uniform over bytes after 6 steps
    assert "tokens_per_s" in last and cfg.optimizer == "adamw" and cfg.grad_clip == 1.0
    assert result.task.y_eval.shape == (4, 32)
    # which corpus it read (the docs, or the standard library's sources where they are
    # missing): a review found two machines' bpb averaged across different corpora
    data = json.loads((tmp_path / "config.json").read_text())["data"]
    assert data == result.task.source and data.startswith("python3.11-doc:") or data.split(":")[0].endswith("-stdlib")


# --------------------------------------------------------------------------- resume


def test_resume_continues_the_step_count(tmp_path):
    cfg = dict(DIGITS, recipe="qat-8", epochs=2)
    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    with pytest.raises(_Interrupt):  # dies in epoch 2, after the epoch-1 checkpoint
        train(TrainConfig(**cfg, out=str(tmp_path)), task=_InterruptAt(task, 12), progress=False)
    result = train(TrainConfig(**cfg, out=str(tmp_path)), resume=True, progress=False)
    assert [row["step"] for row in result.history] == [8, 16]
    assert [row["epoch"] for row in json.loads((tmp_path / "metrics.json").read_text())] == [1, 2]


def test_resume_refuses_another_epoch_count(tmp_path):
    """The schedule (warm-up, then cosine to 0) spans all epochs: extending a run on
    resume used to rebuild it part-way (lr 0 at the old end, then up again)."""
    train(TrainConfig(**DIGITS, recipe="qat-8", epochs=1, out=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match=r"different epochs \(1, now 2\); the learning-rate "
                                         r"schedule spans all epochs"):
        train(TrainConfig(**DIGITS, recipe="qat-8", epochs=2, out=str(tmp_path)), resume=True,
              progress=False)  # fmt: skip


def test_resume_refuses_epochs_of_another_dataset(tmp_path):
    """A run whose first epochs read one corpus (config.json's ``data``) is not continued
    on another (the text task reads the Python docs, or the stdlib's sources where they are
    missing); the same dataset at another path resumes."""
    cfg = dict(DIGITS, recipe="qat-8", epochs=2)
    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    with pytest.raises(_Interrupt):
        train(TrainConfig(**cfg, out=str(tmp_path)), task=_InterruptAt(task, 12), progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["data"] == "digits:sklearn.datasets.load_digits"
    other = dict(config, data="python-stdlib:/usr/lib/python3.11")
    (tmp_path / "config.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match=r"its epochs so far trained on python-stdlib:/usr/lib/"
                                         r"python3.11, this process reads digits:"):
        train(TrainConfig(**cfg, out=str(tmp_path)), resume=True, progress=False)
    (tmp_path / "config.json").write_text(json.dumps(dict(config, data="digits:/elsewhere")))
    result = train(TrainConfig(**cfg, out=str(tmp_path)), resume=True, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_resume_refuses_another_monitor_interval_for_fqt_auto(tmp_path):
    """fqt-auto's policy picks bit widths at the monitor's steps: resuming with another
    interval trained a different run without a word. Refused now; a fixed-width recipe
    may still change it (the monitor only measures there)."""
    cfg = dict(DIGITS, recipe="fqt-auto", epochs=2, monitor_every=3)
    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    with pytest.raises(_Interrupt):
        train(TrainConfig(**cfg, out=str(tmp_path)), task=_InterruptAt(task, 12), progress=False)
    with pytest.raises(ValueError, match=r"monitor_every \(3, now 50\)"):
        train(TrainConfig(**dict(cfg, monitor_every=50), out=str(tmp_path)), resume=True, progress=False)
    fixed = dict(DIGITS, recipe="fqt-psq-8", epochs=2, monitor_every=3)
    with pytest.raises(_Interrupt):
        train(TrainConfig(**fixed, out=str(tmp_path / "f")), task=_InterruptAt(task, 12), progress=False)
    train(TrainConfig(**dict(fixed, monitor_every=4), out=str(tmp_path / "f")), resume=True, progress=False)


def test_resume_with_another_thread_count_says_so(tmp_path, capsys):
    """Float reductions split over another thread count round differently: a resumed run
    is bitwise the uninterrupted one only with the same count, so resuming with another
    says so."""
    cfg = dict(DIGITS, recipe="qat-8", epochs=2)
    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    with pytest.raises(_Interrupt):
        train(TrainConfig(**cfg, out=str(tmp_path)), task=_InterruptAt(task, 12), progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, threads=config["threads"] + 1)))
    capsys.readouterr()
    train(TrainConfig(**cfg, out=str(tmp_path)), resume=True, progress=False)
    assert f"ran with {config['threads'] + 1} thread(s), it resumes with {torch.get_num_threads()}" \
        in capsys.readouterr().err


@pytest.mark.parametrize("model, recipe, weights", [
    ("mlp", "fqt-bhq-4", "fp32"), ("cnn", "fqt-bhq-4", "fp32"),
    ("mlp", "fqt-psq-4-predicted", "fp32"),  # range histories come back from the checkpoint
    ("cnn", "fqt-psq-8", "int8"),  # int8 codes, scales and the optimizer's SR generator too
    ("mlp", "fp", "bf16-master"),  # the float32 master copies too
])
def test_crash_and_resume_is_bitwise_identical(tmp_path, model, recipe, weights):
    cfg = dict(DIGITS, model=model, recipe=recipe, epochs=3, weights=weights)
    ref = train(TrainConfig(**cfg, out=str(tmp_path / "ref")), progress=False)
    task = T.make_task("digits", model, subset=256, eval_subset=64)
    with pytest.raises(_Interrupt):  # dies in epoch 2, after the epoch-1 checkpoint
        train(TrainConfig(**cfg, out=str(tmp_path / "b")), task=_InterruptAt(task, 12),
              progress=False)  # fmt: skip
    resumed = train(TrainConfig(**cfg, out=str(tmp_path / "b")), resume=True, progress=False)
    assert _equal_state(ref.model, resumed.model)
    strip = TIMING_FIELDS
    assert [{k: v for k, v in r.items() if k not in strip} for r in ref.history] == [
        {k: v for k, v in r.items() if k not in strip} for r in resumed.history
    ]


def test_checkpoints_from_before_data_parallel_training_resume(tmp_path):
    """A checkpoint whose train_config predates world_size/grad_comm ran on one rank with
    fp32 averaging (LEGACY_DEFAULTS): it resumes, and to the same bits."""
    cfg = dict(DIGITS, recipe="fqt-psq-8", epochs=2)
    ref = train(TrainConfig(**cfg, out=str(tmp_path / "ref")), progress=False)
    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    with pytest.raises(_Interrupt):  # dies in epoch 2, after the epoch-1 checkpoint
        train(TrainConfig(**cfg, out=str(tmp_path / "old")), task=_InterruptAt(task, 12),
              progress=False)
    state = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    for key in ("world_size", "grad_comm"):
        del state["train_config"][key]
    ckpt.save_checkpoint(tmp_path / "old", state)
    resumed = train(TrainConfig(**cfg, out=str(tmp_path / "old")), resume=True, progress=False)
    assert _equal_state(ref.model, resumed.model)


def _flip_a_bit_in_the_largest_record(path):
    """One bit flipped in the middle of the largest record's data (a weight tensor): the
    zip structure intact, only the record's CRC-32 tells."""
    import struct
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _flip_a_bit_in_the_central_directory(path, field: str) -> None:
    """One bit flipped in the zip's central-directory entry of the largest record, which
    no CRC-32 covers: ``attr`` its MS-DOS directory bit (torch then reads the record as
    empty: a garbage tensor), ``method`` its compression method (stored → deflated)."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        name = max(z.infolist(), key=lambda i: i.file_size).filename.encode()
    data = bytearray(path.read_bytes())
    i = 0
    while True:
        cd = data.find(b"PK\x01\x02", i)
        n = int.from_bytes(data[cd + 28:cd + 30], "little")
        if data[cd + 46:cd + 46 + n] == name:
            break
        i = cd + 4
    if field == "method":
        data[cd + 10] ^= 0x08
    else:
        data[cd + 38] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "bit-flip", "directory-attr", "directory-method"])
def test_corrupt_last_checkpoint_falls_back_to_prev(tmp_path, capsys, damage):
    """A truncated ``last.pt`` (a full disk), one with a flipped bit inside a weight
    (which ``torch.load`` read without complaint: a wrong weight, resumed silently) and
    ones with a flipped bit in the zip's central directory (no CRC covers it: a record read
    as empty loaded garbage weights silently; a compression flag raised zlib.error, a
    traceback) are all reported, and ``prev.pt`` is used; the damaged file is kept aside,
    so the next save does not rotate it over ``prev.pt``."""
    cfg = TrainConfig(**DIGITS, recipe="fqt-psq-4", epochs=2, out=str(tmp_path))
    ref = train(cfg, progress=False)
    last = tmp_path / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:1000])
    elif damage == "bit-flip":
        _flip_a_bit_in_the_largest_record(last)
    else:
        _flip_a_bit_in_the_central_directory(last, damage.split("-")[1])
    capsys.readouterr()
    state, path = ckpt.load_checkpoint(tmp_path)
    assert path.name == "prev.pt" and state["epoch"] == 1
    err = capsys.readouterr().err
    assert "warning: cannot load checkpoint" in err and "last.pt" in err and "prev.pt" in err
    assert (tmp_path / ckpt.DAMAGED).exists() and not last.exists()
    resumed = train(cfg, resume=True, progress=False)  # redoes epoch 2 from prev.pt
    assert _equal_state(ref.model, resumed.model)
    assert torch.load(tmp_path / "prev.pt", weights_only=True)["epoch"] == 1  # not the damaged one


def test_an_interrupt_between_the_checkpoint_renames_keeps_the_new_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C after ``last.pt`` became ``prev.pt`` and before the new file became
    ``last.pt`` deleted the new, complete file: an epoch lost. The rename is completed."""
    state = {k: 0 for k in ckpt.REQUIRED_KEYS}
    ckpt.save_checkpoint(tmp_path, dict(state, epoch=1))
    real = ckpt.os.replace
    calls = []

    def interrupted(src, dst):
        calls.append(dst)
        real(src, dst)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, dict(state, epoch=2))
    monkeypatch.setattr(ckpt.os, "replace", real)
    got, path = ckpt.load_checkpoint(tmp_path)
    assert path.name == "last.pt" and got["epoch"] == 2
    assert torch.load(tmp_path / "prev.pt", weights_only=True)["epoch"] == 1
    assert not list(tmp_path.glob(".last-*"))


def test_a_kill_between_the_renames_leaves_the_new_checkpoint_used_and_stale_files_removed(tmp_path, monkeypatch):
    """A kill (no exception handler runs) after ``last.pt`` became ``prev.pt`` left the
    new, complete checkpoint as a temporary file: the resume redid its epoch from
    ``prev.pt`` and the file stayed for good (a review). Loading takes it when it reads
    whole and is newer; a save removes the temporary files earlier kills left."""
    state = {k: 0 for k in ckpt.REQUIRED_KEYS}
    ckpt.save_checkpoint(tmp_path, dict(state, epoch=1))
    other = tmp_path / "other"
    other.mkdir()
    ckpt.save_checkpoint(other, dict(state, epoch=2))
    os.replace(tmp_path / "last.pt", tmp_path / "prev.pt")  # the first rename, then the kill
    os.replace(other / "last.pt", tmp_path / ".last-abc123.pt.tmp")
    (tmp_path / ".last-partial.pt.tmp").write_bytes(b"PK\x03\x04 cut")  # a kill inside torch.save
    got, path = ckpt.load_checkpoint(tmp_path)
    assert path.name == "last.pt" and got["epoch"] == 2
    assert [p.name for p in tmp_path.glob(".last-*")] == [".last-partial.pt.tmp"]
    ckpt.save_checkpoint(tmp_path, dict(state, epoch=3))
    assert not list(tmp_path.glob(".last-*"))
    # an older whole temporary file than prev.pt is not taken
    os.replace(tmp_path / "last.pt", tmp_path / ".last-old.pt.tmp")
    os.replace(tmp_path / "prev.pt", tmp_path / "keep.pt")
    ckpt.save_checkpoint(other, dict(state, epoch=5))
    os.replace(other / "last.pt", tmp_path / "prev.pt")
    got, path = ckpt.load_checkpoint(tmp_path)
    assert path.name == "prev.pt" and got["epoch"] == 5


def test_a_failed_save_names_the_file_and_the_space_left(tmp_path, monkeypatch):
    """A full disk ended in torch's "[enforce fail at inline_container.cc] unexpected pos"
    (a review): the save raises CheckpointError naming last.pt and the free space, and
    leaves the previous checkpoint and no temporary file."""
    state = {k: 0 for k in ckpt.REQUIRED_KEYS}
    ckpt.save_checkpoint(tmp_path, dict(state, epoch=1))

    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 37184 vs 37136")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(ckpt.CheckpointError, match=r"cannot write checkpoint .*last\.pt: RuntimeError: .*MiB free"):
        ckpt.save_checkpoint(tmp_path, dict(state, epoch=2))
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path)[0]["epoch"] == 1 and not list(tmp_path.glob(".last-*"))


def test_a_run_folder_that_cannot_be_made_is_one_line(tmp_path):
    """A read-only file system or /proc gave a traceback or "No such file or directory"."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = TrainConfig(task="digits", model="mlp", recipe="fp", epochs=1, out=str(blocker / "run"))
    with pytest.raises(ValueError, match="cannot create the run folder .*file/run"):
        train(cfg, progress=False)


def test_a_resume_keeps_the_first_sessions_threads_and_records_its_own(tmp_path, monkeypatch):
    """Resumed with another thread count, config.json was rewritten with the new one: the
    record said 1 thread for a run that mixed 2 and 1 (a review)."""
    from lowbit.experiments import rundir

    cfg = TrainConfig(task="digits", model="mlp", recipe="fp", epochs=2, out=str(tmp_path))
    fqt = cfg.fqt_config()
    monkeypatch.setattr(rundir.torch, "get_num_threads", lambda: 2)
    rundir.write_config(tmp_path, cfg, fqt, 10)
    monkeypatch.setattr(rundir.torch, "get_num_threads", lambda: 1)
    rundir.write_config(tmp_path, cfg, fqt, 10, start_epoch=1)
    rundir.write_config(tmp_path, cfg, fqt, 10, start_epoch=2)  # the same again: one entry
    got = rundir.read_config(tmp_path)
    assert got["threads"] == 2 and [(r["epoch"], r["threads"]) for r in got["resumed"]] == [(1, 1)]
    monkeypatch.setattr(rundir.torch, "get_num_threads", lambda: 2)  # back to the first's: recorded too
    rundir.write_config(tmp_path, cfg, fqt, 10, start_epoch=3)
    got = rundir.read_config(tmp_path)
    assert [(r["epoch"], r["threads"]) for r in got["resumed"]] == [(1, 1), (3, 2)]
    monkeypatch.setattr(rundir.torch, "get_num_threads", lambda: 1)
    rundir.write_config(tmp_path, cfg, fqt, 10)  # a fresh start: a fresh record
    assert rundir.read_config(tmp_path)["threads"] == 1 and "resumed" not in rundir.read_config(tmp_path)
    # a trial: a resume with --monitor-every 3 (of a finished run: nothing trained) wrote 3
    # into the record of a run monitored every 50 steps; --max-bad-steps likewise
    import dataclasses

    other = dataclasses.replace(cfg, monitor_every=3, max_bad_steps=9)
    rundir.write_config(tmp_path, other, fqt, 10, start_epoch=2)
    got = rundir.read_config(tmp_path)
    assert (got["train"]["monitor_every"], got["train"]["max_bad_steps"]) == (cfg.monitor_every, cfg.max_bad_steps)
    assert [(r["epoch"], r["monitor_every"], r["max_bad_steps"]) for r in got["resumed"]] == [(2, 3, 9)]
    # and a plain --resume takes the latest session's (a review: back to the first's)
    from lowbit.experiments.train import recorded_settings

    assert {k: recorded_settings(tmp_path)[0][k] for k in ("monitor_every", "max_bad_steps")} == \
        {"monitor_every": 3, "max_bad_steps": 9}


def test_checkpoint_rotation_and_contents(tmp_path):
    cfg = TrainConfig(**DIGITS, recipe="fqt-bhq-8", epochs=2, out=str(tmp_path))
    train(cfg, progress=False)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    prev = torch.load(tmp_path / "prev.pt", weights_only=True)
    assert (last["epoch"], prev["epoch"]) == (2, 1) and (last["step"], prev["step"]) == (16, 8)
    assert set(last["rng"]) == {"torch_global", "data", "sr"} and last["rng"]["sr"]
    assert (
        last["train_config"] == cfg.to_dict() and last["fqt_config"] == cfg.fqt_config().to_dict()
    )
    assert {"model", "optimizer", "scheduler"} <= set(last)
    assert not list(tmp_path.glob("*.tmp"))  # no temporary files left behind


def test_resume_without_checkpoint_starts_fresh(tmp_path, capsys):
    result = train(TrainConfig(**DIGITS, epochs=1, out=str(tmp_path)), resume=True, progress=False)
    assert result.history[-1]["step"] == 8
    assert "no checkpoint" in capsys.readouterr().err


def test_unreadable_checkpoints_raise(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
        ckpt.load_checkpoint(tmp_path)


def test_refuses_to_overwrite_or_resume_a_different_run(tmp_path):
    train(TrainConfig(**DIGITS, epochs=1, out=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        train(TrainConfig(**DIGITS, epochs=1, out=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="recipe"):
        train(TrainConfig(**DIGITS, recipe="qat-8", epochs=1, out=str(tmp_path)), resume=True,
              progress=False)  # fmt: skip


def hold_lock(run_dir) -> subprocess.Popen:  # noqa: ANN001
    """A child process that holds ``run_dir``'s lock (flock, as lowbit's run_lock) until
    killed, its ``"pid host"`` written in the file."""
    code = ("import fcntl, os, socket, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "os.write(fd, f'{os.getpid()} {socket.gethostname()}\\n'.encode())\n"
            "print('held', flush=True)\n"
            "time.sleep(120)\n")
    from lowbit.experiments.rundir import LOCK

    run_dir.mkdir(parents=True, exist_ok=True)
    child = subprocess.Popen([sys.executable, "-c", code, str(run_dir / LOCK)],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_one_process_trains_a_run_folder_at_a_time(tmp_path):
    """The run folder's lock: while another process holds it, train raises RunBusy naming
    that process and writes nothing; once the holder is gone (killed: the kernel drops
    its flock) training goes ahead, whatever the lock file says; the lock is released
    after training and after a crash."""
    import socket

    from lowbit.experiments.rundir import LOCK, RunBusy, is_busy

    cfg = TrainConfig(**DIGITS, epochs=1, out=str(tmp_path))
    holder = hold_lock(tmp_path)
    try:
        assert is_busy(tmp_path)
        with pytest.raises(RunBusy, match=f"being trained by process {holder.pid} on "
                                          f"{socket.gethostname()}"):
            train(cfg, resume=True, progress=False)
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    assert not is_busy(tmp_path)  # the stale "pid host" line does not matter
    result = train(cfg, resume=True, progress=False)
    assert result.history[-1]["step"] == 8 and not is_busy(tmp_path)
    (tmp_path / LOCK).write_text("garbage, no pid\n")  # unreadable content: no holder either
    assert train(cfg, resume=True, progress=False).history[-1]["step"] == 8
    with pytest.raises(TrainingDiverged):  # a run that raises releases the lock too
        train(TrainConfig(**DIGITS, epochs=1, max_bad_steps=1, out=str(tmp_path / "nan")),
              task=_NaNLoss(T.make_task("digits", "mlp", subset=256, eval_subset=64), {0}),
              progress=False)  # fmt: skip
    assert not is_busy(tmp_path / "nan")


# --------------------------------------------------------------------------- bad steps


def test_non_finite_steps_are_skipped_and_counted(tmp_path, capsys):
    task = T.make_task("digits", "cnn", subset=256, eval_subset=64)
    cfg = TrainConfig(**DIGITS, model="cnn", recipe="fqt-psq-8", epochs=1, out=str(tmp_path))
    result = train(cfg, task=_NaNLoss(task, {2, 3, 5}), progress=False)
    (row,) = result.history
    assert row["bad_steps"] == 3 and row["step"] == 8 and math.isfinite(row["train_loss"])
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values())
    assert "optimizer step skipped" in capsys.readouterr().err


def test_skipped_steps_leave_weights_and_batchnorm_statistics_alone(tmp_path):
    task = T.make_task("digits", "cnn", subset=64, eval_subset=16)
    cfg = TrainConfig(**dict(DIGITS, subset=64, eval_subset=16), model="cnn", epochs=1,
                      max_bad_steps=10, out=str(tmp_path))  # fmt: skip
    result = train(cfg, task=_NaNLoss(task, {0, 1}), progress=False)  # both steps bad
    torch.manual_seed(cfg.seed)
    initial = task.build_model()
    assert _equal_state(result.model, initial)  # incl. running stats and num_batches_tracked
    (row,) = result.history
    assert row["bad_steps"] == 2 and math.isnan(row["train_loss"])
    assert json.loads((tmp_path / "metrics.json").read_text())[0]["train_loss"] is None


class _HugeLoss(_NaNLoss):
    """The loss of step ``bad`` times 1e30 (finite; its gradients' float32 norm overflows),
    and the predicted-range state seen as each step begins."""

    def __init__(self, task: T.Task, bad: int) -> None:
        super().__init__(task, {bad})
        self.seen: list[dict] = []

    def loss(self, model, batch):
        import copy

        import lowbit

        self.seen.append(copy.deepcopy(lowbit.range_state(model)))
        loss = self.task.loss(model, batch)
        self.calls += 1
        return loss * 1e30 if self.calls - 1 in self.bad else loss


def test_a_skipped_step_leaves_the_predicted_ranges_alone(tmp_path, capsys):
    """A review found a skipped step's huge absmax kept in the predicted-range histories,
    so the next steps quantized on a grid 1e25× too coarse (their gradients all zero): the
    skipped step now leaves the histories as they were, and its message says why."""
    task = _HugeLoss(T.make_task("digits", "mlp", subset=256, eval_subset=64), bad=4)
    cfg = TrainConfig(**DIGITS, recipe="fqt-psq-8-predicted", epochs=1, max_bad_steps=3, out=str(tmp_path))
    result = train(cfg, task=task, progress=False)
    assert result.history[0]["bad_steps"] == 1

    def histories(state: dict) -> dict:
        return {(n, p): (t["hist"], t["count"]) for n, paths in state.items() for p, t in paths.items()}

    def calls(state: dict) -> int:
        return sum(t["stats"]["calls"] for paths in state.values() for t in paths.values())

    # the histories as before the skipped step; its calls stay counted (fault kind 162)
    assert task.seen[4] and same_nested(histories(task.seen[5]), histories(task.seen[4]))
    assert calls(task.seen[5]) > calls(task.seen[4])
    assert not same_nested(histories(task.seen[4]), histories(task.seen[3]))  # (they move on good steps)
    assert "the gradients are finite, their norm overflows float32" in capsys.readouterr().err


def test_an_interrupt_leaves_status_interrupted_not_running(tmp_path):
    """A review found Ctrl-C left status.json saying "running" after the process exited."""
    from lowbit.experiments.rundir import is_busy

    class Interrupt(_NaNLoss):
        def loss(self, model, batch):
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt
            return self.task.loss(model, batch)

    cfg = TrainConfig(**DIGITS, epochs=1, out=str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        train(cfg, task=Interrupt(T.make_task("digits", "mlp", subset=256, eval_subset=64), set()),
              progress=False)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "interrupted" and "with --resume" in status["message"]
    assert not is_busy(tmp_path)
    assert train(cfg, resume=True, progress=False).history[-1]["epoch"] == 1  # and it resumes


def test_an_error_leaves_status_failed_not_running(tmp_path):
    """A new user's trial: a run stopped by an error (a backend refusing a GEMM at the first
    step) kept status.json "running" for ever, and the report listed it as unfinished.
    It is "failed" with the error; the report says so."""
    from lowbit.experiments.report import load_runs, table

    class Fails(_NaNLoss):
        def loss(self, model, batch):
            self.calls += 1
            if self.calls == 3:
                raise ValueError("a GEMM this backend cannot run")
            return self.task.loss(model, batch)

    cfg = TrainConfig(**DIGITS, epochs=1, out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="cannot run"):
        train(cfg, task=Fails(T.make_task("digits", "mlp", subset=256, eval_subset=64), set()),
              progress=False)
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "failed" and "ValueError: a GEMM this backend cannot run" in status["message"]
    runs = load_runs(tmp_path)
    if runs:  # a report lists it by what happened (a run with a metrics file)
        text = "\n".join(table(runs, []))
        assert "stopped by an error" in text and "unfinished" not in text


def test_sigterm_leaves_status_interrupted_not_running(tmp_path):
    """``kill`` (SIGTERM: a scheduler's limit, torchrun stopping the other ranks) ended the
    process with status.json still "running"; it is handled as Ctrl-C now, and the
    previous SIGTERM handler is back afterwards."""
    import os
    import signal

    from lowbit.experiments.trainer import Terminated

    class Term(_NaNLoss):
        def loss(self, model, batch):
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return self.task.loss(model, batch)

    before = signal.getsignal(signal.SIGTERM)
    cfg = TrainConfig(**DIGITS, epochs=1, out=str(tmp_path))
    with pytest.raises(Terminated):
        train(cfg, task=Term(T.make_task("digits", "mlp", subset=256, eval_subset=64), set()),
              progress=False)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "interrupted" and status["message"].startswith("stopped by SIGTERM")
    assert signal.getsignal(signal.SIGTERM) is before


def test_consecutive_bad_steps_stop_with_a_clear_error(tmp_path):
    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    cfg = TrainConfig(**DIGITS, epochs=2, max_bad_steps=3, out=str(tmp_path))
    # the last step's own reason (a trial: "non-finite" after step lines saying the
    # gradients were finite and only their norm overflowed)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive skipped steps \(a non-finite loss or gradient, or a "
                       r"gradient norm past float32's range\) \(epoch 2, step 12; the last: non-finite loss \(nan\)\)"):
        train(cfg, task=_NaNLoss(task, set(range(10, 100))), progress=False)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "diverged" and "non-finite" in status["message"]
    assert json.loads((tmp_path / "metrics.json").read_text())[-1]["epoch"] == 1


def test_a_non_finite_evaluation_loss_is_a_divergence_not_a_result(tmp_path):
    """Weights blown up by a huge learning rate in fewer bad steps than max_bad_steps: the
    model's outputs were NaN, its "accuracy" an argmax over NaN (10.58%), yet the run was
    "done" and the report counted it as a seed. Now the run stops as diverged."""
    cfg = TrainConfig(**DIGITS, model="mlp", recipe="fqt-psq-8", lr=1e8, epochs=2, max_bad_steps=1000,
                      out=str(tmp_path))
    with pytest.raises(TrainingDiverged, match="evaluation loss after epoch 1 is nan"):
        train(cfg, progress=False)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "diverged" and "not finite" in status["message"]
    assert json.loads((tmp_path / "metrics.json").read_text())[-1]["val_loss"] is None


def test_an_epoch_diverged_at_evaluation_keeps_no_metric_and_no_checkpoint(tmp_path):
    """A review: the epoch whose evaluation loss was NaN was still kept as a result (its
    accuracy, an argmax over NaN logits, written as 0.1058) and as ``last.pt`` (the good
    epoch pushed to ``prev.pt``), which the divergence message then called the "last good
    checkpoint" and ``--resume`` continued from. Its metrics are null now, and the last
    good epoch stays ``last.pt``."""
    torch.manual_seed(0)
    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    real_evaluate = task.evaluate
    calls = []

    def evaluate(model):  # the second epoch's outputs are NaN
        calls.append(1)
        out = real_evaluate(model)
        return out if len(calls) == 1 else {k: (math.nan if k == "val_loss" else v) for k, v in out.items()}

    task.evaluate = evaluate
    cfg = TrainConfig(**DIGITS, model="mlp", epochs=3, out=str(tmp_path))
    with pytest.raises(TrainingDiverged, match=r"after epoch 2 .*last good checkpoint: .*last\.pt"):
        train(cfg, task=task, progress=False)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["accuracy"] is not None and rows[1]["accuracy"] is None and rows[1]["val_loss"] is None
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 1
    assert not (tmp_path / "prev.pt").exists()


def test_a_refused_command_leaves_a_killed_runs_status_as_it_was(tmp_path):
    """A review: a run killed while "running", then a command refused before it started
    (other settings; a --resume with other epochs) rewrote its status.json as "failed",
    blaming the refusal. Only a run this process started records why it stopped."""
    cfg = TrainConfig(**DIGITS, model="mlp", epochs=1, out=str(tmp_path))
    train(cfg, progress=False)
    killed = {"status": "running", "message": ""}
    (tmp_path / "status.json").write_text(json.dumps(killed))
    with pytest.raises(ValueError, match=r"other settings: --lr \("):
        train(TrainConfig(**DIGITS, model="mlp", epochs=1, lr=0.2, out=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="epochs"):
        train(TrainConfig(**DIGITS, model="mlp", epochs=3, out=str(tmp_path)), resume=True, progress=False)
    assert json.loads((tmp_path / "status.json").read_text()) == killed


def test_resume_refuses_results_whose_settings_cannot_be_read(tmp_path):
    """A review: with the checkpoints and config.json gone, ``--resume`` under other
    settings redid the folder's run over its results (metrics.json lost its epochs),
    while ``lowbit sweep`` refused the same folder. Now it refuses too."""
    cfg = TrainConfig(**DIGITS, recipe="fp", epochs=1, out=str(tmp_path))
    train(cfg, progress=False)
    for f in [*tmp_path.glob("*.pt"), tmp_path / "config.json"]:
        f.unlink()
    before = (tmp_path / "metrics.json").read_text()
    other = TrainConfig(**DIGITS, recipe="qat-8", lr=0.3, epochs=1, out=str(tmp_path))
    with pytest.raises(ValueError, match="no readable config.json"):
        train(other, resume=True, progress=False)
    assert (tmp_path / "metrics.json").read_text() == before


def test_a_run_folder_with_results_but_no_checkpoint_is_not_overwritten(tmp_path):
    """A committed run folder keeps its metrics but not its ``*.pt``: training into it
    replaced the finished run's results without a word (with ``--resume`` too, under other
    settings). Now it refuses; ``--resume`` with the same settings redoes the run, as
    ``lowbit sweep`` does."""
    cfg = TrainConfig(**DIGITS, recipe="fp", epochs=1, out=str(tmp_path))
    train(cfg, progress=False)
    for pt in tmp_path.glob("*.pt"):
        pt.unlink()
    before = (tmp_path / "metrics.json").read_text()
    other = TrainConfig(**DIGITS, recipe="qat-8", epochs=1, out=str(tmp_path))
    with pytest.raises(ValueError, match=r"already holds a run's results \(1 epoch\(s\)"):
        train(other, progress=False)
    with pytest.raises(ValueError, match=r"holds a run of other settings \(recipe \('fp', now 'qat-8'\)"):
        train(other, resume=True, progress=False)
    assert (tmp_path / "metrics.json").read_text() == before
    assert train(cfg, resume=True, progress=False).history[-1]["epoch"] == 1


def test_a_diverged_run_or_a_foreign_config_is_not_trained_over(tmp_path):
    """A review: a folder recording a diverged run of other settings (no epochs: nothing
    in metrics.json) and one holding another program's ``config.json`` were trained over
    without ``--resume``, their records replaced. Both refused; the diverged run's own
    settings with ``--resume`` redo it."""
    from lowbit.experiments.rundir import write_status

    run = tmp_path / "diverged"
    run.mkdir()
    cfg = TrainConfig(**DIGITS, recipe="fp", epochs=1, out=str(run))
    (run / "config.json").write_text(json.dumps({"train": TrainConfig(**DIGITS, recipe="fp", epochs=1, lr=1e30,
                                                                      out=str(run)).to_dict()}))
    (run / "metrics.json").write_text("[]")
    write_status(run, "diverged", "loss NaN")
    with pytest.raises(ValueError, match=r"holds a run of other settings \(lr"):
        train(cfg, progress=False)
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict()}))
    with pytest.raises(ValueError, match="recorded as diverged"):
        train(cfg, progress=False)
    assert train(cfg, resume=True, progress=False).history[-1]["epoch"] == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="not a lowbit run's record"):
        train(TrainConfig(**DIGITS, recipe="fp", epochs=1, out=str(foreign)), progress=False)
    assert json.loads((foreign / "config.json").read_text()) == {"model_type": "gpt2"}
    # a run that crashed before its first epoch holds nothing to lose: started afresh with a
    # changed setting (a second review: a smaller --batch-size after running out of memory)
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    before = TrainConfig(**(DIGITS | {"batch_size": 16}), recipe="fp", epochs=1, out=str(crashed))
    (crashed / "config.json").write_text(json.dumps({"train": before.to_dict()}))
    (crashed / "metrics.json").write_text("[]")
    write_status(crashed, "interrupted")
    assert train(TrainConfig(**DIGITS, recipe="fp", epochs=1, out=str(crashed)), progress=False).history


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    """A run that failed before its first file (here the model cannot be built) left its
    new folder behind holding only ``.lock``; a folder that existed before, or one with
    files in it, stays."""
    class Broken(_NaNLoss):
        def build_model(self):
            raise RuntimeError("cannot build")

    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    new = tmp_path / "runs" / "new"
    with pytest.raises(RuntimeError, match="cannot build"):
        train(TrainConfig(**DIGITS, epochs=1, out=str(new)), task=Broken(task, set()), progress=False)
    assert not new.exists() and (tmp_path / "runs").is_dir()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(RuntimeError, match="cannot build"):
        train(TrainConfig(**DIGITS, epochs=1, out=str(kept)), task=Broken(task, set()), progress=False)
    assert kept.is_dir()
    done = tmp_path / "done"  # failed after writing its files: every file stays
    cfg = TrainConfig(**DIGITS, epochs=1, max_bad_steps=1, out=str(done))
    with pytest.raises(TrainingDiverged):
        train(cfg, task=_NaNLoss(task, set(range(100))), progress=False)
    assert (done / "status.json").exists() and (done / "config.json").exists()


def test_nan_metrics_are_written_as_null_not_numbers(tmp_path):
    from lowbit.experiments.trainer import write_metrics

    write_metrics(tmp_path, [{"epoch": 1, "train_loss": math.nan, "accuracy": 0.5}])
    assert json.loads((tmp_path / "metrics.json").read_text())[0]["train_loss"] is None
    assert (tmp_path / "metrics.csv").read_text().splitlines()[1] == "1,,0.5"


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("task", "cifar", "task must be one of digits, fashion-mnist, text"),
        ("model", "resnet", "must be one of mlp, cnn"),
        ("recipe", "fqt-foo-4", "recipe must be one of"),
        ("epochs", 0, "epochs must be a positive integer"),
        ("batch_size", -1, "batch_size must be a positive integer"),
        ("lr", 0.0, "lr must be a finite number > 0"),
        ("lr", math.inf, "lr must be a finite number"),
        ("grad_input_bits", 1, "grad_input_bits must be an integer in 2..8"),
        ("backend", "cuda", "backend must be one of auto, reference, int8"),
        ("steps_per_epoch", 5, "text task only"),
        ("max_bad_steps", 0, "max_bad_steps must be a positive integer"),
        ("weights", "fp16", "weights must be one of fp32, bf16-master, bf16, int8"),
        ("range_margin", 1.5, "range_margin needs an fqt-\\*-predicted recipe"),
        ("opt_state", "int8", "opt_state with fp32 weights must be one of fp32"),
    ],
)
def test_train_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{"task": "digits", "recipe": "fqt-psq-8", field: value})


def test_train_config_defaults_resolution_and_run_name():
    cfg = TrainConfig(task="fashion-mnist", recipe="fqt-bhq-8", grad_input_bits=5, seed=1)
    assert (cfg.model, cfg.batch_size, cfg.optimizer, cfg.lr) == (
        "preact-resnet20",
        128,
        "sgd",
        0.1,
    )
    assert cfg.run_name() == "fashion-mnist-preact-resnet20-fqt-bhq-8-gi5-gw8-s1"
    assert cfg.fqt_config().grad_input.bits == 5 and cfg.fqt_config().grad_input.quantizer == "bhq"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="needs an fqt"):
        TrainConfig(recipe="qat-8", grad_weight_bits=4)


def test_same_seed_is_bitwise_reproducible_and_seeds_differ(tmp_path):
    """Issue 6: the whole trajectory, stochastic-rounding noise included, is a function
    of the seed on the CPU."""
    def run(seed: int, name: str) -> dict:
        cfg = TrainConfig(**DIGITS, model="mlp", recipe="fqt-bhq-4", epochs=2, seed=seed,
                          out=str(tmp_path / name))
        return train(cfg, progress=False).model.state_dict()

    a, b, c = run(0, "a"), run(0, "b"), run(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize("weights, opt_state, optimizer", [
    ("bf16-master", None, "sgd"), ("bf16", None, "sgd"), ("int8", None, "sgd"),
    ("int8", "bf16", "adamw")])
def test_low_precision_weights_train_without_float32_copies(tmp_path, weights, opt_state, optimizer):
    cfg = TrainConfig(**DIGITS, model="mlp", recipe="fqt-psq-8", epochs=3, lr=0.1, weights=weights,
                      opt_state=opt_state, optimizer=optimizer, out=str(tmp_path))
    result = train(cfg, progress=False)
    assert cfg.run_name().endswith(f"-w{weights}" + (f"-s{opt_state}" if opt_state else "") + "-s0")
    assert all(p.dtype == torch.bfloat16 for p in result.model.parameters())
    assert result.history[-1]["accuracy"] > 0.5  # 10 classes: well above chance after 24 steps
    row = result.history[-1]
    # stored state: SGD int8 = 1 (+ scales) weight + 1 (+ scales) momentum; bf16 = 2 + 2;
    # bf16 model + float32 master + float32 momentum = 2 + 4 + 4
    stored = {("bf16", "sgd"): 4.0, ("int8", "sgd"): 2.0, ("int8", "adamw"): 1.0 + 2 + 2,
              ("bf16-master", "sgd"): 10.0}
    assert row["bytes_per_param_stored"] == pytest.approx(stored[weights, optimizer], abs=0.15)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    # the SR noise generator, or the float32 masters, are checkpointed
    assert (state["optim_rng"] is None) == (weights == "bf16-master")
    assert (state["master"] is not None) == (weights == "bf16-master")
    codes = [v for st in state["optimizer"]["state"].values() for k, v in st.items()
             if k == "weight_codes"]
    assert (len(codes) > 0) == (weights == "int8")
    assert all(c.dtype == torch.int8 for c in codes)


def test_bfloat16_model_keeps_batchnorm_statistics_in_float32():
    import copy

    from lowbit.experiments.trainer import to_bfloat16

    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    low = to_bfloat16(copy.deepcopy(ref))
    bn, bn_ref = low[1], ref[1]
    x = torch.randn(8, 1, 6, 6)
    for _ in range(3):
        y = low(x)
        ref[1](low[0](x.bfloat16()).float())  # float32 BN on the same conv output
    assert y.dtype == torch.bfloat16 and bn.weight.dtype == torch.bfloat16
    assert bn.running_mean.dtype == torch.float32 and int(bn.num_batches_tracked) == 3
    # the statistics are float32 sums of the same values: equal to float rounding
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, rtol=1e-6, atol=1e-7)
    y.float().sum().backward()
    assert bn.weight.grad.dtype == torch.bfloat16
    twin = copy.deepcopy(low)  # the float32 forward is bound to the copy, not the original
    twin(x)
    assert int(twin[1].num_batches_tracked) == 4 and int(bn.num_batches_tracked) == 3


def test_run_config_seed_below_2_63() -> None:
    """The trainer's data order is a function of the seed mod 2⁶³ (``epoch_seed``): a seed
    of 2⁶³ or more would repeat a smaller seed's order, so it is refused."""
    from lowbit.experiments.runconfig import TrainConfig

    TrainConfig(seed=2**63 - 1)
    with pytest.raises(ValueError, match=r"seed must be below 2\*\*63, got 9223372036854775808"):
        TrainConfig(seed=2**63)


def test_eval_subset_beyond_the_data_is_refused() -> None:
    """``--eval-subset`` larger than the evaluated split (digits: its 359 validation images)
    or the text task's validation windows was silently cut to what exists; refused like
    ``--subset``, naming the split (digits' was called "the test images": a review)."""
    with pytest.raises(ValueError, match=r"eval_subset must be at most 359 \(the validation images\), got 100000"):
        T.make_task("digits", "mlp", eval_subset=100000)
    assert len(T.make_task("digits", "mlp", eval_subset=64).y_eval) == 64
    with pytest.raises(ValueError, match=r"eval_subset must be at most \d+ \(the validation windows"):
        T.make_task("text", subset=60_000, eval_subset=100000)


def test_resume_refuses_a_checkpoint_of_another_quantization_config(tmp_path) -> None:
    """A review: resume compared only the TrainConfig; a checkpoint whose resolved recipe
    differs from what this version gives (an older default margin of a predicted range)
    resumed silently on the new one, and config.json was rewritten to match."""
    from pathlib import Path

    from lowbit import FQTConfig
    from lowbit.experiments.rundir import recipe_refusal
    from lowbit.experiments.trainer import TrainConfig

    cfg = TrainConfig(task="digits", recipe="fqt-psq-8-predicted", epochs=2)
    same = {"fqt_config": cfg.fqt_config().to_dict()}
    assert recipe_refusal(Path("last.pt"), same["fqt_config"], cfg) is None
    assert recipe_refusal(Path("last.pt"), None, cfg) is None  # checkpoints before the record
    old = cfg.fqt_config().with_ranges(margin=2.0).to_dict()
    assert FQTConfig.from_dict(old) != cfg.fqt_config()
    why = recipe_refusal(Path("last.pt"), old, cfg)
    assert why is not None and "another quantization config" in why and "grad_input" in why


@pytest.mark.parametrize("block_size", [0, -4])
def test_a_text_task_checks_its_model_arguments_before_using_them(block_size: int) -> None:
    """A review: ``TrainConfig(task="text", model_kwargs={"block_size": 0})`` through the
    Python API raised ZeroDivisionError, and -4 "eval_subset must be at most -500", before
    the model arguments were checked; the task checks them first (the CLI's line)."""
    with pytest.raises(ValueError, match=f"model argument block_size must be an integer ≥ 1 .*got {block_size}"):
        T.make_task("text", subset=60_000, model_kwargs={"block_size": block_size})


def test_convert_or_refuse_leaves_converts_other_warnings_to_the_users_filters():
    """A third review: recording convert's warnings and re-emitting them by hand lost their
    module (``filterwarnings("ignore", module="lowbit")`` stopped matching) and their
    once-per-place registry (shown at every call). Only the backend warning is held back
    now; convert's others are warned as convert warns them."""
    import warnings

    from torch import nn

    import lowbit
    from lowbit.experiments.trainer import convert_or_refuse

    class Functional(nn.Module):  # a functional GEMM: convert converts nothing, and says so
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.w

    cfg = lowbit.FQTConfig.from_recipe("fqt-psq-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", module="lowbit")
        for _ in range(3):
            convert_or_refuse(Functional(), cfg)
    assert not caught
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # once per place
        for _ in range(3):
            convert_or_refuse(Functional(), cfg)
    assert len([w for w in caught if issubclass(w.category, lowbit.ConversionWarning)]) == 1


def test_a_resume_with_a_lower_max_bad_steps_stops_on_the_restored_count(tmp_path):
    """A review: the bad-step count restored from a checkpoint was compared with
    ``max_bad_steps`` only after its next increment, so a resume with a lower limit took
    another step and then said "5/3 in a row". Four bad steps end epoch 1 here; resumed
    with a limit of 3, the run stops before its first step, as diverged."""
    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    cfg = dict(DIGITS, recipe="qat-8", epochs=2)
    with pytest.raises(_Interrupt):  # steps 4–7 (the end of epoch 1) bad; dies in epoch 2
        train(TrainConfig(**cfg, max_bad_steps=10, out=str(tmp_path)),
              task=_InterruptAt(_NaNLoss(task, {4, 5, 6, 7}), 10), progress=False)
    seen = _NaNLoss(task, set())
    with pytest.raises(TrainingDiverged, match=r"4 consecutive skipped steps .* before step 8, restored from the "
                                               r"checkpoint, reach max_bad_steps 3; last good checkpoint: .*last\.pt"):
        train(TrainConfig(**cfg, max_bad_steps=3, out=str(tmp_path)), task=seen, resume=True, progress=False)
    assert seen.calls == 0  # no step taken
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "diverged" and "reach max_bad_steps 3" in status["message"]
    # with the limit it had, the run goes on from the same checkpoint
    result = train(TrainConfig(**cfg, max_bad_steps=10, out=str(tmp_path)), resume=True, progress=False)
    assert [row["epoch"] for row in result.history] == [1, 2]


def test_a_finished_run_resumed_with_a_lower_max_bad_steps_stays_done(tmp_path):
    """A review of the fix above: it also stopped a finished run (no step left) resumed
    with a lower limit and rewrote its status as "diverged", dropping it from the report."""
    task = T.make_task("digits", "mlp", subset=256, eval_subset=64)
    cfg = dict(DIGITS, recipe="qat-8", epochs=1)
    train(TrainConfig(**cfg, max_bad_steps=10, out=str(tmp_path)), task=_NaNLoss(task, {4, 5, 6, 7}),
          progress=False)
    result = train(TrainConfig(**cfg, max_bad_steps=3, out=str(tmp_path)), resume=True, progress=False)
    assert [row["epoch"] for row in result.history] == [1]
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "done"


def test_a_single_rank_run_is_refused_under_a_multi_rank_launch(monkeypatch):
    """A review: ``world_size=1`` under ``torchrun --nproc-per-node 2`` (no process group
    yet) returned a one-rank job, so rank 0 trained alone and rank 1 met a misleading
    "run busy" error. ``Ranks.start`` compares it with the launch's ``WORLD_SIZE``."""
    import pytest

    from lowbit.experiments.parallel import Ranks

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="world_size is 1 but this process was launched as one of 2 ranks"):
        Ranks.start(1)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert Ranks.start(1) == Ranks()
