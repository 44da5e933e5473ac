"""Low-precision weights and optimizer state, with no float32 master copy.

Storage formats (``FORMATS``, from :mod:`lowbit.storage`), for weights and state alike:
``"bf16"`` (bfloat16) or ``"int8"`` (int8 codes with float32 scales: one power-of-two
scale per row — dimension 0: a Linear or Conv weight's output channels, Hugging Face
``Conv1D``'s input features — for weights with ``ndim ≥ 2``, one per block of
``BLOCK_SIZE`` elements for state). 1-D parameters (biases, norm weights) always stay bfloat16: they
are a negligible share of the memory, and a per-channel scale for them would cost more
than it saves.

Every write rounds stochastically, so ``E[stored] = value``. The update ``Δ`` (weight
decay included) is computed in float32 for one parameter at a time (the only float32
anywhere, and only transiently); the new weight ``w + Δ`` is formed in float64 and
rounded from there (:func:`lowbit.storage.stochastic_round_bf16`,
:func:`lowbit.storage.encode_int8_per_channel` of a float64 tensor), so
``E[w_{t+1} | w_t] = w_t + Δ_t`` to within ``2^-45`` of a grid step however small ``Δ``
is: updates smaller than one grid step, which round-to-nearest would drop, survive in
expectation. (A float32 sum drops ``Δ`` below ``2^-24·|w|`` before any rounding — a
decay ``lr·λ`` of 1e-8 vanished, and smaller steps were biased by 20%: a new user's
trial.)

Bytes per parameter (:func:`memory_breakdown`; ``r`` = row length, i.e. ``numel / rows``):

===================  =======================  ===============  ====================
optimizer            weights                  decode buffer    state
===================  =======================  ===============  ====================
SRSGD bf16/bf16      2                        0                2 (momentum)
SRSGD int8/int8      1 + 4/r                  2                1 + 4/128
SRAdamW bf16/bf16    2                        0                2 + 2
SRAdamW int8/int8    1 + 4/r                  2                (1 + 4/128) + 2
fp32 AdamW           4 (+ 4 master copy)      0                4 + 4
===================  =======================  ===============  ====================

int8 weights store 1 byte per parameter plus one 4-byte scale per row. The parameter
tensor itself then holds a bfloat16 *image* of the int8 weight (the decode, exact in
bfloat16), because autograd needs a floating-point leaf to run the forward and backward
passes on; it is a working buffer that a fused kernel dequantizing on the fly would not
need, so :func:`memory_breakdown` reports it apart from the authoritative weights.

Writes from outside the optimizer. The parameter is what the user reads and writes
(``model.load_state_dict``, ``copy_``, ``torch.nn.init``, ``p.data``, weight averaging),
so it wins: at each step the stored codes are used only while their decode still equals
the parameter exactly (NaN equal to NaN); otherwise the parameter is re-encoded with
round-to-nearest and fresh scales. That is exact when its rows lie on a power-of-two int8
grid (e.g. weights saved from an int8 run), and otherwise within half a grid step of what
was written; the parameter then holds that int8 weight. The comparison reads values, not
``p._version``, which writes through ``p.data`` do not advance; it costs about 5% of an
SRSGD int8 step (0.8 of 18 ms on a 1024×1024 weight, one CPU thread). A parameter that
is no longer bfloat16, or whose stored state no longer has its device or shape
(``model.to()`` or ``.float()`` after the optimizer was built, ``p.data = …``), is
refused with an error at the next step, before anything is updated.
"""

from __future__ import annotations

import fractions
import numbers
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch

from lowbit.conversion import is_dtensor
from lowbit.kernels import compiled
from lowbit.noise import check_generator
from lowbit.userframe import user_stacklevel
from lowbit.storage import (
    BLOCK_SIZE,
    FORMATS,
    decode_int8_blockwise,
    decode_int8_per_channel,
    encode_int8_blockwise,
    encode_int8_per_channel,
    stochastic_round_bf16,
)

_W_CODES, _W_SCALE = "weight_codes", "weight_scale"
_PIECE = 1 << 16  # elements of a weight whose float64 sum w + Δ is rounded at once (_store_weight)


# ------------------------------------------------------------------------------ optimizers


