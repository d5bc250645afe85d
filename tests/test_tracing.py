"""tracing: spans per request and per upstream attempt, continuing the client's trace."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import aiohttp
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from sidecar.app import Sidecar
from tests.conftest import SidecarFactory
from tests.fake_ollama import FakeOllama, Fault

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi there"}]}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


async def traced(
    make_sidecar: SidecarFactory, *extra: Any, **sections: Any
) -> tuple[Sidecar, InMemorySpanExporter]:
    sidecar = await make_sidecar(
        policies=[{"correlation": {}}, {"tracing": {"exporter": "none"}}, *extra], **sections
    )
    assert sidecar.runtime is not None
    tracing = dict(sidecar.runtime.policies)["tracing"]
    exporter = InMemorySpanExporter()
    tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))  # type: ignore[attr-defined]
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
