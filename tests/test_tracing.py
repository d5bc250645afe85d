"""tracing: spans per request and per upstream attempt, continuing the client's trace."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import baggage, context, propagate
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from policies.tracing import _usage
from sidecar.app import Sidecar
from sidecar.exchange import Exchange
from sidecar.routes import find_route
from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama, Fault

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi there"}]}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Starting(SpanProcessor):
    """A processor that acts as spans start: the policy must leave spans to the SDK's tracer."""

    def on_start(self, span: Span, parent_context: Any = None) -> None:
        span.set_attribute("test.started", True)


async def traced(
    make_sidecar: SidecarFactory,
    *extra: Any,
    tracing_options: dict[str, Any] | None = None,
    sdk: bool = False,
    **sections: Any,
) -> tuple[Sidecar, InMemorySpanExporter]:
    """A sidecar with tracing, its finished spans in an in-memory exporter. The policy makes
    spans itself for processors that only see ends; `sdk` adds one that sees starts too."""
    options = {"exporter": "none", **(tracing_options or {})}
    sidecar = await make_sidecar(
        policies=[{"correlation": {}}, {"tracing": options}, *extra], **sections
    )
    assert sidecar.runtime is not None
    tracing = dict(sidecar.runtime.policies)["tracing"]
    exporter = InMemorySpanExporter()
    if sdk:
        tracing.provider.add_span_processor(Starting())  # type: ignore[attr-defined]
    tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
    own = tracing._lean_tracer.start_span  # type: ignore[attr-defined]
    assert (tracing._start_span == own) is not sdk  # type: ignore[attr-defined]
    return sidecar, exporter


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in spans if span.kind == kind]


async def test_a_request_continues_the_client_trace_and_each_attempt_is_a_child(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar, exporter = await traced(make_sidecar)
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}
    ) as response:
        assert response.status == 200
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (attempt,) = by_kind(spans, SpanKind.CLIENT)
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT_ID
    assert attempt.parent is not None and attempt.parent.span_id == server.context.span_id
    assert server.name == "chat llama3.2:latest"
    assert server.attributes is not None
    assert server.attributes["gen_ai.request.model"] == "llama3.2:latest"
    assert server.attributes["gen_ai.usage.input_tokens"] == 2
    assert server.attributes["gen_ai.usage.output_tokens"] == 6
    assert server.attributes["http.response.status_code"] == 200
    # Ollama sees the attempt's own span as its parent.
    sent = fake.requests[-1].headers["traceparent"]
    assert sent == f"00-{TRACE_ID}-{format(attempt.context.span_id, '016x')}-01"


