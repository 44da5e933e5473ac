"""Fast kernels against the reference on the same random stream: compiled quantizers
give identical codes, the fused epilogue equal values; the noise is uniform. The rounding
arithmetic itself: stochastic rounding's exact mean over the whole noise alphabet, grid
steps over every binade of float32/float64 (subnormals and the largest value included)."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from conftest import available_devices, int_codes, int_codes_fixed

from lowbit.formats import IntFormat, Rounding, counter_uniform, grid_step, stochastic_round
from lowbit.quantizers import Granularity
from lowbit.formats.scales import _div_rn_wide
from lowbit.functional import block_state
from lowbit.kernels import avx512, compiled, reference


@pytest.fixture
def force_compiled(monkeypatch: pytest.MonkeyPatch):
    if not compiled.enabled():
        pytest.skip("torch.compile disabled (LOWBIT_COMPILE=0 or unavailable)")
    monkeypatch.setattr(compiled, "MIN_NUMEL", 0)
    monkeypatch.setattr(avx512, "_enabled", False)  # the compiled kernels, not the C quantizer
    yield


@pytest.mark.parametrize("per_row", [True, False], ids=["row", "tensor"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_compiled_quantizer_equals_reference(force_compiled, per_row: bool, layout: str) -> None:
    x = torch.randn(96, 200) * torch.logspace(-3, 1, 96)[:, None]
    x[5] = 0.0
    if layout == "transposed":
        x = x.t()  # the ∇W path quantizes ∇Yᵀ without copying it
    seed = torch.tensor(987654321, dtype=torch.int64)
    gran = Granularity.ROW if per_row else Granularity.TENSOR
    for rounding in (Rounding.STOCHASTIC, Rounding.NEAREST):
        args = (x, IntFormat(4), gran, rounding, seed)
        c1, s1, *_ = compiled.run("quantize", reference.quantize, *args)
        c2, s2, *_ = reference.quantize(*args)
        assert torch.equal(c1, c2) and torch.equal(s1, s2)
    assert compiled._compiled.get("quantize") is not None


def test_compiled_epilogue_equals_reference(force_compiled) -> None:
    acc = torch.randint(-(2**20), 2**20, (64, 48), dtype=torch.int32)
    a, b = torch.rand(64, 1), torch.rand(1, 48)
    args = (acc, a, b, None, None, None, None, 0, None, torch.float32)
    torch.testing.assert_close(compiled.run("int8_epilogue", reference.int8_epilogue, *args),
                               reference.int8_epilogue(*args))


@pytest.mark.parametrize("compiled_kernels", [True, False], ids=["compiled", "reference"])
@pytest.mark.parametrize("extras", ["plain", "bias", "offsets"])
def test_epilogue_writes_over_the_accumulator_bitwise(monkeypatch: pytest.MonkeyPatch,
                                                      compiled_kernels: bool, extras: str) -> None:
    """``int8.epilogue`` to float32 reuses the int32 accumulator's bytes (the product is
    as large as the sum) and gives exactly ``reference.int8_epilogue``'s values, on both
    kernel sets; any other output dtype gets a new tensor."""
    from lowbit.kernels import Backend, int8, kernels_for

    if compiled_kernels and not compiled.enabled():
        pytest.skip("torch.compile disabled (LOWBIT_COMPILE=0 or unavailable)")
    monkeypatch.setattr(compiled, "MIN_NUMEL", 0 if compiled_kernels else 1 << 62)
    monkeypatch.setattr(avx512, "_enabled", False)  # the compiled kernels, not the C quantizer
    g = torch.Generator().manual_seed(0)
    m, n, k = 67, 45, 300
    acc = torch.randint(-(2**30), 2**30, (m, n), dtype=torch.int32, generator=g)
    a, b = torch.rand(m, 1, generator=g) * 1e-3, torch.rand(1, n, generator=g) * 1e-3
    off = (torch.randn(m, 1, generator=g), torch.randn(1, n, generator=g),
           torch.randint(-9999, 9999, (m, 1), dtype=torch.int32, generator=g),
           torch.randint(-9999, 9999, (1, n), dtype=torch.int32, generator=g)) \
        if extras == "offsets" else (None,) * 4
    bias = torch.randn(n, generator=g) if extras == "bias" else None
    kern = kernels_for(Backend.AUTO, "cpu")
    want = reference.int8_epilogue(acc, a, b, *off, k, bias, torch.float32)
    work = acc.clone()
    got = int8.epilogue(kern, work, a, b, *off, k, bias, torch.float32)
    assert got.dtype == torch.float32 and got.data_ptr() == work.data_ptr()
    assert torch.equal(got, want)
    half = int8.epilogue(kern, acc.clone(), a, b, *off, k, bias, torch.bfloat16)
    assert torch.equal(half, reference.int8_epilogue(acc, a, b, *off, k, bias, torch.bfloat16))


@pytest.mark.parametrize("native", [True, False], ids=["native", "compiled"])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["row-bias", "tensor", "transposed-a", "float64-scales"])
def test_narrow_output_by_row_panels_is_the_one_gemm_bitwise(
        monkeypatch: pytest.MonkeyPatch, native: bool, out_dtype: torch.dtype, case: str) -> None:
    """A bf16/float16 GEMM output computed in row panels (its int32 accumulator a panel at
    a time) has the bits of one GEMM and one epilogue: ``reference.int8_epilogue``'s. Also
    with ``a`` a transposed view (∇W's ``Q(∇Y)ᵀ``), and with scales whose float32
    epilogue could overflow (``int8.safe_scales``: one float64 epilogue, no panels)."""
    from lowbit.kernels import Backend, Encoded, amx, int8, kernels_for

    if not native and not compiled.enabled():
        pytest.skip("torch.compile disabled (LOWBIT_COMPILE=0 or unavailable)")
    monkeypatch.setattr(avx512, "_enabled", native and avx512._enabled)
    monkeypatch.setattr(compiled, "MIN_NUMEL", 1 << 62 if native else 0)
    monkeypatch.setattr(amx, "MIN_ROWS", 16)  # panels of ≥ 32 rows: 150 = 37 + 38 + 37 + 38
    monkeypatch.setattr(int8, "PANEL", 32 * 40)
    g = torch.Generator().manual_seed(3)
    m, k, n = 150, 96, 40
    codes = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    if case == "transposed-a":
        codes = codes.t().contiguous().t()  # column-major, as ∇W's left operand
    a_scale = torch.rand(1 if case == "tensor" else m, 1, generator=g) * 1e-2
    if case == "float64-scales":
        a_scale = a_scale * 1e36  # amax·k·2¹⁴ past float32's maximum
    a = Encoded(codes, a_scale)
    b = Encoded(torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g),
                torch.rand(1, n, generator=g) * 1e-2)
    bb = torch.randn(n, generator=g) if case == "row-bias" else None
    kern = kernels_for(Backend.AUTO, "cpu")
    assert int8.panel_rows(a, b, out_dtype) == 32
    got = int8.gemm(kern, a, b, bb, out_dtype)
    sa, sb = int8.safe_scales(a.scale, b.scale, k)
    assert (sa.dtype == torch.float64) == (case == "float64-scales")
    want = reference.int8_epilogue(torch._int_mm(codes.contiguous(), b.codes), sa, sb, None, None,
                                   None, None, k, bb, out_dtype)
    assert got.dtype == out_dtype and torch.equal(got, want)
    assert torch.equal(int8.gemm(kern, a, b, bb, out_dtype, panels=False), want)
    assert int8.panel_rows(a, b, torch.float32) is None  # written over the accumulator


def test_counter_noise_is_uniform_and_seed_dependent() -> None:
    n = 200_000
    u = counter_uniform((n,), torch.tensor(1)).double()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    # mean 1/2 and variance 1/12 within 5 standard errors (se of mean: √(1/12/n))
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 5 * (1 / 180 / n) ** 0.5  # Var(u²-ish) bound
    hist = torch.histc(u.float(), bins=20, min=0, max=1)
    expected = n / 20
    # χ² with 19 dof: mean 19, sd ≈ 6.2; 19 + 5·6.2 ≈ 50
    assert float(((hist - expected) ** 2 / expected).sum()) < 50
    # neighbouring elements and different seeds are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 5 / n**0.5
    v = counter_uniform((n,), torch.tensor(2)).double()
    assert abs(float(torch.corrcoef(torch.stack([u, v]))[0, 1])) < 5 / n**0.5


def test_counter_noise_of_two_calls_is_never_a_shifted_copy() -> None:
    """Two seeds that differ by j·K mod 2³² (K the index multiplier): with the seed added
    to i·K, the second call's noise was the first's shifted by j elements (all n − j
    equal); with the seed XORed in, the two share only chance values (~n²/2³² of them)."""
    n, k = 100_000, 0x27D4EB2D
    for s1, j in ((12345, 1), (2**31 + 7, 17), (99, 5000)):
        s2 = (s1 + j * k) % 2**32
        u = counter_uniform((n,), torch.tensor(s1))
        v = counter_uniform((n,), torch.tensor(s2))
        same = float((u[j:] == v[:-j]).double().mean())
        # chance coincidence of two 24-bit values: 2⁻²⁴ each; 1e-3 is > 10⁴ times that
        assert same < 1e-3, (s1, j, same)
        assert abs(float(torch.corrcoef(torch.stack([u[j:], v[:-j]]).double())[0, 1])) < 5 / n**0.5


def test_bhq_fast_transform_equals_reference(force_compiled) -> None:
    from lowbit.quantizers.bhq import bhq_transform

    x = torch.randn(64, 40) * torch.logspace(-4, 0, 64)[torch.randperm(64)][:, None]
    from lowbit.formats import Granularity, IntFormat, Rounding
    from lowbit.kernels import Backend, kernels_for

    t = bhq_transform(x)
    y_ref, y_fast = t.forward(x), None
    t.kernels = kernels_for(Backend.AUTO, x.device)  # the fused kernels (sparse group sums)
    y_fast = t.forward(x)
    # one summation order on every kernel set (lowbit.quantizers.bhq._group_sums): the same
    # bits; on an Intel Xeon the sparse product and a scatter-add round differently, and
    # the fused path once summed one way and the reference the other (scales one ulp apart)
    assert torch.equal(y_fast, y_ref)
    torch.testing.assert_close(t.inverse(y_fast), x, rtol=1e-4, atol=1e-6 * float(x.abs().max()))
    # the fused transform + quantize kernel gives the reference's codes and scales
    seed = torch.tensor(42)
    args = (IntFormat(4), Granularity.ROW, Rounding.STOCHASTIC, seed)
    fast = t.forward_quantize(x, *args)
    t.kernels = kernels_for(Backend.REFERENCE, x.device)
    ref = t.forward_quantize(x, *args)
    assert torch.equal(fast.codes, ref.codes) and torch.equal(fast.scale, ref.scale)


@pytest.mark.parametrize("sparse", [False, True])
def test_bhq_group_sums_are_the_weighted_row_sums(monkeypatch, sparse: bool) -> None:
    # both methods against the definition Σ_{r∈g} w_r x_r in float64: float32 rounding of
    # a group's few terms (≤ 15 in 300 seeds; γ₁₆ = 16·2⁻²⁴ ≈ 9.5e-7 of the sum of |terms|
    # bounds it, so rtol 1e-6 of that sum); and one method for every kernel set
    import lowbit.quantizers.bhq as bhq
    from lowbit.kernels import Backend, Impl, kernels_for

    if sparse:  # the product off the CPU, forced here
        monkeypatch.setattr(bhq, "SEQUENTIAL_DEVICES", frozenset())
        monkeypatch.setattr(bhq, "SPARSE_MIN_NUMEL", 0)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 72, generator=g) * torch.logspace(-4, 0, 256)[torch.randperm(256, generator=g)][:, None]
    t = bhq.bhq_transform(x)
    w = t.v * t.scale
    got = bhq._group_sums(x, w, t)
    terms = x.double() * w.double()[:, None]
    want = terms.new_zeros(t.n_groups, 72).index_add_(0, t.group, terms)
    size = terms.abs().new_zeros(t.n_groups, 72).index_add_(0, t.group, terms.abs())
    assert bool(((got.double() - want).abs() <= 1e-6 * size + 1e-30).all())
    assert torch.equal(bhq._group_sums(x.double(), w.double(), t), want)
    for backend in Backend:  # no kernel set sums its own way
        assert kernels_for(backend, "cpu").lookup("bhq_group_sums", Impl.COMPILED) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2])
def test_bhq_group_sums_on_the_cpu_add_rows_in_ascending_order(dtype: torch.dtype, threads: int) -> None:
    # the CPU's definition, written out: each group's sum starts at +0 and adds its rows'
    # rounded products w_r·x_r one by one in ascending row order; the reference and the
    # native kernel (every kernel set) give exactly those bits, for rows over 256 columns
    # (the kernel's bands), strided rows, and NaN/±Inf (which stay non-finite)
    import lowbit.quantizers.bhq as bhq
    from lowbit.kernels import Backend, kernels_for

    g = torch.Generator().manual_seed(8)
    base = torch.randn(300, 301, generator=g) * torch.logspace(-20, 20, 301)
    base[3, 5], base[7, 300] = float("nan"), float("inf")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for x in (base.to(dtype), base[:, 2:290].to(dtype)):
            t = bhq.bhq_transform(x.float().nan_to_num(0.0, 0.0, 0.0))
            w = t.v * t.scale
            want = torch.zeros(t.n_groups, x.shape[1])
            for r in range(x.shape[0]):  # the definition, one row at a time
                want[t.group[r]] += x[r].float() * w[r]
            for backend in Backend:
                got = kernels_for(backend, "cpu").run("bhq_group_sums", x, w, t)
                assert torch.equal(got.nan_to_num(1.5), want.nan_to_num(1.5)), backend
                assert torch.equal(got.isnan(), want.isnan())
    finally:
        torch.set_num_threads(old)


# -- exact arithmetic of the rounding (issue 11, items 9 and 10) -------------------------
DEVICES = available_devices()
ALPHABET = torch.arange(2**24, dtype=torch.float32) * 2.0**-24  # every value counter_uniform takes

# values in many binades, both signs, with fractional parts near 0, ½ and 1 on the grid
SR_VALUES = [2.0**-30, 0.5 + 2.0**-24, 5.25 + 2.0**-20, 100.37, 127.99999, 2.0**20 + 0.625,
             -1e-30, -0.3, -100.37, -(2.0**22) - 0.25]


def _exact_mean_bias(y: torch.Tensor, rounded: torch.Tensor) -> Fraction:
    """|mean over the whole noise alphabet − y| in grid steps, in exact rational arithmetic;
    ``rounded`` holds one result per alphabet value, each ``floor(y)`` or ``floor(y) + 1``."""
    low = torch.floor(y)
    ups = int((rounded == low + 1).sum())
    assert ups + int((rounded == low).sum()) == 2**24, "rounded off the two neighbours"
    return abs(Fraction(float(low)) + Fraction(ups, 2**24) - Fraction(float(y)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_stochastic_rounding_exact_mean_over_noise_alphabet(dtype: torch.dtype, device: str) -> None:
    # lowbit.formats promises bias < 2^-24 of a step; the mean over all 2^24 equally likely
    # noise values is exactly E[q], so this checks the promise with no statistics at all.
    alphabet = ALPHABET.to(device)
    for v in SR_VALUES:
        y = torch.tensor(v, dtype=dtype, device=device)
        bias = _exact_mean_bias(y, stochastic_round(y, alphabet))  # y broadcast over u
        assert bias < Fraction(1, 2**24), f"y={v!r} ({dtype}): bias {float(bias):.3g} steps"


def test_floor_y_plus_u_is_biased_beyond_promise() -> None:
    # The old form floor(y + u) in float32 rounds y + u first: the test above would catch it.
    y = torch.tensor(100.37, dtype=torch.float32)
    assert _exact_mean_bias(y, torch.floor(y + ALPHABET)) > Fraction(1, 2**20)


def test_counter_noise_lies_on_the_alphabet() -> None:
    u = counter_uniform((100_000,), torch.tensor(3))
    k = u.double() * 2**24
    assert torch.equal(k, torch.floor(k)) and float(k.min()) >= 0 and float(k.max()) < 2**24


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_row", [True, False], ids=["row", "tensor"])
def test_reference_kernel_is_grid_step_then_stochastic_round(per_row: bool, device: str) -> None:
    # The kernel's codes are exactly stochastic_round(x / step, u): so the exact-mean
    # property above carries over to every quantizer built on it.
    x = torch.randn(6, 9, dtype=torch.float64) * torch.tensor([1e-300, 1e-5, 1.0, 0.0, 1e200, 3.0])[:, None]
    for dt in (torch.float32, torch.float64):
        xd = x.to(dt).to(device)
        seed = torch.tensor(77, device=device)
        codes, step = int_codes(xd, 7, per_row, True, seed)
        a = xd.abs()
        amax = a.amax(1, keepdim=True) if per_row else a.amax().reshape(1, 1)
        want_step = grid_step(amax, 7)
        assert step.dtype == dt and torch.equal(step, want_step)
        safe = torch.where(want_step == 0, torch.ones_like(want_step), want_step)
        want = stochastic_round(xd / safe, counter_uniform(xd.shape, seed))
        assert torch.equal(codes, want.to(torch.int8))
        if device != "cpu":  # the counter noise does not depend on the device
            cpu = int_codes(xd.cpu(), 7, per_row, True, seed.cpu())
            assert torch.equal(codes.cpu(), cpu[0]) and torch.equal(step.cpu(), cpu[1])


def _all_binades(dtype: torch.dtype, n: int = 4000) -> torch.Tensor:
    """Positive finite values spread over every binade of ``dtype``, subnormals and the
    largest finite value included."""
    g = torch.Generator().manual_seed(5)
    if dtype == torch.float32:
        bits = torch.randint(1, 0x7F800000, (n,), generator=g, dtype=torch.int64).to(torch.int32)
        x = bits.view(torch.float32)
    else:
        bits = torch.randint(1, 0x7FF0000000000000, (n,), generator=g, dtype=torch.int64)
        x = bits.view(torch.float64)
    fi = torch.finfo(dtype)
    extremes = torch.tensor([fi.smallest_normal * 2.0**-23 if dtype == torch.float32 else 5e-324,
                             fi.smallest_normal, fi.max, 1.0], dtype=dtype)
    return torch.cat([x, extremes])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("qmax", [1, 7, 127])
def test_grid_step_is_smallest_step_covering_absmax(dtype: torch.dtype, qmax: int, device: str) -> None:
    amax = _all_binades(dtype).to(device)
    step = grid_step(amax, qmax)
    assert step.dtype == dtype and bool(torch.isfinite(step).all()) and bool((step > 0).all())
    assert bool((amax / step <= qmax).all())  # |x| ≤ amax maps inside the grid
    below = torch.nextafter(step, torch.zeros_like(step))  # one ulp less would not
    assert bool(((below == 0) | (amax / below > qmax)).all())
    z = grid_step(torch.tensor([0.0, float("nan"), float("inf")], dtype=dtype, device=device), qmax)
    assert float(z[0]) == 0 and torch.isnan(z[1]) and torch.isinf(z[2])


def _grid_step_chained(absmax: torch.Tensor, qmax: float) -> torch.Tensor:
    """float64 grid_step as it was until 2026-12-03: one nextafter after another."""
    step = absmax / qmax
    zero, inf = torch.zeros_like(step), torch.full_like(step, torch.inf)
    for _ in range(3):
        step = torch.nextafter(step, zero)
    for _ in range(6):
        step = torch.where(absmax / step > qmax, torch.nextafter(step, inf), step)
    return step


@pytest.mark.parametrize("qmax", [1, 3, 6, 7, 15, 127, 448, 57344])
def test_float64_grid_step_is_the_chained_loop_bitwise(qmax: int) -> None:
    # The float64 step from independent candidates (no chain: 80 s of Inductor code
    # generation compiled) against the chained loop it replaces, eager and compiled, on
    # every binade, their neighbours and random mantissas: every bit equal.
    gen = torch.Generator().manual_seed(3)
    amax = _all_binades(torch.float64)
    near = torch.cat([torch.nextafter(amax, torch.zeros_like(amax)),
                      torch.nextafter(amax, torch.full_like(amax, torch.inf))])
    rand = torch.exp2(torch.randint(-1074, 1024, (20000,), generator=gen).double()) \
        * (1 + torch.rand(20000, generator=gen, dtype=torch.float64))
    amax = torch.cat([amax, near, rand, torch.tensor([0.0, torch.inf, 5e-324, 1e-323],
                                                     dtype=torch.float64)])
    amax = amax[torch.isfinite(amax) | torch.isinf(amax)].abs()
    want = _grid_step_chained(amax, float(qmax))
    assert torch.equal(grid_step(amax, qmax).view(torch.int64), want.view(torch.int64))
    if compiled.enabled():
        got = torch.compile(grid_step, dynamic=True, fullgraph=True)(amax[:4096], qmax)
        assert torch.equal(got.view(torch.int64), want[:4096].view(torch.int64))
    assert torch.isnan(grid_step(torch.tensor([float("nan")], dtype=torch.float64), qmax)).all()


def test_float64_route_of_div_rn_is_correctly_rounded() -> None:
    # What div_rn runs under torch.compile on CUDA, where Triton's float32 `/` is not
    # correctly rounded (div.full.f32: 29% of random quotients differed on an H200):
    # a·(1/b) in float64, rounded once. It must equal IEEE float32 division bit for bit,
    # over every binade (subnormal and overflowing quotients included), in the kernels'
    # domain |x/step| ≤ 127, and on exactly representable quotients.
    g = torch.Generator().manual_seed(0)
    n = 1 << 20

    def anywhere(n: int) -> torch.Tensor:  # positive finite float32 in every binade
        return torch.randint(1, 0x7F800000, (n,), generator=g, dtype=torch.int64).to(torch.int32).view(torch.float32)

    a = anywhere(n) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    b = anywhere(n)
    assert torch.equal(_div_rn_wide(a, b), a / b)
    x = (torch.rand(n, generator=g) * 2 - 1) * b * 127
    assert torch.equal(_div_rn_wide(x, b), x / b)
    k = torch.randint(-127, 128, (n,), generator=g).float()
    assert torch.equal(_div_rn_wide(k * b, b), (k * b) / b)


@pytest.mark.parametrize("device", DEVICES)
def test_constant_subnormal_gradients_are_exact(device: str) -> None:
    # Issue 11 item 9's inputs: 1e-42 came out 6.7% too large, 1e-44 as 0. A constant
    # row maps to |y| ≤ qmax exactly on the grid here, so every draw must return it.
    for v in (1e-42, 1e-44, 1.4e-45):
        x = torch.full((3, 5), v, dtype=torch.float32, device=device)
        for per_row in (True, False):
            codes, step = int_codes(x, 127, per_row, True, torch.tensor(1, device=device))
            assert torch.equal(codes.float() * step, x), v


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fixed_grid_kernel_unbiased_at_extremes(dtype: torch.dtype, device: str) -> None:
    # The predicted-range kernel: a grid from a given amax, values inside it. Mean over
    # 2,000 seeds against x, 5σ (σ from the draws; rounding noise is bounded).
    scales = [1e-42, 3e-39, 1e30] if dtype == torch.float32 else [1e-300, 1e-310, 1e300]
    for s in scales:
        x = (torch.rand(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * 2
        x = (x * s).to(dtype).to(device)
        amax = (x.abs().amax(1, keepdim=True) * 1.5).to(dtype)
        draws = torch.stack([
            (lambda c, st: c.double() * st.double())(*int_codes_fixed(
                x, amax, 7, True, torch.tensor(i, device=device))[:2]) for i in range(2000)])
        ratio = (draws / x.double()).cpu()  # relative to each value: no absolute slack
        m, se = ratio.mean(0), ratio.std(0) / 2000**0.5
        assert bool(((m - 1).abs() <= 5 * se + 1e-6).all()), (s, float((m - 1).abs().max()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_compiled_quantizer_equals_reference_at_extremes(force_compiled, dtype: torch.dtype,
                                                         device: str) -> None:
    # Subnormal, huge and ordinary rows: the compiled kernel must not flush subnormals or
    # round the step differently.
    x = torch.randn(8, 64, dtype=torch.float64)
    if dtype == torch.float32:
        mags = [1e-45, 1e-42, 1e-39, 1e-30, 1.0, 1e30, 3e37, 0.0]
    else:
        mags = [5e-324, 1e-315, 1e-300, 1e-30, 1.0, 1e300, 1e307, 0.0]
    x = (x * torch.tensor(mags, dtype=torch.float64)[:, None]).to(dtype).to(device)
    seed = torch.tensor(2024, device=device)
    for per_row in (True, False):
        for stochastic in (True, False):
            c1, s1 = int_codes(x, 7, per_row, stochastic, seed, fused=True)
            c2, s2 = int_codes(x, 7, per_row, stochastic, seed)
            assert torch.equal(c1, c2) and torch.equal(s1, s2), (per_row, stochastic)


def _views(rows: int, cols: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """(rows, cols) int8 operands in every layout a caller can hand a GEMM: contiguous,
    transposed, sliced, a transposed (N, 1) weight (strides (1, 1) on a (1, N) matrix),
    and rows that overlap (an im2col view: row stride < cols)."""
    base = torch.randint(-127, 128, (rows * cols + cols,), dtype=torch.int8, generator=gen)
    views = {"contiguous": base[:rows * cols].view(rows, cols),
             "transposed": base[:rows * cols].view(cols, rows).t(),
             "sliced": base.view(-1)[: (rows + 1) * cols].view(rows + 1, cols)[1:],
             "overlapping": base.as_strided((rows, cols), (max(cols // 2, 1), 1))}
    if rows == 1:
        views["degenerate"] = base[:cols].view(cols, 1).t()  # strides (1, 1)
    return views


@pytest.mark.parametrize("m,k,n", [(9, 1, 5), (1, 7, 5), (5, 7, 1), (1, 1, 1), (4, 9, 3), (1, 3, 9)])
def test_int_mm_batched_exact_on_any_strides(m: int, k: int, n: int) -> None:
    """``int8.int_mm_batched`` (one stride check per batch) equals the int32 product of
    every entry, on batches of every layout of :func:`_views` (entries 3 rows/columns of
    storage apart, so entry ``i`` is the same view shifted), a transposed batch (``mT``,
    as attention hands its K and V codes) and an expanded one (stride 0: GQA)."""
    from lowbit.kernels import int8

    gen = torch.Generator().manual_seed(1)

    def batches(rows: int, cols: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, v in _views(rows, cols, gen).items():
            base = torch.randint(-127, 128, (v.storage_offset() + 3 * 64 + 4 * rows * cols + 64,),
                                 dtype=torch.int8, generator=gen)
            out[name] = base.as_strided((3, rows, cols), (rows * cols + 5, *v.stride()))
        out["mT"] = torch.randint(-127, 128, (3, cols, rows), dtype=torch.int8, generator=gen).mT
        out["expanded"] = torch.randint(-127, 128, (1, rows, cols), dtype=torch.int8,
                                        generator=gen).expand(3, rows, cols)
        return out

    for (na, a), (nb, b) in ((x, y) for x in batches(m, k).items() for y in batches(k, n).items()):
        got = torch.empty(3, m, n, dtype=torch.int32)
        int8.int_mm_batched(a, b, got)
        assert torch.equal(got, a.int() @ b.int()), (na, a.stride(), nb, b.stride())
    int8.int_mm_batched(torch.empty(0, m, k, dtype=torch.int8), torch.empty(0, k, n, dtype=torch.int8),
                        torch.empty(0, m, n, dtype=torch.int32))  # no entries: nothing to do


@pytest.mark.parametrize("m,k,n", [(9, 1, 5), (1, 7, 5), (5, 7, 1), (1, 1, 1), (4, 9, 3), (1, 3, 9)])
def test_int_mm_exact_on_any_strides(m: int, k: int, n: int) -> None:
    """``int8.int_mm`` equals the int32 product on every layout of both operands:
    layouts ``torch._int_mm`` misreads on the CPU are copied first (fault kind 24)."""
    from lowbit.kernels import fp8, int8

    gen = torch.Generator().manual_seed(0)
    for (na, a), (nb, b) in ((x, y) for x in _views(m, k, gen).items() for y in _views(k, n, gen).items()):
        exact = a.int() @ b.int()
        assert torch.equal(int8.int_mm(a, b), exact), (na, a.stride(), nb, b.stride())
        for t in (a, b):  # the operand fp8's _scaled_mm is handed: same values, readable strides
            r, c = fp8.row_major(t), fp8.col_major(t)
            assert torch.equal(r, t) and torch.equal(c, t)
            assert r.stride(1) == 1 and r.stride(0) >= r.shape[1]
            assert c.stride(0) == 1 and c.stride(1) >= c.shape[0]


@pytest.mark.parametrize("layer", ["linear", "conv", "attention"])
def test_huge_gradients_stay_finite_on_the_integer_path(layer: str) -> None:
    """Gradients near 1e36: an integer GEMM's float32 epilogue ``(float(acc)·s_a)·s_b``
    would pass float32's maximum in its intermediate although the product does not (review
    finding: ∇V inf under ``auto`` where ``reference`` was finite). The epilogue then runs in
    float64 (``lowbit.kernels.int8.safe_scales``): the integer path is finite wherever the
    simulated reference is, and equal to it to float rounding (the two paths quantize the
    same operands; the sums' rounding differs, and a stochastic-rounding code derived
    from a rounded value may flip — hence rtol 1e-3)."""
    import lowbit
    from lowbit.attention import scaled_dot_product_attention

    def grads(backend: str, scale: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        cfg = lowbit.FQTConfig.from_recipe("fqt-psq-8", backend=backend, seed=1)
        if layer == "attention":
            q, k, v = (torch.randn(1, 2, 128, 64).requires_grad_() for _ in range(3))
            out, params = scaled_dot_product_attention(q, k, v, state=block_state(cfg)), [q, k, v]
        else:
            model = torch.nn.Linear(64, 48) if layer == "linear" else torch.nn.Conv2d(8, 16, 3, padding=1)
            lowbit.convert(model, cfg)
            x = torch.randn(32, 64, requires_grad=True) if layer == "linear" else torch.randn(4, 8, 8, 8, requires_grad=True)
            out, params = model(x), [x, *model.parameters()]
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)) * scale)
        return [p.grad for p in params]

    for scale in (1.0, 1e36):
        fast, ref = grads("auto", scale), grads("reference", scale)
        for a, b in zip(fast, ref, strict=True):
            assert bool(b.isfinite().all()), "the reference itself overflows: the case is mis-sized"
            assert bool(a.isfinite().all())
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


@pytest.mark.parametrize(("layer", "recipe"), [("linear", "fqt-psq-8"), ("conv", "fqt-psq-8"),
                                               ("attention", "fqt-psq-8"), ("linear", "fqt-psq-8a")])
def test_float64_steps_past_float64s_range_stay_finite_on_the_integer_path(layer: str, recipe: str) -> None:
    """Fault kind 254 (a new user's trial): float64 has no wider dtype, so the guard above
    left a float64 epilogue ``(float(acc)·s_a)·s_b`` as it was; x ≈ 1e307 beside W ≈ 1e-307
    gave inf under ``auto`` where ``reference`` and torch give 1.6. A power of two now moves
    from ``s_a`` to ``s_b`` (exact): finite wherever the reference is, equal to it to float
    rounding (rtol as above)."""
    import lowbit
    from lowbit.attention import scaled_dot_product_attention

    big = torch.finfo(torch.float64).max / 64

    def run(backend: str) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        cfg = lowbit.FQTConfig.from_recipe(recipe, backend=backend, seed=1)
        if layer == "attention":  # ∇O near the range: ∇S's steps, then ∇Q = ∇S·K
            q, k, v = (torch.randn(2, 2, 128, 16, generator=g, dtype=torch.float64).requires_grad_()
                       for _ in range(3))
            out, leaves = scaled_dot_product_attention(q, k, v, state=block_state(cfg)), [q, k, v]
            out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64) * big / 4)
            return [out.detach(), *(t.grad for t in leaves)]
        got = []
        # the forward's steps (x huge beside a small W), then the backward's (∇Y huge); every
        # step a normal number (a subnormal step rounds each path's values differently)
        for xs, ws, gs in ((1e306, 1e-300, 1.0), (1e-300, 1e-300, 1e306)):
            shape = (8, 16) if layer == "linear" else (2, 3, 8, 8)
            x = (torch.randn(shape, generator=g, dtype=torch.float64) * xs).requires_grad_()
            wshape = (5, 16) if layer == "linear" else (4, 3, 3, 3)
            w = (torch.randn(wshape, generator=g, dtype=torch.float64) * ws).requires_grad_()
            fn = lowbit.functional.fqt_linear if layer == "linear" else lowbit.functional.fqt_conv2d
            out = fn(x, w, None, block_state(cfg))  # (a bare config: a new noise stream per call)
            out.backward(torch.randn(out.shape, generator=g, dtype=torch.float64) * gs)
            got += [out.detach(), x.grad, w.grad]
        return got

    for a, b in zip(run("auto"), run("reference"), strict=True):
        assert bool(b.isfinite().all()), "the reference itself overflows: the case is mis-sized"
        assert bool(a.isfinite().all())
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()))


def test_the_float64_shift_is_taken_only_where_it_is_exact() -> None:
    """A review of fault kind 254's first form: the power of two moved between float64
    steps also where the epilogue has offsets (an asymmetric grid's, in real units: 4.46e10
    for 1.62e8), pushed a small per-row step into subnormals (80 ulp off), and overflowed a
    float32 ``b_scale``. It now moves only with ``shift`` (offset-free epilogues), between
    float64 steps, where every step stays normal; then ``s_a·s_b`` is unchanged exactly."""
    from lowbit.kernels import int8

    f64 = torch.float64
    sa, sb = torch.tensor([[1e307], [3e300]], dtype=f64), torch.tensor([[3e-300, 7e-301]], dtype=f64)
    a, b = int8.safe_scales(sa, sb, 16, shift=True)
    assert a.dtype == b.dtype == f64 and bool((a < sa).all()) and torch.equal(a * b, sa * sb)
    assert bool(a.max() * 16 * 2.0**14 < torch.finfo(f64).max)
    for args in ((sa, sb, 16, False),  # offsets: not moved
                 (torch.tensor([[1e304], [3.3e-308]], dtype=f64), sb, 4096, True),  # a step would go subnormal
                 (sa, torch.tensor([[3e34]]), 16, True),  # a float32 b_scale
                 (sa, torch.tensor([[1e306]], dtype=f64), 16, True)):  # b's step past the range
        a, b = int8.safe_scales(*args[:3], shift=args[3])
        assert a is args[0] and b is args[1]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_row_leaves_the_other_rows_bits(bad: float) -> None:
    """A review (2026-12-05): the int8 epilogue's float32/float64 decision read the call's
    largest step, which one NaN or infinite row made non-finite, so every other row of the
    call ran in float64 (1-ulp differences). The other rows now have the bits of the call
    without that row, on the dispatcher's epilogue and on a converted Linear; the bad
    row stays non-finite."""
    import lowbit
    from lowbit.kernels import int8, kernels_for

    k = kernels_for("auto", "cpu")
    g = torch.Generator().manual_seed(0)
    acc = torch.randint(-2**24, 2**24, (4, 64), dtype=torch.int32, generator=g)
    sa, sb = torch.rand(4, 1, generator=g), torch.rand(1, 64, generator=g)
    bad_sa = sa.clone()
    bad_sa[0] = bad
    got = int8.epilogue(k, acc.clone(), bad_sa, sb, None, None, None, None, 64, None, torch.float32)
    want = int8.epilogue(k, acc[1:].clone(), sa[1:], sb, None, None, None, None, 64, None, torch.float32)
    assert torch.equal(got[1:], want) and not got[0].isfinite().any()
    cfg = lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0)
    cfg = lowbit.FQTConfig(activation=lowbit.OperandSpec(granularity="row"), grad_input=cfg.grad_input,
                           grad_weight=cfg.grad_weight, seed=0)
    layer = lowbit.convert(torch.nn.Linear(64, 32), cfg)
    x = torch.randn(8, 64, generator=g) * 1e3
    x_bad = x.clone()
    x_bad[0, 5] = bad
    with torch.no_grad():
        y, y_bad = layer(x), layer(x_bad)
    assert torch.equal(y[1:], y_bad[1:]) and not y_bad[0].isfinite().all()


def test_int_mm_refuses_sums_that_could_wrap() -> None:
    """``K > MAX_K`` int8 products can pass int32's range (−2³¹ came back for +2³¹ on
    ``torch._int_mm``): refused, naming K, as lowbit's own GEMMs split such sums."""
    from lowbit.kernels import int8

    k = int8.MAX_K + 1
    a = torch.full((1, 1, k), -128, dtype=torch.int8)
    b = torch.full((1, k, 1), -128, dtype=torch.int8)
    for call in (lambda: int8.int_mm_batched(a, b), lambda: int8.int_mm(a[0], b[0])):
        with pytest.raises(ValueError, match=f"K = {k} int8 products can pass int32's range"):
            call()
    assert int(int8.int_mm(a[0, :, :-1], b[0, :-1])) == int8.MAX_K * 128 * 128  # at MAX_K: exact


def test_gemm_panels_are_on_by_default_with_and_without_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    """``int8.PANEL`` None: panels of ``AUTO_PANEL`` elements on every CPU (gpt2-block's
    bf16 peak 67.8 → 57.3 MB with AMX, whose right operand is packed once for all
    panels; 55.1 without); a set ``PANEL`` wins."""
    from lowbit.kernels import amx, int8

    monkeypatch.setattr(int8, "PANEL", None)
    for has_amx in (False, True):
        monkeypatch.setattr(amx, "available", lambda has_amx=has_amx: has_amx)
        assert int8.panel_size() == int8.AUTO_PANEL == 1 << 20
    monkeypatch.setattr(int8, "PANEL", 4096)
    assert int8.panel_size() == 4096
    monkeypatch.setattr(int8, "PANEL", 0)
    assert int8.panel_size() == 0
