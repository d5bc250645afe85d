"""ratelimit: requests and tokens per minute, with bursts, per tenant, model, both, or global.

Each limit is a token bucket in the shared store (sidecar/stores.py): it holds up
to `burst` units and refills at `rate / 60` per second. Admission is one atomic
check-and-take per bucket (in Redis, one Lua script: never read-then-write), so
500 concurrent requests against a burst of 100 admit exactly 100, on one pod or
across every replica that shares the Redis.

Tokens are reserved at admission: an estimate of the prompt (request body bytes / 4)
plus the completion cap the client asked for (`max_tokens`, `max_completion_tokens`,
`max_output_tokens` or `options.num_predict`) or `default_completion_tokens`. When the
answer ends the reservation is replaced by the real count, `facts["usage"]["total_tokens"]`,
which the `metering` policy writes: plain answers right after the upstream answered,
streams at their last byte (or when the client goes away). For that, `metering` must
come AFTER `ratelimit` in the YAML (inside it). Without a usage fact the reservation
stays as it is; a request the upstream refused (an error status, or no answer at all)
gets its tokens back.

Answers carry OpenAI's headers, on success and on 429: `x-ratelimit-limit-requests`,
`x-ratelimit-remaining-requests`, `x-ratelimit-reset-requests` and the `-tokens` variants
(resets spelled like OpenAI's, Go durations: "1s", "6m0s", "250ms"). A 429 has
`Retry-After` (whole seconds) and `retry-after-ms` (both read by the openai client),
type "requests" or "tokens" and code `rate_limit_exceeded`. A request whose token
estimate exceeds the whole burst can never fit: its 429 says so and carries
`x-should-retry: false` instead of a Retry-After.

Per-tenant limits: with `per` naming the tenant, `facts["tenant_overrides"]` (from `auth`)
may set `requests_per_minute`, `tokens_per_minute`, `burst_requests`, `burst_tokens`.

Store outage (`StoreUnavailable`, bounded by `stores.timeout`): `on_store_error: allow`
lets the request through unlimited (warning log, `ratelimit_store_errors_total`),
`deny` answers 503 `store_unavailable`. Every request asks the store again, so service
returns as soon as Redis does.

Hot path: one store call to admit (both buckets at once when both limits are set),
no task per request (a stream settles its tokens without waiting), no JSON parse
unless a token limit is configured (then the body is parsed once for the completion cap).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import structlog

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import SidecarError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, AfterValidator, Field
from sidecar.replies import StreamEnd, watch_stream
from sidecar.routes import GENERATION_ROUTES, known_routes
from sidecar.stores import StoreUnavailable, TakeResult

MODEL_ROUTES = GENERATION_ROUTES
ANONYMOUS = "anonymous"
# The body fields that cap a completion, in the order they are looked for.
_CAP_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
_MAX_RATE = 1e9

Per = Literal["tenant", "model", "tenant_model", "global"]


def _log() -> Any:
    return structlog.get_logger("sidecar.ratelimit")


@dataclass(frozen=True, kw_only=True)
class RateLimitConfig:
    __pydantic_config__ = STRICT

    per: Annotated[
        Per,
        Field(
            description="What one bucket counts: a tenant, a model, a tenant+model pair, or everything."
        ),
    ] = "tenant"
    requests_per_minute: Annotated[
        float | None,
        Field(
            gt=0, le=_MAX_RATE, description="Requests per minute per key; null: no request limit."
        ),
    ] = None
    tokens_per_minute: Annotated[
        float | None,
        Field(gt=0, le=_MAX_RATE, description="Tokens per minute per key; null: no token limit."),
    ] = None
    burst_requests: Annotated[
        float | None,
        Field(
            ge=1,
            le=_MAX_RATE,
            description="Requests a key may make at once; null: one minute's worth.",
        ),
    ] = None
    burst_tokens: Annotated[
        float | None,
        Field(
            ge=1,
            le=_MAX_RATE,
            description="Tokens a key may use at once; null: one minute's worth.",
        ),
    ] = None
    default_completion_tokens: Annotated[
        int,
        Field(
            ge=0,
            le=10_000_000,
            description="Completion tokens reserved when the request names no max_tokens/num_predict.",
        ),
    ] = 256
    on_store_error: Annotated[
        Literal["allow", "deny"],
        Field(description="Store down: let requests through (logged, counted) or answer 503."),
    ] = "allow"
    headers: Annotated[
        bool, Field(description="Send the x-ratelimit-* headers on successful answers too.")
    ] = True
    routes: Annotated[
        tuple[str, ...],
        Field(min_length=1, description="Routes that count against the limits."),
        AfterValidator(known_routes),
    ] = MODEL_ROUTES

    def __post_init__(self) -> None:
        if self.requests_per_minute is None and self.tokens_per_minute is None:
            raise ValueError("set requests_per_minute, tokens_per_minute or both")


def go_duration(seconds: float) -> str:
    """A duration as OpenAI's reset headers spell it (Go's time.Duration): 1s, 6m0s, 250ms."""
    if not math.isfinite(seconds):
        return "0s"
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms <= 0:
        return "0s"
    text = _DURATIONS.get(ms)
    if text is None:
        text = _spell_ms(ms)
        if len(_DURATIONS) < 4096:  # the usual resets repeat: a request's, a refill's
            _DURATIONS[ms] = text
    return text


_DURATIONS: dict[int, str] = {}


def _spell_ms(ms: int) -> str:
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    out = f"{hours}h" if hours else ""
    if hours or minutes:
        out += f"{minutes}m"
    return f"{out}{secs}s"


def _remaining(level: float) -> str:
    """Whole units left (a debt shows as 0)."""
    return str(int(level)) if level >= 1 else "0"


def _retry_after(seconds: float) -> dict[str, str]:
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


class _Limit:
    """One bucket's parameters (kept per key and tenant limits, see `RateLimit._limits`)."""

    __slots__ = ("burst", "key", "limit", "limit_text", "rate_per_s")

    def __init__(self, key: str, per_minute: float, burst: float) -> None:
        self.key = key
        self.limit = burst
        self.burst = burst
        self.rate_per_s = per_minute / 60.0
        self.limit_text = str(int(burst))


