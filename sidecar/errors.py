"""Errors the sidecar makes itself, in the shape the client's API expects.

OpenAI clients parse `{"error": {"message", "type", "param", "code"}}` and Ollama's
native clients parse `{"error": "..."}`; answering each in its own dialect is what
lets an app treat a sidecar-made error exactly like an upstream one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import orjson
from aiohttp import web

Dialect = Literal["openai", "native"]

# The `type` OpenAI (and Ollama's /v1 layer) puts on each status.
_OPENAI_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

JSON_CONTENT_TYPE = "application/json"


class SidecarError(Exception):
    """An answer the sidecar gives instead of (or after failing to get) the upstream's.

    Raised anywhere on the request path; the app turns it into a response in the
    route's dialect, so no code path has to know how errors are spelled.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type or _OPENAI_TYPES.get(
            status, "invalid_request_error" if status < 500 else "api_error"
        )
        self.headers: dict[str, str] = dict(headers or {})


class UpstreamError(SidecarError):
    """The upstream could not give an answer before its first byte (refused, reset, timed out).

    A separate class so that retry, fallback and circuit-breaker policies can tell
    "Ollama is in trouble" from "the client sent something wrong".
    """


class StreamInterrupted(Exception):
    """The upstream stream failed after its first byte reached the client.

    Not a SidecarError: the status line is already sent, so the only honest answer
    left is an error event at the end of the stream.
    """

    def __init__(self, message: str, code: str = "upstream_stream_interrupted") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def dialect_for_path(path: str) -> Dialect:
    """Native routes live under /api; everything else speaks OpenAI's dialect."""
    return "native" if path.startswith("/api/") or path == "/api" else "openai"


def error_payload(error: SidecarError, dialect: Dialect) -> bytes:
    """The JSON body for `error` in the given dialect."""
    if dialect == "native":
        return orjson.dumps({"error": error.message})
    return orjson.dumps(
        {
            "error": {
                "message": error.message,
                "type": error.error_type,
                "param": error.param,
                "code": error.code,
            }
        }
    )


def error_response(error: SidecarError, dialect: Dialect) -> web.Response:
    """A complete aiohttp response for `error`."""
    return web.Response(
        status=error.status,
        body=error_payload(error, dialect),
        content_type=JSON_CONTENT_TYPE,
        headers=error.headers,
    )


def stream_error_event(message: str, code: str, stream_format: str) -> bytes:
    """The last event of a stream that broke: a client parser sees an error, never a clean end."""
    if stream_format == "ndjson":
        return orjson.dumps({"error": message}) + b"\n"
    body = orjson.dumps(
        {"error": {"message": message, "type": "api_error", "param": None, "code": code}}
    )
    return b"data: " + body + b"\n\n"
