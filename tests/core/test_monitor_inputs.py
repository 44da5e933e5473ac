"""The variance monitor on inputs a review found it mismeasured or silently skipped:
sequence-first layers (tokens counted as samples), candidates of a policy on another
grid than the one it applies, unmeasured ∇X paths in the budget, one-sample batches,
non-finite gradients taken for BatchNorm, NaN totals reported as "adds up"."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit import FQTConfig, GradSpec
from lowbit import monitor as monitor_mod
from lowbit.adaptive import AdaptivePolicy
from lowbit.monitor import VarianceMonitor

PSQ8 = FQTConfig(grad_input=GradSpec(8, "psq"), grad_weight=GradSpec(8, "psq"), backend="reference", seed=0)


@pytest.mark.parametrize("batch_first", [False, True])
def test_samples_of_sequence_first_layers_are_the_sequences(batch_first: bool) -> None:
    """nn.TransformerEncoderLayer (batch_first False: inputs (L, N, E)) and lowbit's
    MultiheadAttention out-projection (called on flattened (L·N, E) rows) had every
    token position / token counted as a sample: minibatch variances 6-70x too small."""
    torch.manual_seed(0)
    n, length, d = 8, 6, 5
    enc = nn.TransformerEncoderLayer(d, 1, dim_feedforward=7, dropout=0.0, batch_first=batch_first)
    lowbit.convert(enc, PSQ8)
    mon = VarianceMonitor(enc, every=1)
    x = torch.randn(n, length, d) if batch_first else torch.randn(length, n, d)
    with mon.step():
        enc(x).square().mean().backward()
    layers = mon.history[-1].layers
    assert {name: layers[name].samples for name in ("linear1", "linear2", "self_attn.out_proj")} == \
        {"linear1": n, "linear2": n, "self_attn.out_proj": n}
    mon.close()


def test_policy_candidates_are_measured_on_the_grid_it_applies(monkeypatch) -> None:
    """An asymmetric-grid adaptive layer (int8a): the candidates were measured on the
    symmetric grid (IntFormat(b)) while a decision applies intBa (predicted ratios 2.4x
    the applied ones)."""
    seen = []
    real = monitor_mod.path_noise

    def spy(quantizer, a, fmt, *rest):
        seen.append(fmt)
        return real(quantizer, a, fmt, *rest)

    monkeypatch.setattr(monitor_mod, "path_noise", spy)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lowbit.convert(m, FQTConfig.from_recipe("fqt-auto-psq", grad_input=GradSpec(quantizer="psq", format="int8a"),
                                            grad_weight=GradSpec(quantizer="psq", format="int8a"),
                                            backend="reference", seed=0))
    mon = VarianceMonitor(m, every=1, policy=AdaptivePolicy.from_recipe("fqt-auto-psq"))
    with mon.step():
        m(torch.randn(32, 8)).pow(2).sum().backward()
    assert len({f.bits for f in seen}) > 1 and all(f.asymmetric for f in seen)
    mon.close()


def test_a_policy_refuses_a_format_without_other_widths() -> None:
    """fp8 gradients under a policy were accepted and the first decision raised at the end
    of a training step ("bits=4 contradicts format='fp8_e5m2'")."""
    m = nn.Sequential(nn.Linear(8, 4))
    lowbit.convert(m, FQTConfig.from_recipe("fqt-auto-psq", grad_input=GradSpec(quantizer="psq", format="fp8_e5m2"),
                                            grad_weight=GradSpec(quantizer="psq", format="fp8_e5m2"), seed=0))
    with pytest.raises(ValueError, match="fp8_e5m2, which has no other bit width"):
        VarianceMonitor(m, every=1, policy=AdaptivePolicy.from_recipe("fqt-auto-psq"))


def test_the_input_budget_counts_measured_paths_only(monkeypatch) -> None:
    """A ∇X path whose ratio is NaN (its output feeds BatchNorm) still took a share of the
    ∇X budget (n_input 2 where 1 path was measured)."""
    seen = []
    real = AdaptivePolicy.path_target
    monkeypatch.setattr(AdaptivePolicy, "path_target",
                        lambda self, p, n: (seen.append((p, n)), real(self, p, n))[1])
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Tanh(),
                      nn.Linear(16, 4))
    lowbit.convert(m, FQTConfig.from_recipe("fqt-auto-psq", backend="reference", seed=0))
    mon = VarianceMonitor(m, every=1, policy=AdaptivePolicy.from_recipe("fqt-auto-psq"), sgd="per-sample")
    with mon.step():
        m(torch.randn(32, 8)).pow(2).sum().backward()
    measured = [n for n, v in mon.history[-1].layers.items() if math.isfinite(v.ratio_x)]
    assert measured == ["5"] and {n for p, n in seen if p == "grad_input"} == {1}
    mon.close()


def test_one_sample_and_non_finite_gradients_are_named(caplog) -> None:
    """A one-sample batch switched the measurement off without a word (fqt-auto stayed at
    8 bits); a non-finite ∇Y was reported as a BatchNorm-flat probe. Each gets its own
    warning, and the non-finite step's ratios are NaN (no decision taken on them)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lowbit.convert(m, FQTConfig.from_recipe("fqt-auto-psq", backend="reference", seed=0))
    mon = VarianceMonitor(m, every=1, policy=AdaptivePolicy.from_recipe("fqt-auto-psq"))
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        with mon.step():
            m(torch.randn(1, 8)).pow(2).sum().backward()
        gy = torch.randn(32, 4) * 1e-3
        gy[0, 0] = math.inf
        with mon.step():
            m(torch.randn(32, 8)).backward(gy)
    text = caplog.text
    assert "one sample in the minibatch" in text
    assert "not finite" in text and "BatchNorm" not in text
    last = mon.history[-1].layers["2"]
    assert math.isnan(last.ratio_w) and math.isnan(last.ratio_x) and not mon.decisions
    mon.close()


