"""Settings: YAML and environment into typed, validated, frozen models.

Every knob has a default, a type, bounds and one line of help; every problem is
reported with its YAML path at once, so `check-config` lists all of them rather
than the first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    field_validator,
)

from sidecar.chain import PolicyFactory, UnknownPolicy, find_policy
from sidecar.knobs import validate
from sidecar.routes import MANAGEMENT_NAMES, ROUTE_NAMES
from sidecar.units import parse_duration, parse_size

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "number", "minimum": 0},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h)?\s*$"},
            ],
            "description": "seconds, or 250ms / 2s / 5m / 1h",
        }
    ),
]
ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {
                    "type": "string",
                    "pattern": r"(?i)^\s*\d+(\.\d+)?\s*(b|kb|kib|mb|mib|gb|gib)?\s*$",
                },
            ],
            "description": "bytes, or 512KiB / 32MiB / 1GB",
        }
    ),
]


def _upstream_url(value: str) -> str:
    """An http(s) base URL with a host and nothing after the path, without a trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"an http:// or https:// URL with a host, not {value!r}")
    if parts.query or parts.fragment:
        raise ValueError("the upstream URL takes no query or fragment")
    return value.rstrip("/")


UpstreamUrl = Annotated[str, AfterValidator(_upstream_url)]
ManagementName = Literal["pull", "push", "create", "copy", "delete", "blobs"]
assert set(MANAGEMENT_NAMES) == set(get_args(ManagementName)), "one list, two views"


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in the YAML must not silently do nothing."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenSettings(StrictModel):
    host: str = Field(
        "127.0.0.1", description="Address to listen on; 127.0.0.1 keeps it pod-local."
    )
    port: int = Field(
        11435,
        ge=0,
        le=65535,
        description="TCP port the app's base_url points at; 0 picks a free one.",
    )


class TimeoutSettings(StrictModel):
    connect: Duration = Field(2.0, gt=0, le=300, description="Time to open a TCP connection.")
    first_byte: Duration = Field(
        300.0, gt=0, le=86400, description="Time to the response headers; allows cold model loads."
    )
    idle: Duration = Field(60.0, gt=0, le=86400, description="Longest pause between stream chunks.")
    total: Duration = Field(900.0, gt=0, le=86400, description="Longest a whole request may take.")


class TimeoutOverrides(StrictModel):
    """Per-route changes to the upstream timeouts; what is left out keeps the default."""

    connect: Duration | None = Field(
        None, gt=0, le=300, description="Time to open a TCP connection."
    )
    first_byte: Duration | None = Field(
        None, gt=0, le=86400, description="Time to the response headers."
    )
    idle: Duration | None = Field(
        None, gt=0, le=86400, description="Longest pause between stream chunks."
    )
    total: Duration | None = Field(
        None, gt=0, le=86400, description="Longest a whole request may take."
    )


class UpstreamSettings(StrictModel):
    url: UpstreamUrl = Field(
        "http://127.0.0.1:11434", description="Base URL of Ollama (or a compatible server)."
    )
    timeouts: TimeoutSettings = Field(
        default_factory=TimeoutSettings, description="Upstream timeouts."
    )
    route_timeouts: dict[str, TimeoutOverrides] = Field(
        default_factory=dict,
        description="Timeouts for single routes, e.g. {/api/embed: {first_byte: 30s}}.",
    )
    max_connections: int = Field(
        100, ge=1, le=10000, description="Size of the keep-alive connection pool to the upstream."
    )
    keepalive: Duration = Field(
        30.0, ge=0, le=3600, description="How long an idle pooled connection is kept open."
    )
    forward_authorization: bool = Field(
        False, description="Send the client's Authorization header upstream (off: it stays here)."
    )

    @field_validator("route_timeouts")
    @classmethod
    def _known_routes(cls, value: dict[str, TimeoutOverrides]) -> dict[str, TimeoutOverrides]:
        unknown = sorted(set(value) - set(ROUTE_NAMES))
        if unknown:
            raise ValueError(
                f"unknown route(s) {', '.join(unknown)}; routes are: {', '.join(ROUTE_NAMES)}"
            )
        return value

    def timeouts_for(self, route: str) -> TimeoutSettings:
        """The timeouts of one route: its overrides on top of `timeouts`."""
        overrides = self.route_timeouts.get(route)
        if overrides is None:
            return self.timeouts
        changed = overrides.model_dump(exclude_none=True)
        return self.timeouts.model_copy(update=changed)


