"""The low-precision optimizers under data parallelism (a review): the rounding noise must
be one on every rank, and sharded (FSDP2) parameters are refused before anything runs."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

from lowbit.optim import SRAdamW, SRSGD

from _ranks import run_ranks


def _warns(fn) -> bool:  # noqa: ANN001
    """Whether ``fn()`` warned about the ranks' rounding, the warning naming this file's
    line (the user's code: not torch's wrappers of ``step``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    ours = [w for w in caught if "same s on every rank" in str(w.message)]
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]
    return bool(ours)


def _warned_per_generator(rank: int, world: int) -> list[bool]:
    """Whether building each optimizer with ``generator=None`` / a generator warned; then
    whether a copy unpickled on the rank (never built there) warns at its first step, and
    not again at its second."""
    import pickle

    p = torch.nn.Parameter(torch.ones(4, 4, dtype=torch.bfloat16))
    out = []
    for gen in (None, torch.Generator().manual_seed(0)):
        for cls in (SRSGD, SRAdamW):
            out.append(_warns(lambda cls=cls, gen=gen: cls([p], lr=0.1, generator=gen)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy = pickle.loads(pickle.dumps(SRSGD([p], lr=0.1)))
    p.grad = torch.ones_like(p)
    out += [_warns(copy.step), _warns(copy.step)]
    return out


def test_global_rng_rounding_under_several_ranks_warns() -> None:
    """With ``generator=None`` the rounding draws from torch's global RNG, which per-rank
    seeding makes differ (the replicas drifted apart, 459 of 837 weights after 3 steps, in
    the review's run): built under 2 ranks, both optimizers warn and name the fix; with a
    generator they do not; an optimizer built before the process group existed (or
    unpickled on the ranks) warns at its first step, once."""
    for res in run_ranks(_warned_per_generator, timeout=90):
        assert res == [True, True, False, False, True, False]


def test_sharded_parameters_are_refused_before_anything_runs(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """``fully_shard`` parameters (DTensor) failed inside the first ``step()`` with a
    DTensor-internal error — ``weights="int8"`` had rewritten them at construction, and
    ``SRAdamW`` had counted the step. Refused by name at construction; a DTensor gradient
    at ``step`` before any update; FSDP2 optimizer state (DTensors) at ``load_state_dict``
    (a second review), before anything loads; DTensor found where torch 2.4 defines it."""
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).to(torch.bfloat16)
        plain = [p.detach().clone() for p in model.parameters()]
        early = {cls: cls(model.parameters(), lr=0.1, generator=torch.Generator().manual_seed(1))
                 for cls in (SRSGD, SRAdamW)}
        fully_shard(model)
        for cls in (SRSGD, SRAdamW):
            for weights in ("bf16", "int8"):
                with pytest.raises(TypeError, match=r"does not take sharded parameters: parameter 0 of the group"):
                    cls(model.parameters(), lr=0.1, weights=weights, generator=torch.Generator().manual_seed(1))
        model(torch.ones(3, 8, dtype=torch.bfloat16)).float().sum().backward()
        for opt in early.values():  # the optimizer holds the unsharded parameters
            for p in opt.param_groups[0]["params"]:
                p.grad = torch.ones_like(p)
            opt.param_groups[0]["params"][0].grad = model[0].weight.grad  # a DTensor gradient
            with pytest.raises(TypeError, match="does not take sharded parameters: parameter 0 of param group 0"):
                opt.step()
            assert all(not st for st in opt.state.values())  # nothing counted or stored
        assert all(torch.equal(a, b) for a, b in zip(plain, (p.full_tensor() for p in model.parameters())))
        # FSDP2's optimizer state (DTensors) refused by load_state_dict, nothing loaded
        adamw = torch.optim.AdamW(model.parameters(), lr=0.1)
        adamw.step()
        fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)).to(torch.bfloat16)
        opt = SRAdamW(fresh.parameters(), lr=0.1, weight_decay=0.01, generator=torch.Generator().manual_seed(1))
        with pytest.raises(TypeError, match="'exp_avg', 'exp_avg_sq' holds DTensors"):
            opt.load_state_dict(adamw.state_dict())
        assert all(not st for st in opt.state.values())
        # torch 2.4 defines DTensor in torch.distributed._tensor (its torch.distributed.tensor
        # is empty): found there, nothing imported
        import sys
        import types

        from lowbit.conversion import is_dtensor as _sharded
        dt = sys.modules["torch.distributed.tensor"].DTensor
        monkeypatch.setitem(sys.modules, "torch.distributed.tensor", types.ModuleType("torch.distributed.tensor"))
        monkeypatch.setitem(sys.modules, "torch.distributed._tensor", types.SimpleNamespace(DTensor=dt))
        assert _sharded(model[0].weight) and not _sharded(plain[0])
        monkeypatch.delitem(sys.modules, "torch.distributed._tensor")
        assert not _sharded(model[0].weight)  # no DTensor class loaded: none can exist
        SRSGD(fresh.parameters(), lr=0.1, generator=torch.Generator())  # builds (2.4 raised ImportError)
    finally:
        dist.destroy_process_group()
