"""The floor: the smallest sensible aiohttp pass-through proxy.

Why it exists: the sidecar's overhead is only meaningful against what *any*
aiohttp proxy must pay (accept, parse, one client round trip, write back). This
file does nothing else: no logging, no policies, no header rewriting beyond
hop-by-hop headers. A sidecar config's "x floor" ratio is its CPU per request
divided by this one's. Run: ``python bench/floor.py --port P --upstream URL``.
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP = frozenset(
    ("host", "connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade")
)


async def handle(request: web.Request) -> web.StreamResponse:
    """Forward one request; stream the answer back when upstream streams it."""
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    url = request.app["upstream"] + request.path_qs
    async with request.app["session"].request(
        request.method, url, data=body or None, headers=headers
    ) as up:
        out = {k: v for k, v in up.headers.items() if k.lower() not in HOP}
        if up.headers.get("Transfer-Encoding", "").lower() == "chunked":
            resp = web.StreamResponse(status=up.status, headers=out)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        return web.Response(status=up.status, body=await up.read(), headers=out)


async def main(host: str, port: int, upstream: str) -> None:
    """Serve forever (the runner stops us with SIGTERM)."""
    app = web.Application()
    app["upstream"] = upstream.rstrip("/")
    app["session"] = ClientSession(
        connector=TCPConnector(limit=0), timeout=ClientTimeout(total=None), auto_decompress=False
    )
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="minimal aiohttp pass-through proxy (the floor)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    a = p.parse_args()
    uvloop.run(main(a.host, a.port, a.upstream))
