"""Recording group calls per track, without transcoding (issue 17).

``library.py``: the recordings on disk (one directory per recording with its track files and
``manifest.json``, docs/RECORDING.md): creating a recording's directory, listing, reading,
resolving a file for download, deleting, the age limit and the storage cap.
"""
