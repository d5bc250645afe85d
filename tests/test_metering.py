"""metering: counts from the upstream's usage, hidden usage events, estimates, cost, metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
import pytest

import policies.metering
from policies.metering import Metering, NdjsonLastLine, SseUsageScanner
from sidecar.app import Sidecar
from sidecar.knobs import validate
from sidecar.ledger import UsageRecord
from sidecar.tokens import TokenCounter, completion_text
from tests.conftest import JsonLogs, SidecarFactory
from tests.fake_ollama import FakeOllama, Fault

assert policies.metering  # imported for its @register("metering")

MODEL = "llama3.2:latest"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}]}
PRICES = {"llama3.2": {"prompt": 1000.0, "completion": 2000.0}}


def policy_of(sidecar: Sidecar) -> Metering:
    assert sidecar.runtime is not None
    for name, policy in sidecar.runtime.policies:
        if name == "metering":
            assert isinstance(policy, Metering)
            return policy
    raise AssertionError("no metering policy")


async def metrics_text(http: aiohttp.ClientSession, sidecar: Sidecar) -> str:
    async with http.get(f"{sidecar.url}/metrics") as response:
        return await response.text()


def sse_events(body: bytes) -> list[Any]:
    """Each event's payload, parsed, with ids and timestamps blanked."""
    events: list[Any] = []
    for event in body.split(b"\n\n"):
        if not event.strip():
            continue
        assert event.startswith(b"data: "), event
        payload = event[6:]
        if payload == b"[DONE]":
            events.append("[DONE]")
            continue
        document = orjson.loads(payload)
        document.pop("id", None)
        document.pop("created", None)
        events.append(document)
    return events


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
    async with http.post(url, json=body) as response:
        return response.status, await response.read()


# --- plain answers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "prompt_key", "completion_key"),
    [
        ("/v1/chat/completions", CHAT, "prompt_tokens", "completion_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi"}, "prompt_tokens", "completion_tokens"),
        ("/api/chat", {**CHAT, "stream": False}, "prompt_eval_count", "eval_count"),
        (
            "/api/generate",
            {"model": MODEL, "prompt": "hi", "stream": False},
            "prompt_eval_count",
            "eval_count",
        ),
        ("/v1/messages", {**CHAT, "max_tokens": 50}, "input_tokens", "output_tokens"),
    ],
)
async def test_plain_answer_counts_equal_the_bodys_usage(
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    prompt_key: str,
    completion_key: str,
) -> None:
    sidecar = await make_sidecar([{"metering": {"prices": PRICES}}])
    status, raw = await post(http, sidecar.url + path, body)
    assert status == 200
    document = orjson.loads(raw)
    usage = document.get("usage", document)
    prompt, completion = usage[prompt_key], usage[completion_key]
    assert prompt > 0 and completion > 0
    totals = policy_of(sidecar).totals()["anonymous"][MODEL]
    assert totals["prompt_tokens"] == prompt
    assert totals["completion_tokens"] == completion
    assert totals["requests"] == 1 and totals["estimated_requests"] == 0
    assert totals["cost"] == pytest.approx((prompt * 1000 + completion * 2000) / 1e6)


async def test_embeddings_count_prompt_tokens(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([{"metering": {}}])
    model = "nomic-embed-text:latest"
    status, raw = await post(http, f"{sidecar.url}/api/embed", {"model": model, "input": "hello"})
    assert status == 200
    totals = policy_of(sidecar).totals()["anonymous"][model]
    assert totals["prompt_tokens"] == orjson.loads(raw)["prompt_eval_count"]
    assert totals["completion_tokens"] == 0


# --- /v1 streams -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "stream": True}),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": True}),
    ],
)
async def test_v1_stream_without_include_usage_hides_the_usage_but_meters_it(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
) -> None:
    sidecar = await make_sidecar([{"metering": {}}])
    _, direct = await post(http, fake.url + path, body)
    _, through = await post(http, sidecar.url + path, body)
    # The upstream was asked for usage...
    sent = fake.requests[-1].json
    assert sent["stream_options"] == {"include_usage": True}
    # ...and the client sees exactly the events it gets without it.
    assert b'"usage"' not in through
    assert sse_events(through) == sse_events(direct)
    # With the ids and timestamps the same, the bytes are the same too.
    _, with_usage = await post(
        http, fake.url + path, {**body, "stream_options": {"include_usage": True}}
    )
    expected = [
        e for e in sse_events(with_usage) if not (isinstance(e, dict) and e.get("choices") == [])
    ]
    for event in expected:
        if isinstance(event, dict):
            event.pop("usage", None)
    assert sse_events(through) == expected
    usage = next(
        e for e in sse_events(with_usage) if isinstance(e, dict) and e.get("choices") == []
    )["usage"]
    totals = policy_of(sidecar).totals()["anonymous"][MODEL]
    assert totals["prompt_tokens"] == usage["prompt_tokens"]
    assert totals["completion_tokens"] == usage["completion_tokens"] == len(fake.chunks)
    assert totals["estimated_requests"] == 0


