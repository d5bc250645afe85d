"""The usage ledger and report: metered requests add up per tenant and model, in memory or Redis."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import aiohttp
import pytest

from sidecar.app import Sidecar
from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama
from tests.redis_server import RedisServer

KEYS = [
    {"key": "sk-team-a-0123456789abcdef", "tenant": "team-a"},
    {"key": "sk-team-b-0123456789abcdef", "tenant": "team-b"},
]
CHAIN = [
    {"auth": {"keys": KEYS}},
    {"metering": {"prices": {"llama3.2": {"prompt": 1000000, "completion": 2000000}}}},
]
CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "two words"}]}


async def settle(sidecar: Sidecar) -> None:
    """Ledger writes run beside the request; wait for them."""
    assert sidecar.runtime is not None
    metering = dict(sidecar.runtime.policies)["metering"]
    await metering.store.flush()  # type: ignore[attr-defined]


async def chat(http: aiohttp.ClientSession, sidecar: Sidecar, key: str, stream: bool) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json={**CHAT, "stream": stream}, headers=headers
    ) as response:
        assert response.status == 200
        await response.read()


async def test_the_report_adds_up_usage_per_tenant_and_model(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=CHAIN)
    for stream in (False, True, False):
        await chat(http, sidecar, KEYS[0]["key"], stream)
    await chat(http, sidecar, KEYS[1]["key"], True)
    await settle(sidecar)
    async with http.get(f"{sidecar.url}/sidecar/usage") as response:
        assert response.status == 200
        report = await response.json()
    team_a = report["tenants"]["team-a"]
    assert team_a["totals"]["requests"] == 3
    # The fake counts 2 prompt words and 6 completion chunks per answer.
    assert team_a["models"]["llama3.2:latest"] == {
        "requests": 3,
        "prompt_tokens": 6,
        "completion_tokens": 18,
        "total_tokens": 24,
        "cost": pytest.approx(3 * (2 * 1.0 + 6 * 2.0)),
        "estimated": 0,
    }
    assert report["tenants"]["team-b"]["totals"]["requests"] == 1
    async with http.get(f"{sidecar.url}/sidecar/usage?tenant=team-b") as response:
        assert list((await response.json())["tenants"]) == ["team-b"]
    async with http.get(f"{sidecar.url}/sidecar/usage?period=26-11") as response:
        assert response.status == 400


async def test_replicas_on_one_redis_share_the_ledger_and_the_cli_reads_it(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
    tmp_path: Path,
) -> None:
    prefix = f"usage-test-{id(tmp_path)}:"
    stores = {"redis_url": redis_server.url, "prefix": prefix}
    one = await make_sidecar(policies=CHAIN, stores=stores)
    two = await make_sidecar(policies=CHAIN, stores=stores)
    await chat(http, one, KEYS[0]["key"], False)
    await chat(http, two, KEYS[0]["key"], True)
    await settle(one)
    await settle(two)
    async with http.get(f"{two.url}/sidecar/usage?tenant=team-a") as response:
        report = await response.json()
    assert report["shared"] is True
    assert report["tenants"]["team-a"]["totals"]["requests"] == 2
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"stores: {{redis_url: '{redis_server.url}', prefix: '{prefix}'}}\n"
        f"policies: [{{auth: {{keys: [{{key: {KEYS[0]['key']}, tenant: team-a}}]}}}}, metering]\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "usage",
        "--config",
        str(config),
        "--tenant",
        "team-a",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr
    assert b'"requests": 2' in stdout


async def test_a_store_outage_never_fails_a_request(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    unused_tcp_port: int,
) -> None:
    sidecar = await make_sidecar(
        policies=CHAIN,
        stores={"redis_url": f"redis://127.0.0.1:{unused_tcp_port}/0", "timeout": "200ms"},
    )
    await chat(http, sidecar, KEYS[0]["key"], False)
    await settle(sidecar)
    assert "ollama_sidecar_ledger_write_errors_total 1.0" in sidecar.metrics.render().decode()
    async with http.get(f"{sidecar.url}/sidecar/usage") as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "store_unavailable"


def test_the_cli_explains_a_memory_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.cli import main

    config = tmp_path / "sidecar.yaml"
    config.write_text("policies: [metering]\n")
    assert main(["usage", "--config", str(config)]) == 1
    assert "GET /sidecar/usage" in capsys.readouterr().err
