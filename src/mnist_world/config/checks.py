"""How a params section is checked: strict field types that take what YAML gives without surprising
conversions, and pydantic's errors turned into one line that names the key (`train.lr: expected a number`).
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import BeforeValidator, ConfigDict, Field, Strict
from pydantic_core import PydanticCustomError

C = TypeVar("C")


class ConfigError(ValueError):
    """A params section that is missing, has an unknown key, or a value of the wrong type or range."""


# --- Field types: what YAML gives, checked without surprising conversions -----------------------------------


def _yaml_number(value: Any) -> Any:
    # YAML 1.1 reads `3e-4` (no dot) as a string: a number to a user, so numeric strings become floats.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # rejected below, with the original value in the message
    return value


def _pair(value: Any) -> Any:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise PydanticCustomError("pair", "expected a list of 2 numbers")
    return value


Integer = Annotated[int, Strict()]  # no bools, no 2.5, no "2"
Boolean = Annotated[bool, Strict()]  # no "yes", no 1
Text = Annotated[str, Strict()]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False), BeforeValidator(_yaml_number)]  # ints too
Pair = Annotated[tuple[Number, Number], BeforeValidator(_pair)]

_MESSAGES = {  # pydantic error type -> the words of our one-line message
    "int_type": "expected an integer",
    "bool_type": "expected true or false",
    "float_type": "expected a number",
    "float_parsing": "expected a number",
    "finite_number": "expected a finite number",
    "string_type": "expected a string",
    "dict_type": "expected a mapping",
}


def _describe(cls: type, section: str, error: pydantic.ValidationError) -> str:
    """The first problem of a validation error as one line naming the key: `train.lr: expected ...`."""
    fields = {field.name: field for field in dataclasses.fields(cls)}
    # Unknown keys first: a misspelt key explains the other complaints.
    problems = sorted(error.errors(), key=lambda item: item["type"] != "unexpected_keyword_argument")
    problem = problems[0]
    where = ".".join([section, *map(str, problem["loc"])])
    kind, value = problem["type"], problem.get("input")
    if kind == "value_error" and isinstance(problem.get("ctx", {}).get("error"), ConfigError):
        return str(problem["ctx"]["error"])  # a range rule: its message already names the key
    if kind == "unexpected_keyword_argument":
        return f"{where}: unknown key (known keys: {', '.join(sorted(fields))})"
    if kind in ("missing", "missing_argument"):
        return f"{where}: missing"
    if kind == "literal_error":
        allowed = typing.get_args(typing.get_type_hints(cls)[problem["loc"][0]])
        return f"{where}: expected one of {', '.join(map(repr, allowed))}, got {value!r}"
    words = _MESSAGES.get(kind, problem["msg"][:1].lower() + problem["msg"][1:])
    return f"{where}: {words}, got {value!r}"


def section(name: str) -> typing.Callable[[type[C]], type[C]]:
    """Make `cls` a frozen pydantic dataclass for params section `name` that rejects unknown keys, and whose
    construction (from params or from code, `dataclasses.replace` included) fails with a ConfigError."""

    def decorate(cls: type[C]) -> type[C]:
        cls.SECTION = name  # type: ignore[attr-defined]
        validated = pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)
        init = validated.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except pydantic.ValidationError as error:
                raise ConfigError(_describe(validated, name, error)) from None

        validated.__init__ = __init__  # type: ignore[method-assign]
        return validated

    return decorate


def build(cls: type[C], section: str, values: dict[str, Any] | None) -> C:
    """Build the config class `cls` from a params mapping, rejecting unknown keys, wrong types and ranges."""
    if not isinstance(values, dict):
        raise ConfigError(f"params section '{section}' must be a mapping, got {values!r}")
    known = {field.name for field in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted((str(key) for key in values if key not in known), key=str)
    if unknown:  # also catches keys that are not strings, which no keyword argument can carry
        raise ConfigError(f"{section}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(known))})")
    try:
        return pydantic.TypeAdapter(cls).validate_python(values)
    except pydantic.ValidationError as error:
        raise ConfigError(_describe(cls, section, error)) from None


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)
