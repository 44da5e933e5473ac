"""What an installed lowbit needs beside its Python modules ships with it: every file the
package reads at run time (the C kernels it compiles at first use) matches a pattern of
``[tool.setuptools.package-data]``; a source missing from an installation is named as
missing, not blamed on the kernel cache; and the kernels' build and self-tests survive
the environments users run in (no home directory, a fork after a single-threaded parent)."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import lowbit
from lowbit.kernels import cbuild

PACKAGE = Path(lowbit.__file__).parent
PYPROJECT = PACKAGE.parent / "pyproject.toml"


def _shipped() -> set[Path]:
    patterns = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]["lowbit"]
    return {p for pattern in patterns for p in PACKAGE.glob(pattern)}


@pytest.mark.skipif(not PYPROJECT.is_file(), reason="an installed lowbit, not the source tree")
def test_every_non_python_file_of_the_package_is_package_data() -> None:
    data = {p for p in PACKAGE.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc", ".so")
            and "__pycache__" not in p.parts}
    assert data, "the package has C kernel sources"
    missing = sorted(str(p.relative_to(PACKAGE)) for p in data - _shipped())
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
    sources = {Path(m.SOURCE) for m in _kernel_modules()}
    assert sources <= _shipped()


def _kernel_modules() -> list:
    from lowbit.kernels import amx, avx512, bhq_groups, softmax, vnni

    return [amx, avx512, bhq_groups, softmax, vnni]


def test_a_missing_source_is_named_as_missing(tmp_path: Path) -> None:
    said: list[tuple[str, str | None]] = []
    lib = cbuild.load(tmp_path / "gone.c", ["-O2"], lambda why, then: said.append((why, then)),
                      "test kernel")
    assert lib is None
    (why, then), = said
    assert "C source" in why and "gone.c" in why and "missing" in why and "cache" not in why
    assert then is None


@pytest.mark.skipif(cbuild.compiler(lambda why, then: None) is None, reason="no C compiler")
def test_no_home_directory_builds_in_a_temporary_folder(tmp_path: Path, monkeypatch) -> None:
    """No HOME, no XDG_CACHE_HOME, no LOWBIT_CACHE_DIR and no passwd entry: pathlib's
    "Could not determine home directory" stopped training at the first layer call. Now
    a warning names LOWBIT_CACHE_DIR and the kernel is built in a temporary folder."""
    src = tmp_path / "tiny.c"
    src.write_text("int lowbit_tiny(void) { return 7; }\n")
    for var in ("LOWBIT_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(var, raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    said: list[tuple[str, str | None]] = []
    lib = cbuild.load(src, ["-O2", "-shared", "-fPIC"], lambda why, then: said.append((why, then)), "test kernel")
    assert lib is not None and lib.lowbit_tiny() == 7
    (why, then), = said
    assert "no home directory" in why and "LOWBIT_CACHE_DIR" in why and "temporary" in then


FORK_CHILD = """
import multiprocessing as mp
import sys
import torch
import lowbit

def step(threads):
    torch.set_num_threads(threads)
    sums = []
    for recipe in sys.argv[1:]:
        torch.manual_seed(0)
        m = lowbit.convert(torch.nn.Linear(256, 128), lowbit.FQTConfig.from_recipe(recipe, seed=1))
        x = torch.randn(128, 256, requires_grad=True)  # ∇X too: BHQ's transform and its group kernel
        m(x).square().sum().backward()
        sums.append(float(m.weight.grad.double().sum() + x.grad.double().sum()))
    return sums

def child(q):
    q.put(step(2))

if __name__ == "__main__":
    want = step(1)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=child, args=(q,))
    p.start()
    got = q.get(timeout=90)
    p.join(10)
    print(got == want)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork only")
def test_a_forked_child_with_more_threads_than_its_parent_finishes(tmp_path: Path) -> None:
    """A single-threaded parent ran lowbit's kernel self-tests at 2 threads, starting an
    OpenMP pool that fork breaks: a forked child training with 2 threads hung for good
    (torch alone does not). The self-tests now use at most torch's thread count. With a
    cold Inductor cache the child, compiling a variant of its own, waited forever on the
    parent's C++-build thread pool, which fork leaves without threads (torch 2.13 resets
    only its process pool): lowbit resets it in the child (``compiled._after_fork_in_child``);
    the cache is cold here so that the child compiles. PSQ and BHQ (its group kernel's
    self-test too: a review), one after the other in the same parent and child."""
    script = tmp_path / "fork_child.py"
    script.write_text(FORK_CHILD)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([sys.executable, str(script), "fqt-psq-8", "fqt-bhq-8"], capture_output=True,
                          text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True"]  # the child's gradients equal the parent's


def test_submodules_named_in_the_readme_are_attributes_after_import_lowbit() -> None:
    """A new user's review: the README writes ``lowbit.optim.SRSGD(...)``,
    ``lowbit.analysis.gradient_variance(...)``, ``lowbit.distributed.quantized_allreduce_hook``,
    which raised AttributeError after a plain ``import lowbit``. They are imported on first
    use; an unknown name still raises AttributeError."""
    code = ("import lowbit, sys\n"
            "assert 'lowbit.optim' not in sys.modules\n"  # not imported up front
            "print(lowbit.optim.SRSGD.__name__, lowbit.analysis.gradient_variance.__name__,\n"
            "      lowbit.distributed.quantized_allreduce_hook.__name__, lowbit.monitor.VarianceMonitor.__name__,\n"
            "      lowbit.adaptive.__name__)\n"
            "try:\n"
            "    lowbit.optimm\n"
            "except AttributeError as exc:\n"
            "    print(exc)\n"
            "sys.modules['transformers'] = None  # as if not installed: hasattr says False\n"
            "print(hasattr(lowbit, 'hf'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout.split("\n")
    assert out[0] == "SRSGD gradient_variance quantized_allreduce_hook VarianceMonitor lowbit.adaptive"
    assert out[1] == "module 'lowbit' has no attribute 'optimm'"
    assert out[2] == "False"
