"""Where every stochastic-rounding noise stream comes from: one rule, one module.

A converted layer owns a :class:`NoiseStream`. Every quantization call that rounds
stochastically (or draws random signs, like the Hadamard quantizer) seeds a fresh
``torch.Generator`` on the operand's device with a 64-bit **key**, and the quantizer draws
its noise from that generator alone. Keys follow one rule::

    base    = config.seed — or, when it is None, ONE draw from torch's global CPU RNG at
              conversion (``convert``: one draw for the whole model; ``from_float`` or a
              layer's constructor: one draw per layer)
    layer   = the layer's fully qualified name in the model given to ``convert`` (not the
              conversion order); ``from_float``/the constructor use ``name=""`` unless
              given one, so two identical conversions draw identical noise
    rank    = ``torch.distributed.get_rank()`` if the default process group is initialised
              when the stream is FIRST USED (its first quantization call), else 0 — and a
              stream first used before any process group existed (a warm-up step, a
              coverage trace) reads it again once one exists, so that ranks do not all
              keep rank 0's noise
    stream  = stream_seed(base, layer, rank) = mix(base, fnv1a64(layer), rank)

    backward call k of the layer (k = 0, 1, ...: the layer's counter, advanced once per
    backward call, never by the forward):
        key = mix(stream, path, k)         path ∈ {GRAD_INPUT = 3, GRAD_WEIGHT = 4}
    forward call with a stochastic-rounding forward spec:
        d   = ONE draw of 63 bits from torch's default CPU generator (as dropout draws)
        key = mix(stream, path, d)          path ∈ {ACTIVATION = 1, WEIGHT = 2}
    round-to-nearest forward (the default): no key, nothing drawn from any RNG.

Why the forward draws from the global RNG: recomputation (``torch.utils.checkpoint`` in
both modes, which saves and restores torch's CPU RNG state around the recomputed
forward; a step retried after ``torch.set_rng_state``) then sees the same noise as the
original forward, while the backward, which is never recomputed, runs on the layer's own
counter. So the same (seed, layer, rank, step) always gives the same stream, and streams
differ when any of them differ: ranks of a data-parallel job draw independent noise (the
averaged gradient then has 1/world_size the quantization variance of one rank's, instead
of the same noise summed coherently).

``mix(w₀, …, wₙ)``: ``h ← 0``; for each word ``h ← splitmix64(h ⊕ (w mod 2⁶⁴))``, where
``splitmix64`` is the finaliser of Steele, Lea & Flood, "Fast splittable pseudorandom
number generators" (OOPSLA 2014), the generator Java's ``SplittableRandom`` uses.
``fnv1a64`` is the 64-bit FNV-1a hash of the name's UTF-8 bytes (Fowler–Noll–Vo), stable
across processes and Python versions, unlike ``hash(str)``.

Inside one quantization call the noise is counter-based: :func:`draw_seed` takes one
32-bit seed from the call's generator and :func:`counter_uniform` turns (element index,
seed) into ``U[0, 1)`` values, so the reference path, a compiled kernel and another device
read the same noise whatever the memory layout.

**32 bits, not 64, reach the noise.** torch's CPU generator (mt19937) reads only the low
32 bits of a key (keys are ``splitmix64`` outputs, so those bits are well mixed), and
each call's seed is a 32-bit draw: two calls of a run draw the same noise with
probability about ``1/2³²`` per pair — over ``M`` backward calls of one layer path about
``M²/2³³`` such pairs (≈ 1 in a 100,000-step run), each a repeat of one call's errors
at one step, not a lasting correlation. "Streams differ when any of (seed, layer, rank,
step) differ" holds in that sense: different keys, equal noise only by a 32-bit chance.
"""

from __future__ import annotations

import enum
import threading
import warnings
from typing import Any

import torch
from .scalars import integer
from .userframe import user_stacklevel

_M64 = (1 << 64) - 1


class Path(enum.IntEnum):
    """Which operand of a layer's three GEMMs a key is for."""

    ACTIVATION = 1
    WEIGHT = 2
    GRAD_INPUT = 3
    GRAD_WEIGHT = 4


