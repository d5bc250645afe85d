"""metering: tokens, requests and cost per tenant and model, from the upstream's own counts.

Where the counts come from:

- A plain answer: one orjson parse of the body, and only on a generation route
  with a 200: OpenAI's `usage` (`prompt_tokens`/`completion_tokens`, or
  `input_tokens`/`output_tokens` on /v1/messages and /v1/responses), or Ollama's
  native `prompt_eval_count`/`eval_count` (embeddings: `prompt_eval_count`).
- A /v1/chat/completions or /v1/completions stream: the request goes upstream
  with `stream_options.include_usage: true` added, and the usage-only event
  (`"choices": []` with `usage`) is taken out again when the client did not ask
  for it, so the client's bytes are exactly those it would have had. Ollama's
  /v1/completions writer also puts a zero `usage` on every chunk when usage is
  asked for; for a client that did not ask, that `,"usage":{...}` member is cut
  from each such event (byte-exact for Ollama's serialisation; any other is
  re-serialised without it). When stripping, complete events are passed on
  (an event split across reads waits for its end; no byte is changed).
- /v1/responses and /v1/messages streams: the usage their closing events carry.
- A native /api/chat or /api/generate stream: only the last line (`"done": true`)
  is parsed.

Per chunk the work is a search for the end of the last event and a substring
test for `"usage"`; only candidate events are parsed. When the upstream gave no
usage (stream cut short, client gone), the prompt is estimated from the request
body and the completion from the text streamed so far (sidecar/tokens.py, an
offline tokenizer), the record is marked `estimated` (metrics label
`source="estimated"`, a `usage_estimated` log line). A client that goes away
mid-stream is metered too: the stream wrapper's close records it as "abandoned".

Prices are per 1M tokens (OpenAI's pricing unit) per model, in any currency;
`llama3.2` and `llama3.2:latest` name the same price. Results go to
`exchange.facts["usage"]`, to the counters `ollama_sidecar_tokens_total`,
`..._requests_metered_total`, `..._cost_total`, and to `record()`, the one
place a shared store plugs in later (in memory per process until then, shown
in /readyz detail). Put `tracing` outside (before) `metering` in the YAML so
its span sees `facts["usage"]` at the stream's end.

Cache hits: an answer the `cache` policy gave from storage or from an identical
request in flight (`facts["cache"]` is "hit" or "coalesced") used no upstream
tokens. Metering counts it as 0 prompt and 0 completion tokens (no cost), and
the tokens the answer represents (read from the replayed answer as above) as
`tokens_total{kind="cached"}` and `requests_metered_total{source="cached"}`;
`facts["usage"]` then says `"cached": true`, `total_tokens: 0`, `cost: 0`, and
carries the represented counts as `cached_tokens` (with `cached_prompt_tokens`
and `cached_completion_tokens`), so a budget charges nothing for a hit by
reading `total_tokens`, or may charge `cached_tokens` if it chooses. The cache
answers a hit without calling the policies after it, so only a `metering`
placed before (outside) `cache` sees hits; placed after it, it meters the one
upstream call of each miss and never hears of the hits.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Protocol

import orjson
import structlog

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import StreamInterrupted
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, ByteSize, Field
from sidecar.ledger import UsageLedger, UsageRecord
from sidecar.replies import Layer, PushSource, StreamEnd, WatchedChunks
from sidecar.routes import GENERATION_ROUTES
from sidecar.streams import LastNdjsonLine
from sidecar.tokens import Encoding, TokenCounter, completion_text, prompt_tokens

# Routes that run a model, and so use tokens.
METERED_ROUTES = frozenset(GENERATION_ROUTES)
# Streams whose usage event the sidecar asks for with stream_options.include_usage.
INCLUDE_USAGE_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
OTHER = "other"
# facts["cache"] values (set by the cache policy) of an answer that used no upstream tokens.
CACHED_RESULTS = frozenset({"hit", "coalesced"})
_USAGE = b'"usage"'


def _log() -> Any:
    return structlog.get_logger("sidecar.metering")


@dataclass(frozen=True, kw_only=True)
class Price:
    __pydantic_config__ = STRICT

    prompt: Annotated[float, Field(ge=0, description="Price of 1M prompt tokens.")] = 0.0
    completion: Annotated[float, Field(ge=0, description="Price of 1M completion tokens.")] = 0.0


@dataclass(frozen=True, kw_only=True)
class MeteringConfig:
    __pydantic_config__ = STRICT

    prices: Annotated[
        dict[str, Price],
        Field(
            description="Price per 1M tokens by model (with or without :latest); unlisted models cost 0.",
        ),
    ] = field(default_factory=dict)
    tokenizer: Annotated[
        Encoding, Field(description="Encoding for estimates when the upstream gives no usage.")
    ] = "llama3"
    stream_usage: Annotated[
        bool,
        Field(
            description="Ask /v1 chat/completions streams for usage (hidden again from clients that did not).",
        ),
    ] = True
    max_tenants: Annotated[
        int,
        Field(ge=1, le=100_000, description="Distinct tenant labels; more are counted as 'other'."),
    ] = 100
    max_models: Annotated[
        int,
        Field(ge=1, le=100_000, description="Distinct model labels; more are counted as 'other'."),
    ] = 50
    estimate_buffer: Annotated[
        ByteSize,
        Field(
            ge=0,
            le=64 * 1024 * 1024,
            description="Stream bytes kept per request for an estimate; beyond it the count is scaled.",
        ),
    ] = 1024 * 1024


class UsageStore(Protocol):
    """Where usage records go: by default the usage ledger in the shared store."""

    def record(self, record: UsageRecord) -> None: ...


@dataclass(slots=True)
class Totals:
    requests: int = 0
    estimated_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def add(self, record: UsageRecord) -> None:
        self.requests += 1
        self.estimated_requests += record.estimated
        self.prompt_tokens += record.prompt_tokens
        self.completion_tokens += record.completion_tokens
        self.cost += record.cost

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "estimated_requests": self.estimated_requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cost": round(self.cost, 9),
        }


class MemoryUsage:
    """Per-process totals by (tenant, model); the keys are the bounded label values."""

    def __init__(self) -> None:
        self.total = Totals()
        self.by_key: dict[tuple[str, str], Totals] = {}

    def totals_for(self, tenant: str, model: str) -> Totals:
        totals = self.by_key.get((tenant, model))
        if totals is None:
            totals = self.by_key[(tenant, model)] = Totals()
        return totals

    def record(self, record: UsageRecord) -> None:
        self.total.add(record)
        self.totals_for(record.tenant, record.model).add(record)


class BoundedLabels:
    """Label values as seen, up to `limit` distinct ones; later newcomers are 'other'."""

    __slots__ = ("_limit", "_seen")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Counts:
    """Prompt and completion counts found in a stream; a value 0 never replaces a real one."""

    __slots__ = ("completion", "final", "prompt")

    def __init__(self) -> None:
        self.prompt: int | None = None
        self.completion: int | None = None
        self.final = False  # the event that closes a stream's usage was seen

    def take(self, prompt: Any, completion: Any) -> None:
        prompt, completion = _int(prompt), _int(completion)
        if prompt is not None and (prompt or self.prompt is None):
            self.prompt = prompt
        if completion is not None and (completion or self.completion is None):
            self.completion = completion


def usage_of(document: dict[str, Any]) -> tuple[Any, Any] | None:
    """(prompt, completion) from an OpenAI/Anthropic/Responses `usage`, or None."""
    usage = document.get("usage")
    if not isinstance(usage, dict):
        for key in ("response", "message"):
            inner = document.get(key)
            if isinstance(inner, dict) and isinstance(inner.get("usage"), dict):
                usage = inner["usage"]
                break
        else:
            return None
    return counts_of_usage(usage)


def counts_of_usage(usage: dict[str, Any]) -> tuple[Any, Any]:
    """(prompt, completion) from a usage object, OpenAI's or Anthropic's names."""
    return (
        usage.get("prompt_tokens", usage.get("input_tokens")),
        usage.get("completion_tokens", usage.get("output_tokens")),
    )


class SseUsageScanner:
    """Finds usage in an SSE stream fed read by read; with `strip`, hides it from the client.

    `feed` returns the bytes to pass on: the chunk itself when not stripping;
    when stripping, the complete events so far minus the usage-only event (and
    minus the `usage` member Ollama's /v1/completions adds to every chunk). An
    event split across reads is kept until its end; several events in one read
    are each looked at. Only events containing `"usage"` are parsed.
    """

    __slots__ = ("_pending", "_strip", "counts")

    def __init__(self, strip: bool) -> None:
        self.counts = Counts()
        self._strip = strip
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data
            return b"" if self._strip else chunk
        cut += 2
        complete = data[:cut]
        self._pending = data[cut:]
        found = complete.find(_USAGE)
        if found >= 0:
            complete = self._scan(complete, found)
        return complete if self._strip else chunk

    def finish(self) -> bytes:
        """The bytes of an unfinished last event (stripping only), at the stream's end."""
        rest, self._pending = self._pending, b""
        if not rest:
            return b""
        found = rest.find(_USAGE)
        if found >= 0:
            rest = self._scan(rest, found)
        return rest if self._strip else b""

    def _scan(self, data: bytes, found: int) -> bytes:
        """`data` (whole events) with each event that mentions usage (the first at `found`) looked at.

        Only those events are cut out and parsed: the rest is copied by slice,
        never split into events (splitting a 5 KB stream cost more than the
        parse of its usage event).
        """
        pieces: list[bytes] = []
        done = 0  # data[:done] is decided (in pieces, or unchanged)
        copied = 0  # data[:copied] is in pieces
        while found >= 0:
            start = data.rfind(b"\n\n", done, found)
            start = done if start < 0 else start + 2
            end = data.find(b"\n\n", found)
            end = len(data) if end < 0 else end
            event = data[start:end]
            replacement = self._event(event)
            if replacement is not event:
                pieces.append(data[copied:start])
                if replacement is None:
                    end = min(end + 2, len(data))  # the event and its blank line go
                else:
                    pieces.append(replacement)
                copied = end
            done = end
            found = data.find(_USAGE, end)
        if not pieces:
            return data
        pieces.append(data[copied:])
        return b"".join(pieces)

    def _event(self, event: bytes) -> bytes | None:
        """The event to pass on (the same object when unchanged), or None to drop it."""
        payload = b"\n".join(
            line[5:].lstrip(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
        )
        try:
            document = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(document, dict):
            return event
        found = usage_of(document)
        if found is None:
            return event
        self.counts.take(*found)
        kind = document.get("type")
        usage_only = document.get("choices") == []
        if usage_only or kind in ("response.completed", "message_delta"):
            self.counts.final = True
        if not self._strip or "usage" not in document:
            return event
        if usage_only:
            return None
        needle = b',"usage":' + orjson.dumps(document["usage"])
        if needle in event:
            return event.replace(needle, b"", 1)
        del document["usage"]
        return b"data: " + orjson.dumps(document)


class NdjsonLastLine(LastNdjsonLine):
    """Counts from a native stream's final line (the core's last-line tracker)."""

    __slots__ = ()

    def feed(self, chunk: bytes) -> bytes:  # type: ignore[override]
        super().feed(chunk)
        return chunk

    def counts(self) -> Counts:
        counts = Counts()
        document = self.final()
        if document is not None:
            counts.take(document.get("prompt_eval_count", 0), document.get("eval_count", 0))
            counts.final = True
        return counts


class _Kept:
    """The first `limit` bytes of a stream, kept for an estimate, and the size of the whole."""

    __slots__ = ("chunks", "kept", "limit", "seen")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.seen = 0

    def add(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        if self.kept < self.limit:
            self.chunks.append(chunk)
            self.kept += len(chunk)


OnMeteredEnd = Callable[[StreamEnd, Counts, _Kept], None]


class MeteredChunks(WatchedChunks):
    """Relays a stream through a usage scanner and reports once how it ended.

    A WatchedChunks (see sidecar/replies.py): closed before its first chunk, it
    still closes what it wraps and still reports (as "abandoned"), so the
    request is metered whatever happens; and the policies outside metering that
    watch the stream (ratelimit, budget, tracing) join it instead of wrapping
    it again. Metering's own report is the first watcher, so `facts["usage"]`
    is there when theirs run.
    """

    __slots__ = ("_after", "_kept", "_ndjson", "_sse")

    def __init__(
        self,
        inner: AsyncGenerator[bytes, None],
        on_end: OnMeteredEnd,
        *,
        sse: SseUsageScanner | None,
        ndjson: NdjsonLastLine | None,
        kept: _Kept,
    ) -> None:
        def ended(how: StreamEnd, error: StreamInterrupted | None) -> None:
            if sse is not None:
                counts = sse.counts
            elif ndjson is not None:
                counts = ndjson.counts()
            else:
                counts = Counts()
            on_end(how, counts, kept)

        super().__init__(inner, ended)
        self._sse = sse
        self._ndjson = ndjson
        self._kept = kept
        # What the next pull raises after held-back bytes went out first.
        self._after: BaseException | None = None

    async def asend(self, value: None) -> bytes:
        # WatchedChunks.asend with the scan inlined: per relayed chunk one frame of
        # metering's wakes, not one for the watcher and one for the scan.
        if self._first is not None:
            chunk, self._first = self._first, None
        else:
            try:
                if self._after is not None:
                    error, self._after = self._after, None
                    raise error
                inner = self._inner
                assert inner is not None
                sse = self._sse
                while True:
                    try:
                        read = await inner.asend(None)
                    except (StopAsyncIteration, StreamInterrupted) as ending:
                        rest = self._flush()
                        if not rest:
                            raise
                        self._after = ending  # after the held-back bytes went out
                        chunk = rest
                        break
                    chunk = self._transform(read)
                    if chunk or sse is None:
                        break
                    # All held back (an unfinished event, or the usage event): read on.
            except BaseException as error:
                self._ended_by(error)
                raise
        if self._on_first is not None:
            on_first, self._on_first = self._on_first, None
            on_first()
        return chunk

    def _transform(self, read: bytes) -> bytes:
        """One read kept and scanned: the bytes to pass on (b"": held back for now)."""
        self._kept.add(read)
        sse = self._sse
        if sse is None:
            if self._ndjson is not None:
                self._ndjson.feed(read)
            return read
        return sse.feed(read)

    def _flush(self) -> bytes:
        """An unfinished last event held back (stripping only), at a good end."""
        return self._sse.finish() if self._sse is not None else b""

    def push_pipeline(self) -> tuple[PushSource, list[Layer]] | None:
        # The scan runs the same in the source's callback (see sidecar/replies.py).
        if self._after is not None:
            return None
        below = super().push_pipeline()
        if below is None:
            return None
        source, layers = below
        return source, [*layers, (self._transform, self._flush)]


_MAX_ACCOUNTS = 4096


class _Account:
    """One tenant and model as metering counts them: labels, price, metric children, totals."""

    __slots__ = ("children", "model", "price", "tenant", "totals")

    def __init__(
        self,
        tenant: str,
        model: str,
        price: Price | None,
        children: tuple[Any, ...],
        totals: Totals,
    ) -> None:
        self.tenant = tenant
        self.model = model
        self.price = price
        self.children = children
        self.totals = totals


_TAIL_USAGE = b'"usage":'


def _tail_usage(body: bytes) -> tuple[Any, Any] | None:
    """(prompt, completion) when the answer ends with its `usage` object, as OpenAI's do.

    Parses that object alone instead of the whole answer; anything else (native
    answers, usage elsewhere, a malformed tail) returns None for the full parse.
    """
    at = body.rfind(_TAIL_USAGE)
    if at < 0 or not body.endswith(b"}"):
        return None
    try:
        usage = orjson.loads(body[at + len(_TAIL_USAGE) : -1])
    except orjson.JSONDecodeError:
        return None
    if not isinstance(usage, dict):
        return None
    return counts_of_usage(usage)


def _price_key(model: str) -> str:
    return model.removesuffix(":latest")


@register("metering")
class Metering:
    """Counts each generation's tokens and cost, by tenant and model."""

    config_model: ClassVar[type[Any]] = MeteringConfig

    def __init__(
        self, config: MeteringConfig, context: PolicyContext, store: UsageStore | None = None
    ) -> None:
        self.config = config
        self.prices = {_price_key(name): price for name, price in config.prices.items()}
        self.counter = TokenCounter(config.tokenizer)
        self.memory = MemoryUsage()
        # The one extra place records go; a shared store (Redis) is plugged in here.
        # The ledger adds every record to the shared store (memory or Redis), where
        # the usage report reads it; tests may plug in another recorder.
        self.store: UsageStore = (
            store if store is not None else UsageLedger(context.store, context.metrics)
        )
        self._tenants = BoundedLabels(config.max_tenants)
        self._models = BoundedLabels(config.max_models)
        metrics = context.metrics
        self._tokens = metrics.counter(
            "tokens_total",
            "Tokens used, by tenant, model and kind (prompt, completion; cached: cache hits).",
            ("tenant", "model", "kind"),
        )
        self._requests = metrics.counter(
            "requests_metered_total",
            "Metered generation requests, by source of the counts (upstream, estimated, cached).",
            ("tenant", "model", "source"),
        )
        self._cost = metrics.counter(
            "cost_total",
            "Cost of the tokens used, from metering.prices (per 1M tokens).",
            ("tenant", "model"),
        )
        self._accounts: dict[tuple[str, str], _Account] = {}

    async def start(self) -> None:
        # The vocabulary is loaded only when an estimate is first needed (see
        # TokenCounter): most sidecars never estimate and should not carry it.
        return None

    async def close(self) -> None:
        # Records still on their way to the shared store are written before the end.
        if isinstance(self.store, UsageLedger):
            await self.store.flush()

    def readiness(self) -> dict[str, Any]:
        return {
            "store": type(self.store).__name__,
            "estimator": self.counter.method,
            **self.memory.total.as_dict(),
        }

    def totals(self) -> dict[str, dict[str, dict[str, Any]]]:
        """This process's totals by tenant, then model."""
        result: dict[str, dict[str, dict[str, Any]]] = {}
        for (tenant, model), totals in self.memory.by_key.items():
            result.setdefault(tenant, {})[model] = totals.as_dict()
        return result

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        route = exchange.route.name
        if route not in METERED_ROUTES:
            return await call_next(exchange)
        document = exchange.json
        stream = exchange.wants_stream
        strip = False
        if (
            stream
            and route in INCLUDE_USAGE_ROUTES
            and self.config.stream_usage
            and isinstance(document, dict)
        ):
            if "stream_options" not in document:
                # The common case: spliced into the bytes, not re-serialised.
                exchange.add_json_field("stream_options", {"include_usage": True})
                strip = True
            else:
                options = document["stream_options"]
                if not (isinstance(options, dict) and options.get("include_usage") is True):
                    options = dict(options) if isinstance(options, dict) else {}
                    options["include_usage"] = True
                    exchange.set_json({**document, "stream_options": options})
                    strip = True
        reply = await call_next(exchange)
        if reply.status != 200:
            return reply
        if reply.chunks is None:
            self._plain(exchange, reply.body)
            return reply
        stream_format = reply.stream_format or "sse"
        kept = _Kept(self.config.estimate_buffer)

        def end(how: StreamEnd, counts: Counts, kept: _Kept) -> None:
            self._stream_end(exchange, how, counts, kept, stream_format)

        chunks = MeteredChunks(
            reply.chunks,
            end,
            sse=SseUsageScanner(strip) if stream_format == "sse" else None,
            ndjson=NdjsonLastLine() if stream_format == "ndjson" else None,
            kept=kept,
        )
        return reply.with_chunks(chunks)

    def _plain(self, exchange: Exchange, body: bytes) -> None:
        counts = Counts()
        found = _tail_usage(body)
        if found is not None:
            counts.take(*found)
        elif body.startswith(b"{"):
            try:
                document = orjson.loads(body)
            except orjson.JSONDecodeError:
                document = None
            if isinstance(document, dict):
                found = usage_of(document)
                if found is not None:
                    counts.take(*found)
                elif "prompt_eval_count" in document or "eval_count" in document:
                    counts.take(document.get("prompt_eval_count", 0), document.get("eval_count", 0))
        if counts.prompt is None and counts.completion is None:
            self._estimate(exchange, "complete", None, None)
            return
        self._record(exchange, counts.prompt or 0, counts.completion or 0, False, "complete")

    def _stream_end(
        self, exchange: Exchange, how: StreamEnd, counts: Counts, kept: _Kept, stream_format: str
    ) -> None:
        try:
            if counts.final and counts.prompt is not None:
                self._record(exchange, counts.prompt, counts.completion or 0, False, how)
            else:
                self._estimate(exchange, how, kept, stream_format)
        except Exception:  # metering must never break the relay's clean-up
            _log().exception("metering_failed", route=exchange.route.name)

    def _estimate(
        self, exchange: Exchange, how: str, kept: _Kept | None, stream_format: str | None
    ) -> None:
        prompt = prompt_tokens(self.counter, exchange.json)
        completion = 0
        if kept is not None and kept.chunks:
            completion = self.counter.count(completion_text(kept.chunks, stream_format))
            if kept.seen > kept.kept and kept.kept:
                completion = round(completion * kept.seen / kept.kept)
        record = self._record(exchange, prompt, completion, True, how)
        _log().info(
            "usage_estimated",
            request_id=exchange.request_id or None,
            route=exchange.route.name,
            tenant=record.tenant,
            model=record.model,
            ended=how,
            prompt_tokens=prompt,
            completion_tokens=completion,
            estimator=self.counter.method,
        )

    def _record(
        self, exchange: Exchange, prompt: int, completion: int, estimated: bool, how: str
    ) -> UsageRecord:
        model = exchange.model or "unknown"
        tenant = str(exchange.facts.get("tenant", "anonymous"))
        if exchange.facts.get("cache") in CACHED_RESULTS:
            return self._record_cached(exchange, tenant, model, prompt, completion, estimated, how)
        account = self._account_of(tenant, model)
        price = account.price
        cost = (
            (prompt * price.prompt + completion * price.completion) / 1_000_000
            if price is not None
            else 0.0
        )
        exchange.facts["usage"] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "estimated": estimated,
            "cost": cost,
        }
        record = UsageRecord(
            account.tenant,
            account.model,
            exchange.route.name,
            prompt,
            completion,
            estimated,
            cost,
            how,
            exchange.request_id,
        )
        prompt_child, completion_child, from_upstream, estimated_child, cost_child = (
            account.children
        )
        prompt_child.inc(prompt)
        completion_child.inc(completion)
        (estimated_child if estimated else from_upstream).inc()
        if cost:
            cost_child.inc(cost)
        self.memory.total.add(record)
        account.totals.add(record)
        self.store.record(record)
        return record

    def _account_of(self, tenant: str, model: str) -> _Account:
        """What one tenant and model's records go to, looked up once (one dict read per request)."""
        account = self._accounts.get((tenant, model))
        if account is None:
            label_tenant, label_model = self._tenants(tenant), self._models(model)
            account = _Account(
                label_tenant,
                label_model,
                self.prices.get(_price_key(model)),
                self._children_of(label_tenant, label_model),
                self.memory.totals_for(label_tenant, label_model),
            )
            if len(self._accounts) < _MAX_ACCOUNTS:  # raw names are open-ended
                self._accounts[(tenant, model)] = account
        return account

    def _record_cached(
        self,
        exchange: Exchange,
        tenant: str,
        model: str,
        prompt: int,
        completion: int,
        estimated: bool,
        how: str,
    ) -> UsageRecord:
        """A cache hit: no upstream tokens, no cost; the tokens it represents counted as cached."""
        exchange.facts["usage"] = {
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "total_tokens": 0,
            "estimated": estimated,
            "cost": 0.0,
            "cached": True,
            "cached_prompt_tokens": prompt,
            "cached_completion_tokens": completion,
            "cached_tokens": prompt + completion,
        }
        record = UsageRecord(
            tenant=self._tenants(tenant),
            model=self._models(model),
            route=exchange.route.name,
            prompt_tokens=0,
            completion_tokens=0,
            estimated=estimated,
            cost=0.0,
            ended=how,
            request_id=exchange.request_id,
        )
        self._tokens.labels(record.tenant, record.model, "cached").inc(prompt + completion)
        self._requests.labels(record.tenant, record.model, "cached").inc()
        self.memory.record(record)
        self.store.record(record)
        return record

    def _children_of(self, tenant: str, model: str) -> tuple[Any, ...]:
        """The labelled metric children of one tenant and model."""
        return (
            self._tokens.labels(tenant, model, "prompt"),
            self._tokens.labels(tenant, model, "completion"),
            self._requests.labels(tenant, model, "upstream"),
            self._requests.labels(tenant, model, "estimated"),
            self._cost.labels(tenant, model),
        )
