"""``sfu.rtc.SenderReports`` between two real aiortc peers in this process: the SFU side's
senders (``NeverTrack``, packets sent by ``FastSender``) report on one timer per connection,
and the receiving peer gets their SRs together, answers with receiver reports the SFU side
measures the RTT from, and gets a BYE for each when the connection closes."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestServer
from aiortc import RTCPeerConnection, RTCRtpTransceiver
from aiortc.rtp import RtcpByePacket, RtcpPacket, RtcpSdesPacket, RtcpSrPacket
from sfu_helpers import Party, PartyFactory

from sfu.rtc import (
    FastSender,
    NeverTrack,
    SenderReports,
    SubscriberHooks,
    dtls_of,
    negotiated_codec,
    sender_ssrcs,
)

OPUS_SILENCE = b"\xf8\xff\xfe"  # one 20 ms Opus frame


async def negotiate(offerer: RTCPeerConnection, answerer: RTCPeerConnection) -> None:
    await offerer.setLocalDescription(await offerer.createOffer())
    await answerer.setRemoteDescription(offerer.localDescription)
    await answerer.setLocalDescription(await answerer.createAnswer())
    await offerer.setRemoteDescription(answerer.localDescription)


def record_rtcp(pc: RTCPeerConnection) -> list[list[Any]]:
    """Every compound RTCP packet ``pc``'s (bundled) DTLS transport takes in, parsed."""
    dtls = pc.getTransceivers()[0].receiver.transport
    seen: list[list[Any]] = []
    original = dtls._handle_rtcp_data

    async def handle(data: bytes) -> None:
        seen.append(RtcpPacket.parse(data))
        await original(data)

    dtls._handle_rtcp_data = handle  # type: ignore[method-assign]
    return seen


