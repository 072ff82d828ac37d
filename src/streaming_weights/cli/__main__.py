"""``python -m streaming_weights.cli ...``: the same as the ``surfing`` command."""

from __future__ import annotations

from . import main

if __name__ == "__main__":
    raise SystemExit(main())
