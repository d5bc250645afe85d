"""Built-in policies, one module each; importing this package registers them all by name."""

from policies import correlation, routing, tracing

__all__ = ["correlation", "routing", "tracing"]
