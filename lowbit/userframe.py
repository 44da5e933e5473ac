"""Where a warning points: the first frame of the user's code.

lowbit's warnings are raised deep inside torch's and lowbit's own frames — a kernel built
on first use inside a dispatcher call wrapped by ``torch.compiler.disable``, a layer's
first forward under ``nn.Module.__call__``, an optimizer step under torch's wrappers — so a
fixed ``stacklevel`` named a library line (a new user's walkthrough: ``torch/_dynamo/
eval_frame.py:1446``, ``lowbit/ops.py:369``). :func:`user_stacklevel` counts the frames
instead (as Python 3.12's ``skip_file_prefixes`` would; lowbit supports 3.11). Library
frames: torch's and lowbit's files, and the code ``torch.compile`` generates (FX's
``<eval_with_key>`` modules, inductor's cache). importlib's bootstrap frames are skipped
uncounted, as :func:`warnings.warn` skips them. Where no user frame exists (a backward run
by autograd's device threads, whose stack holds no Python caller) the outermost frame
there is named.
"""

from __future__ import annotations

import os
import sys

import torch


def _roots() -> tuple[str, ...]:
    here = os.path.dirname(os.path.abspath(__file__))  # lowbit's package directory
    return tuple(d + os.sep for d in (os.path.dirname(os.path.abspath(torch.__file__)), here))


_ROOTS = _roots()
_GENERATED = ("<eval_with_key>",)  # FX GraphModules' code (torch.compile's eager/aot backends)


def _library(filename: str) -> bool:
    """A frame of torch, lowbit, or code torch.compile generated (FX modules, inductor's
    cache directory: ``TORCHINDUCTOR_CACHE_DIR`` or a ``torchinductor_<user>`` folder)."""
    if filename.startswith(_GENERATED):
        return True
    path = os.path.abspath(filename)
    if path.startswith(_ROOTS) or f"{os.sep}torchinductor_" in path:
        return True
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    return bool(cache) and path.startswith(os.path.abspath(cache) + os.sep)


def _internal(filename: str) -> bool:
    """importlib's bootstrap frames, which :func:`warnings.warn` neither counts nor names."""
    return "importlib" in filename and "_bootstrap" in filename


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes :func:`warnings.warn`, called from the function that
    calls this one, name the first frame outside torch and lowbit (2 where that is the
    function's own caller; the outermost frame where every frame is the library's)."""
    f = sys._getframe(1).f_back  # the warning function's caller: stacklevel 2
    level, last = 2, 1
    while f is not None:
        name = f.f_code.co_filename
        if not _internal(name):
            if not _library(name):
                return level
            last, level = level, level + 1
        f = f.f_back
    return last


__all__ = ["user_stacklevel"]
