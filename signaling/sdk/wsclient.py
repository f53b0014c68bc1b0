"""A small asyncio client for the Rallypoint protocol (aiohttp WebSocket).

``Client.request`` sends a message with a fresh ``id`` and waits for the reply carrying that id as
``re`` (raising ``ClientError`` for an ``error`` reply); every other server message goes to
``events`` and can be awaited with ``next_event``. ``send_chat`` retries with the same ``cid``
so a message is stored once however often it is sent.

``encoding="msgpack"`` offers the ``rallypoint.msgpack`` WebSocket subprotocol: the same
messages as MessagePack maps in binary frames (docs/PROTOCOL.md, "Encodings"); the default is
JSON in text frames.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Callable
from typing import Any, Final, Literal

import aiohttp
import msgpack
import orjson

#: The subprotocol that selects MessagePack (docs/PROTOCOL.md, "Encodings").
MSGPACK_SUBPROTOCOL: Final = "rallypoint.msgpack"
Encoding = Literal["json", "msgpack"]
#: The protocol's default frame limit (docs/PROTOCOL.md, "Limits"), until `welcome` tells
#: the server's (``limits.max_frame_bytes``).
DEFAULT_MAX_FRAME_BYTES: Final = 65536


async def next_matching(
    events: asyncio.Queue[dict[str, Any]],
    type_: str | None = None,
    *,
    timeout: float = 10.0,
    where: Callable[[dict[str, Any]], bool] | None = None,
    stop_at_close: bool = False,
) -> dict[str, Any]:
    """Take events from ``events`` until one is of ``type_`` and matches ``where`` (others are
    dropped); ``stop_at_close`` raises ConnectionError at the reader's ``_closed`` marker."""

    async def wait() -> dict[str, Any]:
        while True:
            ev = await events.get()
            if (type_ is None or ev.get("type") == type_) and (where is None or where(ev)):
                return ev
            if stop_at_close and ev.get("type") == "_closed":
                raise ConnectionError(f"connection closed ({ev.get('code')})")

    return await asyncio.wait_for(wait(), timeout)


class ClientError(Exception):
    """An ``error`` reply from the server."""

    def __init__(self, msg: dict[str, Any]) -> None:
        super().__init__(f"{msg.get('code')}: {msg.get('message')}")
        self.code: str = msg.get("code", "")
        self.msg = msg


class FrameTooLargeError(ClientError):
    """A request larger than the server's frame limit (``welcome.limits.max_frame_bytes``),
    refused before it was sent: the server would not read it (`frame_too_large`, or close the
    connection above its hard cap), so waiting for its answer would only run out the timeout.
    Its ``code`` is ``frame_too_large``; retrying cannot help."""

    def __init__(self, type_: str, size: int, limit: int) -> None:
        super().__init__(
            {
                "type": "error",
                "code": "frame_too_large",
                "message": f"the `{type_}` frame would be {size} bytes; the server reads "
                f"frames of up to {limit} bytes (welcome.limits.max_frame_bytes): not sent",
            }
        )
        self.size = size
        self.limit = limit


