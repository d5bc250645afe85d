"""embed_batching: merge single-input embedding requests that arrive together into one call.

RAG ingestion sends embeddings one chunk at a time, often from many workers at
once, and each call costs Ollama a scheduler round and a model pass of its own.
Ollama embeds a list of inputs in one pass, so this policy (off unless listed)
holds each single-input request on `/v1/embeddings` or `/api/embed` for at most
`window`; the requests for the same model with the same other parameters that
arrive meanwhile (up to `max_batch`) go upstream as one call with a list of
inputs, and each caller gets back exactly what a call of its own would have
returned: the same JSON shape, with its own vector at index 0.

Batched together: requests on the same route, upstream (`exchange.target` and
`facts["upstream"]`, so after `routing`), query string and `Authorization`
(the client's and the one a policy set for the upstream), whose bodies are
equal in everything but `input` (model, encoding_format, dimensions, truncate,
keep_alive, options, user...), and whose `input` is one non-empty string or a
list of one. Everything else (several inputs, an empty input, a body that is
not a JSON object, other routes) passes straight through, unbatched.

The batch call is a new Exchange built from the first caller's: its headers,
request id, start time (so its deadlines), target and attempt observers, with
`input` the list of the callers' texts in arrival order. What the steps after
this one note in its facts (upstream time, attempts...) and add to its response
headers is copied to every caller's exchange.

Answers:
- 200 with one embedding per input: split. OpenAI: `data` holds the caller's
  item with `index` 0, `usage` its share. Native: `embeddings` holds the
  caller's vector, `prompt_eval_count` its share; durations are the batch's
  (each caller waited for the whole call).
- Token shares: every caller gets 1 token (when the total allows), and the rest
  is split in proportion to each input's UTF-8 length, rounded by largest
  remainder (ties to the earlier caller), so the shares always add up to the
  upstream's count: metering and budgets see exactly the tokens Ollama counted.
- Any other status, or an error before an answer (timeout, refused, a refusal
  by a later policy): every caller gets the same status, headers and body, or
  the same error.
- A 200 that cannot be split (not JSON, a different number of embeddings):
  each caller sends its own request, as if this policy were not there.

A batch that finds no partner within the window is sent as the caller's own
request, untouched: a lone request pays at most `window` of delay. A caller
that goes away while waiting leaves the batch (before the flush its input is
dropped; after it, its share is discarded); when every caller of a batch in
flight has gone, the upstream call is cancelled.

Where it goes in the chain: after `routing` (it keys on the chosen upstream
and the aliased model), `auth`, rate limits and `metering` (which then see
each caller's own request and share of the usage); before `retry` (a failed
batch is retried once, as a whole) and `concurrency` (a batch takes one slot).

Metrics: `ollama_sidecar_embed_batches_total{route}` (upstream calls that
carried two or more requests), `ollama_sidecar_embed_batched_requests_total{route}`
(requests answered from such a call) and `ollama_sidecar_embed_batch_size{route}`
(a histogram of the size of every flushed batch, 1 included, so its
`_count / _sum` shows how often batching found partners).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, TypeGuard

import orjson
import structlog
from multidict import CIMultiDict

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import SidecarError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, Duration, Field

EmbedRoute = Literal["/v1/embeddings", "/api/embed"]
EMBED_ROUTES: tuple[EmbedRoute, ...] = ("/v1/embeddings", "/api/embed")
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
_MISSING = object()


def _log() -> Any:
    return structlog.get_logger("sidecar.embed_batching")


@dataclass(frozen=True, kw_only=True)
class EmbedBatchingConfig:
    __pydantic_config__ = STRICT

    window: Annotated[
        Duration,
        Field(
            gt=0,
            le=1.0,
            description="Longest a single-input request waits for others to share its upstream call.",
        ),
    ] = 0.002
    max_batch: Annotated[
        int,
        Field(
            ge=2,
            le=1024,
            description="Most requests merged into one upstream call; a full batch is sent at once.",
        ),
    ] = 32
    routes: Annotated[
        tuple[EmbedRoute, ...],
        Field(
            min_length=1,
            description="Embedding routes whose requests are batched: /v1/embeddings, /api/embed.",
        ),
    ] = EMBED_ROUTES


@dataclass(slots=True, eq=False)
class _Member:
    """One caller in a batch: its exchange, its text, and where its answer goes.

    The future's result is the caller's Reply, or None: send your own request.
    """

    exchange: Exchange
    document: dict[str, Any]
    text: str
    call_next: Next
    future: asyncio.Future[Reply | None]


@dataclass(slots=True, eq=False)
class _Batch:
    key: tuple[Any, ...]
    route: str
    members: list[_Member] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    sent: list[_Member] | None = None
    task: asyncio.Task[None] | None = None


@register("embed_batching")
class EmbedBatching:
    """Merges concurrent single-input embedding requests into one upstream call each window."""

    config_model: ClassVar[type[Any]] = EmbedBatchingConfig

    def __init__(self, config: EmbedBatchingConfig, context: PolicyContext) -> None:
        self.config = config
        self._window = config.window
        self._max_batch = config.max_batch
        self._routes = frozenset(config.routes)
        self._open: dict[tuple[Any, ...], _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        metrics = context.metrics
        self._batches = metrics.counter(
            "embed_batches_total",
            "Upstream embedding calls that carried two or more merged requests, by route.",
            ("route",),
        )
        self._batched = metrics.counter(
            "embed_batched_requests_total",
            "Embedding requests answered from a merged upstream call, by route.",
            ("route",),
        )
        self._sizes = metrics.histogram(
            "embed_batch_size",
            "Requests in each flushed embedding batch (1: no partner came within the window).",
            ("route",),
            BATCH_SIZE_BUCKETS,
        )

    # --- the request path ---------------------------------------------------------

    def __call__(self, exchange: Exchange, call_next: Next) -> Awaitable[Reply]:
        # Not a coroutine itself: what is not batched (every other route, several
        # inputs...) goes to the next step with no frame of this policy's.
        if exchange.route.name not in self._routes or exchange.method != "POST":
            return call_next(exchange)
        found = _batchable(exchange)
        if found is None:
            return call_next(exchange)
        return self._in_batch(exchange, call_next, found)

    async def _in_batch(
        self,
        exchange: Exchange,
        call_next: Next,
        found: tuple[tuple[Any, ...], dict[str, Any], str],
    ) -> Reply:
        key, document, text = found
        loop = asyncio.get_running_loop()
        batch = self._open.get(key)
        if batch is None:
            batch = self._open[key] = _Batch(key, exchange.route.name)
            batch.timer = loop.call_later(self._window, self._flush, batch)
        member = _Member(exchange, document, text, call_next, loop.create_future())
        batch.members.append(member)
        if len(batch.members) >= self._max_batch:
            self._flush(batch)
        try:
            reply = await member.future
        except asyncio.CancelledError:
            self._leave(batch, member)
            raise
        if reply is None:
            return await call_next(exchange)
        return reply

    def _leave(self, batch: _Batch, member: _Member) -> None:
        """A caller went away: out of a batch still open; the call cancelled if nobody is left."""
        if batch.sent is None:
            with contextlib.suppress(ValueError):
                batch.members.remove(member)
            if not batch.members and self._open.get(batch.key) is batch:
                del self._open[batch.key]
                if batch.timer is not None:
                    batch.timer.cancel()
        elif batch.task is not None and all(m.future.done() for m in batch.sent):
            batch.task.cancel()

    def _flush(self, batch: _Batch) -> None:
        """Close the batch: a lone caller goes on its own, two or more share one call."""
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]
        if batch.timer is not None:
            batch.timer.cancel()
        if batch.sent is not None:
            return
        members = batch.sent = [m for m in batch.members if not m.future.done()]
        if not members:
            return
        self._sizes.labels(batch.route).observe(len(members))
        if len(members) == 1:
            members[0].future.set_result(None)
            return
        self._batches.labels(batch.route).inc()
        self._batched.labels(batch.route).inc(len(members))
        task = batch.task = asyncio.get_running_loop().create_task(self._send(batch, members))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: _Batch, members: list[_Member]) -> None:
        """One upstream call for the batch; every caller's future gets its answer."""
        lead = members[0]
        merged = _merged_exchange(lead, [m.text for m in members])
        before = dict(merged.facts)
        try:
            reply = await lead.call_next(merged)
            body = await _whole_body(reply)
        except asyncio.CancelledError:
            # Every caller has gone (or the sidecar is stopping): nobody to answer.
            _settle(members, lambda m: m.future.set_exception(_stopped()))
            raise
        except BaseException as error:
            failure = error
            _share_outcome(merged, before, members)
            _settle(members, lambda m: m.future.set_exception(_copy_error(failure)))
            if not isinstance(failure, Exception):
                raise
            return
        _share_outcome(merged, before, members)
        if reply.status != 200:
            _settle(
                members,
                lambda m: m.future.set_result(
                    Reply(reply.status, CIMultiDict(reply.headers), body)
                ),
            )
            return
        bodies = _split(batch.route, body, [m.text for m in members])
        if bodies is None:
            _log().info(
                "embed_batch_unsplittable", route=batch.route, size=len(members), bytes=len(body)
            )
            _settle(members, lambda m: m.future.set_result(None))
            return
        for member, own in zip(members, bodies, strict=True):
            if not member.future.done():
                member.future.set_result(Reply(200, CIMultiDict(reply.headers), own))

    # --- lifecycle and what it shows ---------------------------------------------

    async def close(self) -> None:
        """Send the batches still gathering at once; those in flight finish on their own."""
        for batch in list(self._open.values()):
            self._flush(batch)

    def readiness(self) -> dict[str, Any]:
        return {
            "gathering": sum(len(batch.members) for batch in self._open.values()),
            "batches_in_flight": len(self._tasks),
        }


