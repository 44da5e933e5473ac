"""Theorem 2's propagation constants: power iteration against explicit Jacobians."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import FQTConfig
from lowbit.analysis import jacobian_spectrum
from lowbit.analysis._model import capture, parameter_groups, qat_of, weight_gemm_input, with_config


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 3))


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def explicit_jacobian(y: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """J with J·e_i = ∂⟨e_i, y⟩/∂params, column by column (small y only)."""
    cols = []
    for i in range(y.numel()):
        e = torch.zeros(y.numel())
        e[i] = 1
        g = torch.autograd.grad(y, params, e.reshape(y.shape), retain_graph=True, allow_unused=True)
        cols.append(torch.cat([(gi if gi is not None else torch.zeros_like(p)).reshape(-1)
                               for gi, p in zip(g, params)]))
    return torch.stack(cols, 1).double()


def test_power_iteration_finds_the_top_eigenvalue() -> None:
    model = lowbit.convert(tiny_cnn(), FQTConfig.from_recipe("fqt-psq-4", seed=0))
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(3, 1, 3, 3, generator=g), torch.randint(0, 3, (3,), generator=g))
    spectra = {mode: jacobian_spectrum(model, loss, batch, mode=mode, iters=150, tol=1e-7)
               for mode in ("pairs", "layer")}
    groups = parameter_groups(model)
    params = dict(model.named_parameters())
    for spec in spectra.values():
        assert set(spec.lam) == {"3", "6"}  # the stem's ∇X is never computed
        assert set(spec.lam["3"]) == {"0", "other"}
        assert set(spec.lam["6"]) == {"0", "3", "other"}
    with with_config(model, qat_of), capture(model, inputs=True, outputs=True, grads=False) as rec:
        loss(model, batch)
        for layer in spectra["pairs"].lam:
            y = rec[layer].y
            names = [n for grp, ns in groups.items() if grp != layer for n in ns]
            jt = explicit_jacobian(y, [params[n] for n in names])  # (Σ params, |y|)
            lam_all = float(torch.linalg.eigvalsh(jt.t() @ jt)[-1])
            sizes = [params[n].numel() for n in names]
            rows = dict(zip(names, jt.split(sizes)))
            for grp, lam in spectra["pairs"].lam[layer].items():
                j = torch.cat([rows[n] for n in groups[grp]])
                exact = float(torch.linalg.eigvalsh(j.t() @ j)[-1])
                # power iteration approaches λ_max from below and never passes it
                assert exact * (1 - 1e-3) <= lam <= exact * (1 + 1e-6)
                # mode="layer": the joint constant, an upper bound of every pair's
                assert spectra["layer"].lam[layer][grp] == pytest.approx(lam_all, rel=1e-3)
                assert lam <= lam_all * (1 + 1e-6)
            assert spectra["layer"].lam_total[layer] == pytest.approx(lam_all, rel=1e-3)
        for layer, gram in spectra["pairs"].gram.items():
            u = weight_gemm_input(lowbit.fqt_layers(model)[layer], rec[layer].x).double()
            assert gram == pytest.approx(float(torch.linalg.eigvalsh(u.t() @ u)[-1]), rel=1e-9)
            assert torch.allclose(spectra["pairs"].col_norms[layer].double(), u.pow(2).sum(1),
                                  rtol=1e-5)


def test_weight_gemm_input_reproduces_the_weight_gradient() -> None:
    """∇W = ∇Yᵀ·U with U the im2col of Q_f(X): the operand orientation the bound uses."""
    model = lowbit.convert(tiny_cnn(), FQTConfig.from_recipe("qat-8"))
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(4, 1, 3, 3, generator=g), torch.randint(0, 3, (4,), generator=g))
    from lowbit.analysis._model import grad_weight_operand
    with capture(model, inputs=True) as rec:
        loss(model, batch).backward()
    for name, layer in lowbit.fqt_layers(model).items():
        a = grad_weight_operand(layer, rec[name].gy)
        u = weight_gemm_input(layer, rec[name].x)
        assert torch.allclose(a @ u, layer.weight.grad.reshape(a.shape[0], -1), atol=1e-5), name


def test_weight_gemm_column_norms_keep_float64_range() -> None:
    """``‖U_n‖²`` of a float32 layer's input near 2⁷⁰ is 2¹⁴⁰·‖u‖², past float32: it was
    cast back to float32 (inf; 2⁻⁸⁰ gave 0). Kept in float64 (how every use reads it),
    it is the unscaled one's times s² to float rounding."""
    from lowbit.analysis.bounds import weight_gemm_stats

    layer = lowbit.convert(nn.Sequential(nn.Linear(6, 3)), FQTConfig.from_recipe("qat-8"))[0]
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    base = weight_gemm_stats(layer, x)[0]
    for s in (2.0 ** 70, 2.0 ** -80):
        got = weight_gemm_stats(layer, x * s)[0]
        assert got.dtype == torch.float64
        torch.testing.assert_close(got / s**2, base.double(), rtol=1e-6, atol=0)
