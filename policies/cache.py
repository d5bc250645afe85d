"""cache: exact response cache with single-flight, on memory (one pod) or Redis (shared).

What is cached: complete 200 answers of the model routes, keyed by a SHA-256 of
the route, the model after aliasing (place `cache` after `routing`), the tenant
(`scope: tenant`, the default) and the request body normalised: keys sorted,
fields that do not change the answer left out (`user`, `stream_options`,
`stream`) and Ollama's effective defaults filled in (a missing `temperature` or
`top_p` on the OpenAI-shaped routes is 1.0). Embeddings are always cached;
generations only when deterministic (`temperature: 0` or a `seed`; on the native
routes in `options`) unless `cache_nondeterministic: true`.

Streamed and plain answers have entries of their own: the key also carries
whether the client asked for a stream (and, for a stream,
`stream_options.include_usage`, which changes the stream's bytes). A stream is
recorded as its events and replayed as real chunked SSE/NDJSON, event by event,
byte for byte what the first client got: as fast as possible, or `replay_pace`
apart. On /v1/chat/completions and /api/chat a request without an entry of its
own form is answered from the other form's (looked up in the same store round
trip): a plain body assembled from a stream (OpenAI: the deltas' content,
reasoning and tool calls, the last finish_reason, the usage event or else the
usage recorded with the entry; native: the closing line with the whole
message), or a stream split from a plain body (OpenAI: a role chunk, one content
chunk, a finish chunk, the usage chunk if asked for, [DONE]; native: one line
with the message, then the closing line). These are equivalent, not
byte-identical, to what the upstream would send; an entry that cannot be
converted is a miss. Errors are never stored, nor is a stream that did not end
with its end marker (the upstream step raises StreamInterrupted for those),
nor one every client abandoned (unless `complete_on_disconnect`).

Single-flight (within a pod): the first request for a key (the leader) starts
one upstream call in a task of its own; identical requests arriving meanwhile
join it. A plain answer is handed to all; a stream is appended to a shared
list of chunks that every client (leader included) reads from the start, as
chunks arrive. If the call fails before its answer, every waiting client gets
the same error (the same SidecarError, or the same non-200 answer); a stream
that breaks mid-way ends with the same StreamInterrupted for all. A call that
has answered completely but whose entry is still being written answers an
identical request as a hit (read your writes, even on a slow Redis). When every
client has gone the upstream call is cancelled (its connection closed), unless
`complete_on_disconnect: true`, which lets it finish and be stored.

Single-flight across pods (Redis, `cross_pod: true`, the default there): the
one flight of a pod (so only one request per pod asks) takes a lock for the
key first, in the same Lua round trip that looks for the entry
(`SET <entry key>:lock <token> NX PX lock_ttl`). The holder goes upstream as
above and, once its entry is stored or its call has failed, deletes the lock
if it still holds its token. A pod that finds the lock taken polls (every
`lock_poll`) for the entry, for at most `lock_wait` and never beyond the
request's own deadline (`upstream.timeouts.total`), then answers every client
of its flight from it as `coalesced`; a lock that goes without an entry (the
holder's call failed) is taken over by the next poll, which then goes
upstream; a wait that runs out goes upstream without the lock. Another pod
cannot join a live stream: it waits for the complete entry and replays it (as
fast as possible), so its first byte comes when the leader's stream is
complete. A Redis error while taking or waiting is a miss that goes upstream,
as before. `Cache-Control: no-cache` requests neither take nor wait for a lock.
A stream longer than `lock_ttl` lets the lock expire and a waiter go upstream.

Control: `Cache-Control: no-cache` skips the lookup (and the joining) but
stores the fresh answer; `no-store` skips both. The answer carries
`x-sidecar-cache: hit | miss | bypass | coalesced`, and `facts["cache"]` the
same. A hit or a coalesced answer costs no upstream tokens: it sets
`facts["cached_usage"]` to the usage the answer represents (from
`facts["usage"]` of the call that filled the entry when a `metering` after
`cache` put it there, else from the answer itself: a plain body's `usage` or
Ollama's counts, a stream's usage event or closing NDJSON line, read once when
the entry is stored). A coalesced stream's usage is not known when it starts,
so it has none. A hit never reaches the policies after `cache`: to have hits
metered (as `cached` tokens, see `metering`), place `metering` before `cache`.
`purge(model)` serves DELETE /sidecar/cache.

Storage is a dict in the pod's memory with a total size cap (oldest entries
evicted first; an entry past its `ttl` is dropped when it is next looked up or
when room is made), or aiocache's `RedisCache` at `stores.redis_url` (keys
under `stores.prefix`, expiring after `ttl`). A store that fails or is slow
(`stores.timeout`) counts as a miss and the request still goes upstream;
nothing ever waits on it longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit

import orjson
import structlog
from multidict import CIMultiDict

if TYPE_CHECKING:
    from aiocache.base import BaseCache

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import SidecarError, StreamInterrupted
from sidecar.exchange import Exchange, Reply, StreamFormat
from sidecar.knobs import STRICT, AfterValidator, ByteSize, Duration, Field

# Routes whose answers may be cached; embeddings are deterministic by nature.
CACHEABLE_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
)
DEFAULT_ROUTES = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/api/chat",
    "/api/generate",
    "/api/embed",
    "/api/embeddings",
)
EMBEDDING_ROUTES = frozenset({"/v1/embeddings", "/api/embed", "/api/embeddings"})
# Routes whose stream entries answer plain requests and vice versa (assembled/split).
CONVERTIBLE_ROUTES = frozenset({"/v1/chat/completions", "/api/chat"})
JSON_TYPE = "application/json; charset=utf-8"
STREAM_TYPES: dict[StreamFormat, str] = {
    "sse": "text/event-stream",
    "ndjson": "application/x-ndjson",
}
# Request fields that do not change the answer.
IGNORED_FIELDS = frozenset({"user", "stream", "stream_options"})
HEADER = "x-sidecar-cache"
# Cross-pod single-flight, one round trip each. Take: the entry if it is there, else the
# key's lock if it is free (atomic, so a lock released after its entry was stored never
# lets a waiter miss that entry). Release: only by the holder of the token.
_LUA_TAKE = """
local entry = redis.call('GET', KEYS[1])
if entry then return {1, entry} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
"""
_LUA_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
CacheResult = Literal["hit", "miss", "bypass", "coalesced"]


def _log() -> Any:
    return structlog.get_logger("sidecar.cache")


def _known_routes(value: tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(value) - set(CACHEABLE_ROUTES))
    if unknown:
        raise ValueError(
            f"route(s) {', '.join(unknown)} cannot be cached; "
            f"cacheable routes are: {', '.join(CACHEABLE_ROUTES)}"
        )
    return value


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    __pydantic_config__ = STRICT

    ttl: Annotated[
        Duration,
        Field(gt=0, le=30 * 24 * 3600, description="How long an answer is kept (e.g. 10m)."),
    ] = 600.0
    scope: Annotated[
        Literal["tenant", "global"],
        Field(description="tenant: each tenant has its own entries; global: all share them."),
    ] = "tenant"
    cache_nondeterministic: Annotated[
        bool,
        Field(
            description="Also cache generations without temperature 0 or a seed (replays one sample).",
        ),
    ] = False
    max_entry_bytes: Annotated[
        ByteSize,
        Field(
            ge=1,
            le=256 * 1024 * 1024,
            description="Largest answer that is stored; bigger ones are relayed but not kept.",
        ),
    ] = 1024 * 1024
    max_bytes: Annotated[
        ByteSize,
        Field(
            ge=1,
            le=64 * 1024**3,
            description="Memory backend: total size of all entries; the oldest are evicted beyond it.",
        ),
    ] = 256 * 1024 * 1024
    single_flight: Annotated[
        bool,
        Field(
            description="Identical requests in flight wait for (or join the stream of) the first."
        ),
    ] = True
    complete_on_disconnect: Annotated[
        bool,
        Field(
            description="When every client of an upstream call has gone, let it finish and store it.",
        ),
    ] = False
    routes: Annotated[
        tuple[str, ...],
        AfterValidator(_known_routes),
        Field(min_length=1, description="Routes whose answers may be cached."),
    ] = DEFAULT_ROUTES
    replay_pace: Annotated[
        Duration | None,
        Field(
            gt=0,
            le=10,
            description="Pause between a replayed stream's events (e.g. 20ms); null: as fast as possible.",
        ),
    ] = None

    cross_pod: Annotated[
        bool,
        Field(
            description="Redis: single-flight across pods with a short lock per key (ignored on memory).",
        ),
    ] = True
    lock_ttl: Annotated[
        Duration,
        Field(gt=0, le=600, description="Redis: longest a pod holds a key's lock (e.g. 30s)."),
    ] = 30.0
    lock_wait: Annotated[
        Duration,
        Field(
            gt=0,
            le=600,
            description="Redis: longest a pod waits for another pod's entry before going upstream.",
        ),
    ] = 10.0
    lock_poll: Annotated[
        Duration,
        Field(
            ge=0.001,
            le=5,
            description="Redis: how often a waiting pod looks for the other pod's entry (e.g. 20ms).",
        ),
    ] = 0.02


# ---------------------------------------------------------------------------
# Entries: a small binary frame, so Redis keeps bytes as bytes (no pickle).
# orjson never writes a raw newline, so the header ends at the first b"\n".


class Entry:
    """One stored answer: status, headers, and its body or its stream's events."""

    __slots__ = ("body", "events", "headers", "status", "stream_format", "usage")

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        events: list[bytes] | None,
        stream_format: StreamFormat | None,
        usage: dict[str, Any] | None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.events = events
        self.stream_format = stream_format
        self.usage = usage

    def dumps(self) -> bytes:
        parts = self.events if self.events is not None else [self.body]
        head = orjson.dumps(
            {
                "s": self.status,
                "h": self.headers,
                "f": self.stream_format,
                "u": self.usage,
                "n": [len(part) for part in parts],
                "e": self.events is not None,
            }
        )
        return b"".join([head, b"\n", *parts])

    @classmethod
    def loads(cls, data: bytes) -> Entry:
        head, _, rest = data.partition(b"\n")
        meta = orjson.loads(head)
        parts: list[bytes] = []
        at = 0
        for size in meta["n"]:
            parts.append(rest[at : at + size])
            at += size
        if at != len(rest):
            raise ValueError("cache entry is truncated")
        events = parts if meta["e"] else None
        body = b"" if events is not None else (parts[0] if parts else b"")
        headers = [(str(k), str(v)) for k, v in meta["h"]]
        return cls(meta["s"], headers, body, events, meta["f"], meta["u"])


