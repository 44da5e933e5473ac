"""A layer's quantized GEMM block as an opaque ``torch.library`` custom op.

Everything a converted layer does between its input and its output — quantizing the
operands, the integer or simulated GEMMs, the noise streams, the predicted-range
trackers — runs inside two custom ops, ``lowbit::block_forward`` and
``lowbit::block_backward`` (wired together with ``register_autograd``). Their arguments
are tensors, ints, strings and dtypes only, and each has a fake (meta) implementation,
so ``torch.compile`` traces a converted model into the same graphs as the unconverted
one, with one call per layer and no ``torch.Generator``, data-dependent branch or Python
state in traced code. Plain eager calls run the ops' own functions through an
``autograd.Function`` instead of the dispatcher (:func:`apply_block`; the custom op's
Python dispatch cost ≈ 0.15 ms per layer and step, docs/benchmarks.md "The custom op's
dispatch in eager mode"): the very same functions, so compiled and eager results are
bitwise equal.

On that eager path a block whose input the autograd node that made it keeps anyway (a
ReLU keeps its output, which the next convolution reads) saves that input instead of its
int8 codes and quantizes it again in the backward, where the forward's activation
quantizer is deterministic (round-to-nearest): the same codes, without a second copy of
the activation held through the step (:func:`kept_by_autograd`, :data:`SHARE_SAVED_INPUT`).

The Python state a block reads when it runs (recipe, :class:`~lowbit.noise.NoiseStream`,
range trackers) is a :class:`BlockState`, found from the op through its ``ident`` (a
tensor ``[number, process]``, registered weakly: the layer owns the state); the op's string
argument is the state's :func:`trace_key` — what a traced graph fixes of its config,
shared by the blocks of equal such parts, so a compiled frame several layers run compiles
once. Which GEMMs a block computes is a
row of a table (:func:`register_kind`): ``linear`` and ``conv2d`` are registered by
``lowbit.functional``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import itertools
import math
import secrets
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import FQTConfig, GradSpec, OperandSpec, describe, not_a_config
from .conversion import quote_module
from .formats import Rounding, compute_dtype
from .kernels import Kernels, kernels_for
from .kernels.cbuild import plain_torch
from .noise import NoiseStream, Path
from .quantizers import Granularity, QuantizedOperand, get_quantizer
from .quantizers.base import Identity
from .ranges import RangeTracker
from .userframe import user_stacklevel

# Predicted-range trackers of a block's (grad_input, grad_weight) paths; None: dynamic.
Trackers = tuple[RangeTracker | None, RangeTracker | None]
GRAD_PATHS = ("grad_input", "grad_weight")

_next_number = itertools.count()
# this process's mark on every state's ident: a graph traced or exported here (jit.trace,
# torch.export) names its layers' states by number, and in another process the same
# counter value belongs to another layer (a review found a saved trace using it silently)
_PROCESS = secrets.token_hex(4)
_PROCESS_NUMBER = int(_PROCESS, 16)
# every live state by number (BlockState.ident's first entry): the one registry
_BY_NUMBER: weakref.WeakValueDictionary[int, BlockState] = weakref.WeakValueDictionary()
# what a traced graph reads of a config (operand specs, backend), by trace key (BlockState.trace_key)
_TRACED: dict[tuple, str] = {}
_TRACED_SPECS: dict[str, tuple] = {}


def trace_key(config: FQTConfig) -> str:
    """The name under which :data:`block_forward`'s fake kernel and autograd context find
    what a traced graph fixes of ``config`` — its forward operand specs and backend (the
    saved codes' dtypes, shapes and block sizes) — the same string for every block of
    equal such parts. A compiled frame guards on it (a string constant of the graph): a
    config change that alters them retraces, and the blocks of one model share it, so a
    frame that several layers run (the code after a graph break in a transformer block)
    compiles once, not once per layer (a new user's trial: 28 recompiles, dynamo's limit
    hit, at 10 layers, when the per-layer handle was that constant)."""
    parts = (config.activation, config.weight, config.backend)
    key = _TRACED.get(parts)
    if key is None:
        key = _TRACED[parts] = f"traced{len(_TRACED)}@{_PROCESS}"
        _TRACED_SPECS[key] = parts
    return key


def _traced_specs(key: str) -> tuple:
    """(activation spec, weight spec, backend) of a :func:`trace_key`."""
    parts = _TRACED_SPECS.get(key)
    if parts is None:
        raise RuntimeError(f"lowbit: trace key {key!r} is not of this process: a graph traced or exported "
                           "elsewhere names its layers' states, which live in the process that traced it; "
                           "convert and trace (or export) the model again in this process")
    return parts


def tracker_key(spec: GradSpec | None, rows_persist: bool) -> tuple | None:
    """The :meth:`RangeTracker.key` a predicted spec's tracker has, ``None`` for a dynamic
    range. Per row only where rows persist and the quantizer neither mixes nor pools them."""
    if spec is None or not spec.predicted:
        return None
    q = get_quantizer(spec.quantizer)
    per_row = rows_persist and q.granularity is Granularity.ROW and not q.mixes_rows
    return (spec.history, spec.margin, per_row, spec.overflow.value, spec.quantizer)


def _tracker_for(spec: GradSpec | None, rows_persist: bool,
                 existing: RangeTracker | None) -> RangeTracker | None:
    """The tracker a predicted spec needs (``existing`` if it fits), else ``None``."""
    key = tracker_key(spec, rows_persist)
    if key is None:
        return None
    return existing if existing is not None and existing.key() == key else RangeTracker(*key)


class BlockState:
    """What one block reads when it runs: ``config`` (an :class:`FQTConfig`, may be
    reassigned), ``noise`` (its :class:`NoiseStream`) and ``range_trackers`` (created
    when a predicted spec asks for them). ``ident`` (an int64 CPU tensor ``[number,
    process]``, what the ops take) names it; ``trace_key`` is its config's
    :func:`trace_key`; a copy (``copy.deepcopy``, pickling) gets an ident of its own. ``policy_driven``: set by a
    ``VarianceMonitor`` whose policy chooses this block's widths (an ``fqt-auto*`` config
    without one warns at its first backward: :func:`warn_if_not_adaptive`)."""

    def __init__(self, config: FQTConfig, noise: NoiseStream) -> None:
        if not isinstance(config, FQTConfig):
            raise not_a_config(config)
        if not isinstance(noise, NoiseStream):
            raise TypeError(f"noise must be a lowbit.noise.NoiseStream, got {type(noise).__name__}")
        self._config = config
        self.noise = noise
        self.range_trackers: dict[str, RangeTracker] = {}
        # the loss scale of the gradients it sees now (lowbit.amp.GradScaler sets it): a
        # tracker it makes starts in it (a review: one made inside a scaled step counted
        # its accumulation's sums in scaled units)
        self.loss_scale = 1.0
        self.policy_driven = False
        self.undriven: str | None = None  # why a policy's monitor cannot drive it
        self._adaptive_checked = False
        self._register()

    @property
    def config(self) -> FQTConfig:
        return self._config

    @config.setter
    def config(self, value: FQTConfig) -> None:
        """A new config; where it asks for another seed than the current config's
        (``value.seed`` not ``None``), the noise stream restarts from that seed under the
        block's name — the stream a fresh ``convert`` with ``value`` gives — so that
        config and noise never disagree. The same seed (an adaptive width change, a
        temporary QAT twin) keeps the stream and its counter."""
        if not isinstance(value, FQTConfig):
            raise TypeError(f"config must be an FQTConfig, got {type(value).__name__}")
        if value.seed is not None and value.seed != self._config.seed:
            self.noise = NoiseStream(value.seed, self.noise.name)
        old, self._config = self._config, value
        if (old.activation, old.weight, old.backend) != (value.activation, value.weight, value.backend):
            # what a traced graph fixed (the operands' formats and block sizes, the fake
            # kernel's shapes): a new trace key makes torch.compile's guard on it fail, so
            # the graph is traced again (a compiled model kept the old formats: wrong ∇W)
            self._register()

    def _register(self) -> None:
        n = next(_next_number)
        _BY_NUMBER[n] = self
        # the state as the ops take it: a tensor, so that a compiled frame run by several
        # layers reads each layer's as data instead of guarding on a constant per layer;
        # a plain CPU tensor whatever the caller is inside (a review: made under
        # inference_mode it could not be saved for a backward, under torch.device("meta")
        # it could not be read, under a default CUDA device each read would sync)
        with plain_torch(), torch.inference_mode(False):
            self.ident = torch.tensor([n, _PROCESS_NUMBER], dtype=torch.int64, device="cpu")
        self.trace_key = trace_key(self._config)

    def __getstate__(self) -> dict[str, Any]:  # a copy is driven by no monitor yet
        return {k: v for k, v in self.__dict__.items()
                if k not in ("ident", "trace_key", "policy_driven", "undriven", "_adaptive_checked")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "config" in state:  # pickled before config became a property
            state = {("_config" if k == "config" else k): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if k != "handle"}  # pickled when states had one
        self.__dict__.update(state)
        self.__dict__.setdefault("loss_scale", 1.0)  # (pickled before it was kept)
        self.policy_driven, self.undriven, self._adaptive_checked = False, None, False
        self._register()

    def tracker_key(self, path: str) -> tuple | None:
        """The key of the tracker gradient path ``path`` needs under the current config
        (``None``: a dynamic range, no tracker)."""
        return tracker_key(getattr(self.config, path), path == "grad_weight")

    def drop_unfit_trackers(self) -> None:
        """Forget the trackers the current config does not use (a path now dynamic, or
        predicted with other settings): ``convert`` with a new recipe starts them afresh,
        as a fresh conversion would. (A temporary config — an adaptive width, a QAT twin —
        does not call this: its trackers persist.)"""
        for path in [p for p, t in self.range_trackers.items() if t.key() != self.tracker_key(p)]:
            del self.range_trackers[path]

    def trackers(self) -> Trackers:
        """(grad_input, grad_weight) trackers for the current config (``None``: dynamic).
        The ∇W path's rows are output features: they persist, so PSQ predicts per row."""
        out = []
        for path in GRAD_PATHS:
            t = _tracker_for(getattr(self.config, path), path == "grad_weight",
                             self.range_trackers.get(path))
            if t is not None and t is not self.range_trackers.get(path):
                t.loss_scale = self.loss_scale  # a new one: in the unit of the gradients now
            if t is not None:
                self.range_trackers[path] = t
            out.append(t)
        return out[0], out[1]


