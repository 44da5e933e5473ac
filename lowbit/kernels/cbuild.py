"""Build lowbit's C kernels on first use, cache them, load them with :mod:`ctypes`.

lowbit ships five C kernels: four for x86-64 CPUs (:mod:`.amx`: an AMX int8 GEMM;
:mod:`.vnni`: a batched int8 GEMM on AVX-512 VNNI; :mod:`.avx512`: the integer quantizer on
AVX-512, also on AVX2 CPUs through ``avx512_on_avx2.h``; :mod:`.softmax`: attention's
softmax with its scores' epilogue on AVX-512) and one
in plain C (:mod:`.bhq_groups`: BHQ's group
bookkeeping). Each is compiled with the system C
compiler (``$CC``, split like a shell would, else ``gcc``, else ``cc``) the first time it
is needed and cached in :func:`cache_dir` — ``$LOWBIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/lowbit`` or ``~/.cache/lowbit`` — under a name that hashes the source,
the compiler command, the flags and the compiler's version; a cache directory that
cannot be used is named in a warning and the library is built in a fresh temporary
directory instead. Every
problem (no compiler, a failed build) is reported as a ``RuntimeWarning`` by the kernel's
module, which then falls back to its torch path.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from pathlib import Path
from ..userframe import user_stacklevel

Warn = Callable[[str, "str | None"], None]


class BuildError(RuntimeError):
    """The C compiler failed on a kernel or could not run (the message: its output)."""


def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of Linux ``/proc/cpuinfo`` on x86-64; empty elsewhere."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        return frozenset()
    return frozenset()


def cache_dir() -> Path:
    """Where compiled libraries are kept: ``$LOWBIT_CACHE_DIR`` (``~`` expanded; a
    relative path is an ``OSError``, which :func:`load` reports: it named another cache in
    every working directory, and ``'~/x'`` from a Docker ``ENV`` a folder named ``~``), else
    ``$XDG_CACHE_HOME/lowbit`` or ``~/.cache/lowbit``."""
    root = os.environ.get("LOWBIT_CACHE_DIR")
    if root:
        path = Path(root).expanduser()
        if not path.is_absolute():
            raise OSError(f"LOWBIT_CACHE_DIR must be an absolute path, got {root!r}")
        return path
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "lowbit"
    try:
        return Path.home() / ".cache" / "lowbit"
    except RuntimeError as e:  # no HOME and no passwd entry: an OSError, which load handles
        raise OSError(f"no home directory to cache kernels in ({e})") from None


def _digest_file(path: Path) -> Path:
    """The file beside a built library holding its SHA-256: a cached file cut short or
    damaged (a full disk, a killed copy, a bad sector) is not loaded — ``dlopen`` of such
    a file can kill the process with SIGBUS or SIGILL, not raise."""
    return path.with_name(path.name + ".sha256")


def _intact(path: Path) -> bool:
    """``path`` exists and matches the SHA-256 recorded when it was built. ``OSError``
    where it exists but cannot be read (another user's private files: not "damaged")."""
    try:
        return _digest_file(path).read_text().strip() == hashlib.sha256(path.read_bytes()).hexdigest()
    except PermissionError as e:
        raise OSError(f"cannot read the cached {path.name} ({e.strerror})") from e
    except OSError:
        return False


def _shareable(path: str, mode: int) -> None:
    """Give a finished cache file the permissions the umask allows (``mkstemp`` made it
    0600: a cache built by one user — a Docker image's root, a team folder — was
    unreadable, "damaged", to the next, who rebuilt it over theirs: a review)."""
    os.chmod(path, mode & ~_umask())


def _umask() -> int:
    """The process's umask, read without setting it (``os.umask`` sets it: for that moment
    another thread's new files were world-writable, a review): ``/proc/self/status``'s
    ``Umask``, else 0o022."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


_STALE_SECONDS = 3600  # a building file older than this was left by a killed build


def _temporary_dir() -> Path:
    """A fresh folder for this process's builds, removed when the process exits (the
    libraries stay loaded)."""
    tmp = Path(tempfile.mkdtemp(prefix="lowbit-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def compiler(warn: Warn) -> list[str] | None:
    """The C compiler command: ``$CC`` (split like a shell would: ``ccache gcc`` works),
    else ``gcc``, else ``cc``; ``None`` when none is found. A ``$CC`` that is set but not
    found is named in a warning (``warn(why, then)``) before the fallback."""
    env = shlex.split(os.environ.get("CC", ""))
    if env and shutil.which(env[0]):
        return env
    found = shutil.which("gcc") or shutil.which("cc")
    if env:
        warn(f"CC={os.environ['CC']!r} is not found", None if found is None else f"using {found}")
    return [found] if found else None


def _compile(cc: list[str], version: str, source: Path, flags: Sequence[str], out_dir: Path,
             damaged: Callable[[Path], None] | None = None) -> Path:
    """The shared library built from ``source`` with ``cc`` (whose ``--version`` output is
    ``version``) and ``flags`` in ``out_dir``; cached under a name that hashes the source,
    the compiler command and flags and the compiler's version, written atomically (a
    temporary file renamed) so that concurrent processes never load a partial file.
    :class:`BuildError` when the compiler fails or cannot run; ``OSError`` when
    ``out_dir`` cannot be made or written."""
    flags = ["-x", "c", *flags]  # C whatever $CC is (g++ mangled every symbol: a review)
    key = hashlib.sha256(source.read_bytes() + " ".join([*cc, *flags]).encode() + version.encode()).hexdigest()
    path = out_dir / f"{source.stem}-{key[:16]}.so"
    if not _intact(path):  # not built yet, or damaged (or built before the digests)
        if damaged is not None and path.exists():
            damaged(path)
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{source.stem}-building-", suffix=".so", dir=out_dir)
        os.close(fd)
        fd, tmp_digest = tempfile.mkstemp(prefix=f"{source.stem}-building-", suffix=".sha256", dir=out_dir)
        os.close(fd)
        try:
            try:
                subprocess.run([*cc, *flags, str(source), "-o", tmp], capture_output=True,
                               text=True, errors="replace", check=True)  # (any bytes a compiler prints)
            except subprocess.CalledProcessError as e:
                if "No space left on device" in (e.stderr or ""):  # the cache's disk, not the code
                    raise OSError(errno.ENOSPC, f"no space left on device in {out_dir}") from e
                raise BuildError(e.stderr or str(e)) from e
            except OSError as e:  # the compiler itself could not run
                raise BuildError(str(e)) from e
            Path(tmp_digest).write_text(hashlib.sha256(Path(tmp).read_bytes()).hexdigest() + "\n")
            _shareable(tmp_digest, 0o666)
            _shareable(tmp, 0o777)
            os.replace(tmp_digest, _digest_file(path))
            os.replace(tmp, path)
        finally:
            for t in (tmp, tmp_digest):
                if os.path.exists(t):
                    os.unlink(t)
        _remove_stale(out_dir, source.stem)
    return path


def _remove_stale(out_dir: Path, stem: str) -> None:
    """Remove ``stem``'s building files older than an hour: a killed build leaves them,
    and nothing else would (a concurrent build's are fresh)."""
    now = time.time()
    for p in out_dir.glob(f"{stem}-building-*"):
        with contextlib.suppress(OSError):
            if now - p.stat().st_mtime > _STALE_SECONDS:
                p.unlink()


def load(source: Path, flags: Sequence[str], warn: Warn, what: str) -> ctypes.CDLL | None:
    """``source`` compiled with ``flags`` (cached: module docstring) and loaded; ``None``
    after a warning (``warn(why, None)``) when there is no compiler or the build fails.
    ``what`` names the kernel in those warnings. Where ``flags`` ask for OpenMP and that
    build fails (a compiler without it: Apple's clang, clang without libomp), the same
    source is built without ``-fopenmp`` — its pragmas ignored, one thread; the C guards
    ``omp.h`` — with a warning saying so; the first build's warnings are given only where
    no second build is tried (a review: the kernels were lost to their slow fallbacks)."""
    said: list[tuple[str, str | None]] = []
    lib = _load(source, flags, lambda why, then=None: said.append((why, then)), what)
    refused = [why for why, _ in said if " could not be built (" in why]
    if lib is None and "-fopenmp" in flags and refused:
        lib = _load(source, [f for f in flags if f != "-fopenmp"], warn, what)
        if lib is not None:
            detail = refused[-1].partition(" could not be built (")[2][:-1][-300:]
            cause = (f"its OpenMP build could not be loaded: {detail}" if any("could not be loaded" in why for why, _ in said)
                     else f"the C compiler refused -fopenmp: {detail}")  # (a review: a loader's error read as the compiler's)
            warn(f"the {what} was built without OpenMP ({cause})", "it runs on one thread; a compiler with OpenMP "
                 "(gcc, or clang with libomp where the loader finds it) runs it on torch's threads")
        return lib
    for why, then in said:
        warn(why, then)
    return lib


def _load_copy(path: Path) -> ctypes.CDLL:
    """The library at ``path`` loaded from a copy in a fresh temporary directory: a cache
    the loader cannot map libraries from (a noexec mount: two reviews). ``OSError`` where
    the copy cannot be made or loaded either."""
    copy = _temporary_dir() / path.name
    shutil.copyfile(path, copy)
    return ctypes.CDLL(str(copy))


def _load(source: Path, flags: Sequence[str], warn: Warn, what: str) -> ctypes.CDLL | None:
    """:func:`load` with ``flags`` as given."""
    if not source.is_file():  # an install that did not ship the C source (package data)
        warn(f"the {what}'s C source {str(source)!r} is missing from this installation of "
             "lowbit (reinstall it; the package must ship lowbit/kernels/*.c)", None)
        return None
    cc = compiler(warn)
    if cc is None:
        warn(f"the {what} needs a C compiler and none was found ($CC, gcc, cc)", None)
        return None
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, errors="replace", check=True).stdout
        given = os.environ.get("LOWBIT_CACHE_DIR")  # (a relative one makes cache_dir raise)
        root = repr(given) if given else "(the default)"
        try:
            root = repr(str(cache_dir()))
            path = _compile(cc, version, source, flags, cache_dir(), lambda p: warn(
                f"the cached {what} {str(p)!r} is damaged or of an older lowbit (its SHA-256 "
                "differs from the one recorded when it was built)", "building it again"))
        except OSError as e:  # unwritable, not a folder, no home directory, a damaged file in a read-only cache
            warn(f"the kernel cache directory {root} is not usable ({e}); point "
                 "LOWBIT_CACHE_DIR at a writable directory", f"building the {what} in a temporary "
                 "directory (again in every process until then)")
            path = _compile(cc, version, source, flags, _temporary_dir())
        try:
            return ctypes.CDLL(str(path))
        except OSError as e:  # intact but not loadable here
            try:  # from another folder? (a cache on a noexec mount: a copy, no rebuild, no unlink)
                lib = _load_copy(path)
            except OSError:
                pass
            else:
                warn(f"the loader cannot map the {what} from the kernel cache directory {root} ({e}: a noexec "
                     "mount?); point LOWBIT_CACHE_DIR at a directory libraries may be loaded from",
                     "loading a copy from a temporary directory (again in every process until then)")
                return lib
            warn(f"the cached {what} {str(path)!r} could not be loaded ({e})", "building it again")
            try:
                path.unlink(missing_ok=True)
                _digest_file(path).unlink(missing_ok=True)
            except OSError:  # a read-only cache: build where this process can
                return ctypes.CDLL(str(_compile(cc, version, source, flags, _temporary_dir())))
            path = _compile(cc, version, source, flags, path.parent)
            try:
                return ctypes.CDLL(str(path))
            except OSError:  # built afresh and still not loadable: a copy, else the build failed
                return _load_copy(path)
    except (BuildError, OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip()
        warn(f"the {what} could not be built (…{detail[-600:]})" if len(detail) > 600 else
             f"the {what} could not be built ({detail})", None)
        return None


_OFF, _ON = frozenset({"0", "false", "off", "no"}), frozenset({"", "1", "true", "on", "yes"})


def plain_memory(*tensors: object) -> bool:
    """Whether each tensor's values are its memory, as C reads them through ``data_ptr()``:
    not a view with torch's lazy negative or conjugate bit (``z.conj().imag`` is a float32
    view whose values are the negation of its memory: C read them with every sign
    flipped — a new user's trial), not a ``ZeroTensor`` (no memory at all: C read past
    nothing and crashed the process). torch's own ops, lowbit's reference and compiled
    kernels, and its custom ops (the dispatcher resolves both bits before a kernel runs)
    see the values; a C kernel's gate sends such a tensor there."""
    import torch  # (this module builds and loads C code without torch otherwise)
    return all(not isinstance(t, torch.Tensor)
               or not (t.is_neg() or t.is_conj() or t._is_zerotensor()) for t in tensors)


def switched_off(name: str) -> bool:
    """Whether the environment switch ``name`` (``LOWBIT_AVX512``, ``LOWBIT_COMPILE``, …)
    turns its feature off: ``0``, ``false``, ``off`` or ``no`` (any case). Only ``0``
    counted before, so ``LOWBIT_COMPILE=false`` left compiling on without a word (a
    review); a value that is neither off nor ``1``/``true``/``on``/``yes`` is named in a
    ``RuntimeWarning`` and leaves the feature on."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _OFF:
        return True
    if value not in _ON:
        import warnings

        warnings.warn(f"lowbit: {name}={raw!r} is not a switch value (0/false/off/no turn it off, "
                      "1/true/on/yes leave it on); left on", RuntimeWarning, stacklevel=user_stacklevel())
    return False


def once(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``functools.cache`` of a kernel module's ``_library()`` that runs it once even where
    two threads ask first at the same moment (functools' cache takes no lock: a review
    found each kernel built and self-tested twice); ``cache_clear()`` as functools'."""
    lock, done = threading.RLock(), []

    @functools.wraps(fn)
    def wrapper() -> Any:
        if done:
            return done[0]
        with lock:
            if not done:
                done.append(fn())
        return done[0]

    wrapper.cache_clear = done.clear  # type: ignore[attr-defined]
    wrapper.decided = lambda: bool(done)  # type: ignore[attr-defined]  # (whether it has run)
    return wrapper


def test_threads(*counts: int) -> tuple[int, ...]:
    """The thread counts a self-test runs a kernel with: ``counts`` capped at
    ``torch.get_num_threads()``. A self-test at 2 threads in a process the user set to 1
    started an OpenMP pool of 2 that a later ``fork`` breaks: a forked child training with
    2 threads hung (torch alone does not, its pool was never started)."""
    import torch

    cap = max(1, torch.get_num_threads())
    return tuple(dict.fromkeys(min(c, cap) for c in counts))


@contextlib.contextmanager
def plain_torch():  # noqa: ANN201
    """Plain torch for lowbit's own self-tests, probes and kept tensors, whatever the
    caller is inside: functorch's transforms off (``torch.func.grad``'s and ``vmap``'s
    factories made wrapped tensors without storage — a kernel first used inside one
    failed its self-test and stayed off for the process, a review), torch function modes
    and subclasses off, dispatch modes off (a coverage trace must not count a probe's
    ops, nor a fake mode make its tensors), CPU autocast off (a probe's exact float32
    check ran in bf16 under it and cached a wrong "no": a review)."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    with torch._C._DisableFuncTorch(), torch._C.DisableTorchFunction(), _disable_current_modes(), \
            torch.autocast("cpu", enabled=False):
        yield


def self_tested(test: Callable[[], bool], warn: Warn, what: str, against: str) -> bool:
    """``test()`` (a kernel's self-test, run under :func:`plain_torch`) passed; a
    ``False`` or any exception is a warning (``warn(why, None)``) naming ``what`` and what
    it is compared ``against``."""
    try:
        with plain_torch():
            passed = test()
    except Exception as e:  # noqa: BLE001 - any failure means: do not use the kernel
        warn(f"the {what}'s self-test failed ({type(e).__name__}: {e})", None)
        return False
    if not passed:
        warn(f"the {what}'s self-test differs from {against}", None)
    return passed


def load_tested(source: Path, flags: Sequence[str], signatures: dict[str, list], warn: Warn, what: str,
                test: Callable[[ctypes.CDLL], bool], against: str,
                restypes: dict[str, Any] | None = None) -> ctypes.CDLL | None:
    """:func:`load`, then each function of ``signatures`` (name → ctypes argument types;
    they return nothing unless ``restypes`` names their ctypes result type) declared, then
    :func:`self_tested` with ``test(lib)``: the library, or ``None`` after a warning."""
    lib = load(source, flags, warn, what)
    if lib is None:
        return None
    for name, args in signatures.items():
        try:
            fn = getattr(lib, name)
        except AttributeError as e:  # a library of another version under this kernel's name
            warn(f"the {what}'s library lacks {name} ({e})", None)
            return None
        fn.restype, fn.argtypes = (restypes or {}).get(name), args
    return lib if self_tested(lambda: test(lib), warn, what, against) else None


__all__ = ["BuildError", "cache_dir", "compiler", "cpu_flags", "load", "load_tested", "once", "plain_torch",
           "self_tested", "switched_off", "test_threads"]