def split_events(data: bytes, stream_format: StreamFormat | None) -> list[bytes]:
    """The stream's bytes cut after each event (SSE: blank line; NDJSON: newline)."""
    separator = b"\n" if stream_format == "ndjson" else b"\n\n"
    *complete, rest = data.split(separator)
    events = [event + separator for event in complete]
    if rest:
        events.append(rest)
    return events


# ---------------------------------------------------------------------------
# Replay and fan-out: stream wrappers are classes (see sidecar.replies).


class ReplayChunks(AsyncGenerator[bytes, None]):
    """Yields a stored stream's events, one per chunk (`pace` seconds apart, if given)."""

    __slots__ = ("_events", "_index", "_pace")

    def __init__(self, events: list[bytes], pace: float | None = None) -> None:
        self._events = events
        self._index = 0
        self._pace = pace

    async def asend(self, value: None) -> bytes:
        if self._index >= len(self._events):
            raise StopAsyncIteration
        if self._pace is not None and self._index:
            await asyncio.sleep(self._pace)
            if self._index >= len(self._events):  # closed while pausing
                raise StopAsyncIteration
        event = self._events[self._index]
        self._index += 1
        return event

    async def athrow(self, typ: Any, val: Any = None, tb: TracebackType | None = None) -> bytes:
        self._index = len(self._events)
        if val is None:
            raise typ
        raise val

    async def aclose(self) -> None:
        self._index = len(self._events)


