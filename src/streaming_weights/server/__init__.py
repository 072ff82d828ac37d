"""The weight server: serves chunked models' bytes over WebSocket (protocol v1, docs/protocol.md).

Public surface: :class:`WeightServer`, :class:`AdvancedWeightServer` (several servers over one storage
behind a shared Redis cache: the scale-out setup), :class:`ByteLRU` (a server's blob cache) and
:func:`run_server` (the CLI's blocking entry point with graceful SIGINT/SIGTERM shutdown).
"""

from .advanced import AdvancedWeightServer
from .cache import ByteLRU
from .options import ServerLimits, ServerTLS
from .run import run_server
from .server import WeightServer

__all__ = ["AdvancedWeightServer", "ByteLRU", "ServerLimits", "ServerTLS", "WeightServer", "run_server"]
