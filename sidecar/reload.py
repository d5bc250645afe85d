"""Applying a changed config without a restart: a polled file watch and SIGHUP.

Kubernetes updates a mounted ConfigMap by pointing a `..data` symlink at a new
directory; an inotify watch on the file misses that, a poll of `stat` through
the symlink does not. The poll is a `stat` every few seconds: no cost that
matters, no dependency, and it works the same on every filesystem.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from sidecar.app import Sidecar
from sidecar.config import ConfigError, Settings

log = structlog.get_logger("sidecar.reload")


class ConfigWatcher:
    """Reloads `sidecar` from `await load()` when the file at `path` changes or on `trigger()`.

    `load` is a coroutine function because the sidecar validates in a child
    process (sidecar/isolated_config.py) while it goes on serving.
    """

    def __init__(
        self,
        sidecar: Sidecar,
        load: Callable[[], Awaitable[Settings]],
        path: str | os.PathLike[str] | None,
    ) -> None:
        self._sidecar = sidecar
        self._load = load
        self._path = Path(path) if path else None
        self._digest: bytes | None = None
        self._digest = self._read_digest()
        self._wake = asyncio.Event()
        self.attempts = 0
        self._attempted = asyncio.Condition()

    def trigger(self) -> None:
        """Reload now (SIGHUP), whether the file changed or not."""
        self._digest = None
        self._wake.set()

    async def run(self) -> None:
        """Watch until cancelled."""
        while True:
            settings = self._sidecar.settings.reload
            timeout = settings.interval if settings.watch and self._path else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            digest = self._read_digest()
            if digest is not None and digest == self._digest:
                continue
            self._digest = digest
            await self.reload()

    async def reload(self) -> bool:
        """Load and apply the config once; a bad one is logged and the running one stays."""
        try:
            settings = await self._load()
        except ConfigError as error:
            self._sidecar.reject_reload(error.lines())
            applied = False
        else:
            applied = await self._sidecar.apply(settings)
        async with self._attempted:
            self.attempts += 1
            self._attempted.notify_all()
        return applied

    async def wait_for_attempts(self, count: int) -> None:
        """Until `count` reloads have been tried (tests, and anyone who must know)."""
        async with self._attempted:
            await self._attempted.wait_for(lambda: self.attempts >= count)

    def _read_digest(self) -> bytes | None:
        if self._path is None:
            return None
        try:
            return hashlib.sha256(self._path.read_bytes()).digest()
        except OSError:
            # Mid-swap or gone: keep what we had and look again next time.
            return self._digest
