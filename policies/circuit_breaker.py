"""circuit_breaker: stop sending to an upstream that keeps failing, and find out when it is back.

An Ollama that is down, out of memory or wedged answers every request slowly
or with a 5xx; sending it more only lengthens its queue and makes each client
wait for a timeout. One breaker per upstream (and per model with `per_model`)
counts upstream failures: after `failure_threshold` in a row, or when the
failure rate over a sliding `window` reaches `failure_rate` (with at least
`min_requests` in it), it opens and answers 503 `circuit_open` at once, with a
`Retry-After`, without asking the upstream. After `open_for` it is half-open:
`half_open_probes` requests go through; if all succeed it closes, if one fails
it opens for another `open_for`.

Failures are 5xx answers, timeouts, refused or dropped connections and streams
that break. A 4xx is the upstream answering, so it counts as a success;
refusals by other policies, cancelled requests and streams the client left
count as nothing. A stream counts when it ends, so a streamed probe keeps the
breaker half-open until its last chunk.

The breaker keys on the upstream that `routing` chose, so list it after
`routing` (routing then tries the next upstream when a breaker is open), and
after `retry`, so that each attempt counts and retries stop once it opens.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import structlog
from prometheus_client import Gauge

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import SidecarError, StreamInterrupted
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, Duration, Field
from sidecar.lean_metrics import LeanCounter
from sidecar.outcomes import upstream_failure
from sidecar.replies import StreamEnd, watch_stream

log = structlog.get_logger("sidecar.circuit_breaker")

CLOSED, HALF_OPEN, OPEN = 0, 1, 2
STATE_NAMES = ("closed", "half_open", "open")

# The rate window is a ring of this many buckets: memory per breaker is fixed,
# whatever the traffic, and the window slides in steps of `window / BUCKETS`.
BUCKETS = 30
# Longest model name kept as (part of) a breaker key: a client may send any
# string, and a thousand breakers must not hold a thousand huge keys.
MAX_MODEL_KEY = 200
DEFAULT_UPSTREAM = "default"


# After a reload the old and the new policy instance share the metric families
# (one set per Metrics), and may both have a breaker of the same name: only the
# instance that made a name's series last may remove them, or closing the old
# instance would cut the new one's series. Keyed by the state gauge, which is
# one per Metrics.
_OWNERS: weakref.WeakKeyDictionary[Gauge, dict[str, CircuitBreaker]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, kw_only=True)
class CircuitBreakerConfig:
    __pydantic_config__ = STRICT

    failure_threshold: Annotated[
        int,
        Field(ge=1, le=10_000, description="Upstream failures in a row that open the breaker."),
    ] = 5
    failure_rate: Annotated[
        float | None,
        Field(
            gt=0,
            le=1,
            description="Share of failures within `window` that opens the breaker; null: no rate rule.",
        ),
    ] = 0.5
    min_requests: Annotated[
        int,
        Field(
            ge=1,
            le=1_000_000,
            description="Requests `window` must hold before the rate rule may open the breaker.",
        ),
    ] = 20
    window: Annotated[
        Duration,
        Field(ge=1, le=3600, description="Sliding window the failure rate is measured over."),
    ] = 30.0
    open_for: Annotated[
        Duration,
        Field(
            ge=0.001,
            le=3600,
            description="How long an open breaker answers 503 before it lets probes through.",
        ),
    ] = 30.0
    half_open_probes: Annotated[
        int,
        Field(
            ge=1,
            le=1000,
            description="Requests let through at once when half-open; all must succeed to close it.",
        ),
    ] = 1
    per_model: Annotated[
        bool, Field(description="One breaker per upstream and model, rather than per upstream.")
    ] = False
    max_breakers: Annotated[
        int,
        Field(
            ge=1,
            le=100_000,
            description="Most breakers kept (per_model); closed, idle ones are evicted beyond it.",
        ),
    ] = 1000


class _Window:
    """Requests and failures over the last `window` seconds, in a fixed ring of buckets.

    Recording an outcome costs a division, a compare and two increments; the
    running totals make the rate check O(1), and memory does not grow with traffic.
    """

    __slots__ = ("_bucket", "_failures", "_requests", "_width", "failures", "requests")

    def __init__(self, window: float) -> None:
        self._width = window / BUCKETS
        self._requests = [0] * BUCKETS
        self._failures = [0] * BUCKETS
        self._bucket = 0  # the absolute number of the newest bucket
        self.requests = 0
        self.failures = 0

    def advance(self, now: float) -> int:
        """Drop the buckets that slid out of the window; the index of the current one."""
        bucket = int(now / self._width)
        steps = bucket - self._bucket
        if steps:
            if steps < 0 or steps >= BUCKETS:
                self.clear()
            else:
                requests, failures = self._requests, self._failures
                for number in range(self._bucket + 1, bucket + 1):
                    index = number % BUCKETS
                    self.requests -= requests[index]
                    self.failures -= failures[index]
                    requests[index] = failures[index] = 0
            self._bucket = bucket
        return bucket % BUCKETS

    def record(self, now: float, failed: bool) -> None:
        index = self.advance(now)
        self._requests[index] += 1
        self.requests += 1
        if failed:
            self._failures[index] += 1
            self.failures += 1

    def clear(self) -> None:
        for index in range(BUCKETS):
            self._requests[index] = self._failures[index] = 0
        self.requests = self.failures = 0


class _Breaker:
    """One upstream's (or one upstream and model's) state machine.

    Plain attributes, no locks: everything runs on the event loop, and no
    method awaits, so each transition is atomic. Each request remembers the
    `epoch` it was admitted in (bumped on every transition): a result from an
    older epoch, such as a long stream started before the breaker opened,
    decides nothing about the upstream as it is now. Time comes only from the
    policy's clock (`context.clock`), so tests drive it without sleeping.
    """

    __slots__ = (
        "_policy",
        "_rejections",
        "consecutive",
        "epoch",
        "last_failure",
        "name",
        "open_until",
        "probe_successes",
        "probes",
        "state",
        "used",
        "window",
    )

    def __init__(self, policy: CircuitBreaker, name: str) -> None:
        self._policy = policy
        self.name = name
        self.state = CLOSED
        # Bumped on every transition; a result from an older epoch decides nothing.
        self.epoch = 0
        self.consecutive = 0
        self.window = _Window(policy.config.window) if policy.config.failure_rate else None
        self.open_until = 0.0
        self.probes = 0  # probes admitted in this half-open period and not abandoned
        self.probe_successes = 0
        self.last_failure: str | None = None
        self.used = True  # the eviction clock's "recently used" bit
        self._rejections: Any = None

    # -- the request path ------------------------------------------------------

    def admit(self) -> None:
        """For a breaker that is not closed: take a probe slot, or raise the 503."""
        now = self._policy.clock()
        if self.state == OPEN:
            if now < self.open_until:
                self._reject(self.open_until - now)
            self._to(HALF_OPEN, now)
        if self.probes >= self._policy.config.half_open_probes:
            self._reject(0.0)
        self.probes += 1

    def _reject(self, wait: float) -> None:
        if self._rejections is None:
            self._rejections = self._policy.rejections.labels(self.name)
        self._rejections.inc()
        seconds = max(1, math.ceil(wait))
        if self.state == OPEN:
            message = (
                f"the circuit breaker for {self.name} is open after repeated upstream "
                f"failures; try again in {seconds}s"
            )
        else:
            message = (
                f"the circuit breaker for {self.name} is half-open and testing the upstream "
                f"with {self.probes} request(s); try again in {seconds}s"
            )
        raise SidecarError(503, message, code="circuit_open", headers={"Retry-After": str(seconds)})

    def succeeded(self, epoch: int, probe: bool) -> None:
        if epoch != self.epoch:
            return
        if probe:
            self.probe_successes += 1
            if self.probe_successes >= self._policy.config.half_open_probes:
                self._to(CLOSED, self._policy.clock())
            return
        self.consecutive = 0
        if self.window is not None:
            self.window.record(self._policy.clock(), False)

    def failed(self, epoch: int, probe: bool, reason: str) -> None:
        if epoch != self.epoch:
            return
        now = self._policy.clock()
        self.last_failure = reason
        if probe:
            self._to(OPEN, now, "probe_failed")
            return
        self.consecutive += 1
        config = self._policy.config
        window = self.window
        if window is not None:
            window.record(now, True)
        if self.consecutive >= config.failure_threshold:
            self._to(OPEN, now, "consecutive_failures")
        elif (
            window is not None
            and window.requests >= config.min_requests
            # A division, not a product: 3/10 and 0.3 round to the same float, 10*0.3 does not.
            and window.failures / window.requests >= (config.failure_rate or 1.0)
        ):
            self._to(OPEN, now, "failure_rate")

    def abandoned(self, epoch: int) -> None:
        """A probe whose client went away (or was refused further in): free its slot."""
        if epoch == self.epoch and self.state == HALF_OPEN and self.probes > 0:
            self.probes -= 1

    # -- transitions -----------------------------------------------------------

    def refresh(self) -> int:
        """The state now: an open breaker whose `open_for` is over is half-open."""
        if self.state == OPEN:
            now = self._policy.clock()
            if now >= self.open_until:
                self._to(HALF_OPEN, now)
        return self.state

    def _to(self, state: int, now: float, reason: str | None = None) -> None:
        policy = self._policy
        self.state = state
        self.epoch += 1
        self.probes = self.probe_successes = 0
        policy.transitions.labels(self.name, STATE_NAMES[state]).inc()
        if state == OPEN:
            self.open_until = now + policy.config.open_for
            log.warning(
                "circuit_open",
                breaker=self.name,
                reason=reason,
                last_failure=self.last_failure,
                consecutive_failures=self.consecutive,
                window_requests=self.window.requests if self.window else None,
                window_failures=self.window.failures if self.window else None,
                open_for_s=policy.config.open_for,
            )
        elif state == HALF_OPEN:
            log.info("circuit_half_open", breaker=self.name, probes=policy.config.half_open_probes)
        else:
            self.consecutive = 0
            self.last_failure = None
            if self.window is not None:
                self.window.clear()
            log.info("circuit_closed", breaker=self.name)

    def detail(self) -> dict[str, Any]:
        """What /readyz shows of this breaker."""
        state = self.refresh()
        now = self._policy.clock()
        window = self.window
        if window is not None:
            window.advance(now)
        return {
            "state": STATE_NAMES[state],
            "consecutive_failures": self.consecutive,
            "window_requests": window.requests if window else None,
            "window_failures": window.failures if window else None,
            "half_open_in_s": round(self.open_until - now, 3) if state == OPEN else None,
            "probes_in_flight": self.probes if state == HALF_OPEN else None,
            "last_failure": self.last_failure,
        }


@register("circuit_breaker")
class CircuitBreaker:
    """Answer 503 `circuit_open` for an upstream that keeps failing, instead of asking it."""

    config_model: ClassVar[type[Any]] = CircuitBreakerConfig

    def __init__(self, config: CircuitBreakerConfig, context: PolicyContext) -> None:
        self.config = config
        self.clock: Callable[[], float] = context.clock
        metrics = context.metrics
        self.state_gauge: Gauge = metrics.gauge(
            "circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open.",
            ("breaker",),
        )
        self.transitions: LeanCounter = metrics.counter(
            "circuit_transitions_total",
            "Circuit breaker state changes, by the state entered.",
            ("breaker", "to"),
        )
        self.rejections: LeanCounter = metrics.counter(
            "circuit_rejections_total",
            "Requests answered 503 circuit_open without asking the upstream.",
            ("breaker",),
        )
        self._owners = _OWNERS.setdefault(self.state_gauge, {})
        self._breakers: dict[Hashable, _Breaker] = {}
        self._per_model = config.per_model

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        breaker = self._breaker_for(exchange)
        probe = False
        if breaker.state != CLOSED:
            breaker.admit()
            probe = True
        epoch = breaker.epoch
        try:
            reply = await call_next(exchange)
        except BaseException as error:
            reason = upstream_failure(None, error)
            if reason is not None:
                breaker.failed(epoch, probe, reason)
            elif probe:
                breaker.abandoned(epoch)
            raise
        reason = upstream_failure(reply, None)
        if reason is not None:
            breaker.failed(epoch, probe, reason)
            return reply
        if reply.chunks is None:
            breaker.succeeded(epoch, probe)
            return reply
        return _watch(reply, breaker, epoch, probe)

    def _breaker_for(self, exchange: Exchange) -> _Breaker:
        """The breaker for this exchange's upstream (and model): one dict lookup when it exists."""
        upstream = exchange.facts.get("upstream", DEFAULT_UPSTREAM)
        key: Hashable = upstream
        if self._per_model:
            model = exchange.model
            if model is not None:
                key = (upstream, model[:MAX_MODEL_KEY])
        breaker = self._breakers.get(key)
        if breaker is None:
            return self._create(key)
        breaker.used = True
        return breaker

    def _create(self, key: Hashable) -> _Breaker:
        full = len(self._breakers) >= self.config.max_breakers
        if full and not self._evict_one() and isinstance(key, tuple):
            # Every breaker is open or in use: a garbage model name must not grow
            # the map, so this exchange shares its upstream's breaker instead.
            upstream = key[0]
            return self._breakers.get(upstream) or self._add(upstream, str(upstream))
        name = f"{key[0]}/{key[1]}" if isinstance(key, tuple) else str(key)
        return self._add(key, name)

    def _add(self, key: Hashable, name: str) -> _Breaker:
        breaker = self._breakers[key] = _Breaker(self, name)
        self._owners[name] = self
        # The gauge reads the state when scraped, so it shows half-open once
        # `open_for` is over even if no request has come to notice it.
        self.state_gauge.labels(name).set_function(breaker.refresh)
        return breaker

    def _evict_one(self) -> bool:
        """Drop one closed breaker not used since the last sweep (the CLOCK algorithm).

        A used breaker loses its bit and moves to the back; an open or half-open
        one is never dropped (that would forget an outage). At most two passes.
        """
        breakers = self._breakers
        for _ in range(2 * len(breakers)):
            key = next(iter(breakers))
            breaker = breakers.pop(key)
            if breaker.state == CLOSED and not breaker.used:
                self._forget(breaker)
                return True
            breaker.used = False
            breakers[key] = breaker
        return False

    def _forget(self, breaker: _Breaker) -> None:
        """Remove a dropped breaker's series, unless a newer instance has taken the name."""
        name = breaker.name
        if self._owners.get(name) is not self:
            return
        del self._owners[name]
        self.state_gauge.remove(name)
        self.rejections.remove(name)
        for state in STATE_NAMES:
            self.transitions.remove(name, state)

    async def close(self) -> None:
        """On shutdown or when a reload retires this instance: drop its breakers' series."""
        for breaker in self._breakers.values():
            self._forget(breaker)
        self._breakers.clear()

    def readiness(self) -> dict[str, Any]:
        """Each breaker's state, failure counts and time to half-open, for /readyz detail."""
        breakers = {breaker.name: breaker.detail() for breaker in self._breakers.values()}
        return {
            # Breakers open or half-open: the one number to look at first.
            "tripped": sum(1 for detail in breakers.values() if detail["state"] != "closed"),
            "breakers": breakers,
        }


def _watch(reply: Reply, breaker: _Breaker, epoch: int, probe: bool) -> Reply:
    """The reply, deciding for the breaker when its stream ends.

    `watch_stream` reports every end exactly once, a stream closed before its
    first chunk included, so a probe always frees its slot.
    """

    def on_end(end: StreamEnd, broken: StreamInterrupted | None) -> None:
        if end == "complete":
            breaker.succeeded(epoch, probe)
        elif end == "failed":
            breaker.failed(epoch, probe, upstream_failure(None, broken) or "stream")
        elif probe:
            breaker.abandoned(epoch)

    return watch_stream(reply, on_end)