class _Flight:
    """One upstream call shared by every identical request that arrived while it ran."""

    __slots__ = (
        "_waiters",
        "chunks",
        "done",
        "error",
        "key",
        "leader",
        "ready",
        "refs",
        "remote",
        "reply",
        "store",
        "task",
        "usage",
    )

    def __init__(self, key: str, leader: Exchange, store: bool) -> None:
        self.key = key
        self.leader = leader
        self.store = store
        self.ready = asyncio.Event()  # the reply (or the error) is known
        # Readers waiting for a chunk or the end (changed/notify): a future each, not an
        # asyncio.Condition, whose lock cost two awaits per chunk and reader for nothing.
        self._waiters: list[asyncio.Future[None]] = []
        self.reply: Reply | None = None
        self.error: BaseException | None = None
        self.chunks: list[bytes] = []
        self.done = False  # the stream ended (error holds how, None: complete)
        self.refs = 0
        self.task: asyncio.Task[None] | None = None
        self.usage: dict[str, Any] | None = None
        self.remote = False  # answered from the entry another pod's call stored

    def changed(self) -> asyncio.Future[None]:
        """A future done at the next notify (a chunk came, or the stream ended)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    def notify(self) -> None:
        """Wake every reader waiting in `changed`."""
        waiters = self._waiters
        if waiters:
            self._waiters = []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)


class FanOutChunks(AsyncGenerator[bytes, None]):
    """One client's view of a shared stream: every chunk from the first, as it arrives.

    Closing it releases the client's hold on the upstream call; the last client
    to leave a call that has not ended cancels it (see ResponseCache._release).
    """

    __slots__ = ("_closed", "_flight", "_index", "_owner")

    def __init__(self, owner: ResponseCache, flight: _Flight) -> None:
        self._owner = owner
        self._flight = flight
        self._index = 0
        self._closed = False

    async def asend(self, value: None) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        flight = self._flight
        try:
            while self._index >= len(flight.chunks) and not flight.done:
                await flight.changed()
        except BaseException:
            await self.aclose()
            raise
        if self._index < len(flight.chunks):
            chunk = flight.chunks[self._index]
            self._index += 1
            return chunk
        await self.aclose()
        error = flight.error
        if error is None:
            raise StopAsyncIteration
        if isinstance(error, Exception):
            raise error
        raise StreamInterrupted("the upstream call was cancelled", code="upstream_cancelled")

    async def athrow(self, typ: Any, val: Any = None, tb: TracebackType | None = None) -> bytes:
        await self.aclose()
        if val is None:
            raise typ
        raise val

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._owner._release(self._flight)


# ---------------------------------------------------------------------------


@register("cache")
class ResponseCache:
    """Answers repeated deterministic requests from storage and merges identical ones in flight."""

    config_model: ClassVar[type[Any]] = CacheConfig

    def __init__(self, config: CacheConfig, context: PolicyContext) -> None:
        self.config = config
        self._routes = frozenset(config.routes)
        self._ttl = config.ttl
        stores = context.settings.stores
        self._timeout = stores.timeout
        self._namespace = f"{stores.prefix}cache"
        self._redis = stores.redis_url is not None
        # Redis: aiocache's RedisCache. Memory: a dict of entries (`_memory`), found
        # through `_index`: key -> (size, model tag, stored at), oldest first.
        self._backend: BaseCache | None = None
        if stores.redis_url is not None:
            self._backend = _open_redis(stores.redis_url, self._timeout, self._namespace)
        self._memory: dict[str, bytes] = {}
        self._index: OrderedDict[str, tuple[int, str, float]] = OrderedDict()
        self._bytes = 0
        self._flights: dict[str, _Flight] = {}
        # Flights that found another pod's lock and waited for its entry (readiness, tests).
        self.lock_waits = 0
        self._clock = time.monotonic
        self._upstream = context.settings.upstream
        self._cross_pod = self._redis and config.cross_pod and config.single_flight
        if self._cross_pod:
            assert self._backend is not None
            client = self._backend.client
            self._take_script = client.register_script(_LUA_TAKE)
            self._release_script = client.register_script(_LUA_RELEASE)
        metrics = context.metrics
        self._hits = metrics.counter(
            "cache_hits_total", "Requests answered from the cache, by route.", ("route",)
        )
        self._misses = metrics.counter(
            "cache_misses_total", "Cacheable requests that went upstream, by route.", ("route",)
        )
        self._coalesced = metrics.counter(
            "cache_coalesced_total",
            "Requests that joined an identical request in flight, by route.",
            ("route",),
        )
        self._bypassed = metrics.counter(
            "cache_bypass_total",
            "Requests the cache did not look up (no-store, no-cache, non-deterministic), by route.",
            ("route",),
        )
        self._evictions = metrics.counter(
            "cache_evictions_total", "Entries evicted to stay under max_bytes (memory).", ()
        )
        self._store_errors = metrics.counter(
            "cache_store_errors_total",
            "Cache storage operations that failed or timed out (treated as a miss).",
            ("operation",),
        )
        self._bytes_gauge = metrics.gauge(
            "cache_bytes", "Bytes held by the memory cache's entries.", ()
        )
        self._bypass_counters: dict[str, Any] = {}  # route -> its cache_bypass_total child
        self._nondeterministic = config.cache_nondeterministic
        self._tenant_scope = config.scope == "tenant"

    async def close(self) -> None:
        for flight in list(self._flights.values()):
            if flight.task is not None:
                flight.task.cancel()
        if self._backend is not None:
            with contextlib.suppress(Exception):
                await self._backend.client.aclose()  # redis-py 5+: aiocache's close() is deprecated

    def readiness(self) -> dict[str, Any]:
        return {
            "backend": "redis" if self._redis else "memory",
            "entries": len(self._index) if not self._redis else None,
            "bytes": self._bytes if not self._redis else None,
            "in_flight": len(self._flights),
            "lock_waits": self.lock_waits,
        }

    # -- the chain step ------------------------------------------------------

    def __call__(self, exchange: Exchange, call_next: Next) -> Awaitable[Reply]:
        # Not a coroutine itself: a request the cache does not look up (most chat
        # traffic) is handed to the next step with no frame or task of the cache's.
        route = exchange.route.name
        if exchange.method != "POST" or route not in self._routes:
            return call_next(exchange)
        document = exchange.json
        if not isinstance(document, dict):
            return call_next(exchange)
        header = exchange.headers.get("Cache-Control")
        control = _cache_control(header) if header else _NO_CONTROL
        if "no-store" in control or not (self._nondeterministic or _deterministic(route, document)):
            counter = self._bypass_counters.get(route)
            if counter is None:
                counter = self._bypass_counters[route] = self._bypassed.labels(route)
            counter.inc()
            exchange.facts["cache"] = "bypass"
            exchange.response_headers[HEADER] = "bypass"
            return call_next(exchange)
        return self._through_cache(exchange, call_next, document, control)

    async def _through_cache(
        self,
        exchange: Exchange,
        call_next: Next,
        document: dict[str, Any],
        control: frozenset[str],
    ) -> Reply:
        route = exchange.route.name
        stream, include_usage = _stream_mode(exchange, document)
        base = self._key_base(exchange, document)
        key = _key_of(base, stream, include_usage)
        fresh = "no-cache" in control
        while True:
            if not fresh:
                flight = self._flights.get(key) if self.config.single_flight else None
                if flight is not None and _finished(flight):
                    # Answered, its entry still being written: read your writes.
                    self._hits.labels(route).inc()
                    reply = await self._follow(exchange, flight, "hit")
                    if reply is not None:
                        return reply
                entry = await self._lookup(exchange, base, key, stream, include_usage)
                if entry is not None:
                    return self._answer(exchange, entry)
                flight = self._flights.get(key) if self.config.single_flight else None
                if flight is not None:
                    self._coalesced.labels(route).inc()
                    reply = await self._follow(exchange, flight, "coalesced")
                    if reply is not None:
                        return reply
                    continue  # the call was abandoned by all before answering: go again
            flight = _Flight(key, exchange, store=True)
            if self.config.single_flight and key not in self._flights:
                self._flights[key] = flight
            shared = self._cross_pod and not fresh
            flight.task = asyncio.create_task(self._run(flight, call_next, shared))
            reply = await self._follow(exchange, flight, "miss")
            if reply is None:  # _follow raises for a leader; kept for the type checker
                raise SidecarError(
                    502, "the upstream call was cancelled", code="upstream_disconnected"
                )
            return reply

    def _mark(self, exchange: Exchange, result: CacheResult) -> None:
        exchange.facts["cache"] = result
        exchange.response_headers[HEADER] = result

    def _key_base(self, exchange: Exchange, document: dict[str, Any]) -> _KeyBase:
        """What every key of this request shares (see _key_of): the body is normalised
        and serialised once, however many forms of the answer are looked up."""
        route = exchange.route.name
        body = {k: v for k, v in document.items() if k not in IGNORED_FIELDS}
        model = exchange.model or ""
        body["model"] = model
        body.pop("name", None)
        if route.startswith("/v1/") and route not in EMBEDDING_ROUTES:
            for name in ("temperature", "top_p"):
                body[name] = _number(body.get(name), 1.0)
        options = body.get("options")
        if isinstance(options, dict):
            body["options"] = {
                k: _number(v, None) if k in ("temperature", "top_p") else v
                for k, v in options.items()
            }
        scope = str(exchange.facts.get("tenant", "anonymous")) if self._tenant_scope else ""
        # The key hashes orjson's `[route, model, scope, stream, include_usage, body]`
        # (keys sorted): here the bytes before and after the two flags.
        head = orjson.dumps([route, model, scope])
        tail = orjson.dumps(body, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
        return head[:-1] + b",", b"," + tail + b"]", _model_tag(model)

    async def _lookup(
        self,
        exchange: Exchange,
        base: _KeyBase,
        key: str,
        stream: bool,
        include_usage: bool,
    ) -> Entry | None:
        """The entry for `key`; on a convertible route, else the other form's, converted."""
        route = exchange.route.name
        if route not in CONVERTIBLE_ROUTES:
            return await self._get(key)
        if self._backend is None:
            # Memory: the other form's keys are made only when this one is missing.
            found = self._get_memory(key)
            if found is not None:
                return found
        if stream:
            others = [_key_of(base, False, False)]
        elif route.startswith("/v1/"):
            # A stream with its usage event first: it assembles a body with the same usage.
            others = [_key_of(base, True, True), _key_of(base, True, False)]
        else:
            others = [_key_of(base, True, False)]
        if self._backend is None:
            entries = [None, *(self._get_memory(other) for other in others)]
        else:
            entries = await self._get_many([key, *others])
        if entries[0] is not None:
            return entries[0]
        for other in entries[1:]:
            if other is not None:
                converted = convert_entry(route, other, stream, include_usage)
                if converted is not None:
                    return converted
        return None

    # -- answering -----------------------------------------------------------

    def _answer(self, exchange: Exchange, entry: Entry) -> Reply:
        self._hits.labels(exchange.route.name).inc()
        self._mark(exchange, "hit")
        if entry.usage is not None:
            exchange.facts["cached_usage"] = entry.usage
        headers: CIMultiDict[str] = CIMultiDict(entry.headers)
        if entry.events is not None:
            return Reply(
                entry.status,
                headers,
                chunks=ReplayChunks(entry.events, self.config.replay_pace),
                stream_format=entry.stream_format,
            )
        return Reply(entry.status, headers, body=entry.body)

    async def _follow(
        self, exchange: Exchange, flight: _Flight, result: CacheResult
    ) -> Reply | None:
        """Wait for `flight`'s answer; None when it was abandoned before it answered."""
        flight.refs += 1
        try:
            await flight.ready.wait()
        except BaseException:
            if result == "miss":
                self._misses.labels(exchange.route.name).inc()
            await self._release(flight)
            raise
        if result == "miss":
            if flight.remote:  # another pod's call answered it: this pod never went upstream
                result = "coalesced"
                self._coalesced.labels(exchange.route.name).inc()
            else:
                self._misses.labels(exchange.route.name).inc()
        reply = flight.reply
        if reply is None:
            await self._release(flight)
            error = flight.error
            if isinstance(error, asyncio.CancelledError) or error is None:
                if result == "miss":
                    raise SidecarError(
                        502, "the upstream call was cancelled", code="upstream_disconnected"
                    )
                return None
            raise error
        self._mark(exchange, result)
        if result != "miss" and flight.usage is not None:
            exchange.facts["cached_usage"] = flight.usage
        headers: CIMultiDict[str] = CIMultiDict(reply.headers)
        if reply.chunks is None:
            await self._release(flight)
            return Reply(reply.status, headers, body=reply.body)
        pace = self.config.replay_pace
        if pace is not None and flight.done and flight.error is None:
            # The whole stream is already known (a call that just ended, or another pod's
            # stored entry): a replay like any other hit, paced the same way.
            await self._release(flight)
            events = split_events(b"".join(flight.chunks), reply.stream_format)
            return Reply(
                reply.status,
                headers,
                chunks=ReplayChunks(events, pace),
                stream_format=reply.stream_format,
            )
        return Reply(
            reply.status,
            headers,
            chunks=FanOutChunks(self, flight),
            stream_format=reply.stream_format,
        )

    async def _release(self, flight: _Flight) -> None:
        flight.refs -= 1
        if flight.refs > 0 or flight.done or self.config.complete_on_disconnect:
            return
        # Every client has gone before the call ended: stop it (closes the upstream).
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        task = flight.task
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    # -- the upstream call, shared -------------------------------------------

    async def _run(self, flight: _Flight, call_next: Next, shared: bool = False) -> None:
        exchange = flight.leader
        token = ""
        try:
            if shared:
                taken = await self._lead_or_wait(flight)
                if taken is None:
                    return  # answered from the entry another pod's call stored
                token = taken
            try:
                reply = await call_next(exchange)
            except BaseException as error:
                flight.error = error
                flight.done = True
                flight.ready.set()
                if not isinstance(error, Exception):
                    raise
                return
            flight.reply = reply
            if reply.chunks is None:
                flight.done = True
                flight.usage = exchange.facts.get("usage") or _plain_usage(reply.body)
                flight.ready.set()
                if reply.status == 200 and flight.store:
                    await self._set(
                        flight.key,
                        Entry(
                            reply.status,
                            list(reply.headers.items()),
                            reply.body,
                            None,
                            None,
                            flight.usage,
                        ),
                    )
                return
            flight.ready.set()
            await self._pump(flight, reply)
        finally:
            if self._flights.get(flight.key) is flight:
                del self._flights[flight.key]
            if token:  # after the flight has gone: its entry (if any) is stored by now
                await self._unlock(flight.key, token)

    # -- single-flight across pods (Redis) -------------------------------------

    async def _lead_or_wait(self, flight: _Flight) -> str | None:
        """Take the key's lock (its token: this pod goes upstream) or wait for its entry.

        None: the entry another pod stored answered the flight. "": go upstream without
        the lock (the wait ran out, or Redis failed: as without cross-pod single-flight).
        A lock released without an entry (that pod's call failed) is taken over here.
        """
        exchange = flight.leader
        loop = asyncio.get_running_loop()
        deadline = exchange.started_at + self._upstream.timeouts_for(exchange.route.name).total
        give_up = min(loop.time() + self.config.lock_wait, deadline)
        poll = self.config.lock_poll
        token = secrets.token_hex(16)
        entry_key = f"{self._namespace}:{flight.key}"
        lock_ttl = max(1, int(self.config.lock_ttl * 1000))
        waited = False
        while True:
            try:
                async with asyncio.timeout(self._timeout):
                    found = await self._take_script(
                        keys=[entry_key, f"{entry_key}:lock"], args=[token, lock_ttl]
                    )
                state = int(found[0])
                if state == 1:
                    self._answer_remote(flight, Entry.loads(bytes(found[1])))
                    return None
            except Exception as exc:
                self._store_errors.labels("lock").inc()
                _log().warning("cache_store_failed", operation="lock", error=repr(exc))
                return ""
            if state == 2:
                return token
            if loop.time() + poll >= give_up:
                _log().debug("cache_lock_wait_expired", key=flight.key)
                return ""
            # Another pod holds the lock: wait for its entry (counted once per flight).
            if not waited:
                waited = True
                self.lock_waits += 1
            await asyncio.sleep(poll)

    def _answer_remote(self, flight: _Flight, entry: Entry) -> None:
        """Complete `flight` with a stored entry: its clients get it as a coalesced answer."""
        flight.remote = True
        flight.usage = entry.usage
        headers: CIMultiDict[str] = CIMultiDict(entry.headers)
        if entry.events is None:
            flight.reply = Reply(entry.status, headers, body=entry.body)
        else:
            flight.chunks = list(entry.events)
            flight.reply = Reply(
                entry.status,
                headers,
                chunks=ReplayChunks(entry.events),
                stream_format=entry.stream_format,
            )
        flight.done = True
        flight.ready.set()

    async def _unlock(self, key: str, token: str) -> None:
        entry_key = f"{self._namespace}:{key}"
        try:
            async with asyncio.timeout(self._timeout):
                await self._release_script(keys=[f"{entry_key}:lock"], args=[token])
        except Exception as exc:  # it expires after lock_ttl anyway
            self._store_errors.labels("unlock").inc()
            _log().warning("cache_store_failed", operation="unlock", error=repr(exc))

    async def _pump(self, flight: _Flight, reply: Reply) -> None:
        chunks = reply.chunks
        assert chunks is not None
        size = 0
        try:
            async for chunk in chunks:
                flight.chunks.append(chunk)
                size += len(chunk)
                flight.notify()
        except BaseException as error:
            flight.error = error
            flight.done = True
            flight.notify()
            if not isinstance(error, Exception):
                raise
            return
        finally:
            await chunks.aclose()
        flight.done = True
        flight.usage = flight.leader.facts.get("usage")
        flight.notify()
        if reply.status == 200 and flight.store and size <= self.config.max_entry_bytes:
            data = b"".join(flight.chunks)
            events = split_events(data, reply.stream_format)
            if flight.usage is None:
                flight.usage = _stream_usage(events, reply.stream_format)
            entry = Entry(
                reply.status,
                list(reply.headers.items()),
                b"",
                events,
                reply.stream_format,
                flight.usage,
            )
            await self._set(flight.key, entry)

    # -- storage -------------------------------------------------------------

    async def _get(self, key: str) -> Entry | None:
        if self._backend is None:
            return self._get_memory(key)
        try:
            async with asyncio.timeout(self._timeout):
                data = await self._backend.get(key)
            if data is None:
                return None
            return Entry.loads(data)
        except Exception as exc:
            self._store_errors.labels("get").inc()
            _log().warning("cache_store_failed", operation="get", error=repr(exc))
            return None

    def _get_memory(self, key: str) -> Entry | None:
        known = self._index.get(key)
        if known is None:
            return None
        data = self._memory.get(key)
        if data is None or self._clock() - known[2] >= self._ttl:
            self._forget(key)  # expired
            self._memory.pop(key, None)
            return None
        try:
            return Entry.loads(data)
        except Exception as exc:
            self._store_errors.labels("get").inc()
            _log().warning("cache_store_failed", operation="get", error=repr(exc))
            return None

    async def _get_many(self, keys: list[str]) -> list[Entry | None]:
        """Several entries in one store round trip (Redis MGET); a failure is all misses."""
        if self._backend is None:
            return [self._get_memory(key) for key in keys]
        try:
            async with asyncio.timeout(self._timeout):
                values = await self._backend.multi_get(keys)
            return [Entry.loads(value) if value is not None else None for value in values]
        except Exception as exc:
            self._store_errors.labels("get").inc()
            _log().warning("cache_store_failed", operation="get", error=repr(exc))
            return [None] * len(keys)

    async def _set(self, key: str, entry: Entry) -> None:
        data = entry.dumps()
        if len(data) > self.config.max_entry_bytes:
            return
        if self._backend is None:
            self._make_room(key, len(data))
            self._memory[key] = data
            self._index[key] = (len(data), key.partition(":")[0], self._clock())
            self._bytes += len(data)
            self._bytes_gauge.set(self._bytes)
            return
        try:
            async with asyncio.timeout(self._timeout):
                await self._backend.set(key, data, ttl=self._ttl)
        except Exception as exc:
            self._store_errors.labels("set").inc()
            _log().warning("cache_store_failed", operation="set", error=repr(exc))

    def _make_room(self, key: str, size: int) -> None:
        """Memory: drop `key`'s old entry, expired entries, then the oldest until `size` fits."""
        self._forget(key)
        expired_before = self._clock() - self._ttl
        while self._index:
            oldest, (_, _, stored_at) = next(iter(self._index.items()))
            if stored_at > expired_before and self._bytes + size <= self.config.max_bytes:
                break
            if stored_at > expired_before:
                self._evictions.inc()
            self._forget(oldest)
            self._memory.pop(oldest, None)

    def _forget(self, key: str) -> None:
        known = self._index.pop(key, None)
        if known is not None:
            self._bytes -= known[0]
            self._bytes_gauge.set(self._bytes)

    async def purge(self, model: str | None) -> int:
        """Drop every entry (or those of one model); the number of entries dropped."""
        tag = _model_tag(model) if model is not None else None
        if self._backend is None:
            doomed = [k for k, v in self._index.items() if tag is None or v[1] == tag]
            for key in doomed:
                self._forget(key)
                self._memory.pop(key, None)
            return len(doomed)
        pattern = f"{self._namespace}:{tag or ''}*"
        client = self._backend.client
        deleted = 0
        async with asyncio.timeout(max(self._timeout, 10.0)):
            batch: list[bytes] = []
            async for key in client.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += int(await client.delete(*batch))
                    batch = []
            if batch:
                deleted += int(await client.delete(*batch))
        return deleted


