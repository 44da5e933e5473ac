"""The run folder: ``config.json``, ``metrics.json`` / ``metrics.csv``, ``status.json``,
the checks made before a checkpoint in it is resumed, and its lock: one process trains
a run folder at a time (:func:`run_lock`).

Every file is written whole and atomically where a reader may see it half-written
(metrics: temporary file + rename); checkpoints are :mod:`.checkpoint`'s. In a
data-parallel run only rank 0 calls these writers, but for ``status.json``'s record of
why a running run stopped, which the first rank to stop writes (the trainer's ``_train``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import platform
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
from .runconfig import TrainConfig, changed_settings
from ..atomic import write_atomic


def _json_number(x: Any) -> Any:
    """Non-finite floats become null in JSON (never a made-up number)."""
    return None if isinstance(x, float) and not math.isfinite(x) else x


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere ``platform.processor()`` or the
    architecture), recorded with each epoch: a study that spans sessions can span machines."""
    name = platform.processor() or platform.machine() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return name


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
    """``status.json``: ``running``, ``done``, ``diverged``, ``interrupted`` or ``failed``
    (an error stopped it; with the message)."""
    write_atomic(run_dir / "status.json", json.dumps({"status": status, "message": message}) + "\n")


def log(msg: str) -> None:
    """A line on stderr, from rank 0 only in a data-parallel run."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        tqdm.write(msg, file=sys.stderr)


def load_resumable(run_dir: Path, cfg: TrainConfig) -> dict[str, Any] | None:
    """The checkpoint to resume from (None: start fresh), checked against ``cfg``
    (:func:`resume_refusal`)."""
    loaded = ckpt.load_checkpoint(run_dir)
    if loaded is None:
        log(f"no checkpoint in {run_dir}; starting fresh")
        return None
    state, path = loaded
    refusal = resume_refusal(path, state["train_config"], run_dir, cfg) or recipe_refusal(path, state.get("fqt_config"), cfg)
    if refusal:
        raise ValueError(refusal)
    if state["epoch"] > cfg.epochs:
        raise ValueError(f"cannot resume {path}: {state['epoch']} epochs are done, more than "
                         f"epochs={cfg.epochs}")  # fmt: skip
    log(f"resumed {path} at epoch {state['epoch']}, step {state['step']}")
    return state


def recipe_refusal(path: Path, saved: dict[str, Any] | None, cfg: TrainConfig) -> str | None:
    """Why the resolved quantization config a run recorded (a checkpoint's
    ``fqt_config``, ``config.json``'s ``fqt``) is not the one ``cfg`` gives today — a
    recipe's default changed between versions (a predicted range's margin went from 2 to
    1.25): resumed, the later epochs trained on the new setting under a label naming it
    alone (a review). None where every field the record holds agrees (fields recorded
    only by later versions — ``adaptive`` — are not compared: older runs lack them) or
    nothing was recorded."""
    if saved is None:
        return None
    try:
        old = FQTConfig.from_dict(saved).to_dict()
    except (TypeError, ValueError, KeyError) as e:
        return f"cannot resume {path}: its quantization config does not load ({e})"
    new = cfg.fqt_config().to_dict()

    def differs(raw: Any, a: Any, b: Any) -> bool:  # only what ``raw`` (the record) holds
        if isinstance(raw, dict) and isinstance(a, dict) and isinstance(b, dict):
            return any(differs(raw[k], a.get(k), b.get(k)) for k in raw)
        return a != b

    diff = sorted(k for k in saved if k in new and differs(saved[k], old.get(k), new[k]))
    if not diff:
        return None
    return (f"cannot resume {path}: it trained with another quantization config for recipe "
            f"{cfg.recipe!r} than this version gives (differs in: {', '.join(diff)}); the later "
            "epochs would train on other settings under the same label — start a new run "
            "(another --out), or resume with the lowbit version that wrote it")


def resume_refusal(what: Path, saved: dict[str, Any], run_dir: Path, cfg: TrainConfig) -> str | None:
    """Why the run ``saved`` records (a checkpoint's or ``config.json``'s settings, read from
    ``what``) cannot be resumed with ``cfg``, or None (:func:`changed_settings`)."""
    diff = changed_settings(saved, cfg)
    if not diff:
        return None
    why = ("; the learning-rate schedule spans all epochs, so a run cannot be extended or "
           "cut: train a new run into another --out") if any(d.startswith("epochs ") for d in diff) else ""
    return (f"cannot resume {what}: it was made with a different " + ", ".join(diff) + why
            + f" (its settings are in {run_dir / 'config.json'}: resume with the same options)")


LOCK = ".lock"
_held: set[str] = set()  # run folders whose lock this process holds (run_lock is re-entrant)


class RunBusy(ValueError):
    """The run folder is being trained by another process (:func:`run_lock`)."""


def _holder(path: Path) -> str:
    """Who holds the lock, from the lock file's ``"pid host"`` line, for messages."""
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    pid, _, host = text.partition(" ")
    if pid.isdigit() and host and " " not in host:
        return f"process {pid} on {host}"
    return "another process (its lock file holds no readable pid)"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``run_dir/.lock`` while training, so that two
    processes — two sweeps whose grids overlap, a sweep and a ``lowbit train --resume`` —
    never train one run folder at once (both would write its checkpoints and metrics).
    The kernel releases the lock when its process ends, however it ends (killed,
    crashed), so a lock never outlives its holder and nothing has to be taken over; the
    file itself stays (it names the holder: ``"pid host"``, for the message). Re-entrant
    within a process (a sweep holds it around its state check and the training).
    Raises :class:`RunBusy` (a ``ValueError``) if another process holds it, ``ValueError``
    if the folder does not accept the file. Without ``fcntl`` (not POSIX) it locks nothing."""
    key = str(Path(run_dir).resolve())
    if key in _held:
        yield
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no advisory locks here
        yield
        return
    path = Path(run_dir) / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise ValueError(f"{run_dir}: cannot create its lock file ({exc.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"{run_dir} is being trained by {_holder(path)} (lock file {path}); "
                          "wait for it to finish") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
            os.ftruncate(fd, 0)  # released: no holder to name
    finally:
        os.close(fd)  # closing releases the flock


def is_busy(run_dir: Path) -> bool:
    """Whether another process holds ``run_dir``'s lock now (for ``--dry-run``)."""
    if not (Path(run_dir) / LOCK).exists():
        return False
    try:
        with run_lock(run_dir):
            return False
    except RunBusy:
        return True


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run folder's ``config.json`` as a dict; empty where there is none or it is not
    readable (a run started before the file, a damaged or foreign file)."""
    try:
        config = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


class DataMismatch(ValueError):
    """A run's epochs so far trained on another dataset than this process reads
    (:func:`check_same_data`)."""


def data_kind(source: object) -> str | None:
    """Which dataset a ``config.json`` ``data`` record names — its part before the first
    ``:`` (``fashion-mnist``, ``python3.11-doc``, ``python3.11-stdlib``; the path after it
    is only where that copy lay) — or ``None`` for a run recorded before the field.
    ``ValueError`` for a record that is not a string (a hand-edited file)."""
    if source is None:
        return None
    if not isinstance(source, str):
        raise ValueError(f"config.json's data record must be a string such as "
                         f"'fashion-mnist:/path', got {source!r}")
    return source.split(":", 1)[0] or None


def check_same_data(run_dir: Path, source: str | None) -> None:
    """:class:`DataMismatch` if ``run_dir``'s ``config.json`` records epochs trained on
    another dataset than ``source`` (:func:`data_kind`): a resumed run would mix two
    corpora, e.g. the Python docs on one machine and the standard library's sources on
    another."""
    recorded = read_config(run_dir).get("data")
    before, now = data_kind(recorded), data_kind(source)
    if before and now and before != now:
        raise DataMismatch(f"cannot resume {run_dir}: its epochs so far trained on {recorded}, "
                           f"this process reads {source}; one run trains on one dataset — resume "
                           "it where that data is ($LOWBIT_DATA, `make data`), or train a new run "
                           "into another --out")


# settings a resume may change (RESUMABLE_CHANGES but the folder): per session, as threads
SESSION_SETTINGS = ("monitor_every", "max_bad_steps")


def write_config(run_dir: Path, cfg: TrainConfig, fqt: FQTConfig, steps_per_epoch: int,
                 data: str | None = None, start_epoch: int = 0) -> None:
    """``config.json``: the run's settings, the resolved FQT config, and ``data``, which
    copy of the data it read (the text task's corpus falls back to the standard library's
    sources where the Python docs are missing: two machines can train on different text).
    A resume (``start_epoch`` > 0: from a checkpoint) keeps the first session's thread count,
    versions and the settings a resume may change (``monitor_every``, ``max_bad_steps``)
    and appends this session's to ``"resumed"`` (with the epoch it starts at) where they
    differ: rewritten, the record of a run that mixed 2 and 1 threads said 1, and a later
    resume at 1 thread warned of nothing (a review); a resume of a finished run with
    ``--monitor-every 3`` recorded 3 for a run monitored every 50 steps (a trial)."""
    train = cfg.to_dict()
    now = {"threads": torch.get_num_threads(), "lowbit": lowbit.__version__, "torch": torch.__version__,
           **{k: train[k] for k in SESSION_SETTINGS}}
    old = read_config(run_dir) if start_epoch > 0 else {}  # a resume from a checkpoint
    saved = old.get("train") if isinstance(old.get("train"), dict) else {}
    first = {k: (saved if k in SESSION_SETTINGS else old).get(k, v) for k, v in now.items()}
    train.update({k: first[k] for k in SESSION_SETTINGS})
    resumed = list(old.get("resumed", []))
    last = {k: resumed[-1].get(k, first[k]) for k in now} if resumed else first  # the latest session's
    if old and now != last:
        resumed.append({"epoch": start_epoch, **now})
    config = {
        "run": cfg.run_name(),
        "data": data,
        "train": train,
        "fqt": fqt.to_dict(),
        "recipe": lowbit.describe(fqt),
        "steps_per_epoch": steps_per_epoch,
        **{k: first[k] for k in now if k not in SESSION_SETTINGS},
    }
    if resumed:
        config["resumed"] = resumed
    write_atomic(run_dir / "config.json", json.dumps(config, indent=1) + "\n")


__all__ = ["LOCK", "DataMismatch", "RunBusy", "check_same_data", "data_kind", "is_busy", "load_resumable", "log", "read_config", "run_lock", "write_atomic",
           "write_config", "write_metrics", "write_status"]
