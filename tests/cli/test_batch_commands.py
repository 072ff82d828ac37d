"""CLI: `generate --prompt -` / `--prompts-file` and `embed --input FILE --output vectors.npy|.jsonl`."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from streaming_weights import StreamingBaseModel, StreamingBertModel, cli

# The tiny LLaMA with a word-level tokenizer (the flags are under test here, not the answers' content): each
# answer is checked against the library's generate_text for the same prompt and options.
TINY = ["--cache-size", "30", "--max-new-tokens", "8"]
PROMPTS = ["tell me a story", "hello"]  # greedy answers that differ on the tiny model, with and without --chat


@pytest.fixture(scope="module")
def answers(llama_text_chunks) -> dict[tuple[str, bool], str]:
    """``{(prompt, chat): greedy answer}`` from the library, as the CLI must print it."""
    with StreamingBaseModel(None, str(llama_text_chunks), 30) as m:
        got = {(p, chat): m.generate_text(p, chat=chat, max_new_tokens=8, do_sample=False)
               for p in PROMPTS for chat in (True, False)}
    assert got[PROMPTS[0], True] != got[PROMPTS[1], True]  # the two answers tell the prompts apart
    assert got[PROMPTS[0], True] != got[PROMPTS[0], False]  # and --chat from no --chat
    return got


def test_generate_prompt_from_stdin(llama_text_chunks, answers, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO(PROMPTS[0] + "\n"))
    rc = cli.main(["generate", "--server", str(llama_text_chunks), "--prompt", "-", "--chat", "-q", *TINY])
    assert rc == 0
    assert capsys.readouterr().out == answers[PROMPTS[0], True] + "\n"  # the line read, newline dropped


def test_generate_prompts_file_jsonl_and_lines(llama_text_chunks, answers, tmp_path, capsys):
    lines = tmp_path / "prompts.txt"
    lines.write_text(f"{PROMPTS[0]}\n\n{PROMPTS[1]}\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"id": i, "prompt": p}) for i, p in enumerate(PROMPTS[::-1])) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", "--server", str(llama_text_chunks), "--prompts-file", str(jsonl), "--chat",
                     "--output", str(out), "--batch-size", "2", *TINY]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [0, 1]
    assert [r["text"] for r in recs] == [answers[PROMPTS[1], True], answers[PROMPTS[0], True]]
    assert cli.main(["generate", "--server", str(llama_text_chunks), "--prompts-file", str(lines), "--chat",
                     *TINY]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in printed] == PROMPTS
    assert printed[0]["text"] == recs[1]["text"] and printed[1]["text"] == recs[0]["text"]


def test_generate_flag_errors(tmp_path, capsys):
    """Each error is found before the model loads: the location does not even exist."""
    nowhere = str(tmp_path / "no-chunks-here")
    assert cli.main(["generate", "--server", nowhere, "--prompt", "x", "--top-p", "0.9", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--top-p/--top-k refine sampling: give --temperature > 0 too" in err and "no-chunks-here" not in err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--server", nowhere, "--prompt", "x", "--speculation", "sometimes"])
    assert exit_.value.code == 2 and "--speculation" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    assert cli.main(["generate", "--server", nowhere, "--prompts-file", str(bad), *TINY]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:1: a JSON Lines record needs a string 'prompt' field" in err and "no-chunks-here" not in err


def test_generate_sampling_flags_are_reproducible(llama_text_chunks, answers, capsys):
    args = ["generate", "--server", str(llama_text_chunks), "--prompt", "Tell me a story.", "--chat",
            "--temperature", "0.9", "--top-p", "0.95", "--top-k", "40", "--seed", "7", "-q", *TINY]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == first
    assert cli.main([*args[:-len(TINY) - 3], "--seed", "8", "-q", *TINY]) == 0  # another seed: other words
    assert capsys.readouterr().out != first


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


def test_embed_output_of_an_unknown_kind_is_refused_before_the_model_loads(tmp_path, capsys):
    src = tmp_path / "texts.txt"
    src.write_text("a text\n")
    assert cli.main(["embed", "--server", str(tmp_path / "no-chunks-here"), "--input", str(src), "--output",
                     str(tmp_path / "v.csv")]) == 2
    err = capsys.readouterr().err
    assert "--output must end in .npy or .jsonl (or be -), got" in err and "no-chunks-here" not in err
