"""Params are validated where they are loaded: unknown keys and wrong types name the key."""

from pathlib import Path

import pytest
import yaml
from conftest import from_params, params_section

from mnist_world import config
from mnist_world.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


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
        config.load(section, write(tmp_path, {section: {**params_section(section), **values}}))


def test_numbers_written_as_yaml_strings_are_accepted(tmp_path: Path) -> None:
    # PyYAML reads 3e-4 (no dot) as a string; it is still a number to a user.
    train = config.load("train", write(tmp_path, {"train": params_section("train", lr="3e-4", min_lr=0)}))
    assert train.lr == pytest.approx(3e-4) and train.min_lr == 0.0


def test_missing_file_and_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="params file not found"):
        config.load("data", tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="missing section 'eval'"):
        config.load("eval", write(tmp_path, {"data": {}}))


def test_configs_are_frozen() -> None:
    model = from_params(config.ModelConfig)
    with pytest.raises(AttributeError):
        model.layers = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n\tlr: 0.1\n",
            r"params\.yaml: line 2, column 1: not valid YAML: found character '\\t' .*tabs",
        ),
        ("train: [1, 2\n", r"params\.yaml: line 2, column 1: not valid YAML: expected ',' or '\]'"),
        (
            "train:\n  lr: 0.1\n  lr: 0.2\n",
            r"params\.yaml: line 3, column 3: not valid YAML: duplicate key 'lr'",
        ),
    ],
)
def test_malformed_yaml_is_one_line_with_its_place(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        config.load("train", tmp_path / "params.yaml")
    assert "\n" not in str(caught.value) and str(caught.value).endswith("; fix the file")


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("train", {"lr": "abc"}, "train.lr: expected a number, got 'abc'"),
        ("train", {"lr": float("nan")}, "train.lr: expected a finite number, got nan"),
        ("train", {"lr": "1e400"}, "train.lr: expected a finite number, got inf"),
        ("train", {"lr": True}, "train.lr: expected a number, got True"),
        ("train", {"epochs": True}, "train.epochs: expected an integer, got True"),
        ("train", {"epochs": "3"}, "train.epochs: expected an integer, got '3'"),
        (
            "train",
            {"betas": [0.9, 0.95, 0.99]},
            "train.betas: expected a list of 2 numbers, got [0.9, 0.95, 0.99]",
        ),
        ("train", {"objectives": [1.0]}, "train.objectives: expected a mapping, got [1.0]"),
        ("train", {"objectives": {"future": "x"}}, "train.objectives.future: expected a number, got 'x'"),
        ("data", {"url": 5}, "data.url: expected a string, got 5"),
        ("data", {"seed": None}, "data.seed: expected an integer, got None"),
        ("data", {1: 2}, "data.1: unknown key (known keys: canvas, digits, "),
        ("eval", {"sequences": 0}, "eval.sequences: must be at least 1"),
    ],
)
def test_every_message_is_one_line_naming_the_key(
    tmp_path: Path, section: str, values: dict, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        config.build(config.SECTIONS[section], section, {**params_section(section), **values})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert "Input should be" not in str(caught.value)  # pydantic's own wording never reaches the user


def test_values_are_converted_losslessly() -> None:
    train = from_params(config.TrainConfig, min_lr=0, betas=[0.9, 0.95], objectives={"future": 1})
    assert (
        isinstance(train.min_lr, float) and train.betas == (0.9, 0.95) and train.objectives == {"future": 1.0}
    )
    assert config.build(config.TrainConfig, "train", config.as_dict(train)) == train
    assert config.as_dict(train)["betas"] == [0.9, 0.95]


def test_configs_built_in_code_are_checked_too() -> None:
    import dataclasses

    with pytest.raises(ConfigError, match=r"^train\.lr: must be positive$"):
        dataclasses.replace(from_params(config.TrainConfig), lr=-1.0)
    with pytest.raises(ConfigError, match=r"^model\.layerz: unknown key"):
        config.ModelConfig(layerz=3)  # type: ignore[call-arg]
    assert dataclasses.replace(from_params(config.TrainConfig), lr=0.1).lr == 0.1
    assert [field.name for field in dataclasses.fields(config.ModelConfig)][:2] == ["layers", "embed_dim"]


def test_every_field_is_checked_strictly() -> None:
    """A plain `bool`/`int`/`float`/`str` annotation lets pydantic coerce ("yes" -> True, 2.0 -> 2): fields
    use the module's strict types (Boolean, Integer, Number, Text, Pair), a Literal or a dict of them."""
    import typing

    for section, cls in config.SECTIONS.items():
        for name, hint in typing.get_type_hints(cls, include_extras=True).items():
            origin = typing.get_origin(hint)
            assert origin in (typing.Annotated, typing.Literal, dict), (
                f"{section}.{name}: annotate with Boolean, Integer, Number, Text or Pair, not {hint}"
            )


def test_every_key_comes_from_the_params_file() -> None:
    """No field has a default: a section that lacks a key fails naming it, from params or from code."""
    values = params_section("model")
    del values["heads"]
    with pytest.raises(ConfigError, match=r"^model\.heads: missing$"):
        config.build(config.ModelConfig, "model", values)
    with pytest.raises(ConfigError, match=r"^sample\.steps: missing$"):
        config.SampleConfig()  # type: ignore[call-arg]
