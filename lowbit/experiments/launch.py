"""torchrun as ``lowbit train --nproc N`` runs it: ``torch.distributed.run`` in this
process, its ending told to the launcher instead of as a traceback.

    python -m lowbit.experiments.launch --standalone --nproc-per-node=N -m lowbit train ...

The arguments are torchrun's. Where torchrun's own ``main`` ends a failed job with a
``ChildFailedError`` — a 40-line traceback after the ranks' own messages, even for a
one-line usage error every rank printed (a review) — this module writes the failed
ranks to ``failures.json`` in the folder ``$LOWBIT_LAUNCH_DIR`` names
(:func:`write_failures`), for :func:`lowbit.experiments.train.explain_ending` to put in
words, and exits with status 1. A signal that stopped torchrun (SIGINT, SIGTERM: it
stops the ranks with it first) exits with ``128 + signal`` instead of its traceback.
torchrun's log line naming the first failure is left out (the launcher names them all),
and so are its lines stopping the other ranks after one found a usage error; its other
lines stay.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from lowbit.atomic import write_atomic

LAUNCH_DIR = "LOWBIT_LAUNCH_DIR"  # the launcher's folder for the ranks' errors and failures.json
FAILURES = "failures.json"
RANK_ERROR = "rank{}.error"  # the usage error a rank leaves there


def report_usage_error(line: str) -> bool:
    """Under ``lowbit train --nproc N`` (``$LOWBIT_LAUNCH_DIR`` set): leave this rank's
    one-line usage error for the launcher, which prints it once for all ranks
    (:func:`lowbit.experiments.train.explain_ending`), and return True; elsewhere (or if
    the file cannot be written) False: print it yourself. Called by :func:`lowbit.cli.main`."""
    folder = os.environ.get(LAUNCH_DIR)
    if not folder:
        return False
    try:
        write_atomic(Path(folder) / RANK_ERROR.format(int(os.environ.get("RANK", "0"))), line + "\n")
    except (OSError, ValueError):
        return False
    return True


class _Quieter(logging.Filter):
    """Drops torchrun's ``failed (exitcode: ...) local_rank: ...`` record (the launcher
    names every failed rank), and its ``Sending process ... closing signal`` ones once a
    rank has left a usage error in ``folder`` (the others stopped for it: the launcher's
    one line says why)."""

    def __init__(self, folder: str | None) -> None:
        super().__init__()
        self.folder = Path(folder) if folder else None

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if msg.startswith("failed (exitcode"):
            return False
        if msg.startswith("Sending process") and self.folder is not None:
            return not any(self.folder.glob(RANK_ERROR.format("*")))
        return True


def write_failures(folder: Path, failures: dict) -> None:
    """``failures.json``: ``{rank: {"exitcode", "pid", "time"}}`` of ``ChildFailedError``'s
    ``failures`` (a negative exit code: killed by that signal; ``time``: when torchrun saw
    it, whole seconds)."""
    data = {str(rank): {"exitcode": int(f.exitcode), "pid": int(f.pid), "time": float(f.timestamp)}
            for rank, f in failures.items()}
    write_atomic(folder / FAILURES, json.dumps(data) + "\n")


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    folder = os.environ.get(LAUNCH_DIR)
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_Quieter(folder))
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as exc:
        if folder:
            write_failures(Path(folder), exc.failures)
        else:  # not under the launcher: torchrun's own account
            print(exc, file=sys.stderr)
        return 1
    except SignalException as exc:  # torchrun has stopped the ranks
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