def _number(v: object) -> float | None:
    """``v`` as a float when it is a real number the update can compute with (an int or
    float, a NumPy real scalar, a 0-d or one-element 1-d real tensor: what ``torch.optim``
    takes for a setting), else ``None`` (a bool, a string, a ``Fraction``/``Decimal``, a
    tensor of another shape: accepted by ``float()`` but failing inside a step, after
    earlier groups were updated)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, torch.Tensor):
        ok = v.numel() == 1 and v.dim() <= 1 and not v.is_complex() and v.dtype != torch.bool
        return float(v) if ok else None
    if isinstance(v, numbers.Real) and not isinstance(v, fractions.Fraction) \
            and type(v).__name__ != "bool_":  # int, float, NumPy's real scalars
        return float(v)
    return None


def _check_format(what: str, fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")


def _flag_off(v: object) -> bool:
    """Whether a torch flag setting is off: ``False``, ``None`` or a number equal to 0."""
    return v is None or v is False or (_number(v) == 0 and not isinstance(v, str))


# torch.optim settings that SRSGD / SRAdamW do not implement, each with the test for the
# value at which it leaves the update as they compute it (a torch state dict carries them
# all at those values). ``foreach`` and ``fused`` only choose how torch runs its loop:
# ignored, whatever their value.
_UNSUPPORTED = {"maximize": _flag_off, "nesterov": _flag_off, "dampening": lambda v: _number(v) == 0,
                "amsgrad": _flag_off, "differentiable": _flag_off, "capturable": _flag_off}
_NEUTRAL_TEXT = "maximize, nesterov, amsgrad, differentiable, capturable False; dampening 0"


# the constructor's own settings, one per optimizer: refused in a param group (ignored there)
_PER_OPTIMIZER = ("weights", "state", "generator", "weight_format", "state_format")
# the storage formats as a saved param group records them, and the arguments that set them
_FORMAT_ARGS = {"weight_format": "weights", "state_format": "state"}


def _formats(optimizer: Any) -> dict[str, str]:
    """The storage formats as a saved param group records them."""
    return {"weight_format": optimizer.weight_format, "state_format": optimizer.state_format}


def _drop(state: dict[str, Any], name: str) -> None:
    """Forget every stored form (bf16, or int8 codes + scale) of the entry ``name``."""
    for key in (name, f"{name}_codes", f"{name}_scale"):
        state.pop(key, None)


def _warn_global_rng_ranks(optimizer: torch.optim.Optimizer) -> bool:
    """Warn (``RuntimeWarning``) where ``optimizer`` rounds with torch's global RNG
    (``generator=None``) under an initialised process group of more than one rank: the
    ranks' updates must be one, and that RNG is often seeded per rank (dropout,
    augmentation), so the replicas would drift apart (a review). Returns whether the
    question could be asked (a process group exists): it is asked again until then."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return False
    world = dist.get_world_size()
    if optimizer.generator is None and world > 1:  # type: ignore[attr-defined]
        warnings.warn(f"{type(optimizer).__name__} with generator=None under {world} ranks draws its rounding "
                      "noise from torch's global RNG, which must then be in the same state on every rank or "
                      "the replicas drift apart; pass generator=torch.Generator().manual_seed(s) with the same "
                      "s on every rank", RuntimeWarning, stacklevel=user_stacklevel())
    return True


def _sharded_message(name: str, what: str) -> str:
    return (f"{name} does not take sharded parameters: {what} is a DTensor (FSDP2's fully_shard or "
            "tensor parallelism), whose shards its stochastic rounding does not write; nothing was "
            "updated. Use it with DDP or a single process, or torch.optim's optimizers with FSDP2")


