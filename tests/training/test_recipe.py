"""recipe.yaml is the one home of the recipe's numbers: the configs the GPU script and the benchmark train
come from it, and the README's `dvc exp run` line sets exactly it on top of params.yaml."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ruamel.yaml import YAML

from mnist_world.config import ConfigError, read_params
from mnist_world.training import recipe

ROOT = Path(__file__).resolve().parents[2]
PARAMS, RECIPE = ROOT / "params.yaml", ROOT / "recipe.yaml"


def command_lines(text: str, start: str) -> list[str]:
    """Every shell command in `text` that begins with `start`, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith(start)]


def set_values(command: str) -> dict[str, Any]:
    """The `-S name=value` options of a `dvc exp run` command, values read as YAML 1.2 (3e-4 is a number)."""
    words, values = shlex.split(command), {}
    for flag, option in zip(words[:-1], words[1:], strict=True):
        if flag == "-S":
            name, _, text = option.partition("=")
            values[name] = YAML(typ="safe").load(text)
    return values


def applied(params: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    return {**recipe.flatten(params), **values}


def test_the_readme_experiment_sets_the_recipe() -> None:
    (line,) = command_lines((ROOT / "README.md").read_text(), "dvc exp run -n recipe")
    values = set_values(line)
    wanted = recipe.flatten(recipe.read_recipe(RECIPE))
    assert set(values) <= set(wanted), (
        f"the README sets what the recipe does not: {set(values) - set(wanted)}"
    )
    after = applied(read_params(PARAMS), values)
    differ = {name: (after.get(name), value) for name, value in wanted.items() if after.get(name) != value}
    assert not differ, f"README's line leaves these off the recipe (now, wanted): {differ}"


@pytest.mark.parametrize("full", [False, True])
def test_the_printed_options_give_the_recipe(full: bool) -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "mnist_world.training.recipe", *(["--full"] if full else [])],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    values = set_values(f"dvc exp run {printed}")
    after = applied(read_params(PARAMS), values)
    for name, value in recipe.flatten(recipe.read_recipe(RECIPE, full)).items():
        assert after[name] == value, name
    assert set(values) <= set(recipe.flatten(recipe.read_recipe(RECIPE, full)))


def test_configs_are_the_recipe_whatever_the_params() -> None:
    fast, full = recipe.model_config(PARAMS, recipe=RECIPE), recipe.model_config(PARAMS, True, RECIPE)
    assert (fast.embed_dim, fast.layers, fast.patch_size) == (128, 2, 1)
    assert (full.embed_dim, full.layers, full.heads) == (384, 6, fast.heads)
    train = recipe.train_config(PARAMS, recipe=RECIPE, batch_size=8)
    assert (train.lr, train.betas, train.warmup_steps, train.epochs, train.batch_size) == (
        3e-4, (0.9, 0.999), 0, 50, 8
    )  # fmt: skip
    assert train.objectives == {"future": 1.0, "joint": 0.0, "individual": 0.0}
    assert recipe.train_config(PARAMS, True, RECIPE).objectives == {
        "future": 0.5,
        "joint": 0.4,
        "individual": 0.1,
    }
    data = recipe.data_config(PARAMS, recipe=RECIPE)
    assert (data.train_sequences, data.val_sequences) == (2000, 500)
    assert recipe.section("tokens", PARAMS, RECIPE).frame_size == 32
    assert recipe.eval_config(PARAMS, recipe=RECIPE).sequences == 500


def test_a_wrong_recipe_fails_in_one_line_naming_the_key(tmp_path: Path) -> None:
    wrong = yaml.safe_load(RECIPE.read_text())
    wrong["fast"]["model"]["embed_dims"] = 64
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(wrong))
    with pytest.raises(ConfigError, match=r"^model\.embed_dims: unknown key"):
        recipe.model_config(PARAMS, recipe=path)
    path.write_text(yaml.safe_dump({"fast": {}, "slow": {}}))
    with pytest.raises(ConfigError, match="expected the variants fast and full"):
        recipe.read_recipe(path)
