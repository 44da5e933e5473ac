"""Crash-safe checkpoints: ``last.pt`` written atomically, ``prev.pt`` kept as a fallback.

A checkpoint is a plain dict (loaded with ``weights_only=True``)::

    model, optimizer, scheduler     state_dicts
    epoch, step                     epochs completed, optimizer steps taken
    train_config, fqt_config        the run's TrainConfig and resolved FQTConfig, as dicts
    history, bad_in_a_row           per-epoch metric rows so far; current run of bad steps
    rng                             torch_global, data (generator) and sr (lowbit.rng_state)

    digest                          SHA-256 of all of the above (:func:`digest`)

Saving writes a temporary file in the run folder, fsyncs it, renames the old ``last.pt``
to ``prev.pt`` and the temporary file to ``last.pt`` (each ``os.replace`` is atomic), then
fsyncs the folder. A kill at any moment leaves at least one complete checkpoint (an
interrupt between the two renames completes the second; a kill there leaves the new one
as the temporary file, which loading takes as ``last.pt`` when it reads whole and is
newer than ``prev.pt``; a save removes the temporary files earlier kills left). A save
that fails (a full disk) raises :class:`CheckpointError` naming the file and the space
left: a save needs room for about three checkpoints at once (``last.pt``, ``prev.pt``
and the new file). Loading checks the zip records'
CRC-32s and then the digest of the loaded values: damage the CRCs do not cover (the zip's
central directory, which can make torch read a record as empty) loaded wrong weights
silently before. A damaged ``last.pt`` is renamed ``last.pt.damaged`` when ``prev.pt`` is
used, so the next save does not rotate it over the good one.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lowbit

LAST, PREV, DAMAGED = "last.pt", "prev.pt", "last.pt.damaged"
TMP_GLOB = ".last-*.pt.tmp"  # save_checkpoint's temporary files
REQUIRED_KEYS = frozenset({
    "model", "optimizer", "scheduler", "epoch", "step", "train_config", "fqt_config", "history",
    "bad_in_a_row", "rng",
})  # fmt: skip


class CheckpointError(RuntimeError):
    """No usable checkpoint although one was expected."""


def capture_rng(model: nn.Module, data_generator: torch.Generator) -> dict[str, Any]:
    """Every random state the training loop draws from."""
    return {
        "torch_global": torch.get_rng_state(),
        "data": data_generator.get_state(),
        "sr": lowbit.rng_state(model),
    }


def restore_rng(model: nn.Module, data_generator: torch.Generator, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_global"])
    data_generator.set_state(state["data"])
    lowbit.load_rng_state(model, state["sr"])


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform / filesystem
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _feed(h: Any, obj: Any) -> None:
    """Add ``obj`` (what ``weights_only`` loads: tensors, dicts, lists, tuples, numbers,
    strings, None) to the hash ``h``, its structure and types included."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__[0]}{len(obj)};".encode())
        for x in obj:
            _feed(h, x)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def digest(state: dict[str, Any]) -> str:
    """SHA-256 (hex) of a checkpoint's values, without its ``digest`` entry."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "digest"})
    return h.hexdigest()


def save_checkpoint(run_dir: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (with its :func:`digest`) to ``run_dir/last.pt`` atomically, keeping
    the old one as ``prev.pt``."""
    missing = REQUIRED_KEYS - set(state)
    if missing:
        raise ValueError(f"checkpoint state lacks {sorted(missing)}")
    state = {**state, "digest": digest(state)}
    run_dir = Path(run_dir)
    last = run_dir / LAST
    stale = list(run_dir.glob(TMP_GLOB))  # left by kills of earlier saves (module docstring)
    written, tmp = False, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=".last-", suffix=".pt.tmp", dir=run_dir)
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        written = True
        if last.exists():
            os.replace(last, run_dir / PREV)
        os.replace(tmp, last)
    except BaseException as exc:
        if tmp is not None and written and not last.exists() and Path(tmp).exists():
            os.replace(tmp, last)  # interrupted between the renames: the new one is whole
        elif tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception):  # torch's "unexpected pos" on a full disk named neither
            free = shutil.disk_usage(run_dir).free / 2**20
            raise CheckpointError(f"cannot write checkpoint {last}: {type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0] if str(exc) else ''} ({free:.1f} MiB free "
                                  f"in {run_dir}; a save needs room for about three checkpoints: "
                                  "last.pt, prev.pt and the new file)") from exc
        raise
    for path in stale:
        path.unlink(missing_ok=True)
    _fsync_dir(run_dir)
    return last


