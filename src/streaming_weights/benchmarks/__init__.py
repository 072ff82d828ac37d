"""The benchmark suite behind ``surfing bench``: the physical limit, the peers, and the cache policy.

Every figure is measured side by side in one run on the machine at hand, repeated, and reported as median
with min–max spread. Absolute numbers drift with background load; the ratios measured in one run are the
result. ``surfing bench`` writes the report and plots into ``./surfing-bench/`` by default; ``make bench``
passes ``--output-dir bench`` to replace the repository's committed ``bench/REPORT.md`` and ``bench/*.png``.

Public surface: :func:`run_suite`, :data:`CASES` (and ``free_port``, kept for older callers). One module
per case: ``transfer``, ``overlap``, ``cache_policy`` (case ``cache``), ``memory``, ``cold_start``,
``peers``, ``chunking`` (case ``chunker``), ``moe`` (mixture-of-experts: expert units vs whole-layer units
vs accelerate; builds its own model, so ``--cases moe`` alone prepares nothing else); ``report`` renders
REPORT.md, ``plots`` the PNGs, ``load`` is the concurrent-clients load test. Child programs are modules run
with ``python -m``: ``benchmarks.child`` (fresh-process measurements), ``benchmarks.moe_child`` (the moe
case's, through ``child.main``), ``benchmarks.rawsender`` and ``benchmarks.hexjson`` (the transfer case's
reference senders).

The library never prints: :func:`run_suite` returns a dict and reports progress through a callback.
"""

from __future__ import annotations

from ..netutil import free_port
from .common import summarize
from .suite import CASES, run_suite

__all__ = ["CASES", "free_port", "run_suite", "summarize"]
