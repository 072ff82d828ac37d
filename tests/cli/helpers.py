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
