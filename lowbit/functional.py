"""Fully quantized GEMMs as functions: ``fqt_linear``, ``fqt_conv2d``, ``fqt_conv1d`` and
``scaled_dot_product_attention`` (the last two from :mod:`lowbit.conv` and
:mod:`lowbit.attention`, re-exported here). A linear layer's three GEMMs by name:

    output       Y  = Q_f(X) · Q_f(W)ᵀ  (+ b)
    grad_input   ∇X = Q_a(∇Y) · Q_f(W)
    grad_weight  ∇W = Q_w(∇Y)ᵀ · Q_f(X)

The math lives in plain functions (``linear_output``, ``linear_grad_input``,
``linear_grad_weight``, ...) so that analysis code can call them without autograd; a
layer's forward and backward (``_linear_forward``/``_linear_backward``, ``_conv2d_*``)
are rows of the block table of :mod:`lowbit.ops`, whose custom ops wire them into
autograd and keep them opaque to ``torch.compile``. Weights are quantized once per step
and reused by the output and grad_input GEMMs; the activation is saved for the backward
as int8 codes plus scales (or, where autograd keeps the input anyway, as that input,
quantized again in the backward: :mod:`lowbit.ops`). Each operand draws its noise from its own generator, keyed by
the rule of :mod:`lowbit.noise` (layer, rank, step, path).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .config import Backend, FQTConfig, GradSpec, OperandSpec, config_hint
from .formats import SUPPORTED_DTYPES, check_dense, check_one_device, compute_dtype
from .gradpair import quantize_grad_pair, quantize_grad_pair_mixed
from .kernels import Kernels, kernels_for
from .noise import NoiseStream, Path, draw_base_seed
from .ops import BlockKind, BlockMeta, BlockState, Trackers, apply_block, register_kind, stochastic_forward_paths
from .quantizers import QuantizedOperand, get_quantizer
from .quantizers.base import Identity, is_identity, sr_seed
from .ranges import RangeTracker
from .scalars import integer
from . import grid_notes
from .scopes import scope

Generators = dict[Path, torch.Generator]  # one per operand path that draws noise

# Elements of a bf16/fp16 gradient upcast at a time for its bias gradient (4 MB of float32)
BIAS_CHUNK = 1 << 20


def quantize_forward(
    x2d: torch.Tensor, spec: OperandSpec, generator: torch.Generator | None = None,
    backend: Backend | Kernels = Backend.AUTO,
) -> QuantizedOperand:
    """``Q_f`` of a weight (out, in) or activation (N, in) operand onto ``spec.format``
    (block scales along ``in``, the summed dimension of the output GEMM): one kernel call.
    ``TypeError`` for a dtype lowbit does not quantize (an int32 tensor was quantized
    without a word: a review; fault kind 67's check at this entry point too); ``TypeError``
    for a ``spec`` that is not an :class:`OperandSpec`, ``ValueError`` for an operand that
    is not 2-D (a 3-D one got scales of no row's shape: a new user's trial)."""
    if not isinstance(spec, OperandSpec):
        raise TypeError(f"quantize_forward: spec must be an OperandSpec, got {type(spec).__name__}"
                        + (" (a gradient's spec: use quantize_gradient)" if isinstance(spec, GradSpec) else ""))
    if not isinstance(x2d, torch.Tensor):
        raise TypeError(f"quantize_forward: the operand must be a torch.Tensor, got {type(x2d).__name__}")
    if x2d.dim() != 2:
        raise ValueError(f"quantize_forward expects a 2-D operand (rows, in): got shape {tuple(x2d.shape)} "
                         "(reshape it to (-1, in) first)")
    check_quantizable("quantize_forward", "the operand", x2d)
    k = kernels_for(backend, x2d.device)
    seed = sr_seed(generator, spec.rounding, x2d.device)
    enc = k.quantize(x2d, spec.format, spec.granularity, spec.rounding, seed)
    grid_notes.note(enc.codes, spec.format)
    return QuantizedOperand.of(enc, Identity(x2d.shape[0]))


def quantize_gradient(
    a: torch.Tensor, spec: GradSpec, generator: torch.Generator | None,
    backend: Backend | Kernels = Backend.AUTO, tracker: RangeTracker | None = None, entries: int | None = None,
) -> QuantizedOperand:
    """``Q_a`` / ``Q_w`` of a gradient operand whose rows are the non-summed dimension,
    onto ``spec.format`` with ``spec.quantizer`` (range from ``tracker`` when the spec's
    range is predicted; without one, the operand's own range, as attention's products
    always use). ``entries``: the rows are that many entries (attention's heads), each
    transformed on its own where the quantizer can (:meth:`GradQuantizer.quantize`).
    ``ValueError`` for a ``tracker`` whose settings (history,
    margin, overflow, quantizer) are not the spec's: it would run with its own, silently
    (``lowbit.ops.tracker_key`` gives the key a layer's tracker has); ``TypeError`` for a
    ``spec`` that is not a :class:`GradSpec`."""
    if not isinstance(spec, GradSpec):
        raise TypeError(f"quantize_gradient: spec must be a GradSpec, got {type(spec).__name__}"
                        + (" (a forward operand's spec: use quantize_forward)" if isinstance(spec, OperandSpec) else ""))
    if spec.predicted and tracker is not None:
        want = (spec.history, spec.margin, spec.overflow.value, spec.quantizer)
        have = (tracker.history, tracker.margin, tracker.overflow.value, tracker.quantizer)
        if have != want:
            names = ("history", "margin", "overflow", "quantizer")
            diff = ", ".join(f"{n} {h!r} (spec: {w!r})" for n, h, w in zip(names, have, want) if h != w)
            raise ValueError(f"the range tracker's settings are not the GradSpec's: {diff}; build it "
                             "as RangeTracker(*lowbit.ops.tracker_key(spec, rows_persist))")
    q = get_quantizer(spec.quantizer)
    # entries only where set, by keyword: a quantizer that overrides quantize with the
    # signature before entries existed keeps working (a review)
    more = {} if entries is None else {"entries": entries}
    out = q.quantize(a, spec.format, generator, spec.rounding, backend, tracker if spec.predicted else None, **more)
    if not isinstance(out, QuantizedOperand):  # a user's quantize (it failed later on .enc: a new user's trial)
        raise TypeError(f"quantizer {q.name!r}: quantize must return a lowbit.quantizers.QuantizedOperand "
                        f"(codes, scales and its transform), got {type(out).__name__}")
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (t.shape[0], rest): explicit sizes, so zero-size tensors reshape too."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def bias_grad(gy: torch.Tensor) -> torch.Tensor:
    """The bias gradient of a linear or convolution block: ``gy`` (N, C, *spatial) summed
    over every dimension but 1, as (C,), in float32 — float64 for a float64 ``gy`` (the sum
    a float model's autograd forms, not a float32 one of float64 values). A bf16 or
    float16 ``gy`` is upcast whole batch entries at a time, as many as fit in
    :data:`BIAS_CHUNK` elements (at least one), and the pieces' float32 sums added — the
    same sum to float32 rounding, in another order — so that no float32 copy of the whole
    gradient exists: ``gy.sum(0, dtype=torch.float32)`` makes one (32 MB for a 2048 × 4096 bf16
    ∇Y, measured: docs/benchmarks.md, "Peak memory under autocast")."""
    dims = (0, *range(2, gy.dim()))
    dt = torch.promote_types(gy.dtype, torch.float32)
    if gy.dtype == dt or gy.shape[0] == 0:
        return gy.sum(dims, dtype=dt)
    per = max(1, BIAS_CHUNK // max(1, gy[0].numel()))
    out = gy[:per].to(dt).sum(dims)
    for i in range(per, gy.shape[0], per):
        out += gy[i:i + per].to(dt).sum(dims)
    return out


def _empty_product(m: int, n: int, like: torch.Tensor, bias: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (m, n) result of a GEMM with an empty operand: nothing to quantize or to sum,
    so zeros (+ bias) on every backend, as ``F.linear`` gives. It draws no noise and
    records no range (an empty batch must not shrink a predicted range)."""
    dt = compute_dtype(out_dtype)  # a float64 bias keeps its values
    out = torch.zeros(m, n, device=like.device, dtype=dt)
    return (out if bias is None else out + bias.to(dt)).to(out_dtype)


def _rows_times(q: QuantizedOperand, b: QuantizedOperand, backend: Backend | Kernels,
                out_dtype: torch.dtype) -> torch.Tensor:
    """``T⁻¹ · â @ b̂``: the GEMM of the encoded operands (integer, FP8 or simulated, as
    the call's kernels decide), then the inverse transform on the output rows."""
    k = kernels_for(backend, q.codes.device)
    if is_identity(q.transform):  # cast fused into the GEMM's epilogue
        return k.gemm(q.enc, b.enc, None, out_dtype)
    # the GEMM's output in compute_dtype (float64 for float64 operands) until T⁻¹ has run;
    # an integer GEMM applies T⁻¹ with its epilogue where the transform has a kernel for it
    return k.gemm(q.enc, b.enc, None, out_dtype, inverse=q.transform)


# -- Linear: the three GEMMs ------------------------------------------------------------
def linear_output(qx: QuantizedOperand, qw: QuantizedOperand, backend: Backend | Kernels,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Y = Q_f(X) Q_f(W)ᵀ + b``: (N, in) × (out, in)ᵀ → (N, out)."""
    if qx.codes.numel() == 0 or qw.codes.numel() == 0:
        return _empty_product(qx.codes.shape[0], qw.codes.shape[0], qx.codes, bias, out_dtype)
    return kernels_for(backend, qx.codes.device).gemm(qx.enc, qw.enc.t(), bias, out_dtype)


def linear_grad_input(
    gy: torch.Tensor, qw: QuantizedOperand, spec: GradSpec | None,
    generator: torch.Generator | None, backend: Backend | Kernels, out_dtype: torch.dtype = torch.float32,
    tracker: RangeTracker | None = None,
) -> torch.Tensor:
    """``∇X = Q_a(∇Y) Q_f(W)``: (N, out) × (out, in) → (N, in). ``spec=None``: QAT."""
    if gy.numel() == 0 or qw.codes.numel() == 0:
        return _empty_product(gy.shape[0], qw.codes.shape[1], gy, None, out_dtype)
    if spec is None:  # QAT: float ∇Y, in float32 (float64 for float64 operands)
        dt = compute_dtype(out_dtype)
        return (gy.to(dt) @ qw.dequantize(dt)).to(out_dtype)
    qa = quantize_gradient(gy, spec, generator, backend, tracker)
    return _rows_times(qa, qw, backend, out_dtype)


def linear_grad_weight(
    gy: torch.Tensor, qx: QuantizedOperand, spec: GradSpec | None,
    generator: torch.Generator | None, backend: Backend | Kernels, out_dtype: torch.dtype = torch.float32,
    tracker: RangeTracker | None = None,
) -> torch.Tensor:
    """``∇W = Q_w(∇Y)ᵀ Q_f(X)``: rows of ``∇Yᵀ`` are output features. (out, N) × (N, in)."""
    if gy.numel() == 0 or qx.codes.numel() == 0:
        return _empty_product(gy.shape[1], qx.codes.shape[1], gy, None, out_dtype)
    if spec is None:  # QAT: float ∇Y, in float32 (float64 for float64 operands)
        dt = compute_dtype(out_dtype)
        return (gy.to(dt).t() @ qx.dequantize(dt)).to(out_dtype)
    qa = quantize_gradient(gy.t(), spec, generator, backend, tracker)
    return _rows_times(qa, qx, backend, out_dtype)


def _linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    config: FQTConfig, gens: Generators, params: Sequence[int],
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, QuantizedOperand, QuantizedOperand]:
    """Forward of a linear block: ``x`` (N, in) → ``(Y (N, out), Q_f(x), Q_f(W))``."""
    # x: (N, in), flattened by fqt_linear, so that the output is the GEMM's own fresh
    # (N, out) tensor: a view made in here could not be modified in place outside.
    k = kernels_for(config.backend, x.device)  # the backend, decided once for the call
    with torch.autocast(x.device.type, enabled=False):  # our GEMMs pick their own types
        qx = quantize_forward(x, config.activation, gens.get(Path.ACTIVATION), k)
        qw = quantize_forward(weight, config.weight, gens.get(Path.WEIGHT), k)
        y = linear_output(qx, qw, k, bias, out_dtype)  # (N, out)
    return y, qx, qw


def _linear_backward(gy: torch.Tensor, qx: QuantizedOperand, qw: QuantizedOperand, cfg: FQTConfig,
                     gens: Generators, trackers: Trackers, meta: BlockMeta, needs: Sequence[bool]
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(∇X, ∇W, ∇b)`` of a linear block from ``gy`` (N, out), read as is by the
    quantizers; ``None`` where ``needs`` says not wanted."""
    gx = gw = gb = None
    k = kernels_for(cfg.backend, gy.device)  # the backend, decided once for the call
    with torch.autocast(gy.device.type, enabled=False):  # the recipe's arithmetic
        pair = None
        if needs[0] and needs[1] and qx.codes.numel() and qw.codes.numel():
            # both quantizations of ∇Y from one read where they allow it (lowbit.gradpair)
            pair = quantize_grad_pair(gy, cfg.grad_input, gens.get(Path.GRAD_INPUT),
                                      cfg.grad_weight, gens.get(Path.GRAD_WEIGHT), k) \
                or quantize_grad_pair_mixed(gy, cfg.grad_input, gens.get(Path.GRAD_INPUT),
                                            cfg.grad_weight, gens.get(Path.GRAD_WEIGHT), k)
        # the GEMMs' phase for lowbit.coverage (a GEMM in row panels has no weight-shaped
        # output to recognise ∇W by: lowbit.kernels.int8.gemm)
        if pair is not None:
            qa, qg = pair
            del pair  # each code tensor is freed as soon as its GEMM is done
            with scope("lowbit::grad_input"):
                gx = _rows_times(qa, qw, k, meta.x_dtype)  # (N, out) × (out, in)
            del qa
            with scope("lowbit::grad_weight"):
                gw = _rows_times(qg, qx, k, meta.w_dtype)  # (out, N) × (N, in)
            del qg
        else:
            if needs[0]:
                with scope("lowbit::grad_input"):
                    gx = linear_grad_input(gy, qw, cfg.grad_input, gens.get(Path.GRAD_INPUT), k,
                                           meta.x_dtype, trackers[0])
            if needs[1]:
                with scope("lowbit::grad_weight"):
                    gw = linear_grad_weight(gy, qx, cfg.grad_weight, gens.get(Path.GRAD_WEIGHT),
                                            k, meta.w_dtype, trackers[1])
        if meta.b_dtype is not None and needs[2]:
            gb = bias_grad(gy).to(meta.b_dtype)
    return gx, gw, gb


def _linear_out_shape(x_shape: Sequence[int], w_shape: Sequence[int], params: Sequence[int]) -> list[int]:
    return [x_shape[0], w_shape[0]]


register_kind("linear", BlockKind(_linear_forward, _linear_backward, _linear_out_shape,
                                  quantize_x=lambda x, config, params: quantize_forward(
                                      x, config.activation, None, config.backend)))


_CALLS = itertools.count()  # functional calls handed a bare seeded FQTConfig (RTN forward)


def call_count() -> int:
    """How many functional calls :func:`call_state` has named so far (the next one's
    index): with :func:`set_call_count`, what :func:`lowbit.coverage` saves and puts
    back, so that a traced step leaves the next call's noise as it was."""
    global _CALLS
    n = next(_CALLS)
    _CALLS = itertools.count(n)
    return n


def set_call_count(n: int) -> None:
    """Make the next functional call the ``n``-th (see :func:`call_count`)."""
    global _CALLS
    _CALLS = itertools.count(n)


def block_state(state: BlockState | FQTConfig) -> BlockState:
    """``state`` itself, or for a bare :class:`FQTConfig` a fresh :class:`BlockState`
    whose noise stream has base seed ``config.seed`` (``None``: one draw from torch's
    global RNG) and name ``""``: two states made this way from one seeded config draw
    the same noise. Keep one (as the layers keep theirs) to keep one stream, range
    trackers and ``torch.compile`` across calls. ``TypeError`` for anything else."""
    if isinstance(state, BlockState):
        return state
    if not isinstance(state, FQTConfig):
        raise TypeError(f"state must be a BlockState or an FQTConfig, got {type(state).__name__}"
                        f"{config_hint(state)}")
    seed = draw_base_seed() if state.seed is None else state.seed
    return BlockState(state, NoiseStream(seed))


def per_call(position: int | None) -> Any:
    """Decorator of a functional entry point whose ``state`` (positional at ``position``,
    or the keyword ``state``) may be a bare :class:`FQTConfig`: such a call makes a new
    :class:`BlockState` (:func:`call_state`), which compiled code cannot hold — dynamo
    traced its creation once, and the traced graph named a state freed before its
    backward ran ("block state … no longer exists": a new user's trial of
    ``torch.compile(lambda x: fqt_linear(x, W, None, cfg))``). Under ``torch.compile`` such
    a call runs eagerly (``torch.compiler.disable``: a graph break), as in eager mode: a
    new stream per call. A kept :class:`BlockState` (:func:`block_state`) compiles."""
    def wrap(fn: Any) -> Any:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling():
                state = kwargs.get("state", args[position] if position is not None and len(args) > position
                                   else None)
                if isinstance(state, FQTConfig):  # (made here: importing lowbit does not import
                    return torch.compiler.disable(fn)(*args, **kwargs)  # dynamo, which may not import)
            return fn(*args, **kwargs)
        return call
    return wrap


def call_state(state: BlockState | FQTConfig) -> BlockState:
    """The state of one functional call (``fqt_linear``, ``fqt_conv2d``, ``fqt_conv1d``,
    ``scaled_dot_product_attention``): a :class:`BlockState` as it is; a bare seeded
    :class:`FQTConfig` gets a new stream per call, so every call draws new noise (one
    fixed stream gave every call — every layer, every step — the same rounding noise, so
    rounding errors no longer averaged out). Its name is ``"functional call i"`` for the
    process's ``i``-th such call (torch's RNG untouched: dropout masks stay torch's; a
    rerun of the same program draws the same noise — calls count whatever makes them, so
    activation checkpointing's recompute, an extra evaluation or a resumed process shifts
    the count, and with it the noise, not its distribution), or, where the forward rounds
    stochastically (and so draws from torch's global RNG already), ``"functional draw d"``
    with ``d`` one more such draw, so that activation checkpointing's recompute, which
    restores that RNG, quantizes X with the forward's noise. ``seed=None``:
    :func:`block_state` (a base seed drawn from torch's RNG per call)."""
    if isinstance(state, FQTConfig) and state.seed is not None:
        name = f"functional draw {draw_base_seed()}" if stochastic_forward_paths(state) \
            else f"functional call {next(_CALLS)}"
        return BlockState(state, NoiseStream(state.seed, name))
    return block_state(state)


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``x`` computes in, and so the layer's output dtype: under autocast a
    floating tensor other than float64 is cast to the autocast dtype (as torch's autocast
    does for ``nn.Linear`` and ``nn.Conv2d``); otherwise ``x``'s own dtype."""
    dev = x.device.type
    if dev in ("meta", "lazy"):  # no autocast there (torch's query raises): their own dtype
        return x.dtype
    if torch.is_autocast_enabled(dev) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(dev)
    return x.dtype


def check_quantizable(op: str, what: str, t: torch.Tensor) -> None:
    """``TypeError`` where ``t`` has a dtype lowbit does not quantize
    (:data:`lowbit.formats.SUPPORTED_DTYPES`: a complex tensor would lose its imaginary
    part, an integer one its meaning)."""
    if t.dtype not in SUPPORTED_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(f"{op}: {what} has dtype {t.dtype}; lowbit quantizes {allowed} tensors only")


def check_dtypes(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Raise ``RuntimeError`` naming both dtypes where ``nn.Linear``/``nn.Conv2d`` would
    refuse them: input, weight and bias must compute in one dtype (:func:`output_dtype`),
    so they must be equal outside autocast; under autocast they may mix as torch allows.
    ``RuntimeError`` where they are not on one device, or one is nested or not strided (sparse). ``TypeError`` naming
    the argument where one is not a tensor (a list, say), as torch's,
    or has a dtype lowbit does not quantize (:data:`lowbit.formats.SUPPORTED_DTYPES`: a
    complex tensor would lose its imaginary part, an integer one its meaning)."""
    for what, t in (("input", x), ("weight", weight), ("bias", bias)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {what} must be a Tensor, not {type(t).__name__}")
        check_dense(op, what, t)
        if t is not None:
            check_quantizable(op, what, t)
    check_one_device(op, "input, weight and bias", x, weight, bias)
    if output_dtype(x) != output_dtype(weight):
        raise RuntimeError(f"{op}: input and weight must have the same dtype, but got "
                           f"{x.dtype} and {weight.dtype}")
    if bias is not None and output_dtype(bias) != output_dtype(weight):
        raise RuntimeError(f"{op}: bias and weight must have the same dtype, but got "
                           f"{bias.dtype} and {weight.dtype}")


def check_conv_args(op: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    groups: int, dims: int) -> int:
    """Raise ``RuntimeError`` in torch's words where ``F.conv{dims}d`` would refuse these
    operands, naming the shapes the caller passed (not lowbit's internal 4-D views): a
    ``(dims + 2)``-D weight, ``groups ≥ 1`` dividing its output channels, an input with
    ``weight.shape[1]·groups`` channels, a bias of one element per output channel. Returns
    ``groups`` as an int (a NumPy integer, which torch takes, too: :mod:`lowbit.scalars`)."""
    if weight.dim() != dims + 2:
        raise RuntimeError(f"{op}: expected a {dims + 2}-D weight (C_out, C_in/groups, "
                           f"{', '.join('k' for _ in range(dims))}), got shape {tuple(weight.shape)}")
    given, groups = groups, integer(groups)  # type: ignore[assignment]
    if groups is None or groups < 1 or weight.shape[0] % groups:
        raise RuntimeError(f"{op}: groups must be a positive integer dividing the weight's "
                           f"{weight.shape[0]} output channels, got {given!r}")
    if x.dim() != dims + 2 or x.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(f"{op}: given groups={groups}, weight of size {list(weight.shape)}, "
                           f"expected input{list(x.shape)} to be {dims + 2}-D with "
                           f"{weight.shape[1] * groups} channels")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"{op}: given weight of size {list(weight.shape)}, expected bias to be "
                           f"1-dimensional with {weight.shape[0]} elements, but got bias of size "
                           f"{list(bias.shape)} instead")
    return groups


def conv_geometry(op: str, name: str, value: Any, dims: int, least: int) -> tuple[int, ...]:
    """``value`` (a convolution's ``stride``, ``padding`` or ``dilation``) as ``dims`` ints, as
    ``F.conv{dims}d`` reads it: an int, or a sequence of 1 or ``dims`` ints, each at least
    ``least``; ``RuntimeError`` otherwise. (``_pair`` returned a 4-tuple unchanged, whose
    extra entries slid into the next fields: ``padding=(0, 0, 2, 2)`` ran as dilation 2, a
    convolution other than the module's, where torch raises: a review.)"""
    vals = (value,) if integer(value) is not None else value  # (NumPy integers too, as torch)
    ok = isinstance(vals, (tuple, list)) and len(vals) in (1, dims) and all(
        (i := integer(v)) is not None and i >= least for v in vals)
    if ok:
        vals = tuple(integer(v) for v in vals)  # type: ignore[misc]
    else:
        count = "1 such integer" if dims == 1 else f"1 or {dims} such integers"
        raise RuntimeError(f"{op}: expected {name} to be an integer ≥ {least} or a sequence of {count}, "
                           f"got {value!r}")
    return tuple(vals) * dims if len(vals) == 1 else tuple(vals)


def check_conv_padding(op: str, padding: Any, stride: Sequence[int]) -> None:
    """Raise ``RuntimeError`` where ``F.conv2d``/``F.conv1d`` refuse ``padding``: a string
    other than ``"valid"`` and ``"same"``, or ``"same"`` at a stride above 1 (torch does
    not define it for strided convolutions)."""
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise RuntimeError(f"{op}: invalid padding string {padding!r} (expected an int, a "
                               f"tuple, 'valid' or 'same')")
        if padding == "same" and any(s != 1 for s in stride):
            raise RuntimeError(f"{op}: padding='same' is not supported for strided convolutions "
                               f"(stride {tuple(stride)})")


@per_call(3)
def fqt_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               state: BlockState | FQTConfig) -> torch.Tensor:
    """Linear layer under ``state``'s recipe (``fp``: plain ``F.linear``): ``x`` (*, in),
    ``weight`` (out, in), ``bias`` (out,) → (*, out), any leading shape, empty ones too.

    The output dtype is :func:`output_dtype` of ``x`` (the autocast dtype under autocast);
    the GEMMs run in the recipe's arithmetic whatever autocast says; gradients have the
    dtypes of ``x``, ``weight`` and ``bias``. ``state``: the recipe, noise stream and
    range trackers (:func:`call_state`; a layer passes its own). Raises ``RuntimeError`` as ``nn.Linear`` does for
    mismatched dtypes (:func:`check_dtypes`) or shapes."""
    state = call_state(state)
    if state.config.is_fp:
        return F.linear(x, weight, bias)
    check_dtypes("fqt_linear", x, weight, bias)
    if weight.dim() != 2:
        raise RuntimeError(f"fqt_linear: expected a 2-D weight (out, in), got shape {tuple(weight.shape)} "
                           "(for F.linear's 1-D form use weight.unsqueeze(0) and squeeze the output)")
    if bias is not None and bias.dim() <= 1 and bias.numel() == 1:
        bias = bias.reshape(1).expand(weight.shape[0])  # broadcast, as F.linear does (a 0-d one too)
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"fqt_linear: bias of shape {tuple(bias.shape)} does not fit a weight of "
                           f"shape {tuple(weight.shape)}: it must be ({weight.shape[0]},) or one element")
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"fqt_linear: input of shape {tuple(x.shape)} does not fit a weight "
                           f"of shape {tuple(weight.shape)}: its last dimension must be {weight.shape[1]}")
    x2d = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (N, in)
    y = apply_block("linear", x2d, weight, bias, state, (), output_dtype(x))
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])  # (*, out)


# -- Conv2d: its block kinds (conv2d, conv1d) and three GEMMs live in lowbit.conv ----------
def same_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> list[int]:
    """``F.pad`` amounts (left, right, top, bottom) of ``padding="same"``: total
    ``d·(k − 1)`` per dimension, the odd one extra on the right/bottom (as torch does)."""
    pads: list[int] = []
    for d, k in zip(reversed(dilation), reversed(kernel_size)):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return pads


@per_call(3)
def fqt_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               state: BlockState | FQTConfig, stride: Any = 1, padding: Any = 0,
               dilation: Any = 1, groups: int = 1) -> torch.Tensor:
    """Conv2d under ``state`` (:func:`call_state`; ``fp``: plain ``F.conv2d``): ``x``
    (N, C_in, H, W) or unbatched (C_in, H, W), ``weight`` (C_out, C_in/groups, kH, kW),
    ``bias`` (C_out,) → (N, C_out, H', W'), empty batches too; ``padding`` an int, a pair,
    ``"valid"`` or ``"same"`` (zeros). The same contract as :func:`fqt_linear`: output
    dtype :func:`output_dtype` of ``x``, the recipe's arithmetic under autocast (the three
    GEMMs of :mod:`lowbit.conv`: integer im2col GEMMs, or simulated), gradients in the dtypes
    of ``x``, ``weight`` and ``bias``, ``RuntimeError`` for mismatched dtypes. The
    output and ∇x are channels-last where ``x`` or ``weight`` is, as PyTorch's
    convolutions (:func:`lowbit.conv.memory_layout`)."""
    state = call_state(state)
    if state.config.is_fp:
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    check_dtypes("fqt_conv2d", x, weight, bias)
    if x.dim() == 3:  # unbatched, as nn.Conv2d accepts
        return fqt_conv2d(x.unsqueeze(0), weight, bias, state, stride, padding, dilation, groups)[0]
    groups = check_conv_args("fqt_conv2d", x, weight, bias, groups, 2)
    stride = conv_geometry("fqt_conv2d", "stride", stride, 2, 1)
    dilation = conv_geometry("fqt_conv2d", "dilation", dilation, 2, 1)
    check_conv_padding("fqt_conv2d", padding, stride)
    if padding == "same":
        x, padding = F.pad(x, same_padding(weight.shape[2:], dilation)), 0
    elif padding == "valid":
        padding = 0
    params = [*stride, *conv_geometry("fqt_conv2d", "padding", padding, 2, 0), *dilation, groups,
              _conv.memory_layout(x, weight, state.config.activation)]
    return apply_block("conv2d", x, weight, bias, state, params, output_dtype(x))


from . import conv as _conv  # noqa: E402,F401  registers the conv2d/conv1d block kinds


def __getattr__(name: str) -> Any:
    """``scaled_dot_product_attention``: lowbit.attention's, re-exported lazily (that
    module builds on this one, so it cannot be imported here at the top)."""
    if name == "scaled_dot_product_attention":
        from .attention import scaled_dot_product_attention
        return scaled_dot_product_attention
    if name == "fqt_conv1d":
        from .conv import fqt_conv1d
        return fqt_conv1d
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Trackers",
    "bias_grad",
    "block_state",
    "call_state",
    "check_dtypes",
    "fqt_conv1d",  # noqa: F822 (module __getattr__, lazily)
    "fqt_conv2d",
    "fqt_linear",
    "linear_grad_input",
    "linear_grad_weight",
    "linear_output",
    "output_dtype",
    "quantize_forward",
    "quantize_gradient",
    "same_padding",
    "scaled_dot_product_attention",  # noqa: F822 (module __getattr__, lazily)
]
