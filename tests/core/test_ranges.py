"""Predicted gradient ranges: the fixed-grid kernel, the tracker's history and
prediction, overflow handling (clip is counted and biased, requantize stays unbiased),
layers, config and the checkpointed state."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from conftest import assert_unbiased
from torch import nn

import lowbit
from lowbit import FQTConfig, GradSpec
from lowbit.formats import IntFormat, Rounding
from lowbit.kernels import Backend, compiled, kernels_for, reference
from lowbit.quantizers import get_quantizer
from lowbit.ranges import Overflow, RangeMode, RangeStats, RangeTracker


def _seed(s: int) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.int64)


def _fixed(x: torch.Tensor, amax: torch.Tensor, bits: int, stochastic: bool, seed: torch.Tensor,
           kernel=reference.quantize_fixed) -> tuple:  # noqa: ANN001
    """``(codes, step, observed, clipped count, clipped Σ², Σ x²)`` on ``int{bits}``."""
    return kernel(x, amax, IntFormat(bits), Rounding.STOCHASTIC if stochastic else Rounding.NEAREST, seed)


# -- the fixed-grid kernel ----------------------------------------------------------------
def test_fixed_grid_counts_and_clips_exactly() -> None:
    x = torch.tensor([[0.5, -3.0, 1.0], [2.5, 0.0, -0.25]])
    amax = torch.tensor([[1.0], [2.0]])
    codes, step, obs, n_over, clip_sq, tot_sq = _fixed(x, amax, 4, False, _seed(0))
    assert torch.equal(step, amax / 7)
    assert torch.equal(obs, torch.tensor([[3.0], [2.5]]))
    assert int(n_over) == 2  # -3 beyond 1, 2.5 beyond 2
    assert float(clip_sq) == pytest.approx(2.0**2 + 0.5**2)
    assert float(tot_sq) == pytest.approx(float((x * x).sum()))
    # clipped to ±qmax, rest round-to-nearest of x/step: 0.5/fl(1/7) = 3.4999998 → 3
    assert codes.tolist() == [[3, -7, 7], [7, 0, -1]]


def test_fixed_grid_compiled_equals_reference() -> None:
    if not compiled.enabled():
        pytest.skip("torch.compile disabled (LOWBIT_COMPILE=0)")
    x = torch.randn(256, 160) * torch.logspace(-3, 3, 256)[:, None]
    amax = x.abs().amax(1, keepdim=True) * torch.rand(256, 1).add(0.6)  # some rows overflow
    ref = _fixed(x, amax, 8, True, _seed(3))
    fast = _fixed(x, amax, 8, True, _seed(3),
                  lambda *a: compiled.run("quantize_fixed", reference.quantize_fixed, *a))
    assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1]) and int(ref[3]) == int(fast[3])
    torch.testing.assert_close(ref[4], fast[4], rtol=1e-4, atol=0)


def test_fixed_grid_in_range_is_unbiased() -> None:
    x = torch.randn(8, 16)
    amax = torch.full((1, 1), 4.0 * float(x.abs().max()))  # a generous range: nothing clipped
    draws = []
    for s in range(1500):
        codes, step, *_ = _fixed(x, amax, 4, True, _seed(s))
        draws.append(codes.float() * step)
    assert_unbiased(torch.stack(draws), x)  # 5σ z-test over 1500 draws (conftest)


def test_fixed_grid_propagates_nan_and_empty() -> None:
    x = torch.tensor([[1.0, float("nan")], [0.5, 0.25]])
    k = kernels_for(Backend.AUTO, "cpu")  # the dispatcher's path, empty tensors included
    enc, *_ = k.quantize_fixed(x, torch.ones(2, 1), IntFormat(4), Rounding.STOCHASTIC, _seed(0))
    assert torch.isnan(enc.scale[0, 0]) and torch.isfinite(enc.scale[1, 0])
    enc, _, n_over, *_ = k.quantize_fixed(torch.zeros(0, 3), torch.ones(1, 1), IntFormat(4),
                                          Rounding.STOCHASTIC, _seed(0))
    assert enc.codes.shape == (0, 3) and int(n_over) == 0


# -- the tracker ------------------------------------------------------------------------
def test_tracker_predicts_margin_times_recent_max() -> None:
    t = RangeTracker(history=3, margin=2.0, per_row=True, overflow=Overflow.CLIP)
    assert t.predict() is None
    for v in ([1.0, 0.0], [4.0, 0.0], [2.0, 0.0]):
        t.record(torch.tensor(v).reshape(2, 1))
    # row 1 never had a range: it borrows the largest row's
    assert t.predict().flatten().tolist() == [8.0, 8.0]
    t.record(torch.tensor([[1.0], [0.5]]))  # the 4.0 is still in the last 3
    t.record(torch.tensor([[1.0], [0.5]]))  # now it has left the ring
    assert t.predict().flatten().tolist() == [4.0, 1.0]


def test_tracker_skips_non_finite_and_frozen_and_checks_rows() -> None:
    t = RangeTracker(4, 1.5, per_row=False, overflow="requantize")
    t.record(torch.tensor([[2.0]]))
    t.record(torch.tensor([[float("inf")]]))
    assert t.stats.nonfinite_calls == 1 and t.predict().item() == 3.0
    t.frozen = True
    t.record(torch.tensor([[10.0]]))
    assert t.predict().item() == 3.0
    rows = RangeTracker(4, 1.5, per_row=True, overflow="clip")
    rows.record(torch.ones(3, 1))
    with pytest.raises(ValueError, match="holds 3 rows, the gradient has 2"):
        rows.record(torch.ones(2, 1))


def test_tracker_state_round_trip() -> None:
    t = RangeTracker(4, 2.0, per_row=True, overflow="clip")
    for i in range(6):
        t.record(torch.rand(5, 1) * (i + 1))
    t.stats.overflow_calls = 3
    u = RangeTracker(4, 2.0, per_row=True, overflow="clip")
    u.load_state_dict(t.state_dict())
    assert torch.equal(u.predict(), t.predict()) and u.stats == t.stats
    with pytest.raises(ValueError, match="saved with"):
        RangeTracker(8, 2.0, True, "clip").load_state_dict(t.state_dict())


# -- quantizers with a tracker ------------------------------------------------------------
def _warm(tracker: RangeTracker, a: torch.Tensor, q: str, n: int = 3) -> None:
    for i in range(n):
        get_quantizer(q).quantize(a, IntFormat(4), torch.Generator().manual_seed(i), tracker=tracker)


@pytest.mark.parametrize("q", ["ptq", "psq", "bhq", "hadamard"])
def test_requantize_on_overflow_equals_dynamic(q: str) -> None:
    a = torch.randn(32, 24)
    # margin 2: the random Hadamard signs move the transformed range from call to call
    t = RangeTracker(4, 2.0, per_row=q == "psq", overflow=Overflow.REQUANTIZE)
    _warm(t, a, q)
    assert t.stats.dynamic_calls == 1 and t.stats.overflow_calls == 0
    big = 5 * a
    got = get_quantizer(q).quantize(big, IntFormat(4), torch.Generator().manual_seed(9), tracker=t)
    want = get_quantizer(q).quantize(big, IntFormat(4), torch.Generator().manual_seed(9))
    assert torch.equal(got.codes, want.codes) and torch.equal(got.step, want.step)
    assert t.stats.overflow_calls == 1 and t.stats.requantized_calls == 1
    assert t.stats.overflow_elements > 0 and t.stats.clipped_sq == 0.0


def test_clip_is_counted_and_biased_requantize_is_not() -> None:
    a = torch.randn(16, 32)
    out = {}
    for mode in ("clip", "requantize"):
        t = RangeTracker(4, 1.0, per_row=False, overflow=mode)
        _warm(t, a, "ptq")
        t.frozen = True
        before = dataclasses.replace(t.stats)
        big = a * 1.5
        draws = torch.stack([
            get_quantizer("ptq").quantize(big, IntFormat(8), torch.Generator().manual_seed(s),
                                          tracker=t).dequantize() for s in range(400)])
        out[mode] = (draws, t.stats - before)
    draws, st = out["clip"]
    clip_err = (big.abs() - a.abs().max()).clamp_min(0)
    assert st.overflow_calls == 400 and st.requantized_calls == 0
    assert st.overflow_elements == 400 * int((clip_err > 0).sum())
    expect_rel = float(clip_err.pow(2).sum() / big.pow(2).sum()) ** 0.5
    assert st.clipped_norm == pytest.approx(expect_rel, rel=1e-4)
    assert float(draws.abs().max()) <= float(a.abs().max()) * (1 + 1e-6)  # clipped at the range
    with pytest.raises(AssertionError):
        assert_unbiased(draws, big)  # the clipped elements are biased, by design
    draws, st = out["requantize"]
    assert st.requantized_calls == 400
    assert_unbiased(draws, big)  # 5σ z-test, 400 draws: requantizing keeps SR unbiased


# -- layers -------------------------------------------------------------------------------
def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 5))


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    (scale * nn.functional.cross_entropy(model(x), y)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("q", ["psq", "bhq"])
def test_predicted_fqt_gradient_unbiased_for_qat_gradient(q: str) -> None:
    from lowbit.analysis.variance import qat_of, with_config

    model = lowbit.convert(_mlp(), FQTConfig.from_recipe(f"fqt-{q}-4-predicted", seed=0))
    torch.manual_seed(2)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    for _ in range(4):  # fill the histories
        _grads(model, x, y)
    with with_config(model, qat_of):
        exact = _grads(model, x, y)
    with lowbit.frozen_ranges(model):
        draws = torch.stack([_grads(model, x, y, scale=1.0) for _ in range(300)])
    total = lowbit.range_stats(model)["total"]
    assert total.calls > 300 and total.dynamic_calls == 3  # one warm-up call per used path
    assert_unbiased(draws, exact)  # 5σ z-test over 300 draws


def test_layer_overflow_is_counted_and_int8_matches_reference() -> None:
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    out = {}
    for backend in ("int8", "reference"):
        model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0,
                                                             backend=backend))
        for _ in range(3):
            _grads(model, x, y)
        g = _grads(model, x, y, scale=10.0)  # ten times the usual gradient: overflow
        out[backend] = (g, lowbit.range_stats(model))
    stats = out["reference"][1]
    assert stats["0/grad_weight"].overflow_calls == 1 and stats["2/grad_input"].overflow_calls == 1
    assert stats["total"].requantized_calls == stats["total"].overflow_calls
    assert {k: v.overflow_calls for k, v in stats.items()} == {
        k: v.overflow_calls for k, v in out["int8"][1].items()}
    torch.testing.assert_close(out["int8"][0], out["reference"][0], rtol=1e-5, atol=1e-6)


def test_per_row_only_where_rows_persist() -> None:
    model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-bhq-4-predicted", seed=0))
    _grads(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    trackers = model[2].range_trackers
    assert not trackers["grad_input"].per_row  # rows = samples (and BHQ mixes them)
    assert trackers["grad_weight"].per_row  # ∇W path: PSQ-8 on output features


def test_range_state_round_trip_and_errors() -> None:
    model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-4-predicted", seed=0))
    _grads(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    state = lowbit.range_state(model)
    fresh = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-4-predicted", seed=0))
    lowbit.load_range_state(fresh, state)
    for name, paths in state.items():
        for path in paths:
            a = model.get_submodule(name).range_trackers[path]
            b = fresh.get_submodule(name).range_trackers[path]
            assert (a.predict() is None and b.predict() is None) or torch.equal(a.predict(), b.predict())
    with pytest.raises(KeyError, match="does not have"):
        lowbit.load_range_state(fresh, {"nope": {}})


def test_another_ranks_range_state_is_loaded_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault kind 253 (a new user's trial under torchrun): a rank-0-only checkpoint gave
    rank 1 rank 0's histories; its resume silently stopped being bitwise. Each entry now
    records its rank, and loading another rank's warns (the run stays unbiased)."""
    import warnings

    import lowbit.nn as lnn

    model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-4-predicted", seed=0))
    _grads(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    state = lowbit.range_state(model)  # rank 0 (no process group)
    assert {s["rank"] for paths in state.values() for s in paths.values()} == {0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.load_range_state(model, state)  # its own rank: no word
    monkeypatch.setattr(lnn, "current_rank", lambda: 1)
    with pytest.warns(UserWarning, match="holds what rank 0 saved, this process is rank 1: .* save "
                                         r"lowbit.range_state\(model\) on every rank"):
        lowbit.load_range_state(model, state)
    assert _same_ranges(lowbit.range_state(model), state)  # loaded all the same


def _trackers(state: dict) -> dict:
    """The trackers a :func:`lowbit.range_state` result holds: without the placeholders of
    predicted paths before their first backward (``created`` False)."""
    out = {n: {p: s for p, s in paths.items() if s.get("created", True)} for n, paths in state.items()}
    return {n: paths for n, paths in out.items() if paths}


def _same_ranges(a: dict, b: dict) -> bool:
    """Two :func:`lowbit.range_state` results hold the same trackers in the same states."""
    a, b = _trackers(a), _trackers(b)
    return a.keys() == b.keys() and all(
        a[n].keys() == b[n].keys() and all(
            (s["key"], s["count"], s["stats"]) == (b[n][p]["key"], b[n][p]["count"], b[n][p]["stats"])
            and (s["hist"] is None) == (b[n][p]["hist"] is None)
            and (s["hist"] is None or torch.equal(s["hist"], b[n][p]["hist"]))
            for p, s in a[n].items()) for n in a)


@pytest.mark.parametrize("saved_after", [0, 1, "1, a path dropped"])
def test_rolling_back_to_a_range_state_equals_a_fresh_resume(saved_after: int | str) -> None:
    # A review: load_range_state({}) (a checkpoint from before the first backward) left the
    # histories recorded since in place, so a model rolled back to the checkpoint trained
    # differently from the same checkpoint loaded into a fresh model.
    cfg = FQTConfig.from_recipe("fqt-psq-4-predicted", seed=7)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 12, generator=g) * (1 + 10 * i), torch.randint(0, 5, (8,), generator=g))
            for i in range(3)]

    def train(m: nn.Module, batches: list) -> None:
        opt = torch.optim.SGD(m.parameters(), lr=0.01)
        for x, y in batches:
            _grads(m, x, y)
            opt.step()

    model = lowbit.convert(_mlp(), cfg)
    steps = 0 if saved_after == 0 else 1
    train(model, data[:steps])
    ckpt = {"m": {k: v.clone() for k, v in model.state_dict().items()},
            "rng": lowbit.rng_state(model), "ranges": lowbit.range_state(model)}
    if saved_after == "1, a path dropped":  # e.g. saved while that path was dynamic
        del ckpt["ranges"]["2"]["grad_input"]
    train(model, data)  # an attempt that is rolled back

    def load(m: nn.Module) -> nn.Module:
        m.load_state_dict(ckpt["m"])
        lowbit.load_rng_state(m, ckpt["rng"])
        lowbit.load_range_state(m, ckpt["ranges"])
        assert _same_ranges(lowbit.range_state(m), ckpt["ranges"])  # nothing else survives
        return m

    fresh = load(lowbit.convert(_mlp(), cfg))
    load(model)
    train(model, data[steps:])
    train(fresh, data[steps:])
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters()))
    assert _same_ranges(lowbit.range_state(model), lowbit.range_state(fresh))


