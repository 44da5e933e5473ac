"""The run folder: ``config.json``, ``metrics.json`` / ``metrics.csv``, ``status.json``,
the checks made before a checkpoint in it is resumed, and its lock: one process trains
a run folder at a time (:func:`run_lock`).

Every file is written whole and atomically where a reader may see it half-written
(metrics: temporary file + rename); checkpoints are :mod:`.checkpoint`'s. In a
data-parallel run only rank 0 calls these writers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

import lowbit
from lowbit.config import FQTConfig

from . import checkpoint as ckpt
from .runconfig import LEGACY_DEFAULTS, RESUMABLE_CHANGES, TrainConfig


def _json_number(x: Any) -> Any:
    """Non-finite floats become null in JSON (never a made-up number)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``:
    a reader sees the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.json`` and ``metrics.csv`` from the full history (atomically)."""
    rows = [{k: _json_number(v) for k, v in row.items()} for row in history]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    write_atomic(run_dir / "metrics.json", json.dumps(rows, indent=1, allow_nan=False) + "\n")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(run_dir / "metrics.csv", text.getvalue())


def write_status(run_dir: Path, status: str, message: str = "") -> None:
    """``status.json``: ``running``, ``done`` or ``diverged`` (with the message)."""
    write_atomic(run_dir / "status.json", json.dumps({"status": status, "message": message}) + "\n")


def log(msg: str) -> None:
    """A line on stderr, from rank 0 only in a data-parallel run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        tqdm.write(msg, file=sys.stderr)


def load_resumable(run_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start fresh), checked against ``cfg``."""
    loaded = ckpt.load_checkpoint(run_dir)
    if loaded is None:
        log(f"no checkpoint in {run_dir}; starting fresh")
        return None
    state, path = loaded
    saved = LEGACY_DEFAULTS | state["train_config"]
    diff = [k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if diff:
        raise ValueError(
            f"cannot resume {path}: it was made with a different "
            + ", ".join(f"{k} ({saved.get(k)!r}, now {getattr(cfg, k)!r})" for k in diff)
        )
    if state["epoch"] > cfg.epochs:
        raise ValueError(f"cannot resume {path}: {state['epoch']} epochs are done, more than "
                         f"epochs={cfg.epochs}")  # fmt: skip
    log(f"resumed {path} at epoch {state['epoch']}, step {state['step']}")
    return state


LOCK = ".lock"


class RunBusy(ValueError):
    """The run folder is being trained by another live process (:func:`run_lock`)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (``"pid host"``, created exclusively) while training, so
    that two processes — two sweeps whose grids overlap, a sweep and a ``lowbit train
    --resume`` — never train one run folder at once (both would write its checkpoints
    and metrics). A lock left by a process that is gone (killed, crashed) on this host is
    taken over; raises :class:`RunBusy` (a ``ValueError``) if a live process, or one on
    another host sharing the folder, holds it. Released on exit, also on an exception."""
    path, me = run_dir / LOCK, f"{os.getpid()} {socket.gethostname()}"
    for _ in range(3):  # a stale lock is removed, then created again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid_text, _, host = path.read_text().strip().partition(" ")
            except FileNotFoundError:  # released between our two calls: try again
                continue
            pid = int(pid_text) if pid_text.isdigit() else -1
            if host == socket.gethostname() and pid > 0 and not _alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                log(f"{run_dir}: removed the lock of process {pid}, which is gone")
                continue
            raise RunBusy(f"{run_dir} is being trained by process {pid_text or '?'} on "
                          f"{host or '?'} (lock file {path}); wait for it to finish, or remove "
                          "the lock file if that process is gone") from None
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
        break
    else:
        raise RunBusy(f"{run_dir}: could not take the lock file {path}")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.read_text().strip() == me:
                path.unlink()


def write_config(run_dir: Path, cfg: TrainConfig, fqt: FQTConfig, steps_per_epoch: int) -> None:
    config = {
        "run": cfg.run_name(),
        "train": cfg.to_dict(),
        "fqt": fqt.to_dict(),
        "recipe": lowbit.describe(fqt),
        "steps_per_epoch": steps_per_epoch,
        "threads": torch.get_num_threads(),
        "lowbit": lowbit.__version__,
        "torch": torch.__version__,
    }
    write_atomic(run_dir / "config.json", json.dumps(config, indent=1) + "\n")


__all__ = ["LOCK", "RunBusy", "load_resumable", "log", "run_lock", "write_atomic", "write_config",
           "write_metrics", "write_status"]
