"""The wire protocol as plain values: specs, validation, framing, schema. Imports nothing else of
Rallypoint's; features hand their message specs to ``signaling.app``, which merges them into one
``Protocol``."""
