"""The package's shape, as docs/architecture.md draws it: what import-linter's contracts (scripts/check)
cannot say. The direction of imports itself is those contracts' job."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "iros"
TOP_LEVEL = {"__init__.py", "__main__.py", "app.py"}
MAX_MODULES = 25


def _sources(*roots: Path) -> Iterator[tuple[Path, ast.Module]]:
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            yield path, ast.parse(path.read_text(), str(path))


def _packages() -> list[Path]:
    return sorted(PACKAGE.rglob("__init__.py"))


def test_only_the_assembly_stays_at_the_top() -> None:
    """Every module lives in the package of its domain; the top holds the app and the entry points."""
    assert {p.name for p in PACKAGE.glob("*.py")} == TOP_LEVEL


def test_no_package_grows_past_a_readable_size() -> None:
    """No folder holds more than about 25 modules."""
    crowded = {
        str(init.parent.relative_to(REPO)): n
        for init in _packages()
        if (n := len(list(init.parent.glob("*.py")))) > MAX_MODULES
    }
    assert not crowded


def test_no_private_name_is_imported_from_another_module() -> None:
    """A name that starts with _ is its module's own: no other module imports it."""
    found = []
    for path, tree in _sources(PACKAGE, REPO / "tools", REPO / "tests"):
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(("iros", "tools")):
                found += [
                    f"{path.relative_to(REPO)}:{node.lineno} {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not found


def test_the_cli_loads_a_benchmark_only_inside_its_command() -> None:
    """`iros serve` and every other command start without importing iros.bench: cli/bench.py imports a
    benchmark inside the function of its command, never at the top of the module."""
    tree = ast.parse((PACKAGE / "cli" / "bench.py").read_text())
    at_top = [
        node.module
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("iros.bench")
    ]
    inside = [
        node
        for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef)
        for node in ast.walk(fn)
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("iros.bench")
    ]
    assert not at_top and inside


def test_tests_mirror_the_packages() -> None:
    """tests/<package>/ holds the tests of iros/<package>/; tests/app/ those of the assembled whole
    (app.py), tests/tools/ those of tools/."""
    packages = {p.parent.name for p in _packages() if p.parent.parent == PACKAGE} | {"app", "tools"}
    folders = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders <= packages, folders - packages
    assert not [p.name for p in (REPO / "tests").glob("test_*.py") if p.name != Path(__file__).name]
