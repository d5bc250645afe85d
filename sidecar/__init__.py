"""ollama-sidecar: a streaming-transparent sidecar proxy for Ollama with pluggable policies."""

__version__ = "0.1.0"