class AdaptiveRecipeWarning(UserWarning):
    """An ``fqt-auto*`` layer trained without the policy that chooses its widths."""


def warn_if_not_adaptive(state: BlockState) -> None:
    """Warn once per block when its config is the start of an adaptive recipe
    (``config.adaptive``) but no ``VarianceMonitor`` policy drives it: the recipe then
    trains at its fixed 8-bit start — or, for a copy of a layer a policy adapted, at the
    widths it has — which the name does not say (README fault kind 26)."""
    if state._adaptive_checked:
        return
    state._adaptive_checked = True
    name = state.config.adaptive
    if name is None or state.policy_driven:
        return
    # "" is also the name of a layer built without one (FQTLinear(..., name="")): not "<root>"
    layer = f"layer {quote_module(state.noise.name)}" if state.noise.name else "a layer"
    cfg, start = state.config, FQTConfig.from_recipe(name)
    # a copy of a layer a policy had adapted keeps its widths (a new user's trial: the
    # warning said "8-bit start" of a copy at gi:bhq4/gw:psq5)
    widths = ("the recipe's fixed 8-bit start" if (cfg.grad_input, cfg.grad_weight) == (start.grad_input,
                                                                                         start.grad_weight)
              else f"the gradient widths it has now, fixed "
                   f"({describe(dataclasses.replace(cfg, adaptive=None)).split('/', 1)[-1]})")
    why = (f"the VarianceMonitor attached to the model cannot drive it ({state.undriven})"
           if state.undriven is not None else
           f"the recipe chooses gradient bit widths only for the layers that "
           f"lowbit.monitor.VarianceMonitor(model, every, policy=lowbit.adaptive.AdaptivePolicy"
           f".from_recipe({name!r})) drives (`lowbit train` attaches one), and none drives this one")
    warnings.warn(f"lowbit: {layer} of recipe {name!r} trains at {widths}: {why}", AdaptiveRecipeWarning,
                  stacklevel=user_stacklevel())


