"""Recording a room's tracks without transcoding (docs/SFU.md, "Recording in the worker")."""
