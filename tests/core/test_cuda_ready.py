"""CUDA readiness without a GPU (issue 12 item 5).

Two kinds of test:

* the CUDA rules of the real low-bit GEMMs, as pure functions checked on the CPU:
  ``torch._int_mm`` (ATen's ``_int_mm_out_cuda``: ``M > 16``, ``K`` and ``N`` positive
  multiples of 8) and ``torch._scaled_mm`` (``K`` and ``N`` multiples of 16, ``a``
  row-major, ``b`` column-major). The ``_scaled_mm`` layout and shape rules are torch's
  own: its meta function applies the CUDA checks to meta tensors, so the operands
  ``lowbit.kernels.fp8`` hands over are run through them here;
* the int8 and FP8 Linear paths, conv and the Hadamard quantizer on every device
  (``tests/conftest.py``: ``cuda`` cases are marked ``cuda`` and skipped with a reason
  where no GPU is present; ``benchmarks/gpu_check.sh`` runs them on one). Shapes meet
  the CUDA rules, so the real kernels run there too (counted).

Tolerances: the fast path and the reference compute the same estimator from the same
codes (same seeded noise stream); they differ by float32 rounding only. With
``u = 2⁻²⁴``, a K-term product and ``A = Σ|â||b̂| ≤ K·max|â|·max|b̂|``: the integer or
FP8 sum is exact up to ≤ 4 roundings (4u·A), the reference's float32 GEMM rounds each
dequantized operand, each product and a K-term sum ((K + 3)u·A), so
``|fast − ref| ≤ (K + 8)u·A`` (the bound of tests/core/test_conv.py). ``max|â| ≤
max|a|·(1 + 2⁻²⁰)``: codes stay within ``±emax`` of a step that maps the group's absmax
to ``emax`` up to the step's own rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import available_devices
from torch import nn

import lowbit
from lowbit import FQTConfig
from lowbit.functional import fqt_conv2d
from lowbit.kernels import fp8, int8, qconv
from lowbit.kernels.encoded import Encoded
from lowbit.kernels.im2col import chunks_supported
from lowbit.quantizers.hadamard import Hadamard
from lowbit.storage import encode_int8_per_channel, stochastic_round_bf16

DEVICES = available_devices()
U = 2.0**-24
GRID_SLACK = 1 + 2.0**-20


def _bound(k: int, a: torch.Tensor, b: torch.Tensor) -> float:
    """(K + 8)·u·K·max|â|·max|b̂| for operands ``a`` and ``b`` (module docstring)."""
    amax = float(a.detach().abs().max()) * GRID_SLACK
    bmax = float(b.detach().abs().max()) * GRID_SLACK
    return (k + 8) * U * k * amax * bmax


def _count(monkeypatch: pytest.MonkeyPatch, module: object, name: str) -> list[int]:
    calls: list[int] = []
    real = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


# -- the shape and layout rules, as pure functions ------------------------------------------
@pytest.mark.parametrize("m, k, n, ok", [
    (17, 8, 8, True), (16, 8, 8, False), (1, 8, 8, False),      # M > 16
    (32, 12, 8, False), (32, 8, 12, False), (32, 0, 8, False),  # K, N positive multiples of 8
    (32, 8, 0, False), (4096, 1024, 4096, True),
    (32, int8.MAX_K - int8.MAX_K % 8 + 8, 8, False),            # beyond MAX_K: not exact
])
def test_int_mm_cuda_shape_rule(m: int, k: int, n: int, ok: bool) -> None:
    assert int8.shape_ok(m, k, n, "cuda") is ok
    assert int8.shape_ok(m, k, n, "cpu") is (min(m, k, n) > 0 and k <= int8.MAX_K)


def test_long_sums_split_into_chunks_that_meet_the_cuda_rule() -> None:
    """The chunks of a split sum are multiples of 8 long, so a K that meets the CUDA
    rule gives chunks that meet it (``MAX_K`` = 131071 is odd: chunks of that length
    would all have gone to the simulated GEMM on CUDA)."""
    assert int8.CHUNK_K % 8 == 0 and int8.CHUNK_K <= int8.MAX_K < int8.CHUNK_K + 8
    for k in (int8.MAX_K + 1, 2 * int8.CHUNK_K, 2 * int8.CHUNK_K + 24):
        k -= k % 8
        sizes = [min(int8.CHUNK_K, k - s) for s in range(0, k, int8.CHUNK_K)]
        assert sum(sizes) == k and all(int8.shape_ok(32, c, 16, "cuda") for c in sizes)
    # chunks_supported: the codes' dtype and scale placement, on a CPU stand-in
    k = int8.MAX_K + 1
    a = Encoded(torch.zeros(2, k, dtype=torch.int8), torch.ones(2, 1))
    b = Encoded(torch.zeros(k, 3, dtype=torch.int8), torch.ones(1, 3))
    assert chunks_supported(a, b)
    assert not chunks_supported(a, Encoded(b.codes, torch.ones(k, 1)))  # scale on the sum


@pytest.mark.parametrize("m, k, n, ok", [
    (1, 16, 16, True), (17, 32, 48, True),      # M is free
    (32, 24, 16, False), (32, 16, 24, False), (0, 16, 16, False),
])
def test_scaled_mm_cuda_shape_rule_is_torchs(m: int, k: int, n: int, ok: bool) -> None:
    """``fp8.shape_ok(…, "cuda")`` against torch's own check: meta tensors take the CUDA
    branch of ``_scaled_mm``'s meta function (``device_hint`` of a meta tensor is cuda)."""
    assert fp8.shape_ok(m, k, n, "cuda") is ok
    if m == 0:
        return
    a = torch.empty(m, k, device="meta", dtype=torch.float8_e4m3fn)
    b = torch.empty(n, k, device="meta", dtype=torch.float8_e4m3fn).t()
    one = torch.ones((), device="meta")
    if ok:
        assert torch._scaled_mm(a, b, one, one, out_dtype=torch.float32).shape == (m, n)
    else:
        with pytest.raises(RuntimeError, match="divisible by 16"):
            torch._scaled_mm(a, b, one, one, out_dtype=torch.float32)


