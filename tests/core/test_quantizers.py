"""Properties of the gradient quantizers: unbiased (over the whole finite range of each
dtype), variance within the analytic bound (all-zero groups add none), ordering
BHQ < PSQ < PTQ on unequal rows, BHQ's Householder entries against a dense matrix, edge
cases, NaN/Inf propagation, and backend="reference" running no compiled code."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import assert_unbiased, available_devices, int_codes

from torch import nn

import lowbit
from lowbit import FQTConfig, GradSpec, OperandSpec
from lowbit.formats import IntFormat, Rounding, compute_dtype
from lowbit.functional import quantize_forward
from lowbit.kernels import Backend, avx512, compiled
from lowbit.quantizers import QUANTIZERS, Granularity, absmax, get_quantizer
from lowbit.kernels.bhq_groups import householder_absmax
from lowbit.quantizers.bhq import bhq_transform
from lowbit.quantizers import hadamard
from lowbit.quantizers.hadamard import hadamard_matrix
from lowbit.ranges import RangeTracker

NAMES = list(QUANTIZERS)
DEVICES = available_devices()


def unequal_rows(n: int = 24, d: int = 16, span: float = 3.0, seed: int = 0) -> torch.Tensor:
    """Gradient whose row ranges span ``span`` orders of magnitude, plus an outlier row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-span, 0, n)[:, None]
    return x[torch.randperm(n, generator=g)]