class Client:
    """One connection to a Rallypoint server."""

    def __init__(
        self,
        url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        encoding: Encoding = "json",
    ) -> None:
        if encoding not in ("json", "msgpack"):
            raise ValueError(f"encoding must be 'json' or 'msgpack', not {encoding!r}")
        self.url = url
        self.encoding = encoding
        self._own_http = session is None
        self._http = session
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        # Called with every event before it is queued (e.g. a media session's offers).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.welcome: dict[str, Any] = {}
        self.close_code: int | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None

    async def connect(
        self, *, heartbeat: bool = False, origin: str | None = None, **hello: Any
    ) -> dict[str, Any]:
        """Open the socket and send `hello` with ``hello`` fields; returns `welcome`."""
        if self._http is None:
            self._http = aiohttp.ClientSession()
        headers = {"Origin": origin} if origin else None
        packed = self.encoding == "msgpack"
        self.ws = await self._http.ws_connect(
            self.url,
            headers=headers,
            autoping=True,
            max_msg_size=0,
            protocols=(MSGPACK_SUBPROTOCOL,) if packed else (),
        )
        if packed and self.ws.protocol != MSGPACK_SUBPROTOCOL:
            await self.ws.close()
            raise ConnectionError("the server does not offer MessagePack (rallypoint.msgpack)")
        self._reader = asyncio.create_task(self._read())
        self.welcome = await self.request({"type": "hello", "v": 1, **hello})
        if heartbeat:
            self._pinger = asyncio.create_task(self._ping(self.welcome["heartbeat_ms"] / 1000))
        return self.welcome

    async def _ping(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.send_raw({"type": "ping"})

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            kind, loads = (
                (aiohttp.WSMsgType.BINARY, msgpack.unpackb)
                if self.encoding == "msgpack"
                else (aiohttp.WSMsgType.TEXT, orjson.loads)
            )
            async for msg in self.ws:
                if msg.type is not kind:
                    continue
                data = loads(msg.data)
                fut = self._pending.pop(data.get("re", ""), None) if "re" in data else None
                if fut is not None and not fut.done():
                    fut.set_result(data)
                else:
                    for listener in self.listeners:
                        listener(data)
                    self.events.put_nowait(data)
        finally:
            self.close_code = self.ws.close_code
            err = ConnectionError(f"connection closed ({self.ws.close_code})")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()
            self.events.put_nowait({"type": "_closed", "code": self.ws.close_code})

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame the server reads (``welcome.limits.max_frame_bytes``)."""
        limit = self.welcome.get("limits", {}).get("max_frame_bytes")
        return limit if isinstance(limit, int) else DEFAULT_MAX_FRAME_BYTES

    def _encode(self, msg: dict[str, Any]) -> bytes:
        return msgpack.packb(msg) if self.encoding == "msgpack" else orjson.dumps(msg)

    async def _send_frame(self, data: bytes) -> None:
        assert self.ws is not None
        if self.encoding == "msgpack":
            await self.ws.send_bytes(data)
        else:
            await self.ws.send_str(data.decode())

    async def send_raw(self, msg: dict[str, Any] | str | bytes) -> None:
        """Send a message in the connection's encoding, or a raw text (``str``) or binary
        (``bytes``) frame as it is, without waiting for a reply (and whatever its size)."""
        assert self.ws is not None
        if isinstance(msg, dict):
            await self._send_frame(self._encode(msg))
        elif isinstance(msg, bytes):
            await self.ws.send_bytes(msg)
        else:
            await self.ws.send_str(msg)

    async def request(self, msg: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send ``msg`` with a fresh id and return the reply; raise ``ClientError`` on error,
        ``FrameTooLargeError`` (a ``ClientError``, not sent) at once if it is larger than the
        server's frame limit."""
        rid = f"r{next(self._ids)}"
        data = self._encode({**msg, "id": rid})
        if len(data) > self.max_frame_bytes:
            raise FrameTooLargeError(str(msg.get("type")), len(data), self.max_frame_bytes)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        await self._send_frame(data)
        reply = await asyncio.wait_for(fut, timeout)
        if reply.get("type") == "error":
            raise ClientError(reply)
        return reply

    async def next_event(
        self,
        type_: str | None = None,
        *,
        timeout: float = 10.0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """The next event (of ``type_``, matching ``where``), skipping others."""
        return await next_matching(
            self.events, type_, timeout=timeout, where=where, stop_at_close=True
        )

    def drain(self) -> list[dict[str, Any]]:
        """Take every event received so far."""
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out

    async def send_chat(
        self, conversation: str, text: str, *, cid: str | None = None, retries: int = 3
    ) -> dict[str, Any]:
        """Send a chat message; retried with the same cid on timeout. Returns `sent`."""
        cid = cid or uuid.uuid4().hex
        for attempt in range(retries + 1):
            try:
                return await self.request(
                    {"type": "send", "conversation": conversation, "cid": cid, "text": text},
                    timeout=5.0,
                )
            except TimeoutError:
                if attempt == retries:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for task in (self._pinger, self._reader):
            if task is not None:
                task.cancel()
        if self.ws is not None:
            await self.ws.close()
        for task in (self._pinger, self._reader):
            if task is not None:
                await asyncio.gather(task, return_exceptions=True)
        if self._own_http and self._http is not None:
            await self._http.close()

    async def drop(self) -> None:
        """Simulate a network failure: abort the TCP connection without a close handshake."""
        assert self.ws is not None
        for task in (self._pinger,):
            if task is not None:
                task.cancel()
        conn = self.ws._response.connection
        if conn is not None and conn.transport is not None:
            conn.transport.abort()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._own_http and self._http is not None:
            await self._http.close()
            self._http = None