@pytest.mark.parametrize(
    ("raw", "sent_options"),
    [
        # No stream_options: the field is written in, the client's bytes kept around it.
        (
            b'  {"model": "%s", "stream": true,\n "messages": [{"role": "user", "content": "hi"}]}',
            None,
        ),
        (b'{"stream":true,"model":"%s","messages":[{"role":"user","content":"\u00e9"}]}', None),
        # stream_options the client sent are kept, with include_usage turned on.
        (
            b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":false,"x":1}}',
            {"include_usage": True, "x": 1},
        ),
        (
            b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{}}',
            {"include_usage": True},
        ),
        (
            b'{"model":"%s","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":null}',
            {"include_usage": True},
        ),
    ],
)
async def test_v1_stream_asks_upstream_for_usage_keeping_the_clients_fields(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    raw: bytes,
    sent_options: dict[str, Any] | None,
) -> None:
    sidecar = await make_sidecar([{"metering": {}}])
    body = raw % MODEL.encode()
    headers = {"Content-Type": "application/json"}
    async with http.post(
        sidecar.url + "/v1/chat/completions", data=body, headers=headers
    ) as response:
        assert response.status == 200
        assert b'"usage"' not in await response.read()
    received = fake.requests[-1]
    client = orjson.loads(body)
    assert received.json == {
        **client,
        "stream_options": sent_options or {"include_usage": True},
    }
    if sent_options is None:
        # Spliced, not re-serialised: the client's own bytes follow the added field.
        brace = body.index(b"{") + 1
        added = b'"stream_options":{"include_usage":true},'
        assert received.body == body[:brace] + added + body[brace:]
    assert policy_of(sidecar).totals()["anonymous"][MODEL]["estimated_requests"] == 0