def _fp8_layouts(src: torch.Tensor) -> dict[str, torch.Tensor]:
    """``src`` (R, C) as float8 codes in the layouts an operand can arrive in."""
    r, c = src.shape
    f = src.to(torch.float8_e4m3fn)
    mis = torch.zeros(r * c + 1, dtype=f.dtype)[1:].view(r, c)  # 1 byte off 16-byte alignment
    mis.copy_(f)
    pad = torch.zeros(r, c + 16, dtype=f.dtype)[:, :c]  # rows longer than the matrix
    pad.copy_(f)
    # (R, C) column-major; for R = 1 its strides are (1, 1)
    return {"row-major": f, "column-major": f.t().contiguous().t(), "misaligned": mis,
            "padded rows": pad, "transposed": f.t().contiguous().t().contiguous()}


@pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="no float8 dtypes in this torch")
@pytest.mark.parametrize("m", [1, 32])
def test_scaled_mm_operands_meet_the_cuda_layout_rule(m: int) -> None:
    """Every layout an operand arrives in is handed over as torch's CUDA check wants it
    (the meta function checks the strides): ``a`` row-major, ``b`` column-major, 16-byte
    aligned, same values; an operand already in that layout is not copied."""
    k, n = 32, 16
    g = torch.Generator().manual_seed(0)
    one = torch.ones((), device="meta")

    def meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), device="meta", dtype=t.dtype)
    b_ok = fp8.col_major(torch.randn(k, n, generator=g).to(torch.float8_e4m3fn))
    a_ok = fp8.row_major(torch.randn(m, k, generator=g).to(torch.float8_e4m3fn))
    for name, a in _fp8_layouts(torch.randn(m, k, generator=g)).items():
        got = fp8.row_major(a)
        assert got.data_ptr() % 16 == 0 and torch.equal(got.float(), a.float()), name
        torch._scaled_mm(meta(got), meta(b_ok), one, one, out_dtype=torch.float32)  # raises if refused
    for name, b in _fp8_layouts(torch.randn(k, n, generator=g)).items():
        got = fp8.col_major(b)
        assert got.data_ptr() % 16 == 0 and torch.equal(got.float(), b.float()), name
        torch._scaled_mm(meta(a_ok), meta(got), one, one, out_dtype=torch.float32)
    assert fp8.row_major(a_ok).data_ptr() == a_ok.data_ptr()  # no copy when it already fits
    assert fp8.col_major(b_ok).data_ptr() == b_ok.data_ptr()


def test_row_major_copies_a_one_row_matrix_whose_strides_cublas_cannot_read() -> None:
    # a (1, K) view of a (K, 1) column has strides (1, 1): contiguous for torch, so
    # .contiguous() keeps it, but the CUDA check wants stride(0) > stride(1)
    t = torch.zeros(32, 1, dtype=torch.float8_e4m3fn).t()
    assert t.is_contiguous() and t.stride() == (1, 1)
    meta = torch.empty_strided((1, 32), (1, 1), device="meta", dtype=t.dtype)
    bm = torch.empty(16, 32, device="meta", dtype=t.dtype).t()
    one = torch.ones((), device="meta")
    with pytest.raises(RuntimeError, match="row_major"):
        torch._scaled_mm(meta, bm, one, one, out_dtype=torch.float32)
    assert fp8.row_major(t).stride() == (32, 1)


