"""Properties of the gradient quantizers: unbiased, variance within the analytic bound,
ordering BHQ < PSQ < PTQ on unequal rows, edge cases, NaN/Inf propagation."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_unbiased

import lowbit
from lowbit.formats import IntFormat
from lowbit.quantizers import QUANTIZERS
from lowbit.quantizers.bhq import bhq_transform
from lowbit.quantizers.hadamard import hadamard_matrix

NAMES = list(QUANTIZERS)


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
