"""Run a function on 2 gloo ranks in fresh processes, with a deadline.

``run_ranks(fn, *args)`` starts ``world`` processes (``spawn``), initialises a gloo
process group on a free local port, calls ``fn(rank, world, *args)`` in each and returns
the ``world`` return values (passed back through ``torch.save`` files). A rank that
raises fails the test with its traceback; a job past ``timeout`` seconds is killed.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable, world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result: Any = fn(rank, world, *args)
    except BaseException:
        result = {"__error__": traceback.format_exc()}
    torch.save(result, Path(out) / f"{rank}.pt")  # before teardown: nothing to lose there
    dist.barrier()  # both results written
    # gloo's teardown can abort (SIGABRT) with plain torch too (seen in 1 of 4 bare DDP
    # scripts): the result is saved, so leave without running destructors
    os._exit(0)


def run_ranks(fn: Callable, *args: Any, world: int = 2, timeout: float = 60.0) -> list[Any]:
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_entry, args=(fn, world, free_port(), out, args),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{fn.__name__} on {world} ranks took over {timeout} s")
        results = [torch.load(Path(out) / f"{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        if isinstance(res, dict) and "__error__" in res:
            raise AssertionError(f"rank {r} failed:\n{res['__error__']}")
    return results
