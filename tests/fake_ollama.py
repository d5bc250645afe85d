"""A fake Ollama server that the sidecar's tests run against.

It exists because the sidecar's hard cases (a stream cut halfway, a 503 from a
full queue, a connection closed while the pool reuses it) cannot be produced on
demand by a real Ollama. It follows /work/shared/ollama-compat.md and Ollama's
own source (server/routes.go, middleware/openai.go, openai/openai.go,
anthropic/anthropic.go) byte for byte where a proxy could notice: compact Go-style
JSON, NDJSON versus SSE, which fields appear in which chunk, error shapes per
route family, and ids that collide.

It is served by aiohttp's low-level ``web.Server`` rather than a
``web.Application`` so that every accepted TCP connection can be counted (a
proxy's keep-alive pool is observable only that way), and with
``handler_cancellation`` on so that a client hanging up is noticed at once,
as Ollama notices it through Go's request context.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import os
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson
from aiohttp import web
from multidict import CIMultiDict

__all__ = [
    "BUSY_MESSAGE",
    "DEFAULT_CHUNKS",
    "DEFAULT_MODELS",
    "GARBAGE",
    "FakeOllama",
    "Fault",
    "FaultKind",
    "RecordedRequest",
    "not_found_message",
]

DEFAULT_MODELS = ("llama3.2:latest", "nomic-embed-text:latest", "smollm2:latest")
DEFAULT_CHUNKS = ("Hello", " from", " the", " fake", " Ollama", ".")
VERSION = "0.12.0"
# Copied from Ollama's server/sched.go (ErrMaxQueue), two spaces included.
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
GARBAGE = b"%%% not json {"
EMBEDDING_DIMENSIONS = 8
MODIFIED_AT = datetime(2026, 11, 1, 12, 0, 0, tzinfo=UTC)

NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"
# gin's c.JSON adds the charset; Ollama's /v1 and Anthropic writers set the bare type.
NATIVE_JSON = "application/json; charset=utf-8"
COMPAT_JSON = "application/json"

FaultKind = Literal[
    "status",
    "busy",
    "delay_headers",
    "reset_after",
    "end_without_done",
    "close_before_response",
    "garbage_after",
]
_Shape = Literal["api", "openai", "anthropic"]

# The routes that run a model: only these consume an injected fault, so a test
# can inject one and still let the proxy's health checks and model listings by.
GENERATION_PATHS = frozenset(
    {
        "/api/chat",
        "/api/generate",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/messages",
    }
)


@dataclass
class Fault:
    """One misbehaviour, spent by the next generation request.

    ``after_chunks`` counts content chunks, so a test can say "the client has
    seen exactly one piece of text when the upstream dies".
    """

    kind: FaultKind
    status: int = 500
    message: str = "boom"
    after_chunks: int = 1
    delay: float = 0.0
    release: asyncio.Event | None = None
    # Extra response headers for kind="status"/"busy", e.g. {"Retry-After": "1"}.
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RecordedRequest:
    """What the fake received, kept so tests can count attempts and check headers."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes
    json: Any


def not_found_message(model: str) -> str:
    """Ollama formats the name with Go's %q; JSON string quoting matches it for names."""
    return f"model {orjson.dumps(model).decode()} not found, try pulling it first"


class _ApiError(Exception):
    """An error answer, raised anywhere in a handler and rendered in the route's shape."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class _Call:
    """One request on its way through the fake."""

    request: web.BaseRequest
    record: RecordedRequest
    shape: _Shape
    fault: Fault | None
    param: str = ""
    closed_by_fake: bool = False


@dataclass(frozen=True)
class _Generation:
    """The text a request produces, decided before any byte goes out."""

    pieces: list[str]
    finish: str
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(frozen=True)
class _StreamPlan:
    """A stream prepared as bytes up front, so faults can cut it at any chunk."""

    content_type: str
    head: bytes
    pieces: list[bytes]
    tail: bytes

    @property
    def garbage(self) -> bytes:
        if self.content_type == EVENT_STREAM:
            return b"data: " + GARBAGE + b"\n\n"
        return GARBAGE + b"\n"


_Handler = Callable[[_Call], Awaitable[web.StreamResponse]]


# --- encoding -----------------------------------------------------------------

_GO_ESCAPES = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def _dumps(value: Any, *, sort_keys: bool = False) -> bytes:
    """Compact JSON with Go's HTML escaping; sorted keys where Go marshals a map."""
    data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS if sort_keys else 0)
    for raw, escaped in _GO_ESCAPES:
        data = data.replace(raw, escaped)
    return data


