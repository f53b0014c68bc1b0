"""Route received RTX by SSRC in an aiortc peer connection (client side).

aiortc's ``RtpRouter`` routes a retransmission (RTX) packet by payload type when it does not know
its SSRC, and drops it when two receivers share that payload type, which is the case for any
connection receiving two video tracks (an SFU subscriber). The fix is the SFU's own
(``sfu.rtc.route_rtx_by_ssrc``); this applies it once a client receiver has started.
"""

from __future__ import annotations

from typing import Any

from aiortc import RTCRtpReceiver

from sfu.rtc import route_rtx_by_ssrc as _route


def route_rtx_by_ssrc(receiver: RTCRtpReceiver) -> None:
    """Make ``receiver``'s RTX SSRCs route to it, once it has started (wraps ``receive``)."""
    original = receiver.receive

    async def receive(parameters: Any) -> None:
        await original(parameters)
        _route(receiver)

    receiver.receive = receive  # type: ignore[method-assign]
