"""Reading `params.yaml`: YAML's safe loader with duplicate keys refused, and every problem of the file
(missing, not YAML, not text, not a mapping) as one line with its place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mnist_world.config.checks import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error, not a silent override."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(path: Path, error: yaml.YAMLError) -> str:
    """A YAML error as one line: where (line, column) and what, without PyYAML's multi-line excerpt."""
    mark = getattr(error, "problem_mark", None)
    where = f"{path}: line {mark.line + 1}, column {mark.column + 1}" if mark else str(path)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if "'\\t'" in problem:
        problem += " (indent with spaces: YAML forbids tabs)"
    return f"{where}: not valid YAML: {problem}; fix the file"


def read_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read the raw params file, with a one-line error when it is missing, not YAML or not a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        raise ConfigError(_yaml_problem(path, error)) from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text file (byte {error.start} is not UTF-8)") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the params file ({error.strerror})") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    return params
