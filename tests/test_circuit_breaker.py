"""circuit_breaker: opens on upstream failures, sheds load while open, probes, closes.

The unit tests build the policy directly on a fake clock and a stub upstream,
so every time-dependent rule is checked to the exact request and second with
no real sleep. The integration tests run a real sidecar against the fake
Ollama and check what a client and the upstream actually see.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
import typing
from collections import deque
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

import policies.circuit_breaker
from policies.circuit_breaker import CircuitBreaker, CircuitBreakerConfig
from sidecar.app import Sidecar
from sidecar.chain import PolicyContext
from sidecar.config import ConfigError, parse_settings
from sidecar.errors import SidecarError, StreamInterrupted, UpstreamError
from sidecar.exchange import Exchange, Reply
from sidecar.knobs import validate
from sidecar.observability import Metrics
from sidecar.routes import ROUTES
from tests.conftest import JsonLogs, SidecarFactory
from tests.fake_ollama import FakeOllama, Fault

assert policies.circuit_breaker  # imported for its registration as "circuit_breaker"

CHAT = {"model": "llama3.2:latest", "messages": [{"role": "user", "content": "hi"}]}


# --- unit-test tools ----------------------------------------------------------------


class FakeClock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


Outcome = Reply | BaseException


class StubUpstream:
    """`call_next`: answers with queued outcomes (default 200) and counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.outcomes: deque[Outcome] = deque()
        self.gate: asyncio.Event | None = None

    def queue(self, *outcomes: Outcome) -> None:
        self.outcomes.extend(outcomes)

    async def __call__(self, exchange: Exchange) -> Reply:
        self.calls += 1
        outcome = self.outcomes.popleft() if self.outcomes else ok()
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def ok(status: int = 200) -> Reply:
    return Reply(status, CIMultiDict(), body=b"{}")


def timeout() -> UpstreamError:
    return UpstreamError(504, "the upstream did not answer in time", code="upstream_timeout")


def stream(*chunks: bytes, broken: bool = False) -> Reply:
    async def chunks_() -> AsyncGenerator[bytes, None]:
        for chunk in chunks:
            yield chunk
        if broken:
            raise StreamInterrupted("the upstream connection broke mid-stream")

    return Reply(200, CIMultiDict(), chunks=chunks_(), stream_format="sse")


async def drain(reply: Reply | None) -> None:
    """Read a stream to its end, as the relay does (a break is the relay's to report)."""
    assert reply is not None and reply.chunks is not None
    try:
        async for _ in reply.chunks:
            pass
    except StreamInterrupted:
        pass


def exchange(model: str | None = "llama3.2", upstream: str | None = None) -> Exchange:
    body = orjson.dumps({"model": model, "messages": []}) if model is not None else b"{}"
    made = Exchange(
        method="POST",
        route=ROUTES["/v1/chat/completions"],
        path="/v1/chat/completions",
        query_string="",
        headers=CIMultiDictProxy(CIMultiDict()),
        body=body,
    )
    if upstream is not None:
        made.facts["upstream"] = upstream
    return made


