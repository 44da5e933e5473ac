"""Trace the GEMMs that really execute: who issued them, in which pass, on what formats.

:class:`GemmTracer` is a ``TorchDispatchMode``: it sees every aten op after autograd and
after composite ops have decomposed (``F.linear`` arrives as ``addmm``, ``matmul`` as
``mm``/``bmm``), so it counts what ran — a converted module that is never called adds
nothing, and ``torch._int_mm``/``torch._scaled_mm`` are counted like any GEMM
(FLOPs from :mod:`lowbit.flops`). For each GEMM it records:

* **the module**: in the forward, the innermost module whose forward is running; in the
  backward, the module whose forward *created the autograd node* being run. Each forward
  call of a module spans an interval of autograd sequence numbers
  (``torch._C._autograd._get_sequence_nr``); the node being run
  (``torch._C._current_autograd_node``) falls in the innermost such interval.
* **the pass**: ``forward`` (a forward recomputed in the backward by activation
  checkpointing included); in the backward ``grad_input`` when an operand derives from
  a parameter (``∇X = ∇Y·W``), ``grad_weight`` when no operand does and the output has
  a parameter's shape (``∇W = ∇Yᵀ·X``), as the op says for ``convolution_backward``,
  else ``backward`` (attention, activation × activation products).
* **the operand formats**: the dtype (``int8``, ``fp8 e4m3``, ``bf16``, ``fp32``...), or
  :data:`SIMULATED` for float operands that hold dequantized low-bit codes; for codes,
  the grid they hold where it is not the dtype's own, as lowbit's quantizers told
  (:mod:`lowbit.grid_notes`) and carried through the aten ops that copy, reshape or
  shift codes: ``int4`` (int4 codes in int8 storage), ``int5a``, ``int4 (u8 + 128)``; an
  FP8 operand holding another format's elements adds that format's name. The GEMM's kind
  comes from the dtypes alone. Data flow
  decides: a float tensor made from codes lowbit's quantizers made (not any int8 tensor) is
  *dequantized*, and stays so
  through scaling (``mul``/``div``), adding the grid's offset (a tensor the quantizer
  made: asymmetric grids), dtype casts, views and lowbit's row transforms;
  a GEMM's output never is. A float GEMM whose operands are all dequantized is
  lowbit's reference (simulated) path; one with a plain float operand is float.

Where values come from is tracked per tensor: *param* (made from parameters only, named
by the first), *data* (depends on the inputs) or *const*. GEMMs inside lowbit's
``lowbit::transform``/``lowbit::quantize`` profiler scopes (e.g. BHQ's group sums)
are quantizer work, not model GEMMs: they are summed apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakTensorKeyDictionary

from . import flops, grid_notes
from .config import FQTConfig
from .conversion import quote_module
from .nn import call_input
from .scopes import recorded

aten = torch.ops.aten
SIMULATED = "float (simulated low-bit)"
PHASES = ("forward", "grad_input", "grad_weight", "backward")
REAL_KINDS = ("int8", "fp8", "fp4")  # low-bit GEMMs on real low-bit kernels
KINDS = (*REAL_KINDS, "simulated", "float")
OUTSIDE = "(outside model)"  # GEMMs of the loss function or other code around the model

_FORMATS = {torch.int8: "int8", torch.bfloat16: "bf16", torch.float16: "fp16",
            torch.float32: "fp32", torch.float64: "fp64",
            torch.uint8: "int8 (u8 + 128)"}  # int8 codes shifted for oneDNN (kernels.qconv)
for _name, _label in (("float8_e4m3fn", "fp8 e4m3"), ("float8_e4m3fnuz", "fp8 e4m3"),
                      ("float8_e5m2", "fp8 e5m2"), ("float8_e5m2fnuz", "fp8 e5m2"),
                      ("float4_e2m1fn_x2", "fp4 e2m1")):
    if hasattr(torch, _name):
        _FORMATS[getattr(torch, _name)] = _label
CODE_DTYPES = frozenset(d for d, f in _FORMATS.items() if f.startswith(("int8", "fp8", "fp4")))
_QUANTIZER_SCOPES = ("lowbit::transform", "lowbit::quantize")
# a backward GEMM run inside one of these scopes is of that pass (lowbit.conv's im2col GEMMs)
_PHASE_SCOPES = {"lowbit::grad_input": "grad_input", "lowbit::grad_weight": "grad_weight"}
_profiler = torch.ops.profiler
_SCOPE_ENTER = {_profiler._record_function_enter_new.default, _profiler._record_function_enter.default}
_SCOPE_EXIT = {_profiler._record_function_exit.default,
               _profiler._record_function_exit._RecordFunction}
_SCALING = {aten.mul, aten.div}
_BUILTIN_NAMESPACES = frozenset({"aten", "prim", "prims", "profiler", "_c10d_functional",
                                 "c10d", "c10d_functional", "quantized", "rngprims"})
_BACKEND_KEYS = {"cpu": "CPU", "cuda": "CUDA", "xpu": "XPU", "mps": "MPS"}


class Taint(NamedTuple):
    """Where a tensor's values come from: ``kind`` is ``param``, ``data`` or ``const``;
    ``param`` names the parameter (kind ``param``); ``deq``: dequantized low-bit codes;
    ``grid``: made by a quantizer (inside ``lowbit::quantize``: a scale, an asymmetric
    grid's offset) or a view/cast of such a tensor."""

    kind: str
    param: str | None = None
    deq: bool = False
    grid: bool = False


_CONST = Taint("const")


def _storage_key(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (its views share it), or None where it has none to
    read (meta, sparse, wrapper tensors). A freed storage's address can come back: the
    new tensor's own op writes its entry again, later, so a stale one is never read. The
    granularity is the storage: a write through one view re-taints views of other parts
    of it made before (``q, k, v = qkv.chunk(3)``, then ``q.mul_``): harmless where the
    parts share their origin, as lowbit's buffers do."""
    if t.layout != torch.strided or t.device.type == "meta":
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return ptr or None  # empty storages all sit at address 0


@dataclass
class GemmCall:
    """One executed GEMM part (see :class:`lowbit.flops.Part`)."""

    module: str  # fully qualified name; "" is the model itself; OUTSIDE
    module_type: str
    op: str  # e.g. "aten._int_mm"
    phase: str  # one of PHASES
    formats: tuple[str, ...]  # per operand
    kind: str  # one of KINDS
    flops: int
    weight: str | None  # the parameter an operand derives from
    reason: str | None  # float GEMMs: why not low-bit


def operand_format(t: torch.Tensor, taint: Taint) -> str:
    """``int8``, ``fp8 e4m3``, ``bf16``, ``fp32``, ... or :data:`SIMULATED`."""
    if taint.deq and t.dtype not in CODE_DTYPES:
        return SIMULATED
    return _FORMATS.get(t.dtype, str(t.dtype).removeprefix("torch."))


def with_grid(label: str, grid: str | None) -> str:
    """An operand's :func:`operand_format` label with the grid its codes hold, where that
    is not the dtype's own: ``int8`` holding int4 codes is ``int4`` (``int4 (u8 + 128)``
    shifted for oneDNN); an FP8 operand holding another format's elements ``fp8 e4m3
    (NAME)`` (the format's :attr:`~lowbit.formats.Format.name`)."""
    if grid is None or label == SIMULATED:
        return label
    if grid.startswith("int") and label.startswith("int8"):
        return grid + label.removeprefix("int8")
    return label if grid.replace("_", " ") == label else f"{label} ({grid})"


def gemm_kind(formats: tuple[str, ...]) -> str:
    """``int8``/``fp8``/``fp4`` when every operand is one of those formats (the
    narrowest one named), ``simulated`` when every operand is low-bit and one is
    simulated, else ``float``."""
    families = {f.split(" ")[0] for f in formats if f != SIMULATED}
    if not families <= set(REAL_KINDS):
        return "float"
    if SIMULATED in formats:
        return "simulated"
    return next(k for k in reversed(REAL_KINDS) if k in families)


class _ModuleSpans:
    """Which module is running (forward) or created the running autograd node (backward)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = list(dict((id(m), m) for m in model.modules()).values())
        self.stack: list[tuple[nn.Module, int]] = []
        self.spans: list[tuple[int, int, nn.Module]] = []  # [start, end) sequence numbers
        self.called: set[int] = set()
        # each Linear/convolution forward call: (module id, its [start, end) sequence
        # numbers, the call's multiply-adds as the model's work); a backward node of the
        # call has its sequence number in that span
        self.layer_calls: list[tuple[int, int, int, int]] = []
        self._handles: list[Any] = []

    def install(self) -> None:
        for m in self.modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post, always_call=True, with_kwargs=True))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _pre(self, module: nn.Module, args: Any) -> None:
        self.called.add(id(module))
        self.stack.append((module, torch._C._autograd._get_sequence_nr()))

    def _post(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        inp = call_input(args, kwargs)  # conv(input=x) too
        logical = None
        if isinstance(inp, torch.Tensor) and isinstance(output, torch.Tensor):
            if isinstance(module, (nn.Conv1d, nn.Conv2d)):
                shape = _weight_shape(module)
                lead = (1,) if inp.dim() < len(shape) else ()  # unbatched input
                logical = flops.conv_flops((*lead, *inp.shape), shape, (*lead, *output.shape), False)
            elif inp.dim() >= 1 and inp.shape[-1] and output.dim() >= 1 \
                    and (isinstance(module, nn.Linear) or any(c.__name__ == "Conv1D" for c in type(module).__mro__)):
                # nn.Linear, HF Conv1D: rows · in · out, ``out`` from the weight it multiplies
                # (not the attributes: a weight replaced, a review; not the output a user's
                # forward hook may have reshaped, a second review), or from the output where
                # the weight is made by a parametrization (reading it would run it again)
                weight = module._parameters.get("weight")
                if weight is None or weight.dim() != 2:
                    out = output.shape[-1]
                else:  # nn.Linear's (out, in); HF Conv1D's (in, out)
                    out = weight.shape[0] if isinstance(module, nn.Linear) else weight.shape[1]
                logical = 2 * inp.numel() * out
        while self.stack:  # an exception may have skipped inner post-hooks
            m, start = self.stack.pop()
            end = torch._C._autograd._get_sequence_nr()
            self.spans.append((start, end, m))
            if m is module:
                if logical is not None:
                    self.layer_calls.append((id(module), start, end, logical))
                break

    def forward_call(self, module: nn.Module | None) -> int | None:
        """The index in :attr:`layer_calls` of ``module``'s forward call whose backward
        node is running (the innermost span holding the node's sequence number)."""
        node = torch._C._current_autograd_node()
        if node is None or module is None:
            return None
        seq, best, best_len = node._sequence_nr(), None, None
        for k, (mid, start, end, _) in enumerate(self.layer_calls):
            if mid == id(module) and start <= seq < end and (best_len is None or end - start < best_len):
                best, best_len = k, end - start
        return best

    def current(self, backward: bool) -> nn.Module | None:
        if not backward:
            return self.stack[-1][0] if self.stack else None
        node = torch._C._current_autograd_node()
        if node is None:
            return None
        seq, best, best_len = node._sequence_nr(), None, None
        for start, end, m in self.spans:  # inner spans close first: strict < keeps them
            if start <= seq < end and (best_len is None or end - start < best_len):
                best, best_len = m, end - start
        return best


class GemmTracer(TorchDispatchMode):
    """Record every GEMM run under it (``with GemmTracer(...).tracing(): ...``).

    ``model``'s parameters are the *param* sources (named as in ``named_parameters``),
    the tensors in ``inputs`` (any nesting) the *data* sources; ``lowbit_layers`` maps
    converted modules (by ``id``) to their names, for the float reasons. After the block:
    ``calls`` (one :class:`GemmCall` per GEMM part, in execution order),
    ``quantizer_flops``/``quantizer_calls`` (GEMMs in lowbit's quantizer scopes),
    ``unaccounted`` (op, module) pairs of matrix ops without a FLOP formula, and
    ``called`` (ids of the modules whose forward ran)."""

    def __init__(self, model: nn.Module, inputs: Any, lowbit_layers: dict[int, str]) -> None:
        super().__init__()
        self.names = {id(m): n for n, m in model.named_modules()}
        self.by_name = dict(model.named_modules())
        self.lowbit_layers = lowbit_layers
        self.owner: dict[str, nn.Module] = {}  # parameter name -> module holding it
        self.taints = WeakTensorKeyDictionary()
        # When each tensor's taint was set, and the latest taint written into each
        # storage: a write through one view (``add(..., out=buf[0])``, Hadamard's
        # butterflies) must reach the other views of the buffer made before it (a review
        # found Hadamard's inverted operands counted as float GEMM inputs)
        self._when = WeakTensorKeyDictionary()
        self._storage: dict[int, tuple[Taint, int]] = {}
        self._clock = 0
        self._grids = WeakTensorKeyDictionary()  # codes -> the grid they hold (grid_notes)
        self._param_storage: dict[int, str] = {}
        for mname, m in model.named_modules():
            for pname, p in m.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if p not in self.taints:
                    self.taints[p] = Taint("param", full)
                    self.owner[full] = m
                    key = _storage_key(p) if p.numel() else None  # None: meta, a DTensor shard (FSDP2)
                    if key is not None:
                        self._param_storage.setdefault(key, full)
        for t in tree_leaves(inputs):
            if isinstance(t, torch.Tensor):
                self.taints[t] = Taint("data")
        self.spans = _ModuleSpans(model)
        self.scopes: list[str] = []
        self.calls: list[GemmCall] = []
        self.forward_uses: set[tuple[int, str]] = set()  # (id(module), parameter) of forward GEMMs (∇W names)
        self.quantizer_flops = 0
        self.quantizer_calls = 0
        self.unaccounted: list[tuple[str, str]] = []
        # (module id, pass) -> the forward calls (spans.layer_calls) whose backward ran it
        self._differentiated: dict[tuple[int, str], set[tuple[int, int]]] = {}  # (call, graph task)

    @property
    def called(self) -> set[int]:
        return self.spans.called

    @contextlib.contextmanager
    def tracing(self) -> Iterator[GemmTracer]:
        """The block to trace: module hooks installed, this mode on."""
        self.spans.install()
        grid_notes.LISTENERS.append(self)
        try:
            with self, recorded():  # lowbit's profiler scopes, which place GEMMs in passes
                yield self
        finally:
            self.spans.remove()
            grid_notes.LISTENERS.remove(self)
        self._count_layers_as_layers()

    def _count_layers_as_layers(self) -> None:
        """A converted Linear's or convolution's passes count the layer's multiply-adds
        (each pass multiplies the forward's pairs: ``2·rows·in·out``,
        :func:`lowbit.flops.conv_flops`), not its kernels' GEMM sizes: ∇W per kernel row
        sums over the padded rows, ∇X at stride > 1 multiplies zero-inserted codes, a
        Hadamard gradient runs on rows padded to its block, so the executed sizes exceed
        the model's work (by 25% for a 3×3 ∇W on 8×8 images; 2× for a 65-row Hadamard ∇X)
        and the low-bit share would depend on the kernel chosen. ∇X and ∇W count the
        forward calls their backward nodes belong to, once per backward pass that
        differentiates them (a recompute's or a ``no_grad`` call's nodes never run backward:
        counting them doubled both passes, a review; a call differentiated twice —
        ``autograd.grad`` and then ``backward`` — counts twice). The forward's GEMMs are
        the layer's work as it ran (an activation checkpoint's recompute too, also one
        stopped inside the layer). A pass's calls keep their ops and formats; their FLOPs
        are scaled in proportion to sum to the layer's."""
        for mid in dict.fromkeys(mid for mid, _, _, _ in self.spans.layer_calls):
            if mid not in self.lowbit_layers:
                continue  # a float layer's ops already count it (torch's formulas)
            name = self.names.get(mid, "")
            # the forward's GEMMs are the layer's work as it ran (a checkpoint's recompute may
            # stop inside a layer, before the hook that would count the call)
            for phase in ("grad_input", "grad_weight"):
                logical = sum(self.spans.layer_calls[k][3] for k, _ in self._differentiated.get((mid, phase), ()))
                idx = [i for i, c in enumerate(self.calls) if c.module == name and c.phase == phase]
                executed = sum(self.calls[i].flops for i in idx)
                if not executed or not logical or executed == logical:  # (no call found: as executed)
                    continue
                done = 0
                for j, i in enumerate(idx):
                    share = logical - done if j == len(idx) - 1 else self.calls[i].flops * logical // executed
                    self.calls[i] = dataclasses.replace(self.calls[i], flops=share)
                    done += share

    # -- dispatch ---------------------------------------------------------------------
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if _composite(func):  # what runs is its decomposition: trace that
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        key = _python_kernel_key(func, args)
        if key is not None and func.overloadpacket not in flops.FORMULAS:
            # a custom op: run its kernel with this mode on, to see inside (one with a
            # FLOP formula, lowbit::int8_mm, is a GEMM itself: observed below)
            with self:
                return func._op_dk(key, *args, **kwargs)
        out = func(*args, **kwargs)
        if func in _SCOPE_ENTER:
            self.scopes.append(str(args[0]))
        elif func in _SCOPE_EXIT:
            if self.scopes:
                self.scopes.pop()
        else:
            self._observe(func, args, kwargs, out)
        return out

    def note_grid(self, codes: torch.Tensor, name: str) -> None:
        """``codes`` hold codes on the grid ``name`` (:func:`lowbit.grid_notes.note`)."""
        self._grids[codes] = name

    def grid_of(self, t: torch.Tensor) -> str | None:
        """The grid ``t``'s codes hold, where a quantizer told it; else None."""
        return self._grids.get(t) if t.dtype in CODE_DTYPES else None

    def _carry_grid(self, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
        """Codes an op makes from codes (a view, copy, concatenation, im2col — also through
        a wider integer view that moves eight codes at a time —, the shift to unsigned)
        hold their grid, where all its code inputs hold one grid. Not called for GEMMs."""
        codes = [t for t in ins if t.dtype in CODE_DTYPES or t in self._grids]
        if not codes:
            return
        names = {self._grids.get(t) for t in codes}
        if len(names) != 1 or None in names:
            return
        name = names.pop()
        for o in outs:
            if o.dtype in CODE_DTYPES or not (o.is_floating_point() or o.is_complex() or o.dtype == torch.bool):
                self._grids[o] = name

    def taint(self, t: torch.Tensor) -> Taint:
        got = self.taints.get(t)
        key = _storage_key(t)
        written = self._storage.get(key) if key is not None else None
        if written is not None and (got is None or written[1] > self._when.get(t, -1)):
            return written[0]  # its storage was written since this tensor's taint was set
        if got is not None:
            return got
        key = _storage_key(t) if self._param_storage else None
        if key is not None:  # a view of a parameter made before tracing
            name = self._param_storage.get(key)
            if name is not None:
                return Taint("param", name)
        return _CONST

    def _observe(self, func: Any, args: Any, kwargs: Any, out: Any) -> None:
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        in_quantizer = any(s in _QUANTIZER_SCOPES for s in self.scopes)
        parts = flops.parts(func, args, out)
        if parts is not None:
            for part in parts:
                self._record(func, part, out, in_quantizer)
        elif flops.looks_like_gemm(func):
            module = self.spans.current(self._in_backward())
            self.unaccounted.append((str(func.overloadpacket), self._name(module)))
        if outs:
            taint = self._propagate(func, ins, outs, parts is not None and not in_quantizer, in_quantizer)
            self._clock += 1
            for o in outs:
                self.taints[o] = taint
                self._when[o] = self._clock
                key = _storage_key(o)
                if key is not None:
                    self._storage[key] = (taint, self._clock)
            if parts is None:
                self._carry_grid(ins, outs)

    def _propagate(self, func: Any, ins: list[torch.Tensor], outs: list[torch.Tensor],
                   gemm: bool, in_quantizer: bool) -> Taint:
        taints = [self.taint(t) for t in ins]
        kinds = {t.kind for t in taints}
        kind = "data" if "data" in kinds else "param" if "param" in kinds else "const"
        param = next((t.param for t in taints if t.kind == "param"), None) if kind == "param" else None
        grid = not gemm and ("lowbit::quantize" in self.scopes
                             or (bool(taints) and all(t.grid for t in taints)))
        return Taint(kind, param, not gemm and self._dequantized(func, ins, taints, outs, in_quantizer),
                     grid)

    def _dequantized(self, func: Any, ins: list[torch.Tensor], taints: list[Taint],
                     outs: list[torch.Tensor], in_quantizer: bool) -> bool:
        """Do the outputs hold dequantized low-bit codes (see the module docstring)? Codes
        are what lowbit's quantizers made (their grid is known: :meth:`note_grid`), not
        any int8/uint8 tensor: a model's own uint8 padding mask times its activations is
        float (a review found its float attention reported as simulated low-bit)."""
        low = [tn.deq or (t.dtype in CODE_DTYPES and t in self._grids) for t, tn in zip(ins, taints)]
        if not any(low) or not any(o.is_floating_point() for o in outs):
            return False
        if in_quantizer or func.overloadpacket in _SCALING:
            return True
        if func.overloadpacket is aten.copy_:
            return len(low) > 1 and low[1]
        # the grid's own tensors (an asymmetric grid's offset ``+ z``) keep codes dequantized
        return all(lo or tn.grid for t, tn, lo in zip(ins, taints, low) if t.is_floating_point() or lo)

    # -- records ----------------------------------------------------------------------
    def _in_backward(self) -> bool:
        """Running the backward — but not a forward recomputed inside it (activation
        checkpointing: a module's forward is running), which counts as forward."""
        return torch._C._current_graph_task_id() != -1 and not self.spans.stack

    def _name(self, module: nn.Module | None) -> str:
        return OUTSIDE if module is None else self.names.get(id(module), OUTSIDE)

    def _weight_holders(self, module: nn.Module | None) -> list[nn.Module]:
        """``module``, or — for a block without parameters of its own that is handed its
        weight (an attention in-projection gets its parent's ``in_proj_weight``) — its
        nearest ancestor that holds parameters."""
        if module is None or next(module.parameters(recurse=False), None) is not None:
            return [] if module is None else [module]
        name = self._name(module)
        while name not in ("", OUTSIDE):
            name = name.rpartition(".")[0]
            parent = self.by_name.get(name)
            if parent is not None and next(parent.parameters(recurse=False), None) is not None:
                return [module, parent]
        return [module]

    def _owned_elsewhere(self, param: str, module: nn.Module | None) -> bool:
        """Whether parameter ``param`` belongs to a converted layer other than ``module``
        that ``module``'s own forward GEMMs never used (a forward reading a converted
        layer's weight directly — a bypass — has its ∇W named so)."""
        owner = self.owner.get(param)
        return (owner is not None and owner is not module and id(owner) in self.lowbit_layers
                and (id(module), param) not in self.forward_uses)

    def _gradient_of(self, module: nn.Module | None, out: Any) -> str | None:
        """The name of the parameter of ``module`` (or its parent) whose shape ``out``
        has — a ∇W GEMM's output — else None (a GEMM in row panels has a part of it).
        Where several parameters have that shape: those the running backward node feeds
        (:func:`_autograd_leaves`), then the one a forward GEMM of this trace used;
        ``None`` where that does not single one out (a wrong name would be worse). (One
        parameter of that shape is taken as it: a weight computed from parameters —
        weight norm — reaches its GEMM through an op's node, as an activation does.)"""
        for m in self._weight_holders(module):
            padded = id(m) in self.lowbit_layers  # only lowbit's layers pad rows
            # not a weight another converted layer owns (a child's of the same shape: a root
            # tied head's ∇X was named the ∇W of a (16, 16) layer below it: a second review)
            names = [n for p in _weights_shaped_like(out, m, padded) if (n := self.taint(p).param) is not None
                     and not self._owned_elsewhere(n, module)]
            leaves = _autograd_leaves() if len(set(names)) > 1 else None
            if leaves is not None:  # the running node's parameters decide
                named = {n for p in leaves if (n := self.taint(p).param) is not None}
                names = [n for n in names if n in named] or names
            used = [n for n in names if any(w == n for _, w in self.forward_uses)]
            if len(set(used)) == 1:
                return used[0]
            if names:
                return names[0] if len(set(names)) == 1 else None
        return None

    def _record(self, func: Any, part: flops.Part, out: Any, in_quantizer: bool) -> None:
        if in_quantizer:
            self.quantizer_flops += part.flops
            self.quantizer_calls += 1
            return
        backward = self._in_backward()
        module = self.spans.current(backward)
        taints = [self.taint(t) for t in part.operands]
        weight = next((t.param for t in taints if t.kind == "param"), None)
        # the layer's own weight first — by name (its codes carry it) or storage (a weight
        # tied to another layer's is its own too): a Linear fed a parameter (learned latents
        # or queries) had that parameter named as its weight and its ∇W called ∇X (a review)
        holders = self._weight_holders(module)
        own = {_storage_key(p) for m in holders for p in m.parameters(recurse=False)}
        # a parametrized weight (weight_norm) is made from the holder's parametrizations' own
        # parameters: its ∇X was called ∇W where ∇X has the weight's shape (a review)
        made = tuple(f"{n}.parametrizations." if (n := self._name(m)) else "parametrizations." for m in holders)
        owned = next((tn.param for t, tn in zip(part.operands, taints) if tn.kind == "param"
                      and (self.owner.get(tn.param) in holders or _storage_key(t) in own
                           or tn.param.startswith(made))), None)
        if owned is not None:
            weight = owned
        if not backward:
            phase = "forward"
        elif part.role is not None:
            phase = part.role
            if phase == "grad_weight" and owned is None:  # convolution_backward: (∇X, ∇W, ∇b)
                weight = self._gradient_of(module, out[1] if isinstance(out, (tuple, list)) and len(out) > 1 else out)
        elif any(s in _PHASE_SCOPES for s in self.scopes):
            phase = next(_PHASE_SCOPES[s] for s in reversed(self.scopes) if s in _PHASE_SCOPES)
            if phase == "grad_weight" and owned is None:  # ∇W's operands hold no weight of the layer
                weight = self._gradient_of(module, out)
        elif owned is not None:  # the layer's weight multiplies ∇Y
            phase = "grad_input"
        elif (grad := self._gradient_of(module, out)) is not None:  # another parameter times ∇Y: ∇W
            weight, phase = grad, "grad_weight"
        else:
            phase = "backward" if weight is None else "grad_input"
        if weight is None and module is not None and id(module) in self.lowbit_layers and \
                phase in ("forward", "grad_input", "grad_weight"):
            # a converted layer's three GEMMs are its weight's, whatever operands its kernels
            # hold (oneDNN's prepacked codes, ∇W per kernel row carry no link to it: a review
            # found a converted convolution's rows without their weight)
            own = module._parameters.get("weight")
            if own is None and parametrize.is_parametrized(module, "weight"):  # weight_norm, spectral_norm…:
                # the original the weight is made from (its largest: weight_norm's direction v,
                # as a float or converted Linear's rows name it; a second review)
                own = max(module.parametrizations["weight"].parameters(recurse=False), key=torch.numel, default=None)
            weight = None if own is None else self.taint(own).param
        if backward and phase in ("grad_input", "grad_weight"):
            k = self.spans.forward_call(module)
            if k is not None:
                task = torch._C._current_graph_task_id()  # a call differentiated twice counts twice
                self._differentiated.setdefault((id(module), phase), set()).add((k, task))
        if phase == "forward" and weight is not None:
            self.forward_uses.add((id(module), weight))
        dtypes = tuple(operand_format(t, tn) for t, tn in zip(part.operands, taints))
        kind = gemm_kind(dtypes)
        formats = tuple(with_grid(f, self.grid_of(t)) for f, t in zip(dtypes, part.operands))
        op = str(func.overloadpacket)
        reason = None
        if kind == "float":
            reason = self._why_float(module, phase, op, weight)
        elif kind == "simulated":  # the reason the code running it gave (grid_notes.simulating)
            reason = grid_notes.REASONS[-1] if grid_notes.REASONS else "dequantized low-bit codes in a float GEMM"
        self.calls.append(GemmCall(self._name(module), "-" if module is None else type(module).__name__,
                                   op, phase, formats, kind, part.flops, weight, reason))

    def _why_float(self, module: nn.Module | None, phase: str, op: str, weight: str | None) -> str:
        if module is None:
            return "runs outside the model's modules (e.g. in the loss)"
        owner = self.owner.get(weight) if weight is not None else None
        if owner is not None and owner is not module and id(owner) in self.lowbit_layers:
            return (f"uses the weight of converted {quote_module(self.lowbit_layers[id(owner)])} "
                    f"({type(owner).__name__}) directly; that layer's forward is bypassed")
        if id(module) in self.lowbit_layers:
            return _why_layer_float(module, phase)
        if op.removeprefix("aten.") in {p.__name__ for p in flops.ATTENTION_OPS}:
            return "attention (softmax(QKᵀ)·V): not converted"
        if weight is None and phase in ("forward", "backward"):
            return "activation × activation product (e.g. attention): not converted"
        local = weight.removeprefix(f"{self._name(module)}.") if weight is not None else "weight"
        return f"{type(module).__name__} is not converted" + (f" ({local})" if local != "weight" else "") \
            + _not_converted_why(module)


def _not_converted_why(module: nn.Module) -> str:
    """Why a module's GEMM ran float though it is not lowbit's, after "X is not converted"
    (a new user's trial: a layer a ``module_filter`` excluded and a ``ConvTranspose2d``,
    which lowbit has no layer for, read alike)."""
    name = type(module).__name__
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention)) \
            or (name == "Conv1D" and type(module).__module__.startswith("transformers")):
        return (": a kind convert swaps, left float — excluded by a module_filter, skipped (the conversion "
                "report's skipped says why), or not reached by convert")
    if type(module).__module__.startswith("torch.nn"):
        return f": lowbit has no low-bit {name} (README, \"What stays in float after convert\")"
    return ": a functional GEMM in its forward (convert swaps modules, not calls)"


@functools.cache
def _composite(func: Any) -> bool:
    """Has ``func`` a CompositeImplicitAutograd kernel? (It reaches a dispatch mode
    undecomposed when called from inside a custom op's kernel.)"""
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def _python_kernel_key(func: Any, args: Any) -> Any:
    """The dispatch key of a custom (non-aten) op's own kernel — on the arguments'
    device or CompositeExplicitAutograd — or ``None`` (an aten op, or none found).
    Custom ops such as lowbit's ``lowbit::block_forward`` are opaque to a dispatch mode
    otherwise: their inner GEMMs would go unseen."""
    if func.namespace in _BUILTIN_NAMESPACES or not hasattr(func, "_op_dk"):
        return None
    dev = next((t.device.type for t in tree_leaves(args) if isinstance(t, torch.Tensor)), "cpu")
    for key in (_BACKEND_KEYS.get(dev), "CompositeExplicitAutograd"):
        if key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key):
            return getattr(torch._C.DispatchKey, key)
    return None


def _why_layer_float(module: nn.Module, phase: str) -> str:
    cfg = getattr(module, "config", None)
    if isinstance(cfg, FQTConfig):
        if cfg.is_fp:
            return "converted with the fp recipe (float by design)"
        spec = {"grad_input": cfg.grad_input, "grad_weight": cfg.grad_weight}.get(phase, 0)
        if spec is None:
            return f"the recipe keeps {phase} in float (QAT: straight-through)"
    return "a converted layer ran a float GEMM"


# autograd nodes that only move or cast a tensor: a parameter behind them is the GEMM's own
_PASS_THROUGH = re.compile(r"(T|Transpose|Permute|View|UnsafeView|Reshape|ReshapeAlias|Unsqueeze|Squeeze"
                           r"|Expand|Alias|ToCopy|Clone|AsStrided|Select|Slice)Backward\d*")


def _autograd_leaves(depth: int = 4) -> list[torch.Tensor] | None:
    """The leaf tensors (parameters) whose gradients the autograd node now running feeds,
    directly or through up to ``depth`` nodes that only move or cast them (a transpose, a
    view, a dtype cast between the GEMM and the parameter; never through another op's
    node, so a product of activations does not reach the parameters behind them);
    ``None`` outside a backward node."""
    node = torch._C._current_autograd_node()
    if node is None:
        return None
    leaves, frontier = [], [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for f, _ in n.next_functions:
                if f is None:
                    continue
                var = getattr(f, "variable", None)
                if var is not None:
                    leaves.append(var)
                elif _PASS_THROUGH.fullmatch(type(f).__name__):
                    nxt.append(f)
        frontier = nxt
    return leaves


def _weight_shape(module: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    """A convolution's kernel shape from its attributes, without reading a parametrized
    weight: each read runs the parametrization, whose GEMMs (spectral norm's power
    iteration, orthogonal's) a trace then counted again (a review: 4× a spectral-normed
    convolution's forward)."""
    return (module.out_channels, module.in_channels // module.groups, *module.kernel_size)


def _weights_shaped_like(out: Any, module: nn.Module | None, padded: bool = True) -> list[torch.Tensor]:
    """The matrices of ``module`` whose gradient a 2-D GEMM output ``out`` can be: those of
    the same shape or its transpose, else — ``padded``: a lowbit layer, whose row transform
    pads rows — those with the same columns and fewer rows; empty if none is. (Any module
    took the padded reading: a model multiplying ∇Y by an embedding's weight at its root,
    a (28, 16) ∇X, was named the ∇W of a converted (16, 16) layer below it: a new user's
    trial.)"""
    if module is None or not isinstance(out, torch.Tensor):
        return []
    if out.dim() != 2:  # a Bilinear's ∇W (O, I1, I2) from aten._trilinear (a review)
        return [p for p in module.parameters() if p.dim() > 2 and p.shape == out.shape]
    mats = [p for p in module.parameters() if p.dim() == 2]
    r, c = out.shape
    exact = [p for p in mats if tuple(p.shape) in ((r, c), (c, r))]
    return exact or ([p for p in mats if p.shape[1] == c and p.shape[0] < r] if padded else [])


__all__ = ["CODE_DTYPES", "KINDS", "OUTSIDE", "PHASES", "REAL_KINDS", "SIMULATED", "GemmCall",
           "GemmTracer", "Taint", "gemm_kind", "operand_format"]
