"""Integer GEMM: int8 × int8 → int32 with ``torch._int_mm`` (lowbit's AMX/VNNI kernels,
or exact float32 GEMMs on a CPU without an int8 dot product: :func:`engine`), scales
applied after.

Exact for codes of ≤ 8 bits as long as the int32 accumulator cannot overflow:
``K · 128² < 2³¹`` ⇔ ``K ≤ MAX_K`` (8-bit asymmetric codes reach −128). Scales and
offsets may only sit on the non-summed dimensions (rows of ``a``, columns of ``b``);
an offset adds a rank-1 term built from the other operand's code sums (docs/METHOD.md §6),
so asymmetric grids stay exact. ``torch._int_mm``'s rules on CUDA (cuBLASLt, checked in
ATen's ``_int_mm_out_cuda``): int8 operands, int32 result, ``M > 16``, ``K`` and ``N``
positive multiples of 8 (any strides: ATen copies an operand cuBLASLt cannot read).
:func:`shape_ok` applies them; where they fail the dispatcher runs the reference
(simulated) GEMM, or ``backend="int8"`` raises. Sums longer than :data:`MAX_K` are not
taken (the dispatcher's reason names it); a convolution's ∇W splits them into chunks of
:data:`CHUNK_K` (a multiple of 8, so every chunk of a ``K`` that meets the CUDA rule meets
it too: :func:`lowbit.kernels.im2col.exact_gemm`); a Linear's ∇W over more than
``MAX_K`` rows runs simulated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math

import torch

from . import amx, exact_f32, vnni, workspace
from .encoded import Encoded

if TYPE_CHECKING:  # pragma: no cover
    from . import Kernels
    from ..quantizers.base import RowTransform

MAX_K = (2**31 - 1) // (128 * 128)  # 131071
CHUNK_K = MAX_K - MAX_K % 8  # 131064: the longest exact sum that keeps K % 8 == 0
# Output elements per row panel of a CPU GEMM whose output is narrower than its int32
# accumulator (bf16 or float16: a model under autocast, or a half-precision model), so
# that the accumulator exists a panel at a time, not beside the whole output (:func:`gemm`);
# 0: off, None: the automatic choice (:func:`panel_size`).
PANEL: int | None = None
# The automatic choice: panels of 2**20 elements (4 MB of int32) on every CPU. gpt2-block's
# bf16 peak 67.8 -> 57.3 MB on the Intel Xeon (AMX), 55.1 on the AMD EPYC, below bf16
# autocast's 58.6, for no measurable time (docs/benchmarks.md "GEMM panels with AMX": the
# AMX kernel packs the right operand once for all panels, amx.pack_right).
AUTO_PANEL = 1 << 20


def panel_size() -> int:
    """:data:`PANEL` where set, else :data:`AUTO_PANEL`."""
    return AUTO_PANEL if PANEL is None else PANEL


def available(device: torch.device | str) -> bool:
    """``torch._int_mm`` exists for CPU and CUDA tensors in PyTorch ≥ 2.4."""
    return hasattr(torch, "_int_mm") and torch.device(device).type in ("cpu", "cuda")


def shape_ok(m: int, k: int, n: int, device: torch.device | str) -> bool:
    """Whether ``torch._int_mm`` takes an (m, k) × (k, n) product on ``device`` and its
    int32 sum is exact (``k ≤ MAX_K``): on CUDA ``m > 16`` and ``k``, ``n`` multiples of 8
    (module docstring); on the CPU any non-empty shape."""
    if k > MAX_K or m == 0 or k == 0 or n == 0:
        return False
    if torch.device(device).type == "cuda":  # cuBLASLt int8 constraints
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return True


def supports(a: Encoded, b: Encoded) -> bool:
    """Integer codes on both sides, no block scales, every scale and offset on a
    non-summed dimension, and shapes ``_int_mm`` accepts."""
    m, k = a.codes.shape
    n = b.codes.shape[1]
    return (a.codes.dtype == torch.int8 and b.codes.dtype == torch.int8
            and a.block_scale is None and b.block_scale is None
            and a.scale.shape[1] == 1 and b.scale.shape[0] == 1
            and (a.offset is None or a.offset.shape[1] == 1)
            and (b.offset is None or b.offset.shape[0] == 1)
            and available(a.codes.device) and shape_ok(m, k, n, a.codes.device))


def reads_as_meant(t: torch.Tensor) -> bool:
    """Whether a GEMM reads the (R, C) ``t``'s strides as they are meant: row-major with a
    leading dimension ``stride(0) ≥ C`` when ``stride(1) == 1``, otherwise column-major
    with ``stride(1) ≥ R``. Views that break this — overlapping rows (an im2col view of
    one sample's one output row: row stride ``C_in`` < ``K``) and the degenerate strides
    torch gives a one-row matrix (``w.t()`` of a (N, 1) weight is (1, N) with strides
    (1, 1)) — are misread by ``torch._int_mm`` on the CPU (wrong sums, no error; README
    fault kind 24)."""
    rows, cols = t.shape
    s0, s1 = t.stride()
    return (s1 == 1 and s0 >= cols) or (s1 != 1 and s0 == 1 and s1 >= rows)


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with freshly computed row-major strides. Not ``t.contiguous()``:
    that returns a (…, 1, N) tensor with strides (…, 1, 1) as it is (contiguous, since a
    size-1 dimension's stride does not count), the layout ``_int_mm`` misreads."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` (R, C) if :func:`reads_as_meant`, else a row-major copy (same values)."""
    return t if reads_as_meant(t) else _row_major(t)


def _check_k(k: int, what: str) -> None:
    if k > MAX_K:
        raise ValueError(f"lowbit.kernels.int8.{what}: a sum over K = {k} int8 products can pass int32's "
                         f"range (K·128² ≥ 2³¹ from K = {MAX_K + 1}); split the sum into pieces of at most "
                         f"MAX_K = {MAX_K}")


def _check_out(out: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    """``out``, where given, must be an int32 tensor of the result's ``shape``
    (``ValueError`` otherwise, on every engine: a copy would cast or broadcast in silence,
    a loop over a shorter batch would leave entries unwritten)."""
    if out is not None and (out.dtype != torch.int32 or tuple(out.shape) != shape):
        raise ValueError(f"lowbit.kernels.int8: out must be an int32 tensor of shape {shape}, "
                         f"got {out.dtype} {tuple(out.shape)}")


def runs_amx(a_codes: torch.Tensor, n: int) -> bool:
    """Whether :func:`int_mm` (without ``out``) runs :mod:`.amx`'s kernel for ``a_codes``
    (M, K) times a (K, N = ``n``) operand: on a CPU with AMX, for the products
    :func:`amx.worth_it` picks."""
    return a_codes.device.type == "cpu" and amx.worth_it(*a_codes.shape, n) and not exact_f32.runs("cpu") \
        and amx.available()


def int_mm(a_codes: torch.Tensor, b_codes: torch.Tensor, out: torch.Tensor | None = None,
           packed_b: torch.Tensor | None = None) -> torch.Tensor:
    """``a_codes @ b_codes`` ((M, K) × (K, N) int8, any strides) with an exact int32 sum,
    into ``out`` ((M, N) int32, contiguous) if given. Where :func:`exact_f32.runs` (a CPU
    without an int8 dot product, or ``exact_f32.ENGINE = "float32"``), as float32 GEMMs of
    pieces short enough to be exact (:mod:`.exact_f32`). Else on a CPU with AMX, the products
    :func:`amx.worth_it` picks (and no ``out``) run on :mod:`.amx`'s kernel (it reads
    any strides; ``packed_b``: :func:`amx.pack_right` of ``b_codes``, made once for
    several such products, else ignored); elsewhere on ``torch._int_mm``, operands whose
    strides it would misread copied first (:func:`dense`). All give the same int32
    sums. ``ValueError`` for ``K >`` :data:`MAX_K` (an int32 sum of that length could
    wrap: split it, as :func:`gemm` does) and for an ``out`` that is not int32 of the
    result's shape."""
    _check_k(a_codes.shape[-1], "int_mm")
    _check_out(out, (a_codes.shape[0], b_codes.shape[1]))
    if exact_f32.runs(a_codes.device):  # a CPU without an int8 dot product (or asked for)
        acc = exact_f32.int_mm(a_codes, b_codes)
        return acc if out is None else out.copy_(acc)
    if out is None and runs_amx(a_codes, b_codes.shape[1]):
        return amx.int_mm(a_codes, b_codes, packed_b)
    if out is None:
        return torch._int_mm(dense(a_codes), dense(b_codes))  # (M, N) int32
    return torch._int_mm(dense(a_codes), dense(b_codes), out=out)


def engine(device: torch.device | str = "cpu") -> str:
    """What sums :func:`int_mm`'s products on ``device``: ``"float32"`` (exact float32
    GEMMs, :mod:`.exact_f32`: a CPU without an int8 dot product, or
    ``exact_f32.ENGINE = "float32"``), ``"amx"`` (lowbit's AMX kernel for the products
    :func:`amx.worth_it` picks, ``torch._int_mm`` for the others) or
    ``"torch._int_mm"``. The sums are the same exact int32 values on each. ``ValueError``
    for an ``exact_f32.ENGINE`` (``LOWBIT_INT8_ENGINE``) outside ``exact_f32.ENGINES``, or
    ``"float32"`` where float32 GEMMs may round (:func:`exact_f32.runs`)."""
    if exact_f32.runs(device):
        return "float32"
    return "amx" if torch.device(device).type == "cpu" and amx.available() else "torch._int_mm"


def batched_kernel(k: int) -> bool:
    """Whether a CPU batch of products summing over ``k`` runs as one call of the op
    ``lowbit::int8_bmm``: on the AMX kernel (:mod:`.amx`, ``k ≤ amx.MAX_K``) or, on a CPU
    without AMX, the AVX-512 VNNI kernel (:mod:`.vnni`, ``k ≤ vnni.MAX_K``)."""
    if amx.available():
        return k <= amx.MAX_K
    return k <= vnni.MAX_K and vnni.available()


def int_mm_batched(a_codes: torch.Tensor, b_codes: torch.Tensor,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``a_codes[i] @ b_codes[i]`` for every batch entry: (B, M, K) × (B, K, N) int8, any
    strides, ``K ≤`` :data:`MAX_K` → (B, M, N) int32 exact sums, written into ``out``
    (contiguous) if given, else a new tensor (on the CPU, from 32 MB on, a buffer of an
    earlier call that nothing references any more: :mod:`.workspace`). Without ``out``, on a CPU with AMX, the
    whole batch is one call of :mod:`.amx`'s batched kernel (``lowbit::int8_bmm``: the
    entries spread over the threads; 1.1–5× the loop at attention's head shapes,
    docs/benchmarks.md), on one with AVX-512 VNNI but no AMX one call of :mod:`.vnni`'s
    (the same op; :func:`batched_kernel`); before either, where :func:`exact_f32.runs`,
    one exact float32 ``torch.bmm`` per piece of ``K`` (:mod:`.exact_f32`).
    Otherwise one ``torch._int_mm`` per entry: every entry has the
    same strides, so one :func:`reads_as_meant` check (of entry 0) decides for all
    whether the operand is first copied whole (row-major entries) — the per-entry stride
    checks and selects of :func:`int_mm` in a loop cost about as much as the products at
    attention's head sizes. ``ValueError`` for ``K >`` :data:`MAX_K` or a wrong ``out``, as
    :func:`int_mm`."""
    _check_k(a_codes.shape[-1], "int_mm_batched")
    _check_out(out, (a_codes.shape[0], a_codes.shape[1], b_codes.shape[2]))
    if exact_f32.runs(a_codes.device):  # a CPU without an int8 dot product (or asked for)
        acc = exact_f32.int_bmm(a_codes, b_codes)
        return acc if out is None else out.copy_(acc)
    if out is None and a_codes.device.type == "cpu" and a_codes.shape[0] > 0 \
            and batched_kernel(a_codes.shape[2]):
        return amx.int_bmm(a_codes, b_codes)
    if out is None and a_codes.device.type == "cpu":  # large results reuse a buffer
        out = workspace.empty((a_codes.shape[0], a_codes.shape[1], b_codes.shape[2]), torch.int32)
    elif out is None:
        out = torch.empty(a_codes.shape[0], a_codes.shape[1], b_codes.shape[2], dtype=torch.int32,
                          device=a_codes.device)
    if a_codes.shape[0] == 0:
        return out
    if not reads_as_meant(a_codes[0]):
        a_codes = _row_major(a_codes)
    if not reads_as_meant(b_codes[0]):
        b_codes = _row_major(b_codes)
    for a, b, o in zip(a_codes.unbind(0), b_codes.unbind(0), out.unbind(0)):
        torch._int_mm(a, b, out=o)
    return out


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def safe_scales(a_scale: torch.Tensor, b_scale: torch.Tensor, k: int,
                shift: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The epilogue's scales, as float64 where its float32 intermediate ``float(acc) ·
    a_scale`` could pass float32's maximum although the product need not (``|acc| ≤ k·2¹⁴``
    for int8 codes: a step past ``3.4e38 / (k·2¹⁴)``, an operand of magnitude ≈ 1e34 and
    more): the epilogue then runs in float64 and rounds once to its output dtype, as the
    simulated GEMM of the dequantized operands stays finite. Float64 steps, which have no
    wider dtype, get a power of two moved from ``a_scale`` to ``b_scale`` instead where the
    intermediate could pass float64's maximum — only with ``shift`` (the caller's epilogue
    has no offsets: an asymmetric grid's offset terms are in real units and would be off by
    the power of two, a review) and only where it is exact: both scales float64, every
    finite nonzero ``a_scale`` staying a normal number and ``b_scale``'s largest finite
    (``s_a·s_b`` unchanged). Only finite steps count: a
    NaN or infinite row is non-finite either way, and the other rows keep their float32
    bits. Float32 scales otherwise
    (every ordinary gradient: the same bits as before). Checked on the CPU only (on other
    devices the check would be a host sync per GEMM). ``k`` 0: the summed length is not
    known (:data:`MAX_K` is assumed)."""
    if a_scale.dtype not in (torch.float32, torch.float64) or a_scale.device.type != "cpu" \
            or a_scale.numel() == 0:
        return a_scale, b_scale
    # the largest finite step decides: a NaN or infinite one makes its own products
    # non-finite in either dtype, and must not move the other rows to float64 (their bits
    # would change with a NaN elsewhere in the batch); one number: read it (one op)
    amax = _largest_finite(a_scale)
    terms = (k if k > 0 else MAX_K) * 2.0**14  # |acc| ≤ terms: the intermediate's bound is amax·terms
    if a_scale.dtype == torch.float32:
        return (a_scale, b_scale) if amax * terms <= _FLOAT32_MAX else (a_scale.double(), b_scale.double())
    # float64 steps have no wider dtype: past float64's range (a step beyond ≈ 1e304/k,
    # beside a tiny other one: a new user's trial, 1e307 × 1e-307 gave inf where the
    # reference gives 1.6) a power of two moves from a's steps to b's, exactly (both stay
    # normal numbers), so (acc·s_a)·s_b stays finite where the product is
    e = float64_shift(a_scale, b_scale, k) if shift else 0
    return (a_scale, b_scale) if e == 0 else (_ldexp(a_scale, -e), _ldexp(b_scale, e))


def float64_shift(a_scale: torch.Tensor, b_scale: torch.Tensor, k: int,
                  *others: torch.Tensor | None) -> int:
    """The power of two ``e`` that :func:`safe_scales` moves from float64 ``a_scale`` to
    ``b_scale`` (``a·2^-e``, ``b·2^e``), 0 for none: where ``(float(acc)·s_a)`` could pass
    float64's maximum, and only where exact — both scales float64, every finite nonzero
    step of ``a_scale`` (and of ``others``' first, an offset that moves with it) staying a
    normal number and ``b_scale``'s (and ``others``' second) largest finite."""
    if a_scale.dtype != torch.float64 or b_scale.dtype != torch.float64 or a_scale.device.type != "cpu" \
            or a_scale.numel() == 0:
        return 0
    terms = (k if k > 0 else MAX_K) * 2.0**14
    amax = _largest_finite(a_scale)
    if amax <= _FLOAT64_MAX / terms:  # (the bound itself may pass float64's range: compared so)
        return 0
    e = math.ceil(math.log2(amax) + math.log2(terms) - math.log2(_FLOAT64_MAX)) + 1
    down = [a_scale, *others[:1]]
    up = [b_scale, *others[1:2]]
    if any(t is not None and math.ldexp(_smallest_nonzero(t), -e) < _FLOAT64_TINY for t in down) \
            or any(t is not None and not _finite_times(_largest_finite(t), e) for t in up):
        return 0  # not exact (a step pushed into subnormals, or one past the range): as it is
    return e


def _finite_times(x: float, e: int) -> bool:
    """Whether ``x·2^e`` is a finite float64 (``math.ldexp`` raises past the range)."""
    try:
        return math.isfinite(math.ldexp(x, e))
    except OverflowError:
        return False


def _ldexp(t: torch.Tensor, e: int) -> torch.Tensor:
    """``t·2^e`` (float64; exact for normal results)."""
    return torch.ldexp(t, torch.tensor(float(e), dtype=torch.float64))


_FLOAT64_MAX = float(torch.finfo(torch.float64).max)
_FLOAT64_TINY = float(torch.finfo(torch.float64).tiny)  # the smallest normal float64


def _smallest_nonzero(scale: torch.Tensor) -> float:
    """The smallest finite nonzero ``|scale|`` (float64's max where none is): one number."""
    a = scale.detach().abs()
    ok = torch.isfinite(a) & (a > 0)
    return float(torch.where(ok, a, _FLOAT64_MAX).amin()) if a.numel() else _FLOAT64_MAX


def _largest_finite(scale: torch.Tensor) -> float:
    """The largest finite ``|scale|`` (0 where none is): one number read."""
    a = scale.detach()
    if a.numel() == 1:
        v = abs(float(a))
        return v if math.isfinite(v) else 0.0
    return float(torch.where(torch.isfinite(a), a.abs(), 0.0).amax())


def _log2(x: float) -> float:
    return math.log2(x) if x > 0 else -math.inf


def _offset_terms(a_scale: torch.Tensor, b_scale: torch.Tensor, a_offset: torch.Tensor | None,
                  b_offset: torch.Tensor | None, k: int) -> tuple[float, float, float]:
    """log2 bounds of an asymmetric epilogue's intermediates (``int8_epilogue``:
    ``acc·s_a·s_b``, ``m_a·(Σr·s_b)``, ``(Σc·s_a)·m_b``, ``k·m_a·m_b``, and their sum):
    ``(the largest intermediate or partial sum, its a side's factors, its b side's)`` from
    the largest finite scales and offsets (stored codes in [-128, 127]: ``|acc| ≤ k·2¹⁴``,
    ``|Σ codes| ≤ k·2⁷``), each term's own (a review: the product of the two sides' largest
    factors is k·2⁷ above any term, and moved GEMMs far from overflow to float64), four
    times the largest bounding their partial sums. The sides (each side's largest factor:
    ``acc·s_a``, ``Σc·s_a``, ``k·m_a`` and ``s_b``, ``Σr·s_b``, ``m_b``) are what
    :func:`_scaled_offset_epilogue` scales down. In log2: bounds may pass float64's range."""
    kk = float(k if k > 0 else MAX_K)
    sa, sb = _log2(_largest_finite(a_scale)), _log2(_largest_finite(b_scale))
    ma = -math.inf if a_offset is None else _log2(_largest_finite(a_offset))
    mb = -math.inf if b_offset is None else _log2(_largest_finite(b_offset))
    lk = math.log2(kk)
    terms = (sa + lk + 14 + sb, ma + lk + 7 + sb, sa + lk + 7 + mb, lk + ma + mb)
    inner = (sa + lk + 14,  # acc·s_a; Σr·s_b and k·m_a where a has an offset, Σc·s_a where b has
             sb + lk + 7 if a_offset is not None else -math.inf, lk + ma,
             sa + lk + 7 if b_offset is not None else -math.inf)
    side_a = max(sa + lk + 14, ma + lk, ma)
    side_b = max(sb, sb + lk + 7, mb)
    return max(*inner, *terms, 2 + max(terms)), side_a, side_b


def _offsets_safe(a_scale: torch.Tensor, b_scale: torch.Tensor, a_offset: torch.Tensor | None,
                  b_offset: torch.Tensor | None, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None] | None:
    """An asymmetric epilogue's scales and offsets, as float64 where a float32
    intermediate of its offset terms could pass float32's maximum although the product
    need not (a new user's trial: ``fqt-psq-4a`` activations of 2e35 over 4,096 tokens
    gave ∇W all NaN — ``Σ_k x·s`` past 3.4e38 — where the simulated GEMM gives 2.4e34);
    ``None`` where even float64's could (the caller scales them down); else as they are.
    The CPU only, as :func:`safe_scales`."""
    if a_scale.device.type != "cpu" or a_scale.numel() == 0:
        return a_scale, b_scale, a_offset, b_offset
    bound = _offset_terms(a_scale, b_scale, a_offset, b_offset, k)[0]
    if torch.promote_types(a_scale.dtype, b_scale.dtype) == torch.float32 and bound <= math.log2(_FLOAT32_MAX):
        return a_scale, b_scale, a_offset, b_offset
    if bound > math.log2(_FLOAT64_MAX) - 3:
        return None
    return tuple(None if t is None else t.double() for t in (a_scale, b_scale, a_offset, b_offset))  # type: ignore[return-value]


def _scaled_offset_epilogue(kernels: Kernels, acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                            a_offset: torch.Tensor | None, b_offset: torch.Tensor | None,
                            rowsum: torch.Tensor | None, colsum: torch.Tensor | None, k: int,
                            bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """An asymmetric epilogue whose float64 intermediates could pass float64's maximum
    (operands near 1e308): each side's scale and offset scaled down by a power of two
    (``2^-e_a``, ``2^-e_b``) so that every intermediate stays below about 2¹⁰⁰⁰, the
    epilogue in float64, its result scaled back by ``2^(e_a + e_b)`` (exact where it is a
    normal number), then the bias and one rounding to ``out_dtype``. Where a scaled-down
    scale or offset would leave the normal numbers (not exact) the epilogue runs as it is."""
    _, side_a, side_b = _offset_terms(a_scale, b_scale, a_offset, b_offset, k)
    e_a = max(0, math.ceil(side_a) - 500) if math.isfinite(side_a) else 0
    e_b = max(0, math.ceil(side_b) - 500) if math.isfinite(side_b) else 0
    sides = [(e_a, (a_scale, a_offset)), (e_b, (b_scale, b_offset))]
    if any(t is not None and math.ldexp(_smallest_nonzero(t.double()), -e) < _FLOAT64_TINY
           for e, ts in sides for t in ts) or e_a + e_b == 0:
        return kernels.run("int8_epilogue", acc, *(None if t is None else t.double() for t in
                                                   (a_scale, b_scale, a_offset, b_offset)),
                           rowsum, colsum, k, bias, out_dtype)
    a_scale, a_offset, b_scale, b_offset = (None if t is None else _ldexp(t.double(), -e)
                                            for e, ts in sides for t in ts)
    out = kernels.run("int8_epilogue", acc, a_scale, b_scale, a_offset, b_offset, rowsum, colsum, k, None,
                      torch.float64)
    out = _ldexp(out, e_a + e_b)
    if bias is not None:
        out = out + bias
    return out.to(out_dtype)


def panel_rows(a: Encoded, b: Encoded, out_dtype: torch.dtype) -> int | None:
    """Rows per panel of :func:`gemm`'s output, or None for one GEMM: where panels are on
    (:func:`panel_size` > 0), a bf16 or float16 output on the CPU of at least two
    panels of that many elements, with float32 scales
    and no offsets (what ``int8_epilogue_into`` writes over a panel's accumulator). The
    panels split ``M`` evenly (:func:`_gemm_panels`), so each has at least the returned
    number of rows, at least ``amx.MIN_ROWS`` (AMX's choice is per call)."""
    m, n = a.codes.shape[0], b.codes.shape[1]
    if out_dtype not in (torch.bfloat16, torch.float16) or a.codes.device.type != "cpu" \
            or a.offset is not None or b.offset is not None \
            or not a.scale.dtype == b.scale.dtype == torch.float32:
        return None
    panel = panel_size()
    if panel <= 0:
        return None
    rows = max(amx.MIN_ROWS, panel // max(1, n) // 16 * 16)
    return rows if m >= 2 * rows else None


def _gemm_panels(kernels: Kernels, a: Encoded, b: Encoded, bias: torch.Tensor | None,
                 out_dtype: torch.dtype, rows: int) -> torch.Tensor:
    """:func:`gemm` by row panels: each panel's int32 sums, its float32 epilogue written
    over them (``int8_epilogue_into``) and cast into the output — the same bits as one
    GEMM's epilogue straight to ``out_dtype`` (``(float(acc)·s_a)·s_b (+ bias)`` in
    float32, rounded once; ``tests/core/test_kernels.py``)."""
    from ..scopes import scope

    m, k, n = a.codes.shape[0], a.codes.shape[1], b.codes.shape[1]
    a_scale, b_scale = safe_scales(a.scale, b.scale, k)
    if a_scale.dtype != torch.float32:  # scales that could overflow float32: one GEMM
        return gemm(kernels, a, b, bias, out_dtype, panels=False)
    out = torch.empty(m, n, dtype=out_dtype, device=a.codes.device)
    per_row = a_scale.shape[0] != 1
    count = m // rows  # panels of ⌊m/count⌋ or ⌈m/count⌉ ≥ rows rows: no short last one
    packed = None  # the right operand packed once for AMX, not once a panel
    if runs_amx(a.codes[: m // count], n) and amx.reads_left(a.codes):
        with scope("lowbit::gemm"):
            packed = amx.pack_right(b.codes)
    for t in range(count):
        i, j = m * t // count, m * (t + 1) // count
        with scope("lowbit::gemm"):
            acc = int_mm(a.codes[i:j], b.codes, packed_b=packed)
        with scope("lowbit::epilogue"):
            kernels.run("int8_epilogue_into", acc, a_scale[i:j] if per_row else a_scale, b_scale,
                        None, None, None, None, k, bias)
            out[i:j].copy_(acc.view(torch.float32))
        del acc  # not beside the next panel's
    return out


def gemm(kernels: Kernels, a: Encoded, b: Encoded, bias: torch.Tensor | None,
         out_dtype: torch.dtype, panels: bool = True, inverse: RowTransform | None = None) -> torch.Tensor:
    """``â @ b̂ + bias`` from one integer GEMM and the (fused) epilogue; a bf16/float16
    output by row panels where :func:`panel_rows` says so (``panels=False``: never).
    ``inverse``: a row transform ``T`` of ``â``'s rows (no ``bias``): the result is then
    ``T⁻¹(â @ b̂)``, the product in ``compute_dtype(out_dtype)`` until ``T⁻¹`` has run, in one
    pass with the epilogue where ``T`` has a kernel for it
    (:meth:`lowbit.quantizers.base.RowTransform.epilogue_inverse`), the same values."""
    from ..formats import compute_dtype
    from ..scopes import scope

    if inverse is not None and bias is not None:
        raise ValueError("int8.gemm: a bias is added after T⁻¹, not before (give bias=None with inverse)")
    rows = panel_rows(a, b, out_dtype) if panels and inverse is None else None
    if rows is not None:
        return _gemm_panels(kernels, a, b, bias, out_dtype, rows)
    with scope("lowbit::gemm"):
        acc = int_mm(a.codes, b.codes)
    rowsum = a.codes.sum(dim=1, keepdim=True, dtype=torch.int32) if b.offset is not None else None
    colsum = b.codes.sum(dim=0, keepdim=True, dtype=torch.int32) if a.offset is not None else None
    with scope("lowbit::epilogue"):
        if inverse is None:
            return epilogue(kernels, acc, a.scale, b.scale, a.offset, b.offset, rowsum, colsum,
                            a.codes.shape[1], bias, out_dtype)
        if a.offset is None and b.offset is None:
            out = inverse.epilogue_inverse(kernels, acc, a.scale, b.scale, a.codes.shape[1], out_dtype)
            if out is not None:
                return out
        out = epilogue(kernels, acc, a.scale, b.scale, a.offset, b.offset, rowsum, colsum, a.codes.shape[1],
                       None, compute_dtype(out_dtype))
    with scope("lowbit::transform"):
        return inverse.inverse(out, out_dtype, overwrite=True)


def epilogue(kernels: Kernels, acc: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
             a_offset: torch.Tensor | None, b_offset: torch.Tensor | None,
             rowsum: torch.Tensor | None, colsum: torch.Tensor | None, k: int,
             bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``int8_epilogue`` of the int32 ``acc`` (which the caller hands over: it is
    overwritten): a float32 product is written over ``acc``'s bytes
    (``int8_epilogue_into``: no second accumulator-sized buffer, the same values),
    any other output dtype (bf16 under autocast, float64 scales) into a new tensor. Scales
    that could overflow the float32 intermediate run in float64 (:func:`safe_scales`)."""
    if a_offset is None and b_offset is None:
        a_scale, b_scale = safe_scales(a_scale, b_scale, k, shift=True)
    elif (e := float64_shift(a_scale, b_scale, k, a_offset, b_offset)) != 0:
        # an asymmetric grid's offsets are in real units: each moves with its scale (a
        # review: shifted scales alone were off by 2^±e in the offset terms)
        a_scale, b_scale = _ldexp(a_scale, -e), _ldexp(b_scale, e)
        a_offset = None if a_offset is None else _ldexp(a_offset, -e)
        b_offset = None if b_offset is None else _ldexp(b_offset, e)
    else:
        a_scale, b_scale = safe_scales(a_scale, b_scale, k)
        widened = _offsets_safe(a_scale, b_scale, a_offset, b_offset, k)
        if widened is None:  # past float64's range: scaled down by powers of two, where exact
            return _scaled_offset_epilogue(kernels, acc, a_scale, b_scale, a_offset, b_offset, rowsum, colsum,
                                           k, bias, out_dtype)
        a_scale, b_scale, a_offset, b_offset = widened
    if out_dtype == torch.float32 and acc.dtype == torch.int32 \
            and torch.promote_types(a_scale.dtype, b_scale.dtype) == torch.float32:
        kernels.run("int8_epilogue_into", acc, a_scale, b_scale, a_offset, b_offset, rowsum,
                    colsum, k, bias)
        return acc.view(torch.float32)  # a new dtype over int32 bytes: not an autograd view
    return kernels.run("int8_epilogue", acc, a_scale, b_scale, a_offset, b_offset, rowsum,
                       colsum, k, bias, out_dtype)
