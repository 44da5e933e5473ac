"""Shared plumbing of the analysis tools: config swaps, parameter groups, gradients, and
hooks that capture what each converted layer sees (its input ``X`` and its output
gradient ``∇Y``) during a forward/backward pass."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..attention_modules import FQTMultiheadAttention, InProjection, _child
from ..config import FQTConfig
from ..conversion import quote_module
from ..gradmode import saveable, training_grad_mode
from ..conv import conv_quantized, conv_rows
from ..formats import compute_dtype
from ..functional import quantize_forward, same_padding
from ..nn import FQTConv1d, FQTConv2d, FQTLinear, call_input, convert, fqt_blocks

LossFn = Callable[[nn.Module, object], torch.Tensor]
_CONV = (FQTConv2d, FQTConv1d)  # rows = samples; columns (channel, position)

OTHER = "other"  # parameters outside converted layers (norms, embeddings, ...)
TOTAL = "total"  # all parameters together


@contextlib.contextmanager
def with_config(model: nn.Module,
                config_fn: Callable[[FQTConfig], FQTConfig]) -> Iterator[nn.Module]:
    """Temporarily give every converted layer and attention block (:func:`~lowbit.nn.fqt_blocks`)
    ``config_fn(layer.config)``; afterwards each gets its config and its noise stream
    (seed, name, counter) back — a config of another seed restarts the stream, so
    restoring the config alone would replay the noise of the steps already trained."""
    layers = fqt_blocks(model)
    saved = {n: (m.config, m.rng_state()) for n, m in layers.items()}
    try:
        for m in layers.values():
            m.config = config_fn(m.config)
        yield model
    finally:
        for n, m in layers.items():
            m.config = saved[n][0]
            m.set_rng_state(saved[n][1])


def qat_of(config: FQTConfig) -> FQTConfig:
    """The QAT twin of a config: same forward, exact (STE) backward; no adaptive recipe
    (it chooses widths of quantized gradients, which the twin has none of: an ``fqt-auto``
    model's analysis failed on it after training, a review)."""
    return dataclasses.replace(config, grad_input=None, grad_weight=None, adaptive=None)


@contextlib.contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Restore buffers (e.g. BatchNorm running stats) after repeated forwards."""
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])


def require_fqt(model: nn.Module, convert_hint: str = "lowbit.convert it first",
                fqt_hint: str = "convert it with an fqt-* recipe") -> None:
    """``ValueError`` unless ``model`` holds converted layers of which one quantizes
    gradients (an ``fqt-*`` recipe): there is no quantization variance to measure."""
    layers = fqt_blocks(model)  # attention blocks quantize gradients too
    if not layers:
        raise ValueError(f"model has no converted layers: {convert_hint}")
    if not any(m.config.is_fqt for m in layers.values()):
        raise ValueError(f"no converted layer quantizes gradients (QAT or fp recipe): {fqt_hint}")


def _leading_rows(batch: object) -> int | None:
    """The batch size of ``batch``: the first dimension of its first tensor (a tensor, or
    one inside a tuple, list or dict), ``None`` where it holds none."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        rows = _leading_rows(item)
        if rows is not None:
            return rows
    return None


def check_batches(batches: list[object], world_size: int = 1) -> None:
    """``ValueError`` naming a batch with no rows (its loss is NaN or a mean of nothing, and
    its gradient zero: every statistic of it would read as exact), or, with
    ``world_size > 1``, one with fewer rows than ranks (a rank's shard empty, averaged in
    as a zero gradient)."""
    for i, batch in enumerate(batches):
        rows = _leading_rows(batch)
        if rows == 0:
            raise ValueError(f"batch {i} is empty (0 rows): nothing to measure on it")
        if rows is not None and world_size > 1 and rows < world_size:
            raise ValueError(f"batch {i} has {rows} rows, fewer than world_size={world_size}: "
                             f"rank {rows}'s shard would be empty")


@contextlib.contextmanager
def configured(model: nn.Module, config: FQTConfig | None) -> Iterator[nn.Module]:
    """The model to measure under ``config``.

    * ``config=None``: ``model`` itself, which must hold converted layers with gradient
      quantization (an ``fqt-*`` recipe);
    * ``config`` given and ``model`` already converted: every converted layer takes
      ``config`` for the duration (:func:`with_config`), then gets its own back;
    * ``config`` given and ``model`` not converted: a converted deep copy (the caller's
      model is untouched).
    """
    if config is not None and not isinstance(config, FQTConfig):
        raise TypeError(f"config must be an FQTConfig or None, got {type(config).__name__}")
    if config is None:
        require_fqt(model, "pass config= or lowbit.convert it first", "pass an fqt-* config")
        yield model
    elif fqt_blocks(model):  # converted (Hugging Face Conv1D, attention blocks: not only Linears)
        with with_config(model, lambda _: config):
            yield model
    else:
        yield convert(copy.deepcopy(model), config)


# -- the layers the analysis models, and their parameter groups ------------------------------
class InProjectionGemm:
    """One in-projection GEMM of a converted ``nn.MultiheadAttention``
    (:class:`~lowbit.attention_modules.FQTMultiheadAttention`), seen as the linear layer it
    computes: ``fqt_linear(x, W, b)`` under the block's config, ``W`` the attention module's
    ``in_proj_weight`` (or a slice of it: rows of ``q``, of ``k`` and ``v``) or its
    ``q/k/v_proj_weight``. ``weight`` is that parameter (where its ∇W lands), ``owner`` the
    attention module's name (the group holding it), ``block`` the
    :class:`~lowbit.attention_modules.InProjection` that runs it (hooked by :func:`capture`)."""

    def __init__(self, block: InProjection, weight: nn.Parameter, owner: str) -> None:
        self.block, self.weight, self.owner = block, weight, owner

    @property
    def config(self) -> FQTConfig:
        return self.block.config

    def register_forward_hook(self, hook: Callable, **kwargs: bool) -> object:
        return self.block.register_forward_hook(hook, **kwargs)

    def __repr__(self) -> str:
        return f"InProjectionGemm({self.owner!r}, {self.block!r})"


FQTLayer = FQTLinear | FQTConv2d | FQTConv1d | InProjectionGemm  # and Hugging Face FQTConv1D


def _hf_conv1d() -> tuple[type, ...]:
    """Hugging Face's converted ``Conv1D`` class where :mod:`lowbit.hf` is loaded (it is
    whenever a model holds one: ``convert`` imports it, and unpickling one does)."""
    hf = sys.modules.get("lowbit.hf")
    return (hf.FQTConv1D,) if hf is not None else ()


def _in_projection_weight(mha: FQTMultiheadAttention, role: str) -> nn.Parameter:
    """The parameter the in-projection ``role`` multiplies (packed: ``in_proj_weight``;
    separate weights: the roles are ``q``, ``k`` and ``v`` alone)."""
    if mha._qkv_same_embed_dim:
        return mha.in_proj_weight
    return {"q": mha.q_proj_weight, "k": mha.k_proj_weight, "v": mha.v_proj_weight}[role]


def gemm_layers(model: nn.Module) -> dict[str, FQTLayer]:
    """Every converted GEMM with a weight of its own that the analysis models, by module
    name: the layers of :func:`~lowbit.nn.fqt_weight_layers` (``FQTLinear``, ``FQTConv2d``,
    ``FQTConv1d``), Hugging Face ``FQTConv1D`` (a Linear whose weight is stored transposed,
    (in, out): its GEMMs are ``fqt_linear(x, Wᵀ, b)``, so a Linear's formulas apply: they
    read its input, its output gradient and its config, never the weight's layout) and the
    in-projection blocks of a converted ``nn.MultiheadAttention`` (``<name>.projections.qkv``
    and its alternatives, as :class:`InProjectionGemm` views; the alternatives a forward does
    not call record no call). Attention products (activation × activation) are not among
    them. In module order, an attention's in-projections at the attention module."""
    kinds = (FQTLinear, FQTConv2d, FQTConv1d, *_hf_conv1d())
    out: dict[str, FQTLayer] = {}
    for name, m in model.named_modules():
        if isinstance(m, kinds):
            out[name] = m
        elif isinstance(m, FQTMultiheadAttention):
            for role, block in m.projections.items():
                out[_child(name, f"projections.{role}")] = InProjectionGemm(block, _in_projection_weight(m, role), name)
    return out


def owner_of(name: str, layer: FQTLayer) -> str:
    """The module whose parameters hold ``layer``'s weight: the layer itself (``name``), or,
    for an in-projection, its attention module."""
    return layer.owner if isinstance(layer, InProjectionGemm) else name


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """Parameter names by group: one group per converted module that owns a weight GEMM
    (:func:`gemm_layers`: a Linear's, a convolution's or Hugging Face ``Conv1D``'s weight and
    bias; a converted ``nn.MultiheadAttention``'s own parameters — ``in_proj_weight`` or
    ``q/k/v_proj_weight``, ``in_proj_bias``, ``bias_k``/``bias_v`` — under the attention
    module's name, its ``out_proj`` a group of its own), in module order, then ``"other"``
    for every remaining trainable parameter (norms, embeddings, anything not converted), if
    any. Names are ``model.named_parameters()``'s: a parameter tied into several modules
    appears once, under its first name, in the first converted module holding it."""
    owners = list(dict.fromkeys(owner_of(n, lay) for n, lay in gemm_layers(model).items()))
    groups: dict[str, list[str]] = {}
    # a tied parameter (an embedding shared with the output head, Hugging Face GPT-2's
    # layout) under the one name model.named_parameters() gives it, in the group of the
    # first converted layer that holds it (a review found the head's own name raising
    # KeyError in every consumer of these names)
    canonical = {id(p): n for n, p in model.named_parameters()}
    taken: set[str] = set()
    for name in owners:
        names = [canonical[id(t)] for t in model.get_submodule(name).parameters(recurse=False)
                 if t.requires_grad and id(t) in canonical and canonical[id(t)] not in taken]
        if names:
            groups[name] = names
            taken.update(names)
    rest = [n for n, p in model.named_parameters() if p.requires_grad and n not in taken]
    if rest:
        groups[OTHER] = rest
    return groups


def weight_groups(model: nn.Module, groups: dict[str, list[str]]) -> dict[str, str]:
    """The group of :func:`parameter_groups` that holds each layer's weight
    (:func:`gemm_layers`), by layer name: its own (an in-projection's: its attention
    module's), or, for a weight tied into an earlier layer, that layer's (a frozen weight
    is in no group, and the layer is absent)."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    where = {pn: g for g, names in groups.items() for pn in names}
    out = {}
    for name, layer in gemm_layers(model).items():
        group = where.get(canonical.get(id(layer.weight), ""))
        if group is not None:
            out[name] = group
    return out


class FlatGrads:
    """Gradients of a model as one float32 vector (float64 where a parameter is float64),
    with each group's slice. A bfloat16 or float16 gradient is held in it exactly (every
    such value is a float32 one); what is computed from the vector is float32 arithmetic,
    except the communicated average, taken in each parameter's own dtype
    (:func:`.dataparallel.comm_average`)."""

    def __init__(self, model: nn.Module, groups: dict[str, list[str]]) -> None:
        params = dict(model.named_parameters())
        self.names = [n for g in groups.values() for n in g]
        self.params = [params[n] for n in self.names]
        self.slices: dict[str, slice] = {}
        start = 0
        for g, names in groups.items():
            size = sum(params[n].numel() for n in names)
            self.slices[g] = slice(start, start + size)
            start += size
        self.numel = start
        self.dtype = torch.float64 if any(p.dtype == torch.float64 for p in self.params) else torch.float32

    def grads(self, model: nn.Module, loss_fn: LossFn, batch: object) -> torch.Tensor:
        """One backward pass; the gradient as a flat vector of :attr:`dtype` (unused params: 0)."""
        model.zero_grad(set_to_none=True)
        with training_grad_mode():  # called under no_grad or inference_mode too (lowbit.gradmode)
            loss = loss_fn(model, saveable(batch))
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError("loss_fn(model, batch) must return a scalar tensor")
            loss.backward()
        out = torch.cat([p.grad.detach().reshape(-1).to(self.dtype) if p.grad is not None
                         else torch.zeros(p.numel(), device=p.device, dtype=self.dtype) for p in self.params])
        model.zero_grad(set_to_none=True)
        return out


# -- what a layer sees --------------------------------------------------------------------
@dataclass
class LayerRecord:
    """One converted layer during a captured pass."""

    calls: int = 0
    x: torch.Tensor | None = None  # input (detached), when inputs are captured
    x_needs_grad: bool = False  # is ∇X computed (and so quantized) at all
    y: torch.Tensor | None = None  # output, attached to the graph, when outputs are kept
    gy: torch.Tensor | None = None  # ∇Y (detached), once the backward reached the layer


@contextlib.contextmanager
def capture(model: nn.Module, *, inputs: bool = False, outputs: bool = False,
            grads: bool = True) -> Iterator[dict[str, LayerRecord]]:
    """Record each layer's (:func:`gemm_layers`) input, output and output gradient ``∇Y``.

    Forward hooks on the layers (an in-projection's: on its block); ``∇Y`` comes from a tensor hook on the output, so it is
    exactly the ``grad_out`` the layer's backward quantizes. Each layer must run once per
    forward (weight sharing would mix several ``∇Y``): a second call raises.
    """
    layers = gemm_layers(model)
    records = {n: LayerRecord() for n in layers}
    handles = []

    def make_hook(name: str) -> Callable:
        rec = records[name]

        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            rec.calls += 1
            if rec.calls > 1:
                raise ValueError(f"layer {quote_module(name)} ran {rec.calls} times in one forward; the "
                                 "analysis needs each converted layer called once")
            x = call_input(args, kwargs)
            rec.x_needs_grad = bool(x.requires_grad)
            if inputs:
                rec.x = x.detach()
            if outputs:
                rec.y = output
            if grads and output.requires_grad:
                def store(g: torch.Tensor) -> None:
                    rec.gy = g.detach()
                output.register_hook(store)

        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(make_hook(name), with_kwargs=True))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


# -- the operands of a layer's backward GEMMs ---------------------------------------------
def grad_input_operand(layer: FQTLayer, gy: torch.Tensor) -> torch.Tensor:
    """``∇Y`` as the ∇X GEMM quantizes it: rows = samples (conv: ``(B, C·H·W)``, or
    ``(B, H·W·C)`` for block formats, :func:`lowbit.conv.conv_rows`) or tokens (linear,
    Hugging Face ``Conv1D``, in-projection: ``(N, out)``)."""
    dt = compute_dtype(gy.dtype)  # float32; float64 for float64 (its range kept)
    if isinstance(layer, _CONV):
        return conv_rows(gy, layer.config.grad_input).to(dt)
    return gy.reshape(-1, gy.shape[-1]).to(dt)


def grad_weight_operand(layer: FQTLayer, gy: torch.Tensor) -> torch.Tensor:
    """``∇Yᵀ`` as the ∇W GEMM quantizes it: rows = output features/channels, columns =
    tokens (linear) or (sample, position) pairs in row-major order (conv)."""
    dt = compute_dtype(gy.dtype)
    if isinstance(layer, _CONV):
        return gy.transpose(0, 1).reshape(gy.shape[1], -1).to(dt)
    return gy.reshape(-1, gy.shape[-1]).t().to(dt)


def weight_gemm_input(layer: FQTLayer, x: torch.Tensor) -> torch.Tensor | None:
    """``U``, the dequantized ``Q_f(X)`` operand of the ∇W GEMM, so that ``∇W = A·U`` with
    ``A`` from :func:`grad_weight_operand`: (N, in) for a linear layer, the im2col matrix
    (B·L, C_in·k·k) for a conv (a Conv1d: the conv2d block on a height-1 image, as it
    runs; Hugging Face ``Conv1D`` and an in-projection: their input, as a Linear's).
    ``None`` for grouped convolutions (not a single GEMM)."""
    spec, dt = layer.config.activation, compute_dtype(x.dtype)
    if isinstance(layer, FQTConv1d):
        if layer.groups != 1:
            return None
        (k,), (d,), (st,) = layer.kernel_size, layer.dilation, layer.stride
        if layer.padding_mode != "zeros":  # what fqt_conv1d receives
            xp, p = F.pad(x, layer._reversed_padding_repeated_twice, mode=layer.padding_mode), 0
        elif layer.padding == "same":
            xp, p = F.pad(x, same_padding((k,), (d,))), 0
        else:
            xp, p = x, 0 if layer.padding == "valid" else layer.padding[0]
        xd = xp.to(dt) if spec is None else conv_quantized(xp, spec, dt)
        cols = F.unfold(xd.unsqueeze(2), (1, k), (1, d), (0, p), (1, st))  # (B, C·k, L')
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    if isinstance(layer, FQTConv2d):
        if layer.groups != 1:
            return None
        xp, padding = layer._explicit_padding(x)  # what fqt_conv2d receives
        xd = xp.to(dt) if spec is None else conv_quantized(xp, spec, dt)
        cols = F.unfold(xd, layer.kernel_size, layer.dilation, padding, layer.stride)  # (B, Ck², L)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (B·L, Ck²)
    x2d = x.reshape(-1, x.shape[-1])
    return x2d.to(dt) if spec is None else quantize_forward(x2d, spec).dequantize(dt)


# -- progress -----------------------------------------------------------------------------
class _NoBar:
    def update(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool) -> object:
    """A tqdm bar (stderr) when ``enabled``, else a silent stand-in with the same calls."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
