"""Number formats as values (issue 12): grids, scale rules, names, and every (quantizer,
format) pair unbiased with its exact variance."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_unbiased, available_devices

import lowbit
from lowbit.formats import (
    BLOCK_FORMATS,
    ELEMENTS,
    FORMAT_NAMES,
    BlockFormat,
    FloatFormat,
    Granularity,
    Grid,
    IntFormat,
    Rounding,
    ScaleRule,
    parse_format,
    round_elements,
)
from lowbit.kernels import Backend, avx512, kernels_for, reference
from lowbit.quantizers import QUANTIZERS

DEVICES = available_devices()
ALL_FORMATS = [*FORMAT_NAMES, "mxfp4_spec", "nvfp4_spec"]


def _grad(n: int = 8, d: int = 40, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitude, one one-signed row, one exact zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.logspace(-3, 2, n)[torch.randperm(n, generator=g)][:, None]
    x[1] = x[1].abs()
    x[2] = 0.0
    return x


# -- names and values ---------------------------------------------------------------------
def test_every_name_parses_to_its_format_and_back() -> None:
    for name in ALL_FORMATS:
        fmt = parse_format(name)
        assert fmt.name == name and parse_format(fmt) is fmt
    assert parse_format(4) == IntFormat(4) == parse_format("int4")
    assert parse_format("int4a") == IntFormat(4, "asymmetric") and IntFormat(4, "asymmetric").grid is Grid.ASYMMETRIC
    assert parse_format("fp8_e5m2") == FloatFormat("e5m2")
    assert parse_format("mxfp4") is BLOCK_FORMATS["mxfp4"] and BLOCK_FORMATS["nvfp4"].block == 16
    assert parse_format("mxfp4_spec").rule is ScaleRule.SPEC


@pytest.mark.parametrize("bad, err, match", [
    ("int9", ValueError, "unknown format 'int9'; allowed: .*int2, .*nvfp4"),
    ("fp4", ValueError, "unknown format 'fp4'"),
    ("mxfp6", ValueError, "unknown format 'mxfp6'"),
    (1, ValueError, r"bits must be in 2..8, got 1"),
    (4.0, TypeError, "a format must be an int"),
])
def test_unknown_formats_raise_naming_the_allowed_ones(bad: object, err: type, match: str) -> None:
    with pytest.raises(err, match=match):
        parse_format(bad)  # type: ignore[arg-type]
    with pytest.raises(err, match=match):
        lowbit.quantize_grad(torch.randn(4, 4), "psq", bad)  # type: ignore[arg-type]


def test_format_constructors_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="grid must be one of 'symmetric', 'asymmetric', got 'skew'"):
        IntFormat(4, "skew")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="FloatFormat element must be 'e4m3' or 'e5m2', got 'e2m1'"):
        FloatFormat("e2m1")
    with pytest.raises(ValueError, match="block scale must be 'e8m0' or 'e4m3'"):
        BlockFormat("x", "e2m1", 32, "fp32")
    with pytest.raises(ValueError, match="block must be a positive int"):
        BlockFormat("x", "e2m1", 0, "e8m0")


# -- element grids ----------------------------------------------------------------------
def _grid(element: str) -> torch.Tensor:
    """Every finite non-negative value of the element type, from torch's own dtype."""
    if element == "e2m1":
        return torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float32)
    codes = torch.arange(256, dtype=torch.uint8).view(ELEMENTS[element].dtype).float()
    return codes[torch.isfinite(codes) & (codes >= 0)].unique()


@pytest.mark.parametrize("element", list(ELEMENTS))
def test_element_grid_is_the_dtypes_grid(element: str) -> None:
    """Grid points round to themselves, and SR of a point between two neighbours returns
    exactly one of them (so the spacing formula lands on torch's own float8 values)."""
    fmt = FloatFormat(element) if element != "e2m1" else BLOCK_FORMATS["mxfp4"]
    grid = _grid(element)
    assert float(grid.max()) == ELEMENTS[element].max
    for sign in (1.0, -1.0):
        g = sign * grid
        assert torch.equal(round_elements(g, fmt, None), g)
        lo, hi = g[:-1], g[1:]
        mid = lo + (hi - lo) * 0.3
        for u in (torch.zeros_like(mid), torch.full_like(mid, 0.999)):
            got = round_elements(mid, fmt, u)
            assert bool(((got == lo) | (got == hi)).all())