def test_load_range_state_refuses_a_bad_state_before_changing_anything() -> None:
    model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-4-predicted", seed=0))
    _grads(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    earlier = lowbit.range_state(model)
    _grads(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    state = lowbit.range_state(model)
    with pytest.raises(TypeError, match="range state must be a dict .*got list"):
        lowbit.load_range_state(model, [])
    with pytest.raises(KeyError, match=r"paths that are not gradient paths .*\['2/grad_output'\]"):
        lowbit.load_range_state(model, {"0": earlier["0"], "2": {"grad_output": earlier["2"]["grad_weight"]}})
    broken = {**earlier["2"]["grad_weight"], "key": [16, 1.25, True, "ignore", "psq"]}
    with pytest.raises(ValueError, match="other predicted-range settings.*'ignore'"):
        lowbit.load_range_state(model, {"0": earlier["0"], "2": {"grad_weight": broken}})
    assert _same_ranges(lowbit.range_state(model), state)  # layer "0" not loaded either


def test_range_state_of_other_settings_is_refused_not_silently_replaced() -> None:
    """A range state saved under margin 1.25 loaded into layers converted with margin 2.0
    without a word, then their next backward replaced every tracker (history 3 → 1):
    refused now, naming the layer, path and both settings."""
    model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
    for _ in range(3):
        _grads(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    state = lowbit.range_state(model)
    other = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0).with_ranges(margin=2.0))
    with pytest.raises(ValueError, match=r"other predicted-range settings.*0/grad_input \(saved \(16, 1.25"):
        lowbit.load_range_state(other, state)
    assert _trackers(lowbit.range_state(other)) == {}
    lowbit.load_range_state(lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0)), state)


