"""concurrency: a cap on the requests in flight to each upstream, with a bounded FIFO queue.

Ollama runs one request per model at a time by default and queues up to 512
more before it answers 503 "server busy". A queue that deep in front of a GPU
means minutes of waiting that the app cannot see or bound. This policy keeps
the queue in the sidecar instead, where it is small, fair, timed and visible:
at most `max_in_flight` requests reach an upstream at once (and, with
`per_model`, at most `max_in_flight_per_model` reach one model), up to
`max_queue` more wait in arrival order for at most `queue_timeout`, and the
rest are told at once to come back later (429, or 503, with `Retry-After`).

Where it goes in the chain: innermost, after `routing` (it keys on the
upstream that routing chose, `facts["upstream"]`, and on the model after
aliasing) and after `retry` (each attempt takes a slot of its own, and a
backoff sleep holds none); after `cache`, so a cache hit takes no slot.

A slot is held for the whole upstream work: a plain reply until `call_next`
returns, a stream until its last byte, its failure, or the client going away.
Only the routes that make Ollama run a model take a slot by default (`routes`):
a model listing or a version check must not wait behind a long generation.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from sidecar.chain import Next, PolicyContext, register
from sidecar.errors import SidecarError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import STRICT, AfterValidator, Duration, Field
from sidecar.observability import LATENCY_BUCKETS
from sidecar.replies import watch_stream
from sidecar.routes import GENERATION_ROUTES, known_routes

MODEL_ROUTES = GENERATION_ROUTES

# A Retry-After longer than this says nothing useful to a client in a pod.
MAX_RETRY_AFTER = 3600
# Until a request on an upstream has finished, one service is taken to last this long.
DEFAULT_SERVICE_TIME = 1.0
# Weight of the newest service time in the moving mean behind Retry-After.
SERVICE_TIME_WEIGHT = 0.2
# Per-model state is kept for this many models per upstream before idle ones are dropped:
# model names come from clients, so the set must stay bounded.
MAX_TRACKED_MODELS = 256


@dataclass(frozen=True, kw_only=True)
class ConcurrencyConfig:
    __pydantic_config__ = STRICT

    max_in_flight: Annotated[
        int,
        Field(ge=1, le=10_000, description="Requests sent to one upstream at once; more wait."),
    ] = 8
    per_model: Annotated[
        bool,
        Field(description="Also cap the requests to each model of an upstream (both caps apply)."),
    ] = False
    max_in_flight_per_model: Annotated[
        int,
        Field(
            ge=1,
            le=10_000,
            description="With per_model: requests to one model at once (Ollama's OLLAMA_NUM_PARALLEL).",
        ),
    ] = 1
    max_queue: Annotated[
        int,
        Field(
            ge=0,
            le=100_000,
            description="Requests that may wait for a slot per upstream; beyond it they are refused.",
        ),
    ] = 64
    queue_timeout: Annotated[
        Duration,
        Field(
            gt=0, le=3600, description="Longest a request waits for a slot before it is refused."
        ),
    ] = 30.0
    reject_status: Annotated[
        Literal[429, 503],
        Field(description="Status of a refusal: 429 (clients back off and retry) or 503."),
    ] = 429
    routes: Annotated[
        tuple[str, ...],
        Field(
            min_length=1,
            description="Routes that take a slot; others (model lists, version) never wait.",
        ),
        AfterValidator(known_routes),
    ] = MODEL_ROUTES


class _ModelGate:
    """One model's share of an upstream: its requests in flight and waiting."""

    __slots__ = ("in_flight", "name", "queued")

    def __init__(self, name: str) -> None:
        self.name = name
        self.in_flight = 0
        self.queued = 0


_WaiterState = Literal["waiting", "granted", "expired", "gone"]


