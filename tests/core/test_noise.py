"""One rule for every noise stream (lowbit.noise): the same (seed, layer, rank, step) gives
the same stream, anything else an independent one; recomputation (activation
checkpointing) sees the noise of the original forward; round-to-nearest forwards draw
nothing from torch's RNG; checkpoints restore the streams bitwise."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lowbit
from lowbit import FQTConfig, FQTConv2d, FQTLinear, OperandSpec
from lowbit import noise as N


def sr_forward(recipe: str = "fqt-psq-4", seed: int | None = 0) -> FQTConfig:
    """A recipe whose forward operands are rounded stochastically too."""
    cfg = FQTConfig.from_recipe(recipe, seed=seed)
    return dataclasses.replace(cfg, activation=OperandSpec(8, rounding="stochastic"),
                               weight=OperandSpec(8, rounding="stochastic"))


def layer_grads(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = layer(xi)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return [xi.grad] + [p.grad for p in layer.parameters()]


def equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


# -- the mixer and the hash are the published ones ----------------------------------------
def test_splitmix64_and_fnv1a64_match_published_vectors() -> None:
    golden = 0x9E3779B97F4A7C15
    # SplitMix64 seeded with 0: its first three outputs (Vigna's reference splitmix64.c)
    assert [N.splitmix64(k * golden % 2**64) for k in range(3)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    # FNV-1a 64 test vectors (Fowler/Noll/Vo reference: "", "a", "foobar")
    assert [N.fnv1a64(s) for s in ("", "a", "foobar")] == [
        0xCBF29CE484222325, 0xAF63DC4C8601EC8C, 0x85944171F73967E8]


def test_stream_seed_is_the_documented_mix() -> None:
    assert N.stream_seed(7, "blocks.0.fc", 3) == N.mix(7, N.fnv1a64("blocks.0.fc"), 3)
    seeds = {N.stream_seed(s, n, r) for s in (0, 1) for n in ("a", "b") for r in (0, 1)}
    assert len(seeds) == 8  # any argument different: a different stream
    assert N.mix(-1) == N.mix(2**64 - 1)  # words are taken mod 2⁶⁴
    with pytest.raises(TypeError, match="layer_name must be a str"):
        N.stream_seed(0, 3, 0)  # type: ignore[arg-type]


# -- item 8: from_float honours config.seed; the layer's name keys the stream ---------------
def test_from_float_uses_config_seed_and_draws_nothing_from_the_global_rng() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(32, 16)
    cfg = FQTConfig.from_recipe("fqt-psq-4", seed=0)
    before = torch.get_rng_state()
    a = FQTLinear.from_float(copy.deepcopy(lin), cfg)
    b = FQTLinear.from_float(copy.deepcopy(lin), cfg)
    assert torch.equal(torch.get_rng_state(), before)
    assert a.seed == b.seed == 0
    assert equal(layer_grads(a, x), layer_grads(b, x))  # two identical conversions, same noise
    c = FQTLinear.from_float(copy.deepcopy(lin), FQTConfig.from_recipe("fqt-psq-4", seed=1))
    assert not equal(layer_grads(a, x), layer_grads(c, x))


def test_seed_none_is_one_global_draw_so_manual_seed_reproduces() -> None:
    cfg = FQTConfig.from_recipe("fqt-psq-4")  # seed=None

    def seeds() -> list[int]:
        m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        torch.manual_seed(3)
        lowbit.convert(m, cfg)
        return [m[0].seed, m[1].seed]

    s = seeds()
    assert s == seeds() and s[0] == s[1]  # one draw for the whole model
    torch.manual_seed(3)
    assert s[0] == int(torch.randint(0, 2**62, (1,)).item())


def test_convert_keys_streams_by_name_not_by_conversion_order() -> None:
    def model(extra_first: bool) -> nn.Module:
        torch.manual_seed(0)
        m = nn.Module()
        if extra_first:
            m.extra = nn.Linear(8, 8)
        m.enc = nn.Linear(8, 8)
        m.dec = nn.Linear(8, 8)
        return lowbit.convert(m, FQTConfig.from_recipe("fqt-bhq-4", seed=5))

    a, b = model(False), model(True)
    x = torch.randn(16, 8)
    b.enc.load_state_dict(a.enc.state_dict())
    assert a.enc.noise.name == "enc" and a.enc.noise.stream_seed() == b.enc.noise.stream_seed()
    assert equal(layer_grads(a.enc, x), layer_grads(b.enc, x))  # an extra layer changes nothing
    assert a.enc.noise.stream_seed() != a.dec.noise.stream_seed()


# -- ranks: independent noise, rank read at first use --------------------------------------
def test_ranks_draw_independent_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    x = torch.randn(256, 64)
    ref = FQTLinear.from_float(copy.deepcopy(lin), FQTConfig.from_recipe("qat-8"))
    g_qat = layer_grads(ref, x)[1]  # the QAT gradient the FQT noise is added to
    cfg = FQTConfig.from_recipe("fqt-ptq-4", seed=0)
    errors = []
    for rank in (0, 1, 1):
        layer = FQTLinear.from_float(copy.deepcopy(lin), cfg)  # built before the rank is known
        monkeypatch.setattr(N, "current_rank", lambda r=rank: r)
        errors.append((layer_grads(layer, x)[1] - g_qat).flatten().double())
        assert layer.noise.rank == rank  # read at the first quantization call
    n = errors[0].numel()
    corr = float(torch.corrcoef(torch.stack(errors[:2]))[0, 1])
    # independent noises: the sample correlation of n pairs has standard error ≈ 1/√n;
    # 5 standard errors. (The same noise on both ranks, the old behaviour, gives 1.)
    assert abs(corr) < 5 / n**0.5
    assert torch.equal(errors[1], errors[2])  # same rank, same seed and name: same noise


def test_a_pickled_layer_draws_the_loading_ranks_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model saved whole (``torch.save``) by rank 0 inside a process group and loaded on
    rank 1 kept rank 0's binding (``_in_group`` set, never read again): every rank drew
    the same noise. An unpickled or copied stream is bound again at its next use."""
    import pickle
    torch.manual_seed(0)
    lin, x = nn.Linear(16, 8), torch.randn(32, 16)
    cfg = FQTConfig.from_recipe("fqt-ptq-4", seed=0)
    monkeypatch.setattr(N, "_group_ready", lambda: True)  # as inside init_process_group
    monkeypatch.setattr(N, "current_rank", lambda: 0)
    saved = FQTLinear.from_float(copy.deepcopy(lin), cfg)
    layer_grads(saved, x)  # binds to rank 0
    blob = pickle.dumps(saved)
    monkeypatch.setattr(N, "current_rank", lambda: 1)  # the loading process
    loaded, fresh = pickle.loads(blob), FQTLinear.from_float(copy.deepcopy(lin), cfg)
    layer_grads(fresh, x)  # the same counter as the loaded layer's
    assert loaded.noise.rank == 1
    assert equal(layer_grads(loaded, x), layer_grads(fresh, x))  # rank 1's noise, not rank 0's


