"""OpenAI-compatible HTTP API over one streaming model (needs the ``api`` extra: fastapi, uvicorn).

Public surface::

    from streaming_weights.api import create_app, ApiSettings, ApiServer
    app = create_app(model, tokens=["secret"], settings=ApiSettings(max_batch=8))
    ApiServer(app, host="127.0.0.1", port=8000).run()       # or .start() / .stop() in a thread

Concurrent requests are batched (:mod:`.batcher`): one streamed layer serves every row of a batch. Stopping
drains the requests in flight (``ApiSettings.shutdown_grace``); ``run()`` returns a :class:`StopReport`.
"""

from __future__ import annotations

from .app import ApiSettings, create_app
from .serve import ApiServer, StopReport

__all__ = ["ApiServer", "ApiSettings", "StopReport", "create_app"]