# -- the layer paths on every device --------------------------------------------------------
def _linear_run(device: str, recipe: str, backend: str, x: torch.Tensor, layer: nn.Linear,
                w_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    lin = nn.Linear(layer.in_features, layer.out_features).to(device)
    lin.load_state_dict(layer.state_dict())
    m = lowbit.convert(nn.Sequential(lin), FQTConfig.from_recipe(recipe, backend=backend, seed=5))
    xi = x.to(device).requires_grad_()
    y = m(xi)
    (y * w_out.to(device)).sum().backward()
    return y.detach(), xi.grad, lin.weight.grad, lin.bias.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recipe, kernel, real", [
    ("fqt-psq-8", "int8", 3), ("fqt-psq-fp8", "fp8", 3), ("fp8-tensorwise", "fp8", 3),
    # row scales of W and X lie on the summed dimension of ∇X = ∇Y·W and ∇W = ∇Yᵀ·X
    # (lowbit does not re-quantize them per column as torchao does): simulated there
    ("fp8-rowwise", "fp8", 1)])
def test_linear_runs_its_gemms_on_the_real_kernel_and_equals_reference(
        monkeypatch: pytest.MonkeyPatch, device: str, recipe: str, kernel: str, real: int) -> None:
    """(2, 24, 32) → Linear(32, 48): the rows (48), K and N of all three GEMMs meet both
    CUDA rules, so each GEMM whose scales allow it runs on ``_int_mm`` / ``_scaled_mm``
    (``real`` of them); auto and reference agree within the rounding bound (module
    docstring) on the same noise stream."""
    if kernel == "fp8" and not fp8.available(device):
        pytest.skip("FP8 GEMMs need torch._scaled_mm (CUDA: compute capability ≥ 8.9)")
    for m_, k_, n_ in ((48, 32, 48), (48, 48, 32), (48, 48, 32)):  # Y, ∇X, ∇W
        assert int8.shape_ok(m_, k_, n_, "cuda") and fp8.shape_ok(m_, k_, n_, "cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 32, generator=g)
    w_out = torch.randn(2, 24, 48, generator=g)
    torch.manual_seed(1)
    layer = nn.Linear(32, 48)
    # a first run: on CUDA fp8.supports probes each (dtypes, scaling) once with its own
    # 16×16 _scaled_mm call; the counted run below then calls only the layer's GEMMs
    first = _linear_run(device, recipe, "auto", x, layer, w_out)
    calls = _count(monkeypatch, int8, "int_mm") if kernel == "int8" else \
        _count(monkeypatch, torch, "_scaled_mm")
    got = _linear_run(device, recipe, "auto", x, layer, w_out)
    assert all(torch.equal(f, g) for f, g in zip(first, got))  # same seed, same stream
    assert len(calls) == real, f"{real} of the three GEMMs must run on the {kernel} kernel"
    ref = _linear_run(device, recipe, "reference", x, layer, w_out)
    assert len(calls) == real, "the reference backend runs no real low-bit GEMM"
    w = layer.weight.detach()
    gy = w_out.reshape(48, 48)
    xs = x.reshape(48, 32)
    bounds = (_bound(32, xs, w), _bound(48, gy, w), _bound(48, gy, xs))
    for name, a, r, bound in zip(("Y", "∇X", "∇W"), got[:3], ref[:3], bounds):
        assert a.device.type == device and a.dtype == r.dtype == torch.float32
        assert float((a.cpu() - r.cpu()).abs().max()) <= bound, name
    assert torch.equal(got[3], ref[3])  # ∇b: the same float sum of ∇Y on both


@pytest.mark.usefixtures("int_mm_engine")
@pytest.mark.parametrize("device", DEVICES)
def test_conv_runs_integer_gemms_on_device_and_equals_reference(
        monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    """Conv2d(8 → 24, 3×3, padding 1) on 2 × 8 × 8: forward (128 × 72 × 24), ∇X
    (128 × 216 × 8) and ∇W (24 × 128 × 72) meet the CUDA int8 rule; all three run on
    integer kernels — ``_int_mm``, or for Y and ∇X on the CPU oneDNN's int8 convolution
    where it is exact (``lowbit.kernels.qconv``); auto vs reference within the rounding bound."""
    for m_, k_, n_ in ((128, 72, 24), (128, 216, 8), (24, 128, 72)):
        assert int8.shape_ok(m_, k_, n_, "cuda")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 8, 8, generator=g)
    wt = torch.randn(24, 8, 3, 3, generator=g) * 0.2
    b = torch.randn(24, generator=g)
    gy = torch.randn(2, 24, 8, 8, generator=g)
    # (asked first: the once-per-process probe calls conv_acc itself)
    on_cpu = torch.device(device).type == "cpu" and qconv.available(x.to(torch.int8), wt.shape, 1, (8, 8), (1, 1), (1, 1), (1, 1))
    calls = _count(monkeypatch, int8, "int_mm")
    onednn = _count(monkeypatch, qconv, "conv_acc")

    def run(backend: str) -> tuple[torch.Tensor, ...]:
        cfg = FQTConfig.from_recipe("fqt-psq-8", backend=backend, seed=3)
        xs, ws = x.to(device).requires_grad_(), wt.to(device).requires_grad_()
        y = fqt_conv2d(xs, ws, b.to(device), cfg, (1, 1), (1, 1), (1, 1), 1)
        y.backward(gy.to(device))
        return y.detach().cpu(), xs.grad.cpu(), ws.grad.cpu()

    got = run("auto")
    # ∇W: on the CPU one _int_mm per kernel row and piece of samples
    # (lowbit.kernels.im2col.grad_weight_rows: here 2 pieces of 1 sample), elsewhere one on
    # the full im2col
    gw_calls = 6 if torch.device(device).type == "cpu" else 1
    # Y's oneDNN convolution in one piece, ∇X's in one per piece of samples (conv.acc_pieces: 1 for float32)
    conv_calls = 1 + lowbit.conv.acc_pieces(2, torch.float32, False)
    # without oneDNN's: on the CPU Y and ∇X by im2col in pieces of samples whose patches
    # hold at most the placed codes' bytes over PIECE_SHARE (im2col.patch_gemm_nchw: here 2
    # pieces of 1 sample each), elsewhere one GEMM each
    yx_calls = 2 * 2 if torch.device(device).type == "cpu" else 2
    assert (len(calls), len(onednn)) == ((gw_calls, conv_calls) if on_cpu else (yx_calls + gw_calls, 0))
    ref = run("reference")
    assert got[0].shape == F.conv2d(x, wt, b, padding=1).shape == (2, 24, 8, 8)
    bounds = (_bound(72, x, wt), _bound(216, gy, wt), _bound(128, gy, x))
    for name, a, r, bound in zip(("Y", "∇X", "∇W"), got, ref, bounds):
        assert float((a - r).abs().max()) <= bound + 1e-30, name


@pytest.mark.parametrize("device", DEVICES)
def test_hadamard_signs_come_from_a_generator_on_another_device(device: str) -> None:
    """A CPU generator may drive a quantizer of a CUDA tensor (the layers make generators
    on the operand's device; callers of ``quantize_grad`` need not): the random signs are
    drawn where the generator lives, then moved, so they are the CPU draw exactly."""
    a = torch.randn(40, 24, generator=torch.Generator().manual_seed(0))
    want = Hadamard().transform(a, torch.Generator().manual_seed(9)).signs
    got = Hadamard().transform(a.to(device), torch.Generator().manual_seed(9)).signs
    assert got.device.type == device and torch.equal(got.cpu(), want)
    q = lowbit.quantize_grad(a.to(device), "hadamard", 8, generator=torch.Generator().manual_seed(9))
    assert q.device.type == device and q.shape == a.shape and bool(torch.isfinite(q).all())


@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_rounding_noise_from_a_generator_on_another_device(device: str) -> None:
    """SRSGD/SRAdamW round weights and state with a caller's generator, which may be a
    CPU one for CUDA parameters: the noise is drawn on the generator's device and moved,
    so the rounded values are exactly the CPU ones (bit operations and power-of-two
    scales: no float rounding differs between devices)."""
    x = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    want = stochastic_round_bf16(x, torch.Generator().manual_seed(4))
    got = stochastic_round_bf16(x.to(device), torch.Generator().manual_seed(4))
    assert got.device.type == device and torch.equal(got.cpu(), want)
    want_c, want_s = encode_int8_per_channel(x, torch.Generator().manual_seed(4))
    got_c, got_s = encode_int8_per_channel(x.to(device), torch.Generator().manual_seed(4))
    assert got_c.device.type == device
    assert torch.equal(got_c.cpu(), want_c) and torch.equal(got_s.cpu(), want_s)
