"""What a training step changes, saved and put back: for the tools that run steps on a
user's model to measure it — :func:`lowbit.coverage` and the measurements of
:mod:`lowbit.analysis` (``quantization_variance``, ``gradient_variance``,
``variance_profile``, ``jacobian_spectrum``) — so that the model trains on exactly as if
they had not been called.

Put back: ``.grad`` of the parameters and of leaf inputs (the measuring steps' gradients
are dropped, a pending accumulation kept), FSDP2's pending unsharded gradients (below),
buffers (BatchNorm statistics), train/eval flags, the global CPU/CUDA RNG states, the
converted layers' noise streams, predicted-range trackers and ``ran`` flags, the count
that names seeded functional calls' noise, and the state of lowbit's DDP communication
hook (its call counters key the communication noise).

FSDP2 (``torch.distributed.fsdp.fully_shard``) keeps a gradient accumulated under
``set_requires_gradient_sync(False)`` on its unsharded parameters, not on the sharded
``.grad`` a module's ``parameters()`` show: a trial found ``coverage`` adding its own
backward to that pending gradient (sync off), or reduce-scattering it and then dropping it
(sync back on before the call). They are saved and set aside for the block
(``FSDPParam._unsharded_param.grad`` and ``unsharded_accumulated_grad``, and HSDP's
partial reduction ``FSDPParamGroup._partial_reduce_output``, read through torch's private
``_get_fsdp_state()``; where a torch release lays them out otherwise, a
``ValueError`` says to call the tool with no gradient pending)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from . import functional
from .gradmode import training_grad_mode
from .nn import fqt_blocks, load_rng_state, restore_ranges, rng_state, snapshot_ranges

T = TypeVar("T")
_UNSET = object()


def comm_states(model: nn.Module) -> list[Any]:
    """The :class:`lowbit.distributed.QuantizedCommState` of each DDP module in ``model``
    with lowbit's communication hook registered (DDP keeps hooks in ``_comm_hooks``)."""
    from .distributed import QuantizedCommState
    return [st for m in model.modules() for _, st in getattr(m, "_comm_hooks", None) or ()
            if isinstance(st, QuantizedCommState)]


def _fsdp_groups(model: nn.Module) -> list[Any]:
    """The ``FSDPParamGroup`` of every FSDP2-sharded module in ``model`` (all of a state's
    groups: a ``shard_placement_fn`` giving parameters meshes of their own makes several;
    none without FSDP2). ``ValueError`` where a module is FSDP2's but its groups cannot be
    read (another torch release's layout): its pending gradient could not be put back."""
    out = []
    for m in model.modules():
        get_state = getattr(m, "_get_fsdp_state", None)
        if get_state is None:
            continue
        try:
            state = get_state()
            groups = getattr(state, "_fsdp_param_groups", None)
            if groups is None:  # a release with one group per state
                groups = [] if state._fsdp_param_group is None else [state._fsdp_param_group]
            for g in groups:
                for p in g.fsdp_params:
                    p.unsharded_accumulated_grad  # noqa: B018 - the layout this module reads
            out += [g for g in groups if g not in out]
        except (AttributeError, TypeError, AssertionError) as exc:
            raise ValueError(f"{type(m).__name__} is sharded by FSDP2 in a way lowbit cannot read ({exc}): "
                             "the gradient it may hold pending (set_requires_gradient_sync(False)) could not "
                             "be put back; call this tool with no gradient pending (after the optimizer "
                             "step and zero_grad)") from exc
    return out


def _fsdp_pending(groups: list[Any]) -> tuple[list[tuple[Any, Any]], list[tuple[Any, Any, Any]]]:
    """Each group's pending gradients, set aside (None): the group's partial reduction
    (HSDP's, kept under ``set_requires_all_reduce(False)``: a review found it added to or
    lost), and every FSDPParam's unsharded gradient and accumulated one."""
    reductions = [(g, g._partial_reduce_output) for g in groups if hasattr(g, "_partial_reduce_output")]
    # (the unsharded gradient as None where no unsharded parameter exists yet: put back on
    # whichever parameter object FSDP holds afterwards)
    params = [(p, getattr(getattr(p, "_unsharded_param", None), "grad", None), p.unsharded_accumulated_grad)
              for g in groups for p in g.fsdp_params]
    for g, _ in reductions:
        g._partial_reduce_output = None
    for p, _, _ in params:
        _set_unsharded_grad(p, None)
        p.unsharded_accumulated_grad = None
    return reductions, params


