"""lowbit.kernels.cbuild and the kernels' first use: how the C kernels are built, cached,
shared and switched, and the workspace pools' lifetime (a review of the build cache)."""

from __future__ import annotations

import errno
import gc
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
import types
import warnings

import pytest
import torch

from lowbit.kernels import amx, bhq_groups, cbuild, compiled, workspace

needs_cc = pytest.mark.skipif(cbuild.compiler(lambda *a: None) is None, reason="needs a C compiler")


def _quiet(*_args: object) -> None:
    return None


@needs_cc
def test_cached_files_follow_the_umask_and_killed_builds_are_cleared(tmp_path, monkeypatch) -> None:
    """``mkstemp`` left the library and its digest 0600: another user of a shared or
    pre-built cache read them as "damaged" and rebuilt over them; a killed build's
    files stayed for good."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    stale = tmp_path / "bhq_groups-building-old.so"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    fresh = tmp_path / "bhq_groups-building-now.so"  # another process building at this moment
    fresh.write_bytes(b"half")
    old = os.umask(0o022)
    try:
        lib = cbuild.load(bhq_groups.SOURCE, bhq_groups.FLAGS, _quiet, "test kernel")
    finally:
        os.umask(old)
    assert lib is not None
    (so,) = tmp_path.glob("bhq_groups-*[!w].so")  # not the building files
    assert stat.S_IMODE(so.stat().st_mode) == 0o755
    assert stat.S_IMODE(so.with_name(so.name + ".sha256").stat().st_mode) == 0o644
    assert not stale.exists() and fresh.exists()


def _no_openmp_compiler(tmp_path) -> str:  # noqa: ANN001
    """A C compiler command (the one lowbit finds, wrapped) that refuses ``-fopenmp`` as
    Apple's clang does, and links with ``--no-undefined`` so that a library calling
    OpenMP without it fails to build (after ``import torch`` the loader would otherwise
    find torch's libgomp and hide it)."""
    cc = cbuild.compiler(_quiet)
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && { echo "unsupported option -fopenmp" >&2; '
                       'exit 1; }; done\nexec ' + " ".join(cc) + ' "$@" -Wl,--no-undefined -lm\n')
    wrapper.chmod(0o755)
    return str(wrapper)


KERNELS_WITH_OPENMP = [("lowbit.kernels.avx512", "SOURCE", "FLAGS"), ("lowbit.kernels.softmax", "SOURCE", None),
                       ("lowbit.kernels.vnni", "SOURCE", "FLAGS"), ("lowbit.kernels.amx", "SOURCE", "FLAGS"),
                       ("lowbit.kernels.bhq_groups", "SOURCE", "FLAGS")]


@needs_cc
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU ld's --no-undefined")
@pytest.mark.parametrize("module, source, flags", KERNELS_WITH_OPENMP, ids=[m.split(".")[-1] for m, *_ in KERNELS_WITH_OPENMP])
def test_every_openmp_kernel_builds_without_openmp(tmp_path, monkeypatch, module: str, source: str,
                                                   flags: str | None) -> None:
    """A compiler without OpenMP (Apple's clang, clang without libomp) lost every kernel
    whose build asked for ``-fopenmp``: each now builds without it (its C guards
    ``omp.h``; one thread) and says so in one warning (a review). Checked on the build
    alone (-O0: the code, not its speed), for every kernel that asks for OpenMP."""
    import importlib

    mod = importlib.import_module(module)
    src = getattr(mod, source)
    fl = [f for f in (getattr(mod, flags) if flags else importlib.import_module("lowbit.kernels.avx512").FLAGS)
          if not f.startswith("-O")] + ["-O0"]
    assert "-fopenmp" in fl
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", _no_openmp_compiler(tmp_path))
    said: list[tuple[str, str | None]] = []
    lib = cbuild.load(src, fl, lambda why, then=None: said.append((why, then)), "test kernel")
    assert lib is not None, said
    (why, then), = said
    assert why.startswith("the test kernel was built without OpenMP (the C compiler refused -fopenmp: ")
    assert "unsupported option -fopenmp" in why and then.startswith("it runs on one thread")


def _tiny_build_with(compiler_script, tmp_path, monkeypatch) -> list[tuple[str, str | None]]:  # noqa: ANN001
    """The warnings of ``cbuild.load`` of a one-function C file with ``CC`` the given
    script (made executable), into a fresh cache; the load must fail."""
    compiler_script.chmod(0o755)
    src = tmp_path / "tiny.c"
    src.write_text("int lowbit_tiny(void) { return 7; }\n")
    monkeypatch.setenv("CC", str(compiler_script))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    said: list[tuple[str, str | None]] = []
    assert cbuild.load(src, ["-O0", "-shared", "-fPIC"], lambda why, then=None: said.append((why, then)),
                       "tiny kernel") is None
    return said


@needs_cc
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an ELF library the loader cannot find")
def test_a_library_that_builds_but_never_loads_is_built_twice_not_three_times(tmp_path, monkeypatch) -> None:
    """A library that links but that the loader cannot load (here: one needing a shared
    library the linker found and the loader does not — clang's OpenMP without libomp on
    the loader's path) was built a third time in a temporary folder after the rebuild
    in the cache failed to load too (a review): now it is a build failure after the
    rebuild, warned about, and ``None``."""
    dep = tmp_path / "dep"
    dep.mkdir()
    cc = cbuild.compiler(_quiet)
    (dep / "fake.c").write_text("int lowbit_fake_dep(void) { return 1; }\n")
    import subprocess

    subprocess.run([*cc, "-shared", "-fPIC", str(dep / "fake.c"), "-o", str(dep / "libfakedep.so")], check=True)
    log = tmp_path / "builds.log"
    wrapper = tmp_path / "cc-linking-a-missing-library"
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = --version ] || echo build >> {log}\nexec {" ".join(cc)} "$@" '
                       f'-Wl,--no-as-needed -L{dep} -lfakedep\n')
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    said = _tiny_build_with(wrapper, tmp_path, monkeypatch)
    assert log.read_text().split() == ["build", "build"]  # the cache's, then once again
    (loaded, again), (built, _) = said
    assert "could not be loaded" in loaded and again == "building it again"
    assert built.startswith("the tiny kernel could not be built (") and "libfakedep.so" in built
    # the same missing library linked for OpenMP alone (clang's -fopenmp with libomp off the
    # loader's path): the kernel is built without it, and the warning blames the loading,
    # not the compiler (a review)
    omp_only = tmp_path / "cc-linking-a-missing-library-for-openmp"  # (another compiler: another cache key)
    omp_only.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exec {" ".join(cc)} "$@" '
                        f'-Wl,--no-as-needed -L{dep} -lfakedep; done\nexec {" ".join(cc)} "$@"\n')
    omp_only.chmod(0o755)
    monkeypatch.setenv("CC", str(omp_only))
    said.clear()
    assert cbuild.load(tmp_path / "tiny.c", ["-O0", "-shared", "-fPIC", "-fopenmp"],
                       lambda why, then=None: said.append((why, then)), "tiny kernel").lowbit_tiny() == 7
    (why, then), = said
    assert why.startswith("the tiny kernel was built without OpenMP (its OpenMP build could not be loaded: ")
    assert "libfakedep.so" in why and then.startswith("it runs on one thread")


