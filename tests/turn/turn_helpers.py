"""Helpers for the TURN tests: credentials, signed requests, a raw UDP client, an aioice
TURN client's receiving end, a self-signed certificate."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import pytest
from aioice import stun
from aioice.turn import TurnTransport

from turn.credentials import long_term_key, rest_credentials
from turn.server import TurnServer

SECRET = "test-secret"
REALM = "rallypoint"

ServerFactory = Callable[..., Coroutine[Any, Any, TurnServer]]


def credentials(user: str = "alice", ttl: int = 600, secret: str = SECRET) -> tuple[str, str]:
    return rest_credentials(secret, user, ttl)


def signed(
    method: stun.Method,
    attributes: dict[str, Any],
    username: str,
    password: str,
    nonce: bytes,
    realm: str = REALM,
) -> stun.Message:
    message = stun.Message(method, stun.Class.REQUEST, attributes=dict(attributes))
    message.attributes["USERNAME"] = username
    message.attributes["REALM"] = realm
    message.attributes["NONCE"] = nonce
    message.add_message_integrity(long_term_key(username, realm, password))
    return message


class UdpClient(asyncio.DatagramProtocol):
    """A raw UDP socket for hand-made STUN messages."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    def send(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        self.transport.sendto(data, addr)

    async def request(self, message: stun.Message, addr: tuple[str, int]) -> stun.Message:
        self.send(bytes(message), addr)
        while True:
            data, _ = await asyncio.wait_for(self.queue.get(), 5)
            response = stun.parse_message(data)
            if response.transaction_id == message.transaction_id:
                return response

    async def silence(self, seconds: float = 0.3) -> None:
        """Assert that nothing arrives for a while."""
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(self.queue.get(), seconds)


async def allocate(
    client: UdpClient, server: tuple[str, int], username: str, password: str
) -> stun.Message:
    """Allocate a UDP relay the way clients do: unsigned first, then signed with the nonce."""
    attributes = {"REQUESTED-TRANSPORT": 0x11000000}
    challenge = await client.request(
        stun.Message(stun.Method.ALLOCATE, stun.Class.REQUEST, attributes=dict(attributes)),
        server,
    )
    assert challenge.attributes["ERROR-CODE"][0] == 401, challenge
    nonce = challenge.attributes["NONCE"]
    return await client.request(
        signed(stun.Method.ALLOCATE, attributes, username, password, nonce), server
    )


class Receiver(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()
        self.errors: asyncio.Queue[Exception] = asyncio.Queue()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    def error_received(self, exc: Exception) -> None:
        self.errors.put_nowait(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def close(transport: TurnTransport, receiver: Receiver) -> None:
    transport.close()
    await asyncio.wait_for(receiver.closed, 10)


def self_signed(tmp_path: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``ip`` and its key, as PEM files in ``tmp_path``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rallypoint-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
