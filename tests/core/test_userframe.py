"""Warnings raised inside lowbit on the user's behalf name the user's line
(lowbit.userframe.user_stacklevel; a new user's walkthrough found lowbit/ops.py and
torch/_dynamo/eval_frame.py named instead)."""

from __future__ import annotations

import contextlib
import inspect
import warnings
from collections.abc import Iterator

import torch
from torch import nn

import lowbit
from lowbit.ops import AdaptiveRecipeWarning


def _only(seen: list[warnings.WarningMessage], category: type[Warning]) -> warnings.WarningMessage:
    ours = [w for w in seen if issubclass(w.category, category)]
    assert len(ours) == 1, [str(w.message) for w in seen]
    return ours[0]


@contextlib.contextmanager
def _bad_avx512_switch(monkeypatch) -> Iterator[list[warnings.WarningMessage]]:
    """``LOWBIT_AVX512=nah``, read again at the next quantization (the kernel's load is
    redone), every warning recorded; the switch and the kernel restored afterwards."""
    from lowbit.kernels import avx512

    monkeypatch.setenv("LOWBIT_AVX512", "nah")
    avx512._library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            yield seen
    finally:
        monkeypatch.undo()
        avx512._library.cache_clear()


def _switch_warnings_at(seen: list[warnings.WarningMessage], line: int) -> None:
    w = [m for m in seen if "LOWBIT_AVX512='nah'" in str(m.message)]
    assert w and all((m.filename, m.lineno) == (__file__, line) for m in w), [(m.filename, m.lineno) for m in w]


def test_a_bad_switch_value_names_the_users_line(monkeypatch) -> None:
    """``LOWBIT_AVX512=nah``, read when the first quantization builds the kernel (inside
    the layer's forward, lowbit's dispatcher and torch's ``compiler.disable`` wrapper)."""
    layer = lowbit.convert(nn.Linear(16, 8), lowbit.FQTConfig.from_recipe("fqt-psq-8"))
    x = torch.randn(4, 16)
    with _bad_avx512_switch(monkeypatch) as seen:
        line = inspect.currentframe().f_lineno + 1
        layer(x)
    _switch_warnings_at(seen, line)


def test_the_adaptive_recipe_warning_names_the_users_backward() -> None:
    layer = lowbit.convert(nn.Linear(16, 8), lowbit.FQTConfig.from_recipe("fqt-auto"))
    y = layer(torch.randn(4, 16))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        y.sum().backward()
    w = _only(seen, AdaptiveRecipeWarning)
    assert (w.filename, w.lineno) == (__file__, line)


def test_no_user_frame_gives_the_outermost_frame_not_an_error() -> None:
    """A thread whose first Python frame calls the library (as autograd's device threads
    run a DDP comm hook: no Python caller below it) — the walk stops at the outermost
    frame; ``sys._getframe(2)`` raised ``ValueError`` there (a review)."""
    import _thread
    import threading

    from lowbit.userframe import user_stacklevel

    got, done = [], threading.Event()

    def first_frame() -> None:
        try:
            got.append(user_stacklevel())
        except Exception as exc:  # noqa: BLE001 (the failure is the result)
            got.append(exc)
        done.set()

    _thread.start_new_thread(first_frame, ())
    assert done.wait(10) and got == [1]


def test_a_warning_under_torch_compile_names_the_users_line(monkeypatch) -> None:
    """Code torch.compile generates (FX's ``<eval_with_key>`` modules) is the library's
    too: the switch warning of the first quantization inside a compiled forward names the
    call (a review: it named ``<eval_with_key>.1``)."""
    model = torch.compile(lowbit.convert(nn.Sequential(nn.Linear(16, 8)), lowbit.FQTConfig.from_recipe("fqt-psq-8")),
                          backend="eager")
    with _bad_avx512_switch(monkeypatch) as seen:
        line = inspect.currentframe().f_lineno + 1
        model(torch.randn(4, 16))
    _switch_warnings_at(seen, line)


def test_a_warning_at_import_names_no_lowbit_line() -> None:
    """importlib's bootstrap frames are skipped uncounted, as warnings.warn skips them: a
    switch read while ``import lowbit`` runs named ``lowbit/kernels/avx512.py`` (a review)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LOWBIT_COMPILE": "nah"}
    r = subprocess.run([sys.executable, "-c", "import lowbit"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "LOWBIT_COMPILE='nah'" in r.stderr, r.stderr
    assert f"lowbit{os.sep}" not in r.stderr.split("RuntimeWarning")[0], r.stderr