class LimitSettings(StrictModel):
    max_body: ByteSize = Field(
        32 * 1024**2, ge=1024, le=1024**3, description="Largest request body accepted (413 above)."
    )
    body_timeout: Duration = Field(
        30.0, gt=0, le=3600, description="Time to receive a whole request body (408 after)."
    )
    max_header_size: ByteSize = Field(
        8190, ge=1024, le=1024**2, description="Longest request line or single header accepted."
    )


class ManagementSettings(StrictModel):
    allow: tuple[ManagementName, ...] = Field(
        (),
        description="Ollama management routes clients may reach: pull, push, create, copy, delete, blobs.",
    )


class ShutdownSettings(StrictModel):
    grace: Duration = Field(
        25.0, ge=0, le=3600, description="On SIGTERM, how long open requests may take to finish."
    )


class ReadinessSettings(StrictModel):
    cache_for: Duration = Field(
        1.0, ge=0, le=60, description="How long one upstream check answers /readyz."
    )
    timeout: Duration = Field(2.0, gt=0, le=60, description="Time the upstream check may take.")


class StoreSettings(StrictModel):
    redis_url: str | None = Field(
        None,
        description="null: state in memory, per pod; redis://host:6379/0: shared by every replica.",
    )
    prefix: str = Field(
        "ollama-sidecar:", min_length=1, max_length=128, description="Prefix of every Redis key."
    )
    timeout: Duration = Field(
        1.0,
        gt=0,
        le=60,
        description="Longest one store operation may take before it counts as down.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"a redis://, rediss:// or unix:// URL, not {value!r}")
        return value


class ReloadSettings(StrictModel):
    watch: bool = Field(
        True, description="Reload when the config file changes (SIGHUP always reloads)."
    )
    interval: Duration = Field(
        2.0, ge=0.05, le=300, description="How often the config file is checked for a change."
    )


class LoggingSettings(StrictModel):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Lowest level written; the access line is info."
    )
    access_log: bool = Field(True, description="One JSON line per proxied request.")


class ConfiguredPolicy:
    """One entry of the `policies` list: its name, its validated options and its factory.

    A plain class on purpose: pydantic treats it as an opaque value, not a schema.
    """

    __slots__ = ("factory", "name", "options")

    def __init__(self, name: str, options: Any, factory: PolicyFactory) -> None:
        self.name = name
        self.options = options
        self.factory = factory

    def __repr__(self) -> str:
        return f"ConfiguredPolicy({self.name!r}, {self.options!r})"


DEFAULT_POLICIES: tuple[Mapping[str, Any], ...] = ({"correlation": {}},)