async def test_a_stream_span_ends_with_the_stream_and_has_time_to_first_token(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar, exporter = await traced(make_sidecar)
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        await response.read()
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert server.attributes is not None
    ttft = server.attributes["gen_ai.server.time_to_first_token"]
    assert isinstance(ttft, float) and ttft > 0
    assert server.status.status_code != StatusCode.ERROR


async def test_fallback_attempts_are_separate_children_and_failures_are_errors(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar, exporter = await traced(
        make_sidecar, {"routing": {"fallbacks": {"llama3.2:latest": ["smollm2:latest"]}}}
    )
    fake.inject(Fault("busy"))
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
    spans = exporter.get_finished_spans()
    attempts = by_kind(spans, SpanKind.CLIENT)
    assert [span.attributes["gen_ai.request.model"] for span in attempts if span.attributes] == [
        "llama3.2:latest",
        "smollm2:latest",
    ]
    assert attempts[0].status.status_code == StatusCode.ERROR
    (server,) = by_kind(spans, SpanKind.SERVER)
    assert server.attributes is not None
    assert server.attributes["gen_ai.response.model"] == "smollm2:latest"


async def test_an_unreachable_upstream_is_an_error_span(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession, unused_tcp_port: int
) -> None:
    sidecar, exporter = await traced(
        make_sidecar, upstream_url=f"http://127.0.0.1:{unused_tcp_port}"
    )
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 502
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    assert server.status.status_code == StatusCode.ERROR
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 502


def test_without_the_policy_opentelemetry_is_never_imported() -> None:
    code = (
        "import sys, sidecar.app, sidecar.cli, policies;"
        "from sidecar.config import parse_settings; parse_settings({});"
        "print('opentelemetry' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def shape(spans: tuple[ReadableSpan, ...]) -> list[tuple[Any, ...]]:
    """All a span carries but its ids and times (and the test processor's own attribute)."""
    names = {span.context.span_id: span.name for span in spans if span.context}
    shapes = []
    for span in sorted(spans, key=lambda span: (span.start_time or 0, span.kind.value)):
        assert span.context is not None and span.start_time and span.end_time
        assert span.end_time >= span.start_time
        parent = span.parent
        attributes = dict(span.attributes or {})
        attributes.pop("test.started", None)
        if "gen_ai.server.time_to_first_token" in attributes:
            attributes["gen_ai.server.time_to_first_token"] = "set"
        events = []
        for event in span.events:
            event_attributes = dict(event.attributes or {})
            stacktrace = event_attributes.pop("exception.stacktrace")
            assert isinstance(stacktrace, str) and stacktrace.startswith("Traceback")
            events.append((event.name, event_attributes))
        scope = span.instrumentation_scope
        shapes.append(
            (
                span.name,
                span.kind,
                None if parent is None else names.get(parent.span_id, "remote"),
                parent is not None and parent.is_remote,
                span.context.is_remote,
                int(span.context.trace_flags),
                dict(span.context.trace_state or {}),
                attributes,
                span.status.status_code,
                span.status.description,
                events,
                dict(span.resource.attributes),
                None if scope is None else (scope.name, scope.version, scope.schema_url),
                (span.dropped_attributes, span.dropped_events, span.dropped_links),
            )
        )
    return shapes


async def spans_of_each_kind_of_request(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    unused_tcp_port: int,
    sdk: bool,
) -> list[list[tuple[Any, ...]]]:
    found = []
    sidecar, exporter = await traced(
        make_sidecar,
        {"routing": {"fallbacks": {"llama3.2:latest": ["smollm2:latest"]}}},
        sdk=sdk,
    )
    headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=value"}
    calls: list[tuple[str, dict[str, Any], Fault | None]] = [
        ("/v1/chat/completions", CHAT, None),
        ("/v1/chat/completions", {**CHAT, "stream": True}, None),
        ("/api/chat", CHAT, None),
        ("/api/chat", {**CHAT, "stream": False}, Fault("busy")),
        ("/api/chat", CHAT, Fault("reset_after", after_chunks=2)),
        ("/v1/embeddings", {"model": "nomic-embed-text:latest", "input": "hi"}, None),
    ]
    for path, body, fault in calls:
        if fault is not None:
            fake.inject(fault)
        async with http.post(f"{sidecar.url}{path}", json=body, headers=headers) as response:
            await response.read()
        found.append(shape(exporter.get_finished_spans()))
        exporter.clear()
    async with http.get(f"{sidecar.url}/api/tags") as response:
        await response.read()
    found.append(shape(exporter.get_finished_spans()))
    sidecar, exporter = await traced(
        make_sidecar, sdk=sdk, upstream_url=f"http://127.0.0.1:{unused_tcp_port}"
    )
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        await response.read()
    found.append(shape(exporter.get_finished_spans()))
    return found


async def test_the_policy_s_own_spans_carry_all_the_sdk_s_would(
    make_sidecar: SidecarFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    unused_tcp_port: int,
) -> None:
    lean = await spans_of_each_kind_of_request(make_sidecar, fake, http, unused_tcp_port, False)
    sdk = await spans_of_each_kind_of_request(make_sidecar, fake, http, unused_tcp_port, True)
    assert lean == sdk
    plain, stream, native, fallback, cut, embed, tags, unreachable = lean
    assert [(span[0], span[1], span[2]) for span in plain] == [
        ("chat llama3.2:latest", SpanKind.SERVER, "remote"),
        ("upstream attempt", SpanKind.CLIENT, "chat llama3.2:latest"),
    ]
    server, attempt = plain
    assert server[6] == attempt[6] == {"vendor": "value"}  # the client's tracestate goes on
    assert server[7] == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "ollama",
        "gen_ai.request.model": "llama3.2:latest",
        "http.response.status_code": 200,
        "gen_ai.usage.input_tokens": 2,
        "gen_ai.usage.output_tokens": 6,
        "gen_ai.response.model": "llama3.2:latest",
    }
    assert attempt[7] == {
        "server.address": "default",
        "ollama_sidecar.upstream": "default",
        "gen_ai.request.model": "llama3.2:latest",
        "http.response.status_code": 200,
    }
    assert server[11]["service.name"] == "ollama-sidecar"
    assert server[12] is not None and server[12][0] == "ollama-sidecar"
    assert "gen_ai.server.time_to_first_token" in stream[0][7]
    assert "gen_ai.server.time_to_first_token" in native[0][7]
    # A fallback: two attempts under the one server span, the first an error.
    assert [span[1] for span in fallback] == [SpanKind.SERVER, SpanKind.CLIENT, SpanKind.CLIENT]
    assert fallback[1][8] == StatusCode.ERROR and fallback[2][8] == StatusCode.UNSET
    assert fallback[0][7]["gen_ai.response.model"] == "smollm2:latest"
    # A stream cut short: the request's span is an error with the exception as an event.
    assert cut[0][8] == StatusCode.ERROR
    assert [event[0] for event in cut[0][10]] == ["exception"]
    assert embed[0][0] == "embeddings nomic-embed-text:latest"
    # A route that runs no model: the span is named by method and route, no GenAI attributes.
    assert tags[0][0] == "GET /api/tags" and tags[0][7]["http.route"] == "/api/tags"
    assert not any(key.startswith("gen_ai.") for key in tags[0][7])
    assert (
        unreachable[0][8] == StatusCode.ERROR
        and unreachable[0][7]["http.response.status_code"] == 502
    )
    assert unreachable[1][10] and unreachable[1][10][0][0] == "exception"


@pytest.mark.parametrize("sdk", [False, True], ids=["own", "sdk"])
async def test_a_request_sampled_out_records_nothing_but_ollama_still_gets_the_trace(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession, sdk: bool
) -> None:
    sidecar, exporter = await traced(make_sidecar, tracing_options={"sample_ratio": 0}, sdk=sdk)
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
    assert exporter.get_finished_spans() == ()
    version, trace_id, span_id, flags = fake.requests[-1].headers["traceparent"].split("-")
    assert version == "00" and int(trace_id, 16) and int(span_id, 16)
    assert not int(flags, 16) & 1
    # A client's unsampled trace is continued, unsampled.
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"
    async with http.post(
        f"{sidecar.url}/api/chat", json=CHAT, headers={"traceparent": unsampled}
    ) as response:
        await response.read()
    assert exporter.get_finished_spans() == ()
    _, trace_id, span_id, flags = fake.requests[-1].headers["traceparent"].split("-")
    assert trace_id == TRACE_ID and span_id != PARENT_ID and not int(flags, 16) & 1
    # A client's sampled trace is kept whatever the ratio.
    async with http.post(
        f"{sidecar.url}/v1/chat/completions", json=CHAT, headers={"traceparent": TRACEPARENT}
    ) as response:
        assert response.status == 200
    spans = exporter.get_finished_spans()
    assert {span.kind for span in spans} == {SpanKind.SERVER, SpanKind.CLIENT}
    assert {format(span.context.trace_id, "032x") for span in spans} == {TRACE_ID}


async def test_a_processor_that_acts_at_the_start_gets_the_sdk_s_spans(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar, exporter = await traced(make_sidecar, sdk=True)
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
    spans = exporter.get_finished_spans()
    assert len(spans) == 2
    assert all(span.attributes and span.attributes["test.started"] for span in spans)


async def test_plain_usage_is_metering_s_when_it_counted_it(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar, exporter = await traced(make_sidecar, {"metering": {}})
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert server.attributes is not None
    assert server.attributes["gen_ai.usage.input_tokens"] == 2
    assert server.attributes["gen_ai.usage.output_tokens"] == 6
    # A stream's usage is metering's at the stream's end (metering's stream is wrapped).
    exporter.clear()
    async with http.post(f"{sidecar.url}/api/chat", json=CHAT) as response:
        await response.read()
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert server.attributes is not None
    assert server.attributes["gen_ai.usage.input_tokens"] == 2
    assert server.attributes["gen_ai.usage.output_tokens"] == 6
    ttft = server.attributes["gen_ai.server.time_to_first_token"]
    assert isinstance(ttft, float) and ttft > 0


async def test_without_a_processor_spans_go_nowhere_and_ollama_still_gets_the_trace(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=[{"tracing": {"exporter": "none"}}])
    for stream in (False, True):
        async with http.post(
            f"{sidecar.url}/api/chat",
            json={**CHAT, "stream": stream},
            headers={"traceparent": TRACEPARENT},
        ) as response:
            assert response.status == 200
            await response.read()
        _, trace_id, span_id, flags = fake.requests[-1].headers["traceparent"].split("-")
        assert trace_id == TRACE_ID and span_id != PARENT_ID and int(flags, 16) & 1


def test_plain_usage_comes_from_metering_s_facts_else_from_the_body() -> None:
    match = find_route("/v1/chat/completions")
    assert match is not None
    body = b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}'

    def usage(facts: dict[str, Any], status: int = 200) -> dict[str, Any]:
        exchange = Exchange("POST", match.route, match.upstream_path, "", None, b"{}")  # type: ignore[arg-type]
        exchange.facts.update(facts)
        found: dict[str, Any] = {}
        _usage(exchange, body, status, found)
        return found

    counted = {"prompt_tokens": 5, "completion_tokens": 6, "estimated": False}
    assert usage({}) == {"gen_ai.usage.input_tokens": 3, "gen_ai.usage.output_tokens": 4}
    assert usage({}, status=500) == {}
    assert usage({"usage": counted}) == {
        "gen_ai.usage.input_tokens": 5,
        "gen_ai.usage.output_tokens": 6,
    }
    # Estimated: the answer told no usage. A cache hit: the tokens the answer tells.
    assert usage({"usage": {**counted, "estimated": True}}) == {}
    cached = {
        **counted,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached": True,
        "cached_prompt_tokens": 7,
        "cached_completion_tokens": 8,
    }
    assert usage({"usage": cached}) == {
        "gen_ai.usage.input_tokens": 7,
        "gen_ai.usage.output_tokens": 8,
    }


@pytest.mark.parametrize("sdk", [False, True], ids=["own", "sdk"])
async def test_the_sdk_s_attribute_limits_hold(
    make_sidecar: SidecarFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    sdk: bool,
) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "5")
    sidecar, exporter = await traced(make_sidecar, sdk=sdk)
    async with http.post(f"{sidecar.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert server.attributes is not None
    assert server.attributes["gen_ai.usage.output_tokens"] == 6
    assert server.attributes.get("gen_ai.request.model") in (None, "llam")
    assert all(len(value) <= 4 for value in server.attributes.values() if isinstance(value, str))
    assert len(server.attributes) == 5 and server.dropped_attributes > 0


async def test_the_policy_propagates_as_opentelemetry_s_propagators_do(
    make_sidecar: SidecarFactory,
) -> None:
    sidecar = await make_sidecar(policies=[{"tracing": {"exporter": "none"}}])
    assert sidecar.runtime is not None
    tracing: Any = dict(sidecar.runtime.policies)["tracing"]

    def injected(span: NonRecordingSpan) -> dict[str, str]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=set_span_in_context(span))
        return carrier

    def headers(**values: str) -> CIMultiDictProxy[str]:
        return CIMultiDictProxy(CIMultiDict(values))

    def seen(found: Any) -> tuple[Any, ...]:
        return (
            get_current_span(found).get_span_context(),
            dict(baggage.get_all(found)),
            len(found),
        )

    state = TraceState([("vendor", "value")])
    spans = [
        NonRecordingSpan(SpanContext(int(TRACE_ID, 16), 7, False, TraceFlags(flags), trace_state))
        for flags, trace_state in ((1, None), (0, state), (3, state))
    ]
    other = propagate.get_global_textmap()
    for textmap in (other, TraceContextTextMapPropagator()):
        propagate.set_global_textmap(textmap)
        try:
            assert tracing._w3c_only() is (textmap is other)
            for span in spans:
                assert tracing._carrier(span) == injected(span)
            token = context.attach(baggage.set_baggage("tenant", "bench"))
            try:
                expected = injected(spans[0])
                assert ("baggage" in expected) is (textmap is other)
                assert tracing._carrier(spans[0]) == expected
            finally:
                context.detach(token)
            for carrier in (
                headers(),
                headers(traceparent=TRACEPARENT),
                headers(Traceparent=TRACEPARENT, tracestate="vendor=value"),
                headers(baggage="tenant=bench"),
            ):
                assert seen(tracing._context_of(carrier)) == seen(propagate.extract(carrier))
        finally:
            propagate.set_global_textmap(other)
