"""Issue 23, items 3 and 6: the edges a new user hit that surfaced as internal errors or surprises, each run
as the user ran it (``surfing ARGS``: in a fresh process where the process is the point — ``-q``, an embed, a
bench, keygen — else in-process through the same ``cli.main``) on tiny fixed-seed models with a word-level
tokenizer, and the same rule checked through the library."""

from __future__ import annotations

import json
import re
import stat
import subprocess
from pathlib import Path

import pytest
import torch

from streaming_weights import StreamingBaseModel
from streaming_weights.exceptions import ConfigurationError, ContextLengthError, ModelError

from tests.cli.helpers import assert_one_line_error, surfing, surfing_here
from tests.support.tokenizers import text_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def llama_text(tiny_source, tmp_path_factory) -> Path:
    """Tiny LLaMA (max_position_embeddings 256) whose tokenizer adds no BOS: "" encodes to nothing."""
    return text_model(tiny_source("llama"), tmp_path_factory.mktemp("llama-text"), name="llama-text", vocab_size=320)


@pytest.fixture(scope="module")
def gpt2_text(tiny_source, tmp_path_factory) -> Path:
    """Tiny GPT-2 (n_positions 128) whose tokenizer prepends <s>: "" encodes to the BOS token."""
    return text_model(tiny_source("gpt2"), tmp_path_factory.mktemp("gpt2-text"), name="gpt2-text", vocab_size=250,
                      bos=True)


# ------------------------------------------------------------------ empty prompt
def test_an_empty_prompt_is_a_clear_error_unless_the_tokenizer_has_a_bos(llama_text, gpt2_text, capfd):
    assert_one_line_error(surfing_here(capfd, "generate", "--server", llama_text, "--prompt", "", "--max-new-tokens", "3"),
                          "the prompt is empty", "encodes to no tokens", "give some text")
    with StreamingBaseModel(None, str(llama_text), 2) as model:
        with pytest.raises(ConfigurationError, match="the prompt is empty"):
            model.generate_text("", max_new_tokens=2)
        with pytest.raises(ConfigurationError, match="prompt 1 is empty"):  # not silently all padding in a batch
            model.generate_text(["hello", ""], max_new_tokens=2)
        assert isinstance(model.generate_text("", chat=True, max_new_tokens=2), str)  # the template gives tokens
        with pytest.raises(ConfigurationError, match=r"the prompt is empty \(row 0 of the batch\)"):
            model.generate(input_ids=torch.tensor([[0, 0], [9, 15]]), attention_mask=torch.tensor([[0, 0], [1, 1]]),
                           max_new_tokens=2)
    # a tokenizer that adds BOS: "" is the BOS token alone, and that is generated from
    res = surfing_here(capfd, "generate", "--server", gpt2_text, "--prompt", "", "--max-new-tokens", "3")
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    with StreamingBaseModel(None, str(gpt2_text), 2) as model:
        assert model.generate_text([""], max_new_tokens=3)[0] == res.stdout.rstrip("\n")


# ------------------------------------------------------------------ context length before the memory plan
def test_max_new_tokens_past_the_context_says_so_before_planning_memory(llama_text, gpt2_text, capfd):
    line = assert_one_line_error(
        surfing_here(capfd, "generate", "--server", llama_text, "--prompt", "hello there", "--max-new-tokens", "100000",
                "--memory", "300MB"),
        "exceeds the model's context (max_position_embeddings 256)", "--max-new-tokens")
    assert "budget" not in line and "memory" not in line, line
    assert "at most 254" in line, line  # "hello there": 2 tokens, no BOS
    with StreamingBaseModel(None, str(gpt2_text), 2) as model:  # GPT-2 names it n_positions
        ids = torch.tensor([[1, 7, 8]])
        with pytest.raises(ContextLengthError, match=r"max_position_embeddings 128\): lower max_new_tokens= to "
                                                     r"at most 125"):
            model.generate(input_ids=ids, max_new_tokens=126)
        # fits exactly: runs (the default prompt-lookup drafts used to index past the 128 positions here)
        assert model.generate(input_ids=ids, max_new_tokens=125, do_sample=False).shape[1] <= 128
        with pytest.raises(ContextLengthError, match="shorten the prompt to fewer than 128 tokens"):
            model.generate(input_ids=torch.ones(1, 130, dtype=torch.long), max_new_tokens=1)
        with pytest.raises(ContextLengthError, match=r"prompt \(120 tokens\) \+ max_new_tokens \(10\)"):
            model.generate_text(["hello", " ".join(["hi"] * 119)], max_new_tokens=10)  # with BOS: 120 tokens