def test_converting_again_drops_the_trackers_the_new_recipe_does_not_use() -> None:
    """``convert(model, fqt-psq-8)`` after predicted-range training kept every old tracker
    (``range_state`` listed them, ``range_stats`` kept counting them); a conversion to a
    recipe with the same range settings keeps them, as it keeps the noise stream."""
    predicted = FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0)
    model = lowbit.convert(_mlp(), predicted)
    for _ in range(2):
        _grads(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    state = lowbit.range_state(model)
    lowbit.convert(model, predicted)  # the same settings: the history stays
    assert _same_ranges(lowbit.range_state(model), state)
    lowbit.convert(model, FQTConfig.from_recipe("fqt-psq-8", seed=0))
    assert lowbit.range_state(model) == {}
    _grads(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    assert lowbit.range_state(model) == {}
    lowbit.convert(model, predicted)  # back: a fresh history, as a fresh conversion's
    fresh = lowbit.convert(_mlp(), predicted)
    x, y = torch.randn(8, 12), torch.randint(0, 5, (8,))
    _grads(model, x, y)
    _grads(fresh, x, y)
    def counts(m: nn.Module) -> dict:
        return {n: {p: t["count"] for p, t in paths.items()} for n, paths in lowbit.range_state(m).items()}
    assert counts(model) == counts(fresh) != {}


# -- config -------------------------------------------------------------------------------
def test_recipes_and_spec_validation() -> None:
    cfg = FQTConfig.from_recipe("fqt-bhq-4-predicted")
    assert cfg.grad_input.range is RangeMode.PREDICTED and cfg.grad_weight.predicted
    assert lowbit.describe(cfg) == "fwd8/gi:bhq4~pred/gw:psq8~pred"
    assert FQTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.to_dict()["grad_input"]["range"] == "predicted"
    assert not FQTConfig.from_recipe("fqt-bhq-4").grad_input.predicted
    with pytest.raises(ValueError, match="unknown recipe"):
        FQTConfig.from_recipe("qat-8-predicted")
    with pytest.raises(ValueError, match="range must be one of"):
        GradSpec(range="sometimes")
    with pytest.raises(ValueError, match="overflow must be one of"):
        GradSpec(overflow="ignore")
    with pytest.raises(ValueError, match="margin must be a finite number ≥ 1"):
        GradSpec(margin=0.5)
    with pytest.raises(ValueError, match="history must be a positive integer"):
        GradSpec(history=0)


def test_with_ranges_changes_predicted_specs_only() -> None:
    cfg = FQTConfig.from_recipe("fqt-bhq-4-predicted").with_ranges(margin=1.25, overflow="clip")
    assert cfg.grad_input.margin == 1.25 and cfg.grad_weight.overflow is Overflow.CLIP
    mixed = FQTConfig(grad_input=GradSpec(4, "bhq"), grad_weight=GradSpec(8, range="predicted"))
    assert mixed.with_ranges(history=4).grad_input == mixed.grad_input
    with pytest.raises(ValueError, match="apply to predicted ranges"):
        FQTConfig.from_recipe("fqt-bhq-4").with_ranges(margin=1.5)


def test_stats_arithmetic() -> None:
    a = RangeStats(calls=3, elements=10, overflow_elements=2, clipped_sq=1.0, total_sq=4.0)
    b = a + a - a
    assert b == a and a.overflow_rate == 0.2 and a.clipped_norm == 0.5


def test_dynamic_spec_ignores_tracker() -> None:
    from lowbit.functional import quantize_gradient

    a = torch.randn(6, 5)
    t = RangeTracker(2, 1.0, False, "clip")
    t.record(torch.full((1, 1), 1e-3))  # a prediction that would clip everything
    spec = GradSpec(8, "ptq")  # range="dynamic"
    got = quantize_gradient(a, spec, torch.Generator().manual_seed(0), Backend.AUTO, t)
    want = quantize_gradient(a, spec, torch.Generator().manual_seed(0), Backend.AUTO)
    assert t.stats.calls == 0 and torch.equal(got.codes, want.codes) and torch.equal(got.step, want.step)


def test_grad_scaler_undoes_skipped_steps_and_follows_the_loss_scale() -> None:
    """With torch.amp.GradScaler, the steps it skipped (overflow) still wrote their
    loss-scaled ranges into the histories, and a change of the scale left them off by its
    factor: at 2^16 on float16 the grid stayed about 10× too coarse for 16 calls.
    lowbit.amp.GradScaler restores the histories of a skipped step and rescales them with
    the scale (powers of two: exactly)."""
    from lowbit.amp import GradScaler

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    with torch.no_grad():  # gradients that overflow float16 at the first scales
        model[2].weight *= 40
        model[4].weight *= 40
    lowbit.convert(model, FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # only the scaler and the trackers move
    scaler = GradScaler(model, "cpu", init_scale=2.0**16, growth_interval=2)
    g = torch.Generator().manual_seed(1)
    hist = lambda: {p: (None if t._hist is None else t._hist.clone(), t._count)  # noqa: E731
                    for p, t in model[2].range_trackers.items()}
    kinds = set()
    for _ in range(10):
        x, y = torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g)
        before, scale = hist(), scaler.get_scale()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        factor, after = scaler.get_scale() / scale, hist()
        if factor < 1:  # skipped: the histories as before the step, in the new unit
            kinds.add("skipped")
            assert after.keys() >= before.keys()
            for p, (h, n) in after.items():
                if p not in before:  # made by the skipped step: kept for its counters, no history
                    assert h is None and n == 0
                elif before[p][0] is None:
                    assert h is None and n == before[p][1]
                else:
                    assert n == before[p][1] and torch.equal(h, before[p][0] * factor)
        else:  # one more call recorded; the older ones in the new unit
            kinds.add("grown" if factor > 1 else "kept")
            for p, (h, n) in after.items():
                if p in before and before[p][0] is not None:
                    old, m = before[p]
                    assert n == m + 1
                    keep = [i for i in range(h.shape[0]) if i != m % h.shape[0]]
                    assert torch.equal(h[keep], old[keep] * factor)
    assert kinds == {"skipped", "grown", "kept"}
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        GradScaler(torch.zeros(1), "cpu")


@pytest.mark.parametrize("overflow", [Overflow.REQUANTIZE, Overflow.CLIP])
def test_finite_rows_of_a_call_holding_nan_get_the_overflow_handling(overflow: Overflow) -> None:
    # one output feature NaN, another 50× over its history (the per-row ∇W path): the NaN
    # row propagates, the overflowing row is requantized (or clipped) and counted, as in a
    # call without the NaN row — it was clipped silently whatever `overflow` said
    torch.manual_seed(0)
    spec = GradSpec(quantizer="psq", format="int8", range=RangeMode.PREDICTED, overflow=overflow)
    layer = lowbit.convert(nn.Sequential(nn.Linear(8, 3)),
                           FQTConfig.from_recipe("fqt-psq-8-predicted", grad_weight=spec))
    x = torch.randn(32, 8)

    def weight_grad(c: torch.Tensor) -> torch.Tensor:
        layer.zero_grad()
        (layer(x) * c).sum().backward()
        return layer[0].weight.grad.clone()

    for _ in range(4):  # history at scale 1
        weight_grad(torch.ones(3))
    before = lowbit.range_stats(layer)["total"]
    g = weight_grad(torch.tensor([float("nan"), 50.0, 1.0]))
    d = lowbit.range_stats(layer)["total"] - before
    assert torch.isnan(g[0]).all() and torch.isfinite(g[1:]).all()
    assert d.nonfinite_calls == 1 and d.overflow_calls == 1 and d.overflow_elements > 0
    exact = 50.0 * x.sum(0)  # ∇W of row 1 is 50·Σ_n x_n
    if overflow is Overflow.REQUANTIZE:
        assert d.requantized_calls == 1 and d.clipped_norm == 0
        assert torch.allclose(g[1], exact, rtol=0.05, atol=2.0)
    else:
        assert d.requantized_calls == 0 and d.clipped_norm > 0.5  # most of row 1 was clipped
        assert g[1].abs().max() < exact.abs().max() / 5


@pytest.mark.parametrize("overflow", [Overflow.REQUANTIZE, Overflow.CLIP])
def test_a_nan_sample_of_a_per_tensor_prediction_spoils_its_own_row_only(overflow: Overflow) -> None:
    """A review: under ``fqt-psq-8-predicted`` the ∇X path keeps one range per tensor (its
    rows, the samples, do not persist), and one NaN in a sample's ∇Y made every sample's ∇X
    NaN, where the dynamic path (and the docs) spoil that sample's row alone. The other
    rows are bitwise those of the same call without the NaN (same step, same noise), and
    the call is counted non-finite."""
    torch.manual_seed(0)
    spec = GradSpec(quantizer="psq", format="int8", range=RangeMode.PREDICTED, overflow=overflow)
    cfg = FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0, grad_input=spec)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    x, c = torch.randn(6, 8), torch.randn(6, 4)

    def grad_input(layer: nn.Module, nan: bool) -> tuple[torch.Tensor, RangeStats]:
        lowbit.nn.restore_ranges(snap)  # the same history and noise for both calls
        lowbit.nn.load_rng_state(layer, rng)
        xi = x.detach().clone().requires_grad_()
        cc = c.clone()
        if nan:
            cc[2, 1] = float("nan")
        before = lowbit.range_stats(layer)["total"]
        (layer(xi) * cc).sum().backward()
        return xi.grad, lowbit.range_stats(layer)["total"] - before

    layer = lowbit.convert(copy.deepcopy(model), cfg)
    for _ in range(4):  # the history
        (layer(x.detach().clone().requires_grad_()) * c).sum().backward()
    snap, rng = lowbit.nn.snapshot_ranges(layer), lowbit.nn.rng_state(layer)
    clean, _ = grad_input(layer, False)
    dirty, d = grad_input(layer, True)
    assert torch.isnan(dirty[2]).all() and torch.isfinite(dirty[[0, 1, 3, 4, 5]]).all()
    assert torch.equal(dirty[[0, 1, 3, 4, 5]], clean[[0, 1, 3, 4, 5]])
    assert d.nonfinite_calls >= 1 and d.dynamic_calls == 0


def test_a_predicted_range_past_the_dtypes_max_is_the_max_not_inf() -> None:
    """A review: ``absmax · margin`` past float32's largest value made the predicted range
    Inf: every code 0, dequantized to ``0 · inf = NaN`` — a finite gradient (5e37 <
    max/4) came back all NaN on the second step, counted nowhere."""
    cfg = FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0).with_ranges(margin=8.0)
    layer = lowbit.convert(nn.Linear(16, 4), cfg)
    x = torch.randn(32, 16) * 1e-3
    gy = torch.randn(32, 4)
    gy = gy / gy.abs().max() * 5e37
    for _ in range(3):
        xx = x.clone().requires_grad_()
        layer.zero_grad()
        layer(xx).backward(gy)
        assert torch.isfinite(xx.grad).all() and torch.isfinite(layer.weight.grad).all()
    stats = lowbit.range_stats(layer)["total"]
    assert stats.dynamic_calls == 2 and stats.nonfinite_calls == 0  # steps 2-3 predicted


