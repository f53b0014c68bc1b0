"""A user-space UDP relay between an aiortc client and a server, with a slow, lossy downlink.

Tests and benchmarks put one participant behind it to see what a bad link does (the SFU's
packets reach the other participants untouched). The relay has two sockets: the client talks
to ``client_side``, the server to ``server_side``. :meth:`UdpRelay.offer` and
:meth:`UdpRelay.answer` rewrite the candidates of the server's offer and the client's answer
so that each side sees only the relay's address (ICE then runs through it unchanged: the
relay forwards STUN, DTLS, RTP and RTCP alike). The server's own address is taken from its
offer's first UDP candidate, the client's from its first packet.

The downlink (server to client) can be limited, as a bottleneck link is: ``rate_bps`` paces
every datagram (a packet leaves when the ones before it have, at that rate) and a packet that
would wait more than ``max_delay`` seconds is dropped (a full queue); ``loss`` drops RTP
packets at random (seeded; RTCP, STUN and DTLS are never dropped at random, so feedback keeps
flowing, as in ``media.loss``). Both may be changed at any time; ``None`` / 0.0 lift them.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

from aiortc.rtp import is_rtcp

Addr = tuple[str, int]


@dataclass
class RelayCounts:
    """Downlink datagrams: forwarded, dropped at random (RTP), dropped by the full queue."""

    forwarded: int = 0
    forwarded_bytes: int = 0
    lost: int = 0
    queue_dropped: int = 0


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Any) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.on_datagram(data, addr)


def _rewrite_candidates(sdp: str, addr: Addr) -> tuple[str, Addr | None]:
    """``sdp`` with its first UDP candidate of each section moved to ``addr`` and the others
    left out; also the first UDP candidate's own address."""
    eol = "\r\n" if "\r\n" in sdp else "\n"
    out: list[str] = []
    first: Addr | None = None
    kept = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            kept = False
        if line.startswith("a=candidate:"):
            bits = line.split()
            if kept or len(bits) < 8 or bits[2].lower() != "udp" or ":" in bits[4]:
                continue
            if first is None:
                first = (bits[4], int(bits[5]))
            bits[4], bits[5] = addr[0], str(addr[1])
            line = " ".join(bits)
            kept = True
        out.append(line)
    return eol.join(out) + eol, first


class UdpRelay:
    """See the module docstring. ``await start()`` before use, ``close()`` after."""

    def __init__(self, host: str, *, seed: int = 0) -> None:
        self.host = host
        self.rate_bps: int | None = None
        self.loss = 0.0
        self.max_delay = 0.2
        self.counts = RelayCounts()
        self.server_addr: Addr | None = None
        self.client_addr: Addr | None = None
        self._rng = random.Random(seed)
        self._free_at = 0.0
        self._client = _Side(self._from_client)
        self._server = _Side(self._from_server)
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self._client, local_addr=(self.host, 0))
        await loop.create_datagram_endpoint(lambda: self._server, local_addr=(self.host, 0))

    @staticmethod
    def _addr(side: _Side) -> Addr:
        assert side.transport is not None, "start the relay first"
        host, port = side.transport.get_extra_info("sockname")[:2]
        return host, port

    @property
    def client_side(self) -> Addr:
        """Where the client sends (its offer's candidates point here)."""
        return self._addr(self._client)

    @property
    def server_side(self) -> Addr:
        """Where the server sends (the client's answer's candidates point here)."""
        return self._addr(self._server)

    @property
    def queued_s(self) -> float:
        """How long a packet entering the limited downlink now would wait (0: no queue)."""
        if self._loop is None:
            return 0.0
        return max(0.0, self._free_at - self._loop.time())

    def offer(self, sdp: str) -> str:
        """The server's offer as the client should see it."""
        sdp, server = _rewrite_candidates(sdp, self.client_side)
        if server is not None:
            self.server_addr = server
        return sdp

    def answer(self, sdp: str) -> str:
        """The client's answer as the server should see it."""
        return _rewrite_candidates(sdp, self.server_side)[0]

    def _from_client(self, data: bytes, addr: Addr) -> None:
        self.client_addr = addr
        if self.server_addr is not None and self._server.transport is not None:
            self._server.transport.sendto(data, self.server_addr)

    def _from_server(self, data: bytes, addr: Addr) -> None:
        client, out = self.client_addr, self._client.transport
        if client is None or out is None or self._loop is None:
            return
        counts = self.counts
        if self.loss and len(data) >= 12 and 128 <= data[0] < 192 and not is_rtcp(data):
            if self._rng.random() < self.loss:
                counts.lost += 1
                return
        rate = self.rate_bps
        if rate is None:
            counts.forwarded += 1
            counts.forwarded_bytes += len(data)
            out.sendto(data, client)
            return
        now = self._loop.time()
        start = max(now, self._free_at)
        if start - now > self.max_delay:
            counts.queue_dropped += 1
            return
        self._free_at = start + len(data) * 8 / rate
        counts.forwarded += 1
        counts.forwarded_bytes += len(data)
        self._loop.call_at(self._free_at, out.sendto, data, client)

    def close(self) -> None:
        for side in (self._client, self._server):
            if side.transport is not None:
                side.transport.close()
