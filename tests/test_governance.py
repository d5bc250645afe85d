"""The governance policies together: any order works, and the usage report shows budgets left."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama

KEY = "sk-team-a-0123456789abcdef"
CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "two words"}]}


def governance(audit_path: Path) -> list[dict[str, Any]]:
    return [
        {"audit": {"sink": "file", "path": str(audit_path)}},
        {"auth": {"keys": [{"key": KEY, "tenant": "team-a"}]}},
        {"ratelimit": {"requests_per_minute": 1000, "tokens_per_minute": 1_000_000}},
        {"budget": {"tokens": 1_000_000}},
        {"metering": {}},
    ]


async def test_the_governance_policies_work_in_any_order(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    policies = governance(tmp_path / "audit.jsonl")
    headers = {"Authorization": f"Bearer {KEY}"}
    orders = list(itertools.permutations(policies))
    for order in orders[:: len(orders) // 24]:  # 24 orders spread over all 120
        sidecar = await make_sidecar(policies=list(order))
        for stream in (False, True):
            async with http.post(
                f"{sidecar.url}/v1/chat/completions",
                json={**CHAT, "stream": stream},
                headers=headers,
            ) as response:
                assert response.status == 200
                body = await response.read()
                assert (b"data: [DONE]" in body) if stream else (b'"choices"' in body)
        async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
            assert response.status == 401  # auth refuses wherever it stands
        await sidecar.stop(grace=0)


async def test_the_usage_report_shows_the_budget_left(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    sidecar = await make_sidecar(policies=governance(tmp_path / "audit.jsonl"))
    headers = {"Authorization": f"Bearer {KEY}"}
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json=CHAT, headers=headers
    ) as response:
        assert response.status == 200
    assert sidecar.runtime is not None
    policies = dict(sidecar.runtime.policies)
    await policies["metering"].store.flush()  # type: ignore[attr-defined]
    await policies["budget"].flush()  # type: ignore[attr-defined]
    async with http.get(f"{sidecar.url}/sidecar/usage?tenant=team-a") as response:
        report = await response.json()
    assert report["tenants"]["team-a"]["totals"]["total_tokens"] == 8
    left = report["budgets"]["budget"]["team-a"]
    assert left["limit_tokens"] == 1_000_000
    assert left["spent_tokens"] == 8
    assert left["left_tokens"] == 1_000_000 - 8
