"""What an installed lowbit needs beside its Python modules ships with it: every file the
package reads at run time (the C kernels it compiles at first use) matches a pattern of
``[tool.setuptools.package-data]``; and a source missing from an installation is named
as missing, not blamed on the kernel cache."""

from __future__ import annotations

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
