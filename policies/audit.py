"""audit: one JSON line per request (who, what, which model, status, tokens, cost, latency).

Where it goes in the chain: OUTERMOST (first in the YAML). It reads the model
the client asked for when it is called, before any alias or fallback rewrites
the body, and it must see the refusals of every other policy (401 from `auth`,
429 from a rate limit or `concurrency`, 503 from the circuit breaker): a
SidecarError raised inside is recorded with its status and raised again. The
facts the other policies leave on the exchange (`tenant`, `usage`, `attempts`,
`upstream`, `cache`, ...) are read when the answer ends; for a stream that is
its last byte, its failure or the client going away (`watch_stream`), after
`metering` has recorded the stream's usage.

A line (orjson, one per request, written when the request ends):

    time, request_id, tenant, route, method, model_asked, model_used, status,
    stream, outcome, prompt_tokens, completion_tokens, total_tokens,
    tokens_estimated, cost, latency_ms, attempts, upstream, cache, stream_error
    (+ request_body, completion with include_bodies)

`outcome`: complete | failed (the stream broke, or an unexpected error) |
abandoned (the client went away) | refused (a SidecarError from a policy or the
upstream step). `status` is what the client got: 499 when it went away, as in
the access log. Token fields are null when nothing metered the request.

Bodies (`include_bodies: true`) are the request body as text and the
completion text (extracted from the answer's JSON or stream events; the raw
text if none can be), each cut at `max_body_bytes` and passed through the
`redact` patterns. Headers are never written, so neither is Authorization.

Lines are buffered and written at most every `flush_interval` or every
`flush_bytes` (the access log's CoalescingLineWriter pattern), and on close.
A file sink rotates by size like logging.handlers.RotatingFileHandler: PATH,
PATH.1 ... PATH.<backups>; `backups: 0` truncates instead. A write that fails
is counted (`audit_write_errors_total`), logged, and its lines are dropped:
auditing never fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from types import TracebackType
from typing import IO, Annotated, Any, BinaryIO, ClassVar, Literal

import orjson
import structlog

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import SidecarError, StreamInterrupted
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, AfterValidator, ByteSize, Duration, Field
from sidecar.observability import BatchedLines
from sidecar.replies import StreamEnd, watch_stream
from sidecar.tokens import completion_text

Outcome = Literal["complete", "failed", "abandoned", "refused"]

DEFAULT_REDACT = (
    r"sk-[A-Za-z0-9_-]{16,}",  # OpenAI-style secret keys
    r"(?i)bearer\s+[A-Za-z0-9._~+/=-]{8,}",  # bearer tokens pasted into a prompt
    r"AKIA[0-9A-Z]{16}",  # AWS access key ids
)
# Bytes kept beyond max_body_bytes before redaction, so a secret that straddles
# the cut is still matched whole (and then cut), not left half visible.
REDACT_MARGIN = 256


def _log() -> Any:
    return structlog.get_logger("sidecar.audit")


def _compiles(value: tuple[str, ...]) -> tuple[str, ...]:
    """`redact` patterns that compile and cannot match nothing, checked at start, not per request."""
    for index, pattern in enumerate(value):
        if not pattern:
            raise ValueError(f"redact[{index}] is empty: it would match everywhere")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"redact[{index}] {pattern!r} is not a valid regex: {exc}") from None
        if compiled.match(""):
            raise ValueError(f"redact[{index}] {pattern!r} matches the empty string")
    return value


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    __pydantic_config__ = STRICT

    sink: Annotated[
        Literal["stdout", "file"],
        Field(description="Where lines go: stdout (with the logs) or a rotating file."),
    ] = "stdout"
    path: Annotated[
        str | None,
        Field(
            min_length=1,
            description="With sink: file, the file to append to (writable at start).",
        ),
    ] = None
    max_bytes: Annotated[
        ByteSize,
        Field(
            ge=256,
            le=1024**4,
            description="With sink: file, rotate before the file grows past this size.",
        ),
    ] = 100 * 1024 * 1024
    backups: Annotated[
        int,
        Field(
            ge=0, le=1000, description="Rotated files kept (PATH.1 newest); 0 truncates instead."
        ),
    ] = 5
    flush_interval: Annotated[
        Duration,
        Field(gt=0, le=60, description="Longest a line waits in the buffer before it is written."),
    ] = 0.2
    flush_bytes: Annotated[
        ByteSize,
        Field(
            ge=1,
            le=16 * 1024 * 1024,
            description="Buffer size that triggers a write at once.",
        ),
    ] = 64 * 1024
    include_bodies: Annotated[
        bool,
        Field(description="Also write the request body and the completion text (redacted)."),
    ] = False
    max_body_bytes: Annotated[
        ByteSize,
        Field(
            ge=0,
            le=1024 * 1024,
            description="With include_bodies: bytes kept of each body; the rest is cut.",
        ),
    ] = 4096
    redact: Annotated[
        tuple[str, ...],
        AfterValidator(_compiles),
        Field(
            max_length=100,
            description="Regular expressions whose matches in bodies are replaced by `redact_with`.",
        ),
    ] = DEFAULT_REDACT
    redact_with: Annotated[
        str, Field(max_length=100, description="What a redacted match is replaced with.")
    ] = "[REDACTED]"

    def __post_init__(self) -> None:
        if self.sink == "file" and self.path is None:
            raise ValueError("sink: file needs a `path`")
        if self.sink == "stdout" and self.path is not None:
            raise ValueError("`path` is only used with sink: file")


class LineSink(BatchedLines):
    """Audit lines in batches (every `interval`, at `max_buffer` bytes, on close).

    With a `path`, appends to that file and rotates it by size as
    RotatingFileHandler does; without, writes to the process's stdout.
    """

    def __init__(
        self,
        path: str | None,
        *,
        max_bytes: int,
        backups: int,
        interval: float,
        max_buffer: int,
        on_written: Any,
        on_error: Any,
    ) -> None:
        super().__init__(interval, max_buffer)
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._on_written = on_written
        self._on_error = on_error
        self._file: IO[bytes] | None = None
        self._size = 0

    def open(self) -> None:
        """Open the file now (start-up), so an unwritable path fails the start, not a request."""
        if self.path is None:
            return
        try:
            self._open()
        except OSError as exc:
            raise ValueError(
                f"audit.path: cannot open {self.path} for appending: {exc.strerror or exc}"
            ) from None

    def _open(self) -> None:
        assert self.path is not None
        handle = open(self.path, "ab")  # noqa: SIM115 - kept open for the sink's life
        self._file = handle
        self._size = handle.tell()

    def write(self, line: bytes) -> None:
        self.add(line)

    def _write_batch(self, data: bytes, lines: int) -> None:
        try:
            if self.path is None:
                stream: BinaryIO = sys.stdout.buffer
                stream.write(data)
                stream.flush()
            else:
                self._write_file(data)
        except (OSError, ValueError) as exc:
            self._on_error(exc, lines)
            return
        self._on_written(lines)

    def _write_file(self, data: bytes) -> None:
        if self._file is None:
            self._open()  # after a failed rotation, or reopened after close
        view = memoryview(data)
        while view:
            room = self.max_bytes - self._size
            if len(view) <= room:
                cut = len(view)
            else:
                # The longest run of whole lines that fits; a line longer than the
                # limit goes alone into a fresh file.
                cut = bytes(view[:room]).rfind(b"\n") + 1 if room > 0 else 0
                if cut == 0:
                    if self._size > 0:
                        self._rotate()
                        continue
                    cut = bytes(view).find(b"\n") + 1 or len(view)
            assert self._file is not None
            self._file.write(view[:cut])
            self._size += cut
            view = view[cut:]
            if view:
                self._rotate()
        assert self._file is not None
        self._file.flush()

    def _rotate(self) -> None:
        assert self.path is not None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.backups > 0:
            for index in range(self.backups - 1, 0, -1):
                source = f"{self.path}.{index}"
                if os.path.exists(source):
                    os.replace(source, f"{self.path}.{index + 1}")
            os.replace(self.path, f"{self.path}.1")
            self._open()
        else:
            handle = open(self.path, "wb")  # noqa: SIM115
            self._file = handle
            self._size = 0

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None


class _Capture(AsyncGenerator[bytes, None]):
    """Passes a stream through, keeping its first `limit` bytes (include_bodies only)."""

    __slots__ = ("_inner", "chunks", "kept", "limit")

    def __init__(self, inner: AsyncGenerator[bytes, None], limit: int) -> None:
        self._inner = inner
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0

    async def asend(self, value: None) -> bytes:
        chunk = await self._inner.asend(value)
        if self.kept < self.limit:
            self.chunks.append(chunk)
            self.kept += len(chunk)
        return chunk

    async def athrow(self, typ: Any, val: Any = None, tb: TracebackType | None = None) -> bytes:
        return await self._inner.athrow(typ, val, tb)

    async def aclose(self) -> None:
        await self._inner.aclose()


# The last whole second formatted, and its text: strftime is most of a stamp's cost,
# and the second changes at most once a second. One tuple, swapped whole.
_last_second: tuple[int, str] = (-1, "")


def _iso(moment: float) -> str:
    global _last_second
    second = int(moment)
    cached = _last_second
    if cached[0] != second:
        cached = _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return "%s.%06dZ" % (cached[1], (moment - second) * 1e6)  # noqa: UP031 - faster here


def _plain_text(body: bytes) -> str:
    """The generated text of a plain answer, in any of Ollama's shapes ("" if none)."""
    if body[:1] != b"{":
        return ""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if not isinstance(document, dict):
        return ""
    pieces: list[str] = []
    # /v1/chat/completions: choices[].message; /v1/messages and /v1/responses: content blocks.
    for choice in document.get("choices") or ():
        if isinstance(choice, dict) and isinstance(choice.get("message"), dict):
            pieces.append(str(choice["message"].get("content") or ""))
    blocks = (
        list(document.get("content") or ()) if isinstance(document.get("content"), list) else []
    )
    for item in document.get("output") or ():
        if isinstance(item, dict) and isinstance(item.get("content"), list):
            blocks.extend(item["content"])
    for block in blocks:
        if isinstance(block, dict) and isinstance(block.get("text"), str):
            pieces.append(block["text"])
    # Native /api/chat and /api/generate, /v1/completions: the stream-event reader knows them.
    # (Raw newlines in valid JSON are whitespace between tokens: one line is the same document.)
    return "".join(pieces) or completion_text([body.replace(b"\n", b" ")], "ndjson")


