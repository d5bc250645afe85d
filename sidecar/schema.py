"""The config's JSON Schema (editor completion for the YAML) and the policy reference.

Both are generated from the pydantic models, so what the docs and the editor
say is what `check-config` enforces; a test keeps docs/policies.md in step.
"""

from __future__ import annotations

import inspect
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sidecar.chain import builtin_policy_names, find_policy
from sidecar.config import Settings
from sidecar.units import parse_duration, parse_size


def json_schema() -> dict[str, Any]:
    """JSON Schema of the whole YAML, the policy list included."""
    schema = Settings.model_json_schema(mode="validation")
    definitions = schema.setdefault("$defs", {})
    choices = []
    for name in builtin_policy_names():
        model = find_policy(name).config_model
        policy_schema = model.model_json_schema(mode="validation", ref_template="#/$defs/{model}")
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


def _option_rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    rows = []
    for field_name, info in model.model_fields.items():
        rows.append(
            f"| `{prefix}{field_name}` | {_type_name(info)} | {_default(info)} | {info.description or ''} |"
        )
    return rows


def _type_name(info: FieldInfo) -> str:
    # pydantic moves a field's own Annotated metadata into FieldInfo.metadata.
    text = _describe(info.annotation, list(info.metadata))
    return f"`{text}`".replace("|", "\\|")


def _describe(annotation: Any, metadata: list[Any] | None = None) -> str:
    """A reader's name for a type: `duration`, `size`, `int | None`, `list[str]`..."""
    for item in metadata or ():
        func = getattr(item, "func", None)
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


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value: Any = info.default_factory()  # type: ignore[call-arg]
    else:
        value = info.default
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return f"`{value!r}`".replace("|", "\\|")