def test_float64_ranges_are_recorded_in_float64() -> None:
    """A review: the history was float32, so finite float64 ranges above 3.4e38 were
    counted as non-finite (and those below 1e-45 as zero), never predicted."""
    from lowbit.quantizers import get_quantizer
    from lowbit.ranges import RangeTracker
    for magnitude in (1e300, 1e-300):
        t = RangeTracker(history=4, margin=1.25, per_row=True, overflow="requantize", quantizer="psq")
        g = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * magnitude
        for i in range(3):
            out = get_quantizer("psq").quantize(g, "int8", torch.Generator().manual_seed(i), tracker=t)
            assert torch.isfinite(out.dequantize(torch.float64)).all()
        assert (t.stats.calls, t.stats.dynamic_calls, t.stats.nonfinite_calls) == (3, 1, 0)


@pytest.mark.parametrize("kwargs, message", [
    ({"margin": float("nan")}, "margin must be a finite number ≥ 1"),
    ({"margin": float("inf")}, "margin must be a finite number ≥ 1"),
    ({"margin": 0.5}, "margin must be a finite number ≥ 1"),
    ({"history": 0}, "history must be a positive integer"),
    ({"history": 2.5}, "history must be a positive integer"),
    ({"overflow": "wrap"}, "wrap"),
])
def test_tracker_refuses_settings_a_grad_spec_refuses(kwargs: dict, message: str) -> None:
    """A hand-built tracker checked nothing: margin NaN turned finite gradients into NaN
    and margin inf every code into 0, uncounted; history 0 divided by zero at a call (a
    review). The same checks as GradSpec's, at construction."""
    args = {"history": 4, "margin": 1.25, "per_row": False, "overflow": "clip"} | kwargs
    with pytest.raises(ValueError, match=message):
        RangeTracker(**args)