async def until(pred: Callable[[], bool | Awaitable[bool]], timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            result = pred()
            if result if isinstance(result, bool) else await result:
                return
            await asyncio.sleep(0.05)


async def test_one_compound_report_per_connection_rtt_and_bye() -> None:
    sfu, client = RTCPeerConnection(), RTCPeerConnection()
    trs: list[RTCRtpTransceiver] = [
        sfu.addTransceiver(NeverTrack("audio"), direction="sendonly") for _ in range(3)
    ]
    fast = FastSender(dtls_of(trs[0]))
    reports = SenderReports(fast.send_rtcp)
    for tr in trs:
        reports.attach(tr.sender)
    hooks = [
        SubscriberHooks(tr.sender, lambda lost: None, lambda: None, lambda bps: None) for tr in trs
    ]
    try:
        await negotiate(sfu, client)
        assert reports.senders == 0  # nothing reported before a sender starts
        seen = record_rtcp(client)
        await until(lambda: reports.senders == 3 and fast.ready, 10)
        ssrcs = [sender_ssrcs(tr.sender)[0] for tr in trs]
        _, pt, _ = negotiated_codec(trs[0])

        # The first reports, before any packet: zero counts (as aiortc's task sent them).
        await until(lambda: bool(seen), 5)
        first = seen[0]
        assert [p.ssrc for p in first if isinstance(p, RtcpSrPacket)] == ssrcs
        assert all(p.sender_info.packet_count == 0 for p in first if isinstance(p, RtcpSrPacket))

        # Media, and the publisher's mapping translated (what UpTrack.sender_report gives).
        for i in range(20):
            for k, ssrc in enumerate(ssrcs):
                fast.send_rtp(pt, 100 + i, 960 * i + k, ssrc, b"", OPUS_SILENCE)
        ntp = int((time.time() + 2208988800) * (1 << 32))
        for k, h in enumerate(hooks):
            h.set_sender_report(ntp + k, 960 * 19 + k, 20, 20 * len(OPUS_SILENCE))
        n = len(seen)
        await until(lambda: len(seen) > n, 5)
        compound = seen[-1]
        srs = [p for p in compound if isinstance(p, RtcpSrPacket)]
        assert [p.ssrc for p in srs] == ssrcs  # all three in one compound packet
        for k, sr in enumerate(srs):
            info = sr.sender_info
            assert (info.ntp_timestamp, info.rtp_timestamp) == (ntp + k, 960 * 19 + k)
            assert (info.packet_count, info.octet_count) == (20, 20 * len(OPUS_SILENCE))
        (sdes,) = [p for p in compound if isinstance(p, RtcpSdesPacket)]
        assert [c.ssrc for c in sdes.chunks] == ssrcs
        assert len({c.items[0][1] for c in sdes.chunks}) == 1  # the connection's CNAME
        # Every packet the receiver got holds all three SRs: no sender reports on its own.
        assert all(len([p for p in c if isinstance(p, RtcpSrPacket)]) == 3 for c in seen)

        # The receiver's reports name the last SR: the SFU side has an RTT for each sender.
        async def rtts() -> bool:
            for tr in trs:
                stats = await tr.sender.getStats()
                inbound = [s for s in stats.values() if s.type == "remote-inbound-rtp"]
                if not inbound or inbound[0].roundTripTime is None:
                    return False
                assert 0 <= inbound[0].roundTripTime < 1
            return True

        await until(rtts, 10)
    finally:
        await sfu.close()  # stop() returns: each sender's BYE, and the event it waits for
    assert reports.senders == 0
    try:
        await until(
            lambda: len([c for c in seen if c and isinstance(c[-1], RtcpByePacket)]) == 3, 5
        )
        byes = [c for c in seen if isinstance(c[-1], RtcpByePacket)]
        assert sorted(c[-1].sources[0] for c in byes) == sorted(ssrcs)
        assert all(isinstance(c[0], RtcpSrPacket) for c in byes)  # RFC 3550 6.1: a report first
    finally:
        fast.close()
        await client.close()


def record_media(pc: RTCPeerConnection, rtp: dict[int, dict[int, float]], rtcp: list[Any]) -> None:
    """What ``pc``'s (bundled) DTLS transport takes in: each SSRC's RTP timestamps with the
    arrival of their first packet, and every compound RTCP packet (parsed, with its arrival)."""
    dtls = pc.getTransceivers()[0].receiver.transport
    on_rtp, on_rtcp = dtls._handle_rtp_data, dtls._handle_rtcp_data

    async def handle_rtp(data: bytes, arrival_time_ms: int) -> None:
        ts, ssrc = struct.unpack_from("!LL", data, 4)
        rtp.setdefault(ssrc, {}).setdefault(ts, time.time())
        await on_rtp(data, arrival_time_ms)

    async def handle_rtcp(data: bytes) -> None:
        rtcp.append((time.time(), RtcpPacket.parse(data)))
        await on_rtcp(data)

    dtls._handle_rtp_data = handle_rtp  # type: ignore[method-assign]
    dtls._handle_rtcp_data = handle_rtcp  # type: ignore[method-assign]


async def test_a_subscriber_gets_translated_reports_for_each_stream(
    sfu_server: TestServer, party: PartyFactory
) -> None:
    """Two publishers' video and audio (aiortc senders, whose SRs map the last packet's
    timestamp to its send time) reach a third participant, whose every SR names the
    timestamp of a packet it received, at about the time it arrived: the publisher's mapping
    in the subscriber's timestamps, which is what keeps its audio and video in sync."""
    rtp: dict[int, dict[int, float]] = {}
    rtcp: list[tuple[float, list[Any]]] = []
    holder: list[Party] = []

    def on_track(tid: str, track: Any) -> None:
        sub = holder[0].media.sub
        if sub is not None and not holder[1:]:
            record_media(sub, rtp, rtcp)  # at the first offer, before the connection is up
            holder.append(holder[0])

    await party(sfu_server, "alice", n=1)
    await party(sfu_server, "bob", n=2)
    holder.append(await party(sfu_server, "carol", publish=False, on_track=on_track))
    carol = holder[0]

    def media_ssrcs() -> set[int]:  # the four streams, not their RTX (nothing lost here)
        return {ssrc for ssrc, seen in rtp.items() if len(seen) >= 20}

    def mapped() -> dict[int, list[tuple[float, int, int]]]:
        """Per SSRC: (NTP as Unix time, RTP timestamp, packet count) of its SRs that carry a
        publisher's mapping (before one, a stream's SR has NTP 0)."""
        out: dict[int, list[tuple[float, int, int]]] = {}
        for _, packets in rtcp:
            for p in packets:
                if isinstance(p, RtcpSrPacket) and p.sender_info.ntp_timestamp:
                    info = p.sender_info
                    unix = info.ntp_timestamp / (1 << 32) - 2208988800
                    out.setdefault(p.ssrc, []).append((unix, info.rtp_timestamp, info.packet_count))
        return out

    await until(lambda: len(media_ssrcs()) == 4 and mapped().keys() >= media_ssrcs(), 30)
    assert not carol.media.errors
    ssrcs = media_ssrcs()
    reported = {p.ssrc for _, ps in rtcp for p in ps if isinstance(p, RtcpSrPacket)}
    assert reported == ssrcs  # an SR for each stream, and for no other SSRC
    for ssrc in ssrcs:
        for unix, ts, count in mapped()[ssrc]:
            assert ts in rtp[ssrc], "an SR's timestamp is one the subscriber's packets carry"
            assert abs(unix - rtp[ssrc][ts]) < 1.0  # mapped to about when it arrived
            assert count > 0
    # Once all four streams report, they do so together: one compound packet per round.
    together = [
        ps for _, ps in rtcp if {p.ssrc for p in ps if isinstance(p, RtcpSrPacket)} == ssrcs
    ]
    assert together and together[-1] == rtcp[-1][1]
    sdes = [p for p in together[-1] if isinstance(p, RtcpSdesPacket)]
    assert len(sdes) == 1 and {c.ssrc for c in sdes[0].chunks} == ssrcs
