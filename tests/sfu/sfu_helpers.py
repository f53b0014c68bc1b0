"""Helpers for SFU tests (a module, not conftest, so tests can import them)."""

from __future__ import annotations

import asyncio
import math
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
import av
from aiohttp.test_utils import TestServer
from aiortc import RTCRtpTransceiver
from aiortc.mediastreams import AudioStreamTrack

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


class ToneTrack(AudioStreamTrack):
    """A loud 440 Hz tone, encoded by aiortc (so its packets carry audio levels)."""

    def __init__(self, amplitude: float = 0.5) -> None:
        super().__init__()
        self.amplitude = amplitude
        self._n = 0

    async def recv(self) -> av.AudioFrame:
        silence = await super().recv()  # paced 20 ms frames with proper timestamps
        n, rate = silence.samples, silence.sample_rate
        pcm = array(
            "h",
            (
                int(math.sin(2 * math.pi * 440 * (k + self._n) / rate) * self.amplitude * 32767)
                for k in range(n)
            ),
        )
        self._n += n
        frame = av.AudioFrame(format="s16", layout="mono", samples=n)
        frame.planes[0].update(pcm.tobytes())
        frame.pts, frame.time_base, frame.sample_rate = silence.pts, silence.time_base, rate
        return frame


async def sfu_metric(server: TestServer, name: str) -> float:
    """``rallypoint_sfu_<name>`` from the server's /metrics."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{server.port}/metrics") as r:
            text = await r.text()
    samples = (line.split() for line in text.splitlines() if not line.startswith("#"))
    return float(dict(samples)[f"rallypoint_sfu_{name}"])
