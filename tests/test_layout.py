"""The library's folders follow the pipeline: a module imports only from its own folder and from folders
earlier in the pipeline, so the import graph is acyclic between folders and points down the pipeline."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "mnist_world"
# Earlier folders never import later ones; core (files, stores, devices, pixel metrics) and config are the
# foundation under every stage.
ORDER = ["core", "config", "data", "actions", "model", "training", "evaluation", "playground"]


def folder_of(module: str) -> str | None:
    """`mnist_world.model.network` -> `model`; None for the package's face (`mnist_world.cli`)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ORDER else None


def imported_folders(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnist_world"):
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {folder for name in names if (folder := folder_of(name))}
    return found


def test_only_the_face_and_entry_points_are_top_level() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "cli.py"]
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == sorted(ORDER)


@pytest.mark.parametrize("folder", ORDER)
def test_imports_point_down_the_pipeline(folder: str) -> None:
    rank = ORDER.index(folder)
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        for imported in imported_folders(path) - {folder}:
            where = path.relative_to(ROOT)
            assert ORDER.index(imported) < rank, f"{where} imports {imported}: later in the pipeline"


def test_folders_hold_a_handful_of_modules() -> None:
    for folder in ORDER:
        modules = [p for p in (PACKAGE / folder).glob("*.py") if p.name != "__init__.py"]
        assert 2 <= len(modules) <= 8, f"{folder}: {len(modules)} modules"
