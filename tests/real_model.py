"""A real model server for the slow tier: llama.cpp's `llama-server` with SmolLM2-135M.

`scripts/real-model-server.sh` builds the binary and fetches the model once into a cache
outside the repository (a no-op that touches no network when cached); `LlamaServer` runs it
on 127.0.0.1 and a free port. It speaks OpenAI's `/v1` dialect, not Ollama's `/api`.
Every failure raises `RealModelError` with the tail of the relevant log in its message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "real-model-server.sh"
MODEL_ALIAS = "smollm2"
EMBEDDING_DIM = 576
SETUP_TIMEOUT = 15 * 60.0  # a cold build takes ~6 minutes on 2 cores
START_TIMEOUT = 60.0  # the model loads in well under a second
LOG_TAIL_LINES = 40


class RealModelError(RuntimeError):
    """The build, the download or the server start failed; the message says why."""


@dataclass(frozen=True)
class Artifacts:
    server: Path
    model: Path
    cache: Path


def tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _stop_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process group (the script and its cmake/compilers), SIGKILL after `grace`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue


def ensure_artifacts(timeout: float = SETUP_TIMEOUT) -> Artifacts:
    """Run the setup script (build + fetch when not cached) and return the paths it prints."""
    env = {**os.environ, "PYTHON": sys.executable}
    process = subprocess.Popen(
        ["bash", str(SCRIPT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _stop_group(process)
        out, err = process.communicate()
        raise RealModelError(
            f"{SCRIPT.name} did not finish within {timeout:.0f}s; its output:\n"
            f"{tail(err.decode(errors='replace'))}"
        ) from None
    if process.returncode != 0:
        raise RealModelError(
            f"{SCRIPT.name} failed (exit {process.returncode}); its output:\n"
            f"{tail(err.decode(errors='replace'))}"
        )
    paths = dict(line.split("=", 1) for line in os.fsdecode(out).splitlines() if "=" in line)
    try:
        artifacts = Artifacts(
            Path(paths["LLAMA_SERVER"]), Path(paths["MODEL"]), Path(paths["CACHE"])
        )
    except KeyError as missing:
        raise RealModelError(f"{SCRIPT.name} printed no {missing} line: {out!r}") from None
    if not (artifacts.server.is_file() and artifacts.model.is_file()):
        raise RealModelError(f"{SCRIPT.name} printed paths that do not exist: {artifacts}")
    return artifacts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LlamaServer:
    """`llama-server` on 127.0.0.1 and a free port, with chat and mean-pooled embeddings."""

    def __init__(self, artifacts: Artifacts, log_path: Path) -> None:
        self.artifacts = artifacts
        self.log_path = log_path
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self) -> str:
        try:
            return tail(self.log_path.read_text(errors="replace"))
        except OSError:
            return "(no log)"

    def start(self, timeout: float = START_TIMEOUT, attempts: int = 3) -> None:
        """Start it and wait for `/health` to say ok; a port taken meanwhile is retried."""
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [
                        str(self.artifacts.server),
                        *("-m", str(self.artifacts.model), "--alias", MODEL_ALIAS),
                        *("--host", "127.0.0.1", "--port", str(self.port)),
                        *("-c", "4096", "-t", "2", "--parallel", "2"),
                        *("--embeddings", "--pooling", "mean", "--no-webui"),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self._wait_healthy(timeout)
                return
            except RealModelError:
                self.stop()
                port_taken = "bind" in self.log_tail().lower()
                if attempt == attempts or not port_taken:
                    raise

    def _wait_healthy(self, timeout: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RealModelError(
                    f"llama-server exited with {self.process.returncode} before it was healthy; "
                    f"the end of its log ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
                    last = f"HTTP {response.status}"
            except urllib.error.HTTPError as exc:  # 503 while the model loads
                last = f"HTTP {exc.code}"
            except OSError as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise RealModelError(
            f"llama-server was not healthy within {timeout:.0f}s (last: {last}); "
            f"the end of its log ({self.log_path}):\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _stop_group(self.process)
        self.process = None
