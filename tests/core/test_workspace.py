"""``lowbit.kernels.workspace``: large CPU buffers reused only when nothing references
them, per thread; attention's results unchanged by the reuse."""

from __future__ import annotations

import threading

import pytest
import torch

from lowbit.kernels import workspace

SHAPE = (8, 1024, 1024)  # 32 MB of int32: the smallest pooled size


@pytest.fixture(autouse=True)
def _fresh_pools(monkeypatch):
    """Empty pools under glibc's default policy, whatever an earlier test in this process
    set (``lowbit train``/``sweep`` called in-process switch to keep-freed for good)."""
    from lowbit import allocator

    monkeypatch.setitem(allocator._state, "policy", "default")
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    workspace.clear()
    yield
    workspace.clear()


def test_a_dropped_buffer_is_reused_a_referenced_one_never() -> None:
    a = workspace.empty(SHAPE, torch.int32)
    ptr = a.data_ptr()
    assert a.shape == SHAPE and a.dtype == torch.int32 and a.is_contiguous()
    b = workspace.empty(SHAPE, torch.int32)  # a is alive: a new buffer
    assert b.data_ptr() != ptr
    bptr = b.data_ptr()
    del a, b
    c = workspace.empty(SHAPE, torch.int32)  # the pool keeps the newest, and hands it out
    assert workspace.held_bytes() == c.numel() * 4 and c.data_ptr() == bptr
    view = c.view(torch.float32)[3]  # a view keeps the storage in use
    cptr = c.data_ptr()
    del c
    d = workspace.empty(SHAPE, torch.int32)
    assert d.data_ptr() != cptr
    del view, d
    e = workspace.empty(SHAPE, torch.int32)
    assert workspace.empty(SHAPE, torch.int32).data_ptr() != e.data_ptr()  # e is referenced
    del e


def test_a_buffer_autograd_saved_is_not_reused() -> None:
    """A tensor autograd keeps for the backward (a C++ holder of the same TensorImpl, no
    new view) counts as referenced: the next request gets a new buffer and the backward
    reads the saved values."""
    assert workspace._references_seen()
    w = torch.ones((), requires_grad=True)
    a = workspace.empty(SHAPE, torch.int32)
    a.fill_(3)
    y = (a * w).sum()  # autograd saves a
    ptr = a.data_ptr()
    del a
    b = workspace.empty(SHAPE, torch.int32)
    assert b.data_ptr() != ptr
    b.fill_(-1)
    y.backward()
    assert float(w.grad) == 3.0 * b.numel()


def _offload_hooks():  # noqa: ANN202 - keeps the storage object, as offloading hooks do
    def pack(t: torch.Tensor) -> tuple:
        return t.untyped_storage(), t.storage_offset(), t.shape, t.stride(), t.dtype

    def unpack(p: tuple) -> torch.Tensor:
        return torch.empty(0, dtype=p[4]).set_(p[0], p[1], p[2], p[3])

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


@pytest.mark.parametrize("holder", ["saved-tensor hook", "untyped_storage", "storage"])
def test_a_buffer_whose_storage_object_is_held_is_not_reused(holder: str) -> None:
    """Whoever holds the storage's Python object (an offloading saved-tensor hook,
    ``t.untyped_storage()``, ``t.storage()``) holds the buffer: torch hands out one
    storage object per storage, so the storage's use count does not show it. The pooled
    accumulator was handed out again and overwritten (a review: a gradient 0, not 8388608)."""
    w = torch.ones((), requires_grad=True)
    a = workspace.empty(SHAPE, torch.int32)
    a.view(torch.float32).fill_(1.0)
    ptr, kept = a.data_ptr(), None
    if holder == "saved-tensor hook":
        with _offload_hooks():
            y = (a.view(torch.float32) * w).sum()
    else:
        kept = a.untyped_storage() if holder == "untyped_storage" else a.storage()
    del a
    b = workspace.empty(SHAPE, torch.int32)
    assert b.data_ptr() != ptr
    b.fill_(0)
    if kept is not None:  # the held storage still reads 1.0 (0x3f800000) everywhere
        raw = kept._untyped_storage if holder == "storage" else kept
        assert bool((torch.empty(0, dtype=torch.int32).set_(raw) == 0x3F800000).all())
    else:
        y.backward()
        assert float(w.grad) == b.numel()


