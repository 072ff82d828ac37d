"""``python -m streaming_weights.weight_server --chunks-dir DIR ...``: the same as ``surfing serve``."""

from __future__ import annotations

import sys

from .server import WeightServer  # noqa: F401  (compatibility: the original module exported the class here)


def main(argv: list[str] | None = None) -> int:
    from .cli import main as cli_main

    return cli_main(["serve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
