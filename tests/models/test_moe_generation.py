"""Mixture-of-experts models keep the generation features (issue 25 item 6) and the CLI: prompt-lookup speculation
and batched ``generate_text`` give transformers' tokens; ``surfing chunk`` / ``surfing inspect --memory`` on a
hub-layout MoE checkpoint."""

from __future__ import annotations

import pytest
import torch

from streaming_weights import StreamingBaseModel
from streaming_weights.format.names import expert_unit_name

from tests.cli.helpers import surfing
from tests.support import moe
from tests.support.tokenizers import text_model

# A repeating prompt: prompt lookup finds drafts in it.
LOOP_IDS = torch.tensor([[5, 17, 33, 9, 41, 7, 5, 17, 33, 9, 41, 7, 5, 17]])


@pytest.mark.parametrize("family", ["gpt_oss"])  # a fixed seed whose greedy text loops: drafts get accepted
def test_speculation_keeps_transformers_tokens_on_moe(family, moe_chunks, moe_reference):
    src, chunks = moe_chunks(family)
    with torch.no_grad():
        want = moe_reference(src).generate(input_ids=LOOP_IDS, max_new_tokens=12, do_sample=False)
    with StreamingBaseModel(family, str(chunks), cache_size=1) as m:
        for speculation in ("off", "auto", 4):
            before = m.get_inference_stats()
            got = m.generate(input_ids=LOOP_IDS, max_new_tokens=12, do_sample=False, speculation=speculation)
            assert torch.equal(got, want), speculation
            after = m.get_inference_stats()
            drafted = after["drafted_tokens"] - before["drafted_tokens"]
            assert (drafted == 0) == (speculation == "off"), (speculation, drafted)
        assert after["accepted_tokens"] > 0


@pytest.fixture(scope="module")
def text_moe(moe_source, tmp_path_factory):
    """The tiny Qwen2-MoE with a word-level tokenizer: (checkpoint dir, tokenizer dir, chunk dir)."""
    out = tmp_path_factory.mktemp("moe-text")
    chunks = text_model(moe_source("qwen2_moe"), out, name="qwen2_moe", vocab_size=128)
    return out / "src", out / "tokenizer", chunks


PROMPTS = ["what is the capital of france", "hello", "tell me a short story about paris and berlin"]


def test_generate_text_batch_equals_transformers_on_the_same_batch(text_moe):
    from transformers import AutoTokenizer

    src, tok_dir, chunks = text_moe
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ref = moe.reference(src)
    batch = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    want = [tok.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True) for row in out]
    assert len(set(want)) > 1, "the prompts should not all continue alike"
    with StreamingBaseModel("qwen2_moe", str(chunks), cache_size=1) as m:
        got = m.generate_text(PROMPTS, batch_size=len(PROMPTS), max_new_tokens=5, min_new_tokens=5, do_sample=False)
        one = m.generate_text(PROMPTS[1], max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert got == want
    assert one == want[1]


def test_batch_rows_fetch_the_union_of_their_experts(moe_chunks):
    """A batch's experts call fetches the union over its rows, each expert once."""
    _, chunks = moe_chunks("mixtral")
    two = torch.cat([moe.IDS[:, :6], moe.IDS[:, 5:11]])
    calls, fetched = moe.routed_run(chunks, "mixtral", two, 2)
    for path, tokens, picked, got in calls:
        assert got == {expert_unit_name(path, e, e + 1) for e in picked}
    decode = [c for c in calls if c[1] == 2]  # one new token per row
    assert decode and any(len(c[2]) > moe.TOP_K for c in decode), "rows never routed differently"
    per_call = [f for f in fetched if ".experts." in f]
    assert len(per_call) == sum(len(c[3]) for c in calls)  # no expert fetched twice within a call


def test_surfing_chunk_and_inspect_memory_on_an_moe_checkpoint(moe_source, moe_reference, tmp_path, capsys):
    from streaming_weights.cli import main

    src = moe_source("qwen3_moe", "sharded")
    out = tmp_path / "chunks"
    capsys.readouterr()
    # the command in process (its console entry point runs as a fresh process in test_cli_chunk_and_inspect)
    assert main(["chunk", str(src), "-o", str(out), "--name", "q3"]) == 0
    assert f"({2 * moe.EXPERTS} expert units)" in capsys.readouterr().out
    assert main(["inspect", str(out), "--memory", "30MB"]) == 0  # in process: one torch import is enough
    shown = capsys.readouterr().out
    experts_lines = [ln for ln in shown.splitlines() if ln.strip().startswith("experts:")]
    assert len(experts_lines) == 1, shown
    assert f"2 layers x {moe.EXPERTS} experts" in experts_lines[0]
    assert f"{2 * moe.EXPERTS} expert units in 2 layers" in shown
    with StreamingBaseModel("q3", str(out), cache_size=1) as m:
        got = m.generate(input_ids=moe.IDS, max_new_tokens=4, do_sample=False)
    with torch.no_grad():
        assert torch.equal(got, moe_reference(src).generate(input_ids=moe.IDS, max_new_tokens=4, do_sample=False))


@pytest.mark.slow
def test_surfing_chunk_experts_layer_keeps_experts_in_the_layer(moe_source, tmp_path):
    out = tmp_path / "chunks"
    res = surfing("chunk", moe_source("olmoe"), "-o", out, "--name", "ol", "--experts", "layer")
    assert res.returncode == 0, res.stderr
    assert "expert units" not in res.stdout
    m = moe.manifest_of(out)
    assert not m.experts and any(".experts." in t for u in m.streamed for t in u.tensors)


@pytest.mark.slow  # the API machinery has its own suite; this adds the MoE model behind it
def test_openai_api_concurrent_completions_equal_transformers(text_moe):
    """The OpenAI-compatible API over an MoE model served by a real weight server: concurrent greedy requests
    (batched by the API) get transformers' continuation of each prompt alone."""
    pytest.importorskip("fastapi", reason="needs the `api` extra: pip install -e '.[api,dev]'")
    openai = pytest.importorskip("openai", reason="needs the openai client (the `dev` extra)")
    from concurrent.futures import ThreadPoolExecutor

    from transformers import AutoTokenizer

    from tests.api.conftest import api_server
    from tests.support.streaming import served

    src, tok_dir, chunks = text_moe
    tok, ref = AutoTokenizer.from_pretrained(str(tok_dir)), moe.reference(src)
    want = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            new = ref.generate(input_ids=ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:]  # stops at EOS
        want.append(tok.decode(new, skip_special_tokens=True))
    with served(chunks) as uri, StreamingBaseModel("qwen2_moe", uri, cache_size=1) as m, \
            api_server(m, window=0.2, max_batch=8, max_queue=16) as url, \
            openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        def ask(prompt):
            return client.completions.create(model="qwen2_moe", prompt=prompt, max_tokens=5,
                                             temperature=0).choices[0].text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(ask, PROMPTS))
    assert got == want
    assert all(len(w.split()) >= 2 for w in want), want  # real continuations, not an immediate EOS
