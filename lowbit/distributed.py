"""Unbiased quantized gradient communication for ``DistributedDataParallel``.

``N`` ranks hold gradients ``g_r``; DDP averages them. :func:`quantized_allreduce_hook`
sends each gradient quantized with stochastic rounding (docs/METHOD.md §8)::

    state = QuantizedCommState(ddp_model, GradComm(bits=8))
    ddp_model.register_comm_hook(state, quantized_allreduce_hook)

**The estimator.** Each parameter's gradient is cut into blocks of ``block`` elements
(``block=None``: one block per parameter, i.e. PTQ per tensor). For one bucket:

1. every rank computes its blocks' absmax; one all-reduce MAX gives the shared absmax
   ``A_k`` of block ``k`` (a tiny message: 4 bytes per block, 8 for float64 gradients);
2. rank ``r`` rounds ``y = g_r/s_k`` (step ``s_k = A_k/Q``, ``Q = 2^(bits−1) − 1``,
   :meth:`~lowbit.formats.IntFormat.scale_from_absmax`) stochastically onto
   ``c_r = ⌊y⌋ + [u_r < y − ⌊y⌋] ∈ {−Q..Q}`` (``u_r`` uniform); ``|y| ≤ Q`` because the
   scale is shared, so nothing clips;
3. the integer codes are summed exactly over ranks and decoded: ``ĝ = s_k·Σ_r c_r / N``.

``E[c_r] = y`` given the gradients, so ``E[ĝ] = ḡ = (1/N)Σ_r g_r``: unbiased. The noises
``u_r`` are independent across ranks, so the added variance is
``(1/N²)·Σ_r Σ_i p_ri(1 − p_ri)·s_k²`` with ``p_ri`` the fractional part of ``y_ri``
(:func:`expected_variance`; a bfloat16 bucket adds the rounding of the average into it,
see **Dtypes**): the third term of the variance decomposition
(:func:`lowbit.analysis.gradient_variance` with ``comm=``).

**The wire.** Codes can only be summed under a shared scale (hence step 1), and the sum
must not overflow: ``N·Q`` must fit the summing integer type. Gloo and NCCL all-reduce
int8 and int32 but not int16, so the choices are (bytes sent per element per rank,
bandwidth-optimal ring algorithms; fp32 all-reduce: ``2(N−1)/N·4``):

* ``allreduce``: sum in int8 when ``N·Q ≤ 127`` (4 bits: ``N ≤ 18``), else int32:
  ``2(N−1)/N·b`` bytes, ``b`` = 1 or 4 (int32 saves nothing over fp32);
* ``allgather``: gather every rank's int8 codes, sum in int32 locally: ``(N−1)`` bytes.

``wire="auto"`` (default) takes the cheaper: int8 all-reduce where it cannot overflow,
else the all-gather while ``N < 8`` (8-bit codes, 2 ranks: 1 byte against fp32's 4),
else the int32 all-reduce (no gain; a second-stage re-quantization would be needed, not
implemented). Both give the same integer sum, so the same bits.

**Noise.** Rank ``r`` (its rank in the state's process group, the DDP model's) rounds parameter ``i`` (index in ``model.named_parameters()``) at
its ``t``-th communication with counter-based noise (:func:`lowbit.formats.counter_uniform`)
seeded by :func:`comm_noise_seed` ``(seed, r, t, i)``: independent across ranks,
deterministic, and independent of how DDP lays parameters out in buckets (DDP rebuilds
its buckets after the first iteration, so a resumed run would otherwise differ). The
call counters are in :meth:`QuantizedCommState.state_dict` for checkpoints.

**Non-finite gradients.** If any rank has a NaN/Inf in a bucket, the bucket is sent as
the plain all-reduce of its own dtype instead (the MAX message carries the flag): NaN/Inf
reach the averaged gradient as they would without the hook, never a finite number.

**Agreement.** The ranks must hold the same settings (bits, block, wire, seed) and call
counters: the shared step and the noise keys depend on them. A bucket's first call checks
the settings in a fixed-size message (two float64 values, not counted in ``bytes_sent``:
sent again after a resume), and every call's MAX message starts with a fingerprint of the
settings and the bucket's counters and its negation (MAX leaves both unchanged only where
every rank sent the same): otherwise every rank raises ``RuntimeError`` naming the fix,
where a mismatch averaged wrong, drifted bfloat16 replicas apart, or made gloo abort.
``bytes_sent`` counts these per-bucket floats (3 with the non-finite flag): DDP's first
iteration after a start or a resume has its own bucket layout (one bucket until its
rebuild), so a resumed run's byte count can differ from the uninterrupted run's by a few
floats a bucket (a review measured 12 bytes in 3.2 MB); its gradients do not.

**Dtypes.** The arithmetic runs in :func:`lowbit.formats.compute_dtype` of the bucket's
dtype (float64 for a float64 model, float32 otherwise). The decoded average of a bfloat16
bucket is written into it with stochastic rounding (:func:`lowbit.storage.stochastic_round_bf16`,
the same noise on every rank, seeded by ``comm_noise_seed(seed, SHARED_RANK, t, i)``), so
it stays unbiased, and that second rounding adds its own variance, ``(a − lo)(hi − a)`` for
an average ``a`` between the bfloat16 neighbours ``lo`` and ``hi`` (:func:`quantized_mean`
returns the sum of both terms); a float16 bucket is rounded to nearest (biased by at most
half a float16 ulp: a ``UserWarning`` says so once). Sparse buckets are refused.

Formats: integer grids (:class:`lowbit.formats.IntFormat`, bits 2..8). A float format
(FP8) has a non-uniform grid, so its codes cannot be summed; it would plug in through
:func:`encode`/:func:`decode` with ``wire="allgather"``.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.
import hashlib
import json
import math
import os
import warnings
from dataclasses import InitVar, asdict, dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .userframe import user_stacklevel
from .formats import SUPPORTED_DTYPES, IntFormat, check_dense, compute_dtype, counter_uniform
from .noise import check_seed, comm_noise_seed
from .scalars import integer
from .storage import stochastic_round_bf16

WIRES = ("auto", "allreduce", "allgather")
GRAD_COMM_NAMES = ("fp32",) + tuple(f"int{b}" for b in range(2, 9))
DEFAULT_BLOCK = 256
SHARED_RANK = 2**32 - 1  # the noise key of what every rank must round alike (no real rank's)
_INT8_MAX = 127


@dataclass(frozen=True)
class GradComm:
    """How gradients travel: ``bits`` (2..8) of a symmetric integer grid, one scale per
    ``block`` elements of each parameter (``None``: per parameter), the ``wire``
    (``auto``, ``allreduce`` or ``allgather``, see the module doc) and the noise ``seed``."""

    bits: int = 8
    block: int | None = DEFAULT_BLOCK
    wire: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", IntFormat(self.bits).bits)  # validated, as an int
        if self.block is not None:
            block = integer(self.block)
            if block is None or block < 1:
                raise ValueError(f"block must be a positive integer or None, got {self.block!r}")
            object.__setattr__(self, "block", block)
        if self.wire not in WIRES:
            raise ValueError(f"wire must be one of {', '.join(WIRES)}, got {self.wire!r}")
        object.__setattr__(self, "seed", check_seed(self.seed))

    @property
    def format(self) -> IntFormat:
        return IntFormat(self.bits)

    @classmethod
    def from_name(cls, name: str, **kw) -> "GradComm | None":
        """``"int8"`` → ``GradComm(bits=8)``; ``"fp32"`` → ``None`` (DDP's own all-reduce)."""
        if name not in GRAD_COMM_NAMES:
            raise ValueError(f"grad_comm must be one of {', '.join(GRAD_COMM_NAMES)}, got {name!r}")
        return None if name == "fp32" else cls(bits=int(name[3:]), **kw)

    def wire_for(self, world: int) -> tuple[str, torch.dtype]:
        """The collective and the dtype it carries the codes in, for ``world`` ranks."""
        q = self.format.qmax
        fits8 = world * q <= _INT8_MAX
        if self.wire == "allgather" or (self.wire == "auto" and not fits8 and world < 8):
            return "allgather", torch.int8
        return "allreduce", torch.int8 if fits8 else torch.int32


def _blocks(g: torch.Tensor, block: int | None) -> torch.Tensor:
    """``g`` (flat) as ``(n_blocks, block)``, zero-padded at the end; a block longer than
    ``g`` is ``g`` itself (one block of ``n``: the same codes, no padding to ``block``)."""
    n = g.numel()
    b = max(min(block, n) if block else n, 1)
    nb = max(1, -(-n // b))
    return torch.nn.functional.pad(g, (0, nb * b - n)).view(nb, b)


def block_absmax(g: torch.Tensor, block: int | None) -> torch.Tensor:
    """Absmax of each block of the flat gradient ``g``: ``(n_blocks,)`` in
    :func:`~lowbit.formats.compute_dtype` of ``g`` (float64 for float64, else float32);
    NaN/Inf stay non-finite (``amax`` propagates NaN)."""
    return _blocks(g.to(compute_dtype(g.dtype)), block).abs().amax(dim=1)


def _scaled(g: torch.Tensor, absmax: torch.Tensor, fmt: IntFormat, block: int | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``y = g/step`` per block (``|y| ≤ Q``: :meth:`IntFormat.scale_from_absmax` rounds
    the step up where needed) and the step, ``(n_blocks, 1)`` (``1/Q`` for a zero block)."""
    step = fmt.scale_from_absmax(absmax)[:, None]
    return _blocks(g.to(absmax.dtype), block) / step, step


def encode(g: torch.Tensor, absmax: torch.Tensor, fmt: IntFormat, block: int | None,
           seed: int) -> torch.Tensor:
    """int8 codes (``g/step`` rounded stochastically) of the flat gradient ``g`` (``(n,)``) against the shared
    block absmax ``absmax`` (``(n_blocks,)``, all finite, ≥ each block's |g|); ``u`` is
    :func:`counter_uniform` noise of ``seed``. Returns ``(n,)`` int8."""
    y, _ = _scaled(g, absmax, fmt, block)
    u = counter_uniform(y.shape, torch.tensor(seed, dtype=torch.int64, device=g.device))
    low = torch.floor(y)
    q = low + (u < y - low).float()  # floor(y) + [u < frac(y)]: no rounding of y + u
    # |y| ≤ Q by the step's construction; the clamp only guards the int8 cast
    return q.clamp_(-fmt.qmax, fmt.qmax).to(torch.int8).flatten()[: g.numel()]


def decode(code_sum: torch.Tensor, absmax: torch.Tensor, fmt: IntFormat, block: int | None,
           world: int) -> torch.Tensor:
    """The average ``(step/N)·Σ_r c_r`` from the summed codes (``(n,)``, any integer
    dtype): ``(n,)`` in ``absmax``'s dtype. The step is divided first (exact for a
    power-of-two ``N`` unless ``step/N`` is subnormal, blocks of absmax below ≈ 1e-36 in
    float32, where it rounds once more), so ``|ĝ| ≤ step·Q``: finite wherever the gradients
    are, but for ±(largest value) itself, where ``step·Q`` (``step`` rounded up) may be one
    ulp past it (a review found ``step·Σc`` overflowing float32 before the division for
    |g| above ≈ 1.7e38)."""
    out = _blocks(code_sum.to(absmax.dtype), block) * (fmt.scale_from_absmax(absmax)[:, None] / world)
    return out.flatten()[: code_sum.numel()]


def into_dtype(avg: torch.Tensor, dtype: torch.dtype, seed: int, call: int, index: int) -> torch.Tensor:
    """The decoded average ``avg`` of parameter ``index`` (``call``-th communication) in
    the bucket's ``dtype``: bfloat16 by stochastic rounding with noise every rank draws
    alike (``comm_noise_seed(seed, SHARED_RANK, call, index)``), so ``E[ĝ] = ḡ`` still and
    the replicas stay equal; other dtypes by a plain cast."""
    if dtype != torch.bfloat16:
        return avg.to(dtype)
    gen = torch.Generator(device=avg.device).manual_seed(comm_noise_seed(seed, SHARED_RANK, call, index))
    return stochastic_round_bf16(avg, gen)  # noise drawn where the bucket lives


def bf16_rounding_variance(a: torch.Tensor) -> torch.Tensor:
    """Per element of the float32 tensor ``a``, the variance :func:`lowbit.storage.stochastic_round_bf16`
    adds when it writes ``a`` as bfloat16: ``(a − lo)(hi − a)`` with ``lo``, ``hi`` the
    bfloat16 neighbours of ``a`` (it rounds to ``hi`` with probability ``(a − lo)/(hi − lo)``).
    Float64, the shape of ``a``; 0 where ``a`` is on the bfloat16 grid, where ``hi`` is
    past the largest bfloat16 (saturated there: deterministic) and where ``a`` is not finite."""
    a = a.float()
    low = a.view(torch.int32) & ~0xFFFF  # the neighbour toward zero (the bits SR keeps)
    lo = low.view(torch.float32)
    hi = (low + 0x10000).view(torch.float32)  # the neighbour away from zero (±Inf at the top)
    var = (a.double() - lo.double()) * (hi.double() - a.double())  # ≥ 0 on either side of zero
    return torch.where(torch.isfinite(hi) & torch.isfinite(a), var, 0.0)


def _code_sum_distribution(ys: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution of the code sum ``Σ_r c_r`` per element, ``c_r`` = ``⌊y_r⌋`` or
    ``⌊y_r⌋ + 1`` with probability ``y_r − ⌊y_r⌋`` independently over ranks (the
    Poisson-binomial law of :func:`encode`'s codes): ``(Σ_r ⌊y_r⌋, P)`` with ``P[..., k]``
    the probability of ``Σ_r ⌊y_r⌋ + k``, ``k = 0..N`` (float64)."""
    base = torch.zeros_like(ys[0])
    probs = torch.ones(*ys[0].shape, 1, dtype=torch.float64, device=ys[0].device)
    for y in ys:
        low = torch.floor(y)
        base = base + low
        p = (y - low).double()[..., None]
        pad = torch.nn.functional.pad
        probs = pad(probs * (1 - p), (0, 1)) + pad(probs * p, (1, 0))
    return base, probs


def expected_variance(g: torch.Tensor, absmax: torch.Tensor, fmt: IntFormat,
                      block: int | None) -> float:
    """``Σ_i p_i(1 − p_i)·step_i²``: the variance one rank's stochastic rounding of ``g``
    adds (trace of the covariance; ``p`` the fractional part of ``g/step``), in float64.
    The averaged gradient's is ``(1/N²)·Σ_r`` of it."""
    y, step = _scaled(g, absmax, fmt, block)
    y, step = y.double(), step.double()
    p = y - torch.floor(y)
    return float((p * (1 - p) * step * step).sum())


def quantized_mean(grads: torch.Tensor, comm: GradComm, index: int, call: int
                   ) -> tuple[torch.Tensor, float]:
    """Reference of the hook for one parameter, without communication.

    ``grads``: ``(N, n)`` float, row ``r`` = rank ``r``'s flat gradient of parameter
    ``index`` at its ``call``-th communication. Returns the averaged gradient ``ĝ``
    (``(n,)``: float64 for float64 ``grads``, bfloat16 — stochastically rounded,
    :func:`into_dtype` — for bfloat16 ones, else float32; bitwise what
    :func:`quantized_allreduce_hook` writes into a bucket of that dtype — a float16 bucket
    gets this float32 result rounded to nearest — for a parameter whose memory is
    row-major: DDP's bucket keeps a channels-last weight's strides, and the hook cuts its
    blocks in memory order where ``grads`` are flattened in logical order, so such a
    parameter's blocks group other elements: as unbiased, another variance) and its
    expected variance ``E‖ĝ − ḡ‖²`` (a float, exact given ``grads``): ``(1/N²)·Σ_r Var Q(g_r)``
    (:func:`expected_variance`), plus, for bfloat16 ``grads``, the variance of the
    stochastic rounding of the decoded average ``a`` into bfloat16,
    ``E Σ_i (a_i − lo_i)(hi_i − a_i)`` (:func:`bf16_rounding_variance`), its expectation
    taken over the exact distribution of the code sums (a review measured the average of a
    bfloat16 bucket 6% noisier than the first term alone). The float32 result for float16
    ``grads`` has the first term only; the hook's rounding of it to nearest float16 adds a
    deterministic error of up to half a float16 ulp per element (a bias, not a variance).
    Non-finite input: the plain mean, variance NaN. ``TypeError`` unless ``grads`` is a
    tensor of a dtype the hook takes (``lowbit.formats.SUPPORTED_DTYPES``), ``RuntimeError``
    for a sparse or nested one, ``ValueError`` unless it is 2-D with at least one row (a review: a 1-D gradient raised
    an ATen padding error, a 3-D one was flattened, complex ones lost their imaginary part).
    """
    if not isinstance(grads, torch.Tensor) or grads.dtype not in SUPPORTED_DTYPES:
        raise TypeError("quantized_mean: grads must be a float32, float64, bfloat16 or float16 tensor, "
                        f"got {getattr(grads, 'dtype', type(grads).__name__)}")
    check_dense("quantized_mean", "grads", grads)  # a sparse one failed inside torch (a review)
    if grads.dim() != 2 or grads.shape[0] < 1:
        raise ValueError("quantized_mean: grads must be (N, n): one row per rank, each the rank's flat "
                         f"gradient of the parameter; got shape {tuple(grads.shape)}")
    world = grads.shape[0]
    fmt = comm.format
    absmax = torch.stack([block_absmax(g, comm.block) for g in grads]).amax(0)
    if not bool(torch.isfinite(absmax).all()):
        return (grads.to(compute_dtype(grads.dtype)) / world).sum(0), math.nan
    codes = [encode(g, absmax, fmt, comm.block, comm_noise_seed(comm.seed, r, call, index))
             for r, g in enumerate(grads)]
    total = torch.stack(codes).to(torch.int32).sum(0)
    var = sum(expected_variance(g, absmax, fmt, comm.block) for g in grads) / world**2
    avg = decode(total, absmax, fmt, comm.block, world)
    if grads.dtype != torch.bfloat16:
        return avg, var
    # the write into bfloat16 rounds again: its variance given the average a, (a − lo)(hi − a),
    # averaged over the N + 1 code sums each element's a can come from
    n = grads.shape[1]
    base, probs = _code_sum_distribution([_scaled(g, absmax, fmt, comm.block)[0] for g in grads])
    base, probs = base.flatten()[:n], probs.flatten(0, -2)[:n]
    for k in range(world + 1):
        a_k = decode((base + k).to(torch.int32), absmax, fmt, comm.block, world)
        var += float((probs[:, k] * bf16_rounding_variance(a_k)).sum())
    return into_dtype(avg, grads.dtype, comm.seed, call, index), var


def ring_bytes(numel: int, element_size: int, world: int, collective: str) -> float:
    """Bytes one rank sends for a ``numel``-element message: all-reduce
    ``2(N−1)/N·numel·size`` (ring), all-gather ``(N−1)·numel·size``."""
    if world <= 1:
        return 0.0
    per = numel * element_size
    return 2 * (world - 1) / world * per if collective == "allreduce" else (world - 1) * per


def code_bytes(comm: GradComm, numel: int, world: int) -> float:
    """Bytes one rank sends for the codes of ``numel`` elements (:meth:`GradComm.wire_for`)."""
    how, dtype = comm.wire_for(world)
    return ring_bytes(numel, dtype.itemsize if how == "allreduce" else 1, world, how)


def step_bytes(comm: GradComm | None, numels: list[int], world: int) -> float:
    """Bytes one rank sends per step for gradients of parameters of ``numels`` elements in
    one bucket: the fp32 all-reduce (``comm=None``) or the hook's MAX message (the ranks'
    agreement fingerprint and its negation, one float per block, the non-finite flag) and
    codes."""
    if comm is None:
        return ring_bytes(sum(numels), 4, world, "allreduce")
    blocks = sum(max(1, -(-n // (comm.block or max(n, 1)))) for n in numels)
    return ring_bytes(blocks + 3, 4, world, "allreduce") + code_bytes(comm, sum(numels), world)


@dataclass
class QuantizedCommState:
    """State of :func:`quantized_allreduce_hook`: the :class:`GradComm`, the process group
    the gradients are averaged over, each parameter's index and communication count, and
    byte counters (``bytes_sent`` by this rank; ``bytes_fp32``: what DDP's fp32 all-reduce
    of the same buckets sends; ``steps``: backward passes whose gradients were communicated
    — a pass under DDP's ``no_sync()`` is not one).

    ``process_group``: ``None`` takes the DDP model's ``process_group`` (the group its
    buckets are reduced over); given with a DDP model, it must be that model's group or
    one of the same ranks in the same order: ``ValueError`` naming both otherwise (a
    review found a DDP over a subgroup averaged over every rank of the job and divided by
    the job's size). A model that is not a
    ``DistributedDataParallel`` (its ``.module``, a plain model) needs ``process_group``
    where a job of several ranks runs (``ValueError``): its group cannot be read from it;
    in a single process (no process group yet) the default group is used at the hook."""

    model: InitVar[nn.Module]  # read once for the parameter order, not kept (see below)
    comm: GradComm
    process_group: dist.ProcessGroup | None = None
    index: dict[int, int] = field(init=False)
    calls: dict[int, int] = field(init=False)
    agreed: set[tuple[int, ...]] = field(init=False, repr=False)  # buckets (their parameters) the ranks agreed on
    bytes_sent: float = 0.0
    bytes_fp32: float = 0.0
    fallbacks: int = 0  # buckets sent as a plain all-reduce because a rank had a NaN/Inf
    steps: int = 0
    warned_fp16: bool = False  # the float16-bucket warning was given

    def __post_init__(self, model: nn.Module) -> None:
        # Not kept: DDP's C++ reducer holds this state, so a reference back to the DDP model
        # would form a cycle the garbage collector cannot see, leaking the model, its
        # gradient buckets and the process group until the interpreter's teardown.
        if not isinstance(self.comm, GradComm):
            raise TypeError(f"comm must be a GradComm, got {type(self.comm).__name__}")
        if _is_fsdp(model):  # its own collectives: no DDP comm hook to register (a review)
            raise TypeError(f"QuantizedCommState: {type(model).__name__} is an FSDP model; the quantized "
                            "all-reduce is a DistributedDataParallel comm hook (FSDP's reduce-scatter would "
                            "need a quantized set_custom_reduce_scatter, which lowbit does not have): wrap the "
                            "model in DDP, or train FSDP with its own communication")
        if isinstance(model, DistributedDataParallel):
            own = model.process_group
            if self.process_group is None:
                self.process_group = own
            elif not (_same_group(self.process_group, own)
                      or (given := _group_ranks(self.process_group)) is not None and given == _group_ranks(own)):
                # (a group of the same ranks averages alike: taken; a trial found it refused
                # as "other ranks")
                raise ValueError(f"QuantizedCommState: process_group {_group_name(self.process_group)} is "
                                 f"not the DDP model's process_group {_group_name(own)}: the hook would "
                                 "average over other ranks than DDP reduces its buckets over; leave "
                                 "process_group out (it defaults to the model's)")
        elif self.process_group is None and dist.is_available() and dist.is_initialized() \
                and dist.get_world_size() > 1:
            # the model's group cannot be read from a plain module: the default group would be
            # taken silently, wrong for a DDP over a subgroup (a review of the fix above)
            raise ValueError(f"QuantizedCommState: {type(model).__name__} is not a DistributedDataParallel "
                             "model, so its process group is unknown: build the state from the DDP model "
                             "(QuantizedCommState(ddp_model, comm)) or pass process_group= (the group "
                             "DDP reduces over, dist.group.WORLD for the whole job)")
        module = getattr(model, "module", model)  # DDP wraps the model
        for name, p in module.named_parameters():
            if p.requires_grad and p.dtype not in SUPPORTED_DTYPES:  # its bucket would be cast to real
                why = " (a complex one would lose its imaginary part)" if p.is_complex() else ""
                raise TypeError(f"QuantizedCommState: parameter {name!r} has dtype {p.dtype}; the quantized "
                                f"all-reduce carries float32, float64, bfloat16 or float16 gradients "
                                f"only{why}: use DDP's own all-reduce for this model")
        self.index = {id(p): i for i, (_, p) in enumerate(module.named_parameters())}
        self.calls = {}
        self.agreed = set()

    def state_dict(self) -> dict:
        """The counters (``calls`` per parameter index: the keys of the communication
        noise; every index, 0 for one never communicated, so that a load in place —
        ``torch.distributed.checkpoint.load`` into a fresh state's dict, which fills only the
        keys it holds — restores them all), with the ``comm`` settings and the number of
        ``parameters`` they belong to."""
        calls = {i: self.calls.get(i, 0) for i in range(len(self.index))}
        return {"calls": calls, "bytes_sent": self.bytes_sent,
                "bytes_fp32": self.bytes_fp32, "fallbacks": self.fallbacks, "steps": self.steps,
                "comm": asdict(self.comm), "parameters": len(self.index)}

    def load_state_dict(self, d: dict) -> None:
        """Restore :meth:`state_dict`. ``ValueError``, before anything changes, for a state
        of other ``comm`` settings, of another number of parameters, or counting calls of
        parameter indices this model does not have (a state from another model: its noise
        keys would be another model's). States saved before the settings were recorded
        are checked by their indices only."""
        if "comm" in d and d["comm"] != asdict(self.comm):
            raise ValueError(f"QuantizedCommState.load_state_dict: saved with comm {d['comm']}, this "
                             f"state has {asdict(self.comm)}")
        if "parameters" in d and int(d["parameters"]) != len(self.index):
            raise ValueError(f"QuantizedCommState.load_state_dict: saved for {d['parameters']} parameters, "
                             f"this model has {len(self.index)}")
        bad = sorted(int(k) for k in d["calls"] if not 0 <= int(k) < len(self.index))
        if bad:
            raise ValueError(f"QuantizedCommState.load_state_dict: calls of parameter indices {bad[:5]}, "
                             f"which this model (of {len(self.index)} parameters) does not have")
        def count(v: object, what: str) -> int:
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"QuantizedCommState.load_state_dict: {what} must be an integer ≥ 0, got {v!r}")
            return v

        try:  # every value read and checked before anything changes (a review: a missing key
            # failed after calls had been replaced; negative or fractional counters were taken)
            calls = {int(k): count(v, f"calls[{k}]") for k, v in d["calls"].items()}
            sent, fp32 = float(d["bytes_sent"]), float(d["bytes_fp32"])
            fallbacks, steps = count(d["fallbacks"], "fallbacks"), count(d["steps"], "steps")
        except KeyError as exc:
            raise ValueError(f"QuantizedCommState.load_state_dict: the state has no {exc.args[0]!r} "
                             "(not a QuantizedCommState.state_dict())") from None
        if steps > max(calls.values(), default=0):
            # each step advances some parameter's count to it: the counts were lost (a new
            # user's trial: a torch.distributed.checkpoint load into a fresh state's empty
            # calls; the noise then restarted at call 0, repeating earlier steps' draws)
            raise ValueError(f"QuantizedCommState.load_state_dict: steps={steps} but the largest of the "
                             f"calls counted is {max(calls.values(), default=0)}: the per-parameter counts "
                             "(the communication noise's keys) are missing or altered — a "
                             "torch.distributed.checkpoint load fills only the keys of the dict it loads "
                             "into; save and load the whole state_dict() of a state that has run "
                             "(or torch.save it per process). A state saved by lowbit before 2026-12-06 "
                             "under DDP's static_graph counted its first pass twice: set its 'steps' to the "
                             "largest count to load it")
        calls = {k: v for k, v in calls.items() if v}  # (0: never communicated, as absent)
        self.calls, self.bytes_sent, self.bytes_fp32 = calls, sent, fp32
        self.fallbacks, self.steps = fallbacks, steps


def _is_fsdp(model: nn.Module) -> bool:
    """Whether ``model`` is sharded by FSDP (FSDP2's ``fully_shard`` or FSDP1's wrapper)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - a torch without them
        return False
    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


def _fingerprint(*parts: object) -> float:
    """A number below 2²⁴ (exact in float32 and float64) identifying ``parts`` (JSON, a
    SHA-256 prefix); equal parts give equal numbers, unequal ones equal with chance 2⁻²⁴."""
    return float(int.from_bytes(hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()[:3],
                                "little"))  # < 2²⁴: exact in float32 and float64


def _disagree(bucket: dist.GradBucket, state: QuantizedCommState, idx: list[int], calls: list[int] | None
              ) -> RuntimeError:
    what = "settings" if calls is None else "settings or counters"
    counts = "" if calls is None else \
        f", the calls of its parameters {calls[:4]}{'…' if len(calls) > 4 else ''}"
    return RuntimeError(
        f"quantized_allreduce_hook: bucket {bucket.index()}: the ranks' hook {what} differ (this rank: "
        f"{asdict(state.comm)}, parameters {idx[:4]}{'…' if len(idx) > 4 else ''}{counts}): build GradComm "
        "alike and load the same QuantizedCommState.state_dict() on every rank")


def _agree(state: QuantizedCommState, bucket: dist.GradBucket, group: object, idx: list[int]) -> None:
    """``RuntimeError`` on every rank unless all ranks hold the same settings (bits, block,
    wire, seed) and parameters for this bucket, before the range message, whose size
    ``block`` decides (a review: another ``block`` on one rank made gloo abort the
    process). One 2-element MAX of a fingerprint ``h`` and ``−h``: both come back
    unchanged on every rank only where every rank sent the same ``h``. At a bucket's first
    call; the counters are checked at every call, in the range message
    (:func:`quantized_allreduce_hook`)."""
    h = _fingerprint(asdict(state.comm), idx)
    msg = torch.tensor([h, -h], dtype=torch.float64, device=bucket.buffer().device)
    # not counted in bytes_sent (16 bytes a bucket, once per process and state: a resumed
    # run sends it again; its bytes per step still differ from the uninterrupted run's by
    # the per-bucket floats of DDP's first-iteration layout, one bucket before the rebuild)
    dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=group)
    if msg[0] != h or msg[1] != -h:
        raise _disagree(bucket, state, idx, None)
    state.agreed.add(tuple(idx))


def _same_group(a: object, b: object) -> bool:
    """Whether two process-group handles are one group."""
    if a is b:
        return True
    name_a, name_b = getattr(a, "group_name", None), getattr(b, "group_name", None)
    return name_a is not None and name_a == name_b


def _group_ranks(group: object) -> list[int] | None:
    """A process group's global ranks, in its rank order; ``None`` where they cannot be read."""
    try:
        return dist.get_process_group_ranks(group)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _group_name(group: object) -> str:
    """A process group in words, for messages: its global ranks (and name)."""
    ranks = _group_ranks(group)
    name = getattr(group, "group_name", None)
    return f"(ranks {ranks}{f', name {name!r}' if name else ''})" if ranks is not None else repr(group)


def quantized_allreduce_hook(state: QuantizedCommState, bucket: dist.GradBucket
                             ) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the bucket's average, quantized with stochastic rounding
    (unbiased; see the module doc for the math, the wire and the noise rule).
    Register with ``ddp_model.register_comm_hook(state, quantized_allreduce_hook)``.
    Shaped like torch's ``default_hooks.allreduce_hook``: returns a future of the bucket
    buffer holding the averaged gradient (in the buffer's dtype)."""
    group = state.process_group or dist.group.WORLD  # the DDP model's (QuantizedCommState)
    world, rank = group.size(), dist.get_rank(group)  # in that group, not the job
    comm, fmt = state.comm, state.comm.format
    buf = bucket.buffer()
    if buf.layout != torch.strided:  # (the size check below passes for a sparse bucket)
        raise RuntimeError(f"bucket {bucket.index()}: a {buf.layout} gradient bucket (sparse gradients, e.g. "
                           "nn.Embedding(sparse=True)) cannot be quantized: use dense gradients or DDP's own "
                           "all-reduce")
    if buf.dtype not in SUPPORTED_DTYPES:  # a parameter's dtype changed after the state was built
        raise RuntimeError(f"bucket {bucket.index()}: a {buf.dtype} gradient bucket cannot be quantized "
                           "(float32, float64, bfloat16 or float16 gradients only): use DDP's own all-reduce")
    params = bucket.parameters()
    sizes = [p.numel() for p in params]
    if sum(sizes) != buf.numel():
        raise RuntimeError(f"bucket {bucket.index()}: {buf.numel()} elements but its "
                           f"parameters have {sum(sizes)} (sparse or padded buckets are not supported)")
    try:
        idx = [state.index[id(p)] for p in params]
    except KeyError:
        raise RuntimeError("a bucket holds a parameter the state does not know: build "
                           "QuantizedCommState from the model DDP wraps") from None
    calls = [state.calls.get(i, 0) for i in idx]
    # keyed by the bucket's parameters, not bucket.index(): under DDP(static_graph=True)
    # the first iteration calls every bucket with index 0 (a review: the second skipped
    # the check, and steps counted two passes)
    if tuple(idx) not in state.agreed:  # before any message whose size the settings decide
        _agree(state, bucket, group, idx)
    for i in idx:
        state.calls[i] = state.calls.get(i, 0) + 1
    # backward passes seen: each pass all-reduces every used parameter once
    state.steps = max(state.steps, max((state.calls[i] for i in idx), default=0))
    if buf.dtype == torch.float16 and not state.warned_fp16:
        state.warned_fp16 = True
        warnings.warn("quantized_allreduce_hook: a float16 gradient bucket gets the decoded average rounded "
                      "to nearest (biased by up to half a float16 ulp); float32 and bfloat16 buckets stay "
                      "unbiased", UserWarning, stacklevel=user_stacklevel())
    grads = list(buf.to(compute_dtype(buf.dtype)).split(sizes))
    absmax = [block_absmax(g, comm.block) for g in grads]
    local = torch.cat(absmax)
    bad = not bool(torch.isfinite(local).all())
    # MAX loses a NaN on the other rank (max(1, NaN) = 1): send the flag explicitly. In
    # front, a fingerprint h of the settings and this bucket's call counts, and −h: both
    # come back unchanged only where every rank sent the same (a review: a seed, or a state
    # loaded on one rank only, drifted the bfloat16 replicas apart; another bits decoded the
    # sum with another step)
    h = _fingerprint(asdict(comm), idx, calls)
    msg = torch.cat([torch.tensor([h, -h], dtype=local.dtype, device=local.device),
                     torch.where(torch.isfinite(local), local, 0.0),
                     torch.tensor([1.0 if bad else 0.0], dtype=local.dtype, device=local.device)])
    state.bytes_fp32 += ring_bytes(buf.numel(), 4, world, "allreduce")
    state.bytes_sent += ring_bytes(msg.numel(), msg.element_size(), world, "allreduce")
    # Every collective is issued here, on the thread DDP calls the hook from, bucket after
    # bucket: ranks then issue them in the same order (collectives are matched by order; a
    # second collective issued from a callback of the first races the next bucket's).
    dist.all_reduce(msg, op=dist.ReduceOp.MAX, group=group)  # tiny; blocks until shared
    if msg[0] != h or msg[1] != -h:
        raise _disagree(bucket, state, idx, calls)
    msg = msg[2:]
    if msg[-1] > 0:  # some rank has NaN/Inf: the plain all-reduce in the bucket's dtype, non-finite kept
        state.fallbacks += 1
        state.bytes_sent += ring_bytes(buf.numel(), buf.element_size(), world, "allreduce")
        buf.div_(world)
        return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda _: buf)
    shared = list(msg[:-1].split([a.numel() for a in absmax]))
    codes = torch.cat([encode(g, a, fmt, comm.block, comm_noise_seed(comm.seed, rank, c, i))
                       for g, a, c, i in zip(grads, shared, calls, idx)])
    state.bytes_sent += code_bytes(comm, codes.numel(), world)
    how, dtype = comm.wire_for(world)
    if how == "allgather":
        parts = [torch.empty_like(codes) for _ in range(world)]
        work = dist.all_gather(parts, codes, group=group, async_op=True)
    else:
        parts = [codes.to(dtype)]
        work = dist.all_reduce(parts[0], group=group, async_op=True)

    def decode_into_bucket(_: torch.futures.Future) -> torch.Tensor:
        total = torch.stack(parts).to(torch.int32).sum(0)  # exact: |Σ codes| ≤ N·Q
        buf.copy_(torch.cat([into_dtype(decode(t, a, fmt, comm.block, world), buf.dtype, comm.seed, c, i)
                             for t, a, c, i in zip(total.split(sizes), shared, calls, idx)]))
        return buf

    return work.get_future().then(decode_into_bucket)


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` as torchrun sets them (``(0, 1, 0)`` without)."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_process_group_from_env(device: torch.device | None = None) -> bool:
    """Initialise the default process group from torchrun's environment when
    ``WORLD_SIZE > 1``: NCCL for a CUDA ``device``, gloo otherwise. Returns whether this
    process is part of a multi-rank job."""
    _, world, _ = world_from_env()
    if world <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return True


__all__ = [
    "GRAD_COMM_NAMES",
    "GradComm",
    "QuantizedCommState",
    "bf16_rounding_variance",
    "block_absmax",
    "code_bytes",
    "comm_noise_seed",
    "decode",
    "encode",
    "expected_variance",
    "init_process_group_from_env",
    "quantized_allreduce_hook",
    "quantized_mean",
    "ring_bytes",
    "step_bytes",
    "world_from_env",
]
