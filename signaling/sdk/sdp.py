"""SDP the SDK sends, made short enough for large rooms.

aiortc writes, in every media section, three certificate fingerprints (SHA-256, -384 and -512),
an ``a=msid`` line, ``a=ssrc`` lines for the RTCP it sends (and ``a=ssrc-group:FID`` for RTX in
video sections) and ``a=rtcp``: about 1,270 characters per section of a subscriber answer. A
room's subscriber connection has a section per track of every other participant, and the
protocol takes at most 60,000 characters of ``sdp`` in one message (docs/PROTOCOL.md, Limits),
so aiortc's answer for a 25-person room (48 sections, ~61,000 characters) is refused.

:func:`compact_answer` leaves out what the other side does not use:

- every fingerprint but SHA-256, the hash every WebRTC stack (Chromium, Firefox, Safari,
  aiortc) writes and checks: the other side verifies the certificate against the
  fingerprints of a hash it supports (RFC 8122, 5), one is enough; a section (or session
  part) without a SHA-256 fingerprint keeps all;
- in a section that sends nothing (``recvonly`` or ``inactive``): ``a=msid`` (no track is
  sent in it) and ``a=ssrc`` / ``a=ssrc-group`` (they describe the streams sent; the RTCP a
  receiver sends is matched by the media SSRC it names, which is the sender's). Chromium's own
  receive-only answers carry neither;
- ``a=rtcp:`` where ``a=rtcp-mux`` is in the section (RTCP goes on the RTP port; the line is
  an address nobody uses).

Everything else stays: ``a=mid``, direction, codecs (``rtpmap``, ``fmtp``, ``rtcp-fb``),
header extensions, ICE credentials, candidates and ``end-of-candidates`` (aiortc's bundled
transport takes the candidates of one section: every section keeps its own), ``a=setup``, the
session part (``BUNDLE`` group). What is left is about 800 characters a section: 48 sections
take ~38,000 characters, and 60,000 hold about 75 (a room of 38 participants who each send
audio and video).
"""

from __future__ import annotations

_SENDS_NOTHING = ("a=recvonly", "a=inactive")
_STREAM_LINES = ("a=msid:", "a=ssrc:", "a=ssrc-group:")


def _sections(sdp: str) -> tuple[list[str], list[list[str]]]:
    """The session part's lines and each media section's lines."""
    session: list[str] = []
    media: list[list[str]] = []
    for line in sdp.splitlines():
        if line.startswith("m="):
            media.append([line])
        elif media:
            media[-1].append(line)
        elif line:
            session.append(line)
    return session, media


def _compact(lines: list[str], *, media: bool = True) -> list[str]:
    """One section's lines (``media``: a media section, else the session part) compacted."""
    sha256 = any(ln.lower().startswith("a=fingerprint:sha-256 ") for ln in lines)
    sends_nothing = media and any(ln in _SENDS_NOTHING for ln in lines)
    muxed = media and "a=rtcp-mux" in lines
    out = []
    for ln in lines:
        if not ln:
            continue
        if (
            sha256
            and ln.startswith("a=fingerprint:")
            and not ln.lower().startswith("a=fingerprint:sha-256 ")
        ):
            continue
        if sends_nothing and ln.startswith(_STREAM_LINES):
            continue
        if muxed and ln.startswith("a=rtcp:"):
            continue
        out.append(ln)
    return out


def compact_answer(sdp: str) -> str:
    """``sdp`` (an SDP answer, or any description) without the lines the remote side does not
    need (see the module's docstring); CRLF line ends, as SDP has them."""
    session, media = _sections(sdp)
    lines = _compact(session, media=False)
    for section in media:
        lines += _compact(section)
    return "\r\n".join(lines) + "\r\n"
