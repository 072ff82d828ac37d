"""Where the CLI's output goes: results on stdout, everything else (logs, progress, stats) on stderr.

Only the CLI configures logging and progress bars; the library never does.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time
from typing import Any, Callable, TextIO


class LineState:
    """Whether stdout's last written character ended a line (so a log line can start on a fresh one)."""

    at_line_start = True


STDOUT = LineState()


def write_stdout(text: str) -> None:
    """Write a piece of the result (e.g. streamed tokens) to stdout and remember where the line stands."""
    if not text:
        return
    sys.stdout.write(text)
    sys.stdout.flush()
    STDOUT.at_line_start = text.endswith("\n")


def _same_destination(a: TextIO, b: TextIO) -> bool:
    try:
        sa, sb = os.fstat(a.fileno()), os.fstat(b.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino) or (a.isatty() and b.isatty())


class FreshLineHandler(logging.StreamHandler):
    """A stderr handler whose records never get glued onto half a line of streamed stdout text."""

    def emit(self, record: logging.LogRecord) -> None:
        if not STDOUT.at_line_start:
            self.stream.write("\n")
            if _same_destination(sys.stdout, self.stream):
                STDOUT.at_line_start = True  # the newline ended the shared line
        super().emit(record)


class PlainProgressStream(io.TextIOBase):
    """Stands in for stderr when it is not a terminal: ``\\r``-redrawn progress bars (tqdm's, transformers')
    become a few plain lines (at most one per ``interval`` seconds, plus the final state)."""

    def __init__(self, inner: TextIO, interval: float = 10.0) -> None:
        self.inner = inner
        self.interval = interval
        self._pending = ""
        self._last = 0.0

    def write(self, text: str) -> int:
        for i, piece in enumerate(text.split("\r")):
            if i and self._pending.strip():  # a redraw replaces the pending status
                self._maybe_flush_status()
            lines = piece.split("\n")
            self._pending += lines[0]
            if len(lines) > 1:  # a finished line (e.g. a bar's close): always written
                self.inner.write(self._pending.strip() + "\n" if self._pending.strip() else "\n")
                for mid in lines[1:-1]:
                    self.inner.write(mid + "\n")
                self._pending = lines[-1]
        return len(text)

    def _maybe_flush_status(self) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self.inner.write(self._pending.strip() + "\n")
            self._last = now
        self._pending = ""

    def flush(self) -> None:
        self.inner.flush()

    def fileno(self) -> int:
        return self.inner.fileno()

    def isatty(self) -> bool:
        return False


_QUIET_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def silence_progress_bars() -> dict[str, str | None]:
    """Turn off every progress bar: tqdm's (the chunker), huggingface_hub's and transformers' own.

    Returns the environment values it replaced (None: unset), for :func:`configure`'s undo.
    """
    saved = {k: os.environ.get(k) for k in _QUIET_ENV}
    os.environ.update(_QUIET_ENV)
    if "huggingface_hub" in sys.modules:  # already imported: the environment is read too late
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    return saved


def configure(args: Any, *, default_level: int = logging.WARNING) -> Callable[[], None]:
    """Logging to stderr at ``default_level`` (-v: more, -q: errors only); progress bars per --quiet / TTY.

    Returns a function that undoes it (the handler, levels and stderr wrapper), for in-process callers of main.
    """
    verbose, quiet = int(getattr(args, "verbose", 0) or 0), bool(getattr(args, "quiet", False))
    level = logging.ERROR if quiet else max(logging.DEBUG, default_level - 10 * verbose)
    saved_env = silence_progress_bars() if quiet else {}
    saved_stderr = sys.stderr
    if not sys.stderr.isatty() and not isinstance(sys.stderr, PlainProgressStream):
        sys.stderr = PlainProgressStream(sys.stderr)
    root = logging.getLogger()
    handler = FreshLineHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    # third-party chatter (websockets' per-connection errors, transformers' advice) stays out unless -v
    quiet_libs = () if verbose else ("websockets", "asyncio", "urllib3", "botocore", "filelock")
    saved_levels = {name: logging.getLogger(name).level for name in ("", *quiet_libs)}
    root.addHandler(handler)
    root.setLevel(level)
    for name in quiet_libs:
        logging.getLogger(name).setLevel(max(level, logging.ERROR))

    def restore() -> None:
        root.removeHandler(handler)
        for name, lvl in saved_levels.items():
            logging.getLogger(name).setLevel(lvl)
        sys.stderr = saved_stderr
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

    return restore


def info(msg: str) -> None:
    """An informational line on stderr (hidden by --quiet)."""
    logging.getLogger("streaming_weights.cli").info(msg)
