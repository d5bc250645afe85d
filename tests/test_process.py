"""The real process: runs with no config file, drains on SIGTERM, exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.fake_ollama import FakeOllama

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}


class SidecarProcess:
    """`python -m sidecar serve` on a free port, its JSON log lines readable one by one."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.url = ""

    async def next_event(self, name: str, within: float = 10.0) -> dict[str, object]:
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            while True:
                line = await self.process.stdout.readline()
                if not line:
                    raise AssertionError(f"process ended before logging {name!r}")
                try:
                    event = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue
                if event.get("event") == name:
                    return event  # type: ignore[no-any-return]

    async def drain_output(self) -> None:
        assert self.process.stdout is not None
        await self.process.stdout.read()


async def start_process(*args: str, env: dict[str, str] | None = None) -> SidecarProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
    environment.update(env or {})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=environment,
    )
    running = SidecarProcess(process)
    listening = await running.next_event("listening")
    running.url = str(listening["url"])
    return running


@pytest.fixture
async def processes() -> AsyncIterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    yield started
    for running in started:
        if running.process.returncode is None:
            running.process.kill()
            await running.process.wait()


async def test_runs_with_no_config_file_and_drains_on_sigterm(
    fake: FakeOllama, processes: list[SidecarProcess]
) -> None:
    running = await start_process("--upstream", fake.url)
    processes.append(running)
    release = asyncio.Event()

    async def gate(index: int) -> None:
        if index == 2:
            await release.wait()

    fake.between_chunks = gate
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{running.url}/readyz") as response:
            assert response.status == 200
        async with http.post(f"{running.url}/api/chat", json=CHAT) as stream:
            assert orjson.loads(await stream.content.readline())["done"] is False
            running.process.send_signal(signal.SIGTERM)
            await running.next_event("draining")
            async with http.get(f"{running.url}/readyz") as response:
                assert response.status == 503
            release.set()
            rest = (await stream.read()).splitlines()
        assert orjson.loads(rest[-1])["done"] is True
    await running.drain_output()
    assert await asyncio.wait_for(running.process.wait(), 10) == 0


async def test_grace_runs_out_and_the_process_still_exits_0(
    fake: FakeOllama, processes: list[SidecarProcess], tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"upstream: {{url: {fake.url}}}\nshutdown: {{grace: 200ms}}\n")
    running = await start_process(env={"SIDECAR_CONFIG": str(config)})
    processes.append(running)
    never = asyncio.Event()

    async def hold(index: int) -> None:
        await never.wait()

    fake.between_chunks = hold
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{running.url}/api/chat", json=CHAT) as stream,
    ):
        await stream.content.readline()
        running.process.send_signal(signal.SIGTERM)
        await running.next_event("drain_timeout")
        with pytest.raises(aiohttp.ClientPayloadError):
            await stream.read()
    await running.drain_output()
    assert await asyncio.wait_for(running.process.wait(), 10) == 0
    await asyncio.wait_for(fake.stream_closed_by_peer.wait(), 5)


async def test_invalid_config_exits_2_with_every_problem(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("listen: {port: -1}\npolicies: [{nope: {}}]\n")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "serve",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert b"listen.port" in stderr
    assert b"policies[0]" in stderr


async def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "ollama-sidecar"
    process = await asyncio.create_subprocess_exec(
        str(script), "--version", stdout=asyncio.subprocess.PIPE
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0
    assert stdout.startswith(b"ollama-sidecar ")


async def test_sighup_reloads_and_a_broken_config_is_ignored(
    fake: FakeOllama, processes: list[SidecarProcess], tmp_path: Path
) -> None:
    config = tmp_path / "sidecar.yaml"
    watch_off = "reload: {watch: false}\n"
    config.write_text(f"{watch_off}upstream: {{url: {fake.url}}}\n")
    running = await start_process("--config", str(config))
    processes.append(running)
    async with aiohttp.ClientSession() as http:
        config.write_text(
            f"{watch_off}upstream: {{url: {fake.url}}}\npolicies: [{{correlation: {{header: X-Trace-ID}}}}]\n"
        )
        running.process.send_signal(signal.SIGHUP)
        reloaded = await running.next_event("reloaded")
        assert reloaded["generation"] == 2
        async with http.get(f"{running.url}/api/version") as response:
            assert "X-Trace-ID" in response.headers
        config.write_text("policies: [{nope: {}}]\n")
        running.process.send_signal(signal.SIGHUP)
        rejected = await running.next_event("reload_rejected")
        assert "policies[0]" in str(rejected["problems"])
        async with http.get(f"{running.url}/api/version") as response:
            assert response.status == 200
            assert "X-Trace-ID" in response.headers
    running.process.send_signal(signal.SIGTERM)
    await running.drain_output()
    assert await asyncio.wait_for(running.process.wait(), 10) == 0


def mapped_files(pid: int) -> str:
    """The files a running process has mapped: its shared libraries and extension modules."""
    return Path(f"/proc/{pid}/maps").read_text()


async def test_the_serving_process_never_loads_pydantic(
    fake: FakeOllama, processes: list[SidecarProcess], tmp_path: Path
) -> None:
    # pydantic-core would stay resident for the pod's life (~10 MiB of issue 7's 50):
    # the config is validated in a child process, at start and at every reload.
    config = tmp_path / "sidecar.yaml"
    chain = "policies: [correlation, metering, circuit_breaker, retry]\n"
    config.write_text(f"reload: {{watch: false}}\nupstream: {{url: {fake.url}}}\n{chain}")
    running = await start_process("--config", str(config))
    processes.append(running)
    assert "pydantic_core" not in mapped_files(running.process.pid)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{running.url}/v1/chat/completions", json=CHAT) as response:
            assert response.status == 200
        config.write_text(
            f"reload: {{watch: false}}\nupstream: {{url: {fake.url}}}\n{chain}"
            "limits: {max_body: 1MiB}\n"
        )
        running.process.send_signal(signal.SIGHUP)
        assert (await running.next_event("reloaded"))["generation"] == 2
        config.write_text("policies: [{retry: {attempts: 0}}]\n")
        running.process.send_signal(signal.SIGHUP)
        rejected = await running.next_event("reload_rejected")
        assert "policies[0].retry.attempts" in str(rejected["problems"])
        async with http.post(f"{running.url}/v1/chat/completions", json=CHAT) as response:
            assert response.status == 200
    assert "pydantic_core" not in mapped_files(running.process.pid)
    running.process.send_signal(signal.SIGTERM)
    await running.drain_output()
    assert await asyncio.wait_for(running.process.wait(), 10) == 0
