"""A fake Ollama upstream that costs far less than the proxy under test.

Why not aiohttp: an aiohttp fake costs about as much per request as the proxy
being measured, so it would share the load generator's core with a second
"proxy" and hide the differences we want to see. This server is a plain
``asyncio.Protocol`` that parses just enough HTTP/1.1 (request line,
Content-Length, chunked request bodies, pipelining, partial reads) and answers
with response bytes built once at start-up (~10 us of CPU per request).

Routes:

* ``POST /v1/chat/completions``: OpenAI chat JSON, or with ``"stream": true`` an
  SSE stream of N ``data: {...}`` events plus ``data: [DONE]``, each event a
  separate write and a separate HTTP chunk.
* ``POST /api/chat``: Ollama NDJSON stream of N lines, the last with
  ``"done":true`` (a single JSON object when the body has ``"stream": false``).
* ``POST /v1/embeddings`` and ``POST /api/embed``: embeddings JSON, one vector
  per input (a list ``input`` is parsed to count it; a string is not parsed).
* ``POST /bench/release``: every stream held by ``X-Bench-Hold`` gets the rest of
  its events now; ``GET /bench/held``: how many streams are held (JSON).

Request headers the benchmark sends to shape an answer (a proxy passes them on):

* ``X-Bench-Chunk-Delay-Ms: D``: pause D ms between stream events (paced streams);
* ``X-Bench-Chunks: N``: N events in this stream instead of ``--chunks``;
* ``X-Bench-Hold: 1``: send the head and the first event, then hold the stream
  until ``POST /bench/release`` (or ``--hold-max-s``): open streams that cost
  the proxy memory but no CPU.
* ``GET /api/version``, ``GET /api/tags``, ``GET /v1/models``, ``GET /``: small
  JSON or text, so a sidecar that probes its upstream finds what it expects.

Run: ``python bench/fast_upstream.py --port 11434 [--chunks 20] [--chunk-delay-ms 0]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import sys

import orjson

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is installed on the bench machines
    uvloop = None  # type: ignore[assignment]

MODEL = "llama3.2:1b"
CREATED = 1_764_000_000
CREATED_AT = "2026-11-25T08:00:00.000000Z"
STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
NO_STREAM_RE = re.compile(rb'"stream"\s*:\s*false')
INCLUDE_USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')
LIST_INPUT_RE = re.compile(rb'"input"\s*:\s*\[')
MAX_HEAD = 64 * 1024


def _response(status: str, content_type: str, body: bytes, extra: tuple[str, ...] = ()) -> bytes:
    """Build a complete Content-Length response once, so serving it is one write."""
    lines = [
        f"HTTP/1.1 {status}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def _stream_head(content_type: str) -> bytes:
    """Headers of a chunked streaming response (the body follows as chunk frames)."""
    return (
        "HTTP/1.1 200 OK\r\n"
        f"Content-Type: {content_type}\r\n"
        "Cache-Control: no-cache\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk frame holding ``payload``."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _dumps(obj: object) -> bytes:
    return orjson.dumps(obj)


def build_responses(chunks: int) -> dict[str, object]:
    """Pre-build every response so the hot path never serialises anything."""
    words = [f"tok{i} " for i in range(chunks)]
    chat = {
        "id": "chatcmpl-bench0001",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_ollama",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello! This is a fixed answer from the benchmark upstream, "
                    "sized like a short real reply.",
                },
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 26, "completion_tokens": 21, "total_tokens": 47},
    }
    sse_frames: list[bytes] = []
    for i, w in enumerate(words):
        last = i == chunks - 1
        event = {
            "id": "chatcmpl-bench0001",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": MODEL,
            "system_fingerprint": "fp_ollama",
            "choices": [
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": w},
                    "finish_reason": "stop" if last else None,
                }
            ],
        }
        sse_frames.append(_chunk(b"data: " + _dumps(event) + b"\n\n"))
    # With stream_options.include_usage (as Ollama does): one usage-only event before [DONE].
    usage_event = {
        "id": "chatcmpl-bench0001",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_ollama",
        "choices": [],
        "usage": {"prompt_tokens": 26, "completion_tokens": chunks, "total_tokens": 26 + chunks},
    }
    # Ollama writes the usage event right after the last content event, in the same
    # step (no pause between them), so a paced stream is not one event longer with it.
    sse_usage_frames = [
        *sse_frames[:-1],
        sse_frames[-1] + _chunk(b"data: " + _dumps(usage_event) + b"\n\n"),
    ]
    sse_frames.append(_chunk(b"data: [DONE]\n\n"))
    sse_frames.append(b"0\r\n\r\n")
    sse_usage_frames.append(_chunk(b"data: [DONE]\n\n"))
    sse_usage_frames.append(b"0\r\n\r\n")

    nd_frames: list[bytes] = []
    for i, w in enumerate(words):
        line: dict[str, object] = {
            "model": MODEL,
            "created_at": CREATED_AT,
            "message": {"role": "assistant", "content": w if i < chunks - 1 else ""},
            "done": i == chunks - 1,
        }
        if i == chunks - 1:
            line.update(
                done_reason="stop",
                total_duration=123_456_789,
                load_duration=1_234_567,
                prompt_eval_count=26,
                prompt_eval_duration=2_345_678,
                eval_count=chunks,
                eval_duration=98_765_432,
            )
        nd_frames.append(_chunk(_dumps(line) + b"\n"))
    nd_frames.append(b"0\r\n\r\n")
    ollama_chat = {
        "model": MODEL,
        "created_at": CREATED_AT,
        "message": {"role": "assistant", "content": "".join(words)},
        "done": True,
        "done_reason": "stop",
        "eval_count": chunks,
    }
    vector = [round((i % 17) / 17 - 0.5, 6) for i in range(64)]
    embeddings = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vector}],
        "model": MODEL,
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }
    ollama_embed = {"model": MODEL, "embeddings": [vector], "prompt_eval_count": 5}
    tags = {"models": [{"name": MODEL, "model": MODEL, "size": 1_300_000_000}]}
    models = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "ollama"}]}
    js = "application/json; charset=utf-8"
    return {
        "chat": _response("200 OK", js, _dumps(chat)),
        "sse_head": _stream_head("text/event-stream"),
        "sse": sse_frames,
        "sse_usage": sse_usage_frames,
        "nd_head": _stream_head("application/x-ndjson"),
        "nd": nd_frames,
        "ollama_chat": _response("200 OK", js, _dumps(ollama_chat)),
        "embeddings": _response("200 OK", js, _dumps(embeddings)),
        "ollama_embed": _response("200 OK", js, _dumps(ollama_embed)),
        "version": _response("200 OK", js, b'{"version":"0.12.0"}'),
        "tags": _response("200 OK", js, _dumps(tags)),
        "models": _response("200 OK", js, _dumps(models)),
        "root": _response("200 OK", "text/plain; charset=utf-8", b"Ollama is running"),
        "404": _response("404 Not Found", js, b'{"error":"not found"}'),
        "400": _response("400 Bad Request", js, b'{"error":"bad request"}', ("Connection: close",)),
    }


def embeddings_for(n: int, native: bool) -> bytes:
    """An embeddings answer with ``n`` vectors (built once per n and shape)."""
    key = (n, native)
    cached = _EMBED_CACHE.get(key)
    if cached is None:
        vector = [round((i % 17) / 17 - 0.5, 6) for i in range(64)]
        body: dict[str, object]
        if native:
            body = {"model": MODEL, "embeddings": [vector] * n, "prompt_eval_count": 5 * n}
        else:
            body = {
                "object": "list",
                "data": [
                    {"object": "embedding", "index": i, "embedding": vector} for i in range(n)
                ],
                "model": MODEL,
                "usage": {"prompt_tokens": 5 * n, "total_tokens": 5 * n},
            }
        cached = _EMBED_CACHE[key] = _response(
            "200 OK", "application/json; charset=utf-8", _dumps(body)
        )
    return cached


_EMBED_CACHE: dict[tuple[int, bool], bytes] = {}


def _list_inputs(body: bytes) -> int:
    """How many inputs a body with a list ``input`` carries (0: not a list, or bad JSON)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return 0
    inp = data.get("input") if isinstance(data, dict) else None
    return len(inp) if isinstance(inp, list) and inp else 0


