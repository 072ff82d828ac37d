"""The ``surfing`` command: thin argument parsing over the library.

Public surface: :func:`main` (the console script) and :func:`build_parser`. One module per command group
(``chunk``, ``serve``, ``generate``, ``bench``, ``demo``), each with ``register(subparsers)``; commands call
the library and print its results. Only the CLI prints or configures logging; :mod:`.errors` is the one
place that turns exceptions into one-line messages (a traceback only with ``-v``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback

from . import output
from .errors import describe

#: command modules, registered in this order (each has ``register(subparsers)``)
COMMAND_MODULES: tuple[str, ...] = ("chunk", "serve", "trust", "generate", "chat", "api", "bench", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surfing", description="Stream transformer weights layer by layer.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def _silence_stdout() -> None:
    """After a closed pipe (``surfing inspect | head``): point stdout at /dev/null so the interpreter's
    final flush does not raise a second BrokenPipeError."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def _run(args: argparse.Namespace) -> int:
    try:
        status = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit flush
        return status
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a writer whose reader went away
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: one line, a traceback only with -v
        message, status = describe(exc)
        if args.verbose:
            traceback.print_exc()
        if not output.STDOUT.at_line_start:
            sys.stderr.write("\n")
        print(f"surfing {args.command}: error: {message}", file=sys.stderr)
        return status


def main(argv: list[str] | None = None) -> int:
    """Run ``surfing ARGV``; returns the exit status (0 ok, 1 unexpected, 2 usage / library error)."""
    args = build_parser().parse_args(argv)
    output.STDOUT.at_line_start = True
    restore = output.configure(args, default_level=getattr(args, "log_level", logging.WARNING))
    try:
        return _run(args)
    finally:
        restore()


__all__ = ["COMMAND_MODULES", "build_parser", "main"]