def _state_of(ident: torch.Tensor) -> BlockState:
    """The state a block op's ``ident`` (:attr:`BlockState.ident`, ``[number, process]``)
    names. ``RuntimeError`` for another process's (a ``torch.jit.trace`` or
    ``torch.export`` run elsewhere) or for a state freed since its forward."""
    n, process = (int(v) for v in ident.tolist())
    if process != _PROCESS_NUMBER:
        raise RuntimeError(f"lowbit: block state {n}@{process:08x} belongs to another process: a "
                           "torch.jit.trace or torch.export of a converted model names its layers' "
                           "states, which live in the process that traced it; convert and trace "
                           "(or export) the model again in this process")
    state = _BY_NUMBER.get(n)
    if state is None:
        raise RuntimeError(f"lowbit: block state {n}@{process:08x} no longer exists (the layer or "
                           "BlockState that ran the forward was freed before its backward)")
    return state


@dataclass(frozen=True)
class BlockMeta:
    """What the backward knows of the forward's operands (shapes as int lists;
    ``blocks``: elements per block scale of the saved x and w codes, 0 for none)."""

    params: list[int]
    x_shape: list[int]
    x_dtype: torch.dtype
    w_shape: list[int]
    w_dtype: torch.dtype
    b_dtype: torch.dtype | None
    blocks: list[int] = dataclasses.field(default_factory=lambda: [0, 0])


@functools.lru_cache(maxsize=4096)
def _canonical_strides(shape: tuple[int, ...], fmt: torch.memory_format) -> tuple[int, ...]:
    return torch.empty(shape, memory_format=fmt, device="meta").stride()


def in_format(t: torch.Tensor, fmt: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``t`` with exactly the strides ``torch.empty(t.shape, memory_format=fmt)`` has
    (what the ops' fake implementations return), copied only where they differ:
    ``t.contiguous(memory_format=fmt)`` keeps a tensor that is contiguous in both formats
    (a size-1 channel or spatial extent) as it is, whose strides then say another format
    to the ops that read them (a float convolution chooses its algorithm, and its sums'
    order, by them)."""
    if t.stride() == _canonical_strides(tuple(t.shape), fmt):
        return t
    return t.clone(memory_format=fmt)


# A quantized operand crosses the ops as four tensors: codes, scale, offset, block scale;
# an absent offset or block scale is a 1-D empty tensor (a present one is 2-D).
def flatten_operand(q: QuantizedOperand, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``q``'s codes, scale, offset and block scale as four tensors (``like`` makes the
    1-D empty placeholders); its transform must be the identity."""
    return (q.codes.contiguous(), q.scale.contiguous(),
            like.new_empty(0) if q.offset is None else q.offset.contiguous(),
            like.new_empty(0) if q.block_scale is None else q.block_scale.contiguous())


def unflatten_operand(saved: Sequence[torch.Tensor], block: int,
                      kernels: Kernels | None = None) -> QuantizedOperand:
    """Inverse of :func:`flatten_operand` (``block``: elements per block scale;
    ``kernels``: the call's, for its dequantization)."""
    codes, scale, offset, bs = saved
    return QuantizedOperand(codes, scale, Identity(codes.shape[0]),
                            None if offset.dim() == 1 else offset,
                            None if bs.dim() == 1 else bs, block, kernels)


# forward(x, weight, bias, config, generators, params, out_dtype) -> (y, Q_f(x), Q_f(w));
# quantize_x(x, config, params) -> Q_f(x) as the forward made it (None: the kind always
#   saves the codes), for a round-to-nearest activation spec;
# backward(gy, qx, qw, config, generators, trackers, meta, needs) -> (gx, gw, gb);
# out_shape(x_shape, w_shape, params) -> the output's shape;
# memory_format(params) -> the memory format of y and ∇x (None: contiguous).
@dataclass(frozen=True)
class BlockKind:
    forward: Callable[..., tuple[torch.Tensor, QuantizedOperand, QuantizedOperand]]
    backward: Callable[..., tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]]
    out_shape: Callable[[Sequence[int], Sequence[int], Sequence[int]], list[int]]
    memory_format: Callable[[Sequence[int]], torch.memory_format] | None = None
    quantize_x: Callable[[torch.Tensor, FQTConfig, Sequence[int]], QuantizedOperand] | None = None

    def format_of(self, params: Sequence[int]) -> torch.memory_format:
        return torch.contiguous_format if self.memory_format is None else self.memory_format(params)


_KINDS: dict[str, BlockKind] = {}


def register_kind(name: str, kind: BlockKind) -> None:
    """Add a row to the block table (``lowbit.functional`` registers linear and conv2d)."""
    _KINDS[name] = kind


def _kind(name: str) -> BlockKind:
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"unknown block kind {name!r}; registered: {', '.join(_KINDS)}") from None


