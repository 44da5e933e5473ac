"""Bin utilization: a gradient's values on each quantizer's grid."""

from __future__ import annotations

import pytest
import torch

from lowbit.analysis import bin_histogram, bin_utilization, plot_bin_utilization
from lowbit.analysis.bins import mapped_values

QUANT = ["ptq", "psq", "bhq", "hadamard"]


def unequal_rows() -> torch.Tensor:
    """A gradient whose rows span 6 orders of magnitude (a few hard samples dominate)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 40, generator=g) * torch.logspace(-3, 3, 64)[:, None]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fractions_and_counts(bits: int) -> None:
    a = unequal_rows()
    hists = bin_utilization(a, bits, QUANT, torch.Generator().manual_seed(1))
    for q, h in hists.items():
        qmax = 2 ** (bits - 1) - 1
        assert h.levels == list(range(-qmax, qmax + 1))
        assert 0 <= h.effective <= 1 and 0 <= h.occupied <= 1, q
        assert sum(h.counts) >= a.numel()  # Hadamard pads rows to its block
    # PTQ leaves the small rows in the bins around 0; PSQ gives each row the whole grid
    assert hists["ptq"].effective < hists["psq"].effective
    assert hists["ptq"].occupied <= hists["psq"].occupied
    assert hists["ptq"].effective <= hists["bhq"].effective


def test_mapped_values_stay_on_the_grid() -> None:
    a = unequal_rows()
    for q in QUANT:
        v = mapped_values(a, q, 4, torch.Generator().manual_seed(0))
        assert v.abs().max() <= 7 * (1 + 1e-6)


def test_edge_cases_and_plot(tmp_path) -> None:
    assert bin_histogram(torch.zeros(4, 3), "psq", 4).counts[7] == 12  # all in the 0 bin
    one = bin_histogram(torch.ones(1, 5), "bhq", 4)
    assert one.counts[-1] == 5 and one.occupied == pytest.approx(1 / 15)
    with pytest.raises(ValueError, match="2-D"):
        bin_histogram(torch.ones(5), "psq", 4)
    path = plot_bin_utilization(bin_utilization(unequal_rows(), 4), tmp_path / "bins.png", "t")
    assert path.stat().st_size > 1000