def _set_unsharded_grad(p: Any, grad: torch.Tensor | None) -> None:
    unsharded = getattr(p, "_unsharded_param", None)
    if unsharded is not None:
        unsharded.grad = grad


def _fsdp_put_back(saved: tuple[list[tuple[Any, Any]], list[tuple[Any, Any, Any]]]) -> None:
    reductions, params = saved
    for g, value in reductions:
        g._partial_reduce_output = value
    for p, grad, accumulated in params:
        _set_unsharded_grad(p, grad)
        p.unsharded_accumulated_grad = accumulated


@contextlib.contextmanager
def kept(model: nn.Module, inputs: Any = ()) -> Iterator[None]:
    """Run a block of training steps on ``model``, then put back everything they changed
    (the module docstring's list), ``inputs``' leaf tensors' ``.grad`` too. The block
    starts with every such ``.grad`` (and FSDP2's pending gradients) set aside as ``None``.
    ``ValueError`` for an FSDP2 model whose layout this torch release changed
    (:func:`_fsdp_groups`)."""
    fsdp = _fsdp_groups(model)
    tensors = [t for t in tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    leaves = list(model.parameters()) + [t for t in tensors if t.requires_grad and t.is_leaf]
    grads = [(t, t.grad) for t in leaves]
    buffers = [(m, n, b, b.clone()) for m in model.modules()
               for n, b in m.named_buffers(recurse=False)]
    flags = [(m, m.training) for m in model.modules()]
    layers = list(fqt_blocks(model).values())  # in-projections too: their ranges and ran flags
    noise = rng_state(model)
    ranges = snapshot_ranges(model)
    calls = functional.call_count()  # seeded functional calls name their noise by this count
    ran = [(m, vars(m).get("ran", _UNSET)) for m in layers]
    comm = [(st, st.state_dict()) for st in comm_states(model)]
    devices = sorted({t.device.index or 0 for t in leaves + tensors if t.device.type == "cuda"})
    for t in leaves:
        t.grad = None
    pending = _fsdp_pending(fsdp)
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        _fsdp_put_back(pending)
        with torch.no_grad():
            for t, g in grads:
                t.grad = g
            for m, n, b, saved in buffers:
                if getattr(m, n) is not b:
                    setattr(m, n, b)
                b.copy_(saved)
        for m, flag in flags:
            m.training = flag
        load_rng_state(model, noise)
        restore_ranges(ranges)
        functional.set_call_count(calls)
        for st, saved_comm in comm:
            st.load_state_dict(saved_comm)
        for m, value in ran:
            if value is _UNSET:
                vars(m).pop("ran", None)
            else:
                m.ran = value


def measures(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn(model, …)``, a measurement that runs training steps on ``model``, run with
    autograd on (:func:`lowbit.gradmode.training_grad_mode`: the same numbers inside
    ``no_grad`` or ``inference_mode``) and under :func:`kept`: the model's gradients,
    noise streams, ranges, RNG and buffers afterwards as they were before (a trial found
    ``quantization_variance`` dropping a pending accumulated gradient and moving the
    layers' noise streams, so the training run after it was another run). So two calls in
    a row draw the same noise: for more draws raise the measurement's own ``repeats``.
    The batch's own leaf tensors' ``.grad`` is not covered (the model's state is)."""
    @functools.wraps(fn)
    def wrapper(model: nn.Module, *args: object, **kwargs: object) -> T:
        if not isinstance(model, nn.Module):  # the function's own TypeError names it
            with training_grad_mode():
                return fn(model, *args, **kwargs)
        with training_grad_mode(), kept(model):
            return fn(model, *args, **kwargs)
    return wrapper


__all__ = ["comm_states", "kept", "measures"]