def stochastic_forward_paths(cfg: FQTConfig) -> tuple[Path, ...]:
    """The forward operands of a Linear/convolution block that round stochastically (and
    so draw noise in the forward): of ``(ACTIVATION, WEIGHT)``, those whose spec is set
    with ``Rounding.STOCHASTIC``."""
    specs: tuple[tuple[Path, OperandSpec | None], ...] = (
        (Path.ACTIVATION, cfg.activation), (Path.WEIGHT, cfg.weight))
    return tuple(p for p, s in specs if s is not None and s.rounding is Rounding.STOCHASTIC)


def _backward_paths(cfg: FQTConfig) -> tuple[Path, ...]:
    specs = ((Path.GRAD_INPUT, cfg.grad_input), (Path.GRAD_WEIGHT, cfg.grad_weight))
    return tuple(p for p, s in specs if s is not None)


# -- the two ops -----------------------------------------------------------------------
def _block_forward(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  key: str, ident: torch.Tensor, params: list[int], out_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                             torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, x_codes, x_scale, x_offset, x_block_scale, w_codes, w_scale, w_offset,
    w_block_scale)``: the output and the quantized forward operands saved for the
    backward (codes (rows, cols) int8 or float8, scales (rows, 1) or (1, 1) in the compute
    dtype, offsets and block scales 1-D empty where the format has none). Draws from
    torch's CPU RNG only for a stochastic-rounding forward spec. The block is the state
    ``ident`` names (:attr:`BlockState.ident`); ``key`` its :func:`trace_key`, which the
    fake kernel reads."""
    return _forward_of(_state_of(ident), kind, x, weight, bias, params, out_dtype)


def _forward_of(state: BlockState, kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                params: list[int], out_dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """:func:`_block_forward` of the block ``state`` itself (its ident already resolved)."""
    cfg = state.config
    gens = state.noise.forward_generators(x.device, stochastic_forward_paths(cfg))
    k = _kind(kind)
    y, qx, qw = k.forward(x, weight, bias, cfg, gens, params, out_dtype)
    return (in_format(y, k.format_of(params)), *flatten_operand(qx, y), *flatten_operand(qw, y))


block_forward = torch.library.custom_op("lowbit::block_forward", mutates_args=())(_block_forward)


def _fake_rows(t: torch.Tensor, spec: OperandSpec | None) -> tuple[torch.Tensor, ...]:
    rows, cols = t.shape[0], math.prod(t.shape[1:])
    fmt = spec.format if spec is not None else None  # type: ignore[union-attr]
    per_row = spec is not None and spec.granularity is Granularity.ROW
    dt = compute_dtype(t.dtype)
    scale = (rows if per_row else 1, 1)
    if fmt is not None and fmt.block and fmt.scale == "e8m0":  # type: ignore[attr-defined]
        scale = (1, 1)  # MX: no group scale
    return (t.new_empty((rows, cols), dtype=torch.int8 if fmt is None else fmt.code_dtype),
            t.new_empty(scale, dtype=dt),
            t.new_empty(scale, dtype=dt) if fmt is not None and fmt.asymmetric else t.new_empty(0),
            t.new_empty((rows, -(-cols // fmt.block)), dtype=dt) if fmt is not None and fmt.block
            else t.new_empty(0))


@block_forward.register_fake
def _(kind, x, weight, bias, key, ident, params, out_dtype):  # noqa: ANN001, ANN202
    activation, weight_spec, _ = _traced_specs(key)
    k = _kind(kind)
    y = torch.empty(k.out_shape(x.shape, weight.shape, params), dtype=out_dtype, device=x.device,
                    memory_format=k.format_of(params))
    return (y, *_fake_rows(x, activation), *_fake_rows(weight, weight_spec))


def _block_backward(kind: str, gy: torch.Tensor, saved: list[torch.Tensor], ident: torch.Tensor,
                   params: list[int], x_shape: list[int], x_dtype: torch.dtype, w_shape: list[int],
                   w_dtype: torch.dtype, b_dtype: torch.dtype | None, blocks: list[int],
                   needs: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(∇x, ∇w, ∇b)`` from ``gy`` and the eight ``saved`` operand tensors of
    :func:`block_forward`; an empty tensor where ``needs`` says the gradient is not
    wanted. Advances the block's noise counter by one and updates its range trackers."""
    meta = BlockMeta(params, x_shape, x_dtype, w_shape, w_dtype, b_dtype, blocks)
    grads = _run_backward(kind, gy, saved, ident, meta, needs)
    formats = (_kind(kind).format_of(params), torch.contiguous_format, torch.contiguous_format)
    return tuple(gy.new_empty(0) if g is None else in_format(g, f)  # type: ignore[return-value]
                 for g, f in zip(grads, formats))


