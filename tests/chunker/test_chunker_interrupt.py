"""A chunker *process* killed with SIGKILL midway (no cleanup code runs) leaves no manifest, so no client or
server can mistake the partial directory for a model; a rerun completes it byte-identically.

(tests/chunker/test_chunker.py covers the in-process interruption: an exception raised between units, a stale
manifest removed first, a leftover temp file and a garbage unit overwritten on rerun.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streaming_weights.exceptions import NotFoundError
from streaming_weights.client import StorageSource
from streaming_weights.storage import FilesystemBackend

from tests.support.models import chunk

pytestmark = [pytest.mark.timeout(180), pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")]


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_sigkilled_chunker_leaves_no_manifest_and_rerun_is_byte_identical(tiny_source, tmp_path):
    src = tiny_source("llama")
    out = tmp_path / "out"
    # The real chunker in a child process. After its first unit is written, on_unit reports the name on
    # stdout and then blocks on stdin (never written to), so the kill lands midway deterministically.
    script = ("import asyncio, sys; from streaming_weights import ModelChunker; "
              "asyncio.run(ModelChunker(sys.argv[1], output_dir=sys.argv[2], name='m', "
              "on_unit=lambda name: (print(name, flush=True), sys.stdin.readline())).chunk_model())")
    cmd = [sys.executable, "-c", script, str(src), str(out)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline().strip()  # blocks until the first unit is on disk (or the child exits)
        assert first, f"chunker exited before writing a unit: {proc.stderr.read()!r}"
        killed_with = sorted(p.name for p in (out / "units").iterdir()
                             if p.suffix == ".safetensors" and not p.name.startswith("."))
        assert killed_with, f"on_unit({first!r}) ran but no unit file is in {out / 'units'}"
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    # a client pointed at the partial directory finds no model, rather than a broken one
    import asyncio

    with pytest.raises(NotFoundError, match="no chunked model"):
        asyncio.run(StorageSource(FilesystemBackend(out)).list_models())

    chunk(src, out, name="m")  # rerun over the debris
    chunk(src, tmp_path / "clean", name="m")  # uninterrupted reference run
    got, want = tree(out), tree(tmp_path / "clean")
    leftovers = {k for k in got if Path(k).name.startswith(".")}  # temp files of the killed run, if any
    for k in leftovers:
        got.pop(k)
    assert got.keys() == want.keys()
    assert got == want  # byte-identical, manifest included
