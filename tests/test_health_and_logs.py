"""Health, readiness, metrics and the access log."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import structlog
from structlog.testing import capture_logs

from sidecar.app import Sidecar
from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}


async def test_healthz_is_alive_without_the_upstream(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    sidecar = await make_sidecar(upstream_url=f"http://127.0.0.1:{unused_tcp_port}")
    async with http.get(f"{sidecar.url}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{sidecar.url}/readyz") as response:
        assert response.status == 503
        detail = await response.json()
    assert detail["upstream"]["reachable"] is False


async def test_readyz_checks_the_upstream_once_per_cache_period(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(readiness={"cache_for": "60s"})
    for _ in range(5):
        async with http.get(f"{sidecar.url}/readyz") as response:
            assert response.status == 200
            detail = await response.json()
    assert detail["upstream"] == {"url": fake.url, "version": "0.12.0", "reachable": True}
    assert [r.path for r in fake.requests] == ["/api/version"]


async def test_readyz_turns_503_when_draining(
    sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    sidecar.draining = True
    async with http.get(f"{sidecar.url}/readyz") as response:
        assert response.status == 503
        assert (await response.json())["status"] == "draining"


async def test_metrics_count_requests_latency_and_overhead(
    sidecar: Sidecar, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
    async with http.post(f"{sidecar.url}/v1/nothing", json=CHAT) as response:
        assert response.status == 404
    async with http.get(f"{sidecar.url}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()
    assert (
        'ollama_sidecar_requests_total{method="POST",route="/v1/chat/completions",status="200"} 1.0'
        in text
    )
    assert 'ollama_sidecar_requests_total{method="POST",route="unmatched",status="404"} 1.0' in text
    for name in (
        "ollama_sidecar_request_duration_seconds_bucket",
        "ollama_sidecar_upstream_ttfb_seconds_bucket",
        "ollama_sidecar_overhead_seconds_bucket",
        "ollama_sidecar_in_flight_requests",
    ):
        assert name in text, name
    assert 'ollama_sidecar_overhead_seconds_count{route="/v1/chat/completions"} 1.0' in text


async def test_access_line_is_one_json_line_with_the_facts_and_never_the_key_or_body(
    sidecar: Sidecar, http: aiohttp.ClientSession, json_logs: Callable[[], list[dict[str, Any]]]
) -> None:
    secret = "sk-very-secret-key"
    async with http.post(
        f"{sidecar.url}/v1/chat/completions",
        json={**CHAT, "stream": True, "messages": [{"role": "user", "content": "confidential"}]},
        headers={"Authorization": f"Bearer {secret}", "X-Request-ID": "trace-1"},
    ) as response:
        await response.read()
    logs = json_logs()
    access = [line for line in logs if line["event"] == "request"]
    assert len(access) == 1
    line = access[0]
    assert line["request_id"] == "trace-1"
    assert line["level"] == "info"
    assert line["timestamp"].endswith("Z")
    assert line["route"] == "/v1/chat/completions"
    assert line["model"] == "llama3.2:latest"
    assert line["status"] == 200
    assert line["stream"] is True
    assert line["bytes_out"] > 0
    assert line["duration_ms"] >= line["upstream_ttfb_ms"] > 0
    everything = orjson.dumps(logs).decode()
    assert secret not in everything
    assert "confidential" not in everything


async def test_the_request_id_is_bound_to_every_log_line_of_the_request(
    sidecar: Sidecar, http: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with http.get(f"{sidecar.url}/api/version", headers={"X-Request-ID": "bound-7"}):
            pass
    assert logs
    assert all(line.get("request_id") == "bound-7" for line in logs)
