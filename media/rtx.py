"""Route received RTX by SSRC in an aiortc peer connection (client side).

aiortc's ``RtpRouter`` routes a retransmission (RTX) packet by payload type when it does not know
its SSRC, and drops it when two receivers share that payload type, which is the case for any
connection receiving two video tracks (an SFU subscriber). Every retransmission is then lost and
the receiver NACKs the same packets again and again. The RTX SSRCs are signaled
(``a=ssrc-group:FID``); this registers them once a receiver starts. The SFU does the same for
its own receivers (``sfu.rtc.route_rtx_by_ssrc``).
"""

from __future__ import annotations

from typing import Any

from aiortc import RTCRtpReceiver


def route_rtx_by_ssrc(receiver: RTCRtpReceiver) -> None:
    """Make ``receiver``'s RTX SSRCs route to it, once it has started (wraps ``receive``)."""
    original = receiver.receive

    async def receive(parameters: Any) -> None:
        await original(parameters)
        router = receiver.transport._rtp_router
        for rtx_ssrc in receiver._RTCRtpReceiver__rtx_ssrc:  # type: ignore[attr-defined]
            router.ssrc_table[rtx_ssrc] = receiver

    receiver.receive = receive  # type: ignore[method-assign]
