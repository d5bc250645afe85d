"""tracing: OpenTelemetry spans for each request and each upstream attempt.

One server span per request continues the client's W3C `traceparent`; a child
client span per upstream attempt (a retry or a fallback is a second child)
carries its own `traceparent` to Ollama. Spans carry the GenAI semantic
convention attributes: the model, token usage where the answer tells it, and
the time to the first chunk of a stream. Needs the `otel` extra
(`pip install 'ollama-sidecar[otel]'`); without this policy in the chain
nothing of OpenTelemetry is imported or run.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import SidecarError, StreamInterrupted
from sidecar.exchange import AttemptEnd, Exchange, Reply
from sidecar.replies import StreamEnd, WatchedChunks

_OPERATIONS = {
    "/v1/chat/completions": "chat",
    "/api/chat": "chat",
    "/v1/messages": "chat",
    "/v1/responses": "chat",
    "/v1/completions": "text_completion",
    "/api/generate": "text_completion",
    "/v1/embeddings": "embeddings",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
}


class TracingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    service_name: str = Field(
        "ollama-sidecar", min_length=1, max_length=128, description="The service.name resource."
    )
    exporter: Literal["otlp", "console", "none"] = Field(
        "otlp",
        description="Where spans go; otlp reads the standard OTEL_EXPORTER_OTLP_* variables.",
    )
    endpoint: str | None = Field(
        None,
        description="OTLP/HTTP traces endpoint; null: OTEL_EXPORTER_OTLP_ENDPOINT or the default.",
    )
    sample_ratio: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="Share of new traces kept; a sampled parent is always kept.",
    )

    @field_validator("exporter")
    @classmethod
    def _sdk_installed(cls, value: str) -> str:
        if importlib.util.find_spec("opentelemetry.sdk") is None:
            raise ValueError(
                "the tracing policy needs OpenTelemetry: pip install 'ollama-sidecar[otel]'"
            )
        return value


@register("tracing")
class Tracing:
    """Opens the request span, observes each upstream attempt, closes the span at the answer's end."""

    config_model: ClassVar[type[BaseModel]] = TracingConfig

    def __init__(self, config: TracingConfig, context: PolicyContext) -> None:
        from opentelemetry import propagate, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        self._trace = trace
        self._propagate = propagate
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": config.service_name}),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        if config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint))
            )
        elif config.exporter == "console":
            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        self.tracer = self.provider.get_tracer("ollama-sidecar")

    async def close(self) -> None:
        self.provider.shutdown()

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        trace = self._trace
        route = exchange.route.name
        operation = _OPERATIONS.get(route)
        model = exchange.model if exchange.route.json_body else None
        attributes: dict[str, Any] = {"http.request.method": exchange.method, "http.route": route}
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
            attributes["gen_ai.provider.name"] = "ollama"
        if model is not None:
            attributes["gen_ai.request.model"] = model
        name = f"{operation} {model}" if operation and model else f"{exchange.method} {route}"
        span = self.tracer.start_span(
            name,
            context=self._propagate.extract(exchange.headers),
            kind=trace.SpanKind.SERVER,
            attributes=attributes,
        )
        observers = exchange.attempt_observers or []
        observers.append(self._attempts_of(span))
        exchange.attempt_observers = observers
        started = time.perf_counter()
        try:
            reply = await call_next(exchange)
        except BaseException as error:
            status = error.status if isinstance(error, SidecarError) else None
            self._finish(span, status, error, exchange)
            raise
        span.set_attribute("http.response.status_code", reply.status)
        if reply.chunks is None:
            _usage_from_body(span, reply.body, reply.status)
            self._finish(span, reply.status, None, exchange)
            return reply
        return reply.with_chunks(self._traced(reply, span, started, exchange))

    def _attempts_of(self, parent: Any) -> Any:
        trace = self._trace

        def observe(exchange: Exchange) -> AttemptEnd:
            span = self.tracer.start_span(
                "upstream attempt",
                context=trace.set_span_in_context(parent),
                kind=trace.SpanKind.CLIENT,
                attributes={
                    "server.address": exchange.target or "default",
                    "ollama_sidecar.upstream": str(exchange.facts.get("upstream", "default")),
                    **(
                        {"gen_ai.request.model": exchange.model}
                        if exchange.route.json_body and exchange.model
                        else {}
                    ),
                },
            )
            carrier: dict[str, str] = {}
            self._propagate.inject(carrier, context=trace.set_span_in_context(span))
            for key, value in carrier.items():
                exchange.upstream_headers[key] = value

            def end(status: int | None, error: BaseException | None) -> None:
                self._finish(span, status, error, None)

            return end

        return observe

    def _traced(self, reply: Reply, span: Any, started: float, exchange: Exchange) -> WatchedChunks:
        assert reply.chunks is not None

        def first() -> None:
            span.set_attribute("gen_ai.server.time_to_first_token", time.perf_counter() - started)

        def end(how: StreamEnd, error: StreamInterrupted | None) -> None:
            usage = exchange.facts.get("usage")
            if isinstance(usage, dict):
                _set_usage(span, usage.get("prompt_tokens"), usage.get("completion_tokens"))
            if how == "abandoned":
                span.set_attribute("ollama_sidecar.client_gone", True)
            self._finish(span, reply.status, error, exchange)

        return WatchedChunks(reply.chunks, end, on_first=first)

    def _finish(
        self, span: Any, status: int | None, error: BaseException | None, exchange: Exchange | None
    ) -> None:
        trace = self._trace
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        if error is not None:
            span.record_exception(error)
            span.set_status(
                trace.Status(trace.StatusCode.ERROR, str(error) or type(error).__name__)
            )
        elif status is not None and status >= 500:
            span.set_status(trace.Status(trace.StatusCode.ERROR))
        if exchange is not None and "x-sidecar-model" in exchange.response_headers:
            span.set_attribute(
                "gen_ai.response.model", exchange.response_headers["x-sidecar-model"]
            )
        span.end()


def _usage_from_body(span: Any, body: bytes, status: int) -> None:
    """Token usage from a plain answer: OpenAI's `usage`, or Ollama's native counts."""
    if status != 200 or not body.startswith(b"{"):
        return
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if not isinstance(document, dict):
        return
    usage = document.get("usage")
    if isinstance(usage, dict):
        _set_usage(
            span,
            usage.get("prompt_tokens", usage.get("input_tokens")),
            usage.get("completion_tokens", usage.get("output_tokens")),
        )
    elif "prompt_eval_count" in document or "eval_count" in document:
        _set_usage(span, document.get("prompt_eval_count"), document.get("eval_count"))


def _set_usage(span: Any, input_tokens: Any, output_tokens: Any) -> None:
    if isinstance(input_tokens, int):
        span.set_attribute("gen_ai.usage.input_tokens", input_tokens)
    if isinstance(output_tokens, int):
        span.set_attribute("gen_ai.usage.output_tokens", output_tokens)
