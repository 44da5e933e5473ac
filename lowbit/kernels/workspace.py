"""Reused CPU buffers for lowbit's largest temporaries (attention's score-sized int32
accumulators).

glibc serves every allocation of 32 MB or more (its largest mmap threshold) with a fresh
``mmap`` and unmaps it when it is freed, so each such tensor pays its page faults again on
first touch: a (48, 512, 512) int32 accumulator — one GPT-2-small block's scores, 4 × 12
heads × 512² — took 15 ms to fill fresh against 1.3 ms reused (2 threads), twice per
step (the forward's ``Q·Kᵀ`` and the backward's recomputation). :func:`empty` hands out,
per thread, a buffer of the requested shape and dtype that an earlier call made and that
nothing references any more — neither the tensor object nor any view of its storage
(``sys.getrefcount`` of the tensor and of its storage object, and the storage's use
count; a C++ holder such as autograd's saved
tensors adds a reference to the object in torch 2.13, which is checked once per process:
where it does not, nothing is reused) — else a new one, which it keeps
(at most :data:`MAX_ENTRIES` per thread, the oldest dropped). Requests below
:data:`MIN_BYTES` are plain ``torch.empty``: the heap reuses those itself. A buffer whose
result escapes (attention's ``need_weights`` weights, a mask gradient) stays the caller's
for as long as it is referenced. :func:`held_bytes` is what the pools hold between steps
(``benchmarks/bench_step.py`` adds it to a step's peak memory). ``LOWBIT_WORKSPACE=0`` or
:func:`set_enabled` turns it off.

The trade: a pooled buffer stays allocated between its uses, so it adds to the peak of
whatever else the step holds at its own peak. Measured on gpt2-block (docs/benchmarks.md,
"Large score buffers reused"): the step −11.7% (2 threads), its peak memory 99 → 135 MB.
So the pool works only under glibc's default policy: where freed memory is recycled from
the heap (:func:`lowbit.allocator.recycles_freed_memory`, the policy of ``lowbit train``
and of the benchmarks) a fresh tensor costs no page faults, and :func:`empty` is plain
``torch.empty`` — measured on gpt2-block with freed memory recycled: the pool made the
step 3.1% slower (noise) and its peak 36 MB higher (docs/benchmarks.md, "The score buffer
pool under the recycling allocator").
"""

from __future__ import annotations

import math
import sys
import threading
import weakref

import torch

from ..allocator import recycles_freed_memory
from .cbuild import switched_off

MIN_BYTES = 32 << 20
MAX_ENTRIES = 2
_enabled = not switched_off("LOWBIT_WORKSPACE")
_local = threading.local()
_pools: dict[int, dict] = {}  # every live thread's pool, for held_bytes and clear
_lock = threading.Lock()


class _Owner:
    """Kept in a thread's local storage beside its pool: freed when the thread ends, and
    with it the pool's entry in ``_pools`` (kept for ever, the pools of finished threads
    held their buffers for the life of the process: a review measured +32 MB a thread)."""

    __slots__ = ("__weakref__",)


def _drop(key: int) -> None:
    with _lock:
        _pools.pop(key, None)


def _pool() -> dict:
    pool = getattr(_local, "pool", None)
    if pool is None:
        pool = _local.pool = {}
        owner = _local.owner = _Owner()
        with _lock:
            _pools[id(pool)] = pool
        weakref.finalize(owner, _drop, id(pool))
    return pool


_seen: bool = False  # the probe below has said yes once in this process


