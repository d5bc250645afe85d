"""The OpenAPI document of the sidecar's own endpoints is valid and matches what they answer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import yaml
from openapi_spec_validator import validate

from sidecar.app import Sidecar
from tests.conftest import SidecarFactory

SPEC: dict[str, Any] = yaml.safe_load(
    (Path(__file__).parent.parent / "docs" / "openapi.yaml").read_text()
)


def schema(name: str) -> dict[str, Any]:
    """A component schema with its references resolvable."""
    return {**SPEC["components"]["schemas"][name], "components": SPEC["components"]}


def test_the_document_is_valid_openapi() -> None:
    validate(SPEC)


async def test_the_endpoints_answer_as_documented(
    sidecar: Sidecar,
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    unused_tcp_port: int,
) -> None:
    async with http.get(f"{sidecar.url}/healthz") as response:
        health = SPEC["paths"]["/healthz"]["get"]["responses"]["200"]["content"]
        jsonschema.validate(await response.json(), health["application/json"]["schema"])
    async with http.get(f"{sidecar.url}/readyz") as response:
        assert response.status == 200
        jsonschema.validate(await response.json(), schema("Readiness"))
    down = await make_sidecar(upstream_url=f"http://127.0.0.1:{unused_tcp_port}")
    async with http.get(f"{down.url}/readyz") as response:
        assert response.status == 503
        jsonschema.validate(await response.json(), schema("Readiness"))
    async with http.get(f"{sidecar.url}/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain")
    async with http.post(f"{sidecar.url}/v1/nope", json={}) as response:
        jsonschema.validate(await response.json(), schema("OpenAIError"))
    async with http.post(f"{sidecar.url}/api/chat", data=b"{") as response:
        jsonschema.validate(await response.json(), schema("NativeError"))


async def test_the_usage_report_answers_as_documented(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=[{"metering": {}}])
    async with http.post(
        f"{sidecar.url}/v1/chat/completions",
        json={"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]},
    ) as response:
        assert response.status == 200
    assert sidecar.runtime is not None
    await dict(sidecar.runtime.policies)["metering"].store.flush()  # type: ignore[attr-defined]
    async with http.get(f"{sidecar.url}/sidecar/usage") as response:
        report = await response.json()
    jsonschema.validate(report, schema("UsageReport"))
    assert report["tenants"]["anonymous"]["totals"]["requests"] == 1
