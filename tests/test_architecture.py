"""Where code may reach: the import graph, walked statically (imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.nbd import REPO

PRODUCT = ["exports", "migrations_app", "live", "omaportal"]
PROJECT = [*PRODUCT, "devtools", "tests", "bench"]


def modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def imported(path: Path, root: Path = REPO) -> set[str]:
    """Every module name ``path`` imports, relative imports made absolute."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join([*base, node.module] if node.module else base))
            elif node.module:
                names.add(node.module)
    return names


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_walker_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    sample = tmp_path / "live" / "sub" / "sample.py"
    sample.parent.mkdir(parents=True)
    sample.write_text(
        "import os\nfrom .registry import Group\n"
        "def f():\n    from migrations_app.models import MigrationJob\n    from .. import relay\n"
    )
    assert imported(sample, tmp_path) == {"os", "live.sub.registry", "migrations_app.models", "live"}


@pytest.mark.parametrize("path", modules("live"), ids=lambda p: str(p.relative_to(REPO)))
def test_live_imports_no_app(path: Path) -> None:
    """The transport knows no page: the apps register theirs (live.py), never the other way."""
    reached = {top(name) for name in imported(path)} & set(PROJECT)
    assert reached <= {"live"}, f"{path.relative_to(REPO)} imports {sorted(reached - {'live'})}"


@pytest.mark.parametrize(
    "path", [p for package in PRODUCT for p in modules(package)], ids=lambda p: str(p.relative_to(REPO))
)
def test_product_code_never_imports_stand_ins_tests_or_benches(path: Path) -> None:
    reached = {top(name) for name in imported(path)} & {"devtools", "tests", "bench"}
    assert not reached, f"{path.relative_to(REPO)} imports {sorted(reached)}"
