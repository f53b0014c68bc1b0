"""The two encodings of the wire: JSON (text frames, the default) and MessagePack (binary
frames), chosen per connection with the ``Sec-WebSocket-Protocol`` header (RFC 6455 section
1.9 and 4.2.2: the server selects one of the subprotocols the client offers).

Both carry the same messages, validated by the same ``Protocol``. A MessagePack frame holds one
map with the keys and values the JSON object would have, restricted to JSON's data model: string
keys; nil, booleans, integers, finite floats, strings, arrays and maps; no bin or ext values
(timestamps included), nothing after the value. ``unpack`` refuses the rest as ``bad_msgpack``.

The server's core encodes each message once, as a JSON frame, for every recipient (the bus
carries bytes); a MessagePack connection's outbox converts it (``Transcoder``), once per message
however many MessagePack connections receive it. The converter packs the message itself when the
frame is the last one ``framing.encode_fresh`` made (the fan-outs of chat messages, typing and
presence: what most frames are), and parses the frame back otherwise (and for frames that came
through a bus from another server), so the JSON path pays next to nothing for this.
"""

from __future__ import annotations

import math
from typing import Any, Final

import msgpack
import orjson

from .errors import ProtocolError
from .framing import binary_frame, last_fresh

#: The subprotocol names a client may offer; without one the connection speaks JSON.
JSON: Final = "rallypoint.json"
MSGPACK: Final = "rallypoint.msgpack"
SUBPROTOCOLS: Final = (MSGPACK, JSON)


def bad_msgpack() -> ProtocolError:
    """The error for a frame that is not one MessagePack value in JSON's data model."""
    return ProtocolError(
        "bad_msgpack",
        "the frame is not one MessagePack value in JSON's data model (string keys; no bin, "
        "ext or non-finite values; nothing after the value)",
    )


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError("ext types are not part of the protocol")


def unpack(data: bytes) -> Any:
    """Decode one MessagePack value; raise ``bad_msgpack`` if it is not one.

    Declared lengths are bounded by the frame (``unpackb`` checks every str, array and map
    length against the bytes it was given, so a frame cannot make it allocate more than the
    frame could hold); nesting is bounded by msgpack's stack (1,024 levels, like orjson's
    depth limit). Non-empty bin and every ext (timestamps included) fail here; an empty bin,
    non-string keys nested below the top level and non-finite floats are caught by
    ``is_plain`` when the validator looks at the value.
    """
    try:
        return msgpack.unpackb(
            data, max_bin_len=0, max_ext_len=0, ext_hook=_refuse_ext, strict_map_key=True
        )
    except ValueError:  # every unpacking failure (ExtraData, FormatError, StackError too)
        raise bad_msgpack() from None


def is_plain(value: Any) -> bool:
    """Whether ``value`` (decoded MessagePack) is in JSON's data model: what ``orjson.loads``
    could have returned. Iterative, so deep nesting cannot exhaust Python's stack."""
    stack = [value]
    pop = stack.pop
    while stack:
        v = pop()
        t = type(v)
        if t is str or t is int or t is bool or v is None:
            continue
        if t is float:
            if not math.isfinite(v):
                return False
        elif t is list:
            stack.extend(v)
        elif t is dict:
            for k in v:
                if type(k) is not str:
                    return False
            stack.extend(v.values())
        else:  # bytes (an empty bin), or anything else
            return False
    return True


def pack(msg: dict[str, Any], packer: msgpack.Packer | None = None) -> bytes:
    """A server message as a ready-to-write binary WebSocket frame (``packer``: a
    ``msgpack.Packer`` to reuse, in one thread)."""
    try:
        payload = msgpack.packb(msg) if packer is None else packer.pack(msg)
    except (TypeError, ValueError):  # a value only orjson knows how to write: via JSON
        payload = msgpack.packb(orjson.loads(orjson.dumps(msg)))
    return binary_frame(payload)


def json_payload(frame: bytes) -> bytes:
    """The payload of an unmasked text frame made by ``framing.frame``."""
    n = frame[1]
    return frame[2:] if n < 126 else frame[4:] if n == 126 else frame[10:]


class Transcoder:
    """Turns the JSON text frames the core publishes into MessagePack binary frames, keeping
    the last one: a fan-out hands the same bytes object to every recipient in one go, so each
    message is converted once however many MessagePack connections receive it."""

    __slots__ = ("_packer", "conversions", "from_messages", "last_json", "last_packed")

    def __init__(self) -> None:
        # The last frame converted (held, so its identity cannot be taken by another object)
        # and what it became: a connection checks these itself before calling (cheaper).
        self.last_json = b""
        self.last_packed = b""
        self._packer = msgpack.Packer()
        self.conversions = 0
        self.from_messages = 0  # conversions that packed the message, not parsed the frame

    def pack(self, msg: dict[str, Any]) -> bytes:
        """``pack(msg)`` with this transcoder's packer (a reply to one connection)."""
        return pack(msg, self._packer)

    def __call__(self, frame: bytes) -> bytes:
        if frame is self.last_json:
            return self.last_packed
        fresh, msg = last_fresh()
        if frame is fresh:  # its message as it was encoded (``encode_fresh``)
            packed = pack(msg, self._packer)
            self.from_messages += 1
        else:
            packed = binary_frame(self._packer.pack(orjson.loads(json_payload(frame))))
        self.last_json = frame
        self.last_packed = packed
        self.conversions += 1
        return packed
