"""Bounded load with faults: every answer is complete or ends in an explicit error, nothing leaks."""

from __future__ import annotations

import asyncio
import random

import aiohttp
import orjson

from sidecar.app import Sidecar
from tests.fake_ollama import FakeOllama, Fault

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}
REQUESTS = 90
FAULTS = ("reset_after", "end_without_done", "busy", "status", "close_before_response")


def verdict(kind: str, status: int, body: bytes) -> str:
    """'complete', 'error' (an explicit, parseable error) or 'silent' (the bug this test hunts)."""
    if status != 200:
        document = orjson.loads(body)
        return "error" if "error" in document else "silent"
    if kind == "json":
        return "complete" if "choices" in orjson.loads(body) else "silent"
    if kind == "sse":
        events = [event for event in body.split(b"\n\n") if event.strip()]
        if events[-1] == b"data: [DONE]":
            return "complete"
        return "error" if b'"error"' in events[-1] else "silent"
    lines = body.splitlines()
    last = orjson.loads(lines[-1])
    if last.get("done") is True:
        return "complete"
    return "error" if "error" in last else "silent"


async def test_mixed_load_with_faults_never_ends_silently(
    sidecar: Sidecar, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    rng = random.Random(7)
    for _ in range(REQUESTS // 4):
        fake.inject(Fault(rng.choice(FAULTS), after_chunks=rng.randint(1, 4)))  # type: ignore[arg-type]

    async def one(index: int) -> str:
        kind = ("json", "sse", "ndjson")[index % 3]
        path = "/api/chat" if kind == "ndjson" else "/v1/chat/completions"
        body = {**CHAT, "stream": kind != "json"}
        async with http.post(f"{sidecar.url}{path}", json=body) as response:
            return verdict(kind, response.status, await response.read())

    async with asyncio.timeout(30):
        verdicts = await asyncio.gather(*(one(index) for index in range(REQUESTS)))
    assert "silent" not in verdicts
    assert verdicts.count("complete") >= REQUESTS // 2
    assert verdicts.count("error") >= 1
    # Nothing is left behind: no request in flight, no stream open upstream, and every
    # request handler task (sidecar and fake) finishes; a handler may still be
    # returning when its client has read the last byte, so they get a bounded wait.
    assert sidecar._in_flight == 0
    assert fake.active_streams == 0
    handlers = [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "") == "RequestHandler._handle_request"
    ]
    if handlers:
        _, pending = await asyncio.wait(handlers, timeout=5)
        assert not pending
