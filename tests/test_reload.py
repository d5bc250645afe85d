"""Hot reload: new requests get the new config, in-flight ones finish on the old, bad configs are ignored."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import ClassVar

import aiohttp
import orjson
from pydantic import BaseModel

from sidecar.app import Sidecar
from sidecar.chain import Next, PolicyContext
from sidecar.config import Settings, parse_settings
from sidecar.exchange import Exchange, Reply
from sidecar.isolated_config import load_settings_isolated_async
from sidecar.reload import ConfigWatcher
from tests.conftest import SidecarFactory, settings_for
from tests.fake_ollama import FakeOllama

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}


class _NoOptions(BaseModel):
    pass


class FailsToStart:
    """A policy whose start() raises: a config naming it cannot be applied."""

    config_model: ClassVar[type[BaseModel]] = _NoOptions

    def __init__(self, config: _NoOptions, context: PolicyContext) -> None:
        pass

    async def start(self) -> None:
        raise RuntimeError("cannot start")

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        return await call_next(exchange)


def with_header(fake: FakeOllama, header: str) -> Settings:
    return settings_for(fake.url, [{"correlation": {"header": header}}])


async def test_reloads_under_load_fail_no_request(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    headers = ["X-Request-ID", "X-Trace-ID"]

    async def one(index: int) -> bool:
        stream = index % 2 == 0
        path = "/api/chat" if stream else "/v1/chat/completions"
        async with http.post(f"{sidecar.url}{path}", json={**CHAT, "stream": stream}) as response:
            body = await response.read()
            if response.status != 200:
                return False
            if stream:
                return bool(orjson.loads(body.splitlines()[-1]).get("done"))
            return "choices" in orjson.loads(body)

    async def reload_repeatedly() -> None:
        for turn in range(20):
            assert await sidecar.apply(with_header(fake, headers[turn % 2]))
            await asyncio.sleep(0.005)  # pace the reloads across the burst of requests

    results, _ = await asyncio.gather(
        asyncio.gather(*(one(index) for index in range(300))), reload_repeatedly()
    )
    assert all(results), f"{results.count(False)} of 300 requests failed during reloads"
    assert sidecar.generation == 21
    # The last config is the one new requests see; every retired runtime is closed.
    async with http.get(f"{sidecar.url}/api/version") as response:
        assert "X-Trace-ID" in response.headers
    await asyncio.wait_for(asyncio.gather(*sidecar._background), 5)
    assert not sidecar._retired


async def test_a_request_in_flight_finishes_on_the_config_it_started_with(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    release = asyncio.Event()

    async def gate(index: int) -> None:
        if index == 2:
            await release.wait()

    fake.between_chunks = gate
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as stream:
        await stream.content.readline()
        old = sidecar.runtime
        assert await sidecar.apply(with_header(fake, "X-Trace-ID"))
        assert old is not None and old.retired and not old.closed
        release.set()
        lines = (await stream.read()).splitlines()
        assert stream.headers["X-Request-ID"]
    assert orjson.loads(lines[-1])["done"] is True
    # The old runtime is closed in the background once its last request is done.
    assert sidecar._idle is not None
    await asyncio.wait_for(sidecar._idle.wait(), 5)
    await asyncio.wait_for(asyncio.gather(*sidecar._background), 5)
    assert old.closed


async def test_a_config_that_cannot_start_is_rejected_and_the_old_one_serves(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    before = sidecar.runtime
    bad = settings_for(fake.url, [{"tests.test_reload:FailsToStart": {}}])
    assert not await sidecar.apply(bad)
    assert sidecar.runtime is before
    async with http.get(f"{sidecar.url}/api/version") as response:
        assert response.status == 200
        assert "X-Request-ID" in response.headers
    metrics = sidecar.metrics.render().decode()
    assert 'ollama_sidecar_config_reloads_total{result="rejected"} 1.0' in metrics


async def test_the_listen_address_is_kept_on_reload(sidecar: Sidecar, fake: FakeOllama) -> None:
    moved = dataclasses.replace(
        settings_for(fake.url), listen=parse_settings({"listen": {"port": 1}}).listen
    )
    assert await sidecar.apply(moved)
    assert sidecar.settings.listen.port == 0


def kubernetes_configmap(root: Path, text: str, version: int) -> Path:
    """Lay out a mounted ConfigMap the way the kubelet does: ..data -> a timestamped dir."""
    data = root / f"..2026_11_25_{version}"
    data.mkdir()
    (data / "sidecar.yaml").write_text(text)
    link = root / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, root / "..data")  # the atomic swap
    visible = root / "sidecar.yaml"
    if not visible.is_symlink():
        visible.symlink_to("..data/sidecar.yaml")
    return visible


async def test_a_configmap_symlink_swap_is_picked_up_and_a_broken_one_ignored(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    def config(header: str, interval: str = "50ms") -> str:
        return (
            f"listen: {{port: 0}}\nupstream: {{url: {fake.url}}}\n"
            f"reload: {{interval: {interval}}}\n"
            f"policies: [{{correlation: {{header: {header}}}}}]\n"
        )

    path = kubernetes_configmap(tmp_path, config("X-Request-ID"), 1)
    sidecar = await make_sidecar(reload={"interval": "50ms"})

    def load() -> Awaitable[Settings]:
        # What `serve` does: validation in a child process, the sidecar goes on serving.
        return load_settings_isolated_async(path)

    watcher = ConfigWatcher(sidecar, load, path)
    watching = asyncio.create_task(watcher.run())
    try:
        kubernetes_configmap(tmp_path, config("X-Trace-ID"), 2)
        await asyncio.wait_for(watcher.wait_for_attempts(1), 5)
        async with http.get(f"{sidecar.url}/api/version") as response:
            assert "X-Trace-ID" in response.headers
        kubernetes_configmap(tmp_path, "policies: [{correlation: {headr: x}}]\n", 3)
        await asyncio.wait_for(watcher.wait_for_attempts(2), 5)
        async with http.get(f"{sidecar.url}/api/version") as response:
            assert "X-Trace-ID" in response.headers  # the last good config keeps serving
        assert sidecar.generation == 2
        watcher.trigger()  # SIGHUP: reload even though nothing changed... and it is still bad
        await asyncio.wait_for(watcher.wait_for_attempts(3), 5)
        metrics = sidecar.metrics.render().decode()
        assert 'ollama_sidecar_config_reloads_total{result="rejected"} 2.0' in metrics
        assert "ollama_sidecar_config_generation 2.0" in metrics
    finally:
        watching.cancel()
