"""A raw asyncio HTTP/1.1 load generator with per-request (and per-stream) timing.

Why not aiohttp's client: it costs as much per request as the proxy under test,
so on a shared core it would measure itself. This client keeps N keep-alive
connections, each sending its next request from inside ``data_received`` the
moment the previous response is complete (no task wake-up in between), and
records for every request:

* latency: request written -> last byte of the response parsed;
* for streams, time to first body bytes (TTFC) and first -> last spread,
  which tell a streaming proxy from a buffering one.

Every response is checked (status 200; for SSE the number of ``data:`` events and
the final ``[DONE]``; for NDJSON the number of lines and a final ``"done":true``),
so a proxy that breaks streams shows up as errors, not as a fast figure.

The generator reports its own CPU time (``getrusage``) so the runner can flag
rounds where it, not the target, was the bottleneck (> ~85 % of a core).

Two ways to use it:

* one shot: ``python bench/loadgen.py --url http://127.0.0.1:8080 --kind sse -c 10 -n 2000``
  prints a summary (``--json`` for machine-readable output);
* as a worker: ``python bench/loadgen.py --stdin`` reads one JSON job per line and
  answers one JSON result per line (the runner does this, so the process and its
  CPU pinning are set up once).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is installed on the bench machines
    uvloop = None  # type: ignore[assignment]

perf_ns = time.perf_counter_ns

# Request bodies of the scenarios (shared with run.py).
CHAT_BODY = {
    "model": "llama3.2:1b",
    "messages": [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Say hello to the benchmark in one short sentence."},
    ],
    "temperature": 0.2,
}
KINDS = ("json", "sse", "ndjson")
# Sent as "Authorization: Bearer <key>" on every request; configs/every-policy.yaml's
# auth policy maps it to tenant "bench" (auth wants keys of 16 characters or more).
BENCH_KEY = "bench-key-0123456789"
DONE_RE = re.compile(rb'"done"\s*:\s*true')

HEAD, BODY_CL, BODY_CHUNKED, BODY_EOF = range(4)


def default_body(kind: str, path: str, inputs: int = 0) -> bytes:
    """The request body a scenario of this kind sends (stream flag set to match).

    Embeddings: one string ``input``, or with ``inputs`` > 0 a list of that many
    (different) sentences, as a RAG ingestion batch sends them.
    """
    if path.endswith("/embeddings") or path.endswith("/embed"):
        if inputs > 0:
            texts = [
                f"chunk {i} of the document to embed, about a dozen words" for i in range(inputs)
            ]
            return orjson.dumps({"model": "llama3.2:1b", "input": texts})
        return orjson.dumps({"model": "llama3.2:1b", "input": "embed this sentence"})
    body: dict[str, Any] = dict(CHAT_BODY)
    if kind == "sse":
        body["stream"] = True
    elif kind == "json":
        body["stream"] = False
    # ndjson: Ollama's /api/chat streams by default; leave the flag out like most clients.
    return orjson.dumps(body)


@dataclass
class Job:
    """One measurement: what to send, how many, how hard, and what a good answer is."""

    host: str
    port: int
    path: str
    kind: str = "json"
    method: str = "POST"
    body: bytes = b""
    connections: int = 10
    requests: int = 1000
    duration_s: float = 0.0  # 0 = no bound: stop after `requests`
    timeout_s: float = 60.0  # hard stop: the target stalled
    expect_events: int = 0  # SSE data events incl. [DONE] / NDJSON lines; 0 = don't check
    headers: list[str] = field(default_factory=list)  # extra "Name: value" lines
    min_latency_ms: float = 0.0  # a faster answer means pacing was lost on the way
    notify_first: bool = False  # worker: print {"event": "all_first"} once every request has begun

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Job:
        d = dict(d)
        if "url" in d:
            u = urlsplit(d.pop("url"))
            d["host"], d["port"] = u.hostname or "127.0.0.1", u.port or 80
        if isinstance(d.get("body"), str):
            d["body"] = d["body"].encode()
        return cls(**d)

    def request_bytes(self) -> bytes:
        """The exact bytes sent for every request (built once)."""
        head = (
            f"{self.method} {self.path} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            "User-Agent: ollama-sidecar-bench/1\r\n"
            "Accept: application/json\r\n"
            f"Authorization: Bearer {BENCH_KEY}\r\n"
        )
        head += "".join(h + "\r\n" for h in self.headers)
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            head += f"Content-Type: application/json\r\nContent-Length: {len(self.body)}\r\n"
        return head.encode() + b"\r\n" + self.body


@dataclass
class Run:
    """Shared state of one job across its connections."""

    job: Job
    loop: asyncio.AbstractEventLoop
    req: bytes
    deadline_ns: int
    done: asyncio.Future[None]
    issued: int = 0
    active: int = 0
    ok: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    lat_us: list[int] = field(default_factory=list)
    ttfc_us: list[int] = field(default_factory=list)
    spread_us: list[int] = field(default_factory=list)
    body_bytes: int = 0
    reconnects: int = 0
    conns: set[Conn] = field(default_factory=set)
    client_closes: bool = False  # the job sends "Connection: close": one request per connection
    first_seen: int = 0  # requests whose first body bytes arrived
    on_all_first: Any = None  # called once when first_seen reaches job.requests

    def first_bytes(self) -> None:
        self.first_seen += 1
        if self.first_seen == self.job.requests and self.on_all_first is not None:
            self.on_all_first()

    def take(self) -> bool:
        """Claim the next request slot, or say the job is over."""
        if self.issued >= self.job.requests:
            return False
        if self.deadline_ns and perf_ns() > self.deadline_ns:
            return False
        self.issued += 1
        return True

    def error(self, msg: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(msg[:300])

    def conn_finished(self) -> None:
        self.active -= 1
        if self.active <= 0 and not self.done.done():
            self.done.set_result(None)

    def open_conn(self, first_request: bool) -> None:
        """Open one more connection; it sends a request as soon as it is up."""
        self.active += 1
        self.loop.create_task(self._open(first_request))

    async def _open(self, first_request: bool) -> None:
        try:
            await self.loop.create_connection(
                lambda: Conn(self, first_request), self.job.host, self.job.port
            )
        except OSError as exc:
            if first_request:
                self.error(f"connect: {exc!r}")
            self.conn_finished()


class Conn(asyncio.Protocol):
    """One keep-alive connection; the next request is sent from the parser."""

    def __init__(self, run: Run, pending: bool) -> None:
        self.run = run
        self.pending = pending  # a slot was taken for us before we were connected
        self.transport: Any = None
        self.buf = bytearray()
        self.body = bytearray()
        self.state = HEAD
        self.t0 = 0
        self.t_first = 0
        self.status = 0
        self.remaining = 0
        self.close_after = False
        self.finished = False

    # -- asyncio callbacks -------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.run.conns.add(self)
        if self.pending or self.run.take():
            self.pending = False
            self.send()
        else:
            self._stop()

    def connection_lost(self, exc: Exception | None) -> None:
        self.run.conns.discard(self)
        if self.finished:
            return
        if self.t0:
            if self.state == BODY_EOF:
                self._complete(perf_ns(), bytes(self.buf))
                if self.finished:
                    return
            else:
                where = (
                    "before any response byte"
                    if self.state == HEAD and not self.buf
                    else ("mid-response")
                )
                self.run.error(f"connection closed {where}: {exc!r}")
                self.t0 = 0
        self.finished = True
        run = self.run
        # Replace the connection if work is left; each replacement owns one slot.
        if run.take():
            run.reconnects += 1
            run.open_conn(first_request=True)
        run.conn_finished()

    def data_received(self, data: bytes) -> None:
        now = perf_ns()
        if not self.t0:
            self.run.error(f"unsolicited data: {data[:80]!r}")
            return
        buf = self.buf
        buf += data
        if self.state == HEAD:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                self.status = int(buf[9:12])
            except ValueError:
                self.run.error(f"bad status line: {bytes(buf[:40])!r}")
                self.transport.abort()
                return
            head = bytes(buf[:end]).lower()
            del buf[: end + 4]
            if 100 <= self.status < 200:
                self.data_received(b"")  # interim answer: parse what follows
                return
            self.close_after = self.run.client_closes or b"\r\nconnection: close" in head
            if b"\r\ntransfer-encoding:" in head and b"chunked" in head:
                self.state = BODY_CHUNKED
                self.remaining = -1  # waiting for a chunk-size line
            else:
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    self.remaining = int(head[i + 17 : j if j >= 0 else None])
                    self.state = BODY_CL
                elif self.status in (204, 304):
                    self.remaining = 0
                    self.state = BODY_CL
                else:
                    self.state = BODY_EOF
        if buf and not self.t_first:
            self.t_first = now
            if self.run.on_all_first is not None:
                self.run.first_bytes()
        if self.state == BODY_CL:
            if len(buf) >= self.remaining:
                body = bytes(buf[: self.remaining])
                del buf[: self.remaining]
                self._complete(now, body)
        elif self.state == BODY_CHUNKED:
            self._chunked(now)

    # -- parsing -------------------------------------------------------------
    def _chunked(self, now: int) -> None:
        buf = self.buf
        pos = 0
        while True:
            if self.remaining == -1:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
                except ValueError:
                    self.run.error(f"bad chunk size line: {bytes(buf[pos : eol + 2])!r}")
                    self.transport.abort()
                    return
                if size == 0:
                    # No trailers expected: the terminator is "0\r\n\r\n".
                    if len(buf) < eol + 4:
                        break
                    del buf[: eol + 4]
                    body = bytes(self.body)
                    self.body.clear()
                    self._complete(now, body)
                    return
                self.remaining = size
                pos = eol + 2
            if len(buf) < pos + self.remaining + 2:
                break
            self.body += buf[pos : pos + self.remaining]
            pos += self.remaining + 2
            self.remaining = -1
        if pos:
            del buf[:pos]

    def _complete(self, now: int, body: bytes) -> None:
        """One response done: check it, record it, send the next request."""
        run = self.run
        t0, t_first = self.t0, self.t_first or now
        self.t0 = self.t_first = 0
        self.state = HEAD
        run.body_bytes += len(body)
        problem = self._check(body)
        if problem is None and (now - t0) / 1e6 < run.job.min_latency_ms:
            problem = (
                f"answered in {(now - t0) / 1e6:.2f} ms < {run.job.min_latency_ms} ms: "
                "the pacing header did not reach the upstream"
            )
        if problem is None:
            run.ok += 1
            run.lat_us.append((now - t0) // 1000)
            if run.job.kind != "json":
                run.ttfc_us.append((t_first - t0) // 1000)
                run.spread_us.append((now - t_first) // 1000)
        else:
            run.error(problem)
        if self.buf:
            run.error(f"{len(self.buf)} unexpected bytes after a response")
            self.buf.clear()
        if self.close_after:
            self.transport.close()  # connection_lost reopens if work is left
            return
        if run.take():
            self.send()
        else:
            self._stop()

    def _check(self, body: bytes) -> str | None:
        """Return why a response is wrong, or None if it is what the upstream sends."""
        if self.status != 200:
            return f"status {self.status}: {body[:200]!r}"
        job = self.run.job
        if job.kind == "json":
            return None if body else "empty body"
        if job.kind == "sse":
            n = body.count(b"data:")
            if job.expect_events and n != job.expect_events:
                return f"sse: {n} data events, expected {job.expect_events}"
            if not body.rstrip().endswith(b"[DONE]"):
                return f"sse: no final [DONE]: ...{body[-120:]!r}"
            return None
        lines = [ln for ln in body.split(b"\n") if ln.strip()]
        if job.expect_events and len(lines) != job.expect_events:
            return f"ndjson: {len(lines)} lines, expected {job.expect_events}"
        if not lines or not DONE_RE.search(lines[-1]):
            return f'ndjson: last line lacks "done":true: {body[-160:]!r}'
        return None

    def send(self) -> None:
        self.t0 = perf_ns()
        self.transport.write(self.run.req)

    def _stop(self) -> None:
        self.finished = True
        self.transport.close()
        self.run.conn_finished()


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run_job(job: Job) -> dict[str, Any]:
    """Run one job to completion (or its timeout) and return raw figures.

    With ``job.notify_first`` an ``{"event": "all_first"}`` line goes to stdout as
    soon as every request has its first body bytes (the runner's open_streams
    waits for it, samples the target's memory, then releases the streams).
    """
    loop = asyncio.get_running_loop()
    run = Run(
        job=job,
        loop=loop,
        req=job.request_bytes(),
        deadline_ns=perf_ns() + int(job.duration_s * 1e9) if job.duration_s > 0 else 0,
        done=loop.create_future(),
        client_closes=any(h.lower().replace(" ", "") == "connection:close" for h in job.headers),
    )
    if job.notify_first:
        run.on_all_first = _notify_all_first
    cpu0, t0 = _cpu_s(), perf_ns()
    n_conn = max(1, min(job.connections, job.requests))
    for _ in range(n_conn):
        if run.take():
            run.open_conn(first_request=True)
    timed_out = False
    stalled = 0
    try:
        await asyncio.wait_for(asyncio.shield(run.done), job.timeout_s)
    except TimeoutError:
        timed_out = True
        run.issued = sys.maxsize  # connections still being opened must not send anything
        stalled = sum(1 for c in run.conns if c.t0)
        for c in list(run.conns):
            c.finished = True
            if c.transport is not None:
                c.transport.abort()
    wall = (perf_ns() - t0) / 1e9
    cpu = _cpu_s() - cpu0
    await asyncio.sleep(0)  # let aborted transports call connection_lost
    return {
        "ok": run.ok,
        "errors": run.errors,
        "error_samples": run.error_samples,
        "timed_out": timed_out,
        "stalled": stalled,
        "reconnects": run.reconnects,
        "wall_s": wall,
        "cpu_s": cpu,
        "cpu_util": cpu / wall if wall > 0 else 0.0,
        "body_bytes": run.body_bytes,
        "lat_us": run.lat_us,
        "ttfc_us": run.ttfc_us,
        "spread_us": run.spread_us,
        "first_seen": run.first_seen,
    }


def _notify_all_first() -> None:
    sys.stdout.buffer.write(b'{"event":"all_first"}\n')
    sys.stdout.flush()


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[k])


def summarize_us(values: list[int]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds of a list of microsecond figures."""
    s = sorted(values)
    if not s:
        return {}
    return {
        "p50_ms": percentile(s, 50) / 1000,
        "p90_ms": percentile(s, 90) / 1000,
        "p99_ms": percentile(s, 99) / 1000,
        "max_ms": s[-1] / 1000,
        "mean_ms": sum(s) / len(s) / 1000,
    }


def pin(cpu: int | None) -> None:
    """Pin this process to one core (the runner puts us beside the fake upstream)."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def new_loop() -> asyncio.AbstractEventLoop:
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


def worker() -> None:
    """Serve jobs from stdin, one JSON object per line; one JSON result per line."""
    loop = new_loop()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            res = loop.run_until_complete(run_job(Job.from_dict(orjson.loads(line))))
        except Exception as exc:  # report, don't die: the runner reads a line per job
            res = {"fatal": repr(exc)}
        sys.stdout.buffer.write(orjson.dumps(res) + b"\n")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stdin", action="store_true", help="worker mode: JSON jobs on stdin")
    p.add_argument("--cpu", type=int, default=None, help="pin to this core")
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--kind", choices=KINDS, default="json")
    p.add_argument("--path", default=None, help="default: by kind")
    p.add_argument("--method", default="POST")
    p.add_argument("-c", "--connections", type=int, default=10)
    p.add_argument("-n", "--requests", type=int, default=2000)
    p.add_argument("-d", "--duration", type=float, default=0.0, help="seconds bound (0 = none)")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--expect-events", type=int, default=0)
    p.add_argument("-H", "--header", action="append", default=[], help='extra "Name: value"')
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    a = p.parse_args(argv)
    pin(a.cpu)
    if a.stdin:
        worker()
        return
    path = a.path or {"json": "/v1/chat/completions", "sse": "/v1/chat/completions"}.get(
        a.kind, "/api/chat"
    )
    u = urlsplit(a.url)
    job = Job(
        host=u.hostname or "127.0.0.1",
        port=u.port or 80,
        path=path,
        kind=a.kind,
        method=a.method.upper(),
        body=default_body(a.kind, path) if a.method.upper() == "POST" else b"",
        connections=a.connections,
        requests=a.requests,
        duration_s=a.duration,
        timeout_s=a.timeout,
        expect_events=a.expect_events,
        headers=a.header,
    )
    loop = new_loop()
    res = loop.run_until_complete(run_job(job))
    if a.json:
        sys.stdout.buffer.write(orjson.dumps(res) + b"\n")
        return
    lat = summarize_us(res["lat_us"])
    print(
        f"{res['ok']} ok, {res['errors']} errors in {res['wall_s']:.2f} s = "
        f"{res['ok'] / res['wall_s']:.0f} req/s; loadgen CPU {res['cpu_util'] * 100:.0f} %"
    )
    if lat:
        print("latency ms: " + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in lat.items()))
    for name in ("ttfc_us", "spread_us"):
        if res[name]:
            s = summarize_us(res[name])
            print(f"{name[:-3]} ms: " + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in s.items()))
    for e in res["error_samples"]:
        print("error:", e)
    if res["timed_out"]:
        print(f"TIMED OUT with {res['stalled']} requests in flight")


if __name__ == "__main__":
    main()
