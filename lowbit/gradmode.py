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
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
from torch.utils._pytree import tree_map

T = TypeVar("T")


@contextlib.contextmanager
def training_grad_mode() -> Iterator[None]:
    """Autograd on for the block, whatever the caller's ``no_grad`` or ``inference_mode``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def saveable(tree: T) -> T:
    """``tree`` (tensors in tuples, lists, dicts) with each inference tensor replaced by a
    normal copy (others as they are), for a backward to save; call it inside
    :func:`training_grad_mode` (a copy made in inference mode is an inference tensor)."""
    return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t, tree)


def runs_training_steps(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` (a measurement that runs forward and backward passes) run under
    :func:`training_grad_mode`: the same numbers inside ``no_grad`` or ``inference_mode``
    as outside (a trial found ``gradient_variance``'s bound ratio 304 where it was 0.19:
    its bound's own backward passes ran under the caller's inference mode)."""
    @functools.wraps(fn)
    def wrapper(*args: object, **kwargs: object) -> T:
        with training_grad_mode():
            return fn(*args, **kwargs)
    return wrapper
