"""Built-in policies, one module each; importing this package registers them all by name."""

from policies import (
    audit,
    auth,
    budget,
    cache,
    circuit_breaker,
    concurrency,
    correlation,
    embed_batching,
    metering,
    ratelimit,
    retry,
    routing,
    tracing,
)

__all__ = [
    "audit",
    "auth",
    "budget",
    "cache",
    "circuit_breaker",
    "concurrency",
    "correlation",
    "embed_batching",
    "metering",
    "ratelimit",
    "retry",
    "routing",
    "tracing",
]