class _Marked:
    """A set of tensors by identity, holding them weakly (``weakref.WeakSet`` compares
    tensors with ``==``, elementwise: its membership test raised)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = weakref.ref(t)

    def discard(self, t: torch.Tensor) -> None:
        if t in self:
            del self._refs[id(t)]

    def clear(self) -> None:
        self._refs.clear()

    def __contains__(self, t: object) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t

    def __len__(self) -> int:
        return sum(ref() is not None for ref in self._refs.values())


class _SROptimizer(torch.optim.Optimizer):
    """Base of the stochastic-rounding optimizers: loads and stores weights and state in
    their low-precision formats, and runs the step loop. A subclass only implements
    :meth:`_update`, the float32 update rule for one parameter.

    What is stored says how to read it (``weight_codes`` present ⇒ int8 weight; ``name``
    ⇒ bf16 state, ``name_codes`` ⇒ int8 state); the configured formats say how to write.
    """

    _HYPER: tuple[str, ...] = ("lr", "weight_decay")  # the settings the update reads
    _STATE: tuple[str, ...] = ()  # state entries, each stored as ``name`` or ``name_codes/_scale``
    _STATE_PLAIN: tuple[str, ...] = ()  # state entries stored as they are (a step count)
    _DECOUPLED = False  # whether weight decay is decoupled (torch's decoupled_weight_decay)

    def __init__(self, params: Iterable[torch.Tensor], defaults: dict[str, Any],
                 generator: torch.Generator | None, weights: str, state: str) -> None:
        _check_format("weights", weights)
        _check_format("state", state)
        self._check_hyper(defaults, "")
        check_generator(generator, type(self).__name__)  # not at the first step, half-way
        self.generator = generator
        # the ranks' rounding must be one: asked here and, where no process group exists
        # yet (or for a copy unpickled on the ranks), at the first step
        self._ranks_asked = _warn_global_rng_ranks(self)
        self.weight_format = weights
        self.state_format = state
        # every group checked before any weight is encoded: a refused group leaves the
        # model as it was (a new user's trial: group 0 was already rounded to int8)
        self._encode_later = True
        try:
            super().__init__(params, defaults)
        finally:
            self._encode_later = False
        for group in self.param_groups:
            self._encode_weights(group["params"])

    @classmethod
    def _check_hyper(cls, group: dict[str, Any], where: str) -> None:
        """``ValueError`` naming the setting (and ``where``: a param group) for a value
        ``torch.optim``'s own optimizer would refuse — a negative ``lr``, ``weight_decay``,
        ``momentum`` or ``eps``, a beta outside [0, 1) — and for a NaN or infinite one, which
        torch takes and which would make every weight it updates NaN or infinite (0 is
        what a schedule ending at 0 sets; ``eps=0`` and ``momentum`` ≥ 1 are torch's to
        take and ours: a new user's trial found them refused where this said otherwise); for a setting
        the update reads that the group lacks (a state dict saved by another optimizer); and
        for a ``torch.optim`` setting this optimizer does not implement, at a value that
        would change the update (:data:`_UNSUPPORTED`; at its neutral value, e.g. a
        ``torch.optim.SGD`` state dict's ``maximize=False``, it is accepted)."""
        own = [k for k in _PER_OPTIMIZER if k in group]
        if own:
            raise ValueError(f"{where}{', '.join(map(repr, own))} set in a param group, where "
                             f"{cls.__name__} would ignore it: the storage formats and the "
                             f"generator are per optimizer ({cls.__name__}(params, ..., "
                             "weights=, state=, generator=))")
        missing = [k for k in cls._HYPER if k not in group]
        if missing:
            raise ValueError(f"{where}lacks {', '.join(missing)}, which {cls.__name__} reads (a "
                             "state dict saved by another optimizer?)")
        changing = [f"{k}={group[k]!r}" for k, neutral in _UNSUPPORTED.items()
                    if k in group and not neutral(group[k])]
        if changing:
            raise ValueError(f"{where}{cls.__name__} does not implement {', '.join(changing)}, "
                             f"which would change the update (accepted: {_NEUTRAL_TEXT})")
        dwd = group.get("decoupled_weight_decay", cls._DECOUPLED)
        if (dwd is None or bool(dwd) != cls._DECOUPLED) and _number(group["weight_decay"]) != 0:
            raise ValueError(
                f"{where}{cls.__name__} does not implement decoupled_weight_decay={dwd!r} with "
                f"weight_decay={group['weight_decay']!r}: its weight decay is "
                + ("decoupled (as torch.optim.AdamW's)" if cls._DECOUPLED else
                   "added to the gradient (as torch.optim.SGD's)"))
        for key in ("lr", "weight_decay"):
            v = _number(group[key])
            if v is None or not 0 <= v < float("inf"):
                raise ValueError(f"{where}{key} must be a finite number ≥ 0, got {group[key]!r}")

    def _check_complete(self, i: int, st: dict[str, Any]) -> None:
        """``ValueError`` unless the saved state ``st`` of parameter ``i`` holds each entry
        whole (``name`` or ``name_codes`` with ``name_scale``; the weight's codes with their
        scales) and, where the update counts steps, its entries all or none with the count:
        a state dict loaded into a skeleton that lacked keys (``torch.distributed.checkpoint``
        fills only the keys it finds) would restart what it lost, without a word."""
        name = type(self).__name__
        for entry in (*self._STATE, "weight"):
            codes, scale = f"{entry}_codes" in st, f"{entry}_scale" in st
            if codes != scale:
                raise ValueError(f"{name} cannot load this state dict: parameter {i} (in param-group order) has "
                                 f"{entry + ('_codes' if codes else '_scale')!r} without "
                                 f"{entry + ('_scale' if codes else '_codes')!r}; nothing was loaded")
        if not self._STATE_PLAIN:
            return
        have = {e for e in self._STATE if e in st or f"{e}_codes" in st} | {k for k in self._STATE_PLAIN if k in st}
        every = set(self._STATE) | set(self._STATE_PLAIN)
        if have and have != every:
            raise ValueError(
                f"{name} cannot load this state dict: parameter {i} (in param-group order) has "
                f"{', '.join(sorted(have))} but not {', '.join(sorted(every - have))}: the update would restart "
                "them from zero. (torch.distributed.checkpoint loads only the keys of the state dict it fills: "
                f"make that one with get_state_dict on an optimizer whose state is complete); nothing was loaded")

    def __getstate__(self) -> dict[str, Any]:
        """torch's state (defaults, state, param groups) and this optimizer's own settings
        (``copy.deepcopy``, pickling, ``torch.save(optimizer)``: torch's keeps only the
        former, and a copy then failed at its first step), with the weights marked on
        their grid (:attr:`_on_grid`) by position."""
        marked = self._on_grid
        return {**super().__getstate__(), "generator": self.generator,
                "weight_format": self.weight_format, "state_format": self.state_format,
                "on_grid": [(gi, pi) for gi, g in enumerate(self.param_groups)
                            for pi, p in enumerate(g["params"]) if p in marked]}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        on_grid = state.pop("on_grid", [])
        super().__setstate__(state)
        self.__dict__.pop("_on_grid_set", None)
        for gi, pi in on_grid:
            self._on_grid.add(self.param_groups[gi]["params"][pi])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Checks that the parameters are bfloat16 (``TypeError`` naming the group and the
        parameter); with ``weights="int8"``, encodes each trainable weight (``ndim ≥ 2``,
        ``requires_grad``) once with round-to-nearest (the smallest error for a one-off
        conversion; unbiasedness matters for the updates that accumulate, which all use
        stochastic rounding) and writes its exact bfloat16 image into the parameter. A
        frozen weight is left as it is (it would lose precision for no update); it is
        encoded at its first step, if it ever takes one. The constructor encodes once
        every group has been checked: a refused group leaves every weight unwritten."""
        super().add_param_group(param_group)
        try:  # its own settings, or the defaults it took
            self._check_hyper(self.param_groups[-1], f"param group {len(self.param_groups) - 1}: ")
        except ValueError:
            self.param_groups.pop()
            raise
        params = self.param_groups[-1]["params"]
        sharded = [i for i, p in enumerate(params) if is_dtensor(p)]
        if sharded:
            self.param_groups.pop()
            raise TypeError(_sharded_message(type(self).__name__, f"parameter {sharded[0]} of the group"))
        bad = [(i, p.dtype) for i, p in enumerate(params) if p.dtype != torch.bfloat16]
        if bad:
            self.param_groups.pop()
            raise TypeError(f"{type(self).__name__} keeps weights in bfloat16; parameter {bad[0][0]} of "
                            f"param group {len(self.param_groups)} is {bad[0][1]} (convert the model with "
                            "model.to(torch.bfloat16)); no weight was written")
        if not getattr(self, "_encode_later", False):
            self._encode_weights(params)

    def _encode_weights(self, params: list[torch.Tensor]) -> None:
        """With ``weights="int8"``: each trainable weight of ``params`` onto its int8 grid
        (round-to-nearest), its exact bfloat16 image into the parameter. The codes are not
        kept in ``state``: the weight is marked (:attr:`_on_grid`), and its first step
        encodes the parameter again — exactly these codes, or, after a write from outside,
        the parameter's own round-to-nearest ones, as stored codes would have made it
        (:meth:`_load_weight`). So a new optimizer's ``state`` is empty, as a ``torch.optim``
        optimizer's is: ``torch.distributed.checkpoint``'s ``get_state_dict`` makes the
        state of an optimizer whose state is empty with a step at lr 0, and took a fresh one
        holding only weight codes for initialised — its state dict to load into then had no
        moments, and DCP, which fills only the keys it finds, resumed Adam from step 1
        without a word (a new user's trial)."""
        with torch.no_grad():
            for p in params:
                if self._int8_weight(p) and p.requires_grad:
                    p.copy_(decode_int8_per_channel(*encode_int8_per_channel(p, stochastic=False)))
                    self._on_grid.add(p)

    @property
    def _on_grid(self) -> _Marked:
        """The int8 weights the constructor (or ``add_param_group``) put on their grid whose
        codes are not stored yet (their first step stores them); emptied by
        :meth:`load_state_dict`, which replaces the state, as it replaced stored codes."""
        marked = self.__dict__.get("_on_grid_set")
        if marked is None:
            marked = self.__dict__["_on_grid_set"] = _Marked()
        return marked

    def _int8_weight(self, p: torch.Tensor) -> bool:
        return self.weight_format == "int8" and p.ndim >= 2 and p.numel() > 0

    def _put_int8_weight(self, p: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> None:
        self._on_grid.discard(p)  # its codes are stored from now on
        st = self.state[p]
        _drop(st, "weight")
        st[_W_CODES], st[_W_SCALE] = codes, scale
        p.copy_(decode_int8_per_channel(codes, scale))  # exact: power-of-two scales

    def _load_weight(self, p: torch.Tensor) -> torch.Tensor:
        """The weight in float32: the int8 codes·scales if stored and still equal to ``p``,
        else ``p`` (a write from outside the optimizer; int8 weights are then re-encoded
        from it with round-to-nearest, see the module docstring). A weight the constructor
        put on its grid (:attr:`_on_grid`) counts as having those codes. Codes where this
        optimizer stores bfloat16 weights (a state dict of int8 weights that recorded no
        formats) are dropped: ``p`` is the weight (they were re-encoded onto the int8 grid:
        a new user's trial)."""
        st = self.state.get(p, {})
        if _W_CODES in st and not self._int8_weight(p):
            _drop(st, "weight")
        if _W_CODES not in st and p in self._on_grid:  # the constructor's grid, codes not stored yet
            self._put_int8_weight(p, *encode_int8_per_channel(p, stochastic=False))  # (exact if untouched)
            st = self.state[p]
        if _W_CODES not in st:
            return p.float()
        w = decode_int8_per_channel(st[_W_CODES], st[_W_SCALE])
        pf = p.float()
        if torch.equal(pf, w) or torch.allclose(pf, w, rtol=0, atol=0, equal_nan=True):
            return w
        self._put_int8_weight(p, *encode_int8_per_channel(p, stochastic=False))
        return decode_int8_per_channel(st[_W_CODES], st[_W_SCALE])

    def _sparse_refusal(self, group: dict[str, Any], layout: torch.layout) -> str | None:
        """Why a gradient of ``layout`` (not strided: sparse) cannot be stepped with
        ``group``'s settings, or ``None`` where it can."""
        return "does not support sparse gradients"

    def _check_params(self) -> None:
        """Refuses, before any update, a parameter to step whose dtype changed since the
        optimizer was built or whose stored state no longer has its device or shape
        (``model.to()``, ``.float()``, ``p.data = …`` after the optimizer was built)
        (``TypeError``, ``RuntimeError``), a parameter on the meta device (``RuntimeError``),
        and a sparse gradient (``nn.Embedding(sparse=True)``)
        that the update cannot take (``RuntimeError``: see :meth:`_sparse_refusal`)."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                what = f"parameter {pi} of param group {gi}"
                if is_dtensor(p) or is_dtensor(p.grad):  # a DTensor gradient (or parameter)
                    raise TypeError(_sharded_message(type(self).__name__, what))
                if p.grad.layout != torch.strided and (
                        why := self._sparse_refusal(group, p.grad.layout)) is not None:
                    raise RuntimeError(
                        f"{type(self).__name__} {why}: {what} has a {p.grad.layout} gradient "
                        "(e.g. from nn.Embedding(sparse=True)); nothing was updated. Use dense "
                        "gradients (nn.Embedding(sparse=False))")
                if p.dtype != torch.bfloat16:
                    raise TypeError(
                        f"{type(self).__name__} keeps weights in bfloat16, but {what} is now "
                        f"{p.dtype} (changed after the optimizer was built, e.g. by model.to()"
                        "); convert it back with .to(torch.bfloat16)")
                for key, v in self.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and (v.device != p.device or (
                            not key.endswith("_scale") and v.shape != p.shape)):
                        raise RuntimeError(
                            f"{what} is a {tuple(p.shape)} tensor on {p.device} but its "
                            f"optimizer state {key!r} is {tuple(v.shape)} on {v.device}: the "
                            "parameter was moved or replaced after the optimizer was built; "
                            "build the optimizer after model.to(), or load this optimizer's "
                            "state_dict into one built on the moved model")
                if p.device.type == "meta":
                    raise RuntimeError(
                        f"{type(self).__name__} cannot step {what}: it is on the meta device "
                        "(shapes only, no values to round); materialize the model first "
                        "(model.to_empty(device=...) and load or initialize its weights)")

    def _store_weight(self, p: torch.Tensor, w: torch.Tensor, delta: torch.Tensor) -> None:
        """Writes ``w + Δ`` (``w``, ``delta`` float32, summed in float64: see the module
        docstring) with stochastic rounding (``E[stored] = w + Δ``): int8 per channel
        (fresh scales) plus its bfloat16 image in ``p``, or bfloat16 in ``p``. The float64
        sum and its rounding run, on the CPU, on pieces of about ``_PIECE`` elements (whole
        rows for int8), in row-major order: the same draws as one call of the codec on the
        whole float64 tensor (a CPU generator draws element by element), with the
        temporaries in cache and off glibc's fresh mappings (whole-tensor float64
        temporaries took 5× the bf16 step's time: docs/benchmarks.md, "The optimizers'
        float64 weight write"); elsewhere in one piece (a GPU's caching allocator has no
        such cost, and pieces would be kernel launches)."""
        gen = self.generator
        piece = _PIECE if p.device.type == "cpu" else max(1, w.numel())
        if self._int8_weight(p):
            rows_w, rows_d = w.reshape(w.shape[0], -1), delta.reshape(w.shape[0], -1)
            codes = torch.empty(rows_w.shape, dtype=torch.int8, device=p.device)
            scale = torch.empty(rows_w.shape[0], dtype=torch.float32, device=p.device)
            per = max(1, piece // max(1, rows_w.shape[1]))
            for i in range(0, rows_w.shape[0], per):
                codes[i:i + per], scale[i:i + per] = encode_int8_per_channel(
                    rows_w[i:i + per].double() + rows_d[i:i + per].double(), gen)
            self._put_int8_weight(p, codes.view(p.shape), scale)
        else:
            _drop(self.state.get(p, {}), "weight")
            flat_w, flat_d = w.reshape(-1), delta.reshape(-1)
            out = torch.empty(flat_w.shape, dtype=torch.bfloat16, device=p.device)
            for i in range(0, flat_w.numel(), piece):
                out[i:i + piece] = stochastic_round_bf16(flat_w[i:i + piece].double()
                                                         + flat_d[i:i + piece].double(), gen)
            p.copy_(out.view(p.shape))

    def _load_state(self, p: torch.Tensor, name: str) -> torch.Tensor | None:
        """State entry ``name`` of ``p`` in float32, or None before the first write."""
        st = self.state.get(p, {})
        if name in st:
            return st[name].float()
        if f"{name}_codes" in st:
            return decode_int8_blockwise(st[f"{name}_codes"], st[f"{name}_scale"])
        return None

    def _store_state(self, p: torch.Tensor, name: str, x: torch.Tensor, fmt: str) -> None:
        """Writes state entry ``name`` in format ``fmt`` with stochastic rounding."""
        st = self.state[p]
        _drop(st, name)
        if fmt == "bf16":
            st[name] = stochastic_round_bf16(x, self.generator)
        else:
            st[f"{name}_codes"], st[f"{name}_scale"] = encode_int8_blockwise(x, self.generator)

    def _update(self, p: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                group: dict[str, Any]) -> torch.Tensor:
        """The float32 update ``Δ`` (the new weight is ``w + Δ``, formed in float64 by
        :meth:`step`) from weight ``w`` and gradient ``g``, both float32 (stores the state)."""
        raise NotImplementedError

    # eager inside torch.compile (its generator-driven rounding does not trace with dynamic
    # shapes), as torch's zero_grad is; where torch's compiler cannot import, plain
    @compiled.disable_tracing
    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):  # settings changed since (a scheduler, by hand)
            self._check_hyper(group, f"param group {gi}: ")
        self._check_params()
        if not getattr(self, "_ranks_asked", False):  # built before the process group, or unpickled
            self._ranks_asked = _warn_global_rng_ranks(self)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    w = self._load_weight(p)
                    delta = self._update(p, w, p.grad.float(), group)
                    self._store_weight(p, w, delta)
        return loss

    def _state_keys(self) -> set[str]:
        """Every key this optimizer writes into a parameter's state."""
        entries = {f"{n}{s}" for n in self._STATE for s in ("", "_codes", "_scale")}
        return entries | {_W_CODES, _W_SCALE} | set(self._STATE_PLAIN)

    @torch._disable_dynamo  # as torch's own
    def state_dict(self) -> dict[str, Any]:
        """:meth:`torch.optim.Optimizer.state_dict`, each saved param group also holding the
        storage formats (``"weight_format"``, ``"state_format"``: this optimizer's
        ``weights=`` and ``state=``), which :meth:`load_state_dict` checks (in the param
        groups: ``torch.distributed.checkpoint``'s optimizer state dicts keep those)."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            group.update(_formats(self))
        return sd

    def _formats_of(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` with its param groups' recorded formats checked against this
        optimizer's and taken out (a shallow copy; the caller's dict is not changed).
        ``ValueError`` where they differ: the load would go on silently in other formats (a
        new user's trial: an int8/int8 checkpoint went on in bfloat16)."""
        name, mine = type(self).__name__, _formats(self)
        for gi, group in enumerate(state_dict["param_groups"]):
            saved = {k: group[k] for k in mine if k in group}
            if any(saved[k] != mine[k] for k in saved):
                was = ", ".join(f"{_FORMAT_ARGS[k]}={v!r}" for k, v in saved.items())
                now = ", ".join(f"{_FORMAT_ARGS[k]}={mine[k]!r}" for k in saved)
                raise ValueError(
                    f"{name} cannot load this state dict: its param group {gi} was saved with {was}, "
                    f"and this optimizer stores {now}; nothing was loaded. To resume, build it as "
                    f"{name}(params, ..., {was}); to change formats, load only the model's weights "
                    "and start a fresh optimizer")
        groups = [{k: v for k, v in g.items() if k not in mine} for g in state_dict["param_groups"]]
        return {**state_dict, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`torch.optim.Optimizer.load_state_dict`, but state tensors keep their
        saved dtypes (torch casts floating-point state to the parameter's dtype, which
        would turn float32 scales and int8 codes into bfloat16). Parameters are not
        written: load the model's state_dict from the same checkpoint (then the codes
        equal the parameters and the continuation is bitwise identical); where they
        differ, the parameter wins at the next step (see the module docstring). The
        rounding generator is the caller's: restore its state too.

        A state dict this optimizer could not continue from is refused with a
        ``ValueError`` before anything is loaded: per-parameter state under keys it does not
        write (another optimizer's: ``torch.optim.SGD``'s ``momentum_buffer`` would be
        ignored and the momentum restart from zero), named; a saved param group that lacks
        a setting the update reads, or holds a ``torch.optim`` setting at a value it does
        not implement (``nesterov=True``, ``maximize=True``, …, as :meth:`_check_hyper`),
        or was saved with other storage formats (``weights=``, ``state=``, which
        :meth:`state_dict` records; a state dict without them — torch's, or saved before
        they were recorded — loads, each entry converted at its next write).
        ``torch.optim.AdamW``'s state (``step``, ``exp_avg``, ``exp_avg_sq``) loads into
        :class:`SRAdamW` (its tensor ``step`` becomes an int). State held as DTensors
        (saved from FSDP2-sharded parameters) is refused with a ``TypeError``.

        Hooks as torch's: ``register_load_state_dict_pre_hook`` hooks run first (on a
        shallow copy; a returned dict replaces it) and the checks and the load read their
        result; post-hooks run last, after the saved dtypes are restored."""
        state_dict = state_dict.copy()  # shallow, as torch's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        name = type(self).__name__
        state_dict = self._formats_of(state_dict)
        for gi, group in enumerate(state_dict["param_groups"]):
            self._check_hyper(group, f"{name}.load_state_dict: saved param group {gi}: ")
        sharded = sorted({str(k) for st in state_dict["state"].values() for k, v in st.items() if is_dtensor(v)})
        if sharded:  # FSDP2's optimizer state: its shards cannot continue a whole parameter's
            raise TypeError(f"{name} cannot load this state dict: its state {', '.join(map(repr, sharded))} "
                            "holds DTensors (saved from sharded parameters: FSDP2's fully_shard), which "
                            f"{name} does not take; nothing was loaded")
        allowed = self._state_keys()
        foreign = sorted({str(k) for st in state_dict["state"].values() for k in st} - allowed)
        if foreign:
            raise ValueError(
                f"{name} cannot load this state dict: its per-parameter state has "
                f"{', '.join(map(repr, foreign))}, which {name} does not write (it writes "
                f"{', '.join(map(repr, sorted(allowed)))}): state saved by another optimizer "
                "would be ignored and start afresh")
        # the groups' layout first, in torch's words: the shape check below pairs parameters
        # in flattened order, and blamed "another model" for the same model grouped otherwise
        # (a new user's trial)
        saved_sizes = [len(g["params"]) for g in state_dict["param_groups"]]
        my_sizes = [len(g["params"]) for g in self.param_groups]
        if len(saved_sizes) != len(my_sizes):
            raise ValueError(f"{name} cannot load this state dict: loaded state dict has a different number of "
                             f"parameter groups ({len(saved_sizes)} saved, {len(my_sizes)} here); nothing was loaded")
        if saved_sizes != my_sizes:
            raise ValueError(f"{name} cannot load this state dict: loaded state dict contains a parameter group "
                             f"that doesn't match the size of optimizer's group (sizes {saved_sizes} saved, "
                             f"{my_sizes} here); nothing was loaded")
        saved = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        mine = chain.from_iterable(g["params"] for g in self.param_groups)
        for i, (pid, p) in enumerate(zip(saved, mine)):
            self._check_complete(i, state_dict["state"].get(pid, {}))
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor) and key not in self._STATE_PLAIN \
                        and not key.endswith("_scale") and tuple(value.shape) != tuple(p.shape):
                    raise ValueError(
                        f"{name} cannot load this state dict: its state {key!r} of parameter {i} "
                        f"(in param-group order) is {tuple(value.shape)}, but that parameter is "
                        f"{tuple(p.shape)}: the state belongs to another model's parameters")
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()  # ran above
        self._optimizer_load_state_dict_post_hooks = OrderedDict()  # run below, on the saved dtypes
        try:
            super().load_state_dict(state_dict)
            self._on_grid.clear()  # the loaded state is the state (it replaced stored codes, as here)
        finally:  # the same dicts: the hooks' handles stay valid
            self._optimizer_load_state_dict_pre_hooks = pre
            self._optimizer_load_state_dict_post_hooks = post
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if key in self._STATE_PLAIN and isinstance(value, torch.Tensor):
                    self.state[p][key] = int(value.item())  # torch's float32 step tensor
                elif isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(p.device)
        for post_hook in post.values():
            post_hook(self)


class SRSGD(_SROptimizer):
    """SGD with momentum for bfloat16 parameters, updated with stochastic rounding.

    ``d = g + λ w``; ``v ← μ v + d`` (if ``μ > 0``, else ``v = d``); ``w ← w − lr · v``,
    each in float32 for one parameter at a time and stored back with stochastic
    rounding (unbiased). ``weights``: ``"bf16"`` or ``"int8"`` (per-channel, ``ndim ≥ 2``
    only); ``state``: format of the momentum, ``"bf16"`` or ``"int8"`` (blockwise).
    ``generator`` seeds the rounding noise (reproducible runs); under data parallelism
    (DDP) every rank must round alike: pass ``torch.Generator().manual_seed(s)`` with the
    same ``s`` on every rank (``None``, torch's global RNG, warns there). Sharded
    (DTensor: FSDP2) parameters are refused (``TypeError``). Bytes per parameter: see
    the module docstring.

    A sparse gradient (``nn.Embedding(sparse=True)``) is taken as plain SGD only (momentum
    and weight decay 0, COO layout): otherwise ``step`` raises ``RuntimeError`` before any
    update. The signature is ``torch.optim.SGD``'s (``lr`` defaults to 1e-3); the settings it
    does not implement (``nesterov``, ``dampening``, ``maximize``, ``differentiable``) are
    refused (``ValueError``), as arguments, in a param group or in a loaded state dict,
    unless at their neutral value (``False``, 0); ``foreach`` and ``fused`` are ignored
    (they choose how torch runs its loop).
    """

    _HYPER = ("lr", "weight_decay", "momentum")
    _STATE = ("momentum",)

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, differentiable: bool = False,
                 fused: bool | None = None, generator: torch.Generator | None = None,
                 weights: str = "bf16", state: str = "bf16") -> None:
        # torch.optim.SGD's signature (a review: SRSGD(params, lr, 0.9, 0.5) took 0.5 as
        # weight decay, where torch takes it as dampening; a trial: maximize=False was a
        # TypeError); the settings it does not implement only at their neutral values
        # (ValueError otherwise, as in a param group); foreach and fused choose torch's loop
        # only: ignored
        self._check_hyper({"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                           "dampening": dampening, "nesterov": nesterov, "maximize": maximize,
                           "differentiable": differentiable}, "")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay},
                         generator, weights, state)

    @classmethod
    def _check_hyper(cls, group: dict[str, Any], where: str) -> None:
        super()._check_hyper(group, where)
        mu = _number(group["momentum"])
        if mu is None or not 0 <= mu < float("inf"):  # torch.optim.SGD's rule (momentum 1: no decay)
            raise ValueError(f"{where}momentum must be a finite number ≥ 0, got {group['momentum']!r}")

    def _sparse_refusal(self, group: dict[str, Any], layout: torch.layout) -> str | None:
        """Plain SGD (no momentum, no weight decay) takes a sparse COO gradient: the update
        ``w − lr·g`` is then the dense one. Momentum and weight decay would make it dense
        in every row, and are refused (as ``torch.optim.SGD`` refuses weight decay)."""
        if layout == torch.sparse_coo and _number(group["momentum"]) == 0 \
                and _number(group["weight_decay"]) == 0:
            return None
        return ("supports sparse gradients only as plain SGD: in COO layout, with momentum 0 "
                f"and weight_decay 0 (this param group has momentum={group['momentum']!r}, "
                f"weight_decay={group['weight_decay']!r})")

    def _update(self, p: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                group: dict[str, Any]) -> torch.Tensor:
        # plain floats: a one-element 1-d tensor setting would broadcast a 0-d parameter to (1,)
        lr, mu, wd = (_number(group[k]) for k in ("lr", "momentum", "weight_decay"))
        d = g + wd * w if wd else g
        if mu:
            v = self._load_state(p, "momentum")
            d = d if v is None else mu * v + d
            self._store_state(p, "momentum", d, self.state_format)
        return (-lr * d).to_dense()  # (a sparse gradient's Δ: 0 off its rows, kept exactly)


class SRAdamW(_SROptimizer):
    """AdamW for bfloat16 parameters, updated with stochastic rounding.

    At step ``t``: ``m ← β1 m + (1 − β1) g``; ``v ← β2 v + (1 − β2) g²``;
    ``w ← w − lr · m̂ / (√v̂ + ε) − lr·λ·w`` (decoupled weight decay) with
    ``m̂ = m / (1 − β1^t)``, ``v̂ = v / (1 − β2^t)``; the update in float32 for one
    parameter at a time, ``w + Δ`` in float64, stored back with stochastic rounding.

    ``state="bf16"`` stores ``m`` and ``v`` in bfloat16. ``state="int8"`` stores ``m`` in
    int8 blockwise and ``v`` still in bfloat16: ``v`` spans many orders of magnitude within
    a block (it is a square), and a linear 8-bit grid whose step is ``max/127`` rounds
    every ``v`` below about ``max/254`` to 0 or one step: ``1/√v̂`` then either explodes
    (``v = 0``, update ``m̂/ε``) or is badly wrong. bfloat16 has float32's exponent range,
    so it holds ``v`` with 0.4% relative precision at every magnitude. (8-bit Adam
    implementations store ``v`` with a non-linear, dynamic quantization map instead.)
    ``weights`` as for :class:`SRSGD`. ``generator`` seeds the rounding noise (the same on
    every DDP rank, as for :class:`SRSGD`; sharded parameters refused). The defaults
    are ``torch.optim.AdamW``'s (``weight_decay=1e-2`` too: it was 0, and a new user's
    drop-in swap lost its weight decay).

    Sparse gradients are refused (``RuntimeError`` at ``step``, before any update), as by
    ``torch.optim.AdamW``. The signature is ``torch.optim.AdamW``'s; the settings it does
    not implement (``amsgrad``, ``maximize``, ``capturable``, ``differentiable``) are
    refused (``ValueError``), as arguments, in a param group or in a loaded state dict,
    unless ``False``; ``foreach`` and ``fused`` are ignored. A ``torch.optim.AdamW`` state
    dict with them at ``False`` loads (the same update rule and state).
    """

    _HYPER = ("lr", "weight_decay", "betas", "eps")
    _STATE = ("exp_avg", "exp_avg_sq")
    _STATE_PLAIN = ("step",)
    _DECOUPLED = True

    def __init__(self, params: Iterable[torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, generator: torch.Generator | None = None,
                 weights: str = "bf16", state: str = "bf16") -> None:
        defaults = {"lr": lr, "betas": tuple(betas) if isinstance(betas, (tuple, list)) else betas,
                    "eps": eps, "weight_decay": weight_decay}
        # torch.optim.AdamW's signature; the settings it does not implement off only
        self._check_hyper({**defaults, "amsgrad": amsgrad, "maximize": maximize, "capturable": capturable,
                           "differentiable": differentiable}, "")
        super().__init__(params, defaults, generator, weights, state)

    @classmethod
    def _check_hyper(cls, group: dict[str, Any], where: str) -> None:
        super()._check_hyper(group, where)
        betas, eps = group["betas"], _number(group["eps"])
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(
                (b := _number(x)) is not None and 0 <= b < 1 for x in betas)):
            raise ValueError(f"{where}betas must be two numbers in [0, 1), got {betas!r}")
        if eps is None or not 0 <= eps < float("inf"):  # torch.optim.AdamW's rule (0: m/√v, as torch)
            raise ValueError(f"{where}eps must be a finite number ≥ 0, got {group['eps']!r}")

    def _update(self, p: torch.Tensor, w: torch.Tensor, g: torch.Tensor,
                group: dict[str, Any]) -> torch.Tensor:
        lr, eps, wd = (_number(group[k]) for k in ("lr", "eps", "weight_decay"))  # plain floats (SRSGD's)
        b1, b2 = (_number(b) for b in group["betas"])
        t = self.state[p].get("step", 0) + 1
        m, v = self._load_state(p, "exp_avg"), self._load_state(p, "exp_avg_sq")
        m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
        v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
        self._store_state(p, "exp_avg", m, self.state_format)
        self._store_state(p, "exp_avg_sq", v, "bf16")  # see the class docstring
        self.state[p]["step"] = t  # counted once the state is written
        delta = -lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        # the decay in the same Δ: applied to w apart, in float32, it rounded back to w
        # wherever lr·λ < 2^-25 (a new user's trial: weight_decay had no effect at lr 1e-6)
        return delta - (lr * wd) * w if wd else delta


# --------------------------------------------------------------------------------- memory


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_breakdown(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Bytes per parameter held by the parameters and the optimizer, split into
    ``"weights"`` (the authoritative weight: int8 codes + scales where stored, else the
    parameter tensor), ``"decode_buffer"`` (the parameter tensor where it is only the
    bfloat16 image of an int8 weight), ``"state"`` (every other tensor in the optimizer
    state) and ``"total"``. Works for any optimizer (e.g. ``torch.optim.AdamW``)."""
    n = 0
    parts = {"weights": 0, "decode_buffer": 0, "state": 0}
    for group in optimizer.param_groups:
        for p in group["params"]:
            n += p.numel()
            st = optimizer.state.get(p, {})
            if _W_CODES in st:
                parts["weights"] += _nbytes(st[_W_CODES]) + _nbytes(st[_W_SCALE])
                parts["decode_buffer"] += _nbytes(p)
            else:
                parts["weights"] += _nbytes(p)
            parts["state"] += sum(_nbytes(v) for k, v in st.items()
                                  if isinstance(v, torch.Tensor) and k not in (_W_CODES, _W_SCALE))
    n = max(n, 1)
    out = {k: v / n for k, v in parts.items()}
    out["total"] = sum(parts.values()) / n
    return out


def bytes_per_parameter(optimizer: torch.optim.Optimizer) -> float:
    """Weights plus optimizer state (everything the parameters and the optimizer hold),
    in bytes per parameter: ``memory_breakdown(optimizer)["total"]``."""
    return memory_breakdown(optimizer)["total"]


__all__ = [
    "BLOCK_SIZE",
    "FORMATS",
    "SRAdamW",
    "SRSGD",
    "bytes_per_parameter",
    "decode_int8_blockwise",
    "decode_int8_per_channel",
    "encode_int8_blockwise",
    "encode_int8_per_channel",
    "memory_breakdown",
    "stochastic_round_bf16",
]
