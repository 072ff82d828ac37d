"""CLI: `surfing generate` against a failover list, streamed output and the stats line."""

from __future__ import annotations

import re

from streaming_weights import StreamingBaseModel, cli
from streaming_weights.cli.options import parse_servers
from streaming_weights.netutil import free_port


def test_generate_fails_over_from_a_dead_server(llama_text_chunks, capsys):
    servers = f"ws://127.0.0.1:{free_port()},{llama_text_chunks}"  # nothing listens on that port
    rc = cli.main(["generate", "--server", servers, "--prompt", "tell me a story", "--chat",
                   "--max-new-tokens", "6", "--cache-size", "30"])
    captured = capsys.readouterr()
    assert rc == 0
    with StreamingBaseModel(None, str(llama_text_chunks), 30) as m:  # the answer the second location gives
        want = m.generate_text("tell me a story", chat=True, max_new_tokens=6, do_sample=False)
    assert captured.out == want + "\n"
    assert re.search(r"\[6 tokens in [\d.]+ s, [\d.]+ tok/s \| cache 6/6 units", captured.err)


def test_servers_argument_parsing(tmp_path):
    assert parse_servers("ws://a:1") == "ws://a:1"
    assert parse_servers("ws://a:1, ws://b:2") == ["ws://a:1", "ws://b:2"]
    assert parse_servers("localhost:8765") == "ws://localhost:8765"  # host:port means ws://host:port
    assert parse_servers(str(tmp_path)) == str(tmp_path)  # a directory stays a directory
