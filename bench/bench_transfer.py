"""Transfer benchmark alone (``python bench/bench_transfer.py [--mb 256] [--repeats 5]``): see
:mod:`streaming_weights.benchmarks.transfer`, where it lives (``surfing bench --cases transfer`` runs it
inside the suite)."""

from __future__ import annotations

from streaming_weights.benchmarks.transfer import main

if __name__ == "__main__":
    raise SystemExit(main())