def _stream_mode(exchange: Exchange, document: dict[str, Any]) -> tuple[bool, bool]:
    """Whether the client wants a stream, and (for a stream) `stream_options.include_usage`."""
    stream = exchange.wants_stream
    options = document.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return stream, include_usage


# ---------------------------------------------------------------------------
# A stream entry answering a plain request, and a plain entry answering a stream.


def convert_entry(route: str, entry: Entry, stream: bool, include_usage: bool) -> Entry | None:
    """`entry` in the other form (stream <-> plain); None when it cannot be converted."""
    if entry.status != 200 or (entry.events is not None) == stream:
        return None
    try:
        if stream:
            stream_format: StreamFormat
            document = orjson.loads(entry.body)
            if not isinstance(document, dict):
                return None
            if route == "/api/chat":
                events, stream_format = _native_chat_events(document), "ndjson"
            else:
                usage = document.get("usage") or _usage_counts(entry.usage)
                events = _openai_chat_events(document, usage if include_usage else None)
                stream_format = "sse"
            headers = _with_type(entry.headers, STREAM_TYPES[stream_format])
            return Entry(200, headers, b"", events, stream_format, entry.usage)
        assert entry.events is not None
        if route == "/api/chat":
            body = _native_chat_body(entry.events)
        else:
            body = _openai_chat_body(entry.events, _usage_counts(entry.usage))
        usage = entry.usage or _plain_usage(body)
        return Entry(200, _with_type(entry.headers, JSON_TYPE), body, None, None, usage)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return None


