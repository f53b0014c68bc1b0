"""Reading simulcast from an offer and accepting it in the answer (``sfu/simulcast.py``)."""

from __future__ import annotations

from sfu.simulcast import URI_REPAIRED_RID, URI_RID, accept_in_answer, read_offer

OFFER = "\r\n".join(
    [
        "v=0",
        "o=- 1 2 IN IP4 127.0.0.1",
        "s=-",
        "t=0 0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=mid:0",
        "a=sendonly",
        "m=video 9 UDP/TLS/RTP/SAVPF 96 97",
        "a=mid:1",
        "a=extmap:1 urn:ietf:params:rtp-hdrext:sdes:mid",
        f"a=extmap:10 {URI_RID}",
        f"a=extmap:11/sendonly {URI_REPAIRED_RID}",
        "a=sendonly",
        "a=rid:q send",
        "a=rid:h send max-width=640",
        "a=rid:f send",
        "a=rid:x recv",
        "a=simulcast:send q;h,x;~p;f",
        "m=video 9 UDP/TLS/RTP/SAVPF 96",
        "a=mid:2",
        f"a=extmap:10 {URI_RID}",
        "a=sendonly",
        "",
    ]
)


def test_reads_layers_lowest_first_and_extension_ids() -> None:
    sections = read_offer(OFFER)
    assert list(sections) == ["1"]  # audio, and a video section without simulcast, are not
    s = sections["1"]
    # Alternatives take the first; paused rids are left out.
    assert s.rids == ["q", "h", "f"]
    assert (s.rid_ext, s.repaired_rid_ext) == (10, 11)


def test_simulcast_without_the_rid_extension_is_one_stream() -> None:
    offer = OFFER.replace(f"a=extmap:10 {URI_RID}\r\n", "")
    assert read_offer(offer) == {}


def test_one_layer_is_not_simulcast() -> None:
    offer = OFFER.replace("a=simulcast:send q;h,x;~p;f", "a=simulcast:send q")
    assert read_offer(offer) == {}


def test_answer_gets_rid_and_simulcast_lines_in_its_section() -> None:
    answer = "\r\n".join(["v=0", "m=audio 9 X 111", "a=mid:0", "m=video 9 X 96", "a=mid:1", ""])
    out = accept_in_answer(answer, read_offer(OFFER))
    lines = out.split("\r\n")
    at = lines.index("a=mid:1")
    assert lines[at + 1 : at + 5] == [
        "a=rid:q recv",
        "a=rid:h recv",
        "a=rid:f recv",
        "a=simulcast:recv q;h;f",
    ]
    assert "a=rid" not in "\r\n".join(lines[: lines.index("a=mid:0") + 1])
    assert out.endswith("\r\n")
    assert accept_in_answer(answer, {}) == answer
