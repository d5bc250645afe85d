"""End-of-stream checks hold for every way the upstream's reads can split the bytes."""

from __future__ import annotations

import pytest

from sidecar.streams import end_check, stream_format_of

SSE_OK = b'data: {"a":1}\n\ndata: {"b":2}\n\ndata: [DONE]\n\n'
SSE_CUT = b'data: {"a":1}\n\ndata: {"b":2}\n\n'
NDJSON_OK = b'{"message":"x","done":false}\n{"message":"","done":true,"eval_count":2}\n'
NDJSON_NO_NEWLINE = NDJSON_OK.rstrip(b"\n")
NDJSON_CUT = b'{"message":"x","done":false}\n{"message":"y","done":false}\n'
NDJSON_TRUNCATED = b'{"message":"x","done":false}\n{"message":"","done":tr'
EVENT_OK = (
    b'event: message_start\ndata: {}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)
EVENT_CUT = b"event: message_start\ndata: {}\n\n"


def splits(payload: bytes) -> list[list[bytes]]:
    """The payload whole, cut at every single point, and byte by byte."""
    ways = [[payload], [payload[i : i + 1] for i in range(len(payload))]]
    ways += [[payload[:i], payload[i:]] for i in range(1, len(payload))]
    return ways


def run(marker: str, stream_format: str, chunks: list[bytes]) -> bool:
    check = end_check(marker, stream_format)
    assert check is not None
    for chunk in chunks:
        check.feed(chunk)
    return check.complete()


@pytest.mark.parametrize(
    ("marker", "stream_format", "payload", "complete"),
    [
        ("[DONE]", "sse", SSE_OK, True),
        ("[DONE]", "sse", SSE_CUT, False),
        ("done", "ndjson", NDJSON_OK, True),
        ("done", "ndjson", NDJSON_NO_NEWLINE, True),
        ("done", "ndjson", NDJSON_CUT, False),
        ("done", "ndjson", NDJSON_TRUNCATED, False),
        ("event:message_stop", "sse", EVENT_OK, True),
        ("event:message_stop", "sse", EVENT_CUT, False),
    ],
)
def test_end_checks_survive_any_split(
    marker: str, stream_format: str, payload: bytes, complete: bool
) -> None:
    for chunks in splits(payload):
        assert run(marker, stream_format, chunks) is complete, chunks


def test_routes_without_a_marker_are_not_checked() -> None:
    assert end_check(None, "ndjson") is None
    assert end_check("[DONE]", "ndjson") is None


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("text/event-stream", "sse"),
        ("text/event-stream; charset=utf-8", "sse"),
        ("application/x-ndjson", "ndjson"),
        ("application/json; charset=utf-8", None),
        (None, None),
    ],
)
def test_stream_format_from_content_type(content_type: str | None, expected: str | None) -> None:
    assert stream_format_of(content_type) == expected