def _recover_interrupted(run_dir: Path) -> None:
    """Where ``last.pt`` is missing, the newest temporary file a save killed between its
    renames left (whole: it reads and matches its digest) becomes ``last.pt`` if it is
    newer than ``prev.pt`` — its epoch was otherwise trained again."""
    prev_epoch = -1
    if (run_dir / PREV).exists():
        try:
            prev_epoch = int(_read(run_dir / PREV)["epoch"])
        except Exception:  # noqa: BLE001 - an unreadable prev.pt: any whole newer file wins
            prev_epoch = -1
    for tmp in sorted(run_dir.glob(TMP_GLOB), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            epoch = int(_read(tmp)["epoch"])
        except Exception:  # noqa: BLE001 - partly written: not a checkpoint
            continue
        if epoch > prev_epoch:
            os.replace(tmp, run_dir / LAST)
            print(f"warning: {tmp.name} was a complete checkpoint (epoch {epoch}) left by a save "
                  "killed between its renames; using it as last.pt", file=sys.stderr)
        return


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint at ``path``, its records first checked against the zip archive's
    CRC-32s (``torch.load`` does not: a flipped bit inside a tensor record loaded as a
    wrong weight, silently), then its values against their :func:`digest` (checkpoints
    written before the digest have none). ``zipfile.BadZipFile`` names a damaged record,
    ``ValueError`` a digest mismatch."""
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()  # reads every record once (a few MB: milliseconds)
    if bad is not None:
        raise zipfile.BadZipFile(f"record {bad} fails its CRC-32 check (the file is damaged)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not REQUIRED_KEYS <= set(state):
        raise ValueError("not a lowbit training checkpoint (keys missing)")
    if "digest" in state and state["digest"] != digest(state):
        raise ValueError("its values do not match their SHA-256 digest (the file is damaged)")
    return state


def load_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint of ``run_dir`` and its path, or None if there is none.

    A truncated or corrupt ``last.pt`` is reported on stderr and ``prev.pt`` is used
    instead; if both exist and neither loads, raises :class:`CheckpointError`.
    """
    run_dir = Path(run_dir)
    if not (run_dir / LAST).exists():
        _recover_interrupted(run_dir)
    errors = []
    for name in (LAST, PREV):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            state = _read(path)
        except (
            RuntimeError,
            EOFError,
            OSError,
            ValueError,
            pickle.UnpicklingError,
            zipfile.BadZipFile,
            zlib.error,
        ) as exc:
            errors.append(
                f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
            print(
                f"warning: cannot load checkpoint {path} ({errors[-1]}); "
                + ("trying prev.pt" if name == LAST else "no older checkpoint"),
                file=sys.stderr,
            )
            continue
        if name == PREV:
            damaged = run_dir / LAST
            if damaged.exists():  # kept aside: the next save must not rotate it over prev.pt
                os.replace(damaged, run_dir / DAMAGED)
            print(
                f"warning: resuming from the previous checkpoint {path} "
                f"(epoch {state['epoch']}); last.pt was missing or unreadable"
                + (f" (kept as {DAMAGED})" if (run_dir / DAMAGED).exists() else ""),
                file=sys.stderr,
            )
        return state, path
    if errors:
        raise CheckpointError("no usable checkpoint in " + str(run_dir) + ": " + "; ".join(errors))
    return None


__all__ = [
    "DAMAGED",
    "LAST",
    "PREV",
    "CheckpointError",
    "capture_rng",
    "digest",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]
