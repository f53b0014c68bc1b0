"""Chromium takes an aiortc answer compacted by ``signaling.sdk.sdp.compact_answer`` (only the
SHA-256 fingerprint; no ``msid``, ``ssrc`` or ``a=rtcp`` in receive-only sections): it applies
it, connects, and its microphone reaches the aiortc side. (The SDK's answers go to the SFU's
aiortc, ``tests/test_sdk_sdp.py``; this checks the compact form against Chromium's parser and
DTLS as well.)"""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCBundlePolicy, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from browser_harness import open_page
from playwright.async_api import Browser

from signaling.sdk.sdp import compact_answer

pytestmark = pytest.mark.asyncio(loop_scope="module")

OFFER = """async (n) => {
  const pc = new RTCPeerConnection({bundlePolicy: "max-bundle"});
  const stream = await navigator.mediaDevices.getUserMedia({audio: true});
  pc.addTrack(stream.getAudioTracks()[0], stream);
  for (let i = 0; i < n; i++) {
    pc.addTransceiver("audio", {direction: "sendonly"});
    pc.addTransceiver("video", {direction: "sendonly"});
  }
  await pc.setLocalDescription(await pc.createOffer());
  if (pc.iceGatheringState !== "complete") {
    await new Promise((resolve) => pc.addEventListener("icegatheringstatechange",
      () => pc.iceGatheringState === "complete" && resolve()));
  }
  window.pc = pc;
  return pc.localDescription.sdp;
}"""
APPLY = """async (answer) => {
  try {
    await window.pc.setRemoteDescription({type: "answer", sdp: answer});
  } catch (e) {
    return `refused: ${e}`;
  }
  for (let i = 0; i < 200 && window.pc.connectionState !== "connected"; i++) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return window.pc.connectionState;
}"""


async def test_chromium_applies_a_compact_answer_and_connects(browser: Browser) -> None:
    page = await open_page(browser)
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE))
    tracks: list[object] = []
    pc.on("track", tracks.append)
    try:
        offer = await page.evaluate(OFFER, 4)
        await pc.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await pc.setLocalDescription(await pc.createAnswer())
        assert pc.localDescription is not None
        answer = compact_answer(pc.localDescription.sdp)
        assert answer.count("a=fingerprint:") == answer.count("m=") == 9
        assert "a=msid:" not in answer and "a=ssrc" not in answer
        assert await page.evaluate(APPLY, answer) == "connected"
        async with asyncio.timeout(20):
            await tracks[0].recv()  # type: ignore[attr-defined]  # the microphone's audio
    finally:
        await pc.close()
        await page.close()
