"""retry: send a request again when Ollama failed before anything reached the client.

Retried: a connection refused, reset or timed out before the first byte; an
answer of 429, 502, 503 (Ollama's full queue) or 504; a stream that broke
before its first chunk. Never retried: other statuses (a 4xx is the request's
own fault, and Ollama's 500 is a deterministic failure such as a model too
large for memory), a refusal another policy made (an open breaker, a full
queue: retrying would defeat them), anything after the first byte reached the
client, and Ollama's management routes (a pull or a delete is not resent).

Between tries: exponential backoff with full jitter (a wait drawn from
[0, min(max_delay, base x 2^n)]), so sidecars that saw the same 503 do not
come back in step; an upstream's `Retry-After` replaces it (up to
`max_retry_after`; a longer one is passed to the client). No retry starts
whose wait would end more than `budget` after the first try began: the last
answer is passed on instead.

In all: a retry budget per sidecar process (as Envoy's retry budgets and
Finagle's RetryBudget): over a sliding `budget_window`, at most `budget_ratio`
of the requests plus `budget_min_retries` may be retries, so a failing Ollama
sees at most (1 + budget_ratio) times the client's traffic, plus that floor,
instead of `attempts` times it just when it can least take it.

The response header `x-sidecar-attempts` and the fact `attempts` tell how many
tries an answer took; `ollama_sidecar_retries_total{route,reason}`,
`ollama_sidecar_retry_giveups_total{route,reason}` and
`ollama_sidecar_retry_budget_exhausted_total{route}` count retries and the
failures passed on without one.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Generator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import backoff
import structlog

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import StreamInterrupted, UpstreamError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, Duration, Field
from sidecar.outcomes import retry_after_seconds, upstream_failure
from sidecar.replies import peek_first_chunk


def _log() -> Any:
    """The logger, looked up per line: only failures log, and a logger cached at
    import (structlog's cache_logger_on_first_use) would keep writing where the
    first configuration pointed, past a later `configure_logging`."""
    return structlog.get_logger("sidecar.retry")


# 429 and 503: the upstream is busy (Ollama's full queue is a 503); 502 and 504:
# something between here and it failed. 500 is left out on purpose (see above).
RETRY_STATUSES = frozenset({429, 502, 503, 504})
ATTEMPTS_HEADER = "x-sidecar-attempts"
SHOULD_RETRY_HEADER = "x-should-retry"
_ATTEMPT_TEXT = tuple(str(number) for number in range(11))


@dataclass(frozen=True, kw_only=True)
class RetryConfig:
    __pydantic_config__ = STRICT

    attempts: Annotated[
        int, Field(ge=1, le=10, description="Total tries including the first; 1 turns retries off.")
    ] = 3
    base: Annotated[
        Duration,
        Field(
            gt=0,
            le=60,
            description="Backoff ceiling before the first retry; it doubles on each retry.",
        ),
    ] = 0.2
    max_delay: Annotated[
        Duration,
        Field(gt=0, le=300, description="Largest backoff ceiling; the wait is random below it."),
    ] = 5.0
    budget: Annotated[
        Duration,
        Field(
            gt=0,
            le=3600,
            description="No retry whose wait would end later than this after the first try began.",
        ),
    ] = 30.0
    max_retry_after: Annotated[
        Duration,
        Field(
            ge=0,
            le=3600,
            description="Longest upstream Retry-After waited for; a longer one goes to the client.",
        ),
    ] = 30.0
    budget_ratio: Annotated[
        float,
        Field(
            ge=0,
            le=1,
            description="Retries allowed as a share of the requests in the last budget_window.",
        ),
    ] = 0.2
    budget_min_retries: Annotated[
        int,
        Field(
            ge=0,
            le=100_000,
            description="Retries allowed per budget_window on top of the ratio, for quiet times.",
        ),
    ] = 3
    budget_window: Annotated[
        Duration,
        Field(gt=0, le=3600, description="Sliding window over which the retry budget counts."),
    ] = 10.0

    def __post_init__(self) -> None:
        if self.base > self.max_delay:
            raise ValueError(
                f"base ({self.base:g}s) is longer than max_delay ({self.max_delay:g}s)"
            )


class RetryBudget:
    """Retries over a sliding window: at most min_retries + ratio x requests.

    Finagle's RetryBudget adds its reserve the same way, so the bound is plain:
    over a window the upstream sees at most (1 + ratio) x the client's requests,
    plus min_retries.

    The window is a ring of slots, each counting the requests and retries that
    began in its slice of time; the oldest slot is emptied as time moves on. A
    request costs a clock comparison and two increments, nothing more.
    """

    SLOTS = 10

    def __init__(self, ratio: float, min_retries: int, window: float, now: float) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self._width = window / self.SLOTS
        self._requests = [0] * self.SLOTS
        self._retries = [0] * self.SLOTS
        self._slot = int(now // self._width)
        self.requests = 0
        self.retries = 0

    def _roll(self, now: float) -> int:
        """Move the window to `now`; the ring index of the current slot."""
        slot = int(now // self._width)
        behind = slot - self._slot
        if behind:
            if 0 < behind < self.SLOTS:
                for step in range(1, behind + 1):
                    index = (self._slot + step) % self.SLOTS
                    self.requests -= self._requests[index]
                    self.retries -= self._retries[index]
                    self._requests[index] = self._retries[index] = 0
            else:
                self._requests = [0] * self.SLOTS
                self._retries = [0] * self.SLOTS
                self.requests = self.retries = 0
            self._slot = slot
        return slot % self.SLOTS

    def record_request(self, now: float) -> None:
        self._requests[self._roll(now)] += 1
        self.requests += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget; False when it is spent."""
        index = self._roll(now)
        if self.retries + 1 > self.min_retries + self.ratio * self.requests:
            return False
        self._retries[index] += 1
        self.retries += 1
        return True


@dataclass(slots=True)
class _Failure:
    """One failed attempt: why, and what to hand on if it is not retried.

    `reply` is the upstream's answer (passed through on give-up) or None when
    the attempt raised `error` (re-raised on give-up). `broken` is set for a stream that broke before
    its first chunk: its chunks are already closed, and on give-up the client
    gets the same answer it would have had without this policy.
    """

    reason: str
    reply: Reply | None = None
    error: UpstreamError | StreamInterrupted | None = None
    broken: StreamInterrupted | None = None

    def answer(self) -> Reply:
        """The answer to pass on when no retry follows (raises for an UpstreamError)."""
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        if self.broken is not None:
            return self.reply.with_chunks(_broken_stream(self.broken))
        return self.reply

    async def discard(self) -> None:
        """Close what a retry replaces, so its upstream connection is let go at once."""
        if self.reply is not None and self.broken is None and self.reply.chunks is not None:
            await self.reply.chunks.aclose()


async def _broken_stream(error: StreamInterrupted) -> AsyncGenerator[bytes, None]:
    """A stream that breaks before its first chunk, as the upstream's did."""
    no_chunks: tuple[bytes, ...] = ()
    for chunk in no_chunks:  # the `yield` only makes this an async generator
        yield chunk
    raise error


@register("retry")
class Retry:
    """Retry upstream failures that happened before the first byte, within two budgets.

    The schedule is the `backoff` library's (`backoff.expo`, `backoff.full_jitter`)
    but the loop is not its `on_predicate`/`on_exception` decorator, which cannot
    express this policy: it sleeps with `asyncio.sleep` and times `max_time` with
    `datetime.datetime.now()`, both hard-coded (backoff 2.2.1, `_async.py`), so
    `context.sleep` and `context.clock` could not be injected (tests would need
    real sleeps or monkeypatching); its `max_time` shortens the last wait to fit
    where this policy gives up; it would jitter a server's `Retry-After` too; and
    whether to retry cannot depend on the wait it computed (the time budget) or
    on a budget shared across requests. The loop below is what remains once
    those rules are in.
    """

    config_model: ClassVar[type[Any]] = RetryConfig

    def __init__(
        self,
        config: RetryConfig,
        context: PolicyContext,
        *,
        jitter: Callable[[float], float] = backoff.full_jitter,
    ) -> None:
        self.config = config
        self._attempts = config.attempts
        self._clock = context.clock
        self._sleep = context.sleep
        self._jitter = jitter
        self.budget = RetryBudget(
            config.budget_ratio, config.budget_min_retries, config.budget_window, context.clock()
        )
        metrics = context.metrics
        self._retries = metrics.counter(
            "retries_total",
            "Upstream attempts made again, by route and reason.",
            ("route", "reason"),
        )
        self._giveups = metrics.counter(
            "retry_giveups_total",
            "Failed attempts passed on without a retry: attempts, budget (time) or retry_after.",
            ("route", "reason"),
        )
        self._budget_exhausted = metrics.counter(
            "retry_budget_exhausted_total",
            "Failed attempts not retried because the retry budget was spent.",
            ("route",),
        )

    def delays(self) -> Generator[float, Any, None]:
        """Backoff ceilings, one per retry: base, 2 x base, ... up to max_delay."""
        ceilings = backoff.expo(base=2, factor=self.config.base, max_value=self.config.max_delay)
        next(ceilings)  # backoff's generators start with a priming yield
        return ceilings

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        # The hot path: two stores, a clock read, a status check. Nothing is
        # parsed, nothing logged, and only a stream is peeked at.
        exchange.facts["attempts"] = 1
        exchange.response_headers[ATTEMPTS_HEADER] = "1"
        if exchange.route.management is not None or self._attempts == 1:
            return await call_next(exchange)
        started = self._clock()
        self.budget.record_request(started)
        attempt = 1
        ceilings: Generator[float, Any, None] | None = None
        while True:
            failure: _Failure
            try:
                reply = await call_next(exchange)
            except (UpstreamError, StreamInterrupted) as error:
                # A StreamInterrupted raised here (not from a stream) comes from an
                # inner policy that peeked, e.g. a fallback that ran out of candidates:
                # nothing reached the client yet, so it is as retryable as a reset.
                failure = _Failure(upstream_failure(None, error) or "connection", error=error)
            else:
                status = reply.status
                if status in RETRY_STATUSES:
                    failure = _Failure(str(status), reply=reply)
                elif status != 200 or reply.chunks is None or attempt == self._attempts:
                    return reply
                else:
                    try:
                        return await peek_first_chunk(reply)
                    except StreamInterrupted as broken:
                        failure = _Failure("stream", reply=reply, broken=broken)
            if ceilings is None:
                ceilings = self.delays()
            wait = self._wait_before_retry(exchange, attempt, failure, started, next(ceilings))
            if wait is None:
                # The sidecar has decided: OpenAI's SDKs read this header and do not
                # retry on top, so its retries and ours never multiply into a storm.
                exchange.response_headers[SHOULD_RETRY_HEADER] = "false"
                return failure.answer()
            await failure.discard()
            attempt += 1
            exchange.facts["attempts"] = attempt
            exchange.response_headers[ATTEMPTS_HEADER] = _ATTEMPT_TEXT[attempt]
            self._retries.labels(exchange.route.name, failure.reason).inc()
            _log().info(
                "upstream_retry",
                attempt=attempt,
                reason=failure.reason,
                wait_s=round(wait, 6),
                route=exchange.route.name,
            )
            await self._sleep(wait)

    def _wait_before_retry(
        self, exchange: Exchange, attempt: int, failure: _Failure, started: float, ceiling: float
    ) -> float | None:
        """Seconds to wait before the next attempt, or None to give up on this failure."""
        route = exchange.route.name
        if attempt >= self._attempts:
            self._give_up(route, "attempts", attempt, failure)
            return None
        retry_after = (
            retry_after_seconds(failure.reply.headers)
            if failure.reply is not None and failure.broken is None
            else None
        )
        if retry_after is not None:
            if retry_after > self.config.max_retry_after:
                self._give_up(route, "retry_after", attempt, failure)
                return None
            wait = retry_after
        else:
            wait = self._jitter(ceiling)
        now = self._clock()
        if now + wait > started + self.config.budget:
            self._give_up(route, "budget", attempt, failure)
            return None
        if not self.budget.try_spend(now):
            self._budget_exhausted.labels(route).inc()
            _log().info(
                "upstream_retry_budget_exhausted",
                attempt=attempt,
                reason=failure.reason,
                route=route,
                window_requests=self.budget.requests,
                window_retries=self.budget.retries,
            )
            return None
        return wait

    def _give_up(self, route: str, why: str, attempt: int, failure: _Failure) -> None:
        """Count and log a failure passed on without a retry (a failure path: it may log)."""
        self._giveups.labels(route, why).inc()
        _log().info(
            "upstream_retry_gave_up", attempts=attempt, why=why, reason=failure.reason, route=route
        )
        return None