# -- the counter: one step per backward, never advanced by a forward ------------------------
def test_same_step_same_noise_and_forward_does_not_advance_the_counter() -> None:
    torch.manual_seed(0)
    layer = FQTLinear.from_float(nn.Linear(16, 8), FQTConfig.from_recipe("fqt-hadamard-4", seed=2))
    x = torch.randn(32, 16)
    with torch.no_grad():
        layer(x)  # forward only (evaluation): no step taken
    assert layer.noise.counter == 0
    state = lowbit.rng_state(nn.Sequential(layer))
    g0 = layer_grads(layer, x)
    assert layer.noise.counter == 1
    g1 = layer_grads(layer, x)
    assert not equal(g0, g1)  # step 1 ≠ step 0
    lowbit.load_rng_state(nn.Sequential(layer), state)
    assert equal(layer_grads(layer, x), g0)  # step 0 again: bitwise the same


def test_rng_state_is_plain_data_and_round_trips() -> None:
    m = lowbit.convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)),
                       FQTConfig.from_recipe("fqt-psq-4", seed=9))
    layer_grads(m, torch.randn(3, 4))
    state = lowbit.rng_state(m)
    assert state == {"0": {"seed": 9, "name": "0", "counter": 1},
                     "2": {"seed": 9, "name": "2", "counter": 1}}
    with pytest.raises(KeyError, match="noise state lacks"):
        lowbit.load_rng_state(m, {"0": {"seed": 9}, "2": state["2"]})
    # a state without some of the model's layers would leave them on their current noise
    for partial in ({"0": state["0"]}, {}):
        with pytest.raises(KeyError, match=r"rng state lacks \d of this model's layers: \['"):
            lowbit.load_rng_state(m, partial)
    with pytest.raises(KeyError, match="names layers this model does not have"):
        lowbit.load_rng_state(m, {**state, "9": state["0"]})
    lowbit.load_rng_state(m, state)
    assert lowbit.rng_state(m) == state


