"""Shared test helpers: devices to run on, and a z-test for unbiasedness."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)  # small tensors: one thread avoids OpenMP overhead and oversubscription


NO_CUDA = "no CUDA device here (CI has none): benchmarks/gpu_check.sh runs these on a GPU"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: a test case that runs on a CUDA device "
                            "(selected by `pytest -m cuda`; skipped where there is none)")


def available_devices() -> list:
    """Device parameters: ``"cpu"``, and ``"cuda"`` marked ``cuda`` (``pytest -m cuda``
    selects it), skipped with a reason where no CUDA device is present."""
    return ["cpu", pytest.param("cuda", marks=[
        pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)])]


# float32 rounding of a transform + inverse (a few ulps of the largest value), and of
# results rounded to float32 subnormals (absolute spacing 1.4e-45), is not bias
FLOAT_EPS = 1e-6
DENORMAL_SPACING = 1.4e-45


def _z(samples: torch.Tensor, target: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    n = samples.shape[0]
    mean = samples.mean(0)
    spread = samples.amax(0) - samples.amin(0)
    keep = spread > 0
    # Everything in units of each element's spread: a spread of 1e-269 (a row of tiny
    # values beside huge ones, on the unit scale) squared underflows float64 to 0, and
    # gap/se became 0/0 = NaN (or x/0 = inf). (samples − mean)/spread lies in [−1, 1].
    unit = torch.where(keep, spread, torch.ones_like(spread))
    # Agresti–Coull-style guard: rounding that jumps to the next level only a handful of
    # times in S draws makes the sample variance unreliable (and |z| too large); two
    # pseudo-jumps of the observed spread keep the test honest for such rare events.
    se = ((((samples - mean) / unit).var(0) + 2 / n) / n) ** 0.5
    gap = ((mean - target).abs() - slack).clamp_min(0) / unit
    return (gap / se)[keep]


def assert_unbiased(samples: torch.Tensor, target: torch.Tensor, z_max: float = 5.0,
                    denormal_spacing: float = DENORMAL_SPACING) -> float:
    """z-test of ``E[samples] == target``; returns the largest |z|.

    Two views, both at ``z_max`` (5σ): every element whose draws vary, and 16 random
    Gaussian projections of the whole tensor (a bias confined to rarely-varying elements,
    e.g. values far below one grid step that round to 0 in all S draws, still moves the
    projections). Each mean of S i.i.d. draws has standard error σ/√S (CLT; rounding noise
    is bounded, so S ≥ a few hundred is enough). Gaps below float32 rounding
    (``FLOAT_EPS`` of the unit scale) are not counted as bias, nor are gaps of a few
    float32 subnormal spacings (``denormal_spacing``; pass 0 for float64 draws, which
    have no such rounding). At 5σ a false alarm has probability
    < 6e-7 per statistic, < 1e-3 for 1,000 statistics."""
    s = samples.double().flatten(1)
    t = target.double().flatten()
    top = t.abs().amax()
    scale = torch.where(top > 0, top, torch.ones_like(top))  # compare on a unit scale
    s, t = s / scale, t / scale
    ulp = 16 * denormal_spacing / scale if denormal_spacing else torch.zeros_like(scale)
    proj = torch.randn(t.numel(), 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    slack = FLOAT_EPS * (1 + t.abs()) + ulp
    slack_p = FLOAT_EPS * (1 + (t.abs() @ proj.abs())) + ulp * proj.abs().sum(0)
    z = torch.cat([_z(s, t, slack), _z(s @ proj, t @ proj, slack_p)])
    zmax = float(z.max()) if z.numel() else 0.0
    assert zmax < z_max, f"bias detected: max |z| = {zmax:.2f} ≥ {z_max}"
    if not z.numel():  # nothing varied at all: the draws must equal the target
        assert torch.all((s.mean(0) - t).abs() <= slack), "constant draws differ from the target"
    return zmax


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def int_codes(x: torch.Tensor, qmax: int, per_row: bool, stochastic: bool, seed: torch.Tensor,
              fused: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and steps of ``x`` on the symmetric grid ``{−qmax..qmax}`` through the
    format API: the reference kernel, or (``fused``) its ``torch.compile``d copy."""
    from lowbit.formats import IntFormat, Rounding
    from lowbit.kernels import compiled, reference
    from lowbit.quantizers import Granularity

    args = (x, IntFormat((qmax + 1).bit_length()), Granularity.ROW if per_row else Granularity.TENSOR,
            Rounding.STOCHASTIC if stochastic else Rounding.NEAREST, seed)
    codes, step, *_ = compiled.run("quantize", reference.quantize, *args) if fused else reference.quantize(*args)
    return codes, step


def int_codes_fixed(x: torch.Tensor, amax: torch.Tensor, qmax: int, stochastic: bool,
                    seed: torch.Tensor, fused: bool = False) -> tuple[torch.Tensor, ...]:
    """:func:`int_codes` on a grid fixed by ``amax``: ``(codes, step, observed, clipped
    count, clipped Σ², Σ x²)`` (reference kernel or its compiled copy)."""
    from lowbit.formats import IntFormat, Rounding
    from lowbit.kernels import compiled, reference

    args = (x, amax, IntFormat((qmax + 1).bit_length()),
            Rounding.STOCHASTIC if stochastic else Rounding.NEAREST, seed)
    return compiled.run("quantize_fixed", reference.quantize_fixed, *args) if fused \
        else reference.quantize_fixed(*args)


class num_threads:
    """``torch.set_num_threads(n)`` for a ``with`` block (restored after it)."""

    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


@pytest.fixture
def int_mm_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Integer GEMMs on ``torch._int_mm`` (or the AMX/VNNI kernels) even on a CPU without
    an int8 dot product, where ``auto`` sums them on float32 units: for tests that count
    which integer kernel runs. The float32 route (the same exact sums) has its own tests,
    ``tests/core/test_exact_f32.py``."""
    from lowbit.kernels import exact_f32

    monkeypatch.setattr(exact_f32, "ENGINE", "int")


def assert_attention_heads_counted_as_int8() -> None:
    """``nn.MultiheadAttention`` (4 heads of 128 × 64, batch 2) converted under
    ``fqt-psq-8``: its head products go through ``lowbit::int8_bmm``, counted by
    ``lowbit.coverage`` as int8 GEMMs with the batch's FLOPs, and the step is all low-bit.
    Shared by the AMX and the VNNI kernels' tests (the op runs whichever the CPU has)."""
    import lowbit
    from torch import nn

    class SelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(256, 4, batch_first=True)  # heads of 128 × 64

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    model = lowbit.convert(SelfAttention(), lowbit.FQTConfig.from_recipe("fqt-psq-8", seed=0))
    rep = lowbit.coverage(model, torch.randn(2, 128, 256, requires_grad=True))
    bmm = [r for r in rep.rows if r.op == "lowbit.int8_bmm"]
    assert bmm and all(r.kind == "int8" and r.formats == ("int8", "int8") for r in bmm)
    assert sum(r.flops for r in bmm) == 7 * 2 * (2 * 4) * 128 * 128 * 64  # 7 products per head
    assert rep.real_share == 1.0


class SelfAttention(torch.nn.Module):
    """An ``nn.MultiheadAttention`` of ``width`` features and 2 heads, as self-attention."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


def same_nested(a: object, b: object) -> bool:
    """Nested dicts/lists of tensors and plain values (state dicts), compared exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_nested(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_nested, a, b))
    return a == b
