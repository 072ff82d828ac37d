"""Load test (kept for ``python bench/load_test.py CHUNKS_DIR SOURCE_DIR``): see
:mod:`streaming_weights.benchmarks.load`, where it lives."""

from __future__ import annotations

from streaming_weights.benchmarks.load import LoadResult, main, reference_outputs, run_load  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