def draws(g: torch.Tensor, name: str, bits: int, s: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([lowbit.quantize_grad(g, name, bits, gen) for _ in range(s)])


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("name", NAMES)
def test_stochastic_rounding_is_unbiased(name: str, bits: int) -> None:
    g = unequal_rows()
    assert_unbiased(draws(g, name, bits, 1000), g)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("name", NAMES)
def test_variance_matches_expected_and_respects_bound(name: str, bits: int) -> None:
    g = unequal_rows(seed=1)
    q, fmt = QUANTIZERS[name], IntFormat(bits)
    s = 600
    err = (draws(g, name, bits, s, seed=2) - g).pow(2).sum((1, 2)).double()
    measured, se = err.mean(), err.std() / s**0.5
    bound = q.variance_bound(g, fmt).double()
    # Measured mean of S i.i.d. squared errors: within 5 standard errors of its target.
    assert measured <= bound + 5 * se, f"{name}: measured {measured:.3e} > bound {bound:.3e}"
    if name != "hadamard":  # expected_variance is exact for deterministic transforms
        expected = q.expected_variance(g, fmt).double()
        assert abs(measured - expected) <= 5 * se + 1e-12 * expected, (measured, expected)


def test_ordering_bhq_psq_ptq_on_unequal_rows() -> None:
    g = unequal_rows(n=128, d=64, span=3.0, seed=3)
    fmt = IntFormat(4)
    v = {n: float(QUANTIZERS[n].expected_variance(g, fmt)) for n in ("ptq", "psq", "bhq")}
    m = {n: float((draws(g, n, 4, 50, seed=4) - g).pow(2).sum((1, 2)).mean()) for n in v}
    # The gaps are orders of magnitude; 50 draws estimate each within a few percent.
    assert v["bhq"] < v["psq"] < v["ptq"], v
    assert m["bhq"] < m["psq"] < m["ptq"], m


def test_bhq_transform_is_invertible_and_linear_cost() -> None:
    g = unequal_rows(n=100, d=8, seed=5)
    t = bhq_transform(g)
    torch.testing.assert_close(t.inverse(t.forward(g)), g, rtol=1e-4, atol=1e-7)
    # groups: each large row with ≥ 0 small rows; every row belongs to exactly one group
    assert t.group.shape == (100,) and int(t.group.max()) < t.n_groups


def test_bhq_householder_maps_e1_to_uniform() -> None:
    # A group of g rows with only the first non-zero: after H, every row holds 1/√g of it.
    g = torch.zeros(8, 3)
    g[0] = torch.tensor([1.0, -2.0, 4.0])
    t = bhq_transform(g)
    y = t.forward(g)
    assert t.n_groups == 1
    assert torch.allclose(y / y[0], torch.ones_like(y), atol=1e-5)


def test_hadamard_matrix_orthonormal() -> None:
    for b in (1, 2, 16, 64):
        h = hadamard_matrix(b)
        torch.testing.assert_close(h @ h.t(), torch.eye(b))
    with pytest.raises(ValueError, match="power of two"):
        hadamard_matrix(12)


EDGE_CASES = {
    "all_zero": torch.zeros(6, 5),
    "n1": torch.randn(1, 7, generator=torch.Generator().manual_seed(0)),
    "zero_rows": torch.cat([torch.zeros(3, 5), torch.randn(3, 5, generator=torch.Generator().manual_seed(1))]),
    "equal_rows": torch.ones(6, 5) * 0.3,
    "tiny": torch.randn(6, 5, generator=torch.Generator().manual_seed(2)) * 1e-30,
    "huge": torch.randn(6, 5, generator=torch.Generator().manual_seed(3)) * 1e30,
    "mixed_1e-30_1e30": torch.cat([torch.randn(3, 5, generator=torch.Generator().manual_seed(4)) * 1e-30,
                                   torch.randn(3, 5, generator=torch.Generator().manual_seed(5)) * 1e30]),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("name", NAMES)
def test_edge_cases_finite_and_unbiased(name: str, case: str) -> None:
    g = EDGE_CASES[case]
    s = draws(g, name, 4, 400, seed=6)
    assert torch.isfinite(s).all()
    assert_unbiased(s, g)  # on the scale of the largest value
    if case == "mixed_1e-30_1e30" and name == "psq":
        # per-row scales: the 1e-30 rows are unbiased on their own scale too
        assert_unbiased(s[:, :3].double() * 1e30, g[:3].double() * 1e30)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_values_propagate(name: str, bad: float) -> None:
    g = torch.randn(8, 4)
    g[2, 1] = bad
    out = lowbit.quantize_grad(g, name, 4, torch.Generator().manual_seed(0))
    assert not torch.isfinite(out[2, 1]), "a NaN/Inf became finite"


def test_seeded_generator_is_bitwise_reproducible() -> None:
    g = unequal_rows()
    for name in NAMES:
        a = lowbit.quantize_grad(g, name, 4, torch.Generator().manual_seed(7))
        b = lowbit.quantize_grad(g, name, 4, torch.Generator().manual_seed(7))
        c = lowbit.quantize_grad(g, name, 4, torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_dtype_preserved() -> None:
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        assert lowbit.quantize_grad(torch.randn(4, 4, dtype=dt), "psq", 8).dtype == dt


@pytest.mark.parametrize("bits", [1, 9, 0, "4", 4.0])
def test_bad_bits(bits: object) -> None:
    with pytest.raises((ValueError, TypeError), match="bits"):
        lowbit.quantize_grad(torch.randn(3, 3), "psq", bits)  # type: ignore[arg-type]


def test_bad_inputs_named() -> None:
    with pytest.raises(ValueError, match="unknown quantizer 'foo'; allowed: ptq, psq, bhq, hadamard"):
        lowbit.quantize_grad(torch.randn(3, 3), "foo", 4)
    with pytest.raises(ValueError, match="2-D"):
        lowbit.quantize_grad(torch.randn(3), "psq", 4)
    with pytest.raises(TypeError, match="dtype torch.int64; supported dtypes"):
        lowbit.quantize_grad(torch.ones(3, 3, dtype=torch.long), "psq", 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        lowbit.quantize_grad([[1.0]], "psq", 4)  # type: ignore[arg-type]


# -- the whole finite range of each dtype (issue 11, item 9) -----------------------------
def _extreme(dtype: torch.dtype, kind: str, scale: float, n: int = 6, d: int = 8) -> torch.Tensor:
    if kind == "const":
        return torch.full((n, d), scale, dtype=torch.float64).to(dtype)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    return (x / x.abs().amax() * scale).to(dtype)  # largest |x| = scale (before rounding)


F32_TINY = torch.finfo(torch.float32).smallest_normal
EXTREMES = {  # (dtype, kind, scale): subnormals, the largest finite values, float64 far out
    "f32_const_1e-42": (torch.float32, "const", 1e-42),
    "f32_const_1e-44": (torch.float32, "const", 1e-44),
    "f32_const_min_subnormal": (torch.float32, "const", 2.0**-149),
    "f32_randn_subnormal": (torch.float32, "randn", 1e-40),
    "f32_randn_at_min_normal": (torch.float32, "randn", F32_TINY),
    "f32_const_max": (torch.float32, "const", torch.finfo(torch.float32).max),
    "f32_randn_max": (torch.float32, "randn", torch.finfo(torch.float32).max),
    "f64_randn_1e-300": (torch.float64, "randn", 1e-300),
    "f64_randn_1e300": (torch.float64, "randn", 1e300),
    "f64_const_subnormal": (torch.float64, "const", 1e-310),
    # float64 has no wider type to dequantize into: a result within a step of its largest
    # value may round past it (documented), so stay a factor 64 below it
    "f64_randn_near_max": (torch.float64, "randn", torch.finfo(torch.float64).max / 64),
    "bf16_const_subnormal": (torch.bfloat16, "const", 1e-40),
    "bf16_randn_max": (torch.bfloat16, "randn", 3.38e38),
    "f16_const_min_subnormal": (torch.float16, "const", 2.0**-24),
    "f16_randn_max": (torch.float16, "randn", 65504.0),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(EXTREMES))
@pytest.mark.parametrize("name", NAMES)
def test_unbiased_over_whole_dtype_range(name: str, case: str, device: str) -> None:
    # Dequantized in float64, so nothing rounds after the codes: the mean must equal the
    # input with no subnormal slack (conftest's z-test at 5σ; gaps below 1e-6 of the
    # largest value are float rounding of y = x/step or of the transform). Before the fix
    # 1e-42 came out 6.7% too large and 1e-44 as 0 (float32 steps lost precision).
    dtype, kind, scale = EXTREMES[case]
    g = _extreme(dtype, kind, scale).to(device)
    q, fmt = QUANTIZERS[name], IntFormat(8)
    gen = torch.Generator(device).manual_seed(3)
    for backend in (Backend.REFERENCE, Backend.AUTO):
        s = torch.stack([q.quantize(g, fmt, gen, backend=backend).dequantize(torch.float64)
                         for _ in range(300)]).cpu()
        assert torch.isfinite(s).all()
        assert_unbiased(s, g.double().cpu(), denormal_spacing=0.0)


@pytest.mark.parametrize("case", ["f32_const_1e-42", "f32_randn_subnormal", "f64_randn_1e-300",
                                  "f64_randn_1e300", "f64_const_subnormal", "f32_randn_max"])
@pytest.mark.parametrize("granularity", [Granularity.ROW, Granularity.TENSOR])
def test_forward_round_to_nearest_over_whole_dtype_range(case: str, granularity: Granularity) -> None:
    # Q_f (round-to-nearest): the step is grid_step(absmax) in the compute dtype and every
    # value is within half a step of its code — at float32 subnormals and float64 extremes.
    dtype, kind, scale = EXTREMES[case]
    x = _extreme(dtype, kind, scale)
    for backend in (Backend.REFERENCE, Backend.AUTO):
        qr = quantize_forward(x, OperandSpec(bits=8, granularity=granularity), None, backend)
        a = absmax(x.to(compute_dtype(dtype)), granularity)
        assert torch.equal(qr.step, IntFormat(8).step(a))
        err = (qr.dequantize(torch.float64) - x.double()).abs()
        assert bool((err <= qr.step.double() / 2 * (1 + 2.0**-20)).all())


@pytest.mark.parametrize("name", NAMES)
def test_quantize_grad_keeps_float64_extremes(name: str) -> None:
    # float64 gradients are not squeezed through float32 (1e-300 became 0, 1e300 inf).
    for scale in (1e-300, 1e300):
        g = _extreme(torch.float64, "randn", scale)
        out = lowbit.quantize_grad(g, name, 8, torch.Generator().manual_seed(0))
        assert out.dtype == torch.float64 and torch.isfinite(out).all()
        rel = (out - g).abs().amax() / g.abs().amax()  # within a 255-level grid of the max
        assert 0 < float(rel) <= 2 / 127, float(rel)


@pytest.mark.parametrize("case", ["f32_randn_subnormal", "f32_randn_max", "f64_randn_1e-150",
                                  "f64_randn_1e150"])
@pytest.mark.parametrize("name", NAMES)
def test_variance_formulas_over_whole_dtype_range(name: str, case: str) -> None:
    # expected_variance (exact) and variance_bound, at scales where the variance itself is
    # representable in float64, against the measured mean squared error (5 s.e.).
    extra = {"f64_randn_1e-150": (torch.float64, "randn", 1e-150),
             "f64_randn_1e150": (torch.float64, "randn", 1e150)}
    dtype, kind, scale = {**EXTREMES, **extra}[case]
    g = _extreme(dtype, kind, scale, n=12, d=10)
    q, fmt, s = QUANTIZERS[name], IntFormat(4), 400
    gen = torch.Generator().manual_seed(4)
    unit = float(g.double().abs().amax())
    err = torch.stack([((q.quantize(g, fmt, gen).dequantize(torch.float64) - g.double()) / unit)
                       .pow(2).sum() for _ in range(s)])
    measured, se = err.mean(), err.std() / s**0.5
    bound = q.variance_bound(g, fmt) / unit**2
    assert bound.dtype == torch.float64 and measured <= bound + 5 * se, (measured, bound)
    if name != "hadamard":  # exact for deterministic transforms
        expected = q.expected_variance(g, fmt) / unit**2
        assert expected.dtype == torch.float64
        assert abs(measured - expected) <= 5 * se + 1e-9 * expected, (measured, expected)


# -- all-zero groups add no variance (issue 11, item 12) ----------------------------------
def test_zero_rows_add_nothing_to_variance_bound_or_expected_variance() -> None:
    # The ∇W operand of a ReLU layer with dead units: rows (output features) all zero.
    # Each zero row used to add D/(4Q²) to the bound whatever the gradient's scale.
    live = torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 1e-3
    g = torch.zeros(16, 32)
    g[[1, 5, 6, 12]] = live
    fmt = IntFormat(4)
    for name in ("psq", "bhq"):
        q = QUANTIZERS[name]
        # with only the live rows present (BHQ: zero rows join groups, so compare PSQ only)
        if name == "psq":
            assert float(q.variance_bound(g, fmt)) == float(q.variance_bound(live, fmt))
            assert float(q.expected_variance(g, fmt)) == float(q.expected_variance(live, fmt))
        bound, exp = float(q.variance_bound(g, fmt)), float(q.expected_variance(g, fmt))
        assert 0 < exp <= bound <= 4 * float(QUANTIZERS["psq"].variance_bound(live, fmt)) * 4
    for name in NAMES:  # an all-zero gradient: no variance at all, and no draw moves it
        q = QUANTIZERS[name]
        assert float(q.variance_bound(torch.zeros(6, 5), fmt)) == 0.0
        assert float(q.expected_variance(torch.zeros(6, 5), fmt)) == 0.0
    from lowbit.analysis.bounds import weighted_expected_variance

    w = torch.rand(32, generator=torch.Generator().manual_seed(1))
    assert float(weighted_expected_variance("psq", g, fmt, w)) == float(
        weighted_expected_variance("psq", live, fmt, w))
    assert float(weighted_expected_variance("psq", g, fmt, torch.ones(32))) == float(
        QUANTIZERS["psq"].expected_variance(g, fmt))


def test_zero_group_step_is_zero() -> None:
    codes, step = int_codes(torch.zeros(3, 4), 7, True, True, torch.tensor(0))
    assert torch.equal(step, torch.zeros(3, 1)) and torch.equal(codes, torch.zeros(3, 4, dtype=torch.int8))


# -- BHQ's Householder entries (issue 11, item 11) ----------------------------------------
def _dense_householder(g: int) -> torch.Tensor:
    """``H_g = I − 2vvᵀ``, ``v = (e1 − 𝟙/√g)/‖e1 − 𝟙/√g‖``, built explicitly (float64)."""
    v = -torch.ones(g, dtype=torch.float64) / g**0.5
    v[0] += 1
    v = v / v.norm()
    return torch.eye(g, dtype=torch.float64) - 2 * torch.outer(v, v)


def test_householder_absmax_matches_dense_matrix() -> None:
    for g in range(2, 21):
        h = _dense_householder(g)
        torch.testing.assert_close(h @ torch.eye(g, dtype=torch.float64)[:, 0],
                                   torch.full((g,), g**-0.5, dtype=torch.float64))  # H e1 = 𝟙/√g
        got = float(householder_absmax(torch.tensor(float(g), dtype=torch.float64)))
        assert got == pytest.approx(float(h.abs().max()), rel=1e-12), g


def test_bhq_equals_psq_when_the_group_is_a_pair_of_equal_rows() -> None:
    # Two equal rows form one group of two; with the right max|H_2| = 1/√2 the scales are
    # equal, the reflection puts the whole content in one row, and the variance is PSQ's.
    g = torch.randn(1, 64, generator=torch.Generator().manual_seed(2)).expand(2, 64).contiguous()
    t = bhq_transform(g)
    assert t.n_groups == 1 and float(t.scale[0]) == pytest.approx(float(t.scale[1]), rel=1e-6)
    fmt = IntFormat(4)
    bhq, psq = (float(QUANTIZERS[n].expected_variance(g, fmt)) for n in ("bhq", "psq"))
    assert bhq == pytest.approx(psq, rel=1e-5)


# -- backend="reference" is plain eager torch (issue 11, item 13) -------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_never_compiles(monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.compile called under backend='reference'")

    monkeypatch.setattr(torch, "compile", refuse)
    monkeypatch.setattr(compiled, "_compiled", {})  # no wrapper compiled earlier is reused
    monkeypatch.setattr(compiled, "MIN_NUMEL", 0)  # every size would take the fused path
    monkeypatch.setattr(avx512, "_enabled", False)  # the compiled kernels, not the C quantizer
    monkeypatch.setattr(compiled, "_enabled", True)
    g = unequal_rows(n=40, d=24).to(device)
    for name in NAMES:
        for rounding in (Rounding.STOCHASTIC, Rounding.NEAREST):
            qr = QUANTIZERS[name].quantize(g, IntFormat(4), torch.Generator(device).manual_seed(0),
                                           rounding, Backend.REFERENCE)
            qr.dequantize()
        tracker = RangeTracker(4, 2.0, False, "requantize")
        for _ in range(2):  # predicted-range path: dynamic first, then the fixed grid
            QUANTIZERS[name].quantize(g, IntFormat(4), torch.Generator(device), Rounding.STOCHASTIC,
                                      Backend.REFERENCE, tracker).dequantize()
        cfg = FQTConfig.from_recipe(f"fqt-{name}-4", backend="reference", seed=0)
        for layer, x in ((nn.Linear(24, 16), torch.randn(40, 24)),
                         (nn.Conv2d(3, 8, 3, padding=1), torch.randn(4, 3, 8, 8))):
            m = lowbit.convert(layer.to(device), cfg)
            x = x.to(device).requires_grad_(True)
            m(x).square().sum().backward()
            assert x.grad is not None and m.weight.grad is not None


# Finite inputs near the dtype's largest value (a new user's review, 2026-12-03): an
# asymmetric grid's range max − min overflowed to Inf for |g| within a factor 2 of it and
# made its whole group NaN. The documented contract (quantize_grad's docstring): every
# |g| ≤ max/4 gives a finite result for PTQ and PSQ on every format; Hadamard (block b)
# and BHQ (groups of up to N rows) add b (N) rows' rounding noise in their inverse, so
# theirs is |g| ≤ max/(4b) (max/(4N)) — a second review (2026-12-04) found Inf at max/4
# with 64–70 rows at 2 bits and in float64's Hadamard transform, which the 4-row test
# below had not reached.
NEAR_MAX_FORMATS = ("int2", "int2a", "int4", "int4a", "int8", "int8a", "fp8_e4m3", "fp8_e5m2", "mxfp4",
                    "mxfp8_e4m3", "nvfp4", "mxfp4_spec", "nvfp4_spec")


def finite_bound(name: str, dtype: torch.dtype, rows: int) -> float:
    """The largest |g| the contract promises a finite result for."""
    m = torch.finfo(dtype).max / 4
    if name == "hadamard":
        return m / hadamard.block_size_for(rows, hadamard.DEFAULT_BLOCK)
    return m / rows if name == "bhq" else m


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("fmt", NEAR_MAX_FORMATS)
@pytest.mark.parametrize("name", NAMES)
def test_inputs_up_to_the_documented_bound_give_finite_results(name: str, fmt: str, dtype) -> None:
    for rows in (4, 70):  # 70: a full 64-row Hadamard block and a partial one
        top = finite_bound(name, dtype, rows)
        gen = torch.Generator().manual_seed(rows)
        for seed in range(6):
            g = (torch.randint(0, 2, (rows, 40), generator=gen) * 2 - 1).double() * top
            g[1] *= -1
            if seed % 2:  # one large row beside small ones (BHQ's grouping), else all at the bound
                g[2:] *= torch.rand(rows - 2, 1, generator=gen, dtype=torch.float64) ** 8
            q = QUANTIZERS[name].quantize(g.to(dtype), fmt, torch.Generator().manual_seed(seed))
            out = q.dequantize(dtype)  # quantize_grad's result (which refuses the *_spec formats)
            assert torch.isfinite(out).all(), (name, fmt, dtype, rows, seed)


@pytest.mark.parametrize("fmt", ["mxfp4_spec", "nvfp4_spec", "mxfp8_e4m3_spec"])
def test_clipping_formats_are_refused_where_unbiasedness_is_promised(fmt: str) -> None:
    # a second review (2026-12-04): quantize_grad promised E[Q(g)] = g and the variance
    # formulas E‖Q(a) − a‖², yet took the specification's scale rule, which clips
    g = torch.full((1, 32), 7.9, dtype=torch.float64)
    with pytest.raises(ValueError, match="clips"):
        lowbit.quantize_grad(g, "psq", fmt)
    for name in NAMES:
        for method in ("expected_variance", "variance_bound", "rounding_variance"):
            with pytest.raises(ValueError, match=f"{name}.{method}: {fmt}"):
                getattr(QUANTIZERS[name], method)(g, fmt)
    up = fmt.removesuffix("_spec")  # the round-up rule stays unbiased and accepted
    assert torch.isfinite(lowbit.quantize_grad(g, "psq", up)).all()
    assert float(QUANTIZERS["psq"].variance_bound(g, up)) >= float(QUANTIZERS["psq"].expected_variance(g, up))
    # a gradient spec takes the format (to study the specification's numerics), saying it is biased
    with pytest.warns(UserWarning, match=f"{fmt} clips a block's largest values.*biased"):
        GradSpec(format=fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradSpec(format=up)


def test_a_rounding_name_is_read_or_refused_never_taken_for_nearest() -> None:
    """A review (2026-12-05): ``GradQuantizer.quantize(…, rounding="stochastic")`` compared
    the string with ``Rounding.STOCHASTIC`` and rounded to nearest — biased, silently; any
    misspelling did the same. Names are read as the enum, anything else refused."""
    g = torch.full((1, 8), 0.5)
    g[0, 0] = 1.0
    draws = {tuple(QUANTIZERS["psq"].quantize(g, "int2", torch.Generator().manual_seed(s), "stochastic")
                   .dequantize()[0].tolist()) for s in range(20)}
    assert len(draws) > 1  # stochastic: 0.5 rounds to 0 or to 1 by draw
    nearest = QUANTIZERS["psq"].quantize(g, "int2", None, "nearest").dequantize()
    assert torch.equal(nearest, QUANTIZERS["psq"].quantize(g, "int2", None, Rounding.NEAREST).dequantize())
    with pytest.raises(ValueError, match="rounding must be a lowbit.Rounding or one of 'nearest', 'stochastic', "
                                         "got 'stochastc'"):
        QUANTIZERS["psq"].quantize(g, "int2", None, "stochastc")
    # the same kind elsewhere (a second review): absmax took "tensor" for per row; the
    # kernels' quantize and a range tracker rounded a name to nearest; kernels_for's error
    from lowbit.kernels import kernels_for
    from lowbit.quantizers import absmax

    x = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    assert torch.equal(absmax(x, "tensor"), torch.tensor([[3.0]]))
    with pytest.raises(ValueError, match="granularity must be a lowbit.Granularity or one of 'tensor', 'row'"):
        absmax(x, "tensr")
    k, seed = kernels_for("auto", "cpu"), torch.tensor(7)
    by_name = k.quantize(g, IntFormat(2), "row", "stochastic", seed)
    assert torch.equal(by_name.codes, k.quantize(g, IntFormat(2), Granularity.ROW, Rounding.STOCHASTIC, seed).codes)
    with pytest.raises(ValueError, match="rounding must be"):
        k.quantize(g, IntFormat(2), "row", "stoch", seed)
    with pytest.raises(ValueError, match="backend must be a lowbit.Backend or one of 'auto', 'reference'"):
        kernels_for("Reference", "cpu")


@pytest.mark.parametrize("name", ["ptq", "psq", "bhq"])
def test_asymmetric_range_past_the_max_stays_finite_and_unbiased(name: str) -> None:
    # max − min = 1.8 × float32's max: the grid comes from the halved values (exact), so the
    # step is finite; unbiasedness by conftest's z-test at 5σ over 2,000 draws
    top = torch.finfo(torch.float32).max
    g = torch.tensor([[0.9 * top, -0.9 * top, 0.3 * top, 0.0, 1e30], [1.0, 2.0, 3.0, 4.0, 5.0]])
    s = torch.stack([lowbit.quantize_grad(g, name, "int4a", torch.Generator().manual_seed(i)).double()
                     for i in range(2000)])
    assert torch.isfinite(s).all()
    assert_unbiased(s, g.double())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_asymmetric_grid_is_finite_up_to_its_documented_bound(bits: int) -> None:
    """README's limit, stated after a review found the "handled" range overstated: a group
    of ±v is finite while ``2v·2^(b−1)/(2^b − 1) ≤ max`` (just inside: ×0.999) and
    dequantizes non-finite just past it (×1.001), where its offset overflows."""
    top = torch.finfo(torch.float32).max
    bound = top * (2**bits - 1) / 2**bits  # the largest v with 2v·2^(b−1)/(2^b − 1) ≤ max
    for factor, finite in ((0.999, True), (1.001, False)):
        v = min(bound * factor, top)
        g = torch.tensor([[v, -v, 1.0, 0.0]])
        out = lowbit.quantize_grad(g, "psq", f"int{bits}a", torch.Generator().manual_seed(0))
        assert bool(torch.isfinite(out).all()) is finite, (bits, factor)


@pytest.mark.parametrize("shape", [(0, 5), (5, 0)])
@pytest.mark.parametrize("q", QUANTIZERS)
def test_variance_formulas_of_an_empty_operand_are_zero(q: str, shape: tuple[int, int]) -> None:
    """``quantize`` takes an empty operand; its variance formulas raised (``amax()`` of an
    empty reduction, ``IndexError``): now no element, no variance."""
    from lowbit.analysis.bounds import weighted_expected_variance

    a, quantizer = torch.zeros(shape), get_quantizer(q)
    _, var = quantizer.rounding_variance(a, "int4")
    assert var.shape == shape and var.dtype == torch.float64
    assert quantizer.expected_variance(a, "int4").item() == 0.0
    assert quantizer.variance_bound(a, "int4").item() == 0.0
    assert weighted_expected_variance(q, a, IntFormat(4), torch.ones(shape[1])).item() == 0.0


def test_variance_formulas_say_inf_not_nan_past_the_dtypes_range() -> None:
    """A review: BHQ's ``inverse_sq`` gave ``−inf + inf = NaN`` where the variance overflows
    float64 (groups of ≥ 5 rows), the other quantizers ``inf``; a NaN input stays NaN."""
    g = torch.randn(8, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 1e300
    for q in ("ptq", "psq", "bhq", "hadamard"):
        quantizer = get_quantizer(q)
        assert quantizer.expected_variance(g, "int4").item() == math.inf
        assert quantizer.variance_bound(g, "int4").item() == math.inf
    g[0, 0] = math.nan
    assert math.isnan(get_quantizer("bhq").expected_variance(g, "int4").item())


@pytest.mark.parametrize("name", ["ptq", "psq", "bhq", "hadamard"])
def test_every_quantizer_entry_point_refuses_what_quantize_grad_refuses(name: str) -> None:
    """A review: the quantizer methods took what ``quantize_grad`` refuses — a 3-D operand
    (PSQ then scaled per (batch, column), on the summed dimension), a complex one (its
    imaginary part dropped), an integer one, one requiring grad (a silent zero gradient)."""
    q = lowbit.QUANTIZERS[name]
    bad = [(torch.randn(2, 3, 4), ValueError, r"expects a 2-D operand \(rows, features\), got shape \(2, 3, 4\)"),
           (torch.randn(5), ValueError, r"expects a 2-D operand"),
           (torch.complex(torch.randn(4, 6), torch.randn(4, 6)), TypeError, r"operand has dtype torch.complex64"),
           (torch.arange(24, dtype=torch.int32).reshape(4, 6), TypeError, r"operand has dtype torch.int32"),
           (torch.randn(4, 6, requires_grad=True), ValueError, r"is not differentiable: pass a.detach\(\)"),
           # a review: a sparse or nested operand failed inside torch ("Could not run 'aten::amax'
           # with arguments from the 'SparseCPU' backend", "NestedTensorImpl doesn't support sizes")
           (torch.randn(4, 6).to_sparse(), RuntimeError, r"operand is a torch.sparse_coo tensor; lowbit's quantizers"),
           (torch.nested.nested_tensor([torch.randn(3), torch.randn(5)]), RuntimeError,
            r"operand is a nested tensor; lowbit's quantizers")]
    calls = {"quantize": lambda a: q.quantize(a, 8), "expected_variance": lambda a: q.expected_variance(a, 8),
             "variance_bound": lambda a: q.variance_bound(a, 8), "rounding_variance": lambda a: q.rounding_variance(a, 8)}
    for call in calls.values():
        for a, err, match in bad:
            with pytest.raises(err, match=match):
                call(a)
        with torch.no_grad():  # grad mode off: a tensor that requires grad is only read
            call(torch.randn(4, 6, requires_grad=True))
    with pytest.raises(ValueError, match=r"quantize_grad expects a 2-D gradient"):
        lowbit.quantize_grad(torch.randn(2, 3, 4), name, 8)
    with pytest.raises(RuntimeError, match=r"quantize_grad: gradient is a torch.sparse_csr tensor"):
        lowbit.quantize_grad(torch.randn(4, 6).to_sparse_csr(), name, 8)


def test_a_huge_hadamard_block_is_checked_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: ``Hadamard(block=b)`` built the b×b matrix to check that b is a power of
    two (873 MB at 8192; GBs beyond). The check is arithmetic now."""
    from lowbit.quantizers import Hadamard, hadamard

    monkeypatch.setattr(hadamard, "hadamard_matrix", lambda *a, **k: pytest.fail("built the b×b matrix"))
    assert Hadamard(1 << 40).block == 1 << 40
    for b in (0, -4, 6, 96):
        with pytest.raises(ValueError, match=f"power of two, got {b}"):
            Hadamard(b)
