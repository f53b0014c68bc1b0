"""The listening socket: per-address connection caps, a deadline for request headers, and the
serve loop that ``rallypoint serve`` runs (aiohttp's ``run_app`` with this site).

aiohttp has neither: incomplete requests are dropped after minutes, and one address may open
as many connections as the process has file descriptors. ``Guard`` stands between each
accepted connection and aiohttp's protocol: it refuses a connection from an address that has
``server.max_connections_per_address`` open, and closes one whose first request's headers are
not complete within ``server.header_timeout_s`` (slowloris). After the headers it only passes
calls through.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Iterable

from aiohttp import web

from ..config import Config
from ..core.metrics import Metric

log = logging.getLogger("rallypoint.listener")


class AddressBook:
    """Open connections per client address, and what was refused."""

    def __init__(self, cap: int) -> None:
        self.cap = cap  # 0: no cap
        self.open: dict[str, int] = {}
        self.refused = 0
        self.header_timeouts = 0

    def admit(self, address: str) -> bool:
        n = self.open.get(address, 0)
        if self.cap and n >= self.cap:
            self.refused += 1
            return False
        self.open[address] = n + 1
        return True

    def release(self, address: str) -> None:
        n = self.open.get(address, 1) - 1
        if n > 0:
            self.open[address] = n
        else:
            self.open.pop(address, None)

    def metrics(self) -> Iterable[Metric]:
        yield Metric(
            "http_connections_refused_per_address",
            "counter",
            "Connections refused because their address had server.max_connections_per_address.",
            self.refused,
        )
        yield Metric(
            "http_header_timeouts",
            "counter",
            "Connections closed because their request headers took longer than "
            "server.header_timeout_s.",
            self.header_timeouts,
        )


class Guard(asyncio.Protocol):
    """One accepted connection, in front of aiohttp's protocol for it (see the module)."""

    __slots__ = ("_address", "_book", "_deadline", "_inner", "_tail", "_timeout", "_transport")

    def __init__(self, inner: asyncio.Protocol, book: AddressBook, header_timeout: float) -> None:
        self._inner = inner
        self._book = book
        self._address: str | None = None
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, for a header end split over two reads
        self._timeout = header_timeout

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        if not self._book.admit(address):
            transport.abort()  # type: ignore[attr-defined]
            return
        self._address = address
        self._transport = transport  # type: ignore[assignment]
        self._deadline = asyncio.get_running_loop().call_later(self._timeout, self._late)
        self._inner.connection_made(transport)

    def _late(self) -> None:
        self._deadline = None
        self._book.header_timeouts += 1
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            seen = self._tail + data
            if b"\r\n\r\n" in seen:
                self._deadline.cancel()
                self._deadline = None
                self._tail = b""
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._address is None:  # refused
            return
        self._book.release(self._address)
        self._address = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through ``Guard``."""

    __slots__ = ("_book", "_header_timeout", "_host", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        book: AddressBook,
        header_timeout: float,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context)
        self._host = host
        self._port = port
        self._book = book
        self._header_timeout = header_timeout

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        book, timeout = self._book, self._header_timeout

        def factory() -> Guard:
            return Guard(server(), book, timeout)

        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, ssl=self._ssl_context, backlog=self._backlog
        )


def serve(
    app: web.Application,
    cfg: Config,
    book: AddressBook,
    loop: asyncio.AbstractEventLoop,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Run ``app`` until SIGINT or SIGTERM, then shut it down in order (as ``run_app``)."""
    runner = web.AppRunner(
        app,
        access_log=None,
        shutdown_timeout=5.0,
        keepalive_timeout=cfg.server.keepalive_timeout_s,
    )

    async def main() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await runner.setup()
        try:
            site = GuardedSite(
                runner,
                cfg.server.host,
                cfg.server.port,
                book,
                cfg.server.header_timeout_s,
                ssl_context=ssl_context,
            )
            await site.start()
            await stop.wait()
        finally:
            await runner.cleanup()

    try:
        loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


__all__ = ["AddressBook", "Guard", "GuardedSite", "serve"]