def _sse(value: Any, event: str | None = None, *, sort_keys: bool = False) -> bytes:
    prefix = f"event: {event}\n".encode() if event else b""
    return prefix + b"data: " + _dumps(value, sort_keys=sort_keys) + b"\n\n"


def _go_time(moment: datetime) -> str:
    """RFC 3339 with trailing zeros of the fraction trimmed, as Go's time.Time marshals."""
    fraction = f"{moment.microsecond:06d}".rstrip("0")
    stamp = moment.strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{fraction}Z" if fraction else f"{stamp}Z"


def _now() -> str:
    return _go_time(datetime.now(UTC))


def _error_body(shape: _Shape, status: int, message: str) -> tuple[bytes, str]:
    if shape == "api":
        return _dumps({"error": message}), NATIVE_JSON
    if shape == "anthropic":
        return _dumps(_anthropic_error(status, message)) + b"\n", COMPAT_JSON
    error = {"message": message, "type": _openai_error_type(status), "param": None, "code": None}
    return _dumps({"error": error}) + b"\n", COMPAT_JSON


def _openai_error_type(status: int) -> str:
    return {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")


def _anthropic_error(status: int, message: str) -> dict[str, Any]:
    kinds = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        429: "rate_limit_error",
        503: "overloaded_error",
        529: "overloaded_error",
    }
    return {
        "type": "error",
        "error": {"type": kinds.get(status, "api_error"), "message": message},
        "request_id": f"req_{os.urandom(12).hex()}",
    }


def _encode_success(shape: _Shape, value: Any) -> tuple[bytes, str]:
    """gin's c.JSON for native routes; json.Encoder (trailing newline) for the compat ones."""
    if shape == "api":
        return _dumps(value), NATIVE_JSON
    return _dumps(value) + b"\n", COMPAT_JSON


def _shape_of(path: str) -> _Shape:
    if path.startswith("/v1/messages"):
        return "anthropic"
    return "openai" if path.startswith("/v1/") else "api"


# --- request parsing ------------------------------------------------------------


def _parse_object(raw: bytes, shape: _Shape) -> dict[str, Any]:
    """Decode a body the way gin's ShouldBindJSON would fail on it."""
    if not raw.strip():
        raise _ApiError(400, "missing request body" if shape == "api" else "EOF")
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _ApiError(400, _syntax_error(raw, exc.pos)) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _ApiError(400, f"json: cannot unmarshal {_go_kind(value)} into Go value")
    return value


def _syntax_error(raw: bytes, position: int) -> str:
    if position >= len(raw.rstrip()):
        return "unexpected EOF"
    return f"invalid character {chr(raw[position])!r} looking for beginning of value"


def _go_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _try_json(raw: bytes) -> Any:
    try:
        return orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        return None


def _flag(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _ApiError(
            400,
            f"json: cannot unmarshal {_go_kind(value)} into Go struct field .{key} of type bool",
        )
    return value


def _limit(value: Any) -> int | None:
    """A positive token budget, or None: Ollama treats -1, -2 and absent as no cap."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _words(value: Any) -> int:
    """Whitespace words under message contents and content parts, the fake's tokens."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return sum(_words(value[key]) for key in ("content", "text") if key in value)
    return 0


def _prompt_tokens(*values: Any) -> int:
    return max(1, sum(_words(value) for value in values))


def _canonical(name: str) -> str:
    """Ollama resolves a bare name to its :latest tag."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def _owned_by(name: str) -> str:
    """The namespace of a model name, which Ollama reports as the owner."""
    parts = name.split("/")
    return parts[-2] if len(parts) >= 2 else "library"


def _embedding(text: str, dimensions: int | None = None) -> list[float]:
    """A vector derived from the text's hash.

    Each value is a multiple of 1/128, exact in float32, so the float and the
    base64 forms of the same embedding compare equal.
    """
    digest = hashlib.sha256(text.encode()).digest()
    vector = [(byte - 128) / 128 for byte in digest[:EMBEDDING_DIMENSIONS]]
    return vector[:dimensions] if dimensions else vector


def _base64_floats(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def _metrics(gen: _Generation) -> dict[str, int]:
    """Durations in nanoseconds; zero values dropped as Go's omitempty drops them."""
    prompt_ns = 100_000 * gen.prompt_tokens
    eval_ns = 2_000_000 * gen.completion_tokens
    load_ns = 1_000_000
    values = {
        "total_duration": load_ns + prompt_ns + eval_ns,
        "load_duration": load_ns,
        "prompt_eval_count": gen.prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": gen.completion_tokens,
        "eval_duration": eval_ns,
    }
    return {key: value for key, value in values.items() if value}


def _openai_usage(gen: _Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def _model_details(name: str) -> dict[str, Any]:
    family = "nomic-bert" if "embed" in name else "llama"
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family],
        "parameter_size": "137M" if family == "nomic-bert" else "3.2B",
        "quantization_level": "F16" if family == "nomic-bert" else "Q4_K_M",
    }