block_backward = torch.library.custom_op("lowbit::block_backward", mutates_args=())(_block_backward)


def _run_backward(kind: str, gy: torch.Tensor, saved: Sequence[torch.Tensor], ident: torch.Tensor,
                  meta: BlockMeta, needs: Sequence[bool]) -> tuple[torch.Tensor | None, ...]:
    state = _state_of(ident)
    warn_if_not_adaptive(state)
    cfg = state.config
    gens = state.noise.backward_generators(gy.device, _backward_paths(cfg))
    k = kernels_for(cfg.backend, gy.device)
    qx, qw = unflatten_operand(saved[0:4], meta.blocks[0], k), unflatten_operand(saved[4:8], meta.blocks[1], k)
    return _kind(kind).backward(gy, qx, qw, cfg, gens, state.trackers(), meta, needs)


@block_backward.register_fake
def _(kind, gy, saved, ident, params, x_shape, x_dtype,  # noqa: ANN001, ANN202
      w_shape, w_dtype, b_dtype, blocks, needs):
    shapes = ((x_shape, x_dtype, _kind(kind).format_of(params)), (w_shape, w_dtype, torch.contiguous_format),
              ([w_shape[0]], b_dtype, torch.contiguous_format))
    return tuple(torch.empty(s, dtype=d, device=gy.device, memory_format=f) if n else gy.new_empty(0)
                 for (s, d, f), n in zip(shapes, needs))


# -- FLOPs for torch.utils.flop_counter ---------------------------------------------------
def block_flops(kind: str, x_shape: Sequence[int], w_shape: Sequence[int], params: Sequence[int]) -> int:
    """FLOPs of a block's forward GEMM, counted as ``torch.utils.flop_counter`` counts a
    float layer's: ``2·m·k·n`` for a linear block's (m, k) × (k, n),
    ``2·N·prod(w.shape)·prod(spatial)`` for a convolution's (:func:`lowbit.flops.conv_flops`,
    which gives the linear count too: no spatial dimensions). Each of a linear block's
    backward GEMMs (∇x, ∇w) costs the same; a convolution's backward is counted by torch's
    own formula (:func:`_backward_flops`). The GEMMs run on integer or FP8 codes; the
    count is of their multiply-adds, whatever the format, as torch counts ``_scaled_mm``'s."""
    from .flops import conv_flops

    return conv_flops(x_shape, w_shape, _kind(kind).out_shape(x_shape, w_shape, params), False)


def _forward_flops(kind, x, weight, bias, key, ident, params, out_dtype, *, out_val=None, **_):  # noqa: ANN001, ANN202
    return block_flops(kind, x.shape, weight.shape, params)


def _backward_flops(kind, gy, saved, ident, params, x_shape, x_dtype, w_shape, w_dtype,  # noqa: ANN001, ANN202
                    b_dtype, blocks, needs, *, out_val=None, **_):
    if len(w_shape) == 2:  # a linear block: ∇x and ∇w each cost its forward GEMM
        return (bool(needs[0]) + bool(needs[1])) * block_flops(kind, x_shape, w_shape, params)
    # a convolution: torch's own count of its float layer's backward (convolution_backward),
    # which counts a grouped (depthwise) ∇w as ``groups`` times the forward — the float
    # model's number, which the count is to equal (a review found ours short by (g − 1)×)
    from torch.utils import flop_counter

    formula = flop_counter.flop_registry[torch.ops.aten.convolution_backward]
    y_shape = list(gy.shape)
    groups = x_shape[1] // w_shape[1]
    spatial = len(w_shape) - 2
    return int(formula(y_shape, list(x_shape), list(w_shape), None, [1] * spatial, [0] * spatial, [1] * spatial,
                       False, [0] * spatial, groups, [bool(needs[0]), bool(needs[1]), False],
                       out_val=[list(x_shape), list(w_shape), None]))


def _register_flop_formulas() -> None:
    """``FlopCounterMode`` sees a converted layer as these two ops (their insides run out of
    its sight) and counted 0 FLOPs for every converted layer — a model's MFU silently
    wrong: the formulas give it the float layer's count (a review, 2026-12-07)."""
    from torch.utils import flop_counter

    for op, formula in ((torch.ops.lowbit.block_forward, _forward_flops),
                        (torch.ops.lowbit.block_backward, _backward_flops)):
        if op not in flop_counter.flop_registry:  # (a second import of this module)
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


_register_flop_formulas()


# Whether an eager block saves its input instead of its codes where autograd keeps that
# input anyway (:func:`kept_by_autograd`); False: always the codes (a benchmark toggle).
SHARE_SAVED_INPUT = True
_SAVED_NAMES: dict[type, tuple[str, ...]] = {}


