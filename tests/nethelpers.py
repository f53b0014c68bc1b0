"""Network helpers shared by tests in several folders (``tests`` is on pytest's pythonpath)."""

from __future__ import annotations

import socket

from turn.server import machine_address


def machine_ip() -> str:
    """This machine's non-loopback IPv4 address (aioice ignores 127.0.0.1)."""
    address = machine_address()
    assert address != "127.0.0.1", "tests need a non-loopback interface"
    return address


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on ``host`` (for servers that listen on both)."""
    for _ in range(50):
        with socket.socket() as t:
            t.bind((host, 0))
            port: int = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind((host, port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")
