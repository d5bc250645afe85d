"""Incremental checks on relayed byte streams.

The relay passes upstream bytes through untouched; all it must know is whether
the stream ended the way a complete one does (`data: [DONE]`, a last NDJSON
line with `"done": true`, a closing SSE event). These checks look at the bytes
as they pass without parsing events, because upstream reads do not line up
with events: an event can be split across reads and one read can hold several.
"""

from __future__ import annotations

from typing import Protocol

import orjson

_DONE = b"data: [DONE]"


class StreamEndCheck(Protocol):
    """Fed every chunk; says at the end whether the stream closed properly."""

    def feed(self, chunk: bytes) -> None: ...

    def complete(self) -> bool: ...


class SseDoneCheck:
    """An OpenAI SSE stream is complete when its last event is `data: [DONE]`."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        self._tail = (self._tail + chunk[-32:])[-32:]

    def complete(self) -> bool:
        return self._tail.rstrip().endswith(_DONE)


class SseEventCheck:
    """An SSE stream that closes with a named event (`event: message_stop`)."""

    __slots__ = ("_markers", "_seen", "_window")

    def __init__(self, event: str) -> None:
        self._markers = (f"event: {event}".encode(), f"event:{event}".encode())
        self._window = b""
        self._seen = False

    def feed(self, chunk: bytes) -> None:
        if self._seen:
            return
        # Keep enough of the previous chunk that a marker split across two is still found.
        window = self._window + chunk
        self._seen = any(marker in window for marker in self._markers)
        self._window = window[-len(self._markers[0]) :]

    def complete(self) -> bool:
        return self._seen


class LastNdjsonLine:
    """Keeps the last complete NDJSON line, joined when it spans reads; parsed once, at the end.

    Native streams put everything worth knowing (done, counts) on their last line,
    so nothing else of the stream needs parsing.
    """

    __slots__ = ("_last_line", "_partial")

    def __init__(self) -> None:
        self._partial: list[bytes] = []
        self._last_line = b""

    def feed(self, chunk: bytes) -> None:
        end = chunk.rfind(b"\n")
        if end < 0:
            self._partial.append(chunk)
            return
        start = chunk.rfind(b"\n", 0, end) + 1
        if start == 0 and self._partial:
            line = b"".join(self._partial) + chunk[:end]
        else:
            line = chunk[start:end]
        if line.strip():
            self._last_line = line
        self._partial = [chunk[end + 1 :]] if end + 1 < len(chunk) else []

    def final(self) -> dict[str, object] | None:
        """The last line as an object when it says `"done": true`, else None."""
        rest = b"".join(self._partial)
        line = rest if rest.strip() else self._last_line
        try:
            document = orjson.loads(line)
        except orjson.JSONDecodeError:
            return None
        if isinstance(document, dict) and document.get("done") is True:
            return document
        return None


class NdjsonDoneCheck(LastNdjsonLine):
    """A native Ollama stream is complete when its last line is an object with `"done": true`."""

    __slots__ = ()

    def complete(self) -> bool:
        return self.final() is not None


def end_check(marker: str | None, stream_format: str) -> StreamEndCheck | None:
    """The check for a route's end marker, or None when the route has none to check."""
    if marker == "[DONE]" and stream_format == "sse":
        return SseDoneCheck()
    if marker == "done" and stream_format == "ndjson":
        return NdjsonDoneCheck()
    if marker and marker.startswith("event:") and stream_format == "sse":
        return SseEventCheck(marker.removeprefix("event:"))
    return None


def stream_format_of(content_type: str | None) -> str | None:
    """'sse' or 'ndjson' for a streamed content type, None for a plain body."""
    if not content_type or content_type.startswith("application/json"):
        return None
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type == "text/event-stream":
        return "sse"
    if media_type in ("application/x-ndjson", "application/ndjson", "application/jsonl"):
        return "ndjson"
    return None
