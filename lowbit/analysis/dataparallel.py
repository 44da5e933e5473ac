"""Data parallelism simulated in one process, for the variance measurements.

A data-parallel step with ``N`` ranks averages the gradients of ``N`` shards of the global
batch (rank ``r`` holds rows ``r, r + N, ...``, as the trainer splits them; BatchNorm
normalises each shard with its own statistics, as DDP does without SyncBatchNorm). With
quantized communication the average is :func:`lowbit.distributed.quantized_mean` of
the per-rank gradients, parameter by parameter — bitwise what
:func:`lowbit.distributed.quantized_allreduce_hook` computes on ``N`` real ranks (tested),
so measuring here measures the hook (for parameters in row-major memory: a channels-last
weight's blocks differ, :func:`lowbit.distributed.quantized_mean`), each parameter's
average in its own dtype, as its bucket holds it (:func:`comm_average`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..distributed import GradComm, quantized_mean
from ._model import FlatGrads, LossFn


def shard(batch: object, rank: int, world: int) -> object:
    """Rank ``rank``'s rows of ``batch`` (a tensor or a tuple/list of tensors, batch
    first): ``t[rank::world]``. Raises ``TypeError`` for anything else."""
    if isinstance(batch, torch.Tensor):
        return batch[rank::world]
    if isinstance(batch, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in batch):
        return type(batch)(t[rank::world] for t in batch)
    raise TypeError("with world_size > 1 a batch must be a tensor or a tuple of tensors "
                    f"(batch first), got {type(batch).__name__}")


def rank_grads(model: nn.Module, loss_fn: LossFn, batch: object, flat: FlatGrads,
               world: int) -> torch.Tensor:
    """Each rank's flat gradient on its shard: ``(world, flat.numel)`` of ``flat.dtype``."""
    return torch.stack([flat.grads(model, loss_fn, shard(batch, r, world)) for r in range(world)])


def parameter_index(model: nn.Module, flat: FlatGrads) -> list[int]:
    """Index of each of ``flat``'s parameters in ``model.named_parameters()``: the key of
    its communication noise (:func:`lowbit.distributed.comm_noise_seed`)."""
    order = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    return [order[n] for n in flat.names]


def comm_average(grads: torch.Tensor, flat: FlatGrads, index: list[int], comm: GradComm,
                 call: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantized average of per-rank gradients ``grads`` (``(N, flat.numel)``) at
    communication ``call``, and the exact variance it adds, per parameter: a float64
    vector with parameter ``p``'s variance (:func:`lowbit.distributed.quantized_mean`:
    ``(1/N²)·Σ_r Var Q(g_r)``, plus the rounding into bfloat16) at its first element and
    zeros elsewhere (so summing a group's slice gives the group's). Each parameter's
    average is taken in its own dtype, the dtype of its DDP bucket (:class:`FlatGrads`
    holds a bfloat16 or float16 gradient in float32, and every gradient in float64 where a
    parameter is float64, exactly; a review found float32 ones averaged in float64), and
    written back exactly in ``grads``' dtype: a bfloat16 parameter's
    average is stochastically rounded into bfloat16 and a float16 one's rounded to nearest,
    as the hook writes them (the float16 rounding is a deterministic error of up to half an
    ulp per element, in the measured average and not in the exact variance)."""
    out = torch.empty(grads.shape[1], dtype=grads.dtype)
    var = torch.zeros(grads.shape[1], dtype=torch.float64)
    start = 0
    for p, i in zip(flat.params, index):
        seg = slice(start, start + p.numel())
        low = p.dtype != grads.dtype
        g = grads[:, seg].to(p.dtype) if low else grads[:, seg]  # exact: they came from p.dtype
        avg, v = quantized_mean(g, comm, i, call)
        out[seg] = avg.to(p.dtype) if low else avg  # float16: the hook's rounding to nearest
        if p.numel():
            var[start] = v
        start = seg.stop
    return out, var


__all__ = ["comm_average", "parameter_index", "rank_grads", "shard"]
