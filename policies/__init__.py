"""Built-in policies, one module each; importing this package registers them all by name."""

from policies import circuit_breaker, concurrency, correlation, retry, routing, tracing

__all__ = [
    "circuit_breaker",
    "concurrency",
    "correlation",
    "retry",
    "routing",
    "tracing",
]
