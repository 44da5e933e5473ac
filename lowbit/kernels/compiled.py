"""Fused kernels: the reference functions run through ``torch.compile`` (Inductor).

Eager torch makes one pass over memory per op (and the counter-based noise alone takes
a dozen); compiled, the quantizer becomes one reduction plus one fused pass, the
epilogue one pass. Same code, same arithmetic: the codes equal the reference's (tested).

Compilation needs a C++ compiler (CPU) or Triton (GPU). A variant that fails to compile
runs eagerly (the same function, uncompiled) from then on, with a warning, and the
others stay compiled (one variant can fail alone: Inductor's C++ code for float64 block
formats does not build with torch 2.13 on the project's CPU). Only where no variant has
compiled yet in the process does the :data:`FAILURES_TO_STOP`-th failure mark the
compiler as unusable — a missing C++ compiler fails every variant — after which all
these kernels run eagerly: :func:`failure` says why. That failure concerns Inductor only —
lowbit's own C kernels (AVX-512 quantizer, int8 GEMM panels) keep running. Set
``LOWBIT_COMPILE=0`` to never compile (and to run the reference kernels everywhere:
:func:`enabled`). Small tensors are not worth a compiled call.

**No global settings are touched.** Dynamo keeps its compiled variants per code object
and falls back to eager after ``torch._dynamo.config.recompile_limit`` (8) of them. A
model meets more variants of one kernel than that (flags, dtypes, layouts), so instead of
raising the user's limits, each *variant* gets its own copy of the kernel's code object
(:func:`_variant_key` names it: the kernel, its non-tensor arguments, each tensor's
dtype, rank, contiguity and unit dimensions, and the thread's dispatch context) and so its own cache; shapes are dynamic
within a variant. Every variant is compiled with ``fullgraph=True``: a graph break or a
variant that still hits the recompile limit raises, and is reported by the warning above
rather than silently run eagerly.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
import warnings
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

import torch

from .cbuild import switched_off
from ..userframe import user_stacklevel

MIN_NUMEL = 1 << 15  # below this, eager kernels are as fast as a compiled call
_enabled = not switched_off("LOWBIT_COMPILE") and hasattr(torch, "compile")
_failure: str | None = None  # the failure that stopped all compiling in this process (run)
# compiler failures of single kernel variants so far; at FAILURES_TO_STOP of them the
# compiler itself is taken to be unusable (a missing C++ compiler fails every variant)
_variant_failures: list[str] = []
FAILURES_TO_STOP = 2  # failures before any variant compiled that stop all compiling
_compiled_once = False  # some variant compiled and ran in this process
_dynamo_broken = False  # importing torch._dynamo failed (disable_tracing)
# kernel name -> variant key -> compiled copy of the kernel
_compiled: dict[str, dict[Hashable, Callable[..., Any]]] = {}


def _after_fork_in_child() -> None:
    """Inductor's thread pool for C++ builds (``AsyncCompile.pool``, one per process,
    cached) has no threads in a forked child, and torch 2.13's own at-fork hook resets only
    its process pool: a child that compiled a new variant waited forever on a build no
    thread would run (a child training at another thread count than its parent, with a
    cold Inductor cache: ``tests/core/test_packaging.py``). The child makes its own pool."""
    module = sys.modules.get("torch._inductor.async_compile")
    pool = getattr(getattr(module, "AsyncCompile", None), "pool", None)
    if pool is not None and hasattr(pool, "cache_clear"):
        pool.cache_clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _compile_errors() -> tuple[type[BaseException], ...]:
    errs: list[type[BaseException]] = []
    try:
        from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException

        errs += [BackendCompilerFailed, TorchDynamoException]
    except Exception:  # noqa: BLE001 - very old torch, or one whose dynamo cannot import
        pass
    try:
        from torch._inductor.exc import InductorError  # type: ignore[attr-defined]

        errs.append(InductorError)
    except Exception:  # noqa: BLE001 - torch without InductorError
        pass
    return tuple(errs)


def enabled() -> bool:
    """The user's switch (``LOWBIT_COMPILE``, :func:`set_enabled`): whether lowbit's
    compiled kernels and the C kernels that stand in for them (``Kernels.fused``: the
    AVX-512 quantizer, epilogue and BHQ kernels) may run; the int8 GEMM kernels (AMX,
    VNNI) have their own switches. A compiler failure does not turn it off
    (:func:`failure`)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn compiled kernels on or off (process-wide switch, e.g. for tests)."""
    global _enabled
    _enabled = bool(flag)


_before_trace: list[bool] = []  # the switch as it was before a trace turned it off


@contextlib.contextmanager
def off_for_trace() -> Iterator[None]:
    """The switch off for a traced block (``lowbit.coverage``: torch.compile does not
    compile under a dispatch mode, and the reference kernels compute the same codes);
    :func:`as_untraced` tells a decision what an untraced step would use."""
    _before_trace.append(_enabled)
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(_before_trace.pop())


@contextlib.contextmanager
def as_untraced() -> Iterator[None]:
    """The switch as an untraced step has it, for a decision made inside a traced block
    (attention's forward in pieces: its first pass is a GEMM the trace must count)."""
    global _enabled
    was = _enabled
    _enabled = _before_trace[0] if _before_trace else _enabled
    try:
        yield
    finally:
        _enabled = was


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message`` (compiler errors run to pages), with the next
    line where the first only introduces it (``BackendCompilerFailed``'s "backend='inductor'
    raised:" dropped its cause, "No working C++ compiler found": a review)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if text.endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1]}"
    return f"{type(exc).__name__}: {text[:400]}"


def _unusable_cache_dir() -> str | None:
    """Why ``$TORCHINDUCTOR_CACHE_DIR`` cannot be created (the first existing folder on
    its path is a file, or not writable), else ``None``: importing ``torch._dynamo``
    creates it and raises ``OSError`` if it cannot. Checked without creating anything."""
    raw = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not raw:
        return None
    path = Path(raw).absolute()
    first = next(p for p in (path, *path.parents) if p.exists())
    if not first.is_dir():
        return f"{first} is not a directory"
    if first != path and not os.access(first, os.W_OK | os.X_OK):
        return f"{first} is not writable"
    return None


_REASON = ("lowbit: {} runs eagerly between compiled graphs (C kernels and noise state that dynamo "
           "cannot trace): compile without fullgraph=True")


def disable_tracing(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.compiler.disable(fn, reason=…)``: dynamo runs ``fn`` eagerly inside a
    compiled model (lowbit's C kernels and their ctypes calls cannot be traced; the
    reason, which ``fullgraph=True`` prints, says to compile without it). Where torch's compiler
    cannot be imported — an unusable ``TORCHINDUCTOR_CACHE_DIR`` (checked first, without
    importing it: :func:`_unusable_cache_dir`) or any other import failure — ``fn``
    itself: nothing can be compiled in that process, so there is nothing to keep it out
    of, and ``import lowbit`` works. Warned about once and recorded as the compiler failure
    (:func:`failure`), so lowbit's compiled kernels run eagerly. (torch's own code that
    imports its compiler — ``torch.optim``'s optimizers do — still raises torch's error,
    which names the directory: lowbit does not trigger that import first and hide it.)"""
    global _failure, _dynamo_broken
    if not _dynamo_broken:
        why = _unusable_cache_dir()
        if why is None:
            try:  # the reason is what fullgraph=True prints (a review: torch's hint alone said
                # "remove the torch.compiler.disable call", in lowbit's source); torch < 2.8 has none
                try:
                    return torch.compiler.disable(fn, reason=_REASON.format(getattr(fn, "__qualname__", fn)))
                except TypeError:
                    return torch.compiler.disable(fn)
            except Exception as exc:  # noqa: BLE001 - whatever importing torch._dynamo raised
                why = _describe(exc)
        else:
            why = f"TORCHINDUCTOR_CACHE_DIR={os.environ['TORCHINDUCTOR_CACHE_DIR']}: {why}"
        _dynamo_broken = True
        _failure = f"torch's compiler cannot be imported ({why})"
        warnings.warn(f"lowbit: {_failure}; torch.compile cannot run in this process, lowbit's "
                      "compiled kernels run eagerly (same results, slower; its C kernels are "
                      "unaffected); set TORCHINDUCTOR_CACHE_DIR to a writable directory",
                      RuntimeWarning, stacklevel=user_stacklevel())
    return fn


def failure() -> str | None:
    """``None`` while ``torch.compile`` works in this process, else the failure after which
    every compiled kernel runs eagerly (kernel name, exception type and first line): the
    :data:`FAILURES_TO_STOP`-th variant to fail before any compiled, or the compiler's
    import failing."""
    return _failure


def variant_failures() -> list[str]:
    """Every kernel variant that failed to compile so far (each then runs eagerly)."""
    return list(_variant_failures)


def working() -> bool:
    """Whether kernels registered as compiled really run through ``torch.compile``: switched
    on (:func:`enabled`) and no compiler failure yet (:func:`failure`)."""
    return _enabled and _failure is None


def use_for(x: torch.Tensor) -> bool:
    return working() and x.numel() >= MIN_NUMEL and x.device.type in ("cpu", "cuda")


def _dispatch_context() -> Hashable:
    """The thread-local dispatch key sets, which dynamo's tensor guards include: a kernel
    called from eager code and from inside a compiled graph (below autograd) sees others."""
    try:
        return (repr(torch._C._dispatch_tls_local_include_set()),
                repr(torch._C._dispatch_tls_local_exclude_set()))
    except AttributeError:  # pragma: no cover - a torch without these introspection hooks
        return ()


def _variant_key(args: tuple[Any, ...]) -> Hashable:
    """What dynamo specialises on: non-tensor arguments by value; tensors by dtype,
    device type, rank, contiguity and which dimensions are 1 (sizes stay dynamic); which
    sizes are equal to each other, over all tensor arguments (dynamo's "duck sizing"
    makes sizes that are equal at the first call one symbol, so a later call where they
    differ — a square weight, then a wide one — would recompile the variant). The
    tensors reach the kernel detached (:func:`run`), so neither a ``Parameter`` (whose
    shape dynamo keeps static) nor the base of a view adds guards. Plus the dispatch
    context (:func:`_dispatch_context`)."""
    key: list[Hashable] = [_dispatch_context()]
    sizes: list[int] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.dtype, a.device.type, a.dim(), a.is_contiguous(),
                        tuple(d == 1 for d in a.shape)))
            sizes.extend(a.shape)
        else:
            key.append(a if isinstance(a, Hashable) else repr(a))
    key.append(tuple(sizes.index(d) if d > 1 else -1 for d in sizes))  # equal sizes
    return tuple(key)


def _own_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a fresh code object (same bytecode, globals, defaults and closure):
    dynamo's cache and recompile count belong to that copy alone."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__,
                              fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def under_user_dispatch_mode() -> bool:
    """Whether a dispatch mode that ``torch.compile`` refuses to compile under is active
    (a user's ``TorchDispatchMode``: ``FlopCounterMode``, a tracer, a logging mode) —
    dynamo's own test in ``torch._dynamo.convert_frame``: with
    ``torch._dynamo.config.inline_torch_dispatch_torch_compile`` any non-infra mode on the
    stack that does not ignore compile internals, else any mode without
    ``ignore_compile_internals``. A ``fullgraph=True`` kernel raised ``RuntimeError: …
    found no compiled frames`` there (a new user's trial: lowbit's attention under
    ``FlopCounterMode``)."""
    if torch._C._len_torch_dispatch_stack() == 0:  # (every call of a training step: no mode)
        return False
    from torch.utils import _python_dispatch as pd
    # dynamo's setting where dynamo is imported, else its default (True in torch 2.13): never
    # imported here, so a torch whose compiler cannot import still runs every kernel eagerly
    config = sys.modules.get("torch._dynamo.config")
    inline = getattr(config, "inline_torch_dispatch_torch_compile", True)
    test = getattr(pd, "any_torch_dispatch_mode_on_stack" if inline
                   else "is_in_any_mode_without_ignore_compile_internals", None)
    if test is None:  # pragma: no cover - a torch without these hooks
        return pd.is_in_torch_dispatch_mode(include_infra_modes=False)
    return test()


def run(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` through ``torch.compile`` (one compiled copy per kernel variant); on
    a compiler failure, warn once and run every compiled kernel's ``fn`` eagerly from then
    on (:func:`failure`). Under a user's dispatch mode, which ``torch.compile`` does not
    compile under (:func:`under_user_dispatch_mode`), ``fn`` runs eagerly for that call,
    the mode seeing each of its ops: the same codes and scales, float epilogues equal to
    float rounding (Inductor's fused arithmetic against the eager ops). Tensor arguments are detached
    (plain tensors, no view or autograd history: the kernels compute codes, scales and
    epilogues, which nothing differentiates)."""
    global _failure
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    if _failure is not None or under_user_dispatch_mode():
        return fn(*args)
    variants = _compiled.setdefault(name, {})
    key = _variant_key(args)
    global _compiled_once
    try:
        f = variants.get(key)
        if f is None:
            f = variants[key] = torch.compile(_own_copy(fn), dynamic=True, fullgraph=True)
            out = f(*args)
            _compiled_once = True  # the compiler works here: later failures are their variant's
            return out
        return f(*args)
    except (*_compile_errors(), OSError) as exc:  # the kernels do no I/O: an OSError is
        # the compiler's (its cache or build directory)
        what = f"torch.compile failed for kernel {name!r} ({_describe(exc)})"
        variants[key] = fn  # this variant runs eagerly from now on, uncompiled
        _variant_failures.append(what)
        if _compiled_once or len(_variant_failures) < FAILURES_TO_STOP:
            warnings.warn(f"lowbit: {what}; that kernel variant runs eagerly from now on, the "
                          "others stay compiled (same results, slower)", stacklevel=user_stacklevel())
        else:
            _failure = what
            warnings.warn(f"lowbit: {_failure}; lowbit's compiled kernels run eagerly from now on "
                          "(same results, slower; its C kernels are unaffected)", stacklevel=user_stacklevel())
        return fn(*args)


def variant_count() -> int:
    """How many compiled kernel variants exist (each compiled once, on first use)."""
    return sum(len(v) for v in _compiled.values())
