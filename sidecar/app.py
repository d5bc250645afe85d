"""The sidecar server: routes, the per-request path, health, metrics and lifecycle.

It runs on aiohttp's low-level `web.Server`: the sidecar matches its own small
route table (with path normalisation no router does for it), so the
Application's router and middleware machinery would be cost without use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Coroutine
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from sidecar.config import Settings
from sidecar.deadlines import DeadlineWatch
from sidecar.errors import SidecarError, StreamInterrupted, dialect_for_path, error_response
from sidecar.exchange import Exchange
from sidecar.ledger import usage_report
from sidecar.observability import Metrics, write_access_line
from sidecar.relay import relay
from sidecar.routes import check_access, find_route
from sidecar.runtime import Runtime, build_runtime, close_runtime
from sidecar.stores import StoreUnavailable
from sidecar.upstream import Upstream

log = structlog.get_logger("sidecar")

_METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Sidecar:
    """One sidecar server: start it, point clients at `url`, stop it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.metrics.in_flight.set_function(lambda: self._in_flight)
        self.deadlines = DeadlineWatch()
        self.runtime: Runtime | None = None
        self.generation = 0
        self.draining = False
        self._retired: set[Runtime] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._reload_lock: asyncio.Lock | None = None
        self._reloads = self.metrics.counter(
            "config_reloads_total",
            "Config reloads, by result: applied, rejected, unchanged.",
            ("result",),
        )
        self._generation_gauge = self.metrics.gauge(
            "config_generation", "How many configs this process has applied (1 = the first).", ()
        )
        self.port = 0
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._runner: web.ServerRunner | None = None
        self._ready: tuple[float, bool, dict[str, Any]] = (-1e9, False, {})
        self._ready_lock: asyncio.Lock | None = None
        self._internal = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
            "/sidecar/usage": self._usage,
        }

    @property
    def url(self) -> str:
        host = self.settings.listen.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def upstream(self) -> Upstream:
        """The upstream client new requests use."""
        assert self.runtime is not None, "start() first"
        return self.runtime.upstream

    async def start(self) -> None:
        """Open the upstream pool, build the chain and start listening."""
        self._idle = asyncio.Event()
        self._idle.set()
        self._ready_lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self.runtime = await build_runtime(self.settings, self.metrics, self.deadlines)
        self.generation = 1
        self._generation_gauge.set(1)
        limits = self.settings.limits
        server = web.Server(
            self.handle,
            request_factory=self._make_request,
            # Cancel the handler as soon as the client goes away, even while it
            # waits for a slow upstream, so the upstream request is dropped too.
            handler_cancellation=True,
            access_log=None,
            max_line_size=limits.max_header_size,
            max_field_size=limits.max_header_size,
        )
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(
            self._runner,
            self.settings.listen.host,
            self.settings.listen.port,
            reuse_address=True,
            backlog=1024,
        )
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        log.info(
            "listening",
            url=self.url,
            upstream=self.upstream.base_url,
            config=self.settings.summary(),
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report not-ready, let open requests finish within `grace`, then close."""
        self.draining = True
        grace = self.settings.shutdown.grace if grace is None else grace
        if self._idle is not None and not self._idle.is_set():
            log.info("draining", in_flight=self._in_flight, grace_s=grace)
            try:
                await asyncio.wait_for(self._idle.wait(), grace)
            except TimeoutError:
                log.warning("drain_timeout", in_flight=self._in_flight)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for retired in list(self._retired):
            await close_runtime(retired, self.runtime)
        self._retired.clear()
        if self.runtime is not None:
            await close_runtime(self.runtime)
        self.deadlines.close()
        log.info("stopped")

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background, holding the task so it is not collected mid-way."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def apply(self, settings: Settings) -> bool:
        """Swap in a new config for new requests; in-flight ones finish on the old one.

        Returns False (and changes nothing) when the new config cannot be built.
        The listen address cannot change without a restart: a new one is
        reported and ignored.
        """
        assert self._reload_lock is not None and self.runtime is not None, "start() first"
        async with self._reload_lock:
            old = self.runtime
            if settings.listen != old.settings.listen:
                log.warning(
                    "reload_listen_ignored",
                    reason="the listen address changes only on restart",
                    running=f"{old.settings.listen.host}:{old.settings.listen.port}",
                )
                settings = dataclasses.replace(settings, listen=old.settings.listen)
            try:
                new = await build_runtime(settings, self.metrics, self.deadlines, previous=old)
            except Exception as exc:
                self._reloads.labels("rejected").inc()
                log.error("reload_failed", error=str(exc) or exc.__class__.__name__)
                return False
            self.runtime = new
            self.settings = settings
            self.generation += 1
            self._generation_gauge.set(self.generation)
            self._reloads.labels("applied").inc()
            log.info("reloaded", generation=self.generation, config=settings.summary())
            old.retired = True
            self._retired.add(old)
            if old.active == 0:
                await self._close_retired(old)
            return True

    async def _close_retired(self, runtime: Runtime) -> None:
        self._retired.discard(runtime)
        await close_runtime(runtime, self.runtime)

    def reject_reload(self, problems: list[str]) -> None:
        """Record a config that did not validate; the running one stays."""
        self._reloads.labels("rejected").inc()
        log.error("reload_rejected", problems=problems)

    def _make_request(
        self,
        message: RawRequestMessage,
        payload: StreamReader,
        protocol: RequestHandler,
        writer: AbstractStreamWriter,
        task: asyncio.Task[None],
    ) -> web.BaseRequest:
        return web.BaseRequest(
            message,
            payload,
            protocol,
            writer,
            task,
            asyncio.get_running_loop(),
            client_max_size=self.settings.limits.max_body,
        )

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # The raw path, not `request.path`: that builds a URL object per request.
        raw_path, _, query_string = request.raw_path.partition("?")
        internal = self._internal.get(raw_path)
        if internal is not None and request.method in ("GET", "HEAD"):
            return await internal(request)
        if raw_path == "/sidecar/cache" and request.method == "DELETE":
            return await self._purge(request)
        return await self._proxy(request, raw_path, query_string)

    async def _purge(self, request: web.BaseRequest) -> web.StreamResponse:
        """DELETE /sidecar/cache[?model=m]: every policy that keeps answers drops them."""
        assert self.runtime is not None
        model = request.query.get("model") or None
        purged: dict[str, Any] = {}
        for name, policy in self.runtime.policies:
            purge = getattr(policy, "purge", None)
            if purge is not None:
                try:
                    purged[name] = await purge(model)
                except StoreUnavailable as exc:
                    return error_response(
                        SidecarError(503, str(exc), code="store_unavailable"), "openai"
                    )
        return _json_response(200, {"purged": purged, "model": model})

    async def _proxy(
        self, request: web.BaseRequest, raw_path: str, query_string: str
    ) -> web.StreamResponse:
        runtime = self.runtime
        assert runtime is not None and self._idle is not None
        runtime.active += 1
        started = time.perf_counter()
        loop_started = asyncio.get_running_loop().time()
        dialect = dialect_for_path(raw_path)
        route_name = "unmatched"
        status = 0
        exchange: Exchange | None = None
        self._in_flight += 1
        self._idle.clear()
        try:
            match = find_route(raw_path)
            route_name = match.route.name
            check_access(match, request.method, runtime.allowed_management)
            body = await self._read_body(request)
            exchange = Exchange(
                method=request.method,
                route=match.route,
                path=match.upstream_path,
                query_string=query_string,
                headers=request.headers,
                body=body,
                started_at=loop_started,
            )
            reply = await runtime.chain(exchange)
            response = await relay(request, reply, exchange, self.draining)
            status = 499 if exchange.facts.get("client_gone") else response.status
            if self.draining:
                response.force_close()  # draining began while the answer went out
            return response
        except SidecarError as error:
            status = error.status
            response = error_response(error, dialect)
            if exchange is not None and exchange.response_headers:
                response.headers.update(exchange.response_headers)
            if status in (408, 413) or self.draining:
                response.force_close()
            return response
        except StreamInterrupted as broken:
            # A stream that broke before its first chunk reached the relay (a
            # policy peeked at it): nothing was sent, so a plain 502 still can be.
            status = 502
            return error_response(SidecarError(502, broken.message, code=broken.code), dialect)
        except asyncio.CancelledError:
            status = 499
            raise
        except Exception:
            status = 500
            log.exception("internal_error", route=route_name)
            return error_response(
                SidecarError(
                    500,
                    "internal error in the sidecar; its log has the details",
                    code="internal_error",
                ),
                dialect,
            )
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            runtime.active -= 1
            if runtime.retired and runtime.active == 0:
                self._spawn(self._close_retired(runtime))
            self._account(request, route_name, status, started, exchange)

    async def _read_body(self, request: web.BaseRequest) -> bytes:
        limits = self.settings.limits
        max_body = limits.max_body
        length = request.content_length
        if length is not None and length > max_body:
            raise _too_large(max_body)
        if not request.body_exists:
            return b""
        try:
            content = request.content
            if content.is_eof():
                # The whole body came with the headers (the common case): no wait to
                # guard, and when its length was announced (and checked above) it is
                # taken from the buffer as it is, without read()'s copy.
                if length is not None:
                    return content.read_nowait(-1)
                return await request.read()
            # A client that announces a body and stalls must not hold a handler forever.
            with self.deadlines.deadline(asyncio.get_running_loop().time() + limits.body_timeout):
                return await request.read()
        except TimeoutError:
            raise SidecarError(
                408,
                f"the request body did not arrive within limits.body_timeout ({limits.body_timeout:g}s)",
                code="request_timeout",
            ) from None
        except web.HTTPRequestEntityTooLarge:
            raise _too_large(max_body) from None
        except RequestPayloadError as exc:
            raise SidecarError(400, f"malformed request body: {exc}", code="invalid_body") from None

    def _account(
        self,
        request: web.BaseRequest,
        route_name: str,
        status: int,
        started: float,
        exchange: Exchange | None,
    ) -> None:
        """Metrics and the access line for one proxied request."""
        duration = time.perf_counter() - started
        metrics = self.metrics
        route_metrics = metrics.for_route(route_name)
        route_metrics.count(request.method, status)
        route_metrics.duration.observe(duration)
        facts = exchange.facts if exchange is not None else {}
        upstream_time = facts.get("upstream_time")
        if upstream_time is not None:
            route_metrics.overhead.observe(max(duration - upstream_time, 0.0))
        stream_error = facts.get("stream_error")
        if stream_error is not None:
            metrics.stream_interruptions.labels(route_name, stream_error).inc()
        if not self.settings.logging.access_log:
            return
        model = stream = None
        if exchange is not None and exchange._json_parsed:
            model = exchange.model
            stream = exchange.wants_stream
        ttfb = facts.get("upstream_ttfb")
        usage = facts.get("usage") or {}
        write_access_line(
            {
                "request_id": exchange.request_id if exchange is not None else None,
                "tenant": facts.get("tenant"),
                "method": request.method,
                "route": route_name,
                "model": model,
                "status": status,
                "stream": stream,
                "duration_ms": round(duration * 1000, 3),
                "upstream_ttfb_ms": round(ttfb * 1000, 3) if ttfb is not None else None,
                "bytes_in": len(exchange.body) if exchange is not None else 0,
                "bytes_out": facts.get("bytes_out", 0),
                "stream_error": stream_error,
                "prompt_tokens": usage.get("prompt_tokens"),
                "completion_tokens": usage.get("completion_tokens"),
                "tokens_estimated": usage.get("estimated"),
            }
        )

    async def _healthz(self, request: web.BaseRequest) -> web.StreamResponse:
        return _json_response(200, {"status": "ok"})

    async def _readyz(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.draining:
            return _json_response(503, {"status": "draining"})
        ready, detail = await self._check_upstream()
        policies = self._policy_detail()
        if policies:
            detail = {**detail, "policies": policies}
        return _json_response(
            200 if ready else 503, {"status": "ready" if ready else "not ready", **detail}
        )

    async def _usage(self, request: web.BaseRequest) -> web.StreamResponse:
        """Usage per tenant and model this month (or `?period=2026-10`), `?tenant=` for one."""
        assert self.runtime is not None
        tenant = request.query.get("tenant") or None
        period = request.query.get("period") or None
        if period is not None and not _PERIOD.fullmatch(period):
            error = SidecarError(400, "period is a month: YYYY-MM", code="invalid_period")
            return error_response(error, "openai")
        try:
            report = await usage_report_with_budgets(self.runtime, tenant, period)
        except StoreUnavailable as exc:
            return error_response(SidecarError(503, str(exc), code="store_unavailable"), "openai")
        return _json_response(200, report)

    def _policy_detail(self) -> dict[str, Any]:
        """What policies report of themselves (a breaker's state, say), by name."""
        detail: dict[str, Any] = {}
        for name, policy in self.runtime.policies if self.runtime else ():
            readiness = getattr(policy, "readiness", None)
            if readiness is not None:
                detail[name] = readiness()
        return detail

    async def _check_upstream(self) -> tuple[bool, dict[str, Any]]:
        """Ask the upstream, at most once per `readiness.cache_for`, however many probes come."""
        assert self._ready_lock is not None
        settings = self.settings.readiness
        async with self._ready_lock:
            now = time.monotonic()
            checked_at, ready, detail = self._ready
            if now - checked_at < settings.cache_for:
                return ready, detail
            upstream: dict[str, Any] = {"url": self.upstream.base_url}
            try:
                upstream["version"] = await self.upstream.probe(settings.timeout)
                upstream["reachable"] = ready = True
            except (TimeoutError, aiohttp.ClientError, SidecarError, OSError) as exc:
                upstream["reachable"] = ready = False
                upstream["error"] = str(exc) or exc.__class__.__name__
            detail = {"upstream": upstream}
            self._ready = (time.monotonic(), ready, detail)
            return ready, detail

    async def _metrics(self, request: web.BaseRequest) -> web.StreamResponse:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": _METRICS_CONTENT_TYPE}
        )


_PERIOD = re.compile(r"\d{4}-\d{2}")


async def usage_report_with_budgets(
    runtime: Runtime, tenant: str | None, period: str | None
) -> dict[str, Any]:
    """The ledger's totals, with what budget-keeping policies add (the budget left)."""
    report = await usage_report(runtime.store, tenant, period)
    for name, policy in runtime.policies:
        detail = getattr(policy, "usage_detail", None)
        if detail is not None:
            report.setdefault("budgets", {})[name] = await detail(tenant)
    return report


def _too_large(max_body: int) -> SidecarError:
    return SidecarError(
        413,
        f"request body is larger than limits.max_body ({max_body} bytes)",
        code="body_too_large",
    )


def _json_response(status: int, document: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(document), content_type="application/json")
