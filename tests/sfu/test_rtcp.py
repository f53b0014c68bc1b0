"""``sfu.rtcp``: the sender reports, CNAME chunks and BYEs the SFU sends, read back by aiortc's
own RTCP parser (and compared with its serializer)."""

from __future__ import annotations

import uuid

import pytest
from aiortc.rtp import (
    RtcpByePacket,
    RtcpPacket,
    RtcpSdesPacket,
    RtcpSenderInfo,
    RtcpSourceInfo,
    RtcpSrPacket,
)

from sfu import rtcp

NTP = (3_900_000_123 << 32) | 0x89ABCDEF


def streams(n: int) -> list[tuple[int, str, int, int, int, int]]:
    """``n`` streams as (ssrc, cname, ntp, rtp_ts, packets, octets); aiortc's CNAMEs are
    UUIDs (36 characters), one per connection."""
    cname = str(uuid.UUID(int=12345))
    return [
        (0x10000000 + i, cname, NTP + i, (1 << 32) - 1 - i, 1000 * i + 7, 1_000_000 * i + 3)
        for i in range(n)
    ]


def reports(n: int) -> list[tuple[bytes, bytes]]:
    return [
        (rtcp.sender_report(ssrc, ntp, ts, pk, oc), rtcp.cname_chunk(ssrc, cname))
        for ssrc, cname, ntp, ts, pk, oc in streams(n)
    ]


def test_several_srs_and_one_sdes_read_back_field_by_field() -> None:
    (packet,) = rtcp.compound(reports(5))
    parsed = RtcpPacket.parse(packet)
    assert [type(p) for p in parsed] == [RtcpSrPacket] * 5 + [RtcpSdesPacket]
    for sr, (ssrc, _, ntp, ts, pk, oc) in zip(parsed[:5], streams(5), strict=True):
        assert isinstance(sr, RtcpSrPacket)
        assert sr.ssrc == ssrc
        assert sr.reports == []
        assert sr.sender_info == RtcpSenderInfo(
            ntp_timestamp=ntp, rtp_timestamp=ts, packet_count=pk, octet_count=oc
        )
    sdes = parsed[5]
    assert isinstance(sdes, RtcpSdesPacket)
    assert sdes.chunks == [
        RtcpSourceInfo(ssrc=ssrc, items=[(1, cname.encode())]) for ssrc, cname, *_ in streams(5)
    ]
    # Byte for byte what aiortc's own classes build.
    assert packet == b"".join(bytes(p) for p in parsed)


def test_counts_and_timestamps_wrap_at_32_bits() -> None:
    sr = rtcp.sender_report(1, NTP, (1 << 32) + 5, (1 << 32) + 6, (1 << 33) + 7)
    (parsed,) = RtcpPacket.parse(sr)
    assert isinstance(parsed, RtcpSrPacket)
    info = parsed.sender_info
    assert (info.ntp_timestamp, info.rtp_timestamp) == (NTP, 5)
    assert (info.packet_count, info.octet_count) == (6, 7)


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 36, 255])
def test_a_chunk_ends_its_items_and_pads_to_32_bits(length: int) -> None:
    """RFC 3550 section 6.5: one to four null octets after the last item."""
    chunk = rtcp.cname_chunk(7, "c" * length)
    assert len(chunk) % 4 == 0
    assert chunk[:6] == bytes([0, 0, 0, 7, 1, length])
    assert chunk[6 : 6 + length] == b"c" * length
    tail = chunk[6 + length :]
    assert 1 <= len(tail) <= 4 and tail == bytes(len(tail))
    # Alone in an SDES, aiortc reads it back (its parser is right only for a two-octet
    # ending between chunks, which its UUID CNAMEs always have).
    (sdes,) = RtcpPacket.parse(rtcp.compound([(rtcp.sender_report(7, 0, 0, 0, 0), chunk)])[0])[1:]
    assert isinstance(sdes, RtcpSdesPacket)
    assert sdes.chunks == [RtcpSourceInfo(ssrc=7, items=[(1, b"c" * length)])]


def test_a_cname_over_255_bytes_is_refused() -> None:
    with pytest.raises(ValueError):
        rtcp.cname_chunk(1, "x" * 256)


def test_split_at_the_size_limit_keeps_every_report_once_and_in_order() -> None:
    # 28 + 44 bytes a stream and 4 for the SDES header: 16 streams are 1,156 bytes, 17 would
    # be 1,228 (> 1,200).
    packets = rtcp.compound(reports(48))
    assert [len(p) for p in packets] == [4 + 16 * 72] * 3
    seen: list[int] = []
    for packet in packets:
        assert len(packet) <= rtcp.MAX_COMPOUND
        parsed = RtcpPacket.parse(packet)
        assert isinstance(parsed[0], RtcpSrPacket)  # RFC 3550 6.1: a report first
        srs = [p.ssrc for p in parsed if isinstance(p, RtcpSrPacket)]
        sdes = parsed[-1]
        assert isinstance(sdes, RtcpSdesPacket)
        assert [c.ssrc for c in sdes.chunks] == srs  # each packet names its own sources
        seen += srs
    assert seen == [s[0] for s in streams(48)]
    # One byte less and the 16th goes to the next packet.
    assert [len(p) for p in rtcp.compound(reports(16), limit=4 + 16 * 72 - 1)] == [
        4 + 15 * 72,
        4 + 72,
    ]
    # Exactly at the limit: one packet.
    assert len(rtcp.compound(reports(16), limit=4 + 16 * 72)) == 1


def test_at_most_31_chunks_in_an_sdes() -> None:
    small = [(rtcp.sender_report(i, 0, 0, 0, 0), rtcp.cname_chunk(i, "")) for i in range(40)]
    packets = rtcp.compound(small, limit=10_000)
    assert [sum(isinstance(p, RtcpSrPacket) for p in RtcpPacket.parse(x)) for x in packets] == [
        31,
        9,
    ]


def test_reports_without_a_cname_have_no_sdes() -> None:
    (packet,) = rtcp.compound([(rtcp.sender_report(i, 0, 0, 0, 0), b"") for i in range(3)])
    assert [type(p) for p in RtcpPacket.parse(packet)] == [RtcpSrPacket] * 3
    assert rtcp.compound([]) == []


def test_goodbye_is_a_report_its_cname_and_a_bye() -> None:
    (sr, chunk), *_ = reports(1)
    parsed = RtcpPacket.parse(rtcp.goodbye(sr, chunk, 0x10000000))
    assert [type(p) for p in parsed] == [RtcpSrPacket, RtcpSdesPacket, RtcpByePacket]
    bye = parsed[2]
    assert isinstance(bye, RtcpByePacket)
    assert bye.sources == [0x10000000]
    assert bytes(bye) == rtcp.bye(0x10000000)
