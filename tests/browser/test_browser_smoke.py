"""The harness works here: two Chromium pages call each other, signaling relayed by Python."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from browser_harness import launch_chromium, open_page
from playwright.async_api import Browser, Page

from media.marker import MARKER_HEIGHT, read_marker
from media.y4m import write_y4m

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Non-trickle peer: each side waits for ICE gathering, so one offer and one answer suffice.
PEER_PAGE = """<!doctype html><html><body><video id="remote" autoplay muted playsinline></video>
<script>
const pc = new RTCPeerConnection({iceServers: []});
pc.ontrack = (e) => {
  if (e.track.kind === "video") document.getElementById("remote").srcObject = e.streams[0];
};
async function gathered() {
  if (pc.iceGatheringState === "complete") return;
  await new Promise((resolve) => pc.addEventListener("icegatheringstatechange",
    () => pc.iceGatheringState === "complete" && resolve()));
}
window.offer = async () => {
  const stream = await navigator.mediaDevices.getUserMedia(
    {video: {width: 640, height: 480, frameRate: 30}, audio: true});
  for (const track of stream.getTracks()) {
    const sender = pc.addTrack(track, stream);
    if (track.kind === "video") {
      // Keep 640x480 when this 2-core machine is busy: drop frame rate, not resolution.
      const params = sender.getParameters();
      params.degradationPreference = "maintain-resolution";
      await sender.setParameters(params).catch((e) => console.log(`setParameters: ${e}`));
    }
  }
  await pc.setLocalDescription();
  await gathered();
  return pc.localDescription.toJSON();
};
window.answer = async (offer) => {
  await pc.setRemoteDescription(offer);
  await pc.setLocalDescription();
  await gathered();
  return pc.localDescription.toJSON();
};
window.accept = (answer) => pc.setRemoteDescription(answer);
window.inboundVideo = async () => {
  for (const r of (await pc.getStats()).values())
    if (r.type === "inbound-rtp" && r.kind === "video")
      return {framesDecoded: r.framesDecoded || 0, width: r.frameWidth || 0,
              height: r.frameHeight || 0};
  return {framesDecoded: 0, width: 0, height: 0};
};
// Luma (BT.601) of the top rows of the received picture, scaled to the clip's size
// (the sender may have scaled it down), for reading the frame marker.
window.topLuma = (width, height, rows) => {
  const video = document.getElementById("remote");
  const canvas = document.createElement("canvas");
  canvas.width = width; canvas.height = rows;
  const ctx = canvas.getContext("2d");
  const sourceRows = video.videoHeight * rows / height;
  ctx.drawImage(video, 0, 0, video.videoWidth, sourceRows, 0, 0, width, rows);
  const rgba = ctx.getImageData(0, 0, width, rows).data;
  const luma = new Array(rgba.length / 4);
  for (let i = 0; i < luma.length; i++)
    luma[i] = Math.round(0.299 * rgba[4 * i] + 0.587 * rgba[4 * i + 1] + 0.114 * rgba[4 * i + 2]);
  return luma;
};
</script></body></html>"""


async def call(browser: Browser) -> tuple[Page, Page]:
    """Page ``caller`` sends its camera and microphone to page ``callee``."""
    caller = await open_page(browser, PEER_PAGE, "/caller")
    callee = await open_page(browser, PEER_PAGE, "/callee")
    async with asyncio.timeout(15):
        offer = await caller.evaluate("offer()")
        answer = await callee.evaluate("(o) => answer(o)", offer)
        await caller.evaluate("(a) => accept(a)", answer)
    return caller, callee


async def wait_for_decoded(page: Page, frames: int, timeout: float) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    async with asyncio.timeout(timeout):
        while True:
            stats = await page.evaluate("inboundVideo()")
            if stats["framesDecoded"] >= frames:
                return stats
            await asyncio.sleep(0.1)


async def test_fake_camera_loopback_decodes_frames(browser: Browser) -> None:
    caller, callee = await call(browser)
    first = await wait_for_decoded(callee, 10, timeout=10)
    later = await wait_for_decoded(callee, first["framesDecoded"] + 30, timeout=5)
    assert later["framesDecoded"] > first["framesDecoded"]
    await caller.context.close()
    await callee.context.close()


async def test_y4m_camera_arrives_with_its_marker(tmp_path: Path) -> None:
    y4m = write_y4m(tmp_path / "publisher5.y4m", publisher_id=5, seconds=1.0)
    async with launch_chromium(video_file=y4m) as browser:
        _, callee = await call(browser)
        stats = await wait_for_decoded(callee, 30, timeout=10)
        assert (stats["width"], stats["height"]) == (640, 480)
        # The received picture is our clip: read the marker back (from any frame of it).
        marker = None
        async with asyncio.timeout(10):
            while marker is None:
                await asyncio.sleep(0.1)
                luma = await callee.evaluate(f"topLuma(640, 480, {MARKER_HEIGHT})")
                marker = read_marker(bytes(luma), 640, 640)
        assert marker.publisher_id == 5 and marker.frame_count == 30