def test_a_nan_total_is_not_reported_as_adding_up() -> None:
    """gradient_variance with a NaN in one batch: total and gap NaN, rel_gap was 0.0
    ("gap/total 0" in the table)."""
    from lowbit.analysis.variance import gradient_variance

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    lowbit.convert(m, FQTConfig(grad_input=GradSpec(4, "psq"), grad_weight=GradSpec(4, "psq"),
                                backend="reference", seed=0))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    batches[2][0][0, 0] = float("nan")
    rep = gradient_variance(m, lambda mod, b: F.cross_entropy(mod(b[0]), b[1]), batches, repeats=3)
    assert math.isnan(rep.groups["total"].total) and math.isnan(rep.groups["total"].rel_gap)


def test_an_infinite_ratio_stays_in_the_epoch_mean() -> None:
    """The per-epoch summaries dropped non-finite ratios: an infinite one (a minibatch
    variance of 0) vanished; only NaN (not measured) is left out now."""
    from lowbit.experiments.monitoring import _mean

    assert _mean([1.0, math.inf]) == math.inf
    assert _mean([1.0, math.nan, 3.0]) == 2.0 and math.isnan(_mean([math.nan]))


def test_layers_called_with_a_keyword_input_are_measured() -> None:
    """A review: the monitor's forward hook read ``args[0]``, so a model calling
    ``self.fc(input=x)`` raised IndexError on every monitored step. Measured as the
    positional call is: the same record."""
    class Net(nn.Module):
        def __init__(self, keyword: bool) -> None:
            super().__init__()
            self.fc, self.keyword = nn.Linear(4, 3), keyword

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(input=x) if self.keyword else self.fc(x)

    records = []
    for keyword in (False, True):
        torch.manual_seed(0)
        m = lowbit.convert(Net(keyword), FQTConfig.from_recipe("fqt-psq-8", seed=0))
        mon = VarianceMonitor(m, every=1)
        x = torch.randn(16, 4)
        with mon.step():
            m(x).sum().backward()
        records.append(mon.history[-1].layers["fc"])
    assert math.isfinite(records[1].quant_w) and records[1].samples == 16
    assert (records[0].quant_w, records[0].sgd_w) == (records[1].quant_w, records[1].sgd_w)