def splitmix64(x: int) -> int:
    """SplitMix64 of a 64-bit word (Steele, Lea & Flood 2014): add the golden-ratio
    increment, then the variant-13 finaliser. A bijection on ``[0, 2⁶⁴)``."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def mix(*words: int) -> int:
    """One 64-bit key from integer words (any sign; taken mod 2⁶⁴), order-sensitive:
    ``h ← splitmix64(h ⊕ w)`` from ``h = 0``."""
    h = 0
    for w in words:
        h = splitmix64(h ^ (int(w) & _M64))
    return h


def comm_noise_seed(seed: int, rank: int, call: int, index: int) -> int:
    """32-bit seed of rank ``rank``'s quantized-communication noise for parameter
    ``index`` at its ``call``-th communication (:mod:`lowbit.distributed`): the low 32
    bits of ``mix(seed, rank, call, index)`` — SplitMix64 chained over the four words."""
    return mix(seed, rank, call, index) & 0xFFFFFFFF


def fnv1a64(text: str) -> int:
    """64-bit FNV-1a hash of ``text``'s UTF-8 bytes (offset basis 0xcbf29ce484222325,
    prime 0x100000001b3)."""
    h = 0xCBF29CE484222325
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x100000001B3) & _M64
    return h


SEED_LIMIT = 1 << 64  # seeds are words of the 64-bit hash: [0, 2⁶⁴)


def check_seed(seed: object, what: str = "seed", limit: int = SEED_LIMIT) -> int:
    """``seed`` if it is an int in ``[0, limit)``, else raise: ``TypeError`` for a non-int
    (``bool`` included), ``ValueError`` naming ``what`` and the range otherwise. A seed
    outside the range would alias one inside it (the hash reads 64-bit words: ``2⁶⁴``
    and ``0``, ``-1`` and ``2⁶⁴ − 1`` gave the same noise; README fault kind 25)."""
    s = integer(seed)  # (a NumPy integer or a one-element integer tensor: as an int)
    if s is None:
        raise TypeError(f"{what} must be an int, got {seed!r}")
    if not 0 <= s < limit:
        raise ValueError(f"{what} must be in [0, 2**{limit.bit_length() - 1}), got {s}")
    return s


def torch_seed(seed: int) -> int:
    """``seed`` (an int ≥ 0) as the seed of a torch CPU generator: itself below ``2³²``,
    else ``mix(seed)`` folded to 32 bits. torch's CPU generator (mt19937) reads only a
    seed's low 32 bits, so seeds ``s`` and ``s + 2³²`` seeded the same stream — the same
    initial weights and data order for two runs reported as independent (a review);
    below ``2³²`` every seed gives what it gave before."""
    return seed if seed < 1 << 32 else mix(seed) & 0xFFFFFFFF


def stream_seed(base_seed: int, layer_name: str, rank: int = 0) -> int:
    """The seed of one layer's noise stream on one rank: ``mix(base_seed,
    fnv1a64(layer_name), rank)`` (module docstring). Same arguments → same stream; any
    argument different → an independent stream. ``base_seed``: ``FQTConfig.seed`` (or the
    one draw made at conversion); ``layer_name``: the fully qualified module name;
    ``rank``: the data-parallel rank (``torch.distributed.get_rank()``)."""
    if not isinstance(layer_name, str):
        raise TypeError(f"layer_name must be a str, got {type(layer_name).__name__}")
    return mix(base_seed, fnv1a64(layer_name), rank)


def _group_ready() -> bool:
    """Whether the default process group is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def current_rank() -> int:
    """``torch.distributed.get_rank()`` when the default process group is initialised,
    else 0."""
    return torch.distributed.get_rank() if _group_ready() else 0


def draw_base_seed() -> int:
    """One 62-bit draw from torch's global CPU RNG: the base seed when ``config.seed`` is
    None (so ``torch.manual_seed`` makes such runs reproducible)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def forward_draw() -> int:
    """One 63-bit draw from torch's default CPU generator: the per-call part of a
    stochastic-rounding forward's key (saved and restored by ``torch.utils.checkpoint``)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64).item())


def generator_for(key: int, device: torch.device | str) -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with the 64-bit ``key`` (the CPU
    generator reads its low 32 bits: module docstring)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(key & _M64)
    return gen


