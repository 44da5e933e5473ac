"""Files written whole or not at all: the data goes to a temporary file beside the target,
then ``os.replace`` renames it over the target, so a reader — or the next run after a
kill — sees the old file or the new one, never half of one (README fault kinds 28 and
263). A leaf module (no lowbit imports): the experiments, the analysis tools, the
figures and the launcher all write through it."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def replace_with(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` with a binary file open on a temporary file beside ``path`` (in its
    folder, a name unique to this writer), then rename it over ``path``; returns the
    path written. A symlink is followed (its target replaced, the link kept); the old
    file's permission bits are kept, a new file gets the umask's; the temporary file is
    removed if ``write`` or the rename fails (the exception propagates)."""
    path = Path(os.path.realpath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        mode = stat.S_IMODE(os.stat(path).st_mode) if path.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """``text`` (UTF-8 for a str) as the whole content of ``path``, by :func:`replace_with`."""
    data = text.encode() if isinstance(text, str) else text
    replace_with(path, lambda f: f.write(data))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


__all__ = ["replace_with", "write_atomic"]
