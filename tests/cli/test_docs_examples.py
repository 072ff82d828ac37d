"""The README's code blocks, the examples and the demo, executed end to end (so the docs cannot rot)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


from streaming_weights.netutil import free_port

from tests.support.streaming import served

ROOT = Path(__file__).resolve().parents[2]


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def run_process(args, cwd, timeout=300, env=None) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    assert res.returncode == 0, f"{args}\nSTDOUT:\n{res.stdout}\nSTDERR:\n{res.stderr[-4000:]}"
    return res


def run_here(path: Path | str, code: str | None = None, argv: list[str] | None = None) -> None:
    """Run a script (``path``, or ``code`` under that file name) as ``__main__`` in this process, in a fresh
    namespace (so it must import what it uses, as on its own); the demo below stays a fresh process."""
    code = Path(path).read_text() if code is None else code
    old_argv = sys.argv
    sys.argv = [str(path), *(argv or [])]
    try:
        exec(compile(code, str(path), "exec"), {"__name__": "__main__", "__file__": str(path)})
    finally:
        sys.argv = old_argv


def test_readme_blocks_run(tiny_source, tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert len(blocks) == 2
    src = tiny_source("llama", layers=4)
    port = free_port()
    first = (blocks[0].replace("path/to/llama", str(src)).replace("port=8765", f"port={port}")
             .replace("ws://localhost:8765", f"ws://localhost:{port}"))
    monkeypatch.chdir(tmp_path)
    run_here(tmp_path / "first.py", first)
    assert "torch.Size([1, 4, 64])" in capsys.readouterr().out
    # The second block talks to a running server over the chunks the first block wrote.
    with served(tmp_path / "chunks") as uri:
        port2 = int(uri.rsplit(":", 1)[1])
        # each block runs on its own: nothing is prepended (the block imports what it uses)
        second = blocks[1].replace("server_port=8765", f"server_port={port2}")
        run_here(tmp_path / "second.py", second)
    assert "tensor([[" in capsys.readouterr().out


def test_llama_example(tiny_source, capsys):
    run_here(ROOT / "examples" / "llama_example.py", argv=[str(tiny_source("llama", layers=4))])
    out = capsys.readouterr().out
    assert "last_hidden_state (1, 5, 64)" in out and "cache hit rate" in out


def test_inference_example(tiny_source, capsys):
    run_here(ROOT / "examples" / "inference_example.py", argv=[str(tiny_source("bert", layers=4))])
    out = capsys.readouterr().out
    assert "embeddings (2, 48)" in out and "pooler_output (2, 48)" in out


def test_demo_streams_an_answer(smollm2_chunks, tmp_path):
    # Reuse the session's chunked SmolLM2 as the demo's cache, so the demo does not re-chunk it.
    cache = tmp_path / "cache"
    (cache / "chunks").mkdir(parents=True)
    (cache / "chunks" / "SmolLM2-135M-Instruct").symlink_to(smollm2_chunks)
    res = run_process([sys.executable, "-m", "streaming_weights.cli", "demo", "--max-new-tokens", "8"], ROOT,
                      env={"SURFING_CACHE_DIR": str(cache)})
    assert "Paris" in res.stdout
    # the stats line goes to stderr; "Preparing" only appears when the demo actually chunks
    assert re.search(r"\[\d+ tokens in [\d.]+ s, [\d.]+ tok/s \| cache 8/30 units", res.stderr)
    assert "Preparing" not in res.stderr and "Traceback" not in res.stderr