@needs_cc
def test_a_cache_the_loader_cannot_map_from_loads_a_copy(tmp_path, monkeypatch) -> None:
    """A cache on a noexec mount (a hardened /home, /dev/shm): the loader refuses every
    library there, intact or rebuilt. The cached one is loaded from a copy in a temporary
    folder, with a warning naming the directory (two reviews: a change had made it a
    build failure, every kernel lost; its fix rebuilt and unlinked the cached library in
    every process, racing another process's copy of it): one build, in every process."""
    import ctypes

    cache = tmp_path / "cache"
    real = ctypes.CDLL

    def loader(name, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(name).startswith(str(cache)):
            raise OSError(f"{name}: failed to map segment from shared object")
        return real(name, *args, **kwargs)

    cc = cbuild.compiler(_quiet)
    log = tmp_path / "builds.log"
    wrapper = tmp_path / "cc-logged"
    wrapper.write_text(f'#!/bin/sh\n[ "$1" = --version ] || echo build >> {log}\nexec {" ".join(cc)} "$@"\n')
    wrapper.chmod(0o755)
    src = tmp_path / "tiny.c"
    src.write_text("int lowbit_tiny(void) { return 7; }\n")
    monkeypatch.setenv("CC", str(wrapper))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(cache))
    monkeypatch.setattr(ctypes, "CDLL", loader)
    said: list[tuple[str, str | None]] = []
    lib = cbuild.load(src, ["-O0", "-shared", "-fPIC", "-fopenmp"], lambda why, then=None: said.append((why, then)),
                      "tiny kernel")
    assert lib is not None and lib.lowbit_tiny() == 7
    again = cbuild.load(src, ["-O0", "-shared", "-fPIC", "-fopenmp"], lambda why, then=None: said.append((why, then)),
                        "tiny kernel")  # as another process would
    assert again is not None and again.lowbit_tiny() == 7
    assert log.read_text().split() == ["build"] and len(list(cache.glob("tiny-*.so"))) == 1
    assert len(said) == 2 and said[0] == said[1]
    why, then = said[0]
    assert why.startswith(f"the loader cannot map the tiny kernel from the kernel cache directory {str(cache)!r} (")
    assert "failed to map segment" in why and "point LOWBIT_CACHE_DIR at a directory libraries may be loaded from" in why
    assert then == "loading a copy from a temporary directory (again in every process until then)"