# --- helpers ----------------------------------------------------------------------


def _batchable(exchange: Exchange) -> tuple[tuple[Any, ...], dict[str, Any], str] | None:
    """(batch key, body, the one input) for a request that may share a call, else None."""
    try:
        document = exchange.json
    except SidecarError:
        return None  # the upstream step answers the 400 in the request's own task
    if not isinstance(document, dict):
        return None
    value = document.get("input")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value:
        return None
    model = document.get("model")
    if not isinstance(model, str) or not model:
        return None
    rest = {name: item for name, item in document.items() if name != "input"}
    try:
        parameters = orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return None
    key = (
        exchange.route.name,
        exchange.target,
        exchange.facts.get("upstream"),
        exchange.query_string,
        exchange.headers.get("Authorization"),
        exchange.upstream_headers.get("Authorization"),
        parameters,
    )
    return key, document, value


def _merged_exchange(lead: _Member, texts: list[str]) -> Exchange:
    """The batch's exchange: the first caller's, with every caller's text as `input`."""
    source = lead.exchange
    merged = Exchange(
        method=source.method,
        route=source.route,
        path=source.path,
        query_string=source.query_string,
        headers=source.headers,
        body=source.body,
        request_id=source.request_id,
        started_at=source.started_at,
        target=source.target,
        attempt_observers=source.attempt_observers,
        facts=dict(source.facts),
        upstream_headers=CIMultiDict(source.upstream_headers),
    )
    merged.set_json({**lead.document, "input": texts})
    return merged