# ------------------------------------------------------------------ sampling options
@pytest.mark.parametrize("flag, value, words", [("--temperature", "-1", "must be >= 0"),
                                                ("--temperature", "nan", "not a number"),
                                                ("--top-p", "0", "must be in (0, 1]"),
                                                ("--top-p", "1.5", "must be in (0, 1]")])
def test_bad_sampling_flags_are_usage_errors(flag, value, words):
    res = surfing("generate", "--server", "localhost:1", "--prompt", "hi", flag, value)
    assert_one_line_error(res, flag, words)


def test_the_library_refuses_the_same_sampling_options(llama_text):
    ids = torch.tensor([[9, 15, 11]])
    with StreamingBaseModel(None, str(llama_text), 2) as model:
        for bad, words in [({"temperature": -1.0}, "temperature= must be >= 0"),
                           ({"temperature": -1.0, "do_sample": False}, "temperature= must be >= 0"),
                           ({"do_sample": True, "top_p": 0.0}, r"top_p= must be in \(0, 1\]"),
                           ({"do_sample": True, "top_p": 1.01}, r"top_p= must be in \(0, 1\]"),
                           ({"do_sample": True, "top_k": -3}, "top_k= must be an integer >= 0")]:
            with pytest.raises(ConfigurationError, match=words):
                model.generate(input_ids=ids, max_new_tokens=2, **bad)
            with pytest.raises(ConfigurationError, match=words):
                model.generate_text("the capital", max_new_tokens=2, **bad)
        assert model.generate(input_ids=ids, max_new_tokens=2, do_sample=True, temperature=0.7, top_p=1.0,
                              top_k=0).shape[1] in (4, 5)  # the edges of the valid ranges are accepted


