"""The weight server: serves chunked models' bytes over WebSocket (protocol v1, docs/protocol.md).

Public surface: :class:`WeightServer` (``AdvancedWeightServer`` is the original project's name for the
same server, kept as an alias), :class:`ByteLRU` (its blob cache) and :func:`run_server` (the CLI's
blocking entry point with graceful SIGINT/SIGTERM shutdown).
"""

from .cache import ByteLRU
from .server import WeightServer, run_server

AdvancedWeightServer = WeightServer

__all__ = ["AdvancedWeightServer", "ByteLRU", "WeightServer", "run_server"]