def _with_type(headers: list[tuple[str, str]], content_type: str) -> list[tuple[str, str]]:
    dropped = {"content-type", "content-length", "transfer-encoding"}
    kept = [(k, v) for k, v in headers if k.lower() not in dropped]
    return [("Content-Type", content_type), *kept]


def _usage_counts(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's three usage counts from a recorded usage (metering's facts carry more)."""
    if not isinstance(usage, dict) or "prompt_tokens" not in usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse_payload(event: bytes) -> bytes:
    return b"\n".join(
        line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    )


def _merge_tool_calls(calls: list[dict[str, Any]], more: Any) -> None:
    """Streamed tool calls: a call with a known `index` continues its arguments."""
    for call in more or []:
        if not isinstance(call, dict):
            raise ValueError("tool call is not an object")
        index = call.get("index")
        known = next((c for c in calls if index is not None and c.get("index") == index), None)
        function = call.get("function")
        if known is None:
            copy = dict(call)
            if isinstance(function, dict):
                copy["function"] = dict(function)
            calls.append(copy)
        elif isinstance(function, dict):
            into = known.setdefault("function", {})
            for name, value in function.items():
                if name == "arguments" and isinstance(value, str):
                    into["arguments"] = str(into.get("arguments") or "") + value
                elif value is not None:
                    into[name] = value


def _openai_chat_body(events: list[bytes], recorded: dict[str, Any] | None) -> bytes:
    """A chat.completion assembled from a complete chat.completion.chunk stream."""
    first: dict[str, Any] | None = None
    role = "assistant"
    content: list[str] = []
    reasoning: list[str] = []
    tool_calls: list[dict[str, Any]] = []
    finish: Any = None
    usage: Any = None
    done = False
    for event in events:
        payload = _sse_payload(event).strip()
        if not payload:
            continue
        if payload == b"[DONE]":
            done = True
            continue
        chunk = orjson.loads(payload)
        if not isinstance(chunk, dict) or "error" in chunk:
            raise ValueError("not a chunk")
        if first is None:
            first = chunk
        if isinstance(chunk.get("usage"), dict) and not chunk.get("choices"):
            usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                raise ValueError("more than one choice")
            delta = choice.get("delta") or {}
            role = delta.get("role") or role
            if isinstance(delta.get("content"), str):
                content.append(delta["content"])
            if isinstance(delta.get("reasoning"), str):
                reasoning.append(delta["reasoning"])
            _merge_tool_calls(tool_calls, delta.get("tool_calls"))
            if choice.get("finish_reason") is not None:
                finish = choice["finish_reason"]
    if first is None or not done:
        raise ValueError("not a complete stream")
    message: dict[str, Any] = {"role": role, "content": "".join(content)}
    if reasoning:
        message["reasoning"] = "".join(reasoning)
    if tool_calls:
        message["tool_calls"] = tool_calls
    body: dict[str, Any] = {"id": first.get("id"), "object": "chat.completion"}
    for name in ("created", "model", "system_fingerprint"):
        if name in first:
            body[name] = first[name]
    body["choices"] = [{"index": 0, "message": message, "finish_reason": finish}]
    usage = usage if usage is not None else recorded
    if usage is not None:
        body["usage"] = usage
    return orjson.dumps(body)


def _openai_chat_events(document: dict[str, Any], usage: Any) -> list[bytes]:
    """A chat.completion split into a stream: role, content, finish (, usage), [DONE]."""
    choices = document["choices"]
    if len(choices) != 1:
        raise ValueError("more than one choice")
    choice = choices[0]
    message = choice["message"]
    base: dict[str, Any] = {"id": document.get("id"), "object": "chat.completion.chunk"}
    for name in ("created", "model", "system_fingerprint"):
        if name in document:
            base[name] = document[name]

    def event(delta: dict[str, Any] | None, finish: Any, **extra: Any) -> bytes:
        chunk = dict(base)
        chunk["choices"] = (
            [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        )
        chunk.update(extra)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    delta: dict[str, Any] = {"content": message.get("content") or ""}
    if message.get("reasoning"):
        delta["reasoning"] = message["reasoning"]
    if message.get("tool_calls"):
        delta["tool_calls"] = [
            {"index": i, **call} if isinstance(call, dict) and "index" not in call else call
            for i, call in enumerate(message["tool_calls"])
        ]
    events = [
        event({"role": message.get("role") or "assistant", "content": ""}, None),
        event(delta, None),
        event({}, choice.get("finish_reason")),
    ]
    if usage is not None:
        events.append(event(None, None, usage=usage))
    events.append(b"data: [DONE]\n\n")
    return events


def _native_chat_body(events: list[bytes]) -> bytes:
    """Ollama's /api/chat answer assembled from its NDJSON stream: the last line, whole text."""
    lines = [orjson.loads(event) for event in events if event.strip()]
    final = lines[-1]
    if not isinstance(final, dict) or final.get("done") is not True:
        raise ValueError("not a complete stream")
    content: list[str] = []
    thinking: list[str] = []
    tool_calls: list[Any] = []
    for line in lines:
        message = line.get("message")
        if not isinstance(message, dict):
            continue
        if isinstance(message.get("content"), str):
            content.append(message["content"])
        if isinstance(message.get("thinking"), str):
            thinking.append(message["thinking"])
        if isinstance(message.get("tool_calls"), list):
            tool_calls.extend(message["tool_calls"])
    message = dict(final.get("message") or {"role": "assistant"})
    message["content"] = "".join(content)
    if thinking:
        message["thinking"] = "".join(thinking)
    if tool_calls:
        message["tool_calls"] = tool_calls
    body = dict(final)
    body["message"] = message
    return orjson.dumps(body)


