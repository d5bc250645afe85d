"""Settings: YAML and environment into typed, validated, frozen dataclasses.

Every knob has a default, a type, bounds and one line of help; every problem is
reported with its YAML path at once, so `check-config` lists all of them rather
than the first.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from sidecar.chain import PolicyFactory, UnknownPolicy, find_policy
from sidecar.knobs import (
    STRICT,
    AfterValidator,
    ByteSize,
    Check,
    Duration,
    Field,
    WithJsonSchema,
    validate,
)
from sidecar.routes import MANAGEMENT_NAMES, known_routes


def _upstream_url(value: str) -> str:
    """An http(s) base URL with a host and nothing after the path, without a trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"an http:// or https:// URL with a host, not {value!r}")
    if parts.query or parts.fragment:
        raise ValueError("the upstream URL takes no query or fragment")
    return value.rstrip("/")


if TYPE_CHECKING:
    from pydantic import ValidationError

ManagementName = Literal["pull", "push", "create", "copy", "delete", "blobs"]
assert set(MANAGEMENT_NAMES) == set(get_args(ManagementName)), "one list, two views"


def _redis_url(value: str | None) -> str | None:
    if value is not None and urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"a redis://, rediss:// or unix:// URL, not {value!r}")
    return value


UpstreamUrl = Annotated[str, Check(_upstream_url)]

# Every settings class below is a frozen dataclass with `__pydantic_config__ =
# STRICT`: unknown keys are errors, since a typo in the YAML must not silently
# do nothing; sidecar/knobs.py says why they are not pydantic models.


@dataclass(frozen=True, kw_only=True)
class ListenSettings:
    __pydantic_config__ = STRICT

    host: Annotated[
        str, Field(description="Address to listen on; 127.0.0.1 keeps it pod-local.")
    ] = "127.0.0.1"
    port: Annotated[
        int,
        Field(
            ge=0, le=65535, description="TCP port the app's base_url points at; 0 picks a free one."
        ),
    ] = 11435


@dataclass(frozen=True, kw_only=True)
class TimeoutSettings:
    __pydantic_config__ = STRICT

    connect: Annotated[
        Duration, Field(gt=0, le=300, description="Time to open a TCP connection.")
    ] = 2.0
    first_byte: Annotated[
        Duration,
        Field(gt=0, le=86400, description="Time to the response headers; allows cold model loads."),
    ] = 300.0
    idle: Annotated[
        Duration, Field(gt=0, le=86400, description="Longest pause between stream chunks.")
    ] = 60.0
    total: Annotated[
        Duration, Field(gt=0, le=86400, description="Longest a whole request may take.")
    ] = 900.0


@dataclass(frozen=True, kw_only=True)
class TimeoutOverrides:
    """Per-route changes to the upstream timeouts; what is left out keeps the default."""

    __pydantic_config__ = STRICT

    connect: Annotated[
        Duration | None, Field(gt=0, le=300, description="Time to open a TCP connection.")
    ] = None
    first_byte: Annotated[
        Duration | None, Field(gt=0, le=86400, description="Time to the response headers.")
    ] = None
    idle: Annotated[
        Duration | None, Field(gt=0, le=86400, description="Longest pause between stream chunks.")
    ] = None
    total: Annotated[
        Duration | None, Field(gt=0, le=86400, description="Longest a whole request may take.")
    ] = None


@dataclass(frozen=True, kw_only=True)
class UpstreamSettings:
    __pydantic_config__ = STRICT

    url: Annotated[
        UpstreamUrl, Field(description="Base URL of Ollama (or a compatible server).")
    ] = "http://127.0.0.1:11434"
    timeouts: Annotated[TimeoutSettings, Field(description="Upstream timeouts.")] = field(
        default_factory=TimeoutSettings
    )
    route_timeouts: Annotated[
        dict[str, TimeoutOverrides],
        AfterValidator(known_routes),
        Field(description="Timeouts for single routes, e.g. {/api/embed: {first_byte: 30s}}."),
    ] = field(default_factory=dict)
    max_connections: Annotated[
        int,
        Field(
            ge=1, le=10000, description="Size of the keep-alive connection pool to the upstream."
        ),
    ] = 100
    keepalive: Annotated[
        Duration,
        Field(ge=0, le=3600, description="How long an idle pooled connection is kept open."),
    ] = 30.0
    forward_authorization: Annotated[
        bool,
        Field(description="Send the client's Authorization header upstream (off: it stays here)."),
    ] = False

    def timeouts_for(self, route: str) -> TimeoutSettings:
        """The timeouts of one route: its overrides on top of `timeouts`."""
        overrides = self.route_timeouts.get(route)
        if overrides is None:
            return self.timeouts
        changed = {name: value for name, value in vars(overrides).items() if value is not None}
        return replace(self.timeouts, **changed)