def _model_of(exchange: Exchange) -> str | None:
    try:
        return exchange.model
    except SidecarError:  # not JSON: whoever forwards it answers the 400
        return None


@register("audit")
class Audit:
    """Writes one JSON line per request to stdout or a rotating file."""

    config_model: ClassVar[type[Any]] = AuditConfig

    def __init__(self, config: AuditConfig, context: PolicyContext) -> None:
        self.config = config
        self._patterns = [re.compile(pattern) for pattern in config.redact]
        metrics = context.metrics
        self._lines_metric = metrics.counter(
            "audit_lines_total", "Audit lines written to the sink.", ()
        )
        self._errors_metric = metrics.counter(
            "audit_write_errors_total",
            "Failed writes to the audit sink (their lines are lost).",
            (),
        )
        self.lines_written = 0
        self.lines_lost = 0
        self.sink = LineSink(
            config.path if config.sink == "file" else None,
            max_bytes=config.max_bytes,
            backups=config.backups,
            interval=config.flush_interval,
            max_buffer=config.flush_bytes,
            on_written=self._written,
            on_error=self._failed,
        )
        self._add = self.sink.add
        self._include_bodies = config.include_bodies
        self._clock: Any = None

    async def start(self) -> None:
        # The loop's clock, looked up once: exchanges' started_at are its times.
        self._clock = asyncio.get_running_loop().time
        await asyncio.to_thread(self.sink.open)

    async def close(self) -> None:
        self.sink.close()

    def readiness(self) -> dict[str, Any]:
        return {
            "sink": self.config.sink,
            "path": self.config.path,
            "lines_written": self.lines_written,
            "lines_lost": self.lines_lost,
        }

    def _written(self, lines: int) -> None:
        self.lines_written += lines
        self._lines_metric.inc(lines)

    def _failed(self, error: BaseException, lines: int) -> None:
        self.lines_lost += lines
        self._errors_metric.inc()
        _log().warning(
            "audit_write_failed",
            sink=self.config.sink,
            path=self.config.path,
            lines_lost=lines,
            error=str(error),
        )

    # --- the request path ---------------------------------------------------------

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        wall = time.time()
        asked = _model_of(exchange)
        request_body = exchange.body if self._include_bodies else None
        try:
            reply = await call_next(exchange)
        except SidecarError as error:
            self._line(exchange, wall, asked, error.status, False, "refused", request_body, None)
            raise
        except StreamInterrupted:
            self._line(exchange, wall, asked, 502, True, "failed", request_body, None)
            raise
        except asyncio.CancelledError:
            self._line(exchange, wall, asked, 499, False, "abandoned", request_body, None)
            raise
        except Exception:
            self._line(exchange, wall, asked, 500, False, "failed", request_body, None)
            raise
        if reply.chunks is None:
            self._line(
                exchange,
                wall,
                asked,
                reply.status,
                False,
                "complete",
                request_body,
                reply.body if request_body is not None else None,
                None,
            )
            return reply
        capture: _Capture | None = None
        if request_body is not None:
            capture = _Capture(reply.chunks, self.config.max_body_bytes + REDACT_MARGIN)
            reply = reply.with_chunks(capture)
        status = reply.status
        stream_format = reply.stream_format or "sse"

        def ended(how: StreamEnd, error: StreamInterrupted | None) -> None:
            try:
                code = 499 if how == "abandoned" else status
                self._line(
                    exchange,
                    wall,
                    asked,
                    code,
                    True,
                    how,
                    request_body,
                    b"".join(capture.chunks) if capture is not None else None,
                    stream_format,
                )
            except Exception:  # auditing must never break the relay's clean-up
                _log().exception("audit_failed", route=exchange.route.name)

        return watch_stream(reply, ended)

    def _line(
        self,
        exchange: Exchange,
        wall: float,
        asked: str | None,
        status: int,
        stream: bool,
        outcome: str,
        request_body: bytes | None,
        completion: bytes | None,
        stream_format: str | None = None,
    ) -> None:
        facts = exchange.facts
        elapsed = time.time() - wall  # since this step began: to the microsecond
        started = exchange.started_at
        if started:
            # From the request's start (its body's reading included), on the loop's clock,
            # which counts whole milliseconds on uvloop: never less than seen here.
            since_start = (self._clock or asyncio.get_running_loop().time)() - started
            latency = since_start if since_start > elapsed else elapsed
        else:
            latency = elapsed
        # round(x * 1e6) / 1000 is round(x * 1000, 3) at a fraction of the cost.
        latency_ms = round(latency * 1e6) / 1000
        headers = exchange.response_headers
        used = (headers.get("x-sidecar-model") if headers else None) or _model_of(exchange)
        usage = facts.get("usage")
        if isinstance(usage, dict):
            prompt_tokens = usage.get("prompt_tokens")
            completion_tokens = usage.get("completion_tokens")
            total_tokens = usage.get("total_tokens")
            estimated = usage.get("estimated")
            cost = usage.get("cost")
        else:
            prompt_tokens = completion_tokens = total_tokens = estimated = cost = None
        record: dict[str, Any] = {
            "time": _iso(wall),
            "request_id": exchange.request_id or None,
            "tenant": facts.get("tenant", "anonymous"),
            "route": exchange.route.name,
            "method": exchange.method,
            "model_asked": asked,
            "model_used": used,
            "status": status,
            "stream": stream,
            "outcome": outcome,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": total_tokens,
            "tokens_estimated": estimated,
            "cost": cost,
            "latency_ms": latency_ms,
            "attempts": facts.get("attempts"),
            "upstream": facts.get("upstream"),
            "cache": facts.get("cache"),
            "stream_error": facts.get("stream_error"),
        }
        if request_body is not None:
            record["request_body"] = self._redacted(request_body)
            text = None
            if completion is not None:
                if stream_format is None:
                    text = _plain_text(completion)
                else:
                    text = completion_text([completion], stream_format)
                if not text:
                    cap = self.config.max_body_bytes + REDACT_MARGIN
                    text = completion[:cap].decode("utf-8", "replace")
            record["completion"] = self._redacted(text.encode()) if text is not None else None
        self._add(orjson.dumps(record, default=str))

    def _redacted(self, body: bytes) -> str:
        """The body as text, redacted, then cut at max_body_bytes (a cut is marked)."""
        limit = self.config.max_body_bytes
        text = body[: limit + REDACT_MARGIN].decode("utf-8", "replace")
        for pattern in self._patterns:
            text = pattern.sub(self.config.redact_with, text)
        encoded = text.encode()
        if len(encoded) > limit or len(body) > limit + REDACT_MARGIN:
            return encoded[:limit].decode("utf-8", "ignore") + "…[truncated]"
        return text