def _references_seen() -> bool:
    """Whether this torch counts a C++ holder of a tensor (autograd saving it for the
    backward) as a reference to its Python object — what :func:`empty`'s check relies on
    (torch 2.13 does); where it does not, buffers are never reused. The probe runs with
    autograd recording whatever mode the caller is in (under ``torch.inference_mode`` it
    records nothing, and a first probe there switched the pool off for the process: a
    review), and only a yes is kept. Under a user's saved-tensor hooks it is not asked
    (their pack hook would run on the probe, and may pack a copy): no reuse for that
    request, the question asked again at the next."""
    global _seen, _storage_refs_free
    if _seen:
        return True
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return False
    with torch.inference_mode(False), torch.enable_grad():
        t = torch.empty(4)
        before = sys.getrefcount(t)
        y = t * torch.ones((), requires_grad=True)  # saves t, the same TensorImpl
        held = sys.getrefcount(t)
        del y
        free = _storage_refs(t)
        kept = t.untyped_storage()  # a holder of the storage object must show
        shown = _storage_refs(t) > free
        del kept
        _storage_refs_free = free
        _seen = held > before and sys.getrefcount(t) == before and shown and _storage_refs(t) == free
    return _seen


_storage_refs_free = -1  # _storage_refs of a storage no one else holds (set by the probe)


def _storage_refs(t: torch.Tensor) -> int:
    """References to the Python object of ``t``'s storage, counted the same way for every
    call (this torch keeps one object per storage alive while tensors share it)."""
    s = t.untyped_storage()
    return sys.getrefcount(s)


def _unreferenced(t: torch.Tensor) -> bool:
    """Whether nothing but the pool holds ``t``: no other reference to the tensor object
    (references: the pool's, :func:`empty`'s name, this parameter, getrefcount's
    argument), no other tensor
    or view on its storage (the storage's use count: ``t``'s and the storage object's),
    and no holder of the storage's Python object, which torch hands out as one object to
    every ``untyped_storage()``/``storage()`` caller (saved-tensor hooks that offload
    keep it; it does not raise the use count: a review found a pooled accumulator
    overwritten under such a hook, a gradient 0 for 8388608): its reference count is
    compared with that of a storage nobody holds, measured by the probe
    (:func:`_references_seen`)."""
    if sys.getrefcount(t) != 4:
        return False
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2 \
        and _storage_refs(t) == _storage_refs_free


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A contiguous CPU tensor of ``shape`` and ``dtype`` with unspecified contents, as
    ``torch.empty``: for at least :data:`MIN_BYTES`, under glibc's default allocator
    policy, an unreferenced buffer this thread made before, if there is one (module
    docstring)."""
    shape = tuple(int(s) for s in shape)
    if not _enabled or math.prod(shape) * dtype.itemsize < MIN_BYTES \
            or not _references_seen():
        return torch.empty(shape, dtype=dtype, device="cpu")
    if recycles_freed_memory():  # the heap reuses freed blocks itself (module docstring)
        if _pools and held_bytes():
            clear()  # buffers pooled before the policy changed
        return torch.empty(shape, dtype=dtype, device="cpu")
    pool, key = _pool(), (shape, dtype)
    t = pool.get(key)
    if t is not None and _unreferenced(t):
        return t
    with torch.inference_mode(False):  # a pooled buffer outlives the caller's mode: made
        # under inference_mode it would be an inference tensor, which a later training
        # step could not write in place
        t = torch.empty(shape, dtype=dtype, device="cpu")
    pool.pop(key, None)
    pool[key] = t
    while len(pool) > MAX_ENTRIES:
        pool.pop(next(iter(pool)))
    return t


def held_bytes() -> int:
    """Bytes the pools of all threads hold."""
    with _lock:
        return sum(t.numel() * t.element_size() for pool in _pools.values() for t in list(pool.values()))


def clear() -> None:
    """Drop every pooled buffer (of all threads)."""
    with _lock:
        for pool in _pools.values():
            pool.clear()


def set_enabled(flag: bool) -> None:
    """Reuse buffers (``True``, the default unless ``LOWBIT_WORKSPACE=0``) or never
    (``False``; for tests and A/B benchmarks; drops the pools). Process-wide."""
    global _enabled
    _enabled = bool(flag)
    if not _enabled:
        clear()


__all__ = ["MAX_ENTRIES", "MIN_BYTES", "clear", "empty", "held_bytes", "set_enabled"]