class Settings(StrictModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    listen: ListenSettings = Field(
        default_factory=ListenSettings, description="Where clients connect."
    )
    upstream: UpstreamSettings = Field(
        default_factory=UpstreamSettings, description="The Ollama to relay to."
    )
    limits: LimitSettings = Field(default_factory=LimitSettings, description="Request size limits.")
    management: ManagementSettings = Field(
        default_factory=ManagementSettings, description="Access to Ollama's management API."
    )
    shutdown: ShutdownSettings = Field(
        default_factory=ShutdownSettings, description="Draining on SIGTERM."
    )
    readiness: ReadinessSettings = Field(
        default_factory=ReadinessSettings, description="How /readyz checks the upstream."
    )
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Log output.")
    stores: StoreSettings = Field(
        default_factory=StoreSettings,
        description="Where shared state (limits, usage, budgets) lives.",
    )
    reload: ReloadSettings = Field(
        default_factory=ReloadSettings, description="Applying a changed config without a restart."
    )
    policies: Annotated[tuple[ConfiguredPolicy, ...], WithJsonSchema({"type": "array"})] = Field(
        (), description="The chain, outermost first."
    )

    def summary(self) -> str:
        """One line that says what this config does."""
        names = ", ".join(policy.name for policy in self.policies) or "none (pass-through)"
        return (
            f"listen {self.listen.host}:{self.listen.port}, upstream {self.upstream.url}, "
            f"{len(self.policies)} {'policy' if len(self.policies) == 1 else 'policies'}: {names}"
        )


class ConfigError(Exception):
    """Every problem of a config, each as (YAML path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))
        self.problems = problems

    def lines(self) -> list[str]:
        return [f"{path}: {message}" if path else message for path, message in self.problems]


ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "SIDECAR_UPSTREAM": ("upstream", "url"),
    "SIDECAR_HOST": ("listen", "host"),
    "SIDECAR_PORT": ("listen", "port"),
    "SIDECAR_LOG_LEVEL": ("logging", "level"),
}


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> Settings:
    """Settings from a YAML file (or none), then the environment, then explicit overrides.

    With no file and no `SIDECAR_CONFIG`, the embedded defaults apply: correlation
    alone, Ollama on 127.0.0.1:11434, listening on 127.0.0.1:11435.
    """
    env = os.environ if environ is None else environ
    path = path or env.get("SIDECAR_CONFIG") or None
    raw = read_yaml(Path(path)) if path else {}
    for variable, key_path in ENV_OVERRIDES.items():
        if env.get(variable):
            _set_path(raw, key_path, env[variable])
    for key_path, value in (overrides or {}).items():
        if value is not None:
            _set_path(raw, key_path, value)
    return parse_settings(raw)


def read_yaml(path: Path) -> dict[str, Any]:
    """The YAML mapping in `path`; an empty file is an empty mapping."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([("", f"cannot read {path}: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([("", f"{path} is not UTF-8 text")]) from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f"line {mark.line + 1}, column {mark.column + 1}: "
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([("", f"{path}: {where}invalid YAML: {problem}")]) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError([("", f"{path}: the top level must be a mapping of settings")])
    return document


def parse_settings(raw: Mapping[str, Any]) -> Settings:
    """Validate a settings mapping, collecting every problem before raising."""
    data = dict(raw)
    raw_policies = data.pop("policies", list(DEFAULT_POLICIES))
    problems: list[tuple[str, str]] = []
    settings: Settings | None = None
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, prefix=""))
    policies = _parse_policies(raw_policies, problems)
    if problems or settings is None:
        raise ConfigError(problems)
    return settings.model_copy(update={"policies": policies})


def _parse_policies(raw: Any, problems: list[tuple[str, str]]) -> tuple[ConfiguredPolicy, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        problems.append(("policies", "a list of one-key mappings such as `- correlation: {}`"))
        return ()
    parsed: list[ConfiguredPolicy] = []
    for index, item in enumerate(raw):
        where = f"policies[{index}]"
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            problems.append((where, "each policy is a one-key mapping: `- name: {options}`"))
            continue
        ((name, options),) = item.items()
        if not isinstance(name, str):
            problems.append((where, "a policy name must be a string"))
            continue
        try:
            factory = find_policy(name)
        except UnknownPolicy as exc:
            problems.append((where, str(exc)))
            continue
        if options is None:
            options = {}
        try:
            model = validate(factory.config_model, options)
        except ValidationError as exc:
            problems.extend(_pydantic_problems(exc, prefix=f"{where}.{name}"))
            continue
        parsed.append(ConfiguredPolicy(name, model, factory))
    return tuple(parsed)


def _pydantic_problems(error: ValidationError, prefix: str) -> list[tuple[str, str]]:
    problems = []
    for detail in error.errors(include_url=False):
        path = prefix
        for part in detail["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        message = detail["msg"]
        if detail["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            message = "unknown setting"
        elif detail["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        problems.append((path, message))
    return problems


def _set_path(raw: dict[str, Any], key_path: tuple[str, ...], value: Any) -> None:
    node = raw
    for key in key_path[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[key_path[-1]] = value
