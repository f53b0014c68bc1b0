"""RTCP sender reports, source descriptions and goodbyes as bytes (RFC 3550 section 6). Pure; no
I/O, no aiortc.

A subscriber connection carries one RTP stream per track it receives, and each needs its sender
reports (the NTP/RTP timestamp mapping receivers sync audio and video with). Built here with
``struct`` for all the connection's streams at once: the SRs, then one SDES with their CNAME
chunks, in compound packets of at most ``MAX_COMPOUND`` bytes (RFC 3550 section 6.1 and RFC
8108 section 5.4.1 allow several SRs in one compound packet; section 6.1 wants it to start with
an SR or RR and carry the CNAME).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

RTCP_SR: Final = 200
RTCP_SDES: Final = 202
RTCP_BYE: Final = 203
SDES_CNAME: Final = 1

# Under a 1,280-byte IPv6 MTU with UDP, SRTCP's trailer (index and tag: up to 20 bytes) and
# a TURN channel header: no compound packet of ours is ever fragmented.
MAX_COMPOUND: Final = 1200
# An SDES header counts its chunks in 5 bits (RFC 3550 section 6.5).
MAX_CHUNKS: Final = 31

_HEADER: Final = struct.Struct("!BBH")
# Header, SSRC and sender info (NTP seconds and fraction, RTP timestamp, packet and octet
# counts), no report blocks: 28 bytes, length 6 words (RFC 3550 section 6.4.1).
_SR: Final = struct.Struct("!BBH6L")
_BYE: Final = struct.Struct("!BBHL")
_CHUNK: Final = struct.Struct("!LBB")
_U32: Final = 0xFFFFFFFF


def sender_report(ssrc: int, ntp: int, rtp_ts: int, packets: int, octets: int) -> bytes:
    """One SR without report blocks (the SFU receives nothing on a subscriber connection).
    ``ntp`` is 64-bit NTP time; the counts wrap at 32 bits as RFC 3550 says."""
    return _SR.pack(
        0x80,
        RTCP_SR,
        6,
        ssrc,
        (ntp >> 32) & _U32,
        ntp & _U32,
        rtp_ts & _U32,
        packets & _U32,
        octets & _U32,
    )


def cname_chunk(ssrc: int, cname: str) -> bytes:
    """One SDES chunk: ``ssrc``, its CNAME item, and the null octets that end the item list
    and pad the chunk to 32 bits (one to four; RFC 3550 section 6.5)."""
    value = cname.encode("utf8")
    if len(value) > 255:
        raise ValueError("CNAME is longer than 255 bytes")
    n = _CHUNK.size + len(value)
    return _CHUNK.pack(ssrc, SDES_CNAME, len(value)) + value + bytes(4 - n % 4)


def bye(ssrc: int) -> bytes:
    """A BYE for one source, without a reason (RFC 3550 section 6.6)."""
    return _BYE.pack(0x81, RTCP_BYE, 1, ssrc)


def _sdes(chunks: list[bytes]) -> bytes:
    size = sum(map(len, chunks))
    return _HEADER.pack(0x80 | len(chunks), RTCP_SDES, size // 4) + b"".join(chunks)


def compound(reports: Iterable[tuple[bytes, bytes]], limit: int = MAX_COMPOUND) -> list[bytes]:
    """``(sender_report, cname_chunk)`` pairs (a chunk may be empty: no CNAME) as compound
    packets: each its SRs, then one SDES with their chunks, at most ``limit`` bytes (a pair
    that is alone larger goes alone) and ``MAX_CHUNKS`` chunks."""
    out: list[bytes] = []
    srs: list[bytes] = []
    chunks: list[bytes] = []
    size = 0
    for sr, chunk in reports:
        header = _HEADER.size if chunk and not chunks else 0  # the SDES's, with its first chunk
        if srs and (
            size + len(sr) + len(chunk) + header > limit or (chunk and len(chunks) == MAX_CHUNKS)
        ):
            out.append(b"".join(srs) + (_sdes(chunks) if chunks else b""))
            srs, chunks, size = [], [], 0
            header = _HEADER.size if chunk else 0
        srs.append(sr)
        if chunk:
            chunks.append(chunk)
        size += len(sr) + len(chunk) + header
    if srs:
        out.append(b"".join(srs) + (_sdes(chunks) if chunks else b""))
    return out


def goodbye(sr: bytes, chunk: bytes, ssrc: int) -> bytes:
    """The last compound packet of a stream that stops: its SR, its CNAME and a BYE (RFC 3550
    sections 6.1, 6.6: a BYE goes in a compound packet that starts with a report)."""
    return sr + (_sdes([chunk]) if chunk else b"") + bye(ssrc)
