"""``lowbit.scopes.scope``: lowbit's profiler labels cost nothing when nobody records them,
and are there for a profiler and for a dispatch-mode trace (``lowbit.coverage`` places
GEMMs in passes by them)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lowbit.scopes import recorded, scope


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def _labels_seen() -> list[str]:
    with _Ops() as ops:
        with scope("lowbit::test"):
            torch.ones(2).add_(1)
    return [n for n in ops.names if "record_function" in n]


def test_no_profiler_no_record_function_op() -> None:
    assert _labels_seen() == []


def test_a_recorded_block_and_a_profiler_see_the_label() -> None:
    with recorded():
        assert _labels_seen()
    assert _labels_seen() == []  # closed again
    with torch.profiler.profile() as prof:
        with scope("lowbit::test"):
            torch.ones(2).add_(1)
    assert "lowbit::test" in {e.name for e in prof.events()}


def test_no_graph_break_under_torch_compile() -> None:
    """Dynamo traces through ``scope`` as through ``record_function``: one graph, no break
    (the profiler check is a call dynamo cannot trace: ``is_compiling()`` comes first)."""
    def f(x: torch.Tensor) -> torch.Tensor:
        with scope("lowbit::a"):
            y = x * 2
        with scope("lowbit::b"):
            return y + 1

    torch._dynamo.reset()
    got = torch._dynamo.explain(f)(torch.ones(3))
    assert (got.graph_count, got.graph_break_count) == (1, 0), got.break_reasons