async def _whole_body(reply: Reply) -> bytes:
    """The reply's bytes; an embedding answer is never a stream, but one is read whole."""
    if reply.chunks is None:
        return reply.body
    async with contextlib.aclosing(reply.chunks) as chunks:
        return b"".join([chunk async for chunk in chunks])


def _share_outcome(merged: Exchange, before: dict[str, Any], members: list[_Member]) -> None:
    """What later steps noted on the batch's exchange, copied to every caller's."""
    changed = {
        name: value
        for name, value in merged.facts.items()
        if before.get(name, _MISSING) is not value
    }
    for member in members:
        if changed:
            member.exchange.facts.update(changed)
        member.exchange.facts["embed_batch_size"] = len(members)
        if merged.response_headers:
            member.exchange.response_headers.update(merged.response_headers)


def _settle(members: list[_Member], answer: Callable[[_Member], None]) -> None:
    for member in members:
        if not member.future.done():
            answer(member)


def _copy_error(error: BaseException) -> BaseException:
    """One exception object per caller: each task's traceback is its own."""
    try:
        clone = type(error).__new__(type(error))
        clone.__dict__.update(error.__dict__)
        clone.args = error.args
    except Exception:
        return error
    return clone


def _stopped() -> SidecarError:
    return SidecarError(
        503, "the embedding batch was cancelled (the sidecar is stopping)", code="batch_cancelled"
    )


def token_shares(total: int, texts: list[str]) -> list[int]:
    """Split `total` tokens among `texts`: 1 each when it allows, the rest by UTF-8 length.

    Largest remainder, ties to the earlier text, so the shares always sum to `total`.
    """
    count = len(texts)
    base = 1 if total >= count else 0
    rest = total - base * count
    weights = [max(1, len(text.encode())) for text in texts]
    weight_sum = sum(weights)
    shares: list[int] = []
    remainders: list[int] = []
    for weight in weights:
        share, remainder = divmod(rest * weight, weight_sum)
        shares.append(share)
        remainders.append(remainder)
    leftover = rest - sum(shares)
    for index in sorted(range(count), key=lambda i: (-remainders[i], i))[:leftover]:
        shares[index] += 1
    return [base + share for share in shares]


def _split(route: str, body: bytes, texts: list[str]) -> list[bytes] | None:
    """Each caller's own answer from the batch's 200, or None when it does not fit."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(document, dict):
        return None
    count = len(texts)
    if route == "/api/embed":
        vectors = document.get("embeddings")
        if not isinstance(vectors, list) or len(vectors) != count:
            return None
        tokens = document.get("prompt_eval_count")
        shares = token_shares(tokens, texts) if _is_count(tokens) else None
        answers = []
        for index, vector in enumerate(vectors):
            own = {**document, "embeddings": [vector]}
            if shares is not None:
                own["prompt_eval_count"] = shares[index]
            answers.append(orjson.dumps(own))
        return answers
    data = document.get("data")
    if not isinstance(data, list) or len(data) != count:
        return None
    if not all(isinstance(item, dict) for item in data):
        return None
    indexes = [item.get("index") for item in data]
    if all(isinstance(index, int) for index in indexes):
        if sorted(indexes) != list(range(count)):
            return None
        data = sorted(data, key=lambda item: item["index"])
    usage = document.get("usage")
    usage_shares: dict[str, list[int]] = {}
    if isinstance(usage, dict):
        usage_shares = {
            name: token_shares(value, texts) for name, value in usage.items() if _is_count(value)
        }
    answers = []
    for index, item in enumerate(data):
        own = {**document, "data": [{**item, "index": 0}]}
        if isinstance(usage, dict):
            own["usage"] = {
                name: usage_shares[name][index] if name in usage_shares else value
                for name, value in usage.items()
            }
        answers.append(orjson.dumps(own))
    return answers


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
