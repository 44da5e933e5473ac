"""The package's layers, read from the source with ``ast`` (nothing is imported):
``lowbit.analysis`` and ``lowbit.experiments`` are two libraries side by side and never
import each other, in either direction, at module level or inside a function; neither
imports the commands above them (``lowbit.commands``, ``lowbit.cli``), which use both.
Shared plumbing sits below both (``lowbit.plots``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lowbit

ROOT = Path(lowbit.__file__).parent
# package -> the lowbit packages it must not import (a name or any of its submodules)
FORBIDDEN = {
    "lowbit.analysis": ("lowbit.experiments", "lowbit.commands", "lowbit.cli"),
    "lowbit.experiments": ("lowbit.analysis", "lowbit.commands", "lowbit.cli"),
}


def module_name(path: Path) -> str:
    """``lowbit/analysis/bins.py`` -> ``lowbit.analysis.bins`` (``__init__`` -> the package)."""
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module name ``source`` (the text of ``module``) imports: ``import a.b``,
    ``from a import b`` (both ``a`` and ``a.b``: ``b`` may be a submodule), relative
    imports resolved against ``module``'s package, and ``importlib.import_module("a")`` /
    ``__import__("a")`` with a constant name. Function-level imports count too."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def violations(package: str) -> list[str]:
    """``"module imports target"`` for every import of a forbidden package under ``package``."""
    out = []
    for path in sorted((ROOT.parent / package.replace(".", "/")).rglob("*.py")):
        name = module_name(path)
        for target in sorted(imported_modules(path.read_text(), name, path.name == "__init__.py")):
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN[package]):
                out.append(f"{name} imports {target}")
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_analysis_and_experiments_do_not_import_each_other(package: str) -> None:
    files = list((ROOT.parent / package.replace(".", "/")).rglob("*.py"))
    assert len(files) >= 3  # the walk found the package's modules (not an empty glob)
    assert violations(package) == []


@pytest.mark.parametrize(("source", "module", "expected"), [
    ("from lowbit.analysis.plots import save_figure", "lowbit.experiments.report",
     "lowbit.analysis.plots"),
    ("from ..analysis import quantization_variance", "lowbit.experiments.demo",
     "lowbit.analysis"),
    ("from .. import experiments", "lowbit.analysis.bins", "lowbit.experiments"),
    ("def f():\n    import lowbit.experiments.trainer\n", "lowbit.analysis.bins",
     "lowbit.experiments.trainer"),
    ("import importlib\nimportlib.import_module('lowbit.commands.demo')", "lowbit.analysis.x",
     "lowbit.commands.demo"),
])
def test_the_checker_sees_every_kind_of_import(source: str, module: str, expected: str) -> None:
    # The layering test above can fail: each way of importing a forbidden module is seen.
    assert expected in imported_modules(source, module)


def test_relative_import_in_a_package_init_resolves_against_the_package() -> None:
    # In lowbit/analysis/__init__.py, ``from .variance import x`` is lowbit.analysis.variance
    # and ``from ..experiments import y`` is lowbit.experiments (not one level higher).
    found = imported_modules("from .variance import x\nfrom ..experiments import y",
                             "lowbit.analysis", is_package=True)
    assert {"lowbit.analysis.variance", "lowbit.experiments"} <= found


def test_shared_plotting_module_is_a_leaf() -> None:
    # lowbit/plots.py sits below analysis and experiments: it imports no lowbit module but
    # lowbit.atomic (files written whole), which imports none.
    path = ROOT / "plots.py"
    found = imported_modules(path.read_text(), module_name(path))
    assert sorted(t for t in found if t == "lowbit" or t.startswith("lowbit.")) == ["lowbit.atomic",
                                                                                     "lowbit.atomic.replace_with"]
    assert "matplotlib" in found or "matplotlib.pyplot" in found  # the walk read the file
    path = ROOT / "atomic.py"
    assert not [t for t in imported_modules(path.read_text(), module_name(path)) if t.startswith("lowbit")]