def test_a_tracker_of_other_settings_than_the_spec_is_refused() -> None:
    """quantize_gradient ran with the tracker's margin/history/overflow/quantizer and
    ignored the spec's without a word (a review: margin 4 and clip given, margin 1 and
    requantize run)."""
    from lowbit.functional import quantize_gradient
    from lowbit.ops import tracker_key

    spec = GradSpec(4, "ptq", range="predicted", margin=4.0, history=2, overflow="clip")
    for bad in (RangeTracker(16, 1.0, False, "requantize"), RangeTracker(2, 4.0, False, "clip", "psq")):
        with pytest.raises(ValueError, match="the range tracker's settings are not the GradSpec's"):
            quantize_gradient(torch.randn(8, 16), spec, torch.Generator().manual_seed(0), tracker=bad)
    t = RangeTracker(*tracker_key(spec, False))
    quantize_gradient(torch.randn(8, 16), spec, torch.Generator().manual_seed(0), tracker=t)
    assert t.stats.calls == 1


def test_a_frozen_tracker_keeps_its_history_when_the_rows_change() -> None:
    """A frozen tracker (predict and count, record nothing) wiped its history at one call
    with another row count, and the calls after ran dynamic (a review)."""
    t = RangeTracker(4, 1.0, per_row=True, overflow="clip", quantizer="psq")
    q, k = get_quantizer("psq"), kernels_for(Backend.AUTO, "cpu")
    for s in range(3):
        q.quantize(torch.randn(6, 8), IntFormat(8), torch.Generator().manual_seed(s), tracker=t, backend=k)
    hist, count = t._hist.clone(), t._count
    t.frozen = True
    q.quantize(torch.randn(5, 8), IntFormat(8), torch.Generator().manual_seed(9), tracker=t, backend=k)
    assert t._count == count and torch.equal(t._hist, hist) and t.stats.dynamic_calls == 2  # first call + this
    t.frozen = False
    with pytest.warns(RuntimeWarning, match="range history restarts"):  # unfrozen: restarts, as before
        q.quantize(torch.randn(5, 8), IntFormat(8), torch.Generator().manual_seed(9), tracker=t, backend=k)
    assert t._count == 1