def _native_chat_events(document: dict[str, Any]) -> list[bytes]:
    """Ollama's /api/chat answer as a stream: one line with the message, then the final line."""
    if document.get("done") is not True:
        raise ValueError("not a final answer")
    message = document["message"]
    first = {
        "model": document.get("model"),
        "created_at": document.get("created_at"),
        "message": message,
        "done": False,
    }
    final = dict(document)
    final["message"] = {"role": message.get("role") or "assistant", "content": ""}
    return [orjson.dumps(first) + b"\n", orjson.dumps(final) + b"\n"]


def _open_redis(redis_url: str, timeout: float, namespace: str) -> BaseCache:
    # Imported here: aiocache loads redis-py, which loads OpenTelemetry whenever it is
    # installed; a sidecar without a Redis cache should pay for none of them.
    from aiocache import Cache as AioCache
    from aiocache.serializers import NullSerializer

    as_bytes = NullSerializer(encoding=None)  # bytes in, bytes out
    # timeout=None: every call is bounded by the policy's own asyncio.timeout; aiocache's
    # would add an asyncio.wait_for, a task per operation.
    parts = urlsplit(redis_url)
    if parts.scheme == "unix":
        raise ValueError("the cache policy needs a redis:// or rediss:// URL, not unix://")
    db = parts.path.strip("/") or "0"
    return AioCache(
        AioCache.REDIS,
        endpoint=parts.hostname or "127.0.0.1",
        port=parts.port or 6379,
        db=int(db),
        password=unquote(parts.password) if parts.password else None,
        ssl=parts.scheme == "rediss",
        serializer=as_bytes,
        namespace=namespace,
        timeout=None,
        create_connection_timeout=timeout,
    )


