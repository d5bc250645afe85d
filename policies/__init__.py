"""Built-in policies, one module each; importing this package registers them all by name."""

from policies import (
    audit,
    auth,
    circuit_breaker,
    concurrency,
    correlation,
    metering,
    retry,
    routing,
    tracing,
)

__all__ = [
    "audit",
    "auth",
    "circuit_breaker",
    "concurrency",
    "correlation",
    "metering",
    "retry",
    "routing",
    "tracing",
]
