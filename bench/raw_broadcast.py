"""A minimal aiohttp WebSocket broadcast server: the ceiling ``bench/signaling.py`` compares to.

``GET /ws?room=<name>`` joins a room; every text or binary frame a member sends is written, as the
same bytes framed once, to the other members of its room. No protocol, no storage, no
authentication, no acknowledgement. It runs like the real server (uvloop, no permessage-deflate,
frames written straight into each transport) and freezes the garbage collector's long-lived
objects after bursts of connections, as the real server does.

    python bench/raw_broadcast.py --port 8099
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import struct
from collections.abc import AsyncIterator

from aiohttp import WSMsgType, web

ROOMS: web.AppKey[dict[str, list[asyncio.Transport]]] = web.AppKey("rooms", dict)


def frame(payload: bytes, opcode: int) -> bytes:
    n = len(payload)
    b0 = 0x80 | opcode
    if n < 126:
        return bytes((b0, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", b0, 126, n) + payload
    return struct.pack("!BBQ", b0, 127, n) + payload


async def ws_handler(request: web.Request) -> web.StreamResponse:
    rooms = request.app[ROOMS]
    name = request.query.get("room", "")
    ws = web.WebSocketResponse(compress=False, decode_text=False, max_msg_size=1 << 20)
    await ws.prepare(request)
    t = request.transport
    if t is None:  # pragma: no cover
        return ws
    members = rooms.setdefault(name, [])
    members.append(t)
    try:
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.TEXT or msg.type is WSMsgType.BINARY:
                f = frame(msg.data, 1 if msg.type is WSMsgType.TEXT else 2)
                for m in members:
                    if m is not t and not m.is_closing():
                        m.write(f)
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                break
            elif msg.type is WSMsgType.ERROR:
                break
    finally:
        members.remove(t)
        if not members:
            rooms.pop(name, None)
    return ws


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _freezer(app: web.Application) -> AsyncIterator[None]:
    async def loop() -> None:
        frozen_at = 0
        while True:
            await asyncio.sleep(2.0)
            n = sum(len(m) for m in app[ROOMS].values())
            if abs(n - frozen_at) >= 200:
                gc.freeze()
                frozen_at = n

    gc.freeze()
    task = asyncio.create_task(loop())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def make_app() -> web.Application:
    app = web.Application()
    app[ROOMS] = {}
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/healthz", healthz)
    app.cleanup_ctx.append(_freezer)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8099)
    args = p.parse_args()
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(
        make_app(),
        host=args.host,
        port=args.port,
        print=None,
        access_log=None,
        shutdown_timeout=2.0,
        loop=loop,
    )


if __name__ == "__main__":
    main()
