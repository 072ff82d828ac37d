"""CLI: `generate --prompt -` / `--prompts-file` and `embed --input FILE --output vectors.npy|.jsonl`."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from streaming_weights import StreamingBertModel, cli

SMOL = ["--cache-size", "30", "--max-new-tokens", "8"]  # whole model cached: the flags are under test here


def test_generate_prompt_from_stdin(smollm2_chunks, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    rc = cli.main(["generate", "--server", str(smollm2_chunks), "--prompt", "-", "--chat", *SMOL])
    assert rc == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_prompts_file_jsonl_and_lines(smollm2_chunks, tmp_path, capsys):
    lines = tmp_path / "prompts.txt"
    lines.write_text("What is the capital of France?\n\nName a primary color.\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in
                               enumerate(["Name a primary color.", "What is the capital of France?"])) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "--server", str(smollm2_chunks), "--prompts-file", str(jsonl), "--chat",
                     "--output", str(out), "--batch-size", "2", *SMOL]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [0, 1] and "Paris" in recs[1]["text"]
    assert cli.main(["generate", "--server", str(smollm2_chunks), "--prompts-file", str(lines), "--chat",
                     *SMOL]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in printed] == ["What is the capital of France?", "Name a primary color."]
    assert printed[0]["text"] == recs[1]["text"] and printed[1]["text"] == recs[0]["text"]


def test_generate_flag_errors(smollm2_chunks, tmp_path, capsys):
    assert cli.main(["generate", "--server", str(smollm2_chunks), "--prompt", "x", "--top-p", "0.9", *SMOL]) != 0
    assert "--temperature" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", "--server", str(smollm2_chunks), "--prompt", "x", "--speculation", "sometimes"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    assert cli.main(["generate", "--server", str(smollm2_chunks), "--prompts-file", str(bad), *SMOL]) != 0
    assert "prompt" in capsys.readouterr().err


def test_generate_sampling_flags_are_reproducible(smollm2_chunks, capsys):
    args = ["generate", "--server", str(smollm2_chunks), "--prompt", "Tell me a story.", "--chat",
            "--temperature", "0.9", "--top-p", "0.95", "--top-k", "40", "--seed", "7", *SMOL]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first


def test_embed_input_file_to_npy_and_jsonl(minilm_chunks, tmp_path):
    texts = ["a cat sat on the mat", "streaming weights", "the quick brown fox jumps over the lazy dog"]
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(texts) + "\n")
    npy, jsonl = tmp_path / "v.npy", tmp_path / "v.jsonl"
    for out in (npy, jsonl):
        assert cli.main(["embed", "--server", str(minilm_chunks), "--input", str(src), "--output", str(out),
                         "--normalize", "-q"]) == 0
    with StreamingBertModel("all-MiniLM-L6-v2", str(minilm_chunks), cache_size=1) as m:
        want = m.embed(texts, normalize=True)
    vectors = np.load(npy)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    torch.testing.assert_close(torch.from_numpy(vectors), want, rtol=0, atol=1e-6)
    recs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [r["text"] for r in recs] == texts
    torch.testing.assert_close(torch.tensor([r["embedding"] for r in recs]), want, rtol=0, atol=1e-6)
    assert cli.main(["embed", "--server", str(minilm_chunks), "--input", str(src), "--output",
                     str(tmp_path / "v.csv")]) != 0
