"""Helpers for SFU tests (a module, not conftest, so tests can import them)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp.test_utils import TestServer
from aiortc import RTCRtpTransceiver

from media.session import SfuSession
from media.tracks import EncodedVideoTrack
from signaling.sdk.wsclient import Client


@dataclass
class Party:
    client: Client
    media: SfuSession
    video: EncodedVideoTrack | None = None
    transceivers: list[RTCRtpTransceiver] | None = None

    @property
    def id(self) -> str:
        return str(self.client.welcome["session"])


PartyFactory = Callable[..., Awaitable[Party]]


async def until(pred: Callable[[], bool], timeout: float, step: float = 0.05) -> None:
    """Wait until ``pred()`` holds; TimeoutError after ``timeout`` s (bounded polling)."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(step)


async def sfu_metric(server: TestServer, name: str) -> float:
    """``rallypoint_sfu_<name>`` from the server's /metrics."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as r:
            text = await r.text()
    samples = (line.split() for line in text.splitlines() if not line.startswith("#"))
    return float(dict(samples)[f"rallypoint_sfu_{name}"])