def _header_value(head: bytes, name: bytes) -> bytes | None:
    """The value of header ``name`` (lower case, with its leading CRLF) in a lower-cased head."""
    i = head.find(name)
    if i < 0:
        return None
    j = head.find(b"\r\n", i + 2)
    return head[i + len(name) : j if j >= 0 else None].strip()


class Shared:
    """What every connection of one server shares: responses by event count, held streams."""

    def __init__(self, chunks: int, delay_s: float, hold_max_s: float) -> None:
        self.chunks = chunks
        self.delay = delay_s
        self.hold_max_s = hold_max_s
        self.by_chunks: dict[int, dict[str, object]] = {chunks: build_responses(chunks)}
        self.held: set[UpstreamProtocol] = set()

    def responses(self, chunks: int) -> dict[str, object]:
        r = self.by_chunks.get(chunks)
        if r is None:
            r = self.by_chunks[chunks] = build_responses(chunks)
        return r

    def release(self) -> int:
        held = list(self.held)
        self.held.clear()
        for proto in held:
            proto.release()
        return len(held)


class UpstreamProtocol(asyncio.Protocol):
    """One client connection: parse requests from a buffer, answer in order.

    Requests are parsed only while no streamed response is in flight, so
    pipelined requests are answered in order even when ``--chunk-delay-ms``
    spreads a stream over several loop iterations.
    """

    __slots__ = (
        "buf",
        "busy",
        "close_after",
        "continued",
        "delay",
        "held_frames",
        "hold_timer",
        "loop",
        "r",
        "shared",
        "transport",
    )

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.r = shared.responses(shared.chunks)
        self.delay = shared.delay
        self.held_frames: list[bytes] | None = None
        self.hold_timer: asyncio.TimerHandle | None = None
        self.buf = bytearray()
        self.busy = False
        self.close_after = False
        self.continued = False
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; trust the duck.
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.shared.held.discard(self)
        if self.hold_timer is not None:
            self.hold_timer.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._parse()

    def _parse(self) -> None:
        """Answer every complete request in the buffer; keep partial ones for later."""
        buf = self.buf
        while not self.busy and self.transport is not None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._fail()
                return
            head = bytes(buf[:end]).lower()
            pos = end + 4
            body_start = pos
            body: bytes
            if b"\r\ntransfer-encoding:" in head and b"chunked" in head:
                parsed = _read_chunked(buf, pos)
                if parsed is None:
                    return
                if parsed is False:
                    self._fail()
                    return
                body, pos = parsed
            else:
                length = 0
                i = head.find(b"\r\ncontent-length:")
                if i >= 0:
                    j = head.find(b"\r\n", i + 2)
                    try:
                        length = int(head[i + 17 : j if j >= 0 else None])
                    except ValueError:
                        self._fail()
                        return
                if len(buf) < body_start + length:
                    if not self.continued and b"\r\nexpect: 100-continue" in head:
                        # A client that waits for the interim answer would stall otherwise.
                        self.continued = True
                        assert self.transport is not None
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    return
                body = bytes(buf[body_start : body_start + length])
                pos = body_start + length
            del buf[:pos]
            self.continued = False
            line_end = head.find(b"\r\n")
            self.close_after = b"\r\nconnection: close" in head or head[
                : line_end if line_end >= 0 else None
            ].endswith(b" http/1.0")
            self._dispatch(head, body)
            if self.close_after and self.transport is not None:
                if not self.busy:
                    self.transport.close()
                return

    def _dispatch(self, head: bytes, body: bytes) -> None:
        """Route on method and path (query string ignored) to a pre-built response."""
        line_end = head.find(b"\r\n")
        parts = head[: line_end if line_end >= 0 else None].split(b" ")
        if len(parts) != 3:
            self._fail()
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        r = self.r
        if b"\r\nx-bench-chunks:" in head:
            value = _header_value(head, b"\r\nx-bench-chunks:")
            if value is not None and value.isdigit() and 0 < int(value) <= 100_000:
                r = self.shared.responses(int(value))
        assert self.transport is not None
        write = self.transport.write
        if method == b"post":
            if target == b"/v1/chat/completions":
                if STREAM_RE.search(body):
                    frames = r["sse_usage"] if INCLUDE_USAGE_RE.search(body) else r["sse"]
                    self._stream(head, r["sse_head"], frames)  # type: ignore[arg-type]
                else:
                    write(r["chat"])  # type: ignore[arg-type]
                return
            if target == b"/api/chat":
                if NO_STREAM_RE.search(body):
                    write(r["ollama_chat"])  # type: ignore[arg-type]
                else:
                    self._stream(head, r["nd_head"], r["nd"])  # type: ignore[arg-type]
                return
            if target == b"/v1/embeddings":
                n = _list_inputs(body) if LIST_INPUT_RE.search(body) else 0
                write(embeddings_for(n, native=False) if n else r["embeddings"])  # type: ignore[arg-type]
                return
            if target in (b"/api/embed", b"/api/embeddings"):
                n = _list_inputs(body) if LIST_INPUT_RE.search(body) else 0
                write(embeddings_for(n, native=True) if n else r["ollama_embed"])  # type: ignore[arg-type]
                return
            if target == b"/bench/release":
                n = self.shared.release()
                write(_response("200 OK", "application/json", b'{"released":%d}' % n))
                return
        elif method in (b"get", b"head"):
            if target == b"/bench/held":
                n = len(self.shared.held)
                write(_response("200 OK", "application/json", b'{"held":%d}' % n))
                return
            key = {
                b"/api/version": "version",
                b"/api/tags": "tags",
                b"/v1/models": "models",
                b"/": "root",
            }.get(target)
            if key is not None:
                write(r[key])  # type: ignore[arg-type]
                return
        write(r["404"])  # type: ignore[arg-type]

    def _stream(self, req_head: bytes, head: bytes, frames: list[bytes]) -> None:
        """Write the head, then each frame as its own write (optionally paced).

        ``X-Bench-Chunk-Delay-Ms: D`` on the request overrides ``--chunk-delay-ms``
        for that response, so one upstream serves both back-to-back streams (CPU
        cost) and paced ones (does the proxy forward each event as it comes?).
        """
        assert self.transport is not None
        delay = self.delay
        i = req_head.find(b"\r\nx-bench-chunk-delay-ms:")
        if i >= 0:
            j = req_head.find(b"\r\n", i + 2)
            with contextlib.suppress(ValueError):
                delay = float(req_head[i + 25 : j if j >= 0 else None]) / 1000.0
        if b"\r\nx-bench-hold:" in req_head:
            self._hold(head, frames)
            return
        if delay <= 0:
            write = self.transport.write
            write(head)
            for frame in frames:
                write(frame)
            return
        self.busy = True
        self.transport.write(head)
        self._paced(frames, 0, delay)

    def _paced(self, frames: list[bytes], i: int, delay: float) -> None:
        if self.transport is None:
            return
        self.transport.write(frames[i])
        # The terminating "0\r\n\r\n" goes out with no extra delay.
        if i + 1 < len(frames) - 1:
            self.loop.call_later(delay, self._paced, frames, i + 1, delay)
            return
        if i + 1 == len(frames) - 1:
            self.transport.write(frames[i + 1])
        self.busy = False
        if self.close_after:
            self.transport.close()
            return
        if self.buf:
            self._parse()

    def _hold(self, head: bytes, frames: list[bytes]) -> None:
        """Write the head and the first event, keep the rest until released."""
        assert self.transport is not None
        self.busy = True
        self.transport.write(head)
        self.transport.write(frames[0])
        self.held_frames = frames[1:]
        self.shared.held.add(self)
        self.hold_timer = self.loop.call_later(self.shared.hold_max_s, self._hold_expired)

    def _hold_expired(self) -> None:
        self.hold_timer = None
        self.shared.held.discard(self)
        self.release()

    def release(self) -> None:
        """Send the rest of a held stream back to back, then serve what is queued."""
        frames, self.held_frames = self.held_frames, None
        if self.hold_timer is not None:
            self.hold_timer.cancel()
            self.hold_timer = None
        if frames is None or self.transport is None:
            return
        self.transport.writelines(frames)
        self.busy = False
        if self.close_after:
            self.transport.close()
            return
        if self.buf:
            self._parse()

    def _fail(self) -> None:
        if self.transport is not None:
            self.transport.write(self.r["400"])  # type: ignore[arg-type]
            self.transport.close()