def test_a_compiler_printing_bytes_that_are_not_utf8_is_a_warning(tmp_path, monkeypatch) -> None:
    """A compiler's version or error text in another encoding raised UnicodeDecodeError
    out of the kernel's first use instead of the build's warning (a review)."""
    wrapper = tmp_path / "cc-latin1"
    wrapper.write_bytes(b"#!/bin/sh\nprintf 'compil\\351 \\377\\n' >&2\nprintf 'v\\351rsion\\n'\n"
                        b"[ \"$1\" = --version ] && exit 0\nexit 1\n")
    said = _tiny_build_with(wrapper, tmp_path, monkeypatch)
    (why, _), = said
    assert why.startswith("the tiny kernel could not be built (compil\ufffd \ufffd")


@needs_cc
def test_a_build_failing_otherwise_is_warned_once(tmp_path) -> None:
    """A build that fails for another reason than OpenMP is tried again without it, and
    the user hears of it once (the second build's error), not twice."""
    bad = tmp_path / "bad.c"
    bad.write_text("int lowbit_bad( { return 0; }\n")
    said: list[tuple[str, str | None]] = []
    assert cbuild.load(bad, ["-O0", "-shared", "-fPIC", "-fopenmp"], lambda why, then=None: said.append((why, then)),
                       "bad kernel") is None
    (why, then), = said
    assert why.startswith("the bad kernel could not be built (") and then is None


@needs_cc
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_a_cxx_compiler_still_builds_c(tmp_path, monkeypatch) -> None:
    """``CC=g++`` compiled the .c files as C++, mangling every symbol: each kernel
    switched off naming a missing function, and the AMX kernel crashed training."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "g++")
    lib = cbuild.load(bhq_groups.SOURCE, bhq_groups.FLAGS, _quiet, "test kernel")
    assert lib is not None and hasattr(lib, "lowbit_bhq_groups")


@pytest.mark.skipif(not amx.cpu_has_amx(), reason="needs a CPU with AMX")
def test_an_amx_library_without_its_functions_is_a_warning(monkeypatch) -> None:
    monkeypatch.setattr(cbuild, "load", lambda *a, **k: types.SimpleNamespace())
    amx._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="AMX kernel's library lacks a function"):
            assert amx._library() is None
    finally:
        monkeypatch.undo()
        amx._library.cache_clear()
    assert amx._library() is not None or not amx.available()


def test_the_cache_dir_is_absolute_and_expands_home(monkeypatch) -> None:
    """``LOWBIT_CACHE_DIR='~/x'`` made a folder named ``~`` in the working directory, and a
    relative path another cache in every working directory."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", "~/lowbit-test-cache")
    assert str(cbuild.cache_dir()) == os.path.expanduser("~/lowbit-test-cache")
    monkeypatch.setenv("LOWBIT_CACHE_DIR", "relative/cache")
    with pytest.raises(OSError, match="LOWBIT_CACHE_DIR must be an absolute path"):
        cbuild.cache_dir()


