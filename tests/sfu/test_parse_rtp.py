"""``sfu.rtc.parse_rtp`` reads packets exactly as aiortc's ``RtpPacket.parse`` does."""

from __future__ import annotations

import random
import struct

import pytest
from aiortc import RTCRtpHeaderExtensionParameters, RTCRtpParameters
from aiortc.rtp import HeaderExtensionsMap, RtpPacket

from sfu.rtc import parse_rtp

URIS = {
    1: "urn:ietf:params:rtp-hdrext:sdes:mid",
    2: "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    3: "http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time",
    4: "urn:ietf:params:rtp-hdrext:toffset",
    5: "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01",
    10: "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id",
    11: "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id",
}


def extensions_map(ids: dict[int, str]) -> HeaderExtensionsMap:
    m = HeaderExtensionsMap()
    m.configure(
        RTCRtpParameters(
            headerExtensions=[RTCRtpHeaderExtensionParameters(id=i, uri=u) for i, u in ids.items()]
        )
    )
    return m


def fields(p: RtpPacket) -> dict[str, object]:
    return {**vars(p), "extensions": vars(p.extensions)}


def same(data: bytes, m: HeaderExtensionsMap) -> None:
    try:
        want: object = fields(RtpPacket.parse(data, m))
    except (ValueError, struct.error):  # an extension of the wrong length: ours, ValueError
        want = ValueError
    try:
        have: object = fields(parse_rtp(data, m))
    except ValueError:
        have = ValueError
    assert have == want, data.hex()


def one_byte(elements: list[tuple[int, bytes]], pad: int = 0) -> bytes:
    body = b"".join(bytes(((i << 4) | (len(v) - 1),)) + v for i, v in elements) + b"\0" * pad
    body += b"\0" * (-len(body) % 4)
    return b"\xbe\xde" + struct.pack("!H", len(body) // 4) + body


def packet(
    *, marker: int = 0, cc: int = 0, ext: bytes = b"", padding: int = 0, payload: bytes = b"xy"
) -> bytes:
    b0 = 0x80 | (0x20 if padding else 0) | (0x10 if ext else 0) | cc
    head = struct.pack("!BBHII", b0, (marker << 7) | 96, 4242, 90000, 0x1234ABCD)
    csrc = b"".join(struct.pack("!I", 1000 + i) for i in range(cc))
    pad = (b"\0" * (padding - 1) + bytes((padding,))) if padding else b""
    return head + csrc + ext + payload + pad


M = extensions_map(URIS)


@pytest.mark.parametrize(
    "data",
    [
        packet(),
        packet(marker=1, payload=b""),
        packet(cc=2),
        packet(padding=3),
        packet(ext=one_byte([(1, b"0"), (3, b"\x01\x02\x03")])),
        packet(ext=one_byte([(2, b"\x9f")], pad=2), marker=1),
        packet(ext=one_byte([(10, b"hi"), (11, b"lo"), (5, b"\x00\x07")])),
        packet(ext=one_byte([(4, b"\xff\xff\xfe"), (7, b"unknown")]), cc=1, padding=1),
        packet(ext=one_byte([(1, b"video-1"), (2, b"\x05"), (3, b"\xaa\xbb\xcc")])),
        # two-byte header elements: aiortc's parser
        packet(ext=b"\x10\x00\x00\x02" + b"\x01\x02ab" + b"\x03\x03\x01\x02\x03\x00"),
    ],
)
def test_valid_packets_parse_the_same(data: bytes) -> None:
    same(data, M)
    same(data, extensions_map({}))  # nothing negotiated: no extension is read


@pytest.mark.parametrize(
    "data",
    [
        b"",
        packet()[:11],
        b"\x40" + packet()[1:],  # version 1
        packet(cc=3)[:20],  # truncated CSRC
        packet(ext=one_byte([(1, b"0")]))[:14],  # truncated extension header
        packet(ext=one_byte([(1, b"0")]), payload=b"")[:-1],  # truncated extension value
        packet(ext=b"\xbe\xde\x00\x01" + b"\x13ab\x00"),  # element longer than the block
        packet(ext=one_byte([(3, b"\x01\x02")])),  # abs-send-time of 2 bytes
        packet(ext=one_byte([(2, b"\x01\x02")])),  # audio level of 2 bytes
        packet(ext=one_byte([(1, b"\xff")])),  # MID not UTF-8
        packet(padding=5)[:-1] + b"\x00",  # padding length 0
        packet(padding=5)[:-1] + b"\x40",  # padding longer than the packet
    ],
)
def test_malformed_packets_are_refused_as_aiortc_refuses_them(data: bytes) -> None:
    same(data, M)


def test_random_packets_parse_the_same() -> None:
    rng = random.Random(7)
    ids = [*URIS, 6, 7, 12, 14]
    for _ in range(2000):
        elements = [
            (rng.choice(ids), rng.randbytes(rng.choice((1, 2, 3, 4, 16))))
            for _ in range(rng.randrange(4))
        ]
        data = packet(
            marker=rng.randrange(2),
            cc=rng.randrange(3),
            ext=one_byte(elements, pad=rng.randrange(3)) if elements else b"",
            padding=rng.randrange(4),
            payload=rng.randbytes(rng.randrange(40)),
        )
        if rng.random() < 0.2:  # corrupt a byte or cut the packet
            i = rng.randrange(len(data))
            data = (
                data[:i] + bytes((rng.randrange(256),)) + data[i + 1 :]
                if rng.random() < 0.5
                else data[:i]
            )
        same(data, M)
