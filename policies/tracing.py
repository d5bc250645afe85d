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
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import orjson

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import SidecarError, StreamInterrupted
from sidecar.exchange import AttemptEnd, AttemptObserver, Exchange, Reply
from sidecar.knobs import STRICT, AfterValidator, Field
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

# (method, route) pairs whose span name and attributes are kept worked out.
_ROUTES_KEPT = 256


def _sdk_installed(value: str) -> str:
    """Spans need the SDK: say so when the config is checked, not with an ImportError at start."""
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        raise ValueError(
            "the tracing policy needs OpenTelemetry: pip install 'ollama-sidecar[otel]'"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class TracingConfig:
    __pydantic_config__ = STRICT

    service_name: Annotated[
        str, Field(min_length=1, max_length=128, description="The service.name resource.")
    ] = "ollama-sidecar"
    exporter: Annotated[
        Literal["otlp", "console", "none"],
        AfterValidator(_sdk_installed),
        Field(
            description="Where spans go; otlp reads the standard OTEL_EXPORTER_OTLP_* variables."
        ),
    ] = "otlp"
    endpoint: Annotated[
        str | None,
        Field(
            description="OTLP/HTTP traces endpoint; null: OTEL_EXPORTER_OTLP_ENDPOINT or the default."
        ),
    ] = None
    sample_ratio: Annotated[
        float,
        Field(
            ge=0.0,
            le=1.0,
            description="Share of new traces kept; a sampled parent is always kept.",
        ),
    ] = 1.0


@register("tracing")
class Tracing:
    """Opens the request span, observes each upstream attempt, closes the span at the answer's end."""

    config_model: ClassVar[type[Any]] = TracingConfig

    def __init__(self, config: TracingConfig, context: PolicyContext) -> None:
        from opentelemetry import baggage, propagate, trace
        from opentelemetry.context import Context
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        lean = _lean()
        ratio = TraceIdRatioBased(config.sample_ratio)
        sampler = ParentBased(ratio)
        self.provider = lean.Provider(
            resource=Resource.create({"service.name": config.service_name}), sampler=sampler
        )
        self.tracer = self.provider.get_tracer("ollama-sidecar")
        self._lean_tracer = lean.Tracer(self.tracer, sampler, ratio)
        self._start_span: Callable[..., Any] = self.tracer.start_span
        self.provider.on_processors = self._processors_changed
        self._processors_changed(())
        if config.exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(
                BatchSpanProcessor(OTLPSpanExporter(endpoint=config.endpoint))
            )
        elif config.exporter == "console":
            self.provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        # With exporter "none" spans are still made, sampled and ended; a span processor
        # added to `provider` later sees them. Only no exporter is attached.
        self._extract = propagate.extract
        self._inject = propagate.inject
        self._textmap = propagate.get_global_textmap
        self._baggage = baggage.get_all
        self._empty = Context()
        self._checked_textmap: Any = None
        self._w3c = False
        self._in_context = trace.set_span_in_context
        self._invalid = trace.INVALID_SPAN_CONTEXT
        self._server = trace.SpanKind.SERVER
        self._client = trace.SpanKind.CLIENT
        self._status = trace.Status
        self._error_code = trace.StatusCode.ERROR
        self._error = trace.Status(trace.StatusCode.ERROR)
        self._routes: dict[tuple[str, str], _RouteSpan] = {}

    def _processors_changed(self, processors: tuple[Any, ...]) -> None:
        """Spans made here when every processor ignores on_start; by the SDK's tracer otherwise."""
        lean = self._lean_tracer
        lean.processors = processors
        self._start_span = lean.start_span if lean.fits(processors) else self.tracer.start_span

    async def close(self) -> None:
        self.provider.shutdown()

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        route = exchange.route
        key = (exchange.method, route.name)
        known = self._routes.get(key)
        if known is None:
            known = _RouteSpan(*key)
            if len(self._routes) < _ROUTES_KEPT:
                self._routes[key] = known
        attributes = dict(known.attributes)
        model = exchange.model if route.json_body else None
        if model is not None:
            attributes["gen_ai.request.model"] = model
        span = self._start_span(
            f"{known.operation} {model}" if known.operation and model else known.name,
            context=self._context_of(exchange.headers),
            kind=self._server,
            attributes=attributes,
        )
        if not span.is_recording():
            # Sampled out: nothing is recorded, but Ollama still gets the trace's context.
            _add_observer(exchange, _Unsampled(self, span).observe)
            return await call_next(exchange)
        request = _Traced(self, span)
        _add_observer(exchange, request.observe)
        try:
            reply = await call_next(exchange)
        except BaseException as error:
            status = error.status if isinstance(error, SidecarError) else None
            self._finish(span, status, error, _response_model(exchange.response_headers, {}))
            raise
        chunks = reply.chunks
        if chunks is None:
            attributes = {"http.response.status_code": reply.status}
            _usage(exchange, reply.body, reply.status, attributes)
            last = _response_model(exchange.response_headers, attributes)
            self._finish(span, reply.status, None, last)
            return reply
        # What the stream's end reads, not the exchange itself: the exchange holds this
        # request's observer, and a cycle would wait for the garbage collector.
        request.facts = exchange.facts
        request.response_headers = exchange.response_headers
        request.status = reply.status
        if isinstance(chunks, WatchedChunks) and chunks.on_first(request.first):
            # Join the stream the steps after this one already watch: no wrapper, no
            # extra call per chunk.
            chunks.watch(request.end)
            return reply
        return reply.with_chunks(WatchedChunks(chunks, request.end, on_first=request.first))

    def _w3c_only(self) -> bool:
        """Whether the global propagator is OpenTelemetry's default: W3C trace context, then
        W3C baggage (OTEL_PROPAGATORS unset), whose work the two methods below do inline."""
        textmap = self._textmap()
        if textmap is not self._checked_textmap:
            from opentelemetry.baggage.propagation import W3CBaggagePropagator
            from opentelemetry.propagators.composite import CompositePropagator
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            kinds = [type(each) for each in getattr(textmap, "_propagators", ())]
            self._w3c = isinstance(textmap, CompositePropagator) and kinds == [
                TraceContextTextMapPropagator,
                W3CBaggagePropagator,
            ]
            self._checked_textmap = textmap
        return self._w3c

    def _context_of(self, headers: Any) -> Any:
        """The client's trace context: propagate.extract, skipped when there is none to read."""
        if self._w3c_only() and "traceparent" not in headers and "baggage" not in headers:
            return self._empty  # what extract gives for no header: an empty context
        return self._extract(headers)

    def _carrier(self, span: Any) -> dict[str, str]:
        """The headers that carry `span`'s context upstream: what propagate.inject writes."""
        if not self._w3c_only() or self._baggage():
            carrier: dict[str, str] = {}
            self._inject(carrier, context=self._in_context(span))
            return carrier
        context = span.get_span_context()
        if context == self._invalid:
            return {}
        carrier = {
            "traceparent": f"00-{context.trace_id:032x}-{context.span_id:016x}"
            f"-{context.trace_flags:02x}"
        }
        if context.trace_state:
            carrier["tracestate"] = context.trace_state.to_header()
        return carrier

    def _finish(
        self,
        span: Any,
        status: int | None,
        error: BaseException | None,
        attributes: dict[str, Any],
    ) -> None:
        """Sets the span's last attributes in one call, its status, and ends it."""
        if status is not None:
            attributes["http.response.status_code"] = status
        if attributes:
            span.set_attributes(attributes)
        if error is not None:
            span.record_exception(error)
            span.set_status(self._status(self._error_code, str(error) or type(error).__name__))
        elif status is not None and status >= 500:
            span.set_status(self._error)
        span.end()


class _RouteSpan:
    """What a request's span takes from its method and route alone, worked out once."""

    __slots__ = ("attributes", "name", "operation")

    def __init__(self, method: str, route: str) -> None:
        self.operation = _OPERATIONS.get(route)
        self.name = f"{method} {route}"
        self.attributes: dict[str, Any] = {"http.request.method": method, "http.route": route}
        if self.operation is not None:
            self.attributes["gen_ai.operation.name"] = self.operation
            self.attributes["gen_ai.provider.name"] = "ollama"


class _Traced:
    """One sampled request: its server span, its attempts' client spans, its stream's end."""

    __slots__ = (
        "facts",
        "first_token",
        "policy",
        "response_headers",
        "span",
        "started",
        "status",
    )

    def __init__(self, policy: Tracing, span: Any) -> None:
        self.policy = policy
        self.span = span
        self.started = time.perf_counter()
        self.first_token: float | None = None
        self.facts: dict[str, Any] = {}
        self.response_headers: Mapping[str, str] = {}
        self.status = 0

    def observe(self, exchange: Exchange) -> AttemptEnd:
        """An AttemptObserver: a client span per attempt, its context sent to Ollama."""
        policy = self.policy
        attributes: dict[str, Any] = {
            "server.address": exchange.target or "default",
            "ollama_sidecar.upstream": str(exchange.facts.get("upstream", "default")),
        }
        if exchange.route.json_body:
            model = exchange.model
            if model:
                attributes["gen_ai.request.model"] = model
        span = policy._start_span(
            "upstream attempt",
            context=policy._in_context(self.span),
            kind=policy._client,
            attributes=attributes,
        )
        exchange.upstream_headers.update(policy._carrier(span))

        def end(status: int | None, error: BaseException | None) -> None:
            policy._finish(span, status, error, {})

        return end

    def first(self) -> None:
        self.first_token = time.perf_counter() - self.started

    def end(self, how: StreamEnd, error: StreamInterrupted | None) -> None:
        attributes: dict[str, Any] = {}
        if self.first_token is not None:
            attributes["gen_ai.server.time_to_first_token"] = self.first_token
        usage = self.facts.get("usage")
        if isinstance(usage, dict):
            _put_usage(attributes, usage.get("prompt_tokens"), usage.get("completion_tokens"))
        if how == "abandoned":
            attributes["ollama_sidecar.client_gone"] = True
        last = _response_model(self.response_headers, attributes)
        self.policy._finish(self.span, self.status, error, last)


class _Unsampled:
    """A request sampled out: each attempt only carries the trace's context to Ollama."""

    __slots__ = ("carrier", "policy", "span")

    def __init__(self, policy: Tracing, span: Any) -> None:
        self.policy = policy
        self.span = span
        self.carrier: dict[str, str] | None = None

    def observe(self, exchange: Exchange) -> AttemptEnd:
        if self.carrier is None:
            self.carrier = self.policy._carrier(self.span)
        exchange.upstream_headers.update(self.carrier)
        return _ignore


def _ignore(status: int | None, error: BaseException | None) -> None:
    """The end of an attempt of a request that is not sampled."""


def _add_observer(exchange: Exchange, observer: AttemptObserver) -> None:
    observers = exchange.attempt_observers
    if observers is None:
        exchange.attempt_observers = [observer]
    else:
        observers.append(observer)


def _response_model(headers: Mapping[str, str], attributes: dict[str, Any]) -> dict[str, Any]:
    """`attributes` with the model that answered, if routing named it."""
    model = headers.get("x-sidecar-model")
    if model is not None:
        attributes["gen_ai.response.model"] = model
    return attributes


def _usage(exchange: Exchange, body: bytes, status: int, attributes: dict[str, Any]) -> None:
    """Token usage of a plain answer: what `metering` found in it, else read from the body."""
    if status != 200:
        return
    usage = exchange.facts.get("usage")
    if isinstance(usage, dict):
        if usage.get("estimated"):
            return  # the answer told no usage: metering estimated it
        if usage.get("cached"):
            # A cache hit used no upstream tokens; the answer tells those it represents.
            _put_usage(
                attributes, usage.get("cached_prompt_tokens"), usage.get("cached_completion_tokens")
            )
        else:
            _put_usage(attributes, usage.get("prompt_tokens"), usage.get("completion_tokens"))
        return
    _usage_from_body(body, attributes)


def _usage_from_body(body: bytes, attributes: dict[str, Any]) -> None:
    """Token usage from a plain answer: OpenAI's `usage`, or Ollama's native counts."""
    if not body.startswith(b"{"):
        return
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return
    if not isinstance(document, dict):
        return
    usage = document.get("usage")
    if isinstance(usage, dict):
        _put_usage(
            attributes,
            usage.get("prompt_tokens", usage.get("input_tokens")),
            usage.get("completion_tokens", usage.get("output_tokens")),
        )
    elif "prompt_eval_count" in document or "eval_count" in document:
        _put_usage(attributes, document.get("prompt_eval_count"), document.get("eval_count"))


def _put_usage(attributes: dict[str, Any], input_tokens: Any, output_tokens: Any) -> None:
    if isinstance(input_tokens, int):
        attributes["gen_ai.usage.input_tokens"] = input_tokens
    if isinstance(output_tokens, int):
        attributes["gen_ai.usage.output_tokens"] = output_tokens


_LEAN: Any = None


def _lean() -> Any:
    """The classes below, made once, on first use (they subclass OpenTelemetry's)."""
    global _LEAN
    if _LEAN is None:
        _LEAN = _make_lean()
    return _LEAN


def _make_lean() -> Any:
    """The SDK's `Tracer.start_span` makes a span with three locks, two bounded lists and
    a cleaning pass over every attribute, some 10 us a span, and a request has two. When
    every span processor on the provider ignores `on_start` (the SDK's batch and simple
    processors; none at all with `exporter: none`), the policy makes the same spans
    itself with `Tracer` below: the policy's sampler decides (worked out inline), the
    provider's id generator numbers, and at the end the provider's processors get,
    through `on_end`, the `ReadableSpan` the SDK would have built: same name, ids, flags,
    parent, kind, attributes, events, status, times, resource and scope (tests/
    test_tracing.py compares the two). Any other processor, the SDK's self-metrics or
    OTEL_SDK_DISABLED get the SDK's tracer as it is.
    """
    from types import SimpleNamespace

    from opentelemetry import trace
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import (
        Event,
        ReadableSpan,
        SpanLimits,
        SpanProcessor,
        TracerProvider,
    )
    from opentelemetry.sdk.trace import Tracer as SdkTracer
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
    from opentelemetry.sdk.util import BoundedList
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    get_current_span = trace.get_current_span
    SpanContext = trace.SpanContext
    TraceFlags = trace.TraceFlags
    NonRecordingSpan = trace.NonRecordingSpan
    SAMPLED = TraceFlags.SAMPLED
    RANDOM = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)  # SDKs before the W3C level 2 flag: none
    FLAGS = {
        (sampled, random): TraceFlags((SAMPLED if sampled else 0) | (RANDOM if random else 0))
        for sampled in (False, True)
        for random in (False, True)
    }
    LOW_64 = TraceIdRatioBased.TRACE_ID_LIMIT
    UNSET = trace.Status(trace.StatusCode.UNSET)
    OK, UNSET_CODE = trace.StatusCode.OK, trace.StatusCode.UNSET
    time_ns = time.time_ns
    # Processors whose on_start (and _on_ending, where the SDK has it) do nothing.
    quiet = (SpanProcessor, SimpleSpanProcessor, BatchSpanProcessor)
    quiet_starts = {cls.on_start for cls in quiet}
    quiet_endings = {getattr(cls, "_on_ending", None) for cls in quiet}

    class Provider(TracerProvider):
        """The SDK's provider, telling the policy which span processors it has."""

        on_processors: Callable[[tuple[Any, ...]], None] | None = None
        _processors: tuple[Any, ...] = ()

        def add_span_processor(self, span_processor: Any) -> None:
            super().add_span_processor(span_processor)
            self._processors = (*self._processors, span_processor)
            if self.on_processors is not None:
                self.on_processors(self._processors)

    class Tracer:
        """Makes spans as the SDK's `Tracer.start_span` does, for processors that only `on_end`."""

        def __init__(self, tracer: Any, sampler: Any, ratio: Any) -> None:
            self.tracer = tracer
            self.processors: tuple[Any, ...] = ()
            # The policy's own sampler, ParentBased(ratio) with the default delegates, is
            # worked out here in a few lines: a parent's sampled flag, else the trace id's low
            # 64 bits under the ratio's bound (what its should_sample works out, and all it
            # gives: the parent's trace state, the attributes as they are).
            self.own_sampler = getattr(tracer, "sampler", None) is sampler
            self.bound: int = ratio.bound
            ids: Any = getattr(tracer, "id_generator", None)
            self.trace_id: Any = ids.generate_trace_id if ids is not None else None
            self.span_id: Any = ids.generate_span_id if ids is not None else None
            self.random_ids = bool(getattr(ids, "is_trace_id_random", bool)())
            self.limits = SpanLimits()
            # Below these limits the SDK's cleaning leaves this policy's values as they are
            # (str, int, float, bool; at most a dozen keys): the attributes go as a dict.
            self.plain = self.limits.max_span_attribute_length is None and (
                self.limits.max_span_attributes is None or self.limits.max_span_attributes >= 32
            )
            # The tracer's scope and (deprecated) info, as its spans carry them.
            self.scope = getattr(tracer, "_instrumentation_scope", None)
            self.info = getattr(tracer, "instrumentation_info", None)

        def fits(self, processors: tuple[Any, ...]) -> bool:
            """Whether the spans made here are all the SDK's would be, to these processors."""
            tracer = self.tracer
            if not isinstance(tracer, SdkTracer):  # OTEL_SDK_DISABLED: the SDK's no-op tracer
                return False
            if not self.own_sampler or self.span_id is None or self.trace_id is None:
                return False
            if not isinstance(self.scope, InstrumentationScope):
                return False
            enabled = getattr(tracer, "_is_enabled", None)
            if enabled is not None and not enabled():
                return False
            flag = os.environ.get("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "")
            if flag.strip().lower() == "true":
                return False
            return all(
                type(processor).on_start in quiet_starts
                and getattr(type(processor), "_on_ending", None) in quiet_endings
                for processor in processors
            )

        def start_span(
            self,
            name: str,
            context: Any = None,
            kind: Any = trace.SpanKind.INTERNAL,
            attributes: Mapping[str, Any] | None = None,
        ) -> Any:
            parent: Any = get_current_span(context).get_span_context()
            random: Any
            if parent is None or not parent.is_valid:
                parent = None
                trace_id = self.trace_id()
                random = self.random_ids
            else:
                trace_id = parent.trace_id
                random = parent.trace_flags & RANDOM
            if parent is None:
                sampled = trace_id & LOW_64 < self.bound
                trace_state = None
            else:
                sampled = parent.trace_flags.sampled
                trace_state = parent.trace_state
            span_context = SpanContext(
                trace_id,
                self.span_id(),
                is_remote=False,
                trace_flags=FLAGS[bool(sampled), bool(random)],
                trace_state=trace_state,
            )
            if not sampled:
                return NonRecordingSpan(span_context)
            return Span(self, name, span_context, parent, kind, dict(attributes or ()))

    class Span(trace.Span):
        """A recording span until `end`, which hands processors the SDK's ReadableSpan."""

        __slots__ = (
            "_attributes",
            "_context",
            "_end_time",
            "_events",
            "_kind",
            "_name",
            "_parent",
            "_start_time",
            "_status",
            "_tracer",
        )

        def __init__(
            self,
            tracer: Tracer,
            name: str,
            context: Any,
            parent: Any,
            kind: Any,
            attributes: dict[str, Any],
        ) -> None:
            self._tracer = tracer
            self._name = name
            self._context = context
            self._parent = parent
            self._kind = kind
            self._attributes = attributes
            self._events: list[Any] | None = None
            self._status = UNSET
            self._start_time = time_ns()
            self._end_time: int | None = None

        def get_span_context(self) -> Any:
            return self._context

        def is_recording(self) -> bool:
            return self._end_time is None

        def set_attributes(self, attributes: Mapping[str, Any]) -> None:
            if self._end_time is None:
                self._attributes.update(attributes)

        def set_attribute(self, key: str, value: Any) -> None:
            if self._end_time is None:
                self._attributes[key] = value

        def update_name(self, name: str) -> None:
            if self._end_time is None:
                self._name = name

        def add_event(
            self, name: str, attributes: Any = None, timestamp: int | None = None
        ) -> None:
            if self._end_time is not None:
                return
            limits = self._tracer.limits
            event = Event(
                name,
                BoundedAttributes(
                    limits.max_event_attributes,
                    attributes,
                    max_value_len=limits.max_attribute_length,
                    immutable=True,
                ),
                timestamp,
            )
            if self._events is None:
                self._events = []
            self._events.append(event)

        def record_exception(
            self,
            exception: BaseException,
            attributes: Any = None,
            timestamp: int | None = None,
            escaped: bool = False,
        ) -> None:
            """The SDK's exception event."""
            module = type(exception).__module__
            qualname = type(exception).__qualname__
            found = {
                "exception.type": f"{module}.{qualname}"
                if module and module != "builtins"
                else qualname,
                "exception.message": str(exception),
                "exception.stacktrace": "".join(traceback.format_exception(exception)),
                "exception.escaped": str(escaped),
            }
            if attributes:
                found.update(attributes)
            self.add_event("exception", found, timestamp)

        def set_status(self, status: Any, description: str | None = None) -> None:
            if self._end_time is not None:
                return
            if not isinstance(status, trace.Status):
                status = trace.Status(status, description)
            if self._status.status_code is OK or status.status_code is UNSET_CODE:
                return
            self._status = status

        def end(self, end_time: int | None = None) -> None:
            if self._end_time is not None:
                return
            self._end_time = end_time if end_time is not None else time_ns()
            tracer = self._tracer
            processors = tracer.processors
            if not processors:
                return  # nothing would see the span
            limits = tracer.limits
            attributes: Any = self._attributes
            if not tracer.plain:
                attributes = BoundedAttributes(
                    limits.max_span_attributes,
                    attributes,
                    max_value_len=limits.max_span_attribute_length,
                )
            readable = ReadableSpan(
                name=self._name,
                context=self._context,
                parent=self._parent,
                resource=tracer.tracer.resource,
                attributes=attributes,
                events=BoundedList.from_seq(limits.max_events, self._events)
                if self._events
                else (),
                kind=self._kind,
                instrumentation_info=tracer.info,
                status=self._status,
                start_time=self._start_time,
                end_time=self._end_time,
                instrumentation_scope=tracer.scope,
            )
            tracer.tracer.span_processor.on_end(readable)

    return SimpleNamespace(Provider=Provider, Tracer=Tracer, Span=Span)