class _Waiter:
    """A request in the queue: the future it awaits and the model it counts against."""

    __slots__ = ("future", "model", "state", "timer")

    def __init__(self, future: asyncio.Future[None], model: _ModelGate | None) -> None:
        self.future = future
        self.model = model
        self.state: _WaiterState = "waiting"
        self.timer: asyncio.TimerHandle | None = None


class _Gate:
    """One upstream: its slots in use, its FIFO queue, its models and its service-time mean."""

    __slots__ = ("in_flight", "mean_service", "models", "name", "rejected", "waited", "waiters")

    def __init__(self, name: str, waited: Any) -> None:
        self.name = name
        self.in_flight = 0
        self.waiters: deque[_Waiter] = deque()
        self.models: dict[str, _ModelGate] = {}
        self.mean_service: float | None = None
        self.waited = waited  # the queue-wait histogram's child for this upstream
        self.rejected: dict[str, Any] = {}


@register("concurrency")
class Concurrency:
    """Caps in-flight upstream requests per upstream (and per model), queueing the excess FIFO.

    Fairness invariant: after every change, no waiter in a queue could take a
    slot. Slots are handed to waiters the moment they free up (and counted as
    taken right then), so a newcomer that finds a free slot may take it without
    looking at the queue: anyone ahead of it is blocked by a cap the newcomer
    does not share. That keeps the path under the cap to a lookup and an
    increment: no future, no timer, no task.
    """

    config_model: ClassVar[type[Any]] = ConcurrencyConfig

    def __init__(self, config: ConcurrencyConfig, context: PolicyContext) -> None:
        self.config = config
        self._max_in_flight = config.max_in_flight
        self._per_model = config.per_model
        self._model_cap = config.max_in_flight_per_model
        self._max_queue = config.max_queue
        self._queue_timeout = config.queue_timeout
        self._reject_status = config.reject_status
        self._routes = frozenset(config.routes)
        self._clock = context.clock
        self._gates: dict[str, _Gate] = {}
        metrics = context.metrics
        self._in_flight_gauge = metrics.gauge(
            "concurrency_in_flight",
            "Requests holding a concurrency slot, by upstream.",
            ("upstream",),
        )
        self._queued_gauge = metrics.gauge(
            "concurrency_queued",
            "Requests waiting for a concurrency slot, by upstream.",
            ("upstream",),
        )
        self._model_in_flight_gauge = metrics.gauge(
            "concurrency_model_in_flight",
            "Requests holding a concurrency slot, by upstream and model (with per_model).",
            ("upstream", "model"),
        )
        self._wait_histogram = metrics.histogram(
            "concurrency_queue_wait_seconds",
            "Time requests spent in the concurrency queue, whatever came of it.",
            ("upstream",),
            LATENCY_BUCKETS,
        )
        self._rejections = metrics.counter(
            "concurrency_rejections_total",
            "Requests refused by the concurrency policy, by upstream and reason.",
            ("upstream", "reason"),
        )

    # --- the request path ---------------------------------------------------------

    async def __call__(self, exchange: Exchange, call_next: Next) -> Reply:
        if exchange.route.name not in self._routes:
            return await call_next(exchange)
        name = exchange.facts.get("upstream", "default")
        gate = self._gates.get(name) or self._new_gate(name)
        model: _ModelGate | None = None
        if self._per_model:
            model_name = exchange.model or ""
            model = gate.models.get(model_name) or self._new_model(gate, model_name)
            free = gate.in_flight < self._max_in_flight and model.in_flight < self._model_cap
        else:
            free = gate.in_flight < self._max_in_flight
        if free:
            gate.in_flight += 1
            if model is not None:
                model.in_flight += 1
        else:
            await self._wait(gate, model)
        started = self._clock()
        try:
            reply = await call_next(exchange)
        except BaseException:
            self._release(gate, model, started)
            raise
        if reply.chunks is None:
            self._release(gate, model, started)
            return reply
        # A stream holds its slot to its end, however it ends: watch_stream reports
        # exactly once, a stream closed unstarted or dropped unclosed included.
        return watch_stream(reply, lambda end, error: self._release(gate, model, started))

    async def _wait(self, gate: _Gate, model: _ModelGate | None) -> None:
        """Queue up and return holding a slot, or raise the refusal (or the cancellation)."""
        waiters = gate.waiters
        if len(waiters) >= self._max_queue:
            self._count_rejection(gate, "queue_full")
            raise self._refusal(
                gate,
                model,
                "queue_full",
                len(waiters),
                model.queued if model is not None else 0,
            )
        loop = asyncio.get_running_loop()
        waiter = _Waiter(loop.create_future(), model)
        waiters.append(waiter)
        if model is not None:
            model.queued += 1
        queued_at = self._clock()
        waiter.timer = loop.call_later(self._queue_timeout, self._expire, gate, waiter)
        try:
            await waiter.future
        except BaseException:
            waiter.timer.cancel()
            if waiter.state == "granted":
                # Cancelled (client gone) after a slot was handed over: pass it on.
                self._release(gate, model, None)
            elif waiter.state == "waiting":
                self._dequeue(gate, waiter)
                waiter.state = "gone"
            elif not waiter.future.cancelled():
                waiter.future.exception()  # expired and cancelled at once: mark it retrieved
            raise
        finally:
            gate.waited.observe(self._clock() - queued_at)

    def _expire(self, gate: _Gate, waiter: _Waiter) -> None:
        """The queue timeout of one waiter: out of the queue, and refused with Retry-After."""
        if waiter.state != "waiting" or waiter.future.done():
            return  # granted, or its task was cancelled and will leave by itself
        waiters = gate.waiters
        ahead = waiters.index(waiter)
        model = waiter.model
        ahead_of_model = 0
        if model is not None:
            ahead_of_model = sum(1 for other in list(waiters)[:ahead] if other.model is model)
        self._dequeue(gate, waiter)
        waiter.state = "expired"
        self._count_rejection(gate, "queue_timeout")
        waiter.future.set_exception(
            self._refusal(gate, model, "queue_timeout", ahead, ahead_of_model)
        )

    def _dequeue(self, gate: _Gate, waiter: _Waiter) -> None:
        gate.waiters.remove(waiter)
        if waiter.model is not None:
            waiter.model.queued -= 1

    def _release(self, gate: _Gate, model: _ModelGate | None, started: float | None) -> None:
        """Free a slot, learn how long it was held, and hand it to the first waiter that fits."""
        gate.in_flight -= 1
        if model is not None:
            model.in_flight -= 1
        if started is not None:
            held = self._clock() - started
            mean = gate.mean_service
            gate.mean_service = held if mean is None else mean + SERVICE_TIME_WEIGHT * (held - mean)
        if gate.waiters:
            self._grant(gate)

    def _grant(self, gate: _Gate) -> None:
        """Hand free slots to waiters in arrival order, skipping those whose model is full.

        A waiter whose task was cancelled still sits in the queue until its task
        runs; it is dropped here so that it never takes a slot.
        """
        waiters = gate.waiters
        index = 0
        while index < len(waiters) and gate.in_flight < self._max_in_flight:
            waiter = waiters[index]
            model = waiter.model
            if waiter.future.done():
                del waiters[index]
                if model is not None:
                    model.queued -= 1
                waiter.state = "gone"
                continue
            if model is not None and model.in_flight >= self._model_cap:
                index += 1
                continue
            del waiters[index]
            gate.in_flight += 1
            if model is not None:
                model.queued -= 1
                model.in_flight += 1
            waiter.state = "granted"
            if waiter.timer is not None:
                waiter.timer.cancel()
            waiter.future.set_result(None)

    # --- refusals -----------------------------------------------------------------

    def _refusal(
        self,
        gate: _Gate,
        model: _ModelGate | None,
        reason: Literal["queue_full", "queue_timeout"],
        ahead: int,
        ahead_of_model: int,
    ) -> SidecarError:
        retry_after = self.retry_after(gate, ahead, model, ahead_of_model)
        where = f"upstream {gate.name!r}"
        if model is not None:
            where += f", model {model.name!r}"
        if reason == "queue_full":
            why = f"the queue is full ({len(gate.waiters)} waiting, {gate.in_flight} in flight)"
        else:
            why = f"no slot came free within concurrency.queue_timeout ({self._queue_timeout:g}s)"
        return SidecarError(
            self._reject_status,
            f"too many concurrent requests to {where}: {why}; retry after {retry_after}s",
            code="concurrency_limit",
            headers={"Retry-After": str(retry_after)},
        )

    def retry_after(
        self, gate: _Gate, ahead: int, model: _ModelGate | None = None, ahead_of_model: int = 0
    ) -> int:
        """Seconds until a slot is likely free for a request with `ahead` waiters before it.

        ceil(mean service time x queue position / slots), at least 1 and at most
        an hour. The mean is an exponentially weighted moving mean (weight 0.2)
        of how long recent requests held a slot on this upstream, streams to
        their last byte: O(1) to keep, and it follows a change of load (a cold
        model, longer prompts) within a few requests, where a lifetime mean
        would not. With `slots` requests served at once, the request at
        `position` gets its turn after about position/slots services. With
        per_model, the model's own cap and queue give a second estimate and the
        longer one wins. Before any request has finished, a service counts as 1 s.
        """
        mean = gate.mean_service if gate.mean_service is not None else DEFAULT_SERVICE_TIME
        seconds = mean * (ahead + 1) / self._max_in_flight
        if model is not None:
            seconds = max(seconds, mean * (ahead_of_model + 1) / self._model_cap)
        return min(max(1, math.ceil(seconds)), MAX_RETRY_AFTER)

    def _count_rejection(self, gate: _Gate, reason: str) -> None:
        counter = gate.rejected.get(reason)
        if counter is None:
            counter = gate.rejected[reason] = self._rejections.labels(gate.name, reason)
        counter.inc()

    # --- state and what it shows --------------------------------------------------

    def _new_gate(self, name: str) -> _Gate:
        """An upstream seen for the first time; upstream names come from the config, so few."""
        gate = self._gates[name] = _Gate(name, self._wait_histogram.labels(name))
        # Read at scrape time: the request path pays nothing for the gauges.
        self._in_flight_gauge.labels(name).set_function(lambda: gate.in_flight)
        self._queued_gauge.labels(name).set_function(lambda: len(gate.waiters))
        return gate

    def _new_model(self, gate: _Gate, name: str) -> _ModelGate:
        """A model seen for the first time on this upstream (idle ones are dropped past a bound)."""
        models = gate.models
        if len(models) >= MAX_TRACKED_MODELS:
            for idle in [m for m in models.values() if m.in_flight == 0 and m.queued == 0]:
                del models[idle.name]
                self._model_in_flight_gauge.remove(gate.name, idle.name)
        model = models[name] = _ModelGate(name)
        self._model_in_flight_gauge.labels(gate.name, name).set_function(lambda: model.in_flight)
        return model

    def readiness(self) -> dict[str, Any]:
        """Each upstream's slots in use and waiters (and each model's, with per_model)."""
        detail: dict[str, Any] = {}
        for name, gate in self._gates.items():
            entry: dict[str, Any] = {
                "in_flight": gate.in_flight,
                "queued": len(gate.waiters),
                "max_in_flight": self._max_in_flight,
                "max_queue": self._max_queue,
            }
            if self._per_model:
                entry["models"] = {
                    model.name: {"in_flight": model.in_flight, "queued": model.queued}
                    for model in gate.models.values()
                    if model.in_flight or model.queued
                }
            detail[name] = entry
        return {"upstreams": detail}