def test_range_stats_are_copies_and_a_skipped_step_keeps_its_counters() -> None:
    """range_stats returned the trackers' own (live) stats per layer beside a copied
    total, so a before/after delta of a layer read 0; restore_ranges after a skipped step
    put the counters back too, so ``nonfinite_calls`` read 0 under every skip (a review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lowbit.convert(model, FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
    model(torch.randn(4, 8)).sum().backward()
    before = lowbit.range_stats(model)
    model(torch.randn(4, 8)).sum().backward()
    after = lowbit.range_stats(model)
    key = "2/grad_weight"
    assert after[key].calls == before[key].calls + 1 and after[key] is not before[key]
    snap = lowbit.nn.snapshot_ranges(model)
    hist = model[2].range_trackers["grad_weight"]._hist.clone()
    (model(torch.randn(4, 8)).sum() * float("nan")).backward()  # a step the trainer skips
    assert lowbit.range_stats(model)[key].nonfinite_calls == 1
    lowbit.nn.restore_ranges(snap, counters=False)
    assert lowbit.range_stats(model)[key].nonfinite_calls == 1  # still counted
    assert torch.equal(model[2].range_trackers["grad_weight"]._hist, hist)  # history undone
    lowbit.nn.restore_ranges(snap)  # the default: everything as it was (a coverage trace)
    assert lowbit.range_stats(model)[key].nonfinite_calls == 0


def test_a_skipped_first_step_keeps_its_counters() -> None:
    """The trackers a first step creates were dropped with its history, counters and all:
    a skipped first step (fp16's usual first overflow) read 0 non-finite calls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lowbit.convert(model, FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
    snap = lowbit.nn.snapshot_ranges(model)  # before any tracker exists
    (model(torch.randn(4, 8)).sum() * float("nan")).backward()
    lowbit.nn.restore_ranges(snap, counters=False)
    t = model[2].range_trackers["grad_weight"]
    assert t.stats.nonfinite_calls == 1 and t.predict() is None and t._count == 0


@pytest.mark.parametrize("edit", ["inf", "huge", "tiny"])
def test_predicted_hadamard_with_a_block_moved_to_float64_does_not_raise(edit: str) -> None:
    """Hadamard moves a block to float64 past 2¹⁰⁰ or below 2⁻⁶⁰; the predicted range from
    the float32 history was clamped to float64's largest value, which raised ("value
    cannot be converted to type float without overflow") in the backward (a review). An
    Inf ∇Y now gives non-finite gradients, a huge or tiny one finite gradients."""
    torch.manual_seed(0)
    layer = lowbit.convert(nn.Linear(8, 8), lowbit.FQTConfig.from_recipe("fqt-hadamard-8-predicted"))
    for step in range(2):
        x = torch.randn(16, 8, requires_grad=True)
        y = layer(x)
        gy = torch.randn(y.shape)
        if step == 1:
            if edit == "inf":
                gy[0, 5] = float("inf")
            else:
                gy[0, 5] = 1e34 if edit == "huge" else gy[0, 5]
                gy = gy * (1e-20 if edit == "tiny" else 1.0)
        y.backward(gy)
    finite = bool(torch.isfinite(x.grad).all() and torch.isfinite(layer.weight.grad).all())
    assert finite is (edit != "inf")


@pytest.mark.parametrize("nan_row", [False, True], ids=["finite", "with-a-nan-row"])
def test_clipped_mass_of_values_past_float32s_square_root_stays_finite(nan_row: bool) -> None:
    """A review: one finite call with |x| ≈ 2e19 squared to Inf in float32, so the
    tracker's Σx² stayed Inf for good and every later epoch's difference of stats read
    ``Inf − Inf = NaN`` → ``clipped_norm`` 0.0 ("nothing clipped") while it clipped. The
    sums are float64 now (on the fixed-grid kernel and on a call's finite rows beside a
    NaN row), and a non-finite sum reads NaN, never 0."""
    tr = RangeTracker(history=1, margin=1.0, per_row=True, overflow="clip")
    k = kernels_for(Backend.REFERENCE, "cpu")
    fmt, rnd = IntFormat(8), Rounding.NEAREST

    def call(x: torch.Tensor, nan: bool = False) -> None:  # a third row: zeros, or NaN
        third = torch.full((1, x.shape[1]), float("nan") if nan else 0.0)
        tr.quantize(torch.cat([x, third]), fmt, "row", rnd, _seed(0), k)

    call(torch.ones(2, 4))  # history: range 1 for each row
    call(torch.full((2, 4), 2e19), nan=nan_row)  # clipped: its squares are past float32's range
    assert math.isfinite(tr.stats.total_sq) and math.isfinite(tr.stats.clipped_sq)
    call(torch.tensor([[4.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))  # the history: ranges 4 and 0.5
    # an epoch's counters, as the trainer takes them: a window, not a difference of the
    # running totals (whose float64 sums lose the epoch's 16 beside 3.2e39)
    model = lowbit.convert(nn.Sequential(nn.Linear(2, 2)), FQTConfig.from_recipe("fqt-psq-8-predicted"))
    model[0].range_trackers["grad_weight"] = tr
    before = dataclasses.replace(tr.stats)
    with lowbit.nn.RangeWindow(model) as window:
        call(torch.tensor([[8.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))  # row 0 clipped by 4
    assert window.stats.overflow_calls == 1
    assert window.stats.clipped_norm == pytest.approx(math.sqrt(16 / (64 + 0.25)))
    assert tr.stats == before + window.stats  # the running totals go on
    assert math.isnan(RangeStats(clipped_sq=math.inf, total_sq=math.inf).clipped_norm)
    assert math.isnan(RangeStats(clipped_sq=0.0, total_sq=math.nan).clipped_norm)


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("shape", [(0, 4), (3, 0)], ids=["no-rows", "no-columns"])
def test_an_empty_operand_neither_records_nor_shrinks_a_range(shape: tuple[int, int], per_row: bool) -> None:
    """A review: through ``RangeTracker.quantize`` (``quantize_gradient(..., tracker=)``) a
    0-column operand recorded a zero range, which pushed the real ones out of the history
    (with ``history=1`` the next call ran dynamic); a 0-row one left a history of no rows,
    and the next call crashed in ``amax()``. An empty operand now gives empty codes and
    is neither recorded nor counted."""
    tr = RangeTracker(history=1, margin=2.0, per_row=per_row, overflow="clip")
    k = kernels_for(Backend.REFERENCE, "cpu")
    fmt, rnd = IntFormat(8), Rounding.STOCHASTIC
    rows = 3 if shape[0] == 0 else shape[0]
    if shape[1] == 0:
        tr.quantize(torch.randn(rows, 5), fmt, "row", rnd, _seed(1), k)
    before, stats = tr.predict(), dataclasses.replace(tr.stats)
    for _ in range(2):
        enc = tr.quantize(torch.zeros(shape), fmt, "row", rnd, _seed(2), k)
        assert enc.codes.shape == shape
    after = tr.predict()
    assert (before is None and after is None) or torch.equal(before, after)
    assert tr.stats == stats
    tr.record(torch.zeros(0, 1))  # an empty observation records nothing either
    assert tr.predict() is None if before is None else torch.equal(tr.predict(), before)


@pytest.mark.parametrize("inside", ["restore-a-snapshot", "load-a-range-state", "convert-again"])
def test_a_range_window_counts_each_call_once_whatever_happens_to_the_trackers(inside: str) -> None:
    """A review of ``RangeWindow``'s first form (counters reset at open, added back at
    close): counters put back from a snapshot taken before the window were counted twice
    (and doubled the running totals), a state loaded inside brought its saved counts in,
    and trackers made and dropped inside were lost. The window now adds each call's own
    counts as it ends: the calls made, once, and the trackers' totals untouched."""
    torch.manual_seed(0)
    model = lowbit.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                           FQTConfig.from_recipe("fqt-psq-8-predicted"))
    x = torch.randn(16, 8)

    def step() -> None:
        model.zero_grad()
        model(x).square().mean().backward()

    per_step = 3  # tracker calls a backward makes (the first layer's ∇X is not needed)
    for _ in range(3):
        step()
    snap, state = lowbit.nn.snapshot_ranges(model), lowbit.range_state(model)
    total_before = lowbit.range_stats(model)["total"].calls
    with lowbit.nn.RangeWindow(model) as window:
        step()
        if inside == "restore-a-snapshot":
            lowbit.nn.restore_ranges(snap)  # the counters as they were too
        elif inside == "load-a-range-state":
            lowbit.load_range_state(model, state)
        else:  # other settings: new trackers, the old ones dropped; then back (the new ones dropped)
            lowbit.convert(model, FQTConfig.from_recipe("fqt-psq-8-predicted", grad_input=GradSpec(
                quantizer="psq", format="int8", range=RangeMode.PREDICTED, margin=2.0)))
        step()
        if inside == "convert-again":
            lowbit.convert(model, FQTConfig.from_recipe("fqt-psq-8-predicted"))
    assert window.stats.calls == 2 * per_step
    now = lowbit.range_stats(model)["total"].calls
    if inside == "convert-again":
        assert now <= total_before + 2 * per_step  # the dropped trackers' counts left with them
    else:
        assert now == total_before + per_step  # put back to before the window, then one step


def _predicted_mlp() -> nn.Module:
    return lowbit.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                          FQTConfig.from_recipe("fqt-psq-8-predicted"))


def _backward(model: nn.Module) -> None:
    model.zero_grad()
    model(torch.randn(16, 8)).square().mean().backward()


def test_a_range_window_counts_its_models_calls_only() -> None:
    """A second review: the window knew its model's trackers by ``id()``, so a tracker of
    another model made where a freed one had lived was counted (5 windows in 20). It
    holds the trackers themselves now (weakly)."""
    torch.manual_seed(0)
    a, b = _predicted_mlp(), _predicted_mlp()
    _backward(a)
    counted = []
    for _ in range(20):
        with lowbit.nn.RangeWindow(a) as window:
            lowbit.load_range_state(a, {})  # a's trackers dropped and freed
            lowbit.load_range_state(b, {})
            _backward(b)  # b's trackers made now, perhaps where a's lived
        counted.append(window.stats.calls)
        _backward(a)  # a's trackers again
    assert counted == [0] * 20


def test_an_unclosed_range_window_is_dropped_and_a_coverage_trace_is_not_counted() -> None:
    """A second review: a window never closed stayed in ``OPEN_WINDOWS`` for good (its
    model kept alive, every tracker call slower), and a ``lowbit.coverage`` trace inside
    a window was counted in it though coverage leaves training as if it had not run."""
    import gc

    from lowbit.ranges import OPEN_WINDOWS

    torch.manual_seed(0)
    model = _predicted_mlp()
    _backward(model)
    lowbit.nn.RangeWindow(model)  # never closed, no reference kept
    gc.collect()
    assert len(OPEN_WINDOWS) == 0
    with lowbit.nn.RangeWindow(model) as window:
        _backward(model)
        lowbit.coverage(model, torch.randn(16, 8), loss_fn=lambda out: out.square().mean())
    assert window.stats.calls == 3  # the step's, not the trace's


def test_a_range_window_counts_a_module_attached_inside_it() -> None:
    """A third review: a negative cache of other models' trackers missed a layer whose
    tracker was called before it was attached to the window's model (8 calls counted of
    12). The window reads the model's trackers again for any tracker it does not know."""
    torch.manual_seed(0)
    a, head = _predicted_mlp(), _predicted_mlp()
    x = torch.randn(16, 8, requires_grad=True)  # every layer's ∇X too: 4 tracker calls a step
    head(x).square().mean().backward()
    with lowbit.nn.RangeWindow(a) as window:
        head(x).square().mean().backward()  # not a's yet: not counted
        a.append(nn.Linear(4, 8))  # a plain layer: no tracker
        a.append(head)  # head joins a
        before = lowbit.range_stats(a)["total"].calls
        for _ in range(2):
            a.zero_grad()
            a(x).square().mean().backward()
        made = lowbit.range_stats(a)["total"].calls - before
    assert window.stats.calls == made


def test_range_windows_opened_in_another_thread_do_not_break_a_backward(monkeypatch) -> None:
    """A review: every predicted-range call walked the set of open windows while another
    thread could open or close one (even for another model): ``RuntimeError: Set changed
    size during iteration`` in the backward. The set is read and changed under a lock.
    Made deterministic: the set's iteration, after its first window, has another thread
    open a window of another model and waits for it up to 0.2 s (with the lock, that
    thread waits for the walk to end instead of changing the set under it)."""
    import threading
    import weakref

    from lowbit import ranges

    torch.manual_seed(0)
    a, b = _predicted_mlp(), _predicted_mlp()
    others: list[threading.Thread] = []
    opened: list = []  # held open: an add and a discard would leave the set's size as it was

    class Racing(weakref.WeakSet):
        def __iter__(self):  # noqa: ANN204
            for i, w in enumerate(super().__iter__()):
                yield w
                if i == 0 and not others:
                    t = threading.Thread(target=lambda: opened.append(lowbit.nn.RangeWindow(b)))
                    others.append(t)
                    t.start()
                    t.join(0.2)

    racing = Racing()
    monkeypatch.setattr(ranges, "OPEN_WINDOWS", racing)
    held = [lowbit.nn.RangeWindow(a) for _ in range(3)]
    _backward(a)  # walks the windows: the other thread opens one meanwhile
    for t in others:
        t.join()
    assert others and opened and all(w.close().calls > 0 for w in held)
    opened[0].close()


# -- loss scaling: units of the histories and counters (a fresh-user trial) -----------------
def _optimizer_step(opt: torch.optim.Optimizer, scaler: object | None) -> None:
    """``opt``'s step, through ``scaler`` (then its update) where there is one; grads zeroed."""
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()


def _scaled_steps(model: nn.Module, steps: int, scaler: object | None, batches: list) -> list[float]:
    """``steps`` backward passes on ``batches`` (cycled), through ``scaler`` (lowbit's
    GradScaler; ``None``: unscaled), lr 0; per step the last layer's ∇X prediction over
    the range it then observed (``nan`` while it had none)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ratios = []
    for i in range(steps):
        x, y = batches[i % len(batches)]
        loss = nn.functional.cross_entropy(model(x), y)
        loss = loss if scaler is None else scaler.scale(loss)
        t = model[2].range_trackers.get("grad_input")
        pred = None if t is None else t.predict()  # (after scale(): the step's own)
        loss.backward()
        t = model[2].range_trackers["grad_input"]
        seen = t._hist[(t._count - 1) % t.history].max().clone()  # (before update() rescales it)
        _optimizer_step(opt, scaler)
        ratios.append(math.nan if pred is None else float(pred.max() / seen))
    return ratios


@pytest.mark.parametrize("q", ["psq", "bhq"])
def test_a_growing_loss_scale_keeps_each_quantizers_prediction_in_step(q: str) -> None:
    # A trial: GradScaler rescaled BHQ's ∇X history by the scale's factor c, but BHQ's
    # transformed range grows as c^(2/3) (its scales go as λ^(−1/3)): after each growth the
    # prediction was 2^(1/3) too wide (1.575 where the unscaled run has 1.25). One batch,
    # lr 0, the scale doubling every step: prediction / observed is the margin throughout
    # (float rounding: 1e-5).
    from lowbit.amp import GradScaler

    g = torch.Generator().manual_seed(2)
    batch = [(torch.randn(64, 12, generator=g), torch.randint(0, 5, (64,), generator=g))]
    ratios = {}
    for scaled in (False, True):
        model = lowbit.convert(_mlp(), FQTConfig.from_recipe(f"fqt-{q}-8-predicted", seed=0))
        scaler = GradScaler(model, "cpu", init_scale=2.0**4, growth_interval=1) if scaled else None
        ratios[scaled] = _scaled_steps(model, 6, scaler, batch)
        if scaled:
            assert scaler.get_scale() == 2.0**10 and model[2].range_trackers["grad_input"].loss_scale == 2.0**10
    assert ratios[False][1:] == [1.25] * 5
    assert all(abs(r - 1.25) < 1.25e-5 for r in ratios[True][1:]), ratios[True]


def test_range_counters_are_in_the_unscaled_losss_units() -> None:
    # A trial: the same training (bitwise the same gradients) reported clipped_norm
    # 0.0119 unscaled and 0.00038 under a growing GradScaler, total_sq 1.2 and 6e5: the sums
    # were kept in loss-scaled units. Under lowbit's GradScaler each call's sums are divided
    # by the loss scale² (powers of two: the same sums to float64 rounding, 1e-12).
    from lowbit.amp import GradScaler

    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(64, 12, generator=g) * (1 + i % 3), torch.randint(0, 5, (64,), generator=g))
               for i in range(8)]
    cfg = FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0).with_ranges(overflow="clip", margin=1.0)
    stats = {}
    for scaled in (False, True):
        model = lowbit.convert(_mlp(), cfg)
        scaler = GradScaler(model, "cpu", init_scale=2.0**4, growth_interval=1) if scaled else None
        with lowbit.nn.RangeWindow(model) as w:
            _scaled_steps(model, 8, scaler, batches)
        stats[scaled] = w.stats
    plain, scaled = stats[False], stats[True]
    assert plain.clipped_sq > 0 and plain.overflow_calls == scaled.overflow_calls
    assert math.isclose(scaled.total_sq, plain.total_sq, rel_tol=1e-12)
    assert math.isclose(scaled.clipped_sq, plain.clipped_sq, rel_tol=1e-12)


def test_a_history_recorded_without_loss_scaling_is_brought_to_the_scale() -> None:
    # The same kind: histories recorded before a GradScaler was used (or loaded) are in
    # another unit; at the scaler's first step they are brought to its scale, so one batch
    # keeps its prediction at the margin (unaligned: 2^10 too small, every call overflowed).
    from lowbit.amp import GradScaler

    g = torch.Generator().manual_seed(4)
    batch = [(torch.randn(64, 12, generator=g), torch.randint(0, 5, (64,), generator=g))]
    model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
    _scaled_steps(model, 3, None, batch)
    before = lowbit.nn.range_stats(model)["total"]
    ratios = _scaled_steps(model, 3, GradScaler(model, "cpu", init_scale=2.0**10, growth_interval=100), batch)
    assert ratios == [1.25] * 3
    assert (lowbit.nn.range_stats(model)["total"] - before).overflow_calls == 0


def test_range_settings_take_numpy_scalars_and_one_element_tensors() -> None:
    # A trial: margin=np.float32(1.5) was refused as "must be a finite number ≥ 1", and so
    # were history=np.int64(16) and rescale factors np.float32(2.0), torch.tensor(2.).
    import numpy as np

    cfg = FQTConfig.from_recipe("fqt-psq-8-predicted").with_ranges(margin=np.float32(1.5), history=np.int64(16))
    assert type(cfg.grad_input.margin) is float and cfg.grad_input.margin == 1.5
    assert type(cfg.grad_input.history) is int and cfg.grad_input.history == 16
    t = RangeTracker(history=torch.tensor(4), margin=torch.tensor(2.0), per_row=False, overflow="clip")
    assert (t.history, t.margin) == (4, 2.0) and type(t.history) is int
    t.record(torch.ones(1, 1))
    for factor in (np.float32(2.0), torch.tensor(2.0), 2):
        t.rescale(factor)
    assert float(t.predict()) == 2.0 * 8 and t.loss_scale == 8.0
    for bad in (True, np.bool_(True), "2", torch.tensor([2.0, 2.0]), float("nan")):
        with pytest.raises(ValueError, match="rescale factor must be a finite number > 0"):
            t.rescale(bad)
    for kwargs in ({"margin": True}, {"history": 2.0}, {"history": np.float64(2)}, {"history": torch.tensor(2.0)}):
        with pytest.raises(ValueError, match="margin must be|history must be"):
            RangeTracker(**({"history": 4, "margin": 1.25, "per_row": False, "overflow": "clip"} | kwargs))


def test_grad_scaler_takes_torchs_positional_arguments() -> None:
    # A trial: lowbit.amp.GradScaler(model, "cpu", 1024.0) was a TypeError where
    # torch.amp.GradScaler("cpu", 1024.0) works.
    from lowbit.amp import GradScaler

    model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted"))
    scaler = GradScaler(model, "cpu", 1024.0, 3.0, 0.25, 7)
    assert (scaler.get_scale(), scaler.get_growth_factor(), scaler.get_backoff_factor(),
            scaler.get_growth_interval()) == (1024.0, 3.0, 0.25, 7)


def test_grad_scaler_scale_inside_torch_compile_does_not_recompile_every_step() -> None:
    # A trial: scale() traced the range snapshot, whose counters guarded the graph: a
    # recompile every step (8 graphs, 2–4 s each) until dynamo's limit.
    from torch._dynamo.utils import counters

    from lowbit.amp import GradScaler

    if compiled.failure() is not None:
        pytest.skip(f"torch's compiler is unusable here: {compiled.failure()}")
    torch._dynamo.reset()
    counters.clear()
    model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
    scaler = GradScaler(model, "cpu", init_scale=2.0**4, growth_interval=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    fwd = torch.compile(lambda x, y: scaler.scale(nn.functional.cross_entropy(model(x), y)))
    g = torch.Generator().manual_seed(5)
    graphs = []
    for _ in range(5):
        fwd(torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[1], graphs  # none after the second step


def test_trackers_made_inside_a_scaled_step_count_in_unscaled_units() -> None:
    # A review: a tracker created inside a step kept loss_scale 1 until update(); with
    # gradient accumulation its second micro-batch was counted at 2^20 the sums (2^10 scale).
    from lowbit.amp import GradScaler

    g = torch.Generator().manual_seed(6)
    micro = [(torch.randn(32, 12, generator=g), torch.randint(0, 5, (32,), generator=g)) for _ in range(4)]
    totals = []
    for scaled in (False, True):
        model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
        scaler = GradScaler(model, "cpu", init_scale=2.0**10) if scaled else None
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with lowbit.nn.RangeWindow(model) as w:
            for step in range(2):
                for x, y in micro[2 * step: 2 * step + 2]:  # two micro-batches a step
                    loss = nn.functional.cross_entropy(model(x), y)
                    (loss if scaler is None else scaler.scale(loss)).backward()
                _optimizer_step(opt, scaler)
        totals.append(w.stats.total_sq)
    assert totals[0] > 0 and math.isclose(totals[1], totals[0], rel_tol=1e-12), totals


def test_a_range_state_saved_before_loss_scales_were_kept_resumes_at_the_scalers_scale() -> None:
    # A review: a range_state without "loss_scale" was read as unscaled, and the first
    # scale() multiplied its (scaled) history by the scale: predictions 1024× too wide.
    # Now it is taken to be at the scaler's scale, with a warning.
    from lowbit.amp import GradScaler

    g = torch.Generator().manual_seed(7)
    batch = [(torch.randn(64, 12, generator=g), torch.randint(0, 5, (64,), generator=g))]
    model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
    scaler = GradScaler(model, "cpu", init_scale=2.0**10, growth_interval=100)
    _scaled_steps(model, 2, scaler, batch)
    state = lowbit.range_state(model)
    for layer in state.values():
        for tracker in layer.values():
            del tracker["loss_scale"], tracker["exponents"]
    again = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
    lowbit.load_range_state(again, state)
    resumed = GradScaler(again, "cpu", init_scale=2.0**10, growth_interval=100)
    resumed.load_state_dict(scaler.state_dict())
    with pytest.warns(RuntimeWarning, match="do not say which loss scale they were recorded at"):
        ratios = _scaled_steps(again, 2, resumed, batch)
    assert ratios == [1.25, 1.25]
    # the same, with a loop's own snapshot before scale() restored after an overflowed first
    # step (a review: the restore put "not known" back, the next scale() took the history
    # to be at the halved scale: predictions 2× too wide, and a second warning)
    third = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0))
    lowbit.load_range_state(third, state)
    scaler3 = GradScaler(third, "cpu", init_scale=2.0**10, growth_interval=100)
    scaler3.load_state_dict(scaler.state_dict())
    opt = torch.optim.SGD(third.parameters(), lr=0.0)
    snap = lowbit.nn.snapshot_ranges(third)
    with pytest.warns(RuntimeWarning, match="do not say which loss scale"):
        loss = scaler3.scale(nn.functional.cross_entropy(third(batch[0][0]), batch[0][1]) * math.inf)
    loss.backward()
    scaler3.step(opt)
    scaler3.update()  # skipped: the scale halves
    opt.zero_grad()
    lowbit.nn.restore_ranges(snap, counters=False)
    assert scaler3.get_scale() == 2.0**9
    assert _scaled_steps(third, 2, scaler3, batch) == [1.25, 1.25]


def test_bhqs_groups_of_one_follow_the_scale_linearly() -> None:
    # A review: a one-row ∇Y (batch 1) gets BHQ's identity transform, whose range follows
    # the scale as c, not c^(2/3): every call overflowed (0.992 = 1.25 / 2^(1/3)).
    from lowbit.amp import GradScaler

    g = torch.Generator().manual_seed(8)
    batch = [(torch.randn(1, 12, generator=g), torch.randint(0, 5, (1,), generator=g))]
    model = lowbit.convert(_mlp(), FQTConfig.from_recipe("fqt-bhq-8-predicted", seed=0))
    ratios = _scaled_steps(model, 5, GradScaler(model, "cpu", init_scale=2.0**4, growth_interval=1), batch)
    assert ratios[1:] == [1.25] * 4, ratios


def test_a_checkpoint_loader_that_fills_only_a_fresh_models_keys_is_refused(tmp_path) -> None:
    """A new user's trial (README fault kind 267): ``torch.distributed.checkpoint`` fills
    only the keys of the dict it loads into, and a fresh model's ``range_state`` was ``{}``
    — so the load brought back nothing and ``load_range_state`` restarted every history
    without a word (the resumed run 0.0099 off). A fresh model's state now lists each
    predicted path (``created`` False); DCP's load sets ``created`` from the checkpoint
    and ``load_range_state`` refuses the entries it left without their history, naming
    the way that works; a whole state (``torch.save``) loads as before."""
    import warnings

    import torch.distributed.checkpoint as dcp
    cfg = FQTConfig.from_recipe("fqt-psq-8-predicted", seed=0)
    model = lowbit.convert(_mlp(), cfg)
    for _ in range(2):
        _grads(model, torch.randn(8, 12), torch.randint(0, 5, (8,)))
    fresh = lowbit.convert(_mlp(), cfg)
    target = {"ranges": lowbit.range_state(fresh)}
    assert {p for paths in target["ranges"].values() for p in paths} == {"grad_input", "grad_weight"}
    assert all(s == {"created": False, "rank": 0} for paths in target["ranges"].values() for s in paths.values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's warnings about running without a process group
        dcp.save({"ranges": lowbit.range_state(model)}, checkpoint_id=str(tmp_path / "ck"))
        dcp.load(target, checkpoint_id=str(tmp_path / "ck"))
    with pytest.raises(ValueError, match=r"say a tracker was saved but hold no history.*torch.save"):
        lowbit.load_range_state(fresh, target["ranges"])
    assert _trackers(lowbit.range_state(fresh)) == {}  # nothing changed
    lowbit.load_range_state(fresh, lowbit.range_state(model))  # a whole state: loaded
    assert _same_ranges(lowbit.range_state(fresh), lowbit.range_state(model))
