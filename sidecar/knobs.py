"""Building blocks of the config models that cost nothing until a config is validated.

Config models are plain frozen dataclasses. pydantic validates them (it reads
stdlib dataclasses and their `Annotated` field metadata), but only in the
process that validates a config: the running sidecar gets the validated objects
from a short-lived child (`sidecar/isolated_config.py`) and never imports
pydantic, which would keep about 10 MiB resident for the life of the pod
(issue 7 caps peak RSS at 50 MiB).

For that to hold, a module that defines a config model must not call pydantic
while it is imported:

* it starts with `from __future__ import annotations`, so field annotations
  stay strings until pydantic resolves them;
* it takes `Field`, `AfterValidator`, `BeforeValidator` and `WithJsonSchema`
  from here: inside an annotation they are real pydantic objects when pydantic
  evaluates it, and nothing at import time;
* defaults are plain values or `dataclasses.field(default_factory=...)`, never
  `Field(...)`;
* cross-field checks live in `__post_init__` and raise `ValueError`, which
  pydantic reports like any validator's;
* module-level type aliases use `Duration`, `ByteSize`, `Check` or
  `annotated_types` constraints (plain objects pydantic understands), never a
  call to pydantic.

`tests/test_startup_memory.py` keeps every built-in policy importable without pydantic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar, cast

from sidecar.units import parse_duration, parse_size

if TYPE_CHECKING:
    from pydantic import AfterValidator, BeforeValidator, Field, TypeAdapter, WithJsonSchema
    from pydantic_core import CoreSchema
else:

    def Field(*args: Any, **kwargs: Any) -> Any:
        """pydantic.Field, imported when an annotation that uses it is evaluated."""
        from pydantic import Field as make

        return make(*args, **kwargs)

    def AfterValidator(func: Callable[[Any], Any]) -> Any:
        """pydantic.AfterValidator, imported when an annotation that uses it is evaluated."""
        from pydantic import AfterValidator as make

        return make(func)

    def BeforeValidator(func: Callable[[Any], Any]) -> Any:
        """pydantic.BeforeValidator, imported when an annotation that uses it is evaluated."""
        from pydantic import BeforeValidator as make

        return make(func)

    def WithJsonSchema(schema: Mapping[str, Any]) -> Any:
        """pydantic.WithJsonSchema, imported when an annotation that uses it is evaluated."""
        from pydantic import WithJsonSchema as make

        return make(dict(schema))


__all__ = [
    "STRICT",
    "AfterValidator",
    "BeforeValidator",
    "ByteSize",
    "Check",
    "Duration",
    "Field",
    "ParsedUnit",
    "WithJsonSchema",
    "validate",
]

# `__pydantic_config__ = STRICT` in a config dataclass: an unknown key is an
# error, since a typo in the YAML must not silently do nothing.
STRICT: Final[dict[str, Any]] = {"extra": "forbid"}


class ParsedUnit:
    """`Annotated` metadata: parse a human unit (`2s`, `32MiB`) before the number is checked.

    A plain object with pydantic's two hooks, so that `Duration` and `ByteSize`
    can be module-level aliases without importing pydantic. Bounds given with
    `Field(gt=..., le=...)` apply to the parsed number.
    """

    __slots__ = ("json_schema", "parse")

    def __init__(self, parse: Callable[[object], float], json_schema: Mapping[str, Any]) -> None:
        self.parse = parse
        self.json_schema = dict(json_schema)

    def __get_pydantic_core_schema__(
        self, source: Any, handler: Callable[[Any], CoreSchema]
    ) -> CoreSchema:
        from pydantic_core import core_schema

        return core_schema.no_info_before_validator_function(self.parse, handler(source))

    def __get_pydantic_json_schema__(self, schema: Any, handler: Any) -> dict[str, Any]:
        return dict(self.json_schema)


class Check:
    """`Annotated` metadata: run `check` on the validated value (it raises ValueError or returns it).

    The same as pydantic's AfterValidator, but a plain object, for module-level
    aliases such as `UpstreamUrl` that must not import pydantic.
    """

    __slots__ = ("check",)

    def __init__(self, check: Callable[[Any], Any]) -> None:
        self.check = check

    def __get_pydantic_core_schema__(
        self, source: Any, handler: Callable[[Any], CoreSchema]
    ) -> CoreSchema:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.check, handler(source))


Duration = Annotated[
    float,
    ParsedUnit(
        parse_duration,
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"},
            ],
            "description": "seconds, or 250ms / 2s / 5m / 1h",
        },
    ),
]
ByteSize = Annotated[
    int,
    ParsedUnit(
        parse_size,
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {
                    "type": "string",
                    "pattern": r"(?i)^\s*\d+(\.\d+)?\s*(b|kb|kib|mb|mib|gb|gib)?\s*$",
                },
            ],
            "description": "bytes, or 512KiB / 32MiB / 1GB",
        },
    ),
]

_ModelT = TypeVar("_ModelT")


@cache
def _adapter(model: Any) -> TypeAdapter[Any]:
    from pydantic import TypeAdapter

    return TypeAdapter(model)


def adapter(model: type[_ModelT]) -> TypeAdapter[_ModelT]:
    """pydantic's validator for one config model, built once (this imports pydantic)."""
    built: TypeAdapter[_ModelT] = _adapter(cast(Any, model))
    return built


def validate(model: type[_ModelT], data: Any) -> _ModelT:
    """`data` (a mapping from YAML) as a validated `model`; raises pydantic's ValidationError."""
    validated: _ModelT = adapter(model).validate_python(data)
    return validated
