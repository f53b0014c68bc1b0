"""Simulcast in SDP (RFC 8853 ``a=simulcast``, RFC 8851 ``a=rid``): reading a publisher's offer
and accepting its layers in the answer. Pure; text in, text out.

aiortc's SDP parser drops ``a=rid`` and ``a=simulcast`` and never writes them, so the room reads
them from the offer's text here and adds the answer's lines to the answer's text.

A simulcast video section of an offer (Chromium's ``addTransceiver`` with ``sendEncodings``)::

    a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id
    a=extmap:5 urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id
    a=rid:q send
    a=rid:h send
    a=rid:f send
    a=simulcast:send q;h;f

is answered with ``a=rid:<id> recv`` for each and ``a=simulcast:recv q;h;f``, and the two
header extensions must be accepted too (Chromium rejects an answer that accepts simulcast
without the RID extension). The layers are taken in the order of ``a=simulcast``, **lowest
first** (as ``web/rallypoint.js`` and mediasoup-client list their encodings); paused rids
(``~q``) are left out, and of alternatives (``q,h``) the first is taken.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

URI_RID: Final = "urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id"
URI_REPAIRED_RID: Final = "urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id"
MAX_LAYERS: Final = 4


@dataclass(slots=True)
class SimulcastSection:
    """One offered simulcast section: its layers' rids (lowest first) and the ids of its RID
    header extensions (``None`` when not offered)."""

    mid: str
    rids: list[str] = field(default_factory=list)
    rid_ext: int | None = None
    repaired_rid_ext: int | None = None


def _sections(sdp: str) -> list[list[str]]:
    """The offer's media sections, each a list of lines (the session part left out)."""
    out: list[list[str]] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            out.append([line])
        elif out:
            out[-1].append(line)
    return out


def read_offer(sdp: str) -> dict[str, SimulcastSection]:
    """The video sections of ``sdp`` that offer to send simulcast, by mid. A section offering
    one layer, or simulcast without the RID extension (unusable: the layers could not be told
    apart), is left out: it is answered as a single stream."""
    found: dict[str, SimulcastSection] = {}
    for lines in _sections(sdp):
        if not lines[0].startswith("m=video"):
            continue
        mid = ""
        send_rids: set[str] = set()
        order: list[str] = []
        rid_ext: int | None = None
        repaired: int | None = None
        for line in lines[1:]:
            if line.startswith("a=mid:"):
                mid = line[6:].strip()
            elif line.startswith("a=rid:"):
                bits = line[6:].split()
                if len(bits) >= 2 and bits[1] == "send":
                    send_rids.add(bits[0])
            elif line.startswith("a=simulcast:"):
                bits = line[12:].split()
                if len(bits) >= 2 and bits[0] == "send":
                    for alt in bits[1].split(";"):
                        rid = alt.split(",")[0]
                        if rid and not rid.startswith("~"):
                            order.append(rid)
            elif line.startswith("a=extmap:"):
                bits = line[9:].split()
                if len(bits) >= 2:
                    try:
                        ext_id = int(bits[0].split("/")[0])
                    except ValueError:
                        continue
                    if bits[1] == URI_RID:
                        rid_ext = ext_id
                    elif bits[1] == URI_REPAIRED_RID:
                        repaired = ext_id
        rids = [r for r in order if r in send_rids][:MAX_LAYERS]
        if mid and len(rids) >= 2 and rid_ext is not None:
            found[mid] = SimulcastSection(mid, rids, rid_ext, repaired)
    return found


def accept_in_answer(sdp: str, sections: dict[str, SimulcastSection]) -> str:
    """``sdp`` (an answer) with ``a=rid:<id> recv`` and ``a=simulcast:recv`` added to each
    section whose mid is in ``sections``."""
    if not sections:
        return sdp
    eol = "\r\n" if "\r\n" in sdp else "\n"
    out: list[str] = []
    for line in sdp.splitlines():
        out.append(line)
        if line.startswith("a=mid:"):
            section = sections.get(line[6:].strip())
            if section is not None:
                out.extend(f"a=rid:{rid} recv" for rid in section.rids)
                out.append(f"a=simulcast:recv {';'.join(section.rids)}")
    return eol.join(out) + eol