def test_deepcopy_has_its_own_state_and_the_same_noise() -> None:
    torch.manual_seed(0)
    m = lowbit.convert(nn.Sequential(nn.Linear(8, 8)), FQTConfig.from_recipe("fqt-psq-4", seed=1))
    c = copy.deepcopy(m)
    assert not torch.equal(c[0]._block.ident, m[0]._block.ident)
    x = torch.randn(4, 8)
    assert equal(layer_grads(c, x), layer_grads(m, x))
    assert m[0].noise.counter == 1 and c[0].noise.counter == 1  # each advanced its own


# -- item 5: recomputation sees the same noise -----------------------------------------------
def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, dilation=2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 10))


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("recipe", ["fqt-psq-4", "fqt-hadamard-4"])
def test_activation_checkpointing_gives_bitwise_equal_gradients(use_reentrant: bool, recipe: str) -> None:
    x = torch.randn(4, 3, 8, 8)

    def grads(ckpt: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        m = lowbit.convert(cnn(), sr_forward(recipe))
        assert {type(v) for v in lowbit.fqt_layers(m).values()} == {FQTConv2d, FQTLinear}
        torch.manual_seed(1)
        xi = x.clone().requires_grad_()
        y = checkpoint(m, xi, use_reentrant=use_reentrant) if ckpt else m(xi)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        return [y.detach(), xi.grad] + [p.grad for p in m.parameters()]

    assert equal(grads(True), grads(False))


def test_forward_noise_comes_from_one_global_draw_per_call() -> None:
    torch.manual_seed(0)
    layer = FQTLinear.from_float(nn.Linear(16, 8), sr_forward())
    x = torch.randn(32, 16)
    torch.manual_seed(4)
    y1 = layer(x)
    after = torch.get_rng_state()
    torch.manual_seed(4)
    torch.randint(0, 2**63 - 1, (), dtype=torch.int64)  # the one draw the rule documents
    assert torch.equal(torch.get_rng_state(), after)
    torch.manual_seed(4)
    assert torch.equal(layer(x), y1)  # same global state: same forward noise
    assert not torch.equal(layer(x), y1)  # next draw: new noise


def test_round_to_nearest_draws_nothing_from_torch_rng() -> None:
    torch.manual_seed(0)
    m = lowbit.convert(cnn(), FQTConfig.from_recipe("fqt-hadamard-4", seed=0))
    x = torch.randn(2, 3, 8, 8)
    before = torch.get_rng_state()
    layer_grads(m, x)
    assert torch.equal(torch.get_rng_state(), before)


def test_functional_api_takes_a_state_or_a_config() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(5, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True), torch.randn(4)
    cfg = FQTConfig.from_recipe("fqt-psq-8", seed=3)
    state = lowbit.ops.BlockState(cfg, N.NoiseStream(3))
    y1 = lowbit.fqt_linear(x, w, b, cfg)
    y2 = lowbit.fqt_linear(x, w, b, state)
    assert torch.equal(y1, y2)
    y1.sum().backward()
    g1 = x.grad.clone()
    x.grad = None
    y2.sum().backward()
    assert torch.equal(x.grad, g1)  # a fresh stream per call with a bare config: step 0 both
    assert state.noise.counter == 1
    with pytest.raises(TypeError, match=r"state must be a BlockState or an FQTConfig, got str \(a recipe "
                                        r"name: lowbit.FQTConfig.from_recipe\('fqt-psq-8'\)\)"):
        lowbit.fqt_linear(x, w, b, "fqt-psq-8")  # type: ignore[arg-type]


# -- seeds outside [0, 2⁶⁴) are refused, never aliased (fault kind 25) ----------------------
BAD_SEEDS = [(-1, ValueError), (2**64, ValueError), (-(2**64) + 5, ValueError), (True, TypeError),
             (1.0, TypeError), ("3", TypeError)]


@pytest.mark.parametrize("seed,error", BAD_SEEDS, ids=lambda v: repr(v))
def test_every_seed_entry_point_refuses_a_seed_outside_its_range(seed: object, error: type) -> None:
    """Each place a user hands lowbit a seed raises, naming it, instead of reducing it
    mod 2⁶⁴ (``seed=2**64`` gave seed 0's noise, ``-1`` gave ``2**64 - 1``'s)."""
    from lowbit.distributed import GradComm

    entry_points = [lambda: FQTConfig.from_recipe("fqt-psq-4", seed=seed),
                    lambda: FQTLinear(4, 4, config=FQTConfig.from_recipe("fqt-psq-4"), seed=seed),
                    lambda: N.NoiseStream(seed, "layer"),
                    lambda: GradComm(bits=8, seed=seed),
                    lambda: lowbit.functional.fqt_linear(torch.randn(2, 3), torch.randn(4, 3), None,
                                                         FQTConfig.from_recipe("fqt-psq-4", seed=seed)),
                    # a loaded state too (a review: 2**64 + 5 and 5.9 drew seed 5's noise)
                    lambda: N.NoiseStream(0, "layer").load_state_dict({"seed": seed, "name": "layer",
                                                                       "counter": 0})]
    for make in entry_points:
        with pytest.raises(error, match="seed"):
            make()


def test_a_loaded_noise_state_refuses_a_bad_counter_or_name() -> None:
    stream = N.NoiseStream(1, "layer")
    for bad, error in (({"counter": -3}, ValueError), ({"counter": 2.5}, ValueError),
                       ({"counter": True}, ValueError), ({"name": 7}, TypeError)):
        with pytest.raises(error, match="noise state"):
            stream.load_state_dict({"seed": 1, "name": "layer", "counter": 0} | bad)
    assert stream.state_dict() == {"seed": 1, "name": "layer", "counter": 0}  # left as it was


def _old_counter_uniform(n: int, seed: int, first: int) -> torch.Tensor:
    """The 32-bit counter formula as it stood before element 2³² got its own salt."""
    x = torch.arange(first, first + n, dtype=torch.int64)
    x = ((x * 0x27D4EB2D) & 0xFFFFFFFF) ^ seed
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0xFFFFFFFF
    return (((x >> 16) ^ x) >> 8).to(torch.float32) * 2.0**-24


def test_counter_noise_does_not_repeat_after_2_to_the_32_elements() -> None:
    """Elements ``i`` and ``i + 2³²`` of one operand got the same noise (a review: at
    attention's 4096² ∇S entries ``e`` and ``e + 256`` of a batch × heads); elements
    below ``2³²`` keep their values (every operand the AVX-512 kernels take)."""
    seed = torch.tensor(123456789, dtype=torch.int64)
    below = N.counter_uniform((8,), seed, 0)
    assert torch.equal(below, _old_counter_uniform(8, 123456789, 0))
    across = N.counter_uniform((8,), seed, 2**32 - 4)  # straddles the period
    assert torch.equal(across[:4], _old_counter_uniform(4, 123456789, 2**32 - 4))
    assert not torch.equal(across[4:], below[:4])
    assert not torch.equal(N.counter_uniform((8,), seed, 2**32), below)
    # the batched pair (attention's ∇S in pieces) at entry `wrap` against entry 0
    from lowbit.formats import Granularity, Rounding, parse_format
    from lowbit.gradpair import quantize_batched_pair
    from lowbit.kernels import avx512

    fmt, g = parse_format("int4"), torch.randn(1, 256, 256, generator=torch.Generator().manual_seed(0))
    args = (fmt, Granularity.ROW, Rounding.STOCHASTIC, torch.tensor(1111), fmt, Granularity.ROW,
            Rounding.STOCHASTIC, torch.tensor(2222))
    wrap = 2**32 // (256 * 256)
    assert not avx512.supports_batched_pair(g, *args, first=wrap)  # the C kernel counts in 32 bits
    r0, r1 = quantize_batched_pair(g, *args, first=0), quantize_batched_pair(g, *args, first=wrap)
    assert not torch.equal(r0[0], r1[0]) and not torch.equal(r0[4], r1[4])  # ∇X and ∇W codes


def test_torch_seeds_keep_the_bits_torchs_generator_drops() -> None:
    """torch's CPU generator reads a seed's low 32 bits: trainer seeds 3 and 3 + 2³² gave
    the same initial weights and data order (a review). ``torch_seed`` folds seeds from
    2³² on and leaves smaller ones as they were."""
    from lowbit.experiments.trainer import epoch_seed

    assert [N.torch_seed(s) for s in (0, 3, 2**32 - 1)] == [0, 3, 2**32 - 1]
    assert N.torch_seed(3 + 2**32) != 3 and 0 <= N.torch_seed(2**63 + 3) < 2**32
    draw = lambda s: torch.rand(4, generator=torch.Generator().manual_seed(s))  # noqa: E731
    assert not torch.equal(draw(N.torch_seed(3)), draw(N.torch_seed(3 + 2**32)))
    assert not torch.equal(draw(epoch_seed(3, 0)), draw(epoch_seed(3 + 2**32, 0)))
    assert epoch_seed(3, 1) == (3 * 1_000_003 + 7_919 + 17)  # small seeds: as before


def test_seed_range_ends_are_accepted_and_distinct() -> None:
    """0 and 2⁶⁴ − 1 are valid seeds with different noise (they are different words)."""
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    grads = []
    for seed in (0, 2**64 - 1):
        torch.manual_seed(0)
        layer = FQTLinear(16, 16, config=FQTConfig.from_recipe("fqt-psq-4", seed=seed))
        grads.append(layer_grads(layer, x)[1])
    assert not torch.equal(grads[0], grads[1])



def test_comm_noise_seed_is_the_chained_splitmix64_of_its_words() -> None:
    """The communication noise seed is ``mix(seed, rank, call, index)`` mod 2³² — written
    out here as the chain it was defined by, so moving it into lowbit.noise kept every
    value (a resumed DDP run draws the same communication noise)."""
    from lowbit.distributed import comm_noise_seed

    for seed, rank, call, index in ((0, 0, 0, 0), (7, 1, 3, 12), (2**64 - 1, 5, 2**40, 999)):
        h = N.splitmix64(seed)
        for v in (rank, call, index):
            h = N.splitmix64(h ^ v)
        assert comm_noise_seed(seed, rank, call, index) == N.comm_noise_seed(seed, rank, call, index) \
            == h & 0xFFFFFFFF


def test_blocks_converted_apart_with_one_seed_warn_of_shared_noise() -> None:
    """Blocks converted by separate ``convert`` calls with one explicit seed get the same
    stream names ('0' in each), so identical rounding noise: a ``SharedNoiseWarning`` at
    the first backward pass they share. A model and its copy backwarded in separate
    passes (an A/B comparison on one stream) do not warn."""
    import copy
    import warnings

    from lowbit.noise import SharedNoiseWarning
    cfg = lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=11)
    blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(2)])
    for b in blocks:
        lowbit.convert(b, cfg)
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.warns(SharedNoiseWarning, match=r"noise stream \(seed 11, name '0'\)"):
        blocks[1](blocks[0](x)).sum().backward()
    model = lowbit.convert(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)),
                           lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=12))
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SharedNoiseWarning)
        for m in (model, twin, model):
            m(x).sum().backward()