def _saved_by(node: Any) -> Iterator[Any]:
    """What autograd ``node`` saved for its backward, as ``SavedTensor`` records (a C++
    node's ``_raw_saved_*`` fields, a Python node's ``_raw_saved_tensors``): read without
    unpacking, so no unpack hook runs (a checkpoint's would recompute its segment)."""
    names = _SAVED_NAMES.get(type(node))
    if names is None:
        names = _SAVED_NAMES[type(node)] = tuple(n for n in dir(node) if n.startswith("_raw_saved_"))
    for n in names:
        try:
            saved = getattr(node, n)
        except RuntimeError:  # freed by a backward
            continue
        yield from saved if isinstance(saved, (tuple, list)) else (saved,)


def kept_by_autograd(x: torch.Tensor) -> bool:
    """Whether the autograd node that produced ``x`` saved ``x`` itself for its backward
    (``relu``, ``sigmoid``, ``tanh`` keep their output), so that a block saving ``x`` too
    holds no new memory. False for leaves, under ``torch.autograd.graph.saved_tensors_hooks``
    now, and where the producer saved under such hooks (a checkpoint or an offload decides
    what lives then); its saved tensors are never unpacked here."""
    node = x.grad_fn
    if node is None or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        return False
    kept = False
    for rec in _saved_by(node):
        if not isinstance(rec, torch._C._autograd.SavedTensor):
            continue
        if rec.unpack_hook is not None:
            return False
        t = rec.data  # None once freed
        if isinstance(t, torch.Tensor) and t.data_ptr() == x.data_ptr() and t.dtype == x.dtype \
                and t.shape == x.shape and t.stride() == x.stride():
            kept = True
    return kept


def _shares_input(kind: str, x: torch.Tensor, cfg: FQTConfig) -> bool:
    """Whether an eager block saves ``x`` (quantized again in its backward) instead of its
    codes: the kind can re-make them, the activation rounds to nearest (a deterministic
    function of x) and autograd keeps x anyway."""
    spec = cfg.activation
    return SHARE_SAVED_INPUT and spec is not None and spec.rounding is not Rounding.STOCHASTIC \
        and _kind(kind).quantize_x is not None and x.numel() > 0 and kept_by_autograd(x)


# the state whose op apply_block is calling (eager calls through the dispatcher): its
# autograd context keeps it alive until the backward (a transient state of a functional
# call); read here rather than from the ident, which tracing and export cannot read
_CALLING: contextvars.ContextVar[BlockState | None] = contextvars.ContextVar("lowbit_calling", default=None)


def _setup_context(ctx: Any, inputs: tuple, output: tuple, x_config: FQTConfig | None = None,
                   state: BlockState | None = None) -> None:
    """The autograd context of a block's forward: the saved operands (and the state's
    ``ident`` last, a tensor: under ``torch.compile`` one traced backward may serve several
    layers, each reading its own), the kind and the operands' metadata. ``x_config``: the
    forward's config where the block saves x instead of its codes (:func:`_shares_input`,
    eager only); ``state``: the state, kept alive until the backward (a transient one of a
    functional call; else the one :func:`apply_block` is calling, if any)."""
    kind, x, weight, bias, key, ident, params, _ = inputs
    activation, weight_spec, _ = _traced_specs(key)
    if x_config is not None:  # x's codes are made again from x in the backward (_saved_operands)
        ctx.save_for_backward(x, *output[5:], ident)
        ctx.x_config = x_config
    else:
        ctx.save_for_backward(*output[1:], ident)
    ctx.kind = kind
    blocks = [0 if s is None else s.format.block for s in (activation, weight_spec)]
    ctx.meta = BlockMeta(list(params), list(x.shape), x.dtype, list(weight.shape), weight.dtype,
                         None if bias is None else bias.dtype, blocks)
    ctx.state = state if state is not None else _CALLING.get()
    # Only y carries a gradient: do not fill zero gradients for the saved codes and steps
    # (four (rows, cols)-sized fills per backward, 3% of an FFN step; issue 14).
    ctx.set_materialize_grads(False)


_GRADIENT_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("lowbit_gradient_only", default=False)


@contextlib.contextmanager
def gradient_only_double_backward() -> Iterator[None]:
    """Allow a double backward (``create_graph=True``) through lowbit's layers and
    attention under QAT configs (float gradients), for computations that differentiate
    the first backward with respect to its *incoming gradient* only — a
    Jacobian-transpose product ``Jᵀu`` as the derivative of ``⟨J·v, u⟩`` in ``v``
    (:func:`lowbit.analysis.jacobian_spectrum`). Those derivatives are exact: the
    backward is linear in ∇Y. Terms through the layer's operands (``∂∇X/∂W``,
    ``∂∇W/∂X``, attention's ``∂/∂P``) are *absent* inside, since the backward reads the
    forward's saved quantized codes, which carry no autograd history — a gradient
    penalty or a Hessian-vector product is wrong inside this context (outside it, it
    raises :func:`refuse_double_backward`'s error). Quantized-gradient configs are
    refused inside too. Thread- and task-local (a :class:`contextvars.ContextVar`)."""
    token = _GRADIENT_ONLY.set(True)
    try:
        yield
    finally:
        _GRADIENT_ONLY.reset(token)


def tensor_slots(*inputs: object) -> tuple[int | None, ...]:
    """Where each of ``inputs`` (an ``autograd.Function``'s forward arguments) sits in its
    backward node's ``next_functions``, which holds one edge per tensor argument in order
    (``None`` for an argument that is not a tensor), for :func:`engine_needs`."""
    slots, n = [], 0
    for a in inputs:
        slots.append(n if isinstance(a, torch.Tensor) else None)
        n += isinstance(a, torch.Tensor)
    return tuple(slots)


