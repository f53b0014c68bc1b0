"""STUN/TURN wire format helpers on top of ``aioice.stun``.

``aioice.stun`` parses and packs the attributes it knows; this module adds what a
server needs: a header check that never raises on garbage, a scan of all attributes
(repeated XOR-PEER-ADDRESS, unknown comprehension-required types), a response builder
that can carry attributes aioice lacks, and the hand-written fast paths for Send
indications, Data indications and ChannelData (RFC 8656 sections 10-12).
"""

from __future__ import annotations

import struct
from typing import Final

from aioice import stun

COOKIE: Final = stun.COOKIE
HEADER_LENGTH: Final = stun.HEADER_LENGTH

# Message types (method | class bits), RFC 8489 section 5 and RFC 8656 section 18.
BINDING_REQUEST: Final = 0x0001
BINDING_INDICATION: Final = 0x0011
SEND_INDICATION: Final = 0x0016
DATA_INDICATION: Final = 0x0017

# Attribute types that aioice.stun does not know (RFC 8656 section 18, RFC 8489 section 18.3).
ATTR_UNKNOWN_ATTRIBUTES: Final = 0x000A
ATTR_XOR_PEER_ADDRESS: Final = 0x0012
ATTR_DATA: Final = 0x0013
ATTR_REQUESTED_ADDRESS_FAMILY: Final = 0x0017
ATTR_EVEN_PORT: Final = 0x0018
ATTR_DONT_FRAGMENT: Final = 0x001A
ATTR_RESERVATION_TOKEN: Final = 0x0022

# Comprehension-required attributes (type < 0x8000) this server understands; any other
# one in a request gets 420 Unknown Attribute (RFC 8489 section 6.3.1).
UNDERSTOOD_REQUIRED: Final = frozenset(
    {t for t in stun.ATTRIBUTES_BY_TYPE if t < 0x8000}
    | {
        ATTR_REQUESTED_ADDRESS_FAMILY,
        ATTR_EVEN_PORT,
        ATTR_DONT_FRAGMENT,
        ATTR_RESERVATION_TOKEN,
    }
)

# RFC 8656 section 12 narrowed channel numbers to 0x4000-0x4FFF, but RFC 5766 allowed
# 0x4000-0x7FFE and clients still use that range (turnutils_uclient, coturn accepts it).
CHANNEL_MIN: Final = 0x4000
CHANNEL_MAX: Final = 0x7FFE

# Relayed data from a peer is received at this offset of a scratch buffer, leaving room
# to write a Data indication header (20 + 12 XOR-PEER-ADDRESS + 4 DATA header) or a
# ChannelData header (4 bytes, at offset 32) in front of it without copying.
PEER_DATA_OFFSET: Final = 36
CHANNEL_HEADER_OFFSET: Final = 32

_HH = struct.Struct("!HH")
_HEADER = struct.Struct("!HHI12s")
_DATA_INDICATION = struct.Struct("!HHI12sHH8sHH")
_XOR_PORT = COOKIE >> 16

PAD = (b"", b"\x00\x00\x00", b"\x00\x00", b"\x00")  # PAD[n % 4] pads n to 4 bytes


def padding(length: int) -> int:
    """Bytes needed to pad ``length`` to a multiple of 4."""
    return -length & 3


class Header:
    """The fixed 20-byte STUN header, checked without raising (RFC 8489 section 5)."""

    __slots__ = ("length", "message_type", "transaction_id")

    def __init__(self, message_type: int, length: int, transaction_id: bytes) -> None:
        self.message_type = message_type
        self.length = length
        self.transaction_id = transaction_id

    @property
    def method(self) -> int:
        """The method bits (RFC 8489 section 5: M0-M11 interleaved with the class bits)."""
        return self.message_type & 0x3EEF

    @property
    def message_class(self) -> int:
        """The class bits: 0x000 request, 0x010 indication, 0x100 success, 0x110 error."""
        return self.message_type & 0x0110


def parse_header(data: bytes) -> Header | None:
    """The header of a STUN message, or None unless it is a well-formed STUN frame.

    Checks the two zero bits, the magic cookie, that the length is a multiple of 4 and
    matches the datagram (RFC 8489 section 5).
    """
    if len(data) < HEADER_LENGTH:
        return None
    message_type, length, cookie, transaction_id = _HEADER.unpack_from(data)
    if message_type & 0xC000 or cookie != COOKIE or length & 3:
        return None
    if len(data) != HEADER_LENGTH + length:
        return None
    return Header(message_type, length, transaction_id)


def scan_attributes(data: bytes) -> list[tuple[int, bytes]]:
    """All (type, value) attributes in order, including repeats; ValueError if truncated."""
    out: list[tuple[int, bytes]] = []
    pos = HEADER_LENGTH
    end = len(data)
    while pos < end:
        if pos + 4 > end:
            raise ValueError("truncated attribute header")
        attr_type, attr_len = _HH.unpack_from(data, pos)
        start = pos + 4
        if start + attr_len > end:
            raise ValueError("truncated attribute value")
        out.append((attr_type, data[start : start + attr_len]))
        pos = start + attr_len + padding(attr_len)
    return out


