"""Data parallelism for the trainer: the ranks, the model wrapped in DDP, the batch split,
and what ranks exchange besides gradients.

Under ``torchrun`` (or ``lowbit train --nproc N``) every rank builds the same model from
the same seed, draws the same global batch from the same data generator and keeps the
rows ``rank, rank + N, rank + 2N, ...`` of it (a ``DistributedSampler``-style strided
split of each global batch: the union over ranks is the single-process batch, whatever
``N``). ``DistributedDataParallel`` averages the gradients — with its fp32 all-reduce or
:func:`lowbit.distributed.quantized_allreduce_hook` — so the parameters stay bitwise
equal; the buffers (BatchNorm's running statistics, updated by each rank on its own
shard) are rank 0's on every rank at each epoch's end (:meth:`Ranks.sync_buffers`), as
DDP makes them at each forward. Per-epoch counts (the predicted ranges' overflows) are
summed over ranks (:meth:`Ranks.total`).
The process group is gloo (the trainer runs on the CPU; NCCL needs CUDA tensors).

Noise: each rank's stochastic rounding draws independent streams — the layers' streams
are keyed by (seed, layer name, rank) (:mod:`lowbit.noise`), the communication noise by
(seed, rank, call, parameter) (:func:`lowbit.distributed.comm_noise_seed`); the optimizer's
rounding noise (low-precision weights) is the same on every rank, as the update must be.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lowbit.distributed import (
    GradComm,
    QuantizedCommState,
    init_process_group_from_env,
    quantized_allreduce_hook,
    ring_bytes,
)
from lowbit.ranges import RangeStats

from .runconfig import launched_world_size


@dataclass
class Ranks:
    """This process's place in the job: ``rank`` of ``world``; ``owns_group`` when
    :meth:`start` created the process group (and :meth:`close` destroys it)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False

    @classmethod
    def start(cls, world_size: int) -> Ranks:
        """Join (or, under torchrun, create) the default process group of ``world_size``
        ranks; a single-rank run needs none. Raises ``ValueError`` if the launch has a
        different number of ranks."""
        if world_size == 1 and not dist.is_initialized():
            launched = launched_world_size()
            if launched != 1:  # a review: rank 0 trained alone, rank 1 met a "run busy" error
                raise ValueError(f"world_size is 1 but this process was launched as one of {launched} "
                                 "ranks (WORLD_SIZE): leave world_size unset to train on all of them")
            return cls()
        owns = not dist.is_initialized()
        if owns and not init_process_group_from_env(torch.device("cpu")):
            raise ValueError(f"world_size is {world_size} but this process was not launched "
                             "on several ranks: use torchrun or lowbit train --nproc")
        if dist.get_world_size() != world_size:
            if owns:
                dist.destroy_process_group()
            raise ValueError(f"world_size is {world_size} but the job has "
                             f"{dist.get_world_size()} ranks")
        return cls(dist.get_rank(), world_size, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def shard(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """This rank's rows of a global batch: ``t[rank::world]`` of each tensor."""
        return batch if self.world == 1 else tuple(t[self.rank :: self.world] for t in batch)

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a tensor (a copy; the same bits on every rank)."""
        x = x.detach().clone()
        if self.world > 1:
            dist.all_reduce(x)
            x /= self.world
        return x

    def total(self, stats: RangeStats) -> RangeStats:
        """The sum over ranks of every rank's :class:`~lowbit.ranges.RangeStats` (its
        counts and sums; the rates it derives are then those of the job), the same on every
        rank. One float64 all-reduce: counts below 2⁵³ stay exact."""
        if self.world == 1:
            return stats
        fields = asdict(stats)
        t = torch.tensor([float(v) for v in fields.values()], dtype=torch.float64)
        dist.all_reduce(t)
        return RangeStats(**{k: type(v)(x) for (k, v), x in zip(fields.items(), t.tolist())})

    def sync_buffers(self, model: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm's running statistics) on every rank, in place. DDP
        broadcasts them at the start of each forward, so each rank's last step of an epoch
        left its own shard's statistics in its replica: ``train`` returned other buffers
        on rank 1 than rank 0 evaluated and saved (a review)."""
        if self.world == 1:
            return
        for b in model.buffers():
            dist.broadcast(b.data, src=0)

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, on rank 0 (``None`` elsewhere)."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, model: nn.Module, comm: GradComm | None
             ) -> tuple[nn.Module, QuantizedCommState | None]:
        """``model`` in DDP with ``comm``'s quantized hook (``None``: fp32 all-reduce);
        the model itself for a single rank."""
        if self.world == 1:
            return model, None
        ddp = DistributedDataParallel(model)
        if comm is None:
            return ddp, None
        state = QuantizedCommState(ddp, comm)
        ddp.register_comm_hook(state, quantized_allreduce_hook)
        return ddp, state

    def allreduce_bytes(self, model: nn.Module, element_size: int | None = None) -> float:
        """Bytes one rank sends per step in DDP's (ring) all-reduce of the gradients, in
        the parameters' dtype or with ``element_size`` bytes per element."""
        return sum(ring_bytes(p.numel(), element_size or p.element_size(), self.world,
                              "allreduce") for p in model.parameters() if p.requires_grad)


__all__ = ["Ranks"]
