"""Running ``surfing`` as a user does: a fresh process, its stdout and stderr kept apart."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SURFING = [sys.executable, "-m", "streaming_weights"]


def surfing(*args: str, cwd: Path | str | None = None, input: str | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``surfing ARGS`` in a subprocess (stdin from ``input``); returns the finished process, text mode."""
    return subprocess.run([*SURFING, *map(str, args)], cwd=cwd, input=input, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def assert_one_line_error(res: subprocess.CompletedProcess, *phrases: str) -> str:
    """The command failed with exit status 2 and exactly one stderr line naming each of ``phrases``."""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr, res.stderr
    assert res.returncode == 2, (res.returncode, res.stderr)
    errors = [ln for ln in lines if ": error: " in ln]
    assert len(errors) == 1, lines
    for p in phrases:
        assert p in errors[0], (p, errors[0])
    return errors[0]


def surfing_here(capfd, *args: str, cwd: Path | str | None = None, input: str | None = None,
                 ) -> subprocess.CompletedProcess:
    """``surfing ARGS`` in this process (``streaming_weights.cli.main``; stdin from ``input``), with the
    result shaped as :func:`surfing`'s: for the checks where the command's behaviour is under test, not the
    fresh process (each command keeps real subprocess runs elsewhere). ``capfd`` is the test's fixture: its
    output so far is discarded; the command's stdout and stderr are read at the file-descriptor level."""
    import contextlib
    import io

    from streaming_weights import cli

    argv = list(map(str, args))
    capfd.readouterr()
    with contextlib.ExitStack() as stack:
        if cwd is not None:
            stack.enter_context(contextlib.chdir(cwd))
        if input is not None:
            old_stdin, sys.stdin = sys.stdin, io.StringIO(input)
            stack.callback(setattr, sys, "stdin", old_stdin)
        try:
            status = cli.main(argv)
        except SystemExit as exc:  # argparse usage errors
            status = exc.code if isinstance(exc.code, int) else 2
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["surfing", *argv], status, out, err)