# ------------------------------------------------------------------ keygen into a folder that does not exist
def test_keygen_creates_the_key_folder(tmp_path):
    res = surfing("keygen", "--out", "keys/release", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    private, public = tmp_path / "keys" / "release", tmp_path / "keys" / "release.pub"
    assert private.is_file() and public.is_file()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700  # the folder holds a private key
    deeper = surfing("keygen", "--out", tmp_path / "a" / "b" / "k", "-q")
    assert deeper.returncode == 0 and (tmp_path / "a" / "b" / "k.pub").is_file(), deeper.stderr


# ------------------------------------------------------------------ embed on a decoder
def test_embed_refuses_a_decoder_unless_asked(llama_text, gpt2_text, capfd):
    for chunks, arch in ((llama_text, "LlamaForCausalLM"), (gpt2_text, "GPT2LMHeadModel")):  # in-process
        assert_one_line_error(surfing_here(capfd, "embed", "--server", chunks, "--text", "hello"),
                              "decoder-only language model", arch, "--allow-decoder")
    res = surfing("embed", "--server", llama_text, "--text", "hello", "the capital", "--allow-decoder")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["dim"] == 64 and len(out["embeddings"]) == 2
    with StreamingBaseModel(None, str(llama_text), 2) as model:
        with pytest.raises(ModelError, match="allow_decoder=True"):
            model.embed(["hello"])
        vectors = model.embed(["hello", "the capital"], allow_decoder=True)
    torch.testing.assert_close(vectors, torch.tensor(out["embeddings"]), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ -q and -v
def test_quiet_prints_the_answer_alone_and_verbose_logs_the_plan(llama_text, tiny_source, tmp_path, capfd):
    # the -q runs are fresh processes (nothing at all on stderr); the others run in-process
    args = ["generate", "--server", llama_text, "--prompt", "what is the capital", "--max-new-tokens", "4"]
    plain, quiet, verbose = surfing_here(capfd, *args), surfing(*args, "-q"), surfing_here(capfd, *args, "-v")
    assert plain.returncode == quiet.returncode == verbose.returncode == 0, (plain.stderr, quiet.stderr)
    assert re.search(r"\[4 tokens in [\d.]+ s", plain.stderr), plain.stderr
    assert quiet.stderr == "" and quiet.stdout == plain.stdout and quiet.stdout.strip()
    assert re.search(r"INFO streaming_weights.cli: memory plan for llama-text:\n  budget: .*\n  bound: ",
                     verbose.stderr), verbose.stderr
    assert "memory plan" not in plain.stderr

    src = tiny_source("gpt2")
    loud = surfing_here(capfd, "chunk", src, "-o", tmp_path / "loud")
    silent = surfing("chunk", src, "-o", tmp_path / "silent", "-q")
    assert loud.returncode == silent.returncode == 0, silent.stderr
    assert loud.stdout.startswith("chunked ") and silent.stdout == "" and silent.stderr == ""
    assert (tmp_path / "silent" / "manifest.json").is_file()


# ------------------------------------------------------------------ bench output, demo cache, make clean-cache
def test_bench_by_default_never_writes_into_a_bench_folder(tmp_path, capfd):
    committed = tmp_path / "bench" / "REPORT.md"  # a checkout's committed report, where the user stands
    committed.parent.mkdir()
    committed.write_text("the committed report\n")
    res = surfing("bench", "--quick", "--cases", "gpu", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr
    assert committed.read_text() == "the committed report\n"
    assert (tmp_path / "surfing-bench" / "REPORT.md").is_file() and "surfing-bench/REPORT.md" in res.stdout
    explicit = surfing_here(capfd, "bench", "--quick", "--cases", "gpu", "--output-dir", "bench", cwd=tmp_path)
    assert explicit.returncode == 0 and committed.read_text() != "the committed report\n", explicit.stderr


def test_demo_says_where_its_cache_is_and_make_clean_cache_removes_it(smollm2_chunks, tmp_path, capfd, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "chunks").mkdir(parents=True)
    (cache / "chunks" / "SmolLM2-135M-Instruct").symlink_to(smollm2_chunks)  # as if an earlier demo chunked it
    (cache / "bench").mkdir()
    monkeypatch.setenv("SURFING_CACHE_DIR", str(cache))  # in-process: the demo's fresh process is test_docs_examples
    res = surfing_here(capfd, "demo", "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stderr.splitlines() if "cached SmolLM2-135M-Instruct chunks" in ln)
    assert str(cache / "chunks" / "SmolLM2-135M-Instruct") in line and "make clean-cache" in line, line
    assert 500 <= int(re.search(r"\((\d+) MiB", line).group(1)) <= 540, line

    (cache / "keep.txt").write_text("not ours")  # a cache folder pointed somewhere shared keeps the rest
    done = subprocess.run(["make", "-s", "clean-cache"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SURFING_CACHE_DIR": str(cache)})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in cache.iterdir()) == ["keep.txt"] and smollm2_chunks.is_dir()
    xdg = tmp_path / "xdg"
    (xdg / "surfing-weights" / "chunks" / "m").mkdir(parents=True)
    done = subprocess.run(["make", "-s", "clean-cache"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CACHE_HOME": str(xdg)})
    assert done.returncode == 0 and not (xdg / "surfing-weights").exists(), done.stderr
