"""correlation: one request id from the client through the logs to Ollama and back.

The client's `X-Request-ID` is kept when it looks like an id (so a trace that
started in the app stays one trace); otherwise the sidecar makes one. W3C
`traceparent`/`tracestate` pass through untouched with the other end-to-end headers.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from structlog.contextvars import bind_contextvars

from sidecar.chain import Next, PolicyContext, register
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, Field


@dataclass(frozen=True, kw_only=True)
class CorrelationConfig:
    __pydantic_config__ = STRICT

    header: Annotated[
        str,
        Field(
            min_length=1,
            max_length=64,
            pattern=r"^[A-Za-z0-9-]+$",
            description="Header that carries the request id in and out.",
        ),
    ] = "X-Request-ID"
    trust_incoming: Annotated[bool, Field(description="Keep a well-formed id the client sent.")] = (
        True
    )
    max_length: Annotated[
        int, Field(ge=8, le=1024, description="Longest client id kept as is.")
    ] = 128


_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/+=@-]+$")


class RequestIds:
    """32 hex digits: a random 64-bit prefix per process, then a 64-bit counter.

    Unique across pods (the prefix) and within one (the counter), at a tenth of
    uuid4's cost; request ids need to be unique, not unguessable.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count()

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"


_REQUEST_IDS = RequestIds()


@register("correlation")
class Correlation:
    """Accept or make the request id, send it upstream, echo it, bind it to every log line."""

    config_model: ClassVar[type[Any]] = CorrelationConfig

    def __init__(self, config: CorrelationConfig, context: PolicyContext) -> None:
        self.header = config.header
        self.trust_incoming = config.trust_incoming
        self.max_length = config.max_length

    def request_id_for(self, exchange: Exchange) -> str:
        """The client's id when it is safe to log and forward, else a fresh one."""
        if self.trust_incoming:
            incoming = exchange.headers.get(self.header)
            if incoming and len(incoming) <= self.max_length and _SAFE_ID.match(incoming):
                return incoming
        return _REQUEST_IDS.next()

    def __call__(self, exchange: Exchange, call_next: Next) -> Awaitable[Reply]:
        # A plain function handing back the next step's awaitable: nothing happens
        # after the reply here, so a coroutine of its own would be a frame for nothing.
        request_id = self.request_id_for(exchange)
        exchange.request_id = request_id
        exchange.upstream_headers[self.header] = request_id
        exchange.response_headers[self.header] = request_id
        bind_contextvars(request_id=request_id)
        return call_next(exchange)
