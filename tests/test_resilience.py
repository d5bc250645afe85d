"""The resilience policies together, against a misbehaving fake Ollama and the real openai client.

Bounded in count and time; figures are printed with `-s` for the closing note.
"""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
import openai
import orjson

from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama, Fault

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}
CHAIN = [
    {"correlation": {}},
    {"routing": {}},
    {"retry": {"attempts": 4, "base": "1ms", "max_delay": "4ms", "budget_ratio": 0.5}},
    {"circuit_breaker": {"failure_threshold": 50, "failure_rate": None}},
    {"concurrency": {"max_in_flight": 8, "max_queue": 200}},
]


def ending(kind: str, status: int, body: bytes) -> str:
    """'complete', 'error' (explicit) or 'silent' (what must never happen)."""
    try:
        if status != 200:
            return "error" if "error" in orjson.loads(body) else "silent"
        if kind == "json":
            return "complete" if "choices" in orjson.loads(body) else "silent"
        if kind == "sse":
            last = [event for event in body.split(b"\n\n") if event.strip()][-1]
            if last == b"data: [DONE]":
                return "complete"
            return "error" if b'"error"' in last else "silent"
        last_line = orjson.loads(body.splitlines()[-1])
        if last_line.get("done") is True:
            return "complete"
        return "error" if "error" in last_line else "silent"
    except (orjson.JSONDecodeError, IndexError):
        return "silent"


async def run_chaos(
    sidecar_url: str, fake: FakeOllama, http: aiohttp.ClientSession, faults: list[Fault | None]
) -> list[str]:
    """One request per entry, 20 at a time; each entry's fault is queued for the upstream."""
    for fault in faults:
        # A fault that does nothing keeps the real ones spread over the run.
        fake.inject(fault or Fault("delay_headers", delay=0))
    semaphore = asyncio.Semaphore(20)

    async def one(index: int) -> str:
        kind = ("json", "sse", "ndjson")[index % 3]
        path = "/api/chat" if kind == "ndjson" else "/v1/chat/completions"
        async with (
            semaphore,
            http.post(f"{sidecar_url}{path}", json={**CHAT, "stream": kind != "json"}) as response,
        ):
            return ending(kind, response.status, await response.read())

    async with asyncio.timeout(60):  # none hangs
        return list(await asyncio.gather(*(one(index) for index in range(len(faults)))))


async def test_failures_before_the_first_byte_are_absorbed(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """20 % of attempts fail before the first byte (503, 502, resets, dropped connections)."""
    sidecar = await make_sidecar(policies=CHAIN)
    rng = random.Random(11)
    kinds = [
        Fault("busy"),
        Fault("status", status=502),
        Fault("close_before_response"),
        Fault("reset_after", after_chunks=0),
    ]
    total = 600
    faults = [rng.choice(kinds) if rng.random() < 0.2 else None for _ in range(total)]
    started = time.perf_counter()
    endings = await run_chaos(sidecar.url, fake, http, faults)
    complete = endings.count("complete") / total
    print(
        f"\nchaos, failures before the first byte: {total} requests, {complete:.1%} complete, "
        f"{endings.count('silent')} silent, upstream saw {len(fake.requests)} requests "
        f"({len(fake.requests) / total:.2f}x), {time.perf_counter() - started:.2f}s"
    )
    assert endings.count("silent") == 0
    assert complete >= 0.995
    assert fake.peak_in_flight <= 8
    assert sidecar._in_flight == 0 and fake.active_streams == 0


async def test_failures_mid_stream_end_in_an_explicit_error_and_nothing_hangs(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=CHAIN)
    rng = random.Random(5)
    total = 300
    faults: list[Fault | None] = [
        Fault(rng.choice(("reset_after", "end_without_done")), after_chunks=rng.randint(1, 4))
        if rng.random() < 0.3
        else None
        for _ in range(total)
    ]
    endings = await run_chaos(sidecar.url, fake, http, faults)
    print(
        f"\nchaos, failures mid-stream: {total} requests, {endings.count('complete')} complete, "
        f"{endings.count('error')} explicit errors, {endings.count('silent')} silent"
    )
    assert endings.count("silent") == 0
    assert endings.count("error") >= 1
    assert sidecar._in_flight == 0 and fake.active_streams == 0


async def test_the_openai_client_retries_and_ours_do_not_multiply(
    make_sidecar: SidecarFactory, fake: FakeOllama
) -> None:
    sidecar = await make_sidecar(
        policies=[{"retry": {"attempts": 3, "base": "1ms", "max_delay": "2ms"}}]
    )
    for _ in range(20):
        fake.inject(Fault("busy"))
    client = openai.AsyncOpenAI(base_url=f"{sidecar.url}/v1", api_key="x", max_retries=2)
    try:
        await client.chat.completions.create(
            model="llama3.2:latest", messages=[{"role": "user", "content": "hi"}]
        )
    except openai.InternalServerError as error:
        assert error.status_code == 503
        assert error.response.headers["x-should-retry"] == "false"
        assert error.response.headers["x-sidecar-attempts"] == "3"
    else:
        raise AssertionError("the upstream failed every attempt")
    # 3 sidecar attempts, and the client's own 2 retries did not happen on top.
    assert len(fake.requests) == 3


async def test_the_resilience_policies_work_in_any_order(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Every order of the four gives a right answer, and a clean error when Ollama fails."""
    import itertools

    policies = CHAIN[1:]
    for order in itertools.permutations(policies):
        sidecar = await make_sidecar(policies=[CHAIN[0], *order])
        async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
            assert ending("ndjson", response.status, await response.read()) == "complete"
        for _ in range(8):
            fake.inject(Fault("status", status=500, message="down"))
        async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
            assert response.status == 500  # Ollama's own answer, not the sidecar's
            assert (await response.json())["error"]["message"] == "down"
        fake._faults.clear()
        await sidecar.stop(grace=0)