class NoiseStream:
    """The noise of one layer: ``(seed, name)`` fix the stream, ``counter`` counts its
    backward calls; the rank is read at the first quantization call (module docstring).

    ``seed``: int (the base seed); ``name``: str (the layer's fully qualified name).
    """

    def __init__(self, seed: int, name: str = "") -> None:
        seed = check_seed(seed)
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        self.seed, self.name, self.counter = seed, name, 0
        self._rank: int | None = None
        self._stream: int | None = None
        self._in_group = False  # the rank was read inside an initialised process group

    def _rebind(self) -> bool:
        """Whether the rank must be read (again): never read, or read before a process
        group existed and one exists now (a review found a step run before
        ``init_process_group`` leaving every rank on rank 0's noise)."""
        return self._rank is None or (not self._in_group and _group_ready())

    @property
    def rank(self) -> int:
        """The rank this stream is bound to (read at first use; again once a process
        group exists if it was first used before one did)."""
        if self._rebind():
            self._in_group = _group_ready()
            rank = current_rank()
            if rank != self._rank:
                self._stream = None
            self._rank = rank
        return self._rank  # type: ignore[return-value]

    def stream_seed(self) -> int:
        """:func:`stream_seed` of (seed, name, rank), computed once per rank binding."""
        if self._stream is None or self._rebind():
            rank = self.rank
            if self._stream is None:
                self._stream = stream_seed(self.seed, self.name, rank)
        return self._stream

    def key(self, path: Path, index: int) -> int:
        """``mix(stream, path, index)``: ``index`` is the counter value (backward paths)
        or the call's global draw (forward paths); the path tells the two apart."""
        return mix(self.stream_seed(), int(path), index)

    def forward_generators(self, device: torch.device, paths: tuple[Path, ...]
                           ) -> dict[Path, torch.Generator]:
        """Generators of one stochastic-rounding forward call (one global draw for all
        ``paths``); empty, and nothing drawn, when ``paths`` is empty."""
        if not paths:
            return {}
        index = forward_draw()
        return {p: generator_for(self.key(p, index), device) for p in paths}

    def backward_generators(self, device: torch.device, paths: tuple[Path, ...]
                            ) -> dict[Path, torch.Generator]:
        """Generators of one backward call; advances the counter by one (also when
        ``paths`` is empty, so a step's index does not depend on which paths ran).
        Warns (:class:`SharedNoiseWarning`) where another stream object with the same
        (seed, name, rank) drew in the same autograd backward pass."""
        k = self.counter
        self.counter += 1
        _note_use(self)
        return {p: generator_for(self.key(p, k), device) for p in paths}

    def state_dict(self) -> dict[str, Any]:
        """``{"seed", "name", "counter"}``: plain ints and a str (checkpoint-safe)."""
        return {"seed": self.seed, "name": self.name, "counter": self.counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"seed", "name", "counter"} - set(state)
        if missing:
            raise KeyError(f"noise state lacks {sorted(missing)}")
        seed, name, counter = state["seed"], state["name"], state["counter"]
        seed = check_seed(seed, "noise state seed")  # as NoiseStream(seed): no alias of another seed
        if not isinstance(name, str):
            raise TypeError(f"noise state name must be a str, got {type(name).__name__}")
        if isinstance(counter, bool) or not isinstance(counter, int) or counter < 0:
            raise ValueError(f"noise state counter must be a non-negative int, got {counter!r}")
        self.seed, self.name, self.counter = seed, name, counter
        self._rank = self._stream = None  # re-read at next use: a resumed job may run elsewhere
        self._in_group = False

    def __getstate__(self) -> dict[str, Any]:
        """A pickled (``torch.save`` of a whole model, ``broadcast_object_list``) or copied
        stream is bound again at its next use: unpickled on another rank it must draw that
        rank's noise (it drew the saving rank's: every rank the same noise)."""
        return self.__dict__ | {"_rank": None, "_stream": None, "_in_group": False}

    def __repr__(self) -> str:
        return f"NoiseStream(seed={self.seed}, name={self.name!r}, counter={self.counter})"


# -- the noise a kernel reads: counter-based, a pure function of (index, seed) ------------
_MASK32 = 0xFFFFFFFF