@pytest.mark.parametrize("element", ["e4m3", "e5m2"])
def test_nearest_rounding_is_the_ieee_cast(element: str) -> None:
    # torch's float32 -> float8 cast rounds to nearest, ties to even: the same grid.
    fmt = FloatFormat(element)
    y = torch.randn(20000, generator=torch.Generator().manual_seed(1)) * fmt.emax / 4
    y = y.clamp(-fmt.emax, fmt.emax)
    ties = (_grid(element)[:-1] + _grid(element)[1:]) / 2  # exact midpoints
    y = torch.cat([y, ties, -ties])
    assert torch.equal(round_elements(y, fmt, None), y.to(fmt.code_dtype).float())


# -- scale rules ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp4", "nvfp4"])
def test_block_scales_round_up_so_nothing_clips(name: str) -> None:
    fmt = parse_format(name)
    x = _grad(16, 70) * torch.exp(torch.randn(16, 70, generator=torch.Generator().manual_seed(3)) * 3)
    y, scale, _, bs = reference.prepare(x, fmt, Granularity.ROW)
    assert float(y.abs().max()) <= fmt.emax  # every element inside the grid: SR unbiased
    if fmt.scale == "e8m0":  # powers of two (or 0 for an all-zero block)
        nz = bs[bs > 0]
        assert torch.equal(nz, torch.exp2(torch.round(torch.log2(nz))))
    else:  # E4M3 block scales times a power-of-two group scale: exact products
        assert torch.equal(bs, bs.to(torch.float8_e4m3fn).float())
        assert torch.equal(scale[scale > 0], torch.exp2(torch.round(torch.log2(scale[scale > 0]))))
    # the smallest such scale: one E4M3 step (or half the power of two) less would clip
    bamax = torch.nn.functional.pad(x.abs(), (0, -x.shape[1] % fmt.block)).view(16, -1, fmt.block).amax(2)
    smaller = bs / 2 if fmt.scale == "e8m0" else bs - ELEMENTS["e4m3"].spacing(torch.nextafter(bs, torch.zeros_like(bs)))
    live = bs > 0
    assert bool((bamax[live] > fmt.emax * smaller[live] * scale.expand_as(bs)[live]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nvfp4_group_scale_of_subnormals_keeps_block_scales_exact_and_unbiased(dtype: torch.dtype) -> None:
    """A group whose largest value is a few subnormal spacings ``u`` (37u): its power-of-two
    scale (1u) times an E4M3 block scale (6.5) is not representable, so ``bs·scale``
    rounded (to 6u): elements of 6.17 > 6, code 8 (no E2M1 value), the mean 40.08u (z =
    384) — in float64 too. The group scale is now at least 2⁹u (E4M3 block scales are
    multiples of 2⁻⁹): exact products, E2M1 codes, unbiased (z-test at 5σ over N =
    100,000 independently rounded copies of the value)."""
    fmt = parse_format("nvfp4")
    fi = torch.finfo(dtype)
    u = fi.smallest_normal * fi.eps
    for value in (37, 3, 1000):
        x = torch.full((100_000, 1), value * u, dtype=dtype)
        y, scale, _, bs = reference.prepare(x[:1], fmt, Granularity.ROW)
        assert float(y.abs().max()) <= fmt.emax and float(bs * scale) > 0
        assert float(bs.double() * scale.double()) == float(bs * scale)  # the product is exact
        codes, scale, _, bs = reference.quantize(x, fmt, Granularity.ROW, Rounding.STOCHASTIC,
                                                 torch.tensor(12345))
        assert set(codes.float().abs().unique().tolist()) <= set(_grid("e2m1").tolist())
        draws = codes.to(torch.float64) * (bs.double() * scale.double()) / u  # units of u, exact
        mean, se = float(draws.mean()), float(draws.std()) / math.sqrt(draws.numel())
        assert abs(mean - value) <= 5 * max(se, 1e-12), (value, mean, se)


def test_spec_rule_clips_and_is_biased_where_round_up_is_not() -> None:
    # One block whose largest element is 1.9·2^k: the OCP MX exponent ⌊log2 1.9·2^k⌋ − 2
    # maps it to 7.6 > 6, so the spec's rule clips it to 6·2^(k−2); lowbit's rule does not.
    x = torch.full((1, 32), 0.1)
    x[0, 0] = 1.9
    up, spec = parse_format("mxfp4"), parse_format("mxfp4_spec")
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([QUANTIZERS["psq"].quantize(x, up, gen, backend="reference").dequantize(torch.float64)
                         for _ in range(300)])
    assert_unbiased(draws, x.double())
    clipped = QUANTIZERS["psq"].quantize(x, spec, gen, backend="reference").dequantize()
    assert float(clipped[0, 0]) == 1.5  # 6 · 2^(0 − 2): the clipping bias is 0.4
    # the spec rule's error is a bias: the variance formulas (which once reported a lower
    # "variance" for it than for the unbiased rule) refuse it
    with pytest.raises(ValueError, match="clips"):
        QUANTIZERS["psq"].expected_variance(x, spec)


def test_asymmetric_grid_spans_min_to_max_with_all_levels() -> None:
    x = torch.linspace(2.0, 5.0, 61).reshape(1, 61)  # one-signed row
    for bits in (2, 4, 8):
        fmt = IntFormat(bits, "asymmetric")
        enc = kernels_for(Backend.REFERENCE, "cpu").quantize(x, fmt, Granularity.ROW, Rounding.NEAREST,
                                                             torch.tensor(0))
        q = enc.codes.int() + fmt.zero_code  # levels 0..2^b − 1
        assert int(q.min()) == 0 and int(q.max()) == 2**bits - 1
        assert len(q.unique()) == min(2**bits, 61)
        assert float(enc.scale) == pytest.approx(3.0 / (2**bits - 1), rel=1e-6)
        assert enc.codes.dtype == torch.int8 and int(enc.codes.min()) >= -128
        # the symmetric grid of the same bits spends half its levels on the unused sign
        sym = QUANTIZERS["psq"].expected_variance(x, IntFormat(bits))
        asym = QUANTIZERS["psq"].expected_variance(x, fmt)
        assert float(asym) < float(sym)


def test_constant_and_zero_groups_are_exact_on_every_format() -> None:
    x = torch.zeros(3, 48)
    x[1] = 0.75  # constant row: exact on asymmetric grids (step 0, offset = the value)
    for name in ALL_FORMATS:
        got = QUANTIZERS["psq"].quantize(x, name, torch.Generator().manual_seed(0)).dequantize()
        assert torch.equal(got[0], x[0]) and torch.equal(got[2], x[2]), name
        if name.startswith("int") and name.endswith("a"):
            assert torch.equal(got[1], x[1]), name
        if not parse_format(name).clips:  # (the clipping formats' variance is refused)
            assert float(QUANTIZERS["psq"].expected_variance(torch.zeros(3, 48), name)) == 0.0


# -- unbiasedness and exact variance of every (quantizer, format) pair ----------------------
@pytest.mark.parametrize("quantizer", list(QUANTIZERS))
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_unbiased_with_exact_variance(quantizer: str, name: str) -> None:
    """z-test of E[Q(x)] = x (5σ over 300 draws, conftest.assert_unbiased: the noise is
    bounded, so the mean of 300 draws is near-normal); the mean squared error equals
    ``expected_variance`` (a z-test on ‖Q(x) − x‖² − expected, each draw against the
    expected variance of its own transform draw) and stays below ``variance_bound``."""
    q, fmt, x = QUANTIZERS[quantizer], parse_format(name), _grad()
    draws, gaps = [], []
    for i in range(300):
        gen = torch.Generator().manual_seed(i)
        out = q.quantize(x, fmt, gen, backend=Backend.REFERENCE).dequantize(torch.float64)
        draws.append(out)
        gaps.append(float(((out - x.double()) ** 2).sum())
                    - float(q.expected_variance(x, fmt, torch.Generator().manual_seed(i))))
    assert_unbiased(torch.stack(draws), x.double(), denormal_spacing=0.0)
    gaps_t = torch.tensor(gaps, dtype=torch.float64)
    expected = float(q.expected_variance(x, fmt, torch.Generator().manual_seed(0)))
    z = float(gaps_t.mean() / (gaps_t.std() / math.sqrt(len(gaps)) + 1e-12 * expected))
    assert abs(z) < 5, f"measured variance differs from expected_variance: z = {z:.2f}"
    measured = expected + float(gaps_t.mean())
    assert measured <= float(q.variance_bound(x, fmt)) * (1 + 5 * float(gaps_t.std()) / math.sqrt(300) / expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("name", ALL_FORMATS)
def test_nan_and_inf_stay_non_finite(device: str, backend: str, name: str) -> None:
    x = _grad(6, 40).to(device)
    x[0, 3], x[3, 7], x[4, 1] = float("nan"), float("inf"), -float("inf")
    for q in QUANTIZERS:
        for rounding in (Rounding.STOCHASTIC, Rounding.NEAREST):
            out = QUANTIZERS[q].quantize(x, name, torch.Generator(device).manual_seed(0), rounding,
                                         Backend(backend)).dequantize()
            assert not torch.isfinite(out[~torch.isfinite(x)]).any(), (q, name, rounding)
            if q in ("ptq", "psq") and not (name.startswith("nv") and q == "ptq"):
                # a group without non-finite values stays finite (rows 1, 2, 5 per row;
                # MX blocks are their own groups)
                per_row = q == "psq" or name.startswith("mx")
                if per_row:
                    assert torch.isfinite(out[[1, 2, 5]]).all(), (q, name)


@pytest.mark.parametrize("device", DEVICES)
def test_formats_quantize_on_every_device_like_on_the_cpu(device: str) -> None:
    # The counter noise and every scale rule are pure functions of the values: the same
    # codes on any device (the reference kernels on CUDA equal the CPU's bit for bit).
    x = _grad(8, 40)
    k_cpu, k_dev = kernels_for("reference", "cpu"), kernels_for("reference", device)
    for name in ALL_FORMATS:
        fmt = parse_format(name)
        a = k_cpu.quantize(x, fmt, Granularity.ROW, Rounding.STOCHASTIC, torch.tensor(5))
        b = k_dev.quantize(x.to(device), fmt, Granularity.ROW, Rounding.STOCHASTIC,
                           torch.tensor(5, device=device))
        assert torch.equal(a.codes.float(), b.codes.float().cpu()) and torch.equal(a.scale, b.scale.cpu())


@pytest.fixture
def force_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.kernels import compiled

    if not compiled.enabled():
        pytest.skip("torch.compile disabled (LOWBIT_COMPILE=0 or unavailable)")
    monkeypatch.setattr(compiled, "MIN_NUMEL", 0)  # every size through the compiled kernels
    monkeypatch.setattr(avx512, "_enabled", False)  # the compiled kernels, not the C quantizer


@pytest.mark.parametrize("name", ["int8", "int4a", "fp8_e5m2", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("rounding", [Rounding.STOCHASTIC, Rounding.NEAREST])
def test_compiled_kernels_equal_the_reference_on_every_kind_of_format(
        force_compiled, name: str, rounding: Rounding) -> None:
    # The same function through torch.compile: bit for bit the reference's codes, scales,
    # offsets, block scales and dequantized values, NaN/Inf rows included.
    x = _grad(12, 50)
    x[5, 2], x[7, 9] = float("nan"), float("inf")
    fmt, seed = parse_format(name), torch.tensor(11)
    auto, ref = kernels_for("auto", "cpu"), kernels_for("reference", "cpu")
    for gran in (Granularity.ROW, Granularity.TENSOR):
        a = auto.quantize(x, fmt, gran, rounding, seed)
        b = ref.quantize(x, fmt, gran, rounding, seed)
        if fmt.element is None:  # integer grids store NaN as code 0 (never a NaN cast): all equal
            assert torch.equal(a.codes, b.codes), (name, gran, rounding)
        for f in ("codes", "scale", "offset", "block_scale"):
            u, v = getattr(a, f), getattr(b, f)
            assert (u is None) == (v is None), f
            if u is not None and f == "codes":
                # A group holding NaN/Inf has a non-finite scale; its integer codes are
                # meaningless (NaN cast to int is undefined), so compare finite groups only.
                ok = torch.isfinite(x).all(dim=1) if gran is Granularity.ROW else torch.isfinite(x).all().expand(x.shape[0])
                u, v = u[ok], v[ok]
            if u is not None:
                assert torch.equal(u.float().nan_to_num(7.0), v.float().nan_to_num(7.0)), (name, gran, f)
        assert torch.equal(a.dequantize().nan_to_num(7.0), b.dequantize().nan_to_num(7.0))
