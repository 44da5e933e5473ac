"""lowbit.kernels.cbuild and the kernels' first use: how the C kernels are built, cached,
shared and switched, and the workspace pools' lifetime (a review of the build cache)."""

from __future__ import annotations

import errno
import gc
import os
import shutil
import stat
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