def test_an_unusable_cache_dir_is_named_once_in_the_warning(monkeypatch) -> None:
    """A review: a relative ``LOWBIT_CACHE_DIR`` was warned about as "the kernel cache
    directory the kernel cache directory is not usable"."""
    monkeypatch.setenv("LOWBIT_CACHE_DIR", "relative/cache")
    said: list[str] = []
    lib = cbuild.load(bhq_groups.SOURCE, bhq_groups.FLAGS, lambda why, then: said.append(why), "test library")
    assert said and said[0].startswith("the kernel cache directory 'relative/cache' is not usable (LOWBIT_CACHE_DIR "
                                       "must be an absolute path")
    assert lib is not None or cbuild.compiler(lambda *a: None) is None  # built in a temporary folder


def test_a_full_disk_at_link_time_is_an_os_error(tmp_path) -> None:
    """The linker's "No space left on device" was a failed build (the kernel off); as an
    OSError, load builds in a temporary folder instead."""
    cc = tmp_path / "fullcc"
    cc.write_text("#!/bin/sh\necho 'ld: final link failed: No space left on device' >&2\nexit 1\n")
    cc.chmod(0o755)
    with pytest.raises(OSError) as info:
        cbuild._compile([str(cc)], "v", bhq_groups.SOURCE, bhq_groups.FLAGS, tmp_path / "cache")
    assert info.value.errno == errno.ENOSPC


def test_switch_values(monkeypatch) -> None:
    """Only ``0`` switched a feature off: ``LOWBIT_COMPILE=false`` left it on silently."""
    for value, off in (("0", True), ("false", True), ("OFF", True), (" no ", True),
                       ("1", False), ("", False), ("true", False), ("yes", False)):
        monkeypatch.setenv("LOWBIT_TEST_SWITCH", value)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cbuild.switched_off("LOWBIT_TEST_SWITCH") is off, value
    monkeypatch.setenv("LOWBIT_TEST_SWITCH", "disable")
    with pytest.warns(RuntimeWarning, match="LOWBIT_TEST_SWITCH='disable' is not a switch value"):
        assert cbuild.switched_off("LOWBIT_TEST_SWITCH") is False


