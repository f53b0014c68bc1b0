"""The asyncio layer of the TURN server: sockets in, :class:`~turn.core.TurnCore` calls out.

UDP sockets (the client listener and one relay socket per allocation) are non-blocking
sockets watched with ``loop.add_reader``; each wake-up reads one datagram with
``recvfrom_into`` into a preallocated buffer and hands it to the core, so the relay path
allocates almost nothing and never crosses a thread. The readiness callbacks are
closures over locals (no attribute lookups per packet). Measured and not better on this
path: draining more datagrams per wake-up (epoll is level-triggered, and the extra read
ends in a costly BlockingIOError when idle), and uvloop's own UDP transports
(``create_datagram_endpoint``: libuv also reads until EAGAIN, and each datagram becomes
a new bytes object).
TCP and TLS clients use an ``asyncio.Protocol`` that splits the stream into STUN
messages and ChannelData frames (RFC 8656 section 12.5).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import random
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Any, cast

from . import wire
from .allocation import Address, Allocation, Reservation, SendTo
from .core import TurnCore
from .settings import TurnSettings

_SOCKET_BUFFER = 1 << 21
_RELAY_BIND_TRIES = 64
_TCP_WRITE_LIMIT = 1 << 20  # drop relayed data to a TCP client above this backlog
_SWEEP_INTERVAL_S = 1.0
_HH = struct.Struct("!HH")
_COOKIE = struct.pack("!I", wire.COOKIE)


def machine_address() -> str:
    """This machine's primary non-loopback IPv4 address (127.0.0.1 if there is none).

    A UDP ``connect`` only picks a route and source address; nothing is sent. Without
    a route, the interfaces are asked one by one (Linux ``SIOCGIFADDR``).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("198.51.100.1", 9))
            address: str = sock.getsockname()[0]
            if address != "0.0.0.0":
                return address
        except OSError:
            pass
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), 0x8915, request)  # SIOCGIFADDR
            except OSError:
                continue
            address = socket.inet_ntoa(reply[20:24])
            if not address.startswith("127."):
                return address
    return "127.0.0.1"


def _grow_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, _SOCKET_BUFFER)


class _UdpEndpoint:
    """The UDP listener as a :class:`~turn.allocation.ClientEndpoint`."""

    stream = False

    def __init__(self, sock: socket.socket) -> None:
        self.sendto: SendTo = sock.sendto


def _listener_reader(
    sock: socket.socket, core: TurnCore | None, endpoint: _UdpEndpoint
) -> Callable[[], None]:
    """The readiness callback of the UDP listener: one datagram into the core."""
    assert core is not None
    recv = sock.recvfrom_into
    send = sock.sendto
    view = memoryview(bytearray(65536 + 4))
    from_client = core.from_client

    def readable() -> None:
        try:
            n, addr = recv(view)
        except OSError:  # BlockingIOError, or an ICMP error for an earlier datagram
            return
        response = from_client(addr, addr, endpoint, view, n)
        if response is not None:
            try:
                send(response, addr)
            except OSError:
                pass

    return readable


class _HeldPort:
    """A bound, unread socket held for a RESERVATION-TOKEN (a Reservation)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock: socket.socket | None = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _relay_reader(sock: socket.socket, core: TurnCore, alloc: Allocation) -> Callable[[], None]:
    """The readiness callback of a relay socket: one datagram from a peer to the core.

    A closure over locals, so the per-packet work is one ``recvfrom_into`` and one call.
    A closed socket raises OSError (EBADF) here, so a stale callback does nothing.
    """
    recv = sock.recvfrom_into
    view = core.peer_view
    from_peer = core.from_peer

    def readable() -> None:
        try:
            n, peer = recv(view)
        except OSError:  # BlockingIOError, or e.g. ECONNREFUSED from an earlier ICMP error
            return
        from_peer(alloc, n, peer)

    return readable


class _UdpRelay:
    """One allocation's relay socket (a :class:`~turn.allocation.Relay`)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        core: TurnCore,
        sock: socket.socket,
        alloc: Allocation,
        address: Address,
    ) -> None:
        self._loop = loop
        self._sock: socket.socket | None = sock
        self.address = address
        self.sendto: SendTo = sock.sendto
        loop.add_reader(sock.fileno(), _relay_reader(sock, core, alloc))

    def close(self) -> None:
        sock = self._sock
        if sock is not None:
            self._sock = None
            self._loop.remove_reader(sock.fileno())
            sock.close()


