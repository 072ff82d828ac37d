"""Shared test helpers, imported as ``tests.support.<module>``.

``models`` (tiny fixed-seed checkpoints, ``chunk()``), ``services`` (rclone S3 and redis-server on loopback),
``servers`` (hand-built chunked models, a weight-server process), ``streaming`` (``served()``: a real server
in a thread), ``faultproxy`` (a TCP proxy that drops, corrupts or stalls bytes), ``waiting`` (bounded polls
of a real condition). Ports: :mod:`streaming_weights.netutil` (``free_port``, ``wait_for_port``).
"""