# Limits kept per bucket key; past this many keys the cache starts over.
_MAX_CACHED_KEYS = 10_000


@register("ratelimit")
class RateLimit:
    """Token buckets for requests and tokens per minute; see the module's docstring.

    With both limits, admission is one store call (`take_all`: both buckets in one atomic
    step, so a request refused by one takes from neither). A stream's reconciliation is no
    task of its own: `adjust_nowait` from the end callback (the memory store applies it at
    once, the Redis store queues it and writes the queue in one script per batch); a failed
    write is counted and logged like any other store error. The limits of a key (with its
    tenant's overrides) are worked out once, not per request.
    """

    config_model: ClassVar[type[Any]] = RateLimitConfig

    def __init__(self, config: RateLimitConfig, context: PolicyContext) -> None:
        self.config = config
        self.store = context.store
        self._routes = frozenset(config.routes)
        self._per = config.per
        self._use_overrides = config.per in ("tenant", "tenant_model")
        self._headers_on = config.headers
        # bucket key -> (the tenant's overrides they were made with, requests, tokens)
        self._cache: dict[str, tuple[Any, _Limit | None, _Limit | None]] = {}
        rejections = context.metrics.counter(
            "ratelimit_rejections_total",
            "Requests refused by the rate limiter, by the limit they hit (requests|tokens).",
            ("kind",),
        )
        self._rejected_requests = rejections.labels("requests")
        self._rejected_tokens = rejections.labels("tokens")
        self._store_errors = context.metrics.counter(
            "ratelimit_store_errors_total",
            "Rate-limit store operations that failed (request allowed or refused per on_store_error).",
            (),
        )

    # --- the request path ---------------------------------------------------------

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        if exchange.route.name not in self._routes:
            return await call_next(exchange)
        requests, tokens = self._limits(exchange)
        cost = self._estimate(exchange) if tokens is not None else 0
        try:
            taken_r, taken_t = await self._admit(requests, tokens, cost)
        except StoreUnavailable as exc:
            self._store_failed("admit", exc)
            if self.config.on_store_error == "deny":
                raise SidecarError(
                    503,
                    "the rate-limit store is unavailable; try again shortly",
                    code="store_unavailable",
                    headers={"Retry-After": "1"},
                ) from None
            return await call_next(exchange)
        if self._headers_on:
            self._headers(exchange.response_headers, requests, taken_r, tokens, taken_t)
        if tokens is None:
            return await call_next(exchange)
        try:
            reply = await call_next(exchange)
        except SidecarError:
            # No answer from the upstream (down, refused, timed out): nothing was generated.
            if cost:
                self._settle_nowait(tokens, cost, 0.0)
            raise
        if reply.chunks is None:
            actual = _actual(exchange, reply.status)
            if actual is not None and actual != cost:
                await self._settle(exchange, tokens, cost, actual)
            return reply

        def on_end(how: StreamEnd, error: object) -> None:
            actual = _actual(exchange, reply.status)
            if actual is not None and actual != cost:
                self._settle_nowait(tokens, cost, actual)

        return watch_stream(reply, on_end)

    async def _admit(
        self, requests: _Limit | None, tokens: _Limit | None, cost: float
    ) -> tuple[TakeResult | None, TakeResult | None]:
        """One atomic step for both buckets: a request refused by either takes from neither."""
        store = self.store
        if tokens is None:
            assert requests is not None
            taken_r = await store.take(requests.key, 1, requests.rate_per_s, requests.burst)
            if not taken_r.allowed:
                self._rejected_requests.inc()
                raise self._refusal("requests", requests, taken_r, 1, None, None)
            return taken_r, None
        if requests is None:
            taken_t = await store.take(tokens.key, cost, tokens.rate_per_s, tokens.burst)
            if not taken_t.allowed:
                self._rejected_tokens.inc()
                raise self._refusal("tokens", tokens, taken_t, cost, None, None)
            return None, taken_t
        taken_r, taken_t = await store.take_all(
            (
                (requests.key, 1, requests.rate_per_s, requests.burst),
                (tokens.key, cost, tokens.rate_per_s, tokens.burst),
            )
        )
        if not taken_r.allowed:
            self._rejected_requests.inc()
            raise self._refusal("requests", requests, taken_r, 1, tokens, taken_t)
        if not taken_t.allowed:
            self._rejected_tokens.inc()
            raise self._refusal("tokens", tokens, taken_t, cost, requests, taken_r)
        return taken_r, taken_t

    async def _settle(
        self, exchange: Exchange, tokens: _Limit, reserved: float, actual: float
    ) -> None:
        """A plain answer's reconciliation, awaited: its headers show the real usage."""
        try:
            result = await self.store.adjust(
                tokens.key, actual - reserved, tokens.rate_per_s, tokens.burst
            )
        except StoreUnavailable as exc:
            self._store_failed("reconcile", exc)
            return
        except Exception:  # reconciliation must never break an answer
            _log().exception("ratelimit_reconcile_failed", key=tokens.key)
            return
        if self._headers_on:
            _token_headers(exchange.response_headers, tokens, result)

    def _settle_nowait(self, tokens: _Limit, reserved: float, actual: float) -> None:
        """Reconcile from a synchronous callback (a stream's end, an upstream failure): the
        store applies it at once (memory) or queues it (Redis); failures reach `_write_failed`."""
        try:
            self.store.adjust_nowait(
                tokens.key, actual - reserved, tokens.rate_per_s, tokens.burst, self._write_failed
            )
        except Exception:  # never break a relay's clean-up
            _log().exception("ratelimit_reconcile_failed", key=tokens.key)

    def _write_failed(self, key: str, operations: int, exc: StoreUnavailable) -> None:
        self._store_errors.inc(operations)
        _log().warning(
            "ratelimit_store_unavailable",
            operation="reconcile",
            operations=operations,
            key=key,
            on_store_error=self.config.on_store_error,
            error=str(exc),
        )

    def _store_failed(self, what: str, exc: StoreUnavailable) -> None:
        self._store_errors.inc()
        _log().warning(
            "ratelimit_store_unavailable",
            operation=what,
            on_store_error=self.config.on_store_error,
            error=str(exc),
        )

    # --- keys, limits and the estimate -------------------------------------------

    def _limits(self, exchange: Exchange) -> tuple[_Limit | None, _Limit | None]:
        facts = exchange.facts
        per = self._per
        if per == "global":
            key = "*"
        elif per == "tenant":
            key = "t=" + str(facts.get("tenant", ANONYMOUS))
        elif per == "model":
            key = "m=" + (exchange.model or "")
        else:
            key = "t=" + str(facts.get("tenant", ANONYMOUS)) + "|m=" + (exchange.model or "")
        overrides = facts.get("tenant_overrides") if self._use_overrides else None
        cached = self._cache.get(key)
        # auth's overrides are immutable mappings, one per tenant: the same object, the same
        # limits (a reloaded auth makes new ones, and new limits here).
        if cached is not None and cached[0] is overrides:
            return cached[1], cached[2]
        config = self.config
        rpm, tpm = config.requests_per_minute, config.tokens_per_minute
        burst_r, burst_t = config.burst_requests, config.burst_tokens
        if overrides:
            rpm, burst_r = _override(overrides, "requests", rpm, burst_r)
            tpm, burst_t = _override(overrides, "tokens", tpm, burst_t)
        requests = None if rpm is None else _Limit(f"rl:r:{key}", rpm, burst_r or rpm)
        tokens = None if tpm is None else _Limit(f"rl:t:{key}", tpm, burst_t or tpm)
        if len(self._cache) >= _MAX_CACHED_KEYS:
            self._cache.clear()
        self._cache[key] = (overrides, requests, tokens)
        return requests, tokens

    def _estimate(self, exchange: Exchange) -> int:
        """Prompt (body bytes / 4) plus the completion cap the client asked for, or the default."""
        prompt = (len(exchange.body) + 3) // 4
        completion: float | None = None
        document = exchange.json
        if isinstance(document, dict):
            for name in _CAP_FIELDS:
                value = document.get(name)
                if value is not None:
                    completion = _number(value)
                    if completion is not None:
                        break
            if completion is None:
                options = document.get("options")
                if isinstance(options, dict):
                    completion = _number(options.get("num_predict"))
        if completion is None:
            completion = self.config.default_completion_tokens
        return prompt + int(completion)

    # --- answers ----------------------------------------------------------------------

    def _refusal(
        self,
        kind: Literal["requests", "tokens"],
        hit: _Limit,
        result: TakeResult,
        cost: float,
        other: _Limit | None,
        other_result: TakeResult | None,
    ) -> SidecarError:
        headers: dict[str, str] = {}
        if kind == "requests":
            self._headers(headers, hit, result, other, other_result)
        else:
            self._headers(headers, other, other_result, hit, result)
        if math.isinf(result.retry_after_s) or cost > hit.burst:
            headers["x-should-retry"] = "false"
            message = (
                f"Request too large: it needs about {int(cost)} {kind}, more than the limit of "
                f"{int(hit.burst)} {kind} per burst; ask for fewer tokens (max_tokens)"
            )
        else:
            headers.update(_retry_after(result.retry_after_s))
            message = (
                f"Rate limit reached for {kind} per minute: limit {int(hit.limit)}, "
                f"remaining {max(0, math.floor(result.remaining))}, requested {int(cost)}; "
                f"retry after {headers['Retry-After']}s"
            )
        return SidecarError(
            429, message, code="rate_limit_exceeded", error_type=kind, headers=headers
        )

    @staticmethod
    def _headers(
        headers: Any,
        requests: _Limit | None,
        taken_r: TakeResult | None,
        tokens: _Limit | None,
        taken_t: TakeResult | None,
    ) -> None:
        if requests is not None and taken_r is not None:
            headers["x-ratelimit-limit-requests"] = requests.limit_text
            headers["x-ratelimit-remaining-requests"] = _remaining(taken_r.remaining)
            headers["x-ratelimit-reset-requests"] = go_duration(taken_r.reset_s)
        if tokens is not None and taken_t is not None:
            _token_headers(headers, tokens, taken_t)

    # --- lifecycle --------------------------------------------------------------------

    async def close(self) -> None:
        """Let queued stream reconciliations reach the store (each write bounded by its timeout)."""
        await self.store.flush()

    def readiness(self) -> dict[str, Any]:
        return {"per": self._per, "pending_reconciliations": self.store.pending_writes}


def _actual(exchange: Exchange, status: int) -> float | None:
    """The tokens an answer really used, from metering's usage fact; None: keep the
    reservation (no usage fact on a success), 0 when the upstream refused."""
    usage = exchange.facts.get("usage")
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    actual = 0.0 if total == 0 else _number(total)
    if actual is None and status >= 400:
        return 0.0  # the upstream refused: nothing generated
    return actual


def _token_headers(headers: Any, tokens: _Limit, result: TakeResult) -> None:
    headers["x-ratelimit-limit-tokens"] = tokens.limit_text
    headers["x-ratelimit-remaining-tokens"] = _remaining(result.remaining)
    headers["x-ratelimit-reset-tokens"] = go_duration(result.reset_s)


def _override(
    overrides: Mapping[str, Any], kind: str, rate: float | None, burst: float | None
) -> tuple[float | None, float | None]:
    """A tenant's own rate and burst; a new rate without its own burst gets one minute's worth."""
    new_rate = _number(overrides.get(f"{kind}_per_minute"))
    new_burst = _number(overrides.get(f"burst_{kind}"))
    if new_rate is not None:
        rate = new_rate
        burst = new_burst
    elif new_burst is not None and rate is not None:
        burst = new_burst
    return rate, burst
