"""``python -m streaming_weights.chunker ARGS`` = ``surfing chunk ARGS``.

A leaf: nothing imports this module, so its import of the CLI adds no cycle.
"""

from __future__ import annotations

import sys

from ..cli import main

if __name__ == "__main__":
    raise SystemExit(main(["chunk", *sys.argv[1:]]))