def decode_xor_address(value: bytes, transaction_id: bytes) -> tuple[str, int]:
    """Decode an XOR-*-ADDRESS value (RFC 8489 section 14.2); ValueError if malformed."""
    return stun.unpack_xor_address(value, transaction_id)


def xor_peer_value(peer: tuple[str, int]) -> bytes:
    """The 8-byte XOR-PEER-ADDRESS value of an IPv4 peer (family 1, XORed port and address)."""
    a, b, c, d = (int(x) for x in peer[0].split("."))
    return struct.pack(
        "!BBHBBBB", 0, 1, peer[1] ^ _XOR_PORT, a ^ 0x21, b ^ 0x12, c ^ 0xA4, d ^ 0x42
    )


def peer_from_xor_value(value: bytes) -> tuple[str, int] | None:
    """Inverse of :func:`xor_peer_value`; None for anything but an IPv4 address."""
    if len(value) != 8 or value[1] != 1:
        return None
    port = ((value[2] << 8) | value[3]) ^ _XOR_PORT
    ip = f"{value[4] ^ 0x21}.{value[5] ^ 0x12}.{value[6] ^ 0xA4}.{value[7] ^ 0x42}"
    return ip, port


def parse_send_indication(mv: memoryview, n: int) -> tuple[bytes, int, int] | None:
    """Locate XOR-PEER-ADDRESS and DATA in a Send indication (RFC 8656 section 10.2).

    Returns (raw 8-byte XOR-PEER-ADDRESS value, data start, data length), or None if the
    message is malformed or lacks either attribute. Does no other parsing: this runs
    once per relayed packet.
    """
    if n < HEADER_LENGTH or _HH.unpack_from(mv, 2)[0] + HEADER_LENGTH != n:
        return None
    peer = b""
    start = -1
    length = 0
    pos = HEADER_LENGTH
    unpack = _HH.unpack_from
    while pos + 4 <= n:
        attr_type, attr_len = unpack(mv, pos)
        value = pos + 4
        if value + attr_len > n:
            return None
        if attr_type == ATTR_XOR_PEER_ADDRESS:
            peer = bytes(mv[value : value + attr_len])
        elif attr_type == ATTR_DATA:
            start = value
            length = attr_len
        pos = value + attr_len + (-attr_len & 3)
    if start < 0 or len(peer) != 8:
        return None
    return peer, start, length


def pack_data_indication(
    buf: bytearray, transaction_id: bytes, xor_peer: bytes, length: int
) -> int:
    """Write a Data indication header in front of ``length`` bytes at PEER_DATA_OFFSET.

    Pads the data with zeros (RFC 8656 section 11.3) and returns the total message size.
    """
    pad = -length & 3
    _DATA_INDICATION.pack_into(
        buf,
        0,
        DATA_INDICATION,
        16 + length + pad,
        COOKIE,
        transaction_id,
        ATTR_XOR_PEER_ADDRESS,
        8,
        xor_peer,
        ATTR_DATA,
        length,
    )
    end = PEER_DATA_OFFSET + length
    if pad:
        buf[end : end + pad] = PAD[length & 3]
    return end + pad


def encode_attribute(attr_type: int, value: bytes) -> bytes:
    """One attribute with its header and padding."""
    return _HH.pack(attr_type, len(value)) + value + PAD[len(value) & 3]


def build_message(
    message_type: int,
    transaction_id: bytes,
    attributes: list[tuple[int, bytes]],
    key: bytes | None = None,
    fingerprint: bool = False,
) -> bytes:
    """Encode a message; MESSAGE-INTEGRITY with ``key`` and FINGERPRINT come last.

    ``attributes`` are already-packed (type, value) pairs; see :func:`pack`.
    """
    body = b"".join(encode_attribute(t, v) for t, v in attributes)
    data = _HEADER.pack(message_type, len(body), COOKIE, transaction_id) + body
    if key is not None:
        # RFC 8489 section 14.5: HMAC over the message with the length covering MI.
        data += encode_attribute(0x0008, stun.message_integrity(data, key))
    if fingerprint:
        # RFC 8489 section 14.7: CRC-32 of the message XOR 0x5354554E.
        data += encode_attribute(0x8028, struct.pack("!I", stun.message_fingerprint(data)))
    if key is not None or fingerprint:
        data = stun.set_body_length(data, len(data) - HEADER_LENGTH)
    return data


def pack(name: str, value: object, transaction_id: bytes) -> tuple[int, bytes]:
    """Pack an attribute aioice knows by name, e.g. ``pack("LIFETIME", 600, tid)``."""
    attr_type, _, packer, _ = stun.ATTRIBUTES_BY_NAME[name]
    if packer is stun.pack_xor_address:
        return attr_type, packer(value, transaction_id)
    return attr_type, packer(value)
