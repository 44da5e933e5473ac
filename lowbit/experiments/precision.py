"""Training precision: a bfloat16 model, float32 BatchNorm statistics, float32 master
copies, and what the weights and optimizer state cost per parameter.

``to_bfloat16(model)`` runs a model in bfloat16 (inputs cast on entry; BatchNorm keeps
float32 running statistics and normalises in float32); ``MasterWeights`` is the
mixed-precision baseline's float32 copy that torch's optimizer updates;
``memory_row`` gives the bytes per parameter the trainer logs.
"""

from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn import functional as F

import lowbit.optim


class MasterWeights:
    """float32 master copies of a bfloat16 model's parameters (the mixed-precision
    baseline): the optimizer updates the masters, the model gets their bfloat16 rounding."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.pairs = [(p, p.detach().float().clone().requires_grad_(True)) for p in params]
        self.of = {id(p): m for p, m in self.pairs}

    @torch.no_grad()
    def grads_in(self) -> None:
        """Gradients to the masters. A parameter written from outside since the last
        ``weights_out`` (load_state_dict, copy_, ...) no longer equals its master's
        rounding: that master takes its value, so the write is not undone."""
        for p, m in self.pairs:
            r = m.to(p.dtype)
            if not (torch.equal(p, r) or torch.allclose(p, r, rtol=0, atol=0, equal_nan=True)):
                m.copy_(p)
            m.grad = None if p.grad is None else p.grad.float()

    @torch.no_grad()
    def weights_out(self) -> None:
        for p, m in self.pairs:
            p.copy_(m)

    def state(self) -> list[torch.Tensor]:
        return [m.detach().clone() for _, m in self.pairs]

    @torch.no_grad()
    def load(self, masters: list[torch.Tensor]) -> None:
        for (_, m), saved in zip(self.pairs, masters, strict=True):
            m.copy_(saved)
        self.weights_out()


def _batchnorm_float32_forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``bn(x)`` computed in float32 against float32 running statistics, returned in
    ``x``'s dtype (the parameters may be bfloat16: gradients flow through the casts)."""
    bn._check_input_dim(x)
    factor = 0.0
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or bn.running_mean is None
    track = not bn.training or bn.track_running_stats
    y = F.batch_norm(x.float(), bn.running_mean if track else None,
                     bn.running_var if track else None,
                     None if bn.weight is None else bn.weight.float(),
                     None if bn.bias is None else bn.bias.float(), batch_stats, factor, bn.eps)
    return y.to(x.dtype)


def _float32_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Keep ``bn``'s running statistics in float32 and normalise in float32: they are
    statistics, not weights, and a bfloat16 running average drops the small updates a
    momentum of 0.1 makes."""
    for name in ("running_mean", "running_var"):
        if getattr(bn, name) is not None:
            setattr(bn, name, getattr(bn, name).float())
    bn.forward = types.MethodType(_batchnorm_float32_forward, bn)  # survives deepcopy


def to_bfloat16(model: nn.Module) -> nn.Module:
    """Parameters and buffers to bfloat16 (BatchNorm statistics stay float32, see
    :func:`_float32_batchnorm`); floating inputs are cast on entry (a forward
    pre-hook), so the task's data need not change."""
    model.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _float32_batchnorm(m)

    def bf16(a: object) -> object:
        return a.to(torch.bfloat16) if torch.is_tensor(a) and a.is_floating_point() else a

    def cast(_: nn.Module, args: tuple, kwargs: dict) -> tuple:  # keyword inputs too
        return tuple(bf16(a) for a in args), {k: bf16(v) for k, v in kwargs.items()}

    model.register_forward_pre_hook(cast, with_kwargs=True)
    return model


def memory_row(optimizer: torch.optim.Optimizer, bf16_model: nn.Module | None = None,
                ) -> dict[str, float]:
    """Bytes per parameter: everything held (``bytes_per_param``) and the stored training
    state alone, weights + optimizer state without a decode buffer (``..._stored``).
    ``bf16_model``: the optimizer holds float32 masters of this model's bfloat16
    parameters, which count too."""
    mem = lowbit.optim.memory_breakdown(optimizer)
    extra = 0.0
    if bf16_model is not None:
        ps = list(bf16_model.parameters())
        extra = sum(p.numel() * p.element_size() for p in ps) / max(1, sum(p.numel() for p in ps))
    return {"bytes_per_param": mem["total"] + extra,
            "bytes_per_param_stored": mem["weights"] + mem["state"] + extra}


__all__ = ["MasterWeights", "memory_row", "to_bfloat16"]