def test_first_use_runs_once_across_threads() -> None:
    """functools.cache took no lock: two threads asking first built and self-tested each
    kernel twice."""
    calls = []

    @cbuild.once
    def slow() -> str:
        calls.append(1)
        time.sleep(0.2)
        return "lib"

    threads = [threading.Thread(target=slow) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and slow() == "lib"
    slow.cache_clear()
    assert slow() == "lib" and calls == [1, 1]


def test_a_compiler_failure_names_its_cause() -> None:
    """``BackendCompilerFailed``'s first line only introduces its cause."""
    exc = RuntimeError("backend='inductor' raised:\nInvalidCxxCompiler: No working C++ compiler found\nmore")
    assert compiled._describe(exc) == ("RuntimeError: backend='inductor' raised: InvalidCxxCompiler: "
                                       "No working C++ compiler found")


def test_a_finished_threads_pool_is_dropped(monkeypatch) -> None:
    """Each thread's pool stayed in a module list after the thread ended: +32 MB held for
    good per short-lived thread that used a large buffer."""
    monkeypatch.setattr(workspace, "MIN_BYTES", 1 << 12)
    monkeypatch.setattr(workspace, "recycles_freed_memory", lambda: False)
    monkeypatch.setattr(workspace, "_enabled", True)
    before = workspace.held_bytes()

    def work() -> None:
        workspace.empty((4096,), torch.int32)
        assert workspace.held_bytes() >= before + 4096 * 4

    for _ in range(3):
        t = threading.Thread(target=work)
        t.start()
        t.join()
    gc.collect()
    assert workspace.held_bytes() == before


def test_the_umask_is_read_without_being_set() -> None:
    """``os.umask(0)`` to read it left the process's umask 0 for a moment: another
    thread's files were world-writable (a review)."""
    old = os.umask(0o027)
    try:
        assert cbuild._umask() == 0o027
        assert os.umask(0o027) == 0o027  # unchanged by the read
    finally:
        os.umask(old)


_FIRST_USE = """
import sys, warnings, torch
warnings.simplefilter("error", RuntimeWarning)  # a failed self-test's warning fails the run
from lowbit.kernels import avx512, bhq_groups, qconv, softmax, vnni
def check():
    return [avx512.available(), softmax.available(), vnni.available(), bhq_groups.available(),
            qconv._exact_here()]
def f(x):
    print(check())
    bhq_groups._tables(512)  # the groups' kept tables grown inside the transform
    from lowbit.kernels import Backend, kernels_for
    from lowbit.quantizers.bhq import bhq_transform
    a = torch.randn(64, 8) * torch.exp(torch.randn(64, 1))  # BHQ's public path there: the reference's groups
    want = bhq_transform(a, kernels_for(Backend.REFERENCE, "cpu"))
    print(torch.equal(bhq_transform(a, kernels_for(Backend.AUTO, "cpu")).scale, want.scale))
    return (x * 2).sum()
if sys.argv[1] == "grad":
    torch.func.grad(f)(torch.ones(3))
print(check())
if bhq_groups.available():
    lam = torch.rand(300, dtype=torch.float64) + 0.1
    got, want = bhq_groups.run(lam, torch.float32), bhq_groups.reference(lam, torch.float32)
    print(torch.equal(got.scale, want.scale), type(bhq_groups._TABLES[0]) is torch.Tensor,
          not torch._C._functorch.is_functorch_wrapped_tensor(bhq_groups._TABLES[0]))
"""


@needs_cc
def test_kernels_first_used_inside_a_functorch_transform_stay_on() -> None:
    """A process whose first use of lowbit's C kernels is inside ``torch.func.grad``: each
    self-test and probe runs on plain tensors (:func:`lowbit.kernels.cbuild.plain_torch`),
    so every kernel is as available as in a process that never ran the transform, and
    BHQ's kept square-root tables are plain tensors (inside the transform the factories
    made wrapped tensors without storage: each self-test failed and switched its kernel
    off for the process — a review)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # (the built libraries reused: a self-test runs per process)
    runs = {how: subprocess.run([sys.executable, "-c", _FIRST_USE, how], env=env, capture_output=True, text=True,
                                timeout=600)
            for how in ("plain", "grad")}
    for how, out in runs.items():
        assert out.returncode == 0, (how, out.stderr[-3000:])
    plain, grad = runs["plain"].stdout.splitlines(), runs["grad"].stdout.splitlines()
    assert grad[0] == grad[2] == plain[0], (plain, grad)  # inside the transform, after it, never in it
    assert grad[1] == "True" and grad[3:] == plain[1:] and all(v == "True" for v in " ".join(grad[3:]).split())


def test_plain_torch_leaves_no_transform_mode_or_autocast_on() -> None:
    """Inside :func:`lowbit.kernels.cbuild.plain_torch`, under the caller's
    ``torch.func.grad``, a dispatch mode and bf16 autocast: factories make plain tensors,
    the mode sees nothing, a float32 product stays float32 (a convolution probe's exact
    float32 check ran in bf16 under autocast and cached a wrong "no": a review)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            seen.append(func)
            return func(*args, **(kwargs or {}))

    def f(x):  # noqa: ANN001, ANN202
        with Count(), torch.autocast("cpu", dtype=torch.bfloat16), cbuild.plain_torch():
            t = torch.ones(4, 4)
            out.append((torch._C._functorch.is_functorch_wrapped_tensor(t), torch.mm(t, t).dtype))
        return (x * 2).sum()

    out: list = []
    torch.func.grad(f)(torch.ones(3))
    assert out == [(False, torch.float32)] and seen == []
