"""The policy chain: the Policy protocol, the registry of policies by name, and the builder.

A policy is one object with one async method, `(exchange, call_next) -> Reply`,
the Tower Layer / aiohttp middleware shape applied to the proxied exchange, so a
policy sees the reply before anything reaches the client: it may call
`call_next` again (retry), not at all (rate limit, cache) or wrap the stream.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, is_dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from sidecar.exchange import Exchange, Reply
from sidecar.stores import Store, open_store

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from sidecar.config import Settings
    from sidecar.observability import Metrics

Next = Callable[[Exchange], Awaitable[Reply]]

ENTRY_POINT_GROUP = "ollama_sidecar.policies"


@runtime_checkable
class Policy(Protocol):
    """One step of the chain.

    Optional extras the app uses when a policy has them: `async start()` and
    `async close()` (lifecycle), `readiness() -> dict` (shown under the policy's
    name in /readyz detail), `async usage_detail(tenant) -> dict` (added to
    GET /sidecar/usage), `async purge(model | None) -> int | dict` (called by
    DELETE /sidecar/cache).

    `__call__` is usually `async def`; a policy with nothing to do after the
    reply may be a plain function returning `call_next(exchange)` itself, which
    saves a coroutine frame per request.
    """

    def __call__(self, exchange: Exchange, call_next: Next) -> Awaitable[Reply]: ...


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a policy may use when it is built: settings, metrics, clock, the shared store.

    `clock` and `sleep` are injectable so that policies whose behaviour depends
    on time (backoff, breaker windows) are tested on a fake clock, not real sleeps.
    """

    settings: Settings
    metrics: Metrics
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    # Shared state (sidecar/stores.py): memory per pod, or Redis across replicas.
    store: Store = field(default_factory=lambda: open_store(None))


class PolicyFactory(Protocol):
    """A policy class: its options model and a constructor taking (options, context)."""

    config_model: ClassVar[type[Any]]

    def __call__(self, config: Any, context: PolicyContext) -> Policy: ...


_BUILTINS: dict[str, PolicyFactory] = {}
_FactoryT = TypeVar("_FactoryT")


def register(name: str) -> Callable[[_FactoryT], _FactoryT]:
    """Class decorator that makes a built-in policy available under `name` in the YAML."""

    def decorate(factory: _FactoryT) -> _FactoryT:
        _BUILTINS[name] = factory  # type: ignore[assignment]
        return factory

    return decorate


class UnknownPolicy(LookupError):
    """No policy by that name: not built in, not an entry point, not an importable `module:Class`."""


def builtin_policy_names() -> list[str]:
    """Names of the policies shipped in the `policies` package (this imports them all)."""
    for name in _builtin_modules():
        _load_builtin(name)
    return sorted(_BUILTINS)


def find_policy(name: str) -> PolicyFactory:
    """Resolve a YAML policy name: built-in, then entry point, then `module:Class`.

    A built-in policy's module is imported only when a config names it.
    """
    if name not in _BUILTINS:
        _load_builtin(name)
    if name in _BUILTINS:
        return _BUILTINS[name]
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            return _checked(name, entry.load())
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
            return _checked(name, getattr(module, attribute))
        except (ImportError, AttributeError) as exc:
            raise UnknownPolicy(f"cannot load policy {name!r}: {exc}") from None
    known = ", ".join(builtin_policy_names())
    raise UnknownPolicy(f"unknown policy {name!r}; built-in policies are: {known}")


def _checked(name: str, candidate: object) -> PolicyFactory:
    model = getattr(candidate, "config_model", None)
    if not callable(candidate) or not (is_dataclass(model) or _is_pydantic_model(model)):
        raise UnknownPolicy(
            f"{name!r} is not a policy: it needs a `config_model` (a dataclass or pydantic model) "
            "and a constructor taking (config, context)"
        )
    return candidate  # type: ignore[return-value]


def entry_points(group: str) -> tuple[EntryPoint, ...]:
    """The installed plug-ins of `group`; importlib.metadata (with email, zipfile, csv...)
    is imported only when a config names a policy that is not built in."""
    from importlib.metadata import entry_points as installed

    return tuple(installed(group=group))


def _is_pydantic_model(model: object) -> bool:
    """A plug-in's pydantic model; asked without importing pydantic when nothing did yet."""
    pydantic = sys.modules.get("pydantic")
    return (
        pydantic is not None and isinstance(model, type) and issubclass(model, pydantic.BaseModel)
    )


def _builtin_modules() -> dict[str, str]:
    """Built-in policy name -> its module, from the `policies` package (which imports none)."""
    modules: dict[str, str] = importlib.import_module("policies").BUILTIN_MODULES
    return modules


def _load_builtin(name: str) -> None:
    # Importing a built-in policy's module registers it. That may now happen on a
    # reload, so a module that cannot be imported is a config problem there, not
    # an exception that would end the config watcher.
    module = _builtin_modules().get(name)
    if module is not None:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UnknownPolicy(f"cannot load policy {name!r}: {exc}") from None


def build_chain(policies: Sequence[Policy], terminal: Next) -> Next:
    """Compose the policies around `terminal`, the first one outermost.

    Each link is a `partial` rather than a wrapping coroutine, so a layer costs
    no coroutine frame of its own: calling it starts the policy's coroutine.
    """
    handler = terminal
    for policy in reversed(policies):
        handler = partial(policy, call_next=handler)
    return handler
