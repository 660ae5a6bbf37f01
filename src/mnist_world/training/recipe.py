"""The recipe (the original training code's settings) read from `recipe.yaml`: its values replace
params.yaml's, section by section, for the GPU script and the throughput benchmark;
`python -m mnist_world.training.recipe` prints the same as the `-S` options of `dvc exp run` (the README's).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mnist_world.config import (
    SECTIONS,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    TrainConfig,
    build,
    read_params,
)

RECIPE = Path("recipe.yaml")
PARAMS = Path("params.yaml")
VARIANTS = ("fast", "full")  # full: the fast recipe with its changes on top


def read_recipe(path: str | Path = RECIPE, full: bool = False) -> dict[str, dict[str, Any]]:
    """The recipe's values by params section: `fast`, with `full`'s on top when `full`."""
    recipe = read_params(path)  # the params file's checks: one-line errors, no duplicate keys
    unknown = sorted(set(recipe) - set(VARIANTS))
    if unknown or "fast" not in recipe:
        raise ConfigError(f"{path}: expected the variants {' and '.join(VARIANTS)}, got {', '.join(recipe)}")
    sections: dict[str, dict[str, Any]] = {}
    for variant in VARIANTS[: 2 if full else 1]:
        for name, values in (recipe.get(variant) or {}).items():
            if name not in SECTIONS or not isinstance(values, dict):
                raise ConfigError(f"{path}: {variant}.{name}: expected a params section's mapping")
            sections[name] = {**sections.get(name, {}), **values}
    return sections


def section(
    name: str, params: str | Path = PARAMS, recipe: str | Path = RECIPE, full: bool = False, **changes: Any
) -> Any:
    """params.yaml's section `name` with the recipe's values and then `changes` on top, checked as the
    stages check it."""
    values = {**read_params(params).get(name, {}), **read_recipe(recipe, full).get(name, {}), **changes}
    return build(SECTIONS[name], name, values)


def model_config(
    params: str | Path = PARAMS, full: bool = False, recipe: str | Path = RECIPE, **changes: Any
) -> ModelConfig:
    """The recipe's model (`full`: the 14.6M one), with `changes` on top."""
    return section("model", params, recipe, full, **changes)


def train_config(
    params: str | Path = PARAMS, full: bool = False, recipe: str | Path = RECIPE, **changes: Any
) -> TrainConfig:
    """The recipe's optimiser, objectives and epochs (`full`: its three objectives), with `changes` on top."""
    return section("train", params, recipe, full, **changes)


def data_config(
    params: str | Path = PARAMS, full: bool = False, recipe: str | Path = RECIPE, **changes: Any
) -> DataConfig:
    """The data params with the recipe's split."""
    return section("data", params, recipe, full, **changes)


def eval_config(
    params: str | Path = PARAMS, full: bool = False, recipe: str | Path = RECIPE, **changes: Any
) -> EvalConfig:
    """The evaluation params with the recipe's number of scored sequences."""
    return section("eval", params, recipe, full, **changes)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"objectives": {"future": 1.0}}} -> {"train.objectives.future": 1.0}, as `-S` names them."""
    found: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        found.update(flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return found


def overrides(params: str | Path = PARAMS, recipe: str | Path = RECIPE, full: bool = False) -> dict[str, Any]:
    """The recipe's values that differ from params.yaml's, by dotted name: what `dvc exp run -S` must set."""
    current = flatten(read_params(params))
    return {
        name: value
        for name, value in flatten(read_recipe(recipe, full)).items()
        if _plain(current.get(name)) != _plain(value)
    }


def set_options(values: dict[str, Any]) -> str:
    """`-S name=value` options for `dvc exp run`, values written as DVC reads them (lists without spaces)."""
    return " ".join(f"-S {name}={_text(value)}" for name, value in values.items())


def _plain(value: Any) -> Any:
    return [_plain(item) for item in value] if isinstance(value, (list, tuple)) else value


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_text(item) for item in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the recipe's `dvc exp run -S ...` options.")
    parser.add_argument("--full", action="store_true", help="the full recipe (the 14.6M model, 3 objectives)")
    parser.add_argument("--params", type=Path, default=PARAMS, help="params file the options change")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="recipe file")
    args = parser.parse_args()
    print(set_options(overrides(args.params, args.recipe, args.full)))


if __name__ == "__main__":
    main()
