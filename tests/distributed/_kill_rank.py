"""A 2-rank training job whose rank 1 SIGKILLs itself mid-run (for the resume test), or
raises.

    python -m torch.distributed.run --standalone --nproc-per-node 2 _kill_rank.py OUT STEP [raise]

Trains :data:`CONFIG` into ``OUT``; rank 1 kills itself with SIGKILL when it is about to
take training step ``STEP`` (0-based, counted over epochs), as a crashed machine would;
with ``raise``, it raises ``RuntimeError("simulated failure on rank 1")`` there instead.
"""

from __future__ import annotations

import os
import signal
import sys

CONFIG = {"task": "digits", "model": "mlp", "recipe": "fqt-psq-8", "subset": 256,
          "eval_subset": 64, "batch_size": 32, "epochs": 3, "lr": 0.1, "seed": 0,
          "grad_comm": "int8"}


class KillAt:
    """Wraps a task; on rank ``rank`` SIGKILLs the process before batch ``at``."""

    def __init__(self, task, at: int, rank: int, how: str = "kill") -> None:
        self.task, self.at, self.rank, self.seen, self.how = task, at, rank, 0, how

    def __getattr__(self, name: str):
        return getattr(self.task, name)

    def train_batches(self, batch_size, generator):
        for batch in self.task.train_batches(batch_size, generator):
            if self.seen == self.at and int(os.environ["RANK"]) == self.rank:
                if self.how == "raise":
                    raise RuntimeError(f"simulated failure on rank {self.rank}")
                os.kill(os.getpid(), signal.SIGKILL)
            self.seen += 1
            yield batch


if __name__ == "__main__":
    from lowbit.experiments.tasks import make_task
    from lowbit.experiments.trainer import TrainConfig, train

    out, at = sys.argv[1], int(sys.argv[2])
    how = sys.argv[3] if len(sys.argv) > 3 else "kill"
    cfg = TrainConfig(**CONFIG, out=out)
    task = make_task(cfg.task, cfg.model, subset=cfg.subset, eval_subset=cfg.eval_subset)
    train(cfg, task=KillAt(task, at, rank=1, how=how), progress=False)
