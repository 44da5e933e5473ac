"""``lowbit train --nproc N`` and its ranks: a failed rank is named as the cause;
``WORLD_SIZE=1`` in the environment is a single process.

Each multi-process test runs one real torchrun job (a few seconds alone; the CPUs are
shared), bounded by :data:`TIMEOUT`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit.experiments import train as train_cli

HERE = Path(__file__).parent
TIMEOUT = 120  # seconds for one torchrun job to start, or to end
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _status(run: Path) -> dict:
    try:
        return json.loads((run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def test_a_failed_rank_is_recorded_as_the_cause(tmp_path):
    """A review: when rank 1 raised, status.json recorded rank 0's gloo "Connection
    closed by peer". The first rank to stop records its own error, before its
    connections close."""
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(HERE / "_kill_rank.py"), str(tmp_path), "3", "raise"],  # epoch 1 of 3
        env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode != 0
    record = _status(tmp_path)
    assert record["status"] == "failed", record
    assert record["message"].startswith("stopped by an error on rank 1: RuntimeError: "
                                        "simulated failure on rank 1"), record


def test_world_size_1_in_the_environment_is_not_a_launch(tmp_path, monkeypatch, capsys):
    """A review: WORLD_SIZE=1 left in the environment made `--nproc 2` refuse with
    "--world-size is 2 but this process was not launched on several ranks" (no such
    option). One rank is not a launch: the ranks are started."""
    from lowbit.cli import main

    launched = []
    monkeypatch.setattr(train_cli, "_torchrun", lambda args, nproc, out: launched.append(nproc) or 0)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", "--nproc", "2", "--malloc", "default", "--out", str(tmp_path / "run")]) == 0
    assert launched == [2]
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["train", "--nproc", "2", "--out", str(tmp_path / "run")]) == 2
    assert "WORLD_SIZE must be an integer" in capsys.readouterr().err


@pytest.mark.parametrize("message, shown", [
    ("world_size is 2 but this process was not launched on several ranks: use torchrun or "
     "lowbit train --nproc", "--nproc is 2 but this process was not launched on several ranks"),
    ("batch_size (33) must be a multiple of world_size (2): it is the global batch",
     "--batch-size (33) must be a multiple of --nproc (2)"),
    ("model_kwargs must be a dict", "--model-arg must be a dict"),
])
def test_messages_name_the_options_of_the_command_line(message, shown):
    assert train_cli._as_option(message).startswith(shown)
