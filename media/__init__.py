"""Media for Rallypoint tests, benchmarks and bots: clips, tracks, counters, loss.

* :mod:`media.clip`: :func:`~media.clip.load_clip` (encode once with PyAV, cache on disk).
* :mod:`media.tracks`: aiortc tracks sending a clip without encoding; keyframe requests.
* :mod:`media.receiver`: :class:`~media.receiver.FrameCounter`, decodable-frame measure.
* :mod:`media.loss`: :func:`~media.loss.inject_loss` on an aiortc peer connection.
* :mod:`media.pattern`, :mod:`media.marker`: the picture and its machine-readable marker.
* :mod:`media.y4m`: the picture as a fake camera file for Chromium.
* :mod:`media.session`: a participant's media through the SFU (aiortc client).
"""
