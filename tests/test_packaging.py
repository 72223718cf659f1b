"""Packaging: what the tests import is installed by the README's test command, py.typed ships, floors hold."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata, resources
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"onnxq", "tiny", "conftest"}
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules(*folders: Path) -> set[str]:
    """Top-level third-party modules imported anywhere in the folders' files (inside functions too)."""
    modules, local = set(), set()
    for file in (file for folder in folders for file in folder.glob("*.py")):
        local.add(file.stem)
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - LOCAL - local - {"__future__"}


def installed_closure(requirements: list[str]) -> set[str]:
    """The distributions these requirements install, dependencies of dependencies included (no extras)."""
    seen: set[str] = set()
    pending = [NAME.match(r)[1] for r in requirements]
    while pending:
        name = canonical(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        pending += [NAME.match(r)[1] for r in requires if "extra ==" not in r]
    return seen


def test_every_module_the_tests_reach_comes_with_the_test_extra():
    """`pip install -e '.[test]'` must install everything the tests and the code they run import (the HTML report's
    matplotlib once came only with the report extra, so the README's test command failed in a fresh venv)."""
    requirements = [r for r in metadata.requires("onnxq") or [] if "extra ==" not in r or "extra == \"test\"" in r]
    provided = installed_closure(requirements)
    owners = metadata.packages_distributions()
    reached = imported_modules(ROOT / "tests", ROOT / "onnxq", ROOT / "passes")
    missing = {module: owners.get(module, [module]) for module in reached
               if not any(canonical(dist) in provided for dist in owners.get(module, [module]))}
    assert not missing, f"tests import modules the test extra does not install: {missing}"


def test_py_typed_ships_with_the_package():
    assert resources.files("onnxq").joinpath("py.typed").is_file()


def test_floors_allow_int2_export():
    """INT2 weights need onnx 1.20 (the type), ml_dtypes 0.5 (int2) and onnxruntime 1.24.1 (IR 11, opset 25)."""
    tomllib = pytest.importorskip("tomllib")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {canonical(NAME.match(r)[1]): r.split(">=")[1] for r in declared if ">=" in r}
    version = lambda text: tuple(int(part) for part in text.split("."))  # noqa: E731
    assert version(floors["onnx"]) >= (1, 20)
    assert version(floors["ml-dtypes"]) >= (0, 5)
    assert version(floors["onnxruntime"]) >= (1, 24, 1)