async def test_v1_stream_bytes_identical_apart_from_ids(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([{"metering": {}}])
    body = {**CHAT, "stream": True}
    _, direct = await post(http, fake.url + "/v1/chat/completions", body)
    _, through = await post(http, sidecar.url + "/v1/chat/completions", body)

    def blank(raw: bytes) -> list[bytes]:
        out = []
        for event in raw.split(b"\n\n"):
            if event.startswith(b"data: {"):
                document = orjson.loads(event[6:])
                event = event.replace(document["id"].encode(), b"ID").replace(
                    str(document["created"]).encode(), b"T"
                )
            out.append(event)
        return out

    assert blank(through) == blank(direct)


async def test_v1_stream_with_include_usage_keeps_it(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([{"metering": {}}])
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    _, through = await post(http, sidecar.url + "/v1/chat/completions", body)
    usage_events = [
        e for e in sse_events(through) if isinstance(e, dict) and e.get("choices") == []
    ]
    assert len(usage_events) == 1
    usage = usage_events[0]["usage"]
    totals = policy_of(sidecar).totals()["anonymous"][MODEL]
    assert totals["completion_tokens"] == usage["completion_tokens"]
    assert totals["prompt_tokens"] == usage["prompt_tokens"]


async def test_ndjson_final_line_counts(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([{"metering": {}}])
    _, raw = await post(http, f"{sidecar.url}/api/chat", CHAT)
    last = orjson.loads(raw.strip().split(b"\n")[-1])
    assert last["done"] is True
    totals = policy_of(sidecar).totals()["anonymous"][MODEL]
    assert totals["prompt_tokens"] == last["prompt_eval_count"]
    assert totals["completion_tokens"] == last["eval_count"]
    assert totals["estimated_requests"] == 0


# --- estimates -------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/chat"])
async def test_stream_cut_short_is_estimated_and_marked(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    json_logs: JsonLogs,
    path: str,
) -> None:
    sidecar = await make_sidecar([{"metering": {}}])
    fake.inject(Fault("reset_after", after_chunks=3))
    async with http.post(sidecar.url + path, json={**CHAT, "stream": True}) as response:
        await response.read()
    policy = policy_of(sidecar)
    totals = policy.totals()["anonymous"][MODEL]
    assert totals["estimated_requests"] == 1
    expected = TokenCounter("llama3").count("".join(fake.chunks[:3]))
    assert totals["completion_tokens"] == expected
    assert totals["prompt_tokens"] > 0
    logged = [line for line in json_logs() if line.get("event") == "usage_estimated"]
    assert logged and logged[0]["ended"] == "failed"
    text = await metrics_text(http, sidecar)
    assert (
        'ollama_sidecar_requests_metered_total{model="llama3.2:latest",source="estimated",tenant="anonymous"} 1.0'
        in text
    )


async def test_client_gone_mid_stream_is_still_metered(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([{"metering": {}}])
    hold = asyncio.Event()

    async def gate(index: int) -> None:
        if index >= 2:
            await hold.wait()

    fake.between_chunks = gate
    policy = policy_of(sidecar)
    store = Recorded()
    policy.store = store  # the place a shared store plugs in
    response = await http.post(f"{sidecar.url}/v1/chat/completions", json={**CHAT, "stream": True})
    await response.content.readuntil(b"\n\n")
    await response.content.readuntil(b"\n\n")
    response.close()  # the client hangs up while the upstream is still generating
    async with asyncio.timeout(5):
        await store.seen.wait()
    assert store.records[0].estimated and store.records[0].ended == "abandoned"
    hold.set()
    totals = policy.totals()["anonymous"][MODEL]
    assert totals["requests"] == 1 and totals["estimated_requests"] == 1
    assert totals["completion_tokens"] == TokenCounter("llama3").count("".join(fake.chunks[:2]))
    assert policy.readiness()["estimated_requests"] == 1


class Recorded:
    """A usage store that keeps the records and says when one arrived."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self.seen = asyncio.Event()

    def record(self, record: UsageRecord) -> None:
        self.records.append(record)
        self.seen.set()


# --- tenants, cost, metrics --------------------------------------------------------------


async def test_cost_metrics_and_readiness(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        [{"metering": {"prices": {"llama3.2:latest": {"prompt": 1e6, "completion": 2e6}}}}]
    )
    _, raw = await post(http, f"{sidecar.url}/v1/chat/completions", CHAT)
    usage = orjson.loads(raw)["usage"]
    cost = usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0
    text = await metrics_text(http, sidecar)
    labels = 'model="llama3.2:latest",tenant="anonymous"'
    assert f"ollama_sidecar_cost_total{{{labels}}} {cost}" in text
    assert (
        f'ollama_sidecar_tokens_total{{kind="prompt",{labels}}} {float(usage["prompt_tokens"])}'
        in text
    )
    assert (
        f'ollama_sidecar_tokens_total{{kind="completion",{labels}}} {float(usage["completion_tokens"])}'
        in text
    )
    assert (
        'ollama_sidecar_requests_metered_total{model="llama3.2:latest",source="upstream",'
        'tenant="anonymous"} 1.0' in text
    )
    async with http.get(f"{sidecar.url}/readyz") as response:
        detail = await response.json()
    metering = detail["policies"]["metering"]
    assert metering["requests"] == 1 and metering["cost"] == cost


def test_label_cardinality_is_bounded() -> None:
    labels = policies.metering.BoundedLabels(2)
    assert [labels(v) for v in ("a", "b", "c", "a", "d")] == ["a", "b", "other", "a", "other"]


# --- the parsers, fed byte by byte -------------------------------------------------------

USAGE_EVENT = b'data: {"id":"x","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n'
CHUNK_EVENT = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"hi \\"usage\\""}}]}\n\n'
STREAM = CHUNK_EVENT * 3 + USAGE_EVENT + b"data: [DONE]\n\n"


@pytest.mark.parametrize("step", [1, 2, 7, 64, len(STREAM)])
def test_sse_scanner_strips_usage_event_split_across_reads(step: int) -> None:
    scanner = SseUsageScanner(strip=True)
    out = b"".join(scanner.feed(STREAM[i : i + step]) for i in range(0, len(STREAM), step))
    out += scanner.finish()
    assert out == CHUNK_EVENT * 3 + b"data: [DONE]\n\n"
    assert (scanner.counts.prompt, scanner.counts.completion, scanner.counts.final) == (7, 3, True)


def test_sse_scanner_without_strip_passes_every_chunk_untouched() -> None:
    scanner = SseUsageScanner(strip=False)
    pieces = [STREAM[i : i + 5] for i in range(0, len(STREAM), 5)]
    assert [scanner.feed(piece) for piece in pieces] == pieces
    assert scanner.counts.prompt == 7 and scanner.counts.final


def test_sse_scanner_strips_completions_zero_usage_member() -> None:
    zero = b'{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'
    event = (
        b'data: {"id":"c","choices":[{"text":"a","index":0}],"model":"m","usage":' + zero + b"}\n\n"
    )
    scanner = SseUsageScanner(strip=True)
    out = b"".join(scanner.feed(bytes([b])) for b in event + USAGE_EVENT)
    assert out == b'data: {"id":"c","choices":[{"text":"a","index":0}],"model":"m"}\n\n'
    assert scanner.counts.completion == 3


def test_sse_scanner_zero_usage_alone_is_not_final() -> None:
    scanner = SseUsageScanner(strip=True)
    scanner.feed(
        b'data: {"choices":[{"text":"a"}],"usage":{"prompt_tokens":0,"completion_tokens":0}}\n\n'
    )
    assert not scanner.counts.final


def test_ndjson_last_line_split_byte_by_byte() -> None:
    lines = b'{"message":{"content":"a"},"done":false}\n{"done":true,"prompt_eval_count":5,"eval_count":2}\n'
    tracker = NdjsonLastLine()
    for b in lines:
        tracker.feed(bytes([b]))
    counts = tracker.counts()
    assert (counts.prompt, counts.completion, counts.final) == (5, 2, True)


def test_completion_text_from_partial_streams() -> None:
    assert completion_text([CHUNK_EVENT, b'data: {"choi'], "sse") == 'hi "usage"'
    ndjson = [b'{"message":{"content":"Hel"}}\n{"response":"lo"}\n{"mess']
    assert completion_text(ndjson, "ndjson") == "Hello"


async def test_tenant_from_facts_and_price_without_latest() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    from sidecar.chain import PolicyContext
    from sidecar.config import parse_settings
    from sidecar.exchange import Exchange, Reply
    from sidecar.observability import Metrics
    from sidecar.routes import ROUTES

    context = PolicyContext(settings=parse_settings({}), metrics=Metrics())
    config = validate(
        policies.metering.MeteringConfig,
        {"prices": {"llama3.2": {"prompt": 1.0, "completion": 3.0}}},
    )
    policy = Metering(config, context)
    exchange = Exchange(
        method="POST",
        route=ROUTES["/v1/chat/completions"],
        path="/v1/chat/completions",
        query_string="",
        headers=CIMultiDictProxy(CIMultiDict()),
        body=orjson.dumps(CHAT),
    )
    exchange.facts["tenant"] = "team-a"
    body = b'{"usage":{"prompt_tokens":1000000,"completion_tokens":2000000}}'

    async def upstream(exchange: Exchange) -> Reply:
        return Reply(200, CIMultiDict(), body=body)

    await policy(exchange, upstream)
    assert exchange.facts["usage"] == {
        "prompt_tokens": 1_000_000,
        "completion_tokens": 2_000_000,
        "total_tokens": 3_000_000,
        "estimated": False,
        "cost": 7.0,
    }
    assert policy.totals()["team-a"][MODEL]["cost"] == 7.0


# --- cache hits ----------------------------------------------------------------------


async def test_a_cache_hit_is_metered_as_cached_tokens_not_upstream_tokens() -> None:
    from multidict import CIMultiDict, CIMultiDictProxy

    from sidecar.chain import PolicyContext
    from sidecar.config import parse_settings
    from sidecar.exchange import Exchange, Reply
    from sidecar.observability import Metrics
    from sidecar.routes import ROUTES

    context = PolicyContext(settings=parse_settings({}), metrics=Metrics())
    config = validate(
        policies.metering.MeteringConfig,
        {"prices": {"llama3.2": {"prompt": 1.0, "completion": 3.0}}},
    )
    policy = Metering(config, context)
    exchange = Exchange(
        method="POST",
        route=ROUTES["/v1/chat/completions"],
        path="/v1/chat/completions",
        query_string="",
        headers=CIMultiDictProxy(CIMultiDict()),
        body=orjson.dumps(CHAT),
    )
    body = b'{"usage":{"prompt_tokens":1000000,"completion_tokens":2000000}}'

    async def cache(exchange: Exchange) -> Reply:
        exchange.facts["cache"] = "hit"  # what the cache policy says of its answer
        return Reply(200, CIMultiDict(), body=body)

    await policy(exchange, cache)
    assert exchange.facts["usage"] == {
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "total_tokens": 0,
        "estimated": False,
        "cost": 0.0,
        "cached": True,
        "cached_prompt_tokens": 1_000_000,
        "cached_completion_tokens": 2_000_000,
        "cached_tokens": 3_000_000,
    }
    totals = policy.totals()["anonymous"][MODEL]
    assert (totals["requests"], totals["total_tokens"], totals["cost"]) == (1, 0, 0.0)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value (0.0 when absent); labels in any order."""
    for line in text.splitlines():
        if not line.startswith(f"ollama_sidecar_{name}{{"):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(
            part.split("=", 1) for part in head[head.index("{") + 1 : -1].split(",") if part
        )
        if all(found.get(key) == f'"{want}"' for key, want in labels.items()):
            return float(value)
    return 0.0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "temperature": 0}),
        ("/v1/chat/completions", {**CHAT, "temperature": 0, "stream": True}),
        (
            "/v1/chat/completions",
            {**CHAT, "seed": 3, "stream": True, "stream_options": {"include_usage": True}},
        ),
        ("/api/chat", {**CHAT, "options": {"seed": 1}}),
        ("/api/generate", {"model": MODEL, "prompt": "hi", "options": {"temperature": 0}}),
    ],
)
async def test_metering_before_cache_counts_hits_as_cached(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
) -> None:
    sidecar = await make_sidecar([{"metering": {"prices": PRICES}}, {"cache": {"scope": "global"}}])
    metering = policy_of(sidecar)
    async with http.post(f"{sidecar.url}{path}", json=body) as response:
        assert response.headers["x-sidecar-cache"] == "miss"
        first = await response.read()
    miss = metering.memory.total.as_dict()
    assert miss["requests"] == 1 and miss["total_tokens"] > 0
    async with http.post(f"{sidecar.url}{path}", json=body) as response:
        assert response.headers["x-sidecar-cache"] == "hit"
        again = await response.read()
    # The client's bytes are what it got the first time (usage event hidden or not alike).
    assert again == first
    assert (b'"choices":[]' in first) == ("stream_options" in body)
    assert sum(1 for r in fake.requests if r.method == "POST") == 1
    after = metering.memory.total.as_dict()
    assert after["requests"] == 2
    assert (after["prompt_tokens"], after["completion_tokens"], after["cost"]) == (
        miss["prompt_tokens"],
        miss["completion_tokens"],
        miss["cost"],
    )
    text = await metrics_text(http, sidecar)
    labels = {"tenant": "anonymous", "model": MODEL}
    assert metric(text, "tokens_total", kind="cached", **labels) == miss["total_tokens"]
    assert metric(text, "tokens_total", kind="prompt", **labels) == miss["prompt_tokens"]
    assert metric(text, "requests_metered_total", source="cached", **labels) == 1.0
    assert metric(text, "requests_metered_total", source="upstream", **labels) == 1.0


