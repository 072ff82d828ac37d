"""The benchmark suite behind ``surfing bench``: the physical limit, the peers, and the cache policy.

Every figure is measured side by side in one run on the machine at hand, repeated, and reported as median
with min–max spread. Absolute numbers drift with background load; the ratios measured in one run are the
result. ``surfing bench`` writes the report and plots into ``./surfing-bench/`` by default; ``make bench``
passes ``--output-dir bench`` to replace the repository's committed ``bench/REPORT.md`` and ``bench/*.png``.

Public surface: :func:`run_suite`, :data:`CASES` (and ``free_port``, kept for older callers). One module
per case: ``transfer``, ``overlap``, ``cache_policy`` (case ``cache``), ``memory``, ``cold_start``,
``peers``, ``chunking`` (case ``chunker``), ``moe`` (mixture-of-experts: expert units vs whole-layer units
vs accelerate; builds its own model, so ``--cases moe`` alone prepares nothing else), ``scale`` (a
TinyLlama-1.1B-shaped model in a 1.5 GB cap: bf16 over the server and from a local directory, int8/int4 codes
and kernels, vs accelerate; also its own model), ``disk`` (local reads vs ``dd iflag=direct``, run by
``transfer --disk``), ``qkernels`` (one projection each way, for the quant case); ``report`` renders
REPORT.md, ``plots`` the PNGs, ``load`` is the concurrent-clients load test. Child programs are modules run
with ``python -m``: ``benchmarks.child`` (fresh-process measurements), ``benchmarks.moe_child`` and
``benchmarks.scale_child`` (those cases', through ``child.main``), ``benchmarks.rawsender`` and
``benchmarks.hexjson`` (the transfer case's reference senders).

The library never prints: :func:`run_suite` returns a dict and reports progress through a callback.
"""

from __future__ import annotations

from ..netutil import free_port
from .common import summarize
from .suite import CASES, run_suite

__all__ = ["CASES", "free_port", "run_suite", "summarize"]
