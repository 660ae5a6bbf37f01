"""The params.yaml sections as frozen, validated config objects, one per pipeline concern: `load(section)`
reads one, `build` checks a mapping into one, `as_dict` turns one back into plain values."""

from mnist_world.config.checks import ConfigError, build
from mnist_world.config.params_file import read_params
from mnist_world.config.sections import (
    DIGIT_SIZE,
    OBJECTIVES,
    SECTIONS,
    ActionsConfig,
    DataConfig,
    EvalConfig,
    ModelConfig,
    SampleConfig,
    TokensConfig,
    TrainConfig,
    as_dict,
    load,
)

__all__ = [
    "DIGIT_SIZE",
    "OBJECTIVES",
    "SECTIONS",
    "ActionsConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "SampleConfig",
    "TokensConfig",
    "TrainConfig",
    "as_dict",
    "build",
    "load",
    "read_params",
]