def _model_entry(name: str) -> dict[str, Any]:
    digest = hashlib.sha256(name.encode()).hexdigest()
    return {
        "name": name,
        "model": name,
        "modified_at": _go_time(MODIFIED_AT),
        "size": 100_000_000 + int(digest[:6], 16),
        "digest": digest,
        "details": _model_details(name),
    }


# --- the server -----------------------------------------------------------------


class _CountingServer(web.Server):
    """aiohttp's low-level server, telling the fake about each accepted connection."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        on_connection: Callable[[], None],
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self._on_connection = on_connection

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        self._on_connection()
        super().connection_made(handler, transport)


class _CutShort(web.Response):
    """Announces the whole body's Content-Length, sends half of it, then drops the connection.

    That is how a plain answer really breaks (the server dies mid-body): the
    framing is what tells the client, not the JSON.
    """

    async def write_eof(self, data: bytes = b"") -> None:
        body = self.body
        assert isinstance(body, bytes)
        await web.StreamResponse.write(self, body[: len(body) // 2])
        request = self._req
        if request is not None and request.transport is not None:
            request.transport.abort()


class FakeOllama:
    """An Ollama stand-in on 127.0.0.1, with recording and failure injection.

    What tests read and set:

    - ``requests``: every request, recorded before any fault acts, so retries show up.
    - ``chunks``: the pieces of text every generation produces, one per stream chunk.
    - ``between_chunks(i)``: awaited before content chunk ``i`` (i >= 1) goes out,
      and before a stream fault strikes at ``i``, so a test decides when each
      byte exists and can prove the proxy forwards without buffering.
    - ``stream_closed_by_peer``: set when the client hangs up mid-stream (not when
      the fake cuts the stream itself, nor when ``stop()`` does).
    - ``active_streams`` and ``connections_opened``: how many streams are being
      written now, and how many TCP connections were accepted since ``start()``.
    """

    def __init__(self, models: Sequence[str] = DEFAULT_MODELS) -> None:
        self.models: list[str] = list(models)
        self.chunks: list[str] = list(DEFAULT_CHUNKS)
        self.between_chunks: Callable[[int], Awaitable[None]] | None = None
        self.requests: list[RecordedRequest] = []
        self.stream_closed_by_peer = asyncio.Event()
        # Set when a delay_headers fault starts holding an answer back.
        self.holding_headers = asyncio.Event()
        self.active_streams = 0
        self.connections_opened = 0
        # Generation requests being answered now, and the most there ever were at once
        # (a stream counts until its last byte is written).
        self.in_flight = 0
        self.peak_in_flight = 0
        self.port = 0
        self.url = ""
        self._faults: deque[Fault] = deque()
        self._ids = itertools.count(1)
        self._loaded: dict[str, datetime] = {}
        self._runner: web.ServerRunner | None = None
        self._stopping = False
        self._routes: dict[tuple[str, str], _Handler] = self._route_table()
        self._prefixed_routes: dict[tuple[str, str], _Handler] = {
            ("GET", "/v1/models/"): self._openai_model,
            ("HEAD", "/api/blobs/"): self._management,
            ("POST", "/api/blobs/"): self._management,
        }

    # lifecycle

    async def start(self) -> None:
        server = _CountingServer(
            self._dispatch, self._count_connection, handler_cancellation=True, access_log=None
        )
        self._runner = web.ServerRunner(server, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._stopping = False

    async def stop(self) -> None:
        """Drop every connection first, so a stream a test left hanging cannot stall it."""
        if self._runner is None:
            return
        self._stopping = True
        server = self._runner.server
        if server is not None:
            for connection in server.connections:
                connection.force_close()
        await self._runner.cleanup()
        self._runner = None

    async def __aenter__(self) -> FakeOllama:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def inject(self, fault: Fault) -> None:
        """Queue a fault; each generation request (POST to a model route) spends one."""
        self._faults.append(fault)

    def _count_connection(self) -> None:
        self.connections_opened += 1

    # dispatch

    def _route_table(self) -> dict[tuple[str, str], _Handler]:
        management = self._management
        return {
            ("GET", "/"): self._root,
            ("HEAD", "/"): self._root,
            ("GET", "/api/version"): self._version,
            ("HEAD", "/api/version"): self._version,
            ("GET", "/api/tags"): self._tags,
            ("HEAD", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps,
            ("POST", "/api/show"): self._show,
            ("POST", "/api/chat"): self._native_chat,
            ("POST", "/api/generate"): self._native_generate,
            ("POST", "/api/embed"): self._native_embed,
            ("POST", "/api/embeddings"): self._native_embeddings,
            ("POST", "/v1/chat/completions"): self._openai_chat,
            ("POST", "/v1/completions"): self._openai_completions,
            ("POST", "/v1/embeddings"): self._openai_embeddings,
            ("GET", "/v1/models"): self._openai_models,
            ("POST", "/v1/responses"): self._responses,
            ("POST", "/v1/messages"): self._anthropic_messages,
            ("POST", "/api/pull"): management,
            ("POST", "/api/push"): management,
            ("POST", "/api/create"): management,
            ("POST", "/api/copy"): management,
            ("DELETE", "/api/delete"): management,
        }

    def _find_route(self, method: str, path: str) -> tuple[_Handler, str] | None:
        """Exact routes, then the two with a parameter (model names may hold ':' and '/')."""
        handler = self._routes.get((method, path))
        if handler is not None:
            return handler, ""
        for (route_method, prefix), candidate in self._prefixed_routes.items():
            if method == route_method and path.startswith(prefix) and len(path) > len(prefix):
                return candidate, path[len(prefix) :]
        return None

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        """Record first, then spend a fault, then answer: tests count attempts by records."""
        record = await self._record(request)
        route = self._find_route(request.method, request.path)
        if route is None:
            return web.Response(
                status=404, body=b"404 page not found", headers={"Content-Type": "text/plain"}
            )
        handler, param = route
        call = _Call(request, record, _shape_of(request.path), self._take_fault(request), param)
        generation = request.path in GENERATION_PATHS
        if generation:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            early = await self._early_fault(call)
            return early if early is not None else await handler(call)
        except _ApiError as error:
            body, content_type = _error_body(call.shape, error.status, error.message)
            return web.Response(
                status=error.status,
                body=body,
                headers={"Content-Type": content_type, **error.headers},
            )
        finally:
            if generation:
                self.in_flight -= 1

    async def _record(self, request: web.BaseRequest) -> RecordedRequest:
        body = await request.read()
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=CIMultiDict(request.headers),
            body=body,
            json=_try_json(body),
        )
        self.requests.append(record)
        return record

    def _take_fault(self, request: web.BaseRequest) -> Fault | None:
        if request.method != "POST" or request.path not in GENERATION_PATHS or not self._faults:
            return None
        return self._faults.popleft()

    async def _early_fault(self, call: _Call) -> web.StreamResponse | None:
        """Faults that strike before the request is even looked at."""
        fault = call.fault
        if fault is None:
            return None
        if fault.kind == "status":
            raise _ApiError(fault.status, fault.message, fault.headers)
        if fault.kind == "busy":
            raise _ApiError(503, BUSY_MESSAGE, fault.headers)
        if fault.kind == "close_before_response":
            if call.request.transport is not None:
                call.request.transport.close()
            return web.Response()
        if fault.kind == "delay_headers":
            self.holding_headers.set()
            if fault.release is not None:
                await fault.release.wait()
            else:
                await asyncio.sleep(fault.delay)
            call.fault = None
        return None

    # answering

    def _whole(self, call: _Call, value: Any) -> web.StreamResponse:
        """A one-document answer, bent by a stream fault when one was injected."""
        body, content_type = _encode_success(call.shape, value)
        kind = call.fault.kind if call.fault else None
        if kind == "reset_after":
            self._abort(call)
            return web.Response()
        if kind == "end_without_done":
            call.closed_by_fake = True
            return _CutShort(body=body, headers={"Content-Type": content_type})
        if kind == "garbage_after":
            body = body.rstrip(b"\n") + b"\n" + GARBAGE + b"\n"
        return web.Response(body=body, headers={"Content-Type": content_type})

    def _abort(self, call: _Call) -> None:
        call.closed_by_fake = True
        if call.request.transport is not None:
            call.request.transport.abort()

    async def _stream(self, call: _Call, plan: _StreamPlan) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": plan.content_type})
        self.active_streams += 1
        try:
            await response.prepare(call.request)
            await self._write_plan(call, response, plan)
        except ConnectionError:
            self._peer_gone(call)
        except asyncio.CancelledError:
            self._peer_gone(call)
            raise
        finally:
            self.active_streams -= 1
        return response

    def _peer_gone(self, call: _Call) -> None:
        if not call.closed_by_fake and not self._stopping:
            self.stream_closed_by_peer.set()

    async def _write_plan(
        self, call: _Call, response: web.StreamResponse, plan: _StreamPlan
    ) -> None:
        """Write chunk by chunk; a fault at chunk i replaces it after the gate for i."""
        cut = self._cut_point(call.fault, len(plan.pieces))
        if plan.head:
            await response.write(plan.head)
        for index, piece in enumerate(plan.pieces):
            await self._gate(index)
            if index == cut and await self._interrupt(call, response, plan):
                return
            await response.write(piece)
        if cut == len(plan.pieces):
            await self._gate(cut)
            if await self._interrupt(call, response, plan):
                return
        await response.write(plan.tail)

    @staticmethod
    def _cut_point(fault: Fault | None, pieces: int) -> int | None:
        if fault is None or fault.kind not in ("reset_after", "end_without_done", "garbage_after"):
            return None
        return min(max(fault.after_chunks, 0), pieces)

    async def _gate(self, index: int) -> None:
        if index >= 1 and self.between_chunks is not None:
            await self.between_chunks(index)

    async def _interrupt(
        self, call: _Call, response: web.StreamResponse, plan: _StreamPlan
    ) -> bool:
        """Apply the stream fault; True when the stream must stop here."""
        assert call.fault is not None
        if call.fault.kind == "reset_after":
            self._abort(call)
            return True
        if call.fault.kind == "end_without_done":
            return True
        await response.write(plan.garbage)
        return False

    # shared request logic

    def _model(self, body: dict[str, Any], *, required_is_400: bool, load: bool = True) -> str:
        """The requested name, echoed back; chat paths say "model is required" when it is empty."""
        model = body.get("model")
        if not isinstance(model, str) or not model:
            if required_is_400:
                raise _ApiError(400, "model is required")
            raise _ApiError(404, not_found_message(model if isinstance(model, str) else ""))
        known = {_canonical(name) for name in self.models}
        if _canonical(model) not in known:
            raise _ApiError(404, not_found_message(model))
        if load:
            self._loaded[_canonical(model)] = datetime.now(UTC)
        return model

    def _generate(self, prompt_tokens: int, limit: int | None) -> _Generation:
        pieces = list(self.chunks)
        if limit is not None and limit < len(pieces):
            return _Generation(pieces[:limit], "length", prompt_tokens)
        return _Generation(pieces, "stop", prompt_tokens)

    def _next_id(self) -> int:
        """Like Ollama's rand.Intn(999): ids repeat, so nobody may key on them."""
        return next(self._ids) % 999

    # plain routes

    async def _root(self, call: _Call) -> web.StreamResponse:
        return web.Response(
            text="Ollama is running", headers={"Content-Type": "text/plain; charset=utf-8"}
        )

    async def _version(self, call: _Call) -> web.StreamResponse:
        return self._whole(call, {"version": VERSION})

    async def _tags(self, call: _Call) -> web.StreamResponse:
        return self._whole(call, {"models": [_model_entry(name) for name in self.models]})

    async def _ps(self, call: _Call) -> web.StreamResponse:
        return self._whole(call, {"models": [self._ps_entry(name) for name in self._loaded]})

    def _ps_entry(self, name: str) -> dict[str, Any]:
        """A model stays "loaded" for Ollama's default keep_alive of five minutes."""
        entry = _model_entry(name)
        del entry["modified_at"]
        expires = self._loaded[name] + timedelta(minutes=5)
        entry |= {"expires_at": _go_time(expires), "size_vram": entry["size"]}
        return entry | {"context_length": 4096}

    async def _show(self, call: _Call) -> web.StreamResponse:
        body = _parse_object(call.record.body, call.shape)
        name = body.get("model") or body.get("name")
        model = self._model({"model": name}, required_is_400=True, load=False)
        details = _model_details(model)
        embedding = details["family"] == "nomic-bert"
        return self._whole(
            call,
            {
                "license": "",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {model}\n',
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": details,
                "model_info": {"general.architecture": details["family"]},
                "capabilities": ["embedding"] if embedding else ["completion"],
                "modified_at": _go_time(MODIFIED_AT),
            },
        )

    async def _management(self, call: _Call) -> web.StreamResponse:
        return self._whole(call, {"status": "success"})

    # native generation

    async def _native_chat(self, call: _Call) -> web.StreamResponse:
        body = _parse_object(call.record.body, call.shape)
        model = self._model(body, required_is_400=True)
        stream = _flag(body, "stream", True)
        messages = body.get("messages") or []
        if not messages:
            return self._whole(call, self._load_reply(model, "message"))
        gen = self._generate(_prompt_tokens(messages), _limit(_options(body).get("num_predict")))
        if stream:
            return await self._stream(call, self._native_plan(model, gen, "message"))
        return self._whole(call, self._native_final(model, gen, "message", gen.text))

    async def _native_generate(self, call: _Call) -> web.StreamResponse:
        body = _parse_object(call.record.body, call.shape)
        model = self._model(body, required_is_400=False)
        stream = _flag(body, "stream", True)
        prompt = body.get("prompt")
        if not prompt:
            return self._whole(call, self._load_reply(model, "response"))
        gen = self._generate(_prompt_tokens(prompt), _limit(_options(body).get("num_predict")))
        if stream:
            return await self._stream(call, self._native_plan(model, gen, "response"))
        return self._whole(call, self._native_final(model, gen, "response", gen.text))

    @staticmethod
    def _content(field_name: str, text: str) -> Any:
        return {"role": "assistant", "content": text} if field_name == "message" else text

    def _load_reply(self, model: str, field_name: str) -> dict[str, Any]:
        """Ollama's answer to an empty prompt: the model is loaded, nothing generated."""
        return {
            "model": model,
            "created_at": _now(),
            field_name: self._content(field_name, ""),
            "done": True,
            "done_reason": "load",
        }

    def _native_final(
        self, model: str, gen: _Generation, field_name: str, text: str
    ) -> dict[str, Any]:
        final: dict[str, Any] = {
            "model": model,
            "created_at": _now(),
            field_name: self._content(field_name, text),
            "done": True,
            "done_reason": gen.finish,
        }
        if field_name == "response":
            final["context"] = list(range(1, gen.prompt_tokens + gen.completion_tokens + 1))
        return final | _metrics(gen)

    def _native_plan(self, model: str, gen: _Generation, field_name: str) -> _StreamPlan:
        pieces = [
            _dumps(
                {
                    "model": model,
                    "created_at": _now(),
                    field_name: self._content(field_name, piece),
                    "done": False,
                }
            )
            + b"\n"
            for piece in gen.pieces
        ]
        tail = _dumps(self._native_final(model, gen, field_name, "")) + b"\n"
        return _StreamPlan(NDJSON, b"", pieces, tail)

    # native embeddings

    async def _native_embed(self, call: _Call) -> web.StreamResponse:
        body = _parse_object(call.record.body, call.shape)
        model = self._model(body, required_is_400=False)
        inputs = _embed_inputs(body.get("input"))
        metrics = _metrics(_Generation([], "stop", _prompt_tokens(inputs)))
        dimensions = _limit(body.get("dimensions"))
        return self._whole(
            call,
            {
                "model": model,
                "embeddings": [_embedding(text, dimensions) for text in inputs],
                "total_duration": metrics["total_duration"],
                "load_duration": metrics["load_duration"],
                "prompt_eval_count": metrics["prompt_eval_count"],
            },
        )

    async def _native_embeddings(self, call: _Call) -> web.StreamResponse:
        body = _parse_object(call.record.body, call.shape)
        self._model(body, required_is_400=False)
        prompt = body.get("prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise _ApiError(400, "json: cannot unmarshal non-string into Go struct field prompt")
        return self._whole(call, {"embedding": _embedding(prompt) if prompt else []})

    # OpenAI-compatible routes

    async def _openai_chat(self, call: _Call) -> web.StreamResponse:
        body = _parse_object(call.record.body, call.shape)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "[] is too short - 'messages'")
        model = self._model(body, required_is_400=True)
        stream = _flag(body, "stream", False)
        gen = self._generate(_prompt_tokens(messages), _limit(body.get("max_tokens")))
        chat_id = f"chatcmpl-{self._next_id()}"
        if stream:
            plan = _openai_chat_plan(chat_id, model, gen, _include_usage(body))
            return await self._stream(call, plan)
        return self._whole(call, _openai_chat_completion(chat_id, model, gen))

    async def _openai_completions(self, call: _Call) -> web.StreamResponse:
        body = _parse_object(call.record.body, call.shape)
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise _ApiError(
                400,
                f"json: cannot unmarshal {_go_kind(prompt)} into Go struct field "
                "CompletionRequest.prompt of type string",
            )
        model = self._model(body, required_is_400=False)
        stream = _flag(body, "stream", False)
        gen = self._generate(_prompt_tokens(prompt), _limit(body.get("max_tokens")))
        completion_id = f"cmpl-{self._next_id()}"
        if stream:
            plan = _openai_completion_plan(completion_id, model, gen, _include_usage(body))
            return await self._stream(call, plan)
        return self._whole(call, _openai_completion(completion_id, model, gen))

    async def _openai_embeddings(self, call: _Call) -> web.StreamResponse:
        body = _parse_object(call.record.body, call.shape)
        encoding = body.get("encoding_format") or "float"
        if not isinstance(encoding, str) or encoding.lower() not in ("float", "base64"):
            raise _ApiError(
                400,
                f"Invalid value for 'encoding_format' = {encoding}. "
                "Supported values: ['float', 'base64'].",
            )
        raw_input = body.get("input")
        if raw_input is None or raw_input == []:
            raise _ApiError(400, "invalid input")
        inputs = _embed_inputs([""] if raw_input == "" else raw_input)
        model = self._model(body, required_is_400=False)
        dimensions = _limit(body.get("dimensions"))
        vectors = [_embedding(text, dimensions) for text in inputs]
        tokens = _prompt_tokens(inputs)
        data = [
            {
                "object": "embedding",
                "embedding": _base64_floats(vector) if encoding.lower() == "base64" else vector,
                "index": index,
            }
            for index, vector in enumerate(vectors)
        ]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return self._whole(call, {"object": "list", "data": data, "model": model, "usage": usage})

    async def _openai_models(self, call: _Call) -> web.StreamResponse:
        data = [_openai_model_entry(name) for name in self.models]
        return self._whole(call, {"object": "list", "data": data or None})

    async def _openai_model(self, call: _Call) -> web.StreamResponse:
        known = {_canonical(name) for name in self.models}
        if _canonical(call.param) not in known:
            raise _ApiError(404, not_found_message(call.param))
        return self._whole(call, _openai_model_entry(call.param))

    # Responses API and Anthropic Messages

    async def _responses(self, call: _Call) -> web.StreamResponse:
        body = _parse_object(call.record.body, call.shape)
        model = self._model(body, required_is_400=True)
        stream = _flag(body, "stream", False)
        tokens = _prompt_tokens(body.get("input"), body.get("instructions"))
        gen = self._generate(tokens, _limit(body.get("max_output_tokens")))
        number = self._next_id()
        builder = _ResponsesBuilder(f"resp_{number}", f"msg_{number}_0", model, gen)
        if stream:
            return await self._stream(call, builder.plan())
        return self._whole(call, builder.response(final=True))

    async def _anthropic_messages(self, call: _Call) -> web.StreamResponse:
        body = _parse_object(call.record.body, call.shape)
        if not isinstance(body.get("model"), str) or not body["model"]:
            raise _ApiError(400, "model is required")
        limit = _limit(body.get("max_tokens"))
        if limit is None:
            raise _ApiError(400, "max_tokens is required and must be positive")
        if not body.get("messages"):
            raise _ApiError(400, "messages is required")
        model = self._model(body, required_is_400=True)
        stream = _flag(body, "stream", False)
        gen = self._generate(_prompt_tokens(body["messages"], body.get("system")), limit)
        message_id = f"msg_{os.urandom(12).hex()}"
        if stream:
            return await self._stream(call, _anthropic_plan(message_id, model, gen))
        return self._whole(call, _anthropic_message(message_id, model, gen, gen.text))


