"""The proxied exchange: what policies see of a request, and the reply they pass back.

Policies talk to each other only through an Exchange's fields and its `facts`
dict, never through imports, so any policy can be left out or reordered.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar.errors import SidecarError
from sidecar.routes import Route

StreamFormat = Literal["sse", "ndjson"]
# Told how an upstream attempt ended: its status (None if there was no answer) and the
# error, if any. An AttemptObserver is called as the attempt starts and returns one.
AttemptEnd = Callable[[int | None, BaseException | None], None]
AttemptObserver = Callable[["Exchange"], AttemptEnd]


@dataclass(slots=True, eq=False)
class Exchange:
    """One client request on its way through the chain.

    `body` is the raw bytes the client sent and is forwarded untouched unless a
    policy calls `set_json`: the common case costs no re-serialisation.
    """

    method: str
    route: Route
    path: str
    query_string: str
    headers: CIMultiDictProxy[str]
    body: bytes
    request_id: str = ""
    started_at: float = 0.0
    # The upstream base URL for this attempt; None: the configured `upstream.url`.
    # The routing policy sets it (with facts["upstream"], the upstream's name).
    target: str | None = None
    # Called by the upstream step around each attempt (tracing); None costs nothing.
    attempt_observers: list[AttemptObserver] | None = None
    # Shared per-request facts: model, stream, tokens, cache result, attempts...
    facts: dict[str, Any] = field(default_factory=dict)
    # Extra headers a policy wants sent to the upstream / added to the client's reply.
    upstream_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    response_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    _json: Any = None
    _json_parsed: bool = False
    _model: str | None = None
    _model_known: bool = False

    @property
    def json(self) -> Any:
        """The body parsed once with orjson (None for routes without a JSON body)."""
        if not self._json_parsed:
            self._json = parse_json_object(self.body) if self.route.json_body else None
            self._json_parsed = True
        return self._json

    def set_json(self, document: dict[str, Any]) -> None:
        """Replace the body a policy rewrote (e.g. an aliased model).

        Other policies see the new model at once; the bytes are re-serialised
        only here, so the common case forwards the client's bytes untouched.
        """
        self._json = document
        self._json_parsed = True
        self._model_known = False
        self.body = orjson.dumps(document)

    def add_json_field(self, name: str, value: Any) -> None:
        """Add a top-level field the body does not have yet, without re-serialising it.

        The field is written in just after the object's opening brace: a copy of
        the bytes instead of a parse-and-dump of the whole body (a long chat
        history or RAG prompt costs its size either way, but dumping costs far
        more per byte). The field must be new: a JSON object with the same name
        twice means what the last one says to some parsers and the first to others.
        """
        document = self.json
        if not isinstance(document, dict) or name in document:
            raise ValueError(f"the body is not a JSON object without {name!r}")
        body = self.body
        brace = body.index(b"{") + 1  # only JSON whitespace can come before it
        added = orjson.dumps(name) + b":" + orjson.dumps(value) + (b"," if document else b"")
        self.body = b"".join((body[:brace], added, memoryview(body)[brace:]))  # one copy
        self._json = {name: value, **document}

    @property
    def model(self) -> str | None:
        """The `model` the client asked for, if the body names one as a string.

        Worked out once (several policies ask for it on every request) and again
        after `set_json`, the only way the body changes.
        """
        if self._model_known:
            return self._model
        self._model = self._model_of(self.json)
        self._model_known = True
        return self._model

    @staticmethod
    def _model_of(document: Any) -> str | None:
        if isinstance(document, dict):
            model = document.get("model")
            if isinstance(model, str):
                return model
            # /api/show and /api/embeddings accept the older `name`.
            name = document.get("name")
            if isinstance(name, str):
                return name
        return None

    @property
    def wants_stream(self) -> bool:
        """Whether the client asked for a stream, with each API's own default."""
        document = self.json
        if isinstance(document, dict) and "stream" in document:
            return document["stream"] is True
        return self.route.stream_default


@dataclass(slots=True, eq=False)
class Reply:
    """What comes back down the chain: status, headers and either bytes or a chunk stream.

    A streamed reply's `chunks` is the upstream's byte stream, not yet read;
    policies that watch a stream wrap it with their own async generator, which
    must close the one it wraps (`contextlib.aclosing`), so that a client that
    goes away closes the upstream connection at once.
    """

    status: int
    headers: CIMultiDict[str]
    body: bytes = b""
    chunks: AsyncGenerator[bytes, None] | None = None
    stream_format: StreamFormat | None = None

    def with_chunks(self, chunks: AsyncGenerator[bytes, None]) -> Reply:
        """This reply with its stream replaced (by a wrapper of it); `dataclasses.replace`
        does the same by introspection, at several times the cost, on every stream."""
        return Reply(self.status, self.headers, self.body, chunks, self.stream_format)


def parse_json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or a 400 that says what is wrong with it."""
    if not body.strip():
        raise SidecarError(
            400, "request body is empty; expected a JSON object", code="invalid_json"
        )
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SidecarError(
            400, f"request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(document, dict):
        raise SidecarError(
            400,
            f"request body must be a JSON object, not {_json_kind(document)}",
            code="invalid_json",
        )
    return document


def _json_kind(value: Any) -> str:
    kinds = {
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
    }
    return kinds.get(type(value), "null")