class Harness:
    """One policy on a fake clock with a stub upstream, and shortcuts to drive it."""

    def __init__(
        self, clock: FakeClock | None = None, metrics: Metrics | None = None, **options: Any
    ) -> None:
        self.clock = clock or FakeClock()
        self.metrics = metrics or Metrics()
        context = PolicyContext(settings=parse_settings({}), metrics=self.metrics, clock=self.clock)
        self.policy = CircuitBreaker(validate(CircuitBreakerConfig, options), context)
        self.upstream = StubUpstream()

    async def send(
        self, *outcomes: Outcome, model: str | None = "llama3.2", upstream: str | None = None
    ) -> Reply | None:
        """One request per outcome (a 200 when none is given); the last reply, None if it raised.

        The breaker's own refusal propagates: a test that sends expects the upstream to be asked.
        """
        last: Reply | None = None
        for outcome in outcomes or (ok(),):
            self.upstream.queue(outcome)
            try:
                last = await self.policy(exchange(model, upstream), self.upstream)
            except (UpstreamError, asyncio.CancelledError):
                last = None
            except SidecarError as error:
                if error.code == "circuit_open":
                    raise
                last = None
        return last

    async def rejected(
        self, model: str | None = "llama3.2", upstream: str | None = None
    ) -> SidecarError:
        """Send one request that must be refused by the breaker without reaching upstream."""
        calls = self.upstream.calls
        with pytest.raises(SidecarError) as caught:
            await self.policy(exchange(model, upstream), self.upstream)
        assert caught.value.code == "circuit_open"
        assert self.upstream.calls == calls, "an open breaker must not call the upstream"
        return caught.value

    def state(self, name: str = "default") -> str:
        detail: dict[str, Any] = self.policy.readiness()["breakers"][name]
        return str(detail["state"])

    def sample(self, metric: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(f"ollama_sidecar_{metric}", labels)


def refusal() -> SidecarError:
    """What another policy further in raises when it refuses (a full queue, say)."""
    return SidecarError(429, "too many requests", code="rate_limited")


# --- opening --------------------------------------------------------------------------


async def test_opens_after_exactly_the_threshold_of_consecutive_failures() -> None:
    h = Harness(failure_threshold=3)
    await h.send(ok(503), ok(502))
    assert h.state() == "closed"
    await h.send(timeout())
    assert h.upstream.calls == 3
    assert h.state() == "open"
    await h.rejected()
    assert h.sample("circuit_transitions_total", breaker="default", to="open") == 1


async def test_a_success_resets_the_consecutive_count() -> None:
    h = Harness(failure_threshold=3, failure_rate=None)
    await h.send(ok(500), ok(500), ok(), ok(500), ok(500))
    assert h.state() == "closed"
    await h.send(ok(500))
    assert h.state() == "open"


async def test_4xx_is_the_upstream_answering_and_never_a_failure() -> None:
    h = Harness(failure_threshold=2)
    await h.send(*[ok(status) for status in (400, 404, 413, 429, 404, 400)])
    assert h.state() == "closed"
    # A 4xx also breaks a run of failures: the upstream answered.
    await h.send(ok(503), ok(404), ok(503))
    assert h.state() == "closed"


async def test_refusals_and_cancels_count_as_nothing() -> None:
    """Neither failures nor successes: they leave a run of failures as it was."""
    h = Harness(failure_threshold=3, failure_rate=None)
    await h.send(ok(503))
    for neutral in (refusal(), asyncio.CancelledError(), refusal()):
        h.upstream.queue(neutral)
        with pytest.raises((SidecarError, asyncio.CancelledError)):
            await h.policy(exchange(), h.upstream)
    assert h.policy.readiness()["breakers"]["default"]["consecutive_failures"] == 1
    await h.send(ok(503))
    assert h.state() == "closed"
    await h.send(ok(503))
    assert h.state() == "open"


async def test_every_kind_of_upstream_failure_counts() -> None:
    h = Harness(failure_threshold=6, failure_rate=None)
    disconnected = UpstreamError(502, "closed the connection", code="upstream_disconnected")
    await h.send(ok(500), ok(502), ok(503), ok(504), timeout(), disconnected)
    assert h.state() == "open"


async def test_rate_rule_needs_min_requests_and_slides_with_the_window() -> None:
    h = Harness(failure_threshold=1000, failure_rate=0.5, min_requests=10, window="10s")
    # Five failures, then the window slides past them.
    await h.send(*[ok(503)] * 5)
    h.clock.advance(11)
    # Five successes and four failures: 4/9 and too few requests.
    await h.send(*[ok()] * 5, *[ok(503)] * 4)
    assert h.state() == "closed"
    # The tenth request, a failure: 5/10 reaches the rate with min_requests in the window.
    await h.send(ok(503))
    assert h.state() == "open"
    assert h.policy.readiness()["breakers"]["default"]["window_failures"] == 5


async def test_rate_rule_does_not_open_below_min_requests() -> None:
    h = Harness(failure_threshold=1000, failure_rate=0.5, min_requests=20, window="30s")
    for _ in range(9):
        await h.send(ok(503), ok())  # 50% failures, but 18 requests
    assert h.state() == "closed"
    await h.send(ok(503), ok(503))  # 20 requests, 11 failures
    assert h.state() == "open"


async def test_rate_rule_below_the_rate_stays_closed() -> None:
    h = Harness(failure_threshold=1000, failure_rate=0.3, min_requests=10)
    for _ in range(20):
        await h.send(ok(), ok(), ok(), ok(503))  # 25% at every failure
    assert h.state() == "closed"


async def test_failure_rate_null_disables_the_rate_rule() -> None:
    h = Harness(failure_threshold=1000, failure_rate=None, min_requests=1)
    await h.send(*[ok(503)] * 100)
    assert h.state() == "closed"
    assert h.policy.readiness()["breakers"]["default"]["window_requests"] is None


# --- open -----------------------------------------------------------------------------


async def test_open_answers_503_with_retry_after_until_half_open() -> None:
    h = Harness(failure_threshold=1, open_for="30s")
    await h.send(ok(503))
    error = await h.rejected()
    assert error.status == 503
    assert error.headers == {"Retry-After": "30"}
    assert error.error_type == "api_error"
    h.clock.advance(10.2)
    assert (await h.rejected()).headers["Retry-After"] == "20"  # 19.8 rounded up
    h.clock.advance(19.7)
    assert (await h.rejected()).headers["Retry-After"] == "1"  # 0.1, at least 1
    assert h.sample("circuit_rejections_total", breaker="default") == 3
    assert h.upstream.calls == 1


# --- half-open ------------------------------------------------------------------------


async def test_half_open_lets_exactly_the_probes_through_and_closes_when_all_succeed() -> None:
    h = Harness(failure_threshold=1, open_for="5s", half_open_probes=2)
    await h.send(ok(503))
    h.clock.advance(5)
    h.upstream.gate = asyncio.Event()
    probes = [asyncio.create_task(h.policy(exchange(), h.upstream)) for _ in range(2)]
    await asyncio.sleep(0)  # both probes are now inside call_next, waiting on the gate
    assert h.upstream.calls == 3
    assert h.state() == "half_open"
    assert (await h.rejected()).headers["Retry-After"] == "1"
    h.upstream.gate.set()
    await asyncio.gather(*probes)
    assert h.state() == "closed"
    await h.send(ok())
    assert h.upstream.calls == 4


async def test_one_probe_success_is_not_enough_when_more_probes_are_configured() -> None:
    h = Harness(failure_threshold=1, open_for="5s", half_open_probes=2)
    await h.send(ok(503))
    h.clock.advance(5)
    await h.send(ok())
    assert h.state() == "half_open"
    await h.send(ok())
    assert h.state() == "closed"


async def test_a_failed_probe_reopens_for_another_open_for() -> None:
    h = Harness(failure_threshold=1, open_for="5s")
    await h.send(ok(503))
    h.clock.advance(6)
    await h.send(timeout())
    assert h.state() == "open"
    assert (await h.rejected()).headers["Retry-After"] == "5"
    h.clock.advance(4.9)
    await h.rejected()
    h.clock.advance(0.1)
    await h.send(ok())
    assert h.state() == "closed"
    assert h.sample("circuit_transitions_total", breaker="default", to="open") == 2
    assert h.sample("circuit_transitions_total", breaker="default", to="half_open") == 2
    assert h.sample("circuit_transitions_total", breaker="default", to="closed") == 1


async def test_a_cancelled_probe_frees_its_slot_without_deciding() -> None:
    h = Harness(failure_threshold=1, open_for="5s")
    await h.send(ok(503))
    h.clock.advance(5)
    h.upstream.queue(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await h.policy(exchange(), h.upstream)
    assert h.state() == "half_open"
    await h.send(ok())  # admitted as the probe: the slot was freed
    assert h.state() == "closed"


async def test_a_probe_refused_further_in_frees_its_slot() -> None:
    h = Harness(failure_threshold=1, open_for="5s")
    await h.send(ok(503))
    h.clock.advance(5)
    h.upstream.queue(refusal())
    with pytest.raises(SidecarError):
        await h.policy(exchange(), h.upstream)
    assert h.state() == "half_open"
    await h.send(ok())
    assert h.state() == "closed"


async def test_a_probe_stream_abandoned_mid_way_frees_its_slot() -> None:
    h = Harness(failure_threshold=1, open_for="5s")
    await h.send(ok(503))
    h.clock.advance(5)
    h.upstream.queue(stream(b"a", b"b", b"c"))
    reply = await h.policy(exchange(), h.upstream)
    assert reply.chunks is not None
    assert await anext(reply.chunks) == b"a"
    await h.rejected()  # the probe is still streaming
    await reply.chunks.aclose()  # the client went away
    assert h.state() == "half_open"
    await h.send(ok())
    assert h.state() == "closed"


async def test_a_probe_stream_closed_before_its_first_chunk_frees_its_slot() -> None:
    """The relay closes a stream it never started when the client left during the headers.

    Closing a generator that never ran does not run its `finally`, so
    watch_stream never reports that end; the breaker must not wait forever.
    """
    h = Harness(failure_threshold=1, open_for="5s")
    await h.send(ok(503))
    h.clock.advance(5)
    h.upstream.queue(stream(b"a"))
    reply = await h.policy(exchange(), h.upstream)
    assert reply.chunks is not None
    await reply.chunks.aclose()
    del reply
    gc.collect()
    await h.send(ok())
    assert h.state() == "closed"


# --- streams --------------------------------------------------------------------------


async def test_streams_count_at_their_end() -> None:
    h = Harness(failure_threshold=2, failure_rate=None)
    broken = await h.send(stream(b"a", broken=True))
    await h.send(stream(b"a", broken=True))
    assert h.state() == "closed", "nothing is known before the streams end"
    await drain(broken)
    assert h.policy.readiness()["breakers"]["default"]["consecutive_failures"] == 1
    # A stream that completes is a success and breaks the run.
    await drain(await h.send(stream(b"a", b"b")))
    assert h.policy.readiness()["breakers"]["default"]["consecutive_failures"] == 0
    await drain(await h.send(stream(b"a", broken=True)))
    await drain(await h.send(stream(b"a", broken=True)))
    assert h.state() == "open"


async def test_a_stream_the_client_abandons_counts_as_nothing() -> None:
    h = Harness(failure_threshold=2, failure_rate=None)
    await h.send(ok(503))
    reply = await h.send(stream(b"a", b"b", broken=True))
    assert reply is not None and reply.chunks is not None
    await anext(reply.chunks)
    await reply.chunks.aclose()
    assert h.policy.readiness()["breakers"]["default"]["consecutive_failures"] == 1


async def test_a_probe_stream_decides_at_its_end() -> None:
    h = Harness(failure_threshold=1, open_for="5s")
    await h.send(ok(503))
    h.clock.advance(5)
    reply = await h.send(stream(b"a", broken=True))
    assert h.state() == "half_open"
    await drain(reply)
    assert h.state() == "open"
    h.clock.advance(5)
    reply = await h.send(stream(b"a", b"b"))
    assert h.state() == "half_open"
    await drain(reply)
    assert h.state() == "closed"


async def test_a_result_from_before_the_breaker_moved_on_decides_nothing() -> None:
    """A long stream started while closed must not count against a breaker that has since
    opened and closed again: it says nothing about the upstream as it is now."""
    h = Harness(failure_threshold=1, open_for="5s")
    old = await h.send(stream(b"a", broken=True))
    await h.send(ok(503))
    assert h.state() == "open"
    h.clock.advance(5)
    await h.send(ok())
    assert h.state() == "closed"
    await drain(old)
    assert h.state() == "closed"
    assert h.policy.readiness()["breakers"]["default"]["consecutive_failures"] == 0


# --- keys, eviction -------------------------------------------------------------------


async def test_one_breaker_per_upstream() -> None:
    h = Harness(failure_threshold=1)
    await h.send(ok(503), upstream="east")
    await h.rejected(upstream="east")
    await h.send(ok(), upstream="west")
    await h.send(ok())  # no routing fact: the "default" upstream
    assert {name: d["state"] for name, d in h.policy.readiness()["breakers"].items()} == {
        "east": "open",
        "west": "closed",
        "default": "closed",
    }


async def test_per_model_breakers() -> None:
    h = Harness(failure_threshold=1, per_model=True)
    await h.send(ok(503), model="big:70b")
    await h.rejected(model="big:70b")
    await h.send(ok(), model="small:1b")
    await h.send(ok(), model=None)  # no model: the upstream's own breaker
    states = {name: d["state"] for name, d in h.policy.readiness()["breakers"].items()}
    assert states == {"default/big:70b": "open", "default/small:1b": "closed", "default": "closed"}


async def test_without_per_model_the_model_is_not_even_read() -> None:
    h = Harness(failure_threshold=1)
    made = exchange()
    await h.policy(made, h.upstream)
    assert not made._json_parsed


async def test_per_model_breakers_are_capped_and_open_ones_survive_eviction() -> None:
    h = Harness(failure_threshold=1, per_model=True, max_breakers=3)
    await h.send(ok(503), model="broken")
    for index in range(50):
        await h.send(ok(), model=f"garbage-{index}")
        assert len(h.policy.readiness()["breakers"]) <= 3
    await h.rejected(model="broken")
    series = [
        line
        for line in h.metrics.render().decode().splitlines()
        if line.startswith("ollama_sidecar_circuit_state{")
    ]
    assert len(series) <= 3


async def test_a_busy_breaker_survives_eviction() -> None:
    """The CLOCK sweep drops breakers not used since its last pass, not the busy ones."""
    h = Harness(failure_threshold=5, per_model=True, max_breakers=4)
    await h.send(ok(503), model="hot")  # one failure on record
    for index in range(40):
        await h.send(ok(), model=f"garbage-{index}")
        await h.send(ok(503) if index % 4 == 0 else ok(404), model="hot")
    assert "default/hot" in h.policy.readiness()["breakers"]


async def test_when_every_breaker_is_open_a_new_model_shares_the_upstreams() -> None:
    h = Harness(failure_threshold=1, per_model=True, max_breakers=2)
    await h.send(ok(503), model="a")
    await h.send(ok(503), model="b")
    await h.send(ok(), model="c")
    assert set(h.policy.readiness()["breakers"]) == {"default/a", "default/b", "default"}


async def test_huge_model_names_are_cut_in_the_key() -> None:
    h = Harness(per_model=True)
    await h.send(ok(), model="x" * 100_000)
    (name,) = h.policy.readiness()["breakers"]
    assert len(name) < 300


# --- observability --------------------------------------------------------------------


async def test_state_gauge_follows_the_breaker_even_without_traffic() -> None:
    h = Harness(failure_threshold=1, open_for="5s")
    await h.send(ok())
    assert h.sample("circuit_state", breaker="default") == 0
    await h.send(ok(503))
    assert h.sample("circuit_state", breaker="default") == 2
    h.clock.advance(5)
    assert h.sample("circuit_state", breaker="default") == 1
    await h.send(ok())
    assert h.sample("circuit_state", breaker="default") == 0


async def test_readiness_detail() -> None:
    h = Harness(failure_threshold=2, open_for="10s", min_requests=100)
    await h.send(ok(), ok(503))
    assert h.policy.readiness() == {
        "tripped": 0,
        "breakers": {
            "default": {
                "state": "closed",
                "consecutive_failures": 1,
                "window_requests": 2,
                "window_failures": 1,
                "half_open_in_s": None,
                "probes_in_flight": None,
                "last_failure": "5xx",
            }
        },
    }
    await h.send(timeout())
    h.clock.advance(2.5)
    detail = h.policy.readiness()
    assert detail["tripped"] == 1
    assert detail["breakers"]["default"]["state"] == "open"
    assert detail["breakers"]["default"]["half_open_in_s"] == 7.5
    assert detail["breakers"]["default"]["last_failure"] == "timeout"


async def test_transitions_are_logged(json_logs: JsonLogs) -> None:
    h = Harness(failure_threshold=1, open_for="1s")
    await h.send(ok(503))
    h.clock.advance(1)
    await h.send(ok())
    lines = [line for line in json_logs() if line["event"].startswith("circuit_")]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("circuit_open", "warning"),
        ("circuit_half_open", "info"),
        ("circuit_closed", "info"),
    ]
    assert lines[0]["breaker"] == "default"
    assert lines[0]["reason"] == "consecutive_failures"
    assert lines[0]["last_failure"] == "5xx"


async def test_closing_a_retired_instance_keeps_the_new_ones_series() -> None:
    """After a reload old and new instance share the metrics; the old one's close must
    not remove a series the new one now feeds."""
    metrics = Metrics()
    old = Harness(metrics=metrics, failure_threshold=1)
    new = Harness(metrics=metrics, failure_threshold=1)
    await old.send(ok(), upstream="shared")
    await old.send(ok(), upstream="old-only")
    await new.send(ok(503), upstream="shared")
    await old.policy.close()
    assert new.sample("circuit_state", breaker="shared") == 2
    assert new.sample("circuit_transitions_total", breaker="shared", to="open") == 1
    assert new.sample("circuit_state", breaker="old-only") is None
    await new.policy.close()
    assert new.sample("circuit_state", breaker="shared") is None


# --- config ---------------------------------------------------------------------------


def test_config_defaults() -> None:
    config = CircuitBreakerConfig()
    assert (
        config.failure_threshold,
        config.failure_rate,
        config.min_requests,
        config.window,
        config.open_for,
        config.half_open_probes,
        config.per_model,
        config.max_breakers,
    ) == (5, 0.5, 20, 30.0, 30.0, 1, False, 1000)
    hints = typing.get_type_hints(CircuitBreakerConfig, include_extras=True)
    for name, hint in hints.items():
        assert any(getattr(meta, "description", None) for meta in hint.__metadata__), (
            f"{name} needs a line of help"
        )


def test_config_in_yaml_with_durations() -> None:
    settings = parse_settings(
        {
            "policies": [
                {"circuit_breaker": {"open_for": "200ms", "window": "1m", "failure_rate": None}}
            ]
        }
    )
    (entry,) = settings.policies
    assert isinstance(entry.options, CircuitBreakerConfig)
    assert entry.options.open_for == pytest.approx(0.2)
    assert entry.options.window == 60.0
    assert entry.options.failure_rate is None


@pytest.mark.parametrize(
    ("options", "path"),
    [
        ({"failure_treshold": 3}, "policies[0].circuit_breaker.failure_treshold"),
        ({"failure_threshold": 0}, "policies[0].circuit_breaker.failure_threshold"),
        ({"failure_rate": 1.5}, "policies[0].circuit_breaker.failure_rate"),
        ({"failure_rate": 0}, "policies[0].circuit_breaker.failure_rate"),
        ({"open_for": "soon"}, "policies[0].circuit_breaker.open_for"),
        ({"window": "100ms"}, "policies[0].circuit_breaker.window"),
        ({"half_open_probes": 0}, "policies[0].circuit_breaker.half_open_probes"),
        ({"max_breakers": 0}, "policies[0].circuit_breaker.max_breakers"),
    ],
)
def test_config_problems_name_their_yaml_path(options: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings({"policies": [{"circuit_breaker": options}]})
    assert [where for where, _ in caught.value.problems] == [path]


def test_config_is_frozen() -> None:
    config = CircuitBreakerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.failure_threshold = 1  # type: ignore[misc]


# --- integration: a real sidecar against the fake Ollama -------------------------------


async def post(
    http: aiohttp.ClientSession, sidecar: Sidecar, path: str = "/v1/chat/completions", **extra: Any
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    async with http.post(f"{sidecar.url}{path}", json={**CHAT, **extra}) as response:
        return response.status, orjson.loads(await response.read()), response.headers


async def breaker_detail(http: aiohttp.ClientSession, sidecar: Sidecar) -> dict[str, Any]:
    async with http.get(f"{sidecar.url}/readyz") as response:
        document = orjson.loads(await response.read())
    detail: dict[str, Any] = document["policies"]["circuit_breaker"]["breakers"]["default"]
    return detail


def state_metric(sidecar: Sidecar) -> float | None:
    return sidecar.metrics.registry.get_sample_value(
        "ollama_sidecar_circuit_state", {"breaker": "default"}
    )


async def shed_until_admitted(
    http: aiohttp.ClientSession, sidecar: Sidecar, fake: FakeOllama, within: float = 2.0
) -> tuple[int, int, float]:
    """Send a request every 20 ms until one passes the breaker (bounded by `within`).

    Checks that no refused request reached the upstream; returns how many were
    refused, the passing request's status, and when it was sent (perf_counter).
    """
    seen = len(fake.requests)
    rejected = 0
    async with asyncio.timeout(within):
        while True:
            sent = time.perf_counter()
            status, document, headers = await post(http, sidecar)
            if status == 503 and document["error"]["code"] == "circuit_open":
                rejected += 1
                assert len(fake.requests) == seen, "the upstream saw a request while open"
                assert int(headers["Retry-After"]) >= 1
                await asyncio.sleep(0.02)
                continue
            assert len(fake.requests) == seen + 1
            return rejected, status, sent


async def test_chaos_opens_within_threshold_sheds_load_half_opens_and_closes(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    open_for = 0.2
    sidecar = await make_sidecar(
        policies=[
            {"correlation": {}},
            {"circuit_breaker": {"failure_threshold": 3, "open_for": "200ms"}},
        ]
    )
    for _ in range(3):
        fake.inject(Fault("busy"))
    for _ in range(3):
        sent = time.perf_counter()
        status, document, _ = await post(http, sidecar)
        assert status == 503
        assert "server busy" in document["error"]["message"]  # Ollama's own, passed through
    opened = time.perf_counter()
    assert len(fake.requests) == 3
    assert state_metric(sidecar) == 2

    # Open: OpenAI shape with Retry-After, and nothing reaches the upstream.
    status, document, headers = await post(http, sidecar)
    first_rejection = time.perf_counter() - opened
    assert status == 503
    assert headers["Retry-After"] == "1"
    assert set(document["error"]) == {"message", "type", "param", "code"}
    assert document["error"]["code"] == "circuit_open"
    assert document["error"]["type"] == "api_error"
    assert headers["X-Request-ID"]
    # Native routes get Ollama's own error shape.
    status, document, headers = await post(http, sidecar, "/api/chat")
    assert status == 503
    assert isinstance(document["error"], str) and "circuit breaker" in document["error"]
    assert headers["Retry-After"] == "1"
    assert len(fake.requests) == 3
    detail = await breaker_detail(http, sidecar)
    assert detail["state"] == "open"
    assert detail["consecutive_failures"] == 3

    # Half-open after open_for: the probe goes through, succeeds, and closes the breaker.
    rejected, status, probe_sent = await shed_until_admitted(http, sidecar, fake)
    closed_after = time.perf_counter() - opened
    assert status == 200
    # The breaker opened after the third failing request was sent; the probe's answer
    # came after it was admitted: so at least open_for lies between the two.
    assert time.perf_counter() - sent >= open_for
    assert (await breaker_detail(http, sidecar))["state"] == "closed"
    assert state_metric(sidecar) == 0
    status, _, _ = await post(http, sidecar)
    assert status == 200
    metrics = sidecar.metrics.render().decode()
    assert 'ollama_sidecar_circuit_transitions_total{breaker="default",to="open"} 1.0' in metrics
    assert 'ollama_sidecar_circuit_transitions_total{breaker="default",to="closed"} 1.0' in metrics
    assert (
        f'ollama_sidecar_circuit_rejections_total{{breaker="default"}} {rejected + 2}.0' in metrics
    )
    print(
        f"\ncircuit timings: first refusal {first_rejection * 1000:.1f} ms after the third "
        f"failure; probe admitted {(probe_sent - opened) * 1000:.1f} ms after it "
        f"(open_for {open_for * 1000:.0f} ms, 20 ms polling, {rejected} requests shed); "
        f"closed {closed_after * 1000:.1f} ms after it"
    )


async def test_a_failed_probe_reopens_the_breaker(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        policies=[{"circuit_breaker": {"failure_threshold": 1, "open_for": "100ms"}}]
    )
    fake.inject(Fault("busy"))
    assert (await post(http, sidecar))[0] == 503
    fake.inject(Fault("status", status=500))
    _, status, _ = await shed_until_admitted(http, sidecar, fake)
    assert status == 500
    opened = sidecar.metrics.registry.get_sample_value(
        "ollama_sidecar_circuit_transitions_total", {"breaker": "default", "to": "open"}
    )
    assert opened == 2
    _, status, _ = await shed_until_admitted(http, sidecar, fake)
    assert status == 200
    assert (await breaker_detail(http, sidecar))["state"] == "closed"


async def test_a_stream_that_breaks_mid_way_counts_as_a_failure(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(
        policies=[{"circuit_breaker": {"failure_threshold": 2, "open_for": "30s"}}]
    )
    for path, extra, prefix in (
        ("/v1/chat/completions", {"stream": True}, b"data: "),
        ("/api/chat", {}, b""),
    ):
        fake.inject(Fault("reset_after", after_chunks=2))
        async with http.post(f"{sidecar.url}{path}", json={**CHAT, **extra}) as response:
            assert response.status == 200
            last = (await response.read()).rstrip(b"\n").rsplit(b"\n", 1)[-1]
        assert b"error" in last.removeprefix(prefix)
    detail = await breaker_detail(http, sidecar)
    assert detail["state"] == "open"
    assert detail["last_failure"] == "stream"
    seen = len(fake.requests)
    status, document, _ = await post(http, sidecar, stream=True)
    assert (status, document["error"]["code"]) == (503, "circuit_open")
    assert len(fake.requests) == seen


async def test_a_client_leaving_a_stream_is_not_a_failure(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=[{"circuit_breaker": {"failure_threshold": 2}}])
    fake.inject(Fault("busy"))
    assert (await post(http, sidecar))[0] == 503
    never = asyncio.Event()

    async def hold(index: int) -> None:
        await never.wait()

    fake.between_chunks = hold
    response = await http.post(f"{sidecar.url}/v1/chat/completions", json={**CHAT, "stream": True})
    assert (await response.content.readline()).startswith(b"data: ")
    response.close()
    await asyncio.wait_for(fake.stream_closed_by_peer.wait(), 5)
    fake.between_chunks = None
    detail = await breaker_detail(http, sidecar)
    assert (detail["state"], detail["consecutive_failures"]) == ("closed", 1)


async def test_readyz_and_metrics_show_every_breaker(
    make_sidecar: SidecarFactory, http: aiohttp.ClientSession
) -> None:
    sidecar = await make_sidecar(policies=[{"circuit_breaker": {}}])
    assert (await post(http, sidecar))[0] == 200
    async with http.get(f"{sidecar.url}/readyz") as response:
        assert response.status == 200
        document = orjson.loads(await response.read())
    assert document["policies"]["circuit_breaker"]["breakers"]["default"]["state"] == "closed"
    async with http.get(f"{sidecar.url}/metrics") as response:
        text = await response.text()
    assert 'ollama_sidecar_circuit_state{breaker="default"} 0.0' in text


async def test_with_routing_each_upstream_has_its_own_breaker_and_routing_hands_over(
    make_sidecar: SidecarFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """routing sets facts["upstream"] per attempt; listed before the breaker, it gets a
    breaker per upstream and moves on to the next upstream when one is open."""
    async with FakeOllama() as secondary:
        sidecar = await make_sidecar(
            policies=[
                {
                    "routing": {
                        "upstreams": [
                            {"name": "primary", "url": fake.url, "priority": 0},
                            {"name": "secondary", "url": secondary.url, "priority": 1},
                        ]
                    }
                },
                {"circuit_breaker": {"failure_threshold": 2, "open_for": "30s"}},
            ]
        )
        fake.inject(Fault("busy"))
        fake.inject(Fault("busy"))
        for _ in range(2):
            assert (await post(http, sidecar))[0] == 200  # answered by the secondary
        assert len(fake.requests) == 2
        for _ in range(3):
            assert (await post(http, sidecar))[0] == 200
        assert len(fake.requests) == 2, "the primary's open breaker kept requests away from it"
        assert len(secondary.requests) == 5
        async with http.get(f"{sidecar.url}/readyz") as response:
            breakers = orjson.loads(await response.read())["policies"]["circuit_breaker"]
        states = {name: detail["state"] for name, detail in breakers["breakers"].items()}
        assert states == {"primary": "open", "secondary": "closed"}