async def test_metering_after_cache_sees_only_the_upstream_call(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar([{"cache": {}}, {"metering": {}}])
    body = {**CHAT, "temperature": 0}
    for expected in ("miss", "hit", "hit"):
        async with http.post(f"{sidecar.url}/v1/chat/completions", json=body) as response:
            assert response.headers["x-sidecar-cache"] == expected
            await response.read()
    totals = policy_of(sidecar).memory.total.as_dict()
    assert totals["requests"] == 1
    text = await metrics_text(http, sidecar)
    assert 'kind="cached"' not in text


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id":"x","usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}', (3, 4)),
        (b'{"usage":{"input_tokens":5,"output_tokens":6}}', (5, 6)),
        # Not the answer's last member, nested, or not an object: left to the full parse.
        (b'{"usage":{"prompt_tokens":3},"model":"m"}', None),
        (b'{"response":{"usage":{"input_tokens":1,"output_tokens":2}}}', None),
        (b'{"message":{"content":"say \\"usage\\":{}"},"done":true}', None),
        (b'{"usage":null}', None),
        (b"not json", None),
    ],
)
def test_usage_at_the_tail_is_read_without_parsing_the_whole_answer(
    body: bytes, expected: tuple[int, int] | None
) -> None:
    from policies.metering import _tail_usage

    assert _tail_usage(body) == expected