def test_the_shared_noise_registry_holds_one_backward_pass() -> None:
    """The registry behind ``SharedNoiseWarning`` stays bounded: functional calls (a new
    stream each) past its limit leave the current pass's entries only."""
    from lowbit import noise
    from lowbit.functional import fqt_linear
    cfg = lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0)
    w = torch.randn(3, 4)
    old, noise._LAST_USE_MAX = noise._LAST_USE_MAX, 50
    try:
        for _ in range(200):
            fqt_linear(torch.randn(2, 4, requires_grad=True), w, None, cfg).sum().backward()
        assert len(noise._LAST_USE) <= 50
    finally:
        noise._LAST_USE_MAX = old


def test_shared_noise_is_seen_across_a_reentrant_checkpoint() -> None:
    """Two same-stream layers outside a reentrant checkpoint (a nested graph task between
    their draws) still warn."""
    import copy

    from torch.utils.checkpoint import checkpoint

    from lowbit.noise import SharedNoiseWarning
    a = lowbit.convert(torch.nn.Linear(8, 8), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=21))
    b, c = copy.deepcopy(a), lowbit.convert(torch.nn.Linear(8, 8), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=22))
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.warns(SharedNoiseWarning, match="seed 21"):
        b(checkpoint(c, a(x), use_reentrant=True)).sum().backward()