# --- route helpers that need no server state ------------------------------------------


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options")
    return options if isinstance(options, dict) else {}


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _embed_inputs(value: Any) -> list[str]:
    """A string or a list of strings; token arrays are refused as Ollama refuses them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise _ApiError(400, "invalid input type")


def _openai_model_entry(name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": int(MODIFIED_AT.timestamp()),
        "owned_by": _owned_by(name),
    }


def _openai_chat_completion(chat_id: str, model: str, gen: _Generation) -> dict[str, Any]:
    return {
        "id": chat_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": gen.text},
                "finish_reason": gen.finish,
            }
        ],
        "usage": _openai_usage(gen),
    }


def _openai_chat_plan(
    chat_id: str, model: str, gen: _Generation, include_usage: bool
) -> _StreamPlan:
    """Role in the first chunk only, finish_reason on its own empty-delta chunk."""
    created = int(time.time())

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": chat_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    pieces = [
        _sse(chunk({"role": "assistant", "content": piece} if i == 0 else {"content": piece}, None))
        for i, piece in enumerate(gen.pieces)
    ]
    head = b"" if pieces else _sse(chunk({"role": "assistant", "content": ""}, None))
    tail = _sse(chunk({}, gen.finish))
    if include_usage:
        tail += _sse(chunk({}, None) | {"choices": [], "usage": _openai_usage(gen)})
    return _StreamPlan(EVENT_STREAM, head, pieces, tail + b"data: [DONE]\n\n")


def _openai_completion(completion_id: str, model: str, gen: _Generation) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "fp_ollama",
        "choices": [{"text": gen.text, "index": 0, "finish_reason": gen.finish}],
        "usage": _openai_usage(gen),
    }


def _openai_completion_plan(
    completion_id: str, model: str, gen: _Generation, include_usage: bool
) -> _StreamPlan:
    """As Ollama's CompleteWriter: with include_usage every chunk carries a zero usage."""
    created = int(time.time())

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        value: dict[str, Any] = {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "choices": [{"text": text, "index": 0, "finish_reason": finish}],
            "model": model,
            "system_fingerprint": "fp_ollama",
        }
        if include_usage:
            value["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        return value

    pieces = [_sse(chunk(piece, None)) for piece in gen.pieces]
    tail = _sse(chunk("", gen.finish))
    if include_usage:
        tail += _sse(chunk("", None) | {"choices": [], "usage": _openai_usage(gen)})
    return _StreamPlan(EVENT_STREAM, b"", pieces, tail + b"data: [DONE]\n\n")


@dataclass
class _ResponsesBuilder:
    """The Responses API's objects and events; Go marshals them from maps, hence sorted keys."""

    response_id: str
    item_id: str
    model: str
    gen: _Generation
    created: int = field(default_factory=lambda: int(time.time()))
    sequence: int = 0

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [self._part(text)]
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(self, *, final: bool) -> dict[str, Any]:
        complete = self.gen.finish == "stop"
        status = ("completed" if complete else "incomplete") if final else "in_progress"
        usage = {
            "input_tokens": self.gen.prompt_tokens,
            "output_tokens": self.gen.completion_tokens,
            "total_tokens": self.gen.prompt_tokens + self.gen.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created,
            "completed_at": int(time.time()) if final else None,
            "status": status,
            "incomplete_details": None
            if complete or not final
            else {"reason": "max_output_tokens"},
            "model": self.model,
            "error": None,
            "instructions": None,
            "output": [self._item("completed", self.gen.text)] if final else [],
            "tools": [],
            "tool_choice": "auto",
            "parallel_tool_calls": True,
            "text": {"format": {"type": "text"}},
            "metadata": {},
            "usage": usage if final else None,
        }

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        payload = data | {"type": kind, "sequence_number": self.sequence}
        self.sequence += 1
        return _sse(payload, kind, sort_keys=True)

    def _text_event(self, kind: str, **data: Any) -> bytes:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return self._event(kind, where | data)

    def plan(self) -> _StreamPlan:
        text = self.gen.text
        head = b"".join(
            [
                self._event("response.created", {"response": self.response(final=False)}),
                self._event("response.in_progress", {"response": self.response(final=False)}),
                self._event(
                    "response.output_item.added",
                    {"output_index": 0, "item": self._item("in_progress", None)},
                ),
                self._text_event("response.content_part.added", part=self._part("")),
            ]
        )
        pieces = [
            self._text_event("response.output_text.delta", delta=piece, logprobs=[])
            for piece in self.gen.pieces
        ]
        tail = b"".join(
            [
                self._text_event("response.output_text.done", text=text, logprobs=[]),
                self._text_event("response.content_part.done", part=self._part(text)),
                self._event(
                    "response.output_item.done",
                    {"output_index": 0, "item": self._item("completed", text)},
                ),
                self._event("response.completed", {"response": self.response(final=True)}),
            ]
        )
        return _StreamPlan(EVENT_STREAM, head, pieces, tail)


def _anthropic_stop_reason(finish: str) -> str:
    return "max_tokens" if finish == "length" else "end_turn"


def _anthropic_message(
    message_id: str, model: str, gen: _Generation, text: str | None
) -> dict[str, Any]:
    message: dict[str, Any] = {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [] if text is None else [{"type": "text", "text": text}],
    }
    if text is not None:
        message["stop_reason"] = _anthropic_stop_reason(gen.finish)
    output_tokens = 0 if text is None else gen.completion_tokens
    message["usage"] = {"input_tokens": gen.prompt_tokens, "output_tokens": output_tokens}
    return message


def _anthropic_plan(message_id: str, model: str, gen: _Generation) -> _StreamPlan:
    """message_start, one text block of deltas, message_delta with usage, message_stop."""
    start = {"type": "message_start", "message": _anthropic_message(message_id, model, gen, None)}
    block_start = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    pieces = [
        _sse(
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
            "content_block_delta",
        )
        for p in gen.pieces
    ]
    if pieces:
        pieces[0] = _sse(block_start, "content_block_start") + pieces[0]
    tail = (
        b""
        if not pieces
        else _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
    )
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": _anthropic_stop_reason(gen.finish)},
        "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.completion_tokens},
    }
    tail += _sse(delta, "message_delta") + _sse({"type": "message_stop"}, "message_stop")
    return _StreamPlan(EVENT_STREAM, _sse(start, "message_start"), pieces, tail)