class _StreamClient(asyncio.Protocol):
    """A TCP or TLS client connection: framing, then the core (RFC 8656 section 12.5)."""

    stream = True

    def __init__(self, server: TurnServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._pending = b""
        self.address: Address = ("0.0.0.0", 0)
        self.last_active = 0.0
        # Closes the connection unless a first request is answered in time (see
        # TurnSettings.tcp_first_request_timeout_s); None once one was.
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        peer = transport.get_extra_info("peername")
        self.address = (peer[0], peer[1]) if peer else ("0.0.0.0", 0)
        self.last_active = self._server.loop_time()
        if not self._server.add_stream_client(self):
            transport.abort()
            return
        self._deadline = self._server.call_later(
            self._server.settings.tcp_first_request_timeout_s, self._no_first_request
        )

    def _no_first_request(self) -> None:
        self._deadline = None
        self._server.tcp_first_request_timeouts += 1
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._server.remove_stream_client(self)

    def sendto(self, data: Any, addr: Address) -> None:
        """Write to the client (``addr`` is ignored); drops data when the client is slow."""
        transport = self._transport
        if transport is None or transport.is_closing():
            raise OSError(errno.ENOTCONN, "connection closed")
        if transport.get_write_buffer_size() > _TCP_WRITE_LIMIT:
            raise OSError(errno.ENOBUFS, "client too slow")
        transport.write(bytes(data))

    def close(self) -> None:
        """Close the connection now."""
        if self._transport is not None:
            self._transport.abort()

    def data_received(self, data: bytes) -> None:
        core = self._server.core
        if core is None:
            return
        self.last_active = self._server.loop_time()
        if self._pending:
            data = self._pending + data
            self._pending = b""
        mv = memoryview(data)
        size = len(data)
        pos = 0
        limit = core.settings.max_packet_size
        while size - pos >= 4:
            first = data[pos]
            length = _HH.unpack_from(data, pos)[1]
            if first & 0xC0 == 0x40:
                total = 4 + length + (-length & 3)
            elif first & 0xC0 == 0:
                if size - pos < 8:
                    break
                if data[pos + 4 : pos + 8] != _COOKIE:
                    # Not STUN, not ChannelData: the stream cannot be resynchronised.
                    core.dropped_garbage += 1
                    self.close()
                    return
                total = 20 + length
            else:
                core.dropped_garbage += 1
                self.close()
                return
            if total > limit + 4:
                core.dropped_oversized += 1
                self.close()
                return
            if size - pos < total:
                break
            frame = mv[pos : pos + total]
            pos += total
            response = core.from_client(self, self.address, self, frame, total)
            if response is not None:
                # Only requests get an answer (RFC 8489 section 6.3): this connection has
                # sent a valid one, so its first-request deadline is met.
                if self._deadline is not None:
                    self._deadline.cancel()
                    self._deadline = None
                if self._transport is not None:
                    self._transport.write(response)
        if pos < size:
            self._pending = data[pos:]


class TurnServer:
    """The STUN/TURN server: UDP listener, optional TCP and TLS listeners, relays."""

    def __init__(self, settings: TurnSettings) -> None:
        self.settings = settings
        self.core: TurnCore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._udp: socket.socket | None = None
        self._udp_endpoint: _UdpEndpoint | None = None
        self._servers: list[asyncio.Server] = []
        self._stream_clients: set[_StreamClient] = set()
        self._stream_per_address: dict[str, int] = {}  # TCP/TLS connections per client IP
        # Counters of the TCP/TLS connection limits (see `stats`).
        self.tcp_refused = 0
        self.tcp_refused_per_address = 0
        self.tcp_first_request_timeouts = 0
        self.tcp_idle_timeouts = 0
        self._sweeper: asyncio.Task[None] | None = None
        self._relay_host = ""
        self._closed = False

    # ---------------------------------------------------------------- public API

    @property
    def stats(self) -> dict[str, int]:
        """Counters: allocations, relayed packets, dropped garbage, auth failures..."""
        stats = self.core.stats if self.core is not None else {}
        stats["tcp_connections"] = len(self._stream_clients)
        stats["tcp_refused"] = self.tcp_refused
        stats["tcp_refused_per_address"] = self.tcp_refused_per_address
        stats["tcp_first_request_timeouts"] = self.tcp_first_request_timeouts
        stats["tcp_idle_timeouts"] = self.tcp_idle_timeouts
        return stats

    @property
    def udp_address(self) -> tuple[str, int]:
        """The bound UDP listener address (the real port when listen_port was 0)."""
        if self._udp is None:
            raise RuntimeError("TURN server not started")
        host, port = self._udp.getsockname()[:2]
        return host, port

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        """The bound TCP listener address, if TCP is on."""
        return self._server_address(0) if self.settings.tcp else None

    @property
    def tls_address(self) -> tuple[str, int] | None:
        """The bound TLS listener address, if TLS is on."""
        return self._server_address(len(self._servers) - 1) if self.settings.tls else None

    @property
    def relay_host(self) -> str:
        """The local address relay sockets bind to."""
        return self._relay_host

    async def start(self) -> None:
        """Bind the listeners; raises OSError on bind failure, ValueError without a secret."""
        if not self.settings.secret:
            raise ValueError("turn: a shared secret is required")
        if self._udp is not None or self._closed:
            raise RuntimeError("TURN server already started")
        settings = self.settings
        self._loop = loop = asyncio.get_running_loop()
        self._relay_host = settings.relay_host or (
            machine_address() if settings.listen_host == "0.0.0.0" else settings.listen_host
        )
        self.core = TurnCore(settings, self)
        try:
            await self._bind(loop)
        except BaseException:
            await self.close()
            raise
        self._sweeper = loop.create_task(self._sweep())

    async def close(self) -> None:
        """Stop listening, close every connection and relay; idempotent."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._udp is not None and self._loop is not None:
            self._loop.remove_reader(self._udp.fileno())
            self._udp.close()
            self._udp = None
        for server in self._servers:
            server.close()
        for client in list(self._stream_clients):
            client.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
        if self.core is not None:
            self.core.close()
        # Let the transports run connection_lost so no socket is left unclosed.
        for _ in range(3):
            if not self._stream_clients:
                break
            await asyncio.sleep(0)

    # ---------------------------------------------------------------- internals

    def _server_address(self, index: int) -> tuple[str, int] | None:
        if not 0 <= index < len(self._servers):
            return None
        host, port = self._servers[index].sockets[0].getsockname()[:2]
        return host, port

    async def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        settings = self.settings
        host = settings.listen_host
        # With port 0 (tests) pick a UDP port that is also free for TCP.
        for attempt in range(20):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                udp.bind((host, settings.listen_port))
                udp.setblocking(False)
                _grow_buffers(udp)
                port = udp.getsockname()[1]
                tcp_server = None
                if settings.tcp:
                    tcp_server = await loop.create_server(
                        lambda: _StreamClient(self), host, port, reuse_address=True
                    )
            except OSError:
                udp.close()
                if settings.listen_port or attempt == 19:
                    raise
                continue
            break
        self._udp = udp
        self._udp_endpoint = _UdpEndpoint(udp)
        if tcp_server is not None:
            self._servers.append(tcp_server)
        loop.add_reader(udp.fileno(), _listener_reader(udp, self.core, self._udp_endpoint))
        if settings.tls:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
            self._servers.append(
                await loop.create_server(
                    lambda: _StreamClient(self),
                    host,
                    settings.tls_port,
                    ssl=context,
                    # The protocol (and so the connection limits and the first-request
                    # deadline) only sees the connection after the handshake: bound the
                    # handshake by the same deadline (asyncio's default is 60 s).
                    ssl_handshake_timeout=settings.tcp_first_request_timeout_s,
                    reuse_address=True,
                )
            )

    def open_relay(
        self,
        allocation: Allocation,
        *,
        even_port: bool = False,
        reserve_next: bool = False,
        dont_fragment: bool = False,
        reservation: Reservation | None = None,
    ) -> tuple[_UdpRelay, _HeldPort | None]:
        """Bind a UDP relay socket in the configured port range (RelayFactory)."""
        assert self._loop is not None and self.core is not None
        held = None
        if isinstance(reservation, _HeldPort) and reservation.sock is not None:
            sock = reservation.sock
            reservation.sock = None
        else:
            sock, held = self._bind_relay_port(even_port, reserve_next)
        sock.setblocking(False)
        _grow_buffers(sock)
        if dont_fragment and hasattr(socket, "IP_MTU_DISCOVER"):
            # DONT-FRAGMENT (RFC 8656 section 14.8): set DF on relayed datagrams.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_MTU_DISCOVER, 2)
        port = sock.getsockname()[1]
        announced = (self.settings.external_address or self._relay_host, port)
        return _UdpRelay(self._loop, self.core, sock, allocation, announced), held

    def _bind_relay_port(
        self, even_port: bool, reserve_next: bool
    ) -> tuple[socket.socket, _HeldPort | None]:
        low, high = self.settings.relay_port_min, self.settings.relay_port_max
        for _ in range(_RELAY_BIND_TRIES):
            port = random.randint(low, high)
            if even_port and port & 1:
                port -= 1
            if port < low or (reserve_next and port + 1 > high):
                continue
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((self._relay_host, port))
            except OSError:
                sock.close()
                continue
            if not reserve_next:
                return sock, None
            extra = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                extra.bind((self._relay_host, port + 1))
            except OSError:
                extra.close()
                sock.close()
                continue
            return sock, _HeldPort(extra)
        raise OSError(errno.EADDRINUSE, "no free relay port")

    def loop_time(self) -> float:
        """The event loop's clock."""
        return self._loop.time() if self._loop is not None else 0.0

    def call_later(self, delay: float, callback: Callable[[], None]) -> asyncio.TimerHandle:
        """Run ``callback`` after ``delay`` seconds on the server's loop."""
        assert self._loop is not None
        return self._loop.call_later(delay, callback)

    def add_stream_client(self, client: _StreamClient) -> bool:
        """Register a TCP/TLS connection; False if over a limit or closing.

        Per address first, so that one host's connections (idle ones too, until their
        first-request deadline) cannot fill the global limit for everyone else.
        """
        if self._closed:
            return False
        ip = client.address[0]
        count = self._stream_per_address.get(ip, 0)
        if count >= self.settings.max_tcp_connections_per_address:
            self.tcp_refused_per_address += 1
            return False
        if len(self._stream_clients) >= self.settings.max_tcp_connections:
            self.tcp_refused += 1
            return False
        self._stream_clients.add(client)
        self._stream_per_address[ip] = count + 1
        return True

    def remove_stream_client(self, client: _StreamClient) -> None:
        """Forget a connection and its allocation (RFC 8656 section 6)."""
        if client in self._stream_clients:
            self._stream_clients.remove(client)
            ip = client.address[0]
            left = self._stream_per_address.get(ip, 1) - 1
            if left:
                self._stream_per_address[ip] = left
            else:
                self._stream_per_address.pop(ip, None)
        if self.core is not None:
            self.core.client_gone(client)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            core = self.core
            if core is None:
                continue
            core.expire()
            idle = self.loop_time() - self.settings.tcp_idle_timeout_s
            for client in list(self._stream_clients):
                if client.last_active < idle and client not in core.allocations:
                    self.tcp_idle_timeouts += 1
                    client.close()
