"""Validate the config in a short-lived child process, so the sidecar never imports pydantic.

pydantic (with pydantic-core, its schemas and PyYAML) stays resident for the life
of any process that imports it: about 10 MiB, a fifth of the 50 MiB issue 7
allows a pod's sidecar. So `serve` validates its config, at start and at every
reload, in a child (`python -m sidecar.isolated_config`) that reads the same
sources in the same order (file, environment, command-line overrides) and hands
back the validated settings, which are plain frozen dataclasses (sidecar/knobs.py),
pickled. The child inherits the environment, so `SIDECAR_*` variables apply.

The pickle comes from our own interpreter over a pipe we opened; nothing else
can write into it. A start costs one extra interpreter (about 0.3 s of CPU),
once, and once per reload.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from sidecar.config import ConfigError, Settings

# Exit status of a child that found problems in the config (stdout: the problems as JSON).
PROBLEMS = 2
CHILD_TIMEOUT_S = 60.0


def _command(
    path: str | os.PathLike[str] | None, overrides: Mapping[tuple[str, ...], Any]
) -> list[str]:
    request = {
        "path": os.fspath(path) if path else None,
        "overrides": [[list(key_path), value] for key_path, value in overrides.items()],
    }
    return [sys.executable, "-m", "sidecar.isolated_config", orjson.dumps(request).decode()]


def _settings_from(returncode: int, stdout: bytes, stderr: bytes) -> Settings:
    if returncode == 0:
        settings = pickle.loads(stdout)
        if not isinstance(settings, Settings):
            raise ConfigError([("", "config validation returned something other than settings")])
        return settings
    if returncode == PROBLEMS:
        problems = orjson.loads(stdout)
        raise ConfigError([(str(path), str(message)) for path, message in problems])
    detail = stderr.decode("utf-8", "replace").strip().splitlines()
    reason = detail[-1] if detail else f"exit status {returncode}"
    raise ConfigError([("", f"config validation failed: {reason}")])


def load_settings_isolated(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> Settings:
    """`load_settings(path, overrides=...)`, computed in a child; for start-up, before any loop."""
    try:
        done = subprocess.run(
            _command(path, overrides or {}),
            capture_output=True,
            timeout=CHILD_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError([("", "config validation took too long")]) from None
    return _settings_from(done.returncode, done.stdout, done.stderr)


async def load_settings_isolated_async(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[tuple[str, ...], Any] | None = None,
) -> Settings:
    """The same, without blocking the event loop: for reloads while requests are served."""
    child = await asyncio.create_subprocess_exec(
        *_command(path, overrides or {}),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(child.communicate(), CHILD_TIMEOUT_S)
    except TimeoutError:
        child.kill()
        await child.wait()
        raise ConfigError([("", "config validation took too long")]) from None
    except BaseException:
        # Cancelled (shutdown mid-reload): leave no child behind.
        if child.returncode is None:
            child.kill()
            await child.wait()
        raise
    assert child.returncode is not None
    return _settings_from(child.returncode, stdout, stderr)


def main(argv: Sequence[str]) -> int:
    """The child: validate, then write the pickled settings or the problems to stdout."""
    from sidecar.config import load_settings

    request = orjson.loads(argv[0])
    overrides = {tuple(key_path): value for key_path, value in request["overrides"]}
    try:
        settings = load_settings(request["path"], overrides=overrides)
    except ConfigError as error:
        sys.stdout.buffer.write(orjson.dumps(error.problems))
        return PROBLEMS
    sys.stdout.buffer.write(pickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
