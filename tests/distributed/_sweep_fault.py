"""A 2-rank ``lowbit sweep`` whose rank 0 alone fails to write its first checkpoint (a
full disk), for the test that such a job ends instead of hanging.

    python -m torch.distributed.run --standalone --nproc-per-node 2 _sweep_fault.py OUT
"""

from __future__ import annotations

import errno
import os
import sys

from lowbit import cli
from lowbit.experiments import checkpoint


def main() -> int:
    real = checkpoint.save_checkpoint

    def save(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if os.environ.get("RANK") == "0":
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real(*args, **kwargs)

    checkpoint.save_checkpoint = save
    return cli.main(["sweep", "--tasks", "digits", "--models", "mlp", "--recipes", "fp,qat-8", "--epochs", "2",
                     "--subset", "128", "--eval-subset", "32", "--batch-size", "32", "--out", sys.argv[1],
                     "--no-progress"])


if __name__ == "__main__":
    sys.exit(main())
