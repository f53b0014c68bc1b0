"""Drop a fraction of the RTP packets an aiortc peer connection sends (test loss injection).

Wraps ``RTCDtlsTransport._send_rtp`` on the connection's transport instance(s): every
outgoing RTP and RTCP packet passes there, in the clear, just before SRTP protection.

What is dropped, and why: every *RTP* packet of the chosen kinds, original media and
RTX retransmissions alike, each with probability ``fraction`` (a seeded RNG, so a run is
reproducible). A real network does not know which packets are retransmissions, so a
repair path that only works when retransmissions always arrive would pass here and fail
in the field; the far end has to NACK again. RTCP is never dropped: losing feedback is a
different experiment, and keeping it makes NACK repair deterministic enough to assert on.
``retransmission_fraction`` sets a different rate for RTX (0.0: drop original media
packets only; 1.0: no retransmission ever arrives, a negative control for repair tests).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from aiortc.rtp import is_rtcp

_SSRC = struct.Struct(">I")


@dataclass
class LossCounts:
    """Packets seen and dropped, split into original media and RTX retransmissions."""

    media_sent: int = 0
    media_dropped: int = 0
    rtx_sent: int = 0
    rtx_dropped: int = 0

    @property
    def dropped(self) -> int:
        """All RTP packets dropped."""
        return self.media_dropped + self.rtx_dropped


class PacketLoss:
    """Loss injected into one peer connection; see :func:`inject_loss`.

    ``fraction`` may be changed at any time (0.0 turns loss off); :meth:`remove` restores
    the original transport methods. ``counts`` covers packets of the chosen kinds only:
    ``*_sent`` counts packets offered to the network, including those then dropped.
    """

    def __init__(
        self,
        pc: Any,
        fraction: float,
        *,
        seed: int = 0,
        kinds: Collection[str] = ("audio", "video"),
        retransmission_fraction: float | None = None,
    ) -> None:
        rtx_fraction = fraction if retransmission_fraction is None else retransmission_fraction
        if not (0.0 <= fraction <= 1.0 and 0.0 <= rtx_fraction <= 1.0):
            raise ValueError("loss fractions must be within [0, 1]")
        self.fraction = fraction
        """Probability of dropping an original media packet."""
        self.retransmission_fraction = rtx_fraction
        """Probability of dropping an RTX retransmission."""
        self.counts = LossCounts()
        self._rng = random.Random(seed)
        self._media_ssrcs: set[int] = set()
        self._rtx_ssrcs: set[int] = set()
        self._wrapped: list[Any] = []
        transports = []
        for sender in pc.getSenders():
            if sender.kind not in kinds:
                continue
            self._media_ssrcs.add(sender._ssrc)
            self._rtx_ssrcs.add(sender._rtx_ssrc)
            if sender.transport is not None and sender.transport not in transports:
                transports.append(sender.transport)
        if not transports:
            raise RuntimeError(
                "no negotiated sender of the chosen kinds: inject loss after negotiation"
            )
        for transport in transports:
            self._wrap(transport)

    def _wrap(self, transport: Any) -> None:
        original = getattr(transport, "_send_rtp", None)
        if not callable(original):
            raise RuntimeError(
                "aiortc RTCDtlsTransport has no _send_rtp(): this aiortc version is not "
                "supported by media.loss (pinned: aiortc==1.16.0)"
            )

        async def send_rtp(data: bytes) -> None:
            if not self._drop(data):
                await original(data)

        transport._send_rtp = send_rtp
        self._wrapped.append(transport)

    def _drop(self, data: bytes) -> bool:
        if is_rtcp(data) or len(data) < 12:
            return False
        (ssrc,) = _SSRC.unpack_from(data, 8)
        if ssrc in self._media_ssrcs:
            self.counts.media_sent += 1
            if self._rng.random() < self.fraction:
                self.counts.media_dropped += 1
                return True
        elif ssrc in self._rtx_ssrcs:
            self.counts.rtx_sent += 1
            if self._rng.random() < self.retransmission_fraction:
                self.counts.rtx_dropped += 1
                return True
        return False

    def remove(self) -> None:
        """Stop injecting loss: restore each transport's own ``_send_rtp``."""
        for transport in self._wrapped:
            # The wrapper is an instance attribute; deleting it uncovers the class method.
            del transport._send_rtp
        self._wrapped.clear()


def inject_loss(
    pc: Any,
    fraction: float,
    *,
    seed: int = 0,
    kinds: Collection[str] = ("audio", "video"),
    retransmission_fraction: float | None = None,
) -> PacketLoss:
    """Drop ``fraction`` of the RTP packets ``pc`` (an ``RTCPeerConnection``) sends.

    Call after negotiation (senders need their transport). ``kinds`` selects which
    senders' packets are subject to loss; RTX retransmissions are dropped with
    ``retransmission_fraction`` (default: ``fraction``); RTCP is never dropped.
    """
    return PacketLoss(
        pc,
        fraction,
        seed=seed,
        kinds=kinds,
        retransmission_fraction=retransmission_fraction,
    )


class RembLimit:
    """Cap the REMB an aiortc peer connection sends (its receive-side bandwidth estimate), as
    a receiver behind a slow link would report it. ``bps = None`` lifts the cap."""

    def __init__(self, pc: Any, bps: int | None) -> None:
        from aiortc.rtp import (
            RTCP_PSFB_APP,
            RtcpPacket,
            RtcpPsfbPacket,
            pack_remb_fci,
            unpack_remb_fci,
        )

        self.bps = bps
        self.rewritten = 0
        transports = []
        for sender in pc.getSenders():
            if sender.transport is not None and sender.transport not in transports:
                transports.append(sender.transport)
        if not transports:
            raise RuntimeError("no negotiated transport: limit REMB after negotiation")
        for transport in transports:
            original = transport._send_rtp

            async def send_rtp(data: bytes, original: Any = original) -> None:
                limit = self.bps
                if limit is not None and is_rtcp(data):
                    out = []
                    changed = False
                    for packet in RtcpPacket.parse(data):
                        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
                            bitrate, ssrcs = unpack_remb_fci(packet.fci)
                            if bitrate > limit:
                                packet.fci = pack_remb_fci(limit, ssrcs)
                                changed = True
                        out.append(bytes(packet))
                    if changed:
                        self.rewritten += 1
                        data = b"".join(out)
                await original(data)

            transport._send_rtp = send_rtp
