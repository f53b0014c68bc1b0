"""A hooked publisher receiver on a real negotiated aiortc pair: packets are forwarded, and the
publisher still gets what aiortc's receiver would send it (REMB, capped; NACKs, with RTX
repairs taken into account; receiver reports), but nothing is depayloaded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpTransceiver
from aiortc.rtp import RtpPacket
from sfu_helpers import until

from sfu.rtc import (
    NeverTrack,
    PublisherHooks,
    SubscriberHooks,
    negotiated_codec,
    sender_ssrcs,
)

VP8_PAYLOAD = b"\x10" + bytes(range(200)) * 5  # descriptor (start of partition) + 1,000 bytes


@dataclass
class Upstream:
    """What the publisher's sender got back from the SFU side."""

    nacks: list[list[int]] = field(default_factory=list)
    rembs: list[int] = field(default_factory=list)
    keyframes: int = 0


@dataclass
class Pair:
    publisher: RTCPeerConnection
    sfu: RTCPeerConnection
    sending: RTCRtpTransceiver
    receiving: RTCRtpTransceiver
    hooks: PublisherHooks
    forwarded: list[tuple[int, bytes]]
    upstream: Upstream


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    """A publisher with a video sender that never sends by itself (the test feeds the SFU side's
    receiver), and the SFU side with PublisherHooks on its receiver, as sfu.room sets them up."""
    cfg = RTCConfiguration(iceServers=[])
    publisher, sfu = RTCPeerConnection(cfg), RTCPeerConnection(cfg)
    try:
        sending = publisher.addTransceiver(NeverTrack("video"), direction="sendonly")
        await publisher.setLocalDescription(await publisher.createOffer())
        await sfu.setRemoteDescription(publisher.localDescription)
        await sfu.setLocalDescription(await sfu.createAnswer())
        (receiving,) = sfu.getTransceivers()
        forwarded: list[tuple[int, bytes]] = []
        hooks = PublisherHooks(
            receiving.receiver,
            lambda seq, ts, marker, payload, abs_ts, level: forwarded.append((seq, payload)),
            lambda ntp, rtp_ts: None,
            lambda: None,
        )
        await publisher.setRemoteDescription(sfu.localDescription)
        up = Upstream()

        def keyframe() -> None:
            up.keyframes += 1

        SubscriberHooks(sending.sender, up.nacks.append, keyframe, up.rembs.append)
        # receive() has run (and with it the hooks' own set-up) once the codecs are known.
        codecs = receiving.receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
        await until(lambda: bool(codecs) and sending.sender.transport.state == "connected", 20)
        yield Pair(publisher, sfu, sending, receiving, hooks, forwarded, up)
    finally:
        await publisher.close()
        await sfu.close()


def _packet(pt: int, ssrc: int, seq: int, ms: int, payload: bytes) -> RtpPacket:
    p = RtpPacket(payload_type=pt, sequence_number=seq, timestamp=ms * 90, ssrc=ssrc)
    p.payload = payload
    p.extensions.abs_send_time = (ms << 18) // 1000 & 0xFFFFFF  # 6.18 fixed-point seconds
    return p


async def test_forwarded_packets_are_accounted_but_not_depayloaded(pair: Pair) -> None:
    _, pt, rtx_pt = negotiated_codec(pair.receiving)
    assert rtx_pt is not None
    ssrc, rtx_ssrc = sender_ssrcs(pair.sending.sender)
    handle = pair.receiving.receiver._handle_rtp_packet
    pair.hooks.remb_cap = 50_000  # what the subscribers could take
    lost = {1100, 1101, 1150}
    fed: list[RtpPacket] = []
    sent: list[int] = []  # original sequence numbers, in the order fed
    for i, seq in enumerate(range(1000, 1500)):
        # 1,000 bytes per 10 ms: 800 kbps for 5 s (aiortc's estimator waits 3 s before its first)
        ms = 10 * i
        if seq == 1105:  # 1100 repaired (1101 never is)
            rtx = _packet(rtx_pt, rtx_ssrc, 9000, ms, (1100).to_bytes(2, "big") + VP8_PAYLOAD)
            fed.append(rtx)
            sent.append(1100)
            await handle(rtx, ms)
        if seq not in lost:
            p = _packet(pt, ssrc, seq, ms, VP8_PAYLOAD)
            fed.append(p)
            sent.append(seq)
            await handle(p, ms)

    # Forwarded: every media packet, and the repair with its original number and payload.
    assert [s for s, _ in pair.forwarded] == sent
    assert {payload for _, payload in pair.forwarded} == {VP8_PAYLOAD}
    # Not depayloaded (aiortc's handler stores the depayloaded frame data on each packet).
    assert not any(hasattr(p, "_data") for p in fed)

    # NACKs went upstream; the second one no longer asks for the repaired 1100.
    await until(lambda: len(pair.upstream.nacks) >= 2, 10)
    assert pair.upstream.nacks == [[1100, 1101], [1101, 1150]]
    # The bandwidth estimate went upstream, capped at the subscribers' estimate.
    await until(lambda: bool(pair.upstream.rembs), 10)
    assert max(pair.upstream.rembs) <= 50_000
    # Receiver reports carry the statistics: the publisher sees its 3 lost packets.
    assert pair.hooks.media_ssrc == ssrc

    async def remote_lost() -> int | None:
        stats = await pair.sending.sender.getStats()
        remote = [s for s in stats.values() if s.type == "remote-inbound-rtp"]
        return remote[0].packetsLost if remote else None

    async with asyncio.timeout(10):  # receiver reports go out every 0.5-1.5 s
        while await remote_lost() != 3:
            await asyncio.sleep(0.1)
