"""Low-precision weights and updates without a float32 master copy.

Weights live in bfloat16; each update is computed in float32 for one parameter at a
time and written back with *stochastic rounding* to bfloat16, so ``E[w_new] = w + Δ``
exactly: small updates that round-to-nearest would drop (``|Δ| < ulp/2``) survive in
expectation. Optimizer state (momentum) is kept in bfloat16 the same way.

bfloat16 is the top half of a float32: adding uniform noise to the 16 low bits of the
float32 pattern and truncating them is stochastic rounding onto the bfloat16 grid.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

_LOW16 = 0xFFFF


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """float32 → bfloat16 with stochastic rounding: ``E[result] = x`` for finite ``x``
    whose neighbours on the bfloat16 grid are finite. NaN and ±Inf stay as they are."""
    x = x.float()
    bits = x.view(torch.int32)
    noise = torch.randint(0, _LOW16 + 1, x.shape, generator=generator, dtype=torch.int32,
                          device=x.device)
    rounded = ((bits + noise) & ~_LOW16).view(torch.float32)
    # Non-finite inputs (and overflow past the largest bfloat16) keep their own value.
    out = torch.where(torch.isfinite(x) & torch.isfinite(rounded), rounded, x)
    return out.to(torch.bfloat16)  # exact: the low 16 bits are zero


class SRSGD(torch.optim.Optimizer):
    """SGD with momentum for bfloat16 parameters, updated with stochastic rounding.

    ``v ← μ v + g + λ w``, ``w ← w − lr · v``, each computed in float32 and stored back
    to bfloat16 with :func:`stochastic_round_bf16` (unbiased). Bytes per parameter:
    2 (weight) + 2 (momentum), against 4 + 4 (+ 4 for a float32 master copy) for fp32
    training. ``generator`` seeds the rounding noise (reproducible runs).
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, generator: torch.Generator | None = None) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be ≥ 0, got {weight_decay}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype != torch.bfloat16:
                    raise TypeError(f"SRSGD keeps weights in bfloat16; got a {p.dtype} parameter "
                                    "(convert the model with model.to(torch.bfloat16))")
        self.generator = generator

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad.float()
                if wd:
                    d = d + wd * p.float()
                if mu:
                    state = self.state[p]
                    if "momentum" not in state:
                        buf = d
                    else:
                        buf = mu * state["momentum"].float() + d
                    state["momentum"] = stochastic_round_bf16(buf, self.generator)
                    d = buf
                p.copy_(stochastic_round_bf16(p.float() - lr * d, self.generator))
        return loss


def bytes_per_parameter(optimizer: torch.optim.Optimizer) -> float:
    """Weights plus optimizer state, in bytes per parameter."""
    n = total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            n += p.numel()
            total += p.numel() * p.element_size()
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, torch.Tensor):
                    total += v.numel() * v.element_size()
    return total / max(n, 1)


__all__ = ["SRSGD", "bytes_per_parameter", "stochastic_round_bf16"]
