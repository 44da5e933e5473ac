"""How much of a training step runs low-bit: ``lowbit.coverage(model, *inputs)``.

Runs one training step (forward, loss, backward; no optimizer step) under a
:class:`~lowbit.gemm_trace.GemmTracer` and reports every GEMM, convolution and
attention product that executed — its FLOPs (:mod:`lowbit.flops`), the module that
issued it, the pass (forward / grad_input / grad_weight / backward) and its operand
formats — and the share of the step's GEMM FLOPs that ran low-bit, on real integer/FP8
kernels and simulated (lowbit's reference path: a float GEMM of dequantized codes),
plus what ran in float and why, and why what ran simulated did::

    report = lowbit.coverage(model, x, loss_fn=lambda out: F.cross_entropy(out, y))
    print(report)                  # the table; report.to_dict() for the numbers
    report.lowbit_share            # (real + simulated) / total, in [0, 1]

``lowbit.coverage`` is the function (this module's attribute on the package is shadowed by
it): import the classes with ``from lowbit.coverage import CoverageReport``. Measured
tables: docs/coverage.md (``benchmarks/coverage_models.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .conversion import quote_module
from .gemm_trace import KINDS, OUTSIDE, PHASES, REAL_KINDS, SIMULATED, GemmCall, GemmTracer
from .gradmode import saveable, training_grad_mode
from .kernels import compiled
from .nn import fqt_layers, uncounted_ranges
from .stepstate import kept

# the ops of lowbit.kernels.exact_f32 (int8 GEMMs on float32 units), as a row names them
FLOAT32_ROUTE_OPS = ("lowbit.int8_mm_f32", "lowbit.int8_bmm_f32", "lowbit.int8_conv_f32")


@dataclass(frozen=True)
class GemmRow:
    """The GEMMs of one (module, op, pass, formats) group: ``calls`` of them, ``flops``
    FLOPs in all (an int). ``module`` is the fully qualified name (``""``: the model
    itself; ``"(outside model)"``: e.g. the loss); ``phase`` one of forward, grad_input,
    grad_weight, backward; ``formats`` one per operand (``int8``, ``fp8 e4m3``, ``bf16``,
    ``fp32``, ..., :data:`SIMULATED`); ``kind`` is ``int8``/``fp8``/``fp4`` (real
    low-bit), ``simulated`` or ``float``; ``weight`` the parameter an operand (or, for
    grad_weight, the result) belongs to; ``reason`` says why a float one is not low-bit,
    and why a simulated one runs simulated."""

    module: str
    module_type: str
    op: str
    phase: str
    formats: tuple[str, ...]
    kind: str
    flops: int
    calls: int
    weight: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class CoverageReport:
    """What one training step ran. FLOP counts are of GEMMs only (``2·m·k·n`` each);
    ``quantizer_flops`` are the float GEMMs of lowbit's own quantizers (e.g. BHQ's group
    sums off the CPU, a sparse product), kept out of the shares; ``unaccounted`` lists matrix ops with no FLOP
    formula; ``never_called`` the converted layers whose forward never ran."""

    rows: tuple[GemmRow, ...]
    quantizer_flops: int = 0
    quantizer_calls: int = 0
    unaccounted: tuple[tuple[str, str, int], ...] = ()
    never_called: tuple[str, ...] = ()

    @classmethod
    def from_calls(cls, calls: list[GemmCall], **extra: Any) -> CoverageReport:
        groups: dict[tuple, list[Any]] = {}
        for c in calls:
            key = (c.module, c.module_type, c.op, c.phase, c.formats, c.kind, c.weight, c.reason)
            acc = groups.setdefault(key, [0, 0])
            acc[0] += c.flops
            acc[1] += 1
        rows = tuple(GemmRow(m, t, op, ph, fm, k, f, n, w, r)
                     for (m, t, op, ph, fm, k, w, r), (f, n) in groups.items())
        return cls(rows, **extra)

    def flops(self, kind: str | None = None, phase: str | None = None) -> int:
        """Total GEMM FLOPs, optionally of one ``kind`` (``KINDS``, or ``"low-bit"``,
        ``"real"``) and one ``phase`` (``PHASES``)."""
        kinds = {"low-bit": (*REAL_KINDS, "simulated"), "real": REAL_KINDS}.get(kind or "", (kind,))
        return sum(r.flops for r in self.rows
                   if (kind is None or r.kind in kinds) and (phase is None or r.phase == phase))

    @property
    def total_flops(self) -> int:
        return self.flops()

    def share(self, kind: str, phase: str | None = None) -> float:
        """FLOPs of ``kind`` over all FLOPs (of ``phase``); 0.0 when there are none."""
        total = self.flops(phase=phase)
        return self.flops(kind, phase) / total if total else 0.0

    @property
    def lowbit_share(self) -> float:
        return self.share("low-bit")

    @property
    def real_share(self) -> float:
        return self.share("real")

    @property
    def simulated_share(self) -> float:
        return self.share("simulated")

    @property
    def float_share(self) -> float:
        return self.share("float")

    def float_reasons(self) -> list[dict[str, Any]]:
        """Float GEMMs grouped by (module type, op, pass, reason), largest first."""
        return self.reasons("float")

    def simulated_reasons(self) -> list[dict[str, Any]]:
        """Simulated GEMMs (dequantized codes in a float GEMM) grouped as
        :meth:`float_reasons`, with why lowbit ran them so (the reference backend, a
        format or geometry no real low-bit kernel takes here)."""
        return self.reasons("simulated")

    def reasons(self, kind: str) -> list[dict[str, Any]]:
        """The GEMMs of ``kind`` (``"float"`` or ``"simulated"``) grouped by (module type,
        op, pass, reason), largest first."""
        groups: dict[tuple, dict[str, Any]] = {}
        for r in self.rows:
            if r.kind != kind:
                continue
            g = groups.setdefault((r.module_type, r.op, r.phase, r.reason), {
                "module_type": r.module_type, "op": r.op, "phase": r.phase, "reason": r.reason,
                "flops": 0, "calls": 0, "modules": []})
            g["flops"] += r.flops
            g["calls"] += r.calls
            if r.module not in g["modules"]:
                g["modules"].append(r.module)
        return sorted(groups.values(), key=lambda g: -g["flops"])

    def to_dict(self) -> dict[str, Any]:
        """Everything as plain Python values (JSON-serialisable)."""
        return {
            "total_flops": self.total_flops,
            "flops_by_kind": {k: self.flops(k) for k in KINDS},
            "flops_by_phase": {p: self.flops(phase=p) for p in PHASES},
            "lowbit_share": self.lowbit_share, "real_share": self.real_share,
            "simulated_share": self.simulated_share, "float_share": self.float_share,
            "forward_lowbit_share": self.share("low-bit", "forward"),
            "gemms": [{**asdict(r), "formats": list(r.formats)} for r in self.rows],
            "float": self.float_reasons(), "simulated": self.simulated_reasons(),
            "quantizer_flops": self.quantizer_flops, "quantizer_calls": self.quantizer_calls,
            "unaccounted": [{"op": o, "module": m, "calls": n} for o, m, n in self.unaccounted],
            "never_called": list(self.never_called),
        }

    def table(self, by: str = "module") -> str:
        """The report as text: a summary line, one row per GEMM group (``by="module"``)
        or per (module type, op, pass, formats) (``by="type"``), then the float list. Modules
        are named quoted (``'2'``: an ``nn.Sequential`` index, not a count), the model itself
        ``<root>`` (:func:`lowbit.conversion.quote_module`); :meth:`to_dict` keeps the bare names."""
        if by not in ("module", "type"):
            raise ValueError(f"by must be 'module' or 'type', got {by!r}")
        return _render(self, by)

    def __str__(self) -> str:
        return self.table()


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _short(fmt: str) -> str:
    return "sim" if fmt == SIMULATED else fmt


def _where(module: str) -> str:
    """A row's module as the text names it: quoted, ``<root>`` for the model itself
    (:func:`lowbit.conversion.quote_module`), ``(outside model)`` as it is (not a name)."""
    return module if module == OUTSIDE else quote_module(module)


def _render(rep: CoverageReport, by: str) -> str:
    total = rep.total_flops
    if not total:
        return "lowbit coverage: no GEMM ran in this training step"
    lines = [
        f"lowbit coverage: {_si(total)} GEMM FLOPs per training step (forward "
        f"{_si(rep.flops(phase='forward'))}, backward {_si(total - rep.flops(phase='forward'))})",
        f"low-bit {_pct(rep.lowbit_share)} (real int8/fp8 {_pct(rep.real_share)}, simulated "
        f"{_pct(rep.simulated_share)}), float {_pct(rep.float_share)}; forward alone: low-bit "
        f"{_pct(rep.share('low-bit', 'forward'))}", ""]
    groups: dict[tuple, list[int]] = {}
    for r in rep.rows:
        name = _where(r.module) if by == "module" else None
        key = (name, r.module_type, r.op, r.phase, " × ".join(map(_short, r.formats)), r.kind)
        acc = groups.setdefault(key, [0, 0])
        acc[0] += r.flops
        acc[1] += r.calls
    head = (["module"] if by == "module" else []) + ["type", "op", "pass", "operands", "kind",
                                                      "calls", "FLOPs", "share"]
    body = [[*(k[1:] if by == "type" else k), str(n), _si(f), _pct(f / total)]
            for k, (f, n) in groups.items()]
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(head)]
    for row in [head, *body]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    for kind in ("float", "simulated"):
        reasons = rep.reasons(kind)
        if reasons:
            lines += ["", f"{kind}, and why:"]
        for g in reasons:
            more = f", +{len(g['modules']) - 1} more" if len(g["modules"]) > 1 else ""
            lines.append(f"  {g['module_type']} {g['op']} {g['phase']}: {_si(g['flops'])} "
                         f"({_pct(g['flops'] / total)}) in {_where(g['modules'][0])}{more}"
                         f" — {g['reason']}")
    if rep.never_called:
        lines.append(f"converted layers that never ran: {', '.join(map(quote_module, rep.never_called))}")
    if rep.quantizer_calls:
        lines.append(f"quantizer transforms (float GEMMs inside lowbit's quantizers, not in the "
                     f"shares): {_si(rep.quantizer_flops)} FLOPs in {rep.quantizer_calls} calls")
    for op, module, n in rep.unaccounted:
        lines.append(f"not counted (no FLOP formula): {op} in {_where(module)}, {n} calls")
    if any(r.op in FLOAT32_ROUTE_OPS for r in rep.rows):
        lines.append("lowbit.int8_mm_f32 / lowbit.int8_bmm_f32 / lowbit.int8_conv_f32 = int8 codes summed exactly on float32 "
                     "units: no int8 dot product on this CPU, or LOWBIT_INT8_ENGINE=float32 (lowbit.kernels.exact_f32)")
    if any(SIMULATED in r.formats for r in rep.rows):
        lines.append("sim = float operand holding dequantized low-bit codes (lowbit's reference "
                     "kernels: simulated low-bit)")
    return "\n".join(lines)


# -- the training step ----------------------------------------------------------------------
def _required_positionals(fn: Callable[..., Any]) -> int:
    """How many positional arguments ``fn`` requires (0 where its signature is unknown)."""
    import inspect

    try:  # fn's own parameters, not those of a function it wraps (functools.wraps: a review) —
        # but a pass-through wrapper's (*args, **kwargs) says nothing: what it passes on to
        # (a decorated or torch.compile'd loss: a second review)
        sig = inspect.signature(fn, follow_wrapped=False)
        if hasattr(fn, "__wrapped__") and any(p.kind is p.VAR_POSITIONAL for p in sig.parameters.values()):
            sig = inspect.signature(fn)
        params = sig.parameters.values()
    except Exception:  # noqa: BLE001 - a builtin without a signature, a __signature__ that raises
        return 0
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def default_loss(output: Any) -> torch.Tensor:
    """The loss of one step when ``loss_fn`` is None: the model's own loss if it returns
    one (a 0-d tensor, a ``.loss`` attribute as Hugging Face outputs have, or the first
    0-d floating tensor in a tuple/list/dict such as TinyGPT's ``(logits, loss)``), else
    the sum of every floating output that requires grad."""
    own = getattr(output, "loss", None)
    if isinstance(own, torch.Tensor):
        return own
    leaves = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)
              and t.is_floating_point() and t.requires_grad]
    scalar = next((t for t in leaves if t.dim() == 0), None)
    if scalar is not None:
        return scalar
    if not leaves:
        raise ValueError("the model's output has no floating tensor that requires grad: "
                         "nothing to back-propagate (frozen parameters, or pass loss_fn)")
    return sum(t.float().sum() for t in leaves)  # type: ignore[return-value]


def _refuse_stateful_grad_hooks(model: nn.Module) -> None:
    """``ValueError`` for parameters with post-accumulate-grad hooks (torch's "optimizer
    step in backward" pattern): coverage's backward would run them — an optimizer step,
    which cannot be undone afterwards."""
    hooked = [n for n, p in model.named_parameters() if getattr(p, "_post_accumulate_grad_hooks", None)]
    if hooked:
        raise ValueError(f"coverage runs a backward pass, which would run the post-accumulate-grad "
                         f"hooks of {hooked[:3]} (an optimizer step in the backward, say) and change "
                         "the model irreversibly: measure a copy without those hooks")


@contextlib.contextmanager
def _eager_kernels() -> Iterator[None]:
    """lowbit's fused quantizer/epilogue kernels off for the block: torch.compile does not
    compile under a dispatch mode. They compute the same codes as the eager reference
    kernels, and where they decide which GEMMs run (attention's forward in pieces and its
    first pass) the decision is made as untraced (``compiled.as_untraced``), so the traced
    GEMMs are the same."""
    with compiled.off_for_trace():
        yield


def coverage(model: nn.Module, *example_inputs: Any,
             loss_fn: Callable[[Any], torch.Tensor] | None = None,
             model_kwargs: Mapping[str, Any] | None = None, **unexpected: Any) -> CoverageReport:
    """Run one training step of ``model`` on ``example_inputs`` and report which of
    its GEMMs ran low-bit.

    The step is ``loss_fn(model(*example_inputs, **model_kwargs)).backward()`` in train
    mode with grad enabled (``loss_fn=None``: :func:`default_loss`); no optimizer step.
    Everything the step changes is put back afterwards (parameter and input ``.grad``,
    buffers, train/eval flags, global RNG states, lowbit layers' SR generators and
    range trackers): the model trains on exactly as if the call had not happened.
    Coverage depends on shapes and the recipe, not on the values of the inputs. lowbit's
    fused (``torch.compile``) quantizer kernels run as their eager reference during the
    step (same codes; they never choose a GEMM).

    Counts what executed, at the aten level (see :mod:`lowbit.gemm_trace`): a converted
    layer that is never called counts nothing. A converted convolution's passes count
    the convolution's FLOPs (:func:`lowbit.flops.conv_flops`), not the zero products
    its kernels may also multiply (padded rows, zero-inserted codes), so the share does
    not depend on the kernel chosen. Raises ``TypeError`` for a ``model`` that
    is not an ``nn.Module``, a ``loss_fn`` that is not callable or keyword arguments
    other than ``loss_fn``/``model_kwargs`` (the model's go in ``model_kwargs``), ``ValueError`` when
    the loss is not a floating 0-d tensor that requires grad, or when a parameter has a
    post-accumulate-grad hook (an optimizer step in the backward: the step could not be
    undone). A ``torch.compile``'d model is traced as its original module (the same
    GEMMs, their rows under the original names). Under DDP or FSDP2 call it on every rank (its backward runs collectives);
    lowbit's communication hook's state is put back, other hooks' state is not.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        # torch.compile(model): its code does not run under the trace's dispatch mode (the
        # default falls back to eager; fullgraph=True raised "found no compiled frames", a
        # review), so the original module is traced, under its own names
        model = model._orig_mod
    if unexpected:  # coverage(gpt2, input_ids=ids): the usual way to call an HF model
        raise TypeError(f"coverage() got keyword arguments {sorted(unexpected)}: pass the model's "
                        f"keyword inputs as model_kwargs=dict({', '.join(f'{k}=…' for k in sorted(unexpected))})")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if loss_fn is not None and _required_positionals(loss_fn) > 1:
        # gradient_variance's loss_fn(model, batch) passed here failed inside the step with
        # Python's "missing 1 required positional argument" (a new user's trial)
        raise TypeError("coverage's loss_fn takes the model's output alone (loss_fn(output) -> loss), got a "
                        f"function of {_required_positionals(loss_fn)} required arguments; "
                        "lowbit.analysis.gradient_variance's takes (model, batch)")
    _refuse_stateful_grad_hooks(model)
    kwargs = dict(model_kwargs or {})
    with training_grad_mode():  # inside torch.inference_mode() too, as under no_grad (lowbit.gradmode)
        example_inputs, kwargs = saveable((tuple(example_inputs), kwargs))
    layers = {id(m): n for n, m in fqt_layers(model).items()}
    tracer = GemmTracer(model, (example_inputs, kwargs), layers)
    with training_grad_mode(), kept(model, (example_inputs, kwargs)), uncounted_ranges(), \
            _eager_kernels():
        model.train()
        for m in fqt_layers(model).values():  # restored afterwards (lowbit.stepstate.kept)
            m.ran = False
        with tracer.tracing():
            loss = (loss_fn or default_loss)(model(*example_inputs, **kwargs))
            if not (isinstance(loss, torch.Tensor) and loss.dim() == 0
                    and loss.is_floating_point() and loss.requires_grad):
                what = (f"a tensor of shape {tuple(loss.shape)}, dtype {loss.dtype}, requires_grad="
                        f"{loss.requires_grad}" if isinstance(loss, torch.Tensor)
                        else type(loss).__name__)
                raise ValueError(f"the loss must be a floating 0-d tensor that requires grad, got {what}")
            loss.backward()
        # a block reached through a method, not its __call__ (an nn.MultiheadAttention's
        # attention product: attention.attend(...)), escapes the module hooks; its flag not
        ran = {id(m) for m in fqt_layers(model).values() if m.ran}
    unaccounted: dict[tuple[str, str], int] = {}
    for key in tracer.unaccounted:
        unaccounted[key] = unaccounted.get(key, 0) + 1
    return CoverageReport.from_calls(
        tracer.calls, quantizer_flops=tracer.quantizer_flops, quantizer_calls=tracer.quantizer_calls,
        unaccounted=tuple((o, m, n) for (o, m), n in unaccounted.items()),
        never_called=tuple(n for i, n in layers.items() if i not in tracer.called and i not in ran))


__all__ = ["CoverageReport", "GemmRow", "OUTSIDE", "SIMULATED", "coverage", "default_loss"]
