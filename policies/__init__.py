"""Built-in policies, one module each; a module registers its policy when it is imported.

The package itself imports none of them: `sidecar.chain` imports a policy's module
when a config first names it (`BUILTIN_MODULES`), so a chain of four policies
does not pay the memory of thirteen. Each module is also reachable as an
attribute (`policies.cache`), imported on first use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# Policy name in the YAML -> the module whose `@register(name)` defines it.
BUILTIN_MODULES: dict[str, str] = {
    "audit": "policies.audit",
    "auth": "policies.auth",
    "budget": "policies.budget",
    "cache": "policies.cache",
    "circuit_breaker": "policies.circuit_breaker",
    "concurrency": "policies.concurrency",
    "correlation": "policies.correlation",
    "embed_batching": "policies.embed_batching",
    "metering": "policies.metering",
    "ratelimit": "policies.ratelimit",
    "retry": "policies.retry",
    "routing": "policies.routing",
    "tracing": "policies.tracing",
}

# The modules, by attribute name: `policies.cache` imports policies/cache.py on first use.
__all__ = [module.rpartition(".")[2] for module in BUILTIN_MODULES.values()]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
