"""``python -m streaming_weights ...``: the same as the ``surfing`` command."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