def counter_uniform(shape: torch.Size | tuple[int, ...], seed: torch.Tensor, first: int = 0) -> torch.Tensor:
    """``U[0,1)`` float32 noise as a pure function of (element index, ``seed``).

    A counter-based generator: element ``i`` (``first`` + its row-major index in ``shape``:
    ``first`` > 0 gives a part of a larger tensor's noise, the part starting at element
    ``first``) gets
    ``h((i·K mod 2³²) XOR seed)`` with ``h`` a two-round 32-bit integer mixer, keeping 24
    bits (the resolution of ``torch.rand`` in float32: the values ``k·2⁻²⁴``, so
    :func:`stochastic_round` is biased by less than 2⁻²⁴ of a grid step). Being
    a pure function of the index, the same noise comes out of the reference path, a
    compiled kernel or another device, whatever the memory layout. ``seed`` is a 0-d
    int64 tensor drawn from the layer's ``torch.Generator`` (:func:`draw_seed`).

    The seed enters by XOR, not by addition: with ``i·K + seed``, two calls whose seeds
    differ by ``j·K mod 2³²`` (probability about ``2n/2³²`` for a pair of calls of ``n``
    elements) drew the same noise shifted by ``j`` elements; with XOR the second call's
    index map ``i ↦ ((i·K) ⊕ d)·K⁻¹`` scatters over all ``2³²`` counters, so two calls
    share about ``n²/2³²`` noise values at unrelated positions, as any 32-bit generator.

    The counter is 32 bits: from element ``2³²`` on (an operand of more elements, or a
    part of one, ``first`` included: attention's ``∇S`` at 4096² per head passes it
    after 256 heads × batch entries), the seed is XORed with ``h(i >> 32)`` too, so that
    elements ``i`` and ``i + 2³²`` do not get the same noise (they did: a review).
    ``h(0) = 0``: every element below ``2³²`` — every operand the AVX-512 kernels take
    (:func:`lowbit.kernels.avx512.supports` refuses larger ones) — keeps its value.
    """
    n = 1
    for d in shape:
        n *= d
    idx = torch.arange(first, first + n, device=seed.device, dtype=torch.int64).view(shape)
    x = _mix32(((idx * 0x27D4EB2D) & _MASK32) ^ seed
               ^ (_mix32(idx >> 32) if first + n > 1 << 32 else 0))
    return (x >> 8).to(torch.float32) * (2.0**-24)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The two-round 32-bit integer mixer of :func:`counter_uniform` on int64 values in
    ``[0, 2³²)`` (0 maps to 0)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


def check_generator(generator: object, where: str) -> None:
    """``TypeError`` unless ``generator`` is a ``torch.Generator`` or ``None`` (a seed
    integer is not one: build ``torch.Generator().manual_seed(seed)``)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__} {generator!r}")


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """A fresh 32-bit seed (0-d int64 tensor on ``device``) from ``generator``
    (``None``: torch's global RNG). One draw per quantization call. ``TypeError`` when
    ``generator`` is neither (:func:`check_generator`)."""
    check_generator(generator, "draw_seed")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    seed = torch.randint(0, 2**32, (), generator=generator, device=gen_device, dtype=torch.int64)
    return seed.to(device)


class SharedNoiseWarning(UserWarning):
    """Two converted blocks drew the same rounding noise in one backward pass: their
    streams have the same (seed, name, rank) — typically blocks converted by separate
    ``lowbit.convert`` calls with one explicit seed (names are relative to each call's
    root). Their quantization errors are then identical, not independent."""


# stream seed -> (torch's graph task id, id of the NoiseStream) of its last backward draw;
# pruned to the current task's entries when it passes _LAST_USE_MAX (a nested task — a
# reentrant checkpoint, autograd.grad in a hook — keeps the outer pass's entries)
_LAST_USE: dict[int, tuple[int, int]] = {}
_LAST_USE_MAX = 4096
_WARNED: set[int] = set()
_USE_LOCK = threading.Lock()  # two threads' backward passes: the pruning walked the dict another one changed


def _note_use(stream: NoiseStream) -> None:
    """:class:`SharedNoiseWarning`, once per stream, where a different stream object with
    the same stream seed drew in the current backward pass (``torch``'s graph task id; a
    model and its copy backwarded in separate passes — an A/B comparison — do not warn;
    nor do two streams whose draws fall in different passes, as one inside a reentrant
    checkpoint and one outside)."""
    task = torch._C._current_graph_task_id()
    if task < 0:  # not inside an autograd backward (a direct call)
        return
    key = stream.stream_seed()
    with _USE_LOCK:
        if len(_LAST_USE) >= _LAST_USE_MAX:  # bounded: one functional call makes one stream
            for k in [k for k, (t, _) in _LAST_USE.items() if t != task]:
                del _LAST_USE[k]
        prev = _LAST_USE.get(key)
        _LAST_USE[key] = (task, id(stream))
        shared = prev is not None and prev[0] == task and prev[1] != id(stream) and key not in _WARNED
        if shared:
            _WARNED.add(key)
    if shared:
        warnings.warn(
            f"two converted layers drew the same rounding noise in one backward pass: both have the "
            f"noise stream (seed {stream.seed}, name {stream.name!r}). Layers converted by separate "
            "lowbit.convert calls with one seed get names relative to each call's root; convert the "
            "parent model once, or give each call its own seed (FQTConfig(seed=...))",
            SharedNoiseWarning, stacklevel=user_stacklevel())


__all__ = ["SEED_LIMIT", "NoiseStream", "SharedNoiseWarning", "Path", "check_generator", "check_seed", "comm_noise_seed", "counter_uniform", "current_rank", "draw_base_seed", "draw_seed",
           "fnv1a64", "forward_draw", "generator_for", "mix", "splitmix64", "stream_seed", "torch_seed"]
