"""The config's JSON Schema (editor completion for the YAML) and the policy reference.

Both are generated from the config models (dataclasses that pydantic validates,
sidecar/knobs.py), so what the docs and the editor say is what `check-config`
enforces; a test keeps docs/policies.md in step.
"""

from __future__ import annotations

import dataclasses
import inspect
from types import UnionType
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

from sidecar.chain import builtin_policy_names, find_policy
from sidecar.config import Settings
from sidecar.knobs import adapter
from sidecar.units import parse_duration, parse_size


class Option(NamedTuple):
    """One field of a config model, as a reader sees it."""

    name: str
    annotation: Any  # without its own Annotated metadata
    metadata: tuple[Any, ...]
    description: str | None
    required: bool
    default: Any  # the value, a default_factory called; None when required


def options_of(model: type[Any]) -> list[Option]:
    """The fields of a config dataclass (built-in policies and the settings)."""
    # Evaluating the string annotations turns knobs.Field into pydantic's FieldInfo.
    hints = get_type_hints(model, include_extras=True)
    options = []
    for item in dataclasses.fields(model):
        annotation: Any = hints[item.name]
        metadata: tuple[Any, ...] = ()
        if get_origin(annotation) is Annotated:
            annotation, *extra = get_args(annotation)
            metadata = tuple(extra)
        description = next(
            (m.description for m in metadata if getattr(m, "description", None)), None
        )
        required = False
        default: Any = None
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            required = True
        options.append(Option(item.name, annotation, metadata, description, required, default))
    return options


def json_schema() -> dict[str, Any]:
    """JSON Schema of the whole YAML, the policy list included."""
    schema: dict[str, Any] = adapter(Settings).json_schema(mode="validation")
    definitions = schema.setdefault("$defs", {})
    choices = []
    for name in builtin_policy_names():
        model = find_policy(name).config_model
        policy_schema = adapter(model).json_schema(
            mode="validation", ref_template="#/$defs/{model}"
        )
        definitions.update(policy_schema.pop("$defs", {}))
        choices.append(
            {
                "type": "object",
                "properties": {name: {"anyOf": [policy_schema, {"type": "null"}]}},
                "required": [name],
                "additionalProperties": False,
            }
        )
    schema["properties"]["policies"] = {
        "type": "array",
        "description": "The chain, outermost first: each item is `- name: {options}`.",
        "items": {"oneOf": choices},
    }
    schema["title"] = "ollama-sidecar config"
    return schema


def policy_reference() -> str:
    """Markdown: every built-in policy, what it is for, and every option."""
    lines = [
        "# Policy reference",
        "",
        "Generated from the config models by `ollama-sidecar schema --markdown`; "
        "do not edit by hand. Durations take `250ms`, `2s`, `5m`; sizes take `512KiB`, `32MiB`.",
        "",
    ]
    for name in builtin_policy_names():
        factory = find_policy(name)
        module = inspect.getmodule(factory)
        summary = inspect.cleandoc(module.__doc__ or "") if module else ""
        lines += [
            f"## `{name}`",
            "",
            summary,
            "",
            "| option | type | default | meaning |",
            "|---|---|---|---|",
        ]
        lines += _option_rows(factory.config_model)
        lines.append("")
    return "\n".join(lines)


def _option_rows(model: type[Any], prefix: str = "") -> list[str]:
    rows = []
    for option in options_of(model):
        rows.append(
            f"| `{prefix}{option.name}` | {_type_name(option)} | {_default(option)} "
            f"| {option.description or ''} |"
        )
    return rows


def _type_name(option: Option) -> str:
    text = _describe(option.annotation, list(option.metadata))
    return f"`{text}`".replace("|", "\\|")


def _describe(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A reader's name for a type: `duration`, `size`, `int | None`, `list[str]`..."""
    for item in metadata or ():
        # knobs.ParsedUnit keeps its parser as `parse`; pydantic's validators as `func`.
        func = getattr(item, "parse", None) or getattr(item, "func", None)
        if func is parse_duration:
            return "duration"
        if func is parse_size:
            return "size"
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *extra = get_args(annotation)
        return _describe(base, extra)
    if origin in (Union, UnionType):
        return " | ".join(_describe(arg) for arg in get_args(annotation))
    if origin is Literal:
        return " | ".join(repr(arg) for arg in get_args(annotation))
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_describe(arg) for arg in get_args(annotation))}]"
    if annotation is type(None):
        return "None"
    if annotation is Ellipsis:
        return "..."
    return getattr(annotation, "__name__", str(annotation))


def _default(option: Option) -> str:
    value = option.default
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return f"`{value!r}`".replace("|", "\\|")