def engine_needs(ctx: Any, needs: Sequence[bool]) -> list[bool]:
    """``needs`` (``ctx.needs_input_grad``: fixed at the forward by ``requires_grad``)
    narrowed to the gradients the running backward uses: one whose node (the input's
    edge in ``ctx.next_functions``, at ``ctx.grad_slots``: :func:`tensor_slots`) the
    engine will not execute — ``loss.backward(inputs=[x])``, ``torch.autograd.grad(loss,
    x)``: a GAN's, an adversarial attack's, a saliency map's backward — is not computed, as
    torch's own layers skip it (a new user's trial: every ∇W was quantized and multiplied,
    and autograd dropped it). Where the engine cannot say (a leaf ``autograd.grad`` asks
    for, which it refuses to be asked about; a context without slots: the custom op's,
    traced code), the gradient counts as used."""
    slots = getattr(ctx, "grad_slots", None)
    if slots is None or torch.compiler.is_compiling():
        return list(needs)
    try:
        nodes = ctx.next_functions
    except (AttributeError, RuntimeError):
        return list(needs)
    out = []
    for need, slot in zip(needs, slots):
        if need and slot is not None and slot < len(nodes) and nodes[slot][0] is not None:
            try:
                need = bool(torch._C._will_engine_execute_node(nodes[slot][0]))
            except (AttributeError, RuntimeError):  # autograd.grad's own leaf, no backward running
                need = True
        out.append(need)
    return out


def refuse_double_backward(cfg: FQTConfig) -> None:
    """``RuntimeError`` for a double backward (``create_graph=True``) through a layer
    (or attention) of config ``cfg``. With quantized gradients always: its ∇X and ∇W are
    products of stochastically rounded codes, which have no derivative, so a
    second-order term (a gradient penalty, a Hessian-vector product) would silently get
    none, or one through the scales only. Under QAT (float gradients) too, outside
    :func:`gradient_only_double_backward`: the backward multiplies the forward's saved
    quantized codes, without autograd history, so the terms through X and W (attention's
    P) would be silently missing (a gradient penalty's ∂/∂W was 47–49% off)."""
    if cfg.grad_input is not None or cfg.grad_weight is not None:
        raise RuntimeError(
            "lowbit: a double backward (create_graph=True) through an FQT layer is not defined: its "
            "backward GEMMs multiply stochastically rounded gradient codes, which have no derivative, "
            "so second-order terms (gradient penalties, Hessian-vector products) would be silently "
            "missing. Run that computation on a float copy of the model (or, for a product with "
            "the Jacobian's transpose only, under a QAT config inside "
            "lowbit.ops.gradient_only_double_backward()).")
    if not _GRADIENT_ONLY.get():
        raise RuntimeError(
            "lowbit: a double backward (create_graph=True) through an FQT layer under QAT is not "
            "defined: the backward multiplies the forward's saved quantized operands (int8 codes), "
            "which carry no autograd history, so second-order terms through X and W (a gradient "
            "penalty's, a Hessian-vector product's) would be silently missing. Run it on a float "
            "copy of the model; a product with the Jacobian's transpose alone (derivatives with "
            "respect to the incoming gradient, exact) may run inside "
            "lowbit.ops.gradient_only_double_backward().")


