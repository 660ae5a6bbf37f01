"""dvc.yaml stays true to the code: each stage depends on exactly the library modules it imports, and
declares params sections that exist; its paths are stated once, as the stage's option defaults."""

from __future__ import annotations

import ast
import importlib.util
import inspect
from pathlib import Path

import pytest
import yaml

from mnist_world.config import SECTIONS

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_files(name: str) -> list[Path]:
    """The files that importing `name` runs: each enclosing package's `__init__.py`, then the module itself
    (a module file, or a package's `__init__.py`); none when `name` is not a library module."""
    parts = name.split(".")
    files = [Path("src", *parts[:i], "__init__.py") for i in range(1, len(parts))]
    module = Path("src", *parts).with_suffix(".py")
    package = Path("src", *parts, "__init__.py")
    target = module if (ROOT / module).is_file() else package if (ROOT / package).is_file() else None
    return [*files, target] if target else []


def library_imports(path: Path, found: set[str] | None = None) -> set[str]:
    """Every file under `src/mnist_world/` that importing `path` runs, directly or through other library
    modules (the packages' `__init__.py` included)."""
    found = set() if found is None else found
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnist_world"):
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("mnist_world")]
        else:
            continue
        for name in names:
            for module in module_files(name):
                if str(module) not in found:
                    found.add(str(module))
                    library_imports(ROOT / module, found)
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_are_the_modules_it_imports(stage: str) -> None:
    definition = STAGES[stage]
    script = definition["cmd"].split()[1]
    assert script in definition["deps"]
    declared = {dep for dep in definition["deps"] if dep.startswith("src/")}
    assert declared == library_imports(ROOT / script)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_params_name_real_sections(stage: str) -> None:
    for param in STAGES[stage].get("params", []):
        assert param.split(".")[0] in SECTIONS, f"{stage}: unknown params section in {param}"


def declared_paths(definition: dict) -> set[str]:
    """Every path a stage declares: deps, and outs, metrics and plots (entries or mappings of one)."""
    found = set(definition.get("deps", []))
    for kind in ("outs", "metrics", "plots"):
        for entry in definition.get(kind, []):
            found |= set(entry) if isinstance(entry, dict) else {entry}
    return found


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_paths_are_stated_once(stage: str) -> None:
    """The paths live in the stage's option defaults; dvc.yaml's cmd passes none, and every default path
    (params.yaml aside) is one that dvc.yaml declares for the stage."""
    script = STAGES[stage]["cmd"].split()
    assert script == ["python", f"stages/{stage}.py"], f"{stage}: cmd passes arguments: {script}"
    spec = importlib.util.spec_from_file_location(f"stage_{stage}", ROOT / script[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    defaults = {
        str(parameter.default)
        for parameter in inspect.signature(module.main).parameters.values()
        if isinstance(parameter.default, Path) and parameter.default != Path("params.yaml")
    }
    declared = declared_paths(STAGES[stage])
    # A folder stands for what it holds (models/best.pt), and is declared by what it holds (reports/eval).
    undeclared = {
        path
        for path in defaults
        if not any(d == path or d.startswith(f"{path}/") or path.startswith(f"{d}/") for d in declared)
    }
    assert not undeclared, f"{stage}: default paths not in dvc.yaml: {sorted(undeclared)}"


def test_the_trained_model_is_a_declared_artifact() -> None:
    """`artifacts:` names best.pt (the checkpoint evaluation reads) as a model, inside the train stage's outs,
    and DVC itself reads the section."""
    from dvc.repo import Repo

    from mnist_world.model.checkpoint import BEST

    with Repo(str(ROOT)) as repo:
        artifacts = repo.artifacts.read()["dvc.yaml"]
    models = {name: artifact for name, artifact in artifacts.items() if artifact.type == "model"}
    assert [artifact.path for artifact in models.values()] == [f"models/{BEST}"]
    (artifact,) = models.values()
    assert artifact.desc and artifact.labels
    train_outs = {
        next(iter(entry)) if isinstance(entry, dict) else entry for entry in STAGES["train"]["outs"]
    }
    assert any(artifact.path.startswith(f"{out}/") for out in train_outs)