@dataclass(frozen=True, kw_only=True)
class LimitSettings:
    __pydantic_config__ = STRICT

    max_body: Annotated[
        ByteSize,
        Field(ge=1024, le=1024**3, description="Largest request body accepted (413 above)."),
    ] = 32 * 1024**2
    body_timeout: Annotated[
        Duration,
        Field(gt=0, le=3600, description="Time to receive a whole request body (408 after)."),
    ] = 30.0
    max_header_size: Annotated[
        ByteSize,
        Field(ge=1024, le=1024**2, description="Longest request line or single header accepted."),
    ] = 8190


@dataclass(frozen=True, kw_only=True)
class ManagementSettings:
    __pydantic_config__ = STRICT

    allow: Annotated[
        tuple[ManagementName, ...],
        Field(
            description="Ollama management routes clients may reach: pull, push, create, copy, delete, blobs."
        ),
    ] = ()


@dataclass(frozen=True, kw_only=True)
class ShutdownSettings:
    __pydantic_config__ = STRICT

    grace: Annotated[
        Duration,
        Field(ge=0, le=3600, description="On SIGTERM, how long open requests may take to finish."),
    ] = 25.0


@dataclass(frozen=True, kw_only=True)
class ReadinessSettings:
    __pydantic_config__ = STRICT

    cache_for: Annotated[
        Duration, Field(ge=0, le=60, description="How long one upstream check answers /readyz.")
    ] = 1.0
    timeout: Annotated[
        Duration, Field(gt=0, le=60, description="Time the upstream check may take.")
    ] = 2.0


@dataclass(frozen=True, kw_only=True)
class StoreSettings:
    __pydantic_config__ = STRICT

    redis_url: Annotated[
        str | None,
        AfterValidator(_redis_url),
        Field(
            description="null: state in memory, per pod; redis://host:6379/0: shared by every replica."
        ),
    ] = None
    prefix: Annotated[
        str, Field(min_length=1, max_length=128, description="Prefix of every Redis key.")
    ] = "ollama-sidecar:"
    timeout: Annotated[
        Duration,
        Field(
            gt=0,
            le=60,
            description="Longest one store operation may take before it counts as down.",
        ),
    ] = 1.0


@dataclass(frozen=True, kw_only=True)
class ReloadSettings:
    __pydantic_config__ = STRICT

    watch: Annotated[
        bool, Field(description="Reload when the config file changes (SIGHUP always reloads).")
    ] = True
    interval: Annotated[
        Duration,
        Field(ge=0.05, le=300, description="How often the config file is checked for a change."),
    ] = 2.0


@dataclass(frozen=True, kw_only=True)
class LoggingSettings:
    __pydantic_config__ = STRICT

    level: Annotated[
        Literal["debug", "info", "warning", "error"],
        Field(description="Lowest level written; the access line is info."),
    ] = "info"
    access_log: Annotated[bool, Field(description="One JSON line per proxied request.")] = True


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

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ConfiguredPolicy):
            return NotImplemented
        return (self.name, self.options, self.factory) == (other.name, other.options, other.factory)

    __hash__ = None  # type: ignore[assignment]


DEFAULT_POLICIES: tuple[Mapping[str, Any], ...] = ({"correlation": {}},)


@dataclass(frozen=True, kw_only=True)
class Settings:
    __pydantic_config__ = {**STRICT, "arbitrary_types_allowed": True}

    listen: Annotated[ListenSettings, Field(description="Where clients connect.")] = field(
        default_factory=ListenSettings
    )
    upstream: Annotated[UpstreamSettings, Field(description="The Ollama to relay to.")] = field(
        default_factory=UpstreamSettings
    )
    limits: Annotated[LimitSettings, Field(description="Request size limits.")] = field(
        default_factory=LimitSettings
    )
    management: Annotated[
        ManagementSettings, Field(description="Access to Ollama's management API.")
    ] = field(default_factory=ManagementSettings)
    shutdown: Annotated[ShutdownSettings, Field(description="Draining on SIGTERM.")] = field(
        default_factory=ShutdownSettings
    )
    readiness: Annotated[
        ReadinessSettings, Field(description="How /readyz checks the upstream.")
    ] = field(default_factory=ReadinessSettings)
    logging: Annotated[LoggingSettings, Field(description="Log output.")] = field(
        default_factory=LoggingSettings
    )
    stores: Annotated[
        StoreSettings, Field(description="Where shared state (limits, usage, budgets) lives.")
    ] = field(default_factory=StoreSettings)
    reload: Annotated[
        ReloadSettings, Field(description="Applying a changed config without a restart.")
    ] = field(default_factory=ReloadSettings)
    policies: Annotated[
        tuple[ConfiguredPolicy, ...],
        WithJsonSchema({"type": "array"}),
        Field(description="The chain, outermost first."),
    ] = ()

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
    import yaml  # here: the running sidecar gets its settings from a child (isolated_config)

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
    from pydantic import ValidationError

    try:
        settings = validate(Settings, data)
    except ValidationError as exc:
        problems.extend(_pydantic_problems(exc, prefix=""))
    policies = _parse_policies(raw_policies, problems)
    if problems or settings is None:
        raise ConfigError(problems)
    return replace(settings, policies=policies)


def _parse_policies(raw: Any, problems: list[tuple[str, str]]) -> tuple[ConfiguredPolicy, ...]:
    from pydantic import ValidationError

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