def _finished(flight: _Flight) -> bool:
    """The call ended with a complete 200 answer (it is being stored, or was too big to)."""
    reply = flight.reply
    return flight.done and flight.error is None and reply is not None and reply.status == 200


# A request's key material around its (stream, include_usage) flags, and its model tag.
_KeyBase = tuple[bytes, bytes, str]


def _key_of(base: _KeyBase, stream: bool, include_usage: bool) -> str:
    """A cache key: the model's tag (for purge), then a SHA-256 of the key material."""
    before, after, tag = base
    flags = (b"true," if stream else b"false,") + (b"true" if include_usage else b"false")
    return f"{tag}:{hashlib.sha256(before + flags + after).hexdigest()}"


@functools.lru_cache(maxsize=256)
def _model_tag(model: str) -> str:
    """A short glob-safe tag for a model, so purge(model) finds its keys by prefix."""
    name = model.removesuffix(":latest")
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def _number(value: Any, default: float | None) -> Any:
    """0 and 0.0 (and a missing value and its default) are the same sampling setting."""
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


_NO_CONTROL: frozenset[str] = frozenset()


def _cache_control(value: str | None) -> frozenset[str]:
    if not value:
        return frozenset()
    return frozenset(part.strip().lower() for part in value.split(",") if part.strip())


