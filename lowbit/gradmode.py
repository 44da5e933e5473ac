"""A training step's forward and backward run from inside ``torch.no_grad()`` or
``torch.inference_mode()``: what :func:`lowbit.coverage` and the variance measurements
(:mod:`lowbit.analysis`) do when a user calls them there (an evaluation block, a
notebook cell under ``inference_mode``). A new user's trial found coverage under
``inference_mode`` blaming "frozen parameters, or pass loss_fn", and
``gradient_variance`` under either failing with torch's bare "element 0 of tensors does
not require grad".

``torch.inference_mode(False)`` and ``torch.enable_grad()`` restore autograd inside;
tensors made in inference mode (inputs, a batch) are copied by :func:`saveable`, as
autograd cannot save an inference tensor for the backward."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Mapping, MutableMapping
from typing import TypeVar

import torch

T = TypeVar("T")


@contextlib.contextmanager
def training_grad_mode() -> Iterator[None]:
    """Autograd on for the block, whatever the caller's ``no_grad`` or ``inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def saveable(tree: T) -> T:
    """``tree`` with each inference tensor replaced by a normal copy, for a backward to save,
    through tuples (named ones too), lists, mappings (dicts, Hugging Face's
    ``BatchEncoding``: a copy of the same type) and dataclasses; anything else, and a
    container holding no inference tensor, is returned as it is (the same object). Call it
    inside :func:`training_grad_mode` (a copy made in inference mode is an inference
    tensor). A review found ``torch.utils._pytree`` leaving a ``BatchEncoding`` and a
    dataclass batch untouched."""
    if isinstance(tree, torch.Tensor):
        return tree.clone() if tree.is_inference() else tree  # type: ignore[return-value]
    if isinstance(tree, (list, tuple)):
        items = [saveable(t) for t in tree]
        if all(a is b for a, b in zip(items, tree)):
            return tree
        if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # a namedtuple
            return type(tree)(*items)  # type: ignore[return-value]
        return type(tree)(items)  # type: ignore[call-arg]
    if isinstance(tree, Mapping):
        items = {k: saveable(v) for k, v in tree.items()}
        if all(items[k] is v for k, v in tree.items()):
            return tree
        if isinstance(tree, MutableMapping):
            new = copy.copy(tree)
            new.update(items)
            return new  # type: ignore[return-value]
        return items  # type: ignore[return-value]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        changed = {f.name: saveable(getattr(tree, f.name)) for f in dataclasses.fields(tree) if f.init}
        if all(v is getattr(tree, k) for k, v in changed.items()):
            return tree
        return dataclasses.replace(tree, **changed)  # type: ignore[return-value]
    return tree