def test_the_reference_probe_is_not_fooled_by_inference_mode_or_hooks(monkeypatch) -> None:  # noqa: ANN001
    """A first large request under ``torch.inference_mode`` (an evaluation pass before
    training) made the once-per-process probe answer no, and the pool stayed off for
    good (a review); under a user's saved-tensor hooks the probe is not run (their pack
    hook would see it) and nothing is reused for that request only."""
    monkeypatch.setattr(workspace, "_seen", False)
    with torch.inference_mode():
        a = workspace.empty(SHAPE, torch.int32)
    assert workspace._seen and workspace.held_bytes() == a.numel() * 4
    del a
    b = workspace.empty(SHAPE, torch.int32)  # the buffer pooled in inference mode, reused
    assert workspace.held_bytes() == b.numel() * 4 and not b.is_inference()
    torch._int_mm(torch.ones(32, 8, dtype=torch.int8), torch.ones(8, 32, dtype=torch.int8),
                  out=b.view(-1)[:1024].view(32, 32))  # written in place outside inference mode
    del b
    workspace.clear()
    monkeypatch.setattr(workspace, "_seen", False)
    packed: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        workspace.empty(SHAPE, torch.int32)
        assert workspace.held_bytes() == 0  # a plain allocation, not pooled
    assert packed == [] and not workspace._seen
    c = workspace.empty(SHAPE, torch.int32)
    cptr = c.data_ptr()
    del c
    assert workspace.empty(SHAPE, torch.int32).data_ptr() == cptr and workspace._seen


def test_small_requests_and_other_dtypes_are_plain_allocations() -> None:
    small = workspace.empty((4, 128, 128), torch.int32)
    assert small.shape == (4, 128, 128) and workspace.held_bytes() == 0
    f = workspace.empty(SHAPE, torch.float32)
    i = workspace.empty(SHAPE, torch.int32)
    assert f.dtype == torch.float32 and i.dtype == torch.int32
    assert workspace.held_bytes() == 2 * f.numel() * 4
    workspace.empty((9, 1024, 1024), torch.int32)  # a third shape drops the oldest entry
    assert workspace.held_bytes() == (8 + 9) * 1024 * 1024 * 4


def test_threads_never_share_a_buffer() -> None:
    ptrs = []

    def grab() -> None:
        t = workspace.empty(SHAPE, torch.int32)
        ptrs.append(t.data_ptr())
        barrier.wait()  # both threads hold theirs at once

    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=grab) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ptrs)) == 2


def test_switched_off_allocates_fresh() -> None:
    workspace.set_enabled(False)
    try:
        a = workspace.empty(SHAPE, torch.int32)
        del a
        assert workspace.held_bytes() == 0
    finally:
        workspace.set_enabled(True)


@pytest.mark.usefixtures("int_mm_engine")
def test_attention_with_pooled_scores_equals_fresh_buffers() -> None:
    """Two steps of a low-bit attention whose scores are 32 MB (pooled, the forward's and
    the backward's recomputation reusing one buffer), the returned weights kept alive
    across the second call: the same outputs, weights and gradients as with the pool off."""
    import lowbit
    from lowbit.attention import attention

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        q, k, v = (torch.randn(2, 4, 1024, 16, requires_grad=True) for _ in range(3))
        state = lowbit.functional.block_state(lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
        out = []
        for _ in range(2):
            o, w = attention(q, k, v, is_causal=True, state=state, need_weights=True)
            (o.square().sum() + w.sum()).backward()
            out += [o.detach(), w.detach()]  # w outlives the next call's scores
        return out + [q.grad, k.grad, v.grad]

    pooled = run()
    assert workspace.held_bytes() >= 8 * 1024 * 1024 * 4  # the scores went through the pool
    workspace.set_enabled(False)
    try:
        fresh = run()
    finally:
        workspace.set_enabled(True)
    assert all(torch.equal(a, b) for a, b in zip(pooled, fresh, strict=True))


def test_nothing_is_pooled_where_the_heap_recycles_freed_memory(monkeypatch) -> None:
    """Under ``lowbit.allocator``'s keep-freed policy (here its state as
    ``keep_freed_memory`` leaves it, without changing this process's malloc) a fresh
    large tensor costs no page faults: the pool would only add to the peak, so ``empty``
    is ``torch.empty`` and drops what was pooled before the policy changed."""
    from lowbit import allocator

    monkeypatch.setattr(allocator, "_environment_keeps_freed", lambda: False)
    a = workspace.empty(SHAPE, torch.int32)
    assert workspace.held_bytes() == a.numel() * 4  # default policy: pooled
    del a
    monkeypatch.setitem(allocator._state, "policy", "keep-freed")
    b = workspace.empty(SHAPE, torch.int32)
    assert b.shape == SHAPE and b.dtype == torch.int32 and b.is_contiguous()
    assert workspace.held_bytes() == 0
    c = workspace.empty(SHAPE, torch.int32)  # b alive: any buffer but b's
    assert c.data_ptr() != b.data_ptr() and workspace.held_bytes() == 0
