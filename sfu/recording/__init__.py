"""Recording group calls without transcoding (see docs/RECORDING.md)."""
