"""Params are validated where they are loaded: unknown keys and wrong types name the key."""

from pathlib import Path

import pytest
import yaml

from mnist_world import config
from mnist_world.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_every_section_of_the_shipped_params_loads() -> None:
    for section in config.SECTIONS:
        assert config.load(section, ROOT / "params.yaml") is not None


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("model", {"layerz": 2}, "model.layerz: unknown key"),
        ("model", {"layers": "two"}, "model.layers: expected an integer"),
        ("model", {"layers": 2.5}, "model.layers: expected an integer"),
        ("model", {"embed_dim": 130, "heads": 4}, "model.embed_dim: 130 is not divisible"),
        ("train", {"compile": "yes"}, "train.compile: expected true or false"),
        ("train", {"mask_ratio": [0.5]}, "train.mask_ratio: expected a list of 2 numbers"),
        ("train", {"objectives": {"future": 0.5}}, "train.objectives: weights must sum to 1"),
        ("train", {"objectives": {"future": 0.5, "dream": 0.5}}, "train.objectives.dream: unknown objective"),
        ("train", {"device": "tpu"}, "train.device: expected one of"),
        ("data", {"source": "ftp"}, "data.source: expected one of"),
        ("tokens", {"levels": 1}, "tokens.levels: must be in"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, section: str, values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        config.load(section, write(tmp_path, {section: values}))


def test_numbers_written_as_yaml_strings_are_accepted(tmp_path: Path) -> None:
    # PyYAML reads 3e-4 (no dot) as a string; it is still a number to a user.
    train = config.load("train", write(tmp_path, {"train": {"lr": "3e-4", "min_lr": 0}}))
    assert train.lr == pytest.approx(3e-4) and train.min_lr == 0.0


def test_missing_file_and_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        config.load("data", tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="missing section 'eval'"):
        config.load("eval", write(tmp_path, {"data": {}}))


def test_configs_are_frozen() -> None:
    model = config.ModelConfig()
    with pytest.raises(AttributeError):
        model.layers = 3  # type: ignore[misc]
