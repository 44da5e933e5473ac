"""Where a warning points: the first frame of the user's code.

lowbit's warnings are raised deep inside torch's and lowbit's own frames — a kernel built
on first use inside a dispatcher call wrapped by ``torch.compiler.disable``, a layer's
first forward under ``nn.Module.__call__``, an optimizer step under torch's wrappers — so a
fixed ``stacklevel`` named a library line (a new user's walkthrough: ``torch/_dynamo/
eval_frame.py:1446``, ``lowbit/ops.py:369``). :func:`user_stacklevel` counts the frames
instead (as Python 3.12's ``skip_file_prefixes`` would; lowbit supports 3.11).
"""

from __future__ import annotations

import os
import sys

import torch


def _roots() -> tuple[str, ...]:
    here = os.path.dirname(os.path.abspath(__file__))  # lowbit's package directory
    return tuple(d + os.sep for d in (os.path.dirname(os.path.abspath(torch.__file__)), here))


_ROOTS = _roots()


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes :func:`warnings.warn`, called from the function that
    calls this one, name the first frame outside torch and lowbit (2 where that is the
    function's own caller)."""
    f, level = sys._getframe(2), 2
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(_ROOTS):
        f, level = f.f_back, level + 1
    return level


__all__ = ["user_stacklevel"]
