"""A 2-rank ``lowbit sweep`` with a fault injected, for the tests that such a job ends
(or goes on) alike on every rank instead of hanging.

    python -m torch.distributed.run --standalone --nproc-per-node 2 _sweep_fault.py MODE OUT RECIPES

MODE ``disk``: rank 0 alone fails to write its first checkpoint (a full disk). MODE
``slow``: rank 1 reads each run's state 2 s late (after rank 0 took the run's lock).
"""

from __future__ import annotations

import errno
import os
import sys
import time

from lowbit import cli
from lowbit.experiments import checkpoint, sweep


def main() -> int:
    mode, out, recipes = sys.argv[1:4]
    rank = os.environ.get("RANK")
    if mode == "disk":
        real_save = checkpoint.save_checkpoint

        def save(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if rank == "0":
                raise OSError(errno.ENOSPC, "No space left on device (simulated)")
            return real_save(*args, **kwargs)

        checkpoint.save_checkpoint = save
    else:
        real_state = sweep.run_state

        def late(cfg):  # noqa: ANN001, ANN202
            if rank == "1":
                time.sleep(2)
            return real_state(cfg)

        sweep.run_state = late
    return cli.main(["sweep", "--tasks", "digits", "--models", "mlp", "--recipes", recipes, "--epochs", "2",
                     "--subset", "128", "--eval-subset", "32", "--batch-size", "32", "--out", out, "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
