"""``signaling.sdk.simulcast`` without a network: the offer it writes (read back by the SFU's own
reader), the answer it reads, the layer table, and its list of aiortc internals."""

from __future__ import annotations

import ast
from pathlib import Path

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

from sfu.simulcast import URI_REPAIRED_RID, URI_RID, accept_in_answer, read_offer
from signaling.sdk import simulcast
from signaling.sdk.simulcast import (
    PRIVATE_INTERNALS,
    Simulcast,
    SimulcastSender,
    check_internals,
    layer_specs,
    offer_simulcast,
    read_answer,
)


async def _offer() -> tuple[str, str]:
    pc = RTCPeerConnection()
    pc.addTransceiver(AudioStreamTrack(), direction="sendonly")
    video = pc.addTransceiver(VideoStreamTrack(), direction="sendonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    assert video.mid is not None
    return sdp, video.mid


async def test_offer_is_read_by_the_sfu_as_simulcast() -> None:
    sdp, mid = await _offer()
    assert "a=ssrc:" in sdp
    offer = offer_simulcast(sdp, {mid: ["q", "h", "f"]})
    sections = read_offer(offer)
    assert list(sections) == [mid]
    assert sections[mid].rids == ["q", "h", "f"]
    assert sections[mid].rid_ext is not None and sections[mid].repaired_rid_ext is not None
    video = offer[offer.index("m=video") :]
    # The RID extensions take ids no other extension uses; the video section lost its SSRC
    # lines (the layers are told apart by RID), the audio section kept them.
    ids = [line.split()[0] for line in video.splitlines() if line.startswith("a=extmap:")]
    assert len(ids) == len(set(ids)) == 4
    audio = offer[offer.index("m=audio") : offer.index("m=video")]
    assert "a=ssrc" not in video and "a=ssrc:" in audio
    assert URI_RID in video and URI_REPAIRED_RID in video and URI_RID not in audio
    # The answer the SFU writes is read back as accepting simulcast.
    answer = accept_in_answer(offer.replace("a=rid:q send", "a=rid:q recv"), sections)
    assert read_answer(answer, mid).simulcast
    assert not read_answer(sdp, mid).simulcast


def test_layer_table_follows_the_web_page() -> None:
    assert [(s.rid, s.width, s.height) for s in layer_specs(1280, 720)] == [
        ("q", 320, 180),
        ("h", 640, 360),
        ("f", 1280, 720),
    ]
    assert [(s.rid, s.width) for s in layer_specs(640, 480)] == [("h", 320), ("f", 640)]
    assert len(layer_specs(320, 240)) == 1


def test_internals_listed_are_the_ones_used() -> None:
    check_internals()
    tree = ast.parse(Path(simulcast.__file__).read_text())
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and n.attr.startswith("_")
        and not n.attr.startswith("__")
        and not (isinstance(n.value, ast.Name) and n.value.id == "self")
    }
    assert used == {name for _, name in PRIVATE_INTERNALS}


async def test_a_server_that_does_not_accept_simulcast_gets_the_top_layer_alone() -> None:
    """An answer without ``a=simulcast:recv`` (an aiortc peer answering the munged offer as a
    single stream): no sender is started for the lower layer, whose track is stopped."""
    low, top = VideoStreamTrack(), VideoStreamTrack()
    pub, peer = RTCPeerConnection(), RTCPeerConnection()
    try:
        tr = pub.addTransceiver(top, direction="sendonly")
        await pub.setLocalDescription(await pub.createOffer())
        sender = SimulcastSender(tr, Simulcast([low, top]))
        offer = offer_simulcast(pub.localDescription.sdp, {sender.mid: ["h", "f"]})
        await peer.setRemoteDescription(RTCSessionDescription(offer, "offer"))
        await peer.setLocalDescription(await peer.createAnswer())
        answer = peer.localDescription.sdp
        await pub.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        sender.start(pub, answer)
        assert not sender.accepted
        assert sender.senders == []
        assert low.readyState == "ended" and top.readyState == "live"
    finally:
        await pub.close()
        await peer.close()