def _read_chunked(buf: bytearray, pos: int) -> tuple[bytes, int] | bool | None:
    """Decode a chunked request body: (body, end) or None if incomplete, False if bad."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
        except ValueError:
            return False
        pos = eol + 2
        if size == 0:
            # Trailers (if any) end with an empty line.
            if buf[pos : pos + 2] == b"\r\n":
                return bytes(out), pos + 2
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                return None
            return bytes(out), end + 4
        if len(buf) < pos + size + 2:
            return None
        out += buf[pos : pos + size]
        pos += size + 2


async def serve(host: str, port: int, chunks: int, delay_ms: float, hold_max_s: float) -> None:
    """Serve until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    shared = Shared(chunks, delay_ms / 1000.0, hold_max_s)
    server = await loop.create_server(
        lambda: UpstreamProtocol(shared),
        host,
        port,
        backlog=4096,
        reuse_address=True,
    )
    stop = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
    print(f"fast_upstream listening on http://{host}:{port} (pid {os.getpid()})", flush=True)
    async with server:
        await stop


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434)
    p.add_argument("--chunks", type=int, default=20, help="events per SSE / NDJSON stream")
    p.add_argument(
        "--chunk-delay-ms",
        type=float,
        default=0.0,
        help="pause between stream events (0 = back to back, separate writes)",
    )
    p.add_argument(
        "--hold-max-s",
        type=float,
        default=300.0,
        help="a stream held by X-Bench-Hold is released after this long at the latest",
    )
    args = p.parse_args(argv)
    if args.chunks < 1:
        p.error("--chunks must be >= 1")
    runner = uvloop.run if uvloop is not None else asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        runner(serve(args.host, args.port, args.chunks, args.chunk_delay_ms, args.hold_max_s))
    sys.exit(0)


if __name__ == "__main__":
    main()
