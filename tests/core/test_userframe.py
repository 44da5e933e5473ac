"""Warnings raised inside lowbit on the user's behalf name the user's line
(lowbit.userframe.user_stacklevel; a new user's walkthrough found lowbit/ops.py and
torch/_dynamo/eval_frame.py named instead)."""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

import lowbit
from lowbit.ops import AdaptiveRecipeWarning


def _only(seen: list[warnings.WarningMessage], category: type[Warning]) -> warnings.WarningMessage:
    ours = [w for w in seen if issubclass(w.category, category)]
    assert len(ours) == 1, [str(w.message) for w in seen]
    return ours[0]


def test_a_bad_switch_value_names_the_users_line(monkeypatch) -> None:
    """``LOWBIT_AVX512=nah``, read when the first quantization builds the kernel (inside
    the layer's forward, lowbit's dispatcher and torch's ``compiler.disable`` wrapper)."""
    from lowbit.kernels import avx512

    monkeypatch.setenv("LOWBIT_AVX512", "nah")
    avx512._library.cache_clear()  # read the switch again at the next use
    layer = lowbit.convert(nn.Linear(16, 8), lowbit.FQTConfig.from_recipe("fqt-psq-8"))
    x = torch.randn(4, 16)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1
            layer(x)
    finally:
        monkeypatch.undo()
        avx512._library.cache_clear()
    w = [w for w in seen if "LOWBIT_AVX512='nah'" in str(w.message)]
    assert w and all((m.filename, m.lineno) == (__file__, line) for m in w), [(m.filename, m.lineno) for m in seen]


def test_the_adaptive_recipe_warning_names_the_users_backward() -> None:
    layer = lowbit.convert(nn.Linear(16, 8), lowbit.FQTConfig.from_recipe("fqt-auto"))
    y = layer(torch.randn(4, 16))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        y.sum().backward()
    w = _only(seen, AdaptiveRecipeWarning)
    assert (w.filename, w.lineno) == (__file__, line)