def _deterministic(route: str, document: dict[str, Any]) -> bool:
    if route in EMBEDDING_ROUTES:
        return True
    where: Any = document if route.startswith("/v1/") else document.get("options")
    if not isinstance(where, dict):
        return False
    if where.get("seed") is not None:
        return True
    temperature = where.get("temperature")
    kind = type(temperature)
    if kind is float or kind is int:  # what JSON gives: no isinstance (nor union) per call
        return bool(temperature == 0)
    return (
        temperature is not None
        and isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and temperature == 0
    )


def _stream_usage(events: list[bytes], stream_format: StreamFormat | None) -> dict[str, Any] | None:
    """The usage a complete stream carries: its last usage event (SSE) or closing line (NDJSON)."""
    for event in reversed(events):
        if stream_format == "ndjson":
            if event.strip():
                return _plain_usage(event)
            continue
        if b'"usage"' not in event:
            continue
        payload = b"\n".join(
            line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
        )
        found = _plain_usage(payload)
        if found is not None:
            return found
    return None


def _plain_usage(body: bytes) -> dict[str, Any] | None:
    """The usage a plain answer carries (OpenAI's `usage` or Ollama's counts), if any."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        for name in ("response", "message"):
            inner = document.get(name)
            if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
                usage = inner["usage"]
                break
    if isinstance(usage, dict):
        return usage
    if "prompt_eval_count" in document:
        prompt = int(document.get("prompt_eval_count") or 0)
        completion = int(document.get("eval_count") or 0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
    return None
