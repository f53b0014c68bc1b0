"""``signaling.sdk.sdp.compact_answer``: what it leaves out, what it keeps, and that aiortc (the
SFU's side) still connects and receives with the compact answer. Chromium's side:
``tests/browser/test_compact_answer_browser.py``."""

from __future__ import annotations

import asyncio

from aiortc import (
    RTCBundlePolicy,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import SessionDescription

from media.clip import ClipSpec, load_clip
from media.tracks import EncodedAudioTrack, EncodedVideoTrack
from signaling.sdk.sdp import compact_answer


def _config() -> RTCConfiguration:
    return RTCConfiguration(iceServers=[], bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


def _sections(sdp: str) -> list[list[str]]:
    out: list[list[str]] = [[]]
    for line in sdp.splitlines():
        if line.startswith("m="):
            out.append([])
        out[-1].append(line)
    return out


async def test_compact_answer_keeps_what_the_offerer_needs_and_media_flows() -> None:
    """The SFU's side of a subscriber connection (sends video and audio) with the client's
    answer compacted: about half as long, and the connection carries both tracks."""
    clip = load_clip(ClipSpec(publisher_id=3, seconds=2))
    server, client = RTCPeerConnection(_config()), RTCPeerConnection(_config())
    received: list[object] = []
    client.on("track", received.append)
    try:
        for track in (EncodedVideoTrack(clip), EncodedAudioTrack(clip)):
            server.addTransceiver(track, direction="sendonly")
        server.addTransceiver("audio", direction="sendrecv")
        await server.setLocalDescription(await server.createOffer())
        assert server.localDescription is not None
        offer = server.localDescription.sdp
        await client.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        back = next(tr for tr in client.getTransceivers() if tr.mid == "2")
        back.sender.replaceTrack(EncodedAudioTrack(clip))
        back.direction = "sendrecv"  # a section the client sends in too
        await client.setLocalDescription(await client.createAnswer())
        assert client.localDescription is not None
        answer = client.localDescription.sdp
        compact = compact_answer(answer)
        assert len(compact) < 0.65 * len(answer)

        full, short = _sections(answer), _sections(compact)
        assert short[0] == [ln for ln in full[0] if ln]  # the session part as it was
        for before, after in zip(full[1:], short[1:], strict=True):
            fingerprints = [ln for ln in after if ln.startswith("a=fingerprint:")]
            assert len(fingerprints) == 1 and fingerprints[0].startswith("a=fingerprint:sha-256 ")
            sends = "a=sendrecv" in before or "a=sendonly" in before
            for ln in before:
                if not ln:
                    continue
                dropped = ln.startswith(
                    ("a=fingerprint:sha-384", "a=fingerprint:sha-512", "a=rtcp:")
                ) or (not sends and ln.startswith(("a=msid:", "a=ssrc:", "a=ssrc-group:")))
                assert (ln not in after) == dropped, ln
        # What the remote side uses is unchanged, section by section.
        parsed_full, parsed_short = (SessionDescription.parse(s) for s in (answer, compact))
        for m, c in zip(parsed_full.media, parsed_short.media, strict=True):
            assert (c.rtp.muxId, c.direction, c.kind) == (m.rtp.muxId, m.direction, m.kind)
            assert [x.name for x in c.rtp.codecs] == [x.name for x in m.rtp.codecs]
            assert c.rtp.headerExtensions == m.rtp.headerExtensions
            assert c.ice_candidates == m.ice_candidates and c.ice_candidates_complete
            assert (c.ice.usernameFragment, c.ice.password) == (
                m.ice.usernameFragment,
                m.ice.password,
            )
            assert c.dtls.role == m.dtls.role and c.rtcp_mux
        sending = next(m for m in parsed_short.media if m.direction == "sendrecv")
        assert sending.ssrc and sending.msid  # a section that sends keeps its streams

        await server.setRemoteDescription(RTCSessionDescription(compact, "answer"))
        async with asyncio.timeout(20):
            while server.connectionState != "connected":
                await asyncio.sleep(0.05)
            assert len(received) == 3
            for track in received[:2]:
                await track.recv()  # type: ignore[attr-defined]  # decrypted and decoded
    finally:
        await client.close()
        await server.close()


def test_compact_answer_edge_cases() -> None:
    """Only SHA-256 makes the others go; lines ends are CRLF; nothing else is touched."""
    no_sha256 = (
        "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=recvonly\r\na=mid:0\r\n"
        "a=rtcp:9 IN IP4 0.0.0.0\r\n"  # no rtcp-mux: kept
        "a=fingerprint:sha-384 AA\r\na=fingerprint:sha-512 BB\r\na=setup:active\r\n"
    )
    assert compact_answer(no_sha256) == no_sha256
    session_level = (
        "v=0\n"
        "a=fingerprint:SHA-256 AA\na=fingerprint:sha-512 BB\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\na=inactive\na=mid:0\na=rtcp-mux\n"
        "a=rtcp:9 IN IP4 0.0.0.0\na=msid:s t\na=ssrc:1 cname:x\n"
    )
    assert compact_answer(session_level) == (
        "v=0\r\na=fingerprint:SHA-256 AA\r\n"
        "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=inactive\r\na=mid:0\r\na=rtcp-mux\r\n"
    )
