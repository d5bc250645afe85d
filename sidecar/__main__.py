"""`python -m sidecar` does exactly what the `ollama-sidecar` console script does."""

from sidecar.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
