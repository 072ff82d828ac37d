"""Embeddings and lm_heads stored as row shards: streamed shard by shard when the budget cannot keep them,
kept whole when it can; either way the output is what transformers computes with the whole weights.

Budgets here are exact: the engine's measured overhead (RSS growth while the tokenizer and skeleton are
built) is pinned to 0, so a budget one byte below "shards kept beside one unit" must stream the shards.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from streaming_weights import StreamingBaseModel, StreamingConfig
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.format import Manifest
from streaming_weights.models import engine as engine_mod
from streaming_weights.models.planner import plan_memory

from tests.support.models import SEED, chunk
from tests.support.streaming import served

ATOL = 1e-5


def _llama(tie: bool, vocab: int = 320, hidden: int = 64):
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=3,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)


CONFIGS = {
    "llama-untied": lambda: (transformers.LlamaForCausalLM, _llama(False)),
    "llama-tied": lambda: (transformers.LlamaForCausalLM, _llama(True)),
    "gpt2": lambda: (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=250, n_embd=48, n_layer=3, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)),
    # a scaled embedding (Gemma3TextScaledWordEmbedding multiplies by sqrt(hidden) in its own forward)
    "gemma3": lambda: (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, sliding_window=16, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    "t5": lambda: (transformers.T5ForConditionalGeneration, transformers.T5Config(
        vocab_size=200, d_model=48, d_ff=96, d_kv=12, num_heads=4, num_layers=3, num_decoder_layers=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    "bert": lambda: (transformers.BertModel, transformers.BertConfig(
        vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)),
}
CAUSAL = ["llama-untied", "llama-tied", "gpt2", "gemma3"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """``sharded(kind)`` -> (transformers reference model, chunk dir) chunked with ~4 rows-shards per weight."""
    made = {}

    def get(kind: str, shard_size: int = 20_000):
        if (kind, shard_size) not in made:
            cls, cfg = CONFIGS[kind]()
            torch.manual_seed(SEED)
            ref = cls(cfg).eval()
            src = tmp_path_factory.mktemp(f"src-{kind}")
            ref.save_pretrained(str(src))
            out = tmp_path_factory.mktemp(f"chunks-{kind}")
            chunk(src, out, name=kind, shard_size=shard_size)
            made[kind, shard_size] = (cls.from_pretrained(str(src)).eval(), out)
        return made[kind, shard_size]

    return get


@pytest.fixture
def no_overhead(monkeypatch):
    monkeypatch.setattr(engine_mod, "current_anon", lambda: 0)


def manifest_of(chunks) -> Manifest:
    return Manifest.from_bytes((chunks / "manifest.json").read_bytes())


def budget_streaming_shards(chunks) -> int:
    """One byte below what keeping the shards beside one streamed unit needs (overhead 0)."""
    m = manifest_of(chunks)
    kept = plan_memory(m, StreamingConfig(), budget=10**12)
    assert not kept.shards_streamed and kept.shard_bytes > 0
    return kept.resident_bytes + kept.unit_bytes + kept.headroom_bytes - 1


@pytest.mark.parametrize("kind", CAUSAL)
def test_streamed_shards_match_transformers(sharded, no_overhead, kind):
    ref, chunks = sharded(kind)
    assert len(manifest_of(chunks).shards) >= 3
    ids = torch.tensor([[1, 17, 45, 200, 3, 99], [1, 5, 5, 240, 7, 2]])
    with StreamingBaseModel(kind, str(chunks), memory_budget=budget_streaming_shards(chunks)) as m:
        plan = m.get_cache_info()["plan"]
        assert plan["shards_streamed"] and not set(plan["resident"]) & {u.name for u in m.manifest.shards}
        emb = m.hf_model.get_input_embeddings().weight
        assert emb.stride() == (0,) * emb.dim() and torch.isnan(emb).all()  # a placeholder, not the weight
        out = m.hf_model(input_ids=ids).logits
        got = m.generate(input_ids=ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False)
        fetched = m.get_cache_info()["bytes_fetched"]
    with torch.no_grad():
        exp = ref(input_ids=ids).logits
        exp_gen = ref.generate(input_ids=ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch.testing.assert_close(out, exp, rtol=0, atol=ATOL)
    assert torch.equal(got, exp_gen)
    assert fetched > 0


@pytest.mark.parametrize("kind", ["llama-tied", "gemma3"])
def test_kept_shards_are_assembled_whole(sharded, no_overhead, kind):
    ref, chunks = sharded(kind)
    ids = torch.tensor([[1, 17, 45, 200, 3, 99]])
    with StreamingBaseModel(kind, str(chunks), memory_budget=10**10) as m:
        plan = m.get_cache_info()["plan"]
        assert not plan["shards_streamed"] and {u.name for u in m.manifest.shards} <= set(plan["resident"])
        emb = m.hf_model.get_input_embeddings().weight
        assert torch.equal(emb, ref.get_input_embeddings().weight)
        # the resident unit's buffer, then one for the first shard: later shards land in it again (a buffer
        # whose last view the I/O thread lets go of late is held aside, and one more is allocated meanwhile)
        pool, shards = m.engine.pool, len(m.manifest.shards)
        assert pool.allocated <= 3 and pool.reused >= shards - 2, (pool.allocated, pool.reused, shards)
        out = m.hf_model(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(out, ref(input_ids=ids).logits, rtol=0, atol=ATOL)


def test_embedding_gathers_only_the_shards_its_tokens_need(sharded, no_overhead):
    _, chunks = sharded("llama-untied")
    m_ = manifest_of(chunks)
    embed = sorted((u for u in m_.shards if u.shard_tensor == "model.embed_tokens.weight"), key=lambda u: u.rows)
    head = [u.name for u in m_.shards if u.shard_tensor == "lm_head.weight"]
    with StreamingBaseModel("llama-untied", str(chunks), memory_budget=budget_streaming_shards(chunks),
                            prefetch_count=0) as m:
        calls = []
        for e in m.engine.edge_bindings:
            orig = e._acquire
            e._acquire = lambda name, ordered, orig=orig: (calls.append(name), orig(name, ordered))[1]
        token = embed[1].rows[0]  # a token in the second shard only
        m.hf_model(input_ids=torch.tensor([[token, token]]))
    assert [c for c in calls if c not in head] == [embed[1].name]
    assert [c for c in calls if c in head] == head  # the lm_head runs over every shard, in order


def test_out_of_range_token_raises(sharded, no_overhead):
    _, chunks = sharded("llama-tied")
    with StreamingBaseModel("llama-tied", str(chunks), memory_budget=budget_streaming_shards(chunks)) as m:
        with pytest.raises(IndexError, match="out of range"):
            m.hf_model(input_ids=torch.tensor([[1, 320]]))


def test_budget_below_streamed_minimum_names_it(sharded, no_overhead):
    _, chunks = sharded("llama-tied")
    streaming = budget_streaming_shards(chunks)
    m = manifest_of(chunks)
    least = plan_memory(m, StreamingConfig(), budget=streaming)
    assert least.shards_streamed
    minimum = least.resident_bytes + least.unit_bytes + least.headroom_bytes
    with pytest.raises(ConfigurationError, match=f"minimum .*\\({minimum} bytes\\)"):
        plan_memory(m, StreamingConfig(), budget=minimum - 1)
    assert plan_memory(m, StreamingConfig(), budget=minimum).cache_size == 0


def test_tied_embedding_larger_than_the_whole_budget_through_a_server(tmp_path, no_overhead):
    """Default chunking ("auto" shards a weight above 16 MiB): a 100k-token tied embedding (25.6 MB) larger
    than the whole budget, streamed from a real weight server; greedy generation matches transformers."""
    cls, cfg = transformers.LlamaForCausalLM, _llama(True, vocab=100_000)
    torch.manual_seed(SEED)
    ref = cls(cfg).eval()
    ref.save_pretrained(str(tmp_path / "src"))
    chunk(tmp_path / "src", tmp_path / "chunks", name="bigvocab")
    m_ = manifest_of(tmp_path / "chunks")
    shard_bytes = sum(u.bytes for u in m_.shards)
    assert shard_bytes > 100_000 * 64 * 4 and len(m_.shards) > 1
    budget = plan_memory(m_, StreamingConfig(), budget=10**12)
    budget = budget.resident_bytes - shard_bytes + 2 * max(u.bytes for u in m_.units if u.role != "resident") + \
        budget.headroom_bytes
    assert budget < shard_bytes
    ids = torch.tensor([[1, 99_999, 5, 50_000]])
    with served(tmp_path / "chunks") as uri, StreamingBaseModel("bigvocab", uri, memory_budget=budget) as m:
        assert m.get_cache_info()["plan"]["shards_streamed"]
        got = m.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        exp = ref.generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(got, exp)


def test_t5_shared_embedding_and_head_streamed(sharded, no_overhead):
    """T5: one tied weight behind the encoder's and decoder's embeddings and the lm_head."""
    ref, chunks = sharded("t5")
    ids = torch.tensor([[5, 9, 23, 44, 1], [7, 8, 150, 1, 0]])
    mask = (ids != 0).long()
    with StreamingBaseModel("t5", str(chunks), memory_budget=budget_streaming_shards(chunks)) as m:
        assert m.get_cache_info()["plan"]["shards_streamed"]
        out = m.hf_model(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor([[0, 12], [0, 5]])).logits
        got = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        exp = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=torch.tensor([[0, 12], [0, 5]])).logits
        exp_gen = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out, exp, rtol=0, atol=ATOL)
    assert torch.equal(got, exp_gen)


def test_bert_word_embeddings_streamed(sharded, no_overhead):
    ref, chunks = sharded("bert")
    ids = torch.tensor([[2, 45, 67, 289, 3], [2, 11, 3, 0, 0]])
    mask = (ids != 0).long()
    with StreamingBaseModel("bert", str(chunks), memory_budget=budget_streaming_shards(chunks)) as m:
        assert m.get_cache_info()["plan"]["shards_streamed"]
        out = m.forward(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        exp = ref(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.last_hidden_state, exp.last_hidden_state, rtol=0, atol=ATOL)
    torch.testing.assert_close(out.pooler_output, exp.pooler_output, rtol=0, atol=ATOL)


def test_streamed_shards_through_the_device_tier(sharded, no_overhead):
    """The CUDA code path (recording fake device): shards cross to the device on every use and are never
    kept there, while the blocks (the device has room for all of them) are kept after the first pass."""
    from tests.support.fakedevice import FakeDeviceOps

    ref, chunks = sharded("llama-tied")
    ops = FakeDeviceOps()
    ids = torch.tensor([[1, 17, 45, 200, 3, 99]])
    with StreamingBaseModel("llama-tied", str(chunks), device=ops,
                            memory_budget=budget_streaming_shards(chunks)) as m:
        shards = len(m.manifest.shards)
        first = m.hf_model(input_ids=ids).logits
        copies = m.engine.placement.stats.copies
        second = m.hf_model(input_ids=ids).logits
        again = m.engine.placement.stats.copies - copies
    with torch.no_grad():
        exp = ref(input_ids=ids).logits
    torch.testing.assert_close(first, exp, rtol=0, atol=ATOL)
    torch.testing.assert_close(second, exp, rtol=0, atol=ATOL)
    assert shards < again <= 2 * shards  # the lm_head's shards, plus the embedding's, on every pass; no block
