"""Recording group calls without transcoding: per-track files in the worker that hosts the
room (docs/SFU.md, "Recording in the worker") and the optional mixed file (``mix``,
docs/RECORDING.md)."""