def _saved_operands(ctx: Any, saved: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The eight operand tensors of :func:`block_forward`'s output that the backward
    reads: saved, or, where the forward saved x (:func:`_shares_input`), x's codes made
    again by the kind's ``quantize_x`` under the forward's config (bitwise the forward's:
    round-to-nearest)."""
    saved = list(saved[:-1])  # ctx.saved_tensors, read once (a checkpoint unpacks them once); the last is the ident
    config = getattr(ctx, "x_config", None)
    if config is None:
        return saved
    x = saved[0]
    quantize_x = _kind(ctx.kind).quantize_x
    assert quantize_x is not None  # _shares_input checked it
    with torch.autocast(x.device.type, enabled=False), torch.no_grad():  # codes carry no history
        qx = quantize_x(x, config, ctx.meta.params)
    return [*flatten_operand(qx, x), *saved[1:]]


def _backward(ctx: Any, gy: torch.Tensor | None, *_: Any) -> tuple:
    m: BlockMeta = ctx.meta
    needs = engine_needs(ctx, [bool(n) for n in ctx.needs_input_grad[1:4]])
    if gy is None:  # y took no part in the loss (grads are not materialised)
        return (None,) * 8
    saved = ctx.saved_tensors
    # the forward's own state where the context holds it (eager): a checkpoint's recompute
    # hands back the saved tensors of its own call — a functional call's new transient
    # state, freed by then; traced code holds none and reads each layer's from the ident
    ident = ctx.state.ident if ctx.state is not None else saved[-1]
    if torch.is_grad_enabled():  # create_graph=True: the same backward, recorded by autograd
        refuse_double_backward(_state_of(ident).config)
        gx, gw, gb = _run_backward(ctx.kind, gy, _saved_operands(ctx, saved), ident, m, needs)
    else:
        # the op's own function where the forward skipped the dispatcher and no mode
        # would see the op now either (one entered between forward and backward does)
        op = _block_backward if getattr(ctx, "eager", False) and _plain_eager(gy) else block_backward
        gx, gw, gb = op(ctx.kind, gy, _saved_operands(ctx, saved), ident, m.params,
                        m.x_shape, m.x_dtype, m.w_shape, m.w_dtype, m.b_dtype, m.blocks, needs)
    return (None, gx if needs[0] else None, gw if needs[1] else None,
            gb if needs[2] else None, None, None, None, None)


block_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerBlock(torch.autograd.Function):
    """:data:`block_forward` with its registered autograd (``_setup_context``,
    ``_backward``), its functions called directly: the dispatcher's Python layers
    (autograd kernel, redispatch, the dynamo-disabled backend kernel) skipped."""

    @staticmethod
    def forward(ctx: Any, kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                key: str, ident: torch.Tensor, params: list[int], out_dtype: torch.dtype,
                state: BlockState) -> tuple[torch.Tensor, ...]:
        # ``state`` is the block ``ident`` names, handed in by the caller that holds it
        out = _forward_of(state, kind, x, weight, bias, params, out_dtype)
        _setup_context(ctx, (kind, x, weight, bias, key, ident, params, out_dtype), out,
                       state.config if _shares_input(kind, x, state.config) else None, state)
        ctx.eager = True
        ctx.grad_slots = tensor_slots(x, weight, bias)  # their edges: which the backward's caller asks for
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor | None, *_: Any) -> tuple:
        return (*_backward(ctx, gy), None)  # no gradient for ``state``


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether a call may skip the dispatcher (:class:`_EagerBlock`): plain strided tensors
    (no subclass such as ``DTensor``, no functorch wrapper, not on ``meta``: the op's fake
    kernel computes shapes there), outside ``torch.compile``,
    ``jit.trace`` and any dispatch or ``__torch_function__`` mode (fake tensors,
    ``lowbit.coverage``'s trace; also ``torch.set_default_device``, whose mode only costs
    the speed-up), where the custom op is what those machineries see. (A batched backward,
    ``is_grads_batched``, reaches the functions on this path: QAT layers then give the
    per-vector gradients, FQT layers refuse with vmap's error on random operations; through
    the op both refuse, as it has no batching rule.)"""
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing()
                or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()) \
        and all(t is None or (type(t) in _PLAIN and t.layout == torch.strided and t.device.type != "meta"
                              and not torch._C._functorch.is_functorch_wrapped_tensor(t)) for t in tensors)


def refuse_forward_transforms(what: str) -> None:
    """``RuntimeError`` inside ``torch.func.jvp``/``jacfwd`` (forward-mode AD) or
    ``torch.func.vmap``: lowbit's blocks have no forward-mode derivative (the custom op
    gave silent zero tangents) and are not batched per sample (vmap ran a per-sample
    fallback: other scales than the batched call, and a stochastic forward ignored
    ``randomness="error"``). ``torch.func.grad``/``vjp`` get torch's own error; plain
    autograd, ``torch.compile`` and ``torch.export`` (functionalization) are untouched."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the check (a graph break)
        return
    top = torch._C._functorch.peek_interpreter_stack()
    if top is None:
        return
    key = top.key()
    if key in (torch._C._functorch.TransformType.Jvp, torch._C._functorch.TransformType.Vmap):
        transform = "jvp/jacfwd (forward-mode AD)" if key == torch._C._functorch.TransformType.Jvp else "vmap"
        # a batched forward alone (vmap under no_grad, inference) needs no autograd: the
        # batch itself is the call (a new user's trial: the autograd advice did not fit it)
        fix = ("call the layer on the batched input itself (it takes a leading batch dimension)"
               if key == torch._C._functorch.TransformType.Vmap and not torch.is_grad_enabled() else
               "use ordinary autograd (loss.backward, torch.autograd.grad)")
        raise RuntimeError(f"{what}: torch.func.{transform} through a lowbit quantized layer is not "
                           f"supported (no forward-mode derivative, no per-sample batching rule); {fix}")


def apply_block(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                state: BlockState, params: Sequence[int], out_dtype: torch.dtype) -> torch.Tensor:
    """The output of block ``kind`` under ``state`` (differentiable in x, weight, bias):
    :data:`block_forward`, called through the dispatcher, or, where nothing would see the
    op (:func:`_plain_eager`), its functions through :class:`_EagerBlock` — the same
    values either way. ``RuntimeError`` under ``torch.func.jvp``/``jacfwd``/``vmap``
    (:func:`refuse_forward_transforms`)."""
    if _plain_eager(x, weight, bias):  # no functorch wrapper: no transform to refuse
        return _EagerBlock.apply(kind, x, weight, bias, state.trace_key, state.ident, list(params), out_dtype,
                                 state)[0]
    refuse_forward_transforms(f"lowbit {kind} block")
    if torch.compiler.is_compiling():  # (traced code holds no Python state: _setup_context)
        return block_forward(kind, x, weight, bias, state.trace_key, state.ident, list(params), out_dtype)[0]
    token = _CALLING.set(state)
    try:
        return block_forward(kind, x, weight, bias, state.trace_key, state.ident, list(params), out_dtype)[0]
    finally:
        _CALLING.reset(token)


__all__ = ["SHARE_SAVED_INPUT", "AdaptiveRecipeWarning", "BlockKind", "BlockMeta", "BlockState", "Trackers", "apply_block",
           "kept_by_autograd", "block_backward", "refuse_forward_transforms",
           "block_forward", "flatten_operand", "gradient_only_double_backward", "in_format", "refuse_double_backward",
           "register_kind", "tracker_key", "unflatten_operand"]
