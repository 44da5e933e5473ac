"""Gradient variance of a converted model, measured by repeated backward passes."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import FQTConfig
from ..nn import fqt_layers

LossFn = Callable[[nn.Module, object], torch.Tensor]


@contextlib.contextmanager
def with_config(model: nn.Module, config_fn: Callable[[FQTConfig], FQTConfig]) -> Iterator[nn.Module]:
    """Temporarily give every converted layer ``config_fn(layer.config)``."""
    layers = fqt_layers(model)
    saved = {n: m.config for n, m in layers.items()}
    try:
        for m in layers.values():
            m.config = config_fn(m.config)
        yield model
    finally:
        for n, m in layers.items():
            m.config = saved[n]


def qat_of(config: FQTConfig) -> FQTConfig:
    """The QAT twin of a config: same forward, exact (STE) backward."""
    return dataclasses.replace(config, grad_input=None, grad_weight=None)


def _grads(model: nn.Module, loss_fn: LossFn, batch: object) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn(model, batch).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@contextlib.contextmanager
def _frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Restore buffers (e.g. BatchNorm running stats) after repeated forwards."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


def quantization_variance(
    model: nn.Module, loss_fn: LossFn, batch: object, repeats: int = 8
) -> dict[str, float]:
    """``E‖g_FQT − g_QAT‖²`` on one minibatch, per parameter and in ``"total"``.

    ``g_QAT`` is computed exactly (the layers' configs with the gradient quantizers
    removed); the expectation over quantization noise is the mean of ``repeats``
    independent FQT backward passes — an unbiased estimate. ``loss_fn(model, batch)``
    returns the scalar loss.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    with _frozen_buffers(model):
        with with_config(model, qat_of):
            exact = _grads(model, loss_fn, batch)
        acc = {n: 0.0 for n in exact}
        for _ in range(repeats):
            g = _grads(model, loss_fn, batch)
            for n in acc:
                acc[n] += float((g[n] - exact[n]).double().pow(2).sum()) / repeats
    model.zero_grad(set_to_none=True)
    acc["total"] = sum(acc.values())
    return acc
